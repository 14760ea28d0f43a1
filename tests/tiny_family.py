"""Tiny random models of each family as complete Hugging Face folders, written by the tests
themselves with no transformers and no download: random weights saved by hf.py's own writer
(config.json and model.safetensors as save_pretrained lays them out), a small byte-level BPE
trained here with the family's special tokens, the family's own chat template and its end ids
(test_tokenizers.write_folder). Every script can be run on them as on the real models."""
import functools
import json
import os

import torch
from safetensors.torch import save_file

import hf
from model import GPT, GPTConfig
from prompts import load_tokenizer
from test_tokenizers import trained_tokenizer_json, write_folder

# each family's switches on a tiny shape: Qwen3's head size apart from width / heads and its QK-norm,
# Qwen2.5's q/k/v biases, SmolLM2 as a Llama with as many key/value heads as heads, Llama 3.2's RoPE
# scaling (original context 32, so that all three frequency bands occur) and an untied head
SHAPE = dict(emb_dim=64, n_layers=2, n_heads=4, hidden_dim=96)
FAMILIES = {
    "qwen3": dict(family="qwen3", qkv_bias=False, n_kv_heads=2, head_dim=32, qk_norm=True, norm_eps=1e-6,
                  rope_base=1000000.0),
    "qwen2.5": dict(family="qwen2", n_kv_heads=2, norm_eps=1e-6, rope_base=1000000.0),
    "smollm2": dict(family="llama", qkv_bias=False, rope_base=100000.0),
    "llama3.2": dict(family="llama", qkv_bias=False, n_kv_heads=2, rope_base=500000.0, tied_head=False,
                     rope_scaling=dict(factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                       original_context_length=32)),
}


@functools.cache
def tokenizer_json(family):
    return trained_tokenizer_json(family)  # trained once per family and test process


def write_tiny_model(folder, family, seed=0, context_length=128):
    """Write a tiny random model of the family (a FAMILIES name) with its tokenizer files into
    folder (made if missing); return the folder as a string. The same seed, the same weights."""
    folder = write_folder(folder, family, tokenizer_json(family))
    tokenizer = load_tokenizer(folder)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, context_length=context_length, **SHAPE,
                          **FAMILIES[family]))
    bos = tokenizer.bos_ids[0] if tokenizer.bos_ids else None
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
        json.dump(hf.config_json(model.config, "float32", bos, tokenizer.eot_id), f, indent=2)
    save_file(hf.hf_state_dict(model), os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    return folder
