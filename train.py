"""Fine-tune GPT-2 to follow instructions (or go on training it on raw text), nanoGPT style.

    python train.py --data instruction-data.json                 # the chapter's run: gpt2, 2 epochs
    python train.py --model tiny --init random --context-length 128 --max-steps 50 --out runs/smoke
    python train.py --resume --out out                           # continue a stopped run
    python train.py --plot --out out                             # draw out/loss.png from out/metrics.jsonl
    torchrun --nproc_per_node=2 train.py ...                     # DistributedDataParallel
    python train.py --dpo --model out/best.pt --data instruction-data-with-preference.json --out out/dpo

Writes OUT/metrics.jsonl (a line per evaluation) and, with matplotlib, OUT/loss.png at every
evaluation; OUT/ckpt.pt (the whole training state, resumable) every --save-every steps, at the
end of each epoch and of the run, and on Ctrl-C; OUT/best.pt (the weights of the lowest
validation loss, for generate.py, eval.py and export.py) at the same times.
"""
import argparse
import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from checkpoint import (build_base, build_start_model, load_checkpoint, lora_checkpoint, lora_model_from_checkpoint,
    model_file_settings, model_from_checkpoint, run_record, save_checkpoint, with_base)
from common import (AT_LEAST_0, AT_LEAST_1, IGNORE_INDEX, NON_NEGATIVE, POSITIVE, SEED, StatusLine, atomic_write,
    check_writable_folder, checked, duration, plural, remove_stale_temporaries, resolve_device, run_main)
from data import (TEST_FRAC, TRAIN_FRAC, batch_indices, check_batchable, check_same_data, prepare_data, split_fractions,
    summarize_data)
from decoding import generate, respond
from dpo import DPO, LOGPROB_MODES, dpo_metrics, preference_splits, reference_logprobs, summarize_pairs
from lora import LORA_TARGETS, add_lora, parameter_counts
from model import PRESETS, calc_loss_loader
from prompts import PROMPT_STYLES, check_vocab, decode, prompt_ids

# What a resumed run may change; everything else comes from the checkpoint's arguments.
# The optimizer's settings may change (say a lower --lr after a NaN); the data order and batches may not.
CHANGEABLE_ON_RESUME = {"epochs", "max_steps", "eval_every", "eval_batches", "save_every", "device", "dtype",
                        "compile", "num_workers", "out", "resume",
                        "lr", "warmup_steps", "lr_schedule", "weight_decay", "grad_clip"}
OUTPUTS = ("ckpt.pt", "best.pt", "metrics.jsonl", "loss.png")  # what a run writes in OUT
# Seconds between progress lines: rewritten in place on a terminal, appended to a log (kept short).
PROGRESS_EVERY = {"terminal": 2.0, "log": 10.0}
# The book's DPO settings (ch07/04), the defaults of these flags under --dpo.
DPO_DEFAULTS = {"lr": 5e-6, "weight_decay": 0.01, "epochs": 1}


# ----------------------------------------------------------------------------- arguments


def parse_args(argv=None):
    """(the arguments, the names of those given on the command line)."""
    class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
        pass

    p = argparse.ArgumentParser(description=__doc__, formatter_class=Formatter)
    p.add_argument("--model", default="gpt2", help=f"{', '.join(PRESETS)}, a local Hugging Face GPT-2 folder, or "
                   "a model file: a train.py checkpoint (with its prompt style and context length unless given), "
                   "the book's GPTModel state dict (.pth) or nanoGPT's ckpt.pt")
    p.add_argument("--init", choices=["pretrained", "random"], default="pretrained",
                   help="start from GPT-2's weights or from random ones")
    p.add_argument("--data", default=None, help="instruction data (.json or .jsonl, Alpaca layout) or raw "
                   "text (.txt); by default the chapter's data set (1,100 entries), downloaded once into data/")
    p.add_argument("--prompt-style", choices=list(PROMPT_STYLES), default="alpaca", help="prompt template")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    p.add_argument("--context-length", type=AT_LEAST_1, default=1024,
                   help="tokens per sequence; below the model's keeps its first position embeddings")
    p.add_argument("--mask-instructions", action="store_true", help="compute the loss on response tokens only")
    p.add_argument("--split", metavar="TRAIN,TEST", type=split_fractions, default=(TRAIN_FRAC, TEST_FRAC),
                   help="the train and test fractions of instruction data, in file order; the rest is validation")
    p.add_argument("--batch-size", type=AT_LEAST_1, default=8, help="examples per batch (per process)")
    p.add_argument("--grad-accum", type=AT_LEAST_1, default=1, help="batches per optimizer step")
    p.add_argument("--epochs", type=AT_LEAST_1, default=2, help="passes over the training split (--max-steps "
                   "without --epochs: as many as --max-steps takes); 1 under --dpo")
    p.add_argument("--max-steps", type=AT_LEAST_1, default=None, help="stop after this many optimizer steps "
                   "(with --epochs too: at whichever comes first)")
    p.add_argument("--lr", type=POSITIVE, default=5e-5, help="AdamW learning rate; 5e-6 under --dpo")
    p.add_argument("--weight-decay", type=NON_NEGATIVE, default=0.1, help="AdamW weight decay; 0.01 under --dpo")
    p.add_argument("--warmup-steps", type=AT_LEAST_0, default=0, help="steps of linear learning-rate warm-up")
    p.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant",
                   help="after warm-up: constant, or cosine decay to a tenth of --lr at the last step")
    p.add_argument("--grad-clip", type=NON_NEGATIVE, default=0.0, help="clip the gradient norm to this; 0: no clipping")
    p.add_argument("--dropout", type=checked(float, lambda v: 0 <= v < 1, "in [0, 1)"), default=0.0,
                   help="dropout rate")
    p.add_argument("--lora-rank", type=AT_LEAST_0, default=0, help="LoRA: freeze the model and train low-rank "
                   "adapters of this rank (see README); 0 is full fine-tuning")
    p.add_argument("--lora-alpha", type=POSITIVE, default=256.0,
                   help="LoRA: the adapters' update is scaled by alpha / rank (256 at rank 16: the book's exercise)")
    p.add_argument("--lora-dropout", type=checked(float, lambda v: 0 <= v < 1, "in [0, 1)"), default=0.0,
                   help="LoRA: dropout on the adapters' input")
    p.add_argument("--lora-targets", default=",".join(LORA_TARGETS),
                   type=checked(str, lambda v: set(v.split(",")) <= set(LORA_TARGETS),
                                f"comma-separated names among {', '.join(LORA_TARGETS)}"),
                   help="LoRA: the linears of each block to adapt (attention's qkv and output projections, the "
                   "MLP's in and out)")
    p.add_argument("--dpo", action="store_true", help="preference tuning (DPO) on data with 'chosen' and 'rejected' "
                   "responses, from --model (say, an SFT checkpoint) as the reference; the prompt is always masked")
    p.add_argument("--beta", type=POSITIVE, default=0.1, help="DPO: how far the policy may move from the reference "
                   "(the loss is -log sigmoid(beta * (chosen log-ratio - rejected log-ratio)))")
    p.add_argument("--dpo-logprobs", choices=LOGPROB_MODES, default="sum", help="DPO: a response's log-probability "
                   "is the sum over its tokens (the paper, TRL) or their mean (the book's notebook)")
    p.add_argument("--eval-every", type=AT_LEAST_1, default=5, help="evaluate every this many optimizer steps")
    p.add_argument("--eval-batches", type=AT_LEAST_1, default=5,
                   help="batches (of batch size x processes) of each split that an evaluation averages over")
    p.add_argument("--save-every", type=AT_LEAST_1, default=100, help="write OUT/ckpt.pt and OUT/best.pt every this "
                   "many optimizer steps (and at the end of each epoch and of the run, and on Ctrl-C)")
    p.add_argument("--seed", type=SEED, default=123, help="random seed (weights, data order, dropout)")
    p.add_argument("--out", default="out", help="folder for checkpoints, metrics and the loss plot")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="autocast to bfloat16 or float16 (float16: CUDA only, with a grad scaler)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--resume", action="store_true", help="continue the run saved in OUT/ckpt.pt, with its settings: "
                   "only --epochs, --max-steps, --lr, --warmup-steps, --lr-schedule, --weight-decay, --grad-clip, "
                   "--eval-every, --eval-batches, --save-every, --device, --dtype, --compile and --num-workers may "
                   "change (it says which did), and --data may name the same data moved elsewhere")
    p.add_argument("--plot", action="store_true", help="only draw OUT/loss.png from OUT/metrics.jsonl (say, for a "
                   "run trained before matplotlib was installed), then exit")
    p.add_argument("--num-workers", type=AT_LEAST_0, default=0, help="data loader worker processes")
    p.add_argument("--base", metavar="FOLDER", help="with --resume of a LoRA run: the folder its base model moved "
                   "to (checked against the checkpoint's fingerprint)")
    p.add_argument("--group-by-length", action="store_true",
                   help="batch examples of similar length together (less padding), batches in random order")
    args = p.parse_args(argv)
    # Parse again into a namespace already holding a marker: argparse fills in defaults only
    # where a name is missing, so what no longer holds the marker was given.
    marker = object()
    again = p.parse_args(argv, argparse.Namespace(**{name: marker for name in vars(args)}))
    given = {name for name, value in vars(again).items() if value is not marker}
    if args.plot and given - {"plot", "out"}:
        p.error("--plot goes with --out only")
    if "max_steps" in given and "epochs" not in given:
        args.epochs = None  # --max-steps decides, as nanoGPT's max_iters
    lora_flags = sorted(given & {"lora_alpha", "lora_dropout", "lora_targets"})
    if lora_flags and not args.lora_rank and not args.resume:
        p.error(f"--{lora_flags[0].replace('_', '-')} goes with --lora-rank R (R > 0)")
    if args.base is not None and not args.resume:
        p.error("--base goes with --resume (the folder a LoRA run's base moved to); a new run's base is --model")
    dpo_flags = sorted(given & {"beta", "dpo_logprobs"})
    if dpo_flags and not args.dpo and not args.resume:
        p.error(f"--{dpo_flags[0].replace('_', '-')} goes with --dpo")
    if args.dpo:
        args.mask_instructions = True  # the log-probability of a response given its prompt
        for name, value in DPO_DEFAULTS.items():
            if name not in given:
                setattr(args, name, value)
    return args, given


def model_file_arguments(args, given):
    """A new run from a model file (--model out/sft/best.pt) takes its prompt style and context
    length, unless given."""
    settings = model_file_settings(args.model)
    for name in ("prompt_style", "context_length"):
        if name not in given and settings[name] is not None:
            setattr(args, name, settings[name])
    return args


def resume_arguments(args, given, ckpt):
    """The arguments of a resumed run: the checkpoint's, except those it may change. Changing
    one of the others (say --batch-size) would break the data position or the schedule. The
    data may have moved: --data is checked by its content later (check_same_data)."""
    saved = ckpt["args"]
    for name in given - CHANGEABLE_ON_RESUME - {"data"}:
        if getattr(args, name) != saved.get(name):
            was = "not given (the default)" if saved.get(name) is None else saved.get(name)
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)} differs from the checkpoint's "
                             f"{was}; a resumed run keeps its settings (see --resume in --help)")
    kept = (given & CHANGEABLE_ON_RESUME) | {"out", "resume"}  # out: where the checkpoint was found
    if "max_steps" in given:
        kept.add("epochs")  # given too, or None: --max-steps alone decides (parse_args)
    resumed = argparse.Namespace(**{**vars(args), **saved, **{name: getattr(args, name) for name in kept}})
    # the data: as given, else where the run found it (the default set's path included)
    resumed.data = args.data if "data" in given else ckpt.get("data", saved.get("data"))
    return resumed


def changed_settings(args, saved):
    """"--lr 1e-05 (was 5e-05), ..." for the settings a resumed run changed; "" if none."""
    def shown(value):
        return "not given" if value is None else value
    return ", ".join(f"--{name.replace('_', '-')} {shown(getattr(args, name))} (was {shown(saved.get(name))})"
                     for name in sorted(CHANGEABLE_ON_RESUME - {"out", "resume"})
                     if getattr(args, name) != saved.get(name))


def which_limit(epochs, max_steps, steps_per_epoch):
    """With both --epochs and --max-steps: the sentence saying which ends the run."""
    by_epochs = epochs * steps_per_epoch
    if max_steps < by_epochs:
        return f"--max-steps {max_steps} ends the run, before the end of --epochs {epochs} (step {by_epochs})"
    if by_epochs < max_steps:
        return f"--epochs {epochs} ends the run at step {by_epochs}, before --max-steps {max_steps}"
    return f"--epochs {epochs} and --max-steps {max_steps} both end the run at step {max_steps}"


def pick_device(args):
    """The device of this process: --device, and under torchrun cpu or this process's GPU."""
    device = resolve_device(args.device)
    if "LOCAL_RANK" not in os.environ:
        return device
    if device.type == "mps":
        if args.device != "auto":
            raise ValueError("torchrun training runs on cpu or cuda, not mps")
        device = torch.device("cpu")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def join_process_group(device):
    """(rank, world size): 0 and 1 alone, else this torchrun process joined to its group (NCCL
    on CUDA, one GPU per process; gloo on the CPU)."""
    if "LOCAL_RANK" not in os.environ:
        return 0, 1
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def autocast_for(device, dtype):
    """A function returning the context in which forward passes run: autocast, or nothing for float32."""
    if dtype == "float32":
        return contextlib.nullcontext
    if dtype == "float16" and device.type != "cuda":
        raise ValueError(f"--dtype float16 needs CUDA (it trains with a grad scaler); "
                         f"use bfloat16 or float32 on {device.type}")
    return lambda: torch.autocast(device.type, dtype=getattr(torch, dtype))


# ----------------------------------------------------------------------------- one optimizer step


def sft_units(batch):
    """What the SFT loss is averaged over: the targets it counts."""
    return (batch[1] != IGNORE_INDEX).sum().item()


def sft_loss(model, batch):
    inputs, targets = batch
    return model(inputs, targets, reduction="sum")


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
               scaler=None, grad_clip=0.0, batch_loss=sft_loss):
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
            (scaler.scale(loss) if scaler else loss).backward()
        total += loss.item()
    total /= world_size
    if not math.isfinite(total):
        return total  # the caller stops the run; the weights stay as they were
    if scaler:
        scaler.unscale_(optimizer)
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total


def make_optimizer(model, lr, weight_decay):
    """AdamW on every trainable parameter, as the chapter's code. Its fused kernel takes 0.07 s
    a step for gpt2 on this 2-core CPU, the default one 0.5 s (several seconds on a busy machine)."""
    params = [p for p in model.parameters() if p.requires_grad]
    fused = params[0].device.type in ("cpu", "cuda")
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused)


def lr_at(step, args, total_steps):
    """Learning rate of optimizer step `step` (0-based): linear warm-up, then constant or cosine
    decay to a tenth of --lr at the last step."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    if args.lr_schedule == "constant":
        return args.lr
    progress = (step - args.warmup_steps) / max(1, total_steps - 1 - args.warmup_steps)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


# ----------------------------------------------------------------------------- helpers of the loop


def make_loader(dataset, splits, **kwargs):
    # A private generator: a DataLoader draws a seed from the global RNG for every iterator
    # otherwise, which would shift dropout masks between a resumed and an uninterrupted run.
    return DataLoader(dataset, collate_fn=splits.collate_fn, generator=torch.Generator(), **kwargs)


def ignore_sigint(worker_id):
    """DataLoader workers leave Ctrl-C to the main process, which finishes its step and saves."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def sample_text(model, splits, prompt_style, max_new_tokens=50):
    """The model's response to the first validation entry (a continuation of the first validation
    window's first tokens for raw text), greedy, as the chapter's code does at the end of each epoch."""
    ctx = model.config.context_length
    was_training = model.training
    model.eval()
    if splits.kind == "text":
        text = decode(generate(model, [splits.val[0][0][:16].tolist()], max_new_tokens)[0])
    elif len(prompt_ids(splits.val_entries[0], prompt_style)) > ctx:
        text = f"(no sample: the prompt of the first validation entry is longer than the context of {ctx})"
    else:
        text = respond(model, splits.val_entries[:1], prompt_style, max_new_tokens)[0]
    model.train(was_training)
    return text


def plot_losses(metrics_path, png_path):
    """OUT/loss.png: train and validation loss against steps, with tokens seen on a second
    x-axis, as the chapter's plot_losses (for DPO beside the reward margins, as the book's
    second plot). False when matplotlib is not installed."""
    try:
        import matplotlib
        from matplotlib.figure import Figure  # no pyplot: no global state, no window
    except ImportError:
        return False
    with open(metrics_path) as f:
        rows = [json.loads(line) for line in f]
    steps, tokens = [r["step"] for r in rows], [r["tokens_seen"] for r in rows]
    train, val = [r["train_loss"] for r in rows], [r["val_loss"] for r in rows]
    panels = [("loss", train, val)]
    if "train_reward_margin" in rows[0]:  # a DPO run
        panels.append(("reward margin", [r["train_reward_margin"] for r in rows],
                       [r["val_reward_margin"] for r in rows]))
    points = {"marker": "o", "markersize": 3} if len(rows) < 50 else {}  # one evaluation is a point, not a line
    fig = Figure(figsize=(6 * len(panels), 4))
    for ax, (what, train, val) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        ax.plot(steps, train, label=f"training {what}", **points)
        ax.plot(steps, val, linestyle="-.", label=f"validation {what}", **points)
        ax.set_xlabel("optimizer steps")
        ax.set_ylabel(what)
        ax.legend(loc="upper right" if what == "loss" else "upper left")
        top = ax.twiny()  # a second x-axis for tokens seen, aligned by an invisible plot
        top.plot(tokens, train, alpha=0)
        top.set_xlabel("tokens seen")
    fig.tight_layout()
    with atomic_write(png_path) as tmp:
        fig.savefig(tmp, format="png")
    return True


def plot_run(out):
    """python train.py --plot --out OUT: OUT/loss.png drawn from OUT/metrics.jsonl, at any time."""
    metrics_path, png_path = os.path.join(out, "metrics.jsonl"), os.path.join(out, "loss.png")
    if not os.path.isfile(metrics_path):
        raise FileNotFoundError(f"nothing to plot: {metrics_path} does not exist (train.py writes it at every "
                                "evaluation)")
    with open(metrics_path) as f:
        if not f.read().strip():
            raise ValueError(f"nothing to plot: {metrics_path} is empty (the run stopped before its first evaluation)")
    check_writable_folder(out)
    if not plot_losses(metrics_path, png_path):
        raise ValueError("matplotlib is not installed; pip install matplotlib, then run this again")
    print(f"wrote {png_path}")


# ----------------------------------------------------------------------------- setting up the run


@dataclasses.dataclass
class Run:
    """What the parts of a run share: settings, data, model, optimizer and the progress so far.
    `state` is what a checkpoint saves of the progress (and a resumed run starts from)."""
    args: argparse.Namespace
    device: torch.device
    rank: int
    world_size: int
    splits: object
    raw_model: torch.nn.Module  # the model itself; `model` may wrap it (torch.compile, DDP)
    model: torch.nn.Module = None
    optimizer: torch.optim.Optimizer = None
    scaler: object = None
    autocast: object = contextlib.nullcontext
    total_steps: int = 0
    batches_per_epoch: int = 0
    steps_per_epoch: int = 0
    state: dict = dataclasses.field(default_factory=lambda: dict(
        step=0, epoch=0, batch_in_epoch=0, tokens_seen=0, elapsed=0.0, best_val_loss=None, val_loss=None))
    saved_step: int = None  # the step OUT/ckpt.pt holds, None before the first save
    best_weights: dict = None  # a copy of the best weights (weights(run)) not yet written to OUT/best.pt
    best_step: int = None  # and their step
    started: float = dataclasses.field(default_factory=time.time)  # when this process started training
    start_elapsed: float = 0.0  # training time of the run before that (a resumed run)
    steps_run: int = 0  # in this process, for the time left
    eval_seconds: float = 0.0  # time this process spent evaluating, and how many evaluations
    evals_run: int = 0
    save_seconds: float = 0.0  # the same for saves
    saves_run: int = 0
    progress: StatusLine = None
    last_eval: tuple = (0.0, 0)  # (time, tokens seen) of the last evaluation, for tokens/s
    plot_cost: float = 0.0  # seconds the last loss plot took, and when it was drawn
    plotted_at: float = 0.0
    lora_base: dict = None  # a LoRA run: the identity of its frozen base (model.build_base)
    dpo: DPO = None  # a DPO run: its objective

    def path(self, name):
        return os.path.join(self.args.out, name)


def open_run(args, given, world_size):
    """(the run's arguments, the checkpoint to resume or None): a new run in OUT, or the
    continuation of the one saved there. Checked before any process group or download."""
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    if not args.resume:
        if os.path.exists(ckpt_path):
            raise ValueError(f"{ckpt_path} already exists; continue that run with --resume, or choose another --out "
                             "(nothing was overwritten)")
        return args, None
    if not os.path.exists(ckpt_path):
        raise ValueError(f"nothing to resume: {ckpt_path} does not exist (--resume continues the run saved in --out)")
    ckpt = load_checkpoint(ckpt_path)
    if "optimizer" not in ckpt or "args" not in ckpt:
        raise ValueError(f"{ckpt_path} holds no training state (optimizer, data position); it cannot be resumed")
    if args.base is not None:  # a LoRA run whose base folder moved: look for it there from now on
        ckpt = with_base(ckpt, args.base, ckpt_path)
    args = resume_arguments(args, given - {"base"}, ckpt)
    if ckpt.get("world_size", 1) != world_size:
        raise ValueError(f"{ckpt_path} was trained with {ckpt.get('world_size', 1)} processes, not {world_size}; "
                         "resume it with as many (the data order depends on it)")
    if args.data is not None and not os.path.isfile(args.data) and "data" not in given:
        raise ValueError(f"this run was trained on {args.data}, which is not there any more; if it moved, "
                         "pass its new path with --resume --data PATH")
    return args, ckpt


def load_splits(args, ckpt, world_size):
    """The run's data; on resume it must be the data the run was trained on, wherever it lies now."""
    splits = prepare_data(args.data, args.prompt_style, args.context_length, args.mask_instructions, *args.split)
    if ckpt is not None:
        check_same_data(splits, ckpt.get("data_fingerprint"), ckpt.get("data"))
    if args.dpo:
        splits = preference_splits(splits, args.context_length)
    check_batchable(splits, args.batch_size * world_size)
    if splits.kind == "text" and args.mask_instructions:
        raise ValueError("--mask-instructions needs instruction data; raw text has no instructions to mask")
    if splits.kind == "text" and tuple(args.split) != (TRAIN_FRAC, TEST_FRAC):
        raise ValueError("--split needs instruction data; raw text is split 90/10 into train and validation")
    return splits


def build_training(run, ckpt):
    """The model (GPT-2's weights, random ones, or the checkpoint's), its optimizer and the
    progress of a resumed run, on run.device."""
    args = run.args
    if ckpt is not None and "lora" in ckpt:  # the base rebuilt (cache or folder), the adapters loaded
        run.raw_model, run.lora_base = lora_model_from_checkpoint(ckpt, run.path("ckpt.pt")), ckpt["lora"]["base"]
    elif ckpt is not None:
        run.raw_model = model_from_checkpoint(ckpt)  # no download: the weights are in the checkpoint
    run.raw_model.to(run.device)
    run.optimizer = make_optimizer(run.raw_model, args.lr, args.weight_decay)
    run.scaler = torch.amp.GradScaler("cuda") if args.dtype == "float16" else None
    if ckpt is not None:
        run.optimizer.load_state_dict(ckpt["optimizer"])
        for group in run.optimizer.param_groups:  # the saved groups bring the saved decay; --resume may change it
            group["weight_decay"] = args.weight_decay
        if run.scaler and ckpt.get("scaler"):
            run.scaler.load_state_dict(ckpt["scaler"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        if run.device.type == "cuda" and ckpt["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
        run.state = {name: ckpt[name] for name in run.state}
        run.saved_step = ckpt["step"]
    run.model = run.raw_model
    if args.compile:
        if run.rank == 0:
            print("compiling the model with torch.compile: the first steps take a minute or so", flush=True)
        run.model = torch.compile(run.raw_model)
    if run.world_size > 1:
        run.model = DDP(run.model, device_ids=[run.device.index] if run.device.type == "cuda" else None)


def set_reference(run, ckpt, log):
    """The reference log-probs of every training and validation pair: the checkpoint's on resume,
    else computed once with the starting model (for LoRA, the base), before the first step."""
    splits = run.splits
    if ckpt is not None:
        saved = ckpt.get("dpo_reference") or {}
        for name, dataset in (("train", splits.train), ("val", splits.val)):
            if saved.get(name) is None or len(saved[name]) != len(dataset):
                raise ValueError(f"{run.path('ckpt.pt')} is corrupt: it lacks the reference log-probs of the "
                                 f"{name} pairs; start the DPO run again")
            dataset.reference = saved[name]
        return
    started = time.time()
    for dataset in (splits.train, splits.val):
        dataset.reference = reference_logprobs(run.raw_model, dataset, splits.collate_fn, run.args.batch_size,
                                               run.device, run.args.dpo_logprobs, run.autocast, run.rank,
                                               run.world_size)
    log(f"reference log-probs of {len(splits.train)} train and {len(splits.val)} validation pairs, computed once: "
        f"{duration(time.time() - started)}")


# ----------------------------------------------------------------------------- one evaluation, one save


def weights(run):
    """The weights a checkpoint holds: all of them, or for LoRA the adapters alone, with the
    settings and the base's identity (a LoRA checkpoint of gpt2-xl is megabytes)."""
    if run.lora_base is None:
        return {"model": run.raw_model.state_dict()}
    return lora_checkpoint(run.raw_model, run.lora_base)


def save_run(run):
    """OUT/ckpt.pt, everything a resumed run needs; and OUT/best.pt, the weights of the lowest
    validation loss and what inference needs (a third of ckpt.pt: no optimizer state), when
    they changed since the last save. Both through a temporary name."""
    args, state = run.args, run.state
    started = time.time()
    state["elapsed"] = run.start_elapsed + started - run.started
    info = {**run_record(run.raw_model, run.splits, args.prompt_style, args.mask_instructions, args.split),
            "args": vars(args), "step": state["step"], "world_size": run.world_size}
    if run.best_weights is not None:
        save_checkpoint({**info, **run.best_weights, "val_loss": state["best_val_loss"],
                         "best_val_loss": state["best_val_loss"], "step": run.best_step}, run.path("best.pt"))
        run.best_weights = None
    save_checkpoint({
        **info, **weights(run), "optimizer": run.optimizer.state_dict(),
        "scheduler": {"schedule": args.lr_schedule, "warmup_steps": args.warmup_steps, "total_steps": run.total_steps},
        "scaler": run.scaler.state_dict() if run.scaler else None,
        # a DPO run: the reference log-probs, so neither training nor --resume needs the reference model again
        **({"dpo_reference": {"train": run.splits.train.reference, "val": run.splits.val.reference}}
           if run.dpo else {}),
        "rng": {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if run.device.type == "cuda" else []},
        **state,
    }, run.path("ckpt.pt"))
    run.saved_step = state["step"]
    run.save_seconds, run.saves_run = run.save_seconds + time.time() - started, run.saves_run + 1


def evaluate(run, epoch, lr):
    """Losses on the first eval_batches global batches of each split, a line on the terminal and
    in metrics.jsonl, the loss plot; a copy of the weights when the validation loss is the best."""
    args, state = run.args, run.state
    now = time.time()
    tokens_per_s = (state["tokens_seen"] - run.last_eval[1]) / max(now - run.last_eval[0], 1e-9)
    eval_loaders = [make_loader(split, run.splits, batch_size=args.batch_size)
                    for split in (run.splits.train, run.splits.val)]
    n_batches = args.eval_batches * run.world_size
    if run.dpo:  # the DPO loss, rewards, margin and accuracy of the pairs
        (train_dpo, n_train), (val_dpo, n_val) = (
            dpo_metrics(run.raw_model, loader, run.device, run.dpo, n_batches, run.autocast) for loader in eval_loaders)
        train_loss, val_loss = train_dpo.get("loss", math.nan), val_dpo.get("loss", math.nan)
    else:
        with run.autocast():
            (train_loss, n_train), (val_loss, n_val) = (
                calc_loss_loader(run.raw_model, loader, run.device, n_batches) for loader in eval_loaders)
    for what, value, count in (("training", train_loss, n_train), ("validation", val_loss, n_val)):
        if count and not math.isfinite(value):  # no count: nothing to evaluate (all masked), not divergence
            raise diverged(run, what, value, state["step"])
    run.evals_run, run.eval_seconds = run.evals_run + 1, run.eval_seconds + time.time() - now
    left, rest_started = time_left(run), time.time()  # the time left counts this evaluation's losses already
    run.progress.clear()
    rewards, logged = "", {}
    if run.dpo:
        rewards = (f" | reward margin {train_dpo['reward_margin']:.3f} / {val_dpo['reward_margin']:.3f}, "
                   f"accuracy {train_dpo['reward_accuracy']:.0%} / {val_dpo['reward_accuracy']:.0%}")
        logged = {f"{split}_{name}": value for split, values in (("train", train_dpo), ("val", val_dpo))
                  for name, value in values.items() if name != "loss"}
    print(f"epoch {epoch} step {state['step']}/{run.total_steps} | train loss {train_loss:.3f} | "
          f"val loss {val_loss:.3f}{rewards} | {state['tokens_seen']:,} tokens seen | "
          f"{tokens_per_s:,.0f} tokens/s | {duration(left)} left", flush=True)
    with open(run.path("metrics.jsonl"), "a") as f:
        f.write(json.dumps(dict(step=state["step"], epoch=epoch, train_loss=train_loss, val_loss=val_loss, **logged,
                                tokens_seen=state["tokens_seen"], lr=lr,
                                elapsed=round(run.start_elapsed + now - run.started, 3))) + "\n")
    # Redraw the plot unless the last drawing was recent compared to its cost: at most a tenth
    # of the run's time goes to plotting, however short the evaluation interval.
    if time.time() - run.plotted_at >= 10 * run.plot_cost:
        started = time.time()
        plot_losses(run.path("metrics.jsonl"), run.path("loss.png"))
        run.plotted_at, run.plot_cost = time.time(), time.time() - started
    if state["best_val_loss"] is None or val_loss < state["best_val_loss"]:
        state["best_val_loss"] = val_loss
        # Written to best.pt at the next save; until then a copy (on the CPU) keeps them.
        best = weights(run)
        best["model"] = {k: v.detach().to("cpu", copy=True) for k, v in best["model"].items()}
        run.best_weights = best
        run.best_step = state["step"]
    state["val_loss"] = val_loss
    run.last_eval = (time.time(), state["tokens_seen"])
    run.eval_seconds += run.last_eval[0] - rest_started


def count_multiples(after, upto, every, offset=0):
    """How many steps s in (after, upto] have s - offset divisible by `every`."""
    return (upto - offset) // every - (after - offset) // every


def time_left(run):
    """Seconds to the last step: this process's mean time per training step, per evaluation and
    per save so far, times how many of each are still due (see train_epochs for when)."""
    args, step, total = run.args, run.state["step"], run.total_steps
    if step >= total:
        return 0.0
    training = time.time() - run.started - run.eval_seconds - run.save_seconds
    evals = count_multiples(step, total, args.eval_every, offset=1) + ((total - 1) % args.eval_every != 0)
    per_epoch, both = run.steps_per_epoch, math.lcm(args.save_every, run.steps_per_epoch)
    saves = (count_multiples(step, total, args.save_every) + count_multiples(step, total, per_epoch)
             - count_multiples(step, total, both) + (total % args.save_every != 0 and total % per_epoch != 0))
    return (training / max(run.steps_run, 1) * (total - step) + run.eval_seconds / max(run.evals_run, 1) * evals
            + run.save_seconds / max(run.saves_run, 1) * saves)


def show_progress(run, loss):
    """The progress line between evaluations: step, the step's loss, tokens/s, time left."""
    state = run.state
    now = time.time()
    tokens_per_s = (state["tokens_seen"] - run.last_eval[1]) / max(now - run.last_eval[0], 1e-9)
    # rank 0's share of the mean loss over all processes, scaled to a mean (exact on one process)
    run.progress.show(f"step {state['step']}/{run.total_steps} | loss {loss * run.world_size:.3f} | "
                      f"{tokens_per_s:,.0f} tokens/s | {duration(time_left(run))} left")


def diverged(run, what, value, step):
    if run.saved_step is None:
        first = min(run.args.save_every, run.steps_per_epoch, run.total_steps)  # see train_epochs
        saved = f"no checkpoint was written yet (the first is due at step {first})"
    else:
        saved = f"{run.path('ckpt.pt')} holds the last good state, from step {run.saved_step}"
    return ValueError(f"the {what} loss became {value} at step {step}; stopped, {saved}; try a lower --lr, "
                      "or --grad-clip 1")


# ----------------------------------------------------------------------------- the epoch loop


def train_epochs(run, stop_requested):
    """Optimizer steps until the last one, or until a stop is requested (Ctrl-C, SIGTERM):
    then True. Evaluates after step 1 and every --eval-every steps, saves every --save-every
    steps and at the end of each epoch."""
    args, state = run.args, run.state
    while state["step"] < run.total_steps:
        epoch_batches = batch_indices(run.splits.train.lengths, args.batch_size, shuffle=True, seed=args.seed,
                                      epoch=state["epoch"], drop_last=True, group_by_length=args.group_by_length,
                                      rank=run.rank, world_size=run.world_size)
        loader = make_loader(run.splits.train, run.splits, batch_sampler=epoch_batches[state["batch_in_epoch"]:],
                             num_workers=args.num_workers, pin_memory=run.device.type == "cuda",
                             worker_init_fn=ignore_sigint if args.num_workers else None)
        micro_batches = []
        for i, batch in enumerate(loader, start=state["batch_in_epoch"] + 1):
            micro_batches.append(batch)
            if len(micro_batches) < args.grad_accum and i < len(epoch_batches):
                continue
            # the processes agree on a stop in the step's one all-reduce, so all stop at this boundary
            n_targets, n_tokens, stop = count_tokens(micro_batches, run.device, run.world_size, stop_requested(),
                                                     run.dpo.units if run.dpo else sft_units)
            if stop:
                return True
            lr = lr_at(state["step"], args, run.total_steps)
            for group in run.optimizer.param_groups:
                group["lr"] = lr
            loss = train_step(run.model, run.optimizer, micro_batches, n_targets, run.world_size, run.autocast,
                              run.scaler, args.grad_clip, run.dpo.loss if run.dpo else sft_loss)
            micro_batches = []
            epoch = state["epoch"] + 1  # 1-based, for people
            if not math.isfinite(loss):
                raise diverged(run, "training", loss, state["step"] + 1)
            state["step"] += 1
            state["tokens_seen"] += n_tokens
            state["batch_in_epoch"] = i
            end_of_epoch = i == len(epoch_batches)
            if end_of_epoch:
                state["epoch"], state["batch_in_epoch"] = state["epoch"] + 1, 0
            run.steps_run += 1

            last = state["step"] == run.total_steps
            if run.rank == 0:
                # The chapter's code evaluates after the first step, then every eval_every steps; so do
                # we, and after the last step.
                if (state["step"] - 1) % args.eval_every == 0 or last:
                    evaluate(run, epoch, lr)
                elif run.progress.due():  # a clock read a step: the loss is a number already
                    show_progress(run, loss)
                if state["step"] % args.save_every == 0 or end_of_epoch or last:
                    save_run(run)
                if end_of_epoch:
                    run.progress.clear()
                    print(f"epoch {epoch} sample: {sample_text(run.raw_model, run.splits, args.prompt_style)!r}",
                          flush=True)
            if last:
                break
    return False


# ----------------------------------------------------------------------------- the run


def main(argv=None):
    args, given = parse_args(argv)
    if args.plot:
        return plot_run(args.out)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    first_process = os.environ.get("RANK", "0") == "0"
    check_writable_folder(args.out)  # before the data, the model and any download
    args, ckpt = open_run(args, given, world_size)  # mistakes show up before torchrun's processes meet
    if ckpt is None and os.path.isfile(args.model):
        args = model_file_arguments(args, given)
    if first_process and os.path.isdir(args.out):  # only now: OUT is this run's (open_run refuses another's)
        if removed := remove_stale_temporaries(args.out, OUTPUTS):
            print(removed)
    try:
        device = pick_device(args)
        autocast = autocast_for(device, args.dtype)
        splits = load_splits(args, ckpt, world_size)
        rank, world_size = join_process_group(device)
        return train(args, ckpt, splits, device, autocast, rank, world_size)
    except KeyboardInterrupt:  # before the loop, or a second Ctrl-C: nothing (more) to save
        interrupted_unsaved(args.out, first_process)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def interrupted_unsaved(out, first_process):
    """Ctrl-C where nothing (more) can be saved: say what OUT holds and exit 130, as after a save."""
    ckpt_path = os.path.join(out, "ckpt.pt")
    if first_process:
        print(f"interrupted: {ckpt_path} holds the last completed save; continue with --resume --out {out}"
              if os.path.exists(ckpt_path) else "interrupted before the first checkpoint: nothing to resume",
              flush=True)
    sys.exit(130)


def train(args, ckpt, splits, device, autocast, rank, world_size):
    log = print if rank == 0 else (lambda *a, **k: None)
    log(summarize_data(splits, args.batch_size, args.context_length))
    if args.dpo:
        log(summarize_pairs(splits, args.context_length))
    torch.manual_seed(args.seed)
    run = Run(args, device, rank, world_size, splits, raw_model=None, autocast=autocast)
    if ckpt is None and args.lora_rank:
        if args.init == "random":
            log("warning: LoRA on random weights adapts a model that has learnt nothing; it is meant for "
                "--init pretrained")
        run.raw_model, run.lora_base = build_base(args.model, args.init == "pretrained", args.seed,
                                                  args.context_length, args.dropout)
        add_lora(run.raw_model, args.lora_rank, args.lora_alpha, args.lora_dropout, args.lora_targets)
    elif ckpt is None:
        run.raw_model = build_start_model(args.model, pretrained=args.init == "pretrained",
                                          context_length=args.context_length, drop_rate=args.dropout)
    run.batches_per_epoch = len(batch_indices(splits.train.lengths, args.batch_size, shuffle=True, seed=args.seed,
                                              drop_last=True, rank=rank, world_size=world_size))
    run.steps_per_epoch = math.ceil(run.batches_per_epoch / args.grad_accum)  # a short last step ends an epoch
    run.total_steps = min(run.steps_per_epoch * (args.epochs or math.inf), args.max_steps or math.inf)
    build_training(run, ckpt)
    check_vocab(run.raw_model.config.vocab_size, args.model)
    if ckpt is not None:
        log(f"resuming {run.path('ckpt.pt')} at step {run.state['step']} (epoch {run.state['epoch'] + 1}, "
            f"batch {run.state['batch_in_epoch']} of {run.batches_per_epoch})")
        if changes := changed_settings(args, ckpt["args"]):
            log(f"changed since the checkpoint: {changes}")
    trainable, total = parameter_counts(run.raw_model)
    lora = f", LoRA rank {args.lora_rank} on {args.lora_targets}" if args.lora_rank else ""
    log(f"model {args.model} ({args.init} weights): {total / 1e6:.1f}M parameters, {trainable / 1e6:.2f}M "
        f"trainable{lora}; context {run.raw_model.config.context_length}, on {device} ({args.dtype})")
    log(f"global batch {args.batch_size * world_size * args.grad_accum} = batch size {args.batch_size} x "
        f"{world_size} process{'es' if world_size > 1 else ''} x grad accum {args.grad_accum}; "
        f"{plural(run.total_steps, 'optimizer step')} ({run.steps_per_epoch} per epoch)")
    if args.epochs and args.max_steps:
        log(which_limit(args.epochs, args.max_steps, run.steps_per_epoch))
    if run.state["step"] >= run.total_steps:
        log(f"nothing to do: the run is at step {run.state['step']} of {run.total_steps}; "
            "raise --epochs or --max-steps")
        return
    if args.dpo:
        run.dpo = DPO(args.beta, args.dpo_logprobs)
        set_reference(run, ckpt, log)

    # outputs: on resume keep the metrics up to the checkpoint's step, drop any written after it
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        kept = []
        if ckpt is not None and os.path.exists(run.path("metrics.jsonl")):
            with open(run.path("metrics.jsonl")) as f:
                kept = [line for line in f if line.strip() and json.loads(line)["step"] <= run.state["step"]]
        with atomic_write(run.path("metrics.jsonl")) as tmp, open(tmp, "w") as f:
            f.writelines(kept)
    run.started, run.start_elapsed = time.time(), run.state["elapsed"]
    run.last_eval = (run.started, run.state["tokens_seen"])
    run.progress = StatusLine(sys.stdout, (PROGRESS_EVERY["terminal"], PROGRESS_EVERY["log"]))

    # Ctrl-C (or SIGTERM) sets a flag; the loop stops at the next step boundary, where rank 0 saves.
    signalled = threading.Event()

    def on_signal(signum, frame):
        # A second Ctrl-C stops at once, unsaved; not under torchrun, which passes on the first.
        if signalled.is_set() and world_size == 1:
            raise KeyboardInterrupt
        signalled.set()

    handlers = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        interrupted = train_epochs(run, signalled.is_set)
    finally:
        run.progress.clear()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)

    if rank == 0:
        if interrupted:
            save_run(run)
        if not plot_losses(run.path("metrics.jsonl"), run.path("loss.png")):
            print(f"no {run.path('loss.png')}: matplotlib is not installed (pip install matplotlib), then draw it "
                  f"with python train.py --plot --out {args.out}")
        if interrupted:
            print(f"interrupted at step {run.state['step']}: saved {run.path('ckpt.pt')}; "
                  f"continue with --resume --out {args.out}")
        else:
            took = f"{plural(run.steps_run, 'step')} in {duration(time.time() - run.started)}"
            if ckpt is not None:  # this process's part, then the whole run's
                took += f" (the run: {plural(run.state['step'], 'step')} in {duration(run.state['elapsed'])})"
            print(f"done: {took}; best val loss {run.state['best_val_loss']:.3f}; checkpoints in {args.out}")
    if interrupted:
        sys.exit(130)


if __name__ == "__main__":
    run_main(main)
