"""Data for instruction fine-tuning (and plain next-token training on raw text).

    python data.py [--data FILE]    # fetch the default data set once, print a summary

Follows "Fine-tuning to follow instructions" (Raschka, LLMs from scratch, ch07):
load Alpaca-style entries, split them 85/10/5 in file order, format each one as a
prompt plus response, tokenize with GPT-2's tiktoken encoding, and batch them with
the chapter's custom collate (pad with <|endoftext|>, ignore padding in the loss).
A .txt file instead gives sliding windows of raw text, as in the chapter on
pretraining (ch05).
"""
import argparse
import functools
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import tiktoken
import torch
from torch.utils.data import Dataset

from common import AT_LEAST_1, download, run_main
from model import IGNORE_INDEX

EOT_ID = 50256  # GPT-2 <|endoftext|>, also used as the pad token
DEFAULT_DATA_URL = (
    "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/"
    "ch07/01_main-chapter-code/instruction-data.json"
)


# ----------------------------------------------------------------------------
# Tokenizer

@functools.cache
def get_tokenizer() -> tiktoken.Encoding:
    """GPT-2's BPE encoding (loaded once; tiktoken downloads its two files the first time)."""
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # requests' and urllib3's errors, a bad cached file: tiktoken does not wrap them
        raise OSError(f"could not load GPT-2's tokenizer files ({type(e).__name__}); tiktoken downloads them once, "
                      "so check the network, or for offline use set TIKTOKEN_CACHE_DIR to a folder that holds "
                      "them") from None


def encode(text: str) -> list[int]:
    """Token ids of `text` as ordinary text.

    A literal "<|endoftext|>" typed by a user is encoded as the characters it is made
    of, never as the special token, so it round-trips and cannot end a sequence early.
    """
    return get_tokenizer().encode(text, disallowed_special=())


def decode(ids) -> str:
    """Text of a list (or tensor) of token ids."""
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    return get_tokenizer().decode(list(ids))


def check_vocab(vocab_size: int, what: str) -> None:
    """ValueError unless a model of vocab_size tokens can take GPT-2's tokenizer's ids."""
    if vocab_size <= EOT_ID:
        raise ValueError(f"{what} has a vocabulary of {vocab_size} tokens; GPT-2's tokenizer needs {EOT_ID + 1}")


# ----------------------------------------------------------------------------
# Prompt styles
#
# A style is three templates: the instruction, the input (used only when the entry
# has a non-empty input) and the response header. A new style is one more entry.

PROMPT_STYLES = {
    "alpaca": {
        "instruction": (
            "Below is an instruction that describes a task. "
            "Write a response that appropriately completes the request."
            "\n\n### Instruction:\n{instruction}"
        ),
        "input": "\n\n### Input:\n{input}",
        "response": "\n\n### Response:\n",
    },
    "phi3": {
        "instruction": "<|user|>\n{instruction}",
        "input": "\n{input}",
        "response": "\n<|assistant|>:\n",
    },
    # no template: the text as it is, continued (checkpoints trained on raw text use this)
    "none": {
        "instruction": "{instruction}",
        "input": "\n{input}",
        "response": "",
    },
}


def get_prompt_style(style: str) -> dict:
    """The templates of a style; ValueError listing the known styles otherwise."""
    if style not in PROMPT_STYLES:
        raise ValueError(f"unknown prompt style {style!r}; known styles: {', '.join(PROMPT_STYLES)}")
    return PROMPT_STYLES[style]


def format_input(entry: dict, style: str = "alpaca") -> str:
    """The instruction (and input, if any) part of a prompt, without the response header."""
    templates = get_prompt_style(style)
    text = templates["instruction"].format(instruction=entry["instruction"])
    if entry.get("input"):
        text += templates["input"].format(input=entry["input"])
    return text


def format_prompt(entry: dict, style: str = "alpaca") -> str:
    """Everything up to and including the response header: what generation feeds the model."""
    return format_input(entry, style) + get_prompt_style(style)["response"]


# ----------------------------------------------------------------------------
# Loading and splitting instruction data

def default_data_path(data_dir: str = "data") -> str:
    """Path of the default 1,100-entry data set, downloaded once into `data_dir`."""
    path = os.path.join(data_dir, os.path.basename(DEFAULT_DATA_URL))
    if not os.path.exists(path):
        try:
            download(DEFAULT_DATA_URL, path)  # to a temporary name, renamed when complete
        except OSError as e:
            raise ValueError(f"the default data set: {e}, or pass a local file with --data PATH") from None
        try:  # keep an error page from being taken for the data set by later runs
            with open(path, encoding="utf-8") as f:
                json.load(f)
        except ValueError:
            os.remove(path)
            raise ValueError(f"{DEFAULT_DATA_URL} did not return JSON; pass a local file with --data PATH") from None
    return path


def read_text(path: str) -> str:
    """The UTF-8 text of a data file, with a one-sentence error if it is missing or not text."""
    if os.path.isdir(path):
        raise FileNotFoundError(f"{path} is a directory, not a data file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such data file")
    try:
        with open(path, encoding="utf-8-sig") as f:  # -sig: tolerate a byte-order mark
            return f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start})") from None


def _parse_json(path: str, text: str) -> list:
    """The entries of a JSON array, or of one JSON value a line (JSON Lines: a .jsonl file, or
    any file that is not one JSON value but whose lines are)."""
    if not path.lower().endswith(".jsonl"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            if e.msg != "Extra data":  # more than one value: try it as JSON Lines
                raise ValueError(f"{path}: not valid JSON: {e}") from None
            try:
                return _parse_json_lines(path, text)
            except ValueError as lines_error:
                detail = str(lines_error).removeprefix(f"{path}: ")
                raise ValueError(f"{path}: not valid JSON ({e}), nor JSON Lines ({detail})") from None
    return _parse_json_lines(path, text)


def _parse_json_lines(path: str, text: str) -> list:
    entries = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {line_number}: not valid JSON: {e}") from None
    return entries


def load_instruction_data(path: str) -> list[dict]:
    """Entries with `instruction`, `output` and an optional `input` (Alpaca layout).

    Reads a JSON array or a JSON Lines (.jsonl) file. Every problem is a ValueError
    naming the file and the entry; nothing is dropped. A missing `input` becomes "".
    """
    entries = _parse_json(path, read_text(path))
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a list of entries, got a JSON {type(entries).__name__}")
    if not entries:
        raise ValueError(f"{path}: the data set has no entries")
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: entry {i}: expected an object, got {type(entry).__name__}")
        for key in ("instruction", "output"):
            if key not in entry:
                raise ValueError(f"{path}: entry {i}: missing {key!r}")
        entry.setdefault("input", "")
        for key in ("instruction", "input", "output"):
            if not isinstance(entry[key], str):
                kind = "null" if entry[key] is None else type(entry[key]).__name__
                raise ValueError(f"{path}: entry {i}: {key!r} must be a string, got {kind}")
    return entries


def split_data(entries: list, train_frac: float = 0.85, test_frac: float = 0.10):
    """(train, test, val) in file order: the first train_frac, the next test_frac, the rest."""
    if not (0 < train_frac and 0 <= test_frac and train_frac + test_frac < 1):
        raise ValueError(
            f"bad split fractions: train {train_frac}, test {test_frac} "
            f"(need train > 0, test >= 0 and train + test < 1, the rest being validation)"
        )
    train_end = int(len(entries) * train_frac)
    test_end = train_end + int(len(entries) * test_frac)
    return entries[:train_end], entries[train_end:test_end], entries[test_end:]


def split_fractions(text: str) -> tuple:
    """--split TRAIN,TEST (train.py and eval.py): the train and test fractions, the rest validation."""
    try:
        train_frac, test_frac = (float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be two fractions TRAIN,TEST such as 0.85,0.10, got {text}") from None
    if not (0 < train_frac and 0 <= test_frac and train_frac + test_frac < 1):
        raise argparse.ArgumentTypeError(f"needs train > 0, test >= 0 and train + test < 1 (the rest is validation), "
                                         f"got {text}")
    return train_frac, test_frac


# ----------------------------------------------------------------------------
# Datasets and batching

class InstructionDataset(Dataset):
    """Entries tokenized once: prompt tokens followed by response tokens.

    Prompt and response are tokenized separately and concatenated, so the number of
    prompt tokens is exact and a generation prompt tokenizes to the same ids.
    Items are token lists (the collate appends <|endoftext|>), or (tokens,
    n_prompt_tokens) pairs with mask_instructions, so the loss skips the prompt.
    """

    def __init__(self, entries: list[dict], prompt_style: str = "alpaca", mask_instructions: bool = False):
        self.entries = entries
        self.mask_instructions = mask_instructions
        self.token_ids, self.prompt_lengths = [], []
        for entry in entries:
            prompt_ids = encode(format_prompt(entry, prompt_style))
            self.token_ids.append(prompt_ids + encode(entry["output"]))
            self.prompt_lengths.append(len(prompt_ids))
        self.lengths = [len(ids) for ids in self.token_ids]

    def __len__(self):
        return len(self.token_ids)

    def __getitem__(self, index):
        if self.mask_instructions:
            return self.token_ids[index], self.prompt_lengths[index]
        return self.token_ids[index]


def collate(batch, pad_token_id: int = EOT_ID, ignore_index: int = IGNORE_INDEX,
            allowed_max_length: Optional[int] = None):
    """(inputs, targets) LongTensors of a batch of token lists, as the chapter's custom collate.

    Each item gets one <|endoftext|> and is padded to the longest item plus one;
    inputs drop the last token and targets the first. Items may be
    (tokens, n_prompt_tokens) pairs: then targets predicting a prompt token are
    ignored too, and the loss covers only the response and its end-of-text token.
    """
    items = [item if isinstance(item, tuple) else (item, 0) for item in batch]
    padded_length = max(len(ids) for ids, _ in items) + 1
    inputs, targets = [], []
    for ids, n_prompt_tokens in items:
        padded = list(ids) + [pad_token_id] * (padded_length - len(ids))  # a copy: never mutate the caller's
        item_targets = padded[1:]
        # Keep the first end-of-text target (at len(ids) - 1) so the model learns to
        # stop; ignore the padding after it (-100 is what cross_entropy skips). This
        # goes by position, so a pad id that also occurs in the text is never ignored.
        item_targets[len(ids):] = [ignore_index] * (len(item_targets) - len(ids))
        # Target j predicts token j + 1, so the first n_prompt_tokens - 1 targets
        # predict prompt tokens.
        n_masked = max(n_prompt_tokens - 1, 0)
        item_targets[:n_masked] = [ignore_index] * n_masked
        inputs.append(padded[:-1])
        targets.append(item_targets)
    inputs = torch.tensor(inputs, dtype=torch.long)
    targets = torch.tensor(targets, dtype=torch.long)
    if allowed_max_length is not None:
        inputs, targets = inputs[:, :allowed_max_length], targets[:, :allowed_max_length]
    return inputs, targets


class TextWindowDataset(Dataset):
    """Windows of max_length tokens every `stride` tokens; the targets are the inputs shifted by one."""

    def __init__(self, token_ids: list[int], max_length: int, stride: int):
        self.input_ids, self.target_ids = [], []
        for start in range(0, len(token_ids) - max_length, stride):
            self.input_ids.append(torch.tensor(token_ids[start:start + max_length]))
            self.target_ids.append(torch.tensor(token_ids[start + 1:start + max_length + 1]))
        self.lengths = [max_length] * len(self.input_ids)

    def __len__(self):
        return len(self.input_ids)

    def __getitem__(self, index):
        return self.input_ids[index], self.target_ids[index]


def batch_indices(lengths: list[int], batch_size: int, shuffle: bool, seed: int = 0, epoch: int = 0,
                  drop_last: bool = False, group_by_length: bool = False,
                  rank: int = 0, world_size: int = 1) -> list[list[int]]:
    """The batches of one epoch for process `rank`: lists of example indices.

    Deterministic from (seed, epoch), so a run can resume mid-epoch by slicing the
    list. Without shuffle, the order is the file order. group_by_length sorts by
    length within chunks of 50 batches so that each batch holds similar lengths
    (little padding); with shuffle, the batch order is then shuffled. Batches are
    built globally (batch_size * world_size indices) and rank r takes its slice of
    each, so N processes see per step the same examples as one process with batch
    N * batch_size. The incomplete final batch, if kept, stays last; a rank whose
    slice of it is empty gets one batch fewer.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths)).tolist() if shuffle else list(range(len(lengths)))
    global_size = batch_size * world_size
    if group_by_length:
        chunk = 50 * global_size
        order = [i for start in range(0, len(order), chunk)
                 for i in sorted(order[start:start + chunk], key=lengths.__getitem__)]
    batches = [order[i:i + global_size] for i in range(0, len(order), global_size)]
    last = batches.pop() if batches and len(batches[-1]) < global_size else None
    if group_by_length and shuffle:
        rng.shuffle(batches)
    if last is not None and not drop_last:
        batches.append(last)
    batches = [b[rank * batch_size:(rank + 1) * batch_size] for b in batches]
    return [b for b in batches if b]


def padding_fraction(lengths: list[int], batches: list[list[int]], context_length: int) -> float:
    """The fraction of input tokens that are padding when `batches` go through collate."""
    padding = total = 0
    for batch in batches:
        width = min(max(lengths[i] for i in batch), context_length)
        total += width * len(batch)
        padding += sum(width - min(lengths[i], width) for i in batch)
    return padding / total if total else 0.0


# ----------------------------------------------------------------------------
# Putting it together

def data_fingerprint(path: str, n_entries: Optional[int]) -> dict:
    """What identifies a data set wherever it lies: the sha256 of the file and its entry count
    (None for raw text). A checkpoint keeps it, so a moved file is recognised and a changed one refused."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return {"sha256": digest.hexdigest(), "entries": n_entries}


def check_same_data(splits, fingerprint: Optional[dict], trained_on: Optional[str]) -> None:
    """ValueError unless the data of `splits` is the data a checkpoint was trained on (by its
    fingerprint, wherever the file lies now). A checkpoint without a fingerprint is not checked."""
    if fingerprint is not None and splits.fingerprint != fingerprint:
        raise ValueError(f"{splits.path} is not the data the checkpoint was trained on ({trained_on}): its content "
                         f"differs (sha256 {splits.fingerprint['sha256'][:12]}... with {splits.fingerprint['entries']} "
                         f"entries, not {fingerprint['sha256'][:12]}... with {fingerprint['entries']})")


@dataclass
class DataSplits:
    """The datasets of one run and what is needed to batch and describe them."""
    kind: str  # "instruction" or "text"
    path: str
    fingerprint: dict
    train: Dataset
    val: Dataset
    test: Optional[Dataset]  # None for text
    train_entries: Optional[list] = None  # the entries as loaded; None for text
    val_entries: Optional[list] = None
    test_entries: Optional[list] = None
    collate_fn: Optional[Callable] = None  # None: torch's default collate
    prompt_style: Optional[str] = None
    mask_instructions: bool = False


def prepare_data(path: Optional[str], prompt_style: str = "alpaca", context_length: int = 1024,
                 mask_instructions: bool = False, train_frac: float = 0.85,
                 test_frac: float = 0.10) -> DataSplits:
    """Datasets for `path`: instruction JSON/JSONL (default: the chapter's data set) or a .txt file."""
    get_prompt_style(prompt_style)  # fail early on an unknown style
    if path is None:
        path = default_data_path()
    if path.endswith(".txt"):
        return _prepare_text(path, context_length)
    entries = load_instruction_data(path)
    train, test, val = split_data(entries, train_frac, test_frac)
    # The validation split is the rest, so never empty; the other two can be.
    for name, split in (("train", train), ("test", test)):
        if not split and (name == "train" or test_frac > 0):
            raise ValueError(
                f"{path}: the {name} split is empty; the data set has too few entries "
                f"for fractions train {train_frac}, test {test_frac}"
            )
    return DataSplits(
        kind="instruction", path=path, fingerprint=data_fingerprint(path, len(entries)),
        train=InstructionDataset(train, prompt_style, mask_instructions),
        val=InstructionDataset(val, prompt_style, mask_instructions),
        test=InstructionDataset(test, prompt_style, mask_instructions),
        train_entries=train, val_entries=val, test_entries=test,
        collate_fn=functools.partial(collate, allowed_max_length=context_length),
        prompt_style=prompt_style, mask_instructions=mask_instructions,
    )


def _prepare_text(path: str, context_length: int) -> DataSplits:
    """Non-overlapping windows of context_length tokens on a 90/10 split by characters."""
    text = read_text(path)
    split_idx = int(0.9 * len(text))
    datasets = {}
    for name, part in (("train", text[:split_idx]), ("validation", text[split_idx:])):
        token_ids = encode(part)
        datasets[name] = TextWindowDataset(token_ids, max_length=context_length, stride=context_length)
        if not datasets[name]:
            raise ValueError(
                f"{path}: the {name} part has {len(token_ids)} tokens, too few for one window of "
                f"{context_length} tokens plus a target; use a longer text or a smaller context length"
            )
    return DataSplits(kind="text", path=path, fingerprint=data_fingerprint(path, None),
                      train=datasets["train"], val=datasets["validation"], test=None)


def check_batchable(splits: DataSplits, batch_size: int) -> None:
    """ValueError if the train split cannot fill one batch (training drops an incomplete last batch)."""
    if len(splits.train) < batch_size:
        unit = "examples" if splits.kind == "instruction" else "windows"
        raise ValueError(
            f"{splits.path}: the train split has {len(splits.train)} {unit}, "
            f"fewer than the batch size of {batch_size}; use a smaller batch size or more data"
        )


def summarize_data(splits: DataSplits, batch_size: int, context_length: int) -> str:
    """A few lines on the data: split sizes, token lengths, truncation and padding."""
    if splits.kind == "text":
        return (f"text data: {splits.path}\n"
                f"windows of {context_length} tokens: {len(splits.train)} train, {len(splits.val)} validation")
    named = [("train", splits.train), ("val", splits.val), ("test", splits.test)]
    lengths = splits.train.lengths
    too_long = ", ".join(f"{sum(n > context_length for n in d.lengths)} {name}" for name, d in named)
    lines = [
        f"instruction data: {splits.path} (prompt style {splits.prompt_style}, "
        f"instructions {'masked' if splits.mask_instructions else 'not masked'} in the loss)",
        "examples: " + ", ".join(f"{len(d)} {name}" for name, d in named),
        f"tokens per train example: min {min(lengths)}, mean {np.mean(lengths):.1f}, max {max(lengths)}",
        f"longer than the context length of {context_length} (truncated): {too_long}",
    ]
    if splits.mask_instructions:
        # Such an example has no target left that counts in the loss.
        no_response = sum(n > context_length for n in splits.train.prompt_lengths)
        lines.append(f"train examples whose prompt alone fills the context (nothing to learn): {no_response}")
    shuffled = batch_indices(lengths, batch_size, shuffle=True, drop_last=True)
    grouped = batch_indices(lengths, batch_size, shuffle=True, drop_last=True, group_by_length=True)
    lines.append(
        f"padding in train batches of {batch_size}: "
        f"{padding_fraction(lengths, shuffled, context_length):.1%} of input tokens shuffled, "
        f"{padding_fraction(lengths, grouped, context_length):.1%} grouped by length"
    )
    return "\n".join(lines)


# ----------------------------------------------------------------------------
# Command line

def main():
    p = argparse.ArgumentParser(description="Prepare a data set (the default one is downloaded once into "
                                "data/) and print its summary: split sizes, lengths, truncation, padding.")
    p.add_argument("--data", help="a .json/.jsonl instruction file or a .txt file (default: the chapter's data set)")
    p.add_argument("--prompt-style", default="alpaca", choices=list(PROMPT_STYLES))
    p.add_argument("--context-length", type=AT_LEAST_1, default=1024)
    p.add_argument("--batch-size", type=AT_LEAST_1, default=8)
    p.add_argument("--mask-instructions", action="store_true")
    args = p.parse_args()
    splits = prepare_data(args.data, args.prompt_style, args.context_length, args.mask_instructions)
    print(summarize_data(splits, args.batch_size, args.context_length))


if __name__ == "__main__":
    run_main(main)
