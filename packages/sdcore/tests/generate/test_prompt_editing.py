"""A1111 prompt editing and alternation: the schedules, and which conditioning each UNet call receives."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sdcore.generate.conditioning import encode_cond_uncond
from sdcore.generate.pipeline import generate_images
from sdcore.generate.prompt_editing import StepPrompts, prompt_schedule, text_at_call

# Behaviour of A1111's get_learned_conditioning_prompt_schedules (modules/prompt_parser.py, 10 steps, no
# hires pass), from its documented examples and grammar.
A1111_SCHEDULES = {
    "test": [(10, "test")],
    "a [b:3]": [(3, "a "), (10, "a b")],
    "a [b: 3]": [(3, "a "), (10, "a b")],
    "a [[[b]]:2]": [(2, "a "), (10, "a [[b]]")],
    "[(a:2):3]": [(3, ""), (10, "(a:2)")],
    "a [b : c : 1] d": [(1, "a b  d"), (10, "a  c  d")],
    "a[b:[c:d:2]:1]e": [(1, "abe"), (2, "ace"), (10, "ade")],
    "a [unbalanced": [(10, "a [unbalanced")],
    "a [b:.5] c": [(5, "a  c"), (10, "a b c")],
    "((a][:b:c [d:3]": [(3, "((a][:b:c "), (10, "((a][:b:c d")],
    "[a|(b:1.1)]": [(i, "a" if i % 2 else "(b:1.1)") for i in range(1, 11)],
    "[fe|]male": [(i, "female" if i % 2 else "male") for i in range(1, 11)],
    "[fe|||]male": [(i, "female" if i % 4 == 1 else "male") for i in range(1, 11)],
}


@pytest.mark.parametrize(("prompt", "expected"), list(A1111_SCHEDULES.items()))
def test_schedules_as_a1111(prompt, expected):
    assert prompt_schedule(prompt, 10) == expected


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("[cat:dog:0.25]", [(5, "cat"), (20, "dog")]),  # a decimal point: a fraction of the steps
        ("[cat:dog:1.0]", [(20, "cat")]),  # the whole run
        ("[cat:dog:1]", [(1, "cat"), (20, "dog")]),  # no decimal point: an absolute step
        ("[cat:dog:99]", [(20, "cat")]),  # capped at the steps
        ("[cat:dog:0]", [(20, "dog")]),  # step 0 adds no entry: 'to' throughout
        ("[cat:dog:-3]", [(20, "dog")]),
        ("[cat:dog:1e1]", [(10, "cat"), (20, "dog")]),  # no '.': absolute
        ("[cat::.5], photo", [(10, "cat, photo"), (20, ", photo")]),
        ("\\[cat:dog:5\\]", [(20, "\\[cat:dog:5\\]")]),  # escaped brackets are text
        ("(a [red:blue:10] car:1.2)", [(10, "(a red car:1.2)"), (20, "(a blue car:1.2)")]),
        ("a|b [c:d:5]", [(20, "a|b [c:d:5]")]),  # '|' outside brackets: A1111's parser gives up
        ("[a (b:c:d) e:f:5]", [(20, "[a (b:c:d) e:f:5]")]),  # invalid inside a group: all literal
    ],
)
def test_when_values_nesting_and_literal_text(prompt, expected):
    assert prompt_schedule(prompt, 20) == expected


# A1111's grammar (modules/prompt_parser.py:25 at 28bd8e1, the plain rule) reads a backslash only as ``\\.``,
# an escape of one character other than a line break; a lone one at the end or before a line break fails the
# whole parse, and get_learned_conditioning_prompt_schedules (:130) then returns the prompt as written for
# every step.
@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("a [b:c:5] \\", [(20, "a [b:c:5] \\")]),
        ("a [b:c:5] \\\nd", [(20, "a [b:c:5] \\\nd")]),
        ("a [b\\\n:c:5]", [(20, "a [b\\\n:c:5]")]),  # inside a group too
        ("(\\\n)[a:b:3]", [(20, "(\\\n)[a:b:3]")]),
        ("\\", [(20, "\\")]),
        # an escaped backslash, or one before any other character (a carriage return too), is text
        ("a [b:c:5] \\\\", [(5, "a b \\\\"), (20, "a c \\\\")]),
        ("a [b:c:5] \\\r\nd", [(5, "a b \\\r\nd"), (20, "a c \\\r\nd")]),
        ("a\\b [b:c:5]", [(5, "a\\b b"), (20, "a\\b c")]),
    ],
)
def test_a_backslash_escaping_nothing_fails_the_parse(prompt, expected):
    assert prompt_schedule(prompt, 20) == expected


def test_each_denoiser_call_reads_the_first_entry_that_has_not_ended():
    schedule = prompt_schedule("[cat:dog:10]", 20)
    texts = [text_at_call(schedule, call) for call in range(23)]
    # calls 0..10 (A1111 counts calls from 0); past the last end the first entry: A1111's reconstruct_cond_batch
    # (modules/prompt_parser.py:293 at 28bd8e1) keeps target_index 0 when no entry has call <= end_at_step
    # (PLMS's last call: sd_samplers_timesteps_impl.plms evaluates twice in its first step, steps + 1 calls)
    assert texts == ["cat"] * 11 + ["dog"] * 10 + ["cat"] * 2
    alternating = prompt_schedule("[cat|dog]", 4)
    assert [text_at_call(alternating, call) for call in range(6)] == ["cat", "cat", "dog", "cat", "dog", "cat"]


def test_a_batch_encodes_once_per_change():
    edits = StepPrompts.build(["a [cat:dog:2]", "plain"], ["[ugly::3]", ""], 6)
    assert edits.changes and edits.ends == [2, 3, 6]
    assert edits.texts_at(0) == (["a cat", "plain"], ["ugly", ""])
    assert edits.texts_at(3) == (["a dog", "plain"], ["ugly", ""])  # call 3 is the last of [ugly::3]
    assert edits.texts_at(4) == (["a dog", "plain"], ["", ""])
    assert [edits.end_for(call) for call in (0, 2, 3, 4, 6, 7)] == [2, 2, 3, 6, 6, 2]
    assert edits.texts_at(7) == edits.texts_at(0)  # past the end: every schedule's first text, as in A1111
    assert not StepPrompts.build(["(a:1.2) [b]"], [""], 6).changes


@pytest.mark.parametrize(("family", "sampler", "calls_per_step"), [("sd1", "euler", 1), ("sdxl", "heun", 2)])
def test_each_unet_call_gets_its_steps_conditioning(tiny_bundles, family, sampler, calls_per_step):
    bundle = tiny_bundles(family)
    seen: list[tuple[torch.Tensor, torch.Tensor | None]] = []

    def record(module, args, kwargs):  # runs after the pipeline's own pre-hook (which goes first)
        added = kwargs.get("added_cond_kwargs") or {}
        seen.append((kwargs["encoder_hidden_states"].clone(), added.get("text_embeds")))

    handle = bundle.unet.register_forward_pre_hook(record, with_kwargs=True)
    try:
        edited = generate_images(
            bundle, ["a [cat:dog:1] x"], negative_prompt="[ugly|bad]", steps=3, seed=2, sampler=sampler
        )[0]
    finally:
        handle.remove()
    assert len(seen) == (3 if calls_per_step == 1 else 5)  # Heun: two calls per step, one for the last step
    texts = {name: encode_cond_uncond(bundle, [p], [n]) for name, p, n in [
        ("cat-ugly", "a cat x", "ugly"), ("dog-ugly", "a dog x", "ugly"), ("dog-bad", "a dog x", "bad"),
    ]}  # fmt: skip
    # call 0 and 1 read step 1 ("cat", alternation's first option), call 2 reads step 2, then step 3; Heun's
    # schedule is over twice the steps (A1111's total_steps of a second-order sampler): call 4 reads step 4
    expected = ["cat-ugly", "cat-ugly", "dog-bad", "dog-ugly", "dog-bad"][: len(seen)]
    for (states, pooled), name in zip(seen, expected, strict=True):
        cond, uncond = texts[name]
        torch.testing.assert_close(states, torch.cat([uncond.embeds, cond.embeds]).to(states))
        if family == "sdxl":
            torch.testing.assert_close(pooled, torch.cat([uncond.pooled, cond.pooled]).to(pooled))
    static = generate_images(bundle, ["a cat x"], negative_prompt="ugly", steps=3, seed=2, sampler=sampler)[0]
    assert not np.array_equal(np.asarray(edited), np.asarray(static))
    # the hook is gone afterwards: the same static prompt renders the same image again
    again = generate_images(bundle, ["a cat x"], negative_prompt="ugly", steps=3, seed=2, sampler=sampler)[0]
    assert np.array_equal(np.asarray(static), np.asarray(again))


def test_an_edit_after_the_last_step_is_the_plain_prompt(sd1):
    """[cat:dog:N] with N >= steps never switches: the image is the plain "cat" image, bit for bit."""
    plain = generate_images(sd1, ["a cat"], steps=3, seed=4)[0]
    never = generate_images(sd1, ["a [cat:dog:3]"], steps=3, seed=4)[0]
    assert np.array_equal(np.asarray(plain), np.asarray(never))


@pytest.mark.parametrize(
    ("prompt", "parts"),
    [
        # A1111 modules/prompt_parser.py get_multicond_prompt_list: split at \bAND\b, a trailing ':number' weighs
        ("a cat AND a dog:0.5", [("a cat", 1.0), (" a dog", 0.5)]),
        ("a cat:1.5", [("a cat", 1.5)]),  # without AND too
        ("a (cat:1.5)", [("a (cat:1.5)", 1.0)]),  # emphasis, not a weight
        ("ANDROID AND_X", [("ANDROID AND_X", 1.0)]),
        ("a cat AND", [("a cat", 1.0), ("", 1.0)]),
        # A1111's re_weight (modules/prompt_parser.py:207 at 28bd8e1, "^((?:\s|.)*?)...") crosses line breaks:
        # a multi-line part keeps its weight
        ("two\nlines:2", [("two\nlines", 2.0)]),
        ("a cat,\nsitting AND a hat,\non a chair : 0.5\n", [("a cat,\nsitting", 1.0), (" a hat,\non a chair", 0.5)]),
        ("[cat:dog:5] AND hat : -0.5", [("[cat:dog:5]", 1.0), (" hat", -0.5)]),
    ],
)
def test_and_splits_the_prompt_into_weighted_parts(prompt, parts):
    from sdcore.generate.prompt_editing import composable_parts

    assert composable_parts(prompt) == parts


def _close(a, b):
    return np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max() <= 2


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_and_combines_the_parts_guidance(tiny_bundles, family):
    """u + cfg * sum(w_i (c_i - u)): two equal parts at cfg 4 are the plain prompt at cfg 8, a part of
    weight 0.5 at cfg 8 is the plain prompt at cfg 4, and without guidance (cfg 1: the pipeline has no
    negative half, sdcore runs it) two equal parts are the plain prompt at cfg 2."""
    bundle = tiny_bundles(family)

    def image(prompt, cfg):
        return generate_images(bundle, [prompt], negative_prompt="blurry", steps=2, seed=3, cfg=cfg)[0]

    doubled = image("a red cat AND a red cat", 4.0)
    assert _close(doubled, image("a red cat", 8.0))
    assert not _close(doubled, image("a red cat", 4.0))
    assert _close(image("a red cat:0.5", 8.0), image("a red cat", 4.0))
    assert _close(image("a red cat AND a red cat", 1.0), image("a red cat", 2.0))


def test_and_composition_maps_parts_to_their_images():
    """Two images, the first with three parts: each image's guided output is u + sum(w (c - u)), computed
    with a stand-in UNet whose output is its conditioning's mean (so every row's source shows)."""
    from sdcore.generate.conditioning import Conditioning
    from sdcore.generate.step_conditioning import StepConditioning, UnetSlots, output_tensor

    edits = StepPrompts.build(["a AND b:0.5 AND c:-1", "d"], ["n1", "n2"], 4)
    value = {"a": 1.0, " b": 2.0, " c": 3.0, "d": 4.0, "n1": 10.0, "n2": 20.0}

    def encode(texts, negatives):
        def cond(items):
            return Conditioning(torch.stack([torch.full((2, 3), value[t]) for t in items]))

        return cond(texts), cond(negatives)

    per_call = StepConditioning(edits, encode)

    def unet(sample, timestep, *, encoder_hidden_states, return_dict=False, **kwargs):
        return (sample + encoder_hidden_states.mean(dim=(1, 2)).view(-1, 1, 1, 1),)

    sample = torch.zeros(4, 1, 2, 2)  # [uncond x2, cond x2]
    kwargs = {"encoder_hidden_states": torch.cat([torch.full((2, 2, 3), 10.0), torch.full((2, 2, 3), 1.0)])}
    kwargs["encoder_hidden_states"][1] = 20.0
    kwargs["encoder_hidden_states"][3] = 4.0
    output = unet(sample, 0, **kwargs)
    slots = UnetSlots()
    named = slots.arguments((sample, 0), kwargs)
    combined = per_call._compose(unet, slots, named, output_tensor(output), call=0, guided=True)
    expected_first = 10 + (1 - 10) + 0.5 * (2 - 10) - 1 * (3 - 10)
    assert combined[:2, 0, 0, 0].tolist() == [10.0, 20.0]  # the negative half is kept
    assert combined[2, 0, 0, 0].item() == pytest.approx(expected_first)
    assert combined[3, 0, 0, 0].item() == pytest.approx(4.0)  # one part of weight 1: the plain prediction


def test_second_order_samplers_schedule_over_twice_the_steps():
    """A1111 builds a second-order sampler's schedules over 2 * steps (sd_samplers_kdiffusion "second_order",
    processing.py total_steps), so [cat:dog:0.5] switches halfway through its model calls."""
    from types import SimpleNamespace

    from sdcore.generate.prompt_editing import schedule_steps

    heun, euler = SimpleNamespace(order=2), SimpleNamespace(order=1)
    assert schedule_steps(4, heun) == 8 and schedule_steps(4, euler) == 4 and schedule_steps(4, None) == 4
    halfway = prompt_schedule("[cat:dog:0.5]", schedule_steps(4, heun))
    assert [text_at_call(halfway, call) for call in range(7)] == ["cat"] * 5 + ["dog"] * 2  # Heun: 7 calls
