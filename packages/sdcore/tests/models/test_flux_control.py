"""``sdcore generate --control-image`` (FLUX.1 Depth/Canny [dev]): generation against diffusers'
``FluxControlPipeline`` and ``FluxControlImg2ImgPipeline`` called directly on the same tiny modules, the control
image's effect, the refusals after load, the pre-load errors, BFL's default guidance, the infotext and
``--from-png``."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from PIL import Image  # noqa: E402


@pytest.fixture(scope="module")
def depth():
    from sdcore.models.load import load_model

    return load_model("tiny:flux-depth")


def _picture(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth random picture (a depth map stands in as any image: the tiny model reads no meaning into it)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR)


def _pipe(bundle, cls_name: str):
    import diffusers

    b = bundle
    pipe = getattr(diffusers, cls_name)(
        scheduler=type(b.noise_scheduler).from_config(b.noise_scheduler.config), vae=b.vae,
        text_encoder=b.text_encoders[0], tokenizer=b.tokenizers[0], text_encoder_2=b.text_encoders[1],
        tokenizer_2=b.tokenizers[1], transformer=b.transformer,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _array(image):
    return np.asarray(image.convert("RGB")).astype(np.int16)


def test_tiny_depth_is_the_control_layout(depth):
    from sdcore.models.flux.variants import bundle_variant

    assert depth.transformer.config.in_channels == 128 and depth.transformer.out_channels == 64
    assert bundle_variant(depth) == "control" and depth.family_label == "flux-control"


def test_generation_is_flux_control_pipeline(depth):
    """A batch of two prompts (image i seeded seed + i) against FluxControlPipeline with the same seeds, steps,
    guidance and size: the same pixels; the control image (another size than the output: the pipeline stretches
    it) reaches the model (another one changes the image)."""
    from sdcore.generate.pipeline import generate_images

    control = _picture(48, 40)
    got = generate_images(depth, ["a red ring", "a cat"], steps=2, cfg=10.0, seed=5, width=32, height=32,
                          control_image=control)  # fmt: skip
    with torch.no_grad():
        expected = _pipe(depth, "FluxControlPipeline")(
            prompt=["a red ring", "a cat"], control_image=control, width=32, height=32, num_inference_steps=2,
            guidance_scale=10.0, generator=[torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)],
        ).images  # fmt: skip
    for ours, theirs in zip(got, expected, strict=True):
        assert ours.size == (32, 32)
        assert np.array_equal(_array(ours), _array(theirs))
    other = generate_images(depth, ["a red ring"], steps=2, cfg=10.0, seed=5, width=32, height=32,
                            control_image=Image.fromarray(255 - np.asarray(control)))  # fmt: skip
    assert np.abs(_array(other[0]) - _array(got[0])).max() > 8


def test_img2img_is_flux_control_img2img_pipeline(depth):
    from sdcore.generate.pipeline import generate_images

    control, init = _picture(48, 40), _picture(32, 32, seed=1)
    got = generate_images(depth, ["a red ring"], steps=3, cfg=30.0, seed=5, init_image=init, strength=0.7,
                          control_image=control)[0]  # fmt: skip
    with torch.no_grad():
        expected = _pipe(depth, "FluxControlImg2ImgPipeline")(
            prompt="a red ring", image=init, control_image=control, width=32, height=32, strength=0.7,
            num_inference_steps=3, guidance_scale=30.0, generator=torch.Generator().manual_seed(5),
        ).images[0]  # fmt: skip
    assert np.array_equal(_array(got), _array(expected))


def test_the_output_takes_the_control_images_size_floored_to_16(depth):
    from sdcore.errors import ConfigError
    from sdcore.generate.pipeline import generate_images

    assert generate_images(depth, ["x"], steps=1, control_image=_picture(50, 40))[0].size == (48, 32)
    with pytest.raises(ConfigError, match="the control image is 40x12: Flux needs at least 16 pixels a side"):
        generate_images(depth, ["x"], steps=1, control_image=_picture(40, 12))


def test_refusals_after_load(depth, tmp_path):
    """Depth/Canny without a control image, a control image on dev and on another family, true CFG (the pipeline
    has none), a Kontext reference beside the control image: one line each; training still refuses Depth/Canny (no trainer sdcore follows trains them)."""
    from sdcore.errors import ConfigError
    from sdcore.generate.pipeline import generate_images
    from sdcore.models.flux.adapter import FluxAdapter
    from sdcore.models.load import load_model

    with pytest.raises(ConfigError, match=r"tiny:flux-depth is FLUX.1 Depth or Canny \[dev\].*needs a control image"):
        generate_images(depth, ["a cat"], steps=1, width=32, height=32)
    with pytest.raises(ConfigError, match=r"tiny:flux is FLUX.1 dev, not FLUX.1 Depth or Canny \[dev\]"):
        generate_images(load_model("tiny:flux"), ["a cat"], steps=1, control_image=_picture(32, 32))
    with pytest.raises(ConfigError, match=r"this is a Stable Diffusion 1\.x model"):
        generate_images(load_model("tiny:sd1"), ["a cat"], steps=1, control_image=_picture(32, 32))
    with pytest.raises(ConfigError, match="drop --true-cfg-scale"):
        generate_images(depth, ["a cat"], steps=1, control_image=_picture(32, 32), true_cfg_scale=2.0)
    with pytest.raises(ConfigError, match="no such file"):
        generate_images(depth, ["a cat"], steps=1, control_image=tmp_path / "missing.png")
    with pytest.raises(ConfigError, match="--reference-image with --control-image"):  # not diffusers' TypeError
        generate_images(depth, ["a cat"], steps=1, control_image=_picture(32, 32), reference_image=_picture(32, 32))
    adapter = FluxAdapter()
    with pytest.raises(ConfigError, match=r"generates with it \(--control-image\) but cannot train it"):
        adapter.encode_prompts(depth, ["a cat"])  # training's text caching
    cond = adapter.encode_prompts(depth, ["a cat"], t5_max_length=8, control=True)
    with pytest.raises(ConfigError, match="cannot train it"):
        adapter.predict(depth, torch.zeros(1, 16, 4, 4), torch.tensor([500.0]), cond)


def test_default_guidance_is_bfls():
    """BFL's cli_control: guidance 30 for flux-dev-canny, 10 for flux-dev-depth (the shapes are the same: the
    name decides, Depth's otherwise)."""
    from sdcore.models.flux.control import default_guidance

    assert default_guidance("/models/flux1-canny-dev.safetensors") == 30.0
    assert default_guidance("/models/FLUX.1-Canny-dev") == 30.0
    assert default_guidance("/models/flux1-depth-dev.safetensors") == 10.0
    assert default_guidance("/models/my-control-model") == 10.0


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
    good = tmp_path / "depth.png"
    _picture(40, 40).save(good)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"not a png")
    small = tmp_path / "small.png"
    _picture(40, 12).save(small)
    base = ["x", "--steps", "1", "-o", str(tmp_path / "o.png")]
    cases = [
        (["-m", "tiny:sd1", "--control-image", str(good)], ["this is a Stable Diffusion 1"]),
        (["-m", "tiny:sd3", "--control-image", str(good)], ["FLUX.1 Depth/Canny [dev]'s depth map or canny edges"]),
        (["-m", "tiny:flux-depth", "--control-image", str(tmp_path / "missing.png")], ["missing.png: no such file"]),
        (["-m", "tiny:flux-depth", "--control-image", str(corrupt)], ["cannot read control image"]),
        (["-m", "tiny:flux-depth", "--control-image", str(small)], ["is 40x12: Flux needs at least 16 pixels"]),
        # a Kontext reference and a Depth/Canny control image: no model takes both (was a traceback after load)
        (["-m", "tiny:flux-depth", "--control-image", str(good), "--reference-image", str(good)],
         ["--reference-image with --control-image", "drop one"]),
        # with the other problems, all at once, one line
        (["-m", "tiny:chroma", "--control-image", str(corrupt), "--mask", str(good)],
         ["this is a", "cannot read control image", "--mask repaints part of an init image"]),
    ]  # fmt: skip
    for args, expected in cases:
        result = _invoke([*args, *base], monkeypatch, load=False)
        assert result.exit_code == 2, (args, result.output)
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1, result.output
        for text in expected:
            assert text in lines[0], (text, result.output)
    assert not (tmp_path / "o.png").exists()


def test_cli_writes_control_image_and_from_png_repeats_it(tmp_path):
    """The infotext names the control image (and the guidance BFL uses for Canny, from the model's name);
    ``--from-png`` with the control image makes the same pixels; without it, it says what is missing."""
    from sdcore.generate.pnginfo import read_png_parameters

    control = tmp_path / "edges.png"
    _picture(48, 40).save(control)
    out = tmp_path / "canny.png"
    result = _invoke(["a robot", "-m", "tiny:flux-canny", "--control-image", str(control), "--steps", "2", "--seed",
                      "9", "-o", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    image = Image.open(out)
    assert image.size == (48, 32)  # the control image's, floored to 16
    params = read_png_parameters(out)
    assert params is not None
    assert params.extra["Control image"] == "edges.png" and params.extra["Distilled CFG Scale"] == "30"
    again = tmp_path / "again.png"
    result = _invoke(["--from-png", str(out), "-m", "tiny:flux-canny", "--control-image", str(control), "-o",
                      str(again)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "Control image" not in result.output  # read, not listed among the ignored fields
    assert np.array_equal(_array(Image.open(again)), _array(image))
    third = tmp_path / "third.png"
    result = _invoke(["--from-png", str(out), "-m", "tiny:flux-canny", "-o", str(third)])
    assert "FLUX.1 Depth/Canny image controlled by edges.png" in result.output
    assert "needs a control image: generate with --control-image" in result.output and not third.exists()


def test_model_info_says_depth_and_canny_generate(tmp_path):
    from sdcore.models.flux.variants import describe

    line = describe("control")
    assert line.startswith("control: FLUX.1 Depth or Canny [dev]")
    assert "sdcore generates with it (--control-image" in line and "it does not train it" in line


def test_widen_img_in_is_diffusers_and_undoes_bit_for_bit():
    """What a control LoRA's handler asks of the core (diffusers' ``_maybe_expand_transformer_param_shape_or_error_``):
    a new img_in ``width`` wide, dev's weight in its first columns and zeros after, the same bias, ``in_channels``
    set, so the bundle reads as Depth/Canny and refusals name the file; the undo puts the same module and config
    back. Nothing narrows img_in."""
    from sdcore.errors import ConfigError, NetworkMismatchError
    from sdcore.models.flux.control import widen_img_in, widened_by
    from sdcore.models.flux.variants import bundle_variant, require_supported
    from sdcore.models.load import load_model

    dev = load_model("tiny:flux")
    transformer = dev.transformer
    old, config = transformer.x_embedder, dict(transformer.config)
    state = {k: v.clone() for k, v in transformer.state_dict().items()}
    undo = widen_img_in(dev, 128, "edges-lora.safetensors")
    new = transformer.x_embedder
    assert new is not old and tuple(new.weight.shape) == (old.weight.shape[0], 128)
    assert torch.equal(new.weight[:, :64], old.weight) and not new.weight[:, 64:].any()
    assert torch.equal(new.bias, old.bias) and new.bias.data_ptr() != old.bias.data_ptr()
    assert transformer.config.in_channels == 128 and bundle_variant(dev) == "control"
    assert widened_by(dev) == "edges-lora.safetensors"
    with pytest.raises(ConfigError, match=r"tiny:flux with edges-lora.safetensors is FLUX.1 Depth or Canny"):
        require_supported(dev, "generate with")
    with pytest.raises(NetworkMismatchError, match="takes 128 inputs already"):
        widen_img_in(dev, 128, "again")
    undo()
    assert transformer.x_embedder is old and transformer.config.in_channels == 64 and widened_by(dev) is None
    assert dict(transformer.config) == config and bundle_variant(dev) == "dev"
    assert all(torch.equal(transformer.state_dict()[k], v) for k, v in state.items())
