"""Why APT (DreamArtist) teaches the toy composition's colour but not its shape: sdcore's APT beside
an independent DreamArtist loop written from the documented algorithm.

The reference (:func:`reference_train`) shares nothing with sdcore's training runtime or the TI/APT
plugins: it puts the vectors into the text encoder with a forward hook on the token-embedding
table, draws noise and timesteps itself, and does what DreamArtist's ``cptuning.train_embedding``
does (research/ti_hn_apt_aesthetic.md, section 3.3): one UNet pass on ``[name-neg; name]``,
``eps = eps_neg + cfg * (eps_pos - eps_neg)`` (the positive pass alone when cfg is 1), epsilon MSE,
AdamW with torch's default weight decay 0.01 (DreamArtist does not set it), the gradient of each
embedding clipped to norm 1 on its own, the negative initialised as the init text plus N(0, 1e-3).

Both are trained on the benchmark's composition (a large red triangle named ``zwx``, 8 pictures,
template ``[name]``, batch 4, 4 positive vectors, 1 negative) and scored the same way: N
fixed-seed samples of ``zwx`` with ``zwx-neg`` as the negative prompt, DDIM 10 steps, at the
toy world's sampler CFG 5 and at the training CFG. If the reference misses as sdcore does, the
miss belongs to the method on this world, not to sdcore.

    python -m benchmarks apt                                  # cfg 1 and 3, seeds 0-2, 150 steps
    python -m benchmarks apt -- --cfgs 1,2,3,5 --seeds 1 --impls sdcore
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from .common import print_table, write_json
from .quality_setup import COMPOSITION, METHODS, concept_of, write_concept_data, write_name_template

NAME = "zwx"


# --- the reference DreamArtist loop -------------------------------------------------------------------
def _images(folder: Path) -> Any:
    """The concept pictures of ``folder`` (any depth) as a [N, 3, H, W] tensor in [-1, 1]."""
    import numpy as np
    import torch
    from PIL import Image

    paths = sorted(p for p in folder.rglob("*.png"))
    arrays = [np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 127.5 - 1.0 for p in paths]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


class _Inserted:
    """Replaces the token rows 1..n of every prompt by ``vectors`` (the prompts are ``[BOS] x*n [EOS]...``)."""

    def __init__(self, encoder: Any) -> None:
        self.vectors: Any = None
        self.hook = encoder.get_input_embeddings().register_forward_hook(self._replace)

    def _replace(self, _module: Any, _args: Any, output: Any) -> Any:
        if self.vectors is None:
            return output
        out = output.clone()
        out[:, 1 : 1 + self.vectors.shape[0]] = self.vectors.to(out)
        return out


def reference_encode(bundle: Any, vectors: Any) -> Any:
    """Hidden states [1, 77, D] of a prompt made only of ``vectors`` (the reference's insertion)."""
    encoder, tokenizer = bundle.text_encoders[0], bundle.tokenizers[0]
    ids = tokenizer(" ".join(["x"] * vectors.shape[0]), padding="max_length", max_length=77, return_tensors="pt")
    inserted = _Inserted(encoder)
    try:
        inserted.vectors = vectors
        return encoder(input_ids=ids.input_ids.to(encoder.device)).last_hidden_state
    finally:
        inserted.hook.remove()


def reference_train(
    bundle: Any,
    pixels: Any,
    *,
    vectors: int,
    neg_vectors: int,
    lr: float,
    cfg: float,
    steps: int,
    seed: int,
    save_at: list[int],
    neg_lr_weight: float = 1.0,
    batch_size: int = 4,
    clip_each: bool = True,
) -> dict[int, tuple[Any, Any]]:
    """Train DreamArtist's pair on ``pixels``; returns ``{step: (positive, negative)}`` at ``save_at``.

    ``clip_each=False`` clips both embeddings' gradients together (sdcore's runtime) instead of
    each on its own (DreamArtist), to measure that one remaining difference.
    """
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(seed)
    unet, vae, encoder, tokenizer = bundle.unet, bundle.vae, bundle.text_encoders[0], bundle.tokenizers[0]
    for module in (unet, vae, encoder):
        module.requires_grad_(False)
    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.sample(generator=gen) * bundle.vae_scaling_factor
        star = encoder.get_input_embeddings().weight[tokenizer("*", add_special_tokens=False).input_ids[0]]
    positive = torch.nn.Parameter(star.detach().float().repeat(vectors, 1))
    negative = torch.nn.Parameter(
        star.detach().float().repeat(neg_vectors, 1) + torch.randn(neg_vectors, star.shape[0], generator=gen) * 1e-3
    )
    optimizer = torch.optim.AdamW([{"params": [positive]}, {"params": [negative], "lr": lr * neg_lr_weight}], lr=lr)
    scheduler = bundle.noise_scheduler
    steps_total = int(scheduler.config.num_train_timesteps)
    saved: dict[int, tuple[Any, Any]] = {}
    order: list[int] = []
    for step in range(1, steps + 1):
        if len(order) < batch_size:
            order += torch.randperm(len(latents), generator=gen).tolist()
        index, order = order[:batch_size], order[batch_size:]
        x0 = latents[index]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, steps_total, (len(index),), generator=gen)
        noisy = scheduler.add_noise(x0, noise, t)
        cond_pos = reference_encode(bundle, positive).expand(len(index), -1, -1)
        if cfg == 1.0:  # DreamArtist skips the negative pass when the (upper) scale is 1
            eps = unet(noisy, t, cond_pos).sample
        else:
            cond_neg = reference_encode(bundle, negative).expand(len(index), -1, -1)
            out = unet(torch.cat([noisy, noisy]), torch.cat([t, t]), torch.cat([cond_neg, cond_pos])).sample
            eps_neg, eps_pos = out.chunk(2)
            eps = eps_neg + cfg * (eps_pos - eps_neg)
        loss = F.mse_loss(eps.float(), noise.float())
        optimizer.zero_grad()
        loss.backward()
        if clip_each:
            torch.nn.utils.clip_grad_norm_(positive, 1.0)
            torch.nn.utils.clip_grad_norm_(negative, 1.0)
        else:
            torch.nn.utils.clip_grad_norm_([positive, negative], 1.0)
        optimizer.step()
        if step in save_at:
            saved[step] = (positive.detach().clone(), negative.detach().clone())
    return saved


def _write_pair(folder: Path, positive: Any, negative: Any) -> Path:
    """A1111 ``.pt`` files ``zwx.pt`` and ``zwx-neg.pt`` (the format DreamArtist writes)."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    for name, vec in ((NAME, positive), (f"{NAME}-neg", negative)):
        data = {"string_to_token": {"*": 265}, "string_to_param": {"*": vec.cpu()}, "name": name, "step": 0}
        torch.save(data, folder / f"{name}.pt")
    return folder / f"{NAME}.pt"


# --- sdcore's APT --------------------------------------------------------------------------------------
def sdcore_train(folders: dict[str, Path], out: Path, *, lr: float, cfg: float, steps: int, seed: int, every: int,
                 neg_lr_weight: float = 1.0) -> list[tuple[int, Path]]:  # fmt: skip
    """sdcore's APT as the quality benchmark runs it; returns (step, result file) per checkpoint."""
    from sdcore.testing.contract import toyworld_bundle
    from sdcore.testing.toyworld import IMAGE_SIZE
    from sdcore.train.loop import TrainSession

    spec = METHODS["apt"]
    method_class = spec.method_class()
    options = method_class.options_class(
        model="toyworld:", data=str(folders["data"]), output=str(out / f"{NAME}.pt"), resolution=IMAGE_SIZE,
        min_bucket_reso=IMAGE_SIZE, max_bucket_reso=2 * IMAGE_SIZE, bucket_step=IMAGE_SIZE, batch_size=4,
        max_steps=steps, lr=lr, seed=seed, save_every=every if every < steps else None, save_state=False,
        progress=False, cache_latents=True, template=str(folders["template"]), cfg_scale=str(cfg),
        neg_lr_weight=neg_lr_weight, **spec.overrides,
    )  # fmt: skip
    session = TrainSession(method_class(options), bundle=toyworld_bundle())
    result = session.run()
    saved = [*session.checkpoints.saved_results, Path(result.output)]
    return [(every * (i + 1) if i < len(saved) - 1 else steps, p) for i, p in enumerate(saved)]


# --- scoring ---------------------------------------------------------------------------------------------
def score(path: Path, *, cfg: float, n: int) -> dict[str, float]:
    """Concept score, red share and triangle share of n samples of ``path.stem`` with ``<stem>-neg`` as
    the negative prompt at ``cfg`` (the quality benchmark's sampler otherwise)."""
    from sdcore.generate.pipeline import generate_images
    from sdcore.generate.session import session_from_plugin_manager
    from sdcore.plugins import get_plugin_manager
    from sdcore.testing.contract import toyworld_bundle
    from sdcore.testing.toyworld import IMAGE_SIZE, evaluate, read_image

    concept = concept_of(COMPOSITION)
    bundle = toyworld_bundle()
    with tempfile.TemporaryDirectory() as empty:
        networks = session_from_plugin_manager(
            get_plugin_manager(), {"embeddings_dir": str(path.parent)}, models_dir=empty
        )
    images = generate_images(
        bundle, [path.stem] * n, negative_prompt=f"{path.stem}-neg", steps=evaluate.STEPS, cfg=cfg, seed=100,
        sampler=evaluate.SAMPLER, width=IMAGE_SIZE, height=IMAGE_SIZE, networks=networks,
    )  # fmt: skip
    readings = [read_image(image) for image in images]
    return {
        "concept": concept.score(images),
        "red": sum(r.colour == concept.colour for r in readings) / n,
        "triangle": sum(r.shape == concept.shape for r in readings) / n,
    }


def check_reference_conditioning() -> float:
    """Largest difference between the reference's conditioning and sdcore APT's for the same vectors
    (the two insert vectors independently; they must agree or the comparison means nothing)."""
    import torch
    from sdcore.testing.contract import toyworld_bundle
    from sdplugin_ti.apply import apply_embeddings
    from sdplugin_ti.embedding import SINGLE, Embedding

    bundle = toyworld_bundle()
    vectors = torch.randn(4, bundle.text_encoders[0].get_input_embeddings().embedding_dim) * 0.5
    with torch.no_grad():
        reference = reference_encode(bundle, vectors)
        handle = apply_embeddings(bundle, [Embedding(name=NAME, vectors={SINGLE: vectors})])
        try:
            from sdcore.models.text import encode_prompts

            ours = encode_prompts(bundle, [handle.expand(NAME)]).hidden_states
        finally:
            handle.remove()
    return float((reference - ours).abs().max())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks apt")
    parser.add_argument("--impls", default="sdcore,reference", help="comma-separated: sdcore, reference")
    parser.add_argument("--cfgs", default="1,3", help="training CFG scales")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--checkpoints", type=int, default=3)
    parser.add_argument("--lr", type=float, default=METHODS["apt"].lr)
    parser.add_argument("--neg-lr-weight", type=float, default=1.0)
    parser.add_argument("--n", type=int, default=16, help="samples per score")
    parser.add_argument(
        "--clip-together", action="store_true", help="reference: clip both gradients together, as sdcore does"
    )
    parser.add_argument("--json", default="apt")
    args = parser.parse_args(argv)

    import torch
    from sdcore.testing.contract import toyworld_bundle

    torch.set_num_threads(1)
    diff = check_reference_conditioning()
    print(f"reference vs sdcore conditioning for the same vectors: max |diff| = {diff:.2e}")
    every = max(args.steps // args.checkpoints, 1)
    save_at = [every * (i + 1) for i in range(args.checkpoints - 1)] + [args.steps]
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folders = {
            "data": write_concept_data(root / "data", COMPOSITION),
            "template": write_name_template(root / "t.txt"),
        }
        pixels = _images(folders["data"])
        for impl in args.impls.split(","):
            for cfg in (float(c) for c in args.cfgs.split(",")):
                for seed in range(args.seeds):
                    out = root / f"{impl}-{cfg:g}-{seed}"
                    started = time.perf_counter()
                    if impl == "sdcore":
                        files = sdcore_train(folders, out, lr=args.lr, cfg=cfg, steps=args.steps, seed=seed,
                                             every=every, neg_lr_weight=args.neg_lr_weight)  # fmt: skip
                    elif impl == "reference":
                        saved = reference_train(
                            toyworld_bundle(), pixels, vectors=METHODS["apt"].overrides["vectors"],
                            neg_vectors=METHODS["apt"].overrides["neg_vectors"], lr=args.lr, cfg=cfg,
                            steps=args.steps, seed=seed, save_at=save_at, neg_lr_weight=args.neg_lr_weight,
                            clip_each=not args.clip_together,
                        )  # fmt: skip
                        files = [(s, _write_pair(out / str(s), *saved[s])) for s in save_at]
                    else:
                        raise SystemExit(f"unknown implementation {impl!r}: sdcore or reference")
                    seconds = time.perf_counter() - started
                    scores = {step: {"sampler": score(p, cfg=5.0, n=args.n), "train_cfg": score(p, cfg=cfg, n=args.n)}
                              for step, p in files}  # fmt: skip
                    runs.append({"impl": impl, "cfg": cfg, "seed": seed, "train_s": seconds, "scores": scores})
                    final = scores[args.steps]["sampler"]
                    print(f"{impl} cfg {cfg:g} seed {seed}: concept by step "
                          f"{[round(s['sampler']['concept'], 2) for s in scores.values()]} (sampler CFG 5), "
                          f"{[round(s['train_cfg']['concept'], 2) for s in scores.values()]} (CFG {cfg:g}); "
                          f"final red {final['red']:.2f} triangle {final['triangle']:.2f}", flush=True)  # fmt: skip
    rows = []
    for impl in args.impls.split(","):
        for cfg in (float(c) for c in args.cfgs.split(",")):
            mine = [r for r in runs if r["impl"] == impl and r["cfg"] == cfg]
            if not mine:
                continue
            cells = []
            for step in save_at:
                values = [r["scores"][step]["sampler"]["concept"] for r in mine]
                cells.append(f"{statistics.fmean(values):.2f}")
            at_train = [r["scores"][args.steps]["train_cfg"]["concept"] for r in mine]
            red = [r["scores"][args.steps]["sampler"]["red"] for r in mine]
            tri = [r["scores"][args.steps]["sampler"]["triangle"] for r in mine]
            final = [r["scores"][args.steps]["sampler"]["concept"] for r in mine]
            rows.append((impl, f"{cfg:g}", " / ".join(cells), f"{min(final):.2f}-{max(final):.2f}",
                         f"{statistics.fmean(at_train):.2f}", f"{statistics.fmean(red):.2f}",
                         f"{statistics.fmean(tri):.2f}"))  # fmt: skip
    steps_label = " / ".join(str(s) for s in save_at)
    print_table(
        f"APT on the toy composition, lr {args.lr:g}, {args.seeds} seed(s), mean over seeds (N={args.n})",
        rows,
        (
            "impl",
            "train cfg",
            f"concept at {steps_label} (CFG 5)",
            "final range",
            "final at train CFG",
            "red",
            "triangle",
        ),
    )
    payload = {"args": vars(args), "conditioning_diff": diff, "runs": runs}
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
