"""Export a checkpoint to the Hugging Face format: a folder that transformers'
AutoModelForCausalLM and AutoTokenizer load with no other files; and to llama.cpp and Ollama.

    python export.py --ckpt out/ckpt.pt --out out/hf
    python export.py --ckpt out/best.pt --out out/hf --force    # replace an earlier export
    python export.py --ckpt out/best.pt --out out/hf --base models/gpt2-medium    # a LoRA base that moved
    python export.py --ckpt out/best.pt --gguf out/model.gguf [--gguf-type f32|f16|bf16|q8_0]    # llama.cpp, Ollama

GPT-2: config.json (a GPT-2 config), model.safetensors (Hugging Face's names and layouts, as
save_pretrained writes them), generation_config.json (greedy, stopping at <|endoftext|>), vocab.json
and merges.txt rebuilt from tiktoken's gpt2 encoding, and tokenizer_config.json whose chat template
is the checkpoint's prompt style, so that apply_chat_template gives the exact prompt the model was
trained on. The Llama family (Qwen3, Llama 3.2, SmolLM2, Qwen2.5): the family's own architecture
(Qwen3ForCausalLM, LlamaForCausalLM, Qwen2ForCausalLM), the checkpoint's own tokenizer.json, and
as chat template the model's own (a checkpoint trained in the chat-template style) or the prompt
style's; generation stops at the token that ends an answer in that style. A LoRA checkpoint is
exported merged (model_from_checkpoint merges it).

With --gguf: one GGUF file for llama.cpp (its gpt2, llama, qwen2 or qwen3 architecture, the
tokenizer, the chat template), written with llama.cpp's own gguf package (pip install gguf), and
beside it a Modelfile for `ollama create NAME -f Modelfile` (NAME.Modelfile when the folder's
Modelfile is another GGUF file's). Every file gets the permissions of the user's umask; an export
holds a lock beside what it writes, so two exports to one place cannot interleave.
"""
import common  # noqa: F401  (first: Ctrl-C while torch loads is one line, see common.py)
import argparse
import contextlib
import functools
import glob
import json
import math
import os
import shutil
import signal

import torch

from checkpoint import load_model_file
from common import (atomic_write, check_interrupted, lock_file, run_main, stop_on_interrupt, writable_folder,
    write_json)
from hf import architecture, config_json as hf_config_json, hf_state_dict
from prompts import (CHAT_TEMPLATE, EOT, EOT_ID, GPT2, TEMPLATE_SETTINGS, GPT2Tokenizer, check_vocab, get_prompt_style,
    get_tokenizer, render_text, turn_end_id)

# What an export folder holds: --force replaces a folder of these files and nothing else.
EXPORT_FILES = ("config.json", "generation_config.json", "model.safetensors", "merges.txt",
                "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json", "vocab.json")
# The lock an export holds in the folder it writes in (beside --out's folder or the --gguf file, never in
# --out's folder, whose files --force checks): two exports to one place cannot interleave.
EXPORT_LOCK = ".export.lock"


# ----------------------------------------------------------------------------- the model


def config_json(cfg, dtype):
    """hf.config_json with GPT-2's token ids: <|endoftext|> begins and ends a text."""
    return hf_config_json(cfg, dtype, EOT_ID, EOT_ID)


def generation_config_json():
    """Greedy decoding, stopping (and padding) at <|endoftext|>. No max_length: transformers warns
    on every generate(max_new_tokens=...) call when both are set."""
    return {"bos_token_id": EOT_ID, "eos_token_id": EOT_ID, "pad_token_id": EOT_ID, "do_sample": False}


# ----------------------------------------------------------------------------- the tokenizer


def bytes_to_unicode():
    """GPT-2's map of the 256 byte values to printable characters, in which vocab.json and
    merges.txt spell tokens: printable Latin-1 bytes stand for themselves, the others (space,
    control characters) become chr(256), chr(257), ... in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


def bpe_parts(ranks, token, max_rank):
    """The parts byte-pair encoding leaves of `token` (bytes) using only merges ranked below max_rank."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 1:
        pair_ranks = [ranks.get(a + b, max_rank) for a, b in zip(parts, parts[1:])]
        best = min(range(len(pair_ranks)), key=pair_ranks.__getitem__)
        if pair_ranks[best] >= max_rank:
            break
        parts[best:best + 2] = [parts[best] + parts[best + 1]]
    return parts


@functools.cache
def gpt2_vocab_and_merges():
    """GPT-2's vocab.json (token -> id) and merges.txt lines, rebuilt from tiktoken's encoding
    (once; about a second). tiktoken keeps only each token's rank (its id); the merge that made
    a token is the last step of encoding its bytes with the lower-ranked tokens alone, which
    leaves exactly two parts."""
    encoding = get_tokenizer()
    ranks = {token: encoding.encode_single_token(token) for token in encoding.token_byte_values()}
    spell = bytes_to_unicode()

    def spelled(token):
        return "".join(spell[b] for b in token)

    vocab, merges = {}, []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        vocab[spelled(token)] = rank
        if len(token) > 1:
            parts = bpe_parts(ranks, token, rank)
            if len(parts) != 2:
                raise ValueError(f"token {token!r} of tiktoken's {encoding.name} is no merge of two lower tokens")
            merges.append(f"{spelled(parts[0])} {spelled(parts[1])}")
    for text in sorted(encoding.special_tokens_set):
        vocab[text] = encoding.encode_single_token(text)
    return vocab, merges


def jinja_string(text):
    """A Jinja string literal of text. Jinja reads JSON's escapes (\\n, \\", \\\\) as Python
    does; non-ASCII characters stay as they are (JSON's \\u escapes would split an emoji)."""
    return json.dumps(text, ensure_ascii=False)


def jinja_format(template, **values):
    """A Jinja expression giving a str.format template of PROMPT_STYLES with each field filled
    by a Jinja expression: jinja_format("Q: {instruction}", instruction="message['content']")."""
    names = list(values)
    parts = []  # the text split at NUL-marked field numbers: text, field, text, field, ...
    for i, piece in enumerate(template.format(**{name: f"\0{n}\0" for n, name in enumerate(names)}).split("\0")):
        if i % 2:
            parts.append(values[names[int(piece)]])
        elif piece:
            parts.append(jinja_string(piece))
    return " + ".join(parts) or '""'


THIRD_USER_MESSAGE = ("a user message may be followed by one more, its input (the Alpaca input block), "
                      "and then by an assistant message")


def chat_template(style, bos=""):
    """The prompt style as a Jinja chat template that renders a conversation as training does
    (prompts.render_text): the tokenizer's start of text `bos` if it has one (Llama 3's
    <|begin_of_text|>), an optional system message first, user and assistant turns in
    alternation, each assistant message as the response header, its content and eos_token
    (<|endoftext|>: the tokenizer's end of text).
    A user message right after another user message is the optional input of the first (the
    Alpaca input block; left out when empty, as in format_prompt), as serve.py takes it; a third
    in a row is an error (raise_exception). With add_generation_prompt
    the template ends with the response header, so one user message gives format_prompt's text
    byte for byte. All text is in {{ }} expressions and every tag strips the whitespace around
    it, so the result is the same with or without trim_blocks and lstrip_blocks."""
    templates = get_prompt_style(style)
    content = "message['content']"
    instruction = jinja_format(templates["instruction"], instruction=content)
    system = jinja_format(templates["system"], system="ns.system", instruction=content)
    turn = jinja_format(templates["turn"], instruction=content)
    input_ = jinja_format(templates["input"], input=content)
    response = jinja_string(templates["response"])
    return (
        (f"{{{{- {jinja_string(bos)} -}}}}\n" if bos else "") +
        "{%- set ns = namespace(system=none, previous=none) -%}\n"
        "{%- for message in messages -%}\n"
        "    {%- if message['role'] == 'system' -%}\n"
        "        {%- set ns.system = message['content'] -%}\n"
        "    {%- elif message['role'] == 'assistant' -%}\n"
        f"        {{{{- {response} + message['content'] + eos_token -}}}}\n"
        "    {%- elif ns.previous == 'input' -%}\n"
        f"        {{{{- raise_exception({jinja_string(THIRD_USER_MESSAGE)}) -}}}}\n"
        "    {%- elif ns.previous == 'user' -%}\n"
        "        {%- if message['content'] -%}\n"
        f"            {{{{- {input_} -}}}}\n"
        "        {%- endif -%}\n"
        "    {%- elif ns.previous == 'assistant' -%}\n"
        f"        {{{{- {turn} -}}}}\n"
        "    {%- elif ns.system is not none -%}\n"
        f"        {{{{- {system} -}}}}\n"
        "    {%- else -%}\n"
        f"        {{{{- {instruction} -}}}}\n"
        "    {%- endif -%}\n"
        "    {%- if message['role'] != 'system' -%}\n"
        "        {%- set ns.previous = 'input' if message['role'] == 'user' and ns.previous == 'user' "
        "else message['role'] -%}\n"
        "    {%- endif -%}\n"
        "{%- endfor -%}\n"
        "{%- if add_generation_prompt -%}\n"
        f"    {{{{- {response} -}}}}\n"
        "{%- endif -%}\n"
    )


def tokenizer_config_json(cfg, style):
    """GPT-2's tokenizer settings, the context length and the chat template of `style`."""
    return {
        "tokenizer_class": "GPT2Tokenizer", "bos_token": EOT, "eos_token": EOT, "unk_token": EOT,
        "add_bos_token": False, "add_prefix_space": False, "errors": "replace",
        "clean_up_tokenization_spaces": False,  # decode gives tiktoken's text, spaces and all
        # <|endoftext|> in the chat template's text must be the special token (it ends every assistant
        # turn of a conversation), so a literal one typed in a message is the special token too
        "split_special_tokens": False,
        "model_max_length": cfg.context_length,
        "added_tokens_decoder": {str(EOT_ID): {"content": EOT, "lstrip": False, "normalized": True,
                                               "rstrip": False, "single_word": False, "special": True}},
        "chat_template": chat_template(style),
    }


# ----------------------------------------------------------------------------- the Llama family's tokenizer


def template_with_settings(template):
    """A model's own chat template that renders as training rendered it: each of
    prompts.TEMPLATE_SETTINGS (Qwen3's enable_thinking=False) set first unless the caller gives it
    (transformers' apply_chat_template(..., enable_thinking=True) still may). An `if` makes no scope
    in Jinja, so the set holds for the whole template; no whitespace is written."""
    return "".join(f"{{%- if {name} is not defined %}}{{%- set {name} = {json.dumps(value)} %}}{{%- endif %}}"
                   for name, value in TEMPLATE_SETTINGS.items()) + template


def family_chat_template(style, tokenizer):
    """The chat template of a Llama-family export: the model's own for the chat-template style,
    else the prompt style's (chat_template) after the tokenizer's start of text, if any."""
    if style == CHAT_TEMPLATE:
        return template_with_settings(tokenizer.chat_template)
    return chat_template(style, tokenizer.decode(tokenizer.bos_ids))


def family_token_ids(style, tokenizer):
    """(start id or None, end ids, pad id) of a Llama-family export. The end ids are the token that
    ends an answer in `style` (the chat template's <|im_end|> or <|eot_id|>, else the tokenizer's
    end of text, which training put after each answer), then its other end tokens: generation
    stops at any of them, as generate.py does."""
    end = turn_end_id(style, tokenizer)
    bos = tokenizer.bos_ids[0] if tokenizer.bos_ids else tokenizer.token_id(tokenizer.special_tokens.get("bos_token"))
    return bos, [end, *(i for i in tokenizer.stop_ids if i != end)], tokenizer.pad_id


def family_special_tokens(style, tokenizer):
    """The named special tokens of the export's tokenizer_config.json: the model's own (its chat
    template was trained with them), the pad token, and in another prompt style, whose chat template
    ends each answer with eos_token, the end of text as eos_token."""
    named = {**tokenizer.special_tokens, "pad_token": tokenizer.decode([tokenizer.pad_id])}
    return named if style == CHAT_TEMPLATE else {**named, "eos_token": tokenizer.eot}


def family_tokenizer_config_json(cfg, style, tokenizer):
    """tokenizer_config.json beside the checkpoint's tokenizer.json: PreTrainedTokenizerFast, which
    reads tokenizer.json as it is, the named special tokens, the context length and the chat template."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast", **family_special_tokens(style, tokenizer),
        "clean_up_tokenization_spaces": False, "split_special_tokens": False,
        "model_max_length": cfg.context_length, "chat_template": family_chat_template(style, tokenizer),
    }


def family_generation_config_json(style, tokenizer):
    """Greedy decoding, stopping at each end id of family_token_ids."""
    bos, ends, pad = family_token_ids(style, tokenizer)
    return {**({"bos_token_id": bos} if bos is not None else {}), "eos_token_id": ends, "pad_token_id": pad,
            "do_sample": False}


def check_export(model, style, tokenizer, what):
    """ValueError, before anything is written, unless the checkpoint `what` can be exported: a
    known prompt style (the chat-template style with a tokenizer that has a chat template), and a
    model of the Llama family with its own tokenizer, which covers its vocabulary."""
    cfg = model.config
    if style == CHAT_TEMPLATE:
        if tokenizer.chat_template is None:
            raise ValueError(f"{what} was trained in the {CHAT_TEMPLATE} style, but its tokenizer has no chat template")
    else:
        get_prompt_style(style)
    if cfg.family != "gpt2" and isinstance(tokenizer, GPT2Tokenizer):
        raise ValueError(f"{what} holds a {architecture(cfg)} model but not its tokenizer (a checkpoint of an older "
                         "train.py); train it again to export it")
    if cfg.family == "gpt2" and not isinstance(tokenizer, GPT2Tokenizer):
        raise ValueError(f"{what} holds a GPT-2 model with the tokenizer of {tokenizer.name}; export.py writes "
                         "GPT-2 with GPT-2's tokenizer")
    if cfg.family != "gpt2":
        check_vocab(cfg.vocab_size, what, tokenizer)


# ----------------------------------------------------------------------------- the folder


def check_out(out, force):
    """ValueError (or OSError) unless the export may go to out: a new or empty folder, or with
    force an earlier export (export.py's files and nothing else), in a folder we can write in."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out} is a file; give a folder")
    if os.path.isdir(out) and os.listdir(out):
        foreign = sorted(entry.name + ("/" if entry.is_dir() else "") for entry in os.scandir(out)
                         if entry.name not in EXPORT_FILES or not entry.is_file(follow_symlinks=False))
        if foreign:
            held = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise ValueError(f"--out {out} holds {held}, which export.py did not write; --force replaces only "
                             "an earlier export: give a new or empty folder")
        if not force:
            raise ValueError(f"--out {out} holds an earlier export; pass --force to replace it")
    # the export is written beside out and renamed into place; a replaced one is then deleted
    try:
        for folder in [os.path.dirname(out)] + ([out] if os.path.isdir(out) else []):
            writable_folder(folder)
    except OSError as e:
        raise OSError(f"--out {out}: {e}") from None


def export(ckpt_path, out, force=False, base=None):
    """Write the Hugging Face folder of the checkpoint at ckpt_path to out (a LoRA checkpoint's
    base looked for in the folder `base` if given). The folder is written under a temporary
    name and renamed into place only when complete; an earlier export in out (with force) is
    deleted only then. A vocabulary that GPT-2's tokenizer cannot serve gets the model files
    only, and a ValueError saying so once they are in place."""
    if not out:  # realpath would make it the current folder
        raise ValueError("--out is an empty name; give the folder to export to")
    out = os.path.realpath(out)  # a link to a folder: the export replaces the folder, the link stays
    check_out(out, force)  # before any loading
    with export_lock(out):
        check_out(out, force)  # again, now that no other export can change it
        remove_stale_tmp(out)
        # a train.py checkpoint (with its tokenizer), the book's .pth or nanoGPT's ckpt.pt (GPT-2's)
        model, style, tokenizer = load_model_file(ckpt_path, base=base)
        cfg, style = model.config, style or "alpaca"
        check_export(model, style, tokenizer, ckpt_path)  # fails before anything is written
        no_tokenizer = None
        if cfg.family == "gpt2":
            try:
                check_vocab(cfg.vocab_size, ckpt_path)
            except ValueError as e:
                no_tokenizer = str(e)
        tmp = f"{out}.tmp-{os.getpid()}"
        os.makedirs(tmp)
        try:
            write_folder(model, style, tmp, with_tokenizer=no_tokenizer is None, tokenizer=tokenizer)
            check_out(out, force)  # again: out may have changed while the export was written
            move_into_place(tmp, out)
        finally:
            if os.path.exists(tmp):
                shutil.rmtree(tmp)
    if no_tokenizer is not None:
        raise ValueError(f"{no_tokenizer}: wrote the model to {out} but left out the tokenizer files")
    return out


def write_folder(model, style, folder, with_tokenizer=True, tokenizer=GPT2):
    """Write the Hugging Face files of model (prompt style `style`, its tokenizer) in folder, each
    with the permissions the user's umask gives."""
    from safetensors.torch import save_file

    state = hf_state_dict(model)
    dtype = str(next(iter(state.values())).dtype).removeprefix("torch.")
    save_file(state, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    if model.config.family == "gpt2":
        config, generation = config_json(model.config, dtype), generation_config_json()
    else:
        bos, ends, _ = family_token_ids(style, tokenizer)
        config, generation = hf_config_json(model.config, dtype, bos, ends[0]), family_generation_config_json(
            style, tokenizer)
    write_json(config, os.path.join(folder, "config.json"), indent=2)  # as transformers writes them
    write_json(generation, os.path.join(folder, "generation_config.json"), indent=2)
    if with_tokenizer and model.config.family != "gpt2":
        with open(os.path.join(folder, "tokenizer.json"), "w", encoding="utf-8") as f:
            f.write(tokenizer.json)  # the checkpoint's own, as the base model's folder had it
        write_json(family_tokenizer_config_json(model.config, style, tokenizer),
                   os.path.join(folder, "tokenizer_config.json"), indent=2)
    elif with_tokenizer:
        vocab, merges = gpt2_vocab_and_merges()
        with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump(vocab, f)  # as GPT-2's own encoder.json, byte for byte
        with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "".join(line + "\n" for line in merges))  # as GPT-2's vocab.bpe
        write_json(tokenizer_config_json(model.config, style), os.path.join(folder, "tokenizer_config.json"), indent=2)
        write_json({"bos_token": EOT, "eos_token": EOT, "unk_token": EOT},
                   os.path.join(folder, "special_tokens_map.json"), indent=2)
    for name in os.listdir(folder):
        with_umask_permissions(os.path.join(folder, name))


@contextlib.contextmanager
def export_lock(target):
    """Hold common.lock_file on EXPORT_LOCK beside target (a folder or a file) for the block."""
    lock = lock_file(os.path.join(os.path.dirname(target), EXPORT_LOCK), "export.py", target)
    try:
        yield
    finally:
        if lock is not None:
            lock.close()


def with_umask_permissions(path):
    """Give a written file the permissions the user's umask gives new files (safetensors' save_file
    makes its file readable by its owner only), so that a service running as another user can read
    every exported file alike."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def remove_stale_tmp(out):
    """Delete what an export to out that was killed (kill -9, a crash of the machine) left beside
    it: a folder out.tmp-PID of export.py's files whose process is gone (or is this one, which has
    not written it yet: a pid used again)."""
    for tmp in glob.glob(glob.escape(out) + ".tmp-*"):
        pid = tmp.rsplit("-", 1)[1]
        if (os.path.isdir(tmp) and pid.isdigit() and (int(pid) == os.getpid() or not process_exists(int(pid)))
                and set(os.listdir(tmp)) <= set(EXPORT_FILES)):
            shutil.rmtree(tmp)
            print(f"removed {tmp}, left by an export that was killed")


def process_exists(pid):
    try:
        os.kill(pid, 0)  # signal 0 only asks whether the process exists
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's process, or no pid at all: leave it be
        return True
    return True


def move_into_place(tmp, out):
    """Rename the complete folder tmp to out; an existing out (empty, or an earlier export) is
    moved aside first and deleted once tmp is in its place. Ctrl-C and SIGTERM are ignored
    meanwhile (a few renames and a delete), so out is never left missing or half deleted."""
    held = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        check_interrupted()
        if not os.path.exists(out):
            os.replace(tmp, out)
            return
        old = f"{out}.old-{os.getpid()}"
        os.replace(out, old)
        try:
            os.replace(tmp, out)
        except OSError:
            os.replace(old, out)
            raise
        shutil.rmtree(old)
    finally:
        for sig, handler in held.items():
            signal.signal(sig, handler)


# ----------------------------------------------------------------------------- GGUF (llama.cpp, Ollama)

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
MODELFILE_HEADER = "# Ollama Modelfile written by export.py"  # how --force knows a Modelfile of ours
# our module names in a block -> llama.cpp's gpt2 tensor names (gguf's TENSOR_NAMES)
GGUF_BLOCK_NAMES = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output",
                    "ln_2": "ffn_norm", "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}


def import_gguf():
    """llama.cpp's gguf package, an optional dependency: one clear error when it is missing."""
    try:
        import gguf
    except ImportError:
        raise ValueError("--gguf needs llama.cpp's gguf package: pip install gguf") from None
    return gguf


def gguf_tensors(model):
    """(name, float32 tensor) of every tensor llama.cpp's gpt2 architecture reads, in the layouts
    its convert_hf_to_gguf.py writes for GPT-2: nn.Linear's [out, in] (c_attn's q, k and v stay
    fused as attn_qkv), token_embd [vocab, emb_dim], and no output head: llama.cpp ties it to
    token_embd when the file has none."""
    state = {key: tensor.detach().float() for key, tensor in model.state_dict().items()}
    yield "token_embd.weight", state["wte.weight"].t()
    yield "position_embd.weight", state["wpe.weight"]
    for i in range(model.config.n_layers):
        for ours, theirs in GGUF_BLOCK_NAMES.items():
            weight = state[f"h.{i}.{ours}.weight"]
            yield f"blk.{i}.{theirs}.weight", weight
            # llama.cpp's gpt2 loader requires the qkv bias: a model built with qkv_bias=False gets a zero one
            yield f"blk.{i}.{theirs}.bias", state.get(f"h.{i}.{ours}.bias", weight.new_zeros(weight.shape[0]))
    yield "output_norm.weight", state["ln_f.weight"]
    yield "output_norm.bias", state["ln_f.bias"]


def gguf_tensor_type(gguf, name, shape, gguf_type):
    """The type a tensor is stored in, as convert_hf_to_gguf.py chooses it: 1-D tensors (norms,
    biases, Llama 3's rope_freqs) and the position embedding stay float32; the other weights are
    f16, bf16 or q8_0, and f16 where q8_0's blocks of 32 do not divide a row."""
    if gguf_type == "f32" or len(shape) == 1 or name == "position_embd.weight":
        return gguf.GGMLQuantizationType.F32
    if gguf_type == "bf16":
        return gguf.GGMLQuantizationType.BF16
    block_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]
    if gguf_type == "q8_0" and shape[-1] % block_size == 0:
        return gguf.GGMLQuantizationType.Q8_0
    return gguf.GGMLQuantizationType.F16


def add_file_type(gguf, writer, gguf_type):
    """general.file_type and general.quantization_version of a file of gguf_type's tensors."""
    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    writer.add_file_type(file_types[gguf_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def write_tensors(gguf, writer, tensors, gguf_type):
    """Add (name, float32 tensor) pairs, each in its gguf_tensor_type, and write the file."""
    for name, tensor in tensors:
        qtype = gguf_tensor_type(gguf, name, tensor.shape, gguf_type)
        writer.add_tensor(name, gguf.quants.quantize(tensor.contiguous().numpy(), qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def gguf_vocab(gguf, vocab_size):
    """(tokens, token types, merges) of GPT-2's tokenizer for a model of vocab_size tokens: the
    tokens spelled as in vocab.json, <|endoftext|> a control token, and ids past GPT-2's 50257
    (a vocabulary padded to a round size) unused [PADn] tokens, as convert_hf_to_gguf.py does."""
    vocab, merges = gpt2_vocab_and_merges()
    tokens = sorted(vocab, key=vocab.get)
    types = [gguf.TokenType.CONTROL if token == EOT else gguf.TokenType.NORMAL for token in tokens]
    padding = range(len(tokens), vocab_size)
    return tokens + [f"[PAD{i}]" for i in padding], types + [gguf.TokenType.UNUSED] * len(padding), merges


def write_gguf(model, style, path, gguf_type, name):
    """Write the GGUF file of model (prompt style `style`, called `name`) to path, tensors in gguf_type."""
    gguf = import_gguf()
    cfg = model.config
    writer = gguf.GGUFWriter(path, "gpt2")
    writer.add_name(name)  # general.name, as llama.cpp's converter writes it
    writer.add_context_length(cfg.context_length)
    writer.add_embedding_length(cfg.emb_dim)
    writer.add_feed_forward_length(4 * cfg.emb_dim)
    writer.add_block_count(cfg.n_layers)
    writer.add_head_count(cfg.n_heads)
    writer.add_layer_norm_eps(model.ln_f.eps)
    add_file_type(gguf, writer, gguf_type)

    tokens, types, merges = gguf_vocab(gguf, cfg.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")  # GPT-2's pre-tokenizer regex
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for add_id in (writer.add_bos_token_id, writer.add_eos_token_id, writer.add_unk_token_id):
        add_id(EOT_ID)
    writer.add_add_bos_token(False)  # prompts start with their text, as in training
    writer.add_chat_template(chat_template(style))
    write_tensors(gguf, writer, gguf_tensors(model), gguf_type)


# The Llama family in llama.cpp: our family -> its architecture (general.architecture); each block's
# modules -> its tensor names (gguf's TENSOR_NAMES); the pre-tokenizers of tokenizer.json it knows, by
# the name tokenizer.ggml.pre gives them (its regexes as tokenizer.json spells them, in llama-vocab.cpp)
GGUF_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
GGUF_FAMILY_BLOCK_NAMES = {"ln_1": "attn_norm", "attn.q_proj": "attn_q", "attn.k_proj": "attn_k",
                           "attn.v_proj": "attn_v", "attn.o_proj": "attn_output", "attn.q_norm": "attn_q_norm",
                           "attn.k_norm": "attn_k_norm", "ln_2": "ffn_norm", "mlp.gate_proj": "ffn_gate",
                           "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")
LLAMA3_SPLIT = QWEN2_SPLIT.replace(r"|\p{N}|", r"|\p{N}{1,3}|")


def gguf_pre_tokenizer(tokenizer):
    """llama.cpp's name of the tokenizer's pre-tokenizer (tokenizer.ggml.pre): "qwen2" (Qwen2.5,
    Qwen3), "llama-bpe" (Llama 3) or "smollm" (SmolLM2: digits apart, then GPT-2's regex), read from
    tokenizer.json, where llama.cpp's converter tells them apart by hashing the ids of a test text;
    ValueError for another one."""
    pre = json.loads(tokenizer.json).get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = (steps[0].get("pattern") or {}).get("Regex")
        if regex in (QWEN2_SPLIT, LLAMA3_SPLIT):
            return "qwen2" if regex == QWEN2_SPLIT else "llama-bpe"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    raise ValueError(f"the pre-tokenizer of {tokenizer.name} ({', '.join(map(str, kinds)) or 'none'}) is none of "
                     "those of Qwen2.5, Qwen3, Llama 3 and SmolLM2, which export.py names for llama.cpp; export the "
                     "Hugging Face folder (--out) and convert it with llama.cpp's convert_hf_to_gguf.py")


def gguf_family_vocab(gguf, tokenizer, vocab_size):
    """(tokens, token types, merges) of a tokenizer.json for a model of vocab_size tokens, as
    convert_hf_to_gguf.py writes them: the BPE's tokens as tokenizer.json spells them (normal), its
    added tokens as their text (control when special or shaped <|...|>, else user-defined, as
    Qwen's <think>), ids no token has (a vocabulary padded to a round size) unused [PADn] tokens, and
    the merges as "a b" lines."""
    data = json.loads(tokenizer.json)
    bpe = data.get("model") or {}
    if bpe.get("type") != "BPE":
        raise ValueError(f"the tokenizer of {tokenizer.name} is no byte-pair encoding, which llama.cpp's gpt2 "
                         "tokenizer model needs")
    tokens, types = [None] * vocab_size, [gguf.TokenType.NORMAL] * vocab_size
    for token, i in bpe["vocab"].items():
        tokens[i] = token
    for added in data.get("added_tokens", []):
        text = added["content"]
        tokens[added["id"]] = text
        special = added.get("special") or (text.startswith("<|") and text.endswith("|>"))
        types[added["id"]] = gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED
    for i, token in enumerate(tokens):
        if token is None:
            tokens[i], types[i] = f"[PAD{i}]", gguf.TokenType.UNUSED
    # a merge is "a b" or, since transformers 4.45, ["a", "b"]; a space inside a part is spelled as Ġ
    merges = [merge if isinstance(merge, str) else " ".join(part.replace(" ", chr(ord(" ") + 256)) for part in merge)
              for merge in bpe.get("merges", [])]
    return tokens, types, merges


def interleaved_rope_rows(weight, n_heads):
    """The rows of q_proj or k_proj (n_heads heads) reordered for llama.cpp's llama architecture,
    whose RoPE rotates pairs of consecutive values of a head (2i, 2i + 1) where Hugging Face's
    rotates i and i + head_dim / 2: row i of each half of a head goes to 2i (first half) and 2i + 1
    (second half). This is LlamaModel.permute of convert_hf_to_gguf.py; Qwen's architectures
    rotate as Hugging Face does and keep their rows."""
    return weight.reshape(n_heads, 2, weight.shape[0] // n_heads // 2, *weight.shape[1:]).transpose(1, 2) \
        .reshape(weight.shape)


def rope_factors(cfg):
    """Llama 3's RoPE scaling as llama.cpp takes it, a rope_freqs tensor: the number each
    frequency of a head is divided by (1 for the high ones, `factor` for the low ones, a blend in
    between), as convert_hf_to_gguf.py computes it for the llama3 rope type."""
    factor, low, high, context = (cfg.rope_scaling[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                                                  "original_context_length"))
    inv_freq = 1.0 / (cfg.rope_base ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim))
    wavelen = 2 * math.pi / inv_freq
    smooth = (context / wavelen - low) / (high - low)
    blended = 1 / ((1 - smooth) / factor + smooth)
    return torch.where(wavelen < context / high, 1.0, torch.where(wavelen > context / low, factor, blended))


def gguf_family_tensors(model):
    """(name, float32 tensor) of every tensor llama.cpp's architecture of the model's family reads,
    in the layouts convert_hf_to_gguf.py writes: token_embd [vocab, emb_dim], output (an untied
    head only: llama.cpp ties it to token_embd when the file has none), nn.Linear's [out, in] with q
    and k interleaved for the llama architecture, and Llama 3's rope_freqs."""
    cfg = model.config
    state = {key: tensor.detach().float() for key, tensor in model.state_dict().items()}
    if cfg.rope_scaling is not None:
        yield "rope_freqs.weight", rope_factors(cfg)
    yield "token_embd.weight", state.pop("wte.weight").t()
    if "wte.head" in state:
        yield "output.weight", state.pop("wte.head").t()
    yield "output_norm.weight", state.pop("ln_f.weight")
    for key, tensor in state.items():  # h.N.module.weight or .bias
        _, layer, rest = key.split(".", 2)
        module, kind = rest.rsplit(".", 1)
        if cfg.family == "llama" and module in ("attn.q_proj", "attn.k_proj"):
            tensor = interleaved_rope_rows(tensor, cfg.n_heads if module == "attn.q_proj" else cfg.n_kv_heads)
        yield f"blk.{layer}.{GGUF_FAMILY_BLOCK_NAMES[module]}.{kind}", tensor


def write_family_gguf(model, style, tokenizer, path, gguf_type, name):
    """Write the GGUF file of a Llama-family model (prompt style `style`, its tokenizer, called
    `name`) to path, tensors in gguf_type: llama.cpp's keys for its architecture, as
    convert_hf_to_gguf.py writes them, and the tokenizer with the ids that fit the style."""
    gguf = import_gguf()
    cfg = model.config
    writer = gguf.GGUFWriter(path, GGUF_ARCHITECTURES[cfg.family])
    writer.add_name(name)
    writer.add_context_length(cfg.context_length)
    writer.add_embedding_length(cfg.emb_dim)
    writer.add_block_count(cfg.n_layers)
    writer.add_feed_forward_length(cfg.hidden_dim)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.n_kv_heads)
    writer.add_key_length(cfg.head_dim)  # Qwen3's head size is not emb_dim / n_heads
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_base)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    add_file_type(gguf, writer, gguf_type)

    tokens, types, merges = gguf_family_vocab(gguf, tokenizer, cfg.vocab_size)
    writer.add_tokenizer_model("gpt2")  # byte-level BPE
    writer.add_tokenizer_pre(gguf_pre_tokenizer(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    bos, ends, pad = family_token_ids(style, tokenizer)
    if bos is not None:
        writer.add_bos_token_id(bos)
    writer.add_eos_token_id(ends[0])  # the end of an answer; llama.cpp also stops at the others by their names
    writer.add_eot_token_id(ends[0])
    writer.add_pad_token_id(pad)
    writer.add_add_bos_token(bool(tokenizer.bos_ids))  # Llama 3 starts every text with <|begin_of_text|>
    writer.add_chat_template(family_chat_template(style, tokenizer))
    write_tensors(gguf, writer, gguf_family_tensors(model), gguf_type)


def go_format(template, **values):
    """Go template actions that print a str.format template of PROMPT_STYLES with each field
    filled by a Go expression: go_format("Q: {instruction}", instruction=".Content"). Text is in
    {{ "..." }} actions: Go reads JSON's string escapes, and text between actions would lose
    its newlines to the {{- trimming."""
    names = list(values)
    pieces = template.format(**{name: f"\0{n}\0" for n, name in enumerate(names)}).split("\0")
    return "".join(f"{{{{ {values[names[int(piece)]]} }}}}" if i % 2 else
                   f"{{{{ {json.dumps(piece, ensure_ascii=False)} }}}}" if piece else "" for i, piece in enumerate(pieces))


def ollama_template(style, eot=EOT):
    """The prompt style as an Ollama TEMPLATE (Go's text/template over .Messages), rendering what
    chat_template renders, and so what training renders (prompts.render_text): a system message
    first, a user message in the style's first-turn form (after a system message, its system
    form), a user message after an answer in the style's later-turn form, an assistant message
    as the response header, its content and the tokenizer's end of text `eot` (no start of text:
    llama.cpp adds Llama 3's itself, as the file's add_bos_token says). It ends with the response header
    when the last message is not an answer. Ollama joins consecutive messages of one role with a
    blank line before its template sees them (template.collate), so two user messages in a row,
    an instruction and its input elsewhere, reach it as one instruction: no input block."""
    templates = get_prompt_style(style)
    response = go_format(templates["response"])
    return "\n".join([
        '{{- $previous := "" }}{{- $system := "" }}{{- $has_system := false }}',
        "{{- range .Messages }}",
        '{{- if eq .Role "system" }}{{ $system = .Content }}{{ $has_system = true }}',
        f'{{{{- else if eq .Role "assistant" }}}}{response}{{{{ .Content }}}}{{{{ {json.dumps(eot)} }}}}',
        f'{{{{- else if eq $previous "assistant" }}}}{go_format(templates["turn"], instruction=".Content")}',
        f'{{{{- else if $has_system }}}}{go_format(templates["system"], system="$system", instruction=".Content")}',
        f'{{{{- else }}}}{go_format(templates["instruction"], instruction=".Content")}',
        "{{- end }}",
        '{{- if ne .Role "system" }}{{ $previous = .Role }}{{ end }}',
        "{{- end }}",
        f'{{{{- if ne $previous "assistant" }}}}{response}{{{{ end }}}}',
    ])


def turn_markers(style):
    """The lines that open a user turn and a response in `style` ("### Instruction:" and
    "### Response:" for alpaca): where a model that runs on past its <|endoftext|> would start
    the next turn, so Ollama stops there too."""
    templates = get_prompt_style(style)
    openings = [templates["instruction"].format(instruction="\0").split("\0")[0], templates["response"]]
    return [text.strip().splitlines()[-1] for text in openings if text.strip()]


# The chat-template style in Ollama: the text a model's own chat template writes around the messages'
# contents, which an Ollama TEMPLATE writes around them in turn. A conversation with a system message
# is system_open, its content, system_close, the first user message, then to_assistant, an answer,
# to_user, a user message... and to_generation after the last user message (the generation prompt);
# without one, plain_open begins it (a default system message: Qwen2.5's, SmolLM2's; Llama 3.2's date).
# An answer that ends the conversation is to_last_assistant, its content and assistant_end (Qwen3's
# last answer has its empty think block).
CHAT_PIECES = ("system_open", "system_close", "plain_open", "to_assistant", "to_user", "to_generation",
               "to_last_assistant", "assistant_end")
# conversations on which the pieces must render exactly what the chat template renders
CHECK_CONVERSATIONS = [
    [{"role": "user", "content": "Name three primary colors."}],
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi."},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name a color."},
     {"role": "assistant", "content": "Blue.\n\nOr red."}, {"role": "user", "content": "And green?"}],
    [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello!"},
     {"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Blue."}],
]


def render_chat_pieces(pieces, messages):
    """The text of a conversation as the Ollama template of the pieces renders it (ollama_chat_template,
    line for line): where export checks the pieces against the chat template, and the tests too."""
    text, previous, system = "", "", None
    for k, message in enumerate(messages):
        role, content = message["role"], message["content"]
        if role == "system":
            system = content
        elif role == "user":
            if previous == "assistant":
                text += pieces["to_user"]
            elif previous == "":
                text += pieces["plain_open"] if system is None else pieces["system_open"] + system + pieces["system_close"]
            text += content
        elif role == "assistant":
            last = k == len(messages) - 1
            text += (pieces["to_last_assistant"] + content + pieces["assistant_end"] if last
                     else pieces["to_assistant"] + content)
        if role in ("user", "assistant"):
            previous = role
    return text + (pieces["to_generation"] if previous == "user" else "")


def chat_pieces(tokenizer):
    """The CHAT_PIECES of the tokenizer's chat template (as training renders it, prompts.render_text),
    found by rendering conversations whose contents are private-use characters no template writes,
    without the start of text (llama.cpp adds it, as the file's add_bos_token says); ValueError if
    they do not render CHECK_CONVERSATIONS exactly as the template does (a template that renders a
    turn by its content or its place otherwise)."""
    def parts(roles):
        messages = [{"role": role, "content": chr(0xE000 + n)} for n, role in enumerate(roles)]
        text, found = render_text(messages, CHAT_TEMPLATE, tokenizer), []
        for message in messages:
            if text.count(message["content"]) != 1:
                raise ValueError(f"the chat template of {tokenizer.name} does not write each message once, so no Ollama "
                                 "template can be made of it")
            before, _, text = text.partition(message["content"])
            found.append(before)
        return found + [text]
    bos = tokenizer.decode(tokenizer.bos_ids)
    system, plain, answered = (parts(["system", "user", "assistant", "user"]), parts(["user", "assistant", "user"]),
                               parts(["user", "assistant"]))
    pieces = dict(system_open=system[0].removeprefix(bos), system_close=system[1],
                  plain_open=plain[0].removeprefix(bos), to_assistant=system[2], to_user=system[3],
                  to_generation=system[4], to_last_assistant=answered[1], assistant_end=answered[2])
    for messages in CHECK_CONVERSATIONS:
        if bos + render_chat_pieces(pieces, messages) != render_text(messages, CHAT_TEMPLATE, tokenizer):
            raise ValueError(f"the chat template of {tokenizer.name} renders some turns otherwise than others, so no "
                             "Ollama template can be made of it; use llama.cpp's server, which runs the template itself")
    return pieces


def ollama_chat_template(pieces):
    """An Ollama TEMPLATE (Go's text/template over .Messages) that writes the CHAT_PIECES around the
    messages as render_chat_pieces does. Ollama joins consecutive messages of one role before its
    template sees them (template.collate); a message of another role (a tool's) is left out."""
    def text(name):
        return f"{{{{ {json.dumps(pieces[name], ensure_ascii=False)} }}}}" if pieces[name] else ""
    return "\n".join([
        '{{- $previous := "" }}{{- $system := "" }}{{- $has_system := false }}',
        "{{- range $i, $m := .Messages }}",
        "{{- $last := eq (len (slice $.Messages $i)) 1 }}",
        '{{- if eq .Role "system" }}{{ $system = .Content }}{{ $has_system = true }}',
        '{{- else if eq .Role "user" }}',
        f'{{{{- if eq $previous "assistant" }}}}{text("to_user")}',
        f'{{{{- else if eq $previous "" }}}}{{{{ if $has_system }}}}{text("system_open")}{{{{ $system }}}}'
        f'{text("system_close")}{{{{ else }}}}{text("plain_open")}{{{{ end }}}}',
        "{{- end }}{{ .Content }}",
        '{{- else if eq .Role "assistant" }}',
        f'{{{{- if $last }}}}{text("to_last_assistant")}{{{{ .Content }}}}{text("assistant_end")}',
        f'{{{{- else }}}}{text("to_assistant")}{{{{ .Content }}}}',
        "{{- end }}",
        "{{- end }}",
        '{{- if or (eq .Role "user") (eq .Role "assistant") }}{{ $previous = .Role }}{{ end }}',
        "{{- end }}",
        f'{{{{- if eq $previous "user" }}}}{text("to_generation")}{{{{ end }}}}',
    ])


def ollama_settings(style, tokenizer=GPT2):
    """(TEMPLATE, stops) of the Modelfile: the prompt style's template, or in the chat-template style
    one made of the model's own; stops at the tokenizer's end tokens (the one that ends an answer
    first) and at the tokens or lines that open the next turn (### Instruction:, <|im_start|>)."""
    if isinstance(tokenizer, GPT2Tokenizer):
        return ollama_template(style), [EOT, *turn_markers(style)]
    ends = [tokenizer.decode([i]) for i in family_token_ids(style, tokenizer)[1]]
    if style != CHAT_TEMPLATE:
        return ollama_template(style, tokenizer.eot), ends + turn_markers(style)
    pieces = chat_pieces(tokenizer)
    openings = [tokenizer.decode([i]) for _, _, i in tokenizer.added_tokens(pieces["to_user"])]
    return ollama_chat_template(pieces), list(dict.fromkeys(ends + openings))


def modelfile_text(gguf_path, cfg, style, ckpt_path, tokenizer=GPT2, modelfile="Modelfile"):
    """The Modelfile (named `modelfile` in its first line) of the GGUF file gguf_path: FROM the file
    beside it, ollama_settings' TEMPLATE and stops, and the model's context length (Ollama's default
    is longer than GPT-2's learned positions, and than a fine-tuned model has seen)."""
    template, stops = ollama_settings(style, tokenizer)
    lines = [f"{MODELFILE_HEADER} from {ckpt_path}: ollama create NAME -f {os.path.basename(modelfile)}",
             f"FROM ./{os.path.basename(gguf_path)}",
             f'TEMPLATE """{template}"""',
             *(f'PARAMETER stop "{stop}"' for stop in stops),
             f"PARAMETER num_ctx {cfg.context_length}"]
    return "\n".join(lines) + "\n"


def modelfile_path(path):
    """Where the Modelfile of the GGUF file at path goes: Modelfile beside it, unless that is
    export.py's Modelfile of another GGUF file, which stays; then NAME.Modelfile for NAME.gguf."""
    folder, name = os.path.split(path)
    shared = os.path.join(folder, "Modelfile")
    if os.path.isfile(shared):
        with open(shared, encoding="utf-8", errors="replace") as f:
            lines = f.read(100_000).split("\n")
        if lines[0].startswith(MODELFILE_HEADER) and f"FROM ./{name}" not in lines:
            return os.path.join(folder, name[:-len(".gguf")] + ".Modelfile")
    return shared


def check_gguf_out(path, force):
    """The Modelfile's path; ValueError (or OSError) unless the GGUF file (NAME.gguf) and its
    Modelfile may be written: new files, or with force an earlier export (a GGUF file, a
    Modelfile export.py wrote for it), in a folder we can write in."""
    if not path.lower().endswith(".gguf") or os.path.basename(path).startswith("."):
        raise ValueError(f"--gguf {path}: give a file name ending in .gguf, as llama.cpp and Ollama name them")
    if os.path.isdir(path):
        raise ValueError(f"{path} is a folder; --gguf takes a file name")
    modelfile = modelfile_path(path)
    for target, ours, what in [(path, b"GGUF", "a GGUF file"),
                               (modelfile, MODELFILE_HEADER.encode(), "a Modelfile export.py wrote")]:
        if os.path.isdir(target):
            raise ValueError(f"{target} is a folder; --gguf takes a file name")
        if os.path.exists(target):
            with open(target, "rb") as f:
                if f.read(len(ours)) != ours:
                    raise ValueError(f"{target} exists and is not {what}; --force replaces only an earlier export: "
                                     "give another --gguf")
            if not force:
                raise ValueError(f"{target} holds an earlier export; pass --force to replace it")
    try:
        writable_folder(os.path.dirname(path))
    except OSError as e:
        raise OSError(f"--gguf {path}: {e}") from None
    return modelfile


def export_gguf(ckpt_path, path, gguf_type="f16", force=False, base=None):
    """Write the GGUF file of the checkpoint at ckpt_path to path (NAME.gguf), and its Modelfile
    beside it (modelfile_path: Modelfile, or NAME.Modelfile where Modelfile is another GGUF
    file's); a LoRA checkpoint merged, its base looked for in the folder `base` if given. Each
    is written under a temporary name and renamed when complete. Returns the Modelfile's path."""
    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"unknown GGUF type {gguf_type!r}; choose one of {', '.join(GGUF_TYPES)}")
    import_gguf()  # a missing package is said before any loading
    path = os.path.abspath(path)
    check_gguf_out(path, force)
    with export_lock(path):  # two exports to one folder would choose the same Modelfile
        modelfile = check_gguf_out(path, force)  # again, now that no other export can change them
        model, style, tokenizer = load_model_file(ckpt_path, base=base)
        style = style or "alpaca"
        check_export(model, style, tokenizer, ckpt_path)
        name = os.path.basename(path)[:-len(".gguf")]
        if model.config.family == "gpt2":
            check_vocab(model.config.vocab_size, ckpt_path)  # llama.cpp needs the tokenizer in the file
        else:
            gguf_pre_tokenizer(tokenizer)  # one llama.cpp knows, before anything is written
        text = modelfile_text(path, model.config, style, ckpt_path, tokenizer, modelfile)
        with atomic_write(path) as tmp:
            if model.config.family == "gpt2":
                write_gguf(model, style, tmp, gguf_type, name)
            else:
                write_family_gguf(model, style, tokenizer, tmp, gguf_type, name)
            with_umask_permissions(tmp)
        with atomic_write(modelfile) as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    return modelfile


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="a checkpoint written by train.py (or the book's .pth state dict, "
                   "or nanoGPT's ckpt.pt)")
    p.add_argument("--out", help="the Hugging Face folder to write (new or empty, unless --force)")
    p.add_argument("--gguf", metavar="FILE", help="the GGUF file to write for llama.cpp and Ollama, with a "
                   "Modelfile beside it (needs pip install gguf)")
    p.add_argument("--gguf-type", choices=GGUF_TYPES,
                   help="how --gguf stores the weights (norms, biases and positions stay f32) (default: f16)")
    p.add_argument("--force", action="store_true",
                   help="replace an earlier export in --out (once the new folder is complete) or at --gguf; "
                   "anything else is never replaced")
    p.add_argument("--base", metavar="FOLDER", help="a LoRA checkpoint: the folder its base model moved to "
                   "(checked against the checkpoint's fingerprint)")
    args = p.parse_args()
    if args.out is None and args.gguf is None:
        p.error("give --out FOLDER (Hugging Face), --gguf FILE (llama.cpp, Ollama) or both")
    if args.gguf_type is not None and args.gguf is None:
        p.error("--gguf-type goes with --gguf FILE")
    if args.out is not None:
        with stop_on_interrupt(f"nothing was exported; --out {args.out} is as it was; run the command again"):
            out = export(args.ckpt, args.out, args.force, args.base)
        print(f"exported {args.ckpt} to {out}")
    if args.gguf is not None:
        with stop_on_interrupt(f"no GGUF file was written; --gguf {args.gguf} and its Modelfile are as they were; "
                               "run the command again"):
            modelfile = export_gguf(args.ckpt, args.gguf, args.gguf_type or "f16", args.force, args.base)
        size = os.path.getsize(args.gguf) / 2**20
        print(f"exported {args.ckpt} to {args.gguf} ({args.gguf_type or 'f16'}, {size:.1f} MiB) and {modelfile}; "
              f"for Ollama: ollama create NAME -f {modelfile}")


if __name__ == "__main__":
    run_main(main)
