"""``sdcore data check`` on a DreamArtist dataset: ``<image>_att.png`` attention maps beside the images are APT's
own files (``APTMethod.is_auxiliary_file``). With ``--method apt`` they are reported as such, as ``sdcore train apt``
reads them; without it they count as uncaptioned images and a note suggests ``--method apt``."""

from __future__ import annotations

import json
import re
import subprocess
import sys

from click.testing import CliRunner
from PIL import Image
from sdcore.cli import build_cli
from sdcore.plugins import get_plugin_manager


def _cli(*args):
    return CliRunner().invoke(build_cli(get_plugin_manager()), [*args])


def _dataset(root):
    """``3_zork``: three images (two captioned), two with an attention map; one plain image at the top level."""
    folder = root / "3_zork"
    folder.mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (64, 96 if i else 64), (60 * i, 90, 200 - 50 * i)).save(folder / f"{i:03d}.png")
    for i in range(2):
        Image.new("L", (64, 96 if i else 64), 180).save(folder / f"{i:03d}_att.png")
    (folder / "000.txt").write_text("zork, red", encoding="utf-8")
    (folder / "001.txt").write_text("zork, blue", encoding="utf-8")
    return root


CHECK = ("--resolution", "64", "--min-bucket-reso", "64")


def test_one_image_and_its_map_without_and_with_method(tmp_path):
    """The brief's case: ``a.png``, ``a.txt``, ``a_att.png``."""
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(data / "a.png")
    Image.new("L", (64, 64), 128).save(data / "a_att.png")
    (data / "a.txt").write_text("a photo of zork", encoding="utf-8")

    plain = _cli("data", "check", str(data), *CHECK)
    assert plain.exit_code == 0, plain.output
    assert "images: 2 usable" in plain.output and "1 problem(s) found" in plain.output
    assert (
        "missing captions (no caption file, no class tokens: trained uncaptioned) (1):\n    a_att.png" in plain.output
    )
    assert "(e.g. 'a_att')" in plain.output  # the file-name note takes the map for an image
    assert "give --method apt to check the dataset as that run reads it" in plain.output
    assert "1 file (e.g. a_att.png) looks like apt's own files" in plain.output

    for name in ("apt", "dreamartist"):
        checked = _cli("data", "check", str(data), *CHECK, "--method", name)
        assert checked.exit_code == 0, checked.output
        out = checked.output
        assert "images: 1 usable (1 training, 0 class)" in out
        assert "captions: 1 from files, 0 from class tokens, 0 missing, 0 empty" in out
        assert "apt's own files, read with their images (not trained on; not images, not problems) (1):" in out
        assert "OK: no problems found" in out
        assert "a_att" not in out.replace("    a_att.png\n", "")  # listed once, suggested nowhere
        assert "--method apt" not in out


def test_data_check_method_apt_and_train_apt_dry_run_agree(tmp_path):
    data = _dataset(tmp_path / "data")
    report = json.loads(_cli("data", "check", str(data), *CHECK, "--method", "apt", "--json").output)
    run = ["train", "apt", "--model", "tiny:sd1", "--data", str(data), "--name", "zork", "--output",
           str(tmp_path / "out" / "z.pt"), *CHECK, "--dry-run", "--no-progress"]  # fmt: skip
    dry = _cli(*run)
    assert dry.exit_code == 0, dry.output
    trained = re.search(r"  (\d+) training images \((\d+) with repeats\)", dry.output)
    claimed = re.search(r"  (\d+) method files \(e\.g\. attention maps\) used alongside", dry.output)
    uncaptioned = re.search(r"  (\d+) without caption file: captioned with class tokens", dry.output)
    batches = re.search(r"(\d+) batches of 1 per epoch", dry.output)
    assert trained and claimed and uncaptioned and batches, dry.output
    assert (int(trained[1]), int(trained[2])) == (report["instance_images"], report["samples_per_epoch"]) == (3, 9)
    assert int(claimed[1]) == len(report["method_files"]) == 2
    assert sorted(report["method_files"]) == ["3_zork/000_att.png", "3_zork/001_att.png"]
    assert int(uncaptioned[1]) == len(report["class_token_captions"]) == 1  # 002.png, from the folder's class tokens
    assert int(batches[1]) == report["batches_per_epoch"]
    assert sum(report["buckets"].values()) == 3 and report["problems"] == 0

    plain = json.loads(_cli("data", "check", str(data), *CHECK, "--json").output)
    assert plain["instance_images"] == 5 and plain["method_files"] == []  # without --method: as before
    assert any("2 files (e.g. 3_zork/000_att.png) look like apt's own files" in note for note in plain["notes"])


def test_data_check_with_and_without_method_imports_no_torch(tmp_path):
    """Loading every installed method class for the note (and apt's for --method) stays import-light."""
    data = _dataset(tmp_path / "data")
    code = (
        "import sys\nfrom sdcore.cli import main\n"
        "for extra in ([], ['--method', 'apt']):\n"
        "    try:\n"
        f"        main(['data', 'check', {str(data)!r}, '--resolution', '64', '--min-bucket-reso', '64', *extra])\n"
        "    except SystemExit as exc:\n"
        "        assert not exc.code, exc.code\n"
        "print('torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("False"), done.stdout[-2000:]
    assert "look like apt's own files" in done.stdout and "apt's own files, read with their images" in done.stdout
