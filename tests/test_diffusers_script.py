"""diffusers example-script commands as ``--config`` (sdcore.train.diffusers_script).

Expected values are the scripts' own (diffusers examples/ at 58eb52c): the argument the command gives, else the
argparse default at the cited line of that script.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

FLUX_COMMAND = """\
export MODEL_NAME="black-forest-labs/FLUX.1-dev"
export INSTANCE_DIR="dog"
accelerate launch train_dreambooth_lora_flux.py \\
  --pretrained_model_name_or_path=$MODEL_NAME --instance_data_dir=${INSTANCE_DIR} --instance_prompt="a photo of sks dog" \\
  --output_dir=trained-flux-lora --mixed_precision=bf16 --resolution=512 --train_batch_size=1 \\
  --guidance_scale=1 --gradient_accumulation_steps=4 --optimizer=prodigy --learning_rate=1. --rank=16 \\
  --lr_scheduler=constant --lr_warmup_steps=0 --max_train_steps=500 --validation_prompt="A photo of sks dog in a bucket" \\
  --validation_epochs=25 --seed=0
"""


def _images(folder: Path, n: int = 2, size: int = 64) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (size, size), (40 * i, 90, 150)).save(folder / f"{i}.png")
    return folder


def _write(tmp_path: Path, text: str, name: str = "train.sh") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _load(path: Path, overrides: dict | None = None, method: str = "lora", notes: list | None = None):
    from sdcore.train.config import load_options

    if method == "lora":
        from sdplugin_lora.method import LoraOptions as cls
    else:
        from sdplugin_dreambooth.options import DreamBoothOptions as cls
    return load_options(cls, path, overrides or {}, notes=notes)


def _problems(path: Path, method: str = "lora") -> list[str]:
    from sdcore.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        _load(path, method=method)
    return list(info.value.args[1]) if len(info.value.args) > 1 else [str(info.value)]


def test_flux_lora_command_translates_with_the_scripts_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = _write(tmp_path, FLUX_COMMAND)
    notes: list[str] = []
    o = _load(path, {"model": "tiny:flux"}, notes=notes)
    expected = {
        "model": "tiny:flux",  # the command line wins over --pretrained_model_name_or_path
        "data": str(path),
        "output": "trained-flux-lora/pytorch_lora_weights.safetensors",
        "rank": 16,
        "alpha": 4,  # --lora_alpha default 4 (train_dreambooth_lora_flux.py:381), not the rank
        "lr": 1.0,
        "optimizer": "prodigy",
        "batch_size": 1,
        "gradient_accumulation": 4,
        "max_steps": 500,
        "lr_scheduler": "constant",
        "lr_warmup_steps": 0,
        "mixed_precision": "bf16",
        "resolution": 512,
        "buckets": False,
        "flip": False,
        "random_crop": False,
        "guidance_scale": 1.0,
        "t5xxl_max_token_length": 512,  # :348
        "timestep_sampling": "sigma",
        "weighting_scheme": "uniform",  # --weighting_scheme none (:542)
        "discrete_flow_shift": 1.0,
        "model_prediction_type": "raw",
        "seed": 0,
        "sample_prompts": "A photo of sks dog in a bucket",
        "sample_every_epochs": 25,
        "save_every": 500,  # --checkpointing_steps default (:453)
        "save_limit": 0,  # --checkpoints_total_limit None: keep all
        "key_layout": "diffusers",
        "split_qkv": True,
        "layer_filter_regex": True,
    }
    assert {k: getattr(o, k) for k in expected} == expected
    # prodigy with the script's betas (:574, :577), weight decay (:588), eps (:602) and its bool flags (:587, :609, :615)
    assert o.optimizer_args == (
        "betas=0.9,0.999 weight_decay=0.0001 eps=1e-08 decouple=True use_bias_correction=True safeguard_warmup=True"
    )
    assert any("--mixed_precision bf16" in n for n in notes)


def test_flux_lora_target_regex_is_peft_suffix_matching():
    from sdcore.train.diffusers_script import TARGETS, peft_target_regex

    patterns = peft_target_regex(TARGETS["train_dreambooth_lora_flux.py"][0]).split(",")

    def kept(path: str) -> bool:
        return any(re.search(p, path) for p in patterns)

    assert kept("transformer_blocks.0.attn.to_q") and kept("single_transformer_blocks.3.attn.to_k")
    assert kept("transformer_blocks.0.ff.net.0.proj") and not kept("single_transformer_blocks.3.proj_mlp")
    assert not kept("transformer_blocks.0.norm1.linear") and not kept("transformer_blocks.0.attn.to_out.0x")


@pytest.mark.skipif(shutil.which("sdcore") is None, reason="the sdcore command is not installed")
def test_flux_command_dry_run_and_two_steps_train_the_scripts_modules(tmp_path):
    _images(tmp_path / "dog")
    _write(tmp_path, FLUX_COMMAND)
    base = ["sdcore", "train", "lora", "--config", "train.sh", "--model", "tiny:flux", "--resolution", "64",
            "--mixed-precision", "no", "--no-progress"]  # fmt: skip
    dry = subprocess.run([*base, "--dry-run"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert dry.returncode == 0, dry.stderr
    assert "2 training images" in dry.stdout + dry.stderr
    run = subprocess.run([*base, "--max-steps", "2", "--gradient-accumulation", "1"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=400)  # fmt: skip
    assert run.returncode == 0, run.stderr
    from safetensors import safe_open

    with safe_open(tmp_path / "trained-flux-lora" / "pytorch_lora_weights.safetensors", "pt") as f:
        keys = set(f.keys())
    modules = {re.sub(r"\.\d+\.", ".N.", k.rsplit(".lora_", 1)[0]) for k in keys}
    # the script's list (train_dreambooth_lora_flux.py:1257) matched as PEFT matches it
    expected = {f"transformer.transformer_blocks.N.{m}" for m in (
        "attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
        "attn.to_add_out", "ff.net.N.proj", "ff_context.net.N.proj")}  # fmt: skip
    expected |= {"transformer.transformer_blocks.N.attn.to_out.0", "transformer.transformer_blocks.N.ff.net.2",
                 "transformer.transformer_blocks.N.ff_context.net.2"}  # fmt: skip
    expected |= {f"transformer.single_transformer_blocks.N.attn.{m}" for m in ("to_q", "to_k", "to_v")}
    assert modules == expected


def test_sd3_dreambooth_lora_with_prior_preservation(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _images(tmp_path / "dog")
    _images(tmp_path / "class", n=3)
    text = (
        "accelerate launch train_dreambooth_lora_sd3.py --pretrained_model_name_or_path=x "
        "--instance_data_dir=dog --instance_prompt='a sks dog' --with_prior_preservation --class_data_dir=class "
        "--class_prompt='a dog' --num_class_images=3 --prior_loss_weight=0.5 --rank=8 --center_crop --random_flip\n"
    )
    path = _write(tmp_path, text)
    o = _load(path, {"model": "tiny:sd3"})
    assert (o.rank, o.alpha, o.lr, o.batch_size, o.epochs) == (8, 8, 1e-4, 4, 1)  # lora_alpha=rank; :475 :426 :432
    assert (o.timestep_sampling, o.weighting_scheme, o.model_prediction_type) == ("sigma", "logit_normal", "x0")
    assert (o.discrete_flow_shift, o.t5xxl_max_token_length, o.prior_loss_weight) == (3.0, 77, 0.5)
    assert (o.flip, o.random_crop, o.resolution) == (True, False, 512)
    assert "weight_decay=0.0001" in o.optimizer_args  # :573
    from sdcore.data.dataset import scan_dataset

    index = scan_dataset(o, verify=False)
    captions = sorted({(e.subset.is_class, e.caption) for e in index.entries})
    assert captions == [(False, "a sks dog"), (True, "a dog")]
    # fewer class images than --num_class_images: the script would generate them, sdcore's LoRA cannot
    short = _write(tmp_path, text.replace("--num_class_images=3", "--num_class_images=10"), "short.sh")
    assert any("holds 3 of --num_class_images 10" in p for p in _problems(short))


def test_sdxl_text_to_image_lora_command(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = _images(tmp_path / "pics")
    for i in range(2):
        (folder / f"{i}.txt").write_text("a picture")
    path = _write(tmp_path, (
        "accelerate launch --mixed_precision=fp16 train_text_to_image_lora_sdxl.py --pretrained_model_name_or_path=m "
        "--train_data_dir=pics --snr_gamma=5.0 --noise_offset 0.05 --rank 8 --checkpointing_steps=100 "
        "--use_8bit_adam\n"))  # fmt: skip
    o = _load(path, {"model": "tiny:sdxl"})
    assert (o.data, o.batch_size, o.epochs, o.resolution, o.lr) == ("pics", 16, 100, 1024, 1e-4)  # :320 :323 :292 :366
    assert (o.min_snr_gamma, o.noise_offset, o.rank, o.alpha, o.save_every) == (5.0, 0.05, 8, 8, 100)
    assert (o.optimizer, o.mixed_precision, o.key_layout, o.buckets) == ("adamw8bit", "fp16", "kohya", False)
    assert "weight_decay=0.01" in o.optimizer_args  # :418
    assert o.output == "sd-model-finetuned-lora/pytorch_lora_weights.safetensors"  # :279


def test_control_lora_command(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = _write(
        tmp_path,
        (
            "accelerate launch train_control_lora_flux.py --pretrained_model_name_or_path=m --jsonl_for_train=t.jsonl "
            "--rank=64 --use_lora_bias --lora_layers=attn.to_q,attn.to_k --validation_prompt=x --validation_steps=20\n"
        ),
    )
    o = _load(path, {"model": "tiny:flux"})
    assert (o.control_lora, o.data, o.rank, o.alpha, o.lora_bias, o.lora_layers) == (
        True,
        "t.jsonl",
        64,
        64,
        True,
        "attn.to_q,attn.to_k",
    )
    assert (o.guidance_scale, o.lr, o.resolution, o.sample_every) == (30.0, 5e-6, 1024, 20)  # :542 :353 :269
    assert o.layer_filter is None


def test_problems_come_all_at_once_before_any_model_loads(tmp_path):
    path = _write(
        tmp_path,
        (
            "accelerate launch train_dreambooth_lora_flux.py --pretrained_model_name_or_path=m "
            "--dataset_name=org/dogs --instance_prompt=x --frobnicate=3 --prediction_type=epsilon\n"
        ),
    )
    problems = " | ".join(_problems(path))
    assert "--dataset_name 'org/dogs' is a Hugging Face hub dataset" in problems
    assert "--frobnicate" in problems
    assert "--prediction_type" in problems
    other = _write(tmp_path, "accelerate launch train_dreambooth_lora_sana.py --rank=4\n", "sana.sh")
    assert any("model family sdcore does not train" in p for p in _problems(other))


def test_full_fine_tune_script_with_train_lora_names_the_right_command(tmp_path):
    path = _write(tmp_path, "python train_dreambooth.py --pretrained_model_name_or_path=m --instance_data_dir=d "
                            "--instance_prompt=x\n")  # fmt: skip
    assert any("sdcore train dreambooth --config" in p for p in _problems(path))


def test_variables_are_substituted_and_unset_ones_named(tmp_path, monkeypatch):
    from sdcore.train.diffusers_script import read_command

    monkeypatch.setenv("FROM_ENV", "/data/dog")
    path = _write(tmp_path, 'A=1e-4\nexport B="$A"\npython train_dreambooth_lora.py --learning_rate $B '
                            '--instance_data_dir=${FROM_ENV} --output_dir=$NOPE  # comment\n')  # fmt: skip
    command = read_command(path)
    assert command is not None
    assert command.args["learning_rate"] == "1e-4" and command.args["instance_data_dir"] == "/data/dog"
    assert command.problems == [f"{path}: variable(s) not set: NOPE"]
    assert read_command(_write(tmp_path, "just some text\n", "notes.txt")) is None


def test_sd1_dreambooth_lora_targets_match_as_peft_matches_them(tmp_path, monkeypatch):
    """train_dreambooth_lora.py:945 lists add_k_proj/add_v_proj, which an SD1.5 UNet lacks: PEFT adapts the names
    that match (it fails only when none does), so the run adapts to_q/to_k/to_v/to_out.0 and does not fail."""
    from sdplugin_lora.targets import list_targets

    monkeypatch.chdir(tmp_path)
    _images(tmp_path / "dog")
    path = _write(tmp_path, "accelerate launch train_dreambooth_lora.py --pretrained_model_name_or_path=m "
                            "--instance_data_dir=dog --instance_prompt='a sks dog'\n")  # fmt: skip
    report = list_targets(_load(path, {"model": "tiny:sd1"}))
    paths = {p for row in report.rows for p in row.paths}
    assert paths and {p.rsplit(".", 1)[-1] if not p.endswith("to_out.0") else "to_out.0" for p in paths} == {
        "to_q", "to_k", "to_v", "to_out.0"}  # fmt: skip
    # every pattern matches something: one PEFT list is one pattern (nothing matched at all is still refused)
    assert [m.pattern for m in report.patterns] == [_load(path, {"model": "tiny:sd1"}).layer_filter]


def test_text_to_image_lora_sdxl_crops_and_flips_each_time_an_image_is_used(tmp_path, monkeypatch):
    """train_text_to_image_lora_sdxl.py:942-960 runs preprocess_train through dataset.with_transform (:982): a new
    RandomCrop and flip coin on every access, as train_text_to_image_lora.py's Compose; no build-time crop."""
    monkeypatch.chdir(tmp_path)
    _images(tmp_path / "pics")
    notes: list[str] = []
    path = _write(tmp_path, "accelerate launch train_text_to_image_lora_sdxl.py --pretrained_model_name_or_path=m "
                            "--train_data_dir=pics --random_flip\n")  # fmt: skip
    o = _load(path, {"model": "tiny:sdxl"}, notes=notes)
    assert (o.random_crop, o.cache_latents, o.flip) == (True, False, True)
    assert not any("when it builds the dataset" in n for n in notes)
    centre = _load(_write(tmp_path, path.read_text().replace("--random_flip", "--center_crop"), "c.sh"),
                   {"model": "tiny:sdxl"})  # fmt: skip
    assert (centre.random_crop, centre.flip) == (False, False)


def test_control_lora_command_notes_the_stretch_not_a_crop(tmp_path, monkeypatch):
    """train_control_lora_flux.py:681 resizes both images to a --resolution square (no crop, no --center_crop)."""
    monkeypatch.chdir(tmp_path)
    notes: list[str] = []
    path = _write(tmp_path, "accelerate launch train_control_lora_flux.py --pretrained_model_name_or_path=m "
                            "--jsonl_for_train=t.jsonl\n")  # fmt: skip
    _load(path, {"model": "tiny:flux"}, notes=notes)
    assert not any("random crop" in n for n in notes)
    assert any("stretches" in n for n in notes)


def test_shell_words_as_bash_reads_them(tmp_path, monkeypatch):
    """bash's own rules: an environment prefix (``VAR=x command``) runs the command; ``${VAR:-default}`` /
    ``${VAR-default}`` take the default when the variable is unset (``:-`` also when empty); nothing is substituted
    inside single quotes; ``export A=1 B=2`` sets both."""
    from sdcore.train.diffusers_script import read_command

    monkeypatch.delenv("RDIFF_UNSET", raising=False)
    monkeypatch.setenv("RDIFF_EMPTY", "")
    text = (
        "export A=1 B='x y'\n"
        "CUDA_VISIBLE_DEVICES=0 accelerate launch train_dreambooth_lora_flux.py --rank=${RDIFF_UNSET:-8} \\\n"
        "  --output_dir=${RDIFF_EMPTY:-out} --seed=${RDIFF_EMPTY-7} --repeats=${A:-5} \\\n"
        "  --instance_prompt='costs $A' --validation_prompt=\"$B\"\n"
    )
    command = read_command(_write(tmp_path, text))
    assert command is not None and command.problems == []
    assert command.script == "train_dreambooth_lora_flux.py"
    assert command.args == {"rank": "8", "output_dir": "out", "seed": "", "repeats": "1",
                            "instance_prompt": "costs $A", "validation_prompt": "x y"}  # fmt: skip


def test_continuation_with_trailing_spaces_and_crlf(tmp_path):
    """A ``\\`` followed by spaces before the line end (a common copy-paste slip, and CRLF files) still continues
    the command, instead of a cryptic 'No escaped character'."""
    from sdcore.train.diffusers_script import read_command

    text = "accelerate launch train_dreambooth_lora_flux.py \\  \r\n  --rank=8 \\\t\r\n  --seed=1\r\n"
    command = read_command(_write(tmp_path, text))
    assert command is not None and (command.args, command.problems) == ({"rank": "8", "seed": "1"}, [])


def test_unsupported_expansion_is_named(tmp_path):
    from sdcore.train.diffusers_script import read_command

    command = read_command(_write(tmp_path, "python train_dreambooth_lora.py --rank=${R:+4} --seed=$(date +%s)\n"))
    assert command is not None
    assert any("${R:+4}" in p and "$(date +%s)" in p for p in command.problems)
    used = read_command(_write(tmp_path, "D=$(pwd)/dog\nT=$(date)\npython train_dreambooth_lora.py --instance_data_dir=$D\n",
                               "used.sh"))  # fmt: skip
    assert used is not None and used.problems == [f"{tmp_path / 'used.sh'}: shell expansion(s) sdcore does not run: "
                                                  "$(pwd) (write the value)"]  # fmt: skip


def test_train_text_encoder_adapts_the_scripts_clip_modules_only(tmp_path, monkeypatch):
    """--train_text_encoder: the LoRA scripts give CLIP a PEFT config with target_modules q_proj, k_proj, v_proj,
    out_proj (train_dreambooth_lora_sdxl.py:1237, train_dreambooth_lora_flux.py:1287, train_dreambooth_lora.py:956,
    train_dreambooth_lora_sd3.py:1283), so the MLP (fc1/fc2) is not adapted."""
    from sdplugin_lora.targets import list_targets

    monkeypatch.chdir(tmp_path)
    _images(tmp_path / "dog")
    path = _write(tmp_path, "accelerate launch train_dreambooth_lora_sdxl.py --pretrained_model_name_or_path=m "
                            "--instance_data_dir=dog --instance_prompt='a sks dog' --train_text_encoder\n")  # fmt: skip
    report = list_targets(_load(path, {"model": "tiny:sdxl"}))
    te = {row.name for row in report.rows if row.text_encoder}
    assert {re.sub(r"^lora_te\d_text_model_encoder_layers_\d+_", "", n) for n in te} == {
        "self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj"}  # fmt: skip
    assert {n[:8] for n in te} == {"lora_te1", "lora_te2"}


def test_text_encoder_weight_decay_default_is_noted(tmp_path, monkeypatch):
    """The text-encoder group's decay is --adam_weight_decay_text_encoder, default 1e-3 (train_dreambooth_lora_flux.py:590,
    used at :1396), while the transformer's is 1e-4 (:588): sdcore has one decay, so the note comes without the
    argument too; none where the script has no such argument (train_dreambooth_lora.py) or the two agree."""
    monkeypatch.chdir(tmp_path)
    base = "accelerate launch {} --pretrained_model_name_or_path=m --instance_data_dir=d --instance_prompt=x {}\n"
    for script, extra, model, expected in (
        ("train_dreambooth_lora_flux.py", "--train_text_encoder", "tiny:flux", True),
        ("train_dreambooth_lora_flux.py", "", "tiny:flux", False),
        ("train_dreambooth_lora_flux.py", "--train_text_encoder --adam_weight_decay_text_encoder=1e-4", "tiny:flux",
         False),
        ("train_dreambooth_lora.py", "--train_text_encoder", "tiny:sd1", False),
    ):  # fmt: skip
        notes: list[str] = []
        _load(_write(tmp_path, base.format(script, extra)), {"model": model}, notes=notes)
        assert any("--adam_weight_decay_text_encoder" in n for n in notes) == expected, (script, extra)


def test_lora_dropout_is_peft_input_dropout(tmp_path):
    """The scripts pass --lora_dropout to PEFT's LoraConfig (train_dreambooth_lora_flux.py: default 0.0), whose
    dropout acts on each LoRA module's input: sdcore's --lora-input-dropout, not kohya's --dropout on the down
    output."""
    data = _images(tmp_path / "dog")
    path = _write(
        tmp_path,
        f"accelerate launch train_dreambooth_lora_flux.py --pretrained_model_name_or_path=m --instance_data_dir={data} "
        "--instance_prompt='a photo of sks dog' --lora_dropout=0.1\n",
    )
    o = _load(path, {"model": "tiny:flux"})
    assert (o.lora_input_dropout, o.dropout) == (0.1, None)


def test_arguments_the_script_does_not_define_are_problems_naming_it(tmp_path):
    """argparse stops a script on an argument it does not define ("unrecognized arguments"): --lora_alpha exists
    only in train_dreambooth_lora_flux.py, --random_flip not in train_dreambooth_lora.py (58eb52c)."""
    data = _images(tmp_path / "dog")
    sdxl = _write(tmp_path, f"accelerate launch train_dreambooth_lora_sdxl.py --pretrained_model_name_or_path=m "
                            f"--instance_data_dir={data} --instance_prompt=x --lora_alpha=8\n", "sdxl.sh")  # fmt: skip
    problems = _problems(sdxl)
    assert any("--lora_alpha" in p and "not argument(s) of train_dreambooth_lora_sdxl.py" in p for p in problems)
    sd1 = _write(tmp_path, f"accelerate launch train_dreambooth_lora.py --pretrained_model_name_or_path=m "
                           f"--instance_data_dir={data} --instance_prompt=x --random_flip --rank=8\n", "sd1.sh")  # fmt: skip
    problems = _problems(sd1)
    assert [p for p in problems if "not argument(s)" in p] == [
        f"{sd1}: train_dreambooth_lora.py: --random_flip: not argument(s) of train_dreambooth_lora.py (its argparse "
        "stops with 'unrecognized arguments')"
    ]
    from sdcore.train.diffusers_script import SCRIPT_ARGS

    assert "lora_alpha" in SCRIPT_ARGS["train_dreambooth_lora_flux.py"]
    assert "random_flip" in SCRIPT_ARGS["train_dreambooth_lora_sdxl.py"]


def _script_kept_checkpoints(limit: int | None, saves: int) -> int:
    """How many checkpoint folders the scripts keep after ``saves`` saves: before each, when len >= limit, they
    delete the len - limit + 1 oldest (train_dreambooth_lora_flux.py:1869-1876)."""
    kept: list[int] = []
    for step in range(saves):
        if limit is not None and len(kept) >= limit:
            del kept[: len(kept) - limit + 1]
        kept.append(step)
    return len(kept)


@pytest.mark.parametrize("limit", [0, -2, 1, 3])
def test_checkpoints_total_limit_keeps_what_the_script_keeps(tmp_path, limit):
    data = _images(tmp_path / "dog")
    path = _write(tmp_path, f"accelerate launch train_dreambooth_lora_flux.py --pretrained_model_name_or_path=m "
                            f"--instance_data_dir={data} --instance_prompt=x --checkpoints_total_limit={limit}\n")  # fmt: skip
    o = _load(path, {"model": "tiny:flux"})
    expected = _script_kept_checkpoints(limit, 10)
    assert (o.save_limit, o.keep_states) == (expected, expected)


def test_text_to_image_train_data_dir_metadata_jsonl(tmp_path, monkeypatch):
    """load_dataset("imagefolder") on --train_data_dir reads metadata.jsonl: file_name relative to the folder,
    the caption from --caption_column (train_text_to_image_lora.py:613-644); sdcore reads it with its JSONL reader."""
    import json

    from sdcore.data.dataset import scan_dataset
    from sdcore.train.kontext_data import has_control

    monkeypatch.chdir(tmp_path)
    folder = _images(tmp_path / "pics" / "sub")
    rows = [{"file_name": "sub/0.png", "caption": "a red fox", "text": "unused"},
            {"file_name": "sub/1.png", "caption": ["short", "the longer caption"], "text": "unused"}]  # fmt: skip
    (folder.parent / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    notes: list[str] = []
    path = _write(tmp_path, "accelerate launch train_text_to_image_lora.py --pretrained_model_name_or_path=m "
                            "--train_data_dir=pics --caption_column=caption\n")  # fmt: skip
    o = _load(path, {"model": "tiny:sd1"}, notes=notes)
    assert (o.data, o.image_column, o.conditioning_image_column, o.caption_column) == (
        str(Path("pics") / "metadata.jsonl"), "file_name", "", "caption")  # fmt: skip
    index = scan_dataset(o)
    assert not index.problems
    found = sorted((e.path.resolve(), e.caption, e.captions) for e in index.entries)
    assert found == [((folder / "0.png").resolve(), "a red fox", ()),
                     ((folder / "1.png").resolve(), "short", ("short", "the longer caption"))]  # fmt: skip
    assert not any(has_control(e) for e in index.entries)
    assert any("a list of captions trains on one drawn at random each time" in n for n in notes)
    # the script's random.choice(caption) at each use: sdcore draws from the sample's generator, so both occur,
    # a seeded generator repeats its draw, and a single caption draws nothing (the rng is left as it was)
    import random

    from sdcore.train.data import caption_is_random, make_caption

    class Plain:
        def caption_for(self, caption, *, is_class, rng):
            return caption

    listed = next(e for e in index.entries if e.captions)
    drawn = {make_caption(Plain(), listed, random.Random(seed)) for seed in range(40)}
    assert drawn == {"short", "the longer caption"}
    assert make_caption(Plain(), listed, random.Random(3)) == make_caption(Plain(), listed, random.Random(3))
    single = next(e for e in index.entries if not e.captions)
    rng = random.Random(5)
    assert make_caption(Plain(), single, rng) == "a red fox" and rng.random() == random.Random(5).random()
    assert caption_is_random(listed) and not caption_is_random(single)
    other = _write(tmp_path, path.read_text().replace("--caption_column=caption", "--image_column=img"), "o.sh")
    assert any("--image_column 'img'" in p for p in _problems(other))


T2I_COMMAND = """\
export MODEL_NAME=m
accelerate launch --mixed_precision="fp16" train_text_to_image.py \\
  --pretrained_model_name_or_path=$MODEL_NAME --train_data_dir=pics --use_ema --offload_ema \\
  --reso=256 --random_flip --input_perturbation 0.1 --snr_gamma=5.0 --noise_offset=0.05 \\
  --validation_prompts "a red fox" "a blue bird" --checkpoints_total_limit=2
"""


def _diffusers_ema_decay(step: int) -> float:
    """diffusers' EMAModel.get_decay with its defaults (training_utils.py:745-762: decay 0.9999, min_decay 0,
    update_after_step 0, no power warm-up) at ``step`` (its optimization_step, counted before get_decay)."""
    s = max(0, step - 0 - 1)
    return 0.0 if s <= 0 else max(min((1 + s) / (10 + s), 0.9999), 0.0)


def test_text_to_image_full_fine_tune_translates_for_dreambooth(tmp_path, monkeypatch):
    """train_text_to_image.py is a full UNet fine-tune: sdcore train dreambooth without prior images, its defaults
    (:333 lr 1e-4, :312 batch 16, :315 100 epochs, :276 output_dir), a diffusers folder with the fp32 UNet."""
    from sdcore.train.ema import ema_decay_at
    from sdcore.train.sample_prompts import read_sample_prompts

    monkeypatch.chdir(tmp_path)
    _images(tmp_path / "pics")
    notes: list[str] = []
    path = _write(tmp_path, T2I_COMMAND)
    o = _load(path, {"model": "tiny:sd1"}, method="dreambooth", notes=notes)
    assert (o.data, o.lr, o.batch_size, o.epochs, o.resolution) == ("pics", 1e-4, 16, 100, 256)
    assert (o.output, o.save_format, o.save_dtype, o.instance_prompt) == (
        "sd-model-finetuned",
        "diffusers",
        "fp32",
        None,
    )
    assert (o.ema, o.ema_decay, o.ema_warmup, o.ema_update_every, o.ema_device) == (True, 0.9999, "diffusers", 1, "cpu")
    for step in range(1, 40):
        assert ema_decay_at(step, o.ema_decay, o.ema_warmup) == pytest.approx(_diffusers_ema_decay(step))
    assert (o.ip_noise_gamma, o.min_snr_gamma, o.noise_offset) == (0.1, 5.0, 0.05)
    assert (o.random_crop, o.cache_latents, o.flip, o.buckets) == (True, False, True, False)  # per access (:746)
    assert (o.save_limit, o.sample_every_epochs) == (2, 5)  # :487
    assert [p.prompt for p in read_sample_prompts(o.sample_prompts)] == ["a red fox", "a blue bird"]
    assert "weight_decay=0.01" in o.optimizer_args  # :412
    assert any(".txt files beside the images" in n for n in notes)


def test_text_to_image_sdxl_full_fine_tune_arguments(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _images(tmp_path / "pics")
    base = ("accelerate launch train_text_to_image_sdxl.py --pretrained_model_name_or_path=m --train_data_dir=pics "
            "--use_ema --proportion_empty_prompts=0.2 --random_flip --validation_prompt='a cat'")  # fmt: skip
    notes: list[str] = []
    o = _load(_write(tmp_path, base + "\n", "x.sh"), {"model": "tiny:sdxl"}, method="dreambooth", notes=notes)
    assert (o.resolution, o.sample_every_epochs, o.output, o.caption_dropout) == (1024, 1, "sdxl-model-finetuned", 0.2)
    assert (o.ema, o.ema_warmup, o.random_crop, o.sample_prompts) == (True, "diffusers", False, "a cat")
    # encoded once before training (train_text_to_image_sdxl.py:919-946): empty prompts, flips and crops fixed
    assert any("--proportion_empty_prompts" in n and "once for the run" in n for n in notes)
    assert any("--random_flip" in n and "once for the run" in n for n in notes)
    assert any("one random crop per image" in n for n in notes)
    problems = _problems(_write(tmp_path, base + " --timestep_bias_strategy=later --max_train_samples=3\n", "b.sh"),
                         "dreambooth")  # fmt: skip
    assert any("--timestep_bias_strategy later" in p and "--min-timestep" in p for p in problems)
    assert any("--max_train_samples" in p for p in problems)
    sd1 = _write(tmp_path, "accelerate launch train_text_to_image.py --pretrained_model_name_or_path=m "
                           "--train_data_dir=pics --dream_training --validation_prompt=x\n", "d.sh")  # fmt: skip
    problems = _problems(sd1, "dreambooth")
    assert [p for p in problems if "train_text_to_image.py" in p] == [
        f"{sd1}: train_text_to_image.py: --dream_training: sdcore has no DREAM training (arXiv 2312.00210's extra "
        "forward pass); train without it"
    ]
    # --validation_prompt is argparse's abbreviation of train_text_to_image.py's --validation_prompts (nargs="+")
    o = _load(_write(tmp_path, sd1.read_text().replace(" --dream_training", ""), "v.sh"), method="dreambooth")
    assert o.sample_prompts == "x"
    assert any("sdcore train dreambooth --config" in p for p in _problems(sd1, "lora"))


def test_local_dataset_name_is_an_imagefolder(tmp_path, monkeypatch):
    """load_dataset(<existing folder>) reads an imagefolder: a local --dataset_name is data, not a hub id."""
    import json

    from sdcore.data.dataset import scan_dataset

    monkeypatch.chdir(tmp_path)
    folder = _images(tmp_path / "ds")
    rows = [{"file_name": "0.png", "text": "zero", "caption": "first"}, {"file_name": "1.png", "text": "one"}]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    lora = _write(tmp_path, "accelerate launch train_text_to_image_lora.py --pretrained_model_name_or_path=m "
                            "--dataset_name=ds --caption_column=text\n", "l.sh")  # fmt: skip
    o = _load(lora, {"model": "tiny:sd1"})
    assert (o.data, o.image_column, o.caption_column) == (str(Path("ds") / "metadata.jsonl"), "file_name", "text")
    assert sorted(e.caption for e in scan_dataset(o).entries) == ["one", "zero"]
    hub = _write(tmp_path, lora.read_text().replace("--dataset_name=ds", "--dataset_name=someone/pics"), "h.sh")
    assert any("'someone/pics' is a Hugging Face hub dataset" in p for p in _problems(hub))
    # a DreamBooth script: the folder's images, each with --instance_prompt, or its --caption_column
    db = ("accelerate launch train_dreambooth_lora_sd3.py --pretrained_model_name_or_path=m --dataset_name=ds "
          "--instance_prompt='a sks dog'")  # fmt: skip
    o = _load(_write(tmp_path, db + "\n", "db.sh"), {"model": "tiny:sd3"})
    assert sorted(e.caption for e in scan_dataset(o, verify=False).entries) == ["a sks dog", "a sks dog"]
    o = _load(_write(tmp_path, db + " --caption_column=text\n", "dbc.sh"), {"model": "tiny:sd3"})
    assert sorted(e.caption for e in scan_dataset(o, verify=False).entries) == ["one", "zero"]


def test_arguments_are_read_as_argparse_reads_them(tmp_path):
    """nargs="+" takes every value up to the next option; a unique prefix is its argument (allow_abbrev); a prefix
    of several is argparse's "ambiguous option"; a refused script is refused for what it is, not for its words."""
    from sdcore.train.diffusers_script import read_command

    path = _write(tmp_path, "accelerate launch train_control_lora_flux.py --pretrained_model_name_or_path m "
                            "--validation_image a.jpg b.jpg --validation_prompt 'p one' 'p two' --reso 512 "
                            "--noise_offset -0.5 --gradient_acc 2\n")  # fmt: skip
    c = read_command(path)
    assert c is not None and not c.problems
    assert c.args["validation_image"] == ["a.jpg", "b.jpg"]
    assert c.args["validation_prompt"] == ["p one", "p two"]
    assert (c.args["resolution"], c.args["noise_offset"], c.args["gradient_accumulation_steps"]) == ("512", "-0.5", "2")
    one = read_command(_write(tmp_path, "python train_dreambooth.py --resolution 512 extra --res 1\n", "o.sh"))
    assert one is not None
    assert any("'extra': not an argument of train_dreambooth.py" in p for p in one.problems)
    assert any("ambiguous option: --res could match --resolution, --resume_from_checkpoint" in p for p in one.problems)
    refused = read_command(_write(tmp_path, "python train_control_flux.py --validation_image a.jpg b.jpg\n", "r.sh"))
    assert refused is not None and not refused.problems


def test_text_to_image_command_trains_with_the_scripts_ema(tmp_path):
    """Two steps of tiny SD1 from a train_text_to_image.py --use_ema command: a diffusers folder whose UNet is the
    average EMAModel keeps, d = 0 after step 1 (a copy), 2/11 after step 2, so (2/11) w1 + (9/11) w2."""
    from safetensors.torch import load_file

    folder = _images(tmp_path / "pics")
    for i in range(2):
        (folder / f"{i}.txt").write_text(f"a picture {i}")
    _write(tmp_path, "accelerate launch train_text_to_image.py --pretrained_model_name_or_path=m "
                     "--train_data_dir=pics --use_ema --resolution=64 --center_crop --train_batch_size=1 "
                     "--max_train_steps=2 --learning_rate=1e-3 --lr_scheduler=constant --output_dir=out --seed=1\n")  # fmt: skip
    base = ["sdcore", "train", "dreambooth", "--config", "train.sh", "--model", "tiny:sd1", "--mixed-precision", "no",
            "--no-progress"]  # fmt: skip
    run = subprocess.run(base, cwd=tmp_path, capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stderr
    for name in ("model_index.json", "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
                 "text_encoder/config.json", "scheduler/scheduler_config.json"):  # fmt: skip
        assert (tmp_path / "out" / name).is_file(), name
    one = subprocess.run([*base, "--max-steps", "1", "--output", "one"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=400)  # fmt: skip
    assert one.returncode == 0, one.stderr
    averaged = load_file(tmp_path / "out" / "unet" / "diffusion_pytorch_model.safetensors")
    w1 = load_file(tmp_path / "one" / "unet" / "diffusion_pytorch_model.safetensors")  # d = 0: step 1's weights
    raw = load_file(tmp_path / "out-state" / "step-00000002" / "trainable.safetensors")  # the raw weights, step 2
    assert set(averaged) == set(w1) and {f"unet.{k}" for k in averaged} == set(raw)
    moved = 0
    for key, value in averaged.items():
        w2 = raw[f"unet.{key}"]
        expected = (2 / 11) * w1[key] + (9 / 11) * w2
        assert value.dtype == w2.dtype  # saved in fp32, as the script's unwrapped UNet
        assert (value - expected).abs().max() <= 1e-5 * (1 + expected.abs().max()), key
        moved += int(not bool((w2 - w1[key]).abs().max() == 0))
    assert moved > 100  # the two steps really changed the weights, so the average is not the raw weights


def test_nargs_arguments_with_an_explicit_value_and_values_that_start_with_a_dash(tmp_path):
    """Python's argparse: ``--validation_prompts=a b`` gives the list ``["a"]`` and stops on ``b`` ("unrecognized
    arguments": an explicit ``=`` value is matched alone, argparse.py ``consume_optional``); a word with a space is a
    value even when it starts with ``-`` (``_parse_optional``: ``if ' ' in arg_string: return None``)."""
    from sdcore.train.diffusers_script import read_command

    base = "accelerate launch train_text_to_image.py --pretrained_model_name_or_path=m "
    c = read_command(_write(tmp_path, base + "--validation_prompts=a b\n", "e.sh"))
    assert c is not None and c.args["validation_prompts"] == ["a"]
    assert any("'b': not an argument of train_text_to_image.py" in p for p in c.problems)
    c = read_command(_write(tmp_path, base + "--validation_prompts '-a cat' 'b' --resolution=64\n", "d.sh"))
    assert c is not None and not c.problems
    assert (c.args["validation_prompts"], c.args["resolution"]) == (["-a cat", "b"], "64")
    c = read_command(_write(tmp_path, base + "--validation_prompts -x\n", "x.sh"))
    assert c is not None and any("--validation_prompts: expected at least one argument" in p for p in c.problems)


def test_an_argument_given_twice_keeps_the_last_as_argparse(tmp_path):
    """argparse stores each occurrence in turn, so the last one counts (a note says so)."""
    _images(tmp_path / "dog")
    text = FLUX_COMMAND.replace('INSTANCE_DIR="dog"', f'INSTANCE_DIR="{tmp_path / "dog"}"')
    text = text.replace("--rank=16", "--rank=16 --rank=8")
    notes: list[str] = []
    o = _load(_write(tmp_path, text), {"model": "tiny:flux"}, notes=notes)
    assert o.rank == 8
    assert any("--rank is given twice: the last one counts" in n for n in notes)
