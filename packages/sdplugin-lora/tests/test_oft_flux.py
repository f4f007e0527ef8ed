"""OFT on FLUX.1 as kohya's ``networks/oft_flux.py`` trains it, on the tiny diffusers Flux transformer.

Written here from kohya's rules (sd-scripts ``networks/oft_flux.py``, ``library/flux_models.py``), not from sdcore:

* targets: every ``Linear`` under a module of class ``DoubleStreamBlock``/``SingleStreamBlock``
  (``enable_all_linear``) or ``SelfAttention`` (default), named ``oft_unet_`` + the BFL path with ``_``;
* ``split_dims``: a name with ``double`` and ``qkv`` is 3 x hidden, one with ``single`` and ``linear1`` is
  3 x hidden + MLP width (kohya writes FLUX.1's 3072 and 12288), any other one part of all rows;
* per part ``i``: ``Q = B_i - B_iᵀ``, norm clamped to ``alpha · split_dim_i`` (``(new + 1e-8) / (norm + 1e-8)``),
  ``R = (I + Q)(I - Q)⁻¹``, ``m·(R - I) + I``; the part's rows in ``blocks`` groups, ``W'_k = R_kᵀ W_k``,
  output ``F.linear(x, W', b)`` (bias not rotated), the parts concatenated;
* file: ``<name>.oft_blocks.<i>`` ``[blocks, split_i / blocks, split_i / blocks]`` and one ``<name>.alpha``.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from click.testing import CliRunner
from torch import nn

# --- kohya's rules, rewritten ------------------------------------------------------------------------------


class SelfAttention(nn.Module):  # BFL's classes by name: kohya selects modules by class name
    def __init__(self, h):
        super().__init__()
        self.qkv, self.proj = nn.Linear(h, 3 * h), nn.Linear(h, h)


class Modulation(nn.Module):
    def __init__(self, h, double):
        super().__init__()
        self.lin = nn.Linear(h, (6 if double else 3) * h)


class DoubleStreamBlock(nn.Module):
    def __init__(self, h, mlp):
        super().__init__()
        for stream in ("img", "txt"):
            setattr(self, f"{stream}_mod", Modulation(h, True))
            setattr(self, f"{stream}_attn", SelfAttention(h))
            setattr(self, f"{stream}_mlp", nn.Sequential(nn.Linear(h, mlp), nn.GELU(), nn.Linear(mlp, h)))


class SingleStreamBlock(nn.Module):
    def __init__(self, h, mlp):
        super().__init__()
        self.linear1, self.linear2 = nn.Linear(h, 3 * h + mlp), nn.Linear(h + mlp, h)
        self.modulation = Modulation(h, False)


class Bfl(nn.Module):
    def __init__(self, h, mlp, doubles, singles):
        super().__init__()
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(h, mlp) for _ in range(doubles))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(h, mlp) for _ in range(singles))


def kohya_modules(config, all_linear):
    """name -> split_dims, by kohya's selection over a BFL-shaped model of the tiny config's widths."""
    h = config.num_attention_heads * config.attention_head_dim
    mlp = 4 * h
    with torch.device("meta"):
        bfl = Bfl(h, mlp, config.num_layers, config.num_single_layers)
    classes = ("DoubleStreamBlock", "SingleStreamBlock") if all_linear else ("SelfAttention",)
    out = {}
    for name, module in bfl.named_modules():
        if type(module).__name__ not in classes:
            continue
        for child_name, child in module.named_modules():
            if "Linear" in type(child).__name__:
                oft_name = f"oft_unet.{name}.{child_name}".replace(".", "_")
                if "double" in oft_name and "qkv" in oft_name:
                    split = [h] * 3
                elif "single" in oft_name and "linear1" in oft_name:
                    split = [h] * 3 + [mlp]
                else:
                    split = [child.out_features]
                out[oft_name] = split
    return out


def kohya_forward(x, weight, bias, blocks, alpha, m=1.0):
    """kohya's OFTModule.forward over a fused BFL Linear (rewritten)."""
    results, start = [], 0
    for b in blocks:
        n, size, _ = b.shape
        split = n * size
        q = b - b.transpose(1, 2)
        norm = torch.norm(q.flatten())
        q = q * ((torch.clamp(norm, max=alpha * split) + 1e-8) / (norm + 1e-8))
        eye = torch.eye(size).expand(n, size, size)
        r = (eye + q) @ torch.linalg.inv(eye - q)
        r = m * (r - eye) + eye
        w = weight[start : start + split].reshape(n, size, -1)
        rw = torch.einsum("knm,knp->kmp", r, w).reshape(split, -1)
        results.append(torch.nn.functional.linear(x, rw, bias[start : start + split]))
        start += split
    return torch.cat(results, dim=-1)


# --- helpers -------------------------------------------------------------------------------------------------


@functools.cache
def _base():
    from sdcore.models.load import load_model

    return load_model("tiny:flux")


def _bundle():
    return copy.deepcopy(_base())


def _transformer(bundle):
    return bundle.components()["transformer"]


def _inputs(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    c = model.config
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1)
    return dict(
        hidden_states=torch.randn(2, 16, c.in_channels, generator=gen),
        encoder_hidden_states=torch.randn(2, 5, c.joint_attention_dim, generator=gen),
        pooled_projections=torch.randn(2, c.pooled_projection_dim, generator=gen),
        timestep=torch.tensor([0.3, 0.7]), img_ids=img_ids.reshape(16, 3), txt_ids=torch.zeros(5, 3),
        guidance=torch.tensor([3.5, 3.5]),
    )  # fmt: skip


def _out(bundle):
    model = _transformer(bundle)
    with torch.no_grad():
        return model(**_inputs(model), return_dict=False)[0]


def _trained(alpha=1.0, std=0.05, all_linear=True, seed=0):
    from sdplugin_lora.method import LoraMethod, LoraOptions

    bundle = _bundle()
    method = LoraMethod(LoraOptions(rank=2, alpha=alpha, algo="oft", oft_all_linear=all_linear, save_dtype="fp32"))
    method.validate()
    method.prepare(bundle)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in method.network:
            module.oft_blocks.copy_(torch.randn(module.oft_blocks.shape, generator=gen) * std)
    return bundle, method


def _save(method, bundle, path):
    from sdcore.train.method import SaveInfo

    return method.save(bundle, SaveInfo(path=path, step=1, epoch=1, metadata={}, final=True))


# --- checks ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("all_linear", [True, False])
def test_targets_and_file_are_kohyas(tmp_path, all_linear):
    from safetensors import safe_open
    from sdplugin_lora.format import read_lora

    bundle, method = _trained(alpha=0.02, all_linear=all_linear)
    expected = kohya_modules(_transformer(bundle).config, all_linear)
    path = _save(method, bundle, tmp_path / "oft.safetensors")
    with safe_open(str(path), "pt") as handle:
        shapes = {key: tuple(handle.get_tensor(key).shape) for key in handle.keys()}  # noqa: SIM118
        alphas = {float(handle.get_tensor(k)) for k in handle.keys() if k.endswith(".alpha")}  # noqa: SIM118
    want = {}
    for name, split in expected.items():
        want[f"{name}.alpha"] = ()
        for i, rows in enumerate(split):
            want[f"{name}.oft_blocks.{i}"] = (2, rows // 2, rows // 2)
    assert shapes == want
    assert len(alphas) == 1 and alphas.pop() == pytest.approx(0.02)
    meta = read_lora(path).metadata
    assert meta["ss_network_module"] == "networks.oft_flux"
    assert (meta["ss_network_dim"], float(meta["ss_network_alpha"])) == ("2", 0.02)
    assert ("enable_all_linear" in (meta.get("ss_network_args") or "")) == all_linear
    # the network adapts exactly the diffusers modules those BFL Linears stack
    index = method.index
    parts = {p.path for m in index.kohya.values() if "oft_unet_" + m.name[10:] in expected for p in m.parts}
    assert {index.targets[name].path for name in method.network.loras} == parts


def test_identity_at_init_and_gradients_reach_every_block():
    from sdplugin_lora.method import LoraMethod, LoraOptions

    reference = _out(_bundle())
    bundle = _bundle()
    method = LoraMethod(LoraOptions(rank=2, algo="oft"))
    groups = method.prepare(bundle)
    assert all(float(m.delta_weight().abs().max()) == 0.0 for m in method.network)
    torch.testing.assert_close(_out(bundle), reference, atol=0, rtol=0)
    model = _transformer(bundle)
    model(**_inputs(model), return_dict=False)[0].pow(2).mean().backward()
    grads = [p.grad for g in groups for p in g["params"]]
    assert len(grads) == len(method.network) and all(g is not None and float(g.abs().max()) > 0 for g in grads)


@pytest.mark.parametrize("alpha", [1.0, 0.02])
def test_each_module_is_kohyas_forward_with_a_clamp_per_part(alpha):
    """alpha 0.02 clamps q/k/v and the MLP part one by one, which a clamp over the fused rows would not match."""
    bundle, method = _trained(alpha=alpha)
    index = method.index
    by_path = {index.targets[name].path: m for name, m in method.network.loras.items()}
    gen = torch.Generator().manual_seed(3)
    worst, clamped, fused_gap, checked = 0.0, 0, 0.0, 0
    for module in index.kohya.values():
        if module.parts[0].path not in by_path:
            continue
        layers = [by_path[p.path].base for p in module.parts]
        weight = torch.cat([layer.weight.detach() for layer in layers])
        bias = torch.cat([layer.bias.detach() for layer in layers])
        blocks = [by_path[p.path].oft_blocks.detach().clone() for p in module.parts]
        x = torch.randn(3, weight.shape[1], generator=gen)
        with torch.no_grad():
            ours = torch.cat([layer(x) for layer in layers], dim=-1)
        want = kohya_forward(x, weight, bias, blocks, alpha)
        worst = max(worst, float((ours - want).abs().max()))
        assert float((want - torch.nn.functional.linear(x, weight, bias)).abs().max()) > 1e-4
        for b in blocks:
            clamped += float((b - b.transpose(1, 2)).norm()) > alpha * b.shape[0] * b.shape[1]
        if len(blocks) > 1 and len({b.shape for b in blocks}) == 1:  # q/k/v: the same blocks, one clamp over all
            one = torch.cat(blocks)
            fused_gap = max(fused_gap, float((kohya_forward(x, weight, bias, [one], alpha) - want).abs().max()))
        checked += 1
    assert checked == len(kohya_modules(_transformer(bundle).config, True))
    assert worst <= 1e-5, worst
    if alpha < 0.1:
        assert clamped > 0 and fused_gap > 1e-4
    else:
        assert clamped == 0


def test_file_applies_hooked_and_merged_like_the_trained_network(tmp_path):
    from sdplugin_lora.apply import apply_lora

    trained, method = _trained(alpha=0.02)
    path = _save(method, trained, tmp_path / "oft.safetensors")
    want = _out(trained)
    assert float((want - _out(_bundle())).abs().max()) > 1e-3
    for merge in (False, True):
        bundle = _bundle()
        applied = apply_lora(bundle, path, merge=merge, strict=True)
        assert len(applied.matches[0].modules) == len(method.network)
        torch.testing.assert_close(_out(bundle), want, atol=1e-5, rtol=0)


def test_merged_at_a_multiplier_is_kohyas_weight(tmp_path):
    from sdplugin_lora.apply import apply_lora

    trained, method = _trained(alpha=0.02)
    path = _save(method, trained, tmp_path / "oft.safetensors")
    index = method.index
    blocks = {index.targets[n].path: m.oft_blocks.detach().clone() for n, m in method.network.loras.items()}
    bundle = _bundle()
    model = _transformer(bundle)
    before = {n: m.weight.detach().clone() for n, m in model.named_modules() if n in blocks}
    biases = {n: m.bias.detach().clone() for n, m in model.named_modules() if n in blocks}
    apply_lora(bundle, path, 0.6, merge=True)
    after = dict(model.named_modules())
    worst = 0.0
    for module in index.kohya.values():
        if module.parts[0].path not in blocks:
            continue
        paths = [p.path for p in module.parts]
        weight = torch.cat([before[p] for p in paths])
        eye = torch.eye(weight.shape[1])  # kohya's merged weight: its forward's W' read off the identity
        want = kohya_forward(eye, weight, torch.zeros(weight.shape[0]), [blocks[p] for p in paths], 0.02, 0.6).T
        got = torch.cat([after[p].weight.detach() for p in paths])
        worst = max(worst, float((got - want).abs().max()))
        torch.testing.assert_close(
            torch.cat([after[p].bias.detach() for p in paths]), torch.cat([biases[p] for p in paths])
        )
    assert worst <= 1e-5, worst


def test_warm_start_reads_its_own_file(tmp_path):
    from sdplugin_lora.method import LoraMethod, LoraOptions

    trained, first = _trained(alpha=0.02)
    path = _save(first, trained, tmp_path / "oft.safetensors")
    second = LoraMethod(LoraOptions(rank=2, alpha=0.02, algo="oft", network_weights=str(path)))
    second.prepare(_bundle())
    a, b = first.trainable_state_dict(), second.trainable_state_dict()
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key])


def test_a_file_for_other_widths_or_layouts_is_refused_in_one_line(tmp_path):
    from safetensors.torch import save_file
    from sdcore.errors import ConfigError, NetworkMismatchError
    from sdplugin_lora.apply import apply_lora
    from sdplugin_lora.method import LoraMethod, LoraOptions

    bad = tmp_path / "bad.safetensors"
    save_file({"oft_unet_double_blocks_0_img_attn_qkv.oft_blocks.0": torch.zeros(2, 48, 48),
               "oft_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(1.0)}, str(bad))  # fmt: skip
    with pytest.raises(NetworkMismatchError, match=r"OFT block sets over 96 rows .* 32 \+ 32 \+ 32"):
        apply_lora(_bundle(), bad)
    for options, flag in ((dict(key_layout="diffusers"), "--key-layout"), (dict(split_qkv=True), "--split-qkv")):
        with pytest.raises(ConfigError, match=flag):
            LoraMethod(LoraOptions(algo="oft", **options)).prepare(_bundle())


def test_kohya_config_trains_through_the_cli(tmp_path):
    import tomli_w
    from safetensors import safe_open
    from sdcore.cli import build_cli
    from sdcore.plugins import get_plugin_manager
    from sdcore.testing.contract import make_tiny_dataset
    from sdplugin_lora.format import read_lora

    data = tmp_path / "data"
    make_tiny_dataset(data, n=2, size=64)
    out = tmp_path / "out" / "oft.safetensors"
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        tomli_w.dumps(
            {
                "pretrained_model_name_or_path": "tiny:flux",
                "train_data_dir": str(data),
                "output_dir": str(out.parent),
                "output_name": "oft",
                "network_module": "networks.oft_flux",
                "network_args": ["enable_all_linear=True"],
                "network_dim": 2,
                "network_alpha": 0.01,
                "resolution": "64",
                "max_train_steps": 2,
                "learning_rate": 1e-3,
                "save_precision": "float",
            }
        )
    )
    args = ["train", "lora", "--config_file", str(cfg), "--no-progress"]
    result = CliRunner().invoke(build_cli(get_plugin_manager()), args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    lora = read_lora(out)
    assert lora.metadata["ss_network_module"] == "networks.oft_flux"
    assert lora.metadata["ss_network_train_unet_only"] == "True"
    want = kohya_modules(_transformer(_base()).config, True)
    assert set(lora.modules) == set(want)
    with safe_open(str(out), "pt") as handle:
        moved = [float(handle.get_tensor(k).abs().max()) for k in handle.keys() if ".oft_blocks." in k]  # noqa: SIM118
    assert len(moved) == sum(len(split) for split in want.values()) and min(moved) > 0


def test_comfyui_conversion_refuses_per_part_blocks(tmp_path):
    """ComfyUI's OFT adapter reads ``<name>.oft_blocks`` only (and no ``oft_unet_`` names): an oft_flux file
    has no ComfyUI form, so ``sdcore lora convert --to comfyui`` says so instead of writing a file."""
    from sdplugin_lora.commands import lora_group

    trained, method = _trained(alpha=0.02, all_linear=False)
    path = _save(method, trained, tmp_path / "oft.safetensors")
    result = CliRunner().invoke(
        lora_group, ["convert", str(path), "-o", str(tmp_path / "c.safetensors"), "--to", "comfyui"]
    )
    from sdcore.errors import NetworkMismatchError

    assert isinstance(result.exception, NetworkMismatchError) and "networks.oft_flux" in str(result.exception)
    assert not (tmp_path / "c.safetensors").exists()


def test_chroma_gets_the_same_module_less_the_modulation(tmp_path):
    """kohya's Chroma blocks are BFL's without the modulation Linears (chroma_models.py); oft_flux selects the
    same way on them (flux_train_network.py --model_type chroma)."""
    from sdcore.models.load import load_model
    from sdcore.train.method import SaveInfo
    from sdplugin_lora.apply import apply_lora
    from sdplugin_lora.format import read_lora
    from sdplugin_lora.method import LoraMethod, LoraOptions

    bundle = load_model("tiny:chroma")
    method = LoraMethod(LoraOptions(rank=2, alpha=0.02, algo="oft", save_dtype="fp32"))
    method.prepare(bundle)
    path = method.save(bundle, SaveInfo(path=tmp_path / "c.safetensors", step=1, epoch=1, metadata={}, final=True))
    lora = read_lora(path)
    want = {
        n for n in kohya_modules(_transformer(bundle).config, True) if not n.endswith(("_mod_lin", "_modulation_lin"))
    }
    assert set(lora.modules) == want
    assert lora.metadata["ss_network_module"] == "networks.oft_flux"
    assert len(apply_lora(load_model("tiny:chroma"), path, strict=True).matches[0].modules) == len(method.network)
