"""Crash-safe writing, in one place: a file (``atomic_write``) or a whole folder
(``atomic_folder``) appears complete or not at all, even after a kill or a power
cut; what a full disk or a read-only folder raises is one line. Every command's
output folder is held through ``output_folder``: locked against other processes,
new output staged and moved into place, only vico's own earlier output replaced."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Callable, Iterator

from .model import UnreadableFile, UserError


def fsync_path(path: str | Path) -> None:
    """Flush a file's or a folder's data and metadata to disk (a folder: its entries, e.g. after a rename)."""
    if os.name == "nt" and Path(path).is_dir():
        return  # Windows cannot open a folder for fsync; NTFS journals renames
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_errors() -> tuple[type[BaseException], ...]:
    """What a writer raises on a full disk or a read-only folder: OSError, torch's RuntimeError
    (``inline_container.cc ... unexpected pos``) and safetensors' SafetensorError."""
    from safetensors import SafetensorError

    return OSError, RuntimeError, SafetensorError


def describe_error(exc: BaseException) -> str:
    """One short line for an exception (an OSError's strerror, else its message's first line)."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc).strip()
    return (text.splitlines()[0][:200] if text else type(exc).__name__)


def atomic_write(path: Path, write) -> None:
    """Write through a temporary file, fsync it, rename it into place and fsync the folder:
    never a half-written file, even after a power cut. A full disk or a read-only folder raises
    a ``UserError`` naming the folder (the previous file, if any, is left as it was)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    except write_errors() as exc:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise UserError(f"cannot write {path.name} in {path.parent}: {describe_error(exc)}; "
                        f"the previous {path.name} there, if any, is unchanged") from exc


def atomic_folder(final: Path, fill: Callable[[Path], None]) -> Path:
    """Build the folder ``final`` through ``fill(tmp)`` on a temporary sibling
    (``.tmp-NAME-PID``), fsync its files and itself, rename it into place and fsync
    the parent. An existing ``final`` is moved aside first (a folder cannot be
    renamed over a full one) and deleted once the new one is in place; on any
    error the temporary folder is removed and the old ``final`` put back."""
    final = Path(final)
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
    old = final.with_name(f".tmp-old-{final.name}-{os.getpid()}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        fill(tmp)
        for f in tmp.iterdir():
            if f.is_file():
                fsync_path(f)
        fsync_path(tmp)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        fsync_path(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not final.exists():
            os.replace(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return final


def load_tensors_only(path: str | Path, what: str, allowed: tuple[type, ...] = ()):
    """``torch.load(path, weights_only=True)``, with the classes in ``allowed`` permitted by name.

    Files users are handed (checkpoints, official concepts) are never unpickled as code: a
    pickle naming any other global is refused. A missing, refused or unreadable file is one
    line naming ``what`` ("checkpoint", "embeddings", ...) and the path."""
    import torch

    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise UnreadableFile(f"{what} file {path} does not exist") from None
    except Exception as exc:
        text = str(exc).strip()
        if "GLOBAL" in text:  # a pickle naming code to run: refuse, never fall back quietly
            blocked = next((line.strip() for line in text.splitlines() if "GLOBAL" in line), "")
            raise UserError(f"refusing to load {what} file {path}: it names code, not just tensors "
                            f"({blocked[:200]})") from None
        reason = text.split(". ")[0].splitlines()[0][:200] if text else type(exc).__name__
        if "Weights only load failed" in reason:
            reason = "not a torch file"
        raise UnreadableFile(f"{what} file {path} is unreadable ({reason}): truncated or corrupt") from None


LOCK_FILE = ".vico-lock"  # flock'ed by the command writing the folder (fused._locks), holds its PID
WRITTEN_FILE = ".vico-written"  # JSON list of the entries vico wrote in the folder: all it may ever remove
STAGING_PREFIX = ".vico-tmp-"  # new output is built here (same file system) and moved into place
_OWN = (LOCK_FILE, WRITTEN_FILE)


class OutputFolder:
    """A folder a command writes, held under its lock for the command's run (``output_folder``).

    New entries are written into ``staging()`` (a hidden folder inside, so on the same file system)
    and moved into place by ``commit``; ``.vico-written`` lists what vico put there, which is the
    only thing a later run ever removes. Removal unlinks symlinks and never descends through them,
    so nothing outside the folder is touched.
    """

    def __init__(self, path: Path, option: str, exclusive: bool):
        self.path, self.option, self.exclusive = path, option, exclusive
        self._staging: Path | None = None

    # --- the record of what vico wrote ------------------------------------
    def written(self) -> list[str]:
        """Entry names (no separators) that vico recorded writing here."""
        import json

        try:
            names = json.loads((self.path / WRITTEN_FILE).read_text())
        except (OSError, ValueError):
            return []
        if not isinstance(names, list):
            return []
        return [n for n in names if isinstance(n, str) and n not in ("", ".", "..") and "/" not in n
                and "\\" not in n and n not in _OWN]

    def _record(self, names: list[str]) -> None:
        import json

        text = json.dumps(sorted(set(names)), indent=0)
        atomic_write(self.path / WRITTEN_FILE, lambda p: p.write_text(text))

    def foreign(self) -> list[str]:
        """Visible entries in the folder that vico did not write (hidden ones, e.g. a file manager's
        ``.DS_Store``, are left alone and never read as output)."""
        ours = set(self.written())
        return sorted(p.name for p in self.path.iterdir() if p.name not in ours and not p.name.startswith("."))

    def check_replaceable(self, name: str) -> None:
        """One line when ``name`` exists here and vico did not write it (it would be lost)."""
        target = self.path / name
        if (target.exists() or target.is_symlink()) and name not in self.written():
            raise UserError(f"{self.option} {target} exists and was not written by vico; refusing to replace it "
                            f"(move it away or choose another {self.option})")

    def _remove(self, name: str) -> None:
        target = self.path / name
        if target.is_symlink() or not target.is_dir():
            target.unlink(missing_ok=True)
        else:
            shutil.rmtree(target)

    # --- writing ------------------------------------------------------------
    def staging(self) -> Path:
        """A fresh hidden folder to write the new output into (moved into place by ``commit``)."""
        if self._staging is None:
            self._staging = self.path / f"{STAGING_PREFIX}{os.getpid()}"
            self._staging.mkdir()
        return self._staging

    def replace(self, names: list[str]) -> None:
        """Before writing ``names`` straight into the folder (output that records its own location, e.g. a
        concept's training-images path): record them, and remove what vico wrote here before."""
        old = self.written()
        self._record(old + names)  # a run killed from here on still has both sets recorded
        for name in old:
            self._remove(name)
        self._record(list(names))

    def commit(self) -> list[str]:
        """Move the staged entries into place. An exclusive folder first loses everything vico wrote there
        before (so no stale image of an earlier run stays); a shared one only the entries replaced."""
        if self._staging is None:
            return []
        new = sorted(p.name for p in self._staging.iterdir())
        for name in new:  # something put there during the run is not replaced either
            self.check_replaceable(name)
        old = self.written()
        self._record(old + new)
        for name in (old if self.exclusive else [n for n in old if n in new]):
            self._remove(name)
        for name in new:
            os.replace(self._staging / name, self.path / name)
        self._record(new if self.exclusive else old + new)
        fsync_path(self.path)
        self._staging.rmdir()
        self._staging = None
        return new

    def _discard_staging(self) -> None:
        for stale in self.path.glob(f"{STAGING_PREFIX}*"):  # ours, or a killed run's: we hold the lock
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
        self._staging = None


@contextlib.contextmanager
def output_folder(path: str | Path, option: str = "--out", exclusive: bool = True) -> Iterator[OutputFolder]:
    """Hold the output folder ``path`` for a command's run: created if missing, locked against every other
    vico process (a one-line error naming the holder's PID; a dead holder's lock is taken over).

    ``exclusive``: the folder holds this command's output only, so a folder with entries vico did not write
    is refused and ``commit`` replaces all of vico's earlier output there. Otherwise (a training run's
    folder, the folder of an ``eval --out`` report) other entries stay and only replaced names are checked.
    Staging left by an error is removed; a folder this call created is removed again when it stays empty.
    """
    from fused._locks import LockHeld, exclusive_lock

    from .model import check_output_folder

    path = check_output_folder(path, option)
    created = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{option} {path} cannot be created: {describe_error(exc)}") from None
    try:
        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(exclusive_lock(path / LOCK_FILE, remove=True))
            except LockHeld as exc:
                raise UserError(f"{option} {path} is in use by another vico process (pid {exc.pid}); wait for it "
                                f"to finish or choose another {option}") from None
            except OSError as exc:
                raise UserError(f"{option} {path}: cannot lock it ({describe_error(exc)})") from None
            folder = OutputFolder(path, option, exclusive)
            stack.callback(folder._discard_staging)
            folder._discard_staging()
            if exclusive and folder.foreign():
                raise UserError(f"{option} {path} holds {folder.foreign()[0]}, which vico did not write there; "
                                f"choose an empty or new {option} (vico only replaces its own output)")
            yield folder
    finally:
        if created and path.is_dir() and not any(path.iterdir()):
            path.rmdir()
