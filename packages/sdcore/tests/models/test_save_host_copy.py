"""Saving a whole model casts it tensor by tensor into host memory (sdcore.models.save.host_copy), never
through a second copy of the module on its device (``copy.deepcopy(module).to(dtype)`` held a FLUX.1
transformer twice on the GPU). The files written must be the old path's: the reference here IS the old
code path (``host_copy``/``host_bundle`` patched back to a deep copy / the bundle itself)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from sdcore.models import save as save_module
from sdcore.models.family import family_adapter
from torch.utils._python_dispatch import TorchDispatchMode

FAMILIES = ("sd1", "sdxl", "sd3", "flux")
_BUNDLES: dict[str, Any] = {}


def _bundle(family: str) -> Any:
    if family not in _BUNDLES:
        _BUNDLES[family] = family_adapter(family).create_tiny(seed=0)
    return copy.deepcopy(_BUNDLES[family])


def _old_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The writers as they were: a deep copy cast on the module's device; single files converted from the
    bundle's own modules."""
    monkeypatch.setattr(save_module, "host_copy", lambda module, dtype=None: copy.deepcopy(module).to(dtype))
    monkeypatch.setattr(save_module, "host_bundle", lambda bundle, dtype=None: bundle)


def _file_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}, dict(handle.metadata() or {})  # noqa: SIM118


def _same_single_file(new: Path, old: Path) -> None:
    got, got_meta = _file_tensors(new)
    want, want_meta = _file_tensors(old)
    assert want, f"{old}: no tensors written"  # an empty pair of files would compare equal
    assert list(got) == list(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype and torch.equal(got[key], value), key
    got_meta.pop("modelspec.date", None), want_meta.pop("modelspec.date", None)  # the second it was written
    assert got_meta == want_meta  # modelspec.hash_sha256 included: the tensor data bytes are the same


def _same_folder(new: Path, old: Path) -> None:
    files = sorted(p.relative_to(new) for p in new.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(old) for p in old.rglob("*") if p.is_file())
    assert any(f.suffix == ".safetensors" for f in files) and any(f.name == "config.json" for f in files)
    for name in files:
        assert (new / name).read_bytes() == (old / name).read_bytes(), name


@pytest.mark.parametrize("family", FAMILIES)
def test_diffusers_folder_is_byte_for_byte_the_old_one(tmp_path, monkeypatch, family):
    bundle = _bundle(family)
    new = bundle.save(tmp_path / "new", format="diffusers", dtype="fp16")
    with monkeypatch.context() as patch:
        _old_path(patch)
        old = bundle.save(tmp_path / "old", format="diffusers", dtype="fp16")
    _same_folder(new, old)
    configs = [json.loads(p.read_text()) for p in new.glob("text_encoder*/config.json")]
    assert configs and all((c.get("dtype") or c.get("torch_dtype")) == "float16" for c in configs)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", ["bf16", None])
def test_single_file_is_the_old_one(tmp_path, monkeypatch, family, dtype):
    bundle = _bundle(family)
    new = bundle.save(tmp_path / "new" / "model.safetensors", format="single-file", dtype=dtype)
    with monkeypatch.context() as patch:
        _old_path(patch)
        old = bundle.save(tmp_path / "old" / "model.safetensors", format="single-file", dtype=dtype)
    _same_single_file(new, old)


class _CopyWatch(TorchDispatchMode):
    """Every op that reads one of the watched (model) tensors and makes a new tensor: on a GPU those are
    device allocations unless the op is the cast/move of that one tensor (``_to_copy``)."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        super().__init__()
        self.watched = {t.untyped_storage().data_ptr() for t in tensors if t.numel()}
        self.copies: list[str] = []
        self.casts = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        inputs = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        reads = any(t.numel() and t.untyped_storage().data_ptr() in self.watched for t in inputs)
        outputs = [o for o in torch.utils._pytree.tree_leaves(out) if isinstance(o, torch.Tensor)]
        real = [o for o in outputs if o.device.type != "meta" and o.numel()]  # meta: a shape, no memory
        new = any(o.untyped_storage().data_ptr() not in self.watched for o in real)
        if reads and new:
            if func is torch.ops.aten._to_copy.default and len(inputs) == 1:
                self.casts += 1
            else:
                self.copies.append(str(func))
        return out


def _watched(bundle: Any) -> list[torch.Tensor]:
    modules = [bundle.denoiser, bundle.vae, *bundle.text_encoders]
    return [t for m in modules for t in (*m.parameters(), *m.buffers())]


@pytest.mark.parametrize("family", ["sdxl", "flux"])
@pytest.mark.parametrize("format", ["diffusers", "single-file"])
def test_no_copy_of_the_model_is_made_where_it_lives(tmp_path, monkeypatch, family, format):
    """The model's tensors are only ever read by the cast of each one on its own (fp32 -> fp16 here, so
    each read is visible on a CPU too); the old path's deep copy / device-side q,k,v fusion is caught."""
    bundle = _bundle(family)
    tensors = _watched(bundle)
    suffix = ".safetensors" if format == "single-file" else ""
    with _CopyWatch(tensors) as watch:
        bundle.save(tmp_path / f"new{suffix}", format=format, dtype="fp16")
    assert watch.copies == []
    assert 0 < watch.casts <= len({id(t) for t in tensors})  # each tensor cast at most once
    with monkeypatch.context() as patch, _CopyWatch(tensors) as old:
        _old_path(patch)
        bundle.save(tmp_path / f"old{suffix}", format=format, dtype="fp16")
    assert old.copies  # the check can fail: the old path copied the model where it lives


def test_the_saved_model_is_left_as_it_was(tmp_path):
    bundle = _bundle("flux")
    modules = [bundle.transformer, bundle.vae, *bundle.text_encoders]
    before = [[(id(p), p.data_ptr(), p.dtype, p.requires_grad) for p in m.parameters()] for m in modules]
    configs = [json.dumps(save_module._json_config(m.config), sort_keys=True) for m in modules]
    calls: list[int] = []
    handle = bundle.transformer.register_forward_hook(lambda *a: calls.append(1))
    bundle.save(tmp_path / "out", format="diffusers", dtype="bf16")
    bundle.save(tmp_path / "out.safetensors", format="single-file", dtype="bf16")
    assert [[(id(p), p.data_ptr(), p.dtype, p.requires_grad) for p in m.parameters()] for m in modules] == before
    assert [json.dumps(save_module._json_config(m.config), sort_keys=True) for m in modules] == configs
    assert handle.id in bundle.transformer._forward_hooks  # the trained model keeps its hooks


def test_host_copy_keeps_ties_and_leaves_hooks_behind():
    from torch import nn

    model = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 5, bias=False))
    model[1].weight = model[0].weight  # tied, as a language model's head
    model.register_buffer("steps", torch.arange(3))
    model[1].register_forward_hook(lambda *a: None)
    copied = save_module.host_copy(model, torch.float16)
    assert copied[1].weight is copied[0].weight and copied[0].weight.dtype == torch.float16
    assert copied.steps.dtype == torch.int64 and torch.equal(copied.steps, model.steps)  # only floats are cast
    assert torch.equal(copied[0].weight, model[0].weight.to(torch.float16))
    assert not copied[1]._forward_hooks and model[1]._forward_hooks


@pytest.mark.parametrize("storage", ["fp8", "nf4", "int8"])
def test_quantised_frozen_layers_save_as_before(tmp_path, monkeypatch, storage):
    """--base-weights-dtype layers: ``host_copy`` casts them as ``module.to(dtype)`` does (fp8 weights
    cast like any float, NF4/int8 codes kept, their fp32 maxima never rounded), and a saved model holds
    what the old path wrote."""
    from sdcore.train.base_weights import convert_base_weights

    if storage == "fp8" and not hasattr(torch, "float8_e4m3fn"):
        pytest.fail("this torch has no float8 types")
    bundle = _bundle("sd1")
    bundle.unet.requires_grad_(False)
    assert convert_base_weights(bundle.unet, storage, torch.float32) > 0
    want = save_module.host_copy(bundle.unet, torch.float16).state_dict()
    old = copy.deepcopy(bundle.unet).to(torch.float16).state_dict()
    assert list(want) == list(old)
    assert any(key.endswith("weight_absmax") for key in old) == (storage != "fp8")
    for key, value in old.items():
        assert want[key].dtype == value.dtype and torch.equal(want[key], value), key
    if storage != "fp8":  # NF4/int8 models are refused by the preflight for whole-model saves
        return
    new = bundle.save(tmp_path / "new_folder", format="diffusers", dtype="fp16")
    single = bundle.save(tmp_path / "new" / "model.safetensors", format="single-file", dtype="fp16")
    with monkeypatch.context() as patch:
        _old_path(patch)
        _same_folder(new, bundle.save(tmp_path / "old", format="diffusers", dtype="fp16"))
        _same_single_file(
            single, bundle.save(tmp_path / "old" / "model.safetensors", format="single-file", dtype="fp16")
        )


def test_a_bfl_file_copies_the_transformer_alone(tmp_path, monkeypatch):
    """``--to bfl`` writes the FLUX.1 transformer alone (flux/save.py ``flux_state``): a host copy of the VAE and
    text encoders (T5-XXL: 9.5 GB in bf16) would only be thrown away. The file is the old path's."""
    bundle = _bundle("flux")
    copied: list[str] = []
    real = save_module.host_copy

    def recording(module: Any, dtype: Any = None) -> Any:
        copied.append(type(module).__name__)
        return real(module, dtype)

    with monkeypatch.context() as patch:
        patch.setattr(save_module, "host_copy", recording)
        new = bundle.save(tmp_path / "new" / "flux.safetensors", format="bfl", dtype="fp16")
    assert copied == [type(bundle.transformer).__name__]
    with monkeypatch.context() as patch:
        _old_path(patch)
        old = bundle.save(tmp_path / "old" / "flux.safetensors", format="bfl", dtype="fp16")
    _same_single_file(new, old)
