"""kohya train_textual_inversion.py options on `sdcore train ti` (translated by sdcore.train.kohya)."""

import pytest
from sdcore.errors import ConfigError
from sdcore.train.config import load_options
from sdplugin_ti.method import TIOptions


def test_kohya_ti_config(tmp_path):
    cfg = tmp_path / "ti.toml"
    cfg.write_text(
        '[model_arguments]\npretrained_model_name_or_path = "tiny:sd1"\n'
        '[ti]\ntoken_string = "mychar"\ninit_word = "girl"\nnum_vectors_per_token = 4\nuse_object_template = true\n'
        '[training_arguments]\noutput_dir = "out"\noutput_name = "mychar"\nsave_model_as = "safetensors"\n'
        "max_train_steps = 100\nlearning_rate = 5e-3\n",
        encoding="utf-8",
    )
    o = load_options(TIOptions, cfg, notes=[])
    assert (o.name, o.init_text, o.vectors, o.template) == ("mychar", "girl", 4, "subject")
    # the A1111 .pt is always written; kohya's safetensors choice becomes the extra format
    assert (o.output, o.format, o.max_steps, o.lr) == ("out/mychar.pt", "safetensors", 100, 5e-3)


def test_lora_options_are_refused_by_name(tmp_path):
    cfg = tmp_path / "ti.toml"
    cfg.write_text("network_dim = 4\nnetwork_module = 'networks.lora'\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"network_dim is not an option of this method \(kohya's lora option\)"):
        load_options(TIOptions, cfg)
