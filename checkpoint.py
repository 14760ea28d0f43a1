"""Our checkpoint format (train.py writes it; generate.py, eval.py and export.py read it): save and
load, the model of a checkpoint, and for a LoRA checkpoint, which holds only the adapters, what it
records of its base so that loading rebuilds the base, checks it, and merges the adapters."""
import os

import torch

from common import atomic_write
from lora import add_lora, base_fingerprint, load_lora_state_dict, lora_settings, lora_state_dict, merge_lora
from model import GPT, PRESETS, GPTConfig, build_model, default_cache_dir


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
