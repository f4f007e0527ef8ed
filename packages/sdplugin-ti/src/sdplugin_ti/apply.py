"""Putting embeddings into a model: placeholder tokens plus a small extra lookup table.

An embedding with n vectors gets n placeholder tokens in each tokenizer it has vectors for. Their
ids lie past the tokenizer's own (past CLIP's matrix; in T5-XXL's spare rows, 32100-32127), and
:class:`ExtendedTokenEmbedding` (installed in place of the input embedding) returns the embedding's
vectors for them and the untouched original rows for every other id. The original matrix is never resized or
copied, so removing an embedding restores the model bit for bit, and in training only the small tables receive
gradients. That part is sdcore's (:mod:`sdcore.models.token_embeddings`, shared with every method that adds a
token); this module adds what is A1111's: names, placeholder spelling, prompt expansion, files and the handler.

Prompts name embeddings as A1111 does: by the file stem for ``.pt``/``.bin``/``.safetensors``
files, by the name stored inside for image (PNG/WEBP) embeddings. :func:`expand_prompt` replaces each
whole-word, case-insensitive occurrence of a name by its placeholder tokens before tokenizing.
The first placeholder is the name itself (lower-cased) when that is not already a word of the
vocabulary, so a one-vector embedding also works in prompts that were never expanded.

Which tensor feeds which encoder follows the family: SD1/SD2 the single tensor, SDXL ``clip_l`` and
``clip_g``, SD3 ``clip_l``, ``clip_g`` and optionally ``t5``, Flux.1 ``clip_l`` and optionally ``t5``, Chroma
``t5`` (OneTrainer's keys). Without a ``t5`` part, T5 gets no tokens and reads the prompt words as text.

OneTrainer's output embeddings (``emp_params_out``, ``clip_l_out``...: :attr:`Embedding.output_vectors`) are
applied as OneTrainer applies them (``BaseModel._apply_output_embeddings``): the placeholder tokens' input rows are
zeros, and each encoder's output at their positions is replaced by the stored output vectors, at the layer the family
reads (:func:`sdcore.models.token_embeddings.add_output_rows`). FLUX.1's CLIP-L gives only a pooled vector, so a
``clip_l_out`` there has no position to go to (OneTrainer never trains one): it is left out with a warning.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from sdcore.errors import ConfigError, ModelFormatError, NetworkMismatchError
from sdcore.generate.networks import Activation, NetworkRef, PromptNetworkHandler
from sdcore.models.bundled_embeddings import OUTPUT_SUFFIX, PART_BY_KIND
from sdcore.models.token_embeddings import (
    LEGACY_EOS,
    ExtendedTokenEmbedding,
    TokenRows,
    add_token_rows,
    add_tokens,
    extend_input_embeddings,
    has_token,
    init_rows,
    pool_at_eos,
    release_input_embeddings,
    remove_tokens,
    replace_placeholder,
)

from .embedding import CLIP_G, CLIP_L, SINGLE, T5, Embedding
from .formats import EMBEDDING_SUFFIXES, IMAGE_SUFFIXES, embedding_from_bundled, load_embedding

if TYPE_CHECKING:
    from sdcore.models.bundle import ModelBundle

log = logging.getLogger(__name__)

#: embedding key of each text-encoder kind of the transformer families (SD3/SD3.5, Flux.1, Chroma): sdcore's one table,
#: shared with the LoRA plugin's pivotal tuning
_KEY_BY_KIND = PART_BY_KIND
#: the encoders whose sequence no family's encoding uses (FLUX.1's CLIP-L: its pooled vector only), so an output
#: vector for them has no position to replace; OneTrainer's FluxModel never makes CLIP-L an output embedding
_POOLED_ONLY: dict[str, frozenset[str]] = {"flux": frozenset({CLIP_L})}
#: keys an embedding may leave out beside a CLIP part: T5 then reads the prompt word as plain text (OneTrainer makes
#: the T5 part optional; kohya and A1111 never train one). Where T5 is the only encoder (Chroma) it is no option:
#: :func:`optional_keys`
OPTIONAL_KEYS = frozenset({T5})


def optional_keys(keys: Sequence[str]) -> frozenset[str]:
    """The parts of a model with encoder ``keys`` (:func:`encoder_keys`) that an embedding may leave out and that
    train only on request (``--train-t5``): T5 beside a CLIP encoder (SD3, FLUX.1); none where T5 is the only encoder
    (Chroma: without T5 vectors the embedding would be nothing, so its file must have them and they always train, as
    OneTrainer and the LoRA plugin's pivotal tuning train them there)."""
    return OPTIONAL_KEYS & frozenset(keys) if len(keys) > 1 else frozenset()


def family_encoder_keys(family: str) -> list[str]:
    """Which embedding tensor goes into which text encoder of a ``family`` (by name), in text-encoder
    order; the pre-flight checks an embedding file against this before any weights load."""
    from sdcore.models.family import get_family

    spec = get_family(family)
    if spec.denoiser == "unet":
        if family == "sdxl-refiner":
            return [CLIP_G]
        if family.startswith("sdxl"):
            return [CLIP_L, CLIP_G]
        return [SINGLE]
    kinds = [encoder.kind for encoder in spec.text_encoders]
    unknown = [kind for kind in kinds if kind not in _KEY_BY_KIND]
    if unknown:
        raise ConfigError(
            f"Textual Inversion does not know the {', '.join(unknown)} text encoder of {spec.label} ({family})"
        )
    return [_KEY_BY_KIND[kind] for kind in kinds]


def encoder_keys(bundle: ModelBundle) -> list[str]:
    """Which embedding tensor goes into which text encoder, in ``bundle.text_encoders`` order."""
    spec = bundle.family_spec
    keys = family_encoder_keys(bundle.family)
    if spec.denoiser == "unet":
        return keys
    kinds = [encoder.kind for encoder in spec.text_encoders]
    if len(bundle.text_encoders) != len(kinds):
        raise ConfigError(
            f"this {bundle.family} model has {len(bundle.text_encoders)} of its {len(kinds)} text encoders; "
            "embeddings need all of them (give the missing parts when loading the model)"
        )
    return keys


# the lookup with extra rows and the tokenizer bookkeeping are sdcore's, shared with every new-token method
# (:mod:`sdcore.models.token_embeddings`); the old names stay importable from here
_LEGACY_EOS = LEGACY_EOS
_pool_at_eos = pool_at_eos
_extended = extend_input_embeddings
_release = release_input_embeddings
_add_tokens = add_tokens
_remove_tokens = remove_tokens


def _in_base_vocab(tokenizer: Any, token: str) -> bool:
    # one word asked (sdcore's has_token), not get_vocab(): a 49,408-word dict per call, four per SDXL embedding
    return has_token(tokenizer, token)


def placeholder_tokens(name: str, count: int, tokenizers: Sequence[Any] = ()) -> list[str]:
    """The tokens standing for ``name``'s vectors: ``name`` (if free), ``name__ti1``, ``name__ti2``..."""
    base = " ".join(name.lower().split())
    first = (
        base
        if not any(_in_base_vocab(t, base) or _in_base_vocab(t, base + "</w>") for t in tokenizers)
        else f"{base}__ti0"
    )
    return [first] + [f"{base}__ti{i}" for i in range(1, count)]


_SEPARATE = r"(?<![\w])(?:{})(?![\w])"


def expand_prompt(prompt: str, tokens_by_name: dict[str, list[str]]) -> str:
    """Replace each whole-word, case-insensitive ``name`` by its placeholder tokens (longest names first)."""
    if not tokens_by_name or not prompt:
        return prompt
    lookup = {name.lower(): " ".join(tokens) for name, tokens in tokens_by_name.items()}
    names = sorted(lookup, key=len, reverse=True)
    pattern = re.compile(_SEPARATE.format("|".join(re.escape(n) for n in names)), re.IGNORECASE)
    return pattern.sub(lambda m: lookup[m.group(0).lower()], prompt)


def find_names(text: str, names: Iterable[str]) -> list[str]:
    """Names (from ``names``) occurring in ``text`` as whole words, case-insensitively, as given in ``names``."""
    by_lower = {n.lower(): n for n in names}
    if not by_lower or not text:
        return []
    ordered = sorted(by_lower, key=len, reverse=True)
    pattern = re.compile(_SEPARATE.format("|".join(re.escape(n) for n in ordered)), re.IGNORECASE)
    found: dict[str, None] = {}
    for match in pattern.finditer(text):
        found[by_lower[match.group(0).lower()]] = None
    return list(found)


#: ComfyUI's spelling of an embedding in a prompt (``comfy/sd1_clip.py``: a space-separated word starting with
#: ``embedding:``, case-sensitive, the rest a file name under an embeddings folder or any subfolder, with its suffix
#: or without one). ComfyUI takes the weight of ``(embedding:name:1.2)`` off first and splits segments at
#: parentheses, so the word may follow ``(`` or ``)``; the name ends where a separator or A1111's syntax starts. A
#: word glued to other text (``a,embedding:x``, A1111's ``[embedding:x:5]``) is no embedding there either.
_COMFY_EMBEDDING = re.compile(r"(?<![^\s()])embedding:([^\s,:()\[\]{}<>|]+)")


def _comfy_matches(text: str) -> list[re.Match[str]]:
    """The ``embedding:NAME`` matches of ``text`` that ComfyUI reads as embeddings: ``(embedding:1.2)`` is the word
    ``embedding`` at weight 1.2 in ComfyUI and A1111 alike (the number after the last ``:`` is the weight)."""
    out = []
    for match in _COMFY_EMBEDDING.finditer(text):
        if text[match.end() : match.end() + 1] == ")":
            try:
                float(match.group(1))
            except ValueError:
                pass
            else:
                continue
        out.append(match)
    return out


def _comfy_word(match: re.Match[str]) -> str:
    """The prompt word (A1111's: the file stem) an ``embedding:NAME`` match names: ``embedding:sub/name.safetensors``
    and ``embedding:name`` both name ``name``, as ComfyUI finds either in any subfolder of its embeddings folders."""
    name = re.split(r"[\\/]", match.group(1))[-1]
    stem, dot, suffix = name.rpartition(".")
    return stem if dot and "." + suffix.lower() in EMBEDDING_SUFFIXES else name


def comfy_embedding_words(text: str) -> list[tuple[str, str]]:
    """``(written, word)`` for each ComfyUI ``embedding:NAME`` in ``text``: the text as written and the prompt word
    (A1111's: the file stem) it names."""
    return [(match.group(0), _comfy_word(match)) for match in _comfy_matches(text)]


def replace_comfy_embeddings(text: str, words: dict[str, str]) -> str:
    """``text`` with each ComfyUI ``embedding:NAME`` replaced by its prompt word (``words``: lower-cased word ->
    word), so the embedding's vectors stand alone where ComfyUI puts them, not after the tokens of
    ``embedding`` and ``:``; a name ``words`` lacks is left as written, and so is every other text (the same
    characters in A1111's ``[embedding:x:5]`` elsewhere in the prompt stay)."""
    out: list[str] = []
    last = 0
    for match in _comfy_matches(text):
        word = words.get(_comfy_word(match).lower())
        if word is not None:
            out += [text[last : match.start()], word]
            last = match.end()
    return "".join(out) + text[last:]


# --- applying --------------------------------------------------------------------------------------
def _source(emb: Embedding, key: str) -> torch.Tensor | None:
    """The tensor of ``emb`` for encoder ``key``. Per-encoder files (``clip_l``...) never stand in for
    SD1/SD2's single tensor: a Flux ``clip_l`` file was trained for the pooled path, not for SD1."""
    return emb.vectors.get(key)


def check_fits(bundle: ModelBundle, emb: Embedding) -> None:
    """Raise NetworkMismatchError saying what the embedding holds and what the model needs, in one
    message for every mismatch (missing encoder key, a key the model has no encoder for, wrong width):
    an SDXL/SD3 file on Flux, a Flux file on SD3 or an SD1 file on either is refused, not half applied."""
    where = emb.source or emb.name
    keys = encoder_keys(bundle)
    optional = optional_keys(keys)
    widths = [int(e.get_input_embeddings().embedding_dim) for e in bundle.text_encoders]
    fits = True
    for key, expected in zip(keys, widths, strict=True):
        tensor = _source(emb, key)
        if tensor is None:
            fits = fits and key in optional
        elif int(tensor.shape[1]) != expected:
            fits = False
    if any(key not in keys for key in emb.vectors):
        fits = False  # e.g. clip_g on Flux, t5 on SDXL, clip_l on SD1: made for another family
    for key, output in emb.output_vectors.items():  # OneTrainer's output vectors: the encoder's width and count
        source = _source(emb, key)
        if key not in keys or source is None or tuple(output.shape) != tuple(source.shape):
            fits = False
    if not fits:
        needed = [(k, w) for k, w in zip(keys, widths, strict=True) if k not in optional]
        may = [(k, w) for k, w in zip(keys, widths, strict=True) if k in optional]
        wanted = " and ".join(
            f"vectors of width {w}" if k == SINGLE else f"{k} vectors of width {w}" for k, w in needed
        )
        if may:
            wanted += "".join(f" (optionally {k} vectors of width {w})" for k, w in may)
        raise NetworkMismatchError(
            f"embedding {emb.name!r} ({where}) has {emb.describe()}; this {bundle.family} model needs {wanted}"
        )


@dataclass
class EmbeddingHandle:
    """Embeddings active in a bundle; :meth:`remove` undoes :func:`apply_embeddings` exactly."""

    bundle: Any
    embeddings: list[Embedding]
    tokens: dict[str, list[str]] = field(default_factory=dict)
    tables: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    #: (tokenizer, one embedding's placeholder ids) declared as a token group, undone by :meth:`remove`
    groups: list[tuple[Any, list[int]]] = field(default_factory=list)
    #: each embedding's tokens and tables as sdcore added them (:func:`sdcore.models.token_embeddings.add_token_rows`)
    rows: dict[str, TokenRows] = field(default_factory=dict)
    #: name -> the text that stands for that embedding instead of its name (``--placeholder``)
    placeholders: dict[str, str] = field(default_factory=dict)
    removed: bool = False

    def expand(self, prompt: str) -> str:
        """``prompt`` with each embedding's tokens: where its placeholder is written, or (without one) its name as
        a whole word; an embedding with a placeholder does not answer to its name (OneTrainer's meaning)."""
        by_name = dict(self.tokens)
        for name, text in self.placeholders.items():
            if name in by_name:
                prompt = replace_placeholder(prompt, text, by_name.pop(name))
        return expand_prompt(prompt, by_name)

    def parameters(self) -> list[torch.Tensor]:
        return [t for per_name in self.tables.values() for t in per_name.values()]

    def current(self, name: str) -> Embedding:
        """The embedding ``name`` with its live (possibly trained) vectors."""
        original = next(e for e in self.embeddings if e.name == name)
        vectors = {key: t.detach().cpu().clone() for key, t in self.tables[name].items()}
        return Embedding(
            name=name,
            vectors=vectors,
            step=original.step,
            sd_checkpoint=original.sd_checkpoint,
            sd_checkpoint_name=original.sd_checkpoint_name,
            stored_name=original.stored_name,
            source=original.source,
            metadata=dict(original.metadata),
        )

    def remove(self) -> None:
        if self.removed:
            return
        self.removed = True
        for rows in reversed(list(self.rows.values())):
            rows.remove()


def applied_outputs(bundle: ModelBundle, emb: Embedding) -> dict[str, torch.Tensor]:
    """The output vectors of ``emb`` (OneTrainer's output embedding) that this model's encodings apply, by encoder
    key: all but those of an encoder used for its pooled vector only (FLUX.1's CLIP-L, :data:`_POOLED_ONLY`)."""
    skipped = _POOLED_ONLY.get(bundle.family, frozenset())
    return {key: tensor for key, tensor in emb.output_vectors.items() if key not in skipped}


def unapplied_output_warning(bundle: ModelBundle, emb: Embedding) -> str | None:
    """The warning for output vectors of ``emb`` this model cannot apply, naming the file; ``None`` when all apply."""
    left = [key for key in emb.output_vectors if key not in applied_outputs(bundle, emb)]
    if not left:
        return None
    parts = ", ".join(f"{key}_out" for key in left)
    return (
        f"embedding {emb.name!r} ({emb.source or emb.name}): output embedding: not applied, {parts}: this "
        f"{bundle.family} model uses that text encoder's pooled vector only, so its output vectors have no position "
        "to replace (its zero input vectors are used)"
    )


def apply_embeddings(
    bundle: ModelBundle, embeddings: Sequence[Embedding], *, trainable: bool = False
) -> EmbeddingHandle:
    """Activate ``embeddings`` in ``bundle``'s tokenizers and text encoders.

    With ``trainable`` the tables are leaf ``nn.Parameter`` s (float32) for an optimizer. An output embedding
    (:attr:`Embedding.output_vectors`) gets zero input rows and its output vectors (:func:`applied_outputs`) put in
    the encoders' outputs, as OneTrainer applies it. All or nothing: on error, whatever was added is removed again.
    """
    names = [e.name for e in embeddings]
    if len({n.lower() for n in names}) != len(names):
        raise NetworkMismatchError(f"embedding names clash (case-insensitively): {', '.join(names)}")
    for emb in embeddings:
        check_fits(bundle, emb)
    handle = EmbeddingHandle(bundle=bundle, embeddings=list(embeddings))
    keys = encoder_keys(bundle)
    try:
        for emb in embeddings:
            tokens = placeholder_tokens(emb.name, emb.num_vectors, bundle.tokenizers)
            handle.tokens[emb.name] = tokens
            handle.tables[emb.name] = {}
            sources = [_source(emb, key) for key in keys]  # None: an optional part (T5) the file lacks
            for key, source in zip(keys, sources, strict=True):
                if source is not None and int(source.shape[0]) != len(tokens):
                    raise NetworkMismatchError(
                        f"embedding {emb.name!r}: {key} has {int(source.shape[0])} vectors but {len(tokens)} are used"
                    )
            applied = applied_outputs(bundle, emb)
            outputs = [applied.get(key) for key in keys]
            # OneTrainer's output embedding: zero input rows where output vectors replace the encoder's output
            sources = [s if o is None else torch.zeros_like(o) for s, o in zip(sources, outputs, strict=True)]
            rows = add_token_rows(bundle, emb.name, tokens, sources, trainable=trainable, outputs=outputs)
            handle.rows[emb.name] = rows
            handle.groups.extend(rows.groups)
            handle.tables[emb.name] = {keys[index]: table for index, table in rows.tables.items()}
    except BaseException:
        handle.remove()
        raise
    return handle


def init_vectors(
    bundle: ModelBundle, init_text: str, count: int, *, keys: Iterable[str] | None = None
) -> dict[str, torch.Tensor]:
    """A1111 initialisation: the init text's raw token-embedding rows spread over ``count`` vectors.

    ``vec[i] = rows[i * L // count]`` (tokens repeated when L < count, sampled when L > count);
    zeros when the init text is empty. ``keys`` limits the encoders (default: all of the model's).
    For SD1's encoder and every CLIP-L, A1111 first cuts the tokens to ``count`` (it tokenizes with
    ``max_length=count``, which the HF tokenizer truncates to), so a long init text gives its first
    words, not words sampled over it; its OpenCLIP path (SD2, SDXL's CLIP-G) does not cut.
    """
    out: dict[str, torch.Tensor] = {}
    wanted = None if keys is None else set(keys)
    for encoder, tokenizer, key in zip(bundle.text_encoders, bundle.tokenizers, encoder_keys(bundle), strict=True):
        if wanted is not None and key not in wanted:
            continue
        out[key] = init_rows(encoder, tokenizer, init_text, count, cut=key == "clip_l" or bundle.family == "sd1")
    return out


# --- generation-time handler -----------------------------------------------------------------------
def short_hash(path: Path) -> str:
    """A1111's embedding hash: the first 12 hex digits of the file's sha256."""
    from sdcore.models.hashes import sha256_file

    return sha256_file(path)[:12]


class EmbeddingHandler(PromptNetworkHandler):
    """Activates the embeddings whose prompt words occur in the prompt or negative prompt.

    The prompt word is A1111's: the file stem of a ``.pt``/``.bin``/``.safetensors`` file, the
    ``name`` stored inside an image embedding (A1111 previews are saved as ``name-STEP.png`` and
    store ``name-STEP``). Images that carry no embedding and ``*.preview.png`` files are skipped.
    """

    tag: ClassVar[str | None] = None
    suffixes: ClassVar[tuple[str, ...]] = EMBEDDING_SUFFIXES
    #: a LoRA's bundled embeddings (:attr:`extra_embeddings`) answer to their names while the LoRA is in the prompt
    accepts_embeddings: ClassVar[bool] = True

    def __init__(self, directory: str | Path | None = None) -> None:
        super().__init__(directory)
        self._cache: dict[Path, tuple[float, Embedding | None]] = {}
        # warnings about bundled embeddings already given (a batch or plot activates the same LoRA many times)
        self._said: set[str] = set()
        # embeddings this handler activated and not yet undone, per bundle (a session may ask
        # again for further prompts of a batch while the first activation is still live)
        self._active: dict[int, dict[str, list[str]]] = {}

    kind = "embedding"

    def accepts(self, path: Path) -> bool:
        """An embedding: A1111 ``string_to_param``, kohya ``emb_params``, OneTrainer's ``emp_params`` (beside an output
        embedding's ``emp_params_out``; or OneTrainer's ``*_out`` output vectors alone), one tensor per encoder (``clip_l``,
        ``clip_g``, ``t5`` or ComfyUI's ``t5xxl``: SDXL's, SD3's, FLUX.1's, Chroma's T5 alone), a diffusers
        one-tensor dict, or an image (A1111 PNG embeddings are checked when loaded)."""
        from sdcore.models.embedding_files import EMB_PARAMS, OT_EMP_PARAMS, encoder_part_keys, output_part_keys
        from sdcore.models.peek import peek_file

        found = peek_file(path)
        if found.error:  # unreadable or unsafe: let the loader say so in its own words
            return True
        if found.top == "image":
            return True
        keys = set(found.keys)
        if "string_to_param" in keys or EMB_PARAMS in keys or OT_EMP_PARAMS in keys or encoder_part_keys(keys):
            return True
        if output_part_keys(keys) and all(key.endswith(OUTPUT_SUFFIX) for key in keys):
            return True  # output vectors alone: OneTrainer loads them as an output embedding (zero input vectors)
        return found.top == "dict" and len(keys) == 1 and list(found.nested.values()) in ([], ["Tensor"])

    def prompt_word(self, path: Path) -> str | None:
        """The word that activates ``path`` (A1111's rule): a weight file's stem, the name stored
        inside a PNG embedding (None: an image without an embedding)."""
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            return path.stem
        emb = self._read(path, quiet=True)
        return None if emb is None else emb.name

    def candidates(self) -> dict[str, tuple[str, list[Path]]]:
        """Prompt word (lower-cased) -> (the word, the files answering to it), weight files before
        images, ``*.preview.png`` and empty files skipped."""
        out: dict[str, tuple[str, list[Path]]] = {}
        # weight files win over images of the same word (an image there is usually a preview)
        files = sorted(self.available(), key=lambda p: (p.suffix.lower() in IMAGE_SUFFIXES, str(p)))
        for path in files:
            if path.name.lower().endswith(".preview.png") or path.stat().st_size == 0:
                continue
            word = self.prompt_word(path)
            if word:
                out.setdefault(word.lower(), (word, []))[1].append(path)
        return out

    def pick(self, name: str, paths: list[Path]) -> Path | None:
        """The embedding file among ``paths`` (same prompt word): files of other kinds are ignored;
        two weight files that are both embeddings are an error listing them, unless they hold the same
        vectors: ``sdcore train ti --format X`` writes the ``.pt`` and its ``X`` copy side by side, one
        embedding (the first file, ``.pt`` before ``.safetensors``, is taken)."""
        mine = [p for p in paths if self.accepts(p)]
        weights = [p for p in mine if p.suffix.lower() not in IMAGE_SUFFIXES]
        if len(weights) > 1 and not self._same_vectors(weights):
            listed = ", ".join(str(p) for p in weights)
            raise NetworkMismatchError(
                f"embedding {name!r} is ambiguous: {len(weights)} embedding files have that name ({listed}); "
                "rename or move one"
            )
        return mine[0] if mine else None

    def _same_vectors(self, paths: list[Path]) -> bool:
        """True when every file holds the same encoder keys with equal tensors (a format copy)."""
        try:
            first, *rest = [self._read(p, quiet=True) for p in paths]
        except (ModelFormatError, OSError):  # unreadable: the ambiguity message lists the files
            return False
        if first is None:
            return False
        for emb in rest:
            if emb is None or emb.vectors.keys() != first.vectors.keys():
                return False
            if not all(torch.equal(emb.vectors[k], first.vectors[k]) for k in first.vectors):
                return False
        return True

    def words(self) -> dict[str, tuple[str, Path]]:
        """Prompt word (lower-cased) -> (word, its embedding file); see :meth:`pick`."""
        out: dict[str, tuple[str, Path]] = {}
        for key, (word, paths) in self.candidates().items():
            picked = self.pick(key, paths)
            if picked is not None:
                out[key] = (word, picked)
        return out

    def names(self) -> dict[str, Path]:
        """Prompt word (lower-cased) -> file."""
        return {key: path for key, (_, path) in self.words().items()}

    def _read(self, path: Path, *, quiet: bool = False) -> Embedding | None:
        mtime = path.stat().st_mtime
        cached = self._cache.get(path)
        if cached is not None and cached[0] == mtime:
            return cached[1]
        emb: Embedding | None
        try:
            emb = load_embedding(path)  # images: named by their stored name (A1111)
        except ModelFormatError:
            if not quiet or path.suffix.lower() not in IMAGE_SUFFIXES:
                raise
            emb = None  # A1111 skips images without an embedding silently
        if emb is not None and path.suffix.lower() not in IMAGE_SUFFIXES:
            emb.name = path.stem
        self._cache[path] = (mtime, emb)
        return emb

    def load(self, path: Path) -> Embedding:
        emb = self._read(path)
        if emb is None:
            raise ModelFormatError(f"{path}: image carries no embedding")
        return emb

    def _say(self, message: str) -> None:
        """A warning about a bundled embedding, once for this handler."""
        if message not in self._said:
            self._said.add(message)
            log.warning("%s", message)

    def bundled(
        self, bundle: ModelBundle, candidates: dict[str, tuple[str, list[Path]]]
    ) -> dict[str, tuple[Embedding, str]]:
        """Lower-cased word -> (embedding, the network that carries it) for the :attr:`extra_embeddings` that apply,
        by A1111's rules (``Lora/networks.py`` ``load_networks``): an embedding in the embeddings folders keeps its
        word (the bundled one is skipped with a warning), so does the first LoRA of the prompt that bundles it; one
        that does not fit the model is skipped with a warning (A1111 lists it as skipped); the LoRA's weight does
        not matter. OneTrainer's output vectors (``<part>_out``) are applied as OneTrainer does (A1111 ignores them;
        :func:`apply_embeddings`). Words are compared case-insensitively, as every prompt word here is (A1111's tokenizer lower-cases
        the prompt; its clash test compares exact names, yet its folder embedding is found first all the same).
        OneTrainer's newer SD1 files spell the one tensor ``clip_l``: on SD1/SD2 a lone ``clip_l`` is that tensor,
        as A1111 reads a one-tensor dict."""
        out: dict[str, tuple[Embedding, str]] = {}
        keys = encoder_keys(bundle) if self.extra_embeddings else []
        for offered in self.extra_embeddings:
            word, network = offered.name.lower(), offered.network or "a LoRA"
            if word in candidates and self.pick(word, candidates[word][1]) is not None:
                self._say(f"{network}: bundled embedding {offered.name!r} skipped: an embedding file of that name is "
                          f"in the embeddings folder, and it is used (as A1111 does)")  # fmt: skip
                continue
            if word in out:
                self._say(f"{network}: bundled embedding {offered.name!r} skipped: {out[word][1]}, earlier in the "
                          "prompt, bundles one of that name, and it is used (as A1111 does)")  # fmt: skip
                continue
            try:
                emb = embedding_from_bundled(offered)
                if keys == [SINGLE] and set(emb.vectors) == {CLIP_L}:
                    emb.vectors = {SINGLE: emb.vectors[CLIP_L]}
                    if set(emb.output_vectors) == {CLIP_L}:  # OneTrainer's SD1 bundle: clip_l_out
                        emb.output_vectors = {SINGLE: emb.output_vectors[CLIP_L]}
                check_fits(bundle, emb)
            except (ModelFormatError, NetworkMismatchError) as exc:
                self._say(f"{network}: bundled embedding {offered.name!r} skipped: {exc}")
                continue
            unapplied = unapplied_output_warning(bundle, emb)
            if unapplied:
                self._say(f"{network}: bundled {unapplied}")
            out[word] = (emb, network)
        return out

    def _comfy_missing(self, texts: Iterable[str], candidates: dict[str, tuple[str, list[Path]]] | None) -> str | None:
        """One line for the ComfyUI ``embedding:NAME`` words of ``texts`` that name no file and no embedding the
        prompt's networks bundle (:attr:`extra_embeddings`), else ``None`` (``candidates`` is :meth:`candidates`,
        read here only when some text has such a word)."""
        comfy = [pair for text in texts for pair in comfy_embedding_words(text)]
        if not comfy:
            return None
        known = set(self.candidates() if candidates is None else candidates)
        known.update(emb.name.lower() for emb in self.extra_embeddings)
        missing = [written for written, name in comfy if name.lower() not in known]
        return self._not_found(list(dict.fromkeys(missing))) if missing else None

    def check_prompts(self, prompts: Sequence[tuple[str, str]]) -> list[str]:
        """A ComfyUI ``embedding:NAME`` without a file, said before the model loads (ComfyUI only logs a warning
        and drops the word: here the image would silently differ)."""
        missing = self._comfy_missing((text for pair in prompts for text in pair), None)
        return [missing] if missing else []

    def activate(self, bundle: ModelBundle, refs: list[NetworkRef], prompt: str, negative_prompt: str) -> Activation:
        candidates = self.candidates()
        bundled = self.bundled(bundle, candidates)
        if comfy_embedding_words(prompt + "\n" + negative_prompt):  # ComfyUI's embedding:NAME: the word alone
            missing = self._comfy_missing((prompt, negative_prompt), candidates)
            if missing:
                raise NetworkMismatchError(missing)
            spelled = {key: word for key, (word, _paths) in candidates.items()}
            spelled.update((key, emb.name) for key, (emb, _network) in bundled.items())
            prompt = replace_comfy_embeddings(prompt, spelled)
            negative_prompt = replace_comfy_embeddings(negative_prompt, spelled)
        text = prompt + "\n" + negative_prompt
        files: dict[str, tuple[str, Path]] = {}
        # only the words that occur in the prompt are checked (cheap for big embedding folders)
        for word in find_names(text, [word for word, _ in candidates.values()]):
            picked = self.pick(word, candidates[word.lower()][1])
            if picked is not None:
                files[word.lower()] = (candidates[word.lower()][0], picked)
        words = [word for word, _ in files.values()] + [emb.name for emb, _network in bundled.values()]
        wanted = find_names(text, words)
        if not wanted:
            return Activation(prompt=prompt, negative_prompt=negative_prompt)
        active = self._active.setdefault(id(bundle), {})
        fresh = [
            self.load(files[name.lower()][1]) if name.lower() in files else bundled[name.lower()][0]
            for name in wanted
            if name not in active
        ]
        for emb in fresh:  # a bundled one was said by bundled(), with its LoRA's name
            unapplied = unapplied_output_warning(bundle, emb) if emb.name.lower() in files else None
            if unapplied:
                self._say(unapplied)
        handle = apply_embeddings(bundle, fresh) if fresh else None
        if handle is not None:
            active.update(handle.tokens)
        tokens = {name: active[name] for name in wanted}

        def undo() -> None:
            if handle is not None:
                handle.remove()
                for name in handle.tokens:
                    active.pop(name, None)

        # A1111 (sd_hijack_clip.py): each name once, without ':' and ',' (they would split the field); a bundled
        # embedding's "hash" is the LoRA's name as the prompt wrote it (Lora/networks.py BundledTIHash, by default)
        hashes = ", ".join(
            f"{name.replace(':', '').replace(',', '')}: "
            + (short_hash(files[name.lower()][1]) if name.lower() in files else bundled[name.lower()][1])
            for name in wanted
        )
        return Activation(
            prompt=expand_prompt(prompt, tokens),
            negative_prompt=expand_prompt(negative_prompt, tokens),
            undo=undo,
            info={"TI hashes": hashes},
        )


__all__ = [
    "OPTIONAL_KEYS",
    "EmbeddingHandle",
    "EmbeddingHandler",
    "ExtendedTokenEmbedding",
    "applied_outputs",
    "apply_embeddings",
    "check_fits",
    "comfy_embedding_words",
    "encoder_keys",
    "expand_prompt",
    "find_names",
    "init_vectors",
    "optional_keys",
    "placeholder_tokens",
    "replace_comfy_embeddings",
    "unapplied_output_warning",
]


class LiveEmbeddings(PromptNetworkHandler):
    """An untagged handler for embeddings that are already active (training samples): it only
    rewrites the prompts; undo does nothing because the trainer owns the embeddings."""

    tag: ClassVar[str | None] = None

    def __init__(self, handle: EmbeddingHandle) -> None:
        super().__init__(None)
        self.handle = handle

    def activate(self, bundle: ModelBundle, refs: list[NetworkRef], prompt: str, negative_prompt: str) -> Activation:
        """ComfyUI's ``embedding:NAME`` of an active embedding becomes the text that stands for it (its name, or its
        ``--placeholder``) first, as :meth:`EmbeddingHandler.activate` does in ``sdcore generate``, so a sample
        prompt written for ComfyUI shows the embedding, not the words ``embedding`` and ``:``."""
        spelled = {name.lower(): self.handle.placeholders.get(name, name) for name in self.handle.tokens}
        prompt, negative_prompt = (replace_comfy_embeddings(text, spelled) for text in (prompt, negative_prompt))
        return Activation(prompt=self.handle.expand(prompt), negative_prompt=self.handle.expand(negative_prompt))
