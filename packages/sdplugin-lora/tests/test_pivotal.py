"""Pivotal tuning (``--embedding NAME:TOKENS:INIT_TEXT``): new embeddings trained with the LoRA and bundled in its
file as current OneTrainer writes them (``bundle_emb.NAME.clip_l`` for SD1/SD2, ``.clip_l``/``.clip_g`` for SDXL;
A1111 1.7+ reads them), resumable, with their own rate and stop, and loaded back with the LoRA."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from sdcore.errors import ConfigError
from sdcore.testing.contract import (
    _bundle,
    check_learning,
    check_resume,
    contract_options,
    plugin_manager_with,
)
from sdcore.train.loop import train
from sdplugin_lora.format import parse_state_dict
from sdplugin_lora.method import LoraMethod, LoraOptions
from sdplugin_lora.pivotal import EmbeddingSpec, parse_spec, parse_specs

# every caption of the contract dataset starts with "tiny, "
SPEC = "tiny:2:red stripes"


class _Watch:
    """The embedding vectors after every optimizer step."""

    def __init__(self, method: LoraMethod) -> None:
        self.method = method
        self.vectors: dict[int, dict[str, torch.Tensor]] = {}

    def sdcore_on_train_step(self, context, step, logs):
        assert self.method.pivotal is not None
        self.vectors[step] = self.method.pivotal.state_dict()


def _start(bundle) -> dict[str, torch.Tensor]:
    """SPEC's starting vectors by bundle key: the init text's rows, cut to 2 tokens on CLIP-L encoders only."""
    from sdcore.models.token_embeddings import init_rows
    from sdplugin_lora.pivotal import family_keys

    keys = family_keys(bundle.family)
    kinds = [e.kind for e in bundle.family_spec.text_encoders]
    return {
        key: init_rows(encoder, tokenizer, "red stripes", 2, cut=kind == "clip-l")
        for encoder, tokenizer, key, kind in zip(bundle.text_encoders, bundle.tokenizers, keys, kinds, strict=True)
    }


def _run(tmp_path, family="sd1", **overrides):
    values = {"embedding": (SPEC,), "rank": 4, "lr": 1e-2, "max_steps": 3, "save_state": False, **overrides}
    method = LoraMethod(contract_options(LoraMethod, tmp_path, values, family=family))
    bundle = _bundle(family)
    start = _start(bundle)
    watch = _Watch(method)
    result = train(method, bundle=bundle, plugin_manager=plugin_manager_with(watch))
    return method, watch, result, start


def test_parse_spec_defaults_and_errors():
    assert parse_spec("sks") == EmbeddingSpec("sks", 1, "*")
    assert parse_spec("sks:3") == EmbeddingSpec("sks", 3, "*")
    assert parse_spec("<embedding>:2:a photo: of a dog") == EmbeddingSpec("<embedding>", 2, "a photo: of a dog")
    assert parse_spec("sks:2:") == EmbeddingSpec("sks", 2, "")
    for bad, why in (("", "name is empty"), ("sks:two", "not a whole number"), ("sks:0", "1 to 75"),
                     ("a.b:1", "may not contain '.'")):  # fmt: skip
        with pytest.raises(ConfigError, match=why):
            parse_spec(bad)
    with pytest.raises(ConfigError, match="one is part of the other"):
        parse_specs(["sks", "sks2"])
    with pytest.raises(ConfigError, match="given twice"):
        parse_specs(["sks", "sks:2"])


def test_options_without_embedding_and_bad_family(tmp_path):
    o = contract_options(LoraMethod, tmp_path, {"embedding_lr": 1e-3})
    with pytest.raises(ConfigError, match="--embedding-lr applies to --embedding vectors"):
        LoraMethod(o).validate()
    o = contract_options(LoraMethod, tmp_path, {"embedding_t5": True})
    with pytest.raises(ConfigError, match=r"^--embedding-t5 applies to --embedding vectors; this run trains none$"):
        LoraMethod(o).validate()
    method = LoraMethod(contract_options(LoraMethod, tmp_path, {"embedding": ("sks",)}))
    assert [method.family_problems(f) for f in ("sd1", "sdxl", "sd3", "flux", "chroma")] == [[]] * 5
    assert (
        "--embedding on sdxl-refiner: sdcore trains and bundles new embeddings for SD1, SD2, SDXL, SD3/SD3.5, "
        "FLUX.1 and Chroma (OneTrainer's bundle_emb layouts)"
    ) in method.family_problems("sdxl-refiner")
    t5 = LoraMethod(contract_options(LoraMethod, tmp_path, {"embedding": ("sks",), "embedding_t5": True}))
    assert [t5.family_problems(f) for f in ("sd3", "flux", "chroma")] == [[]] * 3
    assert "--embedding-t5 on sdxl: this model has no T5-XXL text encoder" in t5.family_problems("sdxl")


def test_sd1_run_trains_vectors_and_lora_and_bundles_them(tmp_path):
    method, watch, result, start = _run(tmp_path)
    assert sorted(watch.vectors) == [1, 2, 3]
    key = "sdcore_emb.tiny.clip_l"
    assert not torch.equal(watch.vectors[1][key], start["clip_l"]), "step 1 did not move the vectors"
    assert not torch.equal(watch.vectors[3][key], watch.vectors[2][key]), "step 3 did not move the vectors"
    state = load_file(str(result.output))
    emb = state["bundle_emb.tiny.clip_l"]
    width = _bundle("sd1").text_encoders[0].get_input_embeddings().weight.shape[1]
    assert tuple(emb.shape) == (2, width)
    assert torch.equal(emb, watch.vectors[3][key])  # fp32 save: exactly the trained vectors
    assert not [k for k in state if k.startswith("bundle_emb.") and k != "bundle_emb.tiny.clip_l"]
    ups = [v for k, v in state.items() if k.endswith("lora_up.weight")]
    assert ups and any(torch.count_nonzero(u) for u in ups), "the LoRA did not train"
    with safe_open(str(result.output), framework="pt") as handle:
        meta = handle.metadata()
    assert meta["ss_network_dim"] == "4" and meta["ss_network_module"] == "networks.lora"
    lora = parse_state_dict(state, meta)
    assert lora.embedding_keys == ["bundle_emb.tiny.clip_l"] and not lora.unknown_keys
    assert lora.modules and all(not k.startswith("bundle_emb") for k in lora.modules)
    # the captions' "tiny" became the tokens, and the run left the model's tokenizer as it was
    assert method.caption_for("tiny, red", is_class=False, rng=None) == "<pt0_tiny_0> <pt0_tiny_1>, red"


def test_sdxl_run_bundles_clip_l_and_clip_g(tmp_path):
    _method, _watch, result, start = _run(tmp_path, family="sdxl", max_steps=2)
    state = load_file(str(result.output))
    bundle = _bundle("sdxl")
    widths = [e.get_input_embeddings().weight.shape[1] for e in bundle.text_encoders]
    assert tuple(state["bundle_emb.tiny.clip_l"].shape) == (2, widths[0])
    assert tuple(state["bundle_emb.tiny.clip_g"].shape) == (2, widths[1])
    for key in ("clip_l", "clip_g"):
        assert not torch.equal(state[f"bundle_emb.tiny.{key}"], start[key]), f"{key} vectors did not train"
    assert sorted(parse_state_dict(state).embedding_keys) == ["bundle_emb.tiny.clip_g", "bundle_emb.tiny.clip_l"]


@pytest.mark.parametrize(
    ("family", "t5", "keys", "trained"),
    [
        ("sd3", False, ("clip_l", "clip_g", "t5"), ("clip_l", "clip_g")),
        ("flux", True, ("clip_l", "t5"), ("clip_l", "t5")),
        ("chroma", False, ("t5",), ("t5",)),  # T5 is Chroma's only encoder: it trains without --embedding-t5
    ],
)
def test_dit_runs_bundle_every_encoders_part_as_onetrainer(tmp_path, family, t5, keys, trained):
    """SD3/SD3.5, FLUX.1, Chroma: the parts OneTrainer's StableDiffusion3/Flux/ChromaLoRASaver write, one per loaded
    encoder whether its vectors trained or not; T5's train with --embedding-t5 only (Chroma's always), else they
    are written exactly as they started."""
    method, watch, result, start = _run(tmp_path, family=family, embedding_t5=t5, max_steps=2)
    state = load_file(str(result.output))
    widths = [int(e.get_input_embeddings().weight.shape[1]) for e in _bundle(family).text_encoders]
    assert {k: tuple(v.shape) for k, v in state.items() if k.startswith("bundle_emb.")} == {
        f"bundle_emb.tiny.{key}": (2, width) for key, width in zip(keys, widths, strict=True)
    }
    for key in keys:
        saved = state[f"bundle_emb.tiny.{key}"]
        assert torch.equal(saved, watch.vectors[2][f"sdcore_emb.tiny.{key}"])  # fp32 save: the run's vectors
        if key in trained:
            assert float((saved - start[key]).abs().max()) > 1e-4, f"{key} vectors did not train"
            assert not torch.equal(
                watch.vectors[2][f"sdcore_emb.tiny.{key}"], watch.vectors[1][f"sdcore_emb.tiny.{key}"]
            )
        else:
            assert torch.equal(saved, start[key]), f"untrained {key} vectors moved"
    assert len(method.pivotal.parameters()) == len(trained)  # the optimizer group: the trained tables only
    tables = method.pivotal.rows["tiny"].tables
    assert [tables[i].requires_grad for i in range(len(keys))] == [k in trained for k in keys]
    parsed = parse_state_dict(state)
    assert sorted(parsed.embedding_keys) == sorted(f"bundle_emb.tiny.{k}" for k in keys) and not parsed.unknown_keys
    ups = [v for k, v in state.items() if k.endswith("lora_up.weight")]
    assert ups and any(torch.count_nonzero(u) for u in ups), "the LoRA did not train"
    assert method.caption_for("tiny, red", is_class=False, rng=None) == "<pt0_tiny_0> <pt0_tiny_1>, red"


def test_embedding_lr_zero_leaves_vectors_and_stop_at_freezes_them(tmp_path):
    _m, watch, _r, start = _run(tmp_path / "zero", embedding_lr=0.0, max_steps=2)
    assert torch.equal(watch.vectors[2]["sdcore_emb.tiny.clip_l"], start["clip_l"])
    method, watch, _r, _s = _run(tmp_path / "stop", embedding_stop_at=2, max_steps=4)
    v = {s: watch.vectors[s]["sdcore_emb.tiny.clip_l"] for s in watch.vectors}
    assert not torch.equal(v[2], v[1]), "step 2 (<= --embedding-stop-at) trains the vectors"
    assert torch.equal(v[3], v[2]) and torch.equal(v[4], v[2]), "frozen after --embedding-stop-at"
    assert all(not p.requires_grad and p.grad is None for p in method.pivotal.parameters())


@pytest.mark.parametrize(
    ("family", "extra", "steps"),
    [("sd1", {"embedding_stop_at": 3}, 4), ("flux", {"embedding_t5": True}, 2), ("sd3", {}, 2)],
)
def test_resume_continues_exactly(tmp_path, family, extra, steps):
    check_resume(LoraMethod, tmp_path, {"embedding": (SPEC,), "rank": 4, **extra}, family=family, steps=steps)


@pytest.mark.parametrize("family", ["sd1", "flux"])  # FLUX.1: CLIP's vectors averaged, T5's untrained ones not
def test_resume_with_ema_continues_exactly(tmp_path, family):
    check_resume(LoraMethod, tmp_path, {"embedding": ("tiny",), "rank": 4, "ema": True}, family=family, steps=2)


def test_learns(tmp_path):
    """Contract-style: the fixed-noise loss falls with the embedding and LoRA training together."""
    check_learning(LoraMethod, tmp_path, {"embedding": (SPEC,), "rank": 4, "embedding_lr": 5e-2}, steps=25,
                   min_drop=0.1)  # fmt: skip


# --- OneTrainer configs ------------------------------------------------------------------------------------------
def _ot(tmp_path, config, notes=None):
    from sdcore.train.config import load_options

    path = tmp_path / "ot.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    return load_options(LoraOptions, path, notes=notes if notes is not None else [])


BASE = {"training_method": "LORA", "model_type": "STABLE_DIFFUSION_15", "base_model_name": "tiny:sd1",
        "resolution": "64", "learning_rate": 1e-4}  # fmt: skip


def test_onetrainer_additional_embeddings_translate(tmp_path):
    config = {**BASE, "embedding_learning_rate": 3e-3, "additional_embeddings": [
        {"placeholder": "<sks>", "token_count": 2, "initial_embedding_text": "a dog", "stop_training_after": 50,
         "stop_training_after_unit": "STEP", "uuid": "x"},
        {"placeholder": "<style>", "stop_training_after": 50, "stop_training_after_unit": "STEP"},
    ]}  # fmt: skip
    o = _ot(tmp_path, config)
    assert o.embedding == ("<sks>:2:a dog", "<style>:1:*")
    assert (o.embedding_lr, o.embedding_stop_at, o.lr) == (3e-3, 50, 1e-4)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"additional_embeddings": [{"placeholder": "a", "model_name": "a.safetensors"}]}, "model_name"),
        ({"additional_embeddings": [{"placeholder": "a", "train": False}]}, "train"),
        ({"additional_embeddings": [{"placeholder": "a", "is_output_embedding": True}]}, "is_output_embedding"),
        (
            {
                "additional_embeddings": [
                    {"placeholder": "a", "stop_training_after": 3, "stop_training_after_unit": "EPOCH"}
                ]
            },
            "EPOCH",
        ),
        (
            {
                "additional_embeddings": [
                    {"placeholder": "a", "stop_training_after": 3, "stop_training_after_unit": "STEP"},
                    {"placeholder": "b"},
                ]
            },
            "one step count",
        ),
        ({"additional_embeddings": [{"placeholder": "a:b"}]}, "':'"),
    ],
)
def test_onetrainer_refuses_what_it_cannot_do(tmp_path, change, message):
    with pytest.raises(ConfigError, match=message):
        _ot(tmp_path, {**BASE, **change})


@pytest.mark.parametrize(("family", "t5"), [("sd1", False), ("sd3", False), ("flux", True), ("chroma", False)])
def test_load_result_adds_the_bundled_vectors_back(tmp_path, family, t5):
    """save -> load_result on a fresh model: the LoRA and the embeddings, so the captions' names give the trained
    model's outputs (and not the LoRA-only model's)."""
    import dataclasses

    from sdcore.testing.contract import _reference_outputs
    from sdplugin_lora.apply import apply_lora
    from sdplugin_lora.format import read_lora
    from sdplugin_lora.pivotal import family_keys

    options = contract_options(LoraMethod, tmp_path, {"embedding": (SPEC,), "rank": 4, "lr": 1e-2, "max_steps": 3,
                                                      "embedding_lr": 5e-2, "save_state": False, "embedding_t5": t5},
                               family=family)  # fmt: skip
    method, trained = LoraMethod(options), _bundle(family)
    result = train(method, bundle=trained)
    for module in trained.components().values():
        module.eval()
    captions = [method.caption_for(c, is_class=False, rng=None) for c in ("tiny, red stripes", "tiny, blue checks")]
    assert captions[0].startswith("<pt0_tiny_0> <pt0_tiny_1>")
    expected = _reference_outputs(method, trained, captions)

    loader, fresh = LoraMethod(options), _bundle(family)
    loader.load_result(fresh, result.output)
    assert loader.pivotal is not None
    assert [
        loader.caption_for(c, is_class=False, rng=None) for c in ("tiny, red stripes", "tiny, blue checks")
    ] == captions
    got = _reference_outputs(loader, fresh, captions)
    assert torch.allclose(expected, got, atol=1e-4), f"max |diff| {float((expected - got).abs().max()):.3g}"
    saved = load_file(str(result.output))
    for index, key in enumerate(family_keys(family)):
        assert torch.equal(loader.pivotal.rows["tiny"].tables[index], saved[f"bundle_emb.tiny.{key}"]), key
    assert not any(t.requires_grad for t in loader.pivotal.rows["tiny"].tables.values())

    # the LoRA alone (its embeddings' names read as plain text) gives other outputs: the vectors mattered
    lora_only = _bundle(family)
    lora = read_lora(result.output)
    apply_lora(lora_only, dataclasses.replace(lora, embedding_keys=[]), 1.0, strict=True)
    plain = _reference_outputs(loader, lora_only, ["tiny, red stripes", "tiny, blue checks"])
    assert not torch.allclose(expected, plain, atol=1e-4)


def test_load_result_refuses_a_file_without_the_embedding(tmp_path):
    """A file whose bundle lacks an --embedding of the options: a clear mismatch, the bundle left clean."""
    from sdcore.errors import NetworkMismatchError

    _m, _w, result, _s = _run(tmp_path, max_steps=1)
    options = contract_options(LoraMethod, tmp_path / "other", {"embedding": ("other:2",), "rank": 4})
    fresh = _bundle("sd1")
    vocab = len(fresh.tokenizers[0])
    with pytest.raises(NetworkMismatchError, match=r"no bundle_emb\.other\.clip_l"):
        LoraMethod(options).load_result(fresh, result.output)
    assert len(fresh.tokenizers[0]) == vocab


def test_init_rows_cut_only_on_clip_l_encoders():
    """A1111 cuts the init text to TOKENS tokens on CLIP-L (SD1, SDXL's first encoder), not on SD2's OpenCLIP:
    the same rule as textual inversion's init."""
    from sdcore.models.token_embeddings import init_rows
    from sdplugin_lora.pivotal import PivotalEmbeddings

    text = "red stripes and blue checks"
    for family, cuts in (("sd1", [True]), ("sd2", [False]), ("sdxl", [True, False])):
        bundle = _bundle(family)
        pivotal = PivotalEmbeddings([EmbeddingSpec("x", 2, text)])
        expected = [
            init_rows(e, t, text, 2, cut=c)
            for e, t, c in zip(bundle.text_encoders, bundle.tokenizers, cuts, strict=True)
        ]
        pivotal.add(bundle)
        try:
            for index, rows in enumerate(expected):
                assert torch.equal(pivotal.rows["x"].tables[index].detach().cpu(), rows), (family, index)
        finally:
            pivotal.remove()


def _dry_run(tmp_path, monkeypatch, data, *extra, model="tiny:sd1"):
    """``sdcore train lora --dry-run`` with the model load forbidden: the check must come before any model."""
    import sdcore.models.load as load
    from click.testing import CliRunner
    from sdcore.cli import build_cli
    from sdcore.plugins import get_plugin_manager

    def no_load(*args, **kwargs):
        raise AssertionError("the pre-flight must not load the model")

    monkeypatch.setattr(load, "load_model", no_load)
    args = ["train", "lora", "--model", model, "--data", str(data), "--output", str(tmp_path / "out")]
    return CliRunner().invoke(build_cli(get_plugin_manager()), [*args, "--dry-run", *extra])


def _uncaptioned(root, folder, names):
    from PIL import Image

    (root / folder).mkdir(parents=True)
    for name in names:
        Image.new("RGB", (64, 64), (200, 10, 10)).save(root / folder / name)
    return root


def test_no_caption_with_the_name_is_a_problem_before_any_model_loads(tmp_path, monkeypatch):
    """The contract captions read "tiny, ...": --embedding Tiny (the replacement is case-sensitive) would
    never train, said with the other problems at once, exit 2 and no traceback."""
    from sdcore.testing.contract import make_tiny_dataset

    data = make_tiny_dataset(tmp_path / "data", n=2, size=64)
    refused = _dry_run(tmp_path, monkeypatch, data, "--embedding", "Tiny:2", "--rank", "0")
    assert refused.exit_code == 2, refused.output
    assert "--embedding 'Tiny': no caption of the 2 training images contains the name" in refused.output
    assert "--rank must be at least 1" in refused.output  # reported together
    assert "Traceback" not in refused.output
    planned = _dry_run(tmp_path, monkeypatch, data, "--embedding", "tiny:2")
    assert planned.exit_code == 0, planned.output
    assert "no caption" not in planned.output and "no training caption" not in planned.output


def test_dry_run_plans_dit_embeddings_and_refuses_t5_without_t5(tmp_path, monkeypatch):
    """FLUX.1 with --embedding-t5 is planned; --embedding-t5 on SDXL (no T5-XXL) is refused by the pre-flight with
    its one line, before any model loads, exit 2 and no traceback."""
    from sdcore.testing.contract import make_tiny_dataset

    data = make_tiny_dataset(tmp_path / "data", n=2, size=64)
    planned = _dry_run(tmp_path, monkeypatch, data, "--embedding", "tiny:2", "--embedding-t5", model="tiny:flux")
    assert planned.exit_code == 0, planned.output
    refused = _dry_run(tmp_path, monkeypatch, data, "--embedding", "tiny:2", "--embedding-t5", model="tiny:sdxl")
    assert refused.exit_code == 2, refused.output
    assert "--embedding-t5 on sdxl: this model has no T5-XXL text encoder" in refused.output
    assert "Traceback" not in refused.output


def test_some_names_unused_is_a_note(tmp_path, monkeypatch):
    from sdcore.testing.contract import make_tiny_dataset

    data = make_tiny_dataset(tmp_path / "data", n=2, size=64)
    planned = _dry_run(tmp_path, monkeypatch, data, "--embedding", "tiny", "--embedding", "zork", "--embedding", "qux")
    assert planned.exit_code == 0, planned.output
    assert "--embedding 'zork', 'qux': no training caption contains these names" in planned.output
    assert "'tiny'" not in planned.output.split("no training caption")[0].rsplit("\n", 1)[-1]


def test_kohya_class_tokens_and_filename_captions_are_the_captions(tmp_path, monkeypatch):
    """Images without caption files are captioned by their folder's class tokens (kohya), or by their file names
    with --filename-captions: the check reads those captions, as the run does."""
    data = _uncaptioned(tmp_path / "data", "1_zork dog", ["00001-0-a qux cat.png", "00002-0-a qux bird.png"])
    assert _dry_run(tmp_path, monkeypatch, data, "--embedding", "zork").exit_code == 0
    refused = _dry_run(tmp_path, monkeypatch, data, "--embedding", "qux")
    assert refused.exit_code == 2 and "no caption of the 2 training images contains the name" in refused.output
    named = _dry_run(tmp_path, monkeypatch, data, "--embedding", "qux", "--filename-captions", "a1111")
    assert named.exit_code == 0, named.output
    both = _dry_run(
        tmp_path, monkeypatch, data, "--embedding", "qux", "--embedding", "zork", "--filename-captions", "a1111"
    )
    assert both.exit_code == 0 and "--embedding 'zork': no training caption contains this name" in both.output


# --- --cache-text-encoder-outputs: the encoders whose vectors train encode every step -----------------------------
def test_text_cache_keeps_the_rule_encoders_with_training_vectors_run_every_step(tmp_path):
    """As on SDXL (both CLIP encoders hold training vectors: nothing cached), an encoder whose vectors train is
    never cached; FLUX.1's T5 without --embedding-t5 reads constant vectors, so it is cached as for a CLIP-trained
    LoRA (kohya's partial cache) and a step's conditioning is the full encoding's of the expanded captions."""
    from sdcore.train.loop import TrainSession

    def session(family, **extra):
        values = {"embedding": (SPEC,), "rank": 2, "max_steps": 1, "batch_size": 2, "save_state": False,
                  "cache_text_encoder_outputs": True, "t5xxl_max_token_length": 16, **extra}  # fmt: skip
        run = TrainSession(LoraMethod(contract_options(LoraMethod, tmp_path / family, values, family=family)),
                           bundle=_bundle(family))  # fmt: skip
        run.setup()
        return run

    assert session("sdxl").text_cache is None
    assert session("flux", embedding_t5=True).text_cache is None
    assert session("chroma").text_cache is None  # its only encoder holds training vectors
    flux = session("flux")
    assert flux.text_cache is not None and flux.text_cache.partial == ("text_encoder_2",)
    batch = flux.make_batch(flux.data.epoch_plan(0)[0])
    assert batch.conditioning is None and batch.cached_text is not None
    assert all(c.startswith("<pt0_tiny_0> <pt0_tiny_1>") for c in batch.captions)
    with torch.no_grad():
        partial = flux.objective.conditioning_for(batch)
        full = flux.method.encode(flux.bundle, batch.captions)
        plain = flux.method.encode(
            flux.bundle, [c.replace("<pt0_tiny_0> <pt0_tiny_1>", "tiny") for c in batch.captions]
        )
    assert torch.equal(partial.hidden_states, full.hidden_states) and torch.equal(partial.pooled, full.pooled)
    assert not torch.allclose(full.hidden_states, plain.hidden_states)  # T5 reads the tokens' own vectors


def test_text_store_on_disk_is_keyed_by_the_untrained_t5_vectors(tmp_path):
    """--cache-text-encoder-outputs-to-disk: the store's probe prompts hold no embedding token, so the cached T5's
    rows for the tokens are part of its key: a run whose init text differs (same NAME, same captions, other T5
    vectors) encodes afresh and its cached conditioning is its own full encoding; the same spec again reuses."""
    from sdcore.train.loop import TrainSession

    def session(spec, tag):
        values = {"embedding": (spec,), "rank": 2, "max_steps": 1, "batch_size": 2, "save_state": False,
                  "cache_text_encoder_outputs": True, "cache_text_encoder_outputs_to_disk": True,
                  "cache_dir": str(tmp_path / "cache"), "t5xxl_max_token_length": 16}  # fmt: skip
        options = contract_options(LoraMethod, tmp_path, values, family="flux", tag=tag)
        run = TrainSession(LoraMethod(options), bundle=_bundle("flux"))
        run.setup()
        assert run.text_cache is not None and run.text_cache.partial == ("text_encoder_2",)
        return run

    first = session("tiny:2:red stripes", "a")
    assert (first.text_cache.encoded, first.text_cache.reused) == (4, 0)
    other = session("tiny:2:blue checks", "b")
    assert (other.text_cache.encoded, other.text_cache.reused) == (4, 0)  # not the first run's T5 rows
    batch = other.make_batch(other.data.epoch_plan(0)[0])
    with torch.no_grad():
        cached = other.objective.conditioning_for(batch)
        full = other.method.encode(other.bundle, batch.captions)
    assert torch.equal(cached.hidden_states, full.hidden_states)
    again = session("tiny:2:red stripes", "c")
    assert (again.text_cache.encoded, again.text_cache.reused) == (0, 4)


# --- OneTrainer: T5's train_embedding is --embedding-t5 ---------------------------------------------------------
FLUX = {**BASE, "model_type": "FLUX_DEV_1", "base_model_name": "tiny:flux", "output_model_format": "KOHYA_LORA",
        "additional_embeddings": [{"placeholder": "<sks>", "token_count": 2}]}  # fmt: skip


def test_onetrainer_t5_train_embedding_is_embedding_t5(tmp_path):
    """OneTrainer trains every encoder's vectors of an additional embedding by default (train_embedding true):
    FLUX.1's text_encoder_2 (T5) then becomes --embedding-t5; false leaves T5's vectors untrained, as here; a CLIP
    encoder's false, or Chroma's (its T5 is its only encoder), is refused (sdcore always trains those)."""
    assert _ot(tmp_path, FLUX).embedding_t5 is True
    assert _ot(tmp_path, {**FLUX, "text_encoder_2": {"train_embedding": False}}).embedding_t5 is False
    sd3 = {**FLUX, "model_type": "STABLE_DIFFUSION_35", "base_model_name": "tiny:sd3",
           "text_encoder_3": {"train_embedding": False}}  # fmt: skip
    assert _ot(tmp_path, sd3).embedding_t5 is False
    with pytest.raises(ConfigError, match=r"text_encoder\.train_embedding.*every CLIP text encoder"):
        _ot(tmp_path, {**FLUX, "text_encoder": {"train_embedding": False}})
    chroma = {**FLUX, "model_type": "CHROMA_1", "base_model_name": "tiny:chroma"}
    assert _ot(tmp_path, chroma).embedding_t5 is False  # Chroma's lone T5 trains anyway
    with pytest.raises(ConfigError, match=r"text_encoder\.train_embedding.*Chroma's T5"):
        _ot(tmp_path, {**chroma, "text_encoder": {"train_embedding": False}})
    assert _ot(tmp_path, {k: v for k, v in FLUX.items() if k != "additional_embeddings"}).embedding_t5 is False


# --- sample prompts with the partial cache: encoded at caching time as they render ------------------------------
def test_sample_prompts_naming_the_embedding_render_from_t5s_kept_outputs(tmp_path):
    """FLUX.1 with --embedding (T5's vectors untrained), --cache-text-encoder-outputs and a sample prompt holding
    the NAME: T5's part of the sample prompt is kept at caching time for the prompt as it renders (the NAME
    written as its tokens, as the method's sampling context does), so a render takes it from the kept outputs,
    T5 never runs, and the image equals the one rendered with T5 live."""
    import numpy as np
    from PIL import Image
    from sdcore.train.loop import TrainSession
    from sdcore.train.sampling import render_samples

    values = {"embedding": (SPEC,), "rank": 2, "max_steps": 1, "batch_size": 2, "save_state": False,
              "cache_text_encoder_outputs": True, "t5xxl_max_token_length": 16,
              "sample_prompts": "tiny, a red cube", "sample_steps": 2}  # fmt: skip
    run = TrainSession(LoraMethod(contract_options(LoraMethod, tmp_path, values, family="flux")),
                       bundle=_bundle("flux"))  # fmt: skip
    run.setup()
    assert run.text_cache is not None and run.text_cache.partial == ("text_encoder_2",)
    parts = run.text_cache.sample_parts
    assert parts is not None
    assert [key[1] for key in parts.entries] == [("<pt0_tiny_0> <pt0_tiny_1>, a red cube",)]
    t5 = run.bundle.text_encoders[1]
    calls = {"n": 0}
    handle = t5.register_forward_pre_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))

    def render(tag, kept):
        path = render_samples(run.bundle, run.method, run.options, device=run.device, folder=tmp_path / "s", tag=tag,
                              step=0, say=lambda _: None, parts=kept)  # fmt: skip
        assert path is not None
        return np.asarray(Image.open(path).convert("RGB"))

    try:
        kept = render("kept", parts)
        assert calls["n"] == 0  # T5's part came from the caching pass
        live = render("live", None)
        assert calls["n"] > 0  # the reference render ran T5
    finally:
        handle.remove()
    assert np.array_equal(kept, live)


# --- Chroma: which encoders the capabilities name, and who reads them ----------------------------------------------
def test_chroma_lone_t5_runs_every_step_whatever_slots_the_capabilities_name(tmp_path, monkeypatch):
    """A method's capabilities know no family: --embedding without --embedding-t5 names the CLIP slots {1, 2} as
    trained on every family, Chroma too, whose lone T5 (slot 3) is what trains there. Their one reader,
    partial_text_encoders (the run's cache, the --dry-run plan, the memory plan, --debug-dataset), splits a family
    only where another encoder trains beside the cached one: on Chroma it answers the same for the named set and
    the true one (nothing cached apart, T5 runs every step), while on FLUX.1 the same set caches T5."""
    import dataclasses

    from sdcore.testing.contract import make_tiny_dataset
    from sdcore.train.cache import partial_text_encoders
    from sdcore.train.preflight import _estimate_settings

    values = {"embedding": (SPEC,), "cache_text_encoder_outputs": True}
    chroma = contract_options(LoraMethod, tmp_path, values, family="chroma")
    method = LoraMethod(chroma)
    caps = method.capabilities()
    assert caps.trains_text_encoder and caps.trained_text_encoders == frozenset({1, 2})
    true = dataclasses.replace(caps, trained_text_encoders=frozenset({3}))
    assert partial_text_encoders(chroma, caps, "chroma", method) == ()
    assert partial_text_encoders(chroma, true, "chroma", method) == ()
    flux = contract_options(LoraMethod, tmp_path, values, family="flux")
    assert partial_text_encoders(flux, caps, "flux", method) == ("text_encoder_2",)
    _, plan = _estimate_settings(method, chroma, "cpu", "chroma")  # the memory plan: T5 trains, stays on
    assert plan["text_encoder_frozen"] is False and "partial_text_cache" not in plan
    data = make_tiny_dataset(tmp_path / "data", n=2, size=64)
    dry = {family: _dry_run(tmp_path, monkeypatch, data, "--embedding", "tiny:2", "--cache-text-encoder-outputs",
                            model=f"tiny:{family}") for family in ("chroma", "flux")}  # fmt: skip
    assert all(result.exit_code == 0 for result in dry.values()), [r.output for r in dry.values()]
    assert "text-encoder outputs no (the text encoder runs every step)" in dry["chroma"].output
    assert "text-encoder outputs in memory, T5-XXL only" in dry["flux"].output
