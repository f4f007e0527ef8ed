"""``sdcore data check``: everything wrong or notable about a dataset, before any model loads.

Covers the failures users meet most often with kohya-style trainers: unreadable files, wrong
caption extension (missing captions), empty captions, tiny images that get blown up, and how the
images spread over buckets; plus a tag overview (frequencies and which images carry each tag).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, DataError
from .captions import split_tags, tag_frequencies
from .dataset import assign_buckets, scan_dataset

if TYPE_CHECKING:
    from ..train.method import TrainingMethod
    from ..train.options import TrainOptions

#: An image enlarged by more than this factor to reach its bucket is reported (it will look soft).
UPSCALE_WARNING = 2.0


@dataclass
class DatasetReport:
    """Counts and lists describing a dataset (``to_text`` for people, ``to_dict`` for tools)."""

    path: str
    images: int = 0
    instance_images: int = 0
    class_images: int = 0
    samples_per_epoch: int = 0
    batch_size: int = 1
    #: each kohya ``[[datasets]]``'s batch size where they differ (they batch alone at their own sizes), else empty
    dataset_batch_sizes: list[int] = field(default_factory=list)
    batches_per_epoch: int = 0
    captions_from_files: int = 0
    class_token_captions: list[str] = field(default_factory=list)
    #: images without a caption file captioned from their file names (``--filename-captions``)
    filename_captions: list[str] = field(default_factory=list)
    missing_captions: list[str] = field(default_factory=list)
    empty_captions: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    #: caption files no image reads: listed, not counted as a problem (see ``DatasetIndex.unused_captions``)
    unused_captions: list[str] = field(default_factory=list)
    upscaled: list[tuple[str, float]] = field(default_factory=list)
    buckets: dict[str, int] = field(default_factory=dict)
    #: with several training resolutions (``--resolutions``, a concepts file's resolution list, datasets
    #: of different resolutions): each resolution's buckets, images per bucket, as the run assigns them;
    #: an image whose resolution is drawn every epoch counts at each resolution it may train at
    buckets_by_resolution: dict[int, dict[str, int]] = field(default_factory=dict)
    #: ``--resolution-draw`` when some image has several resolutions, else ``None``
    resolution_draw: str | None = None
    unique_tags: int = 0
    tag_frequencies: dict[str, int] = field(default_factory=dict)
    images_per_tag: dict[str, list[str]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    #: OneTrainer masked training: images with a ``-masklabel.png`` mask and those without (trained with a
    #: full mask, as OneTrainer does); ``None`` when no subset reads such masks
    masks: int | None = None
    unmasked: list[str] = field(default_factory=list)
    #: how the options were read (e.g. a dataset TOML's batch_size replacing --batch-size)
    notes: list[str] = field(default_factory=list)
    #: the training method the dataset was read for (``--method``), or ``None``
    method: str | None = None
    #: files that method reads with their images and does not train on (DreamArtist's ``<image>_att.png``):
    #: not images, not missing captions, not problems
    method_files: list[str] = field(default_factory=list)

    @property
    def problems(self) -> int:
        """Number of things a user should look at (0 for a clean dataset)."""
        return (
            len(self.errors)
            + len(self.skipped)
            + len(self.missing_captions)
            + len(self.empty_captions)
            + len(self.upscaled)
        )

    @property
    def ok(self) -> bool:
        return self.problems == 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "images": self.images,
            "instance_images": self.instance_images,
            "class_images": self.class_images,
            "samples_per_epoch": self.samples_per_epoch,
            "batch_size": self.batch_size,
            **({"dataset_batch_sizes": self.dataset_batch_sizes} if self.dataset_batch_sizes else {}),
            "batches_per_epoch": self.batches_per_epoch,
            "captions": {
                "from_files": self.captions_from_files,
                "from_file_names": len(self.filename_captions),
                "from_class_tokens": len(self.class_token_captions),
                "missing": len(self.missing_captions),
                "empty": len(self.empty_captions),
            },
            "filename_captions": self.filename_captions,
            "class_token_captions": self.class_token_captions,
            "missing_captions": self.missing_captions,
            "empty_captions": self.empty_captions,
            "skipped": [{"path": p, "reason": r} for p, r in self.skipped],
            "unused_captions": self.unused_captions,
            "upscaled": [{"path": p, "factor": round(f, 2)} for p, f in self.upscaled],
            "buckets": self.buckets,
            **(
                {
                    "buckets_by_resolution": {str(r): b for r, b in self.buckets_by_resolution.items()},
                    "resolution_draw": self.resolution_draw,
                }
                if self.buckets_by_resolution
                else {}
            ),
            "unique_tags": self.unique_tags,
            "tag_frequencies": self.tag_frequencies,
            "images_per_tag": self.images_per_tag,
            "errors": self.errors,
            "problems": self.problems,
            "notes": self.notes,
            "method": self.method,
            "method_files": self.method_files,
            **({} if self.masks is None else {"masks": {"with_mask": self.masks, "without_mask": self.unmasked}}),
        }

    def to_text(self, *, max_list: int = 50, max_images_per_tag: int = 5) -> str:
        def listing(title: str, items: list[str]) -> list[str]:
            if not items:
                return []
            out = [f"  {title} ({len(items)}):"]
            out += [f"    {item}" for item in items[:max_list]]
            if len(items) > max_list:
                out.append(f"    ... and {len(items) - max_list} more (use --json for all)")
            return out

        lines = [f"Dataset {self.path}"]
        lines += [f"  note: {note}" for note in self.notes]
        lines += [f"  ERROR: {error}" for error in self.errors]
        lines.append(
            f"  images: {self.images} usable ({self.instance_images} training, {self.class_images} class), "
            f"{self.samples_per_epoch} samples per epoch with repeats"
        )
        lines.append(
            f"  captions: {self.captions_from_files} from files, "
            + (f"{len(self.filename_captions)} from file names, " if self.filename_captions else "")
            + f"{len(self.class_token_captions)} from class tokens, "
            f"{len(self.missing_captions)} missing, {len(self.empty_captions)} empty"
        )
        if self.method_files:
            lines += listing(
                f"{self.method}'s own files, read with their images (not trained on; not images, not problems)",
                self.method_files,
            )
        if self.masks is not None:
            lines.append(
                f"  masks (-masklabel.png): {self.masks} image(s) with one, {len(self.unmasked)} without "
                "(trained with a full mask, as OneTrainer)"
            )
            lines += listing("images without a mask", self.unmasked)
        lines += listing("skipped files", [f"{p}: {r}" for p, r in self.skipped])
        lines += listing("caption files no image reads (not used; not counted as problems)", self.unused_captions)
        lines += listing(
            "missing captions (no caption file, no class tokens: trained uncaptioned)", self.missing_captions
        )
        lines += listing("empty caption files", self.empty_captions)
        lines += listing(
            f"small images (enlarged more than {UPSCALE_WARNING:g}x)", [f"{p}: x{f:.1f}" for p, f in self.upscaled]
        )

        def bucket_lines(buckets: dict[str, int]) -> list[str]:
            return [f"    {n:>10}  {c}" for n, c in sorted(buckets.items(), key=lambda item: (-item[1], item[0]))]

        if self.buckets_by_resolution:
            if self.resolution_draw == "epoch":
                lines.append("  resolutions: each image trains at one of its resolutions, drawn again every epoch")
            elif self.resolution_draw == "once":
                lines.append("  resolutions: each image trains at one of its resolutions, drawn once for the run")
            per = "; an image counts at each resolution it may draw" if self.resolution_draw == "epoch" else ""
            for size, buckets in sorted(self.buckets_by_resolution.items()):
                lines.append(f"  buckets at resolution {size} ({len(buckets)}; images per bucket{per}):")
                lines += bucket_lines(buckets)
        elif self.buckets:
            lines.append(f"  buckets ({len(self.buckets)}; images per bucket):")
            lines += bucket_lines(self.buckets)
        if self.buckets:
            first = " (the first epoch's draw)" if self.resolution_draw == "epoch" else ""
            at = (
                f"batch sizes {', '.join(map(str, self.dataset_batch_sizes))} (per dataset)"
                if self.dataset_batch_sizes
                else f"batch size {self.batch_size}"
            )
            lines.append(f"  batches per epoch at {at}: {self.batches_per_epoch}{first}")
        if self.tag_frequencies:
            lines.append(f"  tags: {self.unique_tags} unique; most frequent (images):")
            for tag, count in self.tag_frequencies.items():
                images = self.images_per_tag.get(tag, [])
                shown = ", ".join(images[:max_images_per_tag]) + (" ..." if len(images) > max_images_per_tag else "")
                lines.append(f"    {count:>5}  {tag}  [{shown}]")
        lines.append("  OK: no problems found" if self.ok else f"  {self.problems} problem(s) found")
        return "\n".join(lines)


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def method_file_notes(index: Any, others: Mapping[str, Callable[[Path], bool]], root: Path) -> list[str]:
    """A note per training method (``others``: name -> its ``is_auxiliary_file``) that claims some of ``index``'s
    images as its own files (DreamArtist's ``<image>_att.png``): a run of that method reads them with their images
    and does not train on them, so ``--method NAME`` reports the dataset as that run sees it. A method whose check
    raises is left out: a broken plugin must not break the report."""
    notes = []
    for name, auxiliary in others.items():
        try:
            claimed = [entry.path for entry in index.entries if auxiliary(entry.path)]
        except Exception:  # a plugin's own bug: said when that method is asked for (--method), not here
            continue
        claimed = list(dict.fromkeys(claimed))  # an image at several resolutions counts once
        if claimed:
            many = len(claimed) > 1
            notes.append(
                f"{len(claimed)} file{'s' if many else ''} (e.g. {_relative(claimed[0], root)}) "
                f"{'look' if many else 'looks'} like {name}'s own files, which `sdcore train {name}` reads with "
                f"their images and does not train on: give --method {name} to check the dataset as that run reads it"
            )
    return notes


def check_dataset(
    path: str | os.PathLike[str],
    options: TrainOptions | None = None,
    *,
    top: int = 30,
    method: TrainingMethod[Any] | None = None,
    other_methods: Mapping[str, Callable[[Path], bool]] | None = None,
) -> DatasetReport:
    """Scan ``path`` (folder or dataset TOML) with ``options`` (bucket and caption settings).

    With ``method`` (a training method built from ``options``, no model loaded) the dataset is read as a run of
    that method reads it: the files its ``is_auxiliary_file`` claims are its own, not images (as in the run), and
    its ``dataset_problems``/``dataset_notes`` are reported too. ``other_methods`` (name -> ``is_auxiliary_file``)
    are asked whether some images are their files, for a note suggesting ``--method``.

    Raises :class:`DataError` only when the dataset cannot be read at all (missing path, broken
    TOML); an empty dataset is reported as an error inside the report.
    """
    from ..train.options import TrainOptions

    options = replace(options or TrainOptions(), data=str(path))
    index = scan_dataset(options, verify=True)
    root = Path(path) if Path(path).is_dir() else Path(path).parent
    rel = lambda p: _relative(p, root)  # noqa: E731

    report = DatasetReport(path=str(path), batch_size=options.batch_size)
    if method is not None:
        report.method = method.name
        index.claim_method_files(method.is_auxiliary_file)  # as the run (sdcore.train.data.drop_method_files)
        report.method_files = [rel(p) for p in index.auxiliary_files]
    if other_methods:  # of the images left: those the chosen method claimed are not asked about again
        report.notes.extend(method_file_notes(index, other_methods, root))
    report.images = len(index.entries)
    report.instance_images = len(index.instance_entries)
    report.class_images = len(index.class_entries)
    report.samples_per_epoch = index.samples_per_epoch
    no_file = {*index.missing_captions, *index.class_token_captions, *index.empty_captions, *index.filename_captions}
    report.captions_from_files = sum(1 for e in index.entries if e.path not in no_file)
    report.filename_captions = [rel(p) for p in index.filename_captions]
    report.class_token_captions = [rel(p) for p in index.class_token_captions]
    report.missing_captions = [rel(p) for p in index.missing_captions]
    report.empty_captions = [rel(p) for p in index.empty_captions]
    report.skipped = [(rel(s.path), s.reason) for s in index.skipped]
    report.unused_captions = [rel(p) for p in index.unused_captions]
    report.errors.extend(index.problems)  # e.g. images a metadata file lists that are not there
    from ..train.caption_checks import caption_twin_notes, filename_caption_notes

    report.notes.extend(filename_caption_notes(index))  # the run's pre-flight note, word for word
    report.notes.extend(caption_twin_notes(index))
    if not index.instance_entries:
        report.errors.append("no usable training images")
    elif method is not None:  # the method's own checks, as the run's pre-flight makes them (no model needed)
        from ..train.preflight import method_dataset_checks

        problems, notes = method_dataset_checks(method, index)
        report.errors.extend(problems)
        report.notes.extend(notes)
    from .onetrainer import mask_counts

    counted = mask_counts(index)
    if counted is not None:
        report.masks, report.unmasked = counted[0], [rel(p) for p in counted[1]]

    images = list(index.entries)  # one entry per image, before the expansion into resolutions
    if index.entries:
        from .resolutions import expand_resolutions

        try:
            # as the run: an image at several resolutions is one entry per resolution it may train at
            expand_resolutions(index, frozenset(), seed=options.seed, draw=options.resolution_draw)
            assignments = assign_buckets(index)
        except (DataError, ConfigError) as exc:
            report.errors.append(f"bucket settings: {exc}")
            assignments = []
        upscaled: dict[Path, float] = {}
        by_resolution: dict[int, dict[str, int]] = {}
        for entry, assignment in zip(index.entries, assignments, strict=False):
            name = f"{assignment.bucket[0]}x{assignment.bucket[1]}"
            report.buckets[name] = report.buckets.get(name, 0) + 1
            sized = by_resolution.setdefault(entry.subset.resolution, {})
            sized[name] = sized.get(name, 0) + 1
            factor = assignment.resized[0] / entry.size[0]
            if factor > UPSCALE_WARNING:
                upscaled[entry.path] = max(factor, upscaled.get(entry.path, 0.0))
        report.upscaled = [(rel(p), f) for p, f in upscaled.items()]
        if len(by_resolution) > 1:
            report.buckets_by_resolution = by_resolution
        if any(len(set(e.subset.resolutions)) > 1 for e in images):
            report.resolution_draw = options.resolution_draw
        if assignments:
            from .sampler import BucketBatchSampler

            sampler = BucketBatchSampler(
                index,
                assignments,
                options.batch_size,
                options.seed,
                resolution_groups=index.resolution_groups,
                resolution_draw=options.resolution_draw,
            )
            report.batches_per_epoch = len(sampler)
            if len(set(sampler.batch_sizes.values())) > 1:
                report.dataset_batch_sizes = list(sampler.batch_sizes.values())

    captions = [e.caption for e in images]
    frequencies = tag_frequencies(captions)
    report.unique_tags = len(frequencies)
    report.tag_frequencies = dict(list(frequencies.items())[:top])
    wanted = set(report.tag_frequencies)
    for entry in images:
        for tag in dict.fromkeys(split_tags(entry.caption)):
            if tag in wanted:
                report.images_per_tag.setdefault(tag, []).append(rel(entry.path))
    return report
