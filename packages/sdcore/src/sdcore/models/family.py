"""Model families: what the runtime, generation and the model I/O read instead of ``if sdxl`` branches.

A family is a declared, frozen object: its denoiser (a UNet or a transformer, by diffusers component
name), its text encoders in order, its latent format, its training objective, its native resolution
and its kohya LoRA prefixes. Behaviour that needs torch (reading a single file, building the tiny
test model, encoding prompts, calling the denoiser) lives in the family's :class:`FamilyAdapter`,
named by an import string and imported only when used, so declaring families never imports torch.

SD1, SD2, SDXL and the SDXL refiner are declared here. Other families come from plugins through
the ``sdcore_model_families`` hook (see :mod:`sdcore.hookspecs`) or from :func:`register_family`
(for code that builds families at run time, e.g. tests); :func:`families` lists them all.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from ..errors import ConfigError, PluginError

if TYPE_CHECKING:
    import torch

    from ..plugins import SdPluginManager
    from ..train.method import Conditioning
    from .bundle import ModelBundle

DENOISERS = ("unet", "transformer")
OBJECTIVES = ("ddpm", "flow-matching")


def text_encoder_slot(kind: str) -> int:
    """kohya's number of a text encoder, the same in every script: ``--learning_rate_te{1,2,3}``
    (sdxl_train.py, sd3_train.py) and the LoRA prefixes ``lora_te1/2/3`` (SD3, Flux); 1 the first CLIP
    (CLIP-L, SD2's OpenCLIP), 2 CLIP-G, 3 T5. sdcore's per-encoder rate options ``te1_lr``/``te2_lr``/
    ``te3_lr`` are numbered so."""
    if kind.startswith("t5"):
        return 3
    return 2 if kind == "clip-g" else 1


@dataclass(frozen=True)
class TextEncoderSpec:
    """One text encoder of a family, in the order ``bundle.text_encoders`` holds them."""

    component: str  # diffusers component name: "text_encoder", "text_encoder_2", "text_encoder_3"
    kind: str  # "clip-l", "openclip-h", "clip-g", "t5-xxl"
    max_length: int  # tokens per sequence (77 for CLIP; T5 is configurable per family)

    @property
    def slot(self) -> int:
        """kohya's number of this encoder (:func:`text_encoder_slot`)."""
        return text_encoder_slot(self.kind)

    @property
    def tokenizer_component(self) -> str:
        """The matching diffusers tokenizer folder: ``text_encoder_2`` -> ``tokenizer_2``."""
        return self.component.replace("text_encoder", "tokenizer", 1)


@dataclass(frozen=True)
class LatentFormat:
    """How VAE latents are normalised for the denoiser: ``latents = (vae_mean - shift) * scale``."""

    channels: int  # 4 for SD1/2/XL, 16 for SD3/Flux
    scaling_factor: float  # 0.18215 SD1/2, 0.13025 SDXL, 1.5305 SD3, 0.3611 Flux
    shift_factor: float = 0.0  # 0.0609 SD3, 0.1159 Flux
    downscale: int = 8  # pixels per latent cell

    def normalize(self, vae_latents: Any) -> Any:
        """VAE latent distribution sample/mean -> the denoiser's latent space."""
        return (vae_latents - self.shift_factor) * self.scaling_factor

    def denormalize(self, latents: Any) -> Any:
        """The denoiser's latent space -> what the VAE decoder expects."""
        return latents / self.scaling_factor + self.shift_factor


#: the kinds of repeated transformer block the memory plan tells apart (see :class:`BlockList`)
BLOCK_STREAMS = ("joint", "single")


@dataclass(frozen=True)
class BlockList:
    """One ``ModuleList`` of repeated blocks of a transformer denoiser, as block swap and the memory plan read it.

    ``attribute`` is the list's attribute on the denoiser (``transformer_blocks``), ``depth_key`` the
    denoiser config's key that counts its blocks (``num_layers``), so the pre-flight can size a model it
    has not built; ``stream`` says what a block computes: ``"joint"`` keeps the image and text tokens in
    two streams (SD3's MMDiT, Flux's double blocks), ``"single"`` runs one stream over both (Flux's single
    blocks). One declaration serves both readers, so block swap and the memory plan count the same blocks.
    """

    attribute: str
    depth_key: str
    stream: str = "joint"


#: SD3's ``transformer_blocks`` (``num_layers``); Flux's and Chroma's ``transformer_blocks`` then
#: ``single_transformer_blocks`` (``num_single_layers``), in forward order: every family's default
DEFAULT_BLOCK_LISTS: tuple[BlockList, ...] = (
    BlockList("transformer_blocks", "num_layers", "joint"),
    BlockList("single_transformer_blocks", "num_single_layers", "single"),
)


@dataclass(frozen=True)
class RoutedInputs:
    """Which arguments of a transformer family's blocks carry what TREAD token routing (``--tread-route``,
    :mod:`sdcore.train.token_routing`) shortens, so a family (a third party's too) opts in by declaring them.

    Every block of the family's :attr:`ModelFamily.block_lists` takes the image tokens [B, N, D] as ``image`` and
    the text tokens [B, T, D] as ``text`` and returns a tuple whose item ``output`` is the image tokens; those
    keep the same arguments in a forward's every block (the routing finds a span's state again by them when a
    checkpointed block is recomputed). ``rope``: the argument with the rotary embedding, a ``(cos, sin)`` pair
    of ``[T + N, d]`` tables whose text rows come first (Flux); its image rows are routed with the tokens.
    ``mask``: an attention mask ``[..., T + N]`` whose image columns are routed the same way: ``"argument"``
    (Chroma's ``attention_mask``) or ``"argument.key"`` inside a mapping argument (Flux's T5 padding mask in
    ``joint_attention_kwargs``). ``patch``: the latent pixels per side of one image token (FLUX.1's 2x2
    packing, SD3's ``patch_size``); the image tokens start with the target image's, row-major over that grid
    (tokens after them, FLUX.1 Kontext's reference image, are routed too), which is how a loss mask at latent
    size becomes the tokens routing never drops. ``joint``: the block lists whose blocks take text and image
    as one sequence ``[T + N, D]`` in ``image`` (no ``text`` argument) and return that sequence alone
    (diffusers' Chroma single blocks); ``T`` is the length of the denoiser forward's own ``text`` argument.
    ``key``: the arguments whose tensors are the same object in every block of one forward (None: all but
    the tokens), for a family whose blocks also get a new tensor each (Chroma's per-block modulation).
    """

    image: str = "hidden_states"
    text: str = "encoder_hidden_states"
    rope: str | None = None
    mask: str | None = None
    output: int = 1
    patch: int = 2
    joint: tuple[str, ...] = ()
    key: tuple[str, ...] | None = None


@dataclass(frozen=True)
class ModelFamily:
    """A model family as the rest of sdcore reads it. Frozen and torch-free; see the module doc."""

    name: str  # "sd1", "sd2", "sdxl", "sdxl-refiner", "sd3", "flux"
    label: str  # human name: "Stable Diffusion 3 / 3.5", "FLUX.1"
    denoiser: str  # "unet" | "transformer": the diffusers component name of the denoiser
    text_encoders: tuple[TextEncoderSpec, ...]
    latent: LatentFormat
    objective: str  # "ddpm" (epsilon / v-prediction on a DDPM schedule) | "flow-matching"
    native_resolution: int  # the side, in pixels, the family was trained at
    adapter: str  # import string "module:attr" of the family's FamilyAdapter (class or instance)
    lora_prefixes: Mapping[str, str] = field(default_factory=dict)  # component -> kohya LoRA prefix
    #: what a file without a marker predicts: DDPM families "epsilon" or "v_prediction"; a flow-matching family
    #: always "flow-matching" (set from ``objective``, as its bundles say: kohya's Flux/SD3 scripts train the flow
    #: with no epsilon option), so a family declared flow-matching never reads as epsilon
    default_prediction_type: str = "epsilon"
    context_tokens: int = 77  # text tokens the denoiser attends to by default (SD3: 77 + T5's; Flux: T5's)
    #: ``sdcore generate --mask`` inpaints with it (A1111's inpainting; a non-UNet family's adapter ``generate``
    #: then takes ``inpaint=``, a :class:`sdcore.generate.inpaint.PreparedInpaint`)
    inpaints: bool = False
    #: the text encoders (components) whose outputs a run may cache while the family's other encoders train
    #: (kohya's partial caching on SD3/FLUX.1: T5-XXL cached, CLIP trained, ``flux_train_network.py``'s
    #: ``get_models_for_text_encoding``); the adapter then implements ``encode_cached_part`` and
    #: ``complete_encoding`` (see :class:`FamilyAdapter`). Empty: caching is all or nothing
    partial_text_cache: tuple[str, ...] = ()
    #: a transformer denoiser's repeated block lists in forward order: what ``--blocks-to-swap`` swaps (the
    #: last N) and what the memory plan counts per block (:class:`BlockList`)
    block_lists: tuple[BlockList, ...] = DEFAULT_BLOCK_LISTS
    #: flow matching: the time shift training uses when ``--discrete-flow-shift`` is not given (1.0 = none, the
    #: value SD3, Flux and Chroma train with by default; AuraFlow's scheduler says 1.73)
    flow_shift: float = 1.0
    #: TREAD token routing (``--tread-route``): which block arguments carry the image tokens (and RoPE, mask); None:
    #: the family's blocks cannot be routed (UNets; Chroma's concatenated single blocks) and the pre-flight refuses it
    token_routing: RoutedInputs | None = None

    def __post_init__(self) -> None:
        from ..specs import _check_import_string, _check_name

        _check_name("model family", self.name)
        _check_import_string("model family", self.name, self.adapter)
        if self.denoiser not in DENOISERS:
            raise PluginError(f"model family {self.name!r}: denoiser must be one of {DENOISERS}, not {self.denoiser!r}")
        if self.objective not in OBJECTIVES:
            raise PluginError(
                f"model family {self.name!r}: objective must be one of {OBJECTIVES}, not {self.objective!r}"
            )
        if not self.text_encoders:
            raise PluginError(f"model family {self.name!r} declares no text encoder")
        problems = [
            f"block list {b!r}: stream must be one of {BLOCK_STREAMS}"
            for b in self.block_lists
            if not isinstance(b, BlockList) or b.stream not in BLOCK_STREAMS
        ]
        if self.token_routing is not None and not isinstance(self.token_routing, RoutedInputs):
            problems.append(f"token_routing must be a RoutedInputs, not {self.token_routing!r}")
        elif self.token_routing is not None and not (
            isinstance(self.token_routing.patch, int) and self.token_routing.patch >= 1
        ):
            problems.append(f"token_routing.patch must be a positive int, not {self.token_routing.patch!r}")
        if self.token_routing is not None and isinstance(self.token_routing, RoutedInputs):
            lists = {b.attribute for b in self.block_lists if isinstance(b, BlockList)}
            problems += [f"token_routing.joint names no block list of it: {name!r}"
                         for name in self.token_routing.joint if name not in lists]  # fmt: skip
        unknown = set(self.partial_text_cache) - {te.component for te in self.text_encoders}
        if unknown:
            problems.append(f"partial_text_cache names no text encoder of it: {sorted(unknown)}")
        if not self.flow_shift > 0:
            problems.append(f"flow_shift must be positive, not {self.flow_shift!r}")
        if self.objective == "ddpm" and self.default_prediction_type not in ("epsilon", "v_prediction"):
            problems.append(
                f"default_prediction_type of a ddpm family must be 'epsilon' or 'v_prediction',"
                f" not {self.default_prediction_type!r}"
            )
        if problems:
            raise PluginError(f"model family {self.name!r}: {'; '.join(problems)}")
        object.__setattr__(self, "block_lists", tuple(self.block_lists))
        if self.objective == "flow-matching":  # the field's default is the DDPM one; a flow model has no other
            object.__setattr__(self, "default_prediction_type", "flow-matching")
        # a read-only, hashable-by-identity view: the family is shared by every bundle of it
        object.__setattr__(self, "lora_prefixes", MappingProxyType(dict(self.lora_prefixes)))

    def __hash__(self) -> int:
        return hash(self.name)

    @property
    def components(self) -> tuple[str, ...]:
        """The trainable components in diffusers' names: the denoiser, then the text encoders."""
        return (self.denoiser, *(te.component for te in self.text_encoders))

    @property
    def sample_size(self) -> int:
        """The latent side at the native resolution (diffusers' ``sample_size``)."""
        return self.native_resolution // self.latent.downscale


@runtime_checkable
class FamilyAdapter(Protocol):
    """Behaviour of one family that needs torch; one per family, imported lazily.

    Implementations accept and ignore ``**options`` they do not know, so the runtime can pass
    more context later (it passes ``batch=`` to :meth:`predict`: the training batch, whose
    size conditioning SDXL uses; it is ``None`` at generation time).

    Optional: ``read_layout(path, **parts) -> sdcore.models.layout.ModelLayout`` describes a single file
    from its header (and what it lacks from the ``parts`` given separately, when it takes ``**parts``) (configs under ``"transformer"``/``"unet"``, ``"vae"``, ``"text_encoders"``
    with ``_class_name``) so the pre-flight can plan memory before loading; without it the plan is
    skipped for such files, with a note. ``part_slots(path) -> (accepted, missing)`` names, from headers
    only, the separate parts (``clip_l``, ``clip_g``, ``t5xxl``, ``vae``, ``t5_tokenizer``) a model file or folder
    of the family takes and those it lacks, for the pre-flight (:mod:`sdcore.models.parts`); without it the
    family takes none. ``detect_diffusers(index: dict) -> bool`` (given a
    folder's ``model_index.json``) and ``load_diffusers(folder, **options) -> ModelBundle`` let a
    non-UNet family read its diffusers folders through :func:`sdcore.models.load.load_model`;
    ``save(bundle, path, *, format, dtype, prune, metadata) -> Path`` writes its models
    (``bundle.save``); ``generate(bundle, prompts, negatives, *, seeds, steps, cfg, width, height,
    image, strength, clip_skip, sampler) -> list[PIL.Image]`` renders one image per prompt for
    ``sdcore generate`` (prompt networks are already applied to the bundle then).
    ``drop_text_encoders(bundle, conditioning, dropped) -> Conditioning`` zeroes, per sample, the parts
    of a training conditioning that the encoders named in ``dropped[i]`` produced (SD3's kohya
    per-encoder caption dropout, :mod:`sdcore.train.encoder_dropout`).
    ``sample_draws(bundle, options, batch, count) -> list[hook]`` gives the training step hooks
    ``hook(sample_index, generator)`` that draw more per sample after its noise and timestep and record
    the result in ``batch.extra`` (SD3: kohya's per-encoder caption dropout, positional-embedding crop).
    ``encode_cached_part(bundle, prompts, **options) -> Conditioning`` encodes with the family's
    ``partial_text_cache`` encoders alone (what a partial text-encoder cache keeps, in a layout of the adapter's
    choosing), and ``complete_encoding(bundle, prompts, cached, **options) -> Conditioning`` runs the other
    encoders and joins their outputs with ``cached`` (a batch of ``encode_cached_part``'s results for the same
    prompts) into exactly what ``encode_prompts`` returns; both take ``encode_prompts``' options.
    ``enable_gradient_checkpointing(bundle)`` replaces the denoiser's own ``enable_gradient_checkpointing()``
    for ``--gradient-checkpointing`` (Chroma: diffusers' checkpointed single blocks would drop the mask); with
    ``--cpu-offload-checkpointing`` it is called with ``gradient_checkpointing_func=`` the offloading function,
    which it must use for every block call (:mod:`sdcore.train.offload_checkpointing`).
    """

    def detect_single_file(self, keys: Collection[str]) -> bool:
        """Whether a single file with these tensor names (any layout we read) is of this family."""
        ...

    def load_single_file(self, path: Any, **options: Any) -> ModelBundle:
        """Read a single file of this family (options as :func:`sdcore.models.load.load_model`)."""
        ...

    def create_tiny(self, **options: Any) -> ModelBundle:
        """A tiny random model with this family's real layout (tests, demos)."""
        ...

    def encode_prompts(self, bundle: ModelBundle, prompts: list[str], **options: Any) -> Conditioning:
        """Prompts -> the denoiser's text conditioning, as training encodes them."""
        ...

    def predict(
        self,
        bundle: ModelBundle,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        conditioning: Conditioning,
        **options: Any,
    ) -> torch.Tensor:
        """The denoiser's output for ``noisy_latents`` in latent layout ([B, C, H, W])."""
        ...


_CLIP_L = "clip-l"
_UNET_ADAPTERS = "sdcore.models.sd_unet"

SD1 = ModelFamily(
    name="sd1",
    label="Stable Diffusion 1.x",
    denoiser="unet",
    text_encoders=(TextEncoderSpec("text_encoder", _CLIP_L, 77),),
    latent=LatentFormat(channels=4, scaling_factor=0.18215),
    objective="ddpm",
    native_resolution=512,
    adapter=f"{_UNET_ADAPTERS}:SD1_ADAPTER",
    lora_prefixes={"unet": "lora_unet", "text_encoder": "lora_te"},
    inpaints=True,
)
SD2 = ModelFamily(
    name="sd2",
    label="Stable Diffusion 2.x",
    denoiser="unet",
    text_encoders=(TextEncoderSpec("text_encoder", "openclip-h", 77),),
    latent=LatentFormat(channels=4, scaling_factor=0.18215),
    objective="ddpm",
    native_resolution=768,
    adapter=f"{_UNET_ADAPTERS}:SD2_ADAPTER",
    lora_prefixes={"unet": "lora_unet", "text_encoder": "lora_te"},
    default_prediction_type="v_prediction",  # SD2.x-768 is the common release (see models.detect)
    inpaints=True,
)
SDXL = ModelFamily(
    name="sdxl",
    label="Stable Diffusion XL",
    denoiser="unet",
    text_encoders=(TextEncoderSpec("text_encoder", _CLIP_L, 77), TextEncoderSpec("text_encoder_2", "clip-g", 77)),
    latent=LatentFormat(channels=4, scaling_factor=0.13025),
    objective="ddpm",
    native_resolution=1024,
    adapter=f"{_UNET_ADAPTERS}:SDXL_ADAPTER",
    lora_prefixes={"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"},
    inpaints=True,
)
SDXL_REFINER = ModelFamily(
    name="sdxl-refiner",
    label="Stable Diffusion XL refiner",
    denoiser="unet",
    text_encoders=(TextEncoderSpec("text_encoder_2", "clip-g", 77),),
    latent=LatentFormat(channels=4, scaling_factor=0.13025),
    objective="ddpm",
    native_resolution=1024,
    adapter=f"{_UNET_ADAPTERS}:SDXL_REFINER_ADAPTER",
    lora_prefixes={"unet": "lora_unet", "text_encoder_2": "lora_te2"},
)
BUILTIN_FAMILIES: tuple[ModelFamily, ...] = (SD1, SD2, SDXL, SDXL_REFINER)

_REGISTERED: dict[str, ModelFamily] = {family.name: family for family in BUILTIN_FAMILIES}
_ADAPTERS: dict[ModelFamily, FamilyAdapter] = {}  # by declaration: two managers may declare one name differently
_PLUGIN_FAMILIES: dict[str, ModelFamily] | None = None  # from the default plugin manager, once
#: the plugin managers of the :func:`using_plugin_manager` blocks entered, innermost last (a process-wide stack,
#: not a context variable: the runtime's worker threads must see it too)
_ACTIVE_PMS: list[SdPluginManager] = []


def register_family(family: ModelFamily) -> None:
    """Make ``family`` known to this process (plugins normally use the hook instead).

    Registering an equal family again is a no-op; a different family under a taken name is an error.
    """
    if not isinstance(family, ModelFamily):
        raise PluginError(f"register_family expects a ModelFamily, got {family!r}")
    existing = _REGISTERED.get(family.name)
    if existing is not None:
        if existing != family:
            raise PluginError(f"model family {family.name!r} is already registered with a different declaration")
        return
    _REGISTERED[family.name] = family


@contextlib.contextmanager
def temporary_family(family: ModelFamily) -> Iterator[ModelFamily]:
    """``family`` registered for the ``with`` block only (tests and benchmarks that declare a toy
    family of some shape): the registry and the resolved adapters are as before afterwards."""
    before, adapters = dict(_REGISTERED), dict(_ADAPTERS)
    register_family(family)
    try:
        yield family
    finally:
        _REGISTERED.clear()
        _REGISTERED.update(before)
        _ADAPTERS.clear()
        _ADAPTERS.update(adapters)


@contextlib.contextmanager
def using_plugin_manager(pm: SdPluginManager) -> Iterator[SdPluginManager]:
    """Inside the block, code that asks for a family without ``pm=`` (``bundle.family_spec``, the runtime's
    ``family_adapter(name)``) also finds the families ``pm``'s plugins declare, before the installed ones.

    Why: a test hands its own manager (``sd_pm_factory([my_plugin])``) to ``build_cli(pm)``; the command then
    loads and trains through code that never sees ``pm``. ``build_cli`` enters this block for every command
    it runs, so a family declared only by a plugin of that manager is found as an installed one is. Python
    code that drives the runtime with its own manager enters it itself (or uses :func:`temporary_family`)."""
    _ACTIVE_PMS.append(pm)
    try:
        yield pm
    finally:
        del _ACTIVE_PMS[len(_ACTIVE_PMS) - 1 - _ACTIVE_PMS[::-1].index(pm)]


def _plugin_families(pm: SdPluginManager | None) -> dict[str, ModelFamily]:
    """Families from the ``sdcore_model_families`` hook; without ``pm``, the active manager's
    (:func:`using_plugin_manager`) and then the default manager's (cached)."""
    global _PLUGIN_FAMILIES
    if pm is not None:
        return pm.model_families()
    if _PLUGIN_FAMILIES is None:
        from ..plugins import get_plugin_manager

        _PLUGIN_FAMILIES = get_plugin_manager().model_families()
    if not _ACTIVE_PMS:
        return _PLUGIN_FAMILIES
    found = dict(_ACTIVE_PMS[-1].model_families())
    for name, family in _PLUGIN_FAMILIES.items():
        found.setdefault(name, family)  # the active manager's declaration wins for its names
    return found


def reset_family_cache() -> None:
    """Forget the families read from installed plugins and the resolved adapters (tests)."""
    global _PLUGIN_FAMILIES
    _PLUGIN_FAMILIES = None
    _ADAPTERS.clear()


def families(pm: SdPluginManager | None = None) -> tuple[ModelFamily, ...]:
    """Every known family: built-ins, :func:`register_family`'s, then the plugins' (from ``pm``,
    or from the installed plugins when ``pm`` is ``None``)."""
    found = dict(_REGISTERED)
    for name, family in _plugin_families(pm).items():
        if name in found and found[name] != family:
            raise PluginError(f"model family {name!r} is declared twice with different contents")
        found.setdefault(name, family)
    return tuple(found.values())


def family_names(pm: SdPluginManager | None = None) -> tuple[str, ...]:
    return tuple(family.name for family in families(pm))


def get_family(name: str | ModelFamily, pm: SdPluginManager | None = None) -> ModelFamily:
    """The family called ``name``; a :class:`ConfigError` listing the known ones when there is none.

    Built-in and registered families are found without loading any plugin.
    """
    if isinstance(name, ModelFamily):
        return name
    family = _REGISTERED.get(name) if pm is None else None
    if family is not None:
        return family
    for candidate in families(pm):
        if candidate.name == name:
            return candidate
    raise ConfigError(f"unknown model family {name!r}; known families: {', '.join(family_names(pm))}")


#: the guidance scale generation uses when none is given, unless the family's adapter declares
#: ``default_cfg`` (FLUX.1 dev: its embedded guidance, 3.5 in Forge, ComfyUI and kohya's samples)
DEFAULT_CFG = 7.0


def default_cfg(adapter: Any) -> float:
    """The adapter's ``default_cfg``, else :data:`DEFAULT_CFG`."""
    return float(getattr(adapter, "default_cfg", DEFAULT_CFG))


def guidance_input(adapter: Any) -> bool | None:
    """Whether a family's denoiser takes the training ``guidance=`` (``--guidance-scale``): the adapter's
    ``guidance_input``. True: it does (FLUX.1: dev's guidance embedding); False, the default: it has none, and
    the pre-flight notes a ``--guidance-scale`` given as without effect; None: nothing said (sdcore's SD3,
    Chroma and SD UNet families, which ignore the value without a note, as kohya's scripts do)."""
    value = getattr(adapter, "guidance_input", False)
    return None if value is None else bool(value)


def default_sampler(adapter: Any) -> str:
    """The sampler a family's model renders with when none is named: A1111's ``euler_a``, or the adapter's own
    ``default_sampler`` (FLUX.1, Chroma: the flow-matching ``euler``), for ``sdcore generate`` and training samples
    alike, so both render, and name in their infotext, the same sampler."""
    return str(getattr(adapter, "default_sampler", "euler_a"))


def family_adapter(family: str | ModelFamily, pm: SdPluginManager | None = None) -> FamilyAdapter:
    """The family's adapter: its import string resolved (a class is instantiated without arguments)."""
    spec = get_family(family, pm)
    cached = _ADAPTERS.get(spec)
    if cached is not None:
        return cached
    from ..specs import resolve

    try:
        target = resolve(spec.adapter)
        adapter = target() if isinstance(target, type) else target
    except Exception as exc:  # a plugin's import or constructor may raise anything
        raise PluginError(
            f"model family {spec.name!r}: cannot load its adapter {spec.adapter!r}: {type(exc).__name__}: {exc}"
        ) from exc
    missing = [name for name in ("detect_single_file", "load_single_file", "create_tiny", "encode_prompts", "predict")
               if not callable(getattr(adapter, name, None))]  # fmt: skip
    if missing:
        raise PluginError(f"model family {spec.name!r}: adapter {spec.adapter!r} lacks {', '.join(missing)}")
    _ADAPTERS[spec] = adapter
    return adapter  # type: ignore[no-any-return]


__all__ = [
    "BLOCK_STREAMS",
    "BUILTIN_FAMILIES",
    "DEFAULT_BLOCK_LISTS",
    "SD1",
    "SD2",
    "SDXL",
    "SDXL_REFINER",
    "BlockList",
    "FamilyAdapter",
    "LatentFormat",
    "ModelFamily",
    "RoutedInputs",
    "TextEncoderSpec",
    "families",
    "family_adapter",
    "family_names",
    "get_family",
    "guidance_input",
    "register_family",
    "reset_family_cache",
    "temporary_family",
    "text_encoder_slot",
    "using_plugin_manager",
]
