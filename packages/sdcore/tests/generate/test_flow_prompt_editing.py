"""A1111 prompt editing, alternation and AND on the flow families (SD3, Flux.1 dev/schnell, Chroma): which
conditioning each transformer call receives, and how AND combines the parts' predictions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sdcore.generate.pipeline import generate_images

SIZE = {"width": 32, "height": 32}


@pytest.fixture(scope="module")
def flow_bundles():
    from sdcore.models.family import family_adapter
    from sdcore.models.flux.adapter import FluxAdapter
    from sdcore.models.sd3.tiny import create_tiny_sd3

    cache: dict[str, object] = {}
    makers = {
        "sd3": lambda: create_tiny_sd3(seed=1),
        "flux": lambda: FluxAdapter().create_tiny(variant="dev", seed=0),
        "flux-schnell": lambda: FluxAdapter().create_tiny(variant="schnell", seed=0),
        "chroma": lambda: family_adapter("chroma").create_tiny(),
    }

    def get(name: str):
        if name not in cache:
            cache[name] = makers[name]()
        return cache[name]

    return get


def _encode(name, bundle, prompt, negative):
    """The family's own encoding of one prompt and its negative (the T5 length of the prompt's)."""
    from sdcore.models.chroma.adapter import ChromaAdapter
    from sdcore.models.flux.adapter import T5_MASK, FluxAdapter
    from sdcore.models.sd3.generate import encode_sd3_cond_uncond

    if name == "sd3":
        cond, uncond = encode_sd3_cond_uncond(bundle, [prompt], [negative])
        return {"embeds": cond.embeds, "pooled": cond.pooled}, {"embeds": uncond.embeds, "pooled": uncond.pooled}
    adapter = ChromaAdapter() if name == "chroma" else FluxAdapter()
    cond = adapter.encode_prompts(bundle, [prompt])
    uncond = adapter.encode_prompts(bundle, [negative], t5_max_length=cond.hidden_states.shape[1])
    return tuple({"embeds": c.hidden_states, "pooled": c.pooled, "mask": c.extra.get(T5_MASK)} for c in (cond, uncond))


TRUE_CFG_HEUN = {"cfg": 3.5, "true_cfg_scale": 2.0, "negative_prompt": "[ugly|bad]", "sampler": "heun"}
# (family, settings, evaluations the pipeline makes, transformer calls per evaluation)
CASES = {
    "sd3-cfg": ("sd3", {"cfg": 3.0, "negative_prompt": "[ugly|bad]"}, 3, 1),
    "sd3-heun": ("sd3", {"cfg": 3.0, "negative_prompt": "[ugly|bad]", "sampler": "heun"}, 5, 1),
    "flux-distilled": ("flux", {"cfg": 3.5}, 3, 1),
    "flux-true-cfg-heun": ("flux", TRUE_CFG_HEUN, 5, 2),
    "schnell": ("flux-schnell", {"cfg": 0.0}, 3, 1),
    "chroma-cfg": ("chroma", {"cfg": 3.0, "negative_prompt": "[ugly|bad]"}, 3, 2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_transformer_call_gets_its_evaluations_conditioning(flow_bundles, case):
    """A CFG pass of prompt and negative counts once (batched on SD3, two calls on Flux true CFG and Chroma),
    as A1111 and Forge count; every kwarg that carries the text switches with it."""
    name, settings, evaluations, per_evaluation = CASES[case]
    bundle = flow_bundles(name)
    seen: list[dict[str, torch.Tensor | None]] = []

    def record(module, args, kwargs):  # runs after sdcore's pre-hook (which goes first)
        seen.append({key: None if kwargs.get(key) is None else kwargs[key].clone()
                     for key in ("encoder_hidden_states", "pooled_projections", "txt_ids", "attention_mask")})  # fmt: skip

    handle = bundle.transformer.register_forward_pre_hook(record, with_kwargs=True)
    try:
        edited = generate_images(bundle, ["a [cat:dog:1] x"], steps=3, seed=2, **SIZE, **settings)[0]
    finally:
        handle.remove()
    assert len(seen) == evaluations * per_evaluation
    negative = "negative_prompt" in settings
    with torch.no_grad():  # as generation encodes
        encoded = {(p, n): _encode(name, bundle, f"a {p} x", n if negative else "") for p in ("cat", "dog")
                   for n in ("ugly", "bad")}  # fmt: skip
    # evaluations 0 and 1 read step 1 ("cat", the alternation's first option), 2 reads step 2, then step 3;
    # Heun's schedule is over twice the steps (A1111's second-order total_steps), so evaluation 4 reads step 4
    expected = [("cat", "ugly"), ("cat", "ugly"), ("dog", "bad"), ("dog", "ugly"), ("dog", "bad")]
    for call, got in enumerate(seen):
        evaluation, is_negative = divmod(call, per_evaluation)
        cond, uncond = encoded[expected[evaluation]]
        if name == "sd3":  # one batched call [uncond, cond]
            want = {"embeds": torch.cat([uncond["embeds"], cond["embeds"]]),
                    "pooled": torch.cat([uncond["pooled"], cond["pooled"]])}  # fmt: skip
        else:
            want = uncond if is_negative else cond
        states = got["encoder_hidden_states"]
        torch.testing.assert_close(states, want["embeds"].to(states), rtol=0, atol=0)
        if name != "chroma":
            torch.testing.assert_close(got["pooled_projections"], want["pooled"].to(states), rtol=0, atol=0)
        if name != "sd3":  # one row of zeros per text token
            assert torch.equal(got["txt_ids"], torch.zeros(states.shape[1], 3).to(got["txt_ids"]))
        if name == "chroma":  # the text mask, then every image token ((32 / 16) ** 2 of them)
            mask = torch.cat([want["mask"], torch.ones(1, 4, dtype=torch.bool)], dim=1)
            assert torch.equal(got["attention_mask"].cpu(), mask)
    static = generate_images(bundle, ["a cat x"], steps=3, seed=2, **SIZE, **{**settings, "negative_prompt": (
        "ugly" if negative else "")})[0]  # fmt: skip
    assert not np.array_equal(np.asarray(edited), np.asarray(static))


@pytest.mark.parametrize(
    ("name", "settings"),
    [
        ("sd3", {"cfg": 3.0, "negative_prompt": "blurry"}),
        ("flux", {"cfg": 3.5}),
        ("flux", {"cfg": 3.5, "true_cfg_scale": 2.0, "negative_prompt": "blurry"}),
        ("chroma", {"cfg": 3.0, "negative_prompt": "blurry"}),
    ],
)
def test_an_edit_after_the_last_step_is_the_plain_prompt(flow_bundles, name, settings):
    """[cat:dog:N] with N >= steps never switches, and [cat:cat:1] switches to the same text (the hooks run
    and rewrite every call): both are the plain "cat" image, bit for bit."""
    bundle = flow_bundles(name)

    def image(prompt):
        return np.asarray(generate_images(bundle, [prompt], steps=3, seed=4, **SIZE, **settings)[0])

    plain = image("a cat")
    assert np.array_equal(plain, image("a [cat:dog:3]"))
    assert np.array_equal(plain, image("a [cat:cat:1]"))


def _close(a, b):
    return np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max() <= 2


@pytest.mark.parametrize(
    ("name", "scale", "fixed"),
    [
        ("sd3", "cfg", {}),
        ("flux", "true_cfg_scale", {"cfg": 3.5}),  # true CFG: the prompt and the negative in two calls
        ("chroma", "cfg", {}),  # two calls too
    ],
)
def test_and_combines_the_parts_guidance(flow_bundles, name, scale, fixed):
    """uncond + cfg * sum(w_i (c_i - u)) on the real-CFG families: two equal parts at g are the plain prompt
    at 2g, a part of weight 0.5 at 4 is the plain prompt at 2."""
    bundle = flow_bundles(name)

    def image(prompt, value):
        settings = {**fixed, scale: value}
        return generate_images(bundle, [prompt], negative_prompt="blurry", steps=2, seed=3, **SIZE, **settings)[0]

    doubled = image("a red cat AND a red cat", 2.0)
    assert _close(doubled, image("a red cat", 4.0))
    assert not _close(doubled, image("a red cat", 2.0))
    assert _close(image("a red cat:0.5", 4.0), image("a red cat", 2.0))
    if name != "flux":  # without CFG the pipeline runs no negative: sdcore runs it, as A1111 always has one
        assert _close(image("a red cat AND a red cat", 1.0), image("a red cat", 2.0))


def test_and_on_flux_without_true_cfg_is_forges_weighted_sum(flow_bundles):
    """No uncond at distilled guidance (Forge at CFG 1): weights summing to 1 are the weighted mean of the
    parts' predictions, so two halves of one prompt are that prompt."""
    bundle = flow_bundles("flux")

    def image(prompt):
        return generate_images(bundle, [prompt], steps=2, seed=3, cfg=3.5, **SIZE)[0]

    plain = image("a red cat")
    assert _close(image("a red cat:0.5 AND a red cat:0.5"), plain)
    assert _close(image("a red cat:0.25 AND a red cat:0.75"), plain)
    assert not _close(image("a red cat:0.5 AND a blue cat:0.5"), plain)


class _Standin(torch.nn.Module):
    """A transformer whose velocity is its latents plus its text's mean (every row's source shows)."""

    def forward(self, hidden_states, timestep, encoder_hidden_states, pooled_projections=None, guidance=None,
                txt_ids=None, img_ids=None, return_dict=True):  # fmt: skip
        return (hidden_states + encoder_hidden_states.mean(dim=(1, 2)).view(-1, 1, 1),)


def _standin_conditioning(prompts, negatives):
    from sdcore.generate.conditioning import Conditioning
    from sdcore.generate.prompt_editing import StepPrompts
    from sdcore.generate.step_conditioning import StepConditioning

    value = {"a": 1.0, " b": 2.0, " c": 3.0, "d": 4.0, "n1": 10.0, "n2": 20.0, "": 0.0}

    def encode(texts, negative_texts):
        def cond(items):
            return Conditioning(torch.stack([torch.full((2, 3), value[t]) for t in items]), torch.zeros(len(items), 1))

        return cond(texts), cond(negative_texts)

    return StepConditioning(StepPrompts.build(prompts, negatives, 4), encode), value


def test_split_cfg_combination_and_forges_sum_on_a_standin():
    """Flux true CFG's two calls (prompt, then negative), the pipeline combining neg + s * (pos - neg): the
    result is u + s * sum(w_i (c_i - u)) per image. Without true CFG the output is Forge's sum(w_i * x0_i)
    (x0 = x - t * v) read back as a velocity."""
    from sdcore.generate.step_conditioning import FluxSlots

    per_call, value = _standin_conditioning(["a AND b:0.5 AND c:-1", "d"], ["n1", "n2"])
    model = _Standin()
    latents = torch.randn(2, 4, 3)
    timestep = torch.tensor([0.6, 0.6])
    base = {"hidden_states": latents, "timestep": timestep, "pooled_projections": torch.zeros(2, 1),
            "txt_ids": torch.zeros(2, 3), "img_ids": torch.zeros(4, 3), "return_dict": False}  # fmt: skip
    scale = 3.0
    with per_call.installed(model, FluxSlots(split=True)):
        pos = model(**base, encoder_hidden_states=torch.zeros(2, 2, 3))[0]
        neg = model(**base, encoder_hidden_states=torch.zeros(2, 2, 3))[0]
    final = neg + scale * (pos - neg)
    u = [latents[0] + value["n1"], latents[1] + value["n2"]]
    first = u[0] + scale * sum(w * (latents[0] + value[t] - u[0]) for t, w in [("a", 1), (" b", 0.5), (" c", -1)])
    torch.testing.assert_close(final[0], first)
    torch.testing.assert_close(final[1], u[1] + scale * (latents[1] + value["d"] - u[1]))

    forge, value = _standin_conditioning(["a:0.5 AND b:2", "d"], ["", ""])
    with forge.installed(model, FluxSlots(zero_uncond=True)):
        out = model(**base, encoder_hidden_states=torch.zeros(2, 2, 3))[0]
    x0 = [latents[0] - 0.6 * (latents[0] + value[t]) for t in ("a", " b")]
    denoised = 0.5 * x0[0] + 2 * x0[1]  # Forge: the parts' weighted mean times the weights' sum, uncond 0
    torch.testing.assert_close(out[0], (latents[0] - denoised) / 0.6)
    torch.testing.assert_close(out[1], latents[1] + value["d"])  # one part of weight 1: the plain prediction


def test_a_sampler_with_one_call_per_image_keeps_each_images_conditioning(flow_bundles):
    """euler_a renders each image in its own pipeline call: the batch's edits and AND parts follow their
    image, which is the image its prompt renders alone (seed + index)."""
    bundle = flow_bundles("chroma")
    prompts = ["a [cat:dog:1] x", "a hat AND a [red|blue] cap:0.5"]
    settings = {"steps": 3, "cfg": 2.0, "sampler": "euler_a", **SIZE}
    batch = generate_images(bundle, prompts, negative_prompt="[ugly::1]", seed=6, **settings)
    for index, prompt in enumerate(prompts):
        alone = generate_images(bundle, [prompt], negative_prompt="[ugly::1]", seed=6 + index, **settings)[0]
        assert np.array_equal(np.asarray(batch[index]), np.asarray(alone))
