"""The method API's dataset check (``dataset_problems``/``dataset_notes``) and its process facts
(``TrainingMethod.processes``), with methods defined here and trained in-process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from runtime_methods import ConvOutMethod, RecordsProcesses
from sdcore.errors import ConfigError
from sdcore.testing.contract import contract_options
from sdcore.testing.distributed import launch_workers, torchrun_command
from sdcore.train.method import ProcessInfo


class NeedsZebra(ConvOutMethod):
    """A method whose word must be in the captions (as a new-token method's must)."""

    name = "zebra"
    seen: list[list[str]] = []

    def dataset_problems(self, index: Any) -> list[str]:
        captions = sorted(e.written_caption for e in index.instance_entries)
        self.seen.append(captions)
        lacking = [c for c in captions if "zebra" not in c]
        return [f"{len(lacking)} of {len(captions)} captions lack zebra"] if lacking else []

    def dataset_notes(self, index: Any) -> list[str]:
        return [f"zebra method: {len(index.entries)} images checked"]


class BrokenCheck(ConvOutMethod):
    name = "broken"

    def dataset_problems(self, index: Any) -> list[str]:
        raise ConfigError("the zebra check could not read the dataset")


def test_dataset_problems_stop_the_run_with_the_others_before_any_model_loads(tmp_path, no_model_load):
    from sdcore.train.loop import train
    from sdcore.train.preflight import PreflightError

    NeedsZebra.seen.clear()
    options = contract_options(NeedsZebra, tmp_path, {"lr": -1.0})
    with pytest.raises(PreflightError) as caught:
        train(NeedsZebra(options))
    written = sorted(p.read_text(encoding="utf-8").strip() for p in Path(options.data).rglob("*.txt"))
    n = len(written)
    assert NeedsZebra.seen[0] == written and n > 0  # the captions of the index the runtime scanned
    assert f"{n} of {n} captions lack zebra" in caught.value.problems
    assert "--lr must be positive, got -1.0" in caught.value.problems  # all at once, one line each


def test_dataset_checks_see_the_caption_prefix_and_give_notes(tmp_path):
    from sdcore.train.preflight import run_preflight

    NeedsZebra.seen.clear()
    options = contract_options(NeedsZebra, tmp_path, {"caption_prefix": "zebra,"})
    report = run_preflight(NeedsZebra(options), options, plan=False)
    assert report.problems == [], report.problems
    assert all(c.startswith("zebra, ") for c in NeedsZebra.seen[0])  # written_caption: kohya's prefix + " "
    assert f"zebra method: {len(report.data.index.entries)} images checked" in report.notes


def test_a_dataset_check_that_raises_is_one_problem_line(tmp_path):
    from sdcore.train.preflight import run_preflight

    options = contract_options(BrokenCheck, tmp_path, {"lr": -1.0})
    report = run_preflight(BrokenCheck(options), options, plan=False)
    assert "the zebra check could not read the dataset" in report.problems
    assert "--lr must be positive, got -1.0" in report.problems
    assert report.total_steps > 0  # the step math after it still ran


def _records(folder: Path) -> dict[str, list[str]]:
    return {p.name: p.read_text(encoding="utf-8").split() for p in sorted(folder.glob("processes-*.txt"))}


def test_the_method_knows_the_process_count_in_the_plan_and_the_run(tmp_path, monkeypatch, one_torch_thread):
    """The plan (no accelerator yet) reads the launcher's environment; the run sets the accelerator's numbers
    before ``prepare``; a method outside a run sees one process."""
    from sdcore.models.tiny import create_tiny_bundle
    from sdcore.train.loop import train
    from sdcore.train.preflight import run_preflight

    options = contract_options(RecordsProcesses, tmp_path, {"max_steps": 1})
    folder = Path(options.output).parent
    assert RecordsProcesses(options).processes == ProcessInfo(num_processes=1, process_index=0)
    RecordsProcesses(options).prepare(create_tiny_bundle("sd1"))
    assert _records(folder) == {"processes-0.txt": ["0/1"]}

    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "2")
    run_preflight(RecordsProcesses(options), options)  # the memory plan runs prepare on a shapes-only model
    assert _records(folder)["processes-2.txt"] == ["2/3"]

    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("RANK")
    method = RecordsProcesses(options)
    train(method)
    assert _records(folder)["processes-0.txt"] == ["0/1", "0/1", "0/1"]  # outside a run, then plan and run
    assert vars(method)["processes"] == ProcessInfo(num_processes=1, process_index=0)  # set by the runtime


@pytest.mark.skipif(torchrun_command() is None, reason="torchrun not available")
@pytest.mark.slow
def test_two_processes_each_see_the_count_and_their_index(tmp_path):
    options = contract_options(RecordsProcesses, tmp_path, {"max_steps": 1, "batch_size": 1}, tag="multi")
    proc = launch_workers(
        RecordsProcesses, options, tmp_path / "out.safetensors", extra_pythonpath=[str(Path(__file__).parent)]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _records(Path(options.output).parent) == {
        "processes-0.txt": ["0/2", "0/2"],
        "processes-1.txt": ["1/2", "1/2"],
    }
