"""OneTrainer's inpainting samples (``sample_inpainting`` with ``base_image_path`` and ``mask_image_path``) on an SD
inpainting model, rendered as OneTrainer's StableDiffusionSampler ``__sample_inpainting`` renders them. Its rule,
recomputed here without sdcore's code: the image and the grey mask as [0, 1] tensors stretched to the sample's size
(torchvision's antialiased bilinear ``Resize``, which PIL's bilinear ``resize`` of a float image matches), the
masked image ``(2 x - 1) * (1 - eroded)`` with ``eroded`` a 5x5 box average (replicated borders) of the mask above
0.5, encoded by the VAE (the posterior's mode), and the latent mask the mask resized (antialiased bilinear) to the
latent size, above 0; the UNet's input ``[latents, latent mask, masked-image latent]``, from the seed's noise over
the full schedule (no img2img start, no paste-back)."""

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
from sdcore.errors import ConfigError  # noqa: E402
from sdcore.testing.contract import contract_options  # noqa: E402
from sdcore.train.onetrainer_config import read_sample_prompts  # noqa: E402
from sdcore.train.options import TrainOptions  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _inpainting_sd1():
    from sdcore.models.tiny import create_tiny_bundle

    bundle = create_tiny_bundle("sd1", variant="inpainting")  # conv_in takes 9 channels
    return bundle


def _samples(path: Path, image: Path, mask: Path, **more) -> Path:
    sample = {"prompt": "a door", "width": 64, "height": 48, "diffusion_steps": 2, "seed": 7, "cfg_scale": 7.0,
              "noise_scheduler": "EULER_A", "sample_inpainting": True, "base_image_path": str(image),
              "mask_image_path": str(mask), **more}  # fmt: skip
    path.write_text(json.dumps([sample, {**sample, "sample_inpainting": False}]), encoding="utf-8")
    return path


def test_a_onetrainer_inpainting_sample_imports_with_its_image_and_mask(tmp_path):
    """Relative paths resolve as OneTrainer's other paths do (here: the config's folder); on a model type without
    the conditioning-image input OneTrainer reads neither field (noted); SDXL's one-step-in start is noted; a
    sample_inpainting without its files is one line."""
    (tmp_path / "door.png").write_bytes(b"")
    (tmp_path / "door-mask.png").write_bytes(b"")
    sample = {"prompt": "a door", "sample_inpainting": True, "base_image_path": "door.png",
              "mask_image_path": "door-mask.png"}  # fmt: skip
    config = {"training_method": "LORA", "model_type": "STABLE_DIFFUSION_15_INPAINTING", "samples": [sample]}

    def prompts(**changes):
        path = tmp_path / "config.json"
        path.write_text(json.dumps({**config, **changes}), encoding="utf-8")
        return read_sample_prompts(path)

    (prompt,) = prompts()
    assert (prompt.inpaint_image, prompt.inpaint_mask, prompt.ignored) == (
        str(tmp_path / "door.png"), str(tmp_path / "door-mask.png"), ()
    )  # fmt: skip
    (plain,) = prompts(model_type="STABLE_DIFFUSION_15")
    assert (plain.inpaint_image, plain.inpaint_mask) == (None, None)
    assert plain.ignored[0].startswith("sample_inpainting (OneTrainer reads base_image_path and mask_image_path only")
    (xl,) = prompts(model_type="STABLE_DIFFUSION_XL_10_BASE_INPAINTING")
    assert xl.inpaint_mask == str(tmp_path / "door-mask.png")
    assert xl.ignored[0].startswith("sample_inpainting's SDXL start (OneTrainer skips the first step")
    with pytest.raises(ConfigError, match=r"sample 1: sample_inpainting needs mask_image_path \(the image to fill"):
        prompts(samples=[{**sample, "mask_image_path": ""}])


class _Plain(ConvOutMethod):
    def __init__(self) -> None:
        pass

    def sampling(self, bundle):
        return contextlib.nullcontext({})


def _onetrainer_channels(bundle, image_path: Path, mask_path: Path, width: int, height: int):
    """OneTrainer's mask and masked-image latent, recomputed (see the module's notes)."""

    def stretched(path: Path, mode: str) -> torch.Tensor:
        picture = Image.open(path).convert(mode)
        planes = picture.split() if mode == "RGB" else [picture]
        resized = [
            np.asarray(Image.fromarray(np.asarray(p, dtype=np.float32) / 255.0, mode="F").resize(
                (width, height), Image.Resampling.BILINEAR)) for p in planes
        ]  # fmt: skip
        return torch.from_numpy(np.stack(resized))

    image, mask = stretched(image_path, "RGB"), stretched(mask_path, "L")
    erode = torch.nn.Conv2d(1, 1, 5, bias=False, padding=2, padding_mode="replicate")
    erode.weight.data = torch.ones(1, 1, 5, 5) / 25
    with torch.no_grad():
        eroded = (erode(mask[None]) > 0.5).float()[0]
        masked = ((image * 2.0 - 1.0) * (1 - eroded))[None]
        latent = bundle.vae.encode(masked).latent_dist.mode() * bundle.vae.config.scaling_factor
    small = Image.fromarray(mask[0].numpy(), mode="F").resize((width // 8, height // 8), Image.Resampling.BILINEAR)
    latent_mask = torch.from_numpy((np.asarray(small) > 0).astype(np.float32))[None, None]
    return torch.cat([latent_mask, latent], 1), eroded, mask


def test_the_unet_sees_onetrainers_mask_and_masked_image(tmp_path):
    from sdcore.generate.pnginfo import parse_parameters
    from sdcore.train.sampling import render_samples

    bundle = _inpainting_sd1()
    image_path, mask_path = _picture(tmp_path / "door.png"), _mask(tmp_path / "door-mask.png")
    samples = _samples(tmp_path / "samples.json", image_path, mask_path)
    width, height = 64, 48
    inputs: list[torch.Tensor] = []
    handle = bundle.unet.conv_in.register_forward_pre_hook(lambda module, args: inputs.append(args[0].detach()))
    try:
        options = TrainOptions(sample_prompts=str(samples), resolution=64)
        path = render_samples(bundle, _Plain(), options, device=torch.device("cpu"), folder=tmp_path, tag="s",
                              step=3, say=lambda _: None)  # fmt: skip
    finally:
        handle.remove()
    assert path is not None

    expected, eroded, mask = _onetrainer_channels(bundle, image_path, mask_path, width, height)
    # each rule is OneTrainer's own: the box average drops the thin line, the latent mask keeps the faint patch
    assert not torch.equal(eroded, (mask >= 0.5).float())
    kohya_small = torch.nn.functional.interpolate((mask[None] >= 0.5).float(), size=(height // 8, width // 8))
    assert not torch.equal(expected[:, :1], kohya_small)
    assert 0.1 < float(expected[0, 0].mean()) < 0.9
    assert len(inputs) == 4  # 2 samples x 2 steps, cond and uncond batched
    inpainting, plain = inputs[:2], inputs[2:]
    for call in inpainting:
        assert call.shape == (2, 9, height // 8, width // 8)
        for row in call:
            torch.testing.assert_close(row[4:], expected[0], rtol=1e-4, atol=1e-4)
    # the same seed's noise over the full schedule as the sample without sample_inpainting (no img2img start);
    # that one keeps the blank conditioning (a full mask)
    torch.testing.assert_close(inpainting[0][:, :4], plain[0][:, :4], rtol=0, atol=0)
    assert torch.equal(plain[0][:, 4], torch.ones_like(plain[0][:, 4]))

    fields = parse_parameters(Image.open(path).info["parameters"]).extra
    assert (fields["Inpaint image"], fields["Inpaint mask"]) == ("door.png", "door-mask.png")


def test_a_model_without_the_mask_input_renders_them_from_text(tmp_path, caplog):
    """As OneTrainer's samplers of a non-inpainting model do (they never read the two fields); a warning says so,
    and the pre-flight does not refuse them as it refuses kohya's --i there."""
    from sdcore.models.layout import layout_of_bundle
    from sdcore.models.tiny import create_tiny_bundle
    from sdcore.train.inpainting import inpainting_problems
    from sdcore.train.sampling import render_samples

    bundle = create_tiny_bundle("sd1")
    samples = _samples(tmp_path / "samples.json", _picture(tmp_path / "a.png"), _mask(tmp_path / "m.png"))
    inputs: list[torch.Tensor] = []
    handle = bundle.unet.conv_in.register_forward_pre_hook(lambda module, args: inputs.append(args[0].detach()))
    options = TrainOptions(sample_prompts=str(samples), resolution=64)
    try:
        with caplog.at_level("WARNING", logger="sdcore.train"):
            assert render_samples(bundle, _Plain(), options, device=torch.device("cpu"), folder=tmp_path, tag="s",
                                  step=1, say=lambda _: None)  # fmt: skip
    finally:
        handle.remove()
    assert [tuple(i.shape[1:2]) for i in inputs] == [(4,)] * 4
    assert any("OneTrainer's inpainting samples render from text" in r.getMessage() for r in caplog.records)
    o = contract_options(ConvOutMethod, tmp_path, {"sample_prompts": str(samples), "model": "tiny:sd1"})
    assert inpainting_problems(o, layout_of_bundle(bundle), None) == []


def test_preflight_names_each_missing_or_unreadable_file(tmp_path):
    from sdcore.train.preflight import option_problems

    good = _picture(tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"not a picture")
    samples = tmp_path / "samples.json"
    entries = [
        {"prompt": "a", "diffusion_steps": 2, "sample_inpainting": True, "base_image_path": str(good),
         "mask_image_path": str(tmp_path / "missing.png")},
        {"prompt": "b", "diffusion_steps": 2, "sample_inpainting": True, "base_image_path": str(tmp_path / "broken.png"),
         "mask_image_path": str(good)},
    ]  # fmt: skip
    samples.write_text(json.dumps(entries), encoding="utf-8")
    o = contract_options(ConvOutMethod, tmp_path, {"sample_prompts": str(samples), "model": "tiny:sd1"})
    found = [p for p in option_problems(o) if "inpaint " in p]
    assert found[0] == f"--sample-prompts: inpaint mask (mask_image_path) {tmp_path / 'missing.png'}: no such file"
    assert found[1].startswith(
        f"--sample-prompts: cannot read inpaint image (base_image_path) {tmp_path / 'broken.png'}: "
    )
    assert len(found) == 2 and all("\n" not in p for p in found)
