"""Hashes against values computed independently (hashlib on the raw bytes)."""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import pytest
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
    monkeypatch.setattr(hashes, "_DISK_MEMO", None)
    monkeypatch.setattr(hashes, "_PRUNED", False)


@pytest.fixture
def user_cache(monkeypatch):
    """The cache where a user's run keeps it (``$SDCORE_CACHE_DIR``, not the session's file ``sdcore.testing``
    sets), for files of any size (these tests' files are small)."""
    monkeypatch.setattr(hashes, "_HASH_CACHE_OVERRIDE", None)
    monkeypatch.setattr(hashes, "DISK_CACHE_MIN_BYTES", 0)


def test_sha256_is_kept_on_disk_and_a_second_process_reads_no_bytes(tmp_path, monkeypatch, user_cache):
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


def test_a_changed_file_is_hashed_again(tmp_path, monkeypatch, user_cache):
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


def test_autov3_is_kept_beside_the_sha256_and_a_second_process_reads_no_bytes(tmp_path, monkeypatch, user_cache):
    """A LoRA's tensor-data hash (every generate's "Lora hashes") is cached as the whole-file sha256 is, in the same
    entry of the same file; each value is computed once and neither drops the other."""
    import json
    import os

    monkeypatch.setenv("SDCORE_CACHE_DIR", str(tmp_path / "cache"))
    _fresh_process(monkeypatch)
    path, blob, start = _file(tmp_path)
    data, full = hashlib.sha256(blob[start:]).hexdigest(), hashlib.sha256(blob).hexdigest()
    reads = []
    stream = hashes._stream
    monkeypatch.setattr(hashes, "_stream", lambda *a, **k: reads.append(a[1:]) or stream(*a, **k))
    assert hashes.cached_autov3(path) is None
    assert hashes.autov3_hash(path) == hashes.autov3_hash(path) == data
    assert reads == [(start,)]  # once, from the tensor data on, the second call from memory
    entry = {"size": len(blob), "mtime_ns": os.stat(path).st_mtime_ns}
    cache_file = tmp_path / "cache" / "sha256.json"
    assert json.loads(cache_file.read_text())["files"] == {str(path.resolve()): {**entry, "autov3": data}}
    assert hashes.sha256_file(path) == full and reads == [(start,), ()]
    assert json.loads(cache_file.read_text())["files"] == {
        str(path.resolve()): {**entry, "autov3": data, "sha256": full}
    }
    _fresh_process(monkeypatch)  # another run
    assert hashes.network_short_hash(path, {}) == data[:12]  # the LoRA path: no stored sshs_model_hash
    assert hashes.cached_autov3(path) == data and hashes.cached_sha256(path) == full
    assert reads == [(start,), ()]
    monkeypatch.setattr(hashes, "_SHA256_CACHE", {})  # a value of one kind never answers for the other
    cache_file.write_text(json.dumps({"version": 1, "files": {str(path.resolve()): {**entry, "sha256": full}}}))
    assert hashes.cached_autov3(path) is None and hashes.autov3_hash(path) == data


def test_a_changed_lora_gets_a_new_autov3_and_loses_its_old_values(tmp_path, monkeypatch, user_cache):
    import json
    import os

    monkeypatch.setenv("SDCORE_CACHE_DIR", str(tmp_path / "cache"))
    _fresh_process(monkeypatch)
    path, blob, start = _file(tmp_path, size=1000)
    hashes.sha256_file(path)
    assert hashes.autov3_hash(path) == hashlib.sha256(blob[start:]).hexdigest()
    other = blob[:start] + bytes(reversed(blob[start:]))  # same header and size, other tensor data
    path.write_bytes(other)
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000))
    _fresh_process(monkeypatch)
    assert hashes.cached_autov3(path) is None
    assert hashes.autov3_hash(path) == hashlib.sha256(other[start:]).hexdigest()
    stored = json.loads((tmp_path / "cache" / "sha256.json").read_text())["files"][str(path.resolve())]
    assert stored == {"size": len(other), "mtime_ns": stat.st_mtime_ns + 5_000_000,
                      "autov3": hashlib.sha256(other[start:]).hexdigest()}  # fmt: skip
    reads = []
    stream = hashes._stream
    monkeypatch.setattr(hashes, "_stream", lambda *a, **k: reads.append(a) or stream(*a, **k))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 9_000_000))  # only touched: read again
    _fresh_process(monkeypatch)
    assert hashes.autov3_hash(path) == hashlib.sha256(other[start:]).hexdigest() and len(reads) == 1


@pytest.mark.parametrize("kind", ["sha256", "autov3"])
def test_a_file_changed_while_it_is_read_is_read_again_and_never_kept_under_its_old_stat(
    tmp_path, monkeypatch, user_cache, kind
):
    """A LoRA a trainer saves over (or a checkpoint still being copied) while it is hashed: the value read is of
    bytes from before and after, so it answers for neither; the file is read again and only the value of the
    file as it stayed throughout is kept, under that file's size and mtime."""
    import json
    import os

    monkeypatch.setenv("SDCORE_CACHE_DIR", str(tmp_path / "cache"))
    _fresh_process(monkeypatch)
    path, blob, start = _file(tmp_path, size=1000)
    other = blob[:start] + bytes(reversed(blob[start:]))  # same size, other tensor data
    before = os.stat(path)
    stream = hashes._stream
    reads = []

    def changing(*args, **kwargs):  # the first read sees the old bytes; the file is replaced as it ends
        value = stream(*args, **kwargs)
        if not reads:
            path.write_bytes(other)
            os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 7_000_000))
        reads.append(args[1:])
        return value

    monkeypatch.setattr(hashes, "_stream", changing)
    compute = hashes.sha256_file if kind == "sha256" else hashes.autov3_hash
    expected = hashlib.sha256(other if kind == "sha256" else other[start:]).hexdigest()
    assert compute(path) == expected and len(reads) == 2
    stored = json.loads((tmp_path / "cache" / "sha256.json").read_text())["files"]
    assert stored == {str(path.resolve()): {"size": 1000 + start, "mtime_ns": before.st_mtime_ns + 7_000_000,
                                            kind: expected}}  # fmt: skip
    assert (kind, str(path.resolve()), before.st_size, before.st_mtime_ns) not in hashes._SHA256_CACHE
    assert compute(path) == expected and len(reads) == 2  # now from memory


def test_a_file_that_keeps_changing_is_hashed_but_kept_nowhere(tmp_path, monkeypatch, user_cache):
    import os

    monkeypatch.setenv("SDCORE_CACHE_DIR", str(tmp_path / "cache"))
    _fresh_process(monkeypatch)
    path, blob, _ = _file(tmp_path, size=1000)
    stream = hashes._stream
    reads = []

    def growing(*args, **kwargs):  # a copy still going on: longer after every read
        value = stream(*args, **kwargs)
        reads.append(1)
        with open(path, "ab") as handle:
            handle.write(b"x")
        return value

    monkeypatch.setattr(hashes, "_stream", growing)
    hashes.sha256_file(path)
    assert len(reads) == 3 and hashes._SHA256_CACHE == {}
    assert not (tmp_path / "cache" / "sha256.json").exists()
    assert os.stat(path).st_size == len(blob) + 3


def test_small_loras_autov3_is_kept_in_memory_only(tmp_path, monkeypatch):
    monkeypatch.setattr(hashes, "_HASH_CACHE_OVERRIDE", None)
    monkeypatch.setenv("SDCORE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(hashes, "DISK_CACHE_MIN_BYTES", 1001)
    _fresh_process(monkeypatch)
    small, blob, start = _file(tmp_path, size=1000 - 34)
    assert hashes.autov3_hash(small) == hashlib.sha256(blob[start:]).hexdigest()
    _no_reading(monkeypatch)
    assert hashes.autov3_hash(small) == hashlib.sha256(blob[start:]).hexdigest()  # memory
    assert not (tmp_path / "cache").exists()
    _fresh_process(monkeypatch)
    assert hashes.cached_autov3(small) is None


def test_a_corrupt_or_unwritable_cache_is_ignored(tmp_path, monkeypatch, user_cache):
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


def test_entries_of_deleted_files_are_dropped_by_the_next_runs_first_write(tmp_path, monkeypatch, user_cache):
    import json

    monkeypatch.setenv("SDCORE_CACHE_DIR", str(tmp_path / "cache"))
    _fresh_process(monkeypatch)
    gone = tmp_path / "gone.bin"
    gone.write_bytes(b"gone")
    kept = tmp_path / "kept.bin"
    kept.write_bytes(b"kept")
    hashes.sha256_file(gone)
    gone.unlink()
    _fresh_process(monkeypatch)  # the next run's first write drops it (one stat per entry, once a process)
    hashes.sha256_file(kept)
    files = json.loads((tmp_path / "cache" / "sha256.json").read_text())["files"]
    assert list(files) == [str(kept.resolve())]


def test_a_deleted_files_entry_goes_unless_its_folder_is_missing_too(tmp_path, monkeypatch, user_cache):
    """A file deleted from a folder that is there, or from the temporary folder (a test's), loses its entry; one
    whose folder is missing too (a drive not mounted now) keeps it, so its checkpoints are not read again."""
    import json

    cache = tmp_path / "cache"
    monkeypatch.setenv("SDCORE_CACHE_DIR", str(cache))
    entry = {"size": 4, "mtime_ns": 1, "sha256": "0" * 64}
    unmounted = "/sdcore-test-unmounted-drive/models/a.safetensors"
    in_temp = str(tmp_path / "deleted-folder" / "b.safetensors")
    deleted = str(tmp_path / "c.safetensors")
    cache.mkdir()
    (cache / "sha256.json").write_text(
        json.dumps({"version": 1, "files": {path: entry for path in (unmounted, in_temp, deleted)}})
    )
    _fresh_process(monkeypatch)
    kept = tmp_path / "kept.bin"
    kept.write_bytes(b"kept")
    hashes.sha256_file(kept)
    assert sorted(json.loads((cache / "sha256.json").read_text())["files"]) == sorted([unmounted, str(kept.resolve())])


def test_small_files_stay_out_of_the_disk_cache(tmp_path, monkeypatch):
    """Below DISK_CACHE_MIN_BYTES a file is hashed again in each process (cheaper than the cache file)."""
    monkeypatch.setattr(hashes, "_HASH_CACHE_OVERRIDE", None)
    monkeypatch.setenv("SDCORE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(hashes, "DISK_CACHE_MIN_BYTES", 1001)
    _fresh_process(monkeypatch)
    small, blob, _ = _file(tmp_path, size=1000 - 34)  # 1000 bytes with the header
    assert small.stat().st_size == 1000
    assert hashes.sha256_file(small) == hashlib.sha256(blob).hexdigest()
    assert not (tmp_path / "cache").exists()
    assert hashes.cached_sha256(small) == hashlib.sha256(blob).hexdigest()  # this process still knows it
    _fresh_process(monkeypatch)
    assert hashes.cached_sha256(small) is None


def test_the_cache_file_is_parsed_once_per_process_while_no_one_else_writes_it(tmp_path, monkeypatch, user_cache):
    """A generate run hashes the model and every LoRA: the cache file is read once, not once per file; a file
    another process wrote since is read again."""
    import json

    monkeypatch.setenv("SDCORE_CACHE_DIR", str(tmp_path / "cache"))
    _fresh_process(monkeypatch)
    files = []
    for index in range(5):
        file = tmp_path / f"lora{index}.safetensors"
        file.write_bytes(bytes([index]) * 100)
        files.append(file)
    hashes.sha256_file(files[0])
    parses = []
    loads = json.loads
    monkeypatch.setattr(json, "loads", lambda *a, **k: parses.append(1) or loads(*a, **k))
    for file in files[1:]:  # four misses, four writes: none re-reads what this process wrote
        hashes.sha256_file(file)
    for file in files:
        assert hashes.cached_sha256(file) == hashlib.sha256(file.read_bytes()).hexdigest()
    assert parses == []
    monkeypatch.setattr(hashes, "_SHA256_CACHE", {})  # same process, memory dropped: the disk memo answers
    assert [hashes.cached_sha256(file) for file in files] == [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]
    assert parses == []
    cache_file = tmp_path / "cache" / "sha256.json"  # another writer replaces the file: it is read again
    stored = loads(cache_file.read_text())
    stored["files"][str(files[0].resolve())]["sha256"] = "f" * 64
    (tmp_path / "other.json").write_text(json.dumps(stored))
    (tmp_path / "other.json").replace(cache_file)
    monkeypatch.setattr(hashes, "_SHA256_CACHE", {})
    assert hashes.cached_sha256(files[0]) == "f" * 64 and parses == [1]


def test_two_processes_writing_at_once_leave_a_valid_cache(tmp_path, monkeypatch, user_cache):
    """Concurrent writers (pytest-xdist workers, two ``generate`` runs): each write is atomic, so the file always
    parses; the last writer wins, and every entry it holds is right."""
    import json
    import multiprocessing

    monkeypatch.setenv("SDCORE_CACHE_DIR", str(tmp_path / "cache"))
    _fresh_process(monkeypatch)
    files = []
    for index in range(40):
        file = tmp_path / f"f{index}.bin"
        file.write_bytes(index.to_bytes(2, "little") * 50)
        files.append(file)
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_hash_all, args=(str(tmp_path / "cache"), [str(f) for f in files[i::2]]))
               for i in range(2)]  # fmt: skip
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    stored = json.loads((tmp_path / "cache" / "sha256.json").read_text())["files"]
    assert stored, "no entry kept"
    for path, entry in stored.items():
        assert entry["sha256"] == hashlib.sha256(Path(path).read_bytes()).hexdigest()
    assert not list((tmp_path / "cache").glob("*.tmp"))  # no stray temporary file


def _hash_all(cache: str, paths: list[str]) -> None:
    import os

    from sdcore.models import hashes

    os.environ["SDCORE_CACHE_DIR"] = cache
    hashes._HASH_CACHE_OVERRIDE = None
    hashes.DISK_CACHE_MIN_BYTES = 0
    for path in paths:
        hashes.sha256_file(path)


def test_each_test_session_has_its_own_hash_cache(tmp_path_factory):
    """``sdcore.testing`` keeps tests off the shared ``$SDCORE_CACHE_DIR`` (CI's tiny-model cache, a user's):
    each session (each xdist worker) writes its own ``sha256.json``."""
    from sdcore.io import cache_dir

    path = hashes._hash_cache_path()
    assert path.name == "sha256.json" and path.parent.parent == tmp_path_factory.getbasetemp()
    assert cache_dir() not in path.parents
