"""kohya's ``--block_lr`` (sdxl_train.py): 23 U-Net block rates in a full SDXL fine-tune."""

from __future__ import annotations

import json
from dataclasses import fields
from importlib import resources
from pathlib import Path

import pytest
import torch
from sdcore.errors import ConfigError
from sdcore.models.tiny import create_tiny_bundle
from sdcore.testing.datasets import make_tiny_dataset
from sdcore.train import kohya
from sdcore.train.loop import train
from sdplugin_dreambooth.block_lr import block_param_groups, parse_block_lr
from sdplugin_dreambooth.method import DreamBoothMethod
from sdplugin_dreambooth.options import DreamBoothOptions


def _expected_block(name: str) -> int:
    """kohya's block of a diffusers SDXL U-Net parameter, written from the SGM layout (input_blocks
    0 = conv_in, then 3 per down block: 2 resnet(+attention) entries and the downsampler; 3 middle
    entries; 3 per up block with the upsampler in the last), independently of sdcore's key map."""
    parts = name.split(".")
    if parts[0] in ("time_embedding", "add_embedding"):
        return 0
    if parts[0] == "conv_in":
        return 1
    if parts[0] == "down_blocks":
        i, kind = int(parts[1]), parts[2]
        return 2 + 3 * i + (2 if kind == "downsamplers" else int(parts[3]))
    if parts[0] == "mid_block":
        return {"resnets.0": 10, "attentions.0": 11, "resnets.1": 12}[f"{parts[1]}.{parts[2]}"]
    if parts[0] == "up_blocks":
        i, kind = int(parts[1]), parts[2]
        return 13 + 3 * i + (2 if kind == "upsamplers" else int(parts[3]))
    assert parts[0] in ("conv_norm_out", "conv_out"), name
    return 22


def test_each_block_of_the_real_sdxl_unet_gets_its_rate():
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    config = json.loads((resources.files("sdcore.models") / "configs" / "sdxl.json").read_text())["unet"]
    with init_empty_weights():  # SDXL's real layout (2.6 B parameters) on the meta device
        unet = UNet2DConditionModel.from_config(config)
    rates = [(i + 1) * 1e-6 for i in range(23)]
    groups = block_param_groups(unet, rates)
    assert [g["lr"] for g in groups] == rates  # all 23 blocks hold parameters, in kohya's order
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    for name, param in unet.named_parameters():
        assert lr_of[id(param)] == rates[_expected_block(name)], name
    assert sum(len(g["params"]) for g in groups) == len(list(unet.parameters()))


def _options(tmp_path: Path, **overrides) -> DreamBoothOptions:
    base = dict(
        model="tiny:sdxl",
        data=str(make_tiny_dataset(tmp_path / "data", n=2, repeats=1)),
        output=str(tmp_path / "out" / "db.safetensors"),
        resolution=64,
        min_bucket_reso=64,
        max_steps=2,
        lr=1e-3,
        seed=0,
        progress=False,
        save_dtype="fp32",
        save_state=False,
        max_grad_norm=0.0,
    )
    base.update(overrides)
    return DreamBoothOptions(**base)


def test_a_zero_rate_freezes_its_block_and_the_others_train(tmp_path):
    rates = ["1e-3"] * 23
    frozen = (0, 4, 10, 11, 12, 14, 22)  # embeddings, input_blocks.3, the middle block, output_blocks.1, out
    for index in frozen:
        rates[index] = "0"
    bundle = create_tiny_bundle("sdxl")
    before = {k: v.clone() for k, v in bundle.unet.state_dict().items()}
    options = _options(tmp_path, block_lr=",".join(rates))
    method = DreamBoothMethod(options)
    train(method, bundle=bundle)
    from sdcore.models.convert.unet import PREFIX, unet_key_map

    ldm = unet_key_map(list(before), bundle.unet.config)
    after = bundle.unet.state_dict()
    changed_blocks, kept_blocks = set(), set()
    for key, old in before.items():
        head, index = [*ldm[key][len(PREFIX) :].split("."), "0"][:2]
        # kohya's numbering of SGM names (the tiny U-Net has input/output_blocks 0-3 only)
        block = {"time_embed": 0, "label_emb": 0, "out": 22}.get(head)
        if block is None:
            block = {"input_blocks": 1, "middle_block": 10, "output_blocks": 13}[head] + int(index)
        (changed_blocks if not torch.equal(after[key], old) else kept_blocks).add(block)
        if block in frozen:
            assert torch.equal(after[key], old) and not bundle.unet.get_parameter(key).requires_grad, key
    assert changed_blocks == {1, 2, 3, 13, 15, 16}  # every block with a rate trained


def test_kohya_name_values_and_family(tmp_path):
    present = [f.name for f in fields(DreamBoothOptions)]
    text = ",".join(["1e-6"] * 23)
    out = kohya.translate({"block_lr": text}, present, where="cfg")
    assert not out.problems and out.values == {"block_lr": text}
    assert parse_block_lr(text) == [1e-6] * 23
    out = kohya.translate({"block_lr": [1e-6] * 23}, present, where="cfg")  # a TOML list reads the same
    assert not out.problems and parse_block_lr(out.values["block_lr"]) == [1e-6] * 23
    for bad, why in ((",".join(["1e-6"] * 22), "needs 23 values"), ("a,b", "23 comma-separated numbers"),
                     (",".join(["1e-6"] * 22 + ["-1"]), "0 \\(frozen\\) or positive")):  # fmt: skip
        with pytest.raises(ConfigError, match=why):
            DreamBoothMethod(_options(tmp_path, block_lr=bad)).validate()
    method = DreamBoothMethod(_options(tmp_path, block_lr=text))
    assert method.family_problems("sdxl") == []
    assert "kohya's sdxl_train.py option" in method.family_problems("sd1")[0]


def test_use_safetensors_is_accepted_with_a_note(tmp_path):
    """kohya's --use_safetensors (train_db/fine_tune/sdxl_train.py): sdcore writes safetensors anyway."""
    from sdcore.train.config import load_options

    cfg = tmp_path / "k.toml"
    cfg.write_text("use_safetensors = true\n", encoding="utf-8")
    notes: list[str] = []
    load_options(DreamBoothOptions, cfg, notes=notes)
    assert any(n.startswith("use_safetensors: sdcore always writes .safetensors") for n in notes)
    assert "use_safetensors" in kohya.flag_names()
    cfg.write_text("use_safetensors = false\n", encoding="utf-8")
    notes.clear()
    load_options(DreamBoothOptions, cfg, notes=notes)
    assert not any("use_safetensors" in n for n in notes)
