"""The aesthetic-gradient numbers against an independent reimplementation of the A1111 extension.

The reference below follows the extension's documented behaviour (research/ti_hn_apt_aesthetic.md
4.2, AUTOMATIC1111/stable-diffusion-webui-aesthetic-gradients ``aesthetic_clip.py``), written here
from that description, using only transformers' public ``CLIPModel`` API. A1111 >= 1.0 calls the
extension once per 77-token chunk of a prompt; for each chunk it:

1. normalises the stored embedding ``e``; with an aesthetic text takes ``t = get_text_features(text)``
   raw (``unit(e - t)`` when "negative"), and the target is ``slerp(e, t, angle)``;
2. deep-copies the CLIP model and runs Adam on ``text_model`` maximising ``unit(get_text_features) @ target.T``;
3. encodes the chunk with the tuned tower and blends ``z*(1-w) + zn*w``, or ``slerp(z, zn, w)``
   along dim 1 (the chunk's 77 tokens).
"""

from __future__ import annotations

import copy

import pytest
import torch
from sdcore.models.tiny import create_tiny_bundle, tiny_text_encoder_config
from sdplugin_aesthetic.personalize import (
    AestheticSettings,
    PersonalizationCache,
    encode_for_generation,
    personalize,
    prompt_chunk_ids,
)

PROJECTION = 16


def _clip_model(text_config: dict):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
              "image_size": 32, "patch_size": 8, "projection_dim": PROJECTION}  # fmt: skip
    text = {**text_config, "projection_dim": PROJECTION}
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=PROJECTION)).eval()


LONG_PROMPT = ", ".join(f"word{i} castle" for i in range(45))  # > 75 tokens: several chunks


def reference_slerp(low: torch.Tensor, high: torch.Tensor, val: float) -> torch.Tensor:
    low_norm = low / torch.norm(low, dim=1, keepdim=True)
    high_norm = high / torch.norm(high, dim=1, keepdim=True)
    omega = torch.acos((low_norm * high_norm).sum(1))
    so = torch.sin(omega)
    return (torch.sin((1.0 - val) * omega) / so).unsqueeze(1) * low + (torch.sin(val * omega) / so).unsqueeze(1) * high


def _features(out):
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def extension_chunk(clip, tokenizer, tokens, z, e_raw, s: AestheticSettings) -> torch.Tensor:
    """One chunk ``z`` [1, 77, C] as the extension returns it."""
    image_embs = e_raw.float().reshape(1, -1)
    image_embs = image_embs / image_embs.norm(dim=-1, keepdim=True)
    model = copy.deepcopy(clip)
    model.requires_grad_(True)
    if s.text:  # A1111 encodes prompts under no_grad; only the tuning enables gradients
        with torch.no_grad():
            text_embs = _features(model.get_text_features(**tokenizer([s.text], padding=True, return_tensors="pt")))
        if s.text_negative:
            text_embs = image_embs - text_embs
            text_embs = text_embs / text_embs.norm(dim=-1, keepdim=True)
        img_embs = reference_slerp(image_embs, text_embs, s.slerp_angle)
    else:
        img_embs = image_embs
    with torch.enable_grad():
        optimizer = torch.optim.Adam(model.text_model.parameters(), lr=s.lr)
        for _ in range(s.steps):
            text_embs = _features(model.get_text_features(input_ids=tokens))
            text_embs = text_embs / text_embs.norm(dim=-1, keepdim=True)
            loss = -(text_embs @ img_embs.T)
            optimizer.zero_grad()
            loss.mean().backward()
            optimizer.step()
        with torch.no_grad():
            zn = model.text_model(input_ids=tokens).last_hidden_state
    if s.slerp:
        return reference_slerp(z, zn, s.weight)
    return z * (1 - s.weight) + zn * s.weight


@pytest.mark.parametrize(
    "settings",
    [
        AestheticSettings(weight=0.9, steps=3, lr=1e-3),
        AestheticSettings(weight=0.7, steps=3, lr=1e-3, slerp=True),
        AestheticSettings(weight=0.9, steps=3, lr=1e-3, text="a dark stormy sea", slerp_angle=0.3),
        AestheticSettings(weight=0.9, steps=3, lr=1e-3, text="a dark stormy sea", text_negative=True, slerp_angle=0.3),
    ],
    ids=["linear", "slerp-blend", "text", "text-negative"],
)
def test_personalisation_matches_the_extension_per_chunk(settings: AestheticSettings) -> None:
    bundle = create_tiny_bundle("sd1")
    clip = _clip_model(tiny_text_encoder_config("sd1"))
    clip.text_model.load_state_dict(bundle.text_encoders[0].state_dict())  # SD1's encoder is CLIP's text tower
    e_raw = torch.randn(PROJECTION, generator=torch.Generator().manual_seed(5)) * 7.0  # a raw (unnormalised) mean
    base = encode_for_generation(bundle, LONG_PROMPT, 1)
    hidden = base.embeds
    chunks = hidden.shape[1] // 77
    assert chunks >= 2
    ids = prompt_chunk_ids(bundle, LONG_PROMPT, chunks)

    ours = personalize(bundle, LONG_PROMPT, clip, e_raw, settings, base=base, cache=PersonalizationCache()).embeds
    expected = torch.cat(
        [
            extension_chunk(
                clip, bundle.tokenizers[0], ids[i : i + 1], hidden[:, 77 * i : 77 * (i + 1)], e_raw, settings
            )
            for i in range(chunks)
        ],
        dim=1,
    )
    assert (ours - hidden).abs().max() > 1e-3  # the personalisation did something
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)
