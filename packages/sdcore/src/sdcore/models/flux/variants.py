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
tokens, :mod:`sdcore.models.flux.kontext`, and without one it makes images from text as dev does), and
Fill when an inpainting conditioning comes with it (:data:`TOOLS`: a mask): training builds the mask and masked
image (:mod:`sdcore.train.inpainting`), ``sdcore generate --init-image --mask`` runs diffusers'
``FluxFillPipeline``. Depth/Canny generate when a control image comes with the call (:data:`TOOLS`:
``sdcore generate --control-image``, diffusers' ``FluxControlPipeline``, :mod:`sdcore.models.flux.control`);
sdcore does not train them (no peer does: kohya, OneTrainer, ai-toolkit and musubi-tuner have no Depth/Canny
training), so training refuses them with one line instead of a shape error deep inside the transformer; so does
generation without a control image, and Fill without a mask. BFL's control LoRAs make dev a Depth/Canny model
while they are applied (:func:`sdcore.models.flux.control.widen_img_in`), so the same rules hold for dev with one.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
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


@dataclass(frozen=True)
class ToolRelease:
    """A FLUX.1 Tools release: what it is (``model info`` and the refusals), the input that must come with every
    call of it (``needs``: the ``given=`` name callers pass to :func:`refuse`), the option that gives it at
    generation, and whether sdcore trains it."""

    what: str
    needs: str
    option: str
    trains: bool
    #: what sdcore does with it, for ``model info``
    does: str


#: the FLUX.1 Tools releases by variant: they run only when their extra input comes with the call
TOOLS = {
    "fill": ToolRelease(
        "FLUX.1 Fill [dev] (inpainting: the masked image and mask enter with the latents, img_in 384 wide)",
        needs="mask",
        option="--init-image and --mask",
        trains=True,
        does="sdcore trains it (a mask and masked image per sample) and generates with it (--init-image and --mask)",
    ),
    "control": ToolRelease(
        "FLUX.1 Depth or Canny [dev] (a control image enters with the latents, img_in 128 wide)",
        needs="control image",
        option="--control-image",
        trains=False,
        does="sdcore generates with it (--control-image: a depth map or canny edges made beforehand); it does not "
        "train it",
    ),
}
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


def is_flux_control(bundle: Any) -> bool:
    """Whether ``bundle`` is FLUX.1 Depth or Canny [dev] (``img_in`` 128 wide, or widened by a control-LoRA run):
    it needs a control image."""
    if getattr(bundle, "family", None) != "flux" or getattr(bundle, "transformer", None) is None:
        return False
    return bundle_variant(bundle) == "control"


def embeds_guidance(bundle: Any) -> bool:
    """Whether ``bundle``'s transformer takes the distilled guidance (``--cfg``): dev and the dev-based releases
    do, schnell has no ``guidance_in``. Forge writes "Distilled CFG Scale" only then (its ``use_distilled_cfg_scale``
    is off for schnell, which ignores the value), so the infotext leaves it out on schnell too."""
    config = getattr(getattr(bundle, "transformer", None), "config", None)
    return bool(getattr(config, "guidance_embeds", True))


def describe(variant: str) -> str:
    """``model info``'s variant line."""
    if variant in SUPPORTED:
        return SUPPORTED[variant]
    if variant in TOOLS:
        return f"{variant}: {TOOLS[variant].what}; {TOOLS[variant].does}"
    if variant.startswith("in"):
        return f"unknown: img_in takes {variant[2:]} channels (FLUX.1 takes {PLAIN_INPUT}); not supported"
    return variant


def require_supported(bundle: ModelBundle, doing: str, *, given: Collection[str] = ()) -> None:
    """One clear line for a release sdcore cannot run (``doing``: "generate with", "train", "train or generate
    with"); ``given``: the extra inputs the caller gives (``"mask"``, ``"control image"``), so the :data:`TOOLS`
    releases needing one of them pass too. A dev widened by a control-LoRA training run
    (:data:`~sdcore.models.flux.control.TRAINING_WIDENER`) gets its control image at every training step; a
    generation on it after the run ("generate with": the bundle ``train()`` was given keeps the widened, trained
    model) needs one as a Depth/Canny model does, and without one gets that model's line."""
    from .control import TRAINING_WIDENER, widened_by

    if bundle.transformer is not None and widened_by(bundle) == TRAINING_WIDENER and doing != "generate with":
        given = (*given, "control image")
    if bundle.transformer is not None:
        refuse(bundle_variant(bundle), _source(bundle), doing, given=given)


def _source(bundle: ModelBundle) -> str:
    """The model as refusals name it: with the file that widened its ``img_in`` for this call, if one did (a
    control LoRA makes dev a Depth/Canny model: :func:`sdcore.models.flux.control.widen_img_in`)."""
    from .control import widened_by

    source = bundle.source or "this model"
    by = widened_by(bundle)
    return f"{source} with {by}" if by else str(source)


def require_fill(bundle: ModelBundle) -> None:
    """An inpainting conditioning is given to a Flux transformer: it must be FLUX.1 Fill's 384-wide one."""
    variant = bundle_variant(bundle)
    if variant != "fill":
        raise ConfigError(
            f"{bundle.source or 'this model'} is FLUX.1 {variant}, not FLUX.1 Fill: it takes no mask or masked image"
        )


def require_control(bundle: ModelBundle) -> None:
    """A control image is given to a Flux transformer: it must be FLUX.1 Depth's or Canny's 128-wide one."""
    variant = bundle_variant(bundle)
    if TOOLS.get(variant) is not TOOLS["control"]:
        raise ConfigError(
            f"{bundle.source or 'this model'} is FLUX.1 {variant}, not FLUX.1 Depth or Canny [dev]: it takes no "
            "control image (drop --control-image)"
        )


def refuse(variant: str, source: str, doing: str, *, given: Collection[str] = ()) -> None:
    """Raise the one line for ``variant`` unless it is dev, schnell or Kontext, or a :data:`TOOLS` release whose
    extra input is in ``given`` (also for a file's header alone: the training pre-flight's layout, before
    anything loads). ``doing``: "generate with", "train" or "train or generate with"."""
    tool = TOOLS.get(variant)
    if variant in SUPPORTED or (tool is not None and tool.needs in given):
        return
    if tool is None:
        what = f"a Flux transformer whose img_in takes {variant[2:]} channels"
        raise ConfigError(f"{source} is {what}; sdcore cannot {doing} it yet (FLUX.1 dev, schnell and Kontext only)")
    if tool.trains or doing == "generate with":
        raise ConfigError(f"{source} is {tool.what}; it needs a {tool.needs}: generate with {tool.option}")
    raise ConfigError(
        f"{source} is {tool.what}; sdcore generates with it ({tool.option}) but cannot train it (no "
        "trainer sdcore follows trains FLUX.1 Depth/Canny)"
    )


__all__ = [
    "PIPELINE_VARIANTS",
    "SUPPORTED",
    "TOOLS",
    "TOOL_INPUTS",
    "ToolRelease",
    "describe",
    "flux_variant",
    "is_flux_control",
    "refuse",
    "require_control",
    "require_fill",
    "require_supported",
]
