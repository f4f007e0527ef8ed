"""A1111's file-name captions (``--filename-captions a1111``): an image with no caption file is captioned from its
file name, the stem less its leading digits and dashes (A1111's ``re_numbers_at_start``, ``^[-\\d]+\\s*``), as
its Train tab (TI, hypernetworks, DreamArtist) does; a caption file always wins."""

from __future__ import annotations

import json
import re

import pytest
from PIL import Image
from sdcore.data.captions import FILENAME_CAPTION_RULES, filename_caption, word_regex_problem
from sdcore.data.check import check_dataset
from sdcore.data.dataset import build_dataset_index, load_toml_dataset_config, scan_dataset
from sdcore.errors import DataError
from sdcore.train.caption_checks import filename_caption_notes
from sdcore.train.options import FILENAME_CAPTIONS, TrainOptions


@pytest.mark.parametrize(
    ("name", "caption"),
    [
        ("00001-0-a circle.png", "a circle"),  # A1111's Preprocess tab: {index:05}-{subindex}-{stem}.png
        ("00012-3-a red barn, at dusk.jpg", "a red barn, at dusk"),
        ("12 a cat.jpg", "a cat"),  # the blanks after the numbers go too
        ("-3-x.png", "x"),  # dashes alone, or before digits
        ("abc.png", "abc"),  # nothing to remove
        ("0001.png", ""),  # numbers only: no caption
        ("00001-0-.png", ""),
        ("a1 2b.png", "a1 2b"),  # digits only at the start count
        ("00001-0-a_b.c.webp", "a_b.c"),  # the last suffix only; '_' kept (A1111 does not touch it)
        ("7-  lots  of  space .png", "lots  of  space "),  # as A1111: only the leading blanks go
        ("d/sub/00003-1-in a folder.png", "in a folder"),  # the file name, not the folders
    ],
)
def test_the_a1111_rule(name, caption):
    assert filename_caption(name, "a1111") == caption
    # A1111's own expression on its own stem (os.path.splitext of the base name)
    stem = name.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    assert re.sub(r"^[-\d]+\s*", "", stem) == caption


def test_the_rules_and_the_option_choices_are_one_list():
    assert "a1111" in FILENAME_CAPTION_RULES
    assert ("none", *FILENAME_CAPTION_RULES) == FILENAME_CAPTIONS
    with pytest.raises(ValueError, match="a1111"):
        filename_caption("x.png", "kohya")


def _image(path, colour=(200, 10, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 64), colour).save(path)
    return path


def _a1111_folder(root):
    """An A1111 Preprocess output: two named images without captions, one numbered only, one with a .txt."""
    for name in ("00001-0-a circle.png", "00002-0-a red square.png", "00003.png", "00004-0-captioned.png"):
        _image(root / name)
    (root / "00004-0-captioned.txt").write_text("from the file", encoding="utf-8")
    return root


def _options(data, **kw):
    return TrainOptions(data=str(data), resolution=64, min_bucket_reso=64, max_bucket_reso=128, **kw)


def _captions(index):
    return {e.path.name: e.caption for e in index.entries}


def test_off_by_default_and_a_caption_file_always_wins(tmp_path):
    data = _a1111_folder(tmp_path / "d")
    off = build_dataset_index(_options(data))
    assert _captions(off) == {
        "00001-0-a circle.png": "",
        "00002-0-a red square.png": "",
        "00003.png": "",
        "00004-0-captioned.png": "from the file",
    }
    assert len(off.missing_captions) == 3 and off.filename_captions == []
    on = build_dataset_index(_options(data, filename_captions="a1111"))
    assert _captions(on) == {
        "00001-0-a circle.png": "a circle",
        "00002-0-a red square.png": "a red square",
        "00003.png": "",  # nothing left of the name: uncaptioned, as in A1111
        "00004-0-captioned.png": "from the file",  # the caption file, not its name's 'captioned'
    }
    assert sorted(p.name for p in on.filename_captions) == ["00001-0-a circle.png", "00002-0-a red square.png"]
    assert [p.name for p in on.missing_captions] == ["00003.png"]
    assert "  2 without caption file: captioned from their file names (--filename-captions a1111)" in on.summary()
    assert "  1 without caption file and no class tokens: trained uncaptioned" in on.summary()


def test_an_empty_caption_file_is_still_a_caption_file(tmp_path):
    """A1111 reads an existing ``<stem>.txt`` whatever it holds: the name does not replace an empty one."""
    data = tmp_path / "d"
    _image(data / "00001-0-a circle.png")
    (data / "00001-0-a circle.txt").write_text("", encoding="utf-8")
    index = build_dataset_index(_options(data, filename_captions="a1111"))
    assert _captions(index) == {"00001-0-a circle.png": ""}
    assert index.filename_captions == [] and len(index.empty_captions) == 1


def test_before_class_tokens_and_the_class_tokens_for_numbered_names(tmp_path):
    """kohya's ``10_mychar`` folder captions an image without a caption file with 'mychar'; a file name that gives
    text comes first (the option asks for it), one that gives none still gets the class tokens."""
    data = tmp_path / "d"
    _image(data / "10_mychar" / "00001-0-a circle.png")
    _image(data / "10_mychar" / "0002.png")
    off = build_dataset_index(_options(data))
    assert _captions(off) == {"00001-0-a circle.png": "mychar", "0002.png": "mychar"}
    assert filename_caption_notes(off) == []  # kohya users: the folder captions them, no noise
    on = build_dataset_index(_options(data, filename_captions="a1111"))
    assert _captions(on) == {"00001-0-a circle.png": "a circle", "0002.png": "mychar"}
    assert [p.name for p in on.class_token_captions] == ["0002.png"]


def test_the_other_rules_as_a_fallback(tmp_path):
    data = tmp_path / "d"
    _image(data / "00001-0-a_circle.png")
    assert _captions(build_dataset_index(_options(data, filename_captions="stem"))) == {
        "00001-0-a_circle.png": "00001-0-a_circle"
    }
    assert _captions(build_dataset_index(_options(data, filename_captions="spaces"))) == {
        "00001-0-a_circle.png": "00001-0-a circle"
    }


def test_the_note_and_its_absence(tmp_path):
    data = _a1111_folder(tmp_path / "d")
    notes = filename_caption_notes(build_dataset_index(_options(data)))
    assert notes == [
        "2 images have no caption file; A1111 would caption them from their file names (e.g. 'a circle'): give "
        "--filename-captions a1111 for the captions A1111's TI/hypernetwork training used (in a dataset TOML: "
        "filename_captions = 'a1111')"
    ]
    assert filename_caption_notes(build_dataset_index(_options(data, filename_captions="a1111"))) == []
    numbered = tmp_path / "n"
    for i in range(3):
        _image(numbered / f"{i:05}.png")  # A1111 gives nothing for these either
    assert filename_caption_notes(build_dataset_index(_options(numbered))) == []
    one = tmp_path / "one"
    _image(one / "12 a cat.png")
    assert filename_caption_notes(build_dataset_index(_options(one)))[0].startswith(
        "1 image has no caption file; A1111 would caption it from its file name (e.g. 'a cat')"
    )


def test_an_image_at_several_resolutions_counts_once_in_the_note(tmp_path):
    from sdcore.data.resolutions import expand_resolutions

    data = tmp_path / "d"
    _image(data / "00001-0-a circle.png")
    index = build_dataset_index(
        TrainOptions(data=str(data), resolution=0, resolutions="64,128", min_bucket_reso=64, max_bucket_reso=256)
    )
    expand_resolutions(index, frozenset(), seed=1, draw="epoch")
    assert len(index.entries) == 2
    assert filename_caption_notes(index)[0].startswith("1 image has no caption file")


def test_the_dataset_toml_key_at_every_level(tmp_path):
    data = _a1111_folder(tmp_path / "d")
    other = tmp_path / "e"
    _image(other / "00009-0-a green star.png")
    config = tmp_path / "data.toml"
    config.write_text(
        "[general]\nfilename_captions = 'a1111'\n\n"
        f"[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{data}'\n\n"
        f"[[datasets.subsets]]\nimage_dir = '{other}'\nfilename_captions = 'none'\n",
        encoding="utf-8",
    )
    subsets = load_toml_dataset_config(config, _options(config))
    assert [s.filename_captions for s in subsets] == ["a1111", "none"]
    index = scan_dataset(_options(config))
    assert sorted(p.name for p in index.filename_captions) == ["00001-0-a circle.png", "00002-0-a red square.png"]
    assert _captions(index)["00009-0-a green star.png"] == ""
    # the run's option is the default of a TOML that does not say
    plain = tmp_path / "plain.toml"
    plain.write_text(f"[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{other}'\n", encoding="utf-8")
    index = scan_dataset(_options(plain, filename_captions="a1111"))
    assert _captions(index) == {"00009-0-a green star.png": "a green star"}
    bad = tmp_path / "bad.toml"
    bad.write_text(f"[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{other}'\nfilename_captions = 'yes'\n")
    with pytest.raises(DataError, match="'filename_captions' must be one of none, stem, spaces, a1111, got 'yes'"):
        load_toml_dataset_config(bad, _options(bad))


def test_a_metadata_file_subset_refuses_the_key(tmp_path):
    """A fine-tuning subset's captions come from its metadata file (kohya), so the key means nothing there."""
    data = tmp_path / "d"
    _image(data / "00001-0-a circle.png")
    (tmp_path / "meta.json").write_text(json.dumps({"00001-0-a circle": {"caption": "x"}}), encoding="utf-8")
    config = tmp_path / "data.toml"
    config.write_text(
        f"[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{data}'\nmetadata_file = '{tmp_path / 'meta.json'}'\n"
        "filename_captions = 'a1111'\n",
        encoding="utf-8",
    )
    with pytest.raises(DataError, match="'filename_captions': not used by a metadata_file subset"):
        load_toml_dataset_config(config, _options(config))


def test_data_check_counts_them_as_the_index_does(tmp_path):
    data = _a1111_folder(tmp_path / "d")
    report = check_dataset(data, _options(data, filename_captions="a1111"))
    assert report.captions_from_files == 1
    assert sorted(report.filename_captions) == ["00001-0-a circle.png", "00002-0-a red square.png"]
    assert report.missing_captions == ["00003.png"]
    assert report.to_dict()["captions"] == {"from_files": 1, "from_file_names": 2, "from_class_tokens": 0,
                                            "missing": 1, "empty": 0}  # fmt: skip
    assert "  captions: 1 from files, 2 from file names, 0 from class tokens, 1 missing, 0 empty" in report.to_text()
    assert report.notes == []
    off = check_dataset(data, _options(data))
    assert (off.captions_from_files, off.filename_captions, len(off.missing_captions)) == (1, [], 3)
    assert "  captions: 1 from files, 0 from class tokens, 3 missing, 0 empty" in off.to_text()
    assert off.notes == filename_caption_notes(build_dataset_index(_options(data)))


def test_data_check_cli_option(tmp_path):
    from click.testing import CliRunner
    from sdcore.cli import build_cli
    from sdcore.plugins import get_plugin_manager

    data = _a1111_folder(tmp_path / "d")
    cli = build_cli(get_plugin_manager())
    args = ["data", "check", str(data), "--resolution", "64", "--min-bucket-reso", "64", "--json"]
    on = CliRunner().invoke(cli, [*args, "--filename-captions", "a1111"])
    assert on.exit_code == 0, on.output
    assert json.loads(on.output)["captions"]["from_file_names"] == 2
    off = CliRunner().invoke(cli, args)
    assert off.exit_code == 0, off.output
    report = json.loads(off.output)
    assert report["captions"]["from_file_names"] == 0 and report["captions"]["missing"] == 3
    assert any("--filename-captions a1111" in note for note in report["notes"])
    wrong = CliRunner().invoke(cli, [*args, "--filename-captions", "yes"])
    assert wrong.exit_code == 2 and "'yes' is not one of" in wrong.output


# A1111's "Filename word regex" / "Filename join string" settings (dataset_filename_word_regex, default '';
# dataset_filename_join_string, default ' '): for an image without <stem>.txt, textual_inversion/dataset.py takes
# the stem less re_numbers_at_start, then, with a regex, join_string.join(re.findall(regex, text)).
def _a1111_reference(name, regex, join):
    """A1111's own steps on a file name (modules/textual_inversion/dataset.py), for comparison."""
    text = re.sub(r"^[-\d]+\s*", "", name.rsplit(".", 1)[0])
    return (join or "").join(re.compile(regex).findall(text)) if regex else text


@pytest.mark.parametrize(
    ("name", "regex", "join", "caption"),
    [
        ("00012-3-a_red circle.png", "[a-z]+", "_", "a_red_circle"),
        ("00012-3-a_red circle.png", "[a-z]+", " ", "a red circle"),  # the join setting's default
        ("00012-3-a_red circle.png", "[a-z]+", "", "aredcircle"),  # an empty join string (A1111: `or ""`)
        ("00012-3-a_red circle.png", "", "_", "a_red circle"),  # no regex: the join string does nothing
        ("00001-0-Cat, sitting (2).png", r"\w+", ", ", "Cat, sitting, 2"),  # digits after the prefix stay words
        ("00001-0-tag1_tag2.jpg", r"([a-z]+)\d", "+", "tag+tag"),  # one group: findall gives the group's text
        ("00001-0-ABC.png", "[a-z]+", " ", ""),  # nothing matches: no text
    ],
)
def test_the_word_regex_as_a1111(name, regex, join, caption):
    assert filename_caption(name, "a1111", word_regex=regex, join_string=join) == caption
    assert _a1111_reference(name, regex, join) == caption


def test_the_word_regex_only_for_captions_made_from_names(tmp_path):
    data = _a1111_folder(tmp_path / "d")
    (data / "00004-0-captioned.txt").write_text("from the file, 42", encoding="utf-8")
    on = build_dataset_index(
        _options(data, filename_captions="a1111", filename_word_regex="[a-z]+", filename_join_string="_")
    )
    assert _captions(on) == {
        "00001-0-a circle.png": "a_circle",
        "00002-0-a red square.png": "a_red_square",
        "00003.png": "",
        "00004-0-captioned.png": "from the file, 42",  # a caption file's text is never filtered
    }
    # without a file-name fallback the regex does nothing, and a note says so
    off = build_dataset_index(_options(data, filename_word_regex="[a-z]+", filename_join_string="_"))
    assert _captions(off) == _captions(build_dataset_index(_options(data)))
    notes = filename_caption_notes(off)
    assert notes[0] == (
        "filename_word_regex '[a-z]+' has no effect: it only filters the captions --filename-captions makes "
        "from file names; give "
        "--filename-captions a1111 too (A1111's Filename word regex applies to images without a caption file)"
    )
    assert "(e.g. 'a_circle')" in notes[1]  # what A1111 would make with that regex
    assert filename_caption_notes(on) == []


def test_a_name_with_no_word_falls_back_to_the_class_tokens(tmp_path):
    data = tmp_path / "d"
    _image(data / "10_mychar" / "00001-0-ABC.png")
    index = build_dataset_index(_options(data, filename_captions="a1111", filename_word_regex="[a-z]+"))
    assert _captions(index) == {"00001-0-ABC.png": "mychar"}


def test_a_bad_word_regex_in_a_dataset_toml(tmp_path):
    data = _a1111_folder(tmp_path / "d")
    config = tmp_path / "data.toml"
    config.write_text(
        "[general]\nfilename_captions = 'a1111'\nfilename_word_regex = '[a-z'\nfilename_join_string = '_'\n\n"
        f"[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{data}'\n",
        encoding="utf-8",
    )
    with pytest.raises(DataError, match=r"\[general\]: 'filename_word_regex' '\[a-z': not a valid regular expression"):
        load_toml_dataset_config(config, _options(config))
    config.write_text(config.read_text().replace("'[a-z'", "'[a-z]+'"), encoding="utf-8")
    subsets = load_toml_dataset_config(config, _options(config))
    assert [(s.filename_word_regex, s.filename_join_string) for s in subsets] == [("[a-z]+", "_")]
    assert _captions(scan_dataset(_options(config)))["00002-0-a red square.png"] == "a_red_square"


def test_data_check_cli_word_regex(tmp_path):
    from click.testing import CliRunner
    from sdcore.cli import build_cli
    from sdcore.plugins import get_plugin_manager

    data = _a1111_folder(tmp_path / "d")
    cli = build_cli(get_plugin_manager())
    args = ["data", "check", str(data), "--resolution", "64", "--min-bucket-reso", "64", "--json"]
    args += ["--filename-captions", "a1111", "--filename-join-string", "_"]
    on = CliRunner().invoke(cli, [*args, "--filename-word-regex", "[a-z]+"])
    assert on.exit_code == 0, on.output
    assert json.loads(on.output)["captions"]["from_file_names"] == 2
    bad = CliRunner().invoke(cli, [*args, "--filename-word-regex", "(a)(b)"])
    assert bad.exit_code == 2 and "Traceback" not in bad.output
    assert "Error: --filename-word-regex '(a)(b)': has 2 groups" in bad.output


@pytest.mark.parametrize(
    ("regex", "why"),
    [
        ("a{4294967296}", "not a valid regular expression (the repetition number is too large)"),  # OverflowError
        ("(?:" * 1000 + "a" + ")" * 1000, "not a valid regular expression (its groups are nested too deep)"),
    ],
)
def test_a_regex_re_refuses_without_re_error_is_a_problem_not_a_traceback(tmp_path, regex, why):
    """``re.compile`` raises OverflowError / RecursionError, not ``re.error``, for these: still one clear line."""
    from click.testing import CliRunner
    from sdcore.cli import build_cli
    from sdcore.plugins import get_plugin_manager

    assert word_regex_problem(regex) == why
    data = _a1111_folder(tmp_path / "d")
    args = ["data", "check", str(data), "--resolution", "64", "--min-bucket-reso", "64"]
    bad = CliRunner().invoke(build_cli(get_plugin_manager()), [*args, "--filename-word-regex", regex])
    assert bad.exit_code == 2 and bad.exception is not None and isinstance(bad.exception, SystemExit), bad.output
    assert f"Error: --filename-word-regex {regex!r}: {why}" in bad.output


@pytest.mark.parametrize(
    ("rule", "regex", "join", "caption"),
    [
        ("stem", "[a-z]+", "_", "a_red_circle"),  # the numbers stay in stem's text; this regex drops them
        ("stem", r"\w+", " ", "00012 3 a_red circle"),  # \w keeps them, and the '_' inside a word
        ("spaces", r"\w+", ",", "00012,3,a,red,circle"),  # after spaces made '_' a space
    ],
)
def test_the_word_regex_on_the_other_rules_filters_their_text(rule, regex, join, caption):
    """sdcore's own (OneTrainer's and SimpleTuner's file-name captions have no such filter): the rule's text, then
    A1111's join(findall) on it."""
    assert filename_caption("00012-3-a_red circle.png", rule, word_regex=regex, join_string=join) == caption
