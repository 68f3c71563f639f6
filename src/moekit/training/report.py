"""What a run shows on the console: a live progress bar (rich) and the end-of-run summary table.

On a terminal the bar shows step, loss, tokens/s and the worst MoE layer's balance; when the
output is a file or a pipe (CI, ``make demo > log``) it prints a plain line after the first
step (so a slow configuration shows signs of life) and then every few steps. Tokens/s is the
mean over the steps since the previous line (one step's rate swings with the machine's load),
labelled so.
"""

from __future__ import annotations

from typing import Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from moekit.training.metrics import LayerRouting


class Reporter:
    def __init__(self, console: Console, total_steps: int, start_step: int, log_every: int,
                 budget_s: float | None = None):
        self.console = console
        self.log_every = log_every
        self.total_steps, self.budget_s = total_steps, budget_s
        self.start_step = start_step
        self._tokens, self._seconds, self._steps = 0, 0.0, 0  # since the last printed line
        self._progress = None
        if console.is_terminal:
            self._progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console, transient=False,
            )
            self._task = self._progress.add_task("train", total=total_steps, completed=start_step, info="")

    def __enter__(self) -> "Reporter":
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()

    def step(self, rec: dict, tokens: int, seconds: float) -> None:
        """Show step record ``rec``; the step trained ``tokens`` tokens in ``seconds``."""
        self._tokens, self._seconds, self._steps = self._tokens + tokens, self._seconds + seconds, self._steps + 1
        rate = self._tokens / self._seconds if self._seconds > 0 else 0.0
        info = f"loss {rec['loss']:.3f}  {rate:,.0f} tok/s (mean of {self._steps} step{'s' * (self._steps > 1)})"
        if rec.get("max_violation"):
            info += f"  worst balance {max(rec['max_violation']):.2f}"
        if self._progress is not None:
            self._progress.update(self._task, completed=rec["step"], total=self.expected_steps(rec), info=info)
            if self._steps >= self.log_every:
                self._tokens, self._seconds, self._steps = 0, 0.0, 0
        elif rec["step"] % self.log_every == 0 or rec["step"] == self.start_step + 1:
            self.console.print(f"step {rec['step']:>6}  {info}  lr {rec['lr']:.2e}", highlight=False, markup=False)
            self._tokens, self._seconds, self._steps = 0, 0.0, 0


    def expected_steps(self, rec: dict) -> int:
        """max_steps, or fewer when a time budget runs out first (at the pace so far)."""
        elapsed = rec.get("elapsed") or 0.0
        if self.budget_s is None or elapsed <= 0:
            return self.total_steps
        return max(rec["step"], min(self.total_steps, round(rec["step"] * self.budget_s / elapsed)))


def routing_table(routing: Sequence[LayerRouting], title: str = "routing (validation)") -> Table:
    table = Table(title=title, title_justify="left")
    for col in ("MoE layer", "load min..max share", "max_violation", "dropped", "entropy", "dead"):
        table.add_column(col, justify="right")
    for r in routing:
        total = sum(r.tokens_per_expert) or 1
        shares = [c / total for c in r.tokens_per_expert]
        table.add_row(str(r.layer), f"{min(shares):.1%} .. {max(shares):.1%}", f"{r.max_violation:.2f}",
                      f"{r.dropped_fraction:.1%}", f"{r.router_entropy:.3f}", str(r.dead_experts))
    return table


def summary_table(summary: dict) -> Table:
    table = Table(title="run summary", title_justify="left", show_header=False)
    table.add_column(justify="left")
    table.add_column(justify="right")
    for key, value in summary.items():
        text = value if isinstance(value, str) else f"{value:,.4g}" if isinstance(value, float) else f"{value:,}"
        table.add_row(key, Text(text))  # Text: a path holding [ ] is not markup
    return table


__all__ = ["Reporter", "routing_table", "summary_table"]
