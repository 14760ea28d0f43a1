"""Serve a model the OpenAI way, with continuous batching, and a chat page.

    python serve.py --ckpt out/best.pt                       # then open http://127.0.0.1:8000/
    python serve.py --model gpt2 --quantize int8 --port 8080 --api-key secret

POST /v1/chat/completions (messages in the model's prompt style), POST /v1/completions (a raw
prompt), GET /v1/models, GET /health, GET / (chat.html). One engine thread owns the model and
the KV cache: a request joins the running batch at the next decoding step and leaves it when it
is done, so a short reply never waits for a long one and greedy replies are generate()'s.
"""
import argparse
import json
import os
import queue
import select
import signal
import socket
import sys
import threading
import time
import uuid
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import torch

from checkpoint import add_model_args, load_for_inference
from common import AT_LEAST_1, POSITIVE, checked, resolve_device, run_main
from decoding import prefill, row_generators, sample_next
from model import KVCache
from prompts import EOT_ID, ROLES, decode, encode, encode_conversation

DEFAULT_SEED = 123  # a request without "seed" samples as generate.py does by default: the same reply every time
MAX_BODY = 1 << 20  # bytes of a request body; more is refused with 413
CHAT_PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "chat.html")


class APIError(Exception):
    """A request the server refuses: the HTTP status and OpenAI's error object."""

    def __init__(self, status, message, param=None, kind="invalid_request_error", code=None):
        super().__init__(message)
        self.status = status
        self.body = {"error": {"message": message, "type": kind, "param": param, "code": code}}


# ----------------------------------------------------------------------------- the engine


class Request:
    """One generation: its prompt and settings, the tokens made so far, and the events the
    engine sends its HTTP handler: ("text", new text) and at the end ("done", finish reason)
    or ("error", APIError)."""

    def __init__(self, prompt, max_tokens=None, temperature=0.0, top_p=None, seed=DEFAULT_SEED, stop=(),
                 device="cpu"):
        self.prompt, self.max_tokens, self.temperature, self.top_p = prompt, max_tokens, temperature, top_p
        self.stop = list(stop)
        self.generator = row_generators([prompt], seed, device)[0]  # as generate() samples this prompt
        self.tokens, self.sent, self.budget = [], "", None
        self.events = queue.SimpleQueue()
        self.cancelled = threading.Event()  # set by the handler when its client goes away

    def add(self, token):
        """Take the next token: returns the finish reason once the request is done, else None.
        Text goes out as soon as it can no longer turn into a stop string or a longer character."""
        if token == EOT_ID:
            return self.finish("stop", decode(self.tokens))
        self.tokens.append(token)
        text = decode(self.tokens)
        found = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if found:
            return self.finish("stop", text[:min(found)])
        if len(self.tokens) >= self.budget:
            return self.finish("length", text)
        held = len(text) - len(text.rstrip("\ufffd"))  # the first bytes of a character still to come
        held = max([held] + [n for s in self.stop for n in range(1, len(s)) if text.endswith(s[:n])])
        self.send_text(text[:len(text) - held])
        return None

    def send_text(self, text):
        if len(text) > len(self.sent):
            self.events.put(("text", text[len(self.sent):]))
            self.sent = text

    def finish(self, reason, text):
        self.send_text(text)
        self.events.put(("done", reason))
        return reason


class Engine:
    """Continuous batching: one thread runs the model over the batch of running requests, one
    token each per step. The requests that arrived since the last step are prefilled together
    (decoding.prefill) and merged into the batch's KV cache, every row re-padded on the left to
    the longest; a finished or abandoned one leaves the cache. Each row keeps its own positions
    and sees only its own keys (KVCache's pad_lens), so its tokens are the ones it would get alone."""

    def __init__(self, model, max_batch=8, max_queue=64):
        self.model, self.max_batch, self.max_queue = model, max_batch, max_queue
        self.device = model.wte.weight.device
        self.waiting, self.rows = deque(), []  # queued requests; the request of each batch row
        self.cache = self.logits = None  # the batch's KV cache and each row's next-token logits
        self.wake = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self.run, name="engine", daemon=True)

    def start(self):
        self.thread.start()
        return self

    def submit(self, request):
        """Queue a request for the next step; APIError 429 when max_queue are already waiting."""
        with self.wake:
            if self.stopping:
                raise APIError(503, "the server is shutting down", kind="server_error")
            self.waiting = deque(r for r in self.waiting if not r.cancelled.is_set())  # their clients left
            if len(self.waiting) >= self.max_queue:
                raise APIError(429, f"the server is busy: {len(self.waiting)} requests are waiting already; "
                               "try again later", kind="rate_limit_error", code="rate_limit_exceeded")
            self.waiting.append(request)
            self.wake.notify()

    def stats(self):
        with self.wake:
            return {"running": len(self.rows), "waiting": len(self.waiting)}

    def stop(self):
        """Stop the engine thread; requests under way or waiting end with a 503 error event."""
        with self.wake:
            self.stopping = True
            self.wake.notify()
        self.thread.join()

    def run(self):
        with torch.inference_mode():  # grad mode is per thread
            while True:
                with self.wake:
                    while not (self.rows or self.waiting or self.stopping):
                        self.wake.wait()
                    if self.stopping:
                        break
                    joining = [self.waiting.popleft() for _ in range(min(len(self.waiting),
                                                                         self.max_batch - len(self.rows)))]
                try:
                    joining = [r for r in joining if not r.cancelled.is_set()]
                    if joining:
                        self.join(joining)
                    if self.rows:
                        self.step()
                except Exception as e:  # noqa: BLE001  (out of memory, a bug: fail these requests, go on)
                    self.fail(APIError(500, f"generation failed: {type(e).__name__}: {e}", kind="server_error"),
                              joining)
            self.fail(APIError(503, "the server stopped before the reply was complete", kind="server_error"),
                      list(self.waiting))

    def fail(self, error, also=()):
        """End every running request (and those in also) with an error event, and empty the batch."""
        for request in {id(r): r for r in self.rows + list(also)}.values():
            request.events.put(("error", error))
        self.rows, self.cache, self.logits = [], None, None

    def join(self, requests):
        """Prefill the requests together (decoding.prefill, as generate() does: a row's result is
        the same as alone), then merge their cache and logits into the batch's."""
        ctx = self.model.config.context_length
        logits, cache, _ = prefill(self.model, [r.prompt for r in requests], max(r.max_tokens or ctx for r in requests))
        for r in requests:  # as prefill counts a budget, but with each request's own max_tokens
            r.budget = min(r.max_tokens or ctx, ctx - len(r.prompt) + 1)
        if not self.rows:
            self.rows, self.cache, self.logits = list(requests), cache, logits
            return
        rows = self.rows + list(requests)
        # a row still feeds back all but the last of the tokens it may yet make
        merged = KVCache.merge([(self.cache, i) for i in range(len(self.rows))] +
                               [(cache, i) for i in range(len(requests))],
                               [r.budget - len(r.tokens) - 1 for r in rows])
        self.rows, self.cache, self.logits = rows, merged, torch.cat([self.logits, logits])

    def step(self):
        """Sample each row's next token with its own settings, hand it to its request, drop the
        rows that are done or abandoned, and run the others one position further."""
        next_ids = torch.cat([sample_next(self.logits[j:j + 1], r.temperature, None, r.top_p, r.generator)
                              for j, r in enumerate(self.rows)])
        keep = [j for j, (r, token) in enumerate(zip(self.rows, next_ids.tolist()))
                if not r.cancelled.is_set() and r.add(token) is None]
        if len(keep) < len(self.rows):
            self.rows = [self.rows[j] for j in keep]
            if not keep:
                self.cache = self.logits = None
                return
            self.cache.reorder(torch.tensor(keep, device=self.device))
            next_ids = next_ids[keep]
        self.logits = self.model.forward_cached(next_ids[:, None], self.cache)


# ----------------------------------------------------------------------------- requests


def field(body, name, kinds, ok=lambda v: True, requirement="", default=None):
    """body[name] checked to be one of kinds (bool is no number) and ok; APIError 400 otherwise."""
    value, kinds = body.get(name), kinds if isinstance(kinds, tuple) else (kinds,)
    if value is None:
        return default
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds) or not ok(value):
        raise APIError(400, f"'{name}' must be {requirement}, got {json.dumps(value)[:60]}", param=name)
    return value


def check_messages(messages):
    """The chat messages as the renderer takes them: role and content of each. APIError 400 for a
    list that is not system?, then user and assistant in turn, ending with a user message."""
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list of {\"role\", \"content\"} objects", "messages")
    checked = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise APIError(400, f"messages[{i}] must be an object with a 'role' ({', '.join(ROLES)}) and a "
                           "string 'content'", "messages")
        previous = checked[-1]["role"] if checked else None
        expected = {None: ("system", "user"), "system": ("user",), "user": ("assistant",), "assistant": ("user",)}
        if m["role"] not in expected[previous]:
            raise APIError(400, f"messages[{i}] is {article(m['role'])} message after "
                           f"{article(previous) + ' one' if previous else 'nothing'}: the model takes an optional "
                           "system message, then user and assistant messages in turn", "messages")
        checked.append({"role": m["role"], "content": m["content"]})
    if checked[-1]["role"] != "user":
        raise APIError(400, "the last message must be the user's: the reply is the next assistant message",
                       "messages")
    return checked


def article(role):
    return ("an " if role == "assistant" else "a ") + role


def parse_request(body, chat, style, context_length, device):
    """A Request, and whether to stream it, from a request body; APIError 400 for what is wrong."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    if chat:
        prompt = encode_conversation(check_messages(body.get("messages")), style)[0]
    else:
        text = body.get("prompt")
        if not isinstance(text, str) or not text:
            raise APIError(400, "'prompt' must be a non-empty string (one prompt per request)", "prompt")
        prompt = encode(text)
    if len(prompt) > context_length:
        raise APIError(400, f"the prompt is {len(prompt)} tokens, over the model's context length of "
                       f"{context_length}", "messages" if chat else "prompt", code="context_length_exceeded")
    field(body, "n", int, lambda v: v == 1, "1 (one reply per request)")
    stop = field(body, "stop", (str, list), lambda v: isinstance(v, str) or (
        len(v) <= 4 and all(isinstance(s, str) and s for s in v)), "a string or a list of up to 4 strings", [])
    max_tokens = field(body, "max_completion_tokens", int, lambda v: v >= 1, "an integer of at least 1")
    max_tokens = field(body, "max_tokens", int, lambda v: v >= 1, "an integer of at least 1", max_tokens)
    temperature = field(body, "temperature", (int, float), lambda v: 0 <= v <= 2, "a number from 0 to 2", 0.0)
    top_p = field(body, "top_p", (int, float), lambda v: 0 < v <= 1, "a number in (0, 1]")
    seed = field(body, "seed", int, lambda v: 0 <= v < 2**63, "an integer from 0 to 2**63 - 1", DEFAULT_SEED)
    stream = field(body, "stream", bool, requirement="true or false", default=False)
    stop = [stop] if isinstance(stop, str) else stop
    return Request(prompt, max_tokens, temperature, top_p, seed, stop, device), stream


# ----------------------------------------------------------------------------- HTTP


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, and chunked streams

    def do_GET(self):
        self.route("GET")

    def do_POST(self):
        self.route("POST")

    def route(self, method):
        path = urlsplit(self.path).path.rstrip("/") or "/"
        routes = {("GET", "/"): self.page, ("GET", "/health"): self.health, ("GET", "/v1/models"): self.models,
                  ("POST", "/v1/chat/completions"): self.chat, ("POST", "/v1/completions"): self.completion}
        try:
            data = self.read_body() if method == "POST" else None  # read even when refused: keep-alive
            if (method, path) not in routes:
                raise APIError(404, f"no route {method} {path}: this server has POST /v1/chat/completions, "
                               "POST /v1/completions, GET /v1/models, GET /health and GET /")
            key = self.server.api_key
            if path.startswith("/v1/") and key and self.headers.get("Authorization") != f"Bearer {key}":
                raise APIError(401, "a valid API key is needed: send the header 'Authorization: Bearer KEY'",
                               code="invalid_api_key")
            try:
                body = None if data is None else json.loads(data)
            except ValueError as e:  # UnicodeDecodeError is one
                raise APIError(400, f"the request body is not valid JSON ({e})") from None
            routes[method, path](body)
        except APIError as e:
            self.send_json(e.status, e.body)
        except OSError:  # the client left, or went silent for the timeout
            self.close_connection = True

    def read_body(self):
        """The bytes of a POST body: 411 without a length, 413 over MAX_BODY bytes."""
        length = self.headers.get("Content-Length", "")
        if not length.isdigit():
            self.close_connection = True
            raise APIError(411, "a POST needs a Content-Length header (a number of bytes)")
        if int(length) > MAX_BODY:
            self.close_connection = True  # its body stays unread
            raise APIError(413, f"the request body is {length} bytes, over the limit of {MAX_BODY}")
        data = self.rfile.read(int(length))
        if len(data) < int(length):
            raise ConnectionResetError  # the client closed its end before the whole body
        return data

    def page(self, body):
        self.send_bytes(200, self.server.page, "text/html; charset=utf-8")

    def health(self, body):
        self.send_json(200, {"status": "ok", "model": self.server.model_name, **self.server.engine.stats()})

    def models(self, body):
        self.send_json(200, {"object": "list", "data": [{"id": self.server.model_name, "object": "model",
                                                         "created": self.server.created, "owned_by": "local"}]})

    def chat(self, body):
        self.generate(body, chat=True)

    def completion(self, body):
        self.generate(body, chat=False)

    def generate(self, body, chat):
        server = self.server
        request, stream = parse_request(body, chat, server.style, server.engine.model.config.context_length,
                                        server.engine.device)
        include_usage = stream and isinstance(body.get("stream_options"), dict) and \
            body["stream_options"].get("include_usage") is True
        server.engine.submit(request)
        head = {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex, "created": int(time.time()),
                "model": server.model_name}
        kind = "chat.completion" if chat else "text_completion"
        usage = lambda: {"prompt_tokens": len(request.prompt), "completion_tokens": len(request.tokens),  # noqa: E731
                         "total_tokens": len(request.prompt) + len(request.tokens)}

        def choice(text, reason, delta=False):
            if not chat:
                return {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
            message = {"role": "assistant", "content": text} if not delta else {"content": text} if text else {}
            return {"index": 0, "delta" if delta else "message": message, "logprobs": None, "finish_reason": reason}

        events = self.events(request)
        if not stream:
            text, reason = "", None
            for name, value in events:
                if name == "error":
                    raise value
                text, reason = (text + value, None) if name == "text" else (text, value)
            self.send_json(200, {**head, "object": kind, "choices": [choice(text, reason)], "usage": usage()})
            return
        chunk = {**head, "object": kind + ".chunk" if chat else kind}
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            if chat:
                self.send_event({**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                       "logprobs": None, "finish_reason": None}]})
            for name, value in events:
                if name == "error":  # the status is sent already: the error goes in the stream, as OpenAI does
                    self.send_event(value.body)
                    break
                self.send_event({**chunk, "choices": [choice(value, None, delta=True) if name == "text"
                                                      else choice("", value, delta=True)]})
            else:
                if include_usage:
                    self.send_event({**chunk, "choices": [], "usage": usage()})
                self.send_event("[DONE]")
            self.wfile.write(b"0\r\n\r\n")
        except OSError:  # the client went away (or stopped reading until the timeout): free its row
            request.cancelled.set()
            raise

    def events(self, request):
        """The engine's events for request until its last; the request is cancelled the moment
        the client hangs up (checked while waiting, so a silent non-streamed wait notices too)."""
        checked = time.monotonic()
        while True:
            try:
                name, value = request.events.get(timeout=0.1)
            except queue.Empty:
                name = None
            if time.monotonic() - checked >= 0.1:  # at most every 0.1 s: replies come token by token
                checked = time.monotonic()
                if client_gone(self.connection):
                    request.cancelled.set()
                    raise ConnectionResetError
            if name is not None:
                yield name, value
                if name != "text":
                    return

    def send_event(self, obj):
        data = b"data: " + (obj if isinstance(obj, str) else json.dumps(obj)).encode() + b"\n\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def send_json(self, status, obj):
        self.send_bytes(status, json.dumps(obj).encode(), "application/json")

    def send_bytes(self, status, data, content_type):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format, *args):
        if not self.server.quiet:
            super().log_message(format, *args)


def client_gone(sock):
    """True when the client closed its end of the connection (readable, and nothing to read)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


def make_server(engine, style, model_name, host="127.0.0.1", port=8000, api_key=None, timeout=60.0, quiet=False):
    """An HTTP server (not yet serving; a thread per connection) in front of an engine; port 0 picks a free one."""
    # the socket timeout: a client silent (or not reading) for this long is dropped
    server = ThreadingHTTPServer((host, port), type("TimedHandler", (Handler,), {"timeout": timeout}))
    server.engine, server.style, server.model_name, server.api_key, server.quiet = \
        engine, style, model_name, api_key, quiet
    server.created = int(time.time())
    with open(CHAT_PAGE, "rb") as f:
        server.page = f.read()
    return server


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on; 0.0.0.0 opens it to the network")
    p.add_argument("--port", type=checked(int, lambda v: 0 <= v < 65536, "a port number from 0 to 65535"),
                   default=8000, help="0 picks a free port")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/ requests")
    p.add_argument("--max-batch", type=AT_LEAST_1, default=8, help="requests decoded together at most")
    p.add_argument("--max-queue", type=AT_LEAST_1, default=64, help="requests waiting for a place at most; more get 429")
    p.add_argument("--timeout", type=POSITIVE, default=60.0, help="seconds a client may stay silent or not read")
    args = p.parse_args()

    device = resolve_device(args.device)
    model, _, style = load_for_inference(args.ckpt, args.model, args.prompt_style, device, args.quantize, args.base)
    name = os.path.basename(os.path.normpath(args.ckpt or args.model))
    engine = Engine(model, args.max_batch, args.max_queue)
    try:
        server = make_server(engine, style, name, args.host, args.port, args.api_key, args.timeout)
    except OSError as e:
        raise OSError(f"cannot listen on {args.host}:{args.port} ({e.strerror or e})") from None
    engine.start()
    host, port = server.server_address[:2]
    print(f"serving {name} (prompt style {style}, up to {args.max_batch} requests at once) on "
          f"http://{host}:{port}/ ; Ctrl-C stops", flush=True)

    def on_sigterm(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        cut = engine.stats()
        engine.stop()
        server.server_close()
        print(f"stopped: {cut['running']} replies under way and {cut['waiting']} waiting were cut off; "
              "nothing is kept, start serve.py again to go on", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    run_main(main)
