"""``sdcore generate --x-type/--x-values ...``: A1111's X/Y/Z plot (scripts/xyz_grid.py, modules/images.py).

Expected values come from A1111's documentation (the wiki's "X/Y/Z plot" range examples) and from the layout
rule of ``modules/images.py draw_grid_annotations``, rewritten here: font size ``(w + h) // 25``, line
spacing half of it, row labels ``w * 3 // 4`` wide, the column-label band the tallest label plus two spacings.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import sdcore
import torch
from click.testing import CliRunner
from lora_plugin import lora_pm
from PIL import Image, ImageDraw, ImageFont
from sdcore.builtin import generate_command
from sdcore.builtin.generate_command import generate
from sdcore.generate.pipeline import generate_images
from sdcore.generate.pnginfo import parse_parameters
from sdcore.generate.session import session_from_plugin_manager
from sdcore.generate.xyz_plot import build_plot, parse_values, split_values


def _pixels(image):
    return np.asarray(image.convert("RGB"))


def _label_height(text, font):
    box = ImageDraw.Draw(Image.new("RGB", (1, 1))).multiline_textbbox((0, 0), text, font=font)
    return box[3] - box[1]


def test_values_parse_as_a1111_documents():
    # the A1111 wiki's examples (Features, "X/Y/Z plot")
    assert parse_values(int, "1-5") == [1, 2, 3, 4, 5]
    assert parse_values(int, "1-5 (+2)") == [1, 3, 5]
    assert parse_values(int, "10-5 (-3)") == [10, 7]
    assert parse_values(float, "1-3 (+0.5)") == [1.0, 1.5, 2.0, 2.5, 3.0]
    assert parse_values(int, "1-10 [5]") == [1, 3, 5, 7, 10]  # linspace 1, 3.25, 5.5, 7.75, 10 truncated
    assert parse_values(float, "0.0-1.0 [6]") == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    # lists and ranges mix; spaces around values are dropped
    assert parse_values(int, " 7, 1-3 , -1") == [7, 1, 2, 3, -1]
    assert parse_values(float, "5, 7.5") == [5.0, 7.5]
    # one CSV line: a quoted value keeps its commas only when the quote follows the comma directly
    assert split_values('darkness,"light, green",heat') == ["darkness", "light, green", "heat"]
    assert split_values('darkness, "light, green", heat') == ["darkness", '"light', 'green"', "heat"]
    assert parse_values(str, "<lora:a-000004:1>,<lora:a-000008:0.5>") == ["<lora:a-000004:1>", "<lora:a-000008:0.5>"]
    with pytest.raises(ValueError, match="'1-x' is not a whole number"):
        parse_values(int, "1-x")
    with pytest.raises(ValueError, match=r"'1\.5' is not a whole number"):
        parse_values(int, "1.5")


def test_axis_problems_are_collected():
    plot, problems = build_plot([("X", "Seeds", "1"), ("Y", "Steps", "0-2"), ("Z", None, "1,2")])
    assert plot is None and len(problems) == 3
    assert problems[0].startswith("--x-type 'Seeds' is not an axis type") and "'Prompt S/R'" in problems[0]
    assert problems[1] == "--y-values: Steps must be 1..1000, not 0"
    assert problems[2] == "--z-values needs --z-type"
    plot, problems = build_plot([("X", "cfg scale", "5-9 (+2)"), ("Y", "Nothing", ""), ("Z", None, None)])
    assert problems == [] and plot is not None and plot.x.values == [5.0, 7.0, 9.0]
    assert plot.x.labels == ["CFG Scale: 5.0", "CFG Scale: 7.0", "CFG Scale: 9.0"] and plot.y.labels == [""]


def test_cells_equal_single_runs_and_the_grid_follows_a1111s_layout(lora_cli, sd1, tmp_path):
    out = tmp_path / "grid.png"
    args = ["a cat", "-n", "ugly", "--size", "64x64", "--sampler", "euler", "--seed", "5", "-o", str(out)]
    result = lora_cli(*args, "--x-type", "Seed", "--x-values", "3,-1", "--y-type", "Steps", "--y-values", "1-2")
    assert result.exit_code == 0, result.output
    cells = [tmp_path / f"grid-{i}.png" for i in range(4)]
    assert result.stdout.split() == [*map(str, cells), str(out)]
    infos = []
    for path in cells:
        with Image.open(path) as image:
            infos.append((parse_parameters(image.info["parameters"]), _pixels(image)))
    # X varies fastest; -1 on the Seed axis became one fixed seed, the same in both rows
    seeds = [info.seed for info, _ in infos]
    assert seeds[0] == seeds[2] == 3 and seeds[1] == seeds[3] != -1
    assert [info.steps for info, _ in infos] == [1, 1, 2, 2]
    for info, pixels in infos:  # each cell is the plain generation of its settings, bit for bit
        single = generate_images(
            sd1,
            ["a cat"],
            negative_prompt="ugly",
            steps=info.steps,
            seed=info.seed,
            width=64,
            height=64,
            sampler="euler",
        )[0]
        assert np.array_equal(pixels, _pixels(single))
    with Image.open(out) as grid:
        grid_info = parse_parameters(grid.info["parameters"])
        grid_pixels = _pixels(grid)
    # the grid: the first cell's infotext and the script's fields, before Version (A1111 create_infotext)
    first = infos[0][0]
    assert (grid_info.seed, grid_info.steps, grid_info.prompt) == (first.seed, first.steps, first.prompt)
    extra = grid_info.extra
    assert extra["Script"] == "X/Y/Z plot" and (extra["X Type"], extra["X Values"]) == ("Seed", "3,-1")
    assert extra["Fixed X Values"] == f"3, {seeds[1]}" and (extra["Y Type"], extra["Y Values"]) == ("Steps", "1-2")
    assert "Z Type" not in extra and list(extra)[-1] == "Version"
    # size: 2x2 cells of 64, the row labels' 64 * 3 // 4 on the left, the column labels' band on top
    font_size = (64 + 64) // 25
    font = ImageFont.load_default(font_size)
    pad_left = 64 * 3 // 4
    pad_top = max(_label_height(f"Seed: {s}", font) for s in seeds[:2]) + 2 * (font_size // 2)
    assert grid_pixels.shape[:2] == (pad_top + 2 * 64, pad_left + 2 * 64)
    for index, (_, pixels) in enumerate(infos):
        x, y = pad_left + 64 * (index % 2), pad_top + 64 * (index // 2)
        assert np.array_equal(grid_pixels[y : y + 64, x : x + 64], pixels)
    assert (grid_pixels[:pad_top, :pad_left] == 255).all()  # the corner stays blank
    assert (grid_pixels[:pad_top, pad_left:] < 128).any()  # column labels drawn
    assert (grid_pixels[pad_top:, :pad_left] < 128).any()  # row labels drawn


def test_prompt_sr_over_lora_epochs_and_z_grids_side_by_side(lora_cli, sd1, tmp_path):
    from sdplugin_lora.format import network_metadata, save_lora
    from sdplugin_lora.naming import ModuleIndex
    from sdplugin_lora.network import LoraNetwork

    lora_dir = tmp_path / "Lora"
    for epoch in (4, 8):  # what a training run leaves: name-000004, name-000008
        network = LoraNetwork.create(ModuleIndex.from_bundle(sd1).select(conv=False), rank=2, alpha=2.0)
        generator = torch.Generator().manual_seed(epoch)
        with torch.no_grad():
            for module in network:
                module.lora_down.weight.copy_(torch.randn(module.lora_down.weight.shape, generator=generator) * 0.5)
                module.lora_up.weight.copy_(torch.randn(module.lora_up.weight.shape, generator=generator) * 0.5)
        save_lora(
            lora_dir / f"ep-{epoch:06d}.safetensors",
            network.state_dict(),
            network_metadata(family="sd1", rank=2, alpha=2.0),
            dtype="fp32",
        )
    out = tmp_path / "epochs.png"
    values = "<lora:ep-000004:1>,<lora:ep-000008:1>"
    result = lora_cli(
        "castle <lora:ep-000004:1>",
        *("--steps", "1", "--size", "32x32", "--lora-dir", str(lora_dir), "-o", str(out)),
        *("--x-type", "Prompt S/R", "--x-values", values, "--z-type", "Seed", "--z-values", "1,2"),
    )
    assert result.exit_code == 0, result.output
    session = session_from_plugin_manager(lora_pm(), {"lora_dir": lora_dir})
    cells = []
    for index, (tag, seed) in enumerate([(t, s) for s in (1, 2) for t in values.split(",")]):
        with Image.open(tmp_path / f"epochs-{index}.png") as image:
            info = parse_parameters(image.info["parameters"])
            cells.append(_pixels(image))
        assert info.prompt == f"castle {tag}" and info.seed == seed and "Lora hashes" in info.extra
        single = generate_images(sd1, [f"castle {tag}"], steps=1, seed=seed, width=32, height=32, networks=session)[0]
        assert np.array_equal(cells[-1], _pixels(single))
    assert not np.array_equal(cells[0], cells[1])  # the epochs differ
    with Image.open(out) as grid:
        grid_info = parse_parameters(grid.info["parameters"])
        grid_pixels = _pixels(grid)
    assert grid_info.extra["X Values"] == values and grid_info.extra["Z Type"] == "Seed"
    # each Z grid: 2 cells across under their labels (Prompt S/R labels are the bare values), no row labels
    font = ImageFont.load_default((32 + 32) // 25)
    sub_top = max(_label_height(v, font) for v in values.split(",")) + 2 * (((32 + 32) // 25) // 2)
    sub_w, sub_h = 2 * 32, sub_top + 32
    # the Z grids side by side under the Z labels, drawn at the sub-grid's scale
    z_size = (sub_w + sub_h) // 25
    z_top = _label_height("Seed: 1", ImageFont.load_default(z_size)) + 2 * (z_size // 2)
    assert grid_pixels.shape[:2] == (z_top + sub_h, 2 * sub_w)
    for index, pixels in enumerate(cells):
        x, y = (index // 2) * sub_w + (index % 2) * 32, z_top + sub_top
        assert np.array_equal(grid_pixels[y : y + 32, x : x + 32], pixels)


def test_plot_problems_before_the_model_loads(tmp_path, monkeypatch):
    monkeypatch.setattr(generate_command, "_load_bundle", lambda *a, **k: pytest.fail("must not load"))

    def run(*args):
        return CliRunner().invoke(
            generate, ["-m", "tiny:sd1", *args, "-o", str(tmp_path / "g.png")], obj=types.SimpleNamespace(pm=lora_pm())
        )

    result = run("a cat", "--x-type", "Steps", "--x-values", "1-x", "--y-type", "Seedz", "--y-values", "1")
    assert isinstance(result.exception, sdcore.ConfigError)
    assert "--x-values: '1-x' is not a whole number" in str(result.exception)
    assert "--y-type 'Seedz' is not an axis type" in str(result.exception)
    # A1111's own message for a search string the prompts lack; a bad sampler and a hires axis without
    # --hires come in the same line
    result = run(
        "a cat",
        *("--x-type", "Prompt S/R", "--x-values", "dog,cat", "--y-type", "Sampler", "--y-values", "Euler,nope"),
        *("--z-type", "Hires steps", "--z-values", "1,2"),
    )
    message = str(result.exception)
    assert isinstance(result.exception, sdcore.ConfigError) and message.count("Prompt S/R did not find") == 1
    assert "Prompt S/R did not find dog in prompt or negative prompt." in message
    assert "unknown sampler 'nope'" in message and "add --hires" in message
    result = run("a cat", "--x-type", "Seed", "--x-values", "1,2", "--batch", "2")
    assert "drop --batch" in str(result.exception)
    assert not list(tmp_path.iterdir())


def test_plot_outputs_are_not_replaced_without_overwrite(tmp_path, monkeypatch):
    (tmp_path / "g-1.png").write_bytes(b"earlier")
    monkeypatch.setattr(generate_command, "_load_bundle", lambda *a, **k: pytest.fail("must not load"))
    result = CliRunner().invoke(
        generate,
        ["-m", "tiny:sd1", "a", "--x-type", "Seed", "--x-values", "1,2", "-o", str(tmp_path / "g.png")],
        obj=types.SimpleNamespace(pm=lora_pm()),
    )
    assert isinstance(result.exception, sdcore.ConfigError) and str(tmp_path / "g-1.png") in str(result.exception)
    assert (tmp_path / "g-1.png").read_bytes() == b"earlier"


def _refused(tmp_path, monkeypatch, *args):
    """The ConfigError of ``sdcore generate`` with ``args``, checked before any model loads."""
    monkeypatch.setattr(generate_command, "_load_bundle", lambda *a, **k: pytest.fail("must not load"))
    result = CliRunner().invoke(
        generate, ["-m", "tiny:sd1", *args, "-o", str(tmp_path / "g.png")], obj=types.SimpleNamespace(pm=lora_pm())
    )
    assert isinstance(result.exception, sdcore.ConfigError), result.output
    return str(result.exception)


def test_a_var_seed_axis_without_a_strength_is_refused(tmp_path, monkeypatch):
    # A1111 draws the variation seed's noise only with a strength above 0 (modules/rng.py ImageRNG.first:
    # ``if self.subseeds is not None and self.subseed_strength != 0``): the axis alone would make identical
    # columns, so it is refused like the Hires axes without --hires
    message = _refused(tmp_path, monkeypatch, "a cat", "--x-type", "Var. seed", "--x-values", "1,2")
    assert "the Var. seed axis varies the variation seed, which needs a strength" in message
    # with a strength or a Var. strength axis it is accepted (only the existing output stops these runs)
    (tmp_path / "g.png").write_bytes(b"")
    for extra in (["--subseed-strength", "0.5"], ["--y-type", "Var. strength", "--y-values", "0.2,0.4"]):
        message = _refused(tmp_path, monkeypatch, "a cat", "--x-type", "Var. seed", "--x-values", "1,2", *extra)
        assert "Var. seed" not in message and "already exists" in message


def test_an_empty_sampler_or_upscaler_value_is_refused():
    # A1111 refuses an empty Sampler value before the first cell (scripts/xyz_grid.py:70-73 confirm_samplers:
    # "Unknown sampler: "), and an empty Hires upscaler names no upscaler (processing.py
    # StableDiffusionProcessingTxt2Img.init: "could not find upscaler named"); neither is the default
    for axis, values in (("Sampler", "Euler,"), ("Hires upscaler", "Latent,,Lanczos"), ("Hires sampler", ",Euler")):
        plot, problems = build_plot([("X", axis, values), ("Y", None, None), ("Z", None, None)])
        assert plot is None and problems == [f"--x-values: an empty {axis} value; each value must name one"]
    # Prompt S/R may replace with nothing
    plot, problems = build_plot([("X", "Prompt S/R", "red,,blue"), ("Y", None, None), ("Z", None, None)])
    assert problems == [] and plot is not None and plot.x.values == ["red", "", "blue"]


def test_a_sampler_the_flow_family_lacks_stops_the_plot_before_its_first_cell(tmp_path):
    # FLUX.1 samples with the flow-matching samplers only (sdcore.generate.flow_samplers); A1111 confirms
    # every Sampler value before the first cell (scripts/xyz_grid.py:70-73 confirm_samplers), so a plot
    # must not write cells and then stop at the one whose sampler the family lacks
    from sdcore.plugins import get_plugin_manager

    result = CliRunner().invoke(
        generate,
        ["a cat", "-m", "tiny:flux", "--steps", "1", "--size", "32x32", "-o", str(tmp_path / "g.png"), "--hires",
         "--x-type", "Sampler", "--x-values", "euler,lms", "--y-type", "Hires sampler", "--y-values", "euler,ddim"],
        obj=types.SimpleNamespace(pm=get_plugin_manager(builtins=False, entrypoints=False)),
    )  # fmt: skip
    assert isinstance(result.exception, sdcore.ConfigError), result.output
    message = str(result.exception)
    assert "sampler 'lms' does not sample flow-matching" in message
    assert "sampler 'ddim' does not sample flow-matching" in message
    assert not list(tmp_path.iterdir())


def test_the_from_png_image_is_never_an_output(tmp_path, monkeypatch):
    # sdcore's rule for every writer (sdcore.io.output_problems): an output that is an input is refused even
    # with --overwrite; the --from-png image is an input, whether -o or a plot's cell file would replace it
    from sdcore.generate.pnginfo import save_png

    source = tmp_path / "g-1.png"
    save_png(Image.new("RGB", (64, 64)), source, "a cat\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 5, Size: 64x64")
    before = source.read_bytes()
    plot = ["--x-type", "Seed", "--x-values", "1,2"]
    for args in (["-o", str(source)], ["-o", str(tmp_path / "g.png"), *plot]):
        monkeypatch.setattr(generate_command, "_load_bundle", lambda *a, **k: pytest.fail("must not load"))
        result = CliRunner().invoke(
            generate,
            ["-m", "tiny:sd1", "--from-png", str(source), "--overwrite", *args],
            obj=types.SimpleNamespace(pm=lora_pm()),
        )
        assert isinstance(result.exception, sdcore.ConfigError), result.output
        assert f"-o {source} is the input {source}" in str(result.exception)
    assert source.read_bytes() == before


def test_prompt_sr_searches_the_prompt_before_the_styles_join_it(lora_cli, tmp_path):
    # A1111's Prompt S/R changes p.prompt before process_images (scripts/xyz_grid.py apply_prompt), which joins
    # the styles only then (modules/processing.py setup_prompts: apply_styles_to_prompt): a style's text is
    # neither searched nor replaced
    (tmp_path / "styles.csv").write_text('name,prompt,negative_prompt\nears,"{prompt}, cat ears",cat\n')
    style = ["--style", "ears", "--styles-file", str(tmp_path / "styles.csv"), "--steps", "1", "--size", "32x32"]
    out = tmp_path / "g.png"
    result = lora_cli("a cat", *style, "-o", str(out), "--x-type", "Prompt S/R", "--x-values", "cat,dog")
    assert result.exit_code == 0, result.output
    prompts = []
    for index in range(2):
        with Image.open(tmp_path / f"g-{index}.png") as image:
            info = parse_parameters(image.info["parameters"])
        prompts.append((info.prompt, info.negative_prompt))
    assert prompts == [("a cat, cat ears", "cat"), ("a dog, cat ears", "cat")]
    # a search string only the style holds is not found (A1111's message)
    result = lora_cli(
        "a cat", *style, "-o", str(tmp_path / "h.png"), "--x-type", "Prompt S/R", "--x-values", "ears,paws"
    )
    assert "Prompt S/R did not find ears in prompt or negative prompt." in str(result.exception)


def test_a_sampler_that_cannot_start_from_the_init_image_stops_the_plot_before_its_first_cell(tmp_path):
    # the same rule for img2img: the flow families' DPM++ 2M and UniPC cannot noise an init image
    # (sdcore.generate.flow_samplers FlowSampler.img2img); cell 0 (euler) was written, then cell 1 stopped the plot
    from sdcore.plugins import get_plugin_manager

    init = tmp_path / "init.png"
    Image.new("RGB", (32, 32), "red").save(init)
    result = CliRunner().invoke(
        generate,
        ["a cat", "-m", "tiny:flux", "--steps", "1", "--size", "32x32", "-o", str(tmp_path / "g.png"), "--init-image",
         str(init), "--strength", "0.5", "--x-type", "Sampler", "--x-values", "euler,unipc"],
        obj=types.SimpleNamespace(pm=get_plugin_manager(builtins=False, entrypoints=False)),
    )  # fmt: skip
    assert isinstance(result.exception, sdcore.ConfigError), result.output
    assert "sampler 'unipc' cannot start from an init image" in str(result.exception)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["init.png"]


@pytest.mark.parametrize(
    ("model", "args", "expected"),
    [
        # FluxImg2ImgPipeline/ChromaImg2ImgPipeline hand the scheduler their own sigmas: Heun cannot start there
        ("tiny:flux", ["--init-image", "INIT", "--strength", "0.5", "--x-type", "Sampler"],
         "sampler 'heun' cannot start from an init image on Flux.1 models"),
        ("tiny:chroma", ["--init-image", "INIT", "--strength", "0.5", "--x-type", "Sampler"],
         "sampler 'heun' cannot start from an init image on Chroma models"),
        # schnell's schedule has a fixed shift: DPM++ 2M in FluxPipeline would apply the resolution shift
        ("tiny:flux-schnell", ["--x-type", "Sampler"], "sampler 'dpm++2m' cannot sample this Flux.1 model"),
        ("tiny:flux-schnell", ["--hires", "--x-type", "Hires sampler"], "sampler 'dpm++2m' cannot sample this Flux.1"),
    ],
)  # fmt: skip
def test_the_family_pipelines_sampler_rules_stop_the_plot_before_its_first_cell(tmp_path, model, args, expected):
    # the rules of flow_scheduler as each family builds its scheduler (FLUX.1 and Chroma: the pipeline's sigmas);
    # before the fix cell 0 (euler) was written, then the bad cell stopped the plot with the same message
    from sdcore.plugins import get_plugin_manager

    init = tmp_path / "init.png"
    Image.new("RGB", (32, 32), "red").save(init)
    bad = "heun" if "init" in expected else "dpm++2m"
    args = [str(init) if arg == "INIT" else arg for arg in args]
    result = CliRunner().invoke(
        generate,
        ["a cat", "-m", model, "--steps", "1", "--size", "32x32", "-o", str(tmp_path / "g.png"), *args,
         "--x-values", f"euler,{bad}"],
        obj=types.SimpleNamespace(pm=get_plugin_manager(builtins=False, entrypoints=False)),
    )  # fmt: skip
    assert isinstance(result.exception, sdcore.ConfigError), result.output
    assert expected in str(result.exception)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["init.png"]


def test_axis_problems_exit_2_as_every_other_refusal_before_the_model_loads(tmp_path, monkeypatch):
    # errors.py SdcoreError.exit_code: 2 for problems found before any model loads; a cell's unknown sampler
    # (PreflightError) exited 2 while an unknown axis type, in the same documented list, exited 1
    from sdcore.cli import build_cli
    from sdcore.plugins import get_plugin_manager

    monkeypatch.setattr(generate_command, "_load_bundle", lambda *a, **k: pytest.fail("must not load"))
    out = str(tmp_path / "g.png")
    cli = build_cli(get_plugin_manager(entrypoints=False))
    for axis in (["--x-type", "Sampler", "--x-values", "euler,nope"], ["--x-type", "Nonsense", "--x-values", "1"]):
        result = CliRunner().invoke(cli, ["generate", "-m", "tiny:sd1", "a cat", "-o", out, *axis])
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code == 2, (axis, result.output)
        assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in result.output
    assert "Nonsense" in lines[0]


def test_forge_guidance_axes_on_flux_and_elsewhere(tmp_path):
    """Forge's xyz_grid: "CFG Scale" sets cfg_scale, FLUX.1's true CFG, and "Distilled CFG Scale" the embedded
    guidance (sdcore's --cfg there); each cell's infotext says the values its axes gave it. On a family with real
    CFG the Distilled axis is refused after loading, before any cell; a true CFG under 1 is refused on FLUX.1."""
    from sdcore.generate.pnginfo import read_png_parameters
    from sdcore.plugins import get_plugin_manager

    obj = types.SimpleNamespace(pm=get_plugin_manager(builtins=False, entrypoints=False))
    base = ["a cat", "--steps", "1", "--size", "32x32", "--seed", "3", "-o", str(tmp_path / "g.png")]
    axes = ["--x-type", "CFG Scale", "--x-values", "1,2", "--y-type", "Distilled CFG Scale", "--y-values", "2.5,4"]
    result = CliRunner().invoke(generate, [*base, "-m", "tiny:flux", *axes], obj=obj)
    assert result.exit_code == 0, result.output
    cells = [read_png_parameters(tmp_path / f"g-{index}.png") for index in range(4)]
    assert [(c.cfg, float(c.extra["Distilled CFG Scale"])) for c in cells if c is not None] == [
        (1.0, 2.5), (2.0, 2.5), (1.0, 4.0), (2.0, 4.0)]  # fmt: skip
    for model, args, message in (
        ("tiny:sd3", axes, "the Distilled CFG Scale axis varies FLUX.1's embedded guidance"),
        ("tiny:flux", ["--x-type", "CFG Scale", "--x-values", "0.5,2"], "the CFG Scale axis is the true CFG"),
    ):
        out = tmp_path / model.split(":")[1]
        out.mkdir()
        result = CliRunner().invoke(generate, [*base[:-1], str(out / "g.png"), "-m", model, *args], obj=obj)
        assert isinstance(result.exception, sdcore.ConfigError) and message in str(result.exception), result.output
        assert not list(out.iterdir())


def test_distilled_cfg_axis_on_schnell_is_refused(tmp_path):
    """schnell has no guidance embedding: Forge's "Distilled CFG Scale" axis would render the same image in every
    cell under different labels (backend/diffusion_engine/flux.py get_learned_conditioning: "Distilled CFG Scale
    will be ignored for Schnell"), the kind of axis sdcore refuses, as it does on families with real CFG."""
    from sdcore.plugins import get_plugin_manager

    obj = types.SimpleNamespace(pm=get_plugin_manager(builtins=False, entrypoints=False))
    args = ["a cat", "--steps", "1", "--size", "32x32", "-o", str(tmp_path / "g.png"), "-m", "tiny:flux-schnell",
            "--x-type", "Distilled CFG Scale", "--x-values", "2.5,4"]  # fmt: skip
    result = CliRunner().invoke(generate, args, obj=obj)
    assert isinstance(result.exception, sdcore.ConfigError), result.output
    assert "schnell" in str(result.exception) and "Distilled CFG Scale" in str(result.exception)
    assert not list(tmp_path.iterdir())


def test_plot_options_without_a_plot_are_refused(tmp_path, monkeypatch):
    # sweep2: --grid-cells, --keep-random-seeds, --no-grid-legend, --grid-margin without --x-type made one plain
    # image, exit 0: the options did nothing, in silence (--iterate-seed without --from-file is refused the same way)
    message = _refused(tmp_path, monkeypatch, "a cat", "--grid-cells", "--keep-random-seeds", "--no-grid-legend")
    assert message == (
        "--keep-random-seeds, --grid-legend, --grid-cells set how the X/Y/Z plot is drawn; "
        "give --x-type and --x-values or drop them"
    )
    message = _refused(tmp_path, monkeypatch, "a cat", "--grid-margin", "4")
    assert message.startswith("--grid-margin set how the X/Y/Z plot is drawn")
    (tmp_path / "g.png").write_bytes(b"")  # with a plot they are accepted (only the existing output stops it)
    message = _refused(tmp_path, monkeypatch, "a cat", "--x-type", "Seed", "--x-values", "1,2", "--grid-cells")
    assert "X/Y/Z plot is drawn" not in message and "already exists" in message
