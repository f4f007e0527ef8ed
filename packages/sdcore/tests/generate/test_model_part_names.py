"""Part options by name (``--ae ae --t5xxl t5xxl_fp16``: ComfyUI's ``vae_name``/``clip_name``) from the models
folder's ``vae/``, ``text_encoders/``, ``clip/`` (A1111's/Forge's ``VAE/``, ``text_encoder/``) and the folders of
ComfyUI's ``extra_model_paths.yaml``; prompt networks in linked folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from cli_errors import one_error_line
from click.testing import CliRunner
from comfy_flux_tree import save_tensors, write_flux_tree
from load_spy import StoppedAtLoad, stop_at_load
from PIL import Image
from sdcore.builtin import generate_command
from sdcore.errors import ConfigError
from sdcore.generate.model_paths import (
    load_extra_model_paths,
    part_folders,
    resolve_part_name,
    resolve_part_names,
)


def _sdcore(*args: str):
    from sdcore.cli import build_cli
    from sdcore.plugins import get_plugin_manager

    return CliRunner().invoke(build_cli(get_plugin_manager(entrypoints=False)), ["generate", *args])


_error = one_error_line  # exit 2, one Error: line, no traceback


_save = save_tensors


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    """A ComfyUI tree with a tiny FLUX.1 dev in the files its users have: the BFL transformer alone in
    ``diffusion_models/``, ``vae/ae.safetensors``, ``text_encoders/t5xxl_fp16.safetensors`` and the CLIP-L in the
    legacy ``clip/`` folder."""
    return write_flux_tree(tmp_path_factory.mktemp("tree") / "ComfyUI" / "models")


def _spy(monkeypatch) -> list[tuple[str, dict]]:
    """What ``sdcore generate`` loads (through the real loader): the source and the part keywords."""
    loaded: list[tuple[str, dict]] = []
    load = generate_command._load_bundle

    def spy(source, pm, **parts):
        loaded.append((source, parts))
        return load(source, pm, **parts)

    monkeypatch.setattr(generate_command, "_load_bundle", spy)
    return loaded


@pytest.fixture
def no_load(monkeypatch):
    monkeypatch.setattr(generate_command, "_load_bundle", lambda *a, **k: pytest.fail("the model must not load"))


def test_parts_by_name_load_the_files_and_render_as_the_paths_do(comfy, tmp_path, monkeypatch):
    loaded = _spy(monkeypatch)
    common = ["a purple ring", "--steps", "1", "--size", "32x32", "--seed", "7", "--device", "cpu",
              "--models-dir", str(comfy)]  # fmt: skip
    by_name = _sdcore("-m", "flux1-dev", "--ae", "ae", "--t5xxl", "t5xxl_fp16", "--clip-l", "clip_l.safetensors",
                      *common, "-o", str(tmp_path / "names.png"))  # fmt: skip
    assert by_name.exit_code == 0, by_name.output
    paths = {"clip_l": str(comfy / "clip" / "clip_l.safetensors"),
             "t5xxl": str(comfy / "text_encoders" / "t5xxl_fp16.safetensors"),
             "vae": str(comfy / "vae" / "ae.safetensors")}  # fmt: skip
    model = str(comfy / "diffusion_models" / "flux1-dev.safetensors")
    assert loaded == [(model, paths)]
    by_path = _sdcore("-m", model, "--ae", paths["vae"], "--t5xxl", paths["t5xxl"], "--clip-l", paths["clip_l"],
                      *common, "-o", str(tmp_path / "paths.png"))  # fmt: skip
    assert by_path.exit_code == 0, by_path.output
    assert loaded[1] == (model, paths)  # paths pass unchanged
    names, given = Image.open(tmp_path / "names.png"), Image.open(tmp_path / "paths.png")
    assert names.size == (32, 32)
    pixels = np.asarray(names)
    assert pixels.std() > 0  # a rendered image, not a blank one
    assert np.array_equal(pixels, np.asarray(given))
    assert names.info["parameters"] == given.info["parameters"]


def test_every_spelling_and_the_folders_of_each_part(comfy, tmp_path, monkeypatch):
    ae = str(comfy / "vae" / "ae.safetensors")
    for name in ("ae", "ae.safetensors", "sub/../ae", "vae\\..\\ae"):
        assert resolve_part_name("vae", name, comfy) == ae, name
    assert resolve_part_name("clip_l", "clip_l", comfy) == str(comfy / "clip" / "clip_l.safetensors")
    # a path stays a path (checked later as every part path is), the T5 tokenizer is a folder path only
    for text in ("/nowhere/ae.safetensors", "./ae.safetensors", "~/ae"):
        assert resolve_part_name("vae", text, comfy) == text
    assert resolve_part_name("t5_tokenizer", "spiece", comfy) == "spiece"
    monkeypatch.chdir(tmp_path)
    Path("ae").write_bytes(b"an existing path wins over a name")
    assert resolve_part_name("vae", "ae", comfy) == "ae"
    # ComfyUI's folders (text_encoders/ before its legacy clip/), then A1111's and Forge's
    assert part_folders("vae", comfy) == [comfy / "vae", comfy / "VAE"]
    assert part_folders("t5xxl", comfy) == [comfy / "text_encoders", comfy / "clip", comfy / "text_encoder"]


def test_a1111_and_forge_folders(tmp_path):
    models = tmp_path / "webui" / "models"
    vae = models / "VAE" / "sdxl_vae.safetensors"
    t5 = models / "text_encoder" / "t5xxl_fp8_e4m3fn.safetensors"
    for path in (vae, t5):
        path.parent.mkdir(parents=True)
        path.write_bytes(b"x")
    assert resolve_part_name("vae", "sdxl_vae", models) == str(vae)
    assert resolve_part_name("t5xxl", "t5xxl_fp8_e4m3fn", models) == str(t5)


def test_the_yaml_vae_and_clip_folders_are_searched(comfy, tmp_path, monkeypatch):
    """A shared folder listed under ``vae:`` and the legacy ``clip:`` key (ComfyUI's text_encoders) of an
    extra_model_paths.yaml: names found there, from the command too (before anything loads)."""
    shared = tmp_path / "shared"
    own_vae = _save({"encoder.conv_in.weight": torch.zeros(1)}, shared / "my vaes" / "flux" / "other_ae.safetensors")
    yaml = tmp_path / "extra_model_paths.yaml"
    yaml.write_text("elsewhere:\n    base_path: shared\n    vae: my vaes\n    clip: |\n        encoders\n")
    extra = load_extra_model_paths(None, [yaml])
    assert part_folders("vae", comfy, extra) == [comfy / "vae", comfy / "VAE", shared / "my vaes"]
    assert part_folders("clip_g", comfy, extra)[-1] == shared / "encoders"
    for name in ("other_ae", "flux/other_ae", "flux/other_ae.safetensors"):
        assert resolve_part_name("vae", name, comfy, extra) == str(own_vae), name
    asked = stop_at_load(monkeypatch)
    result = _sdcore("-m", "flux1-dev", "--ae", "other_ae", "--t5xxl", "t5xxl_fp16", "--clip-l", "clip_l",
                     "--models-dir", str(comfy), "--extra-model-paths", str(yaml), "a ring",
                     "-o", str(tmp_path / "o.png"))  # fmt: skip
    assert isinstance(result.exception, StoppedAtLoad), result.output
    assert asked[0][1]["vae"] == str(own_vae)


def test_missing_and_ambiguous_names_are_refused_before_loading(comfy, tmp_path, no_load):
    out = str(tmp_path / "o.png")
    encoders = ", ".join(str(comfy / name) for name in ("text_encoders", "clip", "text_encoder"))
    message = _error(_sdcore("-m", "flux1-dev", "--ae", "ae", "--t5xxl", "t5xxl_fp8", "--clip-l", "clip_l",
                             "--models-dir", str(comfy), "a ring", "-o", out))  # fmt: skip
    assert message == (
        "--t5xxl t5xxl_fp8: no such file or folder (the T5-XXL text encoder), nor a file of that name in "
        f"{encoders} and their subfolders; close names: t5xxl_fp16"
    )
    # every missing part at once, with the model's own problem
    message = _error(_sdcore("-m", "flux2", "--vae", "zzz", "--t5xxl", "t5", "--models-dir", str(comfy), "a",
                             "-o", out))  # fmt: skip
    checkpoints = ", ".join(
        str(comfy / name) for name in ("checkpoints", "Stable-diffusion", "unet", "diffusion_models", "diffusers")
    )
    assert message == (
        f"flux2: no such model file or folder; nor is it a model name in {checkpoints} and their subfolders; models "
        "there: flux1-dev.safetensors; --t5xxl t5: no such file or folder (the T5-XXL text encoder), nor a file of "
        f"that name in {encoders} and their subfolders; models there: t5xxl_fp16.safetensors, clip_l.safetensors; "
        f"--vae zzz: no such file or folder (the VAE), nor a file of that name in {comfy / 'vae'}, {comfy / 'VAE'} "
        "and their subfolders; models there: ae.safetensors"
    )
    # a found part of the wrong kind is said before the load too (as the training pre-flight says it)
    message = _error(_sdcore("-m", "flux1-dev", "--ae", "ae", "--t5xxl", "t5xxl_fp16", "--clip-l", "t5xxl_fp16",
                             "--models-dir", str(comfy), "a", "-o", out))  # fmt: skip
    assert message == (
        f"--clip-l {comfy / 'text_encoders' / 't5xxl_fp16.safetensors'}: not a CLIP-L text encoder file (no tensor "
        "named like ...text_model.final_layer_norm.weight); it holds a T5-XXL text encoder alone: give it with "
        "--t5xxl to a model file that lacks it"
    )
    # a path that is not there: refused before the load, as before (then by click's path check)
    message = _error(_sdcore("-m", "flux1-dev", "--ae", "./ae.safetensors", "--models-dir", str(comfy), "a",
                             "-o", out))  # fmt: skip
    transformer = comfy / "diffusion_models" / "flux1-dev.safetensors"
    assert message == (  # with the parts the transformer-only file lacks and nobody gave: every problem at once
        "--vae ./ae.safetensors: no such file or folder (the VAE); "
        f"{transformer} has no CLIP-L text encoder, T5-XXL text encoder: pass --clip-l <file or folder> --t5xxl "
        "<file or folder>"
    )
    # those lacking parts alone: the same pre-flight line (train's), not the loader's later error (exit 1)
    message = _error(_sdcore("-m", "flux1-dev", "--t5xxl", "t5xxl_fp16", "--models-dir", str(comfy), "a", "-o", out))
    assert (
        message
        == f"{transformer} has no CLIP-L text encoder, VAE: pass --clip-l <file or folder> --vae <file or folder>"
    )


def test_an_ambiguous_part_name_lists_the_files(tmp_path):
    models = tmp_path / "models"
    first, second, third = models / "vae" / "ae.safetensors", models / "VAE" / "ae.pt", models / "vae" / "a" / "ae.pt"
    for path in (first, second, third):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    with pytest.raises(ConfigError) as info:
        resolve_part_name("vae", "ae", models)
    assert str(info.value) == (
        f"--vae 'ae' is ambiguous: 2 model files have that name ({first}, {second}); give the name with its "
        "subfolder and extension as listed there, or the file's path"
    )
    assert resolve_part_name("vae", "a/ae", models) == str(third)
    assert resolve_part_name("vae", "ae.safetensors", models) == str(first)
    resolved, problems = resolve_part_names({"vae": "ae.pt", "clip_l": None, "t5_tokenizer": "tok"}, models)
    assert resolved == {"vae": str(second), "t5_tokenizer": "tok"} and problems == []


def test_networks_in_linked_folders_are_found(tmp_path):
    """``<lora:x>`` in a linked subfolder of ``loras/`` (ComfyUI and A1111 follow such links; ``Path.rglob``
    before Python 3.13 does not), and in a linked LyCORIS folder beside it (all paths in one sorted list)."""
    from sdcore.generate.networks import PromptNetworkHandler
    from sdplugin_lora.apply import LoraHandler, LycoHandler

    shared = tmp_path / "elsewhere"
    (shared / "styles").mkdir(parents=True)
    lora = shared / "styles" / "ink.safetensors"
    lora.write_bytes(b"x")
    loras = tmp_path / "models" / "loras"
    loras.mkdir(parents=True)
    (loras / "linked").symlink_to(shared, target_is_directory=True)
    (loras / "loop").symlink_to(loras, target_is_directory=True)  # a link to an ancestor: not followed
    handler = PromptNetworkHandler(loras)
    assert handler.available() == [loras / "linked" / "styles" / "ink.safetensors"]
    assert handler.find("ink") == loras / "linked" / "styles" / "ink.safetensors"
    lyco_shared = tmp_path / "lyco"
    lyco_shared.mkdir()
    (lyco_shared / "loha.safetensors").write_bytes(b"x")
    (tmp_path / "models" / "LyCORIS").mkdir()
    (tmp_path / "models" / "LyCORIS" / "mine").symlink_to(lyco_shared, target_is_directory=True)
    for tag_handler in (LoraHandler(loras), LycoHandler(loras)):  # both tags search the LyCORIS folder
        assert tag_handler.available() == sorted(
            [
                loras / "linked" / "styles" / "ink.safetensors",
                tmp_path / "models" / "LyCORIS" / "mine" / "loha.safetensors",
            ]
        )


def test_lora_dir_dot_finds_the_lycoris_folder_beside_it_not_inside(tmp_path, monkeypatch):
    """``--lora-dir .`` run in ``models/Lora`` (the README's form): the LyCORIS folder searched is
    ``models/LyCORIS``, beside it, as for ``--lora-dir models/Lora``; ``Path(".").parent`` is ``.``, which would
    have searched ``./LyCORIS`` (already inside the LoRA folder) and missed ``models/LyCORIS``."""
    from sdplugin_lora.apply import LoraHandler

    models = tmp_path / "models"
    (models / "Lora" / "LyCORIS").mkdir(parents=True)
    (models / "LyCORIS").mkdir()
    (models / "LyCORIS" / "beside.safetensors").write_bytes(b"x")
    (models / "Lora" / "LyCORIS" / "inside.safetensors").write_bytes(b"x")
    monkeypatch.chdir(models / "Lora")
    handler = LoraHandler(".")
    assert handler.search_folders() == [Path("."), models / "LyCORIS"]
    assert handler.available() == sorted(
        [Path("LyCORIS/inside.safetensors"), models / "LyCORIS" / "beside.safetensors"]
    )
    monkeypatch.chdir(tmp_path)
    assert LoraHandler("models/Lora").search_folders() == [Path("models/Lora"), Path("models/LyCORIS")]


def test_network_listing_of_a_plain_tree_is_kept(tmp_path):
    """Following links changed nothing for a tree without them: each folder's files in path order (of two hard
    links to one file the first of that order is the candidate, as before), extensions in any case, a file named
    only ``.pt`` no network (it has no extension for ComfyUI's and A1111's listings either), states left out."""
    import os

    from sdcore.generate.networks import PromptNetworkHandler

    loras, more = tmp_path / "loras", tmp_path / "more"
    files = [loras / "a" / "x.safetensors", loras / "b" / "Y.SAFETENSORS", loras / ".pt", loras / "z.txt",
             loras / "state" / "trainable.safetensors", more / "w.pt"]  # fmt: skip
    for path in files:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    (loras / "state" / "train_state.json").write_text("{}")
    os.link(loras / "a" / "x.safetensors", loras / "top.safetensors")  # after a/x.safetensors in path order
    handler = PromptNetworkHandler(loras)
    handler.more_directories = (more,)
    assert handler.available() == [loras / "a" / "x.safetensors", loras / "b" / "Y.SAFETENSORS", more / "w.pt"]
    assert handler.find("x") == loras / "a" / "x.safetensors"


def test_vae_folders_that_are_one_folder_are_searched_once(tmp_path):
    """On a disk that ignores case (Windows, macOS) ``models/vae`` and ``models/VAE`` are one folder: searched
    once, named once in the "not found" line, its files no "ambiguous" pair. A link stands in for that here."""
    models = tmp_path / "models"
    (models / "vae").mkdir(parents=True)
    (models / "vae" / "ae.safetensors").write_bytes(b"x")
    (models / "VAE").symlink_to(models / "vae", target_is_directory=True)
    assert part_folders("vae", models) == [models / "vae"]
    assert resolve_part_name("vae", "ae", models) == str(models / "vae" / "ae.safetensors")
    with pytest.raises(ConfigError) as info:
        resolve_part_name("vae", "sdxl_vae", models)
    assert str(info.value) == (
        f"--vae sdxl_vae: no such file or folder (the VAE), nor a file of that name in {models / 'vae'} and their "
        "subfolders; models there: ae.safetensors"
    )


def test_an_empty_part_option_is_not_given(comfy, tmp_path, monkeypatch):
    """``--ae ""`` (a script's unset variable) is no part, as train's ``given_parts`` and kohya's ``if args.vae``
    take an empty value, not the current folder read as a VAE folder."""
    asked = stop_at_load(monkeypatch)
    args = ["-m", "flux1-dev", "--t5xxl", "t5xxl_fp16", "--clip-l", "clip_l", "--models-dir", str(comfy), "a ring"]
    result = _sdcore(*args, "--ae", "", "-o", str(tmp_path / "o.png"))
    # not given: the transformer-only file then lacks its VAE (said before loading), not "--vae .: not a VAE"
    transformer = comfy / "diffusion_models" / "flux1-dev.safetensors"
    assert _error(result) == f"{transformer} has no VAE: pass --vae <file or folder>"
    assert asked == []
    # a checkpoint with its own VAE: --ae "" leaves it to that one (the part keywords name no VAE)
    from sdcore.models.load import load_model

    full = load_model("tiny:flux").save(tmp_path / "flux1-full.safetensors")
    result = _sdcore("-m", str(full), "--ae", "", "--models-dir", str(comfy), "a ring", "-o", str(tmp_path / "o.png"))
    assert isinstance(result.exception, StoppedAtLoad), result.output
    assert asked == [(str(full), {})]
