"""Caption files and kohya-style caption processing (prefix/suffix, keep tokens, shuffle, tag and
caption dropout, secondary separator).

The semantics follow sd-scripts so that datasets and habits carry over: the caption is split at
the separator into tags, the first ``keep_tokens`` tags stay in place, every other tag is dropped
with probability ``tag_dropout`` and the survivors are shuffled; ``caption_dropout`` replaces the
whole caption with ``""`` (trains the unconditional case).
"""

from __future__ import annotations

import os
import random
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from ..errors import DataError

#: The two caption extensions in use; when the configured one is missing the other is tried,
#: because a wrong extension silently training without captions is a classic kohya trap.
CAPTION_EXTENSIONS: tuple[str, ...] = (".txt", ".caption")


def _normalise_extension(extension: str) -> str:
    extension = extension.strip()
    return extension if extension.startswith(".") else f".{extension}"


def caption_path_candidates(image_path: str | os.PathLike[str], extension: str = ".txt") -> list[Path]:
    """Caption files looked at for ``image_path``, in order (the configured extension first)."""
    image_path = Path(image_path)
    extension = _normalise_extension(extension)
    stem = image_path.with_suffix("")
    candidates = [Path(f"{stem}{extension}")]
    for other in CAPTION_EXTENSIONS:
        if other != extension.lower():
            candidates.append(Path(f"{stem}{other}"))
    return candidates


def find_caption_file(image_path: str | os.PathLike[str], extension: str = ".txt") -> Path | None:
    """The caption file :func:`read_caption` would read, or ``None``."""
    for candidate in caption_path_candidates(image_path, extension):
        if candidate.is_file():
            return candidate
    return None


def read_caption(image_path: str | os.PathLike[str], extension: str = ".txt") -> str | None:
    """The caption of ``image_path``: ``None`` when no caption file exists, ``""`` when it is empty.

    Reads ``<stem><extension>`` and falls back to the other of ``.txt``/``.caption``. The file is
    UTF-8 (a BOM is accepted); like kohya only the first line counts, but leading blank lines are
    skipped. Raises :class:`DataError` for an unreadable or non-UTF-8 caption file.
    """
    path = find_caption_file(image_path, extension)
    if path is None:
        return None
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: caption file is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read caption file: {exc.strerror or exc}") from None
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return ""


def _split_separator(separator: str) -> str:
    return separator.strip() or separator


def split_tags(caption: str, separator: str = ",") -> list[str]:
    """Tags of ``caption``: split at ``separator``, stripped, empty pieces removed."""
    sep = _split_separator(separator)
    return [tag.strip() for tag in caption.split(sep) if tag.strip()]


def process_caption(
    caption: str,
    *,
    shuffle: bool = False,
    keep_tokens: int = 0,
    tag_dropout: float = 0.0,
    caption_dropout: float = 0.0,
    rng: random.Random,
    separator: str = ", ",
    keep_tokens_separator: str | None = None,
    prefix: str = "",
    suffix: str = "",
    secondary_separator: str | None = None,
    drop: bool = False,
) -> str:
    """One training-time variant of ``caption`` (kohya's ``process_caption``, same order).

    1. ``prefix`` and ``suffix`` are joined to the caption with one space (kohya writes
       ``caption_prefix + " " + caption``), before anything else, so their tags count towards
       ``keep_tokens`` and take part in shuffling and tag dropout;
    2. whole-caption dropout: ``""`` with probability ``caption_dropout`` (one draw from ``rng``
       whenever the rate is positive, as kohya draws), or when ``drop`` is set (kohya's
       ``caption_dropout_every_n_epochs``, decided by the caller from the epoch);
    3. only if shuffling or tag dropout is on: split into tags at ``separator`` (stripped, so
       ``", "`` splits at ``","``), keep the first ``keep_tokens`` tags fixed (with
       ``keep_tokens_separator``, kohya's ``|||``, everything before it instead), drop each
       remaining tag with probability ``tag_dropout``, shuffle the survivors, join with ``separator``;
    4. ``secondary_separator`` (e.g. ``";;;"``) is replaced by the split separator (``","``): tags
       joined by it moved and were dropped as one tag in step 3 (applied with step 3 off too).

    Without any of these the caption is returned unchanged. Randomness comes only from ``rng``,
    so a seeded ``rng`` reproduces the variant.
    """
    if prefix:
        caption = f"{prefix} {caption}"
    if suffix:
        caption = f"{caption} {suffix}"
    dropped = caption_dropout > 0.0 and rng.random() < caption_dropout
    if dropped or drop:
        return ""
    caption = _shuffle_and_drop(caption, shuffle, keep_tokens, tag_dropout, rng, separator, keep_tokens_separator)
    if secondary_separator:
        caption = caption.replace(secondary_separator, _split_separator(separator))
    return caption


def _shuffle_and_drop(
    caption: str,
    shuffle: bool,
    keep_tokens: int,
    tag_dropout: float,
    rng: random.Random,
    separator: str,
    keep_tokens_separator: str | None,
) -> str:
    if keep_tokens_separator and keep_tokens_separator in caption:
        fixed_text, rest_text = caption.split(keep_tokens_separator, 1)
        fixed = split_tags(fixed_text, separator)
        rest = split_tags(rest_text, separator)
        if not shuffle and tag_dropout <= 0.0:
            return separator.join(fixed + rest)
    else:
        if not shuffle and tag_dropout <= 0.0:
            return caption
        tags = split_tags(caption, separator)
        keep = max(0, keep_tokens)
        fixed, rest = tags[:keep], tags[keep:]
    if tag_dropout > 0.0:
        rest = [tag for tag in rest if rng.random() >= tag_dropout]
    if shuffle:
        rng.shuffle(rest)
    return separator.join(fixed + rest)


def dropped_at_epoch(every_n_epochs: int, epoch: int) -> bool:
    """kohya's ``caption_dropout_every_n_epochs``: the whole caption is dropped in every N-th epoch.

    ``epoch`` counts from 0 as the runtime does; kohya counts from 1 and drops when
    ``epoch % N == 0``, i.e. in epochs N, 2N, ... Negative epochs (evaluation) never drop.
    """
    return every_n_epochs > 0 and epoch >= 0 and (epoch + 1) % every_n_epochs == 0


def tag_frequencies(captions: Iterable[str], separator: str = ",") -> dict[str, int]:
    """How many captions contain each tag (a tag repeated inside one caption counts once).

    Sorted by count, most frequent first, then alphabetically.
    """
    counts: Counter[str] = Counter()
    for caption in captions:
        counts.update(set(split_tags(caption, separator)))
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))
