"""kohya train_db.py options on `sdcore train dreambooth` (translated by sdcore.train.kohya)."""

from sdcore.train.config import load_options
from sdplugin_dreambooth.options import DreamBoothOptions


def test_kohya_db_command_line_names():
    notes: list[str] = []
    o = load_options(
        DreamBoothOptions,
        None,
        kohya={
            "pretrained_model_name_or_path": "tiny:sd1",
            "train_data_dir": "data",
            "reg_data_dir": "reg",
            "output_dir": "out",
            "output_name": "db",
            "save_model_as": "diffusers",
            "stop_text_encoder_training": "20",
            "learning_rate": "1e-6",
            "max_train_epochs": "2",
        },
        notes=notes,
    )
    assert (o.model, o.data, o.reg_data, o.output, o.save_format) == ("tiny:sd1", "data", "reg", "out/db", "diffusers")
    assert (o.stop_text_encoder_at, o.lr, o.epochs, o.max_steps) == (20, 1e-6, 2, None)
    # train_db.py trains the text encoder by default, and has no buckets unless --enable_bucket
    assert o.train_text_encoder and not o.buckets
    assert any("text encoder is trained" in n for n in notes)


def test_sdcore_names_keep_sdcore_defaults():
    o = load_options(DreamBoothOptions, None, {"model": "tiny:sd1", "lr": 1e-6})
    assert not o.train_text_encoder and o.buckets


def test_kohya_stop_text_encoder_training_at_or_below_zero_trains_no_text_encoder():
    # train_db.py: train_text_encoder = stop is None or stop >= 0; at 0 `global_step < stop` never holds, so the
    # text encoder gets no gradient either: both train the U-Net only
    for value in ("-1", "0", -1):
        notes: list[str] = []
        kohya = {"pretrained_model_name_or_path": "tiny:sd1", "stop_text_encoder_training": value}
        o = load_options(DreamBoothOptions, None, kohya=kohya, notes=notes)
        assert (o.train_text_encoder, o.stop_text_encoder_at) == (False, None), value
        assert any("the text encoder does not train" in n for n in notes)
