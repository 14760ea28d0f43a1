"""Talking to an LLM on a server, as the chapter does with Llama 3 through Ollama: Ollama
(POST URL/api/chat, the book's request) unless the URL ends in /v1, then an OpenAI-compatible
server (POST URL/chat/completions; vLLM, llama.cpp's server, LM Studio, OpenAI itself, our own
serve.py), sent $OPENAI_API_KEY when it is set. ask() retries what is worth retrying and says in
one sentence what went wrong otherwise; check_server asks the server for its models (Ollama's
/api/tags, /v1/models) before any work. The judge asks with the book's fixed options; the data
tools (datatools.py) send whole conversations with their own seed, temperature and top-p, and
their messages name their flags (role="llm": --llm, --llm-url, --llm-timeout). Also the book's
judge prompt and the score in a reply, which judge.py (and the data tools) use.
"""
import http.client
import json
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request

from prompts import entry_output, format_input

DEFAULT_URL = "http://localhost:11434"  # Ollama's
DEFAULT_TIMEOUT = 300.0  # seconds without a byte from the server; a big judge on a CPU is slow
OPTIONS = {"seed": 123, "temperature": 0, "num_ctx": 2048}  # the book's, for the same score every time
RETRIES, BACKOFF = 4, 1.0  # a dropped connection or a 5xx is tried again after 1, 2, 4 and 8 seconds
# what the messages call the server, and the flags that set its model, address and timeout: judge.py's
# judge, datatools.py pairs' judge, the data tools' LLM
ROLES = {"judge": ("judge server", "--judge", "--url", "--timeout"),
         "pairs": ("judge server", "--judge", "--judge-url", "--judge-timeout"),
         "llm": ("LLM server", "--llm", "--llm-url", "--llm-timeout")}
OPENAI_OPTIONS = {"temperature": "temperature", "seed": "seed", "top_p": "top_p", "num_predict": "max_tokens"}


def judge_prompt(entry):
    """The book's prompt: the instruction (and input) in Alpaca format, without the response
    header, the expected output and the model's response. For a conversation the instruction
    is its last user turn, and the turns before it come first, as context."""
    context = ""
    if "messages" in entry:
        *earlier, user, _ = entry["messages"]
        context = "".join(f"{m['role']}: {m['content']}\n" for m in earlier)
        context = f"Given the conversation so far\n```\n{context}```\n" if context else ""
        entry = {"instruction": user["content"], "input": "", "output": entry_output(entry),
                 "model_response": entry["model_response"]}
    return (f"{context}{'and ' if context else 'Given '}the input `{format_input(entry, 'alpaca')}` "
            f"and correct output `{entry['output']}`, "
            f"score the model response `{entry['model_response']}`"
            f" on a scale from 0 to 100, where 100 is the best score. "
            f"Respond with the integer number only.")


def parse_score(reply):
    """The first integer in the judge's reply ("Score: 85" gives 85) if it is from 0 to 100, else None."""
    match = re.search(r"-?[0-9]+", reply)
    score = int(match.group()) if match else None
    return score if score is not None and 0 <= score <= 100 else None


def check_url(url, role="judge"):
    """The server's address without a trailing slash; ValueError unless it is an http(s) address."""
    url_flag = ROLES[role][2]
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018  (raises ValueError for a port that is not a number)
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname or parts.query:
        raise ValueError(f"{url_flag} must be a server's http(s) address such as {DEFAULT_URL} (Ollama) "
                         f"or http://localhost:8000/v1 (OpenAI-compatible), got {url!r}")
    url = url.rstrip("/")
    server = url.removesuffix("/api/chat").removesuffix("/chat/completions")
    if server != url:
        raise ValueError(f"{url_flag} is the server's address without the endpoint: {server}, not {url}")
    return url


def is_openai(url):
    return url.endswith("/v1")


def chat_request(url, model, prompt, options=None, continuation=False):
    """A POST of one user message (prompt, a text) or of a conversation (prompt, a list of
    messages) to an Ollama server (the book's request, whose reply is streamed as JSON lines) or
    to an OpenAI-compatible one (url ends in /v1). options, in Ollama's names (seed, temperature,
    top_p, num_predict, ...), default to the judge's OPTIONS; an OpenAI-compatible server gets
    those it has (temperature, seed, top_p, max_tokens). With continuation the model goes on from
    the text prompt: an assistant message to Ollama (the book's 05), a raw prompt to an
    OpenAI-compatible server's /completions (its chat API wants a user message last)."""
    role = "assistant" if continuation else "user"
    messages = [{"role": role, "content": prompt}] if isinstance(prompt, str) else prompt
    options = OPTIONS if options is None else options
    if is_openai(url):
        sampling = {OPENAI_OPTIONS[k]: v for k, v in options.items() if k in OPENAI_OPTIONS}
        endpoint = f"{url}/completions" if continuation else f"{url}/chat/completions"
        body = {"model": model, **({"prompt": prompt} if continuation else {"messages": messages}), **sampling}
    else:
        endpoint, body = f"{url}/api/chat", {"model": model, "messages": messages, "options": options}
    return urllib.request.Request(endpoint, json.dumps(body).encode("utf-8"), request_headers(url),
                                  method="POST")


def request_headers(url):
    """JSON, and $OPENAI_API_KEY for an OpenAI-compatible server when it is set."""
    headers = {"Content-Type": "application/json"}
    if is_openai(url) and os.environ.get("OPENAI_API_KEY"):
        headers["Authorization"] = f"Bearer {os.environ['OPENAI_API_KEY']}"
    return headers


def reply_text(body, url, role="judge"):
    """The server's answer in a response body: choices[0].message.content (OpenAI), or the
    message.content of Ollama's one JSON object ("stream": false) or of each JSON line it
    streamed, joined. ValueError if the body is neither."""
    try:
        text = body.decode("utf-8")
        if is_openai(url):
            choice = json.loads(text)["choices"][0]  # a chat reply's message, or a completion's text
            return (choice["message"]["content"] if "message" in choice else choice["text"]) or ""
        try:
            chunks = [json.loads(text)]
        except json.JSONDecodeError:  # streamed: one JSON object a line
            chunks = [json.loads(line) for line in text.splitlines() if line.strip()]
        return "".join(chunk["message"]["content"] for chunk in chunks)
    except (ValueError, KeyError, IndexError, TypeError):
        kind = "an OpenAI" if is_openai(url) else "an Ollama"
        raise ValueError(f"the {ROLES[role][0]} at {url} did not send {kind} chat reply: "
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


def failure(error, url, model, timeout, role="judge"):
    """One sentence on a request that failed for good, and what to do about it."""
    server, _, url_flag, timeout_flag = ROLES[role]
    if isinstance(error, urllib.error.HTTPError):
        if error.code == 404 and not is_openai(url):
            return (f"the Ollama server at {url} does not have the model {model!r} (HTTP 404{error_detail(error)}); "
                    f"run `ollama pull {model}`")
        return f"the {server} at {url} answered HTTP {error.code} {error.reason}{error_detail(error)}"
    if isinstance(error, ConnectionRefusedError):
        start = f"start it with `ollama serve` (and `ollama pull {model}` once)" if not is_openai(url) \
            else f"start it, or correct {url_flag}"
        return f"no {server} is running at {url}: {start}"
    if isinstance(error, TimeoutError):
        return f"the {server} at {url} did not answer within {timeout:g} seconds ({timeout_flag})"
    return f"cannot reach the {server} at {url}: {error}"


def ask(url, model, prompt, timeout=DEFAULT_TIMEOUT, options=None, role="judge", continuation=False):
    """The server's reply to prompt (a text, or a list of messages; chat_request says what options
    and continuation are). A dropped connection or a 5xx is retried with backoff; any other
    failure, or the last retry's, is an OSError saying what went wrong and what to do; a body that
    is no chat reply a ValueError."""
    request = chat_request(url, model, prompt, options, continuation)
    for attempt in range(RETRIES + 1):
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                body = response.read()
            return reply_text(body, url, role)
        except urllib.error.HTTPError as e:
            error = e
        except urllib.error.URLError as e:  # connecting or sending failed; reason says why
            error = e.reason
        except (OSError, http.client.HTTPException) as e:  # reading the reply failed
            error = e
        if attempt == RETRIES or not transient(error):
            tries = f" ({attempt + 1} tries)" if attempt else ""
            raise OSError(failure(error, url, model, timeout, role) + tries) from None
        time.sleep(BACKOFF * 2 ** attempt)


def server_models(url, model, timeout=DEFAULT_TIMEOUT, role="judge"):
    """The names of the models the server at url has: Ollama's /api/tags, or /v1/models of an
    OpenAI-compatible server. OSError saying what to do if there is no server or no list."""
    endpoint = f"{url}/models" if is_openai(url) else f"{url}/api/tags"
    try:
        request = urllib.request.Request(endpoint, headers=request_headers(url))
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read()
    except urllib.error.HTTPError as e:
        kind = "an OpenAI-compatible" if is_openai(url) else "an Ollama"
        raise OSError(f"the {ROLES[role][0]} at {url} answered GET {endpoint} with HTTP {e.code} {e.reason}"
                      f"{error_detail(e)}; is it {kind} server?") from None
    except urllib.error.URLError as e:
        raise OSError(failure(e.reason, url, model, timeout, role)) from None
    except (OSError, http.client.HTTPException) as e:
        raise OSError(failure(e, url, model, timeout, role)) from None
    try:
        listed = json.loads(body)
        return [m["id"] for m in listed["data"]] if is_openai(url) else [m["name"] for m in listed["models"]]
    except (ValueError, KeyError, TypeError):
        raise OSError(f"the {ROLES[role][0]} at {url} did not send its list of models from {endpoint}: "
                      f"{body[:200].decode('utf-8', 'replace')!r}") from None


def check_server(url, model, timeout=DEFAULT_TIMEOUT, role="judge"):
    """OSError now, before any response is generated or file written, unless a server answers
    at url and has the model (Ollama's "llama3" is its "llama3:latest")."""
    models = server_models(url, model, timeout, role)
    if model in models or (not is_openai(url) and ":" not in model and f"{model}:latest" in models):
        return
    has = f"it has {', '.join(models)}" if models else "it has none"
    if is_openai(url):
        raise OSError(f"the {ROLES[role][0]} at {url} does not serve the model {model!r} ({has}); "
                      f"check {ROLES[role][1]}")
    raise OSError(f"the Ollama server at {url} does not have the model {model!r} ({has}); run `ollama pull {model}`")
