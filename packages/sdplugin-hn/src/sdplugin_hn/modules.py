"""The hypernetwork MLP, laid out exactly as A1111 lays it out.

A hypernetwork holds, per context width ``dim``, two small residual MLPs: one transforms the
context fed to an attention layer's ``to_k``, the other the context fed to ``to_v``. Each MLP is a
``torch.nn.Sequential`` named ``linear`` whose slots follow A1111's order (Linear, activation,
LayerNorm, Dropout per layer) so that state-dict keys such as ``linear.0.weight`` /
``linear.2.weight`` line up with files trained in the web UI.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Sequence
from typing import Any, cast

import torch
from sdcore.errors import ConfigError
from torch import nn

from .init_names import accepted_weight_inits, stored_weight_init

#: A1111's own names; any other lower-cased ``torch.nn`` activation class name also works.
BASE_ACTIVATIONS: dict[str, type[nn.Module] | None] = {
    "linear": None,
    "relu": nn.ReLU,
    "leakyrelu": nn.LeakyReLU,
    "elu": nn.ELU,
    "swish": nn.Hardswish,  # A1111 maps "swish" to Hardswish, not SiLU
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
}

_NOT_ACTIVATIONS = {"multiheadattention"}


def _torch_activations() -> dict[str, type[nn.Module]]:
    found: dict[str, type[nn.Module]] = {}
    for name, obj in inspect.getmembers(torch.nn.modules.activation, inspect.isclass):
        is_activation = obj.__module__ == "torch.nn.modules.activation" and issubclass(obj, nn.Module)
        if is_activation and name.lower() not in _NOT_ACTIVATIONS:
            found[name.lower()] = cast(type[nn.Module], obj)
    return found


def activation_names() -> list[str]:
    """Every activation name a hypernetwork may use (A1111's list plus torch.nn's)."""
    return sorted(set(BASE_ACTIVATIONS) | set(_torch_activations()))


def make_activation(name: str | None) -> nn.Module | None:
    """Build the activation module for ``name``; ``None`` for linear (no slot in the Sequential)."""
    key = (name or "linear").lower()
    if key in BASE_ACTIVATIONS:
        cls = BASE_ACTIVATIONS[key]
        return None if cls is None else cls()
    cls2 = _torch_activations().get(key)
    if cls2 is None:
        raise ConfigError(f"unknown hypernetwork activation {name!r}; choose one of {', '.join(activation_names())}")
    try:
        return cls2()
    except TypeError as exc:
        raise ConfigError(f"activation {name!r} needs arguments and cannot be used in a hypernetwork") from exc


def canonical_weight_init(name: str | None) -> str:
    """Map ``normal``/``xavier-uniform``/``KaimingNormal``/``Xavier Normal``... to the name A1111 stores."""
    stored = stored_weight_init(name or "Normal")
    if stored is None:
        raise ConfigError(f"unknown weight initialisation {name!r}; choose one of {accepted_weight_inits()}")
    return stored


def default_dropout_structure(
    layer_structure: Sequence[float], use_dropout: bool, last_layer_dropout: bool
) -> list[float]:
    """The dropout structure A1111 derives for files that do not store one.

    Zero everywhere without dropout; otherwise 0.3 after each hidden layer, after the last
    layer only with ``last_layer_dropout``, and never on the input or output slot.
    """
    count = len(layer_structure)
    if not use_dropout or count < 3:
        return [0.0] * count
    values = [0.0] + [0.3] * max(count - 3, 0)
    values.append(0.3 if last_layer_dropout else 0.0)
    values.append(0.0)
    return values


def check_structure(layer_structure: Sequence[float], dropout_structure: Sequence[float] | None) -> None:
    """Raise :class:`ConfigError` unless the structures are ones A1111 would build."""
    if len(layer_structure) < 2:
        raise ConfigError(f"layer structure {list(layer_structure)} needs at least two entries, e.g. 1,2,1")
    if layer_structure[0] != 1 or layer_structure[-1] != 1:
        raise ConfigError(f"layer structure {list(layer_structure)} must start and end with 1")
    if any(s <= 0 for s in layer_structure):
        raise ConfigError(f"layer structure {list(layer_structure)} has a non-positive width")
    if dropout_structure is not None:
        if len(dropout_structure) != len(layer_structure):
            raise ConfigError(
                f"dropout structure {list(dropout_structure)} must have as many entries as the layer structure {list(layer_structure)}"
            )
        if dropout_structure[0] != 0 or dropout_structure[-1] != 0:
            raise ConfigError(f"dropout structure {list(dropout_structure)} must start and end with 0")
        if any(not 0 <= p < 1 for p in dropout_structure):
            raise ConfigError(f"dropout structure {list(dropout_structure)} has a value outside [0, 1)")


class HypernetworkModule(nn.Module):
    """One residual MLP: ``x + linear(x) * strength`` (strength is 1 while training)."""

    def __init__(
        self,
        dim: int,
        layer_structure: Sequence[float] = (1, 2, 1),
        activation: str | None = None,
        layer_norm: bool = False,
        dropout_structure: Sequence[float] | None = None,
        activate_output: bool = False,
        weight_init: str = "Normal",
    ) -> None:
        super().__init__()
        check_structure(layer_structure, dropout_structure)
        self.dim = int(dim)
        slots: list[nn.Module] = []
        last = len(layer_structure) - 2
        for i in range(len(layer_structure) - 1):
            width_in, width_out = int(dim * layer_structure[i]), int(dim * layer_structure[i + 1])
            slots.append(nn.Linear(width_in, width_out))
            if i < last or activate_output:
                act = make_activation(activation)
                if act is not None:
                    slots.append(act)
            if layer_norm:
                slots.append(nn.LayerNorm(width_out))
            if dropout_structure is not None and dropout_structure[i + 1] > 0:
                slots.append(nn.Dropout(p=float(dropout_structure[i + 1])))
        self.linear = nn.Sequential(*slots)
        self.reset_parameters(weight_init, activation)

    @torch.no_grad()
    def reset_parameters(self, weight_init: str, activation: str | None) -> None:
        """Initialise like A1111: near-zero weights so a new network is almost the identity.

        ``weight_init`` chooses the Linear weights only: A1111 draws every LayerNorm's weight from
        N(0, 0.01) (bias 0) whichever init is chosen, so with a LayerNorm after the last Linear a
        new network starts near the identity even with Xavier or Kaiming weights.
        """
        kind = canonical_weight_init(weight_init)
        for layer in self.linear:
            if isinstance(layer, nn.Linear):
                if kind == "Normal":
                    nn.init.normal_(layer.weight, mean=0.0, std=0.01)
                elif kind == "XavierUniform":
                    nn.init.xavier_uniform_(layer.weight)
                elif kind == "XavierNormal":
                    nn.init.xavier_normal_(layer.weight)
                else:
                    leaky = (activation or "").lower() == "leakyrelu"
                    if kind == "KaimingUniform":
                        nn.init.kaiming_uniform_(layer.weight, nonlinearity="leaky_relu" if leaky else "relu")
                    else:
                        nn.init.kaiming_normal_(layer.weight, nonlinearity="leaky_relu" if leaky else "relu")
                nn.init.zeros_(layer.bias)
            elif isinstance(layer, nn.LayerNorm):
                nn.init.normal_(layer.weight, mean=0.0, std=0.01)
                nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
        multiplier = 1.0 if self.training else strength
        return x + self.linear(x) * multiplier


class Hypernetwork(nn.Module):
    """A named set of K/V module pairs keyed by context width, plus A1111's metadata.

    ``layers[str(dim)]`` is a two-item ``ModuleList`` (K module, V module); a torch module so
    ``.to()``, ``.train()``, ``.parameters()`` and ``state_dict()`` work on the whole network.
    """

    def __init__(
        self,
        name: str = "hypernetwork",
        dims: Iterable[int] = (),
        *,
        layer_structure: Sequence[float] = (1, 2, 1),
        activation: str | None = None,
        layer_norm: bool = False,
        use_dropout: bool = False,
        dropout_structure: Sequence[float] | None = None,
        last_layer_dropout: bool = False,
        activate_output: bool = False,
        weight_init: str = "Normal",
    ) -> None:
        super().__init__()
        self.name = name
        self.layer_structure = [float(s) for s in layer_structure]
        self.activation = None if activation in (None, "linear") else activation
        self.layer_norm = bool(layer_norm)
        if dropout_structure is not None and any(dropout_structure):
            use_dropout = True
        self.use_dropout = bool(use_dropout)
        self.last_layer_dropout = bool(last_layer_dropout)
        if dropout_structure is None:
            dropout_structure = default_dropout_structure(
                self.layer_structure, self.use_dropout, self.last_layer_dropout
            )
        self.dropout_structure = [float(p) for p in dropout_structure]
        self.activate_output = bool(activate_output)
        self.weight_init = canonical_weight_init(weight_init)
        check_structure(self.layer_structure, self.dropout_structure)
        make_activation(self.activation)  # fail early on unknown names
        self.step = 0
        self.sd_checkpoint: str | None = None
        self.sd_checkpoint_name: str | None = None
        self.optional_info: str | None = None
        self.layers = nn.ModuleDict()
        for dim in dims:
            self.add_width(int(dim))

    def new_module(self, dim: int) -> HypernetworkModule:
        return HypernetworkModule(
            dim,
            self.layer_structure,
            self.activation,
            self.layer_norm,
            self.dropout_structure,
            self.activate_output,
            self.weight_init,
        )

    def add_width(self, dim: int) -> None:
        """Create (freshly initialised) K and V modules for context width ``dim``."""
        self.layers[str(dim)] = nn.ModuleList([self.new_module(dim), self.new_module(dim)])

    @property
    def dims(self) -> list[int]:
        return sorted(int(k) for k in self.layers)

    def pair(self, dim: int) -> tuple[HypernetworkModule, HypernetworkModule] | None:
        """The (K, V) modules for context width ``dim``, or ``None`` (the context passes unchanged)."""
        key = str(dim)
        if key not in self.layers:
            return None
        modules = cast(nn.ModuleList, self.layers[key])
        return cast(HypernetworkModule, modules[0]), cast(HypernetworkModule, modules[1])

    def describe(self) -> dict[str, Any]:
        """The structural settings (what A1111 stores beside the weights).

        ``last_layer_dropout`` is written as A1111 writes it, from the dropout structure (a dropout
        after the last hidden layer); readers that predate ``dropout_structure`` rebuild the
        Dropout slot from it, so their ``linear.N`` keys line up with ours.
        """
        last_layer_dropout = len(self.dropout_structure) >= 2 and self.dropout_structure[-2] != 0
        return {
            "layer_structure": list(self.layer_structure),
            "activation_func": self.activation or "linear",
            "is_layer_norm": self.layer_norm,
            "weight_initialization": self.weight_init,
            "use_dropout": self.use_dropout,
            "dropout_structure": list(self.dropout_structure),
            "last_layer_dropout": bool(last_layer_dropout),
            "activate_output": self.activate_output,
        }
