"""serve.py: a real server on an ephemeral 127.0.0.1 port, spoken to with the standard library."""
import contextlib
import http.client
import json
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import jinja2
import pytest
import torch

import llm
import serve
from checkpoint import save_checkpoint
from export import chat_template
from prompts import GPT2, PROMPT_STYLES, decode, encode, encode_conversation, format_prompt
from test_export import render
from decoding import generate
from model import GPT, config_for
import scripts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def lively_tiny(seed=1, context_length=128):
    """A random tiny model with GPT-2's vocabulary whose weights are scaled up so that greedy
    replies vary from token to token (at GPT-2's init scale they repeat one token)."""
    torch.manual_seed(seed)
    model = GPT(config_for("tiny", context_length=context_length)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(6)
    return model


@contextlib.contextmanager
def running(model, style="alpaca", max_batch=8, max_queue=64, **server_args):
    """serve.py's engine and HTTP server for model, serving on 127.0.0.1:<free port>."""
    engine = serve.Engine(model, max_batch, max_queue).start()
    server = serve.make_server(engine, style, "tiny-test", "127.0.0.1", 0, quiet=True, **server_args)
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    server.port = server.server_address[1]
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        engine.stop()
        thread.join()


@pytest.fixture(scope="module")
def model():
    return lively_tiny()


@pytest.fixture(scope="module")
def server(model):
    with running(model) as server:
        yield server


def call(server, method, path, body=None, headers=None, raw=None):
    """(status, parsed JSON or text) of one request on a fresh connection."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    conn.request(method, path, data, {"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    text = response.read().decode()
    conn.close()
    is_json = response.getheader("Content-Type", "").startswith("application/json")
    return response.status, json.loads(text) if is_json else text


def events(text):
    """The data of each server-sent event of a streamed reply; the last must be [DONE]."""
    datas = [block.removeprefix("data: ") for block in text.split("\n\n") if block]
    assert datas[-1] == "[DONE]", f"the stream does not end with data: [DONE] but {datas[-1]!r}"
    return [json.loads(d) for d in datas[:-1]]


def first_event(response):
    """Read a streamed reply's first server-sent event (its data line and the blank line after it)."""
    data, blank = response.readline(), response.readline()
    assert data.startswith(b"data: ") and blank == b"\n", (data, blank)
    return json.loads(data[6:])


def streamed_text(chunks, chat=True):
    return "".join((c["choices"][0]["delta"].get("content", "") if chat else c["choices"][0]["text"])
                   for c in chunks if c["choices"])


def reference(model, prompt_ids, n, **sampling):
    return decode(generate(model, [prompt_ids], n, **sampling)[0])


COLORS = [{"role": "user", "content": "Name three primary colors."}]


def test_chat_and_completion_replies_have_openais_shape_and_generates_text(server, model):
    status, reply = call(server, "POST", "/v1/chat/completions", {"model": "x", "messages": COLORS, "max_tokens": 12})
    assert status == 200, reply
    prompt = encode_conversation(COLORS, "alpaca")[0]
    assert reply["object"] == "chat.completion" and reply["id"].startswith("chatcmpl-") and reply["model"] == "tiny-test"
    assert reply["choices"] == [{"index": 0, "message": {"role": "assistant", "content": reference(model, prompt, 12)},
                                 "logprobs": None, "finish_reason": "length"}]
    assert reply["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": 12, "total_tokens": len(prompt) + 12}

    status, reply = call(server, "POST", "/v1/completions", {"prompt": "Once upon a time", "max_completion_tokens": 7})
    assert status == 200, reply
    assert reply["object"] == "text_completion" and reply["id"].startswith("cmpl-")
    assert reply["choices"] == [{"index": 0, "text": reference(model, encode("Once upon a time"), 7),
                                 "logprobs": None, "finish_reason": "length"}]
    assert reply["usage"]["prompt_tokens"] == len(encode("Once upon a time"))

    assert call(server, "GET", "/v1/models")[1]["data"][0]["id"] == "tiny-test"
    assert call(server, "GET", "/health") == (200, {"status": "ok", "model": "tiny-test", "running": 0, "waiting": 0})


def test_multi_turn_messages_are_rendered_as_in_training(server, model):
    messages = [{"role": "system", "content": "Answer briefly."}, *COLORS,
                {"role": "assistant", "content": "Red, blue, yellow."}, {"role": "user", "content": "And two more?"}]
    status, reply = call(server, "POST", "/v1/chat/completions", {"messages": messages, "max_tokens": 9})
    assert status == 200, reply
    expected = reference(model, encode_conversation(messages, "alpaca")[0], 9)
    assert reply["choices"][0]["message"]["content"] == expected


def test_a_user_message_after_another_is_its_input(server, model):
    """An Alpaca entry's input goes in a second user message, as in the exported chat
    templates: the prompt is format_prompt's, the input block left out when it is empty; a
    later turn may have one too; a third user message in a row is refused (see the 400s)."""
    entry = {"instruction": "Translate into German:", "input": "Thank you very much."}
    for messages, prompt in [
            ([{"role": "user", "content": entry["instruction"]}, {"role": "user", "content": entry["input"]}],
             encode(format_prompt(entry, "alpaca"))),
            ([{"role": "user", "content": entry["instruction"]}, {"role": "user", "content": ""}],
             encode(format_prompt({**entry, "input": ""}, "alpaca"))),
            ([*COLORS, {"role": "assistant", "content": "Red."}, {"role": "user", "content": entry["instruction"]},
              {"role": "user", "content": entry["input"]}],
             encode_conversation([*COLORS, {"role": "assistant", "content": "Red."},
                                  {"role": "user", "content": entry["instruction"], "input": entry["input"]}])[0])]:
        status, reply = call(server, "POST", "/v1/chat/completions", {"messages": messages, "max_tokens": 8})
        assert status == 200 and reply["usage"]["prompt_tokens"] == len(prompt), reply
        assert reply["choices"][0]["message"]["content"] == reference(model, prompt, 8)
    assert "### Input:\nThank you very much." in format_prompt(entry, "alpaca")


@pytest.mark.parametrize("style", sorted(PROMPT_STYLES))
def test_the_input_rule_is_the_chat_templates(server, style):
    """One rule for an input in serve.py and in the exported chat template: a user message right
    after another is its input, in any turn, left out when empty; a third in a row is refused
    by both. Both render the same text (the alpaca server's own tokens too, through /tokenize)."""
    entry = {"instruction": "Translate into German:", "input": "Thank you very much."}
    first = [{"role": "user", "content": entry["instruction"]}, {"role": "user", "content": entry["input"]}]
    for messages in [first, first[:1] + [{"role": "user", "content": ""}],
                     [{"role": "system", "content": "Be brief."}, *first, {"role": "assistant", "content": "Danke."},
                      *first]]:
        text = render(chat_template(style), messages, True)
        assert decode(encode_conversation(serve.check_messages(messages), style)[0]) == text
        if style == "alpaca":
            assert decode(call(server, "POST", "/tokenize", {"messages": messages})[1]["tokens"]) == text
    with pytest.raises(jinja2.TemplateError, match="^a user message may be followed by one more, its input"):
        render(chat_template(style), first + first[:1], True)
    with pytest.raises(serve.APIError, match="user message after a user message and its input"):
        serve.check_messages(first + first[:1])


def test_streamed_chunks_join_to_the_unstreamed_reply(server):
    body = {"messages": COLORS, "max_tokens": 10}
    whole = call(server, "POST", "/v1/chat/completions", body)[1]
    status, text = call(server, "POST", "/v1/chat/completions",
                        {**body, "stream": True, "stream_options": {"include_usage": True}})
    assert status == 200
    chunks = events(text)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert streamed_text(chunks) == whole["choices"][0]["message"]["content"]
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None] * (len(chunks) - 2) + ["length"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]

    body = {"prompt": "Once upon a time", "max_tokens": 8}
    whole = call(server, "POST", "/v1/completions", body)[1]
    chunks = events(call(server, "POST", "/v1/completions", {**body, "stream": True})[1])
    assert streamed_text(chunks, chat=False) == whole["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and "usage" not in chunks[-1]


def test_stop_strings_end_the_reply_before_them(server, model):
    full = reference(model, encode("Once upon a time"), 20)
    stop = full[9:12]  # three characters from inside the reply (stop strings need not be whole tokens)
    cut = full[:full.find(stop)]
    for stream in (False, True):
        status, reply = call(server, "POST", "/v1/completions", {"prompt": "Once upon a time", "max_tokens": 20,
                                                                  "stop": ["never there", stop], "stream": stream})
        assert status == 200
        chunks = events(reply) if stream else None
        assert (streamed_text(chunks, chat=False) if stream else reply["choices"][0]["text"]) == cut
        assert (chunks[-1] if stream else reply)["choices"][0]["finish_reason"] == "stop"


def naive_stop(text, stops):
    """(where the first stop string found in text starts, how many characters at its end begin one)."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    held = max([0] + [n for s in stops for n in range(1, len(s)) if text.endswith(s[:n])])
    return min(found, default=None), held


def test_stop_strings_are_found_as_a_search_of_the_whole_text_finds_them():
    """StopStrings, fed a text piece by piece, finds what searching the whole text after each
    piece finds (the first piece that completes a stop string, its earliest start) and holds
    back what may yet begin one; random texts over a small alphabet make many overlaps."""
    rng = random.Random(0)
    for _ in range(400):
        stops = ["".join(rng.choices("ab", k=rng.randint(1, 6))) for _ in range(rng.randint(1, 4))]
        text, finder = "", serve.StopStrings(stops)
        for _ in range(12):
            piece = "".join(rng.choices("abc", k=rng.randint(0, 4)))
            text += piece
            start, held = naive_stop(text, stops)
            assert finder.feed(piece) == start, (stops, text)
            if start is not None:
                break
            assert finder.held() == held, (stops, text)


class CountedStr(str):
    """A str that counts how often a character of it is read."""
    reads = 0

    def __getitem__(self, i):
        CountedStr.reads += 1
        return str.__getitem__(self, i)


def test_the_stop_check_costs_the_new_text_not_the_stop_strings_length():
    """Four stop strings of 1,000 characters that the text keeps almost matching ("aaa...b"
    against a text of a's: the case where searching every prefix is quadratic): each character
    of new text costs at most three reads of each stop string, however long they are."""
    stops = [CountedStr("a" * 999 + end) for end in "bcde"]
    finder = serve.StopStrings(stops)
    CountedStr.reads = 0
    fed = 0
    for _ in range(500):
        assert finder.feed("aaaa") is None
        fed += 4
    assert finder.held() == 999 and CountedStr.reads <= 3 * fed * len(stops), CountedStr.reads


def test_a_stop_string_across_tokens_and_one_never_completed(server, model):
    """A stop string made by several tokens ends the reply before it; the text that began to
    match a stop string that never completed is sent in the end (held back, never lost)."""
    full = reference(model, encode("Once upon a time"), 24)
    stop = full[4:16]  # longer than a token
    assert len(encode(stop)) > 1
    status, reply = call(server, "POST", "/v1/completions", {"prompt": "Once upon a time", "max_tokens": 24,
                                                              "stop": stop})
    assert status == 200 and reply["choices"][0]["text"] == full[:full.find(stop)]
    for stream in (False, True):
        status, reply = call(server, "POST", "/v1/completions", {"prompt": "Once upon a time", "max_tokens": 24,
                                                                  "stop": [full[-3:] + "~never"], "stream": stream})
        text = streamed_text(events(reply), chat=False) if stream else reply["choices"][0]["text"]
        assert status == 200 and text == full


def test_concurrent_requests_get_what_generate_gives_each_alone(server, model, monkeypatch):
    """Requests arriving at different times join and leave one batch: greedy replies equal
    generate() alone, and sampled ones equal generate() with the request's seed."""
    asks = [("Hello there", 44, {}), ("A much longer prompt, with several more tokens in it.", 16, {}),
            ("x", 40, {"temperature": 0.8, "top_p": 0.9, "seed": 7}), ("Name three primary colors.", 31, {}),
            ("Say hi.", 29, {"temperature": 1.2}), ("Once upon a time there was", 36, {})]
    batch_at_join = []
    join = server.engine.join
    monkeypatch.setattr(server.engine, "join",
                        lambda requests: (batch_at_join.append(len(server.engine.rows)), join(requests)))

    def ask(i):
        time.sleep(0.03 * i)  # staggered, so requests join a batch already under way
        prompt, n, sampling = asks[i]
        body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": n, "stream": i % 2 == 1, **sampling}
        status, reply = call(server, "POST", "/v1/chat/completions", body)
        assert status == 200, reply
        return streamed_text(events(reply)) if i % 2 else reply["choices"][0]["message"]["content"]

    with ThreadPoolExecutor(len(asks)) as pool:
        replies = list(pool.map(ask, range(len(asks))))
    for (prompt, n, sampling), reply in zip(asks, replies):
        ids = encode_conversation([{"role": "user", "content": prompt}], "alpaca")[0]
        if sampling:
            seed = sampling.get("seed", serve.DEFAULT_SEED)
            sampling = dict(temperature=sampling["temperature"], top_p=sampling.get("top_p"),
                            seed=seed)
        assert reply == reference(model, ids, n, **sampling), prompt
    assert max(batch_at_join) >= 2, f"no request joined a running batch of two or more: {batch_at_join}"


def test_a_tiny_temperature_decodes_greedily_and_hurts_no_other_request(server, model):
    """1e-40 and 5e-324 are in the 0 to 2 range, and below serve.MIN_TEMPERATURE: greedy,
    while a greedy request decodes beside them, unhurt."""
    long_ids = encode_conversation(COLORS, "alpaca")[0]
    with ThreadPoolExecutor(3) as pool:
        beside = pool.submit(call, server, "POST", "/v1/chat/completions", {"messages": COLORS, "max_tokens": 40})
        time.sleep(0.05)
        tiny = [pool.submit(call, server, "POST", "/v1/completions", {"prompt": "Hello", "max_tokens": 12,
                                                                      "temperature": t}) for t in (1e-40, 5e-324)]
        greedy = reference(model, encode("Hello"), 12)
        for future in tiny:
            status, reply = future.result()
            assert status == 200 and reply["choices"][0]["text"] == greedy, reply
        status, reply = beside.result()
        assert status == 200 and reply["choices"][0]["message"]["content"] == reference(model, long_ids, 40)


def test_a_request_that_fails_in_the_engine_fails_alone(server, model, monkeypatch):
    """Whatever goes wrong in one request's own sampling or decoding (here: made to fail for a
    marked request, and for a token only that request makes) ends that request with a 500;
    the others decoding with it are unhurt."""
    sample_next, decode_ = serve.sample_next, GPT2.decode

    def failing_sample(logits, temperature, top_k, top_p, generator):
        if top_p == 0.5:
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return sample_next(logits, temperature, top_k, top_p, generator)

    hello = generate(model, [encode("Hello")], 40)[0]
    marked = next(t for t in generate(model, [encode("Hi")], 40)[0] if t not in hello)  # made for "Hi" alone

    def failing_decode(ids):
        if marked in list(ids) and threading.current_thread().name == "engine":
            raise KeyError("Invalid token for decoding")
        return decode_(ids)
    monkeypatch.setattr(serve, "sample_next", failing_sample)
    monkeypatch.setattr(GPT2, "decode", failing_decode)  # the server's tokenizer
    with ThreadPoolExecutor(3) as pool:
        beside = pool.submit(call, server, "POST", "/v1/completions", {"prompt": "Hello", "max_tokens": 40})
        time.sleep(0.05)
        sampled = pool.submit(call, server, "POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 40,
                                                                        "temperature": 1, "top_p": 0.5})
        decoded = pool.submit(call, server, "POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 40})
        for future, message in [(sampled, "sampling failed: RuntimeError"), (decoded, "decoding failed: KeyError")]:
            status, reply = future.result()
            assert status == 500 and reply["error"]["message"].startswith(message), reply
        status, reply = beside.result()
    assert status == 200 and reply["choices"][0]["text"] == reference(model, encode("Hello"), 40)


def test_engine_merges_requests_of_any_length_at_any_step(model, monkeypatch):
    """Driven by hand, step by step: rows join a batch shorter and longer than themselves, alone
    and two at once, and leave at different steps; each gets generate()'s tokens alone. Fresh
    cache memory is NaN here, as it may be: padding must not leak it into the rows."""
    monkeypatch.setattr(torch, "empty", lambda shape, **kw: torch.full(shape, float("nan"), **kw))
    texts = ["Hello there", "x", "A much longer prompt, with several more tokens in it than any other.",
             "Say hi.", "Once upon a time there was a prompt of middling length"]
    budgets = [30, 12, 9, 25, 6]
    requests = [serve.Request(encode(t), n) for t, n in zip(texts, budgets)]
    engine = serve.Engine(model)  # not started: the test runs its steps
    with torch.inference_mode():
        engine.join(requests[:2])
        for _ in range(3):
            engine.step()
        engine.join(requests[2:3])  # longer than the batch: the running rows are padded further
        engine.step()
        engine.join(requests[3:5])  # shorter, two at once
        steps = 0
        while engine.rows:
            engine.step()
            steps += 1
    assert steps == 30 - 4 and engine.cache is None  # the first request, 4 steps in, is the last to end
    for request, text, n in zip(requests, texts, budgets):
        assert request.tokens == generate(model, [encode(text)], n)[0], text
        assert request.events.get_nowait() == ("text", decode(request.tokens[:1]))


def test_a_late_request_streams_before_an_early_long_one_ends(model):
    with running(model) as server:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        conn.request("POST", "/v1/completions", json.dumps({"prompt": "Long", "max_tokens": 120, "stream": True}))
        long_reply = conn.getresponse()
        first = first_event(long_reply)  # the long reply is under way
        status, reply = call(server, "POST", "/v1/completions", {"prompt": "Short", "max_tokens": 3})
        assert status == 200 and reply["usage"]["completion_tokens"] == 3
        assert serve_stats(server)["running"] == 1, "the long reply ended before the short one"
        chunks = [first] + events(long_reply.read().decode())
        conn.close()
        assert streamed_text(chunks, chat=False) == reference(model, encode("Long"), 120)


def serve_stats(server):
    return call(server, "GET", "/health")[1]


NESTED_31 = [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]  # 31 lists: a body of 32 levels
NESTED_32 = [NESTED_31]


def test_a_body_32_levels_deep_is_read_and_its_field_checked():
    assert json.dumps(NESTED_32).count("[") == 32 and not serve.nested_deeper({"stop": NESTED_31}, 32)
    assert serve.nested_deeper({"stop": NESTED_32}, 32) and serve.nested_deeper([{"a": [[{}]]}], 4)
    assert not serve.nested_deeper([{"a": [[{}]]}], 5) and not serve.nested_deeper("text", 0)


@pytest.mark.parametrize("body, message", [
    (b"{not json", "the request body is not valid JSON"),
    (b"[" * 400_000 + b"]" * 400_000, "the request body is nested more than 32 levels deep"),
    # within Python's parser, yet deep enough to fail a recursive check of the field (json.dumps)
    (b'{"messages": [{"role": "user", "content": "hi"}], "stop": ' + b"[" * 983 + b"]" * 983 + b"}",
     "the request body is nested more than 32 levels deep"),
    ({"messages": COLORS, "stop": NESTED_32}, "the request body is nested more than 32 levels deep"),
    ([1, 2], "the request body must be a JSON object"),
    ({}, "'messages' must be a non-empty list"),
    ({"messages": "hi"}, "'messages' must be a non-empty list"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0] must be an object with a 'role'"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0] must be an object with a 'role'"),
    ({"messages": COLORS + [{"role": "system", "content": "x"}]}, "messages[1] is a system message after a user one"),
    ({"messages": COLORS * 3}, "messages[2] is a user message after a user message and its input"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "messages[0] is an assistant message after nothing"),
    ({"messages": COLORS + [{"role": "assistant", "content": "hi"}]}, "the last message must be the user's"),
    ({"messages": [{"role": "user", "content": "word " * 200}]}, "over the model's context length of 128"),
    ({"messages": COLORS, "max_tokens": 0}, "'max_tokens' must be an integer of at least 1, got 0"),
    ({"messages": COLORS, "max_tokens": "5"}, "'max_tokens' must be an integer of at least 1, got \"5\""),
    ({"messages": COLORS, "max_completion_tokens": 1.5}, "'max_completion_tokens' must be an integer"),
    ({"messages": COLORS, "temperature": True}, "'temperature' must be a number from 0 to 2, got true"),
    ({"messages": COLORS, "top_p": 0}, "'top_p' must be a number in (0, 1]"),
    ({"messages": COLORS, "n": 2}, "'n' must be 1 (one reply per prompt), got 2"),
    ({"messages": COLORS, "stop": [""]}, "'stop' must be a string or a list of up to 4 strings, each of 1 to 1,000"),
    ({"messages": COLORS, "stop": ""}, "'stop' must be a string or a list of up to 4 strings, each of 1 to 1,000"),
    ({"messages": COLORS, "stop": list("abcde")}, "'stop' must be a string or a list of up to 4 strings"),
    ({"messages": COLORS, "stop": ["x" * 1001]}, "each of 1 to 1,000 characters"),
    ({"messages": COLORS, "seed": -1}, "'seed' must be an integer from 0 to 2**63 - 1"),
    ({"messages": COLORS, "stream": "yes"}, "'stream' must be true or false"),
])
def test_bad_chat_requests_get_a_400_error_object(server, model, body, message):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    status, reply = call(server, "POST", "/v1/chat/completions", raw=raw)
    assert status == 400, reply
    assert set(reply["error"]) == {"message", "type", "param", "code"} and reply["error"]["type"] == "invalid_request_error"
    assert message in reply["error"]["message"], reply["error"]["message"]
    # nothing else disturbed: the next request is answered as ever
    status, reply = call(server, "POST", "/v1/chat/completions", {"messages": COLORS, "max_tokens": 3})
    assert status == 200 and reply["choices"][0]["message"]["content"] == reference(
        model, encode_conversation(COLORS, "alpaca")[0], 3)


def test_a_fault_of_the_server_fails_its_request_alone_with_a_500(server, model, monkeypatch):
    """An exception no check foresaw, in a request's handler: that request gets a 500 error object
    (the connection closed), and the server answers the next as ever."""
    monkeypatch.setattr(serve.Handler, "models", lambda self, body: {}["no such key"])
    status, reply = call(server, "GET", "/v1/models")
    assert status == 500 and reply["error"] == {
        "message": "the server failed on this request (KeyError); other requests go on", "type": "server_error",
        "param": None, "code": None}
    status, reply = call(server, "POST", "/v1/chat/completions", {"messages": COLORS, "max_tokens": 3})
    assert status == 200 and reply["choices"][0]["message"]["content"] == reference(
        model, encode_conversation(COLORS, "alpaca")[0], 3)


def test_unknown_routes_too_large_bodies_and_bad_completions(server):
    status, reply = call(server, "GET", "/v1/nothing")
    assert status == 404 and reply["error"]["message"] == (
        "no route /v1/nothing: this server has GET /, GET /health, GET /v1/models, POST /v1/chat/completions, "
        "POST /v1/completions, POST /tokenize")
    # a body over the limit is refused from its Content-Length, unread; a length that is no number too
    for length, status, message in [(serve.MAX_BODY + 1, 413, f"over the limit of {serve.MAX_BODY}"),
                                    (-5, 411, "a POST with a body needs a Content-Length header")]:
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % length)
            reply = b"".join(iter(lambda: s.recv(65536), b"")).decode()  # to the end: the server closes
        assert reply.startswith(f"HTTP/1.1 {status} ") and message in reply, reply


def raw_request(port, text):
    """(status line, headers, body) of one request written by hand; the server closes after it."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(text.encode("latin-1"))
        s.shutdown(socket.SHUT_WR)
        reply = b"".join(iter(lambda: s.recv(65536), b"")).decode("latin-1")
    head, _, body = reply.partition("\r\n\r\n")
    status, *lines = head.split("\r\n")
    return status, dict(line.split(": ", 1) for line in lines), body


def test_every_method_and_path_gets_a_json_answer(server):
    """HEAD answers as GET without the body; a method a route does not take gets 405 with
    Allow, any method on no route 404, a malformed request 400: OpenAI error objects, never
    the standard library's HTML page."""
    for path in ("/health", "/"):
        status, headers, body = raw_request(server.port, f"HEAD {path} HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == "HTTP/1.1 200 OK" and body == "" and int(headers["Content-Length"]) > 0
    for method, path, allow in [("OPTIONS", "/v1/chat/completions", "POST"), ("PUT", "/v1/completions", "POST"),
                                ("GET", "/v1/chat/completions", "POST"), ("DELETE", "/health", "GET, HEAD"),
                                ("POST", "/v1/models", "GET, HEAD"), ("BREW", "/", "GET, HEAD")]:
        status, headers, body = raw_request(server.port, f"{method} {path} HTTP/1.1\r\nHost: x\r\n"
                                                         "Content-Length: 2\r\n\r\n{}")
        assert status.startswith("HTTP/1.1 405") and headers["Allow"] == allow, (method, path, status)
        assert headers["Content-Type"] == "application/json" and json.loads(body)["error"]["message"] == \
            f"{path} takes {' or '.join(allow.split(', '))}, not {method}"
        assert "Access-Control-Allow-Origin" not in headers  # CORS is off by default
    status, headers, body = raw_request(server.port, "PATCH /nothing HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status.startswith("HTTP/1.1 404") and json.loads(body)["error"]["message"].startswith("no route /nothing")
    for bad in ("GET / HTTP/7.0\r\n\r\n", "GET /" + "x" * 70_000 + " HTTP/1.1\r\n\r\n",
                "GET / HTTP/1.1\r\n" + "X-Long: " + "y" * 70_000 + "\r\n\r\n"):
        status, headers, body = raw_request(server.port, bad)
        assert status[9:12] in ("400", "414", "431", "505") and json.loads(body)["error"]["message"], status
    assert call(server, "GET", "/health")[0] == 200


def test_cors_is_opt_in(model):
    """--cors ORIGIN: preflights are answered (without the API key, which browsers do not send
    on them) and every answer names the origin, so a page there may call the API."""
    origin = "https://app.example"
    with running(model, cors=origin, api_key="sesame") as server:
        status, headers, body = raw_request(server.port, "OPTIONS /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                                         f"Origin: {origin}\r\nAccess-Control-Request-Method: POST\r\n"
                                         "Access-Control-Request-Headers: authorization, content-type\r\n\r\n")
        assert status.startswith("HTTP/1.1 204") and body == ""
        assert headers["Access-Control-Allow-Origin"] == origin
        assert headers["Access-Control-Allow-Methods"] == "POST, OPTIONS"
        assert headers["Access-Control-Allow-Headers"] == "Authorization, Content-Type"
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        conn.request("POST", "/v1/completions", json.dumps({"prompt": "Hi", "max_tokens": 2}),
                     {"Authorization": "Bearer sesame", "Origin": origin})
        response = conn.getresponse()
        assert response.status == 200 and response.getheader("Access-Control-Allow-Origin") == origin
        response.read()
        conn.request("POST", "/v1/completions", json.dumps({"prompt": "Hi", "max_tokens": 2}), {"Origin": origin})
        response = conn.getresponse()  # refusals name the origin too, so the page can read why
        assert response.status == 401 and response.getheader("Access-Control-Allow-Origin") == origin
        conn.close()


def test_the_log_has_no_traceback_for_what_clients_do(tmp_path):
    """The CLI server's log (not quiet) after clients that reset the connection right after
    [DONE], reset in the middle of a stream, hang up before the whole body, or go silent past
    --timeout: one line per request, no traceback."""
    model = lively_tiny()
    ckpt = str(tmp_path / "ckpt.pt")
    save_checkpoint({"model": model.state_dict(), "config": vars(model.config), "prompt_style": "alpaca"}, ckpt)
    proc = scripts.Popen([sys.executable, os.path.join(ROOT, "serve.py"), "--ckpt", ckpt, "--port", "0",
                             "--device", "cpu", "--timeout", "0.5", "--max-batch", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        line = proc.stdout.readline()
        assert "up to 1 request at once" in line, line
        port = int(line.split("http://127.0.0.1:")[1].split("/")[0])
        body = json.dumps({"prompt": "Hello", "max_tokens": 30, "stream": True})
        request = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n{body}"
        for cut_after in (b"data: [DONE]", b"data: {", None, "silent"):
            s = socket.create_connection(("127.0.0.1", port), timeout=30)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = reset
            if cut_after == "silent":
                s.sendall(request.encode()[:40])
                assert s.recv(100) == b""  # dropped after --timeout
            elif cut_after is None:
                s.sendall(request.encode()[:-5])  # hangs up before the whole body
            else:
                s.sendall(request.encode())
                seen = b""
                while cut_after not in seen:
                    seen += s.recv(65536)
            s.close()
            time.sleep(0.3)
        assert call(type("S", (), {"port": port}), "GET", "/health")[0] == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err
    *lines, last = err.splitlines()
    logged = r'127\.0\.0\.1 - - \[.*\] ("(POST|GET) /\S* HTTP/1\.1" \d{3} .*|Request timed out: .*)'
    assert last.startswith("stopped: ") and all(re.fullmatch(logged, line) for line in lines), err


def test_more_waiting_requests_than_max_queue_get_429(model):
    with running(model, max_batch=1, max_queue=1) as server:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        conn.request("POST", "/v1/completions", json.dumps({"prompt": "Long", "max_tokens": 100, "stream": True}))
        first = conn.getresponse()
        first_event(first)  # running: the one place in the batch is taken
        waiting = ThreadPoolExecutor(1).submit(call, server, "POST", "/v1/completions", {"prompt": "Wait", "max_tokens": 2})
        while serve_stats(server)["waiting"] < 1:
            time.sleep(0.01)
        status, reply = call(server, "POST", "/v1/completions", {"prompt": "One too many", "max_tokens": 2})
        assert status == 429 and reply["error"]["code"] == "rate_limit_exceeded", reply
        assert reply["error"]["message"].startswith("the server is busy: 1 request is waiting already (at most 1)")
        conn.close()  # the first client hangs up: its place goes to the waiting request
        status, reply = waiting.result(timeout=60)
        assert status == 200 and reply["usage"]["completion_tokens"] == 2


def test_a_client_that_hangs_up_frees_its_row_at_once(model):
    with running(model) as server:
        submitted = []
        submit = server.engine.submit
        server.engine.submit = lambda requests: (submitted.extend(requests), submit(requests))
        for k, stream in enumerate((True, False)):
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
            conn.request("POST", "/v1/completions", json.dumps({"prompt": "Long", "max_tokens": 120, "stream": stream}))
            while len(submitted) <= k or not submitted[k].tokens:
                time.sleep(0.01)
            conn.sock.shutdown(socket.SHUT_RDWR)
            conn.close()
            deadline = time.monotonic() + 30
            while serve_stats(server)["running"] and time.monotonic() < deadline:
                time.sleep(0.01)
            request = submitted[k]
            assert request.cancelled.is_set() and len(request.tokens) < 120, \
                f"stream={stream}: the row ran on for {len(request.tokens)} tokens after its client left"


def test_a_silent_client_is_dropped_after_the_timeout(model):
    with running(model, timeout=0.5) as server:
        for sent in (b"", b"POST /v1/completions HTTP/1.1\r\nContent-Length: 50\r\n\r\n{\"prom"):
            with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
                s.sendall(sent)
                start = time.monotonic()
                assert s.recv(100) == b"" and time.monotonic() - start < 20  # the server closed the connection
        assert call(server, "GET", "/health")[0] == 200


def test_api_key_is_required_on_the_api(model):
    with running(model, api_key="sesame") as server:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sesame"}):
            status, reply = call(server, "POST", "/v1/completions", {"prompt": "hi", "max_tokens": 1}, headers)
            assert status == 401 and reply["error"]["code"] == "invalid_api_key"
        assert call(server, "GET", "/v1/models")[0] == 401
        assert call(server, "POST", "/v1/chat/completions", raw=b"{not json")[0] == 401  # the key comes first
        assert call(server, "POST", "/tokenize", {"prompt": "hi"})[0] == 401
        good = {"Authorization": "Bearer sesame"}
        assert call(server, "POST", "/v1/completions", {"prompt": "hi", "max_tokens": 1}, good)[0] == 200
        assert call(server, "GET", "/v1/models", headers=good)[0] == 200
        assert call(server, "GET", "/health")[0] == 200 and call(server, "GET", "/")[0] == 200
        status, _, body = raw_request(server.port, "GET /v1/models HTTP/1.1\r\nHost: x\r\n"
                                                   "Authorization: Bearer s\xe9same\r\n\r\n")  # not ASCII
        assert status.startswith("HTTP/1.1 401") and json.loads(body)["error"]["code"] == "invalid_api_key"


def test_the_api_key_is_compared_in_constant_time(model, monkeypatch):
    compared = []
    compare_digest = serve.hmac.compare_digest
    monkeypatch.setattr(serve.hmac, "compare_digest", lambda a, b: compared.append((a, b)) or compare_digest(a, b))
    with running(model, api_key="sesame") as server:
        assert call(server, "GET", "/v1/models", headers={"Authorization": "Bearer wrong"})[0] == 401
        assert call(server, "GET", "/v1/models", headers={"Authorization": "Bearer sesame"})[0] == 200
    assert compared == [(b"Bearer wrong", b"Bearer sesame"), (b"Bearer sesame", b"Bearer sesame")]


def test_the_chat_page_is_served_and_self_contained(server):
    status, page = call(server, "GET", "/")
    with open(serve.CHAT_PAGE, encoding="utf-8") as f:
        assert status == 200 and page == f.read()
    assert "/v1/chat/completions" in page and "stream: true" in page
    fetched = page.replace("xmlns='http://www.w3.org/2000/svg'", "")  # the favicon's namespace: a name, not fetched
    assert "http://" not in fetched and "https://" not in fetched and "<script src" not in page  # nothing from outside


def test_tokenize_counts_the_tokens_of_a_prompt_or_a_chat(server):
    """vLLM's POST /tokenize: the ids a chat request (messages, as /v1/chat/completions renders
    them) or a completion (a prompt) feeds the model, and the context length."""
    conversation = [*COLORS, {"role": "assistant", "content": "Red."}, {"role": "user", "content": "More?"}]
    for body, ids in [({"messages": conversation}, encode_conversation(conversation, "alpaca")[0]),
                      ({"prompt": "Once upon a time"}, encode("Once upon a time"))]:
        assert call(server, "POST", "/tokenize", body) == (200, {"count": len(ids), "max_model_len": 128,
                                                                  "tokens": ids})
    status, reply = call(server, "POST", "/tokenize", {"messages": COLORS * 3})
    assert status == 400 and "messages[2] is a user message after a user message and its input" in \
        reply["error"]["message"]
    assert call(server, "POST", "/tokenize", {"text": "x"})[1]["error"]["message"] == \
        "the request body must be a JSON object with a 'prompt' string or 'messages'"


def test_the_judge_scores_with_this_server(server, model, monkeypatch):
    """judge.py's OpenAI request (eval.py --judge-url http://127.0.0.1:PORT/v1) is answered."""
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    prompt = "Score this: 42"
    reply = llm.ask(f"http://127.0.0.1:{server.port}/v1", "any-name", prompt)
    ids = encode_conversation([{"role": "user", "content": prompt}], "alpaca")[0]
    assert llm.OPTIONS["temperature"] == 0 and reply == reference(model, ids, 128)  # greedy, to the end of the context


def test_cli_serves_a_checkpoint_and_stops_on_sigterm(tmp_path):
    model = lively_tiny(seed=2)
    ckpt = str(tmp_path / "ckpt.pt")
    save_checkpoint({"model": model.state_dict(), "config": vars(model.config), "prompt_style": "phi3"}, ckpt)
    proc = scripts.Popen([sys.executable, os.path.join(ROOT, "serve.py"), "--ckpt", ckpt, "--port", "0",
                             "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving ckpt.pt (prompt style phi3, up to 8 requests at once) on http://127.0.0.1:"), \
            line + proc.stderr.read()
        port = int(line.split("http://127.0.0.1:")[1].split("/")[0])
        status, reply = call(type("S", (), {"port": port}), "POST", "/v1/chat/completions",
                             {"messages": COLORS, "max_tokens": 5})
        assert status == 200
        assert reply["choices"][0]["message"]["content"] == reference(model, encode_conversation(COLORS, "phi3")[0], 5)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.splitlines()[-1] == ("stopped: cut off 0 replies under way and 0 waiting; nothing is kept, "
                                    "start serve.py again to go on")


def test_cli_errors_are_one_line(tmp_path):
    run = lambda *args: scripts.run([sys.executable, os.path.join(ROOT, "serve.py"), *args],  # noqa: E731
                                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    result = run("--ckpt", str(tmp_path / "missing.pt"))
    assert result.returncode == 1 and result.stderr == f"error: checkpoint {tmp_path / 'missing.pt'} does not exist\n"
    result = run("--model", "tiny")
    assert result.returncode == 1 and "'tiny' is a preset without pretrained weights" in result.stderr
    result = run("--model", "gpt2", "--port", "70000")
    assert result.returncode == 2 and "argument --port: must be a port number from 0 to 65535, got 70000" in result.stderr
    ckpt = str(tmp_path / "ckpt.pt")
    model = lively_tiny()
    save_checkpoint({"model": model.state_dict(), "config": vars(model.config), "prompt_style": "alpaca"}, ckpt)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run("--ckpt", ckpt, "--port", str(port), "--device", "cpu")
    assert result.returncode == 1 and result.stderr == f"error: cannot listen on 127.0.0.1:{port} (Address already in use)\n"
