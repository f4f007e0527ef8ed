"""BFL's FLUX.1 Depth/Canny control LoRAs (``flux1-depth-dev-lora.safetensors``, ``flux1-canny-dev-lora``) on dev.

Their layout, as diffusers reads it (``_convert_bfl_flux_control_lora_to_diffusers`` in
diffusers/loaders/lora_conversion_utils.py) and BFL writes it (flux/modules/lora.py ``LinearLora``): every Linear of
BFL's model names ``<module>.lora_A.weight`` [rank, in] and ``<module>.lora_B.weight`` [out, rank] with a
``lora_B.bias``, no alpha (PEFT's scale 1: the tag's weight is the whole multiplier); ``img_in``'s ``lora_A`` takes
128 inputs where dev's ``img_in`` takes 64; each attention RMSNorm scale is a full tensor
(``double_blocks.<i>.img_attn.norm.query_norm.scale``). diffusers' ``load_lora_weights`` widens ``x_embedder`` with
zero columns and sets ``in_channels`` (``_maybe_expand_transformer_param_shape_or_error_``), loads the LoRA through
PEFT (``lora_bias``) and replaces the norm weights with the file's; the call then runs on ``FluxControlPipeline``.

diffusers' converter hard-codes FLUX.1's 19 + 38 blocks and 3072 width, so the tiny comparison hands
``load_lora_weights`` the converted dict itself (shared ``lora_A`` of a fused ``qkv``/``linear1``, its ``lora_B`` rows
and bias rows per part, the final layer's shift/scale halves swapped), built here from sdcore's Flux key plan; the
converter itself is checked on a meta-device model of the real shape.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from PIL import Image  # noqa: E402

NAME = "flux1-canny-dev-lora"


def _control_lora(transformer, *, width: int = 128, rank: int = 2, seed: int = 0):
    """A BFL control LoRA for ``transformer`` (every Linear's lora_A/lora_B/lora_B.bias, ``img_in`` ``width`` wide,
    every attention norm's scale) and the same tensors under diffusers' names, as its converter writes them."""
    from sdcore.models.flux.convert import key_plan

    config = transformer.config
    state = transformer.state_dict()
    generator = torch.Generator().manual_seed(seed)

    def draw(*shape: int, scale: float = 0.2) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * scale

    bfl: dict[str, torch.Tensor] = {}
    converted: dict[str, torch.Tensor] = {}
    for group in key_plan(config.num_layers, config.num_single_layers, config.guidance_embeds):
        if group.bfl.endswith(".scale"):
            scale = 1.0 + draw(*state[group.diffusers[0]].shape)
            bfl[group.bfl] = scale
            converted[f"transformer.{group.diffusers[0]}"] = scale
            continue
        if not group.bfl.endswith(".weight"):
            continue
        module = group.bfl.removesuffix(".weight")
        rows = [state[name].shape[0] for name in group.diffusers]
        fan_in = width if module == "img_in" else state[group.diffusers[0]].shape[1]
        down, up, bias = draw(rank, fan_in), draw(sum(rows), rank), draw(sum(rows))
        bfl.update({f"{module}.lora_A.weight": down, f"{module}.lora_B.weight": up, f"{module}.lora_B.bias": bias})
        if group.op == "swap":  # BFL's (shift, scale) rows are diffusers' (scale, shift)
            up, bias = torch.cat(up.chunk(2)[::-1]), torch.cat(bias.chunk(2)[::-1])
        for name, part_up, part_bias in zip(group.diffusers, up.split(rows), bias.split(rows), strict=True):
            part = name.removesuffix(".weight")
            converted[f"transformer.{part}.lora_A.weight"] = down
            converted[f"transformer.{part}.lora_B.weight"] = part_up.contiguous()
            converted[f"transformer.{part}.lora_B.bias"] = part_bias.contiguous()
    return bfl, converted


def _save(tensors, path):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def _picture(side: int = 32) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)).resize((side, side))


def _session(folder, **options):
    from sdcore.generate.session import NetworkSession
    from sdplugin_lora.apply import LoraHandler

    handler = LoraHandler(folder)
    handler.options = dict(options)
    return NetworkSession({"lora": handler})


def _snapshot(bundle):
    transformer = bundle.transformer
    return (
        {k: v.clone() for k, v in transformer.state_dict().items()},
        {name: id(p) for name, p in transformer.named_parameters()},
        transformer.x_embedder,
        dict(transformer.config),
        transformer.config.in_channels,
    )


def _same(bundle, snapshot) -> None:
    state, ids, module, config, in_channels = snapshot
    transformer = bundle.transformer
    after = transformer.state_dict()
    assert after.keys() == state.keys()
    assert all(torch.equal(after[k], v) and after[k].dtype == v.dtype for k, v in state.items())
    assert {name: id(p) for name, p in transformer.named_parameters()} == ids
    assert transformer.x_embedder is module and transformer.config.in_channels == in_channels == 64
    assert dict(transformer.config) == config
    assert not hasattr(transformer, "_sdcore_widened_by")


def _diffusers_control(converted, multiplier):
    """diffusers' FluxControlPipeline on a fresh tiny dev with the LoRA loaded by ``load_lora_weights``."""
    import diffusers
    from sdcore.models.load import load_model

    b = load_model("tiny:flux")
    pipe = diffusers.FluxControlPipeline(
        scheduler=type(b.noise_scheduler).from_config(b.noise_scheduler.config), vae=b.vae,
        text_encoder=b.text_encoders[0], tokenizer=b.tokenizers[0], text_encoder_2=b.text_encoders[1],
        tokenizer_2=b.tokenizers[1], transformer=b.transformer,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(dict(converted), adapter_name="control")
    pipe.set_adapters(["control"], [multiplier])
    assert pipe.transformer.config.in_channels == 128  # diffusers widened it
    return pipe


def _control_inputs(transformer) -> dict:
    """One seeded forward's inputs for a widened (128-channel) FLUX.1 transformer: 4 image and 8 text tokens."""
    generator = torch.Generator().manual_seed(3)
    config = transformer.config
    return {
        "hidden_states": torch.randn(1, 4, 128, generator=generator),
        "encoder_hidden_states": torch.randn(1, 8, config.joint_attention_dim, generator=generator),
        "pooled_projections": torch.randn(1, config.pooled_projection_dim, generator=generator),
        "timestep": torch.tensor([0.5]),
        "guidance": torch.tensor([30.0]),
        "img_ids": torch.zeros(4, 3),
        "txt_ids": torch.zeros(8, 3),
    }


@pytest.mark.parametrize("mode", ["merge", "hooks"])
def test_generation_is_diffusers_control_pipeline_with_load_lora_weights(tmp_path, mode):
    """``<lora:flux1-canny-dev-lora:0.85>`` on dev with a control image: the latents of sdcore's call equal
    diffusers' FluxControlPipeline after ``load_lora_weights`` + ``set_adapters(0.85)`` on the same tiny modules and
    seed (the LoRA merged, or hooked with ``-O lora_mode=hooks``); the whole ``generate_images`` call gives its
    pixels; the bundle is bit for bit what it was afterwards."""
    from sdcore.generate.pipeline import generate_images
    from sdcore.models.flux.generate import build_flux_pipeline, run_flux
    from sdcore.models.load import load_model

    dev = load_model("tiny:flux")
    bfl, converted = _control_lora(dev.transformer)
    _save(bfl, tmp_path / f"{NAME}.safetensors")
    session = _session(tmp_path, lora_mode=mode)
    control, prompt = _picture(), f"<lora:{NAME}:0.85>a cat"
    before = _snapshot(dev)
    settings = {"steps": 2, "cfg": 30.0, "width": 32, "height": 32}
    with session.apply(dev, prompt) as applied, torch.no_grad():
        assert dev.transformer.config.in_channels == 128 and applied.prompt == "a cat"
        pipe = build_flux_pipeline(dev, control=True)
        ours = run_flux(pipe, dev, [applied.prompt], [""], seeds=[5], control=control, output_type="latent",
                        **settings)  # fmt: skip
    _same(dev, before)
    theirs_pipe = _diffusers_control(converted, 0.85)
    with torch.no_grad():
        packed = theirs_pipe(prompt="a cat", control_image=control, num_inference_steps=2, guidance_scale=30.0,
                             width=32, height=32, generator=torch.Generator().manual_seed(5),
                             output_type="latent").images  # fmt: skip
    theirs = theirs_pipe._unpack_latents(packed, 32, 32, theirs_pipe.vae_scale_factor)
    assert ours.shape == theirs.shape == (1, 16, 4, 4)
    assert torch.allclose(ours.float(), theirs.float(), atol=1e-5, rtol=0)

    images = generate_images(dev, [prompt], seed=5, control_image=control, networks=session, **settings)
    with torch.no_grad():
        pixels = theirs_pipe(prompt="a cat", control_image=control, num_inference_steps=2, guidance_scale=30.0,
                             width=32, height=32, generator=torch.Generator().manual_seed(5)).images[0]  # fmt: skip
    diff = np.abs(np.asarray(images[0], dtype=np.int16) - np.asarray(pixels, dtype=np.int16))
    assert diff.max() <= 1
    _same(dev, before)


def test_the_lora_parts_apply_as_diffusers_applies_them(tmp_path):
    """One forward of the transformer with the LoRA applied (merged) equals diffusers' PEFT-loaded transformer on
    the same 128-wide input: the widened img_in, every lora_B bias (scaled by the multiplier) and the replaced
    norm scales (not scaled) all count; dropping the biases or the norms from the file changes the output."""
    from sdcore.models.load import load_model
    from sdplugin_lora.apply import apply_lora

    dev = load_model("tiny:flux")
    bfl, converted = _control_lora(dev.transformer, seed=1)
    theirs = _diffusers_control(converted, 0.5).transformer
    inputs = _control_inputs(dev.transformer)

    def forward(model):
        with torch.no_grad():
            return model(**inputs, return_dict=False)[0]

    expected = forward(theirs)
    outputs = {}
    for label, drop in (("all", None), ("no bias", ".lora_B.bias"), ("no norms", ".scale")):
        kept = {k: v for k, v in bfl.items() if drop is None or not k.endswith(drop)}
        path = _save(kept, tmp_path / f"{label}.safetensors")
        applied = apply_lora(dev, path, 0.5, merge=True, widen=True)
        outputs[label] = forward(dev.transformer)
        applied.remove()
    assert torch.allclose(outputs["all"], expected, atol=1e-5, rtol=0)
    assert (outputs["no bias"] - expected).abs().max() > 1e-3
    assert (outputs["no norms"] - expected).abs().max() > 1e-3


def test_the_widening_is_diffusers(tmp_path):
    """While applied: a new img_in 128 wide whose first 64 columns are dev's weight plus the LoRA's change and whose
    last 64 are the LoRA's change alone (diffusers' zero columns), dev's bias plus the lora_B bias; the refusals
    name the file."""
    from sdcore.models.load import load_model
    from sdplugin_lora.apply import apply_lora

    dev = load_model("tiny:flux")
    bfl, _ = _control_lora(dev.transformer)
    path = _save(bfl, tmp_path / f"{NAME}.safetensors")
    old = dev.transformer.x_embedder
    applied = apply_lora(dev, path, 0.85, merge=True, widen=True)
    new = dev.transformer.x_embedder
    change = 0.85 * (bfl["img_in.lora_B.weight"] @ bfl["img_in.lora_A.weight"])
    assert new is not old and tuple(new.weight.shape) == (old.weight.shape[0], 128)
    assert torch.allclose(new.weight[:, :64], old.weight + change[:, :64], atol=1e-6)
    assert torch.allclose(new.weight[:, 64:], change[:, 64:], atol=1e-6)
    assert torch.allclose(new.bias, old.bias + 0.85 * bfl["img_in.lora_B.bias"], atol=1e-6)
    norm = dev.transformer.transformer_blocks[0].attn.norm_added_k.weight
    assert torch.equal(norm, bfl["double_blocks.0.txt_attn.norm.key_norm.scale"])  # set, not scaled
    applied.remove()
    assert dev.transformer.x_embedder is old and dev.transformer.config.in_channels == 64


def test_diffusers_converter_reads_the_file_as_sdcore_does():
    """diffusers' own converter on a rank-1 file of the real FLUX.1 shape (a meta-device transformer: no memory)
    gives every diffusers module the lora_A, lora_B and bias sdcore splits out of the BFL file, and the norm scales
    the same norms; except the final layer's lora_A, whose rank rows the converter swaps with the shift/scale halves
    (``swap_scale_shift`` on lora_A too): that changes ``B @ A``, so sdcore keeps BFL's maths (the change of
    ``final_layer.adaLN_modulation.1`` with its rows swapped, as ComfyUI applies it on BFL's model)."""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.lora_conversion_utils import _convert_bfl_flux_control_lora_to_diffusers
    from sdplugin_lora.format import match_modules, parse_state_dict
    from sdplugin_lora.naming import ModuleIndex

    with torch.device("meta"):
        full = FluxTransformer2DModel(in_channels=128, out_channels=64, guidance_embeds=True)
    bfl, _ = _control_lora(full, rank=2)
    # the meta draws: real tensors of the same shapes
    generator = torch.Generator().manual_seed(0)
    bfl = {k: torch.randn(v.shape, generator=generator) for k, v in bfl.items()}
    theirs = _convert_bfl_flux_control_lora_to_diffusers(dict(bfl))
    match = match_modules(parse_state_dict(bfl), ModuleIndex.build_dit("flux", full, []))
    assert not match.unmatched and len(match.scales) == sum(k.endswith(".scale") for k in bfl)
    for target, scale in match.scales.values():
        assert torch.equal(theirs[f"transformer.{target.path}.weight"], scale)
    assert {f"transformer.{t.path}.lora_A.weight" for t, _ in match.modules.values()} == {
        k for k in theirs if k.endswith("lora_A.weight")
    }
    for target, weights in match.modules.values():
        key = f"transformer.{target.path}"
        assert torch.equal(theirs[f"{key}.lora_B.weight"], weights.up)
        assert torch.equal(theirs[f"{key}.lora_B.bias"], weights.tensors["lora_up.bias"])
        down = theirs[f"{key}.lora_A.weight"]
        if target.path == "norm_out.linear":
            assert torch.equal(torch.cat(down.chunk(2)[::-1]), weights.down)  # the converter's swapped rank rows
        else:
            assert torch.equal(down, weights.down)


# --------------------------------------------------------------------------------------------------- refusals


def test_without_a_control_image_it_is_one_line_before_the_model_loads(tmp_path):
    from click.testing import CliRunner
    from sdcore.cli import build_cli
    from sdcore.models.load import load_model
    from sdcore.plugins import get_plugin_manager

    loras = tmp_path / "loras"
    loras.mkdir()
    _save(_control_lora(load_model("tiny:flux").transformer)[0], loras / f"{NAME}.safetensors")
    result = CliRunner().invoke(
        build_cli(get_plugin_manager()),
        ["generate", f"a cat <lora:{NAME}:0.85>", "-m", str(tmp_path / "missing-model.safetensors"), "--steps", "1",
         "--size", "32x32", "--lora-dir", str(loras), "-o", str(tmp_path / "o.png")],
    )  # fmt: skip
    assert result.exit_code == 2 and not (tmp_path / "o.png").exists()
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert f"{NAME}.safetensors: a FLUX.1 Depth/Canny control LoRA" in lines[0]
    assert "it needs a control image" in lines[0] and "add --control-image" in lines[0]


def test_refusals_after_load(tmp_path):
    """Through the Python API (no header check first): dev with the LoRA and no control image is refused naming the
    file, and the bundle is restored; a control image on dev without it is refused as before; applying the file
    anywhere that does not widen (training's --network-weights/--base-weights, merges) is one line."""
    from sdcore.errors import ConfigError, NetworkMismatchError
    from sdcore.generate.pipeline import generate_images
    from sdcore.models.load import load_model
    from sdplugin_lora.apply import apply_lora

    dev = load_model("tiny:flux")
    path = _save(_control_lora(dev.transformer)[0], tmp_path / f"{NAME}.safetensors")
    before = _snapshot(dev)
    with pytest.raises(ConfigError) as caught:
        generate_images(dev, [f"<lora:{NAME}>a cat"], steps=1, width=32, height=32, networks=_session(tmp_path))
    (line,) = str(caught.value).splitlines()
    assert f"tiny:flux with {NAME}.safetensors is FLUX.1 Depth or Canny [dev]" in line
    assert "it needs a control image" in line
    _same(dev, before)
    with pytest.raises(ConfigError, match=r"tiny:flux is FLUX.1 dev, not FLUX.1 Depth or Canny \[dev\]"):
        generate_images(dev, ["a cat"], steps=1, control_image=_picture(), networks=_session(tmp_path))
    for merge in (True, False):
        with pytest.raises(NetworkMismatchError) as caught:
            apply_lora(dev, path, 0.85, merge=merge)
        (line,) = str(caught.value).splitlines()
        assert NAME in line and "FLUX.1 Depth/Canny control LoRA" in line
        assert "widens img_in from 64 to 128 inputs" in line and "not in training or merges" in line
    _same(dev, before)


def test_the_same_layout_without_the_wider_img_in_applies_whole(tmp_path):
    """A 64-wide file in BFL's layout is an ordinary LoRA: no widening, no warning (its lora_B biases and norm
    scales apply, as diffusers applies them), and removing it restores everything."""
    import warnings

    from sdcore.models.load import load_model
    from sdplugin_lora.apply import apply_lora
    from sdplugin_lora.format import control_lora_problem, file_input_width, read_lora

    dev = load_model("tiny:flux")
    path = _save(_control_lora(dev.transformer, width=64)[0], tmp_path / "plain.safetensors")
    assert control_lora_problem(read_lora(path)) is None and file_input_width(path) is None
    before = _snapshot(dev)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        applied = apply_lora(dev, path, 1.0, merge=True)
    assert applied.touched > 0 and dev.transformer.config.in_channels == 64
    applied.remove()
    _same(dev, before)


def test_the_command_runs_dev_with_the_lora_and_a_control_image(tmp_path):
    """``sdcore generate -m <dev> "<lora:flux1-canny-dev-lora:0.85> ..." --control-image``: the image is made (at the
    control image's size), the guidance defaults to BFL's Canny 30 from the LoRA's file name, and the infotext
    names the control image and the LoRA's hash."""
    from click.testing import CliRunner
    from sdcore.cli import build_cli
    from sdcore.generate.pnginfo import read_png_parameters
    from sdcore.models.load import load_model
    from sdcore.plugins import get_plugin_manager

    loras = tmp_path / "loras"
    loras.mkdir()
    _save(_control_lora(load_model("tiny:flux").transformer)[0], loras / f"{NAME}.safetensors")
    control, out = tmp_path / "edges.png", tmp_path / "o.png"
    _picture(48).save(control)
    result = CliRunner().invoke(
        build_cli(get_plugin_manager()),
        ["generate", f"<lora:{NAME}:0.85> a cat", "-m", "tiny:flux", "--steps", "1", "--lora-dir", str(loras),
         "--control-image", str(control), "-o", str(out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert Image.open(out).size == (48, 48)
    params = read_png_parameters(out)
    assert params is not None and params.extra["Distilled CFG Scale"] == "30"
    assert params.extra["Control image"] == "edges.png" and NAME in params.extra["Lora hashes"]


def test_a_diffusers_trained_control_lora_sets_its_norm_scales_as_diffusers_does(tmp_path):
    """diffusers' ``examples/flux-control/train_control_lora_flux.py --train_norm_layers`` saves its trained norms
    beside the PEFT LoRA as ``transformer.<path>.weight`` (``NORM_LAYER_PREFIXES`` norm_q, norm_k, norm_added_q,
    norm_added_k: lines 65 and 1358-1369 at diffusers 58eb52c); ``FluxControlPipeline.load_lora_weights`` sets them
    on the norms (lora_pipeline.py:1612-1617, ``_load_norm_into_transformer``). sdcore's ``<lora:...>`` on such a file
    gives diffusers' forward, ``lora info`` counts the norms, and ``lora resize`` keeps them (before: 12 "unknown
    keys", not applied, and dropped by resize)."""
    from sdcore.models.load import load_model
    from sdplugin_lora.apply import apply_lora
    from sdplugin_lora.format import read_lora
    from sdplugin_lora.tools import lora_info, resize_lora

    dev = load_model("tiny:flux")
    _, converted = _control_lora(dev.transformer, seed=2)
    norms = [k for k in converted if k.endswith(".weight") and ".norm_" in k and "lora" not in k]
    assert len(norms) == 4 * dev.transformer.config.num_layers + 2 * dev.transformer.config.num_single_layers
    path = _save({k: v.clone() for k, v in converted.items()}, tmp_path / "pose-control.safetensors")
    theirs = _diffusers_control(converted, 0.5).transformer
    inputs = _control_inputs(dev.transformer)
    with torch.no_grad():
        expected = theirs(**inputs, return_dict=False)[0]
    lora = read_lora(path)
    assert not lora.unknown_keys and sorted(lora.norm_scales) == sorted(norms)
    assert lora_info(path)["norm_scales"] == len(norms)
    applied = apply_lora(dev, path, 0.5, merge=True, widen=True)
    with torch.no_grad():
        ours = dev.transformer(**inputs, return_dict=False)[0]
    applied.remove()
    assert torch.allclose(ours, expected, atol=1e-5, rtol=0)
    resized = resize_lora(lora, rank=2)
    assert all(torch.equal(resized.tensors[key], converted[key]) for key in norms)


def test_a_control_lora_is_never_kept_applied_between_prompts(tmp_path):
    """A control LoRA widens dev's img_in: kept merged between prompts, the next call's pre-apply checks would see
    a Depth/Canny model (wrong default guidance in X/Y/Z cells, "needs a control image" for a plain prompt). Its
    activation has no key, so a keeping session undoes it after each prompt; a plain LoRA still has one."""
    from sdcore.generate.networks import NetworkRef
    from sdcore.generate.session import NetworkSession
    from sdcore.models.load import load_model

    dev = load_model("tiny:flux")
    bfl, _ = _control_lora(dev.transformer)
    _save(bfl, tmp_path / f"{NAME}.safetensors")
    plain = {k: v for k, v in bfl.items() if not k.startswith("img_in.")}
    _save(plain, tmp_path / "plain.safetensors")
    from sdplugin_lora.apply import LoraHandler

    handler = LoraHandler(tmp_path)
    session = NetworkSession({"lora": handler})
    assert handler.activation_key([NetworkRef("lora", NAME, (1.0,))]) is None
    assert handler.activation_key([NetworkRef("lora", "plain", (1.0,))]) is not None
    before = _snapshot(dev)
    with session.keeping():
        with session.apply(dev, f"<lora:{NAME}:1>a cat"):
            assert dev.transformer.config.in_channels == 128
        assert dev.transformer.config.in_channels == before[-1]  # undone at once, not kept
        _same(dev, before)
