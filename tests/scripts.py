"""The repo's scripts run as real processes, without each paying for `import torch`.

`run` and `Popen` take subprocess's arguments. A command `[sys.executable, SCRIPT.py, ...]` naming
one of this repo's scripts starts in a fork of a warm process (the zygote: one per pytest process,
started at first use, which has imported torch and the library files and never runs a tensor
operation, so its forks inherit no thread pool): a real process of its own, with its own pid, pipes,
signals, locks, exit code and interpreter shutdown, as `python SCRIPT.py` has, but in some
milliseconds instead of the 2-3 s torch takes to import on a small CPU. The suite runs a few hundred
scripts; this is most of its time. Any other command goes to subprocess unchanged, and so does a
test about the start itself (Ctrl-C while torch loads).

The zygote's child runs the script as the interpreter would: `sys.argv`, `sys.path[0]`, the
working directory, the environment, new `sys.std*` over the given descriptors (line-buffered on a
terminal, unbuffered under PYTHONUNBUFFERED), default signal handlers, then `runpy` as `__main__`;
an exception, SystemExit or KeyboardInterrupt leaves through the interpreter's own exit."""
import atexit
import io
import json
import locale
import os
import random
import select
import signal
import socket
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIBRARY = ["common", "prompts", "data", "model", "hf", "lora", "quantize", "decoding", "checkpoint", "dpo", "step",
           "metrics", "dedup", "llm", "results"]


def repo_script(args, cwd):
    """The path of the repo script `args` runs with this Python, or None."""
    if len(args) < 2 or args[0] != sys.executable or not str(args[1]).endswith(".py"):
        return None
    path = os.path.realpath(os.path.join(cwd or os.getcwd(), str(args[1])))
    inside = os.path.dirname(path) in (ROOT, os.path.join(ROOT, "tests"))
    return path if inside and os.path.isfile(path) else None


def run(args, *, input=None, capture_output=False, timeout=None, check=False, **kwargs):
    """subprocess.run, through the zygote for a repo script."""
    if repo_script(args, kwargs.get("cwd")) is None:
        return subprocess.run(args, input=input, capture_output=capture_output, timeout=timeout, check=check,
                              **kwargs)
    if capture_output:
        kwargs["stdout"] = kwargs["stderr"] = subprocess.PIPE
    if input is not None:
        kwargs["stdin"] = subprocess.PIPE
    with Popen(args, **kwargs) as proc:
        try:
            stdout, stderr = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise
    result = subprocess.CompletedProcess(args, proc.returncode, stdout, stderr)
    if check:
        result.check_returncode()
    return result


def Popen(args, **kwargs):
    """subprocess.Popen, through the zygote for a repo script."""
    script = repo_script(args, kwargs.get("cwd"))
    if script is None:
        return subprocess.Popen(args, **kwargs)
    return ScriptProcess(args, script, **kwargs)


class ScriptProcess:
    """What subprocess.Popen offers of a process (pid, the pipes, poll, wait, communicate, signals),
    for a zygote's child."""

    def __init__(self, args, script, stdin=None, stdout=None, stderr=None, cwd=None, env=None, text=False,
                 universal_newlines=False, start_new_session=False):
        self.args, self.returncode = args, None
        text = text or universal_newlines
        ours, theirs = [], []  # our ends of the pipes; the child's descriptors 0, 1, 2

        def descriptor(spec, fd, reading):
            if spec == subprocess.PIPE:
                r, w = os.pipe()
                ours.append(w if reading else r)
                theirs.append(r if reading else w)
                return r if reading else w, (w if reading else r)
            if spec == subprocess.DEVNULL:
                null = os.open(os.devnull, os.O_RDWR)
                theirs.append(null)
                return null, None
            if spec is None:
                return fd, None
            return (spec if isinstance(spec, int) else spec.fileno()), None

        child_in, parent_in = descriptor(stdin, 0, True)
        child_out, parent_out = descriptor(stdout, 1, False)
        child_err, parent_err = (child_out, None) if stderr == subprocess.STDOUT else descriptor(stderr, 2, False)
        request = {"argv": [script, *map(str, args[2:])], "cwd": os.path.abspath(cwd or os.getcwd()),
                   "env": dict(os.environ if env is None else env), "new_session": start_new_session}
        try:
            self._key = zygote().start(request, [child_in, child_out, child_err])
            self.pid = self._key[0]
        finally:
            for fd in theirs:
                os.close(fd)
        encoding = locale.getpreferredencoding(False)
        self.stdin = self.stdout = self.stderr = None
        if parent_in is not None:
            self.stdin = os.fdopen(parent_in, "wb")
            if text:
                self.stdin = io.TextIOWrapper(self.stdin, encoding, write_through=True)
        if parent_out is not None:
            self.stdout = io.TextIOWrapper(os.fdopen(parent_out, "rb"), encoding) if text else os.fdopen(parent_out, "rb")
        if parent_err is not None:
            self.stderr = io.TextIOWrapper(os.fdopen(parent_err, "rb"), encoding) if text else os.fdopen(parent_err, "rb")
        self._readers = None

    def poll(self):
        if self.returncode is None:
            self.returncode = zygote().exit_code(self._key, block=False)
        return self.returncode

    def wait(self, timeout=None):
        if self.returncode is None:
            code = zygote().exit_code(self._key, timeout=timeout)
            if code is None:
                raise subprocess.TimeoutExpired(self.args, timeout)
            self.returncode = code
        return self.returncode

    def communicate(self, input=None, timeout=None):
        if self._readers is None:  # the first call: read both pipes to their ends, each in a thread
            self._output = {}
            self._readers = [threading.Thread(target=lambda n=name, s=stream: self._output.__setitem__(n, s.read()),
                                              daemon=True)
                             for name, stream in (("stdout", self.stdout), ("stderr", self.stderr)) if stream]
            for reader in self._readers:
                reader.start()
            if self.stdin:
                try:
                    if input:
                        self.stdin.write(input)
                    self.stdin.close()
                except BrokenPipeError:
                    pass
        deadline = None if timeout is None else time.monotonic() + timeout
        for reader in self._readers:
            reader.join(None if deadline is None else max(0, deadline - time.monotonic()))
            if reader.is_alive():
                raise subprocess.TimeoutExpired(self.args, timeout)
        self.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        for stream in (self.stdout, self.stderr):
            if stream:
                stream.close()
        return self._output.get("stdout"), self._output.get("stderr")

    def send_signal(self, sig):
        if self.poll() is None:
            os.kill(self.pid, sig)

    def terminate(self):
        self.send_signal(signal.SIGTERM)

    def kill(self):
        self.send_signal(signal.SIGKILL)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for stream in (self.stdin, self.stdout, self.stderr):
            if stream:
                try:
                    stream.close()
                except BrokenPipeError:
                    pass
        self.wait()


class Zygote:
    """The test process's side: start requests, and the exit codes the zygote reports, each child
    known by its pid and the how-manieth child of that pid it is (pids are reused: a few hundred
    scripts, each with its threads, wrap a pid_max of 32768)."""

    def __init__(self):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)  # one message a packet
        self.process = subprocess.Popen([sys.executable, os.path.abspath(__file__), str(theirs.fileno())],
                                        pass_fds=[theirs.fileno()], cwd=ROOT, stdin=subprocess.DEVNULL)
        theirs.close()
        self.sock, self.lock, self.changed = ours, threading.Lock(), threading.Condition()
        self.started, self.exits, self.generation, self.gone = [], {}, {}, False
        threading.Thread(target=self.listen, daemon=True).start()

    def listen(self):
        while packet := self.sock.recv(1 << 16):
            message = json.loads(packet)
            with self.changed:
                if "started" in message:  # a pid's next child; its previous one's exit was reported before
                    pid = message["started"]
                    self.generation[pid] = self.generation.get(pid, 0) + 1
                    self.started.append((pid, self.generation[pid]))
                else:
                    key = (message["pid"], self.generation[message["pid"]])
                    self.exits[key] = os.waitstatus_to_exitcode(message["status"])
                self.changed.notify_all()
        with self.changed:
            self.gone = True
            self.changed.notify_all()

    def start(self, request, fds):
        with self.lock, self.changed:
            socket.send_fds(self.sock, [json.dumps(request).encode()], fds)
            if not self.changed.wait_for(lambda: self.started or self.gone, timeout=60) or self.gone:
                raise RuntimeError("the zygote did not start the script (see its output above)")
            return self.started.pop(0)

    def exit_code(self, key, block=True, timeout=None):
        with self.changed:
            if block:
                self.changed.wait_for(lambda: key in self.exits or self.gone, timeout=timeout)
            if key not in self.exits and self.gone:
                raise RuntimeError("the zygote ended before the script did")
            return self.exits.get(key)

    def close(self):
        self.sock.shutdown(socket.SHUT_RDWR)  # the zygote reads the end of its requests, and ends
        self.sock.close()
        self.process.wait(timeout=60)


_zygote = None


def zygote():
    global _zygote
    if _zygote is None or _zygote.gone:
        _zygote = Zygote()
        atexit.register(_zygote.close)
    return _zygote


# The zygote itself: `python tests/scripts.py FD`.

def serve(sock):
    """Fork a child per request until the test process closes the socket; report each child's exit.
    Returns only in a child, with its request."""
    children = set()
    while True:
        while children:  # reap every child that has ended
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            children.discard(pid)
            sock.send(json.dumps({"pid": pid, "status": status}).encode())
        readable, _, _ = select.select([sock], [], [], 0.01 if children else 0.2)
        if not readable:
            continue
        message, fds, _, _ = socket.recv_fds(sock, 1 << 20, 3)
        if not message:
            return None  # the test process is done
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            sock.close()
            for target, fd in enumerate(fds):
                os.dup2(fd, target, inheritable=True)
            for fd in set(fds) - {0, 1, 2}:
                os.close(fd)
            return json.loads(message)
        for fd in fds:
            os.close(fd)
        children.add(pid)
        sock.send(json.dumps({"started": pid}).encode())


def become(request):
    """Turn this fork into `python SCRIPT ARGS`, as far as the script can tell."""
    if request["new_session"]:
        os.setsid()
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    random.seed()  # a new process's own random state, as a fresh interpreter would have
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()
    unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))
    encoding = os.environ.get("PYTHONIOENCODING") or locale.getpreferredencoding(False)

    def stream(fd, mode, errors="strict", line_buffering=False):
        raw = io.open(fd, mode + "b", buffering=0 if unbuffered and mode == "w" else -1, closefd=False)
        return io.TextIOWrapper(raw, encoding, errors, line_buffering=line_buffering,
                                write_through=unbuffered and mode == "w")

    sys.stdin = sys.__stdin__ = stream(0, "r")
    sys.stdout = sys.__stdout__ = stream(1, "w", line_buffering=os.isatty(1))
    sys.stderr = sys.__stderr__ = stream(2, "w", "backslashreplace", line_buffering=True)
    sys.argv = request["argv"]
    sys.path[0] = os.path.dirname(request["argv"][0])


def run_as_main(path):
    """runpy as __main__, then the interpreter's exit as a script sees it (threads joined, atexit
    handlers run, output flushed, the exit code or Ctrl-C's signal) without its second or so of
    tearing down torch's modules."""
    interrupted = False
    try:
        runpy.run_path(path, run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code
        if code is not None and not isinstance(code, int):
            print(code, file=sys.stderr)
            code = 1
    except BaseException as e:  # what the interpreter does with an uncaught exception
        sys.excepthook(type(e), e, e.__traceback__)
        interrupted, code = isinstance(e, KeyboardInterrupt), 1
    threading._shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    if interrupted:  # as Python ends on an uncaught KeyboardInterrupt: killed by SIGINT
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit((code or 0) & 0xFF)


if __name__ == "__main__":
    import runpy

    sys.path[0] = ROOT
    import torch  # noqa: F401
    for name in LIBRARY:
        __import__(name)
    request = serve(socket.socket(fileno=int(sys.argv[1])))
    if request is not None:
        become(request)
        run_as_main(request["argv"][0])
