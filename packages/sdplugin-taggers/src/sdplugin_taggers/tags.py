"""Tag lists, thresholds and caption formatting: pure functions shared by every tagger.

Kept free of numpy and onnxruntime so the formatting rules (the part users argue about) are
testable on hand-made numbers. The reference behaviour is SmilingWolf's v3 ``wd-tagger`` space:
probabilities strictly *above* the threshold are kept, MCut per category with a 0.15 floor for
characters, characters before general tags. Tags are listed in the model's order (kohya's
tagger: the order of ``selected_tags.csv``) or, with ``order="confidence"``, most likely first.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sdcore.errors import ConfigError, ModelFormatError

RATING, GENERAL, CHARACTER = 9, 0, 4
CATEGORY_NAMES = {RATING: "rating", GENERAL: "general", CHARACTER: "character"}

#: Kaomoji whose underscore is part of the face; ``_`` -> space would break them.
_KAOMOJI_TEXT = "0_0 (o)_(o) +_+ +_- ._. <o>_<o> <|>_<|> =_= >_< 3_3 6_9 >_o @_@ ^_^ o_o u_u x_x |_| ||_||"
KAOMOJI = frozenset(_KAOMOJI_TEXT.split(" "))
RATINGS_PLACEMENT = ("first", "last", "off")
#: ``model``: the tagger's output order (the tag list file), as kohya's tagger writes captions;
#: ``confidence``: most likely first (SmilingWolf's space, the A1111 tagger extension)
TAG_ORDERS = ("model", "confidence")
_ESCAPE = re.compile(r"([\\()])")


@dataclass(frozen=True)
class TagList:
    """Output-aligned tag names with their category indices (row i of the CSV = output i)."""

    names: tuple[str, ...]
    categories: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.names)

    def indices(self, category: int) -> list[int]:
        return [i for i, c in enumerate(self.categories) if c == category]


def load_selected_tags(path: str | Path) -> TagList:
    """Read a WD ``selected_tags.csv`` (``tag_id,name,category,count``) with a real CSV parser.

    Names may contain commas and quotes, so ``split(',')`` is wrong. Categories other than
    rating/general/character are kept as given (they are simply never selected).
    """
    csv_path = Path(path)
    if not csv_path.is_file():
        raise ModelFormatError(f"{csv_path}: tag list not found (a WD model folder needs selected_tags.csv)")
    try:
        with open(csv_path, encoding="utf-8", newline="") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if header is None or [h.strip() for h in header[:3]] != ["tag_id", "name", "category"]:
                raise ModelFormatError(f"{csv_path}: header must start with tag_id,name,category (got {header})")
            names: list[str] = []
            cats: list[int] = []
            for line_no, row in enumerate(reader, start=2):
                if not row:
                    continue
                if len(row) < 3:
                    raise ModelFormatError(f"{csv_path}:{line_no}: expected at least 3 columns, got {len(row)}")
                try:
                    cats.append(int(row[2]))
                except ValueError:
                    raise ModelFormatError(f"{csv_path}:{line_no}: category {row[2]!r} is not an integer") from None
                names.append(row[1])
    except UnicodeDecodeError as exc:
        raise ModelFormatError(f"{csv_path}: not UTF-8 text ({exc.reason})") from exc
    if not names:
        raise ModelFormatError(f"{csv_path}: no tags listed")
    return TagList(tuple(names), tuple(cats))


def mcut_threshold(probs: Sequence[float]) -> float:
    """Maximum Cut Thresholding (Largeron et al. 2012): the midpoint of the largest gap.

    Sort descending, find the largest difference between neighbours, return the mean of the two
    values around it. With fewer than two values there is no gap and 0.0 is returned.
    """
    values = sorted((float(p) for p in probs), reverse=True)
    if len(values) < 2:
        return 0.0
    gaps = [values[i] - values[i + 1] for i in range(len(values) - 1)]
    t = max(range(len(gaps)), key=gaps.__getitem__)  # first largest gap
    return (values[t] + values[t + 1]) / 2


def select(
    probs: Sequence[float],
    tags: TagList,
    *,
    general_threshold: float = 0.35,
    character_threshold: float = 0.85,
    mcut: bool = False,
    character_floor: float = 0.15,
) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """Split one output vector into ``(rating, general, character)`` dicts.

    ``rating`` holds every rating probability; the other two only tags strictly above their
    threshold (or above the MCut threshold, floored at ``character_floor`` for characters).
    """
    if len(probs) != len(tags):
        raise ModelFormatError(f"model gives {len(probs)} outputs but the tag list has {len(tags)} tags")
    rating: dict[str, float] = {}
    by_cat: dict[int, list[tuple[str, float]]] = {GENERAL: [], CHARACTER: []}
    for name, cat, p in zip(tags.names, tags.categories, probs, strict=True):
        if cat == RATING:
            rating[name] = float(p)
        elif cat in by_cat:
            by_cat[cat].append((name, float(p)))
    if mcut:
        g_thr = mcut_threshold([p for _, p in by_cat[GENERAL]])
        c_thr = max(character_floor, mcut_threshold([p for _, p in by_cat[CHARACTER]]))
    else:
        g_thr, c_thr = general_threshold, character_threshold
    general = {n: p for n, p in by_cat[GENERAL] if p > g_thr}
    character = {n: p for n, p in by_cat[CHARACTER] if p > c_thr}
    return rating, general, character


class Selector:
    """:func:`select` for numpy output rows, with the category index arrays computed once.

    The Python version walks 10k tags per image; this one keeps the per-image cost on the main
    thread (which also feeds the GPU) to a few vectorised operations.
    """

    def __init__(
        self,
        tags: TagList,
        *,
        general_threshold: float = 0.35,
        character_threshold: float = 0.85,
        mcut: bool = False,
        character_floor: float = 0.15,
    ) -> None:
        import numpy as np

        self.tags = tags
        self.general_threshold = general_threshold
        self.character_threshold = character_threshold
        self.mcut = mcut
        self.character_floor = character_floor
        cats = np.asarray(tags.categories)
        self._idx = {c: np.nonzero(cats == c)[0] for c in (RATING, GENERAL, CHARACTER)}

    def _mcut(self, values: object) -> float:
        import numpy as np

        v = np.sort(np.asarray(values, dtype=np.float64))[::-1]
        if v.size < 2:
            return 0.0
        t = int(np.argmax(v[:-1] - v[1:]))
        return float((v[t] + v[t + 1]) / 2)

    def __call__(self, probs: object) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
        import numpy as np

        row = np.asarray(probs, dtype=np.float64).reshape(-1)
        if row.size != len(self.tags):
            raise ModelFormatError(f"model gives {row.size} outputs but the tag list has {len(self.tags)} tags")
        r_idx, g_idx, c_idx = self._idx[RATING], self._idx[GENERAL], self._idx[CHARACTER]
        if self.mcut:
            g_thr = self._mcut(row[g_idx])
            c_thr = max(self.character_floor, self._mcut(row[c_idx]))
        else:
            g_thr, c_thr = self.general_threshold, self.character_threshold
        rating = {self.tags.names[i]: float(row[i]) for i in r_idx}
        general = {self.tags.names[i]: float(row[i]) for i in g_idx[row[g_idx] > g_thr]}
        character = {self.tags.names[i]: float(row[i]) for i in c_idx[row[c_idx] > c_thr]}
        return rating, general, character


def normalize_tag(tag: str) -> str:
    """Comparison key: case-folded, underscores as spaces, escapes removed, whitespace squeezed.

    Used on both sides of every comparison (exclude lists, de-duplication against existing
    captions) so ``cropped_shirt``, ``cropped shirt`` and ``Cropped Shirt`` all match.
    """
    tag = tag.replace("\\(", "(").replace("\\)", ")").replace("\\\\", "\\")
    return " ".join(tag.replace("_", " ").split()).casefold()


def split_tag_list(text: str) -> list[str]:
    """Split a user's comma-separated tag list, dropping empty parts."""
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_tag_replacement(text: str) -> tuple[tuple[str, str], ...]:
    """kohya's ``--tag_replacement`` syntax, ``source1,target1;source2,target2`` (``\\,`` and ``\\;`` escape a
    comma or semicolon inside a tag), as (source, target) pairs; every malformed pair named in one error."""
    comma, semicolon = "\0comma\0", "\0semicolon\0"
    escaped = text.replace("\\,", comma).replace("\\;", semicolon)
    pairs: list[tuple[str, str]] = []
    bad: list[str] = []
    for part in escaped.split(";"):
        if not part.strip():
            continue
        sides = [side.replace(comma, ",").replace(semicolon, ";").strip() for side in part.split(",")]
        if len(sides) != 2 or not all(sides):
            bad.append(part.replace(comma, "\\,").replace(semicolon, "\\;"))
        else:
            pairs.append((sides[0], sides[1]))
    if bad:
        raise ConfigError(f"tag replacement must be source,target pairs separated by ';' (got {'; '.join(bad)!r})")
    return tuple(pairs)


@dataclass(frozen=True)
class TagFormat:
    """How selected tags become a caption (the options every tagger command shares).

    ``include_first`` tags open every caption (added even when the model did not predict them:
    trigger words); ``exclude`` tags are dropped; ``max_tags`` caps the predicted general +
    character tags by confidence. ``order`` is one of :data:`TAG_ORDERS`: ``model`` keeps the
    order of the tag dicts, which every tagger fills in its output (tag-file) order. Escaping is
    off by default because training captions are literal.
    """

    underscores: bool = False
    escape: bool = False
    ratings: str = "off"
    exclude: tuple[str, ...] = ()
    include_first: tuple[str, ...] = ()
    max_tags: int | None = None
    characters_first: bool = True
    order: str = "model"
    #: kohya's ``--always_first_tags``: these move to the front of the caption when it has them (unlike
    #: ``include_first``, never added); ``replace``: kohya's ``--tag_replacement`` (source, target) pairs
    first_if_found: tuple[str, ...] = ()
    replace: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.order not in TAG_ORDERS:
            raise ConfigError(f"tag order must be one of {', '.join(TAG_ORDERS)} (got {self.order!r})")
        if self.ratings not in RATINGS_PLACEMENT:
            raise ConfigError(f"ratings must be one of {', '.join(RATINGS_PLACEMENT)} (got {self.ratings!r})")
        if self.max_tags is not None and self.max_tags < 0:
            raise ConfigError(f"max_tags must be >= 0 (got {self.max_tags})")

    def render(self, tag: str) -> str:
        """Underscore and escape rules for one tag name."""
        if not self.underscores and tag not in KAOMOJI:
            tag = tag.replace("_", " ")
        if self.escape:
            tag = _ESCAPE.sub(r"\\\1", tag)
        return tag


def format_tags(
    rating: Mapping[str, float],
    general: Mapping[str, float],
    character: Mapping[str, float],
    fmt: TagFormat,
) -> list[str]:
    """Order and render the selected tags into the caption's tag list (no duplicates)."""
    excluded = {normalize_tag(t) for t in fmt.exclude}
    renames = {normalize_tag(source): target for source, target in fmt.replace}

    def ordered_items(d: Mapping[str, float]) -> list[tuple[str, float]]:
        items = [(renames.get(normalize_tag(n), n), p) for n, p in d.items()]
        if fmt.order == "model":
            return items
        return sorted(items, key=lambda kv: (-kv[1], kv[0]))

    chars = ordered_items(character)
    gens = ordered_items(general)
    predicted = chars + gens if fmt.characters_first else gens + chars
    predicted = [(n, p) for n, p in predicted if normalize_tag(n) not in excluded]
    if fmt.max_tags is not None:
        keep = {n for n, _ in sorted(predicted, key=lambda kv: (-kv[1], kv[0]))[: fmt.max_tags]}
        predicted = [(n, p) for n, p in predicted if n in keep]
    ordered = list(fmt.include_first) + [n for n, _ in predicted]
    rating_tag = max(rating.items(), key=lambda kv: kv[1])[0] if rating and fmt.ratings != "off" else None
    if rating_tag is not None:
        rating_tag = renames.get(normalize_tag(rating_tag), rating_tag)
    if rating_tag is not None and normalize_tag(rating_tag) not in excluded:
        if fmt.ratings == "first":
            ordered.insert(0, rating_tag)
        else:
            ordered.append(rating_tag)
    if fmt.first_if_found:
        found = {normalize_tag(t) for t in ordered}
        ordered = [t for t in fmt.first_if_found if normalize_tag(t) in found] + ordered
    out: list[str] = []
    seen: set[str] = set()
    for tag in ordered:
        key = normalize_tag(tag)
        if key in seen:
            continue
        seen.add(key)
        out.append(fmt.render(tag))
    return out


@dataclass
class TagResult:
    """What a tagger found in one image: probabilities per category plus the caption's tag list.

    ``general`` and ``character`` hold only the selected tags; ``rating`` holds every rating.
    ``tags()`` returns the ordered, rendered caption tags for the tagger's :class:`TagFormat`
    (or another one passed in). Captioners set ``text`` (a prompt) instead of tag dicts.
    """

    path: str | None
    rating: dict[str, float] = field(default_factory=dict)
    general: dict[str, float] = field(default_factory=dict)
    character: dict[str, float] = field(default_factory=dict)
    fmt: TagFormat = field(default_factory=TagFormat)
    size: tuple[int, int] | None = None
    error: str | None = None
    text: str | None = None

    def tags(self, fmt: TagFormat | None = None) -> list[str]:
        if self.text is not None:  # a captioner's prompt: its comma-separated phrases
            return split_tag_list(self.text)
        return format_tags(self.rating, self.general, self.character, fmt or self.fmt)

    def caption(self, fmt: TagFormat | None = None) -> str:
        if self.text is not None:
            return self.text
        return ", ".join(self.tags(fmt))

    def to_json(self) -> dict[str, object]:
        """sd-scripts-compatible JSONL record with our probabilities added."""
        record: dict[str, object] = {"image_path": self.path, "caption": self.caption()}
        if self.size is not None:
            record["image_size"] = list(self.size)
        record["rating"] = {k: round(v, 6) for k, v in self.rating.items()}
        record["general"] = {k: round(v, 6) for k, v in self.general.items()}
        record["character"] = {k: round(v, 6) for k, v in self.character.items()}
        return record
