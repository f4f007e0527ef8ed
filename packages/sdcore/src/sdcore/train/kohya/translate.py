"""The translation itself (:func:`translate`): aliases, composites (``output_dir`` + ``output_name`` ->
``output``, epochs, state retention), DeepSpeed and block-swap spellings, ignored and unsupported options.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import PurePath
from typing import Any

from .defaults import _T5_CACHE_ONLY_UNREAD
from .network_args import _network, _same_value
from .tables import (
    _ALIAS_OFF,
    _IGNORED_NOTES,
    _UNSUPPORTED_NOTES,
    ALIASES,
    COMPOSITE,
    IGNORED,
    UNSUPPORTED,
    Translation,
)
from .values import _OFF, OPTIMIZERS, _is_off, _text


def translate(items: dict[str, Any], fields: Iterable[str], *, where: str) -> Translation:
    """Translate kohya-named options ``items`` (raw values) for a method with option ``fields``."""
    present = set(fields)
    out = Translation()
    ignored: list[str] = []
    if items.get("dataset_config") and items.get("train_data_dir"):
        out.notes.append("dataset_config is given, so train_data_dir is ignored (as in kohya)")
        items = {k: v for k, v in items.items() if k != "train_data_dir"}
    if items.get("dataset_config") and items.get("in_json"):
        out.notes.append("dataset_config is given, so in_json is ignored (as in kohya)")
        items = {k: v for k, v in items.items() if k != "in_json"}
    elif items.get("in_json") and items.get("reg_data_dir"):
        out.notes.append("in_json is given, so reg_data_dir is ignored (as in kohya's fine-tuning dataset)")
        items = {k: v for k, v in items.items() if k != "reg_data_dir"}

    def put(target: str, value: Any, name: str) -> None:
        if target not in present:
            out.problems.append(f"{where}: {name} is not an option of this method")
            return
        if target in out.origin and out.origin[target] != name and not _same_value(out.values.get(target), value):
            out.problems.append(f"{where}: {name} and {out.origin[target]} both set {target}")
            return
        out.values[target] = value
        out.origin[target] = name

    for name, value in items.items():
        if name in present and name not in ALIASES:
            put(name, value, name)  # a method's own option that happens to share a kohya name
        elif name in ALIASES:
            alias = ALIASES[name]
            if value is None or (isinstance(value, str) and not value.strip()):
                continue  # kohya_ss writes "" for fields left empty
            if not alias.applies(present):
                if _is_off(value, _ALIAS_OFF.get(name, _OFF)):
                    continue  # kohya_ss writes every field, e.g. stop_text_encoder_training = 0 for LoRA
                which = f" (kohya's {alias.methods} option)" if alias.methods else ""
                out.problems.append(f"{where}: {name} is not an option of this method{which}")
                continue
            try:
                converted = alias.convert(value) if alias.convert is not None and value is not None else value
            except (TypeError, ValueError) as exc:
                detail = f" ({exc})" if str(exc) and "invalid literal" not in str(exc) else ""
                out.problems.append(f"{where}: {name} = {value!r} is not a valid value{detail}")
                continue
            put(alias.target, converted, name)
        elif name in IGNORED:
            if name in _IGNORED_NOTES and not _is_off(value, _OFF):
                out.notes.append(f"{name}: {_IGNORED_NOTES[name]}")
            elif not _is_off(value, _OFF):
                ignored.append(name)
        elif name in UNSUPPORTED:
            if not _is_off(value, UNSUPPORTED[name]):
                why = _UNSUPPORTED_NOTES.get(name, "it changes the result")
                out.problems.append(f"{where}: {name} = {value!r} is not supported by sdcore ({why})")
        elif name not in COMPOSITE:
            raise KeyError(name)  # callers pass kohya names only
    _composites(items, present, out, where, put)
    if ignored:
        out.notes.append("accepted without effect here: " + ", ".join(sorted(ignored)))
    return out


def _int_at_most_zero(value: Any) -> bool:
    try:
        return value is not None and not isinstance(value, bool) and int(value) <= 0
    except (TypeError, ValueError):
        return False


def _composites(
    items: dict[str, Any], present: set[str], out: Translation, where: str, put: Callable[[str, Any, str], None]
) -> None:
    # train_db.py: a negative stop_text_encoder_training trains no text encoder, 0 gives it no gradient at any step
    stop = out.values.get("stop_text_encoder_at")
    if out.origin.get("stop_text_encoder_at") == "stop_text_encoder_training" and _int_at_most_zero(stop):
        out.values.pop("stop_text_encoder_at")
        out.origin.pop("stop_text_encoder_at")
        put("train_text_encoder", False, "stop_text_encoder_training")
        out.notes.append(
            f"stop_text_encoder_training = {stop}: the text encoder does not train (as in kohya's train_db.py)"
        )
    # length: kohya's max_train_epochs overrides max_train_steps
    if items.get("max_train_epochs") and items.get("max_train_steps") and "max_steps" in out.values:
        out.values.pop("max_steps")
        out.notes.append("max_train_epochs overrides max_train_steps (as in kohya)")
    gui_epochs = items.get("epoch")
    if gui_epochs and not items.get("max_train_epochs") and not items.get("max_train_steps"):
        put("epochs", gui_epochs, "epoch")
    # the optimizer and schedule
    if _text(items.get("optimizer_type") or "").lower() in OPTIMIZERS and "optimizer" in out.values:
        implied = OPTIMIZERS[_text(items["optimizer_type"]).lower()][1]
        given = out.values.get("optimizer_args", "")
        extra = " ".join(a for a in implied.split() if a.split("=")[0] + "=" not in given)
        if extra:
            out.values["optimizer_args"] = f"{given} {extra}".strip()
    cycles = items.get("lr_scheduler_num_cycles")
    cycled = ("cosine_with_restarts", "cosine_with_min_lr", "warmup_stable_decay")
    if cycles not in (None, "", 0, 1, "1") and _text(items.get("lr_scheduler") or "").lower() not in cycled:
        out.notes.append(f"lr_scheduler_num_cycles only applies to {', '.join(cycled)}; ignored")
    scheduler = _text(items.get("lr_scheduler") or "constant").lower()
    if (
        scheduler == "constant"
        and not items.get("lr_scheduler_type")
        and not _is_off(items.get("lr_warmup_steps"), _OFF)
    ):
        out.notes.append(
            "lr_warmup_steps with the constant schedule (kohya refuses it): warming up, as constant_with_warmup"
        )
    for name, target in (("sample_every_n_steps", "sample_every"), ("sample_every_n_epochs", "sample_every_epochs")):
        if items.get(name) and not items.get("sample_prompts") and target in out.values:
            out.values.pop(target)
            out.notes.append(f"{name} without sample_prompts: no sample images (as in kohya)")
    if items.get("sample_every_n_steps") and items.get("sample_every_n_epochs") and "sample_every" in out.values:
        # sd-scripts 48d368f library/train_util.py:6381-6384 (flux/sd3_train_utils the same): epochs decide alone
        out.values.pop("sample_every")
        out.notes.append("sample_every_n_steps is ignored beside sample_every_n_epochs (as in kohya)")
    if items.get("sample_at_first") and not items.get("sample_prompts") and "sample_at_first" in out.values:
        out.values.pop("sample_at_first")  # kohya stops on the missing prompt file at its first render
        out.notes.append("sample_at_first without sample_prompts: no sample images")
    # without save_precision kohya saves a full_bf16/full_fp16 network in that dtype (save_dtype None)
    for name, dtype in (("full_fp16", "fp16"), ("full_bf16", "bf16")):
        if items.get(name) is True and not items.get("save_precision") and "save_dtype" in present:
            put("save_dtype", dtype, name)
            break
    if "base_weights_multiplier" in out.values and not _text(out.values.get("base_weights") or ""):
        out.values.pop("base_weights_multiplier")
        out.notes.append("base_weights_multiplier without base_weights has no effect (as in kohya)")
    if "network_multiplier" in out.values:
        out.notes.append(
            "network_multiplier outside a dataset TOML: kohya's training scripts have no run-wide multiplier "
            "and would ignore it; sdcore trains the whole network at it (--network-multiplier)"
        )
    for name, optimizer in (("use_8bit_adam", "adamw8bit"), ("use_lion_optimizer", "lion")):
        if items.get(name) is True:
            put("optimizer", optimizer, name)
    # retention by steps: kohya keeps the saves of the last N steps
    last_steps = items.get("save_last_n_steps")
    if last_steps:
        every = items.get("save_every_n_steps")
        if every:
            window = steps_window(int(last_steps), int(every))
            if out.origin.get("save_limit") == "save_last_n_epochs":
                # kohya prunes step and epoch saves apart (save_last_n_epochs does nothing without epoch
                # saves); sdcore keeps one count of newest results, so the windows add up
                epochs = bool(items.get("save_every_n_epochs") or items.get("save_n_epoch_ratio"))
                out.values["save_limit"] = window + (int(out.values["save_limit"]) if epochs else 0)
                out.origin["save_limit"] = "save_last_n_steps"
            else:
                put("save_limit", window, "save_last_n_steps")
        else:
            out.notes.append("save_last_n_steps without save_every_n_steps has no effect")
    end_state = not _is_off(items.get("save_state_on_train_end"), _OFF)
    if end_state and "save_state" in present and _is_off(items.get("save_state"), _OFF):  # (else on already)
        put("save_state", True, "save_state_on_train_end")  # sdcore's state: at the end and with each save
    _state_retention(items, present, out, put)
    # TI templates
    for name, template in (("use_object_template", "subject"), ("use_style_template", "style")):
        if items.get(name):
            put("template", template, name)
    # without either flag kohya's train_textual_inversion.py trains on the captions as written, its token_string
    # replaced inside them (L353-357): sdcore's filewords template, not its A1111 default style_filewords
    flagged = any(items.get(n) for n in ("use_object_template", "use_style_template"))
    if items.get("token_string") and not flagged and "template" in present:
        out.implied["template"] = "filewords"
    # kohya: --cache_text_encoder_outputs_to_disk turns --cache_text_encoder_outputs on (sdxl_train_util and the
    # SD3/Flux scripts set it, over an explicit false); sdcore keeps one store file per dataset folder
    if not _is_off(items.get("cache_text_encoder_outputs_to_disk"), _OFF) and "cache_text_encoder_outputs" in present:
        out.values["cache_text_encoder_outputs"] = True
        out.origin["cache_text_encoder_outputs"] = "cache_text_encoder_outputs_to_disk"
        put("cache_text_encoder_outputs_to_disk", True, "cache_text_encoder_outputs_to_disk")
    _deepspeed(items, out, where)
    _block_swap_spellings(items, present, out, where, put)
    if not _is_off(items.get("use_t5xxl_cache_only"), _OFF):
        if not _is_off(items.get("train_t5xxl"), _OFF):
            out.problems.append(
                f"{where}: use_t5xxl_cache_only with train_t5xxl: kohya refuses the pair (a trained T5's outputs "
                "cannot be cached)"
            )
        elif "unet_only" in present:  # LoRA's options: kohya's network scripts have no such option
            out.notes.append(f"use_t5xxl_cache_only: {_T5_CACHE_ONLY_UNREAD} (LoRA scripts); no effect")
        elif "cache_text_encoder_outputs" in present and out.values.get("cache_text_encoder_outputs") is not True:
            # kohya sd3_train.py turns cache_text_encoder_outputs on for it (over an explicit false); sdcore's
            # partial cache then keeps T5's outputs while CLIP trains (sdcore.train.cache.partial_text_encoders),
            # all of them when nothing trains (the same values: kohya's frozen CLIP runs uncached). Other
            # families' scripts do not read it: kohya_t5_cache_only, once the model's family is known
            out.values["cache_text_encoder_outputs"] = True
            out.origin["cache_text_encoder_outputs"] = "use_t5xxl_cache_only"
    if items.get("v2"):
        out.notes.append("v2: the model family is read from the model itself (see `sdcore model info`)")
    if out.values.get("no_token_padding") is True:
        out.notes.append(
            "no_token_padding: captions are padded to the batch's longest (at most 77 tokens), as its help says and "
            "train_db.py did until 2023; sd-scripts since then ignores the flag (or, 2023-2025, fails on it)"
        )
    _output(items, present, out, where, put)
    _network(items, present, out, where, put)


def _block_swap_spellings(
    items: dict[str, Any], present: set[str], out: Translation, where: str, put: Callable[[str, Any, str], None]
) -> None:
    """kohya's deprecated block-swap options and ``cpu_offload_checkpointing`` (flux_train.py,
    flux_train_network.py, sd3_train_network.py): used only while ``blocks_to_swap`` is not given, as there."""
    try:
        double = int(items.get("double_blocks_to_swap") or 0)
        single = int(items.get("single_blocks_to_swap") or 0)
    except (TypeError, ValueError):
        out.problems.append(f"{where}: double_blocks_to_swap/single_blocks_to_swap must be whole numbers")
        return
    swap = double + single // 2  # flux_train.py's conversion
    if items.get("split_mode") is True and not swap:
        swap = 18  # flux_train_network.py: "18 is safe for most cases"
    names = ", ".join(n for n in ("double_blocks_to_swap", "single_blocks_to_swap", "split_mode") if items.get(n))
    if swap and items.get("blocks_to_swap") is not None:
        out.notes.append(f"{names}: ignored because blocks_to_swap is given (as in kohya)")
    elif swap:
        put("blocks_to_swap", swap, names.split(", ")[0])
        out.notes.append(
            f"{names}: kohya's deprecated spelling, read as blocks_to_swap = {swap} (as kohya converts it)"
        )
    if items.get("cpu_offload_checkpointing") is True:
        if out.values.get("blocks_to_swap"):
            out.problems.append(
                f"{where}: cpu_offload_checkpointing with blocks_to_swap: kohya refuses the pair (choose one)"
            )
        elif "cpu_offload_checkpointing" in present:
            put("cpu_offload_checkpointing", True, "cpu_offload_checkpointing")
            if "gradient_checkpointing" in present and out.values.get("gradient_checkpointing") is not True:
                out.values["gradient_checkpointing"] = True
                out.origin.setdefault("gradient_checkpointing", "cpu_offload_checkpointing")
                out.notes.append(
                    "cpu_offload_checkpointing: gradient checkpointing is on (kohya's flux_train.py turns it on too)"
                )


def steps_window(last_n_steps: int, every: int) -> int:
    """How many step saves kohya keeps for ``save_last_n_steps``/``save_last_n_steps_state`` N with a
    save every S steps: at step t it deletes the save of step ``(t - N - 1)`` rounded down to a multiple
    of S (``train_util.get_remove_step_no``), so the saves no older than N steps stay: ``N // S + 1``
    (N=30, S=10: steps 20, 30, 40, 50 at step 50, as its comment says)."""
    return last_n_steps // every + 1


def _state_retention(
    items: dict[str, Any], present: set[str], out: Translation, put: Callable[[str, Any, str], None]
) -> None:
    """kohya's state pruning -> ``--keep-states``: with ``save_state`` each step save keeps the states of
    the last ``save_last_n_steps_state`` (else ``save_last_n_steps``) steps, each epoch save those of the
    last ``save_last_n_epochs_state`` (else ``save_last_n_epochs``) epochs; without them every state stays.
    sdcore keeps one count of newest states, so the two windows add up (0 = keep all when one is open)."""
    names = ("save_last_n_steps_state", "save_last_n_epochs_state")
    if not items.get("save_state"):
        given = [name for name in names if not _is_off(items.get(name), _OFF)]
        if given:
            out.notes.append(f"{' and '.join(given)} without save_state: no states to prune (as in kohya)")
        return
    if "keep_states" not in present:
        return
    windows: list[tuple[str, int]] = []  # (the option that decides, states kept; 0 = all)
    every_steps = items.get("save_every_n_steps")
    if every_steps:
        name = "save_last_n_steps_state" if items.get("save_last_n_steps_state") else "save_last_n_steps"
        n = items.get(name)
        windows.append((name, steps_window(int(n), int(every_steps)) if n else 0))
    if items.get("save_every_n_epochs") or items.get("save_n_epoch_ratio"):
        name = "save_last_n_epochs_state" if items.get("save_last_n_epochs_state") else "save_last_n_epochs"
        n = items.get(name)
        windows.append((name, int(n) if n else 0))
    if not windows:
        return  # no intermediate saves: the state at the end only, which sdcore writes too
    if any(keep == 0 for _, keep in windows):
        put("keep_states", 0, "save_state")
        out.notes.append("save_state without save_last_n_*: every state is kept, as in kohya (--keep-states 0)")
        return
    put("keep_states", sum(keep for _, keep in windows), windows[0][0])


def _output(
    items: dict[str, Any], present: set[str], out: Translation, where: str, put: Callable[[str, Any, str], None]
) -> None:
    keys = ("output_dir", "output_name", "save_model_as")
    if not any(items.get(k) not in (None, "") for k in keys):
        return
    directory = items.get("output_dir")
    if directory in (None, ""):
        out.problems.append(f"{where}: output_name/save_model_as need output_dir (where kohya writes the result)")
        return
    name = _text(items.get("output_name") or "last")
    fmt = _text(items.get("save_model_as") or "").lower()
    is_ti = "vectors" in present
    if fmt in ("", "safetensors") and not is_ti:
        suffix = ".safetensors"
    elif is_ti and fmt in ("", "pt", "safetensors"):
        suffix = ".pt"  # A1111's .pt is always written; safetensors is written beside it
        if fmt == "safetensors":
            put("format", "safetensors", "save_model_as")
    elif fmt in ("diffusers", "diffusers_safetensors") and "save_format" in present:
        suffix = ""
        put("save_format", "diffusers", "save_model_as")
    elif fmt in ("ckpt", "pt"):
        out.problems.append(
            f"{where}: save_model_as = {fmt!r}: sdcore writes .safetensors (pickle files are unsafe to share)"
        )
        return
    else:
        out.problems.append(f"{where}: save_model_as = {fmt!r} is not available for this method")
        return
    put("output", str(PurePath(_text(directory)) / f"{name}{suffix}"), "output_dir")


#: kohya's DeepSpeed options (deepspeed_utils.add_deepspeed_arguments) with their defaults; all but the last
#: are also keys of accelerate's ``deepspeed_config`` in an ``accelerate launch --config_file`` YAML
_DEEPSPEED_OPTIONS: dict[str, Any] = {
    "zero_stage": 2,
    "offload_optimizer_device": None,
    "offload_optimizer_nvme_path": None,
    "offload_param_device": None,
    "offload_param_nvme_path": None,
    "zero3_init_flag": False,
    "zero3_save_16bit_model": False,
    "fp16_master_weights_and_gradients": False,
}


def _deepspeed(items: dict[str, Any], out: Translation, where: str) -> None:
    """kohya's ``--deepspeed`` builds an accelerate ``DeepSpeedPlugin`` from its options; sdcore takes
    DeepSpeed from accelerate's own launch config (the one engine setup it documents), so the run is
    refused with the ``deepspeed_config`` lines that give the same engine. Without ``--deepspeed`` kohya
    ignores the other options: accepted, with a note when one is set to other than kohya's default."""
    given = {
        k: items[k]
        for k in _DEEPSPEED_OPTIONS
        if k in items and items[k] not in (None, "") and (k == "zero_stage" or not _is_off(items[k], _OFF))
    }  # zero_stage 0 is a stage
    if _is_off(items.get("deepspeed"), _OFF):
        changed = sorted(k for k, v in given.items() if not _same_value(v, _DEEPSPEED_OPTIONS[k]))
        if changed:
            out.notes.append(f"{', '.join(changed)}: DeepSpeed options without deepspeed have no effect (as in kohya)")
        return
    config = {"zero_stage": given.get("zero_stage", 2)}
    config |= {k: v for k, v in given.items() if k not in ("zero_stage", "fp16_master_weights_and_gradients")}
    config["gradient_accumulation_steps"] = items.get("gradient_accumulation_steps") or 1
    config["gradient_clipping"] = items.get("max_grad_norm", 1.0)  # kohya: DeepSpeedPlugin(gradient_clipping=...)
    lines = ", ".join(f"{k}: {str(v).lower() if isinstance(v, bool) else v}" for k, v in config.items())
    extra = (
        "; fp16_master_weights_and_gradients goes in a DeepSpeed JSON (deepspeed_config_file)"
        if "fp16_master_weights_and_gradients" in given
        else ""
    )
    out.problems.append(
        f"{where}: deepspeed: sdcore takes DeepSpeed from accelerate's launch config, not from training options: "
        f"run `accelerate launch --config_file ds.yaml -m sdcore train ...` with a ds.yaml like "
        f"docs/accelerate/deepspeed-zero2.yaml whose deepspeed_config has {{{lines}}}{extra}, and drop deepspeed "
        "and its options from this config (docs/training.md, 'Several GPUs and machines')"
    )
