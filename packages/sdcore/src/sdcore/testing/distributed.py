"""Multi-process checks for training methods: N processes (torchrun, gloo on CPU) must train exactly
like one process accumulating N micro-batches.

``check_processes_equal_accumulation(MyMethod, tmp_path, {...})`` trains once in this process with
``gradient_accumulation=2`` and once under ``torchrun --nproc_per_node 2`` (this module is the
worker), then compares the logged losses and every trained tensor. The worker also reports which
module the runtime trained through, so the check proves gradients were synced by accelerate's
prepared (DDP) model, not by hand.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

#: options copied to the worker (everything the contract options set, plus the method's own)
_SKIP = {"output"}


def torchrun_command() -> list[str] | None:
    """How to start torchrun here, or None when it is not installed."""
    found = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    return [found] if Path(found).exists() else None


def check_processes_equal_accumulation(
    method_class: Any,
    tmp_path: Path,
    overrides: dict[str, Any] | None = None,
    *,
    processes: int = 2,
    extra_pythonpath: list[str] | None = None,
    config_file: str | Path | None = None,
    trained_through: str = "DistributedDataParallel",
    atol: float = 1e-6,
    timeout: float = 600,
) -> dict[str, Any]:
    """Assert ``processes`` processes == 1 process with ``gradient_accumulation=processes``.

    With ``config_file`` the workers start with ``accelerate launch --config_file`` (its process
    count must be ``processes``) instead of plain torchrun; ``trained_through`` is the class name
    of the prepared model the workers must report (``FullyShardedDataParallel`` under FSDP).
    """

    import torch
    from safetensors.torch import load_file

    from ..train.loop import train
    from .contract import contract_options

    if config_file is not None:
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file)]
    else:
        command = torchrun_command()
        assert command is not None, "torchrun not available"
        launcher = [*command, "--standalone", "--nproc_per_node", str(processes)]
    values = {"batch_size": 1, "max_steps": 4, "lr": 1e-2, **(overrides or {})}
    single = contract_options(method_class, tmp_path, {**values, "gradient_accumulation": processes}, tag="single")
    method = method_class(single)
    expected = train(method)
    multi = contract_options(method_class, tmp_path, values, tag="multi")
    out = tmp_path / "multi-trained.safetensors"
    proc = launch_workers(
        method_class, multi, out, launcher=launcher, extra_pythonpath=extra_pythonpath, timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = load_file(str(out))
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["steps"] == values["max_steps"]
    assert record["trained_through"] == trained_through, record
    # the logged loss is the mean over the processes = the accumulated loss
    assert record["losses"] == __import__("pytest").approx(expected.losses, rel=1e-5)
    # validation (--validation-split): the processes share the held-out batches and sum their losses
    want = [(step, kind) for step, kind, _ in expected.validation_losses]
    assert [(step, kind) for step, kind, _ in record["validation_losses"]] == want
    got_values = [v for _, _, v in record["validation_losses"]]
    assert got_values == __import__("pytest").approx([v for _, _, v in expected.validation_losses], rel=1e-5)
    state = method.trainable_state_dict()
    assert state.keys() == got.keys()
    for key, value in state.items():
        assert torch.allclose(got[key].float(), value.float().cpu(), atol=atol), key
    return record


def launch_workers(
    method_class: Any,
    options: Any,
    out: Path,
    *,
    processes: int = 2,
    launcher: list[str] | None = None,
    extra_pythonpath: list[str] | None = None,
    timeout: float = 600,
) -> subprocess.CompletedProcess[str]:
    """Train ``method_class`` with ``options`` in ``processes`` worker processes (``torchrun --standalone``
    unless ``launcher`` says otherwise, CPU and gloo) and return the finished launcher process; the main
    worker writes the trained tensors to ``out`` (and its record beside it) when the run ends well."""
    import dataclasses

    if launcher is None:
        command = torchrun_command()
        assert command is not None, "torchrun not available"
        launcher = [*command, "--standalone", "--nproc_per_node", str(processes)]
    payload = {
        "method": f"{method_class.__module__}:{method_class.__qualname__}",
        "options": {k: v for k, v in dataclasses.asdict(options).items() if k not in _SKIP},
        "output": str(options.output),
    }
    # PYTHONFAULTHANDLER: a worker that aborts (SIGABRT, SIGSEGV) prints every thread's Python stack,
    # which the failing check shows in its message
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    if extra_pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([*extra_pythonpath, env.get("PYTHONPATH", "")])
    return subprocess.run(
        [*launcher, "-m", __name__, json.dumps(payload), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def main() -> None:
    """The worker: ``python -m sdcore.testing.distributed PAYLOAD_JSON OUT`` under torchrun."""
    from safetensors.torch import save_file

    from ..train.loop import TrainSession

    payload = json.loads(sys.argv[1])
    target = Path(sys.argv[2])
    module, name = payload["method"].split(":")
    method_class = getattr(importlib.import_module(module), name)
    options = method_class.options_class(**{**payload["options"], "output": payload["output"]})
    method = method_class(options)
    session = TrainSession(method)
    result = session.run()
    if result.main_process:
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in method.trainable_state_dict().items()}
        save_file(tensors, str(target))
        record = {
            "steps": result.steps,
            "losses": result.losses,
            "validation_losses": result.validation_losses,
            "trained_through": type(session.placement.model).__name__,
            # DDP's settings as the prepared model holds them (kohya's --ddp_static_graph ...)
            "ddp": {
                name: bool(getattr(session.placement.model, name))
                for name in ("static_graph", "gradient_as_bucket_view")
                if hasattr(session.placement.model, name)
            },
        }
        target.with_suffix(".json").write_text(json.dumps(record))
    _leave_together()


def _leave_together() -> None:
    """Meet the other workers once everything is written, then leave without tearing Gloo down.

    Two CI runs on a loaded 2-core machine saw a worker abort at the end of a run ("terminate called
    without an active exception", SIGABRT); the second came after the workers here met and destroyed the
    process group before exiting (its log does not say in which part of the teardown; the workers now print
    their Python stacks when they abort). Gloo's teardown (its TCP loop threads) is the suspect.
    What this check compares is written and flushed once the workers have met, so each worker then ends
    with ``os._exit(0)``, which skips Gloo's teardown and the interpreter's finalisation; the runtime's own
    exit path (the process group destroyed at exit) stays covered by the multi-process stop test, whose
    app ends the usual way.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
