"""Evaluate a model on the test split: loss, a response to every test entry, and scores.

    python eval.py --ckpt out/ckpt.pt
    python eval.py --ckpt out/ckpt.pt --limit 20 --max-new-tokens 64
    python eval.py --model gpt2 --data data/instruction-data.json --out out/gpt2-base
    python eval.py --ckpt out/ckpt.pt --judge llama3          # then score them with Llama 3 (Ollama)
    python eval.py --judge-only out/test-responses.json --judge llama3   # score a file, no model
    python eval.py --ckpt out/dpo/best.pt --reference out/sft/best.pt     # preference data: DPO metrics too

Rebuilds the split, prompt style, context length and loss masking the checkpoint was trained
with (--data, --prompt-style and --mask-instructions override theirs), reports the test and
validation loss over all their batches, then writes to OUT (the checkpoint's folder unless --out):
  test-responses.json  the test entries in file order, each with its model_response, as the
                       chapter's instruction-data-with-response.json
  eval.json            losses, scores (exact match, token F1; accuracy and per-label counts when
                       the outputs are short labels), generation settings and speed
With --judge MODEL an LLM judge (judge.py) then scores every response from 0 to 100, as the
chapter does: each record of test-responses.json gets its judge_score and judge_model, and
eval.json a "judge" summary. --judge-only FILE does only that, for FILE and the eval.json beside it.
On preference data (entries with "chosen" and "rejected") eval.json also gets "pairs": the share of
test pairs whose chosen response is the more likely, and with --reference CKPT (the model DPO
started from) their DPO loss, rewards, reward margin and reward accuracy.
"""
import argparse
import json
import math
import os
import re
import string
import sys
import time
import unicodedata
from collections import Counter

from torch.utils.data import DataLoader

from checkpoint import load_model_file
from common import AT_LEAST_1, POSITIVE, checked, duration, resolve_device, run_main, writable_folder, write_json
from data import batch_indices, check_same_data, decode, get_prompt_style, prepare_data, read_text
from dpo import check_preference_entries, test_pair_report
from model import calc_loss_loader
from generate import add_inference_args, decoding_settings, generate, hit_limit, load_for_inference
from judge import DEFAULT_TIMEOUT, DEFAULT_URL, check_server, check_url, judge_file, load_responses

MAX_LABELS, MAX_LABEL_WORDS = 20, 3  # outputs with fewer distinct values, this short, are labels

# ----------------------------------------------------------------------------- data and loss


def load_data(path, ckpt, style, context_length, mask_instructions):
    """The splits of `path` (default: the checkpoint's data) cut as the checkpoint's were. The
    data given must be the checkpoint's (by content, wherever it lies now)."""
    if path is None and ckpt.get("data") is not None:
        path = ckpt["data"]
        if not os.path.isfile(path):
            raise FileNotFoundError(f"the checkpoint was trained on {path}, which does not exist here; "
                                    "pass the data with --data PATH")
    if path is not None and path.endswith(".txt"):
        raise ValueError(f"{path} is raw text, which has no test split; eval.py needs instruction data (.json/.jsonl)")
    fractions = {key: ckpt[key] for key in ("train_frac", "test_frac") if key in ckpt}  # else data.py's defaults
    splits = prepare_data(path, style, context_length, mask_instructions, **fractions)
    check_same_data(splits, ckpt.get("data_fingerprint"), ckpt.get("data"))
    if not splits.test_entries:  # prepare_data refuses an empty test split unless test_frac is 0
        raise ValueError(f"{splits.path}: the test split is empty (test fraction 0); nothing to evaluate")
    return splits


def split_loss(model, dataset, collate_fn, batch_size, device, n=None):
    """Mean cross-entropy per counted target over the first n examples of dataset (all by
    default) in file order, batched as in training, and the number of targets counted."""
    batches = batch_indices(dataset.lengths[:n], batch_size, shuffle=False)
    return calc_loss_loader(model, DataLoader(dataset, batch_sampler=batches, collate_fn=collate_fn), device)


# ----------------------------------------------------------------------------- generation


def max_prompt_tokens(context_length, max_new_tokens):
    """How many tokens of a prompt are kept (its last ones): enough to leave room for
    max_new_tokens, but never less than half the context."""
    return context_length - min(max_new_tokens, context_length // 2)


def generate_responses(model, prompts, max_new_tokens, batch_size, **sampling):
    """The new token ids of each prompt, and whether each used its whole budget of
    min(max_new_tokens, context_length - prompt length + 1) tokens, so never reached
    end-of-text. Batches hold prompts of similar length, longest first (less left padding; a
    batch too big for memory fails at once); results come back in prompt order."""
    ctx = model.config.context_length
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    outputs, no_eot = [None] * len(prompts), [False] * len(prompts)
    start, n_tokens = time.perf_counter(), 0
    for first in range(0, len(order), batch_size):
        rows = order[first:first + batch_size]
        for i, ids in zip(rows, generate(model, [prompts[i] for i in rows], max_new_tokens, **sampling)):
            outputs[i], no_eot[i] = ids, hit_limit(prompts[i], ids, max_new_tokens, ctx)
            n_tokens += len(ids)
        done, elapsed = first + len(rows), time.perf_counter() - start
        left = elapsed / done * (len(prompts) - done)
        print(f"\rresponses {done}/{len(prompts)}, {n_tokens / elapsed:.0f} tokens/s, "
              f"{duration(left)} left ", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return outputs, no_eot


def template_markers(template):
    """The non-empty lines of a template's fixed text (before its placeholder), stripped."""
    return [line.strip() for line in template.split("{")[0].splitlines() if line.strip()]


def clean_response(text, style):
    """The response proper: stripped, without a response header the model repeated at its
    start, and cut where the model begins a new turn (any template line of the style, such as
    "### Instruction:" or "<|user|>")."""
    templates = get_prompt_style(style)
    text = text.strip()
    for header in template_markers(templates["response"]):
        text = text.removeprefix(header).strip()
    markers = [m for template in templates.values() for m in template_markers(template)]
    cut = min((text.find(m) for m in markers if m in text), default=len(text))
    return text[:cut].strip()


# ----------------------------------------------------------------------------- scores


def normalize_answer(text):
    """SQuAD's normalisation: lower-case, drop punctuation and the articles a/an/the, collapse spaces."""
    text = "".join(ch for ch in text.lower()
                   if ch not in string.punctuation and not unicodedata.category(ch).startswith("P"))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def exact_match(prediction, reference):
    return float(normalize_answer(prediction) == normalize_answer(reference))


def f1_score(prediction, reference):
    """F1 of the normalised words two texts share (counted with multiplicity), as SQuAD."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def label_names(references):
    """{normalised label: its first spelling} if the references are classification labels,
    else None. Labels: at most MAX_LABELS distinct values (after normalisation) of 1 to
    MAX_LABEL_WORDS words each, at least one of them repeated."""
    names = {}
    for ref in references:
        names.setdefault(normalize_answer(ref), ref.strip())
    if len(names) <= MAX_LABELS and len(names) < len(references) \
            and all(0 < len(label.split()) <= MAX_LABEL_WORDS for label in names):
        return names
    return None


def score_responses(references, responses):
    """Mean exact match and F1; for label data also the accuracy (= exact match) and
    {label: {"count": entries with it, "correct": of them answered exactly}}."""
    matches = [exact_match(p, r) for p, r in zip(responses, references)]
    scores = {"exact_match": sum(matches) / len(matches),
              "f1": sum(map(f1_score, responses, references)) / len(matches)}
    names = label_names(references)
    if names is not None:
        labels = {name: {"count": 0, "correct": 0} for name in sorted(names.values())}
        for ref, match in zip(references, matches):
            counts = labels[names[normalize_answer(ref)]]
            counts["count"] += 1
            counts["correct"] += int(match)
        scores.update(accuracy=scores["exact_match"], labels=labels)
    return scores


# ----------------------------------------------------------------------------- the judge


def check_judge_flags(p, args):
    """The judge's server address (None without --judge), once the judge flags make sense together."""
    given = [name for name in ("judge_url", "judge_workers", "judge_timeout", "judge_only")
             if getattr(args, name) is not None]
    if args.judge is None:
        if given:
            raise ValueError(f"--{given[0].replace('_', '-')} needs --judge MODEL")
        return None
    if args.judge_only is not None:
        others = [name for name, value in vars(args).items()
                  if not name.startswith("judge") and value != p.get_default(name)]
        if others:
            raise ValueError("--judge-only scores an existing file and loads no model: drop "
                             + ", ".join("--" + name.replace("_", "-") for name in others))
    return check_url(args.judge_url or DEFAULT_URL)


def read_report(path):
    """The eval.json at path ({} if there is none); ValueError if it is not a JSON object."""
    if not os.path.exists(path):
        return {}
    try:
        report = json.loads(read_text(path))
    except ValueError:
        report = None
    if not isinstance(report, dict):
        raise ValueError(f"{path} is not a JSON object as eval.py writes; move it away: the judge's summary goes there")
    return report


def judge_responses(responses_path, eval_path, report, args, url):
    """Score the responses file with the judge, and add its summary to eval.json (report)."""
    try:
        summary = judge_file(responses_path, args.judge, url, args.judge_workers or 1,
                             args.judge_timeout or DEFAULT_TIMEOUT)
    except (OSError, ValueError) as e:
        raise OSError(f"{e}; the scores so far are kept in {responses_path}, and a re-run with "
                      f"--judge-only {responses_path} asks only for the rest") from None
    report["judge"] = summary
    write_json(report, eval_path)
    mean = "no score" if summary["mean"] is None else f"mean score {summary['mean']:.2f}/100"
    print(f"judge {args.judge}: {mean} over {summary['scored']} responses; {summary['unparsed']} replies held "
          f"no score from 0 to 100; wrote {eval_path}")


def judge_only(args, url):
    """--judge-only FILE: score FILE, with the summary in the eval.json beside it (new, or updated)."""
    load_responses(args.judge_only)  # a missing or malformed file stops here, before any request
    eval_path = os.path.join(writable_folder(os.path.dirname(args.judge_only) or "."), "eval.json")
    judge_responses(args.judge_only, eval_path, read_report(eval_path), args, url)


# ----------------------------------------------------------------------------- main


def preference_report(model, splits, entries, style, context_length, ckpt, args, device):
    """eval.json's "pairs" on preference data (dpo.test_pair_report; beta and the log-prob mode of
    the DPO run evaluated, else the defaults), printed; None on other data."""
    if args.reference is None and not any("chosen" in entry for entry in splits.test_entries):
        return None
    check_preference_entries(splits.path, splits.train_entries + splits.test_entries + splits.val_entries)
    reference = None
    if args.reference is not None:
        reference = load_model_file(args.reference, context_length)[0].to(device).eval()
    run_args = ckpt.get("args", {}) if ckpt.get("args", {}).get("dpo") else {}
    report = test_pair_report(model, entries, style, context_length, args.batch_size, device, reference,
                              run_args.get("beta", 0.1), run_args.get("dpo_logprobs", "sum"))
    line = f"test pairs: chosen response more likely in {report['chosen_more_likely']:.1%}"
    if reference is not None:
        line += (f"; against {args.reference}: DPO loss {report['loss']:.4f}, reward margin "
                 f"{report['reward_margin']:.4f}, reward accuracy {report['reward_accuracy']:.1%}")
    print(line)
    return report


def finite_or_none(x):
    return x if math.isfinite(x) else None  # a loss with no counted target is NaN, which JSON lacks


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_inference_args(p)
    p.add_argument("--data", help="instruction data (.json/.jsonl); default: the checkpoint's, else the chapter's data set")
    p.add_argument("--mask-instructions", action=argparse.BooleanOptionalAction,
                   help="loss on the response only; default: as the checkpoint was trained (off for --model)")
    p.add_argument("--out", help="folder for test-responses.json and eval.json; default: the checkpoint's folder")
    p.add_argument("--limit", type=AT_LEAST_1, help="evaluate only the first N test entries (loss and responses)")
    p.add_argument("--batch-size", type=AT_LEAST_1, default=16, help="for the losses and for generation")
    p.add_argument("--reference", metavar="CKPT", help="preference data: the model DPO started from (a checkpoint "
                   "or model file), for the test pairs' DPO loss, reward margin and reward accuracy")
    p.add_argument("--judge", metavar="MODEL", type=checked(str, str.strip, "a model name"),
                   help="then score every response from 0 to 100 with this model on an LLM server, e.g. llama3")
    p.add_argument("--judge-url", metavar="URL", help=f"the judge's server: Ollama's address (default {DEFAULT_URL}), "
                   "or one ending in /v1 for an OpenAI-compatible server ($OPENAI_API_KEY is sent if set)")
    p.add_argument("--judge-workers", metavar="N", type=AT_LEAST_1, help="judge requests at a time (default 1)")
    p.add_argument("--judge-timeout", metavar="SECONDS", type=POSITIVE,
                   help=f"seconds to wait for the judge server to answer (default {DEFAULT_TIMEOUT:g})")
    p.add_argument("--judge-only", metavar="FILE", help="score FILE (responses eval.py wrote) with --judge and "
                   "load no model; the summary goes into the eval.json beside FILE")
    args = p.parse_args(argv)
    judge_url = check_judge_flags(p, args)
    if args.judge_only is not None:
        return judge_only(args, judge_url)
    if args.model is not None and args.ckpt is None and args.out is None:  # say so before any download
        raise ValueError("give --out DIR for the results of a --model run")
    if args.judge is not None:  # a judge that is not running is better known before the responses are made
        check_server(judge_url, args.judge, args.judge_timeout or DEFAULT_TIMEOUT)

    device = resolve_device(args.device)
    decoding = decoding_settings(args, device)
    out_dir = writable_folder(args.out or os.path.dirname(args.ckpt or "") or ".")  # before any work
    model, ckpt, style = load_for_inference(args.ckpt, args.model, args.prompt_style, device, args.quantize)
    ckpt = ckpt or {}
    context_length = ckpt.get("context_length") or model.config.context_length
    mask = ckpt.get("mask_instructions", False) if args.mask_instructions is None else args.mask_instructions
    splits = load_data(args.data, ckpt, style, context_length, mask)
    entries = splits.test_entries[:args.limit]
    print(f"data {splits.path}: {len(entries)} of {len(splits.test)} test entries, prompt style {style}, "
          f"context {context_length}, instructions {'masked' if mask else 'not masked'} in the loss")

    test_loss, n_targets = split_loss(model, splits.test, splits.collate_fn, args.batch_size, device, len(entries))
    val_loss, _ = split_loss(model, splits.val, splits.collate_fn, args.batch_size, device)
    print(f"test loss {test_loss:.4f} (perplexity {math.exp(test_loss):.2f}) over {n_targets} targets, "
          f"val loss {val_loss:.4f}")
    pairs = preference_report(model, splits, entries, style, context_length, ckpt, args, device)

    # the dataset tokenized prompt and response apart, so its first prompt_length ids are the prompt
    prompts = [ids[:n] for ids, n in zip(splits.test.token_ids, splits.test.prompt_lengths[:len(entries)])]
    keep = max_prompt_tokens(model.config.context_length, args.max_new_tokens)
    n_truncated = sum(len(ids) > keep for ids in prompts)
    prompts = [ids[-keep:] for ids in prompts]
    if n_truncated:
        print(f"{n_truncated} prompts longer than {keep} tokens were cut to their last {keep} "
              f"(context {model.config.context_length}, --max-new-tokens {args.max_new_tokens})")

    start = time.perf_counter()
    new_ids, no_eot = generate_responses(model, prompts, args.max_new_tokens, args.batch_size, **decoding)
    seconds = time.perf_counter() - start
    n_tokens = sum(map(len, new_ids))
    responses = [clean_response(decode(ids), style) for ids in new_ids]
    print(f"{len(responses)} responses, {n_tokens} tokens at {n_tokens / seconds:.0f} tokens/s")
    if any(no_eot):
        print(f"{sum(no_eot)} responses never reached end-of-text: cut at --max-new-tokens "
              f"{args.max_new_tokens} or at the end of the context")

    scores = score_responses([entry["output"] for entry in entries], responses)
    report = {
        **({"checkpoint": args.ckpt} if args.ckpt else {"model": args.model}),
        "data": splits.path, "prompt_style": style, "mask_instructions": mask, "context_length": context_length,
        "test_loss": finite_or_none(test_loss), "test_perplexity": finite_or_none(math.exp(test_loss)),
        "val_loss": finite_or_none(val_loss),
        "n_test_entries": len(splits.test), "n_evaluated": len(entries),
        "generation": {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
                       "top_k": args.top_k, "top_p": args.top_p, "num_beams": args.num_beams,
                       "length_penalty": args.length_penalty, "quantize": args.quantize,
                       "batch_size": args.batch_size, "seed": args.seed},
        "tokens_per_second": round(n_tokens / seconds, 1),
        "no_end_of_text": sum(no_eot), "truncated_prompts": n_truncated,
        **scores, **({"pairs": pairs} if pairs else {}),
    }
    summary = f"exact match {scores['exact_match']:.1%}, F1 {scores['f1']:.1%}"
    if "labels" in scores:
        summary += f"; outputs are labels, accuracy {scores['accuracy']:.1%}: " + ", ".join(
            f"{name} {c['correct']}/{c['count']}" for name, c in scores["labels"].items())
    print(summary)

    responses_path, eval_path = os.path.join(out_dir, "test-responses.json"), os.path.join(out_dir, "eval.json")
    write_json([{**entry, "model_response": r} for entry, r in zip(entries, responses)], responses_path)
    write_json(report, eval_path)
    print(f"wrote {responses_path} and {eval_path}")
    if args.judge is not None:  # after the responses are safe on disk
        judge_responses(responses_path, eval_path, report, args, judge_url)


if __name__ == "__main__":
    run_main(main)
