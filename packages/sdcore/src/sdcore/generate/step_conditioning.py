"""Each UNet call of a diffusers pipeline gets the conditioning of its step: A1111's prompt editing,
alternation and ``AND`` (:mod:`sdcore.generate.prompt_editing`) on SD1/SD2/SDXL.

Why hooks on the UNet rather than a sampler of our own: the pipelines and their schedulers stay
diffusers' (every sampler keeps working), and A1111 counts its schedule in model calls, which is exactly
what a forward hook sees. The pipeline batches ``[uncond, cond]`` when it guides; a pre-hook puts the
call's embeddings there (SDXL's pooled embedding too). With ``AND``, a forward hook runs the UNet once
more on the other parts and hands the pipeline ``uncond + sum(w_i * (cond_i - uncond))`` as the guided
half, so the pipeline's own ``uncond + cfg * (cond - uncond)`` gives A1111's
``uncond + cfg * sum(w_i * (cond_i - uncond))``.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator
from typing import Any

from .prompt_editing import StepPrompts

#: ``encode(part_texts, negative_texts_per_part) -> (cond, uncond)`` with one row per part
Encode = Callable[[list[str], list[str]], tuple[Any, Any]]


class StepConditioning:
    """The batch's conditioning per denoiser call: one encoding per point where some text changes."""

    def __init__(self, edits: StepPrompts, encode: Encode) -> None:
        import torch

        self.edits = edits
        self.batch = len(edits.negatives)
        firsts = edits.firsts
        self.firsts = torch.tensor(firsts)
        self.others = [i for i in range(len(edits.owners)) if i not in set(firsts)]
        self.encoded: dict[int, tuple[Any, Any]] = {}
        for end in edits.ends:
            texts, negatives = edits.texts_at(end)
            self.encoded[end] = encode(texts, [negatives[owner] for owner in edits.owners])

    def at(self, call: int) -> tuple[Any, Any]:
        """``(cond, uncond)`` of call ``call``: ``cond`` has a row per part, ``uncond`` one per image."""
        cond, uncond = self.encoded[self.edits.end_for(call)]
        return cond, _rows(uncond, self.firsts)

    def first_parts(self, call: int) -> tuple[Any, Any]:
        """``(cond, uncond)`` of call ``call`` with each image's first part only (what the pipeline batches)."""
        cond, uncond = self.at(call)
        return _rows(cond, self.firsts), uncond

    @contextlib.contextmanager
    def installed(self, unet: Any, *, pooled: bool) -> Iterator[None]:
        """Hooks on ``unet`` for the pipeline call inside the block (nothing when nothing changes)."""
        if not (self.edits.changes or self.edits.composed):
            yield
            return
        import torch

        calls = itertools.count()
        current: dict[str, Any] = {}
        inner = [False]  # True while the forward hook runs the extra parts

        def before_call(module: Any, args: Any, kwargs: dict[str, Any]) -> Any:
            if inner[0]:
                return None
            hidden = kwargs.get("encoder_hidden_states")
            if hidden is None:
                return None
            call = next(calls)
            cond, uncond = self.first_parts(call)
            guided = hidden.shape[0] == 2 * self.batch
            current.update(call=call, guided=guided)
            states = torch.cat([uncond.embeds, cond.embeds]) if guided else cond.embeds
            kwargs["encoder_hidden_states"] = states.to(device=hidden.device, dtype=hidden.dtype)
            added = kwargs.get("added_cond_kwargs")
            if pooled and added and "text_embeds" in added:
                vector = torch.cat([uncond.pooled, cond.pooled]) if guided else cond.pooled
                kwargs["added_cond_kwargs"] = {**added, "text_embeds": vector.to(added["text_embeds"])}
            return args, kwargs

        def after_call(module: Any, args: Any, kwargs: dict[str, Any], output: Any) -> Any:
            if inner[0] or "call" not in current:
                return None
            inner[0] = True
            try:
                combined = self._compose(module, args, kwargs, output, current["call"], current["guided"])
            finally:
                inner[0] = False
            if isinstance(output, tuple):
                return (combined, *output[1:])
            output.sample = combined
            return output

        # first of the UNet's pre-hooks, so any other (a user's, a test's) sees the call's real conditioning
        handles = [unet.register_forward_pre_hook(before_call, with_kwargs=True, prepend=True)]
        if self.edits.composed:
            handles.append(unet.register_forward_hook(after_call, with_kwargs=True))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _compose(self, unet: Any, args: Any, kwargs: dict[str, Any], output: Any, call: int, guided: bool) -> Any:
        """The guided half (or, unguided, the whole output) replaced by ``u + sum(w_i * (c_i - u))``."""
        import torch

        out = output[0] if isinstance(output, tuple) else output.sample
        sample, timestep = args[0], args[1] if len(args) > 1 else kwargs["timestep"]
        batch = self.batch
        cond, uncond = self.at(call)
        cond_sample = sample[batch:] if guided else sample
        first_out = out[batch:] if guided else out
        if guided:
            uncond_out = out[:batch]
        else:  # no negative half in the call: run it, A1111 always has one
            uncond_out = self._run(unet, cond_sample, timestep, kwargs, uncond, list(range(batch)), guided)
        parts_out = torch.empty((len(self.edits.owners), *out.shape[1:]), dtype=out.dtype, device=out.device)
        parts_out[self.firsts.to(out.device)] = first_out
        if self.others:
            owners = [self.edits.owners[i] for i in self.others]
            extra = _rows(cond, torch.tensor(self.others))
            parts_out[torch.tensor(self.others, device=out.device)] = self._run(
                unet, cond_sample, timestep, kwargs, extra, owners, guided
            )
        combined = uncond_out.clone()
        for part, (owner, weight) in enumerate(zip(self.edits.owners, self.edits.weights, strict=True)):
            combined[owner] += weight * (parts_out[part] - uncond_out[owner])
        return torch.cat([uncond_out, combined]) if guided else combined

    def _run(
        self, unet: Any, cond_sample: Any, timestep: Any, kwargs: dict[str, Any], cond: Any, owners: list[int],
        guided: bool,
    ) -> Any:  # fmt: skip
        """The UNet on ``cond``'s rows, each with the latents (and SDXL time ids) of the image it guides."""
        import torch

        index = torch.tensor(owners, device=cond_sample.device)
        hidden = kwargs["encoder_hidden_states"]
        extra: dict[str, Any] = {
            key: value for key, value in kwargs.items() if key not in ("encoder_hidden_states", "added_cond_kwargs")
        }
        extra["return_dict"] = False
        added = kwargs.get("added_cond_kwargs")
        if added and "text_embeds" in added:
            time_ids = added["time_ids"][self.batch :] if guided else added["time_ids"]
            extra["added_cond_kwargs"] = {
                **added,
                "text_embeds": cond.pooled.to(added["text_embeds"]),
                "time_ids": time_ids[index],
            }
        step = timestep
        if torch.is_tensor(timestep) and timestep.ndim > 0 and timestep.shape[0] > 1:
            step = (timestep[self.batch :] if guided else timestep)[index]
        states = cond.embeds.to(device=hidden.device, dtype=hidden.dtype)
        return unet(cond_sample[index], step, encoder_hidden_states=states, **extra)[0]


def _rows(conditioning: Any, index: Any) -> Any:
    import dataclasses

    return dataclasses.replace(
        conditioning,
        embeds=conditioning.embeds[index],
        pooled=None if conditioning.pooled is None else conditioning.pooled[index],
    )


__all__ = ["StepConditioning"]
