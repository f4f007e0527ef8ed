"""A run's sample images encode their prompts as the run encodes its captions: T5's length and attention mask
(``--t5xxl-max-token-length``, ``--apply-t5-attn-mask``) and SD3's CLIP mask (``--apply-lg-attn-mask``).

kohya sd-scripts (48d368f): FLUX.1's ``flux_train_utils.sample_image_inference`` (L201-L247) encodes the
sample prompts with the run's ``FluxTextEncodingStrategy(apply_t5_attn_mask=args.apply_t5_attn_mask)``
(``flux_train_network.py`` L190, ``encode_tokens`` reading that default, ``strategy_flux.py`` L59-L60) and passes
``t5_attn_mask`` to ``denoise`` as the transformer's ``txt_attention_mask`` (L247, L265, L367) when the option is
on; SD3's ``sd3_train_network.py`` (L246-L253) encodes the sample prompts at caching time with
``args.apply_lg_attn_mask, args.apply_t5_attn_mask``, the masks inside the encoders only (its MMDiT takes none,
L344-L356); where kohya re-encodes an SD3 sample prompt live (``sd3_train_utils.py`` L536-L538) its
``Sd3TextEncodingStrategy.encode_tokens`` defaults the masks to False, not to the run's (``strategy_sd3.py``
L75-L76): sdcore follows the cached path, the run's own encoding. A render here must give the denoiser
exactly what the training step gives it for the same text.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from sdcore.train.method import TrainingMethod
from sdcore.train.options import TrainOptions
from sdcore.train.sampling import encode_sample_prompts, render_samples

pytest.importorskip("sdcore.generate.pipeline")

PROMPT = "a red cat"


class _Encoder(TrainingMethod[TrainOptions]):
    """The runtime's default caption encoding (:meth:`TrainingMethod.encode`) and sampling; nothing trains."""

    name = "encoder"
    options_class = TrainOptions


def _bundle(family: str):
    from sdcore.models.flux.adapter import FluxAdapter
    from sdcore.models.sd3.tiny import create_tiny_sd3

    return FluxAdapter().create_tiny(variant="dev", seed=0) if family == "flux" else create_tiny_sd3(seed=1)


def _options(tmp_path: Path, family: str, mask: bool) -> TrainOptions:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPT + "\n", encoding="utf-8")
    masks = {"apply_t5_attn_mask": mask, **({"apply_lg_attn_mask": mask} if family == "sd3" else {})}
    # a T5 length of the run's own (FLUX.1 dev's default is 512, SD3's 256): the samples take it too
    return TrainOptions(sample_prompts=str(prompts), sample_steps=2, sample_cfg=1.0, resolution=32, seed=3,
                        t5xxl_max_token_length=24, **masks)  # fmt: skip


def _denoiser_inputs(bundle, options, folder: Path, memo=None) -> list[dict[str, torch.Tensor | None]]:
    """The text inputs of every transformer call of a sample render (``memo``: from the caching-time encodings)."""
    seen: list[dict[str, torch.Tensor | None]] = []

    def record(module, args, kwargs) -> None:
        joint = kwargs.get("joint_attention_kwargs") or {}
        seen.append({
            "hidden": kwargs["encoder_hidden_states"].detach().clone(),
            "pooled": kwargs["pooled_projections"].detach().clone(),
            "mask": joint["attention_mask"].clone() if "attention_mask" in joint else None,
            "image_tokens": kwargs["hidden_states"].shape[1],
        })  # fmt: skip

    handle = bundle.denoiser.register_forward_pre_hook(record, with_kwargs=True)
    try:
        path = render_samples(bundle, _Encoder(options), options, device=torch.device("cpu"), folder=folder,
                              tag="s", step=0, say=lambda _: None, conditioning=memo)  # fmt: skip
    finally:
        handle.remove()
    assert path is not None and seen
    return seen


@pytest.mark.parametrize("cached", [False, True], ids=["live", "cached"])
@pytest.mark.parametrize("mask", [True, False], ids=["mask", "no-mask"])
@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_a_sample_render_is_conditioned_on_the_training_encoding(tmp_path, family, mask, cached):
    from sdcore.models.flux.adapter import T5_MASK, joint_attention_mask

    bundle = _bundle(family)
    options = _options(tmp_path, family, mask)
    with torch.no_grad():  # the frozen encoders of a training step (or of its text cache)
        trained = _Encoder(options).encode(bundle, [PROMPT])
        other = _Encoder(_options(tmp_path, family, not mask)).encode(bundle, [PROMPT])
    # the masks change the encoding, so an equality below tells the two apart
    assert trained.hidden_states.shape[1] == 24 + (77 if family == "sd3" else 0)  # SD3: CLIP-L/G's 77 tokens first
    assert not torch.equal(trained.hidden_states, other.hidden_states)
    memo = encode_sample_prompts(bundle, options, device=torch.device("cpu")) if cached else None
    assert (memo is not None) is cached
    calls = _denoiser_inputs(bundle, options, tmp_path, memo)
    for call in calls:
        assert torch.equal(call["hidden"], trained.hidden_states.to(call["hidden"].dtype))
        assert torch.equal(call["pooled"], trained.pooled.to(call["pooled"].dtype))
        if family == "flux" and mask:  # the transformer hides T5's padding, as training's prediction does
            text = trained.extra[T5_MASK]
            assert 0 < int(text.sum()) < text.numel()  # real tokens and padding both
            want = joint_attention_mask(text, call["image_tokens"], call["mask"].device)["attention_mask"]
            assert call["mask"] is not None and torch.equal(call["mask"], want)
        else:  # SD3's masks act inside its encoders only; FLUX.1 without the option attends to the padding
            assert call["mask"] is None


def test_flux_true_cfg_samples_mask_the_prompt_and_the_negative_each_with_its_own(tmp_path):
    """A line with ``--l`` above 1 (true CFG) runs the prompt, then the negative: each call hides its own text's
    padding (kohya's ``denoise`` joins ``neg_t5_attn_mask`` and ``t5_attn_mask`` for its batched pass)."""
    from sdcore.models.flux.adapter import T5_MASK, joint_attention_mask

    bundle = _bundle("flux")
    options = _options(tmp_path, "flux", True)
    Path(options.sample_prompts).write_text(f"{PROMPT} --l 2 --n ugly blurry hands\n", encoding="utf-8")
    with torch.no_grad():
        texts = _Encoder(options).encode(bundle, [PROMPT, "ugly blurry hands"])
    calls = _denoiser_inputs(bundle, options, tmp_path)
    assert len(calls) == 2 * options.sample_steps  # the prompt's call, then the negative's, each step
    masks = texts.extra[T5_MASK]
    assert not torch.equal(masks[0], masks[1])  # the two texts pad differently
    for index, call in enumerate(calls):
        row = index % 2
        assert torch.equal(call["hidden"], texts.hidden_states[row : row + 1])
        want = joint_attention_mask(masks[row : row + 1], call["image_tokens"], call["mask"].device)
        assert torch.equal(call["mask"], want["attention_mask"])
