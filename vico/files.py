"""Crash-safe writing, in one place: a file (``atomic_write``) or a whole folder
(``atomic_folder``) appears complete or not at all, even after a kill or a power
cut; what a full disk or a read-only folder raises is one line."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

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
