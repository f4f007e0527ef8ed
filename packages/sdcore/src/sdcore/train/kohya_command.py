"""A kohya sd-scripts command file (``train.sh``, ``train.bat``, ``train.ps1``) as ``--config``.

kohya's own docs and most guides give a run as one command, ``accelerate launch flux_train_network.py
--pretrained_model_name_or_path=... --network_dim=16 ...``, which users keep in a shell file (on Windows a ``.bat``
or ``.ps1``). ``sdcore train lora --config train.sh`` reads that file: :mod:`.shell_command` finds the command and its
words; here the words after the kohya script become kohya options exactly as ``sdcore train lora --network_dim 16
...`` on the command line would give them (the same flag and several-value rules, :data:`.kohya.MULTI_VALUE`), so
:func:`sdcore.train.config.load_options` translates them with the one kohya translation (:mod:`.kohya`), kohya's
defaults included. A ``--config_file`` in the command is read beneath the command's arguments (kohya parses the
command line over the TOML's values).

The script decides the sdcore method (``train_network.py`` is a LoRA run, ``sdxl_train.py`` a full fine-tune,
``train_textual_inversion.py`` an embedding) and the model family kohya would load; a mismatch is a problem found
before any model loads, as kohya would fail on it. Scripts sdcore does not run (ControlNet, LLLite, XTI, the model
families it does not train, generation) are refused by name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .shell_command import COMMAND_SUFFIXES, command_lines, is_option_word

#: kohya's training scripts: the sdcore method that runs them and the family kohya loads in each
#: (None: SD1.x/SD2.x, kohya's scripts without a prefix)
SCRIPTS: dict[str, tuple[str, str | None]] = {
    "train_network.py": ("lora", None), "sdxl_train_network.py": ("lora", "sdxl"),
    "sd3_train_network.py": ("lora", "sd3"), "flux_train_network.py": ("lora", "flux"),
    "train_db.py": ("dreambooth", None), "fine_tune.py": ("dreambooth", None), "sdxl_train.py": ("dreambooth", "sdxl"),
    "sd3_train.py": ("dreambooth", "sd3"), "flux_train.py": ("dreambooth", "flux"),
    "train_textual_inversion.py": ("ti", None), "sdxl_train_textual_inversion.py": ("ti", "sdxl"),
}  # fmt: skip
_OTHER_FAMILY = "a model family sdcore does not train"
#: kohya scripts sdcore does not run, with the reason
REFUSED_SCRIPTS: dict[str, str] = {
    **dict.fromkeys(("train_controlnet.py", "train_control_net.py", "sdxl_train_control_net.py",
                     "flux_train_control_net.py"), "ControlNet training, which sdcore does not have"),
    **dict.fromkeys(("sdxl_train_control_net_lllite.py", "sdxl_train_control_net_lllite_old.py"),
                    "ControlNet-LLLite training, which sdcore does not have"),
    "train_textual_inversion_XTI.py": "Extended Textual Inversion (XTI), which sdcore does not train: "
    "sdcore train ti trains a plain embedding",
    **dict.fromkeys(("anima_train.py", "anima_train_network.py", "lumina_train.py", "lumina_train_network.py",
                     "hunyuan_image_train_network.py"), _OTHER_FAMILY),
    **dict.fromkeys(("gen_img.py", "gen_img_diffusers.py", "sdxl_gen_img.py", "sdxl_minimal_inference.py",
                     "sd3_minimal_inference.py", "flux_minimal_inference.py", "lumina_minimal_inference.py",
                     "anima_minimal_inference.py", "hunyuan_image_minimal_inference.py"),
                    "image generation, not training: use sdcore generate"),
}  # fmt: skip
_METHOD_NAMES = {"lora": "a LoRA/LyCORIS network", "dreambooth": "a full fine-tune", "ti": "a textual inversion"}
_FAMILY_NAMES = {None: "SD1.x/SD2.x", "sdxl": "SDXL", "sd3": "SD3/SD3.5", "flux": "FLUX.1/Chroma"}


@dataclass
class KohyaCommand:
    """The kohya options of a command file (``options``: kohya or sdcore names -> value, as the command line gives
    them), the script that runs them, and notes and problems met while reading."""

    script: str
    options: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _script_at(words: list[str]) -> int | None:
    for i, word in enumerate(words):
        name = Path(word.replace("\\", "/")).name
        if name in SCRIPTS or name in REFUSED_SCRIPTS:
            return i
    return None


def read_command(path: str | os.PathLike[str], fields: list[str]) -> KohyaCommand | None:
    """The kohya command in ``path`` (for a method with option names ``fields``), or None when the file runs no
    kohya script (then other readers try it)."""
    p = Path(path).expanduser()
    if p.suffix.lower() not in (*COMMAND_SUFFIXES, ".txt", "") or not p.is_file():
        return None
    try:
        lines = list(command_lines(p))
    except ConfigError:
        return None  # the diffusers reader reports an unreadable shell file
    for line in lines:
        at = _script_at(line.words)
        if at is None:
            continue
        script = Path(line.words[at].replace("\\", "/")).name
        command = KohyaCommand(script)
        where = f"{p}: {script}"
        if script in REFUSED_SCRIPTS:
            command.problems.append(f"{where}: {REFUSED_SCRIPTS[script]}")
            return command
        if line.missing:
            command.problems.append(f"{p}: variable(s) not set: {', '.join(sorted(set(line.missing)))}")
        if line.unsupported:
            command.problems.append(f"{p}: shell expansion(s) sdcore does not run: {', '.join(line.unsupported)} "
                                    "(write the value)")  # fmt: skip
        _check_method(script, fields, where, p, command)
        command.notes += line.joined_note(p) + _launcher_notes(line.words[:at], where)
        given = _parse(line.words[at + 1 :], where, command)
        if given.get("output_config") and given.get("config_file"):  # train_util.py read_config_from_file
            command.problems.append(f"{where}: --output_config with --config_file: kohya writes the arguments to "
                                    "that file and exits without training; remove --output_config to train")  # fmt: skip
        base = _config_file(given.pop("config_file", None), p, where, command)
        command.options = {**base, **given}
        return command
    return None


def _check_method(script: str, fields: list[str], where: str, path: Path, command: KohyaCommand) -> None:
    method, _family = SCRIPTS[script]
    present = set(fields)
    running = "lora" if "rank" in present else "ti" if "vectors" in present else "dreambooth"
    if running != method:
        command.problems.append(f"{where} trains {_METHOD_NAMES[method]}: run it with "
                                f"sdcore train {method} --config {path}")  # fmt: skip


def script_family_problem(script: str, family: str | None, model: str, where: str) -> str | None:
    """The script loads another family than the model's (kohya fails loading it), or None."""
    wanted = SCRIPTS.get(script, (None, None))[1]
    if family is None or script not in SCRIPTS:
        return None
    fits = {
        None: family.startswith(("sd1", "sd2")),
        "sdxl": family.startswith("sdxl"),
        "sd3": family.startswith("sd3"),
        "flux": family.startswith(("flux", "chroma")),
    }[wanted]
    if fits:
        return None
    return f"{where}: {script} trains {_FAMILY_NAMES[wanted]} models; {model} is a {family} model"


def _launcher_notes(words: list[str], where: str) -> list[str]:
    """``accelerate launch --num_processes 2 --mixed_precision bf16 ...``: what the launcher's options mean here."""
    notes: list[str] = []
    options: dict[str, str] = {}
    for i, word in enumerate(words):
        if word.startswith("--"):
            name, eq, value = word[2:].partition("=")
            following = words[i + 1] if i + 1 < len(words) and not words[i + 1].startswith("--") else ""
            options[name.replace("-", "_")] = value if eq else following
    counts = (options.get(n, "1") for n in ("num_processes", "num_machines"))
    several = "multi_gpu" in options or any(c and (not c.isdigit() or int(c) > 1) for c in counts)
    if several:  # the kohya_ss GUI writes --num_processes 1 --num_machines 1 for every run: one process
        notes.append(f"{where}: accelerate launch's process options: run sdcore under `accelerate launch` (or "
                     "--num-processes) for several processes")  # fmt: skip
    if "mixed_precision" in options:
        notes.append(f"{where}: accelerate launch --mixed_precision has no effect (kohya hands its own "
                     "--mixed_precision, default no, to accelerate); give it to the script")  # fmt: skip
    return notes


def _parse(words: list[str], where: str, command: KohyaCommand) -> dict[str, Any]:
    """The words after the script as kohya's argparse reads them: ``--name value`` / ``--name=value``, a
    store_true flag without a value, several values after a several-value option (``--network_args a=1 b=2``)."""
    from .kohya import MULTI_VALUE, flag_names

    flags = flag_names()
    out: dict[str, Any] = {}
    i = 0
    while i < len(words):
        word = words[i]
        i += 1
        if not word.startswith("--"):
            command.problems.append(f"{where}: {word!r}: not an argument (kohya's argparse stops with 'unrecognized "
                                    "arguments')")  # fmt: skip
            continue
        name, eq, text = word[2:].partition("=")
        values: list[str] = [text] if eq else []
        while not eq and i < len(words) and not is_option_word(words[i]):
            values.append(words[i])
            i += 1
            if name not in MULTI_VALUE:
                break
        value: Any
        if name in MULTI_VALUE:
            value = values
        elif name in flags:
            value = True
            if values:
                command.problems.append(f"{where}: --{name} is a flag and takes no value (got {values[0]!r})")
        elif values:
            value = values[0]
        else:
            command.problems.append(f"{where}: --{name} needs a value")
            continue
        if name in out:  # argparse keeps the last; a run file with a duplicate is most often a slip
            command.notes.append(f"{where}: --{name} is given twice: the last one counts (as in argparse)")
        out[name] = value
    return out


def _config_file(value: Any, path: Path, where: str, command: KohyaCommand) -> dict[str, Any]:
    """The options of the command's ``--config_file`` (kohya adds ``.toml`` when the name lacks it); a relative
    name is looked up from the working directory, then beside the command file."""
    if value is None:
        return {}
    from .config import read_config_file

    name = str(value)
    if not name.endswith(".toml"):
        name += ".toml"
    found = Path(name).expanduser()
    if not found.is_absolute() and not found.is_file() and (path.parent / found).is_file():
        found = path.parent / found
    if not found.is_file():
        command.problems.append(f"{where}: --config_file {name}: no such file")
        return {}
    command.notes.append(f"{where}: --config_file {found}: its options read beneath the command's (as in kohya)")
    return read_config_file(found)
