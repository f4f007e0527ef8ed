"""Every algorithm the plugin trains, end to end: train -> save -> apply (hooked and merged) ->
merge (files and checkpoint) -> resize (full and small rank) -> info, with numbers that agree.

The reference numbers come from the source file itself (its own dense change per module, as
:func:`effective_deltas` computes it) and from ``torch.linalg.svdvals`` (what a rank-r SVD
truncation must lose: the Frobenius norm of the dropped singular values, Eckart-Young).
"""

from __future__ import annotations

import math

import pytest
import torch
from click.testing import CliRunner
from lora_testutil import fresh_bundle, unet_inputs, unet_out
from sdcore.errors import NetworkMismatchError
from sdcore.testing.contract import contract_options
from sdcore.train.loop import train
from sdplugin_lora.apply import apply_lora
from sdplugin_lora.commands import lora_group
from sdplugin_lora.format import parse_state_dict, read_lora, save_lora
from sdplugin_lora.method import LoraMethod
from sdplugin_lora.naming import ModuleIndex
from sdplugin_lora.tools import (
    effective_deltas,
    layer_shape,
    lora_info,
    lora_key,
    merge_into_model,
    merge_loras,
    resize_lora,
)

#: algo -> (options, what `lora info` calls the trained file)
ALGOS = {
    "lora": ({"rank": 4, "alpha": 2.0}, "LoRA"),
    "locon": ({"rank": 4, "alpha": 2.0, "conv_rank": 2, "conv_alpha": 1.0}, "LoCon"),
    "loha": ({"rank": 4, "alpha": 2.0, "conv_rank": 2, "conv_alpha": 1.0}, "LoHa"),
    "lokr": ({"rank": 2, "alpha": 2.0, "conv_rank": 2, "conv_alpha": 1.0}, "LoKr"),
    "dora": ({"rank": 4, "alpha": 2.0, "conv_rank": 2, "conv_alpha": 1.0}, "LoCon (DoRA)"),
    "oft": ({"rank": 4, "alpha": 1e-2}, "OFT"),
    "lora_fa": ({"rank": 4, "alpha": 2.0}, "LoRA"),  # kohya networks.lora_fa: a plain LoRA file
    "dylora": ({"rank": 4, "alpha": 2.0, "conv_rank": 4, "dylora_unit": 2}, "LoCon"),  # networks.dylora: the same
}


def _trained(tmp_path, algo):
    overrides = {**ALGOS[algo][0], "algo": algo, "max_steps": 3, "lr": 1e-2, "batch_size": 1}
    options = contract_options(LoraMethod, tmp_path, overrides, family="sd1", tag=algo)
    result = train(LoraMethod(options), bundle=fresh_bundle("sd1"))
    return result.output


def _close(got, want, tol=1e-5):
    assert set(got) == set(want)
    worst = max(float((got[k] - want[k]).abs().max()) for k in want)
    assert worst <= tol, worst


def _saved(tmp_path, name, tensors, meta):
    return save_lora(tmp_path / name, tensors, meta, dtype="fp32")


@pytest.mark.parametrize("algo", list(ALGOS))
def test_every_algorithm_round_trips(tmp_path, algo):
    path = _trained(tmp_path, algo)
    lora = read_lora(path)
    n = len(lora.modules)
    base = fresh_bundle("sd1")
    needs_base = algo in ("dora", "oft")

    # info: the algorithm, every module, ranks as the file's tensors say
    info = lora_info(path)
    assert info["algorithm"] == ALGOS[algo][1] and info["modules"] == n
    assert sum(info["ranks"].values()) == n
    file_ranks = {("full" if w.full_matrix else w.rank) for w in lora.modules.values()}
    assert set(info["ranks"]) == file_ranks
    assert info["dora_modules"] == (n if algo == "dora" else 0)
    if algo not in ("lora", "oft", "lora_fa"):
        assert info["conv3x3_modules"] > 0

    # the change each module makes (weight space, multiplier 1): the reference for what follows
    source = effective_deltas(lora, base)
    assert max(float(d.abs().max()) for d in source.values()) > 1e-4, "training changed nothing"

    # apply: hooked forward == merged weights, and both differ from the base model
    inputs = unet_inputs(base)
    plain = unet_out(base, inputs)
    hooked, merged = fresh_bundle("sd1"), fresh_bundle("sd1")
    apply_lora(hooked, path, 0.7)
    apply_lora(merged, path, 0.7, merge=True)
    out_hooked, out_merged = unet_out(hooked, inputs), unet_out(merged, inputs)
    torch.testing.assert_close(out_hooked, out_merged, atol=1e-5, rtol=0)
    assert float((out_merged - plain).abs().max()) > 1e-5

    # merge into a checkpoint: W + ratio·(W' - W) for every module
    model = fresh_bundle("sd1")
    assert merge_into_model(model, [(path, 0.5)]) == n
    index, base_index = ModuleIndex.from_bundle(model), ModuleIndex.from_bundle(base)
    baked = {}
    for name in lora.modules:
        target = index.resolve(lora_key(name))
        before = base_index.resolve(lora_key(name)).module.weight.detach()
        baked[lora_key(name)] = (target.module.weight.detach() - before).flatten(1) * 2.0
    _close(baked, source, 1e-5)

    # merge files (svd, full rank): 0.5·a + 0.5·a is a again, as a plain LoRA
    if needs_base:
        with pytest.raises(NetworkMismatchError, match="base-model"):
            merge_loras([(lora, 0.5), (lora, 0.5)], mode="svd", rank=4096)
    tensors, meta = merge_loras(
        [(lora, 0.5), (lora, 0.5)], mode="svd", rank=4096, conv_rank=4096, base=base, clamp_quantile=None
    )
    twice = parse_state_dict(tensors, meta)
    assert {w.kind for w in twice.modules.values()} == {"lora"} and not any(w.is_dora for w in twice.modules.values())
    _close(effective_deltas(twice), source, 1e-5)

    # resize to full rank: the same change; DoRA stays DoRA (no base needed), OFT needs the base
    resize_base = base if algo == "oft" else None
    if algo == "oft":
        with pytest.raises(NetworkMismatchError, match="base-model"):
            resize_lora(lora, 4096)
    full = resize_lora(lora, 4096, conv_rank=4096, base=resize_base)
    full_path = _saved(tmp_path, "full.safetensors", full.tensors, full.metadata)
    full_lora = read_lora(full_path)
    _close(effective_deltas(full_lora, base), source, 1e-5)
    assert all(abs(kept - 1.0) < 1e-5 for kept in full.fro_retained.values())
    again = fresh_bundle("sd1")
    apply_lora(again, full_path, 0.7, merge=True)
    torch.testing.assert_close(unet_out(again, inputs), out_merged, atol=1e-5, rtol=0)

    # resize to rank 1: each module loses exactly the singular values it drops
    small = resize_lora(lora, 1, conv_rank=1, base=resize_base)
    small_path = _saved(tmp_path, "small.safetensors", small.tensors, small.metadata)
    small_lora = read_lora(small_path)
    family = "sd1"
    for name, weights in lora.modules.items():
        key = lora_key(name)
        if algo == "dora":  # the inner ΔW is what is re-factored; the magnitude is kept
            shape = layer_shape(name, weights, family)
            want = weights.variant.delta(weights.tensors, shape).flatten(1)
            got_w = small_lora.modules[key]
            got = got_w.variant.delta(got_w.tensors, shape).flatten(1)
            torch.testing.assert_close(got_w.tensors["dora_scale"], weights.tensors["dora_scale"].float())
        else:
            want = source[key]
            got = effective_deltas(
                parse_state_dict({f"{key}.{k}": v for k, v in small_lora.modules[key].tensors.items()})
            )[key]
        s = torch.linalg.svdvals(want.double())
        tail = float(s[1:].pow(2).sum().sqrt())
        error = float((got.double() - want.double()).norm())
        assert math.isclose(error, tail, rel_tol=1e-3, abs_tol=1e-6), (key, error, tail)
        total = float(s.pow(2).sum())
        if total > 0:
            assert math.isclose(small.fro_retained[key], math.sqrt(1 - tail**2 / total), abs_tol=1e-4)

    # info of the resized files: LoRA (LoCon when it has 3x3 convs), ranks as asked, DoRA kept
    for resized, ranks in ((small_path, {1}), (full_path, None)):
        got = lora_info(resized)
        assert got["modules"] == n and got["kinds"] == {"lora": n}
        label = "LoCon" if got["conv3x3_modules"] else "LoRA"
        assert got["algorithm"] == label + (" (DoRA)" if algo == "dora" else "")
        assert got["dora_modules"] == (n if algo == "dora" else 0)
        if ranks is not None:
            assert set(got["ranks"]) == ranks
        meta = read_lora(resized).metadata
        assert meta["ss_network_module"] == ("lycoris.kohya" if algo == "dora" else "networks.lora")

    if algo == "oft":  # the CLI: the base model by name
        cli_out = tmp_path / "cli.safetensors"
        args = [
            "resize",
            str(path),
            "-o",
            str(cli_out),
            "--rank",
            "1",
            "--base-model",
            "tiny:sd1",
            "--save-dtype",
            "fp32",
        ]
        result = CliRunner().invoke(lora_group, args)
        assert result.exit_code == 0, result.output
        _close(effective_deltas(read_lora(cli_out)), effective_deltas(small_lora), 1e-6)
        result = CliRunner().invoke(lora_group, ["resize", str(path), "-o", str(cli_out), "--rank", "1", "--overwrite"])
        assert result.exit_code != 0 and "base-model" in str(result.exception or result.output)
