"""``generate --from-png`` without ``--model``: the checkpoint the PNG's "Model hash"/"Model" name, found below the
model folders; A1111 checkpoint titles and hashes as ``--model`` (``sd_models.get_closet_checkpoint_match``)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from cli_errors import one_error_line
from click.testing import CliRunner
from PIL import Image
from sdcore.builtin import generate_command
from sdcore.generate import model_paths
from sdcore.generate.model_paths import find_png_model, model_folders, resolve_model_name, split_a1111_title
from sdcore.generate.pnginfo import save_png
from sdcore.models.hashes import legacy_hash


@pytest.fixture(autouse=True)
def own_hash_cache(tmp_path, monkeypatch):
    """Each test its own hash cache (tokenizers still come from the shared cache: only sha256.json moves)."""
    from sdcore.models import hashes

    monkeypatch.setattr(hashes, "_hash_cache_path", lambda: tmp_path / "hash-cache" / "sha256.json")
    monkeypatch.setattr(hashes, "_SHA256_CACHE", {})


@pytest.fixture(scope="module")
def webui(tmp_path_factory, tiny_bundles):
    """An A1111 tree: ``models/Stable-diffusion/sub/base.safetensors`` a tiny SD1 checkpoint, and a decoy file of
    another name's bytes, ``other/renamed.safetensors``."""
    from sdcore.models.save import write_single_file

    root = tmp_path_factory.mktemp("a1111") / "webui"
    base = root / "models" / "Stable-diffusion" / "sub" / "base.safetensors"
    base.parent.mkdir(parents=True)
    write_single_file(tiny_bundles("sd1"), base)
    decoy = root / "models" / "Stable-diffusion" / "other" / "renamed.safetensors"
    decoy.parent.mkdir(parents=True)
    decoy.write_bytes(bytes(range(256)) * 5000)
    return root


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _png(tmp_path: Path, fields: str) -> Path:
    png = tmp_path / "in.png"
    save_png(
        Image.new("RGB", (8, 8)), png, f"a cat\nSteps: 1, Sampler: Euler, CFG scale: 6, Seed: 3, Size: 32x32{fields}"
    )
    return png


def _sdcore(*args: str):
    from sdcore.cli import build_cli
    from sdcore.plugins import get_plugin_manager

    return CliRunner().invoke(build_cli(get_plugin_manager(entrypoints=False)), ["generate", *args])


class _Stop(Exception):
    pass


@pytest.fixture
def loads(monkeypatch) -> list[str]:
    """The source ``generate`` would load; it stops there (the choice is what these tests read)."""
    loaded: list[str] = []

    def spy(source, pm, **parts):
        loaded.append(source)
        raise _Stop

    monkeypatch.setattr(generate_command, "_load_bundle", spy)
    return loaded


def test_the_pngs_model_hash_and_name_pick_the_checkpoint_and_the_image_is_made(webui, tmp_path):
    base = webui / "models" / "Stable-diffusion" / "sub" / "base.safetensors"
    short = _sha(base)[:10]
    out = tmp_path / "o.png"
    png = _png(tmp_path, f", Model hash: {short}, Model: base")
    result = _sdcore("--from-png", str(png), "--models-dir", str(webui / "models"), "--device", "cpu", "-o", str(out))
    assert result.exit_code == 0, result.output
    assert f"model from the PNG: sub/base.safetensors ({short})" in result.stderr.splitlines()
    assert result.stdout.splitlines() == [str(out)]
    assert f"Model hash: {short}, Model: base," in Image.open(out).info["parameters"]


def test_by_hash_when_the_name_is_another_files(webui, tmp_path, loads, monkeypatch):
    """A1111 writes the file's stem; a renamed file is found by its hash (the file of that name, with other
    bytes, is not taken), and a scan over many bytes says so first."""
    base = webui / "models" / "Stable-diffusion" / "sub" / "base.safetensors"
    decoy = webui / "models" / "Stable-diffusion" / "other" / "renamed.safetensors"
    monkeypatch.setattr(model_paths, "SCAN_NOTICE_BYTES", 0)
    short = _sha(base)[:10]
    png = _png(tmp_path, f", Model hash: {short}, Model: renamed")
    result = _sdcore("--from-png", str(png), "--models-dir", str(webui / "models"), "-o", str(tmp_path / "o.png"))
    assert isinstance(result.exception, _Stop), result.output
    assert loads == [str(base)]
    size = base.stat().st_size / 2**30
    assert result.stderr.splitlines()[:2] == [
        f"hashing 1 model file ({size:.1f} GiB) to find model hash {short}; the hashes are cached, so this is once",
        f"model from the PNG: sub/base.safetensors ({short})",
    ]
    assert _sha(decoy)[:10] != short
    # the old 8-hex hash (A1111 before 1.0; 64 KiB at 1 MiB) finds it too, and so does the hash alone
    png = _png(tmp_path, f", Model hash: {legacy_hash(base)}")
    result = _sdcore("--from-png", str(png), "--models-dir", str(webui / "models"), "-o", str(tmp_path / "o.png"))
    assert loads[1:] == [str(base)], result.output
    assert f"model from the PNG: sub/base.safetensors ({legacy_hash(base)})" in result.stderr


def test_by_name_alone_when_the_png_has_no_hash(webui, tmp_path, loads):
    base = webui / "models" / "Stable-diffusion" / "sub" / "base.safetensors"
    for name in ("base", "sub/base", "sub/base.safetensors", "sub_base"):  # stem, ComfyUI's, A1111 < 1.6 model_name
        png = _png(tmp_path, f", Model: {name}")
        result = _sdcore("--from-png", str(png), "--models-dir", str(webui / "models"), "-o", str(tmp_path / "o.png"))
        assert isinstance(result.exception, _Stop), result.output
        assert loads[-1] == str(base)
        assert "model from the PNG: sub/base.safetensors (by its name: the PNG has no Model hash)" in result.stderr


def test_not_found_is_one_error_line_before_loading(webui, tmp_path, loads):
    models = webui / "models"
    folders = ", ".join(str(models / name) for name in ("checkpoints", "Stable-diffusion", "unet", "diffusion_models"))
    decoy = models / "Stable-diffusion" / "other" / "renamed.safetensors"
    png = _png(tmp_path, ", Model hash: 0123456789, Model: renamed")
    message = one_error_line(
        _sdcore("--from-png", str(png), "--models-dir", str(models), "-o", str(tmp_path / "o.png"))
    )
    assert message == (
        f"--from-png: no model file with the PNG's model hash 0123456789 and name 'renamed' in {folders} and their "
        f"subfolders; of that name, with another hash: other/renamed.safetensors ({_sha(decoy)[:10]}); pass --model "
        "(the file's path or name) to choose one"
    )
    png = _png(tmp_path, "")
    message = one_error_line(
        _sdcore("--from-png", str(png), "--models-dir", str(models), "-o", str(tmp_path / "o.png"))
    )
    assert message == "--from-png: the PNG names no model (no 'Model hash' nor 'Model' field); pass --model"
    assert loads == []


def test_model_stays_required_without_from_png_and_wins_with_it(webui, tmp_path, loads):
    result = _sdcore("a cat", "-o", str(tmp_path / "o.png"))
    assert result.exit_code == 2 and "Error: Missing option '-m' / '--model'." in result.output
    png = _png(tmp_path, ", Model hash: 0123456789, Model: nothing")
    result = _sdcore("--from-png", str(png), "-m", "tiny:sd1", "-o", str(tmp_path / "o.png"))
    assert isinstance(result.exception, _Stop) and loads == ["tiny:sd1"]
    assert "model from the PNG" not in result.stderr


def test_a_model_the_recall_names_is_resolved_as_model_is(webui, tmp_path, loads, monkeypatch):
    """Another reader of the PNG (ComfyUI's workflow) may put a model name into ``Recalled.values["model"]``: it
    is resolved by the --model rules, and the infotext's hash search is not run."""
    from sdcore.generate import recall

    real = recall.recall_png

    def with_model(path, **kwargs):
        recalled = real(path, **kwargs)
        recalled.values["model"] = "sub/base.safetensors"
        return recalled

    monkeypatch.setattr(recall, "recall_png", with_model)
    png = _png(tmp_path, ", Model hash: 0123456789")
    result = _sdcore("--from-png", str(png), "--models-dir", str(webui / "models"), "-o", str(tmp_path / "o.png"))
    assert isinstance(result.exception, _Stop), result.output
    assert loads == [str(webui / "models" / "Stable-diffusion" / "sub" / "base.safetensors")]


def test_a1111_titles_and_hashes_as_model(webui):
    models = webui / "models"
    base = models / "Stable-diffusion" / "sub" / "base.safetensors"
    short, legacy = _sha(base)[:10], legacy_hash(base)
    assert split_a1111_title(f"sub/base.safetensors [{short.upper()}]") == ("sub/base.safetensors", short)
    assert split_a1111_title("name [not hex]") == ("name [not hex]", None)
    for title in (f"sub/base.safetensors [{short}]", f"base [{short}]", f"sub/base.safetensors [{legacy}]"):
        notes: list[str] = []
        assert resolve_model_name(title, models, notes=notes) == str(base) and notes == [], title
    # another hash: A1111 strips it and takes the name (get_closet_checkpoint_match's last try): a warning line
    notes = []
    assert resolve_model_name("base [0123456789]", models, notes=notes) == str(base)
    assert notes == [
        f"--model base [0123456789]: {base} has hash {short}, not 0123456789; it is loaded by its name, as A1111 does"
    ]
    # a hash alone (A1111's checkpoint_aliases hold the legacy hash, the shorthash and the sha256)
    for text in (short, legacy, _sha(base)):
        assert resolve_model_name(text, models) == str(base), text
    with pytest.raises(Exception, match="0123456789: no such model file"):
        resolve_model_name("0123456789", models)


def test_find_png_model_ambiguous_name_without_hash(tmp_path):
    models = tmp_path / "models"
    for sub in ("a", "b"):
        (models / "checkpoints" / sub).mkdir(parents=True)
        (models / "checkpoints" / sub / "x.safetensors").write_bytes(sub.encode())
    with pytest.raises(Exception) as error:
        find_png_model("x", None, model_folders(models))
    a, b = (models / "checkpoints" / s / "x.safetensors" for s in ("a", "b"))
    assert str(error.value) == (
        f"--from-png: the PNG's model 'x' (no Model hash) is the name of 2 model files ({a}, {b}); pass --model "
        "with the one to use"
    )
    # with a hash, the one of those whose hash it is
    found, line = find_png_model("x", _sha(b)[:10], model_folders(models))
    assert found == b and line == f"model from the PNG: b/x.safetensors ({_sha(b)[:10]})"


def test_an_unreadable_file_of_the_pngs_name_is_said_in_the_error(tmp_path, monkeypatch):
    """The not-found message lists the files of the PNG's name with their hashes; one that cannot be read is
    said there, not raised as a traceback."""
    models = tmp_path / "models"
    (models / "checkpoints").mkdir(parents=True)
    (models / "checkpoints" / "x.safetensors").write_bytes(b"x")

    def unreadable(path, kind):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(model_paths, "hash_of", unreadable)
    with pytest.raises(Exception) as error:
        find_png_model("x", "0123456789", model_folders(models))
    assert "; of that name, with another hash: x.safetensors (unreadable: Permission denied); pass --model" in str(
        error.value
    )


# --- the PNG's VAE: A1111's "VAE hash: abcdef1234, VAE: name.safetensors" (sd_vae.get_loaded_vae_name/_hash) ---


def _save_vae(seed: int, path: Path) -> Path:
    from safetensors.torch import save_file
    from sdcore.models.tiny import create_tiny_bundle

    vae = create_tiny_bundle("sd1", seed=seed).vae
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def vae_webui(tmp_path_factory, tiny_bundles):
    """An A1111 ``models/``: a tiny SD1 ``Stable-diffusion/base.safetensors`` with its own VAE beside it
    (``base.vae.safetensors``, A1111's "found near the checkpoint"), and in ``VAE/`` two VAEs of other seeds and a
    decoy ``old-name.safetensors`` (not a VAE)."""
    from sdcore.models.save import write_single_file

    models = tmp_path_factory.mktemp("a1111-vae") / "webui" / "models"
    base = models / "Stable-diffusion" / "base.safetensors"
    base.parent.mkdir(parents=True)
    write_single_file(tiny_bundles("sd1"), base)
    _save_vae(7, models / "Stable-diffusion" / "base.vae.safetensors")
    _save_vae(5, models / "VAE" / "tiny-vae.safetensors")
    _save_vae(6, models / "VAE" / "other-vae.safetensors")
    (models / "VAE" / "old-name.safetensors").write_bytes(b"not a vae" * 100)
    return models


@pytest.fixture
def loads_parts(monkeypatch) -> list[tuple[str, object]]:
    """(source, vae) ``generate`` would load; it stops there."""
    loaded: list[tuple[str, object]] = []

    def spy(source, pm, **parts):
        loaded.append((source, parts.get("vae")))
        raise _Stop

    monkeypatch.setattr(generate_command, "_load_bundle", spy)
    return loaded


def _from_png(models: Path, tmp_path: Path, fields: str, *more: str):
    base = models / "Stable-diffusion" / "base.safetensors"
    png = _png(tmp_path, f", Model hash: {_sha(base)[:10]}, Model: base{fields}")
    return _sdcore("--from-png", str(png), "--models-dir", str(models), "-o", str(tmp_path / "o.png"), *more)


def test_the_pngs_vae_name_and_hash_pick_the_vae(vae_webui, tmp_path, loads_parts):
    vae = vae_webui / "VAE" / "tiny-vae.safetensors"
    short = _sha(vae)[:10]
    result = _from_png(vae_webui, tmp_path, f", VAE hash: {short}, VAE: tiny-vae.safetensors")
    assert isinstance(result.exception, _Stop), result.output
    assert loads_parts == [(str(vae_webui / "Stable-diffusion" / "base.safetensors"), str(vae))]
    assert f"VAE from the PNG: tiny-vae.safetensors ({short})" in result.stderr.splitlines()
    # the name alone (no "VAE hash"), with or without its extension
    for name in ("tiny-vae.safetensors", "tiny-vae"):
        result = _from_png(vae_webui, tmp_path, f", VAE: {name}")
        assert loads_parts[-1][1] == str(vae), result.output
        assert "VAE from the PNG: tiny-vae.safetensors (by its name: the PNG has no VAE hash)" in result.stderr


def test_the_pngs_vae_by_hash_under_another_name(vae_webui, tmp_path, loads_parts, monkeypatch):
    """A VAE renamed since: the file of the PNG's name has other bytes, the one with its hash is taken (the
    hash scan's notice says "VAE hash")."""
    monkeypatch.setattr(model_paths, "SCAN_NOTICE_BYTES", 0)
    vae = vae_webui / "VAE" / "other-vae.safetensors"
    short = _sha(vae)[:10]
    result = _from_png(vae_webui, tmp_path, f", VAE hash: {short}, VAE: old-name.safetensors")
    assert isinstance(result.exception, _Stop), result.output
    assert loads_parts[-1][1] == str(vae)
    lines = result.stderr.splitlines()
    assert lines[-1] == f"VAE from the PNG: other-vae.safetensors ({short})"
    assert lines[-2].startswith("hashing ") and lines[-2].endswith(
        f"to find VAE hash {short}; the hashes are cached, so this is once"
    )


def test_the_pngs_vae_not_found_is_a_warning_and_the_models_own_vae_decodes(vae_webui, tmp_path, loads_parts):
    decoy = vae_webui / "VAE" / "old-name.safetensors"
    result = _from_png(vae_webui, tmp_path, ", VAE hash: 0123456789, VAE: old-name.safetensors")
    assert isinstance(result.exception, _Stop), result.output
    assert loads_parts[-1][1] is None
    checkpoints = ", ".join(str(vae_webui / name) for name in ("checkpoints", "Stable-diffusion"))
    assert (
        f"warning: the PNG's VAE ('old-name.safetensors', hash 0123456789) is not in {vae_webui / 'vae'}, "
        f"{vae_webui / 'VAE'} and their subfolders, nor beside a checkpoint (NAME.vae.safetensors) in {checkpoints}; "
        f"of that name, with another hash: old-name.safetensors ({_sha(decoy)[:10]}); the model's own VAE decodes: "
        "pass --vae to choose one"
    ) in result.stderr.splitlines()
    # the name alone, found nowhere: said with the name only
    result = _from_png(vae_webui, tmp_path, ", VAE: gone.safetensors")
    assert loads_parts[-1][1] is None
    assert "warning: the PNG's VAE ('gone.safetensors') is not in " in result.stderr
    # no VAE field: nothing is looked for, nothing said
    result = _from_png(vae_webui, tmp_path, "")
    assert loads_parts[-1][1] is None and "VAE" not in result.stderr


def test_vae_given_with_another_vae_in_the_png_is_a_warning(vae_webui, tmp_path, loads_parts):
    mine, theirs = (vae_webui / "VAE" / f"{n}.safetensors" for n in ("other-vae", "tiny-vae"))
    result = _from_png(
        vae_webui, tmp_path, f", VAE hash: {_sha(theirs)[:10]}, VAE: tiny-vae.safetensors", "--vae", "other-vae"
    )
    assert isinstance(result.exception, _Stop), result.output
    assert loads_parts[-1][1] == str(mine)
    assert (
        f"warning: the PNG was made with VAE hash {_sha(theirs)[:10]} (tiny-vae.safetensors), --vae has "
        f"{_sha(mine)[:10]}"
    ) in result.stderr.splitlines()
    assert "VAE from the PNG" not in result.stderr
    # the same VAE: nothing said; no hash in the PNG: the names are compared
    result = _from_png(vae_webui, tmp_path, f", VAE hash: {_sha(mine)[:10]}, VAE: x.safetensors", "--vae", str(mine))
    assert loads_parts[-1][1] == str(mine) and "VAE" not in result.stderr
    result = _from_png(vae_webui, tmp_path, ", VAE: tiny-vae.safetensors", "--vae", str(mine))
    assert f"warning: the PNG was made with VAE tiny-vae.safetensors, --vae is {mine}" in result.stderr.splitlines()


def test_the_a1111_vae_beside_the_checkpoint_is_the_pngs_vae(vae_webui, tmp_path, loads_parts):
    """A1111 lists ``NAME.vae.safetensors`` of its checkpoint folder among its VAEs and, decoding with it ("found
    near the checkpoint"), writes its name and hash as any VAE's: the PNG's VAE is then that file."""
    sidecar = vae_webui / "Stable-diffusion" / "base.vae.safetensors"
    short = _sha(sidecar)[:10]
    result = _from_png(vae_webui, tmp_path, f", VAE hash: {short}, VAE: base.vae.safetensors")
    assert isinstance(result.exception, _Stop), result.output
    assert loads_parts[-1][1] == str(sidecar)
    assert f"VAE from the PNG: base.vae.safetensors ({short})" in result.stderr.splitlines()


def test_the_vae_fields_are_not_ignored_any_more():
    from sdcore.generate.pnginfo import parse_parameters
    from sdcore.generate.recall import recall_parameters

    text = "a cat\nSteps: 1, Sampler: Euler, Seed: 3, VAE hash: 0123456789, VAE: x.safetensors, ENSD: 31337"
    assert recall_parameters(parse_parameters(text)).ignored == ["ENSD: 31337"]


def test_the_pngs_vae_makes_the_image_that_vae_path_makes(vae_webui, tmp_path):
    """End to end: the image with the VAE the PNG names is the one ``--vae PATH`` makes, and not the model's own
    VAE's."""
    import numpy as np

    vae = vae_webui / "VAE" / "tiny-vae.safetensors"
    base = vae_webui / "Stable-diffusion" / "base.safetensors"
    model = f", Model hash: {_sha(base)[:10]}, Model: base"
    own = _png(tmp_path / "own", model)  # no VAE field: the model's own VAE
    png = _png(tmp_path, f"{model}, VAE hash: {_sha(vae)[:10]}, VAE: tiny-vae.safetensors")
    pixels = {}
    for label, source, more in (("png", png, []), ("path", png, ["--vae", str(vae)]), ("own", own, [])):
        out = tmp_path / f"{label}.png"
        args = ["--from-png", str(source), "--models-dir", str(vae_webui), "--device", "cpu", "-o", str(out), *more]
        result = _sdcore(*args)
        assert result.exit_code == 0, result.output
        pixels[label] = np.asarray(Image.open(out))
        if label == "png":
            ignored = [line for line in result.stderr.splitlines() if line.startswith("ignored from the PNG")]
            assert ignored and all("VAE" not in line for line in ignored), result.stderr
    assert np.array_equal(pixels["png"], pixels["path"])
    assert not np.array_equal(pixels["png"], pixels["own"])


def test_a_checkpoint_name_with_extension_is_relative_to_its_folder(tmp_path):
    """A ComfyUI ``ckpt_name`` (``x.safetensors``) names the file at the folder's top, not ``sub/x.safetensors``
    too: only a VAE's name (A1111's base name) matches a file in a subfolder by its base name."""
    models = tmp_path / "models"
    top, sub = models / "checkpoints" / "x.safetensors", models / "checkpoints" / "sub" / "x.safetensors"
    sub.parent.mkdir(parents=True)
    top.write_bytes(b"top")
    sub.write_bytes(b"sub")
    assert find_png_model("x.safetensors", None, model_folders(models)) == (
        top,
        "model from the PNG: x.safetensors (by its name: the PNG has no Model hash)",
    )
    vae = models / "VAE" / "sub" / "y.safetensors"  # A1111 writes "VAE: y.safetensors" for it
    vae.parent.mkdir(parents=True)
    vae.write_bytes(b"vae")
    assert model_paths.find_png_vae("y.safetensors", None, models) == (
        vae,
        "VAE from the PNG: sub/y.safetensors (by its name: the PNG has no VAE hash)",
    )


def test_the_pngs_vae_of_another_family_is_a_warning(vae_webui, tmp_path, loads_parts):
    """A VAE found by the PNG's hash that the model cannot decode with (FLUX.1's 16-channel ae for an SD1
    model): said, and the model's own VAE decodes, as when it is not found (before anything loads)."""
    from safetensors.torch import save_file
    from sdcore.models.tiny import create_tiny_bundle

    ae = tmp_path / "models" / "VAE" / "ae.safetensors"
    ae.parent.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in create_tiny_bundle("flux").vae.state_dict().items()}, str(ae))
    models = tmp_path / "models"
    (models / "Stable-diffusion").mkdir()
    base = models / "Stable-diffusion" / "base.safetensors"
    base.symlink_to(vae_webui / "Stable-diffusion" / "base.safetensors")
    result = _from_png(models, tmp_path, f", VAE hash: {_sha(ae)[:10]}, VAE: ae.safetensors")
    assert isinstance(result.exception, _Stop), result.output
    assert loads_parts[-1] == (str(base), None)
    assert result.stderr.splitlines()[-1] == (
        f"warning: the PNG's VAE {ae} is a VAE with 16 latent channels; Stable Diffusion 1.x needs its "
        "4-channel VAE: the model's own VAE decodes; pass --vae to choose one"
    )


def test_vae_fields_are_written_for_a_vae_file_of_the_a1111_families(vae_webui, tmp_path):
    """A1111's "VAE hash" (sha256[:10]) and "VAE" (base name with extension) for a VAE file on SD1/SD2/SDXL;
    nothing for the model's own VAE, a folder, or FLUX.1/SD3/Chroma (Forge writes "Module N" there)."""
    from sdcore.generate.pnginfo import vae_fields

    vae = vae_webui / "VAE" / "tiny-vae.safetensors"
    expected = {"VAE hash": _sha(vae)[:10], "VAE": "tiny-vae.safetensors"}
    for family in ("sd1", "sd2", "sdxl"):
        assert vae_fields(vae, family) == expected
        assert list(vae_fields(vae, family)) == ["VAE hash", "VAE"]  # A1111's order
    for family in ("flux", "sd3", "chroma"):
        assert vae_fields(vae, family) == {}
    assert vae_fields(None, "sd1") == {} and vae_fields(vae_webui / "VAE", "sd1") == {}


def test_an_image_made_with_vae_comes_back_with_it(vae_webui, tmp_path):
    """Round trip: ``generate --vae NAME`` writes A1111's VAE fields after "Model"; ``--from-png`` with only the
    models folder takes that VAE again and makes the same image (and the same infotext)."""
    import numpy as np

    vae = vae_webui / "VAE" / "tiny-vae.safetensors"
    base = vae_webui / "Stable-diffusion" / "base.safetensors"
    first, again = tmp_path / "first.png", tmp_path / "again.png"
    common = ["--models-dir", str(vae_webui), "--device", "cpu"]
    made = _sdcore("a cat", "-m", "base", "--vae", "tiny-vae", "--steps", "1", "--size", "32", "--seed", "3",
                   *common, "-o", str(first))  # fmt: skip
    assert made.exit_code == 0, made.output
    text = Image.open(first).info["parameters"]
    assert text.splitlines()[1].startswith(
        f"Steps: 1, Sampler: Euler a, CFG scale: 7, Seed: 3, Size: 32x32, Model hash: "
        f"{_sha(base)[:10]}, Model: base, VAE hash: {_sha(vae)[:10]}, VAE: tiny-vae.safetensors, RNG: CPU, "
    )
    result = _sdcore("--from-png", str(first), *common, "-o", str(again))
    assert result.exit_code == 0, result.output
    assert f"VAE from the PNG: tiny-vae.safetensors ({_sha(vae)[:10]})" in result.stderr.splitlines()
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(again)))
    assert Image.open(again).info["parameters"] == text
    # the model's own VAE: no VAE fields
    own = tmp_path / "own.png"
    made = _sdcore("a cat", "-m", "base", "--steps", "1", "--size", "32", "--seed", "3", *common, "-o", str(own))
    assert made.exit_code == 0 and "VAE" not in Image.open(own).info["parameters"]
    assert not np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(own)))


def test_a_typed_vae_of_another_family_is_a_preflight_error(vae_webui, tmp_path, loads_parts):
    """``--vae`` given a VAE the model cannot decode with: one error line before anything loads (exit 2), as
    train's pre-flight says it, where it used to fail in the loader (exit 1)."""
    from safetensors.torch import save_file
    from sdcore.models.tiny import create_tiny_bundle

    ae = tmp_path / "ae.safetensors"
    save_file({k: v.contiguous() for k, v in create_tiny_bundle("flux").vae.state_dict().items()}, str(ae))
    base = vae_webui / "Stable-diffusion" / "base.safetensors"
    result = _sdcore("a cat", "-m", str(base), "--vae", str(ae), "-o", str(tmp_path / "o.png"))
    assert result.exit_code == 2, result.output
    assert loads_parts == []
    assert one_error_line(result) == (
        f"--vae {ae}: a VAE with 16 latent channels; Stable Diffusion 1.x needs its 4-channel VAE"
    )


def test_a_forge_sd_image_names_its_vae_as_module_1(vae_webui, tmp_path, loads_parts):
    """Forge 2 lists an SD model's VAE in its "VAE / Text Encoder" list too (the "sd" preset shows it): ``Module
    1: tiny-vae`` is the VAE; an SD model takes no text encoder file, so another module is said and left out."""
    (vae_webui / "text_encoder").mkdir(exist_ok=True)
    _save_vae(8, vae_webui / "text_encoder" / "not-a-clip.safetensors")  # a VAE again: a second VAE module
    result = _from_png(vae_webui, tmp_path, ", Version: f2.0.1, Module 1: tiny-vae")
    assert isinstance(result.exception, _Stop), result.output
    assert loads_parts[-1][1] == str(vae_webui / "VAE" / "tiny-vae.safetensors")
    assert "VAE from the PNG: tiny-vae.safetensors (Module 1)" in result.stderr.splitlines()
    result = _from_png(vae_webui, tmp_path, ", Module 1: tiny-vae, Module 2: not-a-clip")
    assert loads_parts[-1][1] == str(vae_webui / "VAE" / "tiny-vae.safetensors")
    assert any(
        line.startswith("warning: the PNG's Module 2 not-a-clip.safetensors is none of the parts this model takes")
        for line in result.stderr.splitlines()
    ), result.stderr
