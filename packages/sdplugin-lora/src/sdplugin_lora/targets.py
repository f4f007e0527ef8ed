"""What a LoRA run would adapt on a model (``sdcore lora targets``), before any training.

The list comes from :meth:`sdplugin_lora.method.LoraMethod.prepare` itself, run on a shapes-only copy of the
model (:func:`sdcore.models.layout.meta_bundle`: the header and configs, no weights), so it is the set a
training run with the same options adapts, not a second rule that could drift from it. A newcomer writing
``--layer-filter`` / ``--layer-exclude`` patterns sees the diffusers paths they are matched against, and which
pattern matched what.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sdcore.models.bundle import ModelBundle

    from .method import LoraOptions
    from .naming import ModuleIndex, Target


@dataclass(frozen=True)
class TargetRow:
    """One adapter of the network: its kohya name, the layers it adapts (``component.path``; several for
    kohya's fused SD3/Flux q/k/v modules), their layer type and weight shape, algorithm and rank."""

    name: str
    paths: tuple[str, ...]
    layer: str
    shape: tuple[int, ...]
    algo: str
    rank: int
    text_encoder: bool
    #: its name in a kohya-layout file, which --module-ranks/--module-lrs match (SD3/Flux: the SAI/BFL name)
    kohya: str = ""


@dataclass
class PatternMatch:
    """A --layer-filter / --layer-exclude pattern and the candidate denoiser paths it matched."""

    flag: str
    pattern: str
    matched: list[str]


@dataclass
class TargetReport:
    family: str
    denoiser: str
    rows: list[TargetRow]
    candidates: int  # denoiser modules the run would adapt without --layer-filter/--layer-exclude
    patterns: list[PatternMatch] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """Adapted layers per component (a fused module counts each of its layers)."""
        out: Counter[str] = Counter()
        for row in self.rows:
            for path in row.paths:
                out[path.split(".", 1)[0]] += 1
        return dict(out)

    def paths(self) -> set[str]:
        return {path for row in self.rows for path in row.paths}


def _layer_kind(module: Any) -> str:
    kind = type(module).__name__
    size = getattr(module, "kernel_size", None)
    return f"{kind} {size[0]}x{size[1]}" if kind == "Conv2d" and size is not None else kind


def _rows(network: Any, index: ModuleIndex) -> list[TargetRow]:
    from .module_rules import kohya_names

    by_module: dict[int, Target] = {id(t.module): t for t in (*index.targets.values(), *index.norms.values())}
    file_names = kohya_names(index)  # SD3/Flux: the SAI/BFL name --module-ranks/--module-lrs match
    rows = []
    for adapter in network:
        bases = getattr(adapter, "bases", None) or (adapter.base,)
        targets = [by_module[id(b)] for b in bases if id(b) in by_module]
        first = bases[0]
        weight = getattr(first, "weight", None)
        shape = tuple(int(d) for d in weight.shape) if weight is not None else ()
        if len(bases) > 1:  # a fused module: the stacked rows
            shape = (sum(int(b.weight.shape[0]) for b in bases), *shape[1:])
        rows.append(
            TargetRow(
                name=adapter.lora_name,
                paths=tuple(f"{t.component}.{t.path}" for t in targets),
                layer=_layer_kind(first),
                shape=shape,
                algo=str(getattr(adapter, "algo", "lora")),
                rank=int(getattr(adapter, "rank", 0) or 0),
                text_encoder=adapter.lora_name.startswith("lora_te"),
                kohya=file_names.get(adapter.lora_name, adapter.lora_name),
            )
        )
    return rows


def shapes_only_bundle(model: str, options: LoraOptions) -> ModelBundle:
    """``model`` with every parameter on the meta device (header and configs only); a source whose layout
    cannot be read without loading (a pickle ``.ckpt``) is loaded."""
    from sdcore.models.layout import LayoutUnavailableError, meta_bundle, read_layout
    from sdcore.models.parts import given_parts

    try:
        return meta_bundle(read_layout(model, given_parts(options)))
    except LayoutUnavailableError:
        from sdcore.models.load import load_model

        return load_model(model, **given_parts(options))


def list_targets(options: LoraOptions, bundle: ModelBundle | None = None) -> TargetReport:
    """The modules a LoRA run with ``options`` adapts on ``bundle`` (default: a shapes-only copy of
    ``options.model``), and what each --layer-filter / --layer-exclude pattern matched among the denoiser
    modules the run would adapt without them. Problems raise :class:`~sdcore.errors.ConfigError` (one line)."""
    from sdcore.errors import ConfigError

    from .method import LoraMethod
    from .naming import LayerFilter, ModuleIndex

    def fresh() -> ModelBundle:
        if bundle is not None:
            return bundle
        if not options.model:
            raise ConfigError("give --model (a model file, a diffusers folder or tiny:<family>)")
        return shapes_only_bundle(options.model, options)

    method = LoraMethod(options)
    method.validate()
    model = fresh()
    problems = method.family_problems(model.family)
    if problems:
        raise ConfigError("; ".join(problems))
    o = options
    report_patterns: list[PatternMatch] = []
    candidates: list[str] = []
    unfiltered_options = dataclasses.replace(o, layer_filter=None, layer_exclude=None, layer_filter_regex=False)
    if o.layer_filter is not None or o.layer_exclude is not None:
        # the candidates: the same run without the filter (on a fresh copy: prepare attaches its network)
        plain = LoraMethod(unfiltered_options)
        plain_bundle = fresh() if bundle is None else model
        plain.prepare(plain_bundle)
        assert plain.network is not None and plain.index is not None
        denoiser = plain.index.denoiser
        candidates = sorted(p.split(".", 1)[1] for row in _rows(plain.network, plain.index) for p in row.paths
                            if p.split(".", 1)[0] == denoiser)  # fmt: skip
        plain.network.remove()  # a given bundle is prepared once more below
        for flag, text in (("--layer-filter", o.layer_filter), ("--layer-exclude", o.layer_exclude)):
            if text is None:
                continue
            parsed = LayerFilter.parse(text, regex=o.layer_filter_regex, flag=flag)
            for pattern in parsed.patterns:
                matched = [p for p in candidates if parsed.matches(pattern, p)]
                report_patterns.append(PatternMatch(flag, pattern, matched))
    method.prepare(model)
    assert method.network is not None
    index = method.index or ModuleIndex.from_bundle(model)
    rows = _rows(method.network, index)
    if bundle is not None:
        method.network.remove()
    total = len(candidates) if report_patterns else sum(1 for r in rows for p in r.paths if not r.text_encoder)
    return TargetReport(model.family, index.denoiser, rows, total, report_patterns)


def format_report(report: TargetReport, *, examples: int = 3) -> list[str]:
    """The report as lines: one per adapter (kohya name, diffusers path(s), layer, shape, algo and rank),
    the counts, then each pattern with how many candidates it matched."""
    lines = []
    for row in report.rows:
        shape = "x".join(map(str, row.shape))
        kohya = f" = {row.kohya}" if row.kohya and row.kohya != row.name else ""
        lines.append(f"{row.name}{kohya}  {'+'.join(row.paths)}  {row.layer} [{shape}]  {row.algo} rank {row.rank}")
    counts = report.counts()
    parts = ", ".join(f"{name} {n}" for name, n in sorted(counts.items()))
    lines.append(f"{len(report.rows)} modules on {report.family} ({sum(counts.values())} layers: {parts or 'none'})")
    for match in report.patterns:
        shown = ", ".join(match.matched[:examples]) + (", ..." if len(match.matched) > examples else "")
        lines.append(
            f"{match.flag} {match.pattern!r}: matched {len(match.matched)} of {report.candidates} "
            f"{report.denoiser} modules" + (f" ({shown})" if shown else "")
        )
    return lines
