"""Applying LoRA files to a loaded model: switchable hooks, or merged into the weights.

A1111 semantics: ``<lora:name:te_w:unet_w>``; the UNet weight defaults to the text-encoder weight.
Both go through the file module's adapter (:mod:`sdplugin_lora.adapters`), the same class
training uses. Merged application computes ``W + m * ΔW`` in fp32 then casts, and keeps a copy
of only the weights it touched so :meth:`AppliedLoras.remove` restores them bit for bit
(subtracting again would not be exact in fp16). Hooked application changes no weight at all.
"""

from __future__ import annotations

import os
import warnings
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
from sdcore.errors import ConfigError, NetworkMismatchError
from sdcore.generate.networks import Activation, ControlNetwork, NetworkRef, PromptNetworkHandler
from sdcore.models.bundled_embeddings import BundledEmbedding, bundled_embeddings, header_shapes
from sdcore.models.hashes import network_short_hash

from .adapters import Adapter, adapter_from_tensors
from .format import LoraFile, Match, ModuleWeights, match_modules, patch_input_width, read_lora
from .naming import ModuleIndex, Target


class LoraWarning(UserWarning):
    """Some keys of a LoRA file matched nothing in the model (they are listed)."""


@dataclass
class LoraSpec:
    """One LoRA to apply: a file (or parsed file) and its text-encoder / UNet weights."""

    lora: LoraFile | str | Path
    te_weight: float = 1.0
    unet_weight: float | None = None
    dyn_dim: int | None = None
    """A1111's ``dyn``: use only the first ``dyn_dim`` ranks of each plain LoRA module (:func:`truncate_rank`)."""

    def parsed(self) -> LoraFile:
        return self.lora if isinstance(self.lora, LoraFile) else read_lora(self.lora)


@dataclass
class AppliedLoras:
    """What :func:`apply_loras` did; :meth:`remove` undoes it exactly."""

    merged: bool
    matches: list[Match] = field(default_factory=list)
    modules: list[Adapter] = field(default_factory=list)
    backups: dict[int, tuple[torch.nn.Parameter, torch.Tensor]] = field(default_factory=dict)
    removed: bool = False
    #: undoes shape changes made before the modules applied (a control LoRA's wider ``img_in``), in order
    reshapes: list[Callable[[], None]] = field(default_factory=list)

    @property
    def touched(self) -> int:
        return len(self.backups) if self.merged else len(self.modules)

    def remove(self) -> None:
        if self.removed:
            return
        for module in reversed(self.modules):
            module.detach()
        with torch.no_grad():
            for param, backup in self.backups.values():
                param.data.copy_(backup.to(param.device))
        for undo in reversed(self.reshapes):  # the original modules back, untouched
            undo()
        self.removed = True


def _multiplier(target: Target, te_weight: float, unet_weight: float) -> float:
    return te_weight if target.is_text_encoder else unet_weight


def apply_loras(
    bundle: Any,
    loras: Sequence[LoraSpec | LoraFile | str | Path],
    *,
    merge: bool = False,
    strict: bool = False,
    index: ModuleIndex | None = None,
    widen: bool = False,
) -> AppliedLoras:
    """Apply several LoRAs (each at its own weights) to ``bundle``.

    ``merge=False`` adds forward hooks (weights untouched, switchable); ``merge=True`` patches the
    weights in place with a restore copy of each touched weight. Keys matching no module are
    listed in a :class:`LoraWarning` (an error with ``strict``); a LoRA made for another family or
    with mismatched shapes raises :class:`~sdcore.errors.NetworkMismatchError`. Norm scales a file holds in
    full (BFL's control LoRAs) replace the model's, backed up, in either mode, as diffusers' ``load_lora_weights``
    loads them.

    ``widen``: a FLUX.1 LoRA whose ``img_in`` is wider than the model's (BFL's Depth/Canny control LoRAs: 128 where
    dev has 64) first widens the transformer's (:func:`sdcore.models.flux.control.widen_img_in`, diffusers' zero
    columns), so the model becomes a Depth/Canny one until :meth:`AppliedLoras.remove`; generation asks for it
    (:class:`LoraHandler`). Without it such a file is refused, as every shape change is.
    """
    specs = [spec if isinstance(spec, LoraSpec) else LoraSpec(spec) for spec in loras]
    parsed = [(spec, spec.parsed()) for spec in specs]
    applied = AppliedLoras(merged=merge)
    if widen and (reshape := _widen(bundle, [lora for _spec, lora in parsed])) is not None:
        applied.reshapes.append(reshape)
        index = None  # the index must see the new img_in
    try:
        index = index or ModuleIndex.from_bundle(bundle)
        for _spec, lora in parsed:  # validate all before touching the weights
            match = match_modules(lora, index)
            if match.unmatched:
                message = f"{lora.label}: {match.summary()}"
                if strict:
                    raise NetworkMismatchError(message)
                warnings.warn(message, LoraWarning, stacklevel=2)  # the CLI prints it as its warning, once
            applied.matches.append(match)
        if merge and (unmergeable := _biases_without_a_bias(applied.matches)):
            raise NetworkMismatchError("; ".join(unmergeable))
    except BaseException:
        applied.remove()
        raise
    matches = applied.matches
    try:
        for (spec, _lora), match in zip(parsed, matches, strict=True):
            unet_weight = spec.te_weight if spec.unet_weight is None else spec.unet_weight
            for target, full_weights in match.modules.values():
                weights = truncate_rank(full_weights, spec.dyn_dim)
                multiplier = _multiplier(target, spec.te_weight, unet_weight)
                if multiplier == 0:
                    continue
                if merge:
                    _merge_one(applied, target, weights, multiplier)
                else:
                    applied.modules.append(_hook_one(target, weights, multiplier))
            for target, scale in match.scales.values():
                _set_one(applied, target.module.weight, scale)
    except BaseException:
        applied.remove()
        raise
    return applied


def _biases_without_a_bias(matches: Iterable[Match]) -> list[str]:
    """One line per module whose ``lora_up.bias`` (BFL's/PEFT's ``lora_B.bias``) targets a layer without a bias:
    applied as hooks it adds to the output, but merged it has no weight to go into (PEFT refuses that merge too:
    peft/tuners/lora/layer.py ``Linear.merge``), so merging says so before any weight changes."""
    return [
        f"{target.name}: the LoRA adds a bias (lora_up.bias) to a layer without one, which cannot be merged into "
        "its weights; apply it unmerged (generation: -O lora_mode=hooks)"
        for match in matches
        for target, weights in match.modules.values()
        if "lora_up.bias" in weights.tensors and getattr(target.module, "bias", None) is None
    ]


def _widen(bundle: Any, loras: Sequence[LoraFile]) -> Callable[[], None] | None:
    """Widen a FLUX.1 transformer's ``img_in`` to the widest of ``loras``' (None when none is wider)."""
    if getattr(bundle, "family", None) != "flux" or getattr(bundle, "transformer", None) is None:
        return None
    from sdcore.models.flux.control import widen_img_in

    current = int(bundle.transformer.x_embedder.weight.shape[1])
    wider = [(width, lora) for lora in loras if (width := patch_input_width(lora)) is not None and width > current]
    if not wider:
        return None
    width, lora = max(wider, key=lambda item: item[0])
    return widen_img_in(bundle, width, lora.path.name if lora.path is not None else lora.label)


def _set_one(applied: AppliedLoras, param: torch.nn.Parameter, value: torch.Tensor) -> None:
    """Replace ``param`` with ``value`` (a norm scale the file holds in full; no multiplier, as diffusers loads
    it), keeping the first backup so :meth:`AppliedLoras.remove` restores it bit for bit."""
    applied.backups.setdefault(id(param), (param, param.detach().to("cpu", copy=True)))
    with torch.no_grad():
        param.copy_(value.to(device=param.device, dtype=param.dtype))


def truncate_rank(weights: ModuleWeights, dyn_dim: int | None) -> ModuleWeights:
    """The module cut to its first ``dyn_dim`` ranks, as A1111 renders ``<lora:x:dyn=N>`` (a DyLoRA file's
    smaller ranks): ``up[:, :N] @ down[:N]`` (Lora/lyco_helpers.py ``rebuild_conventional``), scaled by the
    file's alpha over the FULL rank (Lora/network.py ``calc_scale``: ``dim`` is ``lora_down``'s first axis, set
    in network_lora.py before any truncation), which is stored here as the module's ``scale`` so the adapter
    uses exactly that number. As in A1111 only plain LoRA/LoCon modules are cut (no ``lora_mid`` Tucker core,
    no LyCORIS algorithm), and ``N`` at or above the rank leaves the module whole."""
    tensors = weights.tensors
    if dyn_dim is None or weights.kind != "lora" or weights.is_tucker or dyn_dim >= weights.rank:
        return weights
    cut = dict(tensors)
    cut["lora_up.weight"] = tensors["lora_up.weight"][:, :dyn_dim]
    cut["lora_down.weight"] = tensors["lora_down.weight"][:dyn_dim]
    cut["scale"] = torch.tensor(weights.scale, dtype=torch.float64)  # alpha / full rank, or the stored scale
    return ModuleWeights(tensors=cut, key=weights.key)


def truncatable(lora: LoraFile) -> bool:
    """Whether ``dyn`` can cut any module of ``lora`` (:func:`truncate_rank`)."""
    return any(w.kind == "lora" and not w.is_tucker for w in lora.modules.values())


def apply_lora(
    bundle: Any,
    lora: LoraFile | str | Path,
    weight: float = 1.0,
    *,
    unet_weight: float | None = None,
    merge: bool = False,
    strict: bool = False,
    widen: bool = False,
) -> AppliedLoras:
    """One LoRA: ``weight`` for the text encoders and (unless ``unet_weight``) the UNet (``widen``: see
    :func:`apply_loras`)."""
    return apply_loras(bundle, [LoraSpec(lora, weight, unet_weight)], merge=merge, strict=strict, widen=widen)


def _adapter(target: Target, weights: ModuleWeights, multiplier: float) -> Adapter:
    adapter = adapter_from_tensors(
        target.name, target.module, weights.tensors, multiplier=multiplier, variant=weights.variant
    )
    return adapter.to(target.module.weight.device)


def _merge_one(applied: AppliedLoras, target: Target, weights: ModuleWeights, multiplier: float) -> None:
    adapter = _adapter(target, weights, multiplier)
    bias = getattr(target.module, "bias", None)
    if adapter.bias_change() is not None and bias is not None:  # b_norm / diff_b change it
        applied.backups.setdefault(id(bias), (bias, bias.detach().to("cpu", copy=True)))
    backup = adapter.merge()
    param = target.module.weight
    applied.backups.setdefault(id(param), (param, backup))  # the first backup is the original weight


def _hook_one(target: Target, weights: ModuleWeights, multiplier: float) -> Adapter:
    adapter = _adapter(target, weights, multiplier).freeze()
    adapter.attach()
    return adapter


#: :func:`_file_key`: path, size, mtime, inode, ctime (ns)
FileKey = tuple[str, int, int, int, int]


def _file_key(path: Path) -> FileKey:
    """A file as it is on disk now: its path, size, mtime, inode and ctime (ns). Size and mtime alone miss a file
    replaced by a copy that keeps its mtime (``cp -p``, rsync, unzip) or rewritten within one mtime tick; a
    replacement has another inode, and an in-place rewrite (or a ``utime`` setting the mtime back) moves the ctime,
    which no tool sets back (on Windows ``st_ctime`` is the creation time, and a replacement another file index)."""
    info = path.stat()
    return (str(path), info.st_size, info.st_mtime_ns, info.st_ino, info.st_ctime_ns)


_NAME_SYMBOLS = str.maketrans("", "", ":,")
#: A1111's LoRA tag arguments, in their positional order
_LORA_ARGS = ("te", "unet", "dyn")


def _dyn_value(ref: NetworkRef) -> float | None:
    """The tag's ``dyn`` (third positional value or ``dyn=``), ``None`` when not given."""
    if len(ref.weights) > 2 or any(key == "dyn" for key, _ in ref.named):
        return ref.arg(2, "dyn", 0.0)
    return None


class LoraHandler(PromptNetworkHandler):
    """``<lora:name:te_weight[:unet_weight[:dyn]]>`` in prompts: merged for one generation, then restored."""

    tag = "lora"
    kind = "LoRA"
    resolves_names = True  # activate finds each name: checked before the model loads
    suffixes = (".safetensors", ".pt", ".ckpt", ".bin")

    def search_folders(self) -> list[Path]:
        """The LoRA folders, with a ``LyCORIS`` folder beside the first one right after it when there is one:
        A1111 1.5+ (extensions-builtin/Lora ``list_available_networks``) lists ``--lora-dir`` then
        ``--lyco-dir-backcompat`` (default ``models/LyCORIS``, beside ``models/Lora``) for ``<lora:>`` and
        ``<lyco:>`` alike, where the LyCORIS extension had kept its files. A name in both is an ambiguity error
        naming both files (A1111 silently takes the LyCORIS one, the last it lists), as two same-named files
        in two subfolders of one folder are. ``--lora-dir .`` (or ``..``) has its ``LyCORIS`` beside the folder it
        names, not inside it: ``Path(".").parent`` is ``.`` itself, so such a path is made absolute first
        (lexically, without following a linked ``Lora`` folder to its target)."""
        folders = super().search_folders()
        if self.directory is not None:
            base = self.directory
            if base.name in ("", ".", ".."):
                base = Path(os.path.abspath(base))
            sibling = base.parent / "LyCORIS"
            if sibling.is_dir() and sibling != self.directory and sibling not in folders:
                folders.insert(1, sibling)
        return folders

    def accepts(self, path: Path) -> bool:
        """A LoRA/LyCORIS file: some key ends like a LoRA part (``lora_up``, ``hada_w1_a``, ``lokr_w1`` ...)."""
        from sdcore.models.peek import peek_file

        from .format import is_lora_key

        found = peek_file(path)
        keys = found.keys
        if found.error:  # unreadable or unsafe: let the loader say so in its own words
            return True
        if found.nested.get("state_dict") == "dict":  # a .ckpt-style wrapper: judge by the loader
            return True
        return any(is_lora_key(k) for k in keys)

    def check_ref(self, ref: NetworkRef) -> str | None:
        """A1111's arguments (Lora/extra_networks_lora.py ``activate``): positional ``name:te:unet:dyn`` or named
        ``te=``, ``unet=`` (default: te), ``dyn=`` (a whole number of ranks, ≥ 1); anything else is an error."""
        wrong: list[str] = []
        if len(ref.weights) > len(_LORA_ARGS):
            wrong.append(f"{len(ref.weights)} positional values (at most {len(_LORA_ARGS)}: te, unet, dyn)")
        unknown = [key for key, _ in ref.named if key not in _LORA_ARGS]
        if unknown:
            wrong.append(f"unknown argument {', '.join(repr(k) for k in unknown)} (known: te, unet, dyn)")
        dyn = _dyn_value(ref)
        if dyn is not None and (dyn != int(dyn) or dyn < 1):
            wrong.append(f"dyn={dyn:g} must be a whole number of ranks, 1 or more")
        return f"{ref.text or ref.name}: {'; '.join(wrong)}" if wrong else None

    def control_network(self, name: str) -> ControlNetwork | None:
        """BFL's FLUX.1 Depth/Canny control LoRAs (``img_in`` 128 wide in the file's header) make dev take a
        control image while applied."""
        from .format import CONTROL_LORA, CONTROL_WIDTH, file_input_width

        path = self.find(name)
        if file_input_width(path) != CONTROL_WIDTH:
            return None
        return ControlNetwork(path, f"{path.name}: {CONTROL_LORA}")

    #: how many parsed files (with their short hashes) :meth:`read` keeps, least recently used dropped first
    cache_size: ClassVar[int] = 4

    def __init__(self, directory: str | Path | None = None) -> None:
        super().__init__(directory)
        self._files: OrderedDict[FileKey, tuple[LoraFile, str]] = OrderedDict()

    def read(self, path: Path) -> tuple[LoraFile, str]:
        """``path`` parsed and its A1111 short hash (``Lora hashes``), from a small LRU cache keyed by the path and
        the file's state (:func:`_file_key`: size, mtime, inode, ctime), so switching between LoRAs in one session
        (an X/Y/Z plot, a prompt list) reads and hashes each file once, and a file rewritten or replaced since is read
        again (A1111 re-reads a network whose mtime is newer, Lora/networks.py ``load_networks``: a copy keeping the
        old mtime would be missed there). Parsed files are
        never changed by applying them, so one parse serves every application."""
        key = _file_key(path)
        found = self._files.get(key)
        if found is not None:
            self._files.move_to_end(key)
            return found
        lora = read_lora(path)
        entry = (lora, network_short_hash(path, lora.metadata))
        self._files[key] = entry
        while len(self._files) > self.cache_size:
            self._files.popitem(last=False)
        return entry

    def _mode(self) -> str:
        """``merge`` (the default: no per-step cost) or ``hooks`` (``-O lora_mode=hooks``: weights untouched)."""
        return "hooks" if str(getattr(self, "options", {}).get("lora_mode", "merge")).lower() == "hooks" else "merge"

    def activation_key(self, refs: Sequence[NetworkRef]) -> Hashable | None:
        """The merge mode and, per ref, the prompt's name (the infotext's and bundled embeddings' label), the
        resolved file as it is on disk now (:func:`_file_key`) and the weights as :meth:`activate` reads
        them (te, unet, dyn): two prompts with equal keys apply the same LoRAs in the same way. ``None`` when an
        argument is wrong (then :meth:`activate` says why), and for a FLUX.1 control LoRA: it widens dev's
        ``img_in``, and a model left widened between calls reads as a Depth/Canny model to the checks that run
        before the next prompt's networks are applied (default guidance, "needs a control image")."""
        if not refs or any(self.check_ref(ref) for ref in refs):
            return None
        if any(self.control_network(ref.name) is not None for ref in refs):
            return None
        parts: list[Hashable] = []
        for ref in refs:
            te_weight = ref.arg(0, "te", 1.0)
            dyn = _dyn_value(ref)
            parts.append((ref.name, _file_key(self.find(ref.name)), te_weight, ref.arg(1, "unet", te_weight), dyn))
        return (self._mode(), tuple(parts))

    def activate(self, bundle: Any, refs: list[NetworkRef], prompt: str, negative_prompt: str) -> Activation:
        if not refs:
            return Activation(prompt, negative_prompt)
        problems = [problem for problem in map(self.check_ref, refs) if problem]
        if problems:
            raise ConfigError("; ".join(problems))
        specs: list[LoraSpec] = []
        hashes: dict[str, str] = {}
        offered: list[BundledEmbedding] = []
        for ref in refs:
            path = self.find(ref.name)
            lora, short_hash = self.read(path)
            # A1111 registers the bundled embeddings of every LoRA in the prompt, whatever its weights (even 0);
            # its infotext names the LoRA as the prompt wrote it in their "TI hashes" entries
            offered += [replace(emb, network=ref.name) for emb in lora.bundled]
            # A1111: <lora:x:te_w:unet_w:dyn> or the named form <lora:x:te=0.5:unet=1:dyn=16>
            te_weight = ref.arg(0, "te", 1.0)
            unet_weight = ref.arg(1, "unet", te_weight)
            dyn = _dyn_value(ref)
            if dyn is not None and not truncatable(lora):
                raise NetworkMismatchError(
                    f"{ref.text or ref.name}: dyn cuts plain LoRA modules only and {path} has none "
                    "(LyCORIS or Tucker modules); drop dyn"
                )
            specs.append(LoraSpec(lora, te_weight, unet_weight, None if dyn is None else int(dyn)))
            # A1111 (Lora/extra_networks_lora.py): the prompt name without ':' and ',', listed once
            hashes.setdefault(ref.name.translate(_NAME_SYMBOLS), short_hash)
            for text in (ref.text,):
                if text:
                    prompt = prompt.replace(text, "")
                    negative_prompt = negative_prompt.replace(text, "")
        # merged by default (no per-step cost); ``-O lora_mode=hooks`` keeps the weights untouched
        merge = self._mode() == "merge"
        # a FLUX.1 control LoRA widens dev's img_in for the call: the generation then runs on FluxControlPipeline
        applied = apply_loras(bundle, specs, merge=merge, widen=True)
        info = {"Lora hashes": ", ".join(f"{name}: {short}" for name, short in hashes.items())} if hashes else {}
        return Activation(prompt, negative_prompt, undo=applied.remove, info=info, embeddings=offered)

    def offered_embeddings(self, name: str) -> list[BundledEmbedding]:
        """The embeddings bundled in the file ``name`` resolves to, so the pre-load check knows their prompt words:
        from a safetensors header (names and shapes, nothing loaded); a pickle file has no header, so it is read."""
        path = self.find(name)
        if path.suffix.lower() == ".safetensors":
            return bundled_embeddings(header_shapes(path), source=path, network=name)
        return [replace(emb, network=name) for emb in self.read(path)[0].bundled]


class LycoHandler(LoraHandler):
    """``<lyco:name:te_weight[:unet_weight]>``, the tag of A1111's LyCORIS extension: the same files, folders
    and weights as ``<lora:...>`` (A1111 1.5+ treats it as an alias)."""

    tag = "lyco"


def unmatched_report(matches: Iterable[Match]) -> list[str]:
    return [key for match in matches for key in match.unmatched]


__all__ = [
    "AppliedLoras",
    "LoraHandler",
    "LoraSpec",
    "LoraWarning",
    "LycoHandler",
    "apply_lora",
    "apply_loras",
    "truncate_rank",
]
