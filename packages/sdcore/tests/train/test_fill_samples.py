"""Training samples of FLUX.1 Fill (``tiny:flux-fill``): kohya-style ``--i`` lines and OneTrainer's
``sample_inpainting`` samples render as a txt2img from the seed's noise on the rule's image conditioning; a OneTrainer
sample without ``sample_inpainting`` on a blank image under a full mask, as OneTrainer's FluxSampler renders it.

- kohya's ``--i``: the image stretched to the sample's size (Lanczos), the wobbly ellipse of the seed, the image cut
  where the mask is at least 0.5, encoded (posterior mean); Fill's mask input is that cut mask's 8x8 blocks. That is
  exactly what diffusers' ``FluxFillPipeline`` makes of that image and (binary) mask when its posterior draw is the
  mean, so the sample is compared with the pipeline called directly (the same noise and prompt encodings).
- OneTrainer's (its FluxSampler ``__sample_inpainting``, recomputed here): image and grey mask stretched with
  antialiased bilinear, the masked image ``(2 x - 1) * (1 - eroded)`` with ``eroded`` a 5x5 box average (replicated
  borders) above 0.5, its VAE mode shifted and scaled and packed 2x2, and the mask itself (not cut) laid out as
  8x8 blocks and packed: the transformer's input tokens are ``[noise, masked latent, mask]``.
Neither rule pastes the source back over the unmasked pixels."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sdcore.generate.pipeline")

from inpaint_images import picture as _picture  # noqa: E402
from inpaint_images import rule_mask as _mask  # noqa: E402
from PIL import Image  # noqa: E402
from runtime_methods import ConvOutMethod  # noqa: E402
from sdcore.testing.contract import contract_options  # noqa: E402
from sdcore.train.options import TrainOptions  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WIDTH, HEIGHT, SEED = 128, 64, 5  # kept by kohya's and OneTrainer's size rules on FLUX.1 (16 / nearest 64)


@pytest.fixture(scope="module")
def fill():
    from sdcore.models.load import load_model

    return load_model("tiny:flux-fill")


class _Plain(ConvOutMethod):
    def __init__(self) -> None:
        pass

    def sampling(self, bundle):
        return contextlib.nullcontext({})


def _pack(latents: torch.Tensor) -> torch.Tensor:
    """Flux's 2x2 packing: ``[B, C, h, w]`` -> ``[B, h/2 * w/2, 4 C]``."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def _seed_noise(seed: int, width: int, height: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return _pack(torch.randn((1, 16, height // 8, width // 8), generator=generator, dtype=torch.float32))


def _render(bundle, tmp_path: Path, sample_prompts: str, tag: str, capture: list | None = None) -> Path:
    from sdcore.train.sampling import render_samples

    handles = []
    if capture is not None:  # every transformer call: its tokens as img_in sees them, and the text it is given
        handles.append(bundle.transformer.x_embedder.register_forward_pre_hook(
            lambda module, args: capture.append(("tokens", args[0].detach().clone()))))  # fmt: skip
        handles.append(bundle.transformer.register_forward_pre_hook(
            lambda module, args, kwargs: capture.append(("text", kwargs["encoder_hidden_states"].detach().clone(),
                                                         kwargs["pooled_projections"].detach().clone())),
            with_kwargs=True))  # fmt: skip
    try:
        options = TrainOptions(sample_prompts=sample_prompts, resolution=64)
        path = render_samples(bundle, _Plain(), options, device=torch.device("cpu"), folder=tmp_path, tag=tag,
                              step=2, say=lambda _: None)  # fmt: skip
    finally:
        for handle in handles:
            handle.remove()
    assert path is not None
    return path


def test_a_kohya_i_sample_is_flux_fill_pipelines_image_of_the_stretched_image_and_the_wobbly_ellipse(
    fill, tmp_path, monkeypatch
):
    from diffusers import FluxFillPipeline
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    from sdcore.generate.pnginfo import parse_parameters
    from sdcore.train.random_masks import wobbly_ellipse

    image_path = _picture(tmp_path / "door.png")
    seen: list = []
    line = f"a door --i {image_path} --w {WIDTH} --h {HEIGHT} --s 2 --d {SEED} --ss euler"
    path = _render(fill, tmp_path, line, "kohya", seen)
    sample = np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)
    assert sample.shape == (HEIGHT, WIDTH, 3)

    # the pipeline called directly on kohya's image and mask (its posterior draw made the mean, as the rule is)
    stretched = Image.open(image_path).convert("RGB").resize((WIDTH, HEIGHT), Image.Resampling.LANCZOS)
    ellipse = wobbly_ellipse(WIDTH, HEIGHT, SEED)
    assert 0.1 < float(np.mean(ellipse)) < 0.35
    mask = Image.fromarray((np.asarray(ellipse) * 255).astype(np.uint8), mode="L")
    _, embeds, pooled = next(entry for entry in seen if entry[0] == "text")
    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean)
    pipe = FluxFillPipeline(scheduler=fill.noise_scheduler, vae=fill.vae, text_encoder=fill.text_encoders[0],
                            tokenizer=fill.tokenizers[0], text_encoder_2=fill.text_encoders[1],
                            tokenizer_2=fill.tokenizers[1], transformer=fill.transformer)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        direct = pipe(image=stretched, mask_image=mask, prompt_embeds=embeds, pooled_prompt_embeds=pooled,
                      latents=_seed_noise(SEED, WIDTH, HEIGHT), height=HEIGHT, width=WIDTH, num_inference_steps=2,
                      guidance_scale=30.0).images[0]  # fmt: skip
    expected = np.asarray(direct.convert("RGB"), dtype=np.int16)
    assert np.abs(sample - expected).max() <= 1
    # the seed's noise, a full schedule from it (2 steps, no img2img start), and no paste-back of the source
    tokens = [entry[1] for entry in seen if entry[0] == "tokens"]
    assert len(tokens) == 2 and tokens[0].shape[-1] == 384
    torch.testing.assert_close(tokens[0][..., :64], _seed_noise(SEED, WIDTH, HEIGHT), rtol=0, atol=0)
    kept = np.asarray(ellipse) < 0.5
    assert np.abs(sample - np.asarray(stretched, dtype=np.int16))[kept].mean() > 10

    fields = parse_parameters(Image.open(path).info["parameters"]).extra
    assert (fields["Inpaint image"], fields["Inpaint mask"]) == ("door.png", "wobbly ellipse")
    assert float(fields["Distilled CFG Scale"]) == 30.0  # Fill's own default guidance without --g


def test_a_onetrainer_sample_inpainting_conditions_fill_by_onetrainers_rule(fill, tmp_path):
    from sdcore.generate.pnginfo import parse_parameters

    image_path, mask_path = _picture(tmp_path / "door.png"), _mask(tmp_path / "door-mask.png")
    sample = {"prompt": "a door", "width": WIDTH, "height": HEIGHT, "diffusion_steps": 1, "seed": SEED,
              "cfg_scale": 12.0, "sample_inpainting": True, "base_image_path": str(image_path),
              "mask_image_path": str(mask_path)}  # fmt: skip
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps({"training_method": "LORA", "model_type": "FLUX_FILL_DEV_1", "samples": [sample]}), encoding="utf-8"
    )
    seen: list = []
    path = _render(fill, tmp_path, str(config), "onetrainer", seen)

    def stretched(p: Path, mode: str) -> torch.Tensor:  # torchvision's antialiased bilinear Resize of [0, 1] values
        picture = Image.open(p).convert(mode)
        planes = picture.split() if mode == "RGB" else [picture]
        return torch.from_numpy(np.stack([
            np.asarray(Image.fromarray(np.asarray(q, dtype=np.float32) / 255.0, mode="F").resize(
                (WIDTH, HEIGHT), Image.Resampling.BILINEAR)) for q in planes
        ]))  # fmt: skip

    image, mask = stretched(image_path, "RGB"), stretched(mask_path, "L")
    erode = torch.nn.Conv2d(1, 1, 5, bias=False, padding=2, padding_mode="replicate")
    erode.weight.data = torch.ones(1, 1, 5, 5) / 25
    with torch.no_grad():
        eroded = (erode(mask[None]) > 0.5).float()[0]
        masked = ((image * 2.0 - 1.0) * (1 - eroded))[None]
        latent = fill.vae.encode(masked).latent_dist.mode()
    latent = (latent - fill.vae.config.shift_factor) * fill.vae.config.scaling_factor
    h, w = HEIGHT // 8, WIDTH // 8
    blocks = mask.view(1, h, 8, w, 8).permute(0, 2, 4, 1, 3).reshape(1, 64, h, w)
    # each piece is OneTrainer's own: the box average drops the thin line, the packed mask keeps the grey patch
    assert not torch.equal(eroded, (mask >= 0.5).float())
    assert bool(((blocks > 0) & (blocks < 0.5)).any())

    (tokens,) = [entry[1] for entry in seen if entry[0] == "tokens"]  # 1 step
    assert tokens.shape == (1, (h // 2) * (w // 2), 384)
    torch.testing.assert_close(tokens[..., :64], _seed_noise(SEED, WIDTH, HEIGHT), rtol=0, atol=0)
    torch.testing.assert_close(tokens[..., 64:128], _pack(latent), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(tokens[..., 128:], _pack(blocks), rtol=1e-5, atol=1e-5)
    fields = parse_parameters(Image.open(path).info["parameters"]).extra
    assert float(fields["Distilled CFG Scale"]) == 12.0  # cfg_scale: the embedded guidance, as OneTrainer's
    assert (fields["Inpaint image"], fields["Inpaint mask"]) == ("door.png", "door-mask.png")


def test_the_preflight_refuses_fill_prompts_without_an_image_in_one_line(fill, tmp_path):
    from sdcore.models.layout import layout_of_bundle
    from sdcore.train.inpainting import inpainting_problems

    image = _picture(tmp_path / "door.png")
    prompts = tmp_path / "prompts.txt"
    layout = layout_of_bundle(fill)

    def problems(*lines: str) -> list[str]:
        prompts.write_text("\n".join(lines), encoding="utf-8")
        o = contract_options(ConvOutMethod, tmp_path, {"sample_prompts": str(prompts), "model": "tiny:flux-fill"})
        return inpainting_problems(o, layout, None)

    assert problems(f"a door --i {image}", f"a window --img {image} --g 20") == []
    # kohya trains no Fill model (its FLUX.1 loader takes a 64-wide img_in), so a line without --i has no kohya
    # rendering to follow: refused before the run
    assert problems(f"a door --i {image}", "a plain sky", "a red sea") == [
        "--sample-prompts: a FLUX.1 Fill sample in kohya's prompt format needs an image to inpaint, --i IMAGE (a "
        "wobbly ellipse mask is drawn from the seed; kohya trains no Fill model, so it has no rendering without one "
        "to follow); 2 of 3 prompt(s) have none (the first: 'a plain sky'): give them --i or leave them out"
    ]
    assert problems(f"a door --i {image} --l 3 --n dark") == [
        "--sample-prompts: --l is true CFG, which FLUX.1 Fill does not take (it runs on its distilled guidance: "
        "--g, default 30); drop --l"
    ]


def test_a_kontext_reference_on_a_fill_sample_is_one_line_before_and_during_the_run(fill, tmp_path):
    """``--ci``/``--ctrl_img`` is FLUX.1 Kontext's reference image (FluxKontextPipeline); FLUX.1 Fill takes none (its
    transformer's extra input is the masked image and the mask, diffusers' FluxFillPipeline has no reference). A
    Fill sample with ``--i`` and ``--ci`` was a torch reshape error at the first render (the Kontext pipeline
    drawing Fill's 384 / 4 = 96 latent channels); it is a pre-flight line, and a one-line ConfigError at render."""
    from sdcore.errors import ConfigError
    from sdcore.models.layout import layout_of_bundle
    from sdcore.train.inpainting import inpainting_problems

    image = _picture(tmp_path / "door.png")
    line = f"a door --i {image} --ci {image} --w 32 --h 32 --s 1"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(line, encoding="utf-8")
    o = contract_options(ConvOutMethod, tmp_path, {"sample_prompts": str(prompts), "model": "tiny:flux-fill"})
    assert inpainting_problems(o, layout_of_bundle(fill), None) == [
        "--sample-prompts: --ctrl_img/--ci is FLUX.1 Kontext's reference image; FLUX.1 Fill takes none (its "
        "sample renders from the --i image and its mask): drop --ci"
    ]
    with pytest.raises(ConfigError, match=r"FLUX\.1 Fill takes no reference image"):
        _render(fill, tmp_path, line, "reference")


def test_a_onetrainer_fill_sample_without_sample_inpainting_renders_on_a_blank_image_under_a_full_mask(fill, tmp_path):
    """OneTrainer 23df383 modules/modelSampler/FluxSampler.py:271-287 (``__sample_inpainting`` without
    ``sample_inpainting``), recomputed: the conditioning image is ``zeros(1, 3, H, W)`` (in [-1, 1]), its VAE mode
    shifted and scaled and packed 2x2, and the mask ``ones(1, tokens, 256)``; the transformer's input tokens are
    ``[noise, that latent, ones]``. The guidance is OneTrainer's FLUX.1 ``cfg_scale`` default 3.5 (SampleConfig.py
    :56-61). It was refused (OneTrainer configs: left out with a note) before."""
    from sdcore.generate.pnginfo import parse_parameters
    from sdcore.models.layout import layout_of_bundle
    from sdcore.train.inpainting import inpainting_problems

    sample = {"prompt": "a door", "width": WIDTH, "height": HEIGHT, "diffusion_steps": 1, "seed": SEED}
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps({"training_method": "LORA", "model_type": "FLUX_FILL_DEV_1", "samples": [sample]}), encoding="utf-8"
    )
    o = contract_options(ConvOutMethod, tmp_path, {"sample_prompts": str(config), "model": "tiny:flux-fill"})
    assert inpainting_problems(o, layout_of_bundle(fill), None) == []
    seen: list = []
    path = _render(fill, tmp_path, str(config), "blank", seen)

    with torch.no_grad():
        latent = fill.vae.encode(torch.zeros(1, 3, HEIGHT, WIDTH)).latent_dist.mode()
    latent = (latent - fill.vae.config.shift_factor) * fill.vae.config.scaling_factor
    tokens_count = (HEIGHT // 16) * (WIDTH // 16)
    (tokens,) = [entry[1] for entry in seen if entry[0] == "tokens"]  # 1 step
    assert tokens.shape == (1, tokens_count, 384)
    torch.testing.assert_close(tokens[..., :64], _seed_noise(SEED, WIDTH, HEIGHT), rtol=0, atol=0)
    torch.testing.assert_close(tokens[..., 64:128], _pack(latent), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(tokens[..., 128:], torch.ones(1, tokens_count, 256), rtol=0, atol=0)
    fields = parse_parameters(Image.open(path).info["parameters"]).extra
    assert fields["Inpaint mask"] == "full" and "Inpaint image" not in fields
    assert float(fields["Distilled CFG Scale"]) == 3.5
