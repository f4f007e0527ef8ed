"""A diffusers JSONL dataset: one JSON object a line naming an image, its control image and its caption.

diffusers' ``examples/flux-control/train_control_lora_flux.py`` (and its ControlNet scripts) read
``--jsonl_for_train data.jsonl`` with ``datasets.load_dataset("json", ...)``: each row has an ``--image_column``
(default ``image``), a ``--conditioning_image_column`` (``conditioning_image``) and a ``--caption_column``
(``text``; a list of captions gives its longest, as the script takes ``max(captions, key=len)``). In sdcore the
file is one more ``--data`` source (``--data data.jsonl``), indexed by :func:`sdcore.data.dataset.scan_dataset`
like every other: each row becomes an image entry carrying its own control image
(:attr:`sdcore.data.dataset.ImageEntry.control_path`), which a control LoRA (``--control-lora``) or FLUX.1 Kontext
pairs with it exactly as it pairs a ``--control-dir`` image.

Relative paths are read from the JSONL's folder; a path found only from the working directory (where the script
opens it: it calls ``Image.open`` on the string) is taken from there too, so a file written for the script trains
as it is. Rows that cannot train (not an object, a column missing, a file not there) are collected and reported
together, one line each kind. ``--dataset_name`` (a Hugging Face hub dataset) is not read: sdcore works offline.

The same reader takes an ``imagefolder`` ``metadata.jsonl`` (diffusers' text_to_image scripts' ``--train_data_dir``:
rows of ``file_name`` relative to the folder and a caption column): the control image column is then ``""``, none.
There a list of captions is kept whole (:attr:`JsonlRow.captions`): those scripts train each use on one of them
drawn at random (``random.choice(caption) if is_train``), which sdcore does with the sample's seeded generator.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError

#: diffusers' defaults for ``--image_column``, ``--conditioning_image_column`` and ``--caption_column``
DEFAULT_COLUMNS = ("image", "conditioning_image", "text")


@dataclass(frozen=True)
class JsonlRow:
    """One usable row: the training image, its control image (None without a control column) and its caption
    (line numbers from 1)."""

    line: int
    image: Path
    control: Path | None
    caption: str
    #: an imagefolder row's list of captions, each use drawing one (``caption`` is its first); empty otherwise
    captions: tuple[str, ...] = ()


def _listed(items: list[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" ... and {len(items) - limit} more" if len(items) > limit else "")


def _resolve(value: str, folder: Path) -> Path | None:
    """``value`` from the JSONL's folder, else (diffusers' reading) from the working directory; None if neither."""
    path = Path(value).expanduser()
    for candidate in (path,) if path.is_absolute() else (folder / path, path):
        if candidate.is_file():
            return candidate
    return None


def _caption(value: object, *, keep_list: bool) -> tuple[str, tuple[str, ...]] | None:
    """A caption cell as ``(caption, captions)``: a string is itself; a list of strings is its longest (the control
    scripts' ``max(example, key=len)``) or, with ``keep_list`` (an imagefolder: the text_to_image scripts'
    ``random.choice``), its first plus the whole list to draw from. ``None``: not a caption."""
    if isinstance(value, str):
        return value, ()
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        if keep_list and len(value) > 1:
            return value[0], tuple(value)
        return max(value, key=len), ()
    return None


def jsonl_rows(path: Path, columns: tuple[str, str, str] = DEFAULT_COLUMNS) -> tuple[list[JsonlRow], list[str]]:
    """The usable rows of the JSONL at ``path`` and one problem line per kind of bad row (each listing its
    lines); ``columns`` are (image, control image, caption), the control column ``""`` for none (an imagefolder
    ``metadata.jsonl``). An unreadable file is a :class:`DataError`."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # a leading BOM (Windows editors) as pyarrow's read_json
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read the JSONL dataset: {exc}") from None
    image_col, control_col, caption_col = columns
    folder = path.parent
    rows: list[JsonlRow] = []
    not_objects: list[str] = []
    no_column: dict[str, list[str]] = {}
    path_columns = (image_col, control_col) if control_col else (image_col,)
    missing: dict[str, list[str]] = {column: [] for column in path_columns}
    # records end at "\n" alone (JSON Lines; pyarrow's read_json): str.splitlines would also split a caption at an
    # unescaped U+2028/U+2029/U+0085, which JSON strings may hold
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict):
            not_objects.append(str(number))
            continue
        found: dict[str, Path] = {}
        bad = False
        for column in path_columns:
            value = record.get(column)
            if not isinstance(value, str) or not value:
                no_column.setdefault(column, []).append(str(number))
                bad = True
                continue
            resolved = _resolve(value, folder)
            if resolved is None:
                missing[column].append(f"line {number}: {value}")
                bad = True
            else:
                found[column] = resolved
        read = _caption(record.get(caption_col), keep_list=not control_col)
        if read is None:
            no_column.setdefault(caption_col, []).append(str(number))
            bad = True
        if not bad:
            assert read is not None
            rows.append(JsonlRow(number, found[image_col], found.get(control_col), *read))
    problems: list[str] = []
    if not_objects:
        problems.append(f"{path}: {len(not_objects)} line(s) are not a JSON object: lines {_listed(not_objects)}")
    flags = {image_col: "--image-column", control_col: "--conditioning-image-column", caption_col: "--caption-column"}
    for column, lines in no_column.items():
        problems.append(
            f"{path}: {len(lines)} row(s) have no {column!r} {'caption' if column == caption_col else 'path'} "
            f"({flags[column]}): lines {_listed(lines)}"
        )
    for column, entries in missing.items():
        if entries:
            what = "image" if column == image_col else "control image"
            problems.append(
                f"{path}: {len(entries)} {what}(s) not found (column {column!r}, relative to {folder} or the working "
                f"directory): {_listed(entries)}"
            )
    return rows, problems


__all__ = ["DEFAULT_COLUMNS", "JsonlRow", "jsonl_rows"]
