"""The user's own metadata in every saved ``.safetensors``: ModelSpec keys and kohya's training comment.

kohya's ``--metadata_title``, ``--metadata_author`` ... (``library/sai_model_spec.py``) become
``modelspec.title``, ``modelspec.author`` ... in the header of each LoRA, Textual Inversion and
checkpoint file it writes; that is what Civitai, SwarmUI and ComfyUI show. The runtime adds these keys
to :attr:`sdcore.train.method.SaveInfo.metadata`, so every method that writes safetensors metadata
(and passes ``SaveInfo.metadata`` on, as the first-party methods do) writes them, with the same rules:
values as given (tags stay one comma-separated text), a thumbnail file as a base64 ``data:`` URL.
``--training-comment`` is kohya's ``ss_training_comment``. Formats without a header (A1111 ``.pt``)
have nowhere to keep them.
"""

from __future__ import annotations

import base64
import mimetypes
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .options import TrainOptions

#: option -> header key, in kohya's order (``ModelSpecMetadata``'s fields, then the training comment)
METADATA_KEYS: tuple[tuple[str, str], ...] = (
    ("metadata_title", "modelspec.title"),
    ("metadata_description", "modelspec.description"),
    ("metadata_author", "modelspec.author"),
    ("metadata_license", "modelspec.license"),
    ("metadata_usage_hint", "modelspec.usage_hint"),
    ("metadata_thumbnail", "modelspec.thumbnail"),
    ("metadata_tags", "modelspec.tags"),
    ("metadata_merged_from", "modelspec.merged_from"),
    ("metadata_trigger_phrase", "modelspec.trigger_phrase"),
    ("metadata_preprocessor", "modelspec.preprocessor"),
    ("metadata_is_negative_embedding", "modelspec.is_negative_embedding"),
    ("training_comment", "ss_training_comment"),
)


def thumbnail_data_url(value: str) -> str:
    """kohya's rule: a value that is already a ``data:`` URL is kept; a file becomes
    ``data:<type guessed from its name>;base64,<its bytes>`` (``application/octet-stream`` when the
    name says nothing), so the image travels inside the model file."""
    if value.startswith("data:"):
        return value
    mime, _ = mimetypes.guess_type(value)
    data = base64.b64encode(Path(value).read_bytes()).decode("ascii")
    return f"data:{mime or 'application/octet-stream'};base64,{data}"


def user_metadata(options: TrainOptions) -> dict[str, str]:
    """The header keys the user's metadata options ask for (empty when none is given)."""
    out: dict[str, str] = {}
    for name, key in METADATA_KEYS:
        value = getattr(options, name, None)
        if value is None or value == "":
            continue
        out[key] = thumbnail_data_url(str(value)) if name == "metadata_thumbnail" else str(value)
    return out


def metadata_option_problems(options: TrainOptions) -> list[str]:
    """A thumbnail that cannot be read, reported before training (kohya only warns at the first save
    and writes the file without a thumbnail)."""
    value = options.metadata_thumbnail
    if not value or value.startswith("data:"):
        return []
    path = Path(value)
    if not path.is_file():
        return [f"--metadata-thumbnail {value}: no such file (give an image file or a data: URL)"]
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        return [f"--metadata-thumbnail {value}: cannot be read ({exc.strerror or exc})"]
    return []
