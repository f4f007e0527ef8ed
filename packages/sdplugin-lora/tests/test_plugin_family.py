"""LoRA on a model family only a plugin declares (``plugin_family``: a name sdcore and sdplugin-lora never see
in their code): the CLI trains it, the file names its modules and family, and ``<lora:...>`` renders with it."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from plugin_family import FAMILY, NAME
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from sdcore.models import family as fam
from sdcore.models.family import temporary_family


@pytest.fixture
def toyflow():
    with temporary_family(FAMILY):
        yield FAMILY
    fam.reset_family_cache()


def _block_linears(transformer: torch.nn.Module) -> set[str]:
    """The Linears inside numbered blocks, found here independently of the code under test."""
    return {
        path
        for path, module in transformer.named_modules()
        if isinstance(module, torch.nn.Linear) and re.search(r"(^|\.)\d+\.", path)
    }


def test_default_targets_of_a_family_without_kohya_names_are_its_block_linears(toyflow):
    from sdcore.models.load import load_model
    from sdplugin_lora.naming import ModuleIndex

    bundle = load_model(f"tiny:{NAME}")
    index = ModuleIndex.from_bundle(bundle)
    chosen = {t.path for t in index.targets.values() if t.component == "transformer" and t.group == "transformer"}
    expected = _block_linears(bundle.transformer)
    assert chosen == expected and len(expected) > 10
    assert index.kohya == {}  # no SAI/BFL names: the file keeps the diffusers paths
    others = {t.path for t in index.targets.values() if t.component == "transformer" and t.group == "other"}
    assert {"time_step_proj.linear_1", "proj_out"} <= others  # embedders and final layer stay opt-in
    # its encoder is neither CLIP nor T5: --train-text-encoder trains every Linear of it, named with the declared prefix
    encoder = bundle.text_encoders[0]
    te = {t.path: n for n, t in index.targets.items() if t.component == "text_encoder" and t.group == "te"}
    assert set(te) == {p for p, m in encoder.named_modules() if isinstance(m, torch.nn.Linear)} and len(te) == 7
    assert te["encoder.block.0.layer.0.SelfAttention.q"] == "lora_te1_encoder_block_0_layer_0_SelfAttention_q"


def test_the_metadata_names_a_plugin_family_and_reads_back(toyflow):
    from sdplugin_lora.format import family_from_metadata, network_metadata

    meta = network_metadata(family=NAME, prediction_type="flow-matching", rank=4, alpha=4.0)
    assert meta["ss_base_model_version"] == NAME and meta["modelspec.architecture"] == f"{NAME}/lora"
    assert "modelspec.prediction_type" not in meta  # a flow family is neither epsilon nor v
    assert family_from_metadata(meta) == NAME
    assert family_from_metadata({"modelspec.architecture": f"{NAME}/lora"}) == NAME
    assert family_from_metadata({"ss_base_model_version": "no-such-family"}) is None  # unknown names stay unknown
    # sdcore's own families keep kohya's values
    sd1 = network_metadata(family="sd1", prediction_type="epsilon", rank=4, alpha=4.0)
    assert sd1["modelspec.prediction_type"] == "epsilon"


def test_metadata_without_a_run_resolution_says_the_plugin_familys_native_one():
    """``lora extract`` and ``lora merge`` have no run resolution: modelspec.resolution is then the family's native
    side (as kohya's 1024 for SDXL/SD3/Flux, sai_model_spec.determine_resolution), not SD1's 512."""
    import dataclasses

    from sdplugin_lora.format import network_metadata

    odd = dataclasses.replace(FAMILY, name="toyflow768", native_resolution=768)
    with temporary_family(odd):
        meta = network_metadata(family=odd.name, prediction_type="flow-matching", rank=4, alpha=4.0)
        assert meta["modelspec.resolution"] == "768x768"
        given = network_metadata(family=odd.name, prediction_type="flow-matching", rank=4, alpha=4.0, resolution=512)
        assert given["modelspec.resolution"] == "512x512"  # the run's resolution wins
    fam.reset_family_cache()
    assert network_metadata(family="sd1", rank=4, alpha=4.0)["modelspec.resolution"] == "512x512"
    assert network_metadata(family="sdxl", rank=4, alpha=4.0)["modelspec.resolution"] == "1024x1024"


def test_clip_skip_is_written_only_for_a_family_with_a_clip_encoder(toyflow):
    """``modelspec.encoder_layer`` is a CLIP skip: kohya writes it only from ``--clip_skip`` (sd-scripts
    library/sai_model_spec.py:452; default None, library/train_util.py:4020), which a T5/UMT5-only model has no use
    for; sdcore's run always has one (default 1), so the family's encoders decide."""
    from sdplugin_lora.format import network_metadata

    meta = network_metadata(family=NAME, prediction_type="flow-matching", rank=4, alpha=4.0, clip_skip=1)
    assert "modelspec.encoder_layer" not in meta  # a UMT5 encoder only
    assert "modelspec.encoder_layer" not in network_metadata(family="chroma", rank=4, alpha=4.0, clip_skip=1)  # T5
    for family in ("sd1", "sd2", "sdxl", "sdxl-refiner", "sd3", "flux"):  # a CLIP encoder: kept
        assert network_metadata(family=family, rank=4, alpha=4.0, clip_skip=2)["modelspec.encoder_layer"] == "2"


def test_a_file_naming_a_family_that_is_not_installed_is_not_taken_for_flux(tmp_path):
    """sdcore writes a plugin family's name as both ``ss_base_model_version`` and ``modelspec.architecture``
    (``<family>/lora``); read where that plugin is not installed, the file is still that family's (``lora info``, the
    refusal on another model), not FLUX.1's because AuraFlow's blocks are also called ``single_transformer_blocks``."""
    import dataclasses

    from sdcore.errors import NetworkMismatchError
    from sdplugin_lora.format import check_family, detect_family, family_from_metadata, network_metadata, read_lora

    state = {}
    for block in ("joint_transformer_blocks", "single_transformer_blocks"):
        state[f"lora_transformer_{block}_0_attn_to_q.lora_down.weight"] = torch.ones(2, 16)
        state[f"lora_transformer_{block}_0_attn_to_q.lora_up.weight"] = torch.ones(16, 2)
    path = tmp_path / "toy.safetensors"
    save_file(state, str(path), network_metadata(family=NAME, prediction_type="flow-matching", rank=2, alpha=2.0))
    lora = read_lora(path)
    assert detect_family(lora) == (NAME, "its metadata")  # the toy family is not registered in this test
    for family in ("flux", "sd1"):
        with pytest.raises(NetworkMismatchError, match=rf"made for {NAME} \(from its metadata\); the loaded model is"):
            check_family(lora, family)
    # on a plugin's family, a name that no installed family has may be another name for it: the modules' match decides
    hunyuan = {"ss_base_model_version": "hunyuan-image-2.1", "modelspec.architecture": "hunyuan-image-2.1/lora"}
    # kohya's HunyuanImage writes its MODEL_VERSION_2_1 (sd-scripts library/hunyuan_image_utils.py:16) as both
    assert family_from_metadata(hunyuan) == "hunyuan-image-2.1"
    kohya_hunyuan = dataclasses.replace(lora, metadata=hunyuan)
    with temporary_family(FAMILY):
        check_family(lora, NAME)
        check_family(kohya_hunyuan, NAME)  # not refused by its name
    fam.reset_family_cache()
    with pytest.raises(NetworkMismatchError, match=r"made for hunyuan-image-2.1 \(from its metadata\); the loaded"):
        check_family(kohya_hunyuan, "sd1")  # sdcore's own families know their names
    # kohya's values, whose version and architecture differ, read as before; a lone unknown version tells nothing
    flux = {"ss_base_model_version": "flux1", "modelspec.architecture": "flux-1-dev/lora"}
    assert family_from_metadata(flux) == "flux"
    assert (
        family_from_metadata({"ss_base_model_version": "chroma", "modelspec.architecture": "chroma/lora"}) == "chroma"
    )
    assert family_from_metadata({"ss_base_model_version": "sdxl_base_v1-0"}) == "sdxl"
    assert family_from_metadata({"ss_base_model_version": "whatever"}) is None
    assert family_from_metadata({"ss_base_model_version": "a", "modelspec.architecture": "b/lora"}) is None


def test_two_module_paths_that_flatten_to_one_lora_name_are_refused_naming_both():
    """``lora_transformer_<path>`` flattens dots to underscores (kohya's ``replace(".", "_")``), so a plugin's
    transformer with ``blocks.0.ff_out`` and ``blocks.0.ff.out`` would train one module under both names and lose the
    other; kohya refuses such a network ("duplicated lora name", sd-scripts networks/lora.py:1059)."""
    from sdcore.errors import ModelFormatError
    from sdplugin_lora.naming import ModuleIndex

    block = torch.nn.Module()
    block.ff_out = torch.nn.Linear(4, 4)
    block.ff = torch.nn.Module()
    block.ff.out = torch.nn.Linear(4, 4)
    transformer = torch.nn.Module()
    transformer.blocks = torch.nn.ModuleList([block])
    want = r"blocks\.0\.ff_out and blocks\.0\.ff\.out .*lora_transformer_blocks_0_ff_out"
    with pytest.raises(ModelFormatError, match=want):
        ModuleIndex.build_dit(NAME, transformer, [])


def _png(path) -> torch.Tensor:
    from PIL import Image

    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32))


def test_a_plugin_flow_family_trains_a_lora_through_the_cli_and_renders_with_it(toyflow, tmp_path):
    from sdcore.cli import build_cli
    from sdcore.models.load import load_model
    from sdcore.plugins import get_plugin_manager
    from sdcore.testing.datasets import make_tiny_dataset
    from sdplugin_lora.apply import apply_lora

    cli = build_cli(get_plugin_manager())
    data = make_tiny_dataset(tmp_path / "data")
    loras = tmp_path / "loras"
    out = loras / "toy.safetensors"
    args = ["train", "lora", "--model", f"tiny:{NAME}", "--data", str(data), "--output", str(out), "--max-steps", "3",
            "--lr", "1e-2", "--rank", "4", "--no-progress"]  # fmt: skip
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output

    bundle = load_model(f"tiny:{NAME}")
    expected = {"lora_transformer_" + p.replace(".", "_") for p in _block_linears(bundle.transformer)}
    state = load_file(str(out))
    assert {k.rsplit(".", 2)[0] if "lora_" in k.rsplit(".", 2)[-2] else k.rsplit(".", 1)[0] for k in state} == expected
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert meta["ss_base_model_version"] == NAME and meta["modelspec.architecture"] == f"{NAME}/lora"

    # merged at weight w, each module is W + w * alpha/rank * up @ down (kohya's LoRA formula)
    base = {k: v.clone() for k, v in bundle.transformer.state_dict().items()}
    applied = apply_lora(bundle, out, 0.5, merge=True, strict=True)
    merged = bundle.transformer.state_dict()
    moved = 0
    for name in expected:
        path = name.removeprefix("lora_transformer_")
        module = next(p for p in _block_linears(bundle.transformer) if p.replace(".", "_") == path)
        up, down = state[f"{name}.lora_up.weight"].float(), state[f"{name}.lora_down.weight"].float()
        scale = float(state[f"{name}.alpha"]) / down.shape[0]
        delta = 0.5 * scale * (up @ down)
        torch.testing.assert_close(merged[f"{module}.weight"], base[f"{module}.weight"] + delta, atol=1e-6, rtol=0)
        moved += int(delta.abs().max() > 0)
    assert moved == len(expected)  # three steps at lr 1e-2 moved every module
    applied.remove()
    # without its metadata (another tool's copy) the names look like Flux's single blocks: not a refusal here
    bare = tmp_path / "bare.safetensors"
    save_file(state, str(bare))
    apply_lora(bundle, bare, 1.0, merge=False, strict=True).remove()

    def render(prompt: str, name: str) -> torch.Tensor:
        target = tmp_path / name
        args = ["generate", prompt, "--model", f"tiny:{NAME}", "--steps", "2", "--seed", "3", "--size", "64x64",
                "--lora-dir", str(loras), "-o", str(target)]  # fmt: skip
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 0, result.output
        return _png(target)

    plain = render("a red circle", "plain.png")
    assert torch.equal(render("a red circle <lora:toy:0>", "zero.png"), plain)  # weight 0 changes nothing
    with_lora = render("a red circle <lora:toy:1>", "lora.png")
    assert (with_lora - plain).abs().max() > 0
    from sdcore.generate.pnginfo import read_png_parameters

    params = read_png_parameters(tmp_path / "lora.png")
    assert params is not None and "toy" in params.extra["Lora hashes"]
    assert (params.cfg, params.sampler) == (3.0, "euler")  # the adapter's default_cfg and default_sampler
