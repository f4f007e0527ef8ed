"""Atomic file writing: every file sdcore writes appears whole or not at all.

Write to a temporary name in the same folder, flush and fsync, then ``os.replace`` over the final
name. A crash, a kill or a full disk leaves the previous file intact and at worst a stray
``.tmp`` file, which the next write replaces.

The finished file gets the mode an ordinary ``open()`` would give it under the process umask
(0644 with umask 022): ``mkstemp`` makes 0600 files, which a webui running as another user
cannot read, so the mode is set before the rename, whatever the writer did to the file.

A file whose mode lets no one write it (``chmod a-w``, how users guard hand-written captions) is never
replaced: ``os.replace`` needs only the folder's permission, so without :func:`read_only_problem` an
atomic write would take it away where a plain ``open()`` would have failed.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from .errors import SdcoreError


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux ``/proc``)."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)  # elsewhere: the classic swap (not atomic across threads, but restored at once)
    os.umask(mask)
    return mask


def default_mode(*, directory: bool = False) -> int:
    """The mode ``open()`` (``0o666``) or ``mkdir()`` (``0o777``) gives a new entry under the umask."""
    return (0o777 if directory else 0o666) & ~current_umask()


def apply_default_modes(root: str | os.PathLike[str]) -> None:
    """Give ``root`` and everything below it the modes ``open()``/``mkdir()`` would under the umask.

    For folders built by other libraries' writers (``save_pretrained`` makes 0600 files through its
    own temporary files) before they are moved into place.
    """
    file_mode, dir_mode = default_mode(), default_mode(directory=True)
    top = Path(root)
    os.chmod(top, dir_mode if top.is_dir() else file_mode)
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames:
            os.chmod(Path(dirpath) / name, dir_mode)
        for name in filenames:
            path = Path(dirpath) / name
            if not path.is_symlink():
                os.chmod(path, file_mode)


def read_only_problem(path: str | os.PathLike[str]) -> str | None:
    """Why an existing ``path`` must not be replaced, or None: its mode gives no one write permission. Read
    from the mode bits, not ``os.access``, so the answer is the same for root (who may write anything) as for
    the user who made the file read-only to keep it."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if not stat.S_ISREG(mode) or mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH):
        return None
    return (
        f"{path} is read-only (mode {stat.filemode(mode)}): left as it is; make it writable (chmod u+w) to replace it"
    )


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed to ``path``.

    For writers that insist on a file name (``safetensors.torch.save_file``, ``Image.save``).
    On error the temporary file is removed and the old ``path`` is untouched; a read-only ``path``
    (:func:`read_only_problem`) is refused before anything is written.
    """
    target = Path(path)
    refused = read_only_problem(target)
    if refused:
        raise SdcoreError(refused)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, default_mode())  # mkstemp made it 0600 (and some writers recreate the file)
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise SdcoreError(
            f"could not write {target}: {exc.strerror or exc} (the previous file, if any, is intact)"
        ) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "w", **kwargs: Any) -> Iterator[IO[Any]]:
    """``open()`` for writing, atomically (``mode`` is ``"w"`` or ``"wb"``)."""
    if mode not in ("w", "wb"):
        raise ValueError("atomic_open writes only ('w' or 'wb')")
    if mode == "w":
        kwargs.setdefault("encoding", "utf-8")
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as handle:
        yield handle
        handle.flush()


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_open(path, "w") as handle:
        handle.write(text)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_open(path, "wb") as handle:
        handle.write(data)


def atomic_save(path: str | os.PathLike[str], writer: Callable[[Path], Any]) -> Path:
    """Call ``writer(tmp_path)`` and move the result to ``path``; returns ``Path(path)``."""
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)


def free_path(path: Path, twins: Sequence[str] = ()) -> Path:
    """``path``, or ``<stem>-2<suffix>``, ``-3`` ... when it is taken: never replacing a file is the rule of the
    images sdcore writes on its own (a resumed run that renders a training sample step, or ``final``, again keeps
    the earlier run's images; ``generate``'s PNG fallback of an image its format cannot hold). ``twins``: other
    suffixes (``.txt`` ...) that must be free beside the candidate too, so a file and its captions keep one stem."""
    candidate, number = path, 1
    while candidate.exists() or any(candidate.with_suffix(twin).exists() for twin in twins):
        number += 1
        candidate = path.with_name(f"{path.stem}-{number}{path.suffix}")
    return candidate


#: the characters A1111 keeps in an embedding's or a hypernetwork's name, which is also its file stem
_FILE_STEM = re.compile(r"^[\w.\- ]+$")


def file_stem_problem(name: str, option: str = "--name") -> str | None:
    """Why ``name`` cannot be a result's file stem (A1111's letters, digits and "._- "; a '/' or '..' would
    put the file outside its folder), or ``None``."""
    if not _FILE_STEM.match(name) or name.strip(" .") == "":
        return f"{option} {name!r}: use letters, digits, '.', '_', '-' and spaces only"
    return None


def same_place(a: Path, b: str) -> bool:
    """Whether ``b`` (a file, folder or a source such as ``tiny:sd1``) names the same place as ``a``."""
    other = Path(b)
    try:
        if a.exists() and other.exists():
            return a.samefile(other)
    except OSError:
        pass
    return a.expanduser().resolve() == other.expanduser().resolve()


#: the ``--overwrite`` flag of the commands that write a result file or model (``output_problems``' rule)
OVERWRITE_HELP = "Replace the output if it already exists (else that is an error, found before any work)."


def output_problems(
    outputs: Sequence[Path],
    *,
    inputs: Sequence[str] = (),
    overwrite: bool,
    option: str = "-o",
    folder_ok: bool = False,
) -> list[str]:
    """The rule of every command that writes a file, checked before any work: an output that is one of the
    ``inputs`` is always refused (it would be replaced while it is still needed, and the original lost), an
    existing output is refused unless ``--overwrite``. An existing folder is refused too unless ``folder_ok`` (a
    diffusers model is written as one): ``--overwrite`` can not put a file there, so that advice would be wrong
    (``-o ""`` is the current folder). One line per problem (empty when all is well); ``option`` is how the
    command names its output (``-o``, or an argument such as ``DST``). A read-only existing output
    (:func:`read_only_problem`) is refused even with ``--overwrite``."""
    problems, refused = [], set()
    for out in outputs:
        same = [source for source in inputs if same_place(out, source)]
        if same:
            refused.add(out)
            problems.append(
                f"{option} {out} is the input {same[0]}: the result cannot replace a file it is made from; "
                f"choose another {option}"
            )
        elif not folder_ok and out.is_dir():
            refused.add(out)
            problems.append(f"{option} {str(out)!r} is a folder: name the file to write (a path inside it)")
    existing = [str(out) for out in outputs if out not in refused and out.exists()]
    guarded = {out: problem for out in existing if (problem := read_only_problem(out))}
    problems.extend(guarded.values())  # --overwrite would not reach it (the atomic write refuses it): not advised
    existing = [out for out in existing if out not in guarded]
    if existing and not overwrite:  # an earlier file is never replaced in silence
        verb, it = ("exists", "it") if len(existing) == 1 else ("exist", "them")
        problems.append(
            f"{', '.join(existing)} already {verb}; pass --overwrite to replace {it}, or choose another {option}"
        )
    return problems


def cache_dir() -> Path:
    """Where sdcore keeps files it can always rebuild (tokenizer files, the toy world's CLIP):
    ``$SDCORE_CACHE_DIR``, else ``$XDG_CACHE_HOME/sdcore``, else ``~/.cache/sdcore``."""
    base = os.environ.get("SDCORE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "sdcore"
    )
    return Path(base)
