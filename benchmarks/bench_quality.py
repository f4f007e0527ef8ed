"""Learning quality on the toy world: every first-party method on its concept kind, beside a
plain diffusers + peft LoRA loop (the anchor).

Every run starts from the shipped base model (``toyworld:``); what each method learns and with which
settings is in :mod:`benchmarks.quality_setup`. For each method it prints:

- concept score: the share of N fixed-seed samples that show the concept (new object / known
  composition: samples of the trigger; style: samples of world prompts drawn in the style colour);
- preservation: colour-and-shape accuracy on world prompts with the result applied, relative to the
  base model's on the same prompts and seeds (style: shape accuracy, relative);
- training seconds (the run itself, without the evaluation of its checkpoints).

Results are applied the way users apply them: LoRA files with ``<lora:name:1>``, embeddings by
name (APT's ``name-neg`` as the negative prompt), hypernetworks with ``<hypernet:name:1>``,
DreamBooth results loaded as a model, aesthetic embeddings with ``sdcore generate --aesthetic``'s
handler options (weight, steps and lr of the generation-time tuning; ``--aesthetic-weights`` picks
weights, ``--steps`` / ``--lrs`` the tuning's steps and lr; in a sweep the checkpoints are tuning steps).

The anchor is what diffusers' LoRA training script does: ``unet.add_adapter(LoraConfig(...))`` on
the attention projections (``to_q to_k to_v to_out.0``), AdamW, epsilon MSE on the same latents,
same rank, lr, steps, batch and images as sdcore's LoRA; ``--anchor-targets kohya`` gives it
sdcore's LoRA targets instead (attention, proj_in/out, feed-forward).

    python -m benchmarks quality                       # each method at its toy setting, 1 seed
    python -m benchmarks quality -- --sweep --seeds 3 --methods lora,locon,anchor
    python -m benchmarks quality -- --methods lora --no-reg --lrs 2e-3 --set train_text_encoder=true

``--sweep`` trains each method at every learning rate of its sweep (``--lrs`` overrides) and
scores the checkpoints at 1/3, 2/3 and all of its steps (a constant learning rate, so a checkpoint
is what a run of that many steps gives), over ``--seeds`` training seeds, and prints the
concept/preservation trade-off with the goal each row meets.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from .common import print_table, write_json
from .quality_setup import (
    COMPOSITION,
    LOOK,
    LOOK_COLOUR,
    METHODS,
    OBJECT,
    STYLE,
    MethodSpec,
    concept_of,
    look_prompts,
    write_concept_data,
    write_look_data,
    write_name_template,
    write_reg_data,
)

ANCHOR = MethodSpec(
    "anchor", "diffusers + peft LoRA (anchor)", "", OBJECT, "peft", METHODS["lora"].lr, METHODS["lora"].steps,
    {"rank": 8}, METHODS["lora"].sweep_lrs, caption=METHODS["lora"].caption,
)  # fmt: skip
"""The anchor: LoRA's lr, steps and captions, no regularisation (diffusers' example loop has none)."""
ANCHOR_TARGETS = {
    "diffusers": ["to_k", "to_q", "to_v", "to_out.0"],
    "kohya": ["to_k", "to_q", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"],
}


@dataclasses.dataclass
class Score:
    step: int
    concept: float
    preservation: float
    seconds: float
    extra: dict[str, float] = dataclasses.field(default_factory=dict)


# --- sampling and scoring ------------------------------------------------------------------------------
class Scorer:
    """Samples a bundle with the toy world's sampler settings and scores concept and preservation."""

    def __init__(self, args: argparse.Namespace) -> None:
        from sdcore.testing.contract import toyworld_bundle
        from sdcore.testing.toyworld import evaluate

        self.n, self.world, self.args = args.n, args.world, args
        self.prompts = evaluate.world_prompts(args.world)
        self.base = self._accuracy(toyworld_bundle(), self.prompts)
        self._look_base: dict[int, Any] = {}

    def _images(self, bundle: Any, prompts: list[str], *, seed: int, networks: Any = None, negative: str = "") -> Any:
        from sdcore.generate.pipeline import generate_images
        from sdcore.testing.toyworld import IMAGE_SIZE, evaluate

        return generate_images(
            bundle, prompts, negative_prompt=negative, steps=evaluate.STEPS, cfg=evaluate.CFG, seed=seed,
            sampler=evaluate.SAMPLER, width=IMAGE_SIZE, height=IMAGE_SIZE, networks=networks,
        )  # fmt: skip

    def _accuracy(self, bundle: Any, prompts: list[str], *, suffix: str = "", networks: Any = None) -> Any:
        from sdcore.testing.toyworld import evaluate, read_image

        images = self._images(bundle, [p + suffix for p in prompts], seed=1000, networks=networks)
        return evaluate.accuracy(prompts, [read_image(image) for image in images])

    def score_look(self, bundle: Any, networks: Any, seed: int) -> tuple[float, float, dict[str, float]]:
        """(share of samples in the look's colour, shape accuracy / the base's, extra) of world prompts of
        the other colours, sampled at seed ``1000 + seed`` with ``networks`` (the aesthetic handler)."""
        from sdcore.testing.contract import toyworld_bundle
        from sdcore.testing.toyworld import evaluate, read_image

        prompts = look_prompts(self.prompts)
        if seed not in self._look_base:  # the base on the same prompts and seeds
            base_images = self._images(toyworld_bundle(), prompts, seed=1000 + seed)
            self._look_base[seed] = evaluate.accuracy(prompts, [read_image(image) for image in base_images])
        base = self._look_base[seed]
        readings = [read_image(image) for image in self._images(bundle, prompts, seed=1000 + seed, networks=networks)]
        accuracy = evaluate.accuracy(prompts, readings)
        look = sum(r.colour == LOOK_COLOUR for r in readings) / len(readings)
        extra = {"shape_accuracy": accuracy.shape, "base_shape": base.shape, "prompt_colour": accuracy.colour}
        return look, accuracy.shape / max(base.shape, 1e-9), extra

    def score(self, spec: MethodSpec, path: Path | None, bundle: Any = None) -> tuple[float, float, dict[str, float]]:
        """(concept, preservation, extra) of the result at ``path`` (or of a live ``bundle``)."""
        from sdcore.generate.session import session_from_plugin_manager
        from sdcore.models.load import load_model
        from sdcore.plugins import get_plugin_manager
        from sdcore.testing.contract import toyworld_bundle

        concept = concept_of(spec.kind)
        networks, word, tag, negative = None, concept.trigger, "", ""
        if bundle is None:
            assert path is not None
            if spec.apply == "model":
                bundle = load_model(str(path))
            else:
                bundle = toyworld_bundle()
                option = {"lora": "lora_dir", "embedding": "embeddings_dir", "apt": "embeddings_dir"}
                option["hypernet"] = "hypernetwork_dir"
                with tempfile.TemporaryDirectory() as empty:
                    networks = session_from_plugin_manager(
                        get_plugin_manager(), {option[spec.apply]: str(path.parent)}, models_dir=empty
                    )
                if spec.apply in ("embedding", "apt"):
                    word = path.stem
                    negative = f"{path.stem}-neg" if spec.apply == "apt" else ""
                else:
                    tag = f" <{spec.apply}:{path.stem}:1>"
        if spec.kind == STYLE:
            images = self._images(bundle, [p + tag for p in self.prompts], seed=1000, networks=networks)
            from sdcore.testing.toyworld import evaluate, read_image

            readings = [read_image(image) for image in images]
            accuracy = evaluate.accuracy(self.prompts, readings)
            style = sum(r.colour == concept.colour for r in readings) / len(readings)
            shape = accuracy.shape / max(self.base.shape, 1e-9)
            return style, shape, {"shape_accuracy": accuracy.shape}
        caption = caption_of(spec, self.args)
        if caption and spec.kind != STYLE:  # prompts written like the training captions
            sizes = concept.sizes
            prompts = [caption.format(trigger=word, size=sizes[i % len(sizes)]) + tag for i in range(self.n)]
        else:
            prompts = [word + tag] * self.n
        images = self._images(bundle, prompts, seed=100, networks=networks, negative=negative)
        accuracy = self._accuracy(bundle, self.prompts, suffix=tag, networks=networks)
        preservation = accuracy.colour_and_shape / max(self.base.colour_and_shape, 1e-9)
        from sdcore.testing.toyworld import read_image

        readings = [read_image(image) for image in images]  # which half of the concept it learnt
        parts = {
            "concept_colour": sum(r.colour == concept.colour for r in readings) / len(readings),
            "concept_shape": sum(r.shape == concept.shape for r in readings) / len(readings),
        }
        return concept.score(images), preservation, {"world_accuracy": accuracy.colour_and_shape, **parts}


def caption_of(spec: MethodSpec, args: argparse.Namespace) -> str | None:
    """The caption template of a run's concept pictures and prompts: ``--caption``, else the method's own
    (``None``: the bare trigger). Styles and looks keep their world captions."""
    if spec.kind not in (OBJECT, COMPOSITION):
        return None
    return getattr(args, "caption", None) or spec.caption


def data_key(kind: str, caption: str | None) -> str:
    """The ``folders`` key of a concept's pictures captioned with ``caption``."""
    return kind if caption is None else f"{kind}|{caption}"


def uses_reg(spec: MethodSpec, args: argparse.Namespace) -> bool:
    """Whether a run trains with the regularisation images of world captions."""
    if spec.key == "anchor" or args.no_reg:
        return False
    return spec.reg or (spec.kind == OBJECT and args.reg)


# --- training --------------------------------------------------------------------------------------------
def _options(spec: MethodSpec, folders: dict[str, Path], out: Path, *, lr: float, steps: int, seed: int,
             save_every: int | None, args: argparse.Namespace) -> Any:  # fmt: skip
    from sdcore.testing.toyworld import IMAGE_SIZE

    method_class = spec.method_class()
    suffix = "" if spec.apply == "model" else method_class.output_suffix
    values: dict[str, Any] = {
        "model": "toyworld:", "data": str(folders[data_key(spec.kind, caption_of(spec, args))]),
        "output": str(out / f"{spec.key}{suffix}"),
        "resolution": IMAGE_SIZE, "min_bucket_reso": IMAGE_SIZE, "max_bucket_reso": 2 * IMAGE_SIZE,
        "bucket_step": IMAGE_SIZE, "batch_size": 4, "max_steps": steps, "lr": lr, "seed": seed,
        "save_every": save_every, "save_limit": 0, "save_state": False, "progress": False, "cache_latents": True,
        **spec.overrides,
    }  # fmt: skip
    if spec.apply in ("embedding", "apt"):
        values["template"] = str(folders["template"])
    if uses_reg(spec, args):
        values["reg_data"] = str(folders["reg"])
    names = {f.name for f in dataclasses.fields(method_class.options_class)}
    values.update({k: v for k, v in args.set.items() if k in names})  # a method without the option ignores it
    return method_class.options_class(**{k: v for k, v in values.items() if k in names})


def _train_sdcore(spec: MethodSpec, folders: dict[str, Path], out: Path, *, lr: float, steps: int, seed: int,
                  checkpoints: int, args: argparse.Namespace) -> tuple[list[tuple[int, Path]], float]:  # fmt: skip
    """Train; returns the result files by step (intermediate saves, then the final one) and seconds."""
    from sdcore.testing.contract import toyworld_bundle
    from sdcore.train.loop import TrainSession

    every = steps // checkpoints if checkpoints > 1 else None
    # save_limit 0 keeps every intermediate result: with the default limit the oldest were deleted
    # and the survivors labelled from step `every` on (--checkpoints 8 showed step 200 as step 100)
    options = _options(spec, folders, out, lr=lr, steps=steps, seed=seed, save_every=every, args=args)
    session = TrainSession(spec.method_class()(options), bundle=toyworld_bundle())
    started = time.perf_counter()
    result = session.run()
    seconds = time.perf_counter() - started
    saved = [*session.checkpoints.saved_results, Path(result.output)]
    return [((every or steps) * (i + 1) if i < len(saved) - 1 else steps, p) for i, p in enumerate(saved)], seconds


def _train_peft(folders: dict[str, Path], scorer: Scorer, *, lr: float, steps: int, seed: int, checkpoints: int,
                args: argparse.Namespace) -> list[Score]:  # fmt: skip
    """The anchor: diffusers' train_text_to_image_lora loop, scored live at its checkpoints."""
    import numpy as np
    import torch
    from peft import LoraConfig
    from PIL import Image
    from sdcore.models.text import encode_prompts
    from sdcore.testing.contract import toyworld_bundle

    bundle = toyworld_bundle()
    torch.manual_seed(seed)
    unet, vae = bundle.unet, bundle.vae
    for module in bundle.components().values():
        module.requires_grad_(False)
    rank = args.rank
    config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=ANCHOR_TARGETS[args.anchor_targets])  # fmt: skip
    unet.add_adapter(config)
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    folder = next(folders[data_key(OBJECT, caption_of(ANCHOR, args))].glob("*_sks"))
    paths = sorted(folder.glob("*.png"))
    pixels = [np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 127.5 - 1 for p in paths]
    images = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2)
    with torch.no_grad():
        latents = vae.encode(images).latent_dist.sample() * vae.config.scaling_factor
        captions = [p.with_suffix(".txt").read_text(encoding="utf-8").strip() for p in paths]
        hidden = encode_prompts(bundle, captions).hidden_states  # one per image, as the script does
    scheduler = bundle.noise_scheduler
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    every = steps // checkpoints if checkpoints > 1 else steps
    scores, seconds = [], 0.0
    for step in range(1, steps + 1):
        started = time.perf_counter()
        unet.train()
        index = torch.tensor([rng.randrange(len(latents)) for _ in range(4)])
        x0 = latents[index]
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(index),), generator=generator)
        noisy = scheduler.add_noise(x0, noise, t)
        loss = torch.nn.functional.mse_loss(unet(noisy, t, hidden[index]).sample, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        seconds += time.perf_counter() - started
        if step % every == 0 or step == steps:
            unet.eval()
            concept, preservation, extra = scorer.score(ANCHOR, None, bundle)
            scores.append(Score(step, concept, preservation, seconds, extra))
    return scores


def _run_aesthetic(spec: MethodSpec, scorer: Scorer, tmp: Path, *, lr: float, steps: int, seed: int,
                   checkpoints: int, args: argparse.Namespace) -> list[Score]:  # fmt: skip
    """Aesthetic gradients as users apply them: an embedding of the seed's blue image set made with the
    plugin's ``create`` from the toy world's CLIP, then ``sdcore generate --aesthetic``'s handler with
    the spec's weight and the tuning's ``lr`` and steps (a sweep scores ``steps`` at 1/k ... k/k)."""
    from sdcore.generate.session import session_from_plugin_manager
    from sdcore.plugins import get_plugin_manager
    from sdcore.testing.contract import toyworld_bundle
    from sdcore.testing.toyworld.clip import toy_clip_dir
    from sdplugin_aesthetic.create import create_aesthetic_embedding, save_aesthetic_embedding

    clip = toy_clip_dir()
    started = time.perf_counter()
    pictures = write_look_data(tmp / f"look-seed{seed}", seed)
    folder = tmp / f"aesthetic-seed{seed}"
    save_aesthetic_embedding(create_aesthetic_embedding(pictures, clip), folder / "look.pt")
    created = time.perf_counter() - started
    every = steps // checkpoints if checkpoints > 1 else steps
    tuning_steps = sorted({every * (i + 1) for i in range(checkpoints - 1)} | {steps})
    bundle, scores = toyworld_bundle(), []
    for k in tuning_steps:
        options = {
            "aesthetic": "look", "aesthetic_clip": str(clip), "aesthetic_weight": spec.overrides["aesthetic_weight"],
            "aesthetic_steps": k, "aesthetic_lr": lr, "aesthetic_negative": args.aesthetic_negative,
        }  # fmt: skip
        with tempfile.TemporaryDirectory() as empty:
            networks = session_from_plugin_manager(
                get_plugin_manager(), {"aesthetic_dir": str(folder)}, models_dir=empty, options=options
            )
        started = time.perf_counter()
        look, shape, extra = scorer.score_look(bundle, networks, seed)
        scores.append(Score(k, look, shape, created + time.perf_counter() - started, extra))
    return scores


def run_one(spec: MethodSpec, folders: dict[str, Path], scorer: Scorer, tmp: Path, *, lr: float, steps: int,
            seed: int, checkpoints: int, args: argparse.Namespace) -> list[Score]:  # fmt: skip
    if spec.apply == "aesthetic":
        return _run_aesthetic(spec, scorer, tmp, lr=lr, steps=steps, seed=seed, checkpoints=checkpoints, args=args)
    if spec.key == "anchor":
        return _train_peft(folders, scorer, lr=lr, steps=steps, seed=seed, checkpoints=checkpoints, args=args)
    out = tmp / f"{spec.key}-lr{lr:g}-seed{seed}"
    results, seconds = _train_sdcore(spec, folders, out, lr=lr, steps=steps, seed=seed, checkpoints=checkpoints, args=args)  # fmt: skip
    scores = []
    for step, path in results:
        concept, preservation, extra = scorer.score(spec, path)
        scores.append(Score(step, concept, preservation, seconds * step / steps, extra))
    return scores


# --- goals -----------------------------------------------------------------------------------------------
def goal_text(spec: MethodSpec) -> str:
    if spec.key == "anchor":
        return "-"
    if spec.kind == OBJECT:
        extra = "; >= 0.95 and > without" if spec.key == "dreambooth-prior" else ""
        return f"concept >= anchor, preservation >= 0.9{extra}"
    if spec.kind == COMPOSITION:
        return "concept >= 0.6, preservation >= 0.95"
    if spec.kind == LOOK:
        return f"{LOOK_COLOUR} look >= 0.6 of other colours' samples, shape (rel.) >= 0.8"
    return "style >= 0.8, shape (rel.) >= 0.8"


def meets(spec: MethodSpec, concept: float, preservation: float, anchor: float | None, plain_db: float | None) -> str:
    if spec.key == "anchor":
        return "-"
    if spec.kind == OBJECT:
        if anchor is None:
            return "? (no anchor run)"
        ok = preservation >= 0.9 and concept >= anchor
        if spec.key == "dreambooth-prior":
            ok = ok and preservation >= 0.95 and (plain_db is None or preservation > plain_db)
        if ok and concept == 0:
            return "trivially (nothing learnt)"
        return "yes" if ok else "no"
    if spec.kind == COMPOSITION:
        return "yes" if concept >= 0.6 and preservation >= 0.95 else "no"
    if spec.kind == LOOK:
        return "yes" if concept >= 0.6 and preservation >= 0.8 else "no"
    return "yes" if concept >= 0.8 and preservation >= 0.8 else "no"


def _stats(values: list[float]) -> str:
    mean = statistics.fmean(values)
    return f"{mean:.2f}" if len(values) == 1 else f"{mean:.2f} ({min(values):.2f}-{max(values):.2f})"


def _parse_set(items: list[str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for item in items:
        key, _, raw = item.partition("=")
        value: Any = raw
        if raw.lower() in ("true", "false"):
            value = raw.lower() == "true"
        else:
            for kind in (int, float):
                try:
                    value = kind(raw)
                    break
                except ValueError:
                    pass
        values[key.replace("-", "_")] = value
    return values


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks quality")
    names = [*METHODS, "anchor"]
    parser.add_argument("--methods", default=",".join(names), help=f"comma-separated, of: {', '.join(names)}")
    parser.add_argument("--sweep", action="store_true", help="lr x steps grid per method (see --lrs, --checkpoints)")
    parser.add_argument("--lrs", default="", help="learning rates of the sweep (default: each method's own)")
    parser.add_argument("--steps", type=int, default=0, help="training steps (default: each method's toy setting)")
    parser.add_argument("--checkpoints", type=int, default=3, help="scored checkpoints per run in a sweep")
    parser.add_argument("--seeds", type=int, default=1, help="training seeds per setting")
    parser.add_argument("--first-seed", type=int, default=0, help="training seeds are first-seed, first-seed + 1, ...")
    parser.add_argument("--rank", type=int, default=8, help="the anchor's rank (sdcore's LoRAs: rank 8)")
    parser.add_argument("--n", type=int, default=16, help="samples for the concept score")
    parser.add_argument("--world", type=int, default=24, help="world prompts for preservation")
    parser.add_argument(
        "--no-reg", action="store_true", help="no regularisation images, even where the toy setting uses them"
    )
    parser.add_argument("--reg", action="store_true", help="regularisation images for every new-object method")
    parser.add_argument("--anchor-targets", choices=sorted(ANCHOR_TARGETS), default="diffusers")
    parser.add_argument(
        "--caption", help="caption template of the concept images, e.g. 'a {size} {trigger}' (default: the trigger)"
    )
    parser.add_argument(
        "--aesthetic-weights", default="", help="aesthetic weights to measure, e.g. 0.5,0.9 (default: 0.9)"
    )
    parser.add_argument(
        "--aesthetic-negative", action="store_true", help="aesthetic: personalise the negative prompt too (A1111)"
    )
    parser.add_argument("--json", default="quality", help="raw figures go to benchmarks/out/<this>.json")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a method option")
    args = parser.parse_args(argv)
    args.set = _parse_set(args.set)
    chosen = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in names]
    if unknown:
        raise SystemExit(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(names)}")
    specs = [METHODS[m] if m != "anchor" else ANCHOR for m in chosen]
    weights = [float(w) for w in args.aesthetic_weights.split(",") if w]
    if weights:  # one row per aesthetic weight
        specs = [
            dataclasses.replace(
                s,
                key=f"{s.key}-w{w:g}",
                label=f"{s.label} (weight {w:g})",
                overrides={**s.overrides, "aesthetic_weight": w},
            )
            if s.apply == "aesthetic"
            else s
            for s in specs
            for w in (weights if s.apply == "aesthetic" else [None])
        ]
    for key in args.set:  # a typo must not pass silently
        if not any(
            key in {f.name for f in dataclasses.fields(s.method_class().options_class)} for s in specs if s.method
        ):
            raise SystemExit(f"--set {key}: none of {', '.join(chosen)} has this option")
    import torch

    torch.set_num_threads(1)
    scorer = Scorer(args)
    runs: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        folders = {
            kind: write_concept_data(tmp / kind.replace(" ", "-"), kind) for kind in (OBJECT, COMPOSITION, STYLE)
        }
        # each caption template a run asks for (--caption, or a method's own) captions its own copy of the
        # concept pictures (until 2026-11-30 19:30 UTC --caption only changed the scoring prompts)
        for caption in {caption_of(s, args) for s in specs} - {None}:
            for kind in (OBJECT, COMPOSITION):
                folder = tmp / f"{kind.replace(' ', '-')}-{len(folders)}"
                folders[data_key(kind, caption)] = write_concept_data(folder, kind, caption=caption)
        folders["reg"] = write_reg_data(tmp / "reg")
        folders["template"] = write_name_template(tmp / "name.txt")
        for spec in specs:
            lrs = [float(x) for x in args.lrs.split(",") if x] if args.lrs else None
            lrs = lrs or (list(spec.sweep_lrs) if args.sweep else [spec.lr])
            steps = args.steps or spec.steps
            for lr in lrs:
                for seed in range(args.first_seed, args.first_seed + args.seeds):
                    scores = run_one(spec, folders, scorer, tmp, lr=lr, steps=steps, seed=seed,
                                     checkpoints=args.checkpoints if args.sweep else 1, args=args)  # fmt: skip
                    for s in scores:
                        runs.setdefault(spec.key, []).append({"lr": lr, "seed": seed, **dataclasses.asdict(s)})
                        parts = ", ".join(f"{k} {v:.2f}" for k, v in s.extra.items())
                        print(f"  {spec.key} lr {lr:g} seed {seed} step {s.step}: concept {s.concept:.2f}, "
                              f"preservation {s.preservation:.2f}, {s.seconds:.1f} s ({parts})", flush=True)  # fmt: skip
    rows: list[tuple[str, ...]] = []
    summary: dict[tuple[str, float, int], tuple[float, float]] = {}
    for spec in specs:
        by_setting: dict[tuple[float, int], list[dict[str, Any]]] = {}
        for r in runs.get(spec.key, []):
            by_setting.setdefault((r["lr"], r["step"]), []).append(r)
        for (lr, step), items in sorted(by_setting.items()):
            concept = statistics.fmean(r["concept"] for r in items)
            keep = statistics.fmean(r["preservation"] for r in items)
            summary[(spec.key, lr, step)] = (concept, keep)
    for spec in specs:
        for (key, lr, step), (concept, keep) in summary.items():
            if key != spec.key:
                continue
            items = [r for r in runs[key] if r["lr"] == lr and r["step"] == step]
            # the anchor at the same lr and steps, else at its own setting (DreamBooth's lr is not a LoRA's)
            same = summary.get(("anchor", lr, step)) or summary.get(("anchor", ANCHOR.lr, args.steps or ANCHOR.steps))
            anchor = same[0] if same is not None else None
            plain_run = summary.get(("dreambooth", lr, step)) or summary.get(
                ("dreambooth", METHODS["dreambooth"].lr, args.steps or METHODS["dreambooth"].steps)
            )
            plain = plain_run[1] if plain_run is not None else None
            reg = "reg" if uses_reg(spec, args) else ""
            caption = caption_of(spec, args) or {STYLE: "world captions", LOOK: "-"}.get(spec.kind, "trigger")
            rows.append((spec.label, spec.kind, caption, f"{lr:g}", str(step), reg,
                         _stats([r["concept"] for r in items]), _stats([r["preservation"] for r in items]),
                         f"{statistics.fmean(r['seconds'] for r in items):.1f}",
                         meets(spec, concept, keep, anchor, plain)))  # fmt: skip
    title = (
        f"toy world, {args.seeds} seed(s), concept N={args.n}, preservation N={args.world} world prompts "
        f"(base colour+shape {scorer.base.colour_and_shape:.2f}, shape {scorer.base.shape:.2f}); "
        f"anchor targets: {args.anchor_targets}; overrides: {args.set or 'none'}"
    )
    header = (
        "method",
        "concept kind",
        "caption",
        "lr",
        "steps",
        "reg",
        "concept",
        "preservation",
        "train s",
        "goal met",
    )
    print_table(title, rows, header)
    print("\ngoals: " + "; ".join(f"{s.key}: {goal_text(s)}" for s in specs if s.key != "anchor"))
    payload = {"args": vars(args), "base": dataclasses.asdict(scorer.base), "runs": runs}
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
