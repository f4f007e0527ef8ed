"""BFL's FLUX.1 Depth/Canny control LoRAs (``flux1-depth-dev-lora.safetensors``, ``flux1-canny-dev-lora``) are
refused with one line naming the file's kind.

Their layout, as diffusers reads it (``_convert_bfl_flux_control_lora_to_diffusers`` in
diffusers/loaders/lora_conversion_utils.py) and BFL writes it (flux/modules/lora.py ``LinearLora``): every Linear of
BFL's model names ``<module>.lora_A.weight`` [rank, in] and ``<module>.lora_B.weight`` [out, rank] (with a
``lora_B.bias``), ``img_in``'s ``lora_A`` taking 128 inputs where dev's ``img_in`` takes 64, and each block's
attention RMSNorm scales are full tensors (``double_blocks.<i>.img_attn.norm.query_norm.scale``). diffusers applies
one by swapping in a wider ``x_embedder`` and changing ``in_channels``; sdcore's loader changes no module's shape,
so it says what the file is instead of a shape error (or, worse, applying all but ``img_in`` and the norms).
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")


def _control_lora(bundle, path, *, img_in_width: int = 128, rank: int = 2):
    """A tiny file in BFL's control-LoRA layout for ``bundle``'s transformer (every 2-D weight of its BFL state
    dict gets lora_A/lora_B/lora_B.bias; ``img_in`` takes ``img_in_width`` inputs; the norm scales are copied)."""
    from safetensors.torch import save_file
    from sdcore.models.flux.convert import diffusers_to_bfl

    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for key, value in diffusers_to_bfl(bundle.transformer.state_dict()).items():
        if key.endswith(".scale"):  # RMSNorm scales: full tensors in the file
            tensors[key] = value.clone()
        elif key.endswith(".weight") and value.ndim == 2:
            module = key[: -len(".weight")]
            out_width, in_width = value.shape
            if module == "img_in":
                in_width = img_in_width
            tensors[f"{module}.lora_A.weight"] = torch.randn(rank, in_width, generator=generator)
            tensors[f"{module}.lora_B.weight"] = torch.randn(out_width, rank, generator=generator)
            tensors[f"{module}.lora_B.bias"] = torch.randn(out_width, generator=generator)
    save_file(tensors, str(path))
    return path


def test_a_control_lora_is_refused_in_one_line_naming_its_kind(tmp_path):
    from sdcore.errors import NetworkMismatchError
    from sdcore.models.load import load_model
    from sdplugin_lora.apply import apply_lora

    bundle = load_model("tiny:flux")
    before = {k: v.clone() for k, v in bundle.transformer.state_dict().items()}
    path = _control_lora(bundle, tmp_path / "flux1-depth-dev-lora.safetensors")
    for merge in (True, False):
        with pytest.raises(NetworkMismatchError) as caught:
            apply_lora(bundle, path, 0.85, merge=merge)
        (line,) = str(caught.value).splitlines()
        assert "flux1-depth-dev-lora" in line and "FLUX.1 Depth/Canny control LoRA" in line
        assert "widens img_in from 64 to 128 inputs" in line and "--control-image" in line
    # refused before anything changed
    after = bundle.transformer.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert bundle.transformer.config.in_channels == 64


def test_the_same_layout_without_the_wider_img_in_is_not_called_a_control_lora(tmp_path):
    """The refusal keys on img_in's input width, not on BFL's names: a 64-wide one applies (its lora_B biases and
    norm scales are keys the loader lists as unmatched)."""
    from sdcore.models.load import load_model
    from sdplugin_lora.apply import LoraWarning, apply_lora
    from sdplugin_lora.format import control_lora_problem, read_lora

    bundle = load_model("tiny:flux")
    path = _control_lora(bundle, tmp_path / "plain.safetensors", img_in_width=64)
    assert control_lora_problem(read_lora(path)) is None
    with pytest.warns(LoraWarning, match="query_norm.scale"):
        applied = apply_lora(bundle, path, 1.0, merge=True)
    assert applied.touched > 0
    applied.remove()


def test_generate_with_a_control_lora_tag_says_it_in_one_line(tmp_path):
    from click.testing import CliRunner
    from sdcore.cli import build_cli
    from sdcore.models.load import load_model
    from sdcore.plugins import get_plugin_manager

    loras = tmp_path / "loras"
    loras.mkdir()
    _control_lora(load_model("tiny:flux"), loras / "flux1-canny-dev-lora.safetensors")
    result = CliRunner().invoke(
        build_cli(get_plugin_manager()),
        ["generate", "a cat <lora:flux1-canny-dev-lora:0.85>", "-m", "tiny:flux", "--steps", "1", "--size", "32x32",
         "--lora-dir", str(loras), "-o", str(tmp_path / "o.png")],
    )  # fmt: skip
    assert result.exit_code != 0 and not (tmp_path / "o.png").exists()
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert "FLUX.1 Depth/Canny control LoRA" in lines[0] and "widens img_in from 64 to 128" in lines[0]
