"""--cache-text-encoder-outputs-to-disk: a later run with the same encoders and settings reads the
encodings instead of running the text encoders; anything that changes an encoding makes it encode again."""

from __future__ import annotations

import dataclasses

import pytest

torch = pytest.importorskip("torch")

from runtime_methods import ConvOutMethod, ProjOutMethod  # noqa: E402
from sdcore.models.load import load_model  # noqa: E402
from sdcore.testing.contract import contract_options, make_tiny_dataset  # noqa: E402
from sdcore.train.loop import TrainSession  # noqa: E402
from sdcore.train.text_store import read_store, write_store  # noqa: E402


def _count_encoder_calls(bundle):
    calls = {"n": 0}
    for te in bundle.text_encoders:
        original = te.forward

        def counting(*a, _original=original, **k):
            calls["n"] += 1
            return _original(*a, **k)

        te.forward = counting
    return calls


def create_tiny_bundle(family):
    return load_model(f"tiny:{family}")


def _session(method_class, options, family):
    s = TrainSession(method_class(options), bundle=create_tiny_bundle(family))
    s.setup()
    return s


def _store_files(folder):
    return sorted(folder.rglob("sdcore_text_*.safetensors"))


@pytest.mark.parametrize(("method_class", "family"), [(ConvOutMethod, "sdxl"), (ProjOutMethod, "flux")])
def test_a_second_run_reads_every_encoding_and_gets_the_same_conditioning(tmp_path, method_class, family):
    data = make_tiny_dataset(tmp_path / "data", n=3)
    extra = {"flux": {"apply_t5_attn_mask": True, "t5xxl_max_token_length": 16}}.get(family, {})
    o = contract_options(
        method_class,
        tmp_path,
        {"data": str(data), "max_steps": 1, "cache_text_encoder_outputs_to_disk": True, "shuffle_caption": True,
         **extra},
        family=family,
    )  # fmt: skip
    first = _session(method_class, o, family)
    assert first.text_cache.reused == 0 and first.text_cache.encoded > 3  # shuffled variants
    files = _store_files(data)
    assert len(files) == 1 and files[0].parent == data / "1_tiny"

    bundle = create_tiny_bundle(family)
    calls = _count_encoder_calls(bundle)
    second = TrainSession(method_class(o), bundle=bundle)
    second.setup()
    assert second.text_cache.encoded == 0 and second.text_cache.reused == first.text_cache.encoded
    # the text encoders ran only for the empty prompt and the probe, never once per caption
    from sdcore.train.text_store import PROBE_PROMPTS

    per_prompt = len(bundle.text_encoders)
    assert calls["n"] == per_prompt * (1 + len(PROBE_PROMPTS))
    prompts = sorted(first.text_cache.encodings)
    a, b = first.text_cache.batch(prompts), second.text_cache.batch(prompts)
    assert torch.equal(a.hidden_states, b.hidden_states)
    assert (a.pooled is None) == (b.pooled is None) and (a.pooled is None or torch.equal(a.pooled, b.pooled))
    assert a.extra.keys() == b.extra.keys() and all(torch.equal(a.extra[k], b.extra[k]) for k in a.extra)
    if family == "flux":
        assert a.extra  # the T5 attention mask travels through the file


def test_a_setting_that_changes_encodings_makes_a_new_file_and_encodes_again(tmp_path):
    data = make_tiny_dataset(tmp_path / "data", n=2)
    base = {"data": str(data), "max_steps": 1, "cache_text_encoder_outputs_to_disk": True}
    o = contract_options(ConvOutMethod, tmp_path, base, family="sd1")
    _session(ConvOutMethod, o, "sd1")
    # clip skip 2 takes another layer: the probe differs, so the old file is not read
    other = _session(ConvOutMethod, dataclasses.replace(o, clip_skip=2), "sd1")
    assert other.text_cache.reused == 0 and other.text_cache.encoded == 2
    assert len(_store_files(data)) == 2
    # another model (same shapes, other weights) is told apart the same way
    bundle = create_tiny_bundle("sd1")
    with torch.no_grad():
        bundle.text_encoders[0].get_input_embeddings().weight.mul_(1.01)
    changed = TrainSession(ConvOutMethod(o), bundle=bundle)
    changed.setup()
    assert changed.text_cache.reused == 0


def test_new_captions_encode_only_what_is_new_and_the_file_keeps_this_runs_prompts(tmp_path):
    data = make_tiny_dataset(tmp_path / "data", n=3)
    o = contract_options(
        ConvOutMethod, tmp_path, {"data": str(data), "max_steps": 1, "cache_text_encoder_outputs_to_disk": True}
    )
    first = _session(ConvOutMethod, o, "sd1")
    (data / "1_tiny" / "img00.txt").write_text("an edited caption", encoding="utf-8")
    second = _session(ConvOutMethod, o, "sd1")
    assert second.text_cache.encoded == 1 and second.text_cache.reused == 2
    from safetensors import safe_open

    with safe_open(str(_store_files(data)[0]), framework="pt") as handle:
        import json

        stored = set(json.loads(handle.metadata()["prompts"]).values())
    assert stored == set(second.text_cache.encodings) and stored != set(first.text_cache.encodings)


def test_a_damaged_or_foreign_store_is_encoded_again_and_rewritten(tmp_path):
    data = make_tiny_dataset(tmp_path / "data", n=2)
    o = contract_options(
        ConvOutMethod, tmp_path, {"data": str(data), "max_steps": 1, "cache_text_encoder_outputs_to_disk": True}
    )
    _session(ConvOutMethod, o, "sd1")
    path = _store_files(data)[0]
    path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    again = _session(ConvOutMethod, o, "sd1")
    assert again.text_cache.encoded == 2 and again.text_cache.reused == 0
    assert read_store(path, path.stem.split("_")[-1], {"x"}) == {}  # a digest prefix is not the digest
    third = _session(ConvOutMethod, o, "sd1")
    assert third.text_cache.reused == 2


def test_cache_dir_holds_the_store_and_the_mode_follows_the_umask(tmp_path):
    import os

    data = make_tiny_dataset(tmp_path / "data", n=2)
    cache = tmp_path / "cache"
    o = contract_options(
        ConvOutMethod,
        tmp_path,
        {"data": str(data), "max_steps": 1, "cache_text_encoder_outputs_to_disk": True, "cache_dir": str(cache)},
    )
    old = os.umask(0o027)
    try:
        _session(ConvOutMethod, o, "sd1")
    finally:
        os.umask(old)
    assert not _store_files(data) and len(files := _store_files(cache)) == 1
    assert files[0].stat().st_mode & 0o777 == 0o640
    assert not list(cache.rglob("*.tmp"))


def test_write_and_read_round_trip_keeps_dtypes_and_skips_absent_prompts(tmp_path):
    from sdcore.train.method import Conditioning

    cond = Conditioning(
        torch.randn(1, 5, 3).to(torch.bfloat16), torch.randn(1, 4), {"mask": torch.tensor([[1, 1, 0, 0, 0]])}
    )
    path = tmp_path / "s.safetensors"
    write_store(path, "d" * 64, {"a prompt": cond})
    got = read_store(path, "d" * 64, {"a prompt", "another"})
    assert set(got) == {"a prompt"}
    back = got["a prompt"]
    assert back.hidden_states.dtype == torch.bfloat16 and torch.equal(back.hidden_states, cond.hidden_states)
    assert torch.equal(back.pooled, cond.pooled) and torch.equal(back.extra["mask"], cond.extra["mask"])
    assert read_store(path, "e" * 64, {"a prompt"}) == {}


def test_preflight_needs_the_cache_itself():
    from runtime_methods import ConvOutOptions
    from sdcore.train.preflight import option_problems

    options = ConvOutOptions(
        model="m", data="d", output="o", cache_text_encoder_outputs=False, cache_text_encoder_outputs_to_disk=True
    )
    assert "--cache-text-encoder-outputs-to-disk needs --cache-text-encoder-outputs" in option_problems(options)
