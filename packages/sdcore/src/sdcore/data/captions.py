"""Caption files and kohya-style caption processing (prefix/suffix, keep tokens, shuffle, tag and
caption dropout, secondary separator).

The semantics follow sd-scripts so that datasets and habits carry over: the caption is split at
the separator into tags, the first ``keep_tokens`` tags stay in place, every other tag is dropped
with probability ``tag_dropout`` and the survivors are shuffled; ``caption_dropout`` replaces the
whole caption with ``""`` (trains the unconditional case).
"""

from __future__ import annotations

import codecs
import math
import os
import random
import re
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


def caption_path_candidates(
    image_path: str | os.PathLike[str], extension: str = ".txt", *, fallback: bool = True
) -> list[Path]:
    """Caption files looked at for ``image_path``, in order (the configured extension first; the other of
    :data:`CAPTION_EXTENSIONS` after it unless ``fallback`` is off, as kohya reads only its ``caption_extension``).

    As kohya's ``read_caption``, a file named like a face-crop image, ``<name>_<cx>_<cy>_<w>_<h>``
    (five or more ``_``-separated parts), falls back to ``<name>``'s caption, so several crops
    share one caption file. kohya splits the whole path; sdcore splits only the file name, so a
    folder such as ``10_a_b_c`` cannot make ``img_x.png`` look for ``10.txt``."""
    image_path = Path(image_path)
    extension = _normalise_extension(extension)
    stems = [image_path.with_suffix("")]
    parts = stems[0].name.split("_")
    if len(parts) >= 5:
        stems.append(stems[0].with_name("_".join(parts[:-4])))
    candidates = [Path(f"{stem}{extension}") for stem in stems]
    if not fallback:
        return candidates
    for other in CAPTION_EXTENSIONS:
        if other != extension.lower():
            candidates.extend(Path(f"{stem}{other}") for stem in stems)
    return candidates


#: how :func:`filename_caption` turns a file name into a caption: ``stem`` (OneTrainer's ``prompt_source
#: filename``: mgds ``GetFilename(include_extension=False)``, the name without its last suffix, as it is),
#: ``spaces`` (SimpleTuner's ``caption_strategy filename``: the same stem with every ``_`` a space) or ``a1111``
#: (A1111's Train tab, TI/hypernetwork/DreamArtist, for an image without ``<stem>.txt``: the stem without its
#: leading run of digits and dashes and the blanks after it, so the numbers its Preprocess tab puts in front go:
#: ``00001-0-a circle.png`` is ``a circle``, ``0001.png`` is ``""``). Neither ``stem`` nor ``spaces`` strips
#: trailing numbers, hashes or dashes: ``a_photo_of_a_cat-123.png`` is ``a_photo_of_a_cat-123`` or
#: ``a photo of a cat-123``.
FILENAME_CAPTION_RULES = ("stem", "spaces", "a1111")

#: A1111's ``re_numbers_at_start`` (modules/textual_inversion/dataset.py), removed from the stem by ``a1111``
_A1111_NUMBERS_AT_START = re.compile(r"^[-\d]+\s*")


def filename_caption(
    image_path: str | os.PathLike[str], rule: str = "stem", *, word_regex: str = "", join_string: str = " "
) -> str:
    """The caption a trainer reads from the image's file name by ``rule`` (:data:`FILENAME_CAPTION_RULES`).

    ``word_regex`` (A1111's ``dataset_filename_word_regex`` setting, "Filename word regex"; ``""``, its default,
    is off) then keeps only the regex's matches, joined with ``join_string`` (its ``dataset_filename_join_string``,
    default ``" "``), as A1111's textual_inversion/dataset.py does with ``re.findall`` on the text left after
    its number prefix: ``00012-3-a_red circle.png`` with ``[a-z]+`` and ``_`` is ``a_red_circle``. A regex with
    one group joins what the group caught (``findall``'s rule); check a user's regex with
    :func:`word_regex_problem` first."""
    stem = Path(image_path).stem
    if rule == "spaces":
        text = stem.replace("_", " ")
    elif rule == "a1111":
        text = _A1111_NUMBERS_AT_START.sub("", stem)
    elif rule == "stem":
        text = stem
    else:
        raise ValueError(f"filename caption rule {rule!r}: choose one of {', '.join(FILENAME_CAPTION_RULES)}")
    if word_regex:
        text = join_string.join(re.findall(word_regex, text))
    return text


def word_regex_problem(pattern: str) -> str | None:
    """Why ``pattern`` cannot be a file-name word regex (``None``: it can, or it is empty, i.e. off).

    A pattern Python's ``re`` cannot compile fails (``re.error``, and the ``OverflowError`` of a repeat count past
    its limit, ``a{4294967296}``, or the ``RecursionError`` of parentheses nested too deep, which ``re`` raises
    instead); so does one with two or more groups, whose ``findall`` gives tuples that A1111's ``join`` stops on
    (``TypeError``) mid-training: write the others ``(?:...)``."""
    if not pattern:
        return None
    try:
        compiled = re.compile(pattern)
    except (re.error, OverflowError) as exc:
        return f"not a valid regular expression ({exc})"
    except RecursionError:
        return "not a valid regular expression (its groups are nested too deep)"
    if compiled.groups > 1:
        return (
            f"has {compiled.groups} groups: the words are the whole matches or one group's text; make the other "
            "groups non-capturing, (?:...)"
        )
    return None


def find_caption_file(
    image_path: str | os.PathLike[str], extension: str = ".txt", *, fallback: bool = True
) -> Path | None:
    """The caption file :func:`read_caption` would read, or ``None``."""
    for candidate in caption_path_candidates(image_path, extension, fallback=fallback):
        if candidate.is_file():
            return candidate
    return None


def read_caption(
    image_path: str | os.PathLike[str], extension: str = ".txt", *, all_lines: bool = False, fallback: bool = True
) -> str | None:
    """The caption of ``image_path``: ``None`` when no caption file exists, ``""`` when it is empty.

    Reads ``<stem><extension>`` and falls back to the other of ``.txt``/``.caption`` (not with ``fallback`` off:
    kohya's ``read_caption`` reads its ``caption_extension`` only). The file is
    decoded by :func:`read_caption_text` (UTF-8, a BOM accepted, or UTF-16 with its BOM; NUL bytes refused);
    like kohya only the first line counts, but leading blank lines are skipped. ``all_lines`` (kohya's ``enable_wildcard``) keeps every non-blank line, stripped and
    joined with ``"\\n"``, so that training picks one line per use. Raises :class:`DataError` for an
    unreadable or undecodable caption file.
    """
    path = find_caption_file(image_path, extension, fallback=fallback)
    if path is None:
        return None
    text = read_caption_text(path, "caption file")
    if all_lines:
        return _joined_lines(text)
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return ""


def _joined_lines(text: str) -> str:
    return "\n".join(line.strip() for line in text.splitlines() if line.strip())


def read_caption_lines(path: str | os.PathLike[str]) -> str:
    """Every non-blank line of the text file ``path``, stripped, joined with ``"\\n"`` (what
    ``read_caption(..., all_lines=True)`` returns for a caption file; used for one prompt file that
    captions a whole folder, OneTrainer's ``prompt_source`` ``concept``)."""
    return _joined_lines(read_caption_text(Path(path), "text file"))


def read_caption_text(path: str | os.PathLike[str], what: str = "caption file") -> str:
    """The text of a caption (or prompt) file, decoded as the one rule every reader of captions shares.

    UTF-8, with or without a BOM (Notepad's "UTF-8 with BOM"); UTF-16 with its BOM (Notepad's "Unicode" /
    "UTF-16 LE", which the BOM names without doubt; kohya's ``open(encoding="utf-8")`` stops on it). Anything else
    (a Windows code page such as cp1252, where ``café`` is the byte 0xE9) is ambiguous and raises
    :class:`DataError` naming the byte, what it would be in Windows-1252, and the fix, rather than training
    a guess. Line ends (CRLF, a lone CR) are left to ``str.splitlines``, which reads all of them.

    A NUL byte is valid UTF-8, so UTF-16 saved without a BOM (``c\0a\0t\0``: what some scripts and editors write)
    would decode as UTF-8 into a caption full of ``\x00`` and train in silence: a file with NUL bytes and no
    UTF-16 BOM is refused, as UTF-16 LE/BE without a BOM when most of its NULs are on odd/even offsets and it
    reads as printable UTF-16 text that way, else as a binary file. So is text that decodes to U+0000 under a BOM,
    and UTF-32 (its BOM names it; the captions' rule does not read it). The test for NUL is one ``bytes`` search,
    so a big prompt file costs nothing more."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read {what}: {exc.strerror or exc}") from None
    if raw.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):  # before UTF-16: FF FE 00 00 starts with FF FE
        raise DataError(
            f"{path}: {what} is UTF-32 (its BOM says so): save it as UTF-8 (Notepad: Save as, Encoding UTF-8)"
        )
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        codec = "utf-16-le" if raw.startswith(codecs.BOM_UTF16_LE) else "utf-16-be"
        try:
            if len(raw) % 2:  # Python's decoder drops a trailing odd byte: a binary file, not text
                raise UnicodeDecodeError(codec, raw, len(raw) - 1, len(raw), "odd number of bytes")
            text = raw[2:].decode(codec)
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: {what} starts with a UTF-16 BOM but is not UTF-16 ({exc.reason})") from None
        if "\0" in text:
            raise DataError(f"{path}: {what} holds NUL characters (U+0000): a binary file, not text")
        return text
    if b"\0" in raw:
        raise DataError(_nul_problem(path, what, raw))
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        byte = raw[exc.start]
        as_1252 = raw[exc.start : exc.start + 1].decode("cp1252", errors="replace")
        raise DataError(
            f"{path}: {what} is not UTF-8 (byte 0x{byte:02X} at {exc.start}, {as_1252!r} in Windows-1252: saved in a "
            f"Windows code page?): save it as UTF-8 (Notepad: Save as, Encoding UTF-8)"
        ) from None


def _reads_as_utf16(raw: bytes, codec: str) -> bool:
    """Whether ``raw`` (no BOM) decodes as ``codec`` into printable text without NUL characters (a decode and a
    check per line: a big file is not walked character by character in Python)."""
    if len(raw) % 2:
        return False
    try:
        text = raw.decode(codec)
    except UnicodeDecodeError:
        return False
    # str.isprintable is false for U+0000 and the other controls, and for tabs and line ends, which text holds:
    # splitlines cuts at exactly the line ends (\n \r \v \f \x1c-\x1e \x85 U+2028 U+2029), tabs become spaces
    return all(line.isprintable() for line in text.replace("\t", " ").splitlines())


def _nul_problem(path: Path, what: str, raw: bytes) -> str:
    """Why ``raw``, which holds NUL bytes and no UTF-16 BOM, is not read: UTF-16 without a BOM or binary.

    ASCII text in UTF-16 LE is ``c 00 a 00``: its NULs are high bytes, on odd offsets; in BE (``00 c 00 a``) on
    even ones. A character such as ``一`` (U+4E00, LE ``00 4E``) puts a NUL on the other side, so the rule is that
    more NULs are on the high-byte side than on the other and the whole file reads as printable text that way. A
    tie is no evidence (``00 4E 61 00`` is ``一a`` in LE and ``N愀`` in BE), and a file whose NULs sit anywhere, or
    a short one such as ``00 01 00 02`` (U+0001 U+0002 in BE), is binary."""
    odd = raw[1::2].count(0)
    even = raw.count(0) - odd
    for codec, high, low, name, iconv, side in (
        ("utf-16-le", odd, even, "UTF-16 LE", "UTF-16LE", "odd"),
        ("utf-16-be", even, odd, "UTF-16 BE", "UTF-16BE", "even"),
    ):
        if high > low and _reads_as_utf16(raw, codec):
            return (
                f"{path}: {what} looks like {name} without a BOM (its NUL bytes {'all' if not low else 'mostly'} at "
                f"{side} offsets): save it as UTF-8 (Notepad: Save as, Encoding UTF-8; iconv -f {iconv} -t UTF-8)"
            )
    return f"{path}: {what} holds NUL bytes (the first at {raw.index(0)}): a binary file, not text"


def _split_separator(separator: str) -> str:
    return separator.strip() or separator


def split_tags(caption: str, separator: str = ",") -> list[str]:
    """Tags of ``caption``: split at ``separator`` (stripped, so ``", "`` splits at ``","``), stripped,
    empty pieces removed."""
    return _tags(caption, _split_separator(separator))


def _tags(text: str, separator: str) -> list[str]:
    """kohya's ``[t.strip() for t in text.split(caption_separator) if t.strip()]``: the separator as given."""
    return [tag.strip() for tag in text.split(separator) if tag.strip()]


def join_affixes(caption: str, prefix: str = "", suffix: str = "") -> str:
    """A subset's ``caption_prefix`` and ``caption_suffix`` joined to a caption with one space each (kohya
    writes ``caption_prefix + " " + caption``): the first step of :func:`process_caption`."""
    if prefix:
        caption = f"{prefix} {caption}"
    if suffix:
        caption = f"{caption} {suffix}"
    return caption


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
    caption_separator: str = ",",
    drop: bool = False,
    enable_wildcard: bool = False,
    token_warmup_min: int = 1,
    token_warmup_step: float = 0.0,
    step: int = 0,
    max_steps: int = 0,
) -> str:
    """One training-time variant of ``caption`` (kohya's ``process_caption``, same order, same draws).

    1. ``prefix`` and ``suffix`` are joined to the caption with one space (kohya writes
       ``caption_prefix + " " + caption``), before anything else, so their tags count towards
       ``keep_tokens`` and take part in shuffling and tag dropout (with a multi-line caption the
       prefix sticks to the first line and the suffix to the last, as in kohya);
    2. whole-caption dropout: ``""`` with probability ``caption_dropout`` (one draw from ``rng``
       whenever the rate is positive, as kohya draws), or when ``drop`` is set (kohya's
       ``caption_dropout_every_n_epochs``, decided by the caller from the epoch);
    3. ``enable_wildcard``: one line of a multi-line caption, then one choice per ``{a|b|c}``
       (see :func:`choose_wildcards`); without it only the first line counts;
    4. only if shuffling, token warm-up or tag dropout is on: split into tags at ``caption_separator``
       (kohya's, default ``","``, used exactly as given; tags are stripped), keep the first
       ``keep_tokens`` tags fixed (with ``keep_tokens_separator``, kohya's ``|||``, everything before
       it instead, and everything after a second one as a fixed tail), keep only the first tags of the rest while the token
       warm-up runs (:func:`warmup_tag_count`), shuffle the rest, drop each of its tags with
       probability ``tag_dropout``, join with ``separator`` (kohya joins with ``", "`` whatever
       ``caption_separator`` is);
    5. ``secondary_separator`` (e.g. ``";;;"``) is replaced by ``caption_separator``: tags
       joined by it moved and were dropped as one tag in step 4 (applied with step 4 off too).

    With step 4 off the caption keeps its text as it is, a ``keep_tokens_separator`` included
    (kohya removes it only while splitting). ``step`` is the optimizer steps done before the one
    that uses this caption and ``max_steps`` the run's total (kohya's ``current_step`` and
    ``max_train_steps``). Randomness comes only from ``rng``, so a seeded ``rng`` reproduces the
    variant.
    """
    caption = join_affixes(caption, prefix, suffix)
    dropped = caption_dropout > 0.0 and rng.random() < caption_dropout
    if dropped or drop:
        return ""
    caption = choose_wildcards(caption, rng) if enable_wildcard else caption.split("\n")[0]
    warmup = warmup_steps(token_warmup_step, max_steps)
    # kohya tests the option as given (a fraction that floors to 0 steps still splits and re-joins)
    if shuffle or token_warmup_step > 0 or tag_dropout > 0.0:
        fixed, flex, tail = _split_parts(caption, keep_tokens, caption_separator, keep_tokens_separator)
        if warmup > 0 and step < warmup:
            flex = flex[: warmup_tag_count(len(flex), token_warmup_min, warmup, step)]
        if shuffle:
            rng.shuffle(flex)
        if tag_dropout > 0.0:
            flex = [tag for tag in flex if rng.random() >= tag_dropout]
        caption = separator.join(fixed + flex + tail)
    if secondary_separator:
        caption = caption.replace(secondary_separator, caption_separator)
    return caption


def _split_parts(
    caption: str, keep_tokens: int, separator: str, keep_tokens_separator: str | None
) -> tuple[list[str], list[str], list[str]]:
    """(fixed head, shuffled middle, fixed tail) tags of ``caption`` (kohya's three lists), split at
    ``separator`` exactly as given (kohya's ``caption_separator``)."""
    if keep_tokens_separator and keep_tokens_separator in caption:
        fixed_text, rest_text = caption.split(keep_tokens_separator, 1)
        tail_text = ""
        if keep_tokens_separator in rest_text:
            rest_text, tail_text = rest_text.split(keep_tokens_separator, 1)
        return _tags(fixed_text, separator), _tags(rest_text, separator), _tags(tail_text, separator)
    tags = _tags(caption, separator)
    keep = max(0, keep_tokens)
    return tags[:keep], tags[keep:], []


#: what stands for ``{{``/``}}`` while wildcards are chosen (lengthened until absent from the caption)
_LITERAL_OPEN, _LITERAL_CLOSE = "\u2985", "\u2986"
_WILDCARD_RE = re.compile(r"\{([^}]+)\}")


def choose_wildcards(caption: str, rng: random.Random) -> str:
    """kohya's ``enable_wildcard``: one line of a multi-line caption, then ``{a|b|c}`` -> one of them.

    The line is one ``rng.choice`` over the lines; each ``{...}`` group, left to right, is one
    ``rng.choice`` over its ``|``-separated options (an empty option is allowed: ``{a|}``).
    ``{{`` and ``}}`` are literal braces. Captions without lines or braces draw nothing beyond
    the line choice of a multi-line caption.
    """
    if "\n" in caption:
        caption = rng.choice(caption.split("\n"))
    opener, closer = _LITERAL_OPEN, _LITERAL_CLOSE
    while opener in caption or closer in caption:
        opener += _LITERAL_OPEN
        closer += _LITERAL_CLOSE
    caption = caption.replace("{{", opener).replace("}}", closer)
    caption = _WILDCARD_RE.sub(lambda match: rng.choice(match.group(1).split("|")), caption)
    return caption.replace(opener, "{").replace(closer, "}")


def has_wildcards(caption: str) -> bool:
    """Whether ``enable_wildcard`` can draw anything for ``caption`` (several lines or a ``{...}``)."""
    return "\n" in caption or _WILDCARD_RE.search(caption.replace("{{", "").replace("}}", "")) is not None


def warmup_steps(token_warmup_step: float, max_steps: int) -> float:
    """kohya's ``token_warmup_step``: a step count, or below 1 a fraction of the run's steps (floored)."""
    if token_warmup_step < 1:
        return float(math.floor(token_warmup_step * max_steps))
    return float(token_warmup_step)


def warmup_tag_count(tags: int, token_warmup_min: int, warmup: float, step: int) -> int:
    """How many of the ``tags`` shuffled tags a caption keeps at ``step`` during the token warm-up.

    kohya: ``floor(step * (tags - token_warmup_min) / warmup) + token_warmup_min``, so training
    starts from ``token_warmup_min`` tags (after the fixed ones) and reaches every tag at step
    ``warmup``; only used while ``step < warmup``.
    """
    return math.floor(step * ((tags - token_warmup_min) / warmup)) + token_warmup_min


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
