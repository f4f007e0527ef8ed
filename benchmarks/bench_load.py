"""Single-file checkpoint load time: sdcore ``load_model`` vs diffusers ``from_single_file`` vs a raw read.

Builds a random SD1.5-sized checkpoint (real SD1.5 config, fp16, ~2 GB) in /tmp with sdcore's own
writer (``--small``: a narrower UNet, ~0.4 GB), plus a weight-free diffusers config folder so
diffusers can load offline. The raw ``safetensors.torch.load_file`` of the same file is the floor:
it reads every tensor once and builds nothing. Goal: sdcore within 1.2x of the raw read (modules
are built on the meta device and the file's tensors assigned, so no random init, no second copy).
All three read from the page cache (a warm-up run each), so the figures compare CPU work; every
reader's tensors are touched page by page so lazy memory-mapped loads pay for their reads too.
"""

from __future__ import annotations

import argparse
import gc
import os
import time
from pathlib import Path
from typing import Any

from .common import print_table, time_call, write_json


def _random_bundle(small: bool, seed: int = 0) -> Any:
    import torch
    from sdcore.models.bundle import ModelBundle
    from sdcore.models.load import _noise_scheduler, build_empty_modules, bundled_config

    configs = bundled_config("sd1")
    if small:
        configs["unet"]["block_out_channels"] = [64, 128, 256, 256]
    unet, vae, encoders = build_empty_modules(configs)
    generator = torch.Generator().manual_seed(seed)
    for module in (unet, vae, *encoders):
        state = {
            key: (torch.randn(value.shape, generator=generator) * 0.02).to(torch.float16)
            for key, value in module.state_dict().items()
        }
        module.load_state_dict(state, assign=True)
    return ModelBundle(
        family="sd1",
        prediction_type="epsilon",
        unet=unet,
        vae=vae,
        text_encoders=encoders,
        tokenizers=[],
        noise_scheduler=_noise_scheduler(configs["scheduler"], "epsilon"),
    )


def _config_folder(bundle: Any, folder: Path) -> None:
    """A diffusers folder with configs and tokenizer only (what ``from_single_file(config=)`` needs)."""
    import json

    from sdcore.models.save import _model_index
    from sdcore.models.tokenizer import write_tokenizer_files

    bundle.unet.save_config(folder / "unet")
    bundle.vae.save_config(folder / "vae")
    bundle.text_encoders[0].config.save_pretrained(folder / "text_encoder")
    bundle.noise_scheduler.save_pretrained(folder / "scheduler")
    write_tokenizer_files(folder / "tokenizer")
    (folder / "model_index.json").write_text(json.dumps(_model_index(bundle), indent=2))


def prepare(small: bool, workdir: Path) -> tuple[Path, Path]:
    name = "sd15-small" if small else "sd15"
    path = workdir / f"bench-{name}-fp16.safetensors"
    folder = workdir / f"bench-{name}-config"
    if not path.exists() or not (folder / "model_index.json").exists():
        start = time.perf_counter()
        bundle = _random_bundle(small)
        bundle.save(path, dtype="fp16")
        _config_folder(bundle, folder)
        del bundle
        gc.collect()
        print(f"built {path} ({path.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - start:.1f} s")
    return path, folder


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="bench_load", description=__doc__)
    parser.add_argument("--small", action="store_true", help="narrow UNet (~0.4 GB file) instead of SD1.5 size")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workdir", default="/tmp/sdcore-bench-load")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file
    from sdcore.models.load import load_model

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    path, folder = prepare(args.small, workdir)
    size_gb = path.stat().st_size / 1e9

    def touch(tensors: Any) -> None:
        # Memory-mapped loads are lazy: read one element per 4 KiB page so every reader really
        # has the data in memory when the clock stops.
        for tensor in tensors:
            flat = tensor.detach().reshape(-1)
            flat[:: max(1, 4096 // flat.element_size())].sum()

    def raw() -> None:
        touch(load_file(str(path)).values())

    def ours() -> None:
        bundle = load_model(path, dtype="fp16")
        touch(p for m in bundle.components().values() for p in m.parameters())

    def theirs() -> None:
        pipe = StableDiffusionPipeline.from_single_file(
            str(path), config=str(folder), local_files_only=True, torch_dtype=torch.float16
        )
        touch(p for name in ("unet", "vae", "text_encoder") for p in getattr(pipe, name).parameters())

    results = {}
    for label, fn in (
        ("raw safetensors load_file", raw),
        ("sdcore load_model", ours),
        ("diffusers from_single_file", theirs),
    ):
        median, times = time_call(lambda fn=fn: (fn(), gc.collect()), repeat=args.repeat, warmup=1)
        results[label] = {"median_s": median, "runs_s": times}
    floor = results["raw safetensors load_file"]["median_s"]
    rows = [(label, f"{r['median_s']:.3f}", f"{r['median_s'] / floor:.2f}x") for label, r in results.items()]
    print_table(f"load {path.name} ({size_gb:.2f} GB, median of {args.repeat})", rows, ("reader", "seconds", "vs raw"))
    ratio = results["sdcore load_model"]["median_s"] / floor
    print(f"goal: sdcore within 1.2x of the raw read -> {'met' if ratio <= 1.2 else 'MISSED'} ({ratio:.2f}x)")
    payload = {"file": str(path), "size_gb": size_gb, "small": args.small, "results": results, "ratio_vs_raw": ratio,
               "ratio_diffusers_vs_raw": results["diffusers from_single_file"]["median_s"] / floor}  # fmt: skip
    write_json("load_small" if args.small else "load", payload)
    return payload


if __name__ == "__main__":
    main()
