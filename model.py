"""GPT-2 in one file: config presets, the model, a KV cache for generation, the loss over a
data loader, and loading Hugging Face GPT-2 weights (hub names or local folders).

    python model.py                 # the presets: layers, heads, width, parameters
    python model.py gpt2-medium     # fetch its weights into the cache now (say, before going offline)
    python model.py PATH            # check that a Hugging Face GPT-2 folder loads
"""
import argparse
import hashlib
import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import IGNORE_INDEX, download, run_main

EXACT_TOP = 8  # an int8 output head's best tokens whose logits are recomputed in float


@dataclass
class GPTConfig:
    vocab_size: int = 50257
    context_length: int = 1024
    emb_dim: int = 768
    n_layers: int = 12
    n_heads: int = 12
    drop_rate: float = 0.0
    qkv_bias: bool = True
    tied_head: bool = True  # False: an output head of its own (the book's GPTModel after fine-tuning)


PRESETS = {
    "gpt2": dict(emb_dim=768, n_layers=12, n_heads=12),  # 124M
    "gpt2-medium": dict(emb_dim=1024, n_layers=24, n_heads=16),  # 355M
    "gpt2-large": dict(emb_dim=1280, n_layers=36, n_heads=20),  # 774M
    "gpt2-xl": dict(emb_dim=1600, n_layers=48, n_heads=25),  # 1558M
    "tiny": dict(emb_dim=64, n_layers=2, n_heads=4),  # tests and smoke runs (3.3M, mostly embeddings)
}
HF_REPOS = {name: f"openai-community/{name}" for name in PRESETS if name.startswith("gpt2")}


def config_for(name, **overrides):
    """The GPTConfig of a preset name, with overrides (e.g. context_length, drop_rate)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset '{name}'; choose one of {', '.join(PRESETS)}")
    return GPTConfig(**{**PRESETS[name], **overrides})


# ----------------------------------------------------------------------------- the model


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg, layer=0):
        super().__init__()
        assert cfg.emb_dim % cfg.n_heads == 0, "emb_dim must be divisible by n_heads"
        self.n_heads, self.drop_rate, self.layer = cfg.n_heads, cfg.drop_rate, layer
        self.c_attn = nn.Linear(cfg.emb_dim, 3 * cfg.emb_dim, bias=cfg.qkv_bias)
        self.c_proj = nn.Linear(cfg.emb_dim, cfg.emb_dim)
        self.resid_drop = nn.Dropout(cfg.drop_rate)

    def forward(self, x, cache=None, mask=None):
        """x (B, T, C) attends causally to itself, and in generation to the keys and values of
        the positions before it in `cache`, where its own are appended. mask: a boolean mask of
        the keys each query may see (KVCache.attn_mask), None where plain causal attention is
        right (training; a cache without padding, for a fresh prompt or one new token a row)."""
        B, T, C = x.shape
        # q, k and v of every head, (3, B, heads, T, head size): views of c_attn's output
        qkv = self.c_attn(x).view(B, T, 3, self.n_heads, C // self.n_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv
        if cache is not None:
            k, v = cache.update(self.layer, qkv[1:])  # keys and values together: one copy
        dropout = self.drop_rate if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=mask is None and T > 1)
        return self.resid_drop(self.c_proj(y.transpose(1, 2).reshape(B, T, C)))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.c_fc = nn.Linear(cfg.emb_dim, 4 * cfg.emb_dim)
        self.c_proj = nn.Linear(4 * cfg.emb_dim, cfg.emb_dim)
        self.drop = nn.Dropout(cfg.drop_rate)

    def forward(self, x):
        return self.drop(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    """A transformer block, pre-norm: attention, then the MLP, each added to the residual stream.
    The one forward of training and generation (which passes the KV cache)."""

    def __init__(self, cfg, layer=0):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.emb_dim)
        self.attn = CausalSelfAttention(cfg, layer)
        self.ln_2 = nn.LayerNorm(cfg.emb_dim)
        self.mlp = MLP(cfg)

    def forward(self, x, cache=None, mask=None):
        x = x + self.attn(self.ln_1(x), cache, mask)
        return x + self.mlp(self.ln_2(x))


class TiedEmbedding(nn.Module):
    """The token embedding, which is also the output head (weight tying, as in GPT-2). Stored
    [emb_dim, vocab], the head's [in, out]: on the CPU the head's matmul for one new token
    (generation) reads that layout some 1.5x faster than nn.Embedding's [vocab, emb_dim].
    tied=False gives the head weights of its own, `head`, in the same layout."""

    def __init__(self, vocab_size, emb_dim, tied=True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(emb_dim, vocab_size))
        self.head = None if tied else nn.Parameter(torch.empty(emb_dim, vocab_size))
        self.int8_head = None  # an Int8Linear copy of the head after quantize.quantize_int8

    def forward(self, idx):
        return F.embedding(idx, self.weight.t())

    def head_weight(self):
        return self.weight if self.head is None else self.head

    def logits(self, x):
        if self.int8_head is None:
            return x @ self.head_weight()
        # The int8 head's logits, then the float head's exact ones for its best EXACT_TOP tokens:
        # greedy decoding picks the float head's token whenever that is among them.
        logits = self.int8_head(x)
        best = logits.topk(min(EXACT_TOP, logits.size(-1)), dim=-1).indices
        exact = (self.head_weight().t()[best] * x.unsqueeze(-2)).sum(-1)  # row by row: batch-invariant
        return logits.scatter_(-1, best, exact)


class GPT(nn.Module):
    """GPT-2. Module names follow Hugging Face's: loading its weights is a matter of keys and transposes."""

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.wte = TiedEmbedding(cfg.vocab_size, cfg.emb_dim, cfg.tied_head)
        self.wpe = nn.Embedding(cfg.context_length, cfg.emb_dim)
        self.drop = nn.Dropout(cfg.drop_rate)
        self.h = nn.ModuleList(Block(cfg, layer) for layer in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.emb_dim)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by depth
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding, TiedEmbedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, TiedEmbedding) and module.head is not None:
            nn.init.normal_(module.head, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @classmethod
    def from_pretrained(cls, name_or_path, context_length=None, **kwargs):
        """GPT-2 with Hugging Face weights; see the module function from_pretrained."""
        return from_pretrained(name_or_path, context_length, **kwargs)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def _hidden(self, idx):
        x = self.drop(self.wte(idx) + self.wpe(torch.arange(idx.size(1), device=idx.device)))
        for block in self.h:
            x = block(x)
        return self.ln_f(x)

    def forward(self, idx, targets=None, reduction="mean"):
        """idx (B, T) -> logits (B, T, vocab). With targets (B, T): the cross-entropy over
        targets != -100 instead, "mean" per counted target or "sum" (divide it by the count
        yourself to average over several batches), or "none": that of each counted target, in
        row-major order (dpo.py sums them per row). A batch with no counted target gives 0,
        not NaN."""
        B, T = idx.shape
        if T > self.config.context_length:
            raise ValueError(f"sequence of {T} tokens exceeds the context length {self.config.context_length}")
        x = self._hidden(idx)
        if targets is None:
            return self.wte.logits(x)
        # Only positions that count go through the output head: with padding and masked
        # instructions that skips a large share of the biggest matmul of the model.
        keep = targets != IGNORE_INDEX
        logits = self.wte.logits(x[keep])
        if reduction == "none":
            return F.cross_entropy(logits.float(), targets[keep], reduction="none")
        loss = F.cross_entropy(logits.float(), targets[keep], reduction="sum")
        return loss / keep.sum().clamp(min=1) if reduction == "mean" else loss

    def forward_cached(self, idx, cache, all_positions=False):
        """Generation path: run the new tokens idx (B, T) through the model, appending their
        keys and values to `cache`; returns the logits of the last position only (B, vocab),
        or with all_positions those of every new token (B, T, vocab)."""
        T = idx.size(1)
        if cache.pos + T > cache.max_len:
            raise ValueError(f"KV cache full: {cache.pos} + {T} tokens > {cache.max_len}")
        x = self.wte(idx) + self.wpe(cache.positions(T))
        mask = cache.attn_mask(T)  # the same for every layer
        for block in self.h:
            x = block(x, cache, mask)
        cache.pos += T
        x = self.ln_f(x if all_positions else x[:, -1])
        return self.wte.logits(x)


def weights_fingerprint(tensors):
    """sha256 over the names, dtypes, shapes and bytes of (name, tensor) pairs, in name order:
    what identifies weights wherever they lie (eval.py's results, a LoRA checkpoint's base)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(tensors, key=lambda item: item[0]):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


@torch.no_grad()
def calc_loss_loader(model, loader, device, num_batches=None):
    """Mean cross-entropy per counted target over the first num_batches of loader (all by
    default), and the number of targets counted. Batches weigh by their counted targets,
    so a batch that truncation left without any counts as nothing rather than as zero loss."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i, (inputs, targets) in enumerate(loader):
        if num_batches is not None and i >= num_batches:
            break
        inputs, targets = inputs.to(device), targets.to(device)
        total += model(inputs, targets, reduction="sum").item()
        count += (targets != IGNORE_INDEX).sum().item()
    model.train(was_training)
    return (total / count if count else float("nan")), count


class KVCache:
    """Preallocated keys and values of every layer for a batch of left-padded sequences.
    Row b's first pad_lens[b] slots are padding: they are never attended to, and its
    positions count from its first real token, so a row gives the same result as alone."""

    def __init__(self, cfg, batch_size, max_len, device, dtype=torch.float32, pad_lens=None):
        if max_len - max(pad_lens or [0]) > cfg.context_length:
            raise ValueError(f"KV cache of {max_len} tokens exceeds the context length {cfg.context_length}")
        # keys and values side by side, so that a layer's new ones go in with one copy
        shape = (cfg.n_layers, 2, batch_size, cfg.n_heads, max_len, cfg.emb_dim // cfg.n_heads)
        self.kv = torch.empty(shape, device=device, dtype=dtype)
        self.cfg, self.max_len, self.pos = cfg, max_len, 0
        self.pad_lens = None
        if pad_lens is not None and any(pad_lens):
            self.pad_lens = torch.as_tensor(pad_lens, device=device).view(-1, 1)

    def update(self, layer, kv):
        """Append the new keys and values kv (2, B, heads, T, head size) of a layer; returns
        that layer's keys and values so far."""
        end = self.pos + kv.size(3)
        self.kv[layer, :, :, :, self.pos:end] = kv
        return self.kv[layer, 0, :, :, :end], self.kv[layer, 1, :, :, :end]

    def positions(self, T):
        pos = torch.arange(self.pos, self.pos + T, device=self.kv.device)
        if self.pad_lens is None:
            return pos
        return (pos - self.pad_lens).clamp(min=0)  # (B, T); padding slots get position 0

    def attn_mask(self, T):
        """Boolean (B, 1, T, pos+T) mask of the keys each new query may see, or None when
        plain attention is right (no padding and either one new token or a fresh cache)."""
        if self.pad_lens is None and (T == 1 or self.pos == 0):
            return None
        keys = torch.arange(self.pos + T, device=self.kv.device)
        queries = torch.arange(self.pos, self.pos + T, device=self.kv.device)
        mask = keys[None, :] <= queries[:, None]  # causal
        if self.pad_lens is None:
            return mask
        # A real token sees no padding; a padding slot sees only itself (a row of all-False
        # would give NaN, and NaN values times zero weights would still leak into real rows).
        real = keys[None, None, :] >= self.pad_lens[:, :, None]
        return (mask[None] & (real | (keys[None, :] == queries[:, None])[None]))[:, None]

    def length(self, row):
        """The number of real (not padding) positions of a row."""
        return self.pos - (0 if self.pad_lens is None else self.pad_lens[row].item())

    @classmethod
    def merge(cls, rows, room):
        """A new cache of the rows (cache, row) of other caches, in that order: continuous
        batching's way to let new sequences join running ones. Each row's real positions are
        copied to end at one common position, the shorter rows padded anew on the left; row j
        keeps room[j] free positions after it."""
        lengths = [cache.length(row) for cache, row in rows]
        pos = max(lengths)
        pads = [pos - n for n in lengths]
        first = rows[0][0]
        max_len = max(pos, max(pad + n + extra for pad, n, extra in zip(pads, lengths, room)))
        merged = cls(first.cfg, len(rows), max_len, first.kv.device, first.kv.dtype, pads)
        for j, ((cache, row), pad, n) in enumerate(zip(rows, pads, lengths)):
            merged.kv[:, :, j, :, pad:pos] = cache.kv[:, :, row, :, cache.pos - n:cache.pos]
            # padding is never attended to, but its weight 0 times a NaN left in fresh memory is NaN
            merged.kv[:, :, j, :, :pad] = 0
        merged.pos = pos
        return merged

    def reorder(self, rows):
        """Batch row j becomes what row rows[j] was: drops finished sequences, and copies beams
        (rows may repeat). A batch that keeps its size is changed in place, copying only the
        rows that move and only their filled positions."""
        if len(rows) == self.kv.size(2):
            moved = (rows != torch.arange(len(rows), device=rows.device)).nonzero().squeeze(1)
            self.kv[:, :, moved, :, :self.pos] = self.kv[:, :, rows[moved], :, :self.pos]
        else:
            self.kv = self.kv[:, :, rows]
        if self.pad_lens is not None:
            self.pad_lens = self.pad_lens[rows]


# ----------------------------------------------------------------------------- Hugging Face weights


def default_cache_dir():
    return os.environ.get("GPT2_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "gpt2-weights"))


def hf_folder(name_or_path, cache_dir=None):
    """A local folder holding config.json and model.safetensors: the folder given, or the
    hub's files for a preset name, downloaded once into the cache folder."""
    if os.path.isdir(name_or_path):
        folder = name_or_path
    elif name_or_path in HF_REPOS:
        folder = os.path.join(cache_dir or default_cache_dir(), name_or_path)
        for file in ("config.json", "model.safetensors"):
            if not os.path.exists(os.path.join(folder, file)):
                try:
                    download(f"https://huggingface.co/{HF_REPOS[name_or_path]}/resolve/main/{file}",
                             os.path.join(folder, file))
                except OSError as e:
                    raise OSError(f"{e}, or pass a local folder with config.json and model.safetensors") from None
    else:
        raise unknown_model(name_or_path, f"a GPT-2 name ({', '.join(HF_REPOS)})")
    check_gpt2_folder(folder)
    return folder


def unknown_model(name_or_path, names):
    """The error for a model that is none of `names` nor an existing path: one that looks like a
    path (a folder in it, or a model file's suffix) does not exist."""
    if "/" in name_or_path or os.sep in name_or_path or name_or_path.endswith((".pt", ".pth", ".bin", ".safetensors")):
        return FileNotFoundError(f"{name_or_path} does not exist; a model is {names}, a local folder or a model file")
    return ValueError(f"'{name_or_path}' is neither {names} nor a local folder")


def check_gpt2_folder(folder, files=("config.json", "model.safetensors")):
    """FileNotFoundError unless folder holds `files`, naming the checkpoint of a train.py output
    folder given instead."""
    for file in files:
        if not os.path.isfile(os.path.join(folder, file)):
            checkpoints = [name for name in ("best.pt", "ckpt.pt") if os.path.isfile(os.path.join(folder, name))]
            if checkpoints:
                raise FileNotFoundError(f"{folder} is a train.py output folder, not a GPT-2 folder (it has no {file}); "
                                        f"give its checkpoint, {os.path.join(folder, checkpoints[0])}")
            raise FileNotFoundError(f"{os.path.join(folder, file)} is missing; a GPT-2 folder needs "
                                    "config.json and model.safetensors")


def hf_config(folder, context_length=None, drop_rate=0.0):
    """GPTConfig from a Hugging Face config.json, optionally with a shorter context."""
    try:
        with open(os.path.join(folder, "config.json")) as f:
            hf = json.load(f)
        cfg = GPTConfig(vocab_size=hf["vocab_size"], context_length=hf["n_positions"], emb_dim=hf["n_embd"],
                        n_layers=hf["n_layer"], n_heads=hf["n_head"], drop_rate=drop_rate, qkv_bias=True,
                        tied_head=hf.get("tie_word_embeddings", True))
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{folder}/config.json is not a GPT-2 config ({e!r})") from None
    return with_context_length(cfg, context_length)


def with_context_length(cfg, context_length):
    if context_length is not None:
        if not 0 < context_length <= cfg.context_length:
            raise ValueError(f"context length {context_length} must be between 1 and the model's {cfg.context_length}")
        cfg.context_length = context_length
    return cfg


def transposed_in_hf(key):
    """Whether Hugging Face stores our tensor `key` transposed: its Conv1D weights are [in, out]
    where nn.Linear's are [out, in], and its wte (and an untied lm_head) is [vocab, emb_dim] where
    our TiedEmbedding is [emb_dim, vocab]."""
    return key in ("wte.weight", "wte.head") or key.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight"))


def from_pretrained(name_or_path, context_length=None, drop_rate=0.0, cache_dir=None):
    """GPT-2 with Hugging Face weights: a preset name (downloaded once) or a local folder.
    A context_length below the checkpoint's keeps the first rows of the position embedding."""
    from safetensors.torch import load_file

    folder = hf_folder(name_or_path, cache_dir)
    cfg = hf_config(folder, context_length, drop_rate)
    try:
        hf_state = load_file(os.path.join(folder, "model.safetensors"))
    except Exception as e:  # safetensors' own error or an OSError: either way unreadable
        raise ValueError(f"{folder}/model.safetensors cannot be read ({e}); delete it to download it again") from None

    model = GPT(cfg)
    state = model.state_dict()
    loaded = set()
    for key, tensor in hf_state.items():
        key = key.removeprefix("transformer.")
        if key.endswith((".attn.bias", ".attn.masked_bias")) or (key == "lm_head.weight" and cfg.tied_head):
            continue  # causal-mask buffers; lm_head is tied to wte
        if key == "lm_head.weight":
            key = "wte.head"
        if key not in state:
            raise ValueError(f"{folder}/model.safetensors has an unexpected tensor '{key}'; is it a GPT-2 checkpoint?")
        if transposed_in_hf(key):
            tensor = tensor.t()
        if key == "wpe.weight":
            tensor = tensor[: cfg.context_length]
        if tensor.shape != state[key].shape:
            raise ValueError(f"{folder}: '{key}' has shape {tuple(tensor.shape)}, "
                             f"expected {tuple(state[key].shape)} from its config.json")
        state[key] = tensor
        loaded.add(key)
    missing = set(state) - loaded
    if missing:
        raise ValueError(f"{folder}/model.safetensors lacks {len(missing)} tensors, e.g. '{sorted(missing)[0]}'")
    model.load_state_dict(state)
    return model


def build_model(name_or_path, pretrained=True, context_length=None, drop_rate=0.0):
    """The model train.py and generate.py start from: Hugging Face weights for a GPT-2 name
    or folder, or random weights of a preset's (or a folder's) shape."""
    if pretrained:
        if name_or_path in PRESETS and name_or_path not in HF_REPOS:
            raise ValueError(f"'{name_or_path}' has no pretrained weights; use random initialisation")
        return from_pretrained(name_or_path, context_length, drop_rate)
    if name_or_path in PRESETS:
        return GPT(with_context_length(config_for(name_or_path, drop_rate=drop_rate), context_length))
    if os.path.isdir(name_or_path):
        check_gpt2_folder(name_or_path, ["config.json"])
        return GPT(hf_config(name_or_path, context_length, drop_rate))
    raise unknown_model(name_or_path, f"a preset ({', '.join(PRESETS)})")


# ----------------------------------------------------------------------------- command line


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", help=f"a GPT-2 name ({', '.join(HF_REPOS)}) to download once into "
                   f"{default_cache_dir()} ($GPT2_CACHE_DIR), or a local Hugging Face GPT-2 folder, to load "
                   "and describe; none: list the presets")
    args = p.parse_args(argv)
    if args.model is None:
        for name in PRESETS:
            with torch.device("meta"):  # shapes only: no memory, no time
                model = GPT(config_for(name))
            cfg = model.config
            print(f"{name:12} {cfg.n_layers:2} layers, {cfg.n_heads:2} heads, width {cfg.emb_dim:4}, context "
                  f"{cfg.context_length}: {model.num_params() / 1e6:,.1f}M parameters"
                  + ("" if name in HF_REPOS else " (random weights only)"))
        return
    model = from_pretrained(args.model)
    cfg = model.config
    print(f"{args.model}: {model.num_params() / 1e6:,.1f}M parameters, {cfg.n_layers} layers, {cfg.n_heads} heads, "
          f"width {cfg.emb_dim}, context {cfg.context_length}, vocabulary {cfg.vocab_size}; loaded from "
          f"{hf_folder(args.model)}")


if __name__ == "__main__":
    run_main(main)
