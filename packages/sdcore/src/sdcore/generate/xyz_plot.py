"""A1111's "X/Y/Z plot" script for ``sdcore generate``: one labelled grid of images whose settings vary
along up to three axes (A1111 ``scripts/xyz_grid.py``; grid drawing from ``modules/images.py``).

The way trainers compare LoRA epochs: ``Prompt S/R`` over ``<lora:name-000004:1>,<lora:name-000008:1>``
against seeds. What is taken from A1111 (facts, rewritten):

- axis types by their A1111 labels (:data:`AXIS_TYPES`, only those that map onto a ``generate`` option);
- values: one CSV line (Python's :mod:`csv` rules, each value stripped), numeric ranges ``1-5``,
  ``1-5 (+2)``, ``10-5 (-3)``, ``1-10 [5]`` (count: evenly spaced, truncated to int for int axes),
  ``0.0-1.0 [6]`` (:func:`parse_values`);
- ``Prompt S/R``: the first value is searched for and every value replaces it, in the prompt and the
  negative prompt; the first value must occur in one of them;
- seeds: the base seed and every ``-1`` of a Seed / Var. seed axis are fixed once before the first cell,
  unless "Keep -1 for seeds";
- cells: X varies fastest (cell index ``ix + iy * nx + iz * nx * ny``);
- the grid: X across, Y down, one grid per Z value, side by side, labels above the columns and left of
  the rows (:func:`draw_grid_annotations`), the first cell's infotext plus the script's fields.
"""

from __future__ import annotations

import csv
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from io import StringIO
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL import Image

SCRIPT_TITLE = "X/Y/Z plot"


@dataclass(frozen=True)
class AxisType:
    """One A1111 axis type: its label, the value type, the ``generate`` parameter it sets (``None``:
    Nothing; ``"prompt"``: Prompt S/R) and whether its labels read ``"Label: value"`` (A1111's
    ``format_value_add_label``) or the bare value (``format_value``)."""

    label: str
    kind: type
    param: str | None
    with_label: bool = True
    low: float | None = None  # the option's own bounds, checked before any model loads
    high: float | None = None

    def format(self, value: Any) -> str:
        """A1111's label text: floats rounded to 8 digits, ``Nothing`` has none."""
        if self.param is None:
            return ""
        if isinstance(value, float):
            value = round(value, 8)
        return f"{self.label}: {value}" if self.with_label else str(value)


#: The A1111 axis types (scripts/xyz_grid.py ``axis_options``) that set a ``sdcore generate`` option.
AXIS_TYPES: tuple[AxisType, ...] = (
    AxisType("Nothing", str, None, with_label=False),
    AxisType("Seed", int, "seed"),
    AxisType("Var. seed", int, "subseed"),
    AxisType("Var. strength", float, "subseed_strength", low=0.0, high=1.0),
    AxisType("Steps", int, "steps", low=1, high=1000),
    AxisType("Hires steps", int, "hr_steps", low=0),
    AxisType("CFG Scale", float, "cfg"),  # FLUX.1: the true CFG, as Forge's (see DISTILLED_CFG_AXIS)
    AxisType("Distilled CFG Scale", float, "distilled_cfg"),  # Forge's: FLUX.1's embedded guidance (--cfg)
    AxisType("Prompt S/R", str, "prompt", with_label=False),
    AxisType("Sampler", str, "sampler", with_label=False),
    AxisType("Hires sampler", str, "hr_sampler"),
    AxisType("Clip skip", int, "clip_skip", low=1, high=12),
    AxisType("Denoising", float, "strength", low=0.0, high=1.0),
    AxisType("Hires upscaler", str, "hr_upscaler"),
    AxisType("SLG scale", float, "slg_scale"),  # sdcore's: SD3's Skip Layer Guidance scale (needs --slg-layers)
)
_SEED_AXES = ("Seed", "Var. seed")
#: Forge's two guidance axes: on a guidance-distilled family (FLUX.1) "CFG Scale" sets its true CFG (Forge's
#: ``cfg_scale``) and "Distilled CFG Scale" the embedded guidance (``distilled_cfg_scale``, sdcore's ``--cfg``
#: there); the second means nothing on other families. :func:`guidance_axes` maps them once the family is known.
CFG_AXIS, DISTILLED_CFG_AXIS = "CFG Scale", "Distilled CFG Scale"
_HIRES_AXES = ("Hires steps", "Hires sampler", "Hires upscaler")

# A1111's range forms (xyz_grid.py re_range*, rewritten): "a-b", "a-b (+s)", "a-b [n]"
_INT = r"[+-]?\s*\d+"
_FLOAT = r"[+-]?\s*\d+(?:\.\d*)?"
_RANGE_INT = re.compile(rf"\s*({_INT})\s*-\s*({_INT})(?:\s*\(([+-]\d+)\s*\))?\s*")
_COUNT_INT = re.compile(rf"\s*({_INT})\s*-\s*({_INT})(?:\s*\[(\d+)\s*])?\s*")
_RANGE_FLOAT = re.compile(rf"\s*({_FLOAT})\s*-\s*({_FLOAT})(?:\s*\(([+-]\d+(?:\.\d*)?)\s*\))?\s*")
_COUNT_FLOAT = re.compile(rf"\s*({_FLOAT})\s*-\s*({_FLOAT})(?:\s*\[(\d+)\s*])?\s*")


def axis_type(name: str) -> AxisType | None:
    """The axis type called ``name`` (A1111's label, any case), ``None`` when there is none."""
    wanted = name.strip().lower()
    return next((kind for kind in AXIS_TYPES if kind.label.lower() == wanted), None)


def split_values(text: str) -> list[str]:
    """One CSV line, each value stripped: quote a value to keep its commas (``a,"b, c",d``; as in A1111
    the quote must follow the comma directly, ``a, "b, c"`` splits at the inner comma)."""
    return [value.strip() for row in csv.reader(StringIO(text)) for value in row]


def _number(text: str) -> float:
    return float(text.replace(" ", ""))


def parse_values(kind: type, text: str) -> list[Any]:
    """The values of one axis, as A1111 reads them: numbers may be ranges (see the module doc); a value
    that is not a number is a :class:`ValueError` naming it."""
    values: list[Any] = []
    for item in split_values(text):
        if kind is int:
            if (match := _RANGE_INT.fullmatch(item)) is not None:
                start, end = int(_number(match[1])), int(_number(match[2]))
                step = int(match[3]) if match[3] is not None else 1
                if step == 0:
                    raise ValueError(f"{item!r}: the step of a range cannot be 0")
                values += list(range(start, end + 1, step))  # A1111 adds 1 to the end whatever the step
            elif (match := _COUNT_INT.fullmatch(item)) is not None:
                start, end = int(_number(match[1])), int(_number(match[2]))
                count = int(match[3]) if match[3] is not None else 1
                values += [int(x) for x in _linspace(start, end, count)]
            else:
                try:
                    values.append(int(item))
                except ValueError:
                    raise ValueError(f"{item!r} is not a whole number or a range (1-5, 1-5 (+2), 1-10 [5])") from None
        elif kind is float:
            if (match := _RANGE_FLOAT.fullmatch(item)) is not None:
                first, last = _number(match[1]), _number(match[2])
                increment = float(match[3]) if match[3] is not None else 1.0
                if increment == 0:
                    raise ValueError(f"{item!r}: the step of a range cannot be 0")
                import numpy as np

                values += np.arange(first, last + increment, increment).tolist()
            elif (match := _COUNT_FLOAT.fullmatch(item)) is not None:
                count = int(match[3]) if match[3] is not None else 1
                values += _linspace(_number(match[1]), _number(match[2]), count)
            else:
                try:
                    values.append(float(item))
                except ValueError:
                    raise ValueError(f"{item!r} is not a number or a range (0-1 (+0.25), 0.0-1.0 [6])") from None
        else:
            values.append(item)
    return values


def _linspace(start: float, end: float, count: int) -> list[float]:
    import numpy as np

    return list(np.linspace(start=start, stop=end, num=count).tolist())


@dataclass
class Axis:
    """One axis: its type, the values as typed (the infotext's "X Values") and as parsed."""

    type: AxisType
    text: str
    values: list[Any]

    @property
    def labels(self) -> list[str]:
        return [self.type.format(value) for value in self.values]


def _nothing() -> Axis:
    return Axis(AXIS_TYPES[0], "", [0])  # A1111's "Nothing": one cell, no label


@dataclass
class XYZPlot:
    """The three axes (``Nothing`` where none is given) and A1111's seed rule."""

    x: Axis = field(default_factory=_nothing)
    y: Axis = field(default_factory=_nothing)
    z: Axis = field(default_factory=_nothing)
    keep_random_seeds: bool = False
    fixed: dict[str, str] = field(default_factory=dict)  # "Fixed X Values" ... written in the grid's infotext

    @property
    def axes(self) -> tuple[tuple[str, Axis], ...]:
        return (("X", self.x), ("Y", self.y), ("Z", self.z))

    @property
    def shape(self) -> tuple[int, int, int]:
        return len(self.x.values), len(self.y.values), len(self.z.values)

    def cells(self) -> Iterator[tuple[int, int, int]]:
        """``(ix, iy, iz)`` in the order images are stored and written: X fastest, then Y, then Z."""
        nx, ny, nz = self.shape
        for iz in range(nz):
            for iy in range(ny):
                for ix in range(nx):
                    yield ix, iy, iz

    def fix_seeds(self) -> None:
        """A1111's default ("Keep -1 for seeds" off): a -1 on a Seed / Var. seed axis becomes one random
        seed, chosen now for every cell, and the fixed list goes in the grid's infotext."""
        if self.keep_random_seeds:
            return
        for name, axis in self.axes:
            if axis.type.label in _SEED_AXES:
                axis.values = [random.randrange(4294967294) if value == -1 else value for value in axis.values]
                self.fixed[f"Fixed {name} Values"] = ", ".join(str(value) for value in axis.values)

    def cell_params(self, params: dict[str, Any], ix: int, iy: int, iz: int, problems: list[str]) -> dict[str, Any]:
        """``params`` with the cell's values applied in X, Y, Z order (A1111's order: a later Prompt S/R
        searches the prompt an earlier one changed); a search string not found goes to ``problems`` with
        A1111's message, and the other axes still apply (so their problems show too)."""
        cell = dict(params)
        for axis, index in ((self.x, ix), (self.y, iy), (self.z, iz)):
            param, value = axis.type.param, axis.values[index]
            if param is None:
                continue
            if param == "prompt":
                search = axis.values[0]
                if search not in cell["prompt"] and search not in cell["negative"]:
                    problems.append(f"Prompt S/R did not find {search} in prompt or negative prompt.")
                    continue
                cell["prompt"] = cell["prompt"].replace(search, value)
                cell["negative"] = cell["negative"].replace(search, value)
            else:
                cell[param] = value
        return cell

    def infotext_fields(self) -> dict[str, str]:
        """The fields A1111 adds to the grid's infotext (after the first cell's own, before "Version")."""
        fields = {"Script": SCRIPT_TITLE}
        for name, axis in self.axes:
            if axis.type.param is not None:
                fields[f"{name} Type"] = axis.type.label
                fields[f"{name} Values"] = axis.text
                if f"Fixed {name} Values" in self.fixed:
                    fields[f"Fixed {name} Values"] = self.fixed[f"Fixed {name} Values"]
        return fields


def build_plot(
    axes: Sequence[tuple[str, str | None, str | None]], *, keep_random_seeds: bool = False
) -> tuple[XYZPlot | None, list[str]]:
    """The plot of ``(name, type, values)`` triples (``("X", "Seed", "1-3")``): ``None`` when no type is
    given, and every problem found (unknown types, bad values, out-of-range numbers) as one line each."""
    problems: list[str] = []
    plot = XYZPlot(keep_random_seeds=keep_random_seeds)
    given = False
    for name, type_name, text in axes:
        flag = f"--{name.lower()}"
        if type_name is None:
            if text is not None:
                problems.append(f"{flag}-values needs {flag}-type")
            continue
        kind = axis_type(type_name)
        if kind is None:
            labels = ", ".join(repr(k.label) for k in AXIS_TYPES)
            problems.append(f"{flag}-type {type_name!r} is not an axis type sdcore plots; choose one of: {labels}")
            continue
        if kind.param is None:
            continue
        given = True
        try:
            values = parse_values(kind.kind, text or "")
        except ValueError as exc:
            problems.append(f"{flag}-values: {exc}")
            continue
        if not values:
            problems.append(f"{flag}-values is empty: give the {kind.label} values, comma-separated")
            continue
        if kind.kind is str and kind.param != "prompt" and "" in values:
            # A1111 refuses it (xyz_grid.py confirm_samplers; an unknown hires upscaler), not the default
            problems.append(f"{flag}-values: an empty {kind.label} value; each value must name one")
            continue
        outside = [
            v for v in values if (kind.low is not None and v < kind.low) or (kind.high is not None and v > kind.high)
        ]
        if outside:
            bounds = f"{kind.low}..{kind.high}" if kind.high is not None else f"at least {kind.low}"
            problems.append(f"{flag}-values: {kind.label} must be {bounds}, not {', '.join(map(str, outside))}")
            continue
        setattr(plot, name.lower(), Axis(kind, text or "", values))
    # two Prompt S/R axes search for different strings; any other type twice would set one option twice
    used = [axis.type.label for _, axis in plot.axes if axis.type.param not in (None, "prompt")]
    for label in sorted({label for label in used if used.count(label) > 1}):
        problems.append(f"{label} is on two axes; A1111 would apply only the last")
    return (plot if given and not problems else None), problems


def guidance_axes(
    plot: XYZPlot, cells: Sequence[dict[str, Any]], cfg: Any, *, distilled: bool, family: str, guided: bool = True
) -> list[str]:
    """Map Forge's guidance axes onto ``cells`` (each plot cell's parameters, changed in place) once the model's
    family is known, and return the problems: on a guidance-distilled family (``distilled``: FLUX.1) a "CFG
    Scale" value is the cell's ``true_cfg_scale`` (its ``cfg`` goes back to ``cfg``, the command's) and must be
    at least 1, and a "Distilled CFG Scale" value is its ``cfg``; on other families "Distilled CFG Scale" is
    refused (Forge would change nothing), and so it is on a distilled model without the guidance embedding
    (``guided`` False: FLUX.1 schnell, whose cells would all be the same image)."""
    labels = {axis.type.label: axis for _, axis in plot.axes}
    problems: list[str] = []
    if DISTILLED_CFG_AXIS in labels and not distilled:
        problems.append(
            f"the {DISTILLED_CFG_AXIS} axis varies FLUX.1's embedded guidance; {family} models have real CFG: "
            f"use the {CFG_AXIS} axis"
        )
        return problems
    if not distilled:
        return problems
    if DISTILLED_CFG_AXIS in labels and not guided:
        problems.append(
            f"the {DISTILLED_CFG_AXIS} axis varies the embedded guidance, which FLUX.1 schnell has not (no guidance "
            f"embedding: every cell would be the same image, as Forge ignores it); use the {CFG_AXIS} axis"
        )
        return problems
    if CFG_AXIS in labels:
        low = [value for value in labels[CFG_AXIS].values if value < 1]
        if low:
            problems.append(
                f"on {family} the {CFG_AXIS} axis is the true CFG (--true-cfg-scale, as Forge's), at least 1, "
                f"not {', '.join(map(str, low))}; the embedded guidance (--cfg) is the {DISTILLED_CFG_AXIS} axis"
            )
            return problems
    for cell in cells:
        if CFG_AXIS in labels:
            cell["true_cfg_scale"], cell["cfg"] = cell["cfg"], cfg
        if DISTILLED_CFG_AXIS in labels:
            cell["cfg"] = cell["distilled_cfg"]
    return problems


def uses_hires(plot: XYZPlot) -> bool:
    return any(axis.type.label in _HIRES_AXES for _, axis in plot.axes)


# --- the grid (A1111 modules/images.py image_grid and draw_grid_annotations, rewritten) ---


def image_grid(images: Sequence[Image.Image], rows: int) -> Image.Image:
    """``images`` row by row on a black canvas, ``rows`` rows of ``ceil(len / rows)`` columns."""
    from PIL import Image

    cols = -(-len(images) // rows)
    width, height = images[0].size
    grid = Image.new("RGB", (cols * width, rows * height), "black")
    for index, image in enumerate(images):
        grid.paste(image, (index % cols * width, index // cols * height))
    return grid


def label_font(size: int) -> Any:
    """PIL's default font at ``size`` pixels (A1111 draws Roboto at the same size)."""
    from PIL import ImageFont

    return ImageFont.load_default(max(size, 1))


@dataclass
class _Line:
    text: str
    size: tuple[int, int] = (0, 0)
    allowed_width: int = 0


def _wrap(draw: Any, text: str, font: Any, width: float) -> list[str]:
    """Words on lines no wider than ``width`` (a single long word keeps its own line)."""
    lines = [""]
    for word in text.split():
        line = f"{lines[-1]} {word}".strip()
        if draw.textlength(line, font=font) <= width:
            lines[-1] = line
        else:
            lines.append(word)
    return lines


def annotation_layout(
    width: int, height: int, hor_texts: Sequence[str], ver_texts: Sequence[str]
) -> tuple[int, int, list[list[_Line]], list[list[_Line]], int]:
    """A1111's label sizes: ``(pad_left, pad_top, hor_lines, ver_lines, font_size)``. The font size is
    ``(width + height) // 25`` of a cell, lines are spaced by half of it; the row labels take
    ``width * 3 // 4`` on the left when any has text; the column labels' band is the tallest label plus
    a line spacing above and below (0 when none has text)."""
    from PIL import Image, ImageDraw

    font_size = (width + height) // 25
    spacing = font_size // 2
    font = label_font(font_size)
    pad_left = 0 if not any(text for text in ver_texts) else width * 3 // 4
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1), "white"))

    def lines_of(text: str, allowed: int) -> list[_Line]:
        lines = []
        for line in _wrap(draw, text, font, allowed):
            box = draw.multiline_textbbox((0, 0), line, font=font)
            lines.append(_Line(line, (int(box[2] - box[0]), int(box[3] - box[1])), allowed))
        return lines

    hor = [lines_of(text, width) for text in hor_texts]
    ver = [lines_of(text, pad_left) for text in ver_texts]
    heights = [sum(line.size[1] + spacing for line in lines) - spacing for lines in hor]
    pad_top = 0 if sum(heights) == 0 else max(heights) + spacing * 2
    return pad_left, pad_top, hor, ver, font_size


def draw_grid_annotations(
    grid: Image.Image,
    width: int,
    height: int,
    hor_texts: Sequence[str],
    ver_texts: Sequence[str],
    margin: int = 0,
) -> Image.Image:
    """``grid`` (cells of ``width x height``) on a white canvas with the column labels above and the row
    labels left of it, ``margin`` pixels between the cells (A1111's layout, black text)."""
    from PIL import Image, ImageDraw

    cols, rows = grid.width // width, grid.height // height
    if (cols, rows) != (len(hor_texts), len(ver_texts)):
        raise ValueError(f"{len(hor_texts)}x{len(ver_texts)} labels for a {cols}x{rows} grid")
    pad_left, pad_top, hor, ver, font_size = annotation_layout(width, height, hor_texts, ver_texts)
    spacing = font_size // 2
    size = (grid.width + pad_left + margin * (cols - 1), grid.height + pad_top + margin * (rows - 1))
    result = Image.new("RGB", size, "white")
    for row in range(rows):
        for col in range(cols):
            cell = grid.crop((width * col, height * row, width * (col + 1), height * (row + 1)))
            result.paste(cell, (pad_left + (width + margin) * col, pad_top + (height + margin) * row))
    draw = ImageDraw.Draw(result)
    font = label_font(font_size)

    def draw_lines(x: float, y: float, lines: list[_Line]) -> None:
        for line in lines:
            fitted, fitted_size = font, font_size
            while fitted_size > 1 and draw.multiline_textbbox((0, 0), line.text, font=fitted)[2] > line.allowed_width:
                fitted_size -= 1  # a word wider than its room shrinks, as in A1111
                fitted = label_font(fitted_size)
            draw.multiline_text((x, y + line.size[1] / 2), line.text, font=fitted, fill="black", anchor="mm")
            y += line.size[1] + spacing

    for col, lines in enumerate(hor):
        tall = sum(line.size[1] + spacing for line in lines) - spacing
        draw_lines(pad_left + (width + margin) * col + width / 2, pad_top / 2 - tall / 2, lines)
    for row, lines in enumerate(ver):
        tall = sum(line.size[1] for line in lines)  # A1111 centres the row labels on their lines alone
        draw_lines(pad_left / 2, pad_top + (height + margin) * row + height / 2 - tall / 2, lines)
    return result


def xyz_grid(images: Sequence[Image.Image], plot: XYZPlot, *, legend: bool = True, margin: int = 0) -> Image.Image:
    """The plot's grid from its cell images (in :meth:`XYZPlot.cells` order): one X-by-Y grid per Z value
    (labelled when ``legend``), these side by side under the Z labels (A1111's draw_xyz_grid)."""
    nx, ny, nz = plot.shape
    width, height = images[0].size
    subgrids = []
    for iz in range(nz):
        grid = image_grid(images[iz * nx * ny : (iz + 1) * nx * ny], rows=ny)
        if legend:
            grid = draw_grid_annotations(grid, width, height, plot.x.labels, plot.y.labels, margin)
        subgrids.append(grid)
    sub_width, sub_height = subgrids[0].size
    grid = image_grid(subgrids, rows=1)
    if legend:
        grid = draw_grid_annotations(grid, sub_width, sub_height, plot.z.labels, [""])
    return grid


__all__ = [
    "AXIS_TYPES",
    "Axis",
    "AxisType",
    "XYZPlot",
    "annotation_layout",
    "axis_type",
    "build_plot",
    "draw_grid_annotations",
    "image_grid",
    "parse_values",
    "split_values",
    "xyz_grid",
]
