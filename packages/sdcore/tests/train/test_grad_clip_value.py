"""``--grad-clip-method value``: each gradient element clamped to ``±--max-grad-norm`` after accumulation
(SimpleTuner's default ``grad_clip_method``: ``accelerator.clip_grad_value_`` in its trainer), checked on one
optimizer step with a known gradient: ``w - lr · clamp(g, -c, c)`` with ``g`` the micro-batches' mean."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")


class _Linear(torch.nn.Module):
    """loss = w · batch, so the gradient of ``w`` is the batch itself."""

    def __init__(self, w: list[float]) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(w))

    def forward(self, batch, noise, timesteps, step, input_noise):  # type: ignore[no-untyped-def]
        return (self.w * batch).sum()


def _step(w0: list[float], micro: list[list[float]], method: str, clip: float, add: list[float] | None = None):
    from accelerate import Accelerator
    from sdcore.train.step import optimizer_step

    acc = Accelerator(cpu=True)
    model = _Linear(w0)
    if add is not None:  # a finite loss whose gradient is not: added in the backward
        model.w.register_hook(lambda grad: grad + torch.tensor(add))
    optimizer = acc.prepare(torch.optim.SGD(model.parameters(), lr=1.0))
    placement = SimpleNamespace(
        accelerator=acc, model=model, optimizer=optimizer, in_optimizer_step=False,
        scheduler=SimpleNamespace(step=lambda: None), no_sync=lambda sync: contextlib.nullcontext(),
    )  # fmt: skip
    batches = SimpleNamespace(make_batch=lambda refs, step: torch.tensor(refs))
    objective = SimpleNamespace(draw_for=lambda refs, batch: (None, None, None),
                                strength_scope=lambda batch: contextlib.nullcontext())  # fmt: skip
    bad: list = []

    def on_bad(outcome):  # type: ignore[no-untyped-def]
        bad.append(outcome)
        raise RuntimeError("diverged")

    with contextlib.suppress(RuntimeError):
        optimizer_step(micro, step=0, batches=batches, objective=objective, placement=placement,
                       max_grad_norm=clip, on_bad=on_bad, grad_clip_method=method)  # type: ignore[arg-type]  # fmt: skip
    return model.w.detach(), bad


def test_value_clamps_each_element_of_the_accumulated_gradient():
    w0 = [1.0, 2.0, -3.0, 0.5]
    micro = [[4.0, -0.2, -6.0, 1.0], [2.0, 0.4, 0.0, -1.0]]  # mean: 3, 0.1, -3, 0
    w, bad = _step(w0, micro, "value", 2.0)
    mean = (torch.tensor(micro[0]) + torch.tensor(micro[1])) / 2
    expected = torch.tensor(w0) - mean.clamp(-2.0, 2.0)
    assert not bad
    torch.testing.assert_close(w, expected)
    assert torch.equal(w, torch.tensor([-1.0, 1.9, -1.0, 0.5]))  # 3 -> 2, 0.1 kept, -3 -> -2
    norm, _ = _step(w0, micro, "norm", 2.0)  # the global norm instead: every element scaled by 2/|g|
    torch.testing.assert_close(norm, torch.tensor(w0) - mean * (2.0 / float(mean.norm())), rtol=1e-5, atol=1e-6)
    off, _ = _step(w0, micro, "value", 0.0)  # 0: no clipping at all
    torch.testing.assert_close(off, torch.tensor(w0) - mean)


def test_a_non_finite_gradient_stops_the_run_instead_of_being_clamped():
    w0 = [1.0, 2.0]
    w, bad = _step(w0, [[1.0, 1.0]], "value", 2.0, add=[float("inf"), 0.0])
    assert [(o.bad_what, o.bad_value) for o in bad] == [("largest gradient value", float("inf"))]
    assert torch.equal(w, torch.tensor(w0))  # no step taken


def test_preflight_refuses_value_where_accelerate_cannot_clip_values(monkeypatch):
    from sdcore.train.options import TrainOptions
    from sdcore.train.preflight import grad_clip_problems

    assert grad_clip_problems(TrainOptions(grad_clip_method="value")) == []
    assert grad_clip_problems(TrainOptions(grad_clip_method="bogus")) == [
        "--grad-clip-method 'bogus': choose one of norm, value"
    ]
    (fused,) = grad_clip_problems(TrainOptions(grad_clip_method="value", fused_backward_pass=True))
    assert "fused backward pass" in fused
    assert grad_clip_problems(TrainOptions(grad_clip_method="value", fused_backward_pass=True, max_grad_norm=0)) == []
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    (sharded,) = grad_clip_problems(TrainOptions(grad_clip_method="value"))
    assert sharded.startswith("--grad-clip-method value with FSDP")
