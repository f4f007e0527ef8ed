"""kohya's ``--weighted_captions``: A1111 emphasis in training captions scales those tokens'
text-encoder hidden states (kohya's ``encode_tokens_with_weights``: multiplied, the mean not
restored, BOS/EOS/padding at 1.0, the pooled SDXL embedding unweighted), on the tiny models."""

from __future__ import annotations

import re

import pytest
import torch
from runtime_methods import ConvOutMethod
from sdcore.generate.prompt_syntax import parse_emphasis, parse_kohya_emphasis
from sdcore.models.text import encode_prompts, weighted_input_ids
from sdcore.models.tiny import create_tiny_bundle
from sdcore.testing.contract import contract_options, make_tiny_dataset
from sdcore.train import kohya
from sdcore.train.caption_checks import caption_family_problems
from sdcore.train.loop import TrainSession
from sdcore.train.options import TrainOptions
from sdcore.train.preflight import option_problems

# kohya's parse_prompt_attention (library/strategy_base.py), re-written from its source
_KOHYA_ATTENTION = re.compile(
    r"\\\(|\\\)|\\\[|\\]|\\\\|\\|\(|\[|:([+-]?[.\d]+)\)|\)|]|[^\\()\[\]:]+|:",
)


def kohya_parse(text: str) -> list[list]:
    res: list[list] = []
    rounds: list[int] = []
    squares: list[int] = []

    def scale(start: int, factor: float) -> None:
        for item in res[start:]:
            item[1] *= factor

    for m in _KOHYA_ATTENTION.finditer(text):
        token, weight = m.group(0), m.group(1)
        if token.startswith("\\"):
            res.append([token[1:], 1.0])
        elif token == "(":
            rounds.append(len(res))
        elif token == "[":
            squares.append(len(res))
        elif weight is not None and rounds:
            scale(rounds.pop(), float(weight))
        elif token == ")" and rounds:
            scale(rounds.pop(), 1.1)
        elif token == "]" and squares:
            scale(squares.pop(), 1 / 1.1)
        else:
            res.append([token, 1.0])
    for start in rounds:
        scale(start, 1.1)
    for start in squares:
        scale(start, 1 / 1.1)
    if not res:
        res = [["", 1.0]]
    i = 0
    while i + 1 < len(res):
        if res[i][1] == res[i + 1][1]:
            res[i][0] += res[i + 1][0]
            res.pop(i + 1)
        else:
            i += 1
    return res


CAPTIONS = [
    "1girl, solo",
    "a (red:1.3) circle, [blue] sky",
    "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
    "(unbalanced, tags",
    "stray) bracket], here",
    r"\(literal\] brackets",
    "(red:1.5), BREAK, (blue:0.5)",  # kohya knows no BREAK: plain text in training captions
    "([mixed:0.5]), (a)(b)",
    # kohya's weighted close is ':' digits ')' with nothing between (library/strategy_base.py:35 at
    # 48d368f): a space after the colon or before the bracket leaves the weight as text at 1.1,
    # where A1111's generation parser (and sdcore generate) reads 1.3
    "a (red: 1.3) circle",
    "a (red:1.3 ) circle, (blue : 0.5)",
    "[(nested: 2)], ((deep:2) )",
    "trailing backslash \\",
    "(x:1.3)) stray, (y:1e-1)",
]


@pytest.mark.parametrize("caption", CAPTIONS)
def test_caption_parsing_equals_kohya(caption):
    ours = [[chunk.text, chunk.weight] for chunk in parse_kohya_emphasis(caption)]
    want = kohya_parse(caption)
    assert [t for t, _ in ours] == [t for t, _ in want]
    assert [w for _, w in ours] == pytest.approx([w for _, w in want], rel=1e-12)


def test_generation_keeps_a1111_spaces_around_the_weight():
    """Generation keeps A1111's rule (modules/prompt_parser.py re_attention allows spaces): only
    training captions follow kohya."""
    assert parse_emphasis("a (red: 1.3 ) circle") == [("a ", 1.0), ("red", 1.3), (" circle", 1.0)]


def _kohya_ids_and_weights(tokenizer, caption: str, chunks: int) -> tuple[list[list[int]], list[list[float]]]:
    """kohya's weighted tokenization (library/strategy_base.py:174-210 at 48d368f): each parsed run
    tokenized alone without BOS/EOS, the weight copied per token, cut at 75 per chunk, each chunk
    BOS + tokens + EOS + padding with BOS/EOS/padding at 1.0."""
    tokens: list[int] = []
    weights: list[float] = []
    for text, weight in kohya_parse(caption):
        ids = tokenizer(text).input_ids[1:-1]
        tokens += ids
        weights += [weight] * len(ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out_ids, out_weights = [], []
    for index in range(chunks):
        part, part_w = tokens[index * 75 : (index + 1) * 75], weights[index * 75 : (index + 1) * 75]
        out_ids.append([tokenizer.bos_token_id, *part, tokenizer.eos_token_id] + [pad] * (75 - len(part)))
        out_weights.append([1.0, *part_w, 1.0] + [1.0] * (75 - len(part_w)))
    return out_ids, out_weights


@pytest.mark.parametrize("caption", CAPTIONS)
def test_training_tokens_and_weights_equal_kohya(bundles, caption):
    tokenizer = bundles["sd1"].tokenizers[0]
    ids, weights = weighted_input_ids(tokenizer, [caption], chunks=1)
    want_ids, want_weights = _kohya_ids_and_weights(tokenizer, caption, 1)
    assert ids[0].tolist() == want_ids
    torch.testing.assert_close(weights[0], torch.tensor(want_weights), rtol=1e-6, atol=0)


@pytest.fixture(scope="module")
def bundles():
    return {f: create_tiny_bundle(f) for f in ("sd1", "sdxl")}


def _expected_weights(tokenizer, runs: list[tuple[str, float]], chunks: int) -> torch.Tensor:
    """Per-position weights ``[chunks * 77]`` written from kohya's rule: each run's tokens carry its
    weight, BOS/EOS/padding 1.0, 75 tokens per chunk."""
    weights: list[float] = []
    for text, weight in runs:
        weights += [weight] * len(tokenizer(text, add_special_tokens=False).input_ids)
    out = torch.ones(chunks, 77)
    for index in range(chunks):
        part = weights[index * 75 : (index + 1) * 75]
        out[index, 1 : 1 + len(part)] = torch.tensor(part)
    return out.reshape(-1)


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_sd1_weighted_caption_is_the_unweighted_states_times_the_weights(bundles, clip_skip):
    b = bundles["sd1"]
    weighted = "a (red:1.5) circle, [blue] sky"
    plain = "a red circle, blue sky"
    with torch.no_grad():
        got = encode_prompts(b, [weighted, plain], clip_skip=clip_skip, weighted=True).hidden_states
        base = encode_prompts(b, [plain], clip_skip=clip_skip).hidden_states[0]
    w = _expected_weights(
        b.tokenizers[0], [("a ", 1.0), ("red", 1.5), (" circle, ", 1.0), ("blue", 1 / 1.1), (" sky", 1.0)], 1
    )
    assert (w != 1.0).sum() == 2  # the two emphasised tokens, nothing else
    torch.testing.assert_close(got[0], base * w[:, None], rtol=1e-6, atol=1e-6)
    assert torch.equal(got[1], base)  # a caption without emphasis: bit for bit the plain encoding
    # (the formula has no mean restoration: A1111's would rescale every position by mean ratio,
    # about 1.6 here, and fail the comparison above)
    ratio = float(base.mean() / (base * w[:, None]).mean())
    assert abs(ratio - 1) > 0.01


def test_sd1_weights_reach_the_second_chunk(bundles):
    b = bundles["sd1"]
    filler = ", ".join(["cat"] * 40)  # 79 tokens: the emphasised word lands in chunk 2
    weighted, plain = f"{filler}, (dog:2.0), sky", f"{filler}, dog, sky"
    with torch.no_grad():
        got = encode_prompts(b, [weighted], weighted=True).hidden_states[0]
        base = encode_prompts(b, [plain]).hidden_states[0]
    assert got.shape[0] == 2 * 77
    w = _expected_weights(b.tokenizers[0], [(f"{filler}, ", 1.0), ("dog", 2.0), (", sky", 1.0)], 2)
    assert int(torch.nonzero(w != 1.0)[0]) > 77
    torch.testing.assert_close(got, base * w[:, None], rtol=1e-6, atol=1e-6)


def test_sdxl_weights_each_tower_and_leaves_the_pool(bundles):
    b = bundles["sdxl"]
    weighted, plain = "a (red:1.5) circle, [[blue]] sky", "a red circle, blue sky"
    with torch.no_grad():
        got = encode_prompts(b, [weighted], weighted=True)
        base = encode_prompts(b, [plain])
    runs = [("a ", 1.0), ("red", 1.5), (" circle, ", 1.0), ("blue", 1 / 1.1 / 1.1), (" sky", 1.0)]
    w1 = _expected_weights(b.tokenizers[0], runs, 1)
    w2 = _expected_weights(b.tokenizers[1], runs, 1)
    width1 = b.text_encoders[0].config.hidden_size
    want = torch.cat(
        [base.hidden_states[0, :, :width1] * w1[:, None], base.hidden_states[0, :, width1:] * w2[:, None]], -1
    )
    torch.testing.assert_close(got.hidden_states[0], want, rtol=1e-6, atol=1e-6)
    assert torch.equal(got.pooled, base.pooled)


def _session(tmp_path, caption, **kw):
    data = make_tiny_dataset(tmp_path / "w", n=2)
    for image in (data / "1_tiny").glob("*.png"):
        image.with_suffix(".txt").write_text(caption, encoding="utf-8")
    o = contract_options(ConvOutMethod, tmp_path, {"data": str(data), "max_steps": 1, **kw})
    s = TrainSession(ConvOutMethod(o), bundle=create_tiny_bundle("sd1"))
    s.setup()
    return s


@pytest.mark.parametrize("cache", [True, False])
def test_training_conditioning_reads_the_emphasis_cached_or_not(tmp_path, cache):
    caption = "a (red:1.5) circle"
    s = _session(tmp_path, caption, weighted_captions=True, cache_text_encoder_outputs=cache)
    assert (s.text_cache is not None) == cache
    batch = s.make_batch(s.data.epoch_plan(0)[0])
    assert batch.captions[0] == caption
    cond = batch.conditioning if cache else s.method.encode(s.bundle, batch.captions)
    with torch.no_grad():
        want = encode_prompts(s.bundle, [caption], weighted=True).hidden_states
        unweighted = encode_prompts(s.bundle, [caption]).hidden_states
    torch.testing.assert_close(cond.hidden_states[:1].float(), want, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(want, unweighted)  # the cache keys on the weighted prompt's encoding


def test_option_off_leaves_the_encoding_bit_identical(tmp_path):
    caption = "a (red:1.5) circle"
    off = _session(tmp_path / "off", caption, cache_text_encoder_outputs=False)
    on = _session(tmp_path / "on", "a red circle", weighted_captions=True, cache_text_encoder_outputs=False)
    with torch.no_grad():
        plain = off.method.encode(off.bundle, [caption]).hidden_states
        assert torch.equal(plain, encode_prompts(off.bundle, [caption]).hidden_states)  # brackets are text when off
        # on, a caption without emphasis encodes exactly as with the option off
        assert torch.equal(
            on.method.encode(on.bundle, ["a red circle"]).hidden_states,
            off.method.encode(off.bundle, ["a red circle"]).hidden_states,
        )


class OwnEncodeMethod(ConvOutMethod):
    def encode(self, bundle, captions):
        return super().encode(bundle, captions)


def test_preflight_refuses_where_kohya_refuses():
    o = TrainOptions(model="m", data="d", output="o", weighted_captions=True)
    assert caption_family_problems(o, "sd1") == [] and caption_family_problems(o, "sdxl") == []
    for family in ("sd3", "flux"):
        (problem,) = caption_family_problems(o, family)
        assert "--weighted-captions" in problem and "SD1, SD2 and SDXL" in problem
    assert caption_family_problems(TrainOptions(), "flux") == []
    method = OwnEncodeMethod(contract_options_for_own())
    assert any("encodes captions its own way" in p for p in option_problems(o, method))


def contract_options_for_own():
    from runtime_methods import ConvOutOptions

    return ConvOutOptions(model="m", data="d", output="o", weighted_captions=True)


def test_kohya_flag_translates():
    present = [f.name for f in __import__("dataclasses").fields(TrainOptions)]
    out = kohya.translate({"weighted_captions": True}, present, where="cfg")
    assert not out.problems and out.values == {"weighted_captions": True}
    assert "weighted_captions" not in kohya.UNSUPPORTED
    assert kohya.translate({"weighted_captions": False}, present, where="cfg").values == {"weighted_captions": False}


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_apply_t5_attn_mask_without_t5_is_a_problem(tmp_path, family):
    # sweep2: `train lora --model tiny:sd1 --apply-t5-attn-mask` trained as without it, in silence, while
    # --apply-lg-attn-mask on sd1 was refused
    options = TrainOptions(data=str(tmp_path), output=str(tmp_path / "o.safetensors"), apply_t5_attn_mask=True)
    (problem,) = caption_family_problems(options, family)
    assert problem.startswith("--apply-t5-attn-mask masks the padding of a T5-XXL encoder") and "drop it" in problem
    assert caption_family_problems(options, "flux") == []
