"""A1111's inpainting ("Inpaint upload"): the mask's preparation, the masked content, the per-step blend, the
paste-back, and the image conditioning of inpainting models; FLUX.1 Fill's mask for diffusers' ``FluxFillPipeline``.

The numbers are A1111's (modules/processing.py ``StableDiffusionProcessingImg2Img.init``/``sample``,
modules/masking.py, modules/images.py ``resize_image``, modules/sd_samplers_cfg_denoiser.py), rewritten:

- **the mask**: white repaints. An RGBA mask whose alpha is not all opaque gives its alpha, cut at 128 (above:
  255; a PNG's transparent colour counts, as A1111's RGBA upload reads it); any other image its grey level
  (``convert("L")``, not cut). ``--inpainting-mask-invert`` inverts it
  (infotext "Mask mode: Inpaint not masked"). A mask file (and the init image file) is turned upright by its EXIF
  orientation first (A1111's ``images.fix_image``).
- **blur** (``--mask-blur``, default 4): OpenCV's ``GaussianBlur`` along x, then y, kernel ``2 * int(2.5 * s +
  0.5) + 1`` wide, sigma ``s``, borders reflected without repeating the edge (OpenCV's default); sdcore computes it
  in float and rounds (OpenCV's 8-bit fixed point can differ by one level).
- **Whole picture**: the mask is resized to the output size (LANCZOS, "Just resize"); the paste-back mask is it
  doubled and clipped (``min(255, 2 m)``), so the blurred edge is mostly the generated image.
  **Only masked** (``--inpaint-full-res``): the box around every non-zero mask pixel, grown by the padding and
  clamped to the image, then widened (or heightened) to the output's aspect ratio (``masking.expand_crop_region``);
  the image and the mask are cropped to it and resized to the output size ("Resize and fill" for both), generated
  there, and the result is resized back ("Crop and resize") and pasted into the full image; the paste-back mask is
  the blurred mask itself. A blank mask: A1111 falls back to plain img2img; sdcore refuses it (one line).
- **masked content** (``--inpainting-fill``): ``fill`` (the masked pixels replaced by the unmasked ones blurred
  outward: PIL Gaussian blurs of radius 256, 64, 16 x2, 4 x4, 2 x2, 0 composited), ``original``, ``latent
  noise`` (the masked latent is the seed's noise) and ``latent nothing`` (zero there). As in A1111, every mode
  but ``original`` fills the pixels first (what an inpainting model's conditioning image shows).
- **the latent mask**: the mask (not doubled) resized to the latent size (PIL's bicubic ``resize`` of the RGB
  image), /255, rounded to 0 or 1 (A1111's "mask_round", on by default); ``nmask`` repaints, ``mask = 1 - nmask``.
- **the per-step blend**: each denoised estimate becomes ``denoised * nmask + init_latent * mask`` (A1111's
  k-diffusion samplers; its timestep samplers DDIM/PLMS/UniPC instead blend the noisy input with the clean init
  latent before each call (``CFGDenoiserTimesteps.mask_before_denoising``; Forge noises that latent with its
  unseeded global RNG), so sdcore blends the denoised estimate for every sampler), and the sampler's final latent
  once more.
- **the paste-back**: the original with alpha ``255 - paste-back mask`` composited over the decoded image; an
  unmasked pixel is the original's exactly.
- **inpainting models** (UNet ``in_channels`` 9: sd-v1-5-inpainting, SD2 and SDXL inpainting): the UNet's extra
  channels are the mask (rounded, nearest-resized to the latent) and the VAE latent of ``lerp(image, image * (1 -
  mask), w)`` (``w``: "Inpainting conditioning mask strength", ``--inpainting-mask-weight``, default 1), the image
  in [-1, 1] after the masked content is applied. Without a mask (txt2img) A1111 conditions on a mask of ones and a
  mid-grey image (``0.5``, 0 in [-1, 1]); so does sdcore. The latents are the VAE posterior's mean (A1111 samples
  it with the global RNG).
- **a txt2img on an inpainting model's own conditioning** (:class:`ImageConditioning`, no A1111 counterpart):
  kohya sd-scripts' inpainting sample images (``--i``) run its txt2img pipeline from the seed's noise with the UNet's
  extra channels made from a given image and mask: the mask cut at 0.5, nearest-resized to the latent, and the
  latent of ``image * (1 - mask)`` (the hole zeroed, i.e. mid-grey); no per-step blend, no paste-back.
  OneTrainer's inpainting samples (``sample_inpainting`` with ``base_image_path`` and ``mask_image_path``; its
  StableDiffusionSampler/StableDiffusionXLSampler ``__sample_inpainting``) make the same channels by their own rule
  (:func:`onetrainer_conditioning`): the image and the grey mask stretched to the output size (torchvision's
  antialiased bilinear ``Resize`` on the [0, 1] tensors), the hole of the masked image where a 5x5 box average of the
  mask (replicated borders) is above 0.5, and the latent mask the mask's antialiased bilinear resize to the latent
  size, above 0 (any trace of the mask counts).
- **FLUX.1 Fill's own conditioning for a txt2img** (the same :class:`ImageConditioning`, kohya's ``--i`` and
  OneTrainer's ``sample_inpainting`` samples of a Fill model): the masked image is cut and encoded (posterior mean,
  the family's shift and scale) as each rule does for an SD model, and the mask input is FLUX.1 Fill's 64 channels
  (each 8x8 pixel block): kohya's cut mask, OneTrainer's stretched grey mask uncut (its FluxSampler
  ``__sample_inpainting``: the masked image under the box-averaged cut, the packed mask the resized grey values);
  the sample is a txt2img from the seed's noise on the distilled guidance, no per-step blend, no paste-back
  (:func:`sdcore.models.flux.generate.fill_conditioning`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError

if TYPE_CHECKING:
    from PIL import Image

#: A1111's "Masked content" (``inpainting_fill`` 0..3), in its order
FILL_MODES = ("fill", "original", "latent noise", "latent nothing")
#: A1111's defaults: "Mask blur" 4, "Only masked padding, pixels" 32, "Masked content" original
DEFAULT_MASK_BLUR = 4
DEFAULT_PADDING = 32
DEFAULT_FILL = "original"
#: FLUX.1 Fill's guidance when ``--cfg`` is not given: BFL's ``cli_fill.py`` and diffusers' ``FluxFillPipeline``
#: default (ComfyUI's Fill example sets FluxGuidance 30 too)
FILL_GUIDANCE = 30.0
#: the PIL Gaussian blur radii (and repeats) of A1111's "fill" masked content
_FILL_PASSES = ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1))

#: infotext field names (A1111's)
MASK_BLUR = "Mask blur"
MASK_MODE = "Mask mode"
MASKED_CONTENT = "Masked content"
INPAINT_AREA = "Inpaint area"
MASKED_AREA_PADDING = "Masked area padding"
CONDITIONAL_MASK_WEIGHT = "Conditional mask weight"
#: "Mask mode" when the mask is inverted, and "Inpaint area" with only the masked region
INVERTED = "Inpaint not masked"
ONLY_MASKED = "Only masked"


@dataclasses.dataclass(frozen=True)
class Inpaint:
    """The inpainting settings of one generation (A1111's img2img "Inpaint upload" tab); ``mask``: a path or a
    PIL image, white repaints."""

    mask: Any
    blur: int = DEFAULT_MASK_BLUR
    fill: str = DEFAULT_FILL
    full_res: bool = False
    padding: int = DEFAULT_PADDING
    invert: bool = False
    mask_weight: float = 1.0

    def problems(self) -> list[str]:
        """One line per bad setting (the mask file's own problems: :func:`open_mask`)."""
        found = []
        if self.fill not in FILL_MODES:
            found.append(f"--inpainting-fill {self.fill!r}: choose one of {', '.join(FILL_MODES)}")
        if self.blur < 0:
            found.append(f"--mask-blur must be 0 or more, got {self.blur}")
        if self.padding < 0:
            found.append(f"--inpaint-full-res-padding must be 0 or more, got {self.padding}")
        if not 0.0 <= self.mask_weight <= 1.0:
            found.append(f"--inpainting-mask-weight must be in [0, 1], got {self.mask_weight}")
        return found

    def infotext_fields(self, conditioning: bool = False) -> dict[str, Any]:
        """The fields A1111 writes for this inpainting, in its order ("Conditional mask weight" belongs to the
        parameters before "Clip skip": :func:`conditional_mask_weight_field`)."""
        fields: dict[str, Any] = {}
        if self.invert:
            fields[MASK_MODE] = INVERTED
        if self.blur > 0:
            fields[MASK_BLUR] = self.blur
        if self.full_res:
            fields[INPAINT_AREA] = ONLY_MASKED
            fields[MASKED_AREA_PADDING] = self.padding
        if self.fill != "original":
            fields[MASKED_CONTENT] = self.fill
        return fields


@dataclasses.dataclass(frozen=True)
class ImageConditioning:
    """An inpainting model's image conditioning for a txt2img (kohya's and OneTrainer's inpainting sample images,
    see the module's notes): ``image`` (RGB PIL, or a float ``[H, W, 3]`` array in [0, 1]) and ``mask`` (``[H, W]``
    array or grey PIL image, 1 or white = the hole) at the output size; ``rule`` (``kohya`` or ``onetrainer``) says
    how the mask cuts the image and becomes the latent mask; ``label`` says what they are in the repr and equality
    (both compare by it, so a memo keyed on a generation's arguments finds the same call again)."""

    image: Any = dataclasses.field(repr=False, compare=False)
    mask: Any = dataclasses.field(repr=False, compare=False)
    label: str = ""
    rule: str = "kohya"

    def size(self) -> tuple[int, int]:
        """``(width, height)`` of the image and the mask (one line when they differ)."""
        import numpy as np

        if isinstance(self.image, np.ndarray):
            height, width = self.image.shape[:2]
        else:
            width, height = self.image.size
        mask_height, mask_width = np.asarray(self.mask).shape[:2]
        if (mask_width, mask_height) != (width, height):
            raise ConfigError(f"the conditioning mask is {mask_width}x{mask_height}, its image {width}x{height}")
        return int(width), int(height)

    def _mask_values(self) -> Any:
        """The mask as float32 ``[1, 1, H, W]`` (an 8-bit grey image /255)."""
        import numpy as np
        import torch
        from PIL import Image as PILImage

        if isinstance(self.mask, PILImage.Image):  # 8-bit grey levels
            values = np.asarray(self.mask.convert("L"), dtype=np.float32) / 255.0
        else:
            values = np.asarray(self.mask, dtype=np.float32)
        return torch.from_numpy(np.ascontiguousarray(values))[None, None]

    def binary_mask(self) -> Any:
        """The hole the image is cut with, ``[1, 1, H, W]`` float32: kohya's mask cut at 0.5 (``>= 0.5``);
        OneTrainer's 5x5 box average of the mask (replicated borders, its ``__create_erode_kernel``) above 0.5."""
        import torch

        values = self._mask_values()
        if self.rule == "onetrainer":
            padded = torch.nn.functional.pad(values, (2, 2, 2, 2), mode="replicate")
            return (torch.nn.functional.avg_pool2d(padded, 5, stride=1) > 0.5).float()
        return (values >= 0.5).float()

    def latent_mask(self, height: int, width: int) -> Any:
        """The mask channel at the latent size, ``[1, 1, height, width]``: kohya's cut mask nearest-resized;
        OneTrainer's mask resized with antialiased bilinear (torchvision's ``Resize``), above 0."""
        import torch.nn.functional as F

        if self.rule == "onetrainer":
            small = F.interpolate(self._mask_values(), size=(height, width), mode="bilinear", align_corners=False,
                                  antialias=True)  # fmt: skip
            return (small > 0).float()
        return F.interpolate(self.binary_mask(), size=(height, width))

    def fill_mask(self) -> Any:
        """FLUX.1 Fill's mask input ``[1, 64, H / 8, W / 8]``, each 8x8 pixel block of the mask as 64 channels (the
        view/permute of ``FluxFillPipeline.prepare_mask_latents``, :func:`sdcore.train.inpainting.latent_mask`):
        kohya's cut mask (the one its image is cut with, as its SD rule takes); OneTrainer's stretched grey mask as
        it is, uncut (its FluxSampler ``__sample_inpainting`` packs that tensor, while the image is cut by the box
        average)."""
        from ..train.inpainting import VAE_SCALE, latent_mask

        values = self._mask_values() if self.rule == "onetrainer" else self.binary_mask()
        height, width = values.shape[-2:]
        return latent_mask(values[0, 0], (height // VAE_SCALE, width // VAE_SCALE), "fill")[None]

    def conditioning_pixels(self) -> Any:
        """The masked image before encoding: the image in [-1, 1] times ``1 - mask``, ``[1, 3, H, W]``."""
        import numpy as np
        import torch

        if isinstance(self.image, np.ndarray):
            array = np.asarray(self.image, dtype=np.float32) * 2.0 - 1.0
        else:
            array = np.asarray(self.image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
        return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)[None] * (1.0 - self.binary_mask())


def onetrainer_conditioning(image: Image.Image, mask: Image.Image, width: int, height: int,
                            label: str = "") -> ImageConditioning:  # fmt: skip
    """OneTrainer's inpainting sample conditioning (see the module's notes) of an RGB ``image`` and a grey
    ``mask``: both as [0, 1] tensors stretched to ``width`` x ``height`` with antialiased bilinear (torchvision's
    ``Resize((height, width), BILINEAR, antialias=True)`` is this ``interpolate``), kept in float."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    def stretched(picture: Image.Image, mode: str) -> Any:
        values = np.asarray(picture.convert(mode), dtype=np.float32) / 255.0
        tensor = torch.from_numpy(values.reshape(values.shape[0], values.shape[1], -1)).permute(2, 0, 1)[None]
        tensor = F.interpolate(tensor, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
        return tensor[0].permute(1, 2, 0).numpy()

    return ImageConditioning(stretched(image, "RGB"), stretched(mask, "L")[:, :, 0], label, rule="onetrainer")


def blank_conditioning(width: int, height: int) -> ImageConditioning:
    """A blank image under a full mask at ``width`` x ``height`` (OneTrainer's rule): the conditioning OneTrainer's
    FluxSampler gives a FLUX.1 Fill sample without ``sample_inpainting`` (a zero image in [-1, 1], mid grey, whose
    latent mode is the masked-image latent, and a mask of ones). Under a full mask the image is cut away whole, so
    the masked image is zero whatever it held, and Fill's 64 mask channels are all ones."""
    import numpy as np

    image = np.full((height, width, 3), 0.5, dtype=np.float32)
    mask = np.ones((height, width), dtype=np.float32)
    return ImageConditioning(image, mask, f"a blank {width}x{height} image under a full mask", rule="onetrainer")


def inpaint_from_fields(fields: dict[str, str]) -> dict[str, Any]:
    """``generate``'s options from an infotext's inpainting fields (PNG Info -> "Send to inpaint")."""
    values: dict[str, Any] = {}
    if MASK_BLUR in fields:
        values["mask_blur"] = int(float(fields[MASK_BLUR]))
    if fields.get(MASK_MODE) == INVERTED:
        values["inpainting_mask_invert"] = True
    if MASKED_CONTENT in fields and fields[MASKED_CONTENT] in FILL_MODES:
        values["inpainting_fill"] = fields[MASKED_CONTENT]
    if fields.get(INPAINT_AREA) == ONLY_MASKED:
        values["inpaint_full_res"] = True
    if MASKED_AREA_PADDING in fields:
        values["inpaint_full_res_padding"] = int(float(fields[MASKED_AREA_PADDING]))
    if CONDITIONAL_MASK_WEIGHT in fields:
        values["inpainting_mask_weight"] = float(fields[CONDITIONAL_MASK_WEIGHT])
    return values


#: the infotext fields :func:`inpaint_from_fields` reads
FIELDS = (MASK_BLUR, MASK_MODE, MASKED_CONTENT, INPAINT_AREA, MASKED_AREA_PADDING, CONDITIONAL_MASK_WEIGHT)


def open_mask(source: Any) -> Image.Image:
    """The mask as an 8-bit grey image, by A1111's rule (``create_binary_mask``): the alpha of an RGBA image that
    has transparency, cut at 128; the grey level of anything else. A file is turned upright by its EXIF
    orientation first, as A1111 does to the mask and the init image alike (``images.fix_image``)."""
    from ..data.images import open_upright

    image = open_upright(source, "mask")
    # A1111's UI reads the mask as RGBA (gradio's image_mode="RGBA": PIL's convert), so every kind of
    # transparency, a PNG's transparent colour (tRNS) of an RGB, L or P image included, becomes the alpha
    if image.mode in ("LA", "PA", "La", "RGBa") or "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode == "RGBA" and image.getextrema()[-1] != (255, 255):
        return image.getchannel("A").point(lambda value: 255 if value > 128 else 0)
    return image.convert("L")


def gaussian_kernel(sigma: float) -> Any:
    """OpenCV's ``getGaussianKernel`` for A1111's size ``2 * int(2.5 * sigma + 0.5) + 1`` (float64, sums to 1)."""
    import numpy as np

    size = 2 * int(2.5 * sigma + 0.5) + 1
    offsets = np.arange(size, dtype=np.float64) - (size - 1) / 2
    kernel = np.exp(-(offsets**2) / (2 * sigma * sigma))
    return kernel / kernel.sum()


def blur_mask(mask: Image.Image, sigma_x: float, sigma_y: float | None = None) -> Image.Image:
    """A1111's mask blur: a Gaussian along x, then along y (each skipped at 0), reflect-101 borders, rounded."""
    import numpy as np
    from PIL import Image as PILImage

    sigma_y = sigma_x if sigma_y is None else sigma_y
    values = np.asarray(mask.convert("L"), dtype=np.uint8)
    for axis, sigma in ((1, sigma_x), (0, sigma_y)):
        if sigma <= 0:
            continue
        kernel = gaussian_kernel(sigma)
        half = len(kernel) // 2
        pad = [(0, 0), (0, 0)]
        pad[axis] = (half, half)
        padded = np.pad(values.astype(np.float64), pad, mode="reflect")  # numpy "reflect" = OpenCV REFLECT_101
        length = values.shape[axis]
        out = np.zeros(values.shape, dtype=np.float64)
        for index, weight in enumerate(kernel):
            out += weight * (padded[:, index : index + length] if axis == 1 else padded[index : index + length, :])
        values = np.clip(np.floor(out + 0.5), 0, 255).astype(np.uint8)
    return PILImage.fromarray(values, mode="L")


def crop_region(mask: Image.Image, padding: int) -> tuple[int, int, int, int] | None:
    """The box ``(x1, y1, x2, y2)`` around the mask's non-zero pixels grown by ``padding`` (clamped to the
    image), or None for a blank mask (A1111's ``get_crop_region_v2``)."""
    box = mask.getbbox()
    if not box:
        return None
    x1, y1, x2, y2 = box
    return max(x1 - padding, 0), max(y1 - padding, 0), min(x2 + padding, mask.width), min(y2 + padding, mask.height)


def expand_crop_region(region: tuple[int, int, int, int], width: int, height: int, image_width: int,
                       image_height: int) -> tuple[int, int, int, int]:  # fmt: skip
    """``region`` grown on its short side to the ``width:height`` aspect ratio, kept inside the image (A1111's
    ``expand_crop_region``: the growth split in halves, then shifted back inside)."""

    def grow(low: int, high: int, wanted: float, limit: int) -> tuple[int, int]:
        diff = int(wanted - (high - low))
        low -= diff // 2
        high += diff - diff // 2
        if high >= limit:
            low -= high - limit
            high = limit
        if low < 0:
            high -= low
            low = 0
        return low, min(high, limit)

    x1, y1, x2, y2 = region
    if (x2 - x1) / (y2 - y1) > width / height:
        y1, y2 = grow(y1, y2, (x2 - x1) / (width / height), image_height)
    else:
        x1, x2 = grow(x1, x2, (y2 - y1) * (width / height), image_width)
    return x1, y1, x2, y2


def resize_image(mode: str, image: Image.Image, width: int, height: int) -> Image.Image:
    """A1111's ``images.resize_image`` without an upscaler (LANCZOS): ``just`` stretches, ``crop`` fills the box
    and crops the centre, ``fill`` fits inside and stretches the edge rows (or columns) into the bars."""
    from PIL import Image as PILImage

    lanczos = PILImage.Resampling.LANCZOS
    if mode == "just":
        return image.resize((width, height), resample=lanczos)
    ratio, source_ratio = width / height, image.width / image.height
    if mode == "crop":
        src_w = width if ratio > source_ratio else image.width * height // image.height
        src_h = height if ratio <= source_ratio else image.height * width // image.width
    else:
        src_w = width if ratio < source_ratio else image.width * height // image.height
        src_h = height if ratio >= source_ratio else image.height * width // image.width
    resized = image.resize((src_w, src_h), resample=lanczos)
    out = PILImage.new("RGB" if image.mode != "RGBA" else "RGBA", (width, height))
    out.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    if mode == "fill":
        if ratio < source_ratio and (bar := height // 2 - src_h // 2) > 0:
            out.paste(resized.resize((width, bar), box=(0, 0, width, 0)), box=(0, 0))
            out.paste(resized.resize((width, bar), box=(0, resized.height, width, resized.height)),
                      box=(0, bar + src_h))  # fmt: skip
        elif ratio > source_ratio and (bar := width // 2 - src_w // 2) > 0:
            out.paste(resized.resize((bar, height), box=(0, 0, 0, height)), box=(0, 0))
            out.paste(resized.resize((bar, height), box=(resized.width, 0, resized.width, height)),
                      box=(bar + src_w, 0))  # fmt: skip
    return out


def _with_alpha(image: Image.Image, keep: Image.Image) -> Image.Image:
    """``image`` (RGB) with alpha ``keep`` (A1111 pastes the premultiplied image through the mask)."""
    from PIL import Image as PILImage

    layer = PILImage.new("RGBa", image.size)
    layer.paste(image.convert("RGBA").convert("RGBa"), mask=keep)
    return layer.convert("RGBA")


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111's "fill" masked content: the unmasked pixels, ever less blurred, composited over each other, so the
    masked area takes the colours around it."""
    from PIL import Image as PILImage
    from PIL import ImageFilter, ImageOps

    kept = _with_alpha(image, ImageOps.invert(mask.convert("L"))).convert("RGBa")
    out = PILImage.new("RGBA", image.size)
    for radius, repeats in _FILL_PASSES:
        blurred = kept.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            out.alpha_composite(blurred)
    return out.convert("RGB")


@dataclasses.dataclass
class PreparedInpaint:
    """What generation needs of one inpainting: ``image`` (the init image at the output size, cropped with only
    masked, with the masked content applied), ``mask`` (the blurred mask at the output size), ``overlay`` (the
    original with its paste-back alpha) and ``paste_to`` (``x, y, w, h`` of the crop in the original, or None)."""

    settings: Inpaint
    image: Image.Image
    mask: Image.Image
    overlay: Image.Image
    paste_to: tuple[int, int, int, int] | None

    def latent_mask(self, latent_width: int, latent_height: int) -> Any:
        """A1111's ``nmask`` (1 repaints) at the latent size, float32 ``[h, w]``, rounded to 0/1."""
        import numpy as np

        small = self.mask.convert("RGB").resize((latent_width, latent_height))  # PIL's default: bicubic
        return np.around(np.asarray(small, dtype=np.float32)[:, :, 0] / 255)

    def pixels(self) -> Any:
        """The init image in [-1, 1], ``[1, 3, H, W]`` float32."""
        import numpy as np
        import torch

        array = np.asarray(self.image.convert("RGB"), dtype=np.float32) / 255.0
        return torch.from_numpy(array).permute(2, 0, 1)[None] * 2.0 - 1.0

    def conditioning_pixels(self) -> Any:
        """An inpainting model's masked image before encoding: ``lerp(image, image * (1 - m), weight)``, ``m`` the
        mask rounded to 0/1 ([-1, 1], ``[1, 3, H, W]``)."""
        import torch

        source = self.pixels()
        return torch.lerp(source, source * (1.0 - self.conditioning_mask()), self.settings.mask_weight)

    def conditioning_mask(self) -> Any:
        """The rounded mask at the image size, ``[1, 1, H, W]`` float32."""
        import numpy as np
        import torch

        values = np.asarray(self.mask.convert("L"), dtype=np.float32) / 255.0
        return torch.round(torch.from_numpy(values)[None, None])

    def paste_back(self, generated: Image.Image) -> Image.Image:
        """A1111's ``apply_overlay``: the generated image (resized back into the crop with only masked) under the
        original's unmasked pixels."""
        from PIL import Image as PILImage

        base = generated
        if self.paste_to is not None:
            x, y, w, h = self.paste_to
            base = PILImage.new("RGBA", self.overlay.size)
            base.paste(resize_image("crop", generated, w, h), (x, y))
        out = base.convert("RGBA")
        out.alpha_composite(self.overlay)
        return out.convert("RGB")


def prepare(settings: Inpaint, image: Image.Image, width: int, height: int) -> PreparedInpaint:
    """A1111's ``init`` of an inpainting (see the module's notes) for the RGB ``image`` and the output size."""
    import numpy as np
    from PIL import Image as PILImage
    from PIL import ImageOps

    mask = open_mask(settings.mask)
    if settings.invert:
        mask = ImageOps.invert(mask)
    if settings.full_res and mask.size != image.size:  # the crop box is found on the mask and cut from the image
        mask = resize_image("just", mask, *image.size)
    if settings.blur > 0:
        mask = blur_mask(mask, settings.blur)
    paste_to = None
    if settings.full_res:
        overlay_mask = mask
        region = crop_region(mask, settings.padding)
        if region is None:
            raise ConfigError("the mask is blank (nothing to repaint): --inpaint-full-res needs white in the mask")
        x1, y1, x2, y2 = expand_crop_region(region, width, height, mask.width, mask.height)
        mask = resize_image("fill", mask.crop((x1, y1, x2, y2)), width, height).convert("L")
        paste_to = (x1, y1, x2 - x1, y2 - y1)
        source = image
    else:
        mask = resize_image("just", mask, width, height)
        doubled = np.clip(np.asarray(mask, dtype=np.float32) * 2, 0, 255).astype(np.uint8)
        overlay_mask = PILImage.fromarray(doubled, mode="L")
        source = resize_image("just", image, width, height) if image.size != (width, height) else image
    if overlay_mask.size != source.size:
        overlay_mask = resize_image("just", overlay_mask, *source.size).convert("L")
    overlay = _with_alpha(source, ImageOps.invert(overlay_mask))
    if paste_to is not None:
        x1, y1, w, h = paste_to
        source = resize_image("fill", image.crop((x1, y1, x1 + w, y1 + h)), width, height)
    if settings.fill != "original":
        source = fill_masked(source, mask)
    return PreparedInpaint(settings, source.convert("RGB"), mask, overlay, paste_to)


def fill_latents(init_latent: Any, nmask: Any, fill: str, noise: Any = None) -> Any:
    """A1111's latent masked content: ``latent noise`` puts ``noise`` (the seed's) where ``nmask`` is 1, ``latent
    nothing`` zero; the other modes leave ``init_latent`` as it is."""
    if fill == "latent noise":
        return init_latent * (1 - nmask) + noise * nmask
    if fill == "latent nothing":
        return init_latent * (1 - nmask)
    return init_latent


def blend(denoised: Any, init_latent: Any, nmask: Any) -> Any:
    """A1111's mask blend: the denoised estimate where ``nmask`` is 1, the init latent elsewhere."""
    return denoised * nmask + init_latent * (1 - nmask)


def alpha_bar(scheduler: Any, timestep: Any) -> float:
    """The VP ``alpha_bar`` of the denoiser call at ``timestep``: from the sigma of the scheduler's current step
    where it keeps sigmas (Euler, Heun, LMS, DPM++, UniPC: the UNet sees ``x / sqrt(1 + sigma^2)``), else the
    trained ``alphas_cumprod`` at the (integer) timestep (DDIM, PLMS)."""
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is not None:
        index = getattr(scheduler, "step_index", None)
        if index is None:  # DPM++/UniPC set it in their first step(); img2img sets where that step begins
            begin = getattr(scheduler, "begin_index", None)
            index = begin if begin is not None else scheduler.index_for_timestep(timestep)
        sigma = float(sigmas[index])
        return 1.0 / (1.0 + sigma * sigma)
    return float(scheduler.alphas_cumprod[int(timestep)])


def blended_output(output: Any, latents: Any, ab: float, init_latent: Any, nmask: Any, prediction: str) -> Any:
    """The denoiser ``output`` (epsilon or v) whose denoised estimate is A1111's blend (:func:`blend`): the x0 the
    scheduler will read from it is ``x0 * nmask + init_latent * (1 - nmask)``. ``latents``: the denoiser's input
    (the VP latent at ``alpha_bar`` ``ab``). The blend is affine, so blending each CFG half is blending their mix."""
    import math

    import torch

    a, s = math.sqrt(ab), math.sqrt(1.0 - ab)
    work = torch.promote_types(output.dtype, torch.float32)  # at least float32 (fp16 UNets)
    z, out = latents.to(work), output.to(work)
    x0 = a * z - s * out if prediction == "v_prediction" else (z - s * out) / a
    target = blend(x0, init_latent.to(x0), nmask.to(x0))
    fixed = (a * z - target) / s if prediction == "v_prediction" else (z - a * target) / s
    return fixed.to(output.dtype)


@contextlib.contextmanager
def unet_inpainting(unet: Any, scheduler: Any, *, conditioning: Any = None, init_latent: Any = None,
                    nmask: Any = None, prediction: str = "epsilon") -> Iterator[None]:  # fmt: skip
    """While inside, ``unet`` takes the 4 latent channels the pipeline gives it: an inpainting model's image
    ``conditioning`` (``[1, 5, h, w]``: mask, masked-image latent) joins them (A1111's ``c_concat``), and with
    ``nmask`` each output is :func:`blended_output` (the per-step blend). The forward itself is wrapped (not a
    hook), so the prompt-editing hooks' own extra calls get the same treatment."""
    import torch

    had_own = "forward" in vars(unet)
    original = unet.forward

    def forward(sample: Any, timestep: Any, *args: Any, **kwargs: Any) -> Any:
        latents = sample
        if conditioning is not None:
            extra = conditioning.to(device=sample.device, dtype=sample.dtype).expand(sample.shape[0], -1, -1, -1)
            sample = torch.cat([sample, extra], dim=1)
        result = original(sample, timestep, *args, **kwargs)
        if nmask is None:
            return result
        ab = alpha_bar(scheduler, timestep)
        if isinstance(result, tuple):
            return (blended_output(result[0], latents, ab, init_latent, nmask, prediction), *result[1:])
        result.sample = blended_output(result.sample, latents, ab, init_latent, nmask, prediction)
        return result

    unet.forward = forward
    try:
        yield
    finally:
        if had_own:
            unet.forward = original
        else:
            del unet.forward


__all__ = [
    "CONDITIONAL_MASK_WEIGHT",
    "DEFAULT_FILL",
    "DEFAULT_MASK_BLUR",
    "DEFAULT_PADDING",
    "FIELDS",
    "FILL_GUIDANCE",
    "FILL_MODES",
    "ImageConditioning",
    "Inpaint",
    "PreparedInpaint",
    "alpha_bar",
    "blank_conditioning",
    "blend",
    "blended_output",
    "blur_mask",
    "crop_region",
    "expand_crop_region",
    "fill_latents",
    "fill_masked",
    "gaussian_kernel",
    "inpaint_from_fields",
    "onetrainer_conditioning",
    "open_mask",
    "prepare",
    "resize_image",
    "unet_inpainting",
]
