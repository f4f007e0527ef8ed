"""Checkpoints: where results go, intermediate results, resumable states, resume and retention.

- The final result goes to ``method.resolve_output(--output)``; resumable states to the folder
  ``<result stem>-state`` beside it (one ``step-NNNNNNNN`` folder per save, see :mod:`.state`).
- Intermediate results (``--save-every``/``--save-every-epochs``) are named
  :func:`intermediate_path` and, with ``--save-limit N``, only the newest N are kept; states keep
  the newest ``--keep-states``. The results written so far (every file of each save, as
  :meth:`~.method.TrainingMethod.saved_files` names them) are listed in each state (:data:`RESULTS_KEY`), and the
  weights a Ctrl-C, stop or lone failing process writes after its state in a sidecar beside it (:data:`STOPPED_WEIGHTS`), so a resumed
  run keeps counting them: ``--save-limit`` holds across resumes and interrupts, not only within one process.
  Nothing is found by a name pattern: only what the run recorded is ever deleted, and only under the result's
  folder (a file the user removed or renamed simply drops out of the list).
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
from pathlib import Path, PureWindowsPath
from typing import TYPE_CHECKING, Any

from ..console import warning_line
from ..errors import ConfigError
from ..io import atomic_write_text
from .method import RunFacts, SaveInfo, TrainingMethod
from .options import TrainOptions
from .save_fallback import guarded
from .state import TrainPosition

if TYPE_CHECKING:
    from ..models.bundle import ModelBundle
    from .ema import WeightEMA

log = logging.getLogger("sdcore.train")

#: ``train_state.json``'s list of the intermediate results written before the state, oldest first: one list per
#: save of its files (the path the method returned first), relative to the result's folder
RESULTS_KEY = "intermediate_results"
#: a state folder's sidecar naming the weights a Ctrl-C/SIGTERM/stop wrote after that state (the state comes
#: first, on purpose, so it cannot list them itself); written atomically once the weights are complete
STOPPED_WEIGHTS = "stopped_weights.json"

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


def resume_sensitive_options(options: Any) -> list[str]:
    """A method's own options marked ``option(..., resume_sensitive=True)`` (TI's template and rate schedule): a
    resume that changes them is warned about, as one changing :data:`RESUME_SENSITIVE`."""
    from dataclasses import fields

    return [f.name for f in fields(options) if f.metadata.get("resume_sensitive") and f.name not in RESUME_SENSITIVE]


def same_setting(saved: Any, now: Any) -> bool:
    """Whether an option's value recorded in a state and its value now mean the same, for the resume warning: a
    method's text option holding a number (APT's ``--cfg-scale``: default ``"3.0"``, typed ``3``) or a list of
    them (TI's rate schedule ``5e-3:10, 1e-3``) is compared number by number, so a respelling does not warn that
    the run will not match an uninterrupted one."""
    if saved == now:
        return True
    if not (isinstance(saved, str) and isinstance(now, str)):
        return False
    import re

    split = re.compile(r"\s*([,:;|]|(?<=[\d.])-(?=[\d.]))\s*|\s+")  # a range's "-" only between numbers
    before, after = split.split(saved.strip()), split.split(now.strip())
    if len(before) != len(after):
        return False
    for a, b in zip(before, after, strict=True):
        if a == b:
            continue
        try:
            if float(a) != float(b):
                return False
        except (TypeError, ValueError):
            return False
    return True


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
    """Delete a file or folder; a symbolic link is unlinked, never followed (what it points to stays)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _recorded_path(base: Path, item: Any) -> Path | None:
    """A state's recorded result file (relative to the result's folder ``base``) as a path, or ``None`` when it
    is not a plain relative path inside ``base`` on every platform (a state edited by hand never makes a run
    delete elsewhere): no root or drive, no ``..``, no backslash (a Windows spelling on POSIX, written as_posix)."""
    if not isinstance(item, str) or not item or "\\" in item:
        return None
    windows = PureWindowsPath(item)
    if windows.anchor or Path(item).anchor or ".." in windows.parts or not Path(item).parts:
        return None
    return base / item


def _fingerprint(path: Path) -> tuple[int, int] | None:
    """(size, mtime_ns) of ``path`` itself (a link not followed), or ``None`` when it is gone: what a state
    records with each result so a resumed run deletes the file the run wrote, not one put under its name."""
    try:
        st = path.lstat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


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


def _state_of(folder: Path, state_root: Path) -> bool:
    """Whether the state ``folder`` is one of ``state_root``'s (this result's ``<stem>-state`` folder)."""
    try:
        return folder.resolve().parent == state_root.resolve()
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop (Python < 3.13)
        return False


def _sidecar_saves(sidecar: Path) -> list[Any]:
    """The saves a state's :data:`STOPPED_WEIGHTS` names, oldest first, each a list of recorded files: its
    ``files`` (the newest), after any ``earlier`` ones (a lone process's weights, then a Ctrl-C's, after the same
    state). Nothing when there is no sidecar; an unreadable one is named in the log."""
    if not sidecar.is_file():
        return []
    try:
        stopped = json.loads(sidecar.read_text(encoding="utf-8"))
        earlier = stopped.get("earlier") or []
        if not isinstance(earlier, list):  # edited by hand: a number or a mapping there is no list of saves
            raise ValueError("'earlier' is not a list")
        return [*(e.get("files") or [] for e in earlier if isinstance(e, dict)), stopped.get("files") or []]
    except (OSError, ValueError, AttributeError) as exc:
        log.warning("%s: unreadable (%s); the weights it names are not counted by --save-limit", sidecar, exc)
        return []


def _first_path(saved: list[Any]) -> Any:
    """The path a recorded save names first (``None`` when it names none)."""
    return saved[0].get("path") if isinstance(saved[0], dict) else None


def recorded_saves(
    method: TrainingMethod[Any], options: TrainOptions, folder: Path, record: dict[str, Any]
) -> list[list[tuple[Path, tuple[int, int]]]]:
    """The results the state ``folder`` (its ``train_state.json`` read as ``record``) recorded that are surely still
    the run's own, oldest first: one list per save of (file, (size, mtime_ns) as written), the path the method
    returned first. What a resumed run adopts (:meth:`Checkpoints.adopt_results`) and what the pre-flight's disk
    estimate counts for a ``--resume``.

    Only what is surely the run's own is taken, so a state edited by hand, a folder shared with another run or
    a resume into another ``--output`` never deletes a file the run did not write: the state must be one of
    this result's (in its ``<stem>-state`` folder; from another ``--output`` nothing is taken); each file a
    plain relative path whose folder, links resolved, is inside the result's folder, and no link; never the result
    (with its companions), the state or samples folder, or a folder holding them; and still the size and mtime the
    run wrote (a file deleted, renamed or replaced by the user drops out of the list). States written before
    the list existed have none: nothing earlier is counted."""
    output, state_root = output_paths(method, options)
    if not _state_of(folder, state_root):
        return []
    recorded = record.get(RESULTS_KEY)
    entries: list[Any] = list(recorded) if isinstance(recorded, list) else []
    entries.extend(_sidecar_saves(folder / STOPPED_WEIGHTS))
    base = output.parent.absolute()
    real_base = base.resolve()
    protected = [
        p.absolute().resolve() for p in [*method.saved_files(output), output, state_root, samples_dir(state_root)]
    ]
    saves: list[list[tuple[Path, tuple[int, int]]]] = []
    for entry in entries:
        if not isinstance(entry, list):
            continue
        files: list[tuple[Path, tuple[int, int]]] = []
        for item in entry:
            if not isinstance(item, dict):
                continue
            path = _recorded_path(base, item.get("path"))
            size, mtime = item.get("size"), item.get("mtime_ns")
            if path is None or type(size) is not int or type(mtime) is not int or path.is_symlink():
                continue  # the run never writes a link as a result
            try:
                real = path.parent.resolve() / path.name
            except (OSError, RuntimeError):  # RuntimeError: a symlink loop (Python < 3.13)
                continue
            if not _inside(real.parent, real_base) or real == real_base:
                continue
            if any(_inside(real, p) or _inside(p, real) for p in protected):
                continue
            if _fingerprint(path) != (size, mtime):
                continue  # deleted, renamed or replaced since: not the run's file any more
            files.append((path, (size, mtime)))
        if files:
            saves = [s for s in saves if s[0][0] != files[0][0]]  # a name saved again: the newer record counts
            saves.append(files)
    return saves


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
        #: the intermediate results kept so far, oldest first, as the method returned their paths (a resumed run
        #: starts from those its state recorded that still exist, :meth:`restore`)
        self.saved_results: list[Path] = []
        #: every file or folder each of them wrote (:meth:`~.method.TrainingMethod.saved_files`), deleted together
        self.saved_files: dict[Path, list[Path]] = {}
        #: (size, mtime_ns) of each of those files as the run wrote it: only a file still so is ever deleted
        self.fingerprints: dict[Path, tuple[int, int] | None] = {}
        #: (step, file) of the newest ``--save-every`` result (main process), so a stop right after it names that file
        self.last_step_result: tuple[int, Path] | None = None
        #: (step, file) of the final result once written (main process), so a stop after it writes no copy
        self.final_result: tuple[int, Path] | None = None
        self.last_state: Path | None = None
        #: the state this run resumed from (:meth:`restore`): the newest one until the run saves another
        self.resumed_from: Path | None = None
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
            self.final_result = (position.step, output)
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
        self.record_result(saved)
        if step is not None:
            self.last_step_result = (step, saved)
        self.prune_results()
        return saved

    # -- retention across resumes --------------------------------------------------------------
    def record_result(self, saved: Path) -> None:
        """Count ``saved`` (a path :meth:`~.method.TrainingMethod.save` returned for an intermediate result, or the
        weights a Ctrl-C wrote) among the results ``--save-limit`` keeps, with every file its save wrote and each
        one's size and mtime as written (:func:`_fingerprint`). A path already listed was just overwritten (a resume
        from an earlier state saving the same step again): it moves to the newest place, so pruning the old entry
        can never delete the new file."""
        saved = Path(saved)
        if saved in self.saved_files:
            self.saved_results.remove(saved)
        files = [Path(p) for p in self.method.saved_files(saved)]
        self.saved_files[saved] = [p for p in files if p.exists() or p == saved] or [saved]
        for path in self.saved_files[saved]:
            self.fingerprints[path] = _fingerprint(path)
        self.saved_results.append(saved)

    def prune_results(self) -> None:
        """Delete the oldest recorded results beyond ``--save-limit`` (0: keep all), main process only. A file
        whose size or mtime is no longer what the run wrote (replaced by the user) is left alone, and one that
        cannot be deleted is named in the log: retention never ends a run."""
        limit = self.options.save_limit
        if not limit or not self.is_main:
            return
        while len(self.saved_results) > limit:
            old = self.saved_results.pop(0)
            for path in self.saved_files.pop(old, [old]):
                written = self.fingerprints.pop(path, None)
                if written is None or _fingerprint(path) != written:
                    continue  # gone, or no longer the file the run wrote
                try:
                    remove_path(path)
                except OSError as exc:
                    log.warning("--save-limit: could not delete %s (%s)", path, exc)

    def _record(self, files: list[Path]) -> list[dict[str, Any]]:
        """``files`` as a state lists them: relative to the result's folder (a run folder moved as a whole keeps
        its retention) with the size and mtime the run wrote; a file outside that folder is left out (a resumed
        run never deletes it)."""
        base = self.output.parent.absolute()
        recorded = []
        for path in files:
            written = self.fingerprints.get(path)
            try:
                relative = path.absolute().relative_to(base).as_posix()
            except ValueError:
                continue
            if written is not None:
                recorded.append({"path": relative, "size": written[0], "mtime_ns": written[1]})
        return recorded

    def recorded_results(self) -> list[list[dict[str, Any]]]:
        """:attr:`saved_results` as a state lists them (:data:`RESULTS_KEY`), oldest first, one list per save."""
        recorded = [self._record(self.saved_files.get(saved, [saved])) for saved in self.saved_results]
        return [files for files in recorded if files]

    def record_stopped(self, weights: Path, state: Path | None, step: int) -> None:
        """The weights a Ctrl-C, SIGTERM or stop (main process), or a process failing alone
        (:func:`~.save_fallback.save_alone`), wrote after ``state``: counted from now on, and named in the state's
        :data:`STOPPED_WEIGHTS` sidecar (written after the weights are complete), so the run resumed from that state
        counts them too. A sidecar already there (a lone process's file, then a Ctrl-C in the resumed run before
        its next state) keeps its saves as ``earlier`` ones. Nothing is deleted here: a stop only adds a file; the
        resume prunes to ``--save-limit``. A failure writing the sidecar is logged only (the weights and the state
        are what matter)."""
        self.record_result(weights)
        if state is None or not _state_of(state, self.state_root):
            return  # a state of another --output (a lone process after resuming from it): its run never prunes this
        files = self._record(self.saved_files[Path(weights)])
        if not files:  # written outside the result's folder: never deleted by a resumed run
            return
        sidecar = state / STOPPED_WEIGHTS
        earlier = [
            {"files": saved}
            for saved in _sidecar_saves(sidecar)
            if isinstance(saved, list) and saved and _first_path(saved) != files[0]["path"]
        ]
        record: dict[str, Any] = {"step": step, "files": files, **({"earlier": earlier} if earlier else {})}
        try:
            atomic_write_text(sidecar, json.dumps(record, indent=2))
        except OSError as exc:
            log.warning("could not note the stopped weights in %s (%s): --save-limit will not count them", state, exc)

    def adopt_results(self, folder: Path, record: dict[str, Any]) -> None:
        """Continue the retention of the run the state ``folder`` belongs to: the results it recorded
        (:func:`recorded_saves`: its :data:`RESULTS_KEY` and the weights a Ctrl-C or a lone process wrote after it,
        :data:`STOPPED_WEIGHTS`) become :attr:`saved_results`, oldest first, pruned to ``--save-limit`` at once (a
        resume that saves no more results still ends with the newest N). A state of another ``--output`` adds
        nothing (said in the log)."""
        if not _state_of(folder, self.state_root):
            log.info("--resume %s: a state of another --output; its intermediate results are not pruned", folder)
            return
        for files in recorded_saves(self.method, self.options, folder, record):
            saved = files[0][0]
            if saved in self.saved_files:
                self.saved_results.remove(saved)
            self.saved_results.append(saved)
            self.saved_files[saved] = [path for path, _ in files]
            self.fingerprints.update(files)
        self.prune_results()

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
                    RESULTS_KEY: self.recorded_results(),
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
        self.resumed_from = folder
        if self.is_main:  # only the main process writes and deletes results
            self.adopt_results(folder, record)
        self.method.load_trainable_state_dict({k: v.to(device) for k, v in trainable.items()})
        if ema is not None:
            ema.load_state_dict(load_ema(folder), where=str(folder))
        saved = record.get("options") or {}
        # compared as the state records them (JSON: a tuple such as resolution_size comes back as a list)
        current = json.loads(json.dumps(asdict(self.options), default=str))
        sensitive = [*RESUME_SENSITIVE, *resume_sensitive_options(self.options)]
        changed = [k for k in sensitive if k in saved and not same_setting(saved[k], current.get(k))]
        described = [f"{k} ({saved[k]!r} -> {current.get(k)!r})" for k in changed]
        guidance = resumed_guidance_change(saved, self.options, control=self.method.capabilities().control_channels)
        if guidance is not None:
            changed.append("guidance_scale")
            described.append(f"guidance_scale ({guidance[0]:g} -> {guidance[1]:g})")
        was = record.get("prediction_type")
        if was and prediction_type and was != prediction_type:
            changed.append("prediction_type")
            described.append(f"prediction_type ({was!r} -> {prediction_type!r}: the loss target changes)")
        if changed:  # one line, with the values (a log.warning beside it printed the same news twice)
            self.say(
                warning_line(
                    f"resuming with changed {', '.join(described)}: the run continues but will not match an "
                    "uninterrupted one"
                )
            )
        losses = [float(x) for x in record.get("losses", [])][: position.step]
        self.say(f"resumed from {folder} at step {position.step} (epoch {position.epoch + 1}, batch {position.batch})")
        return position, losses
