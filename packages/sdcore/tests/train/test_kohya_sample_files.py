"""Training samples also written one PNG per prompt, as kohya sd-scripts names and places them, each with the
infotext ``sdcore generate`` writes; sample steps default per source tool (kohya 30, OneTrainer and ai-toolkit
their own); a resumed run overwrites nothing."""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import time
import types

import numpy as np
import pytest
from PIL import Image
from runtime_methods import ConvOutMethod
from sdcore.generate.pnginfo import parse_parameters, read_png_parameters
from sdcore.models.tiny import create_tiny_bundle
from sdcore.testing.contract import contract_options
from sdcore.train import sampling
from sdcore.train.loop import train
from sdcore.train.sample_info import ALL_PARAMETERS_KEY

pytest.importorskip("sdcore.generate.pipeline")

NOW = time.struct_time((2026, 2, 16, 8, 7, 29, 0, 47, 0))


def kohya_name(output_name, epoch, steps, i, seed, now=NOW):
    """kohya sd-scripts 48d368f library/train_util.py:6572-6576 (sample_image_inference), rewritten:
    ts_str = strftime("%Y%m%d%H%M%S", localtime()); num_suffix = f"e{epoch:06d}" if epoch is not None else
    f"{steps:06d}"; seed_suffix = "" if seed is None else f"_{seed}"; the prompt's place i as {i:02d}; the
    output_name and "_" in front unless it is None. The folder is output_dir + "/sample" (:6438)."""
    ts_str = time.strftime("%Y%m%d%H%M%S", now)
    num_suffix = f"e{epoch:06d}" if epoch is not None else f"{steps:06d}"
    seed_suffix = "" if seed is None else f"_{seed}"
    return f"{'' if output_name is None else output_name + '_'}{num_suffix}_{i:02d}_{ts_str}{seed_suffix}.png"


@pytest.fixture
def fixed_clock(monkeypatch):
    monkeypatch.setattr(sampling, "_clock", lambda: NOW)


@pytest.fixture
def umask027():
    old = os.umask(0o027)
    try:
        yield
    finally:
        os.umask(old)


def _prompts(tmp_path, text="a red thing --d 5\na blue thing\n"):
    path = tmp_path / "prompts.txt"
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_each_sample_is_its_own_png_named_and_placed_as_kohya_does(tmp_path, fixed_clock, umask027):
    # 4 images, batch 2: one epoch is 2 steps; renders before the first step (kohya's epoch 0) and at step 2
    o = contract_options(
        ConvOutMethod,
        tmp_path,
        {"max_steps": 2, "sample_every": 2, "sample_at_first": True, "sample_prompts": _prompts(tmp_path),
         "sample_steps": 2, "seed": 77},
    )  # fmt: skip
    train(ConvOutMethod(o), bundle=create_tiny_bundle("sd1"))
    folder = tmp_path / "run" / "sample"
    want = [kohya_name("result", 0, 0, 0, 5), kohya_name("result", 0, 0, 1, None),  # --sample_at_first: epoch 0
            kohya_name("result", None, 2, 0, 5), kohya_name("result", None, 2, 1, None)]  # fmt: skip
    assert sorted(p.name for p in folder.iterdir()) == sorted(want)
    assert want[2] == "result_000002_00_20260216080729_5.png"  # the rule's result, spelled out once
    # the umask's modes (027), as an ordinary open() and mkdir() make them
    assert stat.S_IMODE(folder.stat().st_mode) == 0o750
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o640 for p in folder.iterdir())
    # each file's own infotext is its entry of the grid's, and its pixels the grid's tile
    with Image.open(tmp_path / "run" / "result-samples" / "step00000002.png") as grid:
        texts = json.loads(grid.info[ALL_PARAMETERS_KEY])
        tiles = [np.asarray(grid.convert("RGB"))[:, k * 64 : (k + 1) * 64] for k in range(2)]
    for index, name in enumerate(want[2:]):
        with Image.open(folder / name) as image:
            assert image.info["parameters"] == texts[index]
            assert np.array_equal(np.asarray(image.convert("RGB")), tiles[index])
    first, second = (read_png_parameters(folder / name) for name in want[2:])
    assert first is not None and second is not None
    assert (first.prompt, first.seed, first.steps, first.extra["Training step"]) == ("a red thing", 5, 2, "2")
    assert (second.prompt, second.seed) == ("a blue thing", 78)  # --seed + its line's place


def test_from_png_renders_a_sample_again_pixel_for_pixel(tmp_path, fixed_clock):
    """The sample before the first step is the untrained tiny model's: ``sdcore generate --from-png`` on that
    model reads everything the render used from the infotext and gives the same pixels."""
    from click.testing import CliRunner
    from sdcore.builtin.generate_command import generate
    from sdcore.plugins import get_plugin_manager

    o = contract_options(
        ConvOutMethod,
        tmp_path,
        {"max_steps": 1, "sample_at_first": True, "sample_prompts": _prompts(tmp_path, "tiny, red stripes --n blue\n"),
         "sample_steps": 2, "sample_sampler": "dpm++2m", "clip_skip": 2, "seed": 9},
    )  # fmt: skip
    train(ConvOutMethod(o), bundle=create_tiny_bundle("sd1"))
    sample = tmp_path / "run" / "sample" / kohya_name("result", 0, 0, 0, None)
    again = tmp_path / "again.png"
    pm = get_plugin_manager(builtins=False, entrypoints=False)
    result = CliRunner().invoke(
        generate,
        ["-m", "tiny:sd1", "--from-png", str(sample), "--device", "cpu", "-o", str(again)],
        obj=types.SimpleNamespace(pm=pm),
    )
    assert result.exit_code == 0, result.output
    params = parse_parameters(Image.open(sample).info["parameters"])
    assert (params.negative_prompt, params.steps, params.sampler, params.seed) == ("blue", 2, "dpm++2m", 9)
    with Image.open(sample) as a, Image.open(again) as b:
        assert np.array_equal(np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB")))


def test_epoch_renders_are_named_by_the_epoch(tmp_path, fixed_clock):
    """kohya passes the epoch just ended (train_network.py:1707, ``epoch + 1``) for the renders at an epoch's end;
    sdcore's last one (the run's end) is named the same way where the run samples by epochs."""
    o = contract_options(
        ConvOutMethod,
        tmp_path,
        {"max_steps": 4, "sample_every_epochs": 1, "sample_prompts": _prompts(tmp_path, "a red thing\n"),
         "sample_steps": 1},
    )  # fmt: skip
    train(ConvOutMethod(o), bundle=create_tiny_bundle("sd1"))
    names = sorted(p.name for p in (tmp_path / "run" / "sample").iterdir())
    assert names == [kohya_name("result", 1, 2, 0, None), kohya_name("result", 2, 4, 0, None)]
    assert sorted(p.name for p in (tmp_path / "run" / "result-samples").iterdir()) == ["epoch000001.png", "final.png"]


def test_a_resumed_run_overwrites_no_sample(tmp_path, fixed_clock):
    """The resumed run renders step 2 again (--sample-at-first) in the same second: both runs' files stay, the
    later one's named with ``-2``."""
    prompts = _prompts(tmp_path, "a red thing --d 5\n")
    o = contract_options(
        ConvOutMethod,
        tmp_path,
        {"max_steps": 2, "sample_every": 2, "sample_prompts": prompts, "sample_steps": 1, "save_state": True,
         "batch_size": 1},
    )  # fmt: skip
    train(ConvOutMethod(o), bundle=create_tiny_bundle("sd1"))
    folder, grids = tmp_path / "run" / "sample", tmp_path / "run" / "result-samples"
    before = {p: p.read_bytes() for p in [*folder.iterdir(), *grids.iterdir()]}
    assert len(before) == 2
    train(
        ConvOutMethod(dataclasses.replace(o, resume="latest", max_steps=4, sample_at_first=True)),
        bundle=create_tiny_bundle("sd1"),
    )
    for path, data in before.items():
        assert path.read_bytes() == data  # untouched
    taken = kohya_name("result", None, 2, 0, 5)  # batch 1: step 2 is mid-epoch, so the step's form again
    again = taken.replace(".png", "-2.png")
    assert sorted(p.name for p in folder.iterdir()) == sorted([taken, again, kohya_name("result", None, 4, 0, 5)])
    assert sorted(p.name for p in grids.iterdir()) == ["step00000002-2.png", "step00000002.png", "step00000004.png"]


# -- default sample steps per source ------------------------------------------------------------------------------


def test_kohya_runs_sample_30_steps_and_sdcore_runs_keep_20(tmp_path):
    """kohya: ``prompt_dict.get("sample_steps", 30)`` (sd-scripts 48d368f library/train_util.py:6506), for a run
    written in kohya's names; sdcore's own names keep sdcore's 20; a prompt's --s wins either way."""
    from sdcore.train.config import load_options
    from sdcore.train.options import TrainOptions
    from sdcore.train.sample_prompts import read_sample_prompts

    prompts = _prompts(tmp_path, "a red thing\na blue thing --s 7\n")
    kohya = tmp_path / "kohya.toml"
    kohya.write_text(f'sample_prompts = "{prompts}"\nsample_every_n_steps = 10\nmax_train_steps = 10\n')
    notes: list[str] = []
    o = load_options(TrainOptions, kohya, notes=notes)
    assert o.sample_steps == 30 and any("sample images take 30 steps" in n for n in notes)
    assert [p.steps or o.sample_steps for p in read_sample_prompts(prompts)] == [30, 7]
    # a kohya run without sample prompts: nothing said about them
    kohya.write_text("max_train_steps = 10\n")
    notes = []
    load_options(TrainOptions, kohya, notes=notes)
    assert not any("sample images" in n for n in notes)
    own = tmp_path / "own.toml"
    own.write_text(f'sample_prompts = "{prompts}"\nsample_every = 10\n')
    assert load_options(TrainOptions, own, notes=[]).sample_steps == 20
    given = tmp_path / "given.toml"
    given.write_text(f'sample_prompts = "{prompts}"\nsample_every_n_steps = 10\nsample_steps = 12\n')
    assert load_options(TrainOptions, given, notes=[]).sample_steps == 12


# OneTrainer 23df383 modules/util/config/SampleConfig.py _get_model_defaults: diffusion_steps 30 without a model
# (:16), 30 for SD 1.5 (:29), 2.x (:37), SDXL (:45), 28 for SD3 (:53), 30 for FLUX.1 (:60) and Chroma (:67)
ONETRAINER_STEPS = {None: 30, "sd1": 30, "sd2": 30, "sdxl": 30, "sd3": 28, "flux": 30, "chroma": 30}


@pytest.mark.parametrize("family", list(ONETRAINER_STEPS))
def test_onetrainer_samples_take_onetrainers_steps(tmp_path, family):
    from sdcore.train.sample_prompts import read_sample_prompts

    samples = tmp_path / "samples.json"
    samples.write_text(json.dumps([{"prompt": "a"}, {"prompt": "b", "diffusion_steps": 5}]), encoding="utf-8")
    assert [p.steps for p in read_sample_prompts(str(samples), family)] == [ONETRAINER_STEPS[family], 5]


def test_aitoolkit_samples_take_aitoolkits_steps(tmp_path):
    """ai-toolkit 27a03a9 toolkit/config_modules.py: SampleConfig ``sample_steps`` 20 (:90), a sample's own
    ``sample_steps`` over it (:57)."""
    from sdcore.train.sample_prompts import read_sample_prompts

    job = tmp_path / "job.yaml"
    head = "job: extension\nconfig:\n  name: k\n  process:\n    - type: sd_trainer\n      model: {name_or_path: x}\n"
    job.write_text(head + "      sample:\n        samples:\n          - prompt: a\n          - prompt: b\n"
                   "            sample_steps: 6\n", encoding="utf-8")  # fmt: skip
    assert [p.steps for p in read_sample_prompts(str(job))] == [20, 6]
    job.write_text(head + "      sample:\n        sample_steps: 9\n        prompts: [a]\n", encoding="utf-8")
    assert [p.steps for p in read_sample_prompts(str(job))] == [9]


def test_kohya_sample_name_rule_for_a_missing_output_name():
    assert sampling.kohya_sample_name(None, step=3, epoch=None, index=12, seed=None, when=NOW) == kohya_name(
        None, None, 3, 12, None
    )


# -- kohya's render points and per-family defaults ----------------------------------------------------------------


def test_a_run_ending_mid_epoch_names_its_last_render_by_the_epoch(tmp_path, fixed_clock):
    """kohya's step loop only ``break``s at max_train_steps (sd-scripts 48d368f train_network.py:1605-1606); the
    end-of-epoch code still runs and renders with ``epoch + 1`` (:1707), so a run sampling by epochs that stops
    inside its last epoch (num_train_epochs = ceil(max_train_steps / steps per epoch), :979) names that render by
    the epoch it stopped in."""
    o = contract_options(
        ConvOutMethod,
        tmp_path,
        {"max_steps": 3, "sample_every_epochs": 1, "sample_prompts": _prompts(tmp_path, "a red thing\n"),
         "sample_steps": 1},
    )  # fmt: skip
    train(ConvOutMethod(o), bundle=create_tiny_bundle("sd1"))  # 2 steps an epoch: step 3 is inside epoch 2
    names = sorted(p.name for p in (tmp_path / "run" / "sample").iterdir())
    assert names == [kohya_name("result", 1, 2, 0, None), kohya_name("result", 2, 3, 0, None)]


def test_kohya_ignores_sample_every_n_steps_beside_sample_every_n_epochs(tmp_path):
    """sd-scripts 48d368f library/train_util.py:6381-6384 (and flux_train_utils.py:52-55, sd3_train_utils.py
    :391-394): with sample_every_n_epochs set, sample_every_n_steps is not looked at (a render only at epochs)."""
    from sdcore.train.config import load_options
    from sdcore.train.options import TrainOptions

    prompts = _prompts(tmp_path)
    kohya = tmp_path / "kohya.toml"
    kohya.write_text(f'sample_prompts = "{prompts}"\nsample_every_n_steps = 10\nsample_every_n_epochs = 2\n')
    notes: list[str] = []
    o = load_options(TrainOptions, kohya, notes=notes)
    assert (o.sample_every, o.sample_every_epochs) == (None, 2)
    assert any("sample_every_n_steps is ignored" in n for n in notes)
    kohya.write_text(f'sample_prompts = "{prompts}"\nsample_every_n_steps = 10\n')
    assert load_options(TrainOptions, kohya, notes=[]).sample_every == 10  # alone it counts
    own = tmp_path / "own.toml"  # sdcore's own names render at both
    own.write_text(f'sample_prompts = "{prompts}"\nsample_every = 10\nsample_every_epochs = 2\n')
    o = load_options(TrainOptions, own, notes=[])
    assert (o.sample_every, o.sample_every_epochs) == (10, 2)


# a sample line's steps when it gives none, per kohya script: train_util.py:6506 sample_image_inference (SD 1.x/2.x,
# SDXL through sdxl_train_util.sample_images), sd3_train_utils.py:487 (SD3), flux_train_utils.py:155 (FLUX.1 and
# Chroma, flux_train_network.py); sd-scripts 48d368f
KOHYA_SAMPLE_STEPS = {None: 30, "sd1": 30, "sd2": 30, "sdxl": 30, "sd3": 30, "flux": 20, "chroma": 20}


@pytest.mark.parametrize("family", list(KOHYA_SAMPLE_STEPS))
def test_kohya_sample_steps_per_family(family):
    from sdcore.train.kohya import kohya_defaults
    from sdcore.train.options import TrainOptions

    fields = [f.name for f in dataclasses.fields(TrainOptions)]
    values, _ = kohya_defaults(fields, {"sample_prompts"}, {"sample_prompts": "p.txt"}, family=family)
    assert values["sample_steps"] == KOHYA_SAMPLE_STEPS[family]
    values, _ = kohya_defaults(fields, set(), {}, family=family)
    assert "sample_steps" not in values  # no samples: nothing to say


# the sampler a kohya line renders with where it gives no --ss: --sample_sampler, default "ddim" (sd-scripts 48d368f
# library/train_util.py:4197-4199, read at :6513) on SD 1.x/2.x/SDXL; SD3 and FLUX.1/Chroma sample with their own
# Euler whatever is set (sd3_train_utils.py:495 and flux_train_utils.py:163 leave sample_sampler commented out)
KOHYA_SAMPLER = {"sd1": "ddim", "sd2": "ddim", "sdxl": "ddim", "sd3": None, "flux": None, "chroma": None, None: None}


@pytest.mark.parametrize("family", list(KOHYA_SAMPLER))
def test_kohya_sample_sampler_per_family(family):
    from sdcore.train.kohya import kohya_defaults
    from sdcore.train.options import TrainOptions

    fields = [f.name for f in dataclasses.fields(TrainOptions)]
    values, _ = kohya_defaults(fields, {"sample_prompts"}, {"sample_prompts": "p.txt"}, family=family)
    assert values.get("sample_sampler") == KOHYA_SAMPLER[family]
    values, _ = kohya_defaults(fields, {"sample_prompts", "sample_sampler"}, {"sample_prompts": "p.txt"}, family=family)
    assert "sample_sampler" not in values  # a given one stays
    assert "sample_sampler" not in kohya_defaults(fields, set(), {}, family=family)[0]


# -- a sample line's size and CFG when it gives none, per source tool --------------------------------------------

# kohya sd-scripts 48d368f, each script's sample_image_inference: train_util.py:6507-6509 (SD 1.x/2.x/SDXL: width and
# height 512, scale 7.5), sd3_train_utils.py:489-491 (SD3: the same), flux_train_utils.py:156-159 (FLUX.1 and Chroma,
# flux_train_network.py: 512x512, guidance_scale 3.5 embedded, scale 1.0 true CFG): (side, CFG) with the CFG as
# sdcore's --sample-cfg means it (FLUX.1: the embedded guidance, None = sdcore's own 3.5, equal to kohya's; Chroma:
# its real CFG, kohya's scale)
KOHYA_SIZE_CFG = {None: (512, 7.5), "sd1": (512, 7.5), "sd2": (512, 7.5), "sdxl": (512, 7.5), "sd3": (512, 7.5),
                  "flux": (512, None), "chroma": (512, 1.0)}  # fmt: skip


@pytest.mark.parametrize("family", list(KOHYA_SIZE_CFG))
def test_kohya_sample_size_and_cfg_per_family(family):
    from sdcore.train.kohya import kohya_defaults
    from sdcore.train.options import TrainOptions

    fields = [f.name for f in dataclasses.fields(TrainOptions)]
    values, _ = kohya_defaults(fields, {"sample_prompts"}, {"sample_prompts": "p.txt"}, family=family)
    assert (values["sample_resolution"], values.get("sample_cfg")) == KOHYA_SIZE_CFG[family]
    given = {"sample_prompts", "sample_resolution", "sample_cfg"}
    values, _ = kohya_defaults(fields, given, {"sample_prompts": "p.txt"}, family=family)
    assert "sample_resolution" not in values and "sample_cfg" not in values  # given ones stay
    values, _ = kohya_defaults(fields, set(), {}, family=family)
    assert "sample_resolution" not in values and "sample_cfg" not in values  # no samples: nothing to say


def _render_once(tmp_path, options, model):
    import torch
    from sdcore.models.load import load_model

    class Plain:
        def sampling(self, bundle):
            import contextlib

            return contextlib.nullcontext({})

    path = sampling.render_samples(load_model(model), Plain(), options, device=torch.device("cpu"),
                                   folder=tmp_path / "grids", tag="t", step=1, say=lambda _: None)  # fmt: skip
    return [parse_parameters(text) for text in json.loads(Image.open(path).info[ALL_PARAMETERS_KEY])]


# what a kohya run's line without --w/--h/--l renders at (the table above), and an sdcore run's (--resolution and the
# family's CFG, as sdcore generate's: 7 by default, FLUX.1's guidance 3.5 with true CFG 1, Chroma's real CFG 5):
# (size, "CFG scale", "Distilled CFG Scale")
KOHYA_RENDER = {"tiny:sd1": (512, 7.5, None), "tiny:flux": (512, 1.0, 3.5), "tiny:chroma": (512, 1.0, None)}
SDCORE_RENDER = {"tiny:sd1": (64, 7.0, None), "tiny:flux": (64, 1.0, 3.5), "tiny:chroma": (64, 5.0, None)}


@pytest.mark.parametrize("model", list(KOHYA_RENDER))
def test_a_kohya_runs_sample_without_size_or_cfg_renders_at_kohyas_read_back_from_the_infotext(tmp_path, model):
    """The same prompt file through a kohya config (kohya's names) and through sdcore's own: the first line (no
    --w/--h/--l) takes each tool's defaults, the second keeps its own --w/--h/--l (a true CFG on FLUX.1)."""
    from sdcore.train.config import load_options
    from sdcore.train.options import TrainOptions

    prompts = _prompts(tmp_path, "a red thing --s 1\na blue thing --s 1 --w 96 --h 80 --l 3\n")
    kohya = tmp_path / "kohya.toml"
    kohya.write_text(f'pretrained_model_name_or_path = "{model}"\nsample_prompts = "{prompts}"\n'
                     'sample_every_n_steps = 1\nresolution = "64"\n')  # fmt: skip
    notes: list[str] = []
    o = load_options(TrainOptions, kohya, notes=notes)
    assert any("sample images are 512x512 where a prompt gives no --w/--h" in n for n in notes)
    own = load_options(TrainOptions, overrides={"model": model, "sample_prompts": prompts, "resolution": 64})
    for options, (side, cfg, guidance) in ((o, KOHYA_RENDER[model]), (own, SDCORE_RENDER[model])):
        first, second = _render_once(tmp_path, options, model)
        assert (first.size, first.cfg) == ((side, side), cfg)  # the image's own size
        assert first.extra.get("Distilled CFG Scale") == (None if guidance is None else str(guidance))
        assert (second.size, second.cfg) == ((96, 80), 3.0)


def test_onetrainer_and_aitoolkit_samples_keep_their_own_size_and_cfg_in_a_kohya_sized_run(tmp_path):
    """Their readers give every prompt its tool's defaults: OneTrainer 23df383 modules/util/config/SampleConfig.py
    :33-39 (SD 2.x: 768x768, cfg_scale 7.5), ai-toolkit 27a03a9 toolkit/config_modules.py:84-89 (512x512,
    guidance_scale 7; a sample's own over them, :51-56); a run's --sample-resolution/--sample-cfg (a kohya run's
    512 and 7.5, here other numbers to tell them apart) do not reach them."""
    from sdcore.train.sample_prompts import generation_arguments, read_sample_prompts

    defaults = {"steps": 2, "width": 320, "height": 320, "sampler": "euler", "cfg": 2.5}
    samples = tmp_path / "samples.json"
    # random_seed: a OneTrainer field (a list of bare {"prompt": ...} is kohya's JSON prompt file)
    samples.write_text(json.dumps([{"prompt": "a", "random_seed": False}]), encoding="utf-8")
    (onetrainer,) = read_sample_prompts(str(samples), "sd2")
    job = tmp_path / "job.yaml"
    job.write_text("job: extension\nconfig:\n  name: k\n  process:\n    - type: sd_trainer\n"
                   "      model: {name_or_path: x}\n      sample:\n        prompts: [a]\n", encoding="utf-8")  # fmt: skip
    (aitoolkit,) = read_sample_prompts(str(job))
    for prompt, want in ((onetrainer, (768, 768, 7.5)), (aitoolkit, (512, 512, 7.0))):
        arguments = generation_arguments([prompt], defaults, {})
        assert (arguments["width"], arguments["height"], arguments["cfg"]) == want


def test_sample_resolution_and_cfg_are_checked_before_the_run(tmp_path):
    """A side below 1 and a CFG of 0 or less are pre-flight lines; the size check takes --sample-resolution where a
    line gives no size (SD3 renders multiples of 16; kohya's rule floors 1000 to 1000, a multiple of 8 only)."""
    from sdcore.train.preflight import option_problems

    prompts = _prompts(tmp_path, "a red thing\n")
    bad = contract_options(ConvOutMethod, tmp_path, {"sample_prompts": prompts, "sample_resolution": 0,
                                                     "sample_cfg": 0.0})  # fmt: skip
    problems = option_problems(bad)
    assert "--sample-resolution must be at least 1 when given, got 0" in problems
    assert "--sample-cfg must be positive when given, got 0.0" in problems
    odd = contract_options(ConvOutMethod, tmp_path, {"sample_prompts": prompts, "sample_resolution": 1000,
                                                     "model": "tiny:sd3", "resolution": 64})  # fmt: skip
    assert any("sample 1 ('a red thing') is 1000x1000" in p for p in option_problems(odd))
    fine = dataclasses.replace(odd, sample_resolution=992)
    assert not any("sample 1" in p for p in option_problems(fine))
