"""export.py, proven without transformers: our loader reads the export back with the
checkpoint's exact logits, the tensors are those a folder saved by transformers holds,
vocab.json and merges.txt tokenize like tiktoken, and the chat template renders
format_prompt's text as transformers renders templates."""
import contextlib
import glob
import json
import os
import signal
import subprocess
import sys
import time

import jinja2.sandbox
import pytest
import regex  # tiktoken's own dependency
import tiktoken.load
import torch
from safetensors import safe_open

import prompts
import export as export_script
from checkpoint import save_checkpoint
from prompts import decode, encode, EOT_ID, format_input, format_prompt, PROMPT_STYLES, render_text
from hf import from_pretrained
from model import GPT, config_for
from export import chat_template, export
from decoding import respond
from test_model import FIXTURE
import scripts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER_FILES = ["merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]
MODEL_FILES = ["config.json", "generation_config.json", "model.safetensors"]


def save_tiny_checkpoint(path, style, seed=1):
    """A random tiny model with GPT-2's vocabulary (seed 1: its greedy response to the
    prompt below is words, not blank lines)."""
    torch.manual_seed(seed)
    model = GPT(config_for("tiny", context_length=128)).eval()
    save_checkpoint({"model": model.state_dict(), "config": vars(model.config), "prompt_style": style}, path)
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(model, export folder) of a tiny phi3 checkpoint, exported once for the tests below."""
    tmp = tmp_path_factory.mktemp("export")
    model = save_tiny_checkpoint(str(tmp / "ckpt.pt"), "phi3")
    return model, export(str(tmp / "ckpt.pt"), str(tmp / "hf"))


def run_export(*args):
    return scripts.run([sys.executable, os.path.join(ROOT, "export.py"), *args], capture_output=True,
                          text=True, cwd=ROOT, env=os.environ.copy(), timeout=120)


# ----------------------------------------------------------------------------- the model


def test_export_loads_back_with_the_checkpoints_logits(exported):
    model, folder = exported
    assert sorted(os.listdir(folder)) == sorted(MODEL_FILES + TOKENIZER_FILES)
    loaded = from_pretrained(folder).eval()
    assert loaded.config == model.config  # context length 128 included
    idx = torch.randint(0, model.config.vocab_size, (2, 128), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(idx), model(idx))


def test_generate_cli_answers_from_the_export(exported):
    model, folder = exported
    expected = respond(model, [{"instruction": "Name a color.", "input": ""}], "phi3", 12)[0]
    assert expected  # a real response to compare, not an empty string
    result = scripts.run([sys.executable, os.path.join(ROOT, "generate.py"), "--model", folder,
                             "--prompt-style", "phi3", "--prompt", "Name a color.", "--max-new-tokens", "12",
                             "--device", "cpu"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"


def test_tensors_and_config_are_what_transformers_writes(tmp_path):
    """The fixture's model through a checkpoint and out again: the same file, tensor for tensor.
    Its vocabulary of 1024 cannot take GPT-2's tokenizer: model files only, and an error."""
    prefixed = os.path.join(FIXTURE, "prefixed")
    model = from_pretrained(prefixed)
    ckpt = str(tmp_path / "ckpt.pt")
    save_checkpoint({"model": model.state_dict(), "config": vars(model.config), "prompt_style": "alpaca"}, ckpt)
    result = run_export("--ckpt", ckpt, "--out", str(tmp_path / "hf"))
    assert result.returncode == 1
    assert result.stderr == (f"error: {ckpt} has a vocabulary of 1024 tokens; GPT-2's tokenizer needs 50257: "
                             f"wrote the model to {tmp_path / 'hf'} but left out the tokenizer files\n")
    assert sorted(os.listdir(tmp_path)) == [".export.lock", "ckpt.pt", "hf"]
    assert sorted(os.listdir(tmp_path / "hf")) == MODEL_FILES

    with safe_open(os.path.join(prefixed, "model.safetensors"), "pt") as theirs, \
            safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as ours:
        assert ours.metadata() == theirs.metadata() == {"format": "pt"}
        assert sorted(ours.keys()) == sorted(theirs.keys())
        for key in theirs.keys():
            assert torch.equal(ours.get_tensor(key), theirs.get_tensor(key)), key
    with open(os.path.join(prefixed, "config.json")) as f:
        theirs = json.load(f)
    del theirs["transformers_version"]
    with open(tmp_path / "hf" / "config.json") as f:
        # and n_ctx, which llama.cpp's converter reads for GPT-2 and transformers 5 no longer writes
        assert json.load(f) == {**theirs, "n_ctx": theirs["n_positions"]}
    with open(tmp_path / "hf" / "generation_config.json") as f:
        # no max_length: with max_new_tokens as well, transformers warns on every generate call
        assert json.load(f) == {"bos_token_id": EOT_ID, "eos_token_id": EOT_ID, "pad_token_id": EOT_ID,
                                "do_sample": False}


# ----------------------------------------------------------------------------- the tokenizer

GPT2_SPLIT = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")


def bpe_tokenizer(folder):
    """encode(text) -> ids from vocab.json and merges.txt alone, as GPT-2's original encoder.py
    does it: split with its regex, spell each piece's bytes as characters, then merge the pair
    listed first in merges.txt until no listed pair is left."""
    with open(os.path.join(folder, "vocab.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    with open(os.path.join(folder, "merges.txt"), encoding="utf-8") as f:
        lines = f.read().split("\n")
    assert lines[0] == "#version: 0.2" and lines[-1] == ""
    merge_rank = {tuple(line.split(" ")): rank for rank, line in enumerate(lines[1:-1])}
    # bytes that print (other than space) stand for themselves; the rest take chr(256), chr(257), ...
    printable = [b for b in range(256) if chr(b).isprintable() and b != ord(" ")]
    spell = {b: chr(b) for b in printable}
    spell.update((b, chr(256 + n)) for n, b in enumerate(b for b in range(256) if b not in printable))

    def encode_text(text):
        ids = []
        for piece in GPT2_SPLIT.findall(text):
            parts = [spell[b] for b in piece.encode("utf-8")]
            while len(parts) > 1:
                rank, i = min((merge_rank.get(pair, float("inf")), i) for i, pair in enumerate(zip(parts, parts[1:])))
                if rank == float("inf"):
                    break
                parts[i:i + 2] = [parts[i] + parts[i + 1]]
            ids += [vocab[part] for part in parts]
        return ids

    return encode_text, vocab


SAMPLES = [
    "Hello world",
    "   three leading spaces, two trailing  ",
    "naïve café – Ünïcödé, Ελληνικά, 日本語のテキスト, עברית",
    "emoji 😀👍🏽 and a family 👨‍👩‍👧 and flags 🇩🇪",
    "a literal <|endoftext|> typed as text<|endoftext|>",
    "It's 2024: 3.14159, 1,000,000 and 0x1F; I'll, we've, they're, DON'T",
    "line one\n\nline two\n\t tab\r\nwindows\n\n\n",
    "Rewrite the sentence using a simile: The car is very fast.",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
]


def test_vocab_and_merges_tokenize_as_tiktoken(exported):
    _, folder = exported
    encode_text, vocab = bpe_tokenizer(folder)
    assert len(vocab) == 50257 and vocab["<|endoftext|>"] == EOT_ID
    for text in SAMPLES + [format_prompt({"instruction": SAMPLES[2], "input": SAMPLES[3]}, "alpaca")]:
        ids = encode_text(text)
        assert ids == encode(text), text
        assert decode(ids) == text
    assert EOT_ID not in encode_text(SAMPLES[4])  # a typed <|endoftext|> is text, as in prompts.encode


def test_vocab_and_merges_are_gpt2s_original_files(exported):
    """tiktoken's gpt2 encoding was built from GPT-2's encoder.json and vocab.bpe (in its cache):
    the export rebuilds both byte for byte from the ranks."""
    _, folder = exported
    base = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
    with open(os.path.join(folder, "vocab.json"), "rb") as f:
        assert f.read() == tiktoken.load.read_file_cached(base + "encoder.json")
    with open(os.path.join(folder, "merges.txt"), "rb") as f:
        assert f.read() == tiktoken.load.read_file_cached(base + "vocab.bpe")


def test_tokenizer_config(exported):
    _, folder = exported
    with open(os.path.join(folder, "tokenizer_config.json")) as f:
        config = json.load(f)
    assert config["tokenizer_class"] == "GPT2Tokenizer" and config["model_max_length"] == 128
    assert config["bos_token"] == config["eos_token"] == config["unk_token"] == "<|endoftext|>"
    assert config["add_bos_token"] is False and config["chat_template"] == chat_template("phi3")
    # the <|endoftext|> that ends each assistant turn of a templated conversation is the special token
    assert config["split_special_tokens"] is False
    with open(os.path.join(folder, "special_tokens_map.json")) as f:
        assert json.load(f) == {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
                                "unk_token": "<|endoftext|>"}


# ----------------------------------------------------------------------------- the chat template


def raise_exception(message):
    """What transformers gives templates to refuse a conversation with."""
    raise jinja2.TemplateError(message)


def render(template, messages, add_generation_prompt, trim=True):
    """As transformers renders chat templates: a sandboxed environment with trim_blocks and
    lstrip_blocks on (trim=False: both off, which must change nothing)."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=trim, lstrip_blocks=trim)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                            eos_token="<|endoftext|>", bos_token="<|endoftext|>")


ENTRIES = [
    {"instruction": "Name three primary colors.", "input": ""},
    {"instruction": "Translate into German:", "input": "Thank you very much."},
    {"instruction": 'Quote {{ this }} and {% that %}, "café" 😀\\n', "input": "line 1\nline 2\n\n"},
]


@pytest.mark.parametrize("style", sorted(PROMPT_STYLES))
@pytest.mark.parametrize("trim", [True, False])
def test_chat_template_gives_format_prompt_byte_for_byte(style, trim):
    template = chat_template(style)
    for entry in ENTRIES:
        user = [{"role": "user", "content": entry["instruction"]}]
        if entry["input"]:
            user.append({"role": "user", "content": entry["input"]})
        assert render(template, user, True, trim) == format_prompt(entry, style)
        assert render(template, user, False, trim) == format_input(entry, style)
        if not entry["input"]:  # an empty input message is left out as an empty input is
            assert render(template, user + [{"role": "user", "content": ""}], True, trim) == format_prompt(entry, style)
        else:  # a third user message in a row is refused
            with pytest.raises(jinja2.TemplateError, match="^a user message may be followed by one more, its input"):
                render(template, user + [{"role": "user", "content": "more"}], True, trim)
        # a whole exchange is the training text: prompt, response, <|endoftext|>
        exchange = user + [{"role": "assistant", "content": "Red, blue and yellow."}]
        assert render(template, exchange, False, trim) \
            == format_prompt(entry, style) + "Red, blue and yellow.<|endoftext|>"


CONVERSATIONS = [
    [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello!"},
     {"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Blue.\n\nOr red."}],
    [{"role": "system", "content": "Answer in {{ one }} word."}, {"role": "user", "content": "Capital of France?"},
     {"role": "assistant", "content": "Paris."}, {"role": "user", "content": 'And of "Italy" 😀?'},
     {"role": "assistant", "content": "Rome."}, {"role": "user", "content": "Spain?"}],
]


@pytest.mark.parametrize("style", sorted(PROMPT_STYLES))
@pytest.mark.parametrize("trim", [True, False])
def test_chat_template_renders_conversations_as_training_does(style, trim):
    template = chat_template(style)
    for messages in CONVERSATIONS:
        prompt = messages if messages[-1]["role"] == "user" else messages[:-1]
        assert render(template, prompt, True, trim) == render_text(prompt, style)
        if messages[-1]["role"] == "assistant":  # the training text, <|endoftext|> after every assistant turn
            assert render(template, messages, False, trim) == render_text(messages, style)
            assert prompts.decode(prompts.encode_conversation(messages, style)[0]) + "<|endoftext|>" == \
                render_text(messages, style)


def test_a_new_prompt_style_exports_too(monkeypatch):
    monkeypatch.setitem(prompts.PROMPT_STYLES, "odd", {
        "instruction": '{{literal braces}} "quotes" \\backslash\\ {{% tag %}} ünï 😀\n\n{instruction} and again {instruction}',
        "input": "\n\t[{input}]\n",
        "response": "\n}} %} Answer \\n:\n",
    })
    for entry in ENTRIES:
        user = [{"role": "user", "content": entry["instruction"]}, {"role": "user", "content": entry["input"]}]
        assert render(chat_template("odd"), user, True) == format_prompt(entry, "odd")
    for messages in CONVERSATIONS:  # its system message and later turns in its instruction template
        prompt = messages if messages[-1]["role"] == "user" else messages[:-1]
        assert render(chat_template("odd"), prompt, True) == render_text(prompt, "odd")
        if messages[-1]["role"] == "assistant":
            assert render(chat_template("odd"), messages, False) == render_text(messages, "odd")


# ----------------------------------------------------------------------------- bad input


def test_missing_or_damaged_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"checkpoint {tmp_path / 'missing.pt'} does not exist"):
        export(str(tmp_path / "missing.pt"), str(tmp_path / "hf"))
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="is corrupt or not a train.py checkpoint"):
        export(str(damaged), str(tmp_path / "hf"))
    assert sorted(os.listdir(tmp_path)) == [".export.lock", "damaged.pt"]  # nothing written but the lock file


def test_existing_out_is_refused_unless_forced(tmp_path, monkeypatch):
    ckpt = str(tmp_path / "ckpt.pt")
    save_tiny_checkpoint(ckpt, "alpaca")
    out = tmp_path / "hf"
    out.mkdir()
    export(ckpt, str(out))  # an empty folder needs no --force
    assert sorted(os.listdir(out)) == sorted(MODEL_FILES + TOKENIZER_FILES)
    with pytest.raises(ValueError, match=f"^--out {out} holds an earlier export; pass --force to replace it$"):
        export(ckpt, str(out))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file; give a folder"):
        export(ckpt, str(tmp_path / "file"), force=True)

    # a failure half way (the model written, not the tokenizer) leaves the old export as it
    # was and no temporary folder behind
    old = {name: (out / name).read_bytes() for name in os.listdir(out)}
    def fail():
        raise OSError("disk full")
    monkeypatch.setattr(export_script, "gpt2_vocab_and_merges", fail)
    with pytest.raises(OSError, match="disk full"):
        export(ckpt, str(out), force=True)
    assert sorted(os.listdir(tmp_path)) == [".export.lock", "ckpt.pt", "file", "hf"]
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == old
    monkeypatch.undo()

    save_tiny_checkpoint(ckpt, "phi3", seed=2)
    export(ckpt, str(out), force=True)
    assert sorted(os.listdir(tmp_path)) == [".export.lock", "ckpt.pt", "file", "hf"]
    assert sorted(os.listdir(out)) == sorted(MODEL_FILES + TOKENIZER_FILES)
    assert (out / "model.safetensors").read_bytes() != old["model.safetensors"]
    with open(out / "tokenizer_config.json") as f:
        assert json.load(f)["chat_template"] == chat_template("phi3")


@contextlib.contextmanager
def umask(mask):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def file_modes(folder):
    return {name: oct(os.stat(os.path.join(folder, name)).st_mode & 0o777) for name in os.listdir(folder)}


def test_every_exported_file_has_the_permissions_the_umask_gives(tmp_path):
    """safetensors writes its file for its owner only; the export gives it the umask's
    permissions as every other file, so a server running as another user can read them all."""
    ckpt = str(tmp_path / "ckpt.pt")
    save_tiny_checkpoint(ckpt, "alpaca")
    for mask in (0o022, 0o027):
        with umask(mask):
            export(ckpt, str(tmp_path / f"hf-{mask:o}"))
        modes = file_modes(tmp_path / f"hf-{mask:o}")
        assert modes == {name: oct(0o666 & ~mask) for name in MODEL_FILES + TOKENIZER_FILES}, modes


def holding_the_lock(path):
    """A process that holds common.lock_file on path as an export does (until killed)."""
    proc = subprocess.Popen([sys.executable, "-c", "import sys, time; from common import lock_file; "
                             "lock = lock_file(sys.argv[1], 'export.py'); print('held', flush=True); time.sleep(600)",
                             str(path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "held\n"
    return proc


def test_two_exports_to_one_place_cannot_interleave(tmp_path):
    """An export holds a lock beside its folder (not in it: --force checks what the folder holds):
    a second export to the same place is refused, naming the first, until the first ends."""
    ckpt = str(tmp_path / "ckpt.pt")
    save_tiny_checkpoint(ckpt, "alpaca")
    out = tmp_path / "hf"
    holder = holding_the_lock(tmp_path / ".export.lock")
    try:
        result = run_export("--ckpt", ckpt, "--out", str(out))
        assert result.returncode == 1 and result.stderr == (
            f"error: {out} is in use by export.py (process {holder.pid}); wait for it to end, or give another "
            "folder\n")
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    assert run_export("--ckpt", ckpt, "--out", str(out)).returncode == 0
    assert sorted(os.listdir(out)) == sorted(MODEL_FILES + TOKENIZER_FILES)


def test_force_replaces_only_an_earlier_export(tmp_path):
    """A folder holding anything export.py did not write is never replaced: the user's notes,
    the downloaded data set, the folder of the checkpoint itself."""
    ckpt = str(tmp_path / "run" / "ckpt.pt")
    save_tiny_checkpoint(ckpt, "alpaca")
    victim = tmp_path / "victim"
    (victim / "sub").mkdir(parents=True)
    (victim / "important.txt").write_text("notes")
    (victim / "config.json").write_text("{}")  # not listed: a name export.py writes
    data_folder = tmp_path / "data"
    data_folder.mkdir()
    (data_folder / "instruction-data.json").write_text("[]")
    for folder, held in ((victim, "important.txt, sub/"), (data_folder, "instruction-data.json"),
                         (tmp_path / "run", "ckpt.pt")):
        before = sorted(glob.glob(str(folder / "**"), recursive=True))
        result = run_export("--ckpt", ckpt, "--out", str(folder), "--force")
        assert result.returncode == 1
        assert result.stderr == (f"error: --out {folder} holds {held}, which export.py did not write; --force "
                                 "replaces only an earlier export: give a new or empty folder\n")
        assert sorted(glob.glob(str(folder / "**"), recursive=True)) == before
    assert (victim / "important.txt").read_text() == "notes"
    assert (data_folder / "instruction-data.json").read_text() == "[]"
    assert sorted(os.listdir(tmp_path)) == ["data", "run", "victim"]  # no temporary folder either
    many = tmp_path / "many"
    many.mkdir()
    for i in range(7):
        (many / f"f{i}").write_text("x")
    with pytest.raises(ValueError, match=f"--out {many} holds f0, f1, f2, f3, f4 and 2 more, which"):
        export(ckpt, str(many), force=True)


def test_an_unwritable_out_is_found_before_loading(tmp_path, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the checkpoint was loaded before --out was checked")
    monkeypatch.setattr(export_script, "load_model_file", no_loading)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError) as raised:
        export(str(tmp_path / "ckpt.pt"), str(tmp_path / "file" / "hf"))
    assert str(raised.value) == (f"--out {tmp_path / 'file' / 'hf'}: {tmp_path / 'file'} is a file, not a folder "
                                 "to write results in")


def test_an_empty_out_is_refused_not_taken_for_the_current_folder(tmp_path):
    save_tiny_checkpoint(str(tmp_path / "ckpt.pt"), "alpaca")
    (tmp_path / "here").mkdir()
    result = scripts.run([sys.executable, os.path.join(ROOT, "export.py"), "--ckpt", str(tmp_path / "ckpt.pt"),
                          "--out", ""], capture_output=True, text=True, cwd=tmp_path / "here", timeout=120)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == "error: --out is an empty name; give the folder to export to\n"
    assert os.listdir(tmp_path / "here") == []


def test_ctrl_c_leaves_the_earlier_export_as_it_was(tmp_path):
    ckpt = str(tmp_path / "ckpt.pt")
    save_tiny_checkpoint(ckpt, "alpaca")
    out = tmp_path / "hf"
    export(ckpt, str(out))
    old = {name: (out / name).read_bytes() for name in os.listdir(out)}
    proc = scripts.Popen([sys.executable, os.path.join(ROOT, "export.py"), "--ckpt", ckpt, "--out", str(out),
                             "--force"], cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 60  # the new export is being written under a temporary name
        while not glob.glob(str(out) + ".tmp-*") and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    assert stdout == "" and stderr == (f"interrupted: nothing was exported; --out {out} is as it was; "
                                       "run the command again\n")
    assert sorted(os.listdir(tmp_path)) == [".export.lock", "ckpt.pt", "hf"]
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == old


def test_a_killed_exports_temporary_folder_is_removed_by_the_next(tmp_path):
    ckpt = str(tmp_path / "ckpt.pt")
    save_tiny_checkpoint(ckpt, "alpaca")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(gone.stdout)  # a process that has ended
    for name, files in ((f"hf.tmp-{dead}", ["config.json", "model.safetensors"]),
                        (f"hf.tmp-{os.getpid()}", ["vocab.json"]),  # this process has not written it yet
                        (f"hf.tmp-{os.getppid()}", ["config.json"]), (f"hf.tmp-old-{dead}", ["notes.txt"])):
        (tmp_path / name).mkdir()
        for file in files:
            (tmp_path / name / file).write_text("x")
    export(ckpt, str(tmp_path / "hf"))
    # kept: the folder of a running process, and one holding a file export.py does not write
    assert sorted(os.listdir(tmp_path)) == sorted([".export.lock", "ckpt.pt", "hf", f"hf.tmp-{os.getppid()}",
                                                   f"hf.tmp-old-{dead}"])
