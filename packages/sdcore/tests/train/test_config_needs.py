"""A config from another trainer that lacks the model path is completed by ``--model`` on the command line
(``--config``'s help: "flags given here override it"): the translators' "the model to train is needed" is
reported only when the command line does not give the model.

The configs are the peers' own example files in shape: SimpleTuner's FLUX.1 examples name no
``pretrained_model_name_or_path`` (it picks the hub model from the family), and users of an ai-toolkit job or a
diffusers command swap the hub id for a local model with ``--model``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sdcore.errors import ConfigError
from sdcore.testing.datasets import make_tiny_dataset


def _load(path: Path, overrides: dict | None = None):
    from sdcore.train.config import load_options
    from sdplugin_lora.method import LoraOptions

    return load_options(LoraOptions, path, overrides or {}, notes=[])


def _simpletuner(tmp_path: Path) -> Path:
    images = make_tiny_dataset(tmp_path / "d", n=1, size=64) / "1_sks"
    backend = tmp_path / "multidatabackend.json"
    backend.write_text(
        json.dumps([{"id": "s", "type": "local", "instance_data_dir": str(images), "caption_strategy": "textfile",
                     "resolution": 64, "resolution_type": "pixel_area"}]),
        encoding="utf-8",
    )  # fmt: skip
    path = tmp_path / "config.json"
    path.write_text(
        json.dumps({"model_family": "flux", "model_type": "lora", "data_backend_config": str(backend),
                    "max_train_steps": 2, "output_dir": str(tmp_path / "out"), "seed": 1}),
        encoding="utf-8",
    )  # fmt: skip
    return path


def _aitoolkit(tmp_path: Path) -> Path:
    path = tmp_path / "job.json"
    process = {"type": "sd_trainer", "model": {"is_flux": True}, "datasets": [{"folder_path": "imgs"}],
               "network": {"type": "lora", "linear": 16, "linear_alpha": 16},
               "train": {"noise_scheduler": "flowmatch"}}  # fmt: skip
    path.write_text(json.dumps({"job": "extension", "config": {"name": "run", "process": [process]}}), encoding="utf-8")
    return path


def _diffusers(tmp_path: Path) -> Path:
    path = tmp_path / "train.sh"
    path.write_text(
        "accelerate launch train_dreambooth_lora_flux.py --instance_data_dir=dog "
        '--instance_prompt="a photo of sks dog" --output_dir=out --max_train_steps=2\n',
        encoding="utf-8",
    )
    return path


WRITERS = {"simpletuner": _simpletuner, "ai-toolkit": _aitoolkit, "diffusers": _diffusers}


@pytest.mark.parametrize("source", sorted(WRITERS))
def test_a_config_without_a_model_is_refused_and_names_the_cli_option(tmp_path, source):
    with pytest.raises(ConfigError) as info:
        _load(WRITERS[source](tmp_path))
    problems = info.value.problems
    needed = [p for p in problems if "--model" in p]
    assert len(needed) == 1, problems
    assert "name_or_path" in needed[0]


@pytest.mark.parametrize("source", sorted(WRITERS))
def test_model_on_the_command_line_completes_it(tmp_path, source):
    try:
        o = _load(WRITERS[source](tmp_path), {"model": "tiny:flux"})
    except ConfigError as exc:  # other problems of the small file may remain; the model one must not
        assert not [p for p in exc.problems if "--model" in p], exc.problems
    else:
        assert o.model == "tiny:flux"


def test_the_simpletuner_example_shape_loads_with_model_given(tmp_path):
    """The whole file loads (no other problem), and the command line's model is the one trained."""
    o = _load(_simpletuner(tmp_path), {"model": "tiny:flux"})
    assert o.model == "tiny:flux"
    assert o.max_steps == 2
