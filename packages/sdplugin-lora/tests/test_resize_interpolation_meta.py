"""kohya's ``ss_resize_interpolation``: the run-wide ``--resize_interpolation`` as ``str()`` writes it."""

from sdcore.train.method import SaveInfo
from sdplugin_lora.method import LoraOptions, kohya_training_metadata


def test_resize_interpolation_is_recorded_as_kohya_does(tmp_path):
    info = SaveInfo(path=tmp_path / "x.safetensors", step=1, epoch=0, metadata={}, final=False)
    assert kohya_training_metadata(LoraOptions(), info)["ss_resize_interpolation"] == "None"
    meta = kohya_training_metadata(LoraOptions(resize_interpolation="lanczos"), info)
    assert meta["ss_resize_interpolation"] == "lanczos"
