"""``sdcore model info NAME`` and ``sdcore model convert NAME DST``: the model names ``generate --model`` takes
(ComfyUI's ckpt_name, A1111 titles and hashes) below ``--models-dir`` and ``--extra-model-paths``' folders, an
existing path still winning."""

from __future__ import annotations

from pathlib import Path

import pytest
from cli_errors import one_error_line
from click.testing import CliRunner
from safetensors import safe_open
from sdcore.models.hashes import sha256_file


def _sdcore(*args: str):
    from sdcore.cli import build_cli
    from sdcore.plugins import get_plugin_manager

    return CliRunner().invoke(build_cli(get_plugin_manager(entrypoints=False)), ["model", *args])


def _ok(*args: str) -> str:
    result = _sdcore(*args)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """An A1111/ComfyUI ``models`` folder with a tiny SD1 checkpoint at ``checkpoints/sd/tiny.safetensors``."""
    root = tmp_path_factory.mktemp("tree") / "models"
    (root / "checkpoints" / "sd").mkdir(parents=True)
    _ok("create-tiny", str(root / "checkpoints" / "sd" / "tiny.safetensors"), "--family", "sd1", "--seed", "1")
    return root


def test_info_by_name_prints_what_info_by_path_prints(models):
    file = models / "checkpoints" / "sd" / "tiny.safetensors"
    by_path = _ok("info", str(file), "--models-dir", str(models))
    assert (
        by_path.startswith(f"model:           {file}\n")
        and f"sha256:                     {sha256_file(file)}" in by_path
    )
    title = f"sd/tiny.safetensors [{sha256_file(file)[:10]}]"  # A1111's checkpoint title
    for name in ("sd/tiny.safetensors", "sd/tiny", "tiny", "tiny.safetensors", title, sha256_file(file)[:10]):
        assert _ok("info", name, "--models-dir", str(models)) == by_path, name


def test_convert_by_name_writes_the_file_convert_by_path_writes(models, tmp_path):
    file = models / "checkpoints" / "sd" / "tiny.safetensors"
    by_path, by_name = tmp_path / "by-path.safetensors", tmp_path / "by-name.safetensors"
    assert _ok("convert", str(file), str(by_path), "--dtype", "fp16") == f"wrote {by_path} (sd1, epsilon)\n"
    assert _ok("convert", "sd/tiny", str(by_name), "--dtype", "fp16", "--models-dir", str(models)) == (
        f"wrote {by_name} (sd1, epsilon)\n"
    )
    with safe_open(str(by_path), "pt") as a, safe_open(str(by_name), "pt") as b:
        meta_a, meta_b = a.metadata(), b.metadata()
        assert meta_a.pop("modelspec.date") and meta_b.pop("modelspec.date")  # the time of writing: may differ
        assert meta_a == meta_b and meta_a["modelspec.hash_sha256"].startswith("0x")
        names = sorted(a.keys())
        assert names == sorted(b.keys()) and len(names) > 100
        for key in names:
            assert a.get_tensor(key).equal(b.get_tensor(key)), key


def test_an_existing_path_wins_over_a_name(models, tmp_path, monkeypatch):
    """``sd/tiny.safetensors`` in the current folder is that file, not the models folder's of that name."""
    here = tmp_path / "sd" / "tiny.safetensors"
    here.parent.mkdir()
    _ok("create-tiny", str(here), "--family", "sd1", "--seed", "2")
    monkeypatch.chdir(tmp_path)
    out = _ok("info", "sd/tiny.safetensors", "--models-dir", str(models))
    assert out.startswith("model:           sd/tiny.safetensors\n")
    assert sha256_file(here) in out and sha256_file(models / "checkpoints" / "sd" / "tiny.safetensors") not in out


def test_a_name_in_an_extra_model_paths_folder(models, tmp_path):
    other = tmp_path / "other" / "ckpts"
    other.mkdir(parents=True)
    (other / "linked.safetensors").write_bytes((models / "checkpoints" / "sd" / "tiny.safetensors").read_bytes())
    config = tmp_path / "extra.yaml"
    config.write_text(f"shared:\n  base_path: {tmp_path / 'other'}\n  checkpoints: ckpts\n")
    empty = tmp_path / "empty-models"
    empty.mkdir()
    out = _ok("info", "linked", "--models-dir", str(empty), "--extra-model-paths", str(config), "--no-hash")
    assert out.startswith(f"model:           {other / 'linked.safetensors'}\n")


def test_unknown_names_are_one_error_each_before_anything_loads(models, tmp_path):
    message = one_error_line(_sdcore("info", "sd/tiyn", "--models-dir", str(models)))
    folders = ", ".join(
        str(models / name) for name in ("checkpoints", "Stable-diffusion", "unet", "diffusion_models", "diffusers")
    )
    assert message.endswith(f"nor is it a model name in {folders} and their subfolders; close names: sd/tiny")
    result = _sdcore(
        "convert", "sd/tiny", str(tmp_path / "x.safetensors"), "--vae", "nope", "--models-dir", str(models)
    )
    assert one_error_line(result).startswith(f"--vae nope: no such file or folder (the VAE), nor a file of that name in "
                                             f"{models / 'vae'}, ")  # fmt: skip
    assert not (tmp_path / "x.safetensors").exists()


def test_without_a_models_folder_a_model_is_a_path_as_before(tmp_path, monkeypatch):
    """No ``--models-dir`` and no ``models/`` here: the loader's own message, no name lookup."""
    monkeypatch.chdir(tmp_path)
    result = _sdcore("info", "sd/tiny")
    assert result.exit_code == 1 and result.output == (
        "Error: sd/tiny: not a local file or folder, and not in the Hugging Face cache (sdcore never downloads: fetch "
        "it first with `hf download sd/tiny`, or give the path of a model file or folder)\n"
    )


def test_info_by_a_comfyui_diffusers_folders_name(tmp_path):
    """ComfyUI's ``models/diffusers/NAME`` (a folder with model_index.json, its DiffusersLoader's model_path)."""
    models = tmp_path / "models"
    folder = models / "diffusers" / "sd15" / "tiny"
    _ok("create-tiny", str(folder), "--family", "sd1")
    by_path = _ok("info", str(folder), "--models-dir", str(models))
    assert by_path.startswith(f"model:           {folder}\nformat:          diffusers\n")
    assert _ok("info", "sd15/tiny", "--models-dir", str(models)) == by_path
    assert _ok("info", "tiny", "--models-dir", str(models)) == by_path
