"""One optimizer step of fine-tuning, on one process or several (torchrun): the device and
process group of each process, autocast, AdamW and its learning-rate schedule, the fine-tuning
objective (DPO's is dpo.DPO), and the step itself, exact under gradient accumulation and
DistributedDataParallel. train.py's loop takes these steps."""
import argparse
import contextlib
import math
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from common import IGNORE_INDEX, resolve_device

NO_SCALER = torch.amp.GradScaler("cuda", enabled=False)  # only float16 trains with a grad scaler


# ----------------------------------------------------------------------------- devices and processes


def pick_device(name):
    """The device of this process: --device `name`, and under torchrun cpu or this process's GPU."""
    device = resolve_device(name)
    if "LOCAL_RANK" not in os.environ:
        return device
    if device.type == "mps":
        if name != "auto":
            raise ValueError("torchrun training runs on cpu or cuda, not mps")
        device = torch.device("cpu")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def autocast_for(device, dtype):
    """A function returning the context in which forward passes run: autocast, or nothing for float32."""
    if dtype == "float32":
        return contextlib.nullcontext
    if dtype == "float16" and device.type != "cuda":
        raise ValueError(f"--dtype float16 needs CUDA (it trains with a grad scaler); "
                         f"use bfloat16 or float32 on {device.type}")
    return lambda: torch.autocast(device.type, dtype=getattr(torch, dtype))


def join_process_group(device):
    """(rank, world size): 0 and 1 alone, else this torchrun process joined to its group (NCCL
    on CUDA, one GPU per process; gloo on the CPU)."""
    if "LOCAL_RANK" not in os.environ:
        return 0, 1
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


# ----------------------------------------------------------------------------- the optimizer


def make_optimizer(model, lr, weight_decay):
    """AdamW on every trainable parameter, as the chapter's code. Its fused kernel takes 0.07 s
    a step for gpt2 on this 2-core CPU, the default one 0.5 s (several seconds on a busy machine)."""
    params = [p for p in model.parameters() if p.requires_grad]
    fused = params[0].device.type in ("cpu", "cuda")
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused)


def lr_at(step, args, total_steps):
    """Learning rate of optimizer step `step` (0-based): linear warm-up over args.warmup_steps,
    then args.lr_schedule: constant, or cosine decay to a tenth of args.lr at the last step."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    if args.lr_schedule == "constant":
        return args.lr
    progress = (step - args.warmup_steps) / max(1, total_steps - 1 - args.warmup_steps)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


# ----------------------------------------------------------------------------- one step


def sft_units(batch):
    """What the fine-tuning loss is averaged over: the targets it counts."""
    return (batch[1] != IGNORE_INDEX).sum().item()


def sft_loss(model, batch):
    inputs, targets = batch
    return model(inputs, targets, reduction="sum")


# The objective of fine-tuning, as dpo.DPO is DPO's: the summed loss of a batch, and what it is averaged over.
SFT = argparse.Namespace(loss=sft_loss, units=sft_units)


def count_tokens(micro_batches, device, world_size=1, stop=False, units=sft_units):
    """(units the loss averages over: targets counted, or DPO pairs; padded input tokens; stop
    requested) of one optimizer step, summed over all processes: the one small collective of a
    step when distributed."""
    counts = torch.tensor([sum(units(batch) for batch in micro_batches),
                           sum(batch[0].numel() for batch in micro_batches), int(stop)])
    if world_size > 1:
        counts = counts.to(device)
        dist.all_reduce(counts)
    return counts.tolist()


def train_step(model, optimizer, micro_batches, n_targets, world_size=1, autocast=contextlib.nullcontext,
               scaler=NO_SCALER, grad_clip=0.0, batch_loss=sft_loss):
    """One optimizer step on the mean loss per counted target over micro_batches, a list of
    (inputs, targets), and over all processes: n_targets is their count over all of them. So
    gradient accumulation and N processes with batch B give the update of one batch N * B.
    batch_loss(model, batch) is the summed loss of a batch: DPO's (per pair) instead of SFT's.
    Returns this process's share of that mean loss (the mean loss itself on one process)."""
    device = next(model.parameters()).device
    scale = world_size / max(n_targets, 1)  # DDP averages gradients over processes: undo that
    total = 0.0
    for i, batch in enumerate(micro_batches):
        batch = [t.to(device, non_blocking=True) for t in batch]
        last = i == len(micro_batches) - 1
        # Under DDP, gradients are all-reduced only on the last micro-batch of the step.
        with (model.no_sync() if isinstance(model, DDP) and not last else contextlib.nullcontext()):
            with autocast():
                loss = batch_loss(model, batch) * scale
            scaler.scale(loss).backward()  # a disabled scaler (all but float16) returns the loss as it is
        total += loss.item()
    total /= world_size
    if not math.isfinite(total):
        return total  # the caller stops the run; the weights stay as they were
    scaler.unscale_(optimizer)
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return total
