"""``sdcore generate --aesthetic style.pt``: aesthetic gradients as an untagged prompt handler.

The handler reads its settings from ``handler.options`` (the ``--aesthetic*`` flags this plugin
adds to ``sdcore generate``, or ``-O aesthetic=style.pt``), changes no prompt text and no model
weight, and offers :meth:`AestheticHandler.transform_conditioning`, which the generation code
calls with each prompt's encoded conditioning (see the README).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdcore.errors import ConfigError, SdcoreError
from sdcore.generate.networks import Activation, NetworkRef, PromptNetworkHandler

if TYPE_CHECKING:
    from sdcore.models.bundle import ModelBundle

    from .personalize import AestheticPersonalizer

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ConfigError(f"{name}={value!r}: expected true or false")


def _number(value: Any, name: str, kind: type) -> Any:
    try:
        return kind(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name}={value!r}: expected a {kind.__name__}") from exc


class AestheticHandler(PromptNetworkHandler):
    """Personalises the text conditioning toward an aesthetic embedding (A1111 extension)."""

    tag = None
    kind = "aesthetic embedding"
    a1111_folder_note = (
        "where `sdcore aesthetic create --name` writes; the A1111 extension keeps its .pt files in "
        "extensions/stable-diffusion-webui-aesthetic-gradients/aesthetic_embeddings"
    )
    suffixes = (".pt",)

    def accepts(self, path: Path) -> bool:
        """A pickled tensor, or a dict holding exactly one tensor (the ``[1, D]`` image-embedding mean)."""
        from sdcore.models.peek import peek_file

        found = peek_file(path)
        if found.error:  # unreadable or unsafe: let the loader say so in its own words
            return True
        if found.top == "Tensor":
            return True
        return found.top == "dict" and list(found.nested.values()) in (["Tensor"], ["Parameter"])

    def __init__(self, directory: str | Path | None = None) -> None:
        super().__init__(directory)
        self.personalizer: AestheticPersonalizer | None = None
        self._clip_cache: dict[str, Any] = {}
        self._embedding_cache: dict[str, Any] = {}
        self._key: tuple[Any, ...] | None = None
        self._name = ""

    def _settings(self) -> Any:
        from .personalize import AestheticSettings

        o = self.options
        return AestheticSettings(
            weight=_number(o.get("aesthetic_weight", 0.9), "aesthetic_weight", float),
            steps=_number(o.get("aesthetic_steps", 5), "aesthetic_steps", int),
            lr=_number(o.get("aesthetic_lr", 1e-4), "aesthetic_lr", float),
            text=(str(o.get("aesthetic_text")) or None) if o.get("aesthetic_text") else None,
            text_negative=_bool(o.get("aesthetic_text_negative", False), "aesthetic_text_negative"),
            slerp=_bool(o.get("aesthetic_slerp", False), "aesthetic_slerp"),
            slerp_angle=_number(o.get("aesthetic_slerp_angle", 0.1), "aesthetic_slerp_angle", float),
        )

    def _clip(self, bundle: ModelBundle) -> Any:
        from .create import default_clip_for, load_clip

        clip_id = str(self.options.get("aesthetic_clip") or default_clip_for(bundle.family))
        if clip_id not in self._clip_cache:
            model, _ = load_clip(clip_id)
            self._clip_cache = {clip_id: model.to(bundle.device)}
        return self._clip_cache[clip_id]

    def check_prompts(self, prompts: Sequence[tuple[str, str]]) -> list[str]:
        """``--aesthetic NAME`` that resolves to no embedding file, in :meth:`find`'s words (the places searched,
        the names there are): ``sdcore generate`` asks before the model loads, where :meth:`prepare` would say it
        only after the load. The prompts do not matter: the embedding is an option, the same for every prompt."""
        value = self.options.get("aesthetic")
        if not value:
            return []
        try:
            self.find(str(value))
        except SdcoreError as exc:  # not found, ambiguous, or a file of another kind
            return [str(exc)]
        return []

    def prepare(self, bundle: ModelBundle) -> AestheticPersonalizer | None:
        """Build (or reuse) the personaliser for the current options; ``None`` when off."""
        from .create import load_aesthetic_embedding
        from .personalize import AestheticPersonalizer

        value = self.options.get("aesthetic")
        if not value:
            self.personalizer = None
            return None
        path = self.find(str(value))
        settings = self._settings()
        negative = _bool(self.options.get("aesthetic_negative", False), "aesthetic_negative")
        key = (str(path), settings, negative, self.options.get("aesthetic_clip"), bundle.family)
        if self.personalizer is None or key != self._key:
            if str(path) not in self._embedding_cache:
                self._embedding_cache = {str(path): load_aesthetic_embedding(path)}
            cache = self.personalizer.cache if self.personalizer is not None else None
            self.personalizer = AestheticPersonalizer(
                self._embedding_cache[str(path)],
                self._clip(bundle),
                settings,
                personalize_negative=negative,
                cache=cache,
            )
            self._key = key
            self._name = path.stem
        return self.personalizer

    def activate(self, bundle: ModelBundle, refs: list[NetworkRef], prompt: str, negative_prompt: str) -> Activation:
        personalizer = self.prepare(bundle)
        info = personalizer.info(self._name) if personalizer is not None and personalizer.settings.active else {}
        return Activation(prompt=prompt, negative_prompt=negative_prompt, info=info)

    def transform_conditioning(
        self,
        bundle: ModelBundle,
        prompt: str,
        conditioning: Any,
        *,
        negative: bool = False,
        clip_skip: int = 1,
        chunk_ids: Any = None,
    ) -> Any:
        """``conditioning`` of one prompt (``[1, 77*k, C]``) with the aesthetic blended in (or as is)."""
        if self.personalizer is None:
            return conditioning
        return self.personalizer(
            bundle, prompt, base=conditioning, chunk_ids=chunk_ids, clip_skip=clip_skip, negative=negative
        )
