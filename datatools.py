"""Making and cleaning instruction data: the chapter's data tools (ch07/02, 04 and 05).

    python datatools.py dedup data.json                       # near-duplicates, and test-set leaks
    python datatools.py dedup data.json --drop-duplicates clean.json
    python datatools.py generate made.jsonl --count 500 --llm llama3   # instruction data from an LLM
    python datatools.py reflect data.json reflected.jsonl --llm llama3 # an LLM critiques and rewrites
    python datatools.py polite data.json prefs.jsonl --llm llama3      # preference pairs, the book's way
    python datatools.py pairs data.json prefs.jsonl --ckpt out/best.pt --judge llama3   # from your model

dedup finds near-duplicate entries the book's way (dedup.py) and the test and validation
entries whose near-duplicate is in the training split. The other tools ask an LLM on an Ollama
or OpenAI-compatible server (llm.py) and write JSON Lines, an entry a line as it comes: an
interrupted run loses nothing, and the same command goes on where it stopped. Each entry says in
"made_by" what made it (tool, model, seed, ...). What a tool leaves out (an empty reply, a
duplicate, a reply it cannot read) is counted and named, never dropped silently.
"""
import common  # noqa: F401  (first: Ctrl-C while torch loads is one line, see common.py)
import argparse
import json
import os
import random
import re
import sys

import numpy as np

from checkpoint import add_model_args, load_for_inference
from common import (AT_LEAST_1, POSITIVE, SEED, Progress, atomic_write, checked, lock_file, plural, resolve_device,
    run_main, stop_on_interrupt, write_json)
from data import TEST_FRAC, TRAIN_FRAC, is_raw_text, load_instruction_data, split_data, split_fractions
from decoding import add_decoding_args, decoding_settings, generate
from dedup import (THRESHOLD, count_field_pairs, default_fields, duplicate_entries, field_pairs, field_texts,
    grouped_pairs, keep_first, tfidf)
from llm import DEFAULT_TIMEOUT, DEFAULT_URL, OPTIONS, ask, check_server, check_url, judge_prompt, parse_score
from prompts import GPT2, format_input, prompt_ids

# Llama 3's pre-query template (the Magpie paper, the book's 05): the model writes a user's instruction
LLAMA3_PRE_QUERY = "<|begin_of_text|><|start_header_id|>user<|end_header_id|>"
GIVE_UP_AFTER = 100  # requests in a row that give no new entry: the model repeats itself
LISTED_PAIRS = 100_000  # near-duplicate pairs of a field listed at most; more (a template's) are summarised
INSTRUCTION_TOKENS = 256  # at most, for an instruction (a model that does not end its line stops there)


# ----------------------------------------------------------------------------- dedup


def one_line(text, width=90):
    line = " ".join(text.split())
    return line if len(line) <= width else line[:width - 3] + "..."


def show_pairs(pairs, texts, show):
    """Print pairs (i, j, similarity) of texts, `show` of them (None: all)."""
    i, j, sims = pairs
    shown = len(i) if show is None else min(show, len(i))
    width = len(str(max(j[:shown], default=0)))
    for a, b, sim in zip(i[:shown], j[:shown], sims[:shown]):
        print(f"  {sim:.2f}  {a:>{width}}: {one_line(texts[a])}\n        {b:>{width}}: {one_line(texts[b])}")
    if shown < len(i):
        print(f"  ... and {plural(len(i) - shown, 'more pair')} (--show all prints every one)")


def field_sims(sims, k):
    return ", ".join(f"{field} {'equal' if np.isnan(s[k]) else f'{s[k]:.2f}'}" for field, s in sims.items())


def dedup(args):
    if is_raw_text(args.file):
        raise ValueError(f"{args.file} is raw text; dedup compares the entries of instruction data (.json, .jsonl)")
    out = args.drop_duplicates
    if out and os.path.exists(out) and os.path.exists(args.file) and os.path.samefile(out, args.file):
        raise ValueError(f"--drop-duplicates {out} is the input file; give a new file (the input is never changed)")
    with stop_on_interrupt("nothing was written"):
        find_duplicates(args)


def find_duplicates(args):
    """Print the near-duplicate pairs of each field, the near-duplicate entries and the leaks; write
    --drop-duplicates."""
    entries = load_instruction_data(args.file)
    fields = args.fields or default_fields(entries)
    texts = {field: field_texts(entries, field) for field in fields}
    for field, column in texts.items():
        if args.fields and not any(column):
            raise ValueError(f"{args.file}: no entry has any {field!r} text to compare")
    print(f"{args.file}: {plural(len(entries), 'entry', 'entries')}; near-duplicates: TF-IDF vectors of character "
          f"1-3-grams with a cosine similarity above {args.threshold:g}")
    vectors, pairs = {}, {}
    for field, column in texts.items():
        if not any(column):  # a field no entry has (a system message, say) has no pairs to list
            continue
        vectors[field] = tfidf(column)
        grouped = grouped_pairs(vectors[field], column, args.threshold)  # each distinct text compared once
        count = count_field_pairs(column, grouped)
        if count > LISTED_PAIRS:  # a template's field: the texts many entries share, not millions of pairs
            show_shared(field, column, grouped[1], count, args.show)
            continue
        pairs[field] = field_pairs(vectors[field], column, args.threshold, grouped=grouped)
        i, j, sims = pairs[field]
        shown = np.array([len(column[a]) > 1 and len(column[b]) > 1 for a, b in zip(i, j)], dtype=bool)
        print(f"\n{field}: {plural(int(shown.sum()), 'pair')}")  # the book leaves out texts of one character
        show_pairs((i[shown], j[shown], sims[shown]), column, args.show)
    i, j, sims = duplicate_entries(texts, args.threshold, vectors=vectors, pairs=pairs)
    print(f"\nentries that are near-duplicates of an earlier entry in every field ({', '.join(fields)}): "
          f"{len(np.unique(j))}")
    for k in range(len(i) if args.show is None else min(args.show, len(i))):
        print(f"  {j[k]} ~ {i[k]}  ({field_sims(sims, k)})")
    report_leaks(args, len(entries), i, j, sims)
    if args.drop_duplicates:
        drop_duplicates(args, entries, i, j)


def show_shared(field, column, groups, count, show):
    """A field with too many pairs to list: its count, and the texts most entries share."""
    shared = sorted((members for members in groups.values() if len(members) > 1), key=len, reverse=True)
    print(f"\n{field}: {count:,} pairs, too many to list (over {LISTED_PAIRS:,}); the texts entries share most:")
    for members in shared[:5 if show is None else min(show, 5)]:
        listed = ", ".join(map(str, members[:5])) + (", ..." if len(members) > 5 else "")
        print(f"  {len(members):,} entries ({listed}): {one_line(column[members[0]])}")


def report_leaks(args, n, i, j, sims):
    """Print the test and validation entries whose near-duplicate is in the training split."""
    train, test, _ = split_data(range(n), *args.split)
    n_train, n_test = len(train), len(test)
    leak = (i < n_train) & (j >= n_train)
    leaked = np.unique(j[leak])
    in_test = int((leaked < n_train + n_test).sum())
    print(f"\nsplits in file order, as train.py and eval.py make them (--split {args.split[0]:g},{args.split[1]:g}): "
          f"{n_train} train, {n_test} test, {n - n_train - n_test} validation")
    print(f"test-set leaks (entries with a near-duplicate in train): {in_test} test, {len(leaked) - in_test} "
          "validation")
    for k in np.flatnonzero(leak)[:len(leaked) if args.show is None else args.show]:
        split = "test" if j[k] < n_train + n_test else "validation"
        print(f"  {split} {j[k]} ~ train {i[k]}  ({field_sims(sims, k)})")


def drop_duplicates(args, entries, i, j):
    """Write the entries that are no near-duplicate of an entry kept before them to --drop-duplicates."""
    out = args.drop_duplicates
    kept = keep_first(len(entries), i, j)
    kept_entries = [e for e, keep in zip(entries, kept) if keep]
    if out.lower().endswith(".jsonl"):
        with atomic_write(out) as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(e, ensure_ascii=False) + "\n" for e in kept_entries)
    else:
        write_json(kept_entries, out)
    dropped = np.flatnonzero(~kept)
    listed = ", ".join(map(str, dropped[:20])) + (", ..." if len(dropped) > 20 else "")
    print(f"\nwrote {out}: {plural(len(kept_entries), 'entry', 'entries')}, "
          f"{plural(len(dropped), 'near-duplicate')} dropped" + (f" (entries {listed})" if len(dropped) else ""))


# ----------------------------------------------------------------------------- output written as it comes


def read_records(path):
    """The records of a JSON Lines file this script wrote before ([] if there is none). A last line
    cut short (a run killed while writing it) is removed, with a note. ValueError for anything else."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        with open(path, "r+b") as f:
            f.truncate(cut)
        print(f"{path}: removed its last line, cut short by a run that was killed while writing it", file=sys.stderr)
        data = data[:cut]
    records = []
    for number, line in enumerate(data.decode("utf-8", "replace").splitlines(), start=1):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("made_by"), dict):
            raise ValueError(f"{path}: line {number} is not an entry datatools.py wrote; give another output file")
        records.append(record)
    return records


def check_output(path, source=None):
    """ValueError unless path can be a tool's output: a .jsonl file, not the input."""
    if not path.lower().endswith(".jsonl"):
        raise ValueError(f"{path}: the output is a .jsonl file (JSON Lines: an entry a line, written as it comes)")
    if source is not None and os.path.exists(path) and os.path.samefile(path, source):
        raise ValueError(f"{path} is the input file; give another output file (the input is never changed)")


class Output:
    """A JSON Lines file that a run appends to an entry at a time, each on disk once written. One
    run at a time (a lock beside it, OUT.lock); the records of earlier runs of the same tool and
    model are kept and continued, those of another are refused."""

    def __init__(self, path, what, same):
        self.lock = lock_file(path + ".lock", f"datatools.py {what}", path)
        self.path, self.records = path, read_records(path)
        for record in self.records:
            made_by = record["made_by"]
            if any(made_by.get(key) != value for key, value in same.items()):
                was = ", ".join(f"{key} {made_by.get(key)}" for key in same)
                raise ValueError(f"{path} holds entries made with {was}; continue it with those, or give another "
                                 "output file")
        self.file = None  # opened at the first entry written: a run that writes none leaves no new file

    def write(self, record):
        if self.file is None:
            self.file = open(self.path, "a", encoding="utf-8")
        self.file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())
        self.records.append(record)

    def stopped(self, error):
        """The error of a run that stopped, saying what is kept and how to go on."""
        return type(error)(f"{error}; {self.path} keeps the {plural(len(self.records), 'entry', 'entries')} "
                           "written before: run the same command again to go on")


class LeftOut:
    """What a tool leaves out, by reason, each case noted as it happens."""

    def __init__(self, progress):
        self.counts, self.progress = {}, progress

    def add(self, reason, where, detail=""):
        self.counts[reason] = self.counts.get(reason, 0) + 1
        self.progress.note(f"{where}: {reason}" + (f": {detail}" if detail else ""))

    def __str__(self):
        return ", ".join(f"{count} {reason}" for reason, count in self.counts.items()) or "nothing"


def entry_range(text):
    """--entries START:END, a slice of the input's entries (0-based, END excluded, either may be left out)."""
    match = re.fullmatch(r"\s*(\d*)\s*:\s*(\d*)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"must be START:END such as 0:100 or :935, got {text}")
    start, end = (int(g) if g else None for g in match.groups())
    if start is not None and end is not None and end <= start:
        raise argparse.ArgumentTypeError(f"END must be above START, got {text}")
    return slice(start, end)


def alpaca_entries(path):
    """The entries of an instruction file, which must be Alpaca entries (instruction, input, output)."""
    entries = load_instruction_data(path)
    if "messages" in entries[0]:
        raise ValueError(f"{path} holds conversations; this tool works on Alpaca entries (instruction, input, output)")
    return entries


def todo(entries, out, span):
    """The indices of `entries` in span that out does not hold yet."""
    done = {record["made_by"].get("entry") for record in out.records}
    return [i for i in range(len(entries))[span] if i not in done]


def sampling(args, i):
    """The options of a request about entry (or request) i: its own seed, so a re-run asks the same."""
    return {"seed": args.seed + i, "temperature": args.temperature, "top_p": args.top_p}


def run(out, loop):
    """Run loop() with Ctrl-C ending in one line and exit 130, and a server that stops answering in one
    sentence: either way every entry written so far stays in out."""
    with stop_on_interrupt(f"every entry made so far is in {out.path}; run the same command again to go on"):
        try:
            loop()
        except (OSError, ValueError) as e:
            raise out.stopped(e) from None


# ----------------------------------------------------------------------------- generate


def first_line(text):
    """The book's extract_instruction: the first non-empty line of the reply."""
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def generate_data(args):
    check_output(args.out)
    url = check_url(args.llm_url, "llm")
    check_server(url, args.llm, args.llm_timeout, "llm")
    out = Output(args.out, "generate", {"tool": "generate", "model": args.llm})
    seen = {" ".join(r["instruction"].casefold().split()) for r in out.records if isinstance(r.get("instruction"), str)}
    request = max((r["made_by"].get("request", -1) for r in out.records), default=-1) + 1
    progress = Progress(f"generated with {args.llm}:", args.count)
    left_out = LeftOut(progress)

    def loop():
        nonlocal request
        misses = 0
        while len(out.records) < args.count:
            misses = 0 if generate_one(args, url, out, seen, request, left_out) else misses + 1
            request += 1
            if misses == GIVE_UP_AFTER:
                raise ValueError(f"the last {GIVE_UP_AFTER} requests gave no new entry (left out: {left_out}); the "
                                 "model repeats itself: try a higher --temperature or another --pre-query")
            progress.update(len(out.records))

    with progress:
        run(out, loop)
    print(f"{out.path}: {plural(len(out.records), 'entry', 'entries')} (--count {args.count}); left out: {left_out}")


def generate_one(args, url, out, seen, request, left_out):
    """Ask for an instruction (the pre-query template), then its answer, with the request's seed;
    write the entry unless it is left out. True if it was written."""
    options = sampling(args, request)
    where = f"request {request} (seed {options['seed']})"
    reply = ask(url, args.llm, args.pre_query, args.llm_timeout, {**options, "num_predict": INSTRUCTION_TOKENS}, "llm",
                continuation=True)
    instruction = first_line(reply)
    key = " ".join(instruction.casefold().split())
    if not instruction:
        return left_out.add("empty", where, "no instruction in the reply")
    if "<|" in instruction:
        return left_out.add("unparseable", where, f"the template is in the instruction {one_line(instruction)!r}")
    if key in seen:
        return left_out.add("duplicate", where, f"the instruction {one_line(instruction)!r} is in the file already")
    answer = ask(url, args.llm, instruction, args.llm_timeout, options, "llm").strip()
    if not answer:
        return left_out.add("empty", where, f"no answer to {one_line(instruction)!r}")
    seen.add(key)
    out.write({"instruction": instruction, "input": "", "output": answer,
               "made_by": {"tool": "generate", "model": args.llm, **options, "request": request}})
    return True


# ----------------------------------------------------------------------------- reflect


# The book's prompts (from the Reflection-Tuning repository), word for word.
INSTRUCTION_SYSTEM = "You are a helpful, precise but picky assistant for checking the quality of a given instruction."
INSTRUCTION_CRITERIA = (
    "We would like you to answer several questions related to the quality of a given instruction. \n"
    "1. Why this instruction is not good? First analyse the instruction based on Complexity of the Topic, Level of "
    "Detail Required, Knowledge Required, Ambiguity of the Instruction and Logical Reasoning or Problem-Solving "
    "Involved. \n"
    "Then analyse why this answer is not good for the given instruction? Analyse based on the Helpfulness, Relevance, "
    "Accuracy and Level of Details. \n"
    "Finally analyse why this bad instruction lead to a bad answer. "
    "2. Based on the reason you provided, generate a new and complete instruction which is complex and difficult to "
    "answer directly. Make sure the new instruction is relevent but independent to the original instruction, which "
    "can be answered without knowing the original instruction, put the new instruction in the format of "
    "[New Instruction] your instruction [End]"
    "3. Answer the newly generated instruction as detailed as possible, in the format of [New Answer] your answer "
    "[End] \n")
RESPONSE_SYSTEM = ("You are a helpful, precise but picky assistant for checking the quality of the answer to a given "
                   "instruction.")
RESPONSE_SYSTEM_WITH_INPUT = ("You are a helpful and precise assistant for checking the quality of the answer to a "
                              "given instruction and its input.")
RESPONSE_CRITERIA = (
    "We would like you to answer several questions related to the quality of the answer to the given "
    "instruction{and_input}. \n"
    "1. Why this answer is not good for the given instruction{and_input}? Analyse based on the Helpfulness, "
    "Relevance, Accuracy and Level of Details. \n"
    "2. Based on the reason you provided, generate a better answer, new and complete, as detailed as possible, in "
    "the format of [Better Answer] your answer [End] \n")


def reflection_messages(entry, part):
    """The book's reflection request for an entry: a system message and the prompt."""
    if part == "instruction":
        system, criteria, given = INSTRUCTION_SYSTEM, INSTRUCTION_CRITERIA, ""
    elif entry["input"]:
        system, criteria = RESPONSE_SYSTEM_WITH_INPUT, RESPONSE_CRITERIA.format(and_input=" and corresponding input")
        given = f"[The Start of Input]\n{entry['input']}\n\n[The End of Input]\n\n"
    else:
        system, criteria, given = RESPONSE_SYSTEM, RESPONSE_CRITERIA.format(and_input=""), ""
    prompt = (f"[Instruction]\n{entry['instruction']}\n\n{given}[The Start of Answer]\n{entry['output']}\n\n"
              f"[The End of Answer]\n\n[System]\n{criteria}\n\n")
    return [{"role": "system", "content": system}, {"role": "user", "content": prompt}]


def segment(text, start, ends):
    """The text after the first `start` marker up to the first of `ends` (or the end), stripped; "" without it."""
    match = re.search(re.escape(start) + r"(.*?)(?:" + "|".join(map(re.escape, ends)) + "|$)", text, re.S)
    return match.group(1).strip() if match else ""


def refined_parts(reply, part):
    """What a reflection reply proposes, as the book's extraction reads it: {"instruction", "output"} for
    part "instruction", {"output"} for "output"; None when the reply holds no such text."""
    if part == "instruction":
        marker = "[New Instruction]" if "[New Instruction]" in reply else "New Instruction:"
        instruction = segment(reply, marker, ["[End]", "[New Answer]", "New Answer:"]).removesuffix("\n\n3.")
        output = segment(reply, "[New Answer]" if "[New Answer]" in reply else "New Answer:", ["[End]"])
        return {"instruction": instruction, "output": output} if instruction and output else None
    output = segment(reply, "[Better Answer]", ["[End]", "[Better Answer]"] if reply.count("[Better Answer]") >= 2
                     else ["[End]", "End"])
    return {"output": output} if output else None


def reflect(args):
    check_output(args.out, args.file)
    url = check_url(args.llm_url, "llm")
    entries = alpaca_entries(args.file)
    out = Output(args.out, "reflect", {"tool": "reflect", "model": args.llm, "part": args.part})
    switch_training_text(out, args.train_on)  # no request: the entries written keep both texts
    indices = todo(entries, out, args.entries)
    if indices:
        check_server(url, args.llm, args.llm_timeout, "llm")
    progress = Progress(f"reflected by {args.llm}:", len(indices))
    kept = LeftOut(progress)  # the entries kept as they were, by reason

    def loop():
        for done, i in enumerate(indices, start=1):
            out.write(reflected(args, url, entries[i], i, kept))
            progress.update(done)

    with progress:
        run(out, loop)
    print(f"{out.path}: {plural(len(out.records), 'entry', 'entries')}, "
          f"{sum('reflection' in r for r in out.records)} refined (training uses the {args.train_on} text); "
          f"kept as they were this run: {kept}")


def reflected(args, url, entry, i, kept):
    """Entry i as the LLM refines it, the original kept in "reflection"; or as it was (noted in kept)."""
    options = sampling(args, i)
    as_it_was = {**entry, "made_by": {"tool": "reflect", "model": args.llm, "part": args.part, **options, "entry": i}}
    if args.part == "instruction" and entry["input"]:
        kept.add("with an input", f"entry {i}", "the book's instruction reflection is for entries without one")
        return as_it_was
    reply = ask(url, args.llm, reflection_messages(entry, args.part), args.llm_timeout, options, "llm")
    refined = refined_parts(reply, args.part)
    original = {key: entry[key] for key in refined or ()}
    if not reply.strip():
        return kept.add("empty", f"entry {i}", "the reply is empty") or as_it_was
    if refined is None:
        marker = "[New Instruction]" if args.part == "instruction" else "[Better Answer]"
        return kept.add("unparseable", f"entry {i}", f"no {marker} in the reply {one_line(reply, 60)!r}") or as_it_was
    if refined == original:
        return kept.add("unchanged", f"entry {i}", "the rewrite is the original") or as_it_was
    reflection = {"train_on": args.train_on, "original": original, "refined": refined}
    return {**entry, **reflection[args.train_on], "reflection": reflection, "made_by": as_it_was["made_by"]}


def switch_training_text(out, train_on):
    """Make the records already in out train on `train_on` (the original or the refined text), as the
    command asks, rewriting the file (atomically) if some train on the other."""
    switched = [r for r in out.records if "reflection" in r and r["reflection"]["train_on"] != train_on]
    if not switched:
        return
    for record in switched:
        record.update(record["reflection"][train_on])
        record["reflection"]["train_on"] = train_on
    if out.file is not None:
        out.file.close()
        out.file = None
    with atomic_write(out.path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in out.records)
    print(f"{out.path}: {plural(len(switched), 'entry', 'entries')} written before now train on the {train_on} text")


# ----------------------------------------------------------------------------- preference pairs, the book's way


def polite_prompt(entry, politeness):
    """The book's request (ch07/04), word for word, typos included."""
    return (f"Given the input `{format_input(entry)}` "
            f"and correct output `{entry['output']}`, "
            f"slightly rewrite the output to be more {politeness}."
            "Keep the modification minimal."
            "Only return return the generated response and nothing else.")


def polite(args):
    check_output(args.out, args.file)
    url = check_url(args.llm_url, "llm")
    entries = alpaca_entries(args.file)
    check_server(url, args.llm, args.llm_timeout, "llm")
    out = Output(args.out, "polite", {"tool": "polite", "model": args.llm})
    indices = todo(entries, out, args.entries)
    progress = Progress(f"rewritten by {args.llm}:", len(indices))
    left_out = LeftOut(progress)

    def loop():
        for done, i in enumerate(indices, start=1):
            entry, options = entries[i], sampling(args, i)
            # the book draws polite or impolite at random for each entry: here from the seed and the entry
            politeness = random.Random(f"{args.seed} {i}").choice(["polite", "impolite"])
            rewrite = ask(url, args.llm, polite_prompt(entry, politeness), args.llm_timeout, options, "llm").strip()
            if not rewrite:
                left_out.add("empty", f"entry {i}", f"no {politeness} rewrite")
            elif rewrite == entry["output"].strip():
                left_out.add("duplicate", f"entry {i}", f"the {politeness} rewrite is the output itself")
            else:
                chosen, rejected = (rewrite, entry["output"]) if politeness == "polite" else (entry["output"], rewrite)
                out.write({**entry, "chosen": chosen, "rejected": rejected, "made_by": {
                    "tool": "polite", "model": args.llm, **options, "rewrote": politeness, "entry": i}})
            progress.update(done)

    with progress:
        run(out, loop)
    print(f"{out.path}: {plural(len(out.records), 'pair')}; left out this run: {left_out} (a re-run asks again "
          "for those)")


# ----------------------------------------------------------------------------- preference pairs from your model


def pairs(args):
    check_output(args.out, args.file)
    judge_url = check_url(args.judge_url, "pairs")
    entries = alpaca_entries(args.file)
    settings = decoding_settings(args)
    if args.num_beams > 1 or args.temperature == 0:
        raise ValueError(f"pairs samples {args.samples} responses to each instruction: give a --temperature above 0 "
                         "(and no --num-beams)")
    check_server(judge_url, args.judge, args.judge_timeout, "pairs")
    model_name = os.path.abspath(args.ckpt) if args.ckpt else args.model
    out = Output(args.out, "pairs", {"tool": "pairs", "model": model_name, "judge": args.judge})
    indices = todo(entries, out, args.entries)
    model, _, style, tokenizer = load_for_inference(args.ckpt, args.model, args.prompt_style,
                                                    resolve_device(args.device), args.quantize, args.base)
    sampled = {k: settings[k] for k in ("temperature", "top_k", "top_p", "seed")}
    made_by = {"tool": "pairs", "model": model_name, "judge": args.judge, "samples": args.samples, **sampled,
               "max_new_tokens": args.max_new_tokens}
    progress = Progress(f"pairs from {os.path.basename(model_name)}, judged by {args.judge}:", len(indices))
    left_out, set_aside = LeftOut(progress), {}  # entries left out; samples set aside, by reason

    def loop():
        for start in range(0, len(indices), args.batch_size):
            batch = [i for i in indices[start:start + args.batch_size]
                     if not too_long(entries[i], style, model, left_out, i, tokenizer)]
            rows = [prompt_ids(entries[i], style, tokenizer) for i in batch for _ in range(args.samples)]
            outputs = generate(model, rows, args.max_new_tokens, stop_ids=tokenizer.stop_ids, **sampled) if rows else []
            for k, i in enumerate(batch):
                samples = [tokenizer.decode(ids).strip() for ids in outputs[k * args.samples:(k + 1) * args.samples]]
                pair = judged_pair(args, judge_url, entries[i], samples, set_aside, left_out, f"entry {i}")
                if pair is not None:
                    out.write({**entries[i], **pair, "made_by": {**made_by, "entry": i}})
            progress.update(min(start + args.batch_size, len(indices)))

    with progress:
        run(out, loop)
    aside = ", ".join(f"{n} {reason}" for reason, n in set_aside.items()) or "none"
    print(f"{out.path}: {plural(len(out.records), 'pair')}; left out this run: {left_out} (a re-run asks again for "
          f"those); samples set aside: {aside}")


def too_long(entry, style, model, left_out, i, tokenizer=GPT2):
    """True (and noted) when an entry's prompt leaves no room in the context for a response."""
    n = len(prompt_ids(entry, style, tokenizer))
    if n < model.config.context_length:
        return False
    left_out.add("too long", f"entry {i}", f"{n} tokens, the context holds {model.config.context_length}")
    return True


def judged_pair(args, url, entry, samples, set_aside, left_out, where):
    """{"chosen", "rejected", "chosen_score", "rejected_score"}: the best and the worst of the samples
    as the judge scores them (the book's judge prompt, against the entry's output), or None (noted)
    when fewer than two can be compared or all score the same."""
    distinct = []
    for sample in samples:
        reason = "empty" if not sample else "duplicate" if sample in distinct else None
        if reason:
            set_aside[reason] = set_aside.get(reason, 0) + 1
        else:
            distinct.append(sample)
    scored = []
    for sample in distinct if len(distinct) > 1 else []:
        reply = ask(url, args.judge, judge_prompt({**entry, "model_response": sample}), args.judge_timeout,
                    role="pairs")
        score = parse_score(reply)
        if score is None:
            set_aside["unparseable score"] = set_aside.get("unparseable score", 0) + 1
            left_out.progress.note(f"{where}: no score from 0 to 100 in the judge's reply {one_line(reply, 60)!r}")
        else:
            scored.append((score, sample))
    if len(scored) < 2:
        return left_out.add("with fewer than 2 samples to compare", where,
                            f"{len(samples)} sampled, {len(distinct)} distinct and non-empty, {len(scored)} scored")
    (best, chosen), (worst, rejected) = max(scored, key=lambda s: s[0]), min(scored, key=lambda s: s[0])
    if best == worst:
        return left_out.add("tied", where, f"every sample scored {best}")
    return {"chosen": chosen, "rejected": rejected, "chosen_score": best, "rejected_score": worst}


# ----------------------------------------------------------------------------- command line


def show_count(text):
    """--show N or all (None)."""
    if text != "all" and not text.isdigit():
        raise argparse.ArgumentTypeError(f"must be a count or 'all', got {text}")
    return None if text == "all" else int(text)


def add_llm_args(p, temperature):
    """The LLM server's flags, and the sampling of its requests."""
    p.add_argument("--llm", metavar="MODEL", default="llama3", help="the model on the server, e.g. llama3")
    p.add_argument("--llm-url", metavar="URL", default=DEFAULT_URL, help="the LLM's server: Ollama's address, or "
                   "one ending in /v1 for an OpenAI-compatible server ($OPENAI_API_KEY is sent if set)")
    p.add_argument("--llm-timeout", metavar="SECONDS", type=POSITIVE, default=DEFAULT_TIMEOUT,
                   help="seconds to wait for the server to answer")
    p.add_argument("--seed", type=SEED, default=OPTIONS["seed"], help="request (or entry) i is sent seed + i")
    p.add_argument("--temperature", type=checked(float, lambda v: 0 <= v < float("inf"), "a number >= 0"),
                   default=temperature)
    p.add_argument("--top-p", type=checked(float, lambda v: 0 < v <= 1, "in (0, 1]"), default=1.0)


def add_entries_arg(p):
    p.add_argument("--entries", metavar="START:END", type=entry_range, default=":",
                   help="only these entries of FILE (0-based, END excluded; ':' is all of them), e.g. :5 to try, "
                   ":935 for the training split of 1,100")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    d = commands.add_parser("dedup", help="near-duplicate entries and test-set leaks (the book's 02)",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d.add_argument("file", metavar="FILE", help="instruction data (JSON or JSON Lines)")
    d.add_argument("--fields", type=lambda s: [f.strip() for f in s.split(",") if f.strip()],
                   help="the fields compared (default: instruction,input,output, or system,user,assistant for "
                   "conversations); an entry is a near-duplicate when all of them are")
    d.add_argument("--threshold", type=checked(float, lambda v: 0 < v < 1, "between 0 and 1"), default=THRESHOLD,
                   help="cosine similarity above which two texts are near-duplicates")
    d.add_argument("--split", metavar="TRAIN,TEST", type=split_fractions, default=(TRAIN_FRAC, TEST_FRAC),
                   help="the split whose leaks are counted, in file order, as train.py's --split")
    d.add_argument("--drop-duplicates", metavar="OUT", help="write the entries without their near-duplicates to OUT "
                   "(.json or .jsonl): each entry is kept unless one kept before it is its near-duplicate")
    d.add_argument("--show", metavar="N", type=show_count, default=10, help="pairs printed per list, or 'all'")
    g = commands.add_parser("generate", help="instruction data from an LLM (the book's 05: Llama 3's pre-query "
                            "template)", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g.add_argument("out", metavar="OUT", help="the .jsonl file the entries go to (continued if it exists)")
    g.add_argument("--count", type=AT_LEAST_1, required=True, help="entries OUT should hold")
    g.add_argument("--pre-query", default=LLAMA3_PRE_QUERY, help="what the model continues with an instruction "
                   "(Llama 3's template; another model family needs its own)")
    add_llm_args(g, temperature=1.0)
    r = commands.add_parser("reflect", help="an LLM critiques and rewrites each entry (the book's 05: "
                            "reflection-tuning)", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    r.add_argument("file", metavar="FILE")
    r.add_argument("out", metavar="OUT", help="the .jsonl file the entries go to, originals kept beside the refined "
                   "text (continued if it exists)")
    r.add_argument("--part", choices=["output", "instruction"], default="output", help="rewrite the output, or the "
                   "instruction and its output (entries without an input, as in the book)")
    r.add_argument("--train-on", choices=["refined", "original"], default="refined",
                   help="which text goes in instruction/output, where training reads it (the other stays in "
                   "'reflection'); switching rewrites the entries OUT holds")
    add_entries_arg(r)
    add_llm_args(r, temperature=0.0)
    o = commands.add_parser("polite", help="preference pairs the book's way (04): the LLM rewrites each output more "
                            "polite or more impolite", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    o.add_argument("file", metavar="FILE")
    o.add_argument("out", metavar="OUT", help="the .jsonl file the pairs go to (continued if it exists)")
    add_entries_arg(o)
    add_llm_args(o, temperature=0.0)
    a = commands.add_parser("pairs", help="preference pairs from your model: samples scored by a judge, the best "
                            "chosen and the worst rejected", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a.add_argument("file", metavar="FILE", help="instruction data with reference outputs, for the judge")
    a.add_argument("out", metavar="OUT", help="the .jsonl file the pairs go to (continued if it exists)")
    a.add_argument("--samples", type=checked(int, lambda v: v >= 2, "at least 2"), default=2,
                   help="responses sampled per instruction")
    a.add_argument("--batch-size", type=AT_LEAST_1, default=8, help="instructions sampled at once")
    a.add_argument("--judge", metavar="MODEL", required=True, help="the judge model on the server, e.g. llama3")
    a.add_argument("--judge-url", metavar="URL", default=DEFAULT_URL, help="the judge's server: Ollama's address, or "
                   "one ending in /v1 for an OpenAI-compatible server ($OPENAI_API_KEY is sent if set)")
    a.add_argument("--judge-timeout", metavar="SECONDS", type=POSITIVE, default=DEFAULT_TIMEOUT)
    add_entries_arg(a)
    add_model_args(a)
    add_decoding_args(a)
    a.set_defaults(temperature=0.7)
    args = p.parse_args(argv)
    commands = {"dedup": dedup, "generate": generate_data, "reflect": reflect, "polite": polite, "pairs": pairs}
    commands[args.command](args)


if __name__ == "__main__":
    run_main(main)
