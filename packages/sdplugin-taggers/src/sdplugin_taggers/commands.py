"""Click commands mounted by sdcore as ``sdcore tag wd14|deepdanbooru|caption``.

This module imports click only: onnxruntime, torch and numpy load inside the command bodies so
``sdcore --help`` stays fast.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click
from click.core import ParameterSource
from sdcore.cli_types import FiniteFloatRange
from sdcore.console import warn
from sdcore.devices import DEVICE, DEVICE_HELP
from sdcore.errors import SdcoreError

_MODES = ("skip", "overwrite", "append", "prepend")


def _output_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Options every tagger shares: what goes into the caption and how files are written."""
    options = [
        click.option("--exclude", default="", help="Comma-separated tags never written (underscores or spaces)."),
        click.option(
            "--include-first", default="", help="Comma-separated tags that open every caption (e.g. a trigger word)."
        ),
        click.option("--max-tags", type=click.IntRange(min=0), default=None, help="Keep at most N predicted tags."),
        click.option(
            "--mode",
            type=click.Choice(_MODES),
            default="skip",
            show_default=True,
            help="What to do when a caption file exists (append/prepend merge without duplicates).",
        ),
        click.option(
            "--tag-order",
            type=click.Choice(("model", "confidence")),
            default="model",
            show_default=True,
            help="model: the tag file's order, as kohya's tagger writes; confidence: most likely first.",
        ),
        click.option(
            "--characters",
            type=click.Choice(("first", "last")),
            default="first",
            show_default=True,
            help="Character tags before or after general tags (kohya's tagger default: last).",
        ),
        click.option("--ext", default=".txt", show_default=True, help="Caption file extension."),
        click.option("--underscores", is_flag=True, help="Keep underscores in tag names (default: spaces)."),
        click.option("--escape", is_flag=True, help="Escape parentheses as \\( \\) for A1111 prompts."),
        click.option(
            "--ratings",
            type=click.Choice(("first", "last", "off")),
            default="off",
            show_default=True,
            help="Write the most likely rating tag first, last, or not at all.",
        ),
        click.option("--recursive", is_flag=True, help="Also tag images in sub-folders."),
        click.option(
            "--json",
            "json_path",
            type=click.Path(dir_okay=False),
            default=None,
            help="Also write JSONL with probabilities.",
        ),
        click.option("--no-progress", is_flag=True, help="Hide the progress bar."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _format(kw: dict[str, Any]) -> Any:
    from .tags import TagFormat, split_tag_list

    return TagFormat(
        underscores=kw["underscores"],
        escape=kw["escape"],
        ratings=kw["ratings"],
        exclude=tuple(split_tag_list(kw["exclude"])),
        include_first=tuple(split_tag_list(kw["include_first"])),
        max_tags=kw["max_tags"],
        order=kw["tag_order"],
        characters_first=kw["characters"] == "first",
        first_if_found=tuple(kw.get("first_if_found") or ()),
        replace=tuple(kw.get("replace") or ()),
    )


def _check(directory: str, kw: dict[str, Any]) -> None:
    """The folder and output checks that need no model, before one loads (one line, exit 1)."""
    from .labeling import check_folder

    try:
        check_folder(directory, recursive=kw["recursive"], ext=kw["ext"], outputs={"--json": kw["json_path"]})
    except SdcoreError as exc:
        raise click.ClickException(str(exc)) from exc


def _run(tagger: Any, directory: str, kw: dict[str, Any], render: Any = None) -> None:
    from .labeling import label_folder
    from .writer import CaptionWriter

    for message in getattr(tagger, "messages", []):
        warn(message)
    from .tags import TagFormat, split_tag_list

    # the caption command has fewer output options: only what it has counts
    fmt = TagFormat(underscores=kw.get("underscores", False), escape=kw.get("escape", False))
    first = tuple(fmt.render(t) for t in split_tag_list(kw.get("include_first") or ""))
    writer = CaptionWriter(kw["mode"], kw["ext"], separator=kw.get("separator") or ", ", first=first)
    summary = label_folder(
        tagger,
        directory,
        writer=writer,
        recursive=kw["recursive"],
        json_path=kw["json_path"],
        progress=not kw["no_progress"],
        render=render,
    )
    for line in summary.lines():
        click.echo(line)


#: how to get each tagger's model once, online (docs/offline-models.md): hub id -> (files, default folder)
_WD_FILES = "model.onnx selected_tags.csv"
_BLIP_FILES = (
    "config.json model.safetensors preprocessor_config.json tokenizer.json tokenizer_config.json vocab.txt "
    "special_tokens_map.json"
)
_CLIP_FILES = (
    "config.json model.safetensors preprocessor_config.json tokenizer.json tokenizer_config.json vocab.json "
    "merges.txt special_tokens_map.json"
)
_DDB_URL = "https://github.com/AUTOMATIC1111/TorchDeepDanbooru/releases/download/v1/model-resnet_custom_v3.pt"


def _local_model(value: str | None, option: str, what: str, recipe: tuple[str, str, str] | None) -> str:
    """The model path a tagger option names, or one line saying how to get a local model: the taggers never
    download (a missing option, a path that is not there, or a Hugging Face id given as a path).
    ``recipe`` is (default hub id, files, default folder) for ``hf download``; None for DeepDanbooru's file."""
    from pathlib import Path

    if value is not None and Path(value).exists():
        return value
    if recipe is None:
        file = value or "model-resnet_custom_v3.pt"
        fetch = f"curl -L -o {file} {_DDB_URL}, then {option} {file}"
    else:
        repo, files, folder = recipe
        if value is not None and value.count("/") == 1 and not value.startswith((".", "/", "~")):
            repo, folder = value, "./" + value.split("/")[1]  # a hub id given as the path
        elif value is not None:
            folder = value
        fetch = f"hf download {repo} {files} --local-dir {folder}, then {option} {folder}"
    start = f"{option} {value}: no such file or folder" if value is not None else f"no {what} given ({option})"
    raise click.UsageError(f"{start}; sdcore downloads nothing: get it once, online: {fetch} (docs/offline-models.md)")


#: kohya's tagger keeps its model in ``--model_dir``/``<repo_id with / as _>`` (finetune/tag_images_by_wd14_tagger.py)
KOHYA_MODEL_DIR, KOHYA_REPO_ID = "wd14_tagger_model", "SmilingWolf/wd-v1-4-convnext-tagger-v2"


class _KohyaSpellings(click.Command):
    """Reads kohya's underscore spellings (``--batch_size``, ``--model_dir``) as sdcore's hyphenated options,
    with the rewrite ``sdcore train`` uses, so kohya's ``tag_images_by_wd14_tagger.py`` lines run as typed."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        from sdcore.train.cli import underscores_to_hyphens

        return super().parse_args(ctx, underscores_to_hyphens(self, ctx, list(args)))


_KOHYA_FLAGS = (
    "append-tags",
    "use-rating-tags",
    "use-rating-tags-as-last-tag",
    "character-tags-first",
    "remove-underscore",
    "force-download",
    "onnx",
    "frequency-tags",
    "debug",
)


def _kohya_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """kohya's tagger flags sdcore has no option of that name for (hidden; README "kohya's flags")."""
    text: dict[str, Any] = {"default": None, "hidden": True}
    flag: dict[str, Any] = {"is_flag": True, "hidden": True}
    options = [
        click.option("--thresh", type=FiniteFloatRange(0, 1), **text),
        click.option("--caption-extension", "--caption-extention", "caption_extension", **text),
        click.option("--undesired-tags", **text),
        click.option("--always-first-tags", **text),
        click.option("--tag-replacement", **text),
        click.option("--caption-separator", **text),
        click.option("--repo-id", **text),
        click.option("--max-data-loader-n-workers", type=click.IntRange(min=0), **text),
        *(click.option(f"--{name}", **flag) for name in _KOHYA_FLAGS),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _given(ctx: click.Context, name: str) -> bool:
    return ctx.get_parameter_source(name) not in (None, ParameterSource.DEFAULT)


def _apply_kohya(ctx: click.Context, model_dir: str | None, kw: dict[str, Any]) -> str | None:
    """Turn kohya's flags in ``kw`` into sdcore's options (kohya's meaning where the two differ) and return
    the model folder; notes for flags with nothing to do here go to stderr."""
    from .tags import parse_tag_replacement, split_tag_list

    _refuse_contradictions(ctx, kw)
    notes = {
        "onnx": "--onnx: sdcore's WD tagger always runs the ONNX model",
        "frequency_tags": "--frequency_tags: the summary after the run lists the most frequent tags",
        "debug": "--debug: --json writes every image's tags with their probabilities",
        "remove_underscore": "--remove_underscore: sdcore writes spaces already (--underscores keeps them)",
    }
    for name, note in notes.items():
        if kw.pop(name):
            click.echo(f"note: {note}", err=True)
    if kw.pop("force_download"):
        repo = kw["repo_id"] or KOHYA_REPO_ID
        raise click.UsageError(
            f"--force_download: sdcore downloads nothing: get it once, online: hf download {repo} {_WD_FILES} "
            f"--local-dir <folder>, then --model-dir <folder> (docs/offline-models.md)"
        )
    thresh = kw.pop("thresh")
    if thresh is not None:  # kohya: --general_threshold/--character_threshold default to --thresh
        for name in ("general_threshold", "character_threshold"):
            if not _given(ctx, name):
                kw[name] = thresh
    if kw["caption_extension"] is not None:
        kw["ext"] = kw["caption_extension"]
    if kw["undesired_tags"]:
        kw["exclude"] = ",".join(filter(None, (kw["exclude"], kw["undesired_tags"])))
    if kw["append_tags"]:
        kw["mode"] = "append"
    if kw["use_rating_tags"] or kw["use_rating_tags_as_last_tag"]:
        kw["ratings"] = "first" if kw["use_rating_tags"] else "last"  # kohya: first wins
    if kw["character_tags_first"]:
        kw["characters"] = "first"
    if kw["max_data_loader_n_workers"] is not None and not _given(ctx, "workers"):
        kw["workers"] = kw["max_data_loader_n_workers"]
    if kw["always_first_tags"]:
        kw["first_if_found"] = split_tag_list(kw["always_first_tags"])
    if kw["tag_replacement"]:
        try:
            kw["replace"] = parse_tag_replacement(kw["tag_replacement"])
        except SdcoreError as exc:
            raise click.UsageError(f"--tag_replacement: {exc}") from None
    if kw["caption_separator"] is not None:
        kw["separator"] = kw["caption_separator"]
    return _kohya_model_dir(model_dir, kw["repo_id"])


def _refuse_contradictions(ctx: click.Context, kw: dict[str, Any]) -> None:
    """A kohya flag and sdcore's option of the same setting, given with different values: one would win in
    silence (kohya's tagger has only the one, sdcore's only the other), so say both, all at once."""
    pairs: list[tuple[str, str]] = []
    if kw["append_tags"] and _given(ctx, "mode") and kw["mode"] != "append":
        pairs.append(("--append_tags", f"--mode {kw['mode']}"))
    if (kw["use_rating_tags"] or kw["use_rating_tags_as_last_tag"]) and _given(ctx, "ratings"):
        flag, where = (
            ("--use_rating_tags", "first") if kw["use_rating_tags"] else ("--use_rating_tags_as_last_tag", "last")
        )
        if kw["ratings"] != where:
            pairs.append((flag, f"--ratings {kw['ratings']}"))
    if kw["character_tags_first"] and _given(ctx, "characters") and kw["characters"] != "first":
        pairs.append(("--character_tags_first", f"--characters {kw['characters']}"))
    if kw["remove_underscore"] and kw["underscores"]:
        pairs.append(("--remove_underscore", "--underscores"))
    ext = kw["caption_extension"]
    if ext is not None and _given(ctx, "ext") and ext.lstrip(".") != kw["ext"].lstrip("."):
        pairs.append((f"--caption_extension {ext}", f"--ext {kw['ext']}"))
    workers = kw["max_data_loader_n_workers"]
    if workers is not None and _given(ctx, "workers") and workers != kw["workers"]:
        pairs.append((f"--max_data_loader_n_workers {workers}", f"--workers {kw['workers']}"))
    if pairs:
        said = "; ".join(f"{kohya} and {ours}" for kohya, ours in pairs)
        raise click.UsageError(
            f"{said}: kohya's flag and sdcore's option of one setting contradict: give one of each pair"
        )


def _kohya_model_dir(model_dir: str | None, repo_id: str | None) -> str | None:
    """sdcore's ``--model-dir`` is the model folder; kohya's is the folder holding ``<repo_id as a_b>``: a
    folder without ``model.onnx`` is read kohya's way, and ``--repo_id`` names the model in it."""
    from pathlib import Path

    if model_dir is not None and (Path(model_dir) / "model.onnx").is_file():
        return model_dir
    if repo_id is None and (model_dir is None or not (Path(model_dir) / KOHYA_REPO_ID.replace("/", "_")).is_dir()):
        return model_dir  # nothing kohya-shaped: sdcore's own message when it is missing
    repo = repo_id or KOHYA_REPO_ID
    folder = Path(model_dir or KOHYA_MODEL_DIR) / repo.replace("/", "_")
    where = str(folder) if folder.is_absolute() else f"./{folder}"
    if not (folder / "model.onnx").is_file():
        _local_model(where, "--model-dir", "WD tagger", (repo, _WD_FILES, where))
    return where


@click.command("wd14", cls=_KohyaSpellings)
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--model-dir",
    default=None,
    help="WD model folder (model.onnx + selected_tags.csv), v2 or v3 (docs/offline-models.md).",
)
@click.option("--general-threshold", type=FiniteFloatRange(0, 1), default=0.35, show_default=True)
@click.option("--character-threshold", type=FiniteFloatRange(0, 1), default=0.85, show_default=True)
@click.option("--mcut", is_flag=True, help="Adaptive MCut thresholds per category instead of fixed ones.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Default: 1 on CPU, 16 on GPU.")
@click.option("--workers", type=click.IntRange(min=0), default=None, help="Image decode threads (0: decode inline).")
@click.option(
    "--providers",
    default=None,
    help="onnxruntime providers, e.g. cuda,cpu (accelerators are preferred). Default: CUDA when available, else CPU.",
)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="onnxruntime intra-op threads.")
@click.option("--fast-decode", is_flag=True, help="Let libjpeg downscale large JPEGs while decoding (faster).")
@_output_options
@_kohya_options
@click.pass_context
def wd14_command(ctx: click.Context, directory: str, model_dir: str | None, **kw: Any) -> None:
    """Tag images with a WD14 / WD v3 ONNX tagger and write caption files.

    kohya's finetune/tag_images_by_wd14_tagger.py flags work too (--thresh, --undesired_tags, ...: README)."""
    model_dir = _apply_kohya(ctx, model_dir, kw)
    model_dir = _local_model(
        model_dir, "--model-dir", "WD tagger", ("SmilingWolf/wd-vit-tagger-v3", _WD_FILES, "./wd-v3")
    )
    _check(directory, kw)
    try:
        from .wd14 import WD14Tagger

        tagger = WD14Tagger(
            model_dir,
            general_threshold=kw["general_threshold"],
            character_threshold=kw["character_threshold"],
            mcut=kw["mcut"],
            fmt=_format(kw),
            batch_size=kw["batch_size"],
            workers=kw["workers"],
            providers=kw["providers"],
            threads=kw["threads"],
            fast_decode=kw["fast_decode"],
        )
        click.echo(f"model: {tagger.model_path} ({len(tagger.tag_list)} tags, {tagger.size}px)")
        click.echo(f"provider: {tagger.provider}, batch size {tagger.batch_size}, {tagger.workers} decode workers")
        _run(tagger, directory, kw)
    except SdcoreError as exc:
        raise click.ClickException(str(exc)) from exc


@click.command("deepdanbooru")
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--model",
    "model_path",
    default=None,
    type=click.Path(dir_okay=False),
    help="TorchDeepDanbooru model-resnet_custom_v3.pt (state dict with a 'tags' list; docs/offline-models.md).",
)
@click.option("--threshold", type=FiniteFloatRange(0, 1), default=0.5, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--workers", type=click.IntRange(min=0), default=None, help="Image decode threads.")
@click.option("--device", type=DEVICE, default="auto", show_default=True, help=DEVICE_HELP)
@_output_options
def deepdanbooru_command(directory: str, model_path: str | None, **kw: Any) -> None:
    """Tag images with DeepDanbooru (resnet_custom_v3, torch) and write caption files."""
    model_path = _local_model(model_path, "--model", "DeepDanbooru model", None)
    _check(directory, kw)
    try:
        from .deepdanbooru import DeepDanbooruTagger

        tagger = DeepDanbooruTagger(
            model_path,
            threshold=kw["threshold"],
            fmt=_format(kw),
            batch_size=kw["batch_size"],
            workers=kw["workers"],
            device=kw["device"],
        )
        click.echo(f"model: {model_path} ({len(tagger.tag_names)} tags), device {tagger.device}")
        _run(tagger, directory, kw)
    except SdcoreError as exc:
        raise click.ClickException(str(exc)) from exc


@click.command("caption")
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option("--blip", "blip_path", default=None, help="BLIP captioning model folder (docs/offline-models.md).")
@click.option("--clip", "clip_path", default=None, help="CLIP model folder (ranking).")
@click.option(
    "--ci-mode",
    type=click.Choice(("caption", "best", "classic", "fast", "negative")),
    default="best",
    show_default=True,
    help="caption: BLIP only; the others rank phrase lists with CLIP as clip-interrogator does.",
)
@click.option("--flavors", type=click.Path(exists=True, dir_okay=False), default=None, help="Flavor phrase list file.")
@click.option("--artists", type=click.Path(exists=True, dir_okay=False), default=None, help="Artist names file.")
@click.option("--max-length", type=click.IntRange(min=1), default=32, show_default=True, help="BLIP tokens.")
@click.option("--batch-size", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--workers", type=click.IntRange(min=0), default=None, help="Image decode threads.")
@click.option("--device", type=DEVICE, default="auto", show_default=True, help=DEVICE_HELP)
@click.option("--cache-dir", default=None, type=click.Path(file_okay=False), help="Text-embedding cache folder.")
@click.option(
    "--mode", type=click.Choice(_MODES), default="skip", show_default=True, help="What to do when a caption exists."
)
@click.option("--ext", default=".txt", show_default=True)
@click.option("--recursive", is_flag=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None)
@click.option("--no-progress", is_flag=True)
def caption_command(directory: str, blip_path: str | None, clip_path: str | None, **kw: Any) -> None:
    """Caption images with BLIP, then extend the caption with CLIP-ranked phrases (clip-interrogator style)."""
    blip = ("Salesforce/blip-image-captioning-large", _BLIP_FILES, "./blip-large")
    blip_path = _local_model(blip_path, "--blip", "BLIP captioning model", blip)
    if clip_path is not None:
        clip = ("openai/clip-vit-large-patch14", _CLIP_FILES, "./clip-vit-large-patch14")
        clip_path = _local_model(clip_path, "--clip", "CLIP model", clip)
    _check(directory, kw)
    try:
        from .caption import CaptionTagger

        if kw["ci_mode"] != "caption" and clip_path is None:
            raise click.UsageError(f"--ci-mode {kw['ci_mode']} needs --clip (or use --ci-mode caption)")
        tagger = CaptionTagger(
            blip_path,
            clip_path,
            mode=kw["ci_mode"],
            flavors=kw["flavors"],
            artists=kw["artists"],
            max_length=kw["max_length"],
            batch_size=kw["batch_size"],
            workers=kw["workers"],
            device=kw["device"],
            cache_dir=kw["cache_dir"],
        )
        _run(tagger, directory, kw)
    except SdcoreError as exc:
        raise click.ClickException(str(exc)) from exc
