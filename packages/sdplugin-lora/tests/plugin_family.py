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

from sdcore.models.family import BlockList, LatentFormat, ModelFamily, TextEncoderSpec

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
    # AuraFlow's MMDiT blocks, then its single-stream blocks, counted by its config's own keys
    block_lists=(
        BlockList("joint_transformer_blocks", "num_mmdit_layers", "joint"),
        BlockList("single_transformer_blocks", "num_single_dit_layers", "single"),
    ),
    flow_shift=SCHEDULER["shift"],  # training's shift when --discrete-flow-shift is not given
)
#: the single-file layout of this plugin (its own): components' state dicts under their names, configs as JSON
CONFIG_KEY = "toyflow.config"
PROBE = "transformer.register_tokens"  # only AuraFlow's transformer has register tokens


def _bundle(transformer: Any, vae: Any, encoder: Any, source: str, source_format: str,
            metadata: dict[str, str] | None = None) -> Any:  # fmt: skip
    from diffusers import FlowMatchEulerDiscreteScheduler
    from sdcore.models.bundle import ModelBundle
    from sdcore.models.t5 import tiny_t5_tokenizer

    for module in (transformer, vae, encoder):
        module.eval()
    return ModelBundle(
        family=NAME,
        prediction_type="flow-matching",
        unet=None,
        transformer=transformer,
        vae=vae,
        text_encoders=[encoder],
        tokenizers=[tiny_t5_tokenizer(model_max_length=MAX_LENGTH)],
        noise_scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER),
        source=source,
        source_format=source_format,
        metadata=dict(metadata or {}),
    )


class ToyFlowAdapter:
    default_sampler = "euler"
    default_cfg = 3.0
    diffusers_pipeline = "AuraFlowPipeline"
    # guidance_input is left to its default (False: no guidance input)

    def detect_single_file(self, keys: Collection[str]) -> bool:
        return PROBE in keys

    def load_single_file(self, path: Any, **options: Any) -> Any:
        import json

        from diffusers import AuraFlowTransformer2DModel, AutoencoderKL
        from safetensors import safe_open
        from safetensors.torch import load_file
        from transformers import UMT5Config, UMT5EncoderModel

        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
        configs = json.loads(meta.pop(CONFIG_KEY))
        parts = {"transformer": AuraFlowTransformer2DModel(**configs["transformer"]),
                 "vae": AutoencoderKL(**configs["vae"]),
                 "text_encoder": UMT5EncoderModel(UMT5Config(**configs["text_encoder"]))}  # fmt: skip
        state = load_file(str(path))
        for name, module in parts.items():
            module.load_state_dict(
                {k.removeprefix(name + "."): v for k, v in state.items() if k.startswith(name + ".")}
            )
        return _bundle(parts["transformer"], parts["vae"], parts["text_encoder"], str(path), "single-file", meta)

    def save(self, bundle: Any, path: Any, *, format: str | None = None, metadata: dict[str, str] | None = None,
             **options: Any) -> Any:  # fmt: skip
        """The metadata given (``create-tiny``'s tiny mark among it) is kept in the file."""
        import json
        from pathlib import Path

        from safetensors.torch import save_file

        configs = {name: {k: v for k, v in dict(module.config).items() if not k.startswith("_")}
                   for name, module in bundle.components().items() if name != "text_encoder"}  # fmt: skip
        configs["text_encoder"] = json.loads(bundle.text_encoders[0].config.to_json_string())
        tensors = {f"{name}.{k}": v.detach().clone().contiguous() for name, module in bundle.components().items()
                   for k, v in module.state_dict().items()}  # fmt: skip
        save_file(tensors, str(path), metadata={**(metadata or {}), CONFIG_KEY: json.dumps(configs)})
        return Path(path)

    def flow_scheduler_for(self, bundle: Any, sampler: str = "euler", *, img2img: bool = False) -> Any:
        """sdcore's flow samplers on this model's schedule (``AuraFlowPipeline`` passes no sigmas nor ``mu``)."""
        from sdcore.generate.flow_samplers import flow_scheduler

        return flow_scheduler(bundle.noise_scheduler.config, sampler, family=FAMILY.label, img2img=img2img)

    def create_tiny(self, *, seed: int = 0, **options: Any) -> Any:
        import torch
        from diffusers import AuraFlowTransformer2DModel, AutoencoderKL
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
        return _bundle(transformer, vae, encoder, f"tiny:{NAME}", "tiny")

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
                 cfg: float, width: int, height: int, sampler: str = "euler", **settings: Any) -> list[Any]:  # fmt: skip
        """Every sdcore flow sampler, through the core's table (:mod:`sdcore.generate.flow_samplers`)."""
        import torch
        from diffusers import AuraFlowPipeline
        from sdcore.generate.flow_samplers import run_pipeline

        pipe = AuraFlowPipeline(tokenizer=bundle.tokenizers[0], text_encoder=bundle.text_encoders[0], vae=bundle.vae,
                                transformer=bundle.transformer,
                                scheduler=self.flow_scheduler_for(bundle, sampler))  # fmt: skip
        pipe.set_progress_bar_config(disable=True)
        pos, neg = self.encode_prompts(bundle, list(prompts)), self.encode_prompts(bundle, list(negatives))
        ones = torch.ones(pos.hidden_states.shape[:2], dtype=torch.long)
        kwargs = {"prompt_embeds": pos.hidden_states, "prompt_attention_mask": ones,
                  "negative_prompt_embeds": neg.hidden_states, "negative_prompt_attention_mask": ones,
                  "num_inference_steps": steps, "guidance_scale": cfg, "width": width, "height": height,
                  "generator": [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]}  # fmt: skip
        return run_pipeline(pipe, kwargs, sampler, list(seeds))
