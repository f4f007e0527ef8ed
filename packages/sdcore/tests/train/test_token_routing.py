"""--tread-route (TREAD token routing): the router, the routed FLUX.1 and SD3 blocks, their composition with
gradient checkpointing and block swap, the options, SimpleTuner's tread_config and the refusals."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest
import torch
from sdcore.errors import ConfigError
from sdcore.models.flux import FLUX
from sdcore.models.sd3 import SD3
from sdcore.train.block_swap import BLOCK_LISTS, BlockSwap
from sdcore.train.token_routing import (
    Route,
    TokenRouter,
    TokenRouting,
    end_route,
    kept_tokens,
    model_problems,
    option_problems,
    parse_route,
    resolve_routes,
    start_route,
)
from test_block_swap import Lora, flux_inputs, sd3_inputs, step, tiny_flux, tiny_sd3

FAMILIES = {"flux": (tiny_flux, flux_inputs, FLUX), "sd3": (tiny_sd3, sd3_inputs, SD3)}


def _route(model, family, ratio=0.5, start=1, end=-1, seed=3) -> TokenRouting:
    return TokenRouting(model, [Route(ratio, start, end)], family.token_routing, BLOCK_LISTS, TokenRouter(seed))


# ---------------------------------------------------------------------------------------------------------------
# the router


@pytest.mark.parametrize(("tokens", "ratio", "kept"), [(16, 0.5, 8), (10, 0.25, 8), (7, 0.0, 7), (9, 0.7, 3)])
def test_a_route_keeps_s_minus_round_s_times_ratio_tokens_each_once_in_order(tokens, ratio, kept):
    selection = TokenRouter(0).select(3, tokens, ratio)
    assert kept_tokens(tokens, ratio) == kept and selection.keep.shape == (3, kept)
    for row in selection.keep:
        assert torch.equal(row, torch.sort(row).values) and len(set(row.tolist())) == kept
        assert int(row.min()) >= 0 and int(row.max()) < tokens


def test_start_then_end_with_identity_blocks_gives_back_x_bit_for_bit():
    x = torch.randn(2, 12, 5)
    for shared in (False, True):
        selection = TokenRouter(1).select(2, 12, 0.5, shared=shared)
        routed = start_route(x, selection)
        assert routed.shape == (2, 6, 5)
        assert torch.equal(routed[1], x[1, selection.keep[-1]])
        assert torch.equal(end_route(routed, selection, x), x)
        # processed kept tokens land at their places, the others keep the start values
        back = end_route(routed + 1.0, selection, x)
        kept = torch.zeros(2, 12, dtype=torch.bool).scatter(1, selection.keep.expand(2, -1), True)
        assert torch.equal(back[kept], x[kept] + 1.0) and torch.equal(back[~kept], x[~kept])


def test_the_same_seed_draws_the_same_tokens_and_another_seed_others():
    a, b, c = (TokenRouter(s).select(4, 64, 0.5).keep for s in (7, 7, 8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    router = TokenRouter(7)
    router.reseed(42, 10, 0)
    first = router.select(4, 64, 0.5).keep
    router.select(4, 64, 0.5)
    router.reseed(42, 10, 0)  # a resumed run at step 10 draws what the uninterrupted one drew
    assert torch.equal(router.select(4, 64, 0.5).keep, first)


def test_ratio_zero_keeps_every_token_in_order():
    selection = TokenRouter(0).select(2, 9, 0.0)
    assert torch.equal(selection.keep, torch.arange(9).expand(2, 9))


# ---------------------------------------------------------------------------------------------------------------
# routed denoisers


@pytest.mark.parametrize("name", FAMILIES)
def test_a_route_changes_the_training_forward_only(name):
    make, inputs, family = FAMILIES[name]
    model = make()
    lora = Lora(model)
    plain_loss, plain_grads = step(model, inputs(), lora)
    with torch.no_grad():
        plain_out = model(**inputs())[0]
    routing = _route(model, family)
    routed_loss, routed_grads = step(model, inputs(), lora)
    assert abs(float(routed_loss - plain_loss)) > 1e-6
    assert all(float(g.abs().sum()) > 0 for g in routed_grads[:-1])  # every LoRA factor gets a gradient
    with torch.no_grad():  # generation, samples, validation: the whole model
        assert torch.equal(model(**inputs())[0], plain_out)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(**inputs())[0], plain_out)
    model.train()
    routing.enabled = False
    assert torch.equal(step(model, inputs(), lora)[0], plain_loss)
    routing.remove()
    zero = _route(model, family, ratio=0.0, start=0, end=-1)  # every token through every block
    zero_loss, zero_grads = step(model, inputs(), lora)
    assert torch.equal(zero_loss, plain_loss)
    assert all(torch.equal(a, b) for a, b in zip(zero_grads, plain_grads, strict=True))
    zero.remove()


@pytest.mark.parametrize("name", FAMILIES)
def test_skipped_tokens_leave_the_route_as_they_entered_it(name):
    make, inputs, family = FAMILIES[name]
    model = make()
    routing = _route(model, family, ratio=0.5, start=1, end=2)
    blocks = list(model.transformer_blocks) + list(getattr(model, "single_transformer_blocks", []))
    seen: dict[str, torch.Tensor] = {}

    def at_start(module, args, kwargs):  # the block's input as the diffusers loop passes it: the whole sequence
        seen["start"] = (args[0] if args else kwargs["hidden_states"]).detach()

    def at_end(module, args, output):
        seen["end"] = output[1].detach()

    pre = blocks[1].register_forward_pre_hook(at_start, with_kwargs=True)
    post = blocks[2].register_forward_hook(at_end)
    selections = []
    select = routing.router.select
    routing.router.select = lambda *a, **k: selections.append(select(*a, **k)) or selections[-1]  # type: ignore[method-assign]
    x = inputs()
    step(model, x, Lora(model))
    pre.remove()
    post.remove()
    (selection,) = selections
    start, end = seen["start"], seen["end"]
    assert start.shape == end.shape  # the whole sequence again after the route's last block
    kept = torch.zeros(start.shape[:2], dtype=torch.bool).scatter(1, selection.keep.expand(start.shape[0], -1), True)
    assert int(kept[0].sum()) == kept_tokens(start.shape[1], 0.5)
    assert torch.equal(end[~kept], start[~kept])  # skipped: the values at the route's start
    assert not torch.equal(end[kept], start[kept])  # kept: processed by blocks 1 and 2


@pytest.mark.parametrize("name", FAMILIES)
def test_routing_composes_with_gradient_checkpointing_and_block_swap(name):
    make, inputs, family = FAMILIES[name]
    model = make()
    lora = Lora(model)
    routing = _route(model, family, ratio=0.5, start=1, end=-2)
    reference = step(model, inputs(), lora)
    runs = {}
    routing.router = TokenRouter(3)
    model.enable_gradient_checkpointing()  # the routed blocks are recomputed in backward: the same draw
    runs["checkpointing"] = step(model, inputs(), lora)
    model.disable_gradient_checkpointing()
    routing.router = TokenRouter(3)
    swap = BlockSwap(model, 2, "cpu")  # installed after the routing, as the runtime does: it wraps the routed blocks
    runs["swap"] = step(model, inputs(), lora)
    routing.router = TokenRouter(3)
    model.enable_gradient_checkpointing()
    runs["swap+checkpointing"] = step(model, inputs(), lora)
    swap.remove()
    from sdcore.train.offload_checkpointing import ActivationOffload

    routing.router = TokenRouter(3)
    offload = ActivationOffload("cpu")
    offload.always_copy = True  # --cpu-offload-checkpointing: the tokens the recompute gets are other tensors
    model.enable_gradient_checkpointing(gradient_checkpointing_func=offload)
    runs["offload checkpointing"] = step(model, inputs(), lora)
    for label, (loss, grads) in runs.items():
        assert torch.equal(loss, reference[0]), label
        assert all(torch.equal(a, b) for a, b in zip(grads, reference[1], strict=True)), label


def test_two_forwards_before_one_backward_keep_their_own_draws_under_checkpointing():
    """APT's two passes: each recompute uses the selection of the forward it belongs to."""
    model = tiny_flux()
    lora = Lora(model)
    routing = _route(model, FLUX)

    def two_pass(checkpointing: bool):
        routing.router = TokenRouter(5)
        (model.enable_gradient_checkpointing if checkpointing else model.disable_gradient_checkpointing)()
        outs = [model(**inputs)[0] for inputs in (flux_inputs(), flux_inputs())]
        loss = (outs[0] - 0.5).square().mean() + (outs[1] + 0.5).square().mean()
        return loss.detach(), torch.autograd.grad(loss, lora.params)

    plain, checkpointed = two_pass(False), two_pass(True)
    assert torch.equal(plain[0], checkpointed[0])
    assert all(torch.equal(a, b) for a, b in zip(plain[1], checkpointed[1], strict=True))


def test_flux_t5_padding_mask_is_routed_with_the_tokens():
    from sdcore.models.flux.adapter import joint_attention_mask

    model = tiny_flux()
    lora = Lora(model)
    x = flux_inputs()
    text_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    x["joint_attention_kwargs"] = joint_attention_mask(text_mask, x["hidden_states"].shape[1], "cpu")
    _route(model, FLUX)
    loss, grads = step(model, x, lora)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)


# ---------------------------------------------------------------------------------------------------------------
# options and refusals


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0.5:2", "write RATIO:START:END"),
        ("half:1:2", "write RATIO:START:END"),
        ("0.5:1.5:3", "write RATIO:START:END"),
        ("1.0:1:2", "must be in [0, 1), got 1"),
        ("-0.1:1:2", "must be in [0, 1)"),
    ],
)
def test_malformed_routes_are_one_line_each(text, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_route(text)
    problems = option_problems(SimpleNamespace(tread_route=(text, "0.5:1:3"), masked_loss=False))
    assert len(problems) == 1 and text in problems[0]


def test_routes_resolve_against_the_block_count():
    resolved, problems = resolve_routes([Route(0.5, 2, -2), Route(0.3, -1, -1)], 10)
    assert resolved == [Route(0.5, 2, 8), Route(0.3, 9, 9)] and not problems
    _, problems = resolve_routes([Route(0.5, 0, 10)], 10)
    assert problems == [
        "--tread-route 0.5:0:10: the denoiser has 10 transformer blocks (indexes 0 to 9, or -10 to -1 from the end)"
    ]
    _, problems = resolve_routes([Route(0.5, -11, 3)], 10)
    assert "has 10 transformer blocks" in problems[0]
    _, problems = resolve_routes([Route(0.5, 5, 3)], 10)
    assert problems == ["--tread-route 0.5:5:3: its start block 5 comes after its end block 3"]
    _, problems = resolve_routes([Route(0.5, 2, 5), Route(0.5, 4, 7)], 10)
    assert "must not overlap" in problems[0] and "the route before it ends at block 5" in problems[0]
    _, problems = resolve_routes([Route(0.5, 6, 7), Route(0.5, 1, 2)], 10)
    assert "forward order" in problems[0]
    with pytest.raises(ConfigError, match="has 5 transformer blocks"):
        TokenRouting(tiny_flux(), [Route(0.5, 1, 5)], FLUX.token_routing, BLOCK_LISTS)


def test_the_preflight_checks_the_family_and_the_model_block_count():
    from sdcore.models.chroma import CHROMA
    from sdcore.models.family import SD1

    options = SimpleNamespace(tread_route=("0.5:1:-1",), masked_loss=False)
    for family in (SD1, CHROMA):
        (problem,) = model_problems(options, SimpleNamespace(family=family.name, configs={}))
        assert problem.startswith("--tread-route: TREAD token routing needs a transformer family")
        assert family.label in problem
    flux = SimpleNamespace(family="flux", configs={"transformer": {"num_layers": 2, "num_single_layers": 3}})
    assert model_problems(options, flux) == []
    (problem,) = model_problems(SimpleNamespace(tread_route=("0.5:1:6",)), flux)
    assert "the FLUX.1 transformer has 5 transformer blocks" in problem
    sd3 = SimpleNamespace(family="sd3", configs={"transformer": {"num_layers": 3}})
    assert "has 3 transformer blocks" in model_problems(SimpleNamespace(tread_route=("0.5:-4:-1",)), sd3)[0]
    masked = option_problems(SimpleNamespace(tread_route=("0.5:1:-1",), masked_loss=True))
    assert masked and "--tread-route with --masked-loss" in masked[0]


def test_tread_route_is_repeatable_and_a_config_list(tmp_path):
    from sdcore.train.config import load_options
    from sdplugin_lora.method import LoraOptions

    config = tmp_path / "run.toml"
    config.write_text('tread_route = ["0.5:2:-2", "0.7:-4:-1"]\n', encoding="utf-8")
    assert load_options(LoraOptions, config).tread_route == ("0.5:2:-2", "0.7:-4:-1")
    config.write_text('tread_route = "0.5:2:-2"\n', encoding="utf-8")
    assert load_options(LoraOptions, config).tread_route == ("0.5:2:-2",)
    config.write_text("tread_route = 3\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="tread_route must be a string or a list of strings"):
        load_options(LoraOptions, config)


def _data(tmp_path):
    from sdcore.testing.datasets import make_tiny_dataset

    return make_tiny_dataset(tmp_path / "data", n=2, size=64)


def test_a_tiny_flux_lora_trains_with_a_route_through_the_cli(tmp_path, monkeypatch):
    from click.testing import CliRunner
    from safetensors.torch import load_file
    from sdcore.cli import build_cli
    from sdcore.plugins import get_plugin_manager

    draws = []
    select = TokenRouter.select
    monkeypatch.setattr(TokenRouter, "select", lambda self, *a, **k: draws.append(a) or select(self, *a, **k))
    out = tmp_path / "o.safetensors"
    args = ["train", "lora", "--model", "tiny:flux", "--data", str(_data(tmp_path)), "--output", str(out),
            "--resolution", "64", "--max-steps", "2", "--lr", "1e-2", "--no-progress",
            "--tread-route", "0.25:0:0", "--tread-route", "0.5:1:-1"]  # fmt: skip
    cli = build_cli(get_plugin_manager())
    bad = CliRunner().invoke(cli, [*args[:-4], "--tread-route", "0.5:0:1", "--tread-route", "0.5:1:2"])
    assert bad.exit_code == 2 and "must not overlap" in bad.output, bad.output
    run = CliRunner().invoke(cli, args)
    assert run.exit_code == 0, run.output
    weights = load_file(str(out))
    assert weights and any(float(t.abs().max()) > 0 for k, t in weights.items() if "lora_up" in k or "lora_B" in k)
    assert len(draws) == 2 * 2  # two routes, two steps: one draw each (none at sampling or saving)
    assert {a[2] for a in draws} == {0.5, 0.25}


def test_a_unet_family_is_refused_before_loading(tmp_path):
    from click.testing import CliRunner
    from sdcore.cli import build_cli
    from sdcore.plugins import get_plugin_manager

    args = ["train", "lora", "--model", "tiny:sd1", "--data", str(_data(tmp_path)), "--output",
            str(tmp_path / "o.safetensors"), "--resolution", "64", "--tread-route", "0.5:1:-1", "--dry-run"]  # fmt: skip
    run = CliRunner().invoke(build_cli(get_plugin_manager()), args)
    assert run.exit_code == 2
    assert "Error: --tread-route: TREAD token routing needs a transformer family" in run.output, run.output


def test_simpletuner_tread_config_becomes_the_same_routes(tmp_path):
    from sdcore.train.simpletuner_config import translate_config

    def translated(tread: object):
        data = {"model_family": "flux", "model_type": "lora", "tread_config": tread}
        return translate_config(data, ["tread_route", "model", "seed"], where="config.json", path=tmp_path / "c.json")

    routes = [{"selection_ratio": 0.5, "start_layer_idx": 2, "end_layer_idx": -2},
              {"selection_ratio": 0.7, "start_layer_idx": -1, "end_layer_idx": -1}]  # fmt: skip
    assert translated({"routes": routes}).values["tread_route"] == ("0.5:2:-2", "0.7:-1:-1")
    assert translated(json.dumps({"routes": routes})).values["tread_route"] == ("0.5:2:-2", "0.7:-1:-1")
    bad = translated({"routes": [{"selection_ratio": 1.5, "start_layer_idx": 0, "end_layer_idx": 1},
                                 {"selection_ratio": 0.5, "start_layer_idx": 0}]})  # fmt: skip
    assert "tread_route" not in bad.values
    assert [p.split(": ", 1)[0].rsplit(".", 1)[-1] for p in bad.problems if "tread_config" in p] == [
        "routes[0]",
        "routes[1]",
    ]
    assert any("must be in [0, 1), got 1.5" in p for p in bad.problems)
    assert any('needs "routes"' in p for p in translated({"route": []}).problems)


def test_a_new_step_forgets_the_last_steps_spans_and_their_tokens():
    """A span keeps its route's start tokens (and through them the forward's graph) until its forward's tensors
    die; a backward that leaves part of the graph unrun (autograd.grad of some tensors) keeps them alive, so
    each optimizer step starts without the spans of the steps before it."""
    model = tiny_sd3()
    lora = Lora(model)
    routing = _route(model, SD3)
    for number in range(3):
        routing.new_step(42, number, 0)
        step(model, sd3_inputs(), lora)
        assert len(routing._spans[0]) == 1
    first = routing.router.select(1, 64, 0.5).keep
    routing.new_step(42, 7, 0)
    again = routing.router.select(1, 64, 0.5).keep
    routing.new_step(42, 7, 0)
    assert torch.equal(routing.router.select(1, 64, 0.5).keep, again) and not torch.equal(first, again)


def test_loss_masks_of_the_dataset_are_refused_with_a_route(tmp_path):
    """SimpleTuner keeps every token inside a loss mask; sdcore's routing does not, so alpha_mask (and the other
    dataset masks that weigh the loss) are refused like --masked-loss."""
    from click.testing import CliRunner
    from PIL import Image
    from sdcore.cli import build_cli
    from sdcore.plugins import get_plugin_manager

    data = _data(tmp_path)
    for path in data.glob("*.png"):
        Image.open(path).convert("RGBA").save(path)
    args = ["train", "lora", "--model", "tiny:flux", "--data", str(data), "--output", str(tmp_path / "o.safetensors"),
            "--resolution", "64", "--tread-route", "0.5:1:-1", "--dry-run"]  # fmt: skip
    cli = build_cli(get_plugin_manager())
    assert CliRunner().invoke(cli, args).exit_code == 0
    run = CliRunner().invoke(cli, [*args, "--alpha-mask"])
    assert run.exit_code == 2
    assert "--tread-route with loss masks (alpha_mask" in run.output, run.output


def test_simpletuner_tread_config_as_python_literal_text(tmp_path):
    """SimpleTuner reads a tread_config string with ast.literal_eval: single quotes, True/False."""
    from sdcore.train.simpletuner_config import translate_config

    text = "{'routes': [{'selection_ratio': 0.25, 'start_layer_idx': 2, 'end_layer_idx': -2}]}"
    data = {"model_family": "flux", "model_type": "lora", "tread_config": text}
    out = translate_config(data, ["tread_route", "model", "seed"], where="config.json", path=tmp_path / "c.json")
    assert out.values["tread_route"] == ("0.25:2:-2",)
