"""Forge's "Module N" fields (its "VAE / Text Encoder" files: ``Module 1: ae, Module 2: clip_l, Module 3:
t5xxl_fp16``, the file stems, after "Version"): ``generate`` writes them for the part files of the flow families,
and ``--from-png`` finds each stem below the VAE and text encoder folders and sets the part its header says."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from load_spy import StoppedAtLoad, stop_at_load
from PIL import Image
from sdcore import __version__
from sdcore.generate.pnginfo import module_fields, png_modules, save_png


def _sdcore(*args: str):
    from sdcore.cli import build_cli
    from sdcore.plugins import get_plugin_manager

    return CliRunner().invoke(build_cli(get_plugin_manager(entrypoints=False)), ["generate", *args])


def _save(tensors, path: Path) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous().clone() for k, v in tensors.items()}, str(path))
    return path


@pytest.fixture(scope="module")
def forge(tmp_path_factory):
    """A Forge tree with a tiny FLUX.1 dev as its users keep it: the BFL transformer alone in
    ``Stable-diffusion/``, ``VAE/ae.safetensors``, ``text_encoder/clip_l.safetensors`` and
    ``text_encoder/t5xxl_fp16.safetensors``; and the whole checkpoint (its own parts) as ``flux1-full``."""
    from sdcore.models.flux.adapter import FluxAdapter
    from sdcore.models.flux.save import flux_state
    from sdcore.models.t5 import t5_file_tensors

    dev = FluxAdapter().create_tiny(variant="dev", seed=0)
    state = flux_state(dev, "comfy")
    models = tmp_path_factory.mktemp("forge") / "models"
    prefix = "model.diffusion_model."
    _save({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)},
          models / "Stable-diffusion" / "flux1-dev.safetensors")  # fmt: skip
    _save(state, models / "Stable-diffusion" / "flux1-full.safetensors")
    _save({k[len("vae.") :]: v for k, v in state.items() if k.startswith("vae.")}, models / "VAE" / "ae.safetensors")
    clip = {k[len("text_encoders.clip_l.transformer.") :]: v for k, v in state.items() if "clip_l" in k}
    _save(clip, models / "text_encoder" / "clip_l.safetensors")
    _save(t5_file_tensors(dev.text_encoders[1]), models / "text_encoder" / "t5xxl_fp16.safetensors")
    return models


@pytest.fixture
def loads(monkeypatch) -> list[tuple[str, dict]]:
    """What ``generate`` would load (source, part keywords); it stops there."""
    return stop_at_load(monkeypatch)


def _png(tmp_path: Path, fields: str) -> Path:
    png = tmp_path / "forge.png"
    save_png(Image.new("RGB", (8, 8)), png, "a purple ring\nSteps: 1, Sampler: Euler, Schedule type: Simple, "
             f"CFG scale: 1, Distilled CFG Scale: 3.5, Seed: 7, Size: 32x32, Model: flux1-dev, {fields}")  # fmt: skip
    return png


def _parts(forge: Path) -> dict[str, str]:
    return {"clip_l": str(forge / "text_encoder" / "clip_l.safetensors"),
            "t5xxl": str(forge / "text_encoder" / "t5xxl_fp16.safetensors"),
            "vae": str(forge / "VAE" / "ae.safetensors")}  # fmt: skip


def test_module_fields_and_their_order():
    """Forge's stems in sdcore's order (VAE, CLIP-L, CLIP-G, T5); files only; none for the UNet families, which get
    A1111's VAE fields; the infotext's "Module N" read back by N."""
    parts = {"t5xxl": __file__, "clip_l": __file__, "vae": __file__, "t5_tokenizer": str(Path(__file__).parent)}
    stem = Path(__file__).stem
    assert module_fields(parts, "flux") == {"Module 1": stem, "Module 2": stem, "Module 3": stem}
    assert module_fields({"clip_g": __file__, "vae": str(Path(__file__).parent)}, "sd3") == {"Module 1": stem}
    assert module_fields({"vae": __file__}, "sdxl") == {}
    assert png_modules({"Module 10": "j", "Module 2": "b", "Version": "f2", "Module 1": "a", "Hires Module 1": "x"}) == [
        ("Module 1", "a"), ("Module 2", "b"), ("Module 10", "j")]  # fmt: skip


def test_an_image_made_with_parts_writes_forges_modules_and_comes_back_with_them(forge, tmp_path):
    """``generate`` with ``--ae/--clip-l/--t5xxl`` writes ``Module 1: ae, Module 2: clip_l, Module 3: t5xxl_fp16``
    after "Version", where Forge does; ``--from-png`` with only the models folder finds the model and the three
    parts again and makes the same image, with the same infotext."""
    first, again = tmp_path / "first.png", tmp_path / "again.png"
    common = ["--models-dir", str(forge), "--device", "cpu"]
    made = _sdcore("a purple ring", "-m", "flux1-dev", "--t5xxl", "t5xxl_fp16", "--ae", "ae", "--clip-l", "clip_l",
                   "--steps", "1", "--size", "32x32", "--seed", "7", *common, "-o", str(first))  # fmt: skip
    assert made.exit_code == 0, made.output
    text = Image.open(first).info["parameters"]
    assert text.splitlines()[1].endswith(
        f", Version: sdcore {__version__}, Module 1: ae, Module 2: clip_l, Module 3: t5xxl_fp16"
    )
    result = _sdcore("--from-png", str(first), *common, "-o", str(again))
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    for line in ("VAE from the PNG: ae.safetensors (Module 1)",
                 "CLIP-L text encoder from the PNG: clip_l.safetensors (Module 2)",
                 "T5-XXL text encoder from the PNG: t5xxl_fp16.safetensors (Module 3)"):  # fmt: skip
        assert line in lines, result.stderr
    assert "Module" not in "".join(line for line in lines if "ignored" in line)
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(again)))
    assert Image.open(again).info["parameters"] == text


def test_a_forge_infotext_sets_the_parts_by_their_headers(forge, tmp_path, loads):
    """A Forge image lists its modules in the order they were picked: each is told by its tensors, not by its
    place; a part option given stays."""
    png = _png(tmp_path, "Version: f2.0.1v1.10.1-previous-669-gdfdcbab6, Module 1: t5xxl_fp16, Module 2: ae, "
               "Module 3: clip_l")  # fmt: skip
    result = _sdcore("--from-png", str(png), "--models-dir", str(forge), "-o", str(tmp_path / "o.png"))
    assert isinstance(result.exception, StoppedAtLoad), result.output
    assert loads == [(str(forge / "Stable-diffusion" / "flux1-dev.safetensors"), _parts(forge))]
    given = _sdcore("--from-png", str(png), "--models-dir", str(forge), "--t5xxl", _parts(forge)["t5xxl"],
                    "--ae", _parts(forge)["vae"], "-o", str(tmp_path / "o2.png"))  # fmt: skip
    assert isinstance(given.exception, StoppedAtLoad), given.output
    assert loads[1][1] == _parts(forge)
    assert "VAE from the PNG" not in given.stderr and "CLIP-L text encoder from the PNG" in given.stderr


def test_a_module_not_found_is_a_warning_or_the_missing_part_error(forge, tmp_path, loads):
    """A stem no file has: a warning naming it and the folders, and the model's own part (the whole checkpoint);
    for the transformer alone, which has none, one pre-flight error line that names the PNG's module."""
    fields = "Version: f2.0.1, Module 1: ae, Module 2: clip_l, Module 3: t5xxl_fp8_e4m3fn"
    png = _png(tmp_path, fields)
    result = _sdcore("--from-png", str(png), "--models-dir", str(forge), "-o", str(tmp_path / "o.png"))
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and result.output.splitlines()[-1] == errors[0]
    message = errors[0].removeprefix("Error: ")
    assert loads == []
    assert message.startswith(
        f"{forge / 'Stable-diffusion' / 'flux1-dev.safetensors'} has no T5-XXL text encoder: the PNG's Module 3 "
        f"'t5xxl_fp8_e4m3fn' is not in "
    ), message
    assert message.endswith(" and their subfolders; pass --t5xxl <file or folder>"), message
    assert f"{forge / 'VAE'}, " in message and f"{forge / 'text_encoder'} and" in message
    full = _sdcore(
        "--from-png", str(png), "-m", "flux1-full", "--models-dir", str(forge), "-o", str(tmp_path / "f.png")
    )
    assert isinstance(full.exception, StoppedAtLoad), full.output
    warning = [line for line in full.stderr.splitlines() if "t5xxl_fp8_e4m3fn" in line]
    assert len(warning) == 1 and warning[0].startswith("warning: the PNG's Module 3 't5xxl_fp8_e4m3fn' is not in ")
    assert warning[0].endswith(
        "and their subfolders: the model's own part is used; pass --vae/--clip-l/--clip-g/--t5xxl to choose one"
    )
    parts = _parts(forge)
    del parts["t5xxl"]
    assert loads == [(str(forge / "Stable-diffusion" / "flux1-full.safetensors"), parts)]
    # the transformer alone with --t5xxl given: the warning says the option given stands in, not the model's part
    loads.clear()
    given = _sdcore("--from-png", str(png), "--models-dir", str(forge), "--t5xxl", str(forge / "text_encoder" /
                    "t5xxl_fp16.safetensors"), "-o", str(tmp_path / "g.png"))  # fmt: skip
    assert isinstance(given.exception, StoppedAtLoad), given.output
    warning = [line for line in given.stderr.splitlines() if "t5xxl_fp8_e4m3fn" in line]
    assert len(warning) == 1 and warning[0].endswith(
        "and their subfolders: the model's own part, or the --t5xxl given, is used; pass --vae/--clip-l/--clip-g/"
        "--t5xxl to choose one"
    ), warning
    assert loads == [(str(forge / "Stable-diffusion" / "flux1-dev.safetensors"), _parts(forge))]


def test_an_old_form_vae_field_is_the_module_list(forge, tmp_path, loads):
    """Forge's paste: an old-form "VAE" field is the whole module list, the Module fields are not read."""
    png = _png(tmp_path, "VAE: ae.safetensors, Module 1: ae, Module 2: clip_l, Module 3: t5xxl_fp16")
    result = _sdcore(
        "--from-png", str(png), "-m", "flux1-full", "--models-dir", str(forge), "-o", str(tmp_path / "o.png")
    )
    assert isinstance(result.exception, StoppedAtLoad), result.output
    assert (
        "warning: the PNG's Module fields are not read: its VAE field is the module list (Forge's paste)"
        in result.stderr.splitlines()
    )
    assert loads == [(str(forge / "Stable-diffusion" / "flux1-full.safetensors"), {"vae": _parts(forge)["vae"]})]
