"""Serve a model the OpenAI way, with continuous batching, and a chat page.

    python serve.py --ckpt out/best.pt                       # then open http://127.0.0.1:8000/
    python serve.py --model gpt2 --quantize int8 --port 8080 --api-key secret --cors https://app.example

POST /v1/chat/completions (messages in the model's prompt style: by default a model's own chat
template if it has one), POST /v1/completions (raw prompts, or with "echo"
and "logprobs" the log-probabilities of a prompt's tokens, as lm-evaluation-harness asks them),
POST /tokenize, GET /v1/models, GET /health, GET / (chat.html). One engine thread owns the
model and the KV cache: a request joins the running batch at the next decoding step and leaves
it when it is done, so a short reply never waits for a long one and greedy replies are
generate()'s. Nothing a request sends can fail or stall another: its settings are bounded
(MAX_BODY, MAX_STOPS, MAX_STOP_CHARS, MIN_TEMPERATURE) and its failures are its own.
Text goes in and out through the model's own tokenizer, and a reply ends at any of its stop
tokens (GPT-2's <|endoftext|>; <|im_end|>, <|eot_id|>, ... in the Llama family). A special
token typed in a message or a prompt is text, never the token: a user cannot end the assistant's
turn or write a system turn of their own.
"""
import common  # noqa: F401  (first: Ctrl-C while torch loads is one line, see common.py)
import argparse
import hmac
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
from common import AT_LEAST_1, POSITIVE, checked, plural, resolve_device, run_main
from decoding import TextStream, prefill, row_generators, sample_next
from model import KVCache
from prompts import CHAT_TEMPLATE, GPT2, ROLES, encode_conversation

DEFAULT_SEED = 123  # a request without "seed" samples as generate.py does by default: the same reply every time
MAX_BODY = 1 << 20  # bytes of a request body; more is refused with 413
MAX_STOPS, MAX_STOP_CHARS = 4, 1000  # stop strings of a request (OpenAI's limit) and characters of each
# Below this a temperature decodes greedily, as in vLLM: dividing the logits by less can overflow
# float32 to inf and NaN, and at this temperature sampling is greedy but for near-exact ties.
MIN_TEMPERATURE = 1e-5
MAX_DEPTH = 32  # levels of nesting in a request body (OpenAI's requests need about 6; Python's own limit is ~1,000)
MAX_LOGPROBS = 5  # the most likely tokens listed per position with "logprobs", as OpenAI's legacy completions
CHAT_PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "chat.html")
# path -> (method, handler name); every GET route also answers HEAD; all but the first two need the API key
ROUTES = {"/": ("GET", "page"), "/health": ("GET", "health"), "/v1/models": ("GET", "models"),
          "/v1/chat/completions": ("POST", "chat"), "/v1/completions": ("POST", "completion"),
          "/tokenize": ("POST", "tokenize")}
OPEN_ROUTES = ("/", "/health")


class APIError(Exception):
    """A request the server refuses: the HTTP status, OpenAI's error object and any headers."""

    def __init__(self, status, message, param=None, kind="invalid_request_error", code=None, headers=None):
        super().__init__(message)
        self.status, self.headers = status, headers or {}
        self.body = {"error": {"message": message, "type": kind, "param": param, "code": code}}


# ----------------------------------------------------------------------------- stop strings


def kmp_fallback(s):
    """For each i, the length of the longest proper prefix of s[:i + 1] that is also its suffix."""
    fallback, n = [0] * len(s), 0
    for i in range(1, len(s)):
        while n and s[i] != s[n]:
            n = fallback[n - 1]
        n += s[i] == s[n]
        fallback[i] = n
    return fallback


class StopStrings:
    """Finds the first of some stop strings in a text that arrives piece by piece, at a cost
    proportional to the new text, however long the stop strings (Knuth-Morris-Pratt: for each
    string, the length of its longest prefix that the text ends with, advanced a character at a time)."""

    def __init__(self, stops):
        self.stops, self.fallbacks = list(stops), [kmp_fallback(s) for s in stops]
        self.matched = [0] * len(self.stops)
        self.seen = 0  # characters of text taken so far

    def feed(self, text):
        """Take the next piece of the text: the position (in the whole text) where the earliest
        stop string found in it starts, else None."""
        starts = []
        for k, (stop, fallback) in enumerate(zip(self.stops, self.fallbacks)):
            n = self.matched[k]
            for i, char in enumerate(text):
                while n and stop[n] != char:
                    n = fallback[n - 1]
                n += stop[n] == char
                if n == len(stop):
                    starts.append(self.seen + i + 1 - n)
                    break
            self.matched[k] = n
        self.seen += len(text)
        return min(starts, default=None)

    def held(self):
        """How many characters at the end of the text may yet begin a stop string."""
        return max(self.matched, default=0)


# ----------------------------------------------------------------------------- the engine


class Request:
    """One generation: its prompt and settings, the tokens made so far, and the events the
    engine sends its HTTP handler: ("text", new text) and at the end ("done", finish reason)
    or ("error", APIError). It decodes with the model's tokenizer and ends at any of its stop
    ids. An echo request is scored instead of decoded (Engine.score)."""

    def __init__(self, prompt, max_tokens=None, temperature=0.0, top_p=None, seed=DEFAULT_SEED, stop=(),
                 device="cpu", echo=False, logprobs=None, tokenizer=GPT2):
        self.prompt, self.max_tokens, self.temperature, self.top_p = prompt, max_tokens, temperature, top_p
        self.echo, self.logprobs, self.tokenizer = echo, logprobs, tokenizer
        self.stop_ids = frozenset(tokenizer.stop_ids)
        self.stops = StopStrings(stop)
        self.generator = row_generators([prompt], seed, device)[0]  # as generate() samples this prompt
        self.tokens, self.budget = [], None
        self.text = TextStream(tokenizer)  # the reply's text, a whole character at a time
        self.unsent, self.sent = "", 0  # text taken but held back (a stop string may begin there); characters sent
        self.scores = None  # an echo request's (token log-probabilities, top tokens) once scored
        self.events = queue.SimpleQueue()
        self.cancelled = threading.Event()  # set by the handler when its client goes away

    def add(self, token):
        """Take the next token: returns the finish reason once the request is done, else None.
        Text goes out as soon as it can no longer turn into a stop string or a longer character.
        Only the new tokens are decoded and searched: the cost of a token does not grow with the reply."""
        stopped = token in self.stop_ids
        last = stopped or len(self.tokens) + 1 >= self.budget
        new = ""
        if not stopped:
            self.tokens.append(token)
            new = self.text.add(token)
        if last:  # an incomplete character at the very end is U+FFFD
            new += self.text.finish()
        self.unsent += new
        start = self.stops.feed(new)
        if start is not None:
            return self.finish("stop", self.unsent[:start - self.sent])
        if last:
            return self.finish("stop" if stopped else "length", self.unsent)
        self.send_text(self.unsent[:len(self.unsent) - self.stops.held()])
        return None

    def send_text(self, text):
        if text:
            self.events.put(("text", text))
            self.unsent, self.sent = self.unsent[len(text):], self.sent + len(text)

    def finish(self, reason, text):
        self.send_text(text)
        self.events.put(("done", reason))
        return reason


class Engine:
    """Continuous batching: one thread runs the model over the batch of running requests, one
    token each per step. The requests that arrived since the last step are prefilled together
    (decoding.prefill) and merged into the batch's KV cache, every row re-padded on the left to
    the longest; a finished or abandoned one leaves the cache. Each row keeps its own positions
    and sees only its own keys (KVCache's pad_lens), so its tokens are the ones it would get alone.
    Between two steps it also scores one echo request (a forward pass over its prompt)."""

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

    def submit(self, requests):
        """Queue requests for the next step; APIError 429 when they would make more than max_queue waiting."""
        with self.wake:
            if self.stopping:
                raise APIError(503, "the server is shutting down", kind="server_error")
            self.waiting = deque(r for r in self.waiting if not r.cancelled.is_set())  # their clients left
            if len(self.waiting) + len(requests) > self.max_queue:
                waiting = len(self.waiting)
                raise APIError(429, f"the server is busy: {plural(waiting, 'request')} "
                               f"{'is' if waiting == 1 else 'are'} waiting already (at most {self.max_queue}); "
                               "try again later", kind="rate_limit_error", code="rate_limit_exceeded")
            self.waiting.extend(requests)
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

    def next_requests(self):
        """Under the lock: the waiting requests that start now, in their order, as many as the batch has
        places for, and at most one echo request (as long as a prefill: the rows wait for one at a time)."""
        joining, scoring = [], None
        while self.waiting and len(self.rows) + len(joining) + (scoring is not None) < self.max_batch:
            if self.waiting[0].echo:
                if scoring is not None:
                    break
                scoring = self.waiting.popleft()
            else:
                joining.append(self.waiting.popleft())
        return [r for r in joining if not r.cancelled.is_set()], scoring

    def run(self):
        with torch.inference_mode():  # grad mode is per thread
            while True:
                with self.wake:
                    while not (self.rows or self.waiting or self.stopping):
                        self.wake.wait()
                    if self.stopping:
                        break
                    joining, scoring = self.next_requests()
                if scoring is not None and not scoring.cancelled.is_set():
                    self.attempt([scoring], self.score, scoring)
                if joining:
                    self.attempt(joining, self.join, joining)  # the batch is only changed once the join has worked
                if self.rows:
                    self.attempt(self.rows, self.step, whole_batch=True)
            self.fail(APIError(503, "the server stopped before the reply was complete", kind="server_error"),
                      self.rows + list(self.waiting))

    def attempt(self, requests, work, *args, whole_batch=False):
        """work(*args) for requests; if it fails (out of memory, a bug) those requests end with a 500 error
        and the others go on; a failed step leaves the batch's cache unknown, so it ends the batch."""
        try:
            work(*args)
        except Exception as e:  # noqa: BLE001
            self.fail(APIError(500, f"generation failed: {type(e).__name__}: {e}", kind="server_error"), requests)
            if whole_batch:
                self.rows, self.cache, self.logits = [], None, None

    def fail(self, error, requests):
        for request in {id(r): r for r in requests}.values():
            request.events.put(("error", error))

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
        rows that are done, abandoned or failed (a request's own failure ends only that request),
        and run the others one position further."""
        rows, tokens = self.rows, []
        for j, r in enumerate(rows):
            try:
                tokens.append(sample_next(self.logits[j:j + 1], r.temperature, None, r.top_p, r.generator))
            except Exception as e:  # noqa: BLE001
                self.fail(APIError(500, f"sampling failed: {type(e).__name__}: {e}", kind="server_error"), [r])
                tokens.append(torch.tensor([-1], device=self.device))
        next_ids = torch.cat(tokens)
        keep = [j for j, (r, token) in enumerate(zip(rows, next_ids.tolist()))
                if token >= 0 and not r.cancelled.is_set() and self.take(r, token)]
        if len(keep) < len(rows):
            self.rows = [rows[j] for j in keep]
            if not keep:
                self.cache = self.logits = None
                return
            self.cache.reorder(torch.tensor(keep, device=self.device))
            next_ids = next_ids[keep]
        self.logits = self.model.forward_cached(next_ids[:, None], self.cache)

    def take(self, request, token):
        """Hand token to request: True while it goes on (False once done, or failed on its own)."""
        try:
            return request.add(token) is None
        except Exception as e:  # noqa: BLE001
            self.fail(APIError(500, f"decoding failed: {type(e).__name__}: {e}", kind="server_error"), [request])
            return False

    def score(self, request):
        """An echo request: one forward pass over its prompt gives each token's log-probability
        after the tokens before it and the most likely tokens there; with max_tokens 1 the next
        token is chosen from the last position as decoding chooses it, and scored too."""
        logits = self.model(torch.tensor([request.prompt], device=self.device))[0]
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        tokens = list(request.prompt)
        if request.max_tokens:
            tokens.append(int(sample_next(logits[-1:], request.temperature, None, request.top_p, request.generator)))
        scored = logprobs[:len(tokens) - 1]  # the positions whose next token is known
        chosen = scored.gather(1, torch.tensor(tokens[1:], device=self.device)[:, None])[:, 0].tolist()
        top = torch.topk(scored, request.logprobs or 0, dim=-1)
        request.tokens = tokens[len(request.prompt):]
        request.scores = (tokens, [None] + chosen, [None] + list(zip(top.indices.tolist(), top.values.tolist())))
        stopped = bool(request.tokens) and request.tokens[0] in request.stop_ids
        request.events.put(("done", "stop" if stopped else "length"))


# ----------------------------------------------------------------------------- requests


def field(body, name, kinds, ok=lambda v: True, requirement="", default=None):
    """body[name] checked to be one of kinds (bool is no number) and ok; APIError 400 otherwise."""
    value, kinds = body.get(name), kinds if isinstance(kinds, tuple) else (kinds,)
    if value is None:
        return default
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds) or not ok(value):
        raise APIError(400, f"'{name}' must be {requirement}, got {json.dumps(value)[:60]}", param=name)
    return value


def check_messages(messages, style="alpaca"):
    """The chat messages as the renderer takes them. APIError 400 for a list that is not
    system?, then user and assistant in turn, ending with a user turn. In the GPT-2 styles a user
    message right after another one is that one's input (the Alpaca input block), as in the
    exported chat templates: a turn is one user message, or two. In the chat-template style the
    model's own template renders the messages as they come, as apply_chat_template does (and the
    exported folder and GGUF file): user messages in a row are turns of their own."""
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list of {\"role\", \"content\"} objects", "messages")
    own_template = style == CHAT_TEMPLATE
    checked = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise APIError(400, f"messages[{i}] must be an object with a 'role' ({', '.join(ROLES)}) and a "
                           "string 'content'", "messages")
        previous = checked[-1] if checked else None
        if (previous is not None and previous["role"] == m["role"] == "user" and "input" not in previous
                and not own_template):
            previous["input"] = m["content"]
            continue
        role = previous and ("input" if "input" in previous else previous["role"])
        expected = {None: ("system", "user"), "system": ("user",), "user": ("assistant", "user"),
                    "input": ("assistant",), "assistant": ("user",)}
        if m["role"] not in expected[role]:
            after = "nothing" if role is None else "a user message and its input" if role == "input" else \
                f"{article(role)} one"
            may = "" if own_template else " (a user message may be followed by one more, its input)"
            raise APIError(400, f"messages[{i}] is {article(m['role'])} message after {after}: the model takes an "
                           f"optional system message, then user and assistant messages in turn{may}", "messages")
        checked.append({"role": m["role"], "content": m["content"]})
    if checked[-1]["role"] != "user":
        raise APIError(400, "the last message must be the user's: the reply is the next assistant message",
                       "messages")
    return checked


def article(role):
    return ("an " if role == "assistant" else "a ") + role


def is_token_ids(value):
    return isinstance(value, list) and bool(value) and all(isinstance(t, int) and not isinstance(t, bool)
                                                           for t in value)


def completion_prompts(body, vocab_size, most, tokenizer=GPT2):
    """The token ids of each prompt of a /v1/completions request: "prompt" is a string (encoded
    by text_ids), a list of token ids, or a list of up to `most` strings or lists of token ids (as
    lm-evaluation-harness sends them). APIError 400 otherwise."""
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) or is_token_ids(prompt) else prompt
    if not (isinstance(prompts, list) and 0 < len(prompts) <= most
            and all((isinstance(p, str) and p) or is_token_ids(p) for p in prompts)):
        raise APIError(400, f"'prompt' must be a non-empty string, a list of token ids, or a list of up to {most} "
                       "of either", "prompt")
    ids = []
    for p in prompts:
        if isinstance(p, str):
            p = text_ids(p, tokenizer)
        elif min(p) < 0 or max(p) >= min(vocab_size, tokenizer.vocab_size):
            # a vocabulary padded to a round size has more ids than the tokenizer
            theirs = f", its tokenizer's 0 to {tokenizer.vocab_size - 1}" if tokenizer.vocab_size < vocab_size else ""
            raise APIError(400, f"'prompt' holds a token id the model or its tokenizer does not have (the model's "
                           f"are 0 to {vocab_size - 1}{theirs})", "prompt")
        ids.append(p)
    return ids


def text_ids(text, tokenizer=GPT2):
    """The ids of a raw text prompt: what the tokenizer puts before a text (Llama 3's
    <|begin_of_text|>; nothing for GPT-2), then the text, always as text."""
    return list(tokenizer.bos_ids) + tokenizer.encode(text)


def conversation_ids(messages, style, tokenizer=GPT2):
    """The prompt ids of a chat request's messages (check_messages), rendered in the style (a chat
    model's own template) with typed special tokens as text; APIError 400 if they cannot be."""
    try:
        return encode_conversation(check_messages(messages, style), style, tokenizer)[0]
    except ValueError as e:  # the template refused these messages (its raise_exception)
        raise APIError(400, str(e), "messages") from None


def parse_request(body, chat, style, config, device, most_prompts=1, tokenizer=GPT2):
    """The Requests of a request body (one for chat, one per prompt for completions), and whether
    to stream the reply; APIError 400 for what is wrong."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    if chat:
        prompts = [conversation_ids(body.get("messages"), style, tokenizer)]
    else:
        prompts = completion_prompts(body, config.vocab_size, most_prompts, tokenizer)
    for prompt in prompts:
        if len(prompt) > config.context_length:
            raise APIError(400, f"the prompt is {len(prompt)} tokens, over the model's context length of "
                           f"{config.context_length}", "messages" if chat else "prompt",
                           code="context_length_exceeded")
    field(body, "n", int, lambda v: v == 1, "1 (one reply per prompt)")
    stop = field(body, "stop", (str, list), lambda v: all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS
                                                          for s in ([v] if isinstance(v, str) else v))
                 and (isinstance(v, str) or len(v) <= MAX_STOPS),
                 f"a string or a list of up to {MAX_STOPS} strings, each of 1 to {MAX_STOP_CHARS:,} characters", [])
    echo = not chat and field(body, "echo", bool, requirement="true or false", default=False)
    logprobs = None if chat else field(body, "logprobs", int, lambda v: 0 <= v <= MAX_LOGPROBS,
                                       f"an integer from 0 to {MAX_LOGPROBS}")
    least = 0 if echo else 1
    max_tokens = field(body, "max_completion_tokens", int, lambda v: v >= least, f"an integer of at least {least}")
    max_tokens = field(body, "max_tokens", int, lambda v: v >= least, f"an integer of at least {least}", max_tokens)
    temperature = field(body, "temperature", (int, float), lambda v: 0 <= v <= 2, "a number from 0 to 2", 0.0)
    top_p = field(body, "top_p", (int, float), lambda v: 0 < v <= 1, "a number in (0, 1]")
    seed = field(body, "seed", int, lambda v: 0 <= v < 2**63, "an integer from 0 to 2**63 - 1", DEFAULT_SEED)
    stream = field(body, "stream", bool, requirement="true or false", default=False)
    if echo and (max_tokens or 0) > 1:
        raise APIError(400, "with 'echo' the prompt is scored: 'max_tokens' must be 0 or 1", "max_tokens")
    if logprobs is not None and not echo:
        raise APIError(400, "'logprobs' comes with 'echo': true (the log-probabilities of the prompt's tokens); "
                       "generated tokens get none", "logprobs")
    if stream and (echo or len(prompts) > 1):
        raise APIError(400, "'stream' takes one prompt, without 'echo'", "stream")
    stop = [stop] if isinstance(stop, str) else stop
    temperature = 0.0 if temperature < MIN_TEMPERATURE else temperature
    return [Request(p, max_tokens or (0 if echo else None), temperature, top_p, seed, stop, device, echo, logprobs,
                    tokenizer) for p in prompts], stream


def echo_logprobs(request):
    """OpenAI's legacy logprobs object of a scored request: each token's text, log-probability
    (none for the first token, which follows nothing) and the request's number of most likely
    tokens at its place, with the token itself, and where each token's text starts in the echoed text."""
    tokens, chosen, tops = request.scores
    decode = request.tokenizer.decode
    texts = [decode([t]) for t in tokens]
    offsets, top_logprobs = [], []
    for k, (token, logprob, top) in enumerate(zip(tokens, chosen, tops)):
        offsets.append(len(decode(tokens[:k])))
        if top is None:
            top_logprobs.append(None)
            continue
        listed = {}
        for t, value in [*zip(*top), (token, logprob)]:
            listed.setdefault(decode([t]), value)  # the more likely of two tokens spelled alike
        top_logprobs.append(listed)
    return {"tokens": texts, "token_logprobs": chosen, "top_logprobs": top_logprobs, "text_offset": offsets}


# ----------------------------------------------------------------------------- HTTP


def nested_deeper(value, depth):
    """Whether a parsed JSON value nests lists and objects more than `depth` levels deep (iterative:
    no recursion for a hostile body to exhaust)."""
    stack = [(value, 1)]
    while stack:
        value, level = stack.pop()
        if isinstance(value, (list, dict)):
            if level > depth:
                return True
            stack.extend((item, level + 1) for item in (value.values() if isinstance(value, dict) else value))
    return False


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, and chunked streams

    def __getattr__(self, name):
        """do_GET, do_POST, do_HEAD, do_PUT, any method at all: route() answers each, so an
        unknown method gets a JSON 405 (or 404) instead of the standard library's HTML 501."""
        if name.startswith("do_"):
            return lambda: self.route(name[3:])
        raise AttributeError(name)

    def route(self, method):
        path, self.responded = urlsplit(self.path).path.rstrip("/") or "/", False
        try:
            data = self.read_body(method)  # read even when refused: keep-alive
            if path not in ROUTES:
                raise APIError(404, f"no route {path}: this server has "
                               f"{', '.join(f'{m} {route}' for route, (m, _) in ROUTES.items())}")
            allowed, name = ROUTES[path]
            methods = [allowed] + ["HEAD"] * (allowed == "GET") + ["OPTIONS"] * bool(self.server.cors)
            if method == "OPTIONS" and self.server.cors:
                return self.preflight(methods)
            if method not in methods:
                raise APIError(405, f"{path} takes {' or '.join(methods)}, not {method}",
                               headers={"Allow": ", ".join(methods)})
            if path not in OPEN_ROUTES and not self.authorized():
                raise APIError(401, "a valid API key is needed: send the header 'Authorization: Bearer KEY'",
                               code="invalid_api_key")
            try:
                body = None if data is None else json.loads(data)
            except ValueError as e:  # UnicodeDecodeError is one
                raise APIError(400, f"the request body is not valid JSON ({e})") from None
            except RecursionError:  # deeper than Python's parser goes
                raise APIError(400, f"the request body is nested more than {MAX_DEPTH} levels deep") from None
            if nested_deeper(body, MAX_DEPTH):  # a field this deep would fail the checks (json.dumps) later
                raise APIError(400, f"the request body is nested more than {MAX_DEPTH} levels deep")
            getattr(self, name)(body)
        except APIError as e:
            self.send_json(e.status, e.body, e.headers)
        except OSError:  # the client left, or went silent for the timeout
            self.close_connection = True
        except Exception as e:  # a fault of ours, met by this request alone: a 500 and one line in the log
            self.close_connection = True
            self.log_error("%s %s failed: %s: %s", method, path, type(e).__name__, e)
            if not self.responded:
                self.send_json(500, APIError(500, f"the server failed on this request ({type(e).__name__}); "
                                              "other requests go on", kind="server_error").body)

    def read_body(self, method):
        """The bytes of a request's body (None without one): 411 for a POST without a length,
        413 over MAX_BODY bytes."""
        length = self.headers.get("Content-Length")
        if length is None and method != "POST" and "Transfer-Encoding" not in self.headers:
            return None
        if length is None or not length.isdigit():
            self.close_connection = True
            raise APIError(411, f"a {method} with a body needs a Content-Length header (a number of bytes)")
        if int(length) > MAX_BODY:
            self.close_connection = True  # its body stays unread
            raise APIError(413, f"the request body is {length} bytes, over the limit of {MAX_BODY}")
        data = self.rfile.read(int(length))
        if len(data) < int(length):
            raise ConnectionResetError  # the client closed its end before the whole body
        return data

    def authorized(self):
        """Whether the request carries the API key (if there is one), compared in constant time."""
        key = self.server.api_key
        sent = self.headers.get("Authorization", "").encode("latin-1")  # headers are read as latin-1
        return key is None or hmac.compare_digest(sent, b"Bearer " + key.encode())

    def preflight(self, methods):
        """A browser's CORS preflight, with --cors: the methods and headers a page on that origin may send."""
        self.send_response(204)
        self.send_header("Access-Control-Allow-Methods", ", ".join(methods))
        self.send_header("Access-Control-Allow-Headers", "Authorization, Content-Type")
        self.send_header("Access-Control-Max-Age", "600")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def page(self, body):
        self.send_bytes(200, self.server.page, "text/html; charset=utf-8")

    def health(self, body):
        self.send_json(200, {"status": "ok", "model": self.server.model_name, **self.server.engine.stats()})

    def models(self, body):
        self.send_json(200, {"object": "list", "data": [{"id": self.server.model_name, "object": "model",
                                                         "created": self.server.created, "owned_by": "local"}]})

    def tokenize(self, body):
        """vLLM's POST /tokenize: the token ids of a "prompt", or of "messages" rendered as a chat
        request renders them, and the context length (the chat page fits its conversation with it)."""
        if not isinstance(body, dict) or not (isinstance(body.get("prompt"), str) or "messages" in body):
            raise APIError(400, "the request body must be a JSON object with a 'prompt' string or 'messages'")
        tokenizer = self.server.tokenizer
        ids = text_ids(body["prompt"], tokenizer) if "messages" not in body else \
            conversation_ids(body["messages"], self.server.style, tokenizer)
        self.send_json(200, {"count": len(ids), "max_model_len": self.server.engine.model.config.context_length,
                             "tokens": ids})

    def chat(self, body):
        self.generate(body, chat=True)

    def completion(self, body):
        self.generate(body, chat=False)

    def generate(self, body, chat):
        engine = self.server.engine
        requests, stream = parse_request(body, chat, self.server.style, engine.model.config, engine.device,
                                         engine.max_queue, self.server.tokenizer)
        engine.submit(requests)
        try:
            head = {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex, "created": int(time.time()),
                    "model": self.server.model_name}
            prompt_tokens, completion_tokens = sum(len(r.prompt) for r in requests), lambda: sum(
                len(r.tokens) for r in requests)
            usage = lambda: {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens(),  # noqa: E731
                             "total_tokens": prompt_tokens + completion_tokens()}
            if stream:
                include_usage = isinstance(body.get("stream_options"), dict) and \
                    body["stream_options"].get("include_usage") is True
                self.stream(requests[0], head, chat, usage if include_usage else None)
                return
            choices = []
            for index, request in enumerate(requests):
                text, reason = "", None
                for name, value in self.events(request):
                    if name == "error":
                        raise value
                    text, reason = (text + value, None) if name == "text" else (text, value)
                if request.echo:  # the prompt and any token chosen after it
                    text = request.tokenizer.decode(request.prompt + [t for t in request.tokens
                                                                      if t not in request.stop_ids])
                choices.append({**choice(text, reason, chat), "index": index})
                if request.logprobs is not None:
                    choices[-1]["logprobs"] = echo_logprobs(request)
            self.send_json(200, {**head, "object": "chat.completion" if chat else "text_completion",
                                 "choices": choices, "usage": usage()})
        finally:
            for request in requests:  # done, or given up on: an error, a client that left
                request.cancelled.set()

    def stream(self, request, head, chat, usage):
        """Send a request's reply as server-sent events (OpenAI's chunks, then [DONE])."""
        chunk = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if chat:
            self.send_event({**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                   "logprobs": None, "finish_reason": None}]})
        for name, value in self.events(request):
            if name == "error":  # the status is sent already: the error goes in the stream, as OpenAI does
                self.send_event(value.body)
                break
            self.send_event({**chunk, "choices": [choice(value, None, chat, delta=True) if name == "text"
                                                  else choice("", value, chat, delta=True)]})
        else:
            if usage is not None:
                self.send_event({**chunk, "choices": [], "usage": usage()})
            self.send_event("[DONE]")
        self.wfile.write(b"0\r\n\r\n")

    def events(self, request):
        """The engine's events for request until its last; ConnectionResetError the moment the
        client hangs up (checked while waiting, so a silent non-streamed wait notices too)."""
        checked = time.monotonic()
        while True:
            try:
                name, value = request.events.get(timeout=0.1)
            except queue.Empty:
                name = None
            if time.monotonic() - checked >= 0.1:  # at most every 0.1 s: replies come token by token
                checked = time.monotonic()
                if client_gone(self.connection):
                    raise ConnectionResetError
            if name is not None:
                yield name, value
                if name != "text":
                    return

    def send_event(self, obj):
        data = b"data: " + (obj if isinstance(obj, str) else json.dumps(obj)).encode() + b"\n\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def send_response(self, code, message=None):
        self.responded = True  # route(): a failure after this cannot send its own status any more
        super().send_response(code, message)

    def send_json(self, status, obj, headers=None):
        self.send_bytes(status, json.dumps(obj).encode(), "application/json", headers)

    def send_bytes(self, status, data, content_type, headers=None):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def end_headers(self):
        if self.server.cors:
            self.send_header("Access-Control-Allow-Origin", self.server.cors)
        super().end_headers()

    def send_error(self, code, message=None, explain=None):
        """The standard library's own refusals (a malformed request line, headers too long) as
        OpenAI error objects, with a status line even when the request's version was unreadable;
        the connection closes after them."""
        self.close_connection = True
        self.request_version = "HTTP/1.1"
        self.send_json(code, APIError(code, message or self.responses.get(code, ("refused",))[0]).body)

    def log_message(self, format, *args):
        if not self.server.quiet:
            super().log_message(format, *args)


def choice(text, reason, chat, delta=False):
    """One choice of a reply (or of a streamed chunk) in OpenAI's shape."""
    if not chat:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
    message = {"role": "assistant", "content": text} if not delta else {"content": text} if text else {}
    return {"index": 0, "delta" if delta else "message": message, "logprobs": None, "finish_reason": reason}


def client_gone(sock):
    """True when the client closed its end of the connection (readable, and nothing to read)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        """A connection reset, a broken pipe or a timeout is the client's doing: no traceback in
        the log (a bug still shows one)."""
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


def make_server(engine, style, model_name, host="127.0.0.1", port=8000, api_key=None, timeout=60.0, quiet=False,
                cors=None, tokenizer=GPT2):
    """An HTTP server (not yet serving; a thread per connection) in front of an engine; port 0
    picks a free one; cors: the origin (or *) whose pages may call the API from a browser;
    tokenizer: the model's (load_for_inference's)."""
    # the socket timeout: a client silent (or not reading) for this long is dropped
    server = Server((host, port), type("TimedHandler", (Handler,), {"timeout": timeout}))
    server.engine, server.style, server.model_name, server.api_key, server.quiet, server.cors = \
        engine, style, model_name, api_key, quiet, cors
    server.tokenizer = tokenizer
    server.created = int(time.time())
    with open(CHAT_PAGE, "rb") as f:
        server.page = f.read()
    return server


def is_origin(value):
    """* or a web origin: scheme://host[:port], nothing after it."""
    scheme, _, rest = value.partition("://")
    return value == "*" or (scheme in ("http", "https") and rest and not any(c in rest for c in "/?# "))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on; 0.0.0.0 opens it to the network")
    p.add_argument("--port", type=checked(int, lambda v: 0 <= v < 65536, "a port number from 0 to 65535"),
                   default=8000, help="0 picks a free port")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/ requests")
    p.add_argument("--cors", metavar="ORIGIN", type=checked(str, is_origin, "* or an origin such as "
                                                            "https://app.example.com (no path)"),
                   help="let web pages of ORIGIN (or * for any) call the API from a browser (off by default)")
    p.add_argument("--max-batch", type=AT_LEAST_1, default=8, help="requests decoded together at most")
    p.add_argument("--max-queue", type=AT_LEAST_1, default=64, help="requests waiting for a place at most; more get 429")
    p.add_argument("--timeout", type=POSITIVE, default=60.0, help="seconds a client may stay silent or not read")
    args = p.parse_args()

    device = resolve_device(args.device)
    model, _, style, tokenizer = load_for_inference(args.ckpt, args.model, args.prompt_style, device, args.quantize,
                                                    args.base)
    name = os.path.basename(os.path.normpath(args.ckpt or args.model))
    engine = Engine(model, args.max_batch, args.max_queue)
    try:
        server = make_server(engine, style, name, args.host, args.port, args.api_key, args.timeout, cors=args.cors,
                             tokenizer=tokenizer)
    except OSError as e:
        raise OSError(f"cannot listen on {args.host}:{args.port} ({e.strerror or e})") from None
    engine.start()
    host, port = server.server_address[:2]
    print(f"serving {name} (prompt style {style}, up to {plural(args.max_batch, 'request')} at once) on "
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
        print(f"stopped: cut off {plural(cut['running'], 'reply', 'replies')} under way and {cut['waiting']} "
              "waiting; nothing is kept, start serve.py again to go on", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    run_main(main)
