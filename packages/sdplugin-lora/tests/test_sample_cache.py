"""Sample images and validation with each weight change computed once (``LoraNetwork.cached_changes``,
entered by ``LoraMethod.sampling``, which the runtime enters for both).

The reference is always the same network without the cache: the UNet output inside the cached block
must equal the rebuilt forward's (bit for bit: the cached tensor is the one the rebuilt forward would
compute), per-sample strengths and multiplier changes included; after the block the adapters compute
from their parameters again; and a training step after sampling has the gradients it has without it.
"""

from __future__ import annotations

import functools

import pytest
import torch
from lora_testutil import fresh_bundle, unet_inputs
from sdplugin_lora.adapters import ChangeCache
from sdplugin_lora.algos import ALGOS
from sdplugin_lora.method import LoraMethod, LoraOptions

#: every --algo, plus the weight-rebuilding variants with extra tensors (Tucker cores, LoKr's split w1,
#: BOFT's rescale vector)
CASES: dict[str, dict[str, object]] = {algo: {"algo": algo} for algo in ALGOS}
CASES.update(
    {
        "loha_tucker": {"algo": "loha", "use_tucker": True},
        "lokr_decompose_both": {"algo": "lokr", "decompose_both": True, "lokr_factor": 2},
        "boft_rescaled": {"algo": "boft", "rescaled": True, "constraint": 1e-2},
        "dora_multiplier": {"algo": "dora", "network_multiplier": 0.7},
    }
)
#: the algorithms whose forward is factorised (``up(down(x))``): nothing to cache
FACTORISED = {"lora", "locon", "lora_fa", "dylora"}
STRENGTHS = torch.tensor([1.0, -1.0, 0.5])


def _method(case: str, seed: int = 0) -> tuple[LoraMethod, object]:
    """A network on the tiny SD1 (UNet and text encoder, 3x3 convs) with every parameter moved off its
    init, so that each module changes its layer (DoRA: a magnitude away from ||W||)."""
    bundle = fresh_bundle("sd1")
    method = LoraMethod(LoraOptions(**{"rank": 4, "conv_rank": 2, "train_text_encoder": True, **CASES[case]}))  # type: ignore[arg-type]
    method.prepare(bundle)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in method.network.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith(("dora_scale", "rescale")):
                param.mul_(1.0 + 0.1 * noise)
            else:
                param.add_(noise * 0.05)
    return method, bundle


def _unet(bundle, inputs) -> torch.Tensor:
    latents, t, hidden, kwargs = inputs
    return bundle.unet(latents, t, encoder_hidden_states=hidden, **kwargs).sample


def _forwards(method, bundle, inputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(plain, per-sample strengths, plain at multiplier 0.5) outputs under ``no_grad``."""
    with torch.no_grad():
        plain = _unet(bundle, inputs)
        with method.network_strength(STRENGTHS):
            strengths = _unet(bundle, inputs)
        multipliers = [module.multiplier for module in method.network]
        for module in method.network:
            module.multiplier = 0.5 * module.multiplier
        half = _unet(bundle, inputs)
        for module, m in zip(method.network, multipliers, strict=True):
            module.multiplier = m
    return plain, strengths, half


def _cache_of(method) -> ChangeCache | None:
    caches = {id(m._change_cache): m._change_cache for m in method.network if m._change_cache is not None}
    assert len(caches) <= 1
    return next(iter(caches.values()), None)


@pytest.mark.parametrize("case", sorted(CASES))
def test_cached_outputs_equal_the_rebuilt_ones(case):
    method, bundle = _method(case)
    inputs = unet_inputs(bundle, batch=len(STRENGTHS), seed=1)
    method.network.eval()
    want = _forwards(method, bundle, inputs)
    with torch.no_grad():
        method.network.remove()
        unadapted = _unet(bundle, inputs)
        method.network.attach()
    assert float((want[0] - unadapted).abs().max()) > 1e-4, "the network must change the UNet"
    method.network.train()
    with method.sampling(bundle):
        assert not method.network.training
        cache = _cache_of(method)
        got = _forwards(method, bundle, inputs)
        again = _forwards(method, bundle, inputs)
    for g, a, w in zip(got, again, want, strict=True):
        assert torch.equal(g, w), float((g - w).abs().max())
        assert torch.equal(a, w)
    assert method.network.training and _cache_of(method) is None
    if CASES[case]["algo"] in FACTORISED:
        assert cache is None or (cache.builds == 0 and len(cache) == 0)
        return
    assert cache is not None
    unet_modules = [m for m in method.network if m.lora_name.startswith(("lora_unet", "oft_unet"))]
    # per _forwards, each UNet module builds its change at the plain forward, reuses it with the
    # strengths, and builds it again at multiplier x0.5 (the next plain forward rebuilds at x1)
    assert cache.builds == 4 * len(unet_modules) and cache.hits == 2 * len(unet_modules) and cache.refused == 0
    assert len(cache) == 0  # cleared on exit


def _grads(method, bundle, inputs, weights) -> dict[str, torch.Tensor]:
    method.network.zero_grad()
    torch.manual_seed(0)  # DyLoRA draws its trained slice each training forward
    (_unet(bundle, inputs) * weights).sum().backward()
    return {n: p.grad.clone() for n, p in method.network.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("case", sorted(CASES))
def test_after_sampling_modules_follow_their_parameters_and_train_as_before(case):
    method, bundle = _method(case, seed=3)
    inputs = unet_inputs(bundle, batch=2, seed=2)
    weights = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    before = _grads(method, bundle, inputs, weights)
    assert before and any(float(g.abs().max()) > 0 for g in before.values())

    with method.sampling(bundle):
        with torch.no_grad():
            sampled = _unet(bundle, inputs)
        # a forward with gradients inside the block rebuilds: the gradients reach the parameters as outside
        method.network.train()
        inside = _grads(method, bundle, inputs, weights)
        cache = _cache_of(method)
        if cache is not None:
            assert all(not weight.requires_grad for _, weight in cache._entries.values())
        method.network.eval()
    after = _grads(method, bundle, inputs, weights)
    assert inside.keys() == after.keys() == before.keys()
    for name, grad in before.items():
        assert torch.equal(inside[name], grad), name
        assert torch.equal(after[name], grad), name

    # change the parameters (an optimizer step; random, as OFT's blocks see only B - Bᵀ): the no_grad
    # forward follows them, as the rebuilt one does
    generator = torch.Generator().manual_seed(9)
    method.network.eval()
    with torch.no_grad():
        for param in method.network.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
        moved = _unet(bundle, inputs)
    with torch.enable_grad():
        rebuilt = _unet(bundle, inputs).detach()
    assert torch.equal(moved, rebuilt)
    assert float((moved - sampled).abs().max()) > 1e-5


def test_a_parameter_changed_inside_the_block_is_seen_at_once():
    """The cache key holds every tensor's version: an in-place update inside the block rebuilds."""
    method, bundle = _method("loha")
    inputs = unet_inputs(bundle, batch=1, seed=4)
    with method.sampling(bundle), torch.no_grad():
        first = _unet(bundle, inputs)
        module = next(m for m in method.network if m.lora_name.startswith("lora_unet"))
        module.hada_w2_a.mul_(2.0)
        second = _unet(bundle, inputs)
        cache = _cache_of(method)
        assert cache is not None and cache.builds == len(cache) + 1
    with torch.no_grad():
        method.network.eval()
        want = _unet(bundle, inputs)
    assert torch.equal(second, want) and not torch.equal(first, second)


def test_a_budget_keeps_some_changes_and_the_output_stays_exact():
    method, bundle = _method("lokr")
    inputs = unet_inputs(bundle, batch=1, seed=6)
    method.network.eval()
    with torch.no_grad():
        want = _unet(bundle, inputs)
        sizes = sorted(m.delta_weight().numel() * 4 for m in method.network if m.lora_name.startswith("lora_unet"))
        budget = sum(sizes[: len(sizes) // 2])
        with method.network.cached_changes(max_bytes=budget) as cache:
            got = _unet(bundle, inputs)
            assert 0 < len(cache) < len(sizes) and cache.refused == len(sizes) - len(cache)
            assert cache.nbytes <= budget
            assert torch.equal(_unet(bundle, inputs), want)
    assert torch.equal(got, want)


def test_nested_blocks_restore_the_outer_cache():
    method, _ = _method("boft")
    network = method.network
    with network.cached_changes() as outer:
        with network.cached_changes() as inner:
            assert _cache_of(method) is inner
        assert _cache_of(method) is outer
    assert _cache_of(method) is None


def test_validation_enters_the_cache_too():
    """The runtime's validation runs in ``evaluation_mode``, which enters the method's ``sampling()``."""
    from sdcore.train.validation import evaluation_mode

    method, bundle = _method("glora")
    with evaluation_mode(bundle, method):
        assert isinstance(_cache_of(method), ChangeCache)
        assert not method.network.training
    assert _cache_of(method) is None and method.network.training


# --- Flux (kohya's fused q/k/v LoRA, oft_flux) -------------------------------------------------------


@functools.cache
def _flux_base():
    from sdcore.models.load import load_model

    return load_model("tiny:flux")


def _flux_inputs(model) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    c = model.config
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1)
    return dict(
        hidden_states=torch.randn(2, 16, c.in_channels, generator=gen),
        encoder_hidden_states=torch.randn(2, 5, c.joint_attention_dim, generator=gen),
        pooled_projections=torch.randn(2, c.pooled_projection_dim, generator=gen),
        timestep=torch.tensor([0.3, 0.7]), img_ids=img_ids.reshape(16, 3), txt_ids=torch.zeros(5, 3),
        guidance=torch.tensor([3.5, 3.5]),
    )  # fmt: skip


@pytest.mark.parametrize("algo", ["lora", "oft", "loha", "lokr"])
def test_flux_cached_outputs_equal_the_rebuilt_ones(algo):
    import copy

    bundle = copy.deepcopy(_flux_base())
    method = LoraMethod(LoraOptions(rank=2, alpha=1.0, algo=algo))
    method.prepare(bundle)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in method.network.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    model = bundle.components()["transformer"]
    inputs = _flux_inputs(model)
    strengths = torch.tensor([1.0, -0.5])

    def outputs() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            plain = model(**inputs, return_dict=False)[0]
            with method.network_strength(strengths):
                return plain, model(**inputs, return_dict=False)[0]

    method.network.eval()
    want = outputs()
    method.network.train()
    with method.sampling(bundle):
        got, again = outputs(), outputs()
        cache = _cache_of(method)
    for g, a, w in zip(got, again, want, strict=True):
        assert torch.equal(g, w) and torch.equal(a, w)
    assert not torch.equal(want[0], want[1])
    if algo == "lora":  # the shared-down LoRA stays factorised
        assert cache is None
    else:  # every module builds its change once, a LoHa/LoKr over a fused qkv/linear1 once for all its parts
        from sdplugin_lora.adapters import FusedLohaAdapter, FusedLokrAdapter

        fused = [m for m in method.network if isinstance(m, (FusedLohaAdapter, FusedLokrAdapter))]
        assert bool(fused) == (algo in ("loha", "lokr"))
        assert cache is not None and cache.builds == len(method.network) and cache.refused == 0
        # 4 forwards: the first builds, the other 3 hit (a fused module: once per forward, its parts share it)
        assert cache.hits == 3 * len(method.network)


@pytest.mark.parametrize("algo", ["loha", "lokr"])
def test_flux_fused_modules_train_as_before_after_sampling(algo):
    """A fused LoHa/LoKr's gradients after (and inside, with gradients on) the sampling block are those
    without it; no cached tensor carries a graph; an optimizer-like update inside the block is seen."""
    import copy

    bundle = copy.deepcopy(_flux_base())
    method = LoraMethod(LoraOptions(rank=2, alpha=1.0, algo=algo))
    method.prepare(bundle)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for param in method.network.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    model = bundle.components()["transformer"]
    inputs = _flux_inputs(model)

    def grads() -> dict[str, torch.Tensor]:
        method.network.zero_grad()
        model(**inputs, return_dict=False)[0].square().mean().backward()
        return {n: p.grad.clone() for n, p in method.network.named_parameters() if p.grad is not None}

    before = grads()
    fused = next(n for n in method.network.loras if n.endswith("_linear1"))
    assert any(k.startswith(fused + ".") and float(g.abs().max()) > 0 for k, g in before.items())
    with method.sampling(bundle):
        with torch.no_grad():
            model(**inputs, return_dict=False)
        cache = _cache_of(method)
        assert cache is not None and len(cache) == len(method.network)
        assert all(not weight.requires_grad for _, weight in cache._entries.values())
        method.network.train()
        inside = grads()
        param = next(iter(method.network.loras[fused].parameters()))
        kept = param.detach().clone()
        with torch.no_grad():
            param.mul_(1.5)
            moved = model(**inputs, return_dict=False)[0]
        method.network.eval()
        with torch.enable_grad():
            rebuilt = model(**inputs, return_dict=False)[0].detach()
        with torch.no_grad():
            param.copy_(kept)
    assert torch.equal(moved, rebuilt)
    after = grads()
    assert inside.keys() == after.keys() == before.keys()
    for name, grad in before.items():
        assert torch.equal(inside[name], grad) and torch.equal(after[name], grad), name


def test_forwards_under_autocast_get_their_own_change():
    """Autocast lowers the precision of the rebuild's matmuls: a change cached without it is not reused
    under it (validation runs under the accelerator's autocast, sample images may not)."""
    method, bundle = _method("loha")
    inputs = unet_inputs(bundle, batch=1, seed=7)
    method.network.eval()
    with torch.no_grad():
        plain = _unet(bundle, inputs)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = _unet(bundle, inputs)
        with method.network.cached_changes() as cache:
            assert torch.equal(_unet(bundle, inputs), plain)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                assert torch.equal(_unet(bundle, inputs), mixed)
                assert torch.equal(_unet(bundle, inputs), mixed)
            assert cache.hits > 0
    assert not torch.equal(mixed.float(), plain)
