"""A kohya rate of 0 keeps that part frozen (sd-scripts 48d368f).

The expectations are kohya's rules, rewritten here:
- ``train_network.py`` decides what trains from ``--network_train_unet_only`` / ``--network_train_text_encoder_only``
  alone (L707-709) and hands ``text_encoder_lr`` / ``unet_lr`` to the network's ``prepare_optimizer_params``
  (L732-746), where ``assemble_params`` leaves a group whose rate is 0 out of the optimizer ("NO LR skipping!":
  ``networks/lora.py`` L1181-1183, ``lora_flux.py`` and ``lora_sd3.py`` the same); ``lora_flux.py`` puts the
  ``network_reg_lrs`` groups first, each at its rule's rate, so a module a rule matches still trains when its
  part's rate is 0;
- the kohya_ss GUI (``lora_gui.py`` ``resolve_network_train_flags`` and the TOML it writes, ``unet_lr`` /
  ``text_encoder_lr`` None when 0) turns a 0 into train flags and writes no 0 rate (tests/test_kohya_gui.py).
DreamBooth's ``learning_rate_te`` 0: sdplugin-dreambooth's test_full_finetune_options.py.
"""

from __future__ import annotations

import re

import pytest
from sdcore.errors import ConfigError
from sdcore.train.config import load_options
from sdplugin_lora.method import LoraMethod, LoraOptions
from test_lora_options_te_lr_filter import _bundle, _got, _kohya_multi_te_groups
from test_module_ranks import _kohya_name


def _lora(kohya):
    notes: list[str] = []
    return LoraMethod(load_options(LoraOptions, None, kohya=kohya, notes=notes)), notes


@pytest.mark.parametrize("te_value", [0, 0.0, [0], [0.0, 0.0]])
def test_text_encoder_lr_zero_keeps_the_text_encoders_untrained(te_value):
    method, notes = _lora({"network_module": "networks.lora", "learning_rate": 1e-3, "unet_lr": 2e-4,
                           "text_encoder_lr": te_value})  # fmt: skip
    assert method.options.te_lr == 0.0 and method.options.train_text_encoder and not method.options.unet_only
    assert any(n.startswith("text_encoder_lr = 0: the text encoders' LoRA modules stay untrained") for n in notes)
    groups = method.prepare(_bundle("sdxl"))
    assert any(m.lora_name.startswith("lora_te") for m in method.network)  # kohya builds them (train_text_encoder)
    assert _got(groups) == _kohya_multi_te_groups(method.network, {1: 0.0, 2: 0.0}, 1e-3, 2e-4)
    assert [g["name"] for g in groups] == ["unet"]


def test_unet_lr_zero_keeps_the_unet_untrained():
    method, notes = _lora({"network_module": "networks.lora", "learning_rate": 1e-3, "unet_lr": 0,
                           "text_encoder_lr": 5e-5})  # fmt: skip
    assert method.options.unet_lr == 0.0
    assert "unet_lr = 0: the U-Net's LoRA modules stay untrained (kohya leaves a 0-rate group out of the optimizer)" in notes  # fmt: skip
    bundle = _bundle("sdxl")
    groups = method.prepare(bundle)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    want = {id(p): 5e-5 for m in method.network if m.lora_name.startswith("lora_te") for p in m.parameters()}
    assert lr_of == want and want  # networks.lora: the text encoders at text_encoder_lr, the 0-rate U-Net left out
    assert method.metadata(bundle, _info())["ss_unet_lr"] == "0.0"  # kohya records args.unet_lr as given


def _info():
    from pathlib import Path

    from sdcore.train.method import SaveInfo

    return SaveInfo(path=Path("x.safetensors"), step=1, epoch=1, metadata={}, final=True)


def test_reg_lrs_rule_still_trains_its_modules_when_the_unet_rate_is_zero():
    """lora_flux: the network_reg_lrs groups come first, at their rule's rate, whatever unet_lr says."""
    method, notes = _lora({"network_module": "networks.lora_flux", "network_dim": 2, "learning_rate": 1e-4,
                           "unet_lr": 0, "network_train_unet_only": True,
                           "network_args": ["network_reg_lrs=img_attn=1e-5"]})  # fmt: skip
    assert any(n.startswith("unet_lr = 0") and "except the modules a network_reg_lrs rule" in n for n in notes)
    groups = method.prepare(_bundle("flux"))
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    trained = 0
    for module in method.network:
        name = _kohya_name(method, module.lora_name)
        for param in module.parameters():
            want = 1e-5 if re.search("img_attn", name) else 0.0  # kohya: the rule, else unet_lr 0 (skipped)
            assert lr_of.get(id(param), 0.0) == want, name
            trained += want > 0
    assert trained


def test_every_rate_zero_is_a_one_line_error():
    method, _ = _lora({"network_module": "networks.lora", "learning_rate": 1e-3, "unet_lr": 0, "text_encoder_lr": 0})
    with pytest.raises(ConfigError, match="every LoRA module's learning rate is 0"):
        method.prepare(_bundle("sd1"))


def test_sdcore_te_lr_zero_on_the_command_line_is_zero_too():
    """--te-lr 0 was read as "unset" (``te_lr or lr``): it trained the text encoder at --lr."""
    method = LoraMethod(LoraOptions(rank=2, lr=1e-3, te_lr=0.0, train_text_encoder=True))
    assert [g["name"] for g in method.prepare(_bundle("sd1"))] == ["unet"]
