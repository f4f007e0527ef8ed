"""DeepDanbooru tagging throughput: ours against the model's inference-only limit.

A full-size ``resnet_custom_v3`` (random weights, 9176 tags) is saved in the A1111 /
TorchDeepDanbooru ``.pt`` layout; a folder of real-size JPEGs is tagged by ``DeepDanbooruTagger``
(decode + fit/pad to 512 in worker threads while the model runs) and compared with the model's
forward pass alone on pre-decoded 512x512 batches.

    python -m benchmarks deepdanbooru [-- --images 16 --batch-size 4]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from .common import print_table, write_json


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import numpy as np
    import torch
    from PIL import Image
    from sdplugin_taggers.deepdanbooru import DeepDanbooruTagger, build_model

    parser = argparse.ArgumentParser(prog="python -m benchmarks deepdanbooru")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args(argv or [])

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        torch.manual_seed(0)
        model = build_model().eval()
        n_tags = model.state_dict()[list(model.state_dict())[-1]].shape[0]
        tags = [f"rating:{r}" for r in ("safe", "questionable", "explicit")] + [f"tag_{i}" for i in range(n_tags - 3)]
        torch.save({**model.state_dict(), "tags": tags}, folder / "model.pt")
        rng = np.random.default_rng(0)
        images = folder / "images"
        images.mkdir()
        for i in range(args.images):
            base = rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)
            Image.fromarray(base).resize((1024, 768), Image.BILINEAR).save(images / f"{i:03d}.jpg", quality=90)
        files = sorted(images.glob("*.jpg"))

        tagger = DeepDanbooruTagger(folder / "model.pt", batch_size=args.batch_size, device="cpu")
        tagger.tag(files[: args.batch_size])  # warm-up
        start = time.perf_counter()
        results = tagger.tag(files)
        ours = len(results) / (time.perf_counter() - start)

        batch = torch.rand(args.batch_size, 512, 512, 3)
        with torch.inference_mode():
            tagger.model(batch)
            start = time.perf_counter()
            done = 0
            while done < len(files):
                tagger.model(batch)
                done += args.batch_size
            limit = done / (time.perf_counter() - start)

    rows = [
        ("inference only (pre-decoded 512x512)", f"{limit:.2f}", "1.00x"),
        ("ours (DeepDanbooruTagger, JPEG 1024x768)", f"{ours:.2f}", f"{ours / limit:.2f}x"),
    ]
    print_table("DeepDanbooru images/s (CPU)", rows, ("mode", "images/s", "vs limit"))
    result = {
        "images": args.images,
        "batch_size": args.batch_size,
        "ours_images_per_s": ours,
        "inference_only_images_per_s": limit,
        "ratio": ours / limit,
    }
    write_json("deepdanbooru", result)
    return result


if __name__ == "__main__":
    main()
