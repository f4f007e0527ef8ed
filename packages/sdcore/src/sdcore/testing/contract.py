"""The contract every training method must pass, runnable from any plugin's test suite.

Use the mixin (pytest collects it in your test module)::

    from sdcore.testing.contract import MethodContractTests

    class TestMyMethod(MethodContractTests):
        method_class = MyMethod
        options = {"rank": 4, "lr": 1e-2}      # overrides on top of contract_options()
        family = "sd1"

or call the checks yourself (``check_learning(MyMethod, tmp_path, {...})``). Every check runs on
a tiny random model (:func:`sdcore.models.tiny.create_tiny_bundle`) and a tiny generated dataset
(:func:`make_tiny_dataset`) on the CPU in a few seconds:

- config round-trip: ``dump_options`` -> ``load_options`` gives equal options;
- one step: training runs a step, writes the result and a resumable state;
- learning: the loss on the training images at *fixed* noise and timesteps falls clearly;
- save -> load: ``method.load_result`` on a fresh model reproduces the trained model's outputs;
- resume: N steps in one go equal N/2 steps, Ctrl-C, ``--resume latest`` to N (bit for bit); the Ctrl-C
  leaves the files ``--save-every`` writes at step N/2, with the same tensors;
- determinism: two runs with the same seed give bit-identical trained tensors;
- concept learning (opt-in, ``toyworld_concept``): on the toy world's trained base model
  (``toyworld:``), the share of samples showing a concept (a new object, a known composition under
  a new word, or a style on every prompt: :mod:`sdcore.testing.toyworld.concepts`) rises by the
  declared margin (:func:`check_concept_learning`);
- flow-matching learning (opt-in, ``flow_families``): on tiny SD3/Flux, the flow-matching loss on a
  fixed held set of (latent, noise, sigma) triples falls by the declared drop, and a run at lr 0
  leaves it unchanged (:func:`check_flow_learning`; no toy world for these families: a tiny MMDiT
  does not learn its shapes in a CI budget, see ``python -m sdcore.testing.toyworld flow-probe``).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

DEFAULT_CAPTIONS = ("red stripes", "green circles", "blue checks", "yellow gradient", "purple dots", "cyan waves")


def make_tiny_dataset(
    path: str | Path, n: int = 4, size: int = 64, captions: bool = True, repeats: int = 1, name: str = "tiny"
) -> Path:
    """Write ``n`` distinct, learnable PNGs (``size`` px) with ``.txt`` captions into
    ``path/<repeats>_<name>`` (a kohya folder) and return ``path``."""
    import numpy as np
    from PIL import Image

    root = Path(path)
    folder = root / f"{repeats}_{name}"
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    for i in range(n):
        hue = i / max(n, 1)
        color = np.array([0.5 + 0.5 * math.cos(2 * math.pi * (hue + k / 3)) for k in range(3)], dtype=np.float32)
        kind = i % 3
        if kind == 0:
            pattern = (np.sin(xx * math.pi * (4 + 2 * i)) > 0).astype(np.float32)
        elif kind == 1:
            pattern = (((xx - 0.5) ** 2 + (yy - 0.5) ** 2) < (0.1 + 0.05 * i) ** 2).astype(np.float32)
        else:
            pattern = ((np.floor(xx * (4 + i)) + np.floor(yy * (4 + i))) % 2).astype(np.float32)
        rgb = pattern[..., None] * color[None, None, :] + (1 - pattern[..., None]) * (1 - color[None, None, :]) * 0.3
        Image.fromarray((rgb * 255).clip(0, 255).astype(np.uint8), "RGB").save(folder / f"img{i:02d}.png")
        if captions:
            text = DEFAULT_CAPTIONS[i % len(DEFAULT_CAPTIONS)] + (
                f", variant {i}" if i >= len(DEFAULT_CAPTIONS) else ""
            )
            (folder / f"img{i:02d}.txt").write_text(f"tiny, {text}", encoding="utf-8")
    return root


def contract_options(
    method_class: Any,
    tmp_path: Path,
    overrides: dict[str, Any] | None = None,
    *,
    family: str = "sd1",
    tag: str = "run",
) -> Any:
    """Options for a tiny CPU run of ``method_class`` under ``tmp_path`` (data made once)."""
    data = tmp_path / "data"
    if not data.exists():
        make_tiny_dataset(data, n=4, size=64)
    values: dict[str, Any] = {
        "model": f"tiny:{family}",
        "data": str(data),
        "output": str(tmp_path / tag / f"result{method_class.output_suffix}"),
        "resolution": 64,
        "min_bucket_reso": 64,
        "max_bucket_reso": 128,
        "bucket_step": 64,
        "batch_size": 2,
        "max_steps": 4,
        "lr": 1e-3,
        "save_dtype": "fp32",
        "progress": False,
        "seed": 1234,
    }
    values.update(overrides or {})
    options_class = method_class.options_class
    names = {f.name for f in dataclasses.fields(options_class)}
    return options_class(**{k: v for k, v in values.items() if k in names})


_TINY_BASES: dict[str, Any] = {}


def _bundle(family: str) -> Any:
    """A fresh tiny model of ``family``: SD1/SD2/SDXL built directly, any other family (``sd3``,
    ``flux``, ``flux-schnell``, ``sd3:sd3.5-medium``) read as ``tiny:<family>`` once per process and
    copied."""
    import copy

    from ..models.tiny import create_tiny_bundle

    if family in ("sd1", "sd2", "sdxl"):
        return create_tiny_bundle(family)
    if family not in _TINY_BASES:
        from ..models.load import load_model

        _TINY_BASES[family] = load_model(f"tiny:{family}")
    return copy.deepcopy(_TINY_BASES[family])


def check_config_roundtrip(
    method_class: Any, tmp_path: Path, overrides: dict[str, Any] | None = None, family: str = "sd1"
) -> None:
    from ..train.config import dump_options, load_options

    options = contract_options(method_class, tmp_path, overrides, family=family)
    path = tmp_path / "config.toml"
    dump_options(options, path)
    again = load_options(method_class.options_class, path, {})
    assert again == options, f"config round-trip changed options:\n{options}\n!=\n{again}"


def check_one_step(
    method_class: type, tmp_path: Path, overrides: dict[str, Any] | None = None, family: str = "sd1"
) -> Any:
    from ..train.loop import train

    options = contract_options(method_class, tmp_path, {**(overrides or {}), "max_steps": 1}, family=family, tag="one")
    result = train(method_class(options), bundle=_bundle(family))
    assert result.steps == 1, result
    assert len(result.losses) == 1 and math.isfinite(result.losses[0]), result.losses
    assert Path(result.output).exists(), f"the method did not write {result.output}"
    assert result.last_state is not None and (result.last_state / "train_state.json").exists()
    return result


def _learning_session(
    method_class: type,
    tmp_path: Path,
    defaults: dict[str, Any],
    overrides: dict[str, Any] | None,
    family: str,
    steps: int,
    tag: str,
) -> Any:
    """A set-up (not yet run) session of the learning checks: ``steps`` steps at batch 4, no state."""
    from ..train.loop import TrainSession

    values = {"max_steps": steps, "batch_size": 4, "save_state": False, **defaults, **(overrides or {})}
    options = contract_options(method_class, tmp_path, values, family=family, tag=tag)
    session = TrainSession(method_class(options), bundle=_bundle(family))
    session.setup()
    return session


def check_learning(
    method_class: type,
    tmp_path: Path,
    overrides: dict[str, Any] | None = None,
    *,
    family: str = "sd1",
    steps: int = 40,
    min_drop: float = 0.2,
) -> tuple[float, float]:
    """Train ``steps`` steps; the fixed-noise loss must fall by at least ``min_drop`` (relative)."""
    session = _learning_session(method_class, tmp_path, {"lr": 1e-2}, overrides, family, steps, "learn")
    before = session.fixed_loss()
    session.run()
    after = session.fixed_loss()
    assert after < before * (1 - min_drop), (
        f"{method_class.__name__} did not learn: fixed-noise loss {before:.5f} -> {after:.5f} after {steps} steps"
    )
    return before, after


FLOW_HELD_SIGMAS: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)
"""The noise levels of the flow-matching held set: every image is measured at each of them."""
FLOW_HELD_SEED = 20261130
"""Seed of the held set's noise; independent of the run's ``seed`` so runs with different
training seeds are measured on the same triples."""


@dataclasses.dataclass(frozen=True)
class FlowHeldSet:
    """Fixed (latent, noise, sigma) triples of a flow-matching model, with each latent's caption.

    Drawn once before training and never resampled, so the loss on them moves only when the
    model's predictions move; the training loss, by contrast, sees new noise and sigmas every
    step and is far too noisy to judge a few dozen steps by."""

    latents: Any  # [N, C, h, w], scaled (and shifted) as the denoiser sees them
    noise: Any  # [N, C, h, w], standard normal
    sigmas: Any  # [N], in (0, 1)
    captions: tuple[str, ...]


def flow_held_set(
    session: Any, *, count: int = 4, sigmas: tuple[float, ...] = FLOW_HELD_SIGMAS, seed: int = FLOW_HELD_SEED
) -> FlowHeldSet:
    """The held set of a set-up :class:`~sdcore.train.loop.TrainSession` on a flow-matching family:
    the first ``count`` training images (no flip, the method's caption without randomness), each at
    every sigma in ``sigmas``, with noise from a generator seeded by ``seed``."""
    import random

    import torch

    from ..errors import ConfigError
    from ..train.data import SampleRef

    bundle = session.bundle
    if bundle.family_spec.objective != "flow-matching":
        raise ConfigError(
            f"the flow-matching learning check needs a flow-matching family (sd3, flux); "
            f"{bundle.family!r} trains with {bundle.family_spec.objective!r}"
        )
    entries = session.data.entries
    gen = torch.Generator().manual_seed(seed)
    latents, noise, levels, captions = [], [], [], []
    with torch.no_grad():
        for entry in range(min(count, len(entries))):
            batch = session.make_batch([SampleRef(entry, 0, -1)], with_conditioning=False)
            latent = batch.latents[0].float().cpu()
            caption = session.method.caption_for(entries[entry].caption, is_class=False, rng=random.Random(0))
            for sigma in sigmas:
                latents.append(latent)
                noise.append(torch.randn(latent.shape, generator=gen))
                levels.append(float(sigma))
                captions.append(caption)
    if not latents:
        raise ConfigError("the flow-matching held set is empty: the dataset has no images")
    return FlowHeldSet(torch.stack(latents), torch.stack(noise), torch.tensor(levels), tuple(captions))


def flow_held_loss(session: Any, held: FlowHeldSet, *, chunk: int = 5) -> float:
    """Mean flow-matching loss of the session's model on ``held``.

    Written from the rectified-flow definition (SD3 paper, section 2), not through the runtime's
    objective: ``x_s = (1 - s) x + s eps``, the model predicts the velocity ``eps - x`` and is called
    with ``timestep = s * 1000`` as diffusers' SD3 and Flux pipelines do. The conditioning comes from
    the method's ``encode`` (a method that trains the text encoders or learns words is measured with
    them), the denoiser through the family adapter; every component is in eval mode while measuring."""
    import torch

    from ..models.family import family_adapter
    from ..train.objectives import training_guidance

    bundle, method = session.bundle, session.method
    adapter = family_adapter(bundle.family)
    guidance = training_guidance(session.options, control=method.capabilities().control_channels)
    modules = [m for m in bundle.components().values() if isinstance(m, torch.nn.Module)]
    modes = [m.training for m in modules]
    total, n = 0.0, 0
    try:
        for module in modules:
            module.eval()
        with torch.no_grad(), session.accelerator.autocast():
            for start in range(0, len(held.captions), chunk):
                stop = min(start + chunk, len(held.captions))
                x = held.latents[start:stop].to(session.device)
                eps = held.noise[start:stop].to(session.device)
                s = held.sigmas[start:stop].to(session.device)
                noisy = (1.0 - s.view(-1, 1, 1, 1)) * x + s.view(-1, 1, 1, 1) * eps
                cond = method.encode(bundle, list(held.captions[start:stop]))
                pred = adapter.predict(bundle, noisy, s * 1000.0, cond, guidance=guidance)
                per_sample = (pred.float() - (eps - x).float()).pow(2).mean(dim=(1, 2, 3))
                total += float(per_sample.sum())
                n += stop - start
    finally:
        for module, mode in zip(modules, modes, strict=True):
            module.train(mode)
    return total / max(n, 1)


def _zero_learning_rates(session: Any) -> None:
    """Make a set-up session's optimizer step with lr 0 (the pre-flight rightly refuses ``--lr 0``
    from users; the control run still runs every forward, backward, optimizer and schedule step)."""
    optimizer = session.optimizer
    for group in optimizer.param_groups:
        group["lr"] = 0.0
        if "initial_lr" in group:
            group["initial_lr"] = 0.0
    scheduler = getattr(session.scheduler, "scheduler", session.scheduler)  # accelerate's wrapper
    if hasattr(scheduler, "base_lrs"):
        scheduler.base_lrs = [0.0 for _ in scheduler.base_lrs]


def check_flow_learning(
    method_class: type,
    tmp_path: Path,
    overrides: dict[str, Any] | None = None,
    *,
    family: str = "sd3",
    steps: int = 20,
    min_drop: float = 0.2,
    untrained: bool = False,
) -> tuple[float, float]:
    """Train ``steps`` steps on tiny ``family`` (a flow-matching family: ``sd3``, ``flux``, ...) and
    the tiny dataset; the loss on the fixed held set (:func:`flow_held_set`) must fall by at least
    ``min_drop`` (relative). With ``untrained=True`` the same run steps with lr 0 and the held loss
    must *not* fall (by more than 1e-4 relative): the control that shows the drop is learning, not
    a measure that drifts. Returns (before, after)."""
    tag = "flow-untrained" if untrained else "flow-learn"
    session = _learning_session(method_class, tmp_path, {"lr": 1e-3}, overrides, family, steps, tag)
    held = flow_held_set(session)
    before = flow_held_loss(session, held)
    if untrained:
        _zero_learning_rates(session)
    session.run()
    after = flow_held_loss(session, held)
    what = f"{method_class.__name__} on tiny {family}: held flow-matching loss {before:.5f} -> {after:.5f} after {steps} steps"
    if untrained:
        assert after >= before * (1 - 1e-4), f"{what} at lr 0: the measure moves without learning"
    else:
        assert after < before * (1 - min_drop), f"{what}, the method declares a drop of at least {min_drop:.0%}"
    return before, after


def _reference_outputs(method: Any, bundle: Any, captions: list[str], seed: int = 7) -> Any:
    import torch

    from ..models.family import family_adapter
    from ..train.method import Conditioning

    gen = torch.Generator().manual_seed(seed)
    size = 8
    channels = bundle.family_spec.latent.channels
    latents = torch.randn((len(captions), channels, size, size), generator=gen)
    timesteps = torch.tensor([250 + 100 * i for i in range(len(captions))])
    with torch.no_grad():
        cond = method.encode(bundle, captions)
        dtype = next(bundle.denoiser.parameters()).dtype
        cond = Conditioning(cond.hidden_states.to(dtype), cond.pooled, cond.extra)
        out = family_adapter(bundle.family).predict(bundle, latents.to(dtype), timesteps, cond)
    return out.float()


def check_save_load(
    method_class: type,
    tmp_path: Path,
    overrides: dict[str, Any] | None = None,
    *,
    family: str = "sd1",
    atol: float = 1e-4,
) -> None:
    """The saved result, loaded into a fresh model, gives the trained model's outputs."""
    import torch

    from ..train.loop import train

    options = contract_options(
        method_class, tmp_path, {"max_steps": 3, "lr": 1e-2, **(overrides or {})}, family=family, tag="saveload"
    )
    method = method_class(options)
    trained = _bundle(family)
    result = train(method, bundle=trained)
    for module in trained.components().values():
        module.eval()
    captions = ["tiny, red stripes", "tiny, blue checks"]
    expected = _reference_outputs(method, trained, captions)
    fresh = _bundle(family)
    loader = method_class(options)
    if type(loader).load_result is __import__("sdcore.train.method", fromlist=["x"]).TrainingMethod.load_result:
        raise AssertionError(f"{method_class.__name__} does not implement load_result(bundle, path)")
    loader.load_result(fresh, Path(result.output))
    got = _reference_outputs(loader, fresh, captions)
    base = _reference_outputs(loader, _bundle(family), captions)
    assert not torch.allclose(expected, base, atol=atol), "training did not change the model's outputs"
    assert torch.allclose(expected, got, atol=atol), (
        f"load_result differs from the trained model: max |diff| {float((expected - got).abs().max()):.3g}"
    )


class _StopAt:
    def __init__(self, step: int) -> None:
        self.step = step

    def sdcore_on_train_step(self, context: Any, step: int, logs: dict[str, float]) -> None:
        if step == self.step:
            raise KeyboardInterrupt


def plugin_manager_with(*plugins: Any) -> Any:
    """A pluggy manager with sdcore's hookspecs and ``plugins`` registered (hook tests).

    Plain objects work: every ``sdcore_*`` method counts as a hook implementation, so tests need
    no ``@hookimpl`` markers.
    """
    import pluggy

    from .. import hookspecs

    class _Manager(pluggy.PluginManager):
        def parse_hookimpl_opts(self, plugin: Any, name: str) -> Any:
            opts = super().parse_hookimpl_opts(plugin, name)
            if opts is None and name.startswith("sdcore_") and callable(getattr(plugin, name, None)):
                return {
                    "wrapper": False,
                    "hookwrapper": False,
                    "optionalhook": False,
                    "tryfirst": False,
                    "trylast": False,
                    "specname": None,
                }
            return opts

    pm = _Manager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    for plugin in plugins:
        pm.register(plugin)
    return pm


def _record_intermediate_saves(method: Any, folder: Path) -> set[Path]:
    """Wrap ``method.save`` so that the returned set fills with every file its intermediate (``--save-every``)
    saves write under ``folder``: what the method's :meth:`~sdcore.train.method.TrainingMethod.saved_files` must
    name, companions included (APT's ``-neg``, TI's ``--format`` copy)."""
    written: set[Path] = set()
    save = method.save

    def recording_save(bundle: Any, info: Any) -> Any:
        before = _result_files(folder)
        result = save(bundle, info)
        if not info.final:
            written.update(_result_files(folder) - before)
        return result

    method.save = recording_save
    return written


def check_resume(
    method_class: type, tmp_path: Path, overrides: dict[str, Any] | None = None, *, family: str = "sd1", steps: int = 4
) -> None:
    """``steps`` steps in one go == ``steps/2``, Ctrl-C, ``--resume latest``: identical weights. The Ctrl-C also
    leaves the weights of step ``steps/2`` where ``--save-every`` puts them, in the method's own files (TI's
    ``embeddings/NAME-STEP.pt``, APT's pair with its ``-neg``, a hypernetwork's ``.pt``, a whole DreamBooth model):
    each holds the tensors the uninterrupted run's ``--save-every`` file of that step holds. With ``--save-limit 1``
    and a ``--save-every`` step after the Ctrl-C, the resumed run deletes every one of those files (the method's
    :meth:`~sdcore.train.method.TrainingMethod.saved_files` names them all) and keeps its own step's."""
    import torch

    from ..train.loop import train

    base = {"max_steps": steps, "lr": 5e-3, "batch_size": 1, **(overrides or {})}
    half = max(1, steps // 2)
    full_opts = contract_options(method_class, tmp_path, {"save_every": half, **base}, family=family, tag="full")
    full = method_class(full_opts)
    step_files = _record_intermediate_saves(full, tmp_path / "full")  # all the files of step ``half``'s save
    train(full, bundle=_bundle(family))

    # a --save-every step after the Ctrl-C (none when the run has no step left between): --save-limit 1 then
    # prunes the Ctrl-C's files in the resumed run
    later = half + 1 if half + 1 < steps else None
    retention = {"save_every": later, "save_limit": 1} if later else {}
    part_opts = contract_options(method_class, tmp_path, {**retention, **base}, family=family, tag="parts")
    interrupted: KeyboardInterrupt | None = None
    try:
        train(
            method_class(part_opts),
            bundle=_bundle(family),
            plugin_manager=plugin_manager_with(_StopAt(half)),
        )
    except KeyboardInterrupt as exc:
        interrupted = exc
    assert interrupted is not None, "the KeyboardInterrupt raised in a hook did not propagate"
    _check_interrupt_weights(interrupted, tmp_path / "parts", tmp_path / "full", half, step_files)
    resume_opts = dataclasses.replace(part_opts, resume="latest")
    resumed = method_class(resume_opts)
    later_files = _record_intermediate_saves(resumed, tmp_path / "parts")  # the resumed run's step ``later``
    result = train(resumed, bundle=_bundle(family))
    assert result.steps == steps
    if later and part_opts.save_every == later and part_opts.save_limit == 1:
        left = _result_files(tmp_path / "parts")
        assert not left & step_files, (
            f"--save-limit 1 kept the Ctrl-C's files of step {half} after the resumed run saved step {later}: "
            f"{sorted(left & step_files)} (saved_files must name every file save writes)"
        )
        assert later_files and later_files <= left, f"step {later}'s save {sorted(later_files)}, left {sorted(left)}"
    a, b = full.trainable_state_dict(), resumed.trainable_state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key].cpu(), b[key].cpu()), f"resumed run differs at {key}"


def _saved_tensors(path: Path) -> dict[str, Any]:
    """Every tensor of a saved result (safetensors, or a torch pickle of nested dicts and lists), by its key path."""
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return dict(load_file(str(path)))
    from ..models.safe_pickle import load_pickle

    found: dict[str, Any] = {}

    def walk(value: Any, key: str) -> None:
        if isinstance(value, torch.Tensor):
            found[key] = value
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{key}/{k}")
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(v, f"{key}/{i}")

    walk(load_pickle(path), "")
    return found


def _result_files(folder: Path) -> set[Path]:
    """The files under ``folder`` outside the state folders, relative to it."""
    return {
        path.relative_to(folder)
        for path in folder.rglob("*")
        if path.is_file() and not any(part.endswith("-state") for part in path.relative_to(folder).parts)
    }


def _check_interrupt_weights(
    interrupted: BaseException, parts: Path, full: Path, step: int, step_files: set[Path]
) -> None:
    """The interrupted run (folder ``parts``) wrote the weights of ``step`` as the uninterrupted ``full`` run's
    ``--save-every`` did (``step_files``): the same files beside the result, with the same tensors."""
    import torch

    weights = getattr(interrupted, "sdcore_weights", None)
    assert weights is not None and Path(weights).is_file(), (
        f"Ctrl-C after step {step} wrote no weights file: {getattr(interrupted, 'sdcore_saved', None)}"
    )
    assert str(weights) in interrupted.sdcore_saved, interrupted.sdcore_saved  # type: ignore[attr-defined]
    written = _result_files(parts)
    assert Path(weights).relative_to(parts) in written
    assert written == step_files, f"Ctrl-C wrote {sorted(written)}, --save-every {step} {sorted(step_files)}"
    for relative in sorted(written):
        step_save = full / relative
        got, want = _saved_tensors(parts / relative), _saved_tensors(step_save)
        assert got.keys() == want.keys(), f"{relative}: other tensors than --save-every's"
        for key in want:
            assert torch.equal(got[key], want[key]), f"{relative}: {key} differs from --save-every's file"


def check_determinism(
    method_class: type, tmp_path: Path, overrides: dict[str, Any] | None = None, *, family: str = "sd1"
) -> None:
    """Two runs with the same seed and options give bit-identical trained tensors on the CPU,
    also when the second one reads a copy of the dataset from another folder."""
    import shutil

    import torch

    from ..train.loop import train

    states = []
    for tag in ("det-a", "det-b"):
        values = {"max_steps": 2, "lr": 5e-3, "save_state": False, **(overrides or {})}
        options = contract_options(method_class, tmp_path, values, family=family, tag=tag)
        if tag == "det-b":  # the same images elsewhere: nothing may depend on where the dataset lives
            moved = tmp_path / "moved" / "data"
            shutil.copytree(options.data, moved)
            options.data = str(moved)
        method = method_class(options)
        train(method, bundle=_bundle(family))
        states.append(method.trainable_state_dict())
    a, b = states
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key].cpu(), b[key].cpu()), f"two identical runs differ at {key}"


def run_method_contract(
    method_class: Any,
    overrides: dict[str, Any] | None = None,
    *,
    family: str = "sd1",
    tmp_path: Path | None = None,
) -> None:
    """Every check, in order, each in its own sub-folder of ``tmp_path`` (a temporary folder,
    removed afterwards, when not given). Raises AssertionError naming the first broken promise."""
    import shutil
    import tempfile

    root = Path(tmp_path) if tmp_path is not None else Path(tempfile.mkdtemp(prefix="sdcore-contract-"))
    checks = (check_config_roundtrip, check_one_step, check_learning, check_save_load, check_resume, check_determinism)
    try:
        for check in checks:
            folder = root / check.__name__
            folder.mkdir(parents=True, exist_ok=True)
            check(method_class, folder, overrides, family=family)
    finally:
        if tmp_path is None:
            shutil.rmtree(root, ignore_errors=True)


def concept_options(method_class: Any, tmp_path: Path, overrides: dict[str, Any] | None = None) -> Any:
    """Options for a short CPU run of ``method_class`` on the toy world's base model (32x32)."""
    from .toyworld import IMAGE_SIZE

    values = {
        "model": "toyworld:",
        "resolution": IMAGE_SIZE,
        "min_bucket_reso": IMAGE_SIZE,
        "max_bucket_reso": 2 * IMAGE_SIZE,
        "bucket_step": IMAGE_SIZE,
        "batch_size": 4,
        "save_state": False,
        **(overrides or {}),
    }
    return contract_options(method_class, tmp_path, values, tag="concept")


_TOYWORLD_BASE: list[Any] = []


def toyworld_bundle() -> Any:
    """A fresh copy of the toy world's base model (read once per process)."""
    import copy

    from ..models.load import load_model

    if not _TOYWORLD_BASE:
        _TOYWORLD_BASE.append(load_model("toyworld:"))
    return copy.deepcopy(_TOYWORLD_BASE[0])


def check_concept_learning(
    method_class: type,
    tmp_path: Path,
    overrides: dict[str, Any] | None = None,
    *,
    concept: Any = None,
    margin: float = 0.5,
    steps: int = 100,
    images: int = 8,
    n: int = 8,
    prompt: str | None = None,
) -> tuple[float, float]:
    """Teach ``concept`` (default: a purple ring named ``sks``, :data:`toyworld.concepts.NEW_OBJECT`)
    from ``images`` pictures in ``steps`` steps; the concept score of ``n`` fixed-seed samples must
    rise by at least ``margin``. Returns (before, after).

    ``concept`` is any kind of :mod:`sdcore.testing.toyworld.concepts` (an object named by a
    trigger, or a :class:`~sdcore.testing.toyworld.concepts.StyleConcept` scored on world prompts);
    ``prompt`` replaces the concept's own prompts. The trained model is sampled inside the method's
    ``sampling(bundle)`` context with what it yields (``networks`` that expand a learnt word, a
    ``negative_prompt``, a ``cfg``), exactly as the runtime renders its sample images."""
    from ..train.loop import TrainSession
    from .toyworld.concepts import NEW_OBJECT, concept_score_of

    concept = concept if concept is not None else NEW_OBJECT
    data = tmp_path / "concept-data"
    concept.write_dataset(data, count=images)
    options = concept_options(method_class, tmp_path, {"data": str(data), "max_steps": steps, **(overrides or {})})
    bundle = toyworld_bundle()
    before = concept_score_of(bundle, concept, prompt=prompt, n=n)
    method = method_class(options)
    session = TrainSession(method, bundle=bundle)
    session.setup()
    session.run()
    import torch

    with torch.no_grad(), method.sampling(bundle) as extra:  # type: ignore[attr-defined]
        known = {k: extra[k] for k in ("networks", "negative_prompt", "cfg") if k in extra}
        after = concept_score_of(bundle, concept, prompt=prompt, n=n, **known)
    assert after >= before + margin, (
        f"{method_class.__name__} did not teach {concept.description!r} ({concept.trigger}): concept score "
        f"{before:.2f} -> {after:.2f} after {steps} steps, the method declares a rise of at least {margin:.2f}"
    )
    return before, after


def _concept_test(self: Any, tmp_path: Path) -> None:
    check_concept_learning(
        self._cls(),
        tmp_path,
        {**self.options, **self.toyworld_options},
        concept=self.toyworld_concept,
        margin=self.toyworld_margin,
        steps=self.toyworld_steps,
        images=self.toyworld_images,
        n=self.toyworld_n,
        prompt=self.toyworld_prompt,
    )


def _flow_min_drop(self: Any, family: str) -> float:
    bar = self.flow_min_drop
    return float(bar[family]) if isinstance(bar, dict) else float(bar)


def _flow_tests(families: tuple[str, ...]) -> tuple[Any, Any]:
    """The two flow-matching tests, parametrized over ``families`` (new functions per class, so
    one class's families never leak into another's marks)."""
    import pytest

    @pytest.mark.parametrize("flow_family", families)
    def test_contract_flow_learning(self: Any, tmp_path: Path, flow_family: str) -> None:
        check_flow_learning(
            self._cls(),
            tmp_path,
            {**self.options, **self.flow_options},
            family=flow_family,
            steps=self.flow_steps,
            min_drop=_flow_min_drop(self, flow_family),
        )

    @pytest.mark.parametrize("flow_family", families)
    def test_contract_flow_untrained(self: Any, tmp_path: Path, flow_family: str) -> None:
        check_flow_learning(
            self._cls(),
            tmp_path,
            {**self.options, **self.flow_options},
            family=flow_family,
            steps=self.flow_steps,
            untrained=True,
        )

    return test_contract_flow_learning, test_contract_flow_untrained


class MethodContractTests:
    """pytest mixin: set ``method_class`` (and ``options``/``family``) in a ``Test*`` subclass.

    The concept-learning check is opt-in: set ``toyworld_concept`` (from
    :mod:`sdcore.testing.toyworld.concepts`: ``NEW_OBJECT`` for a method that changes weights,
    ``KNOWN_COMPOSITION`` for one that learns a word, ``NEW_STYLE`` for a look on every prompt) and
    the rise your method promises (``toyworld_margin``), with the options (``toyworld_options``:
    lr, rank ...; they win over ``options``) and ``toyworld_steps`` that achieve it; the class then
    gains ``test_contract_concept_learning``. ``toyworld_images`` (training pictures),
    ``toyworld_n`` (samples scored) and ``toyworld_prompt`` (instead of the concept's own prompts)
    are there when the defaults do not fit.

    The flow-matching check is opt-in too: set ``flow_families`` (``("sd3", "flux")``), the bar
    ``flow_min_drop`` (a relative drop, one float or one per family) and the ``flow_options`` /
    ``flow_steps`` that reach it; the class gains ``test_contract_flow_learning`` and
    ``test_contract_flow_untrained`` (the lr-0 control), parametrized over the families.
    """

    method_class: type | None = None
    options: dict[str, Any] = {}
    family: str = "sd1"
    learning_steps: int = 40
    learning_min_drop: float = 0.2
    toyworld_concept: Any = None
    toyworld_margin: float = 0.5
    toyworld_steps: int = 100
    toyworld_options: dict[str, Any] = {}
    toyworld_prompt: str | None = None
    toyworld_images: int = 8
    toyworld_n: int = 8
    flow_families: tuple[str, ...] = ()
    flow_options: dict[str, Any] = {}
    flow_steps: int = 20
    flow_min_drop: float | dict[str, float] = 0.2

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.toyworld_concept is not None and "test_contract_concept_learning" not in cls.__dict__:
            cls.test_contract_concept_learning = _concept_test  # type: ignore[attr-defined]
        if cls.flow_families and "test_contract_flow_learning" not in cls.__dict__:
            learning, untrained = _flow_tests(tuple(cls.flow_families))
            cls.test_contract_flow_learning = learning  # type: ignore[attr-defined]
            cls.test_contract_flow_untrained = untrained  # type: ignore[attr-defined]

    def _cls(self) -> type:
        assert self.method_class is not None, "set method_class on the test class"
        return self.method_class

    def test_contract_config_roundtrip(self, tmp_path: Path) -> None:
        check_config_roundtrip(self._cls(), tmp_path, self.options, family=self.family)

    def test_contract_one_step(self, tmp_path: Path) -> None:
        check_one_step(self._cls(), tmp_path, self.options, family=self.family)

    def test_contract_learning(self, tmp_path: Path) -> None:
        check_learning(
            self._cls(),
            tmp_path,
            self.options,
            family=self.family,
            steps=self.learning_steps,
            min_drop=self.learning_min_drop,
        )

    def test_contract_save_load(self, tmp_path: Path) -> None:
        check_save_load(self._cls(), tmp_path, self.options, family=self.family)

    def test_contract_resume(self, tmp_path: Path) -> None:
        check_resume(self._cls(), tmp_path, self.options, family=self.family)

    def test_contract_determinism(self, tmp_path: Path) -> None:
        check_determinism(self._cls(), tmp_path, self.options, family=self.family)
