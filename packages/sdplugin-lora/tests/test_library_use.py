"""sdcore driven from Python as an application does (docs/training.md "Using sdcore from Python"):
train a LoRA with progress reported to the app, read its metadata, generate with it; stdout stays the app's."""

from __future__ import annotations

import subprocess
import sys

import pytest
from sdcore import SdcoreError, create_tiny_bundle, load_model
from sdcore.generate.pipeline import generate_images
from sdcore.generate.session import session_from_plugin_manager
from sdcore.plugins import get_plugin_manager
from sdcore.testing.datasets import make_tiny_dataset
from sdcore.train import train
from sdplugin_lora.method import LoraMethod, LoraOptions
from sdplugin_lora.tools import lora_info


class _AppProgress:
    """The app's progress sink: a plain object registered with ``get_plugin_manager(extra=[...])``."""

    def __init__(self):
        self.steps = []
        self.done = None

    @__import__("sdcore").hookimpl
    def sdcore_on_train_step(self, context, step, logs):
        self.steps.append((step, context.total_steps, sorted(logs)))

    @__import__("sdcore").hookimpl
    def sdcore_after_train(self, context, result):
        self.done = result.output


def test_train_read_and_generate_from_python_print_nothing_on_stdout(tmp_path, capsys):
    data = make_tiny_dataset(tmp_path / "data", n=2, size=64)
    app = _AppProgress()
    pm = get_plugin_manager(extra=[app])
    out = tmp_path / "loras" / "mine.safetensors"
    options = LoraOptions(model="tiny:sd1", data=str(data), output=str(out), max_steps=2, rank=4, resolution=64)
    result = train(LoraMethod(options), plugin_manager=pm)

    assert result.output == out and out.is_file() and app.done == out
    assert [s[:2] for s in app.steps] == [(1, 2), (2, 2)]
    assert {"loss", "loss_avg", "lr", "epoch"} <= set(app.steps[0][2])
    info = lora_info(out)
    assert info["family"] == "sd1" and info["ranks"] == {4: info["modules"]}

    bundle = load_model("tiny:sd1")
    networks = session_from_plugin_manager(pm, {"lora_dir": str(out.parent)})
    meta = []
    images = generate_images(
        bundle, ["a castle <lora:mine:0.8>"], steps=1, width=64, height=64, networks=networks, info=meta
    )
    assert images[0].size == (64, 64) and "mine" in meta[0].get("Lora hashes", "")
    with pytest.raises(SdcoreError, match="no handler for <lora:mine"):  # no session: an sdcore error
        generate_images(bundle, ["a castle <lora:mine:0.8>"], steps=1, width=64, height=64)
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_tiny_flow_families_build_and_spell_their_prediction_type_alike(family):
    """``sdcore.create_tiny_bundle`` takes what ``tiny:<family>`` takes, and an app branching on
    ``bundle.prediction_type`` sees one spelling for every flow-matching family."""
    bundle = create_tiny_bundle(family, seed=3)
    assert bundle.family == family and bundle.prediction_type == "flow-matching"
    assert bundle.family_spec.objective == "flow-matching"


@pytest.mark.parametrize(
    ("family", "variant", "message"),
    [("sd9", None, "unknown model family 'sd9'"), ("sd1", "refiner", "unknown variant 'refiner'")],
)
def test_tiny_bundle_errors_are_sdcore_errors(family, variant, message):
    with pytest.raises(SdcoreError, match=message):
        create_tiny_bundle(family, variant=variant)


def test_importing_the_packages_loads_no_torch():
    probe = (
        "import sys, sdcore, sdcore.train, sdcore.plugins, sdplugin_lora, sdplugin_ti, sdplugin_taggers;"
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'numpy') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
