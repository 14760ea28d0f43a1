"""Export a checkpoint to the Hugging Face format: a folder that transformers'
AutoModelForCausalLM and AutoTokenizer load with no other files.

    python export.py --ckpt out/ckpt.pt --out out/hf
    python export.py --ckpt out/best.pt --out out/hf --force    # replace an earlier export
    python export.py --ckpt out/best.pt --out out/hf --base models/gpt2-medium    # a LoRA base that moved

The model: config.json (a GPT-2 config), model.safetensors (Hugging Face's names and layouts,
as save_pretrained writes them), generation_config.json (greedy, stopping at <|endoftext|>).
The tokenizer: vocab.json and merges.txt rebuilt from tiktoken's gpt2 encoding, and
tokenizer_config.json whose chat template is the checkpoint's prompt style, so that
apply_chat_template gives the exact prompt the model was trained on. A LoRA checkpoint is
exported merged (model_from_checkpoint merges it).
"""
import argparse
import functools
import glob
import json
import os
import shutil
import signal

from checkpoint import load_model_file
from common import run_main, stop_on_interrupt, writable_folder, write_json
from data import EOT_ID, check_vocab, get_prompt_style, get_tokenizer
from model import transposed_in_hf

EOT = "<|endoftext|>"
# What an export folder holds: --force replaces a folder of these files and nothing else.
EXPORT_FILES = ("config.json", "generation_config.json", "model.safetensors", "merges.txt",
                "special_tokens_map.json", "tokenizer_config.json", "vocab.json")


# ----------------------------------------------------------------------------- the model


def hf_state_dict(model):
    """The model's tensors under the names and in the layouts save_pretrained writes for
    GPT2LMHeadModel: a "transformer." prefix, Conv1D weights [in, out], wte [vocab, emb_dim],
    no lm_head unless the model has a head of its own, and no attention-mask buffers."""
    return {("lm_head.weight" if key == "wte.head" else "transformer." + key):
            (tensor.t() if transposed_in_hf(key) else tensor).contiguous()
            for key, tensor in model.state_dict().items()}


def config_json(cfg, dtype):
    """A standard GPT2Config (the fields transformers writes) for a GPTConfig, and n_ctx, which
    transformers no longer writes but llama.cpp's convert_hf_to_gguf.py reads for GPT-2."""
    return {
        "activation_function": "gelu_new", "add_cross_attention": False, "architectures": ["GPT2LMHeadModel"],
        "attn_pdrop": cfg.drop_rate, "bos_token_id": EOT_ID, "dtype": dtype, "embd_pdrop": cfg.drop_rate,
        "eos_token_id": EOT_ID, "initializer_range": 0.02, "layer_norm_epsilon": 1e-05, "model_type": "gpt2",
        "n_ctx": cfg.context_length, "n_embd": cfg.emb_dim, "n_head": cfg.n_heads, "n_inner": None,
        "n_layer": cfg.n_layers,
        "n_positions": cfg.context_length, "pad_token_id": None, "reorder_and_upcast_attn": False,
        "resid_pdrop": cfg.drop_rate, "scale_attn_by_inverse_layer_idx": False, "scale_attn_weights": True,
        "summary_activation": None, "summary_first_dropout": 0.1, "summary_proj_to_labels": True,
        "summary_type": "cls_index", "summary_use_proj": True, "tie_word_embeddings": cfg.tied_head, "use_cache": True,
        "vocab_size": cfg.vocab_size,
    }


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


def chat_template(style):
    """The prompt style as a Jinja chat template that renders a conversation as training does
    (data.render_text): an optional system message first, user and assistant turns in
    alternation, each assistant message as the response header, its content and <|endoftext|>.
    A user message right after another user message is the optional input of the first (the
    Alpaca input block; left out when empty, as in format_prompt). With add_generation_prompt
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
        "        {%- set ns.previous = message['role'] -%}\n"
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
    from safetensors.torch import save_file

    out = os.path.realpath(out)  # a link to a folder: the export replaces the folder, the link stays
    check_out(out, force)  # before any loading
    remove_stale_tmp(out)
    # a train.py checkpoint, the book's .pth or nanoGPT's ckpt.pt
    model, style = load_model_file(ckpt_path, base=base)
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
        state = hf_state_dict(model)
        dtype = str(next(iter(state.values())).dtype).removeprefix("torch.")
        save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        write_json(config_json(cfg, dtype), os.path.join(tmp, "config.json"), indent=2)  # as transformers does
        write_json(generation_config_json(), os.path.join(tmp, "generation_config.json"), indent=2)
        if no_tokenizer is None:
            vocab, merges = gpt2_vocab_and_merges()
            with open(os.path.join(tmp, "vocab.json"), "w", encoding="utf-8") as f:
                json.dump(vocab, f)  # as GPT-2's own encoder.json, byte for byte
            with open(os.path.join(tmp, "merges.txt"), "w", encoding="utf-8") as f:
                f.write("#version: 0.2\n" + "".join(line + "\n" for line in merges))  # as GPT-2's vocab.bpe
            write_json(tokenizer_config_json(cfg, style), os.path.join(tmp, "tokenizer_config.json"), indent=2)
            write_json({"bos_token": EOT, "eos_token": EOT, "unk_token": EOT},
                       os.path.join(tmp, "special_tokens_map.json"), indent=2)
        check_out(out, force)  # again: out may have changed while the export was written
        move_into_place(tmp, out)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
    if no_tokenizer is not None:
        raise ValueError(f"{no_tokenizer}: wrote the model to {out} but left out the tokenizer files")
    return out


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


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="a checkpoint written by train.py (or the book's .pth state dict, "
                   "or nanoGPT's ckpt.pt)")
    p.add_argument("--out", required=True, help="the folder to write (new or empty, unless --force)")
    p.add_argument("--force", action="store_true",
                   help="replace an earlier export in --out (once the new folder is complete); a folder holding "
                   "anything else is never replaced")
    p.add_argument("--base", metavar="FOLDER", help="a LoRA checkpoint: the folder its base model moved to "
                   "(checked against the checkpoint's fingerprint)")
    args = p.parse_args()
    with stop_on_interrupt(f"nothing was exported; --out {args.out} is as it was; run the command again"):
        out = export(args.ckpt, args.out, args.force, args.base)
    print(f"exported {args.ckpt} to {out}")


if __name__ == "__main__":
    run_main(main)
