"""Every check of the monorepo, with sessions generated from ``packages/*``.

- ``nox -s ci``: what CI runs (lint + every test suite, in the current environment, fast);
- ``nox -s tests``: each package's tests in its own virtualenv (proves it installs on its own);
- ``nox -s integration``: all packages installed, the root ``tests/``;
- ``nox -s lint`` / ``typecheck`` / ``demo`` / ``bench`` / ``quality`` / ``toyworld``.

Installs always go through ``constraints.txt`` (torch pinned to the local CPU build).
"""

from __future__ import annotations

import sys
from pathlib import Path

import nox

ROOT = Path(__file__).parent
sys.path.insert(0, str(ROOT / "scripts"))
from package_order import first_party_dependencies, package_order  # noqa: E402

CONSTRAINTS = ("-c", str(ROOT / "constraints.txt"))
PACKAGES = sorted(p.parent.name for p in ROOT.glob("packages/*/pyproject.toml") if not p.parent.name.startswith("_"))
_DEPS = first_party_dependencies(ROOT)
nox.options.sessions = ["lint", "integration"]
nox.options.reuse_existing_virtualenvs = True


def _install(session: nox.Session, *packages: str) -> None:
    """Install ``packages`` and the first-party packages they need, dependencies first."""
    session.install(*CONSTRAINTS, "torch==2.13.0")
    needed = set(packages)
    order = package_order(ROOT)
    for name in reversed(order):  # close over first-party dependencies
        if name in needed:
            needed |= set(_DEPS[name])
    args = [arg for name in order if name in needed for arg in ("-e", f"packages/{name}[test]")]
    session.install(*CONSTRAINTS, *args, "-r", "requirements-dev.txt")


@nox.session(python=False)
def ci(session: nox.Session) -> None:
    """Lint and type-check, then every package's tests and the integration tests, in the current environment."""
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("mypy", *[f"packages/{p}/src" for p in PACKAGES])
    suites = [f"packages/{p}/tests" for p in PACKAGES] + ["tests"]
    workers, env = test_workers()
    # --durations: CI's log names the slowest tests, so the run's time (aim: under 15 minutes) can be kept
    session.run(
        "python", "-m", "pytest", *suites, "-q", "-p", "no:cacheprovider", "--durations=25", *workers,
        *session.posargs, env=env,
    )  # fmt: skip


def test_workers() -> tuple[list[str], dict[str, str]]:
    """pytest-xdist arguments and environment for ``nox -s ci``: one worker per core (at most 4), each
    with one torch thread, and each test file whole on one worker (its module fixtures built once).

    Why: most tests drive tiny models, where torch's second thread buys little and a second process
    doubles the throughput (2 cores: 8.3 min instead of 14). One core, or ``SDCORE_TEST_WORKERS=1``:
    a plain serial run."""
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    count = int(os.environ.get("SDCORE_TEST_WORKERS") or min(4, cores))
    if count <= 1:
        return [], {}
    return ["-n", str(count), "--dist", "loadfile"], {"OMP_NUM_THREADS": "1"}


@nox.session
@nox.parametrize("package", PACKAGES, ids=PACKAGES)
def tests(session: nox.Session, package: str) -> None:
    """One package in its own environment: catches undeclared dependencies between packages."""
    _install(session, package)
    session.run("pytest", f"packages/{package}/tests", "-q", *session.posargs)


@nox.session
def integration(session: nox.Session) -> None:
    """Every package installed together: the CLI surface, name conflicts, interop."""
    _install(session, *PACKAGES)
    session.run("pytest", "tests", "-q", *session.posargs)
    session.run("sdcore", "plugins")


@nox.session
def lint(session: nox.Session) -> None:
    session.install(*CONSTRAINTS, "ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    _install(session, *PACKAGES)
    session.run("mypy", *[f"packages/{p}/src" for p in PACKAGES])


@nox.session
def demo(session: nox.Session) -> None:
    """The README's main job on the built-in tiny model (tag, train a LoCon, render samples)."""
    _install(session, *PACKAGES)
    session.run("python", "scripts/demo.py", *session.posargs)


@nox.session
def quality(session: nox.Session) -> None:
    """Learning quality on the toy world: every method on its concept, beside a diffusers + peft anchor
    (benchmarks/bench_quality.py; ``nox -s quality -- -- --sweep --seeds 3`` for the lr x steps sweep)."""
    _install(session, *PACKAGES)
    session.run("python", "-m", "benchmarks", "quality", *session.posargs)


@nox.session
def toyworld(session: nox.Session) -> None:
    """Rebuild the toy world's base model in a temporary folder (about 10-20 minutes on 2 cores) and check
    that it reproduces the shipped model's accuracy (``python -m sdcore.testing.toyworld check``)."""
    _install(session, "sdcore")
    session.run("python", "-m", "sdcore.testing.toyworld", "check", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """Side-by-side benchmarks (never part of the test suite); see benchmarks/README.md."""
    _install(session, *PACKAGES)
    session.run("python", "-m", "benchmarks", *session.posargs)
