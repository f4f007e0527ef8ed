"""kohya's defaults and meanings applied to a run written in kohya's names (:func:`kohya_defaults`, per family), and
the ``kohya_*`` notes and checks the config loader adds once the model is known.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from typing import Any

from .names import is_kohya_name
from .tables import _SAMPLE_TARGETS, _SD3_DENSITIES, KOHYA_DEFAULTS, KOHYA_FAMILY_DEFAULTS
from .values import _OFF, _is_off, _is_zero_rate, _text


def kohya_text_encoder_rates(values: dict[str, Any], family: str | None, where: str) -> tuple[list[str], list[str]]:
    """Give a ``text_encoder_lr`` list of different rates (``values["te_lr"]`` a tuple, :func:`_te_rates`) to the
    text encoders as kohya's ``train_network.py`` does for the model's family, in place; (notes, problems).

    SD3 (``networks.lora_sd3``): CLIP-L, CLIP-G, T5; two values give CLIP-G's to T5 too, values past the third
    are unused. Flux and Chroma (``networks.lora_flux``): CLIP-L, T5 (Chroma has T5 only: the second value).
    SD1/SD2/SDXL: ``networks.lora`` (and LyCORIS) take one rate, so kohya passes the first value to every
    text encoder. The T5 rate applies only when T5 trains (``train_t5xxl``)."""
    rates = values.get("te_lr")
    if not isinstance(rates, tuple):
        return [], []
    shown = "[" + ", ".join(f"{r:g}" for r in rates) + "]"
    values["te_lr"] = None
    if family is None:
        return [], [
            f"{where}: text_encoder_lr {shown}: which text encoder each rate is for depends on the model family "
            "(kohya: SD3 CLIP-L, CLIP-G, T5; Flux CLIP-L, T5; SD1/SDXL the first for all), which cannot be read "
            "before loading; set te1_lr/te2_lr/te3_lr"
        ]
    if values.get("unet_only"):
        return [f"text_encoder_lr {shown}: no effect with network_train_unet_only (as in kohya)"], []
    if family == "sd3":
        per_slot = {1: rates[0], 2: rates[1], 3: rates[2] if len(rates) > 2 else rates[1]}
        used = 3
    elif family in ("flux", "chroma"):
        per_slot, used = {1: rates[0], 3: rates[1]}, 2
    else:
        values["te_lr"] = rates[0]
        return [
            f"text_encoder_lr {shown}: kohya's networks.lora takes one text-encoder rate, so every text encoder "
            f"trains at the first, {rates[0]:g} (set te2_lr for CLIP-G's own rate)"
        ], []
    notes = [f"text_encoder_lr {shown}: the values after the first {used} are unused (as in kohya's {family} network)"]
    notes = notes if len(rates) > used else []
    if family == "chroma":
        per_slot.pop(1)  # Chroma's only text encoder is T5 (lora_te3): kohya gives it the second value
    if 3 in per_slot and not values.get("train_t5"):
        per_slot.pop(3)  # kohya trains T5 only with train_t5xxl
    given = [f"te{slot}_lr" for slot in per_slot if values.get(f"te{slot}_lr") is not None]
    if given:
        return [], [f"{where}: text_encoder_lr {shown} and {', '.join(given)} both set a text encoder's rate"]
    for slot, rate in per_slot.items():
        values[f"te{slot}_lr"] = rate
    return notes, []


def kohya_zero_rate_notes(values: Mapping[str, Any], origin: Mapping[str, str], fields: Collection[str]) -> list[str]:
    """A note for each part a kohya rate of 0 keeps frozen (:func:`_zero_is_a_value`), so that a run whose
    U-Net or text encoder does not move says why: LoRA's ``unet_lr`` / ``text_encoder_lr`` (a ``network_reg_lrs``
    rule's rate still trains its modules, as kohya's lora_flux puts those groups first), DreamBooth's
    ``learning_rate_te`` (train_db.py / fine_tune.py)."""
    notes: list[str] = []
    lora = "unet_only" in fields
    rules = " (except the modules a network_reg_lrs rule gives a rate)" if values.get("module_lrs") else ""
    why = "kohya leaves a 0-rate group out of the optimizer" if lora else "kohya trains it at rate 0"
    trains_te = not _is_off(values.get("train_text_encoder"), _OFF) and _is_off(values.get("unet_only"), _OFF)
    unet_zero = origin.get("unet_lr") == "unet_lr" and _is_zero_rate(values.get("unet_lr"))
    if lora and unet_zero and _is_off(values.get("te_only"), _OFF):
        notes.append(f"unet_lr = 0: the U-Net's LoRA modules stay untrained{rules} ({why})")
    name = origin.get("te_lr")
    if name in ("text_encoder_lr", "learning_rate_te") and _is_zero_rate(values.get("te_lr")) and trains_te:
        what = "the text encoders' LoRA modules stay untrained" + rules if lora else "the text encoder stays frozen"
        notes.append(f"{name} = 0: {what} ({why})")
    return notes


#: families whose kohya full fine-tune script (sdxl_train.py, sd3_train.py, flux_train.py) leaves the text
#: encoders frozen unless asked (train_db.py, SD1/SD2, trains the text encoder by default)
_FULL_FT_FROZEN_TE = ("sdxl", "sd3", "flux")


def family_default_targets(family: str | None = None) -> set[str]:
    """The options :data:`KOHYA_FAMILY_DEFAULTS` sets (for ``family``, or for any family)."""
    tables = [KOHYA_FAMILY_DEFAULTS.get(family, ())] if family else list(KOHYA_FAMILY_DEFAULTS.values())
    return {target for table in tables for target, _, _ in table}


def _dataset_toml_sets(data: Any, key: str) -> bool:
    """Whether a kohya dataset TOML (``dataset_config``) sets ``key`` for every subset (in ``[general]``, in each
    ``[[datasets]]`` or in each of its ``[[datasets.subsets]]``; kohya's old spelling ``caption_extention`` counts
    for ``caption_extension``): then the run-wide default never applies, and a note saying "buckets are off" would
    contradict the buckets the run shows. Unreadable files say no (the dataset reader reports them)."""
    keys = {key, "caption_extention"} if key == "caption_extension" else {key}
    if not isinstance(data, str) or not data.lower().endswith(".toml"):
        return False
    import tomllib

    try:
        with open(data, "rb") as handle:
            table = tomllib.load(handle)
    except (OSError, tomllib.TOMLDecodeError):
        return False

    def sets(table: Any) -> bool:
        return isinstance(table, dict) and bool(keys & set(table))

    if sets(table.get("general")):
        return True
    datasets = table.get("datasets")

    def every_subset(dataset: Any) -> bool:
        subsets = dataset.get("subsets") if isinstance(dataset, dict) else None
        return isinstance(subsets, list) and bool(subsets) and all(sets(s) for s in subsets)

    return isinstance(datasets, list) and bool(datasets) and all(sets(d) or every_subset(d) for d in datasets)


def kohya_defaults(
    options_fields: Iterable[str],
    given: set[str],
    given_values: Mapping[str, Any] | None = None,
    *,
    family: str | None = None,
    own_defaults: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """kohya's defaults for a run written with kohya names, for the options nobody set (``given_values``:
    the given options' values, for defaults that only matter when another option is on). ``family``
    (the model's, when known before loading) adds the defaults of kohya's script for that family.
    ``own_defaults`` (the method's option defaults) leaves out a :data:`KOHYA_DEFAULTS` entry the method has
    already (DreamBooth's learning rate is kohya's 2e-6), so that its note says nothing new."""
    present = set(options_fields)
    unset = object()
    values: dict[str, Any] = {}
    applied: list[str] = []
    for target, value, why in KOHYA_FAMILY_DEFAULTS.get(family or "", ()):
        # kohya writes min_timestep = 0 for "unset" (read as None); for SD3 0 is that default: integer timesteps
        zero_start = target == "min_timestep" and (given_values or {}).get("min_timestep", 0) is None
        if target not in present or (target in given and not zero_start):
            continue
        if target == "min_timestep" and "max_timestep" in given:
            continue  # the range is on already
        if target in _SAMPLE_TARGETS and not (given_values or {}).get("sample_prompts"):
            continue  # no samples: nothing to say
        if target == "guidance_scale" and not _is_off((given_values or {}).get("control_lora"), _OFF):
            # 3.5 is flux_train_network.py's, which trains no control LoRA: the run keeps the guidance of diffusers'
            # train_control_lora_flux.py (whose names it shares), 30 (objectives.training_guidance)
            continue
        if value is None:  # kohya's default is sdcore's own: nothing to set or say, but the general one is kept out
            values[target] = None
            continue
        if target == "timestep_sampling" and family == "sd3":
            scheme = str((given_values or {}).get("weighting_scheme", "uniform"))
            value = _SD3_DENSITIES.get(scheme, "uniform")
            why = f"sd3: the noise level is drawn with weighting_scheme's density ({value})"
        values[target] = value
        applied.append(why)
    for target, value, why in KOHYA_DEFAULTS:
        if target not in present or target in given or target in values:
            continue  # (a family's own default wins)
        if (own_defaults or {}).get(target, unset) == value:
            continue  # the method's own default is kohya's
        if target == "caption_extension" and (
            (given_values or {}).get("metadata_file") or _dataset_toml_sets((given_values or {}).get("data"), target)
        ):
            continue  # captions from a metadata file, or the dataset TOML's own extension everywhere
        if target == "lr" and "unet_lr" in given and ("te_lr" in given or (given_values or {}).get("unet_only")):
            values[target] = value  # LoRA's own rates decide; learning_rate is only the file's ss_learning_rate
            continue
        if target == "save_limit" and not any(
            (given_values or {}).get(name) for name in ("save_every", "save_every_epochs", "save_n_epoch_ratio")
        ):
            continue  # no intermediate saves: nothing to keep or remove
        if target == "train_text_encoder" and {"unet_only", "te_only"} & given:
            continue
        if target == "train_text_encoder" and not _is_off((given_values or {}).get("control_lora"), _OFF):
            # a FLUX.1 control LoRA (diffusers' train_control_lora_flux.py, which shares kohya's names) trains no
            # text encoder, and kohya has no control-LoRA script whose default would say otherwise
            continue
        if target == "train_text_encoder" and "unet_only" not in present and family in _FULL_FT_FROZEN_TE:
            continue  # full fine-tuning: train_db.py trains the text encoder, sdxl/sd3/flux_train.py do not
        if (
            target == "train_text_encoder"
            and family == "chroma"
            and _is_off((given_values or {}).get("train_t5"), _OFF)
        ):
            # flux_train_network.py trains CLIP-L unless --network_train_unet_only, and T5 only with
            # train_t5xxl: Chroma has no CLIP-L, so nothing of the text encoder trains (and its outputs cache);
            # network_args values are strings here ("False" is off)
            continue
        if target == "max_steps" and "epochs" in given:
            continue
        if target in _SAMPLE_TARGETS and not (given_values or {}).get("sample_prompts"):
            continue  # no samples: nothing to say
        if target == "buckets" and _dataset_toml_sets((given_values or {}).get("data"), "enable_bucket"):
            continue  # the dataset TOML's enable_bucket decides (kohya reads the command line's only as a fallback)
        if (
            target == "cache_latents"
            and (given_values or {}).get("inpainting_masks") != "random"
            and not any(
                str((given_values or {}).get(name, False)).strip().lower() not in ("false", "0", "", "none")
                for name in ("random_crop", "color_aug", "face_crop_aug_range")
            )
        ):  # sdcore caches by default; kohya's default matters only where caching is refused (train_inpainting too)
            continue
        values[target] = value
        if why:
            applied.append(why)
    return values, applied


def kohya_flow_semantics(values: dict[str, Any], kohya_sampling: Any, family: str | None) -> list[str]:
    """Fix ``values`` (in place) where kohya's flow options mean something else than sdcore's same
    names, for a run written in kohya's terms; the notes saying so.

    kohya's Flux script (``flux_train_utils.get_noisy_model_input_and_timesteps``) does not apply
    ``--discrete_flow_shift`` to its ``uniform`` and ``sigmoid`` samplings (sdcore's shift every
    sampling but flux_shift): the shift becomes 1 on Flux (or a family not known before loading).
    kohya's SD3 script has no ``--timestep_sampling``, so on SD3 the name keeps sdcore's meaning.
    ``kohya_sampling``: the run's ``timestep_sampling`` as written in kohya's terms (None when sdcore's
    own flag gave it).
    """
    notes = _kohya_flow_loss_weights(values, family)
    sampling = _text(kohya_sampling or "").lower()  # kohya's own name ("shift" is sdcore's sigmoid, shifted)
    if family not in (None, "flux", "chroma") or sampling not in ("uniform", "sigmoid"):
        return notes  # SD3 (and the DDPM families, which ignore the flow options) keep sdcore's meaning
    shift = values.get("discrete_flow_shift")
    try:
        number = 1.0 if shift is None else float(shift)
    except (TypeError, ValueError):
        return []  # not a number: reported with the given value's type
    values["discrete_flow_shift"] = 1.0  # and not kohya Flux's default 3.0
    if number == 1.0:
        return notes
    return [
        *notes,
        f"timestep_sampling {sampling}: kohya's Flux script does not time-shift it, so discrete_flow_shift "
        f"{shift} has no effect (use timestep_sampling shift for a shifted sigmoid)",
    ]


def kohya_v_parameterization(values: dict[str, Any], origin: Mapping[str, str], family: str | None) -> list[str]:
    """``v_parameterization`` once the model's family is known: kohya's Flux and SD3 scripts compute their own
    flow-matching target and never read it, so a kohya config that carries it (copied from an SD2/SDXL one)
    still trains there; the run keeps ``auto`` (where ``--prediction-type`` itself would be refused) and says so.
    ``values`` is changed in place. None (family unread): left as given."""
    if origin.get("prediction_type") != "v_parameterization" or values.get("prediction_type") in (None, "auto"):
        return []
    from ...errors import SdcoreError
    from ...models.family import get_family

    try:
        objective = get_family(family).objective if family else "ddpm"
    except SdcoreError:
        return []
    if objective == "ddpm":
        return []
    values["prediction_type"] = "auto"
    return [f"v_parameterization: {family} trains with flow matching; kohya's {family} script does not read it"]


#: why kohya_t5_cache_only ignores ``use_t5xxl_cache_only`` outside sd3_train.py
_T5_CACHE_ONLY_UNREAD = (
    "sd3_train.py's option, which kohya's other scripts do not define (a config file's unknown keys stay unread)"
)


def kohya_t5_cache_only(
    values: dict[str, Any], given: Mapping[str, Any], origin: Mapping[str, str], family: str | None
) -> list[str]:
    """``use_t5xxl_cache_only`` once the model's family is known: only kohya's sd3_train.py defines it (and turns
    ``cache_text_encoder_outputs`` on for it, over an explicit false), so on another family (flux_train.py,
    sdxl_train.py, train_db.py) the run keeps ``given``'s ``cache_text_encoder_outputs`` (kohya's config names as
    written); ``values`` is changed in place. None (family unread): as on SD3."""
    if origin.get("cache_text_encoder_outputs") != "use_t5xxl_cache_only":
        return []
    stated = given.get("cache_text_encoder_outputs")
    # set in the config ("" is the GUI's unset); then off, else the value would not come from use_t5xxl_cache_only
    explicit_off = stated is not None and not (isinstance(stated, str) and not stated.strip())
    if family in (None, "sd3"):
        if not explicit_off:
            return []
        return ["use_t5xxl_cache_only: turns cache_text_encoder_outputs on, as kohya's sd3_train.py does"]
    if explicit_off:
        values["cache_text_encoder_outputs"] = False
    return [f"use_t5xxl_cache_only: {_T5_CACHE_ONLY_UNREAD}; no effect on this {family} model"]


#: the text-encoder options of kohya's full fine-tune scripts (sdcore option -> kohya name), none of which
#: flux_train.py defines
_FULL_FT_TEXT_ENCODER = {"train_text_encoder": "train_text_encoder", "train_t5": "train_t5xxl", "te_lr": "learning_rate_te",
                         "te1_lr": "learning_rate_te1", "te2_lr": "learning_rate_te2", "te3_lr": "learning_rate_te3"}  # fmt: skip


def kohya_flux_train_text_encoder(
    values: dict[str, Any], origin: Mapping[str, str], cli: Collection[str], fields: Collection[str], family: str | None
) -> list[str]:
    """A kohya full fine-tune config on FLUX.1 is for flux_train.py, which defines no ``--train_text_encoder``
    (nor ``train_t5xxl`` or a text-encoder rate) and keeps CLIP-L and T5 frozen (sd-scripts 48d368f
    flux_train.py L226-227); a config file's keys the script does not define are read into its arguments and
    never used (library/train_util.py ``read_config_from_file``, L4760). So those options, given in kohya's
    names, are dropped from ``values`` (in place) with a note, and the text encoders stay frozen as in kohya;
    sdcore's own ``--train-text-encoder`` on the command line (``cli``) still trains CLIP-L there. LoRA configs
    (``unet_only`` among the ``fields``: flux_train_network.py trains CLIP-L) and other families are untouched."""
    if "unet_only" in fields or family != "flux" or "train_text_encoder" in cli:
        return []
    dropped = []
    for target, name in _FULL_FT_TEXT_ENCODER.items():
        value = values.get(target)
        if (
            origin.get(target) != name
            or target in cli
            or value is None
            or (target.startswith("train") and _is_off(value, _OFF))
        ):
            continue  # a rate of 0 is dropped too (it is kohya's "frozen", :func:`_zero_is_a_value`)
        values.pop(target, None)
        dropped.append(name)
    if not dropped:
        return []
    return [
        f"{', '.join(dropped)}: kohya's FLUX.1 fine-tune script (flux_train.py) does not define it and keeps the "
        "text encoders frozen; no effect (sdcore's --train-text-encoder trains CLIP-L)"
    ]


def kohya_text_cache_notes(
    values: Mapping[str, Any], origin: Mapping[str, str], fields: Collection[str], family: str | None
) -> list[str]:
    """A note when a kohya LoRA run asks for ``cache_text_encoder_outputs`` while its text encoder trains (kohya's
    default without ``--network_train_unet_only``) and sdcore then caches nothing: its SDXL script refuses the
    pair, SD 1.x/2.x cache nothing, a trained T5 (``train_t5xxl``) is refused; without the note the option looks
    taken and the run is slower and larger than the user planned. On SD3/FLUX.1 with CLIP alone training there is
    none: sdcore caches T5's outputs as kohya does (:func:`sdcore.train.cache.partial_text_encoders`)."""
    asked = origin.get("cache_text_encoder_outputs") in (
        "cache_text_encoder_outputs",
        "cache_text_encoder_outputs_to_disk",
        "use_t5xxl_cache_only",
    )
    if not asked or "unet_only" not in fields:  # LoRA's options (DreamBooth's text encoder is frozen by default)
        return []
    trains = not _is_off(values.get("train_text_encoder"), _OFF) and _is_off(values.get("unet_only"), _OFF)
    if not trains:
        return []
    if family in ("flux", "sd3") and _is_off(values.get("train_t5"), _OFF):
        return []  # T5's outputs cached while CLIP trains, as kohya's scripts do (partial caching)
    peer = {
        "chroma": "kohya refuses caching with train_t5xxl",
        "sdxl": "kohya's sdxl_train_network.py refuses the pair",
        # train_network.py's cache_text_encoder_outputs_if_needed only moves the encoders: no cache on SD 1.x/2.x
        "sd1": "kohya's train_network.py caches nothing on SD 1.x/2.x",
        "sd2": "kohya's train_network.py caches nothing on SD 1.x/2.x",
    }.get(family or "", "kohya needs --network_train_unet_only for it")
    if family in ("flux", "sd3") and not _is_off(values.get("train_t5"), _OFF):
        peer = "kohya refuses caching with train_t5xxl"  # flux_train_network.py / sd3_train_network.py
    return [
        "cache_text_encoder_outputs: the text encoder trains (kohya's default without --network_train_unet_only), "
        f"so sdcore encodes the captions at every step and caches nothing ({peer}); add --network_train_unet_only "
        "to cache them"
    ]


def kohya_text_encoder_storage(
    values: dict[str, Any], given: Mapping[str, Any], fields: Collection[str], family: str | None
) -> list[str]:
    """kohya's ``--fp8_base`` without ``--fp8_base_unet`` also stores the text encoders that run during training in
    float8 (train_network.py: ``te_weight_dtype``, each script's ``prepare_text_encoder_fp8`` keeping the embeddings,
    and T5's norms, in the compute dtype). Encoders whose outputs are cached are not: kohya caches them from the
    compute dtype (flux/sd3_train_network.py: CLIP "always not fp8", T5 as its file is) and leaves them on the CPU,
    where the cast is skipped. So ``values`` gets ``text_encoder_weights_dtype`` fp8 for the encoders that run
    uncached (all without the cache; on SD3/FLUX.1 the training CLIPs beside a cached T5), in place.

    Only kohya's network scripts read ``te_weight_dtype`` (train_network.py and its subclasses; sd-scripts'
    fine-tune and textual-inversion scripts never read ``fp8_base``), so only LoRA options (``unet_only`` among
    the ``fields``) get it. SD 1.x/2.x cache nothing (train_network.py's ``cache_text_encoder_outputs_if_needed``
    only moves the encoders to the device, where they are cast), so their encoders are fp8 with the cache too."""
    if _is_off(given.get("fp8_base"), _OFF) or not _is_off(given.get("fp8_base_unet"), _OFF):
        return []
    if "text_encoder_weights_dtype" not in fields or str(values.get("text_encoder_weights_dtype") or "none") != "none":
        return []
    if "unet_only" not in fields:
        return []
    cached = values.get("cache_text_encoder_outputs") is True and family not in ("sd1", "sd2")
    # the text encoder trains unless network_train_unet_only (kohya's default, put in values by kohya_defaults
    # where kohya trains one: not on Chroma, whose CLIP-L is absent and T5 trains only with train_t5xxl)
    asked = not _is_off(values.get("train_text_encoder"), _OFF) or not _is_off(values.get("te_only"), _OFF)
    trains = asked and _is_off(values.get("unet_only"), _OFF)
    from ...models.family import get_family

    specs = get_family(family).text_encoders if family else ()
    partial = trains and family in ("flux", "sd3") and _is_off(values.get("train_t5"), _OFF)
    if not cached or (trains and not partial):
        chosen = ["fp8"]  # every encoder runs at each step (kohya caches nothing while one trains, but T5's)
    elif partial and specs:
        chosen = ["none" if spec.kind.startswith("t5") else "fp8" for spec in specs]
    else:
        return [
            "fp8_base with cache_text_encoder_outputs: kohya caches the text encoders' outputs in the compute dtype "
            "(a T5-XXL file already in fp8 as it is), so they stay unconverted here too"
        ]
    values["text_encoder_weights_dtype"] = ",".join(chosen)
    return [
        f"fp8_base: the text encoders that run during training are stored in fp8 too, as kohya does "
        f"(--text-encoder-weights-dtype {values['text_encoder_weights_dtype']}: their Linear weights; kohya also "
        "rounds their norms and biases to fp8, sdcore keeps those)"
    ]


#: train_network.py's SNR loss weightings, which kohya's SD3/Flux/Chroma LoRA scripts skip (their
#: ``post_process_loss`` returns the loss as it is) -> the value that is off
_DDPM_LOSS_WEIGHTS = {"min_snr_gamma": None, "debiased_estimation_loss": False,
                      "scale_v_pred_loss_like_noise_pred": False, "v_pred_like_loss": 0.0}  # fmt: skip


def _kohya_flow_loss_weights(values: dict[str, Any], family: str | None) -> list[str]:
    """A kohya run on a flow family trains without the SNR weightings kohya's SD3/Flux scripts skip, so a
    kohya config that sets them (the kohya_ss GUI's own Flux preset has min_snr_gamma 7) trains as it does in
    kohya instead of being refused; sdcore's own names on such a model stay refused by the pre-flight."""
    if family not in ("flux", "chroma", "sd3"):
        return []
    dropped = []
    for name, off in _DDPM_LOSS_WEIGHTS.items():
        value = values.get(name)
        if value is not None and str(value).strip().lower() not in ("", "0", "0.0", "false", "none"):
            values[name] = off
            dropped.append(f"{name} {value}")
    if not dropped:
        return []
    return [f"{', '.join(dropped)}: kohya's {family} script does not apply SNR loss weights (flow matching); ignored"]


def model_type_problems(kohya: Mapping[str, Any], family: str | None, where: str) -> list[str]:
    """flux_train_network.py's ``model_type`` against the model's family (read from its file; sdcore needs no
    model_type), and the Chroma settings kohya's script asserts or documents that sdcore cannot honour otherwise:
    ``guidance_scale`` must be 0 (the approximator's guidance input is 0 in sdcore, as in diffusers)."""
    problems: list[str] = []
    model_type = _text(kohya.get("model_type") or "").lower()
    if model_type == "chroma" and family not in (None, "chroma"):
        problems.append(f"{where}: model_type = 'chroma' but the model is a {family} model (use model_type = 'flux')")
    if model_type == "flux" and family == "chroma":
        problems.append(f"{where}: model_type = 'flux' but the model is Chroma (use model_type = 'chroma')")
    if family == "chroma" and kohya.get("guidance_scale") not in (None, ""):
        try:
            value = float(kohya["guidance_scale"])
        except (TypeError, ValueError):
            value = 0.0  # not a number: reported with the option's type
        if value != 0.0:
            problems.append(
                f"{where}: guidance_scale {kohya['guidance_scale']}: Chroma is trained with guidance 0 (kohya's docs "
                "require --guidance_scale 0.0; sdcore's Chroma has no guidance input): set 0.0 or drop it"
            )
    return problems


def written_in_kohya_terms(names: Iterable[str], fields: Iterable[str]) -> bool:
    """True when any of ``names`` is a kohya spelling that is not also an sdcore option name."""
    present = set(fields)
    return any(is_kohya_name(n) and n not in present for n in names)
