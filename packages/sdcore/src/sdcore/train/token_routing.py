"""TREAD token routing (``--tread-route RATIO:START:END``; SimpleTuner's ``tread_config``; Krause et al. 2025,
arXiv 2501.04765): while training, a share of the image tokens skips a span of transformer blocks.

What a route does, as SimpleTuner's router does it (its ``helpers/training/tread.py`` and the FLUX.1/SD3
transformers' forwards; only facts are taken from it):

- ``RATIO`` is the share of the image tokens *dropped* from the span: of ``S`` image tokens ``K = S -
  round(S * RATIO)`` go through it. Blocks are counted over the family's block lists in forward order (FLUX.1:
  the double blocks, then the single blocks, as one sequence); a negative index counts from the end
  (``total + index``), and the span includes its ``END`` block.
- At the span's first block the kept tokens are gathered (the text tokens are always kept); at the end of its
  last block the processed kept tokens go back to their places and every skipped token takes the
  representation it had when the span began. Gradients reach both paths.
- Which tokens are kept: SimpleTuner's router mixes a random draw with an importance score by ``l1_reg``, which
  its models never pass (0: a purely random draw), so the draw here is random: uniform noise from the run's own
  generator (:class:`TokenRouter`, seeded from ``--seed``; SimpleTuner's ``seed or 42``), argsorted. Two
  deliberate differences, neither changing which set of tokens a draw keeps on average: the kept tokens keep
  their order in the sequence (so a ratio of 0 computes exactly what an unrouted forward computes), and a family
  that routes a rotary embedding (FLUX.1) draws one selection for the whole batch, because diffusers' attention
  applies one ``[tokens, d]`` RoPE table to every sample (SimpleTuner's own transformer takes one per sample;
  with FLUX.1's usual batch of one there is no difference).
- Loss masks: as SimpleTuner's ``force_keep``, the image tokens inside a sample's loss mask (its mask averaged
  over the token's latent square above 0.5, :func:`token_keep_mask`) are kept in every route and the budget
  grows to hold them (:meth:`TokenRouter.select`); the batch maker puts them in ``Batch.extra[KEEP_MASK]`` and
  the step hands them over around its prediction (:meth:`TokenRouting.keeping`). A shared draw keeps the
  batch's union. Tokens after the target image's (FLUX.1 Kontext's reference) are routed but never forced.
- Only while gradients are computed (``torch.is_grad_enabled()``) and the routing is :attr:`TokenRouting.enabled`:
  samples, validation and generation run under ``no_grad`` and see the whole model. SimpleTuner also asks for
  the denoiser's train mode; sdcore keeps a frozen denoiser in eval mode while a LoRA on it trains, so that
  flag cannot tell training from generation here.

How: the family declares which block arguments carry the image tokens, the text tokens, the RoPE and a mask
(:class:`sdcore.models.family.RoutedInputs`; blocks that take ``[text | image]`` as one sequence, Chroma's
single blocks, are declared ``joint`` and their text part always goes through); the blocks are the ones block
swap finds (:func:`sdcore.train.block_swap.swappable_blocks` over ``ModelFamily.block_lists``). Each block inside a route
gets a wrapper ``forward`` (diffusers' forward is not copied): the first gathers the kept tokens, every one
passes the routed RoPE rows and mask columns, the last puts the sequence back together. Install it before
block swap, which then wraps these wrappers (the swap's recompute reruns them inside its checkpoint).

Gradient checkpointing (diffusers', ``--cpu-offload-checkpointing``, block swap's own) recomputes a block in
backward by calling it again: the wrapper must then use the selection of the forward it recomputes, not draw a
new one (nor the selection of a later forward, e.g. APT's second pass before the backward). A forward's span is
therefore found by the identity of the block's other tensor arguments (the timestep embedding, the RoPE
tables), which every block of one forward gets and which the checkpoints pass again unchanged; a new forward
has new ones and draws anew.
"""

from __future__ import annotations

import contextlib
import inspect
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, SdcoreError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ..models.family import RoutedInputs

FLAG = "--tread-route"
#: ``Batch.extra`` key of a batch's force-keep mask (``[B, tokens]`` bool over the target image's tokens), set by
#: the batch maker from the batch's dataset loss masks and handed to the routing around the prediction
KEEP_MASK = "tread_keep_mask"
#: SimpleTuner's router seed when its config has none (``seed or 42``)
DEFAULT_SEED = 42


@dataclass(frozen=True)
class Route:
    """One span: ``ratio`` of the image tokens skip blocks ``start`` to ``end`` (inclusive; negative from the end)."""

    ratio: float
    start: int
    end: int

    def text(self) -> str:
        """The ``--tread-route`` spelling."""
        return f"{self.ratio:g}:{self.start}:{self.end}"


def parse_route(text: str) -> Route:
    """``"0.5:2:-2"`` -> :class:`Route`; a :class:`ConfigError` naming the value otherwise."""
    parts = str(text).strip().split(":")
    try:
        if len(parts) != 3:
            raise ValueError
        ratio, start, end = float(parts[0]), int(parts[1]), int(parts[2])
    except ValueError:
        raise ConfigError(
            f"{FLAG} {text!r}: write RATIO:START:END, e.g. 0.5:2:-2 (RATIO the share of image tokens dropped, "
            "START and END block indexes, negative from the end)"
        ) from None
    route = Route(ratio, start, end)
    if not 0.0 <= ratio < 1.0:
        raise ConfigError(
            f"{FLAG} {text!r}: the ratio (share of image tokens dropped) must be in [0, 1), got {ratio:g}"
        )
    return route


def parse_routes(texts: Sequence[str]) -> tuple[list[Route], list[str]]:
    """(routes, problems): each malformed value is one problem line."""
    routes, problems = [], []
    for text in texts:
        try:
            routes.append(parse_route(text))
        except ConfigError as exc:
            problems.append(str(exc))
    return routes, problems


def resolve_routes(routes: Sequence[Route], total: int, what: str = "the denoiser") -> tuple[list[Route], list[str]]:
    """The routes with non-negative indexes for a denoiser of ``total`` blocks, and what is wrong with them:
    an index outside the blocks, a start after its end, routes that overlap or are not in forward order."""
    resolved: list[Route] = []
    problems: list[str] = []
    for route in routes:
        start = route.start + total if route.start < 0 else route.start
        end = route.end + total if route.end < 0 else route.end
        if not (0 <= start < total and 0 <= end < total):
            problems.append(
                f"{FLAG} {route.text()}: {what} has {total} transformer blocks (indexes 0 to {total - 1}, or "
                f"-{total} to -1 from the end)"
            )
            continue
        if start > end:
            problems.append(f"{FLAG} {route.text()}: its start block {start} comes after its end block {end}")
            continue
        if resolved and start <= resolved[-1].end:
            problems.append(
                f"{FLAG} {route.text()}: routes must not overlap and must come in forward order (it starts at block "
                f"{start}, the route before it ends at block {resolved[-1].end})"
            )
            continue
        resolved.append(Route(route.ratio, start, end))
    return resolved, problems


def kept_tokens(tokens: int, ratio: float) -> int:
    """How many of ``tokens`` image tokens a route with ``ratio`` keeps (SimpleTuner's ``S - round(S * ratio)``)."""
    return tokens - round(tokens * float(ratio))


@dataclass
class Selection:
    """Which image tokens one route keeps: ``keep`` [B or 1, K] positions, ascending; ``tokens`` = S."""

    keep: torch.Tensor
    tokens: int


class TokenRouter:
    """Draws the kept tokens from its own generator (a CPU one: the same draws on every device), seeded by the run."""

    def __init__(self, seed: int = DEFAULT_SEED) -> None:
        import torch

        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(int(seed))

    def reseed(self, *parts: Any) -> None:
        """Restart the draws from a seed made of ``parts`` (the runtime: run seed, step, process), so a resumed
        run draws what the uninterrupted one drew at the same step."""
        from .noise import sample_seed

        self.generator.manual_seed(sample_seed("tread", *parts))

    def select(
        self,
        batch: int,
        tokens: int,
        ratio: float,
        device: Any = None,
        *,
        shared: bool = False,
        force_keep: torch.Tensor | None = None,
    ) -> Selection:
        """A random ``kept_tokens(tokens, ratio)``-subset of ``tokens`` per sample (one for all with ``shared``).

        ``force_keep`` [B, tokens] (bool): tokens never dropped (SimpleTuner's ``get_mask(force_keep=...)``): they
        rank before every other token, and the keep budget grows to the most forced tokens of any sample
        (``max(S - round(S * ratio), max forced)``, one budget for the batch); the rest of it is the random draw.
        With ``shared`` the forced tokens are the union over the batch. The noise drawn is the same with or
        without it, so a run without masks draws what it always drew."""
        import torch

        rows = 1 if shared else batch
        noise = torch.rand((rows, tokens), generator=self.generator)
        count = kept_tokens(tokens, ratio)
        if force_keep is not None:
            force = force_keep.detach().to("cpu", torch.bool).reshape(-1, tokens)
            if shared:
                force = force.any(dim=0, keepdim=True)
            elif force.shape[0] != rows:
                raise SdcoreError(f"{FLAG}: a force-keep mask for {force.shape[0]} samples in a batch of {rows}")
            noise = noise.masked_fill(force, -1.0)  # below every draw in [0, 1): ranked first
            count = max(count, int(force.sum(dim=1).max()))
        order = torch.argsort(noise, dim=1)
        keep = torch.sort(order[:, :count], dim=1).values
        return Selection(keep.to(device) if device is not None else keep, tokens)


#: a method's loss map (:meth:`sdcore.train.method.TrainingMethod.loss_mask`) force-keeps the tokens it weighs
#: above this: a tenth above the weight of a sample without a map (1), so a map at its normal weight routes as no
#: map does even as an image file rounds it. DreamArtist's normal is grey 127 (weight 1), but the "50 %" grey an
#: editor paints is 128, which its formula weighs 1.03 (DreamArtist's own example map's background is 128), and a
#: JPEG map wobbles a level or two: above 1 exactly, such a map would keep every token and turn the route off for
#: the image. Grey 131 (1.125) and brighter is kept, grey 130 (1.09) and darker routes.
METHOD_MAP_KEEP_ABOVE = 1.1


def token_keep_mask(masks: torch.Tensor, patch: int, above: float = 0.5) -> torch.Tensor:
    """Which image tokens a loss mask force-keeps, as SimpleTuner decides it: the mask ``[B, 1, h, w]`` (values
    in 0..1, at latent size) averaged over each token's ``patch x patch`` latent square (area downsampling to the
    token grid) and ``> 0.5``; ``[B, h/patch * w/patch]`` bool in the tokens' row-major order. ``above``: another
    threshold, for weights on another scale (a method's loss map, :data:`METHOD_MAP_KEEP_ABOVE`)."""
    import torch

    grid = masks.float().reshape(masks.shape[0], 1, masks.shape[-2], masks.shape[-1])
    size = (grid.shape[-2] // patch, grid.shape[-1] // patch)
    pooled = torch.nn.functional.interpolate(grid, size=size, mode="area")
    return pooled.flatten(1) > above


def pad_keep_mask(keep: torch.Tensor, tokens: int) -> torch.Tensor:
    """A target image's force-keep mask ``[B, n]`` over a sequence of ``tokens`` image tokens whose first ``n``
    are the target's: the tokens after them (FLUX.1 Kontext's reference image) are not force-kept."""
    import torch

    if keep.shape[1] > tokens:
        raise SdcoreError(
            f"{FLAG}: the loss mask covers {keep.shape[1]} image tokens, the denoiser's blocks see only {tokens}"
        )
    if keep.shape[1] == tokens:
        return keep
    return torch.cat([keep, keep.new_zeros(keep.shape[0], tokens - keep.shape[1])], dim=1)


def start_route(x: torch.Tensor, selection: Selection) -> torch.Tensor:
    """The kept tokens of ``x`` [B, S, D], in sequence order: [B, K, D]."""
    index = selection.keep.unsqueeze(-1).expand(x.shape[0], -1, x.shape[-1])
    return x.gather(1, index)


def end_route(routed: torch.Tensor, selection: Selection, original: torch.Tensor) -> torch.Tensor:
    """The whole sequence [B, S, D] again: ``routed`` [B, K, D] at the kept places, ``original`` (the tokens at
    the route's start) everywhere else."""
    index = selection.keep.unsqueeze(-1).expand(routed.shape[0], -1, routed.shape[-1])
    return original.to(routed.dtype).scatter(1, index, routed)


def _route_columns(x: torch.Tensor, selection: Selection, text: int, dim: int) -> torch.Tensor:
    """``x`` with its image part along ``dim`` (after the first ``text`` entries) cut to the kept tokens."""
    import torch

    x = x.movedim(dim, -1)
    head, image = x[..., :text], x[..., text:]
    if selection.keep.shape[0] == 1:
        image = image.index_select(-1, selection.keep[0].to(x.device))
    else:  # one selection per sample: the batch is the leading dimension
        keep = selection.keep.to(x.device).reshape(x.shape[0], *([1] * (x.dim() - 2)), -1)
        image = torch.take_along_dim(image, keep.expand(*image.shape[:-1], keep.shape[-1]), dim=-1)
    return torch.cat([head, image], dim=-1).movedim(-1, dim)


def route_rope(rope: Any, selection: Selection, text: int) -> Any:
    """RoPE rows ``[text | image]`` (a tensor or a tuple of them, ``[T + S, d]``) with the image rows kept."""
    if isinstance(rope, (tuple, list)):
        return type(rope)(route_rope(r, selection, text) for r in rope)
    if selection.keep.shape[0] != 1:
        raise SdcoreError("token routing: a shared RoPE table needs one selection for the whole batch")
    return _route_columns(rope, selection, text, dim=0)


def route_mask(mask: torch.Tensor, selection: Selection, text: int) -> torch.Tensor:
    """An attention mask ``[..., T + S]`` (keys last) with the image columns kept."""
    return _route_columns(mask, selection, text, dim=mask.dim() - 1)


def _tensors(value: Any) -> list[Any]:
    import torch

    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


def _length(text: Any) -> int:
    """The text tokens of a block's ``[B, T, D]`` text argument (none: 0)."""
    return int(text.shape[1]) if text is not None else 0


def _join(text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    import torch

    return torch.cat([text, image], dim=1)


class _Span:
    """One forward's pass through one route: its selection and the image tokens at its start."""

    def __init__(self, key: list[Any], selection: Selection, saved: torch.Tensor, text: int) -> None:
        self.refs = [weakref.ref(t, self._forget) for t in key]
        self.selection = selection
        self.saved: torch.Tensor | None = saved
        self.text = text  # the text tokens before the image tokens in a joint sequence, RoPE table or mask

    def _forget(self, _ref: Any) -> None:
        """The forward's tensors are gone (its backward is done): so are its recomputes; free the tokens."""
        self.saved = None

    def matches(self, key: list[Any]) -> bool:
        return len(key) == len(self.refs) and all(ref() is t for ref, t in zip(self.refs, key, strict=True))

    def alive(self) -> bool:
        return all(ref() is not None for ref in self.refs)


class TokenRouting:
    """Routes installed on one denoiser's blocks; :meth:`remove` undoes it (after a block swap installed later
    was removed). ``enabled`` switches it off without removing it."""

    def __init__(self, denoiser: nn.Module, routes: Sequence[Route], inputs: RoutedInputs,
                 lists: Sequence[str], router: TokenRouter | None = None) -> None:  # fmt: skip
        from .block_swap import swappable_blocks

        blocks = swappable_blocks(denoiser, lists)
        resolved, problems = resolve_routes(routes, len(blocks), type(denoiser).__name__)
        if not blocks:
            problems = [f"{FLAG}: {type(denoiser).__name__} has no transformer blocks to route tokens through"]
        if problems:
            raise ConfigError("; ".join(problems), problems)
        self.denoiser = denoiser
        self.routes = resolved
        self.inputs = inputs
        self.router = router or TokenRouter()
        self.enabled = True
        #: the force-keep mask of the batch being predicted (:meth:`keeping`), ``[B, n]`` over the target image's
        #: tokens; None: a purely random draw
        self.keep_mask: torch.Tensor | None = None
        self._spans: list[list[_Span]] = [[] for _ in resolved]
        self._installed: list[tuple[nn.Module, Callable[..., Any]]] = []
        joint = {id(b) for name in inputs.joint for b in getattr(denoiser, name, None) or ()}
        #: the text length of the denoiser's latest forward (its ``inputs.text`` argument), for the blocks that
        #: take ``[text | image]`` as one sequence (``RoutedInputs.joint``)
        self._text_len: int | None = None
        self._hooks: list[Any] = []
        if joint:  # the length is the running forward's only: a joint block called outside one is an error
            self._hooks = [
                denoiser.register_forward_pre_hook(self._remember_text, with_kwargs=True),
                denoiser.register_forward_hook(self._forget_text, always_call=True),
            ]
        for number, route in enumerate(resolved):
            for index in range(route.start, route.end + 1):
                block = blocks[index]
                self._install(block, number, index == route.start, index == route.end, id(block) in joint)

    def _remember_text(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """The denoiser's text tokens, ``[B, T, ...]``: how many of a joint sequence's first tokens are text."""
        text = kwargs.get(self.inputs.text)
        if text is None:
            found = inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments
            text = found.get(self.inputs.text)
        self._text_len = int(text.shape[1]) if text is not None else None

    def _forget_text(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        self._text_len = None

    def new_step(self, *parts: Any) -> None:
        """Start an optimizer step: draws from a seed made of ``parts`` (run seed, step, process: a resumed run
        draws what the uninterrupted one drew) and no span of an earlier step. A span is otherwise dropped once
        its forward's tensors die; a backward that leaves part of a graph unrun keeps them (and the span's start
        tokens) alive, and nothing recomputes a block of an earlier step."""
        self.router.reseed(*parts)
        self._spans = [[] for _ in self.routes]

    @contextlib.contextmanager
    def keeping(self, keep_mask: torch.Tensor | None) -> Iterator[None]:
        """Inside the ``with`` block, routes drawn anew never drop the tokens ``keep_mask`` marks (``[B, n]`` bool over the
        target image's tokens, :func:`token_keep_mask` of the batch's loss masks; None: nothing forced). A
        recompute in backward (outside the block) reuses its forward's draw, so it needs no mask."""
        before = self.keep_mask
        self.keep_mask = keep_mask
        try:
            yield
        finally:
            self.keep_mask = before

    def active(self) -> bool:
        """Whether a block call now routes: enabled, and gradients are being computed."""
        import torch

        return self.enabled and torch.is_grad_enabled()

    def _install(self, block: nn.Module, number: int, first: bool, last: bool, joint: bool) -> None:
        original = block.forward
        signature = inspect.signature(original)
        inputs = self.inputs
        mask_arg, _, mask_key = (inputs.mask or "").partition(".")
        routed_names = {inputs.image, inputs.text}

        def forward(*args: Any, **kwargs: Any) -> Any:
            if not self.active():
                return original(*args, **kwargs)
            bound = signature.bind(*args, **kwargs)
            values = bound.arguments
            tokens = values[inputs.image]
            if inputs.key is not None:
                key = [t for name in inputs.key for t in _tensors(values.get(name))]
            else:
                key = [t for name, v in values.items() if name not in routed_names for t in _tensors(v)]
            span = self._find(number, key)
            if span is None:
                text = self._joint_text() if joint else _length(values.get(inputs.text))
                span = self._new_span(number, key, tokens[:, text:] if joint else tokens, text, first)
            selection, text_len = span.selection, span.text
            if first and joint:  # [text | image]: the kept image tokens behind the text
                values[inputs.image] = _join(tokens[:, :text_len], start_route(tokens[:, text_len:], selection))
            elif first:
                values[inputs.image] = start_route(tokens, selection)
            if inputs.rope and values.get(inputs.rope) is not None:
                values[inputs.rope] = route_rope(values[inputs.rope], selection, text_len)
            holder = values.get(mask_arg) if mask_arg else None
            if mask_key and isinstance(holder, dict) and holder.get(mask_key) is not None:
                values[mask_arg] = {**holder, mask_key: route_mask(holder[mask_key], selection, text_len)}
            elif not mask_key and holder is not None:  # the mask is the argument itself
                values[mask_arg] = route_mask(holder, selection, text_len)
            out = original(*bound.args, **bound.kwargs)
            if last:
                if span.saved is None:
                    raise SdcoreError(f"{FLAG}: a route's tokens were freed before its last block ran")
                if joint:  # the block returns the joint sequence itself
                    return _join(out[:, :text_len], end_route(out[:, text_len:], selection, span.saved))
                parts = list(out)
                parts[inputs.output] = end_route(parts[inputs.output], selection, span.saved)
                out = type(out)(parts) if isinstance(out, tuple) else parts
            return out

        block.forward = forward  # type: ignore[method-assign]
        self._installed.append((block, original))

    def _joint_text(self) -> int:
        if self._text_len is None:
            raise SdcoreError(
                f"{FLAG}: a block takes text and image as one sequence, but the denoiser's forward gave no "
                f"{self.inputs.text!r} to tell how many of its tokens are text"
            )
        return self._text_len

    def _find(self, number: int, key: list[Any]) -> _Span | None:
        """The span of the forward this call belongs to, found again by ``key`` (a recompute, or a later block
        of the route); None: a new forward."""
        if not key:
            raise SdcoreError(
                f"{FLAG}: the routed blocks take no tensor besides the tokens, so a recomputed block cannot be told "
                "from a new forward"
            )
        spans = self._spans[number] = [s for s in self._spans[number] if s.alive()]
        for span in reversed(spans):
            if span.matches(key):
                return span
        return None

    def _new_span(self, number: int, key: list[Any], image: torch.Tensor, text: int, first: bool) -> _Span:
        """A new forward at the route's first block: a new draw over ``image`` [B, S, D]."""
        if not first:
            raise SdcoreError(
                f"{FLAG}: a block inside route {self.routes[number].text()} was called without its route's first "
                "block (or with other arguments than it): the family's blocks cannot be routed this way"
            )
        route = self.routes[number]
        shared = self.inputs.rope is not None
        force = None if self.keep_mask is None else pad_keep_mask(self.keep_mask, image.shape[1])
        selection = self.router.select(
            image.shape[0], image.shape[1], route.ratio, image.device, shared=shared, force_keep=force
        )
        span = _Span(key, selection, image, text)
        self._spans[number].append(span)
        return span

    def remove(self) -> None:
        """Every routed block's own forward back."""
        for block, original in reversed(self._installed):
            block.forward = original  # type: ignore[method-assign]
        self._installed = []
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self._spans = [[] for _ in self.routes]


def family_routing_problem(family: Any) -> str | None:
    """Why ``--tread-route`` cannot apply to ``family`` (a :class:`~sdcore.models.family.ModelFamily`)."""
    if getattr(family, "token_routing", None) is None:
        return (
            f"{FLAG}: TREAD token routing needs a transformer family that declares its routed block inputs "
            f"(FLUX.1, SD3, Chroma); the {family.label} {family.denoiser} does not"
        )
    return None


def block_count(family: Any, config: dict[str, Any]) -> int | None:
    """The blocks a denoiser ``config`` of ``family`` has over its block lists (None: the config does not say)."""
    depths = [config.get(block.depth_key) for block in family.block_lists]
    if not any(isinstance(d, int) for d in depths):
        return None
    return sum(int(d) for d in depths if isinstance(d, int))


def option_problems(options: Any) -> list[str]:
    """``--tread-route`` on its own: each value's syntax and ratio, and a start after its end."""
    texts = tuple(getattr(options, "tread_route", ()) or ())
    if not texts:
        return []
    routes, problems = parse_routes(texts)
    if any(r.start >= 0 and r.end >= 0 and r.start > r.end for r in routes):
        problems += [f"{FLAG} {r.text()}: its start block comes after its end block"
                     for r in routes if r.start >= 0 and r.end >= 0 and r.start > r.end]  # fmt: skip
    return problems


#: the SimpleTuner commit whose SD3 model was read for :func:`dataset_notes`' SD3 sentence
SIMPLETUNER_SD3_COMMIT = "bc8e6ab7"


def dataset_notes(options: Any, index: Any, family: str | None = None) -> list[str]:
    """``--tread-route`` with loss masks (``--masked-loss`` images, ``alpha_mask``, OneTrainer's
    ``-masklabel.png``, SimpleTuner's mask datasets): what the routing does with them, one note.

    On SD3 (``family``, the model's, when the pre-flight knows it) the note also says where SimpleTuner differs:
    its TREAD guide (documentation/TREAD.md) says masked regions are preserved and its SD3 transformer takes a
    ``force_keep_mask``, but its SD3 model (``helpers/models/sd3/model.py`` at :data:`SIMPLETUNER_SD3_COMMIT`,
    unlike FLUX.1's, Chroma's, FLUX.2's and Wan's) never passes one, so its SD3 drops masked tokens. sdcore keeps
    them on every family, as the guide says: an SD3 run with masks then routes fewer tokens than SimpleTuner's."""
    if not tuple(getattr(options, "tread_route", ()) or ()):
        return []
    from .data import has_dataset_mask

    if not any(has_dataset_mask(entry) for entry in index.entries):
        return []
    note = (
        f"{FLAG} with loss masks: the image tokens inside a sample's mask (more than half of the token's latent "
        "square) are never dropped, as SimpleTuner keeps them; a route keeps at least those (on FLUX.1 and Chroma "
        "the union over the batch, which shares one draw)"
    )
    if family == "sd3":
        note += (
            f". SimpleTuner's own SD3 model passes no mask to its router (at {SIMPLETUNER_SD3_COMMIT}; its TREAD "
            "guide says masked regions are kept, as sdcore does on every family), so it drops masked tokens that "
            "sdcore computes: expect a smaller speed-up than SimpleTuner's SD3 with the same route"
        )
    return [note]


def model_problems(options: Any, layout: Any) -> list[str]:
    """``--tread-route`` on this model (its family and block count, from the pre-flight's layout)."""
    texts = tuple(getattr(options, "tread_route", ()) or ())
    if not texts:
        return []
    from ..models.family import get_family

    try:
        family = get_family(layout.family)
    except ConfigError:
        return []
    problem = family_routing_problem(family)
    if problem:
        return [problem]
    routes, problems = parse_routes(texts)
    config = layout.configs.get(family.denoiser) if isinstance(layout.configs, dict) else None
    total = block_count(family, config) if isinstance(config, dict) else None
    if total is None or problems:
        return []  # the syntax is option_problems' to report; the count is checked again once the model loads
    return resolve_routes(routes, total, f"the {family.label} {family.denoiser}")[1]


def install_token_routing(bundle: Any, options: Any) -> TokenRouting | None:
    """``--tread-route`` on a loaded bundle's denoiser (before block swap), its router seeded by ``--seed``."""
    texts = tuple(getattr(options, "tread_route", ()) or ())
    if not texts:
        return None
    family = bundle.family_spec
    problem = family_routing_problem(family)
    if problem:
        raise ConfigError(problem)
    routes, problems = parse_routes(texts)
    if problems:
        raise ConfigError("; ".join(problems), problems)
    from .block_swap import block_list_names

    seed = getattr(options, "seed", None)
    return TokenRouting(bundle.denoiser, routes, family.token_routing, block_list_names(bundle),
                        TokenRouter(DEFAULT_SEED if seed is None else seed))  # fmt: skip
