"""Applying LoRA files to a loaded model: switchable hooks, or merged into the weights.

A1111 semantics: ``<lora:name:te_w:unet_w>``; the UNet weight defaults to the text-encoder weight.
Merged application computes ``W + m * alpha/rank * up @ down`` in fp32 then casts, and keeps a
copy of only the weights it touched so :meth:`AppliedLoras.remove` restores them bit for bit
(subtracting again would not be exact in fp16). Hooked application changes no weight at all.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from sdcore.errors import NetworkMismatchError
from sdcore.generate.networks import Activation, NetworkRef, PromptNetworkHandler
from torch import nn

from .format import LoraFile, Match, ModuleWeights, match_modules, read_lora
from .naming import ModuleIndex, Target
from .network import LoraModule

log = logging.getLogger(__name__)


class LoraWarning(UserWarning):
    """Some keys of a LoRA file matched nothing in the model (they are listed)."""


@dataclass
class LoraSpec:
    """One LoRA to apply: a file (or parsed file) and its text-encoder / UNet weights."""

    lora: LoraFile | str | Path
    te_weight: float = 1.0
    unet_weight: float | None = None

    def parsed(self) -> LoraFile:
        return self.lora if isinstance(self.lora, LoraFile) else read_lora(self.lora)


class _DeltaHook(nn.Module):
    """Unmerged application of any ΔW (LoHa, LoKr, Tucker LoCon, DoRA): ``y += f(x, m * ΔW)``."""

    delta_weight: torch.Tensor

    def __init__(self, target: Target, delta: torch.Tensor) -> None:
        super().__init__()
        object.__setattr__(self, "base", target.module)
        self.register_buffer("delta_weight", delta)
        self._handle = target.module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        weight = self.delta_weight.to(device=x.device, dtype=x.dtype)
        if isinstance(module, nn.Conv2d):
            extra = F.conv2d(x, weight, None, module.stride, module.padding, module.dilation, module.groups)  # type: ignore[arg-type]
        else:
            extra = F.linear(x, weight)
        return output + extra.to(output.dtype)

    def detach(self) -> None:
        self._handle.remove()


def _effective_delta(target: Target, weights: ModuleWeights, multiplier: float) -> torch.Tensor:
    """``m * ΔW`` in fp32; DoRA re-normalises ``W + ΔW`` with its stored magnitude."""
    base = target.module.weight.detach().float()
    delta = weights.delta(tuple(base.shape))
    dora = weights.tensors.get("dora_scale")
    if dora is None:
        return delta * multiplier
    merged = base + delta
    magnitude = dora.float().to(base.device)
    if magnitude.shape[0] == base.shape[0] and (magnitude.dim() == 1 or magnitude.shape[1] == 1):
        norm = merged.flatten(1).norm(dim=1).reshape(magnitude.shape)  # per output row (LyCORIS wd_on_out)
    else:
        norm = merged.transpose(0, 1).flatten(1).norm(dim=1).reshape(magnitude.shape)  # per input column
    scaled = merged * (magnitude / norm).reshape(magnitude.shape)
    return (scaled - base) * multiplier


@dataclass
class AppliedLoras:
    """What :func:`apply_loras` did; :meth:`remove` undoes it exactly."""

    merged: bool
    matches: list[Match] = field(default_factory=list)
    modules: list[nn.Module] = field(default_factory=list)
    backups: dict[int, tuple[nn.Parameter, torch.Tensor]] = field(default_factory=dict)
    removed: bool = False

    @property
    def touched(self) -> int:
        return len(self.backups) if self.merged else len(self.modules)

    def remove(self) -> None:
        if self.removed:
            return
        for module in reversed(self.modules):
            if isinstance(module, (LoraModule, _DeltaHook)):
                module.detach()
        with torch.no_grad():
            for param, backup in self.backups.values():
                param.data.copy_(backup.to(param.device))
        self.removed = True


def _multiplier(target: Target, te_weight: float, unet_weight: float) -> float:
    return te_weight if target.is_text_encoder else unet_weight


def apply_loras(
    bundle: Any,
    loras: Sequence[LoraSpec | LoraFile | str | Path],
    *,
    merge: bool = False,
    strict: bool = False,
    index: ModuleIndex | None = None,
) -> AppliedLoras:
    """Apply several LoRAs (each at its own weights) to ``bundle``.

    ``merge=False`` adds forward hooks (weights untouched, switchable); ``merge=True`` patches the
    weights in place with a restore copy of each touched weight. Keys matching no module are
    listed in a :class:`LoraWarning` (an error with ``strict``); a LoRA made for another family or
    with mismatched shapes raises :class:`~sdcore.errors.NetworkMismatchError`.
    """
    index = index or ModuleIndex.from_bundle(bundle)
    specs = [spec if isinstance(spec, LoraSpec) else LoraSpec(spec) for spec in loras]
    parsed = [(spec, spec.parsed()) for spec in specs]
    matches = []
    for _spec, lora in parsed:  # validate all before touching the model
        match = match_modules(lora, index)
        if match.unmatched:
            message = f"{lora.label}: {match.summary()}"
            if strict:
                raise NetworkMismatchError(message)
            warnings.warn(message, LoraWarning, stacklevel=2)
            log.warning(message)
        matches.append(match)
    applied = AppliedLoras(merged=merge, matches=matches)
    try:
        for (spec, _lora), match in zip(parsed, matches, strict=True):
            unet_weight = spec.te_weight if spec.unet_weight is None else spec.unet_weight
            for target, weights in match.modules.values():
                multiplier = _multiplier(target, spec.te_weight, unet_weight)
                if multiplier == 0:
                    continue
                if merge:
                    _merge_one(applied, target, weights, multiplier)
                else:
                    applied.modules.append(_hook_one(target, weights, multiplier))
    except BaseException:
        applied.remove()
        raise
    return applied


def apply_lora(
    bundle: Any,
    lora: LoraFile | str | Path,
    weight: float = 1.0,
    *,
    unet_weight: float | None = None,
    merge: bool = False,
    strict: bool = False,
) -> AppliedLoras:
    """One LoRA: ``weight`` for the text encoders and (unless ``unet_weight``) the UNet."""
    return apply_loras(bundle, [LoraSpec(lora, weight, unet_weight)], merge=merge, strict=strict)


def _merge_one(applied: AppliedLoras, target: Target, weights: ModuleWeights, multiplier: float) -> None:
    param = target.module.weight
    key = id(param)
    if key not in applied.backups:
        applied.backups[key] = (param, param.detach().to("cpu", copy=True))
    delta = _effective_delta(target, weights, multiplier).to(param.device)
    with torch.no_grad():
        param.data.copy_((param.detach().float() + delta).to(param.dtype))


def _hook_one(target: Target, weights: ModuleWeights, multiplier: float) -> nn.Module:
    plain = weights.kind == "lora" and "mid" not in weights.tensors and "dora_scale" not in weights.tensors
    if not plain:
        return _DeltaHook(target, _effective_delta(target, weights, multiplier))
    module = LoraModule(target.name, target.module, weights.rank, weights.alpha, multiplier=multiplier)
    with torch.no_grad():
        module.lora_down.weight.copy_(weights.down.float().reshape(module.lora_down.weight.shape))
        module.lora_up.weight.copy_(weights.up.float().reshape(module.lora_up.weight.shape))
    module.to(target.module.weight.device)
    module.eval()
    module.attach()
    return module


class LoraHandler(PromptNetworkHandler):
    """``<lora:name:te_weight[:unet_weight]>`` in prompts: merged for one generation, then restored."""

    tag = "lora"
    kind = "LoRA"
    suffixes = (".safetensors", ".pt", ".ckpt", ".bin")

    def accepts(self, path: Path) -> bool:
        """A LoRA/LyCORIS file: some key ends like a LoRA part (``lora_up``, ``hada_w1_a``, ``lokr_w1`` ...)."""
        from sdcore.models.peek import peek_file

        from .format import is_lora_key

        found = peek_file(path)
        keys = found.keys
        if found.error:  # unreadable or unsafe: let the loader say so in its own words
            return True
        if found.nested.get("state_dict") == "dict":  # a .ckpt-style wrapper: judge by the loader
            return True
        return any(is_lora_key(k) for k in keys)

    def activate(self, bundle: Any, refs: list[NetworkRef], prompt: str, negative_prompt: str) -> Activation:
        if not refs:
            return Activation(prompt, negative_prompt)
        specs: list[LoraSpec] = []
        hashes: list[str] = []
        for ref in refs:
            path = self.find(ref.name)
            lora = read_lora(path)
            # A1111: <lora:x:te_w:unet_w> or the named form <lora:x:te=0.5:unet=1>
            te_weight = ref.arg(0, "te", 1.0)
            unet_weight = ref.arg(1, "unet", te_weight)
            specs.append(LoraSpec(lora, te_weight, unet_weight))
            short = (lora.metadata.get("sshs_model_hash") or "")[:12]
            if short:
                hashes.append(f"{ref.name}: {short}")
            for text in (ref.text,):
                if text:
                    prompt = prompt.replace(text, "")
                    negative_prompt = negative_prompt.replace(text, "")
        # merged by default (no per-step cost); ``-O lora_mode=hooks`` keeps the weights untouched
        merge = str(getattr(self, "options", {}).get("lora_mode", "merge")).lower() != "hooks"
        applied = apply_loras(bundle, specs, merge=merge)
        info = {"Lora hashes": ", ".join(hashes)} if hashes else {}
        return Activation(prompt, negative_prompt, undo=applied.remove, info=info)


def unmatched_report(matches: Iterable[Match]) -> list[str]:
    return [key for match in matches for key in match.unmatched]


__all__ = ["AppliedLoras", "LoraHandler", "LoraSpec", "LoraWarning", "apply_lora", "apply_loras"]
