"""diffusers pipelines over a :class:`~sdcore.models.bundle.ModelBundle`, and ``generate_images``.

The pipeline is built around the bundle's own modules (no copies), so a LoRA a plugin patches
into ``bundle.unet`` or a training step that just changed the weights is what generates. The
prompt is encoded by :mod:`.conditioning` (A1111 emphasis, long prompts) and handed to the
pipeline as ``prompt_embeds``. Samplers use A1111's names and are configured from the bundle's
training noise schedule, so the prediction type (epsilon or v) always matches the model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError

if TYPE_CHECKING:
    from PIL import Image

    from ..models.bundle import ModelBundle
    from .conditioning_memo import ConditioningMemo
    from .hires import HiresFix
    from .inpaint import ImageConditioning, Inpaint, PreparedInpaint
    from .networks import NetworkRef
    from .session import NetworkSession
    from .skip_layer_guidance import SkipLayerGuidance
    from .variation import ImageNoise, VariationSeeds

# id -> (diffusers scheduler class, config overrides, A1111 display name)
SAMPLERS: dict[str, tuple[str, dict[str, Any], str]] = {
    "euler_a": ("EulerAncestralDiscreteScheduler", {}, "Euler a"),
    "euler": ("EulerDiscreteScheduler", {}, "Euler"),
    "dpm++2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}, "DPM++ 2M"),
    "dpm++2m_karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
        "DPM++ 2M Karras",
    ),
    "ddim": ("DDIMScheduler", {}, "DDIM"),
    "lms": ("LMSDiscreteScheduler", {}, "LMS"),
    "heun": ("HeunDiscreteScheduler", {}, "Heun"),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}, "PLMS"),
    # A1111's UniPC (modules/shared_options.py: variant "bh1", order 3, lower order final; data prediction,
    # "time_uniform" times ending at t = 1/N, i.e. at sigma_min, not 0), not diffusers' order-2 "bh2" defaults;
    # bh1's last step to sigma 0 would divide by zero
    "unipc": (
        "UniPCMultistepScheduler",
        {"solver_order": 3, "solver_type": "bh1", "predict_x0": True, "final_sigmas_type": "sigma_min"},
        "UniPC",
    ),
}
_ALIASES = {
    "eulera": "euler_a",
    "keulera": "euler_a",
    "keuler": "euler",
    "dpm++2m": "dpm++2m",
    "dpmpp2m": "dpm++2m",
    "dpm++2mkarras": "dpm++2m_karras",
    "dpmpp2mkarras": "dpm++2m_karras",
    "klms": "lms",
    "kheun": "heun",
    "plms": "pndm",
}


def sampler_id(name: str) -> str:
    """Normalise a sampler name (``"Euler a"``, ``"k_euler_a"``, ``"DPM++ 2M Karras"``) to an id."""
    if name in SAMPLERS:
        return name
    key = "".join(ch for ch in name.lower() if ch.isalnum() or ch == "+")
    if key in _ALIASES:
        return _ALIASES[key]
    for sid, (_, _, label) in SAMPLERS.items():
        if key == "".join(ch for ch in (sid + label).lower() if ch.isalnum() or ch == "+"):
            return sid
        if key == "".join(ch for ch in label.lower() if ch.isalnum() or ch == "+") or key == sid.replace("_", ""):
            return sid
    raise ConfigError(f"unknown sampler {name!r}; choose one of: {', '.join(SAMPLERS)}")


def sampler_label(name: str) -> str:
    """A1111's display name for a sampler (what PNG infotext says)."""
    return SAMPLERS[sampler_id(name)][2]


#: A1111 1.9+'s "Automatic" schedule type of a sampler where it is not "Uniform" (its sampler table,
#: modules/sd_samplers_kdiffusion.py, gives DPM++ 2M the option ``scheduler: karras``)
_A1111_AUTOMATIC = {"DPM++ 2M": "Karras"}
#: samplers A1111 runs on timesteps (modules/sd_samplers_timesteps.py), which ignore the schedule type
_TIMESTEP_SAMPLERS = frozenset({"ddim", "pndm", "unipc"})


def schedule_type(scheduler: Any) -> str:
    """A1111's "Schedule type" label (modules/sd_schedulers.py) for the sigmas a diffusers ``scheduler`` makes.

    Karras sigmas are "Karras". ``linspace`` spacing gives Euler, Heun and LMS ``n`` timesteps from 999
    to 0, A1111's "Uniform" (A1111 interpolates log sigma between the trained ones, diffusers sigma: a
    small difference between integer timesteps), and DPM-Solver ``linspace(999, 0, n + 1)[:-1]``,
    "SGM Uniform", as ``trailing`` spacing does for all. ``leading`` (with ``steps_offset`` 1, what
    SDXL's diffusers folder asks for) is timesteps ``1, 1 + 1000 // n, ...`` reversed: "DDIM" (the same
    sigmas when ``n`` divides 1000; otherwise A1111 takes one step more).
    """
    config = scheduler.config
    if config.get("use_karras_sigmas"):
        return "Karras"
    spacing = config.get("timestep_spacing", "linspace")
    if spacing == "leading":
        return "DDIM"
    if spacing == "trailing" or type(scheduler).__name__ == "DPMSolverMultistepScheduler":
        return "SGM Uniform"
    return "Uniform"


def schedule_type_field(bundle: ModelBundle, sampler: str, size: tuple[int, int] | None = None) -> str | None:
    """The "Schedule type" infotext field A1111 1.9+ needs to restore ``sampler``'s sigmas on ``bundle``.

    On the flow families (SD3, FLUX.1, Chroma) Forge's label where its schedule gives the very sigmas sdcore runs
    at ``size`` (the pass's width, height; :func:`~sdcore.generate.flow_samplers.forge_schedule_type`), else
    None, as without ``size``.

    None where the "Sampler" field says it all: for A1111's timestep samplers (DDIM, PLMS, UniPC), when
    the label names the schedule ("DPM++ 2M Karras": A1111 1.9+ reads the suffix as the schedule, older
    versions have the sampler), and when the schedule is the one A1111 1.9+ picks for "Automatic", which
    it assumes when the field is missing (infotext_utils.py). Plain "DPM++ 2M" needs it most: its
    Automatic is Karras there, but uniform sigmas before 1.9 and in sdcore.
    """
    if bundle.family_spec.denoiser != "unet":  # flow-matching samplers: Forge's label where it is exact
        from .flow_samplers import forge_schedule_type

        return forge_schedule_type(bundle, sampler, size) if size is not None else None
    try:
        sid = sampler_id(sampler)
        if sid in _TIMESTEP_SAMPLERS:
            return None
        found = schedule_type(make_scheduler(bundle, sid))
    except ConfigError:  # an unknown sampler, or one whose backend is missing, made no image here
        return None
    label = sampler_label(sid)
    if label.endswith(" " + found) or found == _A1111_AUTOMATIC.get(label, "Uniform"):
        return None
    return found


def make_scheduler(bundle: ModelBundle, sampler: str = "euler_a") -> Any:
    """A fresh diffusers scheduler for ``sampler`` with the bundle's noise schedule and prediction type."""
    import diffusers

    class_name, overrides, _ = SAMPLERS[sampler_id(sampler)]
    config = dict(bundle.noise_scheduler.config)
    config["prediction_type"] = bundle.prediction_type
    config.update(overrides)
    cls = getattr(diffusers, class_name)
    if cls.__module__.startswith("diffusers.utils.dummy"):  # a backend (scipy for LMS) is missing
        raise ConfigError(f"sampler {sampler!r} needs scipy, which is not installed (pip install scipy)")
    return cls.from_config(config)


def build_pipeline(bundle: ModelBundle, *, img2img: bool = False, sampler: str = "euler_a") -> Any:
    """A diffusers pipeline sharing the bundle's modules (safety checker off, no watermark)."""
    from .flow_samplers import quiet_pipeline_import

    quiet_pipeline_import()  # importing the pipelines makes transformers warn about processors never used
    import diffusers

    scheduler = make_scheduler(bundle, sampler)
    if bundle.is_sdxl:
        if bundle.family == "sdxl-refiner":
            if not img2img:
                raise ConfigError("the SDXL refiner only refines images: pass an init image (--init-image)")
            return diffusers.StableDiffusionXLImg2ImgPipeline(
                vae=bundle.vae,
                text_encoder=None,
                text_encoder_2=bundle.text_encoders[0],
                tokenizer=None,
                tokenizer_2=bundle.tokenizers[0],
                unet=bundle.unet,
                scheduler=scheduler,
                requires_aesthetics_score=True,
                force_zeros_for_empty_prompt=False,
                add_watermarker=False,
            )
        xl_cls: Any = diffusers.StableDiffusionXLImg2ImgPipeline if img2img else diffusers.StableDiffusionXLPipeline
        return xl_cls(
            vae=bundle.vae,
            text_encoder=bundle.text_encoders[0],
            text_encoder_2=bundle.text_encoders[1],
            tokenizer=bundle.tokenizers[0],
            tokenizer_2=bundle.tokenizers[1],
            unet=bundle.unet,
            scheduler=scheduler,
            force_zeros_for_empty_prompt=False,
            add_watermarker=False,
        )
    sd_cls: Any = diffusers.StableDiffusionImg2ImgPipeline if img2img else diffusers.StableDiffusionPipeline
    return sd_cls(
        vae=bundle.vae,
        text_encoder=bundle.text_encoders[0],
        tokenizer=bundle.tokenizers[0],
        unet=bundle.unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def default_size(bundle: ModelBundle) -> int:
    """512 for SD1, 768 for SD2-v, 1024 for SDXL; tiny test models generate 64x64, other small
    models (the toy world's 32x32) their native size."""
    from ..models.native import bundle_native_resolution

    if bundle.source_format == "tiny":
        return 64
    native = bundle_native_resolution(bundle) or bundle.family_spec.native_resolution
    if native < 256:
        return native
    if bundle.family == "sd2" and not bundle.is_v_prediction:
        return 512  # SD2-512-base; the family's 768 is the v-prediction release
    return bundle.family_spec.native_resolution


def init_image_size(bundle: ModelBundle, init_image: Any) -> tuple[int, int]:
    """The size ``generate_images`` works at when an init image comes without ``width``/``height``: the image's
    (upright) size rounded down to the VAE's factor (twice it on SD3, Flux and Chroma, whose tokens are 2x2 latent
    pixels, as diffusers' pipelines floor it). With only masked inpainting that is A1111's processing size,
    which its "Size" field says (the output keeps the init image's own size)."""
    image = _load_init_image(init_image)
    factor = bundle.vae_scale_factor * (1 if bundle.family_spec.denoiser == "unet" else 2)
    return image.width - image.width % factor, image.height - image.height % factor


def _check_size(value: int, what: str, factor: int) -> int:
    from .hires import MAX_SIDE

    if value <= 0 or value % factor or value > MAX_SIDE:
        raise ConfigError(f"{what} {value} must be a positive multiple of {factor}, at most {MAX_SIDE}")
    return value


@contextlib.contextmanager
def _eval_mode(bundle: ModelBundle) -> Iterator[None]:
    """Generate in eval mode (no dropout) and give training back its modes afterwards."""
    modules = list(bundle.components().values())
    modes = [module.training for module in modules]
    try:
        for module in modules:
            module.eval()
        yield
    finally:
        for module, mode in zip(modules, modes, strict=True):
            module.train(mode)


#: A1111's ``img2img_background_color`` default: what transparent parts of an img2img init image become
IMG2IMG_BACKGROUND = "#ffffff"


def _load_init_image(init_image: Any, *, flatten: bool = True) -> Image.Image:
    """The init image as RGB; a file is turned upright by its EXIF orientation first, as A1111 reads every image
    it is given (``images.fix_image``: ``ImageOps.exif_transpose``), so a phone photo is not generated on
    sideways. A PIL image is taken as it is.

    Transparency follows A1111 1.10's tab for the mode. ``flatten`` (plain img2img, the "img2img" tab): the tab
    loads the image as RGBA and ``processing`` composites it over ``img2img_background_color`` (white) with
    ``images.flatten``, so an image with an alpha band (RGBA, LA, PA) or a transparent colour (a PNG ``tRNS``)
    has white where it is transparent and a blend where half so. Without (inpainting with a mask, the "Inpaint
    upload" tab): that tab loads the image as RGB, which drops the alpha and keeps the colours under it."""
    from ..data.images import open_upright

    return _as_rgb(open_upright(init_image, "init image"), flatten)


def _as_rgb(image: Image.Image, flatten: bool) -> Image.Image:
    """``image`` in RGB; with ``flatten`` its transparent parts composited over :data:`IMG2IMG_BACKGROUND`
    (``_load_init_image``)."""
    from PIL import Image

    if not flatten or (not {"A", "a"} & set(image.getbands()) and "transparency" not in image.info):
        return image.convert("RGB")
    rgba = image.convert("RGBA")  # a palette or a single transparent colour becomes an alpha band
    background = Image.new("RGBA", rgba.size, IMG2IMG_BACKGROUND)
    return Image.composite(rgba, background, rgba.getchannel("A")).convert("RGB")


def _kontext_reference(bundle: ModelBundle, reference_image: Any, mode: str, init_image: Any, width: int | None,
                       height: int | None) -> tuple[Any, int | None, int | None]:  # fmt: skip
    """``generate_images``' reference image sized for the transformer, and the output size (the sized
    reference's where none is given; with ``mode="output"`` the size must be given)."""
    from ..models.flux.generate import KONTEXT_INIT_IMAGE
    from ..models.flux.kontext import open_reference, sized_reference

    if bundle.family != "flux":
        raise ConfigError(kontext_family_problem(bundle.family_spec.label))
    if init_image is not None:
        raise ConfigError(KONTEXT_INIT_IMAGE)
    output = (width, height) if width is not None and height is not None else None
    reference = sized_reference(open_reference(reference_image), mode, output)
    if width is None and height is None:
        width, height = reference.size
    return reference, width, height


def _flux_control(bundle: ModelBundle, control_image: Any) -> Any:
    """``generate_images``' control image, read (None without one): only FLUX.1 Depth/Canny take one, and they
    need it (one line each way). Whether a FLUX.1 model takes it is asked when its pipeline is built
    (:func:`sdcore.models.flux.generate.build_flux_pipeline`), after the prompt's networks are applied: BFL's control
    LoRAs make dev a Depth/Canny model for the call (:func:`sdcore.models.flux.control.widen_img_in`)."""
    if control_image is None:
        if is_flux_control(bundle):
            from ..models.flux.variants import require_supported

            require_supported(bundle, "generate with")  # the line naming --control-image
        return None
    if bundle.family != "flux":
        raise ConfigError(control_family_problem(bundle.family_spec.label))
    from ..models.flux.control import open_control

    return open_control(control_image)


def is_flux_control(bundle: ModelBundle) -> bool:
    """Whether ``bundle`` is FLUX.1 Depth or Canny [dev]: it needs a control image
    (:func:`sdcore.models.flux.variants.is_flux_control`)."""
    from ..models.flux.variants import is_flux_control as control

    return control(bundle)


def control_family_problem(label: str) -> str:
    """The line for a control image on a model of another family than Flux.1."""
    return (
        f"--control-image is FLUX.1 Depth/Canny [dev]'s depth map or canny edges; this is a {label} model (use "
        "FLUX.1 Depth or Canny [dev])"
    )


def kontext_family_problem(label: str) -> str:
    """The line for a reference image on a model of another family than Flux.1."""
    return (
        f"--reference-image is FLUX.1 Kontext's image to edit; this is a {label} model (use a Flux.1 model, "
        "ideally FLUX.1 Kontext [dev])"
    )


def _network_key(prompt: str) -> tuple[NetworkRef, ...]:
    from .prompt_syntax import parse_networks

    return tuple(ref for ref in parse_networks(prompt)[1])


def generate_images(
    bundle: ModelBundle,
    prompts: list[str],
    *,
    negative_prompt: str | Sequence[str] = "",
    steps: int = 20,
    cfg: float = 7.0,
    seed: int = 0,
    width: int | None = None,
    height: int | None = None,
    sampler: str | None = None,
    init_image: Any = None,
    strength: float = 0.75,
    clip_skip: int = 1,
    tiling: bool = False,
    networks: NetworkSession | None = None,
    info: list[dict[str, str]] | None = None,
    true_cfg_scale: float = 1.0,
    hires: HiresFix | None = None,
    variation: VariationSeeds | None = None,
    reference_image: Any = None,
    reference_resize: str = "kontext",
    inpaint: Inpaint | None = None,
    inpainting_mask_weight: float = 1.0,
    control_image: Any = None,
    image_conditioning: ImageConditioning | None = None,
    skip_layer_guidance: SkipLayerGuidance | None = None,
    text_encoding: Mapping[str, Any] | None = None,
) -> list[Image.Image]:
    """Generate one image per prompt; image ``i`` uses seed ``seed + i`` (A1111's batch rule).

    Prompts may carry ``<tag:name:w>`` network tags: with a ``networks`` session they are applied
    for the prompts that name them and removed afterwards (by the call's end, or by the end of the caller's
    ``networks.keeping()`` block, which lets the next call reuse them: :meth:`.session.NetworkSession.keeping`);
    without one, a tag is an error. The
    result depends only on the seed, not on the batch composition or the device's RNG state.
    ``info``, when given, is filled with one dict per image of infotext fields the handlers
    reported (``Lora hashes`` ...). ``true_cfg_scale`` > 1 runs true CFG on a guidance-distilled family
    (Flux.1), whose ``cfg`` is the distilled guidance; SD families take ``cfg`` alone. ``sampler``:
    the family's default (``euler_a``; Flux.1's ``euler``) when not given. ``init_image`` with ``strength``:
    img2img, the last ``int(min(strength, 0.999) * steps) + 1`` steps as A1111 counts them
    (:func:`.hires.img2img_steps`; a transparent image flattened onto white unless ``inpaint``). ``hires``: A1111's "Hires. fix"
    after a txt2img first pass at ``width x height`` (SD1/SD2/SDXL, and as Forge runs it on SD3/SD3.5,
    FLUX.1 and Chroma; see :mod:`.hires`). ``variation``: A1111's variation seed, strength and "Resize seed
    from" (:mod:`.variation`; with a strength above 0 every image has ``seed`` and image ``i`` the
    subseed ``subseed + i``), on every family, the hires pass and img2img included. ``tiling``: A1111's
    "Tiling", circular padding in the denoiser's and the VAE's convolutions for the call (:mod:`.tiling`).
    ``reference_image`` (a path or a PIL image; Flux.1 only): FLUX.1 Kontext's image to edit, shared by every
    prompt, sized as ``reference_resize`` says (:func:`sdcore.models.flux.kontext.sized_reference`: ``kontext``
    its preferred resolution, ``none`` its own size, ``output`` the output's); the output is the sized
    reference's size unless ``width``/``height`` are given. ``inpaint`` (with ``init_image``): A1111's inpainting
    (:mod:`.inpaint`: mask blur, masked content, whole picture or only masked, the per-step blend and the
    paste-back; an inpainting model's image conditioning) on SD1/SD2/SDXL, and FLUX.1 Fill through diffusers'
    ``FluxFillPipeline``. An inpainting model (9-channel UNet) without it runs as A1111 runs it: on a mask of
    ones and a grey masked image (txt2img) or the init image scaled by ``1 - weight`` (img2img), ``weight`` being
    ``inpainting_mask_weight`` (``inpaint``'s own when given). ``control_image`` (a path or a PIL image): FLUX.1
    Depth/Canny's preprocessed depth map or canny edges (:mod:`sdcore.models.flux.control`), shared by every prompt
    and stretched to the output size, which is its own (floored to 16) unless ``width``/``height`` or an init
    image give one; those models need it and other models refuse it. ``image_conditioning`` (an SD inpainting
    model's or FLUX.1 Fill's txt2img only): the image and mask its UNet's extra channels (Fill's transformer's
    conditioning tokens) carry instead of A1111's blank ones (:class:`.inpaint.ImageConditioning`: kohya's and
    OneTrainer's inpainting sample images), at the output size. ``skip_layer_guidance`` (SD3/SD3.5 only, CFG above
    1): Skip Layer Guidance on every pass (:mod:`.skip_layer_guidance`). ``text_encoding`` (the families with T5:
    SD3, FLUX.1, Chroma): the family adapter's ``encode_prompts`` options every pass encodes with, T5's length
    and mask and SD3's CLIP mask; a training run's samples pass its own
    (:func:`sdcore.train.method.text_encoding_options`), where ``sdcore generate``, as Forge and ComfyUI, has the
    family's defaults. FLUX.1's transformer then hides T5's padding as training does.
    """
    import torch

    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts:
        return []
    negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
    if len(negatives) != len(prompts):
        raise ConfigError(f"{len(prompts)} prompts but {len(negatives)} negative prompts")
    if steps < 1:
        raise ConfigError(f"steps must be at least 1, got {steps}")
    if init_image is not None and not 0.0 <= strength <= 1.0:  # 0: A1111's one step at the last sigma
        raise ConfigError(f"strength must be in [0, 1], got {strength}")
    if inpaint is not None:
        if init_image is None:
            raise ConfigError("a mask (--mask) repaints part of an init image: add --init-image")
        if trouble := inpaint.problems():
            raise ConfigError("; ".join(trouble))
    takes_mask = bundle.inpainting or is_flux_fill(bundle)
    if image_conditioning is not None and (init_image is not None or inpaint is not None or not takes_mask):
        raise ConfigError(
            "an image conditioning is an inpainting model's txt2img (kohya's and OneTrainer's inpainting samples): "
            + ("drop the init image and the mask" if takes_mask else "this model has no mask input")
        )
    if image_conditioning is not None and reference_image is not None and is_flux_fill(bundle):
        # FluxKontextPipeline would draw Fill's 384 / 4 channels of noise (a torch reshape error)
        raise ConfigError("FLUX.1 Fill takes no reference image (a sample's --ci, FLUX.1 Kontext's): drop it")
    if hires is not None:
        problems = hires.problems()
        if bundle.inpainting or image_conditioning is not None:
            problems.append("the hires fix does not run on inpainting models in sdcore; drop the --hr options")
        if init_image is not None:
            problems.append("the hires fix follows a txt2img pass (as in A1111); drop --init-image or the --hr options")
        if problems:
            raise ConfigError("; ".join(problems))
    from ..models.family import family_adapter

    if variation is not None and (trouble := variation.problems(bundle.vae_scale_factor)):
        raise ConfigError("; ".join(trouble))
    complete = getattr(family_adapter(bundle.family_spec), "require_complete", None)
    if complete is not None:  # a transformer-only Flux file needs its parts before anything reads the VAE
        complete(bundle)
    factor = bundle.vae_scale_factor
    reference = None
    if reference_image is not None:
        reference, width, height = _kontext_reference(bundle, reference_image, reference_resize, init_image,
                                                      width, height)  # fmt: skip
    # plain img2img flattens transparency onto white, inpainting drops it (A1111's tab for each mode)
    image = _load_init_image(init_image, flatten=inpaint is None) if init_image is not None else None
    if image is not None and width is None and height is None:
        width, height = init_image_size(bundle, image)
    control = _flux_control(bundle, control_image)
    if control is not None and width is None and height is None:
        from ..models.flux.control import control_size

        width, height = control_size(control)
    size = default_size(bundle)
    width = _check_size(width or size, "width", factor)
    height = _check_size(height or size, "height", factor)
    if image_conditioning is not None and image_conditioning.size() != (width, height):
        given = "x".join(map(str, image_conditioning.size()))
        raise ConfigError(f"the image conditioning is {given}; the output {width}x{height}: make them the same")
    prepared: PreparedInpaint | None = None
    if inpaint is not None and image is not None:
        from .inpaint import prepare

        _check_inpaint_family(bundle, control=control is not None)
        prepared = prepare(inpaint, image, width, height)
        image = prepared.image
    elif is_flux_fill(bundle) and image_conditioning is None:
        raise ConfigError(
            f"{bundle.source or 'this model'} is FLUX.1 Fill, an inpainting model: give --init-image and --mask"
        )
    if image is not None and image.size != (width, height):
        from PIL import Image as PILImage

        image = image.resize((width, height), PILImage.Resampling.LANCZOS)

    from .session import NetworkSession

    session = networks if networks is not None else NetworkSession({})
    # Networks apply to a whole pipeline call, so prompts naming the same networks share a call.
    # The hires pass has its own prompts (by default the same) and so its own networks.
    hr_prompts = [p if hires is None or hires.prompt is None else hires.prompt for p in prompts]
    hr_negatives = [n if hires is None or hires.negative_prompt is None else hires.negative_prompt for n in negatives]
    groups: dict[tuple[tuple[NetworkRef, ...], ...], list[int]] = {}
    for index, prompt in enumerate(prompts):
        groups.setdefault((_network_key(prompt), _network_key(hr_prompts[index])), []).append(index)

    from ..models.family import default_sampler, family_adapter
    from ..models.sd_unet import SdUnetAdapter

    adapter = family_adapter(bundle.family)
    if sampler is None:
        sampler = default_sampler(adapter)
    family_generate = None
    pipe: Any = None
    hr_pipe: Any = None
    hr_cfg, hr_true_cfg = _hires_guidance(adapter, hires, cfg, true_cfg_scale, hr_negatives)
    if skip_layer_guidance is not None:  # every pass's problems before the first runs
        cfgs = [(cfg, "--cfg"), *([(hr_cfg, "--hr-cfg")] if hires is not None else [])]
        skip_layer_guidance.check(bundle, *cfgs)
    first_scheduler: Any = None
    if isinstance(adapter, SdUnetAdapter):
        if true_cfg_scale != 1.0:
            raise ConfigError("--true-cfg-scale is for guidance-distilled models (Flux.1); SD models take --cfg")
        pipe = build_pipeline(bundle, img2img=image is not None, sampler=sampler)
        pipe.set_progress_bar_config(disable=True)
        first_scheduler = pipe.scheduler
        if hires is not None:
            hr_pipe = build_pipeline(bundle, img2img=True, sampler=hires.sampler or sampler)
            hr_pipe.set_progress_bar_config(disable=True)
    else:  # another family renders through its adapter (same prompts, seeds, networks and sizes)
        family_generate = getattr(adapter, "generate", None)
        if family_generate is None:
            raise ConfigError(f"generating with {bundle.family} models is not supported")
        if true_cfg_scale != 1.0 and not getattr(adapter, "distilled_guidance", False):
            # a family whose --cfg is real CFG (Chroma) would otherwise drop it in silence
            raise ConfigError(
                f"--true-cfg-scale is for guidance-distilled models (Flux.1); {bundle.family_spec.label} takes --cfg"
            )
        if hires is not None:  # the flow families' hires pass: their own pipelines from the upscaled latent
            from .flow_samplers import FLOW_SAMPLERS, flow_sampler_id

            if bundle.family_spec.denoiser == "unet":
                raise ConfigError(f"the hires fix does not run on {bundle.family} models")
            hr_sampler = flow_sampler_id(hires.sampler or sampler, bundle.family)  # before the first pass
            hr_pipe = _family_run(family_generate, hr_sampler, hr_true_cfg, skip_layer_guidance, text_encoding)
            first_scheduler = FLOW_SAMPLERS[flow_sampler_id(sampler, bundle.family)]  # its order counts steps
    if hires is not None:  # an empty latent fails in torch after the first pass: say it first
        from .hires import FLOW_PATCH, MAX_SIDE

        unit = factor * (1 if family_generate is None else FLOW_PATCH)
        final_x, final_y = hires.final_size(width, height, unit)
        if max(final_x, final_y) > MAX_SIDE:
            raise ConfigError(
                f"the hires fix of a {width}x{height} image makes a {final_x}x{final_y} image; sdcore makes sides "
                f"of at most {MAX_SIDE}: lower --hr-scale or --hr-resize-x/-y"
            )
        if final_x <= 0 or final_y <= 0:
            how = (
                f"by {hires.scale} (--hr-scale)"
                if hires.resize_x == 0 and hires.resize_y == 0
                else f"to {hires.resize_x}x{hires.resize_y} (--hr-resize-x/-y)"
            )
            raise ConfigError(
                f"the hires fix of a {width}x{height} image {how} makes a {final_x}x{final_y} image: "
                f"{bundle.family} image sides come in {unit}-pixel units; make the hires size larger"
            )
    results: dict[int, Image.Image] = {}
    transforms = [h for h in session.handlers() if hasattr(h, "transform_conditioning")]
    second_pass: Any = _hires_run if family_generate is None else _flow_hires_run
    from .rng import float32_noise
    from .tiling import tiling as _tiling
    from .variation import ImageNoise, VariationSeeds

    all_seeds, all_subseeds = (variation or VariationSeeds()).batch(seed, len(prompts))
    kontext = {"reference": reference} if reference is not None else {}  # only a Kontext call sees the key
    if control is not None:  # only a Depth/Canny call sees the key
        kontext["control"] = control
    masked: dict[str, Any] = {}  # only an inpainting call sees the key
    if prepared is not None:
        masked["inpaint"] = prepared
    elif bundle.inpainting:
        masked["mask_weight"] = inpainting_mask_weight
    if image_conditioning is not None:
        masked["conditioning_image"] = image_conditioning
    # every noise drawn in float32 on the CPU generators, then the model's dtype (A1111's numbers: .rng)
    # networks stay applied from one group (or pass) to the next while the same ones are wanted, and are undone
    # when the call ends unless the caller holds its own ``session.keeping()``
    with _eval_mode(bundle), torch.no_grad(), _tiling(bundle, tiling), float32_noise(), session.keeping():
        for indices in groups.values():
            group_info: dict[str, str] = {}

            hr_same = all(hr_prompts[i] == prompts[i] and hr_negatives[i] == negatives[i] for i in indices)
            group_seeds = [all_seeds[i] for i in indices]
            varied: dict[str, Any] = {}  # the family functions see `noise` only with a variation
            if variation is not None:
                varied["noise"] = ImageNoise.of(variation, group_seeds, [all_subseeds[i] for i in indices], factor)
            hires_settings: dict[str, Any] = {
                "seeds": group_seeds,
                "first_steps": steps,
                "first_scheduler": first_scheduler,
                "cfg": hr_cfg,
                "width": width,
                "height": height,
                "clip_skip": clip_skip,
                "transforms": transforms,
                **varied,
                **kontext,
            }
            with contextlib.ExitStack() as stack:
                pairs = [(prompts[i], negatives[i]) for i in indices]
                group_prompts, group_negatives = _apply_networks(stack, session, bundle, pairs, group_info)
                run: Any = (
                    _run
                    if family_generate is None
                    else _family_run(family_generate, sampler, true_cfg_scale, skip_layer_guidance, text_encoding)
                )
                images = run(
                    pipe,
                    bundle,
                    group_prompts,
                    group_negatives,
                    transforms=transforms,
                    seeds=group_seeds,
                    steps=steps,
                    cfg=cfg,
                    width=width,
                    height=height,
                    image=image,
                    strength=strength,
                    clip_skip=clip_skip,
                    **varied,
                    **kontext,
                    **masked,
                    **({"output_type": "latent"} if hires is not None else {}),
                )
                if hires is not None and hr_same:  # the same networks stay on for the second pass
                    images = second_pass(
                        hr_pipe, bundle, group_prompts, group_negatives, images, hires, **hires_settings
                    )
            if hires is not None and not hr_same:
                with contextlib.ExitStack() as stack:
                    pairs = [(hr_prompts[i], hr_negatives[i]) for i in indices]
                    group_prompts, group_negatives = _apply_networks(stack, session, bundle, pairs, group_info)
                    images = second_pass(
                        hr_pipe, bundle, group_prompts, group_negatives, images, hires, **hires_settings
                    )
            for i, generated in zip(indices, images, strict=True):
                results[i] = generated
                if info is not None:
                    while len(info) <= i:
                        info.append({})
                    info[i] = dict(group_info)
    return [results[i] for i in range(len(prompts))]


def record_encodings(
    memo: ConditioningMemo, scope: Any, bundle: ModelBundle, prompts: list[str], **settings: Any
) -> None:
    """Encode what ``generate_images(bundle, prompts, **settings)`` would encode, into ``memo`` under ``scope``,
    and nothing more: the generation stops once its texts are encoded, before the first denoiser call
    (:meth:`~sdcore.generate.conditioning_memo.ConditioningMemo.recording`). A later ``generate_images``
    with the same arguments inside ``memo.replaying(scope)`` then needs no text encoder."""
    with memo.recording(scope, bundle.denoiser):
        generate_images(bundle, prompts, **settings)


def _apply_networks(
    stack: contextlib.ExitStack,
    session: NetworkSession,
    bundle: ModelBundle,
    pairs: list[tuple[str, str]],
    info: dict[str, str],
) -> tuple[list[str], list[str]]:
    """Enter the networks and embeddings of one group's (prompt, negative) ``pairs``; their rewritten texts
    (the handlers' infotext fields are added to ``info``)."""
    prompts: list[str] = []
    negatives: list[str] = []
    for position, (prompt, negative) in enumerate(pairs):
        # The first prompt activates the group's networks; the others only let the
        # untagged handlers (embeddings) rewrite their text.
        applied = stack.enter_context(session.apply(bundle, prompt, negative, networks=position == 0))
        prompts.append(applied.prompt)
        negatives.append(applied.negative_prompt)
        for key, value in applied.info.items():
            info.setdefault(key, value)
    return prompts, negatives


def _hires_guidance(
    adapter: Any, hires: HiresFix | None, cfg: float, true_cfg_scale: float, negatives: Sequence[str] = ()
) -> tuple[float, float]:
    """``(cfg, true_cfg_scale)`` of the hires pass: Forge's "Hires CFG Scale" is the pass's real CFG (FLUX.1's
    true CFG), its "Hires Distilled CFG Scale" FLUX.1's embedded guidance (sdcore's ``cfg`` there); each
    unset one is the first pass's, as Forge's UI starts its sliders at the first pass's defaults.

    ``negatives``: the hires pass's negative prompts. On FLUX.1 a negative needs true CFG there too (the first
    pass's rule, :func:`sdcore.models.flux.generate.check_true_cfg`); checked here, before the first pass runs,
    naming ``--hr-cfg``."""
    if hires is None:
        return cfg, true_cfg_scale
    if not getattr(adapter, "distilled_guidance", False):
        if hires.distilled_cfg is not None:
            raise ConfigError(
                "--hr-distilled-cfg is for guidance-distilled models (FLUX.1); this model's hires CFG is --hr-cfg"
            )
        return (cfg if hires.cfg is None else hires.cfg), true_cfg_scale
    if hires.cfg is not None and hires.cfg < 1.0:
        raise ConfigError(f"--hr-cfg of a FLUX.1 model is its true CFG scale, at least 1; got {hires.cfg}")
    hr_true_cfg = true_cfg_scale if hires.cfg is None else hires.cfg
    # (both inherited, the first pass's own check says it first: its negatives are these)
    if hr_true_cfg == 1.0 and (hires.cfg is not None or hires.negative_prompt is not None):
        from .prompt_syntax import parse_networks

        if any(parse_networks(negative)[0].strip() for negative in negatives):
            raise ConfigError(
                "a negative prompt in the hires pass on FLUX.1 needs true CFG there: --hr-cfg above 1 (its default "
                "is --true-cfg-scale), or an empty hires negative (--hr-negative '')"
            )
    return (cfg if hires.distilled_cfg is None else hires.distilled_cfg), hr_true_cfg


def _family_run(family_generate: Any, sampler: str, true_cfg_scale: float = 1.0,
                skip_layer_guidance: SkipLayerGuidance | None = None,
                text_encoding: Mapping[str, Any] | None = None) -> Any:  # fmt: skip
    """``_run``'s signature over a family adapter's ``generate(bundle, prompts, negatives, **settings)``
    (``true_cfg_scale``, ``skip_layer_guidance`` and ``text_encoding`` only when set, so a family without them
    never sees them unasked)."""

    def run(_pipe: Any, bundle: ModelBundle, prompts: list[str], negatives: list[str], **settings: Any) -> Any:
        settings.pop("transforms", None)
        if true_cfg_scale != 1.0:
            settings["true_cfg_scale"] = true_cfg_scale
        if skip_layer_guidance is not None:
            settings["skip_layer_guidance"] = skip_layer_guidance
        if text_encoding:
            settings["text_encoding"] = dict(text_encoding)
        out = family_generate(bundle, prompts, negatives, sampler=sampler, **settings)
        return out if settings.get("output_type") == "latent" else list(out)  # latents: one [B, C, h, w] tensor

    return run


def _run(
    pipe: Any,
    bundle: ModelBundle,
    prompts: list[str],
    negatives: list[str],
    *,
    seeds: list[int],
    steps: int,
    cfg: float,
    width: int,
    height: int,
    image: Any,
    strength: float,
    clip_skip: int,
    transforms: list[Any] = (),  # type: ignore[assignment]
    output_type: str = "pil",
    noise: ImageNoise | None = None,
    inpaint: PreparedInpaint | None = None,
    mask_weight: float = 1.0,
    conditioning_image: ImageConditioning | None = None,
) -> Any:
    """One txt2img/img2img pipeline call; PIL images, or the batch's latents with ``output_type="latent"``;
    ``noise``: the images' variation seeds (:mod:`.variation`). ``inpaint``: A1111's inpainting of ``image``
    (:mod:`.inpaint`); ``mask_weight``: an inpainting model's conditioning mask strength without one;
    ``conditioning_image``: its txt2img's own image conditioning."""
    import torch

    from .prompt_editing import StepPrompts, schedule_steps
    from .step_conditioning import StepConditioning
    from .variation import maybe_swapped

    # A1111 prompt editing, alternation and AND: one encoding per point where a text changes
    edits = StepPrompts.build(prompts, negatives, schedule_steps(steps, pipe.scheduler))
    per_call = StepConditioning(edits, _encoder(bundle, clip_skip, transforms))
    cond, uncond = per_call.first_parts(0)
    generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
    kwargs: dict[str, Any] = {
        "prompt_embeds": cond.embeds,
        "negative_prompt_embeds": uncond.embeds,
        "num_inference_steps": steps,
        "guidance_scale": cfg,
        "generator": generators,
        "output_type": output_type,
    }
    if bundle.is_sdxl:
        kwargs["pooled_prompt_embeds"] = cond.pooled
        kwargs["negative_pooled_prompt_embeds"] = uncond.pooled
    if image is not None:
        from .hires import img2img_steps, pipeline_strength

        # A1111's count: the last int(min(strength, 0.999) * steps) + 1 steps of the `steps`-step schedule
        schedule, run = img2img_steps(steps, strength)
        kwargs["num_inference_steps"] = schedule
        kwargs["strength"] = pipeline_strength(schedule, run)
        if inpaint is None:
            # the init latent as the inpaint and hires paths make it (the posterior's mean; A1111 samples it from
            # its unseeded global RNG), one per prompt: the pipeline's noise is then each seed's first draw, as
            # A1111's is (diffusers would sample the posterior from the seed's generator first)
            start = _encode_images(pipe, [image]).to(dtype=bundle.denoiser.dtype)
            kwargs["image"] = start.repeat(len(prompts), 1, 1, 1)
    else:
        kwargs["width"] = width
        kwargs["height"] = height
    if bundle.is_sdxl and bundle.family != "sdxl-refiner":
        kwargs["original_size"] = (height, width)
        kwargs["target_size"] = (height, width)
    factor = bundle.vae_scale_factor
    channels = int(bundle.vae.config.latent_channels)  # an inpainting UNet takes 5 more: not drawn
    if noise is not None and image is None:  # the pipeline scales it by init_noise_sigma, as its own draw
        shape = (channels, height // factor, width // factor)
        kwargs["latents"] = noise.initial(shape, cond.embeds.dtype, generators)
    elif image is None and bundle.inpainting:  # the pipeline would draw in_channels (9): the same draw at 4
        from .rng import randn_float32

        shape4 = (len(seeds), channels, height // factor, width // factor)
        fresh = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
        kwargs["latents"] = randn_float32(shape4, generator=fresh, device=torch.device("cpu"), dtype=cond.embeds.dtype)
    masking: dict[str, Any] = {}
    if inpaint is not None:
        starts, init_latent, nmask = inpaint_latents(pipe, inpaint, seeds)
        kwargs["image"] = starts.to(dtype=bundle.denoiser.dtype)
        masking = {"init_latent": init_latent, "nmask": nmask}
        kwargs["output_type"] = "latent"  # the last blend, then the decode and the paste-back
    if bundle.inpainting:
        masking["conditioning"] = _image_conditioning(pipe, bundle, inpaint, image, width, height, mask_weight,
                                                      conditioning_image)  # fmt: skip
    img2img_noise = noise if image is not None else None
    with (
        per_call.installed(pipe.unet, pooled=bundle.is_sdxl),
        maybe_swapped(img2img_noise, pipe.scheduler),
        _unet_inpainting(pipe, bundle, masking),
    ):
        output = pipe(**kwargs)
    if inpaint is None:
        return output.images if output_type == "latent" else list(output.images)
    from .inpaint import blend

    latents = blend(output.images.float(), masking["init_latent"], masking["nmask"]).to(output.images.dtype)
    if output_type == "latent":
        return latents
    return [inpaint.paste_back(im) for im in decode_latents(pipe, latents, "pil")]


def _unet_inpainting(pipe: Any, bundle: ModelBundle, masking: dict[str, Any]) -> Any:
    """:func:`.inpaint.unet_inpainting` on the pipeline's UNet (nothing without an inpainting)."""
    if not masking:
        return contextlib.nullcontext()
    from .inpaint import unet_inpainting

    return unet_inpainting(pipe.unet, pipe.scheduler, prediction=bundle.prediction_type, **masking)


def inpaint_latents(pipe: Any, inpaint: PreparedInpaint, seeds: list[int]) -> tuple[Any, Any, Any]:
    """``(starts, init_latent, nmask)`` of A1111's ``init`` for an inpainting: the img2img pipeline's start latents
    (float32 ``[B, C, h, w]``, one per seed: A1111's "latent noise" is the seed's noise, the noise the pipeline
    draws from the same seed), the blend's init latent (the posterior's mean, ``[1, C, h, w]``) and its latent
    mask (``[1, 1, h, w]``, 1 repaints). ``pipe``: anything with a pipeline's ``vae``."""
    import torch

    from .inpaint import fill_latents
    from .rng import randn_float32

    init = _encode_pixels(pipe, inpaint.pixels()).float()
    height, width = init.shape[-2:]
    nmask = torch.from_numpy(inpaint.latent_mask(width, height)).to(init.device)[None, None]
    starts = []
    for seed in seeds:
        noise = None
        if inpaint.settings.fill == "latent noise":
            generator = torch.Generator(device="cpu").manual_seed(int(seed))
            noise = randn_float32(tuple(init.shape), generator=generator, device=torch.device("cpu"),
                                  dtype=torch.float32).to(init.device)  # fmt: skip
        starts.append(fill_latents(init, nmask, inpaint.settings.fill, noise))
    return torch.cat(starts), init, nmask


def _image_conditioning(pipe: Any, bundle: ModelBundle, inpaint: PreparedInpaint | None, image: Any, width: int,
                        height: int, weight: float, given: ImageConditioning | None = None) -> Any:  # fmt: skip
    """An inpainting model's extra UNet channels ``[1, 5, h, w]`` (A1111's ``c_concat``): the mask (rounded,
    nearest-resized to the latent) and the latent of the masked image; without a mask the mask is ones and the
    image the init image times ``1 - weight`` (img2img) or mid-grey (txt2img), unless a txt2img is ``given`` its
    own (kohya's and OneTrainer's inpainting samples, each mask by its tool's rule: :class:`.inpaint.ImageConditioning`)."""
    import numpy as np
    import torch

    if inpaint is not None:
        pixels, mask = inpaint.conditioning_pixels(), inpaint.conditioning_mask()
    elif given is not None:
        pixels, mask = given.conditioning_pixels(), given.binary_mask()
    elif image is not None:  # lerp(x, x * (1 - 1), weight)
        array = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)
        pixels = (array.permute(2, 0, 1)[None] * 2.0 - 1.0) * (1.0 - weight)
        mask = torch.ones(1, 1, height, width)
    else:
        pixels, mask = torch.zeros(1, 3, height, width), torch.ones(1, 1, height, width)
    latent = _encode_pixels(pipe, pixels).float()
    if inpaint is None and given is not None:  # kohya's or OneTrainer's rule
        small = given.latent_mask(*latent.shape[-2:]).to(latent.device)
    else:
        small = torch.nn.functional.interpolate(mask.to(latent.device), size=latent.shape[-2:])
    return torch.cat([small, latent], dim=1)


#: why a mask and a FLUX.1 Depth/Canny control image do not go together (said before the model loads too)
MASK_WITH_CONTROL = "--mask with --control-image: sdcore does not inpaint with FLUX.1 Depth/Canny; drop one"


def _check_inpaint_family(bundle: ModelBundle, *, control: bool = False) -> None:
    """A mask runs on the families that inpaint (:attr:`~sdcore.models.family.ModelFamily.inpaints`: SD1/SD2/SDXL,
    regular or inpainting, SD3, FLUX.1 and Chroma), not beside a Depth/Canny control image (a Kontext reference
    takes no init image, so no mask either); one line otherwise."""
    if not bundle.family_spec.inpaints:
        raise ConfigError(mask_family_problem(bundle.family_spec.label))
    if control:
        raise ConfigError(MASK_WITH_CONTROL)


def mask_family_problem(label: str) -> str:
    """The line for a mask on a model that does not inpaint in sdcore."""
    return (
        "--mask inpaints with SD1/SD2/SDXL (regular or inpainting), SD3/SD3.5, FLUX.1 and Chroma models; "
        f"this is a {label} model"
    )


def is_flux_fill(bundle: ModelBundle) -> bool:
    """Whether ``bundle`` is FLUX.1 Fill (``img_in`` 384 wide): it needs an init image and a mask."""
    if bundle.family != "flux" or bundle.transformer is None:
        return False
    from ..models.flux.variants import bundle_variant

    return bundle_variant(bundle) == "fill"


def _encoder(bundle: ModelBundle, clip_skip: int, transforms: Sequence[Any]) -> Any:
    """``encode(texts, negative_texts) -> (cond, uncond)`` with the handlers' conditioning rewrites."""
    from .conditioning import encode_cond_uncond

    def encode(texts: list[str], negative_texts: list[str]) -> tuple[Any, Any]:
        cond, uncond = encode_cond_uncond(bundle, texts, negative_texts, clip_skip=clip_skip)
        for handler in transforms:  # e.g. aesthetic gradients: per-prompt conditioning rewrites
            cond = _transform_rows(handler, bundle, texts, cond, negative=False, clip_skip=clip_skip)
            uncond = _transform_rows(handler, bundle, negative_texts, uncond, negative=True, clip_skip=clip_skip)
        return cond, uncond

    return encode


@contextlib.contextmanager
def _vae_for_coding(vae: Any) -> Iterator[Any]:
    """The VAE in float32 while it codes when fp16 overflows it (``force_upcast``, as the SDXL pipelines do)."""
    import torch

    dtype = vae.dtype
    upcast = dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False))
    if upcast:
        vae.to(dtype=torch.float32)
    try:
        yield vae
    finally:
        if upcast:
            vae.to(dtype=dtype)


def decode_latents(pipe: Any, latents: Any, output_type: str) -> Any:
    """The pipeline's own decode (scaling, ``latents_mean``/``std`` or ``shift_factor`` where the VAE has them,
    postprocess); ``pipe``: anything with the ``vae`` and ``image_processor`` a pipeline has."""
    import torch

    with _vae_for_coding(pipe.vae) as vae:
        config = vae.config
        latents = latents.to(device=vae.device, dtype=vae.dtype)
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if mean is not None and std is not None:
            shape = (1, latents.shape[1], 1, 1)
            mean_t = torch.tensor(mean).view(shape).to(latents)
            std_t = torch.tensor(std).view(shape).to(latents)
            latents = latents * std_t / config.scaling_factor + mean_t
        else:
            latents = latents / config.scaling_factor
            if getattr(config, "shift_factor", None) is not None:  # SD3, Flux, Chroma (their pipelines' decode)
                latents = latents + config.shift_factor
        decoded = vae.decode(latents, return_dict=False)[0]
    return pipe.image_processor.postprocess(decoded, output_type=output_type)


def _encode_images(pipe: Any, images: Sequence[Image.Image]) -> Any:
    """Images (any size: the VAE floors it to its factor, as in A1111) to scaled latents: the posterior's mean."""
    import numpy as np
    import torch

    pixels = torch.from_numpy(np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images]))
    return _encode_pixels(pipe, pixels.permute(0, 3, 1, 2) * 2.0 - 1.0)


def _encode_pixels(pipe: Any, pixels: Any) -> Any:
    """Pixels in [-1, 1] (``[B, 3, H, W]``) to scaled latents: the posterior's mean."""
    import torch

    with _vae_for_coding(pipe.vae) as vae:
        config = vae.config
        latents = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist.mean
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if mean is not None and std is not None:
            shape = (1, latents.shape[1], 1, 1)
            mean_t = torch.tensor(mean).view(shape).to(latents)
            std_t = torch.tensor(std).view(shape).to(latents)
            latents = (latents - mean_t) * config.scaling_factor / std_t
        else:
            if getattr(config, "shift_factor", None) is not None:
                latents = latents - config.shift_factor
            latents = latents * config.scaling_factor
    return latents


@contextlib.contextmanager
def posterior_mean(vae: Any) -> Iterator[None]:
    """While inside, a sample of ``vae.encode``'s posterior is its mean and draws nothing from the generator.

    diffusers' flow img2img pipelines (SD3, FLUX.1, Chroma) encode the init image themselves, sampling the
    posterior from each seed's generator before drawing the start noise from it. Inside, their init latent is the
    posterior's mean, as sdcore's SD img2img encodes it (:func:`_encode_pixels`), and their start noise each seed's
    first draw, as A1111/Forge's ``rng.next()`` is (Forge ``StableDiffusionProcessingImg2Img.sample``)."""
    original = vae.encode
    own = vars(vae).get("encode")  # an instance's own encode (another wrapper), put back on leaving

    def encode(*args: Any, **kwargs: Any) -> Any:
        output = original(*args, **kwargs)
        posterior = output.latent_dist if hasattr(output, "latent_dist") else output[0]
        posterior.sample = lambda generator=None: posterior.mean
        return output

    vae.encode = encode
    try:
        yield
    finally:
        if own is None:
            del vae.encode  # the class's method again
        else:
            vae.encode = own


def _hires_run(
    pipe: Any,
    bundle: ModelBundle,
    prompts: list[str],
    negatives: list[str],
    latents: Any,
    hires: HiresFix,
    *,
    seeds: list[int],
    first_steps: int,
    first_scheduler: Any = None,
    cfg: float,
    width: int,
    height: int,
    clip_skip: int,
    transforms: Sequence[Any] = (),
    noise: ImageNoise | None = None,
) -> list[Image.Image]:
    """A1111's second pass over the first pass's ``latents`` (see :mod:`.hires` for what each step follows);
    ``noise``: the variation seeds, applied to its start noise at the large shape as A1111 does."""
    import torch

    from .hires import pipeline_strength
    from .prompt_editing import StepPrompts, schedule_steps
    from .step_conditioning import StepConditioning
    from .variation import maybe_swapped

    factor = bundle.vae_scale_factor
    to_x, to_y = hires.target(width, height, factor)[:2]
    latents = _upscaled(pipe, latents, hires, width, height, factor)
    schedule, run = hires.schedule(first_steps)
    if run == 0:  # strength 0: A1111's sampler gets a one-sigma schedule and returns its input
        return list(decode_latents(pipe, latents, "pil"))
    # the second pass's prompt editing counts on from the first pass (A1111's hires offsets)
    # (both counted as A1111 does: twice the steps for a second-order sampler)
    edits = StepPrompts.build(
        prompts,
        negatives,
        schedule_steps(run, pipe.scheduler),
        first_steps=schedule_steps(first_steps, first_scheduler),
    )
    per_call = StepConditioning(edits, _encoder(bundle, clip_skip, transforms))
    cond, uncond = per_call.first_parts(0)
    kwargs: dict[str, Any] = {
        "prompt_embeds": cond.embeds,
        "negative_prompt_embeds": uncond.embeds,
        "image": latents.to(device=bundle.device, dtype=bundle.denoiser.dtype),
        # the pipeline runs exactly `run` steps, the last ones of the schedule
        "num_inference_steps": schedule,
        "strength": pipeline_strength(schedule, run),
        "guidance_scale": cfg,
        # fresh noise from each image's seed at the large latent's shape, as A1111 draws it
        "generator": [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds],
        "output_type": "pil",
    }
    if bundle.is_sdxl:
        kwargs["pooled_prompt_embeds"] = cond.pooled
        kwargs["negative_pooled_prompt_embeds"] = uncond.pooled
        kwargs["original_size"] = (to_y, to_x)  # A1111's SDXL conditioning of the hires pass
        kwargs["target_size"] = (to_y, to_x)
    with per_call.installed(pipe.unet, pooled=bundle.is_sdxl), maybe_swapped(noise, pipe.scheduler):
        output = pipe(**kwargs)
    return list(output.images)


def _upscaled(pipe: Any, latents: Any, hires: HiresFix, width: int, height: int, factor: int, patch: int = 1) -> Any:
    """The first pass's ``latents`` upscaled and cropped to the second pass's (A1111's rules, :mod:`.hires`);
    ``pipe``: its ``vae`` and ``image_processor`` code the image upscalers'; ``patch``: see :func:`.hires.crop_latents`."""
    import numpy as np
    from PIL import Image as PILImage

    from .hires import crop_latents, upscale_image, upscale_latents

    to_x, to_y, truncate_x, truncate_y = hires.target(width, height, factor * patch)
    if hires.latent_mode is not None:
        latents = upscale_latents(latents.float(), to_x, to_y, hires.upscaler, factor, patch)
    else:  # decode, upscale the 8-bit image (A1111 truncates to uint8), encode again
        pixels = decode_latents(pipe, latents, "np")
        small = [PILImage.fromarray((255.0 * p).astype(np.uint8)) for p in pixels]
        latents = _encode_images(pipe, [upscale_image(im, to_x, to_y, hires.upscaler) for im in small])
    return crop_latents(latents, truncate_x, truncate_y, patch)


def _flow_hires_run(
    second: Any,
    bundle: ModelBundle,
    prompts: list[str],
    negatives: list[str],
    latents: Any,
    hires: HiresFix,
    *,
    seeds: list[int],
    first_steps: int,
    first_scheduler: Any = None,
    cfg: float,
    width: int,
    height: int,
    clip_skip: int,
    transforms: Sequence[Any] = (),
    noise: ImageNoise | None = None,
    reference: Any = None,
    control: Any = None,
) -> list[Image.Image]:
    """The hires pass of a flow family (SD3, Flux.1, Chroma): A1111's upscale of the first pass's unpacked
    ``latents`` to even latent sides, then ``second`` (:func:`_family_run` over the family's ``generate``)
    runs the last steps from it (:class:`.hires.FlowStart`; see :mod:`.hires` for how Forge's rules map)."""
    import types

    from diffusers.image_processor import VaeImageProcessor

    from .hires import FLOW_PATCH, FlowStart
    from .prompt_editing import schedule_steps

    factor = bundle.vae_scale_factor
    coder = types.SimpleNamespace(vae=bundle.vae, image_processor=VaeImageProcessor(vae_scale_factor=factor))
    latents = _upscaled(coder, latents, hires, width, height, factor, FLOW_PATCH)
    schedule, run = hires.schedule(first_steps)
    if run == 0:  # strength 0: the upscaled latent as it is (Forge's sampler gets no step to run)
        return list(decode_latents(coder, latents, "pil"))
    start = FlowStart(
        latents.to(device=bundle.device, dtype=bundle.denoiser.dtype),
        schedule,
        run,
        schedule_steps(first_steps, first_scheduler),
    )
    size = {"width": latents.shape[-1] * factor, "height": latents.shape[-2] * factor}
    settings = {"seeds": seeds, "steps": run, "cfg": cfg, "image": None, "clip_skip": clip_skip}
    if noise is not None:
        settings["noise"] = noise
    if reference is not None:  # FLUX.1 Kontext: the same reference as the first pass (ComfyUI's conditioning)
        settings["reference"] = reference
    if control is not None:  # FLUX.1 Depth/Canny: the same control image, stretched to the large size
        settings["control"] = control
    return list(second(None, bundle, prompts, negatives, **size, **settings, hires_start=start))


def _transform_rows(
    handler: Any, bundle: ModelBundle, texts: list[str], cond: Any, *, negative: bool, clip_skip: int
) -> Any:
    """Apply ``handler.transform_conditioning`` to each prompt's row of a batched conditioning."""
    import dataclasses

    import torch

    rows = []
    for index, text in enumerate(texts):
        one = dataclasses.replace(
            cond,
            embeds=cond.embeds[index : index + 1],
            pooled=None if cond.pooled is None else cond.pooled[index : index + 1],
        )
        rows.append(handler.transform_conditioning(bundle, text, one, negative=negative, clip_skip=clip_skip))
    return dataclasses.replace(
        cond,
        embeds=torch.cat([r.embeds for r in rows]),
        pooled=None if cond.pooled is None else torch.cat([r.pooled for r in rows]),
    )


__all__ = [
    "MASK_WITH_CONTROL",
    "SAMPLERS",
    "build_pipeline",
    "control_family_problem",
    "decode_latents",
    "default_size",
    "generate_images",
    "init_image_size",
    "inpaint_latents",
    "is_flux_control",
    "is_flux_fill",
    "make_scheduler",
    "mask_family_problem",
    "record_encodings",
    "sampler_id",
    "sampler_label",
    "schedule_type",
    "schedule_type_field",
]
