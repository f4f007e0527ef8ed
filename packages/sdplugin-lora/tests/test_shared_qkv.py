"""kohya's default LoRA on SD3's/Flux's fused q/k/v (and Flux's ``linear1``): one down shared by the
diffusers modules the fused Linear stacks (sd-scripts ``networks/lora_flux.py``, ``lora_sd3.py``:
``split_qkv`` is off by default; one ``LoRAModule`` on ``qkv``/``linear1`` with ``lora_down [r, in]``,
``lora_up [Σ rows, r]``, ``alpha``; ``split_qkv=True`` gives each part its own down).

The references are written here: a fused ``nn.Linear`` (q, k, v weights stacked) with kohya's LoRA
forward for the gradients, kohya's parameter count from the model's layer shapes, and diffusers'
``load_lora_weights`` + ``fuse_lora`` for the files.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_dit import (
    _DitBundle,
    _flux_pipeline,
    _sd3_pipeline,
    _tiny_encoders,
    _weights,
    fresh,
    kohya_flux_names,
    kohya_sd3_names,
)


def _method(family: str, *, encoders=(), **options):
    from sdplugin_lora.method import LoraMethod, LoraOptions

    bundle = _DitBundle(family, fresh(family), list(encoders))
    method = LoraMethod(LoraOptions(save_dtype="fp32", **{"rank": 2, "alpha": 1.5, **options}))
    groups = method.prepare(bundle)
    return method, bundle, groups


def _randomize(network, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in network:
            module.lora_up.weight.copy_(torch.randn(module.lora_up.weight.shape, generator=gen) * 0.3)


def _save(method, bundle, path):
    from sdcore.train.method import SaveInfo

    return method.save(bundle, SaveInfo(path=path, step=1, epoch=1, metadata={}, final=True))


def _deltas(network, index) -> dict[str, torch.Tensor]:
    """Every adapted transformer weight's change, by module path (members of shared-down modules
    by their rows of the fused change)."""
    from sdplugin_lora.adapters import SharedDownLora

    out: dict[str, torch.Tensor] = {}
    for module in network:
        if isinstance(module, SharedDownLora):
            out.update(module.member_deltas())
            continue
        target = index.targets[module.lora_name]
        if target.component == index.denoiser:
            out[target.path] = module.delta_weight()
    return out


def _inputs(family: str, model, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    c = model.config
    context = torch.randn(2, 5, c.joint_attention_dim, generator=gen)
    pooled = torch.randn(2, c.pooled_projection_dim, generator=gen)
    t = torch.tensor([0.3, 0.7])
    if family == "sd3":
        x = torch.randn(2, c.in_channels, 8, 8, generator=gen)
        return dict(hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled, timestep=t)
    x = torch.randn(2, 16, c.in_channels, generator=gen)
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1)
    return dict(
        hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled, timestep=t,
        img_ids=img_ids.reshape(16, 3), txt_ids=torch.zeros(5, 3), guidance=torch.tensor([3.5, 3.5]),
    )  # fmt: skip


def _forward(family: str, model, seed: int = 0) -> torch.Tensor:
    with torch.no_grad():
        return model(**_inputs(family, model, seed), return_dict=False)[0]


def _kohya_fused_count(family: str, model, rank: int) -> int:
    """kohya's trainable parameters with split_qkv off: one LoRA (rank x (in + out)) per Linear of
    BFL's DoubleStreamBlock/SingleStreamBlock or SAI's SingleDiTBlock, where q/k/v (and Flux's MLP
    input) are one Linear of out = the sum of their rows; written from the diffusers layers here."""

    def lin(layer) -> tuple[int, int]:
        return layer.in_features, layer.out_features

    def lora(pairs) -> int:  # one Linear made of the given diffusers layers' rows
        ins = {i for i, _ in pairs}
        assert len(ins) == 1
        return rank * (ins.pop() + sum(o for _, o in pairs))

    total = 0
    for block in model.transformer_blocks:
        a = block.attn
        streams = [([a.to_q, a.to_k, a.to_v], a.to_out[0], block.ff, block.norm1.linear)]
        if a.add_q_proj is not None:
            streams.append(([a.add_q_proj, a.add_k_proj, a.add_v_proj], a.to_add_out, block.ff_context,
                            block.norm1_context.linear))  # fmt: skip
        if getattr(block, "attn2", None) is not None:
            a2 = block.attn2
            total += lora([lin(a2.to_q), lin(a2.to_k), lin(a2.to_v)]) + lora([lin(a2.to_out[0])])
        for qkv, proj, ff, mod in streams:
            total += lora([lin(x) for x in qkv])
            total += 0 if proj is None else lora([lin(proj)])
            total += 0 if ff is None else lora([lin(ff.net[0].proj)]) + lora([lin(ff.net[2])])
            total += lora([lin(mod)])
    for block in getattr(model, "single_transformer_blocks", ()):
        a = block.attn
        total += lora([lin(a.to_q), lin(a.to_k), lin(a.to_v), lin(block.proj_mlp)])
        total += lora([lin(block.proj_out)]) + lora([lin(block.norm.linear)])
    return total


# --- the network ------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_default_is_one_shared_down_per_fused_linear_with_kohyas_parameter_count(family):
    from sdplugin_lora.adapters import SharedDownLora

    method, bundle, groups = _method(family, rank=3)
    shared = {name: m for name, m in method.network.loras.items() if isinstance(m, SharedDownLora)}
    if family == "flux":  # img/txt qkv of 2 double blocks, linear1 of 2 single blocks
        assert set(shared) == {
            f"lora_unet_double_blocks_{i}_{s}_attn_qkv" for i in range(2) for s in ("img", "txt")
        } | {f"lora_unet_single_blocks_{i}_linear1" for i in range(2)}
        assert shared["lora_unet_single_blocks_0_linear1"].lora_up.weight.shape == (16 * 3 + 64, 3)
    else:  # x/context qkv of 3 joint blocks (the last context block is pre-only: qkv only), attn2 of 0 and 1
        assert set(shared) == {f"lora_unet_joint_blocks_{i}_{b}_qkv" for i in range(3) for b in
                               ("x_block_attn", "context_block_attn")} | {
            f"lora_unet_joint_blocks_{i}_x_block_attn2_qkv" for i in (0, 1)
        }  # fmt: skip
    for module in shared.values():
        assert module.lora_down.weight.shape == (3, 16) and module.rank == 3
        assert float(module.lora_up.weight.detach().abs().max()) == 0  # kohya's init: up zeros, down kaiming-uniform
        bound = 1 / math.sqrt(16)  # kaiming_uniform_(a=sqrt(5)) on fan_in 16
        assert 0.5 * bound < float(module.lora_down.weight.detach().abs().max()) <= bound
    trainable = {id(p): p.numel() for g in groups for p in g["params"]}
    assert sum(trainable.values()) == _kohya_fused_count(family, bundle.transformer, 3)
    assert sum(p.numel() for p in method.network.parameters()) == sum(trainable.values())  # no duplicates

    split, _, split_groups = _method(family, rank=3, split_qkv=True)
    assert not any(isinstance(m, SharedDownLora) for m in split.network)
    assert "lora_transformer_transformer_blocks_0_attn_to_q" in split.network.loras
    more = sum(p.numel() for g in split_groups for p in g["params"])
    extra = sum((len(m.paths) - 1) * m.lora_down.weight.numel() for m in shared.values())
    assert more - sum(trainable.values()) == extra  # q, k, v (, mlp) each with its own down


def test_memory_plan_counts_the_shared_down_once():
    from sdcore.train.memory import count_parameters

    _, bundle, groups = _method("flux", rank=4)
    bundle.denoiser = bundle.transformer
    plan = count_parameters(bundle, groups, whole_model_result=False)
    assert plan.added == plan.trainable == _kohya_fused_count("flux", bundle.transformer, 4)


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_hooked_shared_down_equals_the_saved_kohya_file_applied(family, tmp_path):
    from sdplugin_lora.apply import apply_lora
    from sdplugin_lora.format import read_lora

    method, bundle, _ = _method(family, rank=2, alpha=3.0)
    _randomize(method.network)
    method.network.eval()
    hooked = _forward(family, bundle.transformer)
    method.network.remove()
    plain = _forward(family, bundle.transformer)
    path = _save(method, bundle, tmp_path / f"{family}.safetensors")

    lora = read_lora(path)
    names = kohya_flux_names(2, 2) if family == "flux" else kohya_sd3_names(3, (0, 1))
    assert {k for k in lora.modules if k.startswith("lora_unet_")} == names
    qkv = "lora_unet_double_blocks_1_img_attn_qkv" if family == "flux" else "lora_unet_joint_blocks_1_x_block_attn_qkv"
    fused = lora.modules[qkv]
    assert fused.down.shape == (2, 16) and fused.up.shape == (48, 2) and fused.alpha == 3.0  # rank r, not 3r
    module = method.network.loras[qkv]
    torch.testing.assert_close(fused.up, module.lora_up.weight, atol=0, rtol=0)
    torch.testing.assert_close(fused.down, module.lora_down.weight, atol=0, rtol=0)

    for merge in (False, True):
        model = fresh(family)
        apply_lora(_DitBundle(family, model, []), path, 1.0, merge=merge, strict=True)
        error = (_forward(family, model) - hooked).abs().max().item()
        assert error <= 1e-6, (merge, error)
    assert (hooked - plain).abs().max().item() > 1e-3  # the LoRA changes the output


def test_shared_down_gradient_is_the_sum_over_members_as_on_a_fused_linear():
    """q, k, v hooked with one shared down = kohya's LoRA on one fused Linear (weights, bias and LoRA
    written here): same outputs, same gradients of down and up, rank dropout drawn once."""
    from sdplugin_lora.adapters import SharedDownLora

    torch.manual_seed(0)  # the LoRA's init and up weights: the same numbers on every run (the sums below are float32)
    attn = fresh("flux").transformer_blocks[0].attn
    layers = [attn.to_q, attn.to_k, attn.to_v]
    fused = torch.nn.Linear(16, 48)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([x.weight for x in layers]))
        fused.bias.copy_(torch.cat([x.bias for x in layers]))
    shared = SharedDownLora("qkv", [(f"p{i}", x) for i, x in enumerate(layers)], 4, 2.0, rank_dropout=0.5)
    with torch.no_grad():
        shared.lora_up.weight.normal_()
    down = shared.lora_down.weight.detach().clone().requires_grad_(True)
    up = shared.lora_up.weight.detach().clone().requires_grad_(True)
    x = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(1))
    weights = torch.randn(48, generator=torch.Generator().manual_seed(2))

    def kohya_fused(training: bool) -> torch.Tensor:  # kohya LoRAModule.forward on the fused Linear
        lx = x @ down.T
        scale = 2.0 / 4
        if training:
            mask = torch.rand((lx.size(0), 4)) > 0.5
            lx = lx * mask.unsqueeze(1)
            scale = scale / (1 - 0.5)
        return fused(x) + (lx @ up.T) * scale

    calls = []
    shared.lora_down.register_forward_hook(lambda *a: calls.append(1))
    shared.attach()
    for training in (False, True):
        shared.train(training)
        for p in (down, up, *shared.parameters()):
            p.grad = None
        torch.manual_seed(5)
        want = kohya_fused(training)
        (want * weights).sum().backward()
        torch.manual_seed(5)
        calls.clear()
        got = torch.cat([layer(x) for layer in layers], dim=-1)
        assert len(calls) == 1  # one down for the three members (the same input tensor)
        (got * weights).sum().backward()
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
        # the fused Linear sums over 48 outputs in one matmul, the members over 16 each: float32 rounding differs
        torch.testing.assert_close(shared.lora_down.weight.grad, down.grad, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(shared.lora_up.weight.grad, up.grad, atol=1e-5, rtol=1e-5)
    # the down's gradient is the sum of what each member alone gives it
    shared.train(False)
    down.grad = None
    (kohya_fused(False) * weights).sum().backward()
    total = torch.zeros_like(down)
    for i, layer in enumerate(layers):
        shared.lora_down.weight.grad = None
        (layer(x) * weights[16 * i : 16 * (i + 1)]).sum().backward()
        total += shared.lora_down.weight.grad
    torch.testing.assert_close(total, down.grad, atol=1e-5, rtol=1e-5)  # summation order differs
    with torch.inference_mode():  # sampling: inputs that keep no version counter
        inference_x = x.clone()
        calls.clear()
        got = torch.cat([layer(inference_x) for layer in layers], dim=-1)
        assert len(calls) == 1
    torch.testing.assert_close(got, kohya_fused(False).detach(), atol=1e-6, rtol=0)
    shared.detach()
    torch.testing.assert_close(attn.to_q(x), x @ attn.to_q.weight.T + attn.to_q.bias)


def test_module_dropout_skips_the_whole_group_together():
    from sdplugin_lora.adapters import SharedDownLora

    torch.manual_seed(0)  # the LoRA's init and up weights: the same numbers on every run (the sums below are float32)
    attn = fresh("flux").transformer_blocks[0].attn
    layers = [attn.to_q, attn.to_k, attn.to_v]
    shared = SharedDownLora("qkv", [(str(i), x) for i, x in enumerate(layers)], 2, 1.0, module_dropout=0.5)
    with torch.no_grad():
        shared.lora_up.weight.normal_()
    x = torch.randn(3, 16)
    with torch.no_grad():
        plain = [layer(x) for layer in layers]
        shared.attach()
        outcomes = set()
        for seed in range(12):
            torch.manual_seed(seed)
            changed = tuple(bool((layer(x) - p).abs().max() > 0) for layer, p in zip(layers, plain, strict=True))
            outcomes.add(changed)
    assert outcomes == {(True, True, True), (False, False, False)}


# --- files: diffusers, resume, split_qkv -------------------------------------------------------------


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_diffusers_fuses_our_shared_down_files_as_our_merged_weights(family, tmp_path):
    from safetensors.torch import load_file, save_file
    from sdplugin_lora.format import read_lora

    method, bundle, _ = _method(family, rank=2, alpha=1.0, key_layout="diffusers")
    _randomize(method.network, seed=3)
    method.network.remove()
    path = _save(method, bundle, tmp_path / "peft.safetensors")
    saved = read_lora(path)
    q, k = (saved.modules[f"transformer.transformer_blocks.0.attn.to_{x}"] for x in "qk")
    torch.testing.assert_close(q.down, k.down, atol=0, rtol=0)  # every member's lora_A is the shared down
    assert json.loads(saved.metadata["lora_adapter_metadata"])["transformer.r"] == 2
    deltas = _deltas(method.network, method.index)

    files = [path]
    if family == "flux":  # our kohya file too (double blocks: diffusers splits linear1 at Flux's 3072 width)
        method.options.key_layout = "kohya"
        kohya = load_file(str(_save(method, bundle, tmp_path / "kohya.safetensors")))
        save_file({k: v for k, v in kohya.items() if "single_blocks" not in k}, str(tmp_path / "k.safetensors"))
        files.append(tmp_path / "k.safetensors")
    for file in files:
        model = fresh(family)
        before = _weights(model)
        pipe = _flux_pipeline(model) if family == "flux" else _sd3_pipeline(model)
        pipe.load_lora_weights(str(file))
        pipe.fuse_lora(lora_scale=0.7)
        after = _weights(model)
        checked = 0
        for path_, delta in deltas.items():
            if file != path and "single_transformer_blocks" in path_:
                continue
            error = (after[path_ + ".weight"] - before[path_ + ".weight"] - 0.7 * delta).abs().max().item()
            assert error <= 1e-5, (file.name, path_, error)
            checked += 1
        assert checked >= 20


def test_resume_and_warm_start_from_shared_down_files(tmp_path):
    from sdcore.errors import NetworkMismatchError
    from sdplugin_lora.adapters import SharedDownLora

    clip_l, _, t5 = _tiny_encoders()
    encoders = [("text_encoder", clip_l), ("text_encoder_2", t5)]
    method, bundle, _ = _method("flux", encoders=encoders, train_text_encoder=True)
    _randomize(method.network, seed=4)
    want = _deltas(method.network, method.index)
    # resume (the runtime's checkpoint): the network's own state dict
    resumed, _, _ = _method("flux", encoders=encoders, train_text_encoder=True)
    resumed.load_trainable_state_dict(method.trainable_state_dict())
    for key, value in method.network.state_dict().items():
        torch.testing.assert_close(resumed.network.state_dict()[key], value, atol=0, rtol=0)

    kohya = _save(method, bundle, tmp_path / "kohya.safetensors")
    method.options.key_layout = "diffusers"
    peft = _save(method, bundle, tmp_path / "peft.safetensors")
    for file in (kohya, peft):  # --network-weights: the fused module as saved, or rebuilt from its members
        warm, _, _ = _method("flux", encoders=encoders, train_text_encoder=True, network_weights=str(file))
        got = _deltas(warm.network, warm.index)
        assert set(got) == set(want)
        for path, delta in want.items():
            torch.testing.assert_close(got[path], delta, atol=1e-7, rtol=0, msg=f"{file.name} {path}")
        assert all(isinstance(warm.network.loras[n], SharedDownLora) for n in ("lora_unet_single_blocks_1_linear1",))
    # split_qkv continues from a shared-down file (each part: the shared down and its rows)
    split, _, _ = _method(
        "flux", encoders=encoders, train_text_encoder=True, split_qkv=True, network_weights=str(kohya)
    )
    got = _deltas(split.network, split.index)
    for path, delta in want.items():
        torch.testing.assert_close(got[path], delta, atol=1e-7, rtol=0)
    # a split_qkv file (rank 2 x 3 in the fused module) does not fit a shared rank-2 down
    split.options.key_layout = "kohya"
    split_file = _save(split, _DitBundle("flux", fresh("flux"), []), tmp_path / "split.safetensors")
    with pytest.raises(NetworkMismatchError, match="split_qkv"):
        _method("flux", network_weights=str(split_file))


def test_split_qkv_keeps_separate_downs_saved_fused_and_says_so(tmp_path):
    from sdplugin_lora.format import read_lora

    method, bundle, _ = _method("sd3", split_qkv=True)
    _randomize(method.network, seed=6)
    lora = read_lora(_save(method, bundle, tmp_path / "split.safetensors"))
    fused = lora.modules["lora_unet_joint_blocks_0_x_block_attn_qkv"]
    assert fused.down.shape == (6, 16) and fused.scale == pytest.approx(1.5 / 2)  # rank 3r, alpha/rank kept
    assert json.loads(lora.metadata["ss_network_args"])["split_qkv"] == "True"
    shared, bundle, _ = _method("sd3")
    lora = read_lora(_save(shared, bundle, tmp_path / "shared.safetensors"))
    assert "split_qkv" not in lora.metadata["ss_network_args"]  # kohya writes "None" without network args


def test_kohya_network_args_split_qkv():
    from sdcore.errors import ConfigError
    from sdcore.train.config import load_options
    from sdplugin_lora.method import LoraMethod, LoraOptions

    for value, want in (("True", True), ("False", False)):
        kohya = {"network_module": "networks.lora_flux", "network_args": [f"split_qkv={value}"]}
        assert load_options(LoraOptions, None, kohya=kohya, notes=[]).split_qkv is want
    assert LoraOptions().split_qkv is False  # kohya's default: shared down
    from lora_testutil import fresh_bundle

    with pytest.raises(ConfigError, match="SD3/Flux only"):
        LoraMethod(LoraOptions(rank=2, split_qkv=True)).prepare(fresh_bundle("sd1"))


def test_members_reading_inputs_of_different_widths_are_refused():
    """A fused Linear's members read one input: the shared-down LoRA and a fused LoHa/LoKr both refuse members
    of different input widths, naming the widths, and take the one width when they agree."""
    from sdplugin_lora.adapters import SharedDownLora, fused_adapter
    from torch import nn

    odd = [("q", nn.Linear(8, 4)), ("k", nn.Linear(6, 4))]
    with pytest.raises(ValueError, match=r"^qkv: members read inputs of different widths \[6, 8\]$"):
        SharedDownLora("qkv", odd, 2)
    with pytest.raises(ValueError, match=r"^qkv: members read inputs of different widths \[6, 8\]$"):
        fused_adapter("lokr", "qkv", [(path, layer, False) for path, layer in odd], 2, None)
    even = [("q", nn.Linear(8, 4)), ("k", nn.Linear(8, 6))]
    assert SharedDownLora("qkv", even, 2).lora_down.weight.shape == (2, 8)
    fused = fused_adapter("loha", "qkv", [(path, layer, False) for path, layer in even], 2, None)
    assert fused.base.weight.shape == (10, 8)
