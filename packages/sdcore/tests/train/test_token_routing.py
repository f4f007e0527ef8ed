"""--tread-route (TREAD token routing): the router, the routed FLUX.1 and SD3 blocks, their composition with
gradient checkpointing and block swap (FLUX.1, SD3, Chroma), loss masks kept (FLUX.1 Kontext too), the options,
SimpleTuner's tread_config and the refusals."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest
import torch
from sdcore.errors import ConfigError, SdcoreError
from sdcore.models.chroma import CHROMA
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


def tiny_chroma() -> torch.nn.Module:
    from diffusers import ChromaTransformer2DModel
    from sdcore.models.chroma.load import quiet_chroma_construction
    from sdcore.models.chroma.tiny import transformer_config

    torch.manual_seed(0)
    with quiet_chroma_construction():
        return ChromaTransformer2DModel(**{**transformer_config(), "num_single_layers": 3})


def chroma_inputs() -> dict:
    """Chroma's call as sdcore's adapter makes it: the mask [B, T + N], T5 padding in the second sample."""
    g = torch.Generator().manual_seed(1)
    img, txt = 16, 5
    text = torch.tensor([[True] * 5, [True, True, True, True, False]])
    return {
        "hidden_states": torch.randn(2, img, 64, generator=g),
        "encoder_hidden_states": torch.randn(2, txt, 32, generator=g),
        "timestep": torch.tensor([0.3, 0.8]),
        "img_ids": torch.stack(
            torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1
        ).reshape(-1, 3),
        "txt_ids": torch.zeros(txt, 3),
        "attention_mask": torch.cat([text, torch.ones(2, img, dtype=torch.bool)], dim=1),
        "return_dict": False,
    }


FAMILIES = {
    "flux": (tiny_flux, flux_inputs, FLUX),
    "sd3": (tiny_sd3, sd3_inputs, SD3),
    "chroma": (tiny_chroma, chroma_inputs, CHROMA),
}


def _checkpointing(model, func=None) -> None:
    """diffusers' gradient checkpointing; on Chroma as sdcore enables it (its single blocks keep the mask)."""
    from diffusers import ChromaTransformer2DModel

    if isinstance(model, ChromaTransformer2DModel):
        from sdcore.models.chroma.checkpointing import enable_masked_checkpointing

        enable_masked_checkpointing(model, func)
    elif func is None:
        model.enable_gradient_checkpointing()
    else:
        model.enable_gradient_checkpointing(gradient_checkpointing_func=func)


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

    def at_end(module, args, output):  # the image tokens (of a joint [text | image] sequence: its image part)
        text = inputs()["encoder_hidden_states"].shape[1]
        seen["end"] = (output[1] if isinstance(output, tuple) else output[:, text:]).detach()

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
    _checkpointing(model)  # the routed blocks are recomputed in backward: the same draw
    runs["checkpointing"] = step(model, inputs(), lora)
    model.disable_gradient_checkpointing()
    routing.router = TokenRouter(3)
    swap = BlockSwap(model, 2, "cpu")  # installed after the routing, as the runtime does: it wraps the routed blocks
    runs["swap"] = step(model, inputs(), lora)
    routing.router = TokenRouter(3)
    _checkpointing(model)
    runs["swap+checkpointing"] = step(model, inputs(), lora)
    swap.remove()
    from sdcore.train.offload_checkpointing import ActivationOffload

    routing.router = TokenRouter(3)
    offload = ActivationOffload("cpu")
    offload.always_copy = True  # --cpu-offload-checkpointing: the tokens the recompute gets are other tensors
    _checkpointing(model, offload)
    runs["offload checkpointing"] = step(model, inputs(), lora)
    for label, (loss, grads) in runs.items():
        assert torch.equal(loss, reference[0]), label
        assert all(torch.equal(a, b) for a, b in zip(grads, reference[1], strict=True)), label


@pytest.mark.parametrize("name", ["flux", "chroma"])
def test_two_forwards_before_one_backward_keep_their_own_draws_under_checkpointing(name):
    """APT's two passes: each recompute uses the selection of the forward it belongs to (Chroma: found by the
    forward's own RoPE tables, new in each forward)."""
    make, inputs_of, family = FAMILIES[name]
    model = make()
    lora = Lora(model)
    routing = _route(model, family, start=0)
    draws: list = []

    def two_pass(checkpointing: bool):
        routing.router = TokenRouter(5)
        routing.router.select = _recorded_select(routing.router, draws)  # type: ignore[method-assign]
        if checkpointing:
            _checkpointing(model)
        else:
            model.disable_gradient_checkpointing()
        outs = [model(**inputs)[0] for inputs in (inputs_of(), inputs_of())]
        loss = (outs[0] - 0.5).square().mean() + (outs[1] + 0.5).square().mean()
        return loss.detach(), torch.autograd.grad(loss, lora.params)

    plain, checkpointed = two_pass(False), two_pass(True)
    assert len(draws) == 4  # one per forward: no recompute draws anew
    assert not torch.equal(draws[0][1].keep, draws[1][1].keep)  # the two forwards route other tokens
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
    from sdcore.models.family import SD1

    options = SimpleNamespace(tread_route=("0.5:1:-1",), masked_loss=False)
    (problem,) = model_problems(options, SimpleNamespace(family=SD1.name, configs={}))
    assert problem.startswith("--tread-route: TREAD token routing needs a transformer family")
    assert SD1.label in problem
    chroma = SimpleNamespace(family="chroma", configs={"transformer": {"num_layers": 2, "num_single_layers": 2}})
    assert model_problems(options, chroma) == []
    assert (
        "the Chroma transformer has 4 transformer blocks"
        in model_problems(SimpleNamespace(tread_route=("0.5:0:4",)), chroma)[0]
    )
    flux = SimpleNamespace(family="flux", configs={"transformer": {"num_layers": 2, "num_single_layers": 3}})
    assert model_problems(options, flux) == []
    (problem,) = model_problems(SimpleNamespace(tread_route=("0.5:1:6",)), flux)
    assert "the FLUX.1 transformer has 5 transformer blocks" in problem
    sd3 = SimpleNamespace(family="sd3", configs={"transformer": {"num_layers": 3}})
    assert "has 3 transformer blocks" in model_problems(SimpleNamespace(tread_route=("0.5:-4:-1",)), sd3)[0]
    assert option_problems(SimpleNamespace(tread_route=("0.5:1:-1",), masked_loss=True)) == []  # masks: kept


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


def test_loss_masks_of_the_dataset_train_with_a_route_and_a_note(tmp_path):
    """alpha_mask (and the other dataset masks that weigh the loss) go with a route: the pre-flight says the
    masked tokens are never dropped, and refuses nothing."""
    from click.testing import CliRunner
    from PIL import Image
    from sdcore.cli import build_cli
    from sdcore.plugins import get_plugin_manager

    data = _data(tmp_path)
    for path in data.glob("*/*.png"):
        Image.open(path).convert("RGBA").save(path)
    args = ["train", "lora", "--model", "tiny:flux", "--data", str(data), "--output", str(tmp_path / "o.safetensors"),
            "--resolution", "64", "--tread-route", "0.5:1:-1", "--dry-run"]  # fmt: skip
    cli = build_cli(get_plugin_manager())
    plain = CliRunner().invoke(cli, args)
    assert plain.exit_code == 0 and "never dropped" not in plain.output, plain.output
    run = CliRunner().invoke(cli, [*args, "--alpha-mask"])
    assert run.exit_code == 0, run.output
    assert "--tread-route with loss masks: the image tokens inside a sample's mask" in run.output, run.output


@pytest.mark.parametrize("model", ["tiny:sd3", "tiny:flux"])
def test_on_sd3_the_note_says_simpletuners_sd3_drops_the_masked_tokens(tmp_path, model):
    """sdcore force-keeps the masked tokens on SD3 as on FLUX.1 (SimpleTuner's TREAD guide: masked regions are
    preserved), where SimpleTuner's own SD3 model (bc8e6ab7, helpers/models/sd3/model.py) hands its transformer
    no force_keep_mask: on SD3 the pre-flight note says so, since a run there routes fewer tokens than
    SimpleTuner's; on FLUX.1, where both keep them, it does not."""
    from click.testing import CliRunner
    from PIL import Image
    from sdcore.cli import build_cli
    from sdcore.plugins import get_plugin_manager

    data = _data(tmp_path)
    for path in data.glob("*/*.png"):
        Image.open(path).convert("RGBA").save(path)
    args = ["train", "lora", "--model", model, "--data", str(data), "--output", str(tmp_path / "o.safetensors"),
            "--resolution", "64", "--tread-route", "0.5:1:-1", "--dry-run", "--alpha-mask"]  # fmt: skip
    run = CliRunner().invoke(build_cli(get_plugin_manager()), args)
    assert run.exit_code == 0, run.output
    assert "--tread-route with loss masks: the image tokens inside a sample's mask" in run.output, run.output
    assert ("SimpleTuner's own SD3 model passes no mask" in run.output) == (model == "tiny:sd3"), run.output


def test_simpletuner_tread_config_as_python_literal_text(tmp_path):
    """SimpleTuner reads a tread_config string with ast.literal_eval: single quotes, True/False."""
    from sdcore.train.simpletuner_config import translate_config

    text = "{'routes': [{'selection_ratio': 0.25, 'start_layer_idx': 2, 'end_layer_idx': -2}]}"
    data = {"model_family": "flux", "model_type": "lora", "tread_config": text}
    out = translate_config(data, ["tread_route", "model", "seed"], where="config.json", path=tmp_path / "c.json")
    assert out.values["tread_route"] == ("0.25:2:-2",)


# ---------------------------------------------------------------------------------------------------------------
# loss masks: the tokens inside them are never dropped (SimpleTuner's force_keep)


def test_force_kept_tokens_are_always_kept_over_many_seeds():
    for seed in range(200):
        g = torch.Generator().manual_seed(seed)
        force = torch.rand(3, 20, generator=g) < torch.rand(3, 1, generator=g)  # 0 to 20 forced tokens per sample
        for shared in (False, True):
            keep = TokenRouter(seed).select(3, 20, 0.6, shared=shared, force_keep=force).keep
            kept = torch.zeros(keep.shape[0], 20, dtype=torch.bool).scatter(1, keep, True)
            forced = force.any(0, keepdim=True) if shared else force  # FLUX.1's one draw: the batch's union
            assert not (forced & ~kept).any(), (seed, shared)
            assert all(torch.equal(row, torch.sort(row).values) for row in keep)


def test_the_keep_budget_is_the_routes_or_the_most_forced_tokens_of_the_batch():
    force = torch.zeros(2, 20, dtype=torch.bool)
    force[0, :3] = True
    assert TokenRouter(0).select(2, 20, 0.75, force_keep=force).keep.shape == (2, 5)  # 20 - round(15) = 5 > 3
    force[1, 5:17] = True  # 12 forced in sample 1: both samples keep 12, sample 0 its 3 and 9 drawn
    keep = TokenRouter(0).select(2, 20, 0.75, force_keep=force).keep
    assert keep.shape == (2, 12) and set(range(3)) <= set(keep[0].tolist())
    assert keep[1].tolist() == list(range(5, 17))
    force[0, 3:10] = True  # the union of [0, 10) and [5, 17): 17 tokens for the shared draw
    assert TokenRouter(0).select(2, 20, 0.75, shared=True, force_keep=force).keep.tolist() == [list(range(17))]
    # the same noise with and without a mask: a mask that forces nothing draws what no mask draws
    plain = TokenRouter(4).select(2, 20, 0.5).keep
    assert torch.equal(TokenRouter(4).select(2, 20, 0.5, force_keep=torch.zeros(2, 20, dtype=torch.bool)).keep, plain)


def test_the_token_keep_mask_is_simpletuners_area_average_of_the_mask_image_above_a_half():
    """SimpleTuner: the mask image's RGB in [-1, 1], (sum / 3 + 1) / 2, area-downsampled to latent H/2 x W/2,
    > 0.5. sdcore's loss mask (kohya's: area to latent size) then area to the 2x2 token grid gives the same."""
    from sdcore.train.data import mask_to_latent
    from sdcore.train.token_routing import pad_keep_mask, token_keep_mask

    g = torch.Generator().manual_seed(0)
    grey = torch.rand(96, 128, generator=g) ** 2  # a grey mask image, values 0..1
    grey[:48, :64] = (torch.rand(48, 64, generator=g) > 0.5).float()  # and a binary part (exact halves too)
    rgb = (grey * 2 - 1).expand(1, 3, 96, 128)
    theirs = torch.nn.functional.interpolate((rgb.sum(1, keepdim=True) / 3 + 1) / 2, size=(6, 8), mode="area")
    expected = theirs.flatten(2).squeeze(1) > 0.5
    ours = token_keep_mask(mask_to_latent(grey.numpy(), (12, 16))[None], 2)
    assert ours.shape == (1, 48) and torch.equal(ours, expected)
    assert 5 < int(ours.sum()) < 43
    assert torch.equal(pad_keep_mask(ours, 96)[:, :48], ours) and not pad_keep_mask(ours, 96)[:, 48:].any()
    with pytest.raises(Exception, match="covers 48 image tokens"):
        pad_keep_mask(ours, 40)


@pytest.mark.parametrize("name", FAMILIES)
def test_routed_blocks_never_drop_the_tokens_inside_the_loss_mask(name):
    make, inputs, family = FAMILIES[name]
    model = make()
    lora = Lora(model)
    routing = _route(model, family, ratio=0.75, start=0, end=-1)
    selections: list = []
    tokens = 16
    for seed in range(12):
        mask = torch.zeros(2, 1, 8, 8)  # latent-size masks: a different rectangle per sample
        mask[0, :, seed % 4 : seed % 4 + 4, 2:6] = 1.0
        mask[1, :, 4:, : 2 + seed % 6] = 1.0
        keep_mask = _token_mask(mask, family)
        routing.router = TokenRouter(seed)
        selections.clear()
        routing.router.select = _recorded_select(routing.router, selections)  # type: ignore[method-assign]
        with routing.keeping(keep_mask):
            step(model, inputs(), lora)
        ((force, selection),) = selections
        assert force is not None and force.shape == (2, tokens)
        kept = torch.zeros(selection.keep.shape[0], tokens, dtype=torch.bool).scatter(1, selection.keep, True)
        wanted = keep_mask.any(0, keepdim=True) if family.token_routing.rope else keep_mask  # one draw: union
        assert wanted.any() and not (wanted & ~kept).any()
        assert selection.keep.shape[1] == max(kept_tokens(tokens, 0.75), int(wanted.sum(1).max()))
    selections.clear()
    step(model, inputs(), lora)  # outside keeping(): no mask, a plain draw
    assert selections[0][0] is None


def _token_mask(mask: torch.Tensor, family) -> torch.Tensor:
    from sdcore.train.token_routing import token_keep_mask

    return token_keep_mask(mask, family.token_routing.patch)


def _recorded_select(router, selections):
    """``router.select`` that records (its force_keep, its selection)."""
    select = router.select

    def recording(*args, **kwargs):
        selections.append((kwargs.get("force_keep"), select(*args, **kwargs)))
        return selections[-1][1]

    return recording


@pytest.mark.parametrize("name", FAMILIES)
def test_a_mask_that_keeps_every_token_computes_what_the_unrouted_step_computes(name):
    make, inputs, family = FAMILIES[name]
    model = make()
    lora = Lora(model)
    plain_loss, plain_grads = step(model, inputs(), lora)
    routing = _route(model, family, ratio=0.5, start=1, end=-1)
    with routing.keeping(torch.ones(2, 16, dtype=torch.bool)):
        loss, grads = step(model, inputs(), lora)
    assert torch.equal(loss, plain_loss) and all(torch.equal(a, b) for a, b in zip(grads, plain_grads, strict=True))
    half = torch.zeros(2, 16, dtype=torch.bool)
    half[:, :8] = True
    with routing.keeping(half):  # the budget (8 of 16) is the mask: routed, not the plain step
        assert not torch.equal(step(model, inputs(), lora)[0], plain_loss)


def _masks(tmp_path, data, fill) -> str:
    from PIL import Image

    folder = tmp_path / "masks"
    folder.mkdir(parents=True, exist_ok=True)
    for path in sorted(data.glob("*/*.png")):
        mask = Image.new("RGB", (64, 64), 0)
        mask.paste((255, 255, 255), fill)
        mask.save(folder / path.name)
    return str(folder)


def _train(tmp_path, name, extra):
    from click.testing import CliRunner
    from safetensors.torch import load_file
    from sdcore.cli import build_cli
    from sdcore.plugins import get_plugin_manager

    out = tmp_path / f"{name}.safetensors"
    args = ["train", "lora", "--model", "tiny:flux", "--data", str(tmp_path / "data"), "--output", str(out),
            "--resolution", "64", "--max-steps", "2", "--lr", "1e-2", "--no-progress", "--batch-size", "2", *extra]  # fmt: skip
    run = CliRunner().invoke(build_cli(get_plugin_manager()), args)
    assert run.exit_code == 0, run.output
    return load_file(str(out)), run.output


def _record_draws(monkeypatch) -> list:
    """Every ``TokenRouter.select`` of the run as ``(args, kwargs, selection)``, in order."""
    draws: list = []
    select = TokenRouter.select

    def recording(self, *args, **kwargs):
        draws.append((args, kwargs, select(self, *args, **kwargs)))
        return draws[-1][2]

    monkeypatch.setattr(TokenRouter, "select", recording)
    return draws


def test_a_tiny_flux_lora_trains_with_masked_loss_and_a_route_keeping_the_masked_tokens(tmp_path, monkeypatch):
    data = _data(tmp_path)
    masks = _masks(tmp_path, data, (0, 0, 32, 64))  # the left half: token columns 0-1 of the 4x4 grid
    draws = _record_draws(monkeypatch)
    weights, output = _train(tmp_path, "masked", ["--masked-loss", "--conditioning-data-dir", masks,
                                                  "--tread-route", "0.75:0:-1"])  # fmt: skip
    assert "never dropped" in output
    assert any(float(t.abs().max()) > 0 for k, t in weights.items() if "lora_up" in k or "lora_B" in k)
    assert len(draws) == 2
    left = torch.tensor([[c < 2 for r in range(4) for c in range(4)]])
    for args, kwargs, selection in draws:
        assert args[1] == 16 and torch.equal(kwargs["force_keep"].cpu(), left.expand(2, -1))
        keep = selection.keep
        assert keep.shape == (1, 8) and keep[0].tolist() == [0, 1, 4, 5, 8, 9, 12, 13]  # the budget: the mask


def test_white_masks_with_a_route_train_what_the_unrouted_masked_run_trains(tmp_path):
    """Every token inside the mask: the route keeps them all, and the LoRA is the unrouted run's bit for bit."""
    data = _data(tmp_path)
    masks = _masks(tmp_path, data, (0, 0, 64, 64))
    base = ["--masked-loss", "--conditioning-data-dir", masks]
    routed, _ = _train(tmp_path, "routed", [*base, "--tread-route", "0.5:1:-1"])
    plain, _ = _train(tmp_path, "plain", base)
    assert routed.keys() == plain.keys()
    assert all(torch.equal(routed[k], plain[k]) for k in plain)
    other, _ = _train(tmp_path, "half", ["--masked-loss", "--conditioning-data-dir",
                                         _masks(tmp_path / "h", data, (0, 0, 32, 64)), "--tread-route", "0.5:1:-1"])  # fmt: skip
    assert any(not torch.equal(other[k], plain[k]) for k in plain)


def test_flux_kontext_routes_the_reference_tokens_too_and_never_force_keeps_them(tmp_path, monkeypatch):
    """SimpleTuner draws over the transformer's whole image sequence, which on Kontext is [target | reference]
    tokens; so does sdcore. A loss mask covers the target image: the reference tokens are never force-kept
    (SimpleTuner's mask of the target's tokens would not fit that sequence)."""
    from sdcore.testing.datasets import write_inverted_controls

    data = _data(tmp_path)
    controls = str(write_inverted_controls(data, tmp_path / "controls"))
    masks = _masks(tmp_path, data, (0, 0, 32, 64))
    draws = _record_draws(monkeypatch)
    weights, _ = _train(tmp_path, "kontext", ["--control-dir", controls, "--tread-route", "0.5:0:-1"])
    assert any(float(t.abs().max()) > 0 for k, t in weights.items() if "lora_up" in k or "lora_B" in k)
    assert [args[1] for args, _, _ in draws] == [32, 32]  # 16 target + 16 reference tokens
    assert all(kwargs["force_keep"] is None for _, kwargs, _ in draws)
    kept = torch.zeros(32, dtype=torch.bool)
    for _, _, selection in draws:
        assert selection.keep.shape == (1, 16)
        kept[selection.keep[0]] = True
    assert kept[16:].any()  # reference tokens go through the span (and others skip it)
    draws.clear()
    _train(tmp_path, "kontext-masked", ["--control-dir", controls, "--masked-loss", "--conditioning-data-dir", masks,
                                        "--tread-route", "0.75:0:-1"])  # fmt: skip
    left = torch.tensor([c < 2 for r in range(4) for c in range(4)] + [False] * 16)
    assert len(draws) == 2
    for args, kwargs, selection in draws:
        assert args[1] == 32 and torch.equal(kwargs["force_keep"].cpu(), left.expand(2, -1))
        assert set(torch.nonzero(left).flatten().tolist()) <= set(selection.keep[0].tolist())
        assert selection.keep.shape == (1, 8)  # 32 - round(24) = 8: the mask's 8 tokens are the budget


def test_a_chroma_route_inside_the_single_blocks_splits_the_joint_sequence_at_the_text(tmp_path):
    """Chroma's single blocks take [text | image] as one sequence: a route starting there keeps the text (its
    length from the transformer's own call), routes the image part, its mask columns and RoPE rows."""
    model = tiny_chroma()
    lora = Lora(model)
    plain = step(model, chroma_inputs(), lora)
    zero = _route(model, CHROMA, ratio=0.0, start=2, end=-1)
    assert _same(step(model, chroma_inputs(), lora), plain)
    zero.remove()
    routing = _route(model, CHROMA, ratio=0.5, start=3, end=3)
    seen = {}
    block = model.single_transformer_blocks[1]
    pre = block.register_forward_pre_hook(lambda m, a, k: seen.update(start=(a[0] if a else k["hidden_states"])),
                                          with_kwargs=True)  # fmt: skip
    post = block.register_forward_hook(lambda m, a, out: seen.update(end=out))
    routed = step(model, chroma_inputs(), lora)
    pre.remove()
    post.remove()
    assert seen["start"].shape == seen["end"].shape == (2, 5 + 16, 32)
    assert not torch.equal(seen["end"][:, :5], seen["start"][:, :5])  # the text went through the block
    unchanged = (seen["end"][0, 5:] == seen["start"][0, 5:]).all(dim=-1)
    assert int(unchanged.sum()) == 8  # half the image tokens skipped the block
    assert not torch.equal(routed[0], plain[0])
    routing.router = TokenRouter(3)
    reference = step(model, chroma_inputs(), lora)
    routing.router = TokenRouter(3)
    _checkpointing(model)
    assert _same(step(model, chroma_inputs(), lora), reference)
    # the text length is the running forward's: after it, a routed single block called alone cannot be split
    rope = model.pos_embed(torch.zeros(21, 3))
    with pytest.raises(SdcoreError, match="gave no 'encoder_hidden_states'"):
        block(torch.randn(2, 21, 32), torch.randn(2, 3, 32), rope)


def _same(a, b) -> bool:
    """Two ``step`` results (loss, gradients) equal bit for bit."""
    return torch.equal(a[0], b[0]) and all(torch.equal(x, y) for x, y in zip(a[1], b[1], strict=True))


def test_a_tiny_chroma_lora_trains_with_a_route_and_a_mask_through_the_cli(tmp_path, monkeypatch):
    from click.testing import CliRunner
    from safetensors.torch import load_file
    from sdcore.cli import build_cli
    from sdcore.plugins import get_plugin_manager

    data = _data(tmp_path)
    masks = _masks(tmp_path, data, (0, 0, 32, 64))
    out = tmp_path / "c.safetensors"
    args = ["train", "lora", "--model", "tiny:chroma", "--data", str(data), "--output", str(out), "--resolution",
            "64", "--max-steps", "2", "--lr", "1e-2", "--no-progress", "--gradient-checkpointing", "--masked-loss",
            "--conditioning-data-dir", masks, "--tread-route", "0.5:1:-2"]  # fmt: skip
    draws = _record_draws(monkeypatch)
    run = CliRunner().invoke(build_cli(get_plugin_manager()), args)
    assert run.exit_code == 0, run.output
    weights = load_file(str(out))
    assert any(float(t.abs().max()) > 0 for k, t in weights.items() if "lora_up" in k or "lora_B" in k)
    left = [c < 2 for r in range(4) for c in range(4)]  # the mask's left half: token columns 0-1 of the 4x4 grid
    assert len(draws) == 2  # one per step: the checkpointed recompute reuses it
    for args, kwargs, selection in draws:
        assert args[1] == 16 and kwargs["force_keep"].cpu().tolist() == [left]
        assert selection.keep[0].tolist() == [0, 1, 4, 5, 8, 9, 12, 13]  # the budget (8 of 16) is the mask


def test_a_family_declaration_names_its_joint_block_lists_and_a_positive_patch():
    from dataclasses import replace

    from sdcore.errors import PluginError
    from sdcore.models.family import RoutedInputs

    with pytest.raises(PluginError, match=re.escape("token_routing.joint names no block list of it: 'single_blocks'")):
        replace(CHROMA, token_routing=RoutedInputs(joint=("single_blocks",)))
    with pytest.raises(PluginError, match=re.escape("token_routing.patch must be a positive int, not 0")):
        replace(FLUX, token_routing=RoutedInputs(patch=0))
    assert replace(CHROMA, token_routing=RoutedInputs(joint=("single_transformer_blocks",))).token_routing
