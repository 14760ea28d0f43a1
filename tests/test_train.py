"""train.py on the tiny model (random weights, GPT-2 vocabulary) and small data made here.
Runs are in-process (train.main) where that saves the cost of starting Python and torch;
the command-line behaviour (exit codes, Ctrl-C, torchrun) runs in subprocesses."""
import glob
import importlib.util
import io
import json
import shutil
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import save_file

import eval as ev
import train
from checkpoint import load_checkpoint, save_checkpoint
from common import run_main, write_json
from hf import from_pretrained
from model import GPT, PRESETS, GPTConfig, config_for
from export import config_json, hf_state_dict
from checkpoint import load_for_inference
from prompts import today
from step import lr_at
import scripts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model", "tiny", "--init", "random", "--context-length", "64", "--batch-size", "2", "--eval-batches", "2"]
# Loss on the responses only: the output head over GPT-2's vocabulary is most of the tiny
# model's cost, and masking spares it at most positions.
FAST = [*TINY, "--mask-instructions"]
# best.pt: the weights and what generate.py, eval.py and export.py need; ckpt.pt: all a resumed run needs
BEST_KEYS = {"model", "config", "tokenizer", "prompt_style", "mask_instructions", "context_length", "data",
             "data_fingerprint", "train_frac", "test_frac", "args", "step", "best_val_loss", "val_loss"}
CKPT_KEYS = BEST_KEYS | {"optimizer", "scheduler", "epoch", "batch_in_epoch", "rng", "tokens_seen", "elapsed"}
HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
WORDS = "apple river stone cloud green quiet music window bread silver paper garden".split()


def make_data(folder, n=48):
    """n short Alpaca-style entries (n=48: 40 train, 4 test, 4 validation), some with an input."""
    entries = []
    for i in range(n):
        word = WORDS[i % len(WORDS)]
        if i % 3:
            entries.append({"instruction": f"Add {i % 7} and {i % 5}.", "input": "", "output": f"{i % 7 + i % 5}."})
        else:
            entries.append({"instruction": "Spell the word backwards.", "input": word, "output": word[::-1]})
    path = os.path.join(folder, "data.json")
    write_json(entries, path)
    return path


@pytest.fixture
def data(tmp_path):
    return make_data(tmp_path)


def run(*argv):
    """train.main in this process; SystemExit (an error or Ctrl-C) propagates."""
    train.main([str(a) for a in argv])


def run_cli(*argv):
    """train.main as `python train.py`: run_main turns a ValueError or OSError into SystemExit."""
    run_main(lambda: train.main([str(a) for a in argv]))


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(out):
    return [(m["step"], m["train_loss"], m["val_loss"]) for m in metrics(out)]


def assert_same_weights(out_a, out_b, exact=True):
    """The final weights of two runs are equal, or close: then the difference is compared as a
    whole, because Adam turns rounding noise in a gradient that is (nearly) zero, such as that
    of an attention key bias, into a full-size step of either sign at a few single weights.
    Weighting micro-batches by their own mean instead of the global one gives about 1e-2."""
    a, b = load_checkpoint(os.path.join(out_a, "ckpt.pt")), load_checkpoint(os.path.join(out_b, "ckpt.pt"))
    assert a["step"] == b["step"] and a["model"].keys() == b["model"].keys()
    if exact:
        for name, tensor in a["model"].items():
            assert torch.equal(tensor, b["model"][name]), name
    else:
        flat_a, flat_b = (torch.cat([t.flatten() for t in ckpt["model"].values()]) for ckpt in (a, b))
        assert (flat_a - flat_b).norm() < 1e-3 * flat_a.norm()


def script(*argv, **kwargs):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return scripts.Popen([sys.executable, *[str(a) for a in argv]], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


# ----------------------------------------------------------------------------- a run and what it writes


def test_training_lowers_the_loss_and_writes_checkpoints_metrics_and_plot(data, tmp_path, capsys):
    out = tmp_path / "out"
    run(*TINY, "--data", data, "--out", out, "--lr", "1e-3", "--max-steps", 11)
    printed = capsys.readouterr().out
    assert "global batch 2 = batch size 2 x 1 process x grad accum 1; 11 optimizer steps (20 per epoch)" in printed
    assert "epoch 1 step 1/11 | train loss " in printed and "tokens/s" in printed and "left" in printed

    rows = metrics(out)
    assert [m["step"] for m in rows] == [1, 6, 11]  # the chapter's schedule: after step 1, then every 5
    assert set(rows[0]) == {"step", "epoch", "train_loss", "val_loss", "tokens_seen", "lr", "elapsed"}
    assert rows[-1]["val_loss"] < rows[0]["val_loss"] - 0.5 and rows[-1]["train_loss"] < rows[0]["train_loss"] - 0.5
    assert rows[0]["tokens_seen"] < rows[1]["tokens_seen"] < rows[2]["tokens_seen"]

    ckpt, best = load_checkpoint(out / "ckpt.pt"), load_checkpoint(out / "best.pt")
    assert CKPT_KEYS <= set(ckpt) and set(best) == BEST_KEYS | {"world_size"}
    assert ckpt["step"] == best["step"] == 11 and ckpt["val_loss"] == best["best_val_loss"] == rows[-1]["val_loss"]
    assert (ckpt["epoch"], ckpt["batch_in_epoch"], ckpt["context_length"]) == (0, 11, 64)
    assert ckpt["args"]["lr"] == 1e-3 and ckpt["data"] == str(data) and ckpt["prompt_style"] == "alpaca"
    assert ckpt["data_fingerprint"]["entries"] == 48 and len(ckpt["data_fingerprint"]["sha256"]) == 64
    assert torch.load(out / "ckpt.pt", weights_only=True)["rng"]["torch"].dtype == torch.uint8
    # no optimizer state: about a third of ckpt.pt (weights + AdamW's two moments)
    assert os.path.getsize(out / "best.pt") < 0.36 * os.path.getsize(out / "ckpt.pt")
    model, _, style, _ = load_for_inference(str(out / "best.pt"))  # what generate.py and eval.py do
    assert style == "alpaca" and model.config.context_length == 64
    if HAVE_MATPLOTLIB:  # an optional dependency: the plot where it is installed, else a note
        assert os.path.getsize(out / "loss.png") > 0
    else:
        assert not os.path.exists(out / "loss.png") and "matplotlib is not installed" in printed
    assert glob.glob(str(tmp_path / "**" / "*.tmp"), recursive=True) == []


def test_checkpoints_are_saved_every_save_every_steps_and_at_epoch_ends(data, tmp_path, monkeypatch):
    saved = []
    monkeypatch.setattr(train, "save_checkpoint", lambda obj, path: saved.append((os.path.basename(path), obj["step"])))
    # 20 steps an epoch: evaluations at 1, 6, 11, 16, 21, 22; saves at 8, 16, 20 (end of epoch 1) and 22 (the end)
    run(*FAST, "--data", data, "--out", tmp_path / "out", "--max-steps", 22, "--save-every", 8)
    assert [step for name, step in saved if name == "ckpt.pt"] == [8, 16, 20, 22]
    # best.pt goes with a save, holding the step of the best evaluation since the last one
    best_at = [(i, step) for i, (name, step) in enumerate(saved) if name == "best.pt"]
    assert all(saved[i + 1][0] == "ckpt.pt" and step <= saved[i + 1][1] for i, step in best_at)
    assert {step for _, step in best_at} <= {1, 6, 11, 16, 21, 22}


def test_best_checkpoint_keeps_the_lowest_validation_loss(data, tmp_path, monkeypatch):
    scripted = iter([5.0, 5.0, 3.0, 3.0, 4.0, 4.0, 2.5, 2.5, 6.0, 6.0])  # (train, validation) per evaluation
    monkeypatch.setattr(train, "calc_loss_loader", lambda *args: (next(scripted), 1))
    out = tmp_path / "out"
    run(*FAST, "--data", data, "--out", out, "--max-steps", 9, "--eval-every", 2)
    assert [(m["step"], m["val_loss"]) for m in metrics(out)] == [(1, 5.0), (3, 3.0), (5, 4.0), (7, 2.5), (9, 6.0)]
    best, ckpt = load_checkpoint(out / "best.pt"), load_checkpoint(out / "ckpt.pt")
    assert (best["step"], best["val_loss"], best["best_val_loss"]) == (7, 2.5, 2.5) and "optimizer" not in best
    assert (ckpt["step"], ckpt["val_loss"], ckpt["best_val_loss"]) == (9, 6.0, 2.5)
    assert not torch.equal(best["model"]["wte.weight"], ckpt["model"]["wte.weight"])


def test_resume_mid_epoch_gives_the_same_losses_and_weights(data, tmp_path):
    common = [*FAST, "--batch-size", 4, "--data", data, "--lr", "1e-3", "--dropout", "0.1", "--eval-every", 4,
              "--group-by-length"]
    run(*common, "--out", tmp_path / "full", "--max-steps", 13)  # 10 steps per epoch: ends in epoch 2
    run(*common, "--out", tmp_path / "part", "--max-steps", 5)
    assert load_checkpoint(tmp_path / "part" / "ckpt.pt")["batch_in_epoch"] == 5
    with open(tmp_path / "part" / "metrics.jsonl", "a") as f:  # as if it crashed after a line, before its checkpoint
        f.write(json.dumps({**metrics(tmp_path / "part")[-1], "step": 9}) + "\n")
    # Only what may change is given: the rest (data, dropout, grouping...) comes from the checkpoint.
    run("--resume", "--out", tmp_path / "part", "--max-steps", 13)
    assert [m["step"] for m in metrics(tmp_path / "full")] == [1, 5, 9, 13]
    assert losses(tmp_path / "part") == losses(tmp_path / "full")
    tokens_seen = [[m["tokens_seen"] for m in metrics(tmp_path / out)] for out in ("part", "full")]
    assert tokens_seen[0] == tokens_seen[1]
    assert_same_weights(tmp_path / "part", tmp_path / "full")


def test_resume_finds_moved_data_by_its_content_and_refuses_changed_data(data, tmp_path):
    common = [*FAST, "--data", data, "--lr", "1e-3", "--eval-every", 2]
    run(*common, "--out", tmp_path / "full", "--max-steps", 5)
    run(*common, "--out", tmp_path / "part", "--max-steps", 3)
    moved = tmp_path / "elsewhere" / "renamed.json"
    os.makedirs(moved.parent)
    shutil.move(data, moved)
    with pytest.raises(SystemExit) as stopped:
        run_cli("--resume", "--out", tmp_path / "part", "--max-steps", 5)
    assert stopped.value.code == (f"error: this run was trained on {data}, which is not there any more; if it moved, "
                                  "pass its new path with --resume --data PATH")
    with open(moved) as f:
        changed = json.load(f)
    changed[0]["output"] += "!"
    with open(tmp_path / "changed.json", "w") as f:
        json.dump(changed, f)
    with pytest.raises(SystemExit) as stopped:
        run_cli("--resume", "--out", tmp_path / "part", "--max-steps", 5, "--data", tmp_path / "changed.json")
    assert stopped.value.code.startswith(f"error: {tmp_path / 'changed.json'} is not the data the checkpoint was "
                                         f"trained on ({data}): its content differs (sha256 ")
    run("--resume", "--out", tmp_path / "part", "--max-steps", 5, "--data", moved)
    assert losses(tmp_path / "part") == losses(tmp_path / "full")
    assert load_checkpoint(tmp_path / "part" / "ckpt.pt")["data"] == str(moved)  # found there from now on


def test_grad_accum_matches_one_batch_of_the_same_size(data, tmp_path):
    common = [*FAST, "--data", data, "--lr", "1e-3", "--max-steps", 4, "--eval-every", 3]
    run(*common, "--out", tmp_path / "accum", "--batch-size", 2, "--grad-accum", 2, "--eval-batches", 4)
    run(*common, "--out", tmp_path / "big", "--batch-size", 4, "--eval-batches", 2)  # the same examples
    for (step_a, *a), (step_b, *b) in zip(losses(tmp_path / "accum"), losses(tmp_path / "big"), strict=True):
        assert step_a == step_b and a == pytest.approx(b, rel=1e-5)
    assert_same_weights(tmp_path / "accum", tmp_path / "big", exact=False)


def test_distributed_run_matches_one_process_with_the_global_batch(data, tmp_path):
    common = [*FAST, "--data", data, "--lr", "1e-3", "--max-steps", 5, "--eval-every", 2, "--device", "cpu"]
    proc = script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *common,
                  "--batch-size", 2, "--out", tmp_path / "ddp")
    run(*common, "--batch-size", 4, "--out", tmp_path / "single")
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert "global batch 4 = batch size 2 x 2 processes x grad accum 1" in stdout
    assert stdout.count("epoch 1 step 1/5 |") == 1  # only rank 0 prints
    for (step_a, *a), (step_b, *b) in zip(losses(tmp_path / "ddp"), losses(tmp_path / "single"), strict=True):
        assert step_a == step_b and a == pytest.approx(b, rel=1e-5)
    assert_same_weights(tmp_path / "ddp", tmp_path / "single", exact=False)

    # a mistake is found before the processes meet, and said once, not once per process
    proc = script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *common,
                  "--batch-size", 2, "--out", tmp_path / "ddp")
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0 and stderr.count(f"error: {tmp_path / 'ddp' / 'ckpt.pt'} already exists") == 1


def test_mask_instructions_trains_on_responses_only_and_survives_resume(data, tmp_path, capsys):
    run(*TINY, "--data", data, "--out", tmp_path / "plain", "--max-steps", 1)
    run(*TINY, "--data", data, "--out", tmp_path / "masked", "--max-steps", 1, "--mask-instructions")
    (_, plain_train, plain_val), = losses(tmp_path / "plain")
    (_, masked_train, masked_val), = losses(tmp_path / "masked")
    assert masked_train != plain_train and masked_val != plain_val
    # The same weights before the first step, but the masked run counted far fewer targets:
    # its tokens seen are the same padded inputs.
    assert metrics(tmp_path / "plain")[0]["tokens_seen"] == metrics(tmp_path / "masked")[0]["tokens_seen"]
    assert load_checkpoint(tmp_path / "masked" / "ckpt.pt")["mask_instructions"] is True
    assert "; 1 optimizer step (20 per epoch)" in capsys.readouterr().out
    run("--resume", "--out", tmp_path / "masked", "--max-steps", 2)
    assert "instructions masked in the loss" in capsys.readouterr().out


def test_raw_text_trains_too(tmp_path, capsys, monkeypatch):
    text = tmp_path / "story.txt"
    text.write_text(" ".join(WORDS[(i * 7) % len(WORDS)] for i in range(1500)))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    run(*TINY, "--data", text, "--context-length", 32, "--out", tmp_path / "out", "--lr", "1e-3", "--epochs", 1)
    printed = capsys.readouterr().out
    assert "text data:" in printed and "epoch 1 sample: " in printed
    assert printed.count("matplotlib is not installed (pip install matplotlib)") == 1
    rows = metrics(tmp_path / "out")
    assert rows[-1]["val_loss"] < rows[0]["val_loss"] and not os.path.exists(tmp_path / "out" / "loss.png")
    # generate.py and eval.py continue the text as it is: no instruction template
    assert load_for_inference(str(tmp_path / "out" / "best.pt"))[2] == "none"
    with pytest.raises(SystemExit) as stopped:
        run_cli(*TINY, "--data", text, "--context-length", 32, "--out", tmp_path / "masked", "--mask-instructions")
    assert stopped.value.code == \
        "error: --mask-instructions needs instruction data; raw text has no instructions to mask"


def test_split_sets_the_fractions_and_is_saved_for_eval_and_resume(data, tmp_path, capsys):
    out = tmp_path / "out"
    run(*FAST, "--data", data, "--out", out, "--max-steps", 1, "--split", "0.5,0.25")  # 48 entries: 24, 12, 12
    assert "examples: 24 train, 12 val, 12 test" in capsys.readouterr().out
    best = load_checkpoint(out / "best.pt")
    assert (best["train_frac"], best["test_frac"]) == (0.5, 0.25)
    ev.main(["--ckpt", str(out / "best.pt"), "--max-new-tokens", "1", "--device", "cpu"])
    assert json.load(open(out / "eval.json"))["n_test_entries"] == 12  # eval.py cuts the data as training did
    run(*FAST, "--data", data, "--out", out, "--resume", "--max-steps", 2)  # the checkpoint's split goes on
    assert (load_checkpoint(out / "ckpt.pt")["test_frac"], load_checkpoint(out / "ckpt.pt")["step"]) == (0.25, 2)
    with pytest.raises(SystemExit) as stopped:
        run_cli(*FAST, "--data", data, "--out", out, "--resume", "--split", "0.85,0.1")
    assert stopped.value.code.startswith("error: --split (0.85, 0.1) differs from the checkpoint's (0.5, 0.25); ")
    text = tmp_path / "story.txt"
    text.write_text(" ".join(WORDS * 200))
    with pytest.raises(SystemExit) as stopped:
        run_cli(*TINY, "--data", text, "--out", tmp_path / "text", "--split", "0.5,0.25")
    assert stopped.value.code == "error: --split needs instruction data; raw text is split 90/10 into train and validation"


def test_compile_says_so_before_its_silent_minute(data, tmp_path, capsys, monkeypatch):
    compiled = []
    monkeypatch.setattr(train.torch, "compile", lambda model: compiled.append(model) or model)  # not the real minute
    run(*FAST, "--data", data, "--out", tmp_path / "out", "--max-steps", 1, "--compile")
    assert len(compiled) == 1
    assert "compiling the model with torch.compile: the first steps take a minute or so" in capsys.readouterr().out


def test_max_steps_alone_decides_and_with_epochs_the_run_says_which_ends(data, tmp_path, capsys):
    common = [*FAST, "--batch-size", 8, "--data", data, "--eval-every", 100]  # 40 examples: 5 steps an epoch
    run(*common, "--out", tmp_path / "steps", "--max-steps", 12)  # not cut at the default 2 epochs (10 steps)
    printed = capsys.readouterr().out
    assert "; 12 optimizer steps (5 per epoch)\n" in printed and "ends the run" not in printed
    assert load_checkpoint(tmp_path / "steps" / "ckpt.pt")["step"] == 12
    run(*common, "--out", tmp_path / "both", "--max-steps", 12, "--epochs", 1)
    assert "; 5 optimizer steps (5 per epoch)\n--epochs 1 ends the run at step 5, before --max-steps 12\n" in \
        capsys.readouterr().out
    assert load_checkpoint(tmp_path / "both" / "ckpt.pt")["step"] == 5
    assert train.which_limit(3, 12, 5) == "--max-steps 12 ends the run, before the end of --epochs 3 (step 15)"
    assert train.which_limit(2, 10, 5) == "--epochs 2 and --max-steps 10 both end the run at step 10"


def test_a_resumed_run_may_change_the_optimizer_settings_and_says_which(data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    run(*FAST, "--data", data, "--out", out, "--max-steps", 2, "--lr", "1e-3")
    capsys.readouterr()
    clip, clipped = torch.nn.utils.clip_grad_norm_, []
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda params, norm: clipped.append(norm) or clip(params, norm))
    # what the advice after a NaN asks for: a lower (here: another) --lr, --grad-clip 1
    run("--resume", "--out", out, "--max-steps", 4, "--lr", "1e-2", "--warmup-steps", 8, "--lr-schedule", "cosine",
        "--weight-decay", 0, "--grad-clip", 0.5)
    printed = capsys.readouterr().out
    assert ("changed since the checkpoint: --grad-clip 0.5 (was 0.0), --lr 0.01 (was 0.001), --lr-schedule cosine "
            "(was constant), --max-steps 4 (was 2), --warmup-steps 8 (was 0), --weight-decay 0.0 (was 0.1)\n") in printed
    assert clipped == [0.5, 0.5]  # steps 3 and 4
    assert metrics(out)[-1]["step"] == 4 and metrics(out)[-1]["lr"] == pytest.approx(1e-2 * 4 / 8)  # warming up
    ckpt = load_checkpoint(out / "ckpt.pt")
    assert [group["weight_decay"] for group in ckpt["optimizer"]["param_groups"]] == [0.0]
    assert (ckpt["args"]["lr"], ckpt["args"]["grad_clip"], ckpt["args"]["lr_schedule"]) == (1e-2, 0.5, "cosine")
    # the end says what this process did, and what the whole run did
    assert re.search(r"^done: 2 steps in \d+s \(the run: 4 steps in \d+s\); best val loss ", printed, re.M), printed


def test_resume_with_max_steps_alone_lifts_the_epochs_of_a_fine_tuning_run_and_says_so(data, tmp_path, capsys):
    out = tmp_path / "out"  # 40 examples, batches of 8: 5 steps an epoch
    run(*FAST, "--batch-size", 8, "--data", data, "--out", out, "--epochs", 1, "--max-steps", 2, "--eval-every", 100)
    capsys.readouterr()
    run("--resume", "--out", out, "--max-steps", 7)  # as a new run: --max-steps alone decides
    assert "changed since the checkpoint: --epochs no limit (was 1), --max-steps 7 (was 2)\n" in capsys.readouterr().out
    assert load_checkpoint(out / "ckpt.pt")["step"] == 7

def test_progress_lines_between_evaluations_in_a_log_and_on_a_terminal(data, tmp_path, capsys, monkeypatch):
    step_losses, train_step = [], train.train_step
    monkeypatch.setattr(train, "train_step", lambda *a, **k: step_losses.append(train_step(*a, **k)) or step_losses[-1])
    monkeypatch.setitem(train.PROGRESS_EVERY, "log", 0)  # a line at every step that does not evaluate
    run(*FAST, "--data", data, "--out", tmp_path / "log", "--max-steps", 4, "--eval-every", 3)  # evaluates at 1, 4
    lines = capsys.readouterr().out.splitlines()
    progress = [line for line in lines if line.startswith("step ")]
    assert [line.split(" | ")[:2] for line in progress] == [["step 2/4", f"loss {step_losses[1]:.3f}"],
                                                              ["step 3/4", f"loss {step_losses[2]:.3f}"]]
    assert all(re.fullmatch(r"step \d/4 \| loss \d+\.\d{3} \| [\d,]+ tokens/s \| \d+s left", line) for line in progress)
    assert lines.index(progress[0]) == lines.index(progress[1]) - 1 and lines[lines.index(progress[1]) + 1].startswith(
        "epoch 1 step 4/4 | train loss ")

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    monkeypatch.setitem(train.PROGRESS_EVERY, "terminal", 0)
    step_losses.clear()
    run(*FAST, "--data", data, "--out", tmp_path / "terminal", "--max-steps", 4, "--eval-every", 3)
    # one line rewritten in place (\r, then erase the rest of the line), erased before the next evaluation
    assert re.search(rf"left\n\rstep 2/4 \| loss {step_losses[1]:.3f} \| [^\n]*\x1b\[K"
                     rf"\rstep 3/4 \| loss {step_losses[2]:.3f} \| [^\n]*\x1b\[K\r\x1b\[Kepoch 1 step 4/4 \| ",
                     terminal.getvalue()), terminal.getvalue()


def test_lr_schedules():
    class Args:
        lr, warmup_steps, lr_schedule = 1e-3, 4, "cosine"
    assert [lr_at(s, Args, 15) for s in range(4)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert lr_at(4, Args, 15) == pytest.approx(1e-3) and lr_at(14, Args, 15) == pytest.approx(1e-4)
    assert lr_at(9, Args, 15) == pytest.approx(0.55e-3)  # halfway down
    Args.lr_schedule = "constant"
    assert lr_at(14, Args, 15) == 1e-3


# ----------------------------------------------------------------------------- checkpoints written before


OLD_RUNS = os.path.join(ROOT, "tests", "fixtures", "old-runs")
# The runs in tests/fixtures/old-runs: LoRA (small files) on the tiny model, written by train.py at commit 995ee9c,
# the last before checkpoint.py held both sides of the format:
#     python train.py OLD_RUN [--dpo] --data tests/fixtures/old-runs/{data,pairs}.json --out OUT --max-steps 3
OLD_RUN = [*TINY, "--mask-instructions", "--lora-rank", 2, "--lora-alpha", 8, "--lr", "1e-2", "--lora-dropout", "0.1",
           "--dropout", "0.1", "--eval-every", 2]


def flat(rows):
    return [value for row in rows for value in row]


def assert_same(a, b, where="checkpoint"):
    """Two checkpoint dicts hold the same: keys in the same order, equal values, equal tensors."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), where
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):  # written on another CPU: its kernels may round the last bits otherwise
        assert a.dtype == b.dtype and torch.allclose(a, b, rtol=1e-4, atol=1e-5), where
    else:
        assert a == b, (where, a, b)


@pytest.mark.parametrize("name, data_file, dpo", [("lora-sft", "data.json", []), ("lora-dpo", "pairs.json", ["--dpo"])])
def test_a_checkpoint_written_before_the_restructure_is_the_same_and_resumes_exactly(name, data_file, dpo, tmp_path):
    data = os.path.join(OLD_RUNS, data_file)
    old = tmp_path / "old"
    shutil.copytree(os.path.join(OLD_RUNS, name), old)
    run(*OLD_RUN, *dpo, "--data", data, "--out", tmp_path / "new", "--max-steps", 3)
    written, ours = load_checkpoint(old / "ckpt.pt"), load_checkpoint(tmp_path / "new" / "ckpt.pt")
    # the same but for where and when: the data's path, the folder, the time taken, and --plot, now plot.py
    assert written["args"].pop("plot") is False
    for ckpt in (written, ours):
        del ckpt["data"], ckpt["elapsed"], ckpt["args"]["data"], ckpt["args"]["out"]
    # what came later: the tokenizer travels in the checkpoint, the config has the families' fields, and the
    # settings keep the date the run's chat template renders with (today's: the run started today)
    assert ours.pop("tokenizer") == {"kind": "gpt2"}
    assert ours["args"].pop("template_date") == today()
    assert GPTConfig(**written.pop("config")) == GPTConfig(**ours.pop("config"))
    assert_same(written, ours)
    assert flat(losses(old)) == pytest.approx(flat(losses(tmp_path / "new")), rel=1e-5)

    run("--resume", "--out", old, "--data", data, "--max-steps", 6)  # the data moved since: found by its content
    run(*OLD_RUN, *dpo, "--data", data, "--out", tmp_path / "full", "--max-steps", 6)
    assert [m["step"] for m in metrics(old)] == [1, 3, 5, 6]
    assert flat(losses(old)) == pytest.approx(flat(losses(tmp_path / "full")), rel=1e-5)
    assert_same_weights(old, tmp_path / "full", exact=False)
    assert "plot" not in load_checkpoint(old / "ckpt.pt")["args"]  # a flag no longer there is not carried on


# ----------------------------------------------------------------------------- stopping


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(data, tmp_path, monkeypatch):
    forward, training_calls = GPT.forward, []

    def forward_going_nan(self, idx, targets=None, reduction="mean"):
        out = forward(self, idx, targets, reduction)
        if self.training and targets is not None:
            training_calls.append(1)
            if len(training_calls) == 4:
                return out * float("nan")
        return out

    monkeypatch.setattr(GPT, "forward", forward_going_nan)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stopped:
        run_cli(*FAST, "--data", data, "--out", out, "--max-steps", 10, "--eval-every", 2, "--save-every", 3)
    assert stopped.value.code == (f"error: the training loss became nan at step 4; stopped, {out / 'ckpt.pt'} holds "
                                  "the last good state, from step 3; try a lower --lr, or --grad-clip 1")
    ckpt = load_checkpoint(out / "ckpt.pt")
    assert ckpt["step"] == 3 and all(torch.isfinite(t).all() for t in ckpt["model"].values())
    assert [m["step"] for m in metrics(out)] == [1, 3]
    assert os.path.exists(out / "loss.png") == HAVE_MATPLOTLIB  # a crashed run has its plot
    assert glob.glob(str(out / "*.tmp")) == []

    training_calls.clear()
    with pytest.raises(SystemExit) as stopped:  # before the first save: say that nothing was saved
        run_cli(*FAST, "--data", data, "--out", tmp_path / "early", "--max-steps", 10)
    assert stopped.value.code == ("error: the training loss became nan at step 4; stopped, no checkpoint was written "
                                  "yet (the first is due at step 10); try a lower --lr, or --grad-clip 1")
    assert not os.path.exists(tmp_path / "early" / "ckpt.pt")
    training_calls.clear()
    with pytest.raises(SystemExit) as stopped:  # 20 steps an epoch: the end of the first comes before --save-every
        run_cli(*FAST, "--data", data, "--out", tmp_path / "epochs", "--max-steps", 30)
    assert "stopped, no checkpoint was written yet (the first is due at step 20);" in stopped.value.code


def stop_with_ctrl_c(common, out, timeout=60):
    """Start `python train.py *common --out out`, press Ctrl-C once ckpt.pt is there; the step
    the run says it saved, checked against ckpt.pt."""
    proc = script("train.py", *common, "--out", out)
    deadline = time.time() + timeout
    while not os.path.exists(out / "ckpt.pt") and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr
    ckpt = load_checkpoint(out / "ckpt.pt")
    stopped_at = ckpt["step"]
    assert f"interrupted at step {stopped_at}: saved {out / 'ckpt.pt'}; continue with --resume" in stdout
    assert glob.glob(str(out / "*.tmp")) == []
    return stopped_at


def test_ctrl_c_saves_a_checkpoint_that_resumes_exactly(data, tmp_path):
    common = [*FAST, "--data", data, "--lr", "1e-3", "--eval-every", 1, "--save-every", 3, "--epochs", 1000]
    out = tmp_path / "stopped"
    stopped_at = stop_with_ctrl_c(common, out)

    run("--resume", "--out", out, "--max-steps", stopped_at + 2)
    run(*common, "--out", tmp_path / "full", "--max-steps", stopped_at + 2)
    assert losses(out) == losses(tmp_path / "full")
    assert len(losses(out)) == stopped_at + 2
    assert_same_weights(out, tmp_path / "full")


def test_a_second_ctrl_c_stops_at_once_with_one_line_and_130(data, tmp_path):
    out = tmp_path / "out"
    # train.py with a save that takes long after the first one: the second Ctrl-C comes during it
    code = ("import sys, time, train\n"
            "from common import run_main\n"
            "save_run, saves = train.save_run, []\n"
            "def slow_save(run):\n"
            "    saves.append(1)\n"
            "    if len(saves) > 1:\n"
            "        print('saving', flush=True)\n"
            "        time.sleep(60)\n"
            "    save_run(run)\n"
            "train.save_run = slow_save\n"
            "run_main(lambda: train.main(sys.argv[1:]))\n")
    proc = script("-c", code, *FAST, "--data", data, "--out", out, "--epochs", 1000, "--save-every", 2,
                  "--eval-every", 1000)
    deadline = time.time() + 60
    while not os.path.exists(out / "ckpt.pt") and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # the loop stops at the next step, and saves (slowly)...
    while proc.poll() is None and proc.stdout.readline() != "saving\n":
        pass
    proc.send_signal(signal.SIGINT)  # ... and this one stops it at once
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and stderr == "", stderr
    assert stdout.endswith(f"interrupted: {out / 'ckpt.pt'} holds the last completed save; continue with --resume "
                           f"--out {out}\n")
    assert load_checkpoint(out / "ckpt.pt")["step"] == 2 and glob.glob(str(out / "*.tmp")) == []


# ----------------------------------------------------------------------------- mistakes


def test_an_unwritable_out_is_found_before_the_data_and_the_model(data, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "prepare_data", lambda *a, **k: pytest.fail("loaded the data first"))
    monkeypatch.setattr(train, "build_start_model", lambda *a, **k: pytest.fail("built the model first"))
    (tmp_path / "a-file").write_text("notes")
    for out, message in ((tmp_path / "a-file", f"{tmp_path / 'a-file'} is a file, not a folder to write results in"),
                         (tmp_path / "a-file" / "run", f"cannot create the folder {tmp_path / 'a-file' / 'run'}: "
                                                       f"{tmp_path / 'a-file'} is a file")):
        with pytest.raises(SystemExit) as stopped:
            run_cli(*FAST, "--data", data, "--out", out)
        assert stopped.value.code == f"error: {message}"
    assert (tmp_path / "a-file").read_text() == "notes"


def test_the_next_run_removes_the_temporary_files_a_killed_save_left(data, tmp_path, capsys):
    out = tmp_path / "out"
    run(*FAST, "--data", data, "--out", out, "--max-steps", 2)
    (out / "best.pt.tmp").write_bytes(b"\0" * (2 * 2**20))  # as a kill -9 during a save leaves it
    (out / "ckpt.pt.tmp").write_bytes(b"half")
    theirs = {"notes.tmp": "mine", "ckpt.pt.old": "a copy", "metrics.jsonl.bak": "kept"}
    for name, text in theirs.items():
        (out / name).write_text(text)
    with pytest.raises(SystemExit):  # a refused run touches nothing: the folder may be a running run's
        run_cli(*FAST, "--data", data, "--out", out)
    assert os.path.exists(out / "best.pt.tmp") and os.path.exists(out / "ckpt.pt.tmp")
    capsys.readouterr()
    run("--resume", "--out", out, "--max-steps", 3)
    assert (f"removed ckpt.pt.tmp, best.pt.tmp (2 MiB) from {out}: left by a save that was killed before it "
            "finished\n") in capsys.readouterr().out
    assert glob.glob(str(out / "*.pt.tmp")) == [] and load_checkpoint(out / "ckpt.pt")["step"] == 3
    assert all((out / name).read_text() == text for name, text in theirs.items())



def test_bad_argument_from_the_command_line_is_one_line_and_exit_1(tmp_path):
    proc = script("train.py", "--device", "quantum", "--out", tmp_path / "out")
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert stderr == "error: unknown device 'quantum'; use auto, cpu, cuda, cuda:N or mps\n"


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "0"], "argument --batch-size: must be at least 1, got 0"),
    (["--lr", "-1"], "argument --lr: must be a positive number, got -1"),
    (["--dropout", "1"], "argument --dropout: must be in [0, 1), got 1"),
    (["--lr-schedule", "linear"], "argument --lr-schedule: invalid choice: 'linear'"),
    (["--split", "0.9,0.1"], "argument --split: needs train > 0, test >= 0 and train + test < 1 (the rest is "
                             "validation), got 0.9,0.1"),
    (["--split", "0.9"], "argument --split: must be two fractions TRAIN,TEST such as 0.85,0.10, got 0.9"),
])
def test_bad_values_are_argparse_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as stopped:
        run(*argv)
    assert stopped.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_asked_for_but_missing(data, tmp_path):
    with pytest.raises(SystemExit) as stopped:
        run_cli(*TINY, "--data", data, "--out", tmp_path / "out", "--device", "cuda")
    assert stopped.value.code == "error: device 'cuda' asked for, but this PyTorch has no CUDA device; use --device cpu"


def test_setting_mistakes_are_one_sentence(data, tmp_path):
    def error(*argv):
        with pytest.raises(SystemExit) as stopped:
            run_cli(*FAST, "--data", data, *argv)
        return stopped.value.code

    out = tmp_path / "out"
    assert error("--out", out, "--context-length", 2048) == \
        "error: context length 2048 must be between 1 and the model's 1024"
    assert error("--out", out, "--batch-size", 41).endswith(  # too little data for one batch
        "the train split has 40 examples, fewer than the batch size of 41; use a smaller batch size or more data")
    assert error("--out", out, "--dtype", "float16").startswith("error: --dtype float16 needs CUDA")
    small_vocab = os.path.join(ROOT, "tests", "fixtures", "hf-tiny-gpt2", "bare")  # a real pretrained folder
    assert error("--out", out, "--model", small_vocab, "--init", "pretrained") == \
        f"error: {small_vocab} has a vocabulary of 1024 tokens; GPT-2's tokenizer needs 50257"
    assert error("--out", out, "--resume") == \
        f"error: nothing to resume: {out / 'ckpt.pt'} does not exist (--resume continues the run saved in --out)"
    assert not os.path.exists(out)

    run(*FAST, "--data", data, "--out", out, "--max-steps", 1)
    before = (out / "ckpt.pt").read_bytes()
    assert error("--out", out, "--model", "gpt2") == (  # another model into the same folder
        f"error: {out / 'ckpt.pt'} already exists; continue that run with --resume, or choose another --out "
        "(nothing was overwritten)")
    assert error("--out", out, "--resume", "--batch-size", 4).startswith(
        "error: --batch-size 4 differs from the checkpoint's 2; a resumed run keeps its settings")
    assert error("--out", out, "--resume", "--max-steps", 3, "--seed", 5).startswith(
        "error: --seed 5 differs from the checkpoint's 123; a resumed run keeps its settings")
    assert (out / "ckpt.pt").read_bytes() == before

    (out / "ckpt.pt").write_bytes(before[: len(before) // 2])  # a truncated file
    assert error("--out", out, "--resume") == \
        f"error: checkpoint {out / 'ckpt.pt'} is corrupt or not a train.py checkpoint (RuntimeError)"
    save_checkpoint({"model": {}, "config": {}}, str(out / "ckpt.pt"))  # weights only, no training state
    assert error("--out", out, "--resume").endswith("holds no training state (optimizer, data position); "
                                                    "it cannot be resumed")


def test_help_shows_every_default(capsys):
    with pytest.raises(SystemExit):
        run("--help")
    text = " ".join(capsys.readouterr().out.split())
    for default in ("(default: gpt2)", "(default: 5e-05)", "(default: 0.1)", "(default: 8)", "(default: 123)",
                    "(default: 1024)", "(default: auto)", "(default: out)", "(default: float32)"):
        assert default in text


def test_a_model_file_says_what_it_holds_and_refuses_random_weights(data, tmp_path, capsys):
    run(*FAST, "--data", data, "--out", tmp_path / "first", "--max-steps", 1)
    best = tmp_path / "first" / "best.pt"
    proc = script("train.py", "--model", best, "--batch-size", 2, "--eval-batches", 1, "--mask-instructions",
                  "--data", data, "--out", tmp_path / "next", "--max-steps", 1)
    stdout, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 0, stderr
    assert (f"model {best} (a train.py checkpoint: step 1, trained from tiny's random weights): 3.3M parameters, "
            "3.32M trainable; context 64, on ") in stdout
    proc = script("train.py", "--model", best, "--init", "random", "--data", tmp_path / "nope.json", "--out",
                  tmp_path / "random")
    assert proc.communicate(timeout=60) == ("", f"error: --init random would throw away the weights of the model "
                                                f"file {best}; drop --init random to start from them, or give a preset "
                                                "for random weights of its size\n") and proc.returncode == 1
    assert not os.path.exists(tmp_path / "random")
    proc = script("train.py", "--model", tmp_path / "first", "--data", tmp_path / "nope.json", "--out",
                  tmp_path / "folder")  # the run's folder for its checkpoint: its best.pt is named
    assert proc.communicate(timeout=60) == ("", f"error: {tmp_path / 'first'} is a train.py output folder, not a "
                                                "Hugging Face model folder (it has no config.json); give its "
                                                f"checkpoint, {best}\n") and proc.returncode == 1
    assert not os.path.exists(tmp_path / "folder")


def test_a_model_that_does_not_exist_is_refused_before_the_data_is_read(tmp_path):
    out = tmp_path / "new" / "out"  # made to hold the lock, and removed again with its parent: nothing is left
    for model in (tmp_path / "out" / "nope.pt", "gpt3"):
        proc = script("train.py", "--model", model, "--data", tmp_path / "nope.json", "--out", out)
        assert proc.communicate(timeout=60) == ("", f"error: --model {model} does not exist; give a preset "
                                                    f"({', '.join(PRESETS)}), a local Hugging Face folder or a model "
                                                    "file\n") and proc.returncode == 1
    proc = script("train.py", "--model", "tiny", "--data", tmp_path / "nope.json", "--out", out)
    assert proc.communicate(timeout=60)[1] == ("error: 'tiny' has no pretrained weights; start it from random ones "
                                               "with --init random\n")
    assert os.listdir(tmp_path) == []


def test_help_describes_the_data_train_py_reads():
    proc = scripts.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "COLUMNS": "1000"})  # no line broken at a flag's hyphen
    text = " ".join(proc.stdout.split())
    assert proc.returncode == 0 and ("--data DATA instruction data (.json or .jsonl): Alpaca entries, conversations "
                                     "(OpenAI's 'messages' or ShareGPT's 'conversations'), or for --dpo preference "
                                     "pairs ('chosen' and 'rejected'); or raw text (.txt)") in text
    assert "only --epochs, --max-steps, --lr, --warmup-steps, --lr-schedule, --weight-decay, --grad-clip" in text


def conversations(folder, n=48, weight=None):
    """n two-exchange conversations; with a weight, the first assistant turn carries it."""
    entries = []
    for i in range(n):
        first = {"role": "assistant", "content": f"{i % 7}.", **({"weight": weight} if weight is not None else {})}
        entries.append({"messages": [{"role": "user", "content": f"Say {i % 7}."}, first,
                                     {"role": "user", "content": "Backwards?"},
                                     {"role": "assistant", "content": WORDS[i % len(WORDS)][::-1]}]})
    path = os.path.join(folder, "conversations.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps(entry) + "\n" for entry in entries)
    return path


def test_openai_weight_0_turns_leave_the_loss_with_mask_instructions_and_are_refused_without(tmp_path, capsys):
    path = conversations(tmp_path, weight=0)
    proc = script("train.py", *TINY, "--data", path, "--out", tmp_path / "plain")
    assert proc.communicate(timeout=60) == ("", f"error: {path} has 48 assistant turns of weight 0, which only "
                                                "--mask-instructions leaves out of the loss (without it every token "
                                                "counts); add it\n") and proc.returncode == 1
    run(*FAST, "--data", path, "--out", tmp_path / "weighted", "--max-steps", 1)
    assert ("conversations: 48 of 48 with more than one assistant turn; 48 assistant turns of weight 0, left out "
            "of the loss\n") in capsys.readouterr().out  # which targets count: test_data.py
    assert load_checkpoint(tmp_path / "weighted" / "ckpt.pt")["step"] == 1


# ----------------------------------------------------------------------------- one run to a folder


def wait_for(path, proc, timeout=120):
    """Wait until path exists, while proc runs."""
    deadline = time.time() + timeout
    while not os.path.exists(path) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None and os.path.exists(path), proc.communicate()


def in_use(out, pid):
    return f"error: {out} is in use by train.py (process {pid}); wait for it to end, or give another folder\n"


def test_a_second_run_into_a_running_runs_folder_is_refused_and_a_kill_9_frees_it(data, tmp_path):
    out = tmp_path / "out"
    first = script("train.py", *FAST, "--data", data, "--out", out, "--epochs", 1000, "--save-every", 2,
                   "--eval-every", 3)
    wait_for(out / "ckpt.pt", first)
    for argv in ([*FAST, "--data", data, "--out", out],  # another run into the folder
                 ["--resume", "--out", out]):  # the running run resumed a second time
        second = script("train.py", *argv)
        assert second.communicate(timeout=120) == ("", in_use(out, first.pid)) and second.returncode == 1
    first.send_signal(signal.SIGKILL)  # no save, no clean-up: the kernel releases the lock with the process
    first.communicate(timeout=60)
    saved = load_checkpoint(out / "ckpt.pt")["step"]
    again = script("train.py", "--resume", "--out", out, "--max-steps", saved + 3)
    stdout, stderr = again.communicate(timeout=180)
    assert again.returncode == 0 and "Traceback" not in stderr, stderr
    steps = [m["step"] for m in metrics(out)]  # one run's lines, in order: those after the save were dropped
    assert steps == sorted(set(steps)) and steps[-1] == saved + 3 == load_checkpoint(out / "ckpt.pt")["step"]


def test_two_runs_started_together_into_a_new_folder_one_runs_the_other_is_refused(data, tmp_path):
    out = tmp_path / "new" / "out"
    runs = [script("train.py", *FAST, "--data", data, "--out", out, "--epochs", 1000, "--save-every", 2)
            for _ in range(2)]
    deadline = time.time() + 180
    while all(r.poll() is None for r in runs) and time.time() < deadline:
        time.sleep(0.05)
    refused, = [r for r in runs if r.poll() is not None]
    running, = [r for r in runs if r is not refused]
    assert refused.communicate(timeout=60) == ("", in_use(out, running.pid)) and refused.returncode == 1
    wait_for(out / "ckpt.pt", running)
    running.send_signal(signal.SIGINT)
    stdout, stderr = running.communicate(timeout=120)
    assert running.returncode == 130 and "interrupted at step" in stdout, stderr


def test_an_out_that_names_no_folder_is_refused_first(tmp_path):
    # a --model and --data that do not exist either: --out is the first thing checked
    nowhere = ["--model", tmp_path / "nope.pt", "--data", tmp_path / "nope.json"]
    proc = script("train.py", *nowhere, "--out", "")
    assert proc.communicate(timeout=60) == ("", "error: the output folder is an empty name; give a folder to write "
                                                "results in\n") and proc.returncode == 1
    for out in ("/sys/gpt2-instruct-test", "/proc/gpt2-instruct-test"):  # root may write in them, yet makes no folder
        if not os.path.isdir(os.path.dirname(out)):
            continue
        proc = script("train.py", *nowhere, "--out", out)
        stdout, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 1 and stderr.startswith(f"error: cannot create the folder {out}: "
                                                          f"{os.path.dirname(out)} "), stderr
        assert not os.path.exists(out) and stderr.count("\n") == 1


# ----------------------------------------------------------------------------- LoRA


@pytest.fixture
def base_folder(tmp_path):
    """A "pretrained" tiny GPT-2 (random weights, GPT-2's vocabulary) as a Hugging Face folder."""
    folder = tmp_path / "base"
    os.makedirs(folder)
    torch.manual_seed(7)
    model = GPT(config_for("tiny", context_length=64))
    save_file(hf_state_dict(model), str(folder / "model.safetensors"), metadata={"format": "pt"})
    with open(folder / "config.json", "w") as f:
        json.dump(config_json(model.config, "float32"), f)
    return str(folder)


LORA = ["--context-length", 64, "--batch-size", 2, "--eval-batches", 2, "--mask-instructions",
        "--lora-rank", 4, "--lora-alpha", 8, "--lr", "1e-2"]
ADAPTED = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]


def test_lora_trains_the_adapters_only_and_its_checkpoints_hold_just_them(data, base_folder, tmp_path, capsys):
    out = tmp_path / "lora"
    run("--model", base_folder, *LORA, "--data", data, "--out", out, "--max-steps", 12, "--eval-every", 4)
    printed = capsys.readouterr().out
    # rank 4 on 2 blocks: 4 x ((64 + 192) + (64 + 64) + (64 + 256) + (256 + 64)) x 2 = 8,192 of 3.3M
    assert "3.3M parameters, 0.01M trainable, LoRA rank 4 on qkv,attn_out,mlp_in,mlp_out; context 64" in printed
    rows = metrics(out)
    assert rows[-1]["val_loss"] < rows[0]["val_loss"] - 0.5

    ckpt = load_checkpoint(out / "ckpt.pt")
    assert set(ckpt["model"]) == {f"h.{i}.{path}.lora_{m}" for i in range(2) for path in ADAPTED for m in "AB"}
    assert len(ckpt["optimizer"]["state"]) == 16  # AdamW state for the adapters alone
    assert ckpt["lora"]["rank"] == 4 and ckpt["lora"]["alpha"] == 8 and ckpt["lora"]["base"]["base"] == base_folder
    assert os.path.getsize(out / "ckpt.pt") < 0.05 * os.path.getsize(os.path.join(base_folder, "model.safetensors"))

    # generate.py and eval.py rebuild the base and merge: every frozen weight is the base's, bit for bit
    base = from_pretrained(base_folder, 64).state_dict()
    merged, _, style, _ = load_for_inference(str(out / "best.pt"))
    changed = {name for name, w in merged.state_dict().items() if not torch.equal(w, base[name])}
    assert changed == {f"h.{i}.{path}.weight" for i in range(2) for path in ADAPTED}
    ev.main(["--ckpt", str(out / "best.pt"), "--limit", "2", "--max-new-tokens", "4", "--device", "cpu"])
    with open(out / "test-responses.json") as f:
        assert len(json.load(f)) == 2


def test_lora_resumes_exactly_and_finds_a_moved_base_with_base(data, base_folder, tmp_path):
    common = ["--model", base_folder, *LORA, "--data", data, "--eval-every", 4, "--lora-dropout", "0.1"]
    run(*common, "--out", tmp_path / "full", "--max-steps", 9)
    run(*common, "--out", tmp_path / "part", "--max-steps", 5)
    before = (tmp_path / "part" / "ckpt.pt").read_bytes()
    with pytest.raises(SystemExit) as stopped:
        run_cli("--resume", "--out", tmp_path / "part", "--lora-rank", 8)
    assert stopped.value.code.startswith("error: --lora-rank 8 differs from the checkpoint's 4; a resumed run keeps")
    moved = tmp_path / "moved-base"
    shutil.move(base_folder, moved)
    with pytest.raises(SystemExit) as stopped:
        run_cli("--resume", "--out", tmp_path / "part", "--max-steps", 9)
    assert stopped.value.code.startswith(f"error: the base model folder {base_folder} of the LoRA checkpoint ")
    assert (tmp_path / "part" / "ckpt.pt").read_bytes() == before  # nothing overwritten
    with pytest.raises(SystemExit) as stopped:  # --base: a new run's base is --model
        run("--out", tmp_path / "new", "--base", moved)
    assert stopped.value.code == 2
    run("--resume", "--out", tmp_path / "part", "--max-steps", 9, "--base", moved)  # checked by fingerprint
    assert losses(tmp_path / "part") == losses(tmp_path / "full")
    assert_same_weights(tmp_path / "part", tmp_path / "full")
    assert load_checkpoint(tmp_path / "part" / "ckpt.pt")["lora"]["base"]["base"] == str(moved)  # from now on


def test_lora_distributed_matches_one_process(data, base_folder, tmp_path):
    common = ["--model", base_folder, *LORA, "--data", data, "--max-steps", 4, "--eval-every", 2, "--device", "cpu"]
    proc = script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *common,
                  "--out", tmp_path / "ddp")
    run(*common, "--batch-size", 4, "--out", tmp_path / "single")
    stdout, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 0, stderr
    for (step_a, *a), (step_b, *b) in zip(losses(tmp_path / "ddp"), losses(tmp_path / "single"), strict=True):
        assert step_a == step_b and a == pytest.approx(b, rel=1e-5)
    assert_same_weights(tmp_path / "ddp", tmp_path / "single", exact=False)


def test_lora_mistakes_are_one_sentence(data, base_folder, tmp_path, capsys):
    def error(*argv):
        with pytest.raises(SystemExit) as stopped:
            run_cli("--model", base_folder, "--data", data, "--out", tmp_path / "out", *argv)
        return stopped.value.code

    assert error(*LORA, "--lora-rank", 65) == \
        "error: LoRA rank 65 must be an integer from 1 to 64, the smallest dimension of the adapted layers"
    assert error(*LORA, "--lora-targets", "qkv,ffn") == 2  # before any download
    assert ("argument --lora-targets: must be comma-separated names among qkv, attn_out, mlp_in, mlp_out (any model) "
            "or q, k, v, o, gate, up, down (the Llama family), got qkv,ffn") in capsys.readouterr().err
    assert error("--lora-alpha", 0) == 2
    assert "argument --lora-alpha: must be a positive number, got 0" in capsys.readouterr().err
    assert error("--lora-alpha", 16) == 2  # without a rank the flag would do nothing
    assert "--lora-alpha goes with --lora-rank R (R > 0)" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")
    run("--model", "tiny", "--init", "random", *LORA, "--data", data, "--out", tmp_path / "random", "--max-steps", 1)
    assert "warning: LoRA on random weights adapts a model that has learnt nothing" in capsys.readouterr().out
