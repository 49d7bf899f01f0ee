"""Progress outside a terminal: plain log lines at each new step and every 10%, not silence."""

import io

from rich.console import Console
from rich.progress import Progress

from lcserve.progress import LineProgress, progress_bar


def test_a_log_gets_lines_per_step_and_decile():
    console = Console(file=io.StringIO(), width=200)
    with progress_bar(console) as progress:
        assert isinstance(progress, LineProgress)
        task = progress.add_task("training demo adapter", total=36)
        for step in range(36):
            progress.update(task, advance=1, description=f"training demo adapter (loss {4 - step / 10:.2f})")
        bytes_task = progress.add_task("merging", total=512 << 20)
        progress.update(bytes_task, completed=256 << 20)
    lines = console.file.getvalue().splitlines()
    training = [line for line in lines if line.startswith("training")]
    assert len(training) == 11  # 0%, then each new decile: not one line per step
    assert training[0].startswith("training demo adapter: 0/36 (0%)")
    assert "36/36 (100%)" in training[-1] and "left" not in training[-1]
    assert "s left" in training[3]
    assert lines[-1].startswith("merging: (50%), about")  # a byte count reads as a share


def test_a_terminal_gets_rich_bar():
    console = Console(file=io.StringIO(), force_terminal=True)
    assert isinstance(progress_bar(console), Progress)
