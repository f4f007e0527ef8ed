"""Which FLUX.1 release a transformer is: dev, schnell, or one of BFL's FLUX.1 Tools and Kontext.

All of them are ``FluxTransformer2DModel`` with dev's blocks, so a file loads as a Flux.1 model either way;
what tells them apart (the rules of diffusers' single-file detection, ``infer_diffusers_model_type``):

- the guidance embedding (``guidance_in``): dev and every dev-based release have it, schnell has not;
- the input width of ``img_in`` (``in_channels``): 64 for dev/schnell (16 latent channels x 2x2 packing),
  384 for **Fill** (the noisy latents, the masked image's latents and the packed 8x8 mask: 64 + 64 + 256),
  128 for **Depth** and **Canny** (the noisy latents and the control image's latents: 64 + 64). Depth and
  Canny have the same shapes, so they share one label, ``control`` (diffusers' ``FluxControlPipeline``
  runs both);
- **Kontext** has exactly dev's shapes; only a diffusers folder says it (``FluxKontextPipeline`` in its
  ``model_index.json``). A Kontext single file is read as dev.

sdcore trains and samples dev, schnell and Kontext (dev's shapes; its reference images join the latents as
tokens, :mod:`sdcore.models.flux.kontext`, and without one it makes images from text as dev does). Fill
generates (``sdcore generate --init-image --mask``: diffusers' ``FluxFillPipeline``, :data:`GENERATES`).
Depth/Canny need an extra image input on the channels (a control image) that neither its data pipeline
nor its generation builds, so they load (``model info`` names them) and every generation or training step
refuses them with one line instead of a shape error deep inside the transformer; so does training Fill.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ...errors import ConfigError

if TYPE_CHECKING:
    from ..bundle import ModelBundle

#: ``img_in`` input width -> the FLUX.1 Tools release it belongs to
TOOL_INPUTS = {384: "fill", 128: "control"}
#: the packed latent width of a plain text-to-image Flux.1 transformer
PLAIN_INPUT = 64
#: a diffusers folder's pipeline class -> the release (other ``Flux*Pipeline`` classes: by shapes)
PIPELINE_VARIANTS = {"FluxFillPipeline": "fill", "FluxControlPipeline": "control",
                     "FluxKontextPipeline": "kontext"}  # fmt: skip
#: the bundle metadata key where a folder's pipeline class is kept when it names one of the above
PIPELINE_METADATA_KEY = "diffusers.pipeline"
#: what each release sdcore cannot run is, for ``model info`` and the refusals
UNSUPPORTED = {
    "fill": "FLUX.1 Fill [dev] (inpainting: the masked image and mask enter with the latents, img_in 384 wide)",
    "control": "FLUX.1 Depth or Canny [dev] (a control image enters with the latents, img_in 128 wide)",
}
#: the releases of :data:`UNSUPPORTED` that ``sdcore generate`` runs all the same (what it needs for them)
GENERATES = {"fill": "generates with --init-image and --mask (inpainting)"}
#: the releases sdcore trains and generates with, and what ``model info`` says of each
SUPPORTED = {"dev": "dev", "schnell": "schnell",
             "kontext": "kontext: FLUX.1 Kontext [dev] (image editing: a reference image's tokens join the latents)"}  # fmt: skip


def flux_variant(transformer: Any, metadata: dict[str, str] | None = None) -> str:
    """``dev``, ``schnell``, ``fill``, ``control``, ``kontext``, or ``in<N>`` for another input width."""
    config = transformer.config
    width = int(config.in_channels)
    if width in TOOL_INPUTS:
        return TOOL_INPUTS[width]
    if width != PLAIN_INPUT:
        return f"in{width}"
    named = PIPELINE_VARIANTS.get((metadata or {}).get(PIPELINE_METADATA_KEY, ""))
    if named is not None:
        return named
    return "dev" if config.guidance_embeds else "schnell"


def bundle_variant(bundle: ModelBundle) -> str:
    return flux_variant(bundle.transformer, bundle.metadata)


def describe(variant: str) -> str:
    """``model info``'s variant line."""
    if variant in SUPPORTED:
        return SUPPORTED[variant]
    if variant in GENERATES:
        return f"{variant}: {UNSUPPORTED[variant]}; sdcore {GENERATES[variant]}, and cannot train it yet"
    if variant in UNSUPPORTED:
        return f"{variant}: {UNSUPPORTED[variant]}; sdcore cannot train or generate with it yet"
    if variant.startswith("in"):
        return f"unknown: img_in takes {variant[2:]} channels (FLUX.1 takes {PLAIN_INPUT}); not supported"
    return variant


def require_supported(bundle: ModelBundle, doing: str, *, generating: bool = False) -> None:
    """One clear line for a release sdcore cannot run (``doing``: "generate with", "train"); ``generating``:
    the releases of :data:`GENERATES` pass too (their pipelines check what they need)."""
    if bundle.transformer is not None:
        variant = bundle_variant(bundle)
        if generating and variant in GENERATES:
            return
        refuse(variant, bundle.source or "this model", doing)


def refuse(variant: str, source: str, doing: str) -> None:
    """Raise the one line for ``variant`` unless it is dev or schnell (also for a file's header alone:
    the training pre-flight's layout, before anything loads)."""
    if variant in SUPPORTED:
        return
    what = UNSUPPORTED.get(variant) or f"a Flux transformer whose img_in takes {variant[2:]} channels"
    raise ConfigError(f"{source} is {what}; sdcore cannot {doing} it yet (FLUX.1 dev, schnell and Kontext only)")


__all__ = [
    "GENERATES",
    "PIPELINE_VARIANTS",
    "SUPPORTED",
    "TOOL_INPUTS",
    "UNSUPPORTED",
    "describe",
    "flux_variant",
    "refuse",
    "require_supported",
]
