"""kohya's LoRA-GGPO (``--ggpo-sigma``/``--ggpo-beta``, sd-scripts networks/lora_flux.py network_args).

The reference below is kohya's maths re-written from its source (LoRAModule ``initialize_norm_cache``,
``update_norms``, ``update_grad_norms`` and ``forward``), forming the full ``out x in`` products as kohya
does: ``w̄`` = mean row norm of the layer weight (kohya samples min(1000, out) rows: all rows here),
``c = sqrt(w̄² + rowsum((up @ down)²))`` (kohya's ``mul(scale)`` is not in place: no scale),
``g = rownorm(scale · (up @ down.grad + up.grad @ down))``, and the training forward adds
``x @ (randn(out, in) * (sigma · sqrt(c²) + beta · g²) / sqrt(out)).T``.
"""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from sdcore.errors import ConfigError
from sdcore.testing.contract import contract_options
from sdcore.train.kohya import translate
from sdplugin_lora.adapters import LoraAdapter, SharedDownLora
from sdplugin_lora.ggpo import enable, update
from sdplugin_lora.method import LoraMethod, LoraOptions
from sdplugin_lora.network import LoraNetwork

SIGMA, BETA = 0.03, 0.01
FIELDS = list(LoraOptions.__dataclass_fields__)


def kohya_factor(weight, up, down, up_grad, down_grad, scale):
    """kohya's per-row noise scale ``[out, 1]`` (float64 here, full products)."""
    weight, up, down, up_grad, down_grad = (t.double().reshape(t.shape[0], -1) for t in (weight, up, down, up_grad, down_grad))  # fmt: skip
    estimate = torch.norm(weight, dim=1, keepdim=True).mean()
    module_weights = up @ down
    combined = torch.sqrt(estimate**2 + torch.sum(module_weights**2, dim=1, keepdim=True))
    approx_grad = scale * (up @ down_grad + up_grad @ down)
    grad_norms = torch.norm(approx_grad, dim=1, keepdim=True)
    scale_rows = SIGMA * torch.sqrt(combined**2) + BETA * grad_norms**2
    return (scale_rows * (1.0 / math.sqrt(weight.shape[0]))).float()


def _randomise(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (module.lora_up.weight, module.lora_down.weight):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _backward(network, layers, inputs):
    """A known loss through the hooked layers, so every LoRA weight gets a gradient."""
    loss = sum((layer(x) ** 2).sum() for layer, x in zip(layers, inputs, strict=True))
    network.zero_grad()
    loss.backward()


def _setup():
    torch.manual_seed(0)
    linear = torch.nn.Linear(32, 24)
    conv = torch.nn.Conv2d(8, 6, 1)
    q, k = torch.nn.Linear(16, 8), torch.nn.Linear(16, 12)
    for layer in (linear, conv, q, k):
        layer.requires_grad_(False)
    modules = [
        LoraAdapter("lin", linear, 4, 2.0),
        LoraAdapter("pw", conv, 2, 1.0),
        SharedDownLora("qkv", [("q", q), ("k", k)], 4, 1.0),
    ]
    for i, module in enumerate(modules):
        _randomise(module, i)
    network = LoraNetwork(modules).attach()
    inputs = [torch.randn(3, 5, 32), torch.randn(2, 8, 4, 4), torch.randn(2, 7, 16)]
    return network, (linear, conv, q, k), inputs


def test_norms_and_noise_equal_kohya_formula():
    network, (linear, conv, q, k), (x_lin, x_conv, x_qkv) = _setup()
    enable(network, SIGMA, BETA)
    network.train()
    _backward(network, (linear, conv, q), (x_lin, x_conv, x_qkv))
    update(network)
    lin, pw, qkv = network.loras["lin"], network.loras["pw"], network.loras["qkv"]
    fused_weight = torch.cat([q.weight, k.weight])
    for module, weight in ((lin, linear.weight), (pw, conv.weight), (qkv, fused_weight)):
        want = kohya_factor(weight, module.lora_up.weight, module.lora_down.weight, module.lora_up.weight.grad,
                            module.lora_down.weight.grad, module.scale)  # fmt: skip
        assert module.ggpo.factor.shape == want.shape
        torch.testing.assert_close(module.ggpo.factor, want, rtol=1e-5, atol=1e-7)

    # the forward adds x @ (randn(out, in) * factor).T on top of the LoRA output (kohya's draw order)
    with torch.no_grad():
        clean = {}
        for layer, x in ((linear, x_lin), (conv, x_conv), (q, x_qkv), (k, x_qkv)):
            network.eval()
            clean[layer] = layer(x)
        network.train()
        torch.manual_seed(7)
        got_lin, got_pw = linear(x_lin), conv(x_conv)
        got_q, got_k = q(x_qkv), k(x_qkv)
        torch.manual_seed(7)
        noise_lin = torch.randn(24, 32) * lin.ggpo.factor
        noise_pw = torch.randn(6, 8) * pw.ggpo.factor
        noise_q = torch.randn(8, 16) * qkv.ggpo.factor[:8]
        noise_k = torch.randn(12, 16) * qkv.ggpo.factor[8:]
    torch.testing.assert_close(got_lin, clean[linear] + x_lin @ noise_lin.T)
    torch.testing.assert_close(got_pw, clean[conv] + torch.einsum("bchw,oc->bohw", x_conv, noise_pw))
    torch.testing.assert_close(got_q, clean[q] + x_qkv @ noise_q.T)
    torch.testing.assert_close(got_k, clean[k] + x_qkv @ noise_k.T)
    assert (got_lin - clean[linear]).abs().max() > 1e-3  # the noise is there, not lost in rounding


def test_no_noise_before_the_first_update_nor_in_eval_and_no_gradient_through_it():
    network, (linear, *_), (x, *_) = _setup()
    enable(network, SIGMA, BETA)
    network.eval()
    with torch.no_grad():
        clean = linear(x)
    network.train()
    with torch.no_grad():
        assert torch.equal(linear(x), clean)  # step 1: no norms yet, as in kohya
    _backward(network, (linear,), (x,))
    update(network)
    network.eval()
    with torch.no_grad():
        assert torch.equal(linear(x), clean)  # samples and validation: eval mode, no noise
    # training: the noise adds no gradient path (kohya draws it under no_grad): a loss linear in the output
    # has the same input gradient with the noise as without it
    grads = []
    for train in (False, True):
        network.train(train)
        x_grad = x.clone().requires_grad_(True)
        linear(x_grad).sum().backward()
        grads.append(x_grad.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_skipped_step_keeps_the_old_gradient_norms():
    network, (linear, *_), (x, *_) = _setup()
    enable(network, SIGMA, BETA)
    network.train()
    _backward(network, (linear,), (x,))
    update(network)
    lin = network.loras["lin"]
    before = lin.ggpo.grad_norms.clone()
    lin.lora_up.weight.grad[0, 0] = float("inf")  # an fp16 step the grad scaler skips
    update(network)
    assert torch.equal(lin.ggpo.grad_norms, before) and lin.ggpo.factor.isfinite().all()


def _method(tmp_path, **overrides):
    return LoraMethod(contract_options(LoraMethod, tmp_path, {"rank": 4, **overrides}))


def _said(caplog, method) -> list[str]:
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sdplugin_lora"):
        method.validate()
    return [r.getMessage() for r in caplog.records]


def test_only_one_of_the_two_is_off_as_in_kohya(tmp_path, caplog):
    for given, alone in (({"ggpo_sigma": SIGMA}, "--ggpo-sigma"), ({"ggpo_beta": BETA}, "--ggpo-beta")):
        method = _method(tmp_path, **given)
        (line,) = _said(caplog, method)
        assert line.startswith(f"{alone} without ") and "GGPO is off" in line
        assert method.ggpo is None
    assert _said(caplog, _method(tmp_path, ggpo_sigma=SIGMA, ggpo_beta=BETA)) == []


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"algo": "loha"}, "--algo loha"),
        ({"algo": "locon"}, "--algo locon"),
        ({"conv_rank": 4}, "--conv-rank"),
        ({"split_qkv": True}, "--split-qkv"),
        ({"fused_backward_pass": True}, "--fused-backward-pass"),
        ({"ggpo_beta": -1.0}, "--ggpo-beta must be 0 or positive"),
    ],
)
def test_refused_where_kohya_does_not_define_it(tmp_path, overrides, named):
    method = _method(tmp_path, **{"ggpo_sigma": SIGMA, "ggpo_beta": BETA, **overrides})
    with pytest.raises(ConfigError, match="ggpo") as err:
        method.validate()
    assert named in str(err.value)


def _translate(module, *args):
    return translate({"network_module": module, "network_args": list(args)}, FIELDS, where="c.toml")


def test_kohya_translation():
    out = _translate("networks.lora_flux", "ggpo_sigma=0.03", "ggpo_beta=0.01")
    assert not out.problems and (out.values["ggpo_sigma"], out.values["ggpo_beta"]) == ("0.03", "0.01")
    out = _translate("networks.lora_flux", "ggpo_sigma=0.03")
    assert not out.problems and "ggpo_sigma" not in out.values
    assert any("only with both" in n for n in out.notes)
    for module in ("networks.lora", "networks.lora_sd3"):
        out = _translate(module, "ggpo_sigma=0.03", "ggpo_beta=0.01")
        assert not out.problems and "ggpo_sigma" not in out.values and "ggpo_beta" not in out.values
        assert any(module in n and "ignores them" in n for n in out.notes)


def test_training_uses_it_and_the_file_never_holds_it(tmp_path):
    """A run with GGPO moves differently from one without (same seed); its norms come from the hook; a
    network without GGPO given the same trained weights writes the very same tensors."""
    from safetensors.torch import load_file
    from sdcore.testing.contract import _bundle
    from sdcore.train.loop import train

    on = _method(tmp_path, ggpo_sigma=3.0, ggpo_beta=1.0, lr=1e-2, max_steps=3, output=str(tmp_path / "on" / "a.safetensors"))  # fmt: skip
    off = _method(tmp_path, lr=1e-2, max_steps=3, output=str(tmp_path / "off" / "a.safetensors"))
    train(on, bundle=_bundle("sd1"))
    train(off, bundle=_bundle("sd1"))
    trained_on, trained_off = on.trainable_state_dict(), off.trainable_state_dict()
    assert any(k.endswith("sdcore_ggpo_grad_norms") for k in trained_on)
    assert not any("ggpo" in k for k in trained_off)
    ups = [k for k in trained_off if k.endswith("lora_up.weight")]
    assert any(not torch.equal(trained_on[k], trained_off[k]) for k in ups)

    copy = _method(tmp_path, output=str(tmp_path / "copy" / "a.safetensors"))
    copy.prepare(_bundle("sd1"))
    copy.load_trainable_state_dict(trained_on)  # the GGPO norms are left out
    saved_on = load_file(str(tmp_path / "on" / "a.safetensors"))
    from sdcore.train.method import SaveInfo

    info = SaveInfo(path=tmp_path / "copy" / "a.safetensors", step=3, epoch=1, metadata={}, final=True)
    saved_copy = load_file(str(copy.save(_bundle("sd1"), info)))
    assert saved_on.keys() == saved_copy.keys()
    assert all(torch.equal(saved_on[k], saved_copy[k]) for k in saved_on)


def test_resume_continues_exactly(tmp_path):
    """4 steps in one go == 2 steps, Ctrl-C, --resume: the saved norms give step 3 the same noise scale."""
    from sdcore.testing.contract import check_resume

    check_resume(LoraMethod, tmp_path, {"rank": 4, "ggpo_sigma": 3.0, "ggpo_beta": 1.0, "lr": 1e-2})


def test_kohya_toml_with_ggpo_on_flux_trains(tmp_path):
    import tomli_w
    from click.testing import CliRunner
    from sdcore.cli import build_cli
    from sdcore.plugins import get_plugin_manager
    from sdcore.testing.contract import make_tiny_dataset
    from sdplugin_lora.format import read_lora

    data = tmp_path / "data"
    make_tiny_dataset(data, n=2, size=64)
    out = tmp_path / "out" / "g.safetensors"
    cfg = tmp_path / "c.toml"
    config = {
        "pretrained_model_name_or_path": "tiny:flux",
        "train_data_dir": str(data),
        "output_dir": str(out.parent),
        "output_name": "g",
        "network_module": "networks.lora_flux",
        "network_args": ["ggpo_sigma=0.03", "ggpo_beta=0.01"],
        "network_dim": 2,
        "resolution": "64",
        "max_train_steps": 2,
        "learning_rate": 1e-3,
        "save_precision": "float",
    }
    cfg.write_text(tomli_w.dumps(config))
    args = ["train", "lora", "--config_file", str(cfg), "--no-progress"]
    result = CliRunner().invoke(build_cli(get_plugin_manager()), args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    lora = read_lora(out)
    args = json.loads(lora.metadata["ss_network_args"])  # kohya's network_args strings
    assert (args["ggpo_sigma"], args["ggpo_beta"]) == ("0.03", "0.01") and lora.modules
    assert not lora.unknown_keys


class _Spy(LoraMethod):
    """Records what the runtime's before_optimizer_step hook sees."""

    seen: list

    def before_optimizer_step(self, bundle, step):
        params = [p for p in self._require_network().parameters() if p.requires_grad]
        grads = [p.grad for p in params]
        total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        self.seen.append(("before", step, float(total), [p.detach().clone() for p in params]))
        super().before_optimizer_step(bundle, step)

    def on_step_end(self, bundle, step):
        params = [p for p in self._require_network().parameters() if p.requires_grad]
        self.seen.append(("end", step, None, [p.detach().clone() for p in params]))
        return super().on_step_end(bundle, step)


def test_the_hook_sees_clipped_gradients_before_the_step(tmp_path):
    from sdcore.testing.contract import _bundle
    from sdcore.train.loop import train

    options = contract_options(LoraMethod, tmp_path, {"rank": 4, "max_steps": 2, "gradient_accumulation": 2, "batch_size": 1,
                                                      "max_grad_norm": 1e-4, "lr": 1e-2})  # fmt: skip
    spy = _Spy(options)
    spy.seen = []
    train(spy, bundle=_bundle("sd1"))
    assert [(kind, step) for kind, step, *_ in spy.seen] == [("before", 1), ("end", 1), ("before", 2), ("end", 2)]
    for (_, _, norm, before), (_, _, _, after) in zip(spy.seen[::2], spy.seen[1::2], strict=True):
        assert norm == pytest.approx(1e-4, rel=1e-3)  # every gradient there, clipped to --max-grad-norm
        assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))  # the step came after


def test_kohya_ss_gui_switch_reaches_the_options():
    """The kohya_ss GUI's Flux1 tab: ``train_lora_ggpo`` writes ggpo_sigma/ggpo_beta into network_args."""
    from sdcore.train.kohya_gui import gui_preset

    gui = {"LoRA_type": "Flux1", "flux1_checkbox": True, "network_dim": 8, "network_alpha": 4, "learning_rate": 1e-4,
           "optimizer": "AdamW", "max_resolution": "512,512", "train_lora_ggpo": True, "ggpo_sigma": 0.03,
           "ggpo_beta": 0.01}  # fmt: skip
    items, _, problems = gui_preset(gui, "x")
    assert not problems and {"ggpo_sigma=0.03", "ggpo_beta=0.01"} <= set(items["network_args"])
    out = translate({k: items[k] for k in ("network_module", "network_args")}, FIELDS, where="x")
    assert not out.problems and float(out.values["ggpo_sigma"]) == SIGMA and float(out.values["ggpo_beta"]) == BETA
    items, _, _ = gui_preset({**gui, "train_lora_ggpo": False}, "x")
    assert not any("ggpo" in a for a in items.get("network_args", []))


@pytest.mark.parametrize("storage", ["nf4", "int8"])
def test_noise_on_a_packed_base_layer_does_not_dequantise_it_again(storage):
    """``--base-weights-dtype nf4|int8``: the layer's ``weight`` is dequantised on every read, so the noise
    takes its shape from the layer (kohya keeps ``org_module_shape``), not from ``layer.weight``: a GGPO
    training forward dequantises once, as one without GGPO does, and still adds ``x @ P.T``."""
    from unittest import mock

    from sdcore.train.base_weights import STORAGE_FORMATS, convert_base_weights

    torch.manual_seed(0)
    root = torch.nn.Sequential(torch.nn.Linear(32, 24)).requires_grad_(False)
    convert_base_weights(root, STORAGE_FORMATS[storage], torch.float32)
    layer = root[0]
    module = LoraAdapter("lin", layer, 4, 2.0)
    _randomise(module, 0)
    network = LoraNetwork([module]).attach()
    enable(network, SIGMA, BETA)
    network.train()
    x = torch.randn(3, 32)
    _backward(network, (layer,), (x,))
    update(network)
    kind = type(STORAGE_FORMATS[storage])
    reads = []
    original = kind.dequantise

    def counted(self, *args, **kwargs):
        reads.append(1)
        return original(self, *args, **kwargs)

    with torch.no_grad(), mock.patch.object(kind, "dequantise", counted):
        network.eval()
        clean = layer(x)
        assert len(reads) == 1
        network.train()
        torch.manual_seed(7)
        got = layer(x)
        assert len(reads) == 2  # the layer's own op only: no second dequantise for the noise's shape
    torch.manual_seed(7)
    noise = torch.randn(24, 32) * module.ggpo.factor
    torch.testing.assert_close(got, clean + x @ noise.T)


# --- kohya's per-step logs (train_network.py L1470-1476, generate_step_logs L82-86: norm/avg_key_norm,
# norm/avg_grad_norm, norm/avg_combined_norm; lora_flux.py LoRANetwork.weight_norms/grad_norms/combined_weight_norms)


def kohya_logs(modules):
    """kohya's three logged means, rewritten: per module ``weight_norms`` = rownorm(up @ down) (update_norms' ``mul``
    is not in place: no scale), ``combined_weight_norms`` = sqrt(w̄² + rowsum((up @ down)²)), ``grad_norms`` =
    rownorm(scale · (up @ down.grad + up.grad @ down)); each averaged over its rows (``mean(dim=0)``), the modules'
    values stacked and averaged. ``modules``: (base weight, up, down, up.grad, down.grad, scale) in float64."""
    key, grad, combined = [], [], []
    for weight, up, down, up_grad, down_grad, scale in modules:
        weight, up, down, up_grad, down_grad = (t.double().reshape(t.shape[0], -1) for t in (weight, up, down, up_grad, down_grad))  # fmt: skip
        estimate = torch.norm(weight, dim=1, keepdim=True).mean()
        module_weights = up @ down
        key.append(torch.norm(module_weights, dim=1, keepdim=True).mean(dim=0))
        combined.append(torch.sqrt(estimate**2 + torch.sum(module_weights**2, dim=1, keepdim=True)).mean(dim=0))
        grad.append(torch.norm(scale * (up @ down_grad + up_grad @ down), dim=1, keepdim=True).mean(dim=0))
    return {name: torch.stack(values).mean().item() for name, values in
            (("avg_key_norm", key), ("avg_grad_norm", grad), ("avg_combined_norm", combined))}  # fmt: skip


def _kohya_inputs(network, bases):
    return [(bases[m.lora_name], m.lora_up.weight, m.lora_down.weight, m.lora_up.weight.grad, m.lora_down.weight.grad,
             m.scale) for m in network]  # fmt: skip


def test_logged_norms_equal_kohyas_means():
    from sdplugin_lora.ggpo import log_values

    network, (linear, conv, q, k), inputs = _setup()
    enable(network, SIGMA, BETA)
    network.train()
    assert log_values(network) == {}  # before the first update kohya's norms are None: nothing logged
    _backward(network, (linear, conv, q), inputs)
    update(network)
    bases = {"lin": linear.weight, "pw": conv.weight, "qkv": torch.cat([q.weight, k.weight])}
    got, want = log_values(network), kohya_logs(_kohya_inputs(network, bases))
    assert got.keys() == want.keys()
    for name in want:
        assert got[name] == pytest.approx(want[name], rel=1e-5), name
    assert got["avg_combined_norm"] > got["avg_key_norm"] > 0 and got["avg_grad_norm"] > 0


class _LogSpy(LoraMethod):
    """Records the network's weights and final gradients before each optimizer step, and what on_step_end reports."""

    seen: list

    def before_optimizer_step(self, bundle, step):
        modules = [m for m in self._require_network() if m.ggpo is not None]
        bases = {m.lora_name: torch.cat([layer.weight for layer in getattr(m, "bases", None) or (m.base,)]).detach().clone()
                 for m in modules}  # fmt: skip
        captured = [(bases[m.lora_name], *(t.detach().clone() for t in (m.lora_up.weight, m.lora_down.weight,
                     m.lora_up.weight.grad, m.lora_down.weight.grad)), m.scale) for m in modules]  # fmt: skip
        self.seen.append(("before", step, captured))
        super().before_optimizer_step(bundle, step)

    def on_step_end(self, bundle, step):
        logs = super().on_step_end(bundle, step)
        self.seen.append(("end", step, logs))
        return logs


def test_a_tiny_run_logs_kohyas_three_norms_each_step(tmp_path, monkeypatch):
    """Each step reports the norms of that step's gradients and of the weights they were taken at (kohya updates
    them before optimizer.step() and logs after it); the trackers get them as train/<name>; off: nothing."""
    from sdcore.testing.contract import _bundle
    from sdcore.train.loop import train

    options = contract_options(LoraMethod, tmp_path, {"rank": 4, "max_steps": 2, "lr": 1e-2, "ggpo_sigma": 0.5,
                                                      "ggpo_beta": 2.0, "output": str(tmp_path / "g.safetensors")})  # fmt: skip
    spy = _LogSpy(options)
    spy.seen = []
    logged: list = []
    from sdcore.train.progress import Progress

    original = Progress.step

    def step(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        logged.append(out)
        return out

    monkeypatch.setattr(Progress, "step", step)
    train(spy, bundle=_bundle("sd1"))
    assert [(kind, s) for kind, s, _ in spy.seen] == [("before", 1), ("end", 1), ("before", 2), ("end", 2)]
    for (_, _, captured), (_, _, logs) in zip(spy.seen[::2], spy.seen[1::2], strict=True):
        want = kohya_logs(captured)
        assert logs.keys() == want.keys()
        for name in want:
            assert logs[name] == pytest.approx(want[name], rel=1e-4), name
    assert [{k: v for k, v in log.items() if k.startswith("avg_")} for log in logged] == [s[2] for s in spy.seen[1::2]]
    off = LoraMethod(contract_options(LoraMethod, tmp_path, {"rank": 4}))
    off.prepare(_bundle("sd1"))
    assert off.on_step_end(_bundle("sd1"), 1) is None
