"""Hashes against values computed independently (hashlib on the raw bytes)."""

from __future__ import annotations

import hashlib
import struct

import torch
from safetensors.torch import save
from sdcore.models import hashes


def _file(tmp_path, size=3 << 20):
    data = bytes((i * 7 + 3) % 251 for i in range(size))
    header = b'{"__metadata__":{"a":"b"}}'
    blob = struct.pack("<Q", len(header)) + header + data
    path = tmp_path / "x.safetensors"
    path.write_bytes(blob)
    return path, blob, 8 + len(header)


def test_file_hashes(tmp_path):
    path, blob, start = _file(tmp_path)
    assert hashes.legacy_hash(path) == hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8]
    full = hashlib.sha256(blob).hexdigest()
    assert hashes.sha256_file(path) == full
    assert hashes.short_hash(path) == full[:10]
    assert hashes.autov3_hash(path) == hashlib.sha256(blob[start:]).hexdigest()
    assert hashes.all_hashes(path) == {"legacy": full and hashes.legacy_hash(path), "sha256": full,
                                       "short": full[:10], "autov3": hashlib.sha256(blob[start:]).hexdigest()}  # fmt: skip


def test_small_file_legacy_hash(tmp_path):
    path = tmp_path / "small.safetensors"
    path.write_bytes(b"\0" * 100)
    assert hashes.legacy_hash(path) == hashlib.sha256(b"").hexdigest()[:8]


def test_sshs_hashes_match_saved_file(tmp_path):
    tensors = {"b": torch.arange(300000, dtype=torch.float32), "a": torch.ones(3, 3)}
    meta = {"ss_network_dim": "4", "modelspec.title": "ignored"}
    model_hash, legacy = hashes.sshs_hashes(tensors, meta)
    blob = save(tensors, metadata={"ss_network_dim": "4"})
    (length,) = struct.unpack("<Q", blob[:8])
    assert model_hash == hashlib.sha256(blob[8 + length :]).hexdigest()
    assert legacy == hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8]
    # A file with more metadata has the same tensor-data hash.
    path = tmp_path / "net.safetensors"
    path.write_bytes(save(tensors, metadata={**meta, "sshs_model_hash": model_hash}))
    assert hashes.sshs_model_hash(path) == model_hash


def test_sshs_hashes_without_training_metadata_match_kohya():
    """kohya's ``precalculate_safetensors_hashes`` (library/train_util.py) keeps the ``ss_*`` keys, possibly none,
    and serialises with that dict: an empty one still writes ``"__metadata__":{}`` into the header, which moves
    the bytes the legacy hash reads (offset 0x100000) in a file over 1 MiB."""
    tensors = {"w": torch.arange(400000, dtype=torch.float32)}
    for meta in ({}, {"modelspec.title": "not ss_"}):
        blob = save(tensors, metadata={})
        assert b'"__metadata__":{}' in blob[:100]
        (length,) = struct.unpack("<Q", blob[:8])
        assert hashes.sshs_hashes(tensors, meta) == (
            hashlib.sha256(blob[8 + length :]).hexdigest(),
            hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8],
        )
