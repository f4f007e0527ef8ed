"""``sdcore generate`` end to end on a tiny model (CliRunner, fake plugin manager)."""

from __future__ import annotations

import types
from pathlib import Path
from typing import ClassVar

import pytest
import sdcore
import torch
from click.testing import CliRunner
from PIL import Image
from sdcore.builtin import generate_command
from sdcore.builtin.generate_command import add_generate_option, generate
from sdcore.generate.networks import Activation, PromptNetworkHandler
from sdcore.generate.pnginfo import parse_parameters


class OptionEcho(PromptNetworkHandler):
    """Untagged handler that records the extra options it was given; tag 'test' shifts the UNet."""

    tag = "test"
    seen: ClassVar[list[dict]] = []

    def activate(self, bundle, refs, prompt, negative_prompt):
        OptionEcho.seen.append(dict(self.options))
        bias = bundle.unet.conv_out.bias
        saved = bias.detach().clone()
        with torch.no_grad():
            bias += sum(r.weight for r in refs)
        return Activation(prompt, negative_prompt, lambda: bias.data.copy_(saved), {"Test hashes": refs[0].name})


def _pm():
    from sdcore.plugins import get_plugin_manager

    plugin = types.SimpleNamespace(__name__="fake_cli_networks")

    @sdcore.hookimpl
    def sdcore_register_prompt_networks(register):
        register(
            sdcore.PromptNetworkSpec(
                name="echo",
                handler=f"{__name__}:OptionEcho",
                tag="test",
                directory_option="lora_dir",
                default_subdir="Lora",
            )
        )

    plugin.sdcore_register_prompt_networks = sdcore_register_prompt_networks
    return get_plugin_manager(builtins=False, entrypoints=False, extra=[plugin])


def _invoke(args):
    result = CliRunner().invoke(generate, args, obj=types.SimpleNamespace(pm=_pm()), catch_exceptions=True)
    return result


def test_generate_writes_pngs_with_parameters(tmp_path):
    out = tmp_path / "img.png"
    result = _invoke(
        [
            "-m",
            "tiny:sd1",
            "a (cat:1.2) <test:shift:0.5>",
            "-n",
            "ugly",
            "--steps",
            "2",
            "--seed",
            "7",
            "--batch",
            "2",
            "--sampler",
            "DPM++ 2M",
            "--clip-skip",
            "2",
            "--device",
            "cpu",
            "-O",
            "aesthetic=foo",
            "-o",
            str(out),
        ]
    )
    assert result.exit_code == 0, result.output
    paths = [tmp_path / "img-0.png", tmp_path / "img-1.png"]
    assert result.stdout.split() == [str(p) for p in paths]
    for index, path in enumerate(paths):
        with Image.open(path) as image:
            assert image.size == (64, 64)
            params = parse_parameters(image.info["parameters"])
        assert params.prompt == "a (cat:1.2) <test:shift:0.5>" and params.negative_prompt == "ugly"
        assert (params.steps, params.sampler, params.cfg, params.seed) == (2, "dpm++2m", 7.0, 7 + index)
        assert params.size == (64, 64) and params.model_name == "tiny:sd1"
        assert params.extra["Clip skip"] == "2" and params.extra["Test hashes"] == "shift"
        # the noise is drawn by CPU generators: A1111 (processing.py create_infotext) says "RNG: CPU"
        # for that source and leaves the field out only for its default GPU source
        assert params.extra["RNG"] == "CPU"
        assert list(params.extra).index("RNG") == list(params.extra).index("Clip skip") + 1
        assert params.extra["Version"].startswith("sdcore ")
        # plain DPM++ 2M ran on uniform sigmas: A1111 1.9+ would read a bare "DPM++ 2M" as Karras
        assert params.extra["Schedule type"] == "SGM Uniform"
    assert OptionEcho.seen[-1]["aesthetic"] == "foo"


def test_img2img_and_size(tmp_path):
    init = tmp_path / "init.png"
    Image.new("RGB", (64, 64), (90, 120, 200)).save(init)
    out = tmp_path / "x.png"
    result = _invoke(
        [
            "-m",
            "tiny:sd1",
            "cat",
            "--steps",
            "2",
            "--seed",
            "1",
            "--init-image",
            str(init),
            "--strength",
            "0.5",
            "--size",
            "64x128",
            "--device",
            "cpu",
            "-o",
            str(out),
        ]
    )
    assert result.exit_code == 0, result.output
    with Image.open(out) as image:
        assert image.size == (64, 128)
        params = parse_parameters(image.info["parameters"])
    assert params.extra["Denoising strength"] == "0.5" and params.size == (64, 128)


def test_unknown_tag_fails_before_loading(tmp_path, monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(generate_command, "_load_bundle", no_load)
    result = _invoke(["-m", "tiny:sd1", "a <lora:x:1>", "-o", str(tmp_path / "o.png")])
    assert result.exit_code != 0
    # collected with the other pre-load problems (exit status 2 under the sdcore group), today's message
    assert isinstance(result.exception, sdcore.ConfigError) and result.exception.exit_code == 2
    assert str(result.exception) == "no handler for <lora:x:1> (tag 'lora'); known tags: test"


def test_prompt_editing_renders_on_sd_and_on_flux(tmp_path):
    out = tmp_path / "o.png"
    args = ["-n", "[ugly|bad]", "--steps", "2", "--device", "cpu", "-o", str(out)]
    result = _invoke(["-m", "tiny:sd1", "a [cat:dog:0.5] <test:a:1> AND hat:0.5", *args])
    assert result.exit_code == 0, result.output
    assert out.exists()
    # the flow families render them too (no refusal after loading); the infotext keeps the prompt as written
    prompt = "a [cat:dog:0.5] AND hat:0.5"
    result = _invoke(["-m", "tiny:flux", prompt, *args, "--true-cfg-scale", "2", "--overwrite"])
    assert result.exit_code == 0, result.output
    with Image.open(out) as image:
        params = parse_parameters(image.info["parameters"])
    assert (params.prompt, params.negative_prompt) == (prompt, "[ugly|bad]")


def test_existing_outputs_are_not_replaced_without_overwrite(tmp_path, monkeypatch):
    (tmp_path / "img-1.png").write_bytes(b"earlier image")
    args = ["-m", "tiny:sd1", "cat", "--steps", "1", "--batch", "2", "--device", "cpu", "-o", str(tmp_path / "img.png")]
    real_load = generate_command._load_bundle
    monkeypatch.setattr(generate_command, "_load_bundle", lambda *a, **k: pytest.fail("must not load"))
    result = _invoke(args)
    assert isinstance(result.exception, sdcore.ConfigError) and "--overwrite" in str(result.exception)
    assert str(tmp_path / "img-1.png") in str(result.exception)
    assert (tmp_path / "img-1.png").read_bytes() == b"earlier image" and not (tmp_path / "img-0.png").exists()
    monkeypatch.setattr(generate_command, "_load_bundle", real_load)
    result = _invoke([*args, "--overwrite"])
    assert result.exit_code == 0, result.output
    with Image.open(tmp_path / "img-1.png") as image:
        assert image.size == (64, 64)


def test_bad_size_and_sampler(tmp_path):
    assert _invoke(["-m", "tiny:sd1", "a", "--size", "abc"]).exit_code == 2
    result = _invoke(["-m", "tiny:sd1", "a", "--sampler", "nope", "-o", str(tmp_path / "o.png")])
    assert isinstance(result.exception, sdcore.ConfigError)


@pytest.fixture
def plugin_option():
    before = list(generate.params)
    yield
    generate.params[:] = before


def test_plugins_can_add_options(tmp_path, plugin_option):
    option = add_generate_option("--test-strength", type=float, default=0.25, help="for tests")
    assert add_generate_option("--test-strength", type=float) is option  # idempotent
    with pytest.raises(Exception, match="belongs to sdcore"):
        add_generate_option("--steps", type=int)
    result = _invoke(
        [
            "-m",
            "tiny:sd1",
            "<test:a:0>",
            "--steps",
            "1",
            "--test-strength",
            "0.75",
            "--device",
            "cpu",
            "-o",
            str(tmp_path / "o.png"),
        ]
    )
    assert result.exit_code == 0, result.output
    assert OptionEcho.seen[-1]["test_strength"] == 0.75


def test_registered_through_the_hook():
    group = __import__("click").Group("root")
    generate_command.sdcore_register_commands(group)
    assert group.commands["generate"] is generate


def test_output_rule_is_one_for_every_command(tmp_path, monkeypatch):
    """sdcore.io.output_problems (also the LoRA tools' rule): an output that is an input is refused even with
    --overwrite, an existing output without it; generate treats --init-image as its input."""
    from sdcore.io import output_problems

    src = tmp_path / "in.png"
    src.write_bytes(b"image")
    done = tmp_path / "done.png"
    done.write_bytes(b"earlier")
    assert output_problems([tmp_path / "new.png"], inputs=[str(src)], overwrite=False) == []
    assert output_problems([done, tmp_path / "x.png"], overwrite=False) == [
        f"{done} already exists; pass --overwrite to replace it, or choose another -o"
    ]
    assert output_problems([done], overwrite=True) == []
    refused = output_problems([src], inputs=[str(tmp_path / "." / "in.png")], overwrite=True)
    assert len(refused) == 1 and refused[0].startswith(f"-o {src} is the input")
    monkeypatch.setattr(generate_command, "_load_bundle", lambda *a, **k: pytest.fail("must not load"))
    result = _invoke(["-m", "tiny:sd1", "cat", "--init-image", str(src), "-o", str(src), "--overwrite"])
    assert isinstance(result.exception, sdcore.ConfigError) and "is the input" in str(result.exception)
    assert src.read_bytes() == b"image"


def test_ctrl_c_says_what_was_written_and_exits_130(tmp_path, monkeypatch):
    """Ctrl-C printed click's bare "Aborted!" (exit 1): the interrupt is caught, the images already written are
    counted and located, the exit status is 130 (128 + SIGINT, as a shell reports it) and there is no traceback."""
    real_save, calls = Image.Image.save, []

    def save_then_interrupt(image, fp, *args, **kwargs):
        calls.append(fp)
        if len(calls) > 1:  # Ctrl-C halfway through writing the second image, after the first is on disk
            Path(fp).write_bytes(b"\x89PNG\r\n\x1a\n partial")
            raise KeyboardInterrupt
        return real_save(image, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save_then_interrupt)
    out = str(tmp_path / "img.png")
    args = ["-m", "tiny:sd1", "a cat", "--steps", "1", "--batch", "2", "--device", "cpu", "-o", out]
    result = _invoke(args)
    assert result.exit_code == 130, result.output
    assert result.stdout.split() == [str(tmp_path / "img-0.png")]
    assert result.stderr.strip() == f"Interrupted: 1 image written in {tmp_path}: img-0.png"
    assert "Aborted" not in result.output and "Traceback" not in result.output
    assert (tmp_path / "img-0.png").is_file() and not (tmp_path / "img-1.png").exists()
    # the second image's half-written temporary file is removed, not left beside the first
    assert len(calls) == 2 and Path(calls[1]).parent == tmp_path and not Path(calls[1]).exists()
    assert [p.name for p in tmp_path.iterdir()] == ["img-0.png"]

    # Ctrl-C before any image (while the model loads): said as such, same status
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(generate_command, "_load_bundle", interrupted)
    result = _invoke([*args[:-1], str(tmp_path / "other.png")])
    assert result.exit_code == 130, result.output
    assert result.stderr.strip() == "Interrupted: no image was written" and "Traceback" not in result.output

    # Ctrl-C while --from-png / the styles file is read (before the model): it printed click's "Aborted!"
    for reader in ("_recall", "_chosen_styles"):
        monkeypatch.setattr(generate_command, reader, interrupted)
        result = _invoke([*args[:-1], str(tmp_path / f"{reader}.png")])
        assert result.exit_code == 130, result.output
        assert result.stderr.strip() == "Interrupted: no image was written" and "Aborted" not in result.output


def test_jpeg_and_webp_outputs_end_to_end(tmp_path, monkeypatch):
    """``-o x.jpg``/``x.webp`` writes that format with A1111's EXIF UserComment infotext (not PNG bytes under a
    .jpg name); a lossless WebP holds the PNG's pixels; ``--from-png`` reads the JPEG back; X/Y/Z grid and cells
    follow the suffix; an unknown suffix is said before the model loads."""
    import numpy as np
    from sdcore.generate.pnginfo import read_png_parameters

    base = ["-m", "tiny:sd1", "a red cube, ünï", "-n", "blurry", "--steps", "2", "--size", "32x32", "--seed", "5",
            "--device", "cpu"]  # fmt: skip
    for name, extra in (("a.png", []), ("a.jpg", ["--jpeg-quality", "95"]), ("a.webp", ["--webp-lossless"])):
        result = _invoke([*base, *extra, "-o", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
        assert result.stdout.split() == [str(tmp_path / name)]
    formats, pixels, params = {}, {}, {}
    for name in ("a.png", "a.jpg", "a.webp"):
        with Image.open(tmp_path / name) as image:
            formats[name], pixels[name] = image.format, np.asarray(image.convert("RGB")).astype(int)
        params[name] = read_png_parameters(tmp_path / name)
    assert formats == {"a.png": "PNG", "a.jpg": "JPEG", "a.webp": "WEBP"}
    assert (tmp_path / "a.jpg").read_bytes()[:3] == b"\xff\xd8\xff"
    assert params["a.jpg"] == params["a.png"] == params["a.webp"] and params["a.jpg"].prompt == "a red cube, ünï"
    assert params["a.jpg"].negative_prompt == "blurry" and params["a.jpg"].seed == 5
    assert np.array_equal(pixels["a.webp"], pixels["a.png"])  # lossless
    # lossy, at --jpeg-quality 95: the PNG's pixels encoded by PIL at 95 decode to the same, at A1111's 80 not
    import io

    def jpeg(quality):
        buffer = io.BytesIO()
        with Image.open(tmp_path / "a.png") as image:
            image.save(buffer, format="JPEG", quality=quality)
        with Image.open(buffer) as image:
            return np.asarray(image.convert("RGB")).astype(int)

    assert np.abs(pixels["a.jpg"] - pixels["a.png"]).mean() > 0
    assert np.array_equal(pixels["a.jpg"], jpeg(95)) and not np.array_equal(pixels["a.jpg"], jpeg(80))
    result = _invoke(["-m", "tiny:sd1", "--from-png", str(tmp_path / "a.jpg"), "--device", "cpu",
                      "-o", str(tmp_path / "again.png")])  # fmt: skip
    assert result.exit_code == 0, result.output
    with Image.open(tmp_path / "again.png") as image:
        assert np.array_equal(np.asarray(image.convert("RGB")).astype(int), pixels["a.png"])
    grid = ["-m", "tiny:sd1", "a cube", "--steps", "1", "--size", "32x32", "--device", "cpu", "--x-type", "Seed",
            "--x-values", "1,2", "--grid-cells", "-o", str(tmp_path / "g.webp")]  # fmt: skip
    result = _invoke(grid)
    assert result.exit_code == 0, result.output
    for name, seed in (("g-0.webp", 1), ("g-1.webp", 2), ("g.webp", 1)):
        with Image.open(tmp_path / name) as image:
            assert image.format == "WEBP", name
        assert read_png_parameters(tmp_path / name).seed == seed, name

    def no_load(*args, **kwargs):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(generate_command, "_load_bundle", no_load)
    result = _invoke([*base, "-o", str(tmp_path / "a.gif")])
    assert result.exit_code == 2 and not (tmp_path / "a.gif").exists()
    assert "Invalid value for '-o' / '--output': a.gif: unknown image type '.gif'; use .png, .jpg/.jpeg, .webp" in (
        result.output
    )
    assert "Traceback" not in result.output
    result = _invoke([*base, "--jpeg-quality", "0", "-o", str(tmp_path / "b.jpg")])
    assert result.exit_code == 2 and "'--jpeg-quality': 0 is not in the range 1<=x<=100" in result.output


def test_a_clip_skip_deeper_than_the_text_encoder_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    """``--clip-skip`` past the text encoder's depth was found only when the loaded encoder ran: now from the
    model's configs, train's pre-flight line (SDXL takes one less than SD1),"""
    monkeypatch.setattr(generate_command, "_load_bundle", lambda *a, **k: 1 / 0)
    out = str(tmp_path / "x.png")
    result = CliRunner().invoke(generate, ["cat", "-m", "tiny:sdxl", "--clip-skip", "3", "-o", out], obj=_pm())
    assert result.exit_code != 0 and "ZeroDivision" not in repr(result.exception), result.output
    assert "--clip-skip 3 too large: the sdxl model's text encoder has only 3 layers, so --clip-skip is " \
           "at most 2" in str(result.exception)  # fmt: skip
    result = CliRunner().invoke(generate, ["cat", "-m", "tiny:sd1", "--clip-skip", "4", "-o", out], obj=_pm())
    assert "--clip-skip 4 too large: the sd1 model's text encoder has only 3 layers" in str(result.exception)
    result = CliRunner().invoke(generate, ["cat", "-m", "tiny:sd1", "--clip-skip", "3", "-o", out], obj=_pm())
    assert isinstance(result.exception, ZeroDivisionError)  # the deepest the encoder takes: on to the load
