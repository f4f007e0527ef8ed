"""``--cudnn-attention``: training turns cuDNN's SDPA kernels off on CUDA (wrong Flux gradients on
an H200 with torch 2.11, see sdcore.train.attention) and puts torch's setting back afterwards."""

import pytest
import torch
from runtime_methods import ConvOutMethod
from sdcore.models.tiny import create_tiny_bundle
from sdcore.testing.contract import contract_options
from sdcore.train import attention
from sdcore.train.attention import restrict_attention_kernels
from sdcore.train.loop import TrainSession, train
from sdcore.train.options import TrainOptions


def test_cuda_runs_turn_cudnn_attention_off_and_restore_it():
    assert torch.backends.cuda.cudnn_sdp_enabled()  # torch's default
    restore = restrict_attention_kernels(torch.device("cuda", 0), allow_cudnn=False)
    try:
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    finally:
        restore()
    assert torch.backends.cuda.cudnn_sdp_enabled()


def test_cpu_runs_and_the_opt_in_leave_torch_alone():
    for device, allow in ((torch.device("cpu"), False), (torch.device("cuda"), True), ("cpu", False)):
        restore = restrict_attention_kernels(device, allow_cudnn=allow)
        assert torch.backends.cuda.cudnn_sdp_enabled()
        restore()
        assert torch.backends.cuda.cudnn_sdp_enabled()


def test_the_option_is_off_by_default_and_a_flag_pair():
    from sdcore.train.cli import options_to_click

    assert TrainOptions(model="m", data="d", output="o").cudnn_attention is False
    option = next(o for o in options_to_click(TrainOptions) if o.name == "cudnn_attention")
    assert option.opts == ["--cudnn-attention"] and option.secondary_opts == ["--no-cudnn-attention"]


def test_a_failed_setup_puts_the_setting_back(tmp_path, monkeypatch):
    """The setting is switched early in setup; an error later in it (here the method's prepare) must not leave
    it switched for a Python caller that catches the error and goes on. A CPU run posing as a CUDA one."""
    real = attention.restrict_attention_kernels
    monkeypatch.setattr(
        attention,
        "restrict_attention_kernels",
        lambda device, allow_cudnn: real(torch.device("cuda", 0), allow_cudnn=allow_cudnn),
    )

    class _PrepareFails(ConvOutMethod):
        def prepare(self, bundle):
            assert not torch.backends.cuda.cudnn_sdp_enabled()  # switched off by then
            raise ValueError("prepare failed")

    options = contract_options(ConvOutMethod, tmp_path)
    try:
        for run in (
            lambda m: train(m, bundle=create_tiny_bundle("sd1")),
            lambda m: TrainSession(m, bundle=create_tiny_bundle("sd1")).setup(),
        ):
            with pytest.raises(ValueError, match="prepare failed"):
                run(_PrepareFails(options))
            assert torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(True)
