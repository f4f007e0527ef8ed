"""Per-dataset strengths (kohya's dataset-TOML ``network_multiplier``) in the data layer and the runtime.

kohya's schema takes ``network_multiplier`` in ``[general]`` and ``[[datasets]]`` (not in a subset);
every sample of the dataset carries it (``batch["network_multipliers"]``) and the network's multiplier
is set from it for the step. sdcore carries it per sample as ``Batch.network_strength`` and lets the
method scale itself inside :meth:`TrainingMethod.network_strength`; a method that cannot is refused in
the pre-flight. The LoRA side (the forward per sample) is tested in sdplugin-lora.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from runtime_methods import ConvOutMethod
from sdcore.data.dataset import load_toml_dataset_config
from sdcore.errors import DataError
from sdcore.models.tiny import create_tiny_bundle
from sdcore.testing.contract import contract_options
from sdcore.testing.datasets import make_tiny_dataset
from sdcore.train.data import SampleRef
from sdcore.train.loop import TrainSession, train
from sdcore.train.method import Capabilities
from sdcore.train.preflight import run_preflight


class StrengthRecorder(ConvOutMethod):
    """ConvOut that declares per-sample strengths and records what the runtime hands it (and whether
    the backward ran inside the block: gradient checkpointing recomputes the forward there)."""

    name = "strength-recorder"

    def __init__(self, options):
        super().__init__(options)
        self.seen: list[list[float]] = []
        self.active: torch.Tensor | None = None
        self.backward_inside: list[bool] = []

    def capabilities(self) -> Capabilities:
        return Capabilities(per_sample_strength=True)

    def prepare(self, bundle):
        groups = super().prepare(bundle)
        weight = bundle.unet.conv_out.weight
        weight.register_hook(lambda grad: self.backward_inside.append(self.active is not None) or grad)
        return groups

    @contextlib.contextmanager
    def network_strength(self, strengths):
        self.seen.append(strengths.tolist())
        previous, self.active = self.active, strengths
        try:
            yield
        finally:
            self.active = previous


def _two_datasets(root, first: float, second: float, *, general: str = ""):
    """A TOML with two datasets of two images each (folders ``a`` and ``b``)."""
    for name in ("a", "b"):
        make_tiny_dataset(root / name, n=2, size=64, concept=name)
    config = root / "data.toml"
    config.write_text(
        f"[general]\n{general}\n"
        f"[[datasets]]\nnetwork_multiplier = {first}\n[[datasets.subsets]]\nimage_dir = 'a/1_a'\n"
        f"[[datasets]]\nnetwork_multiplier = {second}\n[[datasets.subsets]]\nimage_dir = 'b/1_b'\n",
        encoding="utf-8",
    )
    return config


def test_toml_values_reach_the_subsets(tmp_path):
    config = _two_datasets(tmp_path, 1.0, -1.0)
    a, b = load_toml_dataset_config(config)
    assert (a.network_strength, b.network_strength) == (1.0, -1.0)
    # [general] is the default of every dataset; a dataset's own value wins; integers are numbers too
    config.write_text(
        "[general]\nnetwork_multiplier = -0.5\n"
        "[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'a/1_a'\n[[datasets.subsets]]\nimage_dir = 'b/1_b'\n"
        "[[datasets]]\nnetwork_multiplier = 2\n[[datasets.subsets]]\nimage_dir = 'b/1_b'\n",
        encoding="utf-8",
    )
    assert [s.network_strength for s in load_toml_dataset_config(config)] == [-0.5, -0.5, 2.0]
    # a folder dataset (no TOML) trains at 1
    from sdcore.data.dataset import folder_subsets, subset_defaults

    assert {s.network_strength for s in folder_subsets(tmp_path / "a", is_class=False,
                                                       defaults=subset_defaults(None), skipped=[])} == {1.0}  # fmt: skip


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("'x'", r"datasets\[0\]: 'network_multiplier' must be a finite number, got 'x'"),
        ("true", r"'network_multiplier' must be a finite number, got True"),
        ("nan", r"'network_multiplier' must be a finite number, got nan"),
        ("inf", r"'network_multiplier' must be a finite number, got inf"),
    ],
)
def test_bad_values_are_data_errors(tmp_path, value, message):
    (tmp_path / "img").mkdir()
    config = tmp_path / "d.toml"
    config.write_text(
        f"[[datasets]]\nnetwork_multiplier = {value}\n[[datasets.subsets]]\nimage_dir = 'img'\n", encoding="utf-8"
    )
    with pytest.raises(DataError, match=message):
        load_toml_dataset_config(config)


def test_the_key_belongs_to_a_dataset_not_a_subset(tmp_path):
    (tmp_path / "img").mkdir()
    config = tmp_path / "d.toml"
    config.write_text(
        "[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'img'\nnetwork_multiplier = 1.0\n", encoding="utf-8"
    )
    with pytest.raises(DataError, match=r"subsets\[0\]: 'network_multiplier' belongs in a \[\[datasets\]\] or "):
        load_toml_dataset_config(config)


def _session(tmp_path, config, method_class=StrengthRecorder, **kw):
    values = {"data": str(config), "batch_size": 2, "max_bucket_reso": 64, "cache_latents": False}
    values.update(kw)
    o = contract_options(method_class, tmp_path, values)
    s = TrainSession(method_class(o), bundle=create_tiny_bundle("sd1"))
    s.setup()
    return s


def test_each_sample_of_a_batch_carries_its_dataset_strength(tmp_path):
    s = _session(tmp_path, _two_datasets(tmp_path, 1.0, -0.75))
    where = {e.path.parent.name: i for i, e in enumerate(s.data.entries)}
    a, b = where["1_a"], where["1_b"]
    batch = s.make_batch([SampleRef(b, 0, 0), SampleRef(a, 0, 0), SampleRef(b, 0, 1)])
    assert batch.network_strength is not None
    assert batch.network_strength.tolist() == [-0.75, 1.0, -0.75]
    # every sample at 1: no tensor at all, the usual path
    assert s.make_batch([SampleRef(a, 0, 0), SampleRef(a, 0, 1)]).network_strength is None
    # the start-up summary (and the pre-flight plan) names the folders that are not at 1
    assert "  network_multiplier (per sample): 1_b -0.75; every other folder 1" in s.data.index.summary().splitlines()


def test_the_runtime_scales_forward_and_backward(tmp_path):
    config = _two_datasets(tmp_path, 1.0, -1.0)
    o = contract_options(StrengthRecorder, tmp_path, {"data": str(config), "batch_size": 4, "max_steps": 2,
                         "max_bucket_reso": 64, "cache_latents": False})  # fmt: skip
    method = StrengthRecorder(o)
    train(method, bundle=create_tiny_bundle("sd1"))
    # a batch never mixes datasets (kohya batches each [[datasets]] alone): the two images at -1 make one batch,
    # the two at +1 the other (all at 1: no strengths handed over, the usual path)
    assert method.seen and all(seen == [-1.0, -1.0] for seen in method.seen)
    assert sorted(method.backward_inside) == [False, True]  # inside the block for the -1 batch only
    assert method.active is None


def test_a_method_without_per_sample_strengths_gets_a_preflight_problem(tmp_path):
    config = _two_datasets(tmp_path, 1.0, -1.0)
    o = contract_options(ConvOutMethod, tmp_path, {"data": str(config), "max_bucket_reso": 64})
    report = run_preflight(ConvOutMethod(o), o, plan=False)
    wanted = [p for p in report.problems if "network_multiplier other than 1" in p]
    assert len(wanted) == 1, report.problems
    assert "1_b (-1)" in wanted[0] and "'convout' method cannot scale its training per sample" in wanted[0]
    assert "1_a" not in wanted[0]
    # the same method with every dataset at 1, or one that declares the capability: no problem
    plain = _two_datasets(tmp_path, 1.0, 1)
    o = contract_options(ConvOutMethod, tmp_path, {"data": str(plain), "max_bucket_reso": 64}, tag="plain")
    assert not [p for p in run_preflight(ConvOutMethod(o), o, plan=False).problems if "network_multiplier" in p]
    o = contract_options(StrengthRecorder, tmp_path, {"data": str(config), "max_bucket_reso": 64}, tag="cap")
    assert not [p for p in run_preflight(StrengthRecorder(o), o, plan=False).problems if "network_multiplier" in p]


def test_the_base_method_refuses_with_a_config_error(tmp_path):
    from sdcore.errors import ConfigError

    method = ConvOutMethod(contract_options(ConvOutMethod, tmp_path))
    with pytest.raises(ConfigError, match="'convout' method cannot scale its training per sample"):
        with method.network_strength(torch.tensor([1.0, -1.0])):
            pass
