"""Embeddings stored in images, as A1111 writes them into training previews.

Two independent encodings (research 1.3):

- the ``sd-ti-embedding`` PNG text chunk: base64 of a JSON dict whose tensors are written as
  ``{"TORCHTENSOR": nested lists}``;
- data in the pixels, which survives metadata stripping: the zlib-compressed JSON split into low
  and high nibbles, laid out as two ``h x w' x 3`` blocks left and right of the picture (each
  separated by one black column), decorated with a dot pattern in the high nibble and masked
  with an LCG stream in the low nibble.

We read both and write the text-chunk form (plus, optionally, the pixel form).
"""

from __future__ import annotations

import base64
import json
import zlib
from pathlib import Path
from typing import Any

from sdcore.errors import ModelFormatError
from sdcore.io import atomic_path

from .embedding import Embedding

TEXT_KEY = "sd-ti-embedding"
_TENSOR_KEY = "TORCHTENSOR"


# --- JSON with tensors ---------------------------------------------------------------------------
def _encode_value(value: Any) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        return {_TENSOR_KEY: value.detach().cpu().float().tolist()}
    if isinstance(value, dict):
        return {str(k): _encode_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode_value(v) for v in value]
    return value


def _decode_hook(obj: dict[str, Any]) -> Any:
    if _TENSOR_KEY in obj:
        import torch

        return torch.tensor(obj[_TENSOR_KEY], dtype=torch.float32)
    return obj


def data_to_json(data: dict[str, Any]) -> str:
    return json.dumps(_encode_value(data))


def data_from_json(text: str | bytes) -> Any:
    return json.loads(text, object_hook=_decode_hook)


def data_to_b64(data: dict[str, Any]) -> str:
    return base64.b64encode(data_to_json(data).encode("utf-8")).decode("ascii")


def data_from_b64(text: str) -> Any:
    return data_from_json(base64.b64decode(text))


# --- pixel encoding ------------------------------------------------------------------------------
def _lcg_nibbles(count: int) -> Any:
    """The low 4 bits of an LCG stream (m=2^32, a=1664525, c=1013904223, seed 0, each value % 255)."""
    import numpy as np

    out = np.empty(count, dtype=np.uint8)
    state = 0
    for i in range(count):
        state = (1664525 * state + 1013904223) % 4294967296
        out[i] = (state % 255) & 0x0F
    return out


def _mask_with_lcg(block: Any) -> Any:
    import numpy as np

    stream = _lcg_nibbles(int(block.size)).reshape(block.shape)
    return np.bitwise_xor(block.astype(np.uint8), stream)


def _dot_pattern(height: int, width: int, shades: Any) -> Any:
    """6-px dots on an 8-px grid, alternate rows shifted by 4, in the given shades (high nibble only)."""
    import numpy as np
    from PIL import Image, ImageDraw

    canvas = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(canvas)
    index = 0
    for x in range(-6, width, 8):
        for row, y in enumerate(range(-6, height, 8)):
            shift = 4 if row % 2 == 0 else 0
            shade = int(shades[index % len(shades)])
            index += 1
            draw.ellipse((x + shift, y, x + shift + 6, y + 6), fill=(shade, shade, shade))
    return np.asarray(canvas, dtype=np.uint8) & 0xF0


def _style_shades(data: dict[str, Any]) -> Any:
    import numpy as np

    params = data.get("string_to_param") or {k: v for k, v in data.items() if k in ("clip_l", "clip_g")}
    first = next(iter(params.values())) if params else None
    if first is None:
        return np.array([128], dtype=np.uint8)
    values = np.abs(first.detach().cpu().float().numpy().reshape(first.shape[0], -1)[0][:1024])
    peak = float(values.max()) or 1.0
    return (values / peak * 255).astype(np.uint8)


def embed_in_pixels(image: Any, data: dict[str, Any]) -> Any:
    """Return a new RGB image: [low block | black | image | black | high block] (A1111's layout)."""
    import numpy as np
    from PIL import Image

    payload = np.frombuffer(zlib.compress(data_to_json(data).encode("utf-8"), level=9), dtype=np.uint8)
    height = image.size[1]
    # A1111's padding: up to the next multiple of h, then to the next multiple of 3h (both steps
    # always add something); the padding repeats the data and is ignored after the zlib stream
    size = len(payload) + height - len(payload) % height
    size += 3 * height - size % (3 * height)
    low = np.resize(payload & 0x0F, size).reshape(height, -1, 3)
    high = np.resize(payload >> 4, size).reshape(height, -1, 3)
    shades = _style_shades(data)
    low = _mask_with_lcg(low ^ _dot_pattern(low.shape[0], low.shape[1], shades))
    high = _mask_with_lcg(high ^ _dot_pattern(high.shape[0], high.shape[1], shades[::-1]))
    picture = np.asarray(image.convert("RGB"), dtype=np.uint8)
    black = np.zeros((height, 1, 3), dtype=np.uint8)
    return Image.fromarray(np.concatenate([low, black, picture, black, high], axis=1), mode="RGB")


def _crop_black_border(pixels: Any) -> Any:
    import numpy as np

    lit = (pixels > 0).all(axis=2)
    cols = np.flatnonzero(lit.any(axis=0))
    rows = np.flatnonzero(lit.any(axis=1))
    if len(cols) == 0 or len(rows) == 0:
        return pixels[:0, :0]
    return pixels[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def extract_from_pixels(image: Any) -> Any | None:
    """Decode the pixel encoding; ``None`` when the image carries none."""
    import numpy as np

    pixels = _crop_black_border(np.asarray(image.convert("RGB"), dtype=np.uint8)) & 0x0F
    zero_cols = np.flatnonzero(pixels.sum(axis=(0, 2)) == 0)
    if len(zero_cols) < 2:
        return None
    low = _mask_with_lcg(pixels[:, : zero_cols.min(), :])
    high = _mask_with_lcg(pixels[:, zero_cols.max() + 1 :, :])
    if low.shape != high.shape or low.size == 0:
        return None
    raw = ((high << 4) | low).astype(np.uint8).tobytes()
    try:
        text = zlib.decompressobj().decompress(raw)
        return data_from_json(text)
    except (zlib.error, ValueError, UnicodeDecodeError):
        return None


# --- files ---------------------------------------------------------------------------------------
def read_image_embedding(path: str | Path) -> Any:
    """The embedding dict in an image (text chunk first, then pixels)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()
            text = dict(getattr(image, "text", None) or {})
            text.update({k: v for k, v in image.info.items() if isinstance(v, str)})
            if TEXT_KEY in text:
                try:
                    return data_from_b64(text[TEXT_KEY])
                except (ValueError, TypeError) as exc:
                    raise ModelFormatError(f"{path}: broken {TEXT_KEY} chunk: {exc}") from exc
            data = extract_from_pixels(image)
    except (OSError, UnidentifiedImageError) as exc:
        raise ModelFormatError(f"{path}: not a readable image: {exc}") from exc
    if data is None:
        raise ModelFormatError(f"{path}: image carries no embedding (no {TEXT_KEY} chunk, no pixel data)")
    return data


def preview_image(emb: Embedding, size: int = 128) -> Any:
    """A small picture of the vectors (one row of grey bars per vector) when no preview is given."""
    import numpy as np
    from PIL import Image

    tensor = next(iter(emb.vectors.values())).detach().cpu().float()
    rows = tensor.numpy()
    peak = float(np.abs(rows).max()) or 1.0
    shades = (np.abs(rows) / peak * 255).astype(np.uint8)
    grid = np.repeat(np.repeat(shades, max(1, size // shades.shape[0]), axis=0), 1, axis=1)
    return Image.fromarray(grid, mode="L").resize((size, size)).convert("RGB")


def write_png_embedding(emb: Embedding, path: str | Path, *, preview: Any = None, pixels: bool = False) -> Path:
    """Write a PNG with the ``sd-ti-embedding`` chunk (and, with ``pixels``, the pixel strips)."""
    from PIL.PngImagePlugin import PngInfo

    from .formats import a1111_dict

    data = a1111_dict(emb)
    image = (preview if preview is not None else preview_image(emb)).convert("RGB")
    if pixels:
        image = embed_in_pixels(image, data)
    info = PngInfo()
    info.add_text(TEXT_KEY, data_to_b64(data))
    path = Path(path)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    return path
