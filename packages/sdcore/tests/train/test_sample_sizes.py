"""Training samples as each source tool renders them: the size rounded by the prompt file's own tool (kohya,
OneTrainer, ai-toolkit), a size the model still cannot take refused in the pre-flight, a bare OneTrainer samples
list read for the family being trained, and the sampler the infotext names being the one that ran.

The expected sizes are the references' rules rewritten here (commits: kohya sd-scripts 48d368f, OneTrainer 23df383,
ai-toolkit 27a03a9), not sdcore's table."""

from __future__ import annotations

import json

import pytest
from runtime_methods import ProjOutMethod
from sdcore.testing.contract import contract_options
from sdcore.train.options import TrainOptions
from sdcore.train.preflight import option_problems
from sdcore.train.sample_prompts import (
    AITOOLKIT,
    KOHYA,
    ONETRAINER,
    parse_prompt_line,
    read_sample_prompts,
    sample_size,
)


def kohya_floor(x: int, multiple: int) -> int:
    # library/train_util.py:6540-6541 (8), sd3_train_utils.py:513-514 (8), flux_train_utils.py:180-181 (16)
    return max(64, x - x % multiple)


def onetrainer_quantize(x: int, multiple: int) -> int:
    # modules/modelSampler/BaseModelSampler.py:77-78
    return round(x / multiple) * multiple


def aitoolkit_size(x: int, family: str) -> int:
    # toolkit/config_modules.py:1216-1217, then FluxPipeline.prepare_latents' 2 * (x // 16) latent (diffusers)
    x = max(64, x - x % 8)
    return x - x % 16 if family in ("flux", "chroma") else x


#: the multiple each tool's sampler of each family rounds to (file:line in the references)
KOHYA_MULTIPLE = {"sd1": 8, "sd2": 8, "sdxl": 8, "sd3": 8, "flux": 16, "chroma": 16}
ONETRAINER_MULTIPLE = {
    "sd1": 8,  # StableDiffusionSampler.py:380-381
    "sd2": 8,
    "sdxl": 64,  # StableDiffusionXLSampler.py:444-445
    "sd3": 16,  # StableDiffusion3Sampler.py:166-167
    "flux": 64,  # FluxSampler.py:397-398
    "chroma": 64,  # ChromaSampler.py:166-167
}
SIDES = [1, 20, 31, 32, 33, 63, 64, 65, 72, 100, 500, 511, 512, 513, 767, 1000, 1001, 1015, 1024, 1056, 1088, 1120]


@pytest.mark.parametrize("family", sorted(KOHYA_MULTIPLE))
def test_each_tool_rounds_a_samples_size_by_its_own_rule(family):
    for side in SIDES:
        other = 1000
        assert sample_size(side, other, KOHYA, family) == (
            kohya_floor(side, KOHYA_MULTIPLE[family]),
            kohya_floor(other, KOHYA_MULTIPLE[family]),
        )
        assert sample_size(other, side, ONETRAINER, family) == (
            onetrainer_quantize(other, ONETRAINER_MULTIPLE[family]),
            onetrainer_quantize(side, ONETRAINER_MULTIPLE[family]),
        )
        assert sample_size(side, side, AITOOLKIT, family) == (aitoolkit_size(side, family),) * 2


def test_the_rules_differ_where_the_tools_do():
    """The cases the rules exist for: OneTrainer's width 1000 on FLUX.1 (a Flux side must be a multiple of 16) and
    Python's half-to-even round on SDXL; kohya's floor and its least side of 64."""
    assert sample_size(1000, 1000, ONETRAINER, "flux") == (1024, 1024)
    assert sample_size(1056, 1120, ONETRAINER, "sdxl") == (1024, 1152)  # 16.5 -> 16, 17.5 -> 18
    assert sample_size(20, 1000, ONETRAINER, "sdxl") == (0, 1024)  # OneTrainer would render nothing
    assert sample_size(1000, 1015, KOHYA, "flux") == (992, 1008)
    assert sample_size(1000, 1015, KOHYA, "sd3") == (1000, 1008)  # kohya's SD3 samples floor to 8
    assert sample_size(40, 1001, KOHYA, "sd1") == (64, 1000)
    assert sample_size(1000, 1004, AITOOLKIT, "flux") == (992, 992)
    assert sample_size(1000, 1004, AITOOLKIT, "sdxl") == (1000, 1000)


def _onetrainer_samples(tmp_path, *samples):
    path = tmp_path / "samples.json"
    path.write_text(json.dumps(list(samples)), encoding="utf-8")
    return path


def test_the_preflight_lists_every_sample_size_the_model_cannot_take(tmp_path):
    """kohya floors SD3 samples to 8 only, so --w 1000 stays 1000 and an SD3 model needs 16; OneTrainer's
    nearest-64 makes a side of 20 on SDXL 0: one line each, all at once, before anything loads."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a ring --w 1000 --h 1024\na cup --w 1024 --h 1024\na box --w 72 --h 1004\n", encoding="utf-8")
    o = TrainOptions(model="tiny:sd3", data=str(tmp_path), sample_prompts=str(prompts), sample_every=1)
    lines = [p for p in option_problems(o) if "renders sides" in p]
    assert lines == [
        "--sample-prompts: sample 1 ('a ring') is 1000x1024; Stable Diffusion 3 / 3.5 renders sides that are "
        "multiples of 16: give a size such as 992x1024",
        "--sample-prompts: sample 3 ('a box') is 72x1004; kohya rounds down to a multiple of 8: 72x1000; Stable "
        "Diffusion 3 / 3.5 renders sides that are multiples of 16: give a size such as 64x992",
    ]
    samples = _onetrainer_samples(
        tmp_path, {"prompt": "a thin strip", "width": 20, "height": 1000, "diffusion_steps": 2}
    )
    o = TrainOptions(model="tiny:sdxl", data=str(tmp_path), sample_prompts=str(samples), sample_every=1)
    assert [p for p in option_problems(o) if "renders sides" in p] == [
        "--sample-prompts: sample 1 ('a thin strip') is 20x1000; OneTrainer rounds to the nearest multiple of 64: "
        "0x1024; Stable Diffusion XL renders sides that are multiples of 8: give a size such as 64x1000"
    ]
    # OneTrainer's width 1000 on FLUX.1 (which stopped the run at its first sample) is 1024 by its rule: no line
    samples = _onetrainer_samples(tmp_path, {"prompt": "a ring", "width": 1000, "height": 1000, "diffusion_steps": 2})
    o = TrainOptions(model="tiny:flux", data=str(tmp_path), sample_prompts=str(samples), sample_every=1)
    assert not [p for p in option_problems(o) if "renders sides" in p]


def test_a_bare_onetrainer_samples_list_is_read_for_the_family_being_trained(tmp_path):
    """No ``model_type`` in a bare list: OneTrainer reads its samples for the model it trains, so on FLUX.1
    ``cfg_scale`` is the embedded guidance (FluxSampler gives it to the guidance input) and the defaults are
    Flux's (SampleConfig._get_model_defaults); on SD 1.5 it is the CFG scale; a config's own model_type wins."""
    samples = _onetrainer_samples(tmp_path, {"prompt": "a ring", "cfg_scale": 4.5, "negative_prompt": "blurry"})
    (flux,) = read_sample_prompts(str(samples), "flux")
    assert (flux.guidance, flux.cfg, flux.sampler, flux.source) == (4.5, None, None, ONETRAINER)
    assert (flux.width, flux.height, flux.steps) == (1024, 1024, 30)
    (sd1,) = read_sample_prompts(str(samples), "sd1")
    assert (sd1.guidance, sd1.cfg, sd1.sampler, sd1.width) == (None, 4.5, "euler_a", 512)
    (unknown,) = read_sample_prompts(str(samples))  # the family cannot be told: SampleConfig's model-less defaults
    assert (unknown.guidance, unknown.cfg, unknown.width) == (None, 4.5, 512)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"training_method": "LORA", "model_type": "STABLE_DIFFUSION_15",
                                  "samples": [{"prompt": "a ring", "cfg_scale": 4.5}]}), encoding="utf-8")  # fmt: skip
    (configured,) = read_sample_prompts(str(config), "flux")
    assert (configured.cfg, configured.guidance) == (4.5, None)


def test_a_onetrainer_sample_on_flux_renders_at_onetrainers_size_with_its_guidance_and_the_euler_it_names(
    tmp_path, monkeypatch
):
    """A bare OneTrainer list on FLUX.1: width 72 (not a Flux size) renders at OneTrainer's nearest 64, cfg_scale is
    the embedded guidance (no true CFG, so no refusal about --l), and the infotext names the flow Euler that ran,
    as ``sdcore generate`` names a FLUX.1 image made with its default sampler."""
    import sdcore.generate.flow_samplers as flow_samplers
    from PIL import Image
    from sdcore.generate.pnginfo import parse_parameters
    from sdcore.models.family import default_sampler, family_adapter
    from sdcore.train.loop import TrainSession

    ran: list[str] = []
    real = flow_samplers.flow_scheduler

    def spy(config, sampler="euler", **kwargs):
        ran.append(sampler)
        return real(config, sampler, **kwargs)

    monkeypatch.setattr(flow_samplers, "flow_scheduler", spy)
    samples = _onetrainer_samples(tmp_path, {"prompt": "a ring", "width": 72, "height": 100, "cfg_scale": 4.5,
                                             "diffusion_steps": 2, "seed": 3, "negative_prompt": "blurry"})  # fmt: skip
    options = {"max_steps": 1, "save_state": False, "sample_prompts": str(samples)}
    o = contract_options(ProjOutMethod, tmp_path, options, family="flux")
    assert not [p for p in option_problems(o) if "sample" in p]
    TrainSession(ProjOutMethod(o), bundle=None).run()
    (grid,) = (tmp_path / o.output).parent.glob("*-samples/*.png")
    params = parse_parameters(Image.open(grid).info["parameters"])
    assert params.size == (round(72 / 64) * 64, round(100 / 64) * 64) == (64, 128)
    assert (params.cfg, params.extra["Distilled CFG Scale"], params.seed, params.steps) == (1.0, "4.5", 3, 2)
    assert params.negative_prompt == ""  # OneTrainer's FluxSampler runs no negative pass either
    generate_sampler = default_sampler(family_adapter("flux"))  # what sdcore generate renders and writes
    assert params.sampler == generate_sampler == "euler" and set(ran) == {"euler"}
    assert "Sampler: Euler," in Image.open(grid).info["parameters"]


def test_kohya_and_ai_toolkit_samples_render_at_their_tools_sizes():
    """The sizes the render's generate calls get on FLUX.1 and SD 1.5 (no rendering): each prompt's tool's rule,
    the run's --resolution included where a prompt gives no size."""
    from dataclasses import replace

    from sdcore.models.flux.adapter import FluxAdapter
    from sdcore.models.tiny import create_tiny_bundle
    from sdcore.train.sampling import _generations

    kohya = parse_prompt_line("a ring --w 100 --h 40")
    prompts = [kohya, replace(kohya, source=AITOOLKIT), parse_prompt_line("a cup")]
    options = TrainOptions(sample_prompts="x", resolution=1000)
    for family, sizes in (
        ("flux", [(kohya_floor(100, 16), 64), (aitoolkit_size(100, "flux"), 64), (992, 992)]),
        ("sd1", [(kohya_floor(100, 8), 64), (aitoolkit_size(100, "sd1"), 64), (1000, 1000)]),
    ):
        bundle = FluxAdapter().create_tiny(variant="dev", seed=0) if family == "flux" else create_tiny_bundle(family)
        generations = _generations(bundle, options, prompts, {})[2]
        assert [(a["width"], a["height"]) for _, a in generations] == sizes
    assert (kohya_floor(100, 16), kohya_floor(100, 8)) == (96, 96)


def test_the_preflight_reads_the_family_of_a_hub_id_from_the_local_cache(tmp_path, monkeypatch):
    """A Hub id already in the local cache (how SD3/FLUX.1 are usually given) has its family read from the cached
    configs, as ``peek_family`` reads it (``local_files_only``: no network), so kohya's ``--w 1000`` on SD3 (kohya
    floors SD3 samples to 8 only: library/sd3_train_utils.py:513-514) is a pre-flight line there too, and a
    Kontext reference with that model is refused as before, instead of stopping the run at its first sample."""
    import huggingface_hub.constants as hf_constants
    from sdcore.models.family import family_adapter

    cache = tmp_path / "hub"
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--someone--tiny-sd3"
    family_adapter("sd3").create_tiny(seed=0).save(repo / "snapshots" / revision, format="diffusers")
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a ring --w 1000 --h 1024\n", encoding="utf-8")
    o = TrainOptions(model="someone/tiny-sd3", data=str(tmp_path), sample_prompts=str(prompts), sample_every=1)
    assert [p for p in option_problems(o) if "renders sides" in p] == [
        "--sample-prompts: sample 1 ('a ring') is 1000x1024; Stable Diffusion 3 / 3.5 renders sides that are "
        "multiples of 16: give a size such as 992x1024"
    ]
    from PIL import Image

    Image.new("RGB", (64, 64)).save(tmp_path / "ref.png")
    prompts.write_text(f"a ring --w 1024 --h 1024 --ctrl_img {tmp_path / 'ref.png'}\n", encoding="utf-8")
    assert [p for p in option_problems(o) if "Kontext" in p] == [
        "--sample-prompts: --ctrl_img/--ci is FLUX.1 Kontext's reference image; a sd3 model takes none"
    ]
    # a Hub id that is not in the cache: no family, no size line (the loader says the model is missing)
    o = TrainOptions(model="someone/not-cached", data=str(tmp_path), sample_prompts=str(prompts), sample_every=1)
    assert not [p for p in option_problems(o) if "renders sides" in p or "Kontext" in p]
