"""A flow-matching model family declared as a third-party plugin declares one, for the tests.

It is a slimmed-down copy of an AuraFlow plugin written from docs/families.md alone: a torch-free
``ModelFamily`` whose name sdcore does not know, and an adapter (``create_tiny``, ``encode_prompts``,
``predict``, ``generate``) over diffusers' ``AuraFlowTransformer2DModel``, an SDXL-style 4-channel VAE
and a UMT5 encoder. sdcore and sdplugin-lora must train, save, apply and render it from the family
declaration and the adapter only.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from sdcore.models.family import LatentFormat, ModelFamily, TextEncoderSpec

NAME = "toyflow"
MAX_LENGTH = 16
SCHEDULER = {"num_train_timesteps": 1000, "shift": 1.73}  # AuraFlow's scheduler config

FAMILY = ModelFamily(
    name=NAME,
    label="Toy flow DiT (a plugin's)",
    denoiser="transformer",
    text_encoders=(TextEncoderSpec("text_encoder", "umt5", MAX_LENGTH),),
    latent=LatentFormat(channels=4, scaling_factor=0.13025),
    objective="flow-matching",
    native_resolution=1024,
    adapter="plugin_family:ToyFlowAdapter",
    lora_prefixes={"transformer": "lora_unet", "text_encoder": "lora_te1"},
    context_tokens=MAX_LENGTH,
)


class ToyFlowAdapter:
    default_sampler = "euler"
    default_cfg = 3.0
    diffusers_pipeline = "AuraFlowPipeline"

    def detect_single_file(self, keys: Collection[str]) -> bool:
        return False

    def load_single_file(self, path: Any, **options: Any) -> Any:
        raise NotImplementedError

    def create_tiny(self, *, seed: int = 0, **options: Any) -> Any:
        import torch
        from diffusers import AuraFlowTransformer2DModel, AutoencoderKL, FlowMatchEulerDiscreteScheduler
        from sdcore.models.bundle import ModelBundle
        from sdcore.models.t5 import tiny_t5_tokenizer
        from transformers import UMT5Config, UMT5EncoderModel

        tokenizer = tiny_t5_tokenizer(model_max_length=MAX_LENGTH)
        state = torch.random.get_rng_state()
        try:
            torch.manual_seed(seed)
            transformer = AuraFlowTransformer2DModel(
                sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=1, num_single_dit_layers=1,
                attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                out_channels=4, pos_embed_max_size=64,
            )  # fmt: skip
            vae = AutoencoderKL(
                block_out_channels=[8, 8, 8, 8], layers_per_block=1, norm_num_groups=8, latent_channels=4,
                down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                scaling_factor=0.13025,
            )  # fmt: skip
            encoder = UMT5EncoderModel(
                UMT5Config(vocab_size=len(tokenizer), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                           relative_attention_num_buckets=8, is_encoder_decoder=False, use_cache=False)
            )  # fmt: skip
        finally:
            torch.random.set_rng_state(state)
        for module in (transformer, vae, encoder):
            module.eval()
        return ModelBundle(
            family=NAME,
            prediction_type="flow-matching",
            unet=None,
            transformer=transformer,
            vae=vae,
            text_encoders=[encoder],
            tokenizers=[tokenizer],
            noise_scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER),
            source=f"tiny:{NAME}",
            source_format="tiny",
        )

    def encode_prompts(self, bundle: Any, prompts: list[str], **options: Any) -> Any:
        """As ``AuraFlowPipeline.encode_prompt``: the encoder's hidden states, padding positions zeroed."""
        from sdcore.train.method import Conditioning

        encoder, tokenizer = bundle.text_encoders[0], bundle.tokenizers[0]
        tokens = tokenizer(list(prompts), padding="max_length", max_length=MAX_LENGTH, truncation=True,
                           return_tensors="pt")  # fmt: skip
        device = next(encoder.parameters()).device
        mask = tokens.attention_mask.to(device)
        hidden = encoder(input_ids=tokens.input_ids.to(device), attention_mask=mask)[0]
        return Conditioning(hidden_states=hidden * mask.unsqueeze(-1).to(hidden.dtype))

    def predict(self, bundle: Any, noisy_latents: Any, timesteps: Any, conditioning: Any, **options: Any) -> Any:
        """The velocity at ``timesteps`` (sigma * 1000); AuraFlow's transformer takes sigma."""
        import torch

        transformer = bundle.transformer
        dtype = next(transformer.parameters()).dtype
        batch = noisy_latents.shape[0]
        sigma = torch.as_tensor(timesteps, device=noisy_latents.device).reshape(-1).expand(batch).to(dtype) / 1000
        hidden = conditioning.hidden_states.to(device=noisy_latents.device, dtype=dtype)
        return transformer(hidden_states=noisy_latents.to(dtype), encoder_hidden_states=hidden, timestep=sigma,
                           return_dict=False)[0]  # fmt: skip

    def generate(self, bundle: Any, prompts: list[str], negatives: list[str], *, seeds: list[int], steps: int,
                 cfg: float, width: int, height: int, **settings: Any) -> list[Any]:  # fmt: skip
        import torch
        from diffusers import AuraFlowPipeline, FlowMatchEulerDiscreteScheduler

        pipe = AuraFlowPipeline(tokenizer=bundle.tokenizers[0], text_encoder=bundle.text_encoders[0], vae=bundle.vae,
                                transformer=bundle.transformer,
                                scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER))  # fmt: skip
        pipe.set_progress_bar_config(disable=True)
        images = []
        for prompt, negative, seed in zip(prompts, negatives, seeds, strict=True):
            pos, neg = self.encode_prompts(bundle, [prompt]), self.encode_prompts(bundle, [negative])
            ones = torch.ones(pos.hidden_states.shape[:2], dtype=torch.long)
            out = pipe(prompt_embeds=pos.hidden_states, prompt_attention_mask=ones,
                       negative_prompt_embeds=neg.hidden_states, negative_prompt_attention_mask=ones,
                       num_inference_steps=steps, guidance_scale=cfg, width=width, height=height,
                       generator=torch.Generator("cpu").manual_seed(int(seed)))  # fmt: skip
            images.append(out.images[0])
        return images
