"""extract / resize / merge / info, and the ``sdcore lora`` commands."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from lora_testutil import fresh_bundle, random_network, unet_inputs, unet_out
from sdcore.errors import NetworkMismatchError
from sdplugin_lora.apply import apply_lora
from sdplugin_lora.commands import lora_group
from sdplugin_lora.format import network_metadata, parse_state_dict, read_lora, save_lora
from sdplugin_lora.tools import effective_deltas, extract_lora, lora_info, merge_into_model, merge_loras, resize_lora


def _known_lora(tmp_path, family="sd1", rank=2, conv_rank=2, seed=0, name="known.safetensors", **kw):
    bundle = fresh_bundle(family)
    network = random_network(
        bundle, rank=rank, alpha=float(rank), conv_rank=conv_rank, conv_alpha=float(conv_rank or 1), seed=seed, **kw
    )
    meta = network_metadata(family=family, rank=rank, alpha=rank, conv_rank=conv_rank, conv_alpha=conv_rank)
    return save_lora(tmp_path / name, network.state_dict(), meta, dtype="fp32")


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_extract_recovers_a_known_lora(family, tmp_path):
    path = _known_lora(tmp_path, family)
    tuned = fresh_bundle(family)
    apply_lora(tuned, path, merge=True)
    result = extract_lora(fresh_bundle(family), tuned, rank=4, conv_rank=4, clamp_quantile=1.0)
    extracted = parse_state_dict(result.tensors)
    want, got = effective_deltas(read_lora(path)), effective_deltas(extracted)
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-4, rtol=1e-3)
    assert all(float(extracted.modules[n].alpha) == extracted.modules[n].rank for n in got)


def test_extract_skips_unchanged_text_encoder_and_clamps(tmp_path):
    path = _known_lora(tmp_path, text_encoder=False)
    tuned = fresh_bundle("sd1")
    apply_lora(tuned, path, merge=True)
    result = extract_lora(fresh_bundle("sd1"), tuned, rank=2, clamp_quantile=0.9)
    assert result.skipped_text_encoder
    assert not any(k.startswith("lora_te") for k in result.tensors)
    assert not any("resnets" in k for k in result.tensors)  # no conv rank: LierLa modules only
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    unclamped = extract_lora(fresh_bundle("sd1"), tuned, rank=2, clamp_quantile=1.0).tensors
    assert result.tensors[f"{name}.lora_up.weight"].abs().max() < unclamped[f"{name}.lora_up.weight"].abs().max()
    with pytest.raises(NetworkMismatchError):
        extract_lora(fresh_bundle("sd1"), fresh_bundle("sdxl"))
    from sdcore.errors import ConfigError

    with pytest.raises(ConfigError, match=r"equal the base's in every module to extract: nothing to extract"):
        extract_lora(fresh_bundle("sd1"), fresh_bundle("sd1"))  # `lora extract BASE BASE` wrote 48 zero modules


def test_resize_keeps_scale_and_outputs_close(tmp_path):
    flat = read_lora(_known_lora(tmp_path, rank=8, conv_rank=4, std=0.1, name="flat.safetensors"))
    decayed = {}  # a realistic spectrum: rank channels of decreasing strength
    for key, tensor in flat.kohya_state_dict().items():
        if key.endswith("lora_up.weight"):
            decay = 0.4 ** torch.arange(tensor.shape[1], dtype=torch.float32)
            tensor = tensor * decay.reshape(1, -1, *([1] * (tensor.dim() - 2)))
        decayed[key] = tensor
    path = save_lora(tmp_path / "decayed.safetensors", decayed, flat.metadata, dtype="fp32")
    lora = read_lora(path)
    # same rank: the effective ΔW is unchanged
    same = parse_state_dict(resize_lora(lora, 8, conv_rank=4).tensors)
    for name, delta in effective_deltas(lora).items():
        torch.testing.assert_close(effective_deltas(same)[name], delta, atol=1e-5, rtol=1e-4)
    # lower rank: outputs stay close and the Frobenius norm kept is reported
    result = resize_lora(lora, 4, conv_rank=3)
    assert {new for _, new in result.ranks.values()} == {3, 4}
    assert all(0.9 < kept <= 1.0 + 1e-6 for kept in result.fro_retained.values())
    small = tmp_path / "small.safetensors"
    save_lora(small, result.tensors, result.metadata, dtype="fp32")
    inputs = unet_inputs(fresh_bundle("sd1"))
    base_out = unet_out(fresh_bundle("sd1"), inputs)
    full, cut = fresh_bundle("sd1"), fresh_bundle("sd1")
    apply_lora(full, path)
    apply_lora(cut, small)
    full_out, cut_out = unet_out(full, inputs), unet_out(cut, inputs)
    effect = (full_out - base_out).norm()
    assert (cut_out - full_out).norm() < 0.2 * effect
    tiny = tmp_path / "tiny.safetensors"
    save_lora(tiny, resize_lora(lora, 1, conv_rank=1).tensors, {}, dtype="fp32")
    rank1 = fresh_bundle("sd1")
    apply_lora(rank1, tiny)
    assert (unet_out(rank1, inputs) - full_out).norm() > (cut_out - full_out).norm()
    assert read_lora(small).metadata["ss_network_dim"] == "4"
    dynamic = resize_lora(lora, 8, dynamic="sv_fro", dynamic_param=0.5)
    assert max(new for _, new in dynamic.ranks.values()) < 8


def test_merge_concat_is_exact_and_svd_close(tmp_path):
    a, b = (
        read_lora(_known_lora(tmp_path, seed=1, name="a.safetensors")),
        read_lora(_known_lora(tmp_path, seed=2, name="b.safetensors")),
    )
    tensors, meta = merge_loras([(a, 0.7), (b, -0.4)])
    merged = parse_state_dict(tensors)
    da, db, dm = effective_deltas(a), effective_deltas(b), effective_deltas(merged)
    for name in da:
        torch.testing.assert_close(dm[name], 0.7 * da[name] - 0.4 * db[name], atol=1e-5, rtol=1e-4)
    assert "merged" in meta["ss_training_comment"]
    tensors, _ = merge_loras([(a, 0.7), (b, -0.4)], mode="svd", rank=4, conv_rank=4, clamp_quantile=None)
    dm = effective_deltas(parse_state_dict(tensors))
    for name in da:
        torch.testing.assert_close(dm[name], 0.7 * da[name] - 0.4 * db[name], atol=1e-4, rtol=1e-3)


def test_merge_into_model(tmp_path):
    path = _known_lora(tmp_path)
    bundle, hooked = fresh_bundle("sd1"), fresh_bundle("sd1")
    touched = merge_into_model(bundle, [(path, 0.5)])
    assert touched > 0
    apply_lora(hooked, path, 0.5)
    inputs = unet_inputs(bundle)
    torch.testing.assert_close(unet_out(bundle, inputs), unet_out(hooked, inputs), atol=1e-5, rtol=0)


def test_info_and_cli(tmp_path):
    bundle = fresh_bundle("sdxl")
    network = random_network(bundle, rank=4, conv_rank=2)
    meta = network_metadata(
        family="sdxl",
        rank=4,
        alpha=2,
        conv_rank=2,
        title="mystyle",
        extra={"ss_tag_frequency": {"5_a": {"cat": 3, "dog": 1}, "2_b": {"cat": 2}}},
    )
    path = save_lora(tmp_path / "x.safetensors", network.state_dict(), meta)
    info = lora_info(path, top_tags=1)
    assert info["family"] == "sdxl" and info["title"] == "mystyle"
    assert info["top_tags"] == [("cat", 5)]
    assert set(info["parts"]) == {"unet", "te1", "te2"} and info["ranks"] == {
        2: info["conv3x3_modules"],
        4: info["modules"] - info["conv3x3_modules"],
    }

    runner = CliRunner()
    out = runner.invoke(lora_group, ["info", str(path)])
    assert out.exit_code == 0, out.output
    assert "sdxl" in out.output and "cat (5)" in out.output
    out = runner.invoke(lora_group, ["info", "--json", str(path)])
    assert json.loads(out.output)["modules"] == len(network)

    small = tmp_path / "small.safetensors"
    out = runner.invoke(lora_group, ["resize", str(path), "-o", str(small), "--rank", "2"])
    assert out.exit_code == 0, out.output
    assert set(lora_info(small)["ranks"]) == {2}

    merged = tmp_path / "merged.safetensors"
    out = runner.invoke(lora_group, ["merge", f"{path}:0.5", str(small), "-o", str(merged)])
    assert out.exit_code == 0, out.output
    assert set(lora_info(merged)["ranks"]) == {6, 4}
    # --mode svd without --rank: kohya svd_merge_lora.py's defaults (--new_rank 4, 3x3 convs the same), said
    svd = tmp_path / "svd.safetensors"
    out = runner.invoke(lora_group, ["merge", f"{path}:0.5", str(small), "--mode", "svd", "-o", str(svd)])
    assert out.exit_code == 0, out.output
    assert "note: --mode svd without --rank: rank 4 (3x3 convs too), kohya svd_merge_lora.py's" in out.stderr
    assert lora_info(svd)["ranks"] == {4: info["modules"]}
    out = runner.invoke(lora_group, ["merge", str(path), str(small), "--mode", "svd", "--conv-rank", "3",
                                     "-o", str(svd), "--overwrite"])  # fmt: skip
    assert out.exit_code == 0 and "rank 4 (3x3 convs 3)" in out.stderr, out.output
    assert lora_info(svd)["ranks"] == {4: info["modules"] - info["conv3x3_modules"], 3: info["conv3x3_modules"]}

    tuned = tmp_path / "tuned.safetensors"
    out = runner.invoke(lora_group, ["extract", "tiny:sd1", "tiny:sd1", "-o", str(tuned), "--rank", "2"])
    assert out.exit_code != 0 and "are the same model: nothing to extract" in str(out.exception)
    assert not tuned.exists()  # a file of zero modules was written here before


def test_plugin_registration():
    import click
    from sdplugin_lora import plugin

    methods, networks = [], []
    plugin.sdcore_register_methods(methods.append)
    plugin.sdcore_register_prompt_networks(networks.append)
    assert [m.name for m in methods] == ["lora", "locon"]
    assert methods[0].load().__name__ == "LoraMethod" and methods[1].load().name == "locon"
    assert (
        networks[0].tag == "lora"
        and networks[0].directory_option == "lora_dir"
        and networks[0].default_subdir == "Lora"
    )
    assert networks[0].load().tag == "lora"
    cli = click.Group("sdcore")
    plugin.sdcore_register_commands(cli)
    assert set(cli.commands["lora"].commands) == {
        "info",
        "extract",
        "resize",
        "merge",
        "convert",
        "targets",
        "extract-embeddings",
    }


@pytest.mark.parametrize("algo", ["loha", "lokr", "dora"])
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_info_counts_every_kind_by_layer_shape(tmp_path, algo, family):
    from sdplugin_lora.blocks import block_index
    from sdplugin_lora.naming import ModuleIndex
    from sdplugin_lora.network import LoraNetwork

    bundle = fresh_bundle(family)
    targets = ModuleIndex.from_bundle(bundle).select(conv=True, text_encoder=True)
    network = LoraNetwork.create(targets, rank=4, alpha=2.0, conv_rank=2, conv_alpha=1.0, algo=algo)
    path = save_lora(
        tmp_path / f"{algo}.safetensors", network.state_dict(), network_metadata(family=family, rank=4, alpha=2)
    )
    info = lora_info(path)
    want = {"linear": 0, "conv1x1": 0, "conv3x3": 0}
    for module in network:
        base = module.base
        kind = "linear" if base.weight.dim() == 2 else ("conv1x1" if tuple(base.kernel_size) == (1, 1) else "conv3x3")
        want[kind] += 1
    assert want["conv3x3"] > 0
    assert info["shapes"] == want and info["conv3x3_modules"] == want["conv3x3"]
    assert info["modules"] == len(network)
    full = sum(1 for m in network if getattr(m, "full_matrix", False))
    assert info["full_matrix_modules"] == full and info["ranks"].get("full", 0) == full
    assert sum(info["ranks"].values()) == len(network)
    assert info["dora_modules"] == (len(network) if algo == "dora" else 0)
    assert info["algorithm"] == {"loha": "LoHa", "lokr": "LoKr", "dora": "LoCon (DoRA)"}[algo]
    blocks = {block_index(m.lora_name, family) for m in network if not m.is_conv or m.base.kernel_size == (1, 1)}
    if algo != "lokr":  # full-matrix LoKr modules have no rank to list
        assert {i for i, d in enumerate(info["block_dims"]) if d} == blocks - {-1}
    out = CliRunner().invoke(lora_group, ["info", str(path)])
    assert out.exit_code == 0, out.output
    assert f"3x3 conv: {want['conv3x3']}" in out.output
