"""Multi-process training through accelerate, and the example accelerate configs in docs/accelerate."""

from __future__ import annotations

from pathlib import Path

import pytest
from sdcore.testing.distributed import check_processes_equal_accumulation

ROOT = Path(__file__).parents[1]
CONFIGS = ROOT / "docs" / "accelerate"


def test_shipped_accelerate_configs_parse_with_accelerates_loader():
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.utils import DistributedType

    found = {path.name: load_config_from_file(str(path)) for path in sorted(CONFIGS.glob("*.yaml"))}
    assert set(found) == {"ddp.yaml", "fsdp-full-finetune.yaml", "deepspeed-zero2.yaml"}
    assert all(isinstance(config, ClusterConfig) for config in found.values())
    assert found["ddp.yaml"].distributed_type == DistributedType.MULTI_GPU
    fsdp = found["fsdp-full-finetune.yaml"]
    assert fsdp.distributed_type == DistributedType.FSDP
    assert fsdp.fsdp_config["fsdp_sharding_strategy"] == "FULL_SHARD"
    zero = found["deepspeed-zero2.yaml"]
    assert zero.distributed_type == DistributedType.DEEPSPEED and zero.deepspeed_config["zero_stage"] == 2
    # sdcore's --mixed-precision decides the precision: the examples leave accelerate's at "no"
    assert {config.mixed_precision for config in found.values()} == {"no"}
    documented = (ROOT / "docs" / "training.md").read_text()
    assert all(f"docs/accelerate/{name}" in documented for name in found)


@pytest.mark.slow
def test_accelerate_launch_with_the_shipped_ddp_config_matches_one_process(tmp_path):
    """DreamBooth (the whole UNet trains, class images from ``regularization_data()`` weighted by
    ``--prior-loss-weight``) under ``accelerate launch --config_file docs/accelerate/ddp.yaml`` (2
    processes; on a machine without GPUs accelerate runs them on the CPU with gloo) equals one
    process accumulating 2 micro-batches."""
    from sdcore.testing.datasets import make_tiny_dataset
    from sdplugin_dreambooth.method import DreamBoothMethod

    class_data = make_tiny_dataset(tmp_path / "class", n=2, repeats=1)
    overrides = {"lr": 1e-4, "class_data": str(class_data), "prior_loss_weight": 0.5, "max_steps": 3}
    record = check_processes_equal_accumulation(
        DreamBoothMethod, tmp_path, overrides, config_file=CONFIGS / "ddp.yaml", atol=1e-5
    )
    assert record["steps"] == 3
