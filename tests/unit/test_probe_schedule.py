"""The probe schedule's own logic: a failed run is recorded and the schedule goes on."""

import pytest

from lcserve.serving.probe_schedule import ProbeSchedule
from lcserve.serving.probes.runner import ProbeConfig
from tests.conftest import free_port


def test_a_failed_run_is_recorded_and_the_schedule_goes_on(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    schedule = ProbeSchedule(ProbeConfig(), tmp_path, on_start=True, every_s=0.05)
    schedule.start(dead)
    try:
        for _ in range(2):
            assert schedule.finished.wait(30)
            schedule.finished.clear()
    finally:
        schedule.stop()
    assert schedule.runs >= 2 and schedule.last_summary is None
    assert dead in schedule.last_error


def test_a_schedule_needs_a_time_to_run():
    with pytest.raises(ValueError):
        ProbeSchedule(ProbeConfig(), "unused", on_start=False, every_s=None)
