"""Progress for long work: a rich bar on a terminal, plain lines in logs (CI, pipes, systemd).

A rich bar outside a terminal prints nothing until it finishes, so a minute-long step in a
CI log looks hung. `progress_bar` returns an object with the same calls (`add_task`,
`update`, `advance`, `tasks`) that prints a line at each new step and every 10%.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def progress_bar(console: Console, *columns):
    if console.is_terminal:
        return Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            *columns,
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
        )
    return LineProgress(console)


@dataclass
class _Task:
    description: str
    total: float | None
    completed: float = 0.0
    fields: dict = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    printed_step: str = ""
    printed_decile: int = -1


class LineProgress:
    """Rich's Progress calls, rendered as log lines:
    'training demo adapter: 12/36 (33%), about 50 s left, 25 s'."""

    def __init__(self, console: Console):
        self.console = console
        self.tasks: list[_Task] = []

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def add_task(self, description: str, total: float | None = None, **fields) -> int:
        self.tasks.append(_Task(description, total, fields=fields))
        self._report(len(self.tasks) - 1)
        return len(self.tasks) - 1

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    def update(
        self,
        task_id: int,
        *,
        advance: float | None = None,
        completed: float | None = None,
        description: str | None = None,
        total: float | None = None,
        **fields,
    ) -> None:
        task = self.tasks[task_id]
        if total is not None:
            task.total = total
        if completed is not None:
            task.completed = completed
        if advance is not None:
            task.completed += advance
        if description is not None:
            task.description = description
        task.fields.update(fields)
        self._report(task_id)

    def _report(self, task_id: int) -> None:
        task = self.tasks[task_id]
        step = task.description.split(" (", 1)[0]  # "(loss 1.23)"-style suffixes are not a new step
        decile = int(10 * task.completed / task.total) if task.total else 0
        if step == task.printed_step and decile == task.printed_decile:
            return
        task.printed_step, task.printed_decile = step, decile
        done = ""
        elapsed = time.monotonic() - task.started
        if task.total:
            share = task.completed / task.total
            # counts only for whole-number totals (steps, requests); bytes and seconds read better as a share
            counts = (
                f"{task.completed:g}/{task.total:g} " if float(task.total).is_integer() and task.total < 1e5 else ""
            )
            left = f", about {elapsed / share - elapsed:.0f} s left" if 0 < share < 1 else ""
            done = f"{counts}({share:.0%}){left}"
        self.console.print(f"{task.description}: {done}, {elapsed:.0f} s", highlight=False, soft_wrap=True)
