"""Pickle checkpoints: nested ``state_dict``, EMA selection, junk keys, and refusing code in pickles."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
from safetensors.torch import load_file
from sdcore.errors import ModelFormatError, UnsafeFileError
from sdcore.models.load import load_model


def _ckpt(tiny_files, tmp_path, *, ema: bool, nested: int = 1):
    state = load_file(str(tiny_files["sd1"]))
    unet_keys = [k for k in state if k.startswith("model.diffusion_model.")]
    if ema:
        for key in unet_keys:
            state["model_ema." + key[len("model.") :].replace(".", "")] = state[key] + 1
        state["model_ema.decay"] = torch.tensor(0.9999)
        state["model_ema.num_updates"] = torch.tensor(10)
    state["betas"] = torch.linspace(0, 1, 1000)
    state["alphas_cumprod"] = torch.linspace(1, 0, 1000)
    state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77.0)[None]
    data: dict = state
    for _ in range(nested):
        data = {"state_dict": data, "global_step": 470000, "epoch": 3}
    path = tmp_path / "model.ckpt"
    torch.save(data, path)
    return path, unet_keys


def test_nested_ckpt_loads_non_ema_by_default(tiny_files, tiny_folders, tmp_path, assert_modules_equal):
    path, _ = _ckpt(tiny_files, tmp_path, ema=True, nested=2)
    loaded = load_model(path, config=tiny_folders["sd1"])
    ref = load_model(tiny_files["sd1"])
    assert loaded.family == "sd1" and loaded.source_format == "single-file"
    for name, module in ref.components().items():
        assert_modules_equal(module, loaded.components()[name])


def test_ckpt_ema_weights_on_request(tiny_files, tiny_folders, tmp_path, assert_modules_equal):
    path, _ = _ckpt(tiny_files, tmp_path, ema=True)
    loaded = load_model(path, use_ema=True, config=tiny_folders["sd1"])
    ref = load_model(tiny_files["sd1"])
    for key, value in ref.unet.state_dict().items():
        assert torch.equal(loaded.unet.state_dict()[key], value + 1), key
    assert_modules_equal(ref.vae, loaded.vae)


def test_ema_requested_but_absent(tiny_files, tmp_path):
    path, _ = _ckpt(tiny_files, tmp_path, ema=False)
    with pytest.raises(ModelFormatError, match="no EMA weights"):
        load_model(path, use_ema=True)


def test_ckpt_without_layout_is_inferred_from_shapes(tiny_files, tmp_path, assert_modules_equal):
    path, _ = _ckpt(tiny_files, tmp_path, ema=False)
    loaded = load_model(path)  # no sdcore.config in a .ckpt, not the standard SD1 sizes
    assert list(loaded.unet.config.block_out_channels) == [32, 64]
    ref = load_model(tiny_files["sd1"])
    for name, module in ref.components().items():
        assert_modules_equal(module, loaded.components()[name])


def test_wrong_config_folder_names_the_problem(tiny_files, tiny_folders):
    with pytest.raises(ModelFormatError, match="text encoder config") as info:
        load_model(tiny_files["sdxl"], config=tiny_folders["sd1"])
    assert "\n" not in str(info.value) and str(tiny_files["sdxl"]) in str(info.value)
    with pytest.raises(ModelFormatError, match="pass config=") as info:
        from sdcore.models.load import bundled_config

        load_model(tiny_files["sd1"], config=bundled_config("sd1"))  # real SD1 sizes, tiny file
    assert "\n" not in str(info.value)


class _Exploit:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("container", ["zip", "legacy"])
def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path, container):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    payload = {"state_dict": {"x": torch.zeros(1)}, "hook": _Exploit(str(marker))}
    if container == "zip":
        torch.save(payload, path)
    else:
        with open(path, "wb") as handle:  # a bare pickle, as hand-made exploits are
            pickle.dump({"hook": _Exploit(str(marker))}, handle, protocol=2)
    with pytest.raises(UnsafeFileError) as info:
        load_model(path)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message and "refuses to run code in pickle" in message
    assert "system" in message
    assert not marker.exists()


def test_pickle_with_non_tensor_object_is_refused(tmp_path):
    import argparse

    path = tmp_path / "args.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": argparse.Namespace(lr=1)}, path)
    with pytest.raises(UnsafeFileError, match="Namespace"):
        load_model(path)


def test_lightning_and_numpy_values_in_a_ckpt_load(tiny_files, tmp_path, monkeypatch, assert_modules_equal):
    """The original SD 1.x ``.ckpt`` files are PyTorch Lightning saves: their ``callbacks`` dict is keyed by the
    ``ModelCheckpoint`` class, and Lightning training values may be numpy numbers. A1111's restricted unpickler
    allows exactly these names (modules/safe.py ``RestrictedUnpickler.find_class``: ``pytorch_lightning.callbacks.
    model_checkpoint.ModelCheckpoint``, ``numpy.core.multiarray.scalar``/``_reconstruct``, ``numpy.dtype``/
    ``ndarray``), so such a file must load here too, without Lightning installed."""
    import sys
    import types

    import numpy as np

    module = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")
    checkpoint_class = type("ModelCheckpoint", (), {"__module__": module.__name__})
    module.ModelCheckpoint = checkpoint_class  # type: ignore[attr-defined]
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, module.__name__, module)
    state = load_file(str(tiny_files["sd1"]))
    path = tmp_path / "sd-v1-4-like.ckpt"
    torch.save({"epoch": np.int64(6), "global_step": np.int64(470000), "pytorch-lightning_version": "1.4.2",
                "state_dict": state, "loss_history": np.arange(3.0),
                "callbacks": {checkpoint_class: {"monitor": None, "best_model_path": "x"}}}, path)  # fmt: skip
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", module.__name__):
        monkeypatch.delitem(sys.modules, name)  # what reads the file has no Lightning

    from sdcore.models.safe_pickle import load_pickle

    data = load_pickle(path)
    assert data["global_step"] == 470000 and list(data["loss_history"]) == [0.0, 1.0, 2.0]
    (key,) = data["callbacks"]
    assert data["callbacks"][key]["best_model_path"] == "x"
    loaded = load_model(path)
    ref = load_model(tiny_files["sd1"])
    for name, component in ref.components().items():
        assert_modules_equal(component, loaded.components()[name])


def test_numpy_object_arrays_do_not_open_the_door_to_code(tmp_path):
    """Allowing numpy arrays must not allow what an object array holds: its items go through the same checks."""
    import numpy as np

    marker = tmp_path / "pwned"
    items = np.empty(1, dtype=object)
    items[0] = _Exploit(str(marker))
    path = tmp_path / "evil_array.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "values": items}, path)
    with pytest.raises(UnsafeFileError, match="system"):
        load_model(path)
    assert not marker.exists()


def _not_torch_files(tiny_files, tmp_path):
    """What users end up with under a ``.pt``/``.ckpt`` name: (file, what the message must say about it)."""
    from sdcore.models.load import load_model

    vae = load_model(tiny_files["sd1"]).vae
    from safetensors.torch import save_file

    renamed = tmp_path / "renamed.vae.pt"  # a safetensors VAE given a .pt name
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(renamed))
    page = tmp_path / "page.vae.pt"  # "Save link as" on a download page that wanted a login
    page.write_text("<!DOCTYPE html>\n<html><head><title>Sign in</title></head><body></body></html>\n")
    pointer = tmp_path / "pointer.vae.ckpt"  # a git clone without git-lfs
    pointer.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 334643238\n")
    empty = tmp_path / "empty.vae.pt"
    empty.write_bytes(b"")
    from PIL import Image

    image = tmp_path / "preview.png"  # sweep2: read "refuses to run code in pickle: Unsupported operand 80"
    Image.new("RGB", (8, 8)).save(image)
    return {
        image: "a PNG image, not a model",
        renamed: "a safetensors file: rename it to renamed.vae.safetensors",
        page: "a web page (HTML)",
        pointer: "a Git LFS pointer",
        empty: "the file is empty",
    }


def test_a_file_that_is_not_a_torch_file_says_what_it_is(tiny_files, tmp_path):
    """A renamed safetensors file or a saved web page used to read "refuses to run code in pickle: Unsupported
    operand 8": a security refusal for a file that is no pickle at all."""
    from sdcore.models.parts import load_vae_like
    from sdcore.models.safe_pickle import load_pickle

    like = load_model(tiny_files["sd1"]).vae
    for path, what in _not_torch_files(tiny_files, tmp_path).items():
        for load in (load_pickle, lambda p: load_vae_like(p, like)):
            with pytest.raises(ModelFormatError) as caught:
                load(path)
            assert not isinstance(caught.value, UnsafeFileError)
            message = str(caught.value)
            assert message.startswith(f"{path}: not a torch file (") and what in message, message
            assert "\n" not in message


def test_a_vae_that_is_not_a_torch_file_is_one_line_in_the_preflight_and_at_load(tiny_files, tmp_path):
    from click.testing import CliRunner
    from sdcore.cli import build_cli
    from sdcore.plugins import get_plugin_manager
    from sdcore.testing.contract import make_tiny_dataset

    cli = build_cli(get_plugin_manager())
    data = make_tiny_dataset(tmp_path / "data", n=2)
    for path, what in _not_torch_files(tiny_files, tmp_path).items():
        args = ["train", "lora", "--model", str(tiny_files["sd1"]), "--vae", str(path), "--data", str(data),
                "--output", str(tmp_path / "out.safetensors"), "--resolution", "64", "--max-steps", "1", "--dry-run"]  # fmt: skip
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 2, result.output
        errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
        assert errors == [
            f"Error: --vae {path}: not a readable VAE file: not a torch file ({errors[0].split('(', 1)[1]}"
        ]
        assert what in errors[0] and "Traceback" not in result.output
    page = tmp_path / "page.vae.pt"
    images = str(tmp_path / "images")
    args = ["generate", "a cat", "--model", str(tiny_files["sd1"]), "--vae", str(page), "--steps", "1", "--size", "64"]
    generated = CliRunner().invoke(cli, [*args, "--output", images])
    assert generated.exit_code == 2, generated.output  # generate's pre-flight, as train's
    assert generated.output.strip().splitlines() == [
        f"Error: --vae {page}: not a readable VAE file: not a torch file (it is a web page (HTML), not a model: the "
        "browser saved a download page; download the file itself)"
    ]
    # model info checks its part options before loading too (as generate, since it takes names): the same line
    loaded = CliRunner().invoke(cli, ["model", "info", str(tiny_files["sd1"]), "--no-hash", "--vae", str(page)])
    assert loaded.exit_code == 2, loaded.output
    assert loaded.output.strip().splitlines() == generated.output.strip().splitlines()
    # and the loader itself, for a caller that skips the pre-flight (the Python API): its own line
    from sdcore.errors import SdcoreError
    from sdcore.models.load import load_model

    with pytest.raises(SdcoreError, match=r"page\.vae\.pt: not a torch file \(it is a web page \(HTML\)"):
        load_model(str(tiny_files["sd1"]), vae=str(page))


def test_a_broken_a1111_vae_beside_the_model_is_named_as_such(tiny_files, tmp_path):
    """The pre-flight note no longer advises ``--vae`` for a sidecar that is no torch file."""
    from sdcore.models.layout import read_layout
    from sdcore.train.options import TrainOptions
    from sdcore.train.preflight import sidecar_vae_notes

    path = tmp_path / "model.safetensors"
    path.write_bytes(tiny_files["sd1"].read_bytes())
    (tmp_path / "model.vae.pt").write_text("<html><body>Just a moment...</body></html>")
    (note,) = sidecar_vae_notes(TrainOptions(), read_layout(path))
    assert note.startswith("model.vae.pt is beside the model, where A1111 looks for a VAE, but it is not a torch file")
    assert "a web page (HTML)" in note and "--vae" not in note


@pytest.mark.parametrize("zipped", [True, False])
def test_genuine_torch_saves_pass_the_first_bytes_check_and_load(tmp_path, zipped):
    """The check of the first bytes lets every real torch file through to torch: the zip format (torch >= 1.6)
    and the old bare pickle (``_use_new_zipfile_serialization=False``, what A1111-era embeddings and
    hypernetworks often are), nested containers and plain values included."""
    from sdcore.models.safe_pickle import load_pickle, not_torch_file

    data = {
        "string_to_param": {"*": torch.randn(2, 8)},
        "nested": [torch.arange(3), {"half": torch.ones(2, dtype=torch.float16)}],
        "step": 500,
        "name": "emb",
        "sd_checkpoint": None,
    }
    path = tmp_path / "file.pt"
    torch.save(data, path, _use_new_zipfile_serialization=zipped)
    assert path.read_bytes()[:2] == (b"PK" if zipped else b"\x80\x02")
    assert not_torch_file(path) is None
    loaded = load_pickle(path)
    assert torch.equal(loaded["string_to_param"]["*"], data["string_to_param"]["*"])
    assert torch.equal(loaded["nested"][0], data["nested"][0])
    assert torch.equal(loaded["nested"][1]["half"], data["nested"][1]["half"])
    assert loaded["nested"][1]["half"].dtype == torch.float16
    assert (loaded["step"], loaded["name"], loaded["sd_checkpoint"]) == (500, "emb", None)


def test_a_legacy_tar_torch_file_goes_to_torch_not_to_the_first_bytes_check(tmp_path):
    """torch < 0.4's tar format (members sys_info, pickle, storages, tensors) is no safetensors file, page or
    pointer: torch itself reports it (its weights-only reader does not read the tar format, on main as here)."""
    import io
    import tarfile

    from sdcore.models.safe_pickle import load_pickle, not_torch_file

    path = tmp_path / "old.pt"
    with tarfile.open(path, "w") as tar:
        for name in ("sys_info", "pickle", "storages", "tensors"):
            payload = pickle.dumps({"protocol_version": 1001, "little_endian": True}, protocol=2)
            member = tarfile.TarInfo(name)
            member.size = len(payload)
            tar.addfile(member, io.BytesIO(payload))
    assert not_torch_file(path) is None
    with pytest.raises(ModelFormatError) as caught:
        load_pickle(path)
    assert "not a torch file" not in str(caught.value) and "legacy .tar format" in str(caught.value)


@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4, 5])
def test_a_planted_pickle_of_any_protocol_is_refused_as_code_not_called_junk(tmp_path, protocol):
    """``pickle.dump``'s default protocol (4, 5) asks for its function with STACK_GLOBAL, protocol 0 builds with
    INST-like opcodes: instructions torch's weights-only reader leaves out, which must stay a refusal to run code,
    not "not a torch file (no zip and no pickle)"."""
    from sdcore.models.safe_pickle import load_pickle

    marker = tmp_path / "pwned"
    path = tmp_path / f"evil{protocol}.pt"
    with open(path, "wb") as handle:
        pickle.dump({"hook": _Exploit(str(marker))}, handle, protocol=protocol)
    with pytest.raises(UnsafeFileError, match="refuses to run code in pickle"):
        load_pickle(path)
    inst = tmp_path / "inst.pt"  # the INST opcode: ``i`` module, name, called with the marked arguments
    inst.write_bytes(b"(S'touch " + str(marker).encode() + b"'\nios\nsystem\n.")
    with pytest.raises(UnsafeFileError, match="refuses to run code in pickle"):
        load_pickle(inst)
    assert not marker.exists()


def test_bytes_no_pickle_has_are_not_a_torch_file(tmp_path):
    import gzip

    from sdcore.models.safe_pickle import load_pickle

    path = tmp_path / "packed.pt"  # a gzip (or any binary) the first bytes check does not know
    path.write_bytes(gzip.compress(b"weights" * 100))
    with pytest.raises(ModelFormatError) as caught:
        load_pickle(path)
    assert not isinstance(caught.value, UnsafeFileError)
    assert str(caught.value) == f"{path}: not a torch file (no zip and no pickle: byte 0x1f is no pickle instruction)"
