"""Generate responses with a KV cache, many prompts at once.

    python generate.py --ckpt out/ckpt.pt --prompt "Name three primary colors."
    python generate.py --ckpt out/ckpt.pt --interactive [--system "Answer briefly."]   # a chat
    python generate.py --model gpt2 --prompt-style alpaca --prompt "..." --temperature 0.7 --top-k 50
"""
import argparse
import collections
import hashlib
import itertools
import math
import os
import signal
import sys

import torch

from checkpoint import load_checkpoint, load_model_file, model_from_checkpoint, with_base
from common import AT_LEAST_1, NON_NEGATIVE, SEED, checked, plural, resolve_device, run_main, stop_on_interrupt
from data import EOT_ID, PROMPT_STYLES, check_vocab, decode, encode, encode_conversation, format_prompt, prompt_ids
from model import HF_REPOS, KVCache, PRESETS, build_model
from quantize import prepare_for_decoding

PAD_ID = 0  # left padding of a batch: any token every vocabulary has (padding is masked out of attention)


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


def prefill(model, prompts, max_new_tokens):
    """Left-pad the prompts into one batch and run it through a fresh KV cache: returns the
    logits of each prompt's last position, the cache, and each prompt's budget of new tokens."""
    ctx = model.config.context_length
    lengths = [len(p) for p in prompts]
    if not prompts or min(lengths) == 0:
        raise ValueError("every prompt needs at least one token")
    longest = max(lengths)
    if longest > ctx:
        raise ValueError(f"a prompt of {longest} tokens exceeds the context length {ctx}; truncate it first")
    device = model.wte.weight.device
    pad_lens = [longest - n for n in lengths]
    idx = torch.tensor([[PAD_ID] * pad + p for pad, p in zip(pad_lens, prompts)], device=device)
    # A row may make tokens until its own context is full; its last token is chosen but never
    # fed back, hence the + 1. Padding slots do not count against a row's context.
    budgets = [min(max_new_tokens, ctx - n + 1) for n in lengths]
    cache = KVCache(model.config, len(prompts), longest + max(budgets) - 1, device,
                    model.wte.weight.dtype, pad_lens)
    return model.forward_cached(idx, cache), cache, budgets


def row_generators(prompts, seed, device):
    """A random generator for each prompt, seeded from the seed, the prompt's tokens and the
    number of identical prompts before it in the list: a row draws the same random numbers
    whatever else is in the batch, and two copies of a prompt still get different samples."""
    copies, generators = collections.Counter(), []
    for prompt in prompts:
        tokens = " ".join(map(str, prompt))
        digest = hashlib.sha256(f"{seed} {copies[tokens]} {tokens}".encode()).digest()
        copies[tokens] += 1
        generators.append(torch.Generator(device).manual_seed(int.from_bytes(digest[:8], "little")))
    return generators


@torch.inference_mode()
def generate(model, prompts, max_new_tokens, temperature=0.0, top_k=None, top_p=None,
             eos_id=EOT_ID, seed=None, num_beams=1, length_penalty=1.0):
    """Continue each prompt (a list of token ids) by up to max_new_tokens, stopping a row at
    eos_id (None: never) or when the context is full. Returns the new ids of each row,
    without the eos. Prompts are left-padded into one batch; a row's result is the same as
    generating it alone, and finished rows leave the batch so they cost nothing more.
    Sampling (temperature > 0) with a seed draws each row from its own generator
    (row_generators), so a sampled row too is the same in any batch; without a seed all rows
    draw from torch's global generator. num_beams > 1 is beam search (see beam_search), which
    takes no sampling settings."""
    if num_beams < 1:
        raise ValueError(f"num_beams must be at least 1, got {num_beams}")
    if num_beams > 1 and (temperature > 0 or top_k is not None or top_p is not None):
        raise ValueError("beam search samples nothing: with num_beams > 1 leave temperature at 0 "
                         "and top_k, top_p unset")
    if max_new_tokens < 1:
        return [[] for _ in prompts]
    if num_beams > 1:
        return beam_search(model, prompts, max_new_tokens, num_beams, length_penalty, eos_id)
    outputs = [[] for _ in prompts]
    for new in stream(model, prompts, max_new_tokens, temperature, top_k, top_p, eos_id, seed):
        for row, token in new.items():
            outputs[row].append(token)
    return outputs


@torch.inference_mode()
def stream(model, prompts, max_new_tokens, temperature=0.0, top_k=None, top_p=None, eos_id=EOT_ID, seed=None):
    """generate()'s decoding loop, as a generator: after each step it yields {row: new token}
    for the rows of `prompts` that made one (a row's eos is not yielded; a finished row yields
    nothing more). The next step runs only when the caller asks for it, so a caller prints each
    token as soon as it is made, and stops generation by stopping to iterate. Collected, the
    tokens are generate()'s (greedy or sampled, same cache, same early stop)."""
    if max_new_tokens < 1:
        return
    logits, cache, budgets = prefill(model, prompts, max_new_tokens)
    generators = row_generators(prompts, seed, logits.device) if temperature > 0 and seed is not None else None
    counts = [0] * len(prompts)
    active = list(range(len(prompts)))  # original row of each batch row still generating
    while active:
        if generators is None:
            next_ids = sample_next(logits, temperature, top_k, top_p)
        else:  # a row at a time, each from its own generator
            next_ids = torch.cat([sample_next(logits[row:row + 1], temperature, top_k, top_p, generators[i])
                                  for row, i in enumerate(active)])
        new, keep = {}, []
        for row, token in enumerate(next_ids.tolist()):
            if token != eos_id:
                new[active[row]] = token
                counts[active[row]] += 1
                if counts[active[row]] < budgets[active[row]]:
                    keep.append(row)
        if new:
            yield new
        if len(keep) < len(active):  # drop finished rows from the batch and the cache
            cache.reorder(torch.tensor(keep, device=next_ids.device, dtype=torch.long))
            active = [active[row] for row in keep]
            next_ids = next_ids[keep]
        if active:
            logits = model.forward_cached(next_ids[:, None], cache)


def beam_search(model, prompts, max_new_tokens, num_beams, length_penalty=1.0, eos_id=EOT_ID):
    """Beam search: the new ids of each prompt (without the eos), as generate() returns them.

    Every prompt keeps num_beams open beams, ranked by their sum of token log-probabilities;
    all prompts' beams run as one batch through the KV cache, whose rows are reordered (never
    recomputed) as beams are chosen. Each step takes the 2 * num_beams best continuations of a
    prompt's beams: a continuation that is eos_id and among the first num_beams of them is a
    finished hypothesis, scored sum / length ** length_penalty (length counts the new tokens
    and the eos), and the num_beams best finished ones are kept; the best others are the next
    open beams. A prompt is done once it has num_beams finished hypotheses and no open beam
    can beat the worst of them, or at its budget of new tokens (max_new_tokens or a full
    context). "Can beat" uses a bound that is exact because log-probabilities are <= 0: an
    open beam's sum s can only fall, so its score is at most s / L ** length_penalty, with L
    its greatest possible final length (the budget) if length_penalty > 0 and its smallest
    (one more than now) otherwise. Returns each prompt's best finished hypothesis, or with
    none its best open beam. Done prompts leave the batch."""
    logits, cache, budgets = prefill(model, prompts, max_new_tokens)
    vocab = logits.size(-1)
    n_candidates = 2 * num_beams if eos_id is not None else num_beams
    active = list(range(len(prompts)))  # the prompt of each group of beams in the batch
    beams = [[(0.0, [])] for _ in prompts]  # each prompt's open beams (log-prob sum, tokens), a batch row each
    finished = [[] for _ in prompts]  # each prompt's best finished hypotheses (score, tokens), best first
    length = 0  # tokens in every open beam
    while active:
        length += 1
        per_prompt = len(beams[active[0]])  # 1 at the first step (after the prompt), then num_beams
        sums = torch.tensor([total for prompt in active for total, _ in beams[prompt]], device=logits.device)
        candidates = (sums[:, None] + torch.log_softmax(logits.float(), dim=-1)).view(len(active), -1)
        top_sums, top_ids = candidates.topk(min(n_candidates, candidates.size(1)), dim=-1)
        rows, next_ids, keep = [], [], []
        for i, prompt in enumerate(active):
            kept = []  # (parent beam, token, sum) of the next open beams, best first
            for rank, (flat, total) in enumerate(zip(top_ids[i].tolist(), top_sums[i].tolist())):
                parent, token = divmod(flat, vocab)
                if token == eos_id:
                    if rank < num_beams:
                        add_finished(finished[prompt], num_beams, total / length ** length_penalty,
                                     beams[prompt][parent][1])
                    continue
                kept.append((parent, token, total))
                if len(kept) == num_beams:
                    break
            # the best open beam bounds what any open beam can still score (see the docstring)
            final_length = budgets[prompt] if length_penalty > 0 else length + 1
            bound = kept[0][2] / final_length ** length_penalty
            kept = in_parent_rows(kept)
            beams[prompt] = [(total, beams[prompt][parent][1] + [token]) for parent, token, total in kept]
            if length < budgets[prompt] and (len(finished[prompt]) < num_beams or bound > finished[prompt][-1][0]):
                keep.append(prompt)
                rows += [i * per_prompt + parent for parent, _, _ in kept]
                next_ids += [token for _, token, _ in kept]
        active = keep
        if active:
            cache.reorder(torch.tensor(rows, device=logits.device))
            logits = model.forward_cached(torch.tensor(next_ids, device=logits.device)[:, None], cache)
    return [hyps[0][1] if hyps else max(open_beams)[1] for hyps, open_beams in zip(finished, beams)]


def in_parent_rows(kept):
    """The beams kept, (parent, token, sum) each, ordered so that as many as possible take their
    parent's row of the batch: reordering the KV cache then copies only the others."""
    rows, others = [None] * len(kept), []
    for beam in kept:
        if beam[0] < len(rows) and rows[beam[0]] is None:
            rows[beam[0]] = beam
        else:
            others.append(beam)
    return [beam or others.pop(0) for beam in rows]


def add_finished(hyps, num_beams, score, tokens):
    """Keep hyps, a list of (score, tokens) best first, at the num_beams best."""
    if len(hyps) < num_beams or score > hyps[-1][0]:
        hyps.append((score, tokens))
        hyps.sort(key=lambda h: -h[0])
        del hyps[num_beams:]


@torch.inference_mode()
def choice_logprobs(model, prompts, choices, eos_id=EOT_ID):
    """The log-probability of each choice (a list of token ids) followed by eos_id after each
    prompt: a list of floats per prompt, exactly what one forward pass over prompt + choice +
    eos gives. The prompts go through the model once (prefill); every choice then continues all
    of them from the KV cache, each written over the one before (the cache's position goes back
    to the prompts' end), so nothing is copied and no choice is padded."""
    if not choices or min(map(len, choices)) == 0:
        raise ValueError("every choice needs at least one token")
    width = max(map(len, choices))  # tokens fed after the prompt: the last one's logits score the eos
    ctx = model.config.context_length
    if max(map(len, prompts)) + width > ctx:
        raise ValueError(f"a prompt of {max(map(len, prompts))} tokens and a choice of {width} exceed the context "
                         f"length {ctx}; truncate the prompt first")
    logits, cache, _ = prefill(model, prompts, width + 1)
    first, prompts_end, totals = torch.log_softmax(logits.float(), dim=-1)[:, None], cache.pos, []
    for choice in choices:
        cache.pos = prompts_end
        ids = torch.tensor([choice] * len(prompts), device=logits.device)
        later = torch.log_softmax(model.forward_cached(ids, cache, all_positions=True).float(), dim=-1)
        logprobs = torch.cat([first, later], dim=1)  # (prompts, len(choice) + 1, vocab): each predicts the next
        targets = torch.tensor(choice + [eos_id], device=logits.device)
        totals.append(logprobs[:, torch.arange(len(targets)), targets].sum(dim=1))
    return torch.stack(totals, dim=1).tolist()


# ----------------------------------------------------------------------------- shared by the scripts


def load_for_inference(ckpt_path=None, model_name=None, prompt_style=None, device="cpu", quantize=None, base=None):
    """(model in eval mode on device, checkpoint dict or None, prompt style): a fine-tuned
    checkpoint from train.py (its prompt style unless overridden; a LoRA checkpoint's base
    looked for in the folder `base` if given), a base GPT-2 or a model file
    (checkpoint.load_model_file: as --model, the checkpoint dict is None), its weights
    prepared for decoding (quantize.prepare_for_decoding; quantize="int8": int8 weights)."""
    if (ckpt_path is None) == (model_name is None):
        raise ValueError("give exactly one of --ckpt (a train.py checkpoint) or --model (a GPT-2 name or folder)")
    if base is not None and ckpt_path is None:
        raise ValueError("--base goes with a LoRA --ckpt: the folder its base model moved to")
    if model_name in PRESETS and model_name not in HF_REPOS:
        raise ValueError(f"'{model_name}' is a preset without pretrained weights (train.py --init random uses it); "
                         f"give a --ckpt, a GPT-2 name ({', '.join(HF_REPOS)}) or a local folder")
    if ckpt_path is not None:
        ckpt = load_checkpoint(ckpt_path)
        if base is not None:
            ckpt = with_base(ckpt, base, ckpt_path)
        model, style = model_from_checkpoint(ckpt, ckpt_path), prompt_style or ckpt.get("prompt_style", "alpaca")
    elif os.path.isfile(model_name):
        model, file_style = load_model_file(model_name)
        ckpt, style = None, prompt_style or file_style or "alpaca"
    else:
        ckpt, model, style = None, build_model(model_name), prompt_style or "alpaca"
    if style not in PROMPT_STYLES:
        raise ValueError(f"unknown prompt style '{style}'; choose one of {', '.join(PROMPT_STYLES)}")
    check_vocab(model.config.vocab_size, ckpt_path or model_name)
    return prepare_for_decoding(model.to(device), quantize), ckpt, style


def hit_limit(prompt, new_ids, max_new_tokens, context_length):
    """True when generation stopped at max_new_tokens or the end of the context, not at end-of-text."""
    return len(new_ids) == min(max_new_tokens, context_length - len(prompt) + 1)


def respond(model, entries, prompt_style, max_new_tokens, **sampling):
    """The model's response text to each entry (an instruction, or a conversation: its next
    assistant turn), prompted in prompt_style."""
    prompts = [prompt_ids(entry, prompt_style) for entry in entries]
    return [decode(ids).strip() for ids in generate(model, prompts, max_new_tokens, **sampling)]


def add_model_args(p):
    """The flags of every script that loads a model for inference: which model, its prompt
    style, the device and int8 weights."""
    p.add_argument("--ckpt", help="a checkpoint written by train.py")
    p.add_argument("--model", help="instead of --ckpt: gpt2, gpt2-medium, gpt2-large, gpt2-xl, a local HF folder, "
                   "or a model file (the book's .pth state dict, nanoGPT's ckpt.pt)")
    p.add_argument("--base", metavar="FOLDER", help="a LoRA --ckpt: the folder its base model moved to "
                   "(checked against the checkpoint's fingerprint)")
    p.add_argument("--prompt-style", choices=list(PROMPT_STYLES), help="default: the checkpoint's, else alpaca")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--quantize", choices=["int8"], help="int8 weights for the block linears and the output head: "
                   "faster decoding on the CPU")


def add_inference_args(p):
    """The flags generate.py and eval.py share: the model's (add_model_args) and decoding's."""
    add_model_args(p)
    p.add_argument("--max-new-tokens", type=AT_LEAST_1, default=256)
    p.add_argument("--temperature", type=NON_NEGATIVE, default=0.0, help="0 is greedy")
    p.add_argument("--top-k", type=AT_LEAST_1, default=None, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=checked(float, lambda v: 0 < v <= 1, "in (0, 1]"), default=None,
                   help="sample among the most likely tokens that cover this probability")
    p.add_argument("--num-beams", type=AT_LEAST_1, default=1, help="beam search with this many beams; 1 is greedy")
    p.add_argument("--length-penalty", type=checked(float, math.isfinite, "a finite number"), default=1.0,
                   help="beam search: a finished hypothesis scores its log-probability / length ** this")
    p.add_argument("--seed", type=SEED, default=123,
                   help="random seed for sampling; a prompt's answer does not depend on the other prompts")


def decoding_settings(args):
    """generate()'s keyword arguments from the add_inference_args flags, checked before any work."""
    if args.num_beams > 1 and (args.temperature > 0 or args.top_k is not None or args.top_p is not None):
        raise ValueError("--num-beams above 1 is beam search, which samples nothing: "
                         "drop --temperature, --top-k and --top-p")
    return dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, num_beams=args.num_beams,
                length_penalty=args.length_penalty, seed=args.seed)


def headline(instruction, width=60):
    """The instruction on one line, cut to width characters: what marks its answer."""
    line = " ".join(instruction.split())
    return line if len(line) <= width else line[:width - 3] + "..."


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_inference_args(p)
    p.add_argument("--prompt", action="append", default=[], help="an instruction; repeat for a batch (each answer "
                   "then follows a line '==> i/n: instruction <==')")
    p.add_argument("--input", default="", help="optional input that goes with each instruction (--interactive too)")
    p.add_argument("--interactive", action="store_true", help="a chat: keeps the conversation, streams each reply")
    p.add_argument("--system", help="--interactive: a system message that starts the conversation")
    args = p.parse_args()
    if not args.prompt and not args.interactive:
        p.error("give --prompt TEXT (repeatable) or --interactive")
    if args.system is not None and not args.interactive:
        p.error("--system goes with --interactive")
    go_on = "start generate.py --interactive again to go on" if args.interactive else "run the command again"
    with stop_on_interrupt(f"the answers printed above are complete, nothing else was kept; {go_on}"):
        answer_all(args)


def answer_all(args):
    """Print the answers to the --prompt instructions, then those of the interactive loop."""
    device = resolve_device(args.device)
    sampling = decoding_settings(args)
    model, _, style = load_for_inference(args.ckpt, args.model, args.prompt_style, device, args.quantize, args.base)

    def answer(instructions, seed):
        """Print the response to each instruction (marked when there are several), with a note on
        stderr when it is empty or was cut."""
        prompts = [encode(format_prompt({"instruction": text, "input": args.input}, style)) for text in instructions]
        results = generate(model, prompts, args.max_new_tokens, **{**sampling, "seed": seed})
        for i, (instruction, prompt, ids) in enumerate(zip(instructions, prompts, results)):
            text = decode(ids).strip()
            if len(instructions) > 1:
                print(("\n" if i else "") + f"==> {i + 1}/{len(instructions)}: {headline(instruction)} <==")
            print(text, flush=True)
            if hit_limit(prompt, ids, args.max_new_tokens, model.config.context_length):
                print(f"(cut at {len(ids)} tokens: --max-new-tokens {args.max_new_tokens} or the end of the "
                      f"context of {model.config.context_length})", file=sys.stderr)
            elif not text:
                print("(empty response: the model ended it at once)", file=sys.stderr)

    if args.prompt:
        answer(args.prompt, args.seed)
    if args.interactive:
        chat(model, style, args, sampling)


# ----------------------------------------------------------------------------- the interactive chat


def fit_context(messages, style, context_length, reserve):
    """(messages, prompt ids, exchanges dropped): the conversation and the prompt of its next
    assistant turn, its oldest exchanges dropped (a system message stays) until the prompt
    leaves `reserve` tokens of the context for the reply. The last user turn alone may leave
    less (its reply is cut short); a ValueError when it does not fit at all."""
    system = messages[:1] if messages[0]["role"] == "system" else []
    turns, dropped = messages[len(system):], 0
    while True:
        ids = encode_conversation(system + turns, style)[0]
        if len(ids) + reserve <= context_length or len(turns) == 1:
            break
        turns, dropped = turns[2:], dropped + 1  # a user turn and the assistant's reply
    if len(ids) > context_length:
        raise ValueError(f"this message makes a prompt of {len(ids)} tokens, more than the context of "
                         f"{context_length}; write a shorter one")
    return system + turns, ids, dropped


def stream_reply(model, prompt, max_new_tokens, sampling):
    """Print the reply to `prompt` as it is made (a token at a time; beam search, which has no
    order of tokens until it ends, prints it whole). Ctrl-C stops the reply and keeps what was
    made. Returns (reply ids, whether Ctrl-C stopped it)."""
    stopped, ids, shown = [], [], ""
    previous = signal.signal(signal.SIGINT, lambda signum, frame: stopped.append(True))
    try:
        if sampling["num_beams"] > 1:
            steps = ({0: token} for token in generate(model, [prompt], max_new_tokens, **sampling)[0])
        else:
            steps = stream(model, [prompt], max_new_tokens, sampling["temperature"], sampling["top_k"],
                           sampling["top_p"], seed=sampling["seed"])
        for new in steps:
            ids.append(new[0])
            text = decode(ids).lstrip()
            if not text.endswith("\ufffd"):  # else a character's bytes are split across tokens: wait for the rest
                print(text[len(shown):], end="", flush=True)
                shown = text
            if stopped:
                break
    finally:
        signal.signal(signal.SIGINT, previous)
    print(flush=True)
    return ids, bool(stopped)


def chat(model, style, args, sampling):
    """The interactive chat: each line is a user turn, the reply streams as it is made, and the
    conversation is kept (its oldest exchanges dropped, with a note, when the context fills).
    /reset starts over; Ctrl-C stops a reply and the chat goes on; an empty line or Ctrl-D quits."""
    ctx = model.config.context_length
    reserve = min(args.max_new_tokens, ctx // 2)  # room kept for a reply
    start = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(start)
    with_input = "; each message gets --input as its input" if args.input else ""
    print(f"chat in prompt style {style}{with_input}; /reset starts over, Ctrl-C stops a reply, "
          "an empty line or Ctrl-D quits", file=sys.stderr)
    for turn in itertools.count():
        try:
            line = input("> ").strip()
        except EOFError:
            break
        if not line:
            break
        if line == "/reset":
            messages = list(start)
            print("(a new conversation)", file=sys.stderr)
            continue
        user = {"role": "user", "content": line, **({"input": args.input} if args.input else {})}
        try:
            messages, prompt, dropped = fit_context(messages + [user], style, ctx, reserve)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            continue
        if dropped:
            print(f"({plural(dropped, 'earlier exchange')} dropped from the conversation to fit the context of "
                  f"{ctx} tokens)", file=sys.stderr)
        # the n-th message samples with seed + n: asked again, it gets another sample
        ids, stopped = stream_reply(model, prompt, args.max_new_tokens, {**sampling, "seed": args.seed + turn})
        if stopped:
            print("(reply stopped)", file=sys.stderr)
        elif hit_limit(prompt, ids, args.max_new_tokens, ctx):
            print(f"(cut at {len(ids)} tokens: --max-new-tokens {args.max_new_tokens} or the end of the "
                  f"context of {ctx})", file=sys.stderr)
        messages.append({"role": "assistant", "content": decode(ids).strip()})


if __name__ == "__main__":
    run_main(main)
