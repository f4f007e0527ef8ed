"""What a LoRA file says about the data it was trained on, in kohya's ``ss_*`` shapes.

kohya's ``train_network.py`` describes the data two ways. Without a dataset config it writes one set
of top-level keys (``ss_dataset_dirs``, ``ss_tag_frequency``, ``ss_batch_size_per_device``,
``ss_resolution``, the augmentation flags, ...). With a dataset config (``--dataset_config``) every
``[[datasets]]`` can have its own batch size, resolution, buckets and subsets, so it writes one JSON
list ``ss_datasets`` instead (one entry per dataset, each with its subsets, tag frequency and bucket
counts) and leaves the per-dataset top-level keys out; ``ss_tag_frequency`` and ``ss_dataset_dirs`` are
then kohya's merge over the datasets, so viewers that read only those still work. Metadata viewers
(kohya_ss, civitai, sd-webui-additional-networks) read one shape or the other, so a run from a dataset
TOML writes the second, as kohya does (train_network.py at 48d368f, lines 1069-1198).

The tables are computed from the run's trained entries (:attr:`sdcore.train.method.RunFacts.entries`):
one function per table, used by both shapes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sdcore.data.dataset import ImageEntry, SubsetOptions

#: the top-level keys kohya writes only without a dataset config (their values are per dataset in
#: ``ss_datasets`` otherwise); those sdcore writes are removed for a dataset-config run
PER_DATASET_KEYS = (
    "ss_batch_size_per_device",
    "ss_total_batch_size",
    "ss_resolution",
    "ss_color_aug",
    "ss_flip_aug",
    "ss_random_crop",
    "ss_shuffle_caption",
    "ss_enable_bucket",
    "ss_bucket_no_upscale",
    "ss_min_bucket_reso",
    "ss_max_bucket_reso",
    "ss_keep_tokens",
    "ss_reg_dataset_dirs",
    "ss_bucket_info",
)


def subset_dir_name(subset: SubsetOptions) -> str:
    """kohya's name of a subset in ``ss_dataset_dirs`` and ``ss_tag_frequency``: the metadata file of a
    fine-tuning subset (``--in_json``/``metadata_file``), else the image folder."""
    metadata_file = getattr(subset, "metadata_file", None)
    return Path(metadata_file).name if metadata_file is not None else Path(subset.image_dir).name


def entry_dir_name(entry: ImageEntry) -> str:
    return subset_dir_name(entry.subset)


def subset_identity(subset: SubsetOptions) -> tuple[Any, ...]:
    """A subset as the dataset config wrote it: its folder (or metadata file), role and strength, not the
    resolution a ``--resolutions`` copy of it trains at."""
    return (
        str(subset.image_dir),
        str(getattr(subset, "metadata_file", None)),
        bool(getattr(subset, "is_class", False)),
        float(getattr(subset, "network_strength", 1.0)),
    )


def folder_counts(entries: Iterable[ImageEntry]) -> dict[str, dict[str, int]]:
    """``ss_dataset_dirs`` without a dataset config: per folder name its repeats and image count."""
    dirs: dict[str, dict[str, int]] = {}
    for entry in entries:
        d = dirs.setdefault(entry_dir_name(entry), {"n_repeats": entry.repeats, "img_count": 0})
        d["img_count"] += 1
    return dirs


def folder_tag_frequency(entries: Sequence[ImageEntry]) -> dict[str, dict[str, int]]:
    """``ss_tag_frequency``: per folder name the caption tags' counts as kohya counts them
    (``BaseDataset.set_tag_frequency``: every occurrence, lower-cased, in the order first seen; one caption per
    image, repeats not counted); fine-tuning subsets count the metadata's ``tags``
    (:func:`metadata_tag_frequency`)."""
    from .format import tag_frequency

    by_folder: dict[str, list[str]] = {}
    for entry in entries:
        by_folder.setdefault(entry_dir_name(entry), []).append(entry.caption)
    tags = tag_frequency(by_folder)
    tags.update(metadata_tag_frequency(entries))
    return tags


def metadata_tag_frequency(entries: Iterable[ImageEntry]) -> dict[str, dict[str, int]]:
    """kohya's ``ss_tag_frequency`` of fine-tuning subsets: only the metadata's ``tags`` (not the
    captions), every occurrence, lower-cased, per metadata file (``FineTuningDataset.set_tag_frequency``)."""
    from .format import tag_frequency

    by_file: dict[str, list[str]] = {}
    for entry in entries:
        if getattr(entry.subset, "metadata_file", None) is not None:
            tags = by_file.setdefault(entry_dir_name(entry), [])
            if entry.tags is not None:
                tags.append(entry.tags)
    return tag_frequency(by_file)


def from_dataset_config(entries: Iterable[ImageEntry]) -> bool:
    """Whether the run's training images came from a kohya dataset TOML (kohya's ``use_user_config``):
    class images given beside it (``--reg-data``) do not count."""
    return any(
        getattr(e.subset, "dataset_config", None) is not None and not getattr(e.subset, "run_class", False)
        for e in entries
    )


def kohya_reg_uses(repeats: Sequence[int], num_train_images: int) -> list[int]:
    """How many times each class image counts in kohya's buckets: ``DreamBoothDataset`` registers class
    images in order with their repeats until they reach the training images (with repeats), then adds
    one use at a time round the list; images left over when the first pass is full are not used."""
    uses = [0] * len(repeats)
    if not repeats:
        return uses
    n, first = 0, True
    while n < num_train_images:
        for i, value in enumerate(repeats):
            if first:
                uses[i] = value
                n += value
            else:
                uses[i] += 1
                n += 1
            if n >= num_train_images:
                break
        first = False
    return uses


def bucket_info(entries: Sequence[ImageEntry]) -> dict[str, Any] | None:
    """kohya's ``bucket_info`` of one dataset: the buckets its images use (sorted, numbered from 0), each
    with its resolution and its images with repeats (class images as :func:`kohya_reg_uses` counts
    them), and the mean aspect-ratio error of the used images without repeats; ``None`` with buckets off.
    The buckets come from sdcore's own assignment (:func:`sdcore.data.dataset.assign_buckets`), the one
    training used."""
    from sdcore.data.dataset import DatasetIndex, assign_buckets

    if not entries or not entries[0].subset.buckets:
        return None
    assignments = assign_buckets(DatasetIndex(entries=list(entries)))
    train = [i for i, e in enumerate(entries) if not e.is_class]
    klass = [i for i, e in enumerate(entries) if e.is_class]
    uses = {i: entries[i].repeats for i in train}
    reg = kohya_reg_uses([entries[i].repeats for i in klass], sum(uses.values()))
    uses.update({i: n for i, n in zip(klass, reg, strict=True) if n > 0})
    counts: dict[tuple[int, int], int] = {}
    errors: list[float] = []
    for i, n in uses.items():
        bucket = assignments[i].bucket
        counts[bucket] = counts.get(bucket, 0) + n
        width, height = entries[i].size
        errors.append(abs(bucket[0] / bucket[1] - width / height))
    buckets = {i: {"resolution": list(reso), "count": counts[reso]} for i, reso in enumerate(sorted(counts))}
    return {"buckets": buckets, "mean_img_ar_error": sum(errors) / len(errors) if errors else 0}


def bucket_rule(entries: Iterable[ImageEntry]) -> str:
    """The bucket rule the run's images were put in buckets (or cropped square) by: ``"kohya"`` or
    ``"onetrainer"`` (:data:`sdcore.data.buckets.BUCKET_RULES`; one per run, ``--bucket-rule``), kohya's when
    there are no entries."""
    rules = {getattr(e.subset, "bucket_rule", "kohya") for e in entries}
    return "onetrainer" if "onetrainer" in rules else "kohya"


def kohya_bucket_sides(entries: Sequence[ImageEntry], min_reso: int, max_reso: int) -> dict[str, int | None]:
    """kohya's ``min_bucket_reso``/``max_bucket_reso`` of these images: ``None`` where kohya's sides played no
    part, as kohya writes them then. kohya sets both to ``None`` with buckets off (train_util.py 48d368f,
    ``DreamBoothDataset``/``FineTuningDataset``: ``self.min_bucket_reso = None``), which its metadata writes as
    ``"None"`` at the top level (``str()``) and ``null`` in ``ss_datasets``, and every kohya file of either shape
    holds the keys, so readers meet ``None`` there (lora-inspector parses ``"None"`` for these int keys). Under
    OneTrainer's rule the sides played no part either (its buckets have no smallest or largest side), so they
    are ``None`` too rather than values that describe a rule that did not run."""
    if not entries or not entries[0].subset.buckets or bucket_rule(entries) == "onetrainer":
        return {"min_bucket_reso": None, "max_bucket_reso": None}
    return {"min_bucket_reso": min_reso, "max_bucket_reso": max_reso}


def folder_bucket_metadata(entries: Sequence[ImageEntry]) -> dict[str, str]:
    """kohya's bucket keys of a run without a dataset config (train_network.py 48d368f, 1190-1198):
    ``ss_enable_bucket``, ``ss_bucket_no_upscale`` (``False`` with buckets off, as kohya sets it then),
    ``ss_min_bucket_reso``/``ss_max_bucket_reso`` (:func:`kohya_bucket_sides`, ``"None"`` where kohya's rule did
    not run) and ``ss_bucket_info`` (:func:`bucket_info`, ``null`` with buckets off, as kohya's
    ``json.dumps(None)``), from the images' own subset settings (a folder run's are all the run's); nothing
    without images."""
    import json

    if not entries:
        return {}
    first = entries[0].subset
    sides = kohya_bucket_sides(entries, first.min_bucket_reso, first.max_bucket_reso)
    return {
        "ss_enable_bucket": str(bool(first.buckets)),
        "ss_bucket_no_upscale": str(bool(first.buckets and first.bucket_no_upscale)),
        **{f"ss_{key}": str(value) for key, value in sides.items()},
        "ss_bucket_info": json.dumps(bucket_info(entries)),
    }


def _subsets(entries: Sequence[ImageEntry]) -> dict[tuple[Any, ...], list[ImageEntry]]:
    """The entries of each subset (the copies ``--resolutions`` makes of a subset are that subset), in order."""
    out: dict[tuple[Any, ...], list[ImageEntry]] = {}
    for entry in entries:
        out.setdefault((entry.subset.dataset, *subset_identity(entry.subset)), []).append(entry)
    return out


def unique_name(name: str, taken: Iterable[str]) -> str:
    """kohya's name for a folder met again in ``ss_dataset_dirs``: ``name (2)``, ``name (3)``, ..."""
    seen = set(taken)
    out, i = name, 2
    while out in seen:
        out, i = f"{name} ({i})", i + 1
    return out


def _subset_metadata(subset: SubsetOptions, entries: Sequence[ImageEntry], dreambooth: bool) -> dict[str, Any]:
    """One ``ss_datasets[].subsets[]`` entry as kohya writes it (its unset caption affixes are ``None``)."""
    s = subset
    meta: dict[str, Any] = {
        "img_count": len({e.path for e in entries}),
        "num_repeats": s.repeats,
        "color_aug": bool(s.color_aug),
        "flip_aug": bool(s.flip),
        "random_crop": bool(s.random_crop),
        "shuffle_caption": bool(s.shuffle_caption),
        "keep_tokens": s.keep_tokens,
        "keep_tokens_separator": s.keep_tokens_separator or "",
        "secondary_separator": s.secondary_separator,
        "enable_wildcard": bool(s.enable_wildcard),
        "caption_prefix": s.caption_prefix or None,
        "caption_suffix": s.caption_suffix or None,
        "resize_interpolation": s.resize_interpolation,
    }
    if s.image_dir != Path():  # a fine-tuning subset may give no image_dir
        meta["image_dir"] = Path(s.image_dir).name
    if dreambooth:
        meta["class_tokens"] = s.class_tokens
        meta["is_reg"] = bool(s.is_class)
    else:
        meta["metadata_file"] = subset_dir_name(s)
    return meta


def kohya_datasets(
    entries: Sequence[ImageEntry], *, batch_size: int
) -> tuple[list[dict[str, Any]], dict[str, dict[str, int]], dict[str, dict[str, int]]]:
    """kohya's ``ss_datasets`` list of a dataset-config run, with the merged ``ss_tag_frequency`` and
    ``ss_dataset_dirs`` kohya writes beside it.

    One entry per ``[[datasets]]`` with trained images, in the config's order. ``batch_size`` is the
    run's (a dataset without its own). The merged tag frequency keeps the first dataset's table of a folder used by several
    (kohya counts a folder once); the merged folders list training subsets only (not ``is_reg``), a name
    met again as ``name (2)``. Class images given beside the config (``--reg-data``) are in no dataset.
    """
    from sdcore.data.buckets import resolution_pair

    in_datasets = [e for e in entries if not getattr(e.subset, "run_class", False)]
    datasets: list[dict[str, Any]] = []
    merged_tags: dict[str, dict[str, int]] = {}
    merged_dirs: dict[str, dict[str, int]] = {}
    for number in sorted({e.subset.dataset for e in in_datasets}):
        members = [e for e in in_datasets if e.subset.dataset == number]
        first = members[0].subset
        dreambooth = first.metadata_file is None
        tags = folder_tag_frequency(members)
        subsets = []
        for subset_entries in _subsets(members).values():
            subset = subset_entries[0].subset
            subsets.append(_subset_metadata(subset, subset_entries, dreambooth))
            if not subset.is_class:
                name = unique_name(subset_dir_name(subset), merged_dirs)
                merged_dirs[name] = {"n_repeats": subset.repeats, "img_count": subsets[-1]["img_count"]}
        datasets.append(
            {
                "is_dreambooth": dreambooth,
                "batch_size_per_device": batch_size if first.batch_size is None else first.batch_size,
                "num_train_images": sum(e.repeats for e in members if not e.is_class),
                "num_reg_images": sum(e.repeats for e in members if e.is_class),
                "resolution": list(resolution_pair(first.bucket_resolution)),  # kohya's (width, height)
                "enable_bucket": bool(first.buckets),
                **kohya_bucket_sides(members, first.min_bucket_reso, first.max_bucket_reso),
                "tag_frequency": tags,
                "bucket_info": bucket_info(members),
                # the dataset's own value, not its subsets' (which may each override it)
                "resize_interpolation": first.dataset_resize_interpolation,
                "subsets": subsets,
            }
        )
        for name, table in tags.items():
            merged_tags.setdefault(name, table)
    return datasets, merged_tags, merged_dirs


def datasets_tag_frequency(raw: str) -> dict[str, dict[str, int]]:
    """The tag frequency of an ``ss_datasets`` value, merged as kohya merges it into ``ss_tag_frequency``
    (a folder in several datasets counted once): for files that hold ``ss_datasets`` alone. Raises
    ``ValueError`` for a value that is not kohya's JSON list."""
    import json

    out: dict[str, dict[str, int]] = {}
    datasets = json.loads(raw)
    if not isinstance(datasets, list):
        raise ValueError("ss_datasets is not a list")
    for dataset in datasets:
        for name, table in (dataset.get("tag_frequency") or {}).items():
            out.setdefault(name, table)
    return out


__all__ = [
    "PER_DATASET_KEYS",
    "bucket_info",
    "bucket_rule",
    "datasets_tag_frequency",
    "folder_bucket_metadata",
    "folder_counts",
    "folder_tag_frequency",
    "from_dataset_config",
    "kohya_bucket_sides",
    "kohya_datasets",
    "kohya_reg_uses",
    "metadata_tag_frequency",
    "subset_dir_name",
    "subset_identity",
    "unique_name",
]
