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


# --- the sha256 cache on disk -----------------------------------------------------------------------------


def _no_reading(monkeypatch):
    """From now on any read of a file's bytes by the hashes module fails the test."""
    monkeypatch.setattr(hashes, "_stream", lambda *a, **k: (_ for _ in ()).throw(AssertionError("file read")))


def _fresh_process(monkeypatch):
    monkeypatch.setattr(hashes, "_SHA256_CACHE", {})


def test_sha256_is_kept_on_disk_and_a_second_process_reads_no_bytes(tmp_path, monkeypatch):
    import json
    import os

    monkeypatch.setenv("SDCORE_CACHE_DIR", str(tmp_path / "cache"))
    _fresh_process(monkeypatch)
    path, blob, _ = _file(tmp_path)
    full = hashlib.sha256(blob).hexdigest()
    assert hashes.sha256_file(path) == full
    stored = json.loads((tmp_path / "cache" / "sha256.json").read_text())
    stat = os.stat(path)
    assert stored == {
        "version": 1,
        "files": {str(path.resolve()): {"size": len(blob), "mtime_ns": stat.st_mtime_ns, "sha256": full}},
    }
    _fresh_process(monkeypatch)  # another run: nothing in memory
    _no_reading(monkeypatch)
    assert hashes.cached_sha256(path) == full
    assert hashes.sha256_file(path) == full and hashes.short_hash(path) == full[:10]


def test_a_changed_file_is_hashed_again(tmp_path, monkeypatch):
    import os

    monkeypatch.setenv("SDCORE_CACHE_DIR", str(tmp_path / "cache"))
    _fresh_process(monkeypatch)
    path, blob, _ = _file(tmp_path, size=1000)
    assert hashes.sha256_file(path) == hashlib.sha256(blob).hexdigest()
    other = bytes(reversed(blob))  # same size, other bytes, a later mtime
    path.write_bytes(other)
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000))
    _fresh_process(monkeypatch)
    assert hashes.cached_sha256(path) is None
    assert hashes.sha256_file(path) == hashlib.sha256(other).hexdigest()
    # only touched (same bytes, new mtime): read again, same value
    reads = []
    stream = hashes._stream
    monkeypatch.setattr(hashes, "_stream", lambda *a, **k: reads.append(a) or stream(*a, **k))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 9_000_000))
    _fresh_process(monkeypatch)
    assert hashes.sha256_file(path) == hashlib.sha256(other).hexdigest() and len(reads) == 1


def test_a_corrupt_or_unwritable_cache_is_ignored(tmp_path, monkeypatch):
    import json
    import os

    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("SDCORE_CACHE_DIR", str(cache))
    path, blob, _ = _file(tmp_path, size=1000)
    full = hashlib.sha256(blob).hexdigest()
    stat = os.stat(path)
    entry = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    for text in (
        "{not json",
        "\xff\xfe binary",
        "[1, 2]",
        json.dumps({"version": 1, "files": []}),
        json.dumps({"version": 99, "files": {str(path.resolve()): {**entry, "sha256": "0" * 64}}}),
        json.dumps({"version": 1, "files": {str(path.resolve()): {**entry, "sha256": "not a hash"}}}),
        json.dumps({"version": 1, "files": {str(path.resolve()): "x"}}),
    ):
        (cache / "sha256.json").write_text(text, encoding="latin-1")
        _fresh_process(monkeypatch)
        assert hashes.cached_sha256(path) is None, text
        assert hashes.sha256_file(path) == full
        assert json.loads((cache / "sha256.json").read_text())["files"][str(path.resolve())]["sha256"] == full
    # a cache folder that cannot be made (a file is in the way): hashing works, nothing is kept
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    monkeypatch.setenv("SDCORE_CACHE_DIR", str(blocker / "cache"))
    _fresh_process(monkeypatch)
    assert hashes.sha256_file(path) == full
    assert blocker.read_text() == "a file"


def test_entries_of_deleted_files_are_dropped_when_the_cache_is_written(tmp_path, monkeypatch):
    import json

    monkeypatch.setenv("SDCORE_CACHE_DIR", str(tmp_path / "cache"))
    _fresh_process(monkeypatch)
    gone = tmp_path / "gone.bin"
    gone.write_bytes(b"gone")
    kept = tmp_path / "kept.bin"
    kept.write_bytes(b"kept")
    hashes.sha256_file(gone)
    gone.unlink()
    hashes.sha256_file(kept)
    files = json.loads((tmp_path / "cache" / "sha256.json").read_text())["files"]
    assert list(files) == [str(kept.resolve())]
