"""Two processes (torchrun, gloo on CPU) train exactly like one process accumulating two micro-batches."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from runtime_methods import ConvOutMethod
from sdcore.testing.contract import contract_options
from sdcore.train.loop import train


@pytest.mark.skipif(
    shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists(),
    reason="torchrun not available",
)
@pytest.mark.slow
def test_two_processes_equal_gradient_accumulation(tmp_path):
    from safetensors.torch import load_file

    values = {"batch_size": 1, "max_steps": 4, "lr": 1e-2, "flip": True, "shuffle_caption": True}
    single = contract_options(ConvOutMethod, tmp_path, {**values, "gradient_accumulation": 2}, tag="single")
    method = ConvOutMethod(single)
    expected = train(method)
    multi = contract_options(ConvOutMethod, tmp_path, values, tag="multi")
    payload = {
        k: getattr(multi, k)
        for k in (
            "model",
            "data",
            "output",
            "resolution",
            "min_bucket_reso",
            "max_bucket_reso",
            "bucket_step",
            "batch_size",
            "max_steps",
            "lr",
            "flip",
            "shuffle_caption",
            "seed",
            "progress",
            "save_dtype",
        )
    }
    out = tmp_path / "multi.safetensors"
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            torchrun,
            "--standalone",
            "--nproc_per_node",
            "2",
            str(Path(__file__).with_name("mp_worker.py")),
            json.dumps(payload),
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = load_file(str(out))
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["steps"] == 4
    # the logged loss is the mean over both processes = the accumulated loss
    assert record["losses"] == pytest.approx(expected.losses, rel=1e-5)
    for key, value in method.trainable_state_dict().items():
        assert torch.allclose(got[key], value, atol=1e-6), key
