"""Tests of judge.py, its scoring and its command line, against a real chat server on 127.0.0.1 (judge_server.py)."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import eval as ev
import judge
import llm
from checkpoint import save_checkpoint
from model import GPT, config_for
from judge_server import closed_port_url, echo as judge_server_echo, judge_server
import scripts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPTIONS = {"seed": 123, "temperature": 0, "num_ctx": 2048}


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch):
    monkeypatch.setattr(llm, "BACKOFF", 0.01)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)


def records_with(responses):
    """Responses records as eval.py writes them, one per model response, every other one with an input."""
    return [{"instruction": f"Name a color ({i}).", "input": "" if i % 2 else f"Hint {i}.",
             "output": "Blue.", "model_response": response} for i, response in enumerate(responses)]


def write_records(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=4), encoding="utf-8")
    return str(path)


def read(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


PARSING = ["85", "Score: 85", "eighty", "150", ""]  # echoed by the server: 85, 85, unparsed, unparsed, empty -> 0


# ----------------------------------------------------------------------------- prompt and parsing


def test_the_prompt_is_the_books_text():
    entry = {"instruction": "Rewrite the sentence using a simile.", "input": "The car is very fast.",
             "output": "The car is as fast as lightning.", "model_response": "The car is as fast as a bullet."}
    assert llm.judge_prompt(entry) == (
        "Given the input `Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nRewrite the sentence using a simile.\n\n### Input:\n"
        "The car is very fast.` and correct output `The car is as fast as lightning.`, score the model response "
        "`The car is as fast as a bullet.` on a scale from 0 to 100, where 100 is the best score. "
        "Respond with the integer number only.")
    no_input = {**entry, "input": ""}
    assert "### Input" not in llm.judge_prompt(no_input)
    assert llm.judge_prompt(no_input).startswith("Given the input `Below is an instruction that describes a task. "
                                                   "Write a response that appropriately completes the request."
                                                   "\n\n### Instruction:\nRewrite the sentence using a simile.` ")


def test_a_conversation_is_judged_on_its_last_user_turn_with_the_earlier_turns_as_context():
    record = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi."},
                           {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name a color."},
                           {"role": "assistant", "content": "Blue."}], "model_response": "Red."}
    assert llm.judge_prompt(record) == (
        "Given the conversation so far\n```\nsystem: Be brief.\nuser: Hi.\nassistant: Hello!\n```\n"
        "and the input `Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nName a color.` and correct output `Blue.`, score the model "
        "response `Red.` on a scale from 0 to 100, where 100 is the best score. Respond with the integer number only.")
    one_turn = {"messages": record["messages"][3:], "model_response": "Red."}  # no earlier turns: the book's prompt
    assert llm.judge_prompt(one_turn) == llm.judge_prompt(
        {"instruction": "Name a color.", "input": "", "output": "Blue.", "model_response": "Red."})


def test_parse_score_takes_the_first_integer_from_0_to_100():
    assert [llm.parse_score(r) for r in PARSING] == [85, 85, None, None, None]
    assert llm.parse_score("100") == 100 and llm.parse_score("0") == 0
    assert llm.parse_score("I would say 70/100, because 3 words are wrong.") == 70
    assert llm.parse_score("-5") is None and llm.parse_score("101") is None


def test_check_url():
    assert llm.check_url("http://localhost:11434/") == "http://localhost:11434"
    assert llm.check_url("https://api.openai.com/v1") == "https://api.openai.com/v1"
    for bad in ["localhost:11434", "ftp://host", "http://", "http://host:port", "http://host/?a=1"]:
        with pytest.raises(ValueError, match=f"--url must be a server's http\\(s\\) address .* got '{re.escape(bad)}'"):
            llm.check_url(bad)
    with pytest.raises(ValueError, match="address without the endpoint: http://host:11434, not http://host:11434/api"):
        llm.check_url("http://host:11434/api/chat")
    with pytest.raises(ValueError, match="without the endpoint: http://host/v1, not http://host/v1/chat/completions"):
        llm.check_url("http://host/v1/chat/completions")


# ----------------------------------------------------------------------------- the two protocols


@pytest.mark.parametrize("stream", [True, False])
def test_ollama_requests_replies_and_the_responses_file(tmp_path, monkeypatch, stream):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-not-for-ollama")
    records = records_with(PARSING)
    path = write_records(tmp_path / "test-responses.json", records)
    with judge_server(stream=stream) as server:
        summary = judge.judge_file(path, "llama3", server.url)
    # the book's request, for every non-empty response, with no key sent to Ollama
    assert sorted((r["path"], json.dumps(r["body"])) for r in server.requests) == sorted(
        ("/api/chat", json.dumps({"model": "llama3", "messages": [{"role": "user", "content": llm.judge_prompt(e)}],
                                  "options": OPTIONS})) for e in records[:4])
    assert all("Authorization" not in r["headers"] for r in server.requests)
    replies = [None, None, {"judge_replies": {"llama3": "eighty"}}, {"judge_replies": {"llama3": "150"}}, None]
    assert read(path) == [{**e, "judge_scores": {"llama3": s}, **(r or {})}
                          for e, s, r in zip(records, [85, 85, None, None, 0], replies)]
    assert summary["mean"] == pytest.approx(170 / 3)
    assert {k: v for k, v in summary.items() if k != "seconds"} == {
        "url": server.url, "mean": summary["mean"], "scored": 3, "unparsed": 2}
    assert summary["seconds"] >= 0


def test_openai_compatible_request_and_key(tmp_path, monkeypatch):
    records = records_with(["90", "Score: 40"])
    path = write_records(tmp_path / "r.json", records)
    with judge_server() as server:
        assert judge.judge_file(path, "gpt-x", server.url + "/v1")["mean"] == 65
        monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
        assert llm.ask(server.url + "/v1", "gpt-x", llm.judge_prompt(records[0])) == "90"
    assert [r["path"] for r in server.requests] == ["/v1/chat/completions"] * 3
    assert server.requests[-1]["body"] == {"model": "gpt-x", "temperature": 0, "seed": 123,
                                           "messages": [{"role": "user", "content": llm.judge_prompt(records[0])}]}
    assert [r["headers"].get("Authorization") for r in server.requests] == [None, None, "Bearer sk-test"]
    assert [r["judge_scores"] for r in read(path)] == [{"gpt-x": 90}, {"gpt-x": 40}]


# ----------------------------------------------------------------------------- failures


def test_failures_are_one_clear_sentence_and_leave_the_file_intact(tmp_path):
    path = write_records(tmp_path / "r.json", records_with(["85", "70"]))
    before = open(path).read()
    with judge_server(status=lambda n: 404) as server:
        with pytest.raises(OSError, match=f"the Ollama server at {server.url} does not have the model 'llama3' "
                                          r"\(HTTP 404: model 'llama3' not found.*run `ollama pull llama3`$"):
            judge.judge_file(path, "llama3", server.url)
        with pytest.raises(OSError, match=r"answered HTTP 404 Not Found: model 'gpt-x' not found"):
            judge.judge_file(path, "gpt-x", server.url + "/v1")
    with pytest.raises(OSError, match=r"no judge server is running at http://127.0.0.1:\d+: start it with "
                                      r"`ollama serve` \(and `ollama pull llama3` once\)$"):
        judge.judge_file(path, "llama3", closed_port_url())
    with pytest.raises(OSError, match="no judge server is running at .*/v1: start it, or correct --url"):
        judge.judge_file(path, "llama3", closed_port_url() + "/v1")
    with judge_server(delay=1.0) as server:
        with pytest.raises(OSError, match=f"the judge server at {server.url} did not answer within 0.2 seconds"):
            judge.judge_file(path, "llama3", server.url, timeout=0.2)
    with judge_server(status=lambda n: 500) as server:
        with pytest.raises(OSError, match=r"answered HTTP 500 Internal Server Error: the server failed \(5 tries\)"):
            judge.judge_file(path, "llama3", server.url)
    assert len(server.requests) == llm.RETRIES + 1
    assert open(path).read() == before and os.listdir(tmp_path) == ["r.json"]


@pytest.mark.parametrize("status", [500, 503, 429])
def test_a_server_error_is_retried(tmp_path, status):
    path = write_records(tmp_path / "r.json", records_with(["85"]))
    with judge_server(status=lambda n: status if n == 1 else 200, stream=False) as server:
        assert judge.judge_file(path, "llama3", server.url)["mean"] == 85
    assert len(server.requests) == 2 and server.requests[0]["body"] == server.requests[1]["body"]


def test_reply_text_of_each_protocol_and_of_a_reply_that_is_neither():
    ollama_object = '{\n  "message": {"role": "assistant", "content": "70"},\n  "done": true\n}'
    assert llm.reply_text(ollama_object.encode(), "http://h") == "70"  # one object, even across lines
    assert llm.reply_text(b'{"message": {"content": "7"}}\n{"message": {"content": "5"}}\n', "http://h") == "75"
    assert llm.reply_text(b'{"choices": [{"message": {"content": null}}]}', "http://h/v1") == ""
    with pytest.raises(ValueError, match=r"at http://h did not send an Ollama chat reply: '\{\"choices\": \[\]\}'"):
        llm.reply_text(b'{"choices": []}', "http://h")
    with pytest.raises(ValueError, match="at http://h/v1 did not send an OpenAI chat reply: '<html>'"):
        llm.reply_text(b"<html>", "http://h/v1")
    with pytest.raises(ValueError, match="did not send an Ollama chat reply"):
        llm.reply_text(b"\xff\xfe", "http://h")


def test_an_interrupted_judging_resumes_where_it_stopped(tmp_path):
    records = records_with([str(10 * i) for i in range(8)])
    path = write_records(tmp_path / "r.json", records)
    with judge_server(status=lambda n: 200 if n <= 3 else 500) as server:  # fails for good after 3 requests
        with pytest.raises(OSError, match="HTTP 500"):
            judge.judge_file(path, "llama3", server.url)
    assert read(path) == [{**e, "judge_scores": {"llama3": 10 * i}} for i, e in enumerate(records[:3])] \
        + [{**e, "judge_scores": {}} for e in records[3:]]
    with judge_server() as server:
        summary = judge.judge_file(path, "llama3", server.url)
    assert [r["body"]["messages"][0]["content"] for r in server.requests] == list(map(llm.judge_prompt, records[3:]))
    assert read(path) == [{**e, "judge_scores": {"llama3": 10 * i}} for i, e in enumerate(records)]
    assert summary["mean"] == 35 and summary["scored"] == 8

    # a second judge model's scores go beside the first one's, which survive its failure and its success
    with judge_server(status=lambda n: 200 if n <= 2 else 500, reply=lambda prompt: "7") as server:
        with pytest.raises(OSError, match="HTTP 500"):
            judge.judge_file(path, "qwen", server.url)
    assert [r["judge_scores"] for r in read(path)] == [{"llama3": 0, "qwen": 7}, {"llama3": 10, "qwen": 7}] + [
        {"llama3": 10 * i} for i in range(2, 8)]
    with judge_server(reply=lambda prompt: "7") as server:
        assert judge.judge_file(path, "qwen", server.url)["mean"] == 7
    assert len(server.requests) == 6
    assert read(path) == [{**e, "judge_scores": {"llama3": 10 * i, "qwen": 7}} for i, e in enumerate(records)]


def test_a_reply_without_a_score_is_kept_and_asked_again(tmp_path, capsys):
    records = records_with(["70", "Score: 80", "90"])
    path = write_records(tmp_path / "r.json", records)
    with judge_server(reply=lambda prompt: "I cannot say." if "Score: 80" in prompt else judge_server_echo(prompt)) \
            as server:
        assert judge.judge_file(path, "llama3", server.url)["unparsed"] == 1
    assert read(path)[1] == {**records[1], "judge_scores": {"llama3": None},
                             "judge_replies": {"llama3": "I cannot say."}}
    assert "entry 1: no score from 0 to 100 in the reply 'I cannot say.'" in capsys.readouterr().err
    with judge_server() as server:
        summary = judge.judge_file(path, "llama3", server.url)
    assert [r["body"]["messages"][0]["content"] for r in server.requests] == [llm.judge_prompt(records[1])]
    assert "2 entries of 3 were scored by llama3 before" in capsys.readouterr().out
    assert read(path) == [{**e, "judge_scores": {"llama3": s}} for e, s in zip(records, [70, 80, 90])]
    assert summary["mean"] == 80 and summary["unparsed"] == 0


@pytest.mark.parametrize("workers", [1, 4])
def test_workers_run_that_many_requests_at_once(tmp_path, workers):
    records = records_with([str(i) for i in range(6)])
    path = write_records(tmp_path / "r.json", records)
    # with 4 workers the first 4 requests are answered only once all 4 are being served together
    with judge_server(wait_for=workers if workers > 1 else 0, delay=0.02) as server:
        judge.judge_file(path, "llama3", server.url, workers=workers)
    assert server.max_active == workers and len(server.requests) == 6
    assert [r["judge_scores"]["llama3"] for r in read(path)] == list(range(6))  # in file order, as replies come


# ----------------------------------------------------------------------------- judge.py's command line, after eval.py


def judge_py(*argv, timeout=120):
    """judge.py in a process of its own, as a user runs it."""
    return scripts.run([sys.executable, os.path.join(ROOT, "judge.py"), *map(str, argv)], capture_output=True,
                          text=True, cwd=ROOT, timeout=timeout)


def results_in(folder):
    """{name: contents} of the files in folder, but for .lock (which says who held the folder's lock last)."""
    return {name: (folder / name).read_bytes() for name in os.listdir(folder) if name != ".lock"}


def score_by_length(prompt):
    return f"Score: {len(prompt) % 101}"


def test_judge_py_scores_eval_pys_responses_and_both_files_keep_them(tmp_path, monkeypatch):
    entries = [{"instruction": f"Say the number {i}.", "input": "", "output": str(i)} for i in range(20)]
    data = tmp_path / "data.json"
    data.write_text(json.dumps(entries))
    torch.manual_seed(0)
    model = GPT(config_for("tiny", context_length=128)).eval()
    ckpt = str(tmp_path / "run" / "ckpt.pt")
    save_checkpoint({"model": model.state_dict(), "config": vars(model.config), "prompt_style": "alpaca",
                     "mask_instructions": False, "context_length": 128, "data": str(data),
                     "train_frac": 0.5, "test_frac": 0.3}, ckpt)
    command = ["--ckpt", ckpt, "--max-new-tokens", "4", "--device", "cpu"]
    ev.main(command)  # the chapter's first step: the responses
    path, eval_path = tmp_path / "run" / "test-responses.json", tmp_path / "run" / "eval.json"
    evaluated = read(eval_path)

    # a judge server that is not running is found before anything is done
    before = results_in(tmp_path / "run")
    down = judge_py(path, "--judge", "llama3", "--url", closed_port_url())
    assert down.returncode == 1 and re.fullmatch(r"error: no judge server is running at .*: start it with "
                                                 r"`ollama serve` \(and `ollama pull llama3` once\)\n", down.stderr)
    assert results_in(tmp_path / "run") == before

    with judge_server(reply=score_by_length, models=("llama3", "qwen2:7b")) as server:
        judged = judge_py(path, "--judge", "llama3", "--url", server.url, "--workers", "2")
        assert judged.returncode == 0, judged.stderr
        assert server.model_lists == ["/api/tags"] and len(server.requests) > 0
        records, report = read(path), read(eval_path)
        expected = [len(llm.judge_prompt(r)) % 101 if r["model_response"].strip() else 0 for r in records]
        assert [r["judge_scores"] for r in records] == [{"llama3": s} for s in expected] and len(records) == 6
        assert list(report["judge"]) == ["llama3"]
        assert list(report["judge"]["llama3"]) == ["url", "mean", "scored", "unparsed", "seconds"]
        assert report["judge"]["llama3"]["mean"] == pytest.approx(sum(expected) / 6)
        assert [report["judge"]["llama3"][k] for k in ("url", "scored", "unparsed")] == [server.url, 6, 0]
        assert {k: v for k, v in report.items() if k != "judge"} == evaluated  # the rest of eval.json as before
        assert f"judge llama3: mean score {sum(expected) / 6:.2f}/100 over 6 responses" in judged.stdout

        # a second judge model: its scores go beside the first one's
        assert judge_py(path, "--judge", "qwen2:7b", "--url", server.url).returncode == 0
    records2, report2 = read(path), read(eval_path)
    assert [r["judge_scores"] for r in records2] == [{"llama3": s, "qwen2:7b": s} for s in expected]
    assert list(report2["judge"]) == ["llama3", "qwen2:7b"] and report2["judge"]["llama3"] == report["judge"]["llama3"]
    assert report2["judge"]["qwen2:7b"]["mean"] == report["judge"]["llama3"]["mean"]

    # eval.py's same command again continues (nothing generated again), and both judges' scores stay
    monkeypatch.setattr(ev, "generate", lambda *a, **k: pytest.fail("generated the responses again"))
    ev.main(command)
    assert read(path) == records2 and read(eval_path) == report2
    monkeypatch.undo()

    # a judge model the server does not have: refused before any request, every file as it was
    before = results_in(tmp_path / "run")
    for url, message in [("", "the Ollama server at {url} does not have the model 'llama-3' (it has llama3:latest, "
                                 "qwen2:7b); run `ollama pull llama-3`"),
                         ("/v1", "the judge server at {url} does not serve the model 'llama-3' (it has llama3, "
                                 "qwen2:7b); check --judge")]:
        with judge_server(models=("llama3", "qwen2:7b")) as server:
            refused = judge_py(path, "--judge", "llama-3", "--url", server.url + url)
        assert refused.returncode == 1 and refused.stderr == f"error: {message.format(url=server.url + url)}\n"
        assert server.requests == [] and len(server.model_lists) == 1
    assert results_in(tmp_path / "run") == before

    # a judge that fails midway: the responses, and the rest of eval.json, are kept
    with judge_server(status=lambda n: 500, models=("gemma",)) as server:
        failed = judge_py(path, "--judge", "gemma", "--url", server.url)
    assert failed.returncode == 1 and re.fullmatch(
        r"error: .*HTTP 500 .*; the scores so far are kept in .*test-responses.json, and a re-run of the same "
        r"command asks only for the rest\n", failed.stderr), failed.stderr
    assert read(path) == records2
    assert read(eval_path) == report2


def test_judge_py_fills_the_eval_json_beside_the_file(tmp_path):
    records = records_with(["85", "Score: 70", "eighty"])
    path = write_records(tmp_path / "run" / "test-responses.json", records)
    with judge_server(models=("llama3", "qwen")) as server:
        first = judge_py(path, "--judge", "llama3", "--url", server.url)
        report = read(tmp_path / "run" / "eval.json")  # a new eval.json, holding the judge only
        assert list(report) == ["judge"] and list(report["judge"]) == ["llama3"]
        assert report["judge"]["llama3"]["mean"] == 77.5 and report["judge"]["llama3"]["unparsed"] == 1
        assert "1 reply held no score from 0 to 100 (kept in judge_replies)" in first.stdout

        # an existing eval.json keeps its other keys; the same judge asks again only for the reply with no score
        (tmp_path / "run" / "eval.json").write_text(json.dumps({"f1": 0.5, "judge": report["judge"]}))
        again = judge_py(path, "--judge", "llama3", "--url", server.url + "/")
        assert len(server.requests) == 4 and read(tmp_path / "run" / "eval.json")["f1"] == 0.5
        assert "2 entries of 3 were scored by llama3 before" in again.stdout
        assert "asking llama3 again for 1 entry" in again.stdout

        # another judge scores the file beside the first one
        assert judge_py(path, "--judge", "qwen", "--url", server.url, "--workers", "3").returncode == 0
    assert [r["body"]["model"] for r in server.requests] == ["llama3"] * 4 + ["qwen"] * 3
    report = read(tmp_path / "run" / "eval.json")
    assert report["f1"] == 0.5 and list(report["judge"]) == ["llama3", "qwen"]
    assert report["judge"]["qwen"]["scored"] == 2 and report["judge"]["llama3"]["scored"] == 2
    kept_replies = [{}, {}, {"judge_replies": {"llama3": "eighty", "qwen": "eighty"}}]
    assert read(path) == [{**e, "judge_scores": {"llama3": s, "qwen": s}, **r}
                          for e, s, r in zip(records, [85, 70, None], kept_replies)]


def test_judge_py_mistakes_are_found_before_any_request(tmp_path, capsys):
    path = write_records(tmp_path / "test-responses.json", records_with(["85"]))
    before = open(path).read()
    (tmp_path / "eval.json").write_text("{not json")
    url = closed_port_url()  # no request could be answered: each mistake is found before one is made
    errors = [
        ([str(tmp_path / "none.json")], f"{tmp_path / 'none.json'}: no such responses file (eval.py writes "
                                        f"test-responses.json in its --out folder); did you mean {path}?"),
        ([str(tmp_path / "r.jsonl")], "r.jsonl: expected a .json responses file as eval.py writes"),
        ([str(tmp_path / "eval.json")], f"{tmp_path / 'eval.json'} is eval.py's summary, not its responses; give the "
                                        f"responses file {path} (eval.py writes both in its --out folder)"),
        ([str(tmp_path)], f"{tmp_path} is a folder, not a responses file; did you mean {path}?"),
        ([path, "--url", "localhost:11434"], "--url must be a server's http(s) address"),
        ([path, "--url", url], "eval.json is not a JSON object as eval.py writes"),
    ]
    for argv, message in errors:
        with pytest.raises((ValueError, OSError), match=re.escape(message)):
            judge.main([*argv, "--judge", "m"])
    no_response = write_records(tmp_path / "data.json", [{"instruction": "a", "input": "", "output": "b"}])
    with pytest.raises(ValueError, match="data.json: entry 0 has no 'model_response' string"):
        judge.main([no_response, "--judge", "m", "--url", url])
    bad_score = write_records(tmp_path / "bad" / "r.json", [{**records_with(["1"])[0], "judge_scores": {"m": "85"}}])
    with pytest.raises(ValueError, match="entry 0: 'judge_scores' must map each judge model to an integer from 0 to "
                                         r"100 or null, got \{'m': '85'\}"):
        judge.main([bad_score, "--judge", "m", "--url", url])
    bad_reply = write_records(tmp_path / "bad" / "r.json", [{**records_with(["1"])[0], "judge_replies": {"m": 3}}])
    with pytest.raises(ValueError, match=r"entry 0: 'judge_replies' must map each judge model to a string, "
                                         r"got \{'m': 3\}"):
        judge.main([bad_reply, "--judge", "m", "--url", url])
    unfinished = write_records(tmp_path / "bad" / "r.json", [{**records_with(["1"])[0], "model_response": None}])
    with pytest.raises(ValueError, match="entry 0 has no response yet \\(eval.py was stopped before making it\\); "
                                         "run the same eval.py command again to finish the file"):
        judge.main([unfinished, "--judge", "m", "--url", url])
    for argv, message in [([path, "--judge", " "], "argument --judge: must be a model name"),
                          ([path], "the following arguments are required: --judge"),
                          ([path, "--judge", "m", "--ckpt", "x.pt"], "unrecognized arguments: --ckpt x.pt"),
                          ([path, "--judge", "m", "--workers", "0"], "argument --workers: must be at least 1, got 0"),
                          ([path, "--judge", "m", "--timeout", "0"], "argument --timeout: must be a positive number")]:
        with pytest.raises(SystemExit) as stopped:
            judge.main(argv)
        assert stopped.value.code == 2 and message in capsys.readouterr().err
    assert open(path).read() == before and (tmp_path / "eval.json").read_text() == "{not json"


def test_judge_py_on_a_file_that_is_no_responses_or_a_server_that_is_down_is_one_line_and_exit_1(tmp_path):
    missing = tmp_path / "out" / "nope.json"
    missing.parent.mkdir()
    result = judge_py(missing, "--judge", "llama3")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == (f"error: {missing}: no such responses file (eval.py writes test-responses.json in its "
                             "--out folder)\n")
    summary = tmp_path / "out" / "eval.json"  # the other file eval.py writes
    summary.write_text('{"f1": 0.5}')
    result = judge_py(summary, "--judge", "llama3")
    assert result.returncode == 1 and result.stderr == (
        f"error: {summary} is eval.py's summary, not its responses; give the responses file "
        f"{tmp_path / 'out' / 'test-responses.json'} (eval.py writes both in its --out folder)\n")
    path = write_records(tmp_path / "r.json", records_with(["85"]))
    url = closed_port_url()
    result = judge_py(path, "--judge", "llama3", "--url", url)
    assert result.returncode == 1 and result.stderr == (f"error: no judge server is running at {url}: start it with "
                                                        "`ollama serve` (and `ollama pull llama3` once)\n")


def test_check_server_reads_the_model_list_of_each_protocol(monkeypatch):
    with judge_server(models=("llama3", "phi3:mini", "gpt-x")) as server:
        llm.check_server(server.url, "llama3")  # Ollama lists it as llama3:latest
        llm.check_server(server.url, "phi3:mini")
        with pytest.raises(OSError, match=r"does not have the model 'phi3' \(it has llama3:latest, phi3:mini, "
                                          r"gpt-x:latest\); run `ollama pull phi3`$"):
            llm.check_server(server.url, "phi3")
        monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
        llm.check_server(server.url + "/v1", "gpt-x")
        with pytest.raises(OSError, match=r"does not serve the model 'llama3:latest' \(it has llama3, phi3:mini, "
                                          r"gpt-x\); check --judge$"):
            llm.check_server(server.url + "/v1", "llama3:latest")
        with pytest.raises(OSError, match=f"^the judge server at {server.url}/api answered GET "
                                          f"{server.url}/api/api/tags with HTTP 404 Not Found: not found; "
                                          r"is it an Ollama server\?$"):
            llm.check_server(server.url + "/api", "llama3")
    assert server.model_lists == ["/api/tags"] * 3 + ["/v1/models"] * 2 + ["/api/api/tags"]
    assert server.requests == []


def test_judge_py_says_how_it_is_run():
    shown = judge_py("--help")
    assert shown.returncode == 0 and shown.stdout.startswith("usage: judge.py [-h] --judge MODEL [--url URL]")
    assert "python judge.py out/test-responses.json --judge llama3" in shown.stdout
    refused = judge_py()
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr.splitlines()[-1] == "judge.py: error: the following arguments are required: FILE, --judge"


def test_judge_py_waits_for_no_eval_py_at_work_in_the_same_folder(tmp_path):
    """A process holding the folder's lock as eval.py does while it writes there is named, and
    judge.py refused before any request; once it has ended, judge.py runs."""
    path = write_records(tmp_path / "test-responses.json", records_with(["85"]))
    hold = "import sys, common; lock = common.lock_folder(sys.argv[1], 'eval.py'); print('locked', flush=True); " \
        "sys.stdin.read()"
    holder = subprocess.Popen([sys.executable, "-c", hold, str(tmp_path)], cwd=ROOT, text=True, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == "locked\n"
        with judge_server() as server:
            refused = judge_py(path, "--judge", "llama3", "--url", server.url)
            assert refused.returncode == 1 and refused.stderr == (
                f"error: {tmp_path} is in use by eval.py (process {holder.pid}); wait for it to end, or give another "
                "folder\n")
            assert server.requests == [] and "judge_scores" not in read(path)[0]
            holder.communicate("", timeout=30)  # eval.py ends
            assert judge_py(path, "--judge", "llama3", "--url", server.url).returncode == 0
    finally:
        holder.kill()
    assert read(path)[0]["judge_scores"] == {"llama3": 85}


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_while_judging_with_workers_keeps_the_scores_and_exits_130(tmp_path, signum):
    records = records_with([str(i) for i in range(40)])
    path = write_records(tmp_path / "r.json", records)
    with judge_server(delay=0.3) as server:
        command = [sys.executable, os.path.join(ROOT, "judge.py"), path, "--judge", "llama3", "--url", server.url,
                   "--workers", "4"]
        proc = scripts.Popen(command, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        def scored_so_far():
            return [i for i, r in enumerate(read(path)) if "llama3" in r.get("judge_scores", {})]
        deadline = time.time() + 120  # until 4 scores are saved (a request answered is not yet a score saved)
        while len(scored_so_far()) < 4 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=30)  # not waiting for the requests under way
        scored = scored_so_far()
        assert proc.returncode == 130 and "Traceback" not in stderr, stderr
        assert stderr.splitlines()[-1] == (f"interrupted: the llama3 scores so far are kept in {path}; "
                                           "the same command asks only for the rest")
        assert 4 <= len(scored) < 40
        asked = len(server.requests)
        scripts.run(command, check=True, capture_output=True, timeout=120)
    assert len(server.requests) - asked == 40 - len(scored)
    assert [r["judge_scores"] for r in read(path)] == [{"llama3": i} for i in range(40)]
