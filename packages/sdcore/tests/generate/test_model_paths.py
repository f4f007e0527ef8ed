"""``--model NAME`` from the models folder (ComfyUI's ``ckpt_name``, A1111's ``Stable-diffusion``) and ComfyUI's
``extra_model_paths.yaml`` (the root's and ``--extra-model-paths``) for checkpoints, LoRAs and embeddings."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cli_errors import one_error_line
from click.testing import CliRunner
from PIL import Image
from sdcore.builtin import generate_command
from sdcore.errors import ConfigError
from sdcore.generate.model_paths import (
    ExtraFolder,
    ExtraModelPaths,
    load_extra_model_paths,
    model_folders,
    read_extra_model_paths,
    resolve_model_name,
)

# ComfyUI's extra_model_paths.yaml.example, its a111 section (multi-line values as `|` blocks), with a base_path
# relative to the file's folder
A111_SECTION = """\
#config for a1111 ui
#all you have to do is change the base_path to where yours is installed
a111:
    base_path: ../stable-diffusion-webui/

    checkpoints: models/Stable-diffusion
    configs: models/Stable-diffusion
    vae: models/VAE
    loras: |
         models/Lora
         models/LyCORIS
    upscale_models: |
                  models/ESRGAN
                  models/RealESRGAN
                  models/SwinIR
    embeddings: embeddings
    hypernetworks: models/hypernetworks
    controlnet: models/ControlNet

#comfyui:
#     base_path: path/to/comfyui/
#     checkpoints: models/checkpoints/
"""


def _pm():
    import sdplugin_hn.plugin
    import sdplugin_lora.plugin
    import sdplugin_ti.plugin
    from sdcore.plugins import get_plugin_manager

    extra = [sdplugin_lora.plugin, sdplugin_hn.plugin, sdplugin_ti.plugin]
    return get_plugin_manager(entrypoints=False, extra=extra)


def _sdcore(*args: str):
    from sdcore.cli import build_cli

    return CliRunner().invoke(build_cli(_pm()), ["generate", *args])


_error = one_error_line  # exit 2, one Error: line, no traceback


@pytest.fixture
def no_load(monkeypatch):
    monkeypatch.setattr(generate_command, "_load_bundle", lambda *a, **k: pytest.fail("the model must not load"))


@pytest.fixture(scope="module")
def comfy(tmp_path_factory, tiny_bundles):
    """A ComfyUI tree whose ``checkpoints/sub/x.safetensors`` is a tiny SD1 model saved as one file."""
    from sdcore.models.save import write_single_file

    root = tmp_path_factory.mktemp("tree") / "ComfyUI"
    path = root / "models" / "checkpoints" / "sub" / "x.safetensors"
    path.parent.mkdir(parents=True)
    write_single_file(tiny_bundles("sd1"), path)
    return root


def _loads(monkeypatch) -> list[str]:
    """The sources ``sdcore generate`` loads (through the real loader)."""
    loaded: list[str] = []
    load = generate_command._load_bundle

    def spy(source, pm, **parts):
        loaded.append(source)
        return load(source, pm, **parts)

    monkeypatch.setattr(generate_command, "_load_bundle", spy)
    return loaded


@pytest.mark.parametrize("name", ["sub/x", "x.safetensors"])
def test_a_checkpoint_name_loads_the_file_below_models_checkpoints(comfy, tmp_path, monkeypatch, name):
    loaded = _loads(monkeypatch)
    out = tmp_path / "o.png"
    result = _sdcore("-m", name, "--models-dir", str(comfy / "models"), "a cat", "--steps", "1", "--size", "32x32",
                     "--device", "cpu", "-o", str(out))  # fmt: skip
    assert result.exit_code == 0, result.output
    assert loaded == [str(comfy / "models" / "checkpoints" / "sub" / "x.safetensors")]
    assert ", Model: x," in Image.open(out).info["parameters"]  # A1111's Model field: the file's stem


def test_every_spelling_of_a_name_and_its_precedence(comfy, tmp_path, monkeypatch):
    models = comfy / "models"
    x = str(models / "checkpoints" / "sub" / "x.safetensors")
    for name in ("sub/x.safetensors", "sub/x", "x.safetensors", "x", "sub\\x"):
        assert resolve_model_name(name, models) == x, name
    # sources that are no names stay as given: another scheme, a path
    for text in ("tiny:sd1", "toyworld:", "/nowhere/x.safetensors", "./x.safetensors", "~/x"):
        assert resolve_model_name(text, models) == text
    # an existing path wins over a name
    monkeypatch.chdir(tmp_path)
    Path("x.safetensors").write_bytes(b"a file here")
    assert resolve_model_name("x.safetensors", models) == "x.safetensors"
    assert model_folders(models) == [models / "checkpoints", models / "Stable-diffusion", models / "unet",
                                     models / "diffusion_models"]  # fmt: skip


def _hub_cache(tmp_path: Path, monkeypatch, repo_id: str) -> None:
    """A Hugging Face cache (its real layout, read by huggingface_hub) holding ``repo_id``."""
    import huggingface_hub.constants as hf_constants

    cache = tmp_path / "hub"
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "snapshots" / revision).mkdir(parents=True)
    (repo / "snapshots" / revision / "model_index.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))


def test_a_hub_id_in_the_cache_wins_over_a_file_of_that_name_and_says_so(tmp_path, monkeypatch):
    models = tmp_path / "models"
    local = models / "checkpoints" / "org" / "model.safetensors"
    local.parent.mkdir(parents=True)
    local.write_bytes(b"local")
    # not in the Hub cache: the file below checkpoints/ (ComfyUI's ckpt_name without its extension)
    _hub_cache(tmp_path, monkeypatch, "someone/else")
    notes: list[str] = []
    assert resolve_model_name("org/model", models, notes=notes) == str(local)
    assert notes == []
    # in the cache: the Hub id, as before model names existed, and a line saying which one was taken
    _hub_cache(tmp_path, monkeypatch, "org/model")
    assert resolve_model_name("org/model", models, notes=notes) == "org/model"
    assert notes == [
        f"--model org/model: the Hugging Face Hub repo in the cache, not {local} below --models-dir (give that "
        "file's name with its extension, or its path, to load it)"
    ]
    assert resolve_model_name("org/model.safetensors", models) == str(local)  # the file, by its full name


def test_a_mistyped_name_of_a_hub_ids_form_is_refused_with_the_close_names(comfy, tmp_path, monkeypatch, no_load):
    """``sub/y`` has a Hub id's form: in neither the cache nor the model folders it is one error before the
    load, naming both places and the close names (before model names, the load said only "not in the cache")."""
    _hub_cache(tmp_path, monkeypatch, "someone/else")
    monkeypatch.chdir(tmp_path)
    models = comfy / "models"
    folders = ", ".join(
        str(models / name) for name in ("checkpoints", "Stable-diffusion", "unet", "diffusion_models", "diffusers")
    )
    message = _error(_sdcore("-m", "sub/y", "--models-dir", str(models), "a", "-o", "o.png"))
    assert message == (
        "sub/y: not a local file or folder, and not in the Hugging Face cache (sdcore never downloads: fetch it "
        "first with `hf download sub/y`, or give the path of a model file or folder); nor is it a model name in "
        f"{folders} and their subfolders; close names: sub/x"
    )


def test_ambiguous_names_are_refused_with_the_candidates(tmp_path, no_load):
    models = tmp_path / "models"
    first = models / "checkpoints" / "a" / "x.safetensors"
    pickle = models / "checkpoints" / "a" / "x.ckpt"
    top = models / "Stable-diffusion" / "x.safetensors"
    y1 = models / "checkpoints" / "b" / "y.safetensors"
    y2 = models / "Stable-diffusion" / "c" / "y.safetensors"
    for path in (first, pickle, top, y1, y2):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(str(path).encode())
    # a name with its subfolder and extension is ComfyUI's ckpt_name: one file; a name as a relative path without
    # its extension comes before a file name found in a subfolder
    assert resolve_model_name("a/x.safetensors", models) == str(first)
    assert resolve_model_name("x.safetensors", models) == str(top)
    assert resolve_model_name("x", models) == str(top)
    assert resolve_model_name("x.ckpt", models) == str(pickle)
    with pytest.raises(ConfigError) as info:
        resolve_model_name("a/x", models)  # two extensions
    assert str(info.value) == (
        f"--model 'a/x' is ambiguous: 2 model files have that name ({pickle}, {first}); give the "
        "name with its subfolder and extension as listed there, or the file's path"
    )
    # the same refusal from the command, before the model loads: a file name in two subfolders
    message = _error(_sdcore("-m", "y", "--models-dir", str(models), "a cat", "-o", str(tmp_path / "o.png")))
    assert message == (
        f"--model 'y' is ambiguous: 2 model files have that name ({y1}, {y2}); "
        "give the name with its subfolder and extension as listed there, or the file's path"
    )


def test_a_missing_name_is_refused_before_loading_with_the_folders_searched(comfy, tmp_path, no_load, monkeypatch):
    monkeypatch.chdir(tmp_path)
    models = comfy / "models"
    folders = ", ".join(
        str(models / name) for name in ("checkpoints", "Stable-diffusion", "unet", "diffusion_models", "diffusers")
    )
    message = _error(_sdcore("-m", "sub/y.safetensors", "--models-dir", str(models), "a", "-o", "o.png"))
    assert message == (
        "sub/y.safetensors: no such model file or folder (the folder sub does not exist either); nor is it a model "
        f"name in {folders} and their subfolders; close names: sub/x.safetensors"
    )
    message = _error(_sdcore("-m", "zzz", "--models-dir", str(models), "a", "-o", "o.png"))
    assert message == (
        f"zzz: no such model file or folder; nor is it a model name in {folders} and their subfolders; "
        "models there: sub/x.safetensors"
    )
    empty = tmp_path / "nothing"
    message = _error(_sdcore("-m", "zzz", "--models-dir", str(empty), "a", "-o", "o.png"))
    assert message.endswith(
        "(none of which exists: point --models-dir at A1111's or ComfyUI's models folder) and their subfolders"
    )


def test_the_a111_example_section_is_read_as_comfyui_reads_it(tmp_path, monkeypatch):
    comfy = tmp_path / "ComfyUI"
    comfy.mkdir()
    yaml_file = comfy / "extra_model_paths.yaml"
    yaml_file.write_text(A111_SECTION)
    webui = tmp_path / "stable-diffusion-webui"
    folders = read_extra_model_paths(yaml_file)
    expected = [
        ("checkpoints", "models/Stable-diffusion"),
        ("configs", "models/Stable-diffusion"),
        ("vae", "models/VAE"),
        ("loras", "models/Lora"),
        ("loras", "models/LyCORIS"),
        ("upscale_models", "models/ESRGAN"),
        ("upscale_models", "models/RealESRGAN"),
        ("upscale_models", "models/SwinIR"),
        ("embeddings", "embeddings"),
        ("hypernetworks", "models/hypernetworks"),
        ("controlnet", "models/ControlNet"),
    ]
    assert folders == [ExtraFolder(kind, webui / sub, False, yaml_file) for kind, sub in expected]
    # no base_path: relative folders are relative to the file's folder; ~ and $VARS in base_path are expanded;
    # legacy keys are ComfyUI's current names
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SHARED", str(tmp_path / "shared"))
    other = tmp_path / "conf" / "paths.yaml"
    other.parent.mkdir()
    other.write_text(
        "plain:\n  loras: ../loras\n  unet: /abs/unet\nhome:\n  base_path: ~/models\n  clip: clip\n"
        "vars:\n  base_path: $SHARED\n  embeddings: emb\n  is_default: true\nempty:\n"
    )
    assert [(f.kind, f.path, f.is_default) for f in read_extra_model_paths(other)] == [
        ("loras", tmp_path / "loras", False),
        ("diffusion_models", Path("/abs/unet"), False),
        ("text_encoders", tmp_path / "home" / "models" / "clip", False),
        ("embeddings", tmp_path / "shared" / "emb", True),
    ]


def test_comfyui_order_is_default_sections_first_others_after():
    def folder(name: str, default: bool) -> ExtraFolder:
        return ExtraFolder("loras", Path(name), default, Path("f.yaml"))

    extra = ExtraModelPaths((folder("/a", False), folder("/b", True), folder("/c", True), folder("/d", False)))
    # each is_default folder is inserted first, as ComfyUI's add_model_folder_path(..., is_default=True) does
    assert extra.order("loras", [Path("/m/Lora"), Path("/m/loras")]) == [
        Path("/c"), Path("/b"), Path("/m/Lora"), Path("/m/loras"), Path("/a"), Path("/d")
    ]  # fmt: skip
    assert extra.order("embeddings", [Path("/m/embeddings")]) == [Path("/m/embeddings")]
    # a folder listed again is listed once; an is_default section moves it first (add_model_folder_path)
    again = ExtraModelPaths((folder("/m/Lora", False), folder("/m/loras", True), folder("/a", False),
                             folder("/a", False)))  # fmt: skip
    assert again.order("loras", [Path("/m/Lora"), Path("/m/loras")]) == [Path("/m/loras"), Path("/m/Lora"),
                                                                         Path("/a")]  # fmt: skip


def test_a_spec_with_only_a_comfy_folder_and_no_file_listing_it_has_no_folder(tmp_path):
    from types import SimpleNamespace

    from sdcore.generate.session import _default_folders

    spec = SimpleNamespace(default_subdir=None, root_subdir=None, more_subdirs=(), comfy_folder="style_models")
    assert _default_folders(spec, tmp_path / "models", ExtraModelPaths()) == ([], [])
    listed = ExtraModelPaths((ExtraFolder("style_models", tmp_path / "styles", False, tmp_path / "f.yaml"),))
    assert _default_folders(spec, tmp_path / "models", listed) == ([tmp_path / "styles"], [])


def _lora(bundle, path: Path) -> Path:
    """A tiny SD1 LoRA saved with the plugin's own writer (rank 2, nonzero up weights)."""
    from sdplugin_lora.format import network_metadata, save_lora
    from sdplugin_lora.naming import ModuleIndex
    from sdplugin_lora.network import LoraNetwork

    network = LoraNetwork.create(ModuleIndex.from_bundle(bundle).select(conv=False), rank=2, alpha=2.0)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in network:
            module.lora_up.weight.copy_(torch.randn(module.lora_up.weight.shape, generator=generator) * 0.5)
    return save_lora(path, network.state_dict(), network_metadata(family="sd1", rank=2, alpha=2.0))


def _a1111_install(tmp_path: Path, sd1) -> tuple[Path, Path, Path]:
    """An A1111 install beside a ComfyUI one: a LoRA in models/LyCORIS (the a111 section's second loras line),
    an embedding in the root's embeddings/, a checkpoint in models/Stable-diffusion."""
    from sdcore.models.save import write_single_file
    from sdplugin_ti.embedding import SINGLE, Embedding
    from sdplugin_ti.formats import save_embedding

    webui = tmp_path / "stable-diffusion-webui"
    lora = _lora(sd1, webui / "models" / "LyCORIS" / "mychar.safetensors")
    vectors = torch.randn(2, 32, generator=torch.Generator().manual_seed(1)) * 0.5
    embedding = save_embedding(Embedding("myemb", {SINGLE: vectors}), webui / "embeddings" / "myemb.pt")
    checkpoint = webui / "models" / "Stable-diffusion" / "base.safetensors"
    checkpoint.parent.mkdir(parents=True)
    write_single_file(sd1, checkpoint)
    (tmp_path / "ComfyUI" / "models").mkdir(parents=True)
    return lora, embedding, checkpoint


def test_the_root_yaml_finds_lora_embedding_and_checkpoint_of_an_a1111_install(tmp_path, sd1, monkeypatch):
    lora, embedding, checkpoint = _a1111_install(tmp_path, sd1)
    (tmp_path / "ComfyUI" / "extra_model_paths.yaml").write_text(A111_SECTION)
    models = tmp_path / "ComfyUI" / "models"
    extra = load_extra_model_paths(models)
    assert extra.files == (tmp_path / "ComfyUI" / "extra_model_paths.yaml",)
    assert resolve_model_name("base", models, extra) == str(checkpoint)
    from sdcore.generate.session import handlers_from_plugin_manager

    handlers = handlers_from_plugin_manager(_pm(), models_dir=models, extra_paths=extra)
    assert handlers["lora"].find("mychar") == lora
    embeddings = next(h for h in handlers[None] if h.directory_option == "embeddings_dir")
    assert embeddings.available() == [embedding]
    # the command: the checkpoint by name, the LoRA and the embedding applied (named in the infotext)
    loaded = _loads(monkeypatch)
    out = tmp_path / "o.png"
    result = _sdcore("-m", "base", "--models-dir", str(models), "a myemb <lora:mychar:0.7>", "--steps", "1",
                     "--size", "32x32", "--device", "cpu", "-o", str(out))  # fmt: skip
    assert result.exit_code == 0, result.output
    assert loaded == [str(checkpoint)]
    text = Image.open(out).info["parameters"]
    assert text.startswith("a myemb <lora:mychar:0.7>\n")
    assert 'Lora hashes: "mychar: ' in text and 'TI hashes: "myemb: ' in text


def test_extra_model_paths_option_and_a_bad_file(tmp_path, sd1, no_load):
    _a1111_install(tmp_path, sd1)
    elsewhere = tmp_path / "conf" / "shared.yaml"
    elsewhere.parent.mkdir()
    elsewhere.write_text(A111_SECTION)  # ../stable-diffusion-webui from conf/ is the same install
    models = tmp_path / "ComfyUI" / "models"
    # without the file: the LoRA is not found, and the message names the folders searched
    message = _error(_sdcore("-m", "tiny:sd1", "--models-dir", str(models), "<lora:mychar:1>", "-o",
                             str(tmp_path / "o.png")))  # fmt: skip
    assert message.startswith(f"lora 'mychar' not found in {models / 'Lora'} and its subfolders, which does not exist")
    # with it, the name resolves: the only problem left is the -o that exists
    (tmp_path / "o.png").write_bytes(b"")
    message = _error(_sdcore("-m", "tiny:sd1", "--models-dir", str(models), "--extra-model-paths", str(elsewhere),
                             "<lora:mychar:1>", "-o", str(tmp_path / "o.png")))  # fmt: skip
    assert message.startswith(f"{tmp_path / 'o.png'} already exists")
    bad = tmp_path / "conf" / "bad.yaml"
    bad.write_text("a111:\n  base_path: /x\n  loras: [models/Lora, models/LyCORIS]\n")
    message = _error(_sdcore("-m", "tiny:sd1", "--models-dir", str(models), "--extra-model-paths", str(bad),
                             "a", "-o", str(tmp_path / "p.png")))  # fmt: skip
    assert message == f"{bad}: a111.loras should be folder paths (one per line), got a list"
    bad.write_text("a111:\n  loras: models/Lora\n bad indent: x\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: not valid YAML at line 3"):
        read_extra_model_paths(bad)


def test_a_broken_root_yaml_is_a_warning_not_a_stop(tmp_path, sd1, no_load):
    """The root's file is read unasked: a run that worked without it still runs (the file left unread, said
    once); the same file given with --extra-model-paths is an error."""
    root_file = tmp_path / "ComfyUI" / "extra_model_paths.yaml"
    (tmp_path / "ComfyUI" / "models").mkdir(parents=True)
    root_file.write_text("a111:\n  loras: models/Lora\n bad indent: x\n")
    models = tmp_path / "ComfyUI" / "models"
    notes: list[str] = []
    assert load_extra_model_paths(models, notes=notes) == ExtraModelPaths()
    problem = f"{root_file}: not valid YAML at line 3 (expected <block end>, but found '<block mapping start>')"
    assert notes == [f"{problem}; that file (ComfyUI's, beside --models-dir) is left unread"]
    with pytest.raises(ConfigError, match="not valid YAML at line 3"):
        load_extra_model_paths(models)  # without notes to collect it: raised
    (tmp_path / "o.png").write_bytes(b"")  # the one problem of the run: the -o that exists
    result = _sdcore("-m", "tiny:sd1", "--models-dir", str(models), "a cat", "-o", str(tmp_path / "o.png"))
    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines()[0] == f"warning: {notes[0]}"
    assert result.stderr.splitlines()[1].startswith(f"Error: {tmp_path / 'o.png'} already exists")
    message = _error(_sdcore("-m", "tiny:sd1", "--models-dir", str(models), "--extra-model-paths", str(root_file),
                             "a cat", "-o", str(tmp_path / "p.png")))  # fmt: skip
    assert message == problem


def test_linked_folders_are_followed_as_comfyui_follows_them(tmp_path):
    """Two links to one folder give each file two names, both ComfyUI's (its get_full_path joins the name to
    the folder); one file through both links is one candidate, not an ambiguous name."""
    models = tmp_path / "models"
    shared = tmp_path / "shared"
    (shared / "deep").mkdir(parents=True)
    (shared / "deep" / "m.safetensors").write_bytes(b"m")
    (models / "checkpoints").mkdir(parents=True)
    for name in ("a", "b"):
        (models / "checkpoints" / name).symlink_to(shared, target_is_directory=True)
    b = str(models / "checkpoints" / "b" / "deep" / "m.safetensors")
    assert resolve_model_name("b/deep/m.safetensors", models) == b
    assert resolve_model_name("b/deep/m", models) == b
    assert resolve_model_name("m", models) == str(models / "checkpoints" / "a" / "deep" / "m.safetensors")


def test_a_link_loop_ends(tmp_path):
    """Links back up to an ancestor are not followed: two of them in one folder would make an unguarded walk
    branch twice at each of the ~40 levels the OS allows (never ending); here it ends at once."""
    import threading

    from sdcore.generate.model_paths import list_model_files

    checkpoints = tmp_path / "models" / "checkpoints"
    (checkpoints / "deep").mkdir(parents=True)
    (checkpoints / "deep" / "m.safetensors").write_bytes(b"m")
    (checkpoints / "deep" / "up").symlink_to(checkpoints, target_is_directory=True)
    (checkpoints / "deep" / "up2").symlink_to(checkpoints / "deep", target_is_directory=True)
    found: list = []
    walk = threading.Thread(target=lambda: found.extend(list_model_files([checkpoints])), daemon=True)
    walk.start()
    walk.join(timeout=30)
    assert not walk.is_alive(), "the walk followed the link loop"
    assert found == [(checkpoints / "deep" / "m.safetensors", "deep/m.safetensors")]
    assert resolve_model_name("m", tmp_path / "models") == str(checkpoints / "deep" / "m.safetensors")


# --- ComfyUI's diffusers/ folder (its DiffusersLoader node) ------------------------------------------------------


def _diffusers_model(folder: Path) -> Path:
    """A folder that ComfyUI's DiffusersLoader lists: it holds a model_index.json (nothing else is read here)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    return folder


def test_comfyuis_diffusers_folders_are_models_by_their_relative_path(tmp_path):
    from sdcore.generate.model_paths import diffusers_folders, list_diffusers_models

    models = tmp_path / "models"
    base = _diffusers_model(models / "diffusers" / "sdxl" / "base")
    sd15 = _diffusers_model(models / "diffusers" / "sd15")
    (models / "diffusers" / "sdxl" / "base" / "unet").mkdir()  # a model's own subfolders are no models
    (models / "diffusers" / "plain" / "unet").mkdir(parents=True)  # no model_index.json: no model
    assert diffusers_folders(models) == [models / "diffusers"]
    # ComfyUI's list: every folder holding model_index.json, named relative to diffusers/
    assert list_diffusers_models([models / "diffusers"]) == [(sd15, "sd15"), (base, "sdxl/base")]
    for name in ("sdxl/base", "base", "sdxl\\base", "sdxl/../sdxl/base"):
        assert resolve_model_name(name, models) == str(base), name
    assert resolve_model_name("sd15", models) == str(sd15)
    folders = ", ".join(
        str(models / name) for name in ("checkpoints", "Stable-diffusion", "unet", "diffusion_models", "diffusers")
    )
    with pytest.raises(ConfigError) as info:
        resolve_model_name("plain", models)
    assert str(info.value) == (
        f"plain: no such model file or folder; nor is it a model name in {folders} and their subfolders; "
        "models there: sd15, sdxl/base"
    )
    with pytest.raises(ConfigError) as info:
        resolve_model_name("sdxl/bsae", models)
    assert str(info.value).endswith("their subfolders; close names: sdxl/base")


def test_listing_diffusers_does_not_walk_into_a_model(tmp_path, monkeypatch):
    """A models folder of big diffusers models: each model's folder is listed (to find its model_index.json), none
    of its subfolders (unet/, text_encoder/, ...: they hold no other model); a search folder without one is walked
    to any depth."""
    import os

    from sdcore.generate.model_paths import list_diffusers_models

    root = tmp_path / "models" / "diffusers"
    base = _diffusers_model(root / "sdxl" / "base")
    for part in ("unet", "text_encoder", "vae/deep"):
        (base / part).mkdir(parents=True)
    _diffusers_model(base / "unet" / "inner")  # a model inside a model's folder: not looked for
    deep = _diffusers_model(root / "a" / "b" / "c" / "deep")
    listed: list[str] = []
    scandir = os.scandir
    monkeypatch.setattr(os, "scandir", lambda path=".": listed.append(os.fspath(path)) or scandir(path))
    assert list_diffusers_models([root]) == [(deep, "a/b/c/deep"), (base, "sdxl/base")]
    assert sorted(Path(path).relative_to(root).as_posix() for path in listed) == [
        ".",
        "a",
        "a/b",
        "a/b/c",
        "a/b/c/deep",
        "sdxl",
        "sdxl/base",
    ]


def test_a_diffusers_name_in_two_search_folders_is_the_first_ones(tmp_path):
    """ComfyUI's DiffusersLoader loads ``model_path`` from the first diffusers folder that has it (models/diffusers,
    then an extra_model_paths.yaml's): the same relative path in two is no ambiguity."""
    models = tmp_path / "models"
    first = _diffusers_model(models / "diffusers" / "sdxl" / "base")
    _diffusers_model(tmp_path / "shared" / "my-diffusers" / "sdxl" / "base")
    config = tmp_path / "extra.yaml"
    config.write_text(f"comfyui:\n  base_path: {tmp_path / 'shared'}\n  diffusers: my-diffusers\n")
    extra = load_extra_model_paths(models, [config])
    assert resolve_model_name("sdxl/base", models, extra) == str(first)
    with pytest.raises(ConfigError, match=r"--model 'base' is ambiguous: 2 model files have that name"):
        resolve_model_name("base", models, extra)  # the last folder name alone: either of the two


def test_a_cached_hub_id_wins_over_a_diffusers_folder_of_its_name(tmp_path, monkeypatch):
    """``org/name`` in the Hub cache stays the Hub id (as before names existed), with a note naming the folder and
    how to reach it (its path: a folder's name has no extension to add); an existing path wins over a name."""
    models = tmp_path / "models"
    folder = _diffusers_model(models / "diffusers" / "someone" / "model")
    _hub_cache(tmp_path, monkeypatch, "someone/model")
    notes: list[str] = []
    assert resolve_model_name("someone/model", models, notes=notes) == "someone/model"
    assert notes == [
        f"--model someone/model: the Hugging Face Hub repo in the cache, not {folder} below --models-dir (give its "
        "path to load it)"
    ]
    assert resolve_model_name("model", models) == str(folder)  # its last name alone is no Hub id
    monkeypatch.chdir(tmp_path)  # a folder of that relative path here (no Hub id): this one, not diffusers/'s
    _diffusers_model(tmp_path / "sd15" / "tiny")
    _diffusers_model(models / "diffusers" / "sd15" / "tiny")
    assert resolve_model_name("sd15/tiny", models) == "sd15/tiny"
    assert resolve_model_name("tiny", models) == str(models / "diffusers" / "sd15" / "tiny")


def test_a_diffusers_folder_and_a_file_of_one_name_are_ambiguous_as_two_files(tmp_path):
    models = tmp_path / "models"
    base = _diffusers_model(models / "diffusers" / "sdxl" / "base")
    file = models / "checkpoints" / "sdxl" / "base.safetensors"
    file.parent.mkdir(parents=True)
    file.write_bytes(b"x")
    with pytest.raises(ConfigError) as info:
        resolve_model_name("sdxl/base", models)
    assert str(info.value) == (
        f"--model 'sdxl/base' is ambiguous: 2 model files have that name ({file}, {base}); give the name with its "
        "subfolder and extension as listed there, or the file's path (a diffusers folder's name has no extension)"
    )
    assert resolve_model_name("sdxl/base.safetensors", models) == str(file)  # the file's whole name is its own
    other = _diffusers_model(models / "diffusers" / "old" / "base")  # two folders named base: the full name picks
    file.unlink()
    with pytest.raises(ConfigError, match=r"--model 'base' is ambiguous: 2 model files have that name"):
        resolve_model_name("base", models)
    assert resolve_model_name("old/base", models) == str(other)
    # a checkpoint named by its relative path comes before a folder found by its last name (as a file's)
    top = models / "checkpoints" / "base.safetensors"
    top.write_bytes(b"y")
    assert resolve_model_name("base", models) == str(top)


def test_extra_model_paths_diffusers_folders_and_bare_hashes_skip_folders(tmp_path):
    models = tmp_path / "models"
    (models / "diffusers").mkdir(parents=True)
    shared = _diffusers_model(tmp_path / "shared" / "my-diffusers" / "juggernaut")
    config = tmp_path / "extra.yaml"
    config.write_text(f"comfyui:\n  base_path: {tmp_path / 'shared'}\n  diffusers: my-diffusers\n")
    extra = load_extra_model_paths(models, [config])
    assert resolve_model_name("juggernaut", models, extra) == str(shared)
    with pytest.raises(ConfigError, match="nor is it a model name"):  # a folder has no A1111 hash: not read
        resolve_model_name("0123456789", models, extra)


def test_generate_loads_a_diffusers_folder_by_its_name(tmp_path, monkeypatch, tiny_bundles):
    models = tmp_path / "models"
    folder = models / "diffusers" / "sd15" / "tiny"
    tiny_bundles("sd1").save(folder, format="diffusers")
    loaded = _loads(monkeypatch)
    result = _sdcore("-m", "tiny", "--models-dir", str(models), "a cat", "--steps", "1", "--size", "32x32",
                     "--device", "cpu", "-o", str(tmp_path / "o.png"))  # fmt: skip
    assert result.exit_code == 0, result.output
    assert loaded == [str(folder)]


def _comfy_graph_png(path: Path, ckpt_name: str) -> Path:
    """A PNG as ComfyUI's SaveImage writes it (tEXt ``prompt``: the API graph) of its default txt2img workflow."""
    import json

    from PIL.PngImagePlugin import PngInfo

    sampler = {"seed": 5, "steps": 1, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}
    graph = {
        "3": {"class_type": "KSampler", "inputs": {**sampler, "model": ["4", 0], "positive": ["6", 0],
                                                   "negative": ["7", 0], "latent_image": ["5", 0]}},
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 32, "height": 32, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}},
    }  # fmt: skip
    info = PngInfo()
    info.add_text("prompt", json.dumps(graph))
    Image.new("RGB", (32, 32)).save(path, pnginfo=info)
    return path


def test_a_comfy_graphs_ckpt_name_is_said_found_and_not_found_as_the_pngs(comfy, tmp_path, monkeypatch):
    """``--from-png`` of a ComfyUI image without ``--model``: the file its ckpt_name finds is said on one line, as
    an infotext's model is; a ckpt_name no file has is an error saying it is the graph's and to pass --model (the
    user never typed that name), also where there is no models folder at all."""
    loaded = _loads(monkeypatch)
    models = str(comfy / "models")
    out = tmp_path / "o.png"
    png = _comfy_graph_png(tmp_path / "comfy.png", "sub/x.safetensors")
    result = _sdcore("--from-png", str(png), "--models-dir", models, "--device", "cpu", "-o", str(out))
    assert result.exit_code == 0, result.output
    found = comfy / "models" / "checkpoints" / "sub" / "x.safetensors"
    assert loaded == [str(found)]
    # one line: the saved tiny SD1 samples euler on diffusers' linspace timesteps, ComfyUI's "normal" schedule
    assert result.stderr.splitlines() == [f"model from the PNG: {found} (the graph's ckpt_name sub/x.safetensors)"]

    monkeypatch.setattr(generate_command, "_load_bundle", lambda *a, **k: pytest.fail("the model must not load"))
    missing = _comfy_graph_png(tmp_path / "missing.png", "sdxl/gone.safetensors")
    message = _error(_sdcore("--from-png", str(missing), "--models-dir", models, "-o", str(out), "--overwrite"))
    assert message.startswith(
        "--from-png: the model the PNG's graph loads (ckpt_name sdxl/gone.safetensors): sdxl/gone.safetensors: no "
        "such model file or folder"
    )
    assert message.endswith("close names: sub/x.safetensors; pass --model (the file's path or name) to choose one")
    monkeypatch.chdir(tmp_path)  # no models/ here and no --models-dir
    message = _error(_sdcore("--from-png", str(missing), "-o", str(out), "--overwrite"))
    assert message == (
        "--from-png: the model the PNG's graph loads (ckpt_name sdxl/gone.safetensors) is looked for below "
        "--models-dir, and there is no models/ here; pass --models-dir or --model"
    )
