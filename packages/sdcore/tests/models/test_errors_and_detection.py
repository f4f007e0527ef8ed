"""Broken or foreign files give one clear line; family and prediction type are detected right."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file
from sdcore.errors import ModelFormatError, SdcoreError
from sdcore.models.detect import detect
from sdcore.models.load import load_model


def _one_line(exc: pytest.ExceptionInfo, path) -> str:
    message = str(exc.value)
    assert "\n" not in message
    assert str(path) in message
    return message


def test_truncated_safetensors(tiny_files, tmp_path):
    data = tiny_files["sd1"].read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFormatError) as info:
        load_model(path)
    assert "truncated" in _one_line(info, path)


def test_header_lies_about_a_tensor(tmp_path):
    path = tmp_path / "lies.safetensors"
    header = json.dumps({"a": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 16]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    with pytest.raises(ModelFormatError) as info:
        load_model(path)
    assert "header lies" in _one_line(info, path)


def test_header_length_too_large(tmp_path):
    path = tmp_path / "big.safetensors"
    path.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(ModelFormatError) as info:
        load_model(path)
    _one_line(info, path)


@pytest.mark.parametrize("name,content", [("notes.safetensors", b"hello world, not a model"), ("x.ckpt", b"garbage!!")])
def test_not_a_model_file(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ModelFormatError) as info:
        load_model(path)
    _one_line(info, path)


def test_valid_safetensors_without_unet(tmp_path):
    path = tmp_path / "lora.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(ModelFormatError) as info:
        load_model(path)
    assert "not a Stable Diffusion checkpoint" in _one_line(info, path)


def test_unknown_layout(tiny_files, tmp_path):
    state = {k: v for k, v in load_file(str(tiny_files["sd1"])).items() if not k.startswith("cond_stage_model.")}
    path = tmp_path / "odd.safetensors"
    save_file(state, str(path))
    with pytest.raises(ModelFormatError) as info:
        load_model(path)
    assert "unknown model layout" in _one_line(info, path)


def test_file_without_a_vae_names_the_file(tiny_files, tmp_path):
    """A checkpoint with UNet and text encoder but no ``first_stage_model.*`` (no sdcore.config to say its
    layout): the shape inference's complaint used to come without the file's name."""
    state = {k: v for k, v in load_file(str(tiny_files["sd1"])).items() if not k.startswith("first_stage_model.")}
    path = tmp_path / "no-vae.safetensors"
    save_file(state, str(path))
    with pytest.raises(ModelFormatError) as info:
        load_model(path)
    assert "VAE" in _one_line(info, path)


def test_missing_path_and_uncached_hub_id(tmp_path):
    with pytest.raises(ModelFormatError):
        load_model(tmp_path / "nope.safetensors")
    with pytest.raises(SdcoreError, match="not in the Hugging Face cache"):
        load_model("nobody-xyz/not-a-model-123")


def _fake(keys_shapes: dict[str, tuple[int, ...]], metadata=None, markers=(), **kw):
    return detect(set(keys_shapes), keys_shapes.__getitem__, metadata or {}, markers=markers, **kw)


UNET = {"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)}
SD1 = {**UNET, "cond_stage_model.transformer.text_model.final_layer_norm.weight": (768,)}
SD2 = {**UNET, "cond_stage_model.model.ln_final.weight": (1024,)}
XL = {**UNET, "conditioner.embedders.1.model.ln_final.weight": (1280,)}
REF = {**UNET, "conditioner.embedders.0.model.ln_final.weight": (1280,)}


def test_detection_rules():
    assert _fake(SD1).family == "sd1" and _fake(SD1).prediction_type == "epsilon"
    assert _fake(SD2).prediction_type == "v_prediction"  # SD2 default: 768-v
    assert _fake(SD2, extras={"global_step": 875000}).prediction_type == "epsilon"  # SD2-512 base release
    assert _fake(SD2, {"modelspec.prediction_type": "epsilon"}).prediction_type == "epsilon"
    assert _fake(XL).family == "sdxl" and _fake(XL).prediction_type == "epsilon"
    assert _fake(XL, markers={"v_pred"}).prediction_type == "v_prediction"
    assert _fake(REF).family == "sdxl-refiner"
    inpaint = {**SD1, "model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3)}
    assert _fake(inpaint).inpainting
    assert _fake(SD1, prediction_type="v").prediction_type == "v_prediction"


@pytest.mark.parametrize("family,label", [("sd1", "sd1"), ("sd2", "sd2-v"), ("sdxl", "sdxl")])
def test_family_and_vpred_of_our_files(tiny_files, family, label):
    bundle = load_model(tiny_files[family])
    assert bundle.family_label == label


def test_v_pred_marker_without_modelspec(tiny_files, tmp_path):
    state = load_file(str(tiny_files["sdxl"]))
    state["v_pred"] = torch.tensor([])
    path = tmp_path / "xl-v.safetensors"
    meta = {"sdcore.config": json.dumps({**json.loads(load_model(tiny_files["sdxl"]).metadata["sdcore.config"]),
                                        "prediction_type": None})}  # fmt: skip
    save_file(state, str(path), metadata=meta)
    bundle = load_model(path)
    assert bundle.prediction_type == "v_prediction"
    assert bundle.noise_scheduler.config.prediction_type == "v_prediction"


LDM_V = 'model:\n  target: ldm.models.diffusion.ddpm.LatentDiffusion\n  params:\n    parameterization: "v"\n'
LDM_EPS = "model:\n  target: ldm.models.diffusion.ddpm.LatentDiffusion\n  params:\n    linear_start: 0.00085\n"


def _sgm(scaling: str) -> str:
    return (
        "model:\n  target: sgm.models.diffusion.DiffusionEngine\n  params:\n    denoiser_config:\n"
        "      target: sgm.modules.diffusionmodules.denoiser.DiscreteDenoiser\n      params:\n"
        f"        scaling_config:\n          target: sgm.modules.diffusionmodules.denoiser_scaling.{scaling}\n"
    )


def _beside(tmp_path, text: str | None, keys=SD2, **kw):
    """Detection of a file named model.safetensors with ``text`` as the model.yaml beside it."""
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"")
    (tmp_path / "model.yaml").unlink(missing_ok=True)
    if text is not None:
        (tmp_path / "model.yaml").write_text(text)
    return _fake(keys, path=model, **kw)


def test_the_a1111_config_beside_the_file_declares_the_prediction_type(tmp_path):
    assert (_beside(tmp_path, None).prediction_type, _beside(tmp_path, None).prediction_source) == (
        "v_prediction", "default")  # fmt: skip
    # SD2-512-base ships v2-inference.yaml without parameterization: ldm's default, eps
    found = _beside(tmp_path, LDM_EPS)
    assert (found.prediction_type, found.prediction_source) == ("epsilon", "model.yaml")
    assert _beside(tmp_path, LDM_V, keys=SD1).prediction_type == "v_prediction"
    # A1111 reads the config before everything the file says; the user's option still wins
    assert _beside(tmp_path, LDM_EPS, metadata={"modelspec.prediction_type": "v"}).prediction_type == "epsilon"
    assert _beside(tmp_path, LDM_EPS, keys=XL, markers={"v_pred"}).prediction_type == "epsilon"
    assert _beside(tmp_path, LDM_EPS, prediction_type="v").prediction_source == "user"
    assert _beside(tmp_path, _sgm("VScaling"), keys=XL).prediction_type == "v_prediction"
    assert _beside(tmp_path, _sgm("VScalingWithEDMcNoise"), keys=XL).prediction_type == "v_prediction"
    assert _beside(tmp_path, _sgm("EpsScaling"), keys=XL, markers={"v_pred"}).prediction_type == "epsilon"
    # a yaml that is not a model config declares nothing
    assert _beside(tmp_path, "prompt: a cat\n").prediction_source == "default"


def test_a_config_beside_the_file_that_cannot_be_used_is_named(tmp_path):
    with pytest.raises(ModelFormatError, match=r"model\.yaml: denoiser scaling .*EDMScaling"):
        _beside(tmp_path, _sgm("EDMScaling"), keys=XL)
    with pytest.raises(ModelFormatError, match=r"model\.yaml: parameterization 'x0'"):
        _beside(tmp_path, LDM_EPS.replace("linear_start: 0.00085", "parameterization: x0"))
    with pytest.raises(
        ModelFormatError, match=r"model\.yaml: the model config beside model\.safetensors cannot be read"
    ):
        _beside(tmp_path, "model: [unclosed\n")
    # a denoiser_config whose params are not a mapping is named too (it raised AttributeError)
    with pytest.raises(ModelFormatError, match=r"model\.yaml: denoiser scaling None"):
        _beside(tmp_path, "model:\n  params:\n    denoiser_config:\n      params: [1, 2]\n", keys=XL)


def test_a_loaded_sd2_file_trains_as_its_config_says(tiny_files, tmp_path, sd_cli):
    path = tmp_path / "sd2-base.safetensors"
    path.write_bytes(tiny_files["sd2"].read_bytes())  # our file: modelspec and v_pred marker say v
    assert load_model(path).prediction_type == "v_prediction"
    info = sd_cli(["model", "info", str(path), "--no-hash"])
    assert "prediction type: v_prediction (its modelspec.prediction_type)\n" in info.output, info.output
    (tmp_path / "sd2-base.yaml").write_text(LDM_EPS)
    bundle = load_model(path)
    assert bundle.prediction_type == "epsilon"
    assert bundle.noise_scheduler.config.prediction_type == "epsilon"
    info = sd_cli(["model", "info", str(path), "--no-hash"])
    assert "prediction type: epsilon (sd2-base.yaml beside the file)\n" in info.output, info.output
    assert "VAE beside it" not in info.output
    (tmp_path / "sd2-base.vae.safetensors").write_bytes(b"")
    info = sd_cli(["model", "info", str(path), "--no-hash"])
    assert "VAE beside it:   sd2-base.vae.safetensors (A1111 uses it; sdcore only with --vae)\n" in info.output


def test_family_mismatch(tiny_files):
    with pytest.raises(ModelFormatError, match="not sdxl"):
        load_model(tiny_files["sd1"], family="sdxl")


def test_sgm_sd2_prefix_is_read_as_sd2(tiny_files, tmp_path, assert_modules_equal):
    """SD2.1-turbo style files store OpenCLIP-H under conditioner.embedders.0.model. (width 1024 there)."""
    from sdcore.models.source import CheckpointSource

    state = {
        "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3),
        "conditioner.embedders.0.model.ln_final.weight": torch.zeros(1024),
        "conditioner.embedders.0.model.transformer.resblocks.0.attn.in_proj_weight": torch.zeros(3, 1),
    }
    path = tmp_path / "turbo.safetensors"
    save_file(state, str(path))
    source = CheckpointSource(path)
    assert "cond_stage_model.model.ln_final.weight" in source.keys
    assert source.get("cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight").shape == (3, 1)
    assert detect(source.keys, source.shape, {}).family == "sd2"


def test_ztsnr_marker_roundtrip(tiny_bundles, tmp_path):
    from diffusers import DDPMScheduler
    from sdcore.models.tiny import noise_scheduler_config

    bundle = tiny_bundles["sdxl"]
    original = bundle.noise_scheduler
    try:
        bundle.noise_scheduler = DDPMScheduler(**noise_scheduler_config("epsilon"), rescale_betas_zero_snr=True)
        path = bundle.save(tmp_path / "zt.safetensors")
    finally:
        bundle.noise_scheduler = original
    state = load_file(str(path))
    assert "ztsnr" in state
    assert load_model(path).noise_scheduler.config.rescale_betas_zero_snr


def test_inpainting_roundtrip(tmp_path):
    from sdcore.models.tiny import create_tiny_bundle

    bundle = create_tiny_bundle("sd1", variant="inpainting")
    assert bundle.unet.config.in_channels == 9
    single = load_model(bundle.save(tmp_path / "inpaint.safetensors"))
    assert single.inpainting and single.family_label == "sd1-inpainting"
    assert single.metadata["modelspec.architecture"] == "stable-diffusion-v1-inpainting"
    folder = bundle.save(tmp_path / "inpaint-folder")
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "StableDiffusionInpaintPipeline"
    assert load_model(folder).family_label == "sd1-inpainting"


@pytest.mark.parametrize("spec", ["tiny:sd1-inpainting", "tiny:sd2:inpainting", "tiny:sdxl-inpainting", "tiny:sd1"])
def test_the_layout_of_a_tiny_name_is_the_model_it_loads(spec):
    """The pre-flight's layout reader reads ``tiny:`` names as the loader does (both spellings of the variant),
    so an inpainting tiny model is one before it loads (the inpainting checks read ``layout.inpainting``)."""
    from sdcore.models.layout import meta_bundle, peek_family, read_layout

    layout, bundle = read_layout(spec), load_model(spec)
    assert (layout.family, layout.inpainting) == (bundle.family, bundle.inpainting)
    assert layout.inpainting is spec.endswith("inpainting")
    assert layout.configs["unet"]["in_channels"] == bundle.unet.config.in_channels == (9 if layout.inpainting else 4)
    assert meta_bundle(layout).unet.conv_in.weight.shape == bundle.unet.conv_in.weight.shape
    assert peek_family(spec) == bundle.family


def test_an_unknown_tiny_variant_is_refused_by_the_layout_reader_as_by_the_loader():
    from sdcore.models.layout import read_layout

    with pytest.raises(ModelFormatError, match=r"^tiny:sd1-foo: unknown variant 'foo' of sd1; the one there is: "):
        read_layout("tiny:sd1-foo")
    with pytest.raises(SdcoreError, match="unknown variant 'foo' of sd1"):
        load_model("tiny:sd1-foo")


def test_an_a1111_vae_beside_the_file_is_named_by_the_preflight(tiny_files, tmp_path):
    from sdcore.models.detect import sidecar_vae
    from sdcore.models.layout import read_layout
    from sdcore.train.options import TrainOptions
    from sdcore.train.preflight import sidecar_vae_notes

    path = tmp_path / "model.safetensors"
    path.write_bytes(tiny_files["sd1"].read_bytes())
    layout = read_layout(path)
    assert sidecar_vae(path) is None and sidecar_vae_notes(TrainOptions(), layout) == []
    (tmp_path / "model.vae.pt").write_bytes(b"")
    (tmp_path / "model.vae.safetensors").write_bytes(b"")  # sdcore names the .safetensors first
    assert sidecar_vae(path) == tmp_path / "model.vae.safetensors"
    (note,) = sidecar_vae_notes(TrainOptions(), layout)
    assert note.startswith("model.vae.safetensors is beside the model: A1111 (its Automatic VAE) encodes with it")
    assert note.endswith(f"give --vae {tmp_path / 'model.vae.safetensors'} to train on A1111's latents")
    assert sidecar_vae_notes(TrainOptions(vae=str(tmp_path / "model.vae.pt")), layout) == []


def test_the_a1111_vae_rule_holds_for_sd_single_files_without_a_vae_only(tmp_path):
    """One rule for the three notes: an SD1/SD2/SDXL single file, no --vae; folders and FLUX.1 files never."""
    from sdcore.models.detect import unused_a1111_vae

    path = tmp_path / "model.safetensors"
    path.write_bytes(b"")
    (tmp_path / "model.vae.ckpt").write_bytes(b"")
    assert unused_a1111_vae(path, "single-file", "sdxl", vae_given=False) == tmp_path / "model.vae.ckpt"
    assert unused_a1111_vae(path, "single-file", "sdxl", vae_given=True) is None
    assert unused_a1111_vae(path, "single-file", "flux", vae_given=False) is None
    assert unused_a1111_vae(path, "diffusers", "sd1", vae_given=False) is None
    assert unused_a1111_vae(None, "single-file", "sd1", vae_given=False) is None


def test_generate_names_an_a1111_vae_beside_the_model(tiny_files, tmp_path, sd_cli):
    path = tmp_path / "model.safetensors"
    path.write_bytes(tiny_files["sd1"].read_bytes())
    args = ["generate", "a cat", "--model", str(path), "--steps", "1", "--size", "64", "--output", str(tmp_path / "o")]
    plain = sd_cli(args)
    assert plain.exit_code == 0, plain.output
    assert "beside the model" not in plain.output
    (tmp_path / "model.vae.pt").write_bytes(b"")
    noted = sd_cli([*args, "--overwrite"])
    assert noted.exit_code == 0, noted.output
    assert (
        f"note: model.vae.pt is beside the model: A1111 (its Automatic VAE) decodes with it; sdcore uses the "
        f"model's own VAE: give --vae {tmp_path / 'model.vae.pt'} for A1111's images" in noted.output
    )


@pytest.mark.parametrize(
    ("key", "says"),
    [
        ("decoder.conv_in.weight|encoder.conv_in.weight", "a VAE alone: give it with --vae"),
        (
            "text_model.final_layer_norm.weight",
            "CLIP-L text encoder / CLIP-G text encoder alone: give it with --clip-l",
        ),
        ("encoder.block.0.layer.0.SelfAttention.q.weight", "a T5-XXL text encoder alone: give it with --t5xxl"),
    ],
)
def test_a_part_file_is_named_with_its_option(key, says):
    """A ComfyUI ``vae/``, ``clip/`` or ``text_encoders/`` file given where a model goes (``model info``, ``--model``):
    the error says what the file holds and which option takes it, not only what it is not."""
    from sdcore.errors import ModelFormatError
    from sdcore.models.detect import detect_family

    with pytest.raises(ModelFormatError, match="not a Stable Diffusion checkpoint") as raised:
        detect_family(set(key.split("|")), "part.safetensors")
    assert says in str(raised.value)
    with pytest.raises(ModelFormatError) as plain:
        detect_family({"something.else"}, "x.safetensors")
    assert "alone" not in str(plain.value)
