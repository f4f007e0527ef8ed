"""Shared test helpers (imported by name: conftest puts this folder on sys.path)."""

from __future__ import annotations

import copy
import functools
import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@functools.cache
def _bundle(family: str):
    from sdcore.models.tiny import create_tiny_bundle

    return create_tiny_bundle(family)


def fresh_bundle(family: str):
    """A private deep copy of the cached tiny bundle (tests mutate weights)."""
    return copy.deepcopy(_bundle(family))


def random_network(bundle, *, rank=4, alpha=2.0, conv_rank=2, conv_alpha=1.0, seed=0, std=0.2, text_encoder=True):
    """A LoRA network with non-zero ``lora_up`` so it changes the model."""
    from sdplugin_lora.naming import ModuleIndex
    from sdplugin_lora.network import LoraNetwork

    index = ModuleIndex.from_bundle(bundle)
    network = LoraNetwork.create(
        index.select(conv=bool(conv_rank), text_encoder=text_encoder),
        rank=rank,
        alpha=alpha,
        conv_rank=conv_rank,
        conv_alpha=conv_alpha,
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in network:
            module.lora_down.weight.copy_(torch.randn(module.lora_down.weight.shape, generator=generator) * std)
            module.lora_up.weight.copy_(torch.randn(module.lora_up.weight.shape, generator=generator) * std)
    return network


def unet_inputs(bundle, batch=1, seed=0):
    """Fixed UNet inputs (latents, timestep, conditioning and SDXL added conditions)."""
    generator = torch.Generator().manual_seed(seed)
    unet = bundle.unet
    latents = torch.randn(batch, 4, 8, 8, generator=generator)
    hidden = torch.randn(batch, 5, unet.config.cross_attention_dim, generator=generator)
    kwargs = {}
    if bundle.is_sdxl:
        pooled_dim = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, pooled_dim, generator=generator),
            "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * batch),
        }
    return latents, torch.tensor([500] * batch), hidden, kwargs


def unet_out(bundle, inputs):
    latents, t, hidden, kwargs = inputs
    with torch.no_grad():
        return bundle.unet(latents, t, encoder_hidden_states=hidden, **kwargs).sample


def te_out(bundle, index=0):
    ids = torch.tensor([[49406, 320, 1125, 539, 49407] + [49407] * 3])
    with torch.no_grad():
        return bundle.text_encoders[index](ids).last_hidden_state


def all_params(bundle):
    return {
        (component, name): param.detach().clone()
        for component, module in bundle.components().items()
        for name, param in module.named_parameters()
    }


def saved_lora(tmp_path, name="in.safetensors", rank=4):
    """A random SD1 LoRA (no conv modules) saved as ``tmp_path / name``: the input of the ``sdcore lora`` tools."""
    from sdplugin_lora.format import network_metadata, save_lora

    bundle = fresh_bundle("sd1")
    network = random_network(bundle, rank=rank, alpha=float(rank), conv_rank=None)
    return save_lora(tmp_path / name, network.state_dict(), network_metadata(family="sd1", rank=rank, alpha=rank))


def run_lora_command(*args):
    """``sdcore lora ARGS`` in process (click's runner): its result, exception kept."""
    from click.testing import CliRunner
    from sdplugin_lora.commands import lora_group

    return CliRunner().invoke(lora_group, [str(a) for a in args])


def refusal(result) -> str:
    """The one-line error (a ConfigError the root command prints as ``Error: ...``, no traceback)."""
    from sdcore.errors import ConfigError

    assert isinstance(result.exception, ConfigError), (result.exception, result.output)
    return str(result.exception)
