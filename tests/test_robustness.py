"""Faults, bad input and hostile files across every reader and writer (docs/reliability.md)."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from sdcore.errors import SdcoreError, UnsafeFileError


# --- hostile pickles ----------------------------------------------------------------------------
class _Payload:
    """Pickles to a call of os.system: loading it with plain pickle would create the marker."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _readers():
    from sdcore.models.load import load_model
    from sdplugin_aesthetic.create import load_aesthetic_embedding
    from sdplugin_apt.discriminator import load_discriminator
    from sdplugin_hn.format import load_hypernetwork
    from sdplugin_lora.format import read_lora
    from sdplugin_taggers.deepdanbooru import load_deepdanbooru
    from sdplugin_ti.formats import load_embedding

    return {
        "checkpoint (.ckpt)": (load_model, ".ckpt"),
        "lora (.pt)": (read_lora, ".pt"),
        "textual inversion (.pt)": (load_embedding, ".pt"),
        "hypernetwork (.pt)": (load_hypernetwork, ".pt"),
        "deepdanbooru (.pt)": (load_deepdanbooru, ".pt"),
        "aesthetic embedding (.pt)": (load_aesthetic_embedding, ".pt"),
        "apt discriminator (.pt)": (load_discriminator, ".pt"),
    }


READER_NAMES = [
    "checkpoint (.ckpt)",
    "lora (.pt)",
    "textual inversion (.pt)",
    "hypernetwork (.pt)",
    "deepdanbooru (.pt)",
    "aesthetic embedding (.pt)",
    "apt discriminator (.pt)",
]


@pytest.mark.parametrize("reader_name", READER_NAMES)
def test_every_pickle_reader_refuses_code(reader_name, tmp_path):
    reader, suffix = _readers()[reader_name]
    marker = tmp_path / "pwned"
    evil = tmp_path / f"evil{suffix}"
    torch.save({"state_dict": {"weight": torch.zeros(2)}, "payload": _Payload(marker)}, evil)
    with pytest.raises(UnsafeFileError) as info:
        reader(evil)
    assert "evil" in str(info.value) and "\n" not in str(info.value)
    assert not marker.exists(), "the pickle's code ran"


# --- safetensors headers that lie ---------------------------------------------------------------
def _write_raw(path: Path, header: bytes, body: bytes = b"") -> Path:
    path.write_bytes(struct.pack("<Q", len(header)) + header + body)
    return path


def _lying_files(folder: Path) -> dict[str, Path]:
    good = folder / "good.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.ones(2, 2)}, str(good))
    raw = good.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    key = "lora_unet_x.lora_down.weight"
    past_end = dict(header)
    past_end[key] = {**header[key], "data_offsets": [0, 4096]}
    bad_dtype = dict(header)
    bad_dtype[key] = {**header[key], "dtype": "Q7"}
    return {
        "huge header length": _huge(folder / "huge.safetensors"),
        "offsets past the end": _write_raw(folder / "past.safetensors", json.dumps(past_end).encode(), raw[8 + n :]),
        "unknown dtype": _write_raw(folder / "dtype.safetensors", json.dumps(bad_dtype).encode(), raw[8 + n :]),
        "header is not json": _write_raw(folder / "json.safetensors", b"{not json", b""),
        "truncated data": _truncated(folder / "trunc.safetensors", raw),
        "empty file": _empty(folder / "empty.safetensors"),
    }


def _huge(path: Path) -> Path:
    path.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    return path


def _truncated(path: Path, raw: bytes) -> Path:
    path.write_bytes(raw[:-7])
    return path


def _empty(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def _safetensors_readers():
    from sdcore.models.load import load_model
    from sdplugin_lora.format import read_lora
    from sdplugin_ti.formats import load_embedding

    return {"model": load_model, "lora": read_lora, "embedding": load_embedding}


@pytest.mark.parametrize("reader_name", ["model", "lora", "embedding"])
def test_lying_safetensors_headers_give_clean_errors(reader_name, tmp_path):
    reader = _safetensors_readers()[reader_name]
    for problem, path in _lying_files(tmp_path).items():
        with pytest.raises(SdcoreError) as info:
            reader(path)
        message = str(info.value)
        assert path.name in message, f"{reader_name} / {problem}: {message}"


# --- full disk -----------------------------------------------------------------------------------
def test_full_disk_keeps_the_previous_save(tmp_path, monkeypatch):
    """A write that fails half-way (ENOSPC) leaves the previous file intact and no temp file."""
    import safetensors.torch as st
    from sdplugin_lora.format import save_lora

    target = tmp_path / "lora.safetensors"
    save_lora(target, {"lora_unet_a.lora_down.weight": torch.ones(2, 2)}, {}, dtype="fp32")
    before = target.read_bytes()
    real_save = st.save_file

    def disk_full(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(st, "save_file", disk_full)
    import sdplugin_lora.format as fmt

    monkeypatch.setattr(fmt, "save_file", disk_full, raising=False)
    with pytest.raises(SdcoreError, match="previous file, if any, is intact"):
        save_lora(target, {"lora_unet_a.lora_down.weight": torch.zeros(2, 2)}, {}, dtype="fp32")
    monkeypatch.setattr(st, "save_file", real_save)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora.safetensors"], "a temporary file was left behind"


# --- SIGKILL at random points, then resume ------------------------------------------------------
def _train_cmd(data: Path, output: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "sdcore",
        "train",
        "lora",
        "--model",
        "tiny:sd1",
        "--data",
        str(data),
        "--output",
        str(output),
        "--max-steps",
        "60",
        "--save-every",
        "4",
        "--seed",
        "3",
        "--rank",
        "4",
        "--alpha",
        "4",
        "--resolution",
        "64",
        "--min-bucket-reso",
        "64",
        "--lr",
        "1e-3",
        "--save-dtype",
        "fp32",
        "--no-progress",
        *extra,
    ]


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_matches_an_uninterrupted_run(tmp_path):
    from sdcore.testing.datasets import make_tiny_dataset

    data = make_tiny_dataset(tmp_path / "data", n=3, repeats=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    reference = tmp_path / "ref" / "x.safetensors"
    subprocess.run(_train_cmd(data, reference), check=True, env=env, capture_output=True, timeout=600)
    expected = load_file(str(reference))

    rng = random.Random(1234)
    for attempt in range(2):
        output = tmp_path / f"killed{attempt}" / "x.safetensors"
        process = subprocess.Popen(_train_cmd(data, output), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        state_dir = output.parent / "x-state"
        deadline = time.time() + 300
        while time.time() < deadline and not any(state_dir.glob("step-*")) and process.poll() is None:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.4))
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert process.returncode == -signal.SIGKILL, "the run ended before the kill; make it longer"
        # nothing half-written: every result file that exists loads
        for path in output.parent.glob("*.safetensors"):
            load_file(str(path))
        resumed = subprocess.run(
            _train_cmd(data, output, "--resume", "latest"), env=env, capture_output=True, text=True, timeout=600
        )
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        got = load_file(str(output))
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            assert torch.equal(got[key], value), f"attempt {attempt}: {key} differs after resume"


# --- steady memory over long runs ---------------------------------------------------------------
def _rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.slow
def test_ten_thousand_tiny_steps_hold_steady_memory(tmp_path):
    import sdcore
    from sdcore.plugins import get_plugin_manager
    from sdcore.testing.datasets import make_tiny_dataset
    from sdcore.train.loop import train

    sys.path.insert(0, str(Path(__file__).parents[1] / "docs" / "examples" / "sdplugin-hello" / "src"))
    from sdplugin_hello.method import HelloMethod, HelloOptions

    class SmallUNetHello(HelloMethod):
        """The hello method on a one-level UNet (one cross-attention block, no mid block): what this test
        watches is the training loop's memory over 10,000 steps, not the UNet, so the per-step forward of
        tiny:sd1's two-level UNet (more than half of each step) is cut; every step still goes through the
        same loop, step, loss, optimizer, hooks and a real diffusers UNet with cross-attention. The first
        level keeps tiny:sd1's width, so what a step's graph holds for the trained conv_out (its input) is as
        big as before and a loop that kept each step's graph alive still grows past the bound."""

        def prepare(self, bundle):
            from diffusers import UNet2DConditionModel

            bundle.unet = UNet2DConditionModel(
                sample_size=8,
                in_channels=4,
                out_channels=4,
                layers_per_block=1,
                norm_num_groups=8,
                block_out_channels=[bundle.unet.config.block_out_channels[0]],
                down_block_types=["CrossAttnDownBlock2D"],
                up_block_types=["UpBlock2D"],
                mid_block_type=None,
                cross_attention_dim=bundle.text_encoders[0].config.hidden_size,
                attention_head_dim=4,
            )
            return super().prepare(bundle)

    samples: dict[int, float] = {}

    class Sampler:
        @sdcore.hookimpl
        def sdcore_on_train_step(self, step):
            if step % 500 == 0:
                samples[step] = _rss_mb()

    data = make_tiny_dataset(tmp_path / "data", n=4, size=64, repeats=1)
    options = HelloOptions(
        model="tiny:sd1",
        data=str(data),
        output=str(tmp_path / "out.safetensors"),
        max_steps=10_000,
        resolution=64,
        min_bucket_reso=64,
        lr=1e-4,
        progress=False,
        save_state=False,
    )
    pm = get_plugin_manager(builtins=False, entrypoints=False, extra=[Sampler()])
    train(SmallUNetHello(options), plugin_manager=pm)
    assert 10_000 in samples
    growth = samples[10_000] - samples[2_000]
    assert growth < 40, f"RSS grew by {growth:.1f} MiB between step 2000 and 10000: {samples}"


def _scratch_folder(tmp_path: Path) -> Path:
    """A folder for 20,000 small files: on a RAM disk (/dev/shm) when it has room, else ``tmp_path``.

    Why: each caption is written atomically (temporary file, fsync, rename), and on a disk the fsync and
    rename cost about 2 ms a file, 40 s of the tagging test's two passes over 10,000 images; on tmpfs they
    cost next to nothing. The same code runs either way, and tmpfs pages are not the process's RSS."""
    import shutil
    import tempfile

    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 512 * 2**20:
        return Path(tempfile.mkdtemp(prefix="sdcore-test-", dir=shm))
    return tmp_path


@pytest.fixture
def scratch(tmp_path):
    """:func:`_scratch_folder`, removed after the test (tmpfs is memory)."""
    import shutil

    folder = _scratch_folder(tmp_path)
    yield folder
    if folder != tmp_path:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
def test_tagging_ten_thousand_images_holds_steady_memory(tmp_path, scratch):
    from PIL import Image
    from sdplugin_taggers.labeling import label_folder
    from sdplugin_taggers.wd14 import WD14Tagger
    from sdplugin_taggers.writer import CaptionWriter

    sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
    from demo import build_tiny_wd_tagger

    folder = scratch / "images"
    folder.mkdir()
    for i in range(10_000):
        Image.new("RGB", (16, 16), (i % 256, (i * 7) % 256, (i * 13) % 256)).save(folder / f"{i:05d}.jpg", quality=80)
    tagger = WD14Tagger(build_tiny_wd_tagger(tmp_path / "wd"), general_threshold=0.5)
    label_folder(
        tagger, folder, writer=CaptionWriter(mode="overwrite"), recursive=False, json_path=None, progress=False
    )
    start = _rss_mb()
    summary = label_folder(
        tagger, folder, writer=CaptionWriter(mode="overwrite"), recursive=False, json_path=None, progress=False
    )
    growth = _rss_mb() - start
    assert len(list(folder.glob("*.txt"))) == 10_000
    assert summary.tagged == 10_000 and summary.unreadable == 0
    assert growth < 40, f"RSS grew by {growth:.1f} MiB over a second pass of 10,000 images"
