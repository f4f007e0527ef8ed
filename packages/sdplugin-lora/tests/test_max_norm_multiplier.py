"""kohya's ``--scale_weight_norms`` (max-norm regularisation) and ``network_multiplier``.

The reference is kohya's ``LoRANetwork.apply_max_norm_regularization`` (networks/lora.py),
re-written below from its source: per module ``updown = up @ down`` (a 3x3 down with a 1x1 up
composed by ``conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)``), times ``alpha / dim``;
``norm = ||updown||.clamp(min=X/2)``, ``desired = norm.clamp(max=X)``, ``ratio = desired / norm``;
when ``ratio != 1`` both factors are multiplied by ``sqrt(ratio)``.
"""

from __future__ import annotations

import math

import pytest
import torch
from click.testing import CliRunner
from sdcore.errors import ConfigError
from sdcore.testing.contract import make_tiny_dataset
from sdplugin_lora.adapters import LohaAdapter, LoraAdapter, SharedDownLora
from sdplugin_lora.method import LoraMethod, LoraOptions
from sdplugin_lora.network import LoraNetwork


def kohya_updown(up: torch.Tensor, down: torch.Tensor, alpha: float) -> torch.Tensor:
    dim = down.shape[0]
    if up.dim() == 4 and up.shape[2:] == (1, 1) and down.shape[2:] == (1, 1):
        updown = (up.squeeze(2).squeeze(2) @ down.squeeze(2).squeeze(2)).unsqueeze(2).unsqueeze(3)
    elif up.dim() == 4 and (up.shape[2:] == (3, 3) or down.shape[2:] == (3, 3)):
        updown = torch.nn.functional.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)
    else:
        updown = up @ down
    return updown * (alpha / dim)


def kohya_max_norm(weights: dict[str, tuple[torch.Tensor, torch.Tensor, float]], max_norm: float):
    """kohya's rule on copies: (new weights, keys scaled, mean norm, max norm)."""
    out, norms, scaled = {}, [], 0
    for name, (up, down, alpha) in weights.items():
        updown = kohya_updown(up, down, alpha)
        norm = updown.norm().clamp(min=max_norm / 2)
        desired = torch.clamp(norm, max=max_norm)
        ratio = desired.cpu() / norm.cpu()
        sqrt_ratio = ratio**0.5
        if ratio != 1:
            scaled += 1
            up, down = up * sqrt_ratio, down * sqrt_ratio
        out[name] = (up, down)
        norms.append((updown.norm() * ratio).item())
    return out, scaled, sum(norms) / len(norms), max(norms)


def _randomise(module, seed: int, std: float) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (module.lora_up.weight, module.lora_down.weight):
            p.copy_(torch.randn(p.shape, generator=g) * std)


def _network():
    torch.manual_seed(0)
    linear_big = LoraAdapter("lin_big", torch.nn.Linear(32, 24), 4, 2.0)
    linear_small = LoraAdapter("lin_small", torch.nn.Linear(32, 24), 4, 2.0)
    conv_big = LoraAdapter("conv_big", torch.nn.Conv2d(8, 6, 3, padding=1), 2, 1.0)
    pointwise = LoraAdapter("pointwise", torch.nn.Conv2d(8, 6, 1), 4, 4.0)
    shared = SharedDownLora("qkv", [("q", torch.nn.Linear(16, 8)), ("k", torch.nn.Linear(16, 8))], 4, 1.0)
    modules = [linear_big, linear_small, conv_big, pointwise, shared]
    for i, (module, std) in enumerate(zip(modules, (1.0, 0.01, 1.0, 0.05, 1.0), strict=True)):
        _randomise(module, i, std)
    return LoraNetwork(modules)


def test_max_norm_equals_kohya_formula():
    network = _network()
    limit = 0.5
    before = {n: (m.lora_up.weight.detach().clone(), m.lora_down.weight.detach().clone(), float(m.alpha))
              for n, m in network.loras.items()}  # fmt: skip
    norms = {n: kohya_updown(*w).norm().item() for n, w in before.items()}
    # the set-up covers both sides: three modules above the limit, two below half of it
    assert [n for n, v in norms.items() if v > limit] == ["lin_big", "conv_big", "qkv"]
    assert all(norms[n] < limit / 2 for n in ("lin_small", "pointwise"))
    want, want_scaled, want_mean, want_max = kohya_max_norm(before, limit)
    scaled, mean, top = network.apply_max_norm(limit)
    assert scaled == want_scaled == 3
    assert mean == pytest.approx(want_mean, rel=1e-6) and top == pytest.approx(want_max, rel=1e-6)
    for name, module in network.loras.items():
        up, down = want[name]
        torch.testing.assert_close(module.lora_up.weight, up, rtol=1e-6, atol=0)
        torch.testing.assert_close(module.lora_down.weight, down, rtol=1e-6, atol=0)
        after = kohya_updown(module.lora_up.weight, module.lora_down.weight, float(module.alpha)).norm().item()
        if norms[name] > limit:
            assert after == pytest.approx(limit, rel=1e-5)  # scaled to exactly the limit
        else:  # untouched, bit for bit
            assert torch.equal(module.lora_up.weight, before[name][0])
            assert torch.equal(module.lora_down.weight, before[name][1])
    # a second pass only meets rounding: a module left a ulp above the limit counts again (as in kohya),
    # the weights move by no more than that
    again = {n: m.lora_up.weight.detach().clone() for n, m in network.loras.items()}
    assert network.apply_max_norm(limit)[0] <= 3
    for name, module in network.loras.items():
        torch.testing.assert_close(module.lora_up.weight, again[name], rtol=1e-6, atol=0)


def lycoris_lokr_max_norm(factors: dict[str, torch.Tensor], scale: float, shape, max_norm: float):
    """LyCORIS ``LokrModule.apply_max_norm`` (lycoris/modules/lokr.py), re-written: the norm of
    ``kron(w1, w2) * scale`` (``w2 = w2_a @ w2_b``, or with Tucker ``t2`` contracted in), and when
    scaled each of the ``modules = 4 - use_w1 - use_w2 + (not use_w2 and tucker)`` factors times
    ``ratio ** (1 / modules)``. Returns (new factors, scaled, norm after)."""
    w1 = factors["lokr_w1"]
    use_w2 = "lokr_w2" in factors
    tucker = "lokr_t2" in factors
    if use_w2:
        w2 = factors["lokr_w2"]
    elif tucker:
        w2 = torch.einsum(
            "i j k l, j r, i p -> p r k l", factors["lokr_t2"], factors["lokr_w2_b"], factors["lokr_w2_a"]
        )
    else:
        w2 = factors["lokr_w2_a"] @ factors["lokr_w2_b"]
    if w2.dim() == 4:  # LyCORIS make_kron: w1 gets the kernel's two dims
        w1 = w1.unsqueeze(2).unsqueeze(2)
    elif len(shape) == 4:
        w2 = w2.reshape(w2.shape[0], -1, *shape[2:])
        w1 = w1.unsqueeze(2).unsqueeze(2)
    weight = torch.kron(w1.contiguous(), w2.contiguous()) * scale
    orig_norm = weight.reshape(shape).norm()
    norm = torch.clamp(orig_norm, max_norm / 2)
    desired = torch.clamp(norm, max=max_norm)
    ratio = desired.cpu() / norm.cpu()
    scaled = bool(norm != desired)
    modules = 4 - 1 - int(use_w2) + int(not use_w2 and tucker)  # sdcore keeps w1 whole (use_w1)
    out = {k: (v * ratio ** (1 / modules) if scaled else v) for k, v in factors.items()}
    return out, scaled, float(orig_norm * ratio)


@pytest.mark.parametrize("kind", ["w2_a_b", "full_w2", "tucker_conv"])
def test_lokr_max_norm_equals_lycoris_formula(kind):
    from sdplugin_lora.adapters import LokrAdapter

    torch.manual_seed(2)
    full_w2 = kind == "full_w2"

    def make(name):
        if kind == "tucker_conv":
            return LokrAdapter(name, torch.nn.Conv2d(64, 48, 3, padding=1), 2, 1.0, tucker=True)
        return LokrAdapter(name, torch.nn.Linear(64, 48), 64 if full_w2 else 2, 1.0)

    big, small = make("big"), make("small")
    assert ("lokr_t2" in dict(big.named_parameters())) == (kind == "tucker_conv")
    for i, (module, std) in enumerate(((big, 1.0), (small, 0.01))):
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for _, p in module.named_parameters():
                p.copy_(torch.randn(p.shape, generator=g) * std)
    assert ("lokr_w2" in dict(big.named_parameters())) == full_w2
    network = LoraNetwork([big, small])
    limit = 0.5
    want = {}
    for module in (big, small):
        factors = {k: v.detach().clone() for k, v in module.named_parameters()}
        want[module.lora_name] = lycoris_lokr_max_norm(factors, module.scale, tuple(module.base.weight.shape), limit)
    assert [want[n][1] for n in ("big", "small")] == [True, False]
    scaled, mean, top = network.apply_max_norm(limit)
    assert scaled == 1
    assert top == pytest.approx(want["big"][2], rel=1e-5) == pytest.approx(limit, rel=1e-5)
    assert mean == pytest.approx((want["big"][2] + want["small"][2]) / 2, rel=1e-5)
    for module in (big, small):
        for key, param in module.named_parameters():
            torch.testing.assert_close(param, want[module.lora_name][0][key], rtol=1e-6, atol=0)
    assert big.delta_weight().norm().item() == pytest.approx(limit, rel=1e-5)


def lycoris_loha_max_norm(t: dict[str, torch.Tensor], scale: float, scalar: float, max_norm: float):
    """LyCORIS ``LohaModule.apply_max_norm`` (lycoris/modules/loha.py), re-written for a Linear:
    ``orig_norm = ||(w1a @ w1b) * (w2a @ w2b) * scale * scalar||``; when scaled ``scalar *= ratio``.
    Returns (new scalar, scaled, norm after)."""
    weight = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"]) * scale
    orig_norm = (weight * scalar).norm()
    norm = torch.clamp(orig_norm, max_norm / 2)
    desired = torch.clamp(norm, max=max_norm)
    ratio = desired.cpu() / norm.cpu()
    scaled = bool(norm != desired)
    return (scalar * float(ratio) if scaled else scalar), scaled, float(orig_norm * ratio)


def test_loha_and_dora_max_norm_rescale_lycoris_scalar():
    torch.manual_seed(4)
    big = LohaAdapter("big", torch.nn.Linear(12, 10), 4, 2.0)
    small = LohaAdapter("small", torch.nn.Linear(12, 10), 4, 2.0)
    dora = LoraAdapter("dora", torch.nn.Linear(12, 10), 4, 2.0, dora=True)
    for i, (module, std) in enumerate(((big, 1.0), (small, 0.05), (dora, 1.0))):
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, p in module.named_parameters():
                if name != "dora_scale":
                    p.copy_(torch.randn(p.shape, generator=g) * std)
    raw = {m.lora_name: {k: v.detach().clone() for k, v in m.named_parameters()} for m in (big, small, dora)}
    limit = 0.5
    want = {m.lora_name: lycoris_loha_max_norm(raw[m.lora_name], m.scale, 1.0, limit) for m in (big, small)}
    assert [want[n][1] for n in ("big", "small")] == [True, False]
    # LyCORIS LoCon/DoRA: ||up @ down * scale * scalar||, before the decomposition
    dora_norm = (raw["dora"]["lora_up.weight"] @ raw["dora"]["lora_down.weight"] * dora.scale).norm().item()
    assert dora_norm > limit
    x = torch.randn(3, 12)
    before_small = small.base(x) + small.delta(x)
    scaled, _, top = LoraNetwork([big, small, dora]).apply_max_norm(limit)
    assert scaled == 2 and top == pytest.approx(limit, rel=1e-5)
    assert big.scalar == pytest.approx(want["big"][0], rel=1e-6) and small.scalar == 1.0
    assert dora.scalar == pytest.approx(limit / dora_norm, rel=1e-5)
    for module in (big, small, dora):  # the factors themselves are untouched: the scalar carries the scaling
        for key, param in module.named_parameters():
            assert torch.equal(param, raw[module.lora_name][key])
    # the forward applies the scalar: the LoHa change is now at norm `limit`, the small module unchanged
    assert big.delta_weight().norm().item() == pytest.approx(limit, rel=1e-5)
    torch.testing.assert_close(small.base(x) + small.delta(x), before_small)
    with torch.no_grad():
        want_dora = (raw["dora"]["lora_up.weight"] @ raw["dora"]["lora_down.weight"]) * dora.scale * dora.scalar
        base = dora.base.weight.detach()
        merged = base + want_dora
        norm = merged.norm(dim=0, keepdim=True) if dora.dora_scale.shape[0] == 1 else merged.norm(dim=1, keepdim=True)
        expected = merged * (dora.dora_scale.detach() / norm) - base
    torch.testing.assert_close(dora.delta_weight(), expected, rtol=1e-5, atol=1e-6)
    # files hold the scalar baked into hada_w1_a / lora_up (LyCORIS' custom_state_dict); loading resets it
    state = LoraNetwork([big, dora]).state_dict()
    torch.testing.assert_close(state["big.hada_w1_a"], raw["big"]["hada_w1_a"] * big.scalar)
    torch.testing.assert_close(state["dora.lora_up.weight"], raw["dora"]["lora_up.weight"] * dora.scalar)
    fresh = LohaAdapter("big", big.base, 4, 2.0)
    LoraNetwork([fresh]).load_state_dict({k: v for k, v in state.items() if k.startswith("big.")})
    assert fresh.scalar == 1.0
    torch.testing.assert_close(fresh.delta_weight(), big.delta_weight(), rtol=1e-5, atol=1e-7)


def test_resumable_state_keeps_raw_factors_and_scalars():
    from lora_testutil import fresh_bundle

    options = LoraOptions(rank=2, algo="loha", scale_weight_norms=1e-3)
    method = LoraMethod(options)
    method.prepare(fresh_bundle("sd1"))
    network = method.network
    assert network is not None
    with torch.no_grad():
        for module in network.loras.values():
            module.hada_w2_a.normal_(std=0.5)
    assert network.apply_max_norm(1e-3)[0] == len(network)
    state = method.trainable_state_dict()
    scalars = {k: float(v) for k, v in state.items() if k.endswith(".sdcore_scalar")}
    assert len(scalars) == len(network)
    other = LoraMethod(options)
    other.prepare(fresh_bundle("sd1"))
    other.load_trainable_state_dict(state)
    assert other.network is not None
    for name, module in other.network.loras.items():
        assert module.scalar == network.loras[name].scalar == scalars[f"{name}.sdcore_scalar"]
        for key, param in module.named_parameters():
            assert torch.equal(param, dict(network.loras[name].named_parameters())[key])
    # without rescaled modules the state is the plain file layout
    plain = LoraMethod(LoraOptions(rank=2))
    plain.prepare(fresh_bundle("sd1"))
    assert plain.network is not None
    assert set(plain.trainable_state_dict()) == set(plain.network.state_dict())


def test_max_norm_refuses_other_algorithms():
    from sdplugin_lora.adapters import OftAdapter

    oft = OftAdapter("oft", torch.nn.Linear(8, 8), 2, 1e-3)
    with pytest.raises(TypeError, match="LoRA/LoCon, LoHa and LoKr modules, not oft"):
        LoraNetwork([oft]).apply_max_norm(1.0)
    with pytest.raises(ConfigError, match=r"networks\.oft has no max-norm"):
        LoraMethod(LoraOptions(algo="oft", scale_weight_norms=1.0)).validate()
    with pytest.raises(ConfigError, match="--split-qkv: kohya's lora_flux/lora_sd3 max-norm"):
        LoraMethod(LoraOptions(scale_weight_norms=1.0, split_qkv=True)).validate()
    for algo, extra in (("loha", {}), ("lokr", {}), ("dora", {}), ("locon", {"use_tucker": True})):
        with pytest.raises(ConfigError, match="rank-dropout mask"):
            LoraMethod(LoraOptions(algo=algo, scale_weight_norms=1.0, rank_dropout=0.1, **extra)).validate()
        LoraMethod(LoraOptions(algo=algo, scale_weight_norms=1.0, **extra)).validate()
    LoraMethod(LoraOptions(algo="lora", scale_weight_norms=1.0, rank_dropout=0.1)).validate()  # kohya: fine
    LoraMethod(LoraOptions(algo="oft", scale_weight_norms=0)).validate()  # 0 is off, as in kohya
    with pytest.raises(ConfigError, match="must be positive"):
        LoraMethod(LoraOptions(scale_weight_norms=-1.0)).validate()
    with pytest.raises(ConfigError, match="non-zero"):
        LoraMethod(LoraOptions(network_multiplier=0.0)).validate()


@pytest.mark.parametrize("multiplier", [1.0, 0.5, -1.0, 2.5])
def test_network_multiplier_scales_the_forward_exactly(multiplier):
    from lora_testutil import fresh_bundle

    torch.manual_seed(3)
    linear = torch.nn.Linear(12, 10)
    conv = torch.nn.Conv2d(4, 6, 3, padding=1)
    for base, x in ((linear, torch.randn(3, 5, 12)), (conv, torch.randn(2, 4, 7, 7))):
        adapter = LoraAdapter("m", base, 3, 1.5, multiplier=multiplier)
        _randomise(adapter, 1, 0.3)
        plain = base(x)
        adapter.attach()
        try:
            got = base(x)
        finally:
            adapter.detach()
        with torch.no_grad():
            change = adapter.lora_up(adapter.lora_down(x)) * (1.5 / 3)
        torch.testing.assert_close(got, plain + multiplier * change, rtol=1e-5, atol=1e-6)
    # the method builds every module at the multiplier; the saved tensors do not carry it
    bundle = fresh_bundle("sd1")
    method = LoraMethod(LoraOptions(rank=2, network_multiplier=multiplier, train_text_encoder=True))
    method.prepare(bundle)
    assert method.network is not None and len(method.network) > 10
    assert {m.multiplier for m in method.network.loras.values()} == {multiplier}
    baseline = LoraMethod(LoraOptions(rank=2, train_text_encoder=True))
    baseline.prepare(fresh_bundle("sd1"))
    assert baseline.network is not None
    assert {k: v.shape for k, v in method.network.state_dict().items()} == {
        k: v.shape for k, v in baseline.network.state_dict().items()
    }


def test_network_multiplier_gradients_are_the_scaled_forwards():
    """Training at multiplier m = training the network whose change is m times as large: the loss and the
    gradients of up/down equal those of a hand-written ``W x + m * s * up(down(x))``."""
    torch.manual_seed(5)
    base = torch.nn.Linear(6, 4)
    x, target = torch.randn(8, 6), torch.randn(8, 4)
    m = -0.75
    adapter = LoraAdapter("m", base, 2, 1.0, multiplier=m)
    _randomise(adapter, 2, 0.5)
    adapter.attach()
    loss = torch.nn.functional.mse_loss(base(x), target)
    loss.backward()
    adapter.detach()
    up = adapter.lora_up.weight.detach().clone().requires_grad_(True)
    down = adapter.lora_down.weight.detach().clone().requires_grad_(True)
    manual = base(x).detach() + m * 0.5 * (x @ down.T) @ up.T
    ref = torch.nn.functional.mse_loss(manual, target)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(adapter.lora_up.weight.grad, up.grad)
    torch.testing.assert_close(adapter.lora_down.weight.grad, down.grad)


def _file_norm(weights) -> float:
    """A file module's change norm, from its tensors (kohya LoRA or LyCORIS LoHa of a Linear/1x1 conv)."""
    t = {k: v.float() for k, v in weights.tensors.items()}
    if "hada_w1_a" in t:
        rank = t["hada_w1_b"].shape[0]
        alpha = float(t["alpha"]) if "alpha" in t else rank
        flat = [t[k].reshape(t[k].shape[0], -1) for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")]
        return ((flat[0] @ flat[1]) * (flat[2] @ flat[3]) * (alpha / rank)).norm().item()
    return kohya_updown(weights.up.float(), weights.down.float(), weights.alpha).norm().item()


@pytest.mark.parametrize("algo", ["lora", "loha"])
def test_cli_run_keeps_every_module_norm_below_the_limit(tmp_path, algo):
    from sdcore.cli import build_cli
    from sdcore.plugins import get_plugin_manager
    from sdplugin_lora.format import read_lora

    data = make_tiny_dataset(tmp_path / "data", n=2, size=64)
    out = tmp_path / "out" / "maxnorm.safetensors"
    limit = 0.004
    args = ["train", "lora", "--pretrained_model_name_or_path", "tiny:sd1", "--train_data_dir", str(data),
            "--output", str(out), "--network_dim", "4", "--network_alpha", "4", "--resolution", "64",
            "--learning_rate", "1e-2", "--max_train_steps", "3", "--save_precision", "float", "--seed", "3",
            "--scale_weight_norms", str(limit), "--network_multiplier", "0.8", "--no-progress",
            "--log-dir", str(tmp_path / "logs"), "--algo", algo]  # fmt: skip
    result = CliRunner().invoke(build_cli(get_plugin_manager()), args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    lora = read_lora(out)
    assert lora.metadata["ss_scale_weight_norms"] == str(limit)
    assert {w.kind for w in lora.modules.values()} == {algo}
    norms = [_file_norm(w) for w in lora.modules.values()]
    assert len(norms) > 10
    assert max(norms) <= limit * (1 + 1e-5)
    # the limit bit: several modules sit exactly at it
    assert sum(math.isclose(n, limit, rel_tol=1e-4) for n in norms) >= 3


def test_keys_scaled_reach_the_step_logs(tmp_path):
    from sdcore.testing.contract import contract_options, plugin_manager_with
    from sdcore.train.loop import train

    class Recorder:
        def __init__(self):
            self.logs = []

        def sdcore_on_train_step(self, context, step, logs):
            self.logs.append(dict(logs))

    recorder = Recorder()
    o = contract_options(LoraMethod, tmp_path, {"rank": 4, "lr": 1e-2, "max_steps": 2, "scale_weight_norms": 0.004})
    method = LoraMethod(o)
    train(method, plugin_manager=plugin_manager_with(recorder))
    assert len(recorder.logs) == 2
    for logs in recorder.logs:
        assert {"keys_scaled", "avg_key_norm", "max_key_norm", "loss", "lr"} <= set(logs)
        assert logs["max_key_norm"] <= 0.004 * (1 + 1e-5)
    assert recorder.logs[-1]["keys_scaled"] >= 1
    # without the option the runtime reports only its own values
    recorder.logs.clear()
    train(LoraMethod(contract_options(LoraMethod, tmp_path, {"rank": 4, "max_steps": 1}, tag="plain")),
          plugin_manager=plugin_manager_with(recorder))  # fmt: skip
    assert "keys_scaled" not in recorder.logs[0]


def test_kohya_names_translate():
    from dataclasses import fields

    from sdcore.train import kohya
    from sdcore.train.config import load_options
    from sdcore.train.options import TrainOptions

    given = {
        "scale_weight_norms": 1.0,
        "network_multiplier": -1,
        "caption_prefix": "sks",
        "secondary_separator": ";;;",
        "caption_dropout_every_n_epochs": 2,
        "network_module": "lycoris.kohya",
        "network_args": ["algo=locon", "conv_dim=2"],
    }
    notes: list[str] = []
    o = load_options(LoraOptions, None, kohya=given, notes=notes)
    assert (o.scale_weight_norms, o.network_multiplier, o.algo) == (1.0, -1, "locon")
    assert (o.caption_prefix, o.secondary_separator, o.caption_dropout_every_n_epochs) == ("sks", ";;;", 2)
    assert any("LyCORIS rescales a per-module scalar" in n for n in notes)
    # another method: kohya_ss writes these fields at their off values, which pass; a real value is refused
    core = [f.name for f in fields(TrainOptions)]
    assert not kohya.translate({"network_multiplier": 1.0, "scale_weight_norms": 0}, core, where="c").problems
    problems = kohya.translate({"network_multiplier": 2.0, "scale_weight_norms": 1}, core, where="c").problems
    assert len(problems) == 2 and all("kohya's lora option" in p for p in problems)


@pytest.mark.parametrize("algo", ["lora", "loha"])
def test_resume_with_max_norm_continues_exactly(tmp_path, algo):
    """4 steps in one go == 2 steps, Ctrl-C, --resume: bit-identical (LoHa: raw factors and the scalars)."""
    from sdcore.testing.contract import check_resume

    check_resume(LoraMethod, tmp_path, {"rank": 4, "algo": algo, "scale_weight_norms": 0.004, "lr": 1e-2})
