"""Evaluate a model on the test split: loss, a response to every test entry, and scores.

    python eval.py --ckpt out/ckpt.pt
    python eval.py --ckpt out/ckpt.pt --limit 20 --max-new-tokens 64 --out out/quick
    python eval.py --model gpt2 --data data/instruction-data.json --out out/gpt2-base
    python eval.py --ckpt out/ckpt.pt --data other.json --out out/other     # the checkpoint on other data
    python eval.py --ckpt out/dpo/best.pt --reference out/sft/best.pt     # preference data: DPO metrics too
    python eval.py --ckpt out/ckpt.pt --choices World,Sports,Business,Sci/Tech   # classify: the likeliest answer
    python judge.py out/test-responses.json --judge llama3   # then: Llama 3 (Ollama) scores the responses

The model's own tokenizer (GPT-2's, a model folder's, or the one a checkpoint was trained with)
tokenizes the data and decodes the responses, and generation stops at any of its end tokens.
Rebuilds the split, prompt style, context length and loss masking the checkpoint was trained
with (--data, --split, --prompt-style and --mask-instructions override theirs), reports the
test and validation loss over all their batches, then writes to OUT (the checkpoint's folder
unless --out):
  test-responses.json  the test entries in file order, each with its model_response (cleaned of
                       template lines the model went on with), as the chapter's
                       instruction-data-with-response.json, its raw_response (the text as
                       generated) and no_end_of_text (true when cut at the token budget)
  eval.json            the evaluation (weights, data, settings), losses, scores (exact match,
                       token F1; accuracy and per-label counts when the outputs are short
                       labels), generation settings and speed
The responses are written as each batch finishes. The same command run again continues from
the responses made before (a Ctrl-C or a crash costs one batch); results of another evaluation
(other weights, data, --limit or decoding settings) are never replaced: eval.py refuses before
any work unless --out points elsewhere or --force replaces them (--force never discards this
evaluation's own results: run again, with or without it, the same command continues them).
One run at a time writes in OUT: an eval.py or train.py already at work there is named, and
this one refused. --data OTHER evaluates a checkpoint on OTHER's test split (cut at the
checkpoint's fractions unless --split), saying so when it is not the data it was trained on;
eval.json's "data" and "data_sha256" record the data evaluated. A checkpoint trained on raw
text (.txt) gets its validation loss and perplexity in eval.json, and no responses.
With --choices A,B,... nothing is generated: each entry's response is the answer whose tokens
and end-of-text are likeliest after its prompt; each record gets choice_logprobs, and eval.json
choice_scores (accuracy, macro-F1, per-label precision, recall and F1, the confusion matrix).
On preference data (entries with "chosen" and "rejected") eval.json also gets "pairs": the share of
test pairs whose chosen response is the more likely, and with --reference CKPT (the model DPO
started from) their DPO loss, rewards, reward margin and reward accuracy.
Scores from an LLM judge, as the chapter's second step, are judge.py's: it scores
test-responses.json and adds its summary to eval.json, which a re-run of eval.py keeps.
"""
import common  # noqa: F401  (first: Ctrl-C while torch loads is one line, see common.py)
import argparse
import dataclasses
import math
import os
import re
import signal
import string
import sys
import time
import unicodedata
from collections import Counter
from typing import Optional

from torch.utils.data import DataLoader

from checkpoint import (TrainedWith, add_model_args, check_model_args, load_checkpoint, load_for_inference,
    load_model_file, model_file_settings, start_tokenizer)
from common import (AT_LEAST_1, Progress, check_writable_folder, hold_folder, plural, resolve_device, run_main,
    write_json)
from data import DataSplits, batch_indices, check_preference_entries, check_same_data, prepare_data, split_fractions
from decoding import add_decoding_args, choice_logprobs, decoding_settings, generate, hit_limit
from dpo import pair_report
from model import GPT, calc_loss_loader, weights_fingerprint
from prompts import CHAT_TEMPLATE, GPT2, dated, entry_output, get_prompt_style
from results import RESPONSES, SUMMARY, load_responses, read_summary

MAX_LABELS, MAX_LABEL_WORDS = 20, 3  # outputs with fewer distinct values, this short, are labels


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    add_decoding_args(p)
    p.add_argument("--data", help="instruction data (.json/.jsonl), or the raw text (.txt) of a checkpoint trained "
                   "on one; default: the checkpoint's, else the chapter's data set. Other data than the "
                   "checkpoint's is evaluated on its own test split")
    p.add_argument("--mask-instructions", action=argparse.BooleanOptionalAction,
                   help="loss on the response only; default: as the checkpoint was trained (off for --model)")
    p.add_argument("--out", help=f"folder for {RESPONSES} and {SUMMARY}; default: the checkpoint's folder")
    p.add_argument("--force", action="store_true", help="replace the results of another evaluation in --out (else "
                   "refused); this evaluation's own are continued all the same")
    p.add_argument("--limit", type=AT_LEAST_1, help="evaluate only the first N test entries (loss and responses)")
    p.add_argument("--batch-size", type=AT_LEAST_1, default=16, help="for the losses and for generation")
    p.add_argument("--reference", metavar="CKPT", help="preference data: the model DPO started from (a checkpoint "
                   "or model file), for the test pairs' DPO loss, reward margin and reward accuracy")
    p.add_argument("--split", metavar="TRAIN,TEST", type=split_fractions,
                   help="the train and test fractions of the data, the rest validation; default: the checkpoint's, "
                   "else 0.85,0.10")
    p.add_argument("--choices", metavar="A,B,...", type=parse_choices,
                   help="classify instead of generating: the answer is the choice (then end-of-text) the model finds "
                   "likeliest; 'auto': the training split's outputs, when they are labels")
    p.add_argument("--choice-norm", action="store_true", help="--choices: rank by log-probability per character of "
                   "the choice (lm-evaluation-harness's acc_norm), not by log-probability")
    return p, p.parse_args(argv)


def main(argv=None):
    p, args = parse_args(argv)
    sigterm = signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops as Ctrl-C does
    try:
        return evaluate(p, args)
    except Interrupted as e:
        print(f"interrupted: {e}")
    except KeyboardInterrupt:
        print("interrupted: the files written so far are kept; run the same command again to go on")
    finally:
        signal.signal(signal.SIGTERM, sigterm)
    sys.exit(130)


def evaluate(p, args):
    """The evaluation in its order: load, the losses, the responses (or --choices), their scores;
    each written as soon as it is known, so that the same command continues an interrupted run."""
    check_flags(p, args)
    device = resolve_device(args.device)
    decoding = decoding_settings(args)
    out_dir = output_folder(args)
    # held to the end: one run at a time writes in out_dir (a refused run leaves no new folder)
    with hold_folder(out_dir, "eval.py"):
        run = load(args, device, out_dir)
        if run.splits.kind == "text":
            return evaluate_text(p, run)
        earlier, records = earlier_results(run.eval_path, run.responses_path, run.identity, run.entries, args.force)
        records = records or [{**entry, "model_response": None} for entry in run.entries]
        made = sum(r["model_response"] is not None for r in records)
        if made:
            print(f"continuing the evaluation in {out_dir}: {made} of {plural(len(records), 'response')} were made "
                  "before")
        losses = test_losses(run, earlier, made)
        prompts, n_truncated = test_prompts(run)
        # the responses file first: an eval.json of this evaluation never stands beside another's responses
        report = {**run.source, "data": run.splits.path, **run.identity, **losses,
                  "n_test_entries": len(run.splits.test), **({"judge": earlier["judge"]} if "judge" in earlier else {})}
        write_json(records, run.responses_path)
        write_json(report, run.eval_path)
        if run.choices:
            scores = choose(run, prompts, records, earlier)
        else:
            scores = respond(run, prompts, records, earlier, decoding, n_truncated)
        write_report(report, run.eval_path, scores)
        print(f"wrote {run.responses_path} and {run.eval_path}")


def check_flags(p, args):
    """ValueError, before any work, for flags that do not go together."""
    check_model_args(args.ckpt, args.model, args.base)
    if args.out == "":
        raise ValueError(f"--out is empty; give the folder for {RESPONSES} and {SUMMARY}")
    if args.model is not None and args.ckpt is None and args.out is None:  # say so before any download
        raise ValueError("give --out DIR for the results of a --model run")
    if args.choices is None and args.choice_norm:
        raise ValueError("--choice-norm goes with --choices")
    needless = changed_flags(p, args, ["max_new_tokens", "temperature", "top_k", "top_p", "num_beams",
                                       "length_penalty", "seed"])
    if args.choices is not None and needless:
        raise ValueError(f"--choices scores fixed answers and generates nothing: drop {', '.join(needless)}")


def changed_flags(p, args, names):
    """The flags among `names` (argparse dests) given a value other than their default."""
    return ["--" + name.replace("_", "-") for name in names if getattr(args, name) != p.get_default(name)]


def output_folder(args):
    """--out, or the checkpoint's folder, checked to be a folder this process can write in or create."""
    if args.out is not None:
        return check_writable_folder(args.out)
    if args.ckpt is not None and not os.path.isfile(args.ckpt):
        load_checkpoint(args.ckpt)  # says what is wrong with it, before its folder is used
    return check_writable_folder(os.path.dirname(args.ckpt or "") or ".")


class Interrupted(Exception):
    """Ctrl-C or SIGTERM, with what was kept and how to go on."""


# ----------------------------------------------------------------------------- the model and its data


@dataclasses.dataclass
class Evaluation:
    """One evaluation: what it evaluates, on which entries, what decides its results, and its files."""
    args: argparse.Namespace
    model: GPT
    device: object
    trained: TrainedWith
    style: str
    tokenizer: object  # the model's (prompts.py's GPT2 or an HFTokenizer), from load_for_inference
    context_length: int
    splits: DataSplits
    out_dir: str
    source: dict  # {"checkpoint": path} or {"model": name}, as eval.json records it
    identity: dict  # what decides the results, as eval.json records it (see IDENTITY)
    entries: Optional[list] = None  # the test entries evaluated (--limit); None for raw text
    choices: Optional[list] = None  # the answers of --choices

    @property
    def responses_path(self):
        return os.path.join(self.out_dir, RESPONSES)

    @property
    def eval_path(self):
        return os.path.join(self.out_dir, SUMMARY)


def load(args, device, out_dir):
    """The Evaluation of args: the model, its data cut as in training, the test entries and
    answers evaluated, and what decides the results."""
    model, trained, style, tokenizer = load_for_inference(args.ckpt, args.model, args.prompt_style, device,
                                                          args.quantize, args.base)
    context_length = trained.context_length or model.config.context_length
    mask = trained.mask_instructions if args.mask_instructions is None else args.mask_instructions
    splits = load_data(args.data, trained, style, context_length, mask, args.split, tokenizer)
    if args.reference is not None and splits.kind != "text":  # bad data, or a reference that does not fit, before work
        check_preference_entries(splits.path, splits.train_entries + splits.test_entries + splits.val_entries)
        check_reference(args.reference, context_length, tokenizer)
    run = Evaluation(args, model, device, trained, style, tokenizer, context_length, splits, out_dir,
                     source={"checkpoint": args.ckpt} if args.ckpt else {"model": args.model},
                     identity={"weights_sha256": weights_fingerprint(model.state_dict().items()),
                               "data_sha256": splits.fingerprint["sha256"], "context_length": context_length})
    if splits.kind == "text":
        return run
    run.entries = splits.test_entries[:args.limit]
    run.choices = args.choices and resolve_choices(args.choices, [entry_output(e) for e in splits.train_entries])
    print(f"data {splits.path}: {len(run.entries)} of {len(splits.test)} test entries, prompt style {style}, "
          f"context {context_length}, instructions {'masked' if mask else 'not masked'} in the loss")
    run.identity.update(prompt_style=style, mask_instructions=mask, n_evaluated=len(run.entries), generation={
        "max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_k": args.top_k,
        "top_p": args.top_p, "num_beams": args.num_beams, "length_penalty": args.length_penalty,
        "quantize": args.quantize, "batch_size": args.batch_size, "seed": args.seed,
        "choices": ",".join(run.choices) if run.choices else None,
        "choice_norm": args.choice_norm if run.choices else None})
    if args.reference is not None:  # the DPO metrics of the test pairs are against it
        run.identity["reference"] = args.reference
    return run


def load_data(path, trained, style, context_length, mask_instructions, split=None, tokenizer=GPT2):
    """The splits of `path` (default: the checkpoint's data), tokenized by the model's tokenizer,
    cut as the checkpoint's were, or at the (train, test) fractions `split`. The checkpoint's
    own data is recognised by its content, wherever it lies now; other data given with --data
    is evaluated on its own test split, with a note. trained: the checkpoint's TrainedWith."""
    given = path is not None
    if not given and trained.data is not None:
        path = trained.data
        if not os.path.isfile(path):
            raise FileNotFoundError(f"the checkpoint was trained on {path}, which does not exist here; "
                                    "pass the data with --data PATH")
    with dated(trained.template_date):  # the test split as training rendered it (Llama 3.2's date)
        splits = prepare_data(path, style, context_length, mask_instructions, *(split or trained.split or ()),
                              tokenizer=tokenizer)
    if given and trained.data_fingerprint not in (None, splits.fingerprint):
        print(f"note: {splits.path} is not the data the checkpoint was trained on ({trained.data}); "
              "evaluating on its test split")
    else:
        try:
            check_same_data(splits, trained.data_fingerprint, trained.data)
        except ValueError as e:  # the checkpoint's own file, changed since
            raise ValueError(f"{e}; to evaluate on it as it is now, give --data {splits.path}") from None
        if split is not None and trained.split and tuple(trained.split) != split:
            print(f"warning: the checkpoint was trained on the split {trained.split[0]},{trained.split[1]}; the test "
                  f"entries of --split {split[0]},{split[1]} may include entries it was trained on")
    if splits.kind == "instruction" and not splits.test_entries:  # refused by prepare_data unless test_frac is 0
        raise ValueError(f"{splits.path}: the test split is empty (test fraction 0); nothing to evaluate")
    return splits


def check_reference(path, context_length, tokenizer):
    """One sentence, before any work, for a --reference model file that is missing, is no model
    file, has a shorter context than the model evaluated or another tokenizer (its log-probabilities
    are compared with the model's over the same tokens)."""
    try:
        settings = model_file_settings(path)
        theirs = start_tokenizer(path)
    except (OSError, ValueError) as e:
        raise type(e)(f"--reference: {e}") from None
    if settings["context_length"] < context_length:
        raise ValueError(f"--reference {path} has a context of {settings['context_length']} tokens, shorter than the "
                         f"{context_length} of the model evaluated; give the model DPO started from")
    vocabulary = [(state["kind"], state.get("tokenizer_json")) for state in (theirs.state(), tokenizer.state())]
    if vocabulary[0] != vocabulary[1]:
        raise ValueError(f"--reference {path} has another tokenizer ({theirs.name}'s) than the model evaluated "
                         f"({tokenizer.name}'s), so their log-probabilities are not of the same tokens; give the "
                         "model DPO started from")


# ----------------------------------------------------------------------------- losses


def test_losses(run, earlier, made):
    """eval.json's test and validation losses (and "pairs" on preference data): those of the
    earlier run of this evaluation, or computed now. made: the responses made before."""
    keys = ("test_loss", "test_perplexity", "val_loss")
    if all(key in earlier for key in keys):
        losses = {key: earlier[key] for key in (*keys, "pairs") if key in earlier}
        print(f"{loss_text('test', losses['test_loss'])}, {loss_text('val', losses['val_loss'])}: "
              "from the earlier run")
        return losses
    splits, batch_size = run.splits, run.args.batch_size
    try:
        test_loss, n_targets = split_loss(run.model, splits.test, splits.collate_fn, batch_size, run.device,
                                          len(run.entries), "test loss")
        val_loss, _ = split_loss(run.model, splits.val, splits.collate_fn, batch_size, run.device, what="val loss")
        pairs = preference_report(run)
    except KeyboardInterrupt:
        kept = f"{run.responses_path} keeps the {plural(made, 'response')} made before" if made else \
            "nothing was written"
        raise Interrupted(f"{kept}; run the same command again") from None
    print(f"{loss_text('test', finite_or_none(test_loss))} over {plural(n_targets, 'target')}, "
          f"{loss_text('val', finite_or_none(val_loss))}")
    return {"test_loss": finite_or_none(test_loss), "test_perplexity": finite_or_none(math.exp(test_loss)),
            "val_loss": finite_or_none(val_loss), **({"pairs": pairs} if pairs else {})}


def preference_report(run):
    """eval.json's "pairs" on preference data (dpo.pair_report; beta and the log-prob mode of
    the DPO run evaluated, else the defaults), printed; None on other data."""
    args, splits = run.args, run.splits
    if args.reference is None and not any("chosen" in entry for entry in splits.test_entries):
        return None
    check_preference_entries(splits.path, splits.train_entries + splits.test_entries + splits.val_entries)
    reference = None
    if args.reference is not None:
        reference = load_model_file(args.reference, run.context_length)[0].to(run.device).eval()
    dpo = run.trained.dpo or {"beta": 0.1, "logprobs": "sum"}
    report = pair_report(run.model, run.entries, run.style, run.context_length, args.batch_size, run.device,
                         reference, dpo["beta"], dpo["logprobs"], tokenizer=run.tokenizer)
    line = f"test pairs: chosen response more likely in {report['chosen_more_likely']:.1%}"
    if reference is not None:
        line += (f"; against {args.reference}: DPO loss {report['loss']:.4f}, reward margin "
                 f"{report['reward_margin']:.4f}, reward accuracy {report['reward_accuracy']:.1%}")
    print(line)
    return report


def split_loss(model, dataset, collate_fn, batch_size, device, n=None, what="loss"):
    """Mean cross-entropy per counted target over the first n examples of dataset (all by
    default) in file order, batched as in training, and the number of targets counted; with
    a progress line named `what`."""
    batches = batch_indices(dataset.lengths[:n], batch_size, shuffle=False)
    loader = DataLoader(dataset, batch_sampler=batches, collate_fn=collate_fn)
    with Progress(f"{what}: batch", len(batches)) as progress:
        return calc_loss_loader(model, counted(loader, progress.update), device)


def counted(items, update):
    """The items, calling update(number done) after each is used."""
    for done, item in enumerate(items, 1):
        yield item
        update(done)


def finite_or_none(x):
    return x if math.isfinite(x) else None  # a loss with no counted target is NaN, which JSON lacks


def loss_text(name, loss):
    return f"{name} loss {loss:.4f} (perplexity {math.exp(loss):.2f})" if loss is not None else f"{name} loss n/a"


def evaluate_text(p, run):
    """A checkpoint trained on raw text: its validation loss and perplexity, in eval.json."""
    args, splits = run.args, run.splits
    needless = changed_flags(p, args, ["limit", "max_new_tokens", "temperature", "top_k", "top_p", "num_beams",
                                       "length_penalty", "seed", "split", "choices"])
    if needless:
        raise ValueError(f"{splits.path} is raw text, with no test entries to respond to: eval.py reports its "
                         f"validation loss and perplexity only; drop {', '.join(needless)}")
    earlier_results(run.eval_path, None, run.identity, None, args.force)
    print(f"text data {splits.path}: {plural(len(splits.val), 'validation window')} of {run.context_length} tokens")
    try:
        val_loss, n_targets = split_loss(run.model, splits.val, splits.collate_fn, args.batch_size, run.device,
                                         what="val loss")
    except KeyboardInterrupt:
        raise Interrupted("nothing was written; run the same command again") from None
    print(f"{loss_text('val', finite_or_none(val_loss))} over {plural(n_targets, 'target')}")
    write_json({**run.source, "data": splits.path, **run.identity, "val_loss": finite_or_none(val_loss),
                "val_perplexity": finite_or_none(math.exp(val_loss)), "n_val_windows": len(splits.val)},
               run.eval_path)
    print(f"wrote {run.eval_path}")


# ----------------------------------------------------------------------------- responses


def test_prompts(run):
    """(prompt ids of the entries evaluated, how many were cut): each prompt is cut to its last
    tokens where it leaves too little room in the context for its response (or the longest
    choice), with a line saying so."""
    ctx = run.model.config.context_length
    # the dataset tokenized prompt and response apart, so its first prompt_length ids are the prompt
    prompts = [ids[:n] for ids, n in zip(run.splits.test.token_ids, run.splits.test.prompt_lengths[:len(run.entries)])]
    keep = max_prompt_tokens(ctx, run.args.max_new_tokens)
    room = f"--max-new-tokens {run.args.max_new_tokens}"
    if run.choices:  # room for the longest choice, whose last token's logits score the end-of-text
        width = max(len(run.tokenizer.encode(choice)) for choice in run.choices)
        keep, room = ctx - width, f"the longest choice has {plural(width, 'token')}"
    n_truncated = sum(len(ids) > keep for ids in prompts)
    if n_truncated:
        print(f"{plural(n_truncated, 'prompt')} longer than {keep} tokens were cut to their last {keep} "
              f"(context {ctx}, {room})")
    return [ids[-keep:] for ids in prompts], n_truncated


def respond(run, prompts, records, earlier, decoding, n_truncated):
    """Generate the responses not made before, batch by batch (each batch written to the responses
    file as it is done); then say how they went and return eval.json's results on them."""
    args = run.args

    def on_batch(rows, new_ids, cut):
        for i, ids, no_eot in zip(rows, new_ids, cut):
            raw = run.tokenizer.decode(ids)
            records[i].update(model_response=clean_response(raw, run.style), raw_response=raw, no_end_of_text=no_eot)
        write_json(records, run.responses_path)

    todo = unanswered(records, prompts, args.batch_size)
    start = time.perf_counter()
    try:
        n_tokens = generate_responses(run.model, prompts, todo, args.max_new_tokens, on_batch, **decoding,
                                      stop_ids=run.tokenizer.stop_ids)
    except KeyboardInterrupt:
        raise Interrupted(kept_responses(records, run.responses_path)) from None
    seconds = time.perf_counter() - start
    if n_tokens:
        print(f"{plural(sum(map(len, todo)), 'response')}, {plural(n_tokens, 'token')} at "
              f"{n_tokens / seconds:.0f} tokens/s")
    report_responses(records, args.max_new_tokens, run.responses_path)
    scores = score_responses([entry_output(entry) for entry in run.entries], [r["model_response"] for r in records])
    summary = f"exact match {scores['exact_match']:.1%}, F1 {scores['f1']:.1%}"
    if "labels" in scores:
        summary += f"; outputs are labels, accuracy {scores['accuracy']:.1%}: " + ", ".join(
            f"{name} {c['correct']}/{c['count']}" for name, c in scores["labels"].items())
    print(summary)
    return {"tokens_per_second": round(n_tokens / seconds, 1) if n_tokens else earlier.get("tokens_per_second"),
            "no_end_of_text": sum(r["no_end_of_text"] for r in records), "truncated_prompts": n_truncated, **scores}


def unanswered(records, prompts, batch_size):
    """The batches (response_batches) of the records without a response, each without those that have one."""
    todo = [[i for i in rows if records[i]["model_response"] is None] for rows in response_batches(prompts, batch_size)]
    return [rows for rows in todo if rows]


def kept_responses(records, responses_path):
    """What an interrupted run kept, and how to go on."""
    made = sum(r["model_response"] is not None for r in records)
    return (f"{made} of {plural(len(records), 'response')} are kept in {responses_path}; "
            "the same command continues from them")


def write_report(report, eval_path, results):
    """eval.json: report with results added, the judges' summaries (judge.py's) last, as they are written."""
    judged = report.pop("judge", None)
    report.update(results)
    if judged is not None:
        report["judge"] = judged
    write_json(report, eval_path)


def max_prompt_tokens(context_length, max_new_tokens):
    """How many tokens of a prompt are kept (its last ones): enough to leave room for
    max_new_tokens, but never less than half the context."""
    return context_length - min(max_new_tokens, context_length // 2)


def response_batches(prompts, batch_size):
    """Batches of prompt indices: prompts of similar length together, longest first (less left
    padding; a batch too big for memory fails at once). The same for the same prompts and
    batch size, so a continued run makes the batches the interrupted one would have."""
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    return [order[first:first + batch_size] for first in range(0, len(order), batch_size)]


def generate_responses(model, prompts, batches, max_new_tokens, on_batch, **sampling):
    """Generate each batch of `batches` (lists of prompt indices) and hand its results to
    on_batch(indices, new token ids, cut), cut meaning that a response used its whole budget of
    min(max_new_tokens, context_length - prompt length + 1) tokens, so never reached
    end-of-text. A sampled row draws from a generator of its own (generate's seed), so a
    continued run samples what an uninterrupted one does. Returns the number of new tokens."""
    ctx, total, done, n_tokens = model.config.context_length, sum(map(len, batches)), 0, 0
    start = time.perf_counter()
    with Progress("responses", total) as progress:
        for rows in batches:
            new_ids = generate(model, [prompts[i] for i in rows], max_new_tokens, **sampling)
            on_batch(rows, new_ids, [hit_limit(prompts[i], ids, max_new_tokens, ctx) for i, ids in zip(rows, new_ids)])
            done, n_tokens = done + len(rows), n_tokens + sum(map(len, new_ids))
            progress.update(done, f", {n_tokens / (time.perf_counter() - start):.0f} tokens/s")
    return n_tokens


def template_markers(template):
    """The non-empty lines of a template's fixed text (before its placeholder), stripped."""
    return [line.strip() for line in template.split("{")[0].splitlines() if line.strip()]


def clean_response(text, style):
    """The response proper: stripped, without a response header the model repeated at its
    start, and cut where the model begins a new turn (any template line of the style, such as
    "### Instruction:" or "<|user|>"). A chat template's turns end with a stop token, which
    ends generation: its responses are only stripped."""
    text = text.strip()
    if style == CHAT_TEMPLATE:
        return text
    templates = get_prompt_style(style)
    for header in template_markers(templates["response"]):
        text = text.removeprefix(header).strip()
    markers = [m for template in templates.values() for m in template_markers(template)]
    cut = min((text.find(m) for m in markers if m in text), default=len(text))
    return text[:cut].strip()


def report_responses(records, max_new_tokens, responses_path):
    """Say how many responses were cut, and warn when many are empty, which often means that
    cleaning removed all the model wrote (it began a new turn at once)."""
    cut = sum(r["no_end_of_text"] for r in records)
    if cut:
        print(f"{plural(cut, 'response')} never reached end-of-text: cut at --max-new-tokens {max_new_tokens} "
              "or at the end of the context")
    empty = [r for r in records if not r["model_response"]]
    if empty and len(empty) >= len(records) / 5:
        cleaned = sum(bool(r["raw_response"].strip()) for r in empty)
        causes = [f"{cleaned} emptied by cleaning (the model began a new turn, such as '### Instruction:', at once)",
                  f"{len(empty) - cleaned} held only whitespace or end-of-text"]
        print(f"warning: {len(empty)} of {plural(len(records), 'response')} are empty: "
              f"{'; '.join(c for c in causes if not c.startswith('0 '))}; raw_response in {responses_path} "
              "keeps what the model wrote")


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
    shared = sum((Counter(pred) & Counter(ref)).values())
    if shared == 0:
        return 0.0
    precision, recall = shared / len(pred), shared / len(ref)
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


# ----------------------------------------------------------------------------- choices (classification)

NOT_A_CHOICE = "(not a choice)"  # the confusion matrix's row for references that are none of the choices


def parse_choices(text):
    """--choices: "auto", or the answers separated by commas, each non-empty and given once."""
    if text.strip() == "auto":
        return "auto"
    choices = [choice.strip() for choice in text.split(",")]
    if "" in choices:
        raise argparse.ArgumentTypeError(f"answer {choices.index('') + 1} of {text!r} is empty; give the answers "
                                         "separated by commas, e.g. World,Sports,Business,Sci/Tech")
    repeated = [choice for choice, n in Counter(choices).items() if n > 1]
    if repeated:
        raise argparse.ArgumentTypeError(f"{repeated[0]!r} is given {choices.count(repeated[0])} times in {text!r}; "
                                         "give each answer once")
    if len(choices) < 2:
        raise argparse.ArgumentTypeError(f"{text!r} is one answer; give at least two to choose among")
    return choices


def resolve_choices(choices, train_outputs):
    """The answers of --choices; for "auto" the distinct outputs of the training split, in the
    order they first appear, when they are labels (see label_names)."""
    if choices != "auto":
        return choices
    names = label_names(train_outputs)
    if names is None:
        n = len({normalize_answer(output) for output in train_outputs})
        raise ValueError(f"--choices auto: the training split's outputs are not labels ({n} distinct outputs; labels "
                         f"are at most {MAX_LABELS} distinct values of 1 to {MAX_LABEL_WORDS} words, some repeated); "
                         "give the answers with --choices A,B,C")
    return list(names.values())


def best_choice(logprobs, choices, norm):
    """The choice of highest log-probability, with norm divided by its length in characters
    (lm-evaluation-harness's acc_norm); the first of equals."""
    return max(choices, key=lambda choice: logprobs[choice] / (len(choice) if norm else 1))


def score_choices(model, prompts, batches, choices, on_batch, tokenizer=GPT2):
    """Hand each batch of `batches` (lists of prompt indices) to on_batch(indices, log-probabilities),
    a list per prompt of the log-probability of each choice (in the tokenizer's ids) followed by a
    stop token (end-of-text, or the end of a chat template's turn)."""
    choice_ids = [tokenizer.encode(choice) for choice in choices]
    done = 0
    with Progress("choices", sum(map(len, batches))) as progress:
        for rows in batches:
            on_batch(rows, choice_logprobs(model, [prompts[i] for i in rows], choice_ids, tokenizer.stop_ids))
            done += len(rows)
            progress.update(done)


def choice_scores(references, predictions, choices):
    """Accuracy, macro-F1 (the mean F1 of the choices that are a reference or a prediction, as
    scikit-learn's), each choice's precision, recall, F1 and count (entries with it as
    reference), and the confusion matrix: a row per reference (the choices, then NOT_A_CHOICE
    if a reference is none of them), a column per predicted choice."""
    rows = choices + ([NOT_A_CHOICE] if any(ref not in choices for ref in references) else [])
    matrix = [[0] * len(choices) for _ in rows]
    for ref, pred in zip(references, predictions):
        matrix[rows.index(ref) if ref in choices else -1][choices.index(pred)] += 1
    labels = {}
    for j, choice in enumerate(choices):
        correct, count, predicted = matrix[j][j], sum(matrix[j]), sum(row[j] for row in matrix)
        precision, recall = correct / predicted if predicted else 0.0, correct / count if count else 0.0
        f1 = 2 * precision * recall / (precision + recall) if correct else 0.0
        labels[choice] = {"precision": precision, "recall": recall, "f1": f1, "count": count}
    seen = [labels[choice]["f1"] for j, choice in enumerate(choices) if labels[choice]["count"] or
            any(row[j] for row in matrix)]
    return {"accuracy": sum(matrix[j][j] for j in range(len(choices))) / len(references),
            "macro_f1": sum(seen) / len(seen), "labels": labels,
            "confusion_matrix": {"rows": rows, "columns": choices, "counts": matrix}}


def choose(run, prompts, records, earlier):
    """Score the choices of every entry not scored before, batch by batch (each batch written to
    the responses file as it is done); then say how they went and return eval.json's results."""
    choices, norm = run.choices, run.args.choice_norm
    print(f"choices: {', '.join(choices)}, ranked by log-probability{' per character' if norm else ''}")

    def on_batch(rows, logprobs):
        for i, values in zip(rows, logprobs):
            scored = dict(zip(choices, values))
            records[i].update(model_response=best_choice(scored, choices, norm), choice_logprobs=scored)
        write_json(records, run.responses_path)

    todo = unanswered(records, prompts, run.args.batch_size)
    start = time.perf_counter()
    try:
        score_choices(run.model, prompts, todo, choices, on_batch, run.tokenizer)
    except KeyboardInterrupt:
        raise Interrupted(kept_responses(records, run.responses_path)) from None
    n_scored, seconds = sum(map(len, todo)), time.perf_counter() - start
    references, predictions = [entry_output(r).strip() for r in records], [r["model_response"] for r in records]
    outside = [ref for ref in references if ref not in choices]
    if outside:
        one = len(outside) == 1
        print(f"warning: {plural(len(outside), 'test output')} of {len(records)} {'is' if one else 'are'} none of the "
              f"choices (such as {outside[0]!r}) and count{'s' if one else ''} as wrong")
    scores = choice_scores(references, predictions, choices)
    print(f"choices: accuracy {scores['accuracy']:.1%}, macro-F1 {scores['macro_f1']:.1%}; " + ", ".join(
        f"{choice} P {c['precision']:.0%} R {c['recall']:.0%}" for choice, c in scores["labels"].items()))
    return {"entries_per_second": round(n_scored / seconds, 1) if n_scored else earlier.get("entries_per_second"),
            **score_responses(references, predictions), "choice_scores": scores}


# ----------------------------------------------------------------------------- earlier results

IDENTITY = ("weights_sha256", "data_sha256", "prompt_style", "mask_instructions", "context_length",
            "n_evaluated", "generation")  # what decides the results of an evaluation, as eval.json records it


def differences(report, identity):
    """How the evaluation recorded in report differs from `identity`, in words (empty if it does not)."""
    if not any(key in report for key in IDENTITY):
        return ["its settings are not recorded"]
    said = []
    for key, value in identity.items():
        old = report.get(key)
        if old == value:
            continue
        if key in ("weights_sha256", "data_sha256"):
            said.append(f"other {key.split('_')[0]}")
        elif key == "n_evaluated":
            said.append(f"{old} entries, not {value} (--limit)")
        elif key == "generation" and isinstance(old, dict):
            said += [f"--{name.replace('_', '-')} {old.get(name)}, not {value[name]}"
                     for name in value if old.get(name) != value[name]
                     and not (name == "choice_norm" and old.get("choices") != value["choices"])]
        else:
            said.append(f"{key.replace('_', ' ')} {old}, not {value}")
    return said


def earlier_results(eval_path, responses_path, identity, entries, force=False):
    """(report, records) of this same evaluation in the output folder, to continue from: {} and
    None if there is none. If the folder holds the results of another evaluation, which this run
    would replace: a ValueError before any work, or with force a line saying they are replaced
    (as are files eval.py cannot read); this evaluation's own results are continued either way."""
    try:
        report = read_summary(eval_path)
        records = None
        if entries is not None and os.path.exists(responses_path):
            records = load_responses(responses_path, unfinished=True)
    except ValueError as e:
        if not force:
            raise
        print(f"--force: replacing what eval.py cannot continue from ({e})")
        return {}, None
    if not report and records is None:
        return {}, None
    said = differences(report, identity)
    if records is not None and not said and (len(records) != len(entries) or
                                             any({k: r.get(k) for k in e} != e for e, r in zip(entries, records))):
        said.append("its entries are not this evaluation's test entries")
    if not said:
        return report, records
    source = report.get("checkpoint") or report.get("model")
    if records is not None:
        path, made = responses_path, sum(r["model_response"] is not None for r in records)
        judges = sorted({model for r in records for model in r.get("judge_scores", {})})
        holds = plural(made, "response") + (f" (of {len(records)})" if made < len(records) else "") + \
            (f" of {source}" if source else "") + (f", scored by {', '.join(judges)}" if judges else "")
    else:
        path, holds = eval_path, "the results" + (f" of {source}" if source else "")
    if force:
        print(f"--force: replacing {path}, which holds {holds} from another evaluation ({'; '.join(said)})")
        return {}, None
    raise ValueError(f"{path} holds {holds} from another evaluation ({'; '.join(said)}); give --out DIR to "
                     "keep it and write elsewhere, or --force to replace it")


if __name__ == "__main__":
    run_main(main)
