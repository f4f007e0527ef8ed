"""Image generation: sdcore's ``generate_images`` against diffusers' ``StableDiffusionPipeline`` on the same model.

One run, side by side, per size and sampler: the same diffusers folder (written once by sdcore from
``bench_train``'s seeded tiny/mid bundles), the same seed, scheduler, steps, CFG and size, both in-process with
the model loaded once (each its own copy, as two programs would have it):

- seconds per image, median of ``--repeat`` after a warm-up: ``sdcore.generate.generate_images`` vs
  ``pipe(prompt, generator=torch.Generator().manual_seed(seed), ...)``;
- the largest per-pixel difference of the two images (0-255): A1111's prompt encoding and noise rules that
  sdcore follows give diffusers' own numbers on a plain prompt with a CPU float32 generator;
- with a kohya LoRA file: sdcore's ``<lora:name:1>`` (read, merged, generated, restored per call) vs
  diffusers ``load_lora_weights`` + ``fuse_lora`` + generate + ``unfuse_lora`` + ``unload_lora_weights`` per
  image (the same per-call work), and diffusers' steady state with the LoRA fused once (generation alone);
- several images with one LoRA in one session (``--session-images``, one ``generate_images`` call each): inside
  ``session.keeping()`` (merged once, as ``sdcore generate`` and A1111 keep it) against a fresh session per image
  (read, hashed, merged and undone per image, sdcore's behaviour before it kept networks), with their pixels;
- CLI wall time, startup included: ``sdcore generate ...`` one image vs a ``python -c`` diffusers script
  writing the same PNG.

    python -m benchmarks generate [-- --sizes tiny,mid --samplers euler,dpm++2m --steps 20 --repeat 3]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .common import print_table, time_call, write_json

PROMPT = "a photo of a cat sitting on a red chair, high detail"
NEGATIVE = "blurry"
LORA_NAME = "benchlora"
#: sizes (bench_train's bundles) and their image side
SIDES = {"tiny": 64, "mid": 128}


def prepare(size: str, workdir: Path) -> tuple[Path, Path]:
    """The size's diffusers folder and a kohya LoRA file in ``<workdir>/Lora`` (built once, then reused)."""
    folder = workdir / f"bench-{size}"
    lora = workdir / "Lora" / f"{LORA_NAME}-{size}.safetensors"
    if (folder / "model_index.json").exists() and lora.exists():
        return folder, lora
    import torch
    from sdplugin_lora.format import network_metadata, save_lora
    from sdplugin_lora.naming import ModuleIndex
    from sdplugin_lora.network import LoraNetwork

    from .bench_train import build_bundle

    bundle = build_bundle(size)
    bundle.save(folder, dtype="fp32")
    network = LoraNetwork.create(ModuleIndex.from_bundle(bundle).select(conv=True, text_encoder=True),
                                 rank=4, alpha=4.0, conv_rank=4, conv_alpha=4.0)  # fmt: skip
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # lora_up starts at zero: give the file a visible effect
        for module in network:
            for part in (module.lora_down.weight, module.lora_up.weight):
                part.copy_(torch.randn(part.shape, generator=generator) * 0.1)
    meta = network_metadata(family=bundle.family, prediction_type=bundle.prediction_type, rank=4, alpha=4.0,
                            conv_rank=4, conv_alpha=4.0)  # fmt: skip
    lora.parent.mkdir(parents=True, exist_ok=True)
    save_lora(lora, network.state_dict(), meta, dtype="fp32")
    return folder, lora


def _pixels(image: Any) -> Any:
    import numpy as np

    return np.asarray(image.convert("RGB"), dtype=np.int16)


def max_pixel_diff(a: Any, b: Any) -> int:
    """The largest |difference| of two images' 8-bit RGB values (0: identical, 255: opposite)."""
    return int(abs(_pixels(a) - _pixels(b)).max())


def diffusers_scheduler(pipe: Any, sampler: str) -> Any:
    """What a diffusers user writes for ``sampler``: its scheduler class ``from_config`` of the folder's scheduler
    with the class's options (the same class and options sdcore's sampler table names)."""
    import diffusers
    from sdcore.generate.pipeline import SAMPLERS, sampler_id

    class_name, overrides, _ = SAMPLERS[sampler_id(sampler)]
    return getattr(diffusers, class_name).from_config(pipe.scheduler.config, **overrides)


def _settings(args: Any, side: int) -> dict[str, Any]:
    return {"steps": args.steps, "cfg": args.cfg, "seed": args.seed, "side": side}


def measure(size: str, sampler: str, args: Any, workdir: Path) -> dict[str, Any]:
    """One size and sampler: per-image seconds (plain and with the LoRA) and the images' pixel differences."""
    import diffusers
    import torch
    import transformers
    from diffusers import StableDiffusionPipeline
    from sdcore.generate.pipeline import generate_images
    from sdcore.generate.session import session_from_plugin_manager
    from sdcore.models.load import load_model
    from sdcore.plugins import get_plugin_manager

    diffusers.utils.logging.disable_progress_bar()  # the loaders' bars, once per model and LoRA load
    transformers.utils.logging.disable_progress_bar()
    side = SIDES[size]
    folder, lora = prepare(size, workdir)
    bundle = load_model(folder)
    session = session_from_plugin_manager(get_plugin_manager(), {"lora_dir": lora.parent})
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), local_files_only=True, safety_checker=None,
                                                   requires_safety_checker=False)  # fmt: skip
    pipe.scheduler = diffusers_scheduler(pipe, sampler)
    pipe.set_progress_bar_config(disable=True)
    common = {"steps": args.steps, "cfg": args.cfg, "seed": args.seed, "width": side, "height": side}

    def ours(prompt: str = PROMPT) -> Any:
        return generate_images(bundle, [prompt], negative_prompt=NEGATIVE, sampler=sampler, networks=session,
                               **common)[0]  # fmt: skip

    def theirs() -> Any:
        generator = torch.Generator("cpu").manual_seed(args.seed)
        return pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=args.steps, guidance_scale=args.cfg,
                    width=side, height=side, generator=generator).images[0]  # fmt: skip

    def theirs_lora_per_image() -> Any:
        pipe.load_lora_weights(str(lora), adapter_name=LORA_NAME)
        pipe.fuse_lora(lora_scale=1.0)
        try:
            return theirs()
        finally:
            pipe.unfuse_lora()
            pipe.unload_lora_weights()

    tagged = f"<lora:{LORA_NAME}-{size}:1> {PROMPT}"
    count = args.session_images
    keeping = getattr(session, "keeping", None)  # absent before sdcore kept networks between images

    def ours_session() -> list[Any]:
        """``count`` images with the same LoRA, one ``generate_images`` call each, in one ``session.keeping()``
        block (an X/Y/Z plot's cells, an app's loop): merged once, undone once."""
        with keeping() if keeping is not None else contextlib.nullcontext():
            return [ours(tagged) for _ in range(count)]

    def ours_fresh_each() -> list[Any]:
        """The same images with nothing kept between them: each reads, hashes, merges and undoes the file."""
        images = []
        for _ in range(count):
            fresh = session_from_plugin_manager(get_plugin_manager(), {"lora_dir": lora.parent})
            images.append(generate_images(bundle, [tagged], negative_prompt=NEGATIVE, sampler=sampler,
                                          networks=fresh, **common)[0])  # fmt: skip
        return images

    rows: dict[str, float] = {}
    rows["sdcore"], _ = time_call(ours, repeat=args.repeat)
    rows["diffusers"], _ = time_call(theirs, repeat=args.repeat)
    rows["sdcore lora"], _ = time_call(lambda: ours(tagged), repeat=args.repeat)
    rows["diffusers lora (load+fuse per image)"], _ = time_call(theirs_lora_per_image, repeat=args.repeat)
    kept_s, _ = time_call(ours_session, repeat=args.repeat)
    fresh_s, _ = time_call(ours_fresh_each, repeat=args.repeat)
    rows[f"sdcore lora, {count} images kept"] = kept_s / count
    rows[f"sdcore lora, {count} images fresh each"] = fresh_s / count
    session_diff = max(max_pixel_diff(a, b) for a, b in zip(ours_session(), ours_fresh_each(), strict=True))
    plain_diff = max_pixel_diff(ours(), theirs())
    ours_lora = ours(tagged)
    pipe.load_lora_weights(str(lora), adapter_name=LORA_NAME)
    pipe.fuse_lora(lora_scale=1.0)
    rows["diffusers lora (fused once)"], _ = time_call(theirs, repeat=args.repeat)
    theirs_lora = theirs()
    lora_diff = max_pixel_diff(ours_lora, theirs_lora)
    lora_effect = max_pixel_diff(ours_lora, ours())  # the LoRA changed the picture (else the diff says nothing)
    return {
        "size": size,
        "sampler": sampler,
        **_settings(args, side),
        "seconds": rows,
        "ratio": rows["sdcore"] / rows["diffusers"],
        "ratio_lora": rows["sdcore lora"] / rows["diffusers lora (load+fuse per image)"],
        "ratio_lora_vs_fused": rows["sdcore lora"] / rows["diffusers lora (fused once)"],
        "session_images": count,
        "ratio_kept_vs_fresh": kept_s / fresh_s,
        "ratio_kept_vs_fused": kept_s / count / rows["diffusers lora (fused once)"],
        "max_pixel_diff_kept": session_diff,
        "max_pixel_diff": plain_diff,
        "max_pixel_diff_lora": lora_diff,
        "lora_effect": lora_effect,
    }


_DIFFUSERS_SCRIPT = """
import sys, torch, diffusers
folder, sampler_class, overrides, steps, cfg, seed, side, out = sys.argv[1:]
pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None,
                                                         requires_safety_checker=False)
pipe.scheduler = getattr(diffusers, sampler_class).from_config(pipe.scheduler.config, **eval(overrides))
pipe.set_progress_bar_config(disable=True)
image = pipe({prompt!r}, negative_prompt={negative!r}, num_inference_steps=int(steps), guidance_scale=float(cfg),
             width=int(side), height=int(side), generator=torch.Generator("cpu").manual_seed(int(seed))).images[0]
image.save(out)
"""


def cli_commands(folder: Path, sampler: str, args: Any, side: int, out: Path) -> dict[str, list[str]]:
    """The two command lines that write one image each: ``sdcore generate`` and the diffusers script."""
    from sdcore.generate.pipeline import SAMPLERS, sampler_id

    class_name, overrides, _ = SAMPLERS[sampler_id(sampler)]
    sdcore_cli = Path(sys.executable).with_name("sdcore")
    ours = [str(sdcore_cli), "generate", PROMPT, "-m", str(folder), "-n", NEGATIVE, "--steps", str(args.steps),
            "--cfg", str(args.cfg), "--seed", str(args.seed), "--size", f"{side}x{side}", "--sampler", sampler,
            "-o", str(out / "sdcore.png"), "--overwrite"]  # fmt: skip
    script = _DIFFUSERS_SCRIPT.format(prompt=PROMPT, negative=NEGATIVE)
    theirs = [sys.executable, "-c", script, str(folder), class_name, repr(overrides), str(args.steps),
              str(args.cfg), str(args.seed), str(side), str(out / "diffusers.png")]  # fmt: skip
    return {"sdcore generate": ours, "python -c diffusers": theirs}


def measure_cli(size: str, sampler: str, args: Any, workdir: Path) -> dict[str, Any]:
    """Wall time of one image from a fresh process, startup and model load included, median of ``--cli-repeat``."""
    folder, _ = prepare(size, workdir)
    times: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        commands = cli_commands(folder, sampler, args, SIDES[size], Path(tmp))
        for _ in range(args.cli_repeat + 1):  # the first of each warms the page cache
            for label, command in commands.items():
                before = _children_cpu()
                start = time.perf_counter()
                subprocess.run(command, check=True, capture_output=True, text=True)
                times.setdefault(label, []).append(time.perf_counter() - start)
                cpu.setdefault(label, []).append(_children_cpu() - before)
        written = sorted(p.name for p in Path(tmp).rglob("*.png"))
    medians = {label: statistics.median(runs[1:]) for label, runs in times.items()}
    cpu_medians = {label: statistics.median(runs[1:]) for label, runs in cpu.items()}
    return {"size": size, "sampler": sampler, "seconds": medians, "runs_s": times, "cpu_seconds": cpu_medians,
            "cpu_runs_s": cpu, "written": written, "ratio": medians["sdcore generate"] / medians["python -c diffusers"],
            "cpu_ratio": cpu_medians["sdcore generate"] / cpu_medians["python -c diffusers"]}  # fmt: skip


def _children_cpu() -> float:
    """User + system CPU seconds of this process's finished children: on a shared machine the wall time of a
    run swings with the other jobs' load, its CPU time much less."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="bench_generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--sizes", default="tiny,mid", help=f"comma-separated: {', '.join(SIDES)}")
    parser.add_argument("--samplers", default="euler,dpm++2m", help="sdcore sampler names (both sides' scheduler)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=7.0)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--repeat", type=int, default=3, help="timed images per figure (median; one warm-up)")
    parser.add_argument("--cli-repeat", type=int, default=2, help="timed CLI runs each (median; one warm-up)")
    parser.add_argument(
        "--session-images",
        type=int,
        default=4,
        help="images with the same LoRA in one session (kept merged vs applied per image)",
    )
    parser.add_argument("--no-cli", action="store_true", help="skip the CLI wall-time comparison")
    parser.add_argument("--workdir", default="/tmp/sdcore-bench-generate")
    args = parser.parse_args(argv)
    sizes = [s for s in args.sizes.split(",") if s]
    unknown = [s for s in sizes if s not in SIDES]
    if unknown:
        raise SystemExit(f"unknown size {', '.join(unknown)}; choose from {', '.join(SIDES)}")
    samplers = [s for s in args.samplers.split(",") if s]
    from sdcore.errors import ConfigError
    from sdcore.generate.pipeline import sampler_id

    try:
        samplers = [sampler_id(s) for s in samplers]
    except ConfigError as error:
        raise SystemExit(str(error)) from None
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)

    results = []
    for size in sizes:
        for sampler in samplers:
            results.append(measure(size, sampler, args, workdir))
            gc.collect()  # the last pair's models freed before the next pair loads
    header = ("size", "sampler", "sdcore s", "diffusers s", "ratio", "lora s", "d. load+fuse s", "ratio",
              "d. fused s", "max|dpx|", "lora max|dpx|")  # fmt: skip
    rows = [
        (r["size"], r["sampler"], f"{r['seconds']['sdcore']:.3f}", f"{r['seconds']['diffusers']:.3f}",
         f"{r['ratio']:.2f}x", f"{r['seconds']['sdcore lora']:.3f}",
         f"{r['seconds']['diffusers lora (load+fuse per image)']:.3f}", f"{r['ratio_lora']:.2f}x",
         f"{r['seconds']['diffusers lora (fused once)']:.3f}", str(r["max_pixel_diff"]),
         f"{r['max_pixel_diff_lora']} (effect {r['lora_effect']})")
        for r in results
    ]  # fmt: skip
    print_table(f"seconds per image, {args.steps} steps, CFG {args.cfg}, median of {args.repeat}", rows, header)
    count = args.session_images
    session_rows = [
        (r["size"], r["sampler"], f"{r['seconds'][f'sdcore lora, {count} images kept']:.3f}",
         f"{r['seconds'][f'sdcore lora, {count} images fresh each']:.3f}", f"{r['ratio_kept_vs_fresh']:.2f}x",
         f"{r['seconds']['diffusers lora (fused once)']:.3f}", f"{r['ratio_kept_vs_fused']:.2f}x",
         str(r["max_pixel_diff_kept"]))
        for r in results
    ]  # fmt: skip
    print_table(f"{count} images with one LoRA in one session, seconds per image (median of {args.repeat})",
                session_rows, ("size", "sampler", "kept s", "fresh each s", "ratio", "d. fused s", "ratio",
                               "kept vs fresh max|dpx|"))  # fmt: skip
    cli: list[dict[str, Any]] = []
    if not args.no_cli:
        cli = [measure_cli(size, samplers[0], args, workdir) for size in sizes]
        cli_rows = [(c["size"], c["sampler"], f"{c['seconds']['sdcore generate']:.2f}",
                     f"{c['seconds']['python -c diffusers']:.2f}", f"{c['ratio']:.2f}x",
                     f"{c['cpu_seconds']['sdcore generate']:.2f}", f"{c['cpu_seconds']['python -c diffusers']:.2f}",
                     f"{c['cpu_ratio']:.2f}x") for c in cli]  # fmt: skip
        print_table(f"CLI one image, startup included (median of {args.cli_repeat}; CPU: user+sys of the process)",
                    cli_rows, ("size", "sampler", "sdcore wall s", "diffusers wall s", "ratio", "sdcore CPU s",
                               "diffusers CPU s", "CPU ratio"))  # fmt: skip
    payload = {"results": results, "cli": cli, "prompt": PROMPT, "negative": NEGATIVE}
    write_json("generate", payload)
    return payload


if __name__ == "__main__":
    main()
