"""kohya sd-scripts option names, in one table used by ``sdcore train`` and ``--config``.

A kohya user's command line (``--network_dim 16 --output_dir out --output_name x ...``) and
training TOML (flat as the kohya_ss GUI writes it, or in ``[model_arguments]``-style sections)
work unchanged: every kohya name is translated to sdcore's option here, once.

- :data:`ALIASES`: kohya name -> sdcore option (with a value converter where kohya writes values
  differently, e.g. ``resolution = "512,512"`` or ``optimizer_type = "AdamW8bit"``). An alias
  applies to a method when its options have the target field (``network_dim`` -> ``rank`` only
  for LoRA).
- Composite names are translated in :func:`translate`: ``output_dir`` + ``output_name`` +
  ``save_model_as`` -> ``output``; ``network_module`` + ``network_args`` -> the LoRA algorithm and
  its settings; ``max_train_epochs`` overrides ``max_train_steps`` as in kohya.
- :data:`IGNORED`: options that do not change the trained result here (attention kernels, data
  loader workers, logging): accepted with one note.
- :data:`UNSUPPORTED`: options that would change the result and sdcore does not implement:
  accepted while they hold their "off" value (what the kohya_ss GUI writes for untouched fields),
  an error naming them otherwise.
- kohya_ss GUI configs (JSON with the GUI's own field names): :mod:`.kohya_gui` turns them into
  these names first, then the same table applies.
- :data:`KOHYA_DEFAULTS`: where kohya's default differs from sdcore's and decides what trains
  (kohya trains the text encoder too, dim 4, alpha 1, no buckets, 1600 steps, learning rate 2e-6, ``.caption``
  captions, float32 saves) or what is written, a run written with kohya names gets kohya's default, with a note
  saying so.

One module per job, every public name re-exported here (import from ``sdcore.train.kohya``), all torch-free:
:mod:`.values` (value converters, what "off" means), :mod:`.tables` (the name tables above and
:class:`Translation`), :mod:`.names` (which names are kohya's, flags, multi-value options),
:mod:`.network_args` (``network_module`` + ``network_args``: LyCORIS, per-module and block-wise arguments, GGPO),
:mod:`.translate` (:func:`translate`, the composites, DeepSpeed and block swap), :mod:`.defaults`
(:func:`kohya_defaults` and the ``kohya_*`` notes) and :mod:`.hints` (nearest names, other tools' names, ``--help``
rows).
"""

from __future__ import annotations

from .defaults import (
    family_default_targets,
    kohya_defaults,
    kohya_flow_semantics,
    kohya_flux_train_text_encoder,
    kohya_t5_cache_only,
    kohya_text_cache_notes,
    kohya_text_encoder_rates,
    kohya_text_encoder_storage,
    kohya_v_parameterization,
    kohya_zero_rate_notes,
    model_type_problems,
    written_in_kohya_terms,
)
from .hints import (
    FAMILY_FLAGS,
    NAME_HINTS,
    NameHint,
    family_flag_hint,
    help_epilog,
    help_rows,
    name_hint,
    nearest,
    nearest_name,
)
from .names import MULTI_VALUE, cli_names, flag_names, is_kohya_name
from .network_args import (
    KOHYA_LORA_MODULES,
    KOHYA_NETWORK_ARGS,
    KOHYA_OTHER_MODULES,
    LYCORIS_OTHER_ALGOS,
    NETWORK_ARGS,
    NETWORK_ARGS_OFF,
    kohya_rule_options,
)
from .tables import (
    ALIASES,
    COMPOSITE,
    IGNORED,
    KOHYA_DEFAULTS,
    KOHYA_FAMILY_DEFAULTS,
    OTHER_SCRIPTS,
    UNSUPPORTED,
    Alias,
    Translation,
)
from .translate import steps_window, translate
from .values import (
    FLOW_SAMPLINGS,
    MODEL_PREDICTION_TYPES,
    OPTIMIZERS,
    SCHEDULERS,
    WEIGHTING_SCHEMES,
    resolution_side,
    resolution_value,
    split_resolution,
)

__all__ = [
    "ALIASES",
    "COMPOSITE",
    "FAMILY_FLAGS",
    "FLOW_SAMPLINGS",
    "IGNORED",
    "KOHYA_DEFAULTS",
    "KOHYA_FAMILY_DEFAULTS",
    "KOHYA_LORA_MODULES",
    "KOHYA_NETWORK_ARGS",
    "KOHYA_OTHER_MODULES",
    "LYCORIS_OTHER_ALGOS",
    "MODEL_PREDICTION_TYPES",
    "MULTI_VALUE",
    "NAME_HINTS",
    "NETWORK_ARGS",
    "NETWORK_ARGS_OFF",
    "OPTIMIZERS",
    "OTHER_SCRIPTS",
    "SCHEDULERS",
    "UNSUPPORTED",
    "WEIGHTING_SCHEMES",
    "Alias",
    "NameHint",
    "Translation",
    "cli_names",
    "family_default_targets",
    "family_flag_hint",
    "flag_names",
    "help_epilog",
    "help_rows",
    "is_kohya_name",
    "kohya_defaults",
    "kohya_flow_semantics",
    "kohya_flux_train_text_encoder",
    "kohya_rule_options",
    "kohya_t5_cache_only",
    "kohya_text_cache_notes",
    "kohya_text_encoder_rates",
    "kohya_text_encoder_storage",
    "kohya_v_parameterization",
    "kohya_zero_rate_notes",
    "model_type_problems",
    "name_hint",
    "nearest",
    "nearest_name",
    "resolution_side",
    "resolution_value",
    "split_resolution",
    "steps_window",
    "translate",
    "written_in_kohya_terms",
]
