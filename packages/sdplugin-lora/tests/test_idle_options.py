"""LyCORIS options that act only with another one, given without it, are said to do nothing (a CLI warning when
the options are validated, before any model loads) instead of being taken in silence; with what they need they
are not."""

from __future__ import annotations

import logging

import pytest
from sdplugin_lora.method import LoraMethod, LoraOptions


def _warnings(caplog: pytest.LogCaptureFixture, **values: object) -> list[str]:
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sdplugin_lora.method"):
        LoraMethod(LoraOptions(**values)).validate()  # type: ignore[arg-type]
    return [r.getMessage() for r in caplog.records if r.name == "sdplugin_lora.method"]


def test_rank_dropout_scale_without_rank_dropout(caplog: pytest.LogCaptureFixture) -> None:
    (line,) = _warnings(caplog, algo="lora", rank_dropout_scale=True)
    assert line.startswith("--rank-dropout-scale has no effect without --rank-dropout")
    assert _warnings(caplog, algo="lora", rank_dropout_scale=True, rank_dropout=0.1) == []


def test_use_tucker_without_an_adapted_conv(caplog: pytest.LogCaptureFixture) -> None:
    (line,) = _warnings(caplog, algo="lora", use_tucker=True)
    assert line.startswith("--use-tucker has no effect: --algo lora without --conv-rank adapts no kxk conv")
    assert _warnings(caplog, algo="lora", use_tucker=True, conv_rank=4) == []
    assert _warnings(caplog, algo="locon", use_tucker=True) == []  # LoCon adapts the convs at --rank
    assert _warnings(caplog, algo="loha", use_tucker=True, conv_rank=2) == []


def test_train_norm_with_only_the_text_encoder_training(caplog: pytest.LogCaptureFixture) -> None:
    (line,) = _warnings(caplog, algo="lora", train_norm=True, te_only=True)
    assert line.startswith("--train-norm has no effect with --te-only")
    assert _warnings(caplog, algo="lora", train_norm=True) == []  # LyCORIS trains the norms with plain LoRA too
