"""Export a checkpoint to the Hugging Face format: a folder that transformers'
AutoModelForCausalLM and AutoTokenizer load with no other files.

    python export.py --ckpt out/ckpt.pt --out out/hf
    python export.py --ckpt out/best.pt --out out/hf --force    # replace an earlier export
    python export.py --ckpt out/best.pt --out out/hf --base models/gpt2-medium    # a LoRA base that moved
    python export.py --ckpt out/best.pt --gguf out/model.gguf [--gguf-type f32|f16|q8_0]    # llama.cpp, Ollama

The model: config.json (a GPT-2 config), model.safetensors (Hugging Face's names and layouts,
as save_pretrained writes them), generation_config.json (greedy, stopping at <|endoftext|>).
The tokenizer: vocab.json and merges.txt rebuilt from tiktoken's gpt2 encoding, and
tokenizer_config.json whose chat template is the checkpoint's prompt style, so that
apply_chat_template gives the exact prompt the model was trained on. A LoRA checkpoint is
exported merged (model_from_checkpoint merges it).

With --gguf: one GGUF file for llama.cpp (its gpt2 architecture, GPT-2's tokenizer, the chat
template), written with llama.cpp's own gguf package (pip install gguf), and beside it a
Modelfile for `ollama create NAME -f Modelfile` (NAME.Modelfile when the folder's Modelfile is
another GGUF file's). Every file gets the permissions of the user's umask; an export holds a
lock beside what it writes, so two exports to one place cannot interleave.
"""
import common  # noqa: F401  (first: Ctrl-C while torch loads is one line, see common.py)
import argparse
import contextlib
import functools
import glob
import json
import os
import shutil
import signal

from checkpoint import load_model_file
from common import (atomic_write, check_interrupted, lock_file, run_main, stop_on_interrupt, writable_folder,
    write_json)
from hf import config_json as hf_config_json, hf_state_dict
from prompts import EOT, EOT_ID, check_vocab, get_prompt_style, get_tokenizer

# What an export folder holds: --force replaces a folder of these files and nothing else.
EXPORT_FILES = ("config.json", "generation_config.json", "model.safetensors", "merges.txt",
                "special_tokens_map.json", "tokenizer_config.json", "vocab.json")
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


def chat_template(style):
    """The prompt style as a Jinja chat template that renders a conversation as training does
    (prompts.render_text): an optional system message first, user and assistant turns in
    alternation, each assistant message as the response header, its content and <|endoftext|>.
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
    out = os.path.realpath(out)  # a link to a folder: the export replaces the folder, the link stays
    check_out(out, force)  # before any loading
    with export_lock(out):
        check_out(out, force)  # again, now that no other export can change it
        remove_stale_tmp(out)
        # a train.py checkpoint, the book's .pth or nanoGPT's ckpt.pt
        model, style, _ = load_model_file(ckpt_path, base=base)
        cfg, style = model.config, style or "alpaca"
        get_prompt_style(style)  # an unknown style fails before anything is written
        try:
            check_vocab(cfg.vocab_size, ckpt_path)
            no_tokenizer = None
        except ValueError as e:
            no_tokenizer = str(e)
        tmp = f"{out}.tmp-{os.getpid()}"
        os.makedirs(tmp)
        try:
            write_folder(model, style, tmp, with_tokenizer=no_tokenizer is None)
            check_out(out, force)  # again: out may have changed while the export was written
            move_into_place(tmp, out)
        finally:
            if os.path.exists(tmp):
                shutil.rmtree(tmp)
    if no_tokenizer is not None:
        raise ValueError(f"{no_tokenizer}: wrote the model to {out} but left out the tokenizer files")
    return out


def write_folder(model, style, folder, with_tokenizer=True):
    """Write the Hugging Face files of model (prompt style `style`) in folder, each with the
    permissions the user's umask gives."""
    from safetensors.torch import save_file

    state = hf_state_dict(model)
    dtype = str(next(iter(state.values())).dtype).removeprefix("torch.")
    save_file(state, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    write_json(config_json(model.config, dtype), os.path.join(folder, "config.json"), indent=2)  # as transformers
    write_json(generation_config_json(), os.path.join(folder, "generation_config.json"), indent=2)
    if with_tokenizer:
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

GGUF_TYPES = ("f32", "f16", "q8_0")
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
    biases) and the position embedding stay float32; the other weights are f16 or q8_0, and f16
    where q8_0's blocks of 32 do not divide a row."""
    if gguf_type == "f32" or len(shape) == 1 or name == "position_embd.weight":
        return gguf.GGMLQuantizationType.F32
    block_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]
    if gguf_type == "q8_0" and shape[-1] % block_size == 0:
        return gguf.GGMLQuantizationType.Q8_0
    return gguf.GGMLQuantizationType.F16


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
    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    writer.add_file_type(file_types[gguf_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

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

    for name, tensor in gguf_tensors(model):
        qtype = gguf_tensor_type(gguf, name, tensor.shape, gguf_type)
        writer.add_tensor(name, gguf.quants.quantize(tensor.contiguous().numpy(), qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def go_format(template, **values):
    """Go template actions that print a str.format template of PROMPT_STYLES with each field
    filled by a Go expression: go_format("Q: {instruction}", instruction=".Content"). Text is in
    {{ "..." }} actions: Go reads JSON's string escapes, and text between actions would lose
    its newlines to the {{- trimming."""
    names = list(values)
    pieces = template.format(**{name: f"\0{n}\0" for n, name in enumerate(names)}).split("\0")
    return "".join(f"{{{{ {values[names[int(piece)]]} }}}}" if i % 2 else
                   f"{{{{ {json.dumps(piece, ensure_ascii=False)} }}}}" if piece else "" for i, piece in enumerate(pieces))


def ollama_template(style):
    """The prompt style as an Ollama TEMPLATE (Go's text/template over .Messages), rendering what
    chat_template renders, and so what training renders (prompts.render_text): a system message
    first, a user message in the style's first-turn form (after a system message, its system
    form), a user message after an answer in the style's later-turn form, an assistant message
    as the response header, its content and <|endoftext|>. It ends with the response header
    when the last message is not an answer. Ollama joins consecutive messages of one role with a
    blank line before its template sees them (template.collate), so two user messages in a row,
    an instruction and its input elsewhere, reach it as one instruction: no input block."""
    templates = get_prompt_style(style)
    response = go_format(templates["response"])
    return "\n".join([
        '{{- $previous := "" }}{{- $system := "" }}{{- $has_system := false }}',
        "{{- range .Messages }}",
        '{{- if eq .Role "system" }}{{ $system = .Content }}{{ $has_system = true }}',
        f'{{{{- else if eq .Role "assistant" }}}}{response}{{{{ .Content }}}}{{{{ {json.dumps(EOT)} }}}}',
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


def modelfile_text(gguf_path, cfg, style, ckpt_path):
    """The Modelfile of the GGUF file gguf_path: FROM the file beside it, the prompt style as its
    TEMPLATE, stops at <|endoftext|> and the style's turn markers, and the model's context length
    (Ollama's default is longer, past GPT-2's learned positions)."""
    lines = [f"{MODELFILE_HEADER} from {ckpt_path}: ollama create NAME -f Modelfile",
             f"FROM ./{os.path.basename(gguf_path)}",
             f'TEMPLATE """{ollama_template(style)}"""',
             *(f'PARAMETER stop "{stop}"' for stop in [EOT, *turn_markers(style)]),
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
        model, style, _ = load_model_file(ckpt_path, base=base)
        style = style or "alpaca"
        get_prompt_style(style)
        check_vocab(model.config.vocab_size, ckpt_path)  # llama.cpp needs the tokenizer in the file
        with atomic_write(path) as tmp:
            write_gguf(model, style, tmp, gguf_type, os.path.basename(path)[:-len(".gguf")])
            with_umask_permissions(tmp)
        with atomic_write(modelfile) as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.write(modelfile_text(path, model.config, style, ckpt_path))
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
