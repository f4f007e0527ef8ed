"""Sample prompts rendered while training, in kohya's prompt-file syntax.

One prompt per line; ``#`` starts a comment line; options follow the prompt after `` --``::

    masterpiece, 1girl, red hair --n lowres, bad hands --w 512 --h 768 --s 28 --d 42 --l 7.5 --ss euler_a

``--n`` negative prompt, ``--w``/``--h`` size, ``--s`` sampler steps, ``--d`` seed, ``--l`` CFG scale,
``--ss`` sampler (kohya's names: ``ddim``, ``euler_a``, ``k_euler``, ``dpmsolver++`` ... or sdcore's).
On a guidance-distilled family (FLUX.1) they mean what kohya's FLUX.1 samples mean since July 2025:
``--g`` the embedded guidance (default 3.5) and ``--l`` the true CFG scale, which a negative prompt
needs: a line's ``--n`` without ``--l`` above 1 is rendered without its negative (kohya ignores it too).
Like kohya, the file may also be JSON (a list of objects) or TOML (``[prompt]`` defaults plus
``[[prompt.subset]]`` entries) with the keys ``prompt``, ``negative_prompt``, ``width``,
``height``, ``sample_steps``, ``seed``, ``scale``, ``guidance_scale``, ``sample_sampler``, ``image``,
``controlnet_image`` (one ``seed``: a list, gen_img.py's ``--d 1,2,3`` of a text line, is refused by name where
kohya's ``torch.manual_seed`` fails on it). Options kohya knows for other features (``--ctr``, ``--rcfg``, ...) are not part of the prompt
either: they are reported in :attr:`SamplePrompt.ignored`; ``--g`` on a family without embedded guidance is warned
about when rendering.

Control images: ``--cn PATH`` (kohya's flag, sd-scripts 48d368f library/train_util.py:6302-6305; a JSON/TOML
prompt's ``controlnet_image``) names a sample's control image (:attr:`SamplePrompt.control_image`). A FLUX.1
control-LoRA run (``sdcore train lora --control-lora``) renders each sample on it through the run's widened
transformer: the image is stretched to the sample's (rounded) width x height with Lanczos, as kohya's FLUX.1
samples stretch theirs (flux_train_utils.py:249-251), by generation's own control path
(``generate_images(control_image=...)``, diffusers' ``FluxControlPipeline``, as ``sdcore generate
--control-image``); such a run needs ``--cn`` on every line and refuses a missing or unreadable file in the
pre-flight (:func:`control_image_problems`). On any other run ``--cn`` is a ControlNet's image in kohya, which
sdcore does not train: a pre-flight note says it is not used.

FLUX.1 Kontext: ``--ctrl_img PATH`` (ai-toolkit's sample prompt flag) or ``--ci PATH`` (musubi-tuner's) names
the reference image the sample edits; as ai-toolkit renders its Kontext samples, the image is stretched to the
sample's width x height (bilinear) and used at that size (:attr:`SamplePrompt.reference`). A missing file, or
one on a model of another family, is a pre-flight problem (:func:`reference_problems`).

SD inpainting models: ``--i PATH`` (kohya sd-scripts' flag since v0.10.4, PR #2309; its docs say ``--img``, which
sdcore reads too; a JSON/TOML prompt's ``image``) names the image the sample inpaints. As kohya's
``sample_image_inference`` does, the image is stretched to the sample's width x height (Lanczos), a wobbly ellipse
mask is drawn at that size from the sample's seed (:func:`sdcore.train.random_masks.wobbly_ellipse`), and the
sample is a txt2img from the seed's noise (full denoise, no blend, no paste-back) whose UNet's extra channels are
that mask and the latent of the image with the hole zeroed (:func:`inpaint_conditioning`). A missing or
unreadable file is a pre-flight problem (:func:`inpaint_image_problems`; kohya skips the sample with a warning),
and so is the option on a model without the mask input (:func:`sdcore.train.inpainting.inpainting_problems`).
OneTrainer's inpainting samples (``sample_inpainting`` with ``base_image_path`` and ``mask_image_path``, read by
:mod:`sdcore.train.onetrainer_config`) carry the image and a mask file (:attr:`SamplePrompt.inpaint_mask`) and render
the same way with OneTrainer's own conditioning (:func:`onetrainer_inpaint_conditioning`); as in OneTrainer, a
model without the mask input renders them from text (a warning says so).

FLUX.1 Fill takes both kinds by the same rules, its mask input being the rule's mask in 8x8 blocks
(:meth:`sdcore.generate.inpaint.ImageConditioning.fill_mask`, :func:`sdcore.models.flux.generate.fill_conditioning`);
a OneTrainer sample without ``sample_inpainting`` renders on a blank image under a full mask, as OneTrainer's
FluxSampler renders it (:func:`sdcore.train.inpainting.renders_on_blank`); a kohya-format prompt without ``--i`` is a
pre-flight line (:func:`sdcore.train.inpainting.fill_sample_problem`: kohya trains no Fill model), as is ``--l``
there (Fill has no true CFG), and a line without ``--g`` gets Fill's guidance 30.

``--sample-prompts`` may also be a single prompt (with the same options) instead of a file.

Each prompt records the tool whose format it came in (:attr:`SamplePrompt.source`: kohya for the formats above,
OneTrainer's samples, ai-toolkit's sample section), and its size is rounded by that tool's rule for the model's
family (:data:`SIZE_RULES`, :func:`sample_size`) before it renders; a size the model still cannot take is a
pre-flight line (:func:`size_problems`). OneTrainer's and ai-toolkit's readers give every prompt its tool's own
size and CFG; a kohya-format line without ``--w``/``--h``/``--l`` takes the run's ``--sample-resolution`` and
``--sample-cfg``, which a run written in kohya's names sets to kohya's (:data:`sdcore.train.kohya.KOHYA_DEFAULTS`)
and sdcore's own runs leave unset (``--resolution`` and the family's CFG).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.captions import read_caption_text
from ..errors import ConfigError, DataError

#: the tools whose sample prompt formats sdcore reads (:attr:`SamplePrompt.source`)
KOHYA, ONETRAINER, AITOOLKIT = "kohya", "onetrainer", "ai-toolkit"

#: kohya's sampler names that sdcore's sampler normaliser does not know by itself
KOHYA_SAMPLERS = {"dpmsolver++": "dpm++2m", "k_dpm_2_a": "", "k_dpm_2": "", "dpm_2": "", "dpm_2_a": ""}

_OPTION = re.compile(r"^(ss|n|w|h|s|d|l|g|ctrl_img|ci|cn|img|i)\s+(.*)$", re.IGNORECASE | re.DOTALL)
#: the sample prompt flags naming a FLUX.1 Kontext reference image: ai-toolkit's and musubi-tuner's
REFERENCE_FLAGS = ("ctrl_img", "ci")
#: the sample prompt flags naming the image an inpainting model's sample inpaints: kohya's code reads ``--i``,
#: its docs (docs/inpainting_training.md) write ``--img``
INPAINT_FLAGS = ("i", "img")


@dataclass(frozen=True)
class SamplePrompt:
    """One sample image: the prompt and the settings its line gave (``None`` = the run's default)."""

    prompt: str
    negative: str = ""
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    seed: int | None = None
    cfg: float | None = None
    sampler: str | None = None
    #: ``--g``: the embedded guidance of a guidance-distilled family (FLUX.1); ``cfg`` is then true CFG
    guidance: float | None = None
    ignored: tuple[str, ...] = field(default=())
    #: ``--ctrl_img``/``--ci``: FLUX.1 Kontext's reference image (a path), sized to the sample's
    reference: str | None = None
    #: ``--i``/``--img``: the image an SD inpainting model's sample inpaints (a path; kohya's inpainting samples)
    inpaint_image: str | None = None
    #: OneTrainer's ``mask_image_path`` (with ``inpaint_image`` its ``base_image_path``): the mask an inpainting
    #: model's sample fills, by OneTrainer's rule instead of kohya's wobbly ellipse
    inpaint_mask: str | None = None
    #: ``--cn`` (kohya's ``controlnet_image``): the control image a FLUX.1 control-LoRA run's sample renders on
    #: (a path), stretched to the sample's size
    control_image: str | None = None
    #: the tool whose prompt format gave the prompt (:data:`KOHYA`, :data:`ONETRAINER`, :data:`AITOOLKIT`): its
    #: rule rounds the sample's size (:func:`sample_size`)
    source: str = "kohya"
    #: ``(letter, text)`` of the options the caller asked :func:`parse_prompt_line` to keep (``keep``): options of
    #: kohya's ``gen_img.py`` lines (``--t`` the img2img strength) that sample prompts do not have
    kept: tuple[tuple[str, str], ...] = field(default=())

    def settings(self) -> tuple[Any, ...]:
        """What must be equal for two prompts to share one generation call (the seed is separate)."""
        return (self.width, self.height, self.steps, self.cfg, self.sampler, self.guidance, self.reference,
                self.inpaint_image, self.inpaint_mask, self.control_image, self.source)  # fmt: skip


def sampler_name(name: str) -> str:
    """sdcore's sampler id for a kohya (``k_euler_a``, ``dpmsolver++``) or sdcore sampler name."""
    from ..generate.pipeline import sampler_id

    key = name.strip().lower()
    if key in KOHYA_SAMPLERS:
        if not KOHYA_SAMPLERS[key]:
            raise ConfigError(f"sampler {name!r} (kohya) is not available in sdcore; use euler_a, euler, dpm++2m, ddim")
        return KOHYA_SAMPLERS[key]
    return sampler_id(key)


def _number(kind: type, text: str, option: str, where: str, label: str | None = None) -> Any:
    """``text`` read as ``kind``, positive unless it is the seed; ``label``: how a problem names the value (a
    JSON/TOML prompt's ``'sample_steps'``), else ``--option`` as a line writes it."""
    label = label or f"--{option}"
    try:
        value = kind(text.strip())
    except ValueError:
        first = text.partition(",")[0].strip()
        if option == "d" and "," in text and first.isdigit():  # gen_img.py's seed list, one seed an image
            raise ConfigError(
                f"{where}: --d {text.strip()}: a list of seeds is not taken (sdcore gives a line's image i the seed "
                f"+ i, as A1111); give the first: --d {first}"
            ) from None
        raise ConfigError(f"{where}: {label} needs a number, got {text.strip()!r}") from None
    if value <= 0 and option not in ("d", "seed"):
        raise ConfigError(f"{where}: {label} must be positive, got {text.strip()}")
    return value


def parse_prompt_line(line: str, where: str = "sample prompt", keep: tuple[str, ...] = ()) -> SamplePrompt:
    """Split one kohya prompt line into the prompt and its options (kohya splits at `` --``). ``keep``: option
    letters outside the sample prompts' set whose text is returned in :attr:`SamplePrompt.kept` instead of being
    ignored (``sdcore generate --from-file`` keeps ``gen_img.py``'s ``t``); a ``d`` there keeps a comma-separated
    seed list (``gen_img.py``'s, which training samples refuse: kohya's take one seed) for the caller to read."""
    parts = (" " + line.strip()).split(" --")
    values: dict[str, Any] = {"prompt": parts[0].strip()}
    ignored: list[str] = []
    kept: list[tuple[str, str]] = []
    for part in parts[1:]:
        match = _OPTION.match(part.strip())
        if not match:
            letter, _, text = part.strip().partition(" ")
            if letter.lower() in keep:
                kept.append((letter.lower(), text.strip()))
            else:
                ignored.append("--" + letter)
            continue
        option, text = match.group(1).lower(), match.group(2).strip()
        if option == "n":
            values["negative"] = text
        elif option == "ss":
            values["sampler"] = sampler_name(text)
        elif option == "d" and "d" in keep and "," in text:  # gen_img.py's seed list: the caller reads it
            kept.append(("d", text))
        elif option in ("w", "h", "s", "d"):
            name = {"w": "width", "h": "height", "s": "steps", "d": "seed"}[option]
            values[name] = _number(int, text, option, where)
        elif option == "g":
            values["guidance"] = _number(float, text, option, where)
        elif option in REFERENCE_FLAGS:  # musubi-tuner's Kontext sample edits the first --ci; ai-toolkit the last
            if option == "ctrl_img" or "reference" not in values:
                values["reference"] = text
        elif option in INPAINT_FLAGS:  # kohya keeps the last one (a dict key written again)
            values["inpaint_image"] = text
        elif option == "cn":  # kohya's controlnet_image: the last one, as above
            values["control_image"] = text
        else:
            values["cfg"] = _number(float, text, option, where)
    if not values["prompt"]:
        raise ConfigError(f"{where}: the line has options but no prompt")
    return SamplePrompt(**values, ignored=tuple(ignored), kept=tuple(kept))


_DICT_KEYS = {
    "prompt": "prompt",
    "negative_prompt": "negative",
    "width": "width",
    "height": "height",
    "sample_steps": "steps",
    "seed": "seed",
    "scale": "cfg",
    "guidance_scale": "guidance",
    "sample_sampler": "sampler",
    "image": "inpaint_image",
    "controlnet_image": "control_image",
}


def _from_dict(entry: Any, where: str) -> SamplePrompt:
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: each prompt must be a table/object with a 'prompt' key")
    unknown = sorted(set(entry) - set(_DICT_KEYS))
    values: dict[str, Any] = {}
    for key, name in _DICT_KEYS.items():
        if key in entry and entry[key] is not None:
            values[name] = entry[key]
    if not isinstance(values.get("prompt"), str) or not values["prompt"].strip():
        raise ConfigError(f"{where}: 'prompt' is missing or empty")
    seed = values.get("seed")
    if isinstance(seed, list):  # kohya passes the one value to torch.manual_seed: a list is its traceback
        first = f"; give one: seed = {seed[0]}" if seed and isinstance(seed[0], int) else ""
        raise ConfigError(
            f"{where}: 'seed' {seed}: a list of seeds is not taken (kohya's JSON/TOML sample prompts take one seed; "
            f"sdcore gives a prompt's image i the seed + i, as A1111){first}"
        )
    for key in ("width", "height", "sample_steps", "seed", "scale", "guidance_scale"):
        name = _DICT_KEYS[key]
        if name in values:
            kind = int if key in ("width", "height", "sample_steps", "seed") else float
            values[name] = _number(kind, str(values[name]), name, where, label=f"'{key}'")
    if "sampler" in values:
        values["sampler"] = sampler_name(str(values["sampler"]))
    if "negative" in values:
        values["negative"] = str(values["negative"])
    for name in ("inpaint_image", "control_image"):
        if name in values:
            values[name] = str(values[name]).strip()
    return SamplePrompt(**values, ignored=tuple(unknown))


def parse_prompt_file(text: str, suffix: str, where: str) -> list[SamplePrompt]:
    """Prompts of a ``.txt`` (kohya lines), ``.json`` or ``.toml`` prompt file's content."""
    suffix = suffix.lower()
    if suffix == ".json":
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"{where}: invalid JSON: {exc}") from None
        entries = data if isinstance(data, list) else [data]
        return [_from_dict(e, f"{where} prompt {i + 1}") for i, e in enumerate(entries)]
    if suffix == ".toml":
        import tomllib

        try:
            data = tomllib.loads(text)
        except ValueError as exc:
            raise ConfigError(f"{where}: invalid TOML: {exc}") from None
        table = data.get("prompt")
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: a TOML prompt file needs a [prompt] table with [[prompt.subset]] entries")
        defaults = {k: v for k, v in table.items() if k != "subset"}
        subsets = table.get("subset", [])
        if not isinstance(subsets, list):
            raise ConfigError(f"{where}: [[prompt.subset]] must be an array of tables")
        return [
            _from_dict({**defaults, **s} if isinstance(s, dict) else s, f"{where} subset {i + 1}")
            for i, s in enumerate(subsets)
        ]
    prompts = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip() and not line.lstrip().startswith("#"):
            prompts.append(parse_prompt_line(line, f"{where} line {number}"))
    return prompts


def read_sample_prompts(value: str, family: str | None = None) -> list[SamplePrompt]:
    """``--sample-prompts``: a prompt file (``.txt``, ``.json``, ``.toml``) or one prompt line. ``family``: the
    family of the model being trained, where it is known; a bare OneTrainer samples list (no ``model_type`` to say
    it) is read as OneTrainer reads it for that family (its defaults, and ``cfg_scale`` as FLUX.1's embedded
    guidance there)."""
    path = Path(value).expanduser()
    is_file = len(value) < 4096 and "\n" not in value and path.is_file()
    if is_file and path.suffix.lower() in (".json", ".toml"):
        from . import simpletuner_config

        if simpletuner_config.is_config_file(path):  # a SimpleTuner config: its validation prompts
            return simpletuner_config.read_sample_prompts(path)
    if is_file and path.suffix.lower() in (".yaml", ".yml", ".json"):
        from . import aitoolkit

        if aitoolkit.is_job_file(path):  # an ai-toolkit job: its sample section
            return aitoolkit.read_sample_prompts(path)
        from . import onetrainer_config

        if onetrainer_config.is_sample_source(path):  # a OneTrainer config or samples list
            return onetrainer_config.read_sample_prompts(path, family=family)
    if is_file and path.suffix.lower() in (".sh", ".bash", ".txt", ""):
        from . import diffusers_script

        if path.suffix.lower() not in (".sh", ".bash"):  # a prompt file or a command: an undecodable one is
            _read_prompt_file(path)  # named a prompt file (the command reader's errors are left to it)
        if diffusers_script.read_command(path) is not None:  # a diffusers command: its validation prompts
            return diffusers_script.read_sample_prompts(path, family)
    if is_file or path.suffix.lower() in (".txt", ".json", ".toml"):
        return parse_prompt_file(_read_prompt_file(path), path.suffix, str(path))
    return [parse_prompt_line(value, "--sample-prompts")]


def _read_prompt_file(path: Path) -> str:
    """The text of a prompt file by the captions' one decoding rule: a prompt file from Notepad (a BOM, UTF-16)
    reads as written; an undecodable one is a :class:`ConfigError` that names it."""
    try:
        return read_caption_text(path, "prompt file")
    except DataError as exc:
        raise ConfigError(f"--sample-prompts {exc}") from None  # the message starts with the path


def generation_calls(prompts: list[SamplePrompt], seed: int) -> list[tuple[list[SamplePrompt], int]]:
    """Group prompts into generation calls: ``(prompts, first seed)``; image ``i`` of a call uses
    ``first seed + i``. A prompt without ``--d`` gets the run's ``seed`` + its position (so the
    images do not change when another line gets options); consecutive prompts with equal settings
    share one call, except inpainting ones (``--i``): each has its own mask, drawn from its own seed."""
    calls: list[tuple[list[SamplePrompt], int]] = []
    for index, prompt in enumerate(prompts):
        own_seed = prompt.seed if prompt.seed is not None else seed + index
        if calls and prompt.seed is None and prompt.inpaint_image is None:
            group, first = calls[-1]
            last = group[-1]
            if last.seed is None and last.settings() == prompt.settings() and first + len(group) == own_seed:
                group.append(prompt)
                continue
        calls.append(([prompt], own_seed))
    return calls


def generation_arguments(
    group: list[SamplePrompt], defaults: dict[str, Any], extra: dict[str, Any], *, distilled: bool = False
) -> dict[str, Any]:
    """Keyword arguments of ``generate_images`` for one call: the line's options, else the method's
    sampling extras (``extra``: e.g. APT's negative embedding and CFG), else the run's ``defaults``
    (``steps``, ``width``, ``height``, ``sampler``, ``cfg``). ``distilled``: the family's ``cfg`` is an
    embedded guidance (FLUX.1): ``--g`` sets it, ``--l`` is the true CFG scale, and negatives count only
    with ``--l`` above 1 (:func:`dropped_negatives`)."""
    first = group[0]
    arguments = {**defaults, **extra}
    for name in ("steps", "width", "height", "sampler"):
        value = getattr(first, name)
        if value is not None:
            arguments[name] = value
    negatives = [p.negative for p in group]
    if distilled:
        if first.guidance is not None:
            arguments["cfg"] = first.guidance
        if first.cfg is not None:
            arguments["true_cfg_scale"] = first.cfg
        if float(arguments.get("true_cfg_scale", 1.0)) <= 1.0:
            negatives = ["" for _ in group]
    elif first.cfg is not None:
        arguments["cfg"] = first.cfg
    if first.reference is not None:  # stretched to the sample's size, as ai-toolkit renders Kontext samples
        arguments.update(reference_image=first.reference, reference_resize="output")
    if any(negatives) or "negative_prompt" not in arguments:
        arguments["negative_prompt"] = negatives
    return arguments


@dataclass(frozen=True)
class SizeRule:
    """How a tool rounds a sample's width and height before it renders it (each side alone)."""

    multiple: int
    #: ``floor``: down to the multiple, at least 64 (kohya's and ai-toolkit's ``max(64, x - x % multiple)``);
    #: ``nearest``: OneTrainer's ``quantize_resolution``, ``round(x / multiple) * multiple`` with Python's round
    #: (half to even: 1056 on 64 gives 1024, 1120 gives 1152; a side under half the multiple gives 0)
    mode: str
    #: the words the pre-flight uses for it
    what: str

    def apply(self, value: int) -> int:
        if self.mode == "nearest":
            return round(value / self.multiple) * self.multiple
        return max(64, value - value % self.multiple)


_KOHYA_8 = SizeRule(8, "floor", "kohya rounds down to a multiple of 8")
_AITOOLKIT_8 = SizeRule(8, "floor", "ai-toolkit rounds down to a multiple of 8")


def _onetrainer(multiple: int) -> SizeRule:
    return SizeRule(multiple, "nearest", f"OneTrainer rounds to the nearest multiple of {multiple}")


#: ``(tool, family)`` -> the tool's size rule for that family's samples; ``(tool, None)`` for the others.
#: kohya sd-scripts 48d368f: library/train_util.py:6540-6541 (sample_image_inference, SD1/SD2/SDXL),
#: library/sd3_train_utils.py:513-514 (SD3: 8 as well), library/flux_train_utils.py:180-181 (FLUX.1 and Chroma,
#: kohya's ``--model_type chroma`` of the same script: 16).
#: OneTrainer 23df383: modules/modelSampler/BaseModelSampler.py:77-78 (``quantize_resolution``) with 8 in
#: StableDiffusionSampler.py:380-381 (SD 1.5/2.x), 64 in StableDiffusionXLSampler.py:444-445, 16 in
#: StableDiffusion3Sampler.py:166-167, 64 in FluxSampler.py:397-398 and ChromaSampler.py:166-167; a family
#: OneTrainer has no sampler for keeps its sizes.
#: ai-toolkit 27a03a9: toolkit/config_modules.py:1216-1217 (GenerateImageConfig, every family: down to 8, at
#: least 64); FLUX.1's and Chroma's pipelines then floor the latent to whole 2x2 patches (diffusers
#: pipeline_flux.py ``prepare_latents``, ai-toolkit's chroma/pipeline.py:112), so down to 16 there; diffusers'
#: SD3 pipeline refuses a side that is not a multiple of 16 (``check_inputs``), as sdcore's pre-flight does.
SIZE_RULES: dict[tuple[str, str | None], SizeRule] = {
    (KOHYA, None): _KOHYA_8,
    (KOHYA, "sd3"): _KOHYA_8,
    (KOHYA, "flux"): SizeRule(16, "floor", "kohya rounds down to a multiple of 16"),
    (KOHYA, "chroma"): SizeRule(16, "floor", "kohya rounds down to a multiple of 16"),
    (ONETRAINER, None): SizeRule(1, "nearest", "OneTrainer keeps it"),
    (ONETRAINER, "sd1"): _onetrainer(8),
    (ONETRAINER, "sd2"): _onetrainer(8),
    (ONETRAINER, "sdxl"): _onetrainer(64),
    (ONETRAINER, "sd3"): _onetrainer(16),
    (ONETRAINER, "flux"): _onetrainer(64),
    (ONETRAINER, "chroma"): _onetrainer(64),
    (AITOOLKIT, None): _AITOOLKIT_8,
    (AITOOLKIT, "flux"): SizeRule(16, "floor", "ai-toolkit rounds down to a multiple of 16"),
    (AITOOLKIT, "chroma"): SizeRule(16, "floor", "ai-toolkit rounds down to a multiple of 16"),
}


def size_rule(source: str, family: str | None) -> SizeRule:
    """The rule ``source`` (:data:`KOHYA`, :data:`ONETRAINER`, :data:`AITOOLKIT`) rounds a ``family`` sample by."""
    return SIZE_RULES.get((source, family)) or SIZE_RULES[(source, None)]


def sample_size(width: int, height: int, source: str, family: str | None) -> tuple[int, int]:
    """The size a sample of ``width`` x ``height`` renders at: rounded by its tool's rule for the model's
    ``family`` (:data:`SIZE_RULES`), as kohya, OneTrainer and ai-toolkit render their samples, so a prompt file
    renders at the size its own tool gives it instead of stopping the run at a size the model cannot take."""
    rule = size_rule(source, family)
    return rule.apply(int(width)), rule.apply(int(height))


def render_multiple(family: str) -> int | None:
    """What a ``family`` model's image sides must be multiples of for sdcore to render it: the VAE's 8 on the UNet
    families, 16 on the transformer ones (8 x their 2x2 latent patches); None for a family sdcore does not know."""
    from ..models.family import get_family

    try:
        spec = get_family(family)
    except ConfigError:
        return None
    return 8 if spec.denoiser == "unet" else 16


def size_problems(prompts: list[SamplePrompt], family: str | None, resolution: int) -> list[str]:
    """One line for each sample whose size, once its tool's rule rounded it (:func:`sample_size`; ``resolution``
    where the prompt gives none), a ``family`` model still cannot render, for the training pre-flight: the render
    would otherwise stop the run at the first sample."""
    from ..models.family import get_family

    multiple = render_multiple(family) if family is not None else None
    if multiple is None or family is None:
        return []
    label = get_family(family).label
    problems: list[str] = []
    for number, p in enumerate(prompts, 1):
        given = (p.width or resolution, p.height or resolution)
        size = sample_size(*given, p.source, family)
        if all(side > 0 and side % multiple == 0 for side in size):
            continue
        rule = size_rule(p.source, family)
        rounded = f"; {rule.what}: {size[0]}x{size[1]}" if size != given else ""
        step = math.lcm(rule.multiple, multiple)  # a side the tool's rule keeps and the model takes
        least = -(-64 // step) * step if rule.mode == "floor" else step
        fit = "x".join(str(side if rule.apply(side) % multiple == 0 < rule.apply(side) else
                           max(least, side - side % step)) for side in given)  # fmt: skip
        text = p.prompt if len(p.prompt) <= 40 else p.prompt[:37] + "..."
        problems.append(
            f"--sample-prompts: sample {number} ({text!r}) is {given[0]}x{given[1]}{rounded}; {label} renders sides "
            f"that are multiples of {multiple}: give a size such as {fit}"
        )
    return problems


def dropped_negatives(prompts: list[SamplePrompt]) -> int:
    """How many lines' ``--n`` a guidance-distilled family renders without (no ``--l`` above 1)."""
    return sum(1 for p in prompts if p.negative and (p.cfg is None or p.cfg <= 1.0))


def reference_problems(prompts: list[SamplePrompt], family: str | None = None) -> list[str]:
    """One line for each ``--ctrl_img``/``--ci`` reference image that cannot be read, and one when the model's
    ``family`` (when known before loading) is not Flux.1, for the training pre-flight."""
    from ..models.flux.kontext import open_reference

    problems: list[str] = []
    references = list(dict.fromkeys(p.reference for p in prompts if p.reference is not None))
    if references and family is not None and family != "flux":
        problems.append(
            f"--sample-prompts: --ctrl_img/--ci is FLUX.1 Kontext's reference image; a {family} model takes none"
        )
    for path in references:
        try:
            open_reference(path)
        except ConfigError as exc:
            problems.append(f"--sample-prompts: {exc}")
    return problems


def _short(prompt: SamplePrompt) -> str:
    return prompt.prompt if len(prompt.prompt) <= 40 else prompt.prompt[:37] + "..."


def control_image_problems(prompts: list[SamplePrompt]) -> list[str]:
    """The pre-flight's lines for the sample prompts of a FLUX.1 control-LoRA run, all at once: the lines without
    ``--cn`` (one line counting them: the widened transformer takes its control latents at every call, and
    diffusers' ``FluxControlPipeline``, which the render runs, has no rendering without a control image either),
    each ``--cn`` file that cannot be read (kohya's sample would stop at ``Image.open``), FLUX.1 Kontext's
    ``--ctrl_img``/``--ci`` (a control LoRA joins its image on the channels, not as reference tokens) and ``--l``
    (true CFG, which the control pipeline has none of, as ``sdcore generate`` refuses ``--true-cfg-scale`` there)."""
    from ..models.flux.control import open_control

    problems: list[str] = []
    bare = [number for number, p in enumerate(prompts, 1) if p.control_image is None]
    if bare:
        first = prompts[bare[0] - 1]
        problems.append(
            f"--sample-prompts: a control LoRA's sample renders on a control image, --cn IMAGE (controlnet_image in a "
            f"JSON/TOML prompt file); {len(bare)} of {len(prompts)} prompt(s) have none (the first: sample {bare[0]}, "
            f"{_short(first)!r}): give them --cn"
        )
    for path in dict.fromkeys(p.control_image for p in prompts if p.control_image is not None):
        try:
            open_control(path)
        except ConfigError as exc:
            problems.append(f"--sample-prompts: {exc}")
    if any(p.reference is not None for p in prompts):
        problems.append(
            "--sample-prompts: --ctrl_img/--ci is FLUX.1 Kontext's reference image; a control LoRA takes its control "
            "image on the channels, with --cn: drop --ci"
        )
    if any(p.cfg is not None and p.cfg > 1.0 for p in prompts):
        problems.append(
            "--sample-prompts: --l is true CFG, which a control LoRA's samples do not take (diffusers' "
            "FluxControlPipeline runs on the distilled guidance alone: --g); drop --l"
        )
    return problems


def ignored_control_note(prompts: list[SamplePrompt]) -> str | None:
    """The pre-flight note for ``--cn`` on a run that is no control-LoRA run: kohya uses it only with a ControlNet
    (its ``controlnet_image``), which sdcore does not train, so the samples render without it; None without one."""
    count = sum(1 for p in prompts if p.control_image is not None)
    if not count:
        return None
    return (
        f"--sample-prompts: --cn (a control image) on {count} prompt(s) is not used: kohya reads it for a ControlNet's "
        "samples, and sdcore renders a control image only on a control-LoRA run (--control-lora)"
    )


#: how the pre-flight and the errors name each file of an inpainting sample: kohya's flag, OneTrainer's fields
KOHYA_IMAGE, ONETRAINER_IMAGE, ONETRAINER_MASK = ("inpaint image (--i)", "inpaint image (base_image_path)",
                                                  "inpaint mask (mask_image_path)")  # fmt: skip


def inpaint_image_problems(prompts: list[SamplePrompt]) -> list[str]:
    """One line for each ``--i``/``--img`` image, and each OneTrainer base image and mask, that cannot be read, for
    the training pre-flight (kohya skips such a sample with a warning at each render, OneTrainer stops at it;
    sdcore says it before the first step). Whether the model has the mask input is
    :func:`sdcore.train.inpainting.inpainting_problems`'s check (it needs the model's header)."""
    from ..models.flux.kontext import open_reference

    files: dict[str, str] = {}
    for p in prompts:
        if p.inpaint_image is not None:
            files.setdefault(p.inpaint_image, KOHYA_IMAGE if p.inpaint_mask is None else ONETRAINER_IMAGE)
        if p.inpaint_mask is not None:
            files.setdefault(p.inpaint_mask, ONETRAINER_MASK)
    problems: list[str] = []
    for path, what in files.items():
        try:
            open_reference(path, what)
        except ConfigError as exc:
            problems.append(f"--sample-prompts: {exc}")
    return problems


def inpaint_conditioning(path: str, width: int, height: int, seed: int) -> Any:
    """The image conditioning of a ``--i`` sample (:class:`sdcore.generate.inpaint.ImageConditioning`), made as
    kohya's ``sample_image_inference`` makes it: the image (read as :func:`open_reference` reads one, so upright by
    its EXIF orientation, where kohya takes the stored pixels) stretched to ``width`` x ``height`` with Lanczos,
    and the wobbly ellipse of ``seed`` at that size (kohya's ``wobbly_ellipse_mask(width, height, seed=seed)``)."""
    from PIL import Image

    from ..generate.inpaint import ImageConditioning
    from ..models.flux.kontext import open_reference
    from .random_masks import wobbly_ellipse

    image = open_reference(path, KOHYA_IMAGE)
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    mask = wobbly_ellipse(width, height, seed)
    return ImageConditioning(image, mask, f"{path} under the wobbly ellipse of seed {seed}")


def onetrainer_inpaint_conditioning(image_path: str, mask_path: str, width: int, height: int) -> Any:
    """The image conditioning of a OneTrainer inpainting sample (:func:`sdcore.generate.inpaint.onetrainer_conditioning`):
    the base image and the mask read as OneTrainer's ``load_image`` reads them (upright by their EXIF orientation,
    then ``convert("RGB")``; the mask's RGB then to grey, as ``convert("L")`` would), at the sample's size."""
    from ..generate.inpaint import onetrainer_conditioning
    from ..models.flux.kontext import open_reference

    image = open_reference(image_path, ONETRAINER_IMAGE)
    mask = open_reference(mask_path, ONETRAINER_MASK).convert("L")
    return onetrainer_conditioning(image, mask, width, height, f"{image_path} under the mask {mask_path}")


def network_problems(prompts: list[SamplePrompt]) -> list[str]:
    """One line for each network tag (``<lora:name:1>``) in the sample prompts, for the training pre-flight.

    Sample images render the model as it trains, with the network in training already applied; no handler
    applies a tag from a sample prompt (the render has no ``--lora-dir``), so the render would stop the run
    at the first sample. Malformed tags are reported in :func:`~sdcore.generate.prompt_syntax.parse_networks`'s
    words."""
    from ..generate.prompt_syntax import parse_networks

    problems: list[str] = []
    for prompt in prompts:
        for text in (prompt.prompt, prompt.negative):
            try:
                refs = parse_networks(text)[1]
            except ConfigError as exc:
                problems.append(f"--sample-prompts: {exc}")
                continue
            problems += [
                f"--sample-prompts: {ref.text}: sample images apply no networks named in the prompt (the one in "
                "training is applied already); remove the tag"
                for ref in refs
            ]
    return list(dict.fromkeys(problems))


__all__ = [
    "AITOOLKIT",
    "KOHYA",
    "ONETRAINER",
    "SIZE_RULES",
    "SamplePrompt",
    "SizeRule",
    "control_image_problems",
    "dropped_negatives",
    "generation_arguments",
    "generation_calls",
    "ignored_control_note",
    "inpaint_conditioning",
    "inpaint_image_problems",
    "network_problems",
    "onetrainer_inpaint_conditioning",
    "parse_prompt_file",
    "parse_prompt_line",
    "read_sample_prompts",
    "reference_problems",
    "render_multiple",
    "sample_size",
    "sampler_name",
    "size_problems",
    "size_rule",
]
