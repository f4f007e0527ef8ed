"""A network tag in ``--sample-prompts`` is a pre-flight problem: sample renders apply no ``<lora:...>`` from the
prompt, so the first sample would otherwise stop the run mid-training."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from runtime_methods import ConvOutMethod
from sdcore.errors import NetworkMismatchError
from sdcore.models.tiny import create_tiny_bundle
from sdcore.specs import MethodSpec
from sdcore.testing.contract import contract_options
from sdcore.train.cli import build_train_command
from sdcore.train.preflight import option_problems
from sdcore.train.sampling import render_samples


def test_tags_in_sample_prompts_stop_the_run_in_the_preflight_not_at_the_first_sample(tmp_path, no_model_load):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat <lora:style:0.8> --n ugly <hypernet:x:1>\na dog\na bird <lora::1>\n")
    o = contract_options(ConvOutMethod, tmp_path, {"sample_prompts": str(prompts), "sample_every": 2})
    result = CliRunner().invoke(
        build_train_command(MethodSpec(name="convout", summary="test", method="runtime_methods:ConvOutMethod")),
        ["--model", "tiny:sd1", "--data", o.data, "--output", str(tmp_path / "r.safetensors"),
         "--sample-prompts", str(prompts), "--sample-every", "2", "--max-steps", "2"],
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 3 and "Traceback" not in result.output, result.output
    assert errors[0].startswith("Error: --sample-prompts: <lora:style:0.8>: sample images apply no networks")
    assert errors[1].startswith("Error: --sample-prompts: <hypernet:x:1>: ")  # the negative's too
    assert errors[2].startswith("Error: --sample-prompts: ") and "<lora::1>" in errors[2]  # malformed
    assert option_problems(contract_options(ConvOutMethod, tmp_path, {"sample_prompts": "a dog"})) == []


def test_the_render_would_fail_on_the_tag(tmp_path):
    """Why the pre-flight refuses it: the sample render has no handler for the tag."""
    o = contract_options(ConvOutMethod, tmp_path, {"sample_prompts": "a cat <lora:style:0.8>", "sample_steps": 1})
    with pytest.raises(NetworkMismatchError, match=r"no handler for <lora:style:0\.8>"):
        render_samples(
            create_tiny_bundle("sd1"), ConvOutMethod(o), o, device="cpu", folder=tmp_path / "s", tag="t", step=0
        )
