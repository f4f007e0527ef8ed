"""Training parity with LyCORIS: our LoCon / LoHa / LoKr / DoRA modules against LyCORIS' own.

For each algorithm and layer kind (the toy world's 32-wide Linear, its 32->256 feed-forward, an
SD1-sized 320->640 Linear with a factored LoKr, a 1x1 and a 3x3 conv, Tucker cores) this builds,
from the same torch seed, one sdcore adapter (:mod:`sdplugin_lora.adapters`) and one LyCORIS module
(``lycoris.modules.{locon,loha,lokr}``, ``lycoris-lora`` from PyPI, which only this benchmark needs:
``pip install lycoris-lora einops toml`` into a development venv, never a requirement) and compares

* the initial tensors, by file name (same seed: they must be identical, not just alike);
* the forward delta ``f(x) - W x`` at the init and at random (non-zero) weights;
* LoKr's split of each dimension (``factorization``, dimensions 1-2560, factors -1 and 1-32);
* the forward delta with rank dropout 0.5 (LoHa, LoKr, DoRA: LyCORIS drops output rows of ``ΔW``);
* one AdamW step (lr 1e-3, weight decay 1e-2, torch defaults otherwise) on ``sum(f(x) * g)``:
  the gradient and the update of every tensor, and the change of the effective weight ``ΔW``.

DoRA is compared in both magnitude layouts: LyCORIS ``wd_on_out=False`` (per input channel, the
layout sdcore writes because A1111 and ComfyUI apply it correctly) and LyCORIS' default
``wd_on_out=True`` (per output row, which sdcore reads and applies with LyCORIS' formula): the
``wd_on_out=True`` row is an sdcore adapter *loaded* with a per-output magnitude, to show that the
training maths is the same whichever axis; what differs between the two layouts is the
parametrisation itself (a different norm axis), not a formula.

``python -m benchmarks lycoris`` prints one row per case with the largest absolute differences.
``python -m benchmarks lycoris -- --train --methods loha,lokr`` trains on the toy world with LyCORIS'
own LoHa/LoKr weight functions (:func:`train_with_lycoris`), the reference run for our scores.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any

from .common import print_table, write_json

LR, WEIGHT_DECAY = 1e-3, 1e-2


def _cases() -> list[tuple[str, str, Callable[[], Any], dict[str, Any]]]:
    """(algo, layer label, layer factory, options) for every compared module."""
    from torch import nn

    def linear(i: int, o: int) -> Callable[[], nn.Module]:
        return lambda: nn.Linear(i, o)

    def conv(i: int, o: int, k: int) -> Callable[[], nn.Module]:
        return lambda: nn.Conv2d(i, o, k, padding=k // 2)

    toy, ff, sd = linear(32, 32), linear(32, 256), linear(320, 640)
    c1, c3 = conv(32, 32, 1), conv(32, 64, 3)
    cases: list[tuple[str, str, Callable[[], Any], dict[str, Any]]] = []
    for label, make in (("linear 32x32", toy), ("linear 32->256", ff), ("linear 320->640", sd),
                        ("conv1x1 32", c1), ("conv3x3 32->64", c3)):  # fmt: skip
        cases.append(("locon", label, make, {}))
        cases.append(("loha", label, make, {}))
        cases.append(("lokr", label, make, {}))
        cases.append(("dora", label, make, {"wd_on_out": False}))
        cases.append(("dora", label, make, {"wd_on_out": True}))
    cases.append(("lokr", "linear 320->640, factor 8, rank 4", sd, {"factor": 8, "rank": 4}))
    cases.append(("locon", "conv3x3 32->64, tucker", c3, {"tucker": True}))
    cases.append(("loha", "conv3x3 32->64, tucker", c3, {"tucker": True}))
    cases.append(("lokr", "conv3x3 32->64, tucker, factor 4, rank 2", c3, {"tucker": True, "factor": 4, "rank": 2}))
    return cases


def _pair(algo: str, make: Callable[[], Any], opts: dict[str, Any], seed: int) -> tuple[Any, Any, Any]:
    """(base layer, sdcore adapter, LyCORIS module), both modules initialised from torch seed ``seed``."""
    import torch
    from lycoris.modules.locon import LoConModule
    from lycoris.modules.loha import LohaModule
    from lycoris.modules.lokr import LokrModule
    from sdplugin_lora.adapters import Dora, LohaAdapter, LokrAdapter, LoraAdapter

    torch.manual_seed(1000 + seed)
    base = make()
    rank, alpha = int(opts.get("rank", 8)), float(opts.get("alpha", 4.0))
    tucker, factor = bool(opts.get("tucker", False)), int(opts.get("factor", -1))
    common = {"multiplier": 1.0, "lora_dim": rank, "alpha": alpha}
    torch.manual_seed(seed)
    if algo == "loha":
        ours: Any = LohaAdapter("m", base, rank, alpha, tucker=tucker)
        torch.manual_seed(seed)
        theirs: Any = LohaModule("m", base, use_tucker=tucker, **common)
    elif algo == "lokr":
        ours = LokrAdapter("m", base, rank, alpha, factor=factor, tucker=tucker)
        torch.manual_seed(seed)
        theirs = LokrModule("m", base, use_tucker=tucker, factor=factor, **common)
    else:
        dora = algo == "dora"
        ours = LoraAdapter("m", base, rank, alpha, tucker=tucker, dora=dora)
        torch.manual_seed(seed)
        theirs = LoConModule("m", base, use_tucker=tucker, weight_decompose=dora,
                             wd_on_out=bool(opts.get("wd_on_out", True)), **common)  # fmt: skip
        if dora and opts.get("wd_on_out"):  # sdcore reads LyCORIS' per-output layout as it is
            assert ours.dora_scale is not None
            ours.dora_scale = torch.nn.Parameter(Dora.norm(base.weight.detach().float(), per_output=True))
    return base, ours, theirs


def _lycoris_change(theirs: Any, base: Any) -> Any:
    """``W' - W`` as LyCORIS' training forward computes it (``forward`` of its LoCon/LoHa/LoKr
    modules: the rebuilt ``ΔW`` times the scale, then DoRA's decomposition when on)."""
    import torch

    with torch.no_grad():
        w = base.weight.detach()
        if hasattr(theirs, "make_weight"):  # LoCon: make_weight is unscaled
            diff = theirs.make_weight(w.device) * theirs.scale
        else:  # LoHa / LoKr: get_weight already holds alpha/rank
            diff = theirs.get_weight(theirs.shape) * theirs.scalar
        diff = diff.reshape(w.shape)
        new = theirs.apply_weight_decompose(w + diff, 1.0) if theirs.wd else w + diff
        return new - w


def _file_tensors(module: Any) -> dict[str, Any]:
    """The module's trainable tensors by file name (``lora_down.weight``, ``hada_w1_a``...)."""
    return {name: param for name, param in module.named_parameters()}


def _max_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    keys = set(a) | set(b)
    if set(a) != set(b):
        raise AssertionError(f"tensor names differ: {sorted(set(a) ^ set(b))}")
    return max(float((a[k].detach().float().reshape(-1) - b[k].detach().float().reshape(-1)).abs().max()) for k in keys)


def _compare(algo: str, make: Callable[[], Any], opts: dict[str, Any], seed: int) -> dict[str, float]:
    import torch

    base, ours, theirs = _pair(algo, make, opts, seed)
    figures: dict[str, float] = {}
    figures["init"] = _max_diff(_file_tensors(ours), _file_tensors(theirs))
    figures["scale ours"] = float(ours.scale)
    figures["scale lycoris"] = float(theirs.scale)
    torch.manual_seed(7)
    shape = (4, base.in_features) if isinstance(base, torch.nn.Linear) else (2, base.in_channels, 8, 8)
    x = torch.randn(shape)
    with torch.no_grad():
        plain = base(x)
    ours.attach()
    try:
        ours.train()
        theirs.train()
        delta_ours_0 = (base(x) - plain).detach()
        delta_theirs_0 = (theirs(x) - plain).detach()
        figures["delta at init"] = float((delta_ours_0 - delta_theirs_0).abs().max())
        # random non-zero weights, the same in both: the formulas must agree away from zero
        gen = torch.Generator().manual_seed(11 + seed)
        with torch.no_grad():
            for name, param in _file_tensors(theirs).items():
                if name == "dora_scale":
                    value = param * (1 + 0.1 * torch.randn(param.shape, generator=gen))
                else:
                    value = 0.1 * torch.randn(param.shape, generator=gen)
                param.copy_(value)
                dict(ours.named_parameters())[name].copy_(value.reshape(dict(ours.named_parameters())[name].shape))
        delta_ours = base(x) - plain
        delta_theirs = theirs(x) - plain
        figures["delta |max|"] = float(delta_theirs.detach().abs().max())
        figures["delta"] = float((delta_ours - delta_theirs).detach().abs().max())
        if algo in ("loha", "lokr", "dora"):  # LyCORIS' rank dropout: rows of ΔW, one draw per forward
            ours.rank_dropout, theirs.rank_dropout = 0.5, 0.5
            torch.manual_seed(100 + seed)
            dropped_ours = (base(x) - plain).detach()
            torch.manual_seed(100 + seed)
            dropped_theirs = (theirs(x) - plain).detach()
            figures["rank dropout"] = float((dropped_ours - dropped_theirs).abs().max())
            ours.rank_dropout, theirs.rank_dropout = None, 0.0
        else:
            figures["rank dropout"] = 0.0  # LoCon: kohya's per-sample rank channels, not LyCORIS' rows
        # one AdamW step from these weights
        g = torch.randn(delta_ours.shape, generator=gen)
        before_ours = {k: v.detach().clone() for k, v in _file_tensors(ours).items()}
        before_theirs = {k: v.detach().clone() for k, v in _file_tensors(theirs).items()}
        w_before_ours = ours.delta_weight().clone()
        for module, out in ((ours, delta_ours), (theirs, delta_theirs)):
            params = list(module.parameters())
            opt = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)
            opt.zero_grad()
            (out * g).sum().backward()
            if module is ours:
                grads_ours = {k: v.grad.detach().clone() for k, v in _file_tensors(ours).items()}
            else:
                grads_theirs = {k: v.grad.detach().clone() for k, v in _file_tensors(theirs).items()}
            opt.step()
        figures["grad |max|"] = max(float(v.abs().max()) for v in grads_theirs.values())
        figures["grad"] = _max_diff(grads_ours, grads_theirs) / figures["grad |max|"]  # relative: sums of many terms
        step_ours = {k: v.detach() - before_ours[k] for k, v in _file_tensors(ours).items()}
        step_theirs = {k: v.detach() - before_theirs[k] for k, v in _file_tensors(theirs).items()}
        figures["update"] = _max_diff(step_ours, step_theirs)
        change_theirs = _lycoris_change(theirs, base)
        change_ours = ours.delta_weight()
        figures["dW change |max|"] = float((change_ours - w_before_ours).abs().max())
        figures["dW after step"] = float((change_ours - change_theirs).abs().max())
        with torch.no_grad():  # LyCORIS' own merge (merge_to), for the record
            merged = theirs.get_merged_weight(multiplier=1.0, shape=tuple(base.weight.shape))[0]
            change_merge = merged.reshape(base.weight.shape) - base.weight
        figures["lycoris merge / forward"] = float(change_merge.norm() / change_theirs.norm())
    finally:
        ours.detach()
    return figures


def train_with_lycoris(quality_argv: list[str]) -> dict[str, Any]:
    """``python -m benchmarks quality`` with LyCORIS' own weight-rebuild functions (and their
    hand-written backward passes) in place of our LoHa / LoKr formula: the reference training run.
    Same seed, same init (ours draws in LyCORIS' order), so its scores should equal ours."""
    import torch
    from lycoris.functional import loha as lycoris_loha
    from lycoris.functional import lokr as lycoris_lokr
    from sdplugin_lora import adapters

    def loha_change(self: Any, *, detach: bool = True, rows: Any = None) -> Any:
        p = dict(self.named_parameters())
        gamma = torch.tensor(self.scale, dtype=p["hada_w1_b"].dtype, device=p["hada_w1_b"].device)
        w = lycoris_loha.diff_weight(p["hada_w1_b"], p["hada_w1_a"], p["hada_w2_b"], p["hada_w2_a"], None, None,
                                     gamma=gamma).reshape(self.base.weight.shape)  # fmt: skip
        return w.detach() if detach else w

    def lokr_change(self: Any, *, detach: bool = True, rows: Any = None) -> Any:
        p = dict(self.named_parameters())
        w = lycoris_lokr.kron_weight(p["lokr_w1"], None, None, p.get("lokr_w2"), p.get("lokr_w2_a"),
                                     p.get("lokr_w2_b"), None, scale=self.scale).reshape(self.base.weight.shape)  # fmt: skip
        return w.detach() if detach else w

    if any(a.startswith("--set") or "tucker" in a or "dropout" in a for a in quality_argv):
        raise SystemExit("--train covers plain LoHa / LoKr (no Tucker, no rank dropout)")
    saved = adapters.LohaAdapter._change, adapters.LokrAdapter._change
    adapters.LohaAdapter._change = loha_change  # type: ignore[method-assign]
    adapters.LokrAdapter._change = lokr_change  # type: ignore[method-assign]
    try:
        from .bench_quality import main as quality

        return quality(quality_argv)
    finally:
        adapters.LohaAdapter._change, adapters.LokrAdapter._change = saved  # type: ignore[method-assign]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks lycoris", description=__doc__)
    parser.add_argument("--seeds", type=int, default=3, help="torch seeds per case")
    parser.add_argument("--json", default="lycoris", help="raw figures go to benchmarks/out/<this>.json")
    parser.add_argument(
        "--train",
        action="store_true",
        help="instead: train on the toy world with LyCORIS' LoHa/LoKr functions; the other arguments go to "
        "`benchmarks quality` (e.g. --train --methods loha,lokr --seeds 3)",
    )
    args, rest = parser.parse_known_args(argv)
    try:
        import lycoris  # noqa: F401
    except ImportError:
        print("lycoris-lora is not installed: pip install lycoris-lora einops toml (a development venv only)")
        return {}
    if args.train:
        return train_with_lycoris([*rest, "--seeds", str(args.seeds), "--json", args.json + "_train"])
    if rest:
        parser.error(f"unrecognised arguments: {' '.join(rest)}")
    import torch
    from lycoris.functional import factorization as lycoris_factorization
    from sdplugin_lora.adapters import factorization

    torch.set_num_threads(1)
    splits = [(d, f) for d in range(1, 2561) for f in (-1, *range(1, 33))]
    mismatches = [(d, f) for d, f in splits if factorization(d, f) != tuple(lycoris_factorization(d, f))]
    print(f"LoKr factorization: {len(mismatches)} of {len(splits)} (dimension 1-2560, factor -1 and 1-32) differ"
          + (f": {mismatches[:5]}" if mismatches else ""))  # fmt: skip
    rows: list[list[str]] = []
    raw: list[dict[str, Any]] = []
    worst = 0.0
    for algo, label, make, opts in _cases():
        per_seed = [_compare(algo, make, opts, seed) for seed in range(args.seeds)]
        figures = {key: max(f[key] for f in per_seed) for key in per_seed[0]}
        note = ""
        if algo == "dora":
            note = "wd_on_out=True (LyCORIS default)" if opts.get("wd_on_out") else "wd_on_out=False (sdcore's files)"
        raw.append({"algo": algo, "layer": label, "options": opts, **figures})
        compared = ("init", "delta at init", "delta", "rank dropout", "grad", "update", "dW after step")
        worst = max(worst, *(figures[key] for key in compared))
        rows.append(
            [algo, label + (f" ({note})" if note else ""), f"{figures['scale ours']:g}/{figures['scale lycoris']:g}"]
            + [f"{figures[key]:.1e}" for key in compared]
            + [f"{figures['dW change |max|']:.1e}", f"{figures['lycoris merge / forward']:.3f}"]
        )
    header = ["algo", "layer", "scale ours/LyCORIS", "init", "delta@init", "delta", "rank dropout", "grad (rel.)", "update", "dW after step",
              "|dW step|", "LyCORIS merge/forward"]  # fmt: skip
    title = f"sdcore vs LyCORIS ({_version()}): largest absolute differences over {args.seeds} seeds"
    print_table(title, [tuple(row) for row in rows], tuple(header))
    print(f"\nlargest difference of all: {worst:.1e} (fp32; |dW step| = how much one step moved ΔW)")
    payload = {"lycoris": _version(), "seeds": args.seeds, "factorization_mismatches": len(mismatches), "lr": LR, "weight_decay": WEIGHT_DECAY, "cases": raw,
               "worst": worst, "fp32_eps": float(torch.finfo(torch.float32).eps), "isclose": math.isfinite(worst)}  # fmt: skip
    write_json(args.json, payload)
    return payload


def _version() -> str:
    from importlib.metadata import version

    return "lycoris-lora " + version("lycoris-lora")


if __name__ == "__main__":
    main()
