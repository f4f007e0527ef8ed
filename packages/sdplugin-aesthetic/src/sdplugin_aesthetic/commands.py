"""``sdcore aesthetic ...`` commands (click only at import; torch inside the commands)."""

from __future__ import annotations

from pathlib import Path

import click
from sdcore.cli_types import FINITE_FLOAT
from sdcore.devices import DEVICE


@click.group(name="aesthetic")
def aesthetic_group() -> None:
    """Aesthetic-gradient embeddings (arXiv 2209.12330, the A1111 extension's format)."""


def _output_path(output: Path | None, name: str | None, models_dir: Path) -> Path:
    """``-o PATH`` as given, or ``--name NAME`` as the extension's ``aesthetic_embeddings/NAME.pt`` under
    ``--models-dir`` (where ``sdcore generate --aesthetic NAME`` finds it); exactly one of the two."""
    from sdcore.errors import ConfigError
    from sdcore.io import file_stem_problem

    if name is not None and output is None:
        problem = file_stem_problem(name)
        if problem:
            raise ConfigError(problem)
        return models_dir / "aesthetic_embeddings" / f"{name}.pt"
    if output is not None and name is None:
        return output
    raise ConfigError(
        "give -o PATH, or --name NAME (the extension's Name) to write aesthetic_embeddings/NAME.pt under "
        "--models-dir, where `sdcore generate --aesthetic NAME` finds it"
    )


@aesthetic_group.command(name="create")
@click.argument("images_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--clip",
    "clip",
    default="openai/clip-vit-large-patch14",
    show_default=True,
    help="CLIPModel folder or hub id (the one your model's text encoder comes from).",
)
@click.option(
    "--output",
    "-o",
    default=None,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write the embedding (.pt); or give --name.",
)
@click.option(
    "--name",
    default=None,
    help="The extension's 'Name': write aesthetic_embeddings/NAME.pt under --models-dir, where "
    "`sdcore generate --aesthetic NAME` finds it.",
)
@click.option(
    "--models-dir",
    default="models",
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="sdcore generate's --models-dir (with --name).",
)
@click.option("--batch-size", default=256, show_default=True, type=click.IntRange(min=1), help="Images per CLIP batch.")
@click.option(
    "--device", type=DEVICE, default=None, help="torch device for CLIP (default: cuda when available, else cpu)."
)
@click.option(
    "--overwrite", is_flag=True, help="Replace the output if it already exists (else that is an error, found first)."
)
def create_command(
    images_dir: Path,
    clip: str,
    output: Path | None,
    name: str | None,
    models_dir: Path,
    batch_size: int,
    device: str | None,
    overwrite: bool,
) -> None:
    """Write the mean CLIP image embedding of IMAGES_DIR as an aesthetic embedding (-o PATH or --name NAME)."""
    output = _output_path(output, name, models_dir)  # before torch and CLIP load
    import torch
    from sdcore.errors import ConfigError
    from sdcore.io import output_problems

    from .create import create_aesthetic_embedding, list_images, save_aesthetic_embedding, subfolder_images

    problems = output_problems([output], overwrite=overwrite)  # before CLIP loads: sdcore's rule for every output
    if problems:
        raise ConfigError("; ".join(problems), problems)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    count = len(list_images(images_dir))
    embedding = create_aesthetic_embedding(images_dir, clip, batch_size, device=device)
    path = save_aesthetic_embedding(embedding, output)
    below = subfolder_images(images_dir)
    skipped = f"; {below} images in subfolders left out, as the extension leaves them" if below else ""
    click.echo(f"wrote {path} ({count} images, {embedding.shape[-1]} dims{skipped})")


_NEGATIVE_TEXT = (
    "the extension's 'Is negative text' is --aesthetic-text-negative; --aesthetic-negative is another switch: it "
    "personalises the negative prompt too"
)
_EMBEDDING = "the extension's 'Aesthetic imgs embedding' (vicgalle's --aesthetic_embedding) is --aesthetic NAME or PATH"

#: the A1111 extension's UI fields (and vicgalle's txt2img.py arguments) typed as options of ``sdcore generate``:
#: click's nearest spelling would offer --aesthetic-negative for "Is negative text", which means something else
EXTENSION_NAMES: dict[str, str] = {
    "aesthetic-embedding": _EMBEDDING,
    "aesthetic-imgs": _EMBEDDING,
    "aesthetic-imgs-embedding": _EMBEDDING,
    "aesthetic-learning-rate": "the extension's 'Aesthetic learning rate' is --aesthetic-lr",
    "aesthetic-imgs-text": "the extension's 'Aesthetic text for imgs' is --aesthetic-text",
    "aesthetic-text-for-imgs": "the extension's 'Aesthetic text for imgs' is --aesthetic-text",
    "slerp-angle": "the extension's 'Slerp angle' is --aesthetic-slerp-angle",
    "is-negative-text": _NEGATIVE_TEXT,
    "aesthetic-is-negative-text": _NEGATIVE_TEXT,
    "negative-text": _NEGATIVE_TEXT,
    "slerp-interpolation": "the extension's 'Slerp interpolation' is --aesthetic-slerp",
    "aesthetic-slerp-interpolation": "the extension's 'Slerp interpolation' is --aesthetic-slerp",
}


def register_generate_options() -> None:
    """Add the ``--aesthetic*`` flags to ``sdcore generate`` (values reach the handler's ``options``), and
    :data:`EXTENSION_NAMES` as hints for the extension's names."""
    try:
        from sdcore.builtin.generate_command import add_generate_option, add_generate_option_hint
    except ImportError:  # an sdcore without the generate command
        return
    for name, hint in EXTENSION_NAMES.items():
        add_generate_option_hint(name, hint)
    add_generate_option("--aesthetic", default=None, help="Aesthetic embedding (.pt path or name in --aesthetic-dir).")
    add_generate_option(
        "--aesthetic-dir",
        default=None,
        help="Folder of aesthetic embeddings (default: aesthetic_embeddings/ below --models-dir).",
    )
    # each does nothing without --aesthetic (the handler is off): given alone, generate refuses it
    after = {"needs": "--aesthetic"}
    add_generate_option(
        "--aesthetic-weight", type=FINITE_FLOAT, default=0.9, show_default=True, help="Blend weight (0: off).", **after
    )
    add_generate_option(
        "--aesthetic-steps", type=int, default=5, show_default=True, help="Text-encoder tuning steps.", **after
    )
    add_generate_option(
        "--aesthetic-lr", type=FINITE_FLOAT, default=1e-4, show_default=True, help="Tuning learning rate.", **after
    )
    add_generate_option("--aesthetic-text", default=None, help="Text to slerp the aesthetic target toward.", **after)
    add_generate_option(
        "--aesthetic-text-negative",
        is_flag=True,
        default=False,
        help="Move away from --aesthetic-text instead.",
        **after,
    )
    add_generate_option(
        "--aesthetic-slerp-angle",
        type=FINITE_FLOAT,
        default=0.1,
        show_default=True,
        help="Slerp toward the text.",
        **after,
    )
    add_generate_option(
        "--aesthetic-slerp", is_flag=True, default=False, help="Blend by slerp instead of linearly.", **after
    )
    add_generate_option(
        "--aesthetic-clip", default=None, help="CLIPModel folder or hub id (default: the family's CLIP).", **after
    )
    add_generate_option(
        "--aesthetic-negative",
        is_flag=True,
        default=False,
        help="Personalise the negative prompt too (A1111 does).",
        **after,
    )
