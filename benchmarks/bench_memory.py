"""The memory plan against measured peaks: ``sdcore.train.memory`` estimate vs real training steps.

For each size (the tiny, mid and SD1.5-sized models of ``bench_train``), a fresh interpreter
imports everything, records its RSS (the baseline), builds the model, trains a few LoRA steps
through ``sdcore.train.loop.train`` and reports its peak: ``ru_maxrss`` minus the baseline on CPU,
``torch.cuda.max_memory_allocated`` on a GPU. The estimate is computed the way the runtime prints
it before loading (:func:`sdcore.train.preflight.memory_plan`), from the same options.

    python -m benchmarks memory [--sizes tiny,mid,sd15] [--steps 3] [--batch 1] [--checkpointing]
                                [--method lora|dreambooth]
    python -m benchmarks memory -- --calibrate     # re-measure the activation constants

``--calibrate`` measures what autograd saves for one UNet forward (unique storages seen by
``torch.autograd.graph.saved_tensors_hooks``, parameters excluded) for each size at two
resolutions, adapter (LoRA on a frozen UNet) and full training, and fits ``K_RES``, ``K_TF`` and ``K_CTX`` of
:data:`sdcore.train.memory.ACTIVATION_CONSTANTS` by least squares.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

from .common import print_table, run_isolated, write_json

SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"resolution": 64, "rank": 4, "calibrate": (64, 128, 256)},
    "mid": {"resolution": 128, "rank": 8, "calibrate": (128, 256)},
    "sd15": {"resolution": 256, "rank": 16, "calibrate": (128, 256)},
}


def _rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def run_measure(size: str, steps: str, batch: str, checkpointing: str = "0", method: str = "lora") -> dict[str, Any]:
    """One measured run in this (fresh) process: peak above the post-import baseline, and the estimate."""
    import torch
    from sdcore.train.loop import train
    from sdcore.train.preflight import memory_plan

    from .bench_train import build_bundle, make_data

    cfg = SIZES[size]
    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as tmp:
        data = make_data(Path(tmp), "mid" if size == "mid" else size, max(4, int(batch) * 2))
        common: dict[str, Any] = dict(
            model="tiny:sd1",  # placeholder: the bundle passed to train() is used
            data=str(data),
            output=str(Path(tmp) / "out.safetensors"),
            resolution=cfg["resolution"],
            batch_size=int(batch),
            max_steps=int(steps),
            seed=0,
            progress=False,
            min_bucket_reso=64,
            max_bucket_reso=1024,
            save_state=False,
            gradient_checkpointing=checkpointing == "1",
        )
        if method == "dreambooth":
            from sdplugin_dreambooth.method import DreamBoothMethod
            from sdplugin_dreambooth.options import DreamBoothOptions

            options: Any = DreamBoothOptions(**common)
            trainer: Any = DreamBoothMethod(options)
        else:
            from sdplugin_lora.method import LoraMethod, LoraOptions

            options = LoraOptions(rank=cfg["rank"], alpha=cfg["rank"], **common)
            trainer = LoraMethod(options)
        import gc

        # everything the run imports, imported before the baseline: the libraries are not the plan's
        import accelerate  # noqa: F401
        import sdcore.train.cache  # noqa: F401
        import sdplugin_lora.network  # noqa: F401
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel  # noqa: F401
        from transformers import CLIPTextModel  # noqa: F401

        gc.collect()
        baseline_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        current_mb = _rss_mb()
        bundle = build_bundle(size)
        plan = memory_plan(trainer, options, bundle=bundle, device="cuda" if cuda else "cpu")
        if cuda:  # the runtime places the model; the peak counts from here
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        train(trainer, bundle=bundle)
        seconds = time.perf_counter() - start
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    estimate = plan.estimate
    result: dict[str, Any] = {
        "size": size,
        "method": method,
        "batch": int(batch),
        "resolution": cfg["resolution"],
        "gradient_checkpointing": checkpointing == "1",
        "steps": int(steps),
        "seconds": seconds,
        "baseline_rss_mb": current_mb,
        "baseline_maxrss_mb": baseline_mb,
        "peak_rss_mb": peak_mb,
        "estimate_mb": estimate.total / 2**20,
        "estimate_parts_mb": {
            "weights": estimate.weights / 2**20,
            "gradients": estimate.gradients / 2**20,
            "optimizer": estimate.optimizer / 2**20,
            "activations": estimate.activations / 2**20,
            "runtime": estimate.runtime / 2**20,
        },
    }
    if cuda:
        result["measured_mb"] = torch.cuda.max_memory_allocated() / 2**20
        result["measure"] = "torch.cuda.max_memory_allocated"
    else:
        result["measured_mb"] = peak_mb - current_mb
        result["measure"] = "ru_maxrss - VmRSS after imports"
    return result


# ----------------------------------------------------------------------------------------------------------
# calibration of the activation constants


def saved_tensor_bytes(unet: Any, batch: int, resolution: int, width: int, *, checkpointing: bool = False) -> int:
    """Bytes of the unique non-parameter storages autograd saves in one UNet forward."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in unet.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor: Any) -> Any:
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in params:
            seen[ptr] = storage.nbytes()
        return tensor

    side = resolution // 8
    torch.manual_seed(0)
    latents = torch.randn(batch, 4, side, side)
    hidden = torch.randn(batch, 77, width)
    if checkpointing:
        unet.enable_gradient_checkpointing()
        unet.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = unet(latents, torch.tensor([500] * batch), hidden).sample
    del out
    return sum(seen.values())


def run_calibrate(size: str, mode: str) -> dict[str, Any]:
    from sdcore.train.memory import unet_blocks
    from sdplugin_lora.method import LoraMethod, LoraOptions

    from .bench_train import build_bundle

    rows = []
    bundle = build_bundle(size)
    unet = bundle.unet
    width = bundle.text_encoders[0].config.hidden_size
    if mode == "adapter":
        LoraMethod(LoraOptions(rank=SIZES[size]["rank"])).prepare(bundle)
    else:
        unet.requires_grad_(True)
    for resolution in SIZES[size]["calibrate"]:
        for batch in (1,):  # saved bytes are exactly linear in the batch
            measured = saved_tensor_bytes(unet, batch, resolution, width)
            side = resolution / 8
            blocks = unet_blocks(dict(unet.config), side * side)
            res = sum((b.c_in + b.c_out) * b.area for b in blocks if b.kind == "res")
            tf = sum(b.c_out * b.area for b in blocks if b.kind == "tf")
            ctx = sum(b.c_out * 77 for b in blocks if b.kind == "tf")
            rows.append(
                {
                    "size": size,
                    "mode": mode,
                    "resolution": resolution,
                    "batch": batch,
                    "bytes": measured,
                    "res_units": batch * 4 * res,
                    "tf_units": batch * 4 * tf,
                    "ctx_units": batch * 4 * ctx,
                }
            )
    return {"rows": rows}


def fit_constants(rows: list[dict[str, Any]]) -> dict[str, tuple[float, float, float]]:
    """Least-squares K_RES, K_TF, K_CTX per mode, weighting each row by 1/bytes (relative error)."""
    import numpy as np

    out = {}
    for mode in ("adapter", "full"):
        chosen = [r for r in rows if r["mode"] == mode]
        a = np.array([[r[k] / r["bytes"] for k in ("res_units", "tf_units", "ctx_units")] for r in chosen])
        b = np.ones(len(chosen))
        (k_res, k_tf, k_ctx), *_ = np.linalg.lstsq(a, b, rcond=None)
        out[mode] = (float(k_res), float(k_tf), float(k_ctx))
    return out


# ----------------------------------------------------------------------------------------------------------
# a transformer family (Flux architecture): LoRA steps on a random-weight FluxTransformer2DModel

#: Flux-architecture sizes (hidden = heads x head_dim; double + single blocks), trained at ``resolution``
#: with ``text`` T5 tokens. "flux" is FLUX.1's real shape (for a GPU: benchmarks/gpu_flux_memory.py).
FLUX_SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"heads": 4, "head_dim": 32, "double": 2, "single": 4, "resolution": 256, "text": 64, "rank": 4},
    "mid": {"heads": 8, "head_dim": 48, "double": 4, "single": 8, "resolution": 512, "text": 128, "rank": 8},
    "flux": {"heads": 24, "head_dim": 128, "double": 19, "single": 38, "resolution": 1024, "text": 512, "rank": 16},
    # FLUX.1's blocks at FLUX.1's resolution, fewer of them: a short GPU check of per-block effects
    # (--cpu-offload-checkpointing's block inputs: 4608 tokens x 3072 per block)
    "stack": {"heads": 24, "head_dim": 128, "double": 4, "single": 8, "resolution": 1024, "text": 512, "rank": 16},
}
#: sizes with FLUX.1's own widths (random weights made on the training device, T5/CLIP-sized inputs)
FLUX_WIDE = ("flux", "stack")
#: what each transformer variant changes (``swap``: half the blocks, at least one)
FLUX_VARIANTS = ("plain", "checkpointing", "fp8", "swap", "fp8+checkpointing")
#: variant parts naming the frozen weights' storage (``--base-weights-dtype``); none of them: the compute dtype
FLUX_STORAGES = ("fp8", "nf4", "int8")


def variant_storage(variant: str) -> str:
    """The ``--base-weights-dtype`` a variant such as ``nf4+checkpointing`` asks for (``none`` without one)."""
    named = [part for part in variant.split("+") if part in FLUX_STORAGES]
    return named[0] if named else "none"


def flux_config(size: str) -> dict[str, Any]:
    """The diffusers ``FluxTransformer2DModel`` config of a :data:`FLUX_SIZES` entry."""
    cfg = FLUX_SIZES[size]
    head = cfg["head_dim"]
    first = head // 8 // 2 * 2  # FLUX.1: (16, 56, 56) for 128; every part even (rotary pairs)
    second = (head - first) // 2 // 2 * 2
    rope = (first, second, head - first - second)
    return {
        "patch_size": 1,
        "in_channels": 64,
        "num_layers": cfg["double"],
        "num_single_layers": cfg["single"],
        "attention_head_dim": head,
        "num_attention_heads": cfg["heads"],
        "joint_attention_dim": 4096 if size in FLUX_WIDE else 64,
        "pooled_projection_dim": 768 if size in FLUX_WIDE else 32,
        "guidance_embeds": True,
        "axes_dims_rope": rope,
    }


class FluxLoraStep:
    """A LoRA (rank r on every block Linear, trained in fp32 with AdamW) on a frozen random-weight
    Flux transformer, with the memory options applied the way the runtime applies them."""

    def __init__(
        self,
        size: str,
        variant: str,
        device: str = "cpu",
        *,
        mixed_precision: str = "no",
        blocks_to_swap: int | None = None,
        plan_only: bool = False,
        cpu_offload_checkpointing: bool = False,
    ) -> None:
        import torch
        from diffusers import FluxTransformer2DModel
        from sdcore.dtypes import torch_dtype
        from sdcore.train.memory_options import MemorySetup
        from sdcore.train.method import Capabilities
        from sdcore.train.placement import place_model

        self.size, self.variant, self.device = size, variant, torch.device(device)
        self.mixed_precision = mixed_precision
        self._swap = blocks_to_swap
        self._offload = cpu_offload_checkpointing
        cfg = FLUX_SIZES[size]
        torch.manual_seed(0)
        big = size in FLUX_WIDE or plan_only
        with torch.device("meta" if big else "cpu"):
            model = FluxTransformer2DModel(**flux_config(size))
        model.requires_grad_(False)
        self.model = model
        self.factors = self._lora(model, cfg["rank"])
        self.options = self.train_options()
        # the plan's counts from the unconverted model: after nf4/int8 conversion the weights are
        # buffers, and no converted layer is a plain Linear any more
        self._counts = self._plan_counts(model)
        if plan_only:  # shapes only: enough for the estimate
            return
        if big:  # random weights made where they train, in the compute dtype (no fp32 copy of 12B weights)
            # dtype first, on the meta device (free): no fp32 copy of 12B weights on the GPU, ever
            model.to(torch_dtype(mixed_precision)).to_empty(device=self.device)
            with torch.no_grad():
                for p in model.parameters():
                    p.normal_(0, 0.02)

        class _Bundle:  # what MemorySetup and placement read of a bundle
            denoiser = model

            def components(self) -> dict[str, Any]:
                return {"transformer": model}

        bundle: Any = _Bundle()
        setup = MemorySetup.before_placement(bundle, self.options)
        place_model(bundle, self.factors, Capabilities(), self.device, mixed_precision, stay_on_cpu=setup.swapped)
        setup.after_placement(bundle, self.device)
        if cpu_offload_checkpointing:  # the runtime's function, block inputs kept in host memory
            from sdcore.train.offload_checkpointing import ActivationOffload

            model.enable_gradient_checkpointing(gradient_checkpointing_func=ActivationOffload(self.device))
        elif "checkpointing" in variant:
            model.enable_gradient_checkpointing()
        model.train()
        self.optimizer = torch.optim.AdamW(self.factors, lr=1e-4)

    def train_options(self) -> Any:
        from sdcore.train.options import TrainOptions

        count = len(self.model.transformer_blocks) + len(self.model.single_transformer_blocks)
        return TrainOptions(
            model="bench",
            data="bench",
            output="bench",
            resolution=FLUX_SIZES[self.size]["resolution"],
            mixed_precision=self.mixed_precision,
            gradient_checkpointing="checkpointing" in self.variant,
            cpu_offload_checkpointing=self._offload,
            base_weights_dtype=variant_storage(self.variant),
            blocks_to_swap=self._swap
            if self._swap is not None
            else (max(1, count // 2) if "swap" in self.variant else 0),
        )

    @staticmethod
    def _plan_counts(model: Any) -> dict[str, Any]:
        """What :class:`ParameterPlan` needs of the frozen model, counted by the runtime's own functions."""
        from sdcore.train.base_weights import convertible_counts
        from sdcore.train.block_swap import block_sizes, swappable_blocks

        linear, rows = convertible_counts(model)
        return {
            "parameters": sum(p.numel() for p in model.parameters()),
            "linear": linear,
            "rows": rows,
            "blocks": tuple(block_sizes(model, trainable=set())),
            "block_rows": tuple(convertible_counts(block)[1] for block in swappable_blocks(model)),
        }

    @staticmethod
    def _lora(model: Any, rank: int) -> list[Any]:
        import torch
        from torch import nn

        factors: list[Any] = []
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and "transformer_blocks" in name:
                down = nn.Parameter(torch.randn(rank, module.in_features) * 0.01)
                up = nn.Parameter(torch.zeros(module.out_features, rank))
                factors += [down, up]

                def hook(mod: Any, args: Any, out: Any, down: Any = down, up: Any = up) -> Any:
                    return out + (args[0].to(down.dtype) @ down.t() @ up.t()).to(out.dtype)

                module.register_forward_hook(hook)
        return factors

    def inputs(self) -> dict[str, Any]:
        import torch

        cfg = FLUX_SIZES[self.size]
        side = cfg["resolution"] // 16  # latent / 8, packed 2x2
        config = self.model.config
        ids = torch.stack(
            torch.meshgrid(torch.zeros(1), torch.arange(float(side)), torch.arange(float(side)), indexing="ij"), -1
        ).reshape(-1, 3)
        d = self.device
        return {
            "hidden_states": torch.randn(1, side * side, 64, device=d),
            "encoder_hidden_states": torch.randn(1, cfg["text"], config.joint_attention_dim, device=d),
            "pooled_projections": torch.randn(1, config.pooled_projection_dim, device=d),
            "timestep": torch.tensor([0.5], device=d),
            "guidance": torch.tensor([3.5], device=d),
            "img_ids": ids.to(d),
            "txt_ids": torch.zeros(cfg["text"], 3, device=d),
            "return_dict": False,
        }

    def step(self) -> float:
        import contextlib

        import torch
        from sdcore.dtypes import torch_dtype

        inputs = self.inputs()
        autocast = (
            torch.autocast(self.device.type, dtype=torch_dtype(self.mixed_precision))
            if self.mixed_precision != "no"
            else contextlib.nullcontext()
        )
        with autocast:
            out = self.model(**inputs)[0]
        loss = (out.float() - inputs["hidden_states"]).square().mean()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    def estimate(self, device: str) -> Any:
        """The memory plan's estimate for this run (a toy family of this shape, registered here)."""

        from sdcore.models.family import register_family
        from sdcore.models.flux import FLUX
        from sdcore.models.layout import ModelLayout
        from sdcore.testing.toyfamily import toy_flow_family
        from sdcore.train.memory import ParameterPlan, estimate_memory

        name = f"bench-flux-{self.size}"
        register_family(toy_flow_family(name, FLUX, FLUX_SIZES[self.size]["text"]))  # equal again: a no-op
        config = {**dict(self.model.config), "_class_name": "FluxTransformer2DModel"}
        layout = ModelLayout("bench", name, "flow", {"transformer": config, "vae": {}, "text_encoders": []}, "bench")
        counts = self._counts
        lora = sum(p.numel() for p in self.factors)
        plan = ParameterPlan(
            {"transformer": counts["parameters"]},
            lora,
            lora,
            result=lora,
            denoiser_fp8=counts["linear"],
            blocks=counts["blocks"],
            denoiser_rows=counts["rows"],
            block_rows=counts["block_rows"],
        )
        return estimate_memory(layout, plan, self.options, device=device)


def run_measure_transformer(size: str, variant: str, steps: str) -> dict[str, Any]:
    """One measured Flux-architecture LoRA run in this (fresh) process (CPU: peak RSS above the
    post-import baseline; a GPU: ``torch.cuda.max_memory_allocated``)."""
    import gc

    import diffusers  # noqa: F401
    import sdcore.train.block_swap
    import sdcore.train.fp8
    import sdcore.train.placement  # noqa: F401
    import torch
    from diffusers import FluxTransformer2DModel  # noqa: F401

    cuda = torch.cuda.is_available()
    gc.collect()
    current_mb = _rss_mb()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    run = FluxLoraStep(size, variant, "cuda" if cuda else "cpu")
    start = time.perf_counter()
    losses = [run.step() for _ in range(int(steps))]
    seconds = time.perf_counter() - start
    estimate = run.estimate("cuda" if cuda else "cpu")
    measured = (
        torch.cuda.max_memory_allocated() / 2**20
        if cuda
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - current_mb
    )
    tensors = estimate.total  # as the run prints it (on the CPU: with its runtime part)
    return {
        "size": size,
        "variant": variant,
        "steps": int(steps),
        "seconds": seconds,
        "losses": losses,
        "measured_mb": measured,
        "measure": "torch.cuda.max_memory_allocated" if cuda else "ru_maxrss - VmRSS after imports",
        "estimate_mb": tensors / 2**20,
        "estimate_parts_mb": {
            "weights": estimate.weights / 2**20,
            "gradients": estimate.gradients / 2**20,
            "optimizer": estimate.optimizer / 2**20,
            "activations": estimate.activations / 2**20,
            "runtime": estimate.runtime / 2**20,
        },
    }


def transformer_main(args: argparse.Namespace) -> dict[str, Any]:
    results, table = [], []
    for size in args.transformer_sizes.split(","):
        for variant in args.variants.split(","):
            r = run_isolated("benchmarks.bench_memory", "run_measure_transformer", size, variant, str(args.steps))
            results.append(r)
            parts = r["estimate_parts_mb"]
            table.append(
                (
                    size,
                    variant,
                    f"{r['measured_mb']:.0f}",
                    f"{r['estimate_mb']:.0f}",
                    f"{r['estimate_mb'] / r['measured_mb']:.2f}",
                    "/".join(
                        f"{parts[k]:.0f}" for k in ("weights", "gradients", "optimizer", "activations", "runtime")
                    ),
                    f"{r['seconds']:.1f}",
                )
            )
    print_table(
        "Flux-architecture LoRA memory: estimate vs measured peak (" + (results[0]["measure"] if results else "") + ")",
        table,
        ("size", "variant", "measured MiB", "estimate MiB", "est/meas", "W/G/O/A/R MiB", "seconds"),
    )
    write_json("memory_transformer", {"args": vars(args), "results": results})
    return {"results": results}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks memory")
    parser.add_argument("--sizes", default="tiny,mid,sd15")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--checkpointing", action="store_true", help="also measure with gradient checkpointing")
    parser.add_argument("--method", default="lora", choices=("lora", "dreambooth"))
    parser.add_argument("--calibrate", action="store_true", help="re-measure the activation constants")
    parser.add_argument(
        "--transformer", action="store_true", help="a Flux-architecture transformer instead (LoRA steps, no train loop)"
    )
    parser.add_argument("--transformer-sizes", default="tiny,mid", help=f"of {', '.join(FLUX_SIZES)}")
    parser.add_argument("--variants", default=",".join(FLUX_VARIANTS), help=f"of {', '.join(FLUX_VARIANTS)}")
    args = parser.parse_args(argv or [])
    if args.transformer:
        return transformer_main(args)
    sizes = args.sizes.split(",")
    if args.calibrate:
        rows: list[dict[str, Any]] = []
        for size in sizes:
            for mode in ("adapter", "full"):
                rows += run_isolated("benchmarks.bench_memory", "run_calibrate", size, mode)["rows"]
        constants = fit_constants(rows)
        from sdcore.train.memory import ACTIVATION_CONSTANTS

        table = []
        for r in rows:
            k_res, k_tf, k_ctx = constants[r["mode"]]
            fitted = k_res * r["res_units"] + k_tf * r["tf_units"] + k_ctx * r["ctx_units"]
            k_res0, k_tf0, k_ctx0, _ = ACTIVATION_CONSTANTS[r["mode"]]
            current = k_res0 * r["res_units"] + k_tf0 * r["tf_units"] + k_ctx0 * r["ctx_units"]
            table.append(
                (
                    r["size"],
                    r["mode"],
                    str(r["resolution"]),
                    str(r["batch"]),
                    f"{r['bytes'] / 2**20:.1f}",
                    f"{fitted / r['bytes']:.2f}",
                    f"{current / r['bytes']:.2f}",
                )
            )
        print_table(
            "activation bytes saved by autograd (one UNet forward)",
            table,
            ("size", "mode", "px", "batch", "saved MiB", "fit/measured", "shipped/measured"),
        )
        print("fitted (K_RES, K_TF, K_CTX):", json.dumps(constants))
        write_json("memory_calibration", {"rows": rows, "constants": constants})
        return {"rows": rows, "constants": constants}
    results = []
    table = []
    variants = [False, True] if args.checkpointing else [False]
    for size in sizes:
        for gc in variants:
            steps = min(args.steps, 3) if size == "sd15" else args.steps
            r = run_isolated(
                "benchmarks.bench_memory",
                "run_measure",
                size,
                str(steps),
                str(args.batch),
                "1" if gc else "0",
                args.method,
            )
            results.append(r)
            parts = r["estimate_parts_mb"]
            table.append(
                (
                    size,
                    f"{r['resolution']}",
                    str(r["batch"]),
                    "yes" if gc else "no",
                    f"{r['measured_mb']:.0f}",
                    f"{r['estimate_mb']:.0f}",
                    f"{r['estimate_mb'] / r['measured_mb']:.2f}",
                    "/".join(
                        f"{parts[k]:.0f}" for k in ("weights", "gradients", "optimizer", "activations", "runtime")
                    ),
                )
            )
    print_table(
        f"{args.method} training memory: estimate vs measured peak ("
        + (results[0]["measure"] if results else "")
        + ")",
        table,
        ("size", "px", "batch", "grad ckpt", "measured MiB", "estimate MiB", "est/meas", "W/G/O/A/R MiB"),
    )
    print("goal: estimate within 25% of the measured peak (0.75 <= est/meas <= 1.25)")
    write_json("memory", {"args": vars(args), "results": results})
    return {"results": results}


if __name__ == "__main__":
    print(json.dumps(main(), indent=2, default=str))
