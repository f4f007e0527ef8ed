"""LyCORIS diag-oft and BOFT: trained as LyCORIS trains them, saved in its layout, applied as it and ComfyUI do.

Formulas written here from the tools' behaviour (LyCORIS lycoris/modules/diag_oft.py, boft.py,
lycoris/functional/general.py; ComfyUI comfy/weight_adapter/oft.py, boft.py):

* LyCORIS ``get_r``: ``Q = B - Bᵀ`` per block; with a constraint ``c = constraint · out`` and
  ``‖Q‖ + 1e-8 > c`` (all blocks), ``Q ← Q · c / (‖Q‖ + 1e-8)``; ``R = (I + Q)(I - Q)⁻¹``.
* diag-oft, multiplier m: ``W'[k·b + j] = Σ_i (m·R_k - m·I + I)[i, j] · W[k·b + i]``, then
  ``W' ← rescale · W'`` (rescale per output row).
* BOFT, multiplier m: for level ``i`` with ``k = 2^i · b/2`` the rows ``(c, g, j)`` (g < 2, j < k)
  are reordered to ``(c, j, g)``, cut in blocks of ``b`` and multiplied (``R_i`` blocks interpolated
  ``m·R + (1-m)·I``, not transposed), then put back; ``W' ← rescale · W'``.
* ComfyUI diag-oft: ``W + s · einsum(s·R - s·I, W)`` per block with ``c = alpha`` (not times out)
  and no rescale; ComfyUI BOFT: ``W + s · (BOFT_s(W)·rescale - W)``, ``c = alpha``.
* Block sizes: diag-oft ``(size, count) = factorization(out, dim)`` (the table in LyCORIS'
  docstring); BOFT the largest even ``b <= dim`` with ``out / b`` a power of two, ``m = log2(out/b)+1``.
"""

from __future__ import annotations

import math

import pytest
import torch
from click.testing import CliRunner
from lora_testutil import fresh_bundle, unet_inputs, unet_out
from sdcore.errors import ConfigError
from sdcore.testing.contract import make_tiny_dataset
from sdcore.train.config import load_options
from sdcore.train.method import SaveInfo
from sdplugin_lora.adapters import (
    BoftAdapter,
    BoftVariant,
    DiagOftAdapter,
    DiagOftVariant,
    OftVariant,
    butterfly_factorization,
    factorization,
)
from sdplugin_lora.apply import apply_lora
from sdplugin_lora.format import parse_state_dict, read_lora
from sdplugin_lora.method import LoraMethod, LoraOptions
from sdplugin_lora.naming import ModuleIndex
from sdplugin_lora.tools import lora_info
from torch import nn

ALGOS = {"diag_oft": DiagOftAdapter, "boft": BoftAdapter}


# --- the reference formulas -----------------------------------------------------------------------


def lyco_r(blocks, c):
    q = blocks - blocks.transpose(-1, -2)
    if c > 0:
        norm = torch.norm(q) + 1e-8
        if norm > c:
            q = q * c / norm
    eye = torch.eye(q.shape[-1])
    return (eye + q) @ torch.linalg.inv(eye - q)


def lyco_diag(w, blocks, alpha, rescale=None, m=1.0):
    n, b, _ = blocks.shape
    r = lyco_r(blocks, alpha * w.shape[0])
    eye = torch.eye(b)
    out = torch.einsum("k n m, k n ... -> k m ...", m * r - m * eye + eye, w.reshape(n, b, *w.shape[1:]))
    out = out.reshape(w.shape)
    return rescale * out if rescale is not None else out


def _butterfly(w, r, m=1.0):
    levels, _, b, _ = r.shape
    eye = torch.eye(b)
    x = w
    for i in range(levels):
        k = 2**i * (b // 2)
        bi = r[i] * m + (1 - m) * eye
        x = x.unflatten(0, (-1, 2, k)).transpose(1, 2).flatten(0, 2).unflatten(0, (-1, b))
        x = torch.einsum("b i j, b j ... -> b i ...", bi, x)
        x = x.flatten(0, 1).unflatten(0, (-1, k, 2)).transpose(1, 2).flatten(0, 2)
    return x


def lyco_boft(w, blocks, alpha, rescale=None, m=1.0):
    out = _butterfly(w, lyco_r(blocks, alpha * w.shape[0]), m)
    return out * rescale if rescale is not None else out


def comfy_diag(w, blocks, alpha, s):
    n, b, _ = blocks.shape
    r = lyco_r(blocks, alpha)
    eye = torch.eye(b)
    diff = torch.einsum("k n m, k n ... -> k m ...", r * s - s * eye, w.reshape(n, b, *w.shape[1:]))
    return w + s * diff.reshape(w.shape)


def comfy_boft(w, blocks, alpha, rescale, s):
    out = _butterfly(w, lyco_r(blocks, alpha), s)
    if rescale is not None:
        out = out * rescale
    return w + s * (out - w)


def reference(algo, w, t, m=1.0):
    rescale = t["rescale"].float() if "rescale" in t else None
    fn = lyco_diag if algo == "diag_oft" else lyco_boft
    return fn(w, t["oft_blocks"].float(), float(t["alpha"]), rescale, m)


def _randomise(module, std, g, rescale_std=0.1):
    with torch.no_grad():
        module.oft_blocks.normal_(0, std, generator=g)
        if module.rescale is not None:
            module.rescale.copy_(1 + torch.randn(module.rescale.shape, generator=g) * rescale_std)


def _layer(kind):
    torch.manual_seed(0)
    return nn.Linear(12, 32) if kind == "linear" else nn.Conv2d(6, 32, 3, padding=1)


def _x(kind):
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 12, generator=g) if kind == "linear" else torch.randn(2, 6, 5, 5, generator=g)


# --- one module ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("algo", sorted(ALGOS))
def test_module_forward_is_lycoris_identity_at_init_and_orthogonal(algo, kind):
    base = _layer(kind)
    x = _x(kind)
    plain = base(x).detach()
    module = ALGOS[algo]("lora_unet_x", base, 4, constraint=0.0, rescaled=True)
    module.attach()
    assert torch.equal(module.oft_blocks, torch.zeros_like(module.oft_blocks))
    torch.testing.assert_close(base(x), plain, atol=1e-6, rtol=0)  # R = I, rescale = 1: the layer as it was
    _randomise(module, 0.1, torch.Generator().manual_seed(2))
    w = base.weight.detach().float()
    t = {k: v.detach() for k, v in module.tensors().items()}
    want_w = reference(algo, w, t)
    op = nn.functional.linear if kind == "linear" else (lambda i, ww: nn.functional.conv2d(i, ww, padding=1))
    want = plain + op(x, want_w - w)  # LyCORIS' forward: org_forward(x) + op(x, W' - W, bias=None)
    got = base(x)
    assert float((got - plain).detach().abs().max()) > 1e-3
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # the rotation alone (rescale 1, base = identity rows) is orthogonal
    rot_t = {"oft_blocks": t["oft_blocks"], "alpha": t["alpha"]}
    variant = DiagOftVariant if algo == "diag_oft" else BoftVariant
    eye = torch.eye(32)
    r = variant.weight(rot_t, (32, 32), eye) + eye
    torch.testing.assert_close(r @ r.T, eye, atol=1e-5, rtol=0)
    assert float((r - eye).abs().max()) > 1e-2
    module.detach()


@pytest.mark.parametrize("algo", sorted(ALGOS))
def test_constraint_clamps_all_blocks_together_and_rescale_scales_rows(algo):
    base = _layer("linear")
    w = base.weight.detach().float()
    free = ALGOS[algo]("lora_unet_x", base, 4, constraint=0.0)
    _randomise(free, 0.3, torch.Generator().manual_seed(3))
    q_norm = float((free.oft_blocks - free.oft_blocks.transpose(-1, -2)).detach().norm())
    limit = 1e-3
    assert q_norm > limit * 32, "the constraint must bite"
    tight = ALGOS[algo]("lora_unet_x", base, 4, constraint=limit)
    with torch.no_grad():
        tight.oft_blocks.copy_(free.oft_blocks)
    assert float(tight.alpha) == pytest.approx(limit)  # the file's alpha is the constraint itself
    t = {k: v.detach() for k, v in tight.tensors().items()}
    torch.testing.assert_close(tight.delta_weight(), reference(algo, w, t) - w, atol=1e-6, rtol=0)
    # clamped: the whole change is small, |Q| = constraint · out
    assert float(tight.delta_weight().abs().max()) < 0.2 * float(free.delta_weight().abs().max())
    # rescale multiplies the rotated rows
    scaled = ALGOS[algo]("lora_unet_x", base, 4, rescaled=True)
    with torch.no_grad():
        scaled.oft_blocks.copy_(free.oft_blocks)
        scaled.rescale.copy_(torch.linspace(0.5, 1.5, 32).reshape(32, 1))
    rotated = free.delta_weight() + w
    torch.testing.assert_close(scaled.delta_weight() + w, rotated * torch.linspace(0.5, 1.5, 32)[:, None])


def test_block_shapes_follow_lycoris_factorisation():
    # LyCORIS' factorization docstring table (factor -> (m, n)); 360 at 16 is what its code computes (the loop
    # walks the divisors up to the factor: 15·24), where the docstring says 12·30
    for dim, factor, want in ((128, 4, (4, 32)), (250, 4, (2, 125)), (360, 8, (8, 45)), (512, 16, (16, 32)),
                              (1024, -1, (32, 32)), (127, 8, (1, 127)), (360, 16, (15, 24))):  # fmt: skip
        assert factorization(dim, factor) == want
    linear = nn.Linear(4, 320)
    assert DiagOftAdapter("x", linear, 4).oft_blocks.shape == (80, 4, 4)  # block size 4, 80 blocks
    assert DiagOftAdapter("x", linear, 32).oft_blocks.shape == (32, 10, 10)  # the smaller factor is the size
    # BOFT: largest even b <= dim with out/b a power of two; m = log2(out/b) + 1 levels
    assert butterfly_factorization(32, 4) == (4, 8)
    assert butterfly_factorization(48, 8) == (6, 8)
    assert butterfly_factorization(64, 16) == (16, 4)
    assert butterfly_factorization(320, 4) is None and butterfly_factorization(320, 16) == (10, 32)
    assert BoftAdapter("x", nn.Linear(4, 64), 16).oft_blocks.shape == (3, 4, 16, 16)
    assert BoftAdapter("x", nn.Linear(4, 32), 4).oft_blocks.shape == (4, 8, 4, 4)
    with pytest.raises(ValueError, match="power of two"):
        BoftAdapter("x", linear, 4)


# --- trained files --------------------------------------------------------------------------------


def _trained(tmp_path, algo, *, rescaled=True, constraint=0.0, std=0.05):
    bundle = fresh_bundle("sd1")
    options = LoraOptions(rank=4, algo=algo, constraint=constraint, rescaled=rescaled, conv_rank=4, save_dtype="fp32")
    method = LoraMethod(options)
    method.validate()
    method.prepare(bundle)
    g = torch.Generator().manual_seed(0)
    for module in method.network:
        _randomise(module, std, g)
    path = method.save(
        bundle, SaveInfo(path=tmp_path / f"{algo}.safetensors", step=1, epoch=1, metadata={}, final=True)
    )
    return bundle, method, path


@pytest.mark.parametrize("algo", sorted(ALGOS))
def test_trained_file_is_lycoris_layout_and_applies_back(tmp_path, algo):
    trained, method, path = _trained(tmp_path, algo, constraint=1e-2)
    lora = read_lora(path)
    meta = lora.metadata
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert f'"algo": "{"diag-oft" if algo == "diag_oft" else "boft"}"' in meta["ss_network_args"]
    assert '"constraint": "0.01", "rescaled": "True"' in meta["ss_network_args"]  # LyCORIS' network_args
    assert all(key.startswith("lora_unet_") for key in lora.modules)
    index = ModuleIndex.from_bundle(fresh_bundle("sd1"))
    assert any(index.resolve(k).module.weight.dim() == 4 and index.resolve(k).module.kernel_size == (3, 3)
               for k in lora.modules)  # fmt: skip
    for key, weights in lora.modules.items():
        assert set(weights.tensors) == {"oft_blocks", "rescale", "alpha"}
        assert weights.kind == algo
        weight = index.resolve(key).module.weight
        out = weight.shape[0]
        if algo == "diag_oft":
            size, count = factorization(out, 4)
            assert weights.tensors["oft_blocks"].shape == (count, size, size)
        else:
            b, n = butterfly_factorization(out, 4)
            assert weights.tensors["oft_blocks"].shape == (int(math.log2(n)) + 1, n, b, b)
        assert weights.tensors["rescale"].shape == (out, *[1] * (weight.dim() - 1))
        assert float(weights.tensors["alpha"]) == pytest.approx(1e-2)
    # merged at weight 1: LyCORIS' formula, per layer; and the trained model's output
    bundle = fresh_bundle("sd1")
    index = ModuleIndex.from_bundle(bundle)
    expected = {}
    for key, weights in lora.modules.items():
        target = index.resolve(key)
        w = target.module.weight.detach().float().clone()
        expected[target.name] = reference(algo, w, weights.tensors)
        assert float((expected[target.name] - w).abs().max()) > 1e-4
    applied = apply_lora(bundle, path, 1.0, merge=True)
    assert applied.touched == len(expected) == len(method.network)
    worst = max(float((index.resolve(n).module.weight.detach() - want).abs().max()) for n, want in expected.items())
    assert worst <= 1e-5, worst
    inputs = unet_inputs(bundle)
    torch.testing.assert_close(unet_out(bundle, inputs), unet_out(trained, inputs), atol=1e-4, rtol=0)
    applied.remove()
    # hooked (generation's <lora:...>) gives the same layer outputs as the merge
    hooked = apply_lora(bundle, path, 1.0)
    torch.testing.assert_close(unet_out(bundle, inputs), unet_out(trained, inputs), atol=1e-4, rtol=0)
    hooked.remove()
    assert lora_info(path)["algorithm"] == ("Diag-OFT" if algo == "diag_oft" else "BOFT")


@pytest.mark.parametrize("algo", sorted(ALGOS))
def test_merged_weight_matches_lycoris_and_comfyui_at_one_and_the_multiplier_is_linear(tmp_path, algo):
    """At 1 (constraint not biting) LyCORIS and ComfyUI agree and so do we. At 0.5 LyCORIS interpolates
    the rotations (diag-oft without rescale: exactly our 0.5 · ΔW; BOFT: not), ComfyUI multiplies that by
    0.5 again; sdcore applies 0.5 · ΔW (kohya's and A1111's rule), documented in the README."""
    _, _, path = _trained(tmp_path, algo, rescaled=algo == "boft", std=0.02)
    lora = read_lora(path)
    for m in (1.0, 0.5):
        bundle = fresh_bundle("sd1")
        index = ModuleIndex.from_bundle(bundle)
        rows = []
        for key, weights in lora.modules.items():
            target = index.resolve(key)
            rows.append((target, target.module.weight.detach().float().clone(), weights.tensors))
        apply_lora(bundle, path, m, merge=True)
        gap_ours = gap_lyco = gap_comfy = 0.0
        for target, w, t in rows:
            got = target.module.weight.detach().float()
            ours = w + m * (reference(algo, w, t) - w)
            gap_ours = max(gap_ours, float((got - ours).abs().max()))
            gap_lyco = max(gap_lyco, float((got - reference(algo, w, t, m)).abs().max()))
            rescale = t["rescale"].float() if "rescale" in t else None
            blocks, alpha = t["oft_blocks"].float(), float(t["alpha"])
            comfy = comfy_diag(w, blocks, alpha, m) if algo == "diag_oft" else comfy_boft(w, blocks, alpha, rescale, m)
            gap_comfy = max(gap_comfy, float((got - comfy).abs().max()))
        assert gap_ours <= 1e-5, (m, gap_ours)
        if m == 1.0:
            assert gap_lyco <= 1e-5 and gap_comfy <= 1e-5, (gap_lyco, gap_comfy)
        elif algo == "diag_oft":
            assert gap_lyco <= 1e-5 and gap_comfy > 1e-5  # ComfyUI: 0.25 · ΔW
        else:
            assert gap_lyco > 1e-6 and gap_comfy > 1e-6


def test_kohya_oft_and_diag_oft_are_told_apart_by_name(tmp_path):
    blocks = torch.randn(8, 4, 4) * 0.05
    alpha = torch.tensor(1e-3)
    kohya = parse_state_dict({"oft_unet_mid_block_attentions_0_proj_in.oft_blocks": blocks,
                              "oft_unet_mid_block_attentions_0_proj_in.alpha": alpha})  # fmt: skip
    lyco = parse_state_dict({"lora_unet_mid_block_attentions_0_proj_in.oft_blocks": blocks,
                             "lora_unet_mid_block_attentions_0_proj_in.alpha": alpha})  # fmt: skip
    (kw,) = kohya.modules.values()
    (lw,) = lyco.modules.values()
    assert (kw.kind, kw.variant) == ("oft", OftVariant)
    assert (lw.kind, lw.variant) == ("diag_oft", DiagOftVariant)
    four = parse_state_dict({"lora_unet_x.oft_blocks": torch.zeros(3, 4, 8, 8), "lora_unet_x.alpha": alpha})
    assert four.modules["lora_unet_x"].kind == "boft"
    # the two maths agree on these tensors (same Cayley blocks, W' = Rᵀ W, constraint alpha · out) up to the
    # clamp's 1e-8 placement
    w = torch.randn(32, 16)
    torch.testing.assert_close(
        OftVariant.weight(kw.tensors, (32, 16), w), DiagOftVariant.weight(lw.tensors, (32, 16), w), atol=1e-6, rtol=0
    )


# --- options, kohya configs, CLI ------------------------------------------------------------------------


def test_options_refused_where_lycoris_has_no_meaning():
    with pytest.raises(ConfigError) as info:
        LoraMethod(LoraOptions(rank=4, algo="lokr", constraint=1e-3, rescaled=True)).validate()
    assert "--constraint, --rescaled: LyCORIS diag-oft/BOFT options (got --algo lokr)" in str(info.value)
    with pytest.raises(ConfigError) as info:
        LoraMethod(LoraOptions(rank=4, algo="boft", rank_dropout=0.1, use_tucker=True, constraint=-1)).validate()
    message = str(info.value)
    assert "--constraint must be 0" in message and "--rank-dropout, --use-tucker with --algo boft" in message
    # BOFT needs an even block size: at --rank 1 no layer splits, and the error names every one at once
    bundle = fresh_bundle("sd1")
    method = LoraMethod(LoraOptions(rank=1, algo="boft", train_text_encoder=True))
    with pytest.raises(ConfigError) as info:
        method.prepare(bundle)
    count = len(ModuleIndex.from_bundle(fresh_bundle("sd1")).select(text_encoder=True))
    assert f"--algo boft --rank 1: {count} layers cannot be split: " in str(info.value)


@pytest.mark.parametrize("algo", ["diag-oft", "boft"])
def test_kohya_network_args_translate(algo):
    notes: list[str] = []
    kohya = {"network_module": "lycoris.kohya", "network_dim": 8,
             "network_args": [f"algo={algo}", "constraint=1e-4", "rescaled=True"]}  # fmt: skip
    o = load_options(LoraOptions, None, kohya=kohya, notes=notes)
    assert (o.algo, o.rank, o.constraint, o.rescaled) == (algo.replace("-", "_"), 8, 1e-4, True)
    kohya["network_args"] = [f"algo={algo}", "rescaled=0"]  # LyCORIS' str_bool: only "false" is off
    assert load_options(LoraOptions, None, kohya=kohya, notes=notes).rescaled is True
    kohya["network_args"] = ["algo=loha", "constraint=1e-4"]  # LyCORIS reads it for diag-oft/boft only
    notes = []
    assert load_options(LoraOptions, None, kohya=kohya, notes=notes).constraint == 0.0
    assert any("diag-oft and boft only" in n for n in notes)


def _invoke(args):
    from sdcore.cli import build_cli
    from sdcore.plugins import get_plugin_manager

    result = CliRunner().invoke(build_cli(get_plugin_manager()), args, catch_exceptions=False)
    return result, result.output


def test_kohya_command_line_trains_diag_oft_and_sdcore_cli_trains_boft(tmp_path):
    make_tiny_dataset(tmp_path / "train", n=2, size=64, repeats=1, name="mychar")
    out = tmp_path / "out"
    args = [
        "train", "lora", "--pretrained_model_name_or_path=tiny:sd1", "--train_data_dir", str(tmp_path / "train"),
        "--output_dir", str(out), "--output_name", "diag", "--network_module", "lycoris.kohya", "--network_dim", "4",
        "--network_args", "algo=diag-oft", "constraint=1e-4", "rescaled=True", "--resolution", "64",
        "--train_batch_size", "1", "--max_train_steps", "2", "--learning_rate", "1e-2", "--no-progress",
    ]  # fmt: skip
    result, text = _invoke(args)
    assert result.exit_code == 0, text
    lora = read_lora(out / "diag.safetensors")
    assert lora.metadata["ss_network_module"] == "lycoris.kohya"
    assert {w.kind for w in lora.modules.values()} == {"diag_oft"}
    assert any(k.startswith("lora_te_") for k in lora.modules)  # kohya trains the text encoder too
    assert all(float(w.tensors["alpha"]) == pytest.approx(1e-4, rel=1e-3) for w in lora.modules.values())  # fp16
    assert any(float(w.tensors["oft_blocks"].abs().max()) > 0 for w in lora.modules.values())  # it trained
    result, text = _invoke(["train", "lora", "--model", "tiny:sd1", "--data", str(tmp_path / "train"), "--output",
                            str(tmp_path / "boft.safetensors"), "--algo", "boft", "--rank", "4", "--resolution", "64",
                            "--max-steps", "1", "--no-progress"])  # fmt: skip
    assert result.exit_code == 0, text
    boft = read_lora(tmp_path / "boft.safetensors")
    assert {w.kind for w in boft.modules.values()} == {"boft"}
    assert '"algo": "boft"' in boft.metadata["ss_network_args"]


@pytest.mark.parametrize(("blocks", "label"), [(torch.zeros(4, 8, 8), "Diag-OFT"), (torch.zeros(3, 4, 8, 8), "BOFT")])
def test_tools_without_the_base_name_the_algorithm_that_needs_it(blocks, label):
    """resize/merge of a diag-oft or BOFT file without --base-model: the error names that algorithm (it
    said "is DoRA": the label table had no entry for these two). Both rotate W, so they need it."""
    from sdcore.errors import NetworkMismatchError
    from sdplugin_lora.tools import resize_lora

    lora = parse_state_dict({"lora_unet_mid_block_attentions_0_proj_in.oft_blocks": blocks,
                             "lora_unet_mid_block_attentions_0_proj_in.alpha": torch.tensor(0.0)})  # fmt: skip
    with pytest.raises(NetworkMismatchError) as info:
        resize_lora(lora, rank=2)
    assert f"lora_unet_mid_block_attentions_0_proj_in is {label}: its change depends on the base weights" in str(
        info.value
    )
