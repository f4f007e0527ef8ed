"""kohya's metadata options (--metadata_* and --training_comment): translated from kohya names, checked
before training, and written into the header of every saved file by the runtime's SaveInfo.metadata."""

from __future__ import annotations

import base64
import dataclasses

import pytest
from PIL import Image
from runtime_methods import ConvOutMethod, ConvOutOptions
from safetensors import safe_open
from sdcore.models.tiny import create_tiny_bundle
from sdcore.testing.contract import contract_options
from sdcore.train.kohya import translate
from sdcore.train.loop import train
from sdcore.train.modelspec import thumbnail_data_url, user_metadata
from sdcore.train.preflight import option_problems

#: kohya name -> the header key sd-scripts writes it under (library/sai_model_spec.py, train_network.py)
KOHYA_KEYS = {
    "metadata_title": "modelspec.title",
    "metadata_author": "modelspec.author",
    "metadata_description": "modelspec.description",
    "metadata_license": "modelspec.license",
    "metadata_tags": "modelspec.tags",
    "metadata_usage_hint": "modelspec.usage_hint",
    "metadata_merged_from": "modelspec.merged_from",
    "metadata_trigger_phrase": "modelspec.trigger_phrase",
    "metadata_preprocessor": "modelspec.preprocessor",
    "metadata_is_negative_embedding": "modelspec.is_negative_embedding",
    "training_comment": "ss_training_comment",
}


def _fields() -> list[str]:
    return [f.name for f in dataclasses.fields(ConvOutOptions)]


def _header(path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


def test_kohya_names_translate_without_notes():
    items = {name: f"value of {name}" for name in KOHYA_KEYS}
    items["metadata_tags"] = "anime, girl,  style"
    out = translate(items, _fields(), where="cfg")
    assert not out.problems and not out.notes
    assert out.values["metadata_tags"] == "anime, girl,  style"  # kohya writes the text as given
    assert out.values["training_comment"] == "value of training_comment"
    # a TOML boolean is kohya's text "True" (its option is a string)
    assert translate({"metadata_is_negative_embedding": True}, _fields(), where="cfg").values == {
        "metadata_is_negative_embedding": "True"
    }
    # what the kohya_ss GUI writes for an untouched field is "not given"
    assert translate({"training_comment": "", "metadata_author": ""}, _fields(), where="cfg").values == {}


def test_thumbnail_file_becomes_a_data_url_and_a_data_url_stays(tmp_path):
    png = tmp_path / "cover.png"
    Image.new("RGB", (4, 3), (200, 10, 10)).save(png)
    expected = "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode("ascii")
    assert thumbnail_data_url(str(png)) == expected
    assert base64.b64decode(expected.split(",", 1)[1]) == png.read_bytes()
    raw = tmp_path / "cover.thumbnailbytes"  # no type from the name: kohya's application/octet-stream
    raw.write_bytes(b"\x00\x01")
    assert thumbnail_data_url(str(raw)) == "data:application/octet-stream;base64,AAE="
    assert thumbnail_data_url("data:image/webp;base64,AAAA") == "data:image/webp;base64,AAAA"


def test_missing_thumbnail_is_reported_before_training(tmp_path):
    o = contract_options(ConvOutMethod, tmp_path, {"metadata_thumbnail": str(tmp_path / "nope.png")})
    problems = option_problems(o)
    assert any("--metadata-thumbnail" in p and "no such file" in p for p in problems), problems
    o.metadata_thumbnail = "data:image/png;base64,AAAA"
    assert not [p for p in option_problems(o) if "thumbnail" in p]


def test_saved_files_hold_the_metadata_and_nothing_changes_without_it(tmp_path):
    png = tmp_path / "cover.jpg"
    Image.new("RGB", (4, 4), (0, 90, 200)).save(png, format="JPEG")
    given = {name: f"{name} text" for name in KOHYA_KEYS}
    given["metadata_thumbnail"] = str(png)
    runs = {}
    for tag, extra in (("plain", {}), ("meta", given)):
        o = contract_options(ConvOutMethod, tmp_path, {"max_steps": 2, "save_every": 1, **extra}, tag=tag)
        result = train(ConvOutMethod(o), bundle=create_tiny_bundle("sd1"))
        saved = sorted(p for p in result.output.parent.glob("*.safetensors"))
        assert len(saved) == 2  # the step-1 result and the final one
        runs[tag] = [_header(p) for p in saved]
    for plain, meta in zip(runs["plain"], runs["meta"], strict=True):
        assert not any(k.startswith("modelspec.") or k == "ss_training_comment" for k in plain)
        for name, key in KOHYA_KEYS.items():
            assert meta[key] == f"{name} text"
        assert meta["modelspec.thumbnail"] == "data:image/jpeg;base64," + base64.b64encode(png.read_bytes()).decode()
        assert {k: v for k, v in meta.items() if not k.startswith(("modelspec.", "ss_"))} == plain


@pytest.mark.parametrize("value", [None, ""])
def test_unset_options_add_no_keys(tmp_path, value):
    o = contract_options(ConvOutMethod, tmp_path, {"metadata_author": value, "training_comment": value})
    assert user_metadata(o) == {}


def test_a_run_with_a_missing_thumbnail_stops_with_a_clear_error(tmp_path):
    from sdcore.errors import ConfigError

    o = contract_options(ConvOutMethod, tmp_path, {"metadata_thumbnail": str(tmp_path / "gone.png")})
    with pytest.raises(ConfigError, match="--metadata-thumbnail"):
        train(ConvOutMethod(o), bundle=create_tiny_bundle("sd1"))
    assert not (tmp_path / "run" / "result.safetensors").exists()
