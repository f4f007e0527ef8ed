"""kohya's --metadata_* and --training_comment in a trained LoRA file, as sd-scripts writes them:
modelspec.* from the metadata options (the title alone: ss_output_name stays the output name),
ss_training_comment, and with --no_metadata the ModelSpec keys kept and the comment dropped."""

from __future__ import annotations

from sdcore.testing.contract import check_one_step
from sdplugin_lora.format import read_lora
from sdplugin_lora.method import LoraMethod

META = {
    "metadata_title": "My Char v2",
    "metadata_author": "someone",
    "metadata_description": "a test LoRA",
    "metadata_license": "CreativeML Open RAIL-M",
    "metadata_tags": "character, anime",
    "metadata_usage_hint": "weight 0.8",
    "metadata_trigger_phrase": "mychar",
    "metadata_merged_from": "a, b",
    "metadata_preprocessor": "none",
    "metadata_is_negative_embedding": "false",
    "metadata_thumbnail": "data:image/png;base64,AAAA",
    "training_comment": "trigger: mychar",
}
EXPECTED = {f"modelspec.{k.removeprefix('metadata_')}": v for k, v in META.items() if k != "training_comment"}


def test_lora_file_holds_the_metadata_options(tmp_path):
    plain = read_lora(check_one_step(LoraMethod, tmp_path / "plain", {"rank": 2}).output).metadata
    meta = read_lora(check_one_step(LoraMethod, tmp_path / "meta", {"rank": 2, **META}).output).metadata
    for key, value in EXPECTED.items():
        assert meta[key] == value, key
    assert meta["ss_training_comment"] == "trigger: mychar"
    # kohya: --metadata_title is modelspec.title; ss_output_name stays the output name
    assert meta["ss_output_name"] == plain["ss_output_name"] == "result"
    assert plain["modelspec.title"] == "result"
    # without the options nothing of theirs is written
    assert set(meta) - set(plain) == (set(EXPECTED) - {"modelspec.title"}) | {"ss_training_comment"}


def test_minimal_metadata_keeps_modelspec_and_drops_the_comment(tmp_path):
    result = check_one_step(LoraMethod, tmp_path, {"rank": 2, "minimal_metadata": True, **META})
    meta = read_lora(result.output).metadata
    for key, value in EXPECTED.items():
        assert meta[key] == value, key
    assert "ss_training_comment" not in meta and "ss_tag_frequency" not in meta


def test_kohya_command_line_spelling_reaches_the_file(tmp_path, sd_cli):
    """kohya's flags as a kohya user types them: the metadata lands in the file, no 'unknown option'."""
    from PIL import Image
    from sdcore.plugins import get_plugin_manager
    from sdcore.testing.datasets import make_tiny_dataset

    data = make_tiny_dataset(tmp_path / "data", n=2, size=64)
    cover = tmp_path / "cover.png"
    Image.new("RGB", (2, 2), (9, 9, 9)).save(cover)
    args = ["train", "lora", "--pretrained_model_name_or_path", "tiny:sd1", "--train_data_dir", str(data)]
    args += ["--output_dir", str(tmp_path / "out"), "--output_name", "mine", "--max_train_steps", "1"]
    args += ["--resolution", "64", "--min-bucket-reso", "64", "--no-progress", "--network_dim", "2"]
    args += ["--metadata_title", "Mine", "--metadata_author", "me", "--metadata_thumbnail", str(cover)]
    args += ["--training_comment", "hello", "--metadata_tags", "a, b"]
    result = sd_cli(args, pm=get_plugin_manager())
    assert result.exit_code == 0, result.output
    assert "accepted without effect" not in result.output
    meta = read_lora(tmp_path / "out" / "mine.safetensors").metadata
    assert (meta["modelspec.title"], meta["ss_output_name"], meta["modelspec.author"]) == ("Mine", "mine", "me")
    assert meta["modelspec.tags"] == "a, b" and meta["ss_training_comment"] == "hello"
    assert meta["modelspec.thumbnail"].startswith("data:image/png;base64,")
