"""A resumed state whose optimizer was built over other parameter groups (LoRA ``--module-lrs`` rules added or
dropped, LoRA+ turned on ...) stops with one clear line, not torch's ValueError traceback."""

from __future__ import annotations

import pytest
import torch
from sdcore.errors import ConfigError
from sdcore.train.state import TrainPosition, load_state, save_state


def _optimizer(groups: list[list[torch.nn.Parameter]]) -> tuple[torch.optim.Optimizer, object]:
    opt = torch.optim.AdamW([{"params": g, "lr": 1e-3} for g in groups])
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda _step: 1.0)


def test_resume_with_other_parameter_groups_is_a_config_error(tmp_path):
    params = [torch.nn.Parameter(torch.zeros(n)) for n in (2, 3, 4)]
    opt, sched = _optimizer([params[:1], params[1:]])  # e.g. a --module-lrs rule's own group
    folder = save_state(tmp_path, TrainPosition(1, 0, 1), trainable={}, optimizer=opt, scheduler=sched)
    for groups in ([params], [params[:2], params[2:]]):  # one group fewer; a rule that takes another module
        opt, sched = _optimizer(groups)
        with pytest.raises(ConfigError, match="optimizer state does not fit this run's parameter groups"):
            load_state(folder, optimizer=opt, scheduler=sched)
    opt, sched = _optimizer([params[:1], params[1:]])  # the same groups load
    load_state(folder, optimizer=opt, scheduler=sched)
    assert len(opt.param_groups) == 2
