"""``sdcore generate --reference-image`` (FLUX.1 Kontext): the reference's sizing against the rule rewritten
here, generation against diffusers' ``FluxKontextPipeline`` called directly on the same tiny modules, the
pre-load errors, the infotext and ``--from-png``, and ``tiny:flux-kontext``."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from PIL import Image  # noqa: E402


@pytest.fixture(scope="module")
def dev():
    from sdcore.models.flux.adapter import FluxAdapter

    return FluxAdapter().create_tiny(variant="dev", seed=0)


def _picture(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth random picture (a noise image would make every edit look alike)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR)


def _kontext_pipe(bundle):
    from diffusers import FluxKontextPipeline

    pipe = FluxKontextPipeline(scheduler=type(bundle.noise_scheduler).from_config(bundle.noise_scheduler.config),
                               vae=bundle.vae, text_encoder=bundle.text_encoders[0], tokenizer=bundle.tokenizers[0],
                               text_encoder_2=bundle.text_encoders[1], tokenizer_2=bundle.tokenizers[1],
                               transformer=bundle.transformer)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _array(image):
    return np.asarray(image).astype(np.int16)


# ----------------------------------------------------------------------------------------------- sizing


def _nearest(width: int, height: int, table) -> tuple[int, int]:
    """The rule as diffusers' FluxKontextPipeline applies it (pipeline_flux_kontext.py, "3. Preprocess image":
    the image's sides are first floored to 16 by ``image_processor.get_default_height_width``, then the aspect
    ratio of those is compared): the table entry whose w/h is nearest (the narrower on a tie), both sides
    floored to 16."""
    width, height = width - width % 16, height - height % 16
    best = None
    for w, h in sorted(table):
        distance = abs(width / height - w / h)
        if best is None or distance < best[0]:
            best = (distance, w, h)
    assert best is not None
    return best[1] - best[1] % 16, best[2] - best[2] % 16


@pytest.mark.parametrize("size", [(64, 64), (70, 50), (50, 70), (1920, 1080), (1080, 1920), (300, 1000), (1000, 16),
                                  (500, 542), (500, 704), (23, 30)])  # fmt: skip
def test_reference_size_is_the_preferred_resolution_nearest_the_aspect_ratio(size):
    from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS
    from sdcore.models.flux.kontext import PREFERRED_RESOLUTIONS, reference_size

    assert list(PREFERRED_RESOLUTIONS) == [tuple(r) for r in PREFERRED_KONTEXT_RESOLUTIONS]
    assert reference_size(*size) == _nearest(*size, PREFERRED_KONTEXT_RESOLUTIONS)
    # kept size: floored to 16 only
    assert reference_size(*size, resize=False) == (size[0] - size[0] % 16, size[1] - size[1] % 16)


def test_sized_reference_modes_and_a_too_small_image():
    from sdcore.errors import ConfigError
    from sdcore.models.flux.kontext import sized_reference

    image = _picture(70, 50)
    assert sized_reference(image, "kontext").size == (1184, 880)
    assert sized_reference(image, "none").size == (64, 48)
    out = sized_reference(image, "output", (32, 48))
    assert out.size == (32, 48)
    assert _array(out).tolist() == _array(image.resize((32, 48), Image.Resampling.BILINEAR)).tolist()
    with pytest.raises(ConfigError, match="at least 16 pixels"):
        sized_reference(_picture(40, 12), "none")
    # below 16 pixels a side the pipeline's floored side is 0 (ZeroDivisionError in diffusers): refused in the
    # Kontext resize too, as docs/generation.md says; ai-toolkit's stretch to the output takes any image
    for small in (_picture(100, 10), _picture(10, 100)):
        with pytest.raises(ConfigError, match="at least 16 pixels"):
            sized_reference(small, "kontext")
    assert sized_reference(_picture(10, 10), "output", (32, 32)).size == (32, 32)


class _Preprocessed(Exception):
    """Raised by the pipeline's prepare_latents with the reference tensor the pipeline made."""

    def __init__(self, image) -> None:
        super().__init__()
        self.image = image


def _pipeline_reference(pipe, image, **call):
    """The [1, 3, H, W] reference tensor FluxKontextPipeline VAE-encodes for ``image`` (stopped right there)."""

    def stop(image, *args, **kwargs):
        raise _Preprocessed(image)

    pipe.prepare_latents = stop
    try:
        with torch.no_grad(), pytest.raises(_Preprocessed) as caught:
            pipe(prompt="x", image=image, num_inference_steps=1, width=32, height=32, max_area=32 * 32, **call)
    finally:
        del pipe.prepare_latents
    return caught.value.image


@pytest.mark.parametrize("size", [(500, 542), (500, 704), (70, 50), (1000, 1090)])
def test_the_sized_reference_is_what_the_pipeline_encodes(dev, size):
    """The pipeline given our sized reference (its resize off, as sdcore calls it) encodes the same tensor as the
    pipeline given the original image with its own resize: same size (500x542 is 1024x1024 there, its floored
    sides 496x528 being nearer square than 944x1104) and same pixels."""
    from sdcore.models.flux.kontext import sized_reference

    pipe = _kontext_pipe(dev)
    image = _picture(*size, seed=size[0])
    theirs = _pipeline_reference(pipe, image)
    ours = _pipeline_reference(pipe, sized_reference(image), _auto_resize=False)
    assert tuple(ours.shape) == tuple(theirs.shape)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("mode", ["exif", "RGBA", "P", "L", "LA", "CMYK"])
def test_a_reference_file_reads_as_diffusers_load_image_reads_it(tmp_path, mode):
    """``open_reference`` gives the pixels of diffusers' ``load_image`` (utils/loading_utils.py: EXIF orientation
    applied, then ``convert("RGB")``), the reader its FluxKontextPipeline examples use; ComfyUI's LoadImage also
    applies the EXIF orientation. A phone photo's rotation must not reach the model sideways."""
    from diffusers.utils import load_image
    from sdcore.models.flux.kontext import open_reference

    picture = _picture(80, 48)
    if mode == "exif":
        path = tmp_path / "rotated.jpg"
        exif = Image.Exif()
        exif[0x0112] = 6  # Orientation: rotate 90 CW to display
        picture.save(path, exif=exif.tobytes(), quality=95)
    else:
        converted = picture.convert(mode)
        if mode in ("RGBA", "LA"):
            alpha = np.zeros((48, 80), dtype=np.uint8)
            alpha[:20, :30] = 255
            converted.putalpha(Image.fromarray(alpha))
        path = tmp_path / f"{mode}.{'jpg' if mode == 'CMYK' else 'png'}"
        converted.save(path)
    expected = load_image(str(path))
    got = open_reference(path)
    assert got.mode == "RGB" and got.size == expected.size
    assert np.array_equal(_array(got), _array(expected))


# ----------------------------------------------------------------------------------------------- generation


@pytest.mark.parametrize("true_cfg", [1.0, 2.5])
def test_generation_equals_the_kontext_pipeline(dev, true_cfg):
    """Our --reference-image generation = FluxKontextPipeline(image=...) with its own resize to the preferred
    resolution, pixel for pixel, with and without true CFG; the latents agree within 1e-5."""
    from sdcore.generate.pipeline import generate_images
    from sdcore.models.flux.adapter import FluxAdapter
    from sdcore.models.flux.kontext import sized_reference

    reference = _picture(70, 50)
    negative = "a blue square" if true_cfg > 1 else ""
    settings = {"steps": 2, "cfg": 2.5, "seed": 5, "width": 32, "height": 48}
    got = generate_images(dev, ["a red ring"], negative_prompt=negative, true_cfg_scale=true_cfg,
                          reference_image=reference, **settings)[0]  # fmt: skip
    call = {"prompt": "a red ring", "width": 32, "height": 48, "num_inference_steps": 2, "guidance_scale": 2.5,
            "max_area": 32 * 48, "true_cfg_scale": true_cfg,
            **({"negative_prompt": negative} if negative else {})}  # fmt: skip
    pipe = _kontext_pipe(dev)
    with torch.no_grad():
        expected = pipe(image=reference, generator=torch.Generator().manual_seed(5), **call).images[0]
        packed = pipe(image=reference, generator=torch.Generator().manual_seed(5), output_type="latent", **call)
    assert got.size == (32, 48)
    assert np.array_equal(_array(got), _array(expected))
    theirs = pipe._unpack_latents(packed.images, 48, 32, pipe.vae_scale_factor)
    with torch.no_grad():
        ours = FluxAdapter().generate(dev, ["a red ring"], [negative], seeds=[5], steps=2, cfg=2.5, width=32,
                                      height=48, reference=sized_reference(reference), output_type="latent",
                                      true_cfg_scale=true_cfg)  # fmt: skip
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_the_reference_counts_its_own_size_by_default_and_the_batch_shares_it(dev):
    from sdcore.generate.pipeline import generate_images

    reference = _picture(70, 50)
    pair = generate_images(dev, ["make it red", "make it red"], steps=2, cfg=2.5, seed=3, reference_image=reference,
                           reference_resize="none")  # fmt: skip
    assert [image.size for image in pair] == [(64, 48), (64, 48)]  # the kept reference's size, floored to 16
    with torch.no_grad():
        expected = _kontext_pipe(dev)(prompt=["make it red"] * 2, image=reference, width=64, height=48,
                                      num_inference_steps=2, guidance_scale=2.5, max_area=64 * 48,
                                      _auto_resize=False,
                                      generator=[torch.Generator().manual_seed(s) for s in (3, 4)]).images  # fmt: skip
    for got, want in zip(pair, expected, strict=True):
        assert np.array_equal(_array(got), _array(want))
    second = generate_images(dev, ["make it red"], steps=2, cfg=2.5, seed=4, reference_image=reference,
                             reference_resize="none")[0]  # fmt: skip
    # image 1 of the batch: seed + 1 and the same reference (batched float sums may round a pixel level apart)
    assert np.abs(_array(second) - _array(pair[1])).max() <= 1
    plain = generate_images(dev, ["make it red"], steps=2, cfg=2.5, seed=4, width=64, height=48)[0]
    other = generate_images(dev, ["make it red"], steps=2, cfg=2.5, seed=4, reference_image=_picture(70, 50, seed=9),
                            reference_resize="none")[0]  # fmt: skip
    assert np.abs(_array(second) - _array(plain)).max() > 0  # the reference is not ignored
    assert np.abs(_array(second) - _array(other)).max() > 0  # and which reference matters


@pytest.mark.parametrize("true_cfg", [1.0, 2.0])
def test_and_hooks_cope_with_the_reference_tokens(dev, true_cfg):
    """``x :0.5 AND x :0.5`` is ``x`` (Forge's weighted sum; with true CFG u + sum(w (c - u))): the step hooks
    run the extra part over the latents plus the reference tokens and combine the full outputs."""
    from sdcore.generate.pipeline import generate_images

    settings = {"steps": 2, "cfg": 2.5, "seed": 2, "width": 32, "height": 32, "true_cfg_scale": true_cfg,
                "reference_image": _picture(50, 50), "reference_resize": "none"}  # fmt: skip
    plain = generate_images(dev, ["a green cube"], **settings)[0]
    composed = generate_images(dev, ["a green cube :0.5 AND a green cube :0.5"], **settings)[0]
    assert np.abs(_array(plain) - _array(composed)).max() <= 1
    other = generate_images(dev, ["a green cube :0.5 AND a wooden house by the sea :1.5"], **settings)[0]
    assert np.abs(_array(plain) - _array(other)).max() > 0  # the other part takes part


def test_hires_fix_keeps_the_reference_in_both_passes(dev):
    from sdcore.generate.hires import HiresFix
    from sdcore.generate.pipeline import generate_images

    settings = {"steps": 2, "cfg": 2.5, "seed": 1, "width": 32, "height": 32, "hires": HiresFix(scale=2.0, steps=1)}
    edited = generate_images(dev, ["a cat"], reference_image=_picture(40, 40), reference_resize="none", **settings)[0]
    plain = generate_images(dev, ["a cat"], **settings)[0]
    assert edited.size == (64, 64)
    assert np.abs(_array(edited) - _array(plain)).max() > 0


def test_python_api_errors(dev, tmp_path):
    from sdcore.errors import ConfigError
    from sdcore.generate.pipeline import generate_images
    from sdcore.models.tiny import create_tiny_bundle

    with pytest.raises(ConfigError, match="this is a Stable Diffusion 1"):
        generate_images(create_tiny_bundle("sd1"), ["x"], steps=1, reference_image=_picture(32, 32))
    with pytest.raises(ConfigError, match="--reference-image with --init-image"):
        generate_images(dev, ["x"], steps=1, reference_image=_picture(32, 32), init_image=_picture(32, 32))
    with pytest.raises(ConfigError, match="no such file"):
        generate_images(dev, ["x"], steps=1, reference_image=tmp_path / "missing.png")


# ----------------------------------------------------------------------------------------------- the command


def _invoke(args, monkeypatch=None, *, load: bool = True):
    from click.testing import CliRunner
    from sdcore.builtin import generate_command
    from sdcore.cli import build_cli
    from sdcore.plugins import get_plugin_manager

    if not load and monkeypatch is not None:
        monkeypatch.setattr(generate_command, "_load_bundle", lambda *a, **k: pytest.fail("the model loaded"))
    return CliRunner().invoke(build_cli(get_plugin_manager()), ["generate", *args])


def test_cli_problems_are_one_line_before_the_model_loads(tmp_path, monkeypatch):
    good = tmp_path / "ref.png"
    _picture(40, 40).save(good)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"not a png")
    small = tmp_path / "small.png"
    _picture(40, 12).save(small)
    base = ["x", "--steps", "1", "--models-dir", str(tmp_path), "-o", str(tmp_path / "o.png")]
    cases = [
        (["-m", "tiny:sd1", "--reference-image", str(good)], ["this is a Stable Diffusion 1"]),
        (["-m", "tiny:sd3", "--reference-image", str(good)], ["FLUX.1 Kontext's image to edit; this is a"]),
        (["-m", "tiny:flux", "--reference-image", str(tmp_path / "missing.png")], ["missing.png: no such file"]),
        (["-m", "tiny:flux", "--reference-image", str(corrupt)], ["cannot read reference image"]),
        (["-m", "tiny:flux", "--reference-image", str(good), "--init-image", str(good)], ["with --init-image"]),
        (["-m", "tiny:flux", "--no-reference-resize"], ["--no-reference-resize sizes a --reference-image"]),
        (["-m", "tiny:flux", "--reference-image", str(small)], ["is 40x12: Flux needs at least 16 pixels a side"]),
        # every problem at once, one line
        (["-m", "tiny:chroma", "--reference-image", str(corrupt), "--init-image", str(good)],
         ["this is a", "cannot read reference image", "with --init-image"]),
    ]  # fmt: skip
    for args, expected in cases:
        result = _invoke([*args, *base], monkeypatch, load=False)
        assert result.exit_code == 2, (args, result.output)
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1, result.output
        for text in expected:
            assert text in lines[0], (text, result.output)


def test_cli_an_oversized_reference_is_one_line_not_a_traceback(tmp_path, monkeypatch):
    """Pillow refuses an image above twice ``Image.MAX_IMAGE_PIXELS`` with DecompressionBombError, which is
    not an OSError: one problem line before the model loads (the limit lowered so a small file trips it)."""
    big = tmp_path / "big.png"
    _picture(40, 40).save(big)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    result = _invoke(["x", "-m", "tiny:flux", "--reference-image", str(big), "--steps", "1", "--models-dir",
                      str(tmp_path), "-o", str(tmp_path / "o.png")], monkeypatch, load=False)  # fmt: skip
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "cannot read reference image" in lines[0] and "1600 pixels" in lines[0], lines


def test_cli_edit_writes_its_infotext_and_from_png_repeats_it(tmp_path, monkeypatch):
    from sdcore.generate.pnginfo import read_png_parameters

    reference = tmp_path / "person.png"
    _picture(70, 50).save(reference)
    out = tmp_path / "edit.png"
    args = ["make it red", "-m", "tiny:flux", "--reference-image", str(reference), "--no-reference-resize",
            "--steps", "2", "--seed", "9", "--models-dir", str(tmp_path), "-o", str(out)]  # fmt: skip
    result = _invoke(args)
    assert result.exit_code == 0, result.output
    image = Image.open(out)
    assert image.size == (64, 48)
    params = read_png_parameters(out)
    assert params is not None
    assert params.extra["Reference image"] == "person.png" and params.extra["Reference resize"] == "none"
    again = tmp_path / "again.png"
    result = _invoke(["--from-png", str(out), "-m", "tiny:flux", "--reference-image", str(reference),
                      "--models-dir", str(tmp_path), "-o", str(again)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert np.array_equal(_array(Image.open(again).convert("RGB")), _array(image.convert("RGB")))
    # without the reference: said, not silently a new image
    third = tmp_path / "third.png"
    result = _invoke(["--from-png", str(out), "-m", "tiny:flux", "--models-dir", str(tmp_path), "-o", str(third)])
    assert result.exit_code == 0, result.output
    assert "FLUX.1 Kontext edit of person.png" in result.output


# ----------------------------------------------------------------------------------------------- tiny:flux-kontext


def test_tiny_flux_kontext_names_its_pipeline(tmp_path):
    import json

    from sdcore.models.load import load_model

    bundle = load_model("tiny:flux-kontext")
    assert bundle.family == "flux"
    assert bundle.family_spec.denoiser == "transformer"
    from sdcore.models.flux.adapter import FluxAdapter

    assert FluxAdapter().release(bundle).startswith("kontext")
    folder = tmp_path / "kontext"
    bundle.save(folder, format="diffusers")
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "FluxKontextPipeline"
    assert FluxAdapter().release(load_model(str(folder))).startswith("kontext")
    dev = FluxAdapter().create_tiny(variant="dev")
    for a, b in zip(bundle.transformer.parameters(), dev.transformer.parameters(), strict=True):
        assert torch.equal(a, b)  # dev's tiny weights
