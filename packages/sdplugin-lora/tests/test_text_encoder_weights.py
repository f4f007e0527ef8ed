"""--text-encoder-weights-dtype: frozen text encoders' Linear weights stored as --base-weights-dtype stores the
denoiser's (sdcore.train.base_weights.convert_text_encoder), the memory plan's count of them, and the peer tools'
options that ask for it (kohya fp8_base, OneTrainer text_encoder*.weight_dtype, SimpleTuner
text_encoder_N_precision, ai-toolkit quantize_te)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from click.testing import CliRunner
from sdcore.models.tiny import create_tiny_bundle
from sdcore.train.base_weights import QuantizedLinear, convert_text_encoder
from torch import nn

#: largest relative error (Frobenius norm of the difference over the reference's) of a converted tiny encoder's
#: output: fp8 keeps 3 mantissa bits, int8 ~7 bits per row, nf4 16 codes per block of 64
TOLERANCE = {"fp8": 0.1, "int8": 0.03, "nf4": 0.5}


@pytest.fixture(scope="module")
def flux_bundle():
    bundle = create_tiny_bundle("flux")
    for encoder in bundle.text_encoders:
        encoder.requires_grad_(False)
    return bundle


def _ids(encoder, seed=0):
    vocab = encoder.config.vocab_size
    return torch.randint(0, vocab, (2, 11), generator=torch.Generator().manual_seed(seed))


def _dequantised_float_copy(original: nn.Module, converted: nn.Module, dtype: torch.dtype) -> nn.Module:
    """The float encoder whose Linear weights are the converted one's dequantised weights."""
    plain = copy.deepcopy(original)
    layers = dict(converted.named_modules())
    for name, module in plain.named_modules():
        if isinstance(layers.get(name), QuantizedLinear):
            module.weight.data = layers[name].dequantised_weight(dtype)
    return plain


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("storage", ["fp8", "nf4", "int8"])
@pytest.mark.parametrize("index", [0, 1], ids=["clip-l", "t5"])
def test_a_converted_encoder_is_the_float_encoder_on_its_dequantised_weights(flux_bundle, storage, index, dtype):
    original = flux_bundle.text_encoders[index].to(dtype)
    converted = copy.deepcopy(original)
    elements = convert_text_encoder(converted, storage, dtype)
    linears = [m for m in original.modules() if type(m) is nn.Linear]
    assert elements == sum(m.weight.numel() for m in linears) > 0
    assert all(isinstance(m, QuantizedLinear) for m in converted.modules() if isinstance(m, nn.Linear))
    # embeddings, norms and biases keep their dtype and values
    kept = {n: p for n, p in converted.named_parameters() if not n.endswith("weight") or "norm" in n or "embed" in n}
    reference = dict(original.named_parameters())
    assert kept and all(p.dtype == dtype and torch.equal(p, reference[n]) for n, p in kept.items())
    ids = _ids(original)
    with torch.no_grad():
        out = converted(ids).last_hidden_state
        exact = _dequantised_float_copy(original, converted, dtype)(ids).last_hidden_state
        plain = original(ids).last_hidden_state
    assert out.dtype == dtype and torch.equal(out, exact)  # bit for bit (T5's fp8 wo: no cast of its input)
    error = float((out.float() - plain.float()).norm() / plain.float().norm())
    assert 0 < error < TOLERANCE[storage] * (2 if dtype == torch.bfloat16 else 1), error
    original.float()


def test_trainable_weights_are_never_converted_and_the_runtime_says_so(flux_bundle):
    from sdcore.errors import ConfigError
    from sdcore.train.memory_options import MemorySetup
    from sdcore.train.options import TrainOptions

    bundle = copy.deepcopy(flux_bundle)
    bundle.text_encoders[1].requires_grad_(True)  # a full fine-tune of T5
    options = TrainOptions(model="m", data="d", output="o", text_encoder_weights_dtype="nf4")
    with pytest.raises(ConfigError, match=r"^--text-encoder-weights-dtype: the t5-xxl text encoder has no frozen"):
        MemorySetup().convert_text_encoders(bundle, options)
    bundle = copy.deepcopy(flux_bundle)
    bundle.text_encoders[1].requires_grad_(True)
    setup = MemorySetup()
    setup.convert_text_encoders(
        bundle, TrainOptions(model="m", data="d", output="o", text_encoder_weights_dtype="int8,none")
    )
    clip = [m for m in bundle.text_encoders[0].modules() if isinstance(m, nn.Linear)]
    assert clip and all(isinstance(m, QuantizedLinear) for m in clip)
    assert setup.text_encoder_elements == {"text_encoder": sum(m.stored_shape.numel() for m in clip)}
    assert not any(isinstance(m, QuantizedLinear) for m in bundle.text_encoders[1].modules())


# --- the memory plan and the pre-flight -------------------------------------------------------------------


def _plan(bundle, *, whole=False, trained=()):
    from sdcore.train.memory import count_parameters

    params = [nn.Parameter(torch.zeros(4, 16))]  # an adapter's parameters, outside the model
    for module in trained:  # a full fine-tune of that encoder
        params += list(module.requires_grad_(True).parameters())
    return count_parameters(bundle, [{"params": params}], whole_model_result=whole)


def _options(**kw):
    from sdcore.train.options import TrainOptions

    return TrainOptions(**{"model": "m", "data": "d", "output": "o", "resolution": 64, "mixed_precision": "bf16", **kw})


def test_the_plan_counts_the_text_encoders_stored_bytes(flux_bundle):
    from sdcore.models.layout import layout_of_bundle
    from sdcore.train.memory import estimate_memory

    bundle = flux_bundle
    bundle.transformer.requires_grad_(False)
    layout, plan = layout_of_bundle(bundle), _plan(bundle)
    t5 = [m for m in bundle.text_encoders[1].modules() if type(m) is nn.Linear]
    clip = [m for m in bundle.text_encoders[0].modules() if type(m) is nn.Linear]
    e5, r5 = sum(m.weight.numel() for m in t5), sum(m.out_features for m in t5)
    ec, rc = sum(m.weight.numel() for m in clip), sum(m.out_features for m in clip)
    assert plan.text_encoders == {"text_encoder": (ec, rc, 0), "text_encoder_2": (e5, r5, 0)}

    def weights(value, device="cpu", **kw):
        return estimate_memory(layout, plan, _options(text_encoder_weights_dtype=value, **kw), device=device).weights

    plain = weights("none")
    # bf16 frozen weights: 2 bytes each; the stored formats' formulas rewritten here
    assert plain - weights("none,fp8") == e5 * (2 - 1)
    assert plain - weights("none,nf4") == int(e5 * (2 - (0.5 + 4 / 64)))
    assert plain - weights("int8") == (ec + e5) * (2 - 1) - 4 * (rc + r5)
    # on a GPU the cached encoders leave the device: the option changes nothing there, and counts without the cache
    cached = {"cache_text_encoder_outputs": True}
    assert weights("fp8", "cuda", **cached) == weights("none", "cuda", **cached)
    uncached = {"cache_text_encoder_outputs": False}
    assert weights("none", "cuda", **uncached) - weights("fp8", "cuda", **uncached) == ec + e5


def test_preflight_refusals_one_line_each(flux_bundle):
    from sdcore.models.layout import layout_of_bundle
    from sdcore.train.memory_options import model_problems, option_problems

    bundle = flux_bundle
    layout = layout_of_bundle(bundle)
    assert option_problems(_options(text_encoder_weights_dtype="none,nf4"), "cpu") == []
    assert option_problems(_options(text_encoder_weights_dtype="fp4"), "cpu") == [
        "--text-encoder-weights-dtype fp4: choose one of none, fp8, nf4, int8, for every text encoder or one per "
        "encoder (comma-separated, in the family's order)"
    ]
    assert model_problems(_options(text_encoder_weights_dtype="none,fp8"), layout, _plan(bundle)) == []
    assert model_problems(_options(text_encoder_weights_dtype="fp8,fp8,fp8"), layout, _plan(bundle)) == [
        "--text-encoder-weights-dtype fp8,fp8,fp8: 3 values for the FLUX.1's 2 text encoder(s) (clip-l, t5-xxl); "
        "give one value for all or one per encoder"
    ]
    trained = _plan(bundle, trained=[bundle.text_encoders[0]])
    (line,) = model_problems(_options(text_encoder_weights_dtype="fp8"), layout, trained)
    assert line.startswith("--text-encoder-weights-dtype: this method trains the clip-l text encoder's own weights")
    assert model_problems(_options(text_encoder_weights_dtype="none,fp8"), layout, trained) == []
    (line,) = model_problems(_options(text_encoder_weights_dtype="none,int8"), layout, _plan(bundle, whole=True))
    assert line.startswith("--text-encoder-weights-dtype: this method saves the whole model, text encoders included")
    for encoder in bundle.text_encoders:
        encoder.requires_grad_(False)


# --- the runtime: the cache filled by the converted T5, a CLI LoRA run ------------------------------------


def _cli():
    from sdcore.cli import build_cli
    from sdcore.plugins import get_plugin_manager

    return build_cli(get_plugin_manager())


def test_a_flux_lora_caches_t5_outputs_from_the_converted_t5(tmp_path, monkeypatch):
    from sdcore.testing.contract import make_tiny_dataset
    from sdcore.train.cache import TextCache

    seen = {}
    fill = TextCache.fill

    def spy(self, **kw):
        t5 = self.bundle.text_encoders[1]
        seen["t5"] = {m.storage.name for m in t5.modules() if isinstance(m, QuantizedLinear)}
        seen["clip"] = [m for m in self.bundle.text_encoders[0].modules() if isinstance(m, QuantizedLinear)]
        fill(self, **kw)
        seen["cache"], seen["method"] = dict(self.encodings), self.method

    monkeypatch.setattr(TextCache, "fill", spy)
    data = make_tiny_dataset(tmp_path / "data", n=2, size=64)
    out = tmp_path / "lora.safetensors"
    args = ["train", "lora", "--model", "tiny:flux", "--data", str(data), "--output", str(out), "--rank", "4",
            "--max-steps", "2", "--resolution", "64", "--cache-text-encoder-outputs", "--unet-only",
            "--no-save-state", "--text-encoder-weights-dtype", "none,nf4"]  # fmt: skip
    result = CliRunner().invoke(_cli(), args)
    assert result.exit_code == 0, result.output
    assert out.exists() and "estimated peak memory" in result.output
    assert seen["t5"] == {"nf4"} and seen["clip"] == []  # converted before the cache filled
    # the cached encodings are the nf4 T5's, not the float T5's (a fresh tiny model: the same weights)
    fresh = create_tiny_bundle("flux")
    prompt = sorted(seen["cache"])[0]
    with torch.no_grad():
        float_cond = seen["method"].encode(fresh, [prompt]).to("cpu", torch.float32)
        for encoder in fresh.text_encoders:
            encoder.requires_grad_(False)
        convert_text_encoder(fresh.text_encoders[1], "nf4", torch.float32)
        nf4_cond = seen["method"].encode(fresh, [prompt]).to("cpu", torch.float32)
    cached = seen["cache"][prompt]
    assert torch.equal(cached.hidden_states, nf4_cond.hidden_states.reshape(cached.hidden_states.shape))
    assert not torch.equal(cached.hidden_states, float_cond.hidden_states.reshape(cached.hidden_states.shape))


# --- the peer tools' options -------------------------------------------------------------------------------


def _load(tmp_path, name, text, **overrides):
    from sdcore.train.config import load_options
    from sdplugin_lora.method import LoraOptions

    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    notes: list[str] = []
    return load_options(LoraOptions, path, notes=notes, overrides=overrides or None), notes


@pytest.mark.parametrize(
    ("keys", "expected", "said"),
    [
        ("fp8_base = true\n", "fp8", "as kohya does"),
        ("fp8_base = true\nfp8_base_unet = true\n", "none", None),
        ("fp8_base = true\ncache_text_encoder_outputs = true\nnetwork_train_unet_only = true\n", "none",
         "kohya caches the text encoders' outputs in the compute dtype"),
        ("fp8_base = true\ncache_text_encoder_outputs = true\n", "fp8,none", "as kohya does"),  # CLIP-L trains
    ],
)  # fmt: skip
def test_kohya_fp8_base_stores_the_text_encoders_that_run_in_fp8(tmp_path, keys, expected, said):
    text = f'pretrained_model_name_or_path = "tiny:flux"\ntrain_data_dir = "d"\noutput_dir = "o"\n{keys}'
    o, notes = _load(tmp_path, "kohya.toml", text)
    assert o.fp8_base is True and o.text_encoder_weights_dtype == expected
    assert said is None or any(said in n for n in notes), notes


@pytest.mark.parametrize(
    ("family", "keys", "expected"),
    [
        # flux_train_network.py L71-72: Chroma has no CLIP-L and T5 trains only with train_t5xxl, so with the cache
        # T5's outputs are cached and T5 goes back to the CPU (L281), where train_network.py L856 never casts it
        ("chroma", "cache_text_encoder_outputs = true\n", "none"),
        # SD 1.x/2.x: train_network.py L224-226 only moves the encoders to the device (no cache), and L856-857 casts
        # them there to te_weight_dtype (fp8, L839)
        ("sd1", "cache_text_encoder_outputs = true\nnetwork_train_unet_only = true\n", "fp8"),
        # network_train_text_encoder_only: CLIP-L trains (flux_train_network.py L71), T5's outputs are cached
        ("flux", "cache_text_encoder_outputs = true\nnetwork_train_text_encoder_only = true\n", "fp8,none"),
    ],
)  # fmt: skip
def test_kohya_fp8_base_text_encoders_per_family(tmp_path, family, keys, expected):
    text = f'pretrained_model_name_or_path = "tiny:{family}"\ntrain_data_dir = "d"\noutput_dir = "o"\nfp8_base = true\n'
    o, _ = _load(tmp_path, "kohya.toml", text + keys)
    assert o.fp8_base is True and o.text_encoder_weights_dtype == expected


def test_kohya_fp8_base_leaves_the_text_encoders_of_other_scripts(tmp_path):
    """Only kohya's network scripts read te_weight_dtype (train_network.py L839); train_textual_inversion.py,
    sdxl_train.py and flux_train.py never read fp8_base, so their text encoders keep the compute dtype."""
    from sdcore.train.config import load_options
    from sdplugin_ti.method import TIOptions

    path = tmp_path / "kohya.toml"
    path.write_text(
        'pretrained_model_name_or_path = "tiny:sdxl"\ntrain_data_dir = "d"\noutput_dir = "o"\nfp8_base = true\n'
    )
    o = load_options(TIOptions, path, notes=[])
    assert o.text_encoder_weights_dtype == "none"


def test_onetrainer_text_encoder_weight_dtypes_map_per_encoder(tmp_path):
    config = {
        "training_method": "LORA", "model_type": "FLUX_DEV_1", "base_model_name": "tiny:flux", "epochs": 1,
        "output_model_destination": "out.safetensors", "output_model_format": "DIFFUSERS_LORA",
        "transformer": {"train": True, "weight_dtype": "FLOAT_8"}, "text_encoder": {"train": False},
        "text_encoder_2": {"train": False, "weight_dtype": "NFLOAT_4"},
    }  # fmt: skip
    o, notes = _load(tmp_path, "ot.json", json.dumps(config))
    assert (o.fp8_base, o.text_encoder_weights_dtype) == (True, "none,nf4")
    assert any("text_encoder_2.weight_dtype NFLOAT_4" in n and "nf4" in n for n in notes)
    # OneTrainer keeps T5's wo in the train dtype (HFModelLoaderMixin.py keep_in_fp32_modules): said, not hidden
    assert any("text_encoder_2.weight_dtype" in n and "wo layers" in n for n in notes)
    config["text_encoder"]["weight_dtype"] = config["text_encoder_2"]["weight_dtype"] = "FLOAT_8"
    o, _ = _load(tmp_path, "ot.json", json.dumps(config))
    assert o.text_encoder_weights_dtype == "fp8"
    config["text_encoder_2"]["weight_dtype"] = "INT_8"
    o, _ = _load(tmp_path, "ot.json", json.dumps(config))
    assert o.text_encoder_weights_dtype == "fp8,int8"


def _simpletuner(tmp_path, **keys):
    backend = tmp_path / "backend.json"
    backend.write_text(json.dumps([{"id": "d", "type": "local", "instance_data_dir": str(tmp_path)}]))
    config = {"model_family": "flux", "model_type": "lora", "pretrained_model_name_or_path": "tiny:flux",
              "data_backend_config": str(backend), "max_train_steps": 2, "output_dir": str(tmp_path / "out"), **keys}  # fmt: skip
    return _load(tmp_path, "config.json", json.dumps(config))


def test_simpletuner_text_encoder_precisions_map(tmp_path):
    from sdcore.errors import ConfigError

    o, notes = _simpletuner(tmp_path, text_encoder_2_precision="int8-quanto")
    assert o.text_encoder_weights_dtype == "none,int8"
    assert any("text_encoder_2_precision int8-quanto: stored as sdcore's int8" in n for n in notes)
    o, _ = _simpletuner(tmp_path, text_encoder_1_precision="fp8-torchao", text_encoder_2_precision="fp8-quanto")
    assert o.text_encoder_weights_dtype == "fp8"
    o, notes = _simpletuner(tmp_path, text_encoder_2_precision="nf4-bnb", text_encoder_3_precision="int8-quanto")
    assert o.text_encoder_weights_dtype == "none,nf4"
    assert any("text_encoder_3_precision: the model has no text encoder 3" in n for n in notes)
    with pytest.raises(ConfigError, match="text_encoder_2_precision 'int2-quanto'"):
        _simpletuner(tmp_path, text_encoder_2_precision="int2-quanto")


def _aitoolkit(tmp_path, arch_flag, **model):
    import yaml

    process = {"type": "sd_trainer", "datasets": [{"folder_path": "imgs"}],
               "network": {"type": "lora", "linear": 16, "linear_alpha": 16},
               "model": {"name_or_path": f"tiny:{arch_flag}", f"is_{arch_flag}": True, **model}}  # fmt: skip
    return _load(
        tmp_path, "job.yaml", yaml.safe_dump({"job": "extension", "config": {"name": "run", "process": [process]}})
    )


def test_aitoolkit_quantises_t5_alone_with_qtype(tmp_path):
    # quantize_te follows quantize: T5 with qtype, CLIP-L kept
    o, notes = _aitoolkit(tmp_path, "flux", quantize=True, qtype="qint8")
    assert (o.base_weights_dtype, o.text_encoder_weights_dtype) == ("int8", "none,int8")
    assert any("model.quantize_te: T5-XXL's frozen Linear weights are stored as int8" in n for n in notes)
    o, _ = _aitoolkit(tmp_path, "flux", quantize=True, quantize_te=False)
    assert o.text_encoder_weights_dtype == "none"
    o, notes = _aitoolkit(tmp_path, "flux", quantize_te=True, qtype_te="qint4")  # qtype_te is not read: qfloat8
    assert (o.fp8_base, o.text_encoder_weights_dtype) == (False, "none,fp8")
    assert any("model.qtype_te" in n and "no effect" in n for n in notes)
