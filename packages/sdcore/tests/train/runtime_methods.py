"""Test-only training methods: small, fast, and honest about what they train."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdcore.options import option
from sdcore.train.method import Capabilities, SaveInfo, TrainingMethod
from sdcore.train.options import TrainOptions


@dataclass
class ConvOutOptions(TrainOptions):
    train_text_norm: bool = option(False, "Also train the text encoder's final LayerNorm.")


class ConvOutMethod(TrainingMethod[ConvOutOptions]):
    """Trains the UNet's ``conv_out`` (and optionally the text encoders' final LayerNorm)."""

    name = "convout"
    options_class = ConvOutOptions

    def _modules(self, bundle: Any) -> dict[str, Any]:
        from sdcore.models.text import final_layer_norm

        mods = {"unet_conv_out": bundle.unet.conv_out}
        if self.options.train_text_norm:
            for i, te in enumerate(bundle.text_encoders):
                mods[f"te{i}_final_layer_norm"] = final_layer_norm(te)
        return mods

    def prepare(self, bundle: Any) -> list[dict[str, Any]]:
        for module in bundle.components().values():
            module.requires_grad_(False)
        self.bundle = bundle
        params = []
        for module in self._modules(bundle).values():
            module.requires_grad_(True)
            params += list(module.parameters())
        return [{"params": params, "name": "convout"}]

    def capabilities(self) -> Capabilities:
        return Capabilities(trains_text_encoder=self.options.train_text_norm)

    def trainable_state_dict(self) -> dict[str, Any]:
        return {
            f"{m}.{k}": v.detach().float().clone()
            for m, mod in self._modules(self.bundle).items()
            for k, v in mod.state_dict().items()
        }

    def load_trainable_state_dict(self, state: dict[str, Any]) -> None:
        for m, mod in self._modules(self.bundle).items():
            mod.load_state_dict({k.split(".", 1)[1]: v for k, v in state.items() if k.split(".", 1)[0] == m})

    def save(self, bundle: Any, info: SaveInfo) -> Path:
        from safetensors.torch import save_file
        from sdcore.io import atomic_path

        dtype = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}[self.options.save_dtype]
        import torch

        tensors = {k: v.to(getattr(torch, dtype)).contiguous() for k, v in self.trainable_state_dict().items()}
        with atomic_path(info.path) as tmp:
            save_file(tensors, str(tmp), metadata=info.metadata)
        return info.path

    def load_result(self, bundle: Any, path: Path) -> None:
        from safetensors.torch import load_file

        self.bundle = bundle
        state = {k: v.float() for k, v in load_file(str(path)).items()}
        self.load_trainable_state_dict(state)


class ProjOutMethod(ConvOutMethod):
    """Trains a transformer's output projection only (SD3 and Flux both have ``proj_out``)."""

    name = "projout"

    def _modules(self, bundle: Any) -> dict[str, Any]:
        return {"proj_out": bundle.transformer.proj_out}


class FailsOnRank1AtStep3(ConvOutMethod):
    """Raises in step 3 on the process of rank 1 only (a corrupt batch, a disk error), for multi-process runs;
    the other processes go on into the step's gradient all-reduce."""

    def compute_loss(self, ctx: Any) -> Any:
        import os

        if ctx.step == 2 and os.environ.get("RANK") == "1":
            raise RuntimeError("injected failure on rank 1 in step 3")
        return None


class RecordsProcesses(ConvOutMethod):
    """Appends what :attr:`TrainingMethod.processes` says in each ``prepare`` (the pre-flight's plan, then the
    run's) as ``index/count`` to ``processes-<RANK>.txt`` beside the output."""

    def prepare(self, bundle: Any) -> list[dict[str, Any]]:
        import os

        p = self.processes
        record = Path(self.options.output).parent / f"processes-{os.environ.get('RANK', '0')}.txt"
        record.parent.mkdir(parents=True, exist_ok=True)
        with record.open("a", encoding="utf-8") as f:
            f.write(f"{p.process_index}/{p.num_processes}\n")
        return super().prepare(bundle)


def loss_target(session: Any) -> tuple[Any, Any, Any, Any]:
    """The loss target the method sees for one batch at fixed noise and timesteps [100, 600], with the batch's
    latents, the noise and the timesteps (the loss-target tests of test_loop and test_prediction_type)."""
    import torch
    from sdcore.train.noise import sample_noise

    batch = session.make_batch(session.data.epoch_plan(0)[0])
    noise, _ = sample_noise([1, 2], batch.latents.shape[1:])
    t = torch.tensor([100, 600])
    seen: dict[str, Any] = {}

    def compute_loss(ctx: Any) -> None:
        seen["target"] = ctx.target
        return None

    session.method.compute_loss = compute_loss
    with torch.no_grad():
        session.sample_loss(batch, noise, t, 0)
    return seen["target"], batch.latents, noise, t
