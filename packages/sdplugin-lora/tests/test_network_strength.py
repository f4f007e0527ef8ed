"""Per-sample network strengths: kohya's per-dataset ``network_multiplier`` (slider LoRAs).

kohya (sd-scripts v0.8.2 to v0.9.1, ``train_network.py``) reads ``batch["network_multipliers"]`` (the
dataset's ``network_multiplier`` for every sample) and calls ``network.set_multiplier(m)``; its LoRA
forward is ``org(x) + lora_up(lora_down(x)) * multiplier * scale``. A batch of sample ``b`` at strength
``s_b`` must therefore give, row by row, the forward of the whole network at multiplier ``s_b``; the
references below are exactly those separate forwards (the adapters' own global multiplier, which
``test_max_norm_multiplier.py`` checks against the written-out formula).
"""

from __future__ import annotations

import pytest
import torch
from sdplugin_lora.adapters import LohaAdapter, LokrAdapter, LoraAdapter, OftAdapter, SharedDownLora
from sdplugin_lora.network import LoraNetwork

STRENGTHS = (1.0, -1.0, 0.5)


def _randomise(adapter: torch.nn.Module, seed: int) -> None:
    """Non-zero factors, so every algorithm changes the layer (DoRA: a magnitude away from ||W||)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in adapter.named_parameters():
            noise = torch.randn(param.shape, generator=g)
            if name == "dora_scale":
                param.mul_(1.0 + 0.2 * noise.abs())
            else:
                param.copy_(noise * 0.2)


def _linear() -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return torch.nn.Linear(12, 8), torch.randn(len(STRENGTHS), 5, 12)


def _conv(kernel: int = 3) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(1)
    return torch.nn.Conv2d(4, 8, kernel, padding=kernel // 2), torch.randn(len(STRENGTHS), 4, 6, 6)


#: (layer maker, adapter class, rank, alpha, keyword arguments) per algorithm and layer kind
_SPECS = {
    "lora": (_linear, LoraAdapter, 3, 1.5, {}),
    "locon_3x3": (_conv, LoraAdapter, 3, 1.5, {}),
    "locon_tucker": (_conv, LoraAdapter, 3, 2.0, {"tucker": True}),
    "dora": (_linear, LoraAdapter, 3, 1.5, {"dora": True}),
    "dora_conv": (_conv, LoraAdapter, 2, 1.0, {"dora": True}),
    "loha": (_linear, LohaAdapter, 2, 1.0, {}),
    "loha_conv": (_conv, LohaAdapter, 2, 1.0, {}),
    "lokr": (_linear, LokrAdapter, 2, 1.0, {"factor": 2}),
    "lokr_conv": (_conv, LokrAdapter, 2, 1.0, {"factor": 2}),
    "oft": (_linear, OftAdapter, 4, 1e-3, {}),
    "oft_conv": (lambda: _conv(1), OftAdapter, 2, 1e-3, {}),
}


def _case(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    make, cls, rank, alpha, kwargs = _SPECS[name]
    base, x = make()
    return cls("m", base, rank, alpha, **kwargs), x


def _separate(base: torch.nn.Module, adapter: torch.nn.Module, x: torch.Tensor, multiplier: float) -> torch.Tensor:
    """Each sample alone, through the adapter at the run-wide multiplier ``multiplier * s_b``."""
    rows = []
    for b, strength in enumerate(STRENGTHS):
        adapter.multiplier = multiplier * strength
        rows.append(base(x[b : b + 1]))
    adapter.multiplier = multiplier
    return torch.cat(rows)


@pytest.mark.parametrize("multiplier", [1.0, 0.8])
@pytest.mark.parametrize("case", sorted(_SPECS))
def test_per_sample_strengths_equal_separate_forwards(case, multiplier):
    adapter, x = _case(case)
    base = adapter.base
    _randomise(adapter, 7)
    adapter.multiplier = multiplier
    adapter.attach()
    try:
        plain = base(x)
        adapter.sample_strength = torch.tensor(STRENGTHS)
        got = base(x)
        adapter.sample_strength = None
        want = _separate(base, adapter, x, multiplier)
        assert torch.equal(base(x), plain)  # strengths gone: the usual forward again
    finally:
        adapter.detach()
    unadapted = base(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # the strengths did something: the -1 and 0.5 rows move the other way / half as far
    change = (plain - unadapted).abs().amax()
    assert change > 1e-3
    torch.testing.assert_close(got[1] - unadapted[1], -(plain[1] - unadapted[1]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[2] - unadapted[2], 0.5 * (plain[2] - unadapted[2]), rtol=1e-5, atol=1e-6)


def test_shared_down_lora_scales_each_member_per_sample():
    """SD3/Flux's fused q/k/v LoRA (one down shared by the members) gets the same per-sample rule."""
    torch.manual_seed(2)
    q, k = torch.nn.Linear(6, 4), torch.nn.Linear(6, 3)
    adapter = SharedDownLora("qkv", [("q", q), ("k", k)], 2, 1.0)
    _randomise(adapter, 3)
    x = torch.randn(len(STRENGTHS), 5, 6)
    adapter.attach()
    try:
        adapter.sample_strength = torch.tensor(STRENGTHS)
        got = (q(x), k(x))
        adapter.sample_strength = None
        want = []
        for layer in (q, k):
            rows = []
            for b, strength in enumerate(STRENGTHS):
                adapter.multiplier = strength
                rows.append(layer(x[b : b + 1]))
            adapter.multiplier = 1.0
            want.append(torch.cat(rows))
    finally:
        adapter.detach()
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got[0][0], got[0][1])


@pytest.mark.parametrize("case", ["lora", "loha", "dora"])
def test_per_sample_gradients_are_the_sum_of_the_separate_ones(case):
    """Training sees the same thing: the batch's gradient is the sum of each sample's gradient at its
    own multiplier."""
    adapter, x = _case(case)
    base = adapter.base
    _randomise(adapter, 11)
    weights = torch.randn(base(x).shape, generator=torch.Generator().manual_seed(4))
    adapter.attach()
    try:
        adapter.sample_strength = torch.tensor(STRENGTHS)
        (base(x) * weights).sum().backward()
        adapter.sample_strength = None
        together = {n: p.grad.clone() for n, p in adapter.named_parameters() if p.grad is not None}
        adapter.zero_grad()
        for b, strength in enumerate(STRENGTHS):
            adapter.multiplier = strength
            (base(x[b : b + 1]) * weights[b : b + 1]).sum().backward()
        adapter.multiplier = 1.0
        separate = {n: p.grad.clone() for n, p in adapter.named_parameters() if p.grad is not None}
    finally:
        adapter.detach()
    assert together.keys() == separate.keys() and together
    for name in together:
        torch.testing.assert_close(together[name], separate[name], rtol=1e-4, atol=1e-6)


def test_text_encoder_chunk_rows_repeat_each_strength():
    """The text encoders see a prompt's 77-token chunks as consecutive rows ([B, k, 77] reshaped):
    each strength covers its prompt's ``k`` rows; a row count that is no multiple is an error."""
    adapter, _ = _case("lora")
    base = adapter.base
    _randomise(adapter, 5)
    x = torch.randn(2 * len(STRENGTHS), 4, 12)
    adapter.attach()
    try:
        adapter.sample_strength = torch.tensor(STRENGTHS)
        got = base(x)
        adapter.sample_strength = None
        rows = []
        for b in range(x.shape[0]):
            adapter.multiplier = STRENGTHS[b // 2]
            rows.append(base(x[b : b + 1]))
        adapter.multiplier = 1.0
        adapter.sample_strength = torch.tensor(STRENGTHS)
        with pytest.raises(RuntimeError, match="3 per-sample strengths do not fit an input of 4 rows"):
            base(x[:4])
    finally:
        adapter.sample_strength = None
        adapter.detach()
    torch.testing.assert_close(got, torch.cat(rows), rtol=1e-5, atol=1e-6)


def test_network_context_sets_and_restores_every_module():
    modules = [_case("lora")[0], _case("loha")[0]]
    modules[0].lora_name, modules[1].lora_name = "a", "b"
    network = LoraNetwork(modules)
    outer, inner = torch.tensor([1.0, -1.0]), torch.tensor([0.5, 2.0])
    with network.sample_strengths(outer):
        assert all(m.sample_strength is outer for m in network)
        with network.sample_strengths(inner):
            assert all(m.sample_strength is inner for m in network)
        assert all(m.sample_strength is outer for m in network)
    assert all(m.sample_strength is None for m in network)


# --- a slider run: one dataset at +1, one at -1 -----------------------------------------------------


def _slider_data(root, first: float, second: float):
    """Two datasets of one image each, different pictures with the *same* caption (a slider's pair):
    only the strength tells the LoRA which one it is being shown."""
    from sdcore.testing.datasets import make_tiny_dataset

    for name, keep in (("a", 0), ("b", 1)):
        folder = make_tiny_dataset(root / name, n=2, size=64, concept=name) / f"1_{name}"
        (folder / f"{1 - keep:03d}.png").unlink()  # a keeps picture 0, b picture 1
        (folder / f"{1 - keep:03d}.txt").unlink()
        (folder / f"{keep:03d}.txt").write_text("sks", encoding="utf-8")
    config = root / "slider.toml"
    config.write_text(
        f"[[datasets]]\nnetwork_multiplier = {first}\n[[datasets.subsets]]\nimage_dir = 'a/1_a'\n"
        f"[[datasets]]\nnetwork_multiplier = {second}\n[[datasets.subsets]]\nimage_dir = 'b/1_b'\n",
        encoding="utf-8",
    )
    return config


def _train_slider(tmp_path, first: float, second: float, tag: str, **options):
    """Train a LoRA (both images in every batch of 2) and return its tensors and the file's metadata."""
    from sdcore.models.tiny import create_tiny_bundle
    from sdcore.testing.contract import contract_options
    from sdcore.train.loop import train
    from sdplugin_lora.format import read_lora
    from sdplugin_lora.method import LoraMethod

    config = _slider_data(tmp_path / tag, first, second)
    values = {"data": str(config), "rank": 4, "alpha": 4, "lr": 2e-2, "batch_size": 2, "max_steps": 6,
              "max_bucket_reso": 64, "seed": 7, **options}  # fmt: skip
    method = LoraMethod(contract_options(LoraMethod, tmp_path, values, tag=tag))
    result = train(method, bundle=create_tiny_bundle("sd1"))
    assert method.network is not None
    tensors = {k: v.detach().clone() for k, v in method.network.state_dict().items()}
    return tensors, read_lora(result.output).metadata


def test_one_step_is_the_signed_sum_of_each_datasets_step(tmp_path):
    """One plain-SGD step from the same start: the +1/-1 slider's update is a's update minus b's (each
    measured with the other image at strength 0, so the noise draws stay the same). Ignoring the
    strengths would give a's plus b's. The step's batch is one dataset's (a batch never mixes
    [[datasets]], as in kohya), so exactly one of the two single runs moved: the slider's step is that
    one's, with its dataset's sign (the sign itself: test_a_slider_run_mirrors_when_the_signs_swap)."""
    sgd = {"optimizer": "sgd", "lr": 0.5, "max_steps": 1, "max_grad_norm": 0.0}
    only_a, _ = _train_slider(tmp_path, 1.0, 0.0, "a", **sgd)
    only_b, _ = _train_slider(tmp_path, 0.0, 1.0, "b", **sgd)
    slider, _ = _train_slider(tmp_path, 1.0, -1.0, "slider", **sgd)
    ups = [key for key in slider if key.endswith("lora_up.weight")]
    assert len(ups) > 10
    moved_a = moved_b = 0
    for key in ups:  # up starts at zero, so each up is the step itself
        torch.testing.assert_close(slider[key], only_a[key] - only_b[key], rtol=1e-4, atol=1e-8)
        moved_a += int(only_a[key].abs().max() > 1e-6)
        moved_b += int(only_b[key].abs().max() > 1e-6)
    assert (moved_a > 5) != (moved_b > 5)  # one dataset's batch stepped: the other single run stayed at zero
    assert min(moved_a, moved_b) == 0
    for key in slider:  # the downs do not move on the first step (their gradient goes through up = 0)
        if key.endswith("lora_down.weight"):
            assert torch.equal(slider[key], only_a[key])


def test_a_slider_run_mirrors_when_the_signs_swap(tmp_path):
    """Adam, several steps: training a at +1 and b at -1 gives the exact negative (every ``lora_up``
    negated, ``lora_down`` equal: ``s · up · down``) of training a at -1 and b at +1, so the LoRA's
    effect on each image flips sign with its dataset's strength; both differ from a run at +1 only."""
    slider, meta = _train_slider(tmp_path, 1.0, -1.0, "slider")
    swapped, _ = _train_slider(tmp_path, -1.0, 1.0, "swapped")
    plain, plain_meta = _train_slider(tmp_path, 1.0, 1.0, "plain")
    ups = [key for key in slider if key.endswith("lora_up.weight")]
    for key in slider:
        want = -swapped[key] if key in ups else swapped[key]
        torch.testing.assert_close(slider[key], want, rtol=1e-5, atol=1e-7)
    assert max(float((slider[k] - plain[k]).abs().max()) for k in ups) > 1e-3
    assert max(float(slider[k].abs().max()) for k in ups) > 1e-3
    # (e) the file records each folder's strength (sdcore's key: kohya's ss_* metadata records none)
    import json

    assert json.loads(meta["sdcore_dataset_strengths"]) == {"1_a": 1.0, "1_b": -1.0}
    assert "sdcore_dataset_strengths" not in plain_meta
    assert json.loads(meta["ss_dataset_dirs"]) == json.loads(plain_meta["ss_dataset_dirs"])
    assert not [key for key in meta if key.startswith("ss_") and "multiplier" in key]


def test_gradient_checkpointing_recomputes_with_the_strengths(tmp_path):
    """Checkpointing recomputes the forward during the backward: the strengths must still be set there,
    so the slider's step is the same with and without it."""
    sgd = {"optimizer": "sgd", "lr": 0.5, "max_steps": 1, "max_grad_norm": 0.0}
    plain, _ = _train_slider(tmp_path, 1.0, -1.0, "plain", **sgd)
    checkpointed, _ = _train_slider(tmp_path, 1.0, -1.0, "checkpointed", gradient_checkpointing=True, **sgd)
    assert plain.keys() == checkpointed.keys()
    for key in plain:
        torch.testing.assert_close(checkpointed[key], plain[key], rtol=1e-4, atol=1e-8)


# --- whole denoisers: every module of the network, each family's activation layouts --------------------


def _row(inputs: dict, b: int) -> dict:
    """Sample ``b`` of batched inputs (Flux's position ids, shared by the batch, stay whole)."""
    out = {}
    for key, value in inputs.items():
        if isinstance(value, dict):  # SDXL's added_cond_kwargs
            out[key] = _row(value, b)
        elif key in ("img_ids", "txt_ids"):
            out[key] = value
        else:
            out[key] = value[b : b + 1]
    return out


@pytest.mark.parametrize("family", ["sd1", "sdxl", "flux", "sd3"])
def test_a_whole_network_per_sample_equals_separate_forwards(family):
    """The method's own context on a whole denoiser (UNet convs and attention; Flux/SD3 joint blocks,
    fused q/k/v and Flux's single blocks): each row is the forward at that row's multiplier."""
    from sdplugin_lora.method import LoraMethod, LoraOptions

    if family in ("flux", "sd3"):
        from test_shared_qkv import _inputs, _method

        method, bundle, _ = _method(family)
        model, inputs = bundle.transformer, _inputs(family, bundle.transformer)

        def run(given: dict) -> torch.Tensor:
            return model(**given, return_dict=False)[0]

    else:
        from lora_testutil import fresh_bundle, unet_inputs

        bundle = fresh_bundle(family)
        method = LoraMethod(LoraOptions(rank=2, conv_rank=2))
        method.prepare(bundle)
        latents, t, hidden, kwargs = unet_inputs(bundle, batch=2)
        model, inputs = bundle.unet, {"sample": latents, "timestep": t, "encoder_hidden_states": hidden, **kwargs}

        def run(given: dict) -> torch.Tensor:
            return model(**given).sample

    network = method.network
    assert network is not None and len(network) > 10
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for module in network:
            module.lora_up.weight.copy_(torch.randn(module.lora_up.weight.shape, generator=g) * 0.3)
    strengths = (-1.0, 0.5)
    with torch.no_grad():
        before = run(inputs)
        with method.network_strength(torch.tensor(strengths)):
            got = run(inputs)
        rows = []
        for b, strength in enumerate(strengths):
            for module in network:
                module.multiplier = strength
            rows.append(run(_row(inputs, b)))
        for module in network:
            module.multiplier = 1.0
        assert torch.equal(run(inputs), before)
    torch.testing.assert_close(got, torch.cat(rows), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, before, atol=1e-3)
