"""Our checkpoint format, both sides: what train.py saves in OUT/ckpt.pt and OUT/best.pt (the
weights of a full or a LoRA run, run_record, the optimizer and the data position) and every reader
of it: --resume (SavedRun, the one reader of the training state), the model of a checkpoint, what it
records of its training (trained_with), and for a LoRA checkpoint, which holds only the adapters,
what it records of its base so that loading rebuilds the base, checks it, and merges the adapters.
Also the model files readers already have, as --model: the book's GPTModel state dict and
nanoGPT's ckpt.pt; and load_for_inference, the one way generate.py, eval.py, serve.py (and
export.py, through load_model_file) get a model."""
import dataclasses
import os
from typing import Optional

import torch

from common import atomic_write
from hf import HF_REPOS, build_model, check_folder, default_cache_dir, hf_folder
from lora import add_lora, base_fingerprint, load_lora_state_dict, lora_settings, lora_state_dict, merge_lora
from model import GPT, PRESETS, GPTConfig, config_for, with_context_length
from prompts import (CHAT_TEMPLATE, GPT2, STYLE_NAMES, check_vocab, default_prompt_style, load_tokenizer,
                     tokenizer_from_state)
from quantize import prepare_for_decoding


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


def run_record(model, splits, prompt_style, mask_instructions, split, tokenizer=GPT2):
    """What a checkpoint records besides the weights for those who use it (trained_with reads
    it back): the model's config, its tokenizer (prompts.tokenizer_from_state reads it: the
    checkpoint works after its base folder moves), the prompt style (raw text is continued as it
    is: "none"), the loss masking, the context length, and the data: where it was, its
    fingerprint, the split."""
    return {"config": dataclasses.asdict(model.config), "tokenizer": tokenizer.state(),
            "prompt_style": "none" if splits.kind == "text" else prompt_style,
            "mask_instructions": mask_instructions, "context_length": model.config.context_length,
            "data": os.path.abspath(splits.path), "data_fingerprint": splits.fingerprint,
            "train_frac": split[0], "test_frac": split[1]}


@dataclasses.dataclass
class TrainedWith:
    """What a checkpoint records of its training, as the scripts that use the model need it;
    all None (and no masking) for a model that is no train.py checkpoint."""
    prompt_style: Optional[str] = None
    context_length: Optional[int] = None
    mask_instructions: bool = False
    data: Optional[str] = None  # the data file, as an absolute path when it was trained
    data_fingerprint: Optional[dict] = None  # data.data_fingerprint of it
    split: Optional[tuple] = None  # (train, test) fractions
    dpo: Optional[dict] = None  # a DPO run's {"beta", "logprobs"}
    template_date: Optional[str] = None  # the date its chat template rendered the data with (Llama 3.2's)


def trained_with(ckpt):
    """The TrainedWith of a checkpoint dict (None: of no checkpoint)."""
    if ckpt is None:
        return TrainedWith()
    args = ckpt.get("args") or {}
    split = (ckpt["train_frac"], ckpt["test_frac"]) if "train_frac" in ckpt and "test_frac" in ckpt else None
    return TrainedWith(prompt_style=ckpt.get("prompt_style"), context_length=ckpt.get("context_length"),
                       mask_instructions=ckpt.get("mask_instructions", False), data=ckpt.get("data"),
                       data_fingerprint=ckpt.get("data_fingerprint"), split=split,
                       dpo={"beta": args.get("beta", 0.1), "logprobs": args.get("dpo_logprobs", "sum")}
                       if args.get("dpo") else None, template_date=args.get("template_date"))


def model_from_checkpoint(ckpt, path="checkpoint"):
    """The GPT of a checkpoint dict (as loaded by load_checkpoint from path). A LoRA checkpoint
    gives its base with the adapters merged: a plain GPT, as fast as any other."""
    if "lora" in ckpt:
        return merge_lora(lora_model_from_checkpoint(ckpt, path))
    try:
        model = GPT(GPTConfig(**ckpt["config"]))
        model.load_state_dict(ckpt["model"])
    except (TypeError, ValueError, RuntimeError) as e:  # unknown or inconsistent config keys, weights of another shape
        detail = str(e).strip().splitlines()[-1].strip()  # load_state_dict lists mismatches a line each
        raise ValueError(f"{path} is corrupt: its weights do not fit its config ({detail})") from None
    return model


def build_base(name_or_path, pretrained, seed, context_length=None, drop_rate=0.0):
    """(model, identity): the base model of a LoRA run, as build_model builds it, with random
    weights from `seed` (the caller's random state left as it was), and what its checkpoint
    records of it: the preset name or the folder as an absolute path, the initialisation, the
    seed and the fingerprint. lora_model_from_checkpoint rebuilds the same model from these."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_start_model(name_or_path, pretrained, context_length, drop_rate)
    folder = os.path.exists(name_or_path) if pretrained else name_or_path not in PRESETS  # as build_model decides
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
    if os.path.isabs(base) and not os.path.exists(base):
        raise FileNotFoundError(f"the base model folder {base} of the LoRA checkpoint {path} does not exist; "
                                "put the folder back there or pass its new place with --base FOLDER (the "
                                "checkpoint holds only the adapters)")
    try:
        model, rebuilt = build_base(base, init == "pretrained", seed, context_length, drop_rate)
    except OSError:
        if os.path.isabs(base):
            raise
        # a preset's weights, neither cached nor downloadable: a folder holding them can stand in
        raise OSError(f"the LoRA checkpoint {path} needs the weights of {base}, which are not in the download "
                      f"cache {default_cache_dir()} and could not be downloaded; connect to the network, or pass "
                      "a folder holding those weights with --base FOLDER") from None
    if rebuilt["fingerprint"] != fingerprint:
        raise ValueError(f"the {init} weights of {base} are not those the LoRA adapters of {path} were "
                         "trained on (another fingerprint); they only apply to their own base")
    add_lora(model, *settings)
    load_lora_state_dict(model, ckpt["model"], path)
    return model


def with_base(ckpt, folder, path="checkpoint"):
    """The LoRA checkpoint dict ckpt (loaded from path) with its base looked for in `folder`, for
    a base that moved since training. Loading still checks the fingerprint, so only the same
    weights are accepted, wherever they now lie; a checkpoint saved later records the new place."""
    if "lora" not in ckpt:
        raise ValueError(f"--base is for a LoRA checkpoint; {path} holds all its weights")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--base {folder} is not a folder; give the folder of the base model")
    try:
        identity = {**ckpt["lora"]["base"], "base": os.path.abspath(folder)}
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path} is corrupt: its LoRA settings lack {e}") from None
    return {**ckpt, "lora": {**ckpt["lora"], "base": identity}}


# ----------------------------------------------------------------------------- train.py's OUT/ckpt.pt and OUT/best.pt

# The progress of a run, as ckpt.pt holds it and --resume starts from it.
TRAINING_STATE = ("step", "epoch", "batch_in_epoch", "tokens_seen", "elapsed", "best_val_loss", "val_loss")


def weights(model, lora_base=None):
    """The weights a checkpoint holds: all of them, or for a LoRA run (lora_base: its base's
    identity, from build_base) the adapters alone, with the settings and the base's identity (a
    LoRA checkpoint of gpt2-xl is megabytes)."""
    if lora_base is None:
        return {"model": model.state_dict()}
    return lora_checkpoint(model, lora_base)


def training_record(model, splits, settings, step, world_size):
    """What both files of a run hold besides the weights: run_record (with the tokenizer of the
    data), the run's settings (train.py's arguments as a dict, which --resume takes back), its step
    and its number of processes."""
    return {**run_record(model, splits, settings["prompt_style"], settings["mask_instructions"], settings["split"],
                         splits.tokenizer),
            "args": settings, "step": step, "world_size": world_size}


def best_checkpoint(record, best_weights, best_val_loss, step):
    """OUT/best.pt: the weights of the lowest validation loss, of that step, and what inference
    needs (a third of ckpt.pt: no optimizer state)."""
    return {**record, **best_weights, "val_loss": best_val_loss, "best_val_loss": best_val_loss, "step": step}


def training_checkpoint(record, weights, optimizer, scaler, schedule, dpo_reference, state, cuda):
    """OUT/ckpt.pt: everything a resumed run needs, read back by SavedRun. schedule: the learning
    rate's {"schedule", "warmup_steps", "total_steps"}; dpo_reference: a DPO run's reference
    log-probs {"train", "val"} (so that neither training nor --resume needs the reference model
    again), else None; state: TRAINING_STATE's values; cuda: save the CUDA generators too."""
    return {**record, **weights, "optimizer": optimizer.state_dict(), "scheduler": schedule,
            "scaler": scaler.state_dict() if scaler.is_enabled() else None,
            **({"dpo_reference": dpo_reference} if dpo_reference is not None else {}),
            "rng": {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if cuda else []},
            **state}


class SavedRun:
    """The run saved in OUT/ckpt.pt, as train.py --resume takes it back: its settings (train.py's
    arguments when it was saved), its data (trained_with), its tokenizer, its number of processes,
    its progress (TRAINING_STATE), its model, optimizer and random state, and a DPO run's reference
    log-probs. base: the folder a LoRA run's base moved to (checked against the recorded fingerprint)."""

    def __init__(self, path, base=None):
        ckpt = load_checkpoint(path)
        if "optimizer" not in ckpt or "args" not in ckpt:
            raise ValueError(f"{path} holds no training state (optimizer, data position); it cannot be resumed")
        if base is not None:  # look for the base there from now on
            ckpt = with_base(ckpt, base, path)
        self.path, self.ckpt = path, ckpt
        self.settings = ckpt["args"]
        self.trained_with = trained_with(ckpt)
        self.tokenizer = tokenizer_from_state(ckpt.get("tokenizer"))  # GPT-2's in a checkpoint from before
        self.world_size = ckpt.get("world_size", 1)
        self.state = {name: ckpt[name] for name in TRAINING_STATE}

    def model(self):
        """(the model with the saved weights, a LoRA run's base identity or None). A LoRA run's
        base is rebuilt (download cache or folder) and its adapters loaded unmerged; a full run's
        weights are all in the checkpoint: no download."""
        if "lora" in self.ckpt:
            return lora_model_from_checkpoint(self.ckpt, self.path), self.ckpt["lora"]["base"]
        return model_from_checkpoint(self.ckpt, self.path), None

    def restore(self, optimizer, scaler, device):
        """Load the optimizer's, the grad scaler's and the random generators' saved states."""
        optimizer.load_state_dict(self.ckpt["optimizer"])
        if scaler.is_enabled() and self.ckpt.get("scaler"):
            scaler.load_state_dict(self.ckpt["scaler"])
        torch.set_rng_state(self.ckpt["rng"]["torch"])
        if device.type == "cuda" and self.ckpt["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(self.ckpt["rng"]["cuda"])

    def dpo_reference(self, split, n_pairs):
        """A DPO run's reference log-probs of the n_pairs pairs of split ("train" or "val")."""
        saved = (self.ckpt.get("dpo_reference") or {}).get(split)
        if saved is None or len(saved) != n_pairs:
            raise ValueError(f"{self.path} is corrupt: it lacks the reference log-probs of the {split} pairs; start "
                             "the DPO run again")
        return saved


# ----------------------------------------------------------------------------- the model a run starts from


def check_start_model(name_or_path, pretrained):
    """Before the data is read: ValueError (or FileNotFoundError) for a --model train.py cannot
    start from: one that does not exist, a preset without pretrained weights taken as pretrained,
    or a model file taken with random weights (which would throw its weights away)."""
    if name_or_path in PRESETS:
        if pretrained and name_or_path not in HF_REPOS:
            raise ValueError(f"'{name_or_path}' has no pretrained weights; start it from random ones with --init "
                             "random")
        return
    if not os.path.exists(name_or_path):
        raise FileNotFoundError(f"--model {name_or_path} does not exist; give a preset ({', '.join(PRESETS)}), a "
                                "local Hugging Face folder or a model file")
    if os.path.isdir(name_or_path):
        check_folder(name_or_path, weights=pretrained)  # a train.py output folder: its checkpoint is named
    if os.path.isfile(name_or_path) and not pretrained:
        raise ValueError(f"--init random would throw away the weights of the model file {name_or_path}; drop --init "
                         "random to start from them, or give a preset for random weights of its size")


def start_tokenizer(name_or_path, pretrained=True):
    """The tokenizer of the model a run starts from (check_start_model has accepted it): a train.py
    checkpoint's own, GPT-2's for the book's and nanoGPT's files and the GPT-2 presets, a folder's
    tokenizer files, and a preset's from its download (fetched now, with the weights, if missing).
    Random weights of a Llama-family preset need its tokenizer in the download cache all the same."""
    if os.path.isfile(name_or_path):
        obj, kind = read_model_file(name_or_path)
        return tokenizer_from_state(obj.get("tokenizer")) if kind == "train.py" else GPT2
    if os.path.isdir(name_or_path):
        return load_tokenizer(name_or_path)
    if config_for(name_or_path).family == "gpt2":
        return GPT2
    if pretrained:
        return load_tokenizer(hf_folder(name_or_path))
    folder = os.path.join(default_cache_dir(), name_or_path)
    if not os.path.isfile(os.path.join(folder, "tokenizer.json")):
        raise FileNotFoundError(f"random weights of {name_or_path} still need its tokenizer, which is not in "
                                f"{folder}: fetch it once with python hf.py {name_or_path} (the weights come "
                                "too), or give a folder holding the model's config.json and tokenizer files as "
                                "--model FOLDER --init random")
    return load_tokenizer(folder)


def model_file_holds(path):
    """What a model file holds, for train.py's model line: "a train.py checkpoint: step 30, trained
    from tiny's random weights", "the book's GPTModel weights", "nanoGPT's weights"."""
    obj, kind = read_model_file(path)
    if kind != "train.py":
        return "nanoGPT's weights" if kind == "nanogpt" else "the book's GPTModel weights"
    args = obj.get("args") or {}
    what = "LoRA " * ("lora" in obj) + "DPO " * bool(args.get("dpo"))
    start, init = args.get("model"), args.get("init", "pretrained")
    if start is None:  # not written by train.py's save
        return f"a train.py {what}checkpoint"
    source = start if init == "pretrained" and start not in PRESETS else f"{start}'s {init} weights"  # a file, a folder
    return f"a train.py {what}checkpoint: step {obj.get('step')}, trained from {source}"


# ----------------------------------------------------------------------------- model files as --model


def build_start_model(name_or_path, pretrained=True, context_length=None, drop_rate=0.0):
    """build_model, and for a file (load_model_file) its weights, or random ones of its shape."""
    if not os.path.isfile(name_or_path):
        return build_model(name_or_path, pretrained, context_length, drop_rate)
    model = load_model_file(name_or_path, context_length, drop_rate)[0]
    return model if pretrained else GPT(model.config)


def load_model_file(path, context_length=None, drop_rate=0.0, base=None):
    """(model, prompt style or None, tokenizer) of a model file: a train.py checkpoint (best.pt or
    ckpt.pt; LoRA merged, its base looked for in the folder `base` if given; its own tokenizer),
    the state dict the book saves (gpt2-medium355M-sft.pth) or nanoGPT's ckpt.pt (GPT-2's
    tokenizer), with dropout drop_rate and, if given, a shorter context (for GPT-2, the first
    position embeddings)."""
    obj, kind = read_model_file(path)
    if base is not None:
        obj = with_base(obj, base, path)
    style, tokenizer = None, GPT2
    if kind == "nanogpt":
        state, config = nanogpt_state_dict(obj, path)
    elif kind == "train.py":
        model = model_from_checkpoint(obj, path)
        state, config, style = model.state_dict(), dataclasses.asdict(model.config), obj.get("prompt_style")
        tokenizer = tokenizer_from_state(obj.get("tokenizer"))
    else:
        state, config = book_state_dict(obj, path)
    cfg = with_context_length(GPTConfig(**{**config, "drop_rate": drop_rate}), context_length)
    if "wpe.weight" in state:  # GPT-2's learned positions (the Llama family's are rotary)
        state["wpe.weight"] = state["wpe.weight"][:cfg.context_length]
    model = GPT(cfg)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        detail = str(e).strip().splitlines()[-1].strip()
        raise ValueError(f"{path}: its weights do not fit a model of their own shapes ({detail})") from None
    return model, style, tokenizer


def read_model_file(path):
    """(contents, kind) of a model file, kind "train.py", "book" or "nanogpt"; one sentence if it is none."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} is a directory, not a checkpoint file" if os.path.isdir(path)
                                else f"checkpoint {path} does not exist")
    try:  # mmap: reading what a file holds costs no copy of its weights
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # as load_checkpoint: any failure means "not a model file"
        raise ValueError(f"checkpoint {path} is corrupt or not a train.py checkpoint (nor another model file; "
                         f"{type(e).__name__})") from None
    if isinstance(obj, dict) and "model_args" in obj and "model" in obj:  # first: it has a "config" too
        return obj, "nanogpt"
    if isinstance(obj, dict) and "model" in obj and "config" in obj:
        return obj, "train.py"
    if isinstance(obj, dict) and "tok_emb.weight" in obj and "pos_emb.weight" in obj:
        return obj, "book"
    raise ValueError(f"{path} is neither a train.py checkpoint, the book's GPTModel state dict (.pth) "
                     "nor nanoGPT's ckpt.pt")


def model_file_settings(path):
    """{"prompt_style", "context_length"} a model file was trained with (the style None if it
    does not say), without building the model."""
    obj, kind = read_model_file(path)
    try:
        if kind == "nanogpt":
            return {"prompt_style": None, "context_length": obj["model_args"]["block_size"]}
        if kind == "train.py":
            return {"prompt_style": obj.get("prompt_style"), "context_length": obj["config"]["context_length"]}
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path} is corrupt: its config lacks {e}") from None
    return {"prompt_style": None, "context_length": obj["pos_emb.weight"].shape[0]}


def heads_for_width(emb_dim, path):
    """The attention heads of a GPT-2 of width emb_dim (its preset's): a state dict does not say."""
    for preset in PRESETS.values():
        if preset.get("family", "gpt2") == "gpt2" and preset["emb_dim"] == emb_dim:
            return preset["n_heads"]
    raise ValueError(f"{path}: a model of width {emb_dim} is none of GPT-2's sizes, so its number of attention "
                     "heads is unknown")


def book_state_dict(book, path):
    """(our state dict, config) of the book's GPTModel state dict: tok_emb, pos_emb,
    trf_blocks.N.att.W_query/W_key/W_value/out_proj, ff.layers.0/2, norm1/2 (scale, shift),
    final_norm, out_head. Its config comes from the tensor shapes; its attention masks are skipped."""
    vocab_size, emb_dim = book["tok_emb.weight"].shape
    # The book's GPTModel keeps out_head apart from tok_emb; loaded from GPT-2 they start equal,
    # and fine-tuning moves them apart (gpt2-medium355M-sft.pth): then the head stays its own.
    tied = torch.equal(book.get("out_head.weight", book["tok_emb.weight"]), book["tok_emb.weight"])
    n_layers = len({key.split(".")[1] for key in book if key.startswith("trf_blocks.")})
    renamed = {"ln_f.weight": "final_norm.scale", "ln_f.bias": "final_norm.shift"}
    for n in range(n_layers):
        for ours, theirs in (("attn.c_proj", "att.out_proj"), ("mlp.c_fc", "ff.layers.0"),
                             ("mlp.c_proj", "ff.layers.2"), ("ln_1", "norm1"), ("ln_2", "norm2")):
            norm = ours.startswith("ln")
            renamed[f"h.{n}.{ours}.weight"] = f"trf_blocks.{n}.{theirs}.{'scale' if norm else 'weight'}"
            renamed[f"h.{n}.{ours}.bias"] = f"trf_blocks.{n}.{theirs}.{'shift' if norm else 'bias'}"
    try:
        state = {ours: book[theirs] for ours, theirs in renamed.items()}
        state.update({"wte.weight": book["tok_emb.weight"].t(), "wpe.weight": book["pos_emb.weight"]})
        for n in range(n_layers):  # query, key and value: one matrix here
            qkv = [f"trf_blocks.{n}.att.W_{x}." for x in ("query", "key", "value")]
            state[f"h.{n}.attn.c_attn.weight"] = torch.cat([book[w + "weight"] for w in qkv])
            if qkv[0] + "bias" in book:
                state[f"h.{n}.attn.c_attn.bias"] = torch.cat([book[w + "bias"] for w in qkv])
    except KeyError as e:
        raise ValueError(f"{path}: the book's GPTModel state dict lacks {e}") from None
    if not tied:
        state["wte.head"] = book["out_head.weight"].t()
    config = dict(vocab_size=vocab_size, context_length=book["pos_emb.weight"].shape[0], emb_dim=emb_dim,
                  n_layers=n_layers, n_heads=heads_for_width(emb_dim, path),
                  qkv_bias="h.0.attn.c_attn.bias" in state, tied_head=tied)
    return state, config


def nanogpt_state_dict(ckpt, path):
    """(our state dict, config) of nanoGPT's ckpt.pt (model_args and model): the same names under
    "transformer.", nn.Linear layouts; its lm_head is tied to wte, and a model trained with
    bias=False gets zero biases, which compute the same."""
    try:
        args = ckpt["model_args"]
        config = dict(vocab_size=args["vocab_size"], context_length=args["block_size"], emb_dim=args["n_embd"],
                      n_layers=args["n_layer"], n_heads=args["n_head"], qkv_bias=True)
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path}: nanoGPT's model_args lack {e}") from None
    state = {}
    for key, tensor in ckpt["model"].items():
        key = key.removeprefix("_orig_mod.").removeprefix("transformer.")  # _orig_mod.: saved under torch.compile
        if key.endswith(".attn.bias") or key == "lm_head.weight":
            continue  # the causal mask (without flash attention); the head is wte
        state[key] = tensor.t() if key == "wte.weight" else tensor
    if not args.get("bias", True):
        for key, tensor in list(state.items()):
            if key.endswith(".weight") and key not in ("wte.weight", "wpe.weight"):
                state[key.removesuffix("weight") + "bias"] = torch.zeros(tensor.shape[0], dtype=tensor.dtype)
    return state, config


# ----------------------------------------------------------------------------- models for inference


def add_model_args(p):
    """The flags of every script that loads a model for inference: which model, its prompt
    style, the device and int8 weights."""
    p.add_argument("--ckpt", help="a checkpoint written by train.py")
    p.add_argument("--model", help="instead of --ckpt: gpt2, gpt2-medium, gpt2-large, gpt2-xl, a local HF folder, "
                   "or a model file (the book's .pth state dict, nanoGPT's ckpt.pt)")
    p.add_argument("--base", metavar="FOLDER", help="a LoRA --ckpt: the folder its base model moved to "
                   "(checked against the checkpoint's fingerprint)")
    p.add_argument("--prompt-style", choices=list(STYLE_NAMES), help="default: the checkpoint's, else the model's "
                   "chat template if it has one, else alpaca")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--quantize", choices=["int8"], help="int8 weights for the block linears and the output head: "
                   "faster decoding on the CPU")


def check_model_args(ckpt_path=None, model_name=None, base=None):
    """ValueError, before any work, unless the add_model_args flags name one model to load."""
    if (ckpt_path is None) == (model_name is None):
        raise ValueError("give exactly one of --ckpt (a train.py checkpoint) or --model (a preset, a Hugging Face "
                         "folder or a model file)")
    if base is not None and ckpt_path is None:
        raise ValueError("--base goes with a LoRA --ckpt: the folder its base model moved to")
    if model_name in PRESETS and model_name not in HF_REPOS:
        raise ValueError(f"'{model_name}' is a preset without pretrained weights (train.py --init random uses it); "
                         f"give a --ckpt, a preset with pretrained weights ({', '.join(HF_REPOS)}), a local "
                         "folder or a model file")


def load_for_inference(ckpt_path=None, model_name=None, prompt_style=None, device="cpu", quantize=None, base=None):
    """(model in eval mode on device, its TrainedWith, prompt style, tokenizer): a fine-tuned
    checkpoint from train.py (its prompt style unless overridden, and its tokenizer; a LoRA
    checkpoint's base looked for in the folder `base` if given), a preset or a Hugging Face
    folder (its tokenizer files; its own chat template unless a style is given, if it has one:
    default_prompt_style), or a model file (load_model_file: as --model, its TrainedWith
    is empty), its weights prepared for decoding (quantize.prepare_for_decoding;
    quantize="int8": int8 weights)."""
    check_model_args(ckpt_path, model_name, base)
    if ckpt_path is not None:
        ckpt = load_checkpoint(ckpt_path)
        if base is not None:
            ckpt = with_base(ckpt, base, ckpt_path)
        model, style = model_from_checkpoint(ckpt, ckpt_path), prompt_style or ckpt.get("prompt_style", "alpaca")
        tokenizer = tokenizer_from_state(ckpt.get("tokenizer"))
    elif os.path.isfile(model_name):
        model, file_style, tokenizer = load_model_file(model_name)
        ckpt, style = None, prompt_style or file_style or default_prompt_style(tokenizer)
    else:
        ckpt, model, tokenizer = None, build_model(model_name), load_tokenizer(hf_folder(model_name))
        style = prompt_style or default_prompt_style(tokenizer)
    if style not in STYLE_NAMES:
        raise ValueError(f"unknown prompt style '{style}'; choose one of {', '.join(STYLE_NAMES)}")
    if style == CHAT_TEMPLATE and tokenizer.chat_template is None:
        raise ValueError(f"{ckpt_path or model_name} has no chat template for prompt style {CHAT_TEMPLATE}; use "
                         "--prompt-style alpaca, phi3 or none")
    check_vocab(model.config.vocab_size, ckpt_path or model_name, tokenizer)
    return prepare_for_decoding(model.to(device), quantize), trained_with(ckpt), style, tokenizer
