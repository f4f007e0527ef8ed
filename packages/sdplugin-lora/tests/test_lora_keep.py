"""A prompt's LoRA stays merged between images of one session (A1111's rule), with exact results and undo.

``NetworkSession.keeping()`` leaves a LoRA applied after its image and reuses it for the next image that asks for
exactly the same (files as on disk, weights, mode, model); a file is parsed and hashed once per (path, size, mtime).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from lora_testutil import all_params, fresh_bundle, random_network
from sdcore.generate.networks import NetworkRef
from sdcore.generate.pipeline import generate_images
from sdcore.generate.session import NetworkSession
from sdplugin_lora import apply as apply_module
from sdplugin_lora.apply import LoraHandler
from sdplugin_lora.format import network_metadata, save_lora

SETTINGS = {"steps": 2, "width": 64, "height": 64, "cfg": 5.0}


def _save(bundle, folder, name, seed):
    network = random_network(bundle, seed=seed)
    meta = network_metadata(family=bundle.family, prediction_type=bundle.prediction_type, rank=4, alpha=2)
    return save_lora(folder / f"{name}.safetensors", network.state_dict(), meta, dtype="fp32")


@pytest.fixture
def loras(tmp_path):
    folder = tmp_path / "Lora"
    folder.mkdir()
    base = fresh_bundle("sd1")
    return {name: _save(base, folder, name, seed) for name, seed in (("a", 1), ("b", 2))}


class Spy:
    """Counts the merges (``apply_loras``) and the file reads (``read_lora``) the handler makes."""

    def __init__(self, monkeypatch):
        self.merges: list[list[float]] = []
        self.reads: list[str] = []
        merge, read = apply_module.apply_loras, apply_module.read_lora

        def counted_merge(bundle, specs, **kw):
            self.merges.append([spec.te_weight for spec in specs])
            return merge(bundle, specs, **kw)

        def counted_read(path):
            self.reads.append(os.path.basename(path))
            return read(path)

        monkeypatch.setattr(apply_module, "apply_loras", counted_merge)
        monkeypatch.setattr(apply_module, "read_lora", counted_read)


def _session(loras, mode="merge"):
    handler = LoraHandler(next(iter(loras.values())).parent)
    handler.options = {"lora_mode": mode}
    return NetworkSession({"lora": handler})


def _image(bundle, session, prompt, seed, info=None):
    """One image; its infotext fields appended to ``info``."""
    fields: list[dict[str, str]] = []
    image = generate_images(bundle, [prompt], seed=seed, networks=session, info=fields, **SETTINGS)[0]
    if info is not None:
        info += fields
    return np.asarray(image)


def _same_params(bundle, before):
    return all(torch.equal(before[k], v) for k, v in all_params(bundle).items())


@pytest.mark.parametrize("mode", ["merge", "hooks"])
def test_same_lora_merges_once_equals_undo_each_and_leaves_the_model_clean(loras, monkeypatch, mode):
    spy = Spy(monkeypatch)
    kept_bundle, kept = fresh_bundle("sd1"), _session(loras, mode)
    original = all_params(kept_bundle)
    infos: list[dict[str, str]] = []
    with kept.keeping():
        images = [_image(kept_bundle, kept, f"a cat {i} <lora:a:0.8>", seed=i, info=infos) for i in range(3)]
        assert len(spy.merges) == 1 and spy.reads == ["a.safetensors"]  # one read, one merge for three images
        assert kept.kept_key is not None
        assert _same_params(kept_bundle, original) == (mode == "hooks")  # still applied between the images
        plain = _image(kept_bundle, kept, "a cat", seed=7)  # another set (none): undone first
        assert kept.kept_key is None and _same_params(kept_bundle, original)
    assert _same_params(kept_bundle, original)
    short = infos[0]["Lora hashes"]
    assert short.startswith("a: ") and len(short) == len("a: ") + 12
    assert infos == [{"Lora hashes": short}] * 3  # every image carries its hashes, the kept ones too

    # the same images with the LoRA applied and undone around each image (no keeping block around the calls)
    fresh, each = fresh_bundle("sd1"), _session(loras, mode)
    for i, image in enumerate(images):
        assert np.array_equal(image, _image(fresh, each, f"a cat {i} <lora:a:0.8>", seed=i))
        assert _same_params(fresh, original)  # each call undid its LoRA
    assert len(spy.merges) == 1 + 3
    assert np.array_equal(plain, _image(fresh_bundle("sd1"), None, "a cat", seed=7))  # bit for bit a fresh model's
    assert not np.array_equal(images[0], _image(fresh_bundle("sd1"), None, "a cat 0", seed=0))  # the LoRA shows


def test_a_b_a_merges_on_every_change_and_reads_each_file_once(loras, monkeypatch):
    """A, B, A in separate calls: three merges (only the last set stays applied, as in A1111), two reads (the
    file cache); A, B, A in one call's prompt list: two merges (the call groups prompts by their networks)."""
    spy = Spy(monkeypatch)
    bundle, session = fresh_bundle("sd1"), _session(loras)
    original = all_params(bundle)
    with session.keeping():
        first = [_image(bundle, session, f"a dog <lora:{name}:1>", seed=3) for name in "aba"]
    assert [len(spy.merges), spy.reads] == [3, ["a.safetensors", "b.safetensors"]]
    assert np.array_equal(first[0], first[2]) and not np.array_equal(first[0], first[1])
    assert _same_params(bundle, original)
    batch = generate_images(bundle, [f"a dog <lora:{name}:1>" for name in "aba"], seed=3, networks=session,
                            **SETTINGS)  # fmt: skip
    assert len(spy.merges) == 3 + 2 and len(spy.reads) == 2
    assert np.array_equal(np.asarray(batch[0]), first[0]) and _same_params(bundle, original)


def test_changed_weight_or_file_applies_again(loras, monkeypatch):
    spy = Spy(monkeypatch)
    bundle, session = fresh_bundle("sd1"), _session(loras)
    original = all_params(bundle)
    infos: list[dict[str, str]] = []
    with session.keeping():
        _image(bundle, session, "a cat <lora:a:0.8>", seed=1, info=infos)
        _image(bundle, session, "a cat <lora:a:te=0.8:unet=0.8>", seed=1)  # the same weights spelled otherwise
        assert len(spy.merges) == 1
        _image(bundle, session, "a cat <lora:a:0.5>", seed=1)
        assert spy.merges == [[0.8], [0.5]]
        path = loras["a"]
        stat = path.stat()
        _save(fresh_bundle("sd1"), path.parent, "a", seed=5)  # another network under the same name
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
        changed = _image(bundle, session, "a cat <lora:a:0.5>", seed=1, info=infos)
        assert spy.merges == [[0.8], [0.5], [0.5]] and spy.reads == ["a.safetensors"] * 2
    assert _same_params(bundle, original)
    assert np.array_equal(changed, _image(fresh_bundle("sd1"), _session(loras), "a cat <lora:a:0.5>", seed=1))
    assert infos[0] != infos[1]  # the new file's hash (kohya's sshs_model_hash of the new tensors)


def test_a_file_rewritten_with_the_same_size_and_mtime_is_read_again(loras, monkeypatch):
    """A copy that keeps the old mtime (``cp -p``, rsync, an unzip) or a rewrite within the file system's mtime tick
    leaves size and mtime as they were: the file's inode and ctime (which no copy tool sets back) tell it, so the new
    network is read, hashed and merged, not the stale one kept."""
    spy = Spy(monkeypatch)
    bundle, session = fresh_bundle("sd1"), _session(loras)
    path, mine, other = loras["a"], loras["a"].read_bytes(), loras["b"].read_bytes()
    assert len(other) == len(mine)  # two random networks of one shape: the same size
    with session.keeping():
        first = _image(bundle, session, "a cat <lora:a:1>", seed=1)
        stat = path.stat()
        with open(path, "r+b") as f:  # in place: the same inode
            f.write(other)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # the old mtime back
        assert (path.stat().st_size, path.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
        changed = _image(bundle, session, "a cat <lora:a:1>", seed=1)
        assert len(spy.merges) == 2 and spy.reads == ["a.safetensors"] * 2
        replaced = path.with_name("new.safetensors")  # replaced by another file (a new inode), mtime set back again
        replaced.write_bytes(mine)
        os.utime(replaced, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        os.replace(replaced, path)
        again = _image(bundle, session, "a cat <lora:a:1>", seed=1)
        assert len(spy.merges) == 3 and spy.reads == ["a.safetensors"] * 3
    want_b = _image(fresh_bundle("sd1"), _session(loras), "a cat <lora:b:1>", seed=1)
    assert np.array_equal(changed, want_b) and not np.array_equal(first, want_b)
    assert np.array_equal(again, first)


class Interrupt(KeyboardInterrupt):
    pass


@pytest.mark.parametrize("where", ["inside", "ending"])
def test_an_error_or_ctrl_c_gives_back_the_original_weights(loras, where):
    bundle, session = fresh_bundle("sd1"), _session(loras)
    original = all_params(bundle)
    with pytest.raises(Interrupt), session.keeping():
        _image(bundle, session, "a cat <lora:a:1>", seed=1)
        assert not _same_params(bundle, original)
        if where == "ending":  # the keeping block ends with the error
            raise Interrupt
        with session.apply(bundle, "a cat <lora:a:1>"):  # reused, then the generation fails
            raise Interrupt
    assert _same_params(bundle, original) and session.kept_key is None


def test_generation_errors_inside_a_kept_block_undo_at_once(loras):
    """A Python caller catching an error inside its block finds its model clean at once, not at the block's end."""
    bundle, session = fresh_bundle("sd1"), _session(loras)
    original = all_params(bundle)
    with session.keeping():
        _image(bundle, session, "a cat <lora:a:1>", seed=1)
        with pytest.raises(ValueError), session.apply(bundle, "<lora:a:1> a cat"):
            raise ValueError("generation failed")
        assert _same_params(bundle, original) and session.kept_key is None


def test_activation_key_follows_weights_mode_and_file(loras):
    handler = LoraHandler(loras["a"].parent)
    ref = NetworkRef("lora", "a", (0.5,), "<lora:a:0.5>")
    same = [NetworkRef("lora", "a", (), "<lora:a:te=0.5>", named=(("te", 0.5),))]
    key = handler.activation_key([ref])
    assert key == handler.activation_key(same) and hash(key) == hash(handler.activation_key(same))
    assert key != handler.activation_key([NetworkRef("lora", "a", (0.5, 1.0))])  # another UNet weight
    assert key != handler.activation_key([ref, NetworkRef("lora", "b", (0.5,))])
    assert handler.activation_key([NetworkRef("lora", "a", (0.5, 0.5, 0.5))]) is None  # dyn=0.5: activate refuses
    handler.options = {"lora_mode": "hooks"}
    assert key != handler.activation_key([ref])
    handler.options = {}
    os.utime(loras["a"], ns=(0, 10**9))
    assert key != handler.activation_key([ref])
