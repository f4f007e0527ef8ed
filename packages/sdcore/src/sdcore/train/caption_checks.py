"""Pre-flight checks of kohya's caption options (token warm-up, weighted captions).

Kept apart from :mod:`.preflight` so that the rules about captions sit in one place: bad values
are refused before any model loads, and ``--weighted-captions`` is refused where kohya refuses it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .method import TrainingMethod
    from .options import TrainOptions


def caption_option_problems(options: TrainOptions, method: TrainingMethod[Any] | None = None) -> list[str]:
    """Bad values of the caption options, and ``--weighted-captions`` with a method that encodes
    captions its own way (Textual Inversion: kohya's ``train_textual_inversion.py`` has no
    ``--weighted_captions`` either)."""
    o = options
    problems: list[str] = []
    if o.token_warmup_min < 0:
        problems.append(f"--token-warmup-min must be 0 or more, got {o.token_warmup_min}")
    if not math.isfinite(o.token_warmup_step) or o.token_warmup_step < 0:
        problems.append(
            f"--token-warmup-step must be 0 (off), a fraction of the run below 1 or a step count, got {o.token_warmup_step}"
        )
    if o.keep_tokens_separator is not None and o.keep_tokens_separator and not o.keep_tokens_separator.strip():
        problems.append("--keep-tokens-separator is only whitespace: it would split every caption (use e.g. '|||')")
    from ..data.dataset import filename_word_regex_problem

    regex_problem = filename_word_regex_problem(o.filename_word_regex)  # the words of file-name captions (A1111)
    if regex_problem:
        problems.append(regex_problem)
    if not o.caption_separator:
        problems.append("--caption-separator is empty: give the text between tags (kohya's default is ',')")
    # the family's encoding reads the emphasis (DreamBooth's, padded, too): one rule, the method's declaration
    if o.weighted_captions and method is not None and not method.encodes_as_family():
        problems.append(
            f"--weighted-captions: method {method.name!r} encodes captions its own way and does not read "
            "their emphasis (kohya's textual inversion script has no --weighted_captions either)"
        )
    return problems


def caption_family_problems(options: TrainOptions, family_name: str) -> list[str]:
    """``--weighted-captions`` only where kohya supports it: SD1/SD2/SDXL (kohya's SD3 and FLUX.1
    tokenizers have no weighted tokenization); ``--apply-t5-attn-mask`` only on a family with a T5 encoder
    (elsewhere it would do nothing, in silence)."""
    if not options.weighted_captions and not options.apply_t5_attn_mask:
        return []
    from ..errors import SdcoreError
    from ..models.family import get_family

    try:
        family = get_family(family_name)
    except SdcoreError as exc:
        return [str(exc)]
    problems = []
    if options.weighted_captions and family.denoiser != "unet":
        problems.append(
            f"--weighted-captions: {family.label} is not supported (kohya's SD3/FLUX.1 scripts cannot weigh "
            "caption tokens); it works with SD1, SD2 and SDXL"
        )
    if options.apply_t5_attn_mask and not any(encoder.kind.startswith("t5") for encoder in family.text_encoders):
        problems.append(
            f"--apply-t5-attn-mask masks the padding of a T5-XXL encoder (SD3, FLUX.1, Chroma); {family.label} "
            "has none: drop it"
        )
    return problems


def filename_caption_notes(index: Any) -> list[str]:
    """A hint for datasets made in A1111's Train tab: images with no caption file (and no class tokens, which
    caption them instead) that A1111 would have captioned from their file names (``00001-0-a circle.png`` ->
    ``a circle``) but that train uncaptioned here unless ``--filename-captions a1111`` is given.

    Nothing when the names give no text (``00012.png``: A1111 trains those uncaptioned too), when a subset
    has class tokens (kohya's ``10_mychar`` folders: their numbered files are captioned by the folder), or when
    ``--filename-captions`` is already on. The example is the caption A1111 would make, with the subset's
    ``--filename-word-regex`` when it has one; that regex alone, without ``--filename-captions``, does nothing and
    gets a note of its own. The same words in the run's pre-flight and ``sdcore data check``."""
    from ..data.captions import filename_caption, word_regex_problem

    def a1111_caption(entry: Any) -> str:
        regex = getattr(entry.subset, "filename_word_regex", "")
        if word_regex_problem(regex):  # reported as a problem: the plain rule here
            regex = ""
        join = getattr(entry.subset, "filename_join_string", " ")
        return filename_caption(entry.path, "a1111", word_regex=regex, join_string=join).strip()

    notes = [
        f"filename_word_regex {regex!r} has no effect: it only filters the captions --filename-captions makes "
        "from file names; give "
        "--filename-captions a1111 too (A1111's Filename word regex applies to images without a caption file)"
        for regex in dict.fromkeys(
            getattr(s, "filename_word_regex", "")
            for s in getattr(index, "subsets", ())
            if getattr(s, "filename_captions", "none") == "none"
        )
        if regex
    ]
    missing = set(index.missing_captions)
    named = [
        (entry.path, text)
        for entry in index.entries
        if entry.path in missing
        and getattr(entry.subset, "filename_captions", "none") == "none"
        and (text := a1111_caption(entry))
    ]
    if not named:
        return notes
    count = len(dict.fromkeys(path for path, _ in named))  # an image at several resolutions counts once
    have, them = (
        ("1 image has", "it from its file name")
        if count == 1
        else (f"{count} images have", "them from their file names")
    )
    return [
        *notes,
        f"{have} no caption file; A1111 would caption {them} (e.g. {named[0][1]!r}): give "
        "--filename-captions a1111 for the captions A1111's TI/hypernetwork training used (in a dataset TOML: "
        "filename_captions = 'a1111')",
    ]


def caption_twin_notes(index: Any) -> list[str]:
    """A note for the images of subsets that read their ``caption_extension`` only (``caption_fallback`` off: a run
    written in kohya's names) which have no such caption file but a twin of the other common extension beside them
    (``a.txt`` where ``a.caption`` is read): kohya's ``read_caption`` never looks at it, so those images train on
    their class tokens or an empty caption, in kohya and here. The usual cause is sd-scripts' default
    ``caption_extension`` ``.caption`` (train_util.add_dataset_arguments) on a folder captioned with ``.txt``
    files. The same words in the run's pre-flight and ``sdcore data check``."""
    from ..data.captions import CAPTION_EXTENSIONS, caption_path_candidates

    uncaptioned = {*index.missing_captions, *index.class_token_captions}
    found: dict[tuple[str, str], list[Any]] = {}  # (extension read, twin's extension) -> twin files
    for entry in index.entries:
        subset = entry.subset
        if entry.path not in uncaptioned or getattr(subset, "caption_fallback", True):
            continue
        extension = str(getattr(subset, "caption_extension", ".txt"))
        read = caption_path_candidates(entry.path, extension, fallback=False)
        for other in CAPTION_EXTENSIONS:
            if other == extension.lower():
                continue
            twin = next((p.with_suffix(other) for p in read if p.with_suffix(other).is_file()), None)
            if twin is not None:
                found.setdefault((extension, other), []).append(twin)
                break
    notes = []
    for (extension, other), twins in found.items():
        count = len(dict.fromkeys(twins))
        have = "1 image has" if count == 1 else f"{count} images have"
        default = " (sd-scripts' default when caption_extension is left out)" if extension == ".caption" else ""
        notes.append(
            f"{have} no {extension} caption file but a {other} one (e.g. {twins[0]}): kohya reads only "
            f"caption_extension {extension!r}{default}, so they train on their class tokens or an empty caption, "
            f"here as in kohya; set caption_extension = '{other}' to train on those captions"
        )
    return notes
