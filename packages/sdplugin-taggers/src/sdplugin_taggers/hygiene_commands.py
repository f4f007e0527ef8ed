"""``sdcore tag-tools ...``: dataset checks next to the taggers (click only at import time)."""

from __future__ import annotations

import sys
from typing import Any

import click
from sdcore.cli_types import FiniteFloatRange
from sdcore.console import warn, warning_line
from sdcore.errors import SdcoreError


@click.group("tag-tools")
def tag_tools_group() -> None:
    """Dataset checks that go with tagging (watermark scoring)."""


@tag_tools_group.command("watermark")
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--model",
    "model_path",
    default=None,
    help="ONNX watermark classifier (LAION-style: logits, class 0 = watermark); without one, says where to get "
    "LAION's (docs/offline-models.md).",
)
@click.option("--threshold", type=FiniteFloatRange(0, 1), default=0.5, show_default=True)
@click.option(
    "--size",
    type=click.IntRange(1, 4096),
    default=None,
    help="Input size of a model that leaves it open (default: from the model, or 256).",
)
@click.option("--watermark-index", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--no-softmax", is_flag=True, help="The model already outputs probabilities.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--workers", type=click.IntRange(min=0), default=None)
@click.option("--providers", default=None, help="onnxruntime providers (default: CUDA when available, else CPU).")
@click.option("--recursive", is_flag=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="JSONL of every score.")
@click.option("--list", "list_path", type=click.Path(dir_okay=False), default=None, help="Write flagged paths here.")
@click.option("--no-progress", is_flag=True)
def watermark_command(directory: str, model_path: str | None, **kw: Any) -> None:
    """Score images for watermarks and list those above the threshold (files are not moved)."""
    model_path = _watermark_model(model_path)
    try:
        from .labeling import check_folder

        # before the model loads: a --json/--list naming an image, or each other, would replace it
        images = check_folder(
            directory, recursive=kw["recursive"], outputs={"--json": kw["json_path"], "--list": kw["list_path"]}
        )
        _watermark(images, model_path, kw)
    except SdcoreError as exc:
        raise click.ClickException(str(exc)) from exc


#: LAION's watermark detector (LAION-AI/LAION-5B-WatermarkDetection, MIT): a PyTorch state dict in its repository
LAION_WATERMARK_URL = "https://github.com/LAION-AI/LAION-5B-WatermarkDetection/raw/main/models/watermark_model_v1.pt"


def _watermark_model(value: str | None) -> str:
    """The ``--model`` file, or one line saying where to get a classifier: sdcore downloads nothing, and the known
    one (LAION's) is published as PyTorch weights, which need one export to ONNX first."""
    from pathlib import Path

    fetch = (
        f"LAION's detector: curl -L -o watermark_model_v1.pt {LAION_WATERMARK_URL}, export it to ONNX once "
        "(docs/offline-models.md: timm's efficientnet_b3a with LAION's head), then --model watermark.onnx"
    )
    if value is None:
        raise click.UsageError(f"no watermark classifier given (--model); sdcore downloads nothing: get one, online: "
                               f"{fetch}")  # fmt: skip
    path = Path(value).expanduser()
    if not path.is_file():
        what = "is a folder, not an .onnx file" if path.is_dir() else "no such file"
        raise click.UsageError(f"--model {value}: {what}; {fetch}")
    if path.suffix.lower() in (".pt", ".pth", ".bin", ".safetensors", ".ckpt"):
        raise click.UsageError(
            f"--model {value}: PyTorch weights; sdcore runs an ONNX classifier: export it once "
            "(docs/offline-models.md), then --model watermark.onnx"
        )
    return value


def _watermark(images: list[Any], model_path: str, kw: dict[str, Any]) -> None:
    from sdcore.io import atomic_write_text
    from tqdm import tqdm

    from .hygiene import WatermarkScorer
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
        warn(message)
    said = len(scorer.messages)
    flagged: list[tuple[str, float]] = []
    unreadable = 0
    with jsonl_output(kw["json_path"]) as jsonl, tqdm(total=len(images), unit="img", disable=kw["no_progress"]) as bar:
        for path, p, error in scorer.scores(images):
            bar.update(1)
            for message in scorer.messages[said:]:  # the class count of a graph that leaves it open: first batch
                tqdm.write(warning_line(message), file=sys.stderr)
            said = len(scorer.messages)
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
