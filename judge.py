"""Score model responses with an LLM judge, the chapter's second evaluation step (the book's
ollama_evaluate.py): a larger model (Llama 3 through Ollama in the book) reads each test entry,
its expected output and the model's response, and answers with a score from 0 to 100.

    python eval.py --ckpt out/ckpt.pt                              # first: the responses
    python judge.py out/test-responses.json --judge llama3         # then: their scores
    python judge.py out/test-responses.json --judge qwen2.5:7b --workers 4
    python judge.py out/test-responses.json --judge gpt-4o-mini --url https://api.openai.com/v1

FILE is a responses file eval.py wrote. The server is Ollama (POST URL/api/chat, the book's
request) unless the URL ends in /v1: then it is an OpenAI-compatible server (POST
URL/chat/completions; vLLM, llama.cpp's server, LM Studio, OpenAI itself, our serve.py), sent
$OPENAI_API_KEY when it is set. The server is asked for its models before anything is scored.
Each score is written into FILE as it arrives, under its judge's name ("judge_scores": {MODEL: an
int, or null when the reply holds no integer from 0 to 100}, and that reply in "judge_replies":
{MODEL: text}), so an interrupted run loses nothing, the same command asks only for the rest and
for the nulls, and the scores of several judges stand side by side. An empty response scores 0
with no request, as in the book. The summary (url, mean, scored, unparsed, seconds) goes into the
eval.json beside FILE under "judge": {MODEL: ...}, beside the other judges' (a new eval.json if
there is none); eval.py, run again, keeps it.
"""
import common  # noqa: F401  (first: Ctrl-C while torch loads is one line, see common.py)
import argparse
import os
import queue
import threading
import time

from common import (AT_LEAST_1, POSITIVE, Progress, checked, lock_folder, plural, run_main, stop_on_interrupt,
    writable_folder, write_json)
from llm import DEFAULT_TIMEOUT, DEFAULT_URL, ask, check_server, check_url, judge_prompt, parse_score
from results import RESPONSES, SUMMARY, load_responses, read_summary


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", metavar="FILE", help=f"a responses file eval.py wrote (OUT/{RESPONSES})")
    p.add_argument("--judge", metavar="MODEL", required=True, type=checked(str, str.strip, "a model name"),
                   help="the judge model on the server, e.g. llama3")
    p.add_argument("--url", default=DEFAULT_URL, help=f"the server: Ollama's address (default {DEFAULT_URL}), or one "
                   "ending in /v1 for an OpenAI-compatible server ($OPENAI_API_KEY is sent if set)")
    p.add_argument("--workers", metavar="N", type=AT_LEAST_1, default=1, help="requests at a time (default 1)")
    p.add_argument("--timeout", metavar="SECONDS", type=POSITIVE, default=DEFAULT_TIMEOUT,
                   help=f"seconds to wait for the server to answer (default {DEFAULT_TIMEOUT:g})")
    args = p.parse_args(argv)
    url = check_url(args.url)
    with stop_on_interrupt(f"the {args.judge} scores so far are kept in {args.file}; the same command asks only "
                           "for the rest"):
        load_responses(args.file)  # a missing or malformed file stops here, before any request
        folder = writable_folder(os.path.dirname(args.file) or ".")
        lock = lock_folder(folder, "judge.py")  # held to the end: eval.py does not write there meanwhile
        try:
            judge(args.file, os.path.join(folder, SUMMARY), args.judge, url, args.workers, args.timeout)
        finally:
            if lock is not None:
                lock.close()


def judge(path, eval_path, model, url, workers, timeout):
    """Score the responses file at path with the judge model, and add its summary to the
    eval.json at eval_path (new, or updated) beside those of other judge models."""
    report = read_summary(eval_path)
    check_server(url, model, timeout)
    try:
        summary = judge_file(path, model, url, workers, timeout)
    except (OSError, ValueError) as e:
        raise OSError(f"{e}; the scores so far are kept in {path}, and a re-run of the same command "
                      "asks only for the rest") from None
    report["judge"] = {**report.get("judge", {}), model: summary}
    write_json(report, eval_path)
    mean = "no score" if summary["mean"] is None else f"mean score {summary['mean']:.2f}/100"
    unparsed = f"{plural(summary['unparsed'], 'reply')} held no score from 0 to 100 (kept in judge_replies)" \
        if summary["unparsed"] else "every reply held a score"
    print(f"judge {model}: {mean} over {plural(summary['scored'], 'response')}; {unparsed}; wrote {eval_path}")


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

    def on_reply(i, reply, progress):
        record_reply(records[i], model, reply)
        if records[i]["judge_scores"][model] is None:
            progress.note(f"entry {i}: no score from 0 to 100 in the reply {reply[:80]!r}")
        write_json(records, path)

    ask_all({i: judge_prompt(records[i]) for i in todo}, model, url, workers, timeout, on_reply)

    parsed = [s[model] for s in scores if s[model] is not None]
    return {"url": url, "mean": sum(parsed) / len(parsed) if parsed else None,
            "scored": len(parsed), "unparsed": len(records) - len(parsed),
            "seconds": round(time.perf_counter() - start, 1)}


def ask_all(prompts, model, url, workers, timeout, on_reply):
    """Ask the model for a reply to each of prompts ({key: prompt}), `workers` requests at a
    time, calling on_reply(key, reply, progress) in this thread as each arrives. A failed
    request is raised once those under way have been answered (no new one is made after it)."""
    # Daemon threads make the requests: an interruption (Ctrl-C) does not wait for those under way.
    jobs, replies, stop = queue.SimpleQueue(), queue.SimpleQueue(), threading.Event()
    for key in prompts:
        jobs.put(key)

    def work():
        while not stop.is_set():
            try:
                key = jobs.get_nowait()
            except queue.Empty:
                return
            try:
                replies.put((key, ask(url, model, prompts[key], timeout), None))
            except Exception as e:  # noqa: BLE001  (handed to the main thread, which raises it)
                stop.set()
                replies.put((key, None, e))

    threads = [threading.Thread(target=work, daemon=True) for _ in range(min(workers, len(prompts)))]
    for thread in threads:
        thread.start()
    error, done = None, 0
    with Progress(f"judged by {model}:", len(prompts)) as progress:
        try:
            while any(thread.is_alive() for thread in threads) or not replies.empty():
                try:
                    key, reply, failed = replies.get(timeout=0.1)
                except queue.Empty:
                    continue
                if failed is not None:
                    error = error or failed
                    continue
                on_reply(key, reply, progress)
                done += 1
                progress.update(done)
        finally:
            stop.set()
    if error is not None:
        raise error


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


if __name__ == "__main__":
    run_main(main)
