"""The model-family declarations, the registry and the ``sdcore_model_families`` hook."""

from __future__ import annotations

import dataclasses

import pytest
import sdcore
from sdcore.errors import ConfigError, PluginError
from sdcore.models import family as fam
from sdcore.models.family import (
    SD1,
    SD2,
    SDXL,
    SDXL_REFINER,
    FamilyAdapter,
    LatentFormat,
    ModelFamily,
    TextEncoderSpec,
    families,
    family_adapter,
    get_family,
    register_family,
)
from sdcore.plugins import get_plugin_manager

TOY = ModelFamily(
    name="toy-dit",
    label="A toy transformer family",
    denoiser="transformer",
    text_encoders=(TextEncoderSpec("text_encoder", "t5-xxl", 128),),
    latent=LatentFormat(channels=16, scaling_factor=1.5, shift_factor=0.1),
    objective="flow-matching",
    native_resolution=512,
    adapter="sdcore.models.sd_unet:SD1_ADAPTER",
    lora_prefixes={"transformer": "lora_unet"},
)


class ToyFamilyPlugin:
    @sdcore.hookimpl
    def sdcore_model_families(self):
        return [TOY]


@pytest.fixture(autouse=True)
def _clean_registry():
    before = dict(fam._REGISTERED)
    yield
    fam._REGISTERED.clear()
    fam._REGISTERED.update(before)
    fam.reset_family_cache()


def test_builtin_constants_are_the_published_ones():
    # scaling factors: the VAE configs of SD1.5/SD2.1 (0.18215) and SDXL (0.13025)
    assert [f.latent.scaling_factor for f in (SD1, SD2, SDXL, SDXL_REFINER)] == [0.18215, 0.18215, 0.13025, 0.13025]
    assert {f.latent.channels for f in (SD1, SD2, SDXL, SDXL_REFINER)} == {4}
    assert {f.latent.shift_factor for f in (SD1, SD2, SDXL, SDXL_REFINER)} == {0.0}
    assert [f.native_resolution for f in (SD1, SD2, SDXL, SDXL_REFINER)] == [512, 768, 1024, 1024]
    assert [f.sample_size for f in (SD1, SD2, SDXL)] == [64, 96, 128]
    assert [te.kind for te in SDXL.text_encoders] == ["clip-l", "clip-g"]
    assert [te.component for te in SDXL_REFINER.text_encoders] == ["text_encoder_2"]
    assert SDXL_REFINER.text_encoders[0].tokenizer_component == "tokenizer_2"
    assert {te.max_length for f in (SD1, SD2, SDXL) for te in f.text_encoders} == {77}
    assert {f.objective for f in (SD1, SD2, SDXL, SDXL_REFINER)} == {"ddpm"}
    assert SD2.default_prediction_type == "v_prediction" and SD1.default_prediction_type == "epsilon"
    assert dict(SD1.lora_prefixes) == {"unet": "lora_unet", "text_encoder": "lora_te"}
    assert dict(SDXL.lora_prefixes) == {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
    assert SDXL.components == ("unet", "text_encoder", "text_encoder_2")


def test_latent_format_formula():
    latent = LatentFormat(channels=16, scaling_factor=1.5305, shift_factor=0.0609)
    assert latent.normalize(1.0) == pytest.approx((1.0 - 0.0609) * 1.5305)
    assert latent.denormalize(latent.normalize(0.37)) == pytest.approx(0.37)


def test_families_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        SD1.name = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        SD1.lora_prefixes["unet"] = "x"  # type: ignore[index]


def test_flow_families_default_to_flow_matching_as_their_bundles_do(sd_cli):
    # FLUX.1, Chroma and SD3 train the flow (kohya's flux_train_network.py / sd3_train_network.py have no epsilon
    # mode); a flow family declared without a prediction type (TOY, a plugin's) reads the same, never "epsilon"
    flows = [get_family(name) for name in ("sd3", "flux", "chroma")] + [TOY]
    assert {f.objective for f in flows} == {"flow-matching"}
    assert [f.default_prediction_type for f in flows] == ["flow-matching"] * 4
    assert dataclasses.replace(SD1, name="toy-flow", objective="flow-matching").default_prediction_type == (
        "flow-matching"
    )
    with pytest.raises(PluginError, match="default_prediction_type of a ddpm family must be"):
        dataclasses.replace(SD1, default_prediction_type="flow-matching")
    # what `sdcore model info` shows for a tiny FLUX.1 model is the family's default
    result = sd_cli(["model", "info", "tiny:flux", "--no-hash"])
    assert result.exit_code == 0, result.output
    assert f"prediction type: {get_family('flux').default_prediction_type}\n" in result.output


def test_get_family_unknown_lists_known():
    with pytest.raises(ConfigError, match=r"unknown model family .sd9.*sd1, sd2, sdxl, sdxl-refiner"):
        get_family("sd9", get_plugin_manager(entrypoints=False))


def test_declaration_errors_are_plugin_errors():
    with pytest.raises(PluginError, match="denoiser must be one of"):
        dataclasses.replace(TOY, denoiser="mlp")
    with pytest.raises(PluginError, match="objective must be one of"):
        dataclasses.replace(TOY, objective="score")
    with pytest.raises(PluginError, match="invalid model family name"):
        dataclasses.replace(TOY, name="Toy DiT")
    with pytest.raises(PluginError, match="not an import string"):
        dataclasses.replace(TOY, adapter="nocolon")
    with pytest.raises(PluginError, match="no text encoder"):
        dataclasses.replace(TOY, text_encoders=())


def test_register_family_conflicts_and_idempotence():
    register_family(TOY)
    register_family(dataclasses.replace(TOY))  # equal: no-op
    assert get_family("toy-dit") is TOY
    with pytest.raises(PluginError, match="already registered"):
        register_family(dataclasses.replace(TOY, native_resolution=256))
    with pytest.raises(PluginError, match="already registered"):
        register_family(dataclasses.replace(SD1, label="not SD1"))
    with pytest.raises(PluginError, match="expects a ModelFamily"):
        register_family("sd1")  # type: ignore[arg-type]


def test_plugin_family_is_found_through_the_hook():
    pm = get_plugin_manager(entrypoints=False, extra=[ToyFamilyPlugin()])
    assert "toy-dit" in [f.name for f in families(pm)]
    assert get_family("toy-dit", pm) is TOY
    registration = pm.registrations("model family")["toy-dit"]
    assert registration.plugin.startswith("extra-0")
    # the built-ins come through the same hook, registered by sdcore itself
    assert pm.registrations("model family")["sdxl"].plugin == "sdcore.builtin.model_families"
    # without the plugin the name is unknown
    with pytest.raises(ConfigError, match="toy-dit"):
        get_family("toy-dit", get_plugin_manager(entrypoints=False))


def test_plugin_redeclaring_a_builtin_name_is_an_error_naming_both():
    class Clash:
        @sdcore.hookimpl
        def sdcore_model_families(self):
            return [dataclasses.replace(SD1, label="my SD1")]

    pm = get_plugin_manager(entrypoints=False, extra=[Clash()])
    with pytest.raises(PluginError, match=r"'sd1' is registered twice: by sdcore\.builtin\.model_families"):
        families(pm)


def test_plugin_returning_something_else_is_an_error():
    class Bad:
        @sdcore.hookimpl
        def sdcore_model_families(self):
            return ["sd4"]

    with pytest.raises(PluginError, match="expected ModelFamily"):
        families(get_plugin_manager(entrypoints=False, extra=[Bad()]))


def test_family_adapter_resolves_and_checks():
    adapter = family_adapter("sdxl")
    assert isinstance(adapter, FamilyAdapter)
    assert family_adapter(SDXL) is adapter  # cached per family
    register_family(dataclasses.replace(TOY, name="toy-missing", adapter="sdcore.models.nowhere:Adapter"))
    with pytest.raises(PluginError, match="cannot load its adapter"):
        family_adapter("toy-missing")
    register_family(dataclasses.replace(TOY, name="toy-wrong", adapter="sdcore.models.family:SD1"))
    with pytest.raises(PluginError, match="lacks detect_single_file, load_single_file"):
        family_adapter("toy-wrong")


def test_unet_adapters_detect_their_own_single_files():
    from sdcore.models.convert.clip import SD1_PREFIX, SDXL_CLIP_L_PREFIX
    from sdcore.models.convert.openclip import REFINER_BIGG_PREFIX, SD2_PREFIX, SDXL_BIGG_PREFIX
    from sdcore.models.detect import UNET_IN

    files = {
        "sd1": {UNET_IN, SD1_PREFIX + "text_model.final_layer_norm.weight"},
        "sd2": {UNET_IN, SD2_PREFIX + "ln_final.weight"},
        "sdxl": {UNET_IN, SDXL_CLIP_L_PREFIX + "x", SDXL_BIGG_PREFIX + "ln_final.weight"},
        "sdxl-refiner": {UNET_IN, REFINER_BIGG_PREFIX + "ln_final.weight"},
    }
    for name, keys in files.items():
        claimed = [f.name for f in (SD1, SD2, SDXL, SDXL_REFINER) if family_adapter(f).detect_single_file(keys)]
        assert claimed == [name]
    assert not any(family_adapter(f).detect_single_file({"transformer.x"}) for f in (SD1, SD2, SDXL))


def test_bundle_family_spec_and_denoiser(tiny_bundles):
    bundle = tiny_bundles["sdxl"]
    assert bundle.family_spec is SDXL
    assert bundle.denoiser is bundle.unet
    assert list(bundle.components()) == ["unet", "vae", "text_encoder", "text_encoder_2"]


# --- the model I/O asks the families ------------------------------------------------------------


class _ToyAdapter:
    """A transformer family's adapter that records what the loaders ask of it."""

    def __init__(self, bundle):
        self.bundle = bundle
        self.calls = []

    def detect_single_file(self, keys):
        return "toy_dit.marker" in keys

    def load_single_file(self, path, **options):
        self.calls.append(("load_single_file", path, options))
        return self.bundle

    def create_tiny(self, **options):
        self.calls.append(("create_tiny", options))
        return self.bundle

    def detect_diffusers(self, index):
        return index.get("_class_name") == "ToyDitPipeline"

    def load_diffusers(self, folder, **options):
        self.calls.append(("load_diffusers", folder, options))
        return self.bundle

    def generate(self, bundle, prompts, negatives, **settings):
        from PIL import Image

        self.calls.append(("generate", prompts, negatives, settings))
        return [Image.new("RGB", (settings["width"], settings["height"])) for _ in prompts]

    def encode_prompts(self, bundle, prompts, **options):
        raise NotImplementedError

    def predict(self, bundle, noisy_latents, timesteps, conditioning, **options):
        raise NotImplementedError


@pytest.fixture
def toy_family(monkeypatch, tiny_bundles):
    import sys
    import types

    adapter = _ToyAdapter(tiny_bundles["sd1"])
    module = types.ModuleType("sdcore_toy_family_for_tests")
    module.ADAPTER = adapter
    monkeypatch.setitem(sys.modules, module.__name__, module)
    register_family(dataclasses.replace(TOY, adapter=f"{module.__name__}:ADAPTER"))
    return adapter


def test_single_files_tiny_models_and_folders_of_a_plugin_family(toy_family, tmp_path):
    import json

    import torch
    from safetensors.torch import save_file
    from sdcore.models.layout import LayoutUnavailableError, read_layout
    from sdcore.models.load import load_model

    path = tmp_path / "toy.safetensors"
    save_file({"toy_dit.marker": torch.zeros(1)}, str(path))
    assert load_model(path, dtype="bf16") is toy_family.bundle
    kind, where, options = toy_family.calls[-1]
    assert (kind, where, options["dtype"]) == ("load_single_file", path, "bf16")
    with pytest.raises(LayoutUnavailableError, match="toy-dit family cannot tell its layout"):
        read_layout(path)
    with pytest.raises(Exception, match="is a toy-dit checkpoint, not sd1"):
        load_model(path, family="sd1")

    assert load_model("tiny:toy-dit") is toy_family.bundle
    assert toy_family.calls[-1][0] == "create_tiny"

    folder = tmp_path / "toy-folder"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "ToyDitPipeline"}))
    assert load_model(folder) is toy_family.bundle
    assert toy_family.calls[-1][:2] == ("load_diffusers", folder)


def test_a_file_no_family_claims_names_the_known_ones(tmp_path):
    import torch
    from safetensors.torch import save_file
    from sdcore.errors import ModelFormatError
    from sdcore.models.load import load_model

    path = tmp_path / "toy.safetensors"
    save_file({"toy_dit.marker": torch.zeros(1)}, str(path))
    with pytest.raises(ModelFormatError, match="no other known family's keys: sd1, sd2, sdxl, sdxl-refiner"):
        load_model(path)


def test_generation_of_a_plugin_family_goes_through_its_adapter(toy_family):
    from sdcore.generate.pipeline import generate_images

    bundle = dataclasses.replace(toy_family.bundle, family="toy-dit")
    images = generate_images(bundle, ["a cat", "a dog"], negative_prompt="blurry", steps=3, seed=5, width=96)
    assert [im.size for im in images] == [(96, 64), (96, 64)]
    kind, prompts, negatives, settings = toy_family.calls[-1]
    assert (kind, prompts, negatives) == ("generate", ["a cat", "a dog"], ["blurry", "blurry"])
    assert (settings["seeds"], settings["steps"], settings["sampler"]) == ([5, 6], 3, "euler_a")


def test_the_documented_plugin_family_registers():
    import re
    import types
    from pathlib import Path

    doc = (Path(__file__).parents[4] / "docs" / "families.md").read_text(encoding="utf-8")
    block = next(b for b in re.findall(r"```python\n(.*?)```", doc, flags=re.S) if "def sdcore_model_families" in b)
    plugin = types.ModuleType("sdplugin_mydit_plugin_from_docs")
    exec(compile(block, "docs/families.md", "exec"), plugin.__dict__)
    pm = get_plugin_manager(entrypoints=False, extra=[plugin])
    family = get_family("mydit", pm)
    assert family.denoiser == "transformer" and family.objective == "flow-matching"
    assert pm.registrations("model family")["mydit"].plugin == "sdplugin_mydit_plugin_from_docs"


def test_sdcore_plugins_lists_a_plugins_model_families(sd_cli):
    result = sd_cli(["plugins"], pm=get_plugin_manager(entrypoints=False, extra=[ToyFamilyPlugin()]))
    assert result.exit_code == 0, result.output
    assert "    model families: toy-dit\n" in result.output and "familys" not in result.output


class _WriterOnlyAdapter:
    """A plugin family's adapter that saves diffusers folders (through the core's writer, ``diffusers_pipeline``)
    but reads none: no ``detect_diffusers``/``load_diffusers``."""

    diffusers_pipeline = "ToyWriterPipeline"

    def detect_single_file(self, keys):
        return False

    def load_single_file(self, path, **options):
        raise NotImplementedError

    create_tiny = encode_prompts = predict = load_single_file


def test_a_transformer_folder_no_family_reads_is_one_line_naming_the_family(monkeypatch, tmp_path):
    import json
    import sys
    import types

    from sdcore.errors import ModelFormatError
    from sdcore.models.layout import read_layout
    from sdcore.models.load import load_model

    module = types.ModuleType("sdcore_writer_only_family_for_tests")
    module.ADAPTER = _WriterOnlyAdapter()
    monkeypatch.setitem(sys.modules, module.__name__, module)
    register_family(dataclasses.replace(TOY, name="toy-writer", adapter=f"{module.__name__}:ADAPTER"))
    index = {"_class_name": "ToyWriterPipeline", "transformer": ["diffusers", "ToyTransformer2DModel"]}
    written = tmp_path / "written"
    written.mkdir()
    (written / "model_index.json").write_text(json.dumps(index))
    want = (
        r"written: a diffusers folder of ToyWriterPipeline without a UNet; the toy-writer family writes them but its "
        r"adapter has no detect_diffusers/load_diffusers$"
    )
    with pytest.raises(ModelFormatError, match=want):
        load_model(written)
    with pytest.raises(ModelFormatError, match=want):
        read_layout(written)  # the pre-flight says the same before loading
    other = tmp_path / "other"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({**index, "_class_name": "SomeoneElsesPipeline"}))
    with pytest.raises(ModelFormatError, match=r"without a UNet; no installed model family reads them$"):
        load_model(other)


def test_meta_modules_take_a_plugin_familys_text_encoder_class_and_refuse_other_names():
    from sdcore.errors import ModelFormatError
    from sdcore.models.load import build_empty_modules, text_encoder_class
    from transformers import UMT5EncoderModel

    configs = {
        "transformer": {"_class_name": "AuraFlowTransformer2DModel", "num_mmdit_layers": 1,
                        "num_single_dit_layers": 1, "attention_head_dim": 8, "num_attention_heads": 2,
                        "joint_attention_dim": 16, "caption_projection_dim": 16, "pos_embed_max_size": 64},
        "vae": {"block_out_channels": [8], "norm_num_groups": 8, "latent_channels": 4},
        "text_encoders": [{"_class_name": "UMT5EncoderModel", "vocab_size": 64, "d_model": 16, "d_kv": 8,
                           "d_ff": 32, "num_layers": 1, "num_heads": 2}],
    }  # fmt: skip
    _denoiser, _vae, (encoder,) = build_empty_modules(configs)
    assert isinstance(encoder, UMT5EncoderModel) and encoder.shared.weight.shape == (64, 16)
    assert encoder.shared.weight.is_meta  # a plan, not weights
    # a header names any class; only transformers' encoder model classes are built
    for name in ("AutoTokenizer", "UMT5Config", "PreTrainedModel", "os", "GPT2LMHeadModel", "NoSuchEncoderModel"):
        assert text_encoder_class(name) is None, name
    with pytest.raises(ModelFormatError, match="unsupported text encoder class 'AutoTokenizer'"):
        build_empty_modules({**configs, "text_encoders": [{"_class_name": "AutoTokenizer"}]})
