"""kohya's fine-tuning metadata files: one JSON (or JSONL) file holding every image's caption and tags.

kohya's ``finetune/`` scripts (``merge_captions_to_metadata.py``, ``merge_dd_tags_to_metadata.py``,
``clean_captions_and_tags.py``, ``prepare_buckets_latents.py``, ``tag_images_by_wd14_tagger.py``)
write ``{"<image key>": {"caption": "...", "tags": "a, b", "train_resolution": [w, h],
"image_size": [w, h]}, ...}``; ``fine_tune.py``/``sdxl_train.py``/``flux_train.py`` and
``train_network.py --in_json`` train from it (kohya's ``FineTuningDataset``). This module reads such a
file and builds each image's caption exactly as kohya does; :mod:`sdcore.data.dataset` turns the
records into index entries, so every caption option (prefix/suffix, shuffle, keep tokens, dropout,
wildcards, warm-up) then applies as it does to kohya's fine-tuning subsets.

What is read, and why:

- the image key: an absolute path is used as it is; a relative one is ``image_dir/key`` (current
  kohya); when that is not a file, ``key`` from the working directory (older kohya), then
  ``image_dir/key`` plus one of kohya's image extensions, because the merge scripts write the bare
  file stem (``img001``) unless run with ``--full_path``;
- ``caption`` and ``tags``: see :func:`combine_caption`;
- ``train_resolution`` (prepare_buckets_latents) is ignored, as current kohya training ignores it;
  ``image_size`` is ignored too: sdcore reads every image's size from the file it verifies anyway,
  and buckets it itself;
- kohya's ``.npz`` latent caches are not read (sdcore has its own latent cache), so an entry whose
  image is gone but whose ``.npz`` remains is a missing image here.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DataError

#: kohya's ``IMAGE_EXTENSIONS`` (``library/train_util.py``; both cases, as its glob is case-sensitive),
#: tried after a bare-stem key; ``.avif`` needs kohya's optional plugin and PIL support sdcore does not assume
KOHYA_IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".png",
    ".jpg",
    ".jpeg",
    ".webp",
    ".bmp",
    ".PNG",
    ".JPG",
    ".JPEG",
    ".WEBP",
    ".BMP",
)

#: kohya's default ``caption_separator``: how the caption and the tags are joined
CAPTION_SEPARATOR = ","


@dataclass(frozen=True)
class MetadataRecord:
    """One entry of a metadata file: its key, the caption kohya trains on, and the tags counted for
    ``ss_tag_frequency`` (``None`` when kohya counts none for this entry)."""

    key: str
    caption: str
    tags: str | None


def combine_caption(
    caption: str | None, tags: str | None, *, enable_wildcard: bool = False, separator: str = CAPTION_SEPARATOR
) -> tuple[str, str | None]:
    """(the caption kohya trains on, the tags it counts) for one entry (kohya's ``FineTuningDataset``).

    - no caption counts as ``""``;
    - without ``enable_wildcard``: non-empty tags are appended after the separator (``","``, no
      space), or stand alone when the caption is empty; empty tags add nothing;
    - with ``enable_wildcard``: line breaks in the tags become the separator and the tags are
      appended to every non-blank line of the caption (so each line the wildcard picks carries
      them); kohya does this even for empty tags (a trailing ``","``), and an empty caption then has
      no line at all: the entry trains with an empty caption (kohya's behaviour, kept as it is).
    """
    text = caption if caption is not None else ""
    counted: str | None = None
    if enable_wildcard:
        if tags is not None:
            tags = tags.replace("\n", separator)
            text = "\n".join(f"{line}{separator}{tags}" for line in text.split("\n") if line.strip() != "")
            counted = tags
    elif tags is not None and len(tags) > 0:
        text = f"{text}{separator}{tags}" if text else tags
        counted = tags
    return text, counted


def _field(entry: dict[str, Any], name: str, key: str, path: Path, problems: list[str]) -> str | None:
    value = entry.get(name)
    if value is None or isinstance(value, str):
        return value
    problems.append(f"{path}: entry {key!r}: '{name}' must be a string, got {type(value).__name__}")
    return None


def read_metadata(path: Path) -> dict[str, dict[str, Any]]:
    """The entries of a kohya metadata file: ``.jsonl`` one object per line (``image_path``, ``caption``,
    ``tags``, ``image_size``; current kohya's tagger output), otherwise one JSON object of key -> entry.

    Raises :class:`DataError` naming the file (and line) for a missing, unreadable or malformed file.
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"{path}: metadata file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: metadata file is a folder (give the .json file)") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: metadata file is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read metadata file: {exc.strerror or exc}") from None
    if path.suffix.lower() == ".jsonl":
        entries: dict[str, dict[str, Any]] = {}
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: line {number}: invalid JSON: {exc.msg}") from None
            if not isinstance(item, dict) or not isinstance(item.get("image_path"), str):
                raise DataError(f"{path}: line {number}: expected an object with a string 'image_path'")
            entry: dict[str, Any] = {"caption": item.get("caption", "")}
            for name in ("tags", "image_size"):
                if name in item:
                    entry[name] = item[name]
            entries[item["image_path"]] = entry
        return entries
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") from None
    if not isinstance(data, dict):
        raise DataError(
            f"{path}: a kohya metadata file is a JSON object of image key -> entry, got a {type(data).__name__}"
        )
    return data


def metadata_records(
    path: Path, *, enable_wildcard: bool = False, separator: str = CAPTION_SEPARATOR
) -> tuple[list[MetadataRecord], list[str]]:
    """The records of ``path`` in file order, and every problem with its entries (one line each);
    ``separator`` is the subset's ``caption_separator`` (kohya joins caption and tags with it).

    Raises :class:`DataError` when the file itself cannot be used (see :func:`read_metadata`).
    """
    data = read_metadata(path)
    records: list[MetadataRecord] = []
    problems: list[str] = []
    for key, entry in data.items():
        if not isinstance(entry, dict):
            problems.append(f"{path}: entry {key!r} must be an object (caption, tags...), got {type(entry).__name__}")
            continue
        if not key.strip():
            problems.append(f"{path}: an entry has an empty image key")
            continue
        caption = _field(entry, "caption", key, path, problems)
        tags = _field(entry, "tags", key, path, problems)
        text, counted = combine_caption(caption, tags, enable_wildcard=enable_wildcard, separator=separator)
        records.append(MetadataRecord(key=key, caption=text, tags=counted))
    return records, problems


def resolve_image(key: str, image_dir: Path | None) -> Path | None:
    """The image file of ``key`` (see the module notes for the order), or ``None`` when there is none."""
    raw = Path(key)
    base = raw if raw.is_absolute() or image_dir is None else image_dir / raw
    if base.is_file():
        return base
    if not raw.is_absolute() and image_dir is not None and raw.is_file():
        return raw
    found = sorted(Path(f"{base}{ext}") for ext in KOHYA_IMAGE_EXTENSIONS if Path(f"{base}{ext}").is_file())
    return found[0] if found else None


def missing_hint(key: str, image_dir: Path | None) -> str:
    """Why a key may be missing: kohya can train from its ``.npz`` latents alone, sdcore cannot."""
    raw = Path(key)
    base = raw if raw.is_absolute() or image_dir is None else image_dir / raw
    folder, stem = base.parent, os.path.splitext(base.name)[0]
    try:
        has_npz = folder.is_dir() and any(p.name.startswith(stem) and p.suffix == ".npz" for p in folder.iterdir())
    except OSError:
        has_npz = False
    return " (only a kohya .npz latent cache is there: sdcore trains from the images)" if has_npz else ""


__all__ = [
    "CAPTION_SEPARATOR",
    "KOHYA_IMAGE_EXTENSIONS",
    "MetadataRecord",
    "combine_caption",
    "metadata_records",
    "missing_hint",
    "read_metadata",
    "resolve_image",
]
