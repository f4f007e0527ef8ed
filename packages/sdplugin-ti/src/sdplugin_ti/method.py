"""``sdcore train ti``: Textual Inversion as A1111 trains it, on SD1, SD2 and SDXL, and on the CLIP
encoders of SD3/SD3.5 (CLIP-L and CLIP-G, one vector set each, as SDXL) and Flux.1 (CLIP-L, whose
pooled output conditions the transformer), optionally with a T5-XXL vector set too (``--train-t5``),
and on Chroma's one encoder, T5-XXL (its vectors always train; the file holds ``t5``, OneTrainer's key, and
ComfyUI's ``t5xxl``). The flow-matching loss of those families comes from the runtime, as for their LoRA training.

Only the new embedding vectors train: they live in small tables looked up next to the frozen
input embedding (see :mod:`.apply`), so there is no full-matrix copy or row restore per step. The
runtime does data, noise, loss and optimizer; this module adds the placeholder tokens, builds the
template prompts and writes A1111 files.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from sdcore.errors import ConfigError, NetworkMismatchError, SdcoreError
from sdcore.io import file_stem_problem
from sdcore.options import option
from sdcore.train.lr_schedule import LearnSchedule, parse_schedule, schedule_lambda
from sdcore.train.method import Capabilities, Conditioning, SaveInfo, TrainingMethod
from sdcore.train.options import TrainOptions

from .templates import load_template, pick_line, render

if TYPE_CHECKING:
    import torch
    from sdcore.data.dataset import DatasetIndex
    from sdcore.models.bundle import ModelBundle

    from .apply import EmbeddingHandle
    from .embedding import Embedding

EXTRA_FORMATS = ("pt", "safetensors", "bin")
LATENT_SAMPLING = ("once", "deterministic", "random")


@dataclass
class TIOptions(TrainOptions):
    """Textual-inversion options (A1111's train tab) on top of the runtime's."""

    lr: float = option(
        5e-3, "Learning rate (A1111's TI default 0.005).", group="training", minimum=0, above_minimum=True
    )
    name: str = option(
        "",
        "Embedding name: the word used in prompts and the output file stem (when --output is a folder; a file's "
        "own stem is then the prompt word).",
        group="ti",
    )
    placeholder: str = option(
        "",
        "Text standing for the embedding in captions, templates ([name]) and sample prompts instead of --name, "
        "replaced wherever it occurs (OneTrainer's placeholder, e.g. <embedding>); --name then names the file only.",
        resume_sensitive=True,
        group="ti",
    )
    init_text: str = option("*", "Text whose token embeddings initialise the vectors ('' = zeros).", group="ti")
    init_weights: str = option(
        "",
        "Start from the vectors of this embedding file (A1111 .pt, .safetensors, diffusers .bin; SDXL: clip_l "
        "and clip_g) instead of --init-text; its vector count must equal --vectors (kohya's --weights).",
        group="ti",
        path=True,
    )
    vectors: int = option(
        1, "Vectors per token (1-75): how many prompt tokens the embedding uses.", group="ti", minimum=1, maximum=75
    )
    template: str = option(
        "style_filewords",
        "Prompt template: style, subject, style_filewords, subject_filewords, none, filewords (the captions as "
        "written: OneTrainer's way, with the name in them), or a .txt file "
        "with one prompt per line using [name] and [filewords].",
        resume_sensitive=True,
        group="ti",
    )
    format: str = option(
        "pt", "Extra file format written next to the A1111 .pt (always written).", choices=EXTRA_FORMATS, group="ti"
    )
    lr_schedule: str = option(
        "",
        "A1111 schedule 'rate:step, rate:step, rate' with absolute steps (replaces --lr-scheduler when set; "
        "the last rate continues after the last step).",
        resume_sensitive=True,
        group="ti",
    )
    train_t5: bool = option(
        False,
        "SD3/Flux: also train a T5-XXL vector set (file key t5, as OneTrainer writes). Off by default: the "
        "CLIP vectors carry the concept and T5's gradient pass costs memory of the whole T5-XXL. Chroma: T5 is "
        "its only encoder, so its vectors always train (with or without this flag).",
        group="ti",
    )
    latent_sampling: str = option(
        "once",
        "once: one cached posterior sample per image (A1111's default); random: a new sample each step "
        "(needs --no-cache-latents); deterministic: the posterior mean (not supported by the runtime's cache yet).",
        choices=LATENT_SAMPLING,
        resume_sensitive=True,
        group="ti",
    )


@dataclass(frozen=True)
class TrainedEmbedding:
    """One embedding a method trains: prompt word, init text and vector count."""

    name: str
    init_text: str
    vectors: int


#: the options of a method built on :class:`TIMethod` (APT extends them)
TIOptionsT = TypeVar("TIOptionsT", bound=TIOptions)


class TIMethod(TrainingMethod[TIOptionsT]):
    """Train one embedding (``--name``) with A1111 templates, schedule and file format.

    Generic in its options so a method built on it (DreamArtist's ``APTMethod(TIMethod[APTOptions])``)
    keeps its own options type; ``TIMethod(TIOptions(...))`` is a ``TIMethod[TIOptions]``.
    """

    name: ClassVar[str] = "ti"
    start_from_result: ClassVar[str | None] = "--init-weights"
    options_class: ClassVar[type[TrainOptions]] = TIOptions
    output_suffix: ClassVar[str] = ".pt"
    resume_shape_options: ClassVar[tuple[str, ...]] = ("vectors",)

    def __init__(self, options: TIOptionsT) -> None:
        super().__init__(options)
        self.handle: EmbeddingHandle | None = None
        self.bundle: ModelBundle | None = None
        self.schedule: LearnSchedule | None = None
        self._identity: tuple[str | None, str | None] | None = None
        self._init_weights: Embedding | None = None

    def trained_embeddings(self) -> list[TrainedEmbedding]:
        o = self.options
        return [TrainedEmbedding(o.name, o.init_text, o.vectors)]

    # --- setup ---------------------------------------------------------------------------------
    def validate(self) -> None:
        o = self.options
        for item in self.trained_embeddings():
            if not item.name.strip():
                raise ConfigError("--name is required: the embedding's prompt word and file name")
            if o.placeholder and not o.placeholder.strip():
                raise ConfigError("--placeholder is blank: give the text the captions use, or leave it empty")
            problem = file_stem_problem(item.name)
            if problem:
                raise ConfigError(problem)
            if not 1 <= item.vectors <= 75:
                raise ConfigError(f"embedding {item.name!r}: vectors must be between 1 and 75, got {item.vectors}")
        suffix = Path(o.output).suffix.lower() if o.output else ""
        if suffix in {".safetensors", ".bin", ".ckpt"} and not Path(o.output).expanduser().is_dir():
            # the final save names a file only by its .pt (A1111's file, always written): another suffix would
            # otherwise be dropped in silence and the embedding written as <folder>/<name>.pt
            stem = str(Path(o.output).with_suffix(".pt"))
            extra = f" --format {suffix[1:]}" if suffix[1:] in EXTRA_FORMATS else ""
            raise ConfigError(
                f"--output {o.output}: the embedding is written as A1111's .pt (always) plus the --format copy "
                f"beside it; give --output {stem}{extra}"
            )
        self.schedule = parse_schedule(o.lr_schedule) if o.lr_schedule.strip() else None
        if self.schedule is not None:
            schedule_lambda(self.schedule, o.lr)  # checks --lr
        load_template(o.template)
        if o.init_weights:
            self._init_weights = self._read_init_weights()
        if o.latent_sampling == "random" and o.cache_latents:
            raise ConfigError("--latent-sampling random draws a new latent each step: also pass --no-cache-latents")
        if o.latent_sampling == "deterministic":
            raise ConfigError(
                "--latent-sampling deterministic is not supported: the runtime caches one seeded posterior sample "
                "per image (that is 'once'); use once or random"
            )

    def _read_init_weights(self) -> Embedding:
        """kohya's ``--weights``: the file's vectors, whose count must be ``--vectors`` (kohya asserts the
        same: its loaded rows replace every placeholder row, so ``init_word`` then has no effect). A OneTrainer file
        is read like any other (``emp_params``; an output embedding's input vectors, its ``*_out`` ones noted by
        :meth:`dataset_notes`)."""
        from .formats import load_embedding

        o = self.options
        if len(self.trained_embeddings()) != 1:
            raise ConfigError(f"--init-weights initialises one embedding; method {self.name!r} trains several")
        try:
            loaded = load_embedding(Path(o.init_weights).expanduser())
        except SdcoreError as exc:  # no file, unknown layout, unsafe pickle: one pre-flight line
            raise ConfigError(f"--init-weights: {exc}") from exc
        counts = {key: int(t.shape[0]) for key, t in loaded.vectors.items()}
        wrong = {key: n for key, n in counts.items() if n != o.vectors}
        if wrong:
            found = ", ".join(f"{n} ({key})" if key != "*" else str(n) for key, n in wrong.items())
            raise ConfigError(
                f"--init-weights {o.init_weights}: the file has {found} vectors, --vectors is {o.vectors} "
                "(kohya's num_vectors_per_token): they must match"
            )
        return loaded

    def family_problems(self, family: str) -> list[str]:
        """``--init-weights`` must hold a tensor for every text encoder that trains on this family
        (SD1/SD2 one tensor, SDXL ``clip_l`` and ``clip_g``, ...), checked before the model loads."""
        from .apply import family_encoder_keys

        loaded = self._init_weights
        if loaded is None:
            return []
        try:
            keys = family_encoder_keys(family)
        except ConfigError as exc:
            return [str(exc)]
        wanted = self._trained(keys)
        missing = [k for k in wanted if k not in loaded.vectors]
        if not missing:
            return []
        label = "the single tensor of an SD1/SD2 embedding" if missing == ["*"] else ", ".join(missing)
        return [
            f"--init-weights {self.options.init_weights}: this {family} model needs {label}; "
            f"the file has {loaded.describe()}"
        ]

    def dataset_problems(self, index: DatasetIndex) -> list[str]:
        """A template none of whose lines has ``[name]`` (``filewords``, OneTrainer's way; ``none``; a file) puts
        the embedding into a training prompt only through the captions: when no training image's caption holds
        its name (as a whole word, any case, as prompts are expanded) or ``[name]`` (A1111 fills it in
        captions too), its vectors would never get a gradient. A line that spells the name itself (``a photo of
        zork`` in a template file) puts it in the prompt as ``[name]`` does: :meth:`encode` expands it there.
        Said before the model loads."""
        o = self.options
        name, entries = (o.placeholder or o.name.strip()), index.instance_entries
        if not name or not entries:  # nothing to look for (`sdcore data check --method ti` has no --name): no torch
            return []
        from .apply import find_names

        def names_it(text: str) -> bool:  # a placeholder is found anywhere, as it is replaced (OneTrainer's way)
            return "[name]" in text or (name in text if o.placeholder else bool(find_names(text, [name])))

        lines = load_template(o.template)
        if any(names_it(line) for line in lines):
            return []
        if any("[filewords]" in line for line in lines):
            for entry in entries:
                if names_it(entry.written_caption):
                    return []
            why = f"no line has [name], and no caption of the {len(entries)} training images contains {name!r}"
        else:
            why = "no line has [name] or [filewords] (the captions)"
        return [
            f"--template {o.template}: {why}: the embedding would never be in a training prompt "
            f"(write {name} in the captions, or choose a template with [name])"
        ]

    def final_files(self) -> list[Path]:
        """The ``.pt`` files the final save writes (:meth:`save`; ``--format``'s copy lies beside each): the
        ``--output`` file when it ends in ``.pt``, else ``<folder>/<name>.pt``."""
        output = Path(self.options.output).expanduser()
        final = self.resolve_output(output)
        return [final if final.suffix.lower() == ".pt" else final.parent / f"{self.options.name}.pt"]

    def dataset_notes(self, index: DatasetIndex) -> list[str]:
        """Embedding files the run's final save would replace: A1111 continues training an embedding that
        exists (from the step stored in it); a new run here starts fresh vectors, so it is said, with the ways
        to continue, before anything is written. Continuing from a saved state is offered only where one is (a file
        copied from A1111 has none), pointing at the pre-flight's note on the state folder
        (:func:`sdcore.train.preflight.earlier_state_notes`), which gives ``--resume latest``."""
        from sdcore.train.checkpoints import output_paths
        from sdcore.train.state import list_states

        notes = super().dataset_notes(index)
        o = self.options
        loaded = self._init_weights
        if loaded is not None and loaded.output_vectors:
            parts = ", ".join(loaded.output_keys)
            notes.append(
                f"--init-weights {o.init_weights} is a OneTrainer output embedding: training starts from its input "
                f"vectors (zeros in OneTrainer's files), as A1111 and ComfyUI read the file; its output vectors "
                f"({parts}) are not trained here (sdcore trains input vectors; continue an output embedding in "
                "OneTrainer)"
            )
        if not o.output or file_stem_problem(o.name) is not None:  # a --name that is no file name: validate's problem
            return notes
        files = self.final_files()
        if len(self.trained_embeddings()) == 1 and files[0].stem.lower() != o.name.strip().lower():
            # A1111, ComfyUI and `sdcore generate` answer to the file's stem, not the name stored inside: kohya's
            # output_name defaults to "last", so `--token_string mychar` alone writes last.pt, the word "last"
            notes.append(
                f"{files[0]} answers to {files[0].stem!r} in prompts (A1111, ComfyUI and sdcore generate take the "
                f"file name), not to --name {o.name.strip()!r}: rename the file, or give --output "
                f"{files[0].with_name(o.name.strip() + files[0].suffix)}"
            )
        if o.resume or o.init_weights:
            return notes
        existing = [path for path in files if path.is_file()]
        if not existing:
            return notes
        listed = " and ".join(str(path) for path in existing)
        one = len(existing) == 1
        ways = [f"--init-weights {files[0]} (its vectors, a fresh optimizer and step count)"]
        if len(files) > 1:
            ways[0] = f"--init-weights {files[0]} (that file's vectors only, a fresh optimizer and step count)"
        state_root = output_paths(self, o)[1]
        resumable = ""
        if list_states(state_root):  # the pre-flight's own note on that folder says how (--resume latest): not twice
            resumable = (f", or continue the run that wrote {'it' if one else 'them'} exactly, from its saved state "
                         f"in {state_root} (see the note on that folder)")  # fmt: skip
        notes.append(
            f"{listed} {'exists' if one else 'exist'}: this run trains {'a new embedding' if len(files) == 1 else 'new embeddings'} "
            f"from --init-text and replaces {'it' if one else 'them'} at the end (A1111 would continue training "
            f"{'it' if one else 'them'}); to continue, pass {ways[0]}{resumable}"
        )
        return notes

    def _initial_vectors(self, bundle: ModelBundle, item: TrainedEmbedding, keys: list[str]) -> dict[str, torch.Tensor]:
        """The starting vectors: ``--init-weights`` when given (checked against the model's widths),
        else the init text's token rows (A1111)."""
        from .apply import encoder_keys, init_vectors

        loaded = self._init_weights
        if loaded is None or item.name != self.options.name:
            return init_vectors(bundle, item.init_text, item.vectors, keys=keys)
        problems = self.family_problems(bundle.family)
        if problems:
            raise ConfigError(problems[0])
        out = {}
        for encoder, key in zip(bundle.text_encoders, encoder_keys(bundle), strict=True):
            if key not in keys:
                continue
            width = int(encoder.get_input_embeddings().weight.shape[1])
            tensor = loaded.vectors[key]
            if int(tensor.shape[1]) != width:
                raise NetworkMismatchError(
                    f"--init-weights {self.options.init_weights}: {key} vectors have width {int(tensor.shape[1])}, "
                    f"this {bundle.family} model's text encoder has {width} ({loaded.describe()})"
                )
            out[key] = tensor.detach().float().cpu().clone()
        return out

    def prepare(self, bundle: ModelBundle) -> list[dict[str, Any]]:
        from .apply import apply_embeddings
        from .embedding import Embedding

        self.validate()
        keys = self.trained_keys(bundle)
        for module in bundle.components().values():
            module.requires_grad_(False)
        embeddings = []
        for item in self.trained_embeddings():
            vectors = self._initial_vectors(bundle, item, keys)
            embeddings.append(Embedding(name=item.name, vectors=vectors, step=0))
        self.bundle = bundle
        self.handle = apply_embeddings(bundle, embeddings, trainable=True)
        if self.options.placeholder:
            self.handle.placeholders[self.options.name] = self.options.placeholder
        return self.param_groups()

    def trained_keys(self, bundle: ModelBundle) -> list[str]:
        """The encoder keys whose vectors train: every encoder of the model; T5 beside CLIP (SD3, FLUX.1) only with
        ``--train-t5``, T5 alone (Chroma) always (``--train-t5`` there says what happens anyway)."""
        from .apply import encoder_keys
        from .embedding import T5

        keys = encoder_keys(bundle)
        if self.options.train_t5 and T5 not in keys:
            raise ConfigError(f"--train-t5: this {bundle.family} model has no T5 text encoder")
        return self._trained(keys)

    def _trained(self, keys: list[str]) -> list[str]:
        """Of a model's encoder ``keys``, those that train (:func:`.apply.optional_keys` only with ``--train-t5``)."""
        from .apply import optional_keys

        optional = optional_keys(keys)
        return [key for key in keys if key not in optional or self.options.train_t5]

    def plan_groups(self, bundle: ModelBundle) -> list[dict[str, Any]]:
        """The trained vectors' shapes (one table per embedding and text encoder), for the pre-flight:
        ``prepare`` reads the init text's token vectors, which a shapes-only model does not have."""
        import torch

        from .apply import encoder_keys

        keys = set(self.trained_keys(bundle))
        encoders = [e for e, key in zip(bundle.text_encoders, encoder_keys(bundle), strict=True) if key in keys]
        params = [
            torch.nn.Parameter(torch.empty(item.vectors, encoder.get_input_embeddings().weight.shape[1], device="meta"))
            for item in self.trained_embeddings()
            for encoder in encoders
        ]
        return [{"params": params, "name": "embedding"}]

    def result_bytes(self, bundle: ModelBundle) -> int:
        """The files one save writes (the A1111 ``.pt`` and the ``--format`` extra, for every trained
        embedding: DreamArtist's two), measured by writing them with zero vectors of the planned shapes to a
        scratch folder. An embedding is a few vectors in fp32 (whatever ``--save-dtype``) inside a pickle or
        a header that outweighs them, so the vector count at the save dtype alone says about 0 KiB."""
        import tempfile

        import torch

        from .apply import encoder_keys
        from .embedding import Embedding

        keys = set(self.trained_keys(bundle))
        widths = {
            key: int(encoder.get_input_embeddings().weight.shape[1])
            for encoder, key in zip(bundle.text_encoders, encoder_keys(bundle), strict=True)
            if key in keys
        }
        # what save() stores besides the vectors: A1111's 10-digit short hash and the model's name
        checkpoint = "0" * 10, Path(str(bundle.source or "model")).stem
        with tempfile.TemporaryDirectory(prefix="sdcore-embedding-size-") as scratch:
            folder = Path(scratch)
            for item in self.trained_embeddings():
                vectors = {key: torch.zeros(item.vectors, width) for key, width in widths.items()}
                emb = Embedding(name=item.name, vectors=vectors, step=0)
                emb.sd_checkpoint, emb.sd_checkpoint_name = checkpoint
                emb.metadata = {"sdcore.method": self.name, "sdcore.family": bundle.family}
                emb.metadata.update(self.modelspec(bundle, item.name))
                self.write(emb, folder, item.name)
            return sum(path.stat().st_size for path in folder.iterdir())

    def param_groups(self) -> list[dict[str, Any]]:
        """One group over every trained table; weight decay 0 as A1111 (decay would pull vectors to 0)."""
        assert self.handle is not None
        return [{"params": self.handle.parameters(), "name": "embedding", "weight_decay": 0.0}]

    def capabilities(self) -> Capabilities:
        # the prompts contain trainable tokens: never cache their encodings; a random template
        # line per use
        return Capabilities(trains_text_encoder=True, random_captions=True)

    def lr_lambda(self) -> Any:
        """``--lr-schedule`` as a factor of ``--lr``; the runtime applies it before every step."""
        if self.schedule is None and self.options.lr_schedule.strip():
            self.schedule = parse_schedule(self.options.lr_schedule)
        if self.schedule is None:
            return None
        return schedule_lambda(self.schedule, float(self.options.lr))

    # --- prompts ---------------------------------------------------------------------------------
    def expand_prompt(self, prompt: str) -> str:
        """Replace embedding names in ``prompt`` by their placeholder tokens (no-op before prepare)."""
        return prompt if self.handle is None else self.handle.expand(prompt)

    def caption_for(self, caption: str, *, is_class: bool, rng: Any) -> str:
        """A random template line with ``[filewords]`` = the caption and ``[name]`` = the embedding name.

        The name stays a word here (captions are cached and logged as text); :meth:`encode` turns
        it into the placeholder tokens, exactly as generation does with a typed prompt.
        """
        if is_class:
            return caption
        line = pick_line(load_template(self.options.template), rng)
        return render(line, self.options.placeholder or self.options.name, caption)

    def encode(self, bundle: ModelBundle, captions: list[str]) -> Conditioning:
        return super().encode(bundle, [self.expand_prompt(c) for c in captions])

    @contextlib.contextmanager
    def sampling(self, bundle: ModelBundle) -> Iterator[dict[str, Any]]:
        """Sample prompts name the embedding as users type it: expand it through a network session."""
        from sdcore.generate.session import NetworkSession

        from .apply import LiveEmbeddings

        if self.handle is None:
            yield {}
            return
        yield {"networks": NetworkSession({None: [LiveEmbeddings(self.handle)]})}

    # --- state -----------------------------------------------------------------------------------
    def _tables(self) -> dict[str, torch.Tensor]:
        if self.handle is None:
            raise RuntimeError("prepare() has not run")
        return {f"{name}/{key}": t for name, per in self.handle.tables.items() for key, t in per.items()}

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: t.detach().float().cpu().clone() for k, t in self._tables().items()}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        import torch

        tables = self._tables()
        missing = sorted(set(tables) - set(state))
        if missing:
            raise NetworkMismatchError(f"resume state lacks embedding tensors {', '.join(missing)}")
        with torch.no_grad():
            for key, table in tables.items():
                if tuple(state[key].shape) != tuple(table.shape):
                    raise NetworkMismatchError(
                        f"resume state {key}: shape {tuple(state[key].shape)}, the embedding has {tuple(table.shape)}"
                    )
                table.copy_(state[key].to(table))

    def load_result(self, bundle: ModelBundle, path: str | Path) -> None:
        """Activate a saved result in ``bundle`` (a fresh model), or, after :meth:`prepare` on the same
        bundle, continue training from that file's vectors (A1111 resumes at its ``step``)."""
        from .apply import apply_embeddings, check_fits
        from .formats import load_embedding

        embeddings = [
            load_embedding(p, name=item.name)
            for item, p in zip(self.trained_embeddings(), self.result_files(path), strict=True)
        ]
        for emb in embeddings:
            check_fits(bundle, emb)
        if self.handle is not None and self.bundle is bundle:
            self._copy_into_tables(embeddings, path)
            return
        self.bundle = bundle
        self.handle = apply_embeddings(bundle, embeddings)

    def result_files(self, path: str | Path) -> list[Path]:
        """The files :meth:`save` wrote for ``path`` (one per trained embedding)."""
        return [Path(path)]

    def saved_files(self, path: Path) -> list[Path]:
        """The ``.pt`` :meth:`save` returns plus the ``--format`` copy :meth:`write` puts beside it."""
        path = Path(path)
        if self.options.format == "pt":
            return [path]
        return [path, path.with_name(f"{path.stem}.{self.options.format}")]

    def _copy_into_tables(self, embeddings: list[Embedding], path: str | Path) -> None:
        import torch

        assert self.handle is not None
        with torch.no_grad():
            for emb in embeddings:
                for key, table in self.handle.tables[emb.name].items():
                    source = emb.vectors.get(key)
                    if source is None:  # an optional part (t5) the file lacks but --train-t5 trains
                        raise NetworkMismatchError(f"{path}: {emb.name} has no {key} vectors, training uses them")
                    if source.shape != table.shape:
                        raise NetworkMismatchError(
                            f"{path}: {emb.name} {key} has {source.shape[0]} vectors, training uses {table.shape[0]}"
                        )
                    table.copy_(source.to(table))

    def checkpoint_identity(self) -> tuple[str | None, str | None]:
        """A1111's ``sd_checkpoint`` (the model file's shorthash) and ``sd_checkpoint_name``, hashed once."""
        if self._identity is None:
            from sdcore.models.hashes import checkpoint_identity

            assert self.bundle is not None
            self._identity = checkpoint_identity(self.bundle.source)
        return self._identity

    def current_embedding(self, name: str, step: int) -> Embedding:
        assert self.handle is not None and self.bundle is not None
        emb = self.handle.current(name)
        emb.step = step
        emb.sd_checkpoint, emb.sd_checkpoint_name = self.checkpoint_identity()
        emb.metadata = {"sdcore.method": self.name, "sdcore.family": self.bundle.family}
        return emb

    def resolve_output(self, path: Path) -> Path:
        """``--output folder`` -> ``folder/<name>.pt`` (A1111: the file stem is the prompt word)."""
        if path.is_dir() or not path.suffix:
            return path / f"{self.trained_embeddings()[0].name or self.name}{self.output_suffix}"
        return path

    def output_dir(self, info: SaveInfo) -> Path:
        """The folder results go to: ``--output`` when it names a folder, else the runtime's path's folder."""
        output = Path(self.options.output) if self.options.output else None
        if output is not None and not output.suffix:
            return output
        return info.path.parent if info.path.suffix else info.path

    def write(self, emb: Embedding, folder: Path, stem: str) -> Path:
        """``<folder>/<stem>.pt`` plus the ``--format`` extra; returns the .pt path."""
        from .formats import save_embedding

        primary = save_embedding(emb, folder / f"{stem}.pt", format="pt")
        if self.options.format != "pt":
            save_embedding(emb, folder / f"{stem}.{self.options.format}", format=self.options.format)
        return primary

    def modelspec(self, bundle: ModelBundle, title: str) -> dict[str, str]:
        """The ModelSpec keys kohya's ``train_textual_inversion.py`` writes into a ``.safetensors``
        embedding (``sai_model_spec.build_metadata`` with ``textual_inversion=True``), for the families it
        trains (SD1/SD2/SDXL; none for SD3/Flux, which kohya has no TI script for). The user's
        ``--metadata-*`` keys (in ``SaveInfo.metadata``) win over these."""
        import time

        from sdcore.models.save import SAI_SPEC_VERSION, SGM_IMPLEMENTATION, modelspec_architecture

        if bundle.family not in ("sd1", "sd2", "sdxl"):
            return {}
        o = self.options
        meta = {
            "modelspec.sai_model_spec": SAI_SPEC_VERSION,
            "modelspec.architecture": f"{modelspec_architecture(bundle)}/textual-inversion",
            "modelspec.implementation": SGM_IMPLEMENTATION,  # kohya: Stability AI's for every TI
            "modelspec.title": title,
            "modelspec.resolution": f"{o.resolution}x{o.resolution}",
            "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "modelspec.prediction_type": "v" if bundle.is_v_prediction else "epsilon",
            "modelspec.encoder_layer": str(o.clip_skip),
            "modelspec.implementation_version": "sdcore/sdplugin-ti",
        }
        if o.min_timestep is not None or o.max_timestep is not None:
            low, high = o.min_timestep or 0, 1000 if o.max_timestep is None else o.max_timestep
            meta["modelspec.timestep_range"] = f"{low},{high}"
        return meta

    def save(self, bundle: ModelBundle, info: SaveInfo) -> Path:
        folder = self.output_dir(info)
        name = self.options.name
        emb = self.current_embedding(name, info.step)
        output = Path(self.options.output) if self.options.output else None
        final_pt = info.final and output is not None and output.suffix.lower() == ".pt"
        title = (output.stem if final_pt and output is not None else name) if info.final else f"{name}-{info.step}"
        emb.metadata.update(self.modelspec(bundle, title))
        emb.metadata.update({k: str(v) for k, v in info.metadata.items()})
        if info.final:
            if final_pt and output is not None:
                return self.write(emb, output.parent, output.stem)
            return self.write(emb, folder, name)
        # A1111 stores the intermediate's own name (``name-STEP``): the word it answers to when
        # loaded from an image, and what A1111 shows for it
        emb.name = f"{name}-{info.step}"
        return self.write(emb, folder / "embeddings", emb.name)


__all__ = ["TIMethod", "TIOptions", "TrainedEmbedding"]
