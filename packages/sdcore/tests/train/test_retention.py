"""Disk use by default (issue 17): ``--save-every 10`` without ``--save-limit`` left 29 results and
30 state folders; now the newest 5 intermediate results and 1 state are kept."""

from __future__ import annotations

from runtime_methods import ConvOutMethod
from sdcore.models.tiny import create_tiny_bundle
from sdcore.testing.contract import contract_options
from sdcore.train.loop import train
from sdcore.train.options import DEFAULT_SAVE_LIMIT, TrainOptions
from sdcore.train.state import list_states


def _results(folder):
    return sorted(p.name for p in folder.glob("*.safetensors"))


def test_save_every_10_over_100_steps_keeps_5_results_and_1_state(tmp_path):
    assert TrainOptions().save_limit == DEFAULT_SAVE_LIMIT == 5 and TrainOptions().keep_states == 1
    o = contract_options(ConvOutMethod, tmp_path, {"max_steps": 100, "save_every": 10, "batch_size": 1})
    train(ConvOutMethod(o), bundle=create_tiny_bundle("sd1"))
    out = tmp_path / "run"
    # intermediate saves at 10..90 (9 of them), the newest 5 kept, plus the final result
    assert _results(out) == [f"result-step{s:08d}.safetensors" for s in (50, 60, 70, 80, 90)] + ["result.safetensors"]
    assert [p.name for p in list_states(out / "result-state")] == ["step-00000100"]


def test_flags_keep_more(tmp_path):
    o = contract_options(ConvOutMethod, tmp_path, {"max_steps": 6, "save_every": 2, "save_limit": 0, "keep_states": 2})
    train(ConvOutMethod(o), bundle=create_tiny_bundle("sd1"))
    out = tmp_path / "run"
    assert len(_results(out)) == 3  # steps 2 and 4 plus the final one (0 keeps all)
    assert [p.name for p in list_states(out / "result-state")] == ["step-00000004", "step-00000006"]


def test_resolution_defaults_to_the_models_native_size(tmp_path):
    from sdcore.train.loop import TrainSession

    assert TrainOptions().resolution == 0  # "the model's size"
    o = contract_options(ConvOutMethod, tmp_path, {"max_steps": 1})
    o.resolution, o.min_bucket_reso, o.max_bucket_reso = 0, 256, 1024
    session = TrainSession(ConvOutMethod(o), bundle=create_tiny_bundle("sd1"))
    session.setup()
    assert (o.resolution, o.min_bucket_reso, o.max_bucket_reso) == (64, 64, 1024)
    batch = session.make_batch(session.data.epoch_plan(0)[0])
    assert tuple(batch.latents.shape[-2:]) == (8, 8)  # 64 px images, not 512


def test_a_model_smaller_than_the_bucket_step_takes_its_size_as_the_step():
    """The toy world's 32 px base with every bucket option left at kohya's defaults (step 64) stopped with
    "resolution 32 is smaller than the bucket step 64": a newcomer's first run failed on settings never given."""
    from sdcore.data.buckets import make_buckets
    from sdcore.train.options import apply_model_defaults

    o = TrainOptions(model="toyworld:")
    assert (o.bucket_step, o.min_bucket_reso, o.max_bucket_reso) == (64, 256, 1024)
    assert apply_model_defaults(o)
    assert (o.resolution, o.bucket_step, o.min_bucket_reso, o.max_bucket_reso) == (32, 32, 32, 1024)
    assert make_buckets(o.resolution, min_reso=o.min_bucket_reso, max_reso=o.max_bucket_reso, step=o.bucket_step)
    given = TrainOptions(model="toyworld:", resolution=64)  # a resolution given: the step is the user's to set
    assert apply_model_defaults(given) and given.bucket_step == 64
