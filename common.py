"""What every script shares and no other file owns: the target id the loss ignores, the device
choice, files written atomically (JSON included), downloads, a writable output folder and the
lock that keeps one run to a folder, checked argparse types, human durations and plurals, a
progress line, and run_main, which turns a user mistake into one line and a non-zero exit."""
import argparse
import contextlib
import json
import math
import os
import signal
import sys
import tempfile
import time
import urllib.error
import urllib.request


def interrupted_while_starting(signum, frame):
    """Ctrl-C before a script's main() runs (importing torch takes seconds): one line and 130,
    the shell's status for an interrupt, instead of a traceback from deep inside an import.
    Nothing has been read or written yet; run_main puts Python's own handler back."""
    os.write(2, b"interrupted while starting: nothing was done\n")
    os._exit(130)


# Every script imports this file first, before torch. Only a script of this folder run as a
# program gets the handler: a program that imports us (pytest, a notebook) keeps its own Ctrl-C.
_main_file = getattr(sys.modules.get("__main__"), "__file__", None) or ""
if _main_file and os.path.dirname(os.path.abspath(_main_file)) == os.path.dirname(os.path.abspath(__file__)):
    signal.signal(signal.SIGINT, interrupted_while_starting)

import torch  # noqa: E402  (after the handler: this import is the slow one)

IGNORE_INDEX = -100  # a target the loss leaves out (padding, masked prompts): cross_entropy's own default


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


def check_writable_folder(path):
    """Like writable_folder, but leaves nothing behind: `path` must be a folder this process can
    write in, or one it can create (tried with a probe folder, removed at once: root may write
    where os.access says so, yet not in /sys or /proc). For a check before long work that may
    still stop on another mistake."""
    if not path:
        raise FileNotFoundError("the output folder is an empty name; give a folder to write results in")
    if os.path.exists(path):
        return writable_folder(path)
    existing = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise NotADirectoryError(f"cannot create the folder {path}: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot create the folder {path}: {existing} is not writable")
    try:
        os.rmdir(tempfile.mkdtemp(dir=existing))
    except OSError as e:
        raise OSError(f"cannot create the folder {path}: {existing} takes no new folders "
                      f"({e.strerror or type(e).__name__})") from None
    return path


def remove_stale_temporaries(folder, names):
    """Remove NAME.tmp (atomic_write's temporary name) in `folder` for each of `names`, the files
    the calling script writes there: what a save killed mid-write (kill -9, power loss) left behind.
    Nothing else is touched. Returns a sentence naming what went, or "" when nothing did."""
    removed = []
    for name in names:
        tmp = os.path.join(folder, name + ".tmp")
        if os.path.isfile(tmp):
            size = os.path.getsize(tmp)
            os.remove(tmp)
            removed.append(f"{name}.tmp ({size / 2**20:.0f} MiB)" if size >= 2**20 else f"{name}.tmp")
    if not removed:
        return ""
    return f"removed {', '.join(removed)} from {folder}: left by a save that was killed before it finished"


LOCK_NAME = ".lock"  # the file whose OS lock a run holds in its output folder


def lock_folder(folder, what):
    """lock_file on FOLDER/.lock: one run at a time in an output folder (train.py's, eval.py's)."""
    return lock_file(os.path.join(folder, LOCK_NAME), what, folder)


def lock_file(path, what, name=None):
    """Hold an OS lock on the file at path (created if missing) for the rest of this process: a
    second run that asks for it is refused in one sentence naming `name` (default: path) and
    the process that holds it. The lock is the kernel's (flock), so a run that is killed (kill -9
    included) releases it with its process, and the next run needs no cleanup; the small file
    stays and says who held it last. `what` names the run in that message ("train.py").
    Returns the open lock file (keep it: closing it releases the lock). Where flock is missing
    (Windows) nothing is locked."""
    try:
        import fcntl
    except ImportError:
        return None
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise ValueError(f"{name or path} is in use by {holder}; wait for it to end, or give another "
                         "folder") from None
    f.seek(0)
    f.truncate()
    f.write(f"{what} (process {os.getpid()})\n")
    f.flush()
    return f


@contextlib.contextmanager
def hold_folder(folder, what):
    """The block runs with `folder` for this run alone: created if missing, locked (lock_folder)
    until the block ends. A run that created the folder and wrote nothing there (a mistake found
    later, Ctrl-C) removes it again, and the parents it made, so a refused run leaves nothing behind."""
    created = []  # the folders this run makes, the deepest first
    path = os.path.abspath(folder)
    while not os.path.exists(path):
        created.append(path)
        path = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    lock = lock_folder(folder, what)
    try:
        yield folder
    finally:
        if created and os.listdir(folder) == [LOCK_NAME]:
            os.remove(os.path.join(folder, LOCK_NAME))
            with contextlib.suppress(OSError):  # a folder another process wrote in since stays
                for path in created:
                    os.rmdir(path)
        if lock is not None:
            lock.close()


@contextlib.contextmanager
def atomic_write(path):
    """Yields a temporary name to write to, renamed to path only once the block has finished:
    a crash or Ctrl-C never leaves a half-written file where a good one was."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    try:
        yield tmp
        check_interrupted()
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def download(url, dest, headers=None):
    """Fetch url to dest with a progress line, through a temporary name; headers: extra request
    headers (an Authorization token), sent to url's server only, not on to where it redirects (the
    hub redirects to signed storage addresses, which refuse a second credential). A file the server
    does not have raises FileNotFoundError, one it refuses PermissionError, any other failure OSError."""
    try:
        request = urllib.request.Request(url)
        for name, value in (headers or {}).items():
            request.add_unredirected_header(name, value)
        with urllib.request.urlopen(request, timeout=30) as response, atomic_write(dest) as tmp, open(tmp, "wb") as f:
            total, done = int(response.headers.get("Content-Length") or 0), 0
            while chunk := response.read(1 << 20):
                f.write(chunk)
                done += len(chunk)
                if total:
                    print(f"\rdownloading {os.path.basename(dest)}: {done / 2**20:.0f}/{total / 2**20:.0f} MiB",
                          end="", file=sys.stderr, flush=True)
        if total:
            print(file=sys.stderr)
    except urllib.error.HTTPError as e:
        if e.code == 404:
            raise FileNotFoundError(f"{url} does not exist (HTTP 404)") from None
        if e.code in (401, 403):
            raise PermissionError(f"{url} was refused (HTTP {e.code}: {e.reason})") from None
        raise OSError(f"could not download {url} (HTTP {e.code}: {e.reason}); check the network") from None
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


def plural(count, word, words=None):
    """"1 step", "2 steps", "1,100 entries"; `words` where the rule is wrong ("process", "processes")."""
    if count == 1:
        return f"1 {word}"
    if words is None:
        words = word[:-1] + "ies" if word.endswith("y") and word[-2:-1] not in "aeiou" else word + "s"
    return f"{count:,} {words}"


def duration(seconds):
    """A time for people: 45s, 3m05s, 2h10m."""
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


INTERRUPTED = []  # the signals stop_on_interrupt's block received


@contextlib.contextmanager
def stop_on_interrupt(message):
    """Ctrl-C or SIGTERM inside the block ends the script with one line on stderr,
    "interrupted: <message>" (say what was kept and how to go on), and exit status 130."""
    def on_signal(signum, frame):
        INTERRUPTED.append(signum)
        raise KeyboardInterrupt
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    except KeyboardInterrupt:
        print(f"interrupted: {message}", file=sys.stderr, flush=True)
        sys.exit(130)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        INTERRUPTED.clear()


def check_interrupted():
    """Raise KeyboardInterrupt again if stop_on_interrupt's block received a signal whose
    KeyboardInterrupt Python swallowed (it only prints one raised in a weakref callback, such
    as the end of an import's): the check before a step that cannot be undone."""
    if INTERRUPTED:
        raise KeyboardInterrupt


class StatusLine:
    """A progress line: rewritten in place on a terminal, a plain line in a log (a file or a pipe,
    which carriage returns would garble). every = (terminal, log): the seconds due() waits for
    between lines; the wait counts from the last line shown, or from clear()."""

    def __init__(self, stream, every):
        self.stream, self.terminal = stream, stream.isatty()
        self.every = every[0] if self.terminal else every[1]
        self.shown_at, self.showing = time.perf_counter(), False

    def due(self):
        return time.perf_counter() - self.shown_at >= self.every

    def show(self, line):
        if self.terminal:
            self.stream.write(f"\r{line}\033[K")  # \033[K: erase the rest of a longer earlier line
            self.stream.flush()
            self.showing = True
        else:
            print(line, file=self.stream, flush=True)
        self.shown_at = time.perf_counter()

    def clear(self):
        """Before other output: erase a line shown in place, and count the wait from now."""
        if self.showing:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self.showing = False
        self.shown_at = time.perf_counter()


class Progress(StatusLine):
    """A status line on stderr for `total` steps of work: "WHAT done/total[, extra], T left",
    at once for the first step, then at most 10 times a second on a terminal and every `every`
    seconds in a log, and always for the last. Ends by keeping its last line (close)."""

    def __init__(self, what, total, every=10.0):
        super().__init__(sys.stderr, (0.1, every))
        self.what, self.total, self.start = what, total, self.shown_at
        self.shown_at = -math.inf

    def update(self, done, extra=""):
        if done < self.total and not self.due():
            return
        left = (time.perf_counter() - self.start) / max(done, 1) * (self.total - done)
        self.show(f"{self.what} {done}/{self.total}{extra}, {duration(left)} left")

    def note(self, message):
        """A line of its own, not over the progress line."""
        self.close()
        print(message, file=self.stream, flush=True)

    def close(self):
        """End a line shown in place, keeping it on the screen (before other output, or at the end)."""
        if self.showing:
            print(file=self.stream, flush=True)
            self.showing = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def run_main(main):
    """Run a script's main(); a user mistake ends it with one line and exit status 1 (under
    torchrun the line comes from the first process only, not once per process)."""
    if signal.getsignal(signal.SIGINT) is interrupted_while_starting:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # started: Ctrl-C is the script's to handle
    try:
        main()
    except (ValueError, OSError) as e:
        if os.environ.get("RANK", "0") != "0":
            # torchrun stops every process once one fails: give the first one time to say why
            time.sleep(2)
            sys.exit(1)
        sys.exit(f"error: {e}")
