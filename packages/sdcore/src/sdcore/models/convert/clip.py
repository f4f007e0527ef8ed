"""transformers CLIP text encoder key <-> ldm/SGM key (HF layout kept verbatim under a prefix).

transformers >= 5.6 ``CLIPTextModel`` has no ``text_model.`` level in its own keys, while
``CLIPTextModelWithProjection`` still has it; every file format keeps ``text_model.``. Keys are
normalised to the *canonical* form (with ``text_model.``) before they meet a file.
"""

from __future__ import annotations

from typing import Any

SD1_PREFIX = "cond_stage_model.transformer."
SDXL_CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
LEGACY_PARTS = ("embeddings.", "encoder.", "final_layer_norm.")


def has_text_model_level(module: Any) -> bool:
    return hasattr(module, "text_model")


def to_canonical(key: str, wrapped: bool) -> str:
    """Module key -> canonical key with ``text_model.`` (``text_projection`` stays top-level)."""
    if wrapped or key.startswith("text_projection"):
        return key
    return "text_model." + key


def from_canonical(key: str, wrapped: bool) -> str:
    if wrapped or not key.startswith("text_model."):
        return key
    return key[len("text_model.") :]


def clip_key_map(module_keys: list[str], prefix: str, wrapped: bool) -> dict[str, str]:
    """``{module key: file key}`` for an HF-layout CLIP stored under ``prefix``."""
    return {key: prefix + to_canonical(key, wrapped) for key in module_keys}


def add_missing_text_model_level(keys: list[str], prefix: str) -> dict[str, str]:
    """Renames for old SD1 files that store ``cond_stage_model.transformer.embeddings...``."""
    renames = {}
    for key in keys:
        if key.startswith(prefix) and key[len(prefix) :].startswith(LEGACY_PARTS):
            renames[key] = prefix + "text_model." + key[len(prefix) :]
    return renames
