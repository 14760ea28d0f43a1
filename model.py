"""GPT-2 in one file: config presets, the model, a KV cache for generation, and loading
of Hugging Face GPT-2 weights (hub names or local folders) and of our own checkpoints."""
import contextlib
import hashlib
import json
import math
import os
import sys
import tempfile
import urllib.request
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

IGNORE_INDEX = -100  # targets equal to this are left out of the loss (padding, masked prompts)


@dataclass
class GPTConfig:
    vocab_size: int = 50257
    context_length: int = 1024
    emb_dim: int = 768
    n_layers: int = 12
    n_heads: int = 12
    drop_rate: float = 0.0
    qkv_bias: bool = True


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
    def __init__(self, cfg):
        super().__init__()
        assert cfg.emb_dim % cfg.n_heads == 0, "emb_dim must be divisible by n_heads"
        self.n_heads, self.drop_rate = cfg.n_heads, cfg.drop_rate
        self.c_attn = nn.Linear(cfg.emb_dim, 3 * cfg.emb_dim, bias=cfg.qkv_bias)
        self.c_proj = nn.Linear(cfg.emb_dim, cfg.emb_dim)
        self.resid_drop = nn.Dropout(cfg.drop_rate)

    def forward(self, x, cache=None, layer=0):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v))
        if cache is None:  # training / plain path: causal attention over the whole sequence
            dropout = self.drop_rate if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        else:  # generation: append to the cache and attend over everything cached so far
            k, v = cache.update(layer, k, v)
            mask = cache.attn_mask(T)
            causal = mask is None and T > 1  # fresh cache, no padding: plain causal prefill
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        return self.resid_drop(self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C)))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.c_fc = nn.Linear(cfg.emb_dim, 4 * cfg.emb_dim)
        self.c_proj = nn.Linear(4 * cfg.emb_dim, cfg.emb_dim)
        self.drop = nn.Dropout(cfg.drop_rate)

    def forward(self, x):
        return self.drop(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.emb_dim)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.emb_dim)
        self.mlp = MLP(cfg)

    def forward(self, x, cache=None, layer=0):
        x = x + self.attn(self.ln_1(x), cache, layer)
        return x + self.mlp(self.ln_2(x))


class TiedEmbedding(nn.Module):
    """The token embedding, which is also the output head (weight tying, as in GPT-2). Stored
    [emb_dim, vocab], the head's [in, out]: on the CPU the head's matmul for one new token
    (generation) reads that layout some 1.5x faster than nn.Embedding's [vocab, emb_dim]."""

    def __init__(self, vocab_size, emb_dim):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(emb_dim, vocab_size))
        self.int8_head = None  # an Int8Linear copy of the head after quantize_int8(model, head=True)

    def forward(self, idx):
        return F.embedding(idx, self.weight.t())

    def logits(self, x):
        return x @ self.weight if self.int8_head is None else self.int8_head(x)


class GPT(nn.Module):
    """GPT-2. Module names follow Hugging Face's: loading its weights is a matter of keys and transposes."""

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.wte = TiedEmbedding(cfg.vocab_size, cfg.emb_dim)
        self.wpe = nn.Embedding(cfg.context_length, cfg.emb_dim)
        self.drop = nn.Dropout(cfg.drop_rate)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.emb_dim)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by depth
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding, TiedEmbedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @classmethod
    def from_pretrained(cls, name_or_path, context_length=None, **kwargs):
        """GPT-2 with Hugging Face weights; see the module function from_pretrained."""
        return from_pretrained(name_or_path, context_length, **kwargs)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def _hidden(self, idx, pos, cache=None):
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for layer, block in enumerate(self.h):
            x = block(x, cache, layer)
        return self.ln_f(x)

    def forward(self, idx, targets=None, reduction="mean"):
        """idx (B, T) -> logits (B, T, vocab). With targets (B, T): the cross-entropy over
        targets != -100 instead, "mean" per counted target or "sum" (divide it by the count
        yourself to average over several batches). A batch with no counted target gives 0,
        not NaN."""
        B, T = idx.shape
        if T > self.config.context_length:
            raise ValueError(f"sequence of {T} tokens exceeds the context length {self.config.context_length}")
        x = self._hidden(idx, torch.arange(T, device=idx.device))
        if targets is None:
            return self.wte.logits(x)
        # Only positions that count go through the output head: with padding and masked
        # instructions that skips a large share of the biggest matmul of the model.
        keep = targets != IGNORE_INDEX
        logits = self.wte.logits(x[keep])
        loss = F.cross_entropy(logits.float(), targets[keep], reduction="sum")
        return loss / keep.sum().clamp(min=1) if reduction == "mean" else loss

    def forward_cached(self, idx, cache):
        """Generation path: run the new tokens idx (B, T) through the model, appending their
        keys and values to `cache`; returns the logits of the last position only (B, vocab)."""
        T = idx.size(1)
        if cache.pos + T > cache.max_len:
            raise ValueError(f"KV cache full: {cache.pos} + {T} tokens > {cache.max_len}")
        x = self._hidden(idx, cache.positions(T), cache)
        cache.pos += T
        return self.wte.logits(x[:, -1])


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
        shape = (cfg.n_layers, batch_size, cfg.n_heads, max_len, cfg.emb_dim // cfg.n_heads)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.max_len, self.pos = max_len, 0
        self.pad_lens = None
        if pad_lens is not None and any(pad_lens):
            self.pad_lens = torch.as_tensor(pad_lens, device=device).view(-1, 1)

    def update(self, layer, k, v):
        end = self.pos + k.size(2)
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def positions(self, T):
        pos = torch.arange(self.pos, self.pos + T, device=self.k.device)
        if self.pad_lens is None:
            return pos
        return (pos - self.pad_lens).clamp(min=0)  # (B, T); padding slots get position 0

    def attn_mask(self, T):
        """Boolean (B, 1, T, pos+T) mask of the keys each new query may see, or None when
        plain attention is right (no padding and either one new token or a fresh cache)."""
        if self.pad_lens is None and (T == 1 or self.pos == 0):
            return None
        keys = torch.arange(self.pos + T, device=self.k.device)
        queries = torch.arange(self.pos, self.pos + T, device=self.k.device)
        mask = keys[None, :] <= queries[:, None]  # causal
        if self.pad_lens is None:
            return mask
        # A real token sees no padding; a padding slot sees only itself (a row of all-False
        # would give NaN, and NaN values times zero weights would still leak into real rows).
        real = keys[None, None, :] >= self.pad_lens[:, :, None]
        return (mask[None] & (real | (keys[None, :] == queries[:, None])[None]))[:, None]

    def reorder(self, rows):
        """Batch row j becomes what row rows[j] was: drops finished sequences, and copies beams
        (rows may repeat). A batch that keeps its size is changed in place, copying only the
        rows that move and only their filled positions."""
        if len(rows) == self.k.size(1):
            moved = (rows != torch.arange(len(rows), device=rows.device)).nonzero().squeeze(1)
            for cache in (self.k, self.v):
                cache[:, moved, :, :self.pos] = cache[:, rows[moved], :, :self.pos]
        else:
            self.k, self.v = self.k[:, rows], self.v[:, rows]
        if self.pad_lens is not None:
            self.pad_lens = self.pad_lens[rows]


# ----------------------------------------------------------------------------- int8 weights for decoding


def int8_kernel(device):
    """The int8 matmul Int8Linear uses on a device. On an x86-64 CPU: fbgemm's, through
    torch.ops.quantized (the fastest of those measured here, see README). On CUDA and MPS: the
    int8 weights converted to the activations' dtype for each matmul, which saves memory but
    not time. The one place to choose a faster kernel for a device."""
    if device.type != "cpu":
        return "dequantize"
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        raise ValueError("int8 weights on the CPU need PyTorch's fbgemm kernels (x86-64), which this "
                         "PyTorch build lacks; run without int8 quantization")
    return "fbgemm"


# fbgemm's dynamic quantization gives the whole input one 8-bit range, so a row's result would
# depend on the other rows of the batch (and one outlier row would blur all the others). Int8Linear
# scales every row to a largest |value| of 1 and appends two constant columns (against zero
# weights) that fix the range for any batch: every row gets the whole range, and comes out bit for
# bit the same in any batch. Their 64:63 ratio puts zero exactly on a level of the 7-bit range.
EDGES = (1 + 2**-10, -(1 + 2**-10) * 64 / 63)


class Int8Linear(nn.Module):
    """An nn.Linear for inference with int8 weights: symmetric, one scale per output channel
    (weight ~= int8 * scale), the bias in float. Activations are quantized to 8 bits per row on
    the fly (fbgemm) or stay float (dequantize). No gradients: it refuses training mode."""

    def __init__(self, weight, bias=None):
        super().__init__()
        weight = weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
        qweight = (weight / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
        self.kernel = int8_kernel(weight.device)
        self.bias = torch.zeros(len(weight), device=weight.device) if bias is None else bias.detach().float()
        if self.kernel == "fbgemm":
            qweight = F.pad(qweight, (0, 2))  # zero weights for the two EDGES columns
            zero_points = torch.zeros(len(scale), dtype=torch.long)
            previous, torch.backends.quantized.engine = torch.backends.quantized.engine, "fbgemm"
            try:
                with warnings.catch_warnings():  # the qint8 tensor type is deprecated; the kernels are not
                    warnings.filterwarnings("ignore", "torch.quantize_per_tensor", UserWarning)
                    qweight = torch._make_per_channel_quantized_tensor(qweight, scale.double(), zero_points, 0)
                # the int8 weights live only in fbgemm's packed matrix
                self.packed = torch.ops.quantized.linear_prepack(qweight, None)
            finally:
                torch.backends.quantized.engine = previous
            self.edges = torch.tensor(EDGES)
        else:
            self.qweight, self.scale = qweight, scale
        self.eval()

    def forward(self, x):
        if self.training:
            raise RuntimeError("int8-quantized weights are for inference only: train the float model "
                               "and quantize it afterwards")
        if self.kernel == "fbgemm":
            row_max = torch.linalg.vector_norm(x, float("inf"), dim=-1, keepdim=True).clamp(min=1e-30)
            x = torch.cat([x / row_max, self.edges.expand(*x.shape[:-1], 2)], dim=-1)
            # reduce_range: 7-bit activations. Without AVX-512 VNNI (as here) fbgemm adds pairs of
            # 8-bit products in int16, which saturate with 8-bit activations (79% error measured).
            return torch.addcmul(self.bias, torch.ops.quantized.linear_dynamic(x, self.packed, True), row_max)
        return torch.addcmul(self.bias.to(x.dtype), F.linear(x, self.qweight.to(x.dtype)), self.scale.to(x.dtype))

    def nbytes(self):
        """Bytes of the int8 weights and their scales (fbgemm also keeps a sum per output channel)."""
        if self.kernel == "fbgemm":
            return torch.ops.quantized.linear_unpack(self.packed)[0].numel() + 8 * len(self.bias)
        return self.qweight.numel() + 4 * len(self.scale)


def quantize_int8(model, head=False):
    """Replace, in place, the linear layers of every block (and with head=True also the output
    head, beside the float embedding it is tied to) with Int8Linear; returns the model, in eval
    mode. For decoding only: do it after moving the model to its device."""
    for block in model.h:
        for parent in (block.attn, block.mlp):
            for name, child in parent.named_children():
                if isinstance(child, nn.Linear):
                    setattr(parent, name, Int8Linear(child.weight, child.bias))
    if head:
        model.wte.int8_head = Int8Linear(model.wte.weight.t())
    return model.eval()


# ----------------------------------------------------------------------------- devices


def resolve_device(name):
    """'auto' picks cuda, then mps, then cpu; an explicit device must be available."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device '{name}'; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device '{name}' asked for, but this PyTorch has no CUDA device; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device '{name}' does not exist: there are {torch.cuda.device_count()} CUDA devices")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' asked for, but MPS is not available here; use --device cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unsupported device '{name}'; use auto, cpu, cuda, cuda:N or mps")
    return device


# ----------------------------------------------------------------------------- Hugging Face weights


def default_cache_dir():
    return os.environ.get("GPT2_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "gpt2-weights"))


def writable_folder(path):
    """Make sure `path` is a folder this process can write in (creating it), before any long
    work whose results go there; one clear OSError otherwise."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"{path} is a file, not a folder to write results in")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise OSError(f"cannot write in {path} ({e.strerror or type(e).__name__})") from None
    return path


@contextlib.contextmanager
def atomic_write(path):
    """Yields a temporary name to write to, renamed to path only once the block has finished:
    a crash or Ctrl-C never leaves a half-written file where a good one was."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def download(url, dest):
    """Fetch url to dest with a progress line, through a temporary name."""
    try:
        with urllib.request.urlopen(url, timeout=30) as response, atomic_write(dest) as tmp, open(tmp, "wb") as f:
            total, done = int(response.headers.get("Content-Length") or 0), 0
            while chunk := response.read(1 << 20):
                f.write(chunk)
                done += len(chunk)
                if total:
                    print(f"\rdownloading {os.path.basename(dest)}: {done / 2**20:.0f}/{total / 2**20:.0f} MiB",
                          end="", file=sys.stderr, flush=True)
        if total:
            print(file=sys.stderr)
    except OSError as e:  # URLError is an OSError
        raise OSError(f"could not download {url} ({getattr(e, 'reason', e)}); check the network") from None


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
        raise ValueError(f"'{name_or_path}' is neither a GPT-2 name ({', '.join(HF_REPOS)}) nor a local folder")
    for file in ("config.json", "model.safetensors"):
        if not os.path.isfile(os.path.join(folder, file)):
            raise FileNotFoundError(f"{os.path.join(folder, file)} is missing; a GPT-2 folder needs "
                                    "config.json and model.safetensors")
    return folder


def hf_config(folder, context_length=None, drop_rate=0.0):
    """GPTConfig from a Hugging Face config.json, optionally with a shorter context."""
    try:
        with open(os.path.join(folder, "config.json")) as f:
            hf = json.load(f)
        cfg = GPTConfig(vocab_size=hf["vocab_size"], context_length=hf["n_positions"], emb_dim=hf["n_embd"],
                        n_layers=hf["n_layer"], n_heads=hf["n_head"], drop_rate=drop_rate, qkv_bias=True)
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
    where nn.Linear's are [out, in], and its wte is [vocab, emb_dim] where our TiedEmbedding is
    [emb_dim, vocab]."""
    return key == "wte.weight" or key.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight"))


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
        if key.endswith((".attn.bias", ".attn.masked_bias")) or key == "lm_head.weight":
            continue  # causal-mask buffers; lm_head is tied to wte
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
        return GPT(hf_config(name_or_path, context_length, drop_rate))
    raise ValueError(f"'{name_or_path}' is neither a preset ({', '.join(PRESETS)}) nor a local folder")


# ----------------------------------------------------------------------------- our checkpoints


def save_checkpoint(obj, path):
    """torch.save through a temporary name: a crash never leaves a truncated checkpoint."""
    with atomic_write(path) as tmp:
        torch.save(obj, tmp)


def load_checkpoint(path, map_location="cpu"):
    """Read a checkpoint written by train.py, with one clear error if it is missing or damaged."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} is a directory, not a checkpoint file" if os.path.isdir(path)
                                else f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, wrong file type, pickle error: all mean "not a checkpoint"
        raise ValueError(f"checkpoint {path} is corrupt or not a train.py checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise ValueError(f"checkpoint {path} is not a train.py checkpoint (no model weights or config)")
    return ckpt


def model_from_checkpoint(ckpt, path="checkpoint"):
    """The GPT of a checkpoint dict (as loaded by load_checkpoint from path). A LoRA checkpoint
    gives its base with the adapters merged: a plain GPT, as fast as any other."""
    if "lora" in ckpt:
        return merge_lora(lora_model_from_checkpoint(ckpt, path))
    try:
        model = GPT(GPTConfig(**ckpt["config"]))
        model.load_state_dict(ckpt["model"])
    except (TypeError, RuntimeError) as e:  # unknown config keys, weights of another shape
        detail = str(e).strip().splitlines()[-1].strip()  # load_state_dict lists mismatches a line each
        raise ValueError(f"{path} is corrupt: its weights do not fit its config ({detail})") from None
    return model


# ----------------------------------------------------------------------------- LoRA
#
# Low-rank adapters (Hu et al. 2021; the book's appendix E): a frozen linear layer W plus a
# trainable update (alpha / rank) * B A, A [rank, in] and B [out, rank]. B starts at zero, so
# the adapted model starts as exactly the base model. A LoRA checkpoint holds only A and B (and
# their optimizer state), the settings, and the identity of the base: loading it rebuilds the
# base, checks that its weights are the ones trained on, and merges W + (alpha / rank) * B A.

# The linear layers of a block that LoRA can adapt: short names for the command line.
LORA_TARGETS = {"qkv": "attn.c_attn", "attn_out": "attn.c_proj", "mlp_in": "mlp.c_fc", "mlp_out": "mlp.c_proj"}


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a low-rank update. The base's weight and bias stay attributes of
    this module, so their state-dict keys are unchanged (h.0.attn.c_attn.weight); the adapters
    are ...lora_A and ...lora_B. They are float32 whatever the base's dtype: the update is
    computed in float32 and added in the base output's dtype."""

    def __init__(self, linear, rank, alpha, dropout=0.0):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        device = linear.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, linear.in_features, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear initialises its weight
        self.lora_B = nn.Parameter(torch.zeros(linear.out_features, rank, device=device))
        self.dropout = nn.Dropout(dropout)  # on the adapters' input only

    def forward(self, x):
        x2 = x.reshape(-1, x.size(-1))  # 2D: y below is no view, so it can be added to in place
        y = F.linear(x2, self.weight, self.bias)  # frozen: autograd computes no weight gradient
        # scaled at (tokens, rank), the smallest tensor of the update
        h = F.linear(self.dropout(x2.to(self.lora_A.dtype)), self.lora_A) * self.scaling
        if y.dtype == h.dtype == self.lora_B.dtype:
            # y += h B^T in place, in the matmul: no second tensor of y's size to allocate, fill
            # and add (time, and memory: the CPU allocator keeps such fragments)
            y.addmm_(h, self.lora_B.t())
        else:  # a lower-precision base, or autocast: float32 adapters, the sum in y's dtype
            y = y + F.linear(h, self.lora_B).to(y.dtype)
        return y.view(*x.shape[:-1], y.size(-1))

    def delta_weight(self):
        """The update as a weight, (alpha / rank) * B @ A, in float32."""
        return self.scaling * (self.lora_B @ self.lora_A)


def lora_modules(model):
    """(name, LoRALinear) of every adapted layer, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]


def add_lora(model, rank, alpha, dropout=0.0, targets=tuple(LORA_TARGETS)):
    """Freeze every parameter of model (embeddings, layer norms and biases too) and wrap the
    target linears of every block in LoRALinear, in place. targets: names from LORA_TARGETS,
    as a list or a comma-separated string. Returns the model."""
    if isinstance(targets, str):
        targets = targets.split(",")
    targets = [t.strip() for t in targets]
    unknown = [t for t in targets if t not in LORA_TARGETS]
    if unknown or not targets:
        raise ValueError(f"unknown LoRA target '{unknown[0] if unknown else ''}'; "
                         f"choose among {', '.join(LORA_TARGETS)} (comma-separated)")
    if lora_modules(model):
        raise ValueError("the model has LoRA adapters already")
    linears = [(block, LORA_TARGETS[t]) for block in model.h for t in LORA_TARGETS if t in targets]
    smallest = min(min(block.get_submodule(path).weight.shape) for block, path in linears)
    if not (isinstance(rank, int) and 1 <= rank <= smallest):
        raise ValueError(f"LoRA rank {rank} must be an integer from 1 to {smallest}, "
                         "the smallest dimension of the adapted layers")
    if not 0 < alpha < math.inf:
        raise ValueError(f"LoRA alpha {alpha} must be a positive number (the update is scaled by alpha / rank)")
    if not 0 <= dropout < 1:
        raise ValueError(f"LoRA dropout {dropout} must be in [0, 1)")
    model.requires_grad_(False)
    for block, path in linears:
        parent, name = path.split(".")
        module = block.get_submodule(parent)
        setattr(module, name, LoRALinear(getattr(module, name), rank, alpha, dropout))
    return model


def lora_settings(model):
    """{"rank", "alpha", "dropout", "targets"} of a model with adapters (for its checkpoint)."""
    modules = [m for _, m in lora_modules(model)]
    if not modules:
        raise ValueError("the model has no LoRA adapters")
    paths = {name.split(".", 2)[2] for name, _ in lora_modules(model)}  # h.3.attn.c_attn -> attn.c_attn
    return {"rank": modules[0].rank, "alpha": modules[0].alpha, "dropout": modules[0].dropout.p,
            "targets": [t for t, path in LORA_TARGETS.items() if path in paths]}


def lora_state_dict(model):
    """Only the adapter tensors (what a LoRA checkpoint's "model" holds)."""
    return {k: v for k, v in model.state_dict().items() if k.endswith((".lora_A", ".lora_B"))}


def load_lora_state_dict(model, adapters, path="checkpoint"):
    """Load adapter tensors into a model with adapters of the same settings."""
    expected = lora_state_dict(model)
    if set(adapters) != set(expected):
        odd = sorted(set(adapters) ^ set(expected))[0]
        raise ValueError(f"{path} is corrupt: its adapters do not fit its LoRA settings (e.g. '{odd}')")
    try:
        model.load_state_dict(adapters, strict=False)
    except RuntimeError as e:
        detail = str(e).strip().splitlines()[-1].strip()
        raise ValueError(f"{path} is corrupt: its adapters do not fit its LoRA settings ({detail})") from None


@torch.no_grad()
def merge_lora(model):
    """Fold every adapter into its weight (W + (alpha / rank) * B @ A), in place, and put plain
    nn.Linear modules back: the result is an ordinary GPT with the original state-dict keys,
    every parameter trainable again. Returns the model."""
    for name, lora in lora_modules(model):
        weight = lora.weight
        weight += lora.delta_weight().to(weight.dtype)
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=lora.bias is not None, device="meta")
        linear.weight, linear.bias = weight, lora.bias
        parent, child = name.rsplit(".", 1)
        setattr(model.get_submodule(parent), child, linear)
    return model.requires_grad_(True)


def parameter_counts(model):
    """(trainable, total) numbers of parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad), model.num_params()


def base_fingerprint(model):
    """sha256 over the names, dtypes, shapes and bytes of the base weights, adapters left out:
    the same on a model with adapters as on the base it was built from. Take it on the base as
    built (before a cast to another dtype). 1-2 s for gpt2-medium (1.3 GiB) on a 2-core CPU."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if name.endswith((".lora_A", ".lora_B")):
            continue
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def build_base(name_or_path, pretrained, seed, context_length=None, drop_rate=0.0):
    """(model, identity): the base model of a LoRA run, as build_model builds it, with random
    weights from `seed` (the caller's random state left as it was), and what its checkpoint
    records of it: the preset name or the folder as an absolute path, the initialisation, the
    seed and the fingerprint. lora_model_from_checkpoint rebuilds the same model from these."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(name_or_path, pretrained, context_length, drop_rate)
    folder = os.path.isdir(name_or_path) if pretrained else name_or_path not in PRESETS  # as build_model decides
    return model, {"base": os.path.abspath(name_or_path) if folder else name_or_path,
                   "init": "pretrained" if pretrained else "random", "seed": seed,
                   "fingerprint": base_fingerprint(model)}


def lora_checkpoint(model, identity):
    """The entries of a LoRA checkpoint that differ from a full one: "model" holds the adapters
    only, "lora" the settings and the base's identity (from build_base)."""
    return {"model": lora_state_dict(model), "lora": {**lora_settings(model), "base": identity}}


def lora_model_from_checkpoint(ckpt, path="checkpoint"):
    """The model of a LoRA checkpoint with its adapters unmerged (to resume training): the base
    rebuilt and checked against the recorded fingerprint, the adapters added and loaded."""
    try:
        lora, config = ckpt["lora"], ckpt["config"]
        settings = [lora[k] for k in ("rank", "alpha", "dropout", "targets")]
        base, init, seed, fingerprint = (lora["base"][k] for k in ("base", "init", "seed", "fingerprint"))
        context_length, drop_rate = config["context_length"], config.get("drop_rate", 0.0)
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path} is corrupt: its LoRA settings lack {e}") from None
    if os.path.isabs(base) and not os.path.isdir(base):
        raise FileNotFoundError(f"the base model folder {base} of the LoRA checkpoint {path} does not exist; "
                                "put the folder back there (the checkpoint holds only the adapters)")
    model, rebuilt = build_base(base, init == "pretrained", seed, context_length, drop_rate)
    if rebuilt["fingerprint"] != fingerprint:
        raise ValueError(f"the {init} weights of {base} are not those the LoRA adapters of {path} were "
                         "trained on (another fingerprint); they only apply to their own base")
    add_lora(model, *settings)
    load_lora_state_dict(model, ckpt["model"], path)
    return model
