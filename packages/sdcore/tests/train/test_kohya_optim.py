"""kohya's optimizers and LR schedules: every name, class paths, the schedules' formulas (written
here from transformers'/diffusers' documented definitions), kohya's option translation, the
pre-flight's problems, ``ss_optimizer`` and schedule-free train/eval modes in the runtime."""

import dataclasses
import importlib.util
import math
import sys
import types

import pytest
import torch
from runtime_methods import ConvOutMethod, ConvOutOptions
from safetensors.torch import load_file
from sdcore.errors import ConfigError
from sdcore.models.tiny import create_tiny_bundle
from sdcore.testing.contract import contract_options
from sdcore.train.config import load_options
from sdcore.train.loop import TrainSession
from sdcore.train.optim import (
    OPTIMIZER_TABLE,
    OptimizerModes,
    create_optimizer,
    optimizer_metadata,
    optimizer_notes,
    optimizer_problems,
    schedule_length_problems,
    scheduler_for,
    scheduler_metadata,
)
from sdcore.train.preflight import option_problems

N = 40  # steps of every schedule below


def _options(**kw):
    return ConvOutOptions(**{"model": "tiny:sd1", "data": "d", "output": "o.safetensors", "lr": 1.0, **kw})


def _rates(options, steps=N):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=options.lr)
    sched = scheduler_for(options, opt, total_steps=steps)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def _same(actual, expected):
    assert len(actual) == len(expected)
    for step, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert a == pytest.approx(e, abs=1e-12), f"step {step}: {a} != {e}"


# ------------------------------------------------------------------------------------------------
# schedules: the rate at every step equals the documented formula


def test_cosine_with_restarts_has_hard_restarts_per_cycle():
    w, cycles = 4, 3

    def rate(s):
        if s < w:
            return s / w
        progress = (s - w) / (N - w)
        return 0.5 * (1 + math.cos(math.pi * ((cycles * progress) % 1.0)))

    rates = _rates(_options(lr_scheduler="cosine_with_restarts", lr_warmup_steps=w, lr_cycles=cycles))
    _same(rates, [rate(s) for s in range(N)])
    assert rates[w + 12] == pytest.approx(1.0)  # a restart: (40-4)/3 = 12 steps per cycle


def test_cosine_with_min_lr_halves_the_cycles_and_floors_at_the_ratio():
    w, floor = 5, 0.1

    def rate(s):
        if s < w:
            return s / w
        progress = (s - w) / (N - w)
        return 0.5 * (1 + math.cos(math.pi * progress)) * (1 - floor) + floor  # kohya: num_cycles 1/2

    _same(_rates(_options(lr_scheduler="cosine_with_min_lr", lr_warmup_steps=w, lr_min_ratio=floor)),
          [rate(s) for s in range(N)])  # fmt: skip


def test_warmup_stable_decay_with_ratio_steps():
    # warmup 10% and decay 25% of 40 steps (kohya's ratios below 1), stable the rest, floor 0.2
    w, d, floor = 4, 10, 0.2
    stable = N - w - d

    def rate(s):
        if s < w:
            return (s / w) * (1 - floor) + floor
        if s < w + stable:
            return 1.0
        progress = (s - w - stable) / d
        return 0.5 * (1 + math.cos(math.pi * progress)) * (1 - floor) + floor

    o = _options(lr_scheduler="warmup_stable_decay", lr_warmup_steps=0.1, lr_decay_steps=0.25, lr_min_ratio=floor)
    _same(_rates(o), [rate(s) for s in range(N)])


@pytest.mark.parametrize(("timescale", "expected_scale"), [(None, 6), (20, 20)])
def test_inverse_sqrt_timescale_defaults_to_the_warmup(timescale, expected_scale):
    w = 6

    def rate(s):
        if s < w:
            return s / w
        return 1 / math.sqrt((s + expected_scale - w) / expected_scale)

    _same(_rates(_options(lr_scheduler="inverse_sqrt", lr_warmup_steps=w, lr_timescale=timescale)),
          [rate(s) for s in range(N)])  # fmt: skip


def test_piecewise_constant_from_step_rules():
    o = _options(lr_scheduler="piecewise_constant", lr_scheduler_args="step_rules=1:10,0.1:20,0.01")
    _same(_rates(o), [1.0 if s < 10 else 0.1 if s < 20 else 0.01 for s in range(N)])


def test_linear_with_a_warmup_ratio_and_polynomial_power():
    w = 10  # 0.25 x 40

    def linear(s):
        return s / w if s < w else (N - s) / (N - w)

    _same(_rates(_options(lr_scheduler="linear", lr_warmup_steps=0.25)), [linear(s) for s in range(N)])

    end, power = 1e-7, 2.0  # transformers' polynomial decays to lr_end = 1e-7

    def poly(s):
        if s < 4:
            return s / 4
        return (1.0 - end) * (1 - (s - 4) / (N - 4)) ** power + end

    _same(_rates(_options(lr_scheduler="polynomial", lr_warmup_steps=4, lr_power=power)), [poly(s) for s in range(N)])


def test_scheduler_class_with_args():
    o = _options(lr_scheduler_type="CosineAnnealingLR", lr_scheduler_args="T_max=10 eta_min=0.1")
    expected = [0.1 + 0.9 * (1 + math.cos(math.pi * s / 10)) / 2 for s in range(11)]
    rates = _rates(o, steps=11)
    for a, e in zip(rates, expected, strict=True):
        assert a == pytest.approx(e, abs=1e-9)
    dotted = _rates(dataclasses.replace(o, lr_scheduler_type="torch.optim.lr_scheduler.CosineAnnealingLR"), steps=11)
    assert dotted == rates


def test_schedule_free_optimizers_get_no_schedule():
    pytest.importorskip("schedulefree")
    o = _options(optimizer="AdamWScheduleFree", lr_scheduler="cosine", lr_warmup_steps=5)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = create_optimizer(o.optimizer, [{"params": [p]}], lr=0.5)
    sched = scheduler_for(o, opt, total_steps=20)
    for _ in range(5):
        p.grad = torch.ones(1)
        opt.step()
        sched.step()
        assert opt.param_groups[0]["lr"] == 0.5  # kohya's dummy scheduler: the rate stays --lr
    notes = "\n".join(optimizer_notes(o))
    assert "schedule-free" in notes and "warmup_steps=N" in notes


# ------------------------------------------------------------------------------------------------
# optimizers


def test_every_table_name_builds_its_class_with_kohyas_arguments():
    for name, spec in OPTIMIZER_TABLE.items():
        top = spec.module.split(".")[0]
        if importlib.util.find_spec(top) is None:  # bitsandbytes: covered by the pre-flight test below
            continue
        p = torch.nn.Parameter(torch.ones(3))
        opt = create_optimizer(name, [{"params": [p]}], lr=1.0 if spec.adaptive_lr else 0.1)
        module, _, cls = spec.cls.partition(":")
        assert type(opt).__name__ == cls, name
        assert type(opt) is getattr(importlib.import_module(module), cls)
        for _ in range(6):  # RAdam's rectification makes its first steps plain momentum-free ones (or none)
            opt.zero_grad()
            (p**2).sum().backward()
            opt.step()
        assert not torch.equal(p.detach(), torch.ones(3)), name
    nesterov = create_optimizer("SGDNesterov", [{"params": [torch.nn.Parameter(torch.ones(1))]}], lr=0.1)
    assert nesterov.defaults["nesterov"] is True and nesterov.defaults["momentum"] == 0.9
    given = create_optimizer(
        "sgdnesterov", [{"params": [torch.nn.Parameter(torch.ones(1))]}], lr=0.1, args="momentum=0.5"
    )
    assert given.defaults["momentum"] == 0.5


def test_sgdnesterov_step_is_nesterov_momentum():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = create_optimizer("sgdnesterov", [{"params": [p]}], lr=0.1)
    x, buf = p.detach().clone(), torch.zeros(2)
    for _ in range(3):
        opt.zero_grad()
        (p**2).sum().backward()
        g = 2 * x
        buf = g if not buf.any() else 0.9 * buf + g
        x = x - 0.1 * (g + 0.9 * buf)
        opt.step()
        assert torch.allclose(p.detach(), x)


def test_class_paths_and_torch_names():
    p = [{"params": [torch.nn.Parameter(torch.ones(2))]}]
    assert type(create_optimizer("RAdam", p, lr=0.1)) is torch.optim.RAdam
    assert type(create_optimizer("torch.optim.NAdam", p, lr=0.1)) is torch.optim.NAdam
    if importlib.util.find_spec("prodigyplus") is not None:
        opt = create_optimizer("prodigyplus.ProdigyPlusScheduleFree", p, lr=1.0)
        assert type(opt).__name__ == "ProdigyPlusScheduleFree"


def test_adafactor_relative_step_as_kohya():
    groups = [{"params": [torch.nn.Parameter(torch.ones(4, 4))], "lr": 1e-4} for _ in range(2)]
    notes = []
    opt = create_optimizer("adafactor", groups, lr=1e-3, args="relative_step=True", say=notes.append)
    assert opt.defaults["lr"] is None and all(g["lr"] is None for g in opt.param_groups)  # the groups' 1e-4 dropped
    assert any("per-group learning rates" in n for n in notes)
    o = _options(optimizer="adafactor", optimizer_args="relative_step=True", lr_scheduler="cosine", lr=1e-3)
    sched = scheduler_for(o, opt, total_steps=10)
    from transformers.optimization import AdafactorSchedule

    assert isinstance(sched, AdafactorSchedule)
    assert scheduler_metadata(o) == "adafactor:0.001"
    # warmup_init needs relative_step: kohya turns it on
    opt = create_optimizer("adafactor", [{"params": [torch.nn.Parameter(torch.ones(2))]}], lr=1e-3,
                           args="relative_step=False warmup_init=True")  # fmt: skip
    assert opt.defaults["relative_step"] is True
    # sdcore's own default: a fixed rate
    fixed = create_optimizer("adafactor", [{"params": [torch.nn.Parameter(torch.ones(2))]}], lr=1e-3)
    assert fixed.defaults["relative_step"] is False and fixed.defaults["lr"] == 1e-3


def test_dadapt_low_learning_rate_advice():
    pytest.importorskip("dadaptation")
    notes = []
    groups = [
        {"params": [torch.nn.Parameter(torch.ones(2))], "lr": 1e-4},
        {"params": [torch.nn.Parameter(torch.ones(2))], "lr": 1.0},
    ]
    create_optimizer("DAdaptAdam", groups, lr=1.0, say=notes.append)
    assert any("about 1.0" in n for n in notes) and any("only the first (0.0001)" in n for n in notes)


def test_ss_optimizer_is_module_class_with_kohyas_arguments():
    assert optimizer_metadata("adamw") == "torch.optim.adamw.AdamW"
    assert (
        optimizer_metadata("AdamW", "weight_decay=0.1 betas=0.9,0.99")
        == "torch.optim.adamw.AdamW(weight_decay=0.1,betas=(0.9, 0.99))"
    )
    assert optimizer_metadata("sgdnesterov") == "torch.optim.sgd.SGD(momentum=0.9)"
    assert (
        optimizer_metadata("adafactor", "relative_step=True")
        == "transformers.optimization.Adafactor(relative_step=True)"
    )
    assert optimizer_metadata("RAdam") == "torch.optim.radam.RAdam"
    # not installed: the table's class path
    if importlib.util.find_spec("bitsandbytes") is None:
        assert optimizer_metadata("pagedadamw8bit") == "bitsandbytes.optim.PagedAdamW8bit"


# ------------------------------------------------------------------------------------------------
# kohya translation


def test_kohya_toml_translates_optimizers_and_schedules(tmp_path):
    cfg = tmp_path / "k.toml"
    cfg.write_text(
        """
pretrained_model_name_or_path = "tiny:sd1"
optimizer_type = "AdaFactor"
optimizer_args = ["scale_parameter=False"]
lr_scheduler = "warmup_stable_decay"
lr_warmup_steps = 0.05
lr_decay_steps = 0.2
lr_scheduler_num_cycles = 2
lr_scheduler_min_lr_ratio = 0.1
lr_scheduler_timescale = 50
lr_scheduler_type = "CosineAnnealingLR"
lr_scheduler_args = ["T_max=100", "eta_min=0.01"]
""",
        encoding="utf-8",
    )
    o = load_options(ConvOutOptions, cfg)
    assert (o.optimizer, o.optimizer_args) == ("adafactor", "scale_parameter=False relative_step=True")
    assert (o.lr_scheduler, o.lr_warmup_steps, o.lr_decay_steps) == ("warmup_stable_decay", 0.05, 0.2)
    assert (o.lr_cycles, o.lr_min_ratio, o.lr_timescale) == (2, 0.1, 50)
    assert (o.lr_scheduler_type, o.lr_scheduler_args) == ("CosineAnnealingLR", "T_max=100 eta_min=0.01")
    for given, expected in [
        ("PagedAdamW8bit", "pagedadamw8bit"),
        ("DAdaptation", "dadaptation"),
        ("DAdaptAdanIP", "dadaptadanip"),
        ("SGDNesterov8bit", "sgdnesterov8bit"),
        ("AdamWScheduleFree", "adamwschedulefree"),
        ("prodigyplus.ProdigyPlusScheduleFree", "prodigyplus.ProdigyPlusScheduleFree"),
        ("came_pytorch.CAME", "came_pytorch.CAME"),
    ]:
        cfg.write_text(f'optimizer_type = "{given}"\n', encoding="utf-8")
        assert load_options(ConvOutOptions, cfg).optimizer == expected
    for name in ("Cosine_With_Restarts", "cosine_with_min_lr", "warmup_stable_decay", "inverse_sqrt",
                 "piecewise_constant", "adafactor", "polynomial", "constant_with_warmup"):  # fmt: skip
        cfg.write_text(f'lr_scheduler = "{name}"\n', encoding="utf-8")
        assert load_options(ConvOutOptions, cfg).lr_scheduler == name.lower()


def test_kohya_constant_schedule_with_warmup_is_noted(tmp_path):
    cfg = tmp_path / "k.toml"
    cfg.write_text("lr_warmup_steps = 10\n", encoding="utf-8")
    notes: list[str] = []
    o = load_options(ConvOutOptions, cfg, notes=notes)
    assert o.lr_warmup_steps == 10 and any("kohya refuses it" in n for n in notes)
    cfg.write_text('lr_scheduler = "cosine"\nlr_warmup_steps = 10\n', encoding="utf-8")
    notes = []
    load_options(ConvOutOptions, cfg, notes=notes)
    assert not any("kohya refuses it" in n for n in notes)


def test_kohya_warmup_given_on_the_command_line(tmp_path):
    from sdcore.train.kohya import ALIASES

    convert = ALIASES["lr_warmup_steps"].convert
    assert convert("0.1") == 0.1 and convert("10%") == 0.1 and convert("100") == 100 and convert(0.25) == 0.25
    for bad in ("1.5", "-3", 2.0):
        with pytest.raises(ValueError):
            convert(bad)


# ------------------------------------------------------------------------------------------------
# pre-flight: one clear problem each


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"optimizer": "nosuchpkg.Opt"}, "cannot import module 'nosuchpkg'"),
        ({"optimizer": "came_pytorch.CAME"}, "pip install came-pytorch"),
        ({"optimizer": "torch.nn.Linear"}, "is not an optimizer class"),
        ({"optimizer": "torch.optim.NoSuch"}, "has no 'NoSuch'"),
        ({"optimizer": "adam"}, "--optimizer 'adam' is unknown"),
        ({"lr_scheduler": "cosine_with_min_lr"}, "needs --lr-min-ratio"),
        ({"lr_scheduler": "piecewise_constant"}, "needs --lr-scheduler-args step_rules="),
        ({"lr_scheduler": "adafactor"}, "needs --optimizer adafactor with --optimizer-args relative_step=True"),
        ({"lr_scheduler_type": "NoSuchLR"}, "torch.optim.lr_scheduler has no such class"),
        ({"lr_scheduler_type": "torch.optim.SGD"}, "is not a scheduler class"),
        ({"lr_scheduler_type": "StepLR", "lr_scheduler_args": "step_size=5", "lr_warmup_steps": 3}, "has no warmup"),
        ({"lr_scheduler_type": "StepLR"}, "step_size"),
        ({"lr_scheduler": "warmup_stable_decay", "lr_warmup_steps": 600, "lr_decay_steps": 600}, "exceed the run's"),
        ({"lr_scheduler": "cosine", "lr_scheduler_args": "bogus=1"}, "bogus"),
        ({"lr_warmup_steps": 2.5}, "--lr-warmup-steps must be a step count or a ratio"),
        ({"lr_scheduler": "cosine_with_restarts", "lr_cycles": 0}, "--lr-cycles must be at least 1"),
    ],
)
def test_preflight_reports_one_clear_problem(overrides, message):
    o = dataclasses.replace(_options(), max_steps=1000, **overrides)
    problems = optimizer_problems(o)
    assert len(problems) == 1, problems
    assert message in problems[0]
    assert message in "\n".join(option_problems(o))


@pytest.mark.parametrize(
    ("schedule", "args", "refused"),
    [
        ("constant", "", False),
        ("cosine", "", False),
        ("linear", "", False),
        ("polynomial", "", False),
        ("warmup_stable_decay", "decay_type=linear", False),  # a linear decay reads no cycles
        ("cosine_with_restarts", "", True),
        ("cosine_with_min_lr", "", True),
        ("warmup_stable_decay", "", True),  # its default cosine decay reads them
    ],
)
def test_kohya_num_cycles_0_is_refused_only_where_the_schedule_reads_it(tmp_path, schedule, args, refused):
    """The kohya_ss GUI writes lr_scheduler_num_cycles = 0; kohya ignores it unless the schedule reads it, and there
    0 cycles would hold the rate flat (the cosine of 0): refused there only, naming the key as the file wrote it."""
    cfg = tmp_path / "k.toml"
    cfg.write_text(
        'pretrained_model_name_or_path = "tiny:sd1"\ntrain_data_dir = "d"\noutput_dir = "o"\nmax_train_steps = 100\n'
        f'lr_scheduler = "{schedule}"\nlr_scheduler_num_cycles = 0\nlr_scheduler_min_lr_ratio = 0.1\n'
        f'lr_decay_steps = 10\nlr_scheduler_args = ["{args}"]\n'.replace('[""]', "[]"),
        encoding="utf-8",
    )
    o = load_options(ConvOutOptions, cfg)
    assert o.lr_cycles == 0
    problems = option_problems(o)
    said = [p for p in problems if "lr_scheduler_num_cycles" in p or "--lr-cycles" in p]
    if refused:
        assert said == [
            f"{cfg}: lr_scheduler_num_cycles must be at least 1 with --lr-scheduler {schedule}, got 0 "
            "(0 cycles hold the rate flat)"
        ], problems
    else:
        assert said == [], problems


def test_missing_package_names_the_pip_package():
    if importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes installed")
    for name in ("PagedAdamW8bit", "lion8bit", "SGDNesterov8bit"):
        (problem,) = optimizer_problems(_options(optimizer=name))
        assert "pip install bitsandbytes" in problem


# ------------------------------------------------------------------------------------------------
# schedule-free: train mode while stepping, eval mode around saves and samples


class SwapOptimizer(torch.optim.Optimizer):
    """Schedule-free-like: eval() swaps in other weights (train weights + 1), train() swaps back;
    step() refuses to run in eval mode, as schedulefree's optimizers do."""

    events: list[str] = []

    def __init__(self, params, lr=0.1):
        super().__init__(params, {"lr": lr, "train_mode": False})

    def eval(self):
        for group in self.param_groups:
            if group["train_mode"]:
                for p in group["params"]:
                    self.state[p]["train_weights"] = p.detach().clone()
                    p.data.add_(1.0)
                group["train_mode"] = False
        SwapOptimizer.events.append("eval")

    def train(self):
        for group in self.param_groups:
            if not group["train_mode"]:
                for p in group["params"]:
                    if "train_weights" in self.state[p]:
                        p.data.copy_(self.state[p]["train_weights"])
                group["train_mode"] = True
        SwapOptimizer.events.append("train")

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            if not group["train_mode"]:
                raise RuntimeError("step in eval mode")
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["lr"])
        SwapOptimizer.events.append("step")


@pytest.fixture
def swap_module(monkeypatch):
    module = types.ModuleType("fake_schedule_free")
    module.SwapOptimizer = SwapOptimizer
    monkeypatch.setitem(sys.modules, "fake_schedule_free", module)
    SwapOptimizer.events = []
    return "fake_schedule_free.SwapOptimizer"


def _session(tmp_path, tag, **kw):
    o = contract_options(ConvOutMethod, tmp_path, kw, tag=tag)
    return TrainSession(ConvOutMethod(o), bundle=create_tiny_bundle("sd1"))


def test_eval_mode_around_saves_and_resume_through_train(tmp_path, swap_module):
    a = _session(tmp_path, "a", optimizer=swap_module, max_steps=4, save_every=2, keep_states=0, lr=0.05)
    result = a.run()
    events = SwapOptimizer.events
    assert events[:2] == ["train", "train"]  # built in train mode, and again after setup
    assert events.count("step") == 4 and "eval" in events
    trained = a.method.trainable_state_dict()  # train-mode weights (the run ended in train mode)
    saved = load_file(str(result.output))
    assert saved.keys() == trained.keys()
    for key, value in trained.items():  # the result holds the eval-mode weights (train weights + 1)
        assert torch.equal(saved[key], value + 1.0), key
    # resuming the step-2 state (saved in eval mode) goes back to the train weights: same end as straight through
    state = tmp_path / "a" / "result-state" / "step-00000002"
    b = _session(tmp_path, "b", optimizer=swap_module, max_steps=4, lr=0.05, resume=str(state))
    b.run()
    resumed = b.method.trainable_state_dict()
    for key, value in trained.items():
        assert torch.equal(resumed[key], value), key


def test_real_schedulefree_result_is_the_eval_weights(tmp_path):
    pytest.importorskip("schedulefree")
    s = _session(tmp_path, "sf", optimizer="AdamWScheduleFree", max_steps=3, lr=1e-3)
    result = s.run()
    modes = OptimizerModes(s.optimizer)
    assert modes.active
    with modes.evaluating():
        x = s.method.trainable_state_dict()
    y = s.method.trainable_state_dict()
    saved = load_file(str(result.output))
    assert any(not torch.equal(x[k], y[k]) for k in x)  # eval (x) and train (y) weights differ ...
    # ... and the result holds x, as kohya saves. Not bit-equal: x comes from a second eval() after the run's
    # eval -> train round trip, whose lerps need not undo each other exactly (a CPU saw 3e-11 off, against the
    # 1e-4 between x and y)
    for k in x:
        assert torch.allclose(saved[k], x[k], rtol=0, atol=1e-8), k
        assert not torch.allclose(saved[k], y[k], rtol=0, atol=1e-8), k
    assert optimizer_metadata("AdamWScheduleFree") == "schedulefree.adamw_schedulefree.AdamWScheduleFree"


@pytest.mark.parametrize(("ratio", "refused"), [(0.01, False), (0.1, True), (5, True), (0, False)])
def test_adafactor_schedule_refuses_a_warmup_exactly_where_kohya_does(ratio, refused):
    """kohya's get_scheduler_fix: a float lr_warmup_steps below 1 is int(ratio * max_train_steps) steps, and its
    adafactor schedule stops on a warmup that is not 0: 0.01 of 50 steps is 0 steps and runs, 0.1 of 50 is 5."""
    from transformers.optimization import Adafactor

    o = _options(optimizer="adafactor", optimizer_args="relative_step=True", lr_scheduler="adafactor",
                 max_steps=50, lr_warmup_steps=ratio)  # fmt: skip
    problems = [p for p in optimizer_problems(o) if "no warmup" in p]
    assert bool(problems) is refused, problems
    adafactor = Adafactor([torch.nn.Parameter(torch.zeros(2))], lr=None, relative_step=True)
    if refused:
        with pytest.raises(ConfigError, match="has no warmup"):
            scheduler_for(o, adafactor, total_steps=50)
    else:
        scheduler_for(o, adafactor, total_steps=50)
    # without --max-steps a ratio is judged once the run's length is known (the run's own scheduler_for)
    if 0 < ratio < 1:
        assert not [p for p in optimizer_problems(dataclasses.replace(o, max_steps=None)) if "no warmup" in p]


def test_a_ratio_phase_without_max_steps_is_judged_at_the_runs_length():
    """Without --max-steps the run's length comes from the dataset (--epochs): a ratio warmup/decay is judged
    there, at int(ratio * steps) as kohya counts it, not at a stand-in length."""
    ada = _options(optimizer="adafactor", optimizer_args="relative_step=True", lr_scheduler="adafactor",
                   max_steps=None, lr_warmup_steps=0.1)  # fmt: skip
    assert not [p for p in optimizer_problems(ada) if "no warmup" in p]
    assert not schedule_length_problems(ada, 9)  # int(0.9) = 0 steps: kohya runs
    assert any("has no warmup" in p for p in schedule_length_problems(ada, 50))  # 5 steps: kohya refuses
    assert not schedule_length_problems(dataclasses.replace(ada, max_steps=50), 50)  # judged by optimizer_problems
    wsd = _options(lr_scheduler="warmup_stable_decay", lr_warmup_steps=0.6, lr_decay_steps=0.6, max_steps=None)
    assert not optimizer_problems(wsd)
    assert not schedule_length_problems(wsd, 4)  # 2 + 2 of 4 steps
    assert any("exceed the run's 10 steps" in p for p in schedule_length_problems(wsd, 10))  # 6 + 6
    wsd_steps = _options(lr_scheduler="warmup_stable_decay", lr_warmup_steps=800, lr_decay_steps=0.5, max_steps=None)
    assert not optimizer_problems(wsd_steps)  # 800 + 500 of a stand-in 1000 steps; a 2000-step run fits
    assert not schedule_length_problems(wsd_steps, 2000)
    assert schedule_length_problems(wsd_steps, 1000)


@pytest.mark.parametrize(("ratio", "refused"), [(0.2, False), (0.5, True)])
def test_the_preflight_refuses_an_adafactor_warmup_ratio_at_the_epochs_length(tmp_path, ratio, refused):
    """--epochs 2 of 4 images in batches of 2 is 4 steps: a warmup of 0.2 is 0 steps (kohya runs), 0.5 is 2
    steps (kohya's adafactor schedule refuses it): said before anything loads, not when the schedule is built."""
    from sdcore.train.preflight import run_preflight

    o = contract_options(ConvOutMethod, tmp_path, {"optimizer": "adafactor", "optimizer_args": "relative_step=True",
                         "lr_scheduler": "adafactor", "lr_warmup_steps": ratio, "max_steps": None, "epochs": 2})  # fmt: skip
    report = run_preflight(ConvOutMethod(o), o, verify_images=False)
    assert report.total_steps == 4, report.problems
    assert any("has no warmup" in p for p in report.problems) is refused, report.problems
