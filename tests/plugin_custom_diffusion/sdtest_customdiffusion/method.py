"""Custom Diffusion, slimmed: diffusers' examples/custom_diffusion/train_custom_diffusion.py trains the
cross-attention (``attn2``) ``to_k``/``to_v`` through ``CustomDiffusionAttnProcessor`` (``--freeze_model
crossattn_kv``, its default) and a modifier token's embedding row (``--modifier_token``, started from
``--initializer_token``), lr 1e-5, and saves ``unet.save_attn_procs`` + ``{token: vector}`` files.

Written as ``.bin`` (torch.save): diffusers' ``save_attn_procs`` keeps every untrained processor as an empty dict
there, and its ``load_attn_procs`` (0.42) needs them; its ``.safetensors`` drops them and then does not load.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from sdcore.data.dataset import DatasetIndex, ImageEntry
from sdcore.errors import ConfigError
from sdcore.io import atomic_save
from sdcore.models.bundle import ModelBundle
from sdcore.models.token_embeddings import TokenRows, add_token_rows
from sdcore.options import option
from sdcore.train.method import Capabilities, SaveInfo, TrainingMethod
from sdcore.train.options import TrainOptions

WEIGHTS = "pytorch_custom_diffusion_weights.bin"


@dataclass
class CustomDiffusionOptions(TrainOptions):
    lr: float = option(1e-5, "Learning rate (Custom Diffusion's default).", group="training")
    modifier_token: str = option("<new1>", "The new token learnt with the weights.", group="custom diffusion")
    initializer_token: str = option(
        "pll",
        "The single-token word it starts from (the script's first default, 'ktn', is two CLIP tokens).",
        group="custom diffusion",
    )


class CustomDiffusionMethod(TrainingMethod[CustomDiffusionOptions]):
    name = "custom-diffusion"
    options_class = CustomDiffusionOptions
    output_suffix = ""  # the result is a folder, like the script's --output_dir

    def capabilities(self) -> Capabilities:
        return Capabilities(trains_text_encoder=True)  # the token row trains: captions are encoded every step

    def resolve_output(self, path: Path) -> Path:
        return path

    def _without_token(self, index: DatasetIndex) -> list[ImageEntry]:
        token = self.options.modifier_token
        return [e for e in index.instance_entries if token not in e.written_caption]

    def dataset_problems(self, index: DatasetIndex) -> list[str]:
        """The token trains only through captions that hold it (the script's instance prompt has it)."""
        entries, lacking = index.instance_entries, self._without_token(index)
        if entries and len(lacking) == len(entries):
            token = self.options.modifier_token
            return [f"no caption of the {len(entries)} training images contains {token}: it would never train"]
        return []

    def dataset_notes(self, index: DatasetIndex) -> list[str]:
        lacking, token = self._without_token(index), self.options.modifier_token
        if lacking and len(lacking) < len(index.instance_entries):
            return [f"{len(lacking)} of {len(index.instance_entries)} training captions lack {token}"]
        return []

    def prepare(self, bundle: ModelBundle) -> list[dict[str, Any]]:
        from diffusers.models.attention_processor import CustomDiffusionAttnProcessor2_0

        for module in bundle.components().values():
            module.requires_grad_(False)
        modules = dict(bundle.unet.named_modules())
        processors: dict[str, Any] = {}
        self.trained: dict[str, torch.nn.Module] = {}
        for name, processor in bundle.unet.attn_processors.items():
            processors[name] = processor
            if name.endswith("attn2.processor"):
                layer = modules[name.removesuffix(".processor")]
                hidden, cross = layer.to_k.weight.shape
                proc = CustomDiffusionAttnProcessor2_0(train_q_out=False, hidden_size=hidden, cross_attention_dim=cross)
                if not layer.to_k.weight.is_meta:  # the pre-flight plans on a shapes-only model
                    start = {
                        "to_k_custom_diffusion.weight": layer.to_k.weight,
                        "to_v_custom_diffusion.weight": layer.to_v.weight,
                    }
                    proc.load_state_dict({k: v.detach().float() for k, v in start.items()})
                processors[name] = self.trained[name] = proc.to(layer.to_k.weight.device).requires_grad_(True)
        bundle.unet.set_attn_processor(processors)
        self.rows = self._add_token(bundle)
        params = [p for proc in self.trained.values() for p in proc.parameters()]
        return [{"params": params, "name": "custom_diffusion"}, {"params": self.rows.parameters(), "name": "token"}]

    def _add_token(self, bundle: ModelBundle) -> TokenRows:
        """The token with one trainable row (sdcore's new-token helper), started from the initializer's row."""
        tokenizer, encoder = bundle.tokenizers[0], bundle.text_encoders[0]
        token, init = self.options.modifier_token, self.options.initializer_token
        if len(tokenizer.encode(token, add_special_tokens=False)) == 1:
            raise ConfigError(f"--modifier-token {token}: the tokenizer already has it; choose another")
        ids = tokenizer.encode(init, add_special_tokens=False)
        if len(ids) != 1:
            raise ConfigError(f"--initializer-token {init}: must be one token, it is {len(ids)}")
        start = encoder.get_input_embeddings().weight[ids[0]][None]
        others = [None] * (len(bundle.text_encoders) - 1)  # the first text encoder only, as the script
        return add_token_rows(bundle, token, [token], [start, *others], trainable=True)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"{n}.{k}": v.detach().clone() for n, p in self.trained.items() for k, v in p.state_dict().items()}
        state[self.options.modifier_token] = self.rows.tables[0][0].detach().clone()
        return state

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, proc in self.trained.items():
                for key, param in proc.state_dict().items():
                    param.copy_(state[f"{name}.{key}"])
            self.rows.tables[0][0].copy_(state[self.options.modifier_token])

    def save(self, bundle: ModelBundle, info: SaveInfo) -> Path:
        info.path.mkdir(parents=True, exist_ok=True)
        weights: dict[str, Any] = {}
        for name in bundle.unet.attn_processors:
            trained = self.trained.get(name)
            if trained is None:
                weights[name] = {}  # as save_attn_procs: an untrained processor is an empty dict
            else:
                weights.update({f"{name}.{k}": v.detach().float().cpu() for k, v in trained.state_dict().items()})
        token = self.options.modifier_token
        vector = {token: self.rows.tables[0][0].detach().float().cpu()}
        atomic_save(info.path / WEIGHTS, lambda tmp: torch.save(weights, str(tmp)))
        atomic_save(info.path / f"{token}.bin", lambda tmp: torch.save(vector, str(tmp)))
        return info.path
