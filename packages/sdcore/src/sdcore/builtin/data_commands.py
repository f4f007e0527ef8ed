"""Built-in ``sdcore data`` commands: ``check`` (dataset report) and ``dedupe`` (near-duplicates).

Import-light on purpose: only click at module level; PIL/numpy are imported inside the commands
and no model is ever loaded.
"""

from __future__ import annotations

import json

import click

from ..hookspecs import hookimpl


@click.group(name="data")
def data_group() -> None:
    """Inspect and tidy training datasets (no model is loaded)."""


@data_group.command(name="check")
@click.argument("path", type=click.Path(exists=True))
@click.option(
    "--resolution", type=int, default=512, show_default=True, help="Training resolution buckets are built around."
)
@click.option("--min-bucket-reso", type=int, default=256, show_default=True, help="Smallest bucket side.")
@click.option("--max-bucket-reso", type=int, default=1024, show_default=True, help="Largest bucket side.")
@click.option("--bucket-step", type=int, default=64, show_default=True, help="Bucket side step in pixels.")
@click.option("--no-upscale", is_flag=True, help="Never upscale images (kohya bucket_no_upscale).")
@click.option("--no-buckets", is_flag=True, help="Square center crops instead of aspect-ratio buckets.")
@click.option("--caption-extension", default=".txt", show_default=True, help="Caption file extension.")
@click.option("--reg-data", type=click.Path(exists=True), default=None, help="Regularisation/class images folder.")
@click.option(
    "--metadata-file",
    "--in-json",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="kohya fine-tuning metadata JSON/JSONL: captions and tags per image; PATH is its image folder.",
)
@click.option(
    "--dataset-repeats", type=int, default=1, show_default=True, help="Repeats of the --metadata-file images."
)
@click.option(
    "--batch-size", type=int, default=1, show_default=True, help="Batch size for the batches-per-epoch count."
)
@click.option("--top", type=int, default=30, show_default=True, help="How many of the most frequent tags to show.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable report.")
@click.option("--strict", is_flag=True, help="Exit with status 1 when any problem is found.")
def check_command(
    path: str,
    resolution: int,
    min_bucket_reso: int,
    max_bucket_reso: int,
    bucket_step: int,
    no_upscale: bool,
    no_buckets: bool,
    caption_extension: str,
    reg_data: str | None,
    metadata_file: str | None,
    dataset_repeats: int,
    batch_size: int,
    top: int,
    as_json: bool,
    strict: bool,
) -> None:
    """Report images, captions, unreadable files, buckets and tags of the dataset at PATH.

    PATH is a folder (kohya `N_name` sub-folders or plain images), a kohya dataset TOML or a
    OneTrainer concepts .json.
    Exits with status 1 when there is no usable image (or on any problem with --strict).
    """
    from ..data.check import check_dataset
    from ..train.options import TrainOptions

    options = TrainOptions(
        data=path,
        reg_data=reg_data,
        resolution=resolution,
        min_bucket_reso=min_bucket_reso,
        max_bucket_reso=max_bucket_reso,
        bucket_step=bucket_step,
        bucket_no_upscale=no_upscale,
        buckets=not no_buckets,
        caption_extension=caption_extension,
        metadata_file=metadata_file,
        dataset_repeats=dataset_repeats,
        batch_size=batch_size,
    )
    report = check_dataset(path, options, top=top)
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
    help="Move the duplicates (not the kept image of each group) and their captions here.",
)
@click.option(
    "--color-threshold",
    type=click.FloatRange(0, 5),
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
    groups, unreadable = find_duplicates(list_images(root), threshold=threshold, color_threshold=color_threshold)
    moved = move_duplicates(groups, move_to) if move_to and groups and yes else []

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
            "moved": [{"from": str(a), "to": str(b)} for a, b in moved],
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
            click.echo(f"{duplicates} duplicate image(s) moved to {move_to}.")
        elif move_to:
            click.echo(
                f"{duplicates} duplicate image(s) (the 'dup' lines above) would be moved to {move_to}; "
                "nothing moved: add --yes to move them."
            )
        else:
            click.echo(f"{duplicates} duplicate image(s) in {len(groups)} group(s); nothing moved (use --move-to DIR).")


@hookimpl
def sdcore_register_commands(cli: click.Group) -> None:
    cli.add_command(data_group)
