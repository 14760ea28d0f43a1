"""DPO: the loss against its definition and the book's code, the reference pass, and train.py --dpo
on the tiny model (random weights) with small preference data made here."""
import json
import math
import os
import re

import pytest
import torch
import torch.nn.functional as F

from checkpoint import load_checkpoint
from common import write_json
from data import prepare_data
from prompts import EOT_ID
from data import PreferenceDataset, check_preference_entries, collate_pairs, preference_splits
from dpo import DPO, dpo_metrics, reference_logprobs
from common import IGNORE_INDEX
from model import config_for, GPT
from test_train import (LORA, TINY, WORDS, base_folder, losses, metrics, run, run_cli, script,  # noqa: F401
                        assert_same_weights, stop_with_ctrl_c)


def make_pairs(folder, n=48, name="pairs.json"):
    """n preference entries (40 train, 4 test, 4 validation): a polite chosen and a rude rejected
    response; entry 5's pair carries no preference (chosen equals rejected)."""
    entries = []
    for i in range(n):
        word = WORDS[i % len(WORDS)]
        answer = word[::-1]
        entries.append({"instruction": "Spell the word backwards.", "input": word, "output": answer,
                        "chosen": f"Sure, it is {answer}.", "rejected": f"Ugh. {answer}, obviously."})
    entries[5]["rejected"] = entries[5]["chosen"]
    path = os.path.join(folder, name)
    write_json(entries, path)
    return path


@pytest.fixture
def pairs(tmp_path):
    return make_pairs(tmp_path)


def small_batch(folder, n=3):
    with open(make_pairs(folder, n=8)) as f:
        entries = json.load(f)[:n]
    entries[1]["input"] = "a much longer input, so that the rows of the batch get padding " * 2
    return PreferenceDataset(entries)


def tiny(seed):
    torch.manual_seed(seed)
    return GPT(config_for("tiny", context_length=128)).eval()


# ----------------------------------------------------------------------------- the loss


def direct_logprobs(model, inputs, targets, mode):
    """log p of each row's counted targets, from the full logits, one position at a time."""
    logprobs = F.log_softmax(model(inputs), dim=-1)
    rows = []
    for row in range(len(inputs)):
        kept = [logprobs[row, t, targets[row, t]] for t in range(targets.size(1)) if targets[row, t] != IGNORE_INDEX]
        rows.append(sum(kept) / (len(kept) if mode == "mean" else 1))
    return torch.stack(rows)


@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_the_loss_is_the_papers_equation_on_a_small_batch(mode, tmp_path):
    policy, reference, beta = tiny(1), tiny(2), 0.5
    dataset = small_batch(tmp_path)
    collate_fn = lambda batch: collate_pairs(batch, allowed_max_length=128)  # noqa: E731
    dataset.reference = reference_logprobs(reference, dataset, collate_fn, 2, "cpu", mode)
    inputs, targets, ref = batch = collate_fn([dataset[i] for i in range(3)])
    assert inputs.shape[0] == 6 and ref.shape == (3, 2)
    # each sequence: the prompt masked, the response and its end-of-text counted
    assert [(t != IGNORE_INDEX).sum().item() for t in targets[:3]] == \
        [n - p + 1 for n, p in zip(dataset.chosen.lengths, dataset.prompt_lengths)]
    with torch.no_grad():
        p = direct_logprobs(policy, inputs, targets, mode)
        r = direct_logprobs(reference, inputs, targets, mode)
        losses, rewards = DPO(beta, mode).pair_losses(policy, batch)
    assert torch.allclose(ref, torch.stack([r[:3], r[3:]], 1), atol=1e-4)
    expected = [-math.log(1 / (1 + math.exp(-beta * ((p[i] - r[i]) - (p[i + 3] - r[i + 3])).item()))) for i in range(3)]
    assert losses.tolist() == pytest.approx(expected, abs=1e-5)
    expected_rewards = [beta * (p[i + j] - r[i + j]).item() for i in range(3) for j in (0, 3)]
    assert rewards.flatten().tolist() == pytest.approx(expected_rewards, abs=1e-5)
    assert len(set(losses.tolist())) == 3 and all(loss != pytest.approx(math.log(2), abs=1e-3) for loss in losses)


# The book's functions (ch07/04 dpo-from-scratch), re-implemented as they are written there.
def book_compute_logprobs(logits, labels, selection_mask):
    labels, logits = labels[:, 1:].clone(), logits[:, :-1, :]
    selected = torch.gather(F.log_softmax(logits, dim=-1), -1, labels.unsqueeze(-1)).squeeze(-1)
    mask = selection_mask[:, 1:].clone()
    return (selected * mask).sum(-1) / mask.sum(-1)


def book_compute_dpo_loss(model_chosen, model_rejected, reference_chosen, reference_rejected, beta):
    logits = (model_chosen - model_rejected) - (reference_chosen - reference_rejected)
    losses = -F.logsigmoid(beta * logits)
    return losses.mean(), (model_chosen - reference_chosen).mean(), (model_rejected - reference_rejected).mean()


def test_mean_logprobs_give_the_books_loss_on_the_same_batch(tmp_path):
    """The book's code on our batch: each sequence whole (inputs and the last target), its
    selection mask the targets we count. (The book's own collate selects the "### Response:"
    header and not the end-of-text: another batch, see README.)"""
    policy, reference, beta = tiny(1), tiny(2), 0.1
    dataset = small_batch(tmp_path)
    collate_fn = lambda batch: collate_pairs(batch, allowed_max_length=128)  # noqa: E731
    dataset.reference = reference_logprobs(reference, dataset, collate_fn, 3, "cpu", "mean")
    inputs, targets, _ = batch = collate_fn([dataset[i] for i in range(3)])
    sequences = torch.cat([inputs, torch.full_like(inputs[:, :1], EOT_ID)], 1)  # the padded sequences whole
    mask = torch.cat([torch.zeros_like(inputs[:, :1], dtype=torch.bool), targets != IGNORE_INDEX], 1)
    with torch.no_grad():
        book = [book_compute_logprobs(model(sequences), sequences, mask) for model in (policy, reference)]
        loss, chosen_reward, rejected_reward = book_compute_dpo_loss(book[0][:3], book[0][3:], book[1][:3],
                                                                     book[1][3:], beta)
        losses, rewards = DPO(beta, "mean").pair_losses(policy, batch)
    assert losses.mean().item() == pytest.approx(loss.item(), abs=1e-6)
    # the book's rewards are the log-ratios, without beta
    assert rewards.mean(0).tolist() == pytest.approx([beta * chosen_reward.item(), beta * rejected_reward.item()],
                                                     abs=1e-6)


def test_before_any_step_the_loss_is_log_2_and_the_rewards_0(tmp_path):
    model = tiny(3)
    dataset = small_batch(tmp_path, n=5)
    collate_fn = lambda batch: collate_pairs(batch, allowed_max_length=128)  # noqa: E731
    dataset.reference = reference_logprobs(model, dataset, collate_fn, 2, "cpu")  # batched otherwise
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, collate_fn=collate_fn)
    values, n = dpo_metrics(model, loader, "cpu", DPO(0.1, "sum"))
    assert n == 5 and values["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert values["chosen_reward"] == pytest.approx(0, abs=1e-6)
    assert values["reward_margin"] == pytest.approx(0, abs=1e-6)
    assert values["reward_accuracy"] == 0.0  # no chosen reward is (strictly) the higher


# ----------------------------------------------------------------------------- train.py --dpo


DPO_RUN = [*TINY, "--dpo", "--lr", "1e-3", "--eval-every", 4]


def test_dpo_training_raises_the_reward_accuracy_and_logs_the_rewards(pairs, tmp_path, capsys):
    out = tmp_path / "dpo"
    run(*DPO_RUN, "--data", pairs, "--out", out, "--max-steps", 9)
    printed = capsys.readouterr().out
    assert "preference pairs: 1 with chosen equal to rejected (no preference; kept, so the split stays)" in printed
    assert "reference log-probs of 40 train and 4 validation pairs, computed once" in printed
    rows = metrics(out)
    assert [m["step"] for m in rows] == [1, 5, 9]
    assert {"train_chosen_reward", "train_rejected_reward", "train_reward_margin", "train_reward_accuracy",
            "val_chosen_reward", "val_rejected_reward", "val_reward_margin", "val_reward_accuracy"} <= set(rows[0])
    last = rows[-1]
    assert last["train_reward_accuracy"] > 0.5 and last["train_reward_margin"] > rows[0]["train_reward_margin"] > 0
    assert last["train_loss"] < rows[0]["train_loss"] < math.log(2)
    assert last["train_reward_margin"] == pytest.approx(last["train_chosen_reward"] - last["train_rejected_reward"])
    assert "| reward margin " in printed and "accuracy " in printed
    ckpt = load_checkpoint(out / "ckpt.pt")
    assert ckpt["dpo_reference"]["train"].shape == (40, 2) and ckpt["dpo_reference"]["val"].shape == (4, 2)
    assert ckpt["args"]["lr"] == 1e-3 and ckpt["args"]["weight_decay"] == 0.01 and ckpt["args"]["epochs"] == 1
    assert ckpt["args"]["beta"] == 0.1 and ckpt["args"]["dpo_logprobs"] == "sum" and ckpt["mask_instructions"]


def test_dpo_starts_from_a_checkpoint_file_with_its_style_and_context(pairs, tmp_path, capsys):
    run("--model", "tiny", "--init", "random", "--context-length", 96, "--batch-size", 2, "--eval-batches", 1,
        "--prompt-style", "phi3", "--data", pairs, "--out", tmp_path / "sft", "--max-steps", 2)
    capsys.readouterr()
    run("--dpo", "--model", tmp_path / "sft" / "best.pt", "--batch-size", 2, "--eval-batches", 1,
        "--data", pairs, "--out", tmp_path / "dpo", "--max-steps", 1, "--dpo-logprobs", "mean")
    printed = capsys.readouterr().out
    assert "prompt style phi3" in printed and "context 96" in printed
    sft, dpo = load_checkpoint(tmp_path / "sft" / "best.pt"), load_checkpoint(tmp_path / "dpo" / "ckpt.pt")
    assert dpo["prompt_style"] == "phi3" and dpo["context_length"] == 96
    # the reference is the starting model: its own log-probs before the first step
    start = GPT(config_for("tiny", context_length=96))
    start.load_state_dict(sft["model"])
    dataset = preference_splits(prepare_data(str(pairs), "phi3", 96, True), 96)
    expected = reference_logprobs(start, dataset.train, dataset.collate_fn, 2, "cpu", "mean")
    assert torch.allclose(dpo["dpo_reference"]["train"], expected, atol=1e-5)


def test_dpo_resume_equals_an_uninterrupted_run(pairs, tmp_path):
    common = [*DPO_RUN, "--data", pairs, "--dropout", "0.1", "--group-by-length", "--grad-accum", 2]
    run(*common, "--out", tmp_path / "full", "--max-steps", 9)  # 10 steps in the one epoch
    run(*common, "--out", tmp_path / "part", "--max-steps", 5)
    assert load_checkpoint(tmp_path / "part" / "ckpt.pt")["batch_in_epoch"] == 10
    run("--resume", "--out", tmp_path / "part", "--max-steps", 9)
    assert [m["step"] for m in metrics(tmp_path / "full")] == [1, 5, 9]
    assert losses(tmp_path / "part") == losses(tmp_path / "full")
    assert [m["train_reward_margin"] for m in metrics(tmp_path / "part")] == \
        [m["train_reward_margin"] for m in metrics(tmp_path / "full")]
    assert_same_weights(tmp_path / "part", tmp_path / "full")


def test_dpo_distributed_matches_one_process_with_the_global_batch(pairs, tmp_path):
    common = [*DPO_RUN, "--data", pairs, "--max-steps", 4, "--eval-every", 2, "--device", "cpu"]
    proc = script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *common,
                  "--batch-size", 2, "--out", tmp_path / "ddp")
    run(*common, "--batch-size", 4, "--out", tmp_path / "single")
    stdout, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 0, stderr
    for (step_a, *a), (step_b, *b) in zip(losses(tmp_path / "ddp"), losses(tmp_path / "single"), strict=True):
        assert step_a == step_b and a == pytest.approx(b, rel=1e-5)
    ddp, single = (load_checkpoint(tmp_path / out / "ckpt.pt")["dpo_reference"]["train"] for out in ("ddp", "single"))
    assert torch.allclose(ddp, single, atol=1e-5)
    assert_same_weights(tmp_path / "ddp", tmp_path / "single", exact=False)


def test_lora_dpo_changes_only_the_adapters(pairs, base_folder, tmp_path):  # noqa: F811
    run("--model", base_folder, *LORA, "--dpo", "--data", pairs, "--out", tmp_path / "lora", "--max-steps", 3)
    ckpt = load_checkpoint(tmp_path / "lora" / "ckpt.pt")
    assert set(ckpt["model"]) == {f"h.{i}.{path}.lora_{m}" for i in range(2)
                                  for path in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj") for m in "AB"}
    assert any(ckpt["model"][f"h.{i}.attn.c_attn.lora_B"].abs().sum() > 0 for i in range(2))
    assert metrics(tmp_path / "lora")[-1]["train_reward_margin"] != 0


def test_bad_preference_data_is_one_sentence(pairs, tmp_path, capsys):
    def error(*argv):
        with pytest.raises(SystemExit) as stopped:
            run_cli(*DPO_RUN, "--out", tmp_path / "out", *argv)
        return stopped.value.code

    with open(pairs) as f:
        entries = json.load(f)
    for i, change, problem in ((3, {"rejected": None}, "has a null, not a string, as 'rejected' response"),
                               (7, {"chosen": "  "}, "has an empty 'chosen' response"),
                               (44, {"chosen": 3}, "has a int, not a string, as 'chosen' response")):
        bad = tmp_path / f"bad{i}.json"
        bad.write_text(json.dumps([{**e, **change} if j == i else e for j, e in enumerate(entries)]))
        assert error("--data", bad) == (f"error: {bad}: entry {i} {problem}; preference data (--dpo) needs a "
                                        "non-empty 'chosen' and 'rejected' in every entry")
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps([{k: e[k] for k in ("instruction", "input", "output")} for e in entries]))
    assert error("--data", plain) == (f"error: {plain}: entry 0 has no 'chosen' response; preference data (--dpo) "
                                      "needs a non-empty 'chosen' and 'rejected' in every entry")
    text = tmp_path / "story.txt"
    text.write_text(" ".join(WORDS * 200))
    assert error("--data", text).startswith(f"error: {text} is raw text; --dpo needs preference data")
    assert not os.path.exists(tmp_path / "out" / "ckpt.pt")
    with pytest.raises(SystemExit) as stopped:
        run(*TINY, "--beta", "0.2", "--data", pairs, "--out", tmp_path / "out")
    assert stopped.value.code == 2 and "--beta goes with --dpo" in capsys.readouterr().err


def test_preference_entries_may_lack_output_and_sft_trains_on_chosen(tmp_path):
    entries = [{"instruction": "Say hi.", "chosen": "Hello!", "rejected": "What."}]
    check_preference_entries("x.json", entries)
    path = tmp_path / "no-output.json"
    path.write_text(json.dumps(entries * 20))
    splits = prepare_data(str(path), "alpaca", 64)
    assert splits.train_entries[0]["output"] == "Hello!"


def test_a_nan_dpo_loss_stops_the_run_as_for_fine_tuning(pairs, tmp_path, monkeypatch):
    forward, training_calls = GPT.forward, []

    def forward_going_nan(self, idx, targets=None, reduction="mean"):
        out = forward(self, idx, targets, reduction)
        if self.training and reduction == "none":
            training_calls.append(1)
            if len(training_calls) == 3:
                return out * float("nan")
        return out

    monkeypatch.setattr(GPT, "forward", forward_going_nan)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stopped:
        run_cli(*DPO_RUN, "--data", pairs, "--out", out, "--max-steps", 6, "--save-every", 2)
    assert stopped.value.code == (f"error: the training loss became nan at step 3; stopped, {out / 'ckpt.pt'} holds "
                                  "the last good state, from step 2; try a lower --lr, or --grad-clip 1")
    ckpt = load_checkpoint(out / "ckpt.pt")
    assert ckpt["step"] == 2 and torch.isfinite(ckpt["dpo_reference"]["train"]).all()


def test_ctrl_c_keeps_the_dpo_run_and_its_reference(pairs, tmp_path):
    common = [*DPO_RUN, "--data", pairs, "--eval-every", 1, "--save-every", 2, "--epochs", 1000]
    out = tmp_path / "stopped"
    stopped_at = stop_with_ctrl_c(common, out, timeout=90)
    assert torch.isfinite(load_checkpoint(out / "ckpt.pt")["dpo_reference"]["train"]).all()
    run("--resume", "--out", out, "--max-steps", stopped_at + 2)
    run(*common, "--out", tmp_path / "full", "--max-steps", stopped_at + 2)
    assert losses(out) == losses(tmp_path / "full")
    assert_same_weights(out, tmp_path / "full")


def test_help_shows_the_dpo_defaults(capsys):
    with pytest.raises(SystemExit):
        run("--help")
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("AdamW learning rate; 5e-6 under --dpo (default: 5e-05)", "0.01 under --dpo (default: 0.1)",
                  "1 under --dpo (default: 2)", "(default: sum)", "--beta BETA"):
        assert shown in text


def test_a_resumed_dpo_run_keeps_its_one_epoch_and_its_reference_pass_shows_progress(pairs, tmp_path):
    out = tmp_path / "dpo"
    proc = script("train.py", *DPO_RUN, "--batch-size", 8, "--data", pairs, "--out", out, "--max-steps", 2)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    # 40 train pairs in 5 batches of 8, 4 validation pairs in 1: a line at once, then the last (in a log)
    assert re.search(r"^reference log-probs of the train pairs, batch 1/5, \d+s left\n"
                     r"(.*\n)*reference log-probs of the train pairs, batch 5/5, 0s left\n"
                     r"reference log-probs of the validation pairs, batch 1/1, 0s left\n", stderr, re.M), stderr
    # --max-steps without --epochs: DPO's one epoch (5 steps) still ends the run, and the run says so
    proc = script("train.py", "--resume", "--out", out, "--max-steps", 8)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert ("changed since the checkpoint: --max-steps 8 (was 2)\n"
            "model tiny (resumed at step 2): ") in stdout
    assert "5 optimizer steps (5 per epoch)\n--epochs 1 ends the run at step 5, before --max-steps 8\n" in stdout
    assert load_checkpoint(out / "ckpt.pt")["step"] == 5
