"""ostris/ai-toolkit job files read by ``sdcore train lora --config job.yaml`` (sdcore.train.aitoolkit).

Expected values are ai-toolkit's meanings, taken from its ``toolkit/config_modules.py`` defaults and
``jobs/process/BaseSDTrainProcess.py`` (commit in tests/data/ai_toolkit/README.md), not from sdcore.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data" / "ai_toolkit"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _load(path, notes=None):
    from sdcore.train.config import load_options
    from sdplugin_lora.method import LoraOptions

    return load_options(LoraOptions, path, notes=notes if notes is not None else [])


def _problems(path) -> list[str]:
    from sdcore.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        _load(path)
    return info.value.problems


def _job(tmp_path, process: dict, name: str = "run", suffix: str = ".yaml", text: str | None = None) -> Path:
    import yaml

    path = tmp_path / f"job{suffix}"
    data = {"job": "extension", "config": {"name": name, "process": [{"type": "sd_trainer", **process}]}}
    if text is None:
        text = json.dumps(data) if suffix == ".json" else yaml.safe_dump(data)
    path.write_text(text, encoding="utf-8")
    return path


#: a LoRA job: ai-toolkit trains a network only when the job has a network section (none: a full fine-tune)
LORA = {"type": "lora", "linear": 16, "linear_alpha": 16}
BASE = {"model": {"name_or_path": "tiny:sd1"}, "network": LORA, "datasets": [{"folder_path": "imgs"}]}
FLUX = {"model": {"name_or_path": "tiny:flux", "is_flux": True}, "network": LORA, "datasets": [{"folder_path": "imgs"}]}


def _patched(tmp_path, name: str, old: str, new: str) -> Path:
    text = (DATA / name).read_text(encoding="utf-8")
    assert old in text
    path = tmp_path / name
    path.write_text(text.replace(old, new), encoding="utf-8")
    return path


# --- the example jobs -------------------------------------------------------------------------------


def test_flux_example_translates_with_ai_toolkit_meanings():
    """train_lora_flux_24gb.yaml loads unmodified and every field lands, its EMA included."""
    path = DATA / "train_lora_flux_24gb.yaml"
    notes: list[str] = []
    o = _load(path, notes)
    # ema_config {use_ema: true, ema_decay: 0.99}: ai-toolkit's EMA has no decay warm-up (no use_num_updates)
    assert (o.ema, o.ema_decay, o.ema_warmup, o.ema_update_every) == (True, 0.99, "none", 1)
    assert o.model == "black-forest-labs/FLUX.1-dev"
    assert Path(o.output) == Path("output/my_first_flux_lora_v1/my_first_flux_lora_v1.safetensors")
    assert (o.algo, o.rank, o.alpha) == ("lora", 16, 16.0)
    assert (o.key_layout, o.split_qkv) == ("diffusers", True)  # ai-toolkit's PEFT keys, q/k/v apart
    assert (o.lr, o.optimizer, o.optimizer_args) == (1e-4, "adamw8bit", "eps=1e-06")
    assert (o.max_steps, o.batch_size, o.gradient_accumulation) == (2000, 1, 1)
    assert (o.mixed_precision, o.save_dtype, o.save_every, o.save_limit) == ("bf16", "fp16", 250, 4)
    assert o.gradient_checkpointing and o.fp8_base and o.cache_latents_to_disk and not o.train_text_encoder
    # timestep_type sigmoid: an index of a table of 1000 sorted sigmoid draws (its default range [0, 999))
    assert (o.timestep_sampling, o.sigmoid_scale, o.discrete_flow_shift) == ("sigmoid_table", 1.0, 1.0)
    assert (o.min_table_index, o.max_table_index, o.timestep_loss_weight) == (0, 999, "none")
    assert (o.model_prediction_type, o.guidance_scale) == ("raw", 1.0)
    assert o.data == str(path) and o.sample_prompts == str(path)
    assert (o.sample_every, o.sample_steps, o.sample_at_first) == (250, 20, True)
    assert any("process.device" in n for n in notes) and any("model.quantize" in n for n in notes)


def test_flex_example_trains_with_the_guidance_embedding_bypassed():
    """train_lora_flex_24gb.yaml (Ostris' Flex.1-alpha, is_flux) loads unmodified: its
    bypass_guidance_embedding is sdcore's --bypass-guidance-embedding; the rest as the Flux example."""
    path = DATA / "train_lora_flex_24gb.yaml"
    o = _load(path)
    assert o.bypass_guidance_embedding and o.model == "ostris/Flex.1-alpha"
    assert (o.key_layout, o.split_qkv, o.rank, o.alpha) == ("diffusers", True, 16, 16.0)
    assert (o.timestep_sampling, o.lr, o.max_steps, o.mixed_precision) == ("sigmoid_table", 1e-4, 2000, "bf16")
    assert (o.ema, o.ema_decay, o.fp8_base) == (True, 0.99, True)
    assert o.base_weights_exclude == "*time_text_embed*"  # quantize_kwargs exclude: that embedder stays as it is
    assert not _load(DATA / "train_lora_flux_24gb.yaml").bypass_guidance_embedding


def test_use_flux_cfg_bypasses_the_guidance_embedding_on_flux_only(tmp_path):
    """config_modules.validate_configs: model.use_flux_cfg on Flux sets bypass_guidance_embedding (its
    samples differ: a note); on other families neither field has an effect in ai-toolkit (a note)."""
    flux = {"model": {"name_or_path": "flux.safetensors", "is_flux": True, "use_flux_cfg": True}, "network": LORA,
            "datasets": [{"folder_path": "imgs"}]}  # fmt: skip
    notes: list[str] = []
    assert _load(_job(tmp_path, flux), notes).bypass_guidance_embedding
    assert any("model.use_flux_cfg: trains with the guidance embedding bypassed" in n for n in notes), notes
    sd3 = {"model": {"name_or_path": "sd3.safetensors", "is_v3": True}, "train": {"bypass_guidance_embedding": True},
           "network": LORA, "datasets": [{"folder_path": "imgs"}]}  # fmt: skip
    notes = []
    assert not _load(_job(tmp_path, sd3), notes).bypass_guidance_embedding
    assert any("train.bypass_guidance_embedding: no effect on sd3" in n for n in notes), notes


def test_sd35_example_uses_linear_timesteps():
    o = _load(DATA / "train_lora_sd35_large_24gb.yaml")  # loads unmodified, its EMA on
    assert (o.ema, o.ema_decay) == (True, 0.99)
    assert o.model == "stabilityai/stable-diffusion-3.5-large"
    # timestep_type linear: an index drawn uniformly from linspace(1000, 1, 1000), unshifted (ai-toolkit's table)
    assert (o.timestep_sampling, o.discrete_flow_shift, o.dynamic_timestep_shift) == ("linear_table", 1.0, False)
    assert (o.key_layout, o.split_qkv, o.alpha) == ("diffusers", True, 16.0)
    assert o.sample_steps == 25


def test_chroma_example_loads_with_the_sigmoid_table():
    o = _load(DATA / "train_lora_chroma_24gb.yaml")  # arch chroma: sdcore's Chroma family, unmodified
    assert o.model == "lodestones/Chroma"
    assert (o.timestep_sampling, o.min_table_index, o.max_table_index) == ("sigmoid_table", 0, 999)


def test_kontext_example_loads_unmodified_with_its_controls_and_weighted_timesteps():
    """train_lora_flux_kontext_24gb.yaml: arch flux_kontext trains the Flux family on its control_path pairs,
    timestep_type weighted is the linear table with ai-toolkit's measured loss weights, and its sample prompts
    keep their --ctrl_img reference images."""
    from sdcore.train.aitoolkit import load_datasets
    from sdcore.train.sample_prompts import read_sample_prompts

    path = DATA / "train_lora_flux_kontext_24gb.yaml"
    o = _load(path)
    assert o.model == "black-forest-labs/FLUX.1-Kontext-dev"
    assert (o.timestep_sampling, o.timestep_loss_weight) == ("linear_table", "weighted_table")
    assert (o.rank, o.alpha, o.lr, o.max_steps, o.optimizer) == (16, 16.0, 1e-4, 3000, "adamw8bit")
    assert o.gradient_checkpointing and o.fp8_base and not o.train_text_encoder
    subsets = load_datasets(path, None)  # one per resolution, [512, 768]
    assert len(subsets) == 2 and {s.control_dir for s in subsets} == {Path("/path/to/control/folder")}
    prompts = read_sample_prompts(str(path))
    assert prompts[0].prompt == "make the person smile"
    assert {str(p.reference) for p in prompts} == {"/path/to/control/folder/person1.jpg"}


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("train_lora_lumina.yaml", "process.model: is_lumina2: sdcore does not train this model family"),
        ("train_lora_wan21_1b_24gb.yaml", "process.model.arch 'wan21': sdcore does not train this model family"),
        ("train_lora_qwen_image_24gb.yaml", "process.model.arch 'qwen_image'"),
        ("train_lora_hidream_48.yaml", "process.model.arch 'hidream': sdcore does not train this model family"),
        ("train_lora_flux_schnell_24gb.yaml", "sdcore reads no model hub"),
        ("sd_trainer_train.example.yaml", "process type(s) textual_inversion_trainer"),
    ],
)
def test_examples_sdcore_cannot_train_are_refused_by_name(name, expected):
    problems = _problems(DATA / name)
    assert any(expected in p for p in problems), problems
    assert all(p.startswith(f"{DATA / name}: ") for p in problems)


def test_every_example_file_is_an_ai_toolkit_job():
    from sdcore.train.aitoolkit import read_job

    files = sorted(DATA.glob("*.yaml"))
    assert len(files) == 12
    for path in files:
        assert read_job(path) is not None, path


# --- the rules ----------------------------------------------------------------------------------------


def test_ai_toolkit_defaults_apply_where_the_job_is_silent(tmp_path):
    """config_modules.py: lr 1e-6, steps 1000, rank 4 with alpha 1.0, fp32, AdamW eps 1e-6, save every
    1000 keeping 5, float16 files; kohya layout for SD1. The network section names only its type, so its rank
    and alpha are NetworkConfig's."""
    silent = {**BASE, "network": {"type": "lora"}}
    o = _load(_job(tmp_path, silent))
    assert (o.lr, o.max_steps, o.rank, o.alpha, o.algo) == (1e-6, 1000, 4, 1.0, "lora")
    assert (o.mixed_precision, o.optimizer, o.optimizer_args) == ("no", "adamw", "eps=1e-06")
    assert (o.save_every, o.save_limit, o.save_dtype, o.lr_scheduler) == (1000, 5, "fp16", "constant")
    assert (o.key_layout, o.split_qkv, o.gradient_checkpointing) == ("kohya", False, True)
    assert o.sample_prompts is None or o.sample_prompts == ""  # no prompts: no sampling
    assert Path(o.output) == Path("output/run/run.safetensors")
    as_json = _load(_job(tmp_path, {**silent, "train": {"lr": 2e-4}}, suffix=".json"))  # ai-toolkit reads JSON jobs too
    assert (as_json.lr, as_json.rank, as_json.data) == (2e-4, 4, str(tmp_path / "job.json"))


def test_ema_config_becomes_sdcore_ema(tmp_path):
    """EMAConfig: use_ema (default False) with ema_decay (default 0.999); the trainer builds its
    ExponentialMovingAverage without use_num_updates, so the decay applies from the first update.
    use_feedback and param_multiplier change the trained weights themselves: sdcore has neither."""
    assert _load(_job(tmp_path, BASE)).ema is False
    o = _load(_job(tmp_path, {**BASE, "train": {"ema_config": {"use_ema": True}}}))
    assert (o.ema, o.ema_decay, o.ema_warmup) == (True, 0.999, "none")
    off = _load(_job(tmp_path, {**BASE, "train": {"ema_config": {"use_ema": False, "ema_decay": 0.9}}}))
    assert off.ema is False and off.ema_decay == 0.999
    ema = {"use_ema": True, "use_feedback": True, "param_multiplier": 0.99}
    problems = _problems(_job(tmp_path, {**BASE, "train": {"ema_config": ema}}))
    assert sorted(p.split(": ", 1)[1] for p in problems) == [
        "process.train.ema_config.param_multiplier = 0.99: sdcore does not implement this ai-toolkit field (only its "
        "default 1.0 is accepted)",
        "process.train.ema_config.use_feedback = True: sdcore does not implement this ai-toolkit field (only its "
        "default False is accepted)",
    ]


def test_yaml_exponents_are_floats_and_placeholders_are_replaced(tmp_path, monkeypatch):
    monkeypatch.setenv("AITK_MODEL", "tiny:sd1")
    text = (
        "job: extension\nconfig:\n  name: cat\n  process:\n  - type: ui_trainer\n"
        "    training_folder: runs/[name]\n    model: {name_or_path: '${AITK_MODEL}'}\n"
        "    network: {type: lora, linear: 16, linear_alpha: 16}\n"
        "    datasets: [{folder_path: imgs}]\n    train: {lr: 1e-4, steps: 10}\n"
    )
    o = _load(_job(tmp_path, {}, text=text))
    assert o.lr == 1e-4 and isinstance(o.lr, float)
    assert Path(o.output) == Path("runs/cat/cat/cat.safetensors") and o.model == "tiny:sd1"  # <folder>/<name>/<name>
    monkeypatch.delenv("AITK_MODEL")
    problems = _problems(_job(tmp_path, {}, text=text))
    assert problems == [f"{tmp_path / 'job.yaml'}: environment variable(s) not set: AITK_MODEL (ai-toolkit's ${{VAR}})"]


def test_unknown_fields_name_the_nearest_and_all_problems_come_at_once(tmp_path):
    path = _job(
        tmp_path,
        {
            **BASE,
            "train": {"lrr": 1e-4, "optimizer": "automagic", "loss_type": "wavelet", "do_cfg": True},
            "network": {"linaer": 8},
        },
    )
    problems = _problems(path)
    text = "\n".join(problems)
    assert "process.train: unknown ai-toolkit field(s): 'lrr' (did you mean 'lr'?)" in text
    assert "process.network: unknown ai-toolkit field(s): 'linaer' (did you mean 'linear'?)" in text
    assert "process.train.optimizer 'automagic': not available in sdcore" in text
    assert "process.train.loss_type 'wavelet'" in text
    assert "process.train.do_cfg = True: sdcore does not implement this ai-toolkit field" in text
    assert len(problems) == 5


def test_ignorable_fields_are_notes_not_problems(tmp_path):
    notes: list[str] = []
    job = {**BASE, "logging": {"log_every": 5, "use_wandb": True}, "performance_log_every": 10}
    job["model"] = {**BASE["model"], "low_vram": True}
    _load(_job(tmp_path, job), notes)
    assert sum("accepted, no effect on the result here" in n for n in notes) == 4


def test_network_rules(tmp_path):
    o = _load(_job(tmp_path, {**BASE, "network": {"type": "locon", "linear": 8, "linear_alpha": 4, "conv": 2}}))
    assert (o.algo, o.rank, o.alpha, o.conv_rank, o.conv_alpha) == ("locon", 8, 4.0, 2, 2.0)  # conv_alpha = conv
    o = _load(
        _job(tmp_path, {**BASE, "network": {"type": "lokr", "lokr_full_rank": False, "linear": 8, "lokr_factor": 4}})
    )
    assert (o.algo, o.lokr_factor) == ("lokr", 4)
    problems = _problems(_job(tmp_path, {**BASE, "network": {"type": "lokr"}}))
    assert any("lokr_full_rank (ai-toolkit's default)" in p for p in problems)
    problems = _problems(_job(tmp_path, {**FLUX, "network": {"type": "locon"}}))
    assert any("on flux sdcore trains plain LoRA" in p for p in problems)


def test_training_rules(tmp_path):
    train = {"train_unet": False, "train_text_encoder": True, "text_encoder_lr": 5e-5, "dtype": "fp16",
             "gradient_accumulation": 4, "optimizer": "adafactor", "optimizer_params": {"weight_decay": 0.01},
             "lr_scheduler": "cosine", "steps": 300, "noise_offset": 0.05, "min_snr_gamma": 5, "loss_type": "mae"}  # fmt: skip
    notes: list[str] = []
    o = _load(_job(tmp_path, {**BASE, "train": train}), notes)
    # BaseSDTrainProcess hands the network text_encoder_lr = unet_lr = train.lr (1e-6 by default)
    assert (o.te_only, o.train_text_encoder, o.te_lr, o.lr, o.mixed_precision) == (True, True, None, 1e-6, "fp16")
    assert any("text_encoder_lr 5e-05: no effect in ai-toolkit's trainer" in n for n in notes)
    assert (o.gradient_accumulation, o.optimizer, o.lr_scheduler, o.max_steps) == (4, "adafactor", "cosine", 300)
    assert o.optimizer_args == "relative_step=False scale_parameter=False warmup_init=False weight_decay=0.01"
    assert (o.noise_offset, o.min_snr_gamma, o.loss_type) == (0.05, 5.0, "l1")
    # torch's LinearLR is what ai-toolkit's "linear" is (start_factor 1/3 rising), given total_iters = steps
    o = _load(_job(tmp_path, {**BASE, "train": {"lr_scheduler": "linear", "steps": 300}}))
    assert (o.lr_scheduler_type, o.lr_scheduler_args) == ("LinearLR", "total_iters=300")
    o = _load(_job(tmp_path, {**BASE, "train": {"lr_scheduler": "constant_with_warmup"}}))
    assert (o.lr_scheduler, o.lr_warmup_steps) == ("constant_with_warmup", 1000)
    problems = _problems(_job(tmp_path, {**BASE, "train": {"noise_scheduler": "flowmatch"}}))
    assert any("flowmatch: sdcore trains sd1 with its DDPM schedule" in p for p in problems)
    # gradient_accumulation: N batches per step; the legacy *_steps counts each batch as a step (refused)
    o = _load(_job(tmp_path, {**BASE, "train": {"gradient_accumulation": 3, "steps": 50}}))
    assert (o.gradient_accumulation, o.max_steps) == (3, 50)
    problems = _problems(_job(tmp_path, {**BASE, "train": {"gradient_accumulation_steps": 4}}))
    assert any("gradient_accumulation_steps 4: ai-toolkit's legacy accumulation" in p for p in problems)
    notes: list[str] = []
    datasets = [{"folder_path": "a"}, {"folder_path": "b", "is_reg": True}]
    o = _load(_job(tmp_path, {**BASE, "datasets": datasets, "train": {"reg_weight": 0.5}}), notes)
    assert o.prior_loss_weight == 0.5 and any("regularisation batch every other step" in n for n in notes)


def test_plain_yaml_config_of_sdcore_options(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: tiny:sd1\ndata: imgs\nlr: 3e-4\nrank: 8\n", encoding="utf-8")
    o = _load(path)
    assert (o.lr, o.rank, o.model) == (3e-4, 8, "tiny:sd1")


def test_inject_trigger_follows_ai_toolkit():
    from sdcore.train.aitoolkit import inject_trigger

    assert inject_trigger("[trigger] on a beach", "zyx", add_if_not_present=True) == "zyx on a beach"
    assert inject_trigger("a dog, beach", "zyx", add_if_not_present=True) == "zyx a dog, beach"
    assert inject_trigger("a zyx dog", "zyx", add_if_not_present=True) == "a zyx dog"
    assert inject_trigger("a dog", "zyx", add_if_not_present=False) == "a dog"
    assert inject_trigger("[name] and [trigger]", "", add_if_not_present=True) == " and "


def test_datasets_split_by_resolution_with_captions_and_trigger(tmp_path, monkeypatch):
    from sdcore.data.dataset import build_dataset_index
    from sdcore.testing.datasets import make_tiny_dataset
    from sdplugin_lora.method import LoraOptions

    monkeypatch.chdir(tmp_path)  # ai-toolkit's relative folder paths are relative to the working directory
    make_tiny_dataset(tmp_path / "d", n=2, size=64)
    folder = tmp_path / "d" / "1_sks"
    (folder / "000.txt").write_text("[trigger] in red", encoding="utf-8")
    (folder / "001.txt").write_text("", encoding="utf-8")
    datasets = [
        {"folder_path": "d/1_sks", "caption_ext": "txt", "resolution": [64, 128], "num_repeats": 3,
         "shuffle_tokens": False, "caption_dropout_rate": 0.1, "token_dropout_rate": 0.2, "keep_tokens": 1,
         "flip_x": True, "default_caption": "a pattern", "bucket_tolerance": 32},
        {"folder_path": "d/1_sks", "is_reg": True, "trigger_word": "qqq", "resolution": 64},
    ]  # fmt: skip
    path = _job(tmp_path, {**BASE, "trigger_word": "zyx", "datasets": datasets})
    o = _load(path)
    index = build_dataset_index(LoraOptions(**{**o.__dict__, "model": "tiny:sd1"}), verify=True)
    main = [s for s in index.subsets if not s.is_class]
    assert [s.resolution for s in main] == [64, 128]
    s = main[0]
    assert (s.caption_extension, s.repeats, s.shuffle_caption, s.caption_dropout, s.tag_dropout) == (
        ".txt", 3, False, 0.1, 0.2)  # fmt: skip
    assert (s.keep_tokens, s.flip, s.bucket_step, s.trigger_word) == (1, True, 32, "zyx")
    captions = {(e.path.name, e.is_class, e.subset.resolution): e.caption for e in index.entries}
    assert captions[("000.png", False, 64)] == "zyx in red"
    assert captions[("001.png", False, 128)] == "zyx a pattern"  # empty file: default_caption, then the trigger
    assert captions[("000.png", True, 64)] == "qqq in red"  # a regularisation caption is not given the trigger
    assert captions[("001.png", True, 64)] == ""  # empty, no default_caption there, and no trigger added


def test_keep_tokens_only_spares_tokens_from_token_dropout(tmp_path, monkeypatch):
    """dataloader_mixins.py get_caption: keep_tokens guards the first tokens in the token-dropout loop only;
    shuffle_tokens then shuffles all of them, and inject_trigger_into_prompt puts the trigger in front after
    the drop (was: keep_tokens held in place, through the shuffle too)."""
    from sdcore.data.dataset import DatasetProblems
    from sdcore.train.aitoolkit import load_datasets

    monkeypatch.chdir(tmp_path)
    (tmp_path / "d").mkdir()

    def subset(**fields):
        return load_datasets(_job(tmp_path, {**BASE, "datasets": [{"folder_path": "d", **fields}]}), None)[0]

    # no token dropout: ai-toolkit's keep_tokens changes nothing, and sdcore's would pin the shuffle
    s = subset(shuffle_tokens=True, keep_tokens=2)
    assert (s.shuffle_caption, s.keep_tokens) == (True, 0)
    # without shuffling, spared from the drop = held in place
    s = subset(token_dropout_rate=0.3, keep_tokens=2)
    assert (s.tag_dropout, s.keep_tokens) == (0.3, 2)
    with pytest.raises(DatasetProblems, match="keep_tokens 2 with shuffle_tokens and token_dropout_rate"):
        subset(shuffle_tokens=True, token_dropout_rate=0.3, keep_tokens=2)
    with pytest.raises(DatasetProblems, match="token_dropout_rate with a trigger word and keep_tokens 0"):
        subset(token_dropout_rate=0.3, trigger_word="zyx")
    assert subset(token_dropout_rate=0.3, trigger_word="zyx", keep_tokens=1).keep_tokens == 1
    assert subset(token_dropout_rate=0.3, trigger_word="zyx", is_reg=True).keep_tokens == 0  # no trigger added


def test_control_path_is_the_kontext_control_folder_and_several_are_refused(tmp_path, monkeypatch):
    """ai-toolkit's control_path (one folder, or a list of one) becomes the subset's control folder; arch
    flux_kontext trains the Flux family; several control folders (several references) are one problem."""
    from sdcore.data.dataset import DatasetProblems
    from sdcore.train.aitoolkit import DEFAULTS, JobTranslation, job_family, load_datasets

    monkeypatch.chdir(tmp_path)

    def subset(**fields):
        return load_datasets(_job(tmp_path, {**BASE, "datasets": [{"folder_path": "d", **fields}]}), None)[0]

    assert subset(control_path="ctrl").control_dir == Path("ctrl")
    assert subset(control_path=["ctrl"]).control_dir == Path("ctrl")
    assert subset().control_dir is None
    # ai-toolkit reads an empty control_path as none (toolkit/config_modules.py DatasetConfig: '' -> None; a list
    # with no folder finds no control image, dataloader_mixins.py); was "several control folders are not supported"
    assert subset(control_path="").control_dir is None and subset(control_path=[]).control_dir is None
    with pytest.raises(DatasetProblems, match=r"control_path = \['a', 'b'\]: sdcore trains FLUX.1 Kontext with one"):
        subset(control_path=["a", "b"])
    out = JobTranslation()
    assert job_family({**DEFAULTS["model"], "arch": "flux_kontext"}, "job", out) == "flux" and not out.problems


def test_sample_section_becomes_prompts(tmp_path):
    from sdcore.train.sample_prompts import read_sample_prompts

    sample = {"prompts": ["[trigger] at noon", "a cat --w 128 --d 7"], "width": 96, "height": 64, "seed": 40,
              "walk_seed": True, "guidance_scale": 3.5, "sample_steps": 12, "neg": "blurry"}  # fmt: skip
    path = _job(tmp_path, {**BASE, "trigger_word": "zyx", "sample": sample})
    first, second = read_sample_prompts(str(path))
    assert (first.prompt, first.width, first.height, first.steps, first.seed) == ("zyx at noon", 96, 64, 12, 40)
    assert (first.negative, first.cfg, first.guidance) == ("blurry", 3.5, None)
    assert (second.prompt, second.width, second.seed) == ("a cat", 128, 7)
    path = _job(tmp_path, {**FLUX, "sample": sample})
    first, second = read_sample_prompts(str(path))
    assert (first.prompt, first.cfg, first.guidance, second.seed) == ("[trigger] at noon", None, 3.5, 7)
    # a samples table's seed carries over to the next prompts without walk_seed (ai-toolkit's current_seed)
    tables = {"samples": [{"prompt": "a"}, {"prompt": "b", "seed": 9, "width": 32}, {"prompt": "c"}], "seed": 3}
    seeds = [(p.seed, p.width) for p in read_sample_prompts(str(_job(tmp_path, {**BASE, "sample": tables})))]
    assert seeds == [(3, 512), (9, 32), (9, 512)]
    walked = [
        p.seed for p in read_sample_prompts(str(_job(tmp_path, {**BASE, "sample": {**tables, "walk_seed": True}})))
    ]
    assert walked == [3, 9, 5]
    o = _load(_job(tmp_path, {**BASE, "sample": sample, "train": {"skip_first_sample": True}}))
    assert (o.sample_every, o.sample_steps, o.sample_at_first) == (100, 12, False)


# --- end to end -----------------------------------------------------------------------------------------


def test_flux_job_trains_and_saves_ai_toolkit_keys(tmp_path, sd_cli, pm, monkeypatch):
    """`sdcore train lora --config job.yaml` on a tiny Flux: 2 steps, a sample before the first, the file in
    ai-toolkit's PEFT layout (transformer.<path>.lora_A/B, to_q/to_k/to_v apart, no alpha tensors)."""
    from safetensors import safe_open
    from sdcore.testing.datasets import make_tiny_dataset

    monkeypatch.chdir(tmp_path)
    make_tiny_dataset(tmp_path / "data", n=2, size=64)
    process = {
        "training_folder": "out", "trigger_word": "zyx",
        "network": {"type": "lora", "linear": 2, "linear_alpha": 1},
        "save": {"dtype": "float32", "save_every": 100},
        "datasets": [{"folder_path": "data/1_sks", "caption_ext": "txt", "resolution": [64]}],
        "train": {"steps": 2, "lr": 1e-3, "optimizer": "adamw", "noise_scheduler": "flowmatch",
                  "gradient_checkpointing": False},
        "model": {"name_or_path": "tiny:flux", "is_flux": True},
        "sample": {"sample_every": 100, "width": 64, "height": 64, "sample_steps": 2, "prompts": ["[trigger] a photo"]},
    }  # fmt: skip
    path = _job(tmp_path, process, name="tinyflux")
    result = sd_cli(["train", "lora", "--config", str(path), "--no-progress"], pm=pm)
    assert result.exit_code == 0, result.output + repr(result.exception)
    out = tmp_path / "out" / "tinyflux"
    assert (out / "tinyflux-samples" / "step00000000.png").is_file()
    with safe_open(str(out / "tinyflux.safetensors"), "pt") as f:
        keys = list(f.keys())
        config = json.loads(f.metadata()["lora_adapter_metadata"])
    assert keys and all(k.startswith("transformer.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    for q in [k for k in keys if ".attn.to_q.lora_A" in k]:
        for part in ("to_k", "to_v"):
            assert q.replace("to_q", part) in keys
    assert not any(k.endswith(".alpha") for k in keys)
    assert (config["transformer.r"], config["transformer.lora_alpha"]) == (2, 2.0)  # alpha = rank, as ai-toolkit


def test_lora_path_fields_need_local_files_and_flux(tmp_path):
    lora = tmp_path / "adapter"
    lora.mkdir()
    (lora / "pytorch_lora_weights.safetensors").write_bytes(b"x")
    notes: list[str] = []
    o = _load(_job(tmp_path, {**FLUX, "model": {**FLUX["model"], "assistant_lora_path": str(lora)}}), notes)
    assert o.base_weights == str(lora / "pytorch_lora_weights.safetensors")  # a folder: ai-toolkit's file in it
    assert any("samples during training include it" in n for n in notes)
    o = _load(_job(tmp_path, {**FLUX, "network": {"pretrained_lora_path": str(lora)}}))
    assert o.network_weights == str(lora / "pytorch_lora_weights.safetensors") and o.base_weights is None
    problems = _problems(
        _job(
            tmp_path,
            {**FLUX, "model": {**FLUX["model"], "assistant_lora_path": "ostris/FLUX.1-schnell-training-adapter"}},
        )
    )
    assert any("sdcore reads no model hub" in p and "assistant_lora_path" in p for p in problems)
    both = {**FLUX["model"], "lora_path": str(lora), "assistant_lora_path": str(lora)}
    assert any("cannot both be given" in p for p in _problems(_job(tmp_path, {**FLUX, "model": both})))
    sd1 = {**BASE, "model": {"name_or_path": "tiny:sd1", "lora_path": str(lora)}}
    assert any("into Flux models only" in p for p in _problems(_job(tmp_path, sd1)))


def test_a_saved_ai_toolkit_lora_is_fused_or_continued_by_another_job(tmp_path, sd_cli, pm, monkeypatch):
    """ai-toolkit's PEFT-layout file from one job is a lora_path (fused into the base) and a
    pretrained_lora_path (the start of the next network) of the next; both runs train."""
    from sdcore.testing.datasets import make_tiny_dataset
    from sdplugin_lora.format import read_lora

    monkeypatch.chdir(tmp_path)
    make_tiny_dataset(tmp_path / "data", n=2, size=64)

    def run(name, model_extra, network_extra):
        process = {
            "training_folder": "out",
            "network": {"type": "lora", "linear": 2, **network_extra},
            "save": {"dtype": "float32"},
            "datasets": [{"folder_path": "data/1_sks", "resolution": [64]}],
            "train": {"steps": 1, "lr": 1e-2, "noise_scheduler": "flowmatch", "disable_sampling": True},
            "model": {"name_or_path": "tiny:flux", "is_flux": True, **model_extra},
        }
        result = sd_cli(["train", "lora", "--config", str(_job(tmp_path, process, name=name)), "--no-progress"], pm=pm)
        assert result.exit_code == 0, result.output + repr(result.exception)
        return tmp_path / "out" / name / f"{name}.safetensors"

    from sdplugin_lora.method import LoraMethod

    merged: list[list[str]] = []
    original = LoraMethod._merge_base_weights

    def recording(self, bundle, index):
        merged.append([str(p) for p in self.base_weight_files()])
        return original(self, bundle, index)

    monkeypatch.setattr(LoraMethod, "_merge_base_weights", recording)
    first = run("first", {}, {})
    assert merged == []
    fused = run("fused", {"lora_path": str(first)}, {})
    assert merged == [[str(first)]]  # the first job's file merged into the model before the network is built
    continued = run("continued", {}, {"pretrained_lora_path": str(first)})
    a, b, c = (read_lora(p) for p in (first, fused, continued))
    assert set(a.modules) == set(c.modules)
    start = {name: m.up.float() for name, m in a.modules.items()}
    # one step from the first file's weights: ups near the first's (lr 1e-2), unlike a fresh network's zeros
    moved = [float((c.modules[n].up.float() - start[n]).abs().max()) for n in start]
    assert max(moved) < 0.1 and any(float(m.up.abs().max()) > 0 for m in c.modules.values())
    assert set(b.modules) == set(a.modules)


# --- settings mapped onto sdcore options with the same maths (checked against ai-toolkit's formulas) ----------


def _ai_toolkit_ddpm_timesteps(min_steps: int, max_steps: int) -> set[int]:
    """BaseSDTrainProcess (content_or_style balanced, not flowmatch), rewritten: the range clipped to [0, 999],
    an index from randint(min + 1, max - 1) of the table DDPMScheduler(sd_config).set_timesteps(1000) builds."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(  # toolkit/sampler.py sd_config: steps_offset 0, "leading" spacing
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=0, timestep_spacing="leading"
    )
    scheduler.set_timesteps(1000)
    low, high = max(min_steps, 0), min(max_steps, 999)
    return {int(scheduler.timesteps[i]) for i in range(low + 1, high - 1)}  # randint's upper bound is exclusive


def test_ddpm_denoising_steps_are_the_timestep_range(tmp_path):
    import torch
    from sdcore.train.noise import integer_timesteps

    o = _load(_job(tmp_path, BASE))  # ai-toolkit's defaults 0 and 999: timesteps 2..998, each equally likely
    assert set(range(o.min_timestep, o.max_timestep)) == _ai_toolkit_ddpm_timesteps(0, 999)
    assert (o.min_timestep, o.max_timestep) == (2, 999)
    train = {"min_denoising_steps": 100, "max_denoising_steps": 800}
    o = _load(_job(tmp_path, {**BASE, "train": train}))
    assert set(range(o.min_timestep, o.max_timestep)) == _ai_toolkit_ddpm_timesteps(100, 800)
    draw = integer_timesteps(1000, o.min_timestep, o.max_timestep)  # sdcore's draw: uniform over that range
    gen = torch.Generator().manual_seed(0)
    drawn = {int(draw(gen)) for _ in range(20000)}  # 698 values: all met (coupon collector ~4600 draws)
    assert drawn == _ai_toolkit_ddpm_timesteps(100, 800)
    problems = _problems(_job(tmp_path, {**BASE, "train": {"min_denoising_steps": 500, "max_denoising_steps": 502}}))
    assert any("randint(501, 501)" in p for p in problems)


def test_timestep_and_loss_settings_without_a_counterpart_say_why(tmp_path):
    import torch
    from sdcore.train.loss import elementwise_loss

    train = {"noise_scheduler": "flowmatch", "linear_timesteps": True, "timestep_type": "weighted",
             "min_denoising_steps": 100, "content_or_style": "style", "loss_type": "pseudo_huber"}  # fmt: skip
    text = " | ".join(_problems(_job(tmp_path, {**FLUX, "train": train})))
    assert "timestep_type" not in text  # weighted: sdcore's linear_table with --timestep-loss-weight weighted_table
    assert "linear_timesteps" not in text and "denoising_steps" not in text  # both translate now
    assert "1 - U^3 (style)" in text
    assert "half of sdcore's --loss-type smooth_l1" in text
    # SDTrainer's pseudo_huber, rewritten: sqrt(d^2 + c^2) - c with c = 0.01; sdcore's smooth_l1 is twice that
    pred, target = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    ai_toolkit = torch.sqrt((pred - target) ** 2 + 0.01**2) - 0.01
    sdcore = elementwise_loss(pred, target, "smooth_l1", torch.full((2,), 0.01))
    torch.testing.assert_close(sdcore, 2 * ai_toolkit)
    # the flowmatch defaults written out are not refusals
    o = _load(_job(tmp_path, {**FLUX, "train": {"noise_scheduler": "flowmatch", "min_denoising_steps": 0}}))
    assert (o.timestep_sampling, o.min_table_index, o.max_table_index) == ("sigmoid_table", 0, 999)


def test_min_snr_gamma_is_sdcores_for_epsilon_models_only(tmp_path):
    import torch
    from diffusers import DDPMScheduler
    from sdcore.train.noise import min_snr_weights

    assert _load(_job(tmp_path, {**BASE, "train": {"min_snr_gamma": 5}})).min_snr_gamma == 5.0
    timesteps = torch.arange(1000)
    for prediction in ("epsilon", "v_prediction"):
        scheduler = DDPMScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type=prediction
        )
        # toolkit/train_tools.py apply_snr_weight (not fixed), rewritten: min(gamma / snr, 1), snr = (a / s)^2
        abar = scheduler.alphas_cumprod
        snr = (abar.sqrt() / (1.0 - abar).sqrt()) ** 2
        ai_toolkit = torch.minimum(5.0 / snr, torch.ones_like(snr))
        sdcore = min_snr_weights(scheduler, timesteps, 5.0)
        if prediction == "epsilon":
            torch.testing.assert_close(sdcore, ai_toolkit, rtol=1e-5, atol=0)
        else:  # kohya's v-prediction weight min(snr, gamma) / (snr + 1) is another number
            assert not torch.allclose(sdcore, ai_toolkit, rtol=1e-2)
    v_pred = {**BASE, "model": {"name_or_path": "tiny:sd1", "is_v_pred": True}, "train": {"min_snr_gamma": 5}}
    assert any("min(gamma / snr, 1) for every prediction type" in p for p in _problems(_job(tmp_path, v_pred)))
    problems = _problems(_job(tmp_path, {**BASE, "train": {"snr_gamma": 5, "min_snr_gamma": 5}}))
    assert any("snr_gamma 5: ai-toolkit weighs gamma / snr without a cap" in p for p in problems)


def test_cached_text_embeddings_turn_caption_dropouts_off_and_keep_one_order(tmp_path):
    """dataloader_mixins.get_caption skips caption and token dropout when the dataset caches text embeddings, and
    the one caption it encodes keeps one shuffled order (config_modules: every dataset or none)."""
    from sdcore.train.aitoolkit import load_datasets

    data = {"folder_path": "imgs", "cache_text_embeddings": True, "caption_dropout_rate": 0.1,
            "token_dropout_rate": 0.2, "shuffle_tokens": True}  # fmt: skip
    path = _job(tmp_path, {**BASE, "datasets": [data]})
    notes: list[str] = []
    o = _load(path, notes)
    assert o.caption_variants == 1
    assert any("turns caption_dropout_rate and token_dropout_rate off" in n for n in notes)
    (subset,) = load_datasets(path, o)
    assert (subset.caption_dropout, subset.tag_dropout, subset.shuffle_caption) == (0.0, 0.0, True)
    mixed = _job(tmp_path, {**BASE, "datasets": [data, {"folder_path": "other"}]})
    assert any("every dataset or none" in p for p in _problems(mixed))
    o = _load(_job(tmp_path, {**BASE, "datasets": [{"folder_path": "imgs", "caption_dropout_rate": 0.1}]}))
    assert o.caption_variants == 4  # sdcore's default when ai-toolkit encodes per step


def test_a_resolution_off_the_bucket_step_trains_as_ai_toolkit_takes_it(tmp_path, monkeypatch):
    """ai-toolkit takes any dataset resolution (96, 1100); sdcore's bucket limits for it are rounded to the
    step (bucket_tolerance) instead of stopping the run with min/max_bucket_reso the job never wrote."""
    from sdcore.data.dataset import build_dataset_index
    from sdcore.testing.datasets import make_tiny_dataset
    from sdplugin_lora.method import LoraOptions

    monkeypatch.chdir(tmp_path)
    make_tiny_dataset(tmp_path / "d", n=2, size=64)
    path = _job(tmp_path, {**BASE, "datasets": [{"folder_path": "d/1_sks", "resolution": [96, 1100]}]})
    o = _load(path)
    index = build_dataset_index(LoraOptions(**{**o.__dict__, "model": "tiny:sd1"}), verify=True)
    limits = [(s.resolution, s.bucket_step, s.min_bucket_reso, s.max_bucket_reso) for s in index.subsets]
    assert limits == [(96, 64, 64, 1024), (1100, 64, 256, 1152)]
    assert sorted(e.subset.resolution for e in index.entries) == [96, 96, 1100, 1100]  # both images at both
