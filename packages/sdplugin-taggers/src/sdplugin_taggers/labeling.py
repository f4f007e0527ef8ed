"""Label a folder: list images, tag them with any tagger, write captions/JSONL, summarise.

Shared by every ``sdcore tag <name>`` command so skip/overwrite/append, progress and the summary
behave the same whichever model produced the tags.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from sdcore.errors import ConfigError, DataError

from .images import list_images
from .tags import TagResult
from .writer import CaptionWriter, jsonl_output, normalize_ext


class Tagger(Protocol):
    def iter_tag(self, images: Iterable[Any]) -> Iterator[TagResult]: ...


@dataclass
class Summary:
    """Counts for one run plus the tag frequency (for the report users read after a long run)."""

    found: int = 0
    tagged: int = 0
    skipped: int = 0
    unreadable: int = 0
    kept: int = 0
    #: tagged, but no tag to write (none above the threshold): no caption file written
    empty: int = 0
    frequency: Counter[str] = field(default_factory=Counter)
    unreadable_files: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def lines(self, top: int = 20) -> list[str]:
        out = [
            f"images found: {self.found}, tagged: {self.tagged}, skipped (caption exists): {self.skipped}, "
            f"unreadable: {self.unreadable}" + (f", existing caption kept: {self.kept}" if self.kept else "")
        ]
        if self.empty:
            out.append(
                f"  no tag for {self.empty} image(s) (none above the threshold, or all excluded): no caption written, "
                "an existing one left as is"
            )
        for name in self.unreadable_files[:10]:
            out.append(f"  unreadable: {name}")
        if len(self.unreadable_files) > 10:
            out.append(f"  ... and {len(self.unreadable_files) - 10} more")
        out.extend(f"  {p}" for p in self.problems[:10])
        if self.frequency:
            out.append(f"top {min(top, len(self.frequency))} tags:")
            width = max(len(t) for t, _ in self.frequency.most_common(top))
            out.extend(f"  {tag:<{width}}  {count}" for tag, count in self.frequency.most_common(top))
        return out


def _nested_problem(folder: str | os.PathLike[str], images: list[Path], recursive: bool) -> str | None:
    if images or recursive or not Path(folder).is_dir():
        return None
    nested = len(list_images(folder, recursive=True))
    if not nested:
        return None
    # kohya's layout keeps the images in DIR/10_name/: tagging DIR itself would write nothing
    return (
        f"{folder}: no image directly in it, {nested} in its sub-folders (a kohya dataset folder "
        "such as data/10_name?): add --recursive (kohya's tagger flag too) or name a sub-folder"
    )


def check_folder(
    folder: str | os.PathLike[str],
    *,
    recursive: bool = False,
    ext: str | None = None,
    outputs: dict[str, str | os.PathLike[str] | None] | None = None,
) -> list[Path]:
    """The images a tagging command will read, after the checks that need no model (run before one loads).

    Raises one :class:`DataError` naming every problem: a folder whose images are all in sub-folders
    without ``recursive``, an invalid caption extension ``ext``, and an output file of ``outputs``
    (option name -> path: ``--json``, ``--list``) that is one of the images or their captions (writing
    it would replace that file) or the same file as another output.
    """
    images = list_images(folder, recursive=recursive)
    problems = [p for p in [_nested_problem(folder, images, recursive)] if p]
    caption_ext: str | None = None
    if ext is not None:
        try:
            caption_ext = normalize_ext(ext)
        except ConfigError as exc:
            problems.append(str(exc))
    given = {name: Path(path) for name, path in (outputs or {}).items() if path is not None}
    if given:
        inputs: dict[Path, str] = {}
        for image in images:
            inputs[image.resolve()] = f"the image {image}"
            if caption_ext is not None:
                inputs[image.with_suffix(caption_ext).resolve()] = f"the caption file of {image}"
        seen: dict[Path, str] = {}
        for name, path in given.items():
            target = path.resolve()
            if target in inputs:
                problems.append(f"{name} {path} is {inputs[target]}: it would be replaced; give a file of its own")
            elif target in seen:
                problems.append(f"{seen[target]} and {name} are the same file {path}: give each its own")
            seen.setdefault(target, name)
    if problems:
        raise DataError("; ".join(problems))
    return images


def label_folder(
    tagger: Tagger,
    folder: str | os.PathLike[str],
    *,
    writer: CaptionWriter,
    recursive: bool = False,
    json_path: str | os.PathLike[str] | None = None,
    progress: bool = True,
    render: Callable[[TagResult], list[str]] | None = None,
) -> Summary:
    """Tag every image in ``folder`` and write captions; returns the :class:`Summary`.

    In ``skip`` mode images that already have a caption are not decoded or tagged at all.
    ``render`` turns a result into the caption's parts (default: ``result.tags()``).
    """
    from tqdm import tqdm

    summary = Summary()
    images = list_images(folder, recursive=recursive)
    problem = _nested_problem(folder, images, recursive)
    if problem:
        raise DataError(problem)
    summary.found = len(images)
    todo: list[Path] = []
    for image in images:
        if writer.skips(image):
            summary.skipped += 1
        else:
            todo.append(image)
    render = render or (lambda r: r.tags())
    with jsonl_output(json_path) as jsonl, tqdm(total=len(todo), unit="img", disable=not progress) as bar:
        for result in tagger.iter_tag(todo):
            bar.update(1)
            if result.error is not None:
                summary.unreadable += 1
                summary.unreadable_files.append(f"{result.path} ({result.error})")
                continue
            parts = render(result)
            status = writer.write(result.path or "", parts)
            if status == "kept":
                summary.kept += 1
            elif status == "skipped":
                summary.skipped += 1
            elif status == "empty":
                summary.empty += 1
            summary.tagged += 1
            summary.frequency.update(parts)
            if jsonl is not None:
                jsonl.write(result.to_json())
    summary.problems.extend(writer.problems)
    return summary
