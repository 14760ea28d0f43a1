"""The shared plumbing (common.py); downloads are tested with the hub cache in test_model.py."""
import io
import os

import pytest
import torch

import common
from checkpoint import save_checkpoint
from common import atomic_write


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint({"step": 1}, path)
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(path) as tmp:
            open(tmp, "wb").write(b"half a checkpo")
            raise KeyboardInterrupt
    assert torch.load(path) == {"step": 1} and os.listdir(tmp_path) == ["ckpt.pt"]


class Stderr(io.StringIO):
    def __init__(self, terminal):
        super().__init__()
        self.terminal = terminal

    def isatty(self):
        return self.terminal


@pytest.mark.parametrize("terminal", [True, False])
def test_progress_rewrites_one_line_in_a_terminal_and_prints_plain_lines_in_a_log(monkeypatch, terminal):
    clock = iter([0.0, 0.0, 0.05, 3.0, 12.0, 13.0, 14.0])  # start, then one reading per update
    monkeypatch.setattr(common.time, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(common.sys, "stderr", Stderr(terminal))
    with common.Progress("loss: batch", 5) as progress:
        for done in range(1, 6):
            progress.update(done, ", 9 tokens/s" if done == 5 else "")
        if terminal:  # a note ends the line in place first
            progress.note("a note")
    shown = common.sys.stderr.getvalue()
    if terminal:  # at most every 0.1 s: batch 2 (at 0.05 s) is not shown; the last always is
        assert shown == ("\rloss: batch 1/5, 0s left \rloss: batch 3/5, 2s left \rloss: batch 4/5, 3s left "
                         "\rloss: batch 5/5, 9 tokens/s, 0s left \na note\n")
    else:  # every 10 s, and the last
        assert shown == "loss: batch 1/5, 0s left\nloss: batch 4/5, 3s left\nloss: batch 5/5, 9 tokens/s, 0s left\n"


def test_plural():
    assert [common.plural(n, "entry") for n in (0, 1, 2)] == ["0 entries", "1 entry", "2 entries"]
    assert [common.plural(n, "response") for n in (1, 3)] == ["1 response", "3 responses"]
    assert common.plural(2, "day") == "2 days"
