"""The model in one file: GPT-2 and the families after it that fine-tuning starts from today
(Llama 3.2, SmolLM2, Qwen2.5, Qwen3), their config and presets, one Block forward for training
and decoding, a KV cache for generation, and the loss over a data loader. Hugging Face folders
(the hub presets, config.json, loading the weights) are hf.py's.

GPT-2 (Radford et al. 2019): learned position embeddings, LayerNorm, a GELU MLP, biases
everywhere. The Llama family (Llama 3, SmolLM2, Qwen2.5, Qwen3; Touvron et al. 2023) changes
those four: rotary position embeddings (RoPE) applied to q and k in every layer, RMSNorm, a
SwiGLU MLP and no biases; and it has fewer key/value heads than query heads (grouped-query
attention). On top of that, Qwen2.5 keeps biases on q, k and v, Qwen3 normalises each head's q
and k (QK-norm) and has a head size apart from width / heads, and Llama 3 stretches RoPE's
low frequencies (its rope_scaling).
"""
import hashlib
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import IGNORE_INDEX

EXACT_TOP = 8  # an int8 output head's best tokens whose logits are recomputed in float
FAMILIES = ("gpt2", "llama", "qwen2", "qwen3")  # llama: Llama 3 and SmolLM2; qwen2: Qwen2.5


@dataclass
class GPTConfig:
    """A model's shape and its family's switches; the defaults are GPT-2's, so a config saved
    before the other families existed loads as the GPT-2 it was."""
    vocab_size: int = 50257
    context_length: int = 1024
    emb_dim: int = 768
    n_layers: int = 12
    n_heads: int = 12
    drop_rate: float = 0.0
    qkv_bias: bool = True  # biases on q, k and v (GPT-2, Qwen2.5); the Llama family has no other biases
    tied_head: bool = True  # False: an output head of its own (the book's GPTModel after fine-tuning)
    family: str = "gpt2"  # one of FAMILIES: GPT-2's block, or the Llama family's
    n_kv_heads: Optional[int] = None  # key/value heads (grouped-query attention); None: n_heads
    head_dim: Optional[int] = None  # None: emb_dim // n_heads
    hidden_dim: Optional[int] = None  # the MLP's width; None: 4 * emb_dim
    qk_norm: bool = False  # Qwen3: RMSNorm over each head's q and k before RoPE
    norm_eps: float = 1e-5
    rope_base: float = 10000.0  # RoPE's theta: the longest wavelength is about 2 pi * rope_base positions
    rope_scaling: Optional[dict] = None  # Llama 3: factor, low_freq_factor, high_freq_factor, original_context_length

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"unknown model family '{self.family}'; choose one of {', '.join(FAMILIES)}")
        self.n_kv_heads = self.n_kv_heads or self.n_heads
        self.head_dim = self.head_dim or self.emb_dim // self.n_heads
        self.hidden_dim = self.hidden_dim or 4 * self.emb_dim
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"{self.n_heads} attention heads cannot share {self.n_kv_heads} key/value heads evenly")
        if self.family == "gpt2" and (self.n_kv_heads != self.n_heads or self.head_dim * self.n_heads != self.emb_dim):
            raise ValueError("GPT-2 has as many key/value heads as heads, of size emb_dim / n_heads")


# Llama 3.2 and SmolLM2 are LlamaForCausalLM, Qwen2.5 is Qwen2ForCausalLM: shapes as their config.json files
# give them (hf.py downloads the weights of these names from the hub repository of the same name).
LLAMA_32 = dict(family="llama", vocab_size=128256, context_length=131072, qkv_bias=False, n_kv_heads=8,
                rope_base=500000.0, rope_scaling=dict(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                                      original_context_length=8192))
SMOLLM2 = dict(family="llama", vocab_size=49152, context_length=8192, qkv_bias=False, rope_base=100000.0)
QWEN25 = dict(family="qwen2", vocab_size=151936, context_length=32768, n_kv_heads=2, norm_eps=1e-6,
              rope_base=1000000.0)
QWEN3 = dict(family="qwen3", vocab_size=151936, context_length=40960, qkv_bias=False, n_kv_heads=8, head_dim=128,
             qk_norm=True, norm_eps=1e-6, rope_base=1000000.0)
PRESETS = {
    "gpt2": dict(emb_dim=768, n_layers=12, n_heads=12),  # 124M
    "gpt2-medium": dict(emb_dim=1024, n_layers=24, n_heads=16),  # 355M
    "gpt2-large": dict(emb_dim=1280, n_layers=36, n_heads=20),  # 774M
    "gpt2-xl": dict(emb_dim=1600, n_layers=48, n_heads=25),  # 1558M
    "tiny": dict(emb_dim=64, n_layers=2, n_heads=4),  # tests and smoke runs (3.3M, mostly embeddings)
    "qwen3-0.6b": dict(QWEN3, emb_dim=1024, n_layers=28, n_heads=16, hidden_dim=3072),
    "qwen3-1.7b": dict(QWEN3, emb_dim=2048, n_layers=28, n_heads=16, hidden_dim=6144),
    "llama-3.2-1b": dict(LLAMA_32, emb_dim=2048, n_layers=16, n_heads=32, hidden_dim=8192),
    "llama-3.2-3b": dict(LLAMA_32, emb_dim=3072, n_layers=28, n_heads=24, hidden_dim=8192),
    "smollm2-135m": dict(SMOLLM2, emb_dim=576, n_layers=30, n_heads=9, n_kv_heads=3, hidden_dim=1536),
    "smollm2-360m": dict(SMOLLM2, emb_dim=960, n_layers=32, n_heads=15, n_kv_heads=5, hidden_dim=2560),
    "smollm2-1.7b": dict(SMOLLM2, emb_dim=2048, n_layers=24, n_heads=32, hidden_dim=8192, rope_base=130000.0),
    "qwen2.5-0.5b": dict(QWEN25, emb_dim=896, n_layers=24, n_heads=14, hidden_dim=4864),
    "qwen2.5-1.5b": dict(QWEN25, emb_dim=1536, n_layers=28, n_heads=12, hidden_dim=8960, context_length=131072),
}


def config_for(name, **overrides):
    """The GPTConfig of a preset name, with overrides (e.g. context_length, drop_rate)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset '{name}'; choose one of {', '.join(PRESETS)}")
    return GPTConfig(**{**PRESETS[name], **overrides})


def with_context_length(cfg, context_length):
    """cfg with a shorter context, if one is given (a GPT-2 keeps its first position embeddings)."""
    if context_length is not None:
        if not 0 < context_length <= cfg.context_length:
            raise ValueError(f"context length {context_length} must be between 1 and the model's {cfg.context_length}")
        cfg.context_length = context_length
    return cfg


# ----------------------------------------------------------------------------- the model


class RMSNorm(nn.Module):
    """Root-mean-square normalisation (Zhang & Sennrich 2019): x / sqrt(mean(x^2) + eps) times a
    learned scale, LayerNorm without the mean and the bias. Computed in float32 and scaled in x's
    dtype, as Hugging Face's Llama and Qwen do."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x, (x.size(-1),), eps=self.eps) * self.weight


def norm_layer(cfg):
    """The family's normalisation of the residual stream: GPT-2's LayerNorm, the others' RMSNorm."""
    return nn.LayerNorm(cfg.emb_dim, eps=cfg.norm_eps) if cfg.family == "gpt2" else RMSNorm(cfg.emb_dim, cfg.norm_eps)


def rope_frequencies(cfg):
    """RoPE's angle per position for each pair of a head's dimensions, rope_base ** (-2i / head_dim)
    (float32, as Hugging Face computes it). Llama 3 divides the low frequencies (wavelengths above
    original_context_length / low_freq_factor) by `factor`, keeps the high ones (wavelengths below
    original_context_length / high_freq_factor), and blends the two in between."""
    dims = torch.arange(0, cfg.head_dim, 2, dtype=torch.float, device="cpu")
    inv_freq = 1.0 / (cfg.rope_base ** (dims / cfg.head_dim))
    if cfg.rope_scaling is None:
        return inv_freq
    factor, low, high, context = (cfg.rope_scaling[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                                                  "original_context_length"))
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > context / low, inv_freq / factor, inv_freq)
    smooth = (context / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= context / high) & (wavelen <= context / low)
    return torch.where(medium, blended, scaled)


class RotaryEmbedding(nn.Module):
    """Rotary position embeddings (RoPE, Su et al. 2021): a query or key at position p has each
    pair of its dimensions (i, i + head_dim / 2, the pairing of Hugging Face's weights) rotated by
    the angle p * frequency_i, so that q . k depends on the distance between their positions. The
    cos and sin of every position's angles are computed once per device and dtype (in float32,
    then cast): not buffers, so that building on the meta device and casting leave them exact."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.cos = self.sin = None  # (context_length, head_dim)

    def forward(self, positions, dtype):
        """cos and sin of positions (T,) or (B, T), shaped (T or B, T, 1, head_dim): they broadcast
        over the heads of q and k (B, T, heads, head_dim)."""
        if self.cos is None or self.cos.device != positions.device or self.cos.dtype != dtype:
            inv_freq = rope_frequencies(self.cfg).to(positions.device)
            angles = torch.arange(self.cfg.context_length, device=positions.device).float()[:, None] * inv_freq
            angles = torch.cat((angles, angles), dim=-1)
            self.cos, self.sin = angles.cos().to(dtype), angles.sin().to(dtype)
        return self.cos[positions].unsqueeze(-2), self.sin[positions].unsqueeze(-2)


def apply_rope(x, cos, sin):
    """x (B, T, heads, head_dim) rotated: each pair (x1, x2) of its halves becomes
    (x1 cos - x2 sin, x2 cos + x1 sin)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class CausalSelfAttention(nn.Module):
    """GPT-2's attention: q, k and v of every head from one linear layer, c_attn."""

    def __init__(self, cfg, layer=0):
        super().__init__()
        assert cfg.emb_dim % cfg.n_heads == 0, "emb_dim must be divisible by n_heads"
        self.n_heads, self.drop_rate, self.layer = cfg.n_heads, cfg.drop_rate, layer
        self.c_attn = nn.Linear(cfg.emb_dim, 3 * cfg.emb_dim, bias=cfg.qkv_bias)
        self.c_proj = nn.Linear(cfg.emb_dim, cfg.emb_dim)
        self.resid_drop = nn.Dropout(cfg.drop_rate)

    def forward(self, x, cache=None, mask=None, rope=None):
        """x (B, T, C) attends causally to itself, and in generation to the keys and values of
        the positions before it in `cache`, where its own are appended. mask: a boolean mask of
        the keys each query may see (KVCache.attn_mask), None where plain causal attention is
        right (training; a cache without padding, for a fresh prompt or one new token a row).
        rope: unused (GPT-2's positions are in its embeddings)."""
        B, T, C = x.shape
        # q, k and v of every head, (3, B, heads, T, head size): views of c_attn's output
        qkv = self.c_attn(x).view(B, T, 3, self.n_heads, C // self.n_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv
        if cache is not None:
            k, v = cache.update(self.layer, qkv[1:])  # keys and values together: one copy
        dropout = self.drop_rate if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=mask is None and T > 1)
        return self.resid_drop(self.c_proj(y.transpose(1, 2).reshape(B, T, C)))


class GroupedQueryAttention(nn.Module):
    """The Llama family's attention (Ainslie et al. 2023): n_heads query heads share n_kv_heads
    key/value heads, a group each, so the KV cache holds only the n_kv_heads. q and k are rotated
    by their positions (RoPE); Qwen3 first RMS-normalises each head's q and k (QK-norm)."""

    def __init__(self, cfg, layer=0):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.drop_rate, self.layer = cfg.drop_rate, layer
        self.q_proj = nn.Linear(cfg.emb_dim, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.emb_dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.emb_dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.emb_dim, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.resid_drop = nn.Dropout(cfg.drop_rate)
        self.qkv_proj = None  # decoding's q, k and v_proj in one (quantize.fuse_projections)

    def forward(self, x, cache=None, mask=None, rope=None):
        """As CausalSelfAttention's; rope: the cos and sin of x's positions (RotaryEmbedding)."""
        B, T, _ = x.shape
        if self.qkv_proj is None:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        else:  # one matmul for the three
            q, k, v = self.qkv_proj(x).split([self.n_heads * self.head_dim] + [self.n_kv_heads * self.head_dim] * 2, -1)
        q = q.view(B, T, self.n_heads, self.head_dim)
        k = k.view(B, T, self.n_kv_heads, self.head_dim)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, *rope).transpose(1, 2), apply_rope(k, *rope).transpose(1, 2)  # (B, heads, T, head size)
        if cache is not None:
            k, v = cache.update(self.layer, torch.stack((k, v)))
        dropout = self.drop_rate if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=mask is None and T > 1,
                                           enable_gqa=self.n_kv_heads != self.n_heads)
        return self.resid_drop(self.o_proj(y.transpose(1, 2).reshape(B, T, -1)))


class MLP(nn.Module):
    """GPT-2's MLP: c_proj(gelu(c_fc(x)))."""

    def __init__(self, cfg):
        super().__init__()
        self.c_fc = nn.Linear(cfg.emb_dim, cfg.hidden_dim)
        self.c_proj = nn.Linear(cfg.hidden_dim, cfg.emb_dim)
        self.drop = nn.Dropout(cfg.drop_rate)

    def forward(self, x):
        return self.drop(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class SwiGLU(nn.Module):
    """The Llama family's MLP (Shazeer 2020): down_proj(silu(gate_proj(x)) * up_proj(x)), no biases."""

    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.emb_dim, cfg.hidden_dim, bias=False)
        self.up_proj = nn.Linear(cfg.emb_dim, cfg.hidden_dim, bias=False)
        self.down_proj = nn.Linear(cfg.hidden_dim, cfg.emb_dim, bias=False)
        self.drop = nn.Dropout(cfg.drop_rate)
        self.gate_up_proj = None  # decoding's gate and up_proj in one (quantize.fuse_projections)

    def forward(self, x):
        if self.gate_up_proj is None:
            gate, up = self.gate_proj(x), self.up_proj(x)
        else:  # one matmul for the two
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.drop(self.down_proj(F.silu(gate) * up))


class Block(nn.Module):
    """A transformer block, pre-norm: attention, then the MLP, each added to the residual stream.
    The one forward of training and generation (which passes the KV cache)."""

    def __init__(self, cfg, layer=0):
        super().__init__()
        gpt2 = cfg.family == "gpt2"
        self.ln_1 = norm_layer(cfg)
        self.attn = CausalSelfAttention(cfg, layer) if gpt2 else GroupedQueryAttention(cfg, layer)
        self.ln_2 = norm_layer(cfg)
        self.mlp = MLP(cfg) if gpt2 else SwiGLU(cfg)

    def forward(self, x, cache=None, mask=None, rope=None):
        x = x + self.attn(self.ln_1(x), cache, mask, rope)
        return x + self.mlp(self.ln_2(x))


class TiedEmbedding(nn.Module):
    """The token embedding, which is also the output head (weight tying, as in GPT-2): an
    [emb_dim, vocab] matrix, the head's [in, out]. GPT-2 lays it out so in memory too: on the CPU
    the head's matmul for one new token (generation) reads that layout some 1.5x faster than
    nn.Embedding's [vocab, emb_dim]. The Llama family (vocab_major) lays the same matrix out
    [vocab, emb_dim], as nn.Embedding and Hugging Face do: the gradients of the embedding and of
    the head then both come in that layout, where [emb_dim, vocab] costs a transposed copy of
    the whole matrix every step (large with a 128-152k vocabulary), and loading reads the file
    straight in; quantize.prepare_for_decoding lays it out [emb_dim, vocab] for decoding.
    tied=False gives the head weights of its own, `head`, in the same layout."""

    def __init__(self, vocab_size, emb_dim, tied=True, vocab_major=False):
        super().__init__()

        def matrix():
            return torch.empty(vocab_size, emb_dim).t() if vocab_major else torch.empty(emb_dim, vocab_size)
        self.weight = nn.Parameter(matrix())
        self.head = None if tied else nn.Parameter(matrix())
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
    """GPT-2, or a model of the Llama family (cfg.family). Module names follow Hugging Face's
    GPT-2 (wte, wpe, h, ln_1, attn, ln_2, mlp, ln_f), and inside a Llama-family block its Llama's
    (q_proj, k_proj, v_proj, o_proj, q_norm, k_norm, gate_proj, up_proj, down_proj): hf.py maps
    the names of each family's weights both ways."""

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.wte = TiedEmbedding(cfg.vocab_size, cfg.emb_dim, cfg.tied_head, vocab_major=cfg.family != "gpt2")
        self.wpe = nn.Embedding(cfg.context_length, cfg.emb_dim) if cfg.family == "gpt2" else None
        self.drop = nn.Dropout(cfg.drop_rate)
        self.h = nn.ModuleList(Block(cfg, layer) for layer in range(cfg.n_layers))
        self.ln_f = norm_layer(cfg)
        self.rope = None if cfg.family == "gpt2" else RotaryEmbedding(cfg)
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

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def embed(self, idx, positions):
        """The token embeddings of idx (B, T) at positions (T,) or (B, T), and the rotary cos and
        sin of those positions every layer applies (the Llama family; None for GPT-2, whose
        position embeddings are added here)."""
        if self.rope is None:
            return self.wte(idx) + self.wpe(positions), None
        x = self.wte(idx)
        return x, self.rope(positions, x.dtype)

    def _hidden(self, idx):
        x, rope = self.embed(idx, torch.arange(idx.size(1), device=idx.device))
        x = self.drop(x)
        for block in self.h:
            x = block(x, rope=rope)
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
        x, rope = self.embed(idx, cache.positions(T))
        mask = cache.attn_mask(T)  # the same for every layer
        for block in self.h:
            x = block(x, cache, mask, rope)
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
        # keys and values side by side, so that a layer's new ones go in with one copy; only the
        # key/value heads (fewer than the query heads with grouped-query attention)
        shape = (cfg.n_layers, 2, batch_size, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.kv = torch.empty(shape, device=device, dtype=dtype)
        self.cfg, self.max_len, self.pos = cfg, max_len, 0
        self.pad_lens = None
        if pad_lens is not None and any(pad_lens):
            self.pad_lens = torch.as_tensor(pad_lens, device=device).view(-1, 1)

    def update(self, layer, kv):
        """Append the new keys and values kv (2, B, kv heads, T, head size) of a layer; returns
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
