"""Data for instruction fine-tuning (and plain next-token training on raw text).

    python data.py [--data FILE]    # fetch the default data set once, print a summary

Follows "Fine-tuning to follow instructions" (Raschka, LLMs from scratch, ch07):
load Alpaca-style entries, split them 85/10/5 in file order, tokenize each as prompt
plus response (prompts.py), and batch them with the chapter's custom collate (pad
with <|endoftext|>, ignore padding in the loss). Conversations (OpenAI/TRL "messages"
or ShareGPT "conversations") are read too: an Alpaca entry is the one-turn
conversation it has always been. Preference data (a "chosen" and a "rejected"
response to each instruction, for DPO) is batched as pairs. A .txt file instead
gives sliding windows of raw text, as in the chapter on pretraining (ch05).
The tokenizer is GPT-2's unless a model's own is given (tokenizer=, prompts.py's
tokenizers): then the end and padding token is the one that ends an assistant turn
in the prompt style (turn_end_id: <|im_end|> in Qwen's chat template).
"""
import argparse
import functools
import hashlib
import json
import os
from dataclasses import dataclass, replace
from typing import Callable, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from common import AT_LEAST_1, IGNORE_INDEX, download, plural, run_main
from dedup import leak_summary
from prompts import (CHAT_TEMPLATE, EOT_ID, GPT2, PROMPT_STYLES, ROLES, encode_conversation, entry_messages,
                     get_prompt_style, turn_end_id)

TRAIN_FRAC, TEST_FRAC = 0.85, 0.10  # the chapter's split: the rest (0.05) is validation
DEFAULT_DATA_URL = (
    "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/"
    "ch07/01_main-chapter-code/instruction-data.json"
)


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
    """The UTF-8 text of a data file, with a one-sentence error if it is missing, empty or not text."""
    if os.path.isdir(path):
        raise FileNotFoundError(f"{path} is a directory, not a data file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such data file")
    try:
        with open(path, encoding="utf-8-sig") as f:  # -sig: tolerate a byte-order mark
            text = f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start})") from None
    if not text.strip():
        raise ValueError(f"{path}: the file is empty" + (" (nothing but whitespace)" if text else ""))
    return text


def is_raw_text(path: str) -> bool:
    """A .txt file (any case: notes.TXT too) is raw text; anything else is instruction data."""
    return path.lower().endswith(".txt")


def _parse_json(path: str, text: str) -> list:
    """The entries of a JSON array, or of one JSON value a line (JSON Lines), recognised by the
    content whatever the name: a .jsonl file holding an array (pretty-printed or on one line) is
    an array. The name only picks the error: a broken .jsonl file names its broken line."""
    is_jsonl = path.lower().endswith(".jsonl")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        if text.lstrip().startswith("["):  # an array, whatever the name: JSON's own error
            raise ValueError(f"{path}: not valid JSON: {e}") from None
        if is_jsonl:
            return _parse_json_lines(path, text)
        if e.msg != "Extra data":  # more than one value: try it as JSON Lines
            raise ValueError(f"{path}: not valid JSON: {e}") from None
        try:
            return _parse_json_lines(path, text)
        except ValueError as lines_error:
            detail = str(lines_error).removeprefix(f"{path}: ")
            raise ValueError(f"{path}: not valid JSON ({e}), nor JSON Lines ({detail})") from None
    return [value] if is_jsonl and isinstance(value, dict) else value  # a .jsonl file of one line


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
    """Alpaca entries (`instruction`, `output` and an optional `input`) or conversations
    (`messages` as OpenAI and TRL write them, or ShareGPT's `conversations`, read into
    `messages`); one file holds one kind, recognised from its first entry.
    An Alpaca preference entry (dpo.py) may lack `output`, which is then its `chosen` response.

    Reads a JSON array or a JSON Lines (.jsonl) file. Every problem is a ValueError
    naming the file and the entry; nothing is dropped. A missing `input` becomes "".
    """
    entries = _parse_json(path, read_text(path))
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a list of entries, got a JSON {json_kind(entries)}")
    if not entries:
        raise ValueError(f"{path}: the data set has no entries")
    conversations = isinstance(entries[0], dict) and bool(CONVERSATION_KEYS & set(entries[0]))
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: entry {i}: expected an object, got {json_kind(entry)}")
        if conversations:
            entries[i] = read_conversation(path, i, entry)
            continue
        if "output" not in entry and isinstance(entry.get("chosen"), str):
            entry["output"] = entry["chosen"]  # a preference entry (dpo.py): its preferred response is the output
        for key in ("instruction", "output"):
            if key not in entry:
                detail = " (the first entry is an Alpaca entry, so all are)" if CONVERSATION_KEYS & set(entry) else ""
                raise ValueError(f"{path}: entry {i}: missing {key!r}{detail}")
        entry.setdefault("input", "")
        for key in ("instruction", "input", "output"):
            if not isinstance(entry[key], str):
                raise ValueError(f"{path}: entry {i}: {key!r} must be a string, got {json_kind(entry[key])}")
    return entries


def json_kind(value) -> str:
    """What a value read from JSON is, for a message: "null" for None, else its Python type (dict, str)."""
    return "null" if value is None else type(value).__name__


# The two conversation layouts: the key of the turns, and of each turn's role and text.
CONVERSATION_KEYS = {"messages", "conversations"}
SHAREGPT_ROLES = {"system": "system", "human": "user", "gpt": "assistant"}


def read_conversation(path: str, i: int, entry: dict) -> dict:
    """Entry i of a conversation file with its turns checked and in the messages layout (other
    keys kept); a ValueError naming the entry and the turn otherwise."""
    if "messages" in entry:
        turns, role_key, text_key, roles = entry["messages"], "role", "content", {r: r for r in ROLES}
    elif "conversations" in entry:
        turns, role_key, text_key, roles = entry["conversations"], "from", "value", SHAREGPT_ROLES
    else:
        raise ValueError(f"{path}: entry {i}: no 'messages' (the first entry is a conversation, so all are)")
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"{path}: entry {i}: the conversation must be a non-empty list of turns")
    messages = []
    for t, turn in enumerate(turns):
        where = f"{path}: entry {i}, turn {t}"
        role = roles.get(turn.get(role_key)) if isinstance(turn, dict) else None
        if role is None:
            raise ValueError(f"{where}: expected an object whose {role_key!r} is one of {', '.join(roles)}"
                             + (f", got {turn.get(role_key)!r}" if isinstance(turn, dict) else ""))
        text = turn_text(where, text_key, turn.get(text_key))
        previous = messages[-1]["role"] if messages else None
        if role == "system" and messages:
            raise ValueError(f"{where}: a system message may only come first")
        if role == previous:
            raise ValueError(f"{where}: two {role} turns in a row; user and assistant turns alternate")
        if role == "assistant" and previous in (None, "system"):
            raise ValueError(f"{where}: an assistant turn before any user turn")
        messages.append({"role": role, "content": text, **turn_weight(where, role, turn, last=t == len(turns) - 1)})
    if messages[-1]["role"] != "assistant":
        raise ValueError(f"{path}: entry {i}, turn {len(turns) - 1}: the conversation ends with a "
                         f"{messages[-1]['role']} turn; it needs an assistant turn last, to learn from")
    return {**{k: v for k, v in entry.items() if k not in CONVERSATION_KEYS}, "messages": messages}


def turn_text(where: str, text_key: str, text) -> str:
    """A turn's text: a string, or as OpenAI's format allows a list of content parts
    ({"type": "text", "text": ...}), whose texts are joined as they are, with nothing between."""
    if isinstance(text, list):
        for k, part in enumerate(text):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in (None, "text"):
                raise ValueError(f"{where}: {text_key!r} part {k} is of type {kind!r}; only text parts can be "
                                 "trained on (GPT-2 reads text)")
            if kind is None or not isinstance(part.get("text"), str):
                raise ValueError(f"{where}: {text_key!r} part {k} must be an object "
                                 '{"type": "text", "text": "..."}')
        text = "".join(part["text"] for part in text)
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{where}: {text_key!r} must be a non-empty string (or a list of text parts)")
    return text


def turn_weight(where: str, role: str, turn: dict, last: bool) -> dict:
    """{"weight": 0} for an assistant turn that OpenAI's fine-tuning format leaves out of the loss
    (honoured with --mask-instructions), else {}. Only an earlier assistant turn may have weight
    0: the last is the one a conversation is trained on and evaluated against."""
    if "weight" not in turn:
        return {}
    weight = turn["weight"]
    if role != "assistant" or weight not in (0, 1) or isinstance(weight, bool):
        raise ValueError(f"{where}: 'weight' must be 0 or 1, on an assistant turn (OpenAI's fine-tuning format); "
                         f"this {role} turn has {json.dumps(weight)}")
    if weight == 0 and last:
        raise ValueError(f"{where}: the last assistant turn has 'weight': 0, but it is the one the conversation is "
                         "trained on (and eval.py's reference); weight 0 goes on earlier assistant turns")
    return {"weight": 0} if weight == 0 else {}


def split_data(entries: list, train_frac: float = TRAIN_FRAC, test_frac: float = TEST_FRAC):
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
    """Entries tokenized once (by `tokenizer`, GPT-2's by default): prompt tokens followed
    by response tokens.

    Prompt and response are tokenized separately and concatenated, so the number of
    prompt tokens is exact and a generation prompt tokenizes to the same ids.
    Items are token lists (the collate appends the end token: <|endoftext|>, or the
    style's turn_end_id), or (tokens, n_prompt_tokens) pairs with mask_instructions, so
    the loss skips the prompt.
    A conversation is rendered by encode_conversation: its prompt is everything before
    its last assistant turn, and with mask_instructions and several assistant turns
    its item is (tokens, learned), so the loss counts every assistant turn but those
    of "weight" 0 (OpenAI's fine-tuning format), which are context only.
    """

    def __init__(self, entries: list[dict], prompt_style: str = "alpaca", mask_instructions: bool = False,
                 tokenizer=GPT2):
        self.entries = entries
        self.mask_instructions = mask_instructions
        self.token_ids, self.prompt_lengths, self.learned = [], [], []
        for entry in entries:
            messages = entry_messages(entry)
            ids, learned = encode_conversation(messages, prompt_style, tokenizer)
            learned = unweighted_turns_left_out(learned, messages)
            prompt_length = len(ids)  # up to the last assistant turn, the run of learned tokens at the end
            while prompt_length and learned[prompt_length - 1]:
                prompt_length -= 1
            self.token_ids.append(ids)
            self.prompt_lengths.append(prompt_length)
            # one assistant turn: the prompt length says it all (the chapter's exercise 7.2)
            self.learned.append(learned if any(learned[:prompt_length]) else prompt_length)
        self.lengths = [len(ids) for ids in self.token_ids]

    def __len__(self):
        return len(self.token_ids)

    def __getitem__(self, index):
        if self.mask_instructions:
            return self.token_ids[index], self.learned[index]
        return self.token_ids[index]


def unweighted_turns_left_out(learned: list[bool], messages: list[dict]) -> list[bool]:
    """learned (encode_conversation's) without the assistant turns of "weight" 0: the k-th run of
    learned tokens is the k-th assistant turn (a user turn, never empty, lies between two)."""
    weights = [m.get("weight", 1) for m in messages if m["role"] == "assistant"]
    if all(weights):
        return learned
    turn, kept = -1, []
    for j, is_learned in enumerate(learned):
        if is_learned and (j == 0 or not learned[j - 1]):
            turn += 1  # the first token of the next assistant turn
        kept.append(is_learned and weights[turn] != 0)
    return kept


def count_unweighted_turns(entries: list[dict]) -> int:
    """The assistant turns of "weight" 0 in entries (conversations)."""
    return sum(m.get("weight") == 0 for entry in entries for m in entry.get("messages", ()))


def collate(batch, pad_token_id: int = EOT_ID, ignore_index: int = IGNORE_INDEX,
            allowed_max_length: Optional[int] = None):
    """(inputs, targets) LongTensors of a batch of token lists, as the chapter's custom collate.

    Each item gets one pad_token_id, the end token (GPT-2's <|endoftext|>; prepare_data
    gives the style's turn_end_id), and is padded with it to the longest item plus one;
    inputs drop the last token and targets the first. Items may be
    (tokens, n_prompt_tokens) pairs: then targets predicting a prompt token are
    ignored too, and the loss covers only the response and its end-of-text token.
    In a (tokens, learned) pair, learned[j] says whether predicting token j counts
    (a conversation's assistant turns); the last end-of-text always counts.
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
        if isinstance(n_prompt_tokens, int):
            n_masked = max(n_prompt_tokens - 1, 0)
            item_targets[:n_masked] = [ignore_index] * n_masked
        else:
            for j, learned in enumerate(n_prompt_tokens[1:]):
                if not learned:
                    item_targets[j] = ignore_index
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
                         f"differs (sha256 {splits.fingerprint['sha256'][:12]}... with "
                         f"{fingerprint_size(splits.fingerprint)}, not {fingerprint['sha256'][:12]}... with "
                         f"{fingerprint_size(fingerprint)})")


def fingerprint_size(fingerprint: dict) -> str:
    """What a data fingerprint counts: "1,100 entries", or "raw text", which has no entries."""
    return "raw text" if fingerprint["entries"] is None else plural(fingerprint["entries"], "entry", "entries")


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
    tokenizer: object = GPT2  # what tokenized the data (prompts.py's GPT2 or an HFTokenizer)


def check_prompt_style(style: str, tokenizer=GPT2) -> None:
    """ValueError unless the style is known and, for the chat-template style, the tokenizer has a template."""
    if style != CHAT_TEMPLATE:
        get_prompt_style(style)  # an unknown style: the known ones are listed
    elif tokenizer.chat_template is None:
        raise ValueError(f"prompt style {CHAT_TEMPLATE} renders the model's own chat template, and "
                         f"{tokenizer.name}'s tokenizer has none; use --prompt-style alpaca, phi3 or none")


def prepare_data(path: Optional[str], prompt_style: str = "alpaca", context_length: int = 1024,
                 mask_instructions: bool = False, train_frac: float = TRAIN_FRAC,
                 test_frac: float = TEST_FRAC, tokenizer=GPT2) -> DataSplits:
    """Datasets for `path`: instruction JSON/JSONL (default: the chapter's data set) or a .txt file,
    tokenized by `tokenizer` (GPT-2's by default, else a model's own from prompts.load_tokenizer).
    A special token typed in the data ("<|im_end|>") is text, never the token (prompts.py)."""
    check_prompt_style(prompt_style, tokenizer)  # fail early on an unknown style
    if path is None:
        path = default_data_path()
    if is_raw_text(path):
        return _prepare_text(path, context_length, tokenizer)
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
        train=InstructionDataset(train, prompt_style, mask_instructions, tokenizer),
        val=InstructionDataset(val, prompt_style, mask_instructions, tokenizer),
        test=InstructionDataset(test, prompt_style, mask_instructions, tokenizer),
        train_entries=train, val_entries=val, test_entries=test,
        collate_fn=functools.partial(collate, pad_token_id=turn_end_id(prompt_style, tokenizer),
                                     allowed_max_length=context_length),
        prompt_style=prompt_style, mask_instructions=mask_instructions, tokenizer=tokenizer,
    )


def _prepare_text(path: str, context_length: int, tokenizer=GPT2) -> DataSplits:
    """Non-overlapping windows of context_length tokens on a 90/10 split by characters."""
    text = read_text(path)
    split_idx = int(0.9 * len(text))
    datasets = {}
    for name, part in (("train", text[:split_idx]), ("validation", text[split_idx:])):
        token_ids = tokenizer.encode(part)
        datasets[name] = TextWindowDataset(token_ids, max_length=context_length, stride=context_length)
        if not datasets[name]:
            raise ValueError(
                f"{path}: the {name} part has {plural(len(token_ids), 'token')}, too few for one window of "
                f"{context_length} tokens plus a target; use a longer text or a smaller context length"
            )
    return DataSplits(kind="text", path=path, fingerprint=data_fingerprint(path, None),
                      train=datasets["train"], val=datasets["validation"], test=None, tokenizer=tokenizer)


def check_batchable(splits: DataSplits, batch_size: int) -> None:
    """ValueError if the train split cannot fill one batch (training drops an incomplete last batch)."""
    if len(splits.train) < batch_size:
        unit = "example" if splits.kind == "instruction" else "window"
        raise ValueError(
            f"{splits.path}: the train split has {plural(len(splits.train), unit)}, "
            f"fewer than the batch size of {batch_size}; use a smaller batch size or more data"
        )


# ----------------------------------------------------------------------------
# Preference data (train.py --dpo): a chosen and a rejected response to each instruction

PAIR_KEYS = ("chosen", "rejected")


def check_preference_entries(path, entries):
    """ValueError naming the first entry (in file order) without a non-empty string `chosen` and `rejected`."""
    for i, entry in enumerate(entries):
        for key in PAIR_KEYS:
            value = entry.get(key)
            if key not in entry:
                problem = "has no"
            elif not isinstance(value, str):
                problem = f"has a {json_kind(value)}, not a string, as"
            elif not value.strip():
                problem = "has an empty"
            else:
                continue
            raise ValueError(f"{path}: entry {i} {problem} {key!r} response; preference data (--dpo) needs a "
                             "non-empty 'chosen' and 'rejected' in every entry")


class PreferenceDataset(Dataset):
    """Pairs tokenized once (by `tokenizer`), as two InstructionDatasets whose outputs are the
    chosen and the rejected responses, with the prompt masked (a response's log-probability is
    given its prompt). An item is (chosen item, rejected item, reference log-probs of the pair:
    NaN until the reference pass has set `reference`, an (N, 2) tensor)."""

    def __init__(self, entries, prompt_style="alpaca", tokenizer=GPT2):
        self.entries = entries
        self.chosen, self.rejected = (
            InstructionDataset([{**entry, "output": entry[key]} for entry in entries], prompt_style,
                               mask_instructions=True, tokenizer=tokenizer) for key in PAIR_KEYS)
        self.lengths = [max(a, b) for a, b in zip(self.chosen.lengths, self.rejected.lengths)]
        self.prompt_lengths, self.learned = self.chosen.prompt_lengths, self.chosen.learned  # for summarize_data
        self.reference = None

    def __len__(self):
        return len(self.entries)

    def __getitem__(self, index):
        reference = self.reference[index] if self.reference is not None else torch.full((2,), float("nan"))
        return self.chosen[index], self.rejected[index], reference


def collate_pairs(batch, allowed_max_length=None, pad_token_id=EOT_ID):
    """(inputs, targets, reference) of a batch of B pairs: the chapter's collate on the B chosen
    then the B rejected sequences (one batch of 2B rows, padded alike with pad_token_id, the end
    token), and the pairs' reference log-probs (B, 2)."""
    inputs, targets = collate([chosen for chosen, _, _ in batch] + [rejected for _, rejected, _ in batch],
                              pad_token_id=pad_token_id, allowed_max_length=allowed_max_length)
    return inputs, targets, torch.stack([reference for _, _, reference in batch])


def preference_splits(splits, context_length):
    """prepare_data's splits with pair datasets for train, validation and test, batched by collate_pairs."""
    if splits.kind != "instruction":
        raise ValueError(f"{splits.path} is raw text; --dpo needs preference data (.json/.jsonl entries with "
                         "'chosen' and 'rejected' responses)")
    check_preference_entries(splits.path, splits.train_entries + splits.test_entries + splits.val_entries)
    style, tokenizer = splits.prompt_style, splits.tokenizer
    return replace(
        splits, train=PreferenceDataset(splits.train_entries, style, tokenizer),
        val=PreferenceDataset(splits.val_entries, style, tokenizer),
        test=PreferenceDataset(splits.test_entries, style, tokenizer),
        collate_fn=functools.partial(collate_pairs, allowed_max_length=context_length,
                                     pad_token_id=turn_end_id(style, tokenizer)), mask_instructions=True)


def summarize_pairs(splits, context_length):
    """The data summary's line on pairs: those without a preference, and those truncated."""
    named = [("train", splits.train), ("val", splits.val), ("test", splits.test)]
    same = sum(entry["chosen"] == entry["rejected"] for _, d in named for entry in d.entries)
    too_long = ", ".join(f"{sum(n > context_length for n in d.lengths)} {name}" for name, d in named)
    return (f"preference pairs: {same} with chosen equal to rejected (no preference; kept, so the split stays); "
            f"pairs longer than the context of {context_length} (truncated): {too_long}")


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
    lines.append(leak_summary(splits.train_entries, splits.test_entries, splits.val_entries))
    if "messages" in splits.train_entries[0]:
        entries = splits.train_entries + splits.val_entries + splits.test_entries
        multi = sum(sum(m["role"] == "assistant" for m in e["messages"]) > 1 for e in entries)
        line = f"conversations: {multi} of {len(entries)} with more than one assistant turn"
        if unweighted := count_unweighted_turns(entries):
            left_out = ("left out of the loss" if splits.mask_instructions else
                        "in the loss all the same (only --mask-instructions leaves them out)")
            line += f"; {plural(unweighted, 'assistant turn')} of weight 0, {left_out}"
        lines.insert(1, line)
    if splits.mask_instructions:
        # Such an example has no target left that counts in the loss.
        first_learned = [n if isinstance(n, int) else n.index(True) for n in splits.train.learned]
        no_response = sum(n > context_length for n in first_learned)
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
                                "data/) and print its summary: split sizes, lengths, truncation, padding.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", help="instruction data (a JSON array or JSON Lines, whatever the name): Alpaca "
                   "entries, conversations, or preference pairs (shown as train.py --dpo takes them); or raw text "
                   "(.txt); none: the chapter's data set, downloaded once into data/")
    p.add_argument("--prompt-style", default="alpaca", choices=list(PROMPT_STYLES), help="prompt template")
    p.add_argument("--context-length", type=AT_LEAST_1, default=1024,
                   help="tokens per sequence: longer examples count as truncated; raw text windows have this length")
    p.add_argument("--batch-size", type=AT_LEAST_1, default=8, help="examples per batch, for the padding figures")
    p.add_argument("--mask-instructions", action="store_true",
                   help="count only response tokens in the loss (reports prompts that fill the context)")
    args = p.parse_args()
    splits = prepare_data(args.data, args.prompt_style, args.context_length, args.mask_instructions)
    pairs = splits.kind == "instruction" and set(PAIR_KEYS) <= set(splits.train_entries[0])
    if pairs:  # as train.py --dpo takes it
        splits = preference_splits(splits, args.context_length)
    print(summarize_data(splits, args.batch_size, args.context_length))
    if pairs:
        print(summarize_pairs(splits, args.context_length))


if __name__ == "__main__":
    run_main(main)
