"""Every file sdcore writes gets the mode an ordinary ``open()`` gives under the umask (issue 17).

``mkstemp``/``mkdtemp`` make 0600 files and 0700 folders; a webui running as another user could not
read a LoRA written that way. Checked for each writer with umask 022 and 077.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch


@pytest.fixture(params=[0o022, 0o077], ids=["umask022", "umask077"])
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _check_tree(root: Path, umask: int) -> int:
    """Every file below ``root`` is 0666&~umask, every folder 0777&~umask; returns files seen."""
    files = 0
    paths = list(root.rglob("*")) if root.is_dir() else [root]  # (pytest makes tmp_path 0700)
    for path in paths:
        want = (0o777 if path.is_dir() else 0o666) & ~umask
        assert _mode(path) == want, f"{path}: {oct(_mode(path))} != {oct(want)}"
        files += path.is_file()
    return files


def test_sdcore_io_helpers(tmp_path, umask):
    from sdcore.io import atomic_save, atomic_write_bytes, atomic_write_text, default_mode

    assert default_mode() == 0o666 & ~umask
    atomic_write_text(tmp_path / "a.txt", "x")
    atomic_write_bytes(tmp_path / "b.bin", b"x")
    atomic_save(tmp_path / "c.bin", lambda tmp: Path(tmp).write_bytes(b"y"))
    assert _check_tree(tmp_path, umask) == 3


def test_lora_embedding_and_png(tmp_path, umask):
    from PIL import Image
    from sdcore.generate.pnginfo import save_image
    from sdplugin_lora.format import save_lora
    from sdplugin_ti.embedding import Embedding
    from sdplugin_ti.formats import save_embedding

    save_lora(tmp_path / "mychar.safetensors", {"lora_unet_x.lora_up.weight": torch.zeros(2, 2)})
    emb = Embedding(name="tok", vectors={"*": torch.zeros(2, 8)})
    for fmt in ("pt", "safetensors", "bin"):
        save_embedding(emb, tmp_path / f"tok.{fmt}")
    for suffix in ("png", "jpg", "webp"):
        save_image(Image.new("RGB", (8, 8)), tmp_path / f"s.{suffix}", "a cat\nSteps: 1")
    assert _check_tree(tmp_path, umask) == 7


def test_checkpoints_single_file_and_diffusers(tmp_path, umask):
    from sdcore.models.save import save_bundle
    from sdcore.models.tiny import create_tiny_bundle

    bundle = create_tiny_bundle("sd1")
    save_bundle(bundle, tmp_path / "model.safetensors")
    save_bundle(bundle, tmp_path / "model-diffusers", format="diffusers")
    assert _check_tree(tmp_path, umask) > 5


def test_training_state_and_caption(tmp_path, umask):
    from sdcore.train.state import TrainPosition, save_state
    from sdplugin_taggers.writer import CaptionWriter

    weight = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.AdamW([weight])
    weight.grad = torch.ones(3)
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    save_state(
        tmp_path / "state", TrainPosition(1, 0, 1), trainable={"w": weight}, optimizer=optimizer, scheduler=scheduler
    )
    (tmp_path / "img.png").touch()
    os.chmod(tmp_path / "img.png", 0o666 & ~umask)
    CaptionWriter(mode="overwrite").write(tmp_path / "img.png", ["a", "b"])
    assert _check_tree(tmp_path, umask) >= 6


def test_a_read_only_file_is_never_replaced(tmp_path):
    """``chmod a-w`` guards a file: ``os.replace`` needs only the folder's permission, so an atomic write
    would replace it where a plain ``open()`` fails. Checked from the mode bits, so also as root."""
    from sdcore.errors import SdcoreError
    from sdcore.io import atomic_write_bytes, atomic_write_text, read_only_problem

    guarded = tmp_path / "hand written.txt"
    guarded.write_text("precious\n", encoding="utf-8")
    guarded.chmod(0o444)
    for write in (lambda: atomic_write_text(guarded, "new\n"), lambda: atomic_write_bytes(guarded, b"new")):
        with pytest.raises(SdcoreError, match=r"is read-only \(mode -r--r--r--\): left as it is; make it writable"):
            write()
    assert guarded.read_text(encoding="utf-8") == "precious\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hand written.txt"]  # no temporary file left
    guarded.chmod(0o644)  # writable again: replaced as before
    atomic_write_text(guarded, "new\n")
    assert guarded.read_text(encoding="utf-8") == "new\n"
    guarded.chmod(0o444)  # --overwrite does not reach it either: said before any work
    from sdcore.io import output_problems

    assert output_problems([guarded], overwrite=True) == [read_only_problem(guarded)]
    assert output_problems([guarded], overwrite=False) == [read_only_problem(guarded)]  # no --overwrite advice
    assert read_only_problem(tmp_path) is None  # a folder is not a read-only file
    assert read_only_problem(tmp_path / "missing") is None
