"""kohya's save bookkeeping: save_last_n_steps(_state), save_last_n_epochs(_state) and save_n_epoch_ratio
mean in sdcore what they mean in sd-scripts (library/train_util.py, train_network.py)."""

from __future__ import annotations

import dataclasses
import math

import pytest
from runtime_methods import ConvOutMethod, ConvOutOptions
from sdcore.models.tiny import create_tiny_bundle
from sdcore.testing.contract import contract_options
from sdcore.train.checkpoints import epoch_save_interval
from sdcore.train.kohya import steps_window, translate
from sdcore.train.loop import train
from sdcore.train.preflight import option_problems, planned_saves


def _fields() -> list[str]:
    return [f.name for f in dataclasses.fields(ConvOutOptions)]


def _kohya_survivors(last_n: int, every: int, until: int) -> list[int]:
    """sd-scripts' step retention replayed: a save at every multiple of ``every``; after each, the save
    of step ``t - last_n - 1`` rounded down to a multiple of ``every`` is deleted (get_remove_step_no)."""
    kept: list[int] = []
    for t in range(every, until + 1, every):
        kept.append(t)
        gone = t - last_n - 1
        gone -= gone % every
        if gone in kept:
            kept.remove(gone)
    return kept


@pytest.mark.parametrize(("last_n", "every"), [(30, 10), (25, 10), (10, 10), (5, 10), (7, 2), (1, 1), (100, 7)])
def test_step_window_is_what_kohya_keeps(last_n, every):
    survivors = _kohya_survivors(last_n, every, until=every * 40)
    assert len(survivors) == steps_window(last_n, every)
    # kohya's own comment: every 10, last 30 -> at step 50 the saves of steps 20..50 remain
    assert _kohya_survivors(30, 10, until=50) == [20, 30, 40, 50]


def test_translation_of_retention_options():
    def tr(**items):
        out = translate(items, _fields(), where="cfg")
        assert not out.problems
        return out

    assert tr(save_every_n_steps=10, save_last_n_steps=30).values["save_limit"] == 4
    assert tr(save_every_n_epochs=1, save_last_n_epochs=3).values["save_limit"] == 3
    # step and epoch saves both pruned: the two windows add up (kohya prunes them apart)
    weights = tr(save_every_n_steps=10, save_last_n_steps=30, save_every_n_epochs=1, save_last_n_epochs=3)
    assert weights.values["save_limit"] == 4 + 3
    # without epoch saves kohya's save_last_n_epochs prunes nothing
    assert tr(save_every_n_steps=10, save_last_n_steps=30, save_last_n_epochs=3).values["save_limit"] == 4
    states = tr(save_state=True, save_every_n_steps=10, save_last_n_steps_state=30)
    assert states.values["keep_states"] == 4 and "save_limit" not in states.values
    # the state windows default to the weights' ones (kohya: "overrides --save_last_n_steps")
    assert tr(save_state=True, save_every_n_steps=10, save_last_n_steps=25).values["keep_states"] == 3
    assert tr(save_state=True, save_every_n_epochs=2, save_last_n_epochs_state=3).values["keep_states"] == 3
    assert tr(save_state=True, save_every_n_epochs=1, save_last_n_epochs=2).values["keep_states"] == 2
    # two windows (step and epoch saves) add up
    both = tr(save_state=True, save_every_n_steps=5, save_last_n_steps_state=10, save_every_n_epochs=1,
              save_last_n_epochs_state=2)  # fmt: skip
    assert both.values["keep_states"] == 3 + 2
    # save_state without a window keeps every state, as kohya
    open_window = tr(save_state=True, save_every_n_epochs=1)
    assert open_window.values["keep_states"] == 0 and any("every state is kept" in n for n in open_window.notes)
    # without save_state kohya writes no intermediate states: nothing to translate
    none = tr(save_last_n_steps_state=3, save_every_n_steps=1)
    assert "keep_states" not in none.values
    assert none.notes == ["save_last_n_steps_state without save_state: no states to prune (as in kohya)"]
    # untouched kohya_ss GUI fields
    assert tr(save_state=True, save_last_n_steps_state=0, save_last_n_epochs_state=0).values == {"save_state": True}
    assert tr(save_n_epoch_ratio=4).values == {"save_n_epoch_ratio": 4}
    assert not tr(save_n_epoch_ratio=0).values.get("save_n_epoch_ratio")  # kohya: only a ratio above 0


@pytest.mark.parametrize(("epochs", "ratio", "every"), [(10, 5, 2), (10, 3, 3), (4, 5, 1), (7, 2, 3), (1, 1, 1)])
def test_epoch_ratio_formula(tmp_path, epochs, ratio, every):
    o = contract_options(ConvOutMethod, tmp_path, {"save_n_epoch_ratio": ratio, "save_every_epochs": 9})
    steps_per_epoch = 3
    assert epoch_save_interval(o, epochs * steps_per_epoch, steps_per_epoch) == every
    assert every == (math.floor(epochs / ratio) or 1)  # kohya's expression, as written in train_network.py
    # and from max steps, kohya's epochs are ceil(steps / steps per epoch)
    assert epoch_save_interval(o, epochs * steps_per_epoch - 1, steps_per_epoch) == every
    o.save_n_epoch_ratio = None
    assert epoch_save_interval(o, epochs * steps_per_epoch, steps_per_epoch) == 9


def test_ratio_must_be_positive(tmp_path):
    o = contract_options(ConvOutMethod, tmp_path, {"save_n_epoch_ratio": 0})
    assert any("--save-n-epoch-ratio must be at least 1" in p for p in option_problems(o))


def test_epoch_ratio_run_saves_where_kohya_does(tmp_path):
    # 4 images, batch 2: 2 steps an epoch; 5 epochs, ratio 2 -> every floor(5/2) = 2 epochs: 2 and 4
    o = contract_options(
        ConvOutMethod,
        tmp_path,
        {"max_steps": None, "epochs": 5, "save_n_epoch_ratio": 2, "save_every_epochs": 1, "save_state": False},
    )
    result = train(ConvOutMethod(o), bundle=create_tiny_bundle("sd1"))
    names = sorted(p.name for p in result.output.parent.glob("*.safetensors"))
    assert names == ["result-000002.safetensors", "result-000004.safetensors", "result.safetensors"]
    assert planned_saves(o, 10, 2) == (2, 0)


def test_kohya_state_window_prunes_the_run(tmp_path):
    # kohya: a state every step, the states of the last 2 steps kept -> 3 state folders at any time
    out = translate({"save_state": True, "save_every_n_steps": 1, "save_last_n_steps_state": 2}, _fields(), where="cfg")
    assert out.values["keep_states"] == 3
    o = contract_options(ConvOutMethod, tmp_path, {**out.values, "max_steps": 6, "save_limit": 0})
    result = train(ConvOutMethod(o), bundle=create_tiny_bundle("sd1"))
    states = sorted(p.name for p in result.state_dir.iterdir() if p.name.startswith("step-"))
    assert states == ["step-00000004", "step-00000005", "step-00000006"]
    assert _kohya_survivors(2, 1, until=6) == [4, 5, 6]
    assert planned_saves(o, 6, 2) == (5, 3)
