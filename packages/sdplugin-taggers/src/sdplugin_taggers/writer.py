"""Caption files next to images, written so an existing caption is never lost by accident.

Modes: ``skip`` leaves images that already have a caption alone (they are not even tagged; a
blank caption file counts as none),
``overwrite`` replaces, ``append`` keeps the existing tags first and adds only new ones,
``prepend`` puts the new tags first and keeps the existing ones not repeated. Tags compare by
:func:`~sdplugin_taggers.tags.normalize_tag`, so ``long_hair`` and ``long hair`` are one tag.
Every write is atomic (:mod:`sdcore.io`); an unreadable existing caption is left untouched.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from sdcore.data.captions import read_caption_text
from sdcore.errors import ConfigError, DataError
from sdcore.io import atomic_open, atomic_write_text, read_only_problem

from .tags import normalize_tag

WRITE_MODES = ("skip", "overwrite", "append", "prepend")


def normalize_ext(ext: str) -> str:
    ext = ext.strip()
    if not ext or ext in (".", "/") or "/" in ext or os.sep in ext:
        raise ConfigError(f"invalid caption extension {ext!r} (use e.g. .txt or .caption)")
    ext = ext if ext.startswith(".") else "." + ext
    from .images import IMAGE_SUFFIXES

    if ext.lower() in IMAGE_SUFFIXES:
        raise ConfigError(f"caption extension {ext} is an image type: captions would overwrite the images")
    return ext


def caption_path(image: str | os.PathLike[str], ext: str = ".txt") -> Path:
    """``photo.png`` -> ``photo.txt`` (the sd-scripts / kohya convention)."""
    return Path(image).with_suffix(normalize_ext(ext))


def merge_tags(existing: list[str], new: list[str], mode: str) -> list[str]:
    """Combine tag lists for ``append`` (existing first) or ``prepend`` (new first), de-duplicated."""
    if mode not in ("append", "prepend"):
        raise ConfigError(f"merge mode must be append or prepend (got {mode!r})")
    first, second = (existing, new) if mode == "append" else (new, existing)
    out: list[str] = []
    seen: set[str] = set()
    for tag in [*first, *second]:
        key = normalize_tag(tag)
        if not key or key in seen:
            continue
        seen.add(key)
        out.append(tag.strip())
    return out


def put_first(tags: list[str], first: tuple[str, ...]) -> list[str]:
    """Move the ``first`` tags (compared by :func:`normalize_tag`) to the front, in ``first``'s order."""
    if not first:
        return tags
    keys = [normalize_tag(t) for t in first]
    by_key = {normalize_tag(t): t for t in tags}
    head = [by_key.get(key, tag.strip()) for key, tag in zip(keys, first, strict=True)]
    head = [t for i, t in enumerate(head) if keys[i] and keys.index(keys[i]) == i]
    return head + [t for t in tags if normalize_tag(t) not in set(keys)]


def split_caption(text: str, separator: str = ",") -> list[str]:
    """A caption's tags: split on ``separator`` (kohya's ``--caption_separator``, stripped) and on lines."""
    sep = separator.strip() or ","
    return [part.strip() for part in text.replace("\n", sep).split(sep) if part.strip()]


def _has_caption(path: Path) -> bool:
    """Whether ``path`` holds a caption ``skip`` must keep: it exists and is not blank.

    A blank file (empty, or only a BOM, spaces and line ends) carries no tag: training treats it as
    an empty caption (``sdcore data check`` lists it; kohya stops on it), so ``skip`` fills it. A file
    that cannot be read or decoded is kept, as never destroying a caption matters more.
    """
    if not path.exists():
        return False
    try:
        return bool(read_caption_text(path).strip())
    except DataError:
        return True


class CaptionWriter:
    """Writes one caption file per image according to ``mode``; counts what it did."""

    def __init__(
        self, mode: str = "skip", ext: str = ".txt", separator: str = ", ", first: tuple[str, ...] = ()
    ) -> None:
        if mode not in WRITE_MODES:
            raise ConfigError(f"caption mode must be one of {', '.join(WRITE_MODES)} (got {mode!r})")
        self.mode = mode
        self.ext = normalize_ext(ext)
        self.separator = separator
        #: tags that open every written caption whatever the mode (``--include-first`` trigger words:
        #: kohya's ``--keep_tokens`` keeps the first N tags in place, so they must come first)
        self.first = tuple(first)
        self.counts = {"written": 0, "skipped": 0, "kept": 0, "empty": 0}
        self.problems: list[str] = []

    def path_for(self, image: str | os.PathLike[str]) -> Path:
        return caption_path(image, self.ext)

    def skips(self, image: str | os.PathLike[str]) -> bool:
        """True when ``skip`` mode and a caption already exists (the image need not be tagged)."""
        return self.mode == "skip" and _has_caption(self.path_for(image))

    def write(self, image: str | os.PathLike[str], tags: list[str]) -> str:
        """Write the caption for ``image``; returns ``written``, ``skipped``, ``kept`` or ``empty``.

        ``empty``: no tag to write (none above the threshold, all excluded, ``--max-tags 0``). Nothing is
        written then: a blank caption would replace an existing one in ``overwrite`` mode, and training
        treats a blank file as an empty caption (kohya stops on it), so the image is left as it was.
        """
        target = self.path_for(image)
        if self.mode == "skip" and _has_caption(target):
            self.counts["skipped"] += 1
            return "skipped"
        read_only = read_only_problem(target)
        if read_only:  # a caption the user guarded with chmod a-w: the other images go on
            self.problems.append(read_only)
            self.counts["kept"] += 1
            return "kept"
        if target.exists() and self.mode in ("append", "prepend"):
            try:
                existing = split_caption(read_caption_text(target, "existing caption"), self.separator)
            except DataError as exc:
                self.problems.append(f"{exc}; left as is")
                self.counts["kept"] += 1
                return "kept"
            tags = merge_tags(existing, tags, self.mode)
        tags = put_first(tags, self.first)
        if not any(tag.strip() for tag in tags):
            self.counts["empty"] += 1
            return "empty"
        atomic_write_text(target, self.separator.join(tags) + "\n")
        self.counts["written"] += 1
        return "written"


class JsonlWriter:
    """One JSON object per line (sd-scripts ``image_path``/``caption``/``image_size`` plus probabilities)."""

    def __init__(self, handle: IO[str]) -> None:
        self.handle = handle
        self.count = 0

    def write(self, record: dict[str, Any]) -> None:
        self.handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.count += 1


@contextmanager
def jsonl_output(path: str | os.PathLike[str] | None) -> Iterator[JsonlWriter | None]:
    """Stream records into ``path`` atomically (the file appears when the run finishes)."""
    if path is None:
        yield None
        return
    with atomic_open(path, "w") as handle:
        yield JsonlWriter(handle)
