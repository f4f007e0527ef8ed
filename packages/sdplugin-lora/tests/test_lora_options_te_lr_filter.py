"""Per-text-encoder learning rates (``--te1-lr/--te2-lr/--te3-lr``; kohya's ``text_encoder_lr`` list; OneTrainer's
per-encoder ``learning_rate``) and OneTrainer's custom layer filter (``--layer-filter``, ``--layer-filter-regex``).

The expectations are written here from the references' rules:
- sd-scripts ``train_network.py`` (``text_encoder_lr`` nargs="*"; only networks with
  ``prepare_optimizer_params_with_multiple_te_lrs`` get the list, others its first value) and ``networks/lora_sd3.py``
  / ``lora_flux.py`` (the list padded per encoder: SD3 ``[a, b] -> [a, b, b]``, Flux ``[CLIP-L, T5]``; a rate of 0
  skips the group; LoRA+ multiplies the ``lora_up`` group), ``ss_text_encoder_lr`` = that ``text_encoder_lr``;
- OneTrainer ``modules/util/ModuleFilter.py`` (patterns split at ",", stripped, substring or ``re.search`` on the
  module name inside the denoiser, an empty pattern matches all, an unused pattern is an error) and
  ``modules/module/LoRAModule.py`` (the filter is given to the denoiser's wrapper only).
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from lora_testutil import fresh_bundle
from sdcore.errors import ConfigError
from sdcore.train.method import SaveInfo
from sdplugin_lora.method import LoraMethod, LoraOptions
from test_dit import _DitBundle, _tiny_encoders, fresh

# --- helpers written from the references ------------------------------------------------------------------------


def _bundle(family: str):
    if family in ("sd1", "sdxl"):
        return fresh_bundle(family)
    clip_l, clip_g, t5 = _tiny_encoders()
    encoders = {
        "sd3": [("text_encoder", clip_l), ("text_encoder_2", clip_g), ("text_encoder_3", t5)],
        "flux": [("text_encoder", clip_l), ("text_encoder_2", t5)],
    }[family]
    return _DitBundle(family, fresh(family), encoders)


#: kohya's LoRA prefix of each text encoder -> its number in text_encoder_lr's order per family
_KOHYA_TE = {"lora_te1": 1, "lora_te2": 2, "lora_te3": 3}


def _kohya_multi_te_groups(network, text_encoder_lr, default_lr, unet_lr, ratio=None):
    """lora_sd3/lora_flux prepare_optimizer_params_with_multiple_te_lrs, rewritten: text-encoder modules split by
    their prefix (te1 CLIP-L, te2 CLIP-G, te3 T5) each at its rate; lora_up at rate x ratio; rate 0 skipped."""
    groups = set()
    parts: dict[object, list] = {}
    for module in network:
        prefix = module.lora_name.split("_text_model")[0].split("_encoder_")[0]
        key = _KOHYA_TE.get(prefix[: len("lora_teN")], "unet") if module.lora_name.startswith("lora_te") else "unet"
        parts.setdefault(key, []).append(module)
    for key, modules in parts.items():
        lr = unet_lr if key == "unet" else text_encoder_lr[key]
        plain, plus = set(), set()
        for module in modules:
            for name, param in module.named_parameters():
                (plus if ratio is not None and "lora_up" in name else plain).add(id(param))
        for ids, rate in ((plain, lr), (plus, lr * (ratio or 1.0))):
            if ids and rate:
                groups.add((frozenset(ids), rate))
    return groups


def _got(groups):
    return {(frozenset(id(p) for p in g["params"]), g["lr"]) for g in groups}


# --- param groups -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("family", "rates"),
    [
        ("sdxl", {1: 1e-4, 2: 2e-4}),
        ("sd3", {1: 1e-4, 2: 2e-4, 3: 3e-4}),
        ("flux", {1: 1e-4, 3: 0.0}),  # a 0 rate: kohya skips the group (the encoder's modules do not learn)
    ],
)
def test_each_encoder_trains_at_its_own_rate_as_kohyas_multi_te_networks(family, rates):
    options = {f"te{slot}_lr": rate for slot, rate in rates.items()}
    method = LoraMethod(
        LoraOptions(rank=2, lr=1e-3, train_text_encoder=True, train_t5=3 in rates, loraplus_lr_ratio=4.0, **options)
    )
    method.validate()
    assert method.family_problems(family) == []
    groups = method.prepare(_bundle(family))
    expected = _kohya_multi_te_groups(method.network, rates, 1e-3, 1e-3, ratio=4.0)
    assert _got(groups) == expected
    # every trained encoder has modules, and each group holds one encoder's parameters only
    names = {g["name"] for g in groups}
    assert {f"text_encoder{slot}" for slot, rate in rates.items() if rate} <= names
    owner = {
        id(p): m.lora_name[: len("lora_teN")] if m.lora_name.startswith("lora_te") else "denoiser"
        for m in method.network
        for p in m.parameters()
    }
    for group in groups:
        assert len({owner[id(p)] for p in group["params"]}) == 1, group["name"]


def test_without_per_encoder_rates_the_groups_are_unchanged():
    method = LoraMethod(LoraOptions(rank=2, lr=1e-3, te_lr=5e-4, train_text_encoder=True))
    groups = method.prepare(_bundle("sdxl"))
    assert sorted((g["name"], g["lr"]) for g in groups) == [("text_encoder", 5e-4), ("unet", 1e-3)]
    # an unset per-encoder rate falls back to --te-lr (kohya: the list's missing values to text_encoder_lr)
    half = LoraMethod(LoraOptions(rank=2, lr=1e-3, te_lr=5e-4, te2_lr=2e-4, train_text_encoder=True))
    assert sorted((g["name"], g["lr"]) for g in half.prepare(_bundle("sdxl"))) == [
        ("text_encoder1", 5e-4), ("text_encoder2", 2e-4), ("unet", 1e-3),
    ]  # fmt: skip


def test_per_encoder_rate_problems_are_reported_together():
    with pytest.raises(ConfigError) as info:
        LoraMethod(LoraOptions(te1_lr=-1.0, te2_lr=1e-4)).validate()
    text = str(info.value)
    assert "--te1-lr must be 0 (untrained) or positive" in text and "give --train-text-encoder" in text
    with pytest.raises(ConfigError, match="--te3-lr is T5's rate: it needs --train-t5"):
        LoraMethod(LoraOptions(train_text_encoder=True, te3_lr=1e-4)).validate()
    problems = LoraMethod(LoraOptions(train_text_encoder=True, te2_lr=1e-4)).family_problems("flux")
    assert problems == ["--te2-lr: a flux model has no CLIP-G text encoder"]


@pytest.mark.parametrize(
    ("family", "options", "expected"),
    [
        ("sdxl", {"te1_lr": 1e-4, "te2_lr": 2e-4}, "[0.0001, 0.0002]"),
        ("sdxl", {"te_lr": 5e-5}, "5e-05"),
        ("sd3", {"te1_lr": 1e-4, "te2_lr": 2e-4, "te3_lr": 2e-4, "train_t5": True}, "[0.0001, 0.0002, 0.0002]"),
        ("flux", {"te1_lr": 1e-4, "te3_lr": 1e-4, "train_t5": True}, "0.0001"),
    ],
)
def test_metadata_text_encoder_lr_is_kohyas_list_or_number(tmp_path, family, options, expected):
    method = LoraMethod(LoraOptions(rank=2, lr=1e-3, train_text_encoder=True, save_dtype="fp32", **options))
    bundle = _bundle(family)
    method.prepare(bundle)
    info = SaveInfo(path=tmp_path / "x.safetensors", step=1, epoch=1, metadata={}, final=True)
    from sdplugin_lora.format import header_metadata

    meta = header_metadata(method.save(bundle, info))
    # kohya: metadata values are str(v); a list of floats prints as json does
    assert meta["ss_text_encoder_lr"] == expected
    if expected.startswith("["):
        assert json.loads(meta["ss_text_encoder_lr"]) == [float(x) for x in expected[1:-1].split(",")]


# --- kohya TOML --------------------------------------------------------------------------------------------------


def _kohya_load(tmp_path, model, **items):
    import tomli_w
    from sdcore.train.config import load_options

    cfg = tmp_path / "k.toml"
    cfg.write_text(tomli_w.dumps({"pretrained_model_name_or_path": model, **items}))
    notes: list[str] = []
    return load_options(LoraOptions, cfg, notes=notes), notes


def _kohya_rule(family: str, given: list[float], train_t5: bool) -> dict[str, float | None]:
    """train_network.py + the family's network, rewritten: SD3 pads to 3 ([a,b] -> [a,b,b]), Flux reads [0] CLIP-L
    and [1] T5, networks.lora (SD1/SDXL) the first value for every encoder; T5 only with train_t5xxl."""
    if family == "sd3":
        padded = given + [given[-1]] * (3 - len(given))
        out = {"te1_lr": padded[0], "te2_lr": padded[1], "te3_lr": padded[2]}
    elif family == "flux":
        out = {"te1_lr": given[0], "te3_lr": given[1]}
    else:
        return {"te_lr": given[0], "te1_lr": None, "te2_lr": None, "te3_lr": None}
    if not train_t5:
        out["te3_lr"] = None
    return out


@pytest.mark.parametrize(
    ("family", "given", "train_t5"),
    [
        ("sd3", [1e-5, 2e-5], True),
        ("sd3", [1e-5, 2e-5, 3e-5], False),
        ("flux", [1e-5, 2e-5], True),
        ("flux", [1e-5, 2e-5, 9e-5], False),
        ("sdxl", [1e-5, 2e-5], False),
    ],
)
def test_kohya_text_encoder_lr_list_goes_to_the_encoders_as_kohya_gives_it(tmp_path, family, given, train_t5):
    extra = {"train_t5xxl": True} if train_t5 else {}
    o, notes = _kohya_load(tmp_path, f"tiny:{family}", text_encoder_lr=given, **extra)
    for name, value in _kohya_rule(family, given, train_t5).items():
        assert getattr(o, name) == value, (name, getattr(o, name), value)
    if family == "sdxl":
        assert any("every text encoder trains at the first" in n for n in notes)
    if len(given) > (3 if family == "sd3" else 2):
        assert any("are unused" in n for n in notes)


def test_kohya_text_encoder_lr_list_without_a_known_family_is_refused_in_one_line(tmp_path):
    with pytest.raises(ConfigError) as info:
        _kohya_load(tmp_path, str(tmp_path / "model.ckpt"), text_encoder_lr=[1e-5, 2e-5])
    assert "\n" not in str(info.value) and "set te1_lr/te2_lr/te3_lr" in str(info.value)
    same, _ = _kohya_load(tmp_path, "tiny:sdxl", text_encoder_lr=[1e-5, 1e-5])
    assert same.te_lr == 1e-5 and same.te2_lr is None  # equal values: one rate, as before


# --- layer filter ------------------------------------------------------------------------------------------------


def _onetrainer_match(patterns: str, regex: bool, path: str) -> bool:
    """ModuleFilter.matches, rewritten: any stripped pattern; empty matches all; substring or re.search."""
    for raw in patterns.split(","):
        p = raw.strip()
        if not p or (re.search(p, path) is not None if regex else p in path):
            return True
    return False


@pytest.mark.parametrize(
    ("family", "patterns", "regex", "options"),
    [
        ("sd1", "attn1, resnets.0.conv", False, {"conv_rank": 2}),
        ("sdxl", r"attentions\.0\..*attn2\.to_[qv]$", True, {}),
        ("flux", "single_transformer_blocks.1, ff.net", False, {}),
        ("sd3", r"^transformer_blocks\.[01]\.attn\.to_", True, {}),
    ],
)
def test_adapted_denoiser_modules_are_the_candidates_the_filter_matches(family, patterns, regex, options):
    from sdplugin_lora.naming import ModuleIndex

    o = dict(rank=2, train_text_encoder=True, split_qkv=family in ("sd3", "flux"), **options)
    unfiltered = LoraMethod(LoraOptions(**o))
    unfiltered.prepare(_bundle(family))
    bundle = _bundle(family)
    method = LoraMethod(LoraOptions(**o, layer_filter=patterns, layer_filter_regex=regex))
    method.validate()
    method.prepare(bundle)
    index = ModuleIndex.from_bundle(bundle)

    def denoiser_paths(network):
        return {index.targets[n].path for n in network.loras if not index.targets[n].is_text_encoder}

    candidates = denoiser_paths(unfiltered.network)
    expected = {p for p in candidates if _onetrainer_match(patterns, regex, p)}
    assert expected and expected != candidates  # the filter keeps some and drops some
    assert denoiser_paths(method.network) == expected
    te = {n for n in method.network.loras if n.startswith("lora_te")}
    assert te and te == {n for n in unfiltered.network.loras if n.startswith("lora_te")}, "text encoders unfiltered"


def test_filter_on_kohyas_fused_modules_keeps_whole_groups_shared_and_saves(tmp_path):
    """Flux without split_qkv: a filter keeping q, k and v of a block leaves kohya's one shared-down module."""
    from sdplugin_lora.adapters import SharedDownLora
    from sdplugin_lora.format import read_lora

    method = LoraMethod(LoraOptions(rank=2, layer_filter="transformer_blocks.0.attn.to_", save_dtype="fp32"))
    bundle = _bundle("flux")
    method.prepare(bundle)
    shared = [m for m in method.network if isinstance(m, SharedDownLora)]
    assert shared and all("blocks_0" in m.lora_name for m in method.network)
    lora = read_lora(method.save(bundle, SaveInfo(path=tmp_path / "f.safetensors", step=1, epoch=1, metadata={},
                                                  final=True)))  # fmt: skip
    assert lora.modules and all("blocks_0" in name for name in lora.modules)


def test_unmatched_and_bad_patterns_are_one_line_problems():
    with pytest.raises(ConfigError) as info:
        LoraMethod(LoraOptions(rank=2, layer_filter="attn1, nothing_here, zzz")).prepare(_bundle("sd1"))
    text = str(info.value)
    assert "\n" not in text and "'nothing_here', 'zzz'" in text and "'attn1'" not in text
    with pytest.raises(ConfigError, match="not a regular expression"):
        LoraMethod(LoraOptions(layer_filter="attn[1", layer_filter_regex=True)).validate()
    with pytest.raises(ConfigError, match="give --layer-filter"):
        LoraMethod(LoraOptions(layer_filter_regex=True)).validate()
    # an empty pattern (a trailing comma) matches every candidate, as OneTrainer's
    everything = LoraMethod(LoraOptions(rank=2, layer_filter="zzz_no_match,"))
    with pytest.raises(ConfigError, match="'zzz_no_match'"):
        everything.prepare(_bundle("sd1"))
    method = LoraMethod(LoraOptions(rank=2, layer_filter="attn1,"))
    plain = LoraMethod(LoraOptions(rank=2))
    method.prepare(_bundle("sd1"))
    plain.prepare(_bundle("sd1"))
    assert set(method.network.loras) == set(plain.network.loras)


def test_preflight_reports_an_unmatched_filter_before_loading(tmp_path, monkeypatch):
    import sdcore.models.load as load
    from click.testing import CliRunner
    from sdcore.cli import build_cli
    from sdcore.plugins import get_plugin_manager
    from sdcore.testing.contract import make_tiny_dataset

    def no_load(*args, **kwargs):
        raise AssertionError("the pre-flight must not load the model")

    monkeypatch.setattr(load, "load_model", no_load)
    make_tiny_dataset(tmp_path / "data", n=2, size=64)
    args = ["train", "lora", "--model", "tiny:sd1", "--data", str(tmp_path / "data"), "--output",
            str(tmp_path / "o.safetensors"), "--resolution", "64", "--dry-run", "--layer-filter", "no_such_layer"]  # fmt: skip
    result = CliRunner().invoke(build_cli(get_plugin_manager()), args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "--layer-filter: 'no_such_layer' matches none" in result.output


# --- OneTrainer configs ------------------------------------------------------------------------------------------


def _ot(tmp_path, config, notes=None):
    from sdcore.train.config import load_options

    path = tmp_path / "ot.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    return load_options(LoraOptions, path, notes=notes if notes is not None else [])


def test_onetrainer_per_encoder_rates_map_to_te_rates(tmp_path):
    config = {
        "training_method": "LORA", "model_type": "STABLE_DIFFUSION_3", "base_model_name": "tiny:sd3",
        "learning_rate": 1e-4, "resolution": "64", "output_model_format": "DIFFUSERS_LORA",
        "text_encoder": {"train": True, "learning_rate": 1e-5}, "text_encoder_2": {"train": True},
        "text_encoder_3": {"train": True, "learning_rate": 3e-5},
    }  # fmt: skip
    o = _ot(tmp_path, config)
    # OneTrainer: a part without learning_rate trains at learning_rate (sdcore: an unset rate falls back to --lr)
    assert (o.te1_lr, o.te2_lr, o.te3_lr, o.te_lr, o.lr, o.train_t5) == (1e-5, None, 3e-5, None, 1e-4, True)
    method = LoraMethod(o)
    method.validate()
    assert {slot: method.te_rate(slot) for slot in (1, 2, 3)} == {1: 1e-5, 2: 1e-4, 3: 3e-5}


def test_onetrainer_custom_layer_filter_loads_and_trains(tmp_path, monkeypatch):
    from click.testing import CliRunner
    from sdcore.cli import build_cli
    from sdcore.plugins import get_plugin_manager
    from sdcore.testing.datasets import make_tiny_dataset
    from sdplugin_lora.format import read_lora

    monkeypatch.chdir(tmp_path)
    make_tiny_dataset(tmp_path / "data", n=2, size=64)
    config = {
        "training_method": "LORA", "model_type": "STABLE_DIFFUSION_15", "base_model_name": "tiny:sd1",
        "learning_rate": 0.002, "epochs": 1, "batch_size": 1, "resolution": "64", "lora_rank": 2, "lora_alpha": 1.0,
        "layer_filter_preset": "attn-mlp", "layer_filter": "attn2.to_k, proj_in", "train_dtype": "FLOAT_32",
        "output_model_format": "KOHYA_LORA", "output_model_destination": "out/ot.safetensors",
        "learning_rate_warmup_steps": 0, "text_encoder": {"train": False}, "unet": {"gradient_checkpointing": False},
        "sample_after_unit": "NEVER",
        "concepts": [{"path": "data/1_sks", "name": "sks", "image": {"enable_crop_jitter": False}}],
    }  # fmt: skip
    notes: list[str] = []
    o = _ot(tmp_path, config, notes)
    assert (o.layer_filter, o.layer_filter_regex, o.algo) == ("attn2.to_k, proj_in", False, "locon")
    assert any("layer_filter 'attn2.to_k, proj_in': applied to" in n for n in notes)
    (tmp_path / "ot.json").write_text(json.dumps(config), encoding="utf-8")
    result = CliRunner().invoke(build_cli(get_plugin_manager()), ["train", "lora", "--config", "ot.json",
                                                                   "--no-progress"])  # fmt: skip
    assert result.exit_code == 0, result.output + repr(result.exception)
    lora = read_lora(tmp_path / "out" / "ot.safetensors")
    names = set(lora.modules)
    assert names and all(n.endswith(("attn2_to_k", "proj_in")) for n in names), names
    assert any(n.endswith("attn2_to_k") for n in names) and any(n.endswith("proj_in") for n in names)
    assert all(torch.count_nonzero(w.up) > 0 for w in lora.modules.values()), "both steps trained every module"
