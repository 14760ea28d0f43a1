"""A chat server on 127.0.0.1 for the judge's tests and benchmark. It speaks Ollama's /api/chat
(JSON lines in chunked encoding, as Ollama streams, or one JSON object) and OpenAI's
/v1/chat/completions and /v1/completions, lists its models as Ollama (/api/tags) and OpenAI (/v1/models) do, records
every request, and counts how many it serves at once."""
import contextlib
import json
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

RESPONSE = re.compile(r"score the model response `(.*)` on a scale from 0 to 100", re.S)


def echo(prompt):
    """The model response quoted in a judge prompt: the judge says what the model said."""
    return RESPONSE.search(prompt).group(1)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # for chunked replies

    def do_POST(self):
        server = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with server.lock:
            server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
            n = len(server.requests)
            server.active += 1
            server.max_active = max(server.max_active, server.active)
        try:
            if n <= server.wait_for:  # the first requests go on only once wait_for of them are here together
                server.barrier.wait(timeout=10)
            time.sleep(server.delay)
            status = server.status(n)
            if server.garbage(n):  # a 200 whose body is no chat reply: a proxy's error page, say
                self.send_raw(b"<html><body>502 Bad Gateway</body></html>")
            elif status != 200:
                self.send(status, {"error": f"model {body['model']!r} not found, try pulling it first"
                                   if status == 404 else "the server failed"})
            elif self.path.endswith("/chat/completions"):
                self.send(200, {"choices": [{"index": 0, "message": {"role": "assistant",
                                                                     "content": server.reply(body)}}]})
            elif self.path.endswith("/v1/completions"):  # a raw prompt continued
                self.send(200, {"choices": [{"index": 0, "text": server.reply(body), "finish_reason": "stop"}]})
            elif server.stream:
                self.send_chunks(server.reply(body))
            else:
                self.send(200, {"model": body["model"], "message": {"role": "assistant", "content": server.reply(body)},
                                "done": True})
        except threading.BrokenBarrierError:  # fewer than wait_for came at once: a failure the test sees
            self.send(503, {"error": "too few requests at once"})
        except (BrokenPipeError, ConnectionResetError):  # the client gave up waiting
            pass
        finally:
            with server.lock:
                server.active -= 1

    def do_GET(self):
        """The models the server has: Ollama's names carry a tag (llama3:latest), OpenAI's ids do not."""
        server = self.server
        with server.lock:
            server.model_lists.append(self.path)
        if self.path == "/api/tags":
            self.send(200, {"models": [{"name": name if ":" in name else f"{name}:latest", "size": 1}
                                       for name in server.models]})
        elif self.path == "/v1/models":
            self.send(200, {"object": "list", "data": [{"id": name, "object": "model"} for name in server.models]})
        else:
            self.send(404, {"error": "not found"})

    def send(self, status, obj):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def send_raw(self, data):
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def send_chunks(self, text):
        """Ollama's stream: a JSON line per piece of the reply (here a character), then a last one with done."""
        lines = [{"message": {"role": "assistant", "content": ch}, "done": False} for ch in text]
        lines.append({"message": {"role": "assistant", "content": ""}, "done": True})
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for line in lines:
            data = json.dumps(line).encode() + b"\n"
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.write(b"0\r\n\r\n")

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def judge_server(stream=True, delay=0.0, status=lambda n: 200, reply=echo, wait_for=0, models=("llama3",),
                 answer=None, garbage=lambda n: False):
    """A running server at server.url. status(n) is the HTTP status of the n-th chat request
    (from 1); reply(prompt) the judge's answer to the first message, or answer(body) the answer to
    the whole request (its messages and options); garbage(n) True makes the n-th reply a 200 whose
    body is no chat reply; delay the seconds before each answer; wait_for > 0 holds the first
    wait_for requests until that many are being served at once; models are the names it lists
    (server.requests holds the chat requests, server.model_lists the lists asked for)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.stream, server.delay, server.status, server.wait_for = stream, delay, status, wait_for
    server.models, server.model_lists = models, []
    server.reply = answer or (lambda body: reply(body["messages"][0]["content"]))
    server.garbage = garbage
    server.barrier = threading.Barrier(max(wait_for, 1))
    server.requests, server.lock, server.active, server.max_active = [], threading.Lock(), 0, 0
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)  # quick to shut down
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def closed_port_url():
    """The address of a port on 127.0.0.1 that was just free: nothing listens there."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"
