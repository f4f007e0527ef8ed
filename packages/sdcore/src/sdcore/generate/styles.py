"""A1111's prompt styles (``styles.csv``), read and applied the way A1111 does.

Facts from A1111 ``modules/styles.py`` (rewritten here):

- The file is CSV, UTF-8 with an optional BOM, with a header row; columns ``name``, ``prompt`` (older files:
  ``text``) and optionally ``negative_prompt``. Spaces after a comma are skipped; rows without a name or whose
  name starts with ``#`` are comments; a later row with the same name replaces an earlier one.
- A style's text joins a prompt like this (``merge_prompts``): when it contains ``{prompt}``, every
  ``{prompt}`` is replaced by the prompt as it is; otherwise the stripped prompt and the stripped style text
  are joined with ``", "``, leaving out whichever is empty. The negative prompt takes the styles' negative
  texts by the same rule.
- Several styles apply in the order given, each to the result of the previous one (``apply_styles_to_prompt``),
  to the prompt, the negative prompt, and to the hires prompts when they are set (``processing.py``).
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from pathlib import Path

from ..data.captions import read_caption_text
from ..errors import ConfigError, DataError

#: A1111's styles file name (in its root folder, the parent of ``models``)
STYLES_FILE = "styles.csv"


@dataclass(frozen=True)
class PromptStyle:
    name: str
    prompt: str
    negative_prompt: str = ""


def merge_prompts(style_prompt: str, prompt: str) -> str:
    """One style's text applied to ``prompt`` (A1111's rule, see the module docstring)."""
    if "{prompt}" in style_prompt:
        return style_prompt.replace("{prompt}", prompt)
    return ", ".join(part for part in (prompt.strip(), style_prompt.strip()) if part)


def apply_styles(prompt: str, style_prompts: list[str]) -> str:
    """``style_prompts`` applied one after the other, each to the previous result."""
    for style_prompt in style_prompts:
        prompt = merge_prompts(style_prompt, prompt)
    return prompt


def read_styles(path: str | os.PathLike[str]) -> dict[str, PromptStyle]:
    """The styles of an A1111 ``styles.csv``, by name, in file order; a one-line error when it cannot be read."""
    file = Path(path)
    try:
        # Excel saves UTF-8 with a BOM, UTF-16 or the Windows code page: the captions' one decoding rule, which
        # reads the first two and refuses the last with what to do; in locales whose decimal mark is a comma it
        # separates the columns with ";" (its "CSV (semicolon)"), read as such when the header row says so
        text = read_caption_text(file, "styles file")
        header = text.split("\n", 1)[0]
        delimiter = ";" if "name" in [c.strip().strip('"') for c in header.split(";")] else ","
        with io.StringIO(text, newline="") as handle:
            reader = csv.DictReader(handle, skipinitialspace=True, delimiter=delimiter)
            fields = reader.fieldnames or []
            if "name" not in fields or not ({"prompt", "text"} & set(fields)):
                raise ConfigError(
                    f"styles file {file} needs a header row with the columns name, prompt (and optionally "
                    f"negative_prompt), got {', '.join(fields) or 'none'}"
                )
            styles: dict[str, PromptStyle] = {}
            for row in reader:
                name = row.get("name") or ""
                if not name or name.startswith("#"):
                    continue
                prompt = row.get("prompt") if "prompt" in row else row.get("text")
                styles[name] = PromptStyle(name, prompt or "", row.get("negative_prompt") or "")
    except DataError as exc:
        if not file.exists():
            raise ConfigError(f"styles file {file} does not exist (pass --styles-file)") from None
        raise ConfigError(str(exc)) from None
    except (OSError, csv.Error) as exc:
        raise ConfigError(f"cannot read styles file {file}: {exc}") from None
    return styles


def select_styles(
    styles: dict[str, PromptStyle], names: list[str] | tuple[str, ...], path: str | os.PathLike[str]
) -> list[PromptStyle]:
    """The named styles in the order given; unknown names are one error that lists the known ones."""
    unknown = [name for name in names if name not in styles]
    if unknown:
        known = ", ".join(repr(name) for name in styles) or "none"
        raise ConfigError(f"unknown style {', '.join(repr(n) for n in unknown)} in {path}; styles there: {known}")
    return [styles[name] for name in names]


__all__ = ["STYLES_FILE", "PromptStyle", "apply_styles", "merge_prompts", "read_styles", "select_styles"]
