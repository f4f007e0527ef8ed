"""Why aesthetic gradients take the look on the toy world only with the shapes: diagnostics beside
``python -m benchmarks quality -- --methods aesthetic``.

Setting: the quality benchmark's (an embedding of 16 blue world pictures made with the toy world's
CLIP, :mod:`sdcore.testing.toyworld.clip`; the world prompts of the other colours). Five checks:

- ``ref``: sdcore's personalised conditioning against the independent reimplementation of the
  A1111 extension in ``packages/sdplugin-aesthetic/tests/test_extension_maths.py`` (written from
  the documented algorithm, research/ti_hn_apt_aesthetic.md section 4.2), on the toy world;
- ``ideal``: what the toy model draws when the prompt's colour word is replaced by the look's
  (the best a conditioning edit could do: look share and relative shape accuracy);
- ``decode``: per lr x steps, the tuned cosine to the embedding (beside the best world caption's),
  how far the conditioning moved, and which world caption the personalised conditioning is nearest
  to (is it blue? is its shape the prompt's?);
- ``direction``: the cosine between the personalised change and the colour edit's, and the part of
  the change the edit does not explain;
- ``width``: how far 5 Adam steps move randomly initialised CLIP text towers of the toy's size and
  of CLIP ViT-L/14's (768 wide, 12 layers), beside the toy encoder: Adam's step is per weight, so
  the same lr moves a wider, deeper tower further;
- ``per-shape``: the same generation with one embedding per shape (16 blue circles for the circle
  prompts, ...) instead of one of blue pictures of every shape: does a target that carries the
  prompt's shape keep it?

    python -m benchmarks aesthetic
    python -m benchmarks aesthetic -- --checks ref,ideal
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import tempfile
from pathlib import Path
from typing import Any

from .common import write_json
from .quality_setup import LOOK_COLOUR, look_prompts, write_look_data

REFERENCE = Path(__file__).parents[1] / "packages/sdplugin-aesthetic/tests/test_extension_maths.py"
CHECKS = ("ref", "ideal", "decode", "direction", "width", "per-shape")


def _edited(prompt: str) -> str:
    """``a large red circle`` -> ``a large blue circle`` (the colour word is the third)."""
    words = prompt.split()
    return " ".join([*words[:2], LOOK_COLOUR, *words[3:]])


def _reference() -> Any:
    spec = importlib.util.spec_from_file_location("aesthetic_reference", REFERENCE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks aesthetic")
    parser.add_argument("--checks", default=",".join(CHECKS), help=f"comma-separated, of: {', '.join(CHECKS)}")
    parser.add_argument("--world", type=int, default=24, help="world prompts (those of other colours are used)")
    args = parser.parse_args(argv)
    checks = [c for c in args.checks.split(",") if c]
    import torch
    from sdcore.generate.pipeline import generate_images
    from sdcore.testing.contract import toyworld_bundle
    from sdcore.testing.toyworld import IMAGE_SIZE, evaluate, read_image, world_captions
    from sdcore.testing.toyworld.clip import toy_clip_dir
    from sdplugin_aesthetic.create import create_aesthetic_embedding, load_clip, text_features
    from sdplugin_aesthetic.personalize import (
        AestheticSettings,
        PersonalizationCache,
        encode_for_generation,
        personalize,
        prompt_chunk_ids,
        tower_states,
        tune_tower,
    )

    torch.set_num_threads(1)
    bundle = toyworld_bundle()
    clip, _ = load_clip(toy_clip_dir())
    tokenizer = bundle.tokenizers[0]
    prompts = look_prompts(evaluate.world_prompts(args.world))
    with tempfile.TemporaryDirectory() as tmp:
        raw = create_aesthetic_embedding(write_look_data(Path(tmp), 0), toy_clip_dir())[0]
    unit = raw / raw.norm()
    out: dict[str, Any] = {}

    def personalised(prompt: str, settings: Any) -> tuple[Any, Any]:
        base = encode_for_generation(bundle, prompt, 1)
        z = personalize(bundle, prompt, clip, raw, settings, base=base, cache=PersonalizationCache())
        return base.embeds[0], z.embeds[0]

    if "ref" in checks:
        reference = _reference()
        for s in (AestheticSettings(0.9, 5, 1e-4), AestheticSettings(0.9, 5, 3e-3), AestheticSettings(0.5, 10, 5e-3)):
            worst = 0.0
            for prompt in prompts[:6]:
                base = encode_for_generation(bundle, prompt, 1)
                ours = personalize(bundle, prompt, clip, raw, s, base=base, cache=PersonalizationCache()).embeds
                ids = prompt_chunk_ids(bundle, prompt, 1)
                theirs = reference.extension_chunk(clip, tokenizer, ids, base.embeds, raw, s)
                worst = max(worst, float((ours - theirs).abs().max()))
            print(f"ref  weight {s.weight:g} steps {s.steps} lr {s.lr:g}: max |ours - extension reference| {worst:.1e}")
            out.setdefault("ref", []).append({"weight": s.weight, "steps": s.steps, "lr": s.lr, "max_diff": worst})

    if "ideal" in checks:

        def readings(texts: list[str], seed: int) -> list[Any]:
            images = generate_images(
                bundle, texts, steps=evaluate.STEPS, cfg=evaluate.CFG, seed=seed, sampler=evaluate.SAMPLER,
                width=IMAGE_SIZE, height=IMAGE_SIZE,
            )  # fmt: skip
            return [read_image(image) for image in images]

        for seed in range(3):
            edited, base = readings([_edited(p) for p in prompts], 1000 + seed), readings(prompts, 1000 + seed)
            look = sum(r.colour == LOOK_COLOUR for r in edited) / len(edited)
            shape, base_shape = evaluate.accuracy(prompts, edited).shape, evaluate.accuracy(prompts, base).shape
            print(f"ideal seed {seed}: colour word -> {LOOK_COLOUR}: look {look:.2f}, shape {shape:.2f} / base "
                  f"{base_shape:.2f} = {shape / base_shape:.2f}")  # fmt: skip
            out.setdefault("ideal", []).append({"seed": seed, "look": look, "shape": shape, "base_shape": base_shape})

    if "decode" in checks:
        captions = world_captions()
        with torch.no_grad():
            caption_states = torch.cat([encode_for_generation(bundle, c, 1).embeds for c in captions])
            ids = tokenizer(captions, padding="max_length", max_length=77, return_tensors="pt").input_ids
            cosines = torch.nn.functional.normalize(text_features(clip, ids), dim=-1) @ unit
        best = max(float(c) for c, text in zip(cosines, captions, strict=True) if f" {LOOK_COLOUR} " in text)
        print(f"decode: best {LOOK_COLOUR} world caption's cos(text features, embedding) {best:.3f}")
        out["decode_best_caption_cos"] = best
        for lr in (1e-4, 1e-3, 2e-3, 3e-3, 5e-3):
            for steps in (5, 10):
                tuned_cos, moved, blue, kept = [], [], 0, 0
                for prompt in prompts:
                    ids = prompt_chunk_ids(bundle, prompt, 1)
                    _, history = tune_tower(bundle.text_encoders[0], clip.text_projection, ids, unit.reshape(1, -1), steps, lr)  # fmt: skip
                    tuned_cos.append(history[-1])
                    base, z = personalised(prompt, AestheticSettings(0.9, steps, lr))
                    moved.append(float((z - base).norm() / base.norm()))
                    nearest = captions[int(((caption_states - z) ** 2).sum((1, 2)).argmin())]
                    shape, colour, _ = evaluate.parse_caption(nearest)
                    blue += colour == LOOK_COLOUR
                    kept += shape == evaluate.parse_caption(prompt)[0]
                row = {"lr": lr, "steps": steps, "cos": statistics.fmean(tuned_cos), "moved": statistics.fmean(moved),
                       "nearest_look": blue / len(prompts), "nearest_shape_kept": kept / len(prompts)}  # fmt: skip
                print(f"decode weight 0.9 lr {lr:g} steps {steps}: tuned cos {row['cos']:.3f}, |z'-z|/|z| "
                      f"{row['moved']:.3f}, nearest caption {LOOK_COLOUR} {row['nearest_look']:.2f}, "
                      f"its shape the prompt's {row['nearest_shape_kept']:.2f}")  # fmt: skip
                out.setdefault("decode", []).append(row)

    if "direction" in checks:
        for lr, steps in ((1e-3, 10), (2e-3, 5), (3e-3, 5), (5e-3, 5)):
            cos, rest = [], []
            for prompt in prompts:
                base, z = personalised(prompt, AestheticSettings(0.9, steps, lr))
                edit = (encode_for_generation(bundle, _edited(prompt), 1).embeds[0] - base).flatten()
                change = (z - base).flatten()
                cos.append(float(change @ edit / (change.norm() * edit.norm())))
                rest.append(float((change - (change @ edit) / (edit @ edit) * edit).norm() / base.norm()))
            row = {
                "lr": lr,
                "steps": steps,
                "cos_to_edit": statistics.fmean(cos),
                "unexplained": statistics.fmean(rest),
            }
            print(f"direction weight 0.9 lr {lr:g} steps {steps}: cos(change, colour edit) {row['cos_to_edit']:.2f}, "
                  f"unexplained |.|/|z| {row['unexplained']:.2f}")  # fmt: skip
            out.setdefault("direction", []).append(row)

    if "width" in checks:
        from transformers import CLIPConfig, CLIPModel

        ids = prompt_chunk_ids(bundle, "a large red circle", 1)
        vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
                  "image_size": 32, "patch_size": 16}  # fmt: skip
        towers: list[tuple[str, Any, Any, Any]] = []
        for width, layers, heads in ((32, 2, 4), (32, 12, 4), (768, 12, 12)):
            torch.manual_seed(0)
            text = {**bundle.text_encoders[0].config.to_dict(), "hidden_size": width, "intermediate_size": 4 * width,
                    "num_hidden_layers": layers, "num_attention_heads": heads, "projection_dim": width}  # fmt: skip
            model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=width)).eval()
            target = torch.nn.functional.normalize(torch.randn(1, width, generator=torch.Generator().manual_seed(1)), dim=-1)  # fmt: skip
            towers.append((f"random, width {width}, {layers} layers", model.text_model, model.text_projection, target))
        towers.append(("toy encoder + toy CLIP, blue set", bundle.text_encoders[0], clip.text_projection, unit.reshape(1, -1)))  # fmt: skip
        for name, tower, projection, target in towers:
            with torch.no_grad():
                before = tower_states(tower, ids, 1)
            for lr in (1e-4, 1e-3, 2.4e-3):
                tuned, history = tune_tower(tower, projection, ids, target, 5, lr)
                with torch.no_grad():
                    moved = float((tower_states(tuned, ids, 1) - before).norm() / before.norm())
                print(f"width {name}: lr {lr:g} x 5: cos {history[0]:.3f} -> {history[-1]:.3f}, |zn-z|/|z| {moved:.3f}")
                out.setdefault("width", []).append({"tower": name, "lr": lr, "cos": history[-1], "moved": moved})
    if "per-shape" in checks:
        from sdcore.generate.session import NetworkSession
        from sdcore.testing.toyworld import SHAPES, world_scenes, write_dataset
        from sdplugin_aesthetic.create import save_aesthetic_embedding
        from sdplugin_aesthetic.handler import AestheticHandler

        with tempfile.TemporaryDirectory() as tmp_name:
            tmp = Path(tmp_name)
            for shape in SHAPES:  # a set of blue pictures of one shape
                scenes = world_scenes(16, 5, colours=[LOOK_COLOUR], shapes=[shape])
                folder = write_dataset(tmp / shape, scenes, captions=False)
                save_aesthetic_embedding(
                    create_aesthetic_embedding(folder, toy_clip_dir()), tmp / "embs" / f"{shape}.pt"
                )
            runs = [("base (weight 0)", 0.0, 2e-3, 5)]
            runs += [(mode, 0.9, lr, 5) for lr in (2e-3, 3e-3, 5e-3) for mode in ("every shape", "per shape")]
            for mode, weight, lr, steps in runs:
                looks, shapes = [], []
                for seed in range(3):
                    found = []
                    for shape in SHAPES:
                        group = [p for p in prompts if evaluate.parse_caption(p)[0] == shape]
                        if not group:
                            continue
                        if mode == "per shape":
                            handler = AestheticHandler(tmp / "embs")
                            handler.options = {"aesthetic": shape, "aesthetic_clip": str(toy_clip_dir()),
                                               "aesthetic_weight": weight, "aesthetic_steps": steps, "aesthetic_lr": lr}  # fmt: skip
                        else:
                            save_aesthetic_embedding(raw.reshape(1, -1), tmp / "all" / "look.pt")
                            handler = AestheticHandler(tmp / "all")
                            handler.options = {"aesthetic": "look", "aesthetic_clip": str(toy_clip_dir()),
                                               "aesthetic_weight": weight, "aesthetic_steps": steps, "aesthetic_lr": lr}  # fmt: skip
                        images = generate_images(
                            bundle, group, steps=evaluate.STEPS, cfg=evaluate.CFG, seed=1000 + seed,
                            sampler=evaluate.SAMPLER, width=IMAGE_SIZE, height=IMAGE_SIZE,
                            networks=NetworkSession({None: handler}),
                        )  # fmt: skip
                        found += [(p, read_image(image)) for p, image in zip(group, images, strict=True)]
                    looks.append(sum(r.colour == LOOK_COLOUR for _, r in found) / len(found))
                    shapes.append(evaluate.accuracy([p for p, _ in found], [r for _, r in found]).shape)
                row = {"mode": mode, "weight": weight, "lr": lr, "steps": steps,
                       "look": statistics.fmean(looks), "shape": statistics.fmean(shapes)}  # fmt: skip
                print(f"per-shape {mode}: weight {weight:g} lr {lr:g} steps {steps}: look {row['look']:.2f} "
                      f"({min(looks):.2f}-{max(looks):.2f}), shape accuracy {row['shape']:.2f} "
                      f"({min(shapes):.2f}-{max(shapes):.2f})")  # fmt: skip
                out.setdefault("per_shape", []).append(row)
    write_json("aesthetic", out)
    return out


if __name__ == "__main__":
    main()
