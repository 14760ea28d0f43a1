"""Score model responses with an LLM judge, as the chapter's evaluation step does with Llama 3
through Ollama: a larger model reads each test entry, its expected output and the model's
response, and answers with a score from 0 to 100. It has no command line of its own: eval.py
runs it (--judge MODEL after the responses, or --judge-only FILE for a responses file).

The server is Ollama (POST URL/api/chat, the book's request) unless the URL ends in /v1: then
it is an OpenAI-compatible server (POST URL/chat/completions; vLLM, llama.cpp's server, LM
Studio, OpenAI itself), sent $OPENAI_API_KEY when it is set. check_server asks the server for
its models (Ollama's /api/tags, /v1/models) before anything is scored. Each score is written
into the responses file as it arrives, under its judge's name ("judge_scores": {MODEL: an int,
or null when the reply holds no integer from 0 to 100}, and that reply in "judge_replies":
{MODEL: text}), so an interrupted run loses nothing, a re-run with the same judge model asks
only for the rest and for the nulls, and the scores of several judges stand side by side.
"""
import argparse
import os
import queue
import threading
import time

from common import Progress, plural, write_json
from data import load_instruction_data
from llm import DEFAULT_TIMEOUT, DEFAULT_URL, ask, judge_prompt, parse_score


def load_responses(path, unfinished=False):
    """The records of a responses file as eval.py writes it: a JSON array of entries, each with
    a model_response (null for one not made yet, with unfinished=True) and perhaps its judges'
    judge_scores and judge_replies. ValueError naming the entry that is not."""
    if not path.endswith(".json"):
        raise ValueError(f"{path}: expected a .json responses file as eval.py writes (test-responses.json)")
    records = load_instruction_data(path)
    for i, record in enumerate(records):
        response = record.get("model_response")
        if response is None and unfinished and "model_response" in record:
            continue
        if response is None and "model_response" in record:
            raise ValueError(f"{path}: entry {i} has no response yet (eval.py was stopped before making it); "
                             "run the same eval.py command again to finish the file")
        if not isinstance(response, str):
            raise ValueError(f"{path}: entry {i} has no 'model_response' string; is it a file eval.py wrote?")
        for key, ok, kind in (("judge_scores", lambda v: v is None or type(v) is int and 0 <= v <= 100,
                               "an integer from 0 to 100 or null"),
                              ("judge_replies", lambda v: isinstance(v, str), "a string")):
            judged = record.get(key, {})
            if not isinstance(judged, dict) or not all(ok(v) for v in judged.values()):
                raise ValueError(f"{path}: entry {i}: {key!r} must map each judge model to {kind}, got {judged!r}")
    return records


def judge_file(path, model, url=DEFAULT_URL, workers=1, timeout=DEFAULT_TIMEOUT):
    """Score each record of the responses file at path that this judge model has not scored
    yet, or whose reply held no score, `workers` requests at a time, writing the file again
    (atomically) as each score arrives. An empty response scores 0 with no request, as in the
    book. Check the model with check_server first. Returns {"url", "mean" (of the parsed
    scores), "scored", "unparsed", "seconds"}."""
    start = time.perf_counter()
    records = load_responses(path)
    scores = [record.setdefault("judge_scores", {}) for record in records]
    todo = [i for i, s in enumerate(scores) if s.get(model) is None]
    if len(todo) < len(records):
        print(f"{plural(len(records) - len(todo), 'entry')} of {len(records)} were scored by {model} before")
    if again := sum(model in scores[i] for i in todo):
        print(f"asking {model} again for {plural(again, 'entry')} whose reply held no score")
    empty = [i for i in todo if not records[i]["model_response"].strip()]
    for i in empty:
        scores[i][model] = 0
    if empty:
        write_json(records, path)
    todo = [i for i in todo if records[i]["model_response"].strip()]

    # Daemon threads make the requests: an interruption (Ctrl-C) does not wait for those under way.
    # After a failure no new request is made; the replies of those under way are still kept.
    jobs, replies, stop = queue.SimpleQueue(), queue.SimpleQueue(), threading.Event()
    for i in todo:
        jobs.put(i)

    def work():
        while not stop.is_set():
            try:
                i = jobs.get_nowait()
            except queue.Empty:
                return
            try:
                replies.put((i, ask(url, model, judge_prompt(records[i]), timeout), None))
            except Exception as e:  # noqa: BLE001  (handed to the main thread, which raises it)
                stop.set()
                replies.put((i, None, e))

    threads = [threading.Thread(target=work, daemon=True) for _ in range(min(workers, len(todo)))]
    for thread in threads:
        thread.start()
    error, done = None, 0
    with Progress(f"judged by {model}:", len(todo)) as progress:
        try:
            while any(thread.is_alive() for thread in threads) or not replies.empty():
                try:
                    i, reply, failed = replies.get(timeout=0.1)
                except queue.Empty:
                    continue
                if failed is not None:
                    error = error or failed
                    continue
                record_reply(records[i], model, reply)
                if records[i]["judge_scores"][model] is None:
                    progress.note(f"entry {i}: no score from 0 to 100 in the reply {reply[:80]!r}")
                write_json(records, path)
                done += 1
                progress.update(done)
        finally:
            stop.set()
    if error is not None:
        raise error

    parsed = [s[model] for s in scores if s[model] is not None]
    return {"url": url, "mean": sum(parsed) / len(parsed) if parsed else None,
            "scored": len(parsed), "unparsed": len(records) - len(parsed),
            "seconds": round(time.perf_counter() - start, 1)}


def record_reply(record, model, reply):
    """The judge's score in record["judge_scores"]; a reply without one in record["judge_replies"]."""
    score = record["judge_scores"][model] = parse_score(reply)
    replies = record.setdefault("judge_replies", {})
    if score is None:
        replies[model] = reply
    else:
        replies.pop(model, None)
    if not replies:
        del record["judge_replies"]


def main(argv=None):
    """judge.py has no command line of its own: --help says how eval.py runs it; anything else is refused."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                usage="python eval.py --judge-only FILE --judge MODEL [--judge-url URL] ...")
    p.parse_args(argv)
    p.error("judge.py is run through eval.py: python eval.py --judge-only out/test-responses.json --judge llama3 "
            "scores a responses file (python eval.py --help lists the --judge flags)")


if __name__ == "__main__":
    main()
