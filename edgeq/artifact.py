"""Artifact folders appear whole or not at all: everything is written to a hidden partial folder
beside the destination and renamed into place at the end.

A failed run deletes its partial folder, except when it was interrupted (Ctrl-C, SIGTERM) or crashed
after recording finished blocks for ``--resume`` (``edgeq.resume``): that one stays, hidden, for
the resumed run to continue in."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from edgeq.errors import EdgeqError

# the errors of a full disk or quota: the user frees space and runs again
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
# a partial folder's resume records (edgeq.resume); one holding a journal is kept on interruption
RESUME_DIR = ".resume"
JOURNAL_FILE = f"{RESUME_DIR}/journal.json"


def partial_folders(out: Path) -> list[Path]:
    """The partial folders of earlier runs into ``out`` that recorded finished blocks, newest first."""
    if not out.parent.is_dir():
        return []
    found = [p for p in out.parent.glob(f".{out.name}.partial-*") if (p / JOURNAL_FILE).is_file()]
    return sorted(found, key=lambda p: (p / JOURNAL_FILE).stat().st_mtime, reverse=True)


def check_destination(out: Path, overwrite: bool) -> None:
    """``out`` can become the artifact folder: free (or ``overwrite``), and its nearest existing
    parent a folder this process can create entries in (tried, not guessed from permission bits,
    which root and read-only mounts both defeat)."""
    if out.exists() and not overwrite:
        raise EdgeqError(f"output folder {out} already exists (pass --overwrite to replace it)")
    if out.exists() and not out.is_dir():
        raise EdgeqError(f"output path {out} exists and is not a folder")
    ancestor = out.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise EdgeqError(f"cannot write {out}: {ancestor} is a file, not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=ancestor))
    except OSError as err:
        raise EdgeqError(f"cannot write {out}: {ancestor} is not writable ({err.strerror})") from None


@contextlib.contextmanager
def atomic_folder(out: Path, overwrite: bool = False, reuse: Path | None = None) -> Iterator[Path]:
    """Yield a partial folder (``reuse``, or a new one); on success it replaces ``out``. On a user
    error it is deleted; on an interruption or crash it is kept when it holds resume records. A
    full disk while writing becomes a one-line error."""
    check_destination(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = reuse or Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    keep = False
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except EdgeqError:
        raise
    except OSError as err:
        if err.errno in NO_SPACE:
            where = f" writing {err.filename}" if err.filename else ""
            raise EdgeqError(f"no space left on the device of {out.parent}{where}; nothing kept") from None
        keep = (tmp / JOURNAL_FILE).is_file()
        raise
    except BaseException:  # KeyboardInterrupt, a termination signal, a bug: resumable if recorded
        keep = (tmp / JOURNAL_FILE).is_file()
        raise
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)
