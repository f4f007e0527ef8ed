"""The contract suite's flow-matching learning check (``check_flow_learning``): its held set is fixed,
its loss is the runtime's flow-matching objective at the same triples, it fails a method that does
not learn enough, and its lr-0 control leaves the loss where it was."""

from __future__ import annotations

import random

import pytest

torch = pytest.importorskip("torch")

from runtime_methods import ConvOutMethod, ProjOutMethod  # noqa: E402
from sdcore.errors import ConfigError  # noqa: E402
from sdcore.testing.contract import (  # noqa: E402
    MethodContractTests,
    check_flow_learning,
    contract_options,
    flow_held_loss,
    flow_held_set,
)
from sdcore.train.data import SampleRef  # noqa: E402
from sdcore.train.loop import TrainSession  # noqa: E402


def _session(tmp_path, family: str, **values):
    method_class = ProjOutMethod if family != "sd1" else ConvOutMethod
    base = {"max_steps": 6, "lr": 1e-2, "batch_size": 4, "save_state": False, **values}
    session = TrainSession(method_class(contract_options(method_class, tmp_path, base, family=family)), bundle=None)
    session.setup()
    return session


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_held_loss_is_the_runtime_objective_at_the_same_triples(tmp_path, family):
    """Two implementations of the loss agree: the check's own rectified-flow formula and the runtime's
    FlowMatchingObjective + Objective.sample_loss, fed the held set's latents, noise and sigma * 1000."""
    session = _session(tmp_path, family)
    held = flow_held_set(session, count=2, sigmas=(0.25, 0.75))
    assert held.latents.shape[0] == held.noise.shape[0] == len(held.captions) == 4
    assert held.sigmas.tolist() == [0.25, 0.75, 0.25, 0.75]
    losses = []
    with torch.no_grad():
        for i, sigma in enumerate(held.sigmas.tolist()):
            batch = session.make_batch([SampleRef(i // 2, 0, -1)], with_conditioning=False)
            assert torch.equal(batch.latents[0].float().cpu(), held.latents[i])
            batch.captions = [session.method.caption_for(session.data.entries[i // 2].caption, is_class=False,
                                                         rng=random.Random(0))]  # fmt: skip
            loss = session.sample_loss(batch, held.noise[i : i + 1], torch.tensor([sigma * 1000.0]), 0)
            losses.append(float(loss.mean()))
    runtime = sum(losses) / len(losses)
    ours = flow_held_loss(session, held)
    assert ours == pytest.approx(runtime, rel=1e-5), (ours, runtime)


def test_the_held_set_does_not_depend_on_the_training_seed(tmp_path):
    a = flow_held_set(_session(tmp_path / "a", "flux", seed=1))
    b = flow_held_set(_session(tmp_path / "b", "flux", seed=2))
    assert torch.equal(a.noise, b.noise) and torch.equal(a.sigmas, b.sigmas) and a.captions == b.captions
    assert a.latents.shape == b.latents.shape == (20, 16, 8, 8)  # 4 images x 5 sigmas, 64 px / 8


def test_a_ddpm_family_is_refused_with_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="flow-matching family"):
        flow_held_set(_session(tmp_path, "sd1"))


def test_the_check_passes_learning_fails_too_little_and_its_lr0_control_stays_put(tmp_path):
    before, after = check_flow_learning(ProjOutMethod, tmp_path / "a", {"lr": 1e-2}, family="flux", steps=10,
                                        min_drop=0.05)  # fmt: skip
    assert after < before * 0.95
    with pytest.raises(AssertionError, match="declares a drop of at least 95%"):
        check_flow_learning(ProjOutMethod, tmp_path / "b", {"lr": 1e-2}, family="flux", steps=10, min_drop=0.95)
    still, same = check_flow_learning(ProjOutMethod, tmp_path / "c", {"lr": 1e-2}, family="flux", steps=10,
                                      untrained=True)  # fmt: skip
    assert still == before and same == still  # lr 0: every step ran, nothing moved, same held set


def test_flow_tests_are_opt_in_and_parametrized_per_class():
    class Plain(MethodContractTests):
        pass

    class OnSd3(MethodContractTests):
        flow_families = ("sd3",)

    class OnBoth(MethodContractTests):
        flow_families = ("sd3", "flux")
        flow_min_drop = {"sd3": 0.1, "flux": 0.2}

    assert not hasattr(Plain, "test_contract_flow_learning") and not hasattr(Plain, "test_contract_flow_untrained")
    for cls, families in ((OnSd3, ("sd3",)), (OnBoth, ("sd3", "flux"))):
        for name in ("test_contract_flow_learning", "test_contract_flow_untrained"):
            (mark,) = [m for m in getattr(cls, name).pytestmark if m.name == "parametrize"]
            assert mark.args == ("flow_family", families), (cls.__name__, name, mark.args)
