"""The one run loop of every serve path (`serving/stack.py run_until_signal`), with real signals:
a signal while starting or serving stops once, an engine that exits on its own stops too, and the
previous signal handlers come back."""

import os
import signal
import threading
import time

import pytest

from lcserve.serving.stack import run_until_signal


def test_a_signal_while_starting_stops_once_and_restores_the_handlers():
    calls, before = [], signal.getsignal(signal.SIGINT)

    def start():
        calls.append("start")
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)
        calls.append("started")  # never: the signal interrupts the start

    run_until_signal(start, lambda: calls.append("wait"), lambda: calls.append("stop"))
    assert calls == ["start", "stop"]
    assert signal.getsignal(signal.SIGINT) is before


def test_sigterm_while_serving_stops():
    calls = []
    timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    run_until_signal(lambda: calls.append("start"), lambda: time.sleep(10), lambda: calls.append("stop"))
    timer.join()
    assert calls == ["start", "stop"]


def test_an_engine_that_exits_on_its_own_is_stopped_and_its_exit_kept():
    calls = []

    def wait():
        raise SystemExit(1)  # what `serve --no-gateway` does when vLLM exits

    with pytest.raises(SystemExit):
        run_until_signal(lambda: calls.append("start"), wait, lambda: calls.append("stop"))
    assert calls == ["start", "stop"]
