"""Help for names sdcore does not know: the nearest kohya name (:func:`nearest_name`, :func:`nearest`), other tools'
names (:data:`NAME_HINTS`, :func:`name_hint`), and the "kohya names" rows of ``--help`` (:func:`help_rows`).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass

from .names import _composite_applies
from .network_args import NETWORK_ARGS
from .tables import ALIASES, COMPOSITE, IGNORED


def help_rows(fields: Iterable[str]) -> list[tuple[str, str]]:
    """(kohya flag, meaning) rows for the "kohya names" section of ``--help``."""
    present = set(fields)
    rows = []
    for name, alias in ALIASES.items():
        if alias.applies(present) and name != alias.target:
            rows.append((f"--{name}", f"--{alias.target.replace('_', '-')}"))
    rows += [(f"--{n}", text) for n, text in COMPOSITE.items() if _composite_applies(n, present)]
    rows.append(("--config_file FILE", "--config FILE (kohya training TOML, flat or in sections)"))
    return rows


def help_epilog() -> str:
    ignored = ", ".join(sorted(IGNORED))
    return (
        "Every option above also works in kohya's spelling with underscores (--lr_scheduler, --noise_offset). "
        f"Accepted with a note (no effect on the result here): {ignored}. Options that would change the "
        "result and sdcore does not implement are accepted at their 'off' value and refused otherwise. "
        "A run written with kohya's names gets kohya's defaults where they decide what trains "
        "(dim 4, alpha 1, text encoder trained, no buckets, 1600 steps, learning rate 2e-6, .caption captions "
        "without a .txt fallback, float32 saves, every intermediate save kept, no resumable state; on Flux and SD3 "
        "its scripts' "
        "timestep_sampling, model_prediction_type, discrete_flow_shift and guidance_scale), with a note."
    )


def nearest_name(name: str, fields: Iterable[str]) -> str | None:
    """The sdcore option a mistyped or kohya-spelled ``name`` most likely means (or ``None``).

    ``network-dim``/``network_dim`` -> ``rank``; ``lrr`` -> ``lr``; ``network_dimm`` -> ``rank``
    (via kohya's ``network_dim``). A kohya name returns its sdcore target when this method has it.
    """
    present = list(fields)
    key = name.strip().lstrip("-").replace("-", "_")
    if key in present:
        return key
    if NETWORK_ARGS.get(key) in present:  # a network_args key given as an option: --conv_dim
        return NETWORK_ARGS[key]
    kohya = [n for n in [*ALIASES, *COMPOSITE] if n not in present]
    match = difflib.get_close_matches(key, [*present, *kohya], n=1, cutoff=0.6)
    if not match:
        return None
    alias = ALIASES.get(match[0])
    if match[0] not in present and alias is not None and alias.applies(present):
        return alias.target
    return match[0]


@dataclass(frozen=True)
class NameHint:
    """A name another tool uses that sdcore does not take (typing it stays an error: a near name must not run
    with a different meaning), with what to write instead, said by the unknown-option error of ``sdcore train``
    and the unknown-key error of a config file (:func:`name_hint`)."""

    #: whose name it is, for the message ("A1111's save_embedding_every"); "" where ``note`` says it all
    source: str = ""
    #: the sdcore option that means the same; "" where none does
    target: str = ""
    #: what else to know: how it differs, or why no option is needed
    note: str = ""
    #: the methods that have ``target`` where not all do ("ti, apt"), for the message on the others
    methods: str = ""


def _a1111(name: str, target: str = "", note: str = "", methods: str = "") -> NameHint:
    return NameHint(f"A1111's {name}", target, note, methods)


_DOCS_ONLY = (
    "kohya's sdxl_train_network.py has no such argument (its docs show one); give text_encoder_lr two values, "
    "one per text encoder (--text_encoder_lr 1e-5 1e-5)"
)


_FAMILY_FLAG = (
    "not needed: sdcore reads the model family (SD1, SD2, SDXL, SD3, FLUX.1 ...) from the model itself; kohya "
    "picks it by script (sdxl_train_network.py) and some tools by a flag"
)


#: the family flags of other tools (kohya's extract_lora_from_models.py --sdxl, some scripts' --sd3/--flux); sdcore
#: reads the family from the model, so none is an option (kohya's --v2 is accepted by the training commands)
FAMILY_FLAGS = ("sdxl", "sd3", "flux")


def family_flag_hint(option: str) -> str | None:
    """`` (not needed: ...)`` for ``--sdxl``, ``--sd3``, ``--flux`` (and kohya's ``--v2``, which only the training
    commands accept) on a command that has no such option, e.g. ``sdcore generate``; ``None`` for any other name."""
    name = option.strip().lstrip("-").replace("-", "_")
    return f" ({_FAMILY_FLAG})" if name in (*FAMILY_FLAGS, "v2") else None


_A1111_SCHEDULE = "A1111's 'rate:step, rate' schedule strings are --lr-schedule of `sdcore train ti, hn, apt`"


_HN_DROPOUT = "dropout is --dropout of `sdcore train hn`, the structure itself (e.g. 0,0.1,0)"


_A1111_SIZE = (
    "A1111 resizes each image to W x H; sdcore builds aspect-ratio buckets of that area, or crops with --no-buckets"
)


_DIFFUSERS_CAPTIONS = (
    "sdcore captions each image by its caption file (.txt) or, without one, by its folder's name, kohya's "
    "N_<prompt> (10_sks dog, inside --data); or run the diffusers command as written: sdcore train lora --config "
    "train.sh"
)


#: other tools' names that are no option of sdcore, by the name as typed with underscores: the unknown-option hint
#: says what they are here. Keys are never kohya names or sdcore options (those are accepted as they are), and a
#: target only where the meaning is the same; the A1111 names are the Train tab's fields (modules/ui.py and
#: textual_inversion.train_embedding / hypernetwork.train_hypernetwork's parameters).
NAME_HINTS: dict[str, NameHint] = {
    # names kohya's docs show that its argparse does not define (docs/sdxl_train_network.md's SDXL LoRA example):
    # kohya itself stops with "unrecognized arguments"
    "text_encoder_lr1": NameHint(note=_DOCS_ONLY),
    "text_encoder_lr2": NameHint(note=_DOCS_ONLY),
    # a model family flag (kohya's tools: extract_lora_from_models.py --sdxl; some scripts --sdxl/--flux; kohya's own
    # --v2 and --v_parameterization are accepted, see COMPOSITE and ALIASES): no flag needed
    **dict.fromkeys(FAMILY_FLAGS, NameHint(note=_FAMILY_FLAG)),
    # A1111's Train tab (Textual Inversion, Hypernetwork)
    "learn_rate": _a1111("learn_rate", "lr", _A1111_SCHEDULE),
    "embedding_learn_rate": _a1111("embedding_learn_rate", "lr", _A1111_SCHEDULE),
    "hypernetwork_learn_rate": _a1111("hypernetwork_learn_rate", "lr", _A1111_SCHEDULE),
    "gradient_step": _a1111("gradient_step", "gradient_accumulation"),
    "data_root": _a1111("data_root", "data"),
    "dataset_directory": _a1111("dataset_directory", "data"),
    "log_directory": _a1111(
        "log_directory",
        note="no single equivalent: A1111 writes its saves, previews and loss log there; sdcore writes the saves "
        "(--save-every) and the previews beside --output, and TensorBoard logs to --log-dir",
    ),
    "training_width": _a1111("training_width", "resolution", f"--resolution W,H; {_A1111_SIZE}"),
    "training_height": _a1111("training_height", "resolution", f"--resolution W,H; {_A1111_SIZE}"),
    "varsize": _a1111(
        "varsize",
        note="no equivalent: A1111 then trains each image at its own size; sdcore resizes images to aspect-ratio "
        "buckets (--buckets, the default)",
    ),
    "steps": _a1111("steps", "max_steps"),
    "clip_grad_mode": _a1111(
        "clip_grad_mode", "grad_clip_method", "norm or value; A1111's 'disabled' (its default) is --max-grad-norm 0"
    ),
    "clip_grad_value": _a1111(
        "clip_grad_value", "max_grad_norm", "one number: A1111's 'value:step' schedule strings are not taken"
    ),
    "shuffle_tags": _a1111("shuffle_tags", "shuffle_caption"),
    "tag_drop_out": _a1111("tag_drop_out", "tag_dropout"),
    "latent_sampling_method": _a1111("latent_sampling_method", "latent_sampling", methods="ti, apt"),
    "use_weight": _a1111(
        "use_weight",
        "alpha_mask",
        "kohya's alpha weighting, the same within an image whose alpha reaches 0; A1111 also rescales each "
        "image's weights to a mean of 1 (alpha - its minimum, divided by the mean of that), sdcore uses alpha/255",
    ),
    "create_image_every": _a1111(
        "create_image_every", "sample_every", "it renders --sample-prompts (A1111 the batch's first prompt)"
    ),
    # A1111's Settings > Training, read by the Train tab's dataset (modules/textual_inversion/dataset.py)
    "dataset_filename_word_regex": _a1111(
        "dataset_filename_word_regex", "filename_word_regex", "with --filename-captions a1111, as A1111 applies it"
    ),
    "dataset_filename_join_string": _a1111("dataset_filename_join_string", "filename_join_string"),
    "save_embedding_every": _a1111("save_embedding_every", "save_every"),
    "save_hypernetwork_every": _a1111("save_hypernetwork_every", "save_every"),
    "template_file": _a1111("template_file", "template", methods="ti, hn, apt"),
    "template_filename": _a1111("template_filename", "template", methods="ti, hn, apt"),
    "initialization_text": _a1111("initialization_text", "init_text", methods="ti, apt"),
    "nvpt": _a1111("nvpt", "vectors", methods="ti, apt"),
    "save_image_with_stored_embedding": _a1111(
        "save_image_with_stored_embedding",
        note="no equivalent: training writes no preview PNG carrying the embedding; the .pt (and --format's copy) "
        "is the embedding, and sdplugin_ti.formats.save_embedding(emb, 'x.png', preview=image) writes such a PNG",
    ),
    "preview_from_txt2img": _a1111(
        "preview_from_txt2img",
        note="no equivalent: write the preview's prompt and settings as a --sample-prompts line (--n negative, --w "
        "--h size, --s steps, --l CFG, --d seed, --ss sampler), rendered every --sample-every steps",
    ),
    # A1111's Create hypernetwork fields
    "add_layer_norm": _a1111("add_layer_norm", "layer_norm", methods="hn"),
    "activation_func": _a1111("activation_func", "activation", methods="hn"),
    "weight_init": _a1111("weight_init", "init", "A1111's names (Normal, XavierUniform ...) are accepted", "hn"),
    # no target: LoRA's --dropout is another thing (a dropout of its down output)
    "dropout_structure": _a1111("dropout_structure", note=f"the hypernetwork's {_HN_DROPOUT}"),
    "use_dropout": _a1111("use_dropout", note=f"a checkbox in A1111; the hypernetwork's {_HN_DROPOUT}"),
    # diffusers' example scripts (train_dreambooth_lora*.py), typed on sdcore's command line; the whole command
    # runs as it is written with --config train.sh (sdcore.train.diffusers_script)
    "instance_data_dir": NameHint("diffusers' instance_data_dir", "data", _DIFFUSERS_CAPTIONS),
    "instance_prompt": NameHint("diffusers' instance_prompt", "instance_prompt", _DIFFUSERS_CAPTIONS, "dreambooth"),
    "class_data_dir": NameHint("diffusers' class_data_dir", "reg_data", _DIFFUSERS_CAPTIONS),
    "class_prompt": NameHint("diffusers' class_prompt", "class_prompt", _DIFFUSERS_CAPTIONS, "dreambooth"),
    "checkpointing_steps": NameHint("diffusers' checkpointing_steps", "save_every"),
    "validation_prompt": NameHint(
        "diffusers' validation_prompt", "sample_prompts", "a file of prompts, one a line, rendered every --sample-every"
    ),
    # short forms people type
    "dim": NameHint("kohya's network_dim", "rank", methods="lora, locon"),
    "images": NameHint(target="data"),
}


def name_hint(name: str, fields: Collection[str], flag: Callable[[str], str]) -> str | None:
    """What to say after "No such option: NAME" (or an unknown config key) when ``name`` is in
    :data:`NAME_HINTS`: `` (did you mean --save-every (A1111's save_embedding_every)?)``, the method that has the
    option, or why there is none. ``fields`` are the method's options; ``flag`` writes an option's name as the
    user would type it (``--save-every`` on the command line, ``'save_every'`` in a config). ``None``: not a
    name of the table (or its target is in none of the methods named), so the nearest name is the hint."""
    key = name.strip().lstrip("-").lower().replace("-", "_")  # users type other tools' names in any case
    hint = NAME_HINTS.get(key)
    if hint is None:
        return None
    source = f" ({hint.source})" if hint.source else ""
    note = f" {hint.note}" if hint.note else ""
    if hint.target and hint.target in fields:
        return f" (did you mean {flag(hint.target)}{source}?{note})"
    if hint.target and hint.methods:
        # a name that is those methods' own option (diffusers' instance_prompt, DreamBooth's too): what it is here
        here = f"; with this method {hint.note}" if hint.target == key and hint.note else ""
        return f" ({hint.source} is {flag(hint.target)} of `sdcore train {hint.methods}`, not of this method{here})"
    if hint.target:
        return None
    return f" ({hint.source}: {hint.note})" if hint.source else f" ({hint.note})"


def nearest(name: str, fields: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for an unknown config key (empty when nothing is close)."""
    present = list(fields)
    hinted = name_hint(name, present, repr)
    if hinted is not None:
        return hinted
    found = nearest_name(name, present)
    if found is None:
        return ""
    if found in present:
        return f" (did you mean {found!r}?)"
    return f" (did you mean {found!r}, kohya's name for an option of another method?)"
