"""datatools.py as a user runs it: dedup on a made-up file with known near-duplicates and a
planted test-set leak; generate, reflect, polite and pairs against the stub LLM server
(tests/judge_server.py) on 127.0.0.1: what they write, what they leave out and say, an
interrupted run continued without duplicates, a server that errs or sends garbage mid-run, and
the pairs of a tiny model trained on with train.py --dpo."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

import datatools
from data import load_instruction_data, prepare_data
from data import check_preference_entries, preference_splits
from judge_server import closed_port_url, echo, judge_server
from test_train import base_folder, run  # noqa: F401 (base_folder: a fixture)
import scripts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def datatools_cli(*argv, **kwargs):
    return scripts.run([sys.executable, "datatools.py", *map(str, argv)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, **kwargs)


def start(*argv):
    return scripts.Popen([sys.executable, "datatools.py", *map(str, argv)], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def read_lines(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def write_entries(path, entries):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(entries, f)
    return str(path)


def entry(instruction, output, input=""):
    return {"instruction": instruction, "input": input, "output": output}


# ----------------------------------------------------------------------------- dedup


DATA = [entry(f"Write the number {n} in words.", f"The number is {w}.") for n, w in
        enumerate("zero one two three four five six seven eight nine".split())]
DATA[4] = dict(DATA[1])  # an exact duplicate, in train
DATA += [entry("Write number 3 in words.", "The number is three."),  # 10, test: a near-duplicate of 3
         entry("Name a color.", "Blue."), entry("Name a color!", "Red.")]  # 11, 12: instructions alike only


def test_a_template_field_is_summarised_not_listed_pair_by_pair(tmp_path):
    """460 entries with one instruction make 105,570 pairs of it: over the 100,000 listed, the field
    says how many and which text the entries share; the entries are still compared in full."""
    entries = [entry("Classify the sentiment of this review.", ("positive", "negative")[n % 2], f"Review #{n}: " +
                     " ".join(("good", "bad", "long", "short", "loud", "dull", "fun", "odd")[(n >> k) % 8]
                              for k in range(0, 9, 3))) for n in range(460)]
    done = datatools_cli("dedup", write_entries(tmp_path / "data.json", entries))
    assert done.returncode == 0, done.stderr
    assert "\ninstruction: 105,570 pairs, too many to list (over 100,000); the texts entries share most:\n" \
           "  460 entries (0, 1, 2, 3, 4, ...): Classify the sentiment of this review.\n" in done.stdout
    assert "\ninput: " in done.stdout and "\noutput: " in done.stdout


def test_dedup_lists_pairs_and_the_leak_and_drops_duplicates(tmp_path):
    path = write_entries(tmp_path / "data.json", DATA)
    before = open(path, "rb").read()
    done = datatools_cli("dedup", path, "--split", "0.7,0.2", "--drop-duplicates", tmp_path / "clean.jsonl")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert f"{path}: 13 entries; near-duplicates: TF-IDF vectors of character 1-3-grams with a cosine similarity " \
           "above 0.9" in out
    pairs = re.findall(r"^  (\d\.\d\d) +(\d+): (.*)\n +(\d+): (.*)$", out, re.M)
    assert [(a, b) for _, a, _, b, _ in pairs] == [("1", "4"), ("3", "10"), ("11", "12"),  # instruction
                                                 ("1", "4"), ("3", "10")]  # output
    assert [p[0] for p in pairs][:1] == ["1.00"] and 0.9 < float(pairs[1][0]) < 1
    assert "entries that are near-duplicates of an earlier entry in every field (instruction, input, output): 2\n" \
           "  4 ~ 1  (instruction 1.00, input equal, output 1.00)\n  10 ~ 3  (instruction 0.9" in out
    assert "(--split 0.7,0.2): 9 train, 2 test, 2 validation\n" \
           "test-set leaks (entries with a near-duplicate in train): 1 test, 0 validation\n  test 10 ~ train 3" in out
    assert out.endswith("wrote " + str(tmp_path / "clean.jsonl") + ": 11 entries, 2 near-duplicates dropped "
                        "(entries 4, 10)\n")
    assert read_lines(tmp_path / "clean.jsonl") == [e for k, e in enumerate(DATA) if k not in (4, 10)]
    assert open(path, "rb").read() == before
    # a JSON array, whatever other extension; and never over the input
    assert datatools_cli("dedup", path, "--drop-duplicates", tmp_path / "clean.json").returncode == 0
    assert json.load(open(tmp_path / "clean.json")) == read_lines(tmp_path / "clean.jsonl")
    refused = datatools_cli("dedup", path, "--drop-duplicates", path)
    assert refused.returncode == 1 and refused.stderr == (
        f"error: --drop-duplicates {path} is the input file; give a new file (the input is never changed)\n")
    assert open(path, "rb").read() == before


def test_dedup_on_fields_of_choice_and_its_mistakes(tmp_path):
    path = write_entries(tmp_path / "data.json", DATA)
    done = datatools_cli("dedup", path, "--fields", "instruction", "--show", "1")
    assert "entries that are near-duplicates of an earlier entry in every field (instruction): 3\n" in done.stdout
    assert "  ... and 2 more pairs (--show all prints every one)" in done.stdout
    for argv, message in [(["--fields", "score"], f"error: {path}: no entry has any 'score' text to compare"),
                          (["--threshold", "1.5"], "argument --threshold: must be between 0 and 1, got 1.5"),
                          (["--show", "some"], "argument --show: must be a count or 'all', got some")]:
        refused = datatools_cli("dedup", path, *argv)
        assert refused.returncode in (1, 2) and refused.stderr.splitlines()[-1].endswith(message), refused.stderr
    text = tmp_path / "notes.txt"
    text.write_text("just text")
    assert datatools_cli("dedup", text).stderr == (
        f"error: {text} is raw text; dedup compares the entries of instruction data (.json, .jsonl)\n")


# ----------------------------------------------------------------------------- generate


def llm(body):
    """A made-up LLM. The pre-query template gets an instruction chosen by the request's seed: none
    (seed a multiple of 5), the template again (of 7), else "Name s // 2 things." (so seeds 2m and
    2m + 1 give the same one); an instruction gets its answer, but "Name 62 things." none."""
    messages, seed = body.get("messages"), (body.get("options") or body)["seed"]
    if messages is None or messages[0]["role"] == "assistant":  # a raw prompt (OpenAI), an assistant's (Ollama)
        return " \n" if seed % 5 == 0 else "<|eot_id|>" if seed % 7 == 0 else f"Name {seed // 2} things.\nOr not."
    return "" if "62" in messages[0]["content"] else f"Answer: {messages[0]['content'].lower()}"


# requests 0-11 from seed 123: 123 -> 61, 124 -> 62 (no answer), 125 none, 126 the template, 127 -> 63,
# 128 -> 64, 129 -> 64 again, 130 none, 131 -> 65, 132 -> 66, 133 the template, 134 -> 67
MADE = [{"instruction": f"Name {n} things.", "input": "", "output": f"Answer: name {n} things.",
         "made_by": {"tool": "generate", "model": "llama3", "seed": 123 + k, "temperature": 1.0, "top_p": 1.0,
                     "request": k}} for n, k in zip(range(61, 68), [0, 1, 4, 5, 8, 9, 11]) if n != 62]


def test_generate_writes_entries_and_counts_what_it_leaves_out(tmp_path):
    out = tmp_path / "made.jsonl"
    with judge_server(answer=llm) as server:
        done = datatools_cli("generate", out, "--count", 6, "--llm-url", server.url)
    assert done.returncode == 0, done.stderr
    assert read_lines(out) == MADE
    assert done.stdout == f"{out}: 6 entries (--count 6); left out: 3 empty, 2 unparseable, 1 duplicate\n"
    notes = [line for line in done.stderr.splitlines() if line.startswith("request")]
    assert notes == ["request 1 (seed 124): empty: no answer to 'Name 62 things.'",
                     "request 2 (seed 125): empty: no instruction in the reply",
                     "request 3 (seed 126): unparseable: the template is in the instruction '<|eot_id|>'",
                     "request 6 (seed 129): duplicate: the instruction 'Name 64 things.' is in the file already",
                     "request 7 (seed 130): empty: no instruction in the reply",
                     "request 10 (seed 133): unparseable: the template is in the instruction '<|eot_id|>'"]
    # the book's request: the template as an assistant message; the options Ollama reads
    first = server.requests[0]["body"]
    assert first == {"model": "llama3", "messages": [{"role": "assistant", "content": datatools.LLAMA3_PRE_QUERY}],
                     "options": {"seed": 123, "temperature": 1.0, "top_p": 1.0, "num_predict": 256}}
    assert server.requests[1]["body"]["messages"] == [{"role": "user", "content": "Name 61 things."}]
    assert server.requests[1]["body"]["options"] == {"seed": 123, "temperature": 1.0, "top_p": 1.0}  # no limit
    assert len(server.requests) == 12 + 7  # 12 instructions asked for, 7 answers
    # asked for more, the same command goes on from request 12; asked for as many, it asks nothing
    with judge_server(answer=llm) as server:
        assert datatools_cli("generate", out, "--count", 6, "--llm-url", server.url).returncode == 0
        assert server.requests == []
        done = datatools_cli("generate", out, "--count", 7, "--llm-url", server.url, "--llm", "llama3")
    # request 12 (seed 135) gets no instruction, 13 the seventh entry
    assert read_lines(out)[:6] == MADE and read_lines(out)[6]["instruction"] == "Name 68 things."
    assert read_lines(out)[6]["made_by"]["request"] == 13 and len(read_lines(out)) == 7


def test_generate_from_an_openai_compatible_server(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    out = tmp_path / "made.jsonl"
    with judge_server(answer=llm) as server:
        done = datatools_cli("generate", out, "--count", 1, "--llm-url", server.url + "/v1", "--temperature", 0.8,
                             "--top-p", 0.9, "--seed", 4, "--pre-query", "<|im_start|>user\n")
    assert done.returncode == 0, done.stderr
    assert [r["path"] for r in server.requests] == ["/v1/completions", "/v1/chat/completions"]
    assert server.requests[0]["body"] == {"model": "llama3", "temperature": 0.8, "seed": 4, "top_p": 0.9,
                                          "max_tokens": 256, "prompt": "<|im_start|>user\n"}  # continued as it is
    assert server.requests[0]["headers"]["Authorization"] == "Bearer sk-test"
    assert read_lines(out) == [{"instruction": "Name 2 things.", "input": "", "output": "Answer: name 2 things.",
                                "made_by": {"tool": "generate", "model": "llama3", "seed": 4, "temperature": 0.8,
                                            "top_p": 0.9, "request": 0}}]


def test_generate_from_our_own_serve_py(tmp_path):
    """serve.py as the LLM: the pre-query text continued through its /v1/completions (a raw
    prompt, sampled with the request's seed as generate() samples), then each instruction
    answered through its chat API."""
    from decoding import generate
    from prompts import decode, encode, format_prompt
    from test_serve import lively_tiny, running
    model = lively_tiny(context_length=1024)  # room for an instruction of any length, and its answer
    pre_query = format_prompt({"instruction": ""}, "alpaca").removesuffix("\n")  # "...### Instruction:"
    out = tmp_path / "made.jsonl"
    with running(model) as server:
        done = datatools_cli("generate", out, "--count", 2, "--llm", "tiny-test", "--llm-url",
                             f"http://127.0.0.1:{server.port}/v1", "--pre-query", pre_query, "--seed", 5)
    assert done.returncode == 0, done.stderr
    made = read_lines(out)
    assert len(made) == 2 and len({r["instruction"] for r in made}) == 2
    prompt = encode(pre_query)
    for record in made:
        settings = record["made_by"]
        assert settings["model"] == "tiny-test" and settings["seed"] == 5 + settings["request"]
        continued = generate(model, [prompt], datatools.INSTRUCTION_TOKENS, temperature=1.0, top_p=1.0, seed=settings["seed"])
        assert record["instruction"] == datatools.first_line(decode(continued[0])) and record["output"]


def test_an_interrupted_generation_goes_on_without_duplicates(tmp_path):
    out = tmp_path / "made.jsonl"
    with judge_server(answer=llm, delay=0.3) as server:
        proc = start("generate", out, "--count", 6, "--llm-url", server.url)
        deadline = time.time() + 120
        while (not out.exists() or len(out.read_text().splitlines()) < 2) and time.time() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in stderr
    assert stderr.splitlines()[-1] == f"interrupted: every entry made so far is in {out}; run the same command " \
                                      "again to go on"
    kept = read_lines(out)
    assert 2 <= len(kept) < 6 and kept == MADE[:len(kept)]
    with judge_server(answer=llm) as server:
        done = datatools_cli("generate", out, "--count", 6, "--llm-url", server.url)
    assert done.returncode == 0 and read_lines(out) == MADE  # as if never interrupted
    # a line cut short by a run that was killed mid-write: removed, and the entry made again
    with open(out, "r+", encoding="utf-8") as f:
        lines = f.readlines()
        f.seek(0)
        f.truncate()
        f.writelines(lines[:3] + [lines[3][:40]])
    with judge_server(answer=llm) as server:
        done = datatools_cli("generate", out, "--count", 6, "--llm-url", server.url)
    assert f"{out}: removed its last line, cut short by a run that was killed while writing it" in done.stderr
    assert read_lines(out) == MADE


@pytest.mark.parametrize("failure, message", [
    (dict(garbage=lambda n: n == 6), "the LLM server at {url} did not send an Ollama chat reply: "
                                     "'<html><body>502 Bad Gateway</body></html>'"),
    (dict(status=lambda n: 400 if n == 6 else 200), "the LLM server at {url} answered HTTP 400 Bad Request: "
                                                    "the server failed"),
])
def test_a_server_failing_mid_run_keeps_every_entry_and_says_so(tmp_path, failure, message):
    out = tmp_path / "made.jsonl"
    with judge_server(answer=llm, **failure) as server:
        done = datatools_cli("generate", out, "--count", 6, "--llm-url", server.url)
    # requests: 0 asks twice (written), 1 twice (no answer), 2 once, 3 once: the sixth
    assert done.returncode == 1 and done.stderr.splitlines()[-1] == (
        f"error: {message.format(url=server.url)}; {out} keeps the 1 entry written before: run the same command "
        "again to go on")
    assert read_lines(out) == MADE[:1]
    with judge_server(answer=llm) as server:
        assert datatools_cli("generate", out, "--count", 6, "--llm-url", server.url).returncode == 0
    assert read_lines(out) == MADE


def test_one_run_at_a_time_and_one_model_to_a_file(tmp_path):
    out = tmp_path / "made.jsonl"
    with judge_server(answer=llm, delay=0.5, models=("llama3", "mistral")) as server:
        proc = start("generate", out, "--count", 6, "--llm-url", server.url)
        deadline = time.time() + 120
        while (not out.exists() or not out.read_text()) and time.time() < deadline:  # an entry written
            time.sleep(0.05)
        second = datatools_cli("generate", out, "--count", 6, "--llm-url", server.url)
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
        assert second.returncode == 1 and second.stderr.startswith(
            f"error: {out} is in use by datatools.py generate (process {proc.pid})")
        other = datatools_cli("generate", out, "--count", 6, "--llm-url", server.url, "--llm", "mistral")
    assert other.returncode == 1 and other.stderr == (
        f"error: {out} holds entries made with tool generate, model llama3; continue it with those, or give another "
        "output file\n")
    with judge_server(models=("mistral",)) as server:
        missing = datatools_cli("generate", out, "--count", 6, "--llm-url", server.url)
    assert missing.stderr == (f"error: the Ollama server at {server.url} does not have the model 'llama3' (it has "
                              "mistral:latest); run `ollama pull llama3`\n")
    assert datatools_cli("generate", tmp_path / "made.json", "--count", 1, "--llm-url", closed_port_url()).stderr == (
        f"error: {tmp_path / 'made.json'}: the output is a .jsonl file (JSON Lines: an entry a line, written as it "
        "comes)\n")


# ----------------------------------------------------------------------------- reflect and polite


def run_on_entries(tool, answer, tmp_path, *argv):
    """`datatools.py TOOL data.json out.jsonl *argv` on ENTRIES against the stub answering `answer`:
    (the finished run, the server, the records written)."""
    path, out = write_entries(tmp_path / "data.json", ENTRIES), tmp_path / "out.jsonl"
    with judge_server(answer=answer) as server:
        done = datatools_cli(tool, path, out, *argv, "--llm-url", server.url)
    assert done.returncode == 0, done.stderr
    return done, server, read_lines(out)


ENTRIES = [entry("Name a color.", "Blue."), entry("Add 2 and 3.", "5"),
           entry("Translate to French.", "Bonjour", "Hello"), entry("Spell cat backwards.", "tac")]


def reflector(body):
    """The made-up LLM's reflection: a better answer in the book's format, or none for the sums."""
    system, prompt = (m["content"] for m in body["messages"])
    instruction = prompt.split("\n")[1]
    if "Add" in instruction:
        return "1. The answer is fine.\n2. I would not change it."
    if system == datatools.INSTRUCTION_SYSTEM:
        return f"1. Too easy.\n2. [New Instruction] {instruction} Explain why. [End]\n3. [New Answer] Because. [End]"
    return f"1. Too short.\n2. [Better Answer] A fuller answer to '{instruction}'. [End]"


def test_reflect_keeps_the_original_beside_the_refined_text(tmp_path):
    done, server, records = run_on_entries("reflect", reflector, tmp_path)
    path, out = tmp_path / "data.json", tmp_path / "out.jsonl"
    assert [(r["instruction"], r["output"]) for r in records] == [
        ("Name a color.", "A fuller answer to 'Name a color.'."), ("Add 2 and 3.", "5"),
        ("Translate to French.", "A fuller answer to 'Translate to French.'."),
        ("Spell cat backwards.", "A fuller answer to 'Spell cat backwards.'.")]
    assert records[0]["reflection"] == {"train_on": "refined", "original": {"output": "Blue."},
                                        "refined": {"output": "A fuller answer to 'Name a color.'."}}
    assert "reflection" not in records[1] and [r["made_by"]["entry"] for r in records] == [0, 1, 2, 3]
    assert "entry 1: unparseable: no [Better Answer] in the reply '1. The answer is fine. 2. I would not change it.'" \
        in done.stderr
    assert done.stdout.endswith("4 entries, 3 refined (training uses the refined text); kept as they were this "
                                "run: 1 unparseable\n")
    # the book's request, with an input
    system, prompt = (m["content"] for m in server.requests[2]["body"]["messages"])
    assert system == datatools.RESPONSE_SYSTEM_WITH_INPUT and prompt.startswith(
        "[Instruction]\nTranslate to French.\n\n[The Start of Input]\nHello\n\n[The End of Input]\n\n"
        "[The Start of Answer]\nBonjour\n\n[The End of Answer]\n\n[System]\nWe would like")
    assert server.requests[2]["body"]["options"] == {"seed": 125, "temperature": 0.0, "top_p": 1.0}
    # training on the original text instead: the entries written are switched, and data.py reads the file
    # (with no server at all: switching sends no request)
    done = datatools_cli("reflect", path, out, "--llm-url", closed_port_url(), "--train-on", "original")
    assert done.returncode == 0, done.stderr
    assert f"{out}: 3 entries written before now train on the original text" in done.stdout
    assert [(e["instruction"], e["output"]) for e in load_instruction_data(str(out))] == \
        [(e["instruction"], e["output"]) for e in ENTRIES]


def test_reflect_on_instructions_leaves_entries_with_an_input_as_they_were(tmp_path):
    done, server, records = run_on_entries("reflect", reflector, tmp_path, "--part", "instruction", "--entries", "1:")
    assert [r["made_by"]["entry"] for r in records] == [1, 2, 3] and len(server.requests) == 2
    assert records[2]["instruction"] == "Spell cat backwards. Explain why." and records[2]["output"] == "Because."
    assert records[2]["reflection"]["original"] == {"instruction": "Spell cat backwards.", "output": "tac"}
    assert "entry 2: with an input: the book's instruction reflection is for entries without one" in done.stderr


def politeness(body):
    prompt = body["messages"][0]["content"]
    output = re.search(r"and correct output `(.*)`, slightly", prompt, re.S).group(1)
    if output == "5":
        return ""
    if output == "tac":
        return "tac"
    return f"Kindly: {output}" if "to be more polite." in prompt else f"Whatever: {output}"


@pytest.mark.parametrize("tool, answer", [("reflect", reflector), ("polite", politeness)])
@pytest.mark.parametrize("failure, message", [
    (dict(garbage=lambda n: n == 3), "did not send an Ollama chat reply: '<html><body>502 Bad Gateway</body></html>'"),
    (dict(status=lambda n: 400 if n == 3 else 200), "answered HTTP 400 Bad Request: the server failed"),
])
def test_reflect_and_polite_keep_every_entry_when_the_server_fails_mid_run(tmp_path, tool, answer, failure, message):
    """The third request fails: the entries written stay, one sentence says so, and the same command
    then makes the rest, as a run that never failed does."""
    path, out = write_entries(tmp_path / "data.json", ENTRIES), tmp_path / "out.jsonl"
    with judge_server(answer=answer, **failure) as server:
        done = datatools_cli(tool, path, out, "--llm-url", server.url)
    kept = read_lines(out)
    assert done.returncode == 1 and done.stderr.splitlines()[-1] == (
        f"error: the LLM server at {server.url} {message}; {out} keeps the {len(kept)} "
        f"{'entry' if len(kept) == 1 else 'entries'} written before: run the same command again to go on") and kept
    with judge_server(answer=answer) as server:
        assert datatools_cli(tool, path, out, "--llm-url", server.url).returncode == 0
    (tmp_path / "whole").mkdir()
    _, _, whole = run_on_entries(tool, answer, tmp_path / "whole")
    assert read_lines(out) == whole


def test_polite_pairs_the_books_way(tmp_path):
    done, server, records = run_on_entries("polite", politeness, tmp_path)
    out = tmp_path / "out.jsonl"
    assert [r["made_by"]["entry"] for r in records] == [0, 2]
    for r in records:
        rewrite = ("Kindly: " if r["made_by"]["rewrote"] == "polite" else "Whatever: ") + r["output"]
        assert (r["chosen"], r["rejected"]) == ((rewrite, r["output"]) if r["made_by"]["rewrote"] == "polite"
                                                else (r["output"], rewrite))
    assert done.stdout.endswith("2 pairs; left out this run: 1 empty, 1 duplicate (a re-run asks again for those)\n")
    assert server.requests[0]["body"]["messages"][0]["content"].startswith(
        "Given the input `Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nName a color.` and correct output `Blue.`, slightly rewrite "
        "the output to be more ")
    check_preference_entries(str(out), load_instruction_data(str(out)))


# ----------------------------------------------------------------------------- pairs from a model


def score_by_length(prompt):
    """The made-up judge: 0, 40 or 80, from the length of the response it is shown; 50 for every
    response about apples (a tie, whatever the samples)."""
    return "50" if "Spell apple backwards." in prompt else str(len(echo(prompt)) % 3 * 40)


def test_pairs_from_a_model_then_dpo_on_them(tmp_path, base_folder):  # noqa: F811
    words = "apple river stone cloud green quiet music window bread silver paper garden".split()
    path = write_entries(tmp_path / "data.json", [entry(f"Spell {w} backwards.", w[::-1]) for w in words])
    out = tmp_path / "pairs.jsonl"
    with judge_server(reply=score_by_length) as server:
        done = datatools_cli("pairs", path, out, "--model", base_folder, "--judge", "llama3", "--judge-url",
                             server.url, "--samples", 3, "--max-new-tokens", 6, "--temperature", 1.0, "--device", "cpu")
    assert done.returncode == 0, done.stderr
    records = read_lines(out)
    ties = int(re.search(r"left out this run: (\d+) tied", done.stdout).group(1))
    assert len(records) + ties == 12 and len(records) >= 4 and ties >= 1
    assert "apple" not in {r["instruction"].split()[1] for r in records}  # its samples tied: left out
    for r in records:
        assert r["chosen_score"] == int(score_by_length(f"score the model response `{r['chosen']}` on a scale from "
                                                        "0 to 100"))
        assert r["chosen_score"] > r["rejected_score"] and r["chosen"] != r["rejected"]
        assert r["made_by"] == {"tool": "pairs", "model": base_folder, "judge": "llama3", "samples": 3,
                                "temperature": 1.0, "top_k": None, "top_p": None, "seed": 123, "max_new_tokens": 6,
                                "entry": r["made_by"]["entry"]}
    # the book's judge prompt, against the entry's output, with the judge's fixed options
    assert all(r["body"]["options"] == {"seed": 123, "temperature": 0, "num_ctx": 2048} for r in server.requests)
    # the same command: nothing left to do but the ties, whose samples are the same (seeded), so tie again
    with judge_server(reply=score_by_length) as server:
        again = datatools_cli("pairs", path, out, "--model", base_folder, "--judge", "llama3", "--judge-url",
                              server.url, "--samples", 3, "--max-new-tokens", 6, "--temperature", 1.0)
    assert read_lines(out) == records
    assert f"left out this run: {ties} tied" in again.stdout
    # what train.py --dpo reads
    splits = preference_splits(prepare_data(str(out), train_frac=0.5, test_frac=0.25), 64)
    assert len(splits.train) == len(records) // 2
    run("--dpo", "--model", base_folder, "--data", out, "--split", "0.5,0.25", "--context-length", 64,
        "--batch-size", 2, "--max-steps", 2, "--eval-batches", 1, "--out", tmp_path / "dpo")
    assert os.path.exists(tmp_path / "dpo" / "best.pt")


def test_pairs_needs_sampling(tmp_path, base_folder):  # noqa: F811
    path = write_entries(tmp_path / "data.json", ENTRIES)
    refused = datatools_cli("pairs", path, tmp_path / "p.jsonl", "--model", base_folder, "--judge", "llama3",
                            "--temperature", 0, "--judge-url", closed_port_url())
    assert refused.returncode == 1 and refused.stderr == (
        "error: pairs samples 2 responses to each instruction: give a --temperature above 0 (and no --num-beams)\n")
