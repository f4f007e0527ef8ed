"""Sample images during training: ``--sample-prompts`` (one prompt or a kohya-style prompt file,
see :mod:`.sample_prompts`) rendered every ``--sample-every`` steps / ``--sample-every-epochs`` epochs
(and once at the end), with A1111 infotext in the PNGs (:mod:`.sample_info`), written twice:

- one PNG per prompt, named and placed as kohya sd-scripts names its samples (:func:`kohya_sample_name`,
  ``sample/`` beside the result), each with its own infotext as ``sdcore generate`` writes it, so A1111's
  PNG Info or ``sdcore generate --from-png`` renders it again;
- the grid of every prompt as ``<result stem>-samples/<tag>.png`` (sdcore's earlier and only output, kept
  for those who read it).

Neither overwrites a file already there (a resumed run rendering a step again): :func:`sdcore.io.free_path`.
With cached text-encoder outputs the sample prompts are encoded once at caching time
(:func:`encode_sample_prompts`) and renders leave the text encoders on the CPU."""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..io import free_path
from .method import TrainingMethod, text_encoding_options
from .options import TrainOptions

if TYPE_CHECKING:
    from collections.abc import Iterator

    from ..generate.conditioning_memo import ConditioningMemo, PartMemo
    from ..models.bundle import ModelBundle
    from .sample_prompts import SamplePrompt

log = logging.getLogger("sdcore.train")

#: the folder beside the result where kohya writes its sample images (sd-scripts 48d368f
#: library/train_util.py:6438, ``save_dir = args.output_dir + "/sample"``)
KOHYA_SAMPLE_FOLDER = "sample"


def kohya_sample_name(
    output_name: str | None, *, step: int, epoch: int | None, index: int, seed: int | None, when: time.struct_time
) -> str:
    """The file name kohya gives a sample image (sd-scripts 48d368f library/train_util.py:6572-6576,
    ``sample_image_inference``): ``<output_name>_<e + epoch (6 digits) | step (6 digits)>_<index (2 digits)>_
    <local time YYYYmmddHHMMSS>[_<seed>].png``. ``epoch`` is kohya's: given for the renders at an epoch's end
    (the epoch just ended) and for ``--sample_at_first`` (0), None for the step renders; ``index`` is the
    prompt's place in the file (from 0); ``seed`` is the prompt's own (``--d``), kohya writes none without one."""
    prefix = "" if output_name is None else f"{output_name}_"
    number = f"e{epoch:06d}" if epoch is not None else f"{step:06d}"
    suffix = "" if seed is None else f"_{seed}"
    return f"{prefix}{number}_{index:02d}_{time.strftime('%Y%m%d%H%M%S', when)}{suffix}.png"


def _clock() -> time.struct_time:
    """The local time a sample's kohya name carries (kohya's ``time.localtime()``; a test fixes it)."""
    return time.localtime()


def sample_prompt_list(options: TrainOptions, family: str | None = None) -> list[SamplePrompt]:
    """``--sample-prompts`` parsed for a ``family`` model; options a prompt line sets that sdcore does not use are
    warned about."""
    from .sample_prompts import read_sample_prompts

    prompts = read_sample_prompts(options.sample_prompts or "", family)
    for ignored in sorted({option for p in prompts for option in p.ignored}):
        log.warning("sample prompts: option %s is not used by sdcore (left out of the prompt)", ignored)
    return prompts


def sample_resolution(options: TrainOptions) -> int:
    """The side of a sample whose prompt gives no ``--w``/``--h``: ``--sample-resolution`` (a run written in
    kohya's names: kohya's 512, :data:`sdcore.train.kohya.KOHYA_DEFAULTS`), else ``--resolution``."""
    return options.sample_resolution if options.sample_resolution is not None else options.resolution


def _generations(
    bundle: ModelBundle, options: TrainOptions, prompts: list[SamplePrompt], extra: dict[str, Any]
) -> tuple[list[tuple[list[SamplePrompt], int]], dict[str, Any], list[tuple[list[str], dict[str, Any]]]]:
    """The render's ``generate_images`` calls: ``(calls, defaults, [(prompts, keyword arguments)])``; the
    caching pass (:func:`encode_sample_prompts`) and every render make the same calls from it."""
    from ..generate.inpaint import FILL_GUIDANCE, blank_conditioning
    from ..models.family import default_cfg, default_sampler, family_adapter
    from ..models.flux.variants import is_flux_control
    from .inpainting import bundle_kind, renders_on_blank
    from .sample_prompts import (
        generation_arguments,
        generation_calls,
        inpaint_conditioning,
        onetrainer_inpaint_conditioning,
        sample_size,
    )

    adapter = family_adapter(bundle.family_spec)
    distilled = bool(getattr(adapter, "distilled_guidance", False))
    o = options
    kind = bundle_kind(bundle)
    # a control-LoRA run's transformer, widened for the run: each sample renders on its line's --cn
    control = is_flux_control(bundle)
    side = sample_resolution(o)
    defaults = {
        "steps": o.sample_steps,
        "width": side,
        "height": side,
        # the family's own, as sdcore generate's (FLUX.1: the flow-matching Euler), so the infotext names what ran
        "sampler": o.sample_sampler or default_sampler(adapter),
        # --sample-cfg (a kohya run: kohya's), else FLUX.1 Fill's own default guidance (BFL's, diffusers', sdcore
        # generate's) where a line gives no --g, else the family's
        "cfg": o.sample_cfg if o.sample_cfg is not None else FILL_GUIDANCE if kind == "fill" else default_cfg(adapter),
    }
    if control and o.sample_cfg is None:  # the guidance the control LoRA trains at, as diffusers' trainer validates
        from .objectives import training_guidance

        defaults["cfg"] = training_guidance(o, control=True)
    calls = generation_calls(prompts, options.seed)
    # T5's length and mask, SD3's CLIP mask: the samples are encoded as the run encodes its captions
    text = {"text_encoding": encoding} if (encoding := text_encoding_options(options, bundle.family_spec)) else {}
    generations = []
    for group, seed in calls:
        # a line's own options win over the method's extras (APT's negative embedding, CFG)
        arguments = generation_arguments(group, defaults, extra, distilled=distilled)
        first = group[0]
        # rounded as the prompt's own tool rounds it (kohya, OneTrainer, ai-toolkit), before anything is sized to it
        size = sample_size(int(arguments["width"]), int(arguments["height"]), first.source, bundle.family)
        arguments["width"], arguments["height"] = size
        if first.inpaint_image is not None and first.inpaint_mask is not None:
            if kind is not None:  # OneTrainer's: its mask file; without the mask input OneTrainer renders from text
                arguments["image_conditioning"] = onetrainer_inpaint_conditioning(first.inpaint_image,
                                                                                  first.inpaint_mask, *size)  # fmt: skip
        elif first.inpaint_image is not None:  # kohya's --i: alone in its call, the mask drawn from its seed
            arguments["image_conditioning"] = inpaint_conditioning(first.inpaint_image, *size, seed)
        elif renders_on_blank(first, kind):  # OneTrainer's Fill sample without sample_inpainting, as OneTrainer's
            arguments["image_conditioning"] = blank_conditioning(*size)
        if control and first.control_image is not None:  # generation's control path stretches it to ``size``
            arguments["control_image"] = first.control_image
        generations.append(([p.prompt for p in group], {"seed": seed, "clip_skip": options.clip_skip, **text,
                                                        **arguments}))  # fmt: skip
    return calls, defaults, generations


def _memo_scope(index: int, texts: list[str], arguments: dict[str, Any]) -> tuple[Any, ...]:
    """The memo's name for a render's ``index``-th call: its place, texts and every argument. The prompt file
    is read again at each render; a line edited after caching can keep its texts and change what is encoded
    for them (``--l`` turning on Chroma's CFG or FLUX.1's true CFG adds the negative's encoding), so a call
    whose arguments changed finds nothing and is encoded live rather than replayed without its uncond."""
    return (index, tuple(texts), repr(sorted(arguments.items())))


def encode_sample_prompts(
    bundle: ModelBundle, options: TrainOptions, *, device: Any, method: TrainingMethod[Any] | None = None
) -> ConditioningMemo | None:
    """Encode every text the sample renders will encode, once, while the text encoders are on ``device`` for
    caching (kohya's ``sample_prompts_te_outputs``): the prompts, negatives and each text A1111 prompt
    editing, alternation and ``AND`` produce, with generation's own encoding settings (a recording pass of
    the renders' calls, :mod:`sdcore.generate.conditioning_memo`). Kept on the CPU; renders then leave the
    text encoders where the cache put them (the caller moves them off ``device`` afterwards, as
    :func:`.cache.build_caches` does). None when there is nothing to render, or when the pass failed (the
    renders then encode live and report the problem, as without it).

    ``method``: the pass runs inside its :meth:`~.method.TrainingMethod.sampling` context with its extras, as
    :func:`render_samples` does, so the texts are those the renders encode: a LoRA's ``--embedding`` NAME in a
    sample prompt is written as its tokens there (a partial cache's kept T5 parts are keyed by the text; recorded
    for the NAME they would never match, and T5 would run at every render)."""
    import torch

    from ..generate.conditioning_memo import ConditioningMemo
    from .sample_prompts import read_sample_prompts

    memo = ConditioningMemo()
    try:
        prompts = read_sample_prompts(options.sample_prompts or "", bundle.family)
        if not prompts:
            return None
        from ..generate.pipeline import record_encodings

        for module in bundle.text_encoders:  # where a render puts them, so the encodings are the render's
            if module is not None and next(module.parameters()).device != device:
                module.to(device)
        sampling: contextlib.AbstractContextManager[dict[str, Any]] = (
            method.sampling(bundle) if method is not None else contextlib.nullcontext({})
        )
        with torch.no_grad(), sampling as extra:
            for index, (texts, arguments) in enumerate(_generations(bundle, options, prompts, extra)[2]):
                record_encodings(memo, _memo_scope(index, texts, arguments), bundle, texts, **arguments)
    except Exception:  # the render will meet the same problem and report it; until then, no memo
        log.debug("sample prompts: not encoded ahead (the renders encode them live)", exc_info=True)
        return None
    return memo if memo.scopes else None


@contextlib.contextmanager
def trained_weights_compute(bundle: ModelBundle, options: TrainOptions, device: Any) -> Iterator[None]:
    """Autocast to the trained weights' dtype for the renders under ``--full-bf16``/``--full-fp16``: the
    denoiser's weights are then bf16/fp16 while its inputs (text encodings of fp32 encoders, latents, the
    timestep and guidance embeddings) come in fp32, which a layer refuses outside autocast. The training
    step runs under the accelerator's autocast; kohya's sample_images renders under it too
    (``accelerator.autocast()``, sd-scripts 48d368f library/train_util.py:6551, flux_train_utils.py:255).
    The VAE's encode and decode stay outside it, in the VAE's own dtype (its input cast to it): the VAE
    is kept fp32 under fp16 because SD/SDXL VAEs overflow there (:func:`.placement.place_model`), and autocast
    would run its convolutions in fp16 anyway. Without those options nothing changes: each module computes
    in its own weights' dtype, as ``sdcore generate`` does."""
    import torch

    from .placement import full_precision_dtype

    dtype = full_precision_dtype(options)
    vae = bundle.vae
    if dtype == torch.float32:
        yield
        return
    kind = torch.device(device).type
    before = {name: vae.__dict__.get(name) for name in ("encode", "decode") if callable(getattr(vae, name, None))}

    def own_dtype(call: Any) -> Any:
        def run(x: Any, *args: Any, **kwargs: Any) -> Any:
            with torch.autocast(kind, enabled=False):
                if torch.is_tensor(x) and x.is_floating_point():
                    x = x.to(next(vae.parameters()).dtype)
                return call(x, *args, **kwargs)

        return run

    for name in before:
        setattr(vae, name, own_dtype(getattr(vae, name)))
    try:
        with torch.autocast(kind, dtype=dtype):
            yield
    finally:
        for name, prior in before.items():
            if prior is None:
                delattr(vae, name)  # the class's method again
            else:
                setattr(vae, name, prior)


def render_samples(
    bundle: ModelBundle,
    method: TrainingMethod[Any],
    options: TrainOptions,
    *,
    device: Any,
    folder: Path,
    tag: str,
    step: int,
    say: Any = log.info,
    conditioning: ConditioningMemo | None = None,
    epoch: int | None = None,
    images_folder: Path | None = None,
    output_name: str | None = None,
    parts: PartMemo | None = None,
) -> Path | None:
    """Render the sample prompts with the model as it trains into ``folder/<tag>.png`` (a grid) and, with
    ``images_folder``, each image alone there under kohya's name (:func:`kohya_sample_name` with
    ``output_name``, ``step`` and ``epoch``). Returns the grid's path.

    Modules the caches moved off ``device`` come back for the render and go back to the CPU afterwards:
    the VAE, and the text encoders unless ``conditioning`` (:func:`encode_sample_prompts`) holds every
    text. A text it lacks, or a method whose sampling extras change the prompts (APT's negative
    embedding), brings the text encoders back as before (a debug log says why). ``parts`` (a run that trains
    CLIP while T5's outputs are cached): T5's encodings of the sample prompts; CLIP encodes live and T5 stays on
    the CPU unless a text is missing (then it comes back for the render, as without it).
    """
    try:
        from ..generate.pipeline import generate_images
    except ImportError:
        log.warning("sample images need sdcore.generate.pipeline, which is not available")
        return None
    import torch

    from ..generate.conditioning_memo import MemoMiss
    from ..models.family import family_adapter
    from .sample_info import sample_infotexts
    from .sample_prompts import dropped_negatives

    prompts = sample_prompt_list(options, bundle.family)
    if not prompts:
        return None
    adapter = family_adapter(bundle.family_spec)
    distilled = bool(getattr(adapter, "distilled_guidance", False))
    if distilled and dropped_negatives(prompts):
        log.warning(
            "sample prompts: %d line(s) have --n without --l above 1; on %s a negative prompt needs true CFG "
            "(--l, kohya's meaning), so they render without it",
            dropped_negatives(prompts),
            bundle.family_spec.label,
        )
    elif not distilled and any(p.guidance is not None for p in prompts):
        log.warning("sample prompts: --g is the embedded guidance of FLUX.1; %s has none", bundle.family_spec.label)
    from .inpainting import bundle_kind

    if bundle_kind(bundle) is None and any(p.inpaint_mask is not None for p in prompts):
        log.warning("sample prompts: %s has no mask input: OneTrainer's inpainting samples render from text, as "
                    "OneTrainer renders them on such a model", bundle.family_spec.label)  # fmt: skip
    # a line's --s wins over --sample-steps: name the steps the images really get
    steps = [str(n) for n in sorted({p.steps if p.steps is not None else options.sample_steps for p in prompts})]
    counts = steps[0] if len(steps) == 1 else f"{', '.join(steps[:-1])} or {steps[-1]}"
    say(f"rendering {len(prompts)} sample image(s), {counts} steps each ...")
    moved: list[Any] = []

    def bring(modules: list[Any]) -> None:
        for module in modules:
            if module is not None and module not in moved and next(module.parameters()).device != device:
                module.to(device)
                moved.append(module)

    bring([bundle.vae])
    images: list[Any] = []
    extra: dict[str, Any] = {}
    calls: list[Any] = []
    defaults: dict[str, Any] = {}
    try:
        # each generate_images call undoes the networks it applies before it returns: no NetworkSession.keeping()
        # block here, as the trained weights change between samples and a kept network's undo would restore stale
        # ones over them
        with torch.no_grad(), trained_weights_compute(bundle, options, device), method.sampling(bundle) as extra:
            calls, defaults, generations = _generations(bundle, options, prompts, extra)
            memo = conditioning
            if memo is not None and extra:
                log.debug("sample prompts: the method's sampling options %s change the prompts: encoded live",
                          sorted(extra))  # fmt: skip
                memo = None
            from .cache import cached_text_encoders

            frozen = cached_text_encoders(bundle, bundle.family_spec.partial_text_cache) if parts is not None else []
            if memo is None:
                bring([te for te in bundle.text_encoders if all(te is not f for f in frozen)])
            for index, (texts, arguments) in enumerate(generations):
                if memo is not None:
                    try:
                        with memo.replaying(_memo_scope(index, texts, arguments), bundle.text_encoders):
                            images += generate_images(bundle, texts, **arguments)
                        continue
                    except MemoMiss as miss:
                        log.debug("sample prompts: %s not encoded at caching time: encoded live", miss)
                        memo = None
                        bring(list(bundle.text_encoders))
                elif parts is not None and frozen:
                    try:
                        with parts.replaying(frozen):
                            images += generate_images(bundle, texts, **arguments)
                        continue
                    except MemoMiss as miss:
                        log.debug("sample prompts: %s not encoded at caching time: encoded live", miss)
                        parts = None
                        bring(list(bundle.text_encoders))
                images += generate_images(bundle, texts, **arguments)
    finally:
        for module in moved:
            module.to("cpu")
    infotexts = sample_infotexts(options, step, calls, defaults, images, extra, distilled=distilled, bundle=bundle)
    if images_folder is not None:
        write_images(images, prompts, infotexts, images_folder, output_name, step=step, epoch=epoch)
    path = free_path(folder / f"{tag}.png")
    write_grid(images, path, infotexts)
    return path


def write_images(
    images: list[Any],
    prompts: list[SamplePrompt],
    infotexts: list[str],
    folder: Path,
    output_name: str | None,
    *,
    step: int,
    epoch: int | None,
) -> list[Path]:
    """Each sample image as its own PNG in ``folder`` under kohya's name, with its own infotext (the
    ``parameters`` chunk ``sdcore generate`` writes), atomically and with the umask's mode; ``images`` are in
    the prompts' order (:func:`_generations` keeps it)."""
    from ..generate.pnginfo import save_png

    when = _clock()
    paths = []
    for index, (image, prompt) in enumerate(zip(images, prompts, strict=True)):
        name = kohya_sample_name(output_name, step=step, epoch=epoch, index=index, seed=prompt.seed, when=when)
        text = infotexts[index] if index < len(infotexts) else None
        paths.append(save_png(image, free_path(folder / name), text))
    return paths


def write_grid(images: list[Any], path: Path, infotexts: list[str] | None = None) -> None:
    """Up to 4 images a row, written atomically as PNG (with the samples' infotext)."""
    from PIL import Image

    from ..io import atomic_path
    from .sample_info import grid_pnginfo

    cols = min(4, len(images))
    rows = -(-len(images) // cols)
    w = max(i.width for i in images)
    h = max(i.height for i in images)
    grid = Image.new("RGB", (cols * w, rows * h))
    for k, image in enumerate(images):
        grid.paste(image.convert("RGB"), ((k % cols) * w, (k // cols) * h))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        grid.save(tmp, format="PNG", pnginfo=grid_pnginfo(infotexts or []))
