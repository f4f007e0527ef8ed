"""Training inpainting models (SD inpainting UNets, FLUX.1 Fill): each sample's mask and masked image are made
as OneTrainer makes them (recomputed here from its rules: mgds' GenerateMaskedConditioningImage, ScaleImage,
ShuffleFluxFillMaskChannels, SampleVAEDistribution(mode='mean'), RandomLatentMaskRemove), cached or not, and
reach the denoiser in the layout of diffusers' inpaint pipelines (their conv_in / transformer input hooked)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from PIL import Image  # noqa: E402
from runtime_methods import ConvOutMethod, ProjOutMethod  # noqa: E402
from sdcore.testing.contract import contract_options  # noqa: E402
from sdcore.train.data import SampleRef  # noqa: E402
from sdcore.train.loop import TrainSession  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def sd1_inpainting():
    """A tiny SD1 model whose UNet's conv_in takes 9 channels (the layout of sd-v1-5-inpainting)."""
    from sdcore.models.tiny import create_tiny_bundle

    bundle = create_tiny_bundle("sd1", variant="inpainting")  # conv_in takes 9 channels
    return bundle


def flux_fill():
    """A tiny FLUX.1 dev whose ``img_in`` takes 384 channels (FLUX.1 Fill's layout; output still 64)."""
    from diffusers import FluxTransformer2DModel
    from sdcore.models.flux.adapter import FluxAdapter

    bundle = FluxAdapter().create_tiny(variant="dev", seed=0)
    config = {k: v for k, v in bundle.transformer.config.items() if not k.startswith("_")}
    torch.manual_seed(0)
    bundle.transformer = FluxTransformer2DModel.from_config({**config, "in_channels": 384, "out_channels": 64})
    return bundle


def _masks(tmp_path: Path) -> Path:
    """kohya mask images (R channel; 255 = repaint): a soft-edged left-half hole, different per image."""
    folder = tmp_path / "masks"
    folder.mkdir(exist_ok=True)
    for i, image in enumerate(sorted((tmp_path / "data").rglob("*.png"))):
        mask = np.zeros((64, 64), dtype=np.uint8)
        mask[:, : 24 + 4 * i] = 255
        mask[:, 24 + 4 * i] = 128  # a grey column: the soft blend and the bilinear shrink both show
        Image.fromarray(np.stack([mask] * 3, axis=-1)).save(folder / f"{image.stem}.png")
    return folder


def _session(tmp_path: Path, bundle, family: str = "sd1", **extra) -> TrainSession:
    base = {"max_steps": 1, "save_state": False, "flip": False, "t5xxl_max_token_length": 8, **extra}
    method = ProjOutMethod if family == "flux" else ConvOutMethod
    o = contract_options(method, tmp_path, base, family=family)
    s = TrainSession(method(o), bundle=copy.deepcopy(bundle))
    s.setup()
    return s


def _expected(s: TrainSession, masks: Path | None, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """OneTrainer's conditioning recomputed: pixels 0..1, mask 0..1; masked = image (1 - m) + 0.5 m, to [-1, 1],
    VAE mean, the family's shift and scale; the mask shrunk bilinearly with antialias (SD) or its 8x8 blocks as
    64 channels, block row-major (Fill)."""
    vae = s.bundle.vae
    masked_latents, latent_masks = [], []
    for entry in s.data.entries:
        image = np.asarray(Image.open(entry.path).convert("RGB"), dtype=np.float32) / 255.0
        if masks is None:
            m = np.ones(image.shape[:2], dtype=np.float32)
        else:
            m = np.asarray(Image.open(masks / f"{entry.path.stem}.png").convert("RGB"), dtype=np.float32)[..., 0] / 255
        conditioning = image * (1 - m[..., None]) + 0.5 * m[..., None]
        pixels = torch.from_numpy(conditioning * 2 - 1).permute(2, 0, 1)[None]
        with torch.no_grad():
            mean = vae.encode(pixels).latent_dist.mean
        masked_latents.append(s.bundle.normalize_latents(mean)[0])
        t = torch.from_numpy(m)
        if kind == "unet":
            small = torch.nn.functional.interpolate(t[None, None], size=(8, 8), mode="bilinear", antialias=True)[0]
        else:
            small = torch.stack([t[dy::8, dx::8] for dy in range(8) for dx in range(8)])
        latent_masks.append(small)
    return torch.stack(latent_masks), torch.stack(masked_latents)


@pytest.mark.parametrize("cached", [True, False])
@pytest.mark.parametrize("kind", ["unet", "fill"])
def test_conditioning_is_onetrainers_rule_cached_or_not(tmp_path, kind, cached):
    bundle, family = (sd1_inpainting(), "sd1") if kind == "unet" else (flux_fill(), "flux")
    contract_options(ProjOutMethod, tmp_path, {}, family=family)  # the dataset
    masks = _masks(tmp_path)
    s = _session(tmp_path, bundle, family, masked_loss=True, conditioning_data_dir=str(masks), cache_latents=cached)
    batch = s.make_batch([SampleRef(i, 0, 0) for i in range(len(s.data.entries))])
    want_mask, want_latents = _expected(s, masks, kind)
    assert batch.inpainting_mask is not None and batch.masked_latents is not None
    assert batch.inpainting_mask.shape == want_mask.shape == ((4, 1, 8, 8) if kind == "unet" else (4, 64, 8, 8))
    torch.testing.assert_close(batch.inpainting_mask, want_mask, rtol=0, atol=1e-6)
    torch.testing.assert_close(batch.masked_latents, want_latents, rtol=1e-4, atol=1e-5)
    assert batch.masks is not None  # the same masks still weigh the loss (kohya's area filter)


def _condlabels(tmp_path: Path) -> dict[str, np.ndarray]:
    """OneTrainer's custom conditioning images for two of the four images: one of the image's size, one of half of
    it (stretched to the image's size first); the values they should give as pixels 0..255."""
    images = sorted((tmp_path / "data").rglob("*.png"))
    rng = np.random.default_rng(5)
    wanted = {}
    for image, side in ((images[0], 64), (images[2], 32)):
        array = rng.integers(0, 255, (side, side, 3), dtype=np.uint8)
        Image.fromarray(array).save(image.with_name(image.stem + "-condlabel.png"))
        stretched = Image.fromarray(array).resize((64, 64)) if side != 64 else Image.fromarray(array)
        wanted[image.stem] = np.asarray(stretched, dtype=np.float32)
    return wanted


@pytest.mark.parametrize("cached", [True, False])
def test_custom_conditioning_images_are_the_masked_images(tmp_path, cached):
    """--inpainting-conditioning-images (OneTrainer's custom_conditioning_image): an image's -condlabel.png is its
    masked image as it is (mgds' SelectFirstInput picks it before GenerateMaskedConditioningImage's); the others
    keep the generated one; the mask is the dataset's either way; -condlabel files are not training images."""
    bundle = sd1_inpainting()
    contract_options(ProjOutMethod, tmp_path, {})
    masks = _masks(tmp_path)
    wanted = _condlabels(tmp_path)
    s = _session(tmp_path, bundle, masked_loss=True, conditioning_data_dir=str(masks), cache_latents=cached,
                 inpainting_conditioning_images=True)  # fmt: skip
    assert len(s.data.entries) == 4 and not any("condlabel" in e.path.name for e in s.data.entries)
    batch = s.make_batch([SampleRef(i, 0, 0) for i in range(4)])
    want_mask, generated = _expected(s, masks, "unet")
    torch.testing.assert_close(batch.inpainting_mask, want_mask, rtol=0, atol=1e-6)
    for i, entry in enumerate(s.data.entries):
        if entry.path.stem not in wanted:
            torch.testing.assert_close(batch.masked_latents[i], generated[i], rtol=1e-4, atol=1e-5)
            continue
        pixels = torch.from_numpy(wanted[entry.path.stem] / 127.5 - 1.0).permute(2, 0, 1)[None]
        with torch.no_grad():
            own = s.bundle.normalize_latents(s.bundle.vae.encode(pixels).latent_dist.mean)[0]
        torch.testing.assert_close(batch.masked_latents[i], own, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(own, generated[i], atol=1e-2)


def test_no_mask_means_the_whole_image_and_unmasked_draws_blank_it(tmp_path):
    """Without dataset masks every sample is a full hole (masked image all grey); with
    --inpainting-unmasked-probability 1 every sample gets the full mask and a zero image's latents (mgds'
    RandomLatentMaskRemove) and its dataset mask no longer weighs the loss."""
    bundle = sd1_inpainting()
    contract_options(ProjOutMethod, tmp_path, {})
    s = _session(tmp_path, bundle)
    refs = [SampleRef(i, 0, 0) for i in range(4)]
    batch = s.make_batch(refs)
    want_mask, want_latents = _expected(s, None, "unet")
    torch.testing.assert_close(batch.inpainting_mask, want_mask)
    torch.testing.assert_close(batch.inpainting_mask, torch.ones(4, 1, 8, 8))
    torch.testing.assert_close(batch.masked_latents, want_latents, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        blank = s.bundle.normalize_latents(s.bundle.vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mode())
    torch.testing.assert_close(batch.masked_latents, blank.expand(4, -1, -1, -1), rtol=1e-4, atol=1e-5)

    masks = _masks(tmp_path)
    s = _session(tmp_path, bundle, masked_loss=True, conditioning_data_dir=str(masks),
                 inpainting_unmasked_probability=1.0)  # fmt: skip
    batch = s.make_batch(refs)
    torch.testing.assert_close(batch.inpainting_mask, torch.ones(4, 1, 8, 8))
    torch.testing.assert_close(batch.masked_latents, blank.expand(4, -1, -1, -1), rtol=1e-4, atol=1e-5)
    assert batch.masks is None  # no dataset mask for a replaced sample: the whole image is trained
    # a share of samples: each sample's own draw, the same every time the same sample comes again
    s = _session(tmp_path, bundle, masked_loss=True, conditioning_data_dir=str(masks),
                 inpainting_unmasked_probability=0.5)  # fmt: skip
    many = [SampleRef(i % 4, e, 0) for e in range(6) for i in range(4)]
    drawn = s.batches.unmasked(many)
    assert 0 < len(drawn) < len(many) and s.batches.unmasked(many) == drawn


def test_unet_input_is_diffusers_inpaint_pipelines_order():
    """conv_in of StableDiffusionInpaintPipeline's UNet call sees [noisy, mask, masked latents]: the adapter's
    predict given those parts builds the same input."""
    from diffusers import StableDiffusionInpaintPipeline
    from sdcore.models.sd_unet import SD1_ADAPTER
    from sdcore.train.inpainting import latent_mask

    bundle = sd1_inpainting()
    seen: list[torch.Tensor] = []
    hook = bundle.unet.conv_in.register_forward_hook(lambda m, args, out: seen.append(args[0].detach().clone()))
    pipe = StableDiffusionInpaintPipeline(vae=bundle.vae, text_encoder=bundle.text_encoders[0],
                                          tokenizer=bundle.tokenizers[0], unet=bundle.unet,
                                          scheduler=bundle.noise_scheduler, safety_checker=None,
                                          feature_extractor=None, requires_safety_checker=False)  # fmt: skip
    mask = np.zeros((64, 64), dtype=np.float32)
    mask[16:48, 8:40] = 1.0
    image = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8))
    pipe(prompt="a", image=image, mask_image=Image.fromarray((mask * 255).astype(np.uint8)), height=64, width=64,
         num_inference_steps=1, guidance_scale=1.0, output_type="latent")  # fmt: skip
    given = seen[-1]
    assert given.shape == (1, 9, 8, 8)
    # channel 4 is the mask (diffusers shrinks it nearest; OneTrainer's training mask is the bilinear one)
    nearest = torch.nn.functional.interpolate(torch.from_numpy(mask)[None, None], size=(8, 8))
    torch.testing.assert_close(given[:, 4:5], nearest)
    assert not torch.equal(latent_mask(mask, (8, 8), "unet")[None], nearest)  # the soft edge is OneTrainer's
    cond = SD1_ADAPTER.encode_prompts(bundle, ["a"])
    SD1_ADAPTER.predict(bundle, given[:, :4], torch.tensor([500]), cond, inpainting=(given[:, 4:5], given[:, 5:]))
    torch.testing.assert_close(seen[-1], given, rtol=0, atol=0)
    hook.remove()


def test_fill_input_is_flux_fill_pipelines_layout():
    """FluxFillPipeline's transformer input per token is [packed noisy, packed masked latents, packed 64-channel
    mask]; its mask channels equal :func:`latent_mask` of the pixel mask (8x8 blocks, row-major), and the
    adapter's predict given the unpacked parts builds the same input."""
    from diffusers import FluxFillPipeline
    from sdcore.models.flux.adapter import FluxAdapter, pack_latents, unpack_latents
    from sdcore.train.inpainting import latent_mask

    bundle = flux_fill()
    seen: list[torch.Tensor] = []
    hook = bundle.transformer.x_embedder.register_forward_hook(
        lambda m, args, out: seen.append(args[0].detach().clone())
    )
    pipe = FluxFillPipeline(scheduler=bundle.noise_scheduler, vae=bundle.vae, text_encoder=bundle.text_encoders[0],
                            tokenizer=bundle.tokenizers[0], text_encoder_2=bundle.text_encoders[1],
                            tokenizer_2=bundle.tokenizers[1], transformer=bundle.transformer)  # fmt: skip
    rng = np.random.default_rng(1)
    mask = (rng.random((64, 64)) > 0.5).astype(np.float32)  # every pixel its own value: the layout shows
    image = Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8))
    pipe(prompt="a", image=image, mask_image=Image.fromarray((mask * 255).astype(np.uint8)), height=64, width=64,
         num_inference_steps=1, max_sequence_length=8, output_type="latent")  # fmt: skip
    given = seen[-1]
    assert given.shape == (1, 16, 384)
    noisy, masked = unpack_latents(given[..., :64], 8, 8), unpack_latents(given[..., 64:128], 8, 8)
    mask64 = unpack_latents(given[..., 128:], 8, 8)
    torch.testing.assert_close(mask64, latent_mask(mask, (8, 8), "fill")[None])
    torch.testing.assert_close(pack_latents(mask64), given[..., 128:])
    adapter = FluxAdapter()
    cond = adapter.encode_prompts(bundle, ["a"], t5_max_length=8)
    adapter.predict(bundle, noisy, torch.tensor([500.0]), cond, inpainting=(mask64, masked))
    torch.testing.assert_close(seen[-1], given, rtol=0, atol=1e-6)
    hook.remove()


def test_preflight_says_what_an_inpainting_run_cannot_do(tmp_path):
    """--inpainting-unmasked-probability out of range or on a model without the mask input, control images on an
    inpainting model and sample prompts without an image on FLUX.1 Fill: one line each, before the first step (an SD inpainting
    model's samples render)."""
    from sdcore.models.layout import layout_of_bundle
    from sdcore.models.tiny import create_tiny_bundle
    from sdcore.train.inpainting import inpainting_problems

    o = contract_options(ProjOutMethod, tmp_path, {"inpainting_unmasked_probability": 1.5})
    problems = inpainting_problems(o, None, None)
    assert problems == ["--inpainting-unmasked-probability 1.5: must be in [0, 1]"]
    o = contract_options(ProjOutMethod, tmp_path, {"inpainting_unmasked_probability": 0.1})
    plain = layout_of_bundle(create_tiny_bundle("sd1"))
    assert "acts on inpainting models" in inpainting_problems(o, plain, None)[0]
    o = contract_options(ProjOutMethod, tmp_path, {"inpainting_unmasked_probability": 0.1, "sample_prompts": "x"})
    assert inpainting_problems(o, layout_of_bundle(sd1_inpainting()), None) == []  # renders as A1111's txt2img
    custom = contract_options(ProjOutMethod, tmp_path, {"inpainting_conditioning_images": True})
    assert "without the mask input" in inpainting_problems(custom, plain, None)[0]
    random = contract_options(ProjOutMethod, tmp_path, {"inpainting_conditioning_images": True,
                                                        "inpainting_masks": "random", "cache_latents": False})  # fmt: skip
    assert "not of kohya's random masks" in inpainting_problems(random, layout_of_bundle(sd1_inpainting()), None)[0]
    from sdcore.data.dataset import scan_dataset

    (line,) = inpainting_problems(custom, layout_of_bundle(sd1_inpainting()), scan_dataset(custom))
    assert "no image of the dataset has a <name>-condlabel.png beside it" in line
    problems = inpainting_problems(o, layout_of_bundle(flux_fill()), None)
    assert problems == [  # a prompt without an image (--i, sample_inpainting): tests/train/test_fill_samples.py
        "--sample-prompts: a FLUX.1 Fill sample in kohya's prompt format needs an image to inpaint, --i IMAGE (a "
        "wobbly ellipse mask is drawn from the seed; kohya trains no Fill model, so it has no rendering without one "
        "to follow); 1 of 1 prompt(s) have none (the first: 'x'): give them --i or leave them out"
    ]


def test_trained_inpainting_models_stay_inpainting(tmp_path):
    """A full fine-tune's result keeps the 9-channel UNet (inpainting pipeline class) / Fill's 384-wide img_in
    (FluxFillPipeline class), so what was trained loads as what it was."""
    import json

    from sdcore.models.load import load_model

    folder = sd1_inpainting().save(tmp_path / "sd", format="diffusers")
    assert (
        json.loads((Path(folder) / "model_index.json").read_text())["_class_name"] == "StableDiffusionInpaintPipeline"
    )
    assert load_model(folder).inpainting
    folder = flux_fill().save(tmp_path / "fill", format="diffusers")
    assert json.loads((Path(folder) / "model_index.json").read_text())["_class_name"] == "FluxFillPipeline"
    assert load_model(folder).family_label == "flux-fill"


@pytest.mark.parametrize(
    ("family", "architecture"),
    [("sd1", "stable-diffusion-v1-inpainting"), ("sdxl", "stable-diffusion-xl-v1-base-inpainting")],
)
def test_inpainting_single_files_say_so(tmp_path, family, architecture):
    """A full fine-tune's single file keeps the 9-channel conv_in where A1111 reads it
    (``model.diffusion_model.input_blocks.0.0.weight``: its sd_models_config picks the inpainting config when
    that weight takes 9 channels), reloads as an inpainting model, and names the inpainting architecture in its
    modelspec as OneTrainer's model specs do (resources/sd_model_spec/sd_1.5_inpainting.json,
    sd_xl_base_1.0_inpainting.json: "stable-diffusion-xl-v1-base-inpainting")."""
    from safetensors import safe_open
    from sdcore.models.load import load_model
    from sdcore.models.tiny import create_tiny_bundle

    bundle = create_tiny_bundle(family, variant="inpainting")
    path = bundle.save(tmp_path / f"{family}-inpainting.safetensors")
    with safe_open(path, "pt") as f:
        assert f.get_slice("model.diffusion_model.input_blocks.0.0.weight").get_shape()[1] == 9
        assert (f.metadata() or {})["modelspec.architecture"] == architecture
    assert load_model(path).inpainting


def test_alpha_masks_follow_random_crops_and_flips(tmp_path):
    """alpha_mask images with random crops and flips (OneTrainer's ScaleCropImage and RandomFlip take the image
    and its mask together): each sample's inpainting mask, masked image and loss mask are those of the very
    pixels its latents come from. The images carry their mask in the red channel too (0 or 255), so the mask
    a view should have is read off its own pixels."""
    data = tmp_path / "data" / "1_x"
    data.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(3):
        image = (rng.random((64, 96, 3)) * 255).astype(np.uint8)
        image[..., 0] = np.where(rng.random((64, 96)) > 0.5, 255, 0)
        Image.fromarray(np.concatenate([image, image[..., :1]], axis=-1), "RGBA").save(data / f"i{i}.png")
        (data / f"i{i}.txt").write_text("x", encoding="utf-8")
    s = _session(tmp_path, sd1_inpainting(), alpha_mask=True, random_crop=True, buckets=False, flip=True,
                 cache_latents=False)  # fmt: skip
    views = set()
    for epoch in range(2):
        for i in range(3):
            ref = SampleRef(i, 0, epoch)
            view = s.data.view_of(ref)
            views.add((view.crop, view.flip))
            batch = s.make_batch([ref])
            pixels = torch.from_numpy(s.batches.pixels(i, view)[0])
            m = (pixels[0] + 1) / 2
            want = torch.nn.functional.interpolate(m[None, None], size=(8, 8), mode="bilinear", antialias=True)[0]
            torch.testing.assert_close(batch.inpainting_mask[0], want, rtol=0, atol=1e-5)
            with torch.no_grad():
                mean = s.bundle.vae.encode((pixels * (1 - m))[None]).latent_dist.mean
            torch.testing.assert_close(
                batch.masked_latents[0], s.bundle.normalize_latents(mean)[0], rtol=1e-4, atol=1e-5
            )
            area = torch.nn.functional.interpolate(m[None, None], size=(8, 8), mode="area")[0]  # kohya's loss mask
            torch.testing.assert_close(batch.masks[0], area, rtol=0, atol=1e-5)
    assert len({crop for crop, _ in views}) > 1 and len({flip for _, flip in views}) == 2


def test_preflight_lists_unreadable_conditioning_images(tmp_path):
    """A damaged -condlabel.png is one pre-flight line (as a damaged -masklabel mask is), not an error at the step
    that first reads it: mgds' LoadImage (src/mgds/pipelineModules/LoadImage.py, get_item) raises on a file it
    cannot decode ("could not load image, it might be corrupted") instead of falling back to the generated image."""
    from sdcore.data.dataset import scan_dataset
    from sdcore.models.layout import layout_of_bundle
    from sdcore.train.inpainting import inpainting_problems

    o = contract_options(ProjOutMethod, tmp_path, {"inpainting_conditioning_images": True})
    images = sorted((tmp_path / "data").rglob("*.png"))
    Image.new("RGB", (64, 64), (9, 9, 9)).save(images[0].with_name(images[0].stem + "-condlabel.png"))
    broken = images[1].with_name(images[1].stem + "-condlabel.png")
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    problems = inpainting_problems(o, layout_of_bundle(sd1_inpainting()), scan_dataset(o))
    assert len(problems) == 1 and problems[0].startswith("--inpainting-conditioning-images: 1 -condlabel image(s)")
    assert str(broken) in problems[0] and images[0].stem + "-condlabel" not in problems[0]


def test_every_condlabel_file_stays_out_of_training(tmp_path):
    """With --inpainting-conditioning-images no -condlabel file is a training image, whatever its image suffix:
    OneTrainer's CollectPaths drops every file whose name without its extension ends with '-condlabel'
    (modules/dataLoader/mixin/DataLoaderText2ImageMixin.py, exclude_postfix=['-masklabel','-condlabel'];
    mgds CollectPaths.start: os.path.splitext(name)[0].endswith(postfix)); only <stem>-condlabel.png is read as
    one (ModifyPath with extension '.png')."""
    from sdcore.data.dataset import scan_dataset

    o = contract_options(ProjOutMethod, tmp_path, {"inpainting_conditioning_images": True})
    images = sorted((tmp_path / "data").rglob("*.png"))
    grey = Image.new("RGB", (64, 64), (9, 9, 9))
    grey.save(images[0].with_name(images[0].stem + "-condlabel.png"))
    grey.save(images[1].with_name(images[1].stem + "-condlabel.jpg"))
    grey.save(images[2].with_name(images[2].stem + "-condlabel.PNG"), format="PNG")
    names = sorted(e.path.name for e in scan_dataset(o).entries)
    assert names == sorted(p.name for p in images)
    plain = contract_options(ProjOutMethod, tmp_path, {})
    assert len(scan_dataset(plain).entries) == 7  # without the option they are images, as kohya reads a folder
