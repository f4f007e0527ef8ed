"""ai-toolkit full fine-tunes (a job without ``network``) read by ``sdcore train dreambooth --config job.yaml``:
``save.save_format`` and ``model.only_if_contains``/``ignore_if_contains``.

Facts from ai-toolkit (commit in tests/data/ai_toolkit/README.md): ``BaseSDTrainProcess.save`` writes a LoRA as
``<name>.safetensors`` whatever ``save_format`` says, a fine-tune as a diffusers folder ``<name>`` (the suffix
dropped) or one file; ``config_modules.validate_configs`` forces diffusers on is_flux (Flex.1 included);
Chroma's ``save_model`` always writes one .safetensors. ``StableDiffusion.named_parameters`` filters the denoiser's
``transformer.<path>`` names by the model lists, read by ``prepare_optimizer_params`` only without a network."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

DATA = Path(__file__).parent / "data" / "ai_toolkit"
EXAMPLE = DATA / "train_full_fine_tune_flex.yaml"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _load(path, notes=None, lora=False):
    from sdcore.train.config import load_options
    from sdplugin_dreambooth.options import DreamBoothOptions
    from sdplugin_lora.method import LoraOptions

    return load_options(LoraOptions if lora else DreamBoothOptions, path, notes=notes if notes is not None else [])


def _problems(path, lora=False) -> list[str]:
    from sdcore.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        _load(path, lora=lora)
    return info.value.problems


def _job(tmp_path, process: dict, name: str = "run") -> Path:
    path = tmp_path / "job.yaml"
    data = {"job": "extension", "config": {"name": name, "process": [{"type": "sd_trainer", **process}]}}
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def _without_filter(tmp_path) -> Path:
    data = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    assert data["config"]["process"][0]["model"].pop("only_if_contains")
    path = tmp_path / EXAMPLE.name
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def test_flex_fine_tune_example_is_refused_for_its_parameter_filter_alone():
    problems = _problems(EXAMPLE)
    assert len(problems) == 1, problems
    assert "process.model.only_if_contains = ['transformer.transformer_blocks.'" in problems[0]
    assert "DreamBooth has no parameter filter" in problems[0] and "network.network_kwargs" in problems[0]


def test_flex_fine_tune_example_without_the_filter_saves_a_diffusers_folder(tmp_path):
    o = _load(_without_filter(tmp_path))
    assert o.save_format == "diffusers"
    assert Path(o.output) == Path("output/my_first_flex_finetune_v1/my_first_flex_finetune_v1")  # no suffix
    assert (o.lr, o.optimizer, o.max_steps, o.save_every, o.save_limit) == (3e-5, "adafactor", 2000, 250, 2)
    assert (o.ema, o.ema_decay, o.bypass_guidance_embedding, o.train_text_encoder) == (True, 0.99, True, False)


FLAGS = {"sd1": {}, "sdxl": {"is_xl": True}, "flux": {"is_flux": True}, "chroma": {"arch": "chroma"}}


@pytest.mark.parametrize(
    ("family", "fmt", "want", "noted"),
    [
        ("sd1", "diffusers", "diffusers", None),
        ("sd1", "safetensors", "single-file", None),
        ("sdxl", "diffusers", "diffusers", None),
        ("flux", "safetensors", "diffusers", "writes a flux fine-tune as a diffusers folder whatever it says"),
        ("chroma", "diffusers", "single-file", "writes a chroma fine-tune as one .safetensors file"),
    ],
)
def test_save_format_of_a_fine_tune(tmp_path, family, fmt, want, noted):
    model = {"name_or_path": "base", **FLAGS[family]}
    path = _job(tmp_path, {"model": model, "datasets": [{"folder_path": "imgs"}], "save": {"save_format": fmt}})
    notes: list[str] = []
    o = _load(path, notes)
    assert o.save_format == want
    assert Path(o.output).suffix == ("" if want == "diffusers" else ".safetensors")
    if noted:
        assert any(noted in n for n in notes), notes


def test_lora_jobs_ignore_the_fine_tune_fields_as_ai_toolkit(tmp_path):
    process = {"model": {"name_or_path": "tiny:sd1", "only_if_contains": ["unet.down_blocks"]},
               "network": {"type": "lora", "linear": 4}, "datasets": [{"folder_path": "imgs"}],
               "save": {"save_format": "diffusers"}}  # fmt: skip
    notes: list[str] = []
    o = _load(_job(tmp_path, process), notes, lora=True)
    assert o.layer_filter in ("", None) and Path(o.output).suffix == ".safetensors"
    assert any("model.only_if_contains: ai-toolkit reads it for full fine-tunes only" in n for n in notes)
    assert any("ai-toolkit writes a LoRA as .safetensors anyway" in n for n in notes)
    # the same job given to dreambooth: a LoRA job, said so once (no LoRA option is reported as foreign)
    problems = _problems(_job(tmp_path, {**process, "model": {"name_or_path": "tiny:sd1"}}))
    assert problems == [f"{tmp_path / 'job.yaml'}: process.network: ai-toolkit trains this LoRA network; run the job "
                        "with `sdcore train lora`"]  # fmt: skip


def test_a_job_without_network_is_a_fine_tune_refused_by_lora(tmp_path):
    """BaseSDTrainProcess: get_conf('network', None) is None -> no network, prepare_optimizer_params trains the
    denoiser (and the text encoders with train.train_text_encoder). `sdcore train lora` refuses it with the right
    command instead of training a LoRA with NetworkConfig's defaults; dreambooth reads the same job."""
    process = {"model": {"name_or_path": "tiny:sd1"}, "datasets": [{"folder_path": "imgs"}],
               "train": {"lr": 2e-5, "train_text_encoder": True}}  # fmt: skip
    path = _job(tmp_path, process)
    assert _problems(path, lora=True) == [f"{path}: process: this job fine-tunes the whole model (no network "
                                          f"section): run it with sdcore train dreambooth --config {path}"]  # fmt: skip
    o = _load(path)
    assert (o.lr, o.train_text_encoder, o.model) == (2e-5, True, "tiny:sd1")
    for section in (None, {}):  # `network:` written empty is null (a fine-tune); `network: {}` is a default LoRA
        path = _job(tmp_path, {**process, "network": section})
        if section is None:
            assert "this job fine-tunes the whole model" in " ".join(_problems(path, lora=True))
            assert _load(path).lr == 2e-5
        else:
            assert (_load(path, lora=True).rank, _load(path, lora=True).alpha) == (4, 1.0)  # NetworkConfig's
            assert _problems(path) == [f"{path}: process.network: ai-toolkit trains this LoRA network; run the job "
                                       "with `sdcore train lora`"]  # fmt: skip


def test_ignore_if_contains_on_sdxl_names_block_lr(tmp_path):
    model = {"name_or_path": "base", "is_xl": True, "ignore_if_contains": ["unet.up_blocks"]}
    problems = _problems(_job(tmp_path, {"model": model, "datasets": [{"folder_path": "imgs"}]}))
    assert len(problems) == 1 and "whose name lacks one of them" in problems[0] and "--block-lr" in problems[0]


def test_a_fine_tune_job_trains_and_saves_a_diffusers_folder(tmp_path, sd_cli, pm, monkeypatch):
    """`sdcore train dreambooth --config job.yaml` on a tiny SD1: 2 steps, the model written where ai-toolkit
    writes its diffusers save (<training_folder>/<name>/<name>/); `sdcore train lora` refuses the job first."""
    from sdcore.testing.datasets import make_tiny_dataset

    monkeypatch.chdir(tmp_path)
    make_tiny_dataset(tmp_path / "data", n=2, size=64)
    process = {
        "training_folder": "out", "save": {"dtype": "float32", "save_every": 100, "save_format": "diffusers"},
        "datasets": [{"folder_path": "data/1_sks", "caption_ext": "txt", "resolution": [64]}],
        "train": {"steps": 2, "lr": 1e-4, "optimizer": "adamw", "gradient_checkpointing": False,
                  "skip_first_sample": True},
        "model": {"name_or_path": "tiny:sd1"},
    }  # fmt: skip
    path = _job(tmp_path, process, name="tinyft")
    refused = sd_cli(["train", "lora", "--config", str(path), "--no-progress"], pm=pm)  # no network: not a LoRA
    assert refused.exit_code != 0 and "Traceback" not in refused.output
    assert f"run it with sdcore train dreambooth --config {path}" in refused.output
    assert not (tmp_path / "out").exists()
    result = sd_cli(["train", "dreambooth", "--config", str(path), "--no-progress"], pm=pm)
    assert result.exit_code == 0, result.output + repr(result.exception)
    folder = tmp_path / "out" / "tinyft" / "tinyft"
    assert (folder / "model_index.json").is_file() and (folder / "unet").is_dir()
    assert not (tmp_path / "out" / "tinyft" / "tinyft.safetensors").exists()
