"""What a run records of itself as it goes: OUT/metrics.jsonl, a JSON line per evaluation
(appended as the run goes, cut back to a checkpoint's step when it resumes); OUT/loss.png drawn
from it, as the chapter's plot_losses; and its clock, for tokens/s and the time left. train.py
writes them; plot.py draws the plot again at any time."""
import dataclasses
import json
import math
import os
import time

from common import atomic_write

METRICS, PLOT = "metrics.jsonl", "loss.png"


def read_metrics(path):
    """The evaluations in a metrics.jsonl file, one dict each, in order."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def append_metrics(folder, row):
    """One evaluation more, as a line of its own: a run killed at any time keeps every line before."""
    with open(os.path.join(folder, METRICS), "a") as f:
        f.write(json.dumps(row) + "\n")


def start_metrics(folder, resumed_step=None):
    """A new run's empty metrics.jsonl; a resumed run's keeps the lines up to the checkpoint's step
    and drops those written after it (by the run that stopped), through a temporary name."""
    path = os.path.join(folder, METRICS)
    kept = []
    if resumed_step is not None and os.path.exists(path):
        with open(path) as f:
            kept = [line for line in f if line.strip() and json.loads(line)["step"] <= resumed_step]
    with atomic_write(path) as tmp, open(tmp, "w") as f:
        f.writelines(kept)


def plot_losses(metrics_path, png_path):
    """OUT/loss.png: train and validation loss against steps, with tokens seen on a second
    x-axis, as the chapter's plot_losses (for DPO beside the reward margins, as the book's
    second plot). False when matplotlib is not installed."""
    try:
        import matplotlib  # noqa: F401
        from matplotlib.figure import Figure  # no pyplot: no global state, no window
    except ImportError:
        return False
    rows = read_metrics(metrics_path)
    steps, tokens = [r["step"] for r in rows], [r["tokens_seen"] for r in rows]
    train, val = [r["train_loss"] for r in rows], [r["val_loss"] for r in rows]
    panels = [("loss", train, val)]
    if "train_reward_margin" in rows[0]:  # a DPO run
        panels.append(("reward margin", [r["train_reward_margin"] for r in rows],
                       [r["val_reward_margin"] for r in rows]))
    points = {"marker": "o", "markersize": 3} if len(rows) < 50 else {}  # one evaluation is a point, not a line
    fig = Figure(figsize=(6 * len(panels), 4))
    for ax, (what, train, val) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        ax.plot(steps, train, label=f"training {what}", **points)
        ax.plot(steps, val, linestyle="-.", label=f"validation {what}", **points)
        ax.set_xlabel("optimizer steps")
        ax.set_ylabel(what)
        ax.legend(loc="upper right" if what == "loss" else "upper left")
        top = ax.twiny()  # a second x-axis for tokens seen, aligned by an invisible plot
        top.plot(tokens, train, alpha=0)
        top.set_xlabel("tokens seen")
    fig.tight_layout()
    with atomic_write(png_path) as tmp:
        fig.savefig(tmp, format="png")
    return True


class LossPlot:
    """OUT/loss.png of a running run, redrawn after an evaluation unless the last drawing was
    recent compared to its cost: at most a tenth of the run's time goes to plotting, however
    short the evaluation interval."""

    def __init__(self, folder):
        self.metrics, self.png = os.path.join(folder, METRICS), os.path.join(folder, PLOT)
        self.cost = self.drawn_at = 0.0  # seconds the last drawing took, and when it ended

    def update(self):
        if time.time() - self.drawn_at >= 10 * self.cost:
            self.draw()

    def draw(self):
        """Draw now; False when matplotlib is not installed."""
        started = time.time()
        drawn = plot_losses(self.metrics, self.png)
        self.drawn_at, self.cost = time.time(), time.time() - started
        return drawn


@dataclasses.dataclass
class Clock:
    """Where a process's time went since it began training: its training steps, evaluations and
    saves, and the time and tokens seen at its last evaluation (for tokens/s since)."""
    started: float = dataclasses.field(default_factory=time.time)
    elapsed_before: float = 0.0  # the run's training time before this process (a resumed run)
    steps: int = 0
    evals: int = 0
    eval_seconds: float = 0.0
    saves: int = 0
    save_seconds: float = 0.0
    last_eval: tuple = (0.0, 0)  # (time, tokens seen)

    def elapsed(self, now):
        """The run's training time at `now`: this process's and before."""
        return self.elapsed_before + now - self.started

    def tokens_per_s(self, tokens_seen, now):
        return (tokens_seen - self.last_eval[1]) / max(now - self.last_eval[0], 1e-9)

    def time_left(self, step, total, eval_every, save_every, steps_per_epoch):
        """Seconds from step `step` to step `total`: the mean time of a training step, an
        evaluation and a save so far, times how many of each are still due on train.py's
        schedule (an evaluation after step 1, every eval_every steps and after the last; a save
        every save_every steps, at the end of each epoch and after the last)."""
        if step >= total:
            return 0.0
        training = time.time() - self.started - self.eval_seconds - self.save_seconds
        evals = count_multiples(step, total, eval_every, offset=1) + ((total - 1) % eval_every != 0)
        both = math.lcm(save_every, steps_per_epoch)
        saves = (count_multiples(step, total, save_every) + count_multiples(step, total, steps_per_epoch)
                 - count_multiples(step, total, both) + (total % save_every != 0 and total % steps_per_epoch != 0))
        return (training / max(self.steps, 1) * (total - step) + self.eval_seconds / max(self.evals, 1) * evals
                + self.save_seconds / max(self.saves, 1) * saves)


def count_multiples(after, upto, every, offset=0):
    """How many steps s in (after, upto] have s - offset divisible by `every`."""
    return (upto - offset) // every - (after - offset) // every
