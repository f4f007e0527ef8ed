"""BLIP captions extended with CLIP-ranked phrases, the way clip-interrogator 0.6 does it.

BLIP (transformers ``BlipForConditionalGeneration``) writes a sentence; CLIP (transformers
``CLIPModel``) ranks phrase tables (mediums, movements, "trending on" sites, and the user's
artists and flavors) by cosine similarity with the image, and the modes combine them:

- ``fast``: caption + the top phrases of the merged table, cut to CLIP's 77 tokens;
- ``classic``: caption + best medium, artist, trending, movement and three flavors;
- ``best``: greedily chain phrases while the similarity improves (8 to 32), then keep the best of
  caption / classic / fast / chained;
- ``negative``: chain the *least* similar flavors and negative phrases (a negative prompt);
- ``caption``: BLIP only.

Phrase embeddings are cached on disk per model and list content (safetensors, atomic), so the
100k-line flavor lists are encoded once. Greedy decoding keeps results deterministic.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from sdcore.data.captions import read_caption_text
from sdcore.errors import ConfigError, DataError, ModelFormatError
from sdcore.io import atomic_path, cache_dir

from .runner import BatchTagger, default_workers
from .tags import TagFormat, TagResult

CI_MODES = ("caption", "best", "classic", "fast", "negative")
TRENDING_SITES = (
    "Artstation", "behance", "cg society", "cgsociety", "deviantart", "dribbble", "flickr", "instagram", "pexels",
    "pinterest", "pixabay", "pixiv", "polycount", "reddit", "shutterstock", "tumblr", "unsplash", "zbrush central",
)  # fmt: skip


def load_list(path: str | os.PathLike[str]) -> list[str]:
    """One phrase per line, blank lines dropped, order kept, duplicates removed."""
    try:  # the captions' one decoding rule: a list saved by Notepad (a BOM, UTF-16) reads as written
        lines = read_caption_text(path, "phrase list").splitlines()
    except DataError as exc:
        raise ConfigError(str(exc)) from None
    return list(dict.fromkeys(line.strip() for line in lines if line.strip()))


def builtin_list(name: str) -> list[str]:
    """A phrase list shipped with the package (``mediums``, ``movements``, ``negative``)."""
    text = resources.files("sdplugin_taggers").joinpath(f"data/{name}.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def trending_phrases() -> list[str]:
    out = []
    for site in TRENDING_SITES:
        out += [site, f"trending on {site}", f"featured on {site}", f"{site} contest winner"]
    return out


def model_key(path: str | os.PathLike[str]) -> str:
    """Identity of a local model for the cache: resolved folder + weight file sizes and times."""
    folder = Path(path).resolve()
    parts = [str(folder)]
    for file in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
        stat = file.stat()
        parts.append(f"{file.name}:{stat.st_size}:{int(stat.st_mtime)}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


class LabelTable:
    """Phrases with their L2-normalised CLIP text embeddings (fp16 on disk, like clip-interrogator)."""

    def __init__(self, labels: Sequence[str], name: str, ranker: ClipRanker) -> None:
        import numpy as np

        self.labels = list(dict.fromkeys(labels))
        self.name = name
        if not self.labels:
            self.embeds = np.zeros((0, ranker.dim), dtype=np.float32)
            return
        digest = hashlib.sha256(("\n".join(self.labels)).encode()).hexdigest()
        cache = ranker.cache_dir / f"{ranker.key}_{name}_{digest[:24]}.safetensors" if ranker.cache_dir else None
        if cache is not None and cache.is_file():
            from safetensors.numpy import load_file

            try:
                stored = load_file(str(cache))
                if stored["embeds"].shape == (len(self.labels), ranker.dim):
                    self.embeds = stored["embeds"].astype(np.float32)
                    ranker.cache_hits += 1
                    return
            except Exception:  # a damaged cache file is rebuilt
                pass
        embeds = ranker.encode_text(self.labels).astype(np.float16)
        ranker.cache_misses += 1
        if cache is not None:
            from safetensors.numpy import save_file

            with atomic_path(cache) as tmp:
                save_file({"embeds": embeds}, str(tmp))
        self.embeds = embeds.astype(np.float32)

    def rank(self, image_features: Any, top_count: int = 1, *, reverse: bool = False) -> list[str]:
        """The ``top_count`` most (or least) similar labels, best first (ties keep list order)."""
        import numpy as np

        if not self.labels:
            return []
        sims = self.embeds @ image_features
        if reverse:
            sims = -sims
        order = np.argsort(-sims, kind="stable")[: min(top_count, len(self.labels))]
        return [self.labels[i] for i in order]


class ClipRanker:
    """CLIP text/image features and similarity helpers (transformers ``CLIPModel``)."""

    def __init__(self, path: str | os.PathLike[str], *, device: str, cache_dir: Path | None, chunk_size: int = 1024):
        from sdcore.models.tokenizer import load_clip_tokenizer
        from transformers import CLIPImageProcessor, CLIPModel

        folder = Path(path)
        try:
            self.model = CLIPModel.from_pretrained(str(folder)).to(device).eval()  # type: ignore[arg-type]
            self.image_processor = CLIPImageProcessor.from_pretrained(str(folder))
        except (OSError, ValueError) as exc:
            raise ModelFormatError(f"{folder}: not a transformers CLIP model folder ({exc})") from exc
        has_tokenizer = (folder / "tokenizer_config.json").exists() or (folder / "vocab.json").exists()
        self.tokenizer = load_clip_tokenizer(folder if has_tokenizer else None)
        self.device = device
        self.dim = int(self.model.config.projection_dim)
        self.max_tokens = int(getattr(self.model.config.text_config, "max_position_embeddings", 77))
        self.key = model_key(folder)
        self.cache_dir = cache_dir
        self.chunk_size = chunk_size
        self.cache_hits = 0
        self.cache_misses = 0

    @staticmethod
    def _features(output: Any) -> Any:
        return output if hasattr(output, "norm") else output.pooler_output

    def encode_text(self, texts: Sequence[str]) -> Any:
        import torch

        chunks = []
        with torch.inference_mode():
            for start in range(0, len(texts), self.chunk_size):
                batch = self.tokenizer(
                    list(texts[start : start + self.chunk_size]),
                    padding=True,
                    truncation=True,
                    max_length=self.max_tokens,
                    return_tensors="pt",
                ).to(self.device)
                feats = self._features(self.model.get_text_features(**batch)).float()
                chunks.append(torch.nn.functional.normalize(feats, dim=-1).cpu())
        return torch.cat(chunks).numpy()

    def encode_images(self, pixel_values: Any) -> Any:
        import torch

        with torch.inference_mode():
            feats = self._features(self.model.get_image_features(pixel_values=pixel_values.to(self.device))).float()
            return torch.nn.functional.normalize(feats, dim=-1).cpu().numpy()

    def similarities(self, image_features: Any, texts: Sequence[str]) -> list[float]:
        return (self.encode_text(texts) @ image_features).tolist()

    def at_max_len(self, prompt: str) -> bool:
        return len(self.tokenizer(prompt)["input_ids"]) >= self.max_tokens

    def truncate_to_fit(self, prompt: str) -> str:
        """Keep whole ", "-separated parts while the prompt fits CLIP's token window."""
        parts = prompt.split(", ")
        out = parts[0]
        for part in parts[1:]:
            if self.at_max_len(out + ", " + part):
                break
            out += ", " + part
        return out

    def chain(
        self,
        image_features: Any,
        phrases: Sequence[str],
        best_prompt: str = "",
        best_sim: float = 0.0,
        *,
        min_count: int = 8,
        max_count: int = 32,
        reverse: bool = False,
    ) -> str:
        """Greedy phrase chaining (clip-interrogator's ``chain``), deterministic order."""
        sign = -1.0 if reverse else 1.0
        remaining = list(dict.fromkeys(phrases))
        if not remaining:
            return best_prompt
        if not best_prompt:
            sims = self.similarities(image_features, remaining)
            top = max(range(len(remaining)), key=lambda i: sign * sims[i])
            best_prompt, best_sim = remaining.pop(top), sign * sims[top]
        curr_prompt, curr_sim = best_prompt, best_sim
        for idx in range(max_count):
            if not remaining:
                break
            candidates = [f"{curr_prompt}, {p}" for p in remaining]
            sims = [sign * s for s in self.similarities(image_features, candidates)]
            top = max(range(len(candidates)), key=sims.__getitem__)
            prompt, sim = candidates[top], sims[top]
            if sim > best_sim:
                best_prompt, best_sim = prompt, sim
            if not (sim > curr_sim or idx < min_count):
                break
            curr_prompt, curr_sim = prompt, sim
            remaining.pop(top)
            if self.at_max_len(curr_prompt):
                break
        return best_prompt


class CaptionTagger(BatchTagger):
    """BLIP caption + CLIP interrogation for a folder (see module docs for the modes).

    ``TagResult.text`` holds the prompt; ``tags()`` returns its comma-separated parts.
    """

    def __init__(
        self,
        blip_path: str | os.PathLike[str] | None,
        clip_path: str | os.PathLike[str] | None = None,
        *,
        mode: str = "best",
        flavors: str | os.PathLike[str] | Sequence[str] | None = None,
        artists: str | os.PathLike[str] | Sequence[str] | None = None,
        mediums: Sequence[str] | None = None,
        movements: Sequence[str] | None = None,
        negative: Sequence[str] | None = None,
        max_length: int = 32,
        min_flavors: int = 8,
        max_flavors: int = 32,
        intermediate_count: int = 2048,
        batch_size: int = 4,
        workers: int | None = None,
        device: str = "auto",
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        from .deepdanbooru import resolve_device

        if mode not in CI_MODES:
            raise ConfigError(f"caption mode must be one of {', '.join(CI_MODES)} (got {mode!r})")
        if mode != "caption" and clip_path is None:
            raise ConfigError(f"caption mode {mode!r} needs a CLIP model")
        if mode != "negative" and blip_path is None:
            raise ConfigError(f"caption mode {mode!r} needs a BLIP model")
        self.messages = []
        self.fmt = TagFormat()
        self.mode = mode
        self.batch_size = batch_size
        self.workers = default_workers() if workers is None else workers
        self.device = resolve_device(device)
        self.max_length = max_length
        self.min_flavors, self.max_flavors = min_flavors, max_flavors
        self.intermediate_count = intermediate_count
        self.blip = self.blip_processor = None
        if blip_path is not None and mode != "negative":
            from transformers import BlipForConditionalGeneration, BlipProcessor

            try:
                self.blip = BlipForConditionalGeneration.from_pretrained(str(blip_path)).to(self.device).eval()  # type: ignore[arg-type]
                self.blip_processor = BlipProcessor.from_pretrained(str(blip_path))
            except (OSError, ValueError) as exc:
                raise ModelFormatError(f"{blip_path}: not a transformers BLIP captioning folder ({exc})") from exc
        self.clip: ClipRanker | None = None
        if clip_path is not None and mode != "caption":
            cache = Path(cache_dir) if cache_dir else _default_cache_dir()
            self.clip = ClipRanker(clip_path, device=self.device, cache_dir=cache)
            as_list = lambda v: v if v is None or not isinstance(v, (str, os.PathLike)) else load_list(v)  # noqa: E731
            artist_names = as_list(artists) or []
            artist_phrases = [f"by {a}" for a in artist_names] + [f"inspired by {a}" for a in artist_names]
            self.tables = {
                "artists": LabelTable(artist_phrases, "artists", self.clip),
                "flavors": LabelTable(as_list(flavors) or [], "flavors", self.clip),
                "mediums": LabelTable(mediums or builtin_list("mediums"), "mediums", self.clip),
                "movements": LabelTable(movements or builtin_list("movements"), "movements", self.clip),
                "trendings": LabelTable(trending_phrases(), "trendings", self.clip),
                "negative": LabelTable(negative or builtin_list("negative"), "negative", self.clip),
            }

    # -- batch pipeline hooks ------------------------------------------------------------------
    def _preprocess(self, source: Any) -> tuple[Any, tuple[int, int]]:
        from .images import open_image

        rgb = open_image(source)
        size = rgb.size
        blip_px = clip_px = None
        if self.blip_processor is not None:
            blip_px = self.blip_processor.image_processor(images=rgb, return_tensors="np")["pixel_values"][0]
        if self.clip is not None:
            clip_px = self.clip.image_processor(images=rgb, return_tensors="np")["pixel_values"][0]
        return (blip_px, clip_px), size

    def _collate(self, items: list[Any]) -> Any:
        import numpy as np
        import torch

        def stack(i: int) -> Any:
            return None if items[0][i] is None else torch.from_numpy(np.stack([it[i] for it in items]))

        return stack(0), stack(1)

    def _predict(self, batch: Any) -> list[str]:
        blip_px, clip_px = batch
        n = (blip_px if blip_px is not None else clip_px).shape[0]
        captions = self.caption_batch(blip_px) if blip_px is not None else [""] * n
        if self.clip is None:
            return captions
        feats = self.clip.encode_images(clip_px)
        return [self.interrogate(caption, f) for caption, f in zip(captions, feats, strict=True)]

    def _fill(self, result: TagResult, output: Any) -> None:
        result.text = output

    # -- the steps -----------------------------------------------------------------------------
    def caption_batch(self, pixel_values: Any) -> list[str]:
        import torch

        assert self.blip is not None and self.blip_processor is not None
        with torch.inference_mode():
            ids = self.blip.generate(
                pixel_values=pixel_values.to(self.device, self.blip.dtype),
                max_new_tokens=self.max_length,
                num_beams=1,
                do_sample=False,
            )
        return [t.strip() for t in self.blip_processor.batch_decode(ids, skip_special_tokens=True)]

    def interrogate(self, caption: str, features: Any) -> str:
        """Apply the configured mode to one image's caption and CLIP features."""
        assert self.clip is not None
        clip, t = self.clip, self.tables
        if self.mode == "negative":
            phrases = t["flavors"].rank(features, self.intermediate_count, reverse=True) + t["negative"].labels
            return clip.chain(features, phrases, max_count=self.max_flavors, reverse=True, min_count=1)
        fast = self._fast(caption, features)
        classic = self._classic(caption, features)
        if self.mode == "fast":
            return fast
        if self.mode == "classic":
            return classic
        merged = self._merged_rank(features, self.intermediate_count)
        start = caption or (merged[0] if merged else "")
        start_sim = clip.similarities(features, [start])[0] if start else 0.0
        best = clip.chain(features, merged, start, start_sim, min_count=self.min_flavors, max_count=self.max_flavors)
        candidates = list(dict.fromkeys(c for c in (caption, classic, fast, best) if c))
        sims = clip.similarities(features, candidates)
        return candidates[max(range(len(candidates)), key=sims.__getitem__)]

    def _merged_rank(self, features: Any, count: int) -> list[str]:
        import numpy as np

        names = ("artists", "flavors", "mediums", "movements", "trendings")
        labels = [label for n in names for label in self.tables[n].labels]
        if not labels:
            return []
        embeds = np.concatenate([self.tables[n].embeds for n in names])
        sims = embeds @ features
        order = np.argsort(-sims, kind="stable")[:count]
        return list(dict.fromkeys(labels[i] for i in order))

    def _fast(self, caption: str, features: Any) -> str:
        assert self.clip is not None
        parts = [caption] if caption else []
        parts += self._merged_rank(features, self.max_flavors)
        return self.clip.truncate_to_fit(", ".join(parts))

    def _classic(self, caption: str, features: Any) -> str:
        assert self.clip is not None
        t = self.tables

        def top(name: str, k: int = 1) -> list[str]:
            return t[name].rank(features, k)

        medium = top("mediums")
        if medium and caption.startswith(medium[0]):
            medium = []
        head = " ".join(medium + top("artists"))
        parts = [p for p in [caption, head, *top("trendings"), *top("movements"), *top("flavors", 3)] if p]
        return self.clip.truncate_to_fit(", ".join(parts))


def _default_cache_dir() -> Path:
    return cache_dir() / "clip-text-embeds"
