"""kohya's SD3/Flux/SDXL memory and bookkeeping options and the positional-embedding / model-type options
sdcore refuses: each is known (accepted with a note, mapped, or refused with its reason), none is an
"unknown option" (kohya sd-scripts 48d368f: sd3_train.py, flux_train.py, flux_train_network.py,
library/sd3_train_utils.py, library/flux_train_utils.py, sdxl_train.py)."""

from __future__ import annotations

import dataclasses

import pytest
from sdcore.errors import ConfigError
from sdcore.train import kohya
from sdcore.train.config import load_options
from sdcore.train.options import TrainOptions

FIELDS = [f.name for f in dataclasses.fields(TrainOptions)]


def _translate(**items):
    return kohya.translate(items, FIELDS, where="cfg")


@pytest.mark.parametrize(
    ("name", "value", "note"),
    [
        ("mem_eff_save", True, "the same checkpoint"),
        ("skip_latents_validity_check", True, "skip_cache_check"),
        ("t5xxl_device", "cuda:1", "DOES NOT WORK"),
        ("t5xxl_dtype", "bf16", "DOES NOT WORK"),
        ("text_encoder_batch_size", 4, "the same encodings"),
    ],
)
def test_memory_options_are_accepted_with_a_note(name, value, note):
    out = _translate(**{name: value})
    assert not out.problems and not out.values
    assert any(n.startswith(f"{name}: ") and note in n for n in out.notes), out.notes
    assert not _translate(**{name: None}).notes  # kohya_ss's untouched field: nothing to say


def test_diffusers_xformers_is_an_attention_kernel_choice():
    out = _translate(diffusers_xformers=True)
    assert not out.problems and out.notes == ["accepted without effect here: diffusers_xformers"]
    assert "diffusers_xformers" in kohya.flag_names()


@pytest.mark.parametrize(
    ("items", "swap"),
    [
        ({"double_blocks_to_swap": 6}, 6),
        ({"double_blocks_to_swap": 6, "single_blocks_to_swap": 9}, 10),  # 6 + 9 // 2
        ({"single_blocks_to_swap": 3}, 1),
        ({"split_mode": True}, 18),
    ],
)
def test_deprecated_block_swap_spellings_become_blocks_to_swap(items, swap):
    out = _translate(**items)
    assert out.values == {"blocks_to_swap": swap} and not out.problems
    assert any("deprecated" in n and f"blocks_to_swap = {swap}" in n for n in out.notes)


def test_deprecated_block_swap_spellings_yield_to_blocks_to_swap():
    out = _translate(blocks_to_swap=4, double_blocks_to_swap=6, split_mode=True)
    assert out.values == {"blocks_to_swap": 4}
    assert any("ignored because blocks_to_swap is given" in n for n in out.notes)
    assert _translate(double_blocks_to_swap=0, single_blocks_to_swap=0, split_mode=False).values == {}
    assert _translate(double_blocks_to_swap="six").problems


def test_cpu_offload_checkpointing_turns_on_checkpointing_and_refuses_block_swap():
    out = _translate(cpu_offload_checkpointing=True)
    assert out.values == {"gradient_checkpointing": True, "cpu_offload_checkpointing": True} and not out.problems
    assert any("gradient checkpointing is on" in n for n in out.notes)
    out = _translate(cpu_offload_checkpointing=True, gradient_checkpointing=True)
    assert out.values == {"gradient_checkpointing": True, "cpu_offload_checkpointing": True} and not out.notes
    bad = _translate(cpu_offload_checkpointing=True, blocks_to_swap=8)
    assert any("cpu_offload_checkpointing with blocks_to_swap" in p for p in bad.problems)
    bad = _translate(cpu_offload_checkpointing=True, split_mode=True)
    assert any("kohya refuses the pair" in p for p in bad.problems)
    assert not _translate(cpu_offload_checkpointing=False).values.get("cpu_offload_checkpointing")


@pytest.mark.parametrize(
    ("name", "on", "off", "reason"),
    [
        ("model_type", "lumina", "flux", "model types are flux and chroma"),
    ],
)
def test_refused_options_name_their_reason_and_accept_kohyas_off_value(name, on, off, reason):
    problems = _translate(**{name: on}).problems
    assert len(problems) == 1 and name in problems[0] and reason in problems[0]
    assert _translate(**{name: off}) == kohya.Translation()
    assert _translate(model_type="chroma") == kohya.Translation()  # the family comes from the model file


def test_a_kohya_flux_toml_with_these_names_loads(tmp_path):
    """The whole path users take: a kohya TOML with every one of these names is no "unknown option"."""
    from runtime_methods import ConvOutOptions

    path = tmp_path / "flux.toml"
    path.write_text(
        'pretrained_model_name_or_path = "flux1-dev.safetensors"\nmodel_type = "flux"\nmem_eff_save = true\n'
        't5xxl_dtype = "bf16"\ndouble_blocks_to_swap = 4\nsingle_blocks_to_swap = 8\ntext_encoder_batch_size = 8\n'
        "pos_emb_random_crop_rate = 0.25\nenable_scaled_pos_embed = true\n",
        encoding="utf-8",
    )
    notes: list[str] = []
    o = load_options(ConvOutOptions, path, notes=notes)
    assert o.blocks_to_swap == 8 and not o.gradient_checkpointing
    assert o.enable_scaled_pos_embed and o.pos_emb_random_crop_rate == 0.25
    path.write_text(path.read_text().replace('"flux"', '"lumina"'), encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_options(ConvOutOptions, path, notes=notes)
    assert "model_type = 'lumina'" in str(err.value) and "unknown" not in str(err.value)


@pytest.mark.parametrize("cache_key", ["cache_text_encoder_outputs", "cache_text_encoder_outputs_to_disk"])
@pytest.mark.parametrize(("model", "module"), [("tiny:flux", "networks.lora_flux"), ("tiny:sd3", "networks.lora_sd3")])
def test_kohya_text_cache_with_a_training_clip_caches_t5_as_kohya(tmp_path, cache_key, model, module):
    """kohya's flux_train_network.py example sets --cache_text_encoder_outputs without
    --network_train_unet_only: CLIP trains there and kohya caches T5's outputs only (``is_partial``,
    flux_train_network.py:205-225, sd3_train_network.py:177-200). sdcore does the same now, so no note says
    that nothing is cached, and the run builds a text cache of T5's outputs alone."""
    pytest.importorskip("sdplugin_lora")
    from sdcore.testing.contract import make_tiny_dataset
    from sdcore.train.loop import TrainSession
    from sdplugin_lora.method import LoraMethod, LoraOptions

    data = make_tiny_dataset(tmp_path / "data", n=2, size=64)
    path = tmp_path / "kohya.toml"
    path.write_text(
        f'pretrained_model_name_or_path = "{model}"\nnetwork_module = "{module}"\n{cache_key} = true\n'
        f'train_data_dir = "{data}"\noutput_dir = "{tmp_path / "out"}"\nresolution = "64,64"\nmax_train_steps = 1\n'
        'network_dim = 2\nt5xxl_max_token_length = 16\nnetwork_args = ["split_qkv=True"]\n'
        'caption_extension = ".txt"\n',  # make_tiny_dataset's captions (kohya's default is .caption)
        encoding="utf-8",
    )
    notes: list[str] = []
    options = load_options(LoraOptions, path, notes=notes)
    assert options.cache_text_encoder_outputs is True and options.train_text_encoder
    assert not [n for n in notes if n.startswith("cache_text_encoder_outputs:")]
    session = TrainSession(LoraMethod(dataclasses.replace(options, progress=False)))
    session.setup()
    t5 = "text_encoder_2" if model == "tiny:flux" else "text_encoder_3"
    assert session.text_cache is not None and session.text_cache.partial == (t5,)
    assert session.text_cache.encoded == 2  # the two captions, once each


@pytest.mark.parametrize(
    ("dataset", "noted"),
    [
        ("[general]\nenable_bucket = true\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'a'\n", False),
        ("[[datasets]]\nenable_bucket = false\n[[datasets.subsets]]\nimage_dir = 'a'\n", False),
        ("[[datasets]]\nenable_bucket = true\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'a'\n", True),
        ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'a'\n", True),
    ],
)
def test_kohya_bucket_default_note_only_when_the_dataset_toml_leaves_it_to_the_run(tmp_path, dataset, noted):
    """A dataset TOML's enable_bucket decides its datasets' buckets; the "buckets are off unless
    --enable_bucket" default note appears only where some dataset falls back to the run's value."""
    toml = tmp_path / "dataset.toml"
    toml.write_text(dataset, encoding="utf-8")
    path = tmp_path / "kohya.toml"
    path.write_text(f'pretrained_model_name_or_path = "tiny:sd1"\ndataset_config = "{toml}"\n', encoding="utf-8")
    notes: list[str] = []
    load_options(TrainOptions, path, notes=notes)
    assert ("buckets are off unless --enable_bucket" in " | ".join(notes)) is noted


@pytest.mark.parametrize(("model", "module"), [("tiny:flux", "networks.lora_flux"), ("tiny:sd3", "networks.lora_sd3")])
def test_kohya_text_cache_note_with_train_t5xxl_says_kohya_refuses_it(tmp_path, model, module):
    """With train_t5xxl=True kohya's FLUX.1 and SD3 LoRA scripts stop on --cache_text_encoder_outputs
    (flux_train_network.py:196-199, sd3_train_network.py:172-175): the note says that, not that kohya caches T5."""
    pytest.importorskip("sdplugin_lora")
    from sdplugin_lora.method import LoraOptions

    path = tmp_path / "kohya.toml"
    path.write_text(
        f'pretrained_model_name_or_path = "{model}"\nnetwork_module = "{module}"\ncache_text_encoder_outputs = true\n'
        'network_args = ["train_t5xxl=True"]\n',
        encoding="utf-8",
    )
    notes: list[str] = []
    load_options(LoraOptions, path, notes=notes)
    (note,) = [n for n in notes if n.startswith("cache_text_encoder_outputs:")]
    assert "kohya refuses caching with train_t5xxl" in note and "caches T5" not in note


def test_kohya_text_cache_note_on_sd1_says_kohya_caches_nothing_there(tmp_path):
    """kohya's train_network.py (SD 1.x/2.x) never caches text-encoder outputs: its
    cache_text_encoder_outputs_if_needed only moves the encoders to the device (train_network.py:224-226)."""
    pytest.importorskip("sdplugin_lora")
    from sdplugin_lora.method import LoraOptions

    path = tmp_path / "kohya.toml"
    path.write_text(
        'pretrained_model_name_or_path = "tiny:sd1"\nnetwork_module = "networks.lora"\n'
        "cache_text_encoder_outputs = true\n",
        encoding="utf-8",
    )
    notes: list[str] = []
    load_options(LoraOptions, path, notes=notes)
    (note,) = [n for n in notes if n.startswith("cache_text_encoder_outputs:")]
    assert "kohya's train_network.py caches nothing on SD 1.x/2.x" in note


def test_kohya_use_t5xxl_cache_only_is_not_a_lora_script_option():
    """kohya's LoRA scripts (sd3_train_network.py, flux_train_network.py) have no --use_t5xxl_cache_only (only
    sd3_train.py's L1009 defines it; a TOML's unknown keys stay unread, train_util.py read_config_from_file): it
    does not turn an explicit ``cache_text_encoder_outputs = false`` on for a LoRA run."""
    from sdplugin_lora.method import LoraOptions

    notes: list[str] = []
    o = load_options(LoraOptions, None, kohya={"use_t5xxl_cache_only": True, "cache_text_encoder_outputs": False},
                     notes=notes)  # fmt: skip
    assert o.cache_text_encoder_outputs is False
    assert any(n.startswith("use_t5xxl_cache_only: ") and "sd3_train.py" in n for n in notes), notes
