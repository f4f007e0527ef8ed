"""Datasets for the training runtime: images, captions, buckets, index, sampler, checks.

Submodules import numpy/PIL lazily; importing :mod:`sdcore.data` itself stays cheap.
"""

from __future__ import annotations

from .buckets import BucketAssignment, ImageTooSmallError, assign_bucket, make_buckets
from .captions import process_caption, read_caption, split_tags, tag_frequencies
from .dataset import (
    DatasetIndex,
    DatasetProblems,
    ImageEntry,
    SkippedFile,
    SubsetOptions,
    assign_buckets,
    build_dataset_index,
    load_toml_dataset_config,
    scan_dataset,
)
from .images import IMAGE_SUFFIXES, ImageError, open_image_rgb, probe_image, verify_image
from .metadata import MetadataRecord, combine_caption, metadata_records

__all__ = [
    "IMAGE_SUFFIXES",
    "BucketAssignment",
    "DatasetIndex",
    "DatasetProblems",
    "ImageEntry",
    "ImageError",
    "ImageTooSmallError",
    "MetadataRecord",
    "SkippedFile",
    "SubsetOptions",
    "assign_bucket",
    "assign_buckets",
    "build_dataset_index",
    "combine_caption",
    "load_toml_dataset_config",
    "make_buckets",
    "metadata_records",
    "open_image_rgb",
    "probe_image",
    "process_caption",
    "read_caption",
    "scan_dataset",
    "split_tags",
    "tag_frequencies",
    "verify_image",
]
