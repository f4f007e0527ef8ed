"""``sdcore generate --from-png`` on ComfyUI PNGs: the ``prompt`` graph (API format) read back as options."""

from __future__ import annotations

import json

import numpy as np
import pytest
from cli_errors import one_error_line
from click.testing import CliRunner
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from sdcore.builtin import generate_command
from sdcore.errors import ConfigError
from sdcore.generate.comfy_recall import recall_comfy
from sdcore.generate.hires import HiresFix, img2img_steps
from sdcore.generate.pipeline import SAMPLERS
from sdcore.generate.pnginfo import parse_parameters, save_png
from sdcore.generate.recall import recall_png


def default_graph(**ksampler):
    """ComfyUI's default txt2img workflow as its "Save (API)" and SaveImage's ``prompt`` text hold it (node
    ids and inputs of the default graph: 4 checkpoint, 6/7 prompts, 5 latent, 3 KSampler, 8 VAEDecode, 9 save)."""
    return {
        "3": {
            "class_type": "KSampler",
            "inputs": {
                "seed": 156680208700286,
                "steps": 20,
                "cfg": 8.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "denoise": 1.0,
                "model": ["4", 0],
                "positive": ["6", 0],
                "negative": ["7", 0],
                "latent_image": ["5", 0],
                **ksampler,
            },
        },
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
        "6": {
            "class_type": "CLIPTextEncode",
            "inputs": {
                "text": "beautiful scenery nature glass bottle landscape, , purple galaxy bottle,",
                "clip": ["4", 1],
            },
        },
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "text, watermark", "clip": ["4", 1]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}},
    }


def comfy_png(path, graph, *, parameters=None, size=(8, 8)):
    """A PNG as ComfyUI's SaveImage writes it: tEXt ``prompt`` = json.dumps(graph) (and ``workflow``)."""
    info = PngInfo()
    info.add_text("prompt", graph if isinstance(graph, str) else json.dumps(graph))
    info.add_text("workflow", json.dumps({"nodes": [], "links": []}))
    if parameters is not None:
        info.add_text("parameters", parameters)
    Image.new("RGB", size).save(path, pnginfo=info)
    return path


def _invoke(args):
    from sdcore.cli import build_cli
    from sdcore.plugins import get_plugin_manager

    return CliRunner().invoke(build_cli(get_plugin_manager(entrypoints=False)), ["generate", *args])


def test_default_workflow_maps_every_value(tmp_path):
    recalled = recall_png(comfy_png(tmp_path / "comfy.png", default_graph()))
    assert recalled.values == {
        "prompt": "beautiful scenery nature glass bottle landscape, , purple galaxy bottle,",
        "negative": "text, watermark",
        "steps": 20,
        "sampler": "euler",
        "seed": 156680208700286,
        "size": (512, 512),
        "clip_skip": 1,
        "model": "v1-5-pruned-emaonly.safetensors",
        "batch": 1,
    }
    assert recalled.cfg_values(distilled=False) == {"cfg": 8.0}
    assert recalled.ignored == [] and recalled.strength is None
    # "normal" is A1111's "Uniform" (linspace timesteps), which sdcore's Euler runs; ComfyUI's noise is CPU noise
    assert recalled.parameters.extra == {"RNG": "CPU", "Schedule type": "Uniform"}


def test_sampler_and_scheduler_names_map_to_sdcores():
    def recalled(sampler, scheduler):
        return recall_comfy(json.dumps(default_graph(sampler_name=sampler, scheduler=scheduler)))

    expected = {"euler": "euler", "euler_ancestral": "euler_a", "heun": "heun", "lms": "lms", "dpmpp_2m": "dpm++2m"}
    for name, sid in expected.items():
        assert recalled(name, "normal").values["sampler"] == sid and sid in SAMPLERS
    karras = recalled("dpmpp_2m", "karras")  # A1111's "DPM++ 2M" + "Schedule type: Karras"
    assert karras.values["sampler"] == "dpm++2m_karras" and "Schedule type" not in karras.parameters.extra
    assert recalled("euler", "karras").parameters.extra["Schedule type"] == "Karras"
    assert recalled("euler", "sgm_uniform").parameters.extra["Schedule type"] == "SGM Uniform"
    assert recalled("euler", "simple").parameters.extra["Schedule type"] == "Simple"
    # ComfyUI's ddim is its euler sampler: on ddim_uniform's timesteps (1, 1 + 1000 // n, ...) sdcore's DDIM,
    # elsewhere sdcore's Euler with the schedule checked as any other
    assert recalled("ddim", "ddim_uniform").values["sampler"] == "ddim"
    assert "Schedule type" not in recalled("ddim", "ddim_uniform").parameters.extra
    ddim_normal = recalled("ddim", "normal")
    assert ddim_normal.values["sampler"] == "euler" and ddim_normal.parameters.extra["Schedule type"] == "Uniform"
    assert recalled("ddim", "karras").parameters.extra["Schedule type"] == "Karras"
    # ComfyUI's uni_pc runs steps + 1 sigmas less the penultimate, to sigma 0.001: never sdcore's, whichever
    for scheduler in ("karras", "normal", "simple"):
        unipc = recalled("uni_pc", scheduler)
        assert unipc.values["sampler"] == "unipc"
        assert unipc.ignored == [f"scheduler {scheduler} (sdcore's unipc runs its own)"]
    for unknown in ("dpmpp_2m_sde", "dpm_2_ancestral", "lcm", "uni_pc_bh2"):
        with pytest.raises(ConfigError) as error:
            recalled(unknown, "karras")
        # the unknown-A1111-sampler error, word for word
        assert str(error.value) == (
            f"the PNG's sampler {unknown!r} is not one sdcore has; pass --sampler with one of: " + ", ".join(SAMPLERS)
        )
    assert "sampler" not in recall_comfy(json.dumps(default_graph(sampler_name="lcm")), sampler_given=True).values


def test_sdcore_schedule_notes_apply(sd1):
    notes = recall_comfy(json.dumps(default_graph(scheduler="exponential"))).notes(
        sd1, sampler="euler", hires_sampler=None, distilled=False, model_hash=None
    )
    assert notes == [
        "ignored from the PNG (sdcore has no option for them): Schedule type: Exponential (sdcore's euler runs its own)"
    ]
    assert (
        recall_comfy(json.dumps(default_graph())).notes(
            sd1, sampler="euler", hires_sampler=None, distilled=False, model_hash=None
        )
        == []
    )


def test_lora_chain_clip_skip_primitive_text_and_vae():
    graph = default_graph()
    graph["10"] = {
        "class_type": "LoraLoader",
        "inputs": {"lora_name": "styles\\ink.safetensors", "strength_model": 0.8, "strength_clip": 0.8,
                   "model": ["4", 0], "clip": ["4", 1]},
    }  # fmt: skip
    graph["11"] = {
        "class_type": "LoraLoader",
        "inputs": {"lora_name": "chars/anna.safetensors", "strength_model": 1.0, "strength_clip": 0.5,
                   "model": ["10", 0], "clip": ["10", 1]},
    }  # fmt: skip
    graph["12"] = {
        "class_type": "LoraLoaderModelOnly",
        "inputs": {"lora_name": "detail.pt", "strength_model": 0.3, "model": ["11", 0]},
    }
    graph["13"] = {"class_type": "CLIPSetLastLayer", "inputs": {"stop_at_clip_layer": -2, "clip": ["11", 1]}}
    graph["14"] = {"class_type": "PrimitiveString", "inputs": {"value": "a red fox"}}
    graph["15"] = {"class_type": "VAELoader", "inputs": {"vae_name": "vae-ft-mse-840000.safetensors"}}
    graph["3"]["inputs"]["model"] = ["12", 0]
    graph["6"]["inputs"].update(text=["14", 0], clip=["13", 0])
    graph["7"]["inputs"]["clip"] = ["13", 0]
    graph["8"]["inputs"]["vae"] = ["15", 0]
    recalled = recall_comfy(json.dumps(graph))
    # tags in the order the loaders apply (next to the checkpoint first); te weight first when they differ;
    # the file's stem, as sdcore's LoRA lookup finds it under any subfolder
    assert recalled.values["prompt"] == "a red fox <lora:ink:0.8> <lora:anna:0.5:1> <lora:detail:0:0.3>"
    assert recalled.values["clip_skip"] == 2
    # the VAELoader's file is --vae's (a given --model drops it and says the loader: model_parts)
    assert recalled.ignored == [] and recalled.values["vae"] == "vae-ft-mse-840000.safetensors"
    assert recalled.model_parts == {"VAELoader (vae-ft-mse-840000.safetensors: --vae)": ("vae",)}


def test_sdxl_and_combine_nodes_are_read_or_said():
    graph = default_graph(sampler_name="euler_ancestral")
    graph["6"] = {
        "class_type": "CLIPTextEncodeSDXL",
        "inputs": {"width": 4096, "height": 4096, "crop_w": 0, "crop_h": 0, "target_width": 4096,
                   "target_height": 4096, "text_g": "a lighthouse", "text_l": "oil painting", "clip": ["4", 1]},
    }  # fmt: skip
    graph["16"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "storm", "clip": ["4", 1]}}
    graph["17"] = {
        "class_type": "ConditioningCombine",
        "inputs": {"conditioning_1": ["6", 0], "conditioning_2": ["16", 0]},
    }
    graph["5"]["inputs"].update(width=1024, height=768, batch_size=2)
    graph["3"]["inputs"]["positive"] = ["17", 0]
    recalled = recall_comfy(json.dumps(graph))
    assert recalled.values["prompt"] == "a lighthouse" and recalled.values["sampler"] == "euler_a"
    graph["6"]["inputs"].update(width=1024, height=768, target_width=1024, target_height=768, text_l="a lighthouse")
    assert recall_comfy(json.dumps(graph)).ignored[1:] == ['CLIPTextEncode "storm"', recalled.ignored[-1]]
    graph["6"]["inputs"]["crop_w"] = 64
    assert recall_comfy(json.dumps(graph)).ignored[1] == (
        "CLIPTextEncodeSDXL, size conditioning 1024x768, crop 64,0, target 1024x768"
    )
    assert recalled.values["size"] == (1024, 768) and recalled.values["batch"] == 2
    assert recalled.ignored == [
        "ConditioningCombine",
        # sdcore conditions SDXL on the image's size (1024x768), not the node's
        'CLIPTextEncodeSDXL text_l "oil painting", size conditioning 4096x4096, crop 0,0, target 4096x4096',
        'CLIPTextEncode "storm"',
        "batch_size 2 noise (ComfyUI draws the batch from one seed, sdcore image i from seed+i: the first image matches)",
    ]


def test_flux_custom_sampler_graph():
    # ComfyUI's FLUX.1 dev example: UNETLoader + DualCLIPLoader + VAELoader, FluxGuidance, SamplerCustomAdvanced
    graph = {
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a neon sign", "clip": ["11", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["13", 0], "vae": ["10", 0]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}},
        "10": {"class_type": "VAELoader", "inputs": {"vae_name": "ae.safetensors"}},
        "11": {
            "class_type": "DualCLIPLoader",
            "inputs": {"clip_name1": "t5xxl_fp16.safetensors", "clip_name2": "clip_l.safetensors", "type": "flux"},
        },
        "12": {"class_type": "UNETLoader", "inputs": {"unet_name": "flux1-dev.safetensors", "weight_dtype": "default"}},
        "13": {
            "class_type": "SamplerCustomAdvanced",
            "inputs": {
                "noise": ["25", 0],
                "guider": ["22", 0],
                "sampler": ["16", 0],
                "sigmas": ["17", 0],
                "latent_image": ["27", 0],
            },
        },
        "16": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "17": {
            "class_type": "BasicScheduler",
            "inputs": {"scheduler": "simple", "steps": 20, "denoise": 1.0, "model": ["30", 0]},
        },
        "22": {"class_type": "BasicGuider", "inputs": {"model": ["30", 0], "conditioning": ["26", 0]}},
        "25": {"class_type": "RandomNoise", "inputs": {"noise_seed": 219670278747233}},
        "26": {"class_type": "FluxGuidance", "inputs": {"guidance": 3.5, "conditioning": ["6", 0]}},
        "27": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 1024, "height": 1024, "batch_size": 1}},
        "30": {
            "class_type": "ModelSamplingFlux",
            "inputs": {"max_shift": 1.15, "base_shift": 0.5, "width": 1024, "height": 1024, "model": ["12", 0]},
        },
    }
    recalled = recall_comfy(json.dumps(graph))
    values = recalled.values
    assert (values["prompt"], values["negative"], values["steps"], values["sampler"]) == (
        "a neon sign",
        "",
        20,
        "euler",
    )
    assert (values["seed"], values["size"], values["batch"]) == (219670278747233, (1024, 1024), 1)
    # no checkpoint: the separate loaders' files are the options that take them (the encoders by their names)
    assert (values["model"], values["t5xxl"], values["clip_l"], values["vae"]) == (
        "flux1-dev.safetensors",
        "t5xxl_fp16.safetensors",
        "clip_l.safetensors",
        "ae.safetensors",
    )
    assert recalled.model_parts == {  # what a given --model drops, and says
        "VAELoader (ae.safetensors: --vae)": ("vae",),
        "UNETLoader (flux1-dev.safetensors: --model)": (),
        "DualCLIPLoader (t5xxl_fp16.safetensors, clip_l.safetensors: --clip-l/--t5xxl)": ("t5xxl", "clip_l"),
    }
    assert recalled.cfg_values(distilled=True) == {"cfg": 3.5}  # FluxGuidance: the embedded guidance
    assert recalled.parameters.extra["Schedule type"] == "Simple"
    assert recalled.ignored == []  # ModelSamplingFlux is checked against the model's schedule (FlowSchedule)
    # CLIPTextEncodeFlux: t5xxl is the prompt, its guidance the distilled CFG
    graph["6"] = {
        "class_type": "CLIPTextEncodeFlux",
        "inputs": {"clip_l": "a neon sign", "t5xxl": "a neon sign", "guidance": 4.0, "clip": ["11", 0]},
    }
    graph["22"]["inputs"]["conditioning"] = ["6", 0]
    assert recall_comfy(json.dumps(graph)).cfg_values(distilled=True) == {"cfg": 4.0}


def test_img2img_denoise_and_several_samplers(tmp_path):
    graph = default_graph(denoise=0.5, steps=20)
    graph["10"] = {"class_type": "LoadImage", "inputs": {"image": "photo.png", "upload": "image"}}
    graph["11"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["4", 2]}}
    graph["3"]["inputs"]["latent_image"] = ["11", 0]
    del graph["5"]
    recalled = recall_comfy(json.dumps(graph))
    # ComfyUI runs 20 steps, the last of a 40-step schedule (KSampler.set_steps: int(steps / denoise) sigmas,
    # the last steps + 1 of them); sdcore counts A1111's int(min(s, 0.999) * 40) + 1 steps: strength 0.5 would
    # run 21, 0.49 runs the 20
    assert recalled.values["steps"] == 40 and recalled.img2img_strength == 0.49 and recalled.strength == 0.49
    assert img2img_steps(40, 0.49) == (40, 20) and img2img_steps(40, 0.5) == (40, 21)
    assert "size" not in recalled.values and recalled.ignored == []
    for steps, denoise in [(20, 0.3), (20, 0.7), (25, 0.55), (30, 0.99), (1, 0.9), (8, 0.125), (50, 0.05)]:
        graph["3"]["inputs"].update(steps=steps, denoise=denoise)
        recalled = recall_comfy(json.dumps(graph))
        schedule = int(steps / denoise)
        assert recalled.values["steps"] == schedule
        assert img2img_steps(schedule, recalled.img2img_strength) == (schedule, steps), (steps, denoise)
        assert recalled.parameters.extra["Denoising strength"] == str(recalled.img2img_strength)
    graph["3"]["inputs"].update(steps=20, denoise=0.3)  # 20 of 66: int(0.3 * 66) + 1, ComfyUI's own value
    assert recall_comfy(json.dumps(graph)).img2img_strength == 0.3
    # on an empty latent a denoise below 1 is no img2img sdcore can run: said
    assert recall_comfy(json.dumps(default_graph(denoise=0.6))).ignored == ["KSampler denoise 0.6"]
    # a second sampler feeding a second SaveImage: which image is meant is not known
    two = default_graph()
    two["20"] = dict(two["3"], inputs=dict(two["3"]["inputs"], seed=2))
    two["21"] = {"class_type": "VAEDecode", "inputs": {"samples": ["20", 0], "vae": ["4", 2]}}
    two["22"] = {"class_type": "PreviewImage", "inputs": {"images": ["21", 0]}}
    with pytest.raises(ConfigError, match=r"several samplers making its images \(3 \(KSampler\), 20 \(KSampler\)\)"):
        recall_comfy(json.dumps(two))
    del two["22"]  # the saved image's sampler is the one its VAEDecode reads; the other is said
    recalled = recall_comfy(json.dumps(two))
    assert recalled.values["seed"] == 156680208700286 and recalled.ignored == []


def _advanced(**inputs):
    graph = default_graph()
    sampler = graph["3"]["inputs"]
    sampler["noise_seed"] = sampler.pop("seed")
    del sampler["denoise"]
    sampler.update(add_noise="enable", start_at_step=0, end_at_step=10000, return_with_leftover_noise="disable")
    sampler.update(inputs)
    graph["3"]["class_type"] = "KSamplerAdvanced"
    return graph


def test_ksampler_advanced_steps():
    plain = recall_comfy(json.dumps(_advanced()))
    assert plain.values["seed"] == 156680208700286 and plain.values["steps"] == 20 and plain.ignored == []
    # start_at_step 8 of 20 on an encoded image with noise added: ComfyUI runs sigmas[8:], the last 12 steps of
    # the 20-step schedule, which is sdcore's (A1111's) img2img of 20 steps at a strength running 12
    graph = _advanced(start_at_step=8)
    graph["10"] = {"class_type": "LoadImage", "inputs": {"image": "photo.png", "upload": "image"}}
    graph["11"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["4", 2]}}
    graph["3"]["inputs"]["latent_image"] = ["11", 0]
    del graph["5"]
    img2img = recall_comfy(json.dumps(graph))
    assert img2img.values["steps"] == 20 and img2img.img2img_strength == 0.57 and img2img.ignored == []
    assert img2img_steps(20, 0.57) == (20, 12)
    # without the noise it is no img2img (the encoded latent sampled as it is): said, no strength
    graph["3"]["inputs"]["add_noise"] = "disable"
    quiet = recall_comfy(json.dumps(graph))
    assert quiet.img2img_strength is None
    assert quiet.ignored == ["KSamplerAdvanced (start_at_step 8, add_noise disable)", "VAEEncode", "LoadImage"]
    # from step 8 of an empty latent, or stopping at 15 with the noise left: not a txt2img sdcore runs, said
    assert recall_comfy(json.dumps(_advanced(start_at_step=8))).ignored == ["KSamplerAdvanced (start_at_step 8)"]
    partial = recall_comfy(json.dumps(_advanced(end_at_step=15, return_with_leftover_noise="enable")))
    assert partial.ignored == ["KSamplerAdvanced (return_with_leftover_noise enable, end_at_step 15)"]


@pytest.mark.parametrize(
    ("graph", "message"),
    [
        ("{not json", "the PNG's ComfyUI 'prompt' is not valid JSON (Expecting property name"),
        ("[1, 2]", "the PNG's ComfyUI 'prompt' is not a graph (a JSON object of nodes)"),
        (
            json.dumps({**default_graph(), "8": {"class_type": "VAEDecode", "inputs": {"samples": ["99", 0]}}}),
            "the PNG's ComfyUI graph: node 8 (VAEDecode) input 'samples' links to node 99, which the graph does not have",
        ),
        (
            json.dumps({**default_graph(), "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"x": ["3", 0]}}}),
            "the PNG's ComfyUI graph has a cycle: nodes 3 -> 4 -> 3",
        ),
        (json.dumps({"1": {"inputs": {}}}), "the PNG's ComfyUI graph: node 1 has no class_type"),
    ],
)
def test_malformed_graphs_are_one_line_errors_before_the_model_loads(tmp_path, monkeypatch, graph, message):
    monkeypatch.setattr(generate_command, "_load_bundle", lambda *a, **k: pytest.fail("must not load"))
    png = comfy_png(tmp_path / "bad.png", graph)
    result = _invoke(["-m", "tiny:sd1", "--from-png", str(png), "-o", str(tmp_path / "o.png")])
    assert one_error_line(result).startswith(message)


def test_a1111_parameters_win_over_the_graph(tmp_path):
    png = comfy_png(tmp_path / "both.png", default_graph(), parameters="a cat\nSteps: 3, Sampler: Heun, Seed: 5")
    recalled = recall_png(png)
    assert (recalled.values["prompt"], recalled.values["steps"], recalled.values["sampler"]) == ("a cat", 3, "heun")
    assert "model" not in recalled.values


def test_comfy_png_regenerates_the_typed_image(tmp_path):
    graph = default_graph(seed=7, steps=2, cfg=6.5, sampler_name="euler_ancestral")
    graph["5"]["inputs"].update(width=64, height=48)
    graph["6"]["inputs"]["text"] = "a lighthouse at dusk"
    graph["13"] = {"class_type": "CLIPSetLastLayer", "inputs": {"stop_at_clip_layer": -2, "clip": ["4", 1]}}
    graph["6"]["inputs"]["clip"] = graph["7"]["inputs"]["clip"] = ["13", 0]
    png = comfy_png(tmp_path / "comfy.png", graph)
    recalled_out, typed_out = tmp_path / "recalled.png", tmp_path / "typed.png"
    result = _invoke(["-m", "tiny:sd1", "--from-png", str(png), "--device", "cpu", "-o", str(recalled_out)])
    assert result.exit_code == 0, result.output
    assert "ignored" not in result.output and "warning" not in result.output
    typed = ["a lighthouse at dusk", "-n", "text, watermark", "--seed", "7", "--steps", "2", "--cfg", "6.5"]
    typed += ["--sampler", "euler_a", "--size", "64x48", "--clip-skip", "2", "--device", "cpu"]
    result = _invoke(["-m", "tiny:sd1", *typed, "-o", str(typed_out)])
    assert result.exit_code == 0, result.output
    with Image.open(recalled_out) as a, Image.open(typed_out) as b:
        assert np.array_equal(np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB")))
        recalled_params, typed_params = parse_parameters(a.info["parameters"]), parse_parameters(b.info["parameters"])
    assert recalled_params == typed_params and recalled_params.seed == 7 and recalled_params.size == (64, 48)


def comfy_webp(path, graph, *, size=(8, 8)):
    """A WebP as ComfyUI's SaveAnimatedWEBP writes it (comfy_api ImageSaveHelper: _create_webp_metadata, then
    save_animated_webp): the image's EXIF with 0x0110 (Model) = "prompt:" + json.dumps(prompt) and the
    extra_pnginfo items from 0x010F (Make) down, "workflow:" + json.dumps(workflow); save_all, lossless, quality
    80, method 4 (its "default")."""
    image = Image.new("RGB", size, (40, 90, 200))
    exif = image.getexif()
    exif[0x0110] = f"prompt:{json.dumps(graph)}"
    exif[0x010F] = "workflow:{}".format(json.dumps({"nodes": [], "links": []}))
    image.save(path, save_all=True, duration=int(1000.0 / 6.0), append_images=[], exif=exif, lossless=True,
               quality=80, method=4)  # fmt: skip
    return path


def test_a_comfyui_webp_is_recalled_as_its_png(tmp_path):
    from sdcore.generate.comfy_recall import read_comfy_prompt

    graph = default_graph(seed=11, steps=3)
    graph["6"]["inputs"]["text"] = "a lighthouse, 灯台"  # json.dumps escapes it: the EXIF text stays ASCII
    webp = comfy_webp(tmp_path / "ComfyUI_00001_.webp", graph)
    with Image.open(webp) as image:  # the workflow is there too, in the Make tag
        assert image.format == "WEBP" and image.getexif()[0x010F].startswith("workflow:{")
    assert read_comfy_prompt(webp) == json.dumps(graph)
    from_webp, from_png = recall_png(webp), recall_png(comfy_png(tmp_path / "comfy.png", graph))
    assert from_webp.values == from_png.values and from_webp.values["prompt"] == "a lighthouse, 灯台"
    assert (from_webp.values["seed"], from_webp.values["steps"]) == (11, 3)
    assert from_webp.parameters == from_png.parameters and from_webp.ignored == from_png.ignored
    # a camera's Model tag, or a WebP without EXIF, is no graph
    camera = tmp_path / "camera.webp"
    exif = Image.new("RGB", (8, 8)).getexif()
    exif[0x0110] = "EOS 5D"
    Image.new("RGB", (8, 8)).save(camera, exif=exif)
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.webp")
    for path in (camera, tmp_path / "plain.webp"):
        assert read_comfy_prompt(path) is None
        with pytest.raises(ConfigError, match=r"no generation parameters .*no ComfyUI 'prompt'"):
            recall_png(path)


def test_a_png_with_neither_still_says_so(tmp_path):
    plain = tmp_path / "plain.png"
    save_png(Image.new("RGB", (8, 8)), plain, None)
    with pytest.raises(ConfigError, match=r"no generation parameters .*no ComfyUI 'prompt'"):
        recall_png(plain)


def test_comfy_lora_chain_regenerates_with_a_real_lora_file(sd1, tmp_path, monkeypatch):
    """A LoraLoader whose strength_clip and strength_model differ, its file in a subfolder of the LoRA folder (as
    ComfyUI's ``lora_name`` "styles/ink.safetensors"): the recalled tag loads it with those weights."""
    import types

    import sdplugin_lora.plugin
    import torch
    from sdcore.builtin.generate_command import generate
    from sdcore.plugins import get_plugin_manager
    from sdplugin_lora.format import network_metadata, save_lora
    from sdplugin_lora.naming import ModuleIndex
    from sdplugin_lora.network import LoraNetwork

    lora_dir = tmp_path / "loras"
    network = LoraNetwork.create(ModuleIndex.from_bundle(sd1).select(conv=False), rank=2, alpha=2.0)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for module in network:
            module.lora_down.weight.copy_(torch.randn(module.lora_down.weight.shape, generator=generator) * 0.5)
            module.lora_up.weight.copy_(torch.randn(module.lora_up.weight.shape, generator=generator) * 0.5)
    (lora_dir / "styles").mkdir(parents=True)
    save_lora(lora_dir / "styles" / "ink.safetensors", network.state_dict(),
              network_metadata(family="sd1", rank=2, alpha=2.0), dtype="fp32")  # fmt: skip

    graph = default_graph(seed=11, steps=2, cfg=5.0)
    graph["5"]["inputs"].update(width=32, height=32)
    graph["6"]["inputs"]["text"] = "a castle"
    graph["10"] = {
        "class_type": "LoraLoader",
        "inputs": {"lora_name": "styles\\ink.safetensors", "strength_model": 1.0, "strength_clip": 0.5,
                   "model": ["4", 0], "clip": ["4", 1]},
    }  # fmt: skip
    graph["3"]["inputs"]["model"] = ["10", 0]
    graph["6"]["inputs"]["clip"] = graph["7"]["inputs"]["clip"] = ["10", 1]
    png = comfy_png(tmp_path / "comfy.png", graph)

    monkeypatch.setattr(generate_command, "_load_bundle", lambda *a, **k: sd1)
    pm = get_plugin_manager(builtins=False, entrypoints=False, extra=[sdplugin_lora.plugin])

    def run(out, *args):
        common = ["-m", "tiny:sd1", "--device", "cpu", "--lora-dir", str(lora_dir), "-o", str(tmp_path / out)]
        result = CliRunner().invoke(generate, [*common, *args], obj=types.SimpleNamespace(pm=pm))
        assert result.exit_code == 0, result.output
        with Image.open(tmp_path / out) as image:
            return np.asarray(image.convert("RGB")), parse_parameters(image.info["parameters"])

    typed = ["-n", "text, watermark", "--seed", "11", "--steps", "2", "--cfg", "5", "--sampler", "euler"]
    typed += ["--size", "32x32"]
    recalled, info = run("recalled.png", "--from-png", str(png))
    assert info.prompt == "a castle <lora:ink:0.5:1>" and "Lora hashes" in info.extra
    same, _ = run("typed.png", "a castle <lora:ink:0.5:1>", *typed)
    assert np.array_equal(recalled, same)
    # the file and both weights count: without it, or with the te weight 1, the image differs
    without, _ = run("none.png", "a castle", *typed)
    full, _ = run("full.png", "a castle <lora:ink:1>", *typed)
    assert not np.array_equal(recalled, without) and not np.array_equal(recalled, full)


def test_the_graphs_ckpt_name_is_the_model_when_none_is_given(tiny_bundles, tmp_path):
    """No ``--model``: the CheckpointLoaderSimple's ``ckpt_name`` (a Windows ``sub\\name`` as ComfyUI on Windows
    writes it) is found below ``--models-dir``'s ``checkpoints/`` and makes the image ``--model PATH`` makes."""
    from sdcore.models.save import write_single_file

    checkpoint = tmp_path / "models" / "checkpoints" / "sub" / "base.safetensors"
    checkpoint.parent.mkdir(parents=True)
    write_single_file(tiny_bundles("sd1"), checkpoint)
    graph = default_graph(seed=5, steps=1)
    graph["4"]["inputs"]["ckpt_name"] = "sub\\base.safetensors"
    graph["5"]["inputs"].update(width=32, height=32)
    png = comfy_png(tmp_path / "comfy.png", graph)
    by_name, by_path = tmp_path / "by_name.png", tmp_path / "by_path.png"
    models = ["--models-dir", str(tmp_path / "models"), "--device", "cpu"]
    result = _invoke(["--from-png", str(png), *models, "-o", str(by_name)])
    assert result.exit_code == 0, result.output
    result = _invoke(["--from-png", str(png), "-m", str(checkpoint), *models, "-o", str(by_path)])
    assert result.exit_code == 0, result.output
    with Image.open(by_name) as a, Image.open(by_path) as b:
        assert np.array_equal(np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB")))
        assert a.info["parameters"] == b.info["parameters"]
    missing = _invoke(["--from-png", str(png), "--models-dir", str(tmp_path / "nothing"), "-o", str(by_name)])
    assert missing.exit_code == 2 and "base.safetensors" in missing.output, missing.output


def hires_graph(upscale="latent", **second):
    """ComfyUI's "2 Pass Txt2Img (Hires fix)" example shaped as its API graph: the default workflow's KSampler 3
    (txt2img) -> LatentUpscale 10 -> KSampler 11 (denoise 0.5) -> VAEDecode 8 -> SaveImage 9; ``upscale``
    "pixel": VAEDecode 12 -> ImageScaleBy 13 -> VAEEncode 14 between them instead (node inputs as nodes.py)."""
    graph = default_graph(steps=20, cfg=8.0, sampler_name="dpmpp_2m", scheduler="karras")
    inputs = {"seed": 156680208700286, "steps": 14, "cfg": 8.0, "sampler_name": "dpmpp_2m", "scheduler": "karras"}
    inputs.update(denoise=0.5, model=["4", 0], positive=["6", 0], negative=["7", 0], latent_image=["10", 0])
    graph["11"] = {"class_type": "KSampler", "inputs": {**inputs, **second}}
    if upscale == "latent":
        graph["10"] = {
            "class_type": "LatentUpscale",
            "inputs": {"upscale_method": "nearest-exact", "width": 1152, "height": 1152, "crop": "disabled",
                       "samples": ["3", 0]},
        }  # fmt: skip
    else:
        graph["12"] = {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}}
        graph["13"] = {"class_type": "ImageScaleBy", "inputs": {"upscale_method": "lanczos", "scale_by": 1.5,
                                                                "image": ["12", 0]}}  # fmt: skip
        graph["14"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["13", 0], "vae": ["4", 2]}}
        graph["11"]["inputs"]["latent_image"] = ["14", 0]
    graph["8"]["inputs"]["samples"] = ["11", 0]
    return graph


_FIRST = {
    "prompt": "beautiful scenery nature glass bottle landscape, , purple galaxy bottle,",
    "negative": "text, watermark",
    "steps": 20,
    "sampler": "dpm++2m_karras",
    "seed": 156680208700286,
    "size": (512, 512),
    "clip_skip": 1,
    "model": "v1-5-pruned-emaonly.safetensors",
    "batch": 1,
}
_SAME = {"hires": True, "hr_prompt": None, "hr_negative": None, "hr_sampler": None, "hr_cfg": None}


def test_latent_hires_graph_is_the_hires_fix():
    recalled = recall_comfy(json.dumps(hires_graph()))
    # LatentUpscale 1152x1152 of a 512 image: sdcore's Hires resize to the same latent (144x144), no crop
    assert recalled.values == {
        **_FIRST, **_SAME, "hr_scale": 2.0, "hr_resize_x": 1152, "hr_resize_y": 1152,
        "hr_upscaler": "Latent (nearest-exact)", "hr_steps": 14, "hr_distilled_cfg": None,
    }  # fmt: skip
    assert recalled.strength == 0.5 and recalled.img2img_strength is None and recalled.ignored == []
    # ComfyUI's 14 steps at denoise 0.5 are the last 14 of int(14 / 0.5) = 28; sdcore's hires pass the same
    assert HiresFix(steps=14, denoising_strength=0.5).schedule(20) == (28, 14)
    # LatentUpscaleBy 1.5 (round(64 * 1.5) = 96 latent pixels): A1111's "Hires upscale: 1.5", int(512 * 1.5)
    graph = hires_graph(denoise=0.55, steps=11, seed=7, cfg=6, sampler_name="euler", scheduler="normal")
    graph["10"] = {"class_type": "LatentUpscaleBy", "inputs": {"upscale_method": "bicubic", "scale_by": 1.5,
                                                               "samples": ["3", 0]}}  # fmt: skip
    graph["15"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "sharp details", "clip": ["4", 1]}}
    graph["11"]["inputs"]["positive"] = ["15", 0]
    recalled = recall_comfy(json.dumps(graph))
    extra = recalled.parameters.extra
    assert {k: v for k, v in extra.items() if k.startswith("Hires")} == {
        "Hires upscale": "1.5", "Hires upscaler": "Latent (bicubic)", "Hires steps": "11", "Hires sampler": "euler",
        "Hires schedule type": "Uniform", "Hires CFG Scale": "6", "Hires prompt": "sharp details",
    }  # fmt: skip
    assert extra["Denoising strength"] == "0.55" and recalled.strength == 0.55
    assert HiresFix(steps=11, denoising_strength=0.55).schedule(20) == (int(11 / 0.55), 11) == (20, 11)
    assert (recalled.values["hr_scale"], recalled.values["hr_resize_x"], recalled.values["hr_upscaler"]) == (
        1.5, 0, "Latent (bicubic)")  # fmt: skip
    assert (recalled.values["hr_sampler"], recalled.values["hr_cfg"]) == ("euler", 6.0)
    assert recalled.values["hr_prompt"] == "sharp details" and recalled.values["hr_negative"] is None
    assert recalled.ignored == [
        "KSampler seed 7 (sdcore's hires pass draws its noise from the first pass's seed 156680208700286)"
    ]
    # methods sdcore has not: said, with the upscaler used; 1.5 of area is no nearest-exact
    graph["10"]["inputs"]["upscale_method"] = "area"
    assert recall_comfy(json.dumps(graph)).ignored[0] == (
        "LatentUpscaleBy area x1.5 (sdcore has no area latent upscale: Latent (nearest-exact))"
    )
    graph["10"]["inputs"].update(upscale_method="area", scale_by=2)  # whole-number scale: the same pixels
    assert recall_comfy(json.dumps(graph)).values["hr_upscaler"] == "Latent (nearest-exact)"
    assert len(recall_comfy(json.dumps(graph)).ignored) == 1


def test_pixel_hires_graph_is_the_hires_fix():
    recalled = recall_comfy(json.dumps(hires_graph("pixel", denoise=0.4)))
    assert recalled.values == {
        **_FIRST, **_SAME, "hr_scale": 1.5, "hr_resize_x": 0, "hr_resize_y": 0, "hr_upscaler": "Lanczos",
        "hr_steps": 14, "hr_distilled_cfg": None,
    }  # fmt: skip
    assert recalled.strength == 0.4 and recalled.ignored == []
    # an upscale model's factor from its name, then ImageScale to 1024 wide: Lanczos, resize, both said
    graph = hires_graph("pixel")
    graph["16"] = {"class_type": "UpscaleModelLoader", "inputs": {"model_name": "4x-UltraSharp.pth"}}
    graph["17"] = {"class_type": "ImageUpscaleWithModel", "inputs": {"upscale_model": ["16", 0],
                                                                     "image": ["12", 0]}}  # fmt: skip
    graph["13"] = {"class_type": "ImageScale", "inputs": {"upscale_method": "bilinear", "width": 1024, "height": 0,
                                                          "crop": "disabled", "image": ["17", 0]}}  # fmt: skip
    recalled = recall_comfy(json.dumps(graph))
    assert (recalled.values["hr_resize_x"], recalled.values["hr_resize_y"]) == (1024, 1024)
    assert recalled.values["hr_upscaler"] == "Lanczos"
    assert recalled.ignored == [
        "ImageUpscaleWithModel 4x-UltraSharp.pth (sdcore has no upscale models: Lanczos, its x4 read from the name)",
        "ImageScale bilinear 1024x1024 (sdcore upscales once, to the size all of them make)",
    ]
    # a model whose name says no factor: no hires fix recalled, said
    graph["16"]["inputs"]["model_name"] = "UltraSharp.pth"
    recalled = recall_comfy(json.dumps(graph))
    assert "hires" not in recalled.values
    assert recalled.ignored[0] == "KSampler (a second pass sdcore cannot read as its hires fix)"


def test_base_refiner_graph_says_the_base_is_the_model():
    """ComfyUI's SDXL base -> refiner example: KSamplerAdvanced 10 (base, steps 25, end_at_step 20, leftover
    noise) -> KSamplerAdvanced 11 (refiner checkpoint, add_noise disable, from step 20)."""
    graph = _advanced(steps=25, end_at_step=20, return_with_leftover_noise="enable")
    graph["4"]["inputs"]["ckpt_name"] = "sd_xl_base_1.0.safetensors"
    graph["12"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd_xl_refiner_1.0.safetensors"}}
    graph["13"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "refined", "clip": ["12", 1]}}
    graph["14"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["12", 1]}}
    graph["11"] = {
        "class_type": "KSamplerAdvanced",
        "inputs": {**graph["3"]["inputs"], "add_noise": "disable", "start_at_step": 20, "end_at_step": 10000,
                   "return_with_leftover_noise": "disable", "model": ["12", 0], "positive": ["13", 0],
                   "negative": ["14", 0], "latent_image": ["3", 0]},
    }  # fmt: skip
    graph["8"]["inputs"] = {"samples": ["11", 0], "vae": ["12", 2]}
    recalled = recall_comfy(json.dumps(graph))
    assert recalled.values["model"] == "sd_xl_base_1.0.safetensors" and recalled.values["steps"] == 25
    assert recalled.values["prompt"] == _FIRST["prompt"] and "hires" not in recalled.values
    assert recalled.ignored == [
        "refiner KSamplerAdvanced 11 (checkpoint sd_xl_refiner_1.0.safetensors, steps from 20 of 25): sdcore has no "
        "refiner switch in one run; the base KSamplerAdvanced 3 (checkpoint sd_xl_base_1.0.safetensors, the --model "
        "taken) runs all 25 steps (refine the image afterwards: --model the refiner --init-image --steps 25 "
        "--denoising-strength 0.18: its last 5 steps)"
    ]
    assert img2img_steps(25, 0.18) == (25, 5)  # sdcore's img2img at that strength: the last 5 of 25


def test_comfy_hires_png_regenerates_the_typed_image(tmp_path):
    graph = hires_graph(steps=2, denoise=0.5, seed=7)
    graph["3"]["inputs"].update(seed=7, steps=2)
    graph["5"]["inputs"].update(width=64, height=48)
    graph["10"]["inputs"].update(width=96, height=0, upscale_method="bilinear")  # 96x72
    png = comfy_png(tmp_path / "comfy.png", graph, size=(96, 72))  # the size the graph makes: nothing said
    recalled_out, typed_out = tmp_path / "recalled.png", tmp_path / "typed.png"
    result = _invoke(["-m", "tiny:sd1", "--from-png", str(png), "--device", "cpu", "-o", str(recalled_out)])
    assert result.exit_code == 0, result.output
    assert "ignored" not in result.output and "warning" not in result.output
    typed = [_FIRST["prompt"], "-n", "text, watermark", "--seed", "7", "--steps", "2", "--cfg", "8"]
    typed += ["--sampler", "dpm++2m_karras", "--size", "64x48", "--device", "cpu", "--hires", "--hr-resize-x", "96"]
    typed += ["--hr-resize-y", "72", "--hr-upscaler", "Latent", "--hr-steps", "2", "--denoising-strength", "0.5"]
    result = _invoke(["-m", "tiny:sd1", *typed, "-o", str(typed_out)])
    assert result.exit_code == 0, result.output
    with Image.open(recalled_out) as a, Image.open(typed_out) as b:
        assert a.size == (96, 72)
        assert np.array_equal(np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB")))
        recalled_params, typed_params = parse_parameters(a.info["parameters"]), parse_parameters(b.info["parameters"])
    assert recalled_params == typed_params and recalled_params.extra["Hires resize"] == "96x72"


@pytest.mark.parametrize(
    ("steps", "denoise"),
    [(14, 0.5), (11, 0.55), (20, 0.3), (10, 0.7), (7, 0.33), (9, 0.45), (3, 0.1), (12, 0.9995), (25, 1.0)],
)
def test_hires_steps_run_comfys_sigmas(steps, denoise):
    """ComfyUI's KSampler.set_steps (rewritten): denoise above 0.9999 runs the plain ``steps``-step schedule, else
    the last ``steps`` of an ``int(steps / denoise)``-step one; the recalled hires pass runs the same."""
    comfy = (steps, steps) if denoise > 0.9999 else (int(steps / denoise), steps)
    recalled = recall_comfy(json.dumps(hires_graph(steps=steps, denoise=denoise)))
    assert recalled.values["hr_steps"] == steps and recalled.strength == denoise
    hires = HiresFix(steps=recalled.values["hr_steps"], denoising_strength=recalled.strength)
    assert hires.schedule(_FIRST["steps"]) == comfy and recalled.ignored == []


def test_pixel_hires_sizes_are_checked():
    # ImageScaleBy 1.3 of 512: round(665.6) = 666, which VAEEncode crops to 664 at the centre; sdcore's
    # int(512 * 1.3) = 665 is not it: Hires resize 666x666, the 8-pixel crop said
    graph = hires_graph("pixel")
    graph["13"]["inputs"]["scale_by"] = 1.3
    recalled = recall_comfy(json.dumps(graph))
    assert (recalled.values["hr_resize_x"], recalled.values["hr_resize_y"]) == (666, 666)
    assert HiresFix(resize_x=666, resize_y=666).final_size(512, 512) == (664, 664)
    assert recalled.ignored == [
        "ImageScaleBy to 666x666, not whole 8-pixel blocks (ComfyUI's VAEEncode crops it to 664x664 at the centre; "
        "sdcore resizes and encodes it A1111's way)"
    ]
    # a first pass that is an img2img: no hires fix (A1111's img2img has none), the reason said
    graph = hires_graph()
    graph["20"] = {"class_type": "LoadImage", "inputs": {"image": "photo.png", "upload": "image"}}
    graph["21"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["20", 0], "vae": ["4", 2]}}
    graph["3"]["inputs"].update(latent_image=["21", 0], denoise=0.6)
    recalled = recall_comfy(json.dumps(graph))
    assert "hires" not in recalled.values and recalled.img2img_strength == 0.59
    assert (
        recalled.ignored[0]
        == "KSampler (a second pass sdcore cannot read as its hires fix: its first pass is an img2img)"
    )


def test_upscale_model_factor_is_checked_against_the_png(tmp_path):
    """A 4x model then ImageScaleBy 0.5 (a usual pixel hires graph): x4 read from the name makes 1024x1024; a PNG
    of another size says that the factor was a guess."""
    graph = hires_graph("pixel")
    graph["16"] = {"class_type": "UpscaleModelLoader", "inputs": {"model_name": "4x-UltraSharp.pth"}}
    graph["17"] = {"class_type": "ImageUpscaleWithModel", "inputs": {"upscale_model": ["16", 0], "image": ["12", 0]}}
    graph["13"]["inputs"].update(image=["17", 0], scale_by=0.5)
    model_said = (
        "ImageUpscaleWithModel 4x-UltraSharp.pth (sdcore has no upscale models: Lanczos, its x4 read from the name)"
    )
    right = recall_png(comfy_png(tmp_path / "right.png", graph, size=(1024, 1024)))
    assert (right.values["hr_resize_x"], right.values["hr_resize_y"]) == (1024, 1024)
    assert right.ignored == [
        model_said,
        "ImageScaleBy lanczos x0.5 (sdcore upscales once, to the size all of them make)",
    ]
    wrong = recall_png(comfy_png(tmp_path / "wrong.png", graph, size=(512, 512)))
    assert wrong.values["hr_resize_x"] == 1024 and wrong.ignored[2] == (
        "the image is 512x512 where the graph's second pass makes 1024x1024; 4x-UltraSharp.pth's x4 is read from its name"
    )


def test_comfy_pixel_hires_png_regenerates_the_typed_image(tmp_path):
    """The pixel variant: VAEDecode -> ImageScaleBy lanczos 1.5 -> VAEEncode is A1111's Lanczos at 1.5 (PIL's
    Lanczos on the 8-bit image in both); the recalled options and the typed ones make the same pixels."""
    graph = hires_graph("pixel", steps=2, denoise=0.5, seed=7)
    graph["3"]["inputs"].update(seed=7, steps=2)
    graph["5"]["inputs"].update(width=64, height=48)
    png = comfy_png(tmp_path / "comfy.png", graph, size=(96, 72))
    recalled_out, typed_out = tmp_path / "recalled.png", tmp_path / "typed.png"
    result = _invoke(["-m", "tiny:sd1", "--from-png", str(png), "--device", "cpu", "-o", str(recalled_out)])
    assert result.exit_code == 0, result.output
    assert "ignored" not in result.output and "warning" not in result.output
    typed = [_FIRST["prompt"], "-n", "text, watermark", "--seed", "7", "--steps", "2", "--cfg", "8"]
    typed += ["--sampler", "dpm++2m_karras", "--size", "64x48", "--device", "cpu", "--hires", "--hr-scale", "1.5"]
    typed += ["--hr-upscaler", "Lanczos", "--hr-steps", "2", "--denoising-strength", "0.5"]
    result = _invoke(["-m", "tiny:sd1", *typed, "-o", str(typed_out)])
    assert result.exit_code == 0, result.output
    with Image.open(recalled_out) as a, Image.open(typed_out) as b:
        assert a.size == (96, 72)
        assert np.array_equal(np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB")))
        recalled_params, typed_params = parse_parameters(a.info["parameters"]), parse_parameters(b.info["parameters"])
    assert recalled_params == typed_params
    assert (recalled_params.extra["Hires upscale"], recalled_params.extra["Hires upscaler"]) == ("1.5", "Lanczos")


def _flux_graph(width=1024, height=1024, sampling=(1024, 1024), scheduler="simple", steps=20, seed=219670278747233):
    """ComfyUI's FLUX.1 dev example graph (test_flux_custom_sampler_graph's) at a size; ``sampling``: the
    ModelSamplingFlux node's width/height (``None``: no such node, the model's own sampling)."""
    graph = {
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a neon sign", "clip": ["11", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["13", 0], "vae": ["10", 0]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}},
        "10": {"class_type": "VAELoader", "inputs": {"vae_name": "ae.safetensors"}},
        "11": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": "t5xxl_fp16.safetensors",
                                                          "clip_name2": "clip_l.safetensors", "type": "flux"}},
        "12": {"class_type": "UNETLoader", "inputs": {"unet_name": "flux1-dev.safetensors", "weight_dtype": "default"}},
        "13": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["25", 0], "guider": ["22", 0],
                                                                 "sampler": ["16", 0], "sigmas": ["17", 0],
                                                                 "latent_image": ["27", 0]}},
        "16": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "17": {"class_type": "BasicScheduler", "inputs": {"scheduler": scheduler, "steps": steps, "denoise": 1.0,
                                                          "model": ["30", 0]}},
        "22": {"class_type": "BasicGuider", "inputs": {"model": ["30", 0], "conditioning": ["26", 0]}},
        "25": {"class_type": "RandomNoise", "inputs": {"noise_seed": seed}},
        "26": {"class_type": "FluxGuidance", "inputs": {"guidance": 3.5, "conditioning": ["6", 0]}},
        "27": {"class_type": "EmptySD3LatentImage", "inputs": {"width": width, "height": height, "batch_size": 1}},
        "30": {"class_type": "ModelSamplingFlux", "inputs": {"max_shift": 1.15, "base_shift": 0.5, "model": ["12", 0]}},
    }  # fmt: skip
    if sampling is None:
        del graph["30"]
        graph["17"]["inputs"]["model"] = graph["22"]["inputs"]["model"] = ["12", 0]
    else:
        graph["30"]["inputs"].update(width=sampling[0], height=sampling[1])
    return graph


def _schedule_notes(graph, bundle, sampler="euler", size=None):
    recalled = recall_comfy(json.dumps(graph))
    size = size or recalled.values["size"]
    notes = recalled.notes(bundle, sampler=sampler, hires_sampler=None, distilled=True, model_hash=None, size=size)
    return [line.removeprefix("ignored from the PNG (sdcore has no option for them): ") for line in notes]


def test_flux_shift_is_checked_against_sdcores(tiny_bundles):
    """ComfyUI's simple scheduler with ModelSamplingFlux at the image's size is the token-count shift sdcore
    (diffusers' FluxPipeline) runs at every size: no note; without the node (the model's mu 1.15), or with the
    node at another size, the sigmas differ below 1024x1024 and one line says both shifts."""
    flux = tiny_bundles("flux")
    assert _schedule_notes(_flux_graph(512, 768, sampling=(512, 768)), flux) == []
    assert _schedule_notes(_flux_graph(1024, 1024, sampling=None), flux) == []
    assert _schedule_notes(_flux_graph(1024, 1024), flux) == []
    assert _schedule_notes(_flux_graph(832, 1216, sampling=(832, 1216), steps=30), flux) == []  # 30 !| 10000
    (line,) = _schedule_notes(_flux_graph(512, 768, sampling=None), flux)
    assert line == (
        "scheduler simple with the model's own mu 1.15, ModelSamplingFlux's 1024x1024 (sdcore's euler shifts by "
        "mu 0.7167 (the 512x768 image's token count); no option sets it: sigma 2 is 0.9836 in ComfyUI, 0.9749 here)"
    )
    (line,) = _schedule_notes(_flux_graph(512, 512, sampling=(1024, 1024)), flux)
    assert line == (
        "scheduler simple with ModelSamplingFlux 30 at 1024x1024: mu 1.15 (sdcore's euler shifts by mu 0.63 (the "
        "512x512 image's token count); no option sets it: sigma 2 is 0.9836 in ComfyUI, 0.9727 here)"
    )
    assert _schedule_notes(_flux_graph(512, 512, sampling=(512, 512), scheduler="beta"), flux) == [
        "scheduler beta with ModelSamplingFlux 30 (sdcore's euler runs the pipeline's sigmas, mu 0.63 (the 512x512 "
        "image's token count))"
    ]
    # normal on FLUX: linspace from the table's largest to its smallest t, not the pipeline's linspace(1, 1/n, n)
    (line,) = _schedule_notes(_flux_graph(512, 512, sampling=(512, 512), scheduler="normal"), flux)
    assert line.startswith("scheduler normal with ModelSamplingFlux 30 at 512x512"), line
    # DPM++ 2M makes its own sigmas; the Forge label check ("Simple") is not run on top of this one
    assert _schedule_notes(_flux_graph(512, 512, sampling=(512, 512)), flux, sampler="dpm++2m") == [
        "scheduler simple (sdcore's dpm++2m runs its own sigmas)"
    ]


def test_sd3_shift_and_sd1_with_a_flow_node(tiny_bundles):
    """SD3: ComfyUI's normal scheduler on its shift 3 (the model's, or ModelSamplingSD3 3.0) is diffusers'
    SD3 schedule, no note; another shift or scheduler is one line. A ModelSampling* flow node on an SD1 model is
    said, and the SD1 "Schedule type" check still runs."""
    sd3 = tiny_bundles("sd3")
    graph = default_graph(seed=3, steps=28, cfg=4.5, scheduler="normal")
    graph["5"] = {"class_type": "EmptySD3LatentImage", "inputs": {"width": 832, "height": 1216, "batch_size": 1}}
    assert _schedule_notes(graph, sd3) == []
    graph["20"] = {"class_type": "ModelSamplingSD3", "inputs": {"shift": 3.0, "model": ["4", 0]}}
    graph["3"]["inputs"]["model"] = ["20", 0]
    assert _schedule_notes(graph, sd3) == []
    graph["20"]["inputs"]["shift"] = 6.0
    (line,) = _schedule_notes(graph, sd3)
    assert line.startswith("scheduler normal with ModelSamplingSD3 20 shift 6 (sdcore's euler shifts by shift 3; "
                           "no option sets it: sigma 2 is "), line  # fmt: skip
    graph["20"]["inputs"]["shift"] = 3.0
    graph["3"]["inputs"]["scheduler"] = "sgm_uniform"  # linspace over steps + 1: another list
    (line,) = _schedule_notes(graph, sd3)
    assert line.startswith("scheduler sgm_uniform with ModelSamplingSD3 20 shift 3 (sdcore's euler"), line
    assert _schedule_notes(graph, sd3, sampler="dpm++2m") == [
        "scheduler sgm_uniform (sdcore's dpm++2m runs its own sigmas)"
    ]
    graph["3"]["inputs"]["scheduler"] = "normal"
    assert _schedule_notes(graph, tiny_bundles("sd1")) == ["ModelSamplingSD3 20 (not a flow model)"]


def test_flow_hires_sizes_round_to_16(tiny_bundles):
    """A latent hires graph whose second pass keeps an odd latent (ComfyUI) where sdcore's flow hires fix rounds
    to 16 pixels: said on a flow model only."""
    graph = hires_graph(scheduler="simple", sampler_name="euler")
    graph["3"]["inputs"].update(sampler_name="euler", scheduler="simple")
    graph["5"]["inputs"].update(width=496, height=496)
    graph["10"] = {"class_type": "LatentUpscaleBy", "inputs": {"upscale_method": "nearest-exact", "scale_by": 1.5,
                                                               "samples": ["3", 0]}}  # fmt: skip
    recalled = recall_comfy(json.dumps(graph))
    assert recalled.values["hr_scale"] == 1.5
    notes = _schedule_notes(graph, tiny_bundles("flux"), size=(496, 496))
    assert "second pass 744x744 (sdcore's flux hires fix rounds to 16 pixels: 736x736)" in notes[0], notes
    assert not any("second pass" in line for line in _schedule_notes(graph, tiny_bundles("sd1"), size=(496, 496)))


def test_sd3_text_node_and_triple_clip_loader():
    graph = default_graph()
    graph["11"] = {
        "class_type": "TripleCLIPLoader",
        "inputs": {
            "clip_name1": "clip_l.safetensors",
            "clip_name2": "clip_g.safetensors",
            "clip_name3": "t5xxl_fp8_e4m3fn.safetensors",
        },
    }
    graph["6"] = {"class_type": "CLIPTextEncodeSD3", "inputs": {"clip": ["11", 0], "clip_l": "a fox",
                  "clip_g": "a fox", "t5xxl": "a fox", "empty_padding": "none"}}  # fmt: skip
    graph["7"] = {"class_type": "CLIPTextEncodeSD3", "inputs": {"clip": ["11", 0], "clip_l": "", "clip_g": "blur",
                  "t5xxl": "", "empty_padding": "none"}}  # fmt: skip
    recalled = recall_comfy(json.dumps(graph))
    assert (recalled.values["prompt"], recalled.values["negative"]) == ("a fox", "blur")
    assert (recalled.values["clip_l"], recalled.values["clip_g"], recalled.values["t5xxl"]) == (
        "clip_l.safetensors", "clip_g.safetensors", "t5xxl_fp8_e4m3fn.safetensors")  # fmt: skip
    assert recalled.values["model"] == "v1-5-pruned-emaonly.safetensors"  # the checkpoint, not a loader's
    assert recalled.ignored == ['CLIPTextEncodeSD3 clip_l "", t5xxl ""']
    # names that say nothing: TripleCLIPLoader's SD3 order; a DualCLIPLoader's are left said
    graph["11"]["inputs"].update(clip_name1="a.safetensors", clip_name2="b.safetensors", clip_name3="c.safetensors")
    values = recall_comfy(json.dumps(graph)).values
    assert (values["clip_l"], values["clip_g"], values["t5xxl"]) == ("a.safetensors", "b.safetensors", "c.safetensors")
    graph["11"] = {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": "a.safetensors", "clip_name2": "b.st"}}
    recalled = recall_comfy(json.dumps(graph))
    assert (
        "clip_l" not in recalled.values and "DualCLIPLoader (a.safetensors, b.st: --clip-l/--t5xxl)" in recalled.ignored
    )


def test_comfy_flux_png_regenerates_the_typed_image(tmp_path):
    """A FLUX.1 graph (separate loaders, SamplerCustomAdvanced, FluxGuidance, ModelSamplingFlux at the image's
    size) with --model given: the typed image, pixel-equal; the loaders it drops are said, the shift is not."""
    graph = _flux_graph(32, 48, sampling=(32, 48), steps=2, seed=11)
    graph["6"]["inputs"]["text"] = "a lighthouse at dusk"
    png = comfy_png(tmp_path / "comfy.png", graph)
    recalled_out, typed_out = tmp_path / "recalled.png", tmp_path / "typed.png"
    result = _invoke(["-m", "tiny:flux", "--from-png", str(png), "--device", "cpu", "-o", str(recalled_out)])
    assert result.exit_code == 0, result.output
    ignored = [line for line in result.output.splitlines() if "ignored" in line]
    assert ignored == [
        "ignored from the PNG (sdcore has no option for them): UNETLoader (flux1-dev.safetensors: --model), "
        "DualCLIPLoader (t5xxl_fp16.safetensors, clip_l.safetensors: --clip-l/--t5xxl), VAELoader "
        "(ae.safetensors: --vae)"
    ], result.output
    assert "warning" not in result.output
    typed = ["a lighthouse at dusk", "--seed", "11", "--steps", "2", "--cfg", "3.5", "--sampler", "euler"]
    result = _invoke(["-m", "tiny:flux", *typed, "--size", "32x48", "--device", "cpu", "-o", str(typed_out)])
    assert result.exit_code == 0, result.output
    with Image.open(recalled_out) as a, Image.open(typed_out) as b:
        assert np.array_equal(np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB")))
        recalled_params, typed_params = parse_parameters(a.info["parameters"]), parse_parameters(b.info["parameters"])
    assert recalled_params == typed_params and recalled_params.seed == 11 and recalled_params.size == (32, 48)


def _comfyui_sigmas(kind, value, scheduler, steps):
    """ComfyUI's sigma list as comfy/samplers.py makes it from comfy/model_sampling.py's float32 table, rewritten
    step by step from those files (table of ``sigma(arange(1, N + 1) / N * multiplier)``; ``simple`` indexes it
    from the end; ``normal``/``sgm_uniform`` ``torch.linspace`` between ``timestep(sigma_max)`` and
    ``timestep(sigma_min)``, then ``sigma(timestep)``), to check the recall's plain-float version against."""
    import math

    import torch

    n, multiplier = (10000, 1.0) if kind == "flux" else (1000, 1000.0)

    def sigma(timestep):
        t = timestep / multiplier
        if kind == "flux":  # flux_time_shift(mu, 1.0, t)
            return math.exp(value) / (math.exp(value) + (1 / t - 1))
        return value * t / (1 + (value - 1) * t)  # time_snr_shift

    table = sigma(torch.arange(1, n + 1, 1) / n * multiplier)
    if scheduler == "simple":
        ss = len(table) / steps
        return [float(table[-(1 + int(x * ss))]) for x in range(steps)]
    start, end = float(table[-1]) * multiplier, float(table[0]) * multiplier
    count = steps + 1 if scheduler == "sgm_uniform" else steps
    timesteps = torch.linspace(start, end, count)[:steps]
    return [float(sigma(ts)) for ts in timesteps]


@pytest.mark.parametrize("scheduler", ["simple", "normal", "sgm_uniform"])
@pytest.mark.parametrize(("kind", "value"), [("flux", 1.15), ("flux", 0.63), ("sd3", 3.0), ("sd3", 1.0)])
@pytest.mark.parametrize("steps", [1, 4, 20, 30, 49])
def test_comfy_flow_sigmas_are_comfyuis(kind, value, scheduler, steps):
    from sdcore.generate.comfy_recall import comfy_flow_sigmas

    ours = comfy_flow_sigmas(kind, value, scheduler, steps)
    assert ours == pytest.approx(_comfyui_sigmas(kind, value, scheduler, steps), abs=2e-6)


def test_comfy_flow_sigma_values():
    """A few by hand: FLUX.1's mu 1.15 at t = 1, 3/4, 1/2, 1/4 (``simple``, 4 steps: 10000 / 4 divides), SD3's
    shift 3 at t = 1/2 (0.75)."""
    from sdcore.generate.comfy_recall import comfy_flow_sigmas

    e = 3.158192909689768  # exp(1.15)
    assert comfy_flow_sigmas("flux", 1.15, "simple", 4) == pytest.approx(
        [1.0, e * 0.75 / (e * 0.75 + 0.25), e * 0.5 / (e * 0.5 + 0.5), e * 0.25 / (e * 0.25 + 0.75)], abs=1e-12
    )
    assert comfy_flow_sigmas("sd3", 3.0, "simple", 2) == pytest.approx([1.0, 0.75], abs=1e-12)
    assert comfy_flow_sigmas("flux", 1.15, "beta", 4) is None


def test_flux_shift_slack_is_one_table_entry(tiny_bundles):
    """The simple scheduler reads its t off ComfyUI's 10000-entry table: at 2048x2048 and 49 steps (49 does not
    divide 10000) the steep shift puts those sigmas 1e-3 from the pipeline's exact t, and that is no difference;
    a shift 0.01 off (ModelSamplingSD3 3.01, its step) is one, however small."""
    flux = tiny_bundles("flux")
    assert _schedule_notes(_flux_graph(2048, 2048, sampling=(2048, 2048), steps=49), flux) == []
    assert _schedule_notes(_flux_graph(2048, 2048, sampling=(2048, 2048), steps=1), flux) == []
    sd3 = tiny_bundles("sd3")
    graph = default_graph(seed=3, steps=28, cfg=4.5, scheduler="normal")
    graph["5"] = {"class_type": "EmptySD3LatentImage", "inputs": {"width": 1024, "height": 1024, "batch_size": 1}}
    graph["20"] = {"class_type": "ModelSamplingSD3", "inputs": {"shift": 3.01, "model": ["4", 0]}}
    graph["3"]["inputs"]["model"] = ["20", 0]
    (line,) = _schedule_notes(graph, sd3)
    assert line.startswith("scheduler normal with ModelSamplingSD3 20 shift 3.01 (sdcore's euler shifts by shift 3"), (
        line
    )
    graph["3"]["inputs"]["steps"] = 1  # normal over one step: torch.linspace's [start], sigma 1: the same
    assert _schedule_notes(graph, sd3) == []
    # a shift ComfyUI cannot run (0 divides 0 by 0 at t = 1): no sigmas to compare, said as such, no traceback
    graph["20"]["inputs"]["shift"] = 0.0
    assert _schedule_notes(graph, sd3) == [
        "scheduler normal with ModelSamplingSD3 20 (sdcore's euler runs the pipeline's sigmas, shift 3)"
    ]


@pytest.mark.parametrize(
    ("kind", "clip_type", "names", "expected"),
    [
        ("DualCLIPLoader", "flux", ["t5xxl_fp8_e4m3fn.safetensors", "clip_l.safetensors"],
         {"t5xxl": "t5xxl_fp8_e4m3fn.safetensors", "clip_l": "clip_l.safetensors"}),
        # zer0int's CLIP-L fine-tune says ViT-L; any CLIP-L beside a T5 in a FLUX loader is the CLIP-L
        ("DualCLIPLoader", "flux", ["ViT-L-14-TEXT-detail-improved-hiT-GmP-TE-only-HF.safetensors", "t5xxl_fp16.safetensors"],
         {"clip_l": "ViT-L-14-TEXT-detail-improved-hiT-GmP-TE-only-HF.safetensors", "t5xxl": "t5xxl_fp16.safetensors"}),
        ("DualCLIPLoader", "flux", ["flux\\t5\\google_t5-v1_1-xxl_encoderonly-fp8.safetensors", "my_clip.safetensors"],
         {"t5xxl": "flux\\t5\\google_t5-v1_1-xxl_encoderonly-fp8.safetensors", "clip_l": "my_clip.safetensors"}),
        ("DualCLIPLoader", "flux", ["a.safetensors", "b.safetensors"], None),
        ("DualCLIPLoader", "flux", ["clip_g.safetensors", "t5xxl_fp16.safetensors"], None),  # FLUX takes no CLIP-G
        ("DualCLIPLoader", "sd3", ["clip_l.safetensors", "clip_g.safetensors"],
         {"clip_l": "clip_l.safetensors", "clip_g": "clip_g.safetensors"}),
        ("DualCLIPLoader", "sd3", ["clip_l.safetensors", "other.safetensors"], None),  # CLIP-G or T5: cannot tell
        ("DualCLIPLoader", "sdxl", ["clip_l.safetensors", "clip_g.safetensors"], None),  # sdcore's SDXL: its own
        ("DualCLIPLoader", None, ["CLIP-L.safetensors", "open_clip_ViT-bigG-14.safetensors"],
         {"clip_l": "CLIP-L.safetensors", "clip_g": "open_clip_ViT-bigG-14.safetensors"}),
        ("CLIPLoader", "chroma", ["flan_t5_xxl_TE-only_FP16.safetensors"], {"t5xxl": "flan_t5_xxl_TE-only_FP16.safetensors"}),
        ("CLIPLoader", "chroma", ["encoder.safetensors"], {"t5xxl": "encoder.safetensors"}),
        ("CLIPLoader", "stable_diffusion", ["clip_l.safetensors"], None),
        ("CLIPLoader", "sd3", ["umt5_xxl_fp8.safetensors"], {"t5xxl": "umt5_xxl_fp8.safetensors"}),
        ("TripleCLIPLoader", None, ["clip_g.safetensors", "clip_l.safetensors", "t5xxl_fp16.safetensors"],
         {"clip_g": "clip_g.safetensors", "clip_l": "clip_l.safetensors", "t5xxl": "t5xxl_fp16.safetensors"}),
        ("TripleCLIPLoader", None, ["clip_l.safetensors", "x.safetensors", "t5xxl_fp16.safetensors"],
         {"clip_l": "clip_l.safetensors", "clip_g": "x.safetensors", "t5xxl": "t5xxl_fp16.safetensors"}),
        # a word inside another is no word: clip_gmp is not CLIP-G, bit5 not T5
        ("TripleCLIPLoader", None, ["clip_gmp.safetensors", "bit5.safetensors", "clip_l.safetensors"], None),
        ("TripleCLIPLoader", None, ["clip_l.safetensors", "clip_l_2.safetensors", "t5xxl.safetensors"], None),
    ],
)  # fmt: skip
def test_encoder_file_names_to_part_options(kind, clip_type, names, expected):
    from sdcore.generate.comfy_recall import _encoder_options

    assert _encoder_options(kind, clip_type, names) == expected


def test_comfy_flux_graph_regenerates_from_the_models_folder_alone(tmp_path):
    """ComfyUI's FLUX.1 example graph (UNETLoader, DualCLIPLoader, VAELoader) and ``--from-png`` with only
    ``--models-dir``: the loaders' files are looked up there as ``--model``/``--t5xxl``/``--clip-l``/``--ae``,
    nothing is said, and the image is the typed one's, pixel-equal."""
    from comfy_flux_tree import write_flux_tree

    models = write_flux_tree(tmp_path / "ComfyUI" / "models")
    graph = _flux_graph(32, 48, sampling=(32, 48), steps=2, seed=11)
    graph["6"]["inputs"]["text"] = "a lighthouse at dusk"
    png = comfy_png(tmp_path / "comfy.png", graph)
    common = ["--models-dir", str(models), "--device", "cpu"]
    result = _invoke(["--from-png", str(png), *common, "-o", str(tmp_path / "recalled.png")])
    assert result.exit_code == 0, result.output
    assert not [line for line in result.output.splitlines() if "ignored" in line or "warning" in line], result.output
    typed = ["a lighthouse at dusk", "--seed", "11", "--steps", "2", "--cfg", "3.5", "--sampler", "euler", "--size",
             "32x48", "-m", "flux1-dev", "--t5xxl", "t5xxl_fp16", "--clip-l", "clip_l", "--ae", "ae"]  # fmt: skip
    result = _invoke([*typed, *common, "-o", str(tmp_path / "typed.png")])
    assert result.exit_code == 0, result.output
    with Image.open(tmp_path / "recalled.png") as a, Image.open(tmp_path / "typed.png") as b:
        pixels = np.asarray(a.convert("RGB"))
        assert pixels.std() > 0 and np.array_equal(pixels, np.asarray(b.convert("RGB")))
        recalled_params, typed_params = parse_parameters(a.info["parameters"]), parse_parameters(b.info["parameters"])
    assert recalled_params == typed_params and recalled_params.size == (32, 48)
    # a name the folder does not hold is the part option's one-line error, before any model loads; the user typed
    # no --t5xxl: the error names the graph's loader first and ends saying to pass the option, as the model's does
    graph["11"]["inputs"]["clip_name1"] = "t5xxl_fp8_e4m3fn.safetensors"
    png = comfy_png(tmp_path / "other.png", graph)
    result = _invoke(["--from-png", str(png), *common, "-o", str(tmp_path / "x.png")])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    said, error = result.output.splitlines()
    assert said.startswith("model from the PNG: ") and said.endswith("(the graph's unet_name flux1-dev.safetensors)")
    assert error.startswith(
        "Error: --from-png: a file the PNG's graph loads (DualCLIPLoader (t5xxl_fp8_e4m3fn.safetensors, "
        "clip_l.safetensors: --clip-l/--t5xxl)): --t5xxl t5xxl_fp8_e4m3fn.safetensors: no such file or folder"
    ), error
    assert error.endswith("; pass --t5xxl (the file's path or name) to choose one"), error
    # typed, the same name's error is the option's own, without the graph
    result = _invoke(["--from-png", str(png), *common, "--t5xxl", "t5xxl_fp8_e4m3fn", "-o", str(tmp_path / "x.png")])
    assert result.exit_code == 2 and result.output.splitlines()[-1].startswith(
        "Error: --t5xxl t5xxl_fp8_e4m3fn: no such file or folder"
    ), result.output


def test_flow_schedule_of_an_img2img_is_the_whole_one():
    """ComfyUI's img2img cuts the last steps of an int(steps / denoise)-step schedule, sdcore's the same
    --steps: that schedule is the one compared, not the graph's steps."""
    graph = default_graph(denoise=0.5, steps=20, scheduler="simple")
    graph["10"] = {"class_type": "LoadImage", "inputs": {"image": "photo.png", "upload": "image"}}
    graph["11"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["4", 2]}}
    graph["3"]["inputs"]["latent_image"] = ["11", 0]
    del graph["5"]
    recalled = recall_comfy(json.dumps(graph))
    assert recalled.values["steps"] == 40 and recalled.flow_schedule.__self__.steps == 40
