"""Flux.1: the tiny model, BFL <-> diffusers keys, every file layout users have, and the adapter
against diffusers' own ``FluxPipeline`` (prompt encoding, packing, one denoising step)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")


# ----------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def dev():
    from sdcore.models.flux.adapter import FluxAdapter

    return FluxAdapter().create_tiny(variant="dev", seed=0)


@pytest.fixture(scope="module")
def schnell():
    from sdcore.models.flux.adapter import FluxAdapter

    return FluxAdapter().create_tiny(variant="schnell", seed=1)


@pytest.fixture(scope="module")
def pipeline_folder(dev, tmp_path_factory):
    """The tiny dev model written by diffusers itself (``FluxPipeline.save_pretrained``)."""
    from diffusers import FluxPipeline

    folder = tmp_path_factory.mktemp("flux") / "diffusers-own"
    pipe = FluxPipeline(scheduler=dev.noise_scheduler, vae=dev.vae, text_encoder=dev.text_encoders[0],
                        tokenizer=dev.tokenizers[0], text_encoder_2=dev.text_encoders[1],
                        tokenizer_2=dev.tokenizers[1], transformer=dev.transformer)  # fmt: skip
    pipe.save_pretrained(folder)
    return folder


def _same(left, right, name=""):
    a, b = left.state_dict(), right.state_dict()
    assert set(a) == set(b), (name, sorted(set(a) ^ set(b))[:4])
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), (name, key)


def _same_bundle(left, right):
    assert list(left.components()) == list(right.components())
    for name, module in left.components().items():
        _same(module, right.components()[name], name)


def _save(tensors, path):
    from safetensors.torch import save_file

    save_file({k: v.contiguous().clone() for k, v in tensors.items()}, str(path))
    return path


# ----------------------------------------------------------------------------------------------- family, tiny


def test_family_declared():
    from sdcore.models.family import family_adapter, get_family

    flux = get_family("flux")
    assert (flux.denoiser, flux.objective, flux.native_resolution) == ("transformer", "flow-matching", 1024)
    assert (flux.latent.channels, flux.latent.scaling_factor, flux.latent.shift_factor) == (16, 0.3611, 0.1159)
    assert [(t.component, t.kind) for t in flux.text_encoders] == [
        ("text_encoder", "clip-l"),
        ("text_encoder_2", "t5-xxl"),
    ]
    assert type(family_adapter("flux")).__name__ == "FluxAdapter"


def test_tiny_dev_and_schnell(dev, schnell):
    assert dev.family == schnell.family == "flux"
    assert (dev.family_label, schnell.family_label) == ("flux-dev", "flux-schnell")
    cfg = dev.transformer.config
    assert sum(cfg.axes_dims_rope) == cfg.attention_head_dim == 16 and cfg.num_attention_heads == 2
    assert cfg.in_channels == 4 * dev.vae.config.latent_channels == 64
    assert dev.vae.config.scaling_factor == 0.3611 and dev.vae.config.shift_factor == 0.1159
    assert dev.vae.quant_conv is None and dev.vae.post_quant_conv is None
    assert dev.noise_scheduler.config.use_dynamic_shifting and dev.noise_scheduler.config.shift == 3.0
    assert not schnell.noise_scheduler.config.use_dynamic_shifting
    assert not schnell.transformer.config.guidance_embeds and dev.transformer.config.guidance_embeds
    assert list(dev.components()) == ["transformer", "vae", "text_encoder", "text_encoder_2"]


# ----------------------------------------------------------------------------------------------- keys


def test_bfl_round_trip_is_bit_exact(dev, schnell):
    from sdcore.models.flux.convert import bfl_to_diffusers, diffusers_to_bfl, transformer_config_from_bfl

    for bundle in (dev, schnell):
        state = bundle.transformer.state_dict()
        bfl = diffusers_to_bfl(state)
        assert "double_blocks.1.img_attn.qkv.weight" in bfl and "single_blocks.1.linear1.weight" in bfl
        assert ("guidance_in.in_layer.weight" in bfl) == bundle.transformer.config.guidance_embeds
        assert bfl["single_blocks.0.linear1.weight"].shape[0] == 3 * 32 + 4 * 32
        back = bfl_to_diffusers(set(bfl), bfl.__getitem__)
        assert set(back) == set(state)
        assert all(torch.equal(back[k], state[k]) for k in state)
        config = transformer_config_from_bfl(set(bfl), lambda k: tuple(bfl[k].shape))  # noqa: B023
        for key, value in config.items():
            if not key.startswith("_"):
                stored = bundle.transformer.config[key]
                assert (list(stored) if isinstance(stored, (list, tuple)) else stored) == value, key
    final = dev.transformer.state_dict()["norm_out.linear.weight"]
    stored = diffusers_to_bfl(dev.transformer.state_dict())["final_layer.adaLN_modulation.1.weight"]
    assert torch.equal(stored[: final.shape[0] // 2], final[final.shape[0] // 2 :])  # (shift, scale) vs (scale, shift)


def test_converter_agrees_with_diffusers_own():
    """diffusers' converter assumes the released width (3072): compare on a BFL state dict of that
    width but with thin columns, so every split and swap is exercised at the real row sizes."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers
    from sdcore.models.flux.convert import bfl_to_diffusers, diffusers_to_bfl, key_plan

    inner = 3072
    rows = {"img_attn.qkv": 3 * inner, "txt_attn.qkv": 3 * inner, "linear1": 7 * inner, "img_in": inner,
            "adaLN_modulation.1": 2 * inner}  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    bfl = {}
    for group in key_plan(2, 2, True):
        n = next((r for part, r in rows.items() if part + "." in group.bfl), 6)
        shape = (n, 2) if group.bfl.endswith(".weight") else (n,)
        bfl["model.diffusion_model." + group.bfl] = torch.randn(shape, generator=generator)
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(bfl))
    ours = bfl_to_diffusers(set(bfl), bfl.__getitem__, "model.diffusion_model.")
    assert set(ours) == set(theirs)
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key
    again = diffusers_to_bfl(theirs, "model.diffusion_model.")
    assert set(again) == set(bfl) and all(torch.equal(again[k], bfl[k]) for k in bfl)


def test_detection_from_keys(dev, schnell):
    from sdcore.models.flux.convert import diffusers_to_bfl
    from sdcore.models.flux.load import is_flux_file, variant_of
    from sdcore.models.sd_unet import SD1_ADAPTER

    keys = set(diffusers_to_bfl(dev.transformer.state_dict()))
    comfy = {"model.diffusion_model." + k for k in diffusers_to_bfl(schnell.transformer.state_dict())}
    assert is_flux_file(keys) and is_flux_file(comfy)
    assert variant_of(keys) == "dev" and variant_of(comfy, "model.diffusion_model.") == "schnell"
    assert not is_flux_file(keys | {"single_stream_modulation.lin.weight"})  # Flux.2 shares double_blocks
    assert not is_flux_file({"model.diffusion_model.input_blocks.0.0.weight"})
    assert not SD1_ADAPTER.detect_single_file(keys)


# ----------------------------------------------------------------------------------------------- loading


def test_diffusers_folder_written_by_diffusers(dev, pipeline_folder):
    from sdcore.models.load import load_model

    loaded = load_model(pipeline_folder)
    assert loaded.family_label == "flux-dev" and loaded.source_format == "diffusers"
    _same_bundle(dev, loaded)
    assert loaded.tokenizers[1]("a cat").input_ids == dev.tokenizers[1]("a cat").input_ids
    assert loaded.noise_scheduler.config.use_dynamic_shifting


def test_user_layouts_without_our_metadata(dev, tmp_path):
    """BFL transformer file + clip_l/t5xxl/ae files, and a ComfyUI all-in-one: no sdcore.config, so
    every config comes from the tensor shapes."""
    from sdcore.models.flux.save import flux_state
    from sdcore.models.load import load_model
    from sdcore.models.t5 import t5_file_tensors

    state = flux_state(dev, "comfy")
    assert state["vae.decoder.mid.attn_1.q.weight"].ndim == 4  # BFL's AE stores attention as 1x1 convs
    comfy = _save(state, tmp_path / "flux1-dev-comfy.safetensors")
    transformer = _save({k[len("model.diffusion_model.") :]: v for k, v in state.items()
                         if k.startswith("model.diffusion_model.")}, tmp_path / "flux1-dev.safetensors")  # fmt: skip
    ae = _save({k[len("vae.") :]: v for k, v in state.items() if k.startswith("vae.")}, tmp_path / "ae.safetensors")
    clip = {k[len("text_encoders.clip_l.transformer.") :]: v for k, v in state.items() if "clip_l" in k}
    clip["text_projection.weight"] = torch.zeros(32, 32)  # clip_l.safetensors files often carry it
    clip_file = _save(clip, tmp_path / "clip_l.safetensors")
    t5_file = _save(t5_file_tensors(dev.text_encoders[1]), tmp_path / "t5xxl_fp16.safetensors")

    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    from safetensors.torch import load_file

    theirs = convert_ldm_vae_checkpoint(load_file(str(ae)), dict(dev.vae.config))  # diffusers reads our ae file
    ours = dev.vae.state_dict()
    assert set(theirs) == set(ours) and all(torch.equal(theirs[k].reshape(ours[k].shape), ours[k]) for k in ours)

    alone = load_model(transformer)
    assert list(alone.components()) == ["transformer"] and alone.family_label == "flux-dev"
    _same(dev.transformer, alone.transformer)
    parts = load_model(transformer, clip_l=clip_file, t5xxl=t5_file, ae=ae)
    _same_bundle(dev, parts)
    _same_bundle(dev, load_model(comfy))


def test_separate_parts_as_folders_win_over_the_file(dev, schnell, pipeline_folder, tmp_path):
    """schnell transformer file + dev's encoders and VAE from a diffusers folder's component folders."""
    from sdcore.models.load import load_model

    single = schnell.save(tmp_path / "schnell.safetensors")
    mixed = load_model(single, clip_l=pipeline_folder / "text_encoder", t5xxl=pipeline_folder, ae=pipeline_folder)
    assert mixed.family_label == "flux-schnell"
    _same(schnell.transformer, mixed.transformer)
    _same(dev.vae, mixed.vae)
    _same(dev.text_encoders[0], mixed.text_encoders[0])
    _same(dev.text_encoders[1], mixed.text_encoders[1])


@pytest.mark.parametrize("fmt", ["single-file", "bfl", "diffusers"])
def test_our_writers_read_back(dev, tmp_path, fmt):
    from safetensors import safe_open
    from sdcore.models.load import load_model

    path = dev.save(tmp_path / ("out" if fmt == "diffusers" else "out.safetensors"), format=fmt)
    loaded = load_model(path)
    if fmt == "bfl":
        _same(dev.transformer, loaded.transformer)
        with safe_open(str(path), "pt") as handle:
            assert "double_blocks.0.img_mod.lin.weight" in set(handle.keys())
            assert handle.metadata()["modelspec.architecture"] == "flux-1-dev"
    else:
        _same_bundle(dev, loaded)


def test_fp8_transformer_file_auto_keeps_stored_dtype(dev, tmp_path):
    """A flux1-dev-fp8 style file: float8 weights; "auto" (model info) keeps them, default reads fp32."""
    from sdcore.models.flux.convert import diffusers_to_bfl
    from sdcore.models.load import load_model

    stored = {k: (v.to(torch.float8_e4m3fn) if v.ndim == 2 else v.to(torch.bfloat16))
              for k, v in diffusers_to_bfl(dev.transformer.state_dict()).items()}  # fmt: skip
    path = _save(stored, tmp_path / "flux1-dev-fp8.safetensors")
    auto = load_model(path, dtype="auto")
    assert {p.dtype for p in auto.transformer.parameters()} == {torch.float8_e4m3fn, torch.bfloat16}
    full = load_model(path)
    assert {p.dtype for p in full.transformer.parameters()} == {torch.float32}
    key = "double_blocks.0.img_mlp.0.weight"
    assert torch.equal(full.transformer.state_dict()["transformer_blocks.0.ff.net.0.proj.weight"],
                       stored[key].to(torch.float32))  # fmt: skip


def test_option_and_part_errors(dev, tmp_path):
    from sdcore.errors import ModelFormatError, SdcoreError
    from sdcore.models.flux.adapter import FluxAdapter
    from sdcore.models.load import load_model

    only = load_model(dev.save(tmp_path / "t.safetensors", format="bfl"))
    with pytest.raises(ModelFormatError, match="clip_l="):
        FluxAdapter().encode_prompts(only, ["a cat"])
    sd1 = load_model("tiny:sd1").save(tmp_path / "sd1.safetensors")
    with pytest.raises(SdcoreError, match="t5xxl"):
        load_model(sd1, t5xxl=tmp_path / "x.safetensors")
    with pytest.raises(ModelFormatError, match="not sd1"):
        load_model(tmp_path / "t.safetensors", family="sd1")
    with pytest.raises(ModelFormatError, match="no CLIP-L"):
        load_model(tmp_path / "t.safetensors", clip_l=tmp_path / "t.safetensors")
    from sdcore.models.flux.convert import diffusers_to_bfl

    nf4 = diffusers_to_bfl(dev.transformer.state_dict())
    nf4["double_blocks.0.img_attn.qkv.weight.absmax"] = torch.ones(4)
    with pytest.raises(ModelFormatError, match="NF4"):
        load_model(_save(nf4, tmp_path / "flux1-dev-bnb-nf4.safetensors"))


# ----------------------------------------------------------------------------------------------- adapter vs diffusers


def test_pack_unpack_and_ids_match_the_pipeline():
    from diffusers import FluxPipeline
    from sdcore.errors import ConfigError
    from sdcore.models.flux.adapter import image_ids, pack_latents, unpack_latents

    latents = torch.randn(2, 16, 6, 4)
    packed = pack_latents(latents)
    assert torch.equal(packed, FluxPipeline._pack_latents(latents, 2, 16, 6, 4))
    assert torch.equal(unpack_latents(packed, 6, 4), latents)
    assert torch.equal(unpack_latents(packed, 6, 4), FluxPipeline._unpack_latents(packed, 48, 32, 8))
    assert torch.equal(image_ids(6, 4), FluxPipeline._prepare_latent_image_ids(2, 3, 2, "cpu", torch.float32))
    with pytest.raises(ConfigError, match="even"):
        pack_latents(torch.randn(1, 16, 5, 4))


def test_encode_prompts_equals_pipeline(dev, pipeline_folder):
    from diffusers import FluxPipeline
    from sdcore.models.flux.adapter import FluxAdapter

    pipe = FluxPipeline.from_pretrained(pipeline_folder, local_files_only=True)
    prompts = ["a purple ring on the sky", "a big red square"]
    with torch.no_grad():
        cond = FluxAdapter().encode_prompts(dev, prompts, t5_max_length=48)
        embeds, pooled, text_ids = pipe.encode_prompt(prompts, prompt_2=None, max_sequence_length=48)
    assert cond.hidden_states.shape == (2, 48, 32) and cond.pooled.shape == (2, 32)
    assert torch.equal(cond.hidden_states, embeds) and torch.equal(cond.pooled, pooled)
    assert not torch.equal(cond.pooled[0], cond.pooled[1])
    assert torch.equal(text_ids, torch.zeros(48, 3))


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_one_pipeline_step_equals_predict(variant, dev, schnell, pipeline_folder, tmp_path):
    """diffusers' FluxPipeline loads our folder and runs; its transformer output and its one-step
    result equal what the adapter predicts for the same inputs."""
    import dataclasses

    from diffusers import FluxPipeline
    from sdcore.models.flux.adapter import FluxAdapter, unpack_latents

    bundle = dev if variant == "dev" else schnell
    folder = bundle.save(tmp_path / "pipe")
    pipe = FluxPipeline.from_pretrained(folder, local_files_only=True)
    captured = {}

    def hook(module, args, kwargs, out):
        captured.update(kwargs, out=out[0])

    handle = pipe.transformer.register_forward_hook(hook, with_kwargs=True)
    start = torch.randn(1, 16, 4, 6, generator=torch.Generator().manual_seed(5))
    packed = FluxPipeline._pack_latents(start, 1, 16, 4, 6)
    result = pipe("a purple ring", height=32, width=48, num_inference_steps=1, guidance_scale=3.5, latents=packed,
                  output_type="latent", max_sequence_length=24).images  # fmt: skip
    handle.remove()
    # the same weights, but the pipeline's own modules: CPU matmuls on memory-mapped (differently
    # aligned) tensors differ in the last bit from the in-memory originals
    bundle = dataclasses.replace(bundle, transformer=pipe.transformer,
                                 text_encoders=[pipe.text_encoder, pipe.text_encoder_2])  # fmt: skip
    adapter = FluxAdapter()
    with torch.no_grad():
        cond = adapter.encode_prompts(bundle, ["a purple ring"], t5_max_length=24)
        sigma = float(pipe.scheduler.sigmas[0])
        timestep = captured["timestep"] * 1000
        predicted = adapter.predict(bundle, start, timestep, cond, guidance=3.5)
        default = adapter.predict(bundle, start, timestep, cond)
    assert torch.equal(predicted, unpack_latents(captured["out"], 4, 6))
    assert torch.equal(result, packed + (0.0 - sigma) * captured["out"])  # the Euler step to sigma 0
    if variant == "dev":
        assert torch.equal(captured["guidance"], torch.tensor([3.5]))
        assert not torch.allclose(default, predicted)  # guidance 1.0 (training default) differs from 3.5
    else:
        assert captured["guidance"] is None and torch.equal(default, predicted)


# ----------------------------------------------------------------------------------------------- CLI


def test_cli_create_tiny_and_info(tmp_path):
    from click.testing import CliRunner
    from sdcore.cli import build_cli
    from sdcore.plugins import get_plugin_manager

    cli = build_cli(get_plugin_manager())
    runner = CliRunner()
    out = tmp_path / "tiny-schnell.safetensors"
    result = runner.invoke(cli, ["model", "create-tiny", str(out), "--family", "flux-schnell"])
    assert result.exit_code == 0, result.output
    info = runner.invoke(cli, ["model", "info", str(out), "--no-hash"])
    assert info.exit_code == 0, info.output
    assert "family:          flux-schnell" in info.output
    assert "FluxTransformer2DModel" in info.output and "T5EncoderModel" in info.output
    bfl = tmp_path / "bfl.safetensors"
    from sdcore.models.load import load_model

    load_model(out).save(bfl, format="bfl")
    info = runner.invoke(cli, ["model", "info", str(bfl), "--no-hash"])
    assert "not in the model: text_encoder, text_encoder_2, vae" in info.output, info.output


# ----------------------------------------------------------------------------------------------- generation


def test_generate_images_equals_flux_pipeline(dev):
    """sdcore's generation over the bundle = diffusers' FluxPipeline run on the same modules and seeds."""
    from diffusers import FluxPipeline
    from sdcore.generate.pipeline import generate_images

    images = generate_images(dev, ["a purple ring", "a (red:1.3) square"], steps=3, cfg=3.5, seed=7,
                             width=32, height=48)  # fmt: skip
    pipe = FluxPipeline(scheduler=type(dev.noise_scheduler).from_config(dev.noise_scheduler.config), vae=dev.vae,
                        text_encoder=dev.text_encoders[0], tokenizer=dev.tokenizers[0],
                        text_encoder_2=dev.text_encoders[1], tokenizer_2=dev.tokenizers[1],
                        transformer=dev.transformer)  # fmt: skip
    import numpy as np

    for index, prompt in enumerate(["a purple ring", "a red square"]):  # emphasis weights dropped
        with torch.no_grad():
            expected = pipe(prompt, width=32, height=48, num_inference_steps=3, guidance_scale=3.5,
                            generator=torch.Generator().manual_seed(7 + index), max_sequence_length=512).images[0]  # fmt: skip
        assert images[index].size == (32, 48)
        assert np.array_equal(np.asarray(images[index]), np.asarray(expected)), index


def test_img2img_equals_flux_img2img_pipeline(dev):
    import numpy as np
    from diffusers import FluxImg2ImgPipeline
    from PIL import Image
    from sdcore.generate.pipeline import generate_images

    init = Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype("uint8"))
    got = generate_images(dev, ["a ring"], steps=4, cfg=2.0, seed=1, init_image=init, strength=0.5)[0]
    pipe = FluxImg2ImgPipeline(scheduler=type(dev.noise_scheduler).from_config(dev.noise_scheduler.config),
                               vae=dev.vae, text_encoder=dev.text_encoders[0], tokenizer=dev.tokenizers[0],
                               text_encoder_2=dev.text_encoders[1], tokenizer_2=dev.tokenizers[1],
                               transformer=dev.transformer)  # fmt: skip
    with torch.no_grad():  # A1111's strength 0.5 of 4 steps runs 3 (t_enc + 1): the pipeline's strength 0.75
        # from the posterior's mean (the pipeline takes latents as they are): its noise is the seed's first draw
        mean = pipe.vae.encode(pipe.image_processor.preprocess(init)).latent_dist.mean
        start = (mean - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
        expected = pipe("a ring", image=start, strength=0.75, width=32, height=32, num_inference_steps=4,
                        guidance_scale=2.0, generator=[torch.Generator().manual_seed(1)]).images[0]  # fmt: skip
    assert np.array_equal(np.asarray(got), np.asarray(expected))


def test_generate_rejects_what_flux_lacks(dev):
    from sdcore.errors import ConfigError
    from sdcore.generate.pipeline import generate_images

    with pytest.raises(ConfigError, match=r"negative prompt on Flux\.1 needs true CFG"):
        generate_images(dev, ["a cat"], negative_prompt="blurry", steps=1, width=32, height=32)
    with pytest.raises(ConfigError, match="multiples of 16"):
        generate_images(dev, ["a cat"], steps=1, width=40, height=32)
    with pytest.raises(ConfigError, match="does not sample flow-matching models"):
        generate_images(dev, ["a cat"], steps=1, width=32, height=32, sampler="ddim")


def test_cli_generate_tiny_flux(tmp_path):
    from click.testing import CliRunner
    from sdcore.cli import build_cli
    from sdcore.generate.pnginfo import read_png_parameters
    from sdcore.plugins import get_plugin_manager

    out = tmp_path / "flux.png"
    result = CliRunner().invoke(build_cli(get_plugin_manager()), ["generate", "--model", "tiny:flux-schnell", "a ring",
                                "--steps", "2", "--seed", "3", "-o", str(out), "--models-dir", str(tmp_path)])  # fmt: skip
    assert result.exit_code == 0, result.output
    params = read_png_parameters(out)
    assert params is not None and params.seed == 3 and params.sampler == "euler"  # not the SD default euler_a


def test_t5_attention_mask_hides_padding(dev):
    """With the mask (kohya's --apply_t5_attn_mask) the padded T5 positions cannot change the
    prediction; without it they do (the pipelines' default attends to padding)."""
    import dataclasses

    from sdcore.models.flux.adapter import T5_MASK, FluxAdapter

    adapter = FluxAdapter()
    latents = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(2))
    steps = torch.tensor([500.0, 900.0])
    with torch.no_grad():
        masked = adapter.encode_prompts(dev, ["a ring", "a big red square"], t5_max_length=16, t5_attention_mask=True)
        plain = adapter.encode_prompts(dev, ["a ring", "a big red square"], t5_max_length=16)
        pad = masked.extra[T5_MASK] == 0
        assert pad.any() and T5_MASK not in plain.extra
        noise = torch.randn(masked.hidden_states.shape) * pad[..., None]
        changed = dataclasses.replace(masked, hidden_states=masked.hidden_states + noise)
        a = adapter.predict(dev, latents, steps, masked)
        b = adapter.predict(dev, latents, steps, changed)
        c = adapter.predict(dev, latents, steps, dataclasses.replace(plain, hidden_states=changed.hidden_states))
        d = adapter.predict(dev, latents, steps, plain)
    assert torch.allclose(a, b, atol=1e-6)
    assert not torch.allclose(c, d, atol=1e-4)


def test_layout_from_header_for_the_memory_plan(dev, tmp_path):
    from sdcore.models.layout import meta_bundle, read_layout

    full = read_layout(dev.save(tmp_path / "all.safetensors", dtype="bf16"))
    assert full.family == "flux" and full.notes == [] and full.stored_bytes_per_weight == 2.0
    meta = meta_bundle(full)
    assert meta.transformer.config.guidance_embeds and meta.transformer.config.num_layers == 2
    assert sum(p.numel() for p in meta.transformer.parameters()) == sum(p.numel() for p in dev.transformer.parameters())
    assert meta.vae.config.latent_channels == 16
    alone = read_layout(dev.save(tmp_path / "bfl.safetensors", format="bfl"))
    assert alone.notes == ["not in the file, planned at the released sizes: vae, clip_l, t5xxl"]
    assert alone.configs["text_encoders"][1]["d_model"] == 4096  # T5-XXL


def test_flow_matching_training_steps_reduce_the_loss():
    """The adapter's predict with sdcore's FlowMatchingObjective is a trainable flow-matching setup:
    25 Adam steps on one image and caption bring the velocity loss on fixed held-out noises down."""
    from sdcore.models.family import get_family
    from sdcore.models.flux.adapter import FluxAdapter
    from sdcore.train.objectives import FlowMatchingObjective

    adapter = FluxAdapter()
    bundle = adapter.create_tiny(variant="dev", seed=4)
    pixels = torch.linspace(-1, 1, 3 * 64 * 64).reshape(1, 3, 64, 64)
    with torch.no_grad():
        latents = get_family("flux").latent.normalize(bundle.vae.encode(pixels).latent_dist.mean)
        cond = adapter.encode_prompts(bundle, ["a purple ring"], t5_max_length=16)
    objective = FlowMatchingObjective(timestep_sampling="sigmoid", shift=3.0)
    held_out = [objective.noised(latents, *objective.sample([1000 + i], latents.shape[1:])) for i in range(4)]

    def held_out_loss() -> float:
        with torch.no_grad():
            return sum(
                torch.nn.functional.mse_loss(adapter.predict(bundle, n.noisy, n.timesteps, cond), n.target).item()
                for n in held_out
            )

    before = held_out_loss()
    transformer = bundle.transformer.train()
    optimizer = torch.optim.Adam(transformer.parameters(), lr=3e-3)
    for step in range(25):
        noise, timesteps = objective.sample([step], latents.shape[1:])
        noised = objective.noised(latents, noise, timesteps)
        prediction = adapter.predict(bundle, noised.noisy, noised.timesteps, cond)
        loss = torch.nn.functional.mse_loss(prediction, noised.target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = held_out_loss()
    assert latents.shape == (1, 16, 8, 8)
    assert after < 0.8 * before, (before, after)  # measured 0.64 (5.54 -> 3.56)


def test_cli_parts_in_separate_files(dev, pipeline_folder, tmp_path):
    """`model convert flux1-dev.safetensors --clip-l --t5xxl --ae` -> one ComfyUI checkpoint; generate
    takes the same options."""
    from click.testing import CliRunner
    from sdcore.cli import build_cli
    from sdcore.models.load import load_model
    from sdcore.plugins import get_plugin_manager

    cli, runner = build_cli(get_plugin_manager()), CliRunner()
    bfl = dev.save(tmp_path / "flux1-dev.safetensors", format="bfl")
    parts = ["--clip-l", str(pipeline_folder / "text_encoder"), "--t5xxl", str(pipeline_folder / "text_encoder_2"),
             "--ae", str(pipeline_folder / "vae")]  # fmt: skip
    info = runner.invoke(cli, ["model", "info", str(bfl), "--no-hash", *parts])
    assert info.exit_code == 0 and "not in the model" not in info.output and "T5EncoderModel" in info.output
    out = tmp_path / "comfy.safetensors"
    result = runner.invoke(cli, ["model", "convert", str(bfl), str(out), *parts])
    assert result.exit_code == 0, result.output
    _same_bundle(dev, load_model(out))
    png = tmp_path / "x.png"
    result = runner.invoke(cli, ["generate", "--model", str(bfl), *parts, "a ring", "--size", "32", "--steps", "1",
                                 "-o", str(png), "--models-dir", str(tmp_path)])  # fmt: skip
    assert result.exit_code == 0 and png.is_file(), result.output
    missing = runner.invoke(cli, ["generate", "--model", str(bfl), "a ring", "--steps", "1", "-o", str(tmp_path / "y.png"),
                                  "--models-dir", str(tmp_path)])  # fmt: skip
    assert missing.exit_code == 2 and "Traceback" not in missing.output  # the pre-flight, before anything loads
    assert missing.output.splitlines() == [
        f"Error: {bfl} has no CLIP-L text encoder, T5-XXL text encoder, VAE: pass --clip-l <file or folder> "
        "--t5xxl <file or folder> --vae <file or folder>"
    ]


def test_real_t5_without_a_tokenizer(dev, tmp_path, monkeypatch):
    """A T5 whose vocabulary is not the tiny one and no tokenizer anywhere: the model still loads
    (model info, saving a folder), encoding names the option; t5_tokenizer= supplies it."""
    import dataclasses

    from huggingface_hub import constants
    from sdcore.errors import ModelFormatError
    from sdcore.models.flux.adapter import FluxAdapter
    from sdcore.models.load import load_model
    from sdcore.models.t5 import create_tiny_t5

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    big_vocab, _ = create_tiny_t5(seed=2, vocab_size=300)
    bundle = dataclasses.replace(dev, text_encoders=[dev.text_encoders[0], big_vocab])
    loaded = load_model(bundle.save(tmp_path / "real-t5.safetensors"))
    assert loaded.tokenizers[1] is None and loaded.text_encoders[1].config.vocab_size == 300
    folder = loaded.save(tmp_path / "folder")
    assert not (folder / "tokenizer_2").exists()
    with pytest.raises(ModelFormatError, match="t5_tokenizer"):
        FluxAdapter().encode_prompts(loaded, ["a cat"])
    dev.tokenizers[1].save_pretrained(tmp_path / "t5-tokenizer")
    given = load_model(tmp_path / "real-t5.safetensors", t5_tokenizer=tmp_path / "t5-tokenizer")
    assert given.tokenizers[1]("a cat").input_ids == dev.tokenizers[1]("a cat").input_ids


def test_diffusers_layout_transformer_file(dev, schnell, pipeline_folder, tmp_path):
    """A FluxTransformer2DModel saved alone in diffusers keys (the HF repo's transformer weights as one
    file): detected, config from shapes, plus the parts."""
    from sdcore.models.layout import read_layout
    from sdcore.models.load import load_model

    for bundle in (dev, schnell):
        path = _save(bundle.transformer.state_dict(), tmp_path / f"{bundle.family_label}-diffusers.safetensors")
        loaded = load_model(path, clip_l=pipeline_folder, t5xxl=pipeline_folder, ae=pipeline_folder)
        assert loaded.family_label == bundle.family_label
        _same(bundle.transformer, loaded.transformer)
        assert read_layout(path).configs["transformer"]["guidance_embeds"] == (bundle is dev)


@pytest.mark.parametrize("dropped", ["img_in.weight", "double_blocks.0.img_attn.norm.query_norm.scale",
                                     "double_blocks.0.img_attn.norm.key_norm.scale"])  # fmt: skip
def test_transformer_file_missing_a_tensor_is_one_line_naming_the_file(dev, tmp_path, dropped):
    """A cut-down BFL/ComfyUI file without a tensor the config is read from (``img_in``, the QK norm) raised a
    bare KeyError traceback (loading, and the pre-flight's layout); one the converter wants gave a message
    without the file."""
    from safetensors.torch import load_file
    from sdcore.errors import ModelFormatError
    from sdcore.models.family import family_adapter
    from sdcore.models.load import load_model

    full = dev.save(tmp_path / "full.safetensors")
    state = {k: v for k, v in load_file(str(full)).items() if k != "model.diffusion_model." + dropped}
    path = _save(state, tmp_path / "cut.safetensors")
    readers = [load_model] + ([family_adapter("flux").read_layout] if dropped == "img_in.weight" else [])
    for read in readers:
        with pytest.raises(ModelFormatError) as info:
            read(path)
        message = str(info.value)
        assert "\n" not in message and str(path) in message and dropped in message


def test_bypass_guidance_embedding_leaves_the_guidance_term_out(dev, schnell):
    """ai-toolkit's bypass_guidance_embedding (toolkit/models/flux.py): the time/text embedding is
    timestep_embedder(time_proj(1000 t)) + text_embedder(pooled), written here from diffusers'
    CombinedTimestepGuidanceTextProjEmbeddings parts; the guidance embedder gets no gradient, and the
    transformer is itself again afterwards."""
    from sdcore.errors import ConfigError
    from sdcore.models.flux.adapter import FluxAdapter, pack_latents, unpack_latents
    from sdcore.train.method import Conditioning

    adapter, transformer = FluxAdapter(), dev.transformer
    embed = transformer.time_text_embed
    gen = torch.Generator().manual_seed(3)
    latents = torch.randn(2, 16, 4, 6, generator=gen)
    cond = Conditioning(hidden_states=torch.randn(2, 8, 32, generator=gen), pooled=torch.randn(2, 32, generator=gen))
    timesteps = torch.tensor([250.0, 800.0])

    def formula(module, args, out):  # replaces the embedding the guided forward computed
        timestep, pooled = args[0], args[-1]
        return embed.timestep_embedder(embed.time_proj(timestep).to(pooled.dtype)) + embed.text_embedder(pooled)

    handle = embed.register_forward_hook(formula)
    try:
        with torch.no_grad():
            packed = transformer(hidden_states=pack_latents(latents), timestep=timesteps / 1000,
                                 guidance=torch.tensor([3.5, 3.5]), pooled_projections=cond.pooled,
                                 encoder_hidden_states=cond.hidden_states, txt_ids=torch.zeros(8, 3),
                                 img_ids=_image_ids(4, 6), return_dict=False)[0]  # fmt: skip
    finally:
        handle.remove()
    expected = unpack_latents(packed, 4, 6)
    with torch.no_grad():
        bypassed = adapter.predict(dev, latents, timesteps, cond, guidance=3.5, bypass_guidance_embedding=True)
        other_guidance = adapter.predict(dev, latents, timesteps, cond, guidance=1.0, bypass_guidance_embedding=True)
        guided = adapter.predict(dev, latents, timesteps, cond, guidance=3.5)
    assert torch.allclose(bypassed, expected, atol=1e-6) and torch.equal(bypassed, other_guidance)
    assert not torch.allclose(guided, bypassed, atol=1e-4)
    assert "forward" not in vars(embed)  # the class's forward again: sampling keeps the guidance
    with torch.no_grad():
        assert torch.equal(adapter.predict(dev, latents, timesteps, cond, guidance=3.5), guided)

    transformer.zero_grad(set_to_none=True)
    try:
        adapter.predict(
            dev, latents, timesteps, cond, guidance=3.5, bypass_guidance_embedding=True
        ).square().sum().backward()
        assert all(p.grad is None for p in embed.guidance_embedder.parameters())
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in embed.timestep_embedder.parameters())
        assert all(p.grad is not None for p in embed.text_embedder.parameters())
    finally:
        transformer.zero_grad(set_to_none=True)
    with pytest.raises(ConfigError, match="no guidance embedding"):
        adapter.predict(schnell, latents, timesteps, cond, bypass_guidance_embedding=True)


def _image_ids(height, width):
    from sdcore.models.flux.adapter import image_ids

    return image_ids(height, width)
