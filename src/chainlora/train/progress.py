"""Progress of a training run: one overall bar above the Trainer's per-step bar, and a summary.

The overall bar counts optimizer steps over ALL adapters (so its ETA is honest even though the
mixed adapter may take as long as all task adapters together) and shows which adapter runs.
"""

from __future__ import annotations

from typing import Any

from chainlora.console import bar, console, progress_mode
from chainlora.library import kinds
from rich.table import Table


def trainer_steps(job: Any) -> int:
    """Optimizer steps the Trainer will run for `job` (the classifier's head is not a Trainer job
    and takes seconds, so it does not weigh on the ETA)."""
    return job.steps if kinds.ENTRIES[job.kind].trainer else 0  # sft: a Trainer job like the LoRAs


class RunProgress:
    """Overall bar + per-adapter results; silent on non-main processes."""

    def __init__(self, jobs: list, enabled: bool = True):
        self.enabled = enabled
        self.n_jobs = len(jobs)
        self.done = 0
        self.rows: list[tuple[Any, dict, str | None]] = []
        self.bar = bar(total=sum(trainer_steps(j) for j in jobs), desc="chainlora", unit="step",
                       position=0, disable=not enabled, dynamic_ncols=True)
        self.loss: str = ""

    def _status(self, job: Any) -> None:
        self.job = job
        self.bar.set_postfix_str(f"adapter {self.done + 1}/{self.n_jobs}: {job.name}{self.loss}")

    def callback(self, job: Any):
        """A TrainerCallback that advances the overall bar with the Trainer's steps."""
        from transformers import TrainerCallback

        progress = self

        class _Overall(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                progress._status(job)
                progress.bar.update(state.global_step)  # resumed: steps already done

            def on_step_end(self, args, state, control, **kw):
                progress.bar.update(1)

        return _Overall()

    def step_bar(self):
        """The Trainer's per-step bar, showing the latest loss instead of printing log dicts; in a
        log (plain or no progress) no second bar: the loss joins the overall line."""
        from transformers import TrainerCallback
        from transformers.trainer_callback import ProgressCallback

        progress = self

        class _LossOnly(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kw):
                if logs and "loss" in logs:
                    progress.loss = f", loss {float(logs['loss']):.4f}"
                    progress._status(progress.job)

        if progress_mode() != "bar":
            return _LossOnly()

        class _StepBar(ProgressCallback):
            def on_log(self, args, state, control, logs=None, **kw):
                if self.training_bar is not None and logs and "loss" in logs:
                    self.training_bar.set_postfix(loss=f"{float(logs['loss']):.4f}")

        return _StepBar()

    def skip(self, job: Any, entry: dict, why: str = "earlier run") -> None:
        """An adapter not trained now: kept from the library, or finished by an earlier run."""
        self.bar.update(trainer_steps(job))
        self.done += 1
        self.rows.append((job, entry, why))

    def finish(self, job: Any, entry: dict) -> None:
        self.done += 1
        self.rows.append((job, entry, None))

    def close(self) -> None:
        self.bar.close()
        if self.enabled and self.rows:
            console(stderr=True).print(summary_table(self.rows))


def summary_table(rows: list[tuple[Any, dict, str | None]]) -> Table:
    """Adapters, steps, tokens, wall time, tokens/s and losses; a total row of this run's work
    only (an adapter kept from the library shows the numbers of the run that trained it)."""
    table = Table(title="training summary")
    cols = ("adapter", "steps", "tokens", "seconds", "tokens/s", "train loss", "test loss", "base loss")
    for c in cols:
        table.add_column(c, justify="left" if c == "adapter" else "right")
    tokens = seconds = steps = 0
    for job, e, skipped in rows:  # skipped: why it was not trained now (None: trained)
        tps = e["tokens"] / e["seconds"] if e.get("seconds") else 0.0
        name = job.name if job.kind == "task" else f"({job.kind})"
        table.add_row(name + (f" ({skipped})" if skipped else ""), str(e["steps"]), str(e["tokens"]),
                      f"{e['seconds']:.1f}", f"{tps:.0f}", f"{e['train_loss']:.3f}",
                      _fmt(e.get("test_loss")), _fmt(e.get("base_test_loss")))
        if skipped is None:  # a kept adapter's numbers are from the run that trained it
            tokens, seconds, steps = tokens + e["tokens"], seconds + e["seconds"], steps + e["steps"]
    kept = sum(skipped is not None for _, _, skipped in rows)
    table.add_row("total, this run" + (f" ({kept} not trained now)" if kept else ""), str(steps), str(tokens),
                  f"{seconds:.1f}", f"{tokens / seconds:.0f}" if seconds else "-", "", "", "")
    return table


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"
