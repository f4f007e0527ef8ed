"""kohya configs with ``network_module = lycoris.kohya``: options a kohya run passes to LyCORIS and LyCORIS never
uses are dropped with a note, so the config trains what kohya trains; sdcore's own flags keep refusing them.

Facts (LyCORIS f49d30d, sd-scripts train_network.py): train_network.py hands ``--network_dropout`` to
``create_network`` as ``neuron_dropout`` (which lycoris/kohya.py does not read) and, when network_args has no
``dropout=``, as ``dropout`` too (its "workaround for LyCORIS"), which lycoris/kohya.py reads. Per module: IA3Module never applies ``drop``/``rank_drop`` nor overrides ``apply_max_norm`` (the base
returns None and ``LycorisNetwork.apply_max_norm_regularization`` skips it); FullModule uses ``rank_dropout`` only;
GLoRA's conv branch never builds a Tucker core and keeps the base ``apply_max_norm``; ButterflyOFTModule has its own
max-norm but no dropout; DiagOFTModule has both dropouts and max-norm but no Tucker core."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from sdcore.errors import ConfigError
from sdcore.testing.contract import make_tiny_dataset
from sdcore.train.config import load_options
from sdplugin_lora.method import LoraMethod, LoraOptions

GUI_PRESETS = Path(__file__).parents[3] / "tests" / "data" / "kohya_ss_gui" / "lora"


def _load(algo: str, *args: str, **top: object) -> tuple[LoraOptions, list[str]]:
    kohya = {"network_module": "lycoris.kohya", "network_args": [f"algo={algo}", *args], **top}
    notes: list[str] = []
    return load_options(LoraOptions, None, kohya=kohya, notes=notes), notes


@pytest.mark.parametrize(
    ("algo", "args", "top", "said"),
    [
        ("ia3", ["dropout=0.2", "rank_dropout=0.1", "use_tucker=True"], {"scale_weight_norms": 1.0},
         "network_args dropout=0.2, network_args rank_dropout=0.1, network_args use_tucker=True, scale_weight_norms 1.0"),
        ("full", ["dropout=0.2", "use_cp=True"], {"scale_weight_norms": 2}, "network_args use_cp=True"),
        ("glora", ["use_conv_cp=True"], {"scale_weight_norms": 1}, "scale_weight_norms 1 with algo=glora"),
        ("diag-oft", ["use_tucker=True"], {}, "network_args use_tucker=True with algo=diag_oft"),
        ("boft", ["dropout=0.1", "rank_dropout=0.3", "use_tucker=True"], {}, "network_args rank_dropout=0.3"),
    ],
)  # fmt: skip
def test_what_lycoris_leaves_unused_is_dropped_with_a_note(algo, args, top, said):
    o, notes = _load(algo, *args, **top)
    assert (o.dropout, o.rank_dropout, o.use_tucker, o.scale_weight_norms) == (None, None, False, None)
    assert any(said in n and "never uses" in n for n in notes), notes
    LoraMethod(o).validate()  # what was refused before now trains, as in kohya


@pytest.mark.parametrize(
    ("algo", "args", "top", "refused"),
    [
        ("full", ["rank_dropout=0.1"], {}, "--rank-dropout with --algo full"),  # FullModule.make_weight uses it
        ("glora", ["dropout=0.1"], {}, "--dropout with --algo glora"),  # GLoRA applies self.drop
        ("diag-oft", ["rank_dropout=0.1"], {}, "--rank-dropout with --algo diag_oft"),
        ("boft", [], {"scale_weight_norms": 1.0}, "--scale-weight-norms with --algo boft"),  # its own apply_max_norm
    ],
)
def test_what_lycoris_uses_stays_refused(algo, args, top, refused):
    o, _ = _load(algo, *args, **top)
    with pytest.raises(ConfigError, match=refused):
        LoraMethod(o).validate()


def test_network_dropout_reaches_lycoris_as_dropout_unless_network_args_gives_one():
    """sd-scripts train_network.py:674-676 ("workaround for LyCORIS", since 025368f): ``net_kwargs["dropout"] =
    args.network_dropout`` when network_args has no ``dropout``, so lycoris.kohya's create_network (LyCORIS f49d30d
    lycoris/kohya.py:44 ``kwargs.get("dropout")``) gets it; network_args ``dropout=`` wins over it."""
    o, notes = _load("locon", network_dropout=0.3)
    assert o.dropout == pytest.approx(0.3)
    assert not any("network_dropout" in n for n in notes)
    o, notes = _load("loha", network_dropout=0.25)  # LoHa applies self.drop too
    assert o.dropout == pytest.approx(0.25)
    o, notes = _load("locon", "dropout=0.2", network_dropout=0.3)  # no "both set" clash: only one reaches LyCORIS
    assert o.dropout == pytest.approx(0.2)
    assert any("network_dropout 0.3" in n and "network_args dropout=0.2" in n for n in notes), notes
    o, notes = _load("ia3", network_dropout=0.3)  # reaches IA3Module as dropout, which never applies it
    assert o.dropout is None
    assert any("network_dropout 0.3 with algo=ia3" in n and "never uses" in n for n in notes), notes
    o, notes = _load("loha", network_dropout=0, scale_weight_norms=1)  # LoHa has its own max-norm: kept
    assert (o.dropout, o.scale_weight_norms) == (None, 1)
    assert not any("network_dropout" in n or "never uses" in n for n in notes)
    # kohya's own networks.lora reads neuron_dropout: kept
    kohya = {"network_module": "networks.lora", "network_dropout": 0.3}
    assert load_options(LoraOptions, None, kohya=kohya, notes=[]).dropout == pytest.approx(0.3)


def test_sdcore_flags_keep_the_refusal():
    with pytest.raises(ConfigError, match="--dropout, --scale-weight-norms with --algo ia3"):
        LoraMethod(LoraOptions(algo="ia3", dropout=0.3, scale_weight_norms=1.0)).validate()


def test_gui_ia3_prodigy_preset_dry_runs(tmp_path, monkeypatch):
    """The kohya_ss GUI preset iA3-Prodigy-sd15 (network_dropout 0.3, scale_weight_norms 1) was refused."""
    import torch
    from sdcore.cli import build_cli
    from sdcore.plugins import get_plugin_manager

    data = json.loads((GUI_PRESETS / "iA3-Prodigy-sd15.json").read_text())
    assert (data["network_dropout"], data["scale_weight_norms"]) == (0.3, 1)
    images = make_tiny_dataset(tmp_path / "data", n=2, size=64)  # data/1_tiny: a kohya folder in it
    data.update(pretrained_model_name_or_path="tiny:sd1", train_data_dir=str(images),
                output_dir=str(tmp_path / "out"), logging_dir="", max_resolution="64,64")  # fmt: skip
    config = tmp_path / "ia3.json"
    config.write_text(json.dumps(data))
    # the preset names no mixed_precision: the GUI's widget runs fp16, which a machine without CUDA refuses
    # before any model loads, the note before saying what to give
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = ["train", "lora", "--config", str(config), "--dry-run"]
    result = CliRunner().invoke(build_cli(get_plugin_manager()), args, catch_exceptions=False)
    assert result.exit_code == 2, result.output
    assert "without one give --mixed-precision no (or bf16)" in result.output
    assert "--mixed-precision fp16 needs a CUDA GPU" in result.output and "model: tiny:sd1" not in result.output
    args.extend(["--mixed-precision", "no"])
    result = CliRunner().invoke(build_cli(get_plugin_manager()), args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "the kohya_ss GUI's own values (its widgets' defaults): enable_bucket True" in result.output
    assert "network_dropout 0.3, scale_weight_norms 1 with algo=ia3" in result.output
