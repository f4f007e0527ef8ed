"""A ComfyUI models folder holding a tiny FLUX.1 dev as its users keep the real one, in separate files, shared
by the tests that look parts up by name (``--t5xxl t5xxl_fp16``) or through a ComfyUI graph's loaders."""

from __future__ import annotations

from pathlib import Path


def save_tensors(tensors, path: Path) -> Path:
    """``tensors`` as a safetensors file at ``path`` (its folders made)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous().clone() for k, v in tensors.items()}, str(path))
    return path


def write_flux_tree(models: Path) -> Path:
    """``models`` with the BFL transformer alone in ``diffusion_models/flux1-dev.safetensors``,
    ``vae/ae.safetensors``, ``text_encoders/t5xxl_fp16.safetensors`` and the CLIP-L in the legacy ``clip/``
    folder (``clip/clip_l.safetensors``): the file names of ComfyUI's FLUX.1 example graph."""
    from sdcore.models.flux.adapter import FluxAdapter
    from sdcore.models.flux.save import flux_state
    from sdcore.models.t5 import t5_file_tensors

    dev = FluxAdapter().create_tiny(variant="dev", seed=0)
    state = flux_state(dev, "comfy")
    prefix = "model.diffusion_model."
    save_tensors({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)},
          models / "diffusion_models" / "flux1-dev.safetensors")  # fmt: skip
    save_tensors(
        {k[len("vae.") :]: v for k, v in state.items() if k.startswith("vae.")}, models / "vae" / "ae.safetensors"
    )
    clip = {k[len("text_encoders.clip_l.transformer.") :]: v for k, v in state.items() if "clip_l" in k}
    save_tensors(clip, models / "clip" / "clip_l.safetensors")
    save_tensors(t5_file_tensors(dev.text_encoders[1]), models / "text_encoders" / "t5xxl_fp16.safetensors")
    return models
