"""A1111's prompt editing: ``[from:to:when]`` and alternation ``[a|b]``, the prompt changing with the step,
and ``AND``: several prompts guiding one image (composable diffusion).

The forms, as A1111's ``modules/prompt_parser.py`` reads them (behaviour rewritten here, no A1111 code):

- ``[from:to:when]`` renders ``from`` up to step ``when`` and ``to`` after it; ``[to:when]`` adds ``to``
  after ``when``; ``[from::when]`` removes ``from`` after it. ``when`` with a decimal point is a fraction
  of the steps (``0.25``, ``.5``), without one an absolute step (``10``); it is truncated to an integer
  and capped at the step count. The step it names is the last one the ``from`` text renders at: a
  schedule entry ``(end, text)`` covers every denoiser call ``n`` (counted from 0) with ``n <= end``, so
  ``[cat:dog:10]`` renders "cat" for calls 0..10 and "dog" from call 11 on.
- ``[a|b|c]`` takes ``a``, ``b``, ``c`` in turn, one per schedule step: call ``n`` reads step
  ``max(1, n)``, so the first two calls both read ``a`` (the same quirk as A1111).
- Groups nest (``[a:[b:c:5]:2]``), and ``(x)``, ``(x:1.2)``, ``[x]`` emphasis around or inside them is kept
  for the emphasis parser, which reads each rendered text afterwards.
- A prompt that does not parse (an unmatched bracket inside a group, a ``|`` outside ``[...]``, a
  backslash at the very end or before a line break) renders as written at every step, as A1111 does on a
  grammar error.

A1111 (and Forge) count denoiser evaluations, not sampler steps: a second-order sampler (Heun, DPM2)
evaluates the model twice per step, so its edits come at half the step count, in A1111 and here; a CFG
pass of prompt and negative is one evaluation, in one batched call or two (the conditioning is switched
per evaluation, :mod:`sdcore.generate.step_conditioning`).

``AND`` splits the positive prompt (never the negative one) into parts; a part ending in ``:number``
weighs that much (``a cat AND a hat:0.5``; this holds for a prompt without ``AND`` too: a trailing
``:1.5`` scales its guidance), 1 otherwise. Each part has its own schedule, and the guided prediction is
``uncond + cfg * sum(weight_i * (cond_i - uncond))`` (A1111's ``combine_denoised``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .prompt_syntax import _NUMBER

_WHEN_RE = re.compile(rf"\s*({_NUMBER})\s*\]")
_AND_RE = re.compile(r"\bAND\b")
#: a part's text and its optional ``:weight``; DOTALL: A1111's pattern crosses line breaks, so a
#: prompt written over several lines keeps its weight
_PART_WEIGHT_RE = re.compile(r"^(.*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$", re.DOTALL)


@dataclass(frozen=True)
class _Text:
    text: str


@dataclass(frozen=True)
class _Group:
    """Emphasis brackets, kept as written: ``(a)``, ``(a:b)``, ``[a]``."""

    opening: str
    parts: tuple[tuple[_Node, ...], ...]  # separated by ':' when more than one
    closing: str


@dataclass(frozen=True)
class _Scheduled:
    before: tuple[_Node, ...]
    after: tuple[_Node, ...]
    when: str


@dataclass(frozen=True)
class _Alternate:
    options: tuple[tuple[_Node, ...], ...]


_Node = _Text | _Group | _Scheduled | _Alternate


class _Unparsable(Exception):
    """Inside a group, a character the grammar does not allow there."""


class _Parser:
    """A recursive-descent reading of A1111's schedule grammar. At the top level a bracket that opens no
    valid group is literal text (the grammar's stray-bracket rule); inside a group it fails the group."""

    def __init__(self, text: str) -> None:
        self.text = text

    def top(self) -> tuple[_Node, ...]:
        nodes: list[_Node] = []
        index = 0
        text = self.text
        while index < len(text):
            char = text[index]
            if char == "|":
                raise _Unparsable  # no rule takes a '|' outside square brackets
            if char in "[(":
                try:
                    node, end = self.group(index)
                except _Unparsable:
                    nodes.append(_Text(char))  # a stray bracket
                    index += 1
                    continue
                nodes.append(node)
                index = end
                continue
            if char in ")]:":
                nodes.append(_Text(char))
                index += 1
                continue
            end = self.plain_end(index)
            nodes.append(_Text(text[index:end]))
            index = end
        return tuple(nodes)

    def plain_end(self, index: int) -> int:
        """The end of a run of plain text (backslash escapes included) starting at ``index``. A backslash
        escapes any one character but a line break: one at the very end or before a line break matches
        no rule of A1111's grammar, which then fails as a whole."""
        text = self.text
        while index < len(text) and text[index] not in "[]():|":
            if text[index] == "\\":
                if index + 1 == len(text) or text[index + 1] == "\n":
                    raise _Unparsable
                index += 2
            else:
                index += 1
        return index

    def inner(self, index: int, stops: str) -> tuple[tuple[_Node, ...], int]:
        """Nodes up to the first character of ``stops`` (not consumed); anything else special fails."""
        nodes: list[_Node] = []
        text = self.text
        while True:
            if index >= len(text):
                raise _Unparsable
            char = text[index]
            if char in stops:
                return tuple(nodes), index
            if char in "[(":
                node, index = self.group(index)
                nodes.append(node)
            elif char in ")]:|":
                raise _Unparsable
            else:
                end = self.plain_end(index)
                nodes.append(_Text(text[index:end]))
                index = end

    def group(self, index: int) -> tuple[_Node, int]:
        return self.square(index) if self.text[index] == "[" else self.round(index)

    def round(self, index: int) -> tuple[_Node, int]:
        first, index = self.inner(index + 1, ":)")
        if self.text[index] == ")":
            return _Group("(", (first,), ")"), index + 1
        second, index = self.inner(index + 1, ")")
        return _Group("(", (first, second), ")"), index + 1

    def square(self, index: int) -> tuple[_Node, int]:
        text = self.text
        first, index = self.inner(index + 1, ":|]")
        if text[index] == "]":
            return _Group("[", (first,), "]"), index + 1
        if text[index] == "|":
            options = [first]
            while text[index] == "|":
                option, index = self.inner(index + 1, "|]")
                options.append(option)
            return _Alternate(tuple(options)), index + 1
        when = _WHEN_RE.match(text, index + 1)  # [to:when]
        if when is not None:
            return _Scheduled((), first, when.group(1)), when.end()
        second, index = self.inner(index + 1, ":]")
        when = _WHEN_RE.match(text, index + 1) if text[index] == ":" else None
        if when is None:
            raise _Unparsable
        return _Scheduled(first, second, when.group(1)), when.end()


def _when_step(when: str, steps: int, first_steps: int | None = None) -> int:
    """``when`` as a step: a fraction of ``steps`` when written with a decimal point, else absolute;
    truncated and capped at ``steps``. In a hires pass (``first_steps``: the first pass's steps) A1111
    counts on from the first pass: a fraction from 1.0, an absolute step from ``first_steps``."""
    value = float(when)
    if "." in when:
        value = (value - (1.0 if first_steps is not None else 0.0)) * steps
    else:
        value -= first_steps or 0
    return min(steps, int(value))


def _walk(nodes: Sequence[_Node]) -> list[_Node]:
    out: list[_Node] = []
    for node in nodes:
        out.append(node)
        if isinstance(node, _Group):
            for part in node.parts:
                out.extend(_walk(part))
        elif isinstance(node, _Scheduled):
            out.extend(_walk(node.before))
            out.extend(_walk(node.after))
        elif isinstance(node, _Alternate):
            for option in node.options:
                out.extend(_walk(option))
    return out


def _render(nodes: Sequence[_Node], step: int, steps: int, first_steps: int | None = None) -> str:
    pieces: list[str] = []
    for node in nodes:
        if isinstance(node, _Text):
            pieces.append(node.text)
        elif isinstance(node, _Group):
            inside = ":".join(_render(part, step, steps, first_steps) for part in node.parts)
            pieces.append(node.opening + inside + node.closing)
        elif isinstance(node, _Scheduled):
            chosen = node.before if step <= _when_step(node.when, steps, first_steps) else node.after
            pieces.append(_render(chosen, step, steps, first_steps))
        else:
            pieces.append(_render(node.options[(step - 1) % len(node.options)], step, steps, first_steps))
    return "".join(pieces)


def schedule_steps(steps: int, scheduler: Any) -> int:
    """The step count A1111 builds schedules over for a sampler: twice the steps for a second-order one
    (Heun, DPM2: two model calls per step; A1111's ``total_steps`` of a "second_order" sampler), so a fraction
    (``[a:b:0.5]``) lands halfway through the calls while an absolute ``when`` counts calls. A diffusers
    scheduler's ``order`` is its model calls per step."""
    return steps * 2 if int(getattr(scheduler, "order", 1) or 1) == 2 else steps


def composable_parts(prompt: str) -> list[tuple[str, float]]:
    """``prompt`` split at ``AND`` into ``(text, weight)`` parts (one part when there is no ``AND``)."""
    parts = []
    for part in _AND_RE.split(prompt):
        match = _PART_WEIGHT_RE.search(part)
        text, weight = (match.group(1), match.group(2)) if match is not None else (part, None)  # always matches
        parts.append((text, float(weight) if weight is not None else 1.0))
    return parts


def prompt_schedule(prompt: str, steps: int, first_steps: int | None = None) -> list[tuple[int, str]]:
    """``[(end_step, text), ...]``: the text ``prompt`` renders up to each end step, ends ascending, the
    last one ``steps`` (A1111's schedule for a prompt; one entry when nothing changes). ``first_steps``:
    ``steps`` are a hires pass's after a first pass of that many (see :func:`_when_step`)."""
    try:
        nodes = _Parser(prompt).top()
    except _Unparsable:
        return [(steps, prompt)]
    ends = {steps}
    for node in _walk(nodes):
        if isinstance(node, _Scheduled):
            end = _when_step(node.when, steps, first_steps)
            if end >= 1:
                ends.add(end)
        elif isinstance(node, _Alternate):
            ends.update(range(1, steps + 1))
    return [(end, _render(nodes, end, steps, first_steps)) for end in sorted(ends)]


def text_at_call(schedule: Sequence[tuple[int, str]], call: int) -> str:
    """The text a denoiser call ``call`` (counted from 0) reads: the first entry with ``call <= end``; past
    the last end the first entry, as A1111's ``reconstruct_cond_batch`` (its index stays 0). Only a sampler
    that calls the model more often than its schedule's steps gets there: PLMS, whose first step evaluates
    twice (``steps + 1`` calls; A1111's and diffusers' PNDM alike), so its last call reads the first text."""
    for end, text in schedule:
        if call <= end:
            return text
    return schedule[0][1]


@dataclass(frozen=True)
class StepPrompts:
    """The prompts (split into their ``AND`` parts) and negative prompts of one batch as schedules over
    ``steps``.

    ``prompts`` holds every part of every prompt, in order; ``owners[i]`` is the image part ``i`` guides and
    ``weights[i]`` its weight; ``firsts[b]`` is image ``b``'s first part. ``texts_at(call)`` gives the parts'
    and the negatives' texts for one denoiser call; ``ends`` are the calls at which some text last holds,
    so the batch needs one encoding per entry of ``ends`` (:meth:`end_for`)."""

    prompts: tuple[tuple[tuple[int, str], ...], ...]
    negatives: tuple[tuple[tuple[int, str], ...], ...]
    owners: tuple[int, ...]
    weights: tuple[float, ...]

    @classmethod
    def build(
        cls, prompts: Sequence[str], negatives: Sequence[str], steps: int, first_steps: int | None = None
    ) -> StepPrompts:
        """``first_steps``: these are a hires pass's ``steps`` after a first pass of ``first_steps``."""
        parts = [(image, text, weight) for image, p in enumerate(prompts) for text, weight in composable_parts(p)]
        return cls(
            tuple(tuple(prompt_schedule(text, steps, first_steps)) for _, text, _ in parts),
            tuple(tuple(prompt_schedule(n, steps, first_steps)) for n in negatives),
            tuple(image for image, _, _ in parts),
            tuple(weight for _, _, weight in parts),
        )

    @property
    def changes(self) -> bool:
        """Whether any text of the batch changes during sampling."""
        return any(len(schedule) > 1 for schedule in (*self.prompts, *self.negatives))

    @property
    def composed(self) -> bool:
        """Whether some image is guided by more than one part, or by a part of weight other than 1."""
        return len(self.owners) != len(self.negatives) or any(weight != 1.0 for weight in self.weights)

    @property
    def firsts(self) -> list[int]:
        return [self.owners.index(image) for image in range(len(self.negatives))]

    @property
    def ends(self) -> list[int]:
        return sorted({end for schedule in (*self.prompts, *self.negatives) for end, _ in schedule})

    def end_for(self, call: int) -> int:
        """The first of :attr:`ends` at or after ``call``; past them the first one, where every text is its
        schedule's first (:func:`text_at_call`)."""
        ends = self.ends
        return next((end for end in ends if call <= end), ends[0])

    def texts_at(self, call: int) -> tuple[list[str], list[str]]:
        return (
            [text_at_call(schedule, call) for schedule in self.prompts],
            [text_at_call(schedule, call) for schedule in self.negatives],
        )


__all__ = ["StepPrompts", "composable_parts", "prompt_schedule", "schedule_steps", "text_at_call"]
