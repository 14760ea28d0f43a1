"""Tests of data.py on small data made here (no network, no ../shared)."""
import hashlib
import json
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import data
import prompts
from prompts import EOT_ID
from common import IGNORE_INDEX
import scripts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALPACA_HEAD = ("Below is an instruction that describes a task. "
               "Write a response that appropriately completes the request.")


def make_entries(n):
    return [{"instruction": f"Say {i}.", "input": "" if i % 2 else f"n={i}", "output": f"{i}"} for i in range(n)]


def write_json(tmp_path, value, name="data.json"):
    path = tmp_path / name
    path.write_text(json.dumps(value), encoding="utf-8")
    return str(path)


# ---------------------------------------------------------------------------- tokenizer

def test_encode_round_trips_unicode_emoji_and_literal_endoftext():
    text = "Grüße, 日本語 🙂🚀 and a literal <|endoftext|> in the middle"
    ids = prompts.encode(text)
    assert EOT_ID not in ids
    assert prompts.decode(ids) == text
    assert prompts.decode(torch.tensor(ids)) == text
    assert prompts.encode("<|endoftext|>") == [27, 91, 437, 1659, 5239, 91, 29]


# ---------------------------------------------------------------------------- prompt styles

def test_alpaca_prompt_is_byte_for_byte_the_chapters_format():
    entry = {"instruction": "Edit the sentence.", "input": "He go home.", "output": "He goes home."}
    assert prompts.format_input(entry) == (
        ALPACA_HEAD + "\n\n### Instruction:\nEdit the sentence.\n\n### Input:\nHe go home.")
    assert prompts.format_prompt(entry) == prompts.format_input(entry) + "\n\n### Response:\n"
    no_input = {"instruction": "Name a color.", "input": "", "output": "Blue."}
    assert prompts.format_prompt(no_input) == ALPACA_HEAD + "\n\n### Instruction:\nName a color.\n\n### Response:\n"
    assert prompts.format_prompt({"instruction": "Name a color.", "output": "x"}) == prompts.format_prompt(no_input)


def test_phi3_prompt_uses_plain_text_markers():
    entry = {"instruction": "Edit the sentence.", "input": "He go home.", "output": "He goes home."}
    assert prompts.format_prompt(entry, "phi3") == "<|user|>\nEdit the sentence.\nHe go home.\n<|assistant|>:\n"
    entry["input"] = ""
    assert prompts.format_prompt(entry, "phi3") == "<|user|>\nEdit the sentence.\n<|assistant|>:\n"


def test_braces_in_user_text_are_kept_verbatim():
    entry = {"instruction": "Fill {input} and {0}", "input": "{instruction}", "output": ""}
    assert prompts.format_prompt(entry, "phi3") == "<|user|>\nFill {input} and {0}\n{instruction}\n<|assistant|>:\n"


def test_unknown_prompt_style_lists_the_known_ones(tmp_path):
    with pytest.raises(ValueError, match=r"unknown prompt style 'chatml'; known styles: alpaca, phi3"):
        prompts.format_prompt({"instruction": "x", "output": "y"}, "chatml")
    with pytest.raises(ValueError, match="known styles: alpaca, phi3"):
        data.prepare_data(write_json(tmp_path, make_entries(20)), prompt_style="chatml")


# ---------------------------------------------------------------------------- loading

def test_load_json_array_and_jsonl(tmp_path):
    entries = [{"instruction": "Hi 🙂 <|endoftext|>", "output": "Grüße", "extra": 1},
               {"instruction": "b", "input": "c", "output": "d"}]
    loaded = data.load_instruction_data(write_json(tmp_path, entries))
    assert loaded == [{"instruction": "Hi 🙂 <|endoftext|>", "input": "", "output": "Grüße", "extra": 1},
                      {"instruction": "b", "input": "c", "output": "d"}]
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("\n".join(json.dumps(e) for e in entries) + "\n\n", encoding="utf-8")
    assert data.load_instruction_data(str(jsonl)) == loaded


def test_load_tolerates_a_byte_order_mark(tmp_path):
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps([{"instruction": "a", "output": "b"}]).encode())
    assert data.load_instruction_data(str(path)) == [{"instruction": "a", "input": "", "output": "b"}]


BAD_DATA = [
    ("bad.json", "[{\"instruction\": \"a\",", r"bad\.json: not valid JSON: "),
    ("bad.json", json.dumps({"instruction": "a", "output": "b"}), r"bad\.json: expected a list of entries, got a JSON dict"),
    ("bad.json", "[]", r"bad\.json: the data set has no entries"),
    ("bad.jsonl", "\n\n", r"bad\.jsonl: the file is empty \(nothing but whitespace\)"),
    ("bad.json", "", r"bad\.json: the file is empty$"),
    ("bad.jsonl", "", r"bad\.jsonl: the file is empty$"),
    ("bad.jsonl", "[]", r"bad\.jsonl: the data set has no entries"),
    ("bad.jsonl", '[\n  {"instruction": "a", "output": "b"},\n', r"bad\.jsonl: not valid JSON: "),  # an array: no "line 1"
    ("bad.json", json.dumps([{"instruction": "a", "output": "b"}, "text"]), r"bad\.json: entry 1: expected an object, got str"),
    ("bad.json", json.dumps([{"instruction": "a", "output": "b"}, {"output": "b"}]), r"bad\.json: entry 1: missing 'instruction'"),
    ("bad.json", json.dumps([{"instruction": "a", "input": "b"}]), r"bad\.json: entry 0: missing 'output'"),
    ("bad.json", json.dumps([{"instruction": "a", "output": 3}]), r"bad\.json: entry 0: 'output' must be a string, got int"),
    ("bad.json", json.dumps([{"instruction": ["a"], "output": "b"}]), r"bad\.json: entry 0: 'instruction' must be a string, got list"),
    ("bad.json", json.dumps([{"instruction": "a", "input": None, "output": "b"}]), r"bad\.json: entry 0: 'input' must be a string, got null"),
    ("bad.jsonl", '{"instruction": "a", "output": "b"}\n\n{"instruction": "a", "output"}\n', r"bad\.jsonl: line 3: not valid JSON: "),
    ("bad.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n', r"bad\.jsonl: entry 1: missing 'output'"),
    ("bad", '{"instruction": "a", "output": "b"}\n{"instruction": "a", "output"}\n',
     r"bad: not valid JSON \(Extra data: line 2 column 1 \(char 36\)\), nor JSON Lines \(line 2: not valid JSON: "),
]


@pytest.mark.parametrize("name, content, message", BAD_DATA)
def test_bad_data_gives_one_clear_error(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match="^" + str(tmp_path).replace("\\", "\\\\") + "/" + message):
        data.load_instruction_data(str(path))


def test_json_lines_are_recognised_by_content_whatever_the_name(tmp_path):
    entries = make_entries(3)
    for name in ("DATA.JSONL", "data", "data.json"):
        (tmp_path / name).write_text("\n".join(json.dumps(e) for e in entries) + "\n", encoding="utf-8")
        assert data.load_instruction_data(str(tmp_path / name)) == [{"input": "", **e} for e in entries]


def test_a_json_array_is_an_array_whatever_the_name(tmp_path):
    entries = make_entries(3)
    loaded = [{"input": "", **e} for e in entries]
    (tmp_path / "pretty.jsonl").write_text(json.dumps(entries, indent=2), encoding="utf-8")
    (tmp_path / "one-line.jsonl").write_text(json.dumps(entries) + "\n", encoding="utf-8")
    (tmp_path / "one-entry.jsonl").write_text(json.dumps(entries[0]) + "\n", encoding="utf-8")
    assert data.load_instruction_data(str(tmp_path / "pretty.jsonl")) == loaded
    assert data.load_instruction_data(str(tmp_path / "one-line.jsonl")) == loaded
    assert data.load_instruction_data(str(tmp_path / "one-entry.jsonl")) == loaded[:1]


def test_txt_in_any_case_is_raw_text_and_an_empty_one_says_so(tmp_path):
    (tmp_path / "verdict.TXT").write_text("It was the best of times, it was the worst of times. " * 40)
    splits = data.prepare_data(str(tmp_path / "verdict.TXT"), context_length=32)
    assert splits.kind == "text" and len(splits.train) > 0 and splits.fingerprint["entries"] is None
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match=f"^{tmp_path}/empty.txt: the file is empty$"):
        data.prepare_data(str(tmp_path / "empty.txt"))


def test_counts_in_messages_are_singular_for_one(tmp_path):
    splits = data.prepare_data(write_json(tmp_path, make_entries(2)), test_frac=0.0)  # 1 train, 1 validation
    with pytest.raises(ValueError, match=r"the train split has 1 example, fewer than the batch size of 2;"):
        data.check_batchable(splits, 2)
    other = {"sha256": "0" * 64, "entries": 1}
    with pytest.raises(ValueError, match=r"\(sha256 [0-9a-f]{12}\.\.\. with 2 entries, not 000000000000\.\.\. "
                                         r"with 1 entry\)$"):
        data.check_same_data(splits, other, "elsewhere.json")


def test_help_describes_every_flag_with_its_default():
    proc = scripts.run([sys.executable, "data.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    text = " ".join(proc.stdout.split())
    assert proc.returncode == 0
    for flag, said in (("--data DATA", "instruction data (a JSON array or JSON Lines, whatever the name)"),
                       ("--prompt-style {alpaca,phi3,none}", "prompt template (default: alpaca)"),
                       ("--context-length CONTEXT_LENGTH", "(default: 1024)"),
                       ("--batch-size BATCH_SIZE", "for the padding figures (default: 8)"),
                       ("--mask-instructions", "count only response tokens in the loss")):
        assert f"{flag} " in text and said in text.split(flag, 1)[1], flag


def test_missing_and_non_utf8_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.json: no such data file"):
        data.load_instruction_data(str(tmp_path / "nope.json"))
    with pytest.raises(FileNotFoundError, match=f"^{tmp_path} is a directory, not a data file$"):
        data.load_instruction_data(str(tmp_path))
    path = tmp_path / "latin1.json"
    path.write_bytes(b'[{"instruction": "caf\xe9", "output": "b"}]')
    with pytest.raises(ValueError, match=r"latin1\.json: not UTF-8 text \(byte 21\)"):
        data.load_instruction_data(str(path))


def test_tokenizer_download_failure_says_what_failed_and_how_to_work_offline(monkeypatch):
    import requests

    def no_network(name):
        raise requests.exceptions.ConnectionError("HTTPSConnectionPool(host='...'): Max retries exceeded")

    monkeypatch.setattr(prompts.tiktoken, "get_encoding", no_network)
    prompts.get_tokenizer.cache_clear()
    try:
        with pytest.raises(OSError, match=r"^could not load GPT-2's tokenizer files \(ConnectionError\); tiktoken "
                           r"downloads them once, so check the network, or for offline use set TIKTOKEN_CACHE_DIR"):
            prompts.encode("hello")
    finally:
        prompts.get_tokenizer.cache_clear()


def test_data_fingerprint_names_the_content_not_the_path(tmp_path):
    a = write_json(tmp_path, make_entries(20), "a.json")
    b = tmp_path / "moved" / "b.json"
    os.makedirs(b.parent)
    b.write_bytes(open(a, "rb").read())
    fingerprint = data.prepare_data(a).fingerprint
    assert fingerprint == data.prepare_data(str(b)).fingerprint
    assert fingerprint == {"sha256": hashlib.sha256(open(a, "rb").read()).hexdigest(), "entries": 20}
    changed = write_json(tmp_path, make_entries(21), "c.json")
    assert data.prepare_data(changed).fingerprint["entries"] == 21
    with pytest.raises(ValueError, match=f"^{changed} is not the data the checkpoint was trained on \\({a}\\): its "
                       "content differs"):
        data.check_same_data(data.prepare_data(changed), fingerprint, a)


# ---------------------------------------------------------------------------- default data set

def test_default_data_is_downloaded_once_then_reused(tmp_path, monkeypatch):
    source = write_json(tmp_path, make_entries(3), "source.json")
    monkeypatch.setattr(data, "DEFAULT_DATA_URL", (tmp_path / "source.json").as_uri())
    data_dir = tmp_path / "data"
    path = data.default_data_path(str(data_dir))
    assert path == str(data_dir / "source.json")
    assert data.load_instruction_data(path) == data.load_instruction_data(source)
    assert sorted(p.name for p in data_dir.iterdir()) == ["source.json"]  # no temporary file left
    (tmp_path / "source.json").unlink()  # no "network" any more: the local copy is reused
    assert data.default_data_path(str(data_dir)) == path


def test_default_data_without_network_says_to_pass_data(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DEFAULT_DATA_URL", (tmp_path / "missing.json").as_uri())
    with pytest.raises(ValueError, match=r"the default data set: could not download .*check the network, or pass a local file with --data PATH"):
        data.default_data_path(str(tmp_path / "data"))
    assert not list(tmp_path.glob("data/*"))


def test_default_data_that_is_not_json_is_not_saved(tmp_path, monkeypatch):
    (tmp_path / "page.json").write_text("<html>rate limited</html>")
    monkeypatch.setattr(data, "DEFAULT_DATA_URL", (tmp_path / "page.json").as_uri())
    with pytest.raises(ValueError, match="did not return JSON; pass a local file with --data PATH"):
        data.default_data_path(str(tmp_path / "data"))
    assert not list(tmp_path.glob("data/*"))


# ---------------------------------------------------------------------------- splitting

def test_split_reproduces_the_chapters_counts_in_file_order():
    entries = make_entries(1100)
    train, test, val = data.split_data(entries)
    assert (len(train), len(test), len(val)) == (935, 110, 55)
    assert train + test + val == entries
    assert test[0] is entries[935] and val[0] is entries[1045]
    train, test, val = data.split_data(make_entries(10), train_frac=0.5, test_frac=0.2)
    assert [len(train), len(test), len(val)] == [5, 2, 3]


@pytest.mark.parametrize("train_frac, test_frac", [(0.0, 0.1), (0.9, 0.1), (0.5, -0.1), (1.2, 0.0)])
def test_bad_split_fractions(train_frac, test_frac):
    with pytest.raises(ValueError, match="bad split fractions"):
        data.split_data(make_entries(10), train_frac, test_frac)


# ---------------------------------------------------------------------------- dataset

def test_instruction_dataset_tokenizes_prompt_and_response_separately():
    entries = [{"instruction": "Say hi 🙂", "input": "<|endoftext|>", "output": "Hi!"},
               {"instruction": "Count.", "input": "", "output": ""}]
    ds = data.InstructionDataset(entries)
    prompt = prompts.encode(prompts.format_prompt(entries[0]))
    assert ds[0] == prompt + prompts.encode("Hi!")
    assert ds.prompt_lengths[0] == len(prompt)
    assert ds.lengths == [len(ds[0]), len(prompts.encode(prompts.format_prompt(entries[1])))]
    assert ds.entries is entries and len(ds) == 2
    assert prompts.decode(ds[0]) == prompts.format_prompt(entries[0]) + "Hi!"

    masked = data.InstructionDataset(entries, prompt_style="phi3", mask_instructions=True)
    ids, n_prompt = masked[0]
    assert n_prompt == len(prompts.encode("<|user|>\nSay hi 🙂\n<|endoftext|>\n<|assistant|>:\n"))
    assert prompts.decode(ids[:n_prompt]).endswith("<|assistant|>:\n")
    assert prompts.decode(ids[n_prompt:]) == "Hi!"
    assert EOT_ID not in ids


# ---------------------------------------------------------------------------- collate

def test_collate_reproduces_the_chapters_worked_example():
    batch = [[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]]
    inputs, targets = data.collate(batch)
    assert inputs.tolist() == [[0, 1, 2, 3, 4], [5, 6, 50256, 50256, 50256], [7, 8, 9, 50256, 50256]]
    assert targets.tolist() == [[1, 2, 3, 4, 50256], [6, 50256, -100, -100, -100], [8, 9, 50256, -100, -100]]
    assert inputs.dtype == targets.dtype == torch.long
    assert inputs.device.type == targets.device.type == "cpu"
    assert batch == [[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]]  # the caller's lists are untouched


def test_collate_truncates_to_allowed_max_length():
    inputs, targets = data.collate([[0, 1, 2, 3, 4], [5, 6]], allowed_max_length=3)
    assert inputs.tolist() == [[0, 1, 2], [5, 6, 50256]]
    assert targets.tolist() == [[1, 2, 3], [6, 50256, -100]]


def test_collate_with_other_pad_and_ignore_ids():
    inputs, targets = data.collate([[1, 2, 3], [4]], pad_token_id=0, ignore_index=-1)
    assert inputs.tolist() == [[1, 2, 3], [4, 0, 0]]
    assert targets.tolist() == [[2, 3, 0], [0, -1, -1]]


def test_collate_masks_the_prompt_when_given_its_length():
    batch = [([10, 11, 12, 20, 21], 3), ([10, 11, 20], 2)]
    inputs, targets = data.collate(batch)
    assert inputs.tolist() == [[10, 11, 12, 20, 21], [10, 11, 20, 50256, 50256]]
    # Only targets that predict a response token or the end-of-text token count.
    assert targets.tolist() == [[-100, -100, 20, 21, 50256], [-100, 20, 50256, -100, -100]]
    assert batch == [([10, 11, 12, 20, 21], 3), ([10, 11, 20], 2)]


def test_truncation_can_leave_no_target_that_counts():
    inputs, targets = data.collate([([1, 2, 3, 4, 5, 6], 5), ([1, 2, 3, 4, 5], 4)], allowed_max_length=3)
    assert inputs.tolist() == [[1, 2, 3], [1, 2, 3]]
    assert targets.tolist() == [[-100, -100, -100], [-100, -100, -100]]
    # The loop sums the loss and divides by the count of counted targets: 0 tokens, not NaN.
    logits = torch.zeros(2, 3, 8)
    loss_sum = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
    assert loss_sum.item() == 0.0 and (targets != IGNORE_INDEX).sum().item() == 0


def test_collate_keeps_a_text_token_equal_to_the_pad_id():
    inputs, targets = data.collate([[7, EOT_ID, 8], [9]])
    assert targets.tolist() == [[EOT_ID, 8, EOT_ID], [EOT_ID, -100, -100]]


# ---------------------------------------------------------------------------- raw text windows

def test_text_windows_match_the_chapters_gpt_dataset():
    ds = data.TextWindowDataset(list(range(10)), max_length=4, stride=3)
    assert [(x.tolist(), y.tolist()) for x, y in ds] == [
        ([0, 1, 2, 3], [1, 2, 3, 4]), ([3, 4, 5, 6], [4, 5, 6, 7])]
    assert ds.lengths == [4, 4]
    assert len(data.TextWindowDataset(list(range(5)), max_length=4, stride=4)) == 1
    assert len(data.TextWindowDataset(list(range(4)), max_length=4, stride=4)) == 0


def test_prepare_text_data_splits_90_10_by_characters(tmp_path):
    text = "".join(f"word{i} " for i in range(300)) + "<|endoftext|> Grüße 🙂"
    path = tmp_path / "story.txt"
    path.write_text(text, encoding="utf-8")
    splits = data.prepare_data(str(path), context_length=16)
    split_idx = int(0.9 * len(text))
    train_ids, val_ids = prompts.encode(text[:split_idx]), prompts.encode(text[split_idx:])
    assert splits.kind == "text" and splits.test is None and splits.collate_fn is None
    assert splits.train_entries is None and splits.val_entries is None
    assert len(splits.train) == len(range(0, len(train_ids) - 16, 16))
    assert splits.val[0][0].tolist() == val_ids[:16] and splits.val[0][1].tolist() == val_ids[1:17]
    inputs, targets = next(iter(DataLoader(splits.train, batch_size=4, collate_fn=splits.collate_fn)))
    assert inputs.shape == targets.shape == (4, 16)
    assert torch.equal(inputs[0, 1:], targets[0, :-1])
    assert "windows of 16 tokens: " in data.summarize_data(splits, 4, 16)
    with pytest.raises(ValueError, match=r"story\.txt: the validation part has \d+ tokens, too few for one window of 512"):
        data.prepare_data(str(path), context_length=512)


# ---------------------------------------------------------------------------- batching

def test_batch_indices_in_file_order():
    assert data.batch_indices([1] * 7, 3, shuffle=False) == [[0, 1, 2], [3, 4, 5], [6]]
    assert data.batch_indices([1] * 7, 3, shuffle=False, drop_last=True) == [[0, 1, 2], [3, 4, 5]]


def test_batch_indices_shuffle_is_deterministic_per_seed_and_epoch():
    lengths = list(range(40))
    first = data.batch_indices(lengths, 4, shuffle=True, seed=1, epoch=0)
    assert first == data.batch_indices(lengths, 4, shuffle=True, seed=1, epoch=0)
    assert first != data.batch_indices(lengths, 4, shuffle=True, seed=1, epoch=1)
    assert first != data.batch_indices(lengths, 4, shuffle=True, seed=2, epoch=0)
    assert sorted(i for b in first for i in b) == lengths


def test_group_by_length_gives_batches_of_similar_length_in_random_order():
    lengths = [(i * 37) % 100 for i in range(100)]
    batches = data.batch_indices(lengths, 5, shuffle=True, group_by_length=True, seed=3)
    assert sorted(i for b in batches for i in b) == list(range(100))
    assert all(max(lengths[i] for i in b) - min(lengths[i] for i in b) == 4 for b in batches)
    batch_maxes = [max(lengths[i] for i in b) for b in batches]
    assert batch_maxes != sorted(batch_maxes)  # the batch order is still shuffled
    # Without shuffle: sorted within each chunk of 50 batches, in file order.
    assert data.batch_indices([3, 1, 2, 0], 2, shuffle=False, group_by_length=True) == [[3, 1], [2, 0]]


def test_group_by_length_sorts_only_within_chunks_of_50_batches():
    lengths = list(range(120, 0, -1))  # longest first
    batches = data.batch_indices(lengths, 1, shuffle=False, group_by_length=True)
    assert [b[0] for b in batches] == list(range(49, -1, -1)) + list(range(99, 49, -1)) + list(range(119, 99, -1))


def test_ranks_together_see_the_same_examples_as_one_process():
    lengths = [(i * 13) % 29 for i in range(30)]
    for group in (False, True):
        kwargs = dict(shuffle=True, seed=5, epoch=2, group_by_length=group)
        single = data.batch_indices(lengths, 6, drop_last=True, **kwargs)
        per_rank = [data.batch_indices(lengths, 2, drop_last=True, rank=r, world_size=3, **kwargs) for r in range(3)]
        assert [sum(steps, []) for steps in zip(*per_rank)] == single
    # Without drop_last the incomplete global batch comes last; a rank with nothing in it gets one batch fewer.
    ranks = [data.batch_indices([1] * 7, 2, shuffle=False, rank=r, world_size=2) for r in range(2)]
    assert ranks == [[[0, 1], [4, 5]], [[2, 3], [6]]]
    ranks = [data.batch_indices([1] * 5, 2, shuffle=False, rank=r, world_size=2) for r in range(2)]
    assert ranks == [[[0, 1], [4]], [[2, 3]]]


def test_batch_indices_feed_a_dataloader():
    ds = data.InstructionDataset(make_entries(6))
    sampler = data.batch_indices(ds.lengths, 4, shuffle=True, drop_last=True)
    batches = list(DataLoader(ds, batch_sampler=sampler, collate_fn=data.collate))
    assert len(batches) == 1 and batches[0][0].shape[0] == 4


def test_padding_fraction():
    # Batch widths 4 (lengths 4, 2: 2 pads) and 3 (lengths 3, 1: 2 pads): 4 of 14 input tokens.
    assert data.padding_fraction([4, 2, 3, 1], [[0, 1], [2, 3]], context_length=10) == pytest.approx(4 / 14)
    # Truncated to a context of 2: widths 2 and 2, one pad (after the length-1 example).
    assert data.padding_fraction([4, 2, 3, 1], [[0, 1], [2, 3]], context_length=2) == pytest.approx(1 / 8)


# ---------------------------------------------------------------------------- prepare_data and summary

def test_prepare_instruction_data(tmp_path):
    entries = make_entries(20)
    splits = data.prepare_data(write_json(tmp_path, entries), context_length=40, mask_instructions=True)
    assert splits.kind == "instruction"
    assert (len(splits.train), len(splits.test), len(splits.val)) == (17, 2, 1)
    assert splits.train_entries == entries[:17] and splits.test_entries == entries[17:19]
    assert splits.val_entries == entries[19:]
    ids, n_prompt = splits.train[0]
    assert n_prompt > 0 and len(ids) > 40
    inputs, targets = splits.collate_fn([splits.train[0], splits.train[1]])
    assert inputs.shape == targets.shape == (2, 40)
    data.check_batchable(splits, 17)
    with pytest.raises(ValueError, match=r"data\.json: the train split has 17 examples, fewer than the batch size of 18"):
        data.check_batchable(splits, 18)


def test_prepare_data_rejects_empty_splits(tmp_path):
    path = write_json(tmp_path, make_entries(5))
    with pytest.raises(ValueError, match=r"data\.json: the test split is empty"):
        data.prepare_data(path)
    splits = data.prepare_data(path, test_frac=0.0)  # no test set asked for
    assert (len(splits.train), len(splits.test), len(splits.val)) == (4, 0, 1)
    with pytest.raises(ValueError, match=r"data\.json: the train split is empty"):
        data.prepare_data(write_json(tmp_path, make_entries(1)), train_frac=0.5, test_frac=0.0)


def test_prepare_data_without_path_uses_the_default_set(tmp_path, monkeypatch):
    write_json(tmp_path, make_entries(20), "source.json")
    monkeypatch.setattr(data, "DEFAULT_DATA_URL", (tmp_path / "source.json").as_uri())
    monkeypatch.chdir(tmp_path)
    splits = data.prepare_data(None)
    assert splits.path == "data/source.json" and len(splits.train) == 17


def test_summary_reports_sizes_truncation_padding_and_leaks(tmp_path):
    entries = make_entries(19) + [{"instruction": "long " * 60, "input": "", "output": "x"}]
    entries[12] = dict(entries[2])  # a test entry that is also in train: a leak
    splits = data.prepare_data(write_json(tmp_path, entries), context_length=60, mask_instructions=True,
                               train_frac=0.5, test_frac=0.45)
    lengths = splits.train.lengths
    summary = data.summarize_data(splits, batch_size=2, context_length=60).splitlines()
    shuffled = data.padding_fraction(lengths, data.batch_indices(lengths, 2, True, drop_last=True), 60)
    grouped = data.padding_fraction(
        lengths, data.batch_indices(lengths, 2, True, drop_last=True, group_by_length=True), 60)
    assert summary == [
        f"instruction data: {splits.path} (prompt style alpaca, instructions masked in the loss)",
        "examples: 10 train, 1 val, 9 test",
        f"tokens per train example: min {min(lengths)}, mean {sum(lengths) / 10:.1f}, max {max(lengths)}",
        "longer than the context length of 60 (truncated): 0 train, 1 val, 0 test",
        "test-set leaks, entries with a near-duplicate in train (datatools.py dedup lists them): "
        "1 of 9 test, 0 of 1 val",
        "train examples whose prompt alone fills the context (nothing to learn): 0",
        f"padding in train batches of 2: {shuffled:.1%} of input tokens shuffled, {grouped:.1%} grouped by length",
    ]
    assert grouped < shuffled


# ---------------------------------------------------------------------------- conversations

TWO_TURNS = [{"role": "system", "content": "Be brief."},
             {"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello!"},
             {"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Blue."}]
SHAREGPT = [{"from": "system", "value": "Be brief."},
            {"from": "human", "value": "Hi."}, {"from": "gpt", "value": "Hello!"},
            {"from": "human", "value": "Name a color."}, {"from": "gpt", "value": "Blue."}]


@pytest.mark.parametrize("style, text", [
    ("alpaca", "Be brief.\n\n### Instruction:\nHi.\n\n### Response:\nHello!<|endoftext|>"
               "\n\n### Instruction:\nName a color.\n\n### Response:\nBlue.<|endoftext|>"),
    ("phi3", "<|system|>\nBe brief.\n<|user|>\nHi.\n<|assistant|>:\nHello!<|endoftext|>"
             "\n<|user|>\nName a color.\n<|assistant|>:\nBlue.<|endoftext|>"),
    ("none", "Be brief.\nHi.Hello!<|endoftext|>\nName a color.Blue.<|endoftext|>"),
])
def test_multi_turn_rendering_and_its_loss_mask(style, text):
    assert prompts.render_text(TWO_TURNS, style) == text
    ids, learned = prompts.encode_conversation(TWO_TURNS, style)
    assert prompts.decode(ids) == text.removesuffix("<|endoftext|>") and ids.count(EOT_ID) == 1
    # learned: exactly the two responses and the end-of-text between them, each a run of its own
    assert prompts.decode([t for t, keep in zip(ids, learned) if keep]) == "Hello!<|endoftext|>Blue."
    runs = [keep for i, keep in enumerate(learned) if i == 0 or keep != learned[i - 1]]
    assert runs == [False, True, False, True]
    # through collate with masking: targets are the two responses and both end-of-texts
    ds = data.InstructionDataset([{"messages": TWO_TURNS}], style, mask_instructions=True)
    _, targets = data.collate([ds[0]])
    kept = [t for t in targets[0].tolist() if t != IGNORE_INDEX]
    assert kept == prompts.encode("Hello!") + [EOT_ID] + prompts.encode("Blue.") + [EOT_ID]
    # the prompt eval.py generates from: everything before the last assistant turn
    assert ds.token_ids[0][:ds.prompt_lengths[0]] == prompts.prompt_ids({"messages": TWO_TURNS}, style)
    assert prompts.decode(prompts.prompt_ids({"messages": TWO_TURNS}, style)) == prompts.render_text(TWO_TURNS[:-1], style)
    assert prompts.entry_output({"messages": TWO_TURNS}) == "Blue."


def test_an_alpaca_entry_is_the_one_turn_conversation_it_always_was():
    entry = {"instruction": "Rewrite: {x}", "input": "The car is fast.", "output": "The car is as fast as light."}
    messages = [{"role": "user", "content": entry["instruction"], "input": entry["input"]},
                {"role": "assistant", "content": entry["output"]}]
    assert prompts.entry_messages(entry) == messages
    for style in prompts.PROMPT_STYLES:
        ids, learned = prompts.encode_conversation(messages, style)
        prompt = prompts.encode(prompts.format_prompt(entry, style))
        assert ids == prompt + prompts.encode(entry["output"]) and prompts.prompt_ids(entry, style) == prompt
        assert learned == [False] * len(prompt) + [True] * (len(ids) - len(prompt))
        masked = data.InstructionDataset([entry], style, mask_instructions=True)
        assert masked[0] == (ids, len(prompt))  # the chapter's (tokens, n_prompt_tokens) item


def test_sharegpt_and_messages_give_identical_tokens(tmp_path):
    extra = {"id": 7}
    messages = data.load_instruction_data(write_json(tmp_path, [{"messages": TWO_TURNS, **extra}] * 3, "m.json"))
    sharegpt = data.load_instruction_data(write_json(tmp_path, [{"conversations": SHAREGPT, **extra}] * 3, "s.json"))
    assert messages == sharegpt == [{"id": 7, "messages": TWO_TURNS}] * 3
    jsonl = tmp_path / "s.jsonl"
    jsonl.write_text("".join(json.dumps({"conversations": SHAREGPT}) + "\n" for _ in range(3)), encoding="utf-8")
    assert data.InstructionDataset(data.load_instruction_data(str(jsonl))).token_ids == \
        data.InstructionDataset(messages).token_ids


def test_collate_of_a_one_turn_conversation_equals_the_alpaca_entry():
    entry = {"instruction": "Say hi.", "input": "", "output": "Hi!"}
    as_messages = {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}]}
    for mask in (False, True):
        a = data.collate([data.InstructionDataset([entry], mask_instructions=mask)[0]])
        b = data.collate([data.InstructionDataset([as_messages], mask_instructions=mask)[0]])
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def turns(*pairs):
    return [{"role": role, "content": content} for role, content in pairs]


BAD_CONVERSATIONS = [
    ([{"messages": turns(("user", "Hi"), ("bot", "Hello"))}], "entry 0, turn 1: expected an object whose 'role' is "
                                                              "one of system, user, assistant, got 'bot'"),
    ([{"conversations": [{"from": "human", "value": "Hi"}, {"from": "assistant", "value": "x"}]}],
     "entry 0, turn 1: expected an object whose 'from' is one of system, human, gpt, got 'assistant'"),
    ([{"messages": turns(("user", "Hi"), ("assistant", ""))}], "entry 0, turn 1: 'content' must be a non-empty string"),
    ([{"messages": [{"role": "user", "content": 3}]}], "entry 0, turn 0: 'content' must be a non-empty string"),
    ([{"messages": turns(("user", "Hi"), ("user", "Hey"), ("assistant", "Yo"))}],
     "entry 0, turn 1: two user turns in a row"),
    ([{"messages": turns(("system", "S"), ("assistant", "Yo"))}], "entry 0, turn 1: an assistant turn before any user"),
    ([{"messages": turns(("user", "Hi"), ("assistant", "Yo"), ("system", "S"))}],
     "entry 0, turn 2: a system message may only come first"),
    ([{"messages": turns(("user", "Hi"))}], "entry 0, turn 0: the conversation ends with a user turn; it needs an "
                                            "assistant turn last"),
    ([{"messages": []}], "entry 0: the conversation must be a non-empty list of turns"),
    ([{"messages": turns(("user", "Hi"), ("assistant", "Yo"))}, {"instruction": "x", "output": "y"}],
     "entry 1: no 'messages' \\(the first entry is a conversation, so all are\\)"),
    ([{"instruction": "x", "output": "y"}, {"messages": turns(("user", "Hi"), ("assistant", "Yo"))}],
     "entry 1: missing 'instruction' \\(the first entry is an Alpaca entry, so all are\\)"),
]


@pytest.mark.parametrize("entries, message", BAD_CONVERSATIONS)
def test_bad_conversations_name_the_entry_and_the_turn(tmp_path, entries, message):
    path = write_json(tmp_path, entries)
    with pytest.raises(ValueError, match=f"^{path}: {message}"):
        data.load_instruction_data(path)


# ---------------------------------------------------------------------------- OpenAI's format: weights, parts

def test_an_assistant_turn_of_weight_0_leaves_the_loss_with_mask_instructions(tmp_path):
    weighted = [*TWO_TURNS[:2], {**TWO_TURNS[2], "weight": 0}, *TWO_TURNS[3:4], {**TWO_TURNS[4], "weight": 1}]
    entries = data.load_instruction_data(write_json(tmp_path, [{"messages": weighted}]))
    assert entries[0]["messages"] == [*TWO_TURNS[:2], {**TWO_TURNS[2], "weight": 0}, *TWO_TURNS[3:]]
    masked = data.InstructionDataset(entries, mask_instructions=True)
    _, targets = data.collate([masked[0]])
    # the first answer and its end-of-text are no targets (only context); the last answer is, with its end-of-text
    assert [t for t in targets[0].tolist() if t != IGNORE_INDEX] == prompts.encode("Blue.") + [EOT_ID]
    unweighted = data.InstructionDataset([{"messages": TWO_TURNS}], mask_instructions=True)
    assert masked.token_ids == unweighted.token_ids and masked[0] == (masked.token_ids[0], masked.prompt_lengths[0])
    # without --mask-instructions every token counts (train.py refuses such data then: test_train.py)
    assert data.InstructionDataset(entries)[0] == data.InstructionDataset([{"messages": TWO_TURNS}])[0]
    splits = data.prepare_data(write_json(tmp_path, [{"messages": weighted}] * 20), context_length=64,
                               mask_instructions=True)
    summary = data.summarize_data(splits, 2, 64)
    assert "conversations: 20 of 20 with more than one assistant turn; 20 assistant turns of weight 0, left out of " \
           "the loss\n" in summary


def test_content_given_as_text_parts_is_joined(tmp_path):
    parts = [{**TWO_TURNS[1], "content": [{"type": "text", "text": "H"}, {"type": "text", "text": "i."}]},
             {**TWO_TURNS[2], "content": [{"type": "text", "text": "Hello!"}]}]
    entries = data.load_instruction_data(write_json(tmp_path, [{"messages": [TWO_TURNS[0], *parts]}]))
    assert entries == [{"messages": TWO_TURNS[:3]}]


BAD_OPENAI = [
    ([*TWO_TURNS[:2], {**TWO_TURNS[2], "content": [{"type": "text", "text": "a"},
                                                   {"type": "image_url", "image_url": {"url": "x.png"}}]}],
     "entry 0, turn 2: 'content' part 1 is of type 'image_url'; only text parts can be trained on \\(GPT-2 reads "
     "text\\)"),
    ([*TWO_TURNS[:2], {**TWO_TURNS[2], "content": ["Hello!"]}],
     "entry 0, turn 2: 'content' part 0 must be an object {\"type\": \"text\", \"text\": \"...\"}"),
    ([*TWO_TURNS[:4], {**TWO_TURNS[4], "weight": 0}],
     "entry 0, turn 4: the last assistant turn has 'weight': 0, but it is the one the conversation is trained on"),
    ([TWO_TURNS[0], {**TWO_TURNS[1], "weight": 0}, *TWO_TURNS[2:]],
     "entry 0, turn 1: 'weight' must be 0 or 1, on an assistant turn \\(OpenAI's fine-tuning format\\); this user turn "
     "has 0"),
    ([*TWO_TURNS[:2], {**TWO_TURNS[2], "weight": 0.5}, *TWO_TURNS[3:]],
     "entry 0, turn 2: 'weight' must be 0 or 1, on an assistant turn \\(OpenAI's fine-tuning format\\); this assistant "
     "turn has 0.5"),
]


@pytest.mark.parametrize("messages, message", BAD_OPENAI)
def test_bad_weights_and_parts_name_the_entry_and_the_turn(tmp_path, messages, message):
    path = write_json(tmp_path, [{"messages": messages}])
    with pytest.raises(ValueError, match=f"^{path}: {message}"):
        data.load_instruction_data(path)


# ---------------------------------------------------------------------------- the command line

def data_py(*argv):
    proc = scripts.run([sys.executable, "data.py", *map(str, argv)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    return proc.returncode, proc.stdout, proc.stderr


def test_a_file_holding_null_says_null(tmp_path):
    path = write_json(tmp_path, None)
    assert data_py("--data", path) == (1, "", f"error: {path}: expected a list of entries, got a JSON null\n")


def test_preference_data_shows_its_pairs_as_train_py_dpo_does(tmp_path):
    entries = [{"instruction": f"Say {i}.", "chosen": f"{i}.", "rejected": "No." if i % 5 else f"{i}."}
               for i in range(20)]
    code, stdout, stderr = data_py("--data", write_json(tmp_path, entries), "--context-length", 64)
    assert code == 0 and "instructions masked in the loss" in stdout, stderr
    assert stdout.endswith("preference pairs: 4 with chosen equal to rejected (no preference; kept, so the split "
                           "stays); pairs longer than the context of 64 (truncated): 0 train, 0 val, 0 test\n")
    entries[3]["rejected"] = None  # and bad pairs are refused as train.py --dpo refuses them
    code, stdout, stderr = data_py("--data", write_json(tmp_path, entries))
    assert code == 1 and stderr.endswith("entry 3 has a null, not a string, as 'rejected' response; preference data "
                                         "(--dpo) needs a non-empty 'chosen' and 'rejected' in every entry\n")
