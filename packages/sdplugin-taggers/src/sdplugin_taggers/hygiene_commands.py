"""``sdcore tag-tools ...``: dataset checks next to the taggers (click only at import time)."""

from __future__ import annotations

from typing import Any

import click
from sdcore.cli_types import FiniteFloatRange
from sdcore.errors import SdcoreError


@click.group("tag-tools")
def tag_tools_group() -> None:
    """Dataset checks that go with tagging (watermark scoring)."""


@tag_tools_group.command("watermark")
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--model",
    "model_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help="ONNX watermark classifier (LAION-style: logits, class 0 = watermark).",
)
@click.option("--threshold", type=FiniteFloatRange(0, 1), default=0.5, show_default=True)
@click.option("--size", type=click.IntRange(min=1), default=None, help="Input size (default: from the model, or 256).")
@click.option("--watermark-index", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--no-softmax", is_flag=True, help="The model already outputs probabilities.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--workers", type=click.IntRange(min=0), default=None)
@click.option("--providers", default=None, help="onnxruntime providers (default: CUDA when available, else CPU).")
@click.option("--recursive", is_flag=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="JSONL of every score.")
@click.option("--list", "list_path", type=click.Path(dir_okay=False), default=None, help="Write flagged paths here.")
@click.option("--no-progress", is_flag=True)
def watermark_command(directory: str, model_path: str, **kw: Any) -> None:
    """Score images for watermarks and list those above the threshold (files are not moved)."""
    try:
        _watermark(directory, model_path, kw)
    except SdcoreError as exc:
        raise click.ClickException(str(exc)) from exc


def _watermark(directory: str, model_path: str, kw: dict[str, Any]) -> None:
    from sdcore.io import atomic_write_text
    from tqdm import tqdm

    from .hygiene import WatermarkScorer
    from .images import list_images
    from .writer import jsonl_output

    scorer = WatermarkScorer(
        model_path,
        size=kw["size"],
        watermark_index=kw["watermark_index"],
        softmax=not kw["no_softmax"],
        batch_size=kw["batch_size"],
        workers=kw["workers"],
        providers=kw["providers"],
    )
    for message in scorer.messages:
        click.echo(f"warning: {message}", err=True)
    images = list_images(directory, recursive=kw["recursive"])
    flagged: list[tuple[str, float]] = []
    unreadable = 0
    with jsonl_output(kw["json_path"]) as jsonl, tqdm(total=len(images), unit="img", disable=kw["no_progress"]) as bar:
        for path, p, error in scorer.scores(images):
            bar.update(1)
            if error is not None or p is None:
                unreadable += 1
                continue
            if p > kw["threshold"]:
                flagged.append((str(path), p))
            if jsonl is not None:
                jsonl.write({"image_path": path, "p_watermark": round(p, 6)})
    if kw["list_path"]:
        atomic_write_text(kw["list_path"], "".join(f"{path}\n" for path, _ in flagged))
    click.echo(f"images: {len(images)}, watermarked (p > {kw['threshold']}): {len(flagged)}, unreadable: {unreadable}")
    for path, p in sorted(flagged, key=lambda item: -item[1])[:20]:
        click.echo(f"  {p:.3f}  {path}")
