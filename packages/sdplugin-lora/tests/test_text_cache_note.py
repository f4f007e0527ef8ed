"""``--cache-text-encoder-outputs`` (sdcore's spelling, on by default) typed or set in a config while the LoRA
trains the text encoder caches nothing: the pre-flight says so, as kohya's spelling already got a note. Dry runs
only: the model's header is read, no weights load."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from sdcore.cli import build_cli
from sdcore.plugins import get_plugin_manager
from sdcore.testing.contract import make_tiny_dataset

NOTE = "so sdcore encodes the captions at every step and caches nothing"


def _dry_run(tmp_path, model: str, *extra: str) -> str:
    data = tmp_path / "data"
    if not data.exists():
        make_tiny_dataset(data, n=2, size=64)
    args = ["train", "lora", "--model", model, "--data", str(data), "--output", str(tmp_path / "o.safetensors"),
            "--resolution", "64", "--dry-run", *extra]  # fmt: skip
    result = CliRunner().invoke(build_cli(get_plugin_manager()), args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        (["--train-text-encoder"], "--cache-text-encoder-outputs: the text encoder trains (--train-text-encoder)"),
        (["--te-only"], "--cache-text-encoder-outputs: the text encoder trains (--te-only)"),
    ],
)
def test_asking_for_the_cache_while_the_text_encoder_trains_is_noted(tmp_path, flags, said):
    out = _dry_run(tmp_path, "tiny:sd1", *flags, "--cache-text-encoder-outputs")
    assert f"{said}, {NOTE}" in out
    assert "text-encoder outputs no (the text encoder runs every step)" in out


def test_the_default_left_alone_and_a_frozen_text_encoder_get_no_note(tmp_path):
    assert NOTE not in _dry_run(tmp_path, "tiny:sd1", "--train-text-encoder")  # the default, not asked for
    assert NOTE not in _dry_run(tmp_path, "tiny:sd1", "--cache-text-encoder-outputs")  # the cache is used


def test_a_config_files_key_is_named(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text("cache_text_encoder_outputs = true\ntrain_text_encoder = true\n", encoding="utf-8")
    out = _dry_run(tmp_path, "tiny:sd1", "--config", str(config))
    assert f"{config}: cache_text_encoder_outputs: the text encoder trains (--train-text-encoder), {NOTE}" in out


def test_flux_caching_t5_while_clip_trains_gets_no_note(tmp_path):
    out = _dry_run(tmp_path, "tiny:flux", "--train-text-encoder", "--split-qkv", "--cache-text-encoder-outputs")
    assert NOTE not in out and "T5-XXL only" in out


def test_kohyas_spelling_keeps_its_own_note_alone(tmp_path):
    out = _dry_run(tmp_path, "tiny:sd1", "--network_dim", "4", "--cache_text_encoder_outputs")
    assert out.count(NOTE) == 1 and "cache_text_encoder_outputs: the text encoder trains (kohya's" in out
