"""serve.py's /v1/completions as lm-evaluation-harness uses it (--model local-completions):
prompts as strings or token ids, one or many per request, and with "echo" and "logprobs" the
log-probability of every prompt token, in OpenAI's legacy completions format, equal to the
model's own (a plain forward pass). The last test runs the real lm_eval on a local task file
where lm-eval is installed."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from prompts import decode, encode
from test_serve import call, model, reference, running, server  # noqa: F401 (model, server: fixtures)

LM_EVAL = importlib.util.find_spec("lm_eval") is not None


def forward_logprobs(model, ids):
    """log_softmax of one plain forward pass over ids: (len(ids), vocab)."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids]))[0].float(), dim=-1)


def expected_logprobs(model, prompt, top_n, chosen=()):
    """OpenAI's legacy logprobs object of the prompt (and a token chosen after it), from a plain
    forward pass over the prompt: each token's text and log-probability after the tokens before
    it (none for the first), the top_n most likely tokens at its place and the token itself,
    where its text starts."""
    lp, ids = forward_logprobs(model, prompt), prompt + list(chosen)
    tops = [None]
    for i in range(1, len(ids)):
        values, indices = torch.topk(lp[i - 1], top_n)
        top = {}
        for t, v in [*zip(indices.tolist(), values.tolist()), (ids[i], lp[i - 1, ids[i]].item())]:
            top.setdefault(decode([t]), v)
        tops.append(top)
    return {"tokens": [decode([t]) for t in ids],
            "token_logprobs": [None] + [lp[i - 1, ids[i]].item() for i in range(1, len(ids))],
            "top_logprobs": tops, "text_offset": [len(decode(ids[:i])) for i in range(len(ids))]}


def test_echo_gives_each_prompt_tokens_logprob_as_a_forward_pass(server, model):
    text = "Once upon a time, a café served 😀 to"  # the emoji's bytes span tokens
    ids = encode(text)
    for top_n in (0, 1, 5):
        status, reply = call(server, "POST", "/v1/completions", {"prompt": text, "echo": True, "logprobs": top_n,
                                                                  "max_tokens": 0})
        assert status == 200, reply
        assert reply["choices"] == [{"index": 0, "text": text, "finish_reason": "length",
                                     "logprobs": expected_logprobs(model, ids, top_n)}]
        assert reply["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}
    status, reply = call(server, "POST", "/v1/completions", {"prompt": text, "echo": True})
    assert status == 200 and reply["choices"][0]["text"] == text and reply["choices"][0]["logprobs"] is None


def test_what_lm_eval_sends_for_loglikelihood(server, model):
    """lm-eval 0.4's local-completions payload for log-likelihood requests: token id lists (a
    batch of them), temperature 0, max_tokens 1, logprobs 1, echo: the prompt's tokens and one
    greedy token more, each scored; lm-eval sums token_logprobs[ctxlen:-1] and calls a
    continuation greedy when each of its tokens is its position's most likely one."""
    context, continuations = encode("Question: Which is a color?\nAnswer:"), [encode(" red"), encode(" a tree")]
    prompts = [context + c for c in continuations]
    status, reply = call(server, "POST", "/v1/completions", {"model": "gpt2", "prompt": prompts, "temperature": 0,
                                                              "max_tokens": 1, "logprobs": 1, "seed": 1234,
                                                              "echo": True})
    assert status == 200, reply
    assert [c["index"] for c in reply["choices"]] == [0, 1]
    for choice, ids in zip(reply["choices"], prompts):
        lp = forward_logprobs(model, ids)
        greedy = int(lp[-1].argmax())
        assert choice["logprobs"] == expected_logprobs(model, ids, 1, [greedy])
        assert choice["text"] == decode(ids + [greedy]) and choice["finish_reason"] == "length"
        scored = choice["logprobs"]["token_logprobs"][len(context):-1]
        assert sum(scored) == sum(lp[i - 1, ids[i]].item() for i in range(len(context), len(ids)))
    assert reply["usage"]["prompt_tokens"] == sum(map(len, prompts)) and reply["usage"]["completion_tokens"] == 2


def test_prompts_as_token_ids_and_lists_are_continued_as_generate_does(server, model):
    ids = encode("Once upon a time")
    status, reply = call(server, "POST", "/v1/completions", {"prompt": ["Once upon a time", ids, "Hello"],
                                                              "max_tokens": 9})
    assert status == 200
    assert [(c["index"], c["text"]) for c in reply["choices"]] == [
        (0, reference(model, ids, 9)), (1, reference(model, ids, 9)), (2, reference(model, encode("Hello"), 9))]
    status, reply = call(server, "POST", "/v1/completions", {"prompt": ids, "max_tokens": 4})
    assert status == 200 and reply["choices"][0]["text"] == reference(model, ids, 4)


@pytest.mark.parametrize("body, message", [
    ({"prompt": "x", "echo": True, "max_tokens": 2}, "with 'echo' the prompt is scored: 'max_tokens' must be 0 or 1"),
    ({"prompt": "x", "max_tokens": 0}, "'max_tokens' must be an integer of at least 1, got 0"),
    ({"prompt": "x", "echo": True, "logprobs": 6}, "'logprobs' must be an integer from 0 to 5, got 6"),
    ({"prompt": "x", "logprobs": 1}, "'logprobs' comes with 'echo': true"),
    ({"prompt": "x", "echo": "yes"}, "'echo' must be true or false"),
    ({"prompt": "x", "echo": True, "stream": True}, "'stream' takes one prompt, without 'echo'"),
    ({"prompt": ["x", "y"], "stream": True}, "'stream' takes one prompt, without 'echo'"),
    ({"prompt": [5, 50257]}, "'prompt' holds a token id the model or its tokenizer does not have (the model's are "
                             "0 to 50256)"),
    ({"prompt": [[-1]]}, "'prompt' holds a token id"),
    ({"prompt": []}, "'prompt' must be a non-empty string, a list of token ids, or a list of up to 64 of either"),
    ({"prompt": [[]]}, "'prompt' must be a non-empty string"),
    ({"prompt": [""]}, "'prompt' must be a non-empty string"),
    ({"prompt": [True, 3]}, "'prompt' must be a non-empty string"),
    ({"prompt": ["x"] * 65}, "'prompt' must be a non-empty string, a list of token ids, or a list of up to 64"),
    ({"prompt": [[1] * 129]}, "the prompt is 129 tokens, over the model's context length of 128"),
])
def test_bad_completion_requests_get_a_400(server, body, message):
    status, reply = call(server, "POST", "/v1/completions", body)
    assert status == 400 and reply["error"]["message"].startswith(message), reply


@pytest.mark.skipif(not LM_EVAL, reason="lm-eval is not installed (pip install 'lm-eval[api]')")
def test_lm_eval_scores_a_local_task_through_the_server(tmp_path, model):
    """The real lm_eval CLI (--model local-completions, GPT-2's tokenizer through tiktoken) on a
    local multiple-choice task file: each answer's log-likelihood it reports is the sum of the
    model's own log-probabilities of the answer's tokens after the question."""
    docs = [{"question": "Which of these is a primary color?", "choices": ["red", "green", "purple"], "answer": 0},
            {"question": "Snow is", "choices": ["white", "red", "blue"], "answer": 0}]
    (tmp_path / "colors.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "colors.yaml").write_text(
        "task: colors\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'colors.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n")
    with running(model) as server:
        result = subprocess.run(
            [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args",
             f"base_url=http://127.0.0.1:{server.port}/v1/completions,tokenizer_backend=tiktoken,model=gpt2,"
             "max_length=128", "--tasks", "colors", "--include_path", str(tmp_path), "--log_samples",
             "--output_path", str(tmp_path / "out")], capture_output=True, text=True, timeout=600,
            env={**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    samples = [json.loads(line) for path in (tmp_path / "out").rglob("samples_colors_*.jsonl")
               for line in path.read_text().splitlines()]
    assert len(samples) == len(docs)
    for sample in samples:
        for args, response in zip(sample["arguments"].values(), sample["resps"]):
            context, answer = encode(args["arg_0"]), encode(args["arg_1"])
            lp = forward_logprobs(model, context + answer)
            ids = context + answer
            assert float(response[0][0]) == sum(lp[i - 1, ids[i]].item() for i in range(len(context), len(ids)))
