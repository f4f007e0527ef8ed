"""``python -m sdcore.testing.toyworld build|eval|check|flow-probe``: rebuild the base model, measure a
model, rebuild into a temporary folder and check the rebuild against the shipped model, or measure
whether a tiny flow-matching transformer learns the world (:mod:`.flowprobe`)."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sdcore.testing.toyworld", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="train the base model from scratch (about 10 minutes on 2 cores)")
    build.add_argument("--out", help="output diffusers folder (default: the folder sdcore ships, read as toyworld:)")
    build.add_argument("--vae-steps", type=int, default=None)
    build.add_argument("--unet-steps", type=int, default=None)
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--threads", type=int, default=1, help="torch threads (results depend on it)")
    build.add_argument("--n", type=int, default=64, help="samples for the accuracy printed at the end (0: skip)")
    evaluate = commands.add_parser("eval", help="sample world prompts with fixed seeds and score them")
    evaluate.add_argument("--model", default="toyworld:", help="toyworld: (default) or any model path")
    evaluate.add_argument("--n", type=int, default=64)
    evaluate.add_argument("--seed", type=int, default=1000)
    evaluate.add_argument("--steps", type=int, default=None)
    check = commands.add_parser(
        "check",
        help="rebuild into a temporary folder (or --rebuilt DIR) and compare its accuracy, and its weights, "
        "with the shipped model's (exit 1 when the accuracy differs by more than --tolerance)",
    )
    check.add_argument("--rebuilt", help="an existing rebuild to check instead of building one")
    check.add_argument("--threads", type=int, default=1, help="torch threads of the build (the shipped one: 1)")
    check.add_argument("--n", type=int, default=64, help="samples (the documented accuracy uses 64)")
    check.add_argument(
        "--tolerance",
        type=float,
        default=0.1,
        help="largest accepted difference of each accuracy (0.1: about two binomial standard errors at N=64)",
    )
    flow = commands.add_parser(
        "flow-probe", help="train a tiny MMDiT with flow matching on the world's latents and score it"
    )
    flow.add_argument("--steps", type=int, default=2000)
    flow.add_argument("--images", type=int, default=4096, help="world pictures to train on (the SD1 build's 4096)")
    flow.add_argument("--heads", type=int, default=2, help="attention heads of 8 (2: the tiny SD3's width 16)")
    flow.add_argument("--layers", type=int, default=2)
    flow.add_argument("--patch-size", type=int, default=2)
    flow.add_argument("--n", type=int, default=32)
    flow.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from ...models.load import load_model, toyworld_model_dir
    from . import build as builder
    from . import evaluate as ev

    if args.command == "build":
        started = time.time()
        kwargs = {k: v for k, v in (("vae_steps", args.vae_steps), ("unet_steps", args.unet_steps)) if v is not None}
        out = builder.build(args.out or toyworld_model_dir(), seed=args.seed, threads=args.threads, **kwargs)
        print(f"wrote {out} in {time.time() - started:.0f} s")
        if args.n:
            print(f"accuracy on world prompts: {ev.measure(load_model(out), args.n)}")
        return
    if args.command == "check":
        _check(args)
        return
    if args.command == "flow-probe":
        from .flowprobe import probe

        config = f"heads {args.heads} x 8, {args.layers} layers, patch {args.patch_size}"
        result = probe(steps=args.steps, images=args.images, heads=args.heads, layers=args.layers, patch_size=args.patch_size,
                       n=args.n, threads=args.threads)  # fmt: skip
        print(f"flow probe ({config}): {result}")
        return
    bundle = load_model(args.model)
    steps = args.steps or ev.STEPS
    print(f"{args.model}: {ev.measure(bundle, args.n, seed=args.seed, steps=steps)} ({ev.SAMPLER}, {steps} steps)")


def _check(args: argparse.Namespace) -> None:
    from ...models.load import load_model, toyworld_model_dir
    from . import build as builder
    from . import evaluate as ev

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.rebuilt
        if folder is None:
            started = time.time()
            folder = str(builder.build(os.path.join(tmp, "toyworld"), threads=args.threads))
            print(f"rebuilt in {time.time() - started:.0f} s ({args.threads} thread(s))")
        rebuilt = ev.measure(load_model(folder), args.n)
        shipped = ev.measure(load_model("toyworld:"), args.n)
        weights = builder.weight_difference(folder, toyworld_model_dir())
    documented = ev.SHIPPED_ACCURACY
    print(f"documented (shipped): {documented}")
    print(f"shipped, measured now: {shipped}")
    print(f"rebuilt:              {rebuilt}")
    print("largest weight difference, rebuilt vs shipped: " + ", ".join(f"{k} {v:.3g}" for k, v in weights.items()))
    misses = ev.compare(rebuilt, documented, args.tolerance) if args.n == documented.n else []
    misses += ev.compare(rebuilt, shipped, args.tolerance)
    if misses:
        print(f"the rebuild does NOT reproduce the shipped accuracy within {args.tolerance}: {'; '.join(misses)}")
        sys.exit(1)
    print(f"the rebuild reproduces the shipped accuracy within {args.tolerance}")


if __name__ == "__main__":
    main()
