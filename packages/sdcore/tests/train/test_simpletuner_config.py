"""SimpleTuner configs (config.json + the data backend JSON + the LyCORIS JSON) as ``--config``.

The expected values are SimpleTuner's documented defaults and meanings (bghira/SimpleTuner bc8e6ab), cited by
file:line: its field registry ``simpletuner/simpletuner_sdk/server/services/field_registry/sections/*.py``
(abbreviated ``sections/``), ``simpletuner/helpers/models/field_registry/flux.py``, ``helpers/models/common.py``,
``helpers/models/flux/model.py`` and ``documentation/DATALOADER.md``. The configs are written here (SimpleTuner
is AGPL-3.0: none of its example files is copied).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sdcore.errors import ConfigError
from sdcore.testing.datasets import make_tiny_dataset


def _write(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def _flux_run(tmp_path: Path, **extra: object) -> Path:
    """A FLUX.1 LoRA config in SimpleTuner's config.json spelling (``--`` keys, numbers and booleans as strings)
    with a data backend of two local image datasets and a text-embed cache backend."""
    a = make_tiny_dataset(tmp_path / "a", n=2, size=64) / "1_sks"
    b = make_tiny_dataset(tmp_path / "b", n=2, size=64) / "1_sks"
    backend = _write(
        tmp_path / "multidatabackend.json",
        [
            {"id": "subject", "type": "local", "instance_data_dir": str(a), "caption_strategy": "textfile",
             "resolution": 64, "resolution_type": "pixel_area", "repeats": 2},
            {"id": "style", "type": "local", "instance_data_dir": str(b), "caption_strategy": "instanceprompt",
             "instance_prompt": "a photo"},  # resolution: the config's (area 0.004096 megapixels)
            {"id": "embeds", "dataset_type": "text_embeds", "default": True, "type": "local", "cache_dir": "te"},
        ],
    )  # fmt: skip
    config = {
        "--model_family": "flux", "--model_type": "lora", "--pretrained_model_name_or_path": "tiny:flux",
        "--data_backend_config": str(backend), "--output_dir": str(tmp_path / "out"), "--max_train_steps": 2,
        "--lora_rank": 4, "--lora_dropout": "0", "--grad_clip_method": "norm", "--learning_rate": "1e-4",
        "--train_batch_size": 1, "--flux_lora_target": "all", "--flow_schedule_shift": 1.5,
        "--flux_guidance_value": 3.5, "--seed": 7, "--validation_prompt": "a cat", "--validation_resolution": "64x64",
        "--validation_step_interval": 1, "--validation_num_inference_steps": "2", "--validation_guidance": 3.0,
        "--mixed_precision": "no", "--report_to": "wandb", "--gradient_checkpointing": False,
        "--resolution": 0.004096, "--resolution_type": "area", "--aspect_bucket_alignment": 64,
        **extra,
    }  # fmt: skip
    return _write(tmp_path / "config.json", config)


def _lora(path: Path, notes: list[str] | None = None):
    from sdcore.train.config import load_options
    from sdplugin_lora.method import LoraOptions

    return load_options(LoraOptions, path, notes=[] if notes is None else notes)


def test_flux_lora_config_translates_with_simpletuners_defaults(tmp_path):
    from sdcore.data.dataset import scan_dataset
    from sdcore.train.sample_prompts import read_sample_prompts

    path = _flux_run(tmp_path)
    notes: list[str] = []
    o = _lora(path, notes)
    expected = {
        "model": "tiny:flux", "data": str(path), "output": str(tmp_path / "out" / "pytorch_lora_weights.safetensors"),
        "max_steps": 2, "lr": 1e-4, "batch_size": 1, "seed": 7, "mixed_precision": "no",
        "gradient_checkpointing": False,
        "algo": "lora", "rank": 4,
        "alpha": 4.0,  # sections/lora.py:40 lora_alpha None -> common.py:1092 lora_alpha = lora_rank
        "key_layout": "diffusers", "split_qkv": True,
        # helpers/models/flux/model.py:1249 "all" (to_qkv/add_qkv_proj only exist with fused projections)
        "layer_filter": "attn.to_k,attn.to_q,attn.to_v,add_k_proj,add_q_proj,add_v_proj,to_out.0,to_add_out",
        # common.py sample_flow_sigmas: sigmoid(flow_sigmoid_scale * N(0,1)) (sections/advanced.py:398 scale 1.0),
        # custom_schedule.py apply_flow_schedule_shift: s*t/(1+(s-1)*t)
        "timestep_sampling": "sigmoid", "sigmoid_scale": 1.0, "discrete_flow_shift": 1.5,
        "guidance_scale": 3.5,  # field_registry/flux.py:86 flux_guidance_mode constant
        "model_prediction_type": "raw", "weighting_scheme": "uniform",
        "optimizer": "adamw",  # sections/training.py:107 adamw_bf16
        # helpers/training/optimizer_param.py:191 adamw_bf16's default_settings (the adam_* options are read only
        # with DeepSpeed, optimizer_param.py:1188): betas 0.9/0.999, weight decay 0.01, eps 1e-6
        "optimizer_args": "betas=0.9,0.999 weight_decay=0.01 eps=1e-06",
        "max_grad_norm": 2.0, "grad_clip_method": "norm",  # sections/optimizer.py:227; given norm in _flux_run
        "lr_scheduler": "constant_with_warmup", "lr_warmup_steps": 0,  # sections/training.py:140,179
        "save_every": 500, "save_limit": 5,  # sections/logging_fields.py:71, sections/training.py:197
        "sample_prompts": str(path), "sample_every": 1, "sample_steps": 2, "sample_at_first": False,
    }  # fmt: skip
    got = {name: getattr(o, name) for name in expected}
    assert got == expected
    assert any("report_to: accepted, no effect" in n for n in notes)
    assert any("adamw_bf16" in n for n in notes)

    index = scan_dataset(o)
    subsets = sorted(index.subsets, key=lambda s: str(s.image_dir))
    # DATALOADER.md:677 repeats 0 = once, so 2 -> 3 passes; area 0.004096 megapixels = a 64x64 area
    assert [(s.repeats, s.resolution) for s in subsets] == [(3, 64), (1, 64)]
    assert subsets[0].class_tokens is None and subsets[0].caption_extension == ".txt"
    assert subsets[1].class_tokens == "a photo"  # instanceprompt: every image gets instance_prompt
    assert not index.problems

    (prompt,) = read_sample_prompts(str(path), family="flux")
    assert (prompt.prompt, prompt.width, prompt.height, prompt.steps) == ("a cat", 64, 64, 2)
    assert (prompt.guidance, prompt.cfg, prompt.negative) == (3.0, None, "")  # no real CFG at guidance_real 1


def test_lora_dropout_is_peft_input_dropout(tmp_path):
    """SimpleTuner's lora_dropout (sections/lora.py:129, default 0.1) goes to PEFT's LoraConfig(lora_dropout)
    (common.py add_lora_adapter): sdcore's --lora-input-dropout, not kohya's --dropout."""
    path = _flux_run(tmp_path)
    data = json.loads(path.read_text())
    data.pop("--lora_dropout")
    _write(path, data)
    o = _lora(path)
    assert (o.lora_input_dropout, o.dropout) == (0.1, None)


def test_grad_clip_method_value_is_the_default(tmp_path):
    """sections/optimizer.py:227,264: max_grad_norm 2.0 applied by value unless grad_clip_method norm; prodigy is
    never clipped (trainer.py should_clip_gradients)."""
    path = _flux_run(tmp_path)
    data = json.loads(path.read_text())
    data.pop("--grad_clip_method")
    _write(path, data)
    o = _lora(path)
    assert (o.grad_clip_method, o.max_grad_norm) == ("value", 2.0)
    _write(path, {**data, "--max_grad_norm": "0.5", "--grad_clip_method": "norm"})
    o = _lora(path)
    assert (o.grad_clip_method, o.max_grad_norm) == ("norm", 0.5)
    _write(path, {**data, "--optimizer": "prodigy"})
    assert _lora(path).max_grad_norm == 0.0
    _write(path, {**data, "--lora_dropout": "0.25"})
    assert _lora(path).lora_input_dropout == 0.25
    _write(path, {**data, "--lora_dropout": 0})
    assert _lora(path).lora_input_dropout is None


def test_caption_strategy_filename_is_the_stem_with_spaces(tmp_path):
    """prompts.py prepare_instance_prompt_from_filename (caption_strategy filename, the default: DATALOADER.md):
    ``Path(image).stem`` with every ``_`` a space, nothing else stripped (OneTrainer's filename source keeps the
    underscores: mgds GetFilename(include_extension=False))."""
    from sdcore.data.captions import filename_caption
    from sdcore.data.dataset import scan_dataset
    from sdcore.testing.datasets import pattern_image

    assert filename_caption("d/a_photo_of_a_cat-123.png", "spaces") == "a photo of a cat-123"
    assert filename_caption("d/a_photo_of_a_cat-123.png") == "a_photo_of_a_cat-123"  # OneTrainer's rule
    assert filename_caption("d/two__under_scores.v2.jpg", "spaces") == "two  under scores.v2"  # last suffix only
    path = _flux_run(tmp_path)
    images = tmp_path / "named"
    images.mkdir()
    for i, name in enumerate(("a_photo_of_a_cat-123.png", "dog_on_a_sofa_0001.png")):
        pattern_image(i, 64).save(images / name)
    (images / "dog_on_a_sofa_0001.txt").write_text("not read", encoding="utf-8")
    backend = Path(json.loads(path.read_text())["--data_backend_config"])
    _write(backend, [{"id": "named", "type": "local", "instance_data_dir": str(images)}])  # caption_strategy left out
    index = scan_dataset(_lora(path))
    assert sorted(e.caption for e in index.entries) == ["a photo of a cat-123", "dog on a sofa 0001"]
    assert not index.problems


def test_crop_false_is_noted_as_a_centred_excess_crop(tmp_path):
    """training_sample.py prepare(): with crop false (the default) the image is resized to an intermediary size of
    its own aspect that covers the aspect bucket, then cropped to the bucket by the crop_style handler (default
    random, cropping.py RandomCropping) once, when latents are cached. sdcore buckets the same way and crops the
    excess at the centre (random_crop off, so latents stay cached): a note says so, and nothing for crop_style
    center or the text-embed cache backend."""
    from sdcore.data.dataset import scan_dataset

    path = _flux_run(tmp_path)
    notes: list[str] = []
    o = _lora(path, notes)
    crop_notes = [n for n in notes if "crop false" in n]
    assert len(crop_notes) == 2 and all("cropped at the centre" in n and "'random'" in n for n in crop_notes)
    subsets = scan_dataset(o).subsets
    assert [(s.buckets, s.random_crop) for s in subsets] == [(True, False), (True, False)]
    backend = Path(json.loads(path.read_text())["--data_backend_config"])
    data = json.loads(backend.read_text())
    data[0]["crop_style"] = "center"
    _write(backend, data)
    notes.clear()
    _lora(path, notes)
    assert len([n for n in notes if "crop false" in n]) == 1


def test_crop_true_random_keeps_latents_cached_and_crops_at_the_centre(tmp_path):
    """crop true with crop_style random (SimpleTuner's default style): SimpleTuner's RandomCropping picks the spot
    once, when it caches latents (the VAE cache is always on there); sdcore's random crop draws a new spot at every
    use, which forbids cached latents and made the translated run refuse itself. The subset crops at the centre and
    a note says what differs; crop_style center gets no note."""
    from sdcore.data.dataset import scan_dataset

    path = _flux_run(tmp_path)
    backend = Path(json.loads(path.read_text())["--data_backend_config"])
    data = json.loads(backend.read_text())
    for entry in data:
        if entry.get("dataset_type", "image") == "image":
            entry.update(crop=True, crop_style="random", crop_aspect="preserve")
    _write(backend, data)
    notes: list[str] = []
    o = _lora(path, notes)
    assert len([n for n in notes if "crop_style random: cropped at the centre" in n]) == 2
    assert [s.random_crop for s in scan_dataset(o).subsets] == [False, False]
    for entry in data:
        if entry.get("dataset_type", "image") == "image":
            entry["crop_style"] = "center"
    _write(backend, data)
    notes.clear()
    _lora(path, notes)
    assert not [n for n in notes if "crop_style random" in n or "crop false" in n]


def test_auto_shift_and_toml_spelling(tmp_path):
    import tomli_w

    json_path = _flux_run(tmp_path, **{"--flow_schedule_auto_shift": "true", "--flux_attention_masked_training": True})
    data = {k.lstrip("-"): v for k, v in json.loads(json_path.read_text()).items()}
    toml_path = tmp_path / "config.toml"
    toml_path.write_text(tomli_w.dumps(data), encoding="utf-8")
    for path in (json_path, toml_path):
        o = _lora(path)
        # custom_schedule.py apply_flow_schedule_shift: auto shift wins (safety_check.py zeroes the fixed shift)
        assert (o.timestep_sampling, o.apply_t5_attn_mask) == ("flux_shift", True)


def test_lycoris_config(tmp_path):
    lycoris = _write(
        tmp_path / "lycoris.json",
        {"algo": "lokr", "multiplier": 1.0, "linear_dim": 8, "linear_alpha": 2, "factor": 4,
         "apply_preset": {"target_module": ["Attention", "FeedForward"],
                          "module_algo_map": {"Attention": {"factor": 4}, "FeedForward": {"factor": 4}}}},
    )  # fmt: skip
    o = _lora(_flux_run(tmp_path, **{"--lora_type": "lycoris", "--lycoris_config": str(lycoris)}))
    assert (o.algo, o.rank, o.alpha, o.lokr_factor) == ("lokr", 8, 2.0, 4)
    assert o.layer_filter == "attn,ff.net,ff_context.net"
    _write(lycoris, {"algo": "lokr", "factor": 16, "full_matrix": True,
                     "apply_preset": {"target_module": ["Attention", "FeedForward"],
                                      "module_algo_map": {"FeedForward": {"factor": 8}}}})  # fmt: skip
    with pytest.raises(ConfigError) as info:
        _lora(_flux_run(tmp_path / "2", **{"--lora_type": "lycoris", "--lycoris_config": str(lycoris)}))
    text = str(info.value)
    assert "lokr with full_matrix (no linear_dim)" in text
    assert "module_algo_map gives FeedForward their own settings" in text


def test_full_fine_tune_is_dreambooth(tmp_path):
    from sdcore.train.config import load_options
    from sdplugin_dreambooth.options import DreamBoothOptions

    path = _flux_run(tmp_path, **{"--model_type": "full", "--lora_rank": 16, "--lora_dropout": 0.1})
    o = load_options(DreamBoothOptions, path, notes=[])
    assert (o.output, o.save_format, o.lr, o.max_steps) == (str(tmp_path / "out"), "diffusers", 1e-4, 2)
    with pytest.raises(ConfigError, match="model_type full is a full fine-tune: use sdcore train dreambooth"):
        _lora(path)


def test_problems_one_line_each_all_at_once_before_the_model_loads(tmp_path):
    from click.testing import CliRunner
    from sdcore.cli import build_cli
    from sdcore.plugins import get_plugin_manager

    path = _flux_run(tmp_path)
    data = json.loads(path.read_text())
    data.update({"--grad_clip_method": "percentile", "--model_family": "hidream", "--use_soft_min_snr": "true", "--lora_rnak": 8,
                 "--pretrained_model_name_or_path": str(tmp_path / "no-such-model")})  # fmt: skip
    backends = json.loads(Path(data["--data_backend_config"]).read_text())
    backends.append({"id": "s3", "type": "aws", "aws_bucket_name": "x"})
    backends[0]["is_regularisation_data"] = True
    _write(Path(data["--data_backend_config"]), backends)
    _write(path, data)
    result = CliRunner().invoke(build_cli(get_plugin_manager()), ["train", "lora", "--config", str(path), "--dry-run"])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    expected = [
        "model_family 'hidream': a model family sdcore does not train",
        "grad_clip_method 'percentile': SimpleTuner clips by value or norm",  # sections/optimizer.py:264 choices
        "use_soft_min_snr = 'true': sdcore does not implement this SimpleTuner option",
        "'lora_rnak' (did you mean 'lora_rank'?)",
        "type 'aws': sdcore reads local image folders only",
        "is_regularisation_data: SimpleTuner trains such data towards the base model's own prediction",
    ]
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == len(expected), result.output  # one line each, all at once, no model error
    for line in expected:
        assert line in result.output, (line, result.output)


def test_two_step_flux_run_trains_simpletuners_targets(tmp_path):
    from click.testing import CliRunner
    from safetensors.torch import load_file
    from sdcore.cli import build_cli
    from sdcore.plugins import get_plugin_manager

    path = _flux_run(tmp_path)
    cli = build_cli(get_plugin_manager())
    dry = CliRunner().invoke(cli, ["train", "lora", "--config", str(path), "--dry-run", "--no-progress"])
    assert dry.exit_code == 0, dry.output
    assert "4 training images (8 with repeats)" in dry.output  # 2 x (2 + 1) + 2 x (0 + 1)
    run = CliRunner().invoke(cli, ["train", "lora", "--config", str(path), "--no-progress"])
    assert run.exit_code == 0, run.output
    weights = load_file(str(tmp_path / "out" / "pytorch_lora_weights.safetensors"))
    modules = {k.rsplit(".lora_", 1)[0] for k in weights}
    # PEFT's matching of flux/model.py's "all" list against diffusers' Flux: every double block's image and text
    # attention projections and outputs, the single blocks' q/k/v (they have no to_out)
    double = [
        f"transformer.transformer_blocks.{i}.attn.{m}"
        for i in range(2)
        for m in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    ]
    single = [f"transformer.single_transformer_blocks.{i}.attn.{m}" for i in range(2) for m in ("to_q", "to_k", "to_v")]
    assert modules == set(double + single)  # fmt: skip
    assert any(float(t.abs().max()) > 0 for k, t in weights.items() if "lora_B" in k)  # two steps moved lora_B


@pytest.mark.parametrize(
    ("resolution", "resolution_type", "side"),
    [
        # multiaspect/image.py:179-183 calculate_new_size_by_pixel_area: the square edge is
        # _round_to_nearest_multiple(sqrt(megapixels * 1e6)) (image.py:92-101: to aspect_bucket_alignment, at least
        # one step): 1.0 megapixels -> 1000 -> 1024, 0.5 -> 707 -> 704
        (1.0, "area", 1024),
        (0.5, "area", 704),
        # factory.py:2968-2975: pixel_area E -> area E*E/1e6 megapixels, so 1000 -> 1.0 -> 1024
        (1000, "pixel_area", 1024),
        (1024, "pixel_area", 1024),
    ],
)
def test_area_resolution_is_rounded_to_the_bucket_alignment(tmp_path, resolution, resolution_type, side):
    from sdcore.train.simpletuner_config import load_datasets

    path = _flux_run(tmp_path, **{"--resolution": resolution, "--resolution_type": resolution_type})
    backend = json.loads(path.read_text())["--data_backend_config"]
    _write(Path(backend), [{"id": "a", "type": "local", "instance_data_dir": str(tmp_path / "a" / "1_sks"),
                            "caption_strategy": "textfile"}])  # fmt: skip
    (subset,) = load_datasets(path, None)
    assert subset.resolution == side


def test_legacy_names_and_values_simpletuners_loader_skips(tmp_path):
    # cli_utils.py mapping_to_cli_args (the config.json/config.toml loader): None, "" and the string "false" are
    # not passed on (the option keeps its default: gradient_checkpointing's is True, sections/training.py:224), so an
    # unknown key holding "false" is never seen (config/config.json.example's validation_torch_compile); the legacy
    # names are forwarded (cli_utils.py:81-164: checkpointing_steps, validation_steps, save_total_limit) or dropped
    # (UI-only and dataset-only keys)
    path = _flux_run(
        tmp_path,
        **{"--checkpointing_steps": 100, "--validation_steps": "50", "--save_total_limit": 3,
           "--validation_torch_compile": "false", "--gradient_checkpointing": "false", "--lora_alpha": None,
           "--instance_prompt": "", "--aspect_ratio_bucketing": True, "--repeats": 4, "__active_tab__": "model",
           "ez_model_type": "lora"},
    )  # fmt: skip
    o = _lora(path)
    assert (o.save_every, o.sample_every, o.save_limit) == (100, 50, 3)
    assert o.gradient_checkpointing is True
    assert o.alpha == 4.0  # lora_alpha None: not given, the rank


def test_flux_all_ffs_adapts_what_peft_matches_including_the_final_proj_out(tmp_path):
    from sdplugin_lora.targets import list_targets

    o = _lora(_flux_run(tmp_path, **{"--flux_lora_target": "all+ffs"}))
    paths = {p.split(".", 1)[1] for row in list_targets(o).rows for p in row.paths}
    # flux/model.py:1283-1300 all+ffs, matched as PEFT matches target_modules (a module's name equals a target or
    # ends with "." + target: tuners_utils.check_target_module_exists), so "proj_out" is the single blocks' and the
    # transformer's own final proj_out too
    double = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
              "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
              "ff_context.net.2")  # fmt: skip
    single = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out")
    expected = {f"transformer_blocks.{i}.{m}" for i in range(2) for m in double}
    expected |= {f"single_transformer_blocks.{i}.{m}" for i in range(2) for m in single}
    assert paths == expected | {"proj_out"}


@pytest.mark.parametrize("strategy", ["filename", "textfile"])
def test_prepend_instance_prompt_is_the_caption_prefix(tmp_path, strategy):
    """prompts.py prepare_instance_prompt_from_filename/_textfile with prepend_instance_prompt: instance_prompt +
    " " + the caption, sdcore's caption_prefix join; without instance_prompt SimpleTuner's factory stops."""
    from sdcore.data.dataset import scan_dataset
    from sdcore.testing.datasets import pattern_image

    path = _flux_run(tmp_path)
    images = tmp_path / "named"
    images.mkdir()
    pattern_image(0, 64).save(images / "a_red_fox.png")
    (images / "a_red_fox.txt").write_text("a fox in snow", encoding="utf-8")
    caption = {"filename": "a red fox", "textfile": "a fox in snow"}[strategy]
    backend = Path(json.loads(path.read_text())["--data_backend_config"])
    entry = {"id": "named", "type": "local", "instance_data_dir": str(images), "caption_strategy": strategy,
             "prepend_instance_prompt": True, "instance_prompt": "sks"}  # fmt: skip
    _write(backend, [entry])
    index = scan_dataset(_lora(path))
    assert not index.problems
    assert [e.written_caption for e in index.entries] == ["sks" + " " + caption]
    _write(backend, [{**entry, "instance_prompt": None}])
    with pytest.raises(ConfigError) as info:
        _lora(path)
    assert "prepend_instance_prompt needs instance_prompt" in str(info.value.args)


def test_images_in_sub_folders_train_as_simpletuners_os_walk_finds_them(tmp_path):
    """LocalDataBackend.list_files walks instance_data_dir with os.walk: images in sub-folders are the dataset's
    too, each with the caption file beside it."""
    from sdcore.data.dataset import scan_dataset
    from sdcore.testing.datasets import pattern_image

    path = _flux_run(tmp_path)
    images = tmp_path / "nested"
    (images / "set2" / "deeper").mkdir(parents=True)
    (images / ".hidden").mkdir()
    for i, rel in enumerate(("top.png", "set2/mid.png", "set2/deeper/low.png", ".hidden/skip.png")):
        pattern_image(i, 64).save(images / rel)
        (images / rel).with_suffix(".txt").write_text(f"caption {Path(rel).stem}", encoding="utf-8")
    backend = Path(json.loads(path.read_text())["--data_backend_config"])
    _write(
        backend, [{"id": "nested", "type": "local", "instance_data_dir": str(images), "caption_strategy": "textfile"}]
    )
    index = scan_dataset(_lora(path))
    found = sorted((e.path.relative_to(images).as_posix(), e.caption) for e in index.entries)
    assert found == [
        ("set2/deeper/low.png", "caption low"),
        ("set2/mid.png", "caption mid"),
        ("top.png", "caption top"),
    ]
    assert not index.skipped and not index.problems


@pytest.mark.parametrize("key", ["disabled", "disable"])
def test_a_disabled_dataset_is_skipped_under_either_name(tmp_path, key):
    """factory.py skips a backend whose ``disabled`` or ``disable`` is true."""
    from sdcore.data.dataset import scan_dataset

    path = _flux_run(tmp_path)
    backend = Path(json.loads(path.read_text())["--data_backend_config"])
    datasets = json.loads(backend.read_text())
    datasets[1][key] = True
    _write(backend, datasets)
    index = scan_dataset(_lora(path))
    assert {e.path.parent.parent.name for e in index.entries} == {"a"}


def test_a_link_back_to_a_parent_folder_is_read_once(tmp_path):
    """os.walk(followlinks=True) with SimpleTuner's seen_directories: a folder reached again through a link is not
    read again (without the guard sdcore's scan went round the loop, each image once per level)."""
    from sdcore.data.dataset import scan_dataset
    from sdcore.testing.datasets import pattern_image

    path = _flux_run(tmp_path)
    images = tmp_path / "looped"
    (images / "sub").mkdir(parents=True)
    pattern_image(0, 64).save(images / "top.png")
    pattern_image(1, 64).save(images / "sub" / "low.png")
    (images / "sub" / "back").symlink_to(images, target_is_directory=True)
    backend = Path(json.loads(path.read_text())["--data_backend_config"])
    _write(backend, [{"id": "looped", "type": "local", "instance_data_dir": str(images)}])
    index = scan_dataset(_lora(path))
    assert sorted(e.path.relative_to(images).as_posix() for e in index.entries) == ["sub/low.png", "top.png"]
    assert [s.reason for s in index.skipped] == ["folder already read (a link to a folder read before)"]
