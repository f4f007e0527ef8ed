"""Latent and text-encoder output caches.

Latents: each image is encoded once per (bucket, flip) with a posterior sample drawn from a
generator seeded by the image, so the cache is the same whichever run fills it. On disk the
latents go to ``.npz`` files beside the image (or under ``--cache-dir``); each file records a key
built from the image path, its mtime and size, the bucket/resize/crop, the flip and a hash of the
VAE. A later run reuses a file when the key matches and re-encodes (overwriting atomically) when
anything changed, so an edited image or another VAE never trains on stale latents.

Text encoder outputs (when the method keeps the text encoders frozen, or, on SD3/FLUX.1, only T5's while CLIP
trains: :func:`partial_text_encoders`): each image gets
``caption_variants`` processed captions when shuffling/dropout is on (one otherwise), every
distinct prompt is encoded once, and each epoch picks a variant per sample deterministically.
With ``--cache-text-encoder-outputs-to-disk`` the encodings are also kept in one file per dataset
folder (:mod:`.text_store`) that a later run with the same encoders and settings reuses.

Partial caching (kohya's ``is_partial`` on SD3/FLUX.1): while CLIP trains, the family's ``partial_text_cache``
encoders (T5-XXL) are frozen and their outputs do not change, so only those are cached (then the encoder goes to
the CPU) and each step runs the training encoders on the cached caption variant and joins the two
(:meth:`~sdcore.train.method.TrainingMethod.encode_partial`) into what a full encode gives.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..io import atomic_write_bytes
from .noise import sample_seed

if TYPE_CHECKING:
    import torch

    from ..data.buckets import BucketAssignment
    from ..data.dataset import ImageEntry
    from ..generate.conditioning_memo import ConditioningMemo, PartMemo
    from ..models.bundle import ModelBundle
    from .method import Conditioning

CACHE_FORMAT = 1


def vae_identity(vae: Any) -> str:
    """A cheap fingerprint of a VAE: its config plus per-tensor sums and a few values."""
    import torch

    digest = hashlib.sha256(json.dumps(dict(vae.config), sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, tensor in sorted(vae.state_dict().items()):
            flat = tensor.detach().float().flatten()
            digest.update(
                f"{name}:{tuple(tensor.shape)}:{float(flat.sum()):.6e}:{float(flat.abs().sum()):.6e}".encode()
            )
            digest.update(flat[:8].cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def image_key(entry: ImageEntry, assignment: BucketAssignment, vae_id: str, *, inpainting: bool = False) -> str:
    path = Path(entry.path).resolve()
    stat = path.stat()
    parts = [
        CACHE_FORMAT,
        str(path),
        stat.st_mtime_ns,
        stat.st_size,
        assignment.bucket,
        assignment.resized,
        assignment.crop,
        vae_id,
    ]
    if getattr(entry.subset, "resize_interpolation", None) is not None:
        parts.append(f"resize:{entry.subset.resize_interpolation}")  # other pixels; None keeps older keys valid
    if getattr(entry.subset, "alpha_mask", False):
        parts.append("rgb-as-stored")  # alpha_mask reads RGB without compositing: other latents
    from .kontext_data import control_identity, has_control

    if has_control(entry):  # a control folder's or a JSONL row's control image
        parts.append(("control", control_identity(entry)))  # FLUX.1 Kontext: an edited control image re-encodes
    if inpainting:  # an inpainting model's masked image: an edited mask re-encodes (other models keep their keys)
        from .inpainting import mask_identity

        parts.append(("inpainting-mask", mask_identity(entry)))
        if getattr(entry.subset, "conditioning_suffix", None) is not None:  # a new or edited -condlabel re-encodes
            from .inpainting import conditioning_identity

            parts.append(("inpainting-conditioning", conditioning_identity(entry)))
    return hashlib.sha256(repr(parts).encode()).hexdigest()


def cache_file(entry: ImageEntry, assignment: BucketAssignment, vae_id: str, cache_dir: str | None) -> Path:
    path = Path(entry.path)
    w, h = assignment.bucket
    name = f"{path.stem}_{w}x{h}_{vae_id[:8]}.sdcore.npz"
    if cache_dir:
        folder_hash = hashlib.sha256(str(path.parent.resolve()).encode()).hexdigest()[:10]
        return Path(cache_dir) / f"{path.parent.name}-{folder_hash}" / name
    return path.parent / name


def latent_seed(base_seed: int, entry: ImageEntry, flipped: bool, purpose: str = "latent") -> int:
    """Seed of an image's VAE posterior draw, from its path *inside* the dataset folder.

    Moving or copying the dataset elsewhere therefore does not change the run (a seed from the
    absolute path did). ``purpose`` separates other draws about the same sample (a Kontext control image's).
    """
    folder = Path(entry.subset.image_dir)
    try:
        where = f"{folder.name}/{entry.path.relative_to(folder).as_posix()}"
    except ValueError:  # not under its subset folder: the file name alone
        where = entry.path.name
    return sample_seed(base_seed, purpose, where, flipped)


def encode_pixels(bundle: ModelBundle, pixels: torch.Tensor, seeds: list[int]) -> torch.Tensor:
    """Unscaled posterior samples ``[B, 4, h, w]`` (float32, CPU) of pixel batch ``[B, 3, H, W]``."""
    import torch

    vae = bundle.vae
    param = next(vae.parameters())
    with torch.no_grad():
        dist = vae.encode(pixels.to(device=param.device, dtype=param.dtype)).latent_dist
        mean, std = dist.mean.float(), dist.std.float()
        eps = torch.stack([torch.randn(mean.shape[1:], generator=torch.Generator().manual_seed(s)) for s in seeds])
        return (mean.cpu() + std.cpu() * eps).contiguous()


class LatentCache:
    """Latents for (entry, flipped) pairs, in memory, backed by ``.npz`` files when ``to_disk``."""

    def __init__(
        self,
        bundle: ModelBundle,
        entries: list[ImageEntry],
        assignments: list[BucketAssignment],
        *,
        seed: int,
        to_disk: bool = False,
        cache_dir: str | None = None,
    ) -> None:
        self.bundle = bundle
        self.entries = entries
        self.assignments = assignments
        self.seed = seed
        self.to_disk = to_disk
        self.cache_dir = cache_dir
        self.vae_id = vae_identity(bundle.vae)
        self.latents: dict[tuple[int, bool], Any] = {}
        #: FLUX.1 Kontext's control latents (unscaled), beside the latents of the same (entry, flipped)
        self.controls: dict[tuple[int, bool], Any] = {}
        #: an inpainting model's masked-image latents (unscaled VAE means), beside the latents of the same key
        from .inpainting import bundle_kind

        self.inpainting = bundle_kind(bundle)
        self.masked: dict[tuple[int, bool], Any] = {}
        self.meta: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = {}
        self.encoded = 0  # images run through the VAE by this cache (tests and logs)
        self.reused = 0

    def _seed(self, index: int, flipped: bool) -> int:
        return latent_seed(self.seed, self.entries[index], flipped)

    def fill(self, wanted: list[tuple[int, bool]], *, is_main: bool = True, progress: Any = None) -> None:
        """Make every wanted latent available; encode only what no valid file provides."""
        import numpy as np
        import torch

        from .data import load_pixels
        from .kontext_data import has_control

        by_entry: dict[int, list[bool]] = {}
        for index, flipped in wanted:
            by_entry.setdefault(index, []).append(flipped)
        for index, flips in by_entry.items():
            entry, assignment = self.entries[index], self.assignments[index]
            key = (
                image_key(entry, assignment, self.vae_id, inpainting=self.inpainting is not None)
                if self.to_disk
                else ""
            )
            path = cache_file(entry, assignment, self.vae_id, self.cache_dir) if self.to_disk else None
            stored: dict[str, Any] = {}
            if path is not None and path.exists():
                try:
                    with np.load(path, allow_pickle=False) as data:
                        if str(data["key"]) == key:
                            stored = {name: data[name] for name in data.files}
                except Exception:  # unreadable, truncated or foreign file: encode again
                    stored = {}
            changed = False
            for flipped in flips:
                if has_control(entry):
                    changed |= self._fill_control(index, flipped, stored)
                if self.inpainting is not None:
                    changed |= self._fill_masked(index, flipped, stored)
                name = "latents_flipped" if flipped else "latents"
                if name in stored:
                    self.latents[(index, flipped)] = torch.from_numpy(np.array(stored[name]))
                    self.meta[index] = (tuple(stored["original_size"]), tuple(stored["crop"]))
                    self.reused += 1
                    continue
                pixels, original, crop = load_pixels(entry, assignment, flip=flipped)
                latent = encode_pixels(self.bundle, torch.from_numpy(pixels)[None], [self._seed(index, flipped)])[0]
                self.encoded += 1
                self.latents[(index, flipped)] = latent
                self.meta[index] = (tuple(original), tuple(crop))
                stored[name] = latent.numpy()
                stored["original_size"] = np.array(original)
                stored["crop"] = np.array(crop)
                changed = True
            if changed and path is not None and is_main:
                stored["key"] = np.array(key)
                buffer = io.BytesIO()
                np.savez(buffer, **{k: v for k, v in stored.items()})
                os.makedirs(path.parent, exist_ok=True)
                atomic_write_bytes(path, buffer.getvalue())
            if progress is not None:
                progress.update(1)

    def _fill_control(self, index: int, flipped: bool, stored: dict[str, Any]) -> bool:
        """The control latent of (index, flipped) from ``stored`` or encoded into it; True when encoded."""
        import numpy as np
        import torch

        from .kontext_data import control_seed, encode_controls, load_control_pixels

        name = "control_flipped" if flipped else "control"
        if name in stored:
            self.controls[(index, flipped)] = torch.from_numpy(np.array(stored[name]))
            return False
        entry = self.entries[index]
        pixels = load_control_pixels(entry, self.assignments[index], flip=flipped)
        latent = encode_controls(self.bundle, [pixels], [control_seed(self.seed, entry, flipped)])[0]
        self.controls[(index, flipped)] = latent
        stored[name] = latent.numpy()
        return True

    def _fill_masked(self, index: int, flipped: bool, stored: dict[str, Any]) -> bool:
        """The masked-image latent of (index, flipped) from ``stored`` or encoded into it; True when encoded."""
        import numpy as np
        import torch

        from .data import load_pixels
        from .inpainting import conditioning_pixels, encode_mean, pixel_mask

        name = "masked_flipped" if flipped else "masked"
        if name in stored:
            self.masked[(index, flipped)] = torch.from_numpy(np.array(stored[name]))
            return False
        entry, assignment = self.entries[index], self.assignments[index]
        pixels, _, _ = load_pixels(entry, assignment, flip=flipped)
        mask = pixel_mask(entry, assignment, flip=flipped, crop=None)
        latent = encode_mean(self.bundle, conditioning_pixels(entry, assignment, pixels, mask, flip=flipped)[None])[0]
        self.masked[(index, flipped)] = latent
        stored[name] = latent.numpy()
        return True

    def masked_latent(self, index: int, flipped: bool) -> Any:
        """The unscaled masked-image latent ``[C, h, w]`` of an inpainting model's sample (KeyError without)."""
        return self.masked[(index, flipped)]

    def control(self, index: int, flipped: bool) -> Any:
        """The unscaled control latent ``[C, h, w]`` of a FLUX.1 Kontext pair (KeyError without one)."""
        return self.controls[(index, flipped)]

    def get(self, index: int, flipped: bool) -> tuple[Any, tuple[int, ...], tuple[int, ...]]:
        """``(unscaled latent [4, h, w], original (h, w), crop (top, left))``."""
        original, crop = self.meta[index]
        return self.latents[(index, flipped)], original, crop


class TextCache:
    """Encoded prompts of every caption variant, for methods whose text encoders stay frozen."""

    def __init__(
        self,
        bundle: ModelBundle,
        method: Any,
        entries: list[ImageEntry],
        *,
        seed: int,
        variants: int,
        dtype: Any = None,
        to_disk: bool = False,
        cache_dir: str | None = None,
        partial: tuple[str, ...] = (),
    ) -> None:
        self.bundle = bundle
        #: the text encoders (components) whose outputs alone are cached while the others train; empty: all
        self.partial = partial
        self.dtype = dtype  # stored precision: the mixed-precision dtype (the UNet consumes that anyway)
        self.method = method
        self.entries = entries
        self.seed = seed
        self.to_disk = to_disk  # also keep the encodings in files per dataset folder (:mod:`.text_store`)
        self.cache_dir = cache_dir
        self.variants: list[list[str]] = []
        self.dropped: list[list[str]] = []
        self.encodings: dict[str, Conditioning] = {}
        self.empty_chunk: Any = None
        self.encoded = 0  # prompts run through the text encoders by this cache (tests and logs)
        self.reused = 0  # prompts read from a text-store file
        #: the sample prompts' encodings (:func:`sdcore.train.sampling.encode_sample_prompts`), so sample
        #: renders leave the text encoders on the CPU; None without sample prompts
        self.sample_conditioning: ConditioningMemo | None = None
        #: with :attr:`partial`: the cached encoders' outputs for the sample prompts (their renders run the training
        #: encoders live and leave the cached ones on the CPU); None otherwise
        self.sample_parts: PartMemo | None = None
        self._build_variants(max(1, variants))

    def _build_variants(self, count: int) -> None:
        import random

        from .data import caption_is_random, make_caption

        method_random = self.method.capabilities().random_captions
        for index, entry in enumerate(self.entries):
            n = count if method_random or caption_is_random(entry) else 1
            self.variants.append(
                [
                    make_caption(self.method, entry, random.Random(sample_seed(self.seed, "caption-variant", index, v)))
                    for v in range(n)
                ]
            )
            # caption_dropout_every_n_epochs: the variants of a dropping epoch (the method's template
            # of the empty caption), chosen by the epoch in :meth:`choose`
            every = getattr(entry.subset, "caption_dropout_every_n_epochs", 0)
            self.dropped.append(
                [
                    make_caption(
                        self.method,
                        entry,
                        random.Random(sample_seed(self.seed, "caption-variant", index, v)),
                        epoch=every - 1,
                    )
                    for v in range(count if method_random else 1)
                ]
                if every > 0
                else []
            )

    def prompts_by_folder(self) -> dict[str, set[str]]:
        """Every prompt this run may use, by the dataset folder of the images that use it."""
        folders: dict[str, set[str]] = {}
        for entry, variants, dropped in zip(self.entries, self.variants, self.dropped, strict=True):
            folders.setdefault(str(entry.subset.image_dir), set()).update(variants, dropped)
        return folders

    def _run(self, prompts: list[str]) -> Conditioning:
        """What the cache keeps for ``prompts``: the method's encoding, or with :attr:`partial` the cached
        encoders' part of it."""
        if self.partial:
            return self.method.encode_partial(self.bundle, prompts)  # type: ignore[no-any-return]
        return self.method.encode(self.bundle, prompts)  # type: ignore[no-any-return]

    def fill(self, *, batch_size: int = 16, is_main: bool = True) -> None:
        """Encode every distinct prompt once, batching prompts of the same chunk count; with ``to_disk``,
        first take what this setup's store files hold and (main process) write back what was encoded."""
        import torch

        dtype = self.dtype or torch.float32
        prompts = sorted({p for variants in (*self.variants, *self.dropped) for p in variants})
        with torch.no_grad():
            empty = self._run([""])
            self.empty_chunk = empty.hidden_states[0].detach().to(device="cpu", dtype=dtype)
        stores: dict[Path, set[str]] = {}
        digest = ""
        if self.to_disk:
            from .text_store import PROBE_PROMPTS, probe_digest, read_store, store_file

            with torch.no_grad():
                # a partial cache's files are told apart from a full cache's (and the reverse) by the encoders named
                digest = probe_digest(
                    [self._run([p]).to("cpu", dtype) for p in PROBE_PROMPTS],
                    part=self.partial,
                    added=added_rows_identity(self.bundle, self.partial),
                )
            for folder, members in self.prompts_by_folder().items():
                stores.setdefault(store_file(folder, digest, self.cache_dir), set()).update(members)
            for path, members in stores.items():
                found = read_store(path, digest, members - set(self.encodings))
                self.encodings.update(found)
                self.reused += len(found)
        missing = [p for p in prompts if p not in self.encodings]
        self._encode(missing, dtype, batch_size)
        self.encoded += len(missing)
        if stores and is_main:
            from .text_store import write_store

            new = set(missing)
            for path, members in stores.items():
                if members & new:  # the file lacked some of this run's prompts (or did not exist)
                    write_store(path, digest, {p: self.encodings[p] for p in members})

    def _encode(self, prompts: list[str], dtype: Any, batch_size: int) -> None:
        import torch

        from ..models.text import chunk_count

        groups: dict[int, list[str]] = {}
        tokenizer = self.bundle.tokenizers[0]
        for prompt in prompts:
            groups.setdefault(chunk_count(tokenizer, [prompt]), []).append(prompt)
        with torch.no_grad():
            width = self.empty_chunk.shape[0]
            for chunks, members in sorted(groups.items()):
                for start in range(0, len(members), batch_size):
                    part = members[start : start + batch_size]
                    cond = self._run(part)
                    if len(part) > 1 and cond.hidden_states.shape[-2] != chunks * width:
                        # the method's encode changed the length (e.g. expanded words): one by one
                        for prompt in part:
                            self.encodings[prompt] = self._run([prompt]).to("cpu", dtype)
                        continue
                    cond = cond.to("cpu", dtype)
                    for i, prompt in enumerate(part):
                        self.encodings[prompt] = cond.select(i)

    def choose(self, entry: int, ref_seed: int, *, epoch: int = -1) -> str:
        from .data import caption_dropped

        dropping = bool(self.dropped[entry]) and caption_dropped(self.entries[entry], epoch)
        variants = self.dropped[entry] if dropping else self.variants[entry]
        return variants[ref_seed % len(variants)]

    def batch(self, prompts: list[str]) -> Conditioning:
        """Stack cached encodings, padding shorter prompts with empty chunks."""

        from ..models.text import pad_conditioning
        from .method import Conditioning

        conds = [self.encodings[p] for p in prompts]
        chunks = max(c.hidden_states.shape[-2] for c in conds) // self.empty_chunk.shape[0]
        return Conditioning.cat([pad_conditioning(c, chunks, self.empty_chunk) for c in conds])


def captions_follow_step(options: Any, data: Any) -> bool:
    """Whether kohya's token warm-up changes some caption with the step (then no text cache)."""
    from .data import caption_depends_on_step, total_steps_for

    if not any(getattr(entry.subset, "token_warmup_step", 0) > 0 for entry in data.entries):
        return False
    total = total_steps_for(options, data)[0]
    return any(caption_depends_on_step(entry, total) for entry in data.entries)


def partial_text_encoders(options: Any, caps: Any, family: Any, method: Any = None) -> tuple[str, ...]:
    """The text encoders (component names) whose outputs ``--cache-text-encoder-outputs`` caches while the
    method trains the others: the family's ``partial_text_cache`` (SD3/FLUX.1: T5-XXL) when none of them trains
    (kohya caches T5 while CLIP trains; a trained T5 caches nothing, as kohya refuses the pair) and some other
    encoder does. Empty when the run caches all of its text encoders' outputs or none (SD1/2/XL, Chroma, a
    method that does not say which encoders train or encodes in its own way)."""
    from ..models.family import get_family

    trained = getattr(caps, "trained_text_encoders", None)
    if not options.cache_text_encoder_outputs or not caps.trains_text_encoder or not caps.cacheable_text:
        return ()
    if trained is None or family is None:
        return ()
    if method is not None and not method.encodes_as_family():
        return ()  # its own encoding (TI's vectors, unpadded tokens): no family split
    spec = get_family(family)
    cached = [te for te in spec.text_encoders if te.component in spec.partial_text_cache]
    others = [te for te in spec.text_encoders if te.component not in spec.partial_text_cache]
    if not cached or any(te.slot in trained for te in cached) or not any(te.slot in trained for te in others):
        return ()
    return tuple(te.component for te in cached)


def uses_text_cache(options: Any, data: Any, *, trains_text_encoder: bool, partial: bool = False) -> bool:
    """Whether a run encodes its captions once (:class:`TextCache`; with ``partial`` the frozen encoders'
    part, :func:`partial_text_encoders`): then every sample's caption is one of the cached variants, so
    ``--debug-dataset`` picks them the same way."""
    return bool(
        options.cache_text_encoder_outputs
        and (not trains_text_encoder or partial)
        and not captions_follow_step(options, data)
    )


def build_caches(
    bundle: ModelBundle,
    method: Any,
    options: Any,
    data: Any,
    accelerator: Any,
    *,
    trains_text_encoder: bool,
    needs_pixels: bool,
    progress: Any,
    partial: tuple[str, ...] = (),
) -> tuple[LatentCache | None, TextCache | None]:
    """Fill the latent cache (``--cache-latents``) and the text-encoder output cache
    (``--cache-text-encoder-outputs``, when nothing in the text encoders trains, or, with ``partial``
    (:func:`partial_text_encoders`), for those encoders alone: they then go to the CPU, the others stay).

    With several processes and a disk cache, the main process encodes and writes the files and the
    others read them. Off the CPU, the VAE and text encoders move back to the CPU once cached
    (sampling brings the VAE back; the text encoders only when the sample prompts could not be encoded
    here first, :attr:`TextCache.sample_conditioning`). ``progress`` is a :class:`sdcore.train.progress.Progress`.
    """
    from ..dtypes import torch_dtype

    latent_cache = text_cache = None
    device = accelerator.device
    is_main = bool(accelerator.is_main_process)
    if options.cache_latents:
        latent_cache = LatentCache(
            bundle,
            data.entries,
            data.assignments,
            seed=options.seed,
            to_disk=options.cache_latents_to_disk,
            cache_dir=getattr(options, "cache_dir", None),
        )
        wanted = data.needed_latents()
        with progress.cache_bar(len({w[0] for w in wanted}), "caching latents") as bar:
            if latent_cache.to_disk and accelerator.num_processes > 1:
                if is_main:
                    latent_cache.fill(wanted, is_main=True, progress=bar)
                accelerator.wait_for_everyone()
                if not is_main:
                    latent_cache.fill(wanted, is_main=False, progress=bar)
            else:
                latent_cache.fill(wanted, is_main=is_main, progress=bar)
        if latent_cache.encoded or latent_cache.reused:
            progress.say(f"latents: {latent_cache.encoded} encoded, {latent_cache.reused} reused from disk")
        if device.type != "cpu" and not needs_pixels:
            bundle.vae.to("cpu")  # frees accelerator memory; samples move it back
    warmup = captions_follow_step(options, data)
    if options.cache_text_encoder_outputs and (not trains_text_encoder or partial) and warmup:
        progress.say("text-encoder outputs are not cached: the token warm-up changes captions with the step")
    if uses_text_cache(options, data, trains_text_encoder=trains_text_encoder, partial=bool(partial)):
        text_cache = TextCache(
            bundle,
            method,
            data.entries,
            seed=options.seed,
            variants=options.caption_variants,
            dtype=torch_dtype(options.mixed_precision),
            to_disk=options.cache_text_encoder_outputs_to_disk,
            cache_dir=getattr(options, "cache_dir", None),
            partial=partial,
        )
        with accelerator.autocast():
            if text_cache.to_disk and accelerator.num_processes > 1:  # the main process writes, the others read
                if is_main:
                    text_cache.fill(is_main=True)
                accelerator.wait_for_everyone()
                if not is_main:
                    text_cache.fill(is_main=False)
            else:
                text_cache.fill(is_main=is_main)
        if text_cache.to_disk:
            progress.say(
                f"text-encoder outputs: {text_cache.encoded} prompts encoded, {text_cache.reused} reused from disk"
            )
        if partial:
            names = ", ".join(_encoder_label(bundle, c) for c in partial)
            progress.say(f"text-encoder outputs cached for {names} (the other text encoders train, run every step)")
        if options.sample_prompts and is_main:  # only the main process renders samples
            from .sampling import encode_sample_prompts

            if partial:  # a training CLIP encodes them at each render: T5's parts alone are kept (kohya's too)
                from ..generate.conditioning_memo import PartMemo

                parts = PartMemo()
                with parts.recording():
                    recorded = encode_sample_prompts(bundle, options, device=device, method=method)
                text_cache.sample_parts = parts if recorded is not None and parts.entries else None
                if text_cache.sample_parts is not None:
                    progress.say(f"sample prompts: {len(parts.entries)} encodings of the cached text encoders kept")
            else:
                text_cache.sample_conditioning = encode_sample_prompts(bundle, options, device=device, method=method)
                if text_cache.sample_conditioning is not None:
                    progress.say(f"sample prompts: {len(text_cache.sample_conditioning.texts())} texts encoded")
        if device.type != "cpu":
            for te in cached_text_encoders(bundle, partial):
                te.to("cpu")  # its outputs are cached: its weights leave the device (renders bring it back)
            if partial and device.type == "cuda":
                import torch

                torch.cuda.empty_cache()  # T5's blocks back to the driver, so the device's free memory shows it
    return latent_cache, text_cache


def added_rows_identity(bundle: ModelBundle, partial: tuple[str, ...] = ()) -> str:
    """A digest of the tokens added with their own rows (:mod:`sdcore.models.token_embeddings`) to the encoders a
    text cache holds: each table's key, its tokens and ids in the encoder's tokenizer and its vectors' bytes; ``""``
    when none has any (the store digests of every run without added tokens stay as they were). A caption holding
    such a token encodes to what its vectors are, e.g. a LoRA's ``--embedding`` tokens in SD3/FLUX.1's untrained
    T5, whose cache is partial: another init text gives other vectors under the same token names."""
    import torch

    from ..models.token_embeddings import ExtendedTokenEmbedding

    cached = cached_text_encoders(bundle, partial)
    digest = hashlib.sha256()
    found = False
    for index, (encoder, tokenizer) in enumerate(zip(bundle.text_encoders, bundle.tokenizers, strict=False)):
        if encoder is None or all(encoder is not c for c in cached):
            continue
        lookup = encoder.get_input_embeddings()
        if not isinstance(lookup, ExtendedTokenEmbedding):
            continue
        for key, ids, vectors in lookup.table_items():
            found = True
            tokens = tokenizer.convert_ids_to_tokens(ids)
            digest.update(json.dumps([index, key, ids, tokens, list(vectors.shape)]).encode())
            flat = vectors.detach().to("cpu", torch.float32).contiguous()
            digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest() if found else ""


def cached_text_encoders(bundle: ModelBundle, partial: tuple[str, ...] = ()) -> list[Any]:
    """The text encoders whose outputs a text cache holds: all, or with ``partial`` those components."""
    if not partial:
        return list(bundle.text_encoders)
    specs = bundle.family_spec.text_encoders
    return [
        te
        for spec, te in zip(specs, bundle.text_encoders, strict=False)
        if te is not None and spec.component in partial
    ]


def _encoder_label(bundle: ModelBundle, component: str) -> str:
    """``T5-XXL`` for ``text_encoder_2`` of a FLUX.1 (the kind as users name it)."""
    kinds = {spec.component: spec.kind for spec in bundle.family_spec.text_encoders}
    return kinds.get(component, component).upper()
