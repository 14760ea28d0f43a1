"""Tests of eval.py on small data and random tiny checkpoints made here (no ../shared, no train.py)."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

import eval as ev
from checkpoint import save_checkpoint
from data import batch_indices, collate, InstructionDataset, prepare_data
from prompts import decode, encode, EOT_ID, format_prompt, load_tokenizer, prompt_ids
from common import IGNORE_INDEX
from hf import HF_REPOS
from model import config_for, GPT
from decoding import generate, respond
import scripts
from test_tokenizers import write_folder
from tiny_family import tokenizer_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FRACTIONS = dict(train_frac=0.5, test_frac=0.3)  # 20 entries -> 10 train, 6 test (entries 10-15), 4 val


def make_entries(n=20):
    """Entries of varied lengths, with and without input."""
    return [{"instruction": f"Rewrite sentence {i} in the passive voice." if i % 3 else f"Name {i} colors.",
             "input": "" if i % 2 else "The cat chased " + "the small mouse " * (i % 5),
             "output": f"Answer {i}: the mouse was chased."} for i in range(n)]


def write_data(tmp_path, entries, name="data.json"):
    path = tmp_path / name
    path.write_text(json.dumps(entries), encoding="utf-8")
    return str(path)


def tiny_model(context_length=128, seed=0):
    torch.manual_seed(seed)
    return GPT(config_for("tiny", context_length=context_length)).eval()


def save_ckpt(path, model, **fields):
    """A checkpoint as train.py writes it, minus the training state; fields add or override keys."""
    ckpt = {"model": model.state_dict(), "config": vars(model.config), "prompt_style": "alpaca",
            "mask_instructions": False, "context_length": model.config.context_length, **FRACTIONS, **fields}
    save_checkpoint(ckpt, str(path))
    return str(path)


def run_eval(*args):
    """main() in-process; returns eval.json and test-responses.json of the run's output folder."""
    args = [str(a) for a in args]
    ev.main([*args, "--device", "cpu"])
    out = args[args.index("--out") + 1] if "--out" in args else os.path.dirname(args[args.index("--ckpt") + 1])
    with open(os.path.join(out, "eval.json")) as f, open(os.path.join(out, "test-responses.json")) as g:
        return json.load(f), json.load(g)


def loss_by_hand(model, entries, style, mask, batch_size, context_length):
    """Cross-entropy per counted target over batches of entries in order, from the logits."""
    dataset = InstructionDataset(entries, style, mask)
    total = count = 0
    for start in range(0, len(entries), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(entries)))]
        inputs, targets = collate(items, allowed_max_length=context_length)
        with torch.no_grad():
            logits = model(inputs)
        total += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
        count += (targets != IGNORE_INDEX).sum().item()
    return total / count


# ----------------------------------------------------------------------------- losses


def test_test_and_val_loss_equal_the_loss_by_hand_with_the_checkpoints_masking(tmp_path):
    entries = make_entries()
    model = tiny_model()
    ckpt = save_ckpt(tmp_path / "run" / "ckpt.pt", model, mask_instructions=True, data=write_data(tmp_path, entries))
    report, _ = run_eval("--ckpt", ckpt, "--batch-size", 4, "--max-new-tokens", 2)
    masked = loss_by_hand(model, entries[10:16], "alpaca", True, 4, 128)
    unmasked = loss_by_hand(model, entries[10:16], "alpaca", False, 4, 128)
    assert abs(masked - unmasked) > 1e-3  # the masking changes the loss, so the check below means something
    assert report["test_loss"] == pytest.approx(masked, abs=1e-5)
    assert report["test_perplexity"] == pytest.approx(math.exp(masked), rel=1e-5)
    assert report["val_loss"] == pytest.approx(loss_by_hand(model, entries[16:], "alpaca", True, 4, 128), abs=1e-5)
    assert report["mask_instructions"] is True and report["n_test_entries"] == 6

    report, _ = run_eval("--ckpt", ckpt, "--batch-size", 4, "--max-new-tokens", 2, "--no-mask-instructions",
                         "--force")
    assert report["test_loss"] == pytest.approx(unmasked, abs=1e-5) and report["mask_instructions"] is False


# ----------------------------------------------------------------------------- responses


def model_stopping_on(token, seed):
    """A random tiny model that says end-of-text exactly where it would have said `token`:
    the two swap embeddings (the output head is tied to them; wte.weight is [emb_dim, vocab])."""
    model = tiny_model(seed=seed)
    with torch.no_grad():
        model.wte.weight[:, [token, EOT_ID]] = model.wte.weight[:, [EOT_ID, token]]
    return model


def test_batched_responses_equal_one_at_a_time_and_json_keeps_the_chapters_layout(tmp_path):
    entries = make_entries()
    prompts = [encode(format_prompt(e)) for e in entries[10:16]]
    second_words = [ids[1] for ids in generate(tiny_model(seed=2), prompts, 2, stop_ids=())]
    model = model_stopping_on(second_words[1], seed=2)  # row 1 stops after one token; rows that never say it run on
    ckpt = save_ckpt(tmp_path / "ckpt.pt", model, data=write_data(tmp_path, entries))
    report, records = run_eval("--ckpt", ckpt, "--batch-size", 4, "--max-new-tokens", 12, "--out", tmp_path / "o")

    alone = [generate(model, [p], 12)[0] for p in prompts]
    assert 0 < sum(len(ids) == 12 for ids in alone) < 6  # some rows stop at end-of-text, some never do
    assert report["no_end_of_text"] == sum(len(ids) == 12 for ids in alone)
    expected = [ev.clean_response(respond(model, [e], "alpaca", 12)[0], "alpaca") for e in entries[10:16]]
    assert [r["model_response"] for r in records] == expected
    assert records == [{**e, "model_response": r, "raw_response": decode(ids), "no_end_of_text": len(ids) == 12}
                       for e, r, ids in zip(entries[10:16], expected, alone)]  # in file order, the raw text beside
    assert all(list(r) == ["instruction", "input", "output", "model_response", "raw_response", "no_end_of_text"]
               for r in records)
    assert (tmp_path / "o" / "test-responses.json").read_text().startswith('[\n    {\n        "instruction": ')
    assert report["n_evaluated"] == 6 and report["truncated_prompts"] == 0 and "labels" not in report
    assert report["generation"] == {"max_new_tokens": 12, "temperature": 0.0, "top_k": None, "top_p": None,
                                    "num_beams": 1, "length_penalty": 1.0, "quantize": None,
                                    "batch_size": 4, "seed": 123, "choices": None, "choice_norm": None}
    assert report["tokens_per_second"] > 0 and 0 <= report["f1"] <= 1 and report["exact_match"] == 0

    # 70 new tokens do not fit after the longest of these prompts (34 to 61 tokens): the rows
    # batched with it still get their whole budget, not just what the longest prompt leaves
    report, records = run_eval("--ckpt", ckpt, "--batch-size", 4, "--max-new-tokens", 70, "--out", tmp_path / "o",
                               "--force")
    alone = [generate(model, [p], 70)[0] for p in prompts]
    assert max(map(len, prompts)) == 61 and report["truncated_prompts"] == 0
    assert report["no_end_of_text"] == sum(len(ids) == min(70, 128 - len(p) + 1) for ids, p in zip(alone, prompts))
    assert sorted(map(len, alone)) == [1, 1, 68, 70, 70, 70]  # the longest prompt's row fills the context
    assert [r["model_response"] for r in records] == [ev.clean_response(decode(ids), "alpaca") for ids in alone]


def test_conversations_are_evaluated_on_their_last_assistant_turn(tmp_path):
    conversations = [{"messages": [{"role": "user", "content": f"Hi {i}."}, {"role": "assistant", "content": "Hello!"},
                                   {"role": "user", "content": "Name a color."},
                                   {"role": "assistant", "content": ["Blue.", "Red."][i % 2]}]} for i in range(20)]
    model = tiny_model()
    ckpt = save_ckpt(tmp_path / "ckpt.pt", model, data=write_data(tmp_path, conversations, "chat.json"))
    report, records = run_eval("--ckpt", ckpt, "--max-new-tokens", 5, "--out", tmp_path / "o")
    test = conversations[10:16]
    # the prompt is everything before the last assistant turn, rendered as in training
    expected = [ev.clean_response(decode(ids), "alpaca")
                for ids in generate(model, [prompt_ids(c, "alpaca") for c in test], 5)]
    assert [r["model_response"] for r in records] == expected
    assert [{k: v for k, v in r.items() if k == "messages"} for r in records] == test
    assert report["exact_match"] == ev.score_responses([c["messages"][-1]["content"] for c in test],
                                                       expected)["exact_match"]
    assert report["labels"] == ev.score_responses(["Blue.", "Red."] * 3, expected)["labels"]  # Blue./Red. are labels
    by_hand = loss_by_hand(model, test, "alpaca", False, 8, 128)
    assert math.isclose(report["test_loss"], by_hand, rel_tol=1e-5)


def test_limit_evaluates_the_first_entries_in_the_checkpoints_prompt_style(tmp_path, capsys):
    entries = make_entries()
    model = tiny_model(seed=1)
    ckpt = save_ckpt(tmp_path / "ckpt.pt", model, prompt_style="phi3", data=write_data(tmp_path, entries))
    report, records = run_eval("--ckpt", ckpt, "--limit", 2, "--max-new-tokens", 6)
    assert [r["instruction"] for r in records] == [e["instruction"] for e in entries[10:12]]
    assert [r["model_response"] for r in records] == [ev.clean_response(r, "phi3")
                                                      for r in respond(model, entries[10:12], "phi3", 6)]
    assert report["n_evaluated"] == 2 and report["n_test_entries"] == 6 and report["prompt_style"] == "phi3"
    assert report["test_loss"] == pytest.approx(loss_by_hand(model, entries[10:12], "phi3", False, 16, 128), abs=1e-5)
    assert "2 of 6 test entries, prompt style phi3" in capsys.readouterr().out


def test_long_prompts_are_cut_from_the_left_and_counted(tmp_path, capsys):
    entries = make_entries()
    entries[12]["input"] = "many words " * 60  # a prompt of over 128 tokens, beyond the whole context
    model = tiny_model(context_length=64, seed=2)
    ckpt = save_ckpt(tmp_path / "ckpt.pt", model, data=write_data(tmp_path, entries))
    prompts = [encode(format_prompt(e)) for e in entries[10:16]]
    assert ev.max_prompt_tokens(64, 8) == 56 and ev.max_prompt_tokens(64, 100) == 32
    assert ev.max_prompt_tokens(1024, 256) == 768

    report, records = run_eval("--ckpt", ckpt, "--max-new-tokens", 8, "--batch-size", 3)
    assert report["truncated_prompts"] == sum(len(p) > 56 for p in prompts) == 2 and len(prompts[2]) > 64
    assert records[2]["model_response"] == ev.clean_response(decode(generate(model, [prompts[2][-56:]], 8)[0]),
                                                             "alpaca")
    assert "2 prompts longer than 56 tokens were cut to their last 56" in capsys.readouterr().out

    # more new tokens than half the context: prompts keep 32 tokens, and a response that never
    # ends fills the context (32 + 33 - 1 = 64 positions, the last token is never fed back)
    report, records = run_eval("--ckpt", ckpt, "--max-new-tokens", 100, "--batch-size", 3, "--force")
    alone = [generate(model, [p[-32:]], 100)[0] for p in prompts]
    assert report["truncated_prompts"] == 6 and max(map(len, alone)) == 33
    assert report["no_end_of_text"] == sum(len(ids) == 33 for ids in alone)
    assert "never reached end-of-text" in capsys.readouterr().out


# ----------------------------------------------------------------------------- scores


def test_scores_on_hand_made_examples():
    assert ev.normalize_answer("  The Cat, sat  on a   mat! ") == "cat sat on mat"
    assert ev.normalize_answer("“Sci/Tech”.") == "scitech"  # unicode quotes are punctuation too
    assert ev.exact_match("The answer: Paris.", "answer paris") == 1.0
    assert ev.exact_match("Paris, France", "Paris") == 0.0
    # prediction cat sat on mat, reference cat sat: precision 2/4, recall 2/2
    assert ev.f1_score("The cat sat on the mat.", "A cat sat") == pytest.approx(2 / 3)
    assert ev.f1_score("cat cat cat", "cat dog") == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))
    assert ev.f1_score("dog", "cat") == 0.0
    assert ev.f1_score("", "") == 1.0 and ev.f1_score("The", "cat") == 0.0  # nothing left after normalising
    scores = ev.score_responses(["Jane Austen.", "The car is as fast as lightning."],
                                ["jane austen", "The car is fast."])
    assert scores == {"exact_match": 0.5, "f1": pytest.approx((1 + 2 * 1 * (3 / 6) / (1 + 3 / 6)) / 2)}


def test_label_outputs_get_accuracy_and_per_label_counts():
    refs = ["World", "Sports", "Business", "Sci/Tech", "World", "Sports"]
    responses = ["world.", "Sports", "Sci/Tech", "sci/tech", "The World", "Business"]
    scores = ev.score_responses(refs, responses)
    assert scores["accuracy"] == scores["exact_match"] == pytest.approx(4 / 6)
    assert scores["labels"] == {"Business": {"count": 1, "correct": 0}, "Sci/Tech": {"count": 1, "correct": 1},
                                "Sports": {"count": 2, "correct": 1}, "World": {"count": 2, "correct": 2}}
    assert list(scores["labels"]) == ["Business", "Sci/Tech", "Sports", "World"]
    # not labels: no value repeats, a value of four words, or more than 20 distinct values
    assert ev.label_names(["Paris", "Jane Austen"]) is None
    assert ev.label_names(["yes", "yes", "no it is not"]) is None
    assert ev.label_names([f"label {i}" for i in range(21)] * 2) is None
    assert ev.label_names(["Yes.", "yes", "No"]) == {"yes": "Yes.", "no": "No"}


def test_label_data_end_to_end(tmp_path):
    topics = ["World", "Sports", "Business", "Sci/Tech"]
    entries = [{"instruction": "Classify the news topic as one of World, Sports, Business, Sci/Tech.",
                "input": f"Headline number {i}.", "output": topics[i % 3]} for i in range(20)]
    ckpt = save_ckpt(tmp_path / "ckpt.pt", tiny_model(), data=write_data(tmp_path, entries))
    report, records = run_eval("--ckpt", ckpt, "--max-new-tokens", 3)
    outputs = Counter(e["output"] for e in entries[10:16])
    assert {name: c["count"] for name, c in report["labels"].items()} == outputs
    correct = sum(ev.exact_match(r["model_response"], r["output"]) for r in records)
    assert sum(c["correct"] for c in report["labels"].values()) == correct == report["accuracy"] * 6


def test_clean_response_cuts_template_markers_of_any_style():
    assert ev.clean_response("  Paris.\n\n### Instruction:\nName a city.", "alpaca") == "Paris."
    assert ev.clean_response("### Response:\nParis.\n### Input:\nx", "alpaca") == "Paris."
    assert ev.clean_response("Paris. Below is an instruction that describes a task. Write a response that "
                             "appropriately completes the request.", "alpaca") == "Paris."
    assert ev.clean_response("<|assistant|>:\nBlue.\n<|user|>\nAnd red?", "phi3") == "Blue."
    assert ev.clean_response("### Instruction: is kept in phi3", "phi3") == "### Instruction: is kept in phi3"
    assert ev.clean_response("\n### Response:\n", "alpaca") == ""


# ----------------------------------------------------------------------------- errors and atomic writes


def test_errors_are_clear(tmp_path, capsys, monkeypatch):
    entries = make_entries()
    data = write_data(tmp_path, entries)
    model = tiny_model()
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="junk.pt is corrupt or not a train.py checkpoint"):
        ev.main(["--ckpt", str(tmp_path / "junk.pt")])
    wrong = save_ckpt(tmp_path / "wrong.pt", model, config={**vars(model.config), "context_length": 64})
    with pytest.raises(ValueError, match=r"wrong.pt is corrupt: its weights do not fit its config \(size mismatch"):
        ev.main(["--ckpt", wrong])
    gone = save_ckpt(tmp_path / "gone.pt", model, data=str(tmp_path / "moved.json"))
    with pytest.raises(FileNotFoundError, match="moved.json, which does not exist here; pass the data with --data"):
        ev.main(["--ckpt", gone])
    no_test = save_ckpt(tmp_path / "no_test.pt", model, data=data, test_frac=0.0)
    with pytest.raises(ValueError, match="the test split is empty"):
        ev.main(["--ckpt", no_test])
    with pytest.raises(ValueError, match="give --out DIR"):
        ev.main(["--model", "gpt2"])
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    with pytest.raises(ValueError, match="give exactly one of --ckpt"):
        ev.main([])
    assert os.listdir(".") == []  # found before any folder is used (the default --out is the checkpoint's)
    with pytest.raises(SystemExit):
        ev.main(["--ckpt", no_test, "--limit", "0"])
    assert "argument --limit: must be at least 1, got 0" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.glob("*.json*")) == ["data.json"]  # none of these runs wrote a file


def test_data_is_recognised_by_content_and_a_changed_file_refused(tmp_path):
    entries = make_entries()
    data = write_data(tmp_path, entries)
    fingerprint = prepare_data(data).fingerprint
    model = tiny_model()
    ckpt = save_ckpt(tmp_path / "ckpt.pt", model, data=data, data_fingerprint=fingerprint)
    report, _ = run_eval("--ckpt", ckpt, "--limit", 1, "--max-new-tokens", 2)
    os.makedirs(tmp_path / "elsewhere")
    moved = write_data(tmp_path / "elsewhere", entries)
    os.remove(data)
    moved_report, _ = run_eval("--ckpt", ckpt, "--data", moved, "--limit", 1, "--max-new-tokens", 2, "--force")
    assert moved_report["test_loss"] == report["test_loss"] and moved_report["data"] == moved

    # the checkpoint's own file, changed since: refused, saying how to evaluate on it as it is now
    changed_entries = entries[:-1] + [{**entries[-1], "output": "changed"}]
    write_data(tmp_path, changed_entries)
    with pytest.raises(ValueError, match=f"^{data} is not the data the checkpoint was trained on \\({data}\\): its "
                                         f"content differs .*; to evaluate on it as it is now, give --data {data}$"):
        ev.main(["--ckpt", ckpt, "--out", str(tmp_path / "refused")])


def test_other_data_is_evaluated_on_its_own_test_split(tmp_path):
    """eval.py --ckpt X --data OTHER, as a user runs it: OTHER's test split, a line saying so, and
    eval.json recording OTHER."""
    entries = make_entries()
    data = write_data(tmp_path, entries)
    model = tiny_model()
    ckpt = save_ckpt(tmp_path / "run" / "ckpt.pt", model, data=data, data_fingerprint=prepare_data(data).fingerprint)
    other_entries = [{**e, "output": f"Other answer {i}."} for i, e in enumerate(make_entries(30))]
    other = write_data(tmp_path, other_entries, "other.json")
    result = scripts.run([sys.executable, os.path.join(ROOT, "eval.py"), "--ckpt", ckpt, "--data", other, "--out",
                             str(tmp_path / "other"), "--max-new-tokens", "2", "--device", "cpu"],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    notes = [line for line in result.stdout.splitlines() if "not the data" in line]
    assert notes == [f"note: {other} is not the data the checkpoint was trained on ({data}); evaluating on its test "
                     "split"]
    report, records = read_json(tmp_path / "other" / "eval.json"), read_json(tmp_path / "other" / "test-responses.json")
    assert [{k: r[k] for k in e} for e, r in zip(other_entries[15:24], records)] == other_entries[15:24]
    assert len(records) == report["n_test_entries"] == 9  # 0.5,0.3 of 30 entries: the checkpoint's fractions
    assert report["data"] == other and report["data_sha256"] == prepare_data(other).fingerprint["sha256"]
    assert report["test_loss"] == pytest.approx(loss_by_hand(model, other_entries[15:24], "alpaca", False, 16, 128),
                                                abs=1e-5)


def test_an_unwritable_out_fails_before_any_work(tmp_path, monkeypatch):
    data = write_data(tmp_path, make_entries())
    ckpt = save_ckpt(tmp_path / "ckpt.pt", tiny_model(), data=data)
    monkeypatch.setattr(ev, "load_for_inference", lambda *a: pytest.fail("loaded a model before checking --out"))
    (tmp_path / "a-file").write_text("")
    with pytest.raises(NotADirectoryError, match=f"^{tmp_path / 'a-file'} is a file, not a folder to write results in$"):
        ev.main(["--ckpt", ckpt, "--out", str(tmp_path / "a-file")])
    with pytest.raises(NotADirectoryError, match=f"^cannot create the folder {tmp_path / 'a-file' / 'under'}: "
                       f"{tmp_path / 'a-file'} is a file$"):
        ev.main(["--ckpt", ckpt, "--out", str(tmp_path / "a-file" / "under")])


def eval_py(*argv, timeout=300):
    """eval.py run to its end in a process of its own, as a user runs it."""
    return scripts.run([sys.executable, os.path.join(ROOT, "eval.py"), *map(str, argv)], capture_output=True,
                          text=True, cwd=ROOT, timeout=timeout)


def test_cli_missing_checkpoint_is_one_line(tmp_path):
    missing = tmp_path / "missing.pt"
    result = eval_py("--ckpt", missing)
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: checkpoint {missing} does not exist"
    result = eval_py("--ckpt", tmp_path / "nowhere" / "missing.pt")  # its folder, the default --out, is not made
    assert result.returncode == 1 and result.stderr.endswith("nowhere/missing.pt does not exist\n")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("out", ["", "/sys/foo", "/proc/foo"])
def test_an_out_that_cannot_be_a_folder_is_refused_first(tmp_path, out):
    """Before any data is read or model built, and without writing anything anywhere (an empty
    --out is no stand-in for the checkpoint's folder)."""
    ckpt = save_ckpt(tmp_path / "run" / "ckpt.pt", tiny_model(), data=write_data(tmp_path, make_entries()))
    result = eval_py("--ckpt", ckpt, "--out", out, "--max-new-tokens", 2, "--device", "cpu")
    assert result.returncode == 1 and result.stdout == "" and len(result.stderr.splitlines()) == 1, result.stderr
    if out:
        assert result.stderr.startswith(f"error: cannot create the folder {out}: ")
    else:
        assert result.stderr == "error: --out is empty; give the folder for test-responses.json and eval.json\n"
    assert os.listdir(tmp_path / "run") == ["ckpt.pt"] and not os.path.exists(out)


def test_model_paths_that_are_no_model_say_so(tmp_path):
    """--model with a file that does not exist, or a train.py output folder; --reference that does not fit."""
    result = eval_py("--model", tmp_path / "out" / "nope.pt", "--out", tmp_path / "o")
    assert result.returncode == 1 and result.stderr == (
        f"error: {tmp_path / 'out' / 'nope.pt'} does not exist; a model is a preset with pretrained weights "
        f"({', '.join(HF_REPOS)}), a local folder or a model file\n")
    run = tmp_path / "run"
    save_ckpt(run / "best.pt", tiny_model(), data=write_data(tmp_path, make_entries()))
    result = eval_py("--model", run, "--out", tmp_path / "o")
    assert result.returncode == 1 and result.stderr == (
        f"error: {run} is a train.py output folder, not a Hugging Face model folder (it has no config.json); give its "
        f"checkpoint, {run / 'best.pt'}\n")
    assert not os.path.exists(tmp_path / "o")  # a refused run leaves no folder behind


def test_a_reference_that_does_not_fit_is_found_before_the_losses(tmp_path):
    entries = [{**e, "chosen": f"Sure: {e['output']}", "rejected": "No."} for e in make_entries()]
    data = write_data(tmp_path, entries)
    ckpt = save_ckpt(tmp_path / "dpo" / "best.pt", tiny_model(), data=data)
    short = save_ckpt(tmp_path / "sft" / "best.pt", tiny_model(context_length=64), data=data)
    result = eval_py("--ckpt", ckpt, "--reference", short, "--max-new-tokens", 2, "--device", "cpu")
    assert result.returncode == 1 and "test loss" not in result.stdout + result.stderr
    assert result.stderr == (f"error: --reference {short} has a context of 64 tokens, shorter than the 128 of the "
                             "model evaluated; give the model DPO started from\n")
    result = eval_py("--ckpt", ckpt, "--reference", tmp_path / "nope.pt", "--max-new-tokens", 2, "--device", "cpu")
    assert result.returncode == 1
    assert result.stderr == f"error: --reference: checkpoint {tmp_path / 'nope.pt'} does not exist\n"
    qwen = load_tokenizer(write_folder(tmp_path / "qwen3", "qwen3", tokenizer_json("qwen3")))
    other = save_ckpt(tmp_path / "qwen" / "best.pt", tiny_model(), data=data, tokenizer=qwen.state())
    result = eval_py("--ckpt", ckpt, "--reference", other, "--max-new-tokens", 2, "--device", "cpu")
    assert result.returncode == 1 and "test loss" not in result.stdout + result.stderr
    assert result.stderr == (f"error: --reference {other} has another tokenizer ({qwen.name}'s) than the model "
                             "evaluated (GPT-2's), so their log-probabilities are not of the same tokens; give the "
                             "model DPO started from\n")
    assert sorted(os.listdir(tmp_path / "dpo")) == [".lock", "best.pt"]  # nothing written


def test_an_interrupted_run_leaves_no_half_written_json(tmp_path, monkeypatch):
    (tmp_path / "eval.json").write_text('{"old": true}\n')

    def dump_half_then_interrupt(obj, f, **kwargs):
        f.write('{"half": ')
        raise KeyboardInterrupt

    monkeypatch.setattr(json, "dump", dump_half_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        ev.write_json({"new": True}, str(tmp_path / "eval.json"))
    assert (tmp_path / "eval.json").read_text() == '{"old": true}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["eval.json"]  # no temporary file left behind

    monkeypatch.undo()
    ckpt = save_ckpt(tmp_path / "run" / "ckpt.pt", tiny_model(), data=write_data(tmp_path, make_entries()))
    monkeypatch.setattr(ev, "generate_responses", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(SystemExit) as stopped:  # Ctrl-C before the first batch is done: the files say so
        ev.main(["--ckpt", ckpt, "--device", "cpu"])
    assert stopped.value.code == 130
    assert sorted(os.listdir(tmp_path / "run")) == [".lock", "ckpt.pt", "eval.json", "test-responses.json"]
    assert read_json(tmp_path / "run" / "test-responses.json") == [{**e, "model_response": None}
                                                                  for e in make_entries()[10:16]]
    report = read_json(tmp_path / "run" / "eval.json")
    assert report["n_evaluated"] == 6 and "test_loss" in report and "f1" not in report


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def script(*argv):
    """eval.py in a process of its own, its output unbuffered, as a user runs it."""
    return scripts.Popen([sys.executable, os.path.join(ROOT, "eval.py"), *map(str, argv)], cwd=ROOT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def wait_for(proc, ready, what, timeout=120):
    """Wait until ready() while proc runs; fail saying `what` did not happen."""
    deadline = time.time() + timeout
    while not ready() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None and ready(), f"{what} did not happen while eval.py ran: {proc.communicate()}"


def made(path):
    """How many responses the responses file at path holds so far (0 if it is not there or being replaced)."""
    try:
        return sum(r["model_response"] is not None for r in read_json(path))
    except (OSError, ValueError):
        return 0


# ----------------------------------------------------------------------------- interruptions and earlier results


def test_an_interrupted_eval_continues_to_the_responses_of_an_uninterrupted_one(tmp_path, capsys):
    entries = make_entries(40)  # 12 test entries, in 6 batches of 2
    ckpt = save_ckpt(tmp_path / "run" / "ckpt.pt", tiny_model(seed=3), data=write_data(tmp_path, entries),
                     train_frac=0.5, test_frac=0.3)
    command = ["--ckpt", ckpt, "--batch-size", 2, "--max-new-tokens", 32, "--temperature", 1.0, "--top-k", 50]
    responses = tmp_path / "run" / "test-responses.json"
    proc = script(*command, "--device", "cpu")
    wait_for(proc, lambda: made(responses) >= 2, "a first batch of responses")
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    kept = made(responses)
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr
    assert stdout.splitlines()[-1] == (f"interrupted: {kept} of 12 responses are kept in {responses}; "
                                       "the same command continues from them")
    assert 2 <= kept < 12 and kept % 2 == 0, kept  # whole batches

    report, records = run_eval(*command)
    printed = capsys.readouterr().out
    assert f"continuing the evaluation in {tmp_path / 'run'}: {kept} of 12 responses were made before" in printed
    assert "from the earlier run" in printed  # the losses are not computed again
    whole_report, whole = run_eval(*command, "--out", tmp_path / "whole")
    assert records == whole and all(r["model_response"] is not None for r in records)
    assert {k: v for k, v in report.items() if k != "tokens_per_second"} == \
        {k: v for k, v in whole_report.items() if k != "tokens_per_second"}


def test_force_stopped_by_ctrl_c_is_continued_by_the_same_command(tmp_path):
    """--force replaces another evaluation's results, and only those: stopped, the same command
    (still with --force) continues what it had made, as its message promised."""
    entries = make_entries(40)  # 12 test entries, in 6 batches of 2
    ckpt = save_ckpt(tmp_path / "run" / "ckpt.pt", tiny_model(seed=3), data=write_data(tmp_path, entries),
                     train_frac=0.5, test_frac=0.3)
    run_eval("--ckpt", ckpt, "--limit", 2, "--max-new-tokens", 2)  # another evaluation's results, in the folder
    command = ["--ckpt", ckpt, "--batch-size", 2, "--max-new-tokens", 32, "--temperature", 1.0, "--top-k", 50,
               "--force", "--device", "cpu"]
    responses = tmp_path / "run" / "test-responses.json"

    def made_here():
        try:
            records = read_json(responses)
        except (OSError, ValueError):
            return 0
        return sum(r["model_response"] is not None for r in records) if len(records) == 12 else 0

    proc = script(*command)
    wait_for(proc, lambda: made_here() >= 2, "a first batch of responses")
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    kept = made_here()
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr
    assert f"--force: replacing {responses}, which holds 2 responses of {ckpt} from another evaluation (2 entries, " \
           "not 12 (--limit); --max-new-tokens 2, not 32" in stdout
    assert stdout.splitlines()[-1] == (f"interrupted: {kept} of 12 responses are kept in {responses}; "
                                       "the same command continues from them")
    assert 2 <= kept < 12, kept

    again = eval_py(*command)  # the up-arrow: the same command, --force and all
    assert again.returncode == 0, again.stderr
    assert f"continuing the evaluation in {tmp_path / 'run'}: {kept} of 12 responses were made before" in again.stdout
    assert "--force: replacing" not in again.stdout and "from the earlier run" in again.stdout
    whole = eval_py(*command, "--out", tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr
    assert read_json(responses) == read_json(tmp_path / "whole" / "test-responses.json")


def test_one_run_at_a_time_in_a_folder(tmp_path):
    """Two real eval.py processes into one folder: the second is refused in one sentence naming the
    first, which a kill -9 ends without leaving anything to clean up; train.py's lock is eval.py's too."""
    entries = make_entries(80)  # 40 test entries, a batch each: seconds of losses
    ckpt = save_ckpt(tmp_path / "run" / "ckpt.pt", tiny_model(), data=write_data(tmp_path, entries),
                     train_frac=0.25, test_frac=0.5)
    command = ["--ckpt", ckpt, "--batch-size", 1, "--max-new-tokens", 2, "--device", "cpu"]
    first = script(*command)
    lines = [""]
    try:
        wait_for(first, lambda: lines[-1].startswith("test loss: batch 1/40,") or lines.append(first.stderr.readline()),
                 "a progress line of the test loss")
        os.kill(first.pid, signal.SIGSTOP)  # a stopped process keeps its lock: the first cannot end meanwhile
        second = eval_py(*command, "--limit", 2)
        assert second.returncode == 1 and second.stdout == ""
        assert second.stderr == (f"error: {tmp_path / 'run'} is in use by eval.py (process {first.pid}); wait for it "
                                 "to end, or give another folder\n")
    finally:
        first.kill()  # kill -9: the kernel releases its lock
        first.communicate(timeout=60)
    assert first.returncode == -signal.SIGKILL
    third = eval_py(*command)  # the first's own command: it goes on from whatever the first wrote
    assert third.returncode == 0, third.stderr
    assert read_json(tmp_path / "run" / "eval.json")["n_evaluated"] == 40

    hold = "import sys, common; lock = common.lock_folder(sys.argv[1], 'train.py'); print('locked', flush=True); " \
        "sys.stdin.read()"
    training = subprocess.Popen([sys.executable, "-c", hold, str(tmp_path / "run")], cwd=ROOT, text=True,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert training.stdout.readline() == "locked\n"
        refused = eval_py(*command, "--limit", 2)
    finally:
        training.kill()
        training.communicate(timeout=60)
    assert refused.returncode == 1 and refused.stderr == (
        f"error: {tmp_path / 'run'} is in use by train.py (process {training.pid}); wait for it to end, or give "
        "another folder\n")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_during_the_losses_writes_nothing(tmp_path, signum):
    entries = make_entries(80)  # 40 test entries, a batch each: seconds of losses
    ckpt = save_ckpt(tmp_path / "run" / "ckpt.pt", tiny_model(), data=write_data(tmp_path, entries),
                     train_frac=0.25, test_frac=0.5)
    proc = script("--ckpt", ckpt, "--batch-size", 1, "--max-new-tokens", 2, "--device", "cpu")
    lines = [""]
    wait_for(proc, lambda: lines[-1].startswith("test loss: batch 1/40,") or lines.append(proc.stderr.readline()),
             "a progress line of the test loss")  # plain lines: stderr is not a terminal
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr
    assert stdout.splitlines()[-1] == "interrupted: nothing was written; run the same command again"
    assert sorted(os.listdir(tmp_path / "run")) == [".lock", "ckpt.pt"]  # .lock: the lock eval.py held


def test_a_second_evaluation_does_not_destroy_the_first(tmp_path, capsys):
    entries = make_entries()
    model = tiny_model()
    data = write_data(tmp_path, entries)
    ckpt = save_ckpt(tmp_path / "run" / "ckpt.pt", model, data=data)
    best = save_ckpt(tmp_path / "run" / "best.pt", tiny_model(seed=5), data=data)
    same_weights = save_ckpt(tmp_path / "run" / "copy.pt", model, data=data)
    run_eval("--ckpt", ckpt, "--max-new-tokens", 3)
    responses, report = tmp_path / "run" / "test-responses.json", tmp_path / "run" / "eval.json"
    first = responses.read_text()
    run_eval("--ckpt", same_weights, "--max-new-tokens", 3)  # the same weights elsewhere: the same evaluation
    assert "6 of 6 responses were made before" in capsys.readouterr().out and responses.read_text() == first
    run_eval("--ckpt", ckpt, "--max-new-tokens", 3)
    before = responses.read_text(), report.read_text()
    other_evaluations = [
        (["--ckpt", ckpt, "--limit", 2, "--max-new-tokens", 3], "6 entries, not 2 (--limit)"),
        (["--ckpt", best, "--max-new-tokens", 3], "other weights"),
        (["--ckpt", ckpt, "--max-new-tokens", 4, "--temperature", 0.5],
         "--max-new-tokens 3, not 4; --temperature 0.0, not 0.5"),
        (["--ckpt", ckpt, "--max-new-tokens", 3, "--prompt-style", "phi3"], "prompt style alpaca, not phi3"),
    ]
    for argv, difference in other_evaluations:
        with pytest.raises(ValueError) as refused:
            ev.main([*map(str, argv), "--device", "cpu"])
        assert str(refused.value) == (f"{responses} holds 6 responses of {ckpt} from another evaluation "
                                      f"({difference}); give --out DIR to keep it and write elsewhere, or --force "
                                      "to replace it")
        assert (responses.read_text(), report.read_text()) == before

    quick, _ = run_eval("--ckpt", ckpt, "--limit", 2, "--max-new-tokens", 3, "--out", tmp_path / "quick")
    assert quick["n_evaluated"] == 2 and (responses.read_text(), report.read_text()) == before
    replaced, records = run_eval("--ckpt", best, "--max-new-tokens", 3, "--force")
    assert replaced["weights_sha256"] != json.loads(before[1])["weights_sha256"] and len(records) == 6

    (tmp_path / "elsewhere").mkdir()  # results whose evaluation is not recorded (another tool's, or an older eval.py's)
    (tmp_path / "elsewhere" / "eval.json").write_text('{"judge": {}}')
    with pytest.raises(ValueError, match=f"^{tmp_path / 'elsewhere' / 'eval.json'} holds the results from another "
                                         r"evaluation \(its settings are not recorded\); give --out DIR"):
        ev.main(["--ckpt", ckpt, "--out", str(tmp_path / "elsewhere"), "--device", "cpu"])


def test_raw_text_checkpoints_get_their_validation_loss(tmp_path, capsys):
    text = " ".join(f"Sentence number {i} says that the cat sat on the mat." for i in range(200))
    (tmp_path / "story.txt").write_text(text)
    splits = prepare_data(str(tmp_path / "story.txt"), "none", 64)
    model = tiny_model(context_length=64)
    ckpt = save_ckpt(tmp_path / "run" / "ckpt.pt", model, data=str(tmp_path / "story.txt"), prompt_style="none",
                     data_fingerprint=splits.fingerprint)
    ev.main(["--ckpt", ckpt, "--device", "cpu", "--batch-size", "4"])
    report = read_json(tmp_path / "run" / "eval.json")
    with torch.no_grad():
        by_hand = torch.cat([F.cross_entropy(model(x[None])[0], y, reduction="none") for x, y in splits.val])
    assert report["val_loss"] == pytest.approx(by_hand.mean().item(), abs=1e-5)
    assert report["val_perplexity"] == pytest.approx(math.exp(report["val_loss"]), rel=1e-6)
    assert report["n_val_windows"] == len(splits.val) > 1 and "test_loss" not in report
    assert sorted(os.listdir(tmp_path / "run")) == [".lock", "ckpt.pt", "eval.json"]
    assert f"val loss {report['val_loss']:.4f}" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"story.txt is raw text, with no test entries to respond to: eval.py reports "
                                         r"its validation loss and perplexity only; drop --limit, --max-new-tokens$"):
        ev.main(["--ckpt", ckpt, "--device", "cpu", "--limit", "3", "--max-new-tokens", "5"])


def test_empty_responses_are_warned_about_with_their_cause(capsys):
    records = [{"model_response": "", "raw_response": "\n### Instruction:\nName a color.", "no_end_of_text": False},
               {"model_response": "", "raw_response": "\n\n", "no_end_of_text": True},
               {"model_response": "Blue.", "raw_response": "Blue.", "no_end_of_text": False}]
    ev.report_responses(records, 8, "r.json")
    assert capsys.readouterr().out.splitlines() == [
        "1 response never reached end-of-text: cut at --max-new-tokens 8 or at the end of the context",
        "warning: 2 of 3 responses are empty: 1 emptied by cleaning (the model began a new turn, such as "
        "'### Instruction:', at once); 1 held only whitespace or end-of-text; raw_response in r.json keeps what "
        "the model wrote"]
    ev.report_responses(records[2:] * 5 + records[:1], 8, "r.json")  # one in six is not many
    assert capsys.readouterr().out == ""


# ----------------------------------------------------------------------------- preference data


def test_preference_data_gets_the_test_pairs_dpo_metrics_against_the_reference(tmp_path, capsys):
    from dpo import PreferenceDataset, collate_pairs
    from test_dpo import direct_logprobs

    entries = [{**e, "chosen": f"Sure: {e['output']}", "rejected": f"No. {e['output']}" * (1 + i % 2)}
               for i, e in enumerate(make_entries())]
    data = write_data(tmp_path, entries)
    policy, reference = tiny_model(seed=1), tiny_model(seed=2)
    ckpt = save_ckpt(tmp_path / "dpo" / "best.pt", policy, data=data,
                     args={"dpo": True, "beta": 0.5, "dpo_logprobs": "mean"})
    ref = save_ckpt(tmp_path / "sft" / "best.pt", reference, data=data)
    report, _ = run_eval("--ckpt", ckpt, "--reference", ref, "--max-new-tokens", 2, "--batch-size", 4)
    inputs, targets, _ = collate_pairs(list(PreferenceDataset(entries[10:16])), allowed_max_length=128)
    with torch.no_grad():
        p, r = (direct_logprobs(m, inputs, targets, "mean").view(2, -1).t() for m in (policy, reference))
    rewards = 0.5 * (p - r)
    losses = -F.logsigmoid(rewards[:, 0] - rewards[:, 1])
    pairs = report["pairs"]
    assert (pairs["pairs"], pairs["beta"], pairs["logprobs"]) == (6, 0.5, "mean")
    assert pairs["loss"] == pytest.approx(losses.mean().item(), abs=1e-5)
    assert pairs["reward_margin"] == pytest.approx((rewards[:, 0] - rewards[:, 1]).mean().item(), abs=1e-5)
    assert pairs["reward_accuracy"] == pytest.approx((rewards[:, 0] > rewards[:, 1]).float().mean().item())
    assert pairs["chosen_more_likely"] == pytest.approx((p[:, 0] > p[:, 1]).float().mean().item())
    assert f"against {ref}: DPO loss {pairs['loss']:.4f}" in capsys.readouterr().out

    report, _ = run_eval("--ckpt", ref, "--out", tmp_path / "base", "--max-new-tokens", 2)  # no reference
    assert set(report["pairs"]) == {"pairs", "logprobs", "chosen_more_likely"} and report["pairs"]["logprobs"] == "sum"
    plain = save_ckpt(tmp_path / "plain" / "best.pt", policy, data=write_data(tmp_path, make_entries(), "plain.json"))
    assert "pairs" not in run_eval("--ckpt", plain, "--max-new-tokens", 2)[0]
    with pytest.raises(ValueError, match="entry 0 has no 'chosen' response; preference data"):
        run_eval("--ckpt", plain, "--reference", ref, "--max-new-tokens", 2)


# ----------------------------------------------------------------------------- choices (classification)

TOPICS = ["World", "Sports", "Business", "Sci/Tech"]


def topic_entries(n=20):
    """News-like entries whose outputs are the four AG News topics."""
    return [{"instruction": "Predict the category (World, Sports, Business, Sci/Tech) of the text.",
             "input": f"Headline number {i}" + " with more words" * (i % 4), "output": TOPICS[i * 7 % 4]}
            for i in range(n)]


def test_choice_scores_on_a_hand_checked_case():
    refs, preds = ["A", "A", "B", "C", "X"], ["A", "B", "B", "C", "A"]  # X is none of the choices
    scores = ev.choice_scores(refs, preds, ["A", "B", "C", "D"])
    # rows: the reference (then "not a choice"), columns: the prediction
    assert scores["confusion_matrix"] == {"rows": ["A", "B", "C", "D", ev.NOT_A_CHOICE], "columns": ["A", "B", "C", "D"],
                                          "counts": [[1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0],
                                                     [1, 0, 0, 0]]}
    assert sum(map(sum, scores["confusion_matrix"]["counts"])) == len(refs)
    assert scores["accuracy"] == 3 / 5
    # A: 1 of 2 predictions right, 1 of 2 references found; B: 1 of 2, 1 of 1; C: 1 of 1, 1 of 1; D never seen
    assert scores["labels"] == {"A": {"precision": 0.5, "recall": 0.5, "f1": 0.5, "count": 2},
                                "B": {"precision": 0.5, "recall": 1.0, "f1": pytest.approx(2 / 3), "count": 1},
                                "C": {"precision": 1.0, "recall": 1.0, "f1": 1.0, "count": 1},
                                "D": {"precision": 0.0, "recall": 0.0, "f1": 0.0, "count": 0}}
    assert scores["macro_f1"] == pytest.approx((0.5 + 2 / 3 + 1) / 3)  # D is neither a reference nor a prediction
    # the prediction: the highest log-probability, or per character with norm
    logprobs = {"Sports": -3.0, "Sci/Tech": -3.6}
    assert ev.best_choice(logprobs, ["Sports", "Sci/Tech"], norm=False) == "Sports"  # -3 > -3.6
    assert ev.best_choice(logprobs, ["Sports", "Sci/Tech"], norm=True) == "Sci/Tech"  # -3 / 6 < -3.6 / 8


def test_choices_end_to_end_equal_a_plain_forward_pass(tmp_path, capsys):
    from test_generate import plain_choice_logprob
    entries = topic_entries()
    model = tiny_model(seed=4)
    ckpt = save_ckpt(tmp_path / "ckpt.pt", model, data=write_data(tmp_path, entries))
    report, records = run_eval("--ckpt", ckpt, "--choices", ",".join(TOPICS), "--batch-size", 4, "--out",
                               tmp_path / "o")
    for entry, record in zip(entries[10:16], records):
        prompt = encode(format_prompt(entry))
        expected = {topic: plain_choice_logprob(model, prompt, encode(topic)) for topic in TOPICS}
        assert record["choice_logprobs"] == pytest.approx(expected, abs=1e-4)
        assert record["model_response"] == max(TOPICS, key=expected.get)
        assert {k: record[k] for k in entry} == entry
    predictions = [r["model_response"] for r in records]
    assert len(set(predictions)) > 1  # the seed gives varied predictions, so the scores below mean something
    references = [e["output"] for e in entries[10:16]]
    assert report["choice_scores"] == ev.choice_scores(references, predictions, TOPICS)
    assert report["choice_scores"]["accuracy"] == report["exact_match"] == \
        sum(p == r for p, r in zip(predictions, references)) / 6
    assert sum(map(sum, report["choice_scores"]["confusion_matrix"]["counts"])) == 6
    assert report["generation"]["choices"] == "World,Sports,Business,Sci/Tech" and "test_loss" in report
    assert "choices: World, Sports, Business, Sci/Tech, ranked by log-probability\n" in capsys.readouterr().out

    # per character: every choice divided by its length
    _, normed = run_eval("--ckpt", ckpt, "--choices", ",".join(TOPICS), "--choice-norm", "--out", tmp_path / "n")
    assert [r["model_response"] for r in normed] == \
        [max(TOPICS, key=lambda t: r["choice_logprobs"][t] / len(t)) for r in records]
    # auto: the training split's labels, in the order they first appear
    auto, _ = run_eval("--ckpt", ckpt, "--choices", "auto", "--out", tmp_path / "a")
    assert auto["generation"]["choices"] == ",".join(dict.fromkeys(e["output"] for e in entries[:10]))


def test_a_choices_run_continues_and_is_told_from_other_evaluations(tmp_path, capsys, monkeypatch):
    entries = topic_entries(40)  # 12 test entries
    ckpt = save_ckpt(tmp_path / "run" / "ckpt.pt", tiny_model(seed=4), data=write_data(tmp_path, entries),
                     train_frac=0.5, test_frac=0.3)
    command = ["--ckpt", ckpt, "--choices", ",".join(TOPICS), "--batch-size", 4]
    whole_report, whole = run_eval(*command, "--out", tmp_path / "whole")

    real, calls = ev.choice_logprobs, []

    def stop_at_the_second_batch(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(ev, "choice_logprobs", stop_at_the_second_batch)
    with pytest.raises(SystemExit) as stopped:
        ev.main([*map(str, command), "--device", "cpu"])
    responses = tmp_path / "run" / "test-responses.json"
    assert stopped.value.code == 130 and made(responses) == 4
    assert capsys.readouterr().out.splitlines()[-1] == (f"interrupted: 4 of 12 responses are kept in {responses}; "
                                                        "the same command continues from them")
    monkeypatch.undo()
    report, records = run_eval(*command)
    assert "4 of 12 responses were made before" in capsys.readouterr().out
    assert records == whole
    assert {k: v for k, v in report.items() if k != "entries_per_second"} == \
        {k: v for k, v in whole_report.items() if k != "entries_per_second"}

    before = responses.read_text()
    for argv, difference in [([], "--choices World,Sports,Business,Sci/Tech, not None"),
                             (["--choices", "World,Sports"], "--choices World,Sports,Business,Sci/Tech, not World,Sports"),
                             (["--choices", ",".join(TOPICS), "--choice-norm"], "--choice-norm False, not True")]:
        with pytest.raises(ValueError) as refused:
            ev.main(["--ckpt", ckpt, "--batch-size", "4", *argv, "--device", "cpu"])
        assert f"holds 12 responses of {ckpt} from another evaluation ({difference}); give --out" in str(refused.value)
        assert responses.read_text() == before


@pytest.mark.parametrize("choices, message", [
    ("World,,Sports", "argument --choices: answer 2 of 'World,,Sports' is empty; give the answers separated by "
                      "commas, e.g. World,Sports,Business,Sci/Tech"),
    ("World,Sports, World", "argument --choices: 'World' is given 2 times in 'World,Sports, World'; give each "
                            "answer once"),
    ("World", "argument --choices: 'World' is one answer; give at least two to choose among"),
])
def test_bad_choices_are_one_sentence(choices, message, capsys):
    with pytest.raises(SystemExit) as stopped:
        ev.main(["--ckpt", "x.pt", "--choices", choices])
    assert stopped.value.code == 2 and capsys.readouterr().err.splitlines()[-1].endswith(f": error: {message}")


def test_choice_flag_mistakes_are_one_sentence(tmp_path):
    ckpt = save_ckpt(tmp_path / "ckpt.pt", tiny_model(), data=write_data(tmp_path, make_entries()))
    with pytest.raises(ValueError, match=r"^--choices auto: the training split's outputs are not labels \(10 distinct "
                                         r"outputs; labels are at most 20 distinct values of 1 to 3 words, some "
                                         r"repeated\); give the answers with --choices A,B,C$"):
        ev.main(["--ckpt", ckpt, "--choices", "auto", "--device", "cpu"])
    with pytest.raises(ValueError, match="^--choices scores fixed answers and generates nothing: drop "
                                         "--max-new-tokens, --temperature$"):
        ev.main(["--ckpt", ckpt, "--choices", "a,b", "--max-new-tokens", "5", "--temperature", "1"])
    with pytest.raises(ValueError, match="^--choice-norm goes with --choices$"):
        ev.main(["--ckpt", ckpt, "--choice-norm"])
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "ckpt.pt", "data.json"]  # no results


def test_references_that_are_none_of_the_choices_are_counted_in_one_sentence(tmp_path, capsys):
    entries = topic_entries()
    entries[12]["output"] = "Weather"
    ckpt = save_ckpt(tmp_path / "run" / "ckpt.pt", tiny_model(seed=4), data=write_data(tmp_path, entries))
    result = eval_py("--ckpt", ckpt, "--choices", ",".join(TOPICS), "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "\nwarning: 1 test output of 6 is none of the choices (such as 'Weather') and counts as wrong\n" in \
        result.stdout
    assert read_json(tmp_path / "run" / "eval.json")["choice_scores"]["confusion_matrix"]["rows"][-1] == \
        ev.NOT_A_CHOICE
    entries[14]["output"] = "Health"
    report, _ = run_eval("--ckpt", ckpt, "--data", write_data(tmp_path, entries, "two.json"), "--choices",
                         ",".join(TOPICS), "--out", tmp_path / "two")
    assert "\nwarning: 2 test outputs of 6 are none of the choices (such as 'Weather') and count as wrong\n" in \
        capsys.readouterr().out
    assert sum(report["choice_scores"]["confusion_matrix"]["counts"][-1]) == 2


def test_split_overrides_the_checkpoints_fractions(tmp_path, capsys):
    entries = make_entries()
    ckpt = save_ckpt(tmp_path / "ckpt.pt", tiny_model(), data=write_data(tmp_path, entries))  # 0.5, 0.3
    report, records = run_eval("--ckpt", ckpt, "--split", "0.6,0.25", "--max-new-tokens", 1, "--out", tmp_path / "o")
    assert [{k: r[k] for k in e} for e, r in zip(entries[12:17], records)] == entries[12:17] and len(records) == 5
    assert report["n_test_entries"] == 5
    assert ("warning: the checkpoint was trained on the split 0.5,0.3; the test entries of --split 0.6,0.25 may "
            "include entries it was trained on") in capsys.readouterr().out


def test_a_short_fine_tune_classifies_clearly_above_chance(tmp_path):
    """A tiny model trained for 50 steps on a synthetic set whose label is a word of the input
    (a color among filler words, a word a line) picks the right color far above chance (1/4)."""
    colors, filler = ["red", "green", "blue", "yellow"], "cat dog car tree house road sky big small old".split()
    rng = torch.Generator().manual_seed(0)

    def pick(words):
        return words[torch.randint(len(words), (1,), generator=rng).item()]

    entries = []
    for _ in range(500):
        words, color = [pick(filler), pick(filler)], pick(colors)
        words.insert(torch.randint(3, (1,), generator=rng).item(), color)
        entries.append({"instruction": "Which color is named?", "input": "\n".join(words), "output": color})
    splits = prepare_data(write_data(tmp_path, entries), "none", 128, mask_instructions=True, train_frac=0.8,
                          test_frac=0.1)  # 400 train, 50 test
    model = tiny_model().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for epoch in range(2):
        for batch in batch_indices(splits.train.lengths, 16, shuffle=True, epoch=epoch, drop_last=True):
            inputs, targets = splits.collate_fn([splits.train[i] for i in batch])
            loss = model(inputs, targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    ckpt = save_ckpt(tmp_path / "run" / "ckpt.pt", model.eval(), data=splits.path, prompt_style="none",
                     mask_instructions=True, train_frac=0.8, test_frac=0.1)
    report, records = run_eval("--ckpt", ckpt, "--choices", "auto")
    assert report["generation"]["choices"].split(",") == sorted(colors, key=[e["output"] for e in entries].index)
    assert len(records) == 50 and report["choice_scores"]["accuracy"] >= 0.8, report["choice_scores"]
