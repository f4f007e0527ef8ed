"""A1111's inpainting in ``sdcore generate``: each rule (mask reading, blur, crop region, fill, latent mask, per-step
blend, paste-back, inpainting models' image conditioning) recomputed here from A1111's documented behaviour, and
FLUX.1 Fill equal to diffusers' ``FluxFillPipeline`` called directly."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")


def _picture(width=64, height=64, seed=0):
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _box_mask(width=64, height=64, box=(16, 16, 40, 40)):
    from PIL import Image

    mask = Image.new("L", (width, height), 0)
    mask.paste(255, box)
    return mask


# ------------------------------------------------------------------------------------------------- the mask


def test_mask_reading_follows_a1111_create_binary_mask():
    """RGBA with transparency: its alpha, 255 above 128 and 0 at or below; an opaque RGBA or RGB: its grey level
    (not cut); an unreadable file: one line."""
    from PIL import Image
    from sdcore.errors import ConfigError
    from sdcore.generate.inpaint import open_mask

    alpha = np.array([[0, 128, 129, 255]], dtype=np.uint8)
    rgba = np.zeros((1, 4, 4), dtype=np.uint8)
    rgba[..., 3] = alpha
    rgba[..., :3] = 77  # the colour does not count
    got = np.asarray(open_mask(Image.fromarray(rgba, "RGBA")))
    assert got.tolist() == [[0, 0, 255, 255]]
    opaque = np.full((1, 2, 4), 255, dtype=np.uint8)
    opaque[0, :, :3] = [[100, 100, 100], [30, 60, 90]]
    grey = np.asarray(open_mask(Image.fromarray(opaque, "RGBA")))
    assert grey.tolist() == [[100, round(0.299 * 30 + 0.587 * 60 + 0.114 * 90)]]
    with pytest.raises(ConfigError, match=r"^mask /nonexistent/mask\.png: no such file$"):
        open_mask("/nonexistent/mask.png")


def _reference_blur(values, sigma):
    """OpenCV GaussianBlur((k, 1)) then ((1, k)) as documented: k = 2 * int(2.5 s + 0.5) + 1, weights
    exp(-(i - (k - 1) / 2)^2 / (2 s^2)) normalised, BORDER_REFLECT_101 (index -1 -> 1, n -> n - 2)."""
    k = 2 * int(2.5 * sigma + 0.5) + 1
    weights = [math.exp(-((i - (k - 1) / 2) ** 2) / (2 * sigma**2)) for i in range(k)]
    total = sum(weights)
    weights = [w / total for w in weights]

    def reflect(i, n):
        while i < 0 or i >= n:
            i = -i if i < 0 else 2 * (n - 1) - i
        return i

    out = values.astype(np.float64)
    for axis in (1, 0):
        n = out.shape[axis]
        new = np.zeros_like(out)
        for pos in range(n):
            acc = 0.0
            for j, w in enumerate(weights):
                src = reflect(pos + j - k // 2, n)
                acc = acc + w * (out[:, src] if axis == 1 else out[src, :])
            if axis == 1:
                new[:, pos] = acc
            else:
                new[pos, :] = acc
        out = np.floor(new + 0.5)
    return out.astype(np.uint8)


@pytest.mark.parametrize("sigma", [1, 4])
def test_mask_blur_is_opencv_gaussian_with_a1111_kernel(sigma):
    from PIL import Image
    from sdcore.generate.inpaint import blur_mask, gaussian_kernel

    assert len(gaussian_kernel(4)) == 21 and len(gaussian_kernel(1)) == 7  # 2 * int(2.5 s + 0.5) + 1
    mask = np.zeros((12, 16), dtype=np.uint8)
    mask[3:7, 0:9] = 255  # touching the border: the reflection counts
    got = np.asarray(blur_mask(Image.fromarray(mask), sigma))
    assert np.array_equal(got, _reference_blur(mask, sigma))


def test_crop_region_is_the_padded_box_expanded_to_the_output_ratio():
    """A 21x11 box (x 10..30, y 50..60) padded by 4: 29x19 at (6, 46); for a square output its height grows by
    int(29 - 19) = 10, half above (5) and half below (5); near the bottom edge the box shifts up inside."""
    from sdcore.generate.inpaint import crop_region, expand_crop_region

    mask = _box_mask(128, 128, (10, 50, 31, 61))
    region = crop_region(mask, 4)
    assert region == (6, 46, 35, 65)
    assert expand_crop_region(region, 64, 64, 128, 128) == (6, 41, 35, 70)
    # a 2:1 output: the width grows instead, int(19 * 2 - 29) = 9: 4 left, 5 right
    assert expand_crop_region(region, 128, 64, 128, 128) == (2, 46, 40, 65)
    low = crop_region(_box_mask(128, 128, (10, 120, 31, 128)), 0)  # y 120..128: grows 10 -> 115..133, shifted up 5
    assert expand_crop_region(low, 64, 64, 128, 128) == (10, 107, 31, 128)
    assert crop_region(_box_mask(box=(0, 0, 0, 0)), 8) is None  # blank


# ----------------------------------------------------------------------------------------- preparation


def test_whole_picture_masks_and_overlay():
    """Whole picture: the blurred mask at the output size is the latent mask's source; the paste-back alpha is
    255 - min(255, 2 m); the latent mask is the bicubic-resized mask /255 rounded."""
    from PIL import Image
    from sdcore.generate.inpaint import Inpaint, blur_mask, prepare

    image, mask = _picture(), _box_mask()
    prepared = prepare(Inpaint(mask, blur=4), image, 64, 64)
    blurred = np.asarray(blur_mask(mask, 4))
    assert np.array_equal(np.asarray(prepared.mask), blurred)
    alpha = np.asarray(prepared.overlay)[..., 3].astype(int)
    assert np.array_equal(alpha, 255 - np.minimum(255, 2 * blurred.astype(int)))
    small = np.asarray(Image.fromarray(blurred).convert("RGB").resize((8, 8), Image.Resampling.BICUBIC))
    assert np.array_equal(prepared.latent_mask(8, 8), np.around(small[..., 0].astype(np.float32) / 255))
    assert prepared.paste_to is None and np.array_equal(np.asarray(prepared.image), np.asarray(image))


def test_paste_back_keeps_unmasked_pixels_and_takes_masked_ones():
    """A1111's overlay: where the paste-back mask is 0 the original exactly, where it is 255 the generated image
    exactly, in between their alpha mix (within PIL's rounding)."""
    from sdcore.generate.inpaint import Inpaint, prepare

    image, generated = _picture(seed=1), _picture(seed=2)
    prepared = prepare(Inpaint(_box_mask(), blur=4), image, 64, 64)
    out = np.asarray(prepared.paste_back(generated)).astype(int)
    alpha = np.asarray(prepared.overlay)[..., 3].astype(int)[..., None]
    orig, gen = np.asarray(image).astype(int), np.asarray(generated).astype(int)
    keep, take = alpha[..., 0] == 255, alpha[..., 0] == 0
    assert keep.any() and take.any()
    assert np.array_equal(out[keep], orig[keep]) and np.array_equal(out[take], gen[take])
    mixed = (orig * alpha + gen * (255 - alpha)) / 255
    assert np.abs(out - mixed).max() <= 2  # premultiplied 8-bit round trips


def test_only_masked_crops_resizes_and_pastes_back_into_the_original():
    """Only masked: the expanded crop of the image goes to the model at the output size; the result is resized back
    and pasted at the crop; pixels outside the blurred mask stay the original's."""
    from sdcore.generate.inpaint import Inpaint, crop_region, expand_crop_region, prepare, resize_image

    image = _picture(96, 80)
    mask = _box_mask(96, 80, (40, 30, 52, 38))
    prepared = prepare(Inpaint(mask, blur=0, full_res=True, padding=4), image, 32, 32)
    box = expand_crop_region(crop_region(mask, 4), 32, 32, 96, 80)
    # the box (40, 30)-(52, 38) padded by 4 is 20x16 at (36, 26); a square output: the height grows by 4, 2 each side
    assert box == (36, 24, 56, 44)
    x1, y1, x2, y2 = box
    assert prepared.paste_to == (x1, y1, x2 - x1, y2 - y1)
    expected = resize_image("fill", image.crop(box), 32, 32)
    assert prepared.image.size == (32, 32)
    assert np.array_equal(np.asarray(prepared.image), np.asarray(expected.convert("RGB")))
    out = np.asarray(prepared.paste_back(_picture(32, 32, seed=3)))
    assert out.shape == (80, 96, 3)
    outside = np.asarray(mask) == 0
    assert np.array_equal(out[outside], np.asarray(image)[outside])


def test_fill_takes_the_colours_around_the_mask():
    """A1111's "fill": unmasked pixels unchanged, the masked area the surrounding colour (a uniform image with a
    different square in the mask: the square disappears)."""
    from PIL import Image
    from sdcore.generate.inpaint import fill_masked

    image = Image.new("RGB", (64, 64), (40, 120, 200))
    image.paste((255, 0, 0), (20, 20, 36, 36))
    mask = _box_mask(box=(18, 18, 38, 38))
    filled = np.asarray(fill_masked(image, mask)).astype(int)
    outside = np.asarray(mask) == 0
    assert np.array_equal(filled[outside], np.asarray(image).astype(int)[outside])
    assert np.abs(filled[20:36, 20:36] - np.array([40, 120, 200])).max() <= 8  # 8-bit premultiplied blurs


def test_latent_fill_modes():
    from sdcore.generate.inpaint import fill_latents

    init, noise = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)
    nmask = torch.zeros(1, 1, 4, 4)
    nmask[..., 1:3, 1:3] = 1
    assert torch.equal(fill_latents(init, nmask, "original"), init)
    nothing = fill_latents(init, nmask, "latent nothing")
    assert torch.equal(nothing[..., 1:3, 1:3], torch.zeros(1, 4, 2, 2)) and torch.equal(
        nothing[..., 0, :], init[..., 0, :]
    )
    noisy = fill_latents(init, nmask, "latent noise", noise)
    assert torch.equal(noisy[..., 1:3, 1:3], noise[..., 1:3, 1:3]) and torch.equal(noisy[..., 3, :], init[..., 3, :])


# ---------------------------------------------------------------------------------------------- the blend


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_blended_output_makes_the_euler_step_see_the_blended_denoised(prediction):
    """k-diffusion's Euler: denoised = x - sigma * eps (x = z * sqrt(1 + sigma^2)); the blended output gives
    denoised * nmask + init * (1 - nmask), as A1111's CFG denoiser blends."""
    from diffusers import EulerDiscreteScheduler
    from sdcore.generate.inpaint import alpha_bar, blended_output

    scheduler = EulerDiscreteScheduler(prediction_type=prediction)
    scheduler.set_timesteps(10)
    scheduler._init_step_index(scheduler.timesteps[3])
    sigma = float(scheduler.sigmas[3])
    ab = alpha_bar(scheduler, scheduler.timesteps[3])
    assert ab == pytest.approx(1 / (1 + sigma**2))
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 6, 6, generator=generator, dtype=torch.float64) * sigma
    z = x / math.sqrt(1 + sigma**2)
    out = torch.randn(1, 4, 6, 6, generator=generator, dtype=torch.float64)
    init = torch.randn(1, 4, 6, 6, generator=generator, dtype=torch.float64)
    nmask = (torch.rand(1, 1, 6, 6, generator=generator) > 0.5).double()
    # k-diffusion's denoisers: CompVisDenoiser (eps) and CompVisVDenoiser (v, sigma_data 1)
    c_skip, c_out = (1.0, -sigma) if prediction == "epsilon" else (1 / (sigma**2 + 1), -sigma / math.sqrt(sigma**2 + 1))

    def denoised(model_out):
        return x * c_skip + model_out * c_out

    fixed = blended_output(out, z, ab, init, nmask, prediction)
    expected = denoised(out) * nmask + init * (1 - nmask)
    torch.testing.assert_close(denoised(fixed), expected, rtol=1e-9, atol=1e-9)
    stepped = scheduler.step(fixed.float(), scheduler.timesteps[3], x.float()).pred_original_sample
    torch.testing.assert_close(stepped.double(), expected, rtol=1e-4, atol=1e-4)


def _inpainting_sd1():
    from sdcore.models.tiny import create_tiny_bundle

    bundle = create_tiny_bundle("sd1", variant="inpainting")  # conv_in takes 9 channels
    return bundle


def _vae_latent(bundle, pixels):
    """The scaled VAE posterior mean of [-1, 1] pixels."""
    with torch.no_grad():
        return bundle.vae.encode(pixels).latent_dist.mean * bundle.vae.config.scaling_factor


@pytest.mark.parametrize(("family", "sampler"), [("sd1", "ddim"), ("sd2", "dpm++2m")])
def test_generation_blends_every_step_and_the_end_with_the_init_latent(tiny_bundles, monkeypatch, family, sampler):
    """A regular model (DDIM, and DPM++ 2M on integer timesteps: alpha_bar = alphas_cumprod[t]; SD1 epsilon, the
    tiny SD2 v-prediction): every denoiser output's x0 is the init latent where the latent mask keeps; the final
    latent is the init latent there; the image keeps the unmasked pixels."""
    from sdcore.generate import pipeline
    from sdcore.generate.inpaint import Inpaint, prepare

    sd1 = tiny_bundles(family)
    v = sd1.prediction_type == "v_prediction"

    image, mask = _picture(), _box_mask()
    prepared = prepare(Inpaint(mask), image, 64, 64)
    init = _vae_latent(sd1, prepared.pixels())
    keep = torch.from_numpy(prepared.latent_mask(8, 8)) == 0
    assert keep.any() and (~keep).any()
    alphas = sd1.noise_scheduler.alphas_cumprod
    seen, finals = [], []

    def record(module, args, kwargs, output):
        z, t = args[0], args[1]
        ab = float(alphas[int(t)])
        out = output[0] if isinstance(output, tuple) else output.sample
        z, out = z.double(), out.double()
        seen.append(math.sqrt(ab) * z - math.sqrt(1 - ab) * out if v else (z - math.sqrt(1 - ab) * out) / math.sqrt(ab))

    decode = pipeline.decode_latents
    monkeypatch.setattr(
        pipeline, "decode_latents", lambda pipe, latents, kind: finals.append(latents) or decode(pipe, latents, kind)
    )
    handle = sd1.unet.register_forward_hook(record, with_kwargs=True)
    try:
        out = pipeline.generate_images(sd1, ["a cat"], steps=4, seed=3, sampler=sampler, init_image=image,
                                       inpaint=Inpaint(mask))[0]  # fmt: skip
    finally:
        handle.remove()
    assert seen
    for x0 in seen:
        torch.testing.assert_close(x0[0][:, keep].float(), init[0][:, keep], rtol=1e-3, atol=1e-3)
    (final,) = finals
    torch.testing.assert_close(final[0][:, keep].float(), init[0][:, keep], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(final[0][:, ~keep].float(), init[0][:, ~keep], atol=1e-3)
    alpha = np.asarray(prepared.overlay)[..., 3]
    assert np.array_equal(np.asarray(out)[alpha == 255], np.asarray(image)[alpha == 255])


def test_latent_noise_starts_from_the_seed_noise_in_the_mask(sd1, monkeypatch):
    """A1111's "latent noise": the img2img start latent is the seed's noise (what the pipeline draws too) in the mask."""
    from sdcore.generate import pipeline
    from sdcore.generate.inpaint import Inpaint, prepare

    image, mask = _picture(), _box_mask()
    starts = []
    original = pipeline.inpaint_latents

    def spy(*args, **kwargs):
        result = original(*args, **kwargs)
        starts.append(result)
        return result

    monkeypatch.setattr(pipeline, "inpaint_latents", spy)
    pipeline.generate_images(sd1, ["a cat", "a dog"], steps=2, seed=7, init_image=image,
                             inpaint=Inpaint(mask, fill="latent noise"))  # fmt: skip
    ((start, _, _),) = starts
    # A1111 runs the pixel "fill" for every masked content but "original", the latent ones included
    prepared = prepare(Inpaint(mask, fill="latent noise"), image, 64, 64)
    init = _vae_latent(sd1, prepared.pixels())
    nmask = torch.from_numpy(prepared.latent_mask(8, 8))
    for row, seed in enumerate((7, 8)):
        noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(start[row][:, nmask == 1], noise[0][:, nmask == 1])
        torch.testing.assert_close(start[row][:, nmask == 0], init[0][:, nmask == 0], rtol=1e-5, atol=1e-5)


def test_inpainting_model_conditioning_is_mask_and_masked_image_latent(monkeypatch):
    """A 9-channel UNet gets [latents, mask (rounded, nearest to the latent), VAE(lerp(x, x * (1 - m), w))];
    txt2img: a mask of ones and the latent of a mid-grey image (A1111's txt2img_image_conditioning)."""
    import torch.nn.functional as F
    from sdcore.generate.inpaint import Inpaint, prepare
    from sdcore.generate.pipeline import generate_images

    bundle = _inpainting_sd1()
    inputs = []
    handle = bundle.unet.conv_in.register_forward_pre_hook(lambda module, args: inputs.append(args[0].detach()))
    image, mask = _picture(), _box_mask()
    try:
        generate_images(bundle, ["a cat"], steps=2, seed=1, init_image=image, inpaint=Inpaint(mask, mask_weight=0.5))
        count = len(inputs)
        generate_images(bundle, ["a cat"], steps=2, seed=1)
    finally:
        handle.remove()
    prepared = prepare(Inpaint(mask), image, 64, 64)
    m = torch.round(torch.from_numpy(np.asarray(prepared.mask, dtype=np.float32) / 255)[None, None])
    x = prepared.pixels()
    expected = torch.cat([F.interpolate(m, size=(8, 8)), _vae_latent(bundle, torch.lerp(x, x * (1 - m), 0.5))], 1)
    for seen in inputs[:count]:
        assert seen.shape[1] == 9
        for row in seen:
            torch.testing.assert_close(row[4:], expected[0], rtol=1e-4, atol=1e-4)
    grey = torch.cat([torch.ones(1, 1, 8, 8), _vae_latent(bundle, torch.zeros(1, 3, 64, 64))], 1)
    for seen in inputs[count:]:
        for row in seen:
            torch.testing.assert_close(row[4:], grey[0], rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------- FLUX.1 Fill


@pytest.fixture(scope="module")
def flux_fill():
    from diffusers import FluxTransformer2DModel
    from sdcore.models.flux.adapter import FluxAdapter

    dev = FluxAdapter().create_tiny(variant="dev", seed=0)
    config = {k: v for k, v in dev.transformer.config.items() if not k.startswith("_")}
    config.update(in_channels=384, out_channels=64)
    fill = copy.copy(dev)
    torch.manual_seed(0)
    fill.transformer = FluxTransformer2DModel.from_config(config).eval()
    return fill


def test_flux_fill_is_flux_fill_pipeline_then_the_paste_back(flux_fill):
    """FLUX.1 Fill = diffusers' FluxFillPipeline on the same image and mask (blur 0: A1111's mask is the file's),
    the unmasked pixels pasted back from the original."""
    from diffusers import FluxFillPipeline
    from sdcore.generate.inpaint import Inpaint
    from sdcore.generate.pipeline import generate_images

    image, mask = _picture(), _box_mask()
    got = generate_images(flux_fill, ["a red ring"], steps=2, cfg=30.0, seed=5, strength=1.0, init_image=image,
                          inpaint=Inpaint(mask, blur=0))[0]  # fmt: skip
    b = flux_fill
    pipe = FluxFillPipeline(scheduler=type(b.noise_scheduler).from_config(b.noise_scheduler.config), vae=b.vae,
                            text_encoder=b.text_encoders[0], tokenizer=b.tokenizers[0], text_encoder_2=b.text_encoders[1],
                            tokenizer_2=b.tokenizers[1], transformer=b.transformer)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        expected = pipe(prompt="a red ring", image=image, mask_image=mask, width=64, height=64, num_inference_steps=2,
                        guidance_scale=30.0, generator=torch.Generator().manual_seed(5)).images[0]  # fmt: skip
    inside = np.asarray(mask) == 255
    assert np.array_equal(np.asarray(got)[inside], np.asarray(expected)[inside])
    assert np.array_equal(np.asarray(got)[~inside], np.asarray(image)[~inside])


def test_flux_fill_refusals(flux_fill):
    from sdcore.errors import ConfigError
    from sdcore.generate.inpaint import Inpaint
    from sdcore.generate.pipeline import generate_images
    from sdcore.models.flux.adapter import FluxAdapter

    with pytest.raises(ConfigError, match=r"FLUX\.1 Fill, an inpainting model: give --init-image and --mask"):
        generate_images(flux_fill, ["a cat"], steps=1, width=32, height=32)
    with pytest.raises(ConfigError, match="drop --true-cfg-scale"):
        generate_images(flux_fill, ["a cat"], steps=1, init_image=_picture(), true_cfg_scale=2.0,
                        inpaint=Inpaint(_box_mask()))  # fmt: skip
    # its prompts encode as dev's; a transformer call without the mask and masked image is one line
    cond = FluxAdapter().encode_prompts(flux_fill, ["a cat"], t5_max_length=8)
    with pytest.raises(ConfigError, match=r"FLUX.1 Fill \[dev\].*it needs a mask"):
        FluxAdapter().predict(flux_fill, torch.zeros(1, 16, 4, 4), torch.tensor([500.0]), cond)


# ---------------------------------------------------------------------------------------------- the CLI


@pytest.fixture()
def files(tmp_path):
    _picture().save(tmp_path / "init.png")
    _box_mask().save(tmp_path / "mask.png")
    (tmp_path / "bad.png").write_text("not an image")
    return tmp_path


def _cli(*args):
    import types

    from click.testing import CliRunner
    from sdcore.builtin.generate_command import generate
    from sdcore.plugins import get_plugin_manager

    pm = get_plugin_manager(builtins=False, entrypoints=False)
    return CliRunner().invoke(generate, list(args), obj=types.SimpleNamespace(pm=pm))


def test_cli_problems_are_one_line_before_loading(files):
    from sdcore.errors import ConfigError

    result = _cli("a cat", "-m", "tiny:sd3", "--mask", str(files / "bad.png"), "-o",
                  str(files / "o.png"))  # fmt: skip
    error = result.exception
    assert isinstance(error, ConfigError) and error.exit_code == 2  # the pre-flight's status
    (line,) = str(error).splitlines()
    assert "--mask repaints part of an init image: add --init-image" in line
    assert "cannot read mask" in line and "this is a" not in line  # SD3 inpaints (the refusals: test_flow_inpaint)
    result = _cli("a cat", "-m", "tiny:sd1", "--mask-blur", "8", "-o", str(files / "o.png"))
    assert isinstance(result.exception, ConfigError) and result.exception.exit_code == 2
    assert "--mask-blur set how --mask inpaints" in str(result.exception)


def test_cli_writes_a1111_inpaint_fields_and_from_png_reads_them(files):
    from sdcore.generate.pnginfo import read_png_parameters
    from sdcore.generate.recall import recall_png

    out = files / "out.png"
    result = _cli("a cat", "-m", "tiny:sd1", "--init-image", str(files / "init.png"), "--mask",
                  str(files / "mask.png"), "--steps", "2", "--seed", "1", "--inpainting-fill", "2",
                  "--inpaint-full-res", "--inpaint-full-res-padding", "8", "--mask-blur", "2",
                  "--inpainting-mask-invert", "-o", str(out))  # fmt: skip
    assert result.exit_code == 0, result.output
    extra = read_png_parameters(out).extra
    assert extra["Denoising strength"] == "0.75"
    fields = {k: extra[k] for k in ("Mask mode", "Mask blur", "Inpaint area", "Masked area padding", "Masked content")}
    assert fields == {"Mask mode": "Inpaint not masked", "Mask blur": "2", "Inpaint area": "Only masked",
                      "Masked area padding": "8", "Masked content": "latent noise"}  # fmt: skip
    assert list(extra).index("RNG") < list(extra).index("Mask mode")  # A1111's order: after RNG
    values = recall_png(out).values
    assert values["mask_blur"] == 2 and values["inpainting_fill"] == "latent noise"
    assert values["inpaint_full_res"] is True and values["inpaint_full_res_padding"] == 8
    assert values["inpainting_mask_invert"] is True
    assert not recall_png(out).ignored


def test_a_mask_of_another_size_is_resized_as_a1111_does():
    """Whole picture: the mask is resized to the output (LANCZOS, "Just resize") after the blur, as A1111 does."""
    from PIL import Image
    from sdcore.generate.inpaint import Inpaint, blur_mask, prepare

    small = _box_mask(32, 32, (8, 8, 20, 20))
    prepared = prepare(Inpaint(small, blur=2), _picture(), 64, 64)
    expected = blur_mask(small, 2).resize((64, 64), Image.Resampling.LANCZOS)
    assert np.array_equal(np.asarray(prepared.mask), np.asarray(expected))


def test_from_png_reads_a1111_inpaint_fields():
    """An A1111 infotext of an inpainting model's "Inpaint upload" restores every inpaint option it names."""
    from sdcore.generate.pnginfo import parse_parameters
    from sdcore.generate.recall import recall_parameters

    text = (
        "a red door\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, Model: x, "
        "Denoising strength: 0.75, Conditional mask weight: 0.5, Mask blur: 8, Inpaint area: Only masked, "
        "Masked area padding: 16, Masked content: fill, Version: v1.10.1"
    )
    recalled = recall_parameters(parse_parameters(text))
    values = recalled.values
    assert values["inpainting_mask_weight"] == 0.5 and values["mask_blur"] == 8
    assert values["inpaint_full_res"] is True and values["inpaint_full_res_padding"] == 16
    assert values["inpainting_fill"] == "fill" and "inpainting_mask_invert" not in values
    assert not recalled.ignored


def _exif_rotated(path, array):
    """``array`` saved as a PNG whose EXIF orientation is 6: a viewer (and A1111) shows it turned 90 degrees
    clockwise."""
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(array).save(path, exif=exif.tobytes())


def test_exif_orientation_turns_the_init_image_and_the_mask_upright(tmp_path, sd1):
    """A1111 reads the init image and the mask through ``images.fix_image`` (``ImageOps.exif_transpose``;
    modules/img2img.py ``img2img``: ``image = images.fix_image(image); mask = images.fix_image(mask)``), so a
    phone photo and its mask are generated on upright: orientation 6 = the stored pixels turned 90 degrees
    clockwise, a 64x32 file giving a 32x64 image."""
    from sdcore.generate.inpaint import Inpaint, open_mask
    from sdcore.generate.pipeline import _load_init_image, generate_images

    stored = np.random.default_rng(4).integers(0, 256, (32, 64, 3), dtype=np.uint8)
    stored_mask = np.zeros((32, 64), dtype=np.uint8)
    stored_mask[4:12, 40:60] = 255
    _exif_rotated(tmp_path / "init.png", stored)
    _exif_rotated(tmp_path / "mask.png", stored_mask)
    upright = np.rot90(stored, k=-1)  # clockwise
    assert np.array_equal(np.asarray(_load_init_image(tmp_path / "init.png")), upright)
    assert np.array_equal(np.asarray(open_mask(tmp_path / "mask.png")), np.rot90(stored_mask, k=-1))
    out = generate_images(sd1, ["a cat"], steps=2, seed=0, init_image=tmp_path / "init.png",
                          inpaint=Inpaint(tmp_path / "mask.png", blur=0))[0]  # fmt: skip
    assert out.size == (32, 64)  # no --size: the upright image's
    keep = np.rot90(stored_mask, k=-1) == 0  # blur 0: the paste-back keeps every unmasked pixel exactly
    assert np.array_equal(np.asarray(out)[keep], upright[keep])


def test_only_masked_size_field_is_the_processing_size_and_from_png_runs(tmp_path):
    """Only masked without --size on a 100x70 image: the crop is generated at 96x64 (the image's size rounded down
    to 8) and pasted into the 100x70 original; A1111 writes "Size" as ``p.width x p.height`` (modules/processing.py
    ``create_infotext``), the processing size, so ``--from-png`` gives a size that runs again."""
    from PIL import Image
    from sdcore.generate.pnginfo import read_png_parameters

    _picture(100, 70).save(tmp_path / "init.png")
    _box_mask(100, 70, (40, 20, 60, 40)).save(tmp_path / "mask.png")
    inputs = ["--init-image", str(tmp_path / "init.png"), "--mask", str(tmp_path / "mask.png")]
    out = tmp_path / "out.png"
    result = _cli("a cat", "-m", "tiny:sd1", *inputs, "--inpaint-full-res", "--steps", "1", "--strength", "1",
                 "-o", str(out))  # fmt: skip
    assert result.exit_code == 0, result.output
    assert Image.open(out).size == (100, 70)
    assert read_png_parameters(out).size == (96, 64)
    again = _cli("-m", "tiny:sd1", "--from-png", str(out), *inputs, "-o", str(tmp_path / "again.png"))
    assert again.exit_code == 0, again.output
    assert Image.open(tmp_path / "again.png").size == (100, 70)


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_a_mask_with_a_transparent_colour_gives_its_alpha(tmp_path, mode):
    """A1111's "Inpaint upload" mask is read as RGBA (modules/ui.py ``init_mask_inpaint = gr.Image(...,
    image_mode="RGBA")``: PIL's ``convert("RGBA")``, which turns a PNG's transparent colour (tRNS) into alpha 0),
    then ``create_binary_mask`` takes that alpha, cut at 128: the white pixels saved as the transparent colour
    repaint nothing, the black ones repaint."""
    from PIL import Image
    from sdcore.generate.inpaint import open_mask

    white, black = (255, 255, 255) if mode == "RGB" else 255, (0, 0, 0) if mode == "RGB" else 0
    picture = Image.new(mode, (4, 1), white)
    picture.putpixel((1, 0), black)
    picture.save(tmp_path / "mask.png", transparency=white)
    assert np.asarray(open_mask(tmp_path / "mask.png")).tolist() == [[0, 255, 0, 0]]


def test_an_oversized_init_image_or_mask_is_one_line(tmp_path, monkeypatch):
    """PIL refuses an image over twice ``MAX_IMAGE_PIXELS`` with ``DecompressionBombError``, which is no OSError:
    the init image and the mask say so in one line, as an unreadable file does (the Kontext reference too)."""
    from PIL import Image
    from sdcore.errors import ConfigError
    from sdcore.generate.inpaint import open_mask
    from sdcore.generate.pipeline import _load_init_image

    _picture().save(tmp_path / "init.png")
    _box_mask().save(tmp_path / "mask.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64 // 4)  # 64x64 is twice over: an error, not a warning
    with pytest.raises(ConfigError, match=r"cannot read init image .*init\.png"):
        _load_init_image(tmp_path / "init.png")
    with pytest.raises(ConfigError, match=r"cannot read mask .*mask\.png"):
        open_mask(tmp_path / "mask.png")
