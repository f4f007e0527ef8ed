"""Diffusers folders whose text encoders transformers 4.x and 5.x both load (issue 18).

transformers 5's ``CLIPTextModel`` has no ``text_model`` level and saves its weights without it;
transformers 4.x (kohya pins it) finds none of its keys in such a file and silently loads a random
encoder. The names below are the 4.x ``state_dict`` names, spelled out from the CLIP layout.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from sdcore.models.tiny import create_tiny_bundle
from transformers import CLIPTextModel, CLIPTextModelWithProjection


def transformers4_names(layers: int, *, projection: bool) -> set[str]:
    names = {
        "text_model.embeddings.token_embedding.weight",
        "text_model.embeddings.position_embedding.weight",
        "text_model.final_layer_norm.weight",
        "text_model.final_layer_norm.bias",
    }
    per_layer = [f"self_attn.{p}_proj.{w}" for p in ("q", "k", "v", "out") for w in ("weight", "bias")] + [
        f"{m}.{w}" for m in ("layer_norm1", "mlp.fc1", "mlp.fc2", "layer_norm2") for w in ("weight", "bias")
    ]
    names |= {f"text_model.encoder.layers.{i}.{name}" for i in range(layers) for name in per_layer}
    if projection:
        names.add("text_projection.weight")  # top level in 4.x too
    return names


def _saved_keys(folder: Path) -> set[str]:
    keys: set[str] = set()
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as handle:
            keys |= set(handle.keys())
    return keys


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_text_encoders_are_written_with_transformers4_names_and_load_in_5(family, tmp_path):
    bundle = create_tiny_bundle(family)
    folder = bundle.save(tmp_path / "model", format="diffusers")
    subfolders = ["text_encoder", "text_encoder_2"] if family == "sdxl" else ["text_encoder"]
    classes = [CLIPTextModel, CLIPTextModelWithProjection]
    ids = torch.tensor([[49406, 320, 1125, 539, 49407] + [49407] * 72])
    for index, (sub, cls) in enumerate(zip(subfolders, classes, strict=False)):
        encoder = bundle.text_encoders[index]
        layers = encoder.config.num_hidden_layers
        assert _saved_keys(folder / sub) == transformers4_names(layers, projection=cls is CLIPTextModelWithProjection)
        loaded, info = cls.from_pretrained(folder / sub, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
        with torch.no_grad():
            ours, theirs = encoder(ids, output_hidden_states=True), loaded(ids, output_hidden_states=True)
        assert torch.equal(ours.last_hidden_state, theirs.last_hidden_state)
        if cls is CLIPTextModelWithProjection:
            assert torch.equal(ours.text_embeds, theirs.text_embeds)
    from sdcore.models.load import load_model

    reloaded = load_model(str(folder))  # and sdcore's own loader reads the folder back exactly
    for ours, theirs in zip(bundle.text_encoders, reloaded.text_encoders, strict=True):
        for key, value in ours.state_dict().items():
            assert torch.equal(value, theirs.state_dict()[key]), key
