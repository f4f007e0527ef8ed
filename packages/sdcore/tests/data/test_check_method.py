"""``sdcore data check --method NAME``: the dataset read as ``sdcore train NAME`` reads it. A method's own files
beside the images (``TrainingMethod.is_auxiliary_file``, DreamArtist's ``<image>_att.png``) are not images, missing
captions or problems there, and its dataset checks run too; without ``--method`` nothing changes but a note says
which installed method claims some files. A fake method plugin here: the core names no plugin."""

from __future__ import annotations

import json
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
import sdcore
from PIL import Image
from sdcore import MethodSpec
from sdcore.errors import ConfigError
from sdcore.options import option
from sdcore.train.method import TrainingMethod
from sdcore.train.options import TrainOptions


@dataclass
class MarkOptions(TrainOptions):
    refuse: str = option("", "A caption word the method refuses (its dataset problem).")


class MarkMethod(TrainingMethod[MarkOptions]):
    """Claims ``<stem>_mark.<ext>`` files; refuses a caption holding ``refuse``; notes how many images it saw."""

    name: ClassVar[str] = "mark"
    options_class: ClassVar[type[TrainOptions]] = MarkOptions

    def is_auxiliary_file(self, path: Path) -> bool:
        return path.stem.endswith("_mark")

    def dataset_problems(self, index: Any) -> list[str]:
        word = self.options.refuse or "forbidden"
        if any(word in e.written_caption for e in index.instance_entries):
            raise ConfigError(f"a caption holds {word!r}")
        return []

    def dataset_notes(self, index: Any) -> list[str]:
        return [f"mark saw {len(index.instance_entries)} training images"]


class BrokenMethod(TrainingMethod[TrainOptions]):
    """A method that cannot be built from the check's options: left out of the note; asked for, one line."""

    name: ClassVar[str] = "broken"

    def __init__(self, options: TrainOptions) -> None:
        raise ConfigError("broken needs --foo")

    def is_auxiliary_file(self, path: Path) -> bool:
        return True


class _Plugin:
    @sdcore.hookimpl
    def sdcore_register_methods(self, register: Any) -> None:
        register(MethodSpec(name="mark", summary="claims _mark files", method="checkmethod_fake:MarkMethod",
                            aliases=("marker",)))  # fmt: skip
        register(MethodSpec(name="broken", summary="cannot be built", method="checkmethod_fake:BrokenMethod"))


@pytest.fixture
def pm(sd_pm_factory, monkeypatch):
    module = types.ModuleType("checkmethod_fake")
    module.MarkMethod = MarkMethod  # type: ignore[attr-defined]
    module.BrokenMethod = BrokenMethod  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "checkmethod_fake", module)
    return sd_pm_factory([_Plugin()])


@pytest.fixture
def data(tmp_path):
    """``a.png`` captioned, ``a_mark.png`` (the method's file) beside it without a caption."""
    root = tmp_path / "data"
    root.mkdir()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(root / "a.png")
    Image.new("L", (64, 64), 128).save(root / "a_mark.png")
    (root / "a.txt").write_text("a red square", encoding="utf-8")
    return root


CHECK = ("--resolution", "64", "--min-bucket-reso", "64")


def test_without_method_nothing_changes_but_a_note_names_the_method(sd_cli, pm, data):
    result = sd_cli(["data", "check", str(data), *CHECK], pm=pm)
    assert result.exit_code == 0, result.output
    assert "images: 2 usable (2 training, 0 class)" in result.output
    assert "captions: 1 from files, 0 from class tokens, 1 missing, 0 empty" in result.output
    assert "1 problem(s) found" in result.output
    assert (
        "note: 1 file (e.g. a_mark.png) looks like mark's own files, which `sdcore train mark` reads with their "
        "images and does not train on: give --method mark to check the dataset as that run reads it"
    ) in result.output
    assert "broken" not in result.output  # a method that cannot be built is left out, silently
    as_json = json.loads(sd_cli(["data", "check", str(data), *CHECK, "--json"], pm=pm).output)
    assert as_json["method"] is None and as_json["method_files"] == [] and as_json["images"] == 2


@pytest.mark.parametrize("name", ["mark", "marker"])  # an alias, as `sdcore train marker` takes it
def test_with_method_its_files_are_neither_images_nor_problems(sd_cli, pm, data, name):
    result = sd_cli(["data", "check", str(data), *CHECK, "--method", name], pm=pm)
    assert result.exit_code == 0, result.output
    out = result.output
    assert "images: 1 usable (1 training, 0 class), 1 samples per epoch" in out
    assert "captions: 1 from files, 0 from class tokens, 0 missing, 0 empty" in out
    assert (
        "mark's own files, read with their images (not trained on; not images, not problems) (1):\n    a_mark.png"
        in out
    )
    assert "OK: no problems found" in out
    assert "look like mark's" not in out and "looks like mark's" not in out  # no note for the method asked for
    assert "note: mark saw 1 training images" in out  # the method's dataset_notes ran on the claimed index
    assert "A1111 would caption" not in out  # the file-name note no longer suggests 'a_mark'
    report = json.loads(sd_cli(["data", "check", str(data), *CHECK, "--method", name, "--json"], pm=pm).output)
    assert report["method"] == "mark" and report["method_files"] == ["a_mark.png"]
    assert report["images"] == 1 and report["missing_captions"] == [] and report["problems"] == 0
    assert report["batches_per_epoch"] == 1 and sum(report["buckets"].values()) == 1


def test_without_method_the_file_name_note_suggests_the_method_files_stem(sd_cli, pm, data):
    """The behaviour --method fixes: an uncaptioned method file gets A1111's file-name caption suggested."""
    out = sd_cli(["data", "check", str(data), *CHECK], pm=pm).output
    assert "(e.g. 'a_mark')" in out


def test_the_methods_dataset_problem_is_an_error(sd_cli, pm, data):
    (data / "a.txt").write_text("a forbidden square", encoding="utf-8")
    result = sd_cli(["data", "check", str(data), *CHECK, "--method", "mark"], pm=pm)
    assert result.exit_code == 1, result.output
    assert "ERROR: a caption holds 'forbidden'" in result.output
    assert "note: mark saw 1 training images" in result.output  # the notes still ran


def test_a_dataset_of_method_files_only_has_no_usable_image(sd_cli, pm, data):
    (data / "a.png").unlink()
    result = sd_cli(["data", "check", str(data), *CHECK, "--method", "mark"], pm=pm)
    assert result.exit_code == 1, result.output
    assert "ERROR: no usable training images" in result.output
    assert "mark saw" not in result.output  # as the run: no method check on an empty dataset


def test_an_unknown_method_lists_the_installed_ones(sd_cli, pm, data):
    result = sd_cli(["data", "check", str(data), *CHECK, "--method", "nope"], pm=pm)
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)
    assert "unknown training method 'nope' (available: broken, mark, marker; see `sdcore plugins`)" in result.output
    assert "Dataset" not in result.output  # nothing was checked


def test_a_method_that_cannot_be_built_is_one_line_exit_2(sd_cli, pm, data):
    result = sd_cli(["data", "check", str(data), *CHECK, "--method", "broken"], pm=pm)
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)
    assert result.output == "Error: broken needs --foo\n"


def test_without_any_method_claiming_files_there_is_no_note(sd_cli, pm, data):
    (data / "a_mark.png").rename(data / "b.png")
    out = sd_cli(["data", "check", str(data), *CHECK], pm=pm).output
    assert "own files" not in out and "images: 2 usable" in out


class _Twice:
    @sdcore.hookimpl
    def sdcore_register_methods(self, register: Any) -> None:
        register(MethodSpec(name="mark", summary="the same name again", method="checkmethod_fake:MarkMethod"))


def test_a_broken_plugin_set_stops_only_the_method_asked_for(sd_cli, sd_pm_factory, pm, data):
    broken = sd_pm_factory([_Plugin(), _Twice()])
    plain = sd_cli(["data", "check", str(data), *CHECK], pm=broken)
    assert plain.exit_code == 0, plain.output  # as before --method existed: checked, without the note
    assert "images: 2 usable" in plain.output and "own files" not in plain.output
    asked = sd_cli(["data", "check", str(data), *CHECK, "--method", "mark"], pm=broken)
    assert asked.exit_code == 1 and isinstance(asked.exception, SystemExit)
    assert "Error: method name 'mark' is registered twice" in asked.output
