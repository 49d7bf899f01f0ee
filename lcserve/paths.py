"""Where lcserve keeps its cache (prepared models, demo adapter), and how it writes folders there
and at a user's `--out`: atomically (a partial folder is never taken for a complete one), one
builder at a time, and over an existing `--out` only when lcserve wrote it (its marker file)."""

import errno
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


# The file in every folder an lcserve `--out` wrote (merge, scale, render, probe, ...): `--force`
# replaces a folder only when it carries one, so it never deletes what lcserve did not write.
OUTPUT_MARKER = ".lcserve-output"
MARKER_TEXT = "written by lcserve; `--force` may replace this folder with a new output\n"


def check_output(out: Path, force: bool, inputs: tuple[tuple[str, Path], ...] = (), flag: str = "--out") -> None:
    """LcserveError unless `out` may become a new output folder: new, empty, or (with `force`) an
    earlier output of lcserve; never a file, the working directory or a folder above it, or one of
    the command's inputs (`inputs`: (what, folder) pairs), nor a folder inside or around them."""
    out = Path(out)
    where, cwd = out.resolve(), Path.cwd().resolve()
    if where == cwd or where in cwd.parents:
        raise LcserveError(
            f"{flag} {out}: is the working directory or a folder above it; lcserve never replaces it, pick a new {flag}"
        )
    for what, path in inputs:
        path = Path(path).resolve()
        if where == path or path in where.parents or where in path.parents:
            raise LcserveError(
                f"{flag} {out}: is the {what} folder {path} (or lies inside or around it), an input of "
                f"this command; lcserve never writes its inputs, pick a new {flag}"
            )
    if out.exists() and not out.is_dir():
        raise LcserveError(
            f"{flag} {out}: exists and is not a folder; lcserve replaces only folders it wrote, pick a new {flag}"
        )
    try:
        if not out.is_dir() or not any(out.iterdir()):
            return  # new, or empty: nothing to lose
    except OSError as e:
        raise LcserveError(f"{flag} {out}: cannot read it ({e.strerror or e}); pick a new {flag}") from None
    if not (out / OUTPUT_MARKER).is_file():
        raise LcserveError(
            f"{flag} {out}: holds files lcserve did not write (no {OUTPUT_MARKER} in it; outputs of older "
            f"lcserve have none), and --force replaces only lcserve's own; remove the folder yourself or "
            f"pick a new {flag}"
        )
    if not force:
        raise LcserveError(f"{flag} {out}: holds an earlier lcserve output; pass --force to replace it")


def mark_output(folder: Path) -> None:
    """Write the marker that lets a later `--force` replace `folder`."""
    (Path(folder) / OUTPUT_MARKER).write_text(MARKER_TEXT)


@contextmanager
def output_dir(out: Path, force: bool, inputs: tuple[tuple[str, Path], ...] = (), flag: str = "--out"):
    """`atomic_dir` for a user's `--out`: checked first (`check_output`), and marked as lcserve's."""
    check_output(out, force, inputs, flag)
    with atomic_dir(out) as tmp:
        mark_output(tmp)
        yield tmp


def size_text(n: int) -> str:
    """Bytes as a person reads them (the core's own: deploy's `gib` is above its layer)."""
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    if n >= 2**20:
        return f"{n / 2**20:.1f} MiB"
    return f"{n / 2**10:.0f} KiB"


def check_free_space(target: Path, tmp: Path, need: int, what: str, flag: str = "--out") -> None:
    """LcserveError before a long write the disk cannot hold: refused at once, not failed at 90% with
    the disk full for every other program on the machine. Asked inside `atomic_dir` (`tmp`, its new
    folder), so a folder that cannot be written at all gets that error first."""
    free = shutil.disk_usage(tmp).free
    if need > free:
        raise LcserveError(
            f"{flag} {target}: {what} needs {size_text(need)} and its disk has {size_text(free)} free; free some space or "
            f"pick a {flag} on another disk"
        )


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
        try:
            yield tmp
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # give the space back before telling how much there is
            raise LcserveError(
                f"{target}: the disk filled while writing it ({size_text(shutil.disk_usage(target.parent).free)} free now); nothing "
                "was kept, the old folder (if any) is untouched; free some space or choose a folder on another disk"
            ) from None
        _commit(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        os.close(lock)


def _commit(tmp: Path, target: Path) -> None:
    """Put `tmp` in `target`'s place: the old one is moved aside in one step, then removed (never
    half-deleted); LcserveError when the system refuses the rename (a mount point, a busy folder)."""
    old = tmp.with_name(tmp.name + ".old")
    try:
        if target.exists() or target.is_symlink():
            target.rename(old)
            try:
                tmp.rename(target)
            except OSError:
                _put_back(old, target)
                raise
        else:
            tmp.rename(target)
    except OSError as e:
        raise LcserveError(
            f"{target}: cannot replace it ({e.strerror or e}); nothing was changed, choose another folder"
        ) from None
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    elif old.is_symlink() or old.exists():
        old.unlink()


def _put_back(old: Path, target: Path) -> None:
    try:
        old.rename(target)
    except OSError as e:
        raise LcserveError(
            f"{target}: cannot replace it, nor put the earlier one back ({e.strerror or e}); it is at {old}: "
            f"move it back to {target} before running lcserve again"
        ) from None


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
