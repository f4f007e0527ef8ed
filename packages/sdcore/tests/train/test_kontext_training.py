"""FLUX.1 Kontext training data: control images paired by file stem (--control-dir, the dataset TOML's
``control_directory``), checked before the model loads, loaded with their training image's own geometry and
encoded like its latents (cached or not), and given to the transformer as FluxKontextPipeline lays them out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from PIL import Image, ImageOps  # noqa: E402
from runtime_methods import ProjOutMethod  # noqa: E402
from sdcore.testing.contract import contract_options  # noqa: E402
from sdcore.train.loop import TrainSession  # noqa: E402


def _controls(tmp_path: Path, *, size: tuple[int, int] = (80, 96), skip: tuple[str, ...] = ()) -> Path:
    """A control image (another size than the 64 px training images, so it is resized) per training image."""
    folder = tmp_path / "controls"
    folder.mkdir(exist_ok=True)
    for image in sorted((tmp_path / "data").rglob("*.png")):
        if image.stem in skip:
            continue
        rgb = np.asarray(Image.open(image).convert("RGB").resize(size, Image.Resampling.NEAREST))
        Image.fromarray(rgb[:, :, ::-1].copy()).save(folder / f"{image.stem}.jpg", quality=95)  # colours swapped
    return folder


def _options(tmp_path: Path, family: str = "flux", **extra):
    base = {"max_steps": 1, "save_state": False, "t5xxl_max_token_length": 8, **extra}
    o = contract_options(ProjOutMethod, tmp_path, base, family=family)  # writes tmp_path/data
    return o


def test_preflight_lists_every_control_problem_in_one_go_before_loading(tmp_path, monkeypatch):
    """Missing control images are listed (as the mask images are), a missing folder and a model that is not a
    FLUX.1 with a guidance embedding are one line each; nothing is loaded for it. The plan names the pairing."""
    import sdcore.models.load as load
    from sdcore.train.preflight import run_preflight

    _options(tmp_path)
    folder = _controls(tmp_path, skip=("img01", "img03"))

    def no_loading(*args, **kwargs):
        raise AssertionError("the pre-flight loaded the model")

    monkeypatch.setattr(load, "load_model", no_loading)
    o = _options(tmp_path, family="sd1", control_dir=str(folder))
    problems = [p for p in run_preflight(ProjOutMethod(o), o, plan=False).problems if "control" in p]
    missing = sorted(str(p) for p in (tmp_path / "data").rglob("img0[13].png"))
    assert problems == [
        f"control images: 2 image(s) without a control image of the same name in their control folder: "
        f"{', '.join(missing)}",
        "control images (--control-dir / control_directory) train FLUX.1 Kontext; this model is sd1, which takes "
        "no reference image (train a FLUX.1 Kontext [dev] model, or leave out the control images)",
    ]
    o = _options(tmp_path, family="flux-schnell", control_dir=str(tmp_path / "nowhere"))
    problems = [p for p in run_preflight(ProjOutMethod(o), o, plan=False).problems if "control" in p]
    assert problems == [
        f"control images: {tmp_path / 'nowhere'} is not a folder (--control-dir / control_directory)",
        "control images (--control-dir / control_directory): this FLUX.1 (schnell) has no guidance embedding; "
        "FLUX.1 Kontext is a dev model (train FLUX.1 Kontext [dev], or dev to teach it references)",
    ]
    o = _options(tmp_path, control_dir=str(_controls(tmp_path)))
    report = run_preflight(ProjOutMethod(o), o, plan=False)
    assert not [p for p in report.problems if "control" in p]
    # the dry run's plan says the run pairs its samples (it said nothing of the control images)
    line = f"  FLUX.1 Kontext: every sample paired with its control image from {tmp_path / 'controls'}"
    assert line in report.plan_lines()
    plain = _options(tmp_path / "plain")
    assert not [x for x in run_preflight(ProjOutMethod(plain), plain, plan=False).plan_lines() if "Kontext" in x]


def test_dataset_toml_control_directory_is_musubi_tuners_key_per_subset(tmp_path):
    """``control_directory`` in a subset (relative to the config file, as image_dir); a subset without
    one beside a subset with one is refused (every Kontext sample needs its reference)."""
    from sdcore.data.dataset import DatasetIndex, load_toml_dataset_config
    from sdcore.errors import DataError
    from sdcore.train.kontext_data import control_problems

    config = tmp_path / "dataset.toml"
    config.write_text(
        "[[datasets]]\nresolution = 64\n"
        '[[datasets.subsets]]\nimage_dir = "a"\ncontrol_directory = "ctrl"\n'
        '[[datasets.subsets]]\nimage_dir = "b"\n',
        encoding="utf-8",
    )
    first, second = load_toml_dataset_config(config)
    assert first.control_dir == tmp_path / "ctrl" and second.control_dir is None
    problems = control_problems(DatasetIndex(entries=[], subsets=[first, second]))
    assert problems[0] == f"control images: {tmp_path / 'ctrl'} is not a folder (--control-dir / control_directory)"
    assert problems[1].startswith(
        f"control images: 1 subset(s) have no control folder while others do ({tmp_path / 'b'})"
    )
    config.write_text('[general]\ncontrol_directory = "ctrl"\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = "a"\n')
    with pytest.raises(DataError, match="control_directory"):
        load_toml_dataset_config(config)


@pytest.mark.parametrize("cached", [True, False])
def test_control_latents_are_the_resized_control_image_encoded_like_the_latents(tmp_path, cached, capsys):
    """The reference latents of a sample equal the VAE posterior draw of its control image resized to the
    training image's bucket (area filter when shrinking, as the training image) and mirrored with it,
    shifted and scaled like every Flux latent; cached and uncached runs give the same latents."""
    from sdcore.train.data import SampleRef
    from sdcore.train.kontext_data import control_seed

    _options(tmp_path)
    folder = _controls(tmp_path)
    o = _options(tmp_path, control_dir=str(folder), cache_latents=cached, flip=True)
    s = TrainSession(ProjOutMethod(o), bundle=None)
    s.setup()
    shown = capsys.readouterr()
    assert f"FLUX.1 Kontext: every sample paired with its control image from {folder}" in shown.out + shown.err
    refs = [SampleRef(i, 0, 0) for i in range(len(s.data.entries))]
    batch = s.make_batch(refs)
    vae = s.bundle.vae
    assert batch.reference_latents is not None and batch.reference_latents.shape == batch.latents.shape
    for row, ref in enumerate(refs):
        entry = s.data.entries[ref.entry]
        flipped = s.data.flip_of(ref)
        image = Image.open(folder / f"{entry.path.stem}.jpg").convert("RGB").resize((64, 64), Image.Resampling.BOX)
        if flipped:
            image = ImageOps.mirror(image)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
        with torch.no_grad():
            dist = vae.encode(pixels).latent_dist
        eps = torch.randn(
            dist.mean.shape[1:], generator=torch.Generator().manual_seed(control_seed(o.seed, entry, flipped))
        )
        raw = dist.mean[0] + dist.std[0] * eps
        expected = (raw - vae.config.shift_factor) * vae.config.scaling_factor
        torch.testing.assert_close(batch.reference_latents[row].cpu(), expected, rtol=1e-5, atol=1e-5)
    assert any(s.data.flip_of(ref) for ref in refs) and not all(s.data.flip_of(ref) for ref in refs)


def test_the_transformer_sees_the_reference_tokens_after_the_latents_as_flux_kontext_lays_them_out(tmp_path):
    """hidden_states = [latent tokens, reference tokens] (2x the tokens), img_ids' first component 0 then 1
    with the same (row, col) grid, the reference tokens the packed reference latents; the velocity keeps
    the latents' shape. Without control images the call is the plain text-to-image one."""
    from sdcore.models.flux.adapter import pack_latents

    _options(tmp_path)
    o = _options(tmp_path, control_dir=str(_controls(tmp_path)), cache_latents=True)
    s = TrainSession(ProjOutMethod(o), bundle=None)
    s.setup()
    seen: list[dict] = []
    transformer = s.bundle.transformer
    handle = transformer.register_forward_pre_hook(lambda m, a, k: seen.append(dict(k)), with_kwargs=True)
    batch = s.make_batch(s.data.epoch_plan(0)[0])
    s.objective.sample_loss(batch, torch.randn_like(batch.latents), torch.full((2,), 500), 0)
    handle.remove()
    call = seen[-1]
    tokens = pack_latents(batch.latents).shape[1]
    hidden, ids = call["hidden_states"], call["img_ids"]
    assert hidden.shape[1] == 2 * tokens
    torch.testing.assert_close(hidden[:, tokens:].float(), pack_latents(batch.reference_latents).float())
    assert ids[:tokens, 0].eq(0).all() and ids[tokens:, 0].eq(1).all()
    torch.testing.assert_close(ids[:tokens, 1:], ids[tokens:, 1:])

    plain = TrainSession(ProjOutMethod(_options(tmp_path / "plain")), bundle=None)
    plain.setup()
    seen.clear()
    handle = plain.bundle.transformer.register_forward_pre_hook(lambda m, a, k: seen.append(dict(k)), with_kwargs=True)
    batch = plain.make_batch(plain.data.epoch_plan(0)[0])
    assert batch.reference_latents is None
    plain.objective.sample_loss(batch, torch.randn_like(batch.latents), torch.full((2,), 500), 0)
    handle.remove()
    assert seen[-1]["hidden_states"].shape[1] == tokens and seen[-1]["img_ids"][:, 0].eq(0).all()


def test_memory_plan_counts_the_reference_tokens():
    """Reference images join the latents' tokens in every block: the activation estimate with one
    reference equals the estimate of twice the image tokens (the formula's N doubled)."""
    from sdcore.train.memory import transformer_activation_bytes

    config = {"num_attention_heads": 24, "attention_head_dim": 128, "num_layers": 19, "num_single_layers": 38,
              "in_channels": 64, "patch_size": 1}  # fmt: skip
    common = {"batch": 1, "latent_channels": 16, "context_tokens": 512, "bytes_per_element": 2}
    plain = transformer_activation_bytes(config, resolution=1024, **common)
    kontext = transformer_activation_bytes(config, resolution=1024, reference_images=1, **common)
    n = 4096  # (1024 / 8 / 2)^2 packed tokens
    assert plain * (2 * n + 512) == pytest.approx(kontext * (n + 512), rel=1e-6)


def _cached_controls_round_trip(o, folder):
    """Three runs of ``o`` (--cache-latents-to-disk with control images in ``folder``): the first encodes all 4
    images, the second reads them back unchanged, the third (img02's control image edited) re-encodes that one
    alone. Returns (the run factory, the third run, the first and third runs' reference latents, img02's row)."""
    import os

    from sdcore.train.data import SampleRef

    def session():
        s = TrainSession(ProjOutMethod(o), bundle=None)
        s.setup()
        return s, s.make_batch([SampleRef(i, 0, -1) for i in range(len(s.data.entries))]).reference_latents

    first, written = session()
    assert first.latent_cache.encoded == 4
    second, read = session()
    assert (second.latent_cache.encoded, second.latent_cache.reused) == (0, 4)
    torch.testing.assert_close(read, written)
    edited = folder / "img02.jpg"
    Image.open(edited).transpose(Image.Transpose.FLIP_TOP_BOTTOM).save(edited, quality=95)
    os.utime(edited, ns=(os.stat(edited).st_atime_ns, os.stat(edited).st_mtime_ns + 10**9))
    third, changed = session()
    assert third.latent_cache.encoded == 1
    row = [e.path.stem for e in third.data.entries].index("img02")
    assert not torch.allclose(changed[row], written[row])
    return session, third, written, changed, row


def test_control_latents_ride_in_the_disk_cache_and_an_edited_control_image_re_encodes(tmp_path):
    """--cache-latents-to-disk keeps the control latents in the image's cache file: a second run encodes
    nothing and reads the same reference latents; a changed control image makes its file stale."""

    _options(tmp_path)
    folder = _controls(tmp_path)
    o = _options(tmp_path, control_dir=str(folder), cache_latents=True, cache_latents_to_disk=True)

    _, third, written, changed, row = _cached_controls_round_trip(o, folder)
    others = [i for i in range(len(third.data.entries)) if i != row]
    torch.testing.assert_close(changed[others], written[others])


def test_a_control_image_may_have_any_extension_a_training_image_may(tmp_path):
    """The docs promise "any image extension": a .tif/.TIFF/.gif control image is found as a .tif training image
    is (before, only kohya's mask extensions were tried, and the pre-flight said the control image was missing)."""
    from sdcore.data.dataset import build_dataset_index
    from sdcore.data.images import IMAGE_SUFFIXES
    from sdcore.train.kontext_data import control_image_path, control_problems

    _options(tmp_path)
    folder = tmp_path / "controls"
    folder.mkdir()
    images = sorted((tmp_path / "data").rglob("*.png"))
    names = ["img00.tif", "img01.TIFF", "img02.gif", "img03.PNG"]
    assert {Path(n).suffix.lower() for n in names} <= set(IMAGE_SUFFIXES)
    for name in names:
        Image.new("RGB", (64, 64), (10, 200, 30)).save(folder / name)
    index = build_dataset_index(_options(tmp_path, control_dir=str(folder)))
    assert control_problems(index) == []
    found = {e.path.stem: control_image_path(e) for e in index.entries}
    assert found == {image.stem: folder / name for image, name in zip(images, names, strict=True)}


def test_a_control_folder_that_is_the_image_folder_is_refused(tmp_path):
    """--control-dir naming the training images' own folder pairs every image with itself (an identity edit):
    a pre-flight problem naming the folder, given once however the path is spelled (was accepted silently)."""
    from sdcore.data.dataset import build_dataset_index
    from sdcore.train.kontext_data import control_problems

    _options(tmp_path)
    images = tmp_path / "data" / "1_tiny"
    spelled = images / ".." / "1_tiny"
    problems = control_problems(build_dataset_index(_options(tmp_path, control_dir=str(spelled))))
    assert problems == [
        f"control images: the control folder is the image folder itself ({images}): each image would be its own "
        "control image; put the control images in a folder of their own"
    ]
    assert control_problems(build_dataset_index(_options(tmp_path, control_dir=str(_controls(tmp_path))))) == []


def test_regularisation_images_pair_with_control_images_too(tmp_path):
    """--reg-data images take --control-dir as the training images do (a Kontext batch needs a reference for every
    sample, and a Kontext regularisation image is an edit pair too): missing ones are listed with a hint that
    says so and points to a dataset TOML's per-subset control_directory; present ones are found."""
    from sdcore.data.dataset import build_dataset_index
    from sdcore.train.kontext_data import control_image_path, control_problems

    _options(tmp_path)
    folder = _controls(tmp_path)
    reg = tmp_path / "reg" / "1_class"
    reg.mkdir(parents=True)
    for name in ("r0", "r1"):
        Image.new("RGB", (64, 64), (0, 90, 0)).save(reg / f"{name}.png")
    index = build_dataset_index(_options(tmp_path, control_dir=str(folder), reg_data=str(reg.parent)))
    assert control_problems(index) == [
        f"control images: 2 image(s) without a control image of the same name in their control folder: {reg / 'r0.png'}"
        f", {reg / 'r1.png'} (2 of them regularisation images: a Kontext regularisation image is a pair too, and "
        "--control-dir serves --reg-data as well; a dataset TOML gives each subset its own control_directory)"
    ]
    Image.new("RGB", (64, 64), (0, 0, 90)).save(folder / "r0.webp")
    Image.new("RGB", (64, 64), (0, 0, 90)).save(folder / "r1.png")
    index = build_dataset_index(_options(tmp_path, control_dir=str(folder), reg_data=str(reg.parent)))
    assert control_problems(index) == []
    assert {e.path.name: control_image_path(e) for e in index.entries if e.is_class} == {
        "r0.png": folder / "r0.webp",
        "r1.png": folder / "r1.png",
    }


def test_a_kontext_model_without_control_images_says_it_trains_text_to_image(tmp_path, caplog):
    """A Kontext folder (FluxKontextPipeline) trained without --control-dir learns text-to-image: one warning says
    so and how to pair the images; a dev model without controls trains quietly, as always."""
    import logging

    said: dict[str, list[str]] = {}
    for model in ("tiny:flux-kontext", "tiny:flux"):
        caplog.clear()
        session = TrainSession(ProjOutMethod(_options(tmp_path / model[5:], model=model)), bundle=None)
        with caplog.at_level(logging.WARNING, logger="sdcore.train"):
            session.setup()
        said[model] = [r.getMessage() for r in caplog.records if "trains as text-to-image" in r.getMessage()]
    assert len(said["tiny:flux-kontext"]) == 1 and "--control-dir" in said["tiny:flux-kontext"][0]
    assert said["tiny:flux"] == []


def test_a_jsonl_rows_control_image_is_part_of_the_disk_cache_key(tmp_path):
    """A diffusers JSONL (``--data x.jsonl``) pairs each row with its own control image (no control folder): with
    --cache-latents-to-disk an edited control image, or a row pointed at another one, makes the cache file stale as
    a --control-dir pair's does (before, the key held the control image only for a control folder, so the old
    control latents were read back without a word)."""
    import json

    _options(tmp_path)
    folder = _controls(tmp_path)
    images = sorted((tmp_path / "data").rglob("*.png"))
    jsonl = tmp_path / "train.jsonl"

    def write(controls: list[Path]) -> None:
        pairs = zip(images, controls, strict=True)
        rows = [{"image": str(i), "conditioning_image": str(c), "text": "a photo"} for i, c in pairs]
        jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")

    write([folder / f"{i.stem}.jpg" for i in images])
    o = _options(tmp_path, data=str(jsonl), cache_latents=True, cache_latents_to_disk=True)

    session, _, _, changed, _ = _cached_controls_round_trip(o, folder)
    # the row for img00 now names img01's control image: re-encoded, equal to what img01's pairing gave
    write([folder / f"{i.stem}.jpg" for i in images[1:2] + images[1:]])
    fourth, repointed = session()
    assert fourth.latent_cache.encoded == 1
    stems = [e.path.stem for e in fourth.data.entries]
    assert not torch.allclose(repointed[stems.index("img00")], changed[stems.index("img00")])
