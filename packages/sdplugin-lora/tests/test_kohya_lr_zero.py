"""kohya's ``learning_rate = 0`` beside ``unet_lr`` / ``text_encoder_lr`` (kohya_ss GUI presets write it): every
LoRA part trains at its own rate, so kohya trains it; sdcore refused it ("--lr must be positive"). Now --lr 0 is
legal where every trained part has its own positive rate, and refused, in the same words plus the part, where one
would train at --lr (kohya would leave that part untrained in silence, "NO LR skipping!")."""

from __future__ import annotations

import pytest
import tomli_w
import torch
from sdcore.testing.datasets import make_tiny_dataset
from sdcore.train.config import load_options
from sdcore.train.optim import create_optimizer
from sdcore.train.options import apply_model_defaults
from sdcore.train.preflight import run_preflight
from sdplugin_lora.method import LoraMethod, LoraOptions


def _preflight(tmp_path, model="tiny:sd1", **items):
    data = tmp_path / "d"
    if not data.exists():
        make_tiny_dataset(data, n=2, size=64, concept="a")
    cfg = tmp_path / "k.toml"
    base = {"pretrained_model_name_or_path": model, "train_data_dir": str(data), "output_dir": str(tmp_path),
            "output_name": "o", "network_module": "networks.lora", "resolution": 64, "max_train_steps": 2,
            "learning_rate": 0}  # fmt: skip
    cfg.write_text(tomli_w.dumps({**base, **items}), encoding="utf-8")
    o = load_options(LoraOptions, cfg)
    apply_model_defaults(o)
    report = run_preflight(LoraMethod(o), o)
    return [p for p in report.problems if "--lr" in p or "learning_rate" in p]


@pytest.mark.parametrize(
    ("model", "items"),
    [
        ("tiny:sd1", {"unet_lr": 1e-4, "text_encoder_lr": 5e-5}),  # the kohya_ss GUI preset's pair
        ("tiny:sd1", {"unet_lr": 1e-4, "network_train_unet_only": True}),  # no text encoder trains
        ("tiny:sd1", {"text_encoder_lr": 5e-5, "network_train_text_encoder_only": True}),  # no U-Net trains
        ("tiny:sdxl", {"unet_lr": 1e-4, "text_encoder_lr": [1e-5, 2e-5]}),  # te1/te2 each their own
        ("tiny:flux", {"unet_lr": 1e-4, "text_encoder_lr": [1e-5, 2e-5]}),  # CLIP-L's; T5 trains only with train_t5xxl
        ("tiny:sd1", {"unet_lr": 1e-4, "text_encoder_lr": 5e-5, "loraplus_lr_ratio": 16}),  # LoRA+ scales part rates
    ],
)
def test_learning_rate_0_with_every_trained_part_at_its_own_rate_passes(tmp_path, model, items):
    assert _preflight(tmp_path, model, **items) == []


@pytest.mark.parametrize(
    ("model", "items", "said"),
    [
        ("tiny:sd1", {}, "the denoiser (--unet-lr), the text encoders (--te-lr)"),
        ("tiny:sd1", {"unet_lr": 1e-4}, "the text encoders (--te-lr)"),  # kohya's TE trains by default
        ("tiny:sd1", {"text_encoder_lr": 5e-5}, "the denoiser (--unet-lr)"),
    ],
)
def test_learning_rate_0_where_a_trained_part_falls_back_to_it_is_refused(tmp_path, model, items, said):
    assert _preflight(tmp_path, model, **items) == [f"--lr must be positive, got 0.0 ({said} train at it)"]


def test_per_encoder_rates_that_leave_a_training_encoder_at_lr_0_are_refused_with_the_family(tmp_path):
    # sdcore's flags in a config: CLIP-L has a rate, SDXL's CLIP-G trains at --lr 0
    assert _preflight(tmp_path, "tiny:sdxl", unet_lr=1e-4, te1_lr=1e-5) == [
        "--lr must be positive, got 0.0 (the text encoders without --te2-lr train at it)"
    ]
    assert _preflight(tmp_path, "tiny:sdxl", unet_lr=1e-4, te1_lr=1e-5, te2_lr=1e-5) == []


def test_the_embedding_vectors_need_their_own_rate_at_lr_0(tmp_path):
    items = {"unet_lr": 1e-4, "network_train_unet_only": True, "embedding": ["emb:1:a"]}
    assert _preflight(tmp_path, **items) == [
        "--lr must be positive, got 0.0 (the --embedding vectors (--embedding-lr) train at it)"
    ]
    assert _preflight(tmp_path, **items, embedding_lr=1e-3) == []


def test_the_optimizer_keeps_each_groups_rate_at_lr_0():
    """The optimizer's default rate is one no group reads; some optimizers refuse 0 there (lion_pytorch)."""
    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": rate} for rate in (1e-4, 5e-5)]
    optimizer = create_optimizer("AdamW", groups, lr=0.0)
    assert [group["lr"] for group in optimizer.param_groups] == [1e-4, 5e-5]
    assert optimizer.defaults["lr"] == 1e-4
