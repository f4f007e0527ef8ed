"""Every option of kohya sd-scripts' training scripts is known to sdcore by name.

A kohya user's TOML may carry any of kohya's ~270 training options (the kohya_ss GUI writes many of them
with their "off" values). Each must be translated, accepted with a note, or refused with a reason; none may
end in "unknown option (did you mean ...)". ``data/kohya_options_48d368f.tsv`` lists kohya's option names
with the scripts that define them: every ``add_argument("--name")`` of ``library/*.py`` and the top-level
``*train*.py`` scripts of sd-scripts at commit 48d368f (names are facts; no kohya code is kept here).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from sdcore.errors import ConfigError
from sdcore.plugins import get_plugin_manager
from sdcore.train import kohya
from sdcore.train.config import field_types, load_options

LIST = Path(__file__).parent / "data" / "kohya_options_48d368f.tsv"


def _kohya_options() -> dict[str, list[str]]:
    rows = [line.split("\t") for line in LIST.read_text().splitlines() if line and not line.startswith("#")]
    return {name: scripts.split(",") for name, scripts in rows}


def _method_option_classes() -> dict[str, type]:
    return {name: spec.load().options_class for name, spec in get_plugin_manager().methods().items()}


def test_the_list_is_kohyas_whole_option_set():
    options = _kohya_options()
    assert len(options) > 250
    assert {"network_dim", "learning_rate", "model_prediction_type", "deepspeed", "gemma2"} <= set(options)


def test_every_kohya_training_option_is_known_by_name():
    fields: set[str] = set()
    for options_class in _method_option_classes().values():
        fields |= set(field_types(options_class))
    fields.add("config_file")  # the command line's --config_file; inside a TOML a note (below)
    unknown = sorted(n for n in _kohya_options() if not kohya.is_kohya_name(n) and n not in fields)
    assert unknown == []


@pytest.mark.parametrize("method", ["lora", "dreambooth", "ti"])
def test_a_toml_with_every_kohya_option_reports_no_unknown_name(tmp_path, method):
    """Values are all ``false``: many are wrong types for their option, which is a problem, but never an
    "unknown option" one."""
    options_class = _method_option_classes()[method]
    config = tmp_path / "all.toml"
    config.write_text("".join(f"{name} = false\n" for name in _kohya_options()))
    try:
        load_options(options_class, config, notes=[])
    except ConfigError as exc:
        assert "unknown option" not in str(exc)


def test_options_of_kohya_scripts_sdcore_does_not_cover_are_refused_by_name(tmp_path):
    options_class = _method_option_classes()["lora"]
    config = tmp_path / "lumina.toml"
    config.write_text(
        'gemma2 = "gemma-2-2b.safetensors"\nuse_flash_attn = true\ncond_emb_dim = 0\nconfig_file = "x.toml"\n'
    )
    with pytest.raises(ConfigError) as info:
        load_options(options_class, config, notes=[])
    message = str(info.value)
    assert (
        "gemma2 = 'gemma-2-2b.safetensors' is not supported by sdcore (an option of kohya's Lumina scripts" in message
    )
    assert "use_flash_attn = True" in message
    assert "cond_emb_dim" not in message  # at its off value, as the kohya_ss GUI writes it
    assert "unknown" not in message


def test_config_file_inside_a_config_file_is_a_note(tmp_path):
    options_class = _method_option_classes()["lora"]
    config = tmp_path / "run.toml"
    config.write_text('config_file = "other.toml"\nnetwork_dim = 8\n')
    notes: list[str] = []
    options = load_options(options_class, config, notes=notes)
    assert options.rank == 8
    assert any("config_file inside a config file is not read" in note for note in notes)
