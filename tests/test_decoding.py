"""Beam search (generate.beam_search); int8 weights are tested in test_quantize.py."""
import json
import math

import pytest
import torch
import torch.nn as nn

import eval as ev
from prompts import encode
from model import GPTConfig
from decoding import generate, respond
from test_eval import make_entries, save_ckpt, write_data
from test_generate import run_script, save_tiny_checkpoint, tiny_gpt2_vocab

PROMPTS = ["Hello there", "A much longer prompt, with several more tokens in it.", "x", "Name three primary colors."]


# ----------------------------------------------------------------------------- beam search


def beam_search_without_cache(model, prompt, steps, num_beams):
    """Plain beam search with no end-of-text: keep the num_beams continuations of highest total
    log-probability, recomputing every sequence from scratch at each step; return the best."""
    beams = [(0.0, [])]
    for _ in range(steps):
        candidates = []
        for total, tokens in beams:
            with torch.no_grad():
                logprobs = torch.log_softmax(model(torch.tensor([prompt + tokens]))[0, -1], dim=-1)
            best = logprobs.topk(num_beams)  # only these can be among the num_beams best overall
            candidates += [(total + lp, tokens + [t]) for lp, t in zip(best.values.tolist(), best.indices.tolist())]
        beams = sorted(candidates, key=lambda c: -c[0])[:num_beams]
    return beams[0][1]


def test_one_beam_is_greedy():
    model = tiny_gpt2_vocab(seed=1)
    prompts = [encode(t) for t in PROMPTS]
    greedy = generate(model, prompts, 10)
    eos = greedy[0][3]  # a row that stops early
    assert generate(model, prompts, 10, stop_ids=(eos,), num_beams=1) == generate(model, prompts, 10, stop_ids=(eos,))
    assert generate(model, prompts, 10, num_beams=1, length_penalty=2.0) == greedy


def test_beam_search_without_end_of_text_equals_the_plain_reference():
    model = tiny_gpt2_vocab(seed=1)
    prompts = [encode(t) for t in PROMPTS[:2]]
    beams = generate(model, prompts, 6, stop_ids=(), num_beams=3)
    assert beams == [beam_search_without_cache(model, p, 6, 3) for p in prompts]
    assert beams != generate(model, prompts, 6, stop_ids=())  # beam search found other sequences than greedy
    # a full context stops it, as greedy generation: 128 - 124 + 1 new tokens
    assert [len(o) for o in generate(model, [list(range(124))] * 2, 20, stop_ids=(), num_beams=2)] == [5, 5]


def test_ragged_batch_of_beam_searches_equals_each_prompt_alone():
    model = tiny_gpt2_vocab(seed=1)
    prompts = [encode(t) for t in PROMPTS]
    eos = generate(model, prompts[1:2], 12, stop_ids=(), num_beams=3)[0][1]  # prompt 1's beams say it early
    batched = generate(model, prompts, 12, stop_ids=(eos,), num_beams=3)
    assert batched == [generate(model, [p], 12, stop_ids=(eos,), num_beams=3)[0] for p in prompts]
    assert len(batched[1]) < 12 and 12 in [len(b) for b in batched]  # prompts finished at different steps


class BigramModel(nn.Module):
    """A stand-in for GPT in generate(): the next token's probabilities depend only on the last
    token, from a table, so that what beam search does can be worked out by hand."""

    def __init__(self, table):
        super().__init__()
        self.config = GPTConfig(vocab_size=len(table), context_length=32, emb_dim=4, n_layers=1, n_heads=1)
        self.wte = nn.Module()
        self.wte.weight = nn.Parameter(torch.zeros(1))  # generate() reads its device and dtype
        self.logits = torch.tensor(table).log()

    def forward_cached(self, idx, cache):
        cache.pos += idx.size(1)
        return self.logits[idx[:, -1]]


# Token 0 is end-of-text; prompt [4]. Step 1: "0" (p .5) finishes A = [] with log-prob sum
# -0.69 (length 1); the beams go on with [1] (-0.80) and [2] (-3.51). Step 2: [1, 0] (sum -1.50)
# finishes B = [1] (length 2); [1, 3] (-1.70) and [1, 2] (-3.28) go on. Step 3: [1, 3, 0] (sum
# -1.75) finishes C = [1, 3] (length 3). Scores sum / length ** length_penalty:
#   length_penalty -1 or 0: A beats B, and no open beam's sum (-1.70) can beat B: A wins.
#   length_penalty 1: A -0.69, B -0.75. A bound at the current length (-1.70 / 2 = -0.85) would
#   stop here and return A, but [1, 3] may end as late as the budget of 6 tokens (-1.70 / 6 >
#   -0.75), so the search goes on and finds C (-0.58), which wins.
BIGRAMS = [[0.1, 0.2, 0.3, 0.15, 0.25],  # after 0 (fed only with stop_ids=())
           [0.496, 0.01, 0.084, 0.406, 0.004],  # after 1
           [0.005, 0.003, 0.0015, 0.99, 0.0005],  # after 2
           [0.95, 0.012, 0.008, 0.02, 0.01],  # after 3
           [0.5, 0.45, 0.03, 0.012, 0.008]]  # after 4


def test_length_penalty_favours_longer_hypotheses_and_the_bound_is_exact():
    model = BigramModel(BIGRAMS)
    winners = {lp: generate(model, [[4]], 6, stop_ids=(0,), num_beams=2, length_penalty=lp)[0] for lp in (-1.0, 0.0, 1.0)}
    assert winners == {-1.0: [], 0.0: [], 1.0: [1, 3]}
    # prompt [2] goes on after [4] is done: [3] (log-prob sum -0.06) beats [] (-5.30) and [3, 3] (-3.97)
    assert generate(model, [[4], [2]], 6, stop_ids=(0,), num_beams=2, length_penalty=0.0) == [[], [3]]


def test_sampling_settings_with_beams_are_refused():
    model = tiny_gpt2_vocab()
    for settings in (dict(temperature=0.7), dict(top_k=5), dict(top_p=0.9)):
        with pytest.raises(ValueError, match="beam search samples nothing"):
            generate(model, [[1, 2]], 4, num_beams=2, **settings)
    with pytest.raises(ValueError, match="num_beams must be at least 1, got 0"):
        generate(model, [[1, 2]], 4, num_beams=0)


def test_cli_beam_search(tmp_path):
    ckpt = str(tmp_path / "ckpt.pt")
    model = save_tiny_checkpoint(ckpt)
    entry = {"instruction": "Name a color.", "input": ""}
    expected = respond(model, [entry], "alpaca", 8, num_beams=3, length_penalty=0.5)[0]
    assert expected != respond(model, [entry], "alpaca", 8)[0]
    result = run_script("--ckpt", ckpt, "--prompt", "Name a color.", "--max-new-tokens", "8", "--device", "cpu",
                        "--num-beams", "3", "--length-penalty", "0.5")
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"


def test_decoding_flag_errors(tmp_path, capsys):
    with pytest.raises(ValueError, match="^--num-beams above 1 is beam search, which samples nothing: "
                                         "drop --temperature, --top-k and --top-p$"):
        ev.main(["--ckpt", str(tmp_path / "never-read.pt"), "--num-beams", "3", "--top-k", "5"])
    with pytest.raises(SystemExit):
        ev.main(["--ckpt", "ckpt.pt", "--length-penalty", "nan"])
    assert "argument --length-penalty: must be a finite number, got nan" in capsys.readouterr().err


def test_eval_records_the_decoding_settings(tmp_path):
    ckpt = save_ckpt(tmp_path / "ckpt.pt", tiny_gpt2_vocab(), data=write_data(tmp_path, make_entries()))
    ev.main(["--ckpt", ckpt, "--max-new-tokens", "3", "--num-beams", "2", "--length-penalty", "0.5",
             "--quantize", "int8", "--device", "cpu"])
    report = json.loads((tmp_path / "eval.json").read_text())
    assert {k: report["generation"][k] for k in ("num_beams", "length_penalty", "quantize")} == \
        {"num_beams": 2, "length_penalty": 0.5, "quantize": "int8"}
    assert math.isfinite(report["test_loss"])
