"""``sdcore generate --from-file``: one generation job per line, in A1111's or kohya's syntax.

Three kinds of line, told apart by their start (``#`` lines are comments, as in kohya's prompt files; empty
lines are skipped, as both tools skip them):

- **A1111** ("Prompts from file or textbox", ``scripts/prompts_from_file.py``): a line starting with ``--`` is
  shell-split options, ``--prompt "a cat" --negative_prompt "lowres" --steps 20 --seed 5``. ``--prompt`` and
  ``--negative_prompt`` take every word up to the next ``--`` option (A1111 joins them with spaces); every other
  tag takes one value. The tags are A1111's table (:data:`A1111_TAGS`); a tag sdcore has no setting for is a
  problem naming the line (where A1111 would print a traceback and render the whole line as a prompt).
  Booleans are ``true`` (anything else is false, as A1111 reads them).
- **kohya** (``gen_img.py --from_file``): a prompt followed by `` --n negative --w 512 --h 768 --s 20 --d 5 --l 7
  --t 0.6``, read by the sample prompts' parser (:func:`sdcore.train.sample_prompts.parse_prompt_line`, which also
  takes ``--ss`` sampler); ``--t`` is the img2img strength, ``--d 1,2,3`` a seed list (:func:`seed_list_parts`). Options sdcore has no setting for (``--am``, ``--nl``,
  ``--c``, Deep Shrink's ``--dsd1`` ...) are noted and left out, as the training samples note them.
- **plain**: any other line is the prompt; it takes every other setting from the command line.

A ``.json`` or ``.toml`` file is read as kohya's sample prompt files are (:func:`parse_prompt_file`).

Every line's settings replace the command line's; a line's prompt and negative prompt join the command line's
PROMPT and ``--negative`` when both are given, at the start (the default) or the end (A1111's "Insert prompts at
the" start/end; its rule: ``line + " " + prompt``). Seeds follow A1111's checkboxes (:func:`line_seeds`).
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DataError

#: the three syntaxes (:attr:`PromptJob.syntax`)
A1111, KOHYA, PLAIN = "a1111", "kohya", "plain"


def _int(text: str) -> int:
    return int(text)


def _float(text: str) -> float:
    return float(text)


def _text(text: str) -> str:
    return text


def _bool(text: str) -> bool:
    return text == "true"  # A1111's process_boolean_tag: only the exact word


def _styles(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


#: A1111's prompt_tags: tag -> (sdcore's parameter, how the value is read); ``None``: a tag sdcore does not take,
#: with the reason said. ``width``/``height`` and ``seed_resize_from_w``/``_h`` are joined into ``size`` and
#: ``seed_resize_from`` (:func:`job_params`). ``styles``: A1111 stores the text where it expects a list of names;
#: sdcore reads it as comma-separated style names.
A1111_TAGS: dict[str, tuple[str, Callable[[str], Any]] | str] = {
    "prompt": ("prompt", _text),
    "negative_prompt": ("negative", _text),
    "styles": ("styles", _styles),
    "seed": ("seed", _int),
    "subseed": ("subseed", _int),
    "subseed_strength": ("subseed_strength", _float),
    "seed_resize_from_w": ("seed_resize_from_w", _int),
    "seed_resize_from_h": ("seed_resize_from_h", _int),
    "sampler_name": ("sampler", _text),
    "batch_size": ("batch", _int),
    "n_iter": ("n_iter", _int),
    "steps": ("steps", _int),
    "cfg_scale": ("cfg", _float),
    "width": ("width", _int),
    "height": ("height", _int),
    "tiling": ("tiling", _bool),
    "sd_model": "sdcore generate loads one model for every line: run one command per model (--model)",
    "sampler_index": "an index into A1111's sampler list: give --sampler_name",
    "restore_faces": "sdcore has no face restoration",
    "outpath_samples": "the images go where -o says",
    "outpath_grids": "sdcore writes no grid",
    "prompt_for_display": "the infotext shows the prompt",
    "do_not_save_samples": "every image is written",
    "do_not_save_grid": "sdcore writes no grid",
}
#: A1111 tags whose "false"/"true" values change nothing here: accepted with a note instead of refused
_HARMLESS = {"outpath_samples", "outpath_grids", "prompt_for_display", "do_not_save_grid"}

#: kohya gen_img.py's line options that sdcore takes beyond the sample prompts' (``--t``: img2img strength;
#: ``--d`` with a comma-separated seed list, :func:`seed_list_parts`)
KOHYA_KEPT = ("t", "d")


@dataclass(frozen=True)
class PromptJob:
    """One line's job: the generate parameters it sets (sdcore's names; ``width``/``height`` and
    ``seed_resize_from_w``/``_h`` still apart), what was noted, and where it came from."""

    number: int
    syntax: str
    values: dict[str, Any]
    notes: tuple[str, ...] = field(default=())
    #: what ``number`` counts: a text file's ``line``, a JSON file's ``prompt``, a TOML file's ``subset`` (the
    #: words the sample prompts' parser names them by)
    unit: str = "line"

    @property
    def where(self) -> str:
        return f"{self.unit} {self.number}"


def _a1111_line(line: str, number: int) -> tuple[dict[str, Any], list[str], list[str]]:
    """``(values, notes, problems)`` of an A1111 tag line (its cmdargs rules, see the module doc)."""
    values: dict[str, Any] = {}
    notes: list[str] = []
    problems: list[str] = []
    where = f"line {number}"
    try:
        args = shlex.split(line)
    except ValueError as exc:  # an unclosed quote
        return values, notes, [f"{where}: {exc} (A1111's lines are split as a shell splits them)"]
    pos = 0
    while pos < len(args):
        arg = args[pos]
        if not arg.startswith("--"):
            problems.append(f"{where}: {arg!r} is not an option (each A1111 tag starts with --)")
            pos += 1
            continue
        tag = arg[2:]
        if pos + 1 >= len(args):
            problems.append(f"{where}: {arg} has no value")
            break
        if tag in ("prompt", "negative_prompt"):  # every word up to the next option
            words = [args[pos + 1]]
            pos += 2
            while pos < len(args) and not args[pos].startswith("--"):
                words.append(args[pos])
                pos += 1
            values["prompt" if tag == "prompt" else "negative"] = " ".join(words)
            continue
        text, pos = args[pos + 1], pos + 2
        spec = A1111_TAGS.get(tag)
        if spec is None:
            known = ", ".join(f"--{name}" for name, entry in A1111_TAGS.items() if not isinstance(entry, str))
            problems.append(f"{where}: unknown option {arg} (A1111's tags that sdcore takes: {known})")
        elif isinstance(spec, str):
            if tag in _HARMLESS or (tag in ("do_not_save_samples", "restore_faces") and text != "true"):
                notes.append(f"{where}: {arg} {text} is not used ({spec})")
            else:
                problems.append(f"{where}: {arg} is not available ({spec})")
        else:
            name, read = spec
            try:
                values[name] = read(text)
            except ValueError:
                kind = "an integer" if read is _int else "a number"
                problems.append(f"{where}: {arg} needs {kind}, got {text!r}")
    return values, notes, problems


def _kohya_line(line: str, number: int) -> tuple[dict[str, Any], list[str]]:
    """``(values, notes)`` of a kohya line; a bad number raises :class:`ConfigError` naming the line."""
    from ..train.sample_prompts import parse_prompt_line

    prompt = parse_prompt_line(line, f"line {number}", keep=KOHYA_KEPT)
    return _sample_values(prompt, f"line {number}")


def _sample_values(prompt: Any, where: str) -> tuple[dict[str, Any], list[str]]:
    """A :class:`~sdcore.train.sample_prompts.SamplePrompt`'s settings as generate parameters, and notes for
    what generate does not take from it."""
    values: dict[str, Any] = {"prompt": prompt.prompt}
    if prompt.negative:
        values["negative"] = prompt.negative
    for name in ("width", "height", "steps", "seed", "cfg", "sampler"):
        if getattr(prompt, name) is not None:
            values[name] = getattr(prompt, name)
    notes = []
    unused = list(prompt.ignored)
    for letter, text in prompt.kept:
        if letter == "t":
            try:
                values["strength"] = float(text)
            except ValueError:
                raise ConfigError(f"{where}: --t needs a number, got {text!r}") from None
        elif letter == "d" and not text:  # a bare --d: as an option sdcore has no setting for
            unused.append("--d")
        elif letter == "d":  # gen_img.py: int() of every part, so a part that is not a seed fails the line
            bad = [part.strip() for part in text.split(",") if not part.strip().isdigit()]
            if bad:
                raise ConfigError(
                    f"{where}: --d {text}: every seed of a list is a whole number 0 or more, got "
                    f"{', '.join(repr(part) for part in bad)}"
                )
            values["seeds"] = tuple(int(part) for part in text.split(","))
    unused += [flag for flag, value in (("--g", prompt.guidance), ("--ci", prompt.reference),
               ("--i", prompt.inpaint_image), ("--cn", prompt.control_image)) if value is not None]  # fmt: skip
    if unused:
        notes.append(f"{where}: {', '.join(unused)} not used (no such setting per line in sdcore generate)")
    return values, notes


def read_prompt_file(path: str, text: str | None = None) -> tuple[list[PromptJob], list[str]]:
    """The jobs of ``path`` (``-``: ``text``, read from stdin by the caller) and every problem found, each naming
    its line; nothing is raised for a line's problem, so that all are said at once."""
    where = "--from-file -" if path == "-" else f"--from-file {path}"
    if text is None:  # the captions' one decoding rule: Notepad's BOM and UTF-16 read as written, a code page is
        from ..data.captions import read_caption_text  # a problem naming the file, never replaced characters

        try:
            text = read_caption_text(path, "prompt file")
        except DataError as exc:  # unreadable too: "PATH: cannot read prompt file: ..."
            return [], [f"--from-file {exc}"]  # the message starts with the path
    text = text.removeprefix("\ufeff")  # a BOM piped in on stdin (PowerShell's Out-File, Notepad's files)
    suffix = "" if path == "-" else Path(path).suffix.lower()
    if suffix in (".json", ".toml"):  # kohya's sample prompt files: one job per entry
        from ..train.sample_prompts import parse_prompt_file

        try:
            prompts = parse_prompt_file(text, suffix, where)
        except ConfigError as exc:
            return [], [str(exc)]
        jobs = []
        for number, prompt in enumerate(prompts, 1):
            unit = "prompt" if suffix == ".json" else "subset"
            values, notes = _sample_values(prompt, f"{where} {unit} {number}")
            jobs.append(PromptJob(number, KOHYA, values, tuple(notes), unit))
        return jobs, [] if jobs else [f"{where}: no prompts in it"]
    jobs, problems = [], []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("--"):
            values, notes, found = _a1111_line(line, number)
            problems += [f"{where} {problem}" for problem in found]
            if not found:  # a line with a problem is said once, not again for what it then lacks
                jobs.append(PromptJob(number, A1111, values, tuple(f"{where} {note}" for note in notes)))
            continue
        try:
            values, notes = _kohya_line(line, number)
        except ConfigError as exc:
            problems.append(f"{where} {exc}")
            continue
        syntax = KOHYA if len(values) > 1 or notes else PLAIN
        jobs.append(PromptJob(number, syntax, values, tuple(f"{where} {note}" for note in notes)))
    if not jobs and not problems:
        problems.append(f"{where}: no prompts in it (empty lines and # comments only)")
    return jobs, problems


def _joined(line_text: str | None, base: str | None, position: str) -> str | None:
    """A1111's "Insert prompts at the" start/end: the line's text and the command line's, a space between."""
    if not line_text:
        return base
    if not base:
        return line_text
    return f"{line_text} {base}" if position == "start" else f"{base} {line_text}"


def job_params(params: dict[str, Any], job: PromptJob, position: str) -> tuple[dict[str, Any], list[str]]:
    """The parameters of ``job``: the command line's (``params``) with the line's settings over them, the
    prompts joined (:func:`_joined`), and the problems of a size or seed resize given by half (the other side is
    taken from ``--size``/``--seed-resize-from``, refused where there is none), or of no prompt at all."""
    values = dict(job.values)
    cell = dict(params)
    problems: list[str] = []
    where = job.where
    for pair, (first, second), label in (
        ("size", ("width", "height"), "--width/--height"),
        ("seed_resize_from", ("seed_resize_from_w", "seed_resize_from_h"), "--seed_resize_from_w/_h"),
    ):
        if first in values or second in values:
            base = params[pair]
            if (first not in values or second not in values) and base is None:
                option = "--size" if pair == "size" else "--seed-resize-from"
                problems.append(f"{where}: {label} given by half; give both, or {option} for the other")
                values.pop(first, None), values.pop(second, None)
                continue
            width = values.pop(first, None)
            height = values.pop(second, None)
            width = base[0] if width is None else width
            height = base[1] if height is None else height
            # A1111 writes no "Seed resize from" when a side is 0 or less: off
            cell[pair] = None if pair == "seed_resize_from" and min(width, height) <= 0 else (width, height)
    prompt, negative = values.pop("prompt", None), values.pop("negative", None)
    cell.update(values)
    cell["prompt"] = _joined(prompt, params["prompt"], position)
    cell["negative"] = _joined(negative, params["negative"], position) or ""
    if not cell["prompt"]:
        cell["prompt"] = ""  # the other checks still read it
        problems.append(f"{where}: no prompt (the line gives none, and there is no PROMPT on the command line)")
    for name, least, most in (("batch", 1, 64), ("n_iter", 1, 1000), ("steps", 1, 1000)):
        if name in values and not least <= values[name] <= most:
            bounds = f"{least}-{most}"
            problems.append(f"{where}: {name.replace('_', ' ')} {values[name]} is not in {bounds}")
            cell[name] = params[name]  # the other checks (the output files' count) run on the command line's
    if "subseed_strength" in values and not 0.0 <= values["subseed_strength"] <= 1.0:
        problems.append(f"{where}: subseed strength {values['subseed_strength']} is not in [0, 1]")
    if "strength" in values and not 0.0 <= values["strength"] <= 1.0:
        problems.append(f"{where}: --t (strength) {values['strength']} is not in [0, 1]")
    return cell, problems


def seed_list_parts(
    seeds: tuple[int, ...], count: int, batch: int, *, single: bool
) -> tuple[list[tuple[int, int]], str]:
    """The batches ``(first seed, images)`` that render a line's ``count`` images (``--batch`` x ``--n-iter``)
    with kohya ``gen_img.py``'s seed list ``--d 1,2,3``, and a note (``""`` when none is due).

    kohya's rule (gen_img.py: the line repeats ``--images_per_prompt`` times, each image popping the list's next
    seed): the line makes as many images as without the list, image ``i`` takes seed ``i``, and seeds past the
    images are not used. Past the list's end kohya repeats its last seed (the same image again); sdcore goes on
    with last + 1, last + 2, as a single ``--d`` gives image ``i`` seed + i. Images render in batches of at most
    ``batch`` consecutive seeds (an image depends on its seed only, not on its batch); ``single``: one image a
    batch (with a variation strength every image of a batch shares the first seed, A1111's rule)."""
    image_seeds = list(seeds[:count])
    image_seeds += [seeds[-1] + k for k in range(1, count - len(image_seeds) + 1)]
    parts: list[tuple[int, int]] = []
    for seed in image_seeds:
        if parts and not single and parts[-1][1] < batch and parts[-1][0] + parts[-1][1] == seed:
            parts[-1] = (parts[-1][0], parts[-1][1] + 1)
        else:
            parts.append((seed, 1))
    listed = ",".join(str(seed) for seed in seeds)
    note = ""
    if len(seeds) > count:
        unused = ", ".join(str(seed) for seed in seeds[count:])
        note = (f"--d {listed}: the line makes {count} image{'s' if count > 1 else ''} (--batch x --n-iter, kohya's "
                f"--images_per_prompt), so seed{'s' if len(seeds) - count > 1 else ''} {unused} "
                f"{'are' if len(seeds) - count > 1 else 'is'} not used (kohya's rule); --n-iter {len(seeds)} "
                "renders one image per seed")  # fmt: skip
    elif len(seeds) < count:
        more = ", ".join(str(seed) for seed in image_seeds[len(seeds) :])
        note = (f"--d {listed}: the line makes {count} images, so the ones past the list take seeds {more} (kohya "
                "repeats the last seed, the same image again)")  # fmt: skip
    return parts, note


def line_seeds(seed: int, count: int, step: int, *, iterate: bool, same: bool, draw: Callable[[], int]) -> list[int]:
    """Each line's seed before a line's own ``--seed``, by A1111's checkboxes: "Iterate seed every line"
    (``iterate``) gives line ``k`` ``seed + k * step``, ``step`` being the command line's batch size times its
    batch count (A1111: ``p.seed += p.batch_size * p.n_iter``, the main settings, whatever a line sets); with it
    or "Use same random seed for all lines" (``same``) a -1 is drawn once (``draw``) for all; with neither, every
    line keeps the command line's seed, and a -1 lets each line draw its own."""
    if (iterate or same) and seed < 0:
        seed = draw()
    return [seed + (k * step if iterate else 0) for k in range(count)]


__all__ = [
    "A1111",
    "A1111_TAGS",
    "KOHYA",
    "KOHYA_KEPT",
    "PLAIN",
    "PromptJob",
    "job_params",
    "line_seeds",
    "read_prompt_file",
    "seed_list_parts",
]
