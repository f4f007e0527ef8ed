"""Each denoiser call of a diffusers pipeline gets the conditioning of its step: A1111's prompt editing,
alternation and ``AND`` (:mod:`sdcore.generate.prompt_editing`) on every family that generates (the UNet of
SD1/SD2/SDXL, the transformer of SD3, Flux.1 and Chroma).

Why hooks on the denoiser rather than a sampler of our own: the pipelines and their schedulers stay
diffusers' (every sampler keeps working), and A1111 counts its schedule in denoiser evaluations, which a
hook on the model sees. One implementation serves every family; what differs is which call arguments carry
the text, which have a row per latent, and how the pipeline lays out guidance, a :class:`TextSlots` per
family:

- *batched* pipelines (SD1/SD2/SDXL, SD3) run ``[uncond, cond]`` in one call when they guide: one call is
  one evaluation, and a pre-hook puts the call's embeddings there (pooled embeddings too);
- *split* pipelines (Flux.1 with true CFG, Chroma with CFG) run the prompt, then the negative, in two calls
  (diffusers' order): two calls are one evaluation, as a CFG pass of cond and uncond counts once in A1111's
  ``CFGDenoiser`` and in Forge (whose ``CFGDenoiser.forward`` advances its step once per call of the
  sampler's model function, whatever runs inside: the uncond is skipped at CFG 1, true CFG batches both).
  Flux's distilled guidance is an input of each call, not a pass, so it changes nothing in the count.

``AND``: a forward hook runs the model once more on the other parts, each with the latents of the image it
guides, and the final prediction is A1111's ``uncond + cfg * sum(w_i * (cond_i - uncond))``:

- batched: the guided half of the output is replaced by ``uncond + sum(w_i * (cond_i - uncond))``, so the
  pipeline's own ``uncond + cfg * (cond - uncond)`` gives the formula;
- split: the prompt call runs the other parts and keeps every part's output; the negative call, which has
  ``uncond``, writes ``uncond + sum(w_i * (cond_i - uncond))`` into the tensor the prompt call returned (the
  pipeline holds it until it combines the two), so ``neg + s * (pos - neg)`` gives the formula with no extra
  evaluation and no division by ``1 - s``;
- without a negative call on a real-CFG family (cfg 1): the hook runs the uncond itself, as A1111 always
  has one, and the output is ``uncond + sum(w_i * (cond_i - uncond))``;
- Flux.1 without true CFG (``zero_uncond``): Forge skips the uncond at CFG 1 and its combination becomes
  ``sum(w_i * denoised_i)`` (its uncond prediction reads 0; ``backend/sampling/sampling_function.py``: the
  parts' weighted mean times the weights' sum). Forge works in x0 (``denoised = x - sigma * v``); here, in
  velocity, that is ``sum(w_i * v_i) + (1 - sum(w_i)) * x / t`` with ``t`` the transformer's timestep
  (sigma). With weights summing to 1 it is the weighted mean of the parts' velocities.

Every family's text encoding passes through :class:`StepConditioning`, so it is also where a training run's
sample renders take their texts from the encodings made at caching time instead of the text encoders
(:mod:`sdcore.generate.conditioning_memo`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from .prompt_editing import StepPrompts

#: ``encode(part_texts, negative_texts_per_part) -> (cond, uncond)`` with one row per part; ``uncond`` may be
#: None where nothing reads it (Flux.1 without true CFG)
Encode = Callable[[list[str], list[str]], tuple[Any, Any]]


@dataclasses.dataclass
class TextRows:
    """A family's text conditioning for a batch: ``embeds`` ``[B, L, D]``, a ``pooled`` vector ``[B, P]`` and a
    text ``mask`` ``[B, L]`` where the family has them (every tensor field has a row per prompt)."""

    embeds: Any
    pooled: Any = None
    mask: Any = None


class TextSlots:
    """Which arguments of a family's denoiser call carry the text, which have a row per latent, and how the
    pipeline guides. This base class is the diffusers transformers' keyword call (SD3: ``encoder_hidden_states``
    and ``pooled_projections``); subclasses add what their family carries.

    ``split``: the pipeline runs the prompt and then the negative in two calls (Flux.1 true CFG, Chroma);
    ``zero_uncond``: without a negative call, ``AND`` follows Forge's CFG-1 reading (uncond 0 in x0) instead
    of running the uncond as A1111 does (Flux.1 without true CFG)."""

    latent_key = "hidden_states"
    row_keys: tuple[str, ...] = ("timestep",)
    #: the pipeline cannot take the text's mask itself: an encoding with a ``mask`` needs the hooks on every call
    #: (FLUX.1's T5 mask of a run trained with it; Chroma's pipeline takes its mask)
    puts_mask = False

    def __init__(self, *, split: bool = False, zero_uncond: bool = False) -> None:
        self.split = split
        self.zero_uncond = zero_uncond

    def arguments(self, args: Sequence[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
        """The call's arguments by name (the transformers take keywords only)."""
        return dict(kwargs)

    def text(self, kwargs: dict[str, Any]) -> Any:
        return kwargs.get("encoder_hidden_states")

    def put(self, kwargs: dict[str, Any], cond: Any) -> None:
        """Write ``cond``'s rows into ``kwargs`` (in place), on the device and dtype the call had."""
        hidden = kwargs["encoder_hidden_states"]
        kwargs["encoder_hidden_states"] = cond.embeds.to(device=hidden.device, dtype=hidden.dtype)
        if kwargs.get("pooled_projections") is not None:
            kwargs["pooled_projections"] = cond.pooled.to(kwargs["pooled_projections"])

    def select_rows(self, kwargs: dict[str, Any], rows: int, select: Callable[[Any], Any]) -> dict[str, Any]:
        """``kwargs`` with ``select`` applied to every per-latent argument (those with ``rows`` rows)."""
        import torch

        out = dict(kwargs)
        for key in (self.latent_key, *self.row_keys):
            value = out.get(key)
            if torch.is_tensor(value) and value.ndim > 0 and value.shape[0] == rows:
                out[key] = select(value)
        return out

    def call(self, module: Any, kwargs: dict[str, Any]) -> Any:
        return output_tensor(module(**{**kwargs, "return_dict": False}))


class UnetSlots(TextSlots):
    """SD1/SD2/SDXL: ``unet(sample, t, encoder_hidden_states=..., added_cond_kwargs={text_embeds, time_ids})``."""

    latent_key = "sample"

    def __init__(self, *, pooled: bool = False) -> None:
        super().__init__()
        self.pooled = pooled

    def arguments(self, args: Sequence[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
        return {**dict(zip(("sample", "timestep"), args, strict=False)), **kwargs}

    def put(self, kwargs: dict[str, Any], cond: Any) -> None:
        hidden = kwargs["encoder_hidden_states"]
        kwargs["encoder_hidden_states"] = cond.embeds.to(device=hidden.device, dtype=hidden.dtype)
        added = kwargs.get("added_cond_kwargs")
        if self.pooled and added and "text_embeds" in added:
            kwargs["added_cond_kwargs"] = {**added, "text_embeds": cond.pooled.to(added["text_embeds"])}

    def select_rows(self, kwargs: dict[str, Any], rows: int, select: Callable[[Any], Any]) -> dict[str, Any]:
        out = super().select_rows(kwargs, rows, select)
        added = out.get("added_cond_kwargs")
        if added and added.get("time_ids") is not None and added["time_ids"].shape[0] == rows:
            out["added_cond_kwargs"] = {**added, "time_ids": select(added["time_ids"])}
        return out


class FluxSlots(TextSlots):
    """Flux.1: the T5 sequence, CLIP-L's pooled vector and ``txt_ids`` (one row of zeros per text token: its
    length follows the T5 sequence's); the distilled ``guidance`` has a row per latent. A ``mask`` (T5 encoded
    with its attention mask, a training run's samples with ``--apply-t5-attn-mask``) goes to the joint attention
    as training's prediction passes it; ``FluxPipeline`` has no argument for it."""

    row_keys = ("timestep", "guidance")
    puts_mask = True

    def put(self, kwargs: dict[str, Any], cond: Any) -> None:
        super().put(kwargs, cond)
        _put_text_ids(kwargs)
        if getattr(cond, "mask", None) is not None:
            from ..models.flux.adapter import joint_attention_mask

            image_tokens = kwargs[self.latent_key].shape[1]  # FLUX.1 Kontext's reference tokens included
            kwargs["joint_attention_kwargs"] = {
                **(kwargs.get("joint_attention_kwargs") or {}),
                **joint_attention_mask(cond.mask, image_tokens, kwargs["encoder_hidden_states"].device),
            }


class ChromaSlots(TextSlots):
    """Chroma: the T5 sequence, ``txt_ids`` and the attention mask over text and image tokens (the text mask,
    then every image token visible, as ``ChromaPipeline._prepare_attention_mask`` builds it)."""

    def put(self, kwargs: dict[str, Any], cond: Any) -> None:
        import torch

        super().put(kwargs, cond)
        _put_text_ids(kwargs)
        if cond.mask is not None:
            mask = cond.mask.to(device=kwargs["encoder_hidden_states"].device)
            image = torch.ones(mask.shape[0], kwargs[self.latent_key].shape[1], device=mask.device, dtype=torch.bool)
            kwargs["attention_mask"] = torch.cat([mask, image], dim=1)


def _put_text_ids(kwargs: dict[str, Any]) -> None:
    import torch

    ids = kwargs.get("txt_ids")
    if ids is not None:
        length = kwargs["encoder_hidden_states"].shape[1]
        kwargs["txt_ids"] = torch.zeros(length, ids.shape[-1], device=ids.device, dtype=ids.dtype)


def output_tensor(output: Any) -> Any:
    """The prediction in a model's output (``return_dict=False`` tuple or an output object)."""
    return output[0] if isinstance(output, tuple) else output.sample


class StepConditioning:
    """The batch's conditioning per denoiser evaluation: one encoding per point where some text changes."""

    def __init__(self, edits: StepPrompts, encode: Encode | None = None, *,
                 encoded: dict[int, tuple[Any, Any]] | None = None) -> None:  # fmt: skip
        import torch

        self.edits = edits
        self.batch = len(edits.negatives)
        firsts = edits.firsts
        self.firsts = torch.tensor(firsts)
        self.others = [i for i in range(len(edits.owners)) if i not in set(firsts)]
        self.encoded: dict[int, tuple[Any, Any]] = {}
        if encoded is not None:
            self.encoded = encoded
            return
        if encode is None:
            raise TypeError("StepConditioning needs encode or encoded")
        from .conditioning_memo import active_memo

        memo = active_memo()  # a training run's sample renders: the texts were encoded at caching time
        for end in edits.ends:
            texts, negatives = edits.texts_at(end)
            per_part = [negatives[owner] for owner in edits.owners]
            if memo is None:
                self.encoded[end] = encode(texts, per_part)
            else:
                self.encoded[end] = memo.encode(texts, per_part, functools.partial(encode, texts, per_part))
        if memo is not None:
            memo.encoded_all()

    @property
    def active(self) -> bool:
        """Whether a text changes or some image is composed of parts (else the pipeline runs unhooked)."""
        return self.edits.changes or self.edits.composed

    @property
    def masked(self) -> bool:
        """Whether an encoding carries a text ``mask`` (:class:`TextRows`)."""
        return any(getattr(part, "mask", None) is not None for pair in self.encoded.values() for part in pair)

    def select(self, images: Sequence[int]) -> StepConditioning:
        """The conditioning of ``images`` alone, renumbered from 0 (a pipeline call per image: ``euler_a``)."""
        import torch

        images = list(images)
        if images == list(range(self.batch)):
            return self
        edits = self.edits
        parts = [i for i, owner in enumerate(edits.owners) if owner in images]
        sub = StepPrompts(
            tuple(edits.prompts[i] for i in parts),
            tuple(edits.negatives[image] for image in images),
            tuple(images.index(edits.owners[i]) for i in parts),
            tuple(edits.weights[i] for i in parts),
        )
        index = torch.tensor(parts)
        # the subset's change points are among the batch's, where its texts are already encoded
        encoded = {end: (_rows(self.encoded[end][0], index), _rows(self.encoded[end][1], index)) for end in sub.ends}
        return StepConditioning(sub, encoded=encoded)

    def at(self, call: int) -> tuple[Any, Any]:
        """``(cond, uncond)`` of evaluation ``call``: ``cond`` has a row per part, ``uncond`` one per image."""
        cond, uncond = self.encoded[self.edits.end_for(call)]
        return cond, _rows(uncond, self.firsts)

    def first_parts(self, call: int) -> tuple[Any, Any]:
        """``(cond, uncond)`` of evaluation ``call`` with each image's first part only (what the pipeline runs)."""
        cond, uncond = self.at(call)
        return _rows(cond, self.firsts), uncond

    @contextlib.contextmanager
    def installed(self, module: Any, slots: TextSlots | None = None, *, pooled: bool = False) -> Iterator[None]:
        """Hooks on the denoiser ``module`` for the pipeline call inside the block (nothing when nothing
        changes and no mask must be put); ``slots``: the family's (default: the SD UNet's, with SDXL's ``pooled``
        vector)."""
        slots = slots if slots is not None else UnetSlots(pooled=pooled)
        if not self.active and not (slots.puts_mask and self.masked):
            yield
            return
        calls = itertools.count()
        per_evaluation = 2 if slots.split else 1
        current: dict[str, Any] = {}
        inner = [False]  # True while the forward hook runs the extra parts

        def before_call(module: Any, args: Any, kwargs: dict[str, Any]) -> Any:
            if inner[0]:
                return None
            hidden = slots.text(kwargs)
            if hidden is None:
                return None
            call, negative = divmod(next(calls), per_evaluation)
            cond, uncond = self.first_parts(call)
            guided = not slots.split and hidden.shape[0] == 2 * self.batch
            current.update(call=call, negative=bool(negative), guided=guided)
            if slots.split:
                slots.put(kwargs, uncond if negative else cond)
            else:
                slots.put(kwargs, _cat(uncond, cond) if guided else cond)
            return args, kwargs

        def after_call(module: Any, args: Any, kwargs: dict[str, Any], output: Any) -> Any:
            if inner[0] or "call" not in current:
                return None
            inner[0] = True
            try:
                named = slots.arguments(args, kwargs)
                if slots.split:
                    self._compose_split(module, slots, named, output_tensor(output), current)
                    return None
                combined = self._compose(module, slots, named, output_tensor(output), current["call"],
                                         current["guided"])  # fmt: skip
            finally:
                inner[0] = False
            if isinstance(output, tuple):
                return (combined, *output[1:])
            output.sample = combined
            return output

        # first of the model's pre-hooks, so any other (a user's, a test's) sees the call's real conditioning
        handles = [module.register_forward_pre_hook(before_call, with_kwargs=True, prepend=True)]
        if self.edits.composed:
            handles.append(module.register_forward_hook(after_call, with_kwargs=True))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _parts(self, module: Any, slots: TextSlots, kwargs: dict[str, Any], first_out: Any, cond: Any,
               guided: bool) -> Any:  # fmt: skip
        """Every part's prediction: the call's own for the first parts, the others run now."""
        import torch

        parts_out = torch.empty((len(self.edits.owners), *first_out.shape[1:]), dtype=first_out.dtype,
                                device=first_out.device)  # fmt: skip
        parts_out[self.firsts.to(first_out.device)] = first_out
        if self.others:
            owners = [self.edits.owners[i] for i in self.others]
            extra = _rows(cond, torch.tensor(self.others))
            parts_out[torch.tensor(self.others, device=first_out.device)] = self._run(
                module, slots, kwargs, extra, owners, guided
            )
        return parts_out

    def _combine(self, uncond_out: Any, parts_out: Any) -> Any:
        """``u + sum(w_i * (c_i - u))`` per image."""
        combined = uncond_out.clone()
        for part, (owner, weight) in enumerate(zip(self.edits.owners, self.edits.weights, strict=True)):
            combined[owner] += weight * (parts_out[part] - uncond_out[owner])
        return combined

    def _compose(self, module: Any, slots: TextSlots, kwargs: dict[str, Any], out: Any, call: int,
                 guided: bool) -> Any:  # fmt: skip
        """A batched call's guided half (or, unguided, its whole output) replaced by ``u + sum(w_i * (c_i - u))``
        (Forge's ``sum(w_i * denoised_i)`` with ``zero_uncond``)."""
        import torch

        batch = self.batch
        cond, uncond = self.at(call)
        parts_out = self._parts(module, slots, kwargs, out[batch:] if guided else out, cond, guided)
        if guided:
            return torch.cat([out[:batch], self._combine(out[:batch], parts_out)])
        if slots.zero_uncond:
            return self._forge_sum(kwargs[slots.latent_key], kwargs["timestep"], parts_out)
        # no negative half in the call: run it, A1111 always has one
        uncond_out = self._run(module, slots, kwargs, uncond, list(range(batch)), guided)
        return self._combine(uncond_out, parts_out)

    def _compose_split(self, module: Any, slots: TextSlots, kwargs: dict[str, Any], out: Any,
                       current: dict[str, Any]) -> None:  # fmt: skip
        """The prompt call keeps every part's prediction; the negative call writes the combination into the
        prompt call's output (which the pipeline still holds), in place."""
        if not current["negative"]:
            cond, _ = self.at(current["call"])
            current["pending"] = (out, self._parts(module, slots, kwargs, out, cond, False))
            return
        prompt_out, parts_out = current.pop("pending")
        prompt_out.copy_(self._combine(out.to(parts_out.dtype), parts_out).to(prompt_out.dtype))

    def _forge_sum(self, latents: Any, timestep: Any, parts_out: Any) -> Any:
        """``sum(w_i * v_i) + (1 - sum(w_i)) * x / t``: Forge's ``sum(w_i * denoised_i)`` in velocity."""
        import torch

        combined = torch.zeros((self.batch, *parts_out.shape[1:]), dtype=parts_out.dtype, device=parts_out.device)
        total = [0.0] * self.batch
        for part, (owner, weight) in enumerate(zip(self.edits.owners, self.edits.weights, strict=True)):
            combined[owner] += weight * parts_out[part]
            total[owner] += weight
        rest = torch.tensor([1.0 - w for w in total], device=combined.device, dtype=combined.dtype)
        t = torch.as_tensor(timestep, device=combined.device, dtype=combined.dtype).reshape(-1)
        shape = (-1, *([1] * (combined.ndim - 1)))
        return combined + (rest.reshape(shape) * latents.to(combined.dtype)) / t.reshape(shape)

    def _run(self, module: Any, slots: TextSlots, kwargs: dict[str, Any], cond: Any, owners: list[int],
             guided: bool) -> Any:  # fmt: skip
        """The model on ``cond``'s rows, each with the latents (and per-row inputs) of the image it guides."""
        import torch

        batch = self.batch
        index = torch.tensor(owners, device=kwargs[slots.latent_key].device)

        def select(value: Any) -> Any:
            return (value[batch:] if guided else value)[index.to(value.device)]

        call = slots.select_rows(kwargs, 2 * batch if guided else batch, select)
        slots.put(call, cond)
        return slots.call(module, call)


def _rows(conditioning: Any, index: Any) -> Any:
    """``conditioning`` with the rows ``index`` of each of its tensors (None stays None)."""
    if conditioning is None:
        return None
    return _replace(conditioning, lambda value: value[index])


def _cat(first: Any, second: Any) -> Any:
    """The rows of ``first`` then those of ``second`` (the batched pipelines' ``[uncond, cond]``)."""
    import torch

    return _replace(first, lambda value, name: torch.cat([value, getattr(second, name)]), named=True)


def _replace(conditioning: Any, change: Callable[..., Any], *, named: bool = False) -> Any:
    import torch

    fields = {}
    for field in dataclasses.fields(conditioning):
        value = getattr(conditioning, field.name)
        if torch.is_tensor(value):
            fields[field.name] = change(value, field.name) if named else change(value)
    return dataclasses.replace(conditioning, **fields)


__all__ = ["ChromaSlots", "FluxSlots", "StepConditioning", "TextRows", "TextSlots", "UnetSlots", "output_tensor"]
