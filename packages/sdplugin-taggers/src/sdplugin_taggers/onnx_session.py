"""One onnxruntime session per model, with providers chosen explicitly and reported.

"GPU not used" is the most common tagger complaint (wrong ORT wheel, provider silently dropped),
so the chosen provider is always reported and a requested-but-missing GPU is said out loud.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sdcore.errors import ConfigError, ModelFormatError

PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "migraphx": "MIGraphXExecutionProvider",
    "dml": "DmlExecutionProvider",
    "directml": "DmlExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
}
CPU = "CPUExecutionProvider"


def parse_providers(value: str | Sequence[str] | None) -> list[str]:
    """``"cpu,cuda"`` -> ``["CPUExecutionProvider", "CUDAExecutionProvider"]`` (full names pass through)."""
    if value is None:
        return [PROVIDER_ALIASES["cuda"], CPU]
    items = value.split(",") if isinstance(value, str) else list(value)
    out: list[str] = []
    for item in (i.strip() for i in items):
        if not item:
            continue
        name = PROVIDER_ALIASES.get(item.lower(), item)
        if not name.endswith("ExecutionProvider"):
            known = ", ".join(sorted(PROVIDER_ALIASES))
            raise ConfigError(f"unknown onnxruntime provider {item!r} (use one of {known} or a full provider name)")
        if name not in out:
            out.append(name)
    if not out:
        raise ConfigError("no onnxruntime provider given")
    return out


def resolve_providers(requested: Sequence[str], available: Sequence[str]) -> tuple[list[str], list[str]]:
    """Order the usable providers: accelerators first (in the order given), CPU last.

    Returns ``(providers, warnings)``. Asking for ``cpu,cuda`` means "CUDA when available": the
    listed accelerators are preferred whatever their position; CPU is the fallback only if listed.
    """
    warnings: list[str] = []
    usable = [p for p in requested if p in available]
    missing = [p for p in requested if p not in available]
    if missing:
        warnings.append(
            f"onnxruntime provider(s) {', '.join(missing)} not available in this install "
            f"(available: {', '.join(available)}); for CUDA install the onnxruntime-gpu package instead of onnxruntime"
        )
    ordered = [p for p in usable if p != CPU] + ([CPU] if CPU in usable else [])
    if not ordered:
        raise ConfigError(f"none of the requested onnxruntime providers is available ({'; '.join(warnings)})")
    return ordered, warnings


def create_session(model_path: Path, providers: Sequence[str], *, threads: int | None = None) -> Any:
    """An ``InferenceSession`` with clear errors for missing, corrupt or too-new model files.

    On CPU the intra-op threads do not spin while idle: the decode threads need those cores.
    """
    import onnxruntime as ort

    if not model_path.is_file():
        raise ModelFormatError(f"{model_path}: ONNX model not found")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    if providers and providers[0] == CPU:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(model_path), sess_options=options, providers=list(providers))
    except Exception as exc:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        hint = ""
        if "opset" in text.lower():
            hint = " (WD v3 models need onnxruntime >= 1.17; installed " + ort.__version__ + ")"
        raise ModelFormatError(f"{model_path}: onnxruntime cannot load the model: {text}{hint}") from exc
