"""diffusers/PEFT DoRA files (``--use_dora`` of diffusers' training scripts, ``save_lora_weights``): ``lora_A``/
``lora_B`` plus PEFT's ``lora_magnitude_vector`` per output row (``[out]`` for a Linear, ``[1, out, 1, 1]`` for a
conv; ``.weight`` after it when the state dict is a raw one, as the text encoder's here), and ``use_dora`` in the
header. sdcore reads the magnitude as the per-output-row ``dora_scale`` of LyCORIS' ``wd_on_out=True`` layout, so
its one DoRA formula applies it. Also PEFT's first-match ``alpha_pattern``.

The oracle is diffusers itself: files written by ``save_lora_weights`` from PEFT adapters on the tiny SD1 pipeline,
fused with ``load_lora_weights`` + ``fuse_lora``."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from sdcore.errors import NetworkMismatchError
from sdplugin_lora.commands import lora_group
from sdplugin_lora.format import PEFT_LAYOUT, peft_pattern_key, peft_state_dict, read_lora
from test_tools_layouts import _close, _diffusers_fused, _header, _run, _sdcore_merged


def _peft_file(path, *, seed=0, dora=True, unet_alpha_pattern=None, te=True):
    """A diffusers LoRA as ``save_lora_weights`` writes it: UNet attention and ResNet ``conv1`` (rank 4, alpha 2)
    and CLIP q/v (rank 2, alpha 4), random factors and (with ``dora``) magnitudes ``‖W‖ · U(0.5, 1.5)`` per output
    row, so that DoRA's renormalisation changes the weights well beyond the tolerance."""
    from diffusers import StableDiffusionPipeline
    from lora_testutil import fresh_bundle
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    bundle = fresh_bundle("sd1")
    unet_config = LoraConfig(r=4, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1"],
                             alpha_pattern=unet_alpha_pattern or {}, init_lora_weights=False, use_dora=dora)  # fmt: skip
    te_config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                           use_dora=dora)  # fmt: skip
    bundle.unet.add_adapter(unet_config)
    text_encoder = inject_adapter_in_model(te_config, bundle.text_encoders[0])
    with torch.no_grad():
        for name, param in [*bundle.unet.named_parameters(), *text_encoder.named_parameters()]:
            if "lora_magnitude_vector" in name:
                param.mul_(torch.rand(param.shape) + 0.5)
    te_layers = {key.replace(".default", ""): v for key, v in text_encoder.state_dict().items() if "lora_" in key}
    StableDiffusionPipeline.save_lora_weights(
        path.parent / f"peft_{path.stem}",
        unet_lora_layers=get_peft_model_state_dict(bundle.unet),
        text_encoder_lora_layers=te_layers if te else None,
        unet_lora_adapter_metadata=unet_config.to_dict(),
        text_encoder_lora_adapter_metadata=te_config.to_dict() if te else None,
    )
    written = path.parent / f"peft_{path.stem}" / "pytorch_lora_weights.safetensors"
    with safe_open(str(written), framework="pt") as handle:
        meta = dict(handle.metadata())
    save_file(load_file(str(written)), str(path), metadata=meta)
    return path


@pytest.fixture(scope="module")
def dora_file(tmp_path_factory):
    return _peft_file(tmp_path_factory.mktemp("dora") / "dora.safetensors")


def test_the_file_is_what_diffusers_writes(dora_file):
    """The keys this reader has to know: magnitudes without ``.weight`` (UNet, ``get_peft_model_state_dict``) and
    with it (text encoder, a raw state dict), conv magnitudes ``[1, out, 1, 1]``, ``use_dora`` in the header."""
    meta, keys = _header(dora_file)
    tensors = load_file(str(dora_file))
    header = json.loads(meta["lora_adapter_metadata"])
    assert header["unet.use_dora"] is True and header["text_encoder.use_dora"] is True
    conv = "unet.down_blocks.1.resnets.0.conv1.lora_magnitude_vector"
    linear = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_magnitude_vector"
    assert tensors[conv].shape == (1, 64, 1, 1) and tensors[linear].shape == (32,)
    assert any(key.startswith("text_encoder.") and key.endswith(".lora_magnitude_vector.weight") for key in keys)


def test_sdcore_applies_a_peft_dora_file_as_diffusers_fuses_it(dora_file):
    """UNet (attention Linears and ResNet 3x3 convs) and text encoder: sdcore's merged weights are diffusers'
    (<= 1e-5); the same file without its magnitudes (what sdcore applied before) is far off."""
    lora = read_lora(dora_file)
    assert lora.layout == PEFT_LAYOUT and not lora.unknown_keys
    assert all(weights.is_dora for weights in lora.modules.values())
    conv = lora.modules["unet.down_blocks.1.resnets.0.conv1"]
    assert conv.tensors["dora_scale"].shape == (64, 1, 1, 1)
    want = _diffusers_fused(dora_file)
    got = _sdcore_merged((dora_file, 1.0))
    _close(got, want)
    base = _sdcore_merged()
    changed = {key for key in want if not torch.equal(base[key], want[key])}
    assert {key[0] for key in changed} == {"unet", "text_encoder"}
    assert any("conv1" in key[1] for key in changed)
    plain = dora_file.parent / "plain.safetensors"
    state = {k: v for k, v in load_file(str(dora_file)).items() if "magnitude" not in k}
    save_file(state, str(plain), metadata=_header(dora_file)[0])
    as_plain = _sdcore_merged((plain, 1.0))
    worst = max(float((as_plain[key] - want[key]).abs().max()) for key in want)
    assert worst > 1e-2


def test_lora_info_names_it_dora(dora_file):
    result = CliRunner().invoke(lora_group, ["info", str(dora_file), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["dora_modules"] == len(read_lora(dora_file).modules) > 0
    assert "(DoRA)" in info["algorithm"] and info["unknown_keys"] == []


def test_resize_keeps_dora_in_diffusers_layout(dora_file, tmp_path):
    """``lora resize`` of a PEFT DoRA file writes PEFT's DoRA: ``lora_magnitude_vector`` in PEFT's shapes, the
    header's ``use_dora``; at the rank it has, diffusers fuses it to the source file's weights, and sdcore applies
    it the same; at a lower rank diffusers and sdcore agree on the re-factored file."""
    same, small = tmp_path / "r4.safetensors", tmp_path / "r2.safetensors"
    _run("resize", dora_file, "-o", same, "--rank", "4", "--save-dtype", "fp32")
    _run("resize", dora_file, "-o", small, "--rank", "2", "--save-dtype", "fp32")
    meta, keys = _header(same)
    header = json.loads(meta["lora_adapter_metadata"])
    assert header["unet.use_dora"] is True and header["text_encoder.use_dora"] is True
    source, written = load_file(str(dora_file)), load_file(str(same))
    # ".weight" after every magnitude: diffusers' text encoder loader reads them only so
    magnitudes = [key for key in keys if key.endswith(".lora_magnitude_vector.weight")]
    assert len(magnitudes) == len(read_lora(dora_file).modules)
    for key in magnitudes:
        original = source.get(key, source.get(key.removesuffix(".weight")))
        assert written[key].shape == original.shape and torch.equal(written[key], original.float())
    original_fused = _diffusers_fused(dora_file)
    _close(_diffusers_fused(same), original_fused)
    _close(_sdcore_merged((same, 1.0)), original_fused)
    _close(_diffusers_fused(small), _sdcore_merged((small, 1.0)))


def test_convert_to_kohya_of_a_peft_dora_file_is_refused_in_one_line(dora_file, tmp_path):
    result = CliRunner().invoke(lora_group, ["convert", str(dora_file), "-o", str(tmp_path / "k.safetensors"),
                                             "--to", "kohya"])  # fmt: skip
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert isinstance(result.exception, NetworkMismatchError)
    assert "--to kohya rewrites FLUX.1/Chroma files" in str(result.exception)
    assert not (tmp_path / "k.safetensors").exists()


def test_peft_layout_refuses_a_per_input_magnitude_and_mixed_components():
    """sdcore's own DoRA (``[1, in]``) has no PEFT form; PEFT's use_dora is per component."""
    key = "unet.a.to_q"
    down, up = torch.randn(2, 8), torch.randn(4, 2)
    with pytest.raises(NetworkMismatchError, match="per input channel"):
        peft_state_dict({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                         f"{key}.dora_scale": torch.ones(1, 8)})  # fmt: skip
    with pytest.raises(NetworkMismatchError, match="use_dora"):
        peft_state_dict({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                         f"{key}.dora_scale": torch.ones(4, 1), "unet.b.lora_down.weight": down,
                         "unet.b.lora_up.weight": up})  # fmt: skip


def test_pattern_key_is_peft_get_pattern_key():
    """The first pattern whose ``(.*\\.)?(pattern)$`` matches, ``.`` a regex wildcard, as peft's own function."""
    from peft.utils.other import get_pattern_key

    patterns = ["to_k", "attn2.to_k", "attn.\\.to_q", "blocks.0.attn1.to_v", "to_out.0"]
    paths = ["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k", "mid_block.attentions.0.attn1.to_q",
             "x.transformer_blocks.0.attn1.to_v", "transformer_blocks.0.attn1.to_out.0", "attn1.to_out.01", "a.xto_k",
             "attn1.to_v"]  # fmt: skip
    for path in paths:
        want = get_pattern_key(patterns, path)
        assert peft_pattern_key(patterns, path) == (want if want != path else None), path
    assert peft_pattern_key(patterns, paths[0]) == "to_k"
    assert peft_pattern_key(list(reversed(patterns)), paths[0]) == "attn2.to_k"


def test_overlapping_alpha_patterns_apply_as_diffusers_fuses(tmp_path):
    """``alpha_pattern`` {"to_k": 6, "attn2.to_k": 3}: diffusers writes the header with sorted keys, so PEFT meets
    ``attn2.to_k`` first and gives attn2's to_k alpha 3, attn1's 6; sdcore reads the same (it used to let the last
    match win: 6 for both). Plain LoRA and DoRA."""
    pattern = {"to_k": 6, "attn2.to_k": 3}
    for dora in (False, True):
        path = _peft_file(tmp_path / f"p{int(dora)}.safetensors", seed=3, dora=dora, unet_alpha_pattern=pattern,
                          te=False)  # fmt: skip
        header = json.loads(_header(path)[0]["lora_adapter_metadata"])
        assert list(header["unet.alpha_pattern"]) == ["attn2.to_k", "to_k"]
        modules = read_lora(path).modules
        alphas = {key.rsplit(".", 2)[-2]: float(w.alpha) for key, w in modules.items() if key.endswith("to_k")}
        assert alphas == {"attn1": 6.0, "attn2": 3.0}
        _close(_sdcore_merged((path, 1.0)), _diffusers_fused(path))


def test_magnitude_axis_from_shape_one_output_row():
    """A ``[1, 1]`` magnitude of a one-output layer with several inputs can only be per output row (PEFT's ``[1]``
    read as ``[out, 1]``); LyCORIS' per-input ``[1, in]`` and ``[out, 1]`` keep their axes, and the applied weight of
    the one-row case has the stored magnitude as its row norm."""
    from sdplugin_lora.adapters import Dora

    assert Dora.per_output(torch.ones(1, 1), (1, 8)) is True
    assert Dora.per_output(torch.ones(1, 8), (1, 8)) is False
    assert Dora.per_output(torch.ones(4, 1), (4, 8)) is True
    assert Dora.per_output(torch.ones(1, 8), (4, 8)) is False
    base, delta = torch.randn(1, 8), torch.randn(1, 8)
    merged = Dora.apply(base, delta, torch.full((1, 1), 2.5))
    assert torch.allclose(merged.norm(dim=1), torch.tensor([2.5]))
