"""Micro-batches: sample references -> :class:`~sdcore.train.method.Batch` (latents, captions,
SDXL sizes, pixels and loss masks), reading the caches when they exist and prefetching images in
threads when they do not."""

from __future__ import annotations

import dataclasses
import random
from typing import TYPE_CHECKING, Any

from .method import Batch, Capabilities, TrainingMethod
from .options import TrainOptions

if TYPE_CHECKING:
    from ..models.bundle import ModelBundle
    from .cache import LatentCache, TextCache
    from .data import SampleRef, SampleView, TrainData


class Prefetcher:
    """Decodes the next micro-batches' images in threads while the current step runs (only when
    images are read every step: no latent cache, or a method that needs pixels). Loading is a pure
    function of the image, so prefetching never changes results."""

    def __init__(self, workers: int = 2) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sdcore-prefetch")
        self.futures: dict[Any, Any] = {}

    def submit(self, key: Any, fn: Any, *args: Any, **kwargs: Any) -> None:
        if key not in self.futures:
            self.futures[key] = self.pool.submit(fn, *args, **kwargs)

    def take(self, key: Any) -> Any:
        future = self.futures.pop(key, None)
        return None if future is None else future.result()

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.futures.clear()


class BatchMaker:
    """Builds the batches of one run."""

    def __init__(
        self,
        data: TrainData,
        method: TrainingMethod[Any],
        caps: Capabilities,
        options: TrainOptions,
        bundle: ModelBundle,
        device: Any,
        *,
        latent_cache: LatentCache | None = None,
        text_cache: TextCache | None = None,
        total_steps: int = 0,
    ) -> None:
        self.data = data
        self.method = method
        self.caps = caps
        self.options = options
        self.bundle = bundle
        self.device = device
        self.latent_cache = latent_cache
        self.text_cache = text_cache
        self.total_steps = total_steps  # kohya's max_train_steps, for the token warm-up
        self.prefetcher: Prefetcher | None = None
        self._mask_cache: dict[tuple[int, SampleView], Any] = {}
        #: --tread-route's mask reads, by image, view, latent size and whether the dataset mask counts
        self._keep_cache: dict[tuple[int, SampleView, tuple[int, int], bool], Any] = {}
        from .inpainting import bundle_kind

        #: ``"unet"``/``"fill"`` for an inpainting model (its batches carry the mask and masked image), else None
        self.inpainting = bundle_kind(bundle)
        if self.inpainting is not None:  # OneTrainer's mask augmentations act on every sample of a mask input
            data.mask_input = True
        self._inpaint_masks: dict[tuple[int, SampleView], Any] = {}
        #: ``--inpainting-masks random``: kohya's random masks, drawn per sample and step (the masked image with them)
        self.random_masks = self.inpainting is not None and options.inpainting_masks == "random"
        if self.random_masks and latent_cache is not None:  # the pre-flight says it before loading
            from ..errors import ConfigError
            from .inpainting import RANDOM_CACHE

            raise ConfigError(RANDOM_CACHE)
        self._blank_latents: dict[tuple[int, int], Any] = {}
        from .kontext_data import has_control

        family = getattr(bundle, "family", None)
        paired = any(has_control(e) for e in data.entries)
        if family != "flux" and paired:  # the pre-flight says it before loading
            from ..errors import ConfigError

            raise ConfigError(
                f"control images train FLUX.1 Kontext; this model is {family}, which takes no reference image"
            )
        if family == "flux" and not paired:
            from .kontext_data import warn_unpaired_kontext

            warn_unpaired_kontext(bundle)

    @property
    def reads_images(self) -> bool:
        """Images are decoded every step (worth prefetching)."""
        return self.latent_cache is None or self.caps.needs_pixels

    def make_batch(self, refs: list[SampleRef], *, with_conditioning: bool = True, step: int = 0) -> Batch:
        """Latents (scaled), captions and SDXL sizes for the samples ``refs``, used by optimizer
        step ``step`` (steps done before it: kohya's token warm-up reads it)."""
        import torch

        from .cache import encode_pixels

        data, bundle = self.data, self.bundle
        latents: list[Any] = []
        captions: list[str] = []
        originals: list[tuple[int, int]] = []
        crops: list[tuple[int, int]] = []
        targets: list[tuple[int, int]] = []
        pixels_list: list[Any] = []
        is_class: list[bool] = []
        weights: list[float] = []
        strengths: list[float] = []
        to_encode: list[tuple[int, Any, int]] = []  # (slot, pixels, seed) when latents are not cached
        loaded: list[Any] = []  # each sample's pixels when decoded now (an inpainting model's masked image)
        for ref in refs:
            entry, assignment = data.entries[ref.entry], data.assignments[ref.entry]
            view = data.view_of(ref)
            flipped = view.flip
            pixels = None
            if self.latent_cache is not None:
                latent, original, crop = self.latent_cache.get(ref.entry, flipped)
                latents.append(latent)
            else:
                array, original, crop = self.pixels(ref.entry, view)
                pixels = torch.from_numpy(array)
                to_encode.append((len(latents), pixels, self.latent_seed(ref.entry, flipped)))
                latents.append(None)
            loaded.append(pixels)
            if self.caps.needs_pixels:
                if pixels is None:
                    array, _, _ = self.pixels(ref.entry, view)
                    pixels = torch.from_numpy(array)
                pixels_list.append(pixels)
            captions.append(self.caption(ref, step))
            originals.append((int(original[0]), int(original[1])))
            crops.append((int(crop[0]), int(crop[1])))
            w, h = assignment.bucket
            targets.append((h, w))
            is_class.append(entry.is_class)
            weight = float(self.options.prior_loss_weight) if entry.is_class else 1.0
            weights.append(weight * float(getattr(entry.subset, "loss_weight", 1.0)))  # OneTrainer's loss_weight
            strengths.append(float(getattr(entry.subset, "network_strength", 1.0)))
        if to_encode:
            encoded = encode_pixels(bundle, torch.stack([p for _, p, _ in to_encode]), [s for _, _, s in to_encode])
            for (slot, _, _), latent in zip(to_encode, encoded, strict=True):
                latents[slot] = latent
        latent_batch = bundle.normalize_latents(torch.stack(latents).to(self.device))
        batch = Batch(
            latents=latent_batch,
            captions=captions,
            is_class=torch.tensor(is_class, device=self.device),
            loss_weights=torch.tensor(weights, device=self.device),
            original_sizes=originals,
            crop_coords=crops,
            target_sizes=targets,
            pixels=torch.stack(pixels_list).to(self.device) if self.caps.needs_pixels else None,
            extra={"refs": refs},
        )
        if any(value != 1.0 for value in strengths):  # else None: the usual path, untouched
            batch.network_strength = torch.tensor(strengths, dtype=torch.float32, device=self.device)
        unmasked = self.unmasked(refs)
        batch.masks = self.loss_masks(refs, latent_batch.shape[-2:], unmasked=unmasked)
        if self.options.tread_route and batch.masks is not None:  # --tread-route never drops the masked tokens
            from .token_routing import KEEP_MASK

            keep = self.routing_keep_masks(refs, latent_batch.shape[-2:], unmasked)
            if keep is not None:
                batch.extra[KEEP_MASK] = keep
        if self.inpainting is not None:
            batch.inpainting_mask, batch.masked_latents = self.inpainting_conditioning(
                refs, latent_batch.shape[-2:], loaded, unmasked
            )
        batch.reference_latents = self.reference_latents(refs)
        if self.text_cache is not None and with_conditioning:
            cached = self.text_cache.batch(captions).to(self.device)
            if self.text_cache.partial:  # the frozen encoders' part: the step runs the training ones
                batch.cached_text = cached
            else:
                batch.conditioning = cached
        return batch

    def reference_latents(self, refs: list[SampleRef]) -> Any:
        """FLUX.1 Kontext's reference latents ``[B, C, h, w]`` (scaled) of the samples' control images, or None
        when the dataset has none: from the latent cache, else each control image loaded with its sample's own
        view (flip, crop) and encoded now (:mod:`.kontext_data`)."""
        import torch

        from .kontext_data import control_seed, encode_controls, has_control, load_control_pixels

        entries = [self.data.entries[ref.entry] for ref in refs]
        if not any(has_control(e) for e in entries):
            return None
        latents: list[Any] = []
        pending: list[tuple[int, Any, int]] = []
        for ref, entry in zip(refs, entries, strict=True):
            view = self.data.view_of(ref)
            if self.latent_cache is not None:
                latents.append(self.latent_cache.control(ref.entry, view.flip))
                continue
            assignment = view.apply(self.data.assignments[ref.entry])
            pixels = load_control_pixels(entry, assignment, flip=view.flip)
            pending.append((len(latents), pixels, control_seed(self.options.seed, entry, view.flip)))
            latents.append(None)
        if pending:
            encoded = encode_controls(self.bundle, [p for _, p, _ in pending], [s for _, _, s in pending])
            for (slot, _, _), latent in zip(pending, encoded, strict=True):
                latents[slot] = latent
        return self.bundle.normalize_latents(torch.stack(latents).to(self.device))

    def unmasked(self, refs: list[SampleRef]) -> set[int]:
        """Positions in ``refs`` that an inpainting model trains with a full mask and a blank masked image
        (``--inpainting-unmasked-probability``, each sample's own draw: :func:`.inpainting.unmasked_draw`)."""
        from .inpainting import unmasked_draw

        p = float(self.options.inpainting_unmasked_probability)
        if self.inpainting is None or p <= 0:
            return set()
        return {i for i, ref in enumerate(refs) if unmasked_draw(ref.seed(self.options.seed, "inpainting-unmasked"), p)}

    def inpainting_conditioning(
        self, refs: list[SampleRef], latent_size: Any, loaded: list[Any], unmasked: set[int]
    ) -> tuple[Any, Any]:
        """An inpainting model's ``(mask, masked latents)`` for the samples ``refs`` (:mod:`.inpainting`): the
        mask at latent size in the denoiser's layout, and the masked image's latents (scaled) from the latent
        cache or encoded now from the pixels the sample's latents were made from (``loaded``; a custom conditioning
        image instead where the sample has one: :func:`.inpainting.conditioning_pixels`); an ``unmasked`` sample gets the
        full mask and the latents of a blank (all-zero) image of its size. With ``--inpainting-masks random`` each
        draw of a sample gets its own random mask (:func:`.inpainting.random_pixel_mask`), never cached."""
        import torch

        from .inpainting import (
            conditioning_pixels,
            encode_mean,
            latent_mask,
            masked_pixels,
            pixel_mask,
            random_pixel_mask,
        )

        kind = self.inpainting
        assert kind is not None
        size = (int(latent_size[0]), int(latent_size[1]))
        masks: list[Any] = []
        latents: list[Any] = [None] * len(refs)
        pending: list[tuple[int, Any]] = []
        for i, ref in enumerate(refs):
            view = self.data.view_of(ref)
            assignment = view.apply(self.data.assignments[ref.entry])
            if i in unmasked:
                ones = torch.ones(size[0] * 8, size[1] * 8)
                masks.append(latent_mask(ones, size, kind))
                latents[i] = self.blank_latent(size)
                continue
            pixel = None
            if self.random_masks:  # kohya's --train_inpainting: a new mask for each draw of the sample
                pixel = random_pixel_mask(assignment, ref.seed(self.options.seed, "inpainting-mask"))
                masks.append(latent_mask(pixel, size, kind))
                pending.append((i, masked_pixels(loaded[i], pixel)))
                continue
            key = (ref.entry, dataclasses.replace(view, color=None))  # colour: same mask
            mask = self._inpaint_masks.get(key)
            if mask is None:
                pixel = pixel_mask(self.data.entries[ref.entry], assignment, flip=view.flip, crop=view.crop)
                mask = latent_mask(pixel, size, kind)
                if view.crop is None and view.resized is None and view.augment is None:
                    self._inpaint_masks[key] = mask
            masks.append(mask)
            if self.latent_cache is not None:  # encoded with the latents, from the same pixels
                latents[i] = self.latent_cache.masked_latent(ref.entry, view.flip)
                continue
            entry = self.data.entries[ref.entry]
            if pixel is None:
                pixel = pixel_mask(entry, assignment, flip=view.flip, crop=view.crop)
            pending.append((i, conditioning_pixels(entry, assignment, loaded[i], pixel, flip=view.flip, crop=view.crop,
                                                   color=view.color)))  # fmt: skip
        if pending:
            encoded = encode_mean(self.bundle, torch.stack([p for _, p in pending]))
            for (i, _), latent in zip(pending, encoded, strict=True):
                latents[i] = latent
        masked = self.bundle.normalize_latents(torch.stack(latents).to(self.device))
        return torch.stack(masks).to(self.device), masked

    def blank_latent(self, size: tuple[int, int]) -> Any:
        """The unscaled latents of an all-zero (grey) image of latent size ``size``, encoded once per size
        (mgds' ``RandomLatentMaskRemove`` encodes one per resolution)."""
        import torch

        from .inpainting import encode_mean

        if size not in self._blank_latents:
            self._blank_latents[size] = encode_mean(self.bundle, torch.zeros(1, 3, size[0] * 8, size[1] * 8))[0]
        return self._blank_latents[size]

    def caption(self, ref: SampleRef, step: int = 0) -> str:
        """The prompt sample ``ref`` trains with at optimizer step ``step``: a cached variant when the
        text-encoder outputs are cached, else the caption processed with the sample's own generator."""
        from .data import make_caption

        seed = self.options.seed
        if self.text_cache is not None:
            return self.text_cache.choose(ref.entry, ref.seed(seed, "caption"), epoch=ref.epoch)
        rng = random.Random(ref.seed(seed, "caption"))
        entry = self.data.entries[ref.entry]
        return make_caption(self.method, entry, rng, epoch=ref.epoch, step=step, total_steps=self.total_steps)

    def loss_masks(self, refs: list[SampleRef], latent_size: Any, *, unmasked: set[int] | None = None) -> Any:
        """``[B, 1, h, w]`` loss weights, or ``None``: the product of the method's mask
        (:meth:`~sdcore.train.method.TrainingMethod.loss_mask`) and the dataset's (kohya's
        ``alpha_mask`` / ``--masked-loss`` mask images, OneTrainer's ``-masklabel.png``:
        :func:`~sdcore.train.data.load_mask`); the step weighs the loss with them
        (:func:`~sdcore.train.data.weigh_by_mask`).
        Cached per image and view (flip; not for random crops, which differ every time). The positions in
        ``unmasked`` (an inpainting model's full-mask draws) leave out the dataset's mask, as OneTrainer's loss
        reads the replaced mask; so do segmentation masks when the batch's ``--masked-loss-probability`` draw
        (:func:`~sdcore.train.data.seeded_draw`, one per batch, as SimpleTuner's per loss call) fails."""
        import torch

        from .data import is_segmentation, seeded_draw

        size = (int(latent_size[0]), int(latent_size[1]))
        segmentation = [is_segmentation(self.data.entries[ref.entry]) for ref in refs]
        skip = any(segmentation) and not seeded_draw(
            refs[0].seed(self.options.seed, "masked-loss-probability"), float(self.options.masked_loss_probability)
        )
        masks = []
        for i, ref in enumerate(refs):
            view = self.data.view_of(ref)
            if (unmasked and i in unmasked) or (skip and segmentation[i]):
                masks.append(self.sample_mask(ref.entry, view, size, dataset_mask=False))
                continue
            key = (ref.entry, dataclasses.replace(view, color=None))  # colour: same mask
            mask = self._mask_cache.get(key)
            if key not in self._mask_cache:
                mask = self.sample_mask(ref.entry, key[1], size)
                if view.crop is None and view.resized is None and view.augment is None:
                    self._mask_cache[key] = mask
            masks.append(mask)
        if all(mask is None for mask in masks):
            return None
        ones = torch.ones(1, *size)
        return torch.stack([ones if mask is None else mask.reshape(1, *size).float() for mask in masks]).to(self.device)

    def routing_keep_masks(self, refs: list[SampleRef], latent_size: Any, unmasked: set[int]) -> Any:
        """``--tread-route``: the image tokens each sample's masks force-keep, ``[B, tokens]`` bool
        (:func:`~sdcore.train.token_routing.token_keep_mask` at the family's token grid), or None when no sample
        forces any. The dataset mask is the one the loss reads, at latent size and in 0..1, before
        ``--masked-loss-unmasked-weight`` and ``--masked-loss-normalize`` reshape it into weights (SimpleTuner
        thresholds the mask image itself): above 0.5. The method's own per-pixel loss map
        (:meth:`~sdcore.train.method.TrainingMethod.loss_mask`, DreamArtist's attention maps) is a weight whose
        normal value is 1 (a sample without a map): the tokens it weighs more than a tenth above that
        (:data:`~sdcore.train.token_routing.METHOD_MAP_KEEP_ABOVE`) are kept too, so a map at its normal weight
        (as an image file rounds it) forces nothing, as no map does. A sample without either (or an inpainting model's full-mask draw, for
        the dataset mask) forces no token: nothing in it weighs more than the rest."""
        import torch

        from .data import has_dataset_mask, load_mask, mask_filter, mask_to_latent
        from .token_routing import METHOD_MAP_KEEP_ABOVE, token_keep_mask

        routed = self.bundle.family_spec.token_routing
        if routed is None:  # the pre-flight refuses --tread-route for such a family
            return None
        size = (int(latent_size[0]), int(latent_size[1]))
        keeps: list[Any] = []
        for i, ref in enumerate(refs):
            entry = self.data.entries[ref.entry]
            dataset_mask = i not in unmasked and has_dataset_mask(entry)
            view = self.data.view_of(ref)
            key = (ref.entry, dataclasses.replace(view, color=None), size, dataset_mask)  # colour: same mask
            if key not in self._keep_cache:
                assignment = view.apply(self.data.assignments[ref.entry])
                # cached as the token grid's bools (1/16 of a patch-2 latent mask's floats, a byte each)
                keep = None
                pixel = load_mask(entry, assignment, flip=view.flip) if dataset_mask else None
                if pixel is not None:
                    keep = token_keep_mask(mask_to_latent(pixel, size, mask_filter(entry))[None], routed.patch)[0]
                weights = self.method.loss_mask(entry, assignment, flipped=view.flip, latent_size=size)
                if weights is not None:
                    own = token_keep_mask(weights.reshape(1, 1, *size), routed.patch, METHOD_MAP_KEEP_ABOVE)[0]
                    keep = own if keep is None else keep | own
                if view.crop is not None or view.resized is not None or view.augment is not None:
                    keeps.append(keep)  # a random crop or augmentation: another mask every time
                    continue
                self._keep_cache[key] = keep
            keeps.append(self._keep_cache[key])
        if all(keep is None for keep in keeps):
            return None
        tokens = (size[0] // routed.patch) * (size[1] // routed.patch)
        nothing = torch.zeros(tokens, dtype=torch.bool)
        return torch.stack([nothing if keep is None else keep for keep in keeps]).to(self.device)

    def sample_mask(self, index: int, view: SampleView, size: tuple[int, int], *, dataset_mask: bool = True) -> Any:
        """The method's mask times the dataset's (unless not ``dataset_mask``) for one sample view, ``[1, h, w]``
        or None."""
        from .data import clamp_unmasked, dataset_mask_at_latent, has_dataset_mask, load_mask, normalize_mask_area

        entry = self.data.entries[index]
        assignment = view.apply(self.data.assignments[index])  # a random crop: the maps are cropped there too
        mask = self.method.loss_mask(entry, assignment, flipped=view.flip, latent_size=size)
        if dataset_mask and has_dataset_mask(entry):
            pixel_mask = load_mask(entry, assignment, flip=view.flip)
            if pixel_mask is not None:
                own = clamp_unmasked(
                    dataset_mask_at_latent(entry, pixel_mask, size), self.options.masked_loss_unmasked_weight
                )
                if self.options.masked_loss_normalize:  # by the dataset mask's area, not the method's map
                    own = normalize_mask_area(own)
                mask = own if mask is None else mask.reshape(1, *size).float() * own
        return mask

    def pixels(self, entry: int, view: SampleView | bool) -> tuple[Any, Any, Any]:
        """Decoded pixels of one sample view (a bare bool: flipped or not, centre crop, no colour)."""
        from .data import SampleView, load_pixels

        if isinstance(view, bool):
            view = SampleView(view)
        if self.prefetcher is not None:
            found = self.prefetcher.take((entry, view))
            if found is not None:
                return found  # type: ignore[no-any-return]
        return load_pixels(
            self.data.entries[entry], view.apply(self.data.assignments[entry]), flip=view.flip, color=view.color
        )

    def prefetch(self, refs_groups: list[list[SampleRef]]) -> None:
        """Start decoding the images of the coming micro-batches in background threads."""
        if self.prefetcher is None:
            return
        from .data import load_pixels

        for refs in refs_groups:
            for ref in refs:
                view = self.data.view_of(ref)
                entry, assignment = self.data.entries[ref.entry], self.data.assignments[ref.entry]
                self.prefetcher.submit(
                    (ref.entry, view), load_pixels, entry, view.apply(assignment), flip=view.flip, color=view.color
                )

    def start_prefetching(self) -> None:
        if self.reads_images and self.prefetcher is None:
            self.prefetcher = Prefetcher()

    def stop_prefetching(self) -> None:
        if self.prefetcher is not None:
            self.prefetcher.close()
            self.prefetcher = None

    def latent_seed(self, entry: int, flipped: bool) -> int:
        from .cache import latent_seed

        return latent_seed(self.options.seed, self.data.entries[entry], flipped)
