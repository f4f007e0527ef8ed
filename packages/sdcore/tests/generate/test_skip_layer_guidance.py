"""Skip Layer Guidance on SD3/SD3.5 (sdcore.generate.skip_layer_guidance): txt2img against diffusers'
``StableDiffusion3Pipeline(skip_guidance_layers=...)``, the rule and formula on every other pass (img2img,
inpainting, the hires pass) checked by hand on recorded steps, the refusals, the infotext and its recall."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from PIL import Image
from sdcore.errors import ConfigError
from sdcore.generate.pipeline import generate_images
from sdcore.generate.skip_layer_guidance import SkipLayerGuidance

SETTINGS = {"negative_prompt": "blurry", "cfg": 3.0, "seed": 5, "sampler": "euler"}


@pytest.fixture(scope="module")
def sd3(loaded_tiny):
    return loaded_tiny("sd3")


def _first_call_embeds(bundle, run):
    """``run()``'s result and the ``[uncond, cond]`` embeddings and pooled vectors of its first transformer call
    (what sdcore encoded, handed to diffusers as they are)."""
    seen = {}

    def grab(module, args, kwargs):
        seen.setdefault("call", {k: v.clone() for k, v in kwargs.items() if torch.is_tensor(v)})

    handle = bundle.transformer.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        result = run()
    finally:
        handle.remove()
    call = seen["call"]
    return result, call["encoder_hidden_states"].chunk(2), call["pooled_projections"].chunk(2)


def test_txt2img_is_diffusers_pipeline_latent_for_latent(sd3):
    """6 steps, window (0.01, 0.5): steps 1 and 2 get SLG on block 1; sdcore's latents are diffusers' bit for bit,
    its image pixel for pixel, and SLG changed them (the test is not of a no-op)."""
    from sdcore.models.sd3.generate import build_sd3_pipeline, generate_sd3

    slg = SkipLayerGuidance((1,), scale=2.8, start=0.01, end=0.5)

    def ours(guidance, output_type):
        with torch.no_grad():
            return generate_sd3(sd3, ["a red cat"], ["blurry"], seeds=[5], steps=6, cfg=3.0, width=64, height=64,
                                output_type=output_type, skip_layer_guidance=guidance)  # fmt: skip

    latents, (uncond, cond), (uncond_pooled, cond_pooled) = _first_call_embeds(sd3, lambda: ours(slg, "latent"))
    pipe = build_sd3_pipeline(sd3)
    pipe.set_progress_bar_config(disable=True)

    def theirs(output_type):
        with torch.no_grad():
            return pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, pooled_prompt_embeds=cond_pooled,
                        negative_pooled_prompt_embeds=uncond_pooled, num_inference_steps=6, guidance_scale=3.0,
                        height=64, width=64, generator=[torch.Generator().manual_seed(5)], output_type=output_type,
                        skip_guidance_layers=[1], skip_layer_guidance_scale=2.8, skip_layer_guidance_start=0.01,
                        skip_layer_guidance_stop=0.5).images  # fmt: skip

    assert torch.equal(latents, theirs("latent"))
    assert not torch.allclose(latents, ours(None, "latent"), atol=1e-3)
    image = generate_images(sd3, ["a red cat"], steps=6, skip_layer_guidance=slg, **SETTINGS)[0]
    assert np.array_equal(np.asarray(image), np.asarray(theirs("pil")[0]))


def test_a_window_no_step_falls_in_is_plain_cfg(sd3):
    """diffusers' defaults on 4 steps: 4 * 0.01 < i < 4 * 0.2 holds for no i, so the image is CFG's alone."""
    slg = SkipLayerGuidance((0, 1))
    plain = generate_images(sd3, ["a red cat"], steps=4, **SETTINGS)[0]
    guided = generate_images(sd3, ["a red cat"], steps=4, skip_layer_guidance=slg, **SETTINGS)[0]
    assert np.array_equal(np.asarray(plain), np.asarray(guided))
    assert not slg.applies(0, 4) and not slg.applies(1, 4) and slg.applies(1, 28) and not slg.applies(6, 28)


def test_each_pipeline_call_counts_its_own_steps(sd3):
    """``euler_a`` renders each image in its own pipeline call: the second image of a batch gets SLG on its own
    steps 1 and 2 (its count starts again), so it is the image its seed makes alone."""
    slg = SkipLayerGuidance((1,), start=0.01, end=0.5)
    settings = {**SETTINGS, "sampler": "euler_a", "steps": 6, "skip_layer_guidance": slg}
    batch = generate_images(sd3, ["a red cat", "a red cat"], **settings)
    alone = generate_images(sd3, ["a red cat"], **{**settings, "seed": 6})[0]
    assert np.array_equal(np.asarray(batch[1]), np.asarray(alone))
    plain = generate_images(sd3, ["a red cat"], **{**settings, "seed": 6, "skip_layer_guidance": None})[0]
    assert not np.array_equal(np.asarray(plain), np.asarray(alone))


def _picture(size=64):
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))


def _box_mask(size=64):
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[16:40, 16:40] = 255
    return Image.fromarray(mask)


def _record(bundle, monkeypatch, inpainting):
    """Lists filled while generating: each outer transformer call's arguments and output, and each guided output
    the sampler steps with (inpainting: the one handed to the blend, which comes after guidance)."""
    import diffusers
    from sdcore.generate import flow_inpaint

    calls, stepped = [], []
    depth = [0]

    def before(module, args, kwargs):
        depth[0] += 1

    def after(module, args, kwargs, output):
        depth[0] -= 1
        if depth[0] == 0:
            calls.append(({k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items()}, output[0].clone()))

    if inpainting:
        blended = flow_inpaint.flow_blended_output

        def recording_blend(output, *args, **kwargs):
            stepped.append(output.clone())
            return blended(output, *args, **kwargs)

        monkeypatch.setattr(flow_inpaint, "flow_blended_output", recording_blend)
    else:
        step = diffusers.FlowMatchEulerDiscreteScheduler.step

        def recording_step(self, model_output, *args, **kwargs):
            stepped.append(model_output.clone())
            return step(self, model_output, *args, **kwargs)

        monkeypatch.setattr(diffusers.FlowMatchEulerDiscreteScheduler, "step", recording_step)
    handles = [bundle.transformer.register_forward_pre_hook(before, with_kwargs=True),
               bundle.transformer.register_forward_hook(after, with_kwargs=True)]  # fmt: skip
    return calls, stepped, handles


@pytest.mark.parametrize("mode", ["img2img", "inpaint", "hires"])
def test_every_pass_steps_with_the_formula_on_its_own_steps(sd3, monkeypatch, mode):
    """Each evaluation i of a pass of n (img2img: the steps its strength leaves; the hires pass: its own) is
    stepped with ``u + cfg * (c - u)``, plus ``(c - skipped) * scale`` exactly when n * start < i < n * end,
    ``skipped`` being the transformer on the prompt's rows with block 0 skipped: written out here."""
    from sdcore.generate.hires import HiresFix
    from sdcore.generate.inpaint import Inpaint

    slg = SkipLayerGuidance((0,), scale=1.5, start=0.2, end=0.7)
    extra = {
        "img2img": {"init_image": _picture(), "strength": 0.8},  # A1111: int(0.8 * 6) + 1 = 5 steps run
        "inpaint": {"init_image": _picture(), "strength": 0.8, "inpaint": Inpaint(_box_mask())},
        "hires": {"hires": HiresFix(scale=1.5, steps=4, denoising_strength=0.8, cfg=2.5)},
    }[mode]
    calls, stepped, handles = _record(sd3, monkeypatch, mode == "inpaint")
    try:
        generate_images(sd3, ["a red cat"], steps=6, skip_layer_guidance=slg, **SETTINGS, **extra)
    finally:
        for handle in handles:
            handle.remove()
    # the passes: img2img/inpaint one of 5 evaluations; hires the first pass's 6 then A1111's int(0.8 * 4) + 1 = 4
    passes = {"img2img": [(5, 3.0)], "inpaint": [(5, 3.0)], "hires": [(6, 3.0), (4, 2.5)]}[mode]
    assert len(calls) == len(stepped) == sum(n for n, _ in passes)
    index, applied = 0, []
    for n, cfg in passes:
        for i in range(n):
            kwargs, out = calls[index]
            uncond, cond = out.chunk(2)
            expected = uncond + cfg * (cond - uncond)
            if n * slg.start < i < n * slg.end:
                rows = {k: v[1:] if torch.is_tensor(v) and v.ndim and v.shape[0] == 2 else v for k, v in kwargs.items()}
                with torch.no_grad():
                    skipped = sd3.transformer.forward(**{**rows, "skip_layers": [0], "return_dict": False})[0]
                expected = expected + (cond - skipped) * slg.scale
                applied.append((n, i))
            torch.testing.assert_close(stepped[index], expected, rtol=0, atol=1e-6)
            index += 1
    assert applied == {"img2img": [(5, 2), (5, 3)], "inpaint": [(5, 2), (5, 3)],
                       "hires": [(6, 2), (6, 3), (6, 4), (4, 1), (4, 2)]}[mode]  # fmt: skip


def test_refusals_through_the_api(sd3, tiny_model):
    """Another family, CFG 1 (the first pass's or the hires pass's), blocks the model lacks (the count named),
    AND prompts: one line each, before anything renders."""
    from sdcore.generate.hires import HiresFix

    slg = SkipLayerGuidance((7, 8, 9))
    with pytest.raises(ConfigError, match=r"for SD3/SD3\.5 models; this is a Stable Diffusion 1"):
        generate_images(tiny_model("sd1"), ["a cat"], steps=1, skip_layer_guidance=slg)
    with pytest.raises(ConfigError, match=r"--slg-layers 7,8,9: this SD3 transformer has 2 blocks \(indices 0-1\)"):
        generate_images(sd3, ["a cat"], steps=1, skip_layer_guidance=slg)
    with pytest.raises(ConfigError, match=r"needs --cfg above 1 \(as diffusers'\); got 1\.0"):
        generate_images(sd3, ["a cat"], steps=1, cfg=1.0, skip_layer_guidance=SkipLayerGuidance((1,)))
    with pytest.raises(ConfigError, match=r"needs --hr-cfg above 1"):
        generate_images(sd3, ["a cat"], steps=1, hires=HiresFix(cfg=1.0), skip_layer_guidance=SkipLayerGuidance((1,)))
    with pytest.raises(ConfigError, match="does not combine with AND prompts"):
        generate_images(sd3, ["a cat AND a dog"], steps=1, skip_layer_guidance=SkipLayerGuidance((1,)))


def _cli(args):
    from click.testing import CliRunner
    from sdcore.builtin.generate_command import generate
    from sdcore.plugins import get_plugin_manager

    obj = types.SimpleNamespace(pm=get_plugin_manager(builtins=False, entrypoints=False))
    return CliRunner().invoke(generate, args, obj=obj)


def _preflight(result):
    """The one line of problems a run stopped with before the model loaded (exit status 2)."""
    assert isinstance(result.exception, ConfigError) and result.exception.exit_code == 2, result.output
    (line,) = result.exception.problems
    return line


def test_cli_problems_before_the_model_loads(tmp_path, monkeypatch):
    """Every problem of the options at once, on one line, exit status 2, and no model is loaded."""
    from sdcore.builtin import generate_command

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(generate_command, "_load_bundle", no_load)
    out = str(tmp_path / "a.png")
    line = _preflight(_cli(["-m", "tiny:sd1", "a cat", "--slg-layers", "7,x", "--cfg", "1", "-o", out]))
    assert "'x' is not a block index" in line
    assert "for SD3/SD3.5 models; this is a Stable Diffusion 1" in line
    assert "needs --cfg above 1" in line
    line = _preflight(_cli(["-m", "tiny:sd3", "a cat", "--slg-layers", "1", "--slg-start", "0.5", "--slg-end", "0.2",
                            "-o", out]))  # fmt: skip
    assert "0 <= start < end <= 1; got 0.5 and 0.2" in line
    line = _preflight(_cli(["-m", "tiny:sd3", "a cat", "--slg-scale", "3", "--slg-end", "0.3", "-o", out]))
    assert line == "--slg-scale, --slg-end set skip layer guidance: give --slg-layers (e.g. 7,8,9) or drop them"
    line = _preflight(_cli(["-m", "tiny:sd3", "a cat", "--x-type", "SLG scale", "--x-values", "1,2", "-o", out]))
    assert line == "the SLG scale axis varies skip layer guidance: add --slg-layers"


def test_cli_block_count_once_the_model_loads(tmp_path):
    result = _cli(["-m", "tiny:sd3", "a cat", "--steps", "1", "--slg-layers", "1,2,5", "-o", str(tmp_path / "a.png")])
    assert result.exit_code != 0 and not (tmp_path / "a.png").exists()
    assert "--slg-layers 2,5: this SD3 transformer has 2 blocks (indices 0-1)" in str(result.exception)


def test_infotext_and_from_png_round_trip(tmp_path):
    """The four fields are written; --from-png alone restores them (the same image); options given win."""
    from sdcore.generate.pnginfo import read_png_parameters
    from sdcore.generate.recall import recall_png

    first = tmp_path / "first.png"
    args = ["-m", "tiny:sd3", "a red cat", "--steps", "6", "--seed", "3", "--sampler", "euler", "--slg-layers", "1, 0",
            "--slg-scale", "2", "--slg-start", "0.1", "--slg-end", "0.5"]  # fmt: skip
    assert (result := _cli([*args, "-o", str(first)])).exit_code == 0, result.output
    extra = read_png_parameters(first).extra
    assert {k: extra[k] for k in ("Skip layer guidance", "SLG scale", "SLG start", "SLG end")} == {
        "Skip layer guidance": "1,0", "SLG scale": "2", "SLG start": "0.1", "SLG end": "0.5"}  # fmt: skip
    assert 'Skip layer guidance: "1,0", SLG scale: 2,' in Image.open(first).info["parameters"]  # quoted: a comma
    recalled = recall_png(first)
    assert {k: recalled.values[k] for k in ("slg_layers", "slg_scale", "slg_start", "slg_end")} == {
        "slg_layers": "1,0", "slg_scale": 2.0, "slg_start": 0.1, "slg_end": 0.5}  # fmt: skip
    assert not recalled.ignored
    again = tmp_path / "again.png"
    assert (result := _cli(["-m", "tiny:sd3", "--from-png", str(first), "-o", str(again)])).exit_code == 0
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(first)))
    assert read_png_parameters(again).extra["Skip layer guidance"] == "1,0"
    plain = tmp_path / "plain.png"
    assert (result := _cli([*args[:9], "-o", str(plain)])).exit_code == 0, result.output
    assert not np.array_equal(np.asarray(Image.open(plain)), np.asarray(Image.open(first)))
    assert "SLG" not in Image.open(plain).info["parameters"]
    other = tmp_path / "other.png"
    result = _cli(["-m", "tiny:sd3", "--from-png", str(first), "--slg-scale", "0", "-o", str(other)])
    assert result.exit_code == 0 and read_png_parameters(other).extra["SLG scale"] == "0", result.output
    assert np.array_equal(np.asarray(Image.open(other)), np.asarray(Image.open(plain)))  # scale 0: CFG alone


def test_no_slg_turns_a_recalled_slg_off(tmp_path):
    """--from-png of an SLG image with --no-slg: the image's four SLG fields are left out (as --no-hires leaves
    the hires fields), so the render is plain CFG, the same pixels as the image made without SLG, and its
    infotext has no SLG field; --no-slg with --slg-layers is a pre-flight line."""
    from sdcore.generate.pnginfo import read_png_parameters

    args = ["-m", "tiny:sd3", "a red cat", "--steps", "6", "--seed", "3", "--sampler", "euler"]
    first, plain, off = tmp_path / "first.png", tmp_path / "plain.png", tmp_path / "off.png"
    slg = ["--slg-layers", "1,0", "--slg-scale", "2", "--slg-start", "0.1", "--slg-end", "0.5"]
    assert (result := _cli([*args, *slg, "-o", str(first)])).exit_code == 0, result.output
    assert (result := _cli([*args, "-o", str(plain)])).exit_code == 0, result.output
    assert not np.array_equal(np.asarray(Image.open(plain)), np.asarray(Image.open(first)))
    result = _cli(["-m", "tiny:sd3", "--from-png", str(first), "--no-slg", "-o", str(off)])
    assert result.exit_code == 0, result.output
    assert np.array_equal(np.asarray(Image.open(off)), np.asarray(Image.open(plain)))
    recalled = read_png_parameters(off)
    assert not {"Skip layer guidance", "SLG scale", "SLG start", "SLG end"} & set(recalled.extra)
    assert (recalled.prompt, recalled.seed, recalled.steps) == ("a red cat", 3, 6)  # the rest is still recalled
    line = _preflight(_cli(["-m", "tiny:sd3", "a cat", "--no-slg", "--slg-layers", "1", "-o", str(tmp_path / "x.png")]))
    assert line == "--no-slg turns skip layer guidance off: drop it or --slg-layers"


def test_slg_scale_axis(tmp_path):
    """An X/Y/Z axis over --slg-scale: each cell's infotext says its scale, and the cells differ."""
    from sdcore.generate.pnginfo import read_png_parameters

    out = tmp_path / "grid.png"
    result = _cli(["-m", "tiny:sd3", "a red cat", "--steps", "6", "--seed", "3", "--sampler", "euler", "--slg-layers",
                   "1", "--slg-end", "0.5", "--x-type", "SLG scale", "--x-values", "0,3", "-o", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    cells = [tmp_path / f"grid-{i}.png" for i in range(2)]
    assert [read_png_parameters(cell).extra["SLG scale"] for cell in cells] == ["0", "3"]
    assert not np.array_equal(np.asarray(Image.open(cells[0])), np.asarray(Image.open(cells[1])))


def _block_rows(bundle, run):
    """``run()``'s result and, for each call of the transformer's first block, the rows it ran on (the guided
    call runs ``[uncond, cond]``, the skip pass the prompt's rows alone)."""
    rows: list[int] = []

    def count(module, args, kwargs):
        rows.append(int(kwargs.get("hidden_states", args[0] if args else None).shape[0]))

    handle = bundle.transformer.transformer_blocks[0].register_forward_pre_hook(count, with_kwargs=True)
    try:
        result = run()
    finally:
        handle.remove()
    return result, rows


@pytest.mark.parametrize(
    ("sampler", "evaluations", "skipped_at"),
    # heun: 2 * 4 - 1 = 7 evaluations, 7 * 0.01 < i < 7 * 0.5 -> 1, 2, 3; the others one a step: 4 * 0.01 < i < 2 -> 1
    [("euler", 4, [1]), ("heun", 7, [1, 2, 3]), ("dpm++2m", 4, [1]), ("euler_a", 4, [1])],
)
def test_skip_pass_per_sampler_runs_on_the_prompt_rows_only(sd3, sampler, evaluations, skipped_at):
    """The skip pass follows each guided evaluation the rule picks (counted over the evaluations a sampler makes)
    and runs on the batch's prompt rows only (2 images: 2 rows, where the guided call has 4)."""
    slg = SkipLayerGuidance((1,), start=0.01, end=0.5)
    settings = {**SETTINGS, "sampler": sampler, "steps": 4, "skip_layer_guidance": slg}
    _, rows = _block_rows(sd3, lambda: generate_images(sd3, ["a red cat", "a blue dog"], **settings))
    per_image = [rows] if sampler != "euler_a" else [rows[: len(rows) // 2], rows[len(rows) // 2 :]]
    for calls in per_image:  # euler_a renders each image in its own call (1 image: 2 rows guided, 1 skipped)
        guided = max(calls)
        assert calls.count(guided) == evaluations
        positions = [i for i, n in enumerate(calls) if n == guided]
        assert [positions.index(i - 1) for i, n in enumerate(calls) if n != guided] == skipped_at
        assert all(n == guided // 2 for n in calls if n != guided)


def test_a_batch_of_two_is_diffusers_batch(sd3):
    """Two prompts, two seeds, one euler call: diffusers' pipeline given the same batch makes the same latents."""
    from sdcore.models.sd3.generate import build_sd3_pipeline, generate_sd3

    slg = SkipLayerGuidance((0,), scale=2.0, start=0.1, end=0.6)
    with torch.no_grad():
        ours, (uncond, cond), (uncond_pooled, cond_pooled) = _first_call_embeds(
            sd3,
            lambda: generate_sd3(sd3, ["a red cat", "a blue dog"], ["blurry", "ugly"], seeds=[5, 9], steps=5,
                                 cfg=3.0, width=64, height=64, output_type="latent", skip_layer_guidance=slg),
        )  # fmt: skip
        pipe = build_sd3_pipeline(sd3)
        pipe.set_progress_bar_config(disable=True)
        theirs = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, pooled_prompt_embeds=cond_pooled,
                      negative_pooled_prompt_embeds=uncond_pooled, num_inference_steps=5, guidance_scale=3.0,
                      height=64, width=64, generator=[torch.Generator().manual_seed(s) for s in (5, 9)],
                      output_type="latent", skip_guidance_layers=[0], skip_layer_guidance_scale=2.0,
                      skip_layer_guidance_start=0.1, skip_layer_guidance_stop=0.6).images  # fmt: skip
    assert torch.equal(ours, theirs)


def _hooks(bundle):
    modules = [bundle.transformer, *bundle.transformer.transformer_blocks]
    return [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in modules]


def test_the_bundle_is_unchanged_after_a_run_a_refusal_and_an_error(sd3):
    """After a run, a refused call and a run that fails halfway, the transformer carries no hook and a plain
    generation is the one made before any of them."""
    from sdcore.generate.hires import HiresFix

    hooks = _hooks(sd3)
    plain = np.asarray(generate_images(sd3, ["a red cat"], steps=4, **SETTINGS)[0])
    slg = SkipLayerGuidance((1,), start=0.01, end=0.5)
    generate_images(sd3, ["a red cat"], steps=4, skip_layer_guidance=slg, **SETTINGS)
    assert _hooks(sd3) == hooks
    with pytest.raises(ConfigError):
        generate_images(sd3, ["a red cat"], steps=4, hires=HiresFix(cfg=1.0), skip_layer_guidance=slg, **SETTINGS)
    assert _hooks(sd3) == hooks

    class Boom(Exception):
        pass

    calls = [0]

    def boom(module, args, kwargs):  # fails inside the transformer on its third call, after a skip pass
        calls[0] += 1
        if calls[0] == 3:
            raise Boom

    handle = sd3.transformer.transformer_blocks[1].register_forward_pre_hook(boom, with_kwargs=True)
    try:
        with pytest.raises(Boom):
            generate_images(sd3, ["a red cat"], steps=4, skip_layer_guidance=slg, **SETTINGS)
    finally:
        handle.remove()
    assert _hooks(sd3) == hooks
    assert np.array_equal(np.asarray(generate_images(sd3, ["a red cat"], steps=4, **SETTINGS)[0]), plain)
