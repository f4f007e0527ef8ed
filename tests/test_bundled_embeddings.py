"""A LoRA's bundled embeddings (OneTrainer's ``bundle_emb.*`` keys) in generation, as A1111 1.7+ reads them
(extensions-builtin/Lora/networks.py ``load_network``/``load_networks``): the word works while the LoRA is in the
prompt, a folder embedding of that name wins, the LoRA's weight does not matter, "TI hashes" names the LoRA."""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "packages" / "sdplugin-lora" / "tests"))

from lora_testutil import fresh_bundle, random_network
from safetensors.torch import save_file
from sdcore.generate.session import NetworkSession
from sdplugin_lora.apply import LoraHandler
from sdplugin_ti.apply import EmbeddingHandler, short_hash
from sdplugin_ti.embedding import CLIP_G, CLIP_L, SINGLE, Embedding
from sdplugin_ti.formats import save_embedding

PROMPT = "a photo of mychar, standing"


def _vectors(n: int, width: int, seed: int) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed)) * 0.5


def _lora(bundle, path: Path, bundled: dict[str, torch.Tensor]) -> Path:
    """A UNet-only LoRA (so the text encoder output depends on the embedding alone) with OneTrainer's bundle keys."""
    state = {k: v.contiguous() for k, v in random_network(bundle, text_encoder=False, conv_rank=0).state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({**state, **bundled}, str(path))
    return path


def _hidden(bundle, prompt: str) -> list[torch.Tensor]:
    """The text encoders' output for ``prompt`` as the family's generation encodes it (SD3/FLUX.1: CLIP and T5)."""
    from sdcore.models.family import family_adapter

    cond = family_adapter(bundle.family).encode_prompts(bundle, [prompt])
    return [cond.hidden_states] + ([cond.pooled] if getattr(cond, "pooled", None) is not None else [])


def _as_normal_embedding(family: str, tmp_path: Path, emb: Embedding) -> list[torch.Tensor]:
    """The text-encoder output for PROMPT with ``emb`` loaded as a normal embedding file."""
    bundle = fresh_bundle(family)
    save_embedding(emb, tmp_path / "ref" / f"{emb.name}.pt")
    act = EmbeddingHandler(tmp_path / "ref").activate(bundle, [], PROMPT, "")
    try:
        return _hidden(bundle, act.prompt)
    finally:
        act.undo()


def _session(loras: Path, embeddings: Path | None) -> NetworkSession:
    handlers: dict = {"lora": LoraHandler(loras)}
    if embeddings is not None:
        handlers[None] = [EmbeddingHandler(embeddings)]
    return NetworkSession(handlers)


@pytest.mark.parametrize(
    ("family", "keys"),
    [
        ("sd1", {"bundle_emb.mychar.string_to_param.*": _vectors(2, 32, 1)}),  # A1111 layout, older OneTrainer
        ("sd1", {"bundle_emb.mychar.clip_l": _vectors(2, 32, 1)}),  # newer OneTrainer's SD1 spelling
        ("sdxl", {"bundle_emb.mychar.clip_l": _vectors(2, 32, 1), "bundle_emb.mychar.clip_g": _vectors(2, 64, 2)}),
    ],
)
def test_bundled_word_equals_the_same_vectors_as_an_embedding_file(tmp_path, family, keys):
    bundle = fresh_bundle(family)
    _lora(bundle, tmp_path / "loras" / "pivot.safetensors", keys)
    (tmp_path / "emb").mkdir()
    vectors = {(SINGLE if k.endswith((".*", ".clip_l")) and family == "sd1" else k.rsplit(".", 1)[1]): v
               for k, v in keys.items()}  # fmt: skip
    expected = _as_normal_embedding(family, tmp_path, Embedding("mychar", vectors))
    plain = _hidden(bundle, PROMPT)
    session = _session(tmp_path / "loras", tmp_path / "emb")
    tokens = len(bundle.tokenizers[0])
    with session.apply(bundle, "<lora:pivot:0> " + PROMPT) as applied:  # weight 0: the embedding still applies
        ours = _hidden(bundle, applied.prompt)
        assert applied.info["TI hashes"] == "mychar: pivot"  # A1111: BundledTIHash(<the LoRA's prompt name>)
    for a, b in zip(ours, expected, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(ours[0], plain[0])
    # the LoRA left the prompt: the word is plain text again, tokens and tables gone
    assert len(bundle.tokenizers[0]) == tokens
    with session.apply(bundle, PROMPT) as applied:
        assert applied.prompt == PROMPT and "TI hashes" not in applied.info
        assert torch.equal(_hidden(bundle, applied.prompt)[0], plain[0])


def _said(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_a_folder_embedding_of_that_name_wins_and_the_first_lora_wins(tmp_path, caplog):
    """A1111 load_networks: 'Skip bundle embedding: "x" as it was already loaded from embeddings folder'; a second
    LoRA bundling a name the first registered is skipped by the same test."""
    bundle = fresh_bundle("sd1")
    _lora(bundle, tmp_path / "loras" / "a.safetensors", {"bundle_emb.mychar.string_to_param.*": _vectors(2, 32, 1)})
    _lora(bundle, tmp_path / "loras" / "b.safetensors", {"bundle_emb.mychar.string_to_param.*": _vectors(2, 32, 7)})
    folder = Embedding("mychar", {SINGLE: _vectors(1, 32, 9)})
    save_embedding(folder, tmp_path / "emb" / "mychar.pt")
    with caplog.at_level(logging.WARNING, logger="sdplugin_ti"):
        with _session(tmp_path / "loras", tmp_path / "emb").apply(bundle, "<lora:a> " + PROMPT) as applied:
            ours = _hidden(bundle, applied.prompt)
            assert applied.info["TI hashes"] == f"mychar: {short_hash(tmp_path / 'emb' / 'mychar.pt')}"
    assert torch.equal(ours[0], _as_normal_embedding("sd1", tmp_path, folder)[0])
    assert any("embeddings folder" in line for line in _said(caplog))

    (tmp_path / "emb" / "mychar.pt").unlink()
    first = _as_normal_embedding("sd1", tmp_path, Embedding("mychar", {SINGLE: _vectors(2, 32, 1)}))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sdplugin_ti"):
        with _session(tmp_path / "loras", tmp_path / "emb").apply(bundle, "<lora:a> <lora:b> " + PROMPT) as applied:
            ours = _hidden(bundle, applied.prompt)
            assert applied.info["TI hashes"] == "mychar: a"
    assert torch.equal(ours[0], first[0])
    assert any("'mychar' skipped" in line and "earlier in the prompt" in line for line in _said(caplog))


def test_without_the_ti_plugin_the_lora_applies_and_says_once(tmp_path, caplog):
    bundle = fresh_bundle("sd1")
    _lora(bundle, tmp_path / "loras" / "pivot.safetensors", {"bundle_emb.mychar.string_to_param.*": _vectors(2, 32, 1)})
    session = _session(tmp_path / "loras", None)
    before = {k: v.clone() for k, v in bundle.unet.state_dict().items()}
    with caplog.at_level(logging.WARNING, logger="sdcore"):
        for _ in range(2):
            with session.apply(bundle, "<lora:pivot> " + PROMPT) as applied:
                assert applied.prompt.strip() == PROMPT
                changed = any(not torch.equal(v, before[k]) for k, v in bundle.unet.state_dict().items())
                assert changed  # the LoRA's weights are applied
    said = [r for r in caplog.records if "carries the embedding" in r.getMessage()]
    assert len(said) == 1
    message = said[0].getMessage()
    assert "'mychar'" in message and "pivot" in message and "textual inversion" in message
    assert said[0].name == "sdcore.generate.session"  # the CLI prints it as its warning ("warning: ...")


def test_the_pre_load_check_knows_bundled_words(tmp_path):
    bundle = fresh_bundle("sd1")
    _lora(bundle, tmp_path / "loras" / "pivot.safetensors", {"bundle_emb.mychar.string_to_param.*": _vectors(2, 32, 1)})
    _lora(bundle, tmp_path / "loras" / "plain.safetensors", {})
    (tmp_path / "emb").mkdir()
    session = _session(tmp_path / "loras", tmp_path / "emb")
    assert session.check([("<lora:pivot> a photo of embedding:mychar", "")]) == []
    problems = session.check([("<lora:plain> a photo of embedding:mychar", "")])
    assert len(problems) == 1 and "embedding:mychar" in problems[0]
    # the same words with a LoRA that bundles the name and with one that does not: the second still fails
    problems = session.check(
        [("<lora:pivot> a photo of embedding:mychar", ""), ("<lora:plain> a photo of embedding:mychar", "")]
    )
    assert len(problems) == 1 and "embedding:mychar" in problems[0]


def test_lora_info_lists_the_bundled_embeddings(tmp_path):
    from sdplugin_lora.format import match_modules  # noqa: F401  (the loader no longer calls them unmatched)
    from sdplugin_lora.tools import lora_info

    bundle = fresh_bundle("sdxl")
    path = _lora(
        bundle,
        tmp_path / "pivot.safetensors",
        {
            "bundle_emb.my char.clip_l": _vectors(3, 32, 1),
            "bundle_emb.my char.clip_g": _vectors(3, 64, 2),
            "bundle_emb.my char.clip_l_out": _vectors(1, 32, 3),
        },
    )
    (found,) = lora_info(path)["embeddings"]
    assert found["name"] == "my char" and found["vectors"] == 3
    assert found["encoders"] == [CLIP_L, CLIP_G]
    assert "clip_l 32" in found["description"] and "clip_g 64" in found["description"]


def test_a_merge_says_the_bundled_embeddings_are_left_out(tmp_path):
    """Merging keeps module weights only: the embeddings would silently stop answering to their word."""
    from sdplugin_lora.apply import LoraWarning
    from sdplugin_lora.format import read_lora
    from sdplugin_lora.tools import merge_into_model, merge_loras

    bundle = fresh_bundle("sd1")
    path = _lora(bundle, tmp_path / "pivot.safetensors", {"bundle_emb.mychar.string_to_param.*": _vectors(2, 32, 1)})
    plain = _lora(bundle, tmp_path / "plain.safetensors", {})
    with pytest.warns(LoraWarning, match=r"pivot\.safetensors: its bundled embedding 'mychar' is not in the merged"):
        assert merge_into_model(bundle, [(path, 1.0)]) > 0
    with pytest.warns(LoraWarning, match=r"'mychar' is not in the merged LoRA"):
        merge_loras([(read_lora(path), 1.0)])
    with warnings.catch_warnings():
        warnings.simplefilter("error", LoraWarning)  # a file without a bundle merges without a word
        merge_into_model(fresh_bundle("sd1"), [(plain, 1.0)])


@pytest.mark.parametrize(("family", "t5"), [("sd1", False), ("sd3", False), ("flux", True), ("chroma", False)])
def test_a_pivotal_lora_trained_here_gives_its_word_in_generate(tmp_path, family, t5):
    """End to end: ``sdcore train lora --embedding tiny:2:...`` writes the bundle; ``<lora:NAME> ... tiny`` in
    generation gives the text encoders' output the run's own ``load_result`` gives for the expanded caption (the
    LoRA's text-encoder part and the two trained vectors both), and the plain word without the LoRA does not.
    SD3 (T5's vectors written untrained), FLUX.1 (trained with --embedding-t5) and Chroma (T5 only) too."""
    from sdcore.testing.contract import _bundle, contract_options
    from sdcore.train.loop import train
    from sdplugin_lora.method import LoraMethod

    values = {"embedding": ("tiny:2:red stripes",), "rank": 4, "lr": 1e-2, "embedding_lr": 5e-2, "max_steps": 3,
              "save_state": False, "save_dtype": "fp32", "embedding_t5": t5}  # fmt: skip
    options = contract_options(LoraMethod, tmp_path / "run", values, family=family)
    result = train(LoraMethod(options), bundle=_bundle(family))
    loras = tmp_path / "loras"
    loras.mkdir()
    (loras / "pivot.safetensors").write_bytes(Path(result.output).read_bytes())

    loader, loaded = LoraMethod(options), _bundle(family)
    loader.load_result(loaded, result.output)
    for module in loaded.components().values():
        module.eval()
    expected = _hidden(loaded, loader.caption_for("a photo of tiny", is_class=False, rng=None))

    bundle = _bundle(family)
    for module in bundle.components().values():
        module.eval()
    plain = _hidden(bundle, "a photo of tiny")
    (tmp_path / "emb").mkdir()
    with _session(loras, tmp_path / "emb").apply(bundle, "<lora:pivot> a photo of tiny") as applied:
        ours = _hidden(bundle, applied.prompt)
        assert applied.info["TI hashes"] == "tiny: pivot"
    for got, want in zip(ours, expected, strict=True):  # hidden states (and FLUX.1/SD3's pooled vector)
        assert torch.allclose(got, want, atol=1e-5), float((got - want).abs().max())
    assert not torch.allclose(ours[0], plain[0], atol=1e-3)


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_flow_family_bundles_apply_as_their_embedding_files(tmp_path, family):
    """OneTrainer's FLUX.1 (``clip_l`` + ``t5``) and SD3 (``clip_l`` + ``clip_g`` + ``t5``) bundles: the word gives
    the text encoders' output the same vectors give as a normal embedding file (sdcore's SD3/FLUX.1 TI format)."""
    bundle = fresh_bundle(family)
    widths = {"clip_l": bundle.text_encoders[0].get_input_embeddings().weight.shape[1]}
    if family == "sd3":
        widths["clip_g"] = bundle.text_encoders[1].get_input_embeddings().weight.shape[1]
    widths["t5"] = bundle.text_encoders[-1].get_input_embeddings().weight.shape[1]
    vectors = {part: _vectors(2, width, seed) for seed, (part, width) in enumerate(widths.items(), start=1)}
    _lora(bundle, tmp_path / "loras" / "pivot.safetensors", {f"bundle_emb.mychar.{p}": v for p, v in vectors.items()})
    (tmp_path / "emb").mkdir()
    expected = _as_normal_embedding(family, tmp_path, Embedding("mychar", dict(vectors)))
    plain = _hidden(bundle, PROMPT)
    with _session(tmp_path / "loras", tmp_path / "emb").apply(bundle, "<lora:pivot> " + PROMPT) as applied:
        ours = _hidden(bundle, applied.prompt)
        assert applied.info["TI hashes"] == "mychar: pivot"
    for a, b in zip(ours, expected, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(ours[0], plain[0])


def test_embedding_files_in_generate_equal_the_bundled_lora(tmp_path):
    """End to end: the same run with the embeddings bundled and with ``--embedding-files``; ``<lora:pivot> a photo
    of tiny`` with the bundled LoRA gives the text encoder's output that the files-run's LoRA gives with its
    ``NAME_embeddings`` folder as the embeddings folder (``--embeddings-dir``): the file is the same embedding."""
    from sdcore.testing.contract import _bundle, contract_options
    from sdcore.train.loop import train
    from sdplugin_lora.method import LoraMethod

    values = {"embedding": ("tiny:2:red stripes",), "rank": 4, "lr": 1e-2, "embedding_lr": 5e-2, "max_steps": 2,
              "save_state": False, "save_dtype": "fp32", "train_text_encoder": True}  # fmt: skip
    outputs = {}
    for tag, extra in (("bundled", {}), ("files", {"embedding_files": True})):
        options = contract_options(LoraMethod, tmp_path / tag, {**values, **extra}, family="sd1")
        result = Path(train(LoraMethod(options), bundle=_bundle("sd1")).output)
        loras = tmp_path / tag / "loras"
        loras.mkdir()
        (loras / "pivot.safetensors").write_bytes(result.read_bytes())
        embeddings = result.parent / f"{result.name}_embeddings"
        if tag == "bundled":
            assert not embeddings.exists()
            embeddings = tmp_path / tag / "emb"
            embeddings.mkdir()
        else:
            assert sorted(p.name for p in embeddings.iterdir()) == ["tiny.safetensors"]
        bundle = _bundle("sd1")
        for module in bundle.components().values():
            module.eval()
        with _session(loras, embeddings).apply(bundle, "<lora:pivot> a photo of tiny") as applied:
            outputs[tag] = _hidden(bundle, applied.prompt)
            hashes = applied.info["TI hashes"]
        outputs[tag + " plain"] = _hidden(bundle, "a photo of tiny")
        assert hashes == ("tiny: pivot" if tag == "bundled" else f"tiny: {short_hash(embeddings / 'tiny.safetensors')}")
    assert torch.equal(outputs["files"][0], outputs["bundled"][0])
    assert not torch.allclose(outputs["files"][0], outputs["files plain"][0], atol=1e-3)
