"""Hugging Face model folders: the hub presets (downloaded once into a cache folder), a folder's
config.json as a GPTConfig (the family from its architecture; what the model cannot run is refused
in one sentence), the names of each family's tensors both ways, and the weights of a folder
(model.safetensors, or shards listed in model.safetensors.index.json) read tensor by tensor into a
model built on the meta device: the peak memory is the model's and a few tens of MB.

    python hf.py                  # the presets: family, layers, heads, width, parameters, hub repository
    python hf.py qwen3-0.6b       # fetch its files into the cache now (say, before going offline)
    python hf.py PATH             # check that a Hugging Face folder loads
"""
import common  # noqa: F401  (first: Ctrl-C while torch loads is one line, see common.py)
import argparse
import json
import math
import os
from typing import NamedTuple

import torch

from common import download, run_main
from model import GPT, PRESETS, GPTConfig, config_for, with_context_length

# The hub repository of each preset with pretrained weights: the repository of the same name, which
# is the base model, except for Qwen3, whose repository of that name holds the post-trained (chat)
# model (Qwen/Qwen3-0.6B-Base is its base). Other repositories: download them, pass the folder.
HF_REPOS = {
    "gpt2": "openai-community/gpt2", "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large", "gpt2-xl": "openai-community/gpt2-xl",
    "qwen3-0.6b": "Qwen/Qwen3-0.6B", "qwen3-1.7b": "Qwen/Qwen3-1.7B",
    "llama-3.2-1b": "meta-llama/Llama-3.2-1B", "llama-3.2-3b": "meta-llama/Llama-3.2-3B",  # gated: $HF_TOKEN
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M", "smollm2-360m": "HuggingFaceTB/SmolLM2-360M",
    "smollm2-1.7b": "HuggingFaceTB/SmolLM2-1.7B",
    "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B", "qwen2.5-1.5b": "Qwen/Qwen2.5-1.5B",
}
# What a download fetches besides config.json and the weights: the tokenizer and chat format
# (GPT-2's tokenizer is tiktoken's). Only tokenizer.json is in every repository.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja",
                   "special_tokens_map.json")
ARCHITECTURES = {"GPT2LMHeadModel": "gpt2", "LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
                 "Qwen3ForCausalLM": "qwen3"}
ALSO_GPT2 = "GPT2Model"  # GPT-2 without its head, which is the token embedding: the same weights
INDEX = "model.safetensors.index.json"
NEEDS = f"a Hugging Face model folder needs config.json and model.safetensors (or {INDEX} and its shards)"


def default_cache_dir():
    return os.environ.get("GPT2_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "gpt2-weights"))


# ----------------------------------------------------------------------------- folders and downloads


def weight_files(folder):
    """The safetensors files of a folder: model.safetensors, or the shards its index lists
    (FileNotFoundError naming what is missing)."""
    index = os.path.join(folder, INDEX)
    if os.path.isfile(index):
        try:
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index} is not a safetensors index ({e!r})") from None
        for shard in shards:
            if not os.path.isfile(os.path.join(folder, shard)):
                raise FileNotFoundError(f"{os.path.join(folder, shard)} is missing (listed in {INDEX})")
        return [os.path.join(folder, shard) for shard in shards]
    if not os.path.isfile(os.path.join(folder, "model.safetensors")):
        raise FileNotFoundError(f"{os.path.join(folder, 'model.safetensors')} is missing; {NEEDS}")
    return [os.path.join(folder, "model.safetensors")]


def check_folder(folder, weights=True):
    """Raise FileNotFoundError naming what a model folder lacks (config.json, and with weights the
    weights), if it lacks anything; for a train.py output folder given instead, naming its checkpoint."""
    if os.path.isfile(os.path.join(folder, "config.json")):
        if weights:
            weight_files(folder)
        return
    checkpoints = [name for name in ("best.pt", "ckpt.pt") if os.path.isfile(os.path.join(folder, name))]
    if checkpoints:
        raise FileNotFoundError(f"{folder} is a train.py output folder, not a Hugging Face model folder (it has no "
                                f"config.json); give its checkpoint, {os.path.join(folder, checkpoints[0])}")
    raise FileNotFoundError(f"{os.path.join(folder, 'config.json')} is missing; {NEEDS}")


def unknown_model(name_or_path, names):
    """The error for a model that is none of `names` nor an existing path: one that looks like a
    path (a folder in it, or a model file's suffix) does not exist."""
    if "/" in name_or_path or os.sep in name_or_path or name_or_path.endswith((".pt", ".pth", ".bin", ".safetensors")):
        return FileNotFoundError(f"{name_or_path} does not exist; a model is {names}, a local folder or a model file")
    return ValueError(f"'{name_or_path}' is neither {names}, a local folder nor a model file")


def hf_folder(name_or_path, cache_dir=None):
    """A local folder holding config.json and the weights: the folder given, or the hub's files for
    a preset name, downloaded once into the cache folder (tokenizer files too, but for GPT-2)."""
    if os.path.isdir(name_or_path):
        folder = name_or_path
    elif name_or_path in HF_REPOS:
        folder = os.path.join(cache_dir or default_cache_dir(), name_or_path)
        try:
            check_folder(folder)
        except (FileNotFoundError, ValueError):
            fetch(name_or_path, folder)
    else:
        raise unknown_model(name_or_path, f"a preset with pretrained weights ({', '.join(HF_REPOS)})")
    check_folder(folder)
    return folder


def fetch(name, folder):
    """Download a preset's files from its hub repository into folder, the weights last (so that
    complete weights mean a complete folder); files already there are kept. $HF_TOKEN, if set, is
    sent for gated repositories (Llama)."""
    repo = HF_REPOS[name]
    token = os.environ.get("HF_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else None

    def get(file, required=True):
        dest = os.path.join(folder, file)
        if os.path.exists(dest):
            return True
        try:
            download(f"https://huggingface.co/{repo}/resolve/main/{file}", dest, headers)
            return True
        except FileNotFoundError:
            if required:
                raise FileNotFoundError(f"the hub repository {repo} has no {file}") from None
            return False
        except PermissionError:
            raise PermissionError(f"the hub repository {repo} is gated: accept its license on "
                                  f"https://huggingface.co/{repo} and set HF_TOKEN to a token of that account"
                                  + (" (the token given was refused)" if token else "")) from None
        except OSError as e:
            raise OSError(f"{e}, or pass a local folder with config.json and the weights") from None

    get("config.json")
    if not name.startswith("gpt2"):
        get("tokenizer.json")
        for file in TOKENIZER_FILES[1:]:
            get(file, required=False)
    if get(INDEX, required=False):
        with open(os.path.join(folder, INDEX)) as f:
            for shard in sorted(set(json.load(f)["weight_map"].values())):
                get(shard)
    else:
        get("model.safetensors")


# ----------------------------------------------------------------------------- config.json


def read_config(folder, context_length=None, drop_rate=0.0):
    """The GPTConfig of a folder's config.json, optionally with a shorter context; an architecture
    or a setting the model does not have is refused in one sentence naming it."""
    path = os.path.join(folder, "config.json")
    try:
        with open(path) as f:
            hf = json.load(f)
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(hf, dict):
        raise ValueError(f"{path} is not a model config (a JSON object)")
    named = (hf.get("architectures") or [None])[0]
    family = "gpt2" if named == ALSO_GPT2 else ARCHITECTURES.get(named) if named else hf.get("model_type")
    if family not in ARCHITECTURES.values():
        raise ValueError(f"{path}: the architecture {named or hf.get('model_type')} is not supported; "
                         f"supported are {', '.join(ARCHITECTURES)} (Llama 3 and SmolLM2 are LlamaForCausalLM, "
                         "Qwen2.5 is Qwen2ForCausalLM)")
    what = unsupported_setting(hf, family)
    if what:
        raise ValueError(f"{path}: {what} is not supported")
    try:
        cfg = gpt2_config(hf) if family == "gpt2" else llama_config(hf, family)
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path} is not a valid {named or family} config (lacking or bad: {e})") from None
    except ValueError as e:  # GPTConfig's own checks
        raise ValueError(f"{path}: {e}") from None
    cfg.drop_rate = drop_rate
    return with_context_length(cfg, context_length)


def architecture(cfg):
    """The Hugging Face architecture of a config's family (GPT2LMHeadModel, LlamaForCausalLM, ...)."""
    return next(name for name, family in ARCHITECTURES.items() if family == cfg.family)


def rope_parameters(hf):
    """config.json's RoPE settings: "rope_parameters" (transformers 5), or the older "rope_scaling"
    beside "rope_theta" (and "partial_rotary_factor")."""
    return {"rope_theta": hf.get("rope_theta", 10000.0), "partial_rotary_factor": hf.get("partial_rotary_factor", 1.0),
            **(hf.get("rope_parameters") or hf.get("rope_scaling") or {})}


def unsupported_setting(hf, family):
    """What in a config.json of a supported architecture the model does not do, in a few words, or None."""
    if family == "gpt2":
        if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            return f"the activation {hf['activation_function']} (GPT-2 uses gelu_new)"
        if hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("scale_attn_weights", True):
            return "another scaling of the attention (scale_attn_by_inverse_layer_idx, scale_attn_weights)"
        return None
    rope = rope_parameters(hf)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    layer_types = hf.get("layer_types") or []
    n_layers = hf.get("num_hidden_layers", 0)
    if hf.get("num_experts") or hf.get("num_local_experts"):
        return "a mixture of experts (num_experts)"
    if rope_type not in ("default", "llama3"):
        return f"the rope type '{rope_type}' (only default and llama3 are)"
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        return f"rotary embeddings on part of each head (partial_rotary_factor {rope['partial_rotary_factor']})"
    if any(kind != "full_attention" for kind in layer_types) or (
            not layer_types and hf.get("use_sliding_window") and hf.get("sliding_window")
            and hf.get("max_window_layers", n_layers) < n_layers):
        return "sliding-window attention (use_sliding_window, layer_types)"
    if hf.get("hidden_act", "silu") != "silu":
        return f"the activation {hf['hidden_act']} (the Llama family uses silu)"
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        return "biases on the attention or MLP layers (attention_bias, mlp_bias)"
    return None


def gpt2_config(hf):
    return GPTConfig(vocab_size=hf["vocab_size"], context_length=hf["n_positions"], emb_dim=hf["n_embd"],
                     n_layers=hf["n_layer"], n_heads=hf["n_head"], qkv_bias=True, hidden_dim=hf.get("n_inner"),
                     norm_eps=hf.get("layer_norm_epsilon", 1e-5), tied_head=hf.get("tie_word_embeddings", True))


def llama_config(hf, family):
    """The config of LlamaForCausalLM, Qwen2ForCausalLM or Qwen3ForCausalLM; a key config.json
    leaves out takes transformers' default for that architecture."""
    n_heads, rope = hf["num_attention_heads"], rope_parameters(hf)
    scaling = None
    if rope.get("rope_type", rope.get("type")) == "llama3":
        scaling = dict(factor=rope["factor"], low_freq_factor=rope["low_freq_factor"],
                       high_freq_factor=rope["high_freq_factor"],
                       original_context_length=rope.get("original_max_position_embeddings",
                                                        hf["max_position_embeddings"]))
    return GPTConfig(family=family, vocab_size=hf["vocab_size"], context_length=hf["max_position_embeddings"],
                     emb_dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=n_heads,
                     n_kv_heads=hf.get("num_key_value_heads") or n_heads,
                     head_dim=hf.get("head_dim") or (128 if family == "qwen3" else hf["hidden_size"] // n_heads),
                     hidden_dim=hf["intermediate_size"], qkv_bias=family == "qwen2", qk_norm=family == "qwen3",
                     norm_eps=hf.get("rms_norm_eps", 1e-6), rope_base=float(rope["rope_theta"]),
                     rope_scaling=scaling, tied_head=hf.get("tie_word_embeddings", False))


def config_json(cfg, dtype, bos_token_id=None, eos_token_id=None):
    """config.json for a GPTConfig, as transformers writes it for the family's architecture
    (RoPE settings in the older rope_theta / rope_scaling form, which transformers 4 and 5,
    vLLM and llama.cpp's converter all read); dtype: "float32" or "bfloat16"; the token ids are
    the tokenizer's. GPT-2's also has n_ctx, which llama.cpp's convert_hf_to_gguf.py reads."""
    if cfg.family == "gpt2":
        return {
            "activation_function": "gelu_new", "add_cross_attention": False, "architectures": ["GPT2LMHeadModel"],
            "attn_pdrop": cfg.drop_rate, "bos_token_id": bos_token_id, "dtype": dtype, "embd_pdrop": cfg.drop_rate,
            "eos_token_id": eos_token_id, "initializer_range": 0.02, "layer_norm_epsilon": cfg.norm_eps,
            "model_type": "gpt2", "n_ctx": cfg.context_length, "n_embd": cfg.emb_dim, "n_head": cfg.n_heads,
            "n_inner": None if cfg.hidden_dim == 4 * cfg.emb_dim else cfg.hidden_dim, "n_layer": cfg.n_layers,
            "n_positions": cfg.context_length, "pad_token_id": None, "reorder_and_upcast_attn": False,
            "resid_pdrop": cfg.drop_rate, "scale_attn_by_inverse_layer_idx": False, "scale_attn_weights": True,
            "summary_activation": None, "summary_first_dropout": 0.1, "summary_proj_to_labels": True,
            "summary_type": "cls_index", "summary_use_proj": True, "tie_word_embeddings": cfg.tied_head,
            "use_cache": True, "vocab_size": cfg.vocab_size,
        }
    scaling = None if cfg.rope_scaling is None else {
        "rope_type": "llama3", **{k: cfg.rope_scaling[k] for k in ("factor", "low_freq_factor", "high_freq_factor")},
        "original_max_position_embeddings": cfg.rope_scaling["original_context_length"]}
    config = {
        "architectures": [architecture(cfg)], "model_type": cfg.family, "attention_dropout": 0.0,
        "bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "dtype": dtype, "head_dim": cfg.head_dim,
        "hidden_act": "silu", "hidden_size": cfg.emb_dim, "initializer_range": 0.02,
        "intermediate_size": cfg.hidden_dim, "max_position_embeddings": cfg.context_length,
        "num_attention_heads": cfg.n_heads, "num_hidden_layers": cfg.n_layers, "num_key_value_heads": cfg.n_kv_heads,
        "rms_norm_eps": cfg.norm_eps, "rope_scaling": scaling, "rope_theta": cfg.rope_base,
        "tie_word_embeddings": cfg.tied_head, "use_cache": True, "vocab_size": cfg.vocab_size,
    }
    if cfg.family == "llama":
        config.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    else:
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layers)
        if cfg.family == "qwen3":
            config.update(attention_bias=False)
    return config


# ----------------------------------------------------------------------------- tensor names


# Inside a block, the Llama family's names differ from GPT-2's (ours) in the norms and the attention's
LLAMA_BLOCK_NAMES = {"ln_1": "input_layernorm", "ln_2": "post_attention_layernorm", "attn": "self_attn"}


def hf_name(cfg, key):
    """The name save_pretrained gives our state-dict key `key` for the family's architecture:
    GPT-2's under "transformer.", the Llama family's under "model." (h.3.attn.q_proj.weight is
    model.layers.3.self_attn.q_proj.weight), an untied head lm_head.weight."""
    if key == "wte.head":
        return "lm_head.weight"
    if cfg.family == "gpt2":
        return "transformer." + key
    if key == "wte.weight":
        return "model.embed_tokens.weight"
    if key.startswith("ln_f."):
        return "model.norm." + key.removeprefix("ln_f.")
    _, layer, part, rest = key.split(".", 3)
    return f"model.layers.{layer}.{LLAMA_BLOCK_NAMES.get(part, part)}.{rest}"


def transposed_in_hf(cfg, key):
    """Whether Hugging Face stores our tensor `key` transposed: the token embedding (and an untied
    head), [vocab, emb_dim] where our TiedEmbedding is [emb_dim, vocab]; and GPT-2's Conv1D weights,
    [in, out] where nn.Linear's are [out, in]."""
    return key in ("wte.weight", "wte.head") or (
        cfg.family == "gpt2" and key.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")))


def hf_state_dict(model):
    """The model's tensors under the names and in the layouts save_pretrained writes for its
    family's architecture (no lm_head when the head is tied, no attention-mask buffers)."""
    cfg = model.config
    return {hf_name(cfg, key): (tensor.t() if transposed_in_hf(cfg, key) else tensor).contiguous()
            for key, tensor in model.state_dict().items()}


# ----------------------------------------------------------------------------- reading the weights


DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
CHUNK = 1 << 26  # bytes of a tensor read at a time when it is converted on its way into the model


class Stored(NamedTuple):
    """Where a tensor lies in a safetensors file."""
    path: str
    dtype: torch.dtype
    shape: tuple
    offset: int  # of its first byte in the file


def safetensors_header(path):
    """{name: Stored} of a safetensors file, from its header alone: 8 bytes giving the header's
    length, a JSON object of each tensor's dtype, shape and byte range in the data after it."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            if not 2 <= length <= min(size - 8, 1 << 27):
                raise ValueError("no safetensors header")
            header = json.loads(f.read(length))
        stored = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info["dtype"] not in DTYPES:
                raise ValueError(f"'{name}' is {info['dtype']}; only F32, BF16 and F16 weights load")
            start, end = info["data_offsets"]
            dtype, shape = DTYPES[info["dtype"]], tuple(info["shape"])
            if end - start != math.prod(shape) * dtype.itemsize or 8 + length + end > size:
                raise ValueError(f"'{name}' does not fit the file (truncated?)")
            stored[name] = Stored(path, dtype, shape, 8 + length + start)
        return stored
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path} cannot be read ({e}); delete it to download it again") from None


def read_exactly(f, tensor):
    """Fill a contiguous CPU tensor with the next bytes of file f."""
    buffer = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
    if f.readinto(buffer) != len(buffer):
        raise ValueError(f"{f.name} ends early (truncated?)")


def read_tensor(f, stored, dest, transposed):
    """Read a stored tensor (only its first rows if dest has fewer: a shorter GPT-2 context) into
    dest, our parameter: straight into its memory when the dtype and the memory layout agree,
    otherwise CHUNK bytes of rows at a time, each cast and transposed into place."""
    target = dest.t() if transposed else dest  # dest seen in the file's layout
    f.seek(stored.offset)
    if target.is_contiguous() and dest.dtype == stored.dtype:
        return read_exactly(f, target)
    rows, row_shape = target.shape[0], stored.shape[1:]
    per_chunk = max(1, CHUNK // (math.prod(row_shape) * stored.dtype.itemsize))
    buffer = torch.empty((min(per_chunk, rows), *row_shape), dtype=stored.dtype)
    for start in range(0, rows, per_chunk):
        part = buffer[:min(per_chunk, rows - start)]
        read_exactly(f, part)
        if target.is_contiguous():
            target[start:start + len(part)] = part
        else:  # rows become columns; .contiguous() transposes in blocks, 5x faster than writing columns
            dest[:, start:start + len(part)] = part.to(dest.dtype).t().contiguous()


def stored_tensors(folder):
    """{name: Stored} of every tensor in a folder's weights (all its shards)."""
    stored = {}
    for path in weight_files(folder):
        stored.update(safetensors_header(path))
    return stored


def load_weights(model, stored, folder):
    """Read every tensor of `stored` into the model's parameters, checking that they are exactly
    the model's (names and shapes from config.json)."""
    cfg, state = model.config, model.state_dict()
    ours = {hf_name(cfg, key): key for key in state}
    loaded = set()
    by_file = sorted(stored.items(), key=lambda item: (item[1].path, item[1].offset))  # read each file in order
    files = {}
    try:
        for file_name, where in by_file:
            name = file_name
            if cfg.family == "gpt2" and not name.startswith(("transformer.", "lm_head.")):
                name = "transformer." + name  # the hub's GPT-2 files have no prefix
            if (name == "lm_head.weight" and cfg.tied_head) or (
                    cfg.family == "gpt2" and name.endswith((".attn.bias", ".attn.masked_bias"))):
                continue  # a tied head is the embedding; GPT-2's causal-mask buffers
            if name not in ours:
                raise ValueError(f"{folder} has an unexpected tensor '{file_name}'; is it a "
                                 f"{architecture(cfg)} checkpoint?")
            key = ours[name]
            dest = state[key]
            expected = tuple(reversed(dest.shape)) if transposed_in_hf(cfg, key) else tuple(dest.shape)
            if key == "wpe.weight" and where.shape[0] >= cfg.context_length:
                expected = (where.shape[0], *expected[1:])  # a shorter context reads the first rows
            if where.shape != expected:
                raise ValueError(f"{folder}: '{file_name}' has shape {where.shape}, expected {expected} from its "
                                 "config.json")
            if where.path not in files:
                files[where.path] = open(where.path, "rb")
            read_tensor(files[where.path], where, dest, transposed_in_hf(cfg, key))
            loaded.add(key)
    finally:
        for f in files.values():
            f.close()
    missing = set(state) - loaded
    if missing:
        raise ValueError(f"{folder} lacks {len(missing)} of the model's tensors, e.g. '{hf_name(cfg, min(missing))}'")


def weights_dtype(stored):
    """The dtype of most of the stored weights (by size)."""
    sizes = {}
    for where in stored.values():
        sizes[where.dtype] = sizes.get(where.dtype, 0) + math.prod(where.shape)
    return max(sizes, key=sizes.get) if sizes else torch.float32


def from_pretrained(name_or_path, context_length=None, drop_rate=0.0, cache_dir=None, dtype=None):
    """A model with Hugging Face weights: a preset name (downloaded once) or a local folder, its
    family from config.json; in dtype, or that of the files (Qwen and Llama ship bfloat16, GPT-2
    float32). A context_length below the checkpoint's keeps a GPT-2's first position embeddings.
    Built on the meta device and filled tensor by tensor: no second copy of the weights."""
    folder = hf_folder(name_or_path, cache_dir)
    cfg = read_config(folder, context_length, drop_rate)
    stored = stored_tensors(folder)
    with torch.device("meta"):
        model = GPT(cfg)
    model = model.to(dtype or weights_dtype(stored)).to_empty(device="cpu")
    with torch.no_grad():
        load_weights(model, stored, folder)
    return model


def build_model(name_or_path, pretrained=True, context_length=None, drop_rate=0.0):
    """The model train.py and generate.py start from: Hugging Face weights for a preset name or
    folder, or random weights of a preset's (or a folder's) shape."""
    if pretrained:
        if name_or_path in PRESETS and name_or_path not in HF_REPOS:
            raise ValueError(f"'{name_or_path}' has no pretrained weights; use random initialisation")
        return from_pretrained(name_or_path, context_length, drop_rate)
    if name_or_path in PRESETS:
        return GPT(with_context_length(config_for(name_or_path, drop_rate=drop_rate), context_length))
    if os.path.isdir(name_or_path):
        check_folder(name_or_path, weights=False)
        return GPT(read_config(name_or_path, context_length, drop_rate))
    raise unknown_model(name_or_path, f"a preset ({', '.join(PRESETS)})")


# ----------------------------------------------------------------------------- command line


def heads(cfg):
    return f"{cfg.n_heads} heads" + (f" ({cfg.n_kv_heads} kv)" if cfg.n_kv_heads != cfg.n_heads else "")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", help=f"a preset ({', '.join(HF_REPOS)}) to download once into "
                   f"{default_cache_dir()} ($GPT2_CACHE_DIR; $HF_TOKEN for gated repositories), or a local Hugging "
                   "Face folder, to load and describe; none: list the presets")
    args = p.parse_args(argv)
    if args.model is None:
        for name in PRESETS:
            with torch.device("meta"):  # shapes only: no memory, no time
                model = GPT(config_for(name))
            cfg = model.config
            print(f"{name:13} {cfg.family:5} {cfg.n_layers:2} layers, {heads(cfg):15} width {cfg.emb_dim:4}, context "
                  f"{cfg.context_length:6}: {model.num_params() / 1e6:7,.1f}M parameters "
                  f"({HF_REPOS.get(name, 'random weights only')})")
        return
    model = from_pretrained(args.model)
    cfg = model.config
    print(f"{args.model}: {architecture(cfg)}, {model.num_params() / 1e6:,.1f}M parameters, {cfg.n_layers} layers, "
          f"{heads(cfg)}, width {cfg.emb_dim}, context {cfg.context_length}, vocabulary {cfg.vocab_size}, "
          f"{str(model.wte.weight.dtype).removeprefix('torch.')}; loaded from {hf_folder(args.model)}")


if __name__ == "__main__":
    run_main(main)
