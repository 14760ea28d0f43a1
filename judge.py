"""Score model responses with an LLM judge, as the chapter's evaluation step does with Llama 3
through Ollama: a larger model reads each test entry, its expected output and the model's
response, and answers with a score from 0 to 100. eval.py calls it (--judge MODEL).

The server is Ollama (POST URL/api/chat, the book's request) unless the URL ends in /v1: then
it is an OpenAI-compatible server (POST URL/chat/completions; vLLM, llama.cpp's server, LM
Studio, OpenAI itself), sent $OPENAI_API_KEY when it is set. Each score is written into the
responses file as it arrives ("judge_score": an int, or null when the reply holds no integer
from 0 to 100, and "judge_model"), so an interrupted run loses nothing and a re-run with the
same judge model asks only for the rest; another judge model scores every entry again.
"""
import http.client
import json
import os
import re
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed

from common import duration, write_json
from data import format_input, load_instruction_data

DEFAULT_URL = "http://localhost:11434"  # Ollama's
DEFAULT_TIMEOUT = 300.0  # seconds without a byte from the server; a big judge on a CPU is slow
OPTIONS = {"seed": 123, "temperature": 0, "num_ctx": 2048}  # the book's, for the same score every time
RETRIES, BACKOFF = 4, 1.0  # a dropped connection or a 5xx is tried again after 1, 2, 4 and 8 seconds


def judge_prompt(entry):
    """The book's prompt: the instruction (and input) in Alpaca format, without the response
    header, the expected output and the model's response."""
    return (f"Given the input `{format_input(entry, 'alpaca')}` "
            f"and correct output `{entry['output']}`, "
            f"score the model response `{entry['model_response']}`"
            f" on a scale from 0 to 100, where 100 is the best score. "
            f"Respond with the integer number only.")


def parse_score(reply):
    """The first integer in the judge's reply ("Score: 85" gives 85) if it is from 0 to 100, else None."""
    match = re.search(r"-?[0-9]+", reply)
    score = int(match.group()) if match else None
    return score if score is not None and 0 <= score <= 100 else None


def check_url(url):
    """The server's address without a trailing slash; ValueError unless it is an http(s) address."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018  (raises ValueError for a port that is not a number)
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname or parts.query:
        raise ValueError(f"--judge-url must be a server's http(s) address such as {DEFAULT_URL} (Ollama) "
                         f"or http://localhost:8000/v1 (OpenAI-compatible), got {url!r}")
    url = url.rstrip("/")
    server = url.removesuffix("/api/chat").removesuffix("/chat/completions")
    if server != url:
        raise ValueError(f"--judge-url is the server's address without the endpoint: {server}, not {url}")
    return url


def is_openai(url):
    return url.endswith("/v1")


def chat_request(url, model, prompt):
    """A POST of one user message to an Ollama server (the book's request, whose reply is
    streamed as JSON lines) or to an OpenAI-compatible one (url ends in /v1)."""
    messages = [{"role": "user", "content": prompt}]
    headers = {"Content-Type": "application/json"}
    if is_openai(url):
        endpoint = f"{url}/chat/completions"
        body = {"model": model, "messages": messages, "temperature": OPTIONS["temperature"], "seed": OPTIONS["seed"]}
        if os.environ.get("OPENAI_API_KEY"):
            headers["Authorization"] = f"Bearer {os.environ['OPENAI_API_KEY']}"
    else:
        endpoint, body = f"{url}/api/chat", {"model": model, "messages": messages, "options": OPTIONS}
    return urllib.request.Request(endpoint, json.dumps(body).encode("utf-8"), headers, method="POST")


def reply_text(body, url):
    """The judge's answer in a response body: choices[0].message.content (OpenAI), or the
    message.content of Ollama's one JSON object ("stream": false) or of each JSON line it
    streamed, joined. ValueError if the body is neither."""
    try:
        text = body.decode("utf-8")
        if is_openai(url):
            return json.loads(text)["choices"][0]["message"]["content"] or ""
        try:
            chunks = [json.loads(text)]
        except json.JSONDecodeError:  # streamed: one JSON object a line
            chunks = [json.loads(line) for line in text.splitlines() if line.strip()]
        return "".join(chunk["message"]["content"] for chunk in chunks)
    except (ValueError, KeyError, IndexError, TypeError):
        kind = "an OpenAI" if is_openai(url) else "an Ollama"
        raise ValueError(f"the judge server at {url} did not send {kind} chat reply: "
                         f"{body[:200].decode('utf-8', 'replace')!r}") from None


def transient(error):
    """Worth another try: a connection the server dropped, a server error (5xx) or "too many requests"."""
    if isinstance(error, urllib.error.HTTPError):
        return error.code >= 500 or error.code == 429
    return isinstance(error, (ConnectionResetError, ConnectionAbortedError, BrokenPipeError,
                              http.client.IncompleteRead))


def error_detail(error):
    """': <the server's message>' from an HTTP error's body ({"error": ...} for Ollama and OpenAI), or ''."""
    try:
        body = error.read().decode("utf-8", "replace")
    except OSError:
        return ""
    try:
        message = json.loads(body)["error"]
        message = message.get("message", message) if isinstance(message, dict) else message
    except (ValueError, KeyError, TypeError):
        message = body
    message = " ".join(str(message).split())[:200]
    return f": {message}" if message else ""


def failure(error, url, model, timeout):
    """One sentence on a request that failed for good, and what to do about it."""
    if isinstance(error, urllib.error.HTTPError):
        if error.code == 404 and not is_openai(url):
            return (f"the Ollama server at {url} does not have the model {model!r} (HTTP 404{error_detail(error)}); "
                    f"run `ollama pull {model}`")
        return f"the judge server at {url} answered HTTP {error.code} {error.reason}{error_detail(error)}"
    if isinstance(error, ConnectionRefusedError):
        start = f"start it with `ollama serve` (and `ollama pull {model}` once)" if not is_openai(url) \
            else "start it, or correct --judge-url"
        return f"no judge server is running at {url}: {start}"
    if isinstance(error, TimeoutError):
        return f"the judge server at {url} did not answer within {timeout:g} seconds (--judge-timeout)"
    return f"cannot reach the judge server at {url}: {error}"


def ask(url, model, prompt, timeout=DEFAULT_TIMEOUT):
    """The judge's reply to prompt. A dropped connection or a 5xx is retried with backoff; any
    other failure, or the last retry's, is an OSError saying what went wrong and what to do."""
    request = chat_request(url, model, prompt)
    for attempt in range(RETRIES + 1):
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                body = response.read()
            return reply_text(body, url)
        except urllib.error.HTTPError as e:
            error = e
        except urllib.error.URLError as e:  # connecting or sending failed; reason says why
            error = e.reason
        except (OSError, http.client.HTTPException) as e:  # reading the reply failed
            error = e
        if attempt == RETRIES or not transient(error):
            tries = f" ({attempt + 1} tries)" if attempt else ""
            raise OSError(failure(error, url, model, timeout) + tries) from None
        time.sleep(BACKOFF * 2 ** attempt)


def check_server(url, model, timeout=DEFAULT_TIMEOUT):
    """OSError now, rather than once the responses are generated, if no server answers at url
    (any HTTP answer will do; whether it has the model shows with the first request)."""
    try:
        urllib.request.urlopen(url, timeout=timeout).close()
    except urllib.error.HTTPError as e:
        e.close()
    except urllib.error.URLError as e:
        raise OSError(failure(e.reason, url, model, timeout)) from None
    except (OSError, http.client.HTTPException) as e:
        raise OSError(failure(e, url, model, timeout)) from None


def load_responses(path):
    """The records of a responses file as eval.py writes it: a JSON array of entries, each with
    a model_response and perhaps a judge_score and judge_model. ValueError naming the entry that is not."""
    if not path.endswith(".json"):
        raise ValueError(f"{path}: expected a .json responses file as eval.py writes (test-responses.json)")
    records = load_instruction_data(path)
    for i, record in enumerate(records):
        if not isinstance(record.get("model_response"), str):
            raise ValueError(f"{path}: entry {i} has no 'model_response' string; is it a file eval.py wrote?")
        score = record.get("judge_score")
        if score is not None and (type(score) is not int or not 0 <= score <= 100):
            raise ValueError(f"{path}: entry {i}: 'judge_score' must be an integer from 0 to 100 or null, "
                             f"got {score!r}")
        if not isinstance(record.get("judge_model", ""), str):
            raise ValueError(f"{path}: entry {i}: 'judge_model' must be a string, got {record['judge_model']!r}")
    return records


def judge_file(path, model, url=DEFAULT_URL, workers=1, timeout=DEFAULT_TIMEOUT):
    """Score each record of the responses file at path that this judge model has not scored
    yet, `workers` requests at a time, writing the file again (atomically) as each score
    arrives. An empty response scores 0 with no request, as in the book. Returns
    {"model", "url", "mean" (of the parsed scores), "scored", "unparsed", "seconds"}."""
    start = time.perf_counter()
    records = load_responses(path)
    todo = [i for i, r in enumerate(records) if r.get("judge_model") != model or "judge_score" not in r]
    others = sum("judge_score" in records[i] for i in todo)
    if len(todo) < len(records):
        print(f"{len(records) - len(todo)} of {len(records)} entries were scored by {model} before")
    if others:
        print(f"{others} entries hold another judge's scores: {model} scores them again")
    empty = [i for i in todo if not records[i]["model_response"].strip()]
    if empty:
        for i in empty:
            records[i].update(judge_score=0, judge_model=model)
        write_json(records, path)
        todo = [i for i in todo if records[i]["model_response"].strip()]

    stop = threading.Event()  # after a failure or Ctrl-C, requests not yet made are not made

    def request(prompt):
        if stop.is_set():
            return None
        try:
            return ask(url, model, prompt, timeout)
        except BaseException:
            stop.set()
            raise

    pool = ThreadPoolExecutor(workers)
    futures = {pool.submit(request, judge_prompt(records[i])): i for i in todo}
    error, done = None, 0
    try:
        for future in as_completed(futures):
            if future.exception() is not None:  # keep the replies of the requests already under way
                error = error or future.exception()
                continue
            i, reply = futures[future], future.result()
            if reply is None:
                continue
            records[i].update(judge_score=parse_score(reply), judge_model=model)
            if records[i]["judge_score"] is None:
                message = f"entry {i}: no score from 0 to 100 in the reply {reply[:80]!r}"
                print(f"\r{message:<79}", file=sys.stderr)  # over the progress line
            write_json(records, path)
            done, elapsed = done + 1, time.perf_counter() - start
            left = elapsed / done * (len(todo) - done)
            print(f"\rjudged {done}/{len(todo)}, {done / elapsed:.2f} entries/s, "
                  f"{duration(left)} left ", end="", file=sys.stderr, flush=True)
    finally:
        stop.set()
        pool.shutdown(cancel_futures=True)  # waits for the requests under way
        if done:
            print(file=sys.stderr)
    if error is not None:
        raise error

    parsed = [r["judge_score"] for r in records if r["judge_score"] is not None]
    return {"model": model, "url": url, "mean": sum(parsed) / len(parsed) if parsed else None,
            "scored": len(parsed), "unparsed": len(records) - len(parsed),
            "seconds": round(time.perf_counter() - start, 1)}
