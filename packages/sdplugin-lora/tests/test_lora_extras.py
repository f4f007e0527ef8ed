"""kohya's LoRA extras: LoRA+ from every spelling, block options in the pre-flight, mixed-rank files
in diffusers, --base-weights and --dim-from-weights (kohya's train_network.py / networks/lora.py)."""

from __future__ import annotations

import json

import pytest
import torch
from lora_testutil import all_params, fresh_bundle, random_network
from sdcore.errors import ConfigError
from sdcore.testing.contract import contract_options
from sdcore.train.kohya import translate
from sdcore.train.method import SaveInfo
from sdplugin_lora.blocks import block_count
from sdplugin_lora.format import header_metadata, network_metadata, read_lora, save_lora
from sdplugin_lora.method import LoraMethod, LoraOptions
from sdplugin_lora.naming import ModuleIndex
from test_diffusers_interop import _expected, _pipeline

FIELDS = [f for f in LoraOptions.__dataclass_fields__]


# --- kohya names -----------------------------------------------------------------------------------------


def test_kohya_names_reach_the_lora_options():
    out = translate(
        {
            "loraplus_unet_lr_ratio": 8,
            "network_args": ["loraplus_lr_ratio=16", "loraplus_text_encoder_lr_ratio=4"],
            "base_weights": ["a.safetensors", "b.safetensors"],
            "base_weights_multiplier": [0.5],
            "dim_from_weights": True,
            "network_weights": "w.safetensors",
        },
        FIELDS,
        where="cfg",
    )
    assert out.problems == []
    assert float(out.values["loraplus_lr_ratio"]) == 16.0
    assert out.values["loraplus_unet_lr_ratio"] == 8.0
    assert float(out.values["loraplus_text_encoder_lr_ratio"]) == 4.0
    assert out.values["base_weights"] == "a.safetensors,b.safetensors"
    assert out.values["base_weights_multiplier"] == "0.5"
    assert out.values["dim_from_weights"] is True
    # the kohya_ss GUI writes the ratio top-level and in network_args: the same number twice is one value
    same = translate({"loraplus_lr_ratio": 16.0, "network_args": ["loraplus_lr_ratio=16"]}, FIELDS, where="cfg")
    assert same.problems == [] and float(same.values["loraplus_lr_ratio"]) == 16.0
    clash = translate({"loraplus_lr_ratio": 8.0, "network_args": ["loraplus_lr_ratio=16"]}, FIELDS, where="cfg")
    assert any("both set loraplus_lr_ratio" in p for p in clash.problems)
    # the GUI's 0 means off
    off = translate({"loraplus_lr_ratio": 0}, FIELDS, where="cfg")
    assert off.problems == [] and off.values.get("loraplus_lr_ratio") is None
    alone = translate({"base_weights_multiplier": [0.5]}, FIELDS, where="cfg")
    assert alone.problems == [] and "base_weights_multiplier" not in alone.values, "kohya ignores it alone"
    bad = translate({"base_weights": ["a,b.safetensors"]}, FIELDS, where="cfg")
    assert any("base_weights" in p for p in bad.problems)


# --- LoRA+ -----------------------------------------------------------------------------------------------


def _kohya_groups(network, *, unet_lr, te_lr, unet_ratio, te_ratio):
    """kohya networks/lora.py prepare_optimizer_params without block lr, written from its rules:
    per part (text encoder, then UNet) one group of the non-plus tensors at lr and, with a ratio, one
    of the tensors whose name contains "lora_up" at lr * ratio."""
    groups = []
    for te, lr, ratio in ((True, te_lr, te_ratio), (False, unet_lr, unet_ratio)):
        plain, plus = set(), set()
        for module in network:
            if module.lora_name.startswith("lora_te") != te:
                continue
            for name, param in module.named_parameters():
                (plus if ratio is not None and "lora_up" in name else plain).add(id(param))
        groups.append((frozenset(plain), lr))
        if plus:
            groups.append((frozenset(plus), lr * ratio))
    return {g for g in groups if g[0]}


@pytest.mark.parametrize("algo", ["lora", "locon", "dora"])
def test_loraplus_groups_equal_kohyas_and_one_sgd_step_is_ratio_times_plain(algo):
    common = {"rank": 4, "lr": 1e-2, "train_text_encoder": True, "te_lr": 5e-3, "algo": algo}
    plain = LoraMethod(LoraOptions(**common))
    plus = LoraMethod(LoraOptions(**common, loraplus_lr_ratio=16.0, loraplus_text_encoder_lr_ratio=4.0))
    plain_groups = plain.prepare(fresh_bundle("sd1"))
    plus_groups = plus.prepare(fresh_bundle("sd1"))
    got = {(frozenset(id(p) for p in g["params"]), g["lr"]) for g in plus_groups}
    assert got == _kohya_groups(plus.network, unet_lr=1e-2, te_lr=5e-3, unet_ratio=16.0, te_ratio=4.0)

    generator = torch.Generator().manual_seed(3)
    for a, b in zip(plain.network, plus.network, strict=True):  # the same non-zero start in both
        for (_, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
            with torch.no_grad():
                pa.copy_(torch.randn(pa.shape, generator=generator) * 0.1)
                pb.copy_(pa)
    before = {k: v.clone() for k, v in plain.network.state_dict().items()}
    for method, groups in ((plain, plain_groups), (plus, plus_groups)):
        optimizer = torch.optim.SGD(groups)
        loss = sum((m.delta_weight(detach=False) ** 2).sum() for m in method.network)
        loss.backward()
        optimizer.step()
    step_plain = {k: v - before[k] for k, v in plain.network.state_dict().items()}
    step_plus = {k: v - before[k] for k, v in plus.network.state_dict().items()}
    ups = 0
    for key, update in step_plain.items():
        ratio = (4.0 if key.startswith("lora_te") else 16.0) if "lora_up" in key else 1.0
        ups += ratio != 1.0
        # float32 steps measured as after - before on weights ~0.1: rounding ~1e-8 each
        torch.testing.assert_close(step_plus[key], ratio * update, rtol=1e-4, atol=5e-7)
    assert ups > 0
    smallest = min(float(v.abs().max()) for k, v in step_plain.items() if "lora_up" in k)
    assert smallest > 4 * 5e-7, "even the smallest up step is well above the rounding tolerance"


def test_loraplus_metadata_is_kohyas_network_args(tmp_path):
    method = LoraMethod(LoraOptions(rank=2, loraplus_unet_lr_ratio=16.0))
    bundle = fresh_bundle("sd1")
    method.prepare(bundle)
    path = method.save(bundle, SaveInfo(path=tmp_path / "p.safetensors", step=1, epoch=1, metadata={}, final=True))
    meta = header_metadata(path)
    args = json.loads(meta["ss_network_args"])
    assert float(args["loraplus_unet_lr_ratio"]) == 16.0
    assert not any(k.startswith("ss_loraplus") for k in meta), "kohya records LoRA+ in ss_network_args only"


@pytest.mark.parametrize("ratio", [0.0, -2.0])
def test_loraplus_ratio_must_be_positive(ratio):
    with pytest.raises(ConfigError, match="loraplus-unet-lr-ratio must be positive"):
        LoraMethod(LoraOptions(loraplus_unet_lr_ratio=ratio)).validate()


# --- block options in the pre-flight (model header only) ---------------------------------------------------


def _preflight(tmp_path, family, **overrides):
    from sdcore.train.preflight import run_preflight

    options = contract_options(LoraMethod, tmp_path, overrides, family=family)
    return run_preflight(LoraMethod(options), options, plan=False).problems


def test_preflight_refuses_block_options_the_family_lacks(tmp_path, monkeypatch):
    import sdcore.models.load as load

    def no_load(*args, **kwargs):
        raise AssertionError("the pre-flight must not load the model")

    monkeypatch.setattr(load, "load_model", no_load)
    sd1_dims = ",".join(["2"] * block_count("sd1"))
    problems = _preflight(tmp_path, "sdxl", block_dims=sd1_dims, loraplus_lr_ratio=-1.0)
    assert any("--block-dims has 25 values; this model family needs 23" in p for p in problems), problems
    assert any("loraplus-lr-ratio must be positive" in p for p in problems), "every problem at once"
    problems = _preflight(tmp_path, "flux", down_lr_weight="sine")
    assert any("defined for sd1, sd2 and sdxl, not flux" in p for p in problems), problems
    assert _preflight(tmp_path, "sd1", block_dims=sd1_dims) == []


def test_preflight_reports_missing_weight_files(tmp_path):
    problems = _preflight(
        tmp_path, "sd1", base_weights=str(tmp_path / "nope.safetensors"), dim_from_weights=True, algo="loha"
    )
    assert any("--base-weights" in p and "file not found" in p for p in problems), problems
    assert any("--dim-from-weights takes the ranks from --network-weights" in p for p in problems), problems
    assert any("--dim-from-weights with --algo loha" in p for p in problems), problems
    with pytest.raises(ConfigError, match="expected comma-separated numbers"):
        LoraMethod(LoraOptions(base_weights="x.safetensors", base_weights_multiplier="1,a")).validate()


# --- mixed ranks load in diffusers ---------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_block_dims_file_has_per_module_ranks_and_fuses_exactly_in_diffusers(family, tmp_path):
    count = block_count(family)
    dims = ",".join(str(1 + i % 3) for i in range(count))
    conv = ",".join(str(1 + (i + 1) % 2) for i in range(count))
    method = LoraMethod(LoraOptions(rank=4, alpha=2.0, block_dims=dims, conv_block_dims=conv, save_dtype="fp32"))
    bundle = fresh_bundle(family)
    method.prepare(bundle)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in method.network:
            module.lora_up.weight.copy_(torch.randn(module.lora_up.weight.shape, generator=generator) * 0.2)
    path = method.save(bundle, SaveInfo(path=tmp_path / "mixed.safetensors", step=1, epoch=1, metadata={}, final=True))
    lora = read_lora(path)
    assert len({w.rank for w in lora.modules.values()}) >= 3, "the file holds several ranks"

    fresh = fresh_bundle(family)
    expected = _expected(fresh, path, 0.8)
    before = all_params(fresh)
    pipe = _pipeline(fresh)
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(lora_scale=0.8)
    pipe.unload_lora_weights()
    after = all_params(fresh)
    assert {k for k in before if not torch.equal(before[k], after[k])} == set(expected)
    for key, want in expected.items():
        torch.testing.assert_close(after[key], want, atol=1e-5, rtol=0)


# --- base_weights --------------------------------------------------------------------------------------------


def _base_file(tmp_path, family="sd1"):
    bundle = fresh_bundle(family)
    network = random_network(bundle, rank=4, alpha=2.0, conv_rank=2, conv_alpha=1.0, std=0.1)
    meta = network_metadata(
        family=family, prediction_type=bundle.prediction_type, rank=4, alpha=2, conv_rank=2, conv_alpha=1
    )
    return save_lora(tmp_path / "base_lora.safetensors", network.state_dict(), meta, dtype="fp32")


def _train(tmp_path, tag, bundle, **overrides):
    from sdcore.train.loop import train

    options = contract_options(LoraMethod, tmp_path, {"max_steps": 2, "rank": 2, **overrides}, tag=tag)
    method = LoraMethod(options)
    result = train(method, bundle=bundle)
    return result, read_lora(result.output)


def test_base_weights_train_like_a_base_merged_by_hand(tmp_path):
    base_lora = _base_file(tmp_path)
    multiplier = 0.6
    by_hand = fresh_bundle("sd1")
    merged = _expected(by_hand, base_lora, multiplier)  # W + m * alpha/rank * up @ down, unet and text encoder
    assert any(component.startswith("text_encoder") for component, _ in merged)
    params = {(c, n): p for c, m in by_hand.components().items() for n, p in m.named_parameters()}
    with torch.no_grad():
        for key, value in merged.items():
            params[key].copy_(value)

    ours, ours_file = _train(
        tmp_path, "ours", fresh_bundle("sd1"), base_weights=str(base_lora), base_weights_multiplier=str(multiplier)
    )
    hand, hand_file = _train(tmp_path, "hand", by_hand)
    plain, _ = _train(tmp_path, "plain", fresh_bundle("sd1"))
    assert ours.losses == pytest.approx(hand.losses, rel=1e-5, abs=1e-7)
    assert set(ours_file.modules) == set(hand_file.modules)
    for name, weights in ours_file.modules.items():
        for key, tensor in weights.tensors.items():
            torch.testing.assert_close(tensor, hand_file.modules[name].tensors[key], atol=1e-6, rtol=1e-5)
    assert ours.losses != pytest.approx(plain.losses, rel=1e-4), "merging changed the model that trains"


def test_base_weights_multipliers_default_to_one():
    method = LoraMethod(
        LoraOptions(base_weights="a.safetensors, b.safetensors,c.safetensors", base_weights_multiplier="0.5")
    )
    assert method.base_weight_files() == ["a.safetensors", "b.safetensors", "c.safetensors"]
    assert method.base_weight_multipliers() == [0.5, 1.0, 1.0]


# --- dim_from_weights -------------------------------------------------------------------------------------------


def test_dim_from_weights_takes_each_modules_rank_and_alpha_from_the_file(tmp_path):
    count = block_count("sd1")
    source = LoraMethod(
        LoraOptions(
            rank=4,
            alpha=3.0,
            block_dims=",".join(str(i % 4) for i in range(count)),  # some blocks 0: no module
            block_alphas=",".join(str(0.5 + i) for i in range(count)),
            conv_block_dims=",".join(str(1 + i % 2) for i in range(count)),
            save_dtype="fp32",
        )
    )
    bundle = fresh_bundle("sd1")
    source.prepare(bundle)
    with torch.no_grad():
        for module in source.network:
            module.lora_up.weight.normal_()
    path = source.save(bundle, SaveInfo(path=tmp_path / "src.safetensors", step=1, epoch=1, metadata={}, final=True))
    want = {name: (w.rank, w.alpha) for name, w in read_lora(path).modules.items()}
    assert len({r for r, _ in want.values()}) >= 2 and len({a for _, a in want.values()}) >= 3

    options = LoraOptions(rank=16, alpha=8.0, network_weights=str(path), dim_from_weights=True, save_dtype="fp32")
    method = LoraMethod(options)
    method.validate()
    method.prepare(fresh_bundle("sd1"))
    got = {m.lora_name: (m.rank, float(m.alpha)) for m in method.network}
    assert got == want  # alphas x.5 are exact in fp32
    every = ModuleIndex.from_bundle(fresh_bundle("sd1")).select(conv=True)
    assert len(got) < len(every), "modules the file lacks are not created"
    for key, value in source.trainable_state_dict().items():  # and the weights are the file's
        torch.testing.assert_close(method.trainable_state_dict()[key], value)

    with pytest.raises(ConfigError, match="ignores the block dims"):
        LoraMethod(LoraOptions(network_weights=str(path), dim_from_weights=True, block_dims="1")).validate()


def test_base_weights_loha_file_needs_a_lycoris_network(tmp_path):
    """kohya merges --base_weights with the run's network module: networks.lora only reads
    lora_down/lora_up pairs (a LoHa would silently stay unmerged), lycoris.kohya merges LoHa."""
    from sdplugin_lora.network import LoraNetwork

    bundle = fresh_bundle("sd1")
    loha = LoraNetwork.create(ModuleIndex.from_bundle(bundle).select(), rank=2, alpha=1.0, algo="loha")
    with torch.no_grad():
        for module in loha:
            for param in module.parameters():
                param.normal_(std=0.1)
    meta = network_metadata(
        family="sd1", prediction_type=bundle.prediction_type, network_module="lycoris.kohya", rank=2, alpha=1
    )
    path = save_lora(tmp_path / "loha.safetensors", loha.state_dict(), meta, dtype="fp32")
    with pytest.raises(ConfigError, match=r"loha modules are not merged by kohya's networks\.lora"):
        LoraMethod(LoraOptions(base_weights=str(path))).prepare(fresh_bundle("sd1"))
    target = fresh_bundle("sd1")
    before = all_params(target)
    LoraMethod(LoraOptions(algo="loha", base_weights=str(path))).prepare(target)
    after = all_params(target)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert len(changed) == len(loha), "every LoHa module merged into its weight"


def test_lr_weight_without_comma_is_a_preset_name_as_in_kohya():
    """kohya splits down/up_lr_weight only when it has a comma; "0.5" is looked up as a preset,
    logged as unknown and ignored (every weight 1), so it is refused; "0.5," is [0.5, 0] then 1s."""
    from sdplugin_lora.blocks import block_lr_weights

    with pytest.raises(ConfigError, match="without a comma as a preset name"):
        block_lr_weights("sd1", "0.5", None, None)
    assert block_lr_weights("sd1", "0.5,", None, None) == [0.5, 0.0] + [1.0] * 10 + [1.0] + [1.0] * 12
    assert block_lr_weights("sd1", None, "0.5", None)[12] == 0.5, "mid is always split (one value is fine)"


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_dim_from_weights_on_kohyas_fused_dit_modules(family, tmp_path):
    """lora_flux/lora_sd3 create_network_from_weights: each fused kohya module (qkv, linear1...) gets
    the file's rank and alpha; a module the file lacks is not created."""
    from safetensors.torch import load_file, save_file
    from sdplugin_lora.adapters import SharedDownLora
    from test_shared_qkv import _deltas, _method, _randomize, _save

    source, bundle, _ = _method(family, rank=3, alpha=1.5)
    _randomize(source.network, seed=2)
    path = _save(source, bundle, tmp_path / "src.safetensors")
    tensors = load_file(str(path))
    fused = next(n for n, m in source.network.loras.items() if isinstance(m, SharedDownLora))
    dropped = {k: v for k, v in tensors.items() if not k.startswith(fused + ".")}
    assert len(dropped) < len(tensors)
    save_file(dropped, str(tmp_path / "less.safetensors"), metadata={"ss_base_model_version": family})

    warm, _, _ = _method(family, rank=8, alpha=8.0, dim_from_weights=True, network_weights=str(path))
    assert {(m.rank, float(m.alpha)) for m in warm.network} == {(3, 1.5)}
    assert set(warm.network.loras) == set(source.network.loras)
    want, got = _deltas(source.network, source.index), _deltas(warm.network, warm.index)
    assert set(got) == set(want)
    for key, delta in want.items():
        torch.testing.assert_close(got[key], delta, atol=1e-7, rtol=0)
    less, _, _ = _method(family, rank=8, dim_from_weights=True, network_weights=str(tmp_path / "less.safetensors"))
    assert set(less.network.loras) == set(source.network.loras) - {fused}


@pytest.mark.parametrize("algo", ["loha", "lokr", "dora"])
def test_block_options_are_networks_lora_only(algo):
    """LyCORIS' lycoris.kohya reads no block_dims/lr weights: kohya would ignore them there."""
    with pytest.raises(ConfigError, match=r"LyCORIS \(lycoris\.kohya\) ignores them"):
        LoraMethod(LoraOptions(algo=algo, down_lr_weight="sine")).validate()
    LoraMethod(LoraOptions(algo="locon", down_lr_weight="sine")).validate()


def test_kohya_lycoris_network_with_block_args_is_refused():
    out = translate(
        {"network_module": "lycoris.kohya", "network_args": ["algo=lora", "block_dims=" + ",".join(["2"] * 25)]},
        FIELDS,
        where="cfg",
    )
    assert any("block_dims with network_module lycoris.kohya" in p for p in out.problems), out.problems
    ok = translate({"network_module": "networks.lora", "network_args": ["up_lr_weight=sine"]}, FIELDS, where="cfg")
    assert ok.problems == [] and ok.values["up_lr_weight"] == "sine"


def test_kohya_command_line_reports_every_bad_value_before_loading(tmp_path, monkeypatch):
    """train_network.py's flags as written: exit 2, no traceback, every problem at once, nothing loaded."""
    import sdcore.models.load as load
    from click.testing import CliRunner
    from sdcore.cli import build_cli
    from sdcore.plugins import get_plugin_manager
    from sdcore.testing.contract import make_tiny_dataset

    def no_load(*args, **kwargs):
        raise AssertionError("the pre-flight must not load the model")

    monkeypatch.setattr(load, "load_model", no_load)
    make_tiny_dataset(tmp_path / "data", n=2, size=64)
    args = ["train", "lora", "--pretrained_model_name_or_path", "tiny:sdxl", "--train_data_dir", str(tmp_path / "data")]
    args += ["--output_dir", str(tmp_path / "out"), "--resolution", "64", "--dry-run"]
    args += ["--base_weights", str(tmp_path / "missing.safetensors"), "--base_weights_multiplier", "0.5"]
    args += ["--dim_from_weights", "--network_args", "loraplus_lr_ratio=-1", "block_dims=" + ",".join(["4"] * 25)]
    result = CliRunner().invoke(build_cli(get_plugin_manager()), args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for text in (
        "missing.safetensors: file not found",
        "--dim-from-weights takes the ranks from --network-weights",
        "--loraplus-lr-ratio must be positive",
        "--block-dims has 25 values; this model family needs 23",
    ):
        assert text in result.output, (text, result.output)


def test_base_weights_on_flux_merge_kohyas_fused_modules(tmp_path):
    """lora_flux merges --base_weights too; the merged change of every transformer weight is the file's
    network's own change times the multiplier."""
    from test_shared_qkv import _deltas, _method, _randomize, _save

    source, bundle, _ = _method("flux", rank=2, alpha=1.0)
    _randomize(source.network, seed=5)
    path = _save(source, bundle, tmp_path / "base.safetensors")
    want = _deltas(source.network, source.index)
    _, merged, _ = _method("flux", base_weights=str(path), base_weights_multiplier="0.5")
    _, plain, _ = _method("flux")
    weights = dict(merged.components()["transformer"].named_parameters())
    originals = dict(plain.components()["transformer"].named_parameters())
    for module_path, delta in want.items():
        change = weights[module_path + ".weight"].detach() - originals[module_path + ".weight"].detach()
        torch.testing.assert_close(change, 0.5 * delta, atol=1e-6, rtol=1e-5)


def test_resume_with_other_block_dims_is_refused_in_the_preflight(tmp_path):
    import dataclasses

    from sdcore.train.loop import output_paths, train
    from sdcore.train.preflight import resume_problems

    dims = ",".join(["2"] * block_count("sd1"))
    first = contract_options(LoraMethod, tmp_path, {"max_steps": 1, "rank": 2, "block_dims": dims})
    train(LoraMethod(first), bundle=fresh_bundle("sd1"))
    other = dataclasses.replace(first, resume="latest", block_dims=",".join(["3"] * block_count("sd1")))
    problems = resume_problems(LoraMethod(other), other, output_paths(LoraMethod(first), first)[1])
    assert len(problems) == 1 and "--block-dims" in problems[0], problems
    same = dataclasses.replace(first, resume="latest")
    assert resume_problems(LoraMethod(same), same, output_paths(LoraMethod(first), first)[1]) == []


def test_prediction_type_override_is_what_the_trained_file_says(tmp_path):
    """--prediction-type v_prediction on an epsilon SD1 model (kohya's --v_parameterization): the LoRA's metadata
    says v as kohya's sai_model_spec and get_model_version_str_for_sd1_sd2 write it (prediction_type v, sd_v1_v)."""
    from sdcore.train.loop import train

    options = contract_options(LoraMethod, tmp_path, {"max_steps": 1, "rank": 2, "prediction_type": "v_prediction"})
    result = train(LoraMethod(options))
    meta = read_lora(result.output).metadata
    assert (meta["modelspec.prediction_type"], meta["ss_base_model_version"]) == ("v", "sd_v1_v")
    plain = contract_options(LoraMethod, tmp_path, {"max_steps": 1, "rank": 2}, tag="plain")
    meta = read_lora(train(LoraMethod(plain)).output).metadata
    assert (meta["modelspec.prediction_type"], meta["ss_base_model_version"]) == ("epsilon", "sd_v1")
