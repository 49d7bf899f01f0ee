"""Who may reach the engine through the gateway, and what a key holder may make vLLM read.

vLLM's runtime adapter loading (`/v1/load_lora_adapter`) opens whatever path it is sent, as the
engine's user, and would fetch a hub id it cannot find on disk. So the gateway admits a load only:
- when the operator named the folders adapters may come from (`--allow-adapter-dir`, repeatable);
- for an absolute path that, resolved as the kernel will open it (`..`, symlinks), lies inside one
  of them, and whose every file resolves inside one of them too (vLLM reads the folder's files);
- once lcserve's own inspection (`inspect_adapter`, which also scans the values for NaN/Inf)
  says "mount".
vLLM is then sent the resolved path: it reads the folder that was inspected. The allowed folders
are the operator's; whoever can write into them can still swap files after the check.

vLLM itself listens on a Unix socket in a folder only lcserve's user can open (`engine_socket`),
with no TCP port: the gateway is the one door, so the key, the folder rules and the inspection
cannot be walked around by another local process. A loaded adapter is copied into that private
folder under a name made of its content's digest (`snapshot`): vLLM keys its prefix cache by
adapter name and path, so new weights under an old name get a new path, and vLLM reads exactly
the bytes that were inspected.

The API key may come from the environment or a file, so it need not sit in argv, where `ps`
shows it to every user of the machine.
"""

from __future__ import annotations

import hashlib
import ipaddress
import itertools
import os
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lcserve.adapters.inspection import Verdict, inspect_adapter
from lcserve.adapters.reader import read_adapter
from lcserve.errors import LcserveError

API_KEY_FILE_OPTION = "--api-key-file"
SOCKET_DIR_OPTION = "--engine-socket-dir"
SOCKET_NAME = "vllm.sock"
MAX_SOCKET_PATH = 107  # sun_path holds 108 bytes with the terminating NUL
_FOLDERS = itertools.count()


def is_loopback(host: str) -> bool:
    """Whether only this machine can reach an address bound on `host`."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def exposure_warning(host: str, has_key: bool, what: str = "the gateway") -> str | None:
    """The warning for listening beyond loopback without an API key, or None."""
    if has_key or is_loopback(host):
        return None
    return (
        f"WARNING: {what} listens on {host}, which is not loopback, and has no API key: anyone who can reach "
        f"this port can use the engine. Set LCSERVE_API_KEY or {API_KEY_FILE_OPTION}, or bind 127.0.0.1."
    )


def read_api_key(key: str | None, key_file: Path | None) -> str | None:
    """The API key from --api-key / LCSERVE_API_KEY or from a file (its first line); LcserveError
    when both are given, or the file cannot be read or is empty."""
    if key_file is None:
        return key or None
    if key:
        raise LcserveError(
            f"both {API_KEY_FILE_OPTION} and --api-key (or LCSERVE_API_KEY) are given; give the key one way only"
        )
    return key_from_file(API_KEY_FILE_OPTION, key_file)


def key_from_file(option: str, key_file: Path, what: str = "the key") -> str:
    """The first line of a key file; LcserveError naming `option` when it cannot be read or is empty."""
    try:
        lines = Path(key_file).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise LcserveError(
            f"{option} {key_file}: cannot read it ({getattr(e, 'strerror', None) or e}); "
            f"pass a readable file whose first line is {what}"
        ) from None
    if not lines or not lines[0].strip():
        raise LcserveError(f"{option} {key_file}: the file is empty; write {what} on its first line")
    return lines[0].strip()


def default_socket_dir() -> Path:
    """A short path of its own under the temporary folder (socket paths are limited to 107 bytes)."""
    return Path(tempfile.gettempdir()) / f"lcserve-{os.getpid()}-{next(_FOLDERS)}"


def engine_socket(folder: Path) -> Path:
    """The engine's socket path in `folder`, which is created 0700 when missing; LcserveError (one
    line, naming the folder and the fix) when it exists but others may open it, or when lcserve
    cannot write there, or when the path is too long for a socket."""
    folder, path = Path(folder), Path(folder) / SOCKET_NAME
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise LcserveError(
            f"{SOCKET_DIR_OPTION} {folder}: the socket path {path} is longer than {MAX_SOCKET_PATH} bytes, "
            "which a Unix socket cannot have; pass a shorter folder"
        )
    try:
        folder.mkdir(mode=0o700)
    except FileExistsError:
        pass
    except OSError as e:
        raise LcserveError(
            f"{SOCKET_DIR_OPTION} {folder}: cannot create it ({e.strerror}); pass a folder lcserve may create"
        ) from None
    info = folder.stat()
    if not stat.S_ISDIR(info.st_mode):
        raise LcserveError(f"{SOCKET_DIR_OPTION} {folder}: not a folder; pass a folder for vLLM's socket")
    if info.st_uid != os.geteuid() or info.st_mode & 0o077:
        raise LcserveError(
            f"{SOCKET_DIR_OPTION} {folder}: mode {stat.S_IMODE(info.st_mode):04o}, owner uid {info.st_uid}: "
            f"other users could open vLLM's socket; run `chmod 700 {folder}` as uid {os.geteuid()}, "
            "or pass a new folder"
        )
    if not os.access(folder, os.W_OK | os.X_OK):
        raise LcserveError(
            f"{SOCKET_DIR_OPTION} {folder}: lcserve cannot write there; run `chmod u+wx {folder}`, or pass a new folder"
        )
    return path


def content_digest(folder: Path) -> str:
    """sha256 over the folder's file names and bytes (what vLLM reads), hex."""
    digest = hashlib.sha256()
    for entry in sorted(p for p in Path(folder).iterdir() if p.is_file()):
        digest.update(entry.name.encode() + b"\0")
        with entry.open("rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()


def snapshot(folder: Path, root: Path) -> Path:
    """A copy of `folder` at `root/<digest>` (made once; written beside and renamed, so never
    partial): the path names the weights, and later changes to `folder` do not reach it."""
    out = Path(root) / content_digest(folder)[:32]
    if out.is_dir():
        return out
    Path(root).mkdir(mode=0o700, parents=True, exist_ok=True)
    part = Path(tempfile.mkdtemp(dir=root, prefix=".part-"))
    for entry in Path(folder).iterdir():
        if entry.is_file():
            shutil.copyfile(entry, part / entry.name)
    try:
        part.rename(out)
    except OSError:  # another load made it first
        shutil.rmtree(part, ignore_errors=True)
    return out


def allowed_dirs(dirs: tuple[str | Path, ...] | list[str | Path]) -> tuple[Path, ...]:
    """The operator's adapter folders, resolved; LcserveError for one that is not a folder."""
    resolved = []
    for d in dirs:
        path = Path(os.path.realpath(Path(d).expanduser()))
        if not path.is_dir():
            raise LcserveError(f"--allow-adapter-dir {d}: not a folder; pass an existing folder that holds adapters")
        resolved.append(path)
    return tuple(resolved)


@dataclass
class Refusal(Exception):
    """A load the gateway will not pass to vLLM: the HTTP status and one line for the client."""

    status: int
    message: str
    err_type: str = "BadRequestError"
    param: str | None = "lora_path"


class AdapterGate:
    """Admits runtime adapter loads from the allowed folders only, after inspection."""

    def __init__(self, dirs: tuple[str | Path, ...] | list[str | Path] = (), snapshots: Path | None = None):
        self.allowed = allowed_dirs(dirs)
        self.snapshots = snapshots  # where inspected adapters are copied for vLLM (None: vLLM reads the folder)

    def confine(self, lora_path: object) -> Path:
        """The folder `lora_path` names, resolved, when it and each of its files lie inside an
        allowed folder; Refusal otherwise."""
        if not self.allowed:
            raise Refusal(
                403,
                "runtime adapter loading is off: the gateway allows no adapter folder; restart "
                "lcserve with --allow-adapter-dir DIR (repeatable) naming the folders adapters may be "
                "loaded from",
                "PermissionDeniedError",
            )
        if not isinstance(lora_path, str) or not os.path.isabs(lora_path):
            raise Refusal(400, f"lora_path must be an absolute path to an adapter folder, not {lora_path!r}")
        folder = Path(os.path.realpath(lora_path))
        outside = f"lora_path {lora_path} resolves outside the adapter folders this gateway allows"
        if not self._inside(folder):
            raise Refusal(
                403,
                f"{outside} ({', '.join(map(str, self.allowed))}); put the adapter in one of them, "
                "or restart lcserve with --allow-adapter-dir naming its folder",
                "PermissionDeniedError",
            )
        if not folder.is_dir():
            raise Refusal(
                404,
                f"lora_path {lora_path}: no such adapter folder; pass the folder that holds adapter_config.json",
                "NotFoundError",
            )
        try:
            entries = list(folder.iterdir())
        except OSError as e:
            raise Refusal(400, f"lora_path {lora_path}: cannot list it ({e.strerror}); make it readable") from None
        for entry in entries:
            if not self._inside(Path(os.path.realpath(entry))):
                raise Refusal(
                    403,
                    f"{outside}: {entry.name} links to {os.path.realpath(entry)}; copy the file into "
                    "the adapter folder",
                    "PermissionDeniedError",
                )
        return folder

    def admit(self, body: dict, base_dir: Path | None = None) -> dict:
        """The load request to send vLLM (resolved path, known fields only), or Refusal."""
        name = body.get("lora_name")
        if not isinstance(name, str) or not name.strip():
            raise Refusal(400, "lora_name must be a non-empty string: the name clients will use", param="lora_name")
        source = self.confine(body.get("lora_path"))
        try:  # with snapshots, the copy vLLM will read is the one inspected
            folder = snapshot(source, self.snapshots) if self.snapshots is not None else source
            report = inspect_adapter(read_adapter(folder), base_dir)
        except (LcserveError, OSError) as e:
            raise Refusal(400, f"the adapter cannot be loaded: {' '.join(str(e).split())}") from None
        if report.verdict != Verdict.MOUNT:
            fix = (
                "serve it merged: lcserve serve BASE --adapter NAME=DIR --mode merge"
                if report.verdict == Verdict.MERGE
                else "re-train or re-export it"
            )
            raise Refusal(
                400,
                f"{source}: lcserve's inspection says {report.verdict}, not mount ({'; '.join(report.reasons)}); {fix}",
            )
        flags = {k: body[k] for k in ("load_inplace", "is_3d_lora_weight") if isinstance(body.get(k), bool)}
        return {"lora_name": name, "lora_path": str(folder), **flags}

    def _inside(self, path: Path) -> bool:
        return any(path.is_relative_to(root) for root in self.allowed)
