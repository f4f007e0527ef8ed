"""Device memory while training: the full-device warning, the out-of-memory error, the closing peak line."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from runtime_methods import ConvOutMethod
from sdcore.errors import expected_error_message
from sdcore.models.layout import ModelLayout
from sdcore.models.load import bundled_config
from sdcore.models.tiny import create_tiny_bundle
from sdcore.testing.contract import contract_options
from sdcore.train import memory_watch
from sdcore.train.loop import TrainSession, train
from sdcore.train.memory import MIB, ParameterPlan, estimate_memory
from sdcore.train.memory_watch import (
    CHECK_STEPS,
    MemoryReading,
    MemoryWatch,
    TrainingOutOfMemoryError,
    is_out_of_memory,
)
from sdcore.train.preflight import memory_relief

GIB = 1024 * MIB


class _Gauge:
    """A stand-in for the CUDA allocator's peaks: returns ``reserved`` of a 24 GiB device, counts reads."""

    def __init__(self, reserved: int, allocated: int | None = None) -> None:
        self.reserved = reserved
        self.allocated = allocated if allocated is not None else reserved - GIB
        self.reads = 0

    def __call__(self, device):
        self.reads += 1
        return MemoryReading("cuda:0", self.allocated, self.reserved, 24 * GIB)


def test_reads_only_on_checking_steps_and_warns_once_when_full():
    said: list[str] = []
    gauge = _Gauge(int(0.5 * 24 * GIB))
    watch = MemoryWatch("cuda:0", estimate=10 * GIB, say=said.append, relief=lambda: ["--x (-5 MiB)"], read=gauge)
    for step in range(1, 301):
        watch.after_step(step)
    assert gauge.reads == len(CHECK_STEPS) + 3  # 1, 2, 3, 5, 10, 20, 50, then 100, 200 and 300
    assert said == []  # half full: nothing to say
    gauge.reserved = int(0.96 * 24 * GIB)
    watch.after_step(400)
    watch.after_step(500)
    assert len(said) == 1  # once
    assert said[0].startswith("warning: after step 400 the run holds 23,593 MiB of the 24,576 MiB on cuda:0 (96%)")
    assert "sysmem fallback" in said[0] and said[0].endswith("Options that lower the need: --x (-5 MiB)")


def test_just_below_the_threshold_is_not_full():
    said: list[str] = []
    watch = MemoryWatch("cuda:0", estimate=None, say=said.append, read=_Gauge(int(0.94 * 24 * GIB)))
    watch.after_step(1)
    assert said == [] and watch.last is not None and watch.last.fraction == pytest.approx(0.94, abs=1e-6)


def test_summary_names_the_peaks_and_the_estimate():
    watch = MemoryWatch("cuda:0", estimate=9 * GIB, say=print, read=_Gauge(12 * GIB, 11 * GIB))
    assert watch.summary() == (
        "memory: peak 11,264 MiB allocated, 12,288 MiB reserved of 24,576 MiB on cuda:0 "
        "(the pre-flight estimated 9,216 MiB)"
    )
    assert MemoryWatch("cpu", estimate=9 * GIB, say=print).summary() is None  # a CPU run reads nothing


def test_what_counts_as_out_of_memory():
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(RuntimeError("MPS backend out of memory (MPS allocated: 17.00 GB)"))
    assert is_out_of_memory(
        RuntimeError(
            "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes"
        )
    )
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_out_of_memory(ValueError("out of memory"))  # only the allocators' RuntimeErrors


def test_relief_lists_single_changes_by_their_saving():
    layout = ModelLayout("sd15", "sd1", "epsilon", bundled_config("sd1"), "test")
    counts = {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}
    params = ParameterPlan(counts, trainable=12_750_000, added=12_750_000, result=12_750_000)
    options = ConvOutMethod.options_class(model="m", data="d", output="o", resolution=512, batch_size=4)
    method = ConvOutMethod(options)
    lines = memory_relief(method, options, layout, params, device="cuda")
    assert lines and len(lines) <= 4
    gains = [int(re.search(r"\(-([\d,]+) MiB\)$", line).group(1).replace(",", "")) for line in lines]
    assert gains == sorted(gains, reverse=True) and gains[-1] >= 1
    assert lines[0].startswith("--gradient-checkpointing (")  # SD1.5 at batch 4: activations dominate
    # the saving is the difference of the two estimates of the same run
    now = estimate_memory(layout, params, options, device="cuda").total
    with_gc = estimate_memory(
        layout, params, dataclasses.replace(options, gradient_checkpointing=True), device="cuda"
    ).total
    assert gains[0] == round((now - with_gc) / MIB)
    assert not any(line.count("--") > 2 for line in lines)  # "all together" is not one of them


class _OutOfMemoryAtStep3(ConvOutMethod):
    def compute_loss(self, ctx):
        if ctx.step == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")
        return None


def test_out_of_memory_in_a_step_saves_the_state_and_says_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(memory_watch, "read_device_memory", _Gauge(23 * GIB))
    o = contract_options(ConvOutMethod, tmp_path, {"max_steps": 5})
    with pytest.raises(TrainingOutOfMemoryError) as info:
        train(_OutOfMemoryAtStep3(o), bundle=create_tiny_bundle("sd1"))
    message = expected_error_message(info.value)  # what the CLI prints: one line, no traceback
    state = tmp_path / "run" / "result-state" / "step-00000002"
    assert message is not None and "\n" not in message
    assert message.startswith("out of memory in step 3; peak 23,552 MiB reserved of 24,576 MiB on cuda:0")
    assert "the pre-flight estimated" in message
    assert message.endswith(f"The resumable state is in {state} (continue with --resume latest)")
    assert (state / "train_state.json").exists()
    assert info.value.__cause__ is None  # the failed step's traceback is let go (its tensors with it)


def test_out_of_memory_while_setting_up_names_the_phase(tmp_path):
    class _TooBig(ConvOutMethod):
        def prepare(self, bundle):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB")

    o = contract_options(ConvOutMethod, tmp_path)
    with pytest.raises(TrainingOutOfMemoryError, match=r"^out of memory while loading the model and setting up"):
        train(_TooBig(o), bundle=create_tiny_bundle("sd1"))
    assert not (tmp_path / "run" / "result-state").exists()  # nothing trained, nothing to save


def test_debug_mode_keeps_the_original_error(tmp_path, monkeypatch):
    monkeypatch.setenv("SDCORE_DEBUG", "1")
    o = contract_options(ConvOutMethod, tmp_path, {"max_steps": 5})
    with pytest.raises(TrainingOutOfMemoryError) as info:
        train(_OutOfMemoryAtStep3(o), bundle=create_tiny_bundle("sd1"))
    assert isinstance(info.value.__cause__, torch.OutOfMemoryError)
    assert info.value.__cause__.__traceback__ is not None


def test_a_full_device_is_told_once_and_the_peak_closes_the_run(tmp_path, monkeypatch, capsys):
    gauge = _Gauge(int(0.97 * 24 * GIB))
    monkeypatch.setattr(memory_watch, "read_device_memory", gauge)
    o = contract_options(ConvOutMethod, tmp_path, {"max_steps": 4})
    session = TrainSession(ConvOutMethod(o), bundle=create_tiny_bundle("sd1"))
    session.run()
    err = capsys.readouterr().err
    assert err.count("warning: after step 1 the run holds 23,839 MiB of the 24,576 MiB on cuda:0 (97%)") == 1
    assert "warning: after step 2" not in err
    estimate = session.preflight.memory.estimate.total
    assert (
        f"memory: peak 22,815 MiB allocated, 23,839 MiB reserved of 24,576 MiB on cuda:0 "
        f"(the pre-flight estimated {estimate / MIB:,.0f} MiB)"
    ) in err
    assert gauge.reads == 3 + 1  # steps 1, 2, 3 and the closing line (step 4 is no checking step)


def test_out_of_memory_outside_training_is_one_line_in_every_command(monkeypatch):
    """Generation, tagging and conversion have no state to save: the CLI prints the allocator's first
    sentence and what lowers the need; other RuntimeErrors (bugs) and click's own exits pass through."""
    import click
    from click.testing import CliRunner
    from sdcore.cli import RootGroup

    @click.group(cls=RootGroup)
    def root() -> None:
        pass

    @root.command()
    def boom() -> None:
        raise torch.OutOfMemoryError(
            "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 23.55 GiB of which "
            "1.02 GiB is free. Of the allocated memory 20.1 GiB is allocated by PyTorch"
        )

    @root.command()
    def bug() -> None:
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)")

    @root.command()
    def stop() -> None:
        raise click.exceptions.Exit(3)

    result = CliRunner().invoke(root, ["boom"])
    assert result.exit_code == 1
    assert result.output == (
        "Error: out of memory (CUDA out of memory. Tried to allocate 2.00 GiB): use a smaller batch or image size, "
        "fewer images at once, or another device\n"
    )
    result = CliRunner().invoke(root, ["bug"])
    assert isinstance(result.exception, RuntimeError) and "shapes" in str(result.exception)
    assert CliRunner().invoke(root, ["stop"]).exit_code == 3
    monkeypatch.setenv("SDCORE_DEBUG", "1")
    assert isinstance(CliRunner().invoke(root, ["boom"]).exception, torch.OutOfMemoryError)


def test_out_of_memory_while_sampling_names_the_sampling_not_the_next_step(tmp_path, monkeypatch):
    """An allocator running out in the samples after step 2 happened after that step, not in step 3 (which never
    started): the message says where it was, and the state of step 2 is saved first."""
    from sdcore.train import sampling

    def _sampling_runs_out(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")

    monkeypatch.setattr(sampling, "render_samples", _sampling_runs_out)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo\n")
    o = contract_options(ConvOutMethod, tmp_path, {"max_steps": 5, "sample_every": 2, "sample_prompts": str(prompts)})
    with pytest.raises(TrainingOutOfMemoryError) as info:
        train(ConvOutMethod(o), bundle=create_tiny_bundle("sd1"))
    message = str(info.value)
    assert message.startswith("out of memory while sampling after step 2"), message
    assert message.endswith(f"The resumable state is in {tmp_path / 'run' / 'result-state' / 'step-00000002'} "
                            "(continue with --resume latest)")  # fmt: skip


@pytest.mark.parametrize("where", ["on_step_end", "ema"])
def test_out_of_memory_right_after_a_step_names_that_step(tmp_path, monkeypatch, where):
    """The method's step end (or the --ema update) runs after step 2's update and the step count: an allocator
    running out there finishes step 2, not "in step 3" (which never started)."""
    from sdcore.train import ema

    def _runs_out(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")

    class _EndRunsOut(ConvOutMethod):
        def on_step_end(self, bundle, step):
            if step == 2:
                _runs_out()
            return super().on_step_end(bundle, step)

    if where == "ema":
        monkeypatch.setattr(ema.WeightEMA, "update", lambda self, step: _runs_out() if step == 2 else None)
    o = contract_options(ConvOutMethod, tmp_path, {"max_steps": 5, "ema": where == "ema"})
    method = _EndRunsOut(o) if where == "on_step_end" else ConvOutMethod(o)
    with pytest.raises(TrainingOutOfMemoryError) as info:
        train(method, bundle=create_tiny_bundle("sd1"))
    message = str(info.value)
    assert message.startswith("out of memory while finishing step 2;"), message
    assert message.endswith(f"The resumable state is in {tmp_path / 'run' / 'result-state' / 'step-00000002'} "
                            "(continue with --resume latest)")  # fmt: skip


@pytest.mark.parametrize("accumulation", [1, 2])
def test_the_state_saved_at_an_out_of_memory_resumes_exactly(tmp_path, accumulation):
    """Out of memory in step 3 (with accumulation: in its second micro-batch, after the first one's backward):
    the state of step 2 resumes to the run that never failed, loss for loss and weight for weight."""

    class _OutOfMemoryInStep3(ConvOutMethod):
        calls = 0

        def compute_loss(self, ctx):
            if ctx.step == 2:
                self.calls += 1
                if self.calls == accumulation:
                    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")
            return None

    base = {"batch_size": 1, "gradient_accumulation": accumulation, "lr": 3e-3}
    straight = ConvOutMethod(contract_options(ConvOutMethod, tmp_path, {**base, "max_steps": 4}, tag="straight"))
    want = train(straight, bundle=create_tiny_bundle("sd1"))
    o = contract_options(ConvOutMethod, tmp_path, {**base, "max_steps": 4}, tag="parts")
    with pytest.raises(TrainingOutOfMemoryError, match="out of memory in step 3"):
        train(_OutOfMemoryInStep3(o), bundle=create_tiny_bundle("sd1"))
    resumed = ConvOutMethod(dataclasses.replace(o, resume="latest"))
    got = train(resumed, bundle=create_tiny_bundle("sd1"))
    assert got.steps == 4 and got.losses == want.losses
    a, b = straight.trainable_state_dict(), resumed.trainable_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


#: what a process alone must never call: each waits for (or talks to) the other processes
_COLLECTIVES = (
    "all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "all_to_all", "barrier",
    "monitored_barrier", "broadcast", "broadcast_object_list", "gather", "gather_object", "reduce",
    "reduce_scatter", "reduce_scatter_tensor", "scatter", "scatter_object_list",
)  # fmt: skip


def _spy_on_collectives(monkeypatch, accelerator) -> tuple[list[tuple[str, bool]], list[bool]]:
    """Record every collective call as (name, whether ``armed[0]`` was set): the accelerator's waits, gathers
    and reductions, and every ``torch.distributed`` collective (accelerate's own operations call those)."""
    import torch.distributed as dist

    calls: list[tuple[str, bool]] = []
    armed = [False]

    def spy(name, original):
        def record(*args, **kwargs):
            calls.append((name, armed[0]))
            return original(*args, **kwargs)

        return record

    for name in ("wait_for_everyone", "gather", "gather_for_metrics", "reduce", "pad_across_processes"):
        monkeypatch.setattr(accelerator, name, spy(f"accelerator.{name}", getattr(accelerator, name)))
    for name in _COLLECTIVES:
        if hasattr(dist, name):
            monkeypatch.setattr(dist, name, spy(f"torch.distributed.{name}", getattr(dist, name)))
    return calls, armed


@pytest.mark.parametrize("ema", [False, True])
def test_an_error_in_one_of_several_processes_writes_the_weights_alone(tmp_path, monkeypatch, capsys, ema):
    """DDP: one process runs out while the others are inside the step's gradient all-reduce (or gone).
    Saving a state needs every process (``Checkpoints.save_state`` waits for them all), so the failed one
    would hang there; it writes the weights it holds (every process holds the same after a step) where the
    intermediate save of that step goes, with no collective call, and says so on its own stderr. With
    ``--ema`` the file holds the average, as every save does."""
    from accelerate import Accelerator
    from safetensors.torch import load_file

    extra = {"ema": True, "ema_decay": 0.5} if ema else {}
    straight = contract_options(ConvOutMethod, tmp_path, {"max_steps": 5, "save_every": 2, **extra}, tag="straight")
    train(ConvOutMethod(straight), bundle=create_tiny_bundle("sd1"))
    want = load_file(str(tmp_path / "straight" / "result-step00000002.safetensors"))  # after step 2, uninterrupted

    o = contract_options(ConvOutMethod, tmp_path, {"max_steps": 5, **extra})
    method = _OutOfMemoryAtStep3(o)
    if ema:  # a method that can start from its result (LoRA's --network-weights) names the option
        monkeypatch.setattr(_OutOfMemoryAtStep3, "start_from_result", "--network-weights", raising=False)
    session = TrainSession(method, bundle=create_tiny_bundle("sd1"))
    session.setup()
    monkeypatch.setattr(Accelerator, "num_processes", property(lambda self: 2))
    calls, armed = _spy_on_collectives(monkeypatch, session.accelerator)
    raises = method.compute_loss

    def arm_then_fail(ctx):  # from the failing step on, nothing may wait for the other process
        armed[0] = ctx.step == 2
        return raises(ctx)

    monkeypatch.setattr(method, "compute_loss", arm_then_fail)
    capsys.readouterr()
    with pytest.raises(TrainingOutOfMemoryError, match=r"^out of memory in step 3") as info:
        session.run()
    assert ("accelerator.reduce", False) in calls  # the spies see the steps' loss agreement...
    assert armed[0] and [name for name, when in calls if when] == []  # ...and nothing from the failing step on
    assert "resumable state" not in str(info.value)
    assert not (tmp_path / "run" / "result-state" / "step-00000002").exists()
    written = tmp_path / "run" / "result-step00000002.safetensors"
    got = load_file(str(written))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    lines = [line for line in capsys.readouterr().err.splitlines() if "one of several processes" in line]
    again = f"continue from it with --network-weights {written}, or " if ema else ""
    assert lines == [
        f"out of memory in one of several processes: this process wrote the weights after step 2 to {written} "
        f"(a result, not a resumable state: saving one needs every process); {again}resume from the last saved "
        "state with --resume"
    ]
    assert not [p for p in written.parent.iterdir() if p.name.endswith(".tmp")]


def test_under_a_sharding_engine_the_failed_process_writes_nothing(tmp_path, monkeypatch, capsys):
    """FSDP: each process holds a shard of the weights, and gathering them needs every process: the
    failed one writes nothing and says why."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    o = contract_options(ConvOutMethod, tmp_path, {"max_steps": 5})
    method = _OutOfMemoryAtStep3(o)
    session = TrainSession(method, bundle=create_tiny_bundle("sd1"))
    session.setup()
    monkeypatch.setattr(Accelerator, "num_processes", property(lambda self: 2))
    raises = method.compute_loss

    def shard_then_fail(ctx):  # FSDP from the failing step on (the steps before train as plain DDP here)
        if ctx.step == 2:
            monkeypatch.setattr(Accelerator, "distributed_type", property(lambda self: DistributedType.FSDP))
        return raises(ctx)

    monkeypatch.setattr(method, "compute_loss", shard_then_fail)
    capsys.readouterr()
    with pytest.raises(TrainingOutOfMemoryError, match=r"^out of memory in step 3"):
        session.run()
    assert [line for line in capsys.readouterr().err.splitlines() if "one of several processes" in line] == [
        "out of memory in one of several processes: nothing saved now (under FSDP each process holds a shard "
        "of the weights, and saving them or a state needs every process); resume from the last saved state "
        "with --resume"
    ]
    assert not (tmp_path / "run" / "result-step00000002.safetensors").exists()
    assert not (tmp_path / "run" / "result-state" / "step-00000002").exists()


@pytest.mark.parametrize(
    ("kind", "stage", "want"),
    [
        ("MULTI_GPU", None, None),
        ("MULTI_CPU", None, None),
        ("FSDP", None, "FSDP"),
        ("DEEPSPEED", 0, None),
        ("DEEPSPEED", 2, None),
        ("DEEPSPEED", 3, "DeepSpeed ZeRO-3"),
        ("DEEPSPEED", None, "DeepSpeed (ZeRO stage unknown)"),
    ],
)
def test_which_engines_leave_every_process_all_the_weights(kind, stage, want):
    """DDP and ZeRO stages 0-2 replicate the parameters (ZeRO-1/2 shard only optimizer state and gradients);
    FSDP and ZeRO-3 shard them. The stage is read from the launch config's ``deepspeed_config``."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType
    from sdcore.train.save_fallback import weights_sharding

    config = {} if stage is None else {"zero_optimization": {"stage": stage}}
    plugin = SimpleNamespace(deepspeed_config=config, zero_stage=None)
    state = SimpleNamespace(deepspeed_plugin=plugin if kind == "DEEPSPEED" else None)
    accelerator = SimpleNamespace(distributed_type=DistributedType[kind], state=state, parallelism_config=None)
    assert weights_sharding(accelerator) == want


def test_processes_writing_one_file_at_once_each_replace_it_whole(tmp_path):
    """Several failed processes write the same result at once: each writes its own temporary name and
    renames it over the target, so the file is always one writer's whole bytes."""
    from sdcore.io import atomic_path

    target = tmp_path / "result-step00000002.safetensors"
    with atomic_path(target) as first, atomic_path(target) as second:
        assert first != second  # interleaved writers never share a temporary file
        first.write_bytes(b"A" * 4096)
        second.write_bytes(b"B" * 4096)
    assert target.read_bytes() == b"A" * 4096  # the last rename wins, whole
    assert [p.name for p in tmp_path.iterdir()] == [target.name]
