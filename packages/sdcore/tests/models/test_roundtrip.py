"""diffusers folder -> our single file -> our loader / diffusers' loader: every tensor bit-identical."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors import safe_open
from sdcore.models.load import load_model

FAMILIES = ("sd1", "sd2", "sdxl")

CAT_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]


@pytest.mark.parametrize("family", FAMILIES)
def test_single_file_roundtrip_is_bit_identical(family, tiny_bundles, tiny_files, assert_modules_equal):
    loaded = load_model(tiny_files[family])
    original = tiny_bundles[family]
    assert loaded.source_format == "single-file"
    assert loaded.family == family
    assert loaded.prediction_type == original.prediction_type
    assert list(loaded.components()) == list(original.components())
    for name, module in original.components().items():
        assert_modules_equal(module, loaded.components()[name])


@pytest.mark.parametrize("family", FAMILIES)
def test_diffusers_folder_roundtrip(family, tiny_bundles, tiny_folders, assert_modules_equal):
    loaded = load_model(tiny_folders[family])
    assert loaded.source_format == "diffusers"
    assert (loaded.family, loaded.prediction_type) == (family, tiny_bundles[family].prediction_type)
    for name, module in tiny_bundles[family].components().items():
        assert_modules_equal(module, loaded.components()[name])


@pytest.mark.parametrize("family", FAMILIES)
def test_diffusers_from_single_file_reads_our_file(
    family, tiny_bundles, tiny_folders, tiny_files, assert_modules_equal
):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    pipe = cls.from_single_file(str(tiny_files[family]), config=str(tiny_folders[family]), local_files_only=True)
    for name, module in tiny_bundles[family].components().items():
        assert_modules_equal(module, getattr(pipe, name))
    assert pipe.scheduler.config.prediction_type == tiny_bundles[family].prediction_type


@pytest.mark.parametrize("family", FAMILIES)
def test_file_layout_uses_ldm_names(family, tiny_files):
    with safe_open(str(tiny_files[family]), "pt") as handle:
        keys = set(handle.keys())
        meta = handle.metadata()
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys
    assert "first_stage_model.decoder.mid.attn_1.q.weight" in keys
    if family == "sd1":
        assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in keys
    if family == "sd2":
        assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in keys
        assert "cond_stage_model.model.transformer.resblocks.3.ln_1.weight" in keys  # restored penultimate+1
        assert "v_pred" in keys and meta["modelspec.prediction_type"] == "v"
        assert meta["modelspec.architecture"] == "stable-diffusion-v2-768-v"
    if family == "sdxl":
        assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in keys
        assert "conditioner.embedders.1.model.text_projection" in keys
        assert "model.diffusion_model.label_emb.0.0.weight" in keys
        assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    assert meta["modelspec.sai_model_spec"] == "1.0.1"
    data = tiny_files[family].read_bytes()
    start = 8 + int.from_bytes(data[:8], "little")
    assert meta["modelspec.hash_sha256"] == "0x" + hashlib.sha256(data[start:]).hexdigest()
    assert meta["modelspec.resolution"] == "64x64"
    assert json.loads(meta["sdcore.config"])["family"] == family


def test_openclip_packing_and_projection(tiny_bundles, tiny_files):
    te = tiny_bundles["sdxl"].text_encoders[1]
    layer = te.text_model.encoder.layers[0].self_attn
    with safe_open(str(tiny_files["sdxl"]), "pt") as handle:
        packed = handle.get_tensor("conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight")
        projection = handle.get_tensor("conditioner.embedders.1.model.text_projection")
        attn = handle.get_tensor("first_stage_model.encoder.mid.attn_1.k.weight")
    assert torch.equal(packed, torch.cat([layer.q_proj.weight, layer.k_proj.weight, layer.v_proj.weight]))
    assert torch.equal(projection, te.text_projection.weight.T)
    assert attn.ndim == 4 and attn.shape[2:] == (1, 1)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_precision_file(dtype, tiny_bundles, tmp_path):
    target = getattr(torch, {"fp16": "float16", "bf16": "bfloat16"}[dtype])
    path = tiny_bundles["sd1"].save(tmp_path / "half.safetensors", dtype=dtype)
    with safe_open(str(path), "pt") as handle:
        assert handle.get_tensor("model.diffusion_model.out.2.weight").dtype == target
        assert handle.metadata()["modelspec.unet_dtype"] == dtype
    loaded = load_model(path, dtype=dtype)
    ref = tiny_bundles["sd1"].unet.state_dict()
    for key, value in loaded.unet.state_dict().items():
        assert value.dtype == target
        assert torch.equal(value, ref[key].to(target)), key
    assert next(load_model(path).unet.parameters()).dtype == torch.float32  # default upcasts


@pytest.mark.parametrize("family", FAMILIES)
def test_tokenizer_ids_of_single_file_loads(family, tiny_files):
    bundle = load_model(tiny_files[family])
    assert len(bundle.tokenizers) == len(bundle.text_encoders)
    for tokenizer in bundle.tokenizers:
        assert tokenizer("a photo of a cat").input_ids == CAT_IDS


def test_user_metadata_and_title(tiny_bundles, tmp_path):
    path = tiny_bundles["sd1"].save(tmp_path / "my-model.safetensors", metadata={"modelspec.author": "me"})
    meta = load_model(path).metadata
    assert meta["modelspec.title"] == "my-model"
    assert meta["modelspec.author"] == "me"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1"


def test_tiny_and_config_override(tiny_folders, tiny_files, tmp_path, assert_modules_equal):
    assert load_model("tiny:sdxl").family == "sdxl"
    # A file whose sdcore.config entry is missing loads when the layout comes from a diffusers folder.
    from safetensors.torch import load_file, save_file

    bare = tmp_path / "bare.safetensors"
    save_file(load_file(str(tiny_files["sd1"])), str(bare))
    loaded = load_model(bare, config=tiny_folders["sd1"])
    ref = load_model(tiny_files["sd1"])
    for name, module in ref.components().items():
        assert_modules_equal(module, loaded.components()[name])


@pytest.mark.parametrize("family", FAMILIES)
def test_loaded_model_computes_the_same(family, tiny_bundles, tiny_files):
    """Buffers (CLIP position_ids) and module configs survive too: same outputs, not just same weights."""
    original, loaded = tiny_bundles[family], load_model(tiny_files[family])
    ids = torch.tensor([CAT_IDS + [49407] * 3])
    for before, after in zip(original.text_encoders, loaded.text_encoders, strict=True):
        with torch.no_grad():
            assert torch.equal(before(ids)[0], after(ids)[0])
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    context = torch.randn(1, 7, original.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    extra = {}
    if family == "sdxl":
        extra = {"added_cond_kwargs": {"text_embeds": torch.zeros(1, 64), "time_ids": torch.zeros(1, 6)}}
    with torch.no_grad():
        a = original.unet(latents, 10, context, **extra).sample
        b = loaded.unet(latents, 10, context, **extra).sample
        # Weights are bit-identical (tests above); memory-mapped tensors are not 64-byte aligned, so CPU
        # kernels may take another vector path and round differently in the last bits.
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        torch.testing.assert_close(
            original.vae.decode(latents).sample, loaded.vae.decode(latents).sample, rtol=0, atol=1e-5
        )


def test_hub_id_from_local_cache(tiny_folders, tmp_path, monkeypatch, assert_modules_equal):
    """A Hub id resolves through the local Hugging Face cache layout, never the network."""
    import shutil

    import huggingface_hub.constants as hf_constants

    cache = tmp_path / "hub"
    repo = cache / "models--someone--tiny-sd1"
    revision = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_folders["sd1"], repo / "snapshots" / revision)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    bundle = load_model("someone/tiny-sd1")
    assert bundle.source_format == "hub" and bundle.family == "sd1"
    reference = load_model(tiny_folders["sd1"])
    assert_modules_equal(reference.unet, bundle.unet)


def test_old_sd1_text_encoder_layout_without_text_model_level(tiny_files, tmp_path, assert_modules_equal):
    """Old SD1 files store cond_stage_model.transformer.embeddings... (no text_model.)."""
    from safetensors.torch import load_file, save_file
    from sdcore.models.source import CheckpointSource

    old = "cond_stage_model.transformer.text_model."
    state = {
        (("cond_stage_model.transformer." + k[len(old) :]) if k.startswith(old) else k): v
        for k, v in load_file(str(tiny_files["sd1"])).items()
    }
    assert not any(k.startswith(old) for k in state)
    path = tmp_path / "old.safetensors"
    with safe_open(str(tiny_files["sd1"]), "pt") as handle:
        save_file(state, str(path), metadata=handle.metadata())
    assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in CheckpointSource(path).keys
    assert_modules_equal(load_model(tiny_files["sd1"]).text_encoders[0], load_model(path).text_encoders[0])


def test_user_tokenizer_folder_wins(tiny_files, tmp_path):
    from sdcore.models.tokenizer import write_tokenizer_files

    folder = write_tokenizer_files(tmp_path / "tok", pad_token="!")
    default = load_model(tiny_files["sd1"])
    chosen = load_model(tiny_files["sd1"], tokenizer=folder)
    assert default.tokenizers[0].pad_token == "<|endoftext|>"
    assert chosen.tokenizers[0].pad_token == "!"
    assert load_model(tiny_files["sd2"]).tokenizers[0].pad_token == "!"  # OpenCLIP pads with "!"


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_a_writer_whose_diffusers_folder_is_beaten_into_place_still_succeeds(tiny_bundles, tmp_path, monkeypatch):
    """Two processes of a run save one diffusers folder: the other writer's finished folder lands at the
    target between this writer's check and its rename (the rename then finds a non-empty folder). This
    writer replaces it with its own whole folder instead of reporting that it could not write."""
    import os
    from pathlib import Path

    from sdcore.models import save as save_module

    bundle, target = tiny_bundles["sd1"], tmp_path / "out" / "model"
    rival = save_module.write_diffusers(bundle, tmp_path / "rival", metadata={"writer": "rival"})

    class OsWithARival:
        landed = False

        def __getattr__(self, name):
            return getattr(os, name)

        def replace(self, src, dst):
            if Path(dst) == target and not self.landed:
                self.landed = True
                os.replace(rival, target)  # the other writer wins the first rename
            return os.replace(src, dst)

    monkeypatch.setattr(save_module, "os", OsWithARival())
    assert save_module.write_diffusers(bundle, target, metadata={"writer": "this"}) == target
    assert json.loads((target / "sdcore_metadata.json").read_text())["writer"] == "this"
    assert load_model(target).family == "sd1"
    assert _leftovers(target.parent) == []


def test_two_threads_saving_one_diffusers_folder_at_once_both_succeed(tiny_bundles, tmp_path, monkeypatch):
    """Real concurrent writers (threads released together at the move into place): no error, and the
    target is always one writer's whole folder, with no temporary folder left beside it."""
    import threading

    from sdcore.models import save as save_module

    bundle, target = tiny_bundles["sd1"], tmp_path / "model"
    barrier = threading.Barrier(2)
    real = save_module.move_folder_into_place

    def together(folder, where):
        barrier.wait()
        real(folder, where)

    monkeypatch.setattr(save_module, "move_folder_into_place", together)
    for _ in range(4):
        errors: list[BaseException] = []

        def write(name, errors):
            try:
                save_module.write_diffusers(bundle, target, metadata={"writer": name})
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=write, args=(name, errors)) for name in ("a", "b")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        assert json.loads((target / "sdcore_metadata.json").read_text())["writer"] in ("a", "b")
        assert (target / "unet" / "diffusion_pytorch_model.safetensors").is_file()
        assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("fmt", ["single-file", "diffusers"])
def test_a_saved_noise_schedule_keeps_its_spacing_named_or_not_and_its_training_numbers(tmp_path, fmt):
    """What a save writes of the noise scheduler and a load makes of it. The training schedule (betas, alphas,
    prediction type, zero-terminal SNR) comes back exactly. A ``timestep_spacing`` the source config names
    (``trailing`` for a zero-terminal-SNR v-prediction model, SDXL's ``leading``) is written and read back as
    named; one it does not name (SD1.5's, an original checkpoint's) is not written, so every sampler still gets
    its own class's default (diffusers: Euler ``linspace``, DDIM ``leading``), in sdcore and in diffusers reading
    the folder. A file saved before that (``sdcore.config`` holding DDPM's ``leading`` and listing it in
    ``_use_default_values``) loads the same way, and so does a prediction-type override."""
    import json

    import torch
    from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler
    from safetensors import safe_open
    from sdcore.generate.pipeline import make_scheduler
    from sdcore.models.load import _noise_scheduler, load_model, override_prediction_type
    from sdcore.models.tiny import create_tiny_bundle, noise_scheduler_config

    cases = [
        ("sd1", "epsilon", {}, None),
        ("sdxl", "epsilon", {"timestep_spacing": "leading"}, "leading"),
        ("sd2", "v_prediction", {"timestep_spacing": "trailing", "rescale_betas_zero_snr": True}, "trailing"),
    ]
    for family, prediction, named, spacing in cases:
        bundle = create_tiny_bundle(family, prediction_type=prediction)
        bundle.noise_scheduler = _noise_scheduler({"steps_offset": 1, **named}, prediction)
        reference = DDPMScheduler(**{**noise_scheduler_config(prediction), **named})
        path = tmp_path / f"{family}{'.safetensors' if fmt == 'single-file' else ''}"
        again = load_model(str(bundle.save(path, format=fmt)))
        scheduler = again.noise_scheduler
        assert torch.equal(scheduler.alphas_cumprod, reference.alphas_cumprod), family
        assert torch.equal(scheduler.betas, reference.betas), family
        assert (scheduler.config.prediction_type, again.prediction_type) == (prediction, prediction)
        assert scheduler.config.rescale_betas_zero_snr == bool(named.get("rescale_betas_zero_snr"))
        expected = {"euler": spacing or "linspace", "ddim": spacing or "leading"}
        assert {s: make_scheduler(again, s).config.timestep_spacing for s in expected} == expected, family
        if fmt == "diffusers":
            written = json.loads((path / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
            assert written.get("timestep_spacing") == spacing, family
            from_diffusers = DDPMScheduler.from_pretrained(path / "scheduler")
            assert EulerDiscreteScheduler.from_config(from_diffusers.config).config.timestep_spacing == (
                spacing or "linspace"
            )
            assert DDIMScheduler.from_config(from_diffusers.config).config.timestep_spacing == (spacing or "leading")
        else:
            with safe_open(str(path), "pt") as handle:
                stored = json.loads(handle.metadata()["sdcore.config"])["scheduler"]
            assert ("timestep_spacing" in stored.get("_use_default_values", [])) == (spacing is None), family
    # an SD1 file saved before: DDPM's default written out, and listed as a default
    old = create_tiny_bundle("sd1")
    old_config = json.loads(json.dumps(dict(old.noise_scheduler.config)))
    assert old_config["timestep_spacing"] == "leading" and "timestep_spacing" in old_config["_use_default_values"]
    assert make_scheduler(create_tiny_bundle("sd1"), "euler").config.timestep_spacing == "linspace"
    rebuilt = _noise_scheduler(old_config, "epsilon")
    assert EulerDiscreteScheduler.from_config(rebuilt.config).config.timestep_spacing == "linspace"
    # kohya's --v_parameterization on a loaded model: the spacing stays unnamed, the trailing one named
    assert make_scheduler(override_prediction_type(old, "v_prediction"), "euler").config.timestep_spacing == "linspace"
    named = create_tiny_bundle("sd2")
    named.noise_scheduler = _noise_scheduler({"timestep_spacing": "trailing"}, "epsilon")
    assert (
        make_scheduler(override_prediction_type(named, "v_prediction"), "euler").config.timestep_spacing == "trailing"
    )
