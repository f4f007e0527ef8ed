"""Why DreamBooth with prior preservation barely teaches the toy world's new object: sdcore's run
beside two independent prior-preservation loops written from the documented algorithms.

Both references share nothing with sdcore's training runtime or the DreamBooth plugin: they read
the pictures and captions themselves, encode prompts with the tokenizer and text encoder directly,
draw noise and timesteps themselves and train the whole UNet with AdamW (betas 0.9/0.999, weight
decay 0.01, eps 1e-8), the gradient clipped to norm 1, a constant lr
(research/models_dreambooth.md, sections 3.2 and 3.3):

- ``diffusers`` (``train_dreambooth.py``): the dataset is max(#instance, #class) long, example ``i``
  pairs instance ``i % n_instance`` with class ``i % n_class``; a step concatenates ``batch``
  instance and ``batch`` class pictures into one forward of ``2 * batch`` and takes
  ``loss = MSE(instance half) + prior_loss_weight * MSE(class half)``, so one step sees ``batch``
  instance pictures at full weight.
- ``kohya`` (``train_db.py``): class pictures are registered until their count equals the instance
  count (the first ones; the rest are unused), shuffled with the instance pictures into batches of
  ``batch``; ``loss = mean(per-sample MSE * weight)``, weight ``prior_loss_weight`` for class
  pictures, so one step sees about ``batch / 2`` instance pictures ("double the steps to match
  diffusers", kohya's documentation).

Everything is scored as ``python -m benchmarks quality`` scores DreamBooth (concept: N samples of
``sks``; preservation: world accuracy / the base's). If the references miss as sdcore does, the
miss belongs to prior preservation on this world, not to sdcore.

    python -m benchmarks dbprior              # all three, lr 1e-4, weight 1, steps 100-400, seeds 0-2
    python -m benchmarks dbprior -- --impls diffusers --weights 0,1 --steps 100 --checkpoints 1 --probe

``--probe`` also scores ``sks`` and the empty prompt without guidance (CFG 1):
where the learnt ring lives (benchmarks/RESULTS.md, "DreamBooth with prior preservation").
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from .common import print_table, write_json
from .quality_setup import METHODS, OBJECT, write_concept_data, write_reg_data

SPEC = METHODS["dreambooth-prior"]


def _pictures(folder: Path) -> tuple[Any, list[str]]:
    """The pictures under ``folder`` (sorted paths) in [-1, 1] as [N, 3, H, W], and their captions."""
    import numpy as np
    import torch
    from PIL import Image

    paths = sorted(folder.rglob("*.png"))
    arrays = [np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 127.5 - 1.0 for p in paths]
    captions = [p.with_suffix(".txt").read_text(encoding="utf-8").strip() for p in paths]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2), captions


def _encode(bundle: Any, captions: list[str]) -> Any:
    """Hidden states of the last text-encoder layer, padded to the tokenizer's length (diffusers' SD1 way)."""
    import torch

    tokenizer, encoder = bundle.tokenizers[0], bundle.text_encoders[0]
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids  # fmt: skip
    with torch.no_grad():
        return encoder(input_ids=ids).last_hidden_state


def reference_train(
    bundle: Any,
    instance: tuple[Any, list[str]],
    klass: tuple[Any, list[str]],
    *,
    scheme: str,
    lr: float,
    weight: float,
    steps: int,
    seed: int,
    batch: int,
    on_checkpoint: Any,
    every: int,
) -> None:
    """Train ``bundle``'s UNet in place with prior preservation the ``scheme`` way (diffusers | kohya),
    calling ``on_checkpoint(step)`` every ``every`` steps and at the end."""
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    unet, vae, scheduler = bundle.unet, bundle.vae, bundle.noise_scheduler
    for module in bundle.components().values():
        module.requires_grad_(False)
    unet.requires_grad_(True)
    unet.train()
    pixels = torch.cat([instance[0], klass[0]])
    with torch.no_grad():
        dist = vae.encode(pixels).latent_dist
    mean, std = dist.mean, dist.std
    hidden = _encode(bundle, [*instance[1], *klass[1]])
    n_inst, n_class = len(instance[1]), len(klass[1])
    scale = float(vae.config.scaling_factor)
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    timesteps_total = int(scheduler.config.num_train_timesteps)
    order: list[list[int]] = []  # the remaining batches of the current epoch (indices into pixels)
    for step in range(1, steps + 1):
        if not order:
            if scheme == "diffusers":  # DreamBoothDataset: example i = (instance i % n, class i % m), shuffled
                examples = list(range(max(n_inst, n_class)))
                rng.shuffle(examples)
                for k in range(0, len(examples), batch):
                    chunk = examples[k : k + batch]
                    order.append([i % n_inst for i in chunk] + [n_inst + i % n_class for i in chunk])
            elif scheme == "kohya":  # class images registered up to the instance count, shuffled together
                samples = list(range(n_inst)) + [n_inst + i % n_class for i in range(n_inst)]
                rng.shuffle(samples)
                order = [samples[k : k + batch] for k in range(0, len(samples), batch)]
            else:
                raise SystemExit(f"unknown scheme {scheme!r}: diffusers or kohya")
        index = torch.tensor(order.pop(0))
        is_class = index >= n_inst
        x0 = (mean[index] + std[index] * torch.randn(mean[index].shape, generator=gen)) * scale
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, timesteps_total, (len(index),), generator=gen)
        noisy = scheduler.add_noise(x0, noise, t)
        target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(x0, noise, t)
        pred = unet(noisy, t, hidden[index]).sample
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if scheme == "diffusers":
            loss = per_sample[~is_class].mean() + weight * per_sample[is_class].mean()
        else:
            loss = (per_sample * torch.where(is_class, weight, 1.0)).mean()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if step % every == 0 or step == steps:
            unet.eval()
            on_checkpoint(step)
            unet.train()


def probe(bundle: Any, n: int) -> dict[str, float]:
    """Where the concept lives: its score for ``sks`` without guidance (CFG 1) and for the empty
    prompt (the sampler's unconditional pass) at CFG 1, same seeds and sampler as the benchmark."""
    from sdcore.generate.pipeline import generate_images
    from sdcore.testing.toyworld import IMAGE_SIZE, evaluate

    from .quality_setup import concept_of

    concept = concept_of(OBJECT)
    out = {}
    for label, prompt in (("sks_cfg1", concept.trigger), ("empty_cfg1", "")):
        images = generate_images(bundle, [prompt] * n, steps=evaluate.STEPS, cfg=1.0, seed=100,
                                 sampler=evaluate.SAMPLER, width=IMAGE_SIZE, height=IMAGE_SIZE)  # fmt: skip
        out[label] = concept.score(images)
    return out


def check_reference_conditioning() -> float:
    """Largest difference between the references' prompt encoding and sdcore's for the benchmark's
    prompts (they encode independently; they must agree or the comparison means nothing)."""
    import torch
    from sdcore.models.text import encode_prompts
    from sdcore.testing.contract import toyworld_bundle

    bundle = toyworld_bundle()
    prompts = ["sks", "a big red square", ""]
    with torch.no_grad():
        return float((_encode(bundle, prompts) - encode_prompts(bundle, prompts).hidden_states).abs().max())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from . import bench_quality

    parser = argparse.ArgumentParser(prog="python -m benchmarks dbprior")
    parser.add_argument("--impls", default="sdcore,diffusers,kohya", help="comma-separated: sdcore, diffusers, kohya")
    parser.add_argument("--lrs", default="1e-4", help="learning rates (the RESULTS.md comparison: 1e-4)")
    parser.add_argument("--weights", default="1", help="prior loss weights")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--checkpoints", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument(
        "--batch", type=int, default=4, help="kohya/sdcore: pictures per step; diffusers: pairs per step"
    )
    parser.add_argument("--n", type=int, default=16, help="samples for the concept score")
    parser.add_argument("--world", type=int, default=24, help="world prompts for preservation")
    parser.add_argument("--probe", action="store_true", help="also score sks and '' at CFG 1")
    parser.add_argument(
        "--caption",
        default=None,
        help=f"caption template of the concept pictures (default: the toy setting's, {SPEC.caption!r}; "
        "'{trigger}' for the bare trigger)",
    )
    parser.add_argument("--json", default="dbprior")
    args = parser.parse_args(argv)

    import torch
    from sdcore.models.load import load_model
    from sdcore.testing.contract import toyworld_bundle

    torch.set_num_threads(1)
    diff = check_reference_conditioning()
    print(f"reference vs sdcore prompt encoding: max |diff| = {diff:.2e}")
    caption = args.caption or SPEC.caption
    scorer = bench_quality.Scorer(argparse.Namespace(n=args.n, world=args.world, caption=caption))
    every = max(args.steps // args.checkpoints, 1)
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        key = bench_quality.data_key(OBJECT, caption)
        folders = {key: write_concept_data(tmp / "object", OBJECT, caption=caption), "reg": write_reg_data(tmp / "reg")}
        instance, klass = _pictures(folders[key]), _pictures(folders["reg"])
        for impl in args.impls.split(","):
            for lr in (float(x) for x in args.lrs.split(",")):
                for weight in (float(w) for w in args.weights.split(",")):
                    for seed in range(args.first_seed, args.first_seed + args.seeds):
                        started = time.perf_counter()
                        scores: dict[int, dict[str, Any]] = {}
                        if impl == "sdcore":
                            qargs = argparse.Namespace(set={"prior_loss_weight": weight, "batch_size": args.batch},
                                                       no_reg=False, reg=True, caption=caption)  # fmt: skip
                            out = tmp / f"sdcore-{lr:g}-{weight:g}-{seed}"
                            results, _ = bench_quality._train_sdcore(SPEC, folders, out, lr=lr, steps=args.steps,
                                                                     seed=seed, checkpoints=args.checkpoints,
                                                                     args=qargs)  # fmt: skip
                            for step, path in results:
                                concept, keep, extra = scorer.score(SPEC, path)
                                scores[step] = {"concept": concept, "preservation": keep, **extra}
                                if args.probe:
                                    scores[step].update(probe(load_model(str(path)), args.n))
                        else:
                            bundle = toyworld_bundle()

                            def checkpoint(step: int, bundle: Any = bundle, scores: Any = scores) -> None:
                                concept, keep, extra = scorer.score(SPEC, None, bundle)
                                scores[step] = {"concept": concept, "preservation": keep, **extra}
                                if args.probe:
                                    scores[step].update(probe(bundle, args.n))

                            torch.manual_seed(seed)
                            reference_train(bundle, instance, klass, scheme=impl, lr=lr, weight=weight,
                                            steps=args.steps, seed=seed, batch=args.batch,
                                            on_checkpoint=checkpoint, every=every)  # fmt: skip
                        seconds = time.perf_counter() - started
                        runs.append({"impl": impl, "lr": lr, "weight": weight, "seed": seed, "seconds": seconds,
                                     "scores": scores})  # fmt: skip
                        print(f"{impl} lr {lr:g} weight {weight:g} seed {seed}: " + "; ".join(
                            f"{step}: {v['concept']:.2f}/{v['preservation']:.2f} (purple {v['concept_colour']:.2f},"
                            f" ring {v['concept_shape']:.2f}"
                            + (f", sks at CFG 1 {v['sks_cfg1']:.2f}, '' at CFG 1 {v['empty_cfg1']:.2f}" if args.probe else "")
                            + ")" for step, v in sorted(scores.items())
                        ) + f" [{seconds:.0f} s]", flush=True)  # fmt: skip
    rows = []
    keys = sorted({(r["impl"], r["lr"], r["weight"]) for r in runs}, key=lambda k: (args.impls.index(k[0]), k[1], k[2]))
    for impl, lr, weight in keys:
        mine = [r for r in runs if (r["impl"], r["lr"], r["weight"]) == (impl, lr, weight)]
        steps = sorted(mine[0]["scores"])
        concept = [statistics.fmean(r["scores"][s]["concept"] for r in mine) for s in steps]
        keep = [statistics.fmean(r["scores"][s]["preservation"] for r in mine) for s in steps]
        final = [r["scores"][steps[-1]]["concept"] for r in mine]
        rows.append((impl, f"{lr:g}", f"{weight:g}", " / ".join(str(s) for s in steps),
                     " / ".join(f"{c:.2f}" for c in concept), f"{min(final):.2f}-{max(final):.2f}",
                     " / ".join(f"{k:.2f}" for k in keep)))  # fmt: skip
    print_table(
        f"DreamBooth + prior preservation on the toy world, batch {args.batch}, {args.seeds} seed(s), "
        f"mean over seeds (concept N={args.n}, preservation {args.world} world prompts)",
        rows,
        ("impl", "lr", "prior weight", "steps", "concept", "final range", "preservation"),
    )
    payload = {"args": vars(args), "conditioning_diff": diff, "runs": runs}
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
