"""A1111's ``parameters`` PNG text chunk ("infotext"), written and read back.

The layout is what A1111, Civitai and most image browsers read::

    a photo of a cat, (masterpiece:1.2)
    Negative prompt: blurry
    Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, Model hash: abcdef1234, Model: name, Lora hashes: "x: 0123456789ab"

Values containing ``,``, ``:`` or ``"`` are written as JSON strings, the way A1111 quotes them.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError

if TYPE_CHECKING:
    from .hires import HiresFix
    from .variation import VariationSeeds
from ..io import atomic_save, free_path

log = logging.getLogger(__name__)

PARAMETERS_KEY = "parameters"
#: A1111's "RNG" field (modules/processing.py create_infotext; the "randn_source" option): sdcore draws
#: every image's noise from a CPU ``torch.Generator`` seeded with its seed, on any device, which is
#: A1111's "CPU" source. A1111 leaves the field out only for its default "GPU" source, so without it
#: A1111 would redraw the noise on the GPU and make a different image from the same seed.
RNG_SOURCE = "CPU"
#: A1111 1.9+'s schedule field (see :func:`~sdcore.generate.pipeline.schedule_type_field` for when
#: sdcore writes it); given in ``extra``, it is written right after "Sampler"
SCHEDULE_TYPE = "Schedule type"
_NEGATIVE_PREFIX = "Negative prompt:"
#: one ``key: value`` field, as A1111's ``re_param`` finds them (a key of letters, digits, spaces, '-', '/' and
#: '_'; a quoted or comma-free value). The plain form, ``\s*(\w[\w \-/]*):...``, rescans the rest of a stretch of
#: key characters from each character of it: tens of seconds on a 50K-character line of words with no colon (a long
#: prompt). Here a key is only tried where such a stretch starts (the lookbehind; ``[ \-/]*`` skips to its first
#: letter): every key tried from inside a stretch ends where the stretch ends, so it matches exactly when the one
#: from the stretch's first letter does, and the fields found are the plain form's, in linear time.
_FIELD_RE = re.compile(r'(?<![\w \-/])[ \-/]*(\w[\w \-/]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


@dataclass
class GenerationParameters:
    """Everything the infotext holds; ``extra`` keeps other fields in order (``Clip skip``, hashes ...)."""

    prompt: str
    negative_prompt: str = ""
    steps: int | None = None
    sampler: str | None = None
    cfg: float | None = None
    seed: int | None = None
    size: tuple[int, int] | None = None
    model_hash: str | None = None
    model_name: str | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def hires_fix(self) -> HiresFix | None:
        """The "Hires. fix" the fields describe (``Denoising strength``, ``Hires upscale``/``Hires resize``,
        ``Hires steps``, ``Hires upscaler``, ``Hires prompt`` ...), ``None`` when there is none; ``size``
        is then the first pass's, as A1111 writes it."""
        from .hires import hires_from_fields

        return hires_from_fields(self.extra, self.sampler)

    def variation_seeds(self) -> VariationSeeds | None:
        """A1111's "Variation seed", "Variation seed strength" and "Seed resize from" fields (``None`` when
        there are none); a bad value is a one-line error."""
        from .variation import VariationSeeds

        try:
            return VariationSeeds.from_fields(self.extra)
        except ValueError as exc:
            raise ConfigError(f"infotext variation seed fields are invalid: {exc}") from exc

    def format(self) -> str:
        return format_parameters(
            self.prompt,
            self.negative_prompt,
            self.steps,
            self.sampler,
            self.cfg,
            self.seed,
            self.size,
            self.model_hash,
            self.model_name,
            self.extra,
        )


def _number(value: float) -> str:
    value = float(value)
    return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)


def _quote(value: Any) -> str:
    text = str(value)
    if any(ch in text for ch in ',:"') or text != text.strip() or "\n" in text:
        return json.dumps(text, ensure_ascii=False)
    return text


def _size_text(size: tuple[int, int] | str) -> str:
    if isinstance(size, str):
        return size
    width, height = size
    return f"{int(width)}x{int(height)}"


def format_parameters(
    prompt: str,
    negative: str = "",
    steps: int | None = None,
    sampler: str | None = None,
    cfg: float | None = None,
    seed: int | None = None,
    size: tuple[int, int] | str | None = None,
    model_hash: str | None = None,
    model_name: str | None = None,
    extra: dict[str, Any] | None = None,
) -> str:
    """Build the infotext. ``sampler`` may be an id (``euler_a``) or A1111 label (``Euler a``);
    ``None`` fields are left out."""
    from .pipeline import SAMPLERS, sampler_label

    fields: list[tuple[str, str]] = []
    if steps is not None:
        fields.append(("Steps", str(int(steps))))
    if sampler is not None:
        try:
            label = sampler_label(sampler) if sampler in SAMPLERS else sampler
        except ConfigError:
            label = sampler
        fields.append(("Sampler", label))
    schedule = (extra or {}).get(SCHEDULE_TYPE)
    if schedule is not None:  # right after the sampler, where A1111 1.9+ writes it
        fields.append((SCHEDULE_TYPE, str(schedule)))
    if cfg is not None:
        fields.append(("CFG scale", _number(cfg)))
    if seed is not None:
        fields.append(("Seed", str(int(seed))))
    if size is not None:
        fields.append(("Size", _size_text(size)))
    if model_hash:
        fields.append(("Model hash", model_hash))
    if model_name:
        fields.append(("Model", model_name))
    for key, value in (extra or {}).items():
        if value is None or key == SCHEDULE_TYPE:
            continue
        # A1111's field regex (infotext_utils.py) reads names of two or more of these characters
        if not re.fullmatch(r"\w[\w \-/]+", key) or key != key.strip():
            raise ConfigError(
                f"infotext field name {key!r} must be two or more letters, digits, spaces, '-', '/' or '_'"
            )
        fields.append(
            (key, value if isinstance(value, str) else _number(value) if isinstance(value, float) else str(value))
        )
    lines = [prompt]
    if negative:
        lines.append(f"{_NEGATIVE_PREFIX} {negative}")
    if fields:
        lines.append(", ".join(f"{key}: {_quote(value)}" for key, value in fields))
    return "\n".join(lines)


def _parse_fields(line: str) -> list[tuple[str, str]]:
    """The ``key: value`` fields of ``line``, found as A1111 finds them (``re_param.findall``): a stretch no
    field matches (Civitai's unquoted ``Civitai resources: [{...}]`` JSON) is skipped, not fatal."""
    fields: list[tuple[str, str]] = []
    for match in _FIELD_RE.finditer(line):
        key, value = match.group(1).strip(), match.group(2).strip()
        if value.startswith('"') and value.endswith('"') and len(value) >= 2:
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                value = value[1:-1]
        fields.append((key, value))
    return fields


def parse_parameters(text: str) -> GenerationParameters:
    """Read an infotext back (inverse of :func:`format_parameters`).

    The last line is the field line when it reads as at least three ``key: value`` pairs (as in
    A1111); prompt and negative prompt may span several lines.
    """
    from .pipeline import sampler_id

    lines = text.split("\n")
    fields: list[tuple[str, str]] = []
    if lines:
        parsed = _parse_fields(lines[-1])
        if len(parsed) >= 3 and not lines[-1].startswith(_NEGATIVE_PREFIX):
            fields = parsed
            lines = lines[:-1]
    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    in_negative = False
    for line in lines:
        if not in_negative and line.startswith(_NEGATIVE_PREFIX):
            in_negative = True
            line = line[len(_NEGATIVE_PREFIX) :].removeprefix(" ")
        (negative_lines if in_negative else prompt_lines).append(line)
    result = GenerationParameters(prompt="\n".join(prompt_lines), negative_prompt="\n".join(negative_lines))
    for key, value in fields:
        try:
            if key == "Steps":
                result.steps = int(value)
            elif key == "Sampler":
                try:
                    result.sampler = sampler_id(value)
                except ConfigError:
                    result.sampler = value
            elif key == "CFG scale":
                result.cfg = float(value)
            elif key == "Seed":
                result.seed = int(value)
            elif key == "Size":
                width, _, height = value.partition("x")
                result.size = (int(width), int(height))
            elif key == "Model hash":
                result.model_hash = value
            elif key == "Model":
                result.model_name = value
            else:
                result.extra[key] = value
        except ValueError as exc:
            raise ConfigError(f"infotext field {key!r} has an invalid value {value!r}") from exc
    # A1111 1.9+: "DPM++ 2M" with Karras (or with "Automatic", which is Karras for it) is dpm++2m_karras
    if result.sampler == "dpm++2m" and result.extra.get(SCHEDULE_TYPE) in ("Karras", "karras", "Automatic"):
        result.sampler = "dpm++2m_karras"
        del result.extra[SCHEDULE_TYPE]
    return result


#: Where A1111 keeps a JPEG's or WebP's infotext (``modules/images.py`` ``save_image_with_geninfo``, which has
#: no PNG text chunk there): the EXIF UserComment tag (0x9286) of the Exif sub-IFD (pointer tag 0x8769),
#: written with the EXIF standard's 8-byte character-code prefix "UNICODE\0" and UTF-16 big-endian text
_EXIF_IFD_POINTER = 0x8769
_EXIF_USER_COMMENT = 0x9286
#: the EXIF character-code prefixes a UserComment reader places (the standard's table, as piexif's
#: ``UserComment.load`` reads them; A1111 reads through it)
_USER_COMMENT_CODES = {b"ASCII\0\0\0": "ascii", b"JIS\0\0\0\0\0": "shift_jis", b"UNICODE\0": "utf_16_be"}


def _exif_user_comment(image: Any) -> str:
    """The EXIF UserComment of an opened image as A1111's ``read_info_from_image`` reads it: the text after a
    known 8-byte prefix (undecodable bytes replaced); otherwise (no prefix, "undefined" or an unknown one) the
    whole value as UTF-8 with undecodable bytes dropped, where sdcore also drops the undefined prefix's NULs.
    Empty when the image has no readable EXIF or no comment."""
    if "exif" not in image.info:
        return ""
    try:
        raw = image.getexif().get_ifd(_EXIF_IFD_POINTER).get(_EXIF_USER_COMMENT)
    except Exception:  # malformed EXIF: no comment (the image's PNG text, if any, still counts)
        return ""
    if isinstance(raw, str):
        return raw
    if not isinstance(raw, bytes):
        return ""
    code = _USER_COMMENT_CODES.get(raw[:8]) if len(raw) >= 8 else None
    if code is not None:
        return raw[8:].decode(code, errors="replace")
    return raw.decode("utf8", errors="ignore").lstrip("\0")


def read_png_parameters(path: str | os.PathLike[str]) -> GenerationParameters | None:
    """The infotext of an image, or ``None`` when it has none: a PNG's ``parameters`` text, a JPEG's or WebP's
    EXIF UserComment (A1111's places; as in A1111 a non-empty comment wins over the text)."""
    from PIL import Image

    with Image.open(path) as image:
        text = image.info.get(PARAMETERS_KEY)
        comment = _exif_user_comment(image)
    if comment:
        text = comment
    return parse_parameters(text) if isinstance(text, str) else None


#: the image formats :func:`save_image` writes, by lower-case file suffix (a path without one is a PNG, as before)
IMAGE_SUFFIXES = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".avif": "AVIF"}
#: A1111's "jpeg_quality" setting's default ("Quality for saved jpeg and avif images"), which its
#: ``save_image_with_geninfo`` passes to JPEG, WebP and AVIF alike
JPEG_QUALITY = 80
#: the largest side each format holds: libjpeg's ``JPEG_MAX_DIMENSION`` and WebP's 14-bit sides. A1111 saves a
#: larger image as PNG instead (``save_image``: its JPEG test says 65535), and so does :func:`save_image`
_MAX_SIDE = {"JPEG": 65500, "WEBP": 16383}
#: a JPEG's EXIF is one APP1 segment, whose 16-bit length counts itself: at most 65533 bytes of EXIF with its
#: ``Exif\0\0`` header (PIL's limit; about 32,700 characters of infotext in UTF-16); A1111 (piexif) fails there, sdcore saves a PNG instead
_JPEG_MAX_EXIF = 65533


def image_format(path: str | os.PathLike[str]) -> str:
    """The PIL format :func:`save_image` writes ``path`` in, from its suffix (case-insensitive; none: PNG); an
    unknown suffix, or AVIF where this Pillow has no AVIF codec, is a one-line error (say it before any model
    loads: ``sdcore generate`` checks ``-o`` as it parses it)."""
    suffix = Path(path).suffix.lower()
    if not suffix:
        return "PNG"
    fmt = IMAGE_SUFFIXES.get(suffix)
    if fmt is None:
        raise ConfigError(
            f"{Path(path).name}: unknown image type {Path(path).suffix!r}; use .png, .jpg/.jpeg, .webp or .avif"
        )
    if fmt == "AVIF":
        from PIL import features

        if not features.check("avif"):
            raise ConfigError(f"{Path(path).name}: this Pillow has no AVIF codec; use .png, .jpg, or .webp")
    return fmt


def user_comment_exif(text: str) -> bytes:
    """EXIF bytes holding ``text`` as A1111 stores a JPEG's, WebP's or AVIF's infotext, laid out as piexif's
    ``dump`` writes them (what A1111 calls): the ``Exif\\0\\0`` header, a big-endian TIFF structure whose IFD0
    holds only the Exif IFD pointer (0x8769, LONG) and whose Exif IFD holds only UserComment (0x9286, UNDEFINED:
    "UNICODE\\0" then UTF-16 big-endian, piexif's ``UserComment.dump(..., encoding="unicode")``). PIL's own
    ``Exif`` writes the comment as BYTE, which piexif (so A1111's PNG Info) reads as numbers, not text."""
    comment = b"UNICODE\0" + text.encode("utf-16-be")

    def entry(tag: int, kind: int, count: int, value: int) -> bytes:
        return tag.to_bytes(2, "big") + kind.to_bytes(2, "big") + count.to_bytes(4, "big") + value.to_bytes(4, "big")

    # IFD0 at 8: one entry and a zero next-IFD offset; the Exif IFD at 26: one entry, and (as piexif writes
    # a sub-IFD) no next-IFD offset; the comment's bytes at 40
    ifd0 = b"\0\1" + entry(_EXIF_IFD_POINTER, 4, 1, 26) + bytes(4)
    exif_ifd = b"\0\1" + entry(_EXIF_USER_COMMENT, 7, len(comment), 40)
    return b"Exif\0\0MM\0\x2a" + (8).to_bytes(4, "big") + ifd0 + exif_ifd + comment


def save_image(
    image: Any,
    path: str | os.PathLike[str],
    parameters: str | GenerationParameters | None,
    *,
    jpeg_quality: int = JPEG_QUALITY,
    webp_lossless: bool = False,
    overwrite: bool = False,
    warn: Callable[[str], None] | None = None,
) -> Path:
    """Write ``image`` with its infotext, atomically, in the format of ``path``'s suffix (:func:`image_format`),
    where A1111 puts it: a PNG's ``parameters`` text chunk, a JPEG's, WebP's or AVIF's EXIF UserComment
    (:func:`user_comment_exif`; :func:`read_png_parameters` reads both back). As A1111's
    ``save_image_with_geninfo``: ``jpeg_quality`` (1-100) for JPEG, WebP and AVIF, ``webp_lossless`` for WebP,
    transparency dropped for JPEG and WebP. An image a JPEG or WebP cannot hold (a side over its limit, or an
    infotext over a JPEG's 64 KB of EXIF) is saved as PNG next to it (``NAME.png``; when that is taken, replaced
    with ``overwrite``, else ``NAME-2.png`` ...), as A1111 does, and ``warn`` (else a logged warning) says so.
    Returns the path written."""
    fmt = image_format(path)
    text = parameters.format() if isinstance(parameters, GenerationParameters) else parameters
    exif = user_comment_exif(text) if text is not None and fmt != "PNG" else None
    side = _MAX_SIDE.get(fmt)
    reason = None
    if side is not None and max(image.size) > side:
        reason = f"a {fmt} holds at most {side} pixels a side and the image is {image.width}x{image.height}"
    elif fmt == "JPEG" and exif is not None and len(exif) > _JPEG_MAX_EXIF:
        reason = f"a JPEG's EXIF holds at most {_JPEG_MAX_EXIF} bytes and the infotext's takes {len(exif)}"
    if reason is not None:
        original = Path(path)
        path = original.with_suffix(".png") if overwrite else free_path(original.with_suffix(".png"))
        message = f"{original}: {reason}; saved as PNG: {path}"
        warn(message) if warn is not None else log.warning("%s", message)
        fmt = "PNG"
    if fmt == "PNG":
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        if text is not None:
            info.add_itxt(PARAMETERS_KEY, text) if not text.isascii() else info.add_text(PARAMETERS_KEY, text)
        return atomic_save(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))
    if fmt in ("JPEG", "WEBP") and image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    options: dict[str, Any] = {"quality": int(jpeg_quality)}
    if fmt == "WEBP":
        options["lossless"] = bool(webp_lossless)
    if exif is not None:
        options["exif"] = exif
    return atomic_save(path, lambda tmp: image.save(tmp, format=fmt, **options))


#: the name this function had while it wrote PNG only (callers on other branches still use it)
save_png = save_image


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of a file (sdcore's streamed, per-process cached hash)."""
    from ..models.hashes import sha256_file

    return sha256_file(path)


#: A1111's fields of the VAE file it decoded with (``processing.py`` ``create_infotext``: "VAE hash", the first 10 hex
#: digits of the file's sha256, then "VAE", its base name with extension; right after "Model")
VAE_FIELDS = ("VAE hash", "VAE")


def vae_fields(vae: str | os.PathLike[str] | None, family: str) -> dict[str, str]:
    """A1111's "VAE hash"/"VAE" of the VAE file ``vae`` (``--vae``) for an image of ``family``, so that
    ``generate --from-png`` finds it again. A1111 writes them only when it decodes with a VAE file
    (``sd_vae.get_loaded_vae_name``/``_hash``, unset for the model's own VAE), and runs the UNet families
    (:data:`~sdcore.models.detect.FAMILY_MARKERS`: SD1, SD2, SDXL) with them; Forge 2, which runs FLUX.1 and
    Chroma, writes no VAE fields (commented out) but ``Module 1: ae`` (the file's stem, no hash) for each of its
    VAE/text encoder files, and its paste takes an old-form "VAE" as the one such file, which would drop the text
    encoders: the other families get Forge's "Module N" (:func:`module_fields`). A folder or hub id is no file A1111 loads: nothing either."""
    from ..models.detect import FAMILY_MARKERS

    if vae is None or family not in FAMILY_MARKERS or not Path(vae).is_file():
        return {}
    short = model_short_hash(vae)
    return {VAE_FIELDS[0]: short, VAE_FIELDS[1]: Path(vae).name} if short else {}


#: the parts Forge 2 lists as "Module N" (its "VAE / Text Encoder" files: ``processing.py`` ``create_infotext``
#: writes ``Module 1: ae`` ... the file's stem, no hash, for each of ``forge_additional_modules`` in the order the
#: user picked them, as the last fields, after "Version"); sdcore writes them in this order, the one Forge's
#: FLUX.1 images mostly show (``Module 1: ae, Module 2: clip_l, Module 3: t5xxl_fp16``)
MODULE_PARTS = ("vae", "clip_l", "clip_g", "t5xxl")
_MODULE_FIELD = re.compile(r"Module (\d+)")


def is_module_field(key: str) -> bool:
    """Whether ``key`` is one of Forge's "Module N" fields."""
    return _MODULE_FIELD.fullmatch(key) is not None


def module_fields(parts: Mapping[str, Any], family: str) -> dict[str, str]:
    """Forge's "Module 1".."Module N" for the part files given separately (``--vae``/``--ae``, ``--clip-l``,
    ``--clip-g``, ``--t5xxl``: ``parts``, ``load_model`` keywords to paths) of an image of ``family``, so that
    ``generate --from-png`` (and Forge's paste, which looks each stem up in its ``VAE/`` and ``text_encoder/``
    folders) takes them again. The UNet families (SD1, SD2, SDXL) get A1111's VAE fields instead
    (:func:`vae_fields`: A1111 reads no Module fields); a folder or hub id is no file Forge lists: left out."""
    from ..models.detect import FAMILY_MARKERS

    if family in FAMILY_MARKERS:
        return {}
    stems = [Path(str(parts[name])).stem for name in MODULE_PARTS
             if parts.get(name) and Path(str(parts[name])).is_file()]  # fmt: skip
    return {f"Module {i}": stem for i, stem in enumerate(stems, 1)}


def png_modules(fields: Mapping[str, str]) -> list[tuple[str, str]]:
    """The "Module N" fields of an infotext's ``fields`` as (field name, file stem), by N (Forge's paste reads
    them in the infotext's order, which is N's)."""
    found = [(int(m.group(1)), key, value) for key, value in fields.items()
             if (m := _MODULE_FIELD.fullmatch(key)) is not None and value]  # fmt: skip
    return [(key, value) for _n, key, value in sorted(found)]


def model_short_hash(source: str | os.PathLike[str] | None) -> str | None:
    """A1111's "Model hash" (first 10 hex digits of the file's sha256), ``None`` for folders and tiny models."""
    if source is None:
        return None
    path = Path(source)
    if not path.is_file():
        return None
    return file_sha256(path)[:10]


__all__ = [
    "IMAGE_SUFFIXES",
    "JPEG_QUALITY",
    "MODULE_PARTS",
    "PARAMETERS_KEY",
    "RNG_SOURCE",
    "SCHEDULE_TYPE",
    "VAE_FIELDS",
    "GenerationParameters",
    "file_sha256",
    "format_parameters",
    "image_format",
    "is_module_field",
    "model_short_hash",
    "module_fields",
    "parse_parameters",
    "png_modules",
    "read_png_parameters",
    "save_image",
    "save_png",
    "user_comment_exif",
    "vae_fields",
]
