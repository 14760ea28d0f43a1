import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from checkpoint import save_checkpoint
from common import resolve_device
import decoding
import generate as generate_script
from prompts import decode, encode, encode_conversation, EOT_ID, format_prompt
from hf import HF_REPOS, from_pretrained
from model import GPT, config_for
from checkpoint import load_for_inference
from decoding import choice_logprobs, generate, prefill, respond, sample_next, stream
from test_model import FIXTURE, REFERENCE
import scripts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_gpt2_vocab(seed=0):
    """A random tiny model with GPT-2's vocabulary, so real text prompts work."""
    torch.manual_seed(seed)
    return GPT(config_for("tiny", context_length=128)).eval()


def generate_without_cache(model, prompt, max_new_tokens, eos_id=None):
    """The plain reference: recompute the whole sequence for every new token."""
    ids = list(prompt)
    for _ in range(max_new_tokens):
        with torch.no_grad():
            token = model(torch.tensor([ids]))[0, -1].argmax().item()
        if token == eos_id:
            break
        ids.append(token)
    return ids[len(prompt):]


def test_greedy_generation_matches_transformers_and_plain_path():
    model = from_pretrained(os.path.join(FIXTURE, "prefixed")).eval()
    prompt = REFERENCE["input_ids"][0]
    assert generate(model, [prompt], 20, stop_ids=()) == [REFERENCE["greedy_20"]]
    assert generate_without_cache(model, prompt, 20) == REFERENCE["greedy_20"]


def test_generation_stops_at_eos():
    model = from_pretrained(os.path.join(FIXTURE, "bare")).eval()
    # transformers' greedy continuation is 129, 582, 582, ...: with 582 as eos we keep [129]
    assert generate(model, [REFERENCE["input_ids"][0]], 20, stop_ids=(582,)) == [[129]]


def test_batched_generation_equals_one_at_a_time():
    model = tiny_gpt2_vocab(seed=1)
    prompts = [encode(t) for t in ("Hello there", "A much longer prompt, with several more tokens in it.",
                                   "x", "Name three primary colors.")]
    # random weights: pick an eos that some rows hit early, so rows also leave the batch
    alone = [generate(model, [p], 24, stop_ids=())[0] for p in prompts]
    eos = alone[0][5]
    alone = [generate(model, [p], 24, stop_ids=(eos,))[0] for p in prompts]
    assert generate(model, prompts, 24, stop_ids=(eos,)) == alone
    assert alone[0] == generate_without_cache(model, prompts[0], 24, eos_id=eos)
    assert len({len(a) for a in alone}) > 1  # rows really did finish at different steps


def test_generation_stops_when_context_is_full():
    model = tiny_gpt2_vocab()
    prompt = list(range(120))
    out = generate(model, [prompt], 50, stop_ids=())[0]
    assert len(out) == 128 - 120 + 1  # the last token is sampled from a full context
    # batched with a longer prompt, a shorter row still fills its own context, not the longest's
    prompts = [list(range(120)), list(range(7, 107))]
    batched = generate(model, prompts, 50, stop_ids=())
    assert [len(o) for o in batched] == [9, 29]
    assert batched == [generate(model, [p], 50, stop_ids=())[0] for p in prompts]
    with pytest.raises(ValueError, match="a prompt of 129 tokens exceeds the context length 128"):
        generate(model, [list(range(129))], 5)


def test_sampling_top_k_top_p_and_seed():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.5], [0.0, 0.0, 5.0, 0.0]])
    assert sample_next(logits).tolist() == [1, 2]
    g = torch.Generator().manual_seed(0)
    # top_k=1 and a tiny top_p both leave only the most likely token
    assert sample_next(logits, 1.0, top_k=1, generator=g).tolist() == [1, 2]
    assert sample_next(logits, 1.0, top_p=1e-3, generator=g).tolist() == [1, 2]
    draws = torch.stack([sample_next(logits, 2.0, top_k=2, generator=g) for _ in range(300)])
    assert set(draws[:, 0].tolist()) == {1, 2}  # both top-2 tokens drawn, never the others
    # top_p=0.9 on row 0: probs .61 .22 .08 .06 (softmax) -> the first two cover 0.83 < 0.9, so keep three
    draws = torch.stack([sample_next(logits, 1.0, top_p=0.9, generator=g) for _ in range(300)])
    assert set(draws[:, 0].tolist()) == {0, 1, 2}
    a = sample_next(logits, 1.0, generator=torch.Generator().manual_seed(5))
    b = sample_next(logits, 1.0, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_sampled_generation_is_reproducible_with_a_seed():
    model = tiny_gpt2_vocab()
    prompts = [encode("Once upon a time")]
    runs = [generate(model, prompts, 16, temperature=1.0, top_k=50, seed=7) for _ in range(2)]
    assert runs[0] == runs[1] and len(runs[0][0]) > 0
    assert generate(model, prompts, 16, temperature=1.0, top_k=50, seed=8) != runs[0]


PROMPTS = ["Hello there", "A much longer prompt, with several more tokens in it.", "x", "Name three primary colors."]


@pytest.mark.parametrize("settings", [dict(temperature=1.0), dict(temperature=0.8, top_k=50),
                                      dict(temperature=1.0, top_k=200, top_p=0.9)])
def test_a_sampled_row_does_not_depend_on_the_rest_of_its_batch(settings):
    """With a seed each prompt samples from its own generator: alone, in a batch, in another
    order or beside other prompts, a prompt gets the same answer; a second copy of a prompt in
    the same call gets another sample."""
    model = tiny_gpt2_vocab(seed=1)
    prompts = [encode(t) for t in PROMPTS]
    alone = [generate(model, [p], 12, stop_ids=(), seed=7, **settings)[0] for p in prompts]
    assert len({tuple(a) for a in alone}) == len(prompts)  # real, different samples
    assert generate(model, prompts, 12, stop_ids=(), seed=7, **settings) == alone
    assert generate(model, prompts[::-1], 12, stop_ids=(), seed=7, **settings) == alone[::-1]
    assert generate(model, prompts[1:3], 12, stop_ids=(), seed=7, **settings) == alone[1:3]
    twice = generate(model, [prompts[0], prompts[2], prompts[0]], 12, stop_ids=(), seed=7, **settings)
    assert twice[:2] == [alone[0], alone[2]] and twice[2] != alone[0]
    # rows that stop at end-of-text leave the batch; the others go on drawing the same numbers
    eos = alone[0][3]
    stopped = [generate(model, [p], 12, stop_ids=(eos,), seed=7, **settings)[0] for p in prompts]
    assert generate(model, prompts, 12, stop_ids=(eos,), seed=7, **settings) == stopped
    assert len({len(s) for s in stopped}) > 1


def test_greedy_and_beam_search_take_no_seed():
    model = tiny_gpt2_vocab(seed=1)
    prompts = [encode(t) for t in PROMPTS]
    for settings in (dict(), dict(num_beams=3)):
        assert generate(model, prompts, 10, seed=1, **settings) == generate(model, prompts, 10, seed=2, **settings)


def test_ragged_prompts_pad_with_a_token_every_model_has(monkeypatch):
    # the fixture's vocabulary of 1,024 has no token 50256 (<|endoftext|>), which padded before
    small = from_pretrained(os.path.join(FIXTURE, "bare")).eval()
    prompts = [[5, 900, 17, 3], [1000], [42, 7]]
    assert generate(small, prompts, 8, stop_ids=()) == [generate(small, [p], 8, stop_ids=())[0] for p in prompts]
    # padding is masked out of attention: padding with <|endoftext|> gives the very same logits
    model = tiny_gpt2_vocab(seed=1)
    prompts = [encode(t) for t in PROMPTS]
    with torch.inference_mode():
        padded_with_0 = prefill(model, prompts, 5)[0]
        monkeypatch.setattr(decoding, "PAD_ID", EOT_ID)
        assert torch.equal(prefill(model, prompts, 5)[0], padded_with_0)


def test_resolve_device_errors():
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device; use --device cpu"):
            resolve_device("cuda")


def save_tiny_checkpoint(path, style="alpaca", seed=0):
    model = tiny_gpt2_vocab(seed)
    save_checkpoint({"model": model.state_dict(), "config": vars(model.config), "prompt_style": style}, path)
    return model


def run_script(*args, stdin=None):
    return scripts.run([sys.executable, os.path.join(ROOT, "generate.py"), *args], input=stdin,
                          capture_output=True, text=True, cwd=ROOT, env=os.environ.copy(), timeout=120)


def test_cli_prints_the_response_in_the_checkpoints_prompt_style(tmp_path):
    ckpt = str(tmp_path / "ckpt.pt")
    model = save_tiny_checkpoint(ckpt, style="phi3")
    entries = [{"instruction": "Name a color.", "input": ""}, {"instruction": "Say hi.", "input": ""}]
    expected = respond(model, entries, "phi3", 12)
    assert respond(model, entries[:1], "alpaca", 12) != expected[:1]  # the style matters
    result = run_script("--ckpt", ckpt, "--prompt", "Name a color.", "--prompt", "Say hi.",
                        "--max-new-tokens", "12", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    # several answers: each after a line that names its instruction
    assert result.stdout == (f"==> 1/2: Name a color. <==\n{expected[0]}\n\n"
                             f"==> 2/2: Say hi. <==\n{expected[1]}\n")
    loaded, _, style, _ = load_for_inference(ckpt, None, None, "cpu")
    assert style == "phi3" and format_prompt(entries[0], style).startswith("<|user|>\nName a color.")


def reply_to(model, messages, max_new_tokens, style="alpaca"):
    """(printed, kept): the chat's reply to a conversation as it is printed, and as it is kept."""
    text = decode(generate(model, [encode_conversation(messages, style)[0]], max_new_tokens)[0])
    return text.lstrip(), text.strip()


def user(text):
    return {"role": "user", "content": text}


def test_cli_interactive_chat_goes_on_after_an_overlong_message(tmp_path):
    ckpt = str(tmp_path / "ckpt.pt")
    model = save_tiny_checkpoint(ckpt)
    first, kept = reply_to(model, [user("Say hi.")], 8)
    assert first.strip() == respond(model, [{"instruction": "Say hi.", "input": ""}], "alpaca", 8)[0]
    again, _ = reply_to(model, [user("Say hi."), {"role": "assistant", "content": kept}, user("Say hi.")], 8)
    overlong = "word " * 200  # over the context of 128 tokens
    result = run_script("--ckpt", ckpt, "--interactive", "--max-new-tokens", "8", "--device", "cpu",
                        stdin=f"Say hi.\n{overlong}\nSay hi.\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "> " + first + "\n> > " + again + "\n> \n"  # the end of input ends the line
    n_prompt = len(encode(format_prompt({"instruction": overlong.strip(), "input": ""})))
    assert (f"error: this message makes a prompt of {n_prompt} tokens, more than the context of 128; "
            "write a shorter one\n") in result.stderr
    # the random model never ends a response: each is cut, and a note on stderr says so
    assert result.stderr.count("(cut at 8 tokens: --max-new-tokens 8 or the end of the context of 128)") == 2


def test_cli_continues_plain_text_for_a_raw_text_checkpoint(tmp_path):
    ckpt = str(tmp_path / "ckpt.pt")
    model = save_tiny_checkpoint(ckpt, style="none")  # what train.py saves for .txt data
    expected = generate(model, [encode("Once upon a time")], 6)[0]
    result = run_script("--ckpt", ckpt, "--prompt", "Once upon a time", "--max-new-tokens", "6", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert result.stdout == decode(expected).strip() + "\n"


def test_cli_errors_are_one_line(tmp_path):
    result = run_script("--ckpt", str(tmp_path / "missing.pt"), "--prompt", "hi")
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: checkpoint {tmp_path / 'missing.pt'} does not exist"
    result = run_script("--ckpt", "a.pt", "--model", "gpt2", "--prompt", "hi")
    assert result.returncode == 1 and "exactly one of --ckpt" in result.stderr
    result = run_script("--model", "gpt2", "--prompt", "hi", "--temperature", "-1")
    assert result.returncode == 2 and "argument --temperature: must be a number >= 0, got -1" in result.stderr
    result = run_script("--model", "gpt2", "--prompt", "hi", "--seed", "-1")
    assert result.returncode == 2 and "argument --seed: must be an integer from 0 to 2**63 - 1, got -1" in result.stderr
    small_vocab = os.path.join(FIXTURE, "bare")  # a real GPT-2 folder, but with 1,024 tokens
    result = run_script("--model", small_vocab, "--prompt", "hi")
    assert result.returncode == 1
    assert result.stderr == f"error: {small_vocab} has a vocabulary of 1024 tokens; GPT-2's tokenizer needs 50257\n"
    result = run_script("--model", "tiny", "--prompt", "hi")
    assert result.returncode == 1 and result.stderr == (
        "error: 'tiny' is a preset without pretrained weights (train.py --init random uses it); give a --ckpt, "
        "a preset with pretrained weights (gpt2, gpt2-medium, gpt2-large, gpt2-xl, qwen3-0.6b, qwen3-1.7b, "
        "llama-3.2-1b, llama-3.2-3b, smollm2-135m, smollm2-360m, smollm2-1.7b, qwen2.5-0.5b, qwen2.5-1.5b), a "
        "local folder or a model file\n")
    result = run_script("--ckpt", str(tmp_path), "--prompt", "hi")
    assert result.returncode == 1
    assert result.stderr == f"error: checkpoint {tmp_path} is a directory, not a checkpoint file\n"
    result = run_script("--model", str(tmp_path / "nope.pt"), "--prompt", "hi")
    assert result.returncode == 1 and result.stderr == (f"error: {tmp_path / 'nope.pt'} does not exist; a model is a "
                                                        f"preset with pretrained weights ({', '.join(HF_REPOS)}), a "
                                                        "local folder or a model file\n")


def test_cli_marks_answers_with_their_instruction_on_one_line(tmp_path):
    ckpt = str(tmp_path / "ckpt.pt")
    save_tiny_checkpoint(ckpt)
    long = "Write   a story\nabout a cat who learns to read, in exactly three short sentences please."
    result = run_script("--ckpt", ckpt, "--prompt", long, "--prompt", "x", "--max-new-tokens", "3",
                        "--device", "cpu")
    assert result.returncode == 0, result.stderr
    headers = [line for line in result.stdout.splitlines() if line.startswith("==> ")]
    assert headers == ["==> 1/2: Write a story about a cat who learns to read, in exactly ... <==",
                       "==> 2/2: x <=="]


def test_cli_sampled_answer_is_the_same_with_other_prompts(tmp_path):
    ckpt = str(tmp_path / "ckpt.pt")
    save_tiny_checkpoint(ckpt)
    sampling = ["--max-new-tokens", "10", "--device", "cpu", "--temperature", "1.0", "--seed", "3"]
    alone = run_script("--ckpt", ckpt, "--prompt", "Say hi.", *sampling)
    both = run_script("--ckpt", ckpt, "--prompt", "Name a color.", "--prompt", "Say hi.", *sampling)
    assert alone.returncode == both.returncode == 0, both.stderr
    assert both.stdout.endswith("==> 2/2: Say hi. <==\n" + alone.stdout)


def test_cli_interactive_uses_input_for_every_instruction(tmp_path):
    ckpt = str(tmp_path / "ckpt.pt")
    model = save_tiny_checkpoint(ckpt)
    hi = {"role": "user", "content": "Say hi.", "input": "Bob"}
    first, kept = reply_to(model, [hi], 6)
    second, _ = reply_to(model, [hi, {"role": "assistant", "content": kept},
                                 {"role": "user", "content": "Greet.", "input": "Bob"}], 6)
    assert first.strip() == respond(model, [{"instruction": "Say hi.", "input": "Bob"}], "alpaca", 6)[0]
    assert first.strip() != respond(model, [{"instruction": "Say hi.", "input": ""}], "alpaca", 6)[0]
    result = run_script("--ckpt", ckpt, "--interactive", "--input", "Bob", "--max-new-tokens", "6", "--device", "cpu",
                        stdin="Say hi.\nGreet.\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"> {first}\n> {second}\n> \n"
    assert "each message gets --input as its input" in result.stderr


def wait_until_reading(pid):
    """Wait until the process sleeps in its read of stdin. A signal that comes between input()'s
    prompt and its read is only handled once the read returns: a person's Ctrl-C never falls
    there, a test's that follows the prompt at once can."""
    for _ in range(600):
        try:
            with open(f"/proc/{pid}/wchan") as f:
                if "pipe_read" in f.read():
                    return
        except OSError:  # not Linux: a second is long enough
            time.sleep(1)
            return
        time.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_in_the_interactive_loop_ends_with_one_line_and_130(tmp_path, sig):
    ckpt = str(tmp_path / "ckpt.pt")
    save_tiny_checkpoint(ckpt)
    proc = scripts.Popen([sys.executable, os.path.join(ROOT, "generate.py"), "--ckpt", ckpt, "--interactive",
                             "--max-new-tokens", "4", "--device", "cpu"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        proc.stdin.write("Say hi.\n")
        proc.stdin.flush()
        assert proc.stderr.readline().startswith("chat in prompt style alpaca")  # the loop is running
        assert proc.stdout.read(2) == "> " and proc.stdout.readline()  # one answer made
        assert proc.stdout.read(2) == "> "  # waiting for the next instruction
        wait_until_reading(proc.pid)
        proc.send_signal(sig)
        proc.wait(timeout=60)  # stdin still open: the signal alone ends it (communicate's EOF would be Ctrl-D)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    assert stderr.splitlines()[-1] == ("interrupted: the answers printed above are complete, nothing else was kept; "
                                       "start generate.py --interactive again to go on")
    assert "Traceback" not in stderr


def test_ctrl_c_while_generating_ends_with_one_line_and_130(tmp_path, monkeypatch, capsys):
    ckpt = str(tmp_path / "ckpt.pt")
    save_tiny_checkpoint(ckpt)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(generate_script, "generate", interrupted)
    monkeypatch.setattr(sys, "argv", ["generate.py", "--ckpt", ckpt, "--prompt", "Say hi.", "--device", "cpu"])
    with pytest.raises(SystemExit) as stopped:
        generate_script.main()
    assert stopped.value.code == 130
    assert capsys.readouterr().err == ("interrupted: the answers printed above are complete, nothing else was kept; "
                                       "run the command again\n")


def test_input_flag_errors(tmp_path):
    result = run_script("--model", "gpt2", "--base", str(tmp_path), "--prompt", "hi")
    assert result.returncode == 1
    assert result.stderr == "error: --base goes with a LoRA --ckpt: the folder its base model moved to\n"
    ckpt = str(tmp_path / "ckpt.pt")
    save_tiny_checkpoint(ckpt)
    result = run_script("--ckpt", ckpt, "--base", str(tmp_path), "--prompt", "hi", "--device", "cpu")
    assert result.returncode == 1
    assert result.stderr == f"error: --base is for a LoRA checkpoint; {ckpt} holds all its weights\n"


# ----------------------------------------------------------------------------- streaming and the chat


@pytest.mark.parametrize("sampling", [{}, {"temperature": 1.0, "top_k": 20, "seed": 5}])
def test_streamed_tokens_are_generates_batched_and_alone(sampling):
    model = tiny_gpt2_vocab(seed=2)
    prompts = [encode(text) for text in ("Hello there", "A longer prompt with more tokens in it.", "x")]
    steps = list(stream(model, prompts, 12, stop_ids=(encode(" the")[0],), **sampling))
    collected = [[step[row] for step in steps if row in step] for row in range(len(prompts))]
    assert collected == generate(model, prompts, 12, stop_ids=(encode(" the")[0],), **sampling)
    for prompt, tokens in zip(prompts, collected):
        assert [step[0] for step in stream(model, [prompt], 12, stop_ids=(encode(" the")[0],), **sampling)] == tokens
    # a step yields the rows that made a token: every row at the first step, fewer once some stop
    assert set(steps[0]) == {0, 1, 2} and all(len(step) <= len(prompts) for step in steps)
    assert list(stream(model, prompts, 0)) == []


def test_cli_chat_keeps_the_conversation_and_reset_and_system_messages(tmp_path):
    ckpt = str(tmp_path / "ckpt.pt")
    model = save_tiny_checkpoint(ckpt)
    system = {"role": "system", "content": "Be brief."}
    first, kept = reply_to(model, [system, user("Say hi.")], 6)
    second, _ = reply_to(model, [system, user("Say hi."), {"role": "assistant", "content": kept},
                                 user("Name a color.")], 6)
    fresh, _ = reply_to(model, [system, user("Name a color.")], 6)
    assert second != fresh  # the reply depends on the earlier exchange
    result = run_script("--ckpt", ckpt, "--interactive", "--system", "Be brief.", "--max-new-tokens", "6",
                        "--device", "cpu", stdin="Say hi.\nName a color.\n/reset\nName a color.\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"> {first}\n> {second}\n> > {fresh}\n> \n"
    assert "(a new conversation)" in result.stderr
    result = run_script("--ckpt", ckpt, "--system", "Be brief.", "--prompt", "hi")
    assert result.returncode == 2 and "--system goes with --interactive" in result.stderr


def test_cli_chat_drops_the_oldest_exchanges_when_the_context_fills(tmp_path):
    ckpt = str(tmp_path / "ckpt.pt")
    model = save_tiny_checkpoint(ckpt)  # a context of 128 tokens; 20 of them kept for a reply
    lines = [f"Tell me about item number {n}, with some words." for n in range(4)]
    messages, printed = [], []
    for line in lines:  # what the chat should do, by hand: keep exchanges while the prompt leaves 20 tokens
        messages.append(user(line))
        while len(encode_conversation(messages, "alpaca")[0]) + 20 > 128:
            messages = messages[2:]
        text, kept = reply_to(model, messages, 20)
        printed.append(text)
        messages.append({"role": "assistant", "content": kept})
    result = run_script("--ckpt", ckpt, "--interactive", "--max-new-tokens", "20", "--device", "cpu",
                        stdin="\n".join(lines) + "\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "".join(f"> {text}\n" for text in printed) + "> \n"
    assert "(1 earlier exchange dropped from the conversation to fit the context of 128 tokens)" in result.stderr


def test_ctrl_c_during_a_reply_stops_it_and_the_chat_goes_on(tmp_path, monkeypatch, capsys):
    ckpt = str(tmp_path / "ckpt.pt")
    model = save_tiny_checkpoint(ckpt)
    real_stream, calls = generate_script.stream, []

    def interrupted_stream(*args, **kwargs):
        """The first reply: Ctrl-C (a real SIGINT to this process) while its 4th token is made."""
        calls.append(args)
        if len(calls) > 1:
            yield from real_stream(*args, **kwargs)
            return
        for n, step in enumerate(real_stream(*args, **kwargs)):
            yield step
            if n == 2:
                os.kill(os.getpid(), signal.SIGINT)
    monkeypatch.setattr(generate_script, "stream", interrupted_stream)
    monkeypatch.setattr(sys, "stdin", __import__("io").StringIO("Say hi.\nName a color.\n"))
    monkeypatch.setattr(sys, "argv", ["generate.py", "--ckpt", ckpt, "--interactive", "--max-new-tokens", "8",
                                      "--device", "cpu"])
    generate_script.main()
    out, err = capsys.readouterr()
    # the reply stops after the token in the making when Ctrl-C came: 4 of 8
    partial = decode(generate(model, [encode_conversation([user("Say hi.")], "alpaca")[0]], 8)[0][:4])
    second, _ = reply_to(model, [user("Say hi."), {"role": "assistant", "content": partial.strip()},
                                 user("Name a color.")], 8)
    assert out == f"> {partial.lstrip()}\n> {second}\n> \n"
    assert "(reply stopped)" in err and signal.getsignal(signal.SIGINT) is signal.default_int_handler


def whitespace_then_end(model, prompt):
    """The model with its second greedy token after `prompt` renamed end-of-text (the two swap
    embeddings, which the output head is tied to): a random tiny model often says a newline
    first, and then its reply is whitespace only. All else it does is the same under the new names."""
    first, second = generate(model, [prompt], 2, stop_ids=())[0]
    assert not decode([first]).strip() and second not in prompt + [EOT_ID]
    with torch.no_grad():
        model.wte.weight[:, [second, EOT_ID]] = model.wte.weight[:, [EOT_ID, second]]
    assert generate(model, [prompt], 8) == [[first]]
    return model


def test_cli_chat_leaves_a_whitespace_reply_out_of_the_conversation(tmp_path):
    model = whitespace_then_end(tiny_gpt2_vocab(seed=0), encode_conversation([user("Say hi.")], "alpaca")[0])
    ckpt = str(tmp_path / "ckpt.pt")
    save_checkpoint({"model": model.state_dict(), "config": vars(model.config), "prompt_style": "alpaca"}, ckpt)
    answer, _ = reply_to(model, [user("What is 2+2?")], 6)  # as if "Say hi." had never been said
    assert answer.strip() and answer != reply_to(model, [user("Say hi."), {"role": "assistant", "content": ""},
                                                       user("What is 2+2?")], 6)[0]
    result = run_script("--ckpt", ckpt, "--interactive", "--max-new-tokens", "6", "--device", "cpu",
                        stdin="Say hi.\nWhat is 2+2?\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"> \n> {answer}\n> \n"
    assert result.stderr.count("(empty reply: only whitespace; this exchange is left out of the conversation)\n") == 1
    result = run_script("--ckpt", ckpt, "--prompt", "Say hi.", "--max-new-tokens", "6", "--device", "cpu")
    assert result.returncode == 0 and result.stdout == "\n" and result.stderr == "(empty response: only whitespace)\n"


def test_cli_chat_ends_its_line_on_ctrl_d_at_a_terminal(tmp_path):
    """On a terminal (a pseudo-terminal here), Ctrl-D at the "> " prompt quits with a newline, so
    that the shell's prompt starts a line of its own."""
    import pty
    import select
    ckpt = str(tmp_path / "ckpt.pt")
    save_tiny_checkpoint(ckpt)
    controller, terminal = pty.openpty()  # input() writes its prompt to stderr on a terminal
    proc = scripts.Popen([sys.executable, os.path.join(ROOT, "generate.py"), "--ckpt", ckpt, "--interactive",
                             "--max-new-tokens", "4", "--device", "cpu"], stdin=terminal, stdout=terminal,
                            stderr=terminal, cwd=ROOT)
    os.close(terminal)
    shown = b""

    def read_until(done, timeout=120):
        nonlocal shown
        deadline = time.time() + timeout
        while not done() and select.select([controller], [], [], max(deadline - time.time(), 0))[0]:
            try:
                chunk = os.read(controller, 1024)
            except OSError:  # EIO: every process holding the terminal has ended
                return
            if not chunk:
                return
            shown += chunk

    try:
        read_until(lambda: shown.endswith(b"> "))  # the prompt, waiting for a message
        assert shown.endswith(b"> "), shown
        os.write(controller, b"\x04")  # Ctrl-D
        read_until(lambda: False)
        proc.wait(timeout=60)
    finally:
        proc.kill()
        os.close(controller)
    assert proc.returncode == 0, shown
    assert shown.endswith(b"> \r\n"), shown


def plain_choice_logprob(model, prompt, choice):
    """The reference: one forward pass over prompt + choice + end-of-text, summing the
    log-probabilities of the choice's tokens and the end-of-text."""
    ids = prompt + choice + [EOT_ID]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids]))[0].float(), dim=-1)
    return sum(logprobs[t - 1, ids[t]].item() for t in range(len(prompt), len(ids)))


def test_choice_logprobs_equal_a_plain_forward_pass_batched_and_alone():
    model = tiny_gpt2_vocab(seed=2)
    prompts = [encode(t) for t in ("Classify: the match ended 2-1.", "x",
                                   "A much longer prompt, with several more tokens in it, to classify.")]
    choices = [encode(t) for t in ("World", "Sports", "Business", "Sci/Tech")]  # 1 to 3 tokens
    assert len({len(c) for c in choices}) > 1, "a longer choice before a shorter one: the cache goes back"
    expected = [[plain_choice_logprob(model, p, c) for c in choices] for p in prompts]
    batched = choice_logprobs(model, prompts, choices)
    alone = [choice_logprobs(model, [p], choices)[0] for p in prompts]
    for got in (batched, alone):
        assert torch.allclose(torch.tensor(got), torch.tensor(expected), atol=1e-4), (got, expected)
    # a row's values do not depend on the batch it is in: the same float computations up to padding
    assert torch.allclose(torch.tensor(batched), torch.tensor(alone), atol=1e-5)


def test_choice_logprobs_refuse_what_does_not_fit():
    model = tiny_gpt2_vocab()
    with pytest.raises(ValueError, match="every choice needs at least one token"):
        choice_logprobs(model, [[1, 2]], [[3], []])
    with pytest.raises(ValueError, match="exceed the context length 128"):
        choice_logprobs(model, [[1] * 126], [[3], [4, 5, 6]])
    assert len(choice_logprobs(model, [[1] * 125], [[3], [4, 5, 6]])[0]) == 2  # 125 + 3 fills the context exactly
