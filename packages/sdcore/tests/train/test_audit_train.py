"""Defects a kohya/A1111 user met running ``sdcore train`` twice into one output (the newcomer audit)."""

from __future__ import annotations

from runtime_methods import ConvOutMethod
from sdcore.models.tiny import create_tiny_bundle
from sdcore.testing.contract import contract_options
from sdcore.train.loop import train
from sdcore.train.state import list_states, read_position, resolve_resume


def _run(tmp_path, steps: int, **extra) -> None:
    o = contract_options(ConvOutMethod, tmp_path, {"max_steps": steps, "batch_size": 1, **extra})
    train(ConvOutMethod(o), bundle=create_tiny_bundle("sd1"))


def test_a_new_shorter_run_keeps_its_own_state_and_latest_resumes_it(tmp_path):
    """A 6-step run, then a fresh 3-step run into the same --output: the second run's last line said
    "resumable state in run/result-state", but keeping the newest 1 state pruned by step number, so the
    new step-00000003 was deleted at once and ``--resume latest`` picked the earlier run's step 6."""
    _run(tmp_path, 6)
    root = tmp_path / "run" / "result-state"
    assert [p.name for p in list_states(root)] == ["step-00000006"]
    _run(tmp_path, 3)
    assert [p.name for p in list_states(root)] == ["step-00000003"]
    position, _ = read_position(resolve_resume("latest", root))
    assert position.step == 3


def test_with_every_state_kept_latest_is_the_newest_written_not_the_highest_step(tmp_path):
    _run(tmp_path, 6, keep_states=0)
    _run(tmp_path, 3, keep_states=0)
    root = tmp_path / "run" / "result-state"
    assert sorted(p.name for p in list_states(root)) == ["step-00000003", "step-00000006"]
    assert resolve_resume("latest", root).name == "step-00000003"
    assert list_states(root)[-1].name == "step-00000003"  # newest last, as prune_states reads it
