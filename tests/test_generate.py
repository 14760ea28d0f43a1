import os
import signal
import subprocess
import sys

import pytest
import torch

from checkpoint import save_checkpoint
from common import resolve_device
import generate as generate_script
from data import EOT_ID, decode, encode, format_prompt
from model import GPT, config_for, from_pretrained
from generate import choice_logprobs, generate, load_for_inference, prefill, respond, sample_next
from test_model import FIXTURE, REFERENCE

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
    assert generate(model, [prompt], 20, eos_id=None) == [REFERENCE["greedy_20"]]
    assert generate_without_cache(model, prompt, 20) == REFERENCE["greedy_20"]


def test_generation_stops_at_eos():
    model = from_pretrained(os.path.join(FIXTURE, "bare")).eval()
    # transformers' greedy continuation is 129, 582, 582, ...: with 582 as eos we keep [129]
    assert generate(model, [REFERENCE["input_ids"][0]], 20, eos_id=582) == [[129]]


def test_batched_generation_equals_one_at_a_time():
    model = tiny_gpt2_vocab(seed=1)
    prompts = [encode(t) for t in ("Hello there", "A much longer prompt, with several more tokens in it.",
                                   "x", "Name three primary colors.")]
    # random weights: pick an eos that some rows hit early, so rows also leave the batch
    alone = [generate(model, [p], 24, eos_id=None)[0] for p in prompts]
    eos = alone[0][5]
    alone = [generate(model, [p], 24, eos_id=eos)[0] for p in prompts]
    assert generate(model, prompts, 24, eos_id=eos) == alone
    assert alone[0] == generate_without_cache(model, prompts[0], 24, eos_id=eos)
    assert len({len(a) for a in alone}) > 1  # rows really did finish at different steps


def test_generation_stops_when_context_is_full():
    model = tiny_gpt2_vocab()
    prompt = list(range(120))
    out = generate(model, [prompt], 50, eos_id=None)[0]
    assert len(out) == 128 - 120 + 1  # the last token is sampled from a full context
    # batched with a longer prompt, a shorter row still fills its own context, not the longest's
    prompts = [list(range(120)), list(range(7, 107))]
    batched = generate(model, prompts, 50, eos_id=None)
    assert [len(o) for o in batched] == [9, 29]
    assert batched == [generate(model, [p], 50, eos_id=None)[0] for p in prompts]
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
    alone = [generate(model, [p], 12, eos_id=None, seed=7, **settings)[0] for p in prompts]
    assert len({tuple(a) for a in alone}) == len(prompts)  # real, different samples
    assert generate(model, prompts, 12, eos_id=None, seed=7, **settings) == alone
    assert generate(model, prompts[::-1], 12, eos_id=None, seed=7, **settings) == alone[::-1]
    assert generate(model, prompts[1:3], 12, eos_id=None, seed=7, **settings) == alone[1:3]
    twice = generate(model, [prompts[0], prompts[2], prompts[0]], 12, eos_id=None, seed=7, **settings)
    assert twice[:2] == [alone[0], alone[2]] and twice[2] != alone[0]
    # rows that stop at end-of-text leave the batch; the others go on drawing the same numbers
    eos = alone[0][3]
    stopped = [generate(model, [p], 12, eos_id=eos, seed=7, **settings)[0] for p in prompts]
    assert generate(model, prompts, 12, eos_id=eos, seed=7, **settings) == stopped
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
    assert generate(small, prompts, 8, eos_id=None) == [generate(small, [p], 8, eos_id=None)[0] for p in prompts]
    # padding is masked out of attention: padding with <|endoftext|> gives the very same logits
    model = tiny_gpt2_vocab(seed=1)
    prompts = [encode(t) for t in PROMPTS]
    with torch.inference_mode():
        padded_with_0 = prefill(model, prompts, 5)[0]
        monkeypatch.setattr(generate_script, "PAD_ID", EOT_ID)
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
    return subprocess.run([sys.executable, os.path.join(ROOT, "generate.py"), *args], input=stdin,
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
    loaded, _, style = load_for_inference(ckpt, None, None, "cpu")
    assert style == "phi3" and format_prompt(entries[0], style).startswith("<|user|>\nName a color.")


def test_cli_interactive_loop_goes_on_after_an_overlong_prompt(tmp_path):
    ckpt = str(tmp_path / "ckpt.pt")
    model = save_tiny_checkpoint(ckpt)
    expected = respond(model, [{"instruction": "Say hi.", "input": ""}], "alpaca", 8)[0]
    overlong = "word " * 200  # over the context of 128 tokens
    result = run_script("--ckpt", ckpt, "--interactive", "--max-new-tokens", "8", "--device", "cpu",
                        stdin=f"Say hi.\n{overlong}\nSay hi.\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "> " + expected + "\n> > " + expected + "\n> "
    n_prompt = len(encode(format_prompt({"instruction": overlong.strip(), "input": ""})))
    assert f"error: a prompt of {n_prompt} tokens exceeds the context length 128; truncate it first\n" in result.stderr
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
        "a GPT-2 name (gpt2, gpt2-medium, gpt2-large, gpt2-xl) or a local folder\n")
    result = run_script("--ckpt", str(tmp_path), "--prompt", "hi")
    assert result.returncode == 1
    assert result.stderr == f"error: checkpoint {tmp_path} is a directory, not a checkpoint file\n"


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
    expected = [respond(model, [{"instruction": text, "input": "Bob"}], "alpaca", 6)[0] for text in ("Say hi.", "Greet.")]
    assert expected[0] != respond(model, [{"instruction": "Say hi.", "input": ""}], "alpaca", 6)[0]
    result = run_script("--ckpt", ckpt, "--interactive", "--input", "Bob", "--max-new-tokens", "6", "--device", "cpu",
                        stdin="Say hi.\nGreet.\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"> {expected[0]}\n> {expected[1]}\n> "
    assert "each instruction gets --input as its input" in result.stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_in_the_interactive_loop_ends_with_one_line_and_130(tmp_path, sig):
    ckpt = str(tmp_path / "ckpt.pt")
    save_tiny_checkpoint(ckpt)
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "generate.py"), "--ckpt", ckpt, "--interactive",
                             "--max-new-tokens", "4", "--device", "cpu"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        proc.stdin.write("Say hi.\n")
        proc.stdin.flush()
        assert proc.stderr.readline().startswith("prompt style alpaca")  # the loop is running
        assert proc.stdout.read(2) == "> " and proc.stdout.readline()  # one answer made
        assert proc.stdout.read(2) == "> "  # waiting for the next instruction
        proc.send_signal(sig)
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
