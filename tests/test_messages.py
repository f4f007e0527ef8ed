"""One message per mistake, in every command (issue 17)."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from sdcore.cli import build_cli
from sdcore.errors import ModelFormatError
from sdcore.plugins import get_plugin_manager


@pytest.fixture(scope="module")
def cli():
    return build_cli(get_plugin_manager())


@pytest.fixture
def data(tmp_path):
    from sdcore.testing.contract import make_tiny_dataset

    return make_tiny_dataset(tmp_path / "data", n=2, size=64)


def _error_line(result) -> str:
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(lines) == 1, result.output
    return lines[0]


def _all_commands(cli, model, data, tmp_path) -> list[str]:
    runner = CliRunner()
    return [
        _error_line(runner.invoke(cli, ["generate", "--model", model, "a cat", "-o", str(tmp_path / "x.png")])),
        _error_line(
            runner.invoke(
                cli,
                ["train", "lora", "--model", model, "--data", str(data), "--output", str(tmp_path / "o.safetensors")],
            )
        ),
        _error_line(runner.invoke(cli, ["model", "info", model])),
    ]


def test_missing_model_file_is_not_a_hub_id(cli, data, tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "other.safetensors").write_bytes(b"")
    missing = str(tmp_path / "models" / "v1-5.safetensors")
    lines = _all_commands(cli, missing, data, tmp_path)
    assert len(set(lines)) == 1, lines  # generate, train and model info say the same
    assert "no such model file or folder" in lines[0] and "other.safetensors" in lines[0]
    assert "download" not in lines[0] and "Hugging Face" not in lines[0]
    relative = _all_commands(cli, "models/v1-5.safetensors", data, tmp_path)
    assert "hf download" not in relative[0] and "huggingface-cli" not in relative[0]


def test_uncached_hub_id_names_hf_download(cli, data, tmp_path):
    lines = _all_commands(cli, "someone/some-model", data, tmp_path)
    assert len(set(lines)) == 1, lines
    assert "`hf download someone/some-model`" in lines[0] and "huggingface-cli" not in lines[0]


def test_text_file_renamed_to_safetensors_one_message(cli, data, tmp_path):
    fake = tmp_path / "fake.safetensors"
    fake.write_text("404: Not Found\n", encoding="utf-8")
    lines = _all_commands(cli, str(fake), data, tmp_path)
    assert len(set(lines)) == 1, lines
    assert lines[0] == f"Error: {fake}: not a safetensors file: it is a text file (starts with '404: Not Found')"
    # the network readers give the very same message
    from sdplugin_lora.format import read_lora
    from sdplugin_ti.formats import load_embedding

    for reader in (read_lora, load_embedding):
        with pytest.raises(ModelFormatError) as info:
            reader(fake)
        assert f"Error: {info.value}" == lines[0]


def test_model_info_reports_fp16_of_a_diffusers_folder(cli, tmp_path):
    from sdcore.models.tiny import create_tiny_bundle

    create_tiny_bundle("sd1").save(tmp_path / "fp16", format="diffusers", dtype="fp16")
    result = CliRunner().invoke(cli, ["model", "info", str(tmp_path / "fp16")])
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if "params" in line]
    assert len(rows) == 3 and all(" float16 " in row for row in rows), result.output


def test_empty_image_says_empty_file(tmp_path):
    from sdcore.data.images import ImageError, open_image_rgb, probe_image

    (tmp_path / "blank.png").write_bytes(b"")
    for reader in (probe_image, open_image_rgb):
        with pytest.raises(ImageError, match=r"blank\.png: empty file \(0 bytes\)"):
            reader(tmp_path / "blank.png")


def _dataset_toml(tmp_path, *batch_sizes, general=None):
    """A kohya dataset TOML with one [[datasets]] per entry of ``batch_sizes`` (None: no batch_size key)."""
    lines = ["[general]", f"batch_size = {general}" if general is not None else ""]
    for size in batch_sizes:
        lines += ["[[datasets]]", f"batch_size = {size}" if size is not None else ""]
        lines += ["  [[datasets.subsets]]", "  image_dir = 'data'"]
    path = tmp_path / "dataset.toml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_dataset_toml_batch_size_is_the_runs(tmp_path):
    """kohya reads a dataset's batch_size before --train_batch_size; sdcore used to ignore it in silence."""
    from sdcore.train.config import load_options
    from sdcore.train.options import TrainOptions

    notes: list[str] = []
    options = load_options(TrainOptions, overrides={"data": _dataset_toml(tmp_path, 2)}, notes=notes)
    assert options.batch_size == 2
    assert any("batch size 2 from" in note for note in notes), notes
    # the file wins over the command line, as kohya's fallback order [dataset, general, argparse]
    options = load_options(TrainOptions, overrides={"data": _dataset_toml(tmp_path, 2), "batch_size": 4}, notes=[])
    assert options.batch_size == 2
    assert load_options(TrainOptions, overrides={"data": _dataset_toml(tmp_path, None, general=3)}).batch_size == 3
    # no batch_size anywhere: the run's stays, without a note
    notes = []
    options = load_options(
        TrainOptions, overrides={"data": _dataset_toml(tmp_path, None), "batch_size": 4}, notes=notes
    )
    assert options.batch_size == 4 and not notes
    # datasets that batch differently: each keeps its own (the sampler's), the run's fills the one without, a note
    notes = []
    assert load_options(TrainOptions, overrides={"data": _dataset_toml(tmp_path, 2, 3)}, notes=notes).batch_size == 1
    assert any("datasets[0] 2, datasets[1] 3" in note for note in notes), notes
    notes = []
    options = load_options(
        TrainOptions, overrides={"data": _dataset_toml(tmp_path, 2, None), "batch_size": 4}, notes=notes
    )
    assert options.batch_size == 4
    assert any("datasets[0] 2, datasets[1] 4 " in note and "--batch-size 4 where" in note for note in notes), notes
    both = load_options(TrainOptions, overrides={"data": _dataset_toml(tmp_path, 2, None), "batch_size": 2})
    assert both.batch_size == 2


def test_missing_lora_lists_only_loras_not_a_training_state(tmp_path):
    """`--lora-dir out` after `--output out/x.safetensors`: the not-found error offered the state's
    optimizer, rng, scheduler and trainable files as LoRA names, and `<lora:trainable>` loaded the state."""
    import torch
    from safetensors.torch import save_file
    from sdcore.errors import NetworkMismatchError
    from sdplugin_lora.apply import LoraHandler

    lora = {"lora_unet_x.lora_down.weight": torch.zeros(1, 2), "lora_unet_x.lora_up.weight": torch.zeros(2, 1)}
    save_file(lora, str(tmp_path / "mychar.safetensors"))
    state = tmp_path / "mychar-state" / "step-00000010"
    state.mkdir(parents=True)
    (state / "train_state.json").write_text("{}")
    save_file(lora, str(state / "trainable.safetensors"))
    save_file({"a": torch.zeros(1)}, str(state / "rng.safetensors"))
    torch.save({"state": {}}, state / "optimizer.pt")
    handler = LoraHandler(tmp_path)
    with pytest.raises(NetworkMismatchError, match=r"'other' not found in .*; available: mychar$"):
        handler.find("other")
    with pytest.raises(NetworkMismatchError, match="'trainable' not found"):
        handler.find("trainable")
    assert handler.find("mychar") == tmp_path / "mychar.safetensors"


def test_plan_says_which_epoch_max_steps_ends_the_run_in(cli, data, tmp_path):
    """--epochs 3 --max-steps 3 (whichever first) said "3 optimizer steps over 3 epochs" for a run that
    stops in its second epoch (2 images, batch 1: 2 steps an epoch)."""
    runner = CliRunner()
    base = ["train", "lora", "--model", "tiny:sd1", "--data", str(data), "--output", str(tmp_path / "o.safetensors")]
    result = runner.invoke(cli, [*base, "--dry-run", "--epochs", "3", "--max-steps", "3"])
    assert result.exit_code == 0, result.output
    assert "2 batches of 1 per epoch" in result.output
    assert "3 optimizer steps (--max-steps ends the run in epoch 2 of 3)" in result.output
    result = runner.invoke(cli, [*base, "--dry-run", "--epochs", "3", "--max-steps", "6"])
    assert "6 optimizer steps over 3 epochs" in result.output, result.output


def test_the_last_line_names_a_state_only_when_one_was_written(cli, data, tmp_path):
    """A run without a state (--no-save-state; kohya's names without save_state) ended with "resumable state in
    out/o-state", a folder that was never made."""
    runner = CliRunner()
    base = ["train", "lora", "--model", "tiny:sd1", "--data", str(data), "--max-steps", "1", "--no-progress"]
    for flags, name in (([], "with"), (["--no-save-state"], "without")):
        output = tmp_path / name / "o.safetensors"
        result = runner.invoke(cli, [*base, "--output", str(output), *flags])
        assert result.exit_code == 0, result.output
        last = result.stdout.strip().splitlines()[-1]  # the plan and progress go to stderr
        state = output.parent / "o-state"
        if flags:
            assert last == f"saved {output} after 1 steps" and not state.exists(), last
        else:
            assert last == f"saved {output} after 1 steps; resumable state in {state}" and state.is_dir(), last


def test_resume_from_a_kohya_state_says_what_to_do(cli, data, tmp_path):
    """kohya's `--save_state` folder (accelerate's files + {"current_epoch", "current_step"}) said
    "training state format None is not supported"."""
    import json

    state = tmp_path / "out" / "mychar-000002-state"
    state.mkdir(parents=True)
    (state / "train_state.json").write_text(json.dumps({"current_epoch": 2, "current_step": 80}))
    for name in ("optimizer.bin", "scheduler.bin", "random_states_0.pkl", "model.safetensors"):
        (state / name).write_bytes(b"")
    output = str(tmp_path / "o.safetensors")
    args = ["train", "lora", "--model", "tiny:sd1", "--data", str(data), "--output", output, "--resume", str(state)]
    line = _error_line(CliRunner().invoke(cli, args))
    assert "a kohya sd-scripts state" in line and "--network_weights" in line, line


def test_resume_from_the_output_folder_names_its_state_folders(tmp_path):
    """`--resume out` (the folder of `--output out/x.safetensors`) said only "no train_state.json"."""
    from sdcore.errors import ConfigError
    from sdcore.train.state import resolve_resume

    state = tmp_path / "out" / "x-state" / "step-00000004"
    state.mkdir(parents=True)
    (state / "train_state.json").write_text("{}")
    (tmp_path / "out" / "empty-state").mkdir()
    assert resolve_resume(str(tmp_path / "out" / "x-state"), tmp_path) == state
    with pytest.raises(ConfigError, match=r"no train_state.json\); the state folders in it: .*x-state$"):
        resolve_resume(str(tmp_path / "out"), tmp_path)
    with pytest.raises(ConfigError, match=r"no train_state.json\)$"):
        resolve_resume(str(tmp_path / "out" / "empty-state"), tmp_path)


@pytest.mark.parametrize("family", ["flux", "chroma"])
def test_flow_generate_does_not_ask_for_torchvision(fresh_generate, family):
    """Building FluxPipeline/ChromaPipeline made transformers print two lines per run telling the user to install
    torchvision (for IP-Adapter image processors never used); SD1/SDXL/SD3 already silenced them. A fresh
    process: transformers warns once per process."""
    done, out = fresh_generate(f"tiny:{family}")
    assert done.returncode == 0, done.stderr
    assert out.exists()
    assert "torchvision" not in done.stdout + done.stderr


@pytest.mark.parametrize(
    ("args", "recipe"),
    [
        (["tag", "wd14"], "hf download SmilingWolf/wd-vit-tagger-v3 model.onnx selected_tags.csv --local-dir ./wd-v3"),
        (["tag", "caption"], "hf download Salesforce/blip-image-captioning-large config.json"),
        (["tag", "caption", "--blip", "."], "hf download openai/clip-vit-large-patch14 config.json"),
        (["tag", "deepdanbooru"], "curl -L -o model-resnet_custom_v3.pt https://github.com/AUTOMATIC1111/"),
    ],
)
def test_tagger_without_a_local_model_says_how_to_get_one(cli, tmp_path, args, recipe):
    """Offline, a tagger with no model (or a path that is not there) is one line with the docs' download
    command, not click's bare "Missing option" / "does not exist"."""
    from pathlib import Path

    docs = (Path(__file__).parents[1] / "docs" / "offline-models.md").read_text(encoding="utf-8")
    runner = CliRunner()
    if args[-1] == ".":  # --clip given but not there
        args = [*args, "--clip", "./clip-vit-large-patch14"]
    line = _error_line(runner.invoke(cli, [*args, str(tmp_path)]))
    assert recipe in line and "sdcore downloads nothing" in line, line
    command = line.split("online: ")[1].split(", then ")[0]
    assert command in docs, command  # the exact recipe docs/offline-models.md gives
    if args[1] == "wd14":  # a Hugging Face id given as the folder: that repository's recipe
        hub = _error_line(
            runner.invoke(cli, [*args, str(tmp_path), "--model-dir", "SmilingWolf/wd-v1-4-convnext-tagger-v2"])
        )
        assert "hf download SmilingWolf/wd-v1-4-convnext-tagger-v2 model.onnx selected_tags.csv" in hub, hub
        assert "--model-dir ./wd-v1-4-convnext-tagger-v2 " in hub, hub


def test_plugins_says_what_the_environment_left_out(monkeypatch):
    """SDCORE_LOAD_PLUGINS with a typo printed "No plugins installed." although all were installed."""
    from importlib import metadata

    installed = sorted(ep.name for ep in metadata.entry_points(group="sdcore"))
    assert "lora" in installed
    monkeypatch.setenv("SDCORE_LOAD_PLUGINS", "loar")
    out = CliRunner().invoke(build_cli(get_plugin_manager()), ["plugins"]).output
    assert "No plugins installed" not in out and "No plugins loaded." in out, out
    assert f"not loaded (SDCORE_LOAD_PLUGINS): {', '.join(installed)}" in out, out
    assert "SDCORE_LOAD_PLUGINS names loar: no installed plugin has that name" in out, out
    monkeypatch.delenv("SDCORE_LOAD_PLUGINS")
    monkeypatch.setenv("SDCORE_DISABLE_PLUGINS", "lora,nothere")
    out = CliRunner().invoke(build_cli(get_plugin_manager()), ["plugins"]).output
    assert "not loaded (SDCORE_DISABLE_PLUGINS): lora\n" in out and "lora  (" not in out, out
    assert "SDCORE_DISABLE_PLUGINS names nothere:" in out and "ti  (" in out, out


@pytest.fixture(scope="module")
def fresh_generate(tmp_path_factory):
    """``sdcore generate -m MODEL "a cat" --steps 1 --size 64x64`` in a fresh Python process (libraries warn
    once per process), without ``SDCORE_VERBOSE`` or with ``SDCORE_VERBOSE=1``: returns the finished process
    and its image's path. The same command is run once per module: the quiet ``tiny:chroma`` run serves both
    the torchvision check and the library-noise check (each asserts its own things on it), one start-up of
    torch and diffusers (5-13 s) fewer."""
    import os
    import subprocess
    import sys

    runs: dict[tuple[str, bool], tuple[subprocess.CompletedProcess[str], Path]] = {}
    folder = tmp_path_factory.mktemp("generate")
    env = {k: v for k, v in os.environ.items() if k != "SDCORE_VERBOSE"}

    def run(model: str, *, verbose: bool = False) -> tuple[subprocess.CompletedProcess[str], Path]:
        if (model, verbose) not in runs:
            out = folder / f"{len(runs)}.png"
            args = ["generate", "-m", model, "a cat", "--steps", "1", "--size", "64x64", "-o", str(out)]
            run_env = {**env, "SDCORE_VERBOSE": "1"} if verbose else env
            code = "from sdcore.cli import main; main()"
            done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=run_env,
                                  timeout=300)  # fmt: skip
            runs[(model, verbose)] = (done, out)
        return runs[(model, verbose)]

    return run


def _flow_folder(tmp_path, family: str) -> str:
    """A tiny FLUX.1 or Chroma saved as a diffusers folder; Chroma's transformer in two shards, as the real
    ones are saved (diffusers draws its "Loading checkpoint shards" bar for a model of several files)."""
    import shutil

    from sdcore.models.load import load_model

    bundle = load_model(f"tiny:{family}")
    folder = bundle.save(tmp_path / family, format="diffusers")
    if family == "chroma":
        shutil.rmtree(folder / "transformer")
        bundle.transformer.save_pretrained(folder / "transformer", max_shard_size="200KB")
    return str(folder)


@pytest.mark.parametrize(
    ("model", "noise"),
    [
        ("tiny:chroma", "FluxPosEmbed"),
        ("toyworld:", "Loading weights"),
        ("folder:flux", "Loading weights"),
        ("folder:chroma", "Loading checkpoint shards"),
    ],
)
def test_generate_stderr_has_no_library_noise(fresh_generate, tmp_path, model, noise):
    """Building a Chroma transformer made diffusers print a FutureWarning about its own import of
    ``FluxPosEmbed``; loading ``toyworld:`` or a FLUX.1/Chroma diffusers folder drew transformers' "Loading
    weights" bar (and diffusers' "Loading checkpoint shards" for a sharded transformer). All are silenced where
    they are raised; ``SDCORE_VERBOSE=1`` shows them again. A fresh process: each warns once per process."""
    if model.startswith("folder:"):
        model = _flow_folder(tmp_path, model.removeprefix("folder:"))
    for verbose in (False, True):
        done, out = fresh_generate(model, verbose=verbose)
        assert done.returncode == 0, done.stderr
        assert out.exists()
        if verbose:
            assert noise in done.stderr  # what the quiet run hides is there to hide
        else:
            assert done.stderr == "", done.stderr


def test_diffusers_save_stderr_has_no_progress_bar(tmp_path):
    """Writing a diffusers folder (``model create-tiny``/``model convert``, DreamBooth's diffusers saves, all
    through ``write_diffusers``) drew transformers' "Writing model shards" bar for each text encoder on
    stderr; saves are as quiet as loads now. A fresh process, as a user runs the command."""
    import os
    import subprocess
    import sys

    out = tmp_path / "tiny"
    code = "from sdcore.cli import main; main()"
    env = {k: v for k, v in os.environ.items() if k != "SDCORE_VERBOSE"}
    done = subprocess.run([sys.executable, "-c", code, "model", "create-tiny", str(out), "--format", "diffusers"],
                          capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (out / "text_encoder" / "model.safetensors").is_file()
    assert done.stderr == "", done.stderr
