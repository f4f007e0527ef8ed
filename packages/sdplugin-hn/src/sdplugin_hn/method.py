"""``sdcore train hn``: train an A1111 hypernetwork.

Only the hypernetwork's MLPs train; the UNet, VAE and text encoders stay frozen (so text-encoder
outputs may be cached). The networks are installed with the same hooks generation uses, so what
is trained is exactly what ``<hypernet:name:1>`` applies later.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from sdcore.errors import ConfigError
from sdcore.io import file_stem_problem
from sdcore.options import option
from sdcore.train.lr_schedule import parse_schedule, schedule_lambda
from sdcore.train.method import Capabilities, SaveInfo, TrainingMethod
from sdcore.train.options import TrainOptions
from sdcore.train.templates import pick_line, render

from .init_names import WEIGHT_INIT_CHOICES, weight_init_choice

if TYPE_CHECKING:
    import torch
    from sdcore.models.bundle import ModelBundle

    from .apply import HypernetworkHooks
    from .modules import Hypernetwork

BUILTIN_TEMPLATES = ("hypernetwork", "none", "style_filewords", "subject_filewords")


def load_template(template: str) -> tuple[str, ...]:
    """Lines of a template: one of this plugin's built-ins by name, or a file path."""
    from sdcore.train.templates import load_template as load

    return load(template, package="sdplugin_hn", builtin=BUILTIN_TEMPLATES)


#: textual inversion's file-word-less built-ins (kohya's ``--use_style_template``/``--use_object_template`` set them)
#: -> the hypernetwork built-in that says the same with the caption
_TI_TEMPLATES = {"style": "style_filewords", "subject": "subject_filewords"}


def _textual_inversion_template(options: Any) -> str | None:
    """The problem of a textual-inversion template name (``style``, ``subject``: what kohya's TI-only
    ``--use_style_template``/``--use_object_template`` select) that is no hypernetwork built-in nor a file,
    naming the flag as the user wrote it and the hypernetwork template to give instead; None otherwise."""
    from pathlib import Path

    from sdcore.options import option_label

    spec = options.template
    instead = _TI_TEMPLATES.get(spec[:-4] if spec.endswith(".txt") else spec)
    if instead is None or Path(spec).is_file():
        return None
    return (
        f"{option_label(options, 'template')}: {spec!r} is a textual-inversion template (kohya's TI flags select "
        f"it), not a hypernetwork's; give --template {instead} (built-ins: {', '.join(BUILTIN_TEMPLATES)})"
    )


@dataclass
class HNOptions(TrainOptions):
    """Options of ``sdcore train hn`` (A1111's Create/Train hypernetwork settings)."""

    lr: float = option(
        5e-6,
        "Learning rate (A1111's field: 1e-5; hypernetworks diverge easily: 5e-6 down to 5e-7).",
        group="training",
        minimum=0,
        above_minimum=True,
    )
    name: str = option(
        "", "Hypernetwork name (file stem and [name] in templates); default: the output's stem.", group="hypernetwork"
    )
    layer_structure: str = option(
        "1,2,1", "Width multipliers, first and last 1 (e.g. 1,2,1 or 1,1.5,1.5,1).", group="hypernetwork"
    )
    activation: str = option(
        "linear",
        "Activation after each hidden Linear: linear, relu, leakyrelu, elu, swish (Hardswish), tanh, sigmoid, "
        "or any torch.nn activation name (gelu, mish, silu...).",
        group="hypernetwork",
    )
    layer_norm: bool = option(False, "Add a LayerNorm after every Linear.", group="hypernetwork")
    dropout: str = option(
        "",
        "Dropout structure, one value per layer-structure entry, first and last 0 (e.g. 0,0.1,0).",
        group="hypernetwork",
    )
    activate_output: bool = option(False, "Also apply the activation after the last Linear.", group="hypernetwork")
    init: str = option(
        "normal",
        "Weight initialisation; A1111's spellings (XavierNormal, 'Xavier Normal', any case) are accepted too.",
        choices=WEIGHT_INIT_CHOICES,
        normalize=weight_init_choice,
        group="hypernetwork",
    )
    sizes: str = option(
        "", "Context widths to train (e.g. 768,320,640,1280); default: every width of the model.", group="hypernetwork"
    )
    lr_schedule: str = option(
        "",
        "A1111 learning-rate schedule 'rate:until_step, rate:until_step, rate' (e.g. '5e-5:100, 5e-6:1500, 5e-7'); "
        "replaces --lr and --lr-scheduler. A1111 stops at the last listed step; set --max-steps for that.",
        resume_sensitive=True,
        group="hypernetwork",
    )
    template: str = option(
        "",
        "Prompt template: a .txt file or one of hypernetwork, none, style_filewords, subject_filewords; "
        "[filewords] is the caption, [name] the name. Default: the caption as is.",
        resume_sensitive=True,
        group="hypernetwork",
        path=True,
    )


def parse_floats(text: str, what: str) -> list[float]:
    try:
        return [float(part) for part in text.replace(" ", "").split(",") if part != ""]
    except ValueError as exc:
        raise ConfigError(f"--{what} {text!r}: expected comma-separated numbers") from exc


class HNMethod(TrainingMethod[HNOptions]):
    """Train an A1111 hypernetwork; the result is ``<name>.pt`` in A1111's format."""

    name: ClassVar[str] = "hn"
    options_class: ClassVar[type[TrainOptions]] = HNOptions
    output_suffix: ClassVar[str] = ".pt"
    resume_shape_options: ClassVar[tuple[str, ...]] = ("layer_structure", "layer_norm", "sizes")

    def __init__(self, options: HNOptions) -> None:
        super().__init__(options)
        self.network: Hypernetwork | None = None
        self.hooks: HypernetworkHooks | None = None
        self._template: tuple[str, ...] | None = None
        self._identity: tuple[str | None, str | None] | None = None

    def capabilities(self) -> Capabilities:
        # templates pick a random line per use: the runtime caches several caption variants
        return Capabilities(random_captions=bool(self.options.template))

    @property
    def network_name(self) -> str:
        """``--name``; else the stem of an ``--output`` ending in ``.pt``; else ``hypernetwork``."""
        if self.options.name:
            return self.options.name
        output = Path(self.options.output) if self.options.output else None
        if output is not None and output.suffix.lower() == ".pt" and output.stem:
            return output.stem
        return "hypernetwork"

    # --- setup -------------------------------------------------------------------------------
    def _structures(self) -> tuple[list[float], list[float] | None]:
        layers = parse_floats(self.options.layer_structure, "layer-structure")
        dropout = parse_floats(self.options.dropout, "dropout") if self.options.dropout.strip() else None
        return layers, dropout

    def validate(self) -> None:
        from .modules import canonical_weight_init, check_structure, make_activation

        name = self.options.name
        problem = file_stem_problem(name) if name else None  # A1111's create_hypernetwork rule
        if problem:
            raise ConfigError(problem)
        layers, dropout = self._structures()
        check_structure(layers, dropout)
        make_activation(self.options.activation)
        canonical_weight_init(self.options.init)  # the Python API's value: the CLI and configs checked theirs
        if self.options.sizes.strip():
            for value in parse_floats(self.options.sizes, "sizes"):
                if value != int(value) or value <= 0:
                    raise ConfigError(f"--sizes {self.options.sizes!r}: widths are positive integers")
        if self.options.template:
            problem = _textual_inversion_template(self.options)
            if problem:
                raise ConfigError(problem)
            self._template = load_template(self.options.template)
        if self.options.lr_schedule.strip():
            schedule_lambda(parse_schedule(self.options.lr_schedule), float(self.options.lr))

    def lr_lambda(self) -> Any:
        """With ``--lr-schedule``, the A1111 schedule as a factor of ``--lr``."""
        if not self.options.lr_schedule.strip():
            return None
        return schedule_lambda(parse_schedule(self.options.lr_schedule), float(self.options.lr))

    def build_network(self, widths: list[int]) -> Hypernetwork:
        from .modules import Hypernetwork

        layers, dropout = self._structures()
        return Hypernetwork(
            self.network_name,
            widths,
            layer_structure=layers,
            activation=self.options.activation,
            layer_norm=self.options.layer_norm,
            use_dropout=bool(dropout and any(dropout)),
            dropout_structure=dropout,
            activate_output=self.options.activate_output,
            weight_init=self.options.init,
        )

    def prepare(self, bundle: ModelBundle) -> list[dict[str, Any]]:
        from .apply import apply_hypernetworks, context_widths

        self.validate()
        for module in bundle.components().values():
            module.requires_grad_(False)
        widths = context_widths(bundle.unet)
        if self.options.sizes.strip():
            wanted = [int(v) for v in parse_floats(self.options.sizes, "sizes")]
            missing = [w for w in wanted if w not in widths]
            if missing:
                raise ConfigError(f"--sizes {missing} not among this {bundle.family} model's attention widths {widths}")
            widths = wanted
        network = self.build_network(widths)
        network.to(bundle.device)
        network.train()
        network.requires_grad_(True)
        self.network = network
        self.hooks = apply_hypernetworks(bundle.unet, [(network, 1.0)])
        return [{"params": [p for p in network.parameters() if p.requires_grad], "name": "hypernetwork"}]

    def result_bytes(self, bundle: ModelBundle) -> int:
        """The ``.pt`` :meth:`save` writes, sized from the planned network (meta tensors after
        :meth:`plan_groups`) at ``--save-dtype`` with A1111's pickled structure around it."""
        from .format import hypernetwork_to_dict, saved_size

        network = self._require()
        network.name = self.network_name
        network.sd_checkpoint, network.sd_checkpoint_name = "0" * 10, Path(str(bundle.source or "model")).stem
        return saved_size(hypernetwork_to_dict(network, dtype=self.options.save_dtype))

    def caption_for(self, caption: str, *, is_class: bool, rng: Any) -> str:
        if not self.options.template:
            return caption
        if self._template is None:
            self._template = load_template(self.options.template)
        return render(pick_line(self._template, rng), self.network_name, caption)

    @contextlib.contextmanager
    def sampling(self, bundle: ModelBundle) -> Iterator[dict[str, Any]]:
        """Sample with dropout off (A1111 switches the network to eval for previews)."""
        network = self.network
        was_training = network.training if network is not None else False
        if network is not None:
            network.eval()
        try:
            yield {}
        finally:
            if network is not None and was_training:
                network.train()

    def remove(self) -> None:
        """Take the training hooks off the UNet."""
        if self.hooks is not None:
            self.hooks.remove()
            self.hooks = None

    # --- state -------------------------------------------------------------------------------
    def _require(self) -> Hypernetwork:
        if self.network is None:
            raise RuntimeError("HNMethod.prepare() has not run")
        return self.network

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {key: value.detach().float() for key, value in self._require().state_dict().items()}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        network = self._require()
        try:
            network.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ConfigError(
                f"resume state does not match this hypernetwork's structure: {str(exc).splitlines()[0]}"
            ) from exc

    def resolve_output(self, path: Path) -> Path:
        """``--output folder`` -> ``folder/<name>.pt``, so the step saves and the resumable state
        (``<name>-state``) carry the hypernetwork's name too: with the method's ``hn.pt`` every
        hypernetwork trained into one folder shared ``hn-state``, and one run's retention deleted
        another's state."""
        if path.is_dir() or not path.suffix:
            return path / f"{self.network_name}{self.output_suffix}"
        return path

    def output_path(self, info: SaveInfo) -> Path:
        """Where to write: ``OUTPUT/<name>.pt`` (and ``<name>-step<N>.pt``) when ``--output`` is a folder.

        The runtime names results in a folder after the method (``hn.pt``, ``hn-step00000100.pt``);
        A1111 users expect the hypernetwork's name, so the method's name is swapped for it. An
        explicit ``--output file.pt`` is used as given.
        """
        path = Path(info.path)
        if path.is_dir() or path.suffix == "":
            stem = self.network_name if info.final else f"{self.network_name}-{info.step}"
            return path / f"{stem}.pt"
        output = Path(self.options.output) if self.options.output else None
        folder_output = output is not None and output.suffix.lower() != ".pt"
        if folder_output and (path.stem == self.name or path.stem.startswith(f"{self.name}-")):
            return path.with_name(self.network_name + path.name[len(self.name) :])
        return path

    def _checkpoint_identity(self, bundle: ModelBundle) -> tuple[str | None, str | None]:
        """A1111's ``sd_checkpoint`` (sha256[:10] of a single-file model) and ``sd_checkpoint_name``.

        Hashed once per run; folders and hub ids have no A1111 short hash, so it stays ``None``.
        """
        if self._identity is None:
            from sdcore.models.hashes import checkpoint_identity

            self._identity = checkpoint_identity(bundle.source)
        return self._identity

    def save(self, bundle: ModelBundle, info: SaveInfo) -> Path:
        from .format import save_hypernetwork

        network = self._require()
        network.step = int(info.step)
        network.name = self.network_name
        network.sd_checkpoint, network.sd_checkpoint_name = self._checkpoint_identity(bundle)
        return save_hypernetwork(network, self.output_path(info), dtype=self.options.save_dtype)

    def load_result(self, bundle: ModelBundle, path: Path) -> None:
        """Apply a saved result to ``bundle`` at strength 1 (``remove()`` takes it off again)."""
        from .apply import apply_hypernetworks
        from .format import load_hypernetwork

        network = load_hypernetwork(path).to(bundle.device)
        self.remove()
        self.network = network
        self.hooks = apply_hypernetworks(bundle.unet, [(network, 1.0)])
