"""Checkpoints: where results go, intermediate results, resumable states, resume and retention.

- The final result goes to ``method.resolve_output(--output)``; resumable states to the folder
  ``<result stem>-state`` beside it (one ``step-NNNNNNNN`` folder per save, see :mod:`.state`).
- Intermediate results (``--save-every``/``--save-every-epochs``) are named
  :func:`intermediate_path` and, with ``--save-limit N``, only the newest N are kept; states keep
  the newest ``--keep-states``.
- Every write runs under :func:`~.save_fallback.guard`: a disk error (permissions, disk full, a
  removed folder) becomes :class:`~.save_fallback.SaveTargetError`, which the loop answers by
  rescuing the result (:func:`~.save_fallback.rescue`).
- Resume restores the trainable tensors (and their ``--ema`` average), optimizer, schedule, scaler,
  RNGs and the position in the epoch; options that change the data order or schedule may differ
  but are warned about (the ``--ema`` settings may not: the pre-flight refuses them).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from .method import RunFacts, SaveInfo, TrainingMethod
from .options import TrainOptions
from .save_fallback import guarded
from .state import TrainPosition

if TYPE_CHECKING:
    from ..models.bundle import ModelBundle
    from .ema import WeightEMA

log = logging.getLogger("sdcore.train")

#: options that change the data order, the samples or the schedule: changing them on resume is
#: allowed but warned about (the result no longer equals an uninterrupted run)
RESUME_SENSITIVE = (
    "data",
    "reg_data",
    "metadata_file",
    "dataset_repeats",
    "batch_size",
    "gradient_accumulation",
    "seed",
    "lr",
    "lr_scheduler",
    "optimizer",
    "optimizer_args",
    "resolution",
    "resolution_size",
    "flip",
    "shuffle_caption",
    "caption_variants",
)


def resumed_guidance_change(
    saved: dict[str, Any], options: TrainOptions, *, control: bool
) -> tuple[float, float] | None:
    """(saved, now) when the guidance the run trains at (:func:`~.objectives.training_guidance`: what FLUX.1 dev's
    guidance embedding gets, so what the run learns to predict at) differs from the one the state was saved with,
    else None. Compared as resolved, not as given: a state saved when ``--guidance-scale``'s default was the
    number 1.0 records 1.0, which a run without the option still trains at, except a control-LoRA run (30 now)."""
    from types import SimpleNamespace

    from .objectives import training_guidance

    if "guidance_scale" not in saved:
        return None
    before = training_guidance(SimpleNamespace(guidance_scale=saved["guidance_scale"]), control=control)
    now = training_guidance(options, control=control)
    return None if before == now else (before, now)


# --------------------------------------------------------------------------------------------
# names


def output_paths(method: TrainingMethod[Any], options: TrainOptions) -> tuple[Path, Path]:
    """(final result path, state root folder ``<result stem>-state`` beside it)."""
    out = Path(method.resolve_output(Path(options.output).expanduser()))
    return out, out.parent / f"{stem_and_suffix(out)[0]}-state"


def stem_and_suffix(path: Path) -> tuple[str, str]:
    """``lora.safetensors`` -> (``lora``, ``.safetensors``); a folder name keeps its whole name."""
    if path.suffix and not path.is_dir() and len(path.suffix) <= 13:
        return path.name[: -len(path.suffix)], path.suffix
    return path.name, ""


def intermediate_path(final: Path, *, step: int | None = None, epoch: int | None = None) -> Path:
    """kohya's names: ``lora.safetensors`` -> ``lora-000002.safetensors`` (epoch 2, six digits) or
    ``lora-step00000100.safetensors`` (step 100, eight digits)."""
    stem, ext = stem_and_suffix(final)
    tag = f"-{epoch:06d}" if epoch is not None else f"-step{step:08d}"
    return final.parent / f"{stem}{tag}{ext}"


def samples_dir(state_root: Path) -> Path:
    """``<result stem>-samples`` beside the state folder."""
    return state_root.parent / f"{state_root.name[: -len('-state')]}-samples"


def remove_path(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# saving and restoring


def epoch_save_interval(options: TrainOptions, total_steps: int, steps_per_epoch: int) -> int | None:
    """Epochs between intermediate saves: ``--save-every-epochs``, or with kohya's
    ``--save-n-epoch-ratio N`` its formula ``floor(epochs / N) or 1`` over the run's epochs counted as
    kohya counts them (``ceil(total steps / steps per epoch)``), which then replaces ``--save-every-epochs``
    as in kohya (so about N results are saved, at least N when the epochs are a multiple of N)."""
    ratio = options.save_n_epoch_ratio
    if not ratio:
        return options.save_every_epochs
    if steps_per_epoch < 1:
        return None
    return max(1, math.ceil(total_steps / steps_per_epoch) // ratio)


class Checkpoints:
    """Results and states of one run. ``accelerator`` synchronises processes; only the main
    process writes results, every process takes part in saving a state."""

    def __init__(
        self,
        method: TrainingMethod[Any],
        options: TrainOptions,
        accelerator: Any,
        *,
        say: Callable[[str], None] = log.info,
    ) -> None:
        self.method = method
        self.options = options
        self.accelerator = accelerator
        self.say = say
        self.output, self.state_root = output_paths(method, options)
        self.saved_results: list[Path] = []
        #: (step, file) of the newest ``--save-every`` result (main process), so a stop right after it names that file
        self.last_step_result: tuple[int, Path] | None = None
        self.last_state: Path | None = None
        self.started_at = time.time()
        from .modelspec import user_metadata

        try:  # now, not at the first save hours later: the thumbnail file is read here
            self._user_metadata = user_metadata(options)
        except OSError as exc:
            raise ConfigError(f"--metadata-thumbnail {options.metadata_thumbnail}: cannot be read ({exc})") from exc

    @property
    def is_main(self) -> bool:
        return bool(self.accelerator.is_main_process)

    def base_metadata(self, bundle: ModelBundle) -> dict[str, str]:
        """The runtime's own metadata keys and the user's (``--metadata-*``: ``modelspec.*``,
        ``--training-comment``); the method adds its format's (LoRA: kohya ``ss_*``). With ``--ema``
        the saved weights are the average: ``sdcore_ema_*`` say with which settings."""
        from .ema import ema_metadata

        return {
            "sdcore_method": self.method.name,
            "sdcore_base_model": str(self.options.model),
            "sdcore_family": bundle.family,
            **ema_metadata(self.options),
            **self._user_metadata,
        }

    def save_info(
        self, bundle: ModelBundle, path: Path, position: TrainPosition, run: RunFacts, *, final: bool
    ) -> SaveInfo:
        return SaveInfo(
            path=path,
            step=position.step,
            epoch=position.epoch,
            metadata=self.base_metadata(bundle),
            final=final,
            run=run,
        )

    @guarded
    def save_result(self, bundle: ModelBundle, position: TrainPosition, run: RunFacts) -> Path:
        """The final result (main process; the others get the path it will have)."""
        output = self.output
        if self.is_main:
            output = Path(self.method.save(bundle, self.save_info(bundle, self.output, position, run, final=True)))
        return output

    @guarded
    def save_intermediate(
        self, bundle: ModelBundle, position: TrainPosition, run: RunFacts, *, step: int | None, epoch: int | None
    ) -> Path | None:
        """An intermediate result, keeping the newest ``--save-limit`` of them."""
        if not self.is_main:
            return None
        path = intermediate_path(self.output, step=step, epoch=epoch)
        saved = Path(self.method.save(bundle, self.save_info(bundle, path, position, run, final=False)))
        self.saved_results.append(saved)
        if step is not None:
            self.last_step_result = (step, saved)
        limit = self.options.save_limit
        if limit:
            while len(self.saved_results) > limit:
                remove_path(self.saved_results.pop(0))
        return saved

    @guarded
    def save_state(
        self,
        position: TrainPosition,
        *,
        optimizer: Any,
        scheduler: Any,
        losses: list[float],
        total_steps: int,
        ema: WeightEMA | None = None,
        prediction_type: str | None = None,
    ) -> Path:
        """A resumable state (every process waits for the main one to write it); ``ema``: the
        ``--ema`` average, saved beside the raw tensors; ``prediction_type``: what the run trains (the bundle's,
        as ``--prediction-type`` resolved it), for :meth:`restore` to compare."""
        from .state import prune_states, save_state

        acc = self.accelerator
        acc.wait_for_everyone()
        folder = self.state_root / f"step-{position.step:08d}"
        if self.is_main:
            folder = save_state(
                self.state_root,
                position,
                trainable=self.method.trainable_state_dict(),
                optimizer=optimizer,
                scheduler=scheduler,
                scaler=acc.scaler,
                extra={
                    "method": self.method.name,
                    "losses": losses,
                    "total_steps": total_steps,
                    "options": asdict(self.options),
                    "world_size": acc.num_processes,
                    **({"prediction_type": prediction_type} if prediction_type else {}),
                },
                ema=None if ema is None else ema.state_dict(),
            )
            if self.options.keep_states > 0:
                prune_states(self.state_root, self.options.keep_states)
        acc.wait_for_everyone()
        self.last_state = folder
        return folder

    def restore(
        self,
        resume: str,
        *,
        optimizer: Any,
        scheduler: Any,
        device: Any,
        ema: WeightEMA | None = None,
        prediction_type: str | None = None,
    ) -> tuple[TrainPosition, list[float]]:
        """Load the state ``resume`` names (``latest`` or a folder): (position, losses so far); ``ema``
        (``--ema``) gets the saved average. ``prediction_type`` (what this run trains) is compared, as resolved,
        with the state's: a resume without the ``--prediction-type v_prediction`` the state was trained with
        would silently switch the loss target (states saved before it was recorded are not compared)."""
        from .state import load_ema, load_state, read_position, resolve_resume

        folder = resolve_resume(resume, self.state_root)
        position, record = read_position(folder)
        if record.get("method") not in (None, self.method.name):
            raise ConfigError(
                f"--resume {folder}: the state is from method {record.get('method')!r}, not {self.method.name!r}"
            )
        trainable = load_state(folder, optimizer=optimizer, scheduler=scheduler, scaler=self.accelerator.scaler)
        self.method.load_trainable_state_dict({k: v.to(device) for k, v in trainable.items()})
        if ema is not None:
            ema.load_state_dict(load_ema(folder), where=str(folder))
        saved = record.get("options") or {}
        # compared as the state records them (JSON: a tuple such as resolution_size comes back as a list)
        current = json.loads(json.dumps(asdict(self.options), default=str))
        changed = [k for k in RESUME_SENSITIVE if k in saved and saved[k] != current.get(k)]
        described = [f"{k} ({saved[k]!r} -> {current.get(k)!r})" for k in changed]
        guidance = resumed_guidance_change(saved, self.options, control=self.method.capabilities().control_channels)
        if guidance is not None:
            changed.append("guidance_scale")
            described.append(f"guidance_scale ({guidance[0]:g} -> {guidance[1]:g})")
        was = record.get("prediction_type")
        if was and prediction_type and was != prediction_type:
            changed.append("prediction_type")
            described.append(f"prediction_type ({was!r} -> {prediction_type!r}: the loss target changes)")
        if changed:
            log.warning(
                "resuming with changed %s: the run continues but will not match an uninterrupted one",
                ", ".join(described),
            )
            self.say("warning: resuming with changed " + ", ".join(changed))
        losses = [float(x) for x in record.get("losses", [])][: position.step]
        self.say(f"resumed from {folder} at step {position.step} (epoch {position.epoch + 1}, batch {position.batch})")
        return position, losses
