"""What every script shares and no other file owns: the device choice, files written atomically
(JSON included), downloads, a writable output folder, checked argparse types, human durations
and plurals, a progress line, and run_main, which turns a user mistake into one line and a
non-zero exit."""
import argparse
import contextlib
import json
import math
import os
import signal
import sys
import tempfile
import time
import urllib.request

import torch


# ----------------------------------------------------------------------------- devices


def resolve_device(name):
    """'auto' picks cuda, then mps, then cpu; an explicit device must be available."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device '{name}'; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device '{name}' asked for, but this PyTorch has no CUDA device; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device '{name}' does not exist: there are {torch.cuda.device_count()} CUDA devices")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' asked for, but MPS is not available here; use --device cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unsupported device '{name}'; use auto, cpu, cuda, cuda:N or mps")
    return device


# ----------------------------------------------------------------------------- files


def writable_folder(path):
    """Make sure `path` is a folder this process can write in (creating it), before any long
    work whose results go there; one clear OSError otherwise."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"{path} is a file, not a folder to write results in")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise OSError(f"cannot write in {path} ({e.strerror or type(e).__name__})") from None
    return path


@contextlib.contextmanager
def atomic_write(path):
    """Yields a temporary name to write to, renamed to path only once the block has finished:
    a crash or Ctrl-C never leaves a half-written file where a good one was."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def download(url, dest):
    """Fetch url to dest with a progress line, through a temporary name."""
    try:
        with urllib.request.urlopen(url, timeout=30) as response, atomic_write(dest) as tmp, open(tmp, "wb") as f:
            total, done = int(response.headers.get("Content-Length") or 0), 0
            while chunk := response.read(1 << 20):
                f.write(chunk)
                done += len(chunk)
                if total:
                    print(f"\rdownloading {os.path.basename(dest)}: {done / 2**20:.0f}/{total / 2**20:.0f} MiB",
                          end="", file=sys.stderr, flush=True)
        if total:
            print(file=sys.stderr)
    except OSError as e:  # URLError is an OSError
        raise OSError(f"could not download {url} ({getattr(e, 'reason', e)}); check the network") from None


def write_json(obj, path: str, indent: int = 4) -> None:
    """json.dump through a temporary name: an interrupted run leaves no half-written file."""
    with atomic_write(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent, ensure_ascii=False)
        f.write("\n")


# ----------------------------------------------------------------------------- command lines


def checked(kind, ok, requirement):
    """An argparse type: `kind` of the text, which must satisfy `ok` (else "must be <requirement>")."""
    def parse(text):
        value = kind(text)  # a ValueError here: argparse says "invalid int value: 'x'"
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text}")
        return value
    parse.__name__ = kind.__name__  # ... naming the kind: "int", not "parse"
    return parse


AT_LEAST_1 = checked(int, lambda v: v >= 1, "at least 1")
AT_LEAST_0 = checked(int, lambda v: v >= 0, "at least 0")
POSITIVE = checked(float, lambda v: 0 < v < math.inf, "a positive number")
NON_NEGATIVE = checked(float, lambda v: 0 <= v < math.inf, "a number >= 0")
SEED = checked(int, lambda v: 0 <= v < 2**63, "an integer from 0 to 2**63 - 1")  # what torch and numpy both take


def duration(seconds):
    """A time for people: 45s, 3m05s, 2h10m."""
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


@contextlib.contextmanager
def stop_on_interrupt(message):
    """Ctrl-C or SIGTERM inside the block ends the script with one line on stderr,
    "interrupted: <message>" (say what was kept and how to go on), and exit status 130."""
    def on_sigterm(signum, frame):
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    except KeyboardInterrupt:
        print(f"interrupted: {message}", file=sys.stderr, flush=True)
        sys.exit(130)
    finally:
        signal.signal(signal.SIGTERM, previous)


def plural(n, word):
    """'1 entry', '2 entries', '0 responses'."""
    if n == 1:
        return f"1 {word}"
    return f"{n} {word[:-1]}ies" if word.endswith("y") and word[-2:-1] not in "aeiou" else f"{n} {word}s"


class Progress:
    """A progress line on stderr for `total` steps of work: "WHAT done/total[, extra], T left".
    In a terminal one line is rewritten in place (at most 10 times a second); in a log a plain
    line is printed every `every` seconds and at the end. A step costs a clock read."""

    def __init__(self, what, total, every=10.0):
        self.what, self.total, self.every = what, total, every
        self.terminal = sys.stderr.isatty()
        self.start, self.shown, self.open = time.perf_counter(), -math.inf, False

    def update(self, done, extra=""):
        now = time.perf_counter()
        if now - self.shown < (0.1 if self.terminal else self.every) and done < self.total:
            return
        self.shown = now
        left = (now - self.start) / max(done, 1) * (self.total - done)
        line = f"{self.what} {done}/{self.total}{extra}, {duration(left)} left"
        if self.terminal:
            print(f"\r{line} ", end="", file=sys.stderr, flush=True)
            self.open = True
        else:
            print(line, file=sys.stderr, flush=True)

    def note(self, message):
        """A line of its own, not over the progress line."""
        self.close()
        print(message, file=sys.stderr, flush=True)

    def close(self):
        """End the progress line, if one is open (before other output, or when the work stops)."""
        if self.open:
            print(file=sys.stderr, flush=True)
            self.open = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def run_main(main):
    """Run a script's main(); a user mistake ends it with one line and exit status 1 (under
    torchrun the line comes from the first process only, not once per process)."""
    try:
        main()
    except (ValueError, OSError) as e:
        if os.environ.get("RANK", "0") != "0":
            sys.exit(1)
        sys.exit(f"error: {e}")
