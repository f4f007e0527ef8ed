"""The shared batch loop: decode in worker threads while the model runs, keep input order.

Why threads: PIL releases the GIL while it decodes and resizes, and onnxruntime/torch release it
while they compute, so a small pool keeps a GPU fed without the start-up and pickling cost of
processes. A bounded window of pending futures keeps memory flat on folders of any size.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .tags import TagFormat, TagResult

log = logging.getLogger("sdplugin_taggers")


def default_workers() -> int:
    return max(1, min(8, (os.cpu_count() or 2)))


class BatchTagger:
    """Base for taggers: subclasses implement ``_preprocess``, ``_predict`` and ``_select``.

    ``tag(images)`` returns one :class:`TagResult` per input, in order; an unreadable image gives
    a result with ``error`` set and no tags instead of stopping the run.
    """

    fmt: TagFormat
    batch_size: int = 1
    fixed_batch: int | None = None
    workers: int = 2
    messages: list[str]

    # -- subclass API -------------------------------------------------------------------------
    def _preprocess(self, source: Any) -> tuple[Any, tuple[int, int]]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _predict(self, batch: Any) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def _select(self, probs: Any) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:  # pragma: no cover
        raise NotImplementedError

    def _collate(self, items: list[Any]) -> Any:
        """Stack preprocessed arrays; fixed-size graphs get the last image repeated to a full batch."""
        import numpy as np

        if self.fixed_batch is not None and len(items) < self.fixed_batch:
            items = items + [items[-1]] * (self.fixed_batch - len(items))
        return np.stack(items)

    def _fill(self, result: TagResult, output: Any) -> None:
        result.rating, result.general, result.character = self._select(output)

    # -- public API ---------------------------------------------------------------------------
    def note(self, message: str) -> None:
        """Record a warning for the caller (the CLI prints ``messages``; it is also logged at INFO)."""
        self.messages.append(message)
        log.info(message)

    def tag(self, images: Iterable[Any]) -> list[TagResult]:
        """Tag paths or PIL images; results are in input order."""
        return list(self.iter_tag(images))

    def predict(self, batch: Any) -> Any:
        """Raw probabilities for a preprocessed batch (``[n, n_tags]``)."""
        return self._predict(batch)

    def iter_tag(self, images: Iterable[Any]) -> Iterator[TagResult]:
        """Stream results in input order while the next images decode in the background."""
        out: list[TagResult] = []
        arrays: list[Any] = []
        owners: list[TagResult] = []

        def flush() -> Iterator[TagResult]:
            if arrays:
                n = len(arrays)
                outputs = self._predict(self._collate(arrays))
                for result, row in zip(owners, outputs[:n], strict=True):
                    self._fill(result, row)
                arrays.clear()
                owners.clear()
            yield from out
            out.clear()

        for source, loaded in self._iter_loaded(images):
            result = TagResult(path=_name(source), fmt=self.fmt)
            out.append(result)
            if isinstance(loaded, BaseException):
                result.error = f"{type(loaded).__name__}: {loaded}"
            else:
                array, result.size = loaded
                arrays.append(array)
                owners.append(result)
            if len(arrays) >= self.batch_size:
                yield from flush()
        yield from flush()

    # -- internals ----------------------------------------------------------------------------
    def _safe_preprocess(self, source: Any) -> Any:
        try:
            return self._preprocess(source)
        except Exception as exc:  # unreadable, truncated, not an image, decompression bomb ...
            return exc

    def _iter_loaded(self, images: Iterable[Any]) -> Iterator[tuple[Any, Any]]:
        if self.workers <= 0:
            for source in images:
                yield source, self._safe_preprocess(source)
            return
        window = max(2 * self.batch_size, 2 * self.workers, 2)
        pending: deque[tuple[Any, Future[Any]]] = deque()
        with ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="sdtag-decode") as pool:
            try:
                for source in images:
                    pending.append((source, pool.submit(self._safe_preprocess, source)))
                    if len(pending) >= window:
                        src, fut = pending.popleft()
                        yield src, fut.result()
                while pending:
                    src, fut = pending.popleft()
                    yield src, fut.result()
            finally:
                for _, fut in pending:
                    fut.cancel()


def _name(source: Any) -> str | None:
    if isinstance(source, (str, os.PathLike)):
        return str(Path(source))
    return getattr(source, "filename", None) or None
