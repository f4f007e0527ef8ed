"""An SDXL embedding as ``sdcore train ti`` writes it loads in diffusers by the route diffusers documents for SDXL
(``load_textual_inversion`` docs, "load from SDXL"): the file's ``clip_l`` tensor into ``text_encoder``/``tokenizer``
and its ``clip_g`` tensor into ``text_encoder_2``/``tokenizer_2``, each with ``token=``. The files are written by the
trainer's own writer (``TIMethod.write``: the ``.pt`` plus the ``--format`` extra) with known vectors, in every
layout it writes: the ``.safetensors`` (read with ``safetensors.torch.load_file``, as the docs do), the ``.pt`` and
the ``.bin`` (``torch.load``; for SDXL both hold the same two keys, no A1111 ``string_to_param``). That one step of
``train ti`` on SDXL writes these keys and widths is ``test_method.test_sdxl_one_step_writes_clip_l_and_clip_g``.

One difference: sdcore (as A1111 and ComfyUI) lets an embedding's name be a word CLIP knows (``tiny`` here is one);
diffusers refuses a ``token`` already in the vocabulary, so such a file is loaded under another token (``<tiny>``)
and the prompt says that token."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from sdcore.models.text import encode_prompts
from sdcore.models.tiny import create_tiny_bundle
from sdcore.models.tokenizer import OPENCLIP_PAD_TOKEN, bundled_clip_tokenizer
from sdcore.testing.contract import contract_options
from sdplugin_ti.apply import apply_embeddings
from sdplugin_ti.embedding import CLIP_G, CLIP_L, Embedding
from sdplugin_ti.formats import load_embedding
from sdplugin_ti.method import TIMethod

NAME = "tiny"  # a word CLIP knows, as the trainer's contract runs name their embedding
TOKEN = "<tiny>"  # diffusers' token for it: "tiny" is in CLIP's vocabulary
PROMPT = "a photo of {}, standing in a field"


def _vectors(n: int, width: int, seed: int) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed)) * 0.5


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ``tiny.pt`` (and ``tiny.safetensors``, ``tiny.bin`` beside it) the trainer's writer writes for a 2-vector
    SDXL embedding at step 1, as ``sdcore train ti --name tiny --format safetensors`` would."""
    folder = tmp_path_factory.mktemp("ti")
    emb = Embedding(NAME, {CLIP_L: _vectors(2, 32, 1), CLIP_G: _vectors(2, 64, 2)})
    emb.step = 1
    emb.metadata = {"sdcore.method": "ti", "sdcore.family": "sdxl"}
    for fmt in ("safetensors", "bin"):
        options = contract_options(TIMethod, folder, {"name": NAME, "vectors": 2, "format": fmt}, family="sdxl")
        primary = TIMethod(options).write(emb, folder, NAME)
    return primary


@pytest.fixture(scope="module")
def bundle() -> Any:
    """The tiny SDXL, made once and left as made: diffusers gets copies of its encoders."""
    return create_tiny_bundle("sdxl")


@pytest.fixture(scope="module")
def ours(written: Path) -> tuple[Any, Any]:
    """What sdcore computes for the prompt without the embedding and with it (loaded from the ``.safetensors``; each
    layout's vectors are checked equal to these), on a tiny SDXL of its own: removing an embedding rebuilds the
    tokenizers (a second or more here), and nothing else uses this one."""
    model = create_tiny_bundle("sdxl")
    reference = encode_prompts(model, [PROMPT.format(NAME)])
    handle = apply_embeddings(model, [load_embedding(written.with_suffix(".safetensors"))])
    return reference, encode_prompts(model, [handle.expand(PROMPT.format(NAME))])


def _read(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    data: dict[str, Any] = torch.load(path, weights_only=True)
    return data


def _diffusers_sdxl(bundle: Any) -> Any:
    """A diffusers SDXL pipeline over copies of the tiny bundle's encoders (diffusers grows what it loads into)."""
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(
        vae=bundle.vae,
        text_encoder=copy.deepcopy(bundle.text_encoders[0]),
        text_encoder_2=copy.deepcopy(bundle.text_encoders[1]),
        tokenizer=bundled_clip_tokenizer(),
        tokenizer_2=bundled_clip_tokenizer(pad_token=OPENCLIP_PAD_TOKEN),
        unet=bundle.unet,
        scheduler=bundle.noise_scheduler,
    )


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".bin"])
def test_sdxl_embedding_loads_by_diffusers_documented_route(
    written: Path, bundle: Any, ours: tuple[Any, Any], suffix: str
) -> None:
    path = written.with_suffix(suffix)
    state = _read(path)
    assert sorted(state) == ["clip_g", "clip_l"]  # what the documented route indexes, nothing else
    assert state["clip_l"].shape == (2, 32) and state["clip_g"].shape == (2, 64)  # tiny SDXL: CLIP-L 32, CLIP-G 64
    emb = load_embedding(path)
    assert emb.name == NAME  # the file's stem
    assert emb.step == (1 if suffix == ".safetensors" else None)  # the SDXL .pt/.bin have the two tensors only
    assert torch.equal(emb.vectors[CLIP_L], state["clip_l"]) and torch.equal(emb.vectors[CLIP_G], state["clip_g"])
    assert torch.equal(state["clip_l"], _vectors(2, 32, 1)) and torch.equal(state["clip_g"], _vectors(2, 64, 2))

    pipe = _diffusers_sdxl(bundle)
    with pytest.raises(ValueError, match="Token tiny already in tokenizer vocabulary"):
        pipe.load_textual_inversion(
            state["clip_l"], token=NAME, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer
        )
    # diffusers' docs: load_textual_inversion(state_dict["clip_l"], token=..., text_encoder=pipe.text_encoder,
    # tokenizer=pipe.tokenizer), and clip_g with text_encoder_2 / tokenizer_2
    pipe.load_textual_inversion(state["clip_l"], token=TOKEN, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(
        state["clip_g"], token=TOKEN, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2
    )
    for tokenizer, encoder, key in (
        (pipe.tokenizer, pipe.text_encoder, "clip_l"),
        (pipe.tokenizer_2, pipe.text_encoder_2, "clip_g"),
    ):
        ids = tokenizer.convert_tokens_to_ids([TOKEN, f"{TOKEN}_1"])  # diffusers names vector i "<token>_i"
        assert ids == [49408, 49409]  # appended after CLIP's 49408 tokens
        rows = encoder.get_input_embeddings().weight[ids]
        assert torch.equal(rows, state[key].float()), key  # bit for bit: the file's vectors, no rescaling
    theirs, _, theirs_pooled, _ = pipe.encode_prompt(
        PROMPT.format(TOKEN), device="cpu", do_classifier_free_guidance=False
    )

    reference, cond = ours
    assert cond.hidden_states.shape == theirs.shape == (1, 77, 32 + 64)
    torch.testing.assert_close(cond.hidden_states, theirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cond.pooled, theirs_pooled, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(cond.hidden_states, reference.hidden_states, atol=1e-3)  # the embedding changed it


def test_legacy_clip_config_pools_differently_in_diffusers(written: Path, bundle: Any) -> None:
    """CLIP configs written before transformers PR #24773 say ``eos_token_id: 2``: in the SDXL base 1.0 diffusers
    folder both encoders' do, ``text_encoder_2``'s (OpenCLIP bigG, the only source of SDXL's pooled vector) too.
    transformers then pools at ``argmax(input_ids)``, which is a new token once one is in the prompt. diffusers
    pools there (at the embedding's last vector); sdcore pools at end-of-text, as for a prompt without the
    embedding (``sdcore.models._token_table.pool_at_eos``). The prompt embeddings still match."""
    from safetensors.torch import load_file

    state = load_file(str(written.with_suffix(".safetensors")))
    bundle = copy.deepcopy(bundle)  # its encoders get a legacy config here, and sdcore's embedding
    for encoder in bundle.text_encoders:  # as loaded from such a config (the module that pools keeps a copy)
        encoder.config.eos_token_id = 2
        pooling = [m for m in encoder.modules() if getattr(m, "eos_token_id", None) == 49407]
        assert pooling
        for module in pooling:
            module.eos_token_id = 2
    pipe = _diffusers_sdxl(bundle)
    pipe.load_textual_inversion(state["clip_l"], token=TOKEN, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(
        state["clip_g"], token=TOKEN, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2
    )
    prompt = PROMPT.format(TOKEN)
    theirs, _, theirs_pooled, _ = pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
    handle = apply_embeddings(bundle, [load_embedding(written)])
    cond = encode_prompts(bundle, [handle.expand(PROMPT.format(NAME))])
    torch.testing.assert_close(cond.hidden_states, theirs, rtol=1e-5, atol=1e-5)

    ids = pipe.tokenizer_2(pipe.maybe_convert_prompt(prompt, pipe.tokenizer_2), return_tensors="pt").input_ids
    assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 49408, 49409, 267]  # <bos> a photo of <tiny> <tiny>_1 ,
    with torch.no_grad():
        last = pipe.text_encoder_2(ids.repeat(1, 1)).last_hidden_state[0]  # final layer norm applied
        projection = pipe.text_encoder_2.text_projection
        at_vector, at_eos = projection(last[5]), projection(last[int((ids[0] == 49407).nonzero()[0])])
    torch.testing.assert_close(theirs_pooled[0], at_vector, rtol=1e-5, atol=1e-5)  # diffusers: at <tiny>_1
    torch.testing.assert_close(cond.pooled[0], at_eos, rtol=1e-5, atol=1e-5)  # sdcore: at end-of-text
    assert not torch.allclose(theirs_pooled, cond.pooled, atol=1e-3)
