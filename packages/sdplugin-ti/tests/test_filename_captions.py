"""A dataset from A1111's Preprocess tab trained with ``--filename-captions a1111``: ``[filewords]`` is the file
name's caption, as A1111's TI training fills it for an image without ``<stem>.txt``."""

from __future__ import annotations

from click.testing import CliRunner
from PIL import Image
from sdcore.cli import build_cli
from sdcore.models.tiny import create_tiny_bundle
from sdcore.plugins import get_plugin_manager
from sdcore.testing.contract import contract_options
from sdcore.train.loop import TrainSession
from sdplugin_ti.method import TIMethod


def _a1111_dataset(root):
    root.mkdir(parents=True)
    for i, name in enumerate(("00001-0-a circle", "00002-0-a red square", "00003", "00004-0-captioned")):
        Image.new("RGB", (64, 64), (40 * i, 200 - 40 * i, 90)).save(root / f"{name}.png")
    (root / "00004-0-captioned.txt").write_text("from the file", encoding="utf-8")
    return root


def _prompts(tmp_path, **kw):
    """{image name: every training prompt its batches carried over two epochs} and the session."""
    template = tmp_path / "by.txt"
    template.write_text("[filewords], art by [name]\n", encoding="utf-8")
    data = _a1111_dataset(tmp_path / "data")
    values = {"name": "zork", "template": str(template), "data": str(data), "batch_size": 2, "max_steps": 2,
              "cache_text_encoder_outputs": False, "save_state": False, **kw}  # fmt: skip
    s = TrainSession(TIMethod(contract_options(TIMethod, tmp_path, values)), bundle=create_tiny_bundle("sd1"))
    s.setup()
    out: dict[str, set[str]] = {}
    for epoch in range(2):
        for refs in s.data.epoch_plan(epoch):
            for ref, prompt in zip(refs, s.make_batch(refs).captions, strict=True):
                out.setdefault(s.data.index.entries[ref.entry].path.name, set()).add(prompt)
    return out, s


def test_filewords_is_the_file_names_caption(tmp_path):
    prompts, session = _prompts(tmp_path, filename_captions="a1111")
    assert prompts == {
        "00001-0-a circle.png": {"a circle, art by zork"},
        "00002-0-a red square.png": {"a red square, art by zork"},
        "00003.png": {", art by zork"},  # A1111's too: nothing is left of the name
        "00004-0-captioned.png": {"from the file, art by zork"},  # the caption file wins
    }
    session.run()  # and it trains on them
    assert (tmp_path / "run" / "result.pt").is_file()


def test_without_the_option_the_names_are_not_read(tmp_path):
    prompts, _ = _prompts(tmp_path)
    assert prompts["00001-0-a circle.png"] == {", art by zork"}
    assert prompts["00004-0-captioned.png"] == {"from the file, art by zork"}


def _cli(*args):
    return CliRunner().invoke(build_cli(get_plugin_manager()), [*args])


def test_data_check_dry_run_and_the_note_agree(tmp_path):
    data = _a1111_dataset(tmp_path / "data")
    run = ["train", "ti", "--model", "tiny:sd1", "--data", str(data), "--name", "zork", "--output",
           str(tmp_path / "out" / "z.pt"), "--resolution", "64", "--min-bucket-reso", "64", "--dry-run", "--no-progress"]  # fmt: skip
    check = ["data", "check", str(data), "--resolution", "64", "--min-bucket-reso", "64"]
    dry = _cli(*run, "--filename-captions", "a1111")
    assert dry.exit_code == 0, dry.output
    assert "  2 without caption file: captioned from their file names (--filename-captions a1111)" in dry.output
    assert "  1 without caption file and no class tokens: trained uncaptioned" in dry.output
    assert "A1111 would caption" not in dry.output
    checked = _cli(*check, "--filename-captions", "a1111")
    assert "captions: 1 from files, 2 from file names, 0 from class tokens, 1 missing, 0 empty" in checked.output
    note = (
        "2 images have no caption file; A1111 would caption them from their file names (e.g. 'a circle'): give "
        "--filename-captions a1111"
    )
    dry = _cli(*run)
    assert dry.exit_code == 0, dry.output
    assert "  3 without caption file and no class tokens: trained uncaptioned" in dry.output
    assert note in dry.output
    checked = _cli(*check)
    assert "captions: 1 from files, 0 from class tokens, 3 missing, 0 empty" in checked.output
    assert f"note: {note}" in checked.output
