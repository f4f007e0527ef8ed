"""SD3/SD3.5: the tiny model in diffusers' own pipeline, the SAI <-> diffusers key converter, single files
in the layouts users have, detection, and the family adapter against ``StableDiffusion3Pipeline``."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from sdcore.errors import ModelFormatError  # noqa: E402
from sdcore.models.sd3.convert import (  # noqa: E402
    SAI_PREFIX,
    is_diffusers_mmdit,
    mmdit_from_sai,
    mmdit_to_sai,
    sai_view,
    shape_from_config,
    shape_from_keys,
)


@pytest.fixture(scope="module")
def sd3():
    from sdcore.models.sd3.tiny import create_tiny_sd3

    return create_tiny_sd3(seed=1)


@pytest.fixture(scope="module")
def sd35m():
    from sdcore.models.sd3.tiny import create_tiny_sd3

    return create_tiny_sd3(seed=2, variant="sd3.5-medium")


@pytest.fixture(scope="module")
def sd3_folder(sd3, tmp_path_factory):
    from sdcore.models.sd3.save import write_sd3_diffusers

    return write_sd3_diffusers(sd3, tmp_path_factory.mktemp("sd3") / "folder")


@pytest.fixture(scope="module")
def pipe(sd3_folder):
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline.from_pretrained(sd3_folder, local_files_only=True)


def _parts(bundle):
    return [bundle.transformer, bundle.vae, *bundle.text_encoders]


def _assert_same(left, right):
    a, b = left.state_dict(), right.state_dict()
    assert set(a) == set(b), sorted(set(a) ^ set(b))[:5]
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


# ------------------------------------------------------------------------------------------ key converter


@pytest.mark.parametrize("variant", ["sd3", "sd3.5-large", "sd3.5-medium"])
def test_converter_matches_diffusers_and_round_trips(variant):
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
    from sdcore.models.sd3.tiny import tiny_transformer_config

    torch.manual_seed(0)
    model = SD3Transformer2DModel(**tiny_transformer_config(variant))
    state = model.state_dict()
    shape = shape_from_config(model.config)
    sai = mmdit_to_sai(shape, state)
    assert shape_from_keys(sai) == shape
    assert SAI_PREFIX + "joint_blocks.1.context_block.adaLN_modulation.1.weight" in sai
    assert SAI_PREFIX + "joint_blocks.1.context_block.attn.proj.weight" not in sai  # last block: context pre-only
    assert (SAI_PREFIX + "joint_blocks.0.x_block.attn2.qkv.weight" in sai) == (variant == "sd3.5-medium")
    assert (SAI_PREFIX + "joint_blocks.0.x_block.attn.ln_q.weight" in sai) == (variant != "sd3")
    ours = mmdit_from_sai(shape, sai.__getitem__)
    theirs = convert_sd3_transformer_checkpoint_to_diffusers(dict(sai))
    assert set(ours) == set(theirs) == set(state)
    for key in state:
        assert torch.equal(ours[key], state[key]), key
        assert torch.equal(theirs[key], state[key]), key
    # the shift/scale halves really are exchanged (a plain rename would also round-trip)
    half = state["norm_out.linear.weight"].shape[0] // 2
    assert torch.equal(sai[SAI_PREFIX + "final_layer.adaLN_modulation.1.weight"][:half],
                       state["norm_out.linear.weight"][half:])  # fmt: skip


def test_converter_rejects_foreign_tensors():
    with pytest.raises(ModelFormatError, match="no SD3 joint_blocks"):
        shape_from_keys(["model.diffusion_model.input_blocks.0.0.weight"])
    from sdcore.models.sd3.convert import MMDiTShape

    with pytest.raises(ModelFormatError, match="no SAI name"):
        mmdit_to_sai(MMDiTShape(1), {"unknown.weight": torch.zeros(1)} | _fake_state(1))


def _fake_state(layers):
    from sdcore.models.sd3.convert import MMDiTShape, mmdit_rules

    out = {}
    for rule in mmdit_rules(MMDiTShape(layers)):
        for key in rule.diffusers:
            out[key] = torch.zeros(2, 2)
    return out


# ------------------------------------------------------------------------------------------ diffusers interop


def test_folder_runs_in_diffusers_pipeline_and_prompts_match(sd3, pipe):
    from sdcore.models.sd3.adapter import Sd3Adapter

    image = pipe("a red cat", num_inference_steps=1, height=64, width=64, output_type="pt", max_sequence_length=16)
    assert image.images.shape == (1, 3, 64, 64) and torch.isfinite(image.images).all()

    prompts = ["a red cat", "two blue squares on grass"]
    adapter = Sd3Adapter()
    for ours, diffusers_skip in ((1, None), (2, 1)):  # sdcore/A1111's clip skip 1 = SD3's penultimate layer
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompts, prompts, prompts, do_classifier_free_guidance=False, max_sequence_length=24,
            clip_skip=diffusers_skip,
        )  # fmt: skip
        cond = adapter.encode_prompts(sd3, prompts, t5_max_length=24, clip_skip=ours)
        assert cond.hidden_states.shape == (2, 77 + 24, 128) and cond.pooled.shape == (2, 96)
        assert torch.equal(cond.hidden_states, embeds)
        assert torch.equal(cond.pooled, pooled)
    masked = adapter.encode_prompts(sd3, prompts, t5_max_length=24, clip_skip=2, t5_attention_mask=True)
    assert torch.equal(masked.hidden_states[:, :77], cond.hidden_states[:, :77])  # CLIP part unchanged
    assert not torch.allclose(masked.hidden_states[:, 77:], cond.hidden_states[:, 77:])  # T5 ignores its padding


def test_predict_is_one_pipeline_step(sd3, pipe):
    """The adapter's prediction + the flow-matching Euler step == the pipeline's first step (no CFG)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from sdcore.models.sd3.adapter import Sd3Adapter

    latents = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    expected = pipe("a cat", num_inference_steps=2, height=64, width=64, guidance_scale=1.0, latents=latents.clone(),
                    output_type="latent", max_sequence_length=16).images  # fmt: skip
    adapter = Sd3Adapter()
    cond = adapter.encode_prompts(sd3, ["a cat"], t5_max_length=16)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(sd3.noise_scheduler.config)
    scheduler.set_timesteps(2)
    x = latents.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(adapter.predict(sd3, x, t.reshape(1), cond), t, x).prev_sample
    assert torch.allclose(x, expected, atol=1e-6), (x - expected).abs().max()


def test_single_file_round_trip_and_diffusers_reads_it(sd35m, tmp_path):
    from diffusers import StableDiffusion3Pipeline
    from sdcore.models.sd3.load import read_sd3_single_file
    from sdcore.models.sd3.save import write_sd3_diffusers, write_sd3_single_file

    path = write_sd3_single_file(sd35m, tmp_path / "m.safetensors")
    back = read_sd3_single_file(path)
    for mine, read in zip(_parts(sd35m), _parts(back), strict=True):
        _assert_same(mine, read)
    folder = write_sd3_diffusers(sd35m, tmp_path / "config")
    theirs = StableDiffusion3Pipeline.from_single_file(str(path), config=str(folder), local_files_only=True)
    names = ["transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"]
    for name, mine in zip(names, _parts(sd35m), strict=True):
        _assert_same(mine, getattr(theirs, name))


def test_layouts_users_have(sd3, tmp_path):
    """SAI full file -> (a) ComfyUI-style without text encoders + separate CLIP/T5 files, (b) diffusion model
    alone (bare keys) + VAE file + encoder folders; both read back to the same weights; shapes alone
    (no sdcore.config) give the configs."""
    from safetensors.torch import load_file, save_file
    from sdcore.models.sd3.load import read_sd3_single_file
    from sdcore.models.sd3.save import write_sd3_single_file

    full = load_file(str(write_sd3_single_file(sd3, tmp_path / "full.safetensors")))

    def part(prefix, name, strip=True):
        tensors = {(k[len(prefix) :] if strip else k): v for k, v in full.items() if k.startswith(prefix)}
        save_file(tensors, str(tmp_path / name))
        return tmp_path / name

    no_te = part("model.diffusion_model.", "no_te.safetensors", strip=False)
    save_file({k: v for k, v in full.items() if not k.startswith("text_encoders.")}, str(no_te))  # + VAE, no metadata
    clip_l = part("text_encoders.clip_l.transformer.", "clip_l.safetensors")
    clip_g = part("text_encoders.clip_g.transformer.", "clip_g.safetensors")
    t5 = part("text_encoders.t5xxl.transformer.", "t5xxl_fp16.safetensors")
    with pytest.raises(ModelFormatError, match="--clip-l <file or folder> --clip-g <file or folder> --t5xxl"):
        read_sd3_single_file(no_te)
    read = read_sd3_single_file(no_te, clip_l=clip_l, clip_g=clip_g, t5xxl=t5)
    for mine, got in zip(_parts(sd3), _parts(read), strict=True):
        _assert_same(mine, got)

    bare = part("model.diffusion_model.", "diffusion_model.safetensors")
    vae = part("first_stage_model.", "ae.safetensors")
    folders = tmp_path / "encoders"
    for name, module in zip(("clip_l", "clip_g", "t5"), sd3.text_encoders, strict=True):
        module.save_pretrained(folders / name)
    with pytest.raises(ModelFormatError, match="--vae"):
        read_sd3_single_file(bare, clip_l=clip_l, clip_g=clip_g, t5xxl=t5)
    read = read_sd3_single_file(
        bare, vae=vae, clip_l=folders / "clip_l", clip_g=folders / "clip_g", t5xxl=folders / "t5"
    )
    for mine, got in zip(_parts(sd3), _parts(read), strict=True):
        _assert_same(mine, got)
    sd3.vae.save_pretrained(tmp_path / "vae")  # a diffusers VAE: its folder reads, its lone weights file is named
    read = read_sd3_single_file(no_te, vae=tmp_path / "vae", clip_l=clip_l, clip_g=clip_g, t5xxl=t5)
    _assert_same(sd3.vae, read.vae)
    with pytest.raises(ModelFormatError, match="pass its folder"):
        read_sd3_single_file(no_te, vae=tmp_path / "vae" / "diffusion_pytorch_model.safetensors", clip_l=clip_l,
                             clip_g=clip_g, t5xxl=t5)  # fmt: skip
    # the transformer alone in diffusers' names (a transformer/ folder's weights file), config from shapes
    from sdcore.models.sd3.save import write_sd3_diffusers

    folder = write_sd3_diffusers(sd3, tmp_path / "folder")
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    save_file(load_file(str(weights)), str(tmp_path / "diffusers_transformer.safetensors"))  # no metadata
    read = read_sd3_single_file(
        tmp_path / "diffusers_transformer.safetensors", vae=folder / "vae", clip_l=folder / "text_encoder",
        clip_g=folder / "text_encoder_2", t5xxl=folder / "text_encoder_3",
    )  # fmt: skip
    for mine, got in zip(_parts(sd3), _parts(read), strict=True):
        _assert_same(mine, got)
    assert read.tokenizers[2].get_vocab() == sd3.tokenizers[2].get_vocab()  # the tiny T5 vocabulary, recognised by size
    with pytest.raises(ModelFormatError, match="no T5 encoder in this file"):
        read_sd3_single_file(no_te, clip_l=clip_l, clip_g=clip_g, t5xxl=clip_l)


def test_detection_names_the_release():
    from sdcore.models.sd3.detect import is_sd3_file, sd3_contents
    from sdcore.models.sd3.tiny import tiny_transformer_config

    for variant, label in (("sd3", "SD3 medium"), ("sd3.5-large", "SD3.5 large"), ("sd3.5-medium", "SD3.5 medium")):
        config = tiny_transformer_config(variant)
        keys = set(mmdit_to_sai(shape_from_config(config), _fake_full_state(config)))
        assert is_sd3_file(keys)
        found = sd3_contents(keys | {"first_stage_model.encoder.conv_in.weight"})
        assert found.variant == variant and found.label == label
        assert found.has_vae and not (found.has_clip_l or found.has_clip_g or found.has_t5)
        bare = {k[len(SAI_PREFIX) :] for k in keys}
        assert is_sd3_file(bare) and sd3_contents(bare).variant == variant
    assert not is_sd3_file({"model.diffusion_model.input_blocks.0.0.weight"})


def _fake_full_state(config):
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):
        return SD3Transformer2DModel(**config).state_dict()


# ------------------------------------------------------------------------------------------ sdcore surface


def test_family_declaration_and_load_model(sd3, sd3_folder, tmp_path):
    from sdcore.errors import SdcoreError
    from sdcore.models.family import family_adapter, get_family
    from sdcore.models.load import load_model
    from sdcore.models.sd3.adapter import Sd3Adapter

    spec = get_family("sd3")
    assert spec.denoiser == "transformer" and spec.objective == "flow-matching"
    assert [te.kind for te in spec.text_encoders] == ["clip-l", "clip-g", "t5-xxl"]
    assert (spec.latent.channels, spec.latent.scaling_factor, spec.latent.shift_factor) == (
        sd3.vae.config.latent_channels, sd3.vae.config.scaling_factor, sd3.vae.config.shift_factor,
    )  # fmt: skip
    assert isinstance(family_adapter("sd3"), Sd3Adapter)

    folder = load_model(sd3_folder, family="sd3")
    assert folder.family == "sd3" and folder.source_format == "diffusers"
    assert list(folder.components()) == ["transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"]
    for mine, read in zip(_parts(sd3), _parts(folder), strict=True):
        _assert_same(mine, read)

    path = sd3.save(tmp_path / "m.safetensors")  # bundle.save: the SAI single file
    single = load_model(path)
    assert single.family == "sd3" and single.source_format == "single-file"
    for mine, read in zip(_parts(sd3), _parts(single), strict=True):
        _assert_same(mine, read)
    with pytest.raises(ModelFormatError, match="is a sd3 checkpoint, not sdxl"):
        load_model(path, family="sdxl")
    with pytest.raises(SdcoreError, match="clipl do not apply to SD3 files"):
        load_model(path, clipl=path)
    with pytest.raises(SdcoreError, match="apply to single files only"):
        load_model(sd3_folder, clip_l=path)
    assert load_model("tiny:sd3:sd3.5-medium").transformer.config.dual_attention_layers == [0]


def test_cli_create_tiny_info_and_convert(tmp_path):
    from click.testing import CliRunner
    from sdcore.builtin import model_commands
    from sdcore.models.hashes import all_hashes

    runner = CliRunner()
    single = tmp_path / "tiny-sd3.safetensors"
    result = runner.invoke(model_commands.model_group, ["create-tiny", str(single), "--family", "sd3"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(model_commands.model_group, ["info", str(single)])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "family:          sd3 (Stable Diffusion 3 / 3.5)" in out and "variant:         SD3 medium" in out
    for name in ("SD3Transformer2DModel", "AutoencoderKL", "CLIPTextModelWithProjection", "T5EncoderModel"):
        assert name in out
    assert "modelspec.architecture: stable-diffusion-3-medium" in out
    hashes = all_hashes(single)
    assert hashes["short"] in out and hashes["sha256"] in out
    result = runner.invoke(model_commands.model_group, ["create-tiny", str(tmp_path / "x"), "--family", "nope"])
    assert result.exit_code != 0 and "known families" in str(result.exception)

    # a ComfyUI-style file without text encoders: info needs the separate encoders, named as users know them
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(single))
    bare = tmp_path / "no_te.safetensors"
    save_file({k: v for k, v in tensors.items() if not k.startswith("text_encoders.")}, str(bare))
    encoders = {}
    for name, prefix in (("clip_l", "clip_l"), ("clip_g", "clip_g"), ("t5", "t5xxl")):
        start = f"text_encoders.{prefix}.transformer."
        encoders[name] = tmp_path / f"{name}.safetensors"
        save_file({k[len(start) :]: v for k, v in tensors.items() if k.startswith(start)}, str(encoders[name]))
    result = runner.invoke(model_commands.model_group, ["info", str(bare), "--no-hash"])
    assert result.exit_code != 0 and "--clip-l" in str(result.exception)
    args = ["--clip-l", str(encoders["clip_l"]), "--clip-g", str(encoders["clip_g"]), "--t5xxl", str(encoders["t5"])]
    result = runner.invoke(model_commands.model_group, ["convert", str(bare), str(tmp_path / "folder"), *args])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "folder" / "text_encoder_3" / "config.json").is_file()


def test_generate_matches_diffusers_pipeline(sd3, pipe):
    """sdcore's generate (flow-matching Euler, CFG) gives the pipeline's image for the same seed and prompt."""
    import numpy as np
    from sdcore.generate.pipeline import generate_images

    ours = generate_images(sd3, ["a red cat"], negative_prompt="blurry", steps=2, cfg=3.0, seed=5, sampler="euler")
    theirs = pipe("a red cat", negative_prompt="blurry", num_inference_steps=2, guidance_scale=3.0, height=64,
                  width=64, generator=[torch.Generator().manual_seed(5)]).images  # fmt: skip
    assert ours[0].size == (64, 64)
    assert np.array_equal(np.asarray(ours[0]), np.asarray(theirs[0]))
    from sdcore.errors import ConfigError

    with pytest.raises(ConfigError, match="flow-matching"):
        generate_images(sd3, ["a red cat"], steps=1, sampler="ddim")


REAL_TRANSFORMERS = {  # diffusers' transformer/config.json of each release (sizes that matter)
    "sd3": dict(num_layers=24, attention_head_dim=64, num_attention_heads=24, caption_projection_dim=1536,
                pos_embed_max_size=192, dual_attention_layers=[], qk_norm=None),
    "sd3.5-large": dict(num_layers=38, attention_head_dim=64, num_attention_heads=38, caption_projection_dim=2432,
                        pos_embed_max_size=192, dual_attention_layers=[], qk_norm="rms_norm"),
    "sd3.5-medium": dict(num_layers=24, attention_head_dim=64, num_attention_heads=24, caption_projection_dim=1536,
                         pos_embed_max_size=384, dual_attention_layers=list(range(13)), qk_norm="rms_norm"),
}  # fmt: skip


@pytest.mark.parametrize("variant", list(REAL_TRANSFORMERS))
def test_real_sizes_come_back_from_shapes(variant):
    """Full-size SD3/SD3.5 parts built on the meta device (no memory): the SAI keys' shapes alone give back
    each release's configs and name the release, as for a downloaded file without our metadata."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from sdcore.models.bundle import ModelBundle
    from sdcore.models.sd3.detect import sd3_contents
    from sdcore.models.sd3.load import infer_clip_config, infer_transformer_config, infer_vae_config
    from sdcore.models.sd3.save import sd3_state_dict
    from sdcore.models.t5 import T5_XXL_CONFIG, t5_config_from_shapes
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    real = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, joint_attention_dim=4096,
                pooled_projection_dim=2048, **REAL_TRANSFORMERS[variant])  # fmt: skip
    clip_l = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  projection_dim=768, hidden_act="quick_gelu")  # fmt: skip
    clip_g = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                  projection_dim=1280, hidden_act="gelu")  # fmt: skip
    vae = dict(latent_channels=16, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
               down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
               use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609)  # fmt: skip
    with torch.device("meta"):
        bundle = ModelBundle(
            family="sd3", prediction_type="flow-matching", unet=None, vae=AutoencoderKL(**vae),
            transformer=SD3Transformer2DModel(**real),
            text_encoders=[CLIPTextModelWithProjection(CLIPTextConfig(**clip_l)),
                           CLIPTextModelWithProjection(CLIPTextConfig(**clip_g)),
                           T5EncoderModel(T5Config(**T5_XXL_CONFIG))],
            tokenizers=[], noise_scheduler=None,
        )  # fmt: skip
    state = sd3_state_dict(bundle)
    keys, shape = set(state), lambda key: tuple(state[key].shape)
    assert sd3_contents(keys).variant == variant
    inferred = infer_transformer_config(keys, shape)
    assert {k: inferred[k] for k in real} == real
    diffusers_state = bundle.transformer.state_dict()  # the same from diffusers' own names
    assert is_diffusers_mmdit(diffusers_state) and not is_diffusers_mmdit(keys)
    inferred = infer_transformer_config(*sai_view(set(diffusers_state), lambda k: tuple(diffusers_state[k].shape)))
    assert {k: inferred[k] for k in real} == real
    got_vae = infer_vae_config(keys, shape)
    assert {k: got_vae[k] for k in vae} == vae
    for config, prefix, kind in ((clip_l, "text_encoders.clip_l.transformer.", "clip-l"),
                                 (clip_g, "text_encoders.clip_g.transformer.", "clip-g")):  # fmt: skip
        got = infer_clip_config(keys, shape, prefix, kind)
        assert {k: got[k] for k in config} == config
    t5 = t5_config_from_shapes(keys, shape, "text_encoders.t5xxl.transformer.")
    assert all(t5[k] == T5_XXL_CONFIG[k] for k in ("d_model", "d_kv", "d_ff", "num_layers", "num_heads", "vocab_size"))


def test_layout_from_header_matches_the_loaded_model(sd3, tmp_path):
    """The pre-flight's header-only layout of an SD3 file builds (on meta) the same modules as loading it."""
    from safetensors.torch import load_file, save_file
    from sdcore.models.layout import LayoutUnavailableError, meta_bundle, read_layout

    path = sd3.save(tmp_path / "m.safetensors")
    layout = read_layout(path)
    assert layout.family == "sd3" and layout.stored_bytes_per_weight == 4.0
    meta = meta_bundle(layout)
    for mine, shaped in zip(_parts(sd3), _parts(meta), strict=True):
        assert type(mine) is type(shaped)
        assert {k: tuple(v.shape) for k, v in mine.state_dict().items()} == {
            k: tuple(v.shape) for k, v in shaped.state_dict().items()
        }
    bare = tmp_path / "bare.safetensors"
    save_file({k: v for k, v in load_file(str(path)).items() if k.startswith("model.")}, str(bare))
    with pytest.raises(LayoutUnavailableError, match="vae, clip_l, clip_g, t5xxl not in the file"):
        read_layout(bare)


def test_half_precision_files_as_released(sd3, tmp_path):
    """fp16 SAI files with an fp8 T5 (``sd3_medium_incl_clips_t5xxlfp8``): read as stored with dtype="auto",
    upcast to fp32 by default, every weight equal to the stored one."""
    from safetensors.torch import load_file, save_file
    from sdcore.models.load import load_model

    half = load_file(str(sd3.save(tmp_path / "fp16.safetensors", dtype="fp16")))
    assert {v.dtype for v in half.values()} == {torch.float16}
    t5 = "text_encoders.t5xxl.transformer."
    mixed = {k: (v.to(torch.float8_e4m3fn) if k.startswith(t5) else v) for k, v in half.items()}
    save_file(mixed, str(tmp_path / "fp8.safetensors"))
    bundle = load_model(tmp_path / "fp8.safetensors", dtype="auto")
    assert next(bundle.transformer.parameters()).dtype == torch.float16
    state = bundle.transformer.state_dict()
    for key, value in mmdit_from_sai(shape_from_config(sd3.transformer.config), half.__getitem__).items():
        assert torch.equal(state[key], value), key
    encoder = bundle.text_encoders[2].state_dict()  # its dtype under "auto" is sdcore.models.t5's choice
    assert torch.equal(encoder["shared.weight"].float(), mixed[t5 + "shared.weight"].float())
    default = load_model(tmp_path / "fp8.safetensors")  # the default: everything fp32
    assert default.text_encoders[2].state_dict()["shared.weight"].dtype == torch.float32
    assert torch.equal(default.text_encoders[2].state_dict()["shared.weight"], mixed[t5 + "shared.weight"].float())


def test_generate_command_txt2img_and_img2img(tmp_path):
    import types

    from click.testing import CliRunner
    from PIL import Image
    from sdcore.builtin.generate_command import generate
    from sdcore.plugins import get_plugin_manager

    obj = types.SimpleNamespace(pm=get_plugin_manager(builtins=False, entrypoints=False))
    out = tmp_path / "a.png"
    args = ["-m", "tiny:sd3", "a red cat", "--steps", "2", "--seed", "3", "--sampler", "euler", "-o", str(out)]
    result = CliRunner().invoke(generate, args, obj=obj)
    assert result.exit_code == 0, result.output
    assert Image.open(out).size == (64, 64)
    again = tmp_path / "b.png"
    args = ["-m", "tiny:sd3", "a red cat", "--steps", "2", "--seed", "3", "--init-image", str(out), "-o", str(again)]
    result = CliRunner().invoke(generate, args, obj=obj)
    assert result.exit_code == 0, result.output
    assert Image.open(again).size == (64, 64)
    # img2img from an init image of another size than the model's native one keeps that size (or --size's), as
    # on every other family (was the native 64x64: the img2img pipeline's default)
    Image.open(out).resize((96, 80)).save(tmp_path / "wide.png")
    for extra, size in (([], (96, 80)), (["--size", "48x32"], (48, 32))):
        args = ["-m", "tiny:sd3", "a red cat", "--steps", "2", "--seed", "3", "--init-image", str(tmp_path / "wide.png"),
                "-o", str(tmp_path / f"w{size[0]}.png"), *extra]  # fmt: skip
        result = CliRunner().invoke(generate, args, obj=obj)
        assert result.exit_code == 0, result.output
        assert Image.open(tmp_path / f"w{size[0]}.png").size == size
        assert f"Size: {size[0]}x{size[1]}," in Image.open(tmp_path / f"w{size[0]}.png").info["parameters"]
    args = ["-m", "tiny:sd3", "a red cat", "--steps", "1", "--sampler", "ddim", "-o", str(tmp_path / "c.png")]
    result = CliRunner().invoke(generate, args, obj=obj)
    assert result.exit_code != 0 and "euler, euler_a, heun" in str(result.exception)


def test_tiny_model_fixture_builds_any_family(tiny_model):
    bundle = tiny_model("sd3", seed=4)
    assert bundle.family == "sd3" and type(bundle.transformer).__name__ == "SD3Transformer2DModel"
    assert tiny_model("sd3", seed=4) is not bundle  # a fresh copy each time


def test_comfyui_scaled_fp8_transformer(sd3, tmp_path):
    """ComfyUI's ``*_fp8_scaled`` files: float8 weights with a per-tensor ``scale_weight`` read back as W8 * s."""
    from safetensors.torch import load_file, save_file
    from sdcore.models.load import load_model

    tensors = load_file(str(sd3.save(tmp_path / "full.safetensors")))
    expected = {}
    for key in list(tensors):
        if key.startswith(SAI_PREFIX + "joint_blocks.") and key.endswith(".weight") and tensors[key].ndim == 2:
            scale = tensors[key].abs().max() / 448.0
            tensors[key] = (tensors[key] / scale).to(torch.float8_e4m3fn)
            tensors[key[: -len("weight")] + "scale_weight"] = scale.reshape(1)
            expected[key] = tensors[key].float() * scale
    tensors["scaled_fp8"] = torch.zeros(2, dtype=torch.float8_e4m3fn)  # ComfyUI's marker
    save_file(tensors, str(tmp_path / "fp8_scaled.safetensors"))
    bundle = load_model(tmp_path / "fp8_scaled.safetensors")
    assert expected
    shape = shape_from_config(sd3.transformer.config)
    state = bundle.transformer.state_dict()
    for key, value in mmdit_from_sai(shape, lambda k: expected.get(k, tensors[k])).items():
        assert torch.equal(state[key], value.float()), key
    out = bundle.transformer.state_dict()["transformer_blocks.0.attn.to_q.weight"]
    reference = sd3.transformer.state_dict()["transformer_blocks.0.attn.to_q.weight"]
    assert (out - reference).abs().max() < 0.1 * reference.abs().max()  # fp8 rounding, not garbage


def test_native_size_from_the_header(sd3, sd3_folder, tmp_path):
    """The training pre-flight's native size (before loading): the transformer's sample_size x 8."""
    from sdcore.models.native import peek_native_resolution

    assert peek_native_resolution(sd3.save(tmp_path / "m.safetensors")) == 64
    assert peek_native_resolution(sd3_folder) == 64


@pytest.mark.parametrize("dropped", ["pos_embed", "x_embedder.proj.weight", "context_embedder.weight",
                                     "y_embedder.mlp.0.weight", "final_layer.linear.weight"])  # fmt: skip
def test_file_missing_a_tensor_the_sizes_come_from(sd3, tmp_path, dropped):
    """A cut-down SAI/ComfyUI file without a tensor whose shape gives the transformer's config raised a bare
    KeyError traceback, from ``model info`` and the pre-flight's layout alike."""
    from safetensors.torch import load_file, save_file
    from sdcore.models.load import load_model
    from sdcore.models.sd3.load import sd3_file_configs

    full = sd3.save(tmp_path / "full.safetensors")
    state = {k: v for k, v in load_file(str(full)).items() if k != "model.diffusion_model." + dropped}
    path = tmp_path / "cut.safetensors"
    save_file(state, str(path))
    for read in (load_model, sd3_file_configs):
        with pytest.raises(ModelFormatError) as info:
            read(path)
        message = str(info.value)
        assert "\n" not in message and str(path) in message and dropped in message
