"""FLUX.1 Fill / Depth / Canny / Kontext: told apart from dev and schnell by the rules diffusers' single-file
detection uses (the guidance embedding, ``img_in``'s input width, a folder's pipeline class), named in
``model info``, and refused with one line by generation and (Depth/Canny; Fill trains) training."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

#: diffusers' model types (``infer_diffusers_model_type``) -> sdcore's labels
DIFFUSERS_NAMES = {"flux-dev": "flux-dev", "flux-schnell": "flux-schnell", "flux-fill": "flux-fill",
                   "flux-depth": "flux-control"}  # fmt: skip


@pytest.fixture(scope="module")
def dev():
    from sdcore.models.flux.adapter import FluxAdapter

    return FluxAdapter().create_tiny(variant="dev", seed=0)


def _with_input_width(bundle, width):
    """The bundle with a transformer whose ``img_in`` takes ``width`` channels (output still 64, as BFL's
    Fill/Depth/Canny): the FLUX.1 Tools layout at tiny size."""
    import copy

    from diffusers import FluxTransformer2DModel

    config = {k: v for k, v in bundle.transformer.config.items() if not k.startswith("_")}  # _use_default_values
    config.update(in_channels=width, out_channels=64)
    other = copy.copy(bundle)
    other.transformer = FluxTransformer2DModel.from_config(config)
    return other


def _bfl_file(bundle, path, prefix=""):
    """A BFL-layout transformer file with no sdcore metadata (detection from keys and shapes alone)."""
    from safetensors.torch import save_file
    from sdcore.models.flux.convert import diffusers_to_bfl

    state = diffusers_to_bfl(bundle.transformer.state_dict())
    save_file({prefix + k: v.contiguous() for k, v in state.items()}, str(path))
    return path


@pytest.mark.parametrize(
    ("width", "guidance", "label"),
    [(64, True, "flux-dev"), (64, False, "flux-schnell"), (384, True, "flux-fill"), (128, True, "flux-control")],
)
def test_labels_agree_with_diffusers_single_file_detection(dev, tmp_path, width, guidance, label):
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type
    from safetensors.torch import load_file
    from sdcore.models.load import load_model

    bundle = _with_input_width(dev, width)
    if not guidance:
        from diffusers import FluxTransformer2DModel

        config = {k: v for k, v in bundle.transformer.config.items() if not k.startswith("_")}
        bundle.transformer = FluxTransformer2DModel.from_config({**config, "guidance_embeds": False})
    for prefix in ("", "model.diffusion_model."):  # BFL's release and ComfyUI's checkpoint layout
        path = _bfl_file(bundle, tmp_path / f"t{len(prefix)}.safetensors", prefix)
        assert DIFFUSERS_NAMES[infer_diffusers_model_type(load_file(str(path)))] == label
        loaded = load_model(path)
        assert loaded.family_label == label
        assert loaded.transformer.config.in_channels == width and loaded.transformer.out_channels == 64
        for key, value in bundle.transformer.state_dict().items():  # the weights load as they are
            assert torch.equal(loaded.transformer.state_dict()[key], value), key


def test_model_info_names_the_release(dev, tmp_path):
    from click.testing import CliRunner
    from sdcore.cli import build_cli
    from sdcore.plugins import get_plugin_manager

    path = _bfl_file(_with_input_width(dev, 384), tmp_path / "flux1-fill-dev.safetensors")
    result = CliRunner().invoke(build_cli(get_plugin_manager()), ["model", "info", str(path), "--no-hash"])
    assert result.exit_code == 0, result.output
    assert "family:          flux-fill (FLUX.1)" in result.output
    assert "variant:         fill: FLUX.1 Fill [dev] (inpainting" in result.output
    assert "sdcore trains it (a mask and masked image per sample) and generates with it (--init-image and --mask)" in (
        result.output
    )


@pytest.mark.parametrize("width", [384, 128])
def test_generation_and_training_refuse_tools_with_one_line(dev, width):
    from sdcore.errors import ConfigError
    from sdcore.generate.pipeline import generate_images
    from sdcore.models.flux.adapter import FluxAdapter

    bundle = _with_input_width(dev, width)
    bundle.source = "flux1-tool.safetensors"
    release = "Fill" if width == 384 else "Depth or Canny"
    # Fill generates, but only inpainting (an init image and a mask: tests/generate/test_inpaint.py); Depth/Canny
    # only with a control image (tests/models/test_flux_control.py)
    refusal = ("is FLUX.1 Fill, an inpainting model: give --init-image and --mask" if width == 384
               else rf"is FLUX.1 {release} \[dev\].*it needs a control image: generate with --control-image")  # fmt: skip
    with pytest.raises(ConfigError, match=rf"flux1-tool.safetensors {refusal}"):
        generate_images(bundle, ["a cat"], steps=1, width=32, height=32)
    adapter = FluxAdapter()
    if width == 384:  # Fill trains: its prompts encode as dev's (its step joins the mask and masked image)
        assert adapter.encode_prompts(bundle, ["a cat"], t5_max_length=8).pooled is not None
    else:
        with pytest.raises(ConfigError, match=r"generates with it \(--control-image\) but cannot train it"):
            adapter.encode_prompts(bundle, ["a cat"])
    cond = adapter.encode_prompts(dev, ["a cat"], t5_max_length=8)
    with pytest.raises(ConfigError, match=rf"FLUX.1 {release} \[dev\]"):  # without its extra input: one line
        adapter.predict(bundle, torch.zeros(1, 16, 4, 4), torch.tensor([500.0]), cond)


def test_kontext_folder_is_named_by_its_pipeline(dev, tmp_path):
    """Kontext has dev's shapes: its diffusers folder's pipeline class is what names it; dev stays dev; Kontext
    is not refused."""
    import json

    from diffusers import FluxPipeline
    from sdcore.generate.pipeline import generate_images
    from sdcore.models.flux.adapter import FluxAdapter
    from sdcore.models.load import load_model

    folder = tmp_path / "kontext"
    FluxPipeline(scheduler=dev.noise_scheduler, vae=dev.vae, text_encoder=dev.text_encoders[0],
                 tokenizer=dev.tokenizers[0], text_encoder_2=dev.text_encoders[1], tokenizer_2=dev.tokenizers[1],
                 transformer=dev.transformer).save_pretrained(folder)  # fmt: skip
    assert load_model(folder).family_label == "flux-dev"
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "FluxKontextPipeline"}))
    kontext = load_model(folder)
    assert kontext.family_label == "flux-kontext"
    assert FluxAdapter().release(kontext).startswith("kontext: FLUX.1 Kontext [dev]")
    # without a reference image, Kontext makes images from text as dev does (FluxKontextPipeline with no image)
    images = generate_images(kontext, ["a cat"], steps=1, width=32, height=32, seed=1)
    assert images[0].size == (32, 32)


def test_training_preflight_reads_fill_and_refuses_depth_before_loading(dev, tmp_path):
    """The pre-flight reads the file's header (its memory plan): a Depth/Canny file is one problem line there;
    a Fill file is read (it trains) as an inpainting layout."""
    from sdcore.errors import ConfigError
    from sdcore.models.layout import read_layout
    from sdcore.train.inpainting import layout_kind

    control = _bfl_file(_with_input_width(dev, 128), tmp_path / "depth.safetensors")
    with pytest.raises(
        ConfigError, match=r"depth.safetensors is FLUX.1 Depth or Canny \[dev\].*cannot train it \(no trainer"
    ):
        read_layout(control)
    fill = read_layout(_bfl_file(_with_input_width(dev, 384), tmp_path / "fill.safetensors"))
    assert (fill.family, layout_kind(fill)) == ("flux", "fill")
    plain = read_layout(_bfl_file(dev, tmp_path / "dev.safetensors"))
    assert (plain.family, layout_kind(plain)) == ("flux", None)


@pytest.mark.parametrize("fmt", ["single-file", "diffusers"])
def test_create_tiny_writes_a_fill_model(tmp_path, fmt):
    """``sdcore model create-tiny --family flux-fill`` writes FLUX.1 Fill's layout (``img_in`` 384 wide, output 64)
    as a user's download would be, so inpainting can be tried offline as Kontext, Depth and Canny can: the file
    reads back as Fill, and a diffusers folder names ``FluxFillPipeline``."""
    import json

    from click.testing import CliRunner
    from sdcore.cli import build_cli
    from sdcore.models.load import load_model
    from sdcore.plugins import get_plugin_manager

    dst = tmp_path / ("flux1-fill-dev.safetensors" if fmt == "single-file" else "flux1-fill-dev")
    cli = build_cli(get_plugin_manager())
    result = CliRunner().invoke(cli, ["model", "create-tiny", str(dst), "--family", "flux-fill", "--format", fmt])
    assert result.exit_code == 0, result.output
    loaded = load_model(dst)
    assert loaded.family_label == "flux-fill"
    assert loaded.transformer.config.in_channels == 384 and loaded.transformer.out_channels == 64
    if fmt == "diffusers":
        assert json.loads((dst / "model_index.json").read_text())["_class_name"] == "FluxFillPipeline"
    assert load_model("tiny:flux-fill").family_label == "flux-fill"
    bad = CliRunner().invoke(cli, ["model", "create-tiny", str(tmp_path / "x"), "--family", "flux-nope"])
    assert bad.exit_code != 0 and "(or kontext, fill, depth, canny)" in bad.output
