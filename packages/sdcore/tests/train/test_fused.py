"""--fused-backward-pass: each tensor steps inside backward (kohya's fused_backward_pass).

The equality proofs compare the per-tensor step against the optimizer's ordinary step on the same
toy model; the clipping and rounding tests compare against kohya's formulas written out here.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from runtime_methods import ConvOutMethod
from sdcore.train.fused import FUSED_OPTIMIZERS, StepInBackward, fused_problems, stochastic_round_bf16
from sdcore.train.method import Capabilities
from sdcore.train.optim import create_optimizer
from sdcore.train.options import TrainOptions


class _Toy(torch.nn.Module):
    """Linear, Conv2d, LayerNorm and an embedding: 2-D factored, 4-D and 1-D (unfactored) tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(10, 8)
        self.conv = torch.nn.Conv2d(1, 2, 3, padding=1)
        self.lin = torch.nn.Linear(8 * 8 * 2, 8)
        self.norm = torch.nn.LayerNorm(8)
        self.out = torch.nn.Linear(8, 8)

    def forward(self, ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x).flatten(1)
        h = self.norm(self.lin(h) + self.embed(ids))
        return self.out(torch.tanh(h))


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, 10, (4,), generator=g), torch.randn(4, 1, 8, 8, generator=g), torch.randn(4, 8, generator=g)


class _NoSchedule:
    def step(self) -> None:
        pass


class _Spare(_Toy):
    """The toy with a tensor only the first micro-batch of an update uses (:func:`_loss`): with gradient
    accumulation its gradient is complete before the last backward, in which its hook does not fire."""

    def __init__(self) -> None:
        super().__init__()
        self.spare = torch.nn.Parameter(torch.linspace(-1.0, 1.0, 8))


def _setup(name: str, args: str = "", dtype: torch.dtype = torch.float32, model_class: type[_Toy] = _Toy):
    torch.manual_seed(0)
    model = model_class().to(dtype)
    params = list(model.parameters())
    groups = [{"params": params[:4], "lr": 3e-3}, {"params": params[4:], "lr": 1e-3}]  # two rates, as UNet + TE
    optimizer = create_optimizer(name, groups, lr=2e-3, args=args)
    # a rate that changes every step: the tensors of step k must all use step k's rate (Adafactor's
    # relative_step computes its own: no rate to schedule)
    if "relative_step=True" in args:
        return model, optimizer, _NoSchedule()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    return model, optimizer, scheduler


def _loss(model: torch.nn.Module, step: int, k: int = 0, count: int = 1) -> torch.Tensor:
    """The loss of micro-batch ``k`` of the ``count`` that make optimizer step ``step``, divided by ``count`` as the
    loop divides it (one batch a step: ``k`` 0, ``count`` 1); :class:`_Spare`'s tensor joins micro-batch 0 only."""
    ids, x, target = _batch(step * count + k)
    out = model(ids, x.to(model.conv.weight.dtype))
    if k == 0 and isinstance(model, _Spare):
        out = out + model.spare
    return torch.nn.functional.mse_loss(out.float(), target) / count


def _clip_each(model: torch.nn.Module, c: float) -> None:
    """kohya's per-tensor clipping written out: g <- g * min(1, c / (||g||_2 + 1e-6)) for each tensor."""
    for p in model.parameters():
        if p.grad is not None:
            norm = p.grad.double().pow(2).sum().sqrt().item()
            p.grad.mul_(min(1.0, c / (norm + 1e-6)))


def _ordinary(
    name: str,
    steps: int = 3,
    args: str = "",
    clip: float = 0.0,
    clip_each: bool = True,
    count: int = 1,
    model_class: type[_Toy] = _Toy,
):
    """The reference: ``count`` micro-batches accumulated, then per-tensor (``clip_each``: kohya's and OneTrainer's
    rule written out) or global clipping, one optimizer step and one schedule step."""
    model, optimizer, scheduler = _setup(name, args, model_class=model_class)
    for step in range(steps):
        for k in range(count):
            _loss(model, step, k, count).backward()
        if clip and clip_each:
            _clip_each(model, clip)
        elif clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return model


def _fused(
    name: str,
    steps: int = 3,
    args: str = "",
    clip: float = 0.0,
    dtype: torch.dtype = torch.float32,
    count: int = 1,
    groups: int = 0,
    model_class: type[_Toy] = _Toy,
):
    """The same run stepping in backward: with ``count`` above 1 the hooks only accumulate until the update's last
    micro-batch (checked: nothing steps before it, every tensor steps in it and its gradient is freed); ``groups``:
    kohya's ``--fused-optimizer-groups`` split."""
    model, optimizer, scheduler = _setup(name, args, dtype, model_class)
    params = list(model.parameters())
    split = None
    if groups:
        from sdcore.train.fused import kohya_groups

        split = kohya_groups([g["lr"] for g in optimizer.param_groups for _ in g["params"]], groups)
    hooks = StepInBackward(optimizer, params, max_grad_norm=clip, seed=7, stochastic_bf16=True, groups=split)
    for step in range(steps):
        for k in range(count):
            update = k == count - 1
            before = [p.detach().clone() for p in params] if count > 1 else []
            hooks.begin(step, update=update)
            _loss(model, step, k, count).backward()
            hooks.end()
            if not update:  # accumulating: nothing stepped, every gradient kept
                assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))
                assert all(p.grad is not None for p in params)
            elif count > 1:  # the update's backward stepped every tensor, the spare one too, and freed every gradient
                assert all(not torch.equal(p, b) for p, b in zip(params, before, strict=True))
                assert all(p.grad is None for p in params)
        assert hooks.bad_norm() is None
        scheduler.step()
    hooks.remove()
    return model


CASES = [
    ("adafactor", ""),  # sdcore's fixed-rate Adafactor
    ("adafactor", "relative_step=True scale_parameter=True warmup_init=False"),  # kohya's default
    ("adamw", ""),  # torch's fused CPU kernel, as create_optimizer builds it
    ("adamw", "foreach=False weight_decay=0.1"),
    ("sgd", "momentum=0.9"),
    ("sgdnesterov", ""),
]


@pytest.mark.parametrize(("name", "args"), CASES)
def test_stepping_each_tensor_in_backward_gives_the_same_weights(name, args):
    ordinary, fused = _ordinary(name, args=args), _fused(name, args=args)
    start, _, _ = _setup(name, args)
    for (key, a), b, s in zip(
        ordinary.state_dict().items(), fused.state_dict().values(), start.state_dict().values(), strict=True
    ):
        assert not torch.equal(a, s), key  # it trained
        assert torch.equal(a, b), (key, (a - b).abs().max())  # bit for bit: the same float operations


def test_every_optimizer_it_allows_is_proven_here():
    assert {name for name, _ in CASES} == set(FUSED_OPTIMIZERS)


@pytest.mark.parametrize("name", ["adafactor", "adamw"])
def test_max_grad_norm_clips_each_tensor_by_its_own_norm_as_kohya(name):
    fused = _fused(name, clip=0.05)
    each = _ordinary(name, clip=0.05, clip_each=True)
    together = _ordinary(name, clip=0.05, clip_each=False)
    for key, value in fused.state_dict().items():
        # the written-out formula in float64 vs torch's float32 norm: within a few ulps
        torch.testing.assert_close(value, each.state_dict()[key], rtol=1e-5, atol=1e-7)
    # and that is not the ordinary global clipping (the clip is active with these gradients)
    assert any(not torch.allclose(v, together.state_dict()[k]) for k, v in fused.state_dict().items())


def test_gradients_are_freed_as_each_tensor_steps():
    model, optimizer, _ = _setup("adamw")
    params = list(model.parameters())
    hooks = StepInBackward(optimizer, params, max_grad_norm=1.0, seed=0, stochastic_bf16=False)
    alive: list[int] = []

    def count(_p: torch.Tensor) -> None:  # runs after the stepping hook of the same tensor
        alive.append(sum(q.grad is not None for q in params))

    for p in params:
        p.register_post_accumulate_grad_hook(count)
    hooks.begin(0)
    _loss(model, 0).backward()
    hooks.end()
    assert len(alive) == len(params)  # every tensor's hook ran
    assert max(alive) == 0  # no gradient outlives its own step
    assert all(p.grad is None for p in params)
    assert all(len(optimizer.state[p]) > 0 for p in params)  # and every tensor stepped
    hooks.remove()
    _loss(model, 1).backward()  # hooks removed: the ordinary gradients again
    assert all(p.grad is not None for p in params)


def test_a_non_finite_gradient_norm_is_reported_after_backward():
    w = torch.nn.Parameter(torch.zeros(3))
    v = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([w, v], lr=0.1)
    hooks = StepInBackward(optimizer, [w, v], max_grad_norm=1.0, seed=0, stochastic_bf16=False)
    hooks.begin(0)
    loss = torch.sqrt(w).sum() + (v * v).sum()  # finite loss, infinite d/dw at 0
    assert math.isfinite(float(loss.detach()))
    loss.backward()
    hooks.end()
    assert hooks.bad_norm() is not None and not math.isfinite(hooks.bad_norm())
    hooks.begin(1)  # a new step forgets it
    assert hooks.bad_norm() is None


def test_stochastic_rounding_picks_a_neighbour_with_the_right_odds():
    # 1 + 2^-9 lies a quarter of the way from bf16's 1.0 to its next value 1 + 2^-7
    value = torch.full((40000,), 1.0 + 2.0**-9)
    rounded = stochastic_round_bf16(value, torch.Generator().manual_seed(0)).float()
    assert set(rounded.unique().tolist()) == {1.0, 1.0 + 2.0**-7}
    up = float((rounded > 1.0).float().mean())
    assert abs(up - 0.25) < 0.01, up  # unbiased: E[rounded] = value
    exact = torch.tensor([1.0, -2.5, 0.0, 3.0e38]).bfloat16().float()
    assert torch.equal(stochastic_round_bf16(exact, torch.Generator().manual_seed(1)).float(), exact)
    again = stochastic_round_bf16(value, torch.Generator().manual_seed(0)).float()
    assert torch.equal(rounded, again)  # the same generator state rounds the same way


def test_bf16_weights_with_adafactor_step_in_fp32_then_round_stochastically():
    """kohya's fused Adafactor on bf16 weights: the update in fp32, then stochastic rounding."""
    model, optimizer, _ = _setup("adafactor", dtype=torch.bfloat16)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    _loss(model, 0).backward()
    # the reference: fp32 copies of the bf16 start with the same (float) gradients, stepped ordinarily
    names = [k for k, _ in model.named_parameters()]
    copies = {}
    for key, p in model.named_parameters():
        copy = p.detach().float().clone().requires_grad_(True)
        copy.grad = p.grad.float()
        copies[key] = copy
    groups = [
        {"params": [copies[k] for k in names[:4]], "lr": 3e-3},
        {"params": [copies[k] for k in names[4:]], "lr": 1e-3},
    ]
    create_optimizer("adafactor", groups, lr=2e-3).step()

    def run() -> dict[str, torch.Tensor]:
        model.load_state_dict(start)
        model.zero_grad(set_to_none=True)
        optimizer.state.clear()
        hooks = StepInBackward(optimizer, list(model.parameters()), max_grad_norm=0, seed=7, stochastic_bf16=True)
        hooks.begin(0)
        _loss(model, 0).backward()
        hooks.end()
        hooks.remove()
        return {k: v.clone() for k, v in model.state_dict().items()}

    fused = run()
    assert all(
        torch.equal(v, w) for v, w in zip(fused.values(), run().values(), strict=True)
    )  # keyed, not global, randomness
    rounded_up = 0
    for key, value in fused.items():
        assert value.dtype == torch.bfloat16
        state = optimizer.state[dict(model.named_parameters())[key]]
        assert state["exp_avg_sq_row" if value.ndim >= 2 else "exp_avg_sq"].dtype == torch.float32, key
        assert not torch.equal(value, start[key]), key
        exact = copies[key].detach()
        low = exact.view(torch.int32) & -65536  # the fp32 step truncated to bf16 (toward zero)
        bits = value.float().view(torch.int32)
        assert bool(((bits == low) | (bits == low + 65536)).all()), key  # one of its two bf16 neighbours
        rounded_up += int((bits == low + 65536).sum())
    total = sum(v.numel() for v in fused.values())
    assert 0 < rounded_up < total  # some up, some down
    assert any(not torch.equal(v, copies[k].detach().bfloat16()) for k, v in fused.items())  # not round-to-nearest


class _FullMethod(ConvOutMethod):
    """ConvOutMethod that declares it trains whole weights (as DreamBooth does)."""

    def capabilities(self) -> Capabilities:
        return Capabilities(steps_in_backward=True)


def test_the_preflight_names_every_problem_at_once(tmp_path, monkeypatch):
    from sdcore.testing.contract import contract_options

    monkeypatch.setenv("WORLD_SIZE", "2")
    options = contract_options(
        ConvOutMethod,
        tmp_path,
        {"fused_backward_pass": True, "optimizer": "prodigy", "gradient_accumulation": 2, "mixed_precision": "fp16"},
    )
    problems = fused_problems(options, ConvOutMethod(options))
    assert len(problems) == 4, problems  # gradient accumulation is accepted (OneTrainer's rule)
    for words in ("prodigy", "fp16", "2 processes", "'convout' does not step"):
        assert any(words in p for p in problems), (words, problems)
    monkeypatch.delenv("WORLD_SIZE")
    fine = contract_options(_FullMethod, tmp_path, {"fused_backward_pass": True, "optimizer": "adafactor"})
    assert fused_problems(fine, _FullMethod(fine)) == []
    off = contract_options(ConvOutMethod, tmp_path, {"optimizer": "prodigy", "gradient_accumulation": 2})
    assert fused_problems(off, ConvOutMethod(off)) == []


# -- through the runtime's loop ----------------------------------------------------------------------


def _session_run(tmp_path, tag, method_class=_FullMethod, family="sd1", **kw):
    from sdcore.models.tiny import create_tiny_bundle
    from sdcore.testing.contract import contract_options
    from sdcore.train.loop import train

    values = {"max_grad_norm": 0.0, "lr_scheduler": "linear", "train_text_norm": True, **kw}
    method = method_class(contract_options(method_class, tmp_path, values, tag=tag, family=family))
    result = train(method, bundle=create_tiny_bundle(family))
    return method.trainable_state_dict(), result


@pytest.mark.parametrize("optimizer", ["adafactor", "adamw"])
def test_the_loop_trains_the_same_weights_with_and_without_it(tmp_path, optimizer):
    plain, r1 = _session_run(tmp_path, "plain", optimizer=optimizer)
    fused, r2 = _session_run(tmp_path, "fused", optimizer=optimizer, fused_backward_pass=True)
    assert r1.losses == r2.losses and len(r1.losses) == 4
    assert plain.keys() == fused.keys() and len(plain) >= 3  # conv_out and the text encoder's LayerNorm
    for key, value in plain.items():
        assert torch.equal(value, fused[key]), key


class _NanAtStep3(_FullMethod):
    def compute_loss(self, ctx):
        if ctx.step == 2:
            return torch.full((ctx.noise.shape[0],), float("nan"))
        return None


class _InfGradientAtStep3(_FullMethod):
    """A finite loss whose gradient is not: sqrt at 0 (d/dx = inf) times 0."""

    def compute_loss(self, ctx):
        if ctx.step == 2:
            pred = ctx.predict(ctx.conditioning)
            return (pred.float() - ctx.target.float()).pow(2).mean(dim=(1, 2, 3)) + 0 * torch.sqrt(pred - pred).sum()
        return None


def test_a_nan_loss_steps_nothing_and_keeps_the_last_good_state(tmp_path):
    from safetensors.torch import load_file
    from sdcore.train.loop import TrainingDivergedError

    with pytest.raises(TrainingDivergedError, match=r"step 3.*step-00000002"):
        _session_run(tmp_path, "nan", _NanAtStep3, fused_backward_pass=True, max_steps=5, lr_scheduler="constant")
    saved = load_file(str(tmp_path / "nan" / "result-state" / "step-00000002" / "trainable.safetensors"))
    good, _ = _session_run(tmp_path, "two", max_steps=2, lr_scheduler="constant")
    assert saved.keys() == good.keys()
    for key in good:  # the state holds the weights after step 2: the NaN step changed nothing
        assert torch.equal(saved[key], good[key]), key


def test_a_non_finite_gradient_stops_without_saving_half_stepped_weights(tmp_path):
    from sdcore.train.loop import TrainingDivergedError

    with pytest.raises(TrainingDivergedError, match=r"gradient norm became nan at step 3.*no state was saved"):
        _session_run(
            tmp_path, "inf", _InfGradientAtStep3, "sdxl", fused_backward_pass=True, max_steps=5, max_grad_norm=1.0
        )
    assert not (tmp_path / "inf" / "result-state" / "step-00000002").exists()


def test_the_runtime_removes_its_hooks_at_the_end(tmp_path):
    method_holder = {}

    class _Keep(_FullMethod):
        def prepare(self, bundle):
            groups = super().prepare(bundle)
            method_holder["params"] = [p for g in groups for p in g["params"]]
            return groups

    _session_run(tmp_path, "hooks", _Keep, fused_backward_pass=True, max_steps=1)
    params = method_holder["params"]
    for p in params:
        p.grad = None
    (sum(p.float().sum() for p in params)).backward()  # no optimizer step hides in a later backward
    assert all(p.grad is not None for p in params)


# -- the memory plan -----------------------------------------------------------------------------------


@pytest.mark.parametrize("full_bf16", [False, True])
def test_the_memory_plan_keeps_only_the_largest_gradient(full_bf16):
    from sdcore.models.layout import layout_of_bundle
    from sdcore.models.tiny import create_tiny_bundle
    from sdcore.train.memory import count_parameters, estimate_memory

    bundle = create_tiny_bundle("sd1")
    bundle.unet.requires_grad_(True)
    params = list(bundle.unet.parameters())
    plan = count_parameters(bundle, [{"params": params}], whole_model_result=True)
    largest = max(p.numel() for p in params)
    assert plan.largest_trainable == largest and plan.trainable == sum(p.numel() for p in params)
    layout = layout_of_bundle(bundle)
    extra = {"mixed_precision": "bf16", "full_bf16": True} if full_bf16 else {}
    options = TrainOptions(model="m", data="d", output="o", resolution=64, optimizer="adafactor", **extra)
    plain = estimate_memory(layout, plan, options)
    fused = estimate_memory(layout, plan, dataclasses.replace(options, fused_backward_pass=True))
    per = 2 if full_bf16 else 4  # bytes per gradient element
    assert plain.gradients - fused.gradients == (plan.trainable - largest) * per
    assert fused.gradients == largest * per
    assert plain.total - fused.total == (plan.trainable - largest) * per  # nothing else moves
    assert fused.settings["fused_backward_pass"] and not plain.settings["fused_backward_pass"]


def test_the_plan_suggests_it_for_methods_that_step_in_backward():
    from sdcore.models.layout import layout_of_bundle
    from sdcore.models.tiny import create_tiny_bundle
    from sdcore.train.memory import count_parameters, suggestions

    bundle = create_tiny_bundle("sd1")
    bundle.unet.requires_grad_(True)
    plan = count_parameters(bundle, [{"params": list(bundle.unet.parameters())}], whole_model_result=True)
    layout = layout_of_bundle(bundle)
    options = TrainOptions(model="m", data="d", output="o", resolution=64, optimizer="adamw", batch_size=2)
    found = {s.flags: s for s in suggestions(layout, plan, options, 1, steps_in_backward=True)}
    assert found["--fused-backward-pass"].estimate.gradients == plan.largest_trainable * 4
    combined = [f for f in found if f.count("--") > 2]
    assert combined and all("--batch-size" not in f for f in combined if "--fused-backward-pass" in f)
    assert "--fused-backward-pass" not in {s.flags for s in suggestions(layout, plan, options, 1)}
    prodigy = TrainOptions(model="m", data="d", output="o", resolution=64, optimizer="prodigy")
    assert "--fused-backward-pass" not in {
        s.flags for s in suggestions(layout, plan, prodigy, 1, steps_in_backward=True)
    }


def test_sd1_and_sd2_need_max_grad_norm_0_as_kohya_clips_them_together(tmp_path):
    from sdcore.train.fused import fused_family_problems
    from sdcore.train.preflight import PreflightError

    with pytest.raises(PreflightError, match=r"--fused-backward-pass on sd1: .*add --max-grad-norm 0"):
        _session_run(tmp_path, "sd1", fused_backward_pass=True, max_grad_norm=1.0, max_steps=1)
    options = TrainOptions(model="m", data="d", output="o", fused_backward_pass=True)
    assert options.max_grad_norm == 1.0  # kohya's default too
    assert [len(fused_family_problems(options, f)) for f in ("sd1", "sd2", "sdxl", "sd3", "flux")] == [1, 1, 0, 0, 0]
    assert fused_family_problems(dataclasses.replace(options, max_grad_norm=0.0), "sd2") == []


# -- --fused-optimizer-groups ----------------------------------------------------------------------------


def test_kohyas_group_split():
    from sdcore.train.fused import kohya_groups

    # ceil(7 / 3) = 3 tensors a group; a new group where the rate changes
    assert kohya_groups([1.0] * 5 + [2.0] * 2, 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert kohya_groups([1.0, 2.0, 2.0, 2.0], 1) == [[0], [1, 2, 3]]
    assert kohya_groups([None] * 4, 2) == [[0, 1], [2, 3]]  # Adafactor relative_step: no rates
    assert kohya_groups([1.0] * 3, 10) == [[0], [1], [2]]


def _grouped(name: str, count: int, steps: int = 3, clip: float = 0.0, extra: bool = True):
    model, optimizer, scheduler = _setup(name)
    params = list(model.parameters())
    if extra:  # a tensor that gets no gradient: its group never completes before backward ends
        idle = torch.nn.Parameter(torch.ones(2))
        optimizer.param_groups[1]["params"].append(idle)
        params.append(idle)
    from sdcore.train.fused import kohya_groups

    groups = kohya_groups([g["lr"] for g in optimizer.param_groups for _ in g["params"]], count)
    hooks = StepInBackward(optimizer, params, max_grad_norm=clip, seed=0, stochastic_bf16=True, groups=groups)
    held: list[int] = []
    for p in params:
        p.register_post_accumulate_grad_hook(lambda _p: held.append(sum(q.grad is not None for q in params)))
    for step in range(steps):
        hooks.begin(step)
        _loss(model, step).backward()
        hooks.end()
        assert all(p.grad is None for p in params)
        scheduler.step()
    hooks.remove()
    return model, groups, held


@pytest.mark.parametrize("name", ["adamw", "adafactor"])
def test_optimizer_groups_give_the_same_weights_and_hold_a_groups_gradients(name):
    ordinary = _ordinary(name)
    for count in (1, 2, 4):
        model, groups, held = _grouped(name, count)
        assert any(len(g) > 1 for g in groups)
        for key, value in ordinary.state_dict().items():
            assert torch.equal(value, model.state_dict()[key]), (count, key)
        assert max(held) >= 1  # a group's gradients wait for its last one
    clipped, _, _ = _grouped(name, 2, clip=0.05, extra=False)
    each = _fused(name, clip=0.05)  # per-tensor clipping, as the fused pass (and kohya's groups)
    for key, value in each.state_dict().items():
        assert torch.equal(value, clipped.state_dict()[key]), key


def test_the_memory_plan_holds_the_largest_groups_gradients():
    from sdcore.train.memory import ParameterPlan, held_gradient_elements

    tensors = ((30, 1e-3), (20, 1e-3), (5, 1e-3), (40, 5e-4))
    plan = ParameterPlan({"unet": 95}, 95, 0, frozenset({"unet"}), 95, largest_trainable=40, tensors=tensors)
    options = TrainOptions(model="m", data="d", output="o")
    assert held_gradient_elements(plan, options) == 95
    assert held_gradient_elements(plan, dataclasses.replace(options, fused_backward_pass=True)) == 40
    # groups of ceil(4/1) = 4 split at the rate change: [30+20+5], [40]; of 2: [30+20], [5], [40]
    assert held_gradient_elements(plan, dataclasses.replace(options, fused_optimizer_groups=1)) == 55
    assert held_gradient_elements(plan, dataclasses.replace(options, fused_optimizer_groups=2)) == 50
    assert held_gradient_elements(plan, dataclasses.replace(options, fused_optimizer_groups=4)) == 40


def test_optimizer_group_problems(tmp_path):
    from sdcore.testing.contract import contract_options
    from sdcore.train.fused import fused_family_problems

    both = contract_options(_FullMethod, tmp_path, {"fused_backward_pass": True, "fused_optimizer_groups": 4})
    assert any("give one of" in p for p in fused_problems(both, _FullMethod(both)))
    negative = contract_options(_FullMethod, tmp_path, {"fused_optimizer_groups": -1})
    assert fused_problems(negative, _FullMethod(negative)) == [
        "--fused-optimizer-groups must be 0 (off) or more, got -1"
    ]
    groups = contract_options(ConvOutMethod, tmp_path, {"fused_optimizer_groups": 4, "gradient_accumulation": 2})
    found = fused_problems(groups, ConvOutMethod(groups))
    assert len(found) == 1 and "'convout' does not step in backward" in found[0]
    # kohya's groups are sdxl_train.py's: sd3/flux_train.py ignore them and clip all gradients together
    clip = TrainOptions(model="m", data="d", output="o", fused_optimizer_groups=4)
    assert [len(fused_family_problems(clip, f)) for f in ("sd1", "sdxl", "sd3", "flux")] == [1, 0, 1, 1]
    assert fused_family_problems(dataclasses.replace(clip, max_grad_norm=0.0), "flux") == []


# -- --blockwise-fused-optimizers ---------------------------------------------------------------------------


def test_block_keys_and_the_blockwise_memory_plan():
    from sdcore.models.family import family_adapter
    from sdcore.train.fused import block_key, fused_family_problems, parameter_blocks
    from sdcore.train.memory import count_parameters, held_gradient_elements

    assert block_key("transformer", "single_transformer_blocks.3.attn.to_q.weight") == "single_transformer_blocks.3"
    assert block_key("transformer", "transformer_blocks.0.norm1.linear.bias") == "transformer_blocks.0"
    assert block_key("transformer", "x_embedder.weight") == "transformer"
    assert block_key("text_encoder_2", None) == "text_encoder_2"
    bundle = family_adapter("flux").create_tiny()
    bundle.transformer.requires_grad_(True)
    params = list(bundle.transformer.parameters())
    keys = parameter_blocks(bundle)
    per_block: dict[str, int] = {}
    for name, p in bundle.transformer.named_parameters():
        parts = name.split(".")
        key = ".".join(parts[:2]) if parts[0] in ("transformer_blocks", "single_transformer_blocks") else "transformer"
        assert keys[id(p)] == key
        per_block[key] = per_block.get(key, 0) + p.numel()
    assert {k.split(".")[0] for k in per_block} == {"transformer", "transformer_blocks", "single_transformer_blocks"}
    plan = count_parameters(bundle, [{"params": params}], whole_model_result=True)
    options = TrainOptions(model="m", data="d", output="o", blockwise_fused_optimizers=True)
    assert held_gradient_elements(plan, options) == max(per_block.values()) < plan.trainable
    # kohya's blockwise optimizers are its SD3/Flux scripts': UNet families have no blocks
    assert [len(fused_family_problems(options, f)) for f in ("sd1", "sdxl", "sd3", "flux")] == [1, 1, 0, 0]
    both = dataclasses.replace(options, fused_backward_pass=True)
    assert any("give one of" in p for p in fused_problems(both))


def test_a_resumed_run_steps_in_backward_as_an_uninterrupted_one(tmp_path):
    import dataclasses as dc

    from sdcore.models.tiny import create_tiny_bundle
    from sdcore.testing.contract import contract_options
    from sdcore.train.loop import train

    values = {"fused_backward_pass": True, "max_grad_norm": 0.0, "optimizer": "adafactor", "train_text_norm": True}
    whole = _FullMethod(contract_options(_FullMethod, tmp_path, {**values, "max_steps": 4}, tag="whole"))
    train(whole, bundle=create_tiny_bundle("sd1"))
    first = contract_options(_FullMethod, tmp_path, {**values, "max_steps": 4, "save_every": 2}, tag="parts")
    with pytest.raises(KeyboardInterrupt):  # after step 3: the interrupt saves its state

        class _Stop(_FullMethod):
            def on_step_end(self, bundle, step):
                if step == 3:
                    raise KeyboardInterrupt

        train(_Stop(first), bundle=create_tiny_bundle("sd1"))
    resumed = _FullMethod(dc.replace(first, resume="latest"))
    result = train(resumed, bundle=create_tiny_bundle("sd1"))
    assert result.steps == 4
    a, b = whole.trainable_state_dict(), resumed.trainable_state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class _InterruptInBackward(_FullMethod):
    def compute_loss(self, ctx):
        if ctx.step == 2:
            pred = ctx.predict(ctx.conditioning)

            def stop(grad):
                raise KeyboardInterrupt

            pred.register_hook(stop)
            return (pred.float() - ctx.target.float()).pow(2).mean(dim=(1, 2, 3))
        return None


def test_an_interrupt_during_backward_saves_no_state(tmp_path, capsys):
    with pytest.raises(KeyboardInterrupt):
        _session_run(tmp_path, "stop", _InterruptInBackward, fused_backward_pass=True, max_steps=5)
    assert not list((tmp_path / "stop").glob("result-state/step-*"))  # the weights may be half-stepped
    assert not list((tmp_path / "stop").glob("result-step*"))  # nor a weights file from them
    assert "interrupted during a fused backward pass" in capsys.readouterr().err
    # without the fused pass the same interrupt keeps the state of step 2, and its weights file
    with pytest.raises(KeyboardInterrupt):
        _session_run(tmp_path, "plain", _InterruptInBackward, max_steps=5)
    assert [p.name for p in (tmp_path / "plain").glob("result-state/step-*")] == ["step-00000002"]
    assert [p.name for p in (tmp_path / "plain").glob("result-step*")] == ["result-step00000002.safetensors"]


# -- gradient accumulation and --fused-clip per-tensor (OneTrainer's fused_back_pass) -------------------------


@pytest.mark.parametrize("name", ["adafactor", "adamw", "sgd"])
@pytest.mark.parametrize("count", [2, 3])
def test_accumulated_micro_batches_step_in_the_last_backward(name, count):
    """OneTrainer's rule: the gradients accumulate, the hooks step on the update's last micro-batch. Without
    clipping the weights are the ordinary accumulated run's bit for bit, with per-tensor clipping those of the
    per-tensor clipping reference (within 1e-6), not the global clipping's."""
    spare = {"count": count, "model_class": _Spare}
    ordinary, fused = _ordinary(name, **spare), _fused(name, **spare)
    start, _, _ = _setup(name, model_class=_Spare)
    for (key, a), b, s in zip(
        ordinary.state_dict().items(), fused.state_dict().values(), start.state_dict().values(), strict=True
    ):
        assert not torch.equal(a, s), key
        assert torch.equal(a, b), (key, (a - b).abs().max())
    grouped = _fused(name, groups=2, **spare)
    assert all(torch.equal(v, grouped.state_dict()[k]) for k, v in ordinary.state_dict().items())
    clipped = _fused(name, clip=0.05, **spare)
    each = _ordinary(name, clip=0.05, clip_each=True, **spare)
    together = _ordinary(name, clip=0.05, clip_each=False, **spare)
    for key, value in clipped.state_dict().items():
        assert float((value - each.state_dict()[key]).abs().max()) <= 1e-6, key
    assert any(not torch.allclose(v, together.state_dict()[k]) for k, v in clipped.state_dict().items())


def test_fused_clip_per_tensor_accepts_clipping_on_every_family():
    from sdcore.train.fused import fused_family_problems, fused_notes

    families = ("sd1", "sd2", "sdxl", "sd3", "flux", "chroma")
    kohya = TrainOptions(model="m", data="d", output="o", fused_backward_pass=True)
    assert kohya.fused_clip == "kohya"  # kohya command lines and TOMLs keep kohya's family rule
    refused = fused_family_problems(kohya, "chroma")
    assert refused == [
        "--fused-backward-pass on chroma: kohya's chroma scripts ignore the flag and clip all gradients together, "
        "while stepping in backward clips each tensor alone; add --max-grad-norm 0 (then the weights are the same), "
        "--fused-clip per-tensor (OneTrainer's rule) or drop the flag"
    ]
    each = dataclasses.replace(kohya, fused_clip="per-tensor")
    assert [fused_family_problems(each, f) for f in families] == [[]] * len(families)
    groups = dataclasses.replace(each, fused_backward_pass=False, fused_optimizer_groups=3)
    assert [fused_family_problems(groups, f) for f in families] == [[]] * len(families)
    blockwise = dataclasses.replace(each, fused_backward_pass=False, blockwise_fused_optimizers=True)
    assert [len(fused_family_problems(blockwise, f)) for f in families] == [1, 1, 1, 0, 0, 1]  # blocks still needed
    assert fused_notes(each)[0].startswith(
        "--fused-backward-pass: --max-grad-norm 1 clips each tensor by its own norm (OneTrainer), not all"
    )
    # the accumulation note says whose rule applies: a OneTrainer config's own; on kohya's flag with kohya's family
    # rule (a kohya command line or TOML) that kohya refuses the pair (train_util.get_optimizer asserts it)
    tail = "so every gradient is held until then and the pass saves no gradient memory"
    head = "with --gradient-accumulation 4: the tensors step in the backward of each update's last micro-batch"
    unclipped = {"gradient_accumulation": 4, "max_grad_norm": 0.0}
    assert fused_notes(dataclasses.replace(each, **unclipped)) == [
        f"--fused-backward-pass {head} (OneTrainer's rule), {tail}"
    ]
    assert fused_notes(dataclasses.replace(kohya, **unclipped)) == [
        f"--fused-backward-pass {head} (kohya refuses --fused_backward_pass with gradient_accumulation_steps above 1 "
        f"(train_util.get_optimizer asserts it); sdcore runs it with OneTrainer's rule), {tail}"
    ]
    grouped = dataclasses.replace(kohya, fused_backward_pass=False, fused_optimizer_groups=2, **unclipped)
    assert fused_notes(grouped) == [
        f"--fused-optimizer-groups {head} (OneTrainer's rule for its fused back pass), {tail}"
    ]
    wrong = dataclasses.replace(kohya, fused_clip="global")
    assert "--fused-clip 'global': choose one of kohya, per-tensor" in fused_problems(wrong)


def test_the_memory_plan_holds_every_gradient_with_accumulation():
    from sdcore.train.memory import ParameterPlan, held_gradient_elements
    from sdcore.train.memory_options import trained_swap_problem

    tensors = ((30, 1e-3), (20, 1e-3), (5, 1e-3), (40, 5e-4))
    plan = ParameterPlan({"unet": 95}, 95, 0, frozenset({"unet"}), 95, largest_trainable=40, tensors=tensors)
    fused = TrainOptions(model="m", data="d", output="o", fused_backward_pass=True)
    assert held_gradient_elements(plan, fused) == 40
    assert held_gradient_elements(plan, dataclasses.replace(fused, gradient_accumulation=2)) == 95
    assert trained_swap_problem(fused, 4) is None
    assert trained_swap_problem(dataclasses.replace(fused, gradient_accumulation=2), 4) == (
        "--blocks-to-swap 4 on a full fine-tune with --gradient-accumulation 2: a swapped weight steps in backward on "
        "a device copy, and its gradient cannot wait there for the update's last micro-batch; use "
        "--gradient-accumulation 1 (a larger --batch-size) or swap no trained blocks"
    )


@pytest.mark.parametrize("optimizer", ["adafactor", "adamw"])
def test_the_loop_accumulates_then_steps_in_backward_as_an_ordinary_run(tmp_path, optimizer):
    plain, r1 = _session_run(tmp_path, "plain", optimizer=optimizer, gradient_accumulation=2)
    fused, r2 = _session_run(tmp_path, "fused", optimizer=optimizer, gradient_accumulation=2, fused_backward_pass=True)
    assert r1.losses == r2.losses and len(r1.losses) == 4  # 4 updates of 2 micro-batches each
    assert plain.keys() == fused.keys() and len(plain) >= 3
    for key, value in plain.items():
        assert torch.equal(value, fused[key]), key


def test_the_loop_clips_per_tensor_on_sd1_with_fused_clip_per_tensor(tmp_path):
    values = {"fused_backward_pass": True, "fused_clip": "per-tensor", "gradient_accumulation": 2}
    plain, _ = _session_run(tmp_path, "plain", gradient_accumulation=2)
    # a norm no gradient reaches: the clip factor is exactly 1, so the weights are the unclipped run's
    loose, _ = _session_run(tmp_path, "loose", max_grad_norm=1e6, **values)
    assert all(torch.equal(value, loose[key]) for key, value in plain.items())
    tight, _ = _session_run(tmp_path, "tight", max_grad_norm=1e-4, **values)
    together, _ = _session_run(tmp_path, "together", max_grad_norm=1e-4, gradient_accumulation=2)
    assert any(not torch.equal(value, tight[key]) for key, value in plain.items())  # the clip acts
    assert any(not torch.allclose(value, tight[key]) for key, value in together.items())  # not globally
