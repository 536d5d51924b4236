"""Files, safely: atomic writes with the umask's modes, one exclusive writer per folder, and
every file-format error as one line naming the file and what to do.

Everything synthprune writes goes through :func:`atomic_write` (a temporary name in the same
folder, ``fsync``, ``os.replace``), so an interrupted write never leaves a half-written file;
:func:`clean_temporaries` removes what a killed writer left. Everything it reads from a file a
user may have edited, truncated or replaced goes through the readers here, which raise
:class:`FileFormatError` -- ``"<file>: <what is wrong>; <what to do>"`` -- instead of whatever
YAML, JSON, safetensors, ``torch.load`` or ``csv`` raised. The command line prints that as
``error: ...`` and exits with code 2.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import tempfile
from pathlib import Path

import torch
import yaml

__all__ = [
    "FileFormatError", "FolderLock", "FolderLockedError", "atomic_write", "clean_temporaries", "load_safetensors",
    "load_torch", "read_csv_rows", "read_json", "read_yaml",
]

TEMPORARY = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")  # what atomic_write's mkstemp names look like


class FileFormatError(ValueError):
    """A file is missing, unreadable, truncated or not what it should be. ``str()`` is the
    one line the command line prints: ``<file>: <what is wrong>; <what to do>``."""

    def __init__(self, path: str | Path, problem: str, todo: str) -> None:
        self.path, self.problem, self.todo = Path(path), problem, todo
        super().__init__(f"{path}: {problem}; {todo}")


def _umask() -> int:
    """The process umask, read without changing it where the OS allows (threads may be writing)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, data: bytes | str) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and ``os.replace``.

    The file gets the mode an ordinary ``open()`` would give (``0o666`` less the umask), not
    ``mkstemp``'s ``0o600``: a model others deploy must be readable by them."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as handle:
            handle.write(data.encode() if isinstance(data, str) else data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def clean_temporaries(folder: str | Path, recursive: bool = True) -> list[Path]:
    """Remove the temporary files a killed :func:`atomic_write` left in ``folder`` (and its
    sub-folders); call it only while holding the folder's :class:`FolderLock` (a live writer's
    file looks the same). Returns what it removed."""
    removed = []
    for path in (Path(folder).rglob if recursive else Path(folder).glob)(".*.tmp"):
        if path.is_file() and TEMPORARY.match(path.name):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


class FolderLockedError(ValueError):
    """Another process holds the folder's lock."""


class FolderLock:
    """An exclusive, non-blocking lock on a folder (``flock`` on ``<folder>/.lock``), held by
    one process while it writes the folder. The kernel releases it when the process ends, even
    by SIGKILL, so a crash never leaves a folder locked. The file holds the holder's pid, for
    the message a second writer gets."""

    def __init__(self, folder: str | Path, what: str = "run directory") -> None:
        self.folder, self.what = Path(folder), what
        self.path = self.folder / ".lock"
        self._fd: int | None = None

    def holder(self) -> str:
        """The pid written by the process that holds (or last held) the lock, or ``"?"``."""
        try:
            return self.path.read_text().strip() or "?"
        except OSError:
            return "?"

    def is_held_elsewhere(self, patience: float = 0.0) -> bool:
        """Whether another process holds the lock (without keeping it), after waiting up to
        ``patience`` seconds for it to go (a process just killed takes a moment to let go)."""
        import time

        if self._fd is not None or not self.path.exists():
            return False
        deadline = time.monotonic() + patience
        while True:
            try:
                self.acquire()
            except FolderLockedError:
                if time.monotonic() >= deadline:
                    return True
                time.sleep(0.05)
                continue
            self.release()
            return False

    def acquire(self, wait: bool = False) -> FolderLock:
        """Take the lock; with ``wait``, block until its holder lets go instead of raising."""
        import fcntl

        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            raise FolderLockedError(
                f"{self.folder}: this {self.what} is being written by another process (pid {self.holder()}); "
                "wait for it to end, stop it, or choose another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # the file stays: unlinking a lock file races with the next taker
            self._fd = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_bytes(path: Path, todo: str, content: bool = True) -> bytes:
    """The file's bytes (``b""`` when ``content`` is false: only that it can be opened for
    reading, before a library that reads it itself gives a vaguer error)."""
    try:
        if not content:
            path.open("rb").close()
            return b""
        return path.read_bytes()
    except FileNotFoundError:
        raise FileFormatError(path, "not found", todo) from None
    except OSError as exc:
        raise FileFormatError(path, f"cannot read it ({exc.strerror or exc})", todo) from None


def read_yaml(path: str | Path, todo: str, mapping: bool = True) -> object:
    """A YAML file's content (a mapping when ``mapping``)."""
    path = Path(path)
    try:
        content = yaml.safe_load(_read_bytes(path, todo))
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise FileFormatError(path, f"not valid YAML{at} ({getattr(exc, 'problem', None) or exc})", todo) from None
    if mapping and not isinstance(content, dict):
        raise FileFormatError(path, f"must be a YAML mapping of settings, not {type(content).__name__}", todo)
    return content


def read_json(path: str | Path, todo: str) -> dict:
    """A JSON file holding an object."""
    path = Path(path)
    try:
        content = json.loads(_read_bytes(path, todo))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FileFormatError(path, f"not valid JSON ({exc})", todo) from None
    if not isinstance(content, dict):
        raise FileFormatError(path, f"must hold a JSON object, not {type(content).__name__}", todo)
    return content


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """``safetensors.torch.save``, but the same bytes for the same tensors and metadata: the
    library writes the metadata in an order that changes from process to process (a Rust
    ``HashMap``), so re-saving an unchanged record (a run's final wiring) used to change the
    file. The header is rewritten with the metadata sorted, padded to 8 bytes as the format
    wants; the tensors' bytes and offsets are untouched."""
    from safetensors.torch import save

    data = save(tensors, metadata=metadata)
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data[8 + length:]


def load_safetensors(path: str | Path, todo: str, device: str = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of a safetensors file."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    _read_bytes(path, todo, content=False)  # missing / unreadable: say so before safetensors does
    try:
        with safe_open(str(path), framework="pt", device=device) as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 - not a dict
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise FileFormatError(path, f"not a readable safetensors file ({exc})", todo) from None
    return tensors, metadata


def load_torch(path: str | Path, todo: str, map_location: str | torch.device = "cpu") -> dict:
    """A ``torch.save`` file loaded with ``weights_only=True`` (no code in it runs); a dict."""
    path = Path(path)
    _read_bytes(path, todo, content=False)
    try:
        content = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many kinds for truncated, foreign or malicious files
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise FileFormatError(path, f"cannot load it ({exc.__class__.__name__}: {reason[:200]})", todo) from None
    if not isinstance(content, dict):
        raise FileFormatError(path, f"holds a {type(content).__name__}, not a checkpoint", todo)
    return content


def read_csv_rows(path: str | Path, todo: str, required: tuple[str, ...] = ()) -> list[dict[str, str]]:
    """The rows of a CSV file with a header; every row must have every column, and the header
    must hold ``required``."""
    path = Path(path)
    try:
        text = _read_bytes(path, todo).decode()
    except UnicodeDecodeError:
        raise FileFormatError(path, "not a text file", todo) from None
    rows = list(csv.reader(text.splitlines()))
    header = rows[0] if rows else []
    missing = [name for name in required if name not in header]
    if missing:
        raise FileFormatError(path, f"has no column(s) {', '.join(missing)}", todo)
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise FileFormatError(path, f"line {line} has {len(row)} cells, the header {len(header)}", todo)
    return [dict(zip(header, row, strict=True)) for row in rows[1:]]
