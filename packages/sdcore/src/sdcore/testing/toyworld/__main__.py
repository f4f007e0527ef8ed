"""``python -m sdcore.testing.toyworld build|eval``: rebuild the base model, or measure a model."""

from __future__ import annotations

import argparse
import os
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
    bundle = load_model(args.model)
    steps = args.steps or ev.STEPS
    print(f"{args.model}: {ev.measure(bundle, args.n, seed=args.seed, steps=steps)} ({ev.SAMPLER}, {steps} steps)")


if __name__ == "__main__":
    main()
