"""Encoded texts kept for later renders: a memo the prompt encoding of every family consults.

Why: a training run that caches its text-encoder outputs moves the text encoders to the CPU, and each
sample render used to bring them back to the device (T5-XXL is ~9.5 GB in bf16 next to a Flux or SD3.5
transformer) and take them away again. kohya sd-scripts encodes its sample prompts once while the encoders
are on the device for caching (``sample_prompts_te_outputs`` in ``flux_train_network.py`` /
``sd3_train_network.py``) and samples from those outputs; the runtime does the same through this memo.

How: every family's generation encodes its texts through
:class:`~sdcore.generate.step_conditioning.StepConditioning` (``encode(texts, negatives)`` once per point
where a text changes: A1111 prompt editing, alternation and ``AND``). While a memo is active, that encoding
goes through it:

- **recording** (:meth:`ConditioningMemo.recording`): each encoding runs live and a CPU copy is kept; the
  generation then stops (:class:`EncodingDone`) before anything is denoised, so a recording pass costs the
  text encoding alone (a denoiser hook stops a generation that encodes some other way, which then has
  nothing recorded);
- **replaying** (:meth:`ConditioningMemo.replaying`): the kept copy is moved to the device it was encoded
  on; a key that is not there, or any text-encoder forward (hooks on the encoders), raises
  :class:`MemoMiss`, so the caller encodes live instead and an image is never rendered from a wrong text.

Keys are ``(scope, ordinal, texts, negatives)``: the caller names the generation call (``scope``) and makes
the same calls with the same arguments in both passes, so every setting that shapes an encoding (clip skip,
true CFG, T5 length and mask, SDXL's pooled vector) is the same; ``ordinal`` counts the encodings of a
call. The core knows no family here: whatever ``encode`` returns (dataclasses, tuples of tensors) is kept.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from typing import Any

_ACTIVE: ContextVar[ConditioningMemo | None] = ContextVar("sdcore_conditioning_memo", default=None)

Key = tuple[Any, int, tuple[str, ...], tuple[str, ...]]


class EncodingDone(Exception):
    """Raised out of a recording generation once its texts are encoded (caught by :meth:`~ConditioningMemo.recording`)."""


class MemoMiss(Exception):
    """A replaying generation needed an encoding the memo does not hold."""


@dataclasses.dataclass(frozen=True)
class _Kept:
    """One tensor of an encoding, on the CPU, and the device the encoder left it on."""

    tensor: Any
    device: Any


def active_memo() -> ConditioningMemo | None:
    """The memo of the generation running now (None: encode live)."""
    return _ACTIVE.get()


def _map_tensors(value: Any, change: Callable[[Any], Any]) -> Any:
    """``value`` with ``change`` applied to every tensor (and :class:`_Kept`) in it: dataclasses, tuples,
    lists and dicts are rebuilt, anything else kept as is."""
    import torch

    if torch.is_tensor(value) or isinstance(value, _Kept):
        return change(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: _map_tensors(getattr(value, f.name), change) for f in dataclasses.fields(value) if f.init}
        return dataclasses.replace(value, **fields)
    if isinstance(value, tuple):
        return tuple(_map_tensors(v, change) for v in value)
    if isinstance(value, list):
        return [_map_tensors(v, change) for v in value]
    if isinstance(value, dict):
        return {k: _map_tensors(v, change) for k, v in value.items()}
    return value


def _keep(value: Any) -> Any:
    return _map_tensors(value, lambda t: _Kept(t.detach().to("cpu", copy=True), t.device))


def _restore(value: Any) -> Any:
    # a copy even on the CPU: a pipeline that changed a tensor in place never changes the memo
    return _map_tensors(value, lambda kept: kept.tensor.to(kept.device, copy=True))


class ConditioningMemo:
    """Encodings of the texts some generation calls need, kept on the CPU (see the module doc)."""

    def __init__(self) -> None:
        self.entries: dict[Key, Any] = {}
        self.scopes: set[Any] = set()  # the scopes a recording pass encoded something for
        self._scope: Any = None
        self._ordinal = 0
        self._recording = False

    # -- what generation calls -------------------------------------------------------------------
    def encode(self, texts: Sequence[str], negatives: Sequence[str], live: Callable[[], Any]) -> Any:
        """``live()``'s result for these texts: computed and kept while recording, the kept one while replaying."""
        key: Key = (self._scope, self._ordinal, tuple(texts), tuple(negatives))
        if self._recording:
            result = live()
            self.entries[key] = _keep(result)
            self.scopes.add(self._scope)
            return result
        if key not in self.entries:
            shown = ", ".join(repr(t) for t in dict.fromkeys([*texts, *negatives]))
            raise MemoMiss(f"the texts {shown} (generation {self._scope!r}, encoding {self._ordinal})")
        return _restore(self.entries[key])

    def encoded_all(self) -> None:
        """One encoding of the call is complete; a recording pass stops the generation here."""
        self._ordinal += 1
        if self._recording:
            raise EncodingDone

    # -- what the caller uses --------------------------------------------------------------------
    def covers(self, scope: Any) -> bool:
        """Whether a recording pass encoded anything for ``scope`` (a family that does not encode through
        :class:`~sdcore.generate.step_conditioning.StepConditioning` records nothing)."""
        return scope in self.scopes

    def texts(self) -> set[str]:
        """Every distinct text encoded (prompts, parts and the negatives that were encoded)."""
        found: set[str] = set()
        for (_, _, texts, negatives), (_, uncond) in self.entries.items():
            found.update(texts)
            if uncond is not None:
                found.update(negatives)
        return found

    @contextlib.contextmanager
    def recording(self, scope: Any, denoiser: Any = None) -> Iterator[None]:
        """Record the encodings of the generation inside (``scope`` names it) and stop it once they are done;
        ``denoiser``: also stop at its first call (a generation that encodes in some other way)."""

        def stop(*_: Any, **__: Any) -> None:
            raise EncodingDone

        handle = denoiser.register_forward_pre_hook(stop) if denoiser is not None else None
        with self._active(scope, recording=True):
            try:
                yield
            except EncodingDone:
                pass
            finally:
                if handle is not None:
                    handle.remove()

    @contextlib.contextmanager
    def replaying(self, scope: Any, text_encoders: Sequence[Any] = ()) -> Iterator[None]:
        """Take the generation's encodings inside from the memo; a text it lacks, or a forward of any of
        ``text_encoders`` (the encoders stay where they are: none may run), raises :class:`MemoMiss`."""
        if scope not in self.scopes:
            raise MemoMiss(f"generation {scope!r} encoded nothing while recording")

        def refuse(module: Any, *_: Any, **__: Any) -> None:
            raise MemoMiss(f"a {type(module).__name__} forward during a render from the memo")

        handles = [encoder.register_forward_pre_hook(refuse) for encoder in text_encoders if encoder is not None]
        try:
            with self._active(scope, recording=False):
                yield
        finally:
            for handle in handles:
                handle.remove()

    @contextlib.contextmanager
    def _active(self, scope: Any, *, recording: bool) -> Iterator[None]:
        self._scope, self._ordinal, self._recording = scope, 0, recording
        token = _ACTIVE.set(self)
        try:
            yield
        finally:
            _ACTIVE.reset(token)
            self._scope, self._ordinal, self._recording = None, 0, False


_PARTS: ContextVar[PartMemo | None] = ContextVar("sdcore_part_memo", default=None)


def active_part_memo() -> PartMemo | None:
    """The memo of the frozen encoders' outputs active now (None: encode live)."""
    return _PARTS.get()


class PartMemo:
    """Outputs of the text encoders a partial cache holds (SD3/FLUX.1's T5-XXL while CLIP trains), kept for the
    sample renders.

    Why: a run that trains CLIP cannot replay whole sample-prompt encodings (CLIP changes with every step), but
    T5's part of them never changes; kohya keeps it (``sample_prompts_te_outputs``) and runs CLIP live. The family
    adapter's ``encode_cached_part`` goes through :meth:`encode` while a memo is active: recorded while T5 is on
    the device for caching, replayed at each render with T5 left on the CPU (a forward of it, or a key not
    recorded, raises :class:`MemoMiss`, and the caller renders live)."""

    def __init__(self) -> None:
        self.entries: dict[Any, Any] = {}
        self._recording = False

    def encode(self, key: Any, live: Callable[[], Any]) -> Any:
        """``live()``'s result for ``key`` (the texts and every setting of the encoding)."""
        if self._recording:
            result = live()
            self.entries[key] = _keep(result)
            return result
        if key not in self.entries:
            raise MemoMiss(f"the cached text encoders' outputs for {key!r}")
        return _restore(self.entries[key])

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """Keep every cached part encoded inside."""
        with self._active(recording=True):
            yield

    @contextlib.contextmanager
    def replaying(self, text_encoders: Sequence[Any] = ()) -> Iterator[None]:
        """Take the cached parts from the memo inside; a forward of ``text_encoders`` raises :class:`MemoMiss`."""

        def refuse(module: Any, *_: Any, **__: Any) -> None:
            raise MemoMiss(f"a {type(module).__name__} forward during a render from the memo")

        handles = [encoder.register_forward_pre_hook(refuse) for encoder in text_encoders if encoder is not None]
        try:
            with self._active(recording=False):
                yield
        finally:
            for handle in handles:
                handle.remove()

    @contextlib.contextmanager
    def _active(self, *, recording: bool) -> Iterator[None]:
        self._recording = recording
        token = _PARTS.set(self)
        try:
            yield
        finally:
            _PARTS.reset(token)
            self._recording = False


__all__ = ["ConditioningMemo", "EncodingDone", "MemoMiss", "PartMemo", "active_memo", "active_part_memo"]
