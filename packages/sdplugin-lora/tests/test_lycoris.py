"""LyCORIS parity: Tucker convs (read, apply, train, save) and the <lyco:...> prompt tag."""

from __future__ import annotations

import itertools

import pytest
import torch
from lora_testutil import all_params, fresh_bundle, unet_inputs, unet_out
from safetensors.torch import save_file
from sdcore.generate.session import NetworkSession
from sdcore.train.method import SaveInfo
from sdplugin_lora.adapters import factorization
from sdplugin_lora.apply import LoraHandler, LycoHandler, apply_lora
from sdplugin_lora.format import read_lora
from sdplugin_lora.method import LoraMethod, LoraOptions
from sdplugin_lora.tools import lora_info

R = 2


def _tucker_by_hand(core, wa, wb, out, inp):
    """ΔW[p, q] = Σ_ij core[i, j] wa[i, p] wb[j, q] (LyCORIS' definition), summed term by term."""
    delta = torch.zeros(out, inp, *core.shape[2:])
    for i, j in itertools.product(range(core.shape[0]), range(core.shape[1])):
        delta += core[i, j][None, None] * wa[i][:, None, None, None] * wb[j][None, :, None, None]
    return delta


def _kron_by_hand(w1, w2):
    a, c = w1.shape
    b, d = w2.shape[:2]
    out = torch.zeros(a * b, c * d, *w2.shape[2:])
    for i, j in itertools.product(range(a), range(c)):
        out[i * b : (i + 1) * b, j * d : (j + 1) * d] = w1[i, j] * w2
    return out


def _lycoris_file(tmp_path, bundle):
    """A file as LyCORIS writes it with use_tucker: one Tucker LoCon, one LoHa, one LoKr conv."""
    g = torch.Generator().manual_seed(7)
    unet = bundle.unet
    picks = {
        "lora_unet_down_blocks_0_resnets_0_conv1": unet.down_blocks[0].resnets[0].conv1,
        "lora_unet_down_blocks_0_resnets_0_conv2": unet.down_blocks[0].resnets[0].conv2,
        "lora_unet_up_blocks_1_resnets_0_conv1": unet.up_blocks[1].resnets[0].conv1,
    }
    names = list(picks)
    tensors, expected = {}, {}
    w = picks[names[0]].weight
    out, inp = w.shape[:2]
    down, mid, up = (
        torch.randn(R, inp, 1, 1, generator=g),
        torch.randn(R, R, 3, 3, generator=g),
        torch.randn(out, R, 1, 1, generator=g),
    )
    tensors.update(
        {
            f"{names[0]}.lora_down.weight": down,
            f"{names[0]}.lora_mid.weight": mid,
            f"{names[0]}.lora_up.weight": up,
            f"{names[0]}.alpha": torch.tensor(1.0),
        }
    )
    expected[names[0]] = _tucker_by_hand(mid, up[:, :, 0, 0].T, down[:, :, 0, 0], out, inp) * (1.0 / R)

    w = picks[names[1]].weight
    out, inp = w.shape[:2]
    parts = {
        "hada_w1_a": torch.randn(R, out, generator=g),
        "hada_w1_b": torch.randn(R, inp, generator=g),
        "hada_t1": torch.randn(R, R, 3, 3, generator=g) * 0.5,
        "hada_w2_a": torch.randn(R, out, generator=g),
        "hada_w2_b": torch.randn(R, inp, generator=g),
        "hada_t2": torch.randn(R, R, 3, 3, generator=g) * 0.5,
    }
    tensors.update({f"{names[1]}.{k}": v for k, v in parts.items()})
    tensors[f"{names[1]}.alpha"] = torch.tensor(4.0)
    expected[names[1]] = (
        _tucker_by_hand(parts["hada_t1"], parts["hada_w1_a"], parts["hada_w1_b"], out, inp)
        * _tucker_by_hand(parts["hada_t2"], parts["hada_w2_a"], parts["hada_w2_b"], out, inp)
        * (4.0 / R)
    )

    w = picks[names[2]].weight
    out, inp = w.shape[:2]
    (a, b), (c, d) = factorization(out, 4), factorization(inp, 4)
    w1 = torch.randn(a, c, generator=g)
    w2a, w2b, t2 = torch.randn(R, b, generator=g), torch.randn(R, d, generator=g), torch.randn(R, R, 3, 3, generator=g)
    tensors.update(
        {
            f"{names[2]}.lokr_w1": w1,
            f"{names[2]}.lokr_w2_a": w2a,
            f"{names[2]}.lokr_w2_b": w2b,
            f"{names[2]}.lokr_t2": t2,
            f"{names[2]}.alpha": torch.tensor(1.0),
        }
    )
    expected[names[2]] = _kron_by_hand(w1, _tucker_by_hand(t2, w2a, w2b, b, d)) * (1.0 / R)
    path = tmp_path / "lycoris.safetensors"
    save_file(tensors, str(path), metadata={"ss_network_module": "lycoris.kohya", "ss_base_model_version": "sd_v1"})
    return path, picks, expected


def test_lycoris_tucker_files_apply_with_lycoris_math(tmp_path):
    bundle = fresh_bundle("sd1")
    path, picks, expected = _lycoris_file(tmp_path, bundle)
    lora = read_lora(path)
    assert {w.kind for w in lora.modules.values()} == {"lora", "loha", "lokr"}
    assert all(w.is_tucker for w in lora.modules.values())
    before = {n: m.weight.detach().clone() for n, m in picks.items()}
    inputs = unet_inputs(bundle)
    hooked = fresh_bundle("sd1")
    apply_lora(hooked, path, 0.7, merge=False)
    applied = apply_lora(bundle, path, 0.7, merge=True)
    assert applied.touched == 3
    for name, module in picks.items():
        torch.testing.assert_close(module.weight.detach(), before[name] + 0.7 * expected[name], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(unet_out(hooked, inputs), unet_out(bundle, inputs), atol=1e-4, rtol=0)
    info = lora_info(path)
    assert info["tucker_modules"] == 3 and info["shapes"]["conv3x3"] == 3


@pytest.mark.parametrize("algo", ["locon", "loha", "lokr"])
def test_tucker_training_saves_lycoris_files_that_apply_back(tmp_path, algo):
    bundle = fresh_bundle("sd1")
    method = LoraMethod(LoraOptions(rank=4, conv_rank=2, algo=algo, use_tucker=True, save_dtype="fp32"))
    method.validate()
    method.prepare(bundle)
    core = {"locon": "lora_mid.weight", "loha": "hada_t1", "lokr": "lokr_t2"}[algo]
    convs = [m for m in method.network if m.is_conv and tuple(m.base.kernel_size) == (3, 3)]
    assert convs and all(core in dict(m.named_parameters()) for m in convs if not getattr(m, "full_matrix", False))
    assert all(float(m.delta_weight().abs().max()) < 1e-6 for m in method.network), "starts at identity"
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in method.network:
            for param in module.parameters():
                param.add_(torch.randn(param.shape, generator=g) * 0.05)
    path = method.save(bundle, SaveInfo(path=tmp_path / "t.safetensors", step=1, epoch=1, metadata={}, final=True))
    saved = read_lora(path)
    assert saved.metadata["ss_network_module"] == "lycoris.kohya"
    assert '"use_tucker": "True"' in saved.metadata["ss_network_args"]
    assert any(core in w.tensors for w in saved.modules.values())
    inputs = unet_inputs(bundle)
    trained = unet_out(bundle, inputs)  # the training forward (hooks on the bundle)
    merged = fresh_bundle("sd1")
    apply_lora(merged, path, merge=True)
    torch.testing.assert_close(unet_out(merged, inputs), trained, atol=1e-4, rtol=0)


def test_lyco_tag_applies_like_lora_and_finds_the_lycoris_folder(tmp_path):
    bundle = fresh_bundle("sd1")
    lyco_dir = tmp_path / "LyCORIS"
    lyco_dir.mkdir()
    (tmp_path / "Lora").mkdir()
    path, _, _ = _lycoris_file(lyco_dir, fresh_bundle("sd1"))
    inputs = unet_inputs(bundle)
    base_out, before = unet_out(bundle, inputs), all_params(bundle)
    session = NetworkSession({"lora": LoraHandler(tmp_path / "Lora"), "lyco": LycoHandler(tmp_path / "Lora")})
    with session.apply(bundle, "a cat <lyco:lycoris:0.5:0.7>") as applied:
        assert "<lyco" not in applied.prompt
        inside = unet_out(bundle, inputs)
    reference = fresh_bundle("sd1")
    apply_lora(reference, path, 0.5, unet_weight=0.7)
    torch.testing.assert_close(inside, unet_out(reference, inputs), atol=1e-5, rtol=0)
    assert (inside - base_out).abs().max() > 1e-4
    assert all(torch.equal(before[k], v) for k, v in all_params(bundle).items())
