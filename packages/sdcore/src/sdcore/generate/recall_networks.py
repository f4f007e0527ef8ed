"""``--from-png``'s LoRAs: the infotext's "Lora hashes" find a LoRA saved under another name, and the old
"Additional Networks" fields become ``<lora:...>`` tags, as A1111 does when an infotext is pasted.

Facts rewritten from A1111 (``extensions-builtin/Lora``):

- ``lora_script.py`` ``infotext_pasted``: "Lora hashes" is ``name: hash, name: hash`` (names without ``,``);
  every ``<lora:NAME:`` of the pasted prompt whose NAME has an entry is rewritten to the alias of the LoRA on
  disk with that 12-hex hash (``networks.available_network_hash_lookup``, keyed by ``NetworkOnDisk.shorthash``:
  :func:`sdcore.models.hashes.network_short_hash`), whether or not NAME itself names a file: a file that has
  the name but another hash (a retrained LoRA) gives way to the one with the image's hash. A hash no file has
  leaves the tag as written.
- ``networks.py`` ``infotext_pasted``: for each ``AddNet Model N`` whose ``AddNet Module N`` is ``LoRA`` the
  model name without its ``(hash)`` suffix becomes ``<lora:name:W>``, W being ``AddNet Weight A N`` (default
  ``1.0``; the extension's ``Weight B``, its text-encoder weight, is not read); the tags are appended to the
  prompt after a newline, all together. ``AddNet Enabled`` is not read.

sdcore differs in what it cannot do otherwise or does for free: it hashes lazily (A1111 only knows the hashes it
has cached; sdcore hashes the file the name resolves to, then the other LoRA files, until one matches, so a
folder of hundreds is read only when a tag needs it); the tag becomes the file's name, or its path when that
name is ambiguous in the folders (sdcore resolves names by file name, not by ``ss_output_name``); the hires
prompt is rewritten too (A1111 only rewrites the prompt); an X/Y/Z plot's Prompt S/R searches the prompt as the
PNG writes it, each cell being rewritten after (A1111's user sees the pasted prompt before typing the S/R; the
sdcore user sees the PNG's); ``<lora:NAME>`` without a weight counts too (A1111's ``re_lora`` wants a ``:``);
the hash in an AddNet ``name(hash)`` counts as a "Lora hashes" entry for that name (it is kohya's
``sshs_model_hash``, the same 12 digits); a ``Weight B`` other than ``Weight A`` stays in the "ignored" line.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..console import warning_line
from ..errors import NetworkMismatchError, SdcoreError
from .prompt_syntax import _NETWORK_RE

if TYPE_CHECKING:
    from .networks import PromptNetworkHandler

LORA_HASHES = "Lora hashes"
#: the tag A1111's paste rewrites (its ``re_lora``); ``<lyco:`` is left as written, as there
LORA_TAG = "lora"
_ADDNET_MODEL = "AddNet Model "
#: A1111's ``re_network_name``: ``name(0123abcd)`` -> ``name``
_NAME_WITH_HASH = re.compile(r"(.*)\s*\(([0-9a-fA-F]+)\)")


def parse_lora_hashes(value: str) -> dict[str, str]:
    """The "Lora hashes" field as A1111 reads it: ``name: hash`` entries split at ``,`` then at the first ``:``,
    both stripped (an entry without ``:`` is skipped, where A1111 fails)."""
    found: dict[str, str] = {}
    for entry in value.split(","):
        name, sep, short = entry.partition(":")
        if sep and name.strip():
            found[name.strip()] = short.strip()
    return found


def addnet_tags(extra: Mapping[str, str]) -> tuple[str, set[str], dict[str, str]]:
    """The kohya Additional Networks fields as A1111's paste reads them: the ``<lora:name:weight>`` tags to append
    (``""`` when none), the field names that are thereby used (``AddNet Enabled``, each LoRA's Module, Model,
    Weight A, and Weight B when it equals Weight A), and ``name -> hash`` from the ``name(hash)`` models."""
    tags, used, hashes, _ = _read_addnet(extra)
    return tags, used, hashes


def _read_addnet(extra: Mapping[str, str]) -> tuple[str, set[str], dict[str, str], dict[str, str]]:
    """:func:`addnet_tags`, and ``name -> field`` (``AddNet Model 1``) for each hash, which the rewrite line
    names: a PNG without "Lora hashes" would otherwise send its reader looking for a field it does not have."""
    tags: list[str] = []
    used: set[str] = set()
    hashes: dict[str, str] = {}
    fields: dict[str, str] = {}
    for key, model in extra.items():
        if not key.startswith(_ADDNET_MODEL):
            continue
        number = key[len(_ADDNET_MODEL) :]
        module = f"AddNet Module {number}"
        if extra.get(module) != "LoRA":
            continue
        name = model
        match = _NAME_WITH_HASH.match(model)
        if match:
            name = match.group(1).rstrip()  # "name (hash)": no trailing blank in the tag
            if len(match.group(2)) == 12:  # the extension's old 8-digit (legacy) hashes are no A1111 hash
                hashes[name] = match.group(2).lower()
                fields[name] = key
        weight_a, weight_b = f"AddNet Weight A {number}", f"AddNet Weight B {number}"
        multiplier = extra.get(weight_a, "1.0")
        tags.append(f"<lora:{name}:{multiplier}>")
        used.update((key, module, weight_a))
        if weight_b in extra and _same_number(extra[weight_b], multiplier):
            used.add(weight_b)
    if tags:
        used.add("AddNet Enabled")
    return "".join(tags), used, hashes, fields


def _same_number(a: str, b: str) -> bool:
    try:
        return float(a) == float(b)
    except ValueError:
        return a == b


def png_lora_hashes(extra: Mapping[str, str]) -> dict[str, str]:
    """``prompt name -> 12-hex hash`` an infotext gives: its "Lora hashes" entries, then its AddNet models'."""
    return _hashes_and_fields(extra)[0]


def _hashes_and_fields(extra: Mapping[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """:func:`png_lora_hashes` and the field each hash comes from (``Lora hashes``, ``AddNet Model 1`` ...)."""
    _, _, hashes, fields = _read_addnet(extra)
    listed = parse_lora_hashes(extra.get(LORA_HASHES, ""))
    hashes.update(listed)
    fields.update(dict.fromkeys(listed, LORA_HASHES))
    return hashes, fields


class _HashFinder:
    """Finds the LoRA file with a given hash among ``handler``'s files, hashing each file once and only when a
    tag needs it."""

    def __init__(self, handler: PromptNetworkHandler) -> None:
        self.handler = handler
        self.hashes: dict[Path, str | None] = {}
        self._candidates: list[Path] | None = None

    def hash_of(self, path: Path) -> str | None:
        from ..models.hashes import network_short_hash

        if path not in self.hashes:
            try:
                self.hashes[path] = network_short_hash(path).lower()
            except (OSError, SdcoreError):  # unreadable: no hash to match (its name still gets the usual message)
                self.hashes[path] = None
        return self.hashes[path]

    def named(self, name: str) -> Path | None:
        """The file ``name`` resolves to as generation resolves it, ``None`` when it does not."""
        try:
            return self.handler.find(name)
        except NetworkMismatchError:
            return None

    def with_hash(self, short: str) -> Path | None:
        if self._candidates is None:
            self._candidates = [p for p in self.handler.available() if self.handler.accepts(p)]
        for path in self._candidates:
            if self.hash_of(path) == short:
                return path
        return None

    def tag_name(self, path: Path) -> str | None:
        """What a tag calls ``path``: the first of its stem, its file name, its absolute path and its path from the
        working folder that resolves to it, ``None`` when none does (a tag's name ends at ``:``, so a Windows
        path with its drive letter, ``C:\\loras\\x.safetensors``, cannot be one)."""
        candidates = [path.stem, path.name, str(path.absolute())]
        with contextlib.suppress(ValueError):  # Windows: another drive than the working folder's
            candidates.append(os.path.relpath(path))
        for text in dict.fromkeys(candidates):
            if any(c in text for c in ":<>") or text != text.strip():
                continue
            found = self.named(text)
            if found is not None and found.samefile(path):
                return text
        return None


def relink_loras(
    prompt: str, hashes: Mapping[str, str], finder: _HashFinder, fields: Mapping[str, str] | None = None
) -> tuple[str, list[str]]:
    """``prompt`` with each ``<lora:NAME...>`` whose NAME has an entry in ``hashes`` pointing at the file with
    that hash (see the module docstring), and one line per rewrite or per hash no file has. ``fields`` names
    the infotext field each name's hash comes from, for that line (default: "Lora hashes")."""
    lines: list[str] = []

    def relink(match: re.Match[str]) -> str:
        if match.group(1) != LORA_TAG:
            return match.group(0)
        body = match.group(2)
        written = body.split(":", 1)[0]
        name = written.strip()
        # the field lists names without "," (the entries' separator): "<lora:a,b:1>" is "ab" there
        key = name if name in hashes else name.replace(",", "")
        short = hashes.get(key, "").lower()
        if not short:
            return match.group(0)
        named = finder.named(name)
        if named is not None and finder.hash_of(named) == short:
            return match.group(0)
        found = finder.with_hash(short)
        if found is None:
            if named is not None:
                lines.append(
                    warning_line(
                        f"the PNG's <lora:{name}> had hash {short}; {named} has {finder.hash_of(named)} and no "
                        "LoRA file here has the PNG's"
                    )
                )
            return match.group(0)
        new = finder.tag_name(found)
        if new is None:
            lines.append(
                warning_line(
                    f"the PNG's <lora:{name}> has the hash of {found}, which no <lora:...> tag can name "
                    "(rename the file); left as written"
                )
            )
            return match.group(0)
        field = (fields or {}).get(key, LORA_HASHES)
        lines.append(f"<lora:{name}> -> <lora:{new}> (hash {short}, from the PNG's {field})")
        return f"<{LORA_TAG}:{new}{body[len(written) :]}>"

    return _NETWORK_RE.sub(relink, prompt), lines


def relink_recalled_loras(
    params: Mapping[str, Any],
    cells: Sequence[dict[str, Any]],
    recalled: Any,
    handlers: Mapping[str | None, Any],
    given: Collection[str],
    echo: Callable[[str], None],
) -> None:
    """``--from-png``: each cell's prompt and hires prompt that came from the PNG (``params``' value is the PNG's,
    and not ``given`` on the command line) with their LoRA tags found by hash (:func:`relink_loras`); each line
    goes to ``echo`` once. ``cells`` are the X/Y/Z plot's (``[params]`` without one), after Prompt S/R: a search
    string names the tags as the PNG writes them. Nothing is hashed when the infotext has no LoRA hashes or no
    LoRA handler is registered."""
    handler = handlers.get(LORA_TAG)
    hashes, fields = _hashes_and_fields(recalled.parameters.extra)
    if handler is None or not hashes:
        return
    finder = _HashFinder(handler)
    for name in ("prompt", "hr_prompt"):
        taken = recalled.values.get(name)
        if not taken or name in given or params.get(name) != taken:
            continue
        said: dict[str, None] = {}
        for cell in cells:
            cell[name], lines = relink_loras(cell[name], hashes, finder, fields)
            said.update(dict.fromkeys(lines))
        for line in said:
            echo(line)


__all__ = [
    "LORA_HASHES",
    "addnet_tags",
    "parse_lora_hashes",
    "png_lora_hashes",
    "relink_loras",
    "relink_recalled_loras",
]
