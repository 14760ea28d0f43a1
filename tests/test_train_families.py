"""train.py on the Llama family (Qwen3, Qwen2.5, SmolLM2, Llama 3.2): tiny random models written as
complete Hugging Face folders (tests/tiny_family.py: their own small tokenizer, real chat template and
end ids), trained in this process on data made here. Full fine-tuning, LoRA and DPO in each family's
own tokenizer and chat template, exact resume (Llama 3.2's template writes the date), the checkpoint
without its base folder, the loss masks through the data pipeline, bfloat16, torchrun, and what is
refused. No transformers needed."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import dpo
import train
from checkpoint import load_checkpoint, load_model_file
from common import IGNORE_INDEX, write_json
from data import prepare_data
from prompts import CHAT_TEMPLATE, dated, load_tokenizer
from test_train import assert_same_weights, losses, make_data, metrics, run, run_cli, script
from tiny_family import FAMILIES, write_tiny_model

# the tokens that end an assistant turn in each family's chat template
END = {"qwen3": "<|im_end|>", "qwen2.5": "<|im_end|>", "smollm2": "<|im_end|>", "llama3.2": "<|eot_id|>"}
SMALL = ["--context-length", 96, "--batch-size", 4, "--eval-batches", 2, "--eval-every", 4, "--mask-instructions"]
WORDS = "apple river stone cloud green quiet music window".split()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """folders(family): the family's tiny model folder, written once (copy it before changing it)."""
    made = {}

    def folder(family):
        if family not in made:
            made[family] = write_tiny_model(tmp_path_factory.mktemp(family), family)
        return made[family]
    return folder


def conversations(n=24):
    """n conversations: one exchange with a system message, one without, and two exchanges."""
    entries = []
    for i in range(n):
        word = WORDS[i % len(WORDS)]
        if i % 3 == 0:
            messages = [{"role": "system", "content": "Answer in one word."},
                        {"role": "user", "content": f"Spell {word} backwards."},
                        {"role": "assistant", "content": word[::-1]}]
        elif i % 3 == 1:
            messages = [{"role": "user", "content": f"Add {i % 7} and {i % 5}."},
                        {"role": "assistant", "content": f"{i % 7 + i % 5}."}]
        else:
            messages = [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"},
                        {"role": "user", "content": f"Now say {word}."}, {"role": "assistant", "content": f"{word}."}]
        entries.append({"messages": messages})
    return entries


def write(entries, path):
    write_json(entries, str(path))
    return str(path)


@pytest.fixture
def chats(tmp_path):
    return write(conversations(), tmp_path / "chats.json")


def pairs_file(folder, n=24):
    """n preference pairs (Alpaca entries): the sum, or a refusal."""
    return write([{"instruction": f"Add {i % 7} and {i % 5}.", "input": "", "chosen": f"{i % 7 + i % 5}.",
                   "rejected": "I do not know."} for i in range(n)], folder / "pairs.json")


def copy_folder(folders, family, dest):
    shutil.copytree(folders(family), dest)
    return str(dest)


# ----------------------------------------------------------------------------- full fine-tuning, LoRA


@pytest.mark.parametrize("family", FAMILIES)
def test_full_fine_tuning_in_the_familys_chat_template_lowers_the_loss(family, folders, chats, tmp_path, capsys):
    out = tmp_path / "out"
    run("--model", folders(family), *SMALL, "--data", chats, "--out", out, "--lr", "3e-3", "--max-steps", 10)
    printed = capsys.readouterr().out
    assert "(prompt style chat-template, instructions masked in the loss)" in printed  # the default for a template
    rows = metrics(out)
    assert rows[-1]["val_loss"] < rows[0]["val_loss"] - 1.0 and rows[-1]["train_loss"] < rows[0]["train_loss"] - 1.0
    ckpt = load_checkpoint(out / "ckpt.pt")
    assert ckpt["prompt_style"] == CHAT_TEMPLATE and ckpt["tokenizer"] == load_tokenizer(folders(family)).state()
    assert ckpt["config"]["family"] == FAMILIES[family]["family"]
    assert {t.dtype for t in ckpt["model"].values()} == {torch.float32}


@pytest.mark.parametrize("family, targets, style, adapted", [
    ("qwen2.5", None, None, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    ("smollm2", "q,v", "alpaca", ["q_proj", "v_proj"]),  # the chapter's Alpaca prompts on any family
])
def test_lora_trains_the_familys_adapters_only(family, targets, style, adapted, folders, tmp_path, capsys):
    """On a base whose embeddings are scaled up (random ones give all tokens nearly the same logit,
    which frozen, no adapter can change much), as a pretrained model's logits spread."""
    base = copy_folder(folders, family, tmp_path / "base")
    weights = os.path.join(base, "model.safetensors")
    save_file({name: tensor * 10 if "embed" in name or "lm_head" in name else tensor
               for name, tensor in load_file(weights).items()}, weights, metadata={"format": "pt"})
    out, data = tmp_path / "lora", make_data(tmp_path, n=24)
    run("--model", base, *SMALL, "--data", data, "--out", out, "--lr", "1e-2", "--max-steps", 10,
        "--lora-rank", 4, "--lora-alpha", 16, *(["--lora-targets", targets] if targets else []),
        *(["--prompt-style", style] if style else []))
    names = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate", "up_proj": "up",
             "down_proj": "down"}
    assert f"LoRA rank 4 on {','.join(names[a] for a in adapted)}; context 96" in capsys.readouterr().out
    rows = metrics(out)
    assert rows[-1]["val_loss"] < rows[0]["val_loss"] - 2.0
    ckpt = load_checkpoint(out / "ckpt.pt")
    parts = {a: ("attn" if a in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp") for a in adapted}
    assert set(ckpt["model"]) == {f"h.{i}.{parts[a]}.{a}.lora_{m}" for i in range(2) for a in adapted for m in "AB"}
    assert ckpt["prompt_style"] == (style or CHAT_TEMPLATE)
    tokenizer = load_tokenizer(base)
    # the Alpaca style on a family: its beginning-of-text (if any), the chapter's text, its own end-of-text
    splits = prepare_data(data, style or CHAT_TEMPLATE, 96, True, tokenizer=tokenizer)
    inputs, targets = splits.collate_fn([splits.train[0]])
    text = tokenizer.decode(inputs[0].tolist() + targets[0, -1:].tolist())
    if style == "alpaca":
        assert text == ("Below is an instruction that describes a task. Write a response that appropriately completes "
                        "the request.\n\n### Instruction:\nSpell the word backwards.\n\n### Input:\napple\n\n"
                        "### Response:\nelppa<|endoftext|>")
    else:  # Qwen2.5's template: its default system message, the input after the instruction
        assert text.startswith("<|im_start|>system\nYou are Qwen") and text.endswith(
            "<|im_start|>user\nSpell the word backwards.\n\napple<|im_end|>\n<|im_start|>assistant\nelppa<|im_end|>")


# ----------------------------------------------------------------------------- the checkpoint, DPO


def test_a_checkpoint_needs_no_base_folder_and_dpo_starts_from_it(folders, chats, tmp_path, capsys):
    """The tokenizer travels in the checkpoint: with the base folder deleted, the SFT checkpoint loads
    with it and a DPO run starts from it (its style too); the reward margin grows, and dpo.pair_report
    in the same tokenizer gives the validation metrics the run logged."""
    base = copy_folder(folders, "qwen3", tmp_path / "base")
    tokenizer = load_tokenizer(base)
    run("--model", base, *SMALL, "--data", chats, "--out", tmp_path / "sft", "--lr", "3e-3", "--max-steps", 5)
    shutil.rmtree(base)
    sft = str(tmp_path / "sft" / "best.pt")
    model, style, loaded = load_model_file(sft)
    assert style == CHAT_TEMPLATE and loaded.state() == tokenizer.state()

    pairs = pairs_file(tmp_path)
    capsys.readouterr()
    run("--model", sft, "--dpo", *SMALL, "--data", pairs, "--out", tmp_path / "dpo", "--lr", "1e-4", "--epochs", 2,
        "--eval-every", 2, "--beta", 0.5)
    assert "(prompt style chat-template, instructions masked in the loss)" in capsys.readouterr().out
    rows = metrics(tmp_path / "dpo")  # from log 2 (the policy is the reference) down, evaluation after evaluation
    val_losses, margins = [r["val_loss"] for r in rows], [r["val_reward_margin"] for r in rows]
    assert val_losses[0] < 0.6931 and val_losses == sorted(val_losses, reverse=True) and val_losses[-1] < 0.3
    assert margins == sorted(margins) and margins[-1] > 1.0 and rows[-1]["val_reward_accuracy"] == 1.0

    best = load_checkpoint(tmp_path / "dpo" / "best.pt")
    assert best["tokenizer"] == tokenizer.state()
    logged = next(r for r in rows if r["step"] == best["step"])
    policy, _, _ = load_model_file(str(tmp_path / "dpo" / "best.pt"))
    val = prepare_data(pairs, CHAT_TEMPLATE, 96, True, tokenizer=tokenizer).val_entries
    report = dpo.pair_report(policy, val, CHAT_TEMPLATE, 96, 4, "cpu", reference_model=model, beta=0.5,
                             tokenizer=loaded)
    assert report["reward_margin"] == pytest.approx(logged["val_reward_margin"], rel=1e-4)
    assert report["loss"] == pytest.approx(logged["val_loss"], rel=1e-4)


# ----------------------------------------------------------------------------- resume


def test_resume_is_exact_on_another_day_without_the_base_folder(folders, chats, tmp_path, monkeypatch):
    """Llama 3.2's template writes today's date into every example: a run renders its data with the
    date it started on (kept in its settings), so one resumed on another day, its base folder gone,
    gives the losses and weights of one never stopped."""
    base = copy_folder(folders, "llama3.2", tmp_path / "base")
    tokenizer = load_tokenizer(base)
    texts = {}
    for day in ("26 Jul 2024", "01 Jan 2030"):
        with dated(day):
            splits = prepare_data(chats, CHAT_TEMPLATE, 96, True, tokenizer=tokenizer)
        texts[day] = tokenizer.decode(splits.train.token_ids[0])
    assert "Today Date: 26 Jul 2024\n" in texts["26 Jul 2024"] and texts["26 Jul 2024"] != texts["01 Jan 2030"]

    common = ["--model", base, *SMALL, "--data", chats, "--lr", "3e-3", "--dropout", "0.1", "--eval-every", 2]
    monkeypatch.setattr(train, "today", lambda: "26 Jul 2024")
    run(*common, "--out", tmp_path / "full", "--max-steps", 7)
    run(*common, "--out", tmp_path / "part", "--max-steps", 3)
    assert load_checkpoint(tmp_path / "part" / "ckpt.pt")["args"]["template_date"] == "26 Jul 2024"
    shutil.rmtree(base)
    monkeypatch.setattr(train, "today", lambda: "01 Jan 2030")
    run("--resume", "--out", tmp_path / "part", "--max-steps", 7)
    assert losses(tmp_path / "part") == losses(tmp_path / "full")
    assert_same_weights(tmp_path / "part", tmp_path / "full")


# ----------------------------------------------------------------------------- the data and its masks


@pytest.mark.parametrize("family", FAMILIES)
def test_mask_instructions_keeps_exactly_the_assistant_turns_and_their_end_tokens(family, folders, tmp_path):
    """Through prepare_data and its collate: the targets that count are each answer and the end token
    after it, nothing of the template around them (Qwen3's empty think block is prompt); padding is
    the end token, never counted; a special token typed in the data stays text."""
    tokenizer = load_tokenizer(folders(family))
    end = tokenizer.token_id(END[family])
    typed = f"Type {END[family]} here."
    entries = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there!"},
                             {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": typed},
                             {"role": "assistant", "content": typed}]},
               {"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]}]
    path = write(entries * 5, tmp_path / "chats.json")
    splits = prepare_data(path, CHAT_TEMPLATE, 256, True, train_frac=0.6, test_frac=0.2, tokenizer=tokenizer)
    inputs, targets = splits.collate_fn([splits.train[0], splits.train[1]])
    kept = [[t for t in row.tolist() if t != IGNORE_INDEX] for row in targets]
    assert kept[0] == tokenizer.encode("Hello!") + [end] + tokenizer.encode(typed) + [end]
    assert kept[1] == tokenizer.encode("Blue.") + [end]
    # in the inputs (all but the last answer's end token): 4 turns ended by the token, and the typed text twice
    assert inputs[0].tolist().count(end) == 4 and tokenizer.decode(inputs[0]).count(END[family]) == 6
    short = len(splits.train.token_ids[1])
    assert inputs[1, short:].tolist() == [end] * (inputs.shape[1] - short)  # padded with the end token
    assert targets[1, short:].tolist() == [IGNORE_INDEX] * (inputs.shape[1] - short)
    if family == "qwen3":  # the empty think block is in the inputs before the last answer, not in the targets
        assert "<|im_start|>assistant\n<think>\n\n</think>\n\nBlue.<|im_end|>" in tokenizer.decode(inputs[1])


# ----------------------------------------------------------------------------- bfloat16, torchrun


def test_a_bfloat16_folder_trains_float32_weights_under_bfloat16_autocast(folders, chats, tmp_path, capsys):
    base = copy_folder(folders, "qwen2.5", tmp_path / "base")
    weights = os.path.join(base, "model.safetensors")
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(weights).items()}, weights, metadata={"format": "pt"})
    out = tmp_path / "out"
    run("--model", base, *SMALL, "--data", chats, "--out", out, "--lr", "3e-3", "--max-steps", 6, "--dtype", "bfloat16")
    assert "on cpu (bfloat16)" in capsys.readouterr().out
    rows = metrics(out)
    assert rows[-1]["val_loss"] < rows[0]["val_loss"] - 0.5
    ckpt = load_checkpoint(out / "ckpt.pt")
    assert {t.dtype for t in ckpt["model"].values()} == {torch.float32}  # weights and AdamW's moments
    assert {t.dtype for s in ckpt["optimizer"]["state"].values() for k, t in s.items() if k != "step"} == \
        {torch.float32}


def test_torchrun_on_a_family_matches_one_process(folders, chats, tmp_path):
    common = ["--model", folders("qwen3"), *SMALL, "--data", chats, "--lr", "3e-3", "--max-steps", 4,
              "--eval-every", 2, "--device", "cpu"]
    proc = script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *common,
                  "--batch-size", 2, "--out", tmp_path / "ddp")
    run(*common, "--out", tmp_path / "single")
    stdout, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 0, stderr
    for (step_a, *a), (step_b, *b) in zip(losses(tmp_path / "ddp"), losses(tmp_path / "single"), strict=True):
        assert step_a == step_b and a == pytest.approx(b, rel=1e-5)
    assert load_checkpoint(tmp_path / "ddp" / "ckpt.pt")["tokenizer"] == load_tokenizer(folders("qwen3")).state()


# ----------------------------------------------------------------------------- refusals


def error(*argv):
    with pytest.raises(SystemExit) as stopped:
        run_cli(*argv)
    return stopped.value.code


def test_a_lora_target_the_family_lacks_is_refused_in_one_sentence(folders, tmp_path, capsys):
    data = make_data(tmp_path, n=24)
    assert error("--model", "tiny", "--init", "random", *SMALL, "--data", data, "--out", tmp_path / "gpt2",
                 "--lora-rank", 4, "--lora-targets", "qkv,gate") == (
        "error: the gpt2 family has no LoRA target 'gate'; choose among qkv, attn_out, mlp_in, mlp_out "
        "(comma-separated)")
    assert error("--model", folders("llama3.2"), "--data", data, "--out", tmp_path / "llama", "--lora-rank", 4,
                 "--lora-targets", "q,ffn") == 2
    assert ("argument --lora-targets: must be comma-separated names among qkv, attn_out, mlp_in, mlp_out (any model) "
            "or q, k, v, o, gate, up, down (the Llama family), got q,ffn") in capsys.readouterr().err


def test_a_vocabulary_mismatch_and_missing_tokenizers_are_refused_in_one_sentence(folders, tmp_path, monkeypatch):
    data = make_data(tmp_path, n=24)
    small = copy_folder(folders, "smollm2", tmp_path / "small")
    with open(os.path.join(small, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(small, "config.json"), "w") as f:
        json.dump({**config, "vocab_size": 300}, f)
    needs = load_tokenizer(small).vocab_size
    assert error("--model", small, "--init", "random", *SMALL, "--data", data, "--out", tmp_path / "a") == \
        f"error: {small} has a vocabulary of 300 tokens; the tokenizer of {small} needs {needs}"

    assert error("--model", "tiny", "--init", "random", "--prompt-style", "chat-template", "--data", data,
                 "--out", tmp_path / "b") == (
        "error: prompt style chat-template renders the model's own chat template, and GPT-2's tokenizer has none; "
        "use --prompt-style alpaca, phi3 or none")

    monkeypatch.setenv("GPT2_CACHE_DIR", str(tmp_path / "cache"))
    folder = tmp_path / "cache" / "qwen3-0.6b"
    assert error("--model", "qwen3-0.6b", "--init", "random", "--data", data, "--out", tmp_path / "c") == (
        f"error: random weights of qwen3-0.6b still need its tokenizer, which is not in {folder}: fetch it once "
        "with python hf.py qwen3-0.6b (the weights come too), or give a folder holding the model's config.json and "
        "tokenizer files as --model FOLDER --init random")
    assert not any(os.path.exists(tmp_path / name) for name in "abc")
