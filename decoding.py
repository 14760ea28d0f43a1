"""Decoding with a KV cache, many prompts at once: the next token (greedy, or sampled with
temperature, top-k and top-p), generate() and its streaming form, beam search, the
log-probability of fixed answers (choice_logprobs), and the decoding flags the scripts share."""
import collections
import hashlib
import math

import torch

from common import AT_LEAST_1, NON_NEGATIVE, SEED, checked
from model import KVCache
from prompts import EOT_ID, GPT2, prompt_ids

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
             stop_ids=(EOT_ID,), seed=None, num_beams=1, length_penalty=1.0):
    """Continue each prompt (a list of token ids) by up to max_new_tokens, stopping a row at
    the first of stop_ids it makes (the tokenizer's end tokens; () never stops) or when the
    context is full. Returns the new ids of each row, without the stop token. Prompts are
    left-padded into one batch; a row's result is the same as generating it alone, and
    finished rows leave the batch so they cost nothing more.
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
        return beam_search(model, prompts, max_new_tokens, num_beams, length_penalty, stop_ids)
    outputs = [[] for _ in prompts]
    for new in stream(model, prompts, max_new_tokens, temperature, top_k, top_p, stop_ids, seed):
        for row, token in new.items():
            outputs[row].append(token)
    return outputs


@torch.inference_mode()
def stream(model, prompts, max_new_tokens, temperature=0.0, top_k=None, top_p=None, stop_ids=(EOT_ID,),
           seed=None):
    """generate()'s decoding loop, as a generator: after each step it yields {row: new token}
    for the rows of `prompts` that made one (a row's stop token is not yielded; a finished row yields
    nothing more). The next step runs only when the caller asks for it, so a caller prints each
    token as soon as it is made, and stops generation by stopping to iterate. Collected, the
    tokens are generate()'s (greedy or sampled, same cache, same early stop)."""
    if max_new_tokens < 1:
        return
    stops = frozenset(stop_ids)
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
            if token not in stops:
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


def beam_search(model, prompts, max_new_tokens, num_beams, length_penalty=1.0, stop_ids=(EOT_ID,)):
    """Beam search: the new ids of each prompt (without the stop token), as generate() returns them.

    Every prompt keeps num_beams open beams, ranked by their sum of token log-probabilities;
    all prompts' beams run as one batch through the KV cache, whose rows are reordered (never
    recomputed) as beams are chosen. Each step takes the (1 + len(stop_ids)) * num_beams best
    continuations of a prompt's beams (enough that num_beams of them are not stop tokens): a
    continuation that is a stop token and among the first num_beams of them is a finished
    hypothesis, scored sum / length ** length_penalty (length counts the new tokens and the
    stop token), and the num_beams best finished ones are kept; the best others are the next
    open beams. A prompt is done once it has num_beams finished hypotheses and no open beam
    can beat the worst of them, or at its budget of new tokens (max_new_tokens or a full
    context). "Can beat" uses a bound that is exact because log-probabilities are <= 0: an
    open beam's sum s can only fall, so its score is at most s / L ** length_penalty, with L
    its greatest possible final length (the budget) if length_penalty > 0 and its smallest
    (one more than now) otherwise. Returns each prompt's best finished hypothesis, or with
    none its best open beam. Done prompts leave the batch."""
    logits, cache, budgets = prefill(model, prompts, max_new_tokens)
    vocab = logits.size(-1)
    stops = frozenset(stop_ids)
    n_candidates = (1 + len(stops)) * num_beams
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
                if token in stops:
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
def choice_logprobs(model, prompts, choices, stop_ids=(EOT_ID,)):
    """The log-probability of each choice (a list of token ids) followed by a stop token after
    each prompt: a list of floats per prompt, exactly what one forward pass over prompt + choice
    gives for the choice's tokens, plus the log of the probability that a stop token follows
    (any of stop_ids: theirs add up; () scores the choice alone). The prompts go through the
    model once (prefill); every choice then continues all of them from the KV cache, each
    written over the one before (the cache's position goes back to the prompts' end), so
    nothing is copied and no choice is padded."""
    if not choices or min(map(len, choices)) == 0:
        raise ValueError("every choice needs at least one token")
    width = max(map(len, choices))  # tokens fed after the prompt: the last one's logits score the stop
    ctx = model.config.context_length
    if max(map(len, prompts)) + width > ctx:
        raise ValueError(f"a prompt of {max(map(len, prompts))} tokens and a choice of {width} exceed the context "
                         f"length {ctx}; truncate the prompt first")
    logits, cache, _ = prefill(model, prompts, width + 1)
    first, prompts_end, totals = torch.log_softmax(logits.float(), dim=-1)[:, None], cache.pos, []
    stops = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=logits.device)
    for choice in choices:
        cache.pos = prompts_end
        ids = torch.tensor([choice] * len(prompts), device=logits.device)
        later = torch.log_softmax(model.forward_cached(ids, cache, all_positions=True).float(), dim=-1)
        logprobs = torch.cat([first, later], dim=1)  # (prompts, len(choice) + 1, vocab): each predicts the next
        n = len(choice)
        total = logprobs[:, torch.arange(n), ids[0]].sum(dim=1)
        if len(stops):
            total = total + logprobs[:, n, stops].logsumexp(dim=-1)
        totals.append(total)
    return torch.stack(totals, dim=1).tolist()


def hit_limit(prompt, new_ids, max_new_tokens, context_length):
    """True when generation stopped at max_new_tokens or the end of the context, not at a stop token."""
    return len(new_ids) == min(max_new_tokens, context_length - len(prompt) + 1)


def respond(model, entries, prompt_style, max_new_tokens, tokenizer=GPT2, **sampling):
    """The model's response text to each entry (an instruction, or a conversation: its next
    assistant turn), prompted in prompt_style with the model's tokenizer, stopping at its stop ids."""
    prompts = [prompt_ids(entry, prompt_style, tokenizer) for entry in entries]
    sampling = {"stop_ids": tokenizer.stop_ids, **sampling}
    return [tokenizer.decode(ids).strip() for ids in generate(model, prompts, max_new_tokens, **sampling)]


class TextStream:
    """The text of tokens that arrive one at a time, as pieces: add(token) returns the text the
    token completes. Only the tokens since the last whole character are decoded again (the cost
    of a token does not grow with the text), and the bytes of a character split across tokens
    wait for the rest: while they are incomplete the decoded tail ends with U+FFFD. finish()
    returns what is left, an incomplete character as U+FFFD."""

    def __init__(self, tokenizer=GPT2):
        self.tokenizer = tokenizer
        self.tail, self.used = [], 0  # the tokens since a character boundary; the characters of theirs given out

    def add(self, token):
        self.tail.append(token)
        return self.take(last=False)

    def finish(self):
        return self.take(last=True)

    def take(self, last):
        text = self.tokenizer.decode(self.tail)
        complete = text if last else text.rstrip("\ufffd")  # the first bytes of a character still to come
        new, self.used = complete[self.used:], len(complete)
        if len(complete) == len(text):  # the tokens end on a character: decode from the next one on
            self.tail, self.used = [], 0
        return new


def add_decoding_args(p):
    """The decoding flags generate.py and eval.py share (the model's are checkpoint.add_model_args)."""
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
    """generate()'s keyword arguments from the add_decoding_args flags, checked before any work."""
    if args.num_beams > 1 and (args.temperature > 0 or args.top_k is not None or args.top_p is not None):
        raise ValueError("--num-beams above 1 is beam search, which samples nothing: "
                         "drop --temperature, --top-k and --top-p")
    return dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, num_beams=args.num_beams,
                length_penalty=args.length_penalty, seed=args.seed)
