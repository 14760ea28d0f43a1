"""The shared plumbing (common.py); downloads are tested with the hub cache in test_model.py."""
import gc
import glob
import io
import os
import signal
import subprocess
import sys
import time
import weakref

import pytest
import torch

import common
from checkpoint import save_checkpoint
from common import atomic_write, check_writable_folder, remove_stale_temporaries, stop_on_interrupt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(os.path.basename(f) for f in glob.glob(os.path.join(ROOT, "*.py"))
                 if '__name__ == "__main__"' in open(f, encoding="utf-8").read())


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint({"step": 1}, path)
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(path) as tmp:
            open(tmp, "wb").write(b"half a checkpo")
            raise KeyboardInterrupt
    assert torch.load(path) == {"step": 1} and os.listdir(tmp_path) == ["ckpt.pt"]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the swallowed Ctrl-C
def test_a_ctrl_c_that_python_swallowed_still_stops_the_next_atomic_write(tmp_path, capsys):
    path = str(tmp_path / "results.json")
    open(path, "w").write("old")

    class Garbage:
        pass
    with pytest.raises(SystemExit) as stopped:
        with stop_on_interrupt("nothing was written"):
            # Ctrl-C while a weakref callback runs (as at the end of an import): Python prints the
            # KeyboardInterrupt as "ignored" and goes on
            garbage = Garbage()
            ref = weakref.ref(garbage, lambda ref: os.kill(os.getpid(), signal.SIGINT))  # noqa: F841
            del garbage
            gc.collect()
            with atomic_write(path) as tmp:
                open(tmp, "w").write("new")
    assert stopped.value.code == 130
    assert capsys.readouterr().err.endswith("interrupted: nothing was written\n")
    assert open(path).read() == "old" and os.listdir(tmp_path) == ["results.json"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # as it was
    with atomic_write(path) as tmp:  # and outside the block, writes go on as before
        open(tmp, "w").write("new")
    assert open(path).read() == "new"


class Stderr(io.StringIO):
    def __init__(self, terminal):
        super().__init__()
        self.terminal = terminal

    def isatty(self):
        return self.terminal


@pytest.mark.parametrize("terminal", [True, False])
def test_progress_rewrites_one_line_in_a_terminal_and_prints_plain_lines_in_a_log(monkeypatch, terminal):
    now = [0.0]
    monkeypatch.setattr(common.time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(common.sys, "stderr", Stderr(terminal))
    with common.Progress("loss: batch", 5) as progress:
        for done, at in zip(range(1, 6), (0.0, 0.05, 3.0, 12.0, 13.0)):
            now[0] = at
            progress.update(done, ", 9 tokens/s" if done == 5 else "")
        if terminal:  # a note ends the line in place first
            progress.note("a note")
    shown = common.sys.stderr.getvalue()
    if terminal:  # at most every 0.1 s: batch 2 (at 0.05 s) is not shown; the last always is
        assert shown == ("\rloss: batch 1/5, 0s left\x1b[K\rloss: batch 3/5, 2s left\x1b[K\rloss: batch 4/5, 3s left"
                         "\x1b[K\rloss: batch 5/5, 9 tokens/s, 0s left\x1b[K\na note\n")
    else:  # every 10 s, and the last
        assert shown == "loss: batch 1/5, 0s left\nloss: batch 4/5, 3s left\nloss: batch 5/5, 9 tokens/s, 0s left\n"


def test_plural():
    assert [common.plural(n, "entry") for n in (0, 1, 2)] == ["0 entries", "1 entry", "2 entries"]
    assert [common.plural(n, "response") for n in (1, 3)] == ["1 response", "3 responses"]
    assert common.plural(2, "day") == "2 days"
    assert [common.plural(n, "step") for n in (0, 1, 2, 1100)] == ["0 steps", "1 step", "2 steps", "1,100 steps"]
    assert (common.plural(1, "process", "processes"), common.plural(3, "process", "processes")) == \
        ("1 process", "3 processes")


def test_stale_temporaries_of_the_named_files_go_and_nothing_else(tmp_path):
    (tmp_path / "best.pt.tmp").write_bytes(b"\0" * (3 * 2**20))  # what a kill -9 mid-save leaves
    (tmp_path / "metrics.jsonl.tmp").write_text('{"step": 1')
    keep = {"ckpt.pt": b"a checkpoint", "notes.tmp": b"the user's", "other.pt.tmp": b"not ours", "best.pt": b"w"}
    for name, content in keep.items():
        (tmp_path / name).write_bytes(content)
    os.makedirs(tmp_path / "loss.png.tmp")  # a folder of that name is not a temporary file of ours
    said = remove_stale_temporaries(str(tmp_path), ["ckpt.pt", "best.pt", "metrics.jsonl", "loss.png"])
    assert said == (f"removed best.pt.tmp (3 MiB), metrics.jsonl.tmp from {tmp_path}: left by a save that was "
                    "killed before it finished")
    assert sorted(os.listdir(tmp_path)) == sorted([*keep, "loss.png.tmp"])
    assert all((tmp_path / name).read_bytes() == content for name, content in keep.items())
    assert remove_stale_temporaries(str(tmp_path), ["ckpt.pt", "best.pt"]) == ""


def test_check_writable_folder_creates_nothing_and_says_what_is_wrong(tmp_path):
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(NotADirectoryError, match=f"^{tmp_path}/a-file is a file, not a folder to write results in$"):
        check_writable_folder(str(tmp_path / "a-file"))
    with pytest.raises(NotADirectoryError,
                       match=f"^cannot create the folder {tmp_path}/a-file/out: {tmp_path}/a-file is a file$"):
        check_writable_folder(str(tmp_path / "a-file" / "out"))
    assert check_writable_folder(str(tmp_path / "new" / "out")) == str(tmp_path / "new" / "out")
    assert check_writable_folder(str(tmp_path)) == str(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["a-file"]  # nothing created, no probe left behind


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes in read-only folders")
def test_check_writable_folder_refuses_a_read_only_folder(tmp_path):
    os.chmod(tmp_path, 0o555)
    try:
        with pytest.raises(PermissionError, match=f"^cannot create the folder {tmp_path}/out: {tmp_path} is not "):
            check_writable_folder(str(tmp_path / "out"))
        with pytest.raises(OSError, match=f"^cannot write in {tmp_path} "):
            check_writable_folder(str(tmp_path))
    finally:
        os.chmod(tmp_path, 0o755)


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux's /proc to see torch loading")
@pytest.mark.parametrize("script", SCRIPTS)
def test_ctrl_c_while_torch_loads_is_one_line_and_130(script):
    """Ctrl-C in the second or so a script spends importing torch, before its main() runs."""
    proc = subprocess.Popen([sys.executable, script, "--help"], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while proc.poll() is None and time.time() < deadline:
        with open(f"/proc/{proc.pid}/maps") as f:
            if "libtorch" in f.read():  # torch's libraries are being loaded: the import is under way
                break
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    assert proc.communicate(timeout=60) == ("", "interrupted while starting: nothing was done\n")
    assert proc.returncode == 130
