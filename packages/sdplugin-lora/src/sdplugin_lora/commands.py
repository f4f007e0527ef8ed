"""``sdcore lora ...``: merge, extract, resize, info, targets (click only here; torch inside commands)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from sdcore.cli_types import FINITE_FLOAT, FiniteFloatRange
from sdcore.hinted_command import HintedCommand, hint_key
from sdcore.io import OVERWRITE_HELP


def _load_model(source: str) -> Any:
    """A model from any source ``sdcore.load_model`` reads (``tiny:sd1`` included)."""
    from sdcore.models.load import load_model

    return load_model(source)


def _parse_weighted(values: tuple[str, ...]) -> list[tuple[str, float]]:
    """``file.safetensors[:ratio]`` (ratio 1.0 by default); a ratio that is no number is an error
    (naming the file and the ratio) when the file before it exists."""
    from sdcore.errors import ConfigError

    out = []
    bad = []
    for value in values:
        path, sep, ratio = value.rpartition(":")
        if sep and path and not Path(value).exists():
            try:
                out.append((path, float(ratio)))
                continue
            except ValueError:
                if Path(path).exists():
                    bad.append(f"{value}: the ratio {ratio!r} is not a number")
                    continue
        out.append((value, 1.0))
    if bad:
        raise ConfigError("; ".join(bad))
    return out


def lora_suffix_problem(output: str, option: str = "-o") -> str | None:
    """Why ``output`` is no name for a LoRA file, or ``None``. sdcore writes LoRA files as safetensors only: under
    ``.pt``/``.ckpt`` A1111, ComfyUI (and sdcore itself) read the file as a pickle and fail, and a name with
    another or no suffix is not listed by their LoRA pickers at all. ``option``: the flag that names the file."""
    from sdcore.models.source import PICKLE_SUFFIXES

    path = Path(output)
    if not path.name.strip():  # -o "" or "  " (an unset shell variable): nothing to suggest a suffix for
        return f"-o {output!r}: no file name; give the LoRA file to write, e.g. -o my_lora.safetensors"
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return None
    if suffix in PICKLE_SUFFIXES:
        why = f"A1111 and ComfyUI would read a {path.suffix} file as a pickle and fail"
        name = path.stem
    else:  # no suffix, or a dot inside the name ("mychar.v2")
        why = "A1111's and ComfyUI's LoRA lists show only files with a weight suffix"
        name = path.name
    return (
        f"{option} {output}: sdcore writes LoRA files as .safetensors ({why}); use {option} "
        f"{path.with_name(name + '.safetensors')}"
    )


def _check_output(
    output: str,
    inputs: list[str],
    overwrite: bool,
    problems: list[str] | None = None,
    *,
    model_format: str | None = None,
) -> None:
    """``sdcore.io.output_problems`` for ``output`` (sdcore's rule for every written file), with the command's
    other ``problems`` and, for a LoRA output, its suffix, all in one :class:`ConfigError` before any model or file
    is read. A model output (``model_format``, :func:`sdcore.models.save.save_format`) follows ``sdcore model
    convert``'s rule (:func:`sdcore.models.save.model_output_problems`: it may be a diffusers folder); a LoRA output
    with no file name (``-o ""``) is the suffix check's one problem, not also "``.`` is a folder"."""
    from sdcore.errors import ConfigError
    from sdcore.io import output_problems

    if model_format is not None:
        from sdcore.models.save import model_output_problems

        written = model_output_problems(Path(output), inputs, overwrite=overwrite, format=model_format)
    else:
        suffix = lora_suffix_problem(output)
        blank = not Path(output).name.strip()
        written = [
            *([suffix] if suffix else []),
            *(output_problems([Path(output)], inputs=inputs, overwrite=overwrite) if not blank else []),
        ]
    found = [*(problems or []), *written]
    if found:
        raise ConfigError("; ".join(found), found)


def _read_loras(files: list[str]) -> list[Any]:
    """Each LoRA file read before any model loads (a junk file found only after a 6 GB model loaded wastes the
    load), one line for each that cannot be, all at once."""
    from sdcore.errors import ConfigError, SdcoreError

    from .format import read_lora

    read, problems = [], []
    for file in files:
        try:
            read.append(read_lora(file))
        except SdcoreError as exc:
            problems.append(str(exc))
    if problems:
        raise ConfigError("; ".join(problems), problems)
    return read


def _readable_models(sources: dict[str, str]) -> None:
    """Each model ``sources`` names (``BASE``/``TUNED`` -> path) read from its header (the layout, no weights),
    before the first of them loads: the second one's problem is said without loading the first."""
    from sdcore.errors import ConfigError, SdcoreError
    from sdcore.models.layout import LayoutUnavailableError, read_layout

    problems = []
    for source in sources.values():
        try:
            read_layout(source)
        except LayoutUnavailableError:  # readable; its family describes it only once loaded
            pass
        except SdcoreError as exc:
            problems.append(str(exc))
    if problems:
        raise ConfigError("; ".join(problems), problems)


_SAVE_PRECISION = "did you mean --save-dtype? kohya's --save_precision: fp16, bf16, or fp32 for its float"
_SAVE_TO = "kohya's --save_to is -o/--output here"
_RATIOS = "kohya's --ratios: each ratio follows its file, a.safetensors:0.7 b.safetensors:0.3"

#: the names of kohya's networks/*.py scripts (resize_lora.py, merge_lora.py, svd_merge_lora.py,
#: extract_lora_from_models.py) typed on the command of the same job, by command and by the name as typed with
#: underscores: what each is here. click alone suggests a near spelling of another meaning (resize's --model, the
#: LoRA to resize in kohya, became --base-model; merge's --sd_model and --models too; --save_to became --save-dtype)
_KOHYA_SCRIPT_HINTS: dict[str, dict[str, str]] = {
    "resize": {
        "model": "kohya's resize_lora.py --model, the LoRA to resize, is the FILE argument here: "
        "sdcore lora resize FILE -o OUT --rank N",
        "new_rank": "did you mean --rank? kohya's --new_rank",
        "new_conv_rank": "did you mean --conv-rank? kohya's --new_conv_rank",
        "dynamic_method": "did you mean --dynamic? kohya's --dynamic_method",
        "save_to": _SAVE_TO,
        "save_precision": _SAVE_PRECISION,
    },
    "merge": {
        "sd_model": "did you mean --model? kohya's merge_lora.py --sd_model, the checkpoint to merge into",
        "models": "kohya's --models: the LoRA files are the arguments here, each FILE[:RATIO]: "
        "sdcore lora merge a.safetensors:0.7 b.safetensors:0.3 -o OUT",
        "ratios": _RATIOS,
        "new_rank": "did you mean --rank? svd_merge_lora.py's --new_rank is --rank with --mode svd",
        "new_conv_rank": "did you mean --conv-rank? svd_merge_lora.py's --new_conv_rank, with --mode svd",
        "concat": "kohya's --concat is --mode concat here, the default",
        "save_to": _SAVE_TO,
        "save_precision": _SAVE_PRECISION,
    },
    "extract": {
        "model_org": "kohya's --model_org is BASE, the first argument here: sdcore lora extract BASE TUNED -o OUT",
        "model_tuned": "kohya's --model_tuned is TUNED, the second argument here: sdcore lora extract BASE TUNED -o OUT",
        "dim": "did you mean --rank? kohya's extract_lora_from_models.py --dim",
        "conv_dim": "did you mean --conv-rank? kohya's --conv_dim",
        "save_to": _SAVE_TO,
        "save_precision": _SAVE_PRECISION,
    },
    "convert": {"save_to": _SAVE_TO, "save_precision": _SAVE_PRECISION},
}


class _ToolCommand(HintedCommand):
    """A ``sdcore lora`` tool: kohya's script names for the same job (:data:`_KOHYA_SCRIPT_HINTS`), a family flag
    (``--sdxl``, ``--v2``: read from the files) and an option typed with underscores say sdcore's option, where
    click would offer a near spelling that means something else."""

    def option_hint(self, ctx: click.Context, option: str) -> str | None:
        from sdcore.train.kohya import family_flag_hint

        table = {hint_key(name): hint for name, hint in _KOHYA_SCRIPT_HINTS.get(self.name or "", {}).items()}
        return self.table_hint(table, option) or self.hyphenated_hint(ctx, option) or family_flag_hint(option)


@click.group("lora")
def lora_group() -> None:
    """LoRA files: merge, extract, resize, convert, info (kohya format), extract-embeddings (a bundle as embedding
    files); targets: what a training run adapts."""


@lora_group.command("info", cls=_ToolCommand)
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--tags", "top_tags", default=20, show_default=True, help="How many most frequent training tags to show.")
@click.option("--json", "as_json", is_flag=True, help="Print everything (metadata included) as JSON.")
def info_command(file: str, top_tags: int, as_json: bool) -> None:
    """Metadata, module counts, ranks and base model of a LoRA FILE."""
    from .tools import lora_info

    info = lora_info(file, top_tags=top_tags)
    if as_json:
        click.echo(json.dumps(info, indent=2, default=str))
        return
    click.echo(f"file:        {info['file']}")
    if info["layout"]:  # described all the same; one line says why sdcore applies none of it
        click.echo(f"layout:      {info['layout']}")
        click.echo(f"cannot be applied by sdcore: {info['cannot_apply']}")
    click.echo(f"title:       {info['title']}")
    label = f" - {info['family_label']}" if info.get("family_label") else ""
    arch = f", {info['architecture']}" if info.get("architecture") else ""
    click.echo(f"family:      {info['family'] or 'unknown'}{label} (from {info['family_from']}{arch})")
    click.echo(f"base model:  {info['base_model'] or 'unknown'}")
    click.echo(f"network:     {info['network_module'] or 'unknown'}  algorithm {info['algorithm']}")
    shapes = info["shapes"]
    click.echo(
        f"modules:     {info['modules']}  {info['parts']}  (linear: {shapes['linear']}, "
        f"1x1 conv: {shapes['conv1x1']}, 3x3 conv: {shapes['conv3x3']})"
    )
    extras = [
        f"{label}: {info[key]}"
        for key, label in (
            ("dora_modules", "DoRA"),
            ("tucker_modules", "Tucker"),
            ("full_matrix_modules", "full-matrix"),
            ("bias_modules", "lora_up bias"),
            ("norm_scales", "norm scales (set in full)"),
        )
        if info[key]
    ]
    click.echo(f"kinds:       {info['kinds']}" + (f"  ({', '.join(extras)})" if extras else ""))
    if info["zero_modules"]:  # a control LoRA's stand-ins for the Linears it left out: not in ranks/alphas below
        click.echo(
            f"zero:        {info['zero_modules']} zero placeholder modules (not trained), left out of ranks and alphas"
        )
    if info["control"]:
        click.echo(f"control:     {info['control']}: apply it with a control image (--control-image)")
    click.echo(f"ranks:       {info['ranks']}")
    click.echo(f"alphas:      {info['alphas']}")
    if info["block_dims"]:
        click.echo(f"block dims:  {','.join(map(str, info['block_dims']))}")
    if info["conv_block_dims"]:
        click.echo(f"conv blocks: {','.join(map(str, info['conv_block_dims']))}")
    click.echo(f"hash:        {(info['hash'] or '')[:12] or 'none'}")
    for emb in info["embeddings"]:  # the prompt word works while the LoRA is in the prompt (A1111 1.7+)
        click.echo(f"embedding:   {emb['name']}: {emb['description']}")
    if info["unknown_keys"]:
        click.echo(f"unknown keys ({len(info['unknown_keys'])}): {', '.join(info['unknown_keys'][:10])}")
    if info["top_tags"]:
        click.echo("top tags:    " + ", ".join(f"{tag} ({n})" for tag, n in info["top_tags"]))


@lora_group.command("extract", cls=_ToolCommand)
@click.argument("base")
@click.argument("tuned")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Output .safetensors.")
@click.option("--rank", default=4, show_default=True, help="Rank of Linear/1x1 modules.")
@click.option("--conv-rank", type=int, default=None, help="Also extract 3x3 convs at this rank (LoCon).")
@click.option(
    "--clamp-quantile",
    type=FINITE_FLOAT,
    default=0.99,
    show_default=True,
    help="Clamp factors to this quantile (1 = off).",
)
@click.option(
    "--min-diff",
    type=FINITE_FLOAT,
    default=0.01,
    show_default=True,
    help="Skip text encoders whose weights differ less.",
)
@click.option("--no-text-encoder", is_flag=True, help="Extract the UNet only.")
@click.option("--save-dtype", type=click.Choice(["fp16", "bf16", "fp32"]), default="fp16", show_default=True)
@click.option("--overwrite", is_flag=True, help=OVERWRITE_HELP)
def extract_command(
    base: str,
    tuned: str,
    output: str,
    rank: int,
    conv_rank: int | None,
    clamp_quantile: float,
    min_diff: float,
    no_text_encoder: bool,
    save_dtype: str,
    overwrite: bool,
) -> None:
    """A LoRA approximating TUNED - BASE (SVD of the weight differences, kohya-style)."""
    from sdcore.io import same_place

    from .format import save_lora
    from .tools import extract_lora

    same = same_place(Path(base), tuned)  # said before two models are read for a difference of zero
    problems = [f"BASE {base} and TUNED {tuned} are the same model: nothing to extract; give the fine-tune as TUNED"]
    _check_output(output, [base, tuned], overwrite, problems if same else None)
    _readable_models({"BASE": base, "TUNED": tuned})

    result = extract_lora(
        _load_model(base),
        _load_model(tuned),
        rank=rank,
        conv_rank=conv_rank,
        clamp_quantile=clamp_quantile,
        min_diff=min_diff,
        text_encoder=not no_text_encoder,
    )
    path = save_lora(output, result.tensors, result.metadata, dtype=save_dtype)
    note = " (text encoders unchanged: skipped)" if result.skipped_text_encoder else ""
    click.echo(f"wrote {path}: {result.modules} modules{note}")


@lora_group.command("resize", cls=_ToolCommand)
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False))
@click.option("--rank", required=True, type=int, help="New rank (the cap with --dynamic).")
@click.option("--conv-rank", type=int, default=None, help="New rank of 3x3 conv modules (default --rank).")
@click.option(
    "--dynamic",
    type=click.Choice(["sv_ratio", "sv_fro", "sv_cumulative"]),
    default=None,
    help="Choose each module's rank from its singular values.",
)
@click.option(
    "--dynamic-param",
    type=FiniteFloatRange(min=0, min_open=True),
    default=None,
    help="sv_ratio: max ratio; sv_fro/sv_cumulative: fraction kept.",
)
@click.option(
    "--base-model",
    default=None,
    help="The model the files were trained on: needed for DoRA (merge) and OFT modules, whose change depends on it.",
)
@click.option("--save-dtype", type=click.Choice(["fp16", "bf16", "fp32"]), default="fp16", show_default=True)
@click.option("--overwrite", is_flag=True, help=OVERWRITE_HELP)
def resize_command(
    file: str,
    output: str,
    rank: int,
    conv_rank: int | None,
    dynamic: str | None,
    dynamic_param: float | None,
    base_model: str | None,
    save_dtype: str,
    overwrite: bool,
) -> None:
    """Re-factor a LoRA-family FILE (any algorithm) to a LoRA of a new rank, keeping its strength."""
    from .format import save_lora
    from .tools import resize_lora

    _check_output(output, [file, *([base_model] if base_model else [])], overwrite)

    (lora,) = _read_loras([file])
    base = _load_model(base_model) if base_model else None
    result = resize_lora(lora, rank, conv_rank=conv_rank, dynamic=dynamic, dynamic_param=dynamic_param, base=base)
    path = save_lora(output, result.tensors, result.metadata, dtype=save_dtype)
    new_ranks = sorted({new for _, new in result.ranks.values()})
    kept = sum(result.fro_retained.values()) / max(len(result.fro_retained), 1)
    click.echo(f"wrote {path}: {len(result.ranks)} modules, ranks {new_ranks}, mean Frobenius norm kept {kept:.3f}")


@lora_group.command("merge", cls=_ToolCommand)
@click.argument("loras", nargs=-1, required=True)
@click.option("-o", "--output", required=True, type=click.Path(), help="Output file (.safetensors).")
@click.option(
    "--model", default=None, help="Merge into this checkpoint and write a model (else: merge LoRAs into one LoRA)."
)
@click.option(
    "--mode",
    type=click.Choice(["concat", "svd"]),
    default="concat",
    show_default=True,
    help="LoRA+LoRA: stack ranks (exact, plain LoRA/LoCon) or sum the changes and SVD to --rank (every algorithm).",
)
@click.option(
    "--rank", type=int, default=None, help="Rank for --mode svd (default 4, kohya svd_merge_lora.py's --new_rank)."
)
@click.option("--conv-rank", type=int, default=None, help="3x3 conv rank for --mode svd (default: --rank).")
@click.option(
    "--clamp-quantile",
    type=FINITE_FLOAT,
    default=0.99,
    show_default=True,
    help="--mode svd: clamp the factors to this quantile, as kohya's svd_merge_lora.py (1 = off).",
)
@click.option(
    "--base-model",
    default=None,
    help="The model the files were trained on: needed for DoRA (merge) and OFT modules, whose change depends on it.",
)
@click.option("--save-dtype", type=click.Choice(["fp16", "bf16", "fp32"]), default="fp16", show_default=True)
@click.option("--overwrite", is_flag=True, help=OVERWRITE_HELP)
def merge_command(
    loras: tuple[str, ...],
    output: str,
    model: str | None,
    mode: str,
    rank: int | None,
    conv_rank: int | None,
    clamp_quantile: float,
    base_model: str | None,
    save_dtype: str,
    overwrite: bool,
) -> None:
    """Merge LORAS (each FILE[:RATIO]) into a checkpoint (--model) or into one LoRA."""
    from sdcore.errors import ConfigError

    from .format import save_lora
    from .tools import merge_into_model, merge_loras

    problems: list[str] = []
    try:
        weighted = _parse_weighted(loras)
    except ConfigError as exc:
        problems = exc.problems  # the files are still checked against -o: every problem at once
        heads = [value.rpartition(":")[0] for value in loras]
        weighted = [(head if head and Path(head).exists() else v, 1.0) for head, v in zip(heads, loras, strict=True)]
    sources = [p for p, _ in weighted] + [m for m in (model, base_model) if m]
    from sdcore.models.save import save_format

    # a model's name (a .ckpt -o is refused before the merge, not after it); a diffusers folder as convert's
    _check_output(output, sources, overwrite, problems, model_format=save_format(output) if model else None)
    read = _read_loras([str(p) for p, _ in weighted])
    if model:
        bundle = _load_model(model)
        touched = merge_into_model(bundle, [(lora, r) for lora, (_, r) in zip(read, weighted, strict=True)])
        path = bundle.save(output, dtype=save_dtype)
        click.echo(f"wrote {path}: {touched} weights changed")
        return
    if mode == "svd" and rank is None:  # kohya's default, said so that a file of rank 4 is no surprise
        from .tools import SVD_MERGE_RANK

        convs = f"3x3 convs {conv_rank}" if conv_rank is not None else "3x3 convs too"
        click.echo(f"note: --mode svd without --rank: rank {SVD_MERGE_RANK} ({convs}), kohya svd_merge_lora.py's "
                   "--new_rank default; give --rank for another", err=True)  # fmt: skip
    base = _load_model(base_model) if base_model else None
    tensors, meta = merge_loras(
        [(lora, r) for lora, (_, r) in zip(read, weighted, strict=True)],
        mode=mode,
        rank=rank,
        conv_rank=conv_rank,
        base=base,
        clamp_quantile=clamp_quantile,
    )
    path = save_lora(output, tensors, meta, dtype=save_dtype)
    modules = sum(key.endswith((".lora_down.weight", ".lora_A.weight")) for key in tensors)  # kohya's or PEFT's
    click.echo(f"wrote {path}: {modules} modules")


@lora_group.command("convert", cls=_ToolCommand)
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False))
@click.option(
    "--to",
    "target",
    type=click.Choice(["comfyui", "kohya"]),
    required=True,
    help="comfyui: a kohya OFT file under the names and constraint ComfyUI reads (same merged weights). kohya: a "
    "FLUX.1/Chroma file under BFL's, ComfyUI's or XLabs' (x-flux) names under kohya's lora_unet_ names, the same "
    "factors with an explicit alpha (XLabs' single-block qkv_lora as linear1 with zero MLP rows).",
)
@click.option(
    "--save-dtype",
    type=click.Choice(["fp16", "bf16", "fp32"]),
    default=None,
    help="Default: the dtype FILE's weights have (mixed: the widest, fp32 for fp16 beside bf16), so a file keeps its "
    "size.",
)
@click.option("--overwrite", is_flag=True, help=OVERWRITE_HELP)
def convert_command(file: str, output: str, target: str, save_dtype: str | None, overwrite: bool) -> None:
    """Rewrite FILE for a loader that cannot read it as it is (kohya OFT -> ComfyUI, XLabs/ComfyUI FLUX.1 -> kohya)."""
    from .format import read_lora, save_lora, source_save_dtype
    from .tools import flux_to_kohya, oft_for_comfyui

    _check_output(output, [file], overwrite)

    lora = read_lora(file)
    dtype = save_dtype or source_save_dtype(lora)
    if target == "kohya":
        tensors, meta = flux_to_kohya(lora)
        path = save_lora(output, tensors, meta, dtype=dtype)
        modules = len({key.split(".", 1)[0] for key in tensors})  # kohya's names hold no dot
        click.echo(f"wrote {path} ({dtype}): {modules} modules under kohya's names")
        return
    tensors, meta = oft_for_comfyui(lora)
    path = save_lora(output, tensors, meta, dtype=dtype)
    click.echo(f"wrote {path} ({dtype}): {len(tensors) // 2} OFT modules for {target}")


@lora_group.command("extract-embeddings", cls=_ToolCommand)
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "-o",
    "--output",
    type=click.Path(file_okay=False),
    default=None,
    help="Folder for the NAME.safetensors files (default: FILE_embeddings beside FILE, where OneTrainer and "
    "--embedding-files put them); e.g. ComfyUI's models/embeddings.",
)
@click.option(
    "--strip",
    type=click.Path(dir_okay=False),
    default=None,
    help="Also write a copy of FILE without the bundled embeddings here (diffusers' load_lora_weights refuses "
    "a file with them).",
)
@click.option("--overwrite", is_flag=True, help=OVERWRITE_HELP)
def extract_embeddings_command(file: str, output: str | None, strip: str | None, overwrite: bool) -> None:
    """Write the embeddings bundled in the LoRA FILE (bundle_emb.*: OneTrainer's, sdcore's --embedding) as
    separate embedding files NAME.safetensors (SD1/SD2 emb_params; SDXL/SD3/FLUX.1 clip_l/clip_g/t5), which
    ComfyUI, Forge and diffusers load as embeddings; they skip bundled ones."""
    from sdcore.errors import ConfigError
    from sdcore.io import output_problems

    from .embedding_files import check_strip, plan_files, strip_bundle, write_files

    if strip:
        check_strip(file)  # before any embedding file is written
    planned = plan_files(file, output)  # ConfigError: none bundled, an unknown part, two names on one file
    outputs = [item.path for item in planned] + ([Path(strip)] if strip else [])
    suffix = lora_suffix_problem(strip, "--strip") if strip else None  # the stripped file is a LoRA
    found = [
        *([suffix] if suffix else []),
        *output_problems(outputs, inputs=[file], overwrite=overwrite),  # every file, before any is written
    ]
    if found:
        raise ConfigError("; ".join(found), found)
    for item, path in zip(planned, write_files(planned), strict=True):
        word = f"; prompt word {item.word!r}" if item.word != item.embedding.name else ""
        click.echo(f"wrote {path}: {item.embedding.name!r}, {item.embedding.describe()}{word}")
    if strip:
        dropped = strip_bundle(file, strip)
        click.echo(f"wrote {strip}: {file} without its {dropped} bundle_emb tensors")


#: the option groups of ``sdcore train lora`` that decide what is adapted (the model and its parts, the LoRA
#: options); the other training options (data, schedule, output...) have no say and are not offered
_TARGET_GROUPS = ("model", "lora")


class _TargetsCommand(click.Command):
    """Its options are ``sdcore train lora``'s model and LoRA options, built from ``LoraOptions`` the first
    time they are needed (importing the options class imports no torch, so ``--help`` stays light)."""

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        if not getattr(self, "_built", False):
            import dataclasses

            from sdcore.train.cli import options_to_click

            from .method import LoraOptions

            wanted = {f.name for f in dataclasses.fields(LoraOptions) if f.metadata.get("group") in _TARGET_GROUPS}
            self.params[:0] = [p for p in options_to_click(LoraOptions) if p.name in wanted]
            self._built = True
        return super().get_params(ctx)


@lora_group.command("targets", cls=_TargetsCommand)
@click.option(
    "--config",
    type=click.Path(dir_okay=False, exists=True),
    help="A training config (sdcore TOML, kohya TOML, OneTrainer JSON, ai-toolkit job): list what it adapts; "
    "flags given here override it.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the modules, counts and pattern matches as JSON.")
@click.pass_context
def targets_command(ctx: click.Context, config: str | None, as_json: bool, **kwargs: Any) -> None:
    """List what a LoRA would adapt on --model: one line per module (kohya name, diffusers path, layer type
    and shape, algorithm and rank), the counts, and with --layer-filter/--layer-exclude which pattern matched
    what. Reads the model's header and configs only (no weights) and takes `sdcore train lora`'s options."""
    import dataclasses

    from sdcore.errors import ConfigError
    from sdcore.train.cli import command_line_overrides
    from sdcore.train.config import load_options
    from sdcore.train.preflight import resolve_model_names

    from .method import LoraOptions
    from .targets import format_report, list_targets

    notes: list[str] = []
    try:
        options = load_options(LoraOptions, config, command_line_overrides(ctx, kwargs), notes=notes)
        # --models-dir (one of the training model options taken here): --model NAME and --vae NAME ... become
        # their files before the header is read, as `sdcore train lora` finds them
        pm = getattr(ctx.find_root().obj, "pm", None)
        resolve_model_names(options, pm, say=lambda line: click.echo(line, err=True))
    except ConfigError as exc:
        for problem in exc.problems:
            click.echo(f"Error: {problem}", err=True)
        ctx.exit(2)
    for note in notes:
        click.echo(f"note: {note}", err=True)
    report = list_targets(options)  # ConfigError: one line from the root group
    if as_json:
        data = {
            "family": report.family,
            "modules": [dataclasses.asdict(row) for row in report.rows],
            "counts": report.counts(),
            "candidates": report.candidates,
            "patterns": [dataclasses.asdict(match) for match in report.patterns],
        }
        click.echo(json.dumps(data, indent=2))
        return
    for line in format_report(report):
        click.echo(line)
