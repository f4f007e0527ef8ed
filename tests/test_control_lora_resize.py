"""``sdcore lora resize`` on a FLUX.1 control LoRA keeps BFL's control layout, which is how the loaders find one.

ComfyUI recognises a control LoRA by ``img_in.lora_A.weight`` with ``single_blocks.0.norm.key_norm.scale``
(comfy/lora_convert.py ``convert_lora``, lines 43-45 at commit 02b5222) and only then pads ``img_in`` to the file's
width (``convert_lora_bfl_control``, lines 5-12); diffusers' ``load_lora_weights`` converts a file with
``query_norm.scale`` keys by ``_convert_bfl_flux_control_lora_to_diffusers``, which reads ``lora_A``/``lora_B``.
A resized control LoRA must stay ``<BFL module>.lora_A.weight`` / ``.lora_B.weight`` (+ ``.lora_B.bias``) with no
alpha, and its norm scales in full. The files: sdcore's own ``--control-lora`` result (tests/
test_control_lora_training.py's fixture) and that file made to look like BFL's (a ``lora_B.bias`` on every module,
the final layer's ``lora_A`` halves unequal, no header).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import save_file


def _training_tests():
    """tests/test_control_lora_training.py as a module (the suite imports by file: --import-mode=importlib), for its
    trained control LoRA and its diffusers pipeline."""
    name = "_sdcore_control_lora_training_tests"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("test_control_lora_training.py"))
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


_training = _training_tests()
trained = _training.trained  # the fixture: a control LoRA trained 3 steps on tiny FLUX.1 dev (rank 4)
_one_thread = _training._one_thread
_diffusers_pipe = _training._diffusers_pipe
FINAL = "final_layer.adaLN_modulation.1"


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118


@pytest.fixture(scope="module")
def bfl_like(trained, tmp_path_factory) -> Path:
    """The trained file as BFL writes its own: a ``lora_B.bias`` on every module, the final layer's module at rank
    4 with unequal ``lora_A`` halves (not sdcore's doubled form), no header."""
    tensors, _ = _read(trained)
    generator = torch.Generator().manual_seed(3)
    out_in = tensors[f"{FINAL}.lora_B.weight"].shape[0], tensors[f"{FINAL}.lora_A.weight"].shape[1]
    tensors[f"{FINAL}.lora_A.weight"] = torch.randn(4, out_in[1], generator=generator) * 0.1
    tensors[f"{FINAL}.lora_B.weight"] = torch.randn(out_in[0], 4, generator=generator) * 0.1
    for key in [k for k in tensors if k.endswith(".lora_B.weight")]:
        tensors[key.replace(".weight", ".bias")] = torch.randn(tensors[key].shape[0], generator=generator) * 0.1
    path = tmp_path_factory.mktemp("bfl") / "flux1-canny-dev-lora.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def _resize(source: Path, output: Path, *args: str) -> Path:
    from sdplugin_lora.commands import resize_command

    result = CliRunner().invoke(resize_command, [str(source), "-o", str(output), "--save-dtype", "fp32", *args])
    assert result.exit_code == 0, result.output
    return output


def _modules(tensors: dict[str, torch.Tensor]) -> set[str]:
    return {key.removesuffix(".lora_A.weight") for key in tensors if key.endswith(".lora_A.weight")}


@pytest.mark.parametrize("args", [("--rank", "2"), ("--rank", "4", "--dynamic", "sv_fro", "--dynamic-param", "0.9")])
def test_the_resized_file_is_bfls_control_layout(trained, tmp_path, args):
    """(a) The same keys as the trained file (lora_A/lora_B per BFL module, the norm scales as they were), no alpha,
    ``img_in``'s lora_A still 128 wide, the final layer's module doubled with equal halves, the header's rank and
    alpha as kohya's resize writes them with the control marker kept, and ``lora info`` still says control."""
    from sdplugin_lora.commands import info_command

    before, meta_before = _read(trained)
    after, meta = _read(_resize(trained, tmp_path / "small.safetensors", *args))
    assert set(after) == set(before)
    assert not any(key.endswith((".alpha", ".lora_down.weight", ".lora_up.weight")) for key in after)
    for key in [k for k in before if k.endswith(".scale")]:
        assert torch.equal(after[key], before[key]), key
    ranks = {m: after[f"{m}.lora_A.weight"].shape[0] for m in _modules(after)}
    assert after["img_in.lora_A.weight"].shape[1] == 128
    down, up = after[f"{FINAL}.lora_A.weight"], after[f"{FINAL}.lora_B.weight"]
    half = down.shape[0] // 2
    assert torch.equal(down[:half], down[half:]) and torch.equal(up[:, :half], up[:, half:])
    if "--dynamic" in args:
        assert meta["ss_network_dim"] == meta["ss_network_alpha"] == "Dynamic"
        assert max(ranks.values()) <= 8 and min(ranks.values()) >= 1
    else:
        assert {r for m, r in ranks.items() if m != FINAL} == {2} and ranks[FINAL] == 4
        assert meta["ss_network_dim"] == "2" and float(meta["ss_network_alpha"]) == 2.0  # alpha/rank is in lora_B
        assert meta["ss_training_comment"].startswith("dimension is resized from 4 to 2")  # the trained rank
    assert meta["sdcore_control_lora"] == meta_before["sdcore_control_lora"]
    args_before = json.loads(meta_before["ss_network_args"])
    assert json.loads(meta["ss_network_args"])["control_lora"] == args_before["control_lora"] == "True"
    result = CliRunner().invoke(info_command, [str(tmp_path / "small.safetensors")])
    assert result.exit_code == 0, result.output
    assert "control:     a FLUX.1 Depth/Canny control LoRA" in result.output


def _fused_by_diffusers(path: Path, monkeypatch) -> dict[str, torch.Tensor]:
    pipe = _diffusers_pipe(path, monkeypatch)
    pipe.fuse_lora()
    state = pipe.transformer.state_dict()
    return {k.replace(".base_layer", ""): v.clone() for k, v in state.items() if "lora_" not in k}


def _merged_by_sdcore(path: Path) -> dict[str, torch.Tensor]:
    from sdcore.models.load import load_model
    from sdplugin_lora.apply import apply_lora

    dev = load_model("tiny:flux")
    apply_lora(dev, path, 1.0, merge=True, widen=True)
    return {k: v.clone() for k, v in dev.transformer.state_dict().items()}


def _gap(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> float:
    assert set(ours) == set(theirs)
    return max(float((ours[k].float() - theirs[k].float()).abs().max()) for k in ours)


@pytest.mark.parametrize("which", ["trained", "bfl_like"])
def test_diffusers_loads_the_resized_file_as_sdcore_merges_it(which, request, tmp_path, monkeypatch):
    """(b) diffusers' ``load_lora_weights`` + ``fuse_lora`` on the resized file give sdcore's merge of it (every
    tensor within 1e-5, ``x_embedder`` widened to 128, the biases and norm weights included), and resized at full
    rank (4) it applies as the original does (within 1e-4)."""
    source = request.getfixturevalue(which)
    small = _resize(source, tmp_path / "small.safetensors", "--rank", "2")
    ours = _merged_by_sdcore(small)
    assert ours["x_embedder.weight"].shape[1] == 128
    gap = _gap(ours, _fused_by_diffusers(small, monkeypatch))
    assert gap <= 1e-5, gap
    full = _resize(source, tmp_path / "full.safetensors", "--rank", "4")
    original = _merged_by_sdcore(source)
    assert _gap(original, ours) > 1e-3  # rank 2 changed something: the comparison below can fail
    assert _gap(_merged_by_sdcore(full), original) <= 1e-4


def _comfy_reads_as_control(sd: dict[str, torch.Tensor]) -> tuple[int, int] | None:
    """ComfyUI's rule rewritten: comfy/lora_convert.py ``convert_lora`` (lines 43-45 at 02b5222) takes a file for a BFL
    control LoRA when it holds ``img_in.lora_A.weight`` and ``single_blocks.0.norm.key_norm.scale``; then
    ``convert_lora_bfl_control`` (lines 5-12) keeps every key under ``diffusion_model.`` (``lora_B.bias`` read as a
    bias change, ``*_norm.scale`` set in full) and pads ``img_in`` to (lora_B's rows, lora_A's columns), returned
    here; None when it would read the file as an ordinary LoRA (and leave ``img_in`` 64 wide)."""
    if "img_in.lora_A.weight" not in sd or "single_blocks.0.norm.key_norm.scale" not in sd:
        return None
    return int(sd["img_in.lora_B.weight"].shape[0]), int(sd["img_in.lora_A.weight"].shape[1])


def test_comfyui_reads_the_resized_file_as_a_control_lora(bfl_like, tmp_path):
    """(c) ComfyUI's detection takes the resized file for a control LoRA and pads img_in to 128, and every key is one
    its converter and LoRA loader read (comfy/weight_adapter/lora.py ``LoRAAdapter.load``: ``{}.lora_B.weight``
    with ``{}.lora_A.weight``, no alpha = scale 1)."""
    before, _ = _read(bfl_like)
    assert _comfy_reads_as_control(before) is not None
    after, _ = _read(_resize(bfl_like, tmp_path / "small.safetensors", "--rank", "1"))
    assert _comfy_reads_as_control(after) == (after["img_in.lora_B.weight"].shape[0], 128)
    forms = (".lora_A.weight", ".lora_B.weight", ".lora_B.bias", "_norm.scale")
    assert [key for key in after if not key.endswith(forms)] == []
    for module in _modules(after):
        assert f"{module}.lora_B.weight" in after and f"{module}.lora_B.bias" in after


def test_the_bias_change_is_unchanged(bfl_like, tmp_path):
    """(d) ``s · b`` of every module: the file's scale is 1 before and after (no alpha), so each ``lora_B.bias`` is
    the original's."""
    from sdplugin_lora.format import read_lora

    original = read_lora(bfl_like)
    resized = read_lora(_resize(bfl_like, tmp_path / "small.safetensors", "--rank", "1"))
    assert resized.modules.keys() == original.modules.keys()
    for name, weights in original.modules.items():
        new = resized.modules[name]
        assert weights.scale == new.scale == 1.0
        expected = weights.tensors["lora_up.bias"].float() * weights.scale
        torch.testing.assert_close(new.tensors["lora_up.bias"].float() * new.scale, expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    "args",
    [("--mode", "concat"), ("--mode", "svd", "--rank", "2"), ("--model", "tiny:flux")],
    ids=["concat", "svd", "into-model"],
)
def test_lora_merge_refuses_control_loras_in_one_line(trained, tmp_path, sd_cli, pm, args):
    """``sdcore lora merge`` of two control LoRAs (concat or svd: a full norm scale has no ratio or sum) and of a
    control LoRA into dev (which would need img_in widened) is one line (sdcore's "Error: ..."), nothing written."""
    resized = _resize(trained, tmp_path / "small.safetensors", "--rank", "2")
    sources = [str(trained)] if "--model" in args else [f"{trained}:0.5", str(resized)]
    out = tmp_path / "merged.safetensors"
    result = sd_cli(["lora", "merge", *sources, "-o", str(out), *args], pm=pm)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1, result.output + repr(result.exception)
    if "--model" in args:
        assert "FLUX.1 Depth/Canny control LoRA" in lines[0] and "not in training or merges" in lines[0]
    else:
        assert "norm scales in full" in lines[0] and "a merge of LoRAs cannot weight or add" in lines[0]
    assert not out.exists()


def test_a_dora_module_in_a_control_lora_is_refused_in_one_line():
    """BFL's layout has no place for DoRA's magnitude: resize says so rather than drop it."""
    from sdcore.errors import NetworkMismatchError
    from sdplugin_lora.format import parse_state_dict
    from sdplugin_lora.tools import resize_lora

    generator = torch.Generator().manual_seed(0)
    state = {"img_in.lora_A.weight": torch.randn(2, 128, generator=generator),
             "img_in.lora_B.weight": torch.randn(8, 2, generator=generator),
             "img_in.dora_scale": torch.ones(8, 1),
             "single_blocks.0.norm.key_norm.scale": torch.ones(4)}  # fmt: skip
    with pytest.raises(NetworkMismatchError) as caught:
        resize_lora(parse_state_dict(state), 1)
    (line,) = str(caught.value).splitlines()
    assert "1 DoRA modules (img_in)" in line and "plain LoRA only" in line
