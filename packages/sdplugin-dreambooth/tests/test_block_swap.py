"""--blocks-to-swap on a FLUX.1/SD3 full fine-tune (kohya's flux_train.py --blocks_to_swap with
--fused_backward_pass and Adafactor): the swapped blocks' trained weights live on the CPU and step in
backward, and the trained weights equal the unswapped run's bit for bit.

The command file follows the shape of kohya's README FLUX.1 fine-tuning command (sd-scripts before 884fc8c:
``flux_train.py ... --optimizer_type adafactor --optimizer_args "relative_step=False" "scale_parameter=False"
"warmup_init=False" --max_grad_norm 0.0 ... --fused_backward_pass --blocks_to_swap 8 --full_bf16``), written
here with a tiny model and fp32 so the CPU comparison is exact."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from sdcore.plugins import get_plugin_manager
from sdcore.testing.datasets import make_tiny_dataset


def _command(tmp_path: Path, tag: str, extra: str) -> Path:
    data = tmp_path / "data"
    if not data.exists():
        make_tiny_dataset(data, n=2, repeats=1)
    text = (
        "accelerate launch --mixed_precision no --num_cpu_threads_per_process 1 flux_train.py \\\n"
        "  --pretrained_model_name_or_path tiny:flux --save_model_as safetensors --sdpa \\\n"
        f"  --seed 42 --mixed_precision no --save_precision float --train_data_dir {data} --resolution 64 \\\n"
        f"  --output_dir {tmp_path / tag} --output_name flux-ft --learning_rate 5e-5 --max_train_steps 2 \\\n"
        '  --optimizer_type adafactor --optimizer_args "relative_step=False" "scale_parameter=False" '
        '"warmup_init=False" \\\n'
        "  --lr_scheduler constant_with_warmup --max_grad_norm 0.0 \\\n"
        "  --timestep_sampling shift --discrete_flow_shift 3.1582 --model_prediction_type raw --guidance_scale 1.0 \\\n"
        f"  --fused_backward_pass {extra}\n"
    )
    path = tmp_path / f"{tag}.sh"
    path.write_text(text)
    return path


def test_kohyas_flux_fine_tune_command_with_block_swap_trains_the_unswapped_weights(tmp_path, sd_cli):
    pm = get_plugin_manager()
    swapped = sd_cli(["train", "dreambooth", "--config", str(_command(tmp_path, "swap", "--blocks_to_swap 2")),
                      "--no-progress"], pm=pm)  # fmt: skip
    assert swapped.exit_code == 0, swapped.output
    assert "block swap: the last 2 blocks' trained weights stay in host memory" in swapped.output
    plain = sd_cli(["train", "dreambooth", "--config", str(_command(tmp_path, "plain", "")), "--no-progress"], pm=pm)
    assert plain.exit_code == 0, plain.output
    got = load_file(str(tmp_path / "swap" / "flux-ft.safetensors"))
    want = load_file(str(tmp_path / "plain" / "flux-ft.safetensors"))
    assert got.keys() == want.keys() and len(got) > 50
    for key, value in want.items():
        assert torch.equal(got[key], value), key
    # the swapped blocks (the last two: single blocks 0 and 1 of the tiny FLUX.1) trained
    from sdcore.models.family import family_adapter
    from sdcore.models.flux.convert import diffusers_to_bfl

    start = diffusers_to_bfl(family_adapter("flux").create_tiny().denoiser.state_dict(), "model.diffusion_model.")
    for block in ("single_blocks.0.", "single_blocks.1."):
        keys = [k for k in want if block in k]
        assert keys and all(not torch.equal(want[k], start[k].to(want[k].dtype)) for k in keys), block


def test_kohyas_docs_command_without_the_fused_backward_pass_is_refused_with_the_reason(tmp_path, sd_cli):
    """docs/fine_tune.md's FLUX.1 example gives --blocks_to_swap 18 alone: kohya's optimizer would then meet the
    swapped weights on the CPU after backward; sdcore says what to add before any model loads."""
    data = make_tiny_dataset(tmp_path / "data", n=2, repeats=1)
    path = tmp_path / "docs.sh"
    path.write_text(
        "accelerate launch --mixed_precision bf16 flux_train.py \\\n"
        f"  --pretrained_model_name_or_path tiny:flux --train_data_dir {data} --resolution 64 \\\n"
        f"  --output_dir {tmp_path / 'out'} --output_name flux1_finetuned --learning_rate 1e-5 \\\n"
        "  --blocks_to_swap 4\n"
    )
    result = sd_cli(["train", "dreambooth", "--config", str(path), "--no-progress", "--dry-run"],
                    pm=get_plugin_manager())  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "--blocks-to-swap 4: this method trains the swapped blocks' own weights" in result.output
    assert "add --fused-backward-pass with --optimizer adafactor" in result.output
    assert "Traceback" not in result.output
