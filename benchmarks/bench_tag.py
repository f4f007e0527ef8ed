"""WD tagger throughput: our pipelined tagger vs a plain per-image loop vs inference alone.

Builds a WD-contract ONNX graph with ViT-B/16-class compute at 448 px (random weights: the speed
is what matters), NHWC 0-255 BGR input with the scaling inside the graph, a ``[batch, 10861]``
sigmoid output and a dynamic batch axis, like ``wd-vit-tagger-v3``. Then a folder of real-size
JPEGs (1024x768 smooth random images) is tagged three ways:

- **plain loop**: decode + canonical preprocess + ``session.run`` per image, one thread, batch 1;
- **ours**: :class:`sdplugin_taggers.wd14.WD14Tagger` (decode threads + prefetch + batches);
- **inference only**: ``session.run`` on pre-decoded batches (the ceiling for any tagger);
- **feed only**: our decode pipeline with the model call removed (how fast it can supply images:
  on a GPU ours reaches inference-only when this is well above the inference rate).

Modes run in interleaved rounds and the best time of each counts (a shared machine's noise only
slows runs down).

Goal: ours >= 0.9x inference-only. ``--quick`` shrinks the ViT depth and the image count for a
CPU sanity run (inference dominates there; the gap to close is on GPU, where decode dominates).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from .common import print_table, write_json


def build_vit_onnx(path: Path, *, size: int, patch: int, dim: int, depth: int, heads: int, n_tags: int) -> Path:
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
            self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
            self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, n, _ = x.shape
            q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
            attn = torch.softmax(q @ k.transpose(-2, -1) * (dim // heads) ** -0.5, dim=-1)
            x = x + self.proj((attn @ v).transpose(1, 2).reshape(b, n, dim))
            return x + self.mlp(self.norm2(x))

    class ViT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Conv2d(3, dim, patch, patch)
            self.pos = nn.Parameter(torch.randn(1, (size // patch) ** 2, dim) * 0.02)
            self.blocks = nn.Sequential(*[Block() for _ in range(depth)])
            self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, n_tags)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # NHWC, BGR, 0-255
            x = x.permute(0, 3, 1, 2) / 127.5 - 1.0
            x = self.embed(x).flatten(2).transpose(1, 2) + self.pos
            x = self.norm(self.blocks(x)).mean(dim=1)  # no class token, average pool (as wd-vit-v3)
            return torch.sigmoid(self.head(x))

    torch.manual_seed(0)
    model = ViT().eval()
    with torch.no_grad():
        torch.onnx.export(
            model,
            (torch.zeros(1, size, size, 3),),
            str(path),
            dynamo=False,
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": {0: "batch_size"}, "output": {0: "batch_size"}},
            opset_version=17,
        )
    return path


def write_tags(path: Path, n_tags: int) -> None:
    lines = ["tag_id,name,category,count"]
    lines += [f"{9999999 - i},{r},9,0" for i, r in enumerate(["general", "sensitive", "questionable", "explicit"])]
    n_char = n_tags // 4
    lines += [f"{i},tag_{i},{4 if i >= n_tags - n_char else 0},100" for i in range(4, n_tags)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def make_images(folder: Path, count: int, width: int, height: int) -> list[Path]:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        small = Image.fromarray(rng.integers(0, 256, size=(height // 16, width // 16, 3), dtype=np.uint8))
        base = np.asarray(small.resize((width, height), Image.BICUBIC), dtype=np.int16)
        noisy = np.clip(base + rng.integers(-12, 13, size=base.shape), 0, 255).astype(np.uint8)
        path = folder / f"{i:04d}.jpg"
        Image.fromarray(noisy).save(path, quality=90)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="bench_tag", description=__doc__)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--height", type=int, default=768)
    parser.add_argument("--size", type=int, default=448)
    parser.add_argument("--depth", type=int, default=12)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--n-tags", type=int, default=10861)
    parser.add_argument("--batch-size", type=int, default=None, help="default: 1 on CPU, 16 on GPU")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--providers", default="cuda,cpu")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the best time of each mode counts")
    parser.add_argument("--quick", action="store_true", help="CPU sanity run: depth 2, 24 images")
    parser.add_argument("--workdir", default=None, help="keep the model and images here (reused if present)")
    args = parser.parse_args(argv or [])
    if args.quick:
        args.depth, args.images = min(args.depth, 2), min(args.images, 24)

    import numpy as np
    from sdplugin_taggers.images import wd_preprocess
    from sdplugin_taggers.wd14 import WD14Tagger

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_tag_"))
    model_dir = work / f"vit-d{args.depth}-w{args.dim}-{args.size}"
    model_dir.mkdir(parents=True, exist_ok=True)
    if not (model_dir / "model.onnx").exists():
        t = time.perf_counter()
        build_vit_onnx(
            model_dir / "model.onnx",
            size=args.size,
            patch=16,
            dim=args.dim,
            depth=args.depth,
            heads=max(1, args.dim // 64),
            n_tags=args.n_tags,
        )
        write_tags(model_dir / "selected_tags.csv", args.n_tags)
        print(
            f"built {model_dir / 'model.onnx'} ({(model_dir / 'model.onnx').stat().st_size / 2**20:.0f} MiB) "
            f"in {time.perf_counter() - t:.0f}s"
        )
    image_dir = work / f"images-{args.width}x{args.height}"
    paths = sorted(image_dir.glob("*.jpg"))[: args.images]
    if len(paths) < args.images:
        paths = make_images(image_dir, args.images, args.width, args.height)

    tagger = WD14Tagger(model_dir, providers=args.providers, batch_size=args.batch_size, workers=args.workers)
    session, bs = tagger.session, tagger.batch_size
    feed = tagger.input_name
    print(
        f"provider {tagger.provider}, batch {bs}, workers {tagger.workers}, {len(paths)} images "
        f"{args.width}x{args.height}, ViT depth {args.depth} dim {args.dim} @ {args.size}px"
    )

    decoded = [wd_preprocess(p, args.size)[0] for p in paths]
    warm = np.stack(decoded[:bs])
    for _ in range(3):
        session.run(None, {feed: warm})

    def inference_only() -> None:
        for start in range(0, len(decoded), bs):
            session.run(None, {feed: np.stack(decoded[start : start + bs])})

    def ours() -> None:
        results = tagger.tag(paths)
        assert all(r.error is None for r in results)

    def plain_loop() -> None:
        for p in paths:
            array, _ = wd_preprocess(p, args.size)
            session.run(None, {feed: array[None]})

    def feed_only() -> None:
        # our decode pipeline with the model call removed: the most images/s it can supply
        real = tagger._predict
        tagger._predict = lambda batch: np.zeros((len(batch), len(tagger.tag_list)), dtype=np.float32)
        try:
            tagger.tag(paths)
        finally:
            tagger._predict = real

    # interleaved rounds, best of each: a shared machine's noise only ever slows a run down
    best = {"inference_only": float("inf"), "ours": float("inf"), "plain_loop": float("inf"), "feed_only": float("inf")}
    modes = (("inference_only", inference_only), ("ours", ours), ("plain_loop", plain_loop), ("feed_only", feed_only))
    for _ in range(args.rounds):
        for name, fn in modes:
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
    infer_s, ours_s, plain_s = best["inference_only"], best["ours"], best["plain_loop"]

    n = len(paths)
    ips = {
        "inference_only": n / infer_s,
        "ours": n / ours_s,
        "plain_loop": n / plain_s,
        "feed_only": n / best["feed_only"],
    }
    rows = [
        ("inference only (pre-decoded)", f"{ips['inference_only']:.2f}", "1.00x"),
        ("ours (WD14Tagger)", f"{ips['ours']:.2f}", f"{ips['ours'] / ips['inference_only']:.2f}x"),
        ("plain per-image loop", f"{ips['plain_loop']:.2f}", f"{ips['plain_loop'] / ips['inference_only']:.2f}x"),
        (
            "our decode pipeline, no model",
            f"{ips['feed_only']:.2f}",
            f"{ips['feed_only'] / ips['inference_only']:.2f}x",
        ),
    ]
    print_table("WD tagging throughput (images/s)", rows, ("mode", "img/s", "vs inference"))
    ratio = ips["ours"] / ips["inference_only"]
    print(
        f"ours vs plain loop: {ips['ours'] / ips['plain_loop']:.2f}x; "
        f"goal ours >= 0.9x inference-only -> {'met' if ratio >= 0.9 else 'MISSED'} ({ratio:.2f}x)"
    )
    result = {
        "settings": {k: v for k, v in vars(args).items() if k != "workdir"},
        "provider": tagger.provider,
        "batch_size": bs,
        "workers": tagger.workers,
        "images": n,
        "images_per_s": ips,
        "ours_vs_inference": ratio,
        "ours_vs_plain": ips["ours"] / ips["plain_loop"],
    }
    write_json("tag", result)
    return result


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
