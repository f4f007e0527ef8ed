"""``sdcore model ...``: inspect, convert and create models. Imports click only; torch inside commands."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ..hookspecs import hookimpl
from ..io import OVERWRITE_HELP
from .part_options import models_dir_options, part_options, resolve_command_sources


@click.group("model")
def model_group() -> None:
    """Inspect, convert and create Stable Diffusion models (diffusers folders, single files)."""


def _param_count(module: Any) -> int:
    return sum(p.numel() for p in module.parameters())


def _dtypes(module: Any) -> str:
    return ",".join(sorted({str(p.dtype).removeprefix("torch.") for p in module.parameters()}))


_SOURCE_WORDS = {
    "modelspec": "its modelspec.prediction_type",
    "sdcore.config": "its sdcore.config",
    "v_pred key": "its v_pred key",
    "scheduler config": "its scheduler config",
    "default": "not declared: the family's default",
}


def _prediction_source(path: str, chosen: str | None, bundle: Any) -> str:
    """`` (why)``: what made an SD1/SD2/SDXL model epsilon or v, read from the file's header (a v-prediction
    merge that declares nothing loads as epsilon, and a user needs to see that it was a guess)."""
    if chosen is not None:
        return " (--prediction-type)"
    if bundle.family_spec.objective != "ddpm":
        return ""
    from ..errors import SdcoreError
    from ..models.layout import read_layout

    try:
        source = read_layout(path).prediction_source
    except SdcoreError:
        return ""
    return f" ({_SOURCE_WORDS.get(source, f'{source} beside the file' if source.endswith('.yaml') else source)})"


@model_group.command("info")
@click.argument("path", metavar="MODEL")
@click.option(
    "--prediction-type",
    type=click.Choice(["epsilon", "v_prediction"]),
    default=None,
    help="Override the detected prediction type.",
)
@click.option(
    "--config", "config", default=None, help="Diffusers folder with the configs of a non-standard single file."
)
@click.option("--no-hash", is_flag=True, help="Skip hashing (hashing a large file takes a while).")
@part_options(names=True)
@models_dir_options(what="MODEL")
def info_command(path: str, prediction_type: str | None, config: str | None, no_hash: bool, **params: Any) -> None:
    """Show family, prediction type, components, metadata and hashes of MODEL: a diffusers folder, a
    .safetensors/.ckpt file, tiny:<family>, or a model's name in --models-dir as sdcore generate's --model takes
    it (ComfyUI's ckpt_name, an A1111 title or hash; an existing path wins)."""
    from ..models.hashes import all_hashes
    from ..models.load import load_model

    path, given = resolve_command_sources(path, params)
    bundle = load_model(path, prediction_type=prediction_type, config=config, dtype="auto", **given)
    click.echo(f"model:           {path}")
    click.echo(f"format:          {bundle.source_format}")
    click.echo(f"family:          {bundle.family_label} ({bundle.family_spec.label})")
    variant = _variant(bundle)
    if variant:
        click.echo(f"variant:         {variant}")
    click.echo(f"prediction type: {bundle.prediction_type}{_prediction_source(path, prediction_type, bundle)}")
    from ..models.detect import unused_a1111_vae

    beside = unused_a1111_vae(path, bundle.source_format, bundle.family, bool(given.get("vae")))
    if beside is not None:
        click.echo(f"VAE beside it:   {beside.name} (A1111 uses it; sdcore only with --vae)")
    click.echo("components:")
    parts = bundle.components()
    for name, module in parts.items():
        click.echo(f"  {name:<15} {type(module).__name__:<28} {_dtypes(module):<9} {_param_count(module):>13,} params")
    absent = [name for name in (*bundle.family_spec.components, "vae") if name not in parts]
    if absent:  # a transformer-only Flux file: the parts come from separate files when training/generating
        click.echo(f"  not in the model: {', '.join(absent)}")
    if bundle.metadata:
        click.echo("metadata:")
        for key in sorted(bundle.metadata):
            value = bundle.metadata[key]
            if key == "sdcore.config" or len(value) > 100:
                value = value[:97] + "..."
            click.echo(f"  {key}: {value}")
    source = Path(path)
    if not no_hash and source.is_file():
        click.echo("hashes:")
        hashes = all_hashes(source)
        click.echo(f"  legacy (A1111 old, AutoV1): {hashes['legacy']}")
        click.echo(f"  sha256:                     {hashes['sha256']}")
        click.echo(f"  short (AutoV2):             {hashes['short']}")
        if "autov3" in hashes:
            click.echo(f"  AutoV3 (tensor data):       {hashes['autov3']}")


def _variant(bundle: Any) -> str | None:
    """The release within a family when its adapter tells them apart (optional ``release(bundle)``:
    SD3 medium / SD3.5 large / SD3.5 medium, FLUX.1 dev / schnell)."""
    from ..models.family import family_adapter

    release = getattr(family_adapter(bundle.family_spec), "release", None)
    return release(bundle) if release is not None else None


@model_group.command("convert")
@click.argument("src")
@click.argument("dst", type=click.Path(dir_okay=True, file_okay=True))
@click.option(
    "--to",
    "to",
    type=click.Choice(["single-file", "diffusers", "bfl"]),
    default=None,
    help="Output format (default: single-file when DST ends in .safetensors, else diffusers; a .ckpt/.pt DST is "
    "refused, single files are safetensors; bfl: a Flux transformer alone in Black Forest Labs' keys). DST is never "
    "SRC nor a diffusers folder holding it.",
)
@click.option("--dtype", type=click.Choice(["fp16", "bf16", "fp32"]), default=None, help="Save precision.")
@click.option("--prune/--no-prune", default=True, show_default=True, help="Drop EMA and training state.")
@click.option("--ema", is_flag=True, help="Use the EMA UNet weights of a training checkpoint.")
@click.option(
    "--prediction-type",
    type=click.Choice(["epsilon", "v_prediction"]),
    default=None,
    help="Override the detected prediction type (written to the output's metadata).",
)
@click.option(
    "--config", "config", default=None, help="Diffusers folder with the configs of a non-standard single file."
)
@click.option("--overwrite", is_flag=True, help=OVERWRITE_HELP)
@part_options(names=True)
@models_dir_options(what="SRC")
def convert_command(src: str, dst: str, to: str | None, dtype: str | None, prune: bool, ema: bool,
                    prediction_type: str | None, config: str | None, overwrite: bool, **params: Any) -> None:  # fmt: skip
    """Convert SRC (folder, single file, tiny:<family>, or a model's name in --models-dir as sdcore generate's
    --model takes it) to DST (an SD3/Flux denoiser file plus its parts given as --clip-l, --clip-g, --t5xxl, --vae
    becomes one checkpoint)."""
    from ..errors import ConfigError
    from ..models.load import load_model
    from ..models.save import model_output_problems, save_format

    fmt = save_format(dst, to)  # a .ckpt DST: refused before the model is read
    src, given = resolve_command_sources(src, params)
    # an earlier model at DST is replaced only with --overwrite, and never SRC or a part it reads
    sources = [src, *(str(value) for value in given.values() if isinstance(value, (str, Path)))]
    found = model_output_problems(Path(dst), sources, overwrite=overwrite, format=fmt, option="DST")
    if found:
        raise ConfigError("; ".join(found), found)
    bundle = load_model(src, use_ema=ema, prediction_type=prediction_type, config=config, **given)
    out = bundle.save(dst, format=to, dtype=dtype, prune=prune)
    click.echo(f"wrote {out} ({bundle.family_label}, {bundle.prediction_type})")


@model_group.command("create-tiny")
@click.argument("dst", type=click.Path(dir_okay=True, file_okay=True))
@click.option(
    "--family",
    default="sd1",
    show_default=True,
    help="Model family: sd1, sd2, sdxl (and sd1-inpainting, sd2-inpainting, sdxl-inpainting), sd3, flux (FLUX.1-dev), "
    "flux-schnell, flux-kontext, flux-fill, flux-depth, flux-canny, chroma, or another declared family "
    "(sdcore plugins --all lists them; FAMILY-VARIANT picks a variant).",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["diffusers", "single-file"]),
    default=None,
    help="Default: single-file when DST ends in .safetensors, else diffusers (a .ckpt/.pt DST is refused).",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--overwrite", is_flag=True, help=OVERWRITE_HELP)
def create_tiny_command(dst: str, family: str, fmt: str | None, seed: int, overwrite: bool) -> None:
    """Write a tiny random model with the real layout of FAMILY (for tests and demos)."""
    from ..errors import ConfigError
    from ..models.family import family_adapter
    from ..models.load import tiny_family
    from ..models.native import TINY_METADATA_KEY
    from ..models.save import model_output_problems, save_format

    # a .ckpt DST is refused, not made a folder of that name; an earlier file at DST is kept unless --overwrite
    found = model_output_problems(Path(dst), [], overwrite=overwrite, format=save_format(dst, fmt), option="DST")
    if found:
        raise ConfigError("; ".join(found), found)
    name, variant = tiny_family(family)
    bundle = family_adapter(name).create_tiny(seed=seed, **variant)
    # the mark that lets the file train and render at tiny:FAMILY's 64 (a family's writer keeps the metadata given)
    out = bundle.save(dst, format=fmt, metadata={TINY_METADATA_KEY: family.strip().lower()})
    click.echo(f"wrote {out} (tiny {family.strip().lower()})")


@hookimpl
def sdcore_register_commands(cli: click.Group) -> None:
    cli.add_command(model_group)
