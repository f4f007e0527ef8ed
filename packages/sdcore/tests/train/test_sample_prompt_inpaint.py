"""kohya's inpainting sample prompts (sd-scripts v0.10.4, PR #2309): ``--i PATH`` (its code; ``--img`` in its docs,
``image`` in a JSON/TOML prompt file) names the image an SD inpainting model's sample inpaints. As kohya's
``sample_image_inference`` and its lpw pipelines do, recomputed here: the image is stretched to the sample's size
(Lanczos), the mask is ``wobbly_ellipse_mask(width, height, seed=the sample's seed)``, and the sample is a txt2img
from the seed's noise whose 9-channel UNet input is ``[latents, mask nearest-resized to the latent, VAE(image *
(1 - mask))]`` (conv_in hooked here); an unreadable file or a model without the mask input is a pre-flight line."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sdcore.generate.pipeline")

from inpaint_images import picture as _picture  # noqa: E402
from PIL import Image  # noqa: E402
from runtime_methods import ConvOutMethod  # noqa: E402
from sdcore.errors import ConfigError  # noqa: E402
from sdcore.testing.contract import contract_options  # noqa: E402
from sdcore.train.options import TrainOptions  # noqa: E402
from sdcore.train.sample_prompts import generation_calls, parse_prompt_file, parse_prompt_line  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _inpainting_sd1():
    from sdcore.models.tiny import create_tiny_bundle

    bundle = create_tiny_bundle("sd1", variant="inpainting")  # conv_in takes 9 channels
    return bundle


def test_i_and_img_are_parsed_and_each_inpainting_line_is_its_own_call(tmp_path):
    line = parse_prompt_line("a cat on a sofa --i /data/ref cat.jpg --w 512 --d 42")
    assert (line.prompt, line.inpaint_image, line.width, line.seed, line.ignored) == (
        "a cat on a sofa", "/data/ref cat.jpg", 512, 42, ()
    )  # fmt: skip
    assert parse_prompt_line("x --img a.png").inpaint_image == "a.png"  # kohya's docs' spelling
    assert parse_prompt_line("x --I a.png").inpaint_image == "a.png"  # kohya matches options ignoring case
    assert parse_prompt_line("x --i a.png --img b.png").inpaint_image == "b.png"  # the last one, as kohya's dict
    assert parse_prompt_line("x --ci a.png").inpaint_image is None
    # kohya's JSON/TOML prompt files name it `image`
    (entry,) = parse_prompt_file(json.dumps([{"prompt": "x", "image": "a.png", "seed": 3}]), ".json", "p.json")
    assert (entry.inpaint_image, entry.seed, entry.ignored) == ("a.png", 3, ())
    toml = '[prompt]\nwidth = 64\n[[prompt.subset]]\nprompt = "x"\nimage = "b.png"\n'
    assert [p.inpaint_image for p in parse_prompt_file(toml, ".toml", "p.toml")] == ["b.png"]
    # lines with equal settings share a call (seed + i), but an inpainting line's mask comes from its own seed
    plain = [parse_prompt_line("x"), parse_prompt_line("y")]
    assert generation_calls(plain, seed=10) == [(plain, 10)]
    both = [parse_prompt_line("x --i a.png"), parse_prompt_line("y --i a.png")]
    assert generation_calls(both, seed=10) == [([both[0]], 10), ([both[1]], 11)]


class _Plain(ConvOutMethod):
    def __init__(self) -> None:
        pass

    def sampling(self, bundle):
        return contextlib.nullcontext({})


def _vae_latent(bundle, pixels):
    with torch.no_grad():
        return bundle.vae.encode(pixels).latent_dist.mean * bundle.vae.config.scaling_factor


def test_the_unet_gets_kohyas_mask_and_masked_image_and_the_png_says_so(tmp_path):
    """The sample renders through the 9-channel UNet with channel 4 = the wobbly ellipse of the sample's seed
    (recomputed from kohya's function: :func:`sdcore.train.random_masks.wobbly_ellipse`) nearest-resized to the
    latent, channels 5-8 = the latent of the Lanczos-stretched image with the hole zeroed; channels 0-3 are the
    txt2img's own (the same seed's noise as a line without --i: a full denoise, not img2img). From the caching-time
    prompt encodings too."""
    import torch.nn.functional as F
    from sdcore.generate.pnginfo import parse_parameters
    from sdcore.train.random_masks import wobbly_ellipse
    from sdcore.train.sampling import encode_sample_prompts, render_samples

    bundle = _inpainting_sd1()
    image_path = _picture(tmp_path / "cat.png")
    width, height, seed = 80, 64, 7  # kept by kohya's size rule (multiples of 8, at least 64)
    inputs: list[torch.Tensor] = []
    handle = bundle.unet.conv_in.register_forward_pre_hook(lambda module, args: inputs.append(args[0].detach()))

    def render(line, tag, memo=None):
        options = TrainOptions(sample_prompts=line, resolution=64)
        if memo == "make":
            memo = encode_sample_prompts(bundle, options, device=torch.device("cpu"))
            assert memo is not None
        inputs.clear()
        path = render_samples(bundle, _Plain(), options, device=torch.device("cpu"), folder=tmp_path, tag=tag,
                              step=3, say=lambda _: None, conditioning=memo)  # fmt: skip
        assert path is not None
        return path, list(inputs)

    try:
        line = f"a cat --i {image_path} --w {width} --h {height} --s 2 --d {seed}"
        path, seen = render(line, "inpaint")
        _, blank = render(f"a cat --w {width} --h {height} --s 2 --d {seed}", "blank")
        _, replayed = render(line, "replayed", "make")
    finally:
        handle.remove()

    mask = torch.from_numpy(wobbly_ellipse(width, height, seed))[None, None]
    assert 0.1 < float(mask.mean()) < 0.35  # about 20 % of the image: a hole, not all or nothing
    stretched = Image.open(image_path).convert("RGB").resize((width, height), Image.Resampling.LANCZOS)
    pixels = torch.from_numpy(np.asarray(stretched, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
    expected = torch.cat(
        [F.interpolate(mask, size=(height // 8, width // 8)), _vae_latent(bundle, pixels * (1 - mask))], 1
    )
    assert len(seen) == 2 and len(replayed) == 2  # 2 steps, cond and uncond batched
    for call in seen + replayed:
        assert call.shape == (2, 9, height // 8, width // 8)
        for row in call:
            torch.testing.assert_close(row[4:], expected[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(seen[0][:, :4], blank[0][:, :4], rtol=0, atol=0)  # the seed's noise, full schedule
    assert not torch.equal(blank[0][:, 4:], seen[0][:, 4:])  # the blank line keeps A1111's blank conditioning
    for first, again in zip(seen, replayed, strict=True):
        torch.testing.assert_close(first, again, rtol=0, atol=0)

    parsed = parse_parameters(Image.open(path).info["parameters"])
    assert parsed.seed == seed and parsed.size == (width, height) and parsed.prompt == "a cat"
    fields = parsed.extra
    assert fields["Inpaint image"] == "cat.png" and fields["Inpaint mask"] == "wobbly ellipse"
    assert float(fields["Conditional mask weight"]) == 1.0
    assert "Denoising strength" not in fields and "Mask blur" not in fields  # a txt2img: no A1111 img2img fields


def test_preflight_says_an_unreadable_image_and_a_model_without_the_mask_input(tmp_path):
    from sdcore.models.layout import layout_of_bundle
    from sdcore.models.tiny import create_tiny_bundle
    from sdcore.train.inpainting import inpainting_problems
    from sdcore.train.preflight import option_problems

    good = _picture(tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"not a picture")
    prompts = tmp_path / "p.txt"
    prompts.write_text(f"a --i {tmp_path / 'missing.png'}\nb --img {good}\nc --i {tmp_path / 'broken.png'}\n",
                       encoding="utf-8")  # fmt: skip
    o = contract_options(ConvOutMethod, tmp_path, {"sample_prompts": str(prompts), "model": "tiny:sd1"})
    found = [p for p in option_problems(o) if "inpaint image" in p]
    assert found[0] == f"--sample-prompts: inpaint image (--i) {tmp_path / 'missing.png'}: no such file"
    assert found[1].startswith(f"--sample-prompts: cannot read inpaint image (--i) {tmp_path / 'broken.png'}: ")
    assert len(found) == 2 and all("\n" not in p for p in found)

    prompts.write_text(f"b --img {good}\nplain\n", encoding="utf-8")
    assert not [p for p in option_problems(o) if "inpaint image" in p]
    plain = layout_of_bundle(create_tiny_bundle("sd1"))
    assert inpainting_problems(o, plain, None) == [
        f"--sample-prompts: --i/--img (kohya's inpainting samples) inpaints through an SD inpainting model's mask "
        f"input; {plain.source} is a sd1 model without it (remove --i)"
    ]
    assert inpainting_problems(o, layout_of_bundle(_inpainting_sd1()), None) == []
    prompts.write_text("plain\n", encoding="utf-8")
    assert inpainting_problems(o, plain, None) == []


def test_generate_images_refuses_a_conditioning_it_cannot_use(tmp_path):
    from sdcore.generate.inpaint import ImageConditioning
    from sdcore.generate.pipeline import generate_images
    from sdcore.models.tiny import create_tiny_bundle

    image = Image.open(_picture(tmp_path / "a.png", 64, 64))
    given = ImageConditioning(image, np.zeros((64, 64), dtype=np.float32), "a")
    with pytest.raises(ConfigError, match="this model has no mask input"):
        generate_images(create_tiny_bundle("sd1"), ["x"], steps=1, image_conditioning=given)
    bundle = _inpainting_sd1()
    with pytest.raises(ConfigError, match="drop the init image"):
        generate_images(bundle, ["x"], steps=1, image_conditioning=given, init_image=image)
    with pytest.raises(ConfigError, match="the image conditioning is 64x64; the output 64x48"):
        generate_images(bundle, ["x"], steps=1, height=48, image_conditioning=given)
    with pytest.raises(ConfigError, match="the conditioning mask is 32x64, its image 64x64"):
        generate_images(bundle, ["x"], steps=1, image_conditioning=ImageConditioning(image, np.zeros((64, 32)), "b"))
