"""Tests of eval.py on small data and random tiny checkpoints made here (no ../shared, no train.py)."""
import json
import math
import os
import subprocess
import sys
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

import eval as ev
from checkpoint import save_checkpoint
from data import EOT_ID, InstructionDataset, collate, decode, encode, format_prompt, prepare_data
from model import GPT, IGNORE_INDEX, config_for
from generate import generate, respond

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

    report, _ = run_eval("--ckpt", ckpt, "--batch-size", 4, "--max-new-tokens", 2, "--no-mask-instructions")
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
    second_words = [ids[1] for ids in generate(tiny_model(seed=2), prompts, 2, eos_id=None)]
    model = model_stopping_on(second_words[1], seed=2)  # row 1 stops after one token; rows that never say it run on
    ckpt = save_ckpt(tmp_path / "ckpt.pt", model, data=write_data(tmp_path, entries))
    report, records = run_eval("--ckpt", ckpt, "--batch-size", 4, "--max-new-tokens", 12, "--out", tmp_path / "o")

    alone = [generate(model, [p], 12)[0] for p in prompts]
    assert 0 < sum(len(ids) == 12 for ids in alone) < 6  # some rows stop at end-of-text, some never do
    assert report["no_end_of_text"] == sum(len(ids) == 12 for ids in alone)
    expected = [ev.clean_response(respond(model, [e], "alpaca", 12)[0], "alpaca") for e in entries[10:16]]
    assert [r["model_response"] for r in records] == expected
    assert records == [{**e, "model_response": r} for e, r in zip(entries[10:16], expected)]  # in file order
    assert all(list(r) == ["instruction", "input", "output", "model_response"] for r in records)
    assert (tmp_path / "o" / "test-responses.json").read_text().startswith('[\n    {\n        "instruction": ')
    assert report["n_evaluated"] == 6 and report["truncated_prompts"] == 0 and "labels" not in report
    assert report["generation"] == {"max_new_tokens": 12, "temperature": 0.0, "top_k": None, "top_p": None,
                                    "num_beams": 1, "length_penalty": 1.0, "quantize": None,
                                    "batch_size": 4, "seed": 123}
    assert report["tokens_per_second"] > 0 and 0 <= report["f1"] <= 1 and report["exact_match"] == 0

    # 70 new tokens do not fit after the longest of these prompts (34 to 61 tokens): the rows
    # batched with it still get their whole budget, not just what the longest prompt leaves
    report, records = run_eval("--ckpt", ckpt, "--batch-size", 4, "--max-new-tokens", 70, "--out", tmp_path / "o")
    alone = [generate(model, [p], 70)[0] for p in prompts]
    assert max(map(len, prompts)) == 61 and report["truncated_prompts"] == 0
    assert report["no_end_of_text"] == sum(len(ids) == min(70, 128 - len(p) + 1) for ids, p in zip(alone, prompts))
    assert sorted(map(len, alone)) == [1, 1, 68, 70, 70, 70]  # the longest prompt's row fills the context
    assert [r["model_response"] for r in records] == [ev.clean_response(decode(ids), "alpaca") for ids in alone]


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
    report, records = run_eval("--ckpt", ckpt, "--max-new-tokens", 100, "--batch-size", 3)
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


def test_errors_are_clear(tmp_path, capsys):
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
    (tmp_path / "story.txt").write_text("Once upon a time.")
    with pytest.raises(ValueError, match="story.txt is raw text, which has no test split"):
        ev.main(["--ckpt", no_test, "--data", str(tmp_path / "story.txt")])
    with pytest.raises(ValueError, match="give --out DIR"):
        ev.main(["--model", "gpt2"])
    with pytest.raises(ValueError, match="give exactly one of --ckpt"):
        ev.main([])
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
    moved_report, _ = run_eval("--ckpt", ckpt, "--data", moved, "--limit", 1, "--max-new-tokens", 2)
    assert moved_report["test_loss"] == report["test_loss"] and moved_report["data"] == moved
    changed = write_data(tmp_path, entries[:-1] + [{**entries[-1], "output": "changed"}], "changed.json")
    with pytest.raises(ValueError, match=f"^{changed} is not the data the checkpoint was trained on \\({data}\\)"):
        ev.main(["--ckpt", ckpt, "--data", changed])


def test_an_unwritable_out_fails_before_any_work(tmp_path, monkeypatch):
    data = write_data(tmp_path, make_entries())
    ckpt = save_ckpt(tmp_path / "ckpt.pt", tiny_model(), data=data)
    monkeypatch.setattr(ev, "load_for_inference", lambda *a: pytest.fail("loaded a model before checking --out"))
    (tmp_path / "a-file").write_text("")
    with pytest.raises(NotADirectoryError, match=f"^{tmp_path / 'a-file'} is a file, not a folder to write results in$"):
        ev.main(["--ckpt", ckpt, "--out", str(tmp_path / "a-file")])
    with pytest.raises(OSError, match=f"^cannot write in {tmp_path / 'a-file' / 'under'} \\(Not a directory\\)$"):
        ev.main(["--ckpt", ckpt, "--out", str(tmp_path / "a-file" / "under")])


def test_cli_missing_checkpoint_is_one_line(tmp_path):
    missing = tmp_path / "missing.pt"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), "--ckpt", str(missing)],
                            capture_output=True, text=True, cwd=ROOT, env=os.environ.copy(), timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: checkpoint {missing} does not exist"


def test_an_interrupted_run_leaves_no_half_written_json(tmp_path, monkeypatch):
    (tmp_path / "eval.json").write_text('{"old": true}\n')

    def dump_half_then_interrupt(obj, f, **kwargs):
        f.write('{"half": ')
        raise KeyboardInterrupt

    monkeypatch.setattr(ev.json, "dump", dump_half_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        ev.write_json({"new": True}, str(tmp_path / "eval.json"))
    assert (tmp_path / "eval.json").read_text() == '{"old": true}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["eval.json"]  # no temporary file left behind

    monkeypatch.undo()
    ckpt = save_ckpt(tmp_path / "run" / "ckpt.pt", tiny_model(), data=write_data(tmp_path, make_entries()))
    monkeypatch.setattr(ev, "generate_responses", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        ev.main(["--ckpt", ckpt, "--device", "cpu"])
    assert os.listdir(tmp_path / "run") == ["ckpt.pt"]


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
