"""kohya's validation loss (``--validation-split`` and friends): the split, the loss, the schedule.

The expected values are written from kohya's documented behaviour (``train_util.split_train_val``,
``train_network.py``'s validation loop), independently of :mod:`sdcore.train.validation`.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from runtime_methods import ConvOutMethod
from sdcore.models.tiny import create_tiny_bundle
from sdcore.testing.contract import contract_options, make_tiny_dataset
from sdcore.train.loop import TrainSession, train
from sdcore.train.noise import sample_seed
from sdcore.train.preflight import PreflightError, validate_options
from sdcore.train.validation import evaluation_mode, kohya_split, validation_timesteps


def _kohya(paths, split, seed):
    """kohya's split_train_val, as its source reads: (training part, validation part)."""
    dataset = list(paths)
    state = random.getstate()
    random.seed(seed)
    random.shuffle(dataset)
    random.setstate(state)
    train_part = dataset[: math.ceil(len(dataset) * (1 - split))]
    val_part = dataset[len(dataset) - round(len(dataset) * split) :]
    return train_part, val_part


@pytest.mark.parametrize(("n", "split", "seed"), [(10, 0.2, 7), (7, 0.3, 1), (25, 0.1, 42), (4, 0.5, 0)])
def test_the_split_is_kohyas(n, split, seed):
    names = [f"img{i:02d}.png" for i in range(n)]
    trained, held = kohya_split(names, split, seed)
    want_train, want_val = _kohya(names, split, seed)
    assert held == want_val
    assert trained == want_train
    assert sorted(trained + held) == names


@pytest.mark.parametrize(("n", "split"), [(3, 0.5), (10, 0.7)])
def test_where_kohyas_parts_overlap_the_held_out_image_does_not_train(n, split):
    names = list(range(n))
    want_train, want_val = _kohya(names, split, 5)
    assert set(want_train) & set(want_val)  # kohya's own rule trains one validation image here
    trained, held = kohya_split(names, split, 5)
    assert held == want_val and not set(trained) & set(held) and len(trained) + len(held) == n


def test_validation_timesteps_are_kohyas_linspace():
    assert validation_timesteps(1000, None, None) == (200, 400, 600, 800)
    # np.linspace(100, 900, 6, dtype=int)[1:-1]: 260, 420, 580, 740
    assert validation_timesteps(1000, 100, 900) == (260, 420, 580, 740)
    assert validation_timesteps(1000, 0, 999) == (199, 399, 599, 799)  # truncation, as numpy's int cast


def _two_subsets(tmp_path):
    root = tmp_path / "data"
    make_tiny_dataset(root, n=5, name="a")
    make_tiny_dataset(root, n=4, repeats=2, name="b")
    return root


def _session(tmp_path, tag="run", **kw):
    o = contract_options(ConvOutMethod, tmp_path, kw, family="sd1", tag=tag)
    s = TrainSession(ConvOutMethod(o), bundle=create_tiny_bundle("sd1"))
    s.setup()
    return s


def test_held_out_per_subset_by_kohyas_rule_and_never_trained(tmp_path):
    data = _two_subsets(tmp_path)
    reg = make_tiny_dataset(tmp_path / "reg", n=3, name="class")
    s = _session(tmp_path, data=str(data), reg_data=str(reg), validation_split=0.4, validation_seed=3, batch_size=1)
    entries = s.data.entries
    held = {entries[i].path for i in s.data.held_out}
    want = set()
    for folder in ("1_a", "2_b"):
        paths = sorted(str(e.path) for e in entries if e.path.parent.name == folder)
        want |= {p for p in _kohya(paths, 0.4, 3)[1]}
    assert {str(p) for p in held} == want
    assert len(held) == 2 + 2  # round(5 * 0.4), round(4 * 0.4)
    assert not any(entries[i].is_class for i in s.data.held_out)  # class images are never held out
    for epoch in range(3):
        used = {ref.entry for batch in s.data.epoch_plan(epoch) for ref in batch}
        assert not used & s.data.held_out
        assert used | s.data.held_out >= {i for i, e in enumerate(entries) if not e.is_class}
    # the validation batches are the held-out images times their repeats
    refs = [ref for batch in s.validation_groups for ref in batch]
    assert sorted({r.entry for r in refs}) == sorted(s.data.held_out)
    assert len(refs) == sum(entries[i].repeats for i in s.data.held_out)
    # deterministic for a seed; another validation seed holds out other images
    again = _session(tmp_path, tag="again", data=str(data), validation_split=0.4, validation_seed=3)
    assert {again.data.entries[i].path for i in again.data.held_out} == held
    other = _session(tmp_path, tag="other", data=str(data), validation_split=0.4, validation_seed=4)
    assert {other.data.entries[i].path for i in other.data.held_out} != held
    # without a validation seed, --seed decides
    by_seed = _session(tmp_path, tag="seed", data=str(data), validation_split=0.4, seed=3)
    assert {by_seed.data.entries[i].path for i in by_seed.data.held_out} == held
    assert by_seed.run_facts().validation_images == sum(entries[i].repeats for i in s.data.held_out)
    assert not {e.path for e in by_seed.run_facts().entries} & held


def test_the_validation_loss_is_the_mean_of_per_sample_losses_at_kohyas_timesteps(tmp_path):
    data = make_tiny_dataset(tmp_path / "six", n=6)
    s = _session(tmp_path, data=str(data), validation_split=0.5, validation_seed=11, batch_size=2)
    held = sorted(s.data.held_out)
    assert len(held) == 3 and s.validation_timesteps == (200, 400, 600, 800)
    bundle, scheduler = s.bundle, s.bundle.noise_scheduler
    losses = []
    with torch.no_grad():
        for i in held:
            batch = s.make_batch([s.validation_groups[0][0].__class__(i, 0, -1)], with_conditioning=False)
            latents = batch.latents.float()
            cond = s.method.encode(bundle, batch.captions).hidden_states
            for t in (200, 400, 600, 800):
                gen = torch.Generator().manual_seed(sample_seed(11, "validation", i, 0, t))
                noise = torch.randn(tuple(latents.shape[1:]), generator=gen)[None]
                steps = torch.tensor([t])
                noisy = scheduler.add_noise(latents, noise, steps)
                pred = bundle.unet(noisy, steps, encoder_hidden_states=cond).sample
                losses.append(float(torch.nn.functional.mse_loss(pred.float(), noise, reduction="mean")))
    # batches of 2 and 1 (3 images, batch size 2): kohya averages the batch means
    sizes = [len(g) for g in s.validation_groups]
    assert sorted(sizes) == [1, 2]
    by_entry = {i: losses[k * 4 : k * 4 + 4] for k, i in enumerate(held)}
    terms = []
    for group in s.validation_groups:
        for j in range(4):
            terms.append(sum(by_entry[ref.entry][j] for ref in group) / len(group))
    want = sum(terms) / len(terms)
    got = s.validate("step")
    assert got == pytest.approx(want, rel=1e-5)
    assert s.validate("step") == got  # the same noise every time
    # max_validation_steps: only the first batch
    one = _session(tmp_path, tag="one", data=str(data), validation_split=0.5, validation_seed=11, batch_size=2,
                   max_validation_steps=1)  # fmt: skip
    first = one.validation_groups[0]
    assert len(one.validation_groups) == 1
    want_one = sum(sum(by_entry[r.entry][j] for r in first) / len(first) for j in range(4)) / 4
    assert one.validate() == pytest.approx(want_one, rel=1e-5)


def test_evaluation_mode_switches_dropout_off_and_back(tmp_path):
    s = _session(tmp_path, validation_split=0.5)
    entered = []

    class Probe:
        def __init__(self, inner):
            self.inner = inner

        def sampling(self, bundle):
            import contextlib

            @contextlib.contextmanager
            def ctx():
                entered.append(True)
                yield {}

            return ctx()

    unet = s.bundle.unet
    unet.train()
    rng = torch.get_rng_state()
    with evaluation_mode(s.bundle, Probe(s.method)):
        assert not any(m.training for m in unet.modules())
        torch.rand(3)  # a draw inside validation does not move the training stream
    assert entered and all(m.training for m in unet.modules())
    assert torch.equal(torch.get_rng_state(), rng)


def test_validation_changes_no_weight(tmp_path):
    """A run that validates every step and epoch trains bit-identical weights to one that never does."""
    results = []
    for tag, extra in (("with", {"validate_every_n_steps": 1}), ("without", {"validate_every_n_epochs": 100})):
        o = contract_options(ConvOutMethod, tmp_path, {"validation_split": 0.5, "batch_size": 1, "max_steps": 5,
                             "flip": True, "noise_offset": 0.05, **extra}, tag=tag)  # fmt: skip
        method = ConvOutMethod(o)
        r = train(method, bundle=create_tiny_bundle("sd1"))
        results.append((method.trainable_state_dict(), r))
    (sa, ra), (sb, rb) = results
    assert ra.losses == rb.losses
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    kinds = [kind for _, kind, _ in ra.validation_losses]
    # 2 training images: steps 1..5 validate; epochs end at steps 2 and 4, and step 5 ends mid-epoch
    assert kinds.count("step") == 5 and kinds.count("epoch") == 3
    assert rb.validation_losses == []
    assert all(math.isfinite(v) for _, _, v in ra.validation_losses)


def test_validation_goes_to_the_step_hook(tmp_path):
    from types import SimpleNamespace

    seen = []
    hooks = SimpleNamespace(
        sdcore_before_train=lambda **kw: None,
        sdcore_after_train=lambda **kw: None,
        sdcore_on_train_error=lambda **kw: None,
        sdcore_on_train_step=lambda context, step, logs: seen.append((step, dict(logs))),
    )
    o = contract_options(ConvOutMethod, tmp_path, {"validation_split": 0.5, "batch_size": 1, "max_steps": 3,
                         "validate_every_n_steps": 3})  # fmt: skip
    r = train(ConvOutMethod(o), bundle=create_tiny_bundle("sd1"), plugin_manager=SimpleNamespace(hook=hooks))
    with_val = {step: logs["val_loss"] for step, logs in seen if "val_loss" in logs}
    # step 2 ends epoch 1 (epoch validation), step 3 validates by steps
    assert with_val == {step: loss for step, _, loss in r.validation_losses} and sorted(with_val) == [2, 3]


def test_validation_goes_to_the_trackers_the_log_and_the_bar(tmp_path, capsys):
    from sdcore.train.progress import Progress

    logged = []

    class Acc:
        is_main_process = True
        num_processes = 1

        def log(self, values, step):
            logged.append((step, values))

    o = contract_options(ConvOutMethod, tmp_path, {"progress": False})
    p = Progress(o, Acc(), name="t")
    p.tracking = True
    p.step(1, 0, 0.5, 1e-4)
    logs = p.validation(1, "epoch", 0.25)
    assert logs == {"loss/validation/epoch_average": 0.25, "loss/validation/epoch_divergence": 0.25 - 0.5}
    assert logged[-1] == (1, logs)
    assert p.val_loss == 0.25
    assert "validation loss at step 1 (epoch): 0.250000" in capsys.readouterr().err
    bar = Progress(contract_options(ConvOutMethod, tmp_path, {"progress": True}, tag="bar"), Acc(), name="t")
    bar.open_bar(total=3, initial=0)
    bar.step(1, 0, 0.5, 1e-4)
    bar.validation(1, "step", 0.125)
    assert bar.postfix["val_loss"] == "0.1250" and "val_loss" in bar.bar.postfix
    bar.close_bar()


def test_preflight_checks_every_validation_and_precision_value(tmp_path):
    o = contract_options(
        ConvOutMethod,
        tmp_path,
        {"validation_split": 1.0, "validate_every_n_steps": 0, "max_validation_steps": -1, "full_bf16": True},
    )
    with pytest.raises(PreflightError) as info:
        validate_options(o)
    text = str(info.value)
    for part in (
        "--validation-split must be in [0, 1)",
        "--validate-every-n-steps must be at least 1 when given, got 0",
        "--max-validation-steps must be 0 or more when given, got -1",
        "--full-bf16 needs --mixed-precision bf16",
    ):
        assert part in text, text
    o = contract_options(ConvOutMethod, tmp_path, {"validate_every_n_epochs": 2})
    with pytest.raises(PreflightError, match="--validate-every-n-epochs needs held-out images"):
        validate_options(o)
    o = contract_options(ConvOutMethod, tmp_path, {"full_bf16": True, "full_fp16": True, "mixed_precision": "bf16"})
    with pytest.raises(PreflightError, match="contradict"):
        validate_options(o)
    if not torch.cuda.is_available():
        o = contract_options(ConvOutMethod, tmp_path, {"full_fp16": True, "mixed_precision": "fp16"})
        with pytest.raises(PreflightError, match="--full-fp16 needs a CUDA GPU"):
            validate_options(o)
    validate_options(contract_options(ConvOutMethod, tmp_path, {"validation_split": 0.2, "validate_every_n_steps": 5}))
    validate_options(contract_options(ConvOutMethod, tmp_path, {"full_bf16": True, "mixed_precision": "bf16"}))


def test_a_dataset_toml_sets_the_split(tmp_path):
    from sdcore.errors import SdcoreError

    data = make_tiny_dataset(tmp_path / "d", n=4)
    toml = tmp_path / "ds.toml"
    toml.write_text(
        f'[general]\nvalidation_seed = 9\n[[datasets]]\nvalidation_split = 0.5\n'
        f'[[datasets.subsets]]\nimage_dir = "{data / "1_tiny"}"\n',
        encoding="utf-8",
    )  # fmt: skip
    # validate_every_n_steps is fine: the TOML holds images out
    validate_options(contract_options(ConvOutMethod, tmp_path, {"data": str(toml), "validate_every_n_steps": 2}))
    s = _session(tmp_path, tag="toml", data=str(toml))
    paths = sorted(str(e.path) for e in s.data.entries)
    assert {str(s.data.entries[i].path) for i in s.data.held_out} == set(_kohya(paths, 0.5, 9)[1])
    toml.write_text(
        f'[[datasets]]\nvalidation_split = 1.0\n[[datasets.subsets]]\nimage_dir = "{data / "1_tiny"}"\n',
        encoding="utf-8",
    )
    with pytest.raises(SdcoreError, match=r"'validation_split' must be a fraction in \[0, 1\)"):
        _session(tmp_path, tag="bad", data=str(toml))


def test_kohya_names_translate():
    from sdcore.train.kohya import translate

    t = translate(
        {"validation_split": 0.1, "validation_seed": 3, "validate_every_n_steps": 0, "validate_every_n_epochs": 2,
         "max_validation_steps": 5, "full_bf16": True},
        fields={"validation_split", "validation_seed", "validate_every_n_steps", "validate_every_n_epochs",
                "max_validation_steps", "full_bf16", "full_fp16"},
        where="test",
    )  # fmt: skip
    assert not t.problems, t.problems
    assert t.values["validation_split"] == 0.1 and t.values["validation_seed"] == 3
    assert t.values.get("validate_every_n_steps") is None  # kohya_ss writes 0 for "unset"
    assert t.values["validate_every_n_epochs"] == 2 and t.values["max_validation_steps"] == 5
    assert t.values["full_bf16"] is True


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_flow_families_validate_at_sigma_t_over_1000(tmp_path, family):
    """SD3/Flux: kohya's fixed timesteps become sigmas t / 1000 (as its SD3 script's min = max range
    makes them): noisy = (1 - s) x + s noise, target noise - x, with the validation noise."""
    from runtime_methods import ProjOutMethod

    o = contract_options(ProjOutMethod, tmp_path, {"validation_split": 0.5, "validation_seed": 2, "batch_size": 1,
                         "save_state": False}, family=family)  # fmt: skip
    s = TrainSession(ProjOutMethod(o), bundle=None)
    s.setup()
    seen = []

    def compute_loss(ctx):
        seen.append((ctx.timesteps.clone(), ctx.noisy_latents.clone(), ctx.target.clone(), ctx.batch))
        return None

    s.method.compute_loss = compute_loss
    loss = s.validate()
    assert loss is not None and math.isfinite(loss)
    assert [float(t[0]) for t, *_ in seen] == [200.0, 400.0, 600.0, 800.0] * len(s.validation_groups)
    for k, (t, noisy, target, batch) in enumerate(seen):
        ref = s.validation_groups[k // 4][0]
        gen = torch.Generator().manual_seed(sample_seed(2, "validation", ref.entry, ref.occurrence, int(t[0])))
        x = batch.latents.float()
        noise = torch.randn(tuple(x.shape[1:]), generator=gen)[None]
        sigma = float(t[0]) / 1000
        assert torch.allclose(noisy, (1 - sigma) * x + sigma * noise, atol=1e-6)
        assert torch.allclose(target, noise - x, atol=1e-6)


@pytest.mark.parametrize("verify", [True, False])
def test_the_preflight_plans_without_the_held_out_images(tmp_path, verify):
    from sdcore.train.preflight import run_preflight

    o = contract_options(ConvOutMethod, tmp_path, {"validation_split": 0.5, "batch_size": 1, "max_steps": None,
                         "epochs": 1})  # fmt: skip
    report = run_preflight(ConvOutMethod(o), o, verify_images=verify)
    assert report.total_steps == 2 and len(report.data.held_out) == 2, report.problems
    assert "validation: 2 images (2 with repeats) held out, never trained" in report.plan_lines()
    every = contract_options(ConvOutMethod, tmp_path, {"validation_split": 0.9}, tag="every")
    report = run_preflight(ConvOutMethod(every), every, verify_images=verify)
    assert any("the validation split holds out every training image" in p for p in report.problems)
