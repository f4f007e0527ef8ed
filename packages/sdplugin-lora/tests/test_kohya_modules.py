"""kohya's other network modules: networks.lora_fa and networks.dylora trained here, networks.oft's
network_args, and the modules / LyCORIS algos sdcore refuses by name (sdcore.train.kohya).

Formulas rewritten from kohya sd-scripts 48d368f:

* lora_fa: ``lora_down ~ N(0, 2 / (in + r))`` and frozen, ``lora_up = 0`` trains;
  ``y = W x + m · (alpha/r) · up(down(x))``; the file holds ``lora_down.weight``, ``lora_up.weight``, ``alpha``.
* dylora: ``b = randint(0, r - 1)`` rounded down to a multiple of ``unit``; the forward uses the whole
  ``up``/``down``: ``y = W x + (alpha/r) · sqrt(r / (b + unit)) · up(down(x))``; only rows/columns
  ``b .. b+unit-1`` require grad; the file is a plain LoRA.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from lora_testutil import fresh_bundle
from sdcore.errors import ConfigError
from sdcore.testing.contract import contract_options
from sdcore.train.kohya import KOHYA_OTHER_MODULES, LYCORIS_OTHER_ALGOS, translate
from sdplugin_lora.adapters import DyLoraAdapter
from sdplugin_lora.apply import apply_lora
from sdplugin_lora.format import read_lora
from sdplugin_lora.method import LoraMethod, LoraOptions
from sdplugin_lora.naming import ModuleIndex
from torch import nn

FIELDS = list(LoraOptions.__dataclass_fields__)


class _Capture(LoraMethod):
    """Keeps the network's state right after ``prepare`` (the init)."""

    def prepare(self, bundle):
        groups = super().prepare(bundle)
        self.init = {k: v.detach().clone() for k, v in self.network.state_dict().items()}
        self.groups = groups
        return groups


def _train(tmp_path, **overrides):
    from sdcore.train.loop import train

    options = contract_options(
        LoraMethod, tmp_path, {"max_steps": 3, "rank": 4, "train_text_encoder": True, "save_dtype": "fp32", **overrides}
    )
    method = _Capture(options)
    result = train(method, bundle=fresh_bundle("sd1"))
    method.output = result.output
    return method, read_lora(result.output)


def _kohya_merge(bundle, lora, multiplier=1.0):
    """kohya's LoRAInfModule.merge_to: ``W + m · (up @ down) · alpha/r`` (1x1/kxk convs flattened)."""
    index = ModuleIndex.from_bundle(bundle)
    merged = {}
    for name, weights in lora.modules.items():
        t = weights.tensors
        w = index.resolve(name).module.weight.detach().float()
        up, down = t["lora_up.weight"].float(), t["lora_down.weight"].float()
        scale = float(t["alpha"]) / down.shape[0]
        delta = (up.flatten(1) @ down.flatten(1)).reshape(w.shape)  # a kxk down with a 1x1 up composes so
        merged[name] = w + multiplier * delta * scale
    return merged


def _check_applies_like_kohya(lora, path):
    """sdcore's loader (the ``generate`` path) merges the file as kohya's own loader does."""
    expected = _kohya_merge(fresh_bundle("sd1"), lora)
    bundle = fresh_bundle("sd1")
    apply_lora(bundle, path, 1.0, merge=True, strict=True)
    index = ModuleIndex.from_bundle(bundle)
    assert len(expected) == len(lora.modules) > 0
    for name, want in expected.items():
        torch.testing.assert_close(index.resolve(name).module.weight.detach().float(), want, atol=1e-5, rtol=1e-5)


# --- LoRA-FA ---------------------------------------------------------------------------------------------


def test_lora_fa_trains_only_lora_up_and_writes_kohyas_file(tmp_path):
    method, lora = _train(tmp_path, algo="lora_fa", alpha=2.0)
    assert lora.metadata["ss_network_module"] == "networks.lora_fa"
    assert any(name.startswith("lora_te_") for name in lora.modules)
    optimized = {id(p) for group in method.groups for p in group["params"]}
    changed_up = 0
    for name, weights in lora.modules.items():
        assert set(weights.tensors) == {"lora_down.weight", "lora_up.weight", "alpha"}
        assert torch.equal(weights.tensors["lora_down.weight"], method.init[f"{name}.lora_down.weight"])
        assert float(weights.tensors["alpha"]) == 2.0
        changed_up += int(weights.tensors["lora_up.weight"].abs().sum() > 0)
        module = method.network.loras[name]
        assert id(module.lora_up.weight) in optimized and id(module.lora_down.weight) not in optimized
    assert changed_up == len(lora.modules)
    _check_applies_like_kohya(lora, method.output)


def test_lora_fa_init_is_the_papers_normal():
    """kohya draws lora_down from N(0, 2/(in + r)) (``in``: input channels), lora_up = 0."""
    method = LoraMethod(LoraOptions(rank=4, algo="lora_fa", train_text_encoder=True, conv_rank=4))
    method.prepare(fresh_bundle("sd1"))
    z = []
    for module in method.network:
        base = module.base
        fan = base.in_channels if isinstance(base, nn.Conv2d) else base.in_features
        z.append((module.lora_down.weight / math.sqrt(2.0 / (fan + module.rank))).flatten())
        assert not module.lora_down.weight.requires_grad and module.lora_up.weight.requires_grad
        assert torch.count_nonzero(module.lora_up.weight) == 0
    z = torch.cat(z)
    assert z.numel() > 5000
    assert abs(float(z.std()) - 1.0) < 0.05  # kaiming-uniform would give about 0.4 here
    assert abs(float(z.mean())) < 0.05


@pytest.mark.parametrize("kind", ["linear", "conv3x3"])
def test_lora_fa_init_is_kohyas_draw_for_draw(kind):
    """kohya lora_fa.py LoRAModule.__init__ (48d368f, lines 59-81): the down and up layers are built (each
    constructor draws its kaiming-uniform weight), then ``normal_(lora_down, std=sqrt(2/(in + r)))`` and
    ``zeros_(lora_up)``; no other draw in between, so the same torch seed gives the same down."""
    from sdplugin_lora.adapters import LoraFaAdapter

    base = nn.Linear(12, 10) if kind == "linear" else nn.Conv2d(6, 8, 3, padding=1)
    torch.manual_seed(7)
    adapter = LoraFaAdapter("lora_unet_x", base, 3, 1.0)
    torch.manual_seed(7)
    if kind == "linear":
        down, up = nn.Linear(12, 3, bias=False), nn.Linear(3, 10, bias=False)
    else:
        down, up = nn.Conv2d(6, 3, 3, 1, 1, bias=False), nn.Conv2d(3, 8, 1, 1, bias=False)
    in_dim = 12 if kind == "linear" else 6
    nn.init.normal_(down.weight, std=math.sqrt(2.0 / (in_dim + 3)))
    nn.init.zeros_(up.weight)
    torch.testing.assert_close(adapter.lora_down.weight.detach(), down.weight.detach(), rtol=0, atol=0)
    assert torch.count_nonzero(adapter.lora_up.weight) == 0


def test_lora_fa_forward_is_kohyas():
    torch.manual_seed(0)
    base = nn.Linear(12, 10)
    from sdplugin_lora.adapters import LoraFaAdapter

    adapter = LoraFaAdapter("lora_unet_x", base, 3, 1.5, multiplier=0.7)
    with torch.no_grad():
        adapter.lora_up.weight.normal_()
    adapter.attach()
    x = torch.randn(2, 12)
    want = nn.functional.linear(x, base.weight, base.bias) + 0.7 * (1.5 / 3) * (
        x @ adapter.lora_down.weight.T @ adapter.lora_up.weight.T
    )
    torch.testing.assert_close(base(x), want)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"loraplus_lr_ratio": 16.0}, "networks.lora_fa has no LoRA+"),
        ({"use_tucker": True}, "has no Tucker core"),
    ],
)
def test_lora_fa_refuses_what_kohyas_module_lacks(overrides, message):
    with pytest.raises(ConfigError, match=message):
        LoraMethod(LoraOptions(algo="lora_fa", **overrides)).validate()


# --- DyLoRA ----------------------------------------------------------------------------------------------


def _dylora(base, rank=4, unit=2, alpha=3.0, seed=0):
    torch.manual_seed(seed)
    adapter = DyLoraAdapter("lora_unet_x", base, rank, alpha, unit=unit)
    with torch.no_grad():
        for p in adapter.lora_B:
            p.normal_()
    return adapter


def _kohya_dylora(x, adapter, b, *, conv=None):
    """kohya DyLoRAModule.forward for a fixed trainable_rank ``b`` (the increment only)."""
    r, unit = adapter.rank, adapter.unit
    a = torch.cat([p.detach() for p in adapter.lora_A], dim=0)
    bb = torch.cat([p.detach() for p in adapter.lora_B], dim=1)
    if conv is not None and conv.kernel_size == (3, 3):
        ab = nn.functional.conv2d(x, a, stride=conv.stride, padding=conv.padding)
        ab = nn.functional.conv2d(ab, bb[:, :, None, None])
    elif conv is not None:
        ab = x.reshape(x.size(0), x.size(1), -1).transpose(1, 2)
        ab = nn.functional.linear(nn.functional.linear(ab, a), bb)
        ab = ab.transpose(1, 2).reshape(ab.size(0), -1, *x.size()[2:])
    else:
        ab = nn.functional.linear(nn.functional.linear(x, a), bb)
    return ab * (float(adapter.alpha) / r) * math.sqrt(r / (b + unit))


@pytest.mark.parametrize("kind", ["linear", "conv1x1", "conv3x3"])
@pytest.mark.parametrize("b", [0, 2, 4])
def test_dylora_forward_and_gradients_are_kohyas(kind, b):
    if kind == "linear":
        base, x = nn.Linear(8, 6), torch.randn(2, 5, 8)
    else:
        k = 3 if kind == "conv3x3" else 1
        base, x = nn.Conv2d(8, 6, k, padding=k // 2), torch.randn(2, 8, 5, 5)
    adapter = _dylora(base, rank=6, unit=2)
    adapter.train()
    out = adapter.delta(x, b)
    want = _kohya_dylora(x, adapter, b, conv=base if kind != "linear" else None)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    out.square().sum().backward()
    for i in range(adapter.rank):
        trained = b <= i < b + adapter.unit
        for params in (adapter.lora_A, adapter.lora_B):
            assert (params[i].grad is not None) == trained, (i, b)
            if trained:
                assert params[i].grad.abs().sum() > 0


def test_dylora_optimizer_leaves_the_other_rows_alone():
    """kohya's rows are parameters of their own: rows a step does not train get no AdamW update at all
    (no momentum, no weight decay), even after they trained in an earlier step."""
    adapter = _dylora(nn.Linear(8, 6), rank=4, unit=1)
    adapter.train()
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=0.1, weight_decay=0.5)
    x = torch.randn(3, 8)
    for b in (0, 1, 0):
        before = [p.detach().clone() for p in (*adapter.lora_A, *adapter.lora_B)]
        optimizer.zero_grad(set_to_none=True)
        adapter.delta(x, b).sum().backward()
        optimizer.step()
        after = [p.detach() for p in (*adapter.lora_A, *adapter.lora_B)]
        for i, (old, new) in enumerate(zip(before, after, strict=True)):
            row = i % adapter.rank
            assert torch.equal(old, new) == (row != b), (b, i)


def test_dylora_draws_every_unit_slice_and_is_plain_lora_out_of_training():
    adapter = _dylora(nn.Linear(8, 6), rank=8, unit=2)
    torch.manual_seed(1)
    draws = {adapter.draw() for _ in range(200)}
    assert draws == {0, 2, 4, 6}
    adapter.eval()
    x = torch.randn(2, 8)
    t = adapter.tensors()
    plain = x @ t["lora_down.weight"].T @ t["lora_up.weight"].T * (3.0 / 8)
    torch.testing.assert_close(adapter.delta(x), plain)  # eval: the saved file's LoRA, factor 1
    adapter.train()
    torch.testing.assert_close(adapter.delta(x, 6), plain)  # kohya's factor is 1 for the last slice


def test_dylora_state_dict_is_kohyas_file_layout_and_loads_back():
    a = _dylora(nn.Conv2d(8, 6, 1), rank=4, unit=2, seed=0)
    b = _dylora(nn.Conv2d(8, 6, 1), rank=4, unit=2, seed=1)
    state = a.state_dict()
    assert set(state) == {"alpha", "lora_down.weight", "lora_up.weight"}
    assert state["lora_down.weight"].shape == (4, 8, 1, 1) and state["lora_up.weight"].shape == (6, 4, 1, 1)
    b.load_state_dict(state)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)


def test_dylora_trains_and_saves_a_plain_lora_kohya_reads(tmp_path):
    method, lora = _train(tmp_path, algo="dylora", dylora_unit=2, conv_rank=4, alpha=2.0)
    assert lora.metadata["ss_network_module"] == "networks.dylora"
    args = json.loads(lora.metadata["ss_network_args"])
    assert args["unit"] == "2" and args["conv_dim"] == "4"
    assert any(w.tensors["lora_down.weight"].shape[2:] == (3, 3) for w in lora.modules.values())
    changed = 0
    for name, weights in lora.modules.items():
        assert set(weights.tensors) == {"lora_down.weight", "lora_up.weight", "alpha"}
        assert weights.tensors["lora_down.weight"].shape[0] == 4 and float(weights.tensors["alpha"]) == 2.0
        changed += int(not torch.equal(weights.tensors["lora_down.weight"], method.init[f"{name}.lora_down.weight"]))
    assert changed > 0
    _check_applies_like_kohya(lora, method.output)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"rank": 6, "dylora_unit": 4}, "must be a positive multiple"),
        ({"rank": 4, "conv_rank": 8}, "requires conv_dim = network_dim"),
        ({"rank_dropout": 0.1}, "networks.dylora has no dropout"),
        ({"scale_weight_norms": 1.0}, "networks.dylora has no max-norm"),
        ({"block_dims": ",".join(["4"] * 25)}, "no block-wise"),
    ],
)
def test_dylora_refuses_what_kohyas_module_lacks(overrides, message):
    with pytest.raises(ConfigError, match=message):
        LoraMethod(LoraOptions(algo="dylora", **overrides)).validate()


def test_dylora_unit_needs_dylora():
    with pytest.raises(ConfigError, match="--dylora-unit is for --algo dylora"):
        LoraMethod(LoraOptions(algo="lora", dylora_unit=2)).validate()


# --- OFT's network_args ------------------------------------------------------------------------------------


def test_oft_without_enable_all_linear_adapts_the_attention_only(tmp_path):
    names = {}
    for all_linear in (True, False):
        method = LoraMethod(LoraOptions(rank=4, algo="oft", oft_all_linear=all_linear))
        method.validate()
        method.prepare(fresh_bundle("sd1"))
        names[all_linear] = set(method.network.loras)
    assert names[False] < names[True]
    assert all("_attn1_" in n or "_attn2_" in n for n in names[False])
    assert any("_ff_" in n for n in names[True])
    # kohya's CrossAttention Linears: to_q, to_k, to_v, to_out.0
    assert {n.rsplit("_attn", 1)[1][2:] for n in names[False]} == {"to_q", "to_k", "to_v", "to_out_0"}


# --- the kohya config translation ----------------------------------------------------------------------------


def _translate(module, *args, **items):
    return translate({"network_module": module, "network_args": list(args), **items}, FIELDS, where="c.toml")


def test_kohya_modules_translate_to_the_lora_options():
    out = _translate("networks.lora_fa", "conv_dim=4")
    assert not out.problems and out.values["algo"] == "lora_fa" and out.values["conv_rank"] == "4"
    out = _translate("networks.dylora", "unit=4", "conv_dim=8", "conv_alpha=1")
    assert not out.problems
    assert (out.values["algo"], out.values["dylora_unit"], out.values["conv_rank"]) == ("dylora", "4", "8")
    assert "conv_alpha" not in out.values and any("conv_alpha" in n for n in out.notes)
    out = _translate("networks.oft")
    assert not out.problems
    assert (out.values["algo"], out.values["oft_all_linear"], out.values["unet_only"]) == ("oft", False, True)
    out = _translate("networks.oft", "enable_all_linear=False")
    assert out.values["oft_all_linear"] is True and any("any non-empty value" in n for n in out.notes)
    out = _translate("networks.oft", "enable_conv=True")
    assert any("enable_conv" in p and "no conv modules" in p for p in out.problems)


@pytest.mark.parametrize(
    ("module", "args", "expected"),
    [
        ("networks.lora_fa", [], {"algo": "lora_fa", "rank": 8}),
        ("networks.dylora", ["unit=4", "conv_dim=8"], {"algo": "dylora", "dylora_unit": 4, "conv_rank": 8}),
        ("networks.oft", [], {"algo": "oft", "oft_all_linear": False, "unet_only": True, "alpha": 1.0}),
        ("networks.oft", ["enable_all_linear=True"], {"algo": "oft", "oft_all_linear": True}),
    ],
)
def test_kohya_config_with_these_modules_loads_and_validates(tmp_path, module, args, expected):
    import tomli_w
    from sdcore.train.config import load_options

    cfg = tmp_path / "c.toml"
    cfg.write_text(tomli_w.dumps({"network_module": module, "network_args": args, "network_dim": 8}))
    options = load_options(LoraOptions, cfg, notes=[])
    assert {key: getattr(options, key) for key in expected} == expected
    LoraMethod(options).validate()


@pytest.mark.parametrize("module", sorted(m for m, (values, _) in KOHYA_OTHER_MODULES.items() if values is None))
def test_other_kohya_modules_are_refused_by_name_with_a_reason(module):
    out = _translate(module)
    assert len(out.problems) == 1
    assert f"network_module {module!r} is not supported by sdcore: {KOHYA_OTHER_MODULES[module][1]}" in out.problems[0]


def test_oft_flux_translates_like_networks_oft():
    """kohya's oft_flux.py: attention only unless enable_all_linear (bool of the string); enable_conv unread."""
    out = _translate("networks.oft_flux")
    assert not out.problems
    assert (out.values["algo"], out.values["oft_all_linear"], out.values["unet_only"]) == ("oft", False, True)
    out = _translate("networks.oft_flux", "enable_all_linear=True", "enable_conv=True")
    assert not out.problems and out.values["oft_all_linear"] is True
    assert any("enable_conv" in n and "ignores" in n for n in out.notes)


@pytest.mark.parametrize("algo", sorted(LYCORIS_OTHER_ALGOS))
def test_lycoris_algos_sdcore_lacks_are_refused_with_what_they_are(algo):
    (problem,) = _translate("lycoris.kohya", f"algo={algo}").problems
    assert f"LyCORIS algo={algo!r} is not supported by sdcore: " in problem
    assert LYCORIS_OTHER_ALGOS[algo] in problem


def test_lycoris_dylora_and_oft_point_at_kohyas_modules():
    assert "networks.dylora" in LYCORIS_OTHER_ALGOS["dylora"]
    assert "networks.oft" in LYCORIS_OTHER_ALGOS["oft"] and "diag-oft" not in LYCORIS_OTHER_ALGOS  # trained now
    problem = _translate("lycoris.kohya", "algo=somethingelse").problems[0]
    assert problem.endswith("(lora/locon, loha, lokr, diag-oft, boft, ia3, glora, full)")


def test_algo_network_arg_with_a_kohya_module_is_refused():
    (problem,) = _translate("networks.dylora", "algo=loha").problems
    assert "algo= needs network_module = lycoris.kohya" in problem


@pytest.mark.parametrize("seed", range(4))
def test_dylora_draw_replays_under_gradient_checkpointing(seed):
    """b comes from torch's generator, which checkpointing restores for the recompute: the gradients
    are those of the forward that ran (a different draw in the recompute would give other ones)."""
    from torch.utils.checkpoint import checkpoint

    grads = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        base = nn.Linear(8, 6)
        adapter = _dylora(base, rank=8, unit=1, seed=3)
        adapter.train()
        adapter.attach()
        x = torch.linspace(-1, 1, 16).reshape(2, 8)
        torch.manual_seed(seed)
        for _ in range(3):  # three draws per run
            out = checkpoint(base, x, use_reentrant=False) if checkpointed else base(x)
            out.square().sum().backward()
        grads.append([None if p.grad is None else p.grad.clone() for p in adapter.parameters()])
    assert sum(g is not None for g in grads[0]) >= 2  # at least one row of down and one column of up
    for a, b in zip(*grads, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b)


def test_dylora_resumable_state_restores_every_row(tmp_path):
    first = LoraMethod(LoraOptions(rank=4, algo="dylora", dylora_unit=2))
    first.prepare(fresh_bundle("sd1"))
    with torch.no_grad():
        for module in first.network:
            for p in module.lora_B:
                p.normal_()
    second = LoraMethod(LoraOptions(rank=4, algo="dylora", dylora_unit=2))
    second.prepare(fresh_bundle("sd1"))
    second.load_trainable_state_dict(first.trainable_state_dict())
    for a, b in zip(first.network, second.network, strict=True):
        for p, q in zip(a.parameters(), b.parameters(), strict=True):
            assert torch.equal(p, q)


@pytest.mark.parametrize(
    ("args", "tucker"),
    [
        (["use_cp=True"], True),  # the kohya_ss GUI's LoKr writes use_cp
        (["use_conv_cp=True"], True),
        (["use_tucker=False", "use_cp=True"], True),  # LyCORIS reads use_cp before use_tucker, whatever the order
        (["use_cp=False", "use_tucker=True"], False),  # ... and a given "False" ends its `or` chain
        (["use_tucker=True"], True),
    ],
)
def test_lycoris_older_tucker_names_are_read_as_lycoris_reads_them(args, tucker):
    from dataclasses import fields

    present = [f.name for f in fields(LoraOptions)]
    items = {"network_module": "lycoris.kohya", "network_args": ["algo=lokr", *args], "network_dim": 8}
    out = translate(items, present, where="cfg")
    assert not out.problems, out.problems
    assert str(out.values["use_tucker"]).lower() == str(tucker).lower()
