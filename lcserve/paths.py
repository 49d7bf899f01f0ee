"""Where lcserve keeps its cache (prepared models, demo adapter), and how it writes folders there:
atomically (a partial folder is never taken for a complete one) and one builder at a time."""

import fcntl
import glob
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import LcserveError


def lcserve_home() -> Path:
    """`$LCSERVE_HOME`, default `~/.cache/lcserve`."""
    return Path(os.environ.get("LCSERVE_HOME") or Path.home() / ".cache" / "lcserve")


def embedded_model_dir() -> Path:
    return lcserve_home() / "models" / "gemma-3-270m"


def demo_adapter_dir() -> Path:
    return lcserve_home() / "adapters" / "gemma-3-270m-writer"


def tmp_prefix(target: Path) -> str:
    """The name prefix of `target`'s temporary siblings: `.NAME.tmp-`."""
    return f".{target.name}.tmp-"


@contextmanager
def atomic_dir(target: Path):
    """Yield a new temporary sibling folder; it becomes `target` only if the block succeeds.

    The rename is the commit, so a reader sees the old folder or the complete new one, never a
    part. The builder holds a lock on its temporary folder while it lives: a run killed midway
    leaves only that hidden sibling, unlocked, and the next run for the same target removes it.
    """
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_siblings(target)
        tmp, lock = _locked_tmp(target)
    except OSError as e:
        raise LcserveError(
            f"{target}: cannot write a folder in {target.parent} ({e.strerror or e}); choose a writable location"
        ) from None
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the result should read like any folder
        yield tmp
        if target.exists() or target.is_symlink():
            old = tmp.with_name(tmp.name + ".old")  # moved aside in one step, then removed: never half-deleted
            target.rename(old)
            tmp.rename(target)
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink()
        else:
            tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        os.close(lock)


def _locked_tmp(target: Path) -> tuple[Path, int]:
    """A new temporary sibling, locked before it gets the name a cleaner looks for."""
    new = Path(tempfile.mkdtemp(prefix=f".{target.name}.new-", dir=target.parent))
    lock = os.open(new, os.O_RDONLY)
    fcntl.flock(lock, fcntl.LOCK_EX)
    tmp = new.with_name(tmp_prefix(target) + new.name.rsplit("-", 1)[1])
    new.rename(tmp)
    return tmp, lock


def remove_stale_siblings(target: Path) -> list[Path]:
    """Remove the temporary siblings of `target` that killed runs left (no live builder holds their
    lock); returns them."""
    removed = []
    for path in Path(target).parent.glob(glob.escape(tmp_prefix(target)) + "*"):
        if path.is_dir() and not path.is_symlink() and _unlocked(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _unlocked(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # releases the lock too


@contextmanager
def build_lock(target: Path):
    """Hold an exclusive lock for building `target`, so two processes never build it at once."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
