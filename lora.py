"""LoRA: low-rank adapters (Hu et al. 2021; the book's appendix E). A frozen linear layer W plus
a trainable update (alpha / rank) * B A, A [rank, in] and B [out, rank]. B starts at zero, so the
adapted model starts as exactly the base model. Adding, merging and saving adapters, and the
fingerprint that identifies the base weights they were trained on. The target layers are named
per family (LORA_TARGETS, LLAMA_LORA_TARGETS)."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import weights_fingerprint


# The linear layers of a block that LoRA can adapt, by the short names of the command line: GPT-2's,
# which name the same layers on every family (on the Llama family qkv adapts q, k and v, mlp_in gate
# and up), and the Llama family's own projections, one name each (the usual LoRA targets q and v).
LORA_TARGETS = {"qkv": "attn.c_attn", "attn_out": "attn.c_proj", "mlp_in": "mlp.c_fc", "mlp_out": "mlp.c_proj"}
LLAMA_LORA_TARGETS = {"q": "attn.q_proj", "k": "attn.k_proj", "v": "attn.v_proj", "o": "attn.o_proj",
                      "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
GPT2_NAMES_ON_LLAMA = {"qkv": ("q", "k", "v"), "attn_out": ("o",), "mlp_in": ("gate", "up"), "mlp_out": ("down",)}
ALL_LORA_TARGETS = (*LORA_TARGETS, *LLAMA_LORA_TARGETS)


def family_targets(cfg):
    """{target name: the layers inside a block it adapts} for a config's family."""
    if cfg.family == "gpt2":
        return {name: (path,) for name, path in LORA_TARGETS.items()}
    return {**{name: tuple(LLAMA_LORA_TARGETS[n] for n in names) for name, names in GPT2_NAMES_ON_LLAMA.items()},
            **{name: (path,) for name, path in LLAMA_LORA_TARGETS.items()}}


def target_paths(cfg, targets):
    """The layers inside a block (attn.c_attn, ...) that the target names adapt, in the block's
    order; a name the family lacks, or none at all, is refused in one sentence."""
    table = family_targets(cfg)
    for target in targets or [""]:
        if target not in table:
            raise ValueError((f"the {cfg.family} family has no LoRA target '{target}'" if target in ALL_LORA_TARGETS
                              else f"unknown LoRA target '{target}'") +
                             f"; choose among {', '.join(table)} (comma-separated)")
    paths = {path for target in targets for path in table[target]}
    order = LORA_TARGETS if cfg.family == "gpt2" else LLAMA_LORA_TARGETS
    return [path for path in order.values() if path in paths]


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
    """Freeze every parameter of model (embeddings, norms and biases too) and wrap the target
    linears of every block in LoRALinear, in place. targets: names from LORA_TARGETS (any
    family) or LLAMA_LORA_TARGETS (the Llama family), as a list or a comma-separated string.
    Returns the model."""
    if isinstance(targets, str):
        targets = targets.split(",")
    paths = target_paths(model.config, [t.strip() for t in targets])
    if lora_modules(model):
        raise ValueError("the model has LoRA adapters already")
    linears = [(block, path) for block in model.h for path in paths]
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
    names = LORA_TARGETS if model.config.family == "gpt2" else LLAMA_LORA_TARGETS  # one layer a name
    return {"rank": modules[0].rank, "alpha": modules[0].alpha, "dropout": modules[0].dropout.p,
            "targets": [t for t, path in names.items() if path in paths]}


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
    """model.weights_fingerprint of the base weights, adapters left out: the same on a model with
    adapters as on the base it was built from. Take it on the base as built (before a cast to
    another dtype). 1-2 s for gpt2-medium (1.3 GiB) on a 2-core CPU."""
    return weights_fingerprint((name, tensor) for name, tensor in model.state_dict().items()
                               if not name.endswith((".lora_A", ".lora_B")))
