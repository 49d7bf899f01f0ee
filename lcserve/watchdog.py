"""Run the engine so that it dies with lcserve, even when lcserve is SIGKILLed or OOM-killed.

`python -m lcserve.watchdog PARENT_PID -- CMD ...` runs CMD as its child, in the process group the
watchdog leads (EngineProcess starts it in a new session), and waits:

- CMD exits: the watchdog exits the same way (same code, or the same signal), so the supervisor
  sees the engine's own exit and reaps what is left of the group.
- PARENT_PID is no longer its parent (lcserve died; the kernel re-parents the watchdog): it stops
  the whole group, SIGTERM and then SIGKILL after GRACE_S, itself included.

Why a process and not PR_SET_PDEATHSIG: that signal fires when the *thread* that spawned the
child exits, and the supervisor respawns vLLM from its own thread. A re-parenting check does not
care which thread started the engine, and it costs a few wake-ups a second. SIGTERM and SIGINT
sent to the group are meant for the engine: the watchdog only lets the engine act on them.
Standard library only: it starts before vLLM and must start fast.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

POLL_S = 0.2
GRACE_S = 3.0
USAGE = "usage: python -m lcserve.watchdog PARENT_PID -- COMMAND [ARG ...]"


def parse(argv: list[str]) -> tuple[int, list[str]] | None:
    """(parent pid, command) from the arguments, or None when they are malformed."""
    if len(argv) < 3 or not argv[0].isdigit() or argv[1] != "--":
        return None
    return int(argv[0]), argv[2:]


def stop_group(child: subprocess.Popen, parent: int) -> None:
    """lcserve is gone: stop the engine's whole group, this process included. Never returns."""
    print(f"lcserve.watchdog: lcserve (pid {parent}) is gone; stopping the engine's process group", flush=True)
    os.killpg(0, signal.SIGTERM)  # our own handler ignores it
    try:
        child.wait(GRACE_S)
    except subprocess.TimeoutExpired:
        pass
    os.killpg(0, signal.SIGKILL)  # workers that outlived the server, and us
    time.sleep(60)  # not reached


def exit_like(code: int) -> None:
    """Exit as the child did: with its code, or killed by its signal."""
    if code < 0:
        if -code not in (signal.SIGKILL, signal.SIGSTOP):  # those two keep their default anyway
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
        code = 128 - code  # a signal whose default is not to die
    sys.exit(code)


def main(argv: list[str]) -> None:
    parsed = parse(argv)
    if parsed is None:
        print(USAGE, file=sys.stderr)
        sys.exit(2)
    parent, command = parsed
    # A handler, not SIG_IGN: handlers are reset to the default in the exec'd child, so the
    # engine still acts on the SIGTERM/SIGINT that EngineProcess.stop sends to the group.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: None)
    if os.getppid() != parent:  # lcserve died before we started: start nothing
        sys.exit(1)
    child = subprocess.Popen(command)
    while True:
        try:
            exit_like(child.wait(POLL_S))
        except subprocess.TimeoutExpired:
            if os.getppid() != parent:
                stop_group(child, parent)


if __name__ == "__main__":
    main(sys.argv[1:])
