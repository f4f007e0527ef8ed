"""LyCORIS presets (kohya ``network_args = ["preset=..."]``, ``--lycoris-preset``): the modules a kohya run with
``network_module = lycoris.kohya`` adapts, built-in presets and preset TOML files.

The expected sets are rewritten here from LyCORIS f49d30d (lycoris/config.py PRESET, lycoris/kohya.py
``create_modules``/``create_single_module``) as sd-scripts' models present themselves to it: SD1/SD2 with
diffusers paths and class names (attention class ``CrossAttention``), SDXL with SGM paths, so the
top-level names (``conv_in``, ``time_embedding.linear_1``) match nothing there; CLIP as
``text_model.encoder...``. Not computed with sdplugin_lora.presets."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from lora_testutil import fresh_bundle, unet_inputs
from sdcore.errors import ConfigError
from sdcore.testing.contract import make_tiny_dataset
from sdcore.train.method import SaveInfo
from sdplugin_lora.adapters import GloraAdapter, LohaAdapter, LokrAdapter, LoraAdapter
from sdplugin_lora.apply import apply_lora
from sdplugin_lora.format import read_lora
from sdplugin_lora.method import LoraMethod, LoraOptions
from sdplugin_lora.naming import ModuleIndex
from torch import nn

BLOCKS = ("Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D")
CLIP = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")
TOP = ("conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2")
#: LyCORIS f49d30d lycoris/config.py, the SD UNet/CLIP entries: (enable_conv, UNet classes, UNet names, TE classes)
PRESETS = {
    "full": (True, BLOCKS, TOP, CLIP),
    "full-lin": (False, ("Transformer2DModel", "ResnetBlock2D"), TOP[2:], CLIP),
    "attn-mlp": (False, ("Transformer2DModel",), (), CLIP),
    "attn-only": (False, ("CrossAttention", "SelfAttention"), (), ("CLIPAttention", "CLIPSdpaAttention")),
    "unet-only": (True, BLOCKS, TOP, ()),
    "unet-transformer-only": (False, ("Transformer2DModel",), (), ()),
    "unet-convblock-only": (True, BLOCKS[1:], TOP[:2], ()),
}


def _adaptable(module: nn.Module, conv: bool) -> bool:
    """create_single_module: a Linear, a 1x1 conv, a kxk conv only with conv_dim."""
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, nn.Conv2d) and (module.kernel_size == (1, 1) or conv)


def _expected(bundle, preset: str, conv: bool, *, te: bool = True) -> set[str]:
    enable, classes, names, te_classes = PRESETS[preset]
    conv = conv and enable
    index = ModuleIndex.from_bundle(bundle)
    want: set[str] = set()
    for component, root in bundle.components().items():
        if component == "unet":
            wanted = classes
        elif component.startswith("text_encoder") and te:
            wanted = te_classes
        else:
            continue
        for path, module in root.named_modules():
            kind = "CrossAttention" if type(module).__name__ == "Attention" else type(module).__name__
            if kind in wanted:
                for sub, leaf in module.named_modules():
                    if _adaptable(leaf, conv):
                        want.add(index.name_of(component, f"{path}.{sub}" if sub else path))
        if component == "unet" and not bundle.is_sdxl:  # SDXL's SGM paths start with none of these names
            for name in names:
                if _adaptable(root.get_submodule(name), conv):
                    want.add(index.name_of("unet", name))
    return want


def _method(**options) -> LoraMethod:
    method = LoraMethod(LoraOptions(**options))
    method.validate()
    return method


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("preset", list(PRESETS))
def test_builtin_presets_adapt_the_modules_lycoris_adapts(family, preset):
    bundle = fresh_bundle(family)
    for conv_rank in (0, 2):
        method = _method(rank=2, conv_rank=conv_rank, algo="loha", train_text_encoder=True, lycoris_preset=preset)
        method.prepare(bundle)
        names = set(method.network.loras)
        assert names == _expected(bundle, preset, conv_rank > 0), (preset, conv_rank)
        assert all(isinstance(m, LohaAdapter) for m in method.network)
        method.network.remove()
    if preset in ("full", "unet-convblock-only"):
        if family == "sd1":
            assert {"lora_unet_conv_in", "lora_unet_conv_out"} <= names
        else:  # sd-scripts' SDXL UNet calls them input_blocks.0.0 / out.2: re.match("conv_in", ...) fails
            assert not {"lora_unet_input_blocks_0_0", "lora_unet_out_2"} & names
    if preset == "attn-only":
        assert all(re.search(r"_(attn[12]|self_attn)_", n) for n in names)
    if preset.startswith("unet-"):
        assert not any(n.startswith("lora_te") for n in names)
        assert not method.capabilities().trains_text_encoder


def test_presets_follow_the_text_encoder_switch():
    bundle = fresh_bundle("sd1")
    method = _method(rank=2, algo="lokr", lycoris_preset="full-lin")  # sdcore default: UNet only
    method.prepare(bundle)
    assert set(method.network.loras) == _expected(bundle, "full-lin", False, te=False)
    assert any(n.endswith("time_emb_proj") for n in method.network.loras)  # full-lin keeps the ResNet Linears


def test_ia3_and_unknown_presets_are_refused_with_the_reason():
    with pytest.raises(ConfigError, match="no module of an SD1/SD2/SDXL UNet or CLIP encoder matches"):
        _method(algo="ia3", lycoris_preset="ia3")
    # LyCORIS compares names exactly; anything else is read as a TOML file
    with pytest.raises(ConfigError, match=r"neither a built-in preset .* nor a TOML file"):
        _method(algo="lokr", lycoris_preset="Full")
    with pytest.raises(ConfigError, match=r"kohya's networks\.oft has none"):
        _method(algo="oft", lycoris_preset="attn-mlp")
    with pytest.raises(ConfigError, match="adapts nothing that trains here"):
        _method(algo="lokr", lycoris_preset="unet-only", te_only=True)


def _toml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "preset.toml"
    path.write_text(text)
    return str(path)


PRESET_TOML = """
enable_conv = false
use_fnmatch = true
unet_target_module = ["FeedForward"]
unet_target_name = ["*.attn2.to_k", "conv_in", "up_blocks.1.attentions.0.proj_out"]
text_encoder_target_module = []
text_encoder_target_name = ["*.layers.0.self_attn.q_proj"]

[module_algo_map.FeedForward]
algo = "lokr"
dim = 2
factor = 4

[name_algo_map."*.attn2.to_k"]
algo = "loha"
dim = 3
alpha = 1.5
"""


def test_preset_toml_selects_and_maps_algos_as_lycoris(tmp_path):
    bundle = fresh_bundle("sd1")
    path = _toml(tmp_path, PRESET_TOML)
    method = _method(rank=4, alpha=2.0, algo="locon", train_text_encoder=True, lycoris_preset=path)
    method.prepare(bundle)
    modules = method.network.loras
    unet = bundle.unet
    ff = {f"lora_unet_{p}_{s}".replace(".", "_") for p, m in unet.named_modules() if type(m).__name__ == "FeedForward"
          for s in ("net.0.proj", "net.2")}  # fmt: skip
    to_k = {f"lora_unet_{p}".replace(".", "_") for p, _ in unet.named_modules() if p.endswith(".attn2.to_k")}
    # fnmatch: proj_out is taken by its full path; conv_in is a 3x3 conv with no conv rank (enable_conv=false)
    # and no mapped dim, so LyCORIS gives it no module
    wanted = (
        ff
        | to_k
        | {"lora_unet_up_blocks_1_attentions_0_proj_out", "lora_te_text_model_encoder_layers_0_self_attn_q_proj"}
    )
    assert set(modules) == wanted
    for name in ff:  # module_algo_map: LoKr, dim 2 (full rank factor test below), factor 4
        assert isinstance(modules[name], LokrAdapter) and modules[name].rank == 2
    for name in to_k:
        assert isinstance(modules[name], LohaAdapter) and (modules[name].rank, modules[name].alpha) == (3, 1.5)
    plain = modules["lora_unet_up_blocks_1_attentions_0_proj_out"]
    assert isinstance(plain, LoraAdapter) and (plain.rank, plain.alpha) == (4, 2.0)
    # the saved file holds each module in its own algo's keys and loads back onto a fresh model
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in method.network.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    saved = method.save(bundle, SaveInfo(path=tmp_path / "p.safetensors", step=1, epoch=1, metadata={}, final=True))
    lora = read_lora(saved)
    kinds = {name: w.kind for name, w in lora.modules.items()}
    assert {kinds[n] for n in ff} == {"lokr"} and {kinds[n] for n in to_k} == {"loha"}
    assert json.loads(lora.metadata["ss_network_args"])["preset"] == path
    latents, t, hidden, _ = unet_inputs(bundle)
    with torch.no_grad():
        trained = bundle.unet(latents, t, encoder_hidden_states=hidden).sample
    merged = fresh_bundle("sd1")
    apply_lora(merged, saved, merge=True, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(
            merged.unet(latents, t, encoder_hidden_states=hidden).sample, trained, atol=1e-4, rtol=0
        )


def test_preset_toml_regex_and_nested_map_inherit_the_blocks_algo(tmp_path):
    """re.match (no use_fnmatch) from the path's start; a map class inside a target block restarts with its
    own settings and the block's algo (create_modules_: next_config.get("algo", algo))."""
    bundle = fresh_bundle("sd1")
    path = _toml(
        tmp_path,
        """
unet_target_module = ["Transformer2DModel"]
unet_target_name = ["down_blocks\\\\.\\\\d\\\\.resnets\\\\.0\\\\.time_emb_proj"]
text_encoder_target_module = []
[module_algo_map.Transformer2DModel]
algo = "loha"
[module_algo_map.CrossAttention]
dim = 2
""",
    )
    method = _method(rank=4, algo="lokr", lycoris_preset=path)
    method.prepare(bundle)
    modules = method.network.loras
    attn = [m for n, m in modules.items() if "_attn1_" in n or "_attn2_" in n]
    others = [m for n, m in modules.items() if "_attentions_" in n and m not in attn]
    assert attn and all(isinstance(m, LohaAdapter) and m.rank == 2 for m in attn)
    assert others and all(isinstance(m, LohaAdapter) and m.rank == 4 for m in others)
    emb = {n for n in modules if n.endswith("time_emb_proj")}
    downs = {p for p, _ in bundle.unet.named_modules() if re.match(r"down_blocks\.\d\.resnets\.0\.time_emb_proj$", p)}
    assert emb == {f"lora_unet_{p}".replace(".", "_") for p in downs} and emb
    assert all(isinstance(modules[n], LokrAdapter) for n in emb)  # no map for Linear: the network's algo


def test_preset_toml_maps_glora_as_lycoris_does(tmp_path):
    """LyCORIS f49d30d lycoris/wrapper.py:45-55 network_module_dict has "glora" (lycoris/kohya.py:403 builds a map
    entry's algo from it), so a preset may give a class GLoRA: its Linears get a1/a2/b1/b2 at the map's dim,
    the rest the network's algo. sdcore refused the entry ("sdcore trains ... per module") though it trains GLoRA."""
    bundle = fresh_bundle("sd1")
    path = _toml(
        tmp_path,
        """
unet_target_module = ["Transformer2DModel"]
unet_target_name = []
text_encoder_target_module = []
[module_algo_map.CrossAttention]
algo = "glora"
dim = 2
""",
    )
    method = _method(rank=4, algo="lokr", lycoris_preset=path)
    method.prepare(bundle)
    modules = method.network.loras
    attn = {n: m for n, m in modules.items() if "_attn1_" in n or "_attn2_" in n}
    assert attn and all(isinstance(m, GloraAdapter) and m.rank == 2 for m in attn.values())
    assert all(isinstance(m, LokrAdapter) for n, m in modules.items() if n not in attn)
    assert {k for m in attn.values() for k in m.state_dict()} == {
        "a1.weight", "a2.weight", "b1.weight", "b2.weight", "alpha"}  # fmt: skip


def test_preset_toml_problems_are_listed_at_once(tmp_path):
    path = _toml(
        tmp_path,
        """
exclude_name = ["conv_in"]
lora_prefix = "x"
unet_target_module = "Transformer2DModel"
typo = 1
[module_algo_map.CrossAttention]
algo = "dylora"
weight_decompose = true
""",
    )
    with pytest.raises(ConfigError) as info:
        _method(algo="lokr", lycoris_preset=path)
    text = str(info.value)
    for part in ("exclude_name is read by LyCORIS' generic wrapper only", "lora_prefix", "must be a list of strings",
                 "unknown key 'typo'", "algo 'dylora'", "weight_decompose"):  # fmt: skip
        assert part in text, text


def test_preset_toml_reaching_a_module_twice_stops_as_lycoris_does(tmp_path):
    path = _toml(tmp_path, 'unet_target_module = ["Transformer2DModel", "CrossAttention"]\n')
    method = _method(algo="lokr", lycoris_preset=path)
    with pytest.raises(ConfigError, match="duplicated lora name"):
        method.prepare(fresh_bundle("sd1"))


def test_kohya_config_with_a_preset_translates_trains_and_keeps_it_in_the_metadata(tmp_path):
    from sdcore.train.config import load_options

    kohya = {"network_module": "lycoris.kohya", "network_args": ["preset=attn-only", "algo=lokr", "conv_dim=4"]}
    notes: list[str] = []
    o = load_options(LoraOptions, None, kohya=kohya, notes=notes)
    assert (o.lycoris_preset, o.algo) == ("attn-only", "lokr")
    assert any("conv_dim has no effect with preset=attn-only" in n for n in notes)
    data = make_tiny_dataset(tmp_path / "data", n=2, size=64)
    out = tmp_path / "out"
    cfg = tmp_path / "kohya.toml"
    cfg.write_text(
        f"""pretrained_model_name_or_path = "tiny:sd1"
train_data_dir = "{data}"
output_dir = "{out}"
output_name = "preset"
resolution = "64"
max_train_steps = 2
save_precision = "float"
network_dim = 2
network_module = "lycoris.kohya"
network_args = ["preset=attn-only", "algo=lokr"]
"""
    )
    from sdcore.cli import build_cli
    from sdcore.plugins import get_plugin_manager

    result = CliRunner().invoke(
        build_cli(get_plugin_manager()), ["train", "lora", "--config", str(cfg), "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    lora = read_lora(out / "preset.safetensors")
    assert lora.metadata["ss_network_module"] == "lycoris.kohya"
    args = json.loads(lora.metadata["ss_network_args"])
    assert (args["preset"], args["algo"]) == ("attn-only", "lokr")
    assert {w.kind for w in lora.modules.values()} == {"lokr"}
    # kohya trains the text encoder by default: attn-only adapts its self_attn too
    assert all(re.search(r"_(attn[12]|self_attn)_", n) for n in lora.modules)
    assert any(n.startswith("lora_te_") for n in lora.modules)


def test_cli_trains_a_preset(tmp_path):
    from sdcore.cli import build_cli
    from sdcore.plugins import get_plugin_manager

    data = make_tiny_dataset(tmp_path / "data", n=2, size=64)
    out = tmp_path / "out" / "conv.safetensors"
    args = ["train", "lora", "--model", "tiny:sd1", "--data", str(data), "--output", str(out), "--rank", "2",
            "--resolution", "64", "--max-steps", "1", "--save-dtype", "fp32", "--no-progress", "--algo", "locon",
            "--lycoris-preset", "unet-convblock-only"]  # fmt: skip
    result = CliRunner().invoke(build_cli(get_plugin_manager()), args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    lora = read_lora(out)
    assert set(lora.modules) == _expected(fresh_bundle("sd1"), "unet-convblock-only", True, te=False)
    assert json.loads(lora.metadata["ss_network_args"])["preset"] == "unet-convblock-only"


def test_lycoris_example_preset_file_mixes_algos_per_class(tmp_path):
    """LyCORIS' own example_configs/preset_configs/example.toml (Apache-2.0, tests/data/lycoris): LoKr full
    matrices on CrossAttention/FeedForward/CLIPMLP (dim 1e13/1e11 triggers LyCORIS' full w2), Tucker LoCon
    rank 4 alpha 1 on the ResNets, LoRA rank 8 alpha 1 on CLIPAttention; the rest at the network's settings."""
    bundle = fresh_bundle("sd1")
    preset = str(Path(__file__).parent / "data" / "lycoris" / "example.toml")
    method = _method(rank=6, alpha=3.0, conv_rank=6, algo="locon", train_text_encoder=True, lycoris_preset=preset)
    method.prepare(bundle)
    modules = method.network.loras
    assert set(modules) == _expected(bundle, "full", True)  # its targets are full's
    for name, module in modules.items():
        if re.search(r"_attn[12]_|_ff_|_mlp_", name):
            assert isinstance(module, LokrAdapter) and module.full_matrix, name
        elif "_resnets_" in name:
            assert isinstance(module, LoraAdapter) and (module.rank, module.alpha) == (4, 1.0), name
            assert (module.lora_mid is not None) == name.endswith(("_conv1", "_conv2")), name  # Tucker: kxk only
        elif "_self_attn_" in name:
            assert isinstance(module, LoraAdapter) and (module.rank, module.alpha) == (8, 1.0), name
        else:  # proj_in/out, samplers, conv_in/out, time embedding: the network's LoCon
            assert isinstance(module, LoraAdapter) and (module.rank, module.alpha) == (6, 3.0), name
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in method.network.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    saved = method.save(bundle, SaveInfo(path=tmp_path / "ex.safetensors", step=1, epoch=1, metadata={}, final=True))
    latents, t, hidden, _ = unet_inputs(bundle)
    with torch.no_grad():
        trained = bundle.unet(latents, t, encoder_hidden_states=hidden).sample
    merged = fresh_bundle("sd1")
    apply_lora(merged, saved, merge=True, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(
            merged.unet(latents, t, encoder_hidden_states=hidden).sample, trained, atol=1e-4, rtol=0
        )


def test_a_missing_preset_file_is_one_line_in_the_dry_run(tmp_path):
    """The option check and the memory plan's dry prepare both meet a preset that does not load; the user
    reads it once, beside the other problems, and nothing is written."""
    from sdcore.cli import build_cli
    from sdcore.plugins import get_plugin_manager

    data = make_tiny_dataset(tmp_path / "data", n=2, size=64)
    out = tmp_path / "out" / "p.safetensors"
    args = ["train", "lora", "--model", "tiny:sd1", "--data", str(data), "--output", str(out), "--resolution", "64",
            "--lycoris-preset", str(tmp_path / "nope.toml"), "--resolutions", "64,x", "--dry-run"]  # fmt: skip
    result = CliRunner().invoke(build_cli(get_plugin_manager()), args)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert sum("nope.toml" in line for line in errors) == 1, errors
    assert any("--resolutions '64,x'" in line for line in errors), errors
    assert "Traceback" not in result.output and not out.parent.exists()
