"""WD14 / WD v3 taggers (SmilingWolf's ONNX contract) with onnxruntime.

Contract (see docs in the research notes): one NHWC float32 input of raw 0-255 **BGR** pixels,
one ``[batch, n_tags]`` output of sigmoid probabilities, ``selected_tags.csv`` rows aligned with
the outputs. Names, input size and whether the batch axis is fixed are read from the session, so
v2 (``input_1:0`` -> ``predictions_sigmoid``, batch 1) and v3 (``input`` -> ``output``, dynamic
batch) folders both work.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sdcore.errors import ModelFormatError

from .images import wd_preprocess
from .onnx_session import CPU, create_session, parse_providers, resolve_providers
from .runner import BatchTagger, default_workers
from .tags import Selector, TagFormat, load_selected_tags

MODEL_FILE = "model.onnx"
TAGS_FILE = "selected_tags.csv"
_RECIPE = (
    "get one with: hf download SmilingWolf/wd-vit-tagger-v3 model.onnx selected_tags.csv --local-dir DIR; "
    "see docs/offline-models.md"
)


def locate_model(model: str | os.PathLike[str]) -> tuple[Path, Path]:
    """``(model.onnx, selected_tags.csv)`` from a model folder or a ``.onnx`` file with the CSV beside it."""
    path = Path(model)
    if path.is_dir():
        onnx_path = path / MODEL_FILE
        if not onnx_path.is_file():
            candidates = sorted(path.glob("*.onnx"))
            if len(candidates) != 1:
                raise ModelFormatError(f"{path}: expected {MODEL_FILE} in the model folder ({_RECIPE})")
            onnx_path = candidates[0]
        return onnx_path, path / TAGS_FILE
    if path.suffix.lower() == ".onnx":
        if not path.is_file():
            raise ModelFormatError(f"{path}: ONNX model not found")
        return path, path.parent / TAGS_FILE
    raise ModelFormatError(f"{path}: not a WD model folder (model.onnx + selected_tags.csv) or .onnx file ({_RECIPE})")


class WD14Tagger(BatchTagger):
    """Tag images with a WD v2/v3 ONNX model.

    One ``InferenceSession`` is created and reused; images decode in ``workers`` threads while
    the model runs. ``batch_size`` defaults to 1 on CPU (batching does not help there) and 16 on
    an accelerator; a model with a fixed batch axis (v2) forces its own size.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        *,
        general_threshold: float = 0.35,
        character_threshold: float = 0.85,
        mcut: bool = False,
        fmt: TagFormat | None = None,
        batch_size: int | None = None,
        workers: int | None = None,
        providers: str | Sequence[str] | None = None,
        threads: int | None = None,
        fast_decode: bool = False,
    ) -> None:
        import onnxruntime as ort

        self.messages = []
        self.fmt = fmt or TagFormat()
        self.general_threshold = general_threshold
        self.character_threshold = character_threshold
        self.mcut = mcut
        self.fast_decode = fast_decode
        self.model_path, self.tags_path = locate_model(model_dir)
        self.tag_list = load_selected_tags(self.tags_path)
        self.selector = Selector(
            self.tag_list, general_threshold=general_threshold, character_threshold=character_threshold, mcut=mcut
        )

        chosen, warnings = resolve_providers(parse_providers(providers), ort.get_available_providers())
        for warning in warnings if providers is not None else []:  # the automatic default falls back quietly
            self.note(warning)
        self.session = create_session(self.model_path, chosen, threads=threads)
        self.provider: str = self.session.get_providers()[0]
        if chosen[0] != CPU and self.provider == CPU:
            self.note(f"{chosen[0]} failed to initialise; running on CPU")
        # on CPU the model needs every core and one decode thread keeps up; a GPU needs many
        self.workers = workers if workers is not None else (1 if self.provider == CPU else default_workers())

        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(outputs) < 1:
            raise ModelFormatError(f"{self.model_path}: a WD tagger has one input and one output")
        shape = list(inputs[0].shape)
        if len(shape) != 4 or (shape[3] not in (3, None) and not isinstance(shape[3], str)):
            raise ModelFormatError(
                f"{self.model_path}: input {inputs[0].name} has shape {shape}, expected NHWC [N,H,W,3]"
            )
        self.input_name: str = inputs[0].name
        self.output_name: str = outputs[0].name
        self.size: int = shape[1] if isinstance(shape[1], int) and shape[1] > 0 else 448
        width = outputs[0].shape[-1] if outputs[0].shape else None
        if isinstance(width, int) and width != len(self.tag_list):
            raise ModelFormatError(
                f"{self.tags_path}: lists {len(self.tag_list)} tags but {self.model_path.name} outputs {width} "
                "(CSV and model are from different releases)"
            )
        self.fixed_batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
        if self.fixed_batch is not None:
            if batch_size not in (None, self.fixed_batch):
                self.note(f"{self.model_path.name} has a fixed batch size of {self.fixed_batch}; using it")
            self.batch_size = self.fixed_batch
        else:
            self.batch_size = batch_size or (1 if self.provider == CPU else 16)

    def _preprocess(self, source: Any) -> tuple[Any, tuple[int, int]]:
        return wd_preprocess(source, self.size, fast_decode=self.fast_decode)

    def _predict(self, batch: Any) -> Any:
        probs = self.session.run([self.output_name], {self.input_name: batch})[0]
        if probs.ndim != 2 or probs.shape[1] != len(self.tag_list):
            raise ModelFormatError(
                f"{self.tags_path}: lists {len(self.tag_list)} tags but the model output has shape {list(probs.shape)}"
            )
        return probs

    def _select(self, probs: Any) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
        return self.selector(probs)
