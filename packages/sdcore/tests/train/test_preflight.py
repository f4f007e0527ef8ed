"""The pre-flight: every problem found before any model loads, all at once, exit code 2."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import pytest
from click.testing import CliRunner
from runtime_methods import ConvOutMethod
from sdcore.errors import ConfigError
from sdcore.models.tiny import create_tiny_bundle
from sdcore.specs import MethodSpec
from sdcore.testing.contract import contract_options
from sdcore.train.cli import build_train_command
from sdcore.train.loop import output_paths, train
from sdcore.train.preflight import (
    PreflightError,
    folder_problem,
    planned_saves,
    run_preflight,
)

root_user = hasattr(os, "geteuid") and os.geteuid() == 0


def _opts(tmp_path, tag="run", **kw):
    return contract_options(ConvOutMethod, tmp_path, kw, tag=tag)


def _command():
    return build_train_command(MethodSpec(name="convout", summary="test", method="runtime_methods:ConvOutMethod"))


@pytest.fixture
def read_only(tmp_path, monkeypatch):
    """A read-only folder. Root writes anywhere, so for root the probe write inside it is made to
    fail as the kernel would for anyone else (EACCES); other users get the real chmod."""
    import sdcore.train.preflight as preflight

    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    if root_user:
        real = preflight.write_probe

        def probe(path):
            if Path(path).parent == folder:
                raise PermissionError(13, "Permission denied", str(path))
            real(path)

        monkeypatch.setattr(preflight, "write_probe", probe)
    yield folder
    folder.chmod(0o755)


def test_read_only_output_stops_in_preflight_with_one_line_and_exit_2(tmp_path, read_only, no_model_load):
    o = _opts(tmp_path, max_steps=2)
    start = time.perf_counter()
    result = CliRunner().invoke(
        _command(),
        [
            "--model", "tiny:sd1", "--data", o.data, "--output", str(read_only / "r.safetensors"),
            "--resolution", "64", "--min-bucket-reso", "64", "--max-bucket-reso", "128", "--max-steps", "2",
        ],
    )  # fmt: skip
    elapsed = time.perf_counter() - start
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == [line for line in lines if line.startswith("Error: ")] and len(lines) == 1, result.output
    assert "not writable" in lines[0] and str(read_only) in lines[0]
    assert "Traceback" not in result.output
    assert elapsed < 30
    assert not list(read_only.iterdir())  # the probe file was removed (and nothing else written)


def test_read_only_output_stops_train_before_loading_and_before_the_accelerator(tmp_path, read_only, no_model_load):
    o = _opts(tmp_path, max_steps=2, output=str(read_only / "sub" / "r.safetensors"))
    with pytest.raises(PreflightError) as info:
        train(ConvOutMethod(o))
    assert len(info.value.problems) == 1
    assert "checked at" in info.value.problems[0] and str(read_only) in info.value.problems[0]


def test_a_read_only_result_file_stops_train_before_loading(tmp_path, no_model_load):
    """An earlier result the user made read-only (``chmod a-w``) would be kept by the final save
    (:func:`sdcore.io.read_only_problem`) after the whole run: the pre-flight says so first."""
    guarded = tmp_path / "kept.safetensors"
    guarded.write_bytes(b"earlier weights")
    guarded.chmod(0o444)
    o = _opts(tmp_path, max_steps=2, output=str(guarded))
    with pytest.raises(PreflightError) as info:
        train(ConvOutMethod(o))
    assert info.value.problems == [
        f"--output {guarded} is read-only (mode -r--r--r--): left as it is; make it writable (chmod u+w) to "
        "replace it, or choose another --output"
    ]
    assert guarded.read_bytes() == b"earlier weights"


def test_folder_check_finds_the_nearest_existing_parent(tmp_path):
    assert folder_problem(tmp_path / "a" / "b" / "c", "output folder", "--output") is None
    assert not (tmp_path / "a").exists()  # nothing created
    blocker = tmp_path / "file"
    blocker.write_text("x")
    problem = folder_problem(blocker / "sub", "output folder", "--output")
    assert problem is not None and "is a file" in problem


def test_missing_model_is_reported_by_dry_run(tmp_path):
    o = _opts(tmp_path)
    result = CliRunner().invoke(
        _command(),
        ["--model", str(tmp_path / "nope.safetensors"), "--data", o.data, "--output", str(tmp_path / "r.safetensors"),
         "--dry-run"],
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert f"Error: {tmp_path / 'nope.safetensors'}: no such model file or folder" in result.output
    assert "Traceback" not in result.output


def test_a_batch_size_of_0_is_one_problem_and_the_dataset_is_still_checked(tmp_path):
    """docs/training.md's pre-flight example: ``--batch-size 0`` is reported once, in the options' words (the
    dataset's batch planner used to add its own "batch size must be at least 1" line), and the dataset is
    still read for its own problems."""
    o = _opts(tmp_path, batch_size=0)
    assert run_preflight(ConvOutMethod(o), o, plan=False).problems == ["--batch-size must be at least 1, got 0"]
    (tmp_path / "empty").mkdir()
    o = _opts(tmp_path, batch_size=0, data=str(tmp_path / "empty"))
    problems = run_preflight(ConvOutMethod(o), o, plan=False).problems
    assert problems[0] == "--batch-size must be at least 1, got 0" and len(problems) == 2, problems
    assert "batch size" not in problems[1]


def test_unreadable_model_header_is_reported(tmp_path):
    bad = tmp_path / "fake.safetensors"
    bad.write_text("this is a text file, not a model")
    o = _opts(tmp_path, model=str(bad))
    report = run_preflight(ConvOutMethod(o), o, plan=False)
    assert len(report.problems) == 1 and "not a safetensors file" in report.problems[0]


def test_model_header_gives_the_family_without_loading(tmp_path, no_model_load):
    path = tmp_path / "model.safetensors"
    create_tiny_bundle("sdxl").save(path)
    o = _opts(tmp_path, model=str(path))
    report = run_preflight(ConvOutMethod(o), o)
    assert report.problems == []
    assert report.layout is not None and report.layout.family == "sdxl"
    assert report.memory is not None and report.memory.params.trainable > 0


def test_several_problems_are_reported_together(tmp_path, read_only, no_model_load):
    o = _opts(
        tmp_path,
        model=str(tmp_path / "missing-model"),
        data=str(tmp_path / "no-data"),
        output=str(read_only / "r.safetensors"),
        batch_size=0,
        lr=-1.0,
    )
    result = CliRunner().invoke(
        _command(),
        ["--model", o.model, "--data", o.data, "--output", o.output, "--batch-size", "0", "--lr", "-1"],
    )
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    text = "\n".join(errors)
    for expected in (
        "--batch-size must be at least 1",
        "--lr must be positive",
        "missing-model: no such model file or folder",
        "dataset path does not exist",
    ):
        assert expected in text, text
    assert "not writable" in text
    assert len(errors) == len(set(errors)) >= 4


def test_validate_options_reports_every_option_problem(tmp_path):
    from sdcore.train.loop import validate_options

    o = _opts(tmp_path, batch_size=0, noise_offset=-1.0)
    with pytest.raises(ConfigError) as info:
        validate_options(o, ConvOutMethod(o))
    assert "--batch-size" in str(info.value) and "--noise-offset" in str(info.value)


def test_dry_run_prints_the_plan(tmp_path):
    o = _opts(tmp_path)
    result = CliRunner().invoke(
        _command(),
        ["--model", "tiny:sd1", "--data", o.data, "--output", str(tmp_path / "out" / "r.safetensors"),
         "--resolution", "64", "--min-bucket-reso", "64", "--max-bucket-reso", "128", "--epochs", "2",
         "--save-every", "1", "--save-limit", "2", "--keep-states", "2", "--dry-run"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    out = result.output
    assert "model: tiny:sd1 (sd1, tiny)" in out
    assert "buckets: 1 (64x64: 4)" in out
    assert "optimizer steps over 2 epochs" in out
    assert "cached: latents in memory; text-encoder outputs in memory" in out
    assert "saves will use about" in out and "2 intermediate results" in out and "2 states" in out
    assert "estimated peak memory:" in out
    assert not (tmp_path / "out").exists()


def test_resume_with_another_shape_option_is_refused_before_caching(tmp_path, monkeypatch):
    from sdplugin_lora.method import LoraMethod, LoraOptions

    data = _opts(tmp_path).data
    common = dict(
        model="tiny:sd1", data=data, output=str(tmp_path / "lora.safetensors"), resolution=64, min_bucket_reso=64,
        max_bucket_reso=128, progress=False, seed=0,
    )  # fmt: skip
    first = LoraOptions(rank=4, max_steps=1, **common)
    train(LoraMethod(first), bundle=create_tiny_bundle("sd1"))
    import sdcore.train.cache as cache
    import sdcore.train.loop as loop

    monkeypatch.setattr(cache.LatentCache, "fill", lambda *a, **k: pytest.fail("latents cached before the check"))
    monkeypatch.setattr(loop, "load_bundle", lambda *a, **k: pytest.fail("model loaded before the check"))
    again = LoraOptions(rank=8, max_steps=2, resume="latest", **common)
    with pytest.raises(PreflightError) as info:
        train(LoraMethod(again))
    assert len(info.value.problems) == 1
    assert "--rank 4" in info.value.problems[0] and "--rank 8" in info.value.problems[0]
    # the same shape resumes (the check does not refuse everything)
    monkeypatch.undo()
    same = dataclasses.replace(again, rank=4)
    result = train(LoraMethod(same), bundle=create_tiny_bundle("sd1"))
    assert result.steps == 2


def test_resume_from_another_method_is_refused(tmp_path):
    from sdcore.train.preflight import resume_problems

    o = _opts(tmp_path, max_steps=1)
    train(ConvOutMethod(o), bundle=create_tiny_bundle("sd1"))

    class Other(ConvOutMethod):
        name = "other"

    again = dataclasses.replace(o, resume="latest")
    problems = resume_problems(Other(again), again, output_paths(ConvOutMethod(o), o)[1])
    assert len(problems) == 1 and "from method 'convout'" in problems[0]


def test_disk_check_reports_too_little_space(tmp_path, monkeypatch):
    import sdcore.train.preflight as preflight

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    o = _opts(tmp_path)
    report = run_preflight(ConvOutMethod(o), o)
    assert len(report.problems) == 1 and "not enough free disk" in report.problems[0], report.problems
    monkeypatch.undo()
    assert run_preflight(ConvOutMethod(o), o).problems == []


def test_disk_plan_follows_the_save_settings(tmp_path):
    o = _opts(tmp_path, max_steps=10)
    assert planned_saves(o, 10, 5) == (0, 1)  # the final state only
    o = _opts(tmp_path, max_steps=10, save_every=3, keep_states=0)
    assert planned_saves(o, 10, 5) == (3, 4)  # steps 3, 6, 9 + the final state
    o = _opts(tmp_path, max_steps=10, save_every=3, save_limit=2)
    assert planned_saves(o, 10, 5) == (2, 1)  # states: the newest --keep-states (default 1)
    o = _opts(tmp_path, max_steps=10, save_every=3, save_limit=2, keep_states=3)
    assert planned_saves(o, 10, 5) == (2, 3)
    o = _opts(tmp_path, max_steps=10, save_every_epochs=1, save_state=False)
    assert planned_saves(o, 10, 5) == (1, 0)
    # a --resume from step 3 whose state recorded 2 results (step 2 and a Ctrl-C's 3): steps 4, 6, 8 to come
    o = _opts(tmp_path, max_steps=9, save_every=2, save_limit=0)
    assert planned_saves(o, 9, 5) == (4, 1)  # a fresh run: 2, 4, 6, 8 (a Ctrl-C file stands in for the result)
    assert planned_saves(o, 9, 5, start_step=3, kept=2) == (5, 1)  # the Ctrl-C file stays beside them all
    assert planned_saves(dataclasses.replace(o, save_limit=2), 9, 5, start_step=3, kept=2) == (2, 1)
    assert planned_saves(o, 9, 5, start_step=3) == (3, 1)  # a state without the list: only what is to come
    o = _opts(tmp_path, max_steps=20, save_every_epochs=1, save_limit=0)  # epochs end at steps 5, 10, 15
    assert planned_saves(o, 20, 5, start_step=7, kept=2) == (4, 1)  # epoch 1 and a Ctrl-C's 7; epochs 2, 3 to come
    assert planned_saves(o, 20, 5, start_step=10, kept=2) == (3, 1)  # epoch 2's save already among the kept
    o = _opts(tmp_path, max_steps=10, save_every=3)
    report = run_preflight(ConvOutMethod(o), o)
    disk = report.disk
    assert disk is not None
    conv_out = 32 * 4 * 3 * 3 + 4  # the trained UNet conv_out (tiny sd1: 32 -> 4 channels, 3x3)
    assert disk.result_bytes == conv_out * 4  # --save-dtype fp32 (contract options)
    assert disk.state_bytes == conv_out * (4 + 8)  # fp32 tensors + AdamW moments
    assert disk.total == disk.result_bytes * 4 + disk.state_bytes * 1  # the newest state only (--keep-states 1)


def test_dry_run_imports_no_model_reader_weights(tmp_path):
    """--dry-run in a fresh process: the whole pre-flight, and no weight file opened."""
    model = tmp_path / "m.safetensors"
    create_tiny_bundle("sd1").save(model)
    o = _opts(tmp_path)
    code = (
        "import sys, sdcore.models.load as load, sdcore.models.source as source\n"
        "load._assign = lambda *a, **k: sys.exit('weights were assigned')\n"
        "source.CheckpointSource.get = lambda *a, **k: sys.exit('a tensor was read')\n"
        "from sdcore.cli import main\n"
        "sys.argv = ['sdcore', 'train', 'lora', '--model', sys.argv[1], '--data', sys.argv[2], '--output', sys.argv[3],"
        " '--resolution', '64', '--min-bucket-reso', '64', '--dry-run']\n"
        "main()\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(model), o.data, str(tmp_path / "o.safetensors")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "model: " in proc.stdout and "(sd1, single-file)" in proc.stdout
    assert "estimated peak memory" in proc.stdout


def test_a_run_prints_the_disk_and_memory_plans_before_loading(tmp_path, capsys, monkeypatch):
    import sdcore.train.loop as loop

    order = []
    real_load = loop.load_bundle
    monkeypatch.setattr(loop, "load_bundle", lambda *a, **k: order.append("load") or real_load(*a, **k))
    o = _opts(tmp_path, max_steps=1, progress=True, save_every=1)
    real_say = loop.TrainSession.say
    monkeypatch.setattr(
        loop.TrainSession, "say", lambda self, message: order.append(message) or real_say(self, message)
    )
    train(ConvOutMethod(o))
    err = capsys.readouterr().err
    assert "saves will use about" in err and "(result " in err and "1 states x" in err
    assert "estimated peak memory:" in err
    disk = next(i for i, m in enumerate(order) if m.startswith("saves will use"))
    memory = next(i for i, m in enumerate(order) if m.startswith("estimated peak memory"))
    assert disk < order.index("load") and memory < order.index("load")


def test_layouts_of_every_source_without_weights(tmp_path, no_model_load):
    from sdcore.errors import SdcoreError
    from sdcore.models.layout import meta_bundle, read_layout

    bundle = create_tiny_bundle("sd2")
    real = {k: sum(p.numel() for p in m.parameters()) for k, m in bundle.components().items()}
    folder = bundle.save(tmp_path / "diffusers-folder")
    single = bundle.save(tmp_path / "single.safetensors", dtype="fp16")
    for source, fmt, stored in ((folder, "diffusers", 4.0), (single, "single-file", 2.0)):
        layout = read_layout(source)
        assert (layout.family, layout.prediction_type, layout.source_format) == ("sd2", "v_prediction", fmt)
        assert layout.stored_bytes_per_weight == pytest.approx(stored, rel=0.01)
        counts = {k: sum(p.numel() for p in m.parameters()) for k, m in meta_bundle(layout).components().items()}
        assert counts == real
    with pytest.raises(SdcoreError, match="not in the Hugging Face cache"):
        read_layout("nobody/not-a-cached-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SdcoreError, match=r"no model_index\.json"):
        read_layout(tmp_path / "empty")


def test_missing_sample_prompts_file_and_unwritable_latent_cache_are_reported(tmp_path, read_only):
    o = _opts(tmp_path, sample_prompts=str(tmp_path / "prompts.txt"), sample_every=2)
    assert run_preflight(ConvOutMethod(o), o, plan=False).problems == [
        f"--sample-prompts {o.sample_prompts}: cannot read prompt file: No such file or directory"
    ]
    o = _opts(tmp_path, cache_latents_to_disk=True, cache_dir=str(read_only / "latents"))
    problems = run_preflight(ConvOutMethod(o), o, plan=False).problems
    assert len(problems) == 1 and "latent cache folder" in problems[0] and "--cache-dir" in problems[0]


def test_dry_run_reports_an_unused_base_weights_exclude_pattern_before_loading(tmp_path, no_model_load):
    """--base-weights-exclude patterns are matched on the pre-flight's meta-device model (after the method's
    prepare, as the run matches them after loading): one that keeps nothing out is a pre-flight problem,
    reported with the others, and no weights load."""
    from sdcore.cli import build_cli
    from sdcore.plugins import get_plugin_manager

    model = tmp_path / "m.safetensors"
    create_tiny_bundle("sd1").save(model)
    o = _opts(tmp_path)
    args = ["train", "lora", "--model", str(model), "--data", o.data, "--output", str(tmp_path / "o.safetensors"),
            "--resolution", "64", "--min-bucket-reso", "64", "--fp8-base", "--dry-run"]  # fmt: skip
    cli = build_cli(get_plugin_manager())
    used = CliRunner().invoke(cli, [*args, "--base-weights-exclude", "time_embedding.*"])
    assert used.exit_code == 0, used.output
    result = CliRunner().invoke(cli, [*args, "--base-weights-exclude", "time_embedding.*,*no_such*,x", "--lr", "-1"])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert "Error: --lr must be positive, got -1.0" in errors
    assert (
        "Error: --base-weights-exclude *no_such*,x: matches none of the UNet2DConditionModel's frozen Linear/Conv2d "
        "layers (glob patterns on module names such as 'time_text_embed.timestep_embedder.linear_1')"
    ) in errors, result.output
    assert "Traceback" not in result.output


def test_base_weights_exclude_is_matched_on_a_denoiser_a_method_leaves_unfrozen_in_its_plan(tmp_path, no_model_load):
    """Textual Inversion's plan_groups (no init-text lookup on a shapes-only model) trains new vectors and leaves the
    meta-device model's requires_grad flags as built (True); its prepare freezes every component, so the run converts
    the whole denoiser and a pattern naming one of its layers keeps it out. The pre-flight must judge "frozen" by what
    the plan trains, as its fp8 count does, not by those flags: it reported every pattern as matching nothing."""
    from sdcore.cli import build_cli
    from sdcore.plugins import get_plugin_manager

    model = tmp_path / "m.safetensors"
    create_tiny_bundle("sd1").save(model)
    o = _opts(tmp_path)
    args = ["train", "ti", "--model", str(model), "--data", o.data, "--output", str(tmp_path / "o.pt"), "--name", "tok",
            "--init-text", "cat", "--resolution", "64", "--min-bucket-reso", "64", "--fp8-base", "--dry-run"]  # fmt: skip
    cli = build_cli(get_plugin_manager())
    used = CliRunner().invoke(cli, [*args, "--base-weights-exclude", "time_embedding.*"])
    assert used.exit_code == 0, used.output
    unused = CliRunner().invoke(cli, [*args, "--base-weights-exclude", "time_embedding.*,*no_such*"])
    assert unused.exit_code == 2, unused.output
    assert "Error: --base-weights-exclude *no_such*: matches none" in unused.output, unused.output


def test_a_clip_skip_deeper_than_the_text_encoder_is_a_preflight_problem(tmp_path):
    """``--clip-skip N`` past the text encoder's depth was found only when the loaded encoder ran; the pre-flight
    reads the depth from the layout (no weights) with each family's count: SD1 takes up to the depth, SDXL one
    less (clip skip 1 is its penultimate layer already). The boundary is the one the encoders refuse at run time."""
    from sdcore.models.text import encode_prompts

    def problems(model, skip):
        o = _opts(tmp_path, model=model, clip_skip=skip)
        return [p for p in run_preflight(ConvOutMethod(o), o, plan=False).problems if "clip-skip" in p]

    for model, deepest in (("tiny:sd1", 3), ("tiny:sdxl", 2)):  # the tiny CLIPs are 3 layers deep
        assert problems(model, deepest) == []
        (line,) = problems(model, deepest + 1)
        family = model.split(":")[1]
        assert line.startswith(
            f"--clip-skip {deepest + 1} too large: the {family} model's text encoder has only 3 layers, so "
            f"--clip-skip is at most {deepest}"
        )
        bundle = create_tiny_bundle(family)
        encode_prompts(bundle, ["a cat"], clip_skip=deepest)  # the run takes the deepest
        with pytest.raises(ConfigError, match="--clip-skip too large"):
            encode_prompts(bundle, ["a cat"], clip_skip=deepest + 1)  # and refuses one more
    assert problems("tiny:flux", 9) == []  # Flux reads no CLIP hidden states: nothing to refuse
