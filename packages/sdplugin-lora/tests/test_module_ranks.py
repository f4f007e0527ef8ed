"""Per-module ranks and learning rates (``--module-ranks``, ``--module-lrs``, ``--extra-module-ranks``) and the kohya
``networks.lora_flux`` / ``networks.lora_sd3`` network_args they carry (type dims, ``in_dims`` / ``emb_dims``, block
indices, ``network_reg_dims``, ``network_reg_lrs``).

The expectations come from a re-implementation, here, of kohya's rules (sd-scripts ``networks/lora_flux.py``
``create_network``/``create_modules``/``prepare_optimizer_params_with_multiple_te_lrs``, ``networks/lora_sd3.py``),
applied to the kohya names of the tiny models' default network (which test_dit.py checks against kohya's naming)
and to the embedder names BFL/SAI give: the first ``network_reg_dims`` regex (``re.search``) gives the dim; else a
block the indices leave out gets none; else the first given type dim whose name parts the name contains; else
network_dim (an embedder: its in_dims/emb_dims value). Every module keeps network_alpha. The first
``network_reg_lrs`` regex gives the learning rate; LoRA+ multiplies its lora_up.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from lora_testutil import fresh_bundle
from sdcore.errors import ConfigError
from sdcore.train.config import load_options
from sdcore.train.method import SaveInfo
from sdplugin_lora.format import read_lora
from sdplugin_lora.method import LoraMethod, LoraOptions
from test_dit import _DitBundle, _flux_pipeline, _tiny_encoders, _weights, fresh

# --- kohya's rules, rewritten ------------------------------------------------------------------------------------

FLUX_TYPES = [("img_attn_dim", ("img_attn",)), ("txt_attn_dim", ("txt_attn",)), ("img_mlp_dim", ("img_mlp",)),
              ("txt_mlp_dim", ("txt_mlp",)), ("img_mod_dim", ("img_mod",)), ("txt_mod_dim", ("txt_mod",)),
              ("single_dim", ("single_blocks", "linear")), ("single_mod_dim", ("modulation",))]  # fmt: skip
SD3_TYPES = [("context_attn_dim", ("context_block", "attn")), ("context_mlp_dim", ("context_block", "mlp")),
             ("context_mod_dim", ("context_block", "adaLN_modulation")), ("x_attn_dim", ("x_block", "attn")),
             ("x_mlp_dim", ("x_block", "mlp")), ("x_mod_dim", ("x_block", "adaLN_modulation"))]  # fmt: skip
FLUX_EMBEDDERS = ["lora_unet_img_in", "lora_unet_txt_in"] + [
    f"lora_unet_{e}_in_{layer}_layer" for e in ("time", "vector", "guidance") for layer in ("in", "out")
]
SD3_EMBEDDERS = ["lora_unet_context_embedder", "lora_unet_x_embedder_proj", "lora_unet_final_layer_linear",
                 "lora_unet_final_layer_adaLN_modulation_1"] + [
    f"lora_unet_{e}_embedder_mlp_{i}" for e in ("t", "y") for i in (0, 2)]  # fmt: skip


def kohya_dims(names, embedders, *, dim, types, type_dims, filters, emb_dims, blocks, reg_dims=()):
    """kohya's ``create_modules``: name -> dim of every module it creates (dim 0 / None: not created)."""
    candidates = [(name, dim) for name in names]
    if emb_dims is not None:
        candidates += [(n, d) for f, d in zip(filters, emb_dims, strict=True) for n in embedders if f in n]
    out = {}
    for name, default in candidates:
        d = next((rd for regex, rd in reg_dims if re.search(regex, name)), None)
        if d is None:
            d = default
            if name.startswith("lora_unet"):
                for key, parts in types:
                    if key in type_dims and all(p in name for p in parts):
                        d = type_dims[key]
                        break
                for word, chosen in blocks.items():  # "double"/"single" (Flux) or "joint_blocks" (SD3)
                    if d and word in name and chosen is not None and int(name.split("_")[4]) not in chosen:
                        d = 0
        if d:
            out[name] = d
    return out


def kohya_lr(name, param, *, reg_lrs, default, ratio):
    """``assemble_params``: the first matching network_reg_lrs regex's rate, else the default; lora_up x ratio."""
    lr = next((lr for regex, lr in reg_lrs if re.search(regex, name)), default)
    return lr * ratio if ratio is not None and "lora_up" in param else lr


# --- helpers ------------------------------------------------------------------------------------------------------


def _flux_bundle():
    clip_l, _, t5 = _tiny_encoders()
    return _DitBundle("flux", fresh("flux"), [("text_encoder", clip_l), ("text_encoder_2", t5)])


def _sd3_bundle():
    clip_l, clip_g, t5 = _tiny_encoders()
    encoders = [("text_encoder", clip_l), ("text_encoder_2", clip_g), ("text_encoder_3", t5)]
    return _DitBundle("sd3", fresh("sd3"), encoders)


def _saved(method, bundle, path):
    lora = read_lora(method.save(bundle, SaveInfo(path=path, step=1, epoch=1, metadata={}, final=True)))
    return lora, {name: w.rank for name, w in lora.modules.items()}


def _default_names(bundle_of, tmp_path, **kohya):
    """The kohya names of the network kohya builds without per-module args (text encoder trained)."""
    method = LoraMethod(load_options(LoraOptions, None, kohya={"network_dim": 2, **kohya}, notes=[]))
    bundle = bundle_of()
    method.prepare(bundle)
    return set(_saved(method, bundle, tmp_path / "plain.safetensors")[1])


def _kohya_name(method, module_name):
    """The module's name in the kohya file (a direct DiT module's kohya alias; a fused one is named so already)."""
    target = method.index.targets.get(module_name)
    if target is None:
        return module_name
    return next((a for a in target.aliases if a.startswith("lora_unet_")), module_name)


# --- FLUX.1 --------------------------------------------------------------------------------------------------------

FLUX_ARGS = ["img_attn_dim=8", "txt_mlp_dim=0", "single_mod_dim=3", "in_dims=[3,0,0,2,5]",
             "train_double_block_indices=1", "train_single_block_indices=0",
             "network_reg_dims=double_blocks_0_img_attn_proj=6,time_in_out=7,te1.*layers_0_self_attn_q=5",
             "network_reg_lrs=img_attn=1e-5,double=2e-5,lora_te1=3e-5", "loraplus_lr_ratio=4", "verbose=True"]  # fmt: skip


def test_kohya_flux_network_args_build_kohyas_network_ranks_alphas_and_rates(tmp_path):
    kohya = {"network_module": "networks.lora_flux", "network_dim": 4, "network_alpha": 2.0, "learning_rate": 1e-4,
             "network_args": FLUX_ARGS}  # fmt: skip
    notes: list[str] = []
    method = LoraMethod(load_options(LoraOptions, None, kohya=kohya, notes=notes))
    bundle = _flux_bundle()
    groups = method.prepare(bundle)
    lora, ranks = _saved(method, bundle, tmp_path / "f.safetensors")

    names = _default_names(_flux_bundle, tmp_path, network_module="networks.lora_flux")
    want = kohya_dims(
        names, FLUX_EMBEDDERS, dim=4, types=FLUX_TYPES,
        type_dims={"img_attn_dim": 8, "txt_mlp_dim": 0, "single_mod_dim": 3},
        filters=["_img_in", "_time_in", "_vector_in", "_guidance_in", "_txt_in"], emb_dims=[3, 0, 0, 2, 5],
        blocks={"double": {1}, "single": {0}},
        reg_dims=[("double_blocks_0_img_attn_proj", 6), ("time_in_out", 7), ("te1.*layers_0_self_attn_q", 5)],
    )  # fmt: skip
    assert ranks == want
    # the cases the args were chosen for: a reg dim revives a left-out block's module and a 0 embedder
    assert want["lora_unet_double_blocks_0_img_attn_proj"] == 6 and "lora_unet_double_blocks_0_img_attn_qkv" not in want
    assert want["lora_unet_time_in_out_layer"] == 7 and "lora_unet_time_in_in_layer" not in want
    assert {lora.modules[name].alpha for name in want} == {2.0}  # every module keeps network_alpha

    reg_lrs = [("img_attn", 1e-5), ("double", 2e-5), ("lora_te1", 3e-5)]
    owner = {id(p): (_kohya_name(method, m.lora_name), n) for m in method.network for n, p in m.named_parameters()}
    seen = 0
    for group in groups:
        for param in group["params"]:
            name, pname = owner[id(param)]
            assert group["lr"] == pytest.approx(kohya_lr(name, pname, reg_lrs=reg_lrs, default=1e-4, ratio=4.0)), name
            seen += 1
    assert seen == sum(1 for m in method.network for _ in m.parameters())
    assert {round(g["lr"], 12) for g in groups} >= {1e-5, 4e-5, 8e-5, 3e-5, 1.2e-4, 1e-4, 4e-4}
    assert not any("verbose" in n for n in notes if "not supported" in n)


def test_kohya_flux_train_blocks_with_in_dims_keeps_the_embedders(tmp_path):
    """lora_flux's train_blocks limits the blocks pass only: in_dims' embedders are still created."""
    kohya = {"network_module": "networks.lora_flux", "network_dim": 2, "network_train_unet_only": True,
             "network_args": ["train_blocks=single", "in_dims=[2,0,0,0,0]", "network_reg_dims=double_blocks_0=4"]}  # fmt: skip
    method = LoraMethod(load_options(LoraOptions, None, kohya=kohya, notes=[]))
    bundle = _flux_bundle()
    method.prepare(bundle)
    ranks = _saved(method, bundle, tmp_path / "f.safetensors")[1]
    singles = {
        f"lora_unet_single_blocks_{i}_{leaf}" for i in range(2) for leaf in ("linear1", "linear2", "modulation_lin")
    }
    assert ranks == {**dict.fromkeys(singles, 2), "lora_unet_img_in": 2}  # kohya never builds double-block modules


# --- SD3 -----------------------------------------------------------------------------------------------------------


def test_kohya_sd3_network_args_build_kohyas_network(tmp_path):
    kohya = {"network_module": "networks.lora_sd3", "network_dim": 4, "network_alpha": 1.0,
             "network_args": ["context_attn_dim=8", "x_mlp_dim=0", "x_mod_dim=2", "emb_dims=[3,0,5,0,2,6]",
                              "train_block_indices=0,2", "verbose=False"]}  # fmt: skip
    method = LoraMethod(load_options(LoraOptions, None, kohya=kohya, notes=[]))
    bundle = _sd3_bundle()
    method.prepare(bundle)
    lora, ranks = _saved(method, bundle, tmp_path / "s.safetensors")
    names = _default_names(_sd3_bundle, tmp_path, network_module="networks.lora_sd3")
    want = kohya_dims(
        names, SD3_EMBEDDERS, dim=4, types=SD3_TYPES, type_dims={"context_attn_dim": 8, "x_mlp_dim": 0, "x_mod_dim": 2},
        filters=["context_embedder", "_t_embedder", "x_embedder", "y_embedder", "final_layer_adaLN_modulation",
                 "final_layer_linear"], emb_dims=[3, 0, 5, 0, 2, 6], blocks={"joint_blocks": {0, 2}},
    )  # fmt: skip
    assert ranks == want
    assert want["lora_unet_x_embedder_proj"] == 5  # SAI's patch-embedding conv, which emb_dims includes
    assert {lora.modules[name].alpha for name in want} == {1.0}


# --- a mixed-rank file in diffusers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["kohya", "diffusers"])
def test_mixed_rank_flux_file_fuses_exactly_in_diffusers(layout, tmp_path):
    """Ranks 2/3/4/5, saved in kohya's or the diffusers/PEFT layout: diffusers' load_lora_weights + fuse_lora gives
    every adapted weight base + alpha/rank * up @ down. kohya layout: diffusers splits kohya's linear1 at the real
    width and drops kohya-named embedders (its converter names them without ``transformer.``), so single blocks and
    embedders are checked in the PEFT layout (rank_pattern per module)."""
    rules = {"kohya": ("single_blocks=0,img_attn=3,txt_mlp_0=5", None),
             "diffusers": ("img_attn=3,txt_mlp_0=5,single_blocks_1_linear1=4", "_img_in=4,_txt_in=0")}[layout]  # fmt: skip
    options = LoraOptions(rank=2, alpha=1.0, save_dtype="fp32", key_layout=layout, module_ranks=rules[0],
                          extra_module_ranks=rules[1])  # fmt: skip
    method = LoraMethod(options)
    bundle = _DitBundle("flux", fresh("flux"), [])
    method.prepare(bundle)
    with torch.no_grad():
        for module in method.network:
            module.lora_up.weight.normal_(std=0.3)
    method.save(bundle, SaveInfo(path=tmp_path / "mixed.safetensors", step=1, epoch=1, metadata={}, final=True))
    ranks = {_kohya_name(method, name): module.rank for name, module in method.network.loras.items()}
    assert ranks["lora_unet_double_blocks_0_img_attn_qkv"] == 3 and ranks["lora_unet_double_blocks_1_txt_mlp_0"] == 5
    assert ranks["lora_unet_double_blocks_1_txt_mlp_2"] == 2
    if layout == "diffusers":
        assert ranks["lora_unet_img_in"] == 4 and ranks["lora_unet_single_blocks_1_linear1"] == 4
        assert "lora_unet_txt_in" not in ranks
    else:
        assert not any("single_blocks" in name or "_in" in name for name in ranks)
    model = fresh("flux")
    before = _weights(model)
    pipe = _flux_pipeline(model)
    pipe.load_lora_weights(str(tmp_path / "mixed.safetensors"))
    pipe.fuse_lora(lora_scale=1.0)
    after = _weights(model)
    adapted = set()
    for module in method.network:
        for path, rows in _parts(method, module):
            key = path + ".weight"
            adapted.add(key)
            torch.testing.assert_close(after[key], before[key] + rows, atol=1e-5, rtol=0, msg=key)
    for key, value in before.items():
        if key not in adapted:
            torch.testing.assert_close(after[key], value, atol=0, rtol=0, msg=key)
    assert ("x_embedder.weight" in adapted) == (layout == "diffusers")


def _parts(method, module):
    """(diffusers path, its rows of the module's change) for a plain or a shared-down (fused q/k/v) module."""
    delta = module.delta_weight()
    bases = getattr(module, "bases", None) or (module.base,)
    paths = {id(t.module): t.path for t in method.index.targets.values() if t.component == "transformer"}
    out, start = [], 0
    for base in bases:
        rows = int(base.weight.shape[0])
        out.append((paths[id(base)], delta[start : start + rows]))
        start += rows
    return out


# --- generic options on SD1, and the errors --------------------------------------------------------------------------


def test_module_ranks_and_lrs_on_sd1_with_block_weights():
    """On an SD1 UNet: a rule's rank wins over --block-dims; a rule's rate replaces the block-weighted one."""
    options = LoraOptions(rank=4, alpha=2.0, lr=1e-3, module_ranks="attn2_to_k=0,_attn1_=2", module_lrs="to_out=5e-4",
                          down_lr_weight="0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5")  # fmt: skip
    method = LoraMethod(options)
    groups = method.prepare(fresh_bundle("sd1"))
    names = set(method.network.loras)
    assert names and not any("attn2_to_k" in n for n in names)
    for name, module in method.network.loras.items():
        assert module.rank == (2 if "_attn1_" in name else 4), name
        assert module.alpha == 2.0
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    for name, module in method.network.loras.items():
        want = 5e-4 if "to_out" in name else (5e-4 if "down_blocks" in name else 1e-3)
        assert all(lr_of[id(p)] == pytest.approx(want) for p in module.parameters()), name


def test_kohya_per_module_args_errors_are_one_line_each_before_any_model_loads():
    kohya = {"network_module": "networks.lora_flux", "pretrained_model_name_or_path": "/nonexistent/model.safetensors",
             "network_args": ["in_dims=[4,0,0,4]", "train_double_block_indices=0-40", "train_single_block_indices=x",
                              "img_attn_dim=big", "train_block_indices=0", "emb_dims=[1,1,1,1,1,1]",
                              "network_reg_dims=img_attn", "network_reg_lrs=(=1e-4"]}  # fmt: skip
    with pytest.raises(ConfigError) as caught:
        load_options(LoraOptions, None, kohya=kohya, notes=[])
    problems = caught.value.problems
    expected = ["in_dims=[4,0,0,4]: expected 5 integer ranks", "train_double_block_indices=0-40: '0-40' is not a range",
                "train_single_block_indices=x: 'x' is not an index", "img_attn_dim=big: expected an integer rank",
                "train_block_indices is read by networks.lora_sd3 (SD3), not by networks.lora_flux",
                "emb_dims is read by networks.lora_sd3", "network_reg_dims: 'img_attn' is not regex=",
                "network_reg_lrs: '(=1e-4' is not regex="]  # fmt: skip
    for text in expected:
        assert sum(text in p for p in problems) == 1, (text, problems)
    assert len(problems) == len(expected)
    with pytest.raises(ConfigError, match=r"img_attn_dim is read by networks\.lora_flux"):
        load_options(LoraOptions, None, kohya={"network_module": "networks.lora_sd3",
                                               "network_args": ["img_attn_dim=4"]}, notes=[])  # fmt: skip


def test_module_option_errors_are_collected():
    with pytest.raises(ConfigError) as caught:
        LoraMethod(LoraOptions(algo="ia3", module_ranks="a=-1,(=2,b=x", module_lrs="c=fast",
                               extra_module_ranks="img_in=1.5")).validate()  # fmt: skip
    message = str(caught.value)
    for text in ("--module-ranks 'a=-1': must be 0 or more", "--module-ranks '(': not a regular expression",
                 "--module-ranks 'b=x': 'x' is not a whole number", "--module-lrs 'c=fast': 'fast' is not a number",
                 "--extra-module-ranks 'img_in=1.5'", "with --algo ia3: its modules have no rank"):  # fmt: skip
        assert text in message, message


def test_memory_plan_counts_the_rule_ranks_and_the_plan_says_them():
    """The pre-flight's parameter plan (shapes only, no weights) counts rank x (in + out) per module at each module's
    own rank, and its notes give the ranks and the rate rule's reach (what --dry-run prints)."""
    from sdcore.models.layout import read_layout
    from sdcore.models.parts import given_parts
    from sdcore.train.preflight import parameter_plan
    from sdplugin_lora.targets import list_targets

    options = LoraOptions(model="tiny:flux", rank=2, module_ranks="img_attn=6,single_blocks=0",
                          extra_module_ranks="_img_in=3", module_lrs="txt=1e-5")  # fmt: skip
    plan = parameter_plan(LoraMethod(options), options, read_layout("tiny:flux", given_parts(options)))
    rows = list_targets(options).rows
    want_rank = {
        row.kohya: 6 if "img_attn" in row.kohya else 3 if row.kohya == "lora_unet_img_in" else 2 for row in rows
    }
    assert not any("single_blocks" in name for name in want_rank) and "lora_unet_img_in" in want_rank
    assert {row.kohya: row.rank for row in rows} == want_rank
    assert plan.trainable == sum(want_rank[r.kohya] * (r.shape[0] + r.shape[1]) for r in rows)
    counts = {rank: list(want_rank.values()).count(rank) for rank in (6, 3, 2)}
    assert plan.notes[0] == f"LoRA network: {len(rows)} modules (rank 6 x{counts[6]}, rank 3 x1, rank 2 x{counts[2]})"
    txt = sum(1 for name in want_rank if "txt" in name)
    assert plan.notes[1] == f"--module-lrs: 'txt' -> lr 1e-05 on {txt} modules"


@pytest.mark.parametrize("conv_dim", [3, 0])
def test_kohya_sd3_emb_dims_x_embedder_takes_conv_dim(conv_dim, tmp_path):
    """SAI's x_embedder.proj is a 2x2 Conv2d: in lora_sd3's create_modules a conv that is not 1x1 takes conv_dim /
    conv_alpha when conv_dim is given (the ``elif self.conv_lora_dim is not None`` branch, before the emb_dims
    ``force_incl_conv2d`` one; sd-scripts networks/lora_sd3.py L377-L382), so emb_dims' x value only counts without
    conv_dim, and conv_dim=0 leaves x_embedder out."""
    kohya = {"network_module": "networks.lora_sd3", "network_dim": 4, "network_alpha": 1.0,
             "network_train_unet_only": True,
             "network_args": [f"conv_dim={conv_dim}", "conv_alpha=0.5", "emb_dims=[2,0,5,0,0,0]"]}  # fmt: skip
    method = LoraMethod(load_options(LoraOptions, None, kohya=kohya, notes=[]))
    bundle = _sd3_bundle()
    method.prepare(bundle)
    lora, ranks = _saved(method, bundle, tmp_path / "s.safetensors")
    assert ranks["lora_unet_context_embedder"] == 2
    if conv_dim:
        assert ranks["lora_unet_x_embedder_proj"] == conv_dim
        assert lora.modules["lora_unet_x_embedder_proj"].alpha == 0.5
    else:
        assert "lora_unet_x_embedder_proj" not in ranks


# --- what the file records ------------------------------------------------------------------------------------------

#: the per-module network_args kohya's lora_flux reads (and its train_blocks)
FLUX_PER_MODULE_KEYS = {key for key, _ in FLUX_TYPES} | {"in_dims", "train_double_block_indices",
                        "train_single_block_indices", "network_reg_dims", "network_reg_lrs", "train_blocks"}  # fmt: skip
RULE_KEYS = ("sdcore_module_ranks", "sdcore_extra_module_ranks", "sdcore_module_lrs")


def _network_args(lora):
    raw = lora.metadata.get("ss_network_args")
    return json.loads(raw) if raw not in (None, "None") else {}


def test_kohya_per_module_network_args_are_recorded_as_kohya_writes_them(tmp_path):
    """kohya's train_network.py splits each network_args item at its first ``=`` and writes the dict as JSON into
    ``ss_network_args``: the per-module keys come back with their text as given; sdcore's rules (the translation)
    are not written under sdcore keys, and ``lora resize`` keeps ss_network_args (as kohya's resize_lora.py)."""
    args = [*FLUX_ARGS, "train_blocks=all"]
    kohya = {"network_module": "networks.lora_flux", "network_dim": 4, "network_alpha": 2.0, "network_args": args}
    method = LoraMethod(load_options(LoraOptions, None, kohya=kohya, notes=[]))
    bundle = _flux_bundle()
    method.prepare(bundle)
    lora, _ = _saved(method, bundle, tmp_path / "f.safetensors")
    given = dict(item.split("=", 1) for item in args)
    recorded = _network_args(lora)
    assert {k: v for k, v in recorded.items() if k in FLUX_PER_MODULE_KEYS} == {
        k: v for k, v in given.items() if k in FLUX_PER_MODULE_KEYS
    }
    assert len(FLUX_PER_MODULE_KEYS & set(recorded)) == 9
    assert float(recorded["loraplus_lr_ratio"]) == 4.0  # the args sdcore wrote before are still there
    assert not set(RULE_KEYS) & set(lora.metadata)

    from sdplugin_lora.tools import resize_lora

    resized = resize_lora(lora, 2)
    assert json.loads(resized.metadata["ss_network_args"]) == recorded


def test_sdcore_module_rules_are_recorded_under_sdcore_keys(tmp_path):
    """--module-ranks / --extra-module-ranks / --module-lrs have no kohya network_args key: ``sdcore_<option>``."""
    options = LoraOptions(rank=2, alpha=1.0, module_ranks="img_attn=3,single_blocks_1=0",
                          extra_module_ranks="_img_in=2", module_lrs="double=1e-5")  # fmt: skip
    method = LoraMethod(options)
    bundle = _flux_bundle()
    method.prepare(bundle)
    lora, ranks = _saved(method, bundle, tmp_path / "f.safetensors")
    assert ranks["lora_unet_img_in"] == 2
    assert [lora.metadata.get(key) for key in RULE_KEYS] == ["img_attn=3,single_blocks_1=0", "_img_in=2", "double=1e-5"]
    assert not FLUX_PER_MODULE_KEYS & set(_network_args(lora))


def test_kohya_args_and_sdcore_rules_in_one_run_are_each_recorded_where_they_belong(tmp_path):
    kohya = {"network_module": "networks.lora_flux", "network_dim": 2, "network_args": ["img_attn_dim=4"]}
    options = load_options(LoraOptions, None, {"module_lrs": "txt_mlp=2e-5"}, kohya=kohya, notes=[])
    method = LoraMethod(options)
    bundle = _flux_bundle()
    method.prepare(bundle)
    lora, ranks = _saved(method, bundle, tmp_path / "f.safetensors")
    assert ranks["lora_unet_double_blocks_0_img_attn_qkv"] == 4
    assert _network_args(lora)["img_attn_dim"] == "4"
    assert lora.metadata.get("sdcore_module_lrs") == "txt_mlp=2e-5"
    assert "sdcore_module_ranks" not in lora.metadata  # the img_attn_dim rule is kohya's, recorded as kohya's


def test_kohya_network_args_option_must_be_a_json_object_of_strings():
    for text in ("in_dims=[1,0,0,0,0]", '{"img_attn_dim": 4}', "[]"):
        with pytest.raises(ConfigError, match=r"kohya_network_args .*: a JSON object of strings"):
            LoraMethod(LoraOptions(kohya_network_args=text)).validate()
    LoraMethod(LoraOptions(kohya_network_args='{"img_attn_dim": "4"}')).validate()
