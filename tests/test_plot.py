"""plot.py and metrics.py: a run's metrics.jsonl, its loss plot, and its clock (time left)."""
import json
import os
import sys
import time

import pytest

import plot
from common import run_main
from metrics import Clock, plot_losses, start_metrics
from test_train import FAST, HAVE_MATPLOTLIB, data, run, script  # noqa: F401 (data: a fixture)


def plot_cli(*argv):
    """plot.main as `python plot.py`: run_main turns a ValueError or OSError into SystemExit."""
    run_main(lambda: plot.main([str(a) for a in argv]))


def test_plot_draws_a_finished_run_later(data, tmp_path, capsys, monkeypatch):  # noqa: F811
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stopped:
        plot_cli(out)
    assert stopped.value.code == (f"error: nothing to plot: {out / 'metrics.jsonl'} does not exist (train.py writes "
                                  "it at every evaluation)")
    with pytest.raises(SystemExit) as stopped:
        plot.main([str(out), "--lr", "1e-3"])
    assert stopped.value.code == 2 and "unrecognized arguments: --lr 1e-3" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # trained without matplotlib...
    run(*FAST, "--data", data, "--out", out, "--max-steps", 1)
    assert (f"no {out / 'loss.png'}: matplotlib is not installed (pip install matplotlib), then draw it with "
            f"python plot.py {out}\n") in capsys.readouterr().out
    with pytest.raises(SystemExit) as stopped:
        plot_cli(out)
    assert stopped.value.code == "error: matplotlib is not installed; pip install matplotlib, then run this again"
    assert not os.path.exists(out / "loss.png")
    if HAVE_MATPLOTLIB:  # ... then installed, drawn as a user does
        monkeypatch.undo()
        proc = script("plot.py", out)
        stdout, stderr = proc.communicate(timeout=120)
        assert (proc.returncode, stdout, stderr) == (0, f"wrote {out / 'loss.png'}\n", "")
        assert os.path.getsize(out / "loss.png") > 0


def test_plot_of_a_run_stopped_before_its_first_evaluation_says_so(tmp_path):
    start_metrics(str(tmp_path))  # what a new run writes before its first evaluation: an empty file
    proc = script("plot.py", tmp_path)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1 and stderr == (f"error: nothing to plot: {tmp_path / 'metrics.jsonl'} is empty (the "
                                               "run stopped before its first evaluation)\n")


@pytest.mark.skipif(not HAVE_MATPLOTLIB, reason="matplotlib is optional")
def test_loss_plot_marks_the_points_when_there_are_few(tmp_path, monkeypatch):
    from matplotlib.figure import Figure
    drawn, savefig = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: drawn.append(fig) or savefig(fig, *a, **k))
    for n in (1, 60):
        with open(tmp_path / "metrics.jsonl", "w") as f:
            f.writelines(json.dumps(dict(step=s, tokens_seen=10 * s, train_loss=3.0, val_loss=3.5)) + "\n"
                         for s in range(1, n + 1))
        plot_losses(tmp_path / "metrics.jsonl", str(tmp_path / "loss.png"))
    few, many = ([line.get_marker() for line in fig.axes[0].lines] for fig in drawn)
    assert few == ["o", "o"] and many == ["None", "None"]


def test_resume_keeps_the_metrics_up_to_the_checkpoints_step(tmp_path):
    lines = [json.dumps({"step": s, "train_loss": 1.0}) + "\n" for s in (1, 3, 5, 7)]
    (tmp_path / "metrics.jsonl").write_text("".join(lines))
    start_metrics(str(tmp_path), resumed_step=5)  # lines 7 came after the checkpoint, from the run that stopped
    assert (tmp_path / "metrics.jsonl").read_text() == "".join(lines[:3])
    start_metrics(str(tmp_path))  # a new run starts empty
    assert (tmp_path / "metrics.jsonl").read_text() == "" and os.listdir(tmp_path) == ["metrics.jsonl"]


def test_time_left_counts_the_evaluations_and_saves_still_due():
    # the schedule of test_checkpoints_are_saved_every_save_every_steps_and_at_epoch_ends: 20 steps an epoch,
    # evaluations at 1, 6, 11, 16, 21, 22, saves at 8, 16, 20, 22
    clock = Clock(started=time.time() - 10, steps=2, eval_seconds=6.0, evals=2, save_seconds=2.0, saves=1)
    # 1 s a training step (10 s - 6 s evaluating - 2 s saving, over 2 steps) x 20 steps, 3 s x 5 evaluations,
    # 2 s x 4 saves
    assert clock.time_left(2, 22, eval_every=5, save_every=8, steps_per_epoch=20) == pytest.approx(20 + 15 + 8, abs=0.2)
    assert clock.time_left(21, 22, eval_every=5, save_every=8, steps_per_epoch=20) == pytest.approx(1 + 3 + 2, abs=0.2)
    assert clock.time_left(22, 22, eval_every=5, save_every=8, steps_per_epoch=20) == 0.0
