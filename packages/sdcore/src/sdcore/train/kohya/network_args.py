"""``network_module`` + ``network_args``: kohya's LoRA modules and LyCORIS' algos -> sdcore's LoRA options, their
per-module and block-wise arguments (:func:`kohya_rule_options`) and GGPO.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from .tables import Translation
from .values import _OFF, _is_off, _text

#: network_args keys -> sdcore LoRA option (keys that are option names themselves pass through)
NETWORK_ARGS = {
    "conv_dim": "conv_rank",
    "conv_alpha": "conv_alpha",
    "algo": "algo",
    "dropout": "dropout",
    "rank_dropout": "rank_dropout",
    "module_dropout": "module_dropout",
    "factor": "lokr_factor",
    "train_t5xxl": "train_t5",  # lora_sd3 / lora_flux
    # LyCORIS (lycoris.kohya create_network) reads use_cp and use_conv_cp as older names of use_tucker
    "use_cp": "use_tucker",
    "use_conv_cp": "use_tucker",
}


#: LyCORIS' names of one switch, in the order its create_network reads them
_LYCORIS_TUCKER = ("use_conv_cp", "use_cp", "use_tucker")


#: kohya's plain-LoRA network modules (SD1/SD2/SDXL, FLUX.1, SD3): sdcore's --algo lora
KOHYA_LORA_MODULES = ("networks.lora", "networks.lora_flux", "networks.lora_sd3")


#: kohya's other network modules (sd-scripts 48d368f ``networks/``) -> (the option values the module means,
#: or ``None`` when sdcore refuses it; what it is / why refused and what to use instead). The values name
#: options of the method (``algo``...), never a plugin.
KOHYA_OTHER_MODULES: dict[str, tuple[dict[str, Any] | None, str]] = {
    "networks.lora_fa": (
        {"algo": "lora_fa"},
        "LoRA-FA: lora_down frozen at its init, only lora_up trains; the file is a plain LoRA (algo lora_fa)",
    ),
    "networks.dylora": (
        {"algo": "dylora"},
        "DyLoRA: nested ranks, network_args unit= rows trained per step; the file is a plain LoRA (algo dylora, "
        "dylora_unit)",
    ),
    "networks.oft": (
        {"algo": "oft"},
        "OFT: network_dim = blocks per layer, network_alpha = constraint (algo oft; oft_all_linear = "
        "enable_all_linear)",
    ),
    "networks.oft_flux": (
        {"algo": "oft"},
        "OFT on FLUX.1 (flux_train_network.py): network_dim = blocks per part, network_alpha = constraint, q/k/v "
        "and the MLP input rotated as separate parts (algo oft on a FLUX.1 model; oft_all_linear = enable_all_linear)",
    ),
    "networks.lora_lumina": (None, "a LoRA for Lumina-Image 2.0, a model family sdcore does not load"),
    "networks.lora_anima": (None, "a LoRA for Anima, a model family sdcore does not load"),
    "networks.lora_hunyuan_image": (None, "a LoRA for HunyuanImage-2.1, a model family sdcore does not load"),
    "networks.lora_diffusers": (
        None,
        "kohya's LoRA loader for diffusers pipelines, not a training network: use network_module = networks.lora",
    ),
    "networks.control_net_lllite": (
        None,
        "ControlNet-LLLite (sdxl_train_control_net_lllite.py), a control network, not a LoRA: sdcore trains no "
        "ControlNet",
    ),
    "networks.control_net_lllite_for_train": (
        None,
        "ControlNet-LLLite (sdxl_train_control_net_lllite_old.py), a control network, not a LoRA: sdcore trains "
        "no ControlNet",
    ),
}


#: network_args a kohya module in :data:`KOHYA_OTHER_MODULES` reads besides the common ones -> option
_MODULE_ARGS = {
    "networks.dylora": {"unit": "dylora_unit"},
}


#: network_args keys without an effect at these values
NETWORK_ARGS_OFF: dict[str, tuple[str, ...]] = {
    "use_scalar": ("false",),
    "constrain": ("0", "0.0"),
    "use_tucker": ("false",),
    "use_cp": ("false",),
    "train_blocks": ("all",),  # lora_flux: all blocks is the default
    "dora_wd": ("false",),
    "wd_on_output": ("false",),  # DoRA's magnitude per input channel: the layout sdcore trains and writes
    "bypass_mode": ("false", "true"),  # the same maths, another forward implementation
    "preset": ("full", "attn-mlp"),
    "verbose": ("true", "false"),  # lora_flux / lora_sd3: logs the modules and their dims, trains the same
}


#: lora_flux's ``train_blocks`` (FLUX.1/Chroma: kohya adapts only BFL's SingleStreamBlocks or DoubleStreamBlocks;
#: the text encoders are not filtered) -> the LoRA option that selects the same diffusers modules
#: (``single_transformer_blocks.N`` are the single blocks, ``transformer_blocks.N`` the double ones)
_FLUX_TRAIN_BLOCKS = {
    "single": ("layer_filter", "single_transformer_blocks."),
    "double": ("layer_exclude", "single_transformer_blocks."),
}


#: LyCORIS' built-in presets with enable_conv=False (lycoris/config.py)
_LYCORIS_LINEAR_PRESETS = ("full-lin", "attn-mlp", "attn-only", "unet-transformer-only")


#: LyCORIS network_args that are sdcore LoRA options of the same name (kohya's own modules ignore them)
_LYCORIS_ONLY_ARGS = ("decompose_both", "rank_dropout_scale", "train_norm")


_LYCORIS_ALGOS = {"lora": "locon", "locon": "locon", "loha": "loha", "lokr": "lokr", "diag-oft": "diag_oft",
                  "boft": "boft", "ia3": "ia3", "glora": "glora", "full": "full"}  # fmt: skip


#: per LyCORIS algo (sdcore's name), the options its module takes and never uses (LyCORIS f49d30d lycoris/modules):
#: a kohya run trains without them, so the translation drops them with a note (sdcore's own flags refuse them for
#: that algo, sdplugin_lora.method.LYCORIS_PLAIN). IA3Module/FullModule/ButterflyOFTModule never apply ``drop``
#: (dropout), IA3/BOFT never ``rank_drop``; GLoRA's conv branch ANDs use_tucker with "all kernels 1x1" before asking
#: for a kxk kernel, so it never builds a Tucker core, and ia3/full/diag-oft/boft build none; ia3/full/glora keep
#: the base ``apply_max_norm`` (returns None: LycorisNetwork.apply_max_norm_regularization skips the module)
_LYCORIS_UNREAD: dict[str, tuple[str, ...]] = {
    "ia3": ("dropout", "rank_dropout", "use_tucker", "scale_weight_norms"),
    "full": ("dropout", "use_tucker", "scale_weight_norms"),
    "glora": ("use_tucker", "scale_weight_norms"),
    "diag_oft": ("use_tucker",),
    "boft": ("dropout", "rank_dropout", "use_tucker"),
}


#: LyCORIS algos sdcore does not train -> what each is, and the nearest thing sdcore trains (LyCORIS f49d30d)
LYCORIS_OTHER_ALGOS = {
    "dylora": "LyCORIS' DyLoRA trains only the first b+1 blocks per step, scaled by alpha/(b+1); kohya's "
    "networks.dylora (which sdcore trains) keeps the whole rank and scales by alpha/rank * sqrt(rank/(b+unit)), "
    "another network; the nearest is network_module = networks.dylora with unit = block_size",
    "oft": "LyCORIS has no algo=oft (its OFT is diag-oft); kohya's OFT is network_module = networks.oft",
}


#: networks.lora's block-wise network_args (LyCORIS has none of them)
_BLOCK_ARGS = {"block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas", "down_lr_weight", "mid_lr_weight",
               "up_lr_weight", "block_lr_zero_threshold"}  # fmt: skip


def _network_args(items: Any, fields: set[str], out: Translation, where: str) -> dict[str, str]:
    """``["conv_dim=8", "algo=loha"]`` -> ``{"conv_dim": "8", "algo": "loha"}`` (checked)."""
    if isinstance(items, str):
        items = items.split()
    parsed: dict[str, str] = {}
    for item in items or []:
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip():
            out.problems.append(f"{where}: network_args {item!r} is not key=value")
            continue
        parsed[key.strip()] = value.strip()
    return parsed


def _same_value(a: Any, b: Any) -> bool:
    """Equal, or the same number written twice (``loraplus_lr_ratio = 16`` top-level and ``"16"`` in network_args)."""
    if a == b:
        return True
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return False


def _lycoris_str_bool(raw: str, key: str, out: Translation) -> bool:
    """LyCORIS' ``str_bool`` (lycoris/utils ``str(val).lower() != "false"``): every text but "false" is on, so
    "0", "no", "off" or an empty value turn the switch on in a kohya run too (a note says so)."""
    on = raw.lower() != "false"
    if on and raw.lower() in ("", "0", "no", "off", "none"):
        out.notes.append(
            f"network_args {key}={raw}: LyCORIS reads it with str_bool (only 'false' is off), so it is on, as in a "
            "kohya run (write false for off)"
        )
    return on


def _lycoris_as_kohya_runs_it(
    args: dict[str, str], algo: str, out: Translation, put: Callable[[str, Any, str], None]
) -> None:
    """network_args that lycoris.kohya's create_network reads differently from what they say, so that a kohya
    config trains the network a kohya run trains: ``decompose_both`` goes to the modules as the raw text (any
    non-empty value, ``False`` included, turns it on; only LoKr reads it), ``rank_dropout_scale`` is never passed,
    and ``train_norm`` is read by LyCORIS' ``str_bool`` (:func:`_lycoris_str_bool`: only "false" is off)."""
    raw_norm = args.pop("train_norm", None)
    if raw_norm is not None:
        put("train_norm", _lycoris_str_bool(raw_norm, "train_norm", out), "network_args train_norm")
    raw = args.pop("decompose_both", None)
    if raw is not None and raw != "" and algo == "lokr":
        put("decompose_both", True, "network_args decompose_both")
        if raw.lower() in ("false", "0"):
            out.notes.append(
                f"network_args decompose_both={raw}: lycoris.kohya passes the text on unparsed, so any value turns "
                "it on (the kohya_ss GUI always sends False); sdcore trains that network too (drop the key for off)"
            )
    if args.pop("rank_dropout_scale", "false").lower() != "false":
        out.notes.append(
            "network_args rank_dropout_scale: lycoris.kohya does not pass it to its modules, so it has no effect "
            "in a kohya run and none here (sdcore's --rank-dropout-scale is the LyCORIS modules' option)"
        )


def _lycoris_unread(args: dict[str, str], algo: str, out: Translation) -> None:
    """Drop (with a note) what lycoris.kohya's modules never read, so the config trains what a kohya run trains:
    per algo the options its module ignores (:data:`_LYCORIS_UNREAD`). ``network_dropout`` reaches LyCORIS as its
    ``dropout`` (train_network.py:674-676, "workaround for LyCORIS": ``net_kwargs["dropout"] = network_dropout`` when
    network_args gives no ``dropout=``; the ``neuron_dropout`` keyword it also passes is not read), so it is dropped
    only where network_args ``dropout=`` wins over it or the algo ignores dropout. Taken out of ``args`` and
    ``out.values``; off values go silently."""
    unread = _LYCORIS_UNREAD.get(algo, ())
    dropped: list[str] = []
    if out.origin.get("dropout") == "network_dropout" and ("dropout" in args or "dropout" in unread):
        value = out.values.pop("dropout")
        out.origin.pop("dropout")
        if _is_off(value, _OFF):
            pass
        elif "dropout" in args:
            out.notes.append(
                f"network_dropout {value}: kohya gives LyCORIS network_args dropout={args['dropout']} instead "
                "(train_network.py copies network_dropout into dropout only when network_args has none); dropped"
            )
        else:
            dropped.append(f"network_dropout {value}")
    for key in ("dropout", "rank_dropout", *_LYCORIS_TUCKER):
        target = NETWORK_ARGS.get(key, key)
        if key in args and target in unread:
            raw = args.pop(key)
            on = raw.lower() != "false" if target == "use_tucker" else not _is_off(raw, _OFF)
            if on:
                dropped.append(f"network_args {key}={raw}")
    if "scale_weight_norms" in unread and out.origin.get("scale_weight_norms") == "scale_weight_norms":
        value = out.values.pop("scale_weight_norms")
        out.origin.pop("scale_weight_norms")
        if not _is_off(value, _OFF):
            dropped.append(f"scale_weight_norms {value}")
    if dropped:
        out.notes.append(
            f"{', '.join(dropped)} with algo={algo}: LyCORIS' {algo} module takes and never uses "
            f"{'it' if len(dropped) == 1 else 'them'} (a kohya run trains without), so dropped here; sdcore's own "
            "flags refuse them for this algo"
        )


def _network(
    items: dict[str, Any], present: set[str], out: Translation, where: str, put: Callable[[str, Any, str], None]
) -> None:
    module = _text(items.get("network_module") or "")
    args = _network_args(items.get("network_args"), present, out, where)
    if not module and not args:
        return
    if "rank" not in present:
        out.problems.append(f"{where}: network_module/network_args are LoRA options (sdcore train lora)")
        return
    other = KOHYA_OTHER_MODULES.get(module)
    if other is not None and other[0] is None:
        out.problems.append(f"{where}: network_module {module!r} is not supported by sdcore: {other[1]}")
        return
    if module not in ("", "lycoris.kohya", *KOHYA_LORA_MODULES) and other is None:
        known = ", ".join(
            (*KOHYA_LORA_MODULES, *(m for m, (v, _) in KOHYA_OTHER_MODULES.items() if v), "lycoris.kohya")
        )
        out.problems.append(f"{where}: network_module {module!r} is not available ({known})")
        return
    lycoris = module == "lycoris.kohya"
    algo = args.pop("algo", "").lower()
    if not lycoris:  # LyCORIS' options (LoRA options of the same names): kohya's own modules ignore them
        given = sorted(key for key in _LYCORIS_ONLY_ARGS if args.pop(key, "false").lower() != "false")
        if given:
            out.problems.append(
                f"{where}: network_args {', '.join(given)} are LyCORIS options that network_module "
                f"{module or 'networks.lora'} ignores; use network_module = lycoris.kohya or drop them"
            )
    if other is not None:
        if algo:
            out.problems.append(f"{where}: network_args algo= needs network_module = lycoris.kohya (not {module})")
            return
        _other_module(module, other[0] or {}, args, present, out, where, put)
    elif lycoris:
        if algo in LYCORIS_OTHER_ALGOS:
            out.problems.append(
                f"{where}: LyCORIS algo={algo!r} is not supported by sdcore: {LYCORIS_OTHER_ALGOS[algo]}"
            )
            return
        if algo and algo not in _LYCORIS_ALGOS:
            out.problems.append(
                f"{where}: LyCORIS algo={algo!r} is not available "
                f"(lora/locon, {', '.join(a for a in _LYCORIS_ALGOS if a not in ('lora', 'locon'))})"
            )
            return
        chosen = _LYCORIS_ALGOS[algo or "lora"]
        for name in [n for n in _LYCORIS_TUCKER if n in args][1:]:
            args.pop(name)  # LyCORIS reads the first of these that is given (its values are non-empty strings)
        _lycoris_as_kohya_runs_it(args, chosen, out, put)
        for key in ("constraint", "rescaled"):  # read by diag-oft and BOFT only (rescaled with str_bool)
            raw = args.pop(key, None)
            if raw is not None and chosen in ("diag_oft", "boft"):
                put(key, _lycoris_str_bool(raw, key, out) if key == "rescaled" else raw, f"network_args {key}")
            elif raw is not None:
                out.notes.append(f"network_args {key}={raw}: LyCORIS reads it for diag-oft and boft only")
        if _lycoris_str_bool(args.pop("dora_wd", "false"), "dora_wd", out):
            if chosen != "locon":
                out.problems.append(f"{where}: dora_wd=True is available with algo=lora only")
            chosen = "dora"
        _lycoris_unread(args, chosen, out)
        if chosen == "ia3":  # LyCORIS f49d30d lycoris/wrapper.py network_module_dict has no "ia3" (since 9598468)
            out.notes.append(
                "network_args algo=ia3: lycoris.kohya's algo table has no ia3 (LyCORIS 3.x: network_module_dict), so a "
                "kohya run stops with KeyError 'ia3'; sdcore trains (IA)^3 on the preset's modules (--algo ia3)"
            )
        if args.pop("train_on_input", None) is not None:  # lycoris.kohya's create_network does not pass it on
            out.notes.append("network_args train_on_input has no effect: lycoris.kohya does not pass it to its modules")
        # LyCORIS reads preset= by its exact name (a built-in one) or as a TOML file path; sdcore's
        # --lycoris-preset selects the same modules (sdplugin_lora.presets), conv_dim defaults to network_dim
        preset = args.pop("preset", None)
        # GLoRA too: lycoris.kohya's "only train transformer" branch compares the algo's name with the
        # GLoRAModule class, which never holds, so its GLoRA adapts the preset's modules (LyCORIS f49d30d)
        put("lycoris_preset", "full" if preset is None else preset, "network_args preset")
        if preset in _LYCORIS_LINEAR_PRESETS:  # enable_conv=False: no kxk conv whatever conv_dim says
            if chosen == "locon":
                chosen = "lora"
            for key in ("conv_dim", "conv_alpha"):
                if args.pop(key, None) is not None:
                    out.notes.append(f"network_args {key} has no effect with preset={preset} (enable_conv=False)")
        else:
            if "conv_dim" not in args and "conv_rank" in present:
                out.follow["conv_rank"] = "rank"
            if "conv_alpha" not in args and "conv_alpha" in present:
                out.follow["conv_alpha"] = "alpha"
        put("algo", chosen, "network_args algo")
        blockwise = sorted(set(args) & _BLOCK_ARGS)
        if blockwise:  # networks.lora's options: lycoris.kohya reads none of them
            out.problems.append(
                f"{where}: network_args {', '.join(blockwise)} with network_module lycoris.kohya: LyCORIS ignores "
                "them (they are networks.lora's); use networks.lora or drop them"
            )
            for key in blockwise:
                args.pop(key)
        if not _is_off(items.get("scale_weight_norms"), _OFF) and chosen in ("locon", "lora"):
            out.notes.append(
                "scale_weight_norms: rescales lora_up and lora_down by sqrt(ratio) as networks.lora does (LyCORIS "
                "rescales a per-module scalar instead: the same weights after the step, slightly different updates later)"
            )
    elif algo:
        out.problems.append(f"{where}: network_args algo= needs network_module = lycoris.kohya")
        return
    _ggpo(module or "networks.lora", args, out, put)
    _record_per_module_args(module, args, put)
    blocks = args.get("train_blocks", "all").lower()
    if module == "networks.lora_flux" and blocks in _FLUX_TRAIN_BLOCKS and "in_dims" in args:
        # in_dims' embedders are outside the blocks (a layer filter would drop them): a first rank rule instead
        args["_train_blocks"] = args.pop("train_blocks").lower()
    _per_module_args(module, args, out, where, put)
    if module != "networks.lora_flux" or "train_blocks" not in args:
        pass
    elif blocks in _FLUX_TRAIN_BLOCKS:
        args.pop("train_blocks")
        target, pattern = _FLUX_TRAIN_BLOCKS[blocks]
        put(target, pattern, f"network_args train_blocks={blocks}")
    elif blocks != "all":
        out.problems.append(f"{where}: network_args train_blocks={args.pop('train_blocks')}: all, single or double")
    for key, value in args.items():
        target = NETWORK_ARGS.get(key, key)
        if key in ("dylora_unit", "oft_all_linear"):
            target = ""  # sdcore's option names, not kohya network_args (kohya's keys: unit, enable_all_linear)
        if target in present:  # includes LoRA options named as kohya names them (block_dims, use_tucker ...)
            put(target, value, f"network_args {key}")
        elif key not in NETWORK_ARGS_OFF or value.lower() not in NETWORK_ARGS_OFF[key]:
            out.problems.append(f"{where}: network_args {key}={value} is not supported by sdcore")


def _ggpo(module: str, args: dict[str, str], out: Translation, put: Callable[[str, Any, str], None]) -> None:
    """LoRA-GGPO's ``ggpo_sigma``/``ggpo_beta`` (taken out of ``args``): ``networks.lora_flux`` reads them and
    turns GGPO on only when both are given; kohya's other modules read neither (their create_network ignores
    unknown network_args), so that kohya run has no GGPO and neither has this one (a note each)."""
    given = {key: args.pop(key) for key in ("ggpo_sigma", "ggpo_beta") if key in args}
    if not given:
        return
    if module != "networks.lora_flux":
        out.notes.append(
            f"network_args {', '.join(given)}: {module} ignores them (only networks.lora_flux reads them), so GGPO "
            "is off as in that kohya run; sdcore's --ggpo-sigma/--ggpo-beta turn it on for any family"
        )
    elif len(given) == 1:
        out.notes.append(
            f"network_args {next(iter(given))} alone: networks.lora_flux turns GGPO on only with both ggpo_sigma and "
            "ggpo_beta, so it is off, as in that kohya run"
        )
    else:
        for key, value in given.items():
            put(key, value, f"network_args {key}")


#: kohya lora_flux's type dims: network_args key -> the substrings a module's kohya name must all contain
#: (create_modules' ``identifier`` list, in its order: the first given one that matches decides)
_FLUX_TYPE_DIMS = (("img_attn_dim", ("img_attn",)), ("txt_attn_dim", ("txt_attn",)), ("img_mlp_dim", ("img_mlp",)),
                   ("txt_mlp_dim", ("txt_mlp",)), ("img_mod_dim", ("img_mod",)), ("txt_mod_dim", ("txt_mod",)),
                   ("single_dim", ("single_blocks", "linear")), ("single_mod_dim", ("modulation",)))  # fmt: skip


#: kohya lora_sd3's type dims, as :data:`_FLUX_TYPE_DIMS`
_SD3_TYPE_DIMS = (("context_attn_dim", ("context_block", "attn")), ("context_mlp_dim", ("context_block", "mlp")),
                  ("context_mod_dim", ("context_block", "adaLN_modulation")), ("x_attn_dim", ("x_block", "attn")),
                  ("x_mlp_dim", ("x_block", "mlp")), ("x_mod_dim", ("x_block", "adaLN_modulation")))  # fmt: skip


#: the embedder lists: network_args key -> the name substrings kohya filters the extra modules by, in order
_EMBEDDER_DIMS = {
    "networks.lora_flux": ("in_dims", ("_img_in", "_time_in", "_vector_in", "_guidance_in", "_txt_in")),
    "networks.lora_sd3": ("emb_dims", ("context_embedder", "_t_embedder", "x_embedder", "y_embedder",
                                       "final_layer_adaLN_modulation", "final_layer_linear")),
}  # fmt: skip


#: block selections: network_args key -> (kohya module, the block name prefix, kohya's block count)
_BLOCK_SELECTIONS = {
    "train_double_block_indices": ("networks.lora_flux", "double_blocks", 19),
    "train_single_block_indices": ("networks.lora_flux", "single_blocks", 38),
    "train_block_indices": ("networks.lora_sd3", "joint_blocks", 999),  # lora_sd3 parses with a dummy 999
}


#: which kohya module reads each per-module network_args key
_PER_MODULE_KEYS = {
    **{key: "networks.lora_flux" for key, _ in _FLUX_TYPE_DIMS},
    **{key: "networks.lora_sd3" for key, _ in _SD3_TYPE_DIMS},
    **{key: module for module, (key, _) in _EMBEDDER_DIMS.items()},
    **{key: module for key, (module, _, _) in _BLOCK_SELECTIONS.items()},
    "network_reg_dims": "networks.lora_flux",
    "network_reg_lrs": "networks.lora_flux",
}


_MODULE_FAMILY = {"networks.lora_flux": "FLUX.1/Chroma", "networks.lora_sd3": "SD3"}


def _block_selection(text: str, total: int) -> list[int] | str:
    """kohya's ``parse_block_selection``: ``all``, ``none`` or empty, else comma-separated indices and
    ``a-b`` ranges (0-based, inclusive, each below ``total``) -> the selected indices, or why not."""
    if text == "all":
        return list(range(total))
    if text in ("none", ""):
        return []
    chosen: set[int] = set()
    for part in text.split(","):
        try:
            if "-" in part:
                first, last = (int(x.strip()) for x in part.split("-"))
                if not (0 <= first < total and 0 <= last < total and first <= last):
                    return f"{part.strip()!r} is not a range inside 0-{total - 1}"
                chosen.update(range(first, last + 1))
            else:
                index = int(part)
                if not 0 <= index < total:
                    return f"{index} is not inside 0-{total - 1}"
                chosen.add(index)
        except ValueError:
            return f"{part.strip()!r} is not an index or a range a-b (all, none, or e.g. 0,1,5-8)"
    return sorted(chosen)


def _kohya_pairs(text: str, integer: bool, key: str, out: Translation, where: str) -> list[tuple[str, float]]:
    """kohya lora_flux's ``parse_kv_pairs``: comma-separated ``regex=value``, split at the first ``=``, in order
    (a repeated regex keeps its first place and its last value, as a dict). kohya warns and skips a bad pair;
    here it is a problem (the run would train another network than written)."""
    import re

    pairs: dict[str, float] = {}
    for raw in text.split(","):
        pair = raw.strip()
        if not pair:
            continue
        regex, sep, value = pair.partition("=")
        try:
            if not sep:
                raise ValueError
            number = int(value.strip()) if integer else float(value.strip())
            re.compile(regex.strip())
        except (ValueError, re.error):
            want = "an integer rank" if integer else "a learning rate"
            out.problems.append(f"{where}: network_args {key}: {pair!r} is not regex={want}")
            continue
        pairs[regex.strip()] = number
    return list(pairs.items())


#: the option that keeps a kohya run's per-module network_args as given, for ``ss_network_args``
KOHYA_NETWORK_ARGS = "kohya_network_args"


def _record_per_module_args(module: str, args: dict[str, str], put: Callable[[str, Any, str], None]) -> None:
    """Keep the per-module network_args this module reads (and lora_flux's ``train_blocks``) as given, in their
    order: kohya writes every network_args it was given into the file's ``ss_network_args``, and the rules they
    become (``module_ranks``/``extra_module_ranks``/``module_lrs``, layer filters) are sdcore's, not kohya's."""
    import json

    kept = {
        key: value
        for key, value in args.items()
        if _PER_MODULE_KEYS.get(key) == module or (key == "train_blocks" and module == "networks.lora_flux")
    }
    if kept:
        put(KOHYA_NETWORK_ARGS, json.dumps(kept), "network_args")


def kohya_rule_options(args: Mapping[str, str]) -> set[str]:
    """The sdcore rule options that a run's kept per-module network_args keys set (:func:`_per_module_args`):
    ``network_reg_lrs`` -> ``module_lrs``, ``in_dims``/``emb_dims`` -> ``extra_module_ranks``, the dims and block
    indices -> ``module_ranks``; ``train_blocks=single/double`` too when ``in_dims`` is given (else it is a layer
    filter)."""
    embedders = {key for key, _ in _EMBEDDER_DIMS.values()}
    found = set()
    for key, value in args.items():
        if key == "network_reg_lrs":
            found.add("module_lrs")
        elif key in embedders:
            found.add("extra_module_ranks")
        elif key in _PER_MODULE_KEYS or (
            key == "train_blocks" and value.lower() in _FLUX_TRAIN_BLOCKS and "in_dims" in args
        ):
            found.add("module_ranks")
    return found


def _per_module_args(
    module: str, args: dict[str, str], out: Translation, where: str, put: Callable[[str, Any, str], None]
) -> None:
    """kohya lora_flux / lora_sd3's per-module network_args -> ``module_ranks`` / ``extra_module_ranks`` /
    ``module_lrs`` rules that build the same network (:mod:`sdplugin_lora.module_rules`): kohya's
    ``create_modules`` gives a module the first ``network_reg_dims`` regex's dim; else a block left out by the
    block indices gets none; else the first given type dim whose name parts it contains; else network_dim
    (an embedder: its in_dims/emb_dims value). Every module keeps network_alpha. ``verbose`` only logs."""
    import re

    found = [key for key in _PER_MODULE_KEYS if key in args]
    wrong = [key for key in found if _PER_MODULE_KEYS[key] != module]
    for key in wrong:
        reader = _PER_MODULE_KEYS[key]
        out.problems.append(
            f"{where}: network_args {key} is read by {reader} ({_MODULE_FAMILY[reader]}), not by "
            f"{module or 'networks.lora'}"
        )
        args.pop(key)
    if not set(found) - set(wrong) and "_train_blocks" not in args:
        return
    prefix = "^lora_unet_"
    ranks: list[str] = []
    leftout = args.pop("_train_blocks", None)  # lora_flux train_blocks with in_dims: first, nothing revives them
    if leftout is not None:
        ranks.append(f"{prefix}{'double' if leftout == 'single' else 'single'}_blocks_=0")
    reg = args.pop("network_reg_dims", None)
    if reg is not None:
        ranks += [f"{regex}={dim:d}" for regex, dim in _kohya_pairs(reg, True, "network_reg_dims", out, where)]
    for key, (_, name, total) in _BLOCK_SELECTIONS.items():
        text = args.pop(key, None)
        if text is None:
            continue
        chosen = _block_selection(text, total)
        if isinstance(chosen, str):
            out.problems.append(f"{where}: network_args {key}={text}: {chosen}")
        elif not chosen:
            ranks.append(rf"{prefix}{name}_\d+_=0")
        elif len(chosen) < total:
            ranks.append(rf"{prefix}{name}_(?!(?:{'|'.join(map(str, chosen))})_)\d+_=0")
    for key, parts in _FLUX_TYPE_DIMS + _SD3_TYPE_DIMS:
        text = args.pop(key, None)
        if text is None:
            continue
        try:
            dim = int(text)
        except ValueError:
            out.problems.append(f"{where}: network_args {key}={text}: expected an integer rank (0: not adapted)")
            continue
        ranks.append(prefix + "".join(f"(?=.*{re.escape(part)})" for part in parts) + f"={dim}")
    embedders = _EMBEDDER_DIMS.get(module)
    if embedders is not None and embedders[0] in args:
        key, filters = embedders
        text = args.pop(key).strip()
        inner = text[1:-1] if text.startswith("[") and text.endswith("]") else text
        try:
            dims = [int(d) for d in inner.split(",")]
        except ValueError:
            dims = []
        if len(dims) != len(filters):
            out.problems.append(
                f"{where}: network_args {key}={text}: expected {len(filters)} integer ranks "
                f"({', '.join(f.strip('_') for f in filters)})"
            )
        else:
            conv_dim = args.get("conv_dim")
            if module == "networks.lora_sd3" and conv_dim is not None and conv_dim.strip().isdigit():
                # SAI's x_embedder.proj is a 2x2 conv: lora_sd3 gives a non-1x1 conv conv_dim (and conv_alpha)
                # whenever conv_dim is set, before emb_dims' value (create_modules' conv branch comes first)
                dims[filters.index("x_embedder")] = int(conv_dim)
            put("extra_module_ranks", ",".join(f"{re.escape(f)}={d}" for f, d in zip(filters, dims, strict=True)),
                f"network_args {key}")  # fmt: skip
    lrs = args.pop("network_reg_lrs", None)
    if lrs is not None:
        pairs = _kohya_pairs(lrs, False, "network_reg_lrs", out, where)
        if pairs:
            put("module_lrs", ",".join(f"{regex}={lr!r}" for regex, lr in pairs), "network_args network_reg_lrs")
    if ranks:
        put("module_ranks", ",".join(ranks), "network_args (per-module dims)")


def _other_module(
    module: str,
    values: dict[str, Any],
    args: dict[str, str],
    present: set[str],
    out: Translation,
    where: str,
    put: Callable[[str, Any, str], None],
) -> None:
    """A :data:`KOHYA_OTHER_MODULES` module sdcore trains: its option values and its own network_args
    (taken out of ``args``; the common ones stay for :func:`_network`)."""
    for target, value in values.items():
        put(target, value, f"network_module {module}")
    for key, target in _MODULE_ARGS.get(module, {}).items():
        if key in args:
            put(target, args.pop(key), f"network_args {key}")
    if module == "networks.dylora" and args.pop("conv_alpha", None) is not None:
        out.notes.append(
            "network_args conv_alpha: kohya's networks.dylora reads it but gives conv modules network_alpha"
        )
    if module in ("networks.oft", "networks.oft_flux"):
        # kohya's oft.py / oft_flux.py: bool(value) of the network_args string, so any non-empty value turns it on
        for key in ("enable_all_linear", "enable_conv"):
            value = args.pop(key, None)
            on = value is not None and value != ""
            if on and value.strip().lower() in ("false", "0", "no"):
                out.notes.append(f"network_args {key}={value}: kohya's {module} reads any non-empty value as True")
            if key == "enable_conv" and on and module == "networks.oft_flux":
                out.notes.append("network_args enable_conv: kohya's networks.oft_flux ignores it (FLUX.1 has no convs)")
            elif key == "enable_conv" and on:
                out.problems.append(
                    f"{where}: network_args enable_conv with networks.oft: sdcore's OFT has no conv modules (kohya "
                    "rotates the ResNet/sampler convs too); drop enable_conv"
                )
            elif key == "enable_all_linear" and "oft_all_linear" in present:
                put("oft_all_linear", on, "network_args enable_all_linear")
        if "unet_only" in present and "te_only" not in out.values:
            put("unet_only", True, f"network_module {module}")
            out.notes.append(f"{module} adapts the UNet only: the text encoder is not trained (as in kohya)")
