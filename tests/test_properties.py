"""Property-based tests (hypothesis) for the name conversions and config parsers.

Random UNet layouts check that ldm <-> diffusers key conversion and kohya <-> module-path naming
are one-to-one for *any* layout diffusers can build (not just the real ones); random dataset
configs check that the TOML reader either parses or raises our own error, never anything else.
"""

from __future__ import annotations

import string
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sdcore.errors import SdcoreError


@st.composite
def unet_layouts(draw):
    """A random but valid UNet2DConditionModel config (channels kept tiny; built on the meta device)."""
    blocks = draw(st.integers(1, 3))
    attention = [draw(st.booleans()) for _ in range(blocks)]
    down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention]
    up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)]
    sdxl_style = draw(st.booleans())
    config = {
        "block_out_channels": [8 * (i + 1) for i in range(blocks)],
        "layers_per_block": draw(st.integers(1, 2)),
        "down_block_types": down,
        "up_block_types": up,
        "norm_num_groups": 4,
        "cross_attention_dim": 16,
        "attention_head_dim": 2,
        "sample_size": 8,
        "use_linear_projection": sdxl_style,
    }
    if any(attention):
        config["transformer_layers_per_block"] = [draw(st.integers(1, 2)) for _ in range(blocks)]
    if not any(attention):
        config["mid_block_type"] = "UNetMidBlock2D" if draw(st.booleans()) else "UNetMidBlock2DCrossAttn"
    return config, sdxl_style


def _meta_unet(config):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**config)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(unet_layouts())
def test_ldm_unet_key_conversion_is_one_to_one_for_any_layout(layout):
    from sdcore.models.convert.unet import unet_key_map

    config, _ = layout
    unet = _meta_unet(config)
    keys = list(unet.state_dict())
    mapping = unet_key_map(keys, dict(unet.config))
    assert set(mapping) == set(keys), "every diffusers key gets an ldm name"
    assert len(set(mapping.values())) == len(keys), "two diffusers keys map to one ldm key"
    assert all(value.startswith("model.diffusion_model.") for value in mapping.values())


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(unet_layouts())
def test_kohya_names_round_trip_to_module_paths_for_any_layout(layout):
    from sdplugin_lora.naming import ModuleIndex

    config, sdxl_style = layout
    unet = _meta_unet(config)
    family = "sdxl" if sdxl_style else "sd1"
    index = ModuleIndex.build(family, unet, [])
    patchable = [
        path for path, module in unet.named_modules() if path and isinstance(module, torch.nn.Linear | torch.nn.Conv2d)
    ]
    assert len(index.targets) == len(patchable), "two modules share a kohya name"
    for path in patchable:
        name = index.name_of("unet", path)
        assert name.startswith("lora_unet_") and "." not in name
        assert index.resolve(name).path == path
        for alias in index.resolve(name).aliases:
            assert index.resolve(alias).path == path


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=string.ascii_letters + string.digits + "_.", max_size=60))
def test_resolving_arbitrary_names_never_crashes(name):

    index = _sd1_index()
    target = index.resolve(name)
    assert target is None or target.name == name or name in target.aliases


_INDEX = {}


def _sd1_index():
    if "sd1" not in _INDEX:
        from sdcore.models.tiny import tiny_unet_config
        from sdplugin_lora.naming import ModuleIndex

        _INDEX["sd1"] = ModuleIndex.build("sd1", _meta_unet(tiny_unet_config("sd1")), [])
    return _INDEX["sd1"]


_VALUES = st.one_of(
    st.integers(-3, 2000),
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.booleans(),
    st.text(max_size=12),
    st.lists(st.integers(0, 1024), max_size=3),
)
_SUBSET_KEYS = [
    "image_dir",
    "num_repeats",
    "caption_extension",
    "keep_tokens",
    "shuffle_caption",
    "flip_aug",
    "class_tokens",
    "is_reg",
    "caption_dropout_rate",
    "caption_tag_dropout_rate",
    "color_aug",
    "bogus_key",
]
_DATASET_KEYS = ["resolution", "batch_size", "enable_bucket", "min_bucket_reso", "max_bucket_reso", "unknown"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    general=st.dictionaries(st.sampled_from([*_DATASET_KEYS, "keep_tokens", "shuffle_caption"]), _VALUES, max_size=3),
    dataset=st.dictionaries(st.sampled_from(_DATASET_KEYS), _VALUES, max_size=3),
    subsets=st.lists(st.dictionaries(st.sampled_from(_SUBSET_KEYS), _VALUES, max_size=5), max_size=3),
    use_real_dir=st.booleans(),
)
def test_dataset_toml_parses_or_raises_our_error(tmp_path_factory, general, dataset, subsets, use_real_dir):
    import tomli_w
    from sdcore.data.dataset import load_toml_dataset_config

    folder = tmp_path_factory.mktemp("toml")
    images = folder / "imgs"
    images.mkdir()
    for subset in subsets:
        if use_real_dir:
            subset["image_dir"] = str(images)
    document = {"general": general, "datasets": [{**dataset, "subsets": subsets}]}
    path = folder / "dataset.toml"
    path.write_text(tomli_w.dumps(document))
    try:
        result = load_toml_dataset_config(path)
    except SdcoreError as exc:
        assert str(exc) and "\n" not in str(exc).strip()
        return
    assert isinstance(result, list)
    for subset in result:
        assert Path(subset.image_dir).is_absolute() or subset.image_dir
        assert subset.repeats >= 1


def test_key_conversion_matches_the_real_sd15_layout():
    """The real SD1.5 UNet (meta device): known ldm names come out of the generic conversion."""
    from sdcore.models.convert.unet import unet_key_map
    from sdcore.models.load import bundled_config

    config = bundled_config("sd1", None)["unet"]
    unet = _meta_unet(config)
    mapping = unet_key_map(list(unet.state_dict()), dict(unet.config))
    known = {
        "down_blocks.0.attentions.0.proj_in.weight": "model.diffusion_model.input_blocks.1.1.proj_in.weight",
        "down_blocks.1.resnets.0.conv1.weight": "model.diffusion_model.input_blocks.4.0.in_layers.2.weight",
        "down_blocks.0.downsamplers.0.conv.weight": "model.diffusion_model.input_blocks.3.0.op.weight",
        "mid_block.attentions.0.proj_out.weight": "model.diffusion_model.middle_block.1.proj_out.weight",
        "up_blocks.1.upsamplers.0.conv.weight": "model.diffusion_model.output_blocks.5.2.conv.weight",
        "time_embedding.linear_1.weight": "model.diffusion_model.time_embed.0.weight",
        "conv_norm_out.weight": "model.diffusion_model.out.0.weight",
    }
    for diffusers_key, ldm_key in known.items():
        assert mapping[diffusers_key] == ldm_key, diffusers_key
    assert len(set(mapping.values())) == len(mapping)


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__])
