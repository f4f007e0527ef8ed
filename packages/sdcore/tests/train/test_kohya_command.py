"""kohya sd-scripts command files (``train.sh``, ``train.bat``, ``train.ps1``) as ``--config``.

The contract: a command file gives exactly the options that the same arguments give on sdcore's command line in
kohya's spelling (one kohya translation), with kohya's argparse rules (flags, several-value options, the last of
a repeated option, ``--config_file`` read beneath the arguments). The commands follow the shape of kohya's docs
(docs/flux_train_network.md, docs/train_network.md: ``accelerate launch --num_cpu_threads_per_process 1
<script> --arg=value ...``); the text is written here.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from sdcore.errors import ConfigError
from sdcore.testing.datasets import make_tiny_dataset

ARGS = [
    "--pretrained_model_name_or_path=tiny:sd1", "--output_dir=OUT", "--output_name=my_lora",
    "--save_model_as=safetensors", "--network_module=networks.lora", "--network_dim=8", "--network_alpha=4",
    "--learning_rate=1e-4", "--optimizer_type=AdamW", "--lr_scheduler=cosine", "--max_train_steps=2",
    "--mixed_precision=no", "--gradient_checkpointing", "--network_args", "conv_dim=4", "conv_alpha=2",
    "--seed", "7", "--train_data_dir=DATA", "--resolution=64", "--cache_latents",
]  # fmt: skip


def _load(config: Path | None, kohya: dict | None = None, method: str = "lora"):
    from sdcore.train.config import load_options

    if method == "lora":
        from sdplugin_lora.method import LoraOptions as cls
    else:
        from sdplugin_dreambooth.options import DreamBoothOptions as cls
    return load_options(cls, config, {}, kohya=kohya, notes=[])


def _cli_kohya(words: list[str]) -> dict:
    """The same words as sdcore's command line hands them to load_options (its click options for kohya's names)."""
    from sdcore.train.cli import expand_multi_values
    from sdcore.train.kohya import MULTI_VALUE, flag_names

    out: dict = {}
    words = expand_multi_values(words)
    i = 0
    while i < len(words):
        name, eq, value = words[i][2:].partition("=")
        i += 1
        if not eq and name in flag_names():
            out[name] = True
            continue
        if not eq:
            value, i = words[i], i + 1
        if name in MULTI_VALUE:
            out.setdefault(name, []).append(value)
        else:
            out[name] = value
    return out


def _fill(words: list[str], tmp_path: Path) -> list[str]:
    data = make_tiny_dataset(tmp_path / "data", n=2, size=64)  # kohya layout: data/1_sks
    return [w.replace("OUT", str(tmp_path / "out")).replace("DATA", str(data)) for w in words]


def _sh(tmp_path: Path, words: list[str], script: str = "train_network.py", name: str = "train.sh") -> Path:
    body = " \\\n  ".join(words)
    path = tmp_path / name
    path.write_text(
        f"#!/bin/bash\n# my run\nexport SCRIPTS=sd-scripts\naccelerate launch --num_cpu_threads_per_process 1 "
        f"$SCRIPTS/{script} \\\n  {body}\n",
        encoding="utf-8",
    )
    return path


def test_a_bash_command_gives_the_options_of_the_same_kohya_arguments_on_the_command_line(tmp_path):
    words = _fill(ARGS, tmp_path)
    from_file = _load(_sh(tmp_path, words))
    from_cli = _load(None, _cli_kohya(words))
    assert dataclasses.asdict(from_file) == dataclasses.asdict(from_cli)
    # and the values are kohya's meaning of them
    assert (from_file.rank, from_file.alpha, from_file.conv_rank, from_file.conv_alpha) == (8, 4.0, 4, 2.0)
    assert from_file.seed == 7 and from_file.max_steps == 2 and from_file.lr == pytest.approx(1e-4)
    assert from_file.gradient_checkpointing is True and from_file.lr_scheduler == "cosine"
    assert from_file.output == str(tmp_path / "out" / "my_lora.safetensors")


def test_windows_batch_and_powershell_files_read_the_same(tmp_path):
    words = _fill(ARGS, tmp_path)
    expected = dataclasses.asdict(_load(_sh(tmp_path, words)))
    data = next(w for w in words if w.startswith("--train_data_dir=")).split("=", 1)[1]
    win = [w if not w.startswith("--train_data_dir=") else "--train_data_dir=%DATA%" for w in words]
    bat = tmp_path / "train.bat"
    bat.write_text(
        "@echo off\r\nREM my run\r\nset DATA="
        + data
        + "\r\naccelerate launch sd-scripts\\train_network.py ^\r\n  "
        + " ^\r\n  ".join(f'"{w}"' if "=" in w else w for w in win)
        + "\r\n",
        encoding="utf-8",
    )
    assert dataclasses.asdict(_load(bat)) == expected
    ps = [w if not w.startswith("--train_data_dir=") else "--train_data_dir=$env:DATA" for w in words]
    ps1 = tmp_path / "train.ps1"
    ps1.write_text(
        f'$env:DATA = "{data}"\n& accelerate launch .\\sd-scripts\\train_network.py `\n  ' + " `\n  ".join(ps) + "\n",
        encoding="utf-8",
    )
    assert dataclasses.asdict(_load(ps1)) == expected


def test_windows_paths_keep_their_backslashes(tmp_path):
    bat = tmp_path / "run.bat"
    bat.write_text(
        "accelerate launch train_network.py --pretrained_model_name_or_path=tiny:sd1 "
        '--train_data_dir="D:\\data\\set 1" --network_dim 4 --max_train_steps 1\r\n',
        encoding="utf-8",
    )
    from sdcore.train.kohya_command import read_command
    from sdplugin_lora.method import LoraOptions

    command = read_command(bat, [f.name for f in dataclasses.fields(LoraOptions)])
    assert command is not None
    assert command.options["train_data_dir"] == "D:\\data\\set 1"
    assert command.options["network_dim"] == "4"


def test_config_file_is_read_beneath_the_command(tmp_path):
    """kohya parses the command line over the TOML's values: the command's rank wins, the TOML's rest stays."""
    words = _fill(ARGS, tmp_path)
    (tmp_path / "base.toml").write_text('network_dim = 32\nlearning_rate = 3e-4\nlr_scheduler = "linear"\n')
    given = [w for w in words if not w.startswith(("--learning_rate", "--lr_scheduler"))]
    o = _load(_sh(tmp_path, [*given, "--config_file=base"]))  # kohya appends .toml; found beside the file
    assert o.rank == 8  # the command's
    assert o.lr == pytest.approx(3e-4) and o.lr_scheduler == "linear"  # the TOML's


def test_the_last_of_a_repeated_argument_counts(tmp_path):
    words = _fill(ARGS, tmp_path)
    o = _load(_sh(tmp_path, [*words, "--network_dim=16"]))
    assert o.rank == 16


@pytest.mark.parametrize(
    ("script", "method", "expected"),
    [
        ("sdxl_train.py", "lora", "trains a full fine-tune: run it with sdcore train dreambooth --config"),
        ("train_network.py", "dreambooth", "trains a LoRA/LyCORIS network: run it with sdcore train lora --config"),
        ("sdxl_train_network.py", "lora", "sdxl_train_network.py trains SDXL models; tiny:sd1 is a sd1 model"),
        ("train_controlnet.py", "lora", "ControlNet training, which sdcore does not have"),
        ("lumina_train_network.py", "lora", "a model family sdcore does not train"),
    ],
)
def test_a_script_that_does_not_fit_is_a_problem_before_loading(tmp_path, script, method, expected):
    words = _fill(ARGS, tmp_path)
    with pytest.raises(ConfigError) as info:
        _load(_sh(tmp_path, words, script=script), method=method)
    assert any(expected in p for p in info.value.problems), info.value.problems


def test_argparse_slips_are_problems(tmp_path):
    words = _fill(ARGS, tmp_path)
    with pytest.raises(ConfigError) as info:
        _load(_sh(tmp_path, [*words, "--cache_latents_to_disk", "yes", "--network_dim"]))
    text = "\n".join(info.value.problems)
    assert "--cache_latents_to_disk is a flag and takes no value (got 'yes')" in text
    assert "--network_dim needs a value" in text


def test_a_file_without_a_kohya_script_is_left_to_the_other_readers(tmp_path):
    from sdcore.train.kohya_command import read_command

    path = tmp_path / "run.sh"
    path.write_text("accelerate launch train_dreambooth_lora.py --instance_data_dir=x\n")
    assert read_command(path, ["rank"]) is None


def test_the_command_file_trains_through_the_cli(tmp_path, sd_cli):
    from safetensors import safe_open
    from sdcore.plugins import get_plugin_manager

    words = [w for w in _fill(ARGS, tmp_path) if w != "--cache_latents"]
    path = _sh(tmp_path, words)
    result = sd_cli(["train", "lora", "--config", str(path), "--no-progress"], pm=get_plugin_manager())
    assert result.exit_code == 0, result.output
    saved = tmp_path / "out" / "my_lora.safetensors"
    with safe_open(str(saved), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_dim"] == "8" and float(meta["ss_network_alpha"]) == 4.0


def _read(path: Path):
    from sdcore.train.kohya_command import read_command
    from sdplugin_lora.method import LoraOptions

    command = read_command(path, [f.name for f in dataclasses.fields(LoraOptions)])
    assert command is not None
    return command


def test_output_config_is_a_flag_and_with_config_file_trains_nothing(tmp_path):
    """kohya's --output_config is store_true (library/train_util.py:4228); with --config_file, read_config_from_file
    writes the arguments to that file and exits without training (train_util.py:4706-4738)."""
    path = tmp_path / "save.sh"
    path.write_text("accelerate launch train_network.py --network_dim 4 --output_config --config_file my_run\n")
    command = _read(path)
    assert not any("needs a value" in p for p in command.problems), command.problems
    assert any("--output_config" in p and "without training" in p for p in command.problems), command.problems
    alone = tmp_path / "alone.sh"  # without --config_file kohya ignores it and trains (train_util.py:4701)
    alone.write_text("accelerate launch train_network.py --network_dim 4 --output_config\n")
    assert _read(alone).problems == [] and _read(alone).options["output_config"] is True


def test_cmd_set_with_quotes_and_nested_variables(tmp_path):
    """cmd.exe: ``set A="x y"`` keeps the quotes in the value (they group the word where %A% is used),
    ``set "A=x y"`` does not; a value's %VAR% is expanded when the set line runs; single quotes are not quotes."""
    bat = tmp_path / "run.bat"
    bat.write_text(
        'set DATA="D:\\my data\\set 1"\r\nset "ROOT=D:\\runs"\r\nset OUT=%ROOT%\\out\r\n'
        "accelerate launch train_network.py --train_data_dir=%DATA% --output_dir %OUT% --output_name bob's_lora "
        "--network_dim 4\r\n",
        encoding="utf-8",
    )
    command = _read(bat)
    assert command.problems == []
    assert command.options["train_data_dir"] == "D:\\my data\\set 1"
    assert command.options["output_dir"] == "D:\\runs\\out"
    assert command.options["output_name"] == "bob's_lora"


def test_batch_file_folder_and_commented_out_commands(tmp_path):
    """``%~dp0`` is the batch file's own folder with a trailing separator; ``@REM`` lines and ``echo`` lines
    run nothing (an older command kept commented out is not the run)."""
    bat = tmp_path / "run.bat"
    bat.write_text(
        "@echo off\r\n@REM accelerate launch train_network.py --network_dim 8\r\n"
        "echo starting train_network.py\r\n"
        "accelerate launch %~dp0sd-scripts\\train_network.py --train_data_dir=%~dp0data --network_dim 4\r\n",
        encoding="utf-8",
    )
    command = _read(bat)
    assert command.problems == []
    assert command.options == {"train_data_dir": str(tmp_path) + ("\\" if "\\" in str(tmp_path) else "/") + "data",
                               "network_dim": "4"}  # fmt: skip


def test_powershell_nested_variables_and_line_end_comments(tmp_path):
    ps1 = tmp_path / "run.ps1"
    ps1.write_text(
        "$root = 'D:\\runs'\n$env:OUT = \"$root\\out\"\n"
        "accelerate launch train_network.py `\n  --output_dir $env:OUT `\n  --network_dim 4  # my rank\n",
        encoding="utf-8",
    )
    command = _read(ps1)
    assert command.problems == []
    assert command.options == {"output_dir": "D:\\runs\\out", "network_dim": "4"}


def test_one_process_launch_options_are_not_a_note(tmp_path):
    """The kohya_ss GUI always writes --num_processes 1 --num_machines 1 (kohya_gui/class_accelerate_launch.py:191-197):
    one process, what sdcore runs; several processes get the note."""
    gui = "accelerate launch --dynamo_backend no --num_processes 1 --num_machines 1 --num_cpu_threads_per_process 2"
    one = tmp_path / "one.sh"
    one.write_text(f"{gui} train_network.py --network_dim 4\n")
    assert not any("process options" in n for n in _read(one).notes)
    two = tmp_path / "two.sh"
    two.write_text("accelerate launch --num_processes=2 train_network.py --network_dim 4\n")
    (note,) = [n for n in _read(two).notes if "process options" in n]
    assert "--lr_warmup_steps/--lr_decay_steps lasts 1/2 as many optimizer steps in kohya's 2-process run" in note


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("run.sh", "accelerate launch train_network.py --network_dim 4 --seed 1 2>&1 | tee train.log\n"),
        ("run.sh", "accelerate launch train_network.py --network_dim 4 --seed 1 >train.log && echo done\n"),
        ("run.bat", "accelerate launch train_network.py --network_dim 4 --seed 1 > train.log 2>&1\r\n"),
        ("run.ps1", "accelerate launch train_network.py --network_dim 4 --seed 1 | Tee-Object train.log\n"),
    ],
)
def test_a_pipe_or_redirection_ends_the_arguments(tmp_path, name, text):
    """The shell hands the script the words before ``|``, ``&&`` or a redirection; they are not kohya arguments."""
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    command = _read(path)
    assert command.problems == [] and command.options == {"network_dim": "4", "seed": "1"}


def test_argument_lines_without_continuation_marks_are_the_commands(tmp_path):
    """kohya's Japanese/Chinese docs print a command one argument per line with no ``\\``: one command meant.
    Read so, with a note (a shell would run each ``--`` line as a command of its own)."""
    words = _fill(ARGS, tmp_path)
    expected = dataclasses.asdict(_load(_sh(tmp_path, words)))
    bare = tmp_path / "bare.sh"
    bare.write_text("accelerate launch --num_cpu_threads_per_process 1 train_network.py\n  " + "\n  ".join(
        " ".join(group) for group in _argument_groups(words)) + "\n", encoding="utf-8")  # fmt: skip
    from sdcore.train.config import load_options
    from sdplugin_lora.method import LoraOptions

    notes: list[str] = []
    o = load_options(LoraOptions, bare, {}, notes=notes)
    assert dataclasses.asdict(o) == expected
    assert any("line(s) starting with -- after the command are read as its arguments" in n for n in notes)


def _argument_groups(words: list[str]) -> list[list[str]]:
    """Each ``--option`` with the values after it, one group per line."""
    groups: list[list[str]] = []
    for word in words:
        if word.startswith("--") or not groups:
            groups.append([word])
        else:
            groups[-1].append(word)
    return groups


def test_the_docs_only_sdxl_text_encoder_rates_say_what_to_write(tmp_path):
    """kohya's docs/sdxl_train_network.md shows --text_encoder_lr1/--text_encoder_lr2, which its argparse does not
    define (kohya stops with 'unrecognized arguments'); the problem says to give text_encoder_lr two values."""
    words = _fill(ARGS, tmp_path)
    with pytest.raises(ConfigError) as info:
        _load(_sh(tmp_path, [*words, "--text_encoder_lr1=1e-5", "--text_encoder_lr2=1e-5"]))
    assert any("give text_encoder_lr two values, one per text encoder" in p for p in info.value.problems)


def test_a_negative_number_is_a_value_as_argparse_reads_it(tmp_path):
    """argparse (and so kohya) takes ``-0.05`` after an option as its value, not as an option
    (shell_command.is_option_word, the test the diffusers reader uses too)."""
    from sdcore.train.kohya_command import read_command
    from sdplugin_lora.method import LoraOptions

    words = _fill(ARGS, tmp_path)
    path = _sh(tmp_path, [*words, "--noise_offset", "-0.05", "--network_args", "conv_dim=4", "-1e-3"])
    command = read_command(path, [f.name for f in dataclasses.fields(LoraOptions)])
    assert command is not None and not command.problems, command and command.problems
    assert command.options["noise_offset"] == "-0.05"
    assert command.options["network_args"] == ["conv_dim=4", "-1e-3"]


def _abbreviated(words: list[str], short: dict[str, str]) -> list[str]:
    out = []
    for word in words:
        name, eq, value = word.partition("=")
        out.append(short.get(name, name) + eq + value)
    return out


def test_a_unique_prefix_is_the_option_argparse_resolves_it_to(tmp_path):
    """kohya's scripts parse with argparse's allow_abbrev: --network_di 8 is --network_dim 8, a flag and a
    several-value option too; the options are those of the full names."""
    words = _fill(ARGS, tmp_path)
    short = {"--network_dim": "--network_di", "--gradient_checkpointing": "--gradient_check",
             "--network_args": "--network_ar", "--learning_rate": "--learning_r", "--cache_latents": "--cache_latents"}  # fmt: skip
    full = _load(_sh(tmp_path, words))
    abbreviated = _load(_sh(tmp_path, _abbreviated(words, short), name="short.sh"))
    assert dataclasses.asdict(abbreviated) == dataclasses.asdict(full)
    assert (abbreviated.rank, abbreviated.conv_rank, abbreviated.gradient_checkpointing) == (8, 4, True)


def test_a_prefix_of_several_options_is_argparses_ambiguous_option(tmp_path):
    words = _fill(ARGS, tmp_path)
    with pytest.raises(ConfigError) as info:
        _load(_sh(tmp_path, [w for w in words if not w.startswith("--network_dim")] + ["--network_d", "8"]))
    problems = [p for p in info.value.problems if "network_d" in p]
    assert len(problems) == 1, info.value.problems  # named once, not also as an unknown option
    assert "ambiguous option: --network_d could match --network_dim, --network_dropout" in problems[0]
    assert "train_network.py" in problems[0]


def test_an_exact_name_wins_and_a_prefix_resolves_against_the_scripts_own_options(tmp_path):
    """--cache_latents is a name of its own (and a prefix of --cache_latents_to_disk); --lr_scheduler begins
    --lr_scheduler_args. train_db.py defines no network options: there --network_di is not resolved (kohya's
    argparse stops with 'unrecognized arguments')."""
    from sdcore.train.kohya_command import read_command
    from sdplugin_dreambooth.options import DreamBoothOptions
    from sdplugin_lora.method import LoraOptions

    words = _fill(ARGS, tmp_path)
    command = read_command(_sh(tmp_path, words), [f.name for f in dataclasses.fields(LoraOptions)])
    assert command is not None and not command.problems, command and command.problems
    assert command.options["cache_latents"] is True and command.options["lr_scheduler"] == "cosine"
    db = read_command(_sh(tmp_path, ["--network_di", "8"], script="train_db.py", name="db.sh"),
                      [f.name for f in dataclasses.fields(DreamBoothOptions)])  # fmt: skip
    assert db is not None and db.options == {"network_di": "8"}


def test_the_argument_table_covers_every_script_sdcore_runs():
    from sdcore.train.kohya import MULTI_VALUE
    from sdcore.train.kohya_command import SCRIPT_ARGS, SCRIPTS

    assert set(SCRIPT_ARGS) == set(SCRIPTS)
    for script, names in SCRIPT_ARGS.items():
        assert {"pretrained_model_name_or_path", "output_dir", "config_file", "help"} <= names, script
        assert all(n and " " not in n and "-" not in n for n in names), script
    network = SCRIPT_ARGS["train_network.py"]
    assert set(MULTI_VALUE) <= network and "network_dim" not in SCRIPT_ARGS["train_db.py"]
    assert {"t5xxl", "guidance_scale"} <= SCRIPT_ARGS["flux_train_network.py"]


def test_resolve_option_is_argparses_allow_abbrev():
    from sdcore.train.shell_command import ambiguous_option, resolve_option

    defined = {"resolution", "resume", "resume_from_huggingface", "rank"}
    assert resolve_option("resolution", defined) == ("resolution", [])
    assert resolve_option("resume", defined) == ("resume", [])  # exact wins over resume_from_huggingface
    assert resolve_option("resume_f", defined) == ("resume_from_huggingface", [])
    assert resolve_option("reso", defined) == ("resolution", [])
    assert resolve_option("re", defined) == ("re", ["resolution", "resume", "resume_from_huggingface"])
    assert resolve_option("nothing", defined) == ("nothing", [])
    assert resolve_option("re", None) == ("re", [])
    assert ambiguous_option("x.sh", "res", ["resume", "resolution"], "s.py") == (
        "x.sh: ambiguous option: --res could match --resolution, --resume (as s.py's argparse stops)"
    )
