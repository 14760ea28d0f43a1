"""Tests of judge.py and eval.py's --judge flags against a real chat server on 127.0.0.1 (tests/judge_server.py)."""
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
from common import run_main
from model import GPT, config_for
from judge_server import closed_port_url, echo as judge_server_echo, judge_server

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
        with pytest.raises(ValueError, match=f"--judge-url must be a server's http\\(s\\) address .* got '{re.escape(bad)}'"):
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
    with pytest.raises(OSError, match="no judge server is running at .*/v1: start it, or correct --judge-url"):
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


# ----------------------------------------------------------------------------- eval.py


def score_by_length(prompt):
    return f"Score: {len(prompt) % 101}"


def test_eval_judges_its_responses_and_writes_both_files(tmp_path, capsys, monkeypatch):
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
    # a judge server that is not running is found before anything is done
    with pytest.raises(OSError, match="^no judge server is running at .*: start it with `ollama serve`"):
        ev.main([*command, "--judge", "llama3", "--judge-url", closed_port_url()])
    assert os.listdir(tmp_path / "run") == ["ckpt.pt"]

    with judge_server(reply=score_by_length, models=("llama3", "qwen2:7b")) as server:
        ev.main([*command, "--judge", "llama3", "--judge-url", server.url, "--judge-workers", "2"])
        assert server.model_lists == ["/api/tags"] and len(server.requests) > 0
        records, report = read(tmp_path / "run" / "test-responses.json"), read(tmp_path / "run" / "eval.json")
        expected = [len(llm.judge_prompt(r)) % 101 if r["model_response"].strip() else 0 for r in records]
        assert [r["judge_scores"] for r in records] == [{"llama3": s} for s in expected] and len(records) == 6
        assert list(report["judge"]) == ["llama3"]
        assert list(report["judge"]["llama3"]) == ["url", "mean", "scored", "unparsed", "seconds"]
        assert report["judge"]["llama3"]["mean"] == pytest.approx(sum(expected) / 6)
        assert [report["judge"]["llama3"][k] for k in ("url", "scored", "unparsed")] == [server.url, 6, 0]
        assert report["n_evaluated"] == 6 and "f1" in report  # the rest of eval.json as before
        assert f"judge llama3: mean score {sum(expected) / 6:.2f}/100 over 6 responses" in capsys.readouterr().out

        # a second judge model: the same command continues (nothing generated again), and both judges' scores stay
        monkeypatch.setattr(ev, "generate", lambda *a, **k: pytest.fail("generated the responses again"))
        ev.main([*command, "--judge", "qwen2:7b", "--judge-url", server.url])
    records2, report2 = read(tmp_path / "run" / "test-responses.json"), read(tmp_path / "run" / "eval.json")
    assert [r["judge_scores"] for r in records2] == [{"llama3": s, "qwen2:7b": s} for s in expected]
    assert list(report2["judge"]) == ["llama3", "qwen2:7b"] and report2["judge"]["llama3"] == report["judge"]["llama3"]
    assert report2["judge"]["qwen2:7b"]["mean"] == report["judge"]["llama3"]["mean"]

    # a judge model the server does not have: refused before any work, every file as it was
    monkeypatch.setattr(ev, "load_for_inference", lambda *a, **k: pytest.fail("loaded a model for a missing judge"))
    before = {name: (tmp_path / "run" / name).read_bytes() for name in os.listdir(tmp_path / "run")}
    for url, message in [("", "the Ollama server at {url} does not have the model 'llama-3' (it has llama3:latest, "
                                 "qwen2:7b); run `ollama pull llama-3`"),
                         ("/v1", "the judge server at {url} does not serve the model 'llama-3' (it has llama3, "
                                 "qwen2:7b); check --judge")]:
        with judge_server(models=("llama3", "qwen2:7b")) as server:
            with pytest.raises(OSError) as refused:
                ev.main([*command, "--judge", "llama-3", "--judge-url", server.url + url])
            with pytest.raises(OSError) as refused_only:
                ev.main(["--judge-only", str(tmp_path / "run" / "test-responses.json"), "--judge", "llama-3",
                         "--judge-url", server.url + url])
        assert str(refused.value) == str(refused_only.value) == message.format(url=server.url + url)
        assert server.requests == [] and len(server.model_lists) == 2
    assert {name: (tmp_path / "run" / name).read_bytes() for name in os.listdir(tmp_path / "run")} == before

    # a judge that fails once the responses are written: they, and the rest of eval.json, are kept
    monkeypatch.undo()
    with judge_server(status=lambda n: 500, models=("gemma",)) as server:
        with pytest.raises(OSError, match="HTTP 500 .*; the scores so far are kept in .*test-responses.json, "
                                          "and a re-run of the same command asks only for the rest"):
            ev.main([*command, "--judge", "gemma", "--judge-url", server.url])
    assert read(tmp_path / "run" / "test-responses.json") == records2
    assert read(tmp_path / "run" / "eval.json") == report2


def test_judge_only_scores_a_file_and_fills_the_eval_json_beside_it(tmp_path, capsys):
    records = records_with(["85", "Score: 70", "eighty"])
    path = write_records(tmp_path / "run" / "test-responses.json", records)
    with judge_server(models=("llama3", "qwen")) as server:
        ev.main(["--judge-only", path, "--judge", "llama3", "--judge-url", server.url])
        report = read(tmp_path / "run" / "eval.json")  # a new eval.json, holding the judge only
        assert list(report) == ["judge"] and list(report["judge"]) == ["llama3"]
        assert report["judge"]["llama3"]["mean"] == 77.5 and report["judge"]["llama3"]["unparsed"] == 1
        assert "1 reply held no score from 0 to 100 (kept in judge_replies)" in capsys.readouterr().out

        # an existing eval.json keeps its other keys; the same judge asks again only for the reply with no score
        (tmp_path / "run" / "eval.json").write_text(json.dumps({"f1": 0.5, "judge": report["judge"]}))
        ev.main(["--judge-only", path, "--judge", "llama3", "--judge-url", server.url + "/"])
        assert len(server.requests) == 4 and read(tmp_path / "run" / "eval.json")["f1"] == 0.5
        out = capsys.readouterr().out
        assert "2 entries of 3 were scored by llama3 before" in out and "asking llama3 again for 1 entry" in out

        # another judge scores the file beside the first one
        ev.main(["--judge-only", path, "--judge", "qwen", "--judge-url", server.url, "--judge-workers", "3"])
    assert [r["body"]["model"] for r in server.requests] == ["llama3"] * 4 + ["qwen"] * 3
    report = read(tmp_path / "run" / "eval.json")
    assert report["f1"] == 0.5 and list(report["judge"]) == ["llama3", "qwen"]
    assert report["judge"]["qwen"]["scored"] == 2 and report["judge"]["llama3"]["scored"] == 2
    kept_replies = [{}, {}, {"judge_replies": {"llama3": "eighty", "qwen": "eighty"}}]
    assert read(path) == [{**e, "judge_scores": {"llama3": s, "qwen": s}, **r}
                          for e, s, r in zip(records, [85, 70, None], kept_replies)]


def test_judge_flags_are_checked_before_any_work(tmp_path, capsys):
    path = write_records(tmp_path / "r.json", records_with(["85"]))
    before = open(path).read()
    errors = [
        (["--judge-only", path, "--judge", "m", "--ckpt", "x.pt", "--limit", "3"],
         "--judge-only scores an existing file and loads no model: drop --ckpt, --limit"),
        (["--judge-only", path], "--judge-only needs --judge MODEL"),
        (["--ckpt", "x.pt", "--judge-url", "http://h"], "--judge-url needs --judge MODEL"),
        (["--ckpt", "x.pt", "--judge", "m", "--judge-url", "localhost:11434"], "--judge-url must be a server's"),
        (["--judge-only", str(tmp_path / "none.json"), "--judge", "m"], "none.json: no such data file"),
        (["--judge-only", str(tmp_path / "r.jsonl"), "--judge", "m"], "r.jsonl: expected a .json responses file"),
    ]
    for argv, message in errors:
        with pytest.raises((ValueError, OSError), match=message):
            ev.main(argv)
    no_response = write_records(tmp_path / "data.json", [{"instruction": "a", "input": "", "output": "b"}])
    with pytest.raises(ValueError, match="data.json: entry 0 has no 'model_response' string"):
        ev.main(["--judge-only", no_response, "--judge", "m"])
    bad_score = write_records(tmp_path / "bad" / "r.json", [{**records_with(["1"])[0], "judge_scores": {"m": "85"}}])
    with pytest.raises(ValueError, match="entry 0: 'judge_scores' must map each judge model to an integer from 0 to "
                                         r"100 or null, got \{'m': '85'\}"):
        ev.main(["--judge-only", bad_score, "--judge", "m"])
    bad_reply = write_records(tmp_path / "bad" / "r.json", [{**records_with(["1"])[0], "judge_replies": {"m": 3}}])
    with pytest.raises(ValueError, match=r"entry 0: 'judge_replies' must map each judge model to a string, "
                                         r"got \{'m': 3\}"):
        ev.main(["--judge-only", bad_reply, "--judge", "m"])
    unfinished = write_records(tmp_path / "bad" / "r.json", [{**records_with(["1"])[0], "model_response": None}])
    with pytest.raises(ValueError, match="entry 0 has no response yet \\(eval.py was stopped before making it\\); "
                                         "run the same eval.py command again to finish the file"):
        ev.main(["--judge-only", unfinished, "--judge", "m"])
    (tmp_path / "eval.json").write_text("{not json")
    with pytest.raises(ValueError, match="eval.json is not a JSON object as eval.py writes"):
        ev.main(["--judge-only", path, "--judge", "m"])
    with pytest.raises(SystemExit):
        ev.main(["--judge-only", path, "--judge", " "])
    assert "argument --judge: must be a model name" in capsys.readouterr().err
    assert open(path).read() == before and (tmp_path / "eval.json").read_text() == "{not json"


def test_judge_server_down_is_one_line_and_exit_status_1(tmp_path):
    path = write_records(tmp_path / "r.json", records_with(["85"]))
    url = closed_port_url()
    with pytest.raises(SystemExit) as exit_:
        run_main(lambda: ev.main(["--judge-only", path, "--judge", "llama3", "--judge-url", url]))
    assert exit_.value.code == (f"error: no judge server is running at {url}: start it with `ollama serve` "
                                f"(and `ollama pull llama3` once)")


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
    def run(*argv):
        return subprocess.run([sys.executable, os.path.join(ROOT, "judge.py"), *argv], capture_output=True, text=True,
                              cwd=ROOT, timeout=120)
    shown = run("--help")
    assert shown.returncode == 0 and shown.stdout.startswith("usage: python eval.py --judge-only FILE --judge MODEL")
    assert "It has no command line of its own: eval.py\nruns it" in shown.stdout
    refused = run()
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr.splitlines()[-1] == (
        "judge.py: error: judge.py is run through eval.py: python eval.py --judge-only out/test-responses.json "
        "--judge llama3 scores a responses file (python eval.py --help lists the --judge flags)")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_while_judging_with_workers_keeps_the_scores_and_exits_130(tmp_path, signum):
    records = records_with([str(i) for i in range(40)])
    path = write_records(tmp_path / "r.json", records)
    with judge_server(delay=0.3) as server:
        command = [sys.executable, os.path.join(ROOT, "eval.py"), "--judge-only", path, "--judge", "llama3",
                   "--judge-url", server.url, "--judge-workers", "4"]
        proc = subprocess.Popen(command, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
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
        assert stdout.splitlines()[-1] == (f"interrupted: the llama3 scores so far are kept in {path}; "
                                           "the same command asks only for the rest")
        assert 4 <= len(scored) < 40
        asked = len(server.requests)
        subprocess.run(command, check=True, capture_output=True, timeout=120)
    assert len(server.requests) - asked == 40 - len(scored)
    assert [r["judge_scores"] for r in read(path)] == [{"llama3": i} for i in range(40)]
