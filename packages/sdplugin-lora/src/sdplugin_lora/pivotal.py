"""Pivotal tuning: new embeddings trained with the LoRA and written into its file (``--embedding``).

OneTrainer's "additional embeddings" (``additional_embeddings``: ``placeholder``, ``token_count``,
``initial_embedding_text``, ``stop_training_after``; ``embedding_learning_rate``) and diffusers'
``train_dreambooth_lora_sdxl_advanced.py --train_text_encoder_ti`` (``--token_abstraction``,
``--num_new_tokens_per_abstraction``, ``--train_text_encoder_ti_frac``) train new token vectors beside the LoRA.
Here one ``--embedding NAME:TOKENS:INIT_TEXT`` per embedding:

- the tokens are added with sdcore's token API (:func:`sdcore.models.token_embeddings.add_token_rows`), in every
  text encoder of the model (SD3/FLUX.1's T5-XXL too, Chroma's only one), starting from the init text's token rows
  (A1111's spread, as textual inversion);
- ``NAME`` is the caption's placeholder: every occurrence in a caption or sample prompt (plain text,
  case-sensitive, anywhere) becomes the tokens, OneTrainer's ``str.replace`` of its placeholder;
- the vectors are one optimizer group (``--embedding-lr``, no weight decay), in the resumable state and, with
  ``--ema``, in the average like every trained tensor; ``--embedding-stop-at N`` trains them in steps ``1..N``;
  T5-XXL's vectors train only with ``--embedding-t5`` (OneTrainer's ``text_encoder_N.train_embedding`` of T5;
  off by default as ``sdcore train ti --train-t5``: T5's backward pass costs the whole T5-XXL) or where T5 is the
  only encoder (Chroma: untrained vectors would leave it nothing to learn; OneTrainer's default trains them).
  Untrained, they stay at the init text's rows and T5 reads the tokens as those, in training and in the written
  file alike;
- they are written into the LoRA file as OneTrainer bundles them (``StableDiffusionLoRASaver`` /
  ``StableDiffusionXLLoRASaver``) and A1111 1.7+ reads them: ``bundle_emb.NAME.clip_l`` (SD1/SD2: one tensor;
  A1111's ``Lora/networks.py`` makes it ``{"clip_l": tensor}``, which ``create_embedding_from_data`` reads as a
  one-tensor dict) or ``bundle_emb.NAME.clip_l`` and ``bundle_emb.NAME.clip_g`` (SDXL), ``[TOKENS, width]`` each.
  Older OneTrainer wrote SD1/SD2's tensor as ``bundle_emb.NAME.string_to_param.*``, which A1111 reads too.
  SD3/SD3.5: ``clip_l``, ``clip_g`` and ``t5``; FLUX.1: ``clip_l`` and ``t5``; Chroma: ``t5``
  (``StableDiffusion3LoRASaver``, ``FluxLoRASaver``, ``ChromaLoRASaver``: a part is written whenever its encoder
  is loaded, trained or not); sdcore's generate applies them, A1111 has no such families.
- with ``--embedding-files`` (OneTrainer's ``bundle_additional_embeddings: false``) they are written instead as
  textual-inversion files, ``<LoRA file>_embeddings/NAME.safetensors`` (OneTrainer's folder and file names; sdcore's
  one embedding-file layout, :mod:`sdcore.models.embedding_files`), for ComfyUI, Forge and diffusers, which skip or
  refuse ``bundle_emb.*`` keys; the LoRA file then holds none.

This module does not import the textual-inversion plugin (plugins are installed apart); the shared parts are
sdcore's.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from sdcore.errors import ConfigError
from sdcore.generate.networks import Activation, NetworkRef, PromptNetworkHandler
from sdcore.models.bundled_embeddings import PART_BY_KIND, PREFIX

if TYPE_CHECKING:
    import torch
    from sdcore.models.bundle import ModelBundle
    from sdcore.models.token_embeddings import TokenRows

#: the key of an embedding's vectors inside a LoRA file (OneTrainer's ``bundle_emb.<placeholder>.<encoder>``)
BUNDLE_PREFIX = PREFIX
#: the UNet families whose embeddings sdcore bundles, and their per-encoder keys in ``bundle.text_encoders`` order:
#: current OneTrainer's (SD1/SD2's one tensor is ``clip_l`` there, also on SD2's OpenCLIP encoder)
FAMILY_KEYS: dict[str, tuple[str, ...]] = {
    "sd1": ("clip_l",),
    "sd2": ("clip_l",),
    "sdxl": ("clip_l", "clip_g"),
}
#: the transformer families whose embeddings sdcore bundles: their keys are their encoders' kinds in sdcore's one
#: table (:data:`sdcore.models.bundled_embeddings.PART_BY_KIND`, OneTrainer's savers' names)
DIT_FAMILIES = ("sd3", "flux", "chroma")
#: the key of T5-XXL's vectors
T5 = PART_BY_KIND["t5-xxl"]
#: the families, as the refusal names them
FAMILY_LABEL = "SD1, SD2, SDXL, SD3/SD3.5, FLUX.1 and Chroma"
#: the resumable state's prefix of the vectors (``sdcore_emb.<name>.<encoder key>``)
STATE_PREFIX = "sdcore_emb."


@dataclass(frozen=True)
class EmbeddingSpec:
    """One ``--embedding``: its name (the caption placeholder), vector count and init text."""

    name: str
    tokens: int = 1
    init_text: str = "*"

    def spec(self) -> str:
        """Back to ``NAME:TOKENS:INIT_TEXT`` (what a OneTrainer config becomes)."""
        return f"{self.name}:{self.tokens}:{self.init_text}"


def parse_spec(text: str) -> EmbeddingSpec:
    """``NAME[:TOKENS[:INIT_TEXT]]`` (the init text may hold colons); ConfigError with the fix otherwise."""
    name, _, rest = text.partition(":")
    count_text, _, init_text = rest.partition(":")
    where = f"--embedding {text!r}"
    if not name.strip():
        raise ConfigError(f"{where}: the name is empty (write NAME:TOKENS:INIT_TEXT, e.g. sks:2:a person)")
    if name != name.strip():
        raise ConfigError(f"{where}: the name has spaces at its ends")
    if name.startswith(("bundle_emb", STATE_PREFIX)) or "." in name:
        raise ConfigError(f"{where}: the name may not contain '.' (it is part of the file's bundle_emb.NAME keys)")
    count = 1
    if count_text.strip():
        try:
            count = int(count_text)
        except ValueError:
            raise ConfigError(f"{where}: TOKENS {count_text!r} is not a whole number") from None
        if not 1 <= count <= 75:
            raise ConfigError(f"{where}: TOKENS must be 1 to 75 (one prompt chunk), got {count}")
    return EmbeddingSpec(name=name, tokens=count, init_text=init_text if rest.count(":") else "*")


def parse_specs(texts: Sequence[str]) -> list[EmbeddingSpec]:
    """Every ``--embedding``; two with the same name, or one name inside another (the longer one's captions
    would also hold the shorter placeholder), are refused."""
    specs = [parse_spec(t) for t in texts]
    names = [s.name for s in specs]
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            if a == b:
                raise ConfigError(f"--embedding {a!r} is given twice")
            if a in b or b in a:
                raise ConfigError(
                    f"--embedding names {a!r} and {b!r}: one is part of the other, so a caption's placeholder "
                    "would be ambiguous; choose names that do not contain each other"
                )
    return specs


def caption_problems(specs: Sequence[EmbeddingSpec], captions: Sequence[str]) -> tuple[list[str], list[str]]:
    """(problems, notes) of the run's captions for its embeddings: a vector trains only through captions that hold
    its name (the run's replacement rule, :func:`sdcore.models.token_embeddings.has_placeholder`), so no caption
    with any name is a problem (nothing but the LoRA would train) and names no caption holds are a note (those
    vectors stay at their init text). Torch-free: said by the pre-flight before any model loads."""
    from sdcore.models.token_embeddings import has_placeholder

    if not specs or not captions:
        return [], []
    unused = [s.name for s in specs if not any(has_placeholder(c, s.name) for c in captions)]
    if not unused:
        return [], []
    listed = ", ".join(repr(n) for n in unused)
    if len(unused) == len(specs):
        return [
            f"--embedding {listed}: no caption of the {len(captions)} training images contains "
            f"{'the name' if len(unused) == 1 else 'any of the names'} (case-sensitive, as the run replaces it), "
            "so the embedding vectors would never train; write the name in the captions"
        ], []
    return [], [
        f"--embedding {listed}: no training caption contains {'this name' if len(unused) == 1 else 'these names'} "
        "(case-sensitive), so those vectors stay at their init text and are written as they started"
    ]


def file_names(specs: Sequence[EmbeddingSpec]) -> dict[str, str]:
    """``--embedding-files``: each embedding's file name (OneTrainer's rule,
    :func:`sdcore.models.embedding_files.embedding_file_name`); ConfigError when a name leaves no file name or two
    give the same one (one file would replace the other). Torch-free: checked with the options."""
    from sdcore.errors import ModelFormatError
    from sdcore.models.embedding_files import embedding_file_name

    names: dict[str, str] = {}
    for spec in specs:
        try:
            names[spec.name] = embedding_file_name(spec.name)
        except ModelFormatError as exc:
            raise ConfigError(f"--embedding-files: {exc}") from None
    seen: dict[str, str] = {}
    for name, file in names.items():
        if file.lower() in seen:  # one file on a case-insensitive disk (Windows, macOS) too
            raise ConfigError(
                f"--embedding-files: --embedding {seen[file.lower()]!r} and {name!r} would both be written as "
                f"{file}; choose names that differ in letters or digits"
            )
        seen[file.lower()] = name
    return names


def family_keys(family: str) -> tuple[str, ...] | None:
    """The bundle keys of ``family``'s text encoders (``bundle.text_encoders`` order), or ``None`` where sdcore does
    not bundle embeddings (the SDXL refiner, plugin families). Torch-free: the pre-flight asks it."""
    if family in FAMILY_KEYS:
        return FAMILY_KEYS[family]
    if family not in DIT_FAMILIES:
        return None
    from sdcore.models.family import get_family

    return tuple(PART_BY_KIND[encoder.kind] for encoder in get_family(family).text_encoders)


def trained_keys(keys: Sequence[str], train_t5: bool) -> tuple[str, ...]:
    """The keys whose vectors train: every CLIP encoder's; T5's with ``train_t5`` (``--embedding-t5``) or where it
    is the only encoder (Chroma: frozen vectors there would be a plain placeholder; OneTrainer's
    ``text_encoder.train_embedding`` defaults to true)."""
    return tuple(key for key in keys if key != T5 or train_t5 or len(keys) == 1)


def token_strings(index: int, spec: EmbeddingSpec) -> list[str]:
    """The tokenizer tokens standing for ``spec``'s vectors: lower case (CLIP's tokenizer lowercases the text
    before it matches added tokens), bracketed so no caption word contains them, unique per embedding."""
    slug = re.sub(r"[^a-z0-9]+", "_", spec.name.lower()).strip("_") or "emb"
    return [f"<pt{index}_{slug}_{i}>" for i in range(spec.tokens)]


class PivotalEmbeddings:
    """The run's new embeddings in a bundle: added by :meth:`add`, removed by :meth:`remove`."""

    def __init__(self, specs: Sequence[EmbeddingSpec], *, train_t5: bool = False) -> None:
        self.specs = list(specs)
        self.train_t5 = train_t5
        self.tokens = {spec.name: token_strings(i, spec) for i, spec in enumerate(self.specs)}
        self.rows: dict[str, TokenRows] = {}
        self.keys: tuple[str, ...] = ()
        #: the encoder indexes whose tables train (the others are written as they started)
        self.trained: tuple[int, ...] = ()
        self.frozen = False

    def add(self, bundle: ModelBundle, saved: dict[str, torch.Tensor] | None = None) -> None:
        """Add the tokens to ``bundle``'s tokenizers with trainable rows: the init text's vectors, or the
        ``bundle_emb.*`` tensors of ``saved`` (a written LoRA file's, for :meth:`LoraMethod.load_result`;
        NetworkMismatchError when one is missing or has another shape)."""
        from sdcore.models.token_embeddings import add_token_rows, init_rows

        keys = family_keys(bundle.family)
        if keys is None or len(keys) != len(bundle.text_encoders):
            raise ConfigError(f"--embedding: sdcore bundles embeddings for {FAMILY_LABEL}, not {bundle.family}")
        self.keys = keys
        trained = trained_keys(keys, self.train_t5)
        self.trained = tuple(i for i, key in enumerate(keys) if key in trained)
        # A1111 cuts the init text to TOKENS tokens on CLIP-L encoders (SD1's, SDXL's first), not on OpenCLIP
        cuts = [encoder.kind == "clip-l" for encoder in bundle.family_spec.text_encoders]
        try:
            for spec in self.specs:
                if saved is not None:
                    rows = [_saved_rows(saved, spec, key) for key in keys]
                else:
                    rows = [
                        init_rows(encoder, tokenizer, spec.init_text, spec.tokens, cut=cut)
                        for encoder, tokenizer, cut in zip(bundle.text_encoders, bundle.tokenizers, cuts, strict=True)
                    ]
                self.rows[spec.name] = added = add_token_rows(
                    bundle, f"pivotal:{spec.name}", self.tokens[spec.name], rows, trainable=saved is None
                )
                for index, table in added.tables.items():
                    if index not in self.trained:  # T5 without --embedding-t5: read, never updated
                        table.requires_grad_(False)
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        for rows in reversed(list(self.rows.values())):
            rows.remove()
        self.rows.clear()

    def parameters(self) -> list[torch.Tensor]:
        """The tables that train (every encoder's but an untrained T5's), for the optimizer, EMA and the stop."""
        return [table for rows in self.rows.values() for index, table in sorted(rows.tables.items())
                if index in self.trained]  # fmt: skip

    def param_group(self, lr: float) -> dict[str, Any]:
        """One optimizer group over every table; no weight decay (it would pull the vectors to zero), as A1111's
        textual inversion."""
        return {"params": self.parameters(), "lr": lr, "name": "embeddings", "weight_decay": 0.0}

    def expand(self, prompt: str) -> str:
        """``prompt`` with every placeholder replaced by its tokens (longest names first)."""
        from sdcore.models.token_embeddings import replace_placeholder

        for name in sorted(self.tokens, key=len, reverse=True):
            prompt = replace_placeholder(prompt, name, self.tokens[name])
        return prompt

    def _tables(self) -> dict[str, torch.Tensor]:
        """The tables by ``<name>.<encoder key>``."""
        out = {}
        for name, rows in self.rows.items():
            for index, table in sorted(rows.tables.items()):
                out[f"{name}.{self.keys[index]}"] = table
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The vectors for the resumable state (``sdcore_emb.<name>.<key>``, float32 copies; an untrained T5's
        too: a resumed run reads the same file layout)."""
        return {STATE_PREFIX + k: t.detach().float().cpu().clone() for k, t in self._tables().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy a resumable state's vectors back (NetworkMismatchError when one is missing or has another shape)."""
        import torch
        from sdcore.errors import NetworkMismatchError

        with torch.no_grad():
            for key, table in self._tables().items():
                saved = state.get(STATE_PREFIX + key)
                if saved is None:
                    raise NetworkMismatchError(f"the resume state has no vectors of --embedding {key.split('.')[0]!r}")
                if tuple(saved.shape) != tuple(table.shape):
                    raise NetworkMismatchError(
                        f"the resume state's {key} vectors have shape {tuple(saved.shape)}, the run's {tuple(table.shape)}"
                    )
                table.copy_(saved.to(table))

    def bundle_state(self) -> dict[str, torch.Tensor]:
        """The tensors written into the LoRA file: ``bundle_emb.<name>.<key>``, ``[TOKENS, width]``."""
        return {BUNDLE_PREFIX + k: t.detach().float().cpu().clone() for k, t in self._tables().items()}

    def file_vectors(self) -> dict[str, dict[str, torch.Tensor]]:
        """Each embedding's vectors as its own file holds them (:mod:`sdcore.models.embedding_files`): SD1/SD2's
        one CLIP-L tensor under ``"*"`` (written ``emb_params``), every other family's per encoder key (SDXL's
        ``clip_l`` and ``clip_g``; a one-encoder family other than SD1/SD2, Chroma's ``t5``, keeps its key)."""
        from sdcore.models.bundled_embeddings import SINGLE

        single = self.keys == ("clip_l",)  # SD1/SD2 (FAMILY_KEYS): A1111's and kohya's one-tensor file
        out: dict[str, dict[str, torch.Tensor]] = {}
        for name, rows in self.rows.items():
            parts = {self.keys[index]: table.detach() for index, table in sorted(rows.tables.items())}
            out[name] = {SINGLE: next(iter(parts.values()))} if single else parts
        return out

    def write_files(self, folder: Path, metadata: dict[str, str]) -> list[Path]:
        """``--embedding-files``: every embedding as ``folder/NAME.safetensors`` (atomic each), ``metadata`` and its
        name in the header; the files, in --embedding order."""
        from sdcore.models.embedding_files import save_embedding_file

        names = file_names(self.specs)
        folder.mkdir(parents=True, exist_ok=True)
        return [
            save_embedding_file(folder / names[name], vectors, {**metadata, "name": name})
            for name, vectors in self.file_vectors().items()
        ]

    def stop(self, step: int, stop_at: int | None) -> None:
        """``--embedding-stop-at N``, before optimizer step ``step``: step ``N`` still updates the vectors (their
        gradient stays) but computes none from then on; a later step drops any gradient, so a run resumed past
        ``N`` freezes them before its first update, exactly as the uninterrupted run."""
        if not stop_at or step < stop_at:
            return
        for table in self.parameters():
            table.requires_grad_(False)
            if step > stop_at:
                table.grad = None
        self.frozen = True


def _saved_rows(saved: dict[str, torch.Tensor], spec: EmbeddingSpec, key: str) -> torch.Tensor:
    """``bundle_emb.<name>.<key>`` of a written file, checked against ``spec``'s vector count."""
    from sdcore.errors import NetworkMismatchError

    tensor = saved.get(f"{BUNDLE_PREFIX}{spec.name}.{key}")
    if tensor is None:
        raise NetworkMismatchError(f"the LoRA file has no {BUNDLE_PREFIX}{spec.name}.{key} (--embedding {spec.spec()})")
    if tensor.dim() != 2 or int(tensor.shape[0]) != spec.tokens:
        raise NetworkMismatchError(
            f"the LoRA file's {BUNDLE_PREFIX}{spec.name}.{key} has shape {tuple(tensor.shape)}, "
            f"--embedding {spec.spec()} needs {spec.tokens} vectors"
        )
    return tensor


def saved_from_files(folder: Path, specs: Sequence[EmbeddingSpec], keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The vectors of ``--embedding-files``' files in ``folder`` as ``bundle_emb.<name>.<key>`` (what
    :meth:`PivotalEmbeddings.add` takes from a written LoRA); NetworkMismatchError naming a missing file."""
    from sdcore.errors import ModelFormatError, NetworkMismatchError
    from sdcore.models.bundled_embeddings import SINGLE
    from sdcore.models.embedding_files import read_embedding_file

    saved: dict[str, torch.Tensor] = {}
    for spec, file in zip(specs, file_names(specs).values(), strict=True):
        path = folder / file
        if not path.is_file():
            raise NetworkMismatchError(f"{path}: no such file (--embedding {spec.spec()} with --embedding-files)")
        try:
            vectors = read_embedding_file(path)
        except ModelFormatError as exc:
            raise NetworkMismatchError(str(exc)) from None
        if SINGLE in vectors and len(keys) == 1:
            vectors = {keys[0]: vectors[SINGLE]}
        saved.update({f"{BUNDLE_PREFIX}{spec.name}.{key}": tensor for key, tensor in vectors.items()})
    return saved


class LivePivotal(PromptNetworkHandler):
    """Training samples: an untagged handler that writes the placeholders of sample prompts as the tokens (the
    embeddings are already in the bundle; undo has nothing to do)."""

    tag: ClassVar[str | None] = None

    def __init__(self, embeddings: PivotalEmbeddings) -> None:
        super().__init__(None)
        self.embeddings = embeddings

    def activate(self, bundle: ModelBundle, refs: list[NetworkRef], prompt: str, negative_prompt: str) -> Activation:
        return Activation(
            prompt=self.embeddings.expand(prompt), negative_prompt=self.embeddings.expand(negative_prompt)
        )
