"""kohya's script names on ``sdcore lora resize|merge|extract|convert`` (a newcomer's audit).

A kohya user types resize_lora.py's ``--model`` (the LoRA to resize) and got "Did you mean --base-model?", the
base checkpoint; merge_lora.py's ``--sd_model``/``--models`` were offered ``--base-model``, ``--save_to``
``--save-dtype``, ``--sdxl`` ``--model``: near spellings of other meanings. Each now says sdcore's way.
"""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from sdplugin_lora.commands import lora_group

_FAMILY = "not needed: sdcore reads the model family"


@pytest.mark.parametrize(
    ("command", "option", "expected"),
    [
        ("resize", "--model", "the LoRA to resize, is the FILE argument here"),
        ("resize", "--new_rank", "did you mean --rank?"),
        ("resize", "--new_conv_rank", "did you mean --conv-rank?"),
        ("resize", "--dynamic_method", "did you mean --dynamic?"),
        ("resize", "--dynamic_param", "did you mean --dynamic-param? sdcore's options are written with hyphens"),
        ("resize", "--save_to", "kohya's --save_to is -o/--output here"),
        ("resize", "--sdxl", _FAMILY),
        ("merge", "--sd_model", "did you mean --model? kohya's merge_lora.py --sd_model, the checkpoint to merge into"),
        ("merge", "--models", "the LoRA files are the arguments here"),
        ("merge", "--ratios", "each ratio follows its file"),
        ("merge", "--new_rank", "--rank with --mode svd"),
        ("merge", "--save_precision", "did you mean --save-dtype?"),
        ("merge", "--v2", _FAMILY),
        ("merge", "--clamp_quantile", "did you mean --clamp-quantile?"),
        ("extract", "--model_org", "BASE, the first argument"),
        ("extract", "--model_tuned", "TUNED, the second argument"),
        ("extract", "--dim", "did you mean --rank?"),
        ("extract", "--conv_dim", "did you mean --conv-rank?"),
        ("extract", "--save-precision", "did you mean --save-dtype?"),
        ("convert", "--save_to", "-o/--output here"),
    ],
)
def test_kohya_script_names_say_sdcore_option(command, option, expected):
    args = {"resize": ["a.safetensors", "--rank", "2"], "extract": ["a", "b"], "convert": ["a.safetensors"]}
    result = CliRunner().invoke(lora_group, [command, *args.get(command, ["a.safetensors"]), option, "x"])
    assert result.exit_code == 2, result.output
    assert f"No such option: {option} (" in result.output and expected in result.output, result.output


def test_other_unknown_names_keep_click_message():
    result = CliRunner().invoke(lora_group, ["resize", "a.safetensors", "--rnak", "2"])
    assert result.exit_code == 2 and "Did you mean '--rank'?" in result.output, result.output
