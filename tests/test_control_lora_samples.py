"""Sample images of a FLUX.1 control-LoRA run (``sdcore train lora --control-lora``) on kohya's ``--cn`` control
images: each sample is what ``sdcore generate --control-image`` makes with the saved LoRA, and the pre-flight
refuses what such a run cannot render, all at once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

NAME = "pose-control"


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)
    yield


def _two_colours(path: Path, top, bottom, size: tuple[int, int]) -> Path:
    width, height = size
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[: height // 2], pixels[height // 2 :] = top, bottom
    Image.fromarray(pixels).save(path)
    return path


def _pairs(root: Path, n: int) -> tuple[Path, Path]:
    """``n`` training images, each beside a control image of the same name (its colours inverted, mirrored)."""
    data, controls = root / "data" / "1_pairs", root / "controls"
    data.mkdir(parents=True)
    controls.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        top, bottom = rng.integers(0, 256, (2, 3)).astype(np.uint8)
        control = _two_colours(controls / f"p{i}.png", top, bottom, (64, 64))
        Image.fromarray((255 - np.asarray(Image.open(control)))[::-1].copy()).save(data / f"p{i}.png")
        (data / f"p{i}.txt").write_text("a control pair", encoding="utf-8")
    return data.parent, controls


def _options(root: Path, data: Path, controls: Path, **extra):
    from sdcore.testing.contract import contract_options
    from sdplugin_lora.method import LoraMethod

    values = {"data": str(data), "control_dir": str(controls), "control_lora": True, "rank": 2, "alpha": 2,
              "max_steps": 2, "lr": 1e-2, "batch_size": 2, "save_state": False, "t5xxl_max_token_length": 8,
              "guidance_scale": 30.0, "output": str(root / "loras" / f"{NAME}.safetensors"), **extra}  # fmt: skip
    return contract_options(LoraMethod, root, values, family="flux")


def test_a_sample_is_sdcore_generate_with_the_saved_lora_and_its_control_image(tmp_path, sd_cli, pm, monkeypatch):
    """Two ``--cn`` lines on one seed, their control images 96x80 (stretched to the 64x64 sample with Lanczos, as
    kohya's FLUX.1 samples stretch theirs): each sample's latents equal those of ``sdcore generate --control-image``
    with the saved LoRA at the same seed, size, steps and guidance (the run's --guidance-scale 30, no --g given)
    within 1e-5, and its pixels within 1 (the run's hooked network and the saved file's fused BFL layout round
    differently); the control image stretched beforehand by kohya's formula gives the same latents; the two control
    images give two different samples; the infotext names the control image as ``sdcore generate`` does."""
    import diffusers
    from sdcore.generate.pnginfo import read_png_parameters
    from sdcore.train.loop import TrainSession
    from sdplugin_lora.method import LoraMethod

    decoded: list[torch.Tensor] = []  # the latents every render decodes (the run's samples, then each generate)
    decode = diffusers.AutoencoderKL.decode

    def recording(self, latents, *args, **kwargs):
        decoded.append(latents.detach().clone())
        return decode(self, latents, *args, **kwargs)

    monkeypatch.setattr(diffusers.AutoencoderKL, "decode", recording)
    data, controls = _pairs(tmp_path, 2)
    a = _two_colours(tmp_path / "edges-a.png", (250, 10, 10), (10, 10, 250), (96, 80))
    b = _two_colours(tmp_path / "edges-b.png", (10, 250, 10), (240, 240, 240), (96, 80))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"a control pair --w 64 --h 64 --s 2 --d 7 --cn {a}\n"
                       f"a control pair --w 64 --h 64 --s 2 --d 7 --cn {b}\n", encoding="utf-8")  # fmt: skip
    # T5 at generation's length (FLUX.1 dev's 512): the samples encode with the run's, as kohya's do
    o = _options(tmp_path, data, controls, sample_prompts=str(prompts), t5xxl_max_token_length=None)
    TrainSession(LoraMethod(o), bundle=None).run()
    assert len(decoded) == 2  # one call per control image
    saved = sorted((tmp_path / "loras" / "sample").glob("*.png"))
    assert [p.name.split("_")[2] for p in saved] == ["00", "01"]
    samples = [np.asarray(Image.open(p).convert("RGB"), dtype=np.int16) for p in saved]
    assert samples[0].shape == (64, 64, 3)
    assert float((decoded[0] - decoded[1]).abs().max()) > 1e-3  # the control image matters
    for path, control in zip(saved, (a, b), strict=True):
        params = read_png_parameters(path)
        assert params is not None and params.extra["Control image"] == control.name
        assert params.extra["Distilled CFG Scale"] == "30" and params.seed == 7 and params.steps == 2

    generated = []
    stretched = tmp_path / "stretched.png"  # kohya: Image.open(...).convert("RGB").resize((w, h), Image.LANCZOS)
    Image.open(a).convert("RGB").resize((64, 64), Image.Resampling.LANCZOS).save(stretched)
    for i, control in enumerate((a, b, stretched)):
        png = tmp_path / f"generated{i}.png"
        result = sd_cli(["generate", f"<lora:{NAME}:1> a control pair", "-m", "tiny:flux", "--steps", "2", "--seed",
                         "7", "--size", "64x64", "--cfg", "30", "--control-image", str(control), "--lora-dir",
                         str(tmp_path / "loras"), "-o", str(png)], pm=pm)  # fmt: skip
        assert result.exit_code == 0, result.output + repr(result.exception)
        generated.append(np.asarray(Image.open(png).convert("RGB"), dtype=np.int16))
    assert len(decoded) == 5
    for sample, ours, theirs, pixels in zip(samples, decoded[:2], decoded[2:4], generated, strict=False):
        assert ours.shape == theirs.shape
        assert torch.allclose(ours, theirs, atol=1e-5, rtol=0)
        assert int(np.abs(sample - pixels).max()) <= 1
    assert torch.allclose(decoded[4], decoded[2], atol=1e-6, rtol=0)  # kohya's stretch is generation's


def test_the_preflight_checks_the_control_images_of_the_samples(tmp_path, monkeypatch):
    """A control-LoRA run: a line without --cn (counted, the first named), a missing and an unreadable --cn file,
    FLUX.1 Kontext's --ci and true CFG (--l) are one line each, all at once, before any model loads; every line
    with a readable --cn is no problem. Another run with --cn: a note that it is not used, no problem."""
    import sdcore.models.load as load
    from sdcore.train.preflight import run_preflight
    from sdplugin_lora.method import LoraMethod

    def no_loading(*args, **kwargs):
        raise AssertionError("the pre-flight loaded the model")

    monkeypatch.setattr(load, "load_model", no_loading)
    data, controls = _pairs(tmp_path, 2)
    good = controls / "p0.png"
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"a cat --cn {good}\nno control here\na dog --cn {tmp_path / 'missing.png'}\n"
                       f"a bird --cn {broken}\na fish --cn {good} --ci {good}\na cow --cn {good} --l 3\n"
                       "also no control\n", encoding="utf-8")  # fmt: skip

    def sample_lines(**extra) -> tuple[list[str], list[str]]:
        o = _options(tmp_path, data, controls, sample_prompts=str(prompts), **extra)
        report = run_preflight(LoraMethod(o), o, plan=False)
        pick = [p for p in report.problems if p.startswith("--sample-prompts")]
        return pick, [n for n in report.notes if n.startswith("--sample-prompts")]

    problems, notes = sample_lines()
    assert problems == [
        "--sample-prompts: a control LoRA's sample renders on a control image, --cn IMAGE (controlnet_image in a "
        "JSON/TOML prompt file); 2 of 7 prompt(s) have none (the first: sample 2, 'no control here'): give them --cn",
        f"--sample-prompts: control image {tmp_path / 'missing.png'}: no such file",
        f"--sample-prompts: cannot read control image {broken}: " + problems[2].split(f"{broken}: ", 1)[1],
        "--sample-prompts: --ctrl_img/--ci is FLUX.1 Kontext's reference image; a control LoRA takes its control "
        "image on the channels, with --cn: drop --ci",
        "--sample-prompts: --l is true CFG, which a control LoRA's samples do not take (diffusers' "
        "FluxControlPipeline runs on the distilled guidance alone: --g); drop --l",
    ]
    assert not any("cannot give" in p for p in problems)  # the old refusal of every sample prompt is gone

    prompts.write_text(f"a cat --cn {good}\na dog --cn {good} --g 10\n", encoding="utf-8")
    assert sample_lines() == ([], [])
    problems, notes = sample_lines(control_lora=False, control_dir=None)
    assert problems == []
    assert notes == [
        "--sample-prompts: --cn (a control image) on 2 prompt(s) is not used: kohya reads it for a ControlNet's "
        "samples, and sdcore renders a control image only on a control-LoRA run (--control-lora)"
    ]


def test_guidance_is_the_lines_g_else_sample_cfg_else_the_trained_guidance(tmp_path):
    """The render's calls on a control-LoRA run's widened bundle: each line's --cn path goes to generation's control
    path, --g wins, and without it --sample-cfg, else the --guidance-scale the run trains at (as diffusers'
    train_control_lora_flux.py validates at its --guidance_scale); lines with different control images render in
    separate calls."""
    from sdcore.models.flux.control import TRAINING_WIDENER, widen_img_in
    from sdcore.models.load import load_model
    from sdcore.train.sampling import _generations

    data, controls = _pairs(tmp_path, 1)
    a, b = controls / "p0.png", tmp_path / "b.png"
    b.write_bytes(a.read_bytes())
    bundle = load_model("tiny:flux")
    widen_img_in(bundle, 128, TRAINING_WIDENER)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"one --cn {a}\ntwo --cn {a}\nthree --cn {b} --g 12\n", encoding="utf-8")
    for sample_cfg, default in ((None, 4.5), (6.0, 6.0)):
        o = _options(tmp_path, data, controls, sample_prompts=str(prompts), guidance_scale=4.5, sample_cfg=sample_cfg)
        from sdcore.train.sample_prompts import read_sample_prompts

        calls = _generations(bundle, o, read_sample_prompts(str(prompts), "flux"), {})[2]
        assert [(texts, args["control_image"], args["cfg"]) for texts, args in calls] == [
            (["one", "two"], str(a), default),
            (["three"], str(b), 12.0),
        ]
    plain = load_model("tiny:flux")  # not widened: no control image goes to generation
    calls = _generations(plain, o, read_sample_prompts(str(prompts), "flux"), {})[2]
    assert all("control_image" not in args for _, args in calls)
