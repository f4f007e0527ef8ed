"""Dataset hygiene checks that are not taggers: watermark scoring with a user's ONNX classifier.

The reference is LAION's watermark detector (``LAION-AI/LAION-5B-WatermarkDetection``, MIT):
squash-resize to 256x256, ImageNet mean/std, two logits with **index 0 = watermark**, softmax.
Any ONNX classifier with that shape of contract works; the layout (NCHW or NHWC) is read from the
graph, and size, normalisation, class index and softmax are options. SD 1.x training data kept
images with a watermark probability below 0.5, hence the default threshold.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from sdcore.errors import ConfigError, ModelFormatError

from .onnx_session import CPU, create_session, parse_providers, resolve_providers
from .runner import BatchTagger, default_workers
from .tags import TagResult

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WatermarkScorer(BatchTagger):
    """Scores images with an ONNX watermark classifier; ``TagResult.rating['watermark']`` is p(watermark)."""

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        *,
        size: int | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        watermark_index: int = 0,
        softmax: bool = True,
        batch_size: int = 16,
        workers: int | None = None,
        providers: str | Sequence[str] | None = None,
    ) -> None:
        import numpy as np
        import onnxruntime as ort

        from .tags import TagFormat

        self.messages = []
        self.fmt = TagFormat()
        chosen, warnings = resolve_providers(parse_providers(providers), ort.get_available_providers())
        for warning in warnings if providers is not None else []:  # the automatic default falls back quietly
            self.note(warning)
        self.model_path = Path(model_path)
        self.session = create_session(self.model_path, chosen)
        self.provider = self.session.get_providers()[0]
        self.workers = workers if workers is not None else (1 if self.provider == CPU else default_workers())
        inp = self.session.get_inputs()[0]
        shape = list(inp.shape)
        if len(shape) != 4 or 3 not in (shape[1], shape[3]):
            raise ModelFormatError(f"{self.model_path}: expected an image input [N,3,H,W] or [N,H,W,3], got {shape}")
        self.nchw = shape[1] == 3
        sides = shape[2:4] if self.nchw else shape[1:3]
        fixed = [side for side in sides if isinstance(side, int) and side > 0]
        if size is not None and any(side != size for side in fixed):
            # onnxruntime would stop on the first batch with its own traceback (or resize to a huge size first)
            want = "x".join(str(side) for side in sides)
            raise ConfigError(
                f"--size {size}: {self.model_path} takes {want} images only: leave --size out (it is read from the model)"
            )
        self.size = size or (fixed[0] if fixed else 256)
        self.input_name = inp.name
        self.fixed_batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
        self.batch_size = self.fixed_batch or batch_size
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)
        if len(self.mean) != 3 or len(self.std) != 3 or not all(self.std > 0):
            raise ConfigError("mean and std need three values each (std > 0)")
        self.watermark_index = watermark_index
        self.softmax = softmax
        self._classes_checked = False
        out = list(self.session.get_outputs()[0].shape)
        if len(out) == 2 and isinstance(out[1], int) and out[1] > 0:  # a fixed class count: said before any image
            self._check_classes(out[1])

    def _check_classes(self, classes: int) -> None:
        """Refuse a ``watermark_index`` the output does not have; note which class is read as "watermark" when
        there are more than LAION's two (watermark, clear), since no ONNX file says which class means what. Once:
        from the graph when it fixes the count, else from the first batch's output."""
        self._classes_checked = True
        if classes <= self.watermark_index:
            raise ModelFormatError(
                f"{self.model_path}: the classifier has {classes} class{'es' if classes > 1 else ''}, no class "
                f"{self.watermark_index}: give --watermark-index {classes - 1} or less"
            )
        if classes == 1 and self.softmax:  # a softmax over one class is 1 for every image
            raise ModelFormatError(
                f"{self.model_path}: the classifier has one output, so its softmax is 1 for every image: give "
                "--no-softmax if that output is already a probability"
            )
        if classes > 2:
            read = f"its softmax over all {classes}" if self.softmax else "its output as it is (--no-softmax)"
            self.note(
                f"{self.model_path}: the classifier has {classes} classes, not LAION's 2 (0 = watermark, 1 = clear): "
                f'class {self.watermark_index} (--watermark-index) is read as "watermark", p = {read}, "clear" '
                "= 1 - p; check the model's labels and give its watermark class with --watermark-index"
            )

    def _preprocess(self, source: Any) -> tuple[Any, tuple[int, int]]:
        import numpy as np
        from PIL import Image

        from .images import open_image

        rgb = open_image(source)
        original = rgb.size
        rgb = rgb.resize((self.size, self.size), Image.Resampling.BILINEAR)
        array = (np.asarray(rgb, dtype=np.float32) / 255.0 - self.mean) / self.std
        if self.nchw:
            array = array.transpose(2, 0, 1)
        return np.ascontiguousarray(array), original

    def _predict(self, batch: Any) -> Any:
        import numpy as np

        out = np.asarray(self.session.run(None, {self.input_name: batch})[0], dtype=np.float64)
        if out.ndim != 2:
            raise ModelFormatError(f"{self.model_path}: output shape {list(out.shape)} is not [images, classes]")
        if not self._classes_checked:  # the graph left the class count open
            self._check_classes(int(out.shape[1]))
        if out.shape[1] <= self.watermark_index:
            raise ModelFormatError(
                f"{self.model_path}: output shape {list(out.shape)} has no class {self.watermark_index}"
            )
        if self.softmax:
            out = np.exp(out - out.max(axis=1, keepdims=True))
            out = out / out.sum(axis=1, keepdims=True)
        return out[:, self.watermark_index]

    def _fill(self, result: TagResult, output: Any) -> None:
        p = float(output)
        result.rating = {"watermark": p, "clear": 1.0 - p}

    def scores(self, images: Iterable[Any]) -> Iterator[tuple[str | None, float | None, str | None]]:
        """``(path, p_watermark, error)`` per image, in order."""
        for result in self.iter_tag(images):
            yield result.path, (result.rating.get("watermark") if result.error is None else None), result.error
