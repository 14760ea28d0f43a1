"""export.py for the Llama family (Qwen3, Qwen2.5, SmolLM2, Llama 3.2), on tiny models of each
(tests/tiny_family.py) fine-tuned a little and saved as train.py saves them, in the chat-template
style and in alpaca: the Hugging Face folder reloads with bit-equal logits (and, where transformers
is installed, loads in transformers with the same logits and chat-template ids); the GGUF file reads
back with llama.cpp's gguf package (llama.cpp's key names, tensor names from gguf's own map, values
with the q/k permutation undone, the tokenizer of tokenizer.json), and a forward pass written from
llama.cpp's semantics (interleaved or half-split RoPE, rope_freqs) over its tensors gives our logits;
the Modelfile's template, run by a small interpreter of Go's text/template (and by Go itself where it
is installed), renders the training prompts; and where llama-cpp-python is installed, llama.cpp
decodes greedily the tokens our model does."""
import functools
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import types

import numpy
import pytest
import torch

import export as export_script
import serve
from checkpoint import build_base, lora_checkpoint, run_record, save_checkpoint
from export import (CHAT_PIECES, chat_pieces, export, export_gguf, family_chat_template, modelfile_text,
    render_chat_pieces)
from hf import from_pretrained, hf_state_dict
from lora import add_lora, merge_lora
from model import rope_frequencies
from prompts import CHAT_TEMPLATE, encode_conversation, load_tokenizer, prompt_ids, render_text
from test_export import ROOT
from test_gguf import GO_RENDER, llama_greedy, load_llama, modelfile_template, read_gguf
from test_lora import train_adapters
import test_tokenizers
from test_tokenizers import VOCAB, fixed_date  # noqa: F401 (a fixture)
from tiny_family import FAMILIES, write_tiny_model
import scripts

needs_gguf = pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="llama.cpp's gguf package is not "
                                "installed (pip install gguf)")
STYLES = (CHAT_TEMPLATE, "alpaca")
FOLDER_FILES = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
ARCHITECTURES = {"qwen3": "Qwen3ForCausalLM", "qwen2.5": "Qwen2ForCausalLM", "smollm2": "LlamaForCausalLM",
                 "llama3.2": "LlamaForCausalLM"}
GGUF_ARCH = {"qwen3": "qwen3", "qwen2.5": "qwen2", "smollm2": "llama", "llama3.2": "llama"}
PRE = {"qwen3": "qwen2", "qwen2.5": "qwen2", "smollm2": "smollm", "llama3.2": "llama-bpe"}
# the token that ends an answer in each style: the chat template's, or the end of text training appends
ANSWER_END = {CHAT_TEMPLATE: {"qwen3": "<|im_end|>", "qwen2.5": "<|im_end|>", "smollm2": "<|im_end|>",
                              "llama3.2": "<|eot_id|>"},
              "alpaca": {"qwen3": "<|endoftext|>", "qwen2.5": "<|endoftext|>", "smollm2": "<|endoftext|>",
                         "llama3.2": "<|end_of_text|>"}}

# conversations as training and generation see them (no content with whitespace around it: Llama 3.2's
# template trims it, Ollama's templates cannot)
ONE_TURN = [{"role": "user", "content": "What is the capital of France?"}]
WITH_SYSTEM = [{"role": "system", "content": "You are terse."}, *ONE_TURN]
SEVERAL = [{"role": "system", "content": "Answer in one line."}, {"role": "user", "content": "Hi there!"},
           {"role": "assistant", "content": "Hello! How can I help?"},
           {"role": "user", "content": "Name a colour.\nJust one, 2 words at most: Grüße 🙂"},
           {"role": "assistant", "content": "Blue,\n\n42 times."}, {"role": "user", "content": "And another?"}]
ANSWERED = [*ONE_TURN, {"role": "assistant", "content": "Paris."}]
CONVERSATIONS = [ONE_TURN, WITH_SYSTEM, SEVERAL, SEVERAL[1:], ANSWERED, SEVERAL[:-1]]


# ----------------------------------------------------------------------------- checkpoints as train.py saves them


def fine_tune(model, seed):
    """Move every weight of the model a little (norms and biases too, which start at 1 and 0), as
    fine-tuning would: an export that drops or misplaces any of them changes the logits."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    return model.eval()


def save_run(model, tokenizer, style, path, extra=None):
    """A checkpoint as train.py's best.pt has it: run_record (the tokenizer included) and the weights."""
    splits = types.SimpleNamespace(kind="instruction", path="data/alpaca.json", fingerprint={"sha256": "0"})
    save_checkpoint({**run_record(model, splits, style, True, (0.85, 0.1), tokenizer),
                     **(extra or {"model": model.state_dict()})}, path)
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """runs(family, style): (model, tokenizer, checkpoint path) of a tiny model of the family fine-tuned in
    the style (made once)."""
    root = tmp_path_factory.mktemp("runs")

    @functools.cache
    def run(family, style):
        folder = write_tiny_model(str(root / family), family)
        model, tokenizer = fine_tune(from_pretrained(folder), seed=len(family)), load_tokenizer(folder)
        return model, tokenizer, save_run(model, tokenizer, style, str(root / f"{family}-{style}.pt"))
    return run


@pytest.fixture(scope="module")
def exports(runs, tmp_path_factory):
    """exports(family, style): the Hugging Face folder of runs(family, style) (made once)."""
    root = tmp_path_factory.mktemp("exports")
    return functools.cache(lambda family, style: export(runs(family, style)[2], str(root / f"{family}-{style}")))


def token_ids(vocab_size, seed=0):
    return torch.randint(0, vocab_size, (2, 24), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- the Hugging Face folder


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("family", FAMILIES)
def test_the_folder_reloads_with_the_checkpoints_logits_and_tokenizer(runs, exports, family, style):
    model, tokenizer, _ = runs(family, style)
    folder = exports(family, style)
    assert sorted(os.listdir(folder)) == FOLDER_FILES
    loaded = from_pretrained(folder).eval()
    assert loaded.config == model.config
    idx = token_ids(model.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(loaded(idx), model(idx))

    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(folder, "generation_config.json")) as f:
        generation = json.load(f)
    end = tokenizer.token_id(ANSWER_END[style][family])
    assert config["architectures"] == [ARCHITECTURES[family]] and config["dtype"] == "float32"
    assert config["eos_token_id"] == end and generation["eos_token_id"][0] == end
    assert sorted(generation["eos_token_id"]) == sorted(tokenizer.stop_ids)  # generate.py stops at all of them
    assert generation["pad_token_id"] == tokenizer.pad_id and generation["do_sample"] is False
    assert config.get("bos_token_id") == generation.get("bos_token_id") == (0 if family == "llama3.2" else
                                                                             1 if family == "smollm2" else None)
    with open(os.path.join(folder, "tokenizer.json"), encoding="utf-8") as f:
        assert f.read() == tokenizer.json  # the checkpoint's own, byte for byte

    # our own reader of the folder: the same tokenizer, and the chat template renders training's text
    reread = load_tokenizer(folder)
    assert reread.stop_ids == tokenizer.stop_ids and reread.bos_ids == tokenizer.bos_ids
    with open(os.path.join(folder, "tokenizer_config.json")) as f:
        assert json.load(f)["chat_template"] == family_chat_template(style, tokenizer)
    for messages in CONVERSATIONS:
        assert render_text(messages, CHAT_TEMPLATE, reread) == render_text(messages, style, tokenizer)


@needs_gguf
def test_the_command_line_writes_both_formats(runs, tmp_path):
    _, _, ckpt = runs("smollm2", CHAT_TEMPLATE)
    result = scripts.run([sys.executable, os.path.join(ROOT, "export.py"), "--ckpt", ckpt, "--out",
                             str(tmp_path / "hf"), "--gguf", str(tmp_path / "smol.gguf"), "--gguf-type", "bf16"],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"exported {ckpt} to {tmp_path / 'hf'}" and len(lines) == 2
    assert lines[1].startswith(f"exported {ckpt} to {tmp_path / 'smol.gguf'} (bf16, ")
    assert sorted(os.listdir(tmp_path)) == [".export.lock", "Modelfile", "hf", "smol.gguf"]
    assert sorted(os.listdir(tmp_path / "hf")) == FOLDER_FILES


def test_a_lora_checkpoint_is_exported_merged(tmp_path):
    """A LoRA run on a Llama 3.2 (untied head) as train.py saves it: the adapters and the base's
    identity; the export holds the merged weights."""
    base = write_tiny_model(str(tmp_path / "base"), "llama3.2")
    model, identity = build_base(base, pretrained=True, seed=3, context_length=64)
    tokenizer = load_tokenizer(base)
    model = add_lora(model, rank=4, alpha=16, targets=["q", "v", "mlp_out"])
    train_adapters(model, steps=3, vocab=model.config.vocab_size)
    path = save_run(model, tokenizer, CHAT_TEMPLATE, str(tmp_path / "lora.pt"),
                    extra={**lora_checkpoint(model, identity), "args": {"model": base}})
    merged = merge_lora(model).eval()
    loaded = from_pretrained(export(path, str(tmp_path / "hf"))).eval()
    idx = token_ids(merged.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx), merged(idx), atol=1e-5, rtol=0)
        assert not torch.allclose(loaded(idx), from_pretrained(base, context_length=64)(idx), atol=1e-3)


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_loads_the_folder_with_our_logits_and_prompt_ids(runs, exports, family, style):
    transformers = pytest.importorskip("transformers")
    model, tokenizer, _ = runs(family, style)
    folder = exports(family, style)
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    idx = token_ids(model.config.vocab_size, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(reference(idx).logits, model(idx), atol=1e-4, rtol=0)
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    for messages in CONVERSATIONS:
        answered = messages[-1]["role"] == "assistant"
        rendered = theirs.apply_chat_template(messages, add_generation_prompt=not answered, tokenize=False)
        assert rendered == render_text(messages, style, tokenizer)
        if not answered:  # the prompt generation feeds the model, id for id
            ids = theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
            assert ids["input_ids"] == prompt_ids({"messages": messages}, style, tokenizer)
    assert reference.generation_config.eos_token_id[0] == tokenizer.token_id(ANSWER_END[style][family])
    if family == "qwen3" and style == CHAT_TEMPLATE:  # trained without thinking; a caller may still ask for it
        thinking = theirs.apply_chat_template(ONE_TURN, add_generation_prompt=True, tokenize=False,
                                              enable_thinking=True)
        assert thinking.endswith("<|im_start|>assistant\n") and "<think>" not in thinking


@pytest.mark.parametrize("family", FAMILIES)
def test_serve_renders_user_messages_in_a_row_as_the_exported_template_does(runs, exports, family):
    """In the chat-template style serve.py's rule for user messages in a row is the model's own
    template's (each one a turn), so the server, transformers on the exported folder and llama.cpp
    on its GGUF file (the same template) give one prompt; a third in a row is no error either."""
    transformers = pytest.importorskip("transformers")
    _, tokenizer, _ = runs(family, CHAT_TEMPLATE)
    theirs = transformers.AutoTokenizer.from_pretrained(exports(family, CHAT_TEMPLATE))
    instruction, given = {"role": "user", "content": "Translate into German:"}, {"role": "user", "content": "Thanks."}
    for messages in ([instruction, given], [*WITH_SYSTEM[:1], instruction, given, given],
                     [*ANSWERED, instruction, given]):
        assert [m["role"] for m in serve.check_messages(messages, CHAT_TEMPLATE)] == [m["role"] for m in messages]
        ids = theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
        assert serve.conversation_ids(messages, CHAT_TEMPLATE, tokenizer) == ids["input_ids"]


def test_what_cannot_be_exported_is_refused_before_anything_is_written(runs, tmp_path):
    model, tokenizer, _ = runs("qwen3", CHAT_TEMPLATE)
    older = str(tmp_path / "older.pt")  # a checkpoint from before tokenizers travelled with it
    save_checkpoint({"model": model.state_dict(), "config": vars(model.config), "prompt_style": "alpaca"}, older)
    with pytest.raises(ValueError, match=f"^{older} holds a Qwen3ForCausalLM model but not its tokenizer"):
        export(older, str(tmp_path / "hf"))
    no_template = load_tokenizer(write_tiny_model(str(tmp_path / "base"), "qwen3"))
    no_template.chat_template = None
    path = save_run(model, no_template, CHAT_TEMPLATE, str(tmp_path / "no-template.pt"))
    with pytest.raises(ValueError, match="was trained in the chat-template style, but its tokenizer has no chat"):
        export(path, str(tmp_path / "hf"))
    assert sorted(os.listdir(tmp_path)) == [".export.lock", "base", "no-template.pt", "older.pt"]


# ----------------------------------------------------------------------------- the GGUF file


def deinterleaved(weight, n_heads):
    """Undo llama.cpp's interleaving of q or k rows: row 2i + j of a head goes back to i + j * head_dim / 2."""
    return weight.reshape(n_heads, weight.shape[0] // n_heads // 2, 2, *weight.shape[1:]).transpose(1, 2) \
        .reshape(weight.shape)


def expected_gguf_tensors(model, arch):
    """name -> tensor llama.cpp's architecture reads, named by the gguf package's own map of Hugging Face
    names, in the file's layout with llama's q/k interleaving undone (deinterleaved reverses it)."""
    import gguf
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), model.config.n_layers)
    return {names.get_name(name, try_suffixes=(".weight", ".bias")): tensor.float()
            for name, tensor in hf_state_dict(model).items()}


def gguf_key(name, arch):
    """The full name of one of gguf.Keys' keys (LLM.CONTEXT_LENGTH -> qwen3.context_length)."""
    import gguf
    group, key = name.split(".")
    return getattr(getattr(gguf.Keys, group), key).format(arch=arch)


@needs_gguf
@pytest.mark.parametrize("family", FAMILIES)
def test_the_gguf_file_reads_back_with_llama_cpps_keys_tensors_and_tokenizer(runs, tmp_path, family):
    import gguf
    model, tokenizer, ckpt = runs(family, CHAT_TEMPLATE)
    cfg, arch = model.config, GGUF_ARCH[family]
    path = str(tmp_path / "model.gguf")
    export_gguf(ckpt, path, "f32")
    fields, tensors = read_gguf(path)

    assert {key: value for key, value in fields.items() if not key.startswith("tokenizer.")} == {
        "general.architecture": arch, "general.name": "model", "general.file_type": 0,
        "general.quantization_version": 2, **{gguf_key(name, arch): value for name, value in [
            ("LLM.CONTEXT_LENGTH", 128), ("LLM.EMBEDDING_LENGTH", 64), ("LLM.BLOCK_COUNT", 2),
            ("LLM.FEED_FORWARD_LENGTH", 96), ("Attention.HEAD_COUNT", 4), ("Attention.HEAD_COUNT_KV", cfg.n_kv_heads),
            ("Attention.KEY_LENGTH", cfg.head_dim), ("Attention.VALUE_LENGTH", cfg.head_dim),
            ("Rope.DIMENSION_COUNT", cfg.head_dim), ("Rope.FREQ_BASE", cfg.rope_base),
            ("Attention.LAYERNORM_RMS_EPS", pytest.approx(cfg.norm_eps)), ("LLM.VOCAB_SIZE", cfg.vocab_size)]}}
    assert cfg.head_dim == (32 if family == "qwen3" else 16)  # Qwen3's is not width / heads

    # the tensors: gguf's own names for the architecture, the values (q and k interleaved only for llama)
    expected = expected_gguf_tensors(model, arch)
    if family == "llama3.2":  # its rope scaling: what each frequency is divided by
        inv_freq = 1.0 / (cfg.rope_base ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim))
        expected["rope_freqs.weight"] = inv_freq / rope_frequencies(cfg)
    assert sorted(tensors) == sorted(expected)
    allowed = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[getattr(gguf.MODEL_ARCH, arch.upper())]}
    assert {re.sub(r"^blk\.\d+\.", "blk.{bid}.", name.rsplit(".", 1)[0]) for name in tensors} <= allowed
    assert ("output.weight" in tensors) == (family == "llama3.2")  # an untied head; llama.cpp ties a missing one
    for name, (kind, shape, values) in tensors.items():
        assert kind == "F32" and shape == tuple(reversed(expected[name].shape)), name
        if arch == "llama" and re.search(r"attn_[qk]\.weight$", name):
            values = deinterleaved(values, cfg.n_heads if "attn_q" in name else cfg.n_kv_heads)
            assert not torch.equal(values, tensors[name][2])  # really interleaved
        if name == "rope_freqs.weight":
            torch.testing.assert_close(values, expected[name], rtol=1e-5, atol=0)
            assert values.min() == 1 and values.max() == 4  # all three bands of the scaling occur
        else:
            assert torch.equal(values, expected[name]), name

    # the tokenizer: tokenizer.json's tokens, types and merges; the ids that fit the style
    spec = json.loads(tokenizer.json)
    tokens, types_ = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == PRE[family]
    assert len(tokens) == len(types_) == cfg.vocab_size
    added_ids = {added["id"] for added in spec["added_tokens"]}  # the trainer's special tokens are in both
    for token, i in spec["model"]["vocab"].items():
        assert tokens[i] == token and (types_[i] == gguf.TokenType.NORMAL or i in added_ids)
    for added in spec["added_tokens"]:
        kind = gguf.TokenType.CONTROL if added["content"].startswith("<|") else gguf.TokenType.USER_DEFINED
        assert tokens[added["id"]] == added["content"] and types_[added["id"]] == kind
    if family in ("qwen3", "qwen2.5"):  # Qwen's <think>, <tool_call>: added, not special
        assert types_[tokenizer.token_id("<think>")] == gguf.TokenType.USER_DEFINED
    assert fields["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    end = tokenizer.token_id(ANSWER_END[CHAT_TEMPLATE][family])
    assert fields["tokenizer.ggml.eos_token_id"] == fields["tokenizer.ggml.eot_token_id"] == end
    assert fields["tokenizer.ggml.padding_token_id"] == tokenizer.pad_id
    assert fields.get("tokenizer.ggml.bos_token_id") == {"llama3.2": 0, "smollm2": 1}.get(family)
    assert fields["tokenizer.ggml.add_bos_token"] is (family == "llama3.2")
    assert fields["tokenizer.chat_template"] == family_chat_template(CHAT_TEMPLATE, tokenizer)


@needs_gguf
@pytest.mark.parametrize("gguf_type", ["f16", "bf16", "q8_0"])
def test_the_other_gguf_types_and_an_alpaca_checkpoint(runs, tmp_path, gguf_type):
    model, tokenizer, ckpt = runs("llama3.2", "alpaca")
    path = str(tmp_path / "model.gguf")
    export_gguf(ckpt, path, gguf_type)
    fields, tensors = read_gguf(path)
    assert fields["general.file_type"] == {"f16": 1, "bf16": 32, "q8_0": 7}[gguf_type]
    end = tokenizer.token_id("<|end_of_text|>")  # what training put after each answer in the alpaca style
    assert fields["tokenizer.ggml.eos_token_id"] == fields["tokenizer.ggml.eot_token_id"] == end
    assert fields["tokenizer.chat_template"] == family_chat_template("alpaca", tokenizer)
    assert fields["tokenizer.chat_template"].startswith('{{- "<|begin_of_text|>" -}}')
    expected = expected_gguf_tensors(model, "llama")
    for name, (kind, _, values) in tensors.items():
        if name == "rope_freqs.weight" or kind == "F32":
            assert kind == "F32" and (values.dim() == 1), name  # norms and rope_freqs stay float32
            continue
        assert kind == gguf_type.upper(), name
        want = expected[name]
        if re.search(r"attn_[qk]\.weight$", name):
            values = deinterleaved(values, 4 if "attn_q" in name else 2)
        if gguf_type == "f16":
            assert torch.equal(values, want.half().float()), name
        elif gguf_type == "bf16":
            assert torch.equal(values, want.bfloat16().float()), name
        else:
            torch.testing.assert_close(values, want, atol=want.abs().max().item() / 127, rtol=0)


def llama_cpp_logits(fields, tensors, ids):
    """The logits llama.cpp computes for the token ids from a GGUF file's tensors (f32), written from its
    semantics rather than from our model: RMSNorm, RoPE on pairs of consecutive values (llama) or of
    values head_dim / 2 apart (qwen2, qwen3; llama-model.cpp's rope types), divided by rope_freqs,
    QK-norm, grouped-query attention, SwiGLU, and the output head, or token_embd where there is none."""
    arch = fields["general.architecture"]
    w = {name: values for name, (_, _, values) in tensors.items()}
    n_heads, n_kv, dim = (fields[f"{arch}.{k}"] for k in ("attention.head_count", "attention.head_count_kv",
                                                          "attention.key_length"))
    eps = fields[f"{arch}.attention.layer_norm_rms_epsilon"]

    def norm(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

    freqs = fields[f"{arch}.rope.freq_base"] ** (-torch.arange(0, dim, 2).double() / dim)
    angles = torch.arange(len(ids)).double()[:, None] * (freqs / w.get("rope_freqs.weight", torch.ones(1)).double())
    cos, sin = angles.cos().float()[:, None], angles.sin().float()[:, None]  # (T, 1, dim / 2)

    def rope(x):  # (T, heads, dim)
        if arch == "llama":
            a, b = x[..., 0::2], x[..., 1::2]
            return torch.stack((a * cos - b * sin, a * sin + b * cos), -1).flatten(-2)
        a, b = x[..., :dim // 2], x[..., dim // 2:]
        return torch.cat((a * cos - b * sin, a * sin + b * cos), -1)

    x, T = w["token_embd.weight"][ids], len(ids)
    for i in range(fields[f"{arch}.block_count"]):
        p = lambda name: w.get(f"blk.{i}.{name}")  # noqa: E731
        h = norm(x, p("attn_norm.weight"))
        q, k, v = ((h @ p(f"attn_{n}.weight").T + (p(f"attn_{n}.bias") if p(f"attn_{n}.bias") is not None else 0))
                   .view(T, heads, dim) for n, heads in (("q", n_heads), ("k", n_kv), ("v", n_kv)))
        if p("attn_q_norm.weight") is not None:
            q, k = norm(q, p("attn_q_norm.weight")), norm(k, p("attn_k_norm.weight"))
        q, k = rope(q), rope(k)
        k, v = (t.repeat_interleave(n_heads // n_kv, dim=1) for t in (k, v))
        scores = torch.einsum("qhd,khd->hqk", q, k) / dim ** 0.5
        scores = scores.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
        x = x + torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(T, -1) @ p("attn_output.weight").T
        h = norm(x, p("ffn_norm.weight"))
        x = x + (torch.nn.functional.silu(h @ p("ffn_gate.weight").T) * (h @ p("ffn_up.weight").T)) @ \
            p("ffn_down.weight").T
    return norm(x, w["output_norm.weight"]) @ w.get("output.weight", w["token_embd.weight"]).T


@needs_gguf
@pytest.mark.parametrize("family", FAMILIES)
def test_a_forward_pass_with_llama_cpps_semantics_over_the_file_gives_our_logits(runs, tmp_path, family):
    model, _, ckpt = runs(family, CHAT_TEMPLATE)
    path = str(tmp_path / "model.gguf")
    export_gguf(ckpt, path, "f32")
    fields, tensors = read_gguf(path)
    ids = token_ids(model.config.vocab_size, seed=2)[0]
    with torch.no_grad():
        torch.testing.assert_close(llama_cpp_logits(fields, tensors, ids), model(ids[None])[0], atol=1e-4, rtol=0)


GGUF_SCALARS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8",
                12: "<f8"}  # GGUF's value types but 8 (string) and 9 (array)


def gguf_metadata(path):
    """The key-value metadata of a GGUF file (version 2 or 3), read in a second where the gguf package's
    GGUFReader takes 20 over a vocabulary of 150,000 tokens: key -> value, arrays as lists."""
    data = memoryview(open(path, "rb").read())
    assert bytes(data[:4]) == b"GGUF" and int.from_bytes(data[4:8], "little") in (2, 3)
    pos = 24

    def number(kind):
        nonlocal pos
        value = numpy.frombuffer(data, GGUF_SCALARS[kind], 1, pos)[0]
        pos += value.itemsize
        return value.item()

    def string():
        nonlocal pos
        n = number(10)
        pos += n
        return bytes(data[pos - n:pos]).decode("utf-8")

    def value(kind):
        nonlocal pos
        if kind == 8:
            return string()
        if kind != 9:
            return number(kind)
        kind, n = number(4), number(10)
        if kind in (8, 9):
            return [value(kind) for _ in range(n)]
        values = numpy.frombuffer(data, GGUF_SCALARS[kind], n, pos)
        pos += values.nbytes
        return values.tolist()
    metadata = {}
    for _ in range(int.from_bytes(data[16:24], "little")):
        key = string()
        metadata[key] = value(number(4))
    return metadata


@needs_gguf
@pytest.mark.parametrize("name", ["qwen2", "llama-bpe"])
def test_a_real_vocabulary_goes_into_the_file_as_llama_cpps_converter_wrote_it(name, monkeypatch):
    """Qwen2's and Llama 3's real vocabularies, as tokenizer.json files rebuilt from llama.cpp's vocab-only
    GGUF files (../shared/vocab): the tokens, token types and merges export.py writes of them are those
    files' own, and the pre-tokenizer is named as there."""
    import gguf
    path = os.path.join(VOCAB, f"ggml-vocab-{name}.gguf")
    if not os.path.exists(path):
        pytest.skip(f"needs {path}")
    fields = gguf_metadata(path)
    tokens, kinds = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    merges = fields["tokenizer.ggml.merges"]
    monkeypatch.setattr(test_tokenizers, "gguf_vocabulary", lambda _: (tokens, kinds, merges))  # read fast
    spec = json.loads(test_tokenizers.gguf_tokenizer_json(name))
    ours = export_script.gguf_family_vocab(gguf, types.SimpleNamespace(json=json.dumps(spec), name=name), len(tokens))
    assert export_script.gguf_pre_tokenizer(types.SimpleNamespace(json=json.dumps(spec), name=name)) == name
    assert fields["tokenizer.ggml.pre"] == name
    assert ours[0] == tokens and ours[2] == merges
    # the vocab-only files' unused [PAD] tokens come back as user-defined added tokens of the rebuilt
    # tokenizer.json (which has no such kind); every other type is the file's own
    unused = [i for i, kind in enumerate(kinds) if kind == gguf.TokenType.UNUSED]
    assert [k for i, k in enumerate(ours[1]) if i not in set(unused)] == [k for k in kinds if k != gguf.TokenType.UNUSED]
    assert {ours[1][i] for i in unused} <= {gguf.TokenType.USER_DEFINED}


def test_an_unknown_pre_tokenizer_is_refused_in_one_sentence(runs):
    _, tokenizer, _ = runs("qwen3", CHAT_TEMPLATE)
    spec = json.loads(tokenizer.json)
    spec["pre_tokenizer"] = {"type": "Whitespace"}
    other = types.SimpleNamespace(json=json.dumps(spec), name="models/other")
    with pytest.raises(ValueError, match=r"^the pre-tokenizer of models/other \(Whitespace\) is none of those of "
                                         r"Qwen2.5, Qwen3, Llama 3 and SmolLM2.*convert_hf_to_gguf.py$"):
        export_script.gguf_pre_tokenizer(other)


# ----------------------------------------------------------------------------- the Modelfile

GO_ACTION = re.compile(r'{{(- )?\s*((?:"(?:\\.|[^"\\])*"|[^"}])*?)\s*( -)?}}')
GO_TOKEN = re.compile(r'"(?:\\.|[^"\\])*"|[()]|[^\s()]+')
GO_FUNCTIONS = {"eq": lambda a, b: a == b, "ne": lambda a, b: a != b, "len": len, "slice": lambda x, i: x[i:],
                "not": lambda a: not a, "or": lambda *a: next((x for x in a if x), a[-1]),
                "and": lambda *a: next((x for x in a if not x), a[-1])}


def go_parse(template):
    """The tree of a Go text/template, for the part of it Ollama templates use: text, {{ expression }},
    {{ $v := x }}, {{ $v = x }}, if / else if / else / end, range [$i, $e :=] x; "{{- " and " -}}" trim
    the whitespace beside them."""
    root, stack, pos, trim = [], [], 0, False
    body = root
    for m in GO_ACTION.finditer(template):
        text = template[pos:m.start()]
        text = text.lstrip() if trim else text
        body.append(("text", text.rstrip() if m.group(1) else text))
        action, trim, pos = m.group(2), bool(m.group(3)), m.end()
        if action.startswith("if "):
            node = ["if", [(action[3:], [])], None]
            body.append(node)
            stack.append((node, body))
            body = node[1][0][1]
        elif action.startswith("else if "):
            node = stack[-1][0]
            node[1].append((action[8:], []))
            body = node[1][-1][1]
        elif action == "else":
            node = stack[-1][0]
            node[2] = body = []
        elif action.startswith("range "):
            names, _, expr = action[6:].rpartition(":=")
            node = ["range", [n.strip() for n in names.split(",")] if names else [], expr.strip(), []]
            body.append(node)
            stack.append((node, body))
            body = node[3]
        elif action == "end":
            body = stack.pop()[1]
        else:
            body.append(("action", action))
    body.append(("text", template[pos:].lstrip() if trim else template[pos:]))
    assert not stack, "unclosed block"
    return root


def go_eval(expression, dot, scopes):
    """The value of a Go template expression: a function call, a string, a variable, a field (.Role)."""
    tokens = GO_TOKEN.findall(expression)

    def term(k):
        token = tokens[k]
        if token == "(":
            value, k = call(k + 1)
            assert tokens[k] == ")"
            return value, k + 1
        if token.startswith('"'):
            return json.loads(token), k + 1
        if token in ("true", "false"):
            return token == "true", k + 1
        if token.isdigit():
            return int(token), k + 1
        head, *fields = token.split(".")
        value = dot if head == "" else next(s[head] for s in reversed(scopes) if head in s)
        for field in fields:
            value = value[field]
        return value, k + 1

    def call(k):
        if tokens[k] in GO_FUNCTIONS:
            function, args, k = GO_FUNCTIONS[tokens[k]], [], k + 1
            while k < len(tokens) and tokens[k] != ")":
                value, k = term(k)
                args.append(value)
            return function(*args), k
        return term(k)

    value, k = call(0)
    assert k == len(tokens), expression
    return value


def go_execute(nodes, dot, scopes, out):
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "action":
            assign = re.fullmatch(r"(\$\w+) (:?=) (.*)", node[1])
            if assign is None:
                value = go_eval(node[1], dot, scopes)
                out.append(("true" if value else "false") if isinstance(value, bool) else str(value))
            elif assign.group(2) == ":=":
                scopes[-1][assign.group(1)] = go_eval(assign.group(3), dot, scopes)
            else:
                next(s for s in reversed(scopes) if assign.group(1) in s)[assign.group(1)] = \
                    go_eval(assign.group(3), dot, scopes)
        elif node[0] == "if":
            chosen = next((body for condition, body in node[1] if go_eval(condition, dot, scopes)), node[2] or [])
            go_execute(chosen, dot, [*scopes, {}], out)
        else:  # range
            for i, item in enumerate(go_eval(node[2], dot, scopes)):
                variables = dict(zip(node[1], [i, item])) if len(node[1]) == 2 else dict(zip(node[1], [item]))
                go_execute(node[3], item, [*scopes, variables], out)


def collate(messages):
    """Ollama's template.collate: consecutive messages of one role joined by a blank line."""
    out = []
    for m in messages:
        if out and out[-1]["Role"] == m["role"]:
            out[-1]["Content"] += "\n\n" + m["content"]
        else:
            out.append({"Role": m["role"], "Content": m["content"]})
    return out


def go_render(template, messages):
    """The text Ollama's template gives for messages (a small interpreter of Go's text/template)."""
    data = {"Messages": collate(messages)}
    out = []
    go_execute(go_parse(template), data, [{"$": data}], out)
    return "".join(out)


def test_the_go_interpreter_renders_the_gpt2_templates_as_go_does():
    """The interpreter on the GPT-2 templates that tests/test_gguf.py checks with Go itself."""
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi."},
                    {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "And green?"}]
    for style in ("alpaca", "phi3", "none"):
        template = export_script.ollama_template(style)
        assert go_render(template, conversation) == render_text(conversation, style)
        assert go_render(template, conversation[:3]) == render_text(conversation[:3], style)
    assert go_render('{{- $x := 1 }} {{ if eq $x 2 }}a{{ else if ne $x 3 }}b{{ else }}c{{ end }} \n {{- " d" }} -{{ 4 -}}\n',
                     []) == " b d -4"


def expected_ollama_text(messages, style, tokenizer):
    """What training renders for messages, without the start of text llama.cpp adds itself."""
    return render_text(messages, style, tokenizer).removeprefix(tokenizer.decode(tokenizer.bos_ids))


@needs_gguf
@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("family", FAMILIES)
def test_the_modelfile_renders_the_training_prompts(runs, tmp_path, family, style):
    model, tokenizer, ckpt = runs(family, style)
    with open(export_gguf(ckpt, str(tmp_path / "model.gguf"), "q8_0"), encoding="utf-8") as f:
        text = f.read()
    template = modelfile_template(text)
    assert text == modelfile_text(str(tmp_path / "model.gguf"), model.config, style, ckpt, tokenizer)
    for messages in CONVERSATIONS:
        assert go_render(template, messages) == expected_ollama_text(messages, style, tokenizer), messages
    stops = [line.removeprefix("PARAMETER stop ") for line in text.split("\n") if line.startswith("PARAMETER stop")]
    ends = [json.dumps(tokenizer.decode([i])) for i in tokenizer.stop_ids]
    assert stops[0] == json.dumps(ANSWER_END[style][family]) and sorted(stops[:len(ends)]) == sorted(ends)
    openings = {CHAT_TEMPLATE: {"llama3.2": ["<|start_header_id|>", "<|end_header_id|>"]}.get(family, ["<|im_start|>"]),
                "alpaca": ["### Instruction:", "### Response:"]}[style]
    assert stops[len(ends):] == [json.dumps(t) for t in openings]
    assert "PARAMETER num_ctx 128" in text


@pytest.mark.usefixtures("fixed_date")  # Llama 3.2's template writes the date: 26 Jul 2024 here
@pytest.mark.parametrize("family", FAMILIES)
def test_the_chat_pieces_are_the_familys_format(runs, family):
    _, tokenizer, _ = runs(family, CHAT_TEMPLATE)
    pieces = chat_pieces(tokenizer)
    assert set(pieces) == set(CHAT_PIECES)
    if family == "llama3.2":
        assert pieces["to_user"] == "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
        assert pieces["plain_open"] == ("<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: "
                                        "December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|><|start_header_id|>user"
                                        "<|end_header_id|>\n\n")  # no <|begin_of_text|>: llama.cpp adds it
    else:  # ChatML
        assert pieces["to_user"] == "<|im_end|>\n<|im_start|>user\n"
        assert pieces["system_open"] == "<|im_start|>system\n"
        assert pieces["to_generation"] == "<|im_end|>\n<|im_start|>assistant\n" + (
            "<think>\n\n</think>\n\n" if family == "qwen3" else "")
    for messages in CONVERSATIONS:
        assert render_chat_pieces(pieces, messages) == expected_ollama_text(messages, CHAT_TEMPLATE, tokenizer)
    # a template that renders a turn by its place cannot be an Ollama template: refused, not approximated
    odd = types.SimpleNamespace(**{k: getattr(tokenizer, k) for k in ("name", "special_tokens", "bos_ids")},
                                decode=tokenizer.decode, chat_template="{% for m in messages %}{{ m['content'] }}"
                                "{% if loop.index0 == 3 %}!{% endif %}{% endfor %}")
    with pytest.raises(ValueError, match="renders some turns otherwise than others, so no Ollama template"):
        chat_pieces(odd)


@needs_gguf
@pytest.mark.skipif(shutil.which("go") is None, reason="Go is not installed (its text/template renders Ollama's)")
@pytest.mark.parametrize("family", FAMILIES)
def test_go_renders_the_modelfile_as_training_did(runs, tmp_path, family):
    _, tokenizer, ckpt = runs(family, CHAT_TEMPLATE)
    with open(export_gguf(ckpt, str(tmp_path / "model.gguf"), "q8_0"), encoding="utf-8") as f:
        template = modelfile_template(f.read())
    env = {**os.environ, "GOCACHE": str(tmp_path / "gocache"), "GOPATH": str(tmp_path / "gopath"), "GO111MODULE": "off"}
    (tmp_path / "render.go").write_text(GO_RENDER)
    cases = [[{"Role": m["role"], "Content": m["content"]} for m in messages] for messages in CONVERSATIONS]
    result = subprocess.run(["go", "run", str(tmp_path / "render.go"), template], capture_output=True, text=True,
                            input=json.dumps(cases), env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [expected_ollama_text(m, CHAT_TEMPLATE, tokenizer) for m in CONVERSATIONS]


# ----------------------------------------------------------------------------- llama.cpp itself


def greedy(model, ids, steps):
    """Our model's greedy continuation of ids, a full forward pass a token."""
    ids = list(ids)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[-steps:]


@needs_gguf
@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                    reason="llama-cpp-python is not installed (it builds llama.cpp from source: minutes)")
@pytest.mark.parametrize("family", FAMILIES)
def test_llama_cpp_tokenizes_the_prompts_and_decodes_as_our_model(runs, tmp_path, family):
    model, tokenizer, ckpt = runs(family, CHAT_TEMPLATE)
    export_gguf(ckpt, str(tmp_path / "model.gguf"), "f32")
    llm = load_llama(str(tmp_path / "model.gguf"))
    for messages in CONVERSATIONS:
        if messages[-1]["role"] == "assistant":
            continue
        ids = prompt_ids({"messages": messages}, CHAT_TEMPLATE, tokenizer)
        text = tokenizer.decode(ids)
        assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) == ids
        assert llama_greedy(llm, ids, 12, eos_id=None) == greedy(model, ids, 12)
    training = encode_conversation(ANSWERED, CHAT_TEMPLATE, tokenizer)[0]  # a whole answer, as trained
    assert llm.tokenize(tokenizer.decode(training).encode("utf-8"), add_bos=False, special=True) == training
