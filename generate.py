"""Generate responses with a KV cache, many prompts at once.

    python generate.py --ckpt out/ckpt.pt --prompt "Name three primary colors."
    python generate.py --ckpt out/ckpt.pt --interactive
    python generate.py --model gpt2 --prompt-style alpaca --prompt "..." --temperature 0.7 --top-k 50
"""
import argparse
import sys

import torch

from data import AT_LEAST_1, EOT_ID, NON_NEGATIVE, PROMPT_STYLES, SEED, check_vocab, checked, decode, encode, \
    format_prompt, run_main
from model import HF_REPOS, PRESETS, KVCache, build_model, load_checkpoint, model_from_checkpoint, resolve_device


def sample_next(logits, temperature=0.0, top_k=None, top_p=None, generator=None):
    """Next token ids (B,) from last-position logits (B, vocab): greedy at temperature 0,
    otherwise sampled from the temperature-scaled distribution cut to top-k and/or top-p."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    candidates = None
    if top_k is not None and top_k < logits.size(-1):
        # sample among the k best only: cheaper than masking and sorting the whole vocabulary
        logits, candidates = torch.topk(logits, top_k, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens more likely than it already cover top_p
        drop = probs.cumsum(dim=-1) - probs > top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = torch.softmax(logits, dim=-1)
    choice = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return choice if candidates is None else candidates.gather(-1, choice[:, None]).squeeze(-1)


@torch.inference_mode()
def generate(model, prompts, max_new_tokens, temperature=0.0, top_k=None, top_p=None,
             eos_id=EOT_ID, generator=None):
    """Continue each prompt (a list of token ids) by up to max_new_tokens, stopping a row at
    eos_id (None: never) or when the context is full. Returns the new ids of each row,
    without the eos. Prompts are left-padded into one batch; a row's result is the same as
    generating it alone, and finished rows leave the batch so they cost nothing more."""
    ctx = model.config.context_length
    lengths = [len(p) for p in prompts]
    if max_new_tokens < 1:
        return [[] for _ in prompts]
    if not prompts or min(lengths) == 0:
        raise ValueError("every prompt needs at least one token")
    longest = max(lengths)
    if longest > ctx:
        raise ValueError(f"a prompt of {longest} tokens exceeds the context length {ctx}; truncate it first")
    device = model.wte.weight.device
    pad_lens = [longest - n for n in lengths]
    idx = torch.tensor([[EOT_ID] * pad + p for pad, p in zip(pad_lens, prompts)], device=device)
    # A row may make tokens until its own context is full; its last token is sampled but never
    # fed back, hence the + 1. Padding slots do not count against a row's context.
    budgets = [min(max_new_tokens, ctx - n + 1) for n in lengths]
    cache = KVCache(model.config, len(prompts), longest + max(budgets) - 1, device,
                    model.wte.weight.dtype, pad_lens)

    outputs = [[] for _ in prompts]
    active = list(range(len(prompts)))  # original row of each batch row still generating
    logits = model.forward_cached(idx, cache)
    while active:
        next_ids = sample_next(logits, temperature, top_k, top_p, generator)
        keep = []
        for row, token in enumerate(next_ids.tolist()):
            out = outputs[active[row]]
            if token != eos_id:
                out.append(token)
                if len(out) < budgets[active[row]]:
                    keep.append(row)
        if len(keep) < len(active):  # drop finished rows from the batch and the cache
            cache.reorder(torch.tensor(keep, device=device, dtype=torch.long))
            active = [active[row] for row in keep]
            next_ids = next_ids[keep]
        if active:
            logits = model.forward_cached(next_ids[:, None], cache)
    return outputs


# ----------------------------------------------------------------------------- shared by the scripts


def load_for_inference(ckpt_path=None, model_name=None, prompt_style=None, device="cpu"):
    """(model in eval mode on device, checkpoint dict or None, prompt style): a fine-tuned
    checkpoint from train.py (its prompt style unless overridden) or a base GPT-2."""
    if (ckpt_path is None) == (model_name is None):
        raise ValueError("give exactly one of --ckpt (a train.py checkpoint) or --model (a GPT-2 name or folder)")
    if model_name in PRESETS and model_name not in HF_REPOS:
        raise ValueError(f"'{model_name}' is a preset without pretrained weights (train.py --init random uses it); "
                         f"give a --ckpt, a GPT-2 name ({', '.join(HF_REPOS)}) or a local folder")
    if ckpt_path is not None:
        ckpt = load_checkpoint(ckpt_path)
        model, style = model_from_checkpoint(ckpt, ckpt_path), prompt_style or ckpt.get("prompt_style", "alpaca")
    else:
        ckpt, model, style = None, build_model(model_name), prompt_style or "alpaca"
    if style not in PROMPT_STYLES:
        raise ValueError(f"unknown prompt style '{style}'; choose one of {', '.join(PROMPT_STYLES)}")
    check_vocab(model.config.vocab_size, ckpt_path or model_name)
    return model.to(device).eval(), ckpt, style


def hit_limit(prompt, new_ids, max_new_tokens, context_length):
    """True when generation stopped at max_new_tokens or the end of the context, not at end-of-text."""
    return len(new_ids) == min(max_new_tokens, context_length - len(prompt) + 1)


def respond(model, entries, prompt_style, max_new_tokens, **sampling):
    """The model's response text to each instruction entry, prompted in prompt_style."""
    prompts = [encode(format_prompt(entry, prompt_style)) for entry in entries]
    return [decode(ids).strip() for ids in generate(model, prompts, max_new_tokens, **sampling)]


def add_inference_args(p):
    """The flags generate.py and eval.py share: which model, its prompt style, sampling, device."""
    p.add_argument("--ckpt", help="a checkpoint written by train.py")
    p.add_argument("--model", help="instead of --ckpt: gpt2, gpt2-medium, gpt2-large, gpt2-xl or a local HF folder")
    p.add_argument("--prompt-style", choices=list(PROMPT_STYLES), help="default: the checkpoint's, else alpaca")
    p.add_argument("--max-new-tokens", type=AT_LEAST_1, default=256)
    p.add_argument("--temperature", type=NON_NEGATIVE, default=0.0, help="0 is greedy")
    p.add_argument("--top-k", type=AT_LEAST_1, default=None, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=checked(float, lambda v: 0 < v <= 1, "in (0, 1]"), default=None,
                   help="sample among the most likely tokens that cover this probability")
    p.add_argument("--seed", type=SEED, default=123, help="random seed for sampling")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_inference_args(p)
    p.add_argument("--prompt", action="append", default=[], help="an instruction; repeat for a batch")
    p.add_argument("--input", default="", help="optional input that goes with the instruction")
    p.add_argument("--interactive", action="store_true", help="read instructions from a prompt loop")
    args = p.parse_args()
    if not args.prompt and not args.interactive:
        p.error("give --prompt TEXT (repeatable) or --interactive")

    device = resolve_device(args.device)
    model, _, style = load_for_inference(args.ckpt, args.model, args.prompt_style, device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, generator=generator)

    def answer(instructions, input_text=""):
        """Print the response to each instruction, with a note on stderr when it is empty or was cut."""
        prompts = [encode(format_prompt({"instruction": text, "input": input_text}, style)) for text in instructions]
        for i, (prompt, ids) in enumerate(zip(prompts, generate(model, prompts, args.max_new_tokens, **sampling))):
            text = decode(ids).strip()
            print(("\n" if i else "") + text, flush=True)
            if hit_limit(prompt, ids, args.max_new_tokens, model.config.context_length):
                print(f"(cut at {len(ids)} tokens: --max-new-tokens {args.max_new_tokens} or the end of the "
                      f"context of {model.config.context_length})", file=sys.stderr)
            elif not text:
                print("(empty response: the model ended it at once)", file=sys.stderr)

    if args.prompt:
        answer(args.prompt, args.input)
    if args.interactive:
        print(f"prompt style {style}; an empty line or Ctrl-D quits", file=sys.stderr)
        while True:
            try:
                instruction = input("> ").strip()
            except (EOFError, KeyboardInterrupt):
                break
            if not instruction:
                break
            try:
                answer([instruction])
            except ValueError as e:  # a prompt longer than the context: say so, and go on
                print(f"error: {e}", file=sys.stderr)


if __name__ == "__main__":
    run_main(main)
