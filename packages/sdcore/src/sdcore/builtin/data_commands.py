"""Built-in ``sdcore data`` commands: ``check`` (dataset report), ``dedupe`` (near-duplicates) and
``preprocess`` (A1111's dataset preprocessing).

Import-light on purpose: only click at module level; PIL/numpy are imported inside the commands
and no model is ever loaded (``preprocess --tagger`` loads the tagger it names, through its plugin).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from ..cli_types import FINITE_FLOAT, FiniteFloatRange
from ..data.captions import FILENAME_CAPTION_RULES
from ..hinted_command import HintedCommand
from ..hookspecs import hookimpl


@click.group(name="data")
def data_group() -> None:
    """Inspect and tidy training datasets (no model is loaded)."""


_TRAINING_ONLY = "a training option: data check reports the dataset's files, captions and buckets; leave it out"
#: kohya's names for what ``data check`` spells otherwise (its ``--x_y`` spellings of sdcore's options are read as
#: ``--x-y``): click's nearest spelling named an option meaning something else (``--enable_bucket`` got
#: "did you mean --no-buckets", the opposite; ``--shuffle_caption`` got ``--filename-captions``).
_CHECK_HINTS: dict[str, str] = {
    "enable-bucket": "buckets are on by default, as kohya's --enable_bucket turns them on; --no-buckets turns them off",
    "bucket-reso-steps": "kohya's bucket_reso_steps is --bucket-step",
    "bucket-no-upscale": "kohya's bucket_no_upscale is --no-upscale",
    "train-data-dir": "the dataset is the PATH argument: sdcore data check DIR (or its dataset TOML)",
    "dataset-config": "the dataset is the PATH argument: sdcore data check dataset.toml",
    "reg-data-dir": "kohya's reg_data_dir is --reg-data",
    "train-batch-size": "kohya's train_batch_size is --batch-size",
    "shuffle-caption": _TRAINING_ONLY,
    "keep-tokens": _TRAINING_ONLY,
    "caption-dropout-rate": _TRAINING_ONLY,
    "flip-aug": _TRAINING_ONLY,
    "color-aug": _TRAINING_ONLY,
    "random-crop": _TRAINING_ONLY,
}


class _CheckCommand(HintedCommand):
    """``sdcore data check`` taking kohya's spellings as ``sdcore train`` takes them (``--bucket_no_upscale``
    typed for ``--no-upscale`` says so; ``--min_bucket_reso 256`` is ``--min-bucket-reso 256``)."""

    def prepare_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        from ..train.cli import underscores_to_hyphens

        return underscores_to_hyphens(self, ctx, list(args))

    def option_hint(self, ctx: click.Context, option: str) -> str | None:
        return self.table_hint(_CHECK_HINTS, option)


@data_group.command(name="check", cls=_CheckCommand)
@click.argument("path", type=click.Path(exists=True))
@click.option(
    "--resolution",
    type=str,  # read as the run reads it (load_options): 512, or kohya's W,H
    default=None,
    metavar="N|W,H",
    help="Training resolution buckets are built around, or kohya's W,H (buckets on the area W*H, no buckets: "
    "W x H crops)  [default: 512, or the largest of --resolutions].",
)
@click.option(
    "--resolutions",
    default="",
    metavar="LIST",
    help="Several training resolutions, e.g. 512,768 (as `sdcore train --resolutions`): buckets per resolution.",
)
@click.option(
    "--resolution-draw",
    default="epoch",
    show_default=True,
    help="With --resolutions: each image's resolution drawn every epoch or once for the run (epoch, once).",
)
@click.option("--min-bucket-reso", type=int, default=256, show_default=True, help="Smallest bucket side.")
@click.option("--max-bucket-reso", type=int, default=1024, show_default=True, help="Largest bucket side.")
@click.option("--bucket-step", type=int, default=64, show_default=True, help="Bucket side step in pixels.")
@click.option("--no-upscale", is_flag=True, help="Never upscale images (kohya bucket_no_upscale).")
@click.option("--no-buckets", is_flag=True, help="Square center crops instead of aspect-ratio buckets.")
@click.option(
    "--bucket-rule",
    default="kohya",  # checked as the run checks --bucket-rule (load_options), keeping this module import-light
    show_default=True,
    help="kohya or onetrainer: kohya's buckets, or OneTrainer's (--bucket-step is then its grid: 8 for SD1/SD2, "
    "64 for SDXL and the flow models).",
)
@click.option("--caption-extension", default=".txt", show_default=True, help="Caption file extension.")
@click.option(
    "--filename-captions",
    type=click.Choice(("none", *FILENAME_CAPTION_RULES)),  # the run's --filename-captions choices
    default="none",
    show_default=True,
    help="Caption images that have no caption file from their file names, as a run with this option does "
    "(a1111: A1111's Train tab, '00001-0-a circle.png' -> 'a circle'); a caption file always wins.",
)
@click.option(
    "--filename-word-regex",
    default="",
    metavar="REGEX",
    help="With --filename-captions: keep only this regex's matches in a caption made from a file name, as a run "
    "with this option does (A1111's 'Filename word regex' setting). Default: off.",
)
@click.option(
    "--filename-join-string",
    default=" ",
    metavar="TEXT",
    help="With --filename-word-regex: the text between the words it finds (A1111's 'Filename join string'). "
    "Default: one space.",
)
@click.option("--reg-data", type=click.Path(exists=True), default=None, help="Regularisation/class images folder.")
@click.option(
    "--metadata-file",
    "--in-json",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="kohya fine-tuning metadata JSON/JSONL: captions and tags per image; PATH is its image folder.",
)
@click.option(
    "--dataset-repeats",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Repeats of the --metadata-file images.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Batch size for the batches-per-epoch count (a dataset TOML's batch_size wins, as in a run).",
)
@click.option("--seed", type=int, default=None, help="The run's --seed (resolution draws, batch order).")
@click.option(
    "--top",
    type=click.IntRange(min=0),
    default=30,
    show_default=True,
    help="How many of the most frequent tags to show.",
)
@click.option(
    "--masked-loss",
    is_flag=True,
    help="Count the masks masked training reads (a OneTrainer concepts file's <name>-masklabel.png).",
)
@click.option(
    "--inpainting-conditioning-images",
    is_flag=True,
    help="Leave out the <name>-condlabel images, as a run with this option does (they are masked images).",
)
@click.option(
    "--method",
    default=None,
    metavar="NAME",
    help="Read the dataset as `sdcore train NAME` does: the method's own files beside the images (e.g. "
    "attention maps) are not counted as images, and its dataset checks run too "
    "(with its default options; no model is loaded).",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable report.")
@click.option("--strict", is_flag=True, help="Exit with status 1 when any problem is found.")
def check_command(
    path: str,
    resolution: str | None,
    resolutions: str,
    resolution_draw: str,
    min_bucket_reso: int,
    max_bucket_reso: int,
    bucket_step: int,
    no_upscale: bool,
    no_buckets: bool,
    bucket_rule: str,
    caption_extension: str,
    filename_captions: str,
    filename_word_regex: str,
    filename_join_string: str,
    reg_data: str | None,
    metadata_file: str | None,
    dataset_repeats: int,
    batch_size: int,
    seed: int | None,
    top: int,
    masked_loss: bool,
    inpainting_conditioning_images: bool,
    method: str | None,
    as_json: bool,
    strict: bool,
) -> None:
    """Report images, captions, unreadable files, buckets and tags of the dataset at PATH.

    PATH is a folder (kohya `N_name` sub-folders or plain images), a kohya dataset TOML or a
    OneTrainer concepts .json.
    Exits with status 1 when there is no usable image (or on any problem with --strict).
    """
    from ..errors import PluginError

    try:
        method_specs = _method_specs()
    except PluginError:  # a broken plugin: `--method` says it in one line; a plain check goes on without the note
        if method is not None:
            raise
        method_specs = {}
    chosen = None
    if method is not None:
        chosen = method_specs.get(method)
        if chosen is None:  # the words of `sdcore train NAME` for an unknown method
            known = ", ".join(sorted(method_specs)) or "none installed"
            raise click.BadParameter(
                f"unknown training method {method!r} (available: {known}; see `sdcore plugins`)",
                param_hint="'--method'",
            )
    import sys

    from ..data.check import check_dataset
    from ..data.dataset import filename_word_regex_problem
    from ..errors import ConfigError
    from ..train.config import load_options
    from ..train.options import TrainOptions
    from ..train.preflight import bucket_rule_problems, resolutions_problems

    values: dict[str, Any] = dict(
        data=path,
        reg_data=reg_data,
        resolution=(0 if resolutions else 512) if resolution is None else resolution,
        resolutions=resolutions,
        resolution_draw=resolution_draw,
        min_bucket_reso=min_bucket_reso,
        max_bucket_reso=max_bucket_reso,
        bucket_step=bucket_step,
        bucket_no_upscale=no_upscale,
        buckets=not no_buckets,
        bucket_rule=bucket_rule,
        caption_extension=caption_extension,
        filename_captions=filename_captions,
        filename_word_regex=filename_word_regex,
        filename_join_string=filename_join_string,
        metadata_file=metadata_file,
        dataset_repeats=dataset_repeats,
        batch_size=batch_size,
        masked_loss=masked_loss,
        inpainting_conditioning_images=inpainting_conditioning_images,
        **({} if seed is None else {"seed": seed}),
    )
    notes: list[str] = []
    training_method = None
    try:
        # the run's own reading of the options, so the counts are the run's (a dataset TOML's
        # batch_size wins over --batch-size there); problems are one line each, exit 2, as a run's
        if chosen is None:
            options = load_options(TrainOptions, overrides=values, notes=notes)
        else:  # the method's own options class and instance, as `sdcore train NAME` builds them (no model)
            method_class = chosen.load()
            options = load_options(method_class.options_class, overrides=values, notes=notes)
            training_method = method_class(options)
        problems = resolutions_problems(options) + bucket_rule_problems(options)
        regex_problem = filename_word_regex_problem(options.filename_word_regex)
        if regex_problem:
            problems.append(regex_problem)
    except ConfigError as exc:
        problems = exc.problems
    if problems:
        for problem in problems:
            click.echo(f"Error: {problem}", err=True)
        sys.exit(2)
    others = _method_files_checks(method_specs, values, skip=None if chosen is None else chosen.name)
    report = check_dataset(path, options, top=top, method=training_method, other_methods=others)
    report.notes[:0] = notes
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
    else:
        click.echo(report.to_text())
    if report.errors or (strict and not report.ok):
        raise SystemExit(1)


@data_group.command(name="dedupe")
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--threshold",
    type=click.IntRange(0, 64),
    default=6,
    show_default=True,
    help="Largest differing hash bits (of 64) still counted as a duplicate; 0 = identical look.",
)
@click.option(
    "--move-to",
    type=click.Path(file_okay=False),
    default=None,
    help="Move the duplicates (not the kept image of each group) and their captions here "
    "(a folder inside PATH is left out of the search).",
)
@click.option(
    "--color-threshold",
    type=FiniteFloatRange(0, 5),
    default=0.22,
    show_default=True,
    help="Largest colour difference between matching places of 32x32 thumbnails, relative to the contrast.",
)
@click.option("--yes", is_flag=True, help="With --move-to: move without asking (otherwise only list what would move).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def dedupe_command(
    path: str, threshold: int, color_threshold: float, move_to: str | None, yes: bool, as_json: bool
) -> None:
    """Find near-duplicate images under PATH (recursive): same structure (luminance hash) and same colours.

    Nothing is deleted. Each group keeps its largest image; --move-to DIR lists the others (and their
    caption files) that would move out of the dataset, and --move-to DIR --yes moves them.
    """
    from pathlib import Path

    from ..data.dedupe import find_duplicates, list_images, move_duplicates

    root = Path(path)
    if move_to is not None and Path(move_to).expanduser().resolve() == root.resolve():
        raise click.BadParameter(
            f"--move-to {move_to} is PATH itself: the duplicates would stay in the dataset (renamed); give a folder "
            f"of their own, e.g. --move-to {root / 'dupes'}",
            param_hint="'--move-to'",
        )
    groups, unreadable = find_duplicates(
        list_images(root, exclude=move_to), threshold=threshold, color_threshold=color_threshold
    )
    done = move_duplicates(groups, move_to) if move_to and groups and yes else None

    def rel(p: Path) -> str:
        try:
            return str(p.relative_to(root))
        except ValueError:
            return str(p)

    if as_json:
        payload = {
            "groups": [
                {"keep": rel(g.keep), "duplicates": [rel(p) for p in g.others], "max_distance": g.distance}
                for g in groups
            ],
            "unreadable": [{"path": rel(p), "reason": r} for p, r in unreadable],
            "moved": [{"from": str(a), "to": str(b)} for a, b in (done.moved if done else [])],
            "copied": [{"from": str(a), "to": str(b)} for a, b in (done.copied if done else [])],
            "would_move": [rel(p) for g in groups for p in g.others] if move_to and not yes else [],
        }
        click.echo(json.dumps(payload, indent=2, ensure_ascii=False))
        return
    if not groups:
        click.echo(f"No near-duplicates found under {root} (threshold {threshold}).")
    for number, group in enumerate(groups, 1):
        click.echo(f"group {number} (max distance {group.distance}):")
        click.echo(f"    keep  {rel(group.keep)}")
        for other in group.others:
            click.echo(f"    dup   {rel(other)}")
    for p, reason in unreadable:
        click.echo(f"unreadable: {rel(p)}: {reason}")
    if groups:
        duplicates = sum(len(g.others) for g in groups)
        if move_to and yes:
            copied = len(done.copied) if done else 0
            kept = f" ({copied} caption(s) copied, not moved: an image staying behind reads them)" if copied else ""
            click.echo(f"{duplicates} duplicate image(s) moved to {move_to}{kept}.")
        elif move_to:
            click.echo(
                f"{duplicates} duplicate image(s) (the 'dup' lines above) would be moved to {move_to}; "
                "nothing moved: add --yes to move them."
            )
        else:
            click.echo(f"{duplicates} duplicate image(s) in {len(groups)} group(s); nothing moved (use --move-to DIR).")


@data_group.command(name="preprocess")
@click.argument("src", type=click.Path())
@click.argument("dst", type=click.Path())
@click.option("--width", type=int, default=512, show_default=True, help="Output width in pixels.")
@click.option("--height", type=int, default=512, show_default=True, help="Output height in pixels.")
@click.option(
    "--flip", is_flag=True, help="Also write a mirrored copy of every output (A1111 'Create flipped copies')."
)
@click.option("--flip-vertical", is_flag=True, help="Also write an upside-down copy (A1111 1.7 'Vertical').")
@click.option("--flip-both", is_flag=True, help="Also write a copy flipped both ways (A1111 1.7 'Both').")
@click.option("--split", is_flag=True, help="Cut images too long for the target aspect into overlapping tiles.")
@click.option(
    "--split-threshold",
    type=FINITE_FLOAT,
    default=0.5,
    show_default=True,
    help="Split when one target-shaped tile covers at most this share of the long side.",
)
@click.option(
    "--overlap-ratio",
    type=FINITE_FLOAT,
    default=0.2,
    show_default=True,
    help="Least overlap of split tiles (0 to 0.9).",
)
@click.option("--focal-crop", is_flag=True, help="Crop non-square images around their detail (edges, entropy).")
@click.option(
    "--focal-entropy-weight", type=FINITE_FLOAT, default=0.15, show_default=True, help="Weight of entropy (0-1)."
)
@click.option("--focal-edges-weight", type=FINITE_FLOAT, default=0.5, show_default=True, help="Weight of edges (0-1).")
@click.option("--auto-size", is_flag=True, help="Centre-crop to the best size (multiples of 64) within the bounds.")
@click.option("--auto-size-min-dim", type=click.IntRange(min=1), default=384, show_default=True, help="Smallest side.")
@click.option("--auto-size-max-dim", type=click.IntRange(min=1), default=768, show_default=True, help="Largest side.")
@click.option(
    "--auto-size-min-area", type=click.IntRange(min=0), default=64 * 64, show_default=True, help="Smallest area."
)
@click.option(
    "--auto-size-max-area", type=click.IntRange(min=1), default=640 * 640, show_default=True, help="Largest area."
)
@click.option(
    "--auto-size-objective",
    type=click.Choice(["area", "error"]),
    default="area",
    show_default=True,
    help="Prefer the largest area ('Maximize area') or the closest aspect ('Minimize error').",
)
@click.option(
    "--auto-size-threshold", type=FINITE_FLOAT, default=0.1, show_default=True, help="Largest aspect error (0-1)."
)
@click.option("--keep-original-size", is_flag=True, help="Also write the image unchanged (no resize).")
@click.option(
    "--captions",
    type=click.Choice(["ignore", "copy", "prepend", "append"]),
    default="ignore",
    show_default=True,
    help="What to do with SRC's existing NAME.txt captions (A1111 'Existing caption txt action').",
)
@click.option("--tagger", default=None, help="Caption every output with this installed tagger (see `sdcore tag`).")
@click.option(
    "--tagger-model", type=click.Path(), default=None, help="The tagger's model (folder or file), with --tagger."
)
@click.option("--dry-run", is_flag=True, help="List what would be written; write nothing.")
@click.pass_context
def preprocess_command(
    ctx: click.Context,
    src: str,
    dst: str,
    width: int,
    height: int,
    flip: bool,
    flip_vertical: bool,
    flip_both: bool,
    split: bool,
    split_threshold: float,
    overlap_ratio: float,
    focal_crop: bool,
    focal_entropy_weight: float,
    focal_edges_weight: float,
    auto_size: bool,
    auto_size_min_dim: int,
    auto_size_max_dim: int,
    auto_size_min_area: int,
    auto_size_max_area: int,
    auto_size_objective: str,
    auto_size_threshold: float,
    keep_original_size: bool,
    captions: str,
    tagger: str | None,
    tagger_model: str | None,
    dry_run: bool,
) -> None:
    """A1111's "Preprocess images" on the images directly in SRC, written to DST as
    NNNNN-K-name.png (+ .txt captions).

    Every enabled operation (--split, --focal-crop, --auto-size, --keep-original-size) writes its
    own outputs; with none of them, each image is resized to cover WIDTHxHEIGHT and centre-cropped.
    Problems with the folders or options are all reported before any work (exit 2).
    """
    import sys

    from ..data.preprocess import PreprocessOptions, preprocess, source_problems

    options = PreprocessOptions(
        width=width,
        height=height,
        flip=flip,
        flip_vertical=flip_vertical,
        flip_both=flip_both,
        split=split,
        split_threshold=split_threshold,
        overlap_ratio=overlap_ratio,
        focal_crop=focal_crop,
        focal_entropy_weight=focal_entropy_weight,
        focal_edges_weight=focal_edges_weight,
        auto_size=auto_size,
        auto_size_min_dim=auto_size_min_dim,
        auto_size_max_dim=auto_size_max_dim,
        auto_size_min_area=auto_size_min_area,
        auto_size_max_area=auto_size_max_area,
        auto_size_objective=auto_size_objective,
        auto_size_threshold=auto_size_threshold,
        keep_original_size=keep_original_size,
        captions=captions,
    )
    problems = source_problems(src, dst) + options.problems()
    spec = None
    if tagger is not None:
        from ..cli import _pm

        taggers = _pm(ctx).taggers()
        spec = taggers.get(tagger)
        if spec is None:
            known = ", ".join(sorted(taggers)) or "none installed"
            problems.append(f"--tagger {tagger!r}: no such tagger (available: {known}; see `sdcore plugins`)")
        if tagger_model is None:
            problems.append("--tagger needs --tagger-model (the tagger's model folder or file)")
        else:
            from pathlib import Path

            if not Path(tagger_model).exists():
                problems.append(f"--tagger-model {tagger_model}: no such file or folder")
    elif tagger_model is not None:
        problems.append("--tagger-model needs --tagger NAME")
    if problems:
        for problem in problems:
            click.echo(f"Error: {problem}", err=True)
        sys.exit(2)

    # the tagger's model loads before any work (a bad model is one error line, nothing written), or never with --dry-run
    captioner = _tagger_captioner(spec, str(tagger_model), eager=not dry_run) if spec is not None else None
    report = preprocess(
        src, dst, options, captioner=captioner, dry_run=dry_run, say=lambda line: click.echo(line, err=True)
    )
    if dry_run:
        for path in sorted(report.images_written + report.captions_written):
            click.echo(f"would write {path}")
    click.echo(report.summary())


def _method_specs() -> dict[str, Any]:
    """The installed training methods by name and alias, from the CLI's plugin manager (as `sdcore train`)."""
    from ..plugins import get_plugin_manager

    ctx = click.get_current_context()
    pm = getattr(ctx.find_root().obj, "pm", None) or get_plugin_manager()
    return dict(pm.methods())


def _method_files_checks(
    specs: dict[str, Any], values: dict[str, Any], *, skip: str | None
) -> dict[str, Callable[[Path], bool]]:
    """Each installed method's ``is_auxiliary_file`` (by its primary name, ``skip`` left out), from an instance built
    with the check's options: only the method class is imported (plugins keep torch out of it, as ``--dry-run``
    needs), no model. A method that cannot be built is left out (a broken plugin is reported when it is asked for)."""
    import logging

    from ..train.config import load_options
    from ..train.method import TrainingMethod

    out: dict[str, Callable[[Path], bool]] = {}
    for spec in {spec.name: spec for spec in specs.values()}.values():
        if spec.name == skip:
            continue
        try:
            method_class = spec.load()
            if method_class.is_auxiliary_file is TrainingMethod.is_auxiliary_file:  # claims nothing: not built
                continue
            options = load_options(method_class.options_class, overrides=values, notes=[])
            out[spec.name] = method_class(options).is_auxiliary_file
        except Exception:
            logging.getLogger(__name__).debug("method %r left out of the method-files note", spec.name, exc_info=True)
    return out


def _tagger_captioner(spec: Any, model: str, *, eager: bool) -> Callable[[list[Any]], list[str]]:
    """Caption PIL images with the tagger's Python API (``TaggerSpec.tagger``: a class taking the
    model path and offering ``tag(images) -> results`` with ``caption()``), as ``sdcore tag`` does.
    The model loads now when ``eager``, otherwise at the first call (a ``--dry-run`` never calls)."""
    from ..errors import DataError

    loaded: list[Any] = [spec.load_tagger()(model)] if eager else []

    def caption(images: list[Any]) -> list[str]:
        if not loaded:
            loaded.append(spec.load_tagger()(model))
        results = loaded[0].tag(images)
        for result in results:
            if getattr(result, "error", None):
                raise DataError(f"tagger {spec.name!r} failed: {result.error}")
        return [str(result.caption()) for result in results]

    return caption


@hookimpl
def sdcore_register_commands(cli: click.Group) -> None:
    cli.add_command(data_group)
