"""Fine-tune GPT-2, or Qwen3, Llama 3.2, SmolLM2 and Qwen2.5 with their own tokenizer and chat
template, to follow instructions (or go on training on raw text), nanoGPT style: all the weights,
LoRA adapters (--lora-rank) or preference tuning (--dpo), through one loop.

    python train.py --data instruction-data.json                 # the chapter's run: gpt2, 2 epochs
    python train.py --model qwen3-0.6b --mask-instructions --out out/qwen3   # in Qwen3's chat template
    python train.py --model tiny --init random --context-length 128 --max-steps 50 --out runs/smoke
    python train.py --resume --out out                           # continue a stopped run
    torchrun --nproc_per_node=2 train.py ...                     # DistributedDataParallel
    python train.py --dpo --model out/best.pt --data instruction-data-with-preference.json --out out/dpo

Writes OUT/metrics.jsonl (a line per evaluation) and, with matplotlib, OUT/loss.png at every
evaluation (plot.py draws it again at any time); OUT/ckpt.pt (the whole training state,
resumable) every --save-every steps, at the end of each epoch and of the run, and on Ctrl-C;
OUT/best.pt (the weights of the lowest validation loss, for generate.py, eval.py and export.py)
at the same times. One run at a time: a run holds OUT's lock until it ends.
"""
import common  # noqa: F401  (first: Ctrl-C while torch loads is one line, see common.py)
import argparse
import contextlib
import dataclasses
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

from checkpoint import (SavedRun, best_checkpoint, build_base, build_start_model, check_start_model, model_file_holds,
    model_file_settings, save_checkpoint, start_tokenizer, training_checkpoint, training_record, weights)
from common import (AT_LEAST_0, AT_LEAST_1, NON_NEGATIVE, POSITIVE, SEED, StatusLine, check_writable_folder, checked,
    duration, hold_folder, plural, remove_stale_temporaries, run_main)
from data import (TEST_FRAC, TRAIN_FRAC, batch_indices, check_batchable, check_same_data, count_unweighted_turns,
    preference_splits, prepare_data, split_fractions, summarize_data, summarize_pairs)
from decoding import generate
from dpo import DPO, LOGPROB_MODES, dpo_metrics, reference_logprobs
from lora import ALL_LORA_TARGETS, LLAMA_LORA_TARGETS, LORA_TARGETS, add_lora, lora_settings, parameter_counts
from metrics import METRICS, PLOT, Clock, LossPlot, append_metrics, start_metrics
from model import PRESETS, calc_loss_loader
from prompts import STYLE_NAMES, check_vocab, dated, default_prompt_style, prompt_ids, today
from step import SFT, autocast_for, count_tokens, join_process_group, lr_at, make_optimizer, pick_device, train_step

# What a resumed run may change (besides --out and --resume); everything else comes from the checkpoint's settings.
# The optimizer's settings may change (say a lower --lr after a NaN); the data order and batches may not.
CHANGEABLE_ON_RESUME = ("epochs", "max_steps", "lr", "warmup_steps", "lr_schedule", "weight_decay", "grad_clip",
                        "eval_every", "eval_batches", "save_every", "device", "dtype", "compile", "num_workers")
OUTPUTS = ("ckpt.pt", "best.pt", METRICS, PLOT)  # what a run writes in OUT
# Seconds between progress lines: rewritten in place on a terminal, appended to a log (kept short).
PROGRESS_EVERY = {"terminal": 2.0, "log": 10.0}
# The book's DPO settings (ch07/04), the defaults of these flags under --dpo.
DPO_DEFAULTS = {"lr": 5e-6, "weight_decay": 0.01, "epochs": 1}
FRACTION = checked(float, lambda v: 0 <= v < 1, "in [0, 1)")


def main(argv=None):
    """The run, in the order of this file's sections: the arguments, the run opened (or resumed) in
    OUT, the data, the model and its optimizer, the loop, the end."""
    args, given = parse_args(argv)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    first_process = os.environ.get("RANK", "0") == "0"
    check_writable_folder(args.out)  # before the data, the model and any download
    # the first process holds OUT's lock until the run ends: a second run into OUT (or --resume of
    # a running run) is refused at once, naming this one; a kill -9 releases it
    with hold_folder(args.out, "train.py") if first_process else contextlib.nullcontext():
        try:
            args, saved = open_run(args, given, world_size, first_process)  # before torchrun's processes meet
            tokenizer = run_tokenizer(args, saved)
            device = pick_device(args.device)
            autocast = autocast_for(device, args.dtype)
            # the run's chat template renders as on the day it started (Llama 3.2's writes the date)
            with dated(args.template_date):
                splits = load_splits(args, saved, world_size, tokenizer)
                rank, world_size = join_process_group(device)
                run = Run(args, device, rank, world_size, splits, autocast=autocast)
                run.log(summarize_data(splits, args.batch_size, args.context_length))
                if args.dpo:
                    run.log(summarize_pairs(splits, args.context_length))
                build_model(run, saved)
                if not describe_run(run, saved):
                    return  # nothing to do
                if args.dpo:
                    set_reference(run, saved)
                start_outputs(run, saved)
                finish(run, saved, interrupted=train_until_stopped(run))
        except KeyboardInterrupt:  # before the loop, or a second Ctrl-C: nothing (more) to save
            interrupted_unsaved(args.out, first_process)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()


# ----------------------------------------------------------------------------- arguments


def parse_args(argv=None):
    """(the arguments, the names of those given on the command line), with the defaults that
    depend on other flags filled in for a new run (a resumed one takes its checkpoint's)."""
    p = parser()
    args = p.parse_args(argv)
    # Parse again into a namespace already holding a marker: argparse fills in defaults only
    # where a name is missing, so what no longer holds the marker was given.
    marker = object()
    again = p.parse_args(argv, argparse.Namespace(**{name: marker for name in vars(args)}))
    given = {name for name, value in vars(again).items() if value is not marker}
    # flags that mean something only beside another (which a resumed run finds in its checkpoint)
    for flags, needed, what in ((("lora_alpha", "lora_dropout", "lora_targets"), args.lora_rank,
                                 "--lora-rank R (R > 0)"), (("beta", "dpo_logprobs"), args.dpo, "--dpo")):
        if (stray := sorted(given & set(flags))) and not needed and not args.resume:
            p.error(f"{flag(stray[0])} goes with {what}")
    if args.base is not None and not args.resume:
        p.error("--base goes with --resume (the folder a LoRA run's base moved to); a new run's base is --model")
    args.template_date = None  # no flag: the day the run started (open_run), kept in its settings for --resume
    if args.dpo:
        args.mask_instructions = True  # the log-probability of a response given its prompt
        for name, value in DPO_DEFAULTS.items():
            if name not in given:
                setattr(args, name, value)
    elif "max_steps" in given and "epochs" not in given:
        args.epochs = None  # --max-steps decides, as nanoGPT's max_iters (a DPO run keeps its one epoch)
    return args, given


def parser():
    class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
        pass

    p = argparse.ArgumentParser(description=__doc__, formatter_class=Formatter)
    p.add_argument("--model", default="gpt2", help=f"{', '.join(PRESETS)}, a local Hugging Face folder, or "
                   "a model file: a train.py checkpoint (with its tokenizer, and its prompt style and context length "
                   "unless given), the book's GPTModel state dict (.pth) or nanoGPT's ckpt.pt")
    p.add_argument("--init", choices=["pretrained", "random"], default="pretrained",
                   help="start from the pretrained weights (a model file's own) or from random ones (of a preset or "
                   "folder; a Qwen or Llama preset still needs its tokenizer files in the download cache)")
    p.add_argument("--data", default=None, help="instruction data (.json or .jsonl): Alpaca entries, conversations "
                   "(OpenAI's 'messages' or ShareGPT's 'conversations'), or for --dpo preference pairs ('chosen' "
                   "and 'rejected'); or raw text (.txt); by default the chapter's data set (1,100 entries), "
                   "downloaded once into data/")
    p.add_argument("--prompt-style", choices=list(STYLE_NAMES), default=None, help="prompt template: alpaca, phi3, "
                   "none, or chat-template, the model's own (Qwen3, Llama 3.2, ...); by default chat-template for a "
                   "model whose tokenizer has one, else alpaca (GPT-2); a model file: the style it was trained in")
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
    p.add_argument("--dropout", type=FRACTION, default=0.0, help="dropout rate")
    p.add_argument("--lora-rank", type=AT_LEAST_0, default=0, help="LoRA: freeze the model and train low-rank "
                   "adapters of this rank (see README); 0 is full fine-tuning")
    p.add_argument("--lora-alpha", type=POSITIVE, default=256.0,
                   help="LoRA: the adapters' update is scaled by alpha / rank (256 at rank 16: the book's exercise)")
    p.add_argument("--lora-dropout", type=FRACTION, default=0.0, help="LoRA: dropout on the adapters' input")
    p.add_argument("--lora-targets", default=",".join(LORA_TARGETS),
                   type=checked(str, lambda v: set(v.split(",")) <= set(ALL_LORA_TARGETS),
                                f"comma-separated names among {', '.join(LORA_TARGETS)} (any model) or "
                                f"{', '.join(LLAMA_LORA_TARGETS)} (the Llama family)"),
                   help="LoRA: the linears of each block to adapt (attention's qkv and output projections, the "
                   "MLP's in and out; on Qwen and Llama qkv is q,k,v, attn_out o, mlp_in gate,up and mlp_out down, "
                   "which may also be named one by one)")
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
    p.add_argument("--out", default="out", help="folder for checkpoints, metrics and the loss plot; one run at a "
                   "time (a second run into it is refused while the first holds it)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="the weights and AdamW's states are float32 (bfloat16 files are cast up); bfloat16 or float16 "
                   "autocast the forward and backward passes (float16: CUDA only, with a grad scaler)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--resume", action="store_true", help="continue the run saved in OUT/ckpt.pt, with its settings: "
                   f"only {', '.join(flag(name) for name in CHANGEABLE_ON_RESUME)} may change (it says which did), "
                   "and --data may name the same data moved elsewhere")
    p.add_argument("--num-workers", type=AT_LEAST_0, default=0, help="data loader worker processes")
    p.add_argument("--base", metavar="FOLDER", help="with --resume of a LoRA run: the folder its base model moved "
                   "to (checked against the checkpoint's fingerprint)")
    p.add_argument("--group-by-length", action="store_true",
                   help="batch examples of similar length together (less padding), batches in random order")
    return p


def resumed_arguments(args, given, saved):
    """The arguments of a resumed run: the saved run's, except those it may change that were given.
    Changing one of the others (say --batch-size) would break the data position or the schedule.
    --max-steps without --epochs decides alone, as for a new run (a DPO run keeps its epochs, as a
    new one keeps its one epoch). The data may have moved: --data is checked by its content later."""
    settings = saved.settings
    for name in sorted(given - set(CHANGEABLE_ON_RESUME) - {"data", "base", "out", "resume"}):
        if getattr(args, name) != settings.get(name):
            was = "not given (the default)" if settings.get(name) is None else settings.get(name)
            raise ValueError(f"{flag(name)} {getattr(args, name)} differs from the checkpoint's {was}; a resumed run "
                             "keeps its settings (see --resume in --help)")
    changed = {name: getattr(args, name) for name in given & set(CHANGEABLE_ON_RESUME) | {"out", "resume"}}
    if "max_steps" in given and "epochs" not in given and not settings.get("dpo"):
        changed["epochs"] = None
    known = {name: value for name, value in settings.items() if name in vars(args)}  # not a flag since removed
    resumed = argparse.Namespace(**{**vars(args), **known, **changed})
    # the data: as given, else where the run found it (the default set's path included)
    resumed.data = args.data if "data" in given else saved.trained_with.data or settings.get("data")
    return resumed


def changed_settings(args, settings):
    """"--lr 1e-05 (was 5e-05), ..." for the settings a resumed run changed; "" if none."""
    def shown(value):
        return "no limit" if value is None else value  # --epochs or --max-steps
    return ", ".join(f"{flag(name)} {shown(getattr(args, name))} (was {shown(settings.get(name))})"
                     for name in sorted(CHANGEABLE_ON_RESUME) if getattr(args, name) != settings.get(name))


def flag(name):
    """The command-line flag of an argument's name: max_steps -> --max-steps."""
    return "--" + name.replace("_", "-")


def which_limit(epochs, max_steps, steps_per_epoch):
    """With both --epochs and --max-steps: the sentence saying which ends the run."""
    by_epochs = epochs * steps_per_epoch
    if max_steps < by_epochs:
        return f"--max-steps {max_steps} ends the run, before the end of --epochs {epochs} (step {by_epochs})"
    if by_epochs < max_steps:
        return f"--epochs {epochs} ends the run at step {by_epochs}, before --max-steps {max_steps}"
    return f"--epochs {epochs} and --max-steps {max_steps} both end the run at step {max_steps}"


# ----------------------------------------------------------------------------- open or resume the run in OUT


def open_run(args, given, world_size, first_process):
    """(the run's arguments, the SavedRun to resume or None): a new run in OUT, or the
    continuation of the one saved there. Checked before any process group or download."""
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    saved = None
    if not args.resume:
        if os.path.exists(ckpt_path):
            raise ValueError(f"{ckpt_path} already exists; continue that run with --resume, or choose another --out "
                             "(nothing was overwritten)")
        check_start_model(args.model, args.init == "pretrained")
        if os.path.isfile(args.model):  # a model file (out/sft/best.pt): its prompt style and context length
            settings = model_file_settings(args.model)
            for name in ("prompt_style", "context_length"):
                if name not in given and settings[name] is not None:
                    setattr(args, name, settings[name])
    else:
        if not os.path.exists(ckpt_path):
            raise ValueError(f"nothing to resume: {ckpt_path} does not exist (--resume continues the run saved in "
                             "--out)")
        saved = SavedRun(ckpt_path, args.base)
        args = resumed_arguments(args, given, saved)
        if saved.world_size != world_size:
            raise ValueError(f"{ckpt_path} was trained with {saved.world_size} processes, not {world_size}; "
                             "resume it with as many (the data order depends on it)")
        if args.data is not None and not os.path.isfile(args.data) and "data" not in given:
            raise ValueError(f"this run was trained on {args.data}, which is not there any more; if it moved, "
                             "pass its new path with --resume --data PATH")
    if first_process and (removed := remove_stale_temporaries(args.out, OUTPUTS)):
        print(removed)  # only now: OUT is this run's
    args.template_date = args.template_date or today()  # a resumed run's own (today's for one saved before)
    return args, saved


def run_tokenizer(args, saved):
    """The run's tokenizer: the checkpoint's on --resume, else the start model's (checkpoint.start_tokenizer);
    and the prompt style, when none was given or saved: the tokenizer's chat template if it has one."""
    tokenizer = saved.tokenizer if saved is not None else start_tokenizer(args.model, args.init == "pretrained")
    if args.prompt_style is None:
        args.prompt_style = default_prompt_style(tokenizer)
    return tokenizer


def interrupted_unsaved(out, first_process):
    """Ctrl-C where nothing (more) can be saved: say what OUT holds and exit 130, as after a save."""
    ckpt_path = os.path.join(out, "ckpt.pt")
    if first_process:
        print(f"interrupted: {ckpt_path} holds the last completed save; continue with --resume --out {out}"
              if os.path.exists(ckpt_path) else "interrupted before the first checkpoint: nothing to resume",
              flush=True)
    sys.exit(130)


# ----------------------------------------------------------------------------- the data


def load_splits(args, saved, world_size, tokenizer):
    """The run's data, tokenized by the model's tokenizer; on resume it must be the data the run was
    trained on, wherever it lies now."""
    splits = prepare_data(args.data, args.prompt_style, args.context_length, args.mask_instructions, *args.split,
                          tokenizer=tokenizer)
    if saved is not None:
        check_same_data(splits, saved.trained_with.data_fingerprint, saved.trained_with.data)
    if args.dpo:
        splits = preference_splits(splits, args.context_length)
    check_batchable(splits, args.batch_size * world_size)
    if splits.kind == "text" and args.mask_instructions:
        raise ValueError("--mask-instructions needs instruction data; raw text has no instructions to mask")
    if splits.kind == "text" and tuple(args.split) != (TRAIN_FRAC, TEST_FRAC):
        raise ValueError("--split needs instruction data; raw text is split 90/10 into train and validation")
    if splits.kind == "instruction" and not args.mask_instructions and (unweighted := count_unweighted_turns(
            splits.train_entries + splits.val_entries + splits.test_entries)):
        raise ValueError(f"{splits.path} has {plural(unweighted, 'assistant turn')} of weight 0, which only "
                         "--mask-instructions leaves out of the loss (without it every token counts); add it")
    return splits


# ----------------------------------------------------------------------------- the model and its optimizer


@dataclasses.dataclass
class Run:
    """What the parts of a run share: settings, data, the model and its optimizer, and the
    progress so far. `state` is what a checkpoint saves of the progress (and a resumed run starts from)."""
    args: argparse.Namespace
    device: torch.device
    rank: int
    world_size: int
    splits: object
    raw_model: torch.nn.Module = None  # the model itself; `model` may wrap it (torch.compile, DDP)
    model: torch.nn.Module = None
    optimizer: torch.optim.Optimizer = None
    scaler: torch.amp.GradScaler = None  # float16's, else a disabled one (build_model)
    autocast: object = contextlib.nullcontext
    lora_base: dict = None  # a LoRA run: the identity of its frozen base (checkpoint.build_base)
    dpo: DPO = None  # a DPO run: its objective
    total_steps: int = 0
    batches_per_epoch: int = 0
    steps_per_epoch: int = 0
    state: dict = dataclasses.field(default_factory=lambda: dict(
        step=0, epoch=0, batch_in_epoch=0, tokens_seen=0, elapsed=0.0, best_val_loss=None, val_loss=None))
    saved_step: int = None  # the step OUT/ckpt.pt holds, None before the first save
    best: tuple = None  # (weights, step): a copy of the best weights not yet written to OUT/best.pt
    clock: Clock = dataclasses.field(default_factory=Clock)
    progress: StatusLine = None
    plot: LossPlot = None

    def path(self, name):
        return os.path.join(self.args.out, name)

    def log(self, text):
        if self.rank == 0:
            print(text)

    def time_left(self):
        return self.clock.time_left(self.state["step"], self.total_steps, self.args.eval_every, self.args.save_every,
                                    self.steps_per_epoch)


def build_model(run, saved):
    """The model (GPT-2's weights, random ones, a model file's, or the checkpoint's) on
    run.device, its optimizer and grad scaler, the length of the run, and a resumed run's
    optimizer, random state and progress."""
    args = run.args
    torch.manual_seed(args.seed)
    if saved is not None:  # no download for a full run: the weights are in the checkpoint
        run.raw_model, run.lora_base = saved.model()
    elif args.lora_rank:
        if args.init == "random":
            run.log("warning: LoRA on random weights adapts a model that has learnt nothing; it is meant for "
                    "--init pretrained")
        run.raw_model, run.lora_base = build_base(args.model, args.init == "pretrained", args.seed,
                                                  args.context_length, args.dropout)
        add_lora(run.raw_model, args.lora_rank, args.lora_alpha, args.lora_dropout, args.lora_targets)
    else:
        run.raw_model = build_start_model(args.model, pretrained=args.init == "pretrained",
                                          context_length=args.context_length, drop_rate=args.dropout)
    run.batches_per_epoch = len(batch_indices(run.splits.train.lengths, args.batch_size, shuffle=True, seed=args.seed,
                                              drop_last=True, rank=run.rank, world_size=run.world_size))
    run.steps_per_epoch = math.ceil(run.batches_per_epoch / args.grad_accum)  # a short last step ends an epoch
    run.total_steps = min(run.steps_per_epoch * (args.epochs or math.inf), args.max_steps or math.inf)
    # float32 weights, and so AdamW states, whatever the files hold (Qwen's and Llama's are bfloat16: an
    # update of lr 5e-5 would mostly round away); --dtype bfloat16 autocasts the passes instead
    run.raw_model.to(run.device, torch.float32)
    run.optimizer = make_optimizer(run.raw_model, args.lr, args.weight_decay)
    run.scaler = torch.amp.GradScaler("cuda", enabled=args.dtype == "float16")
    if saved is not None:
        saved.restore(run.optimizer, run.scaler, run.device)
        for group in run.optimizer.param_groups:  # the saved groups bring the saved decay; --resume may change it
            group["weight_decay"] = args.weight_decay
        run.state, run.saved_step = dict(saved.state), saved.state["step"]
    run.model = run.raw_model
    if args.compile:
        run.log("compiling the model with torch.compile: the first steps take a minute or so")
        run.model = torch.compile(run.raw_model)
    if run.world_size > 1:
        run.model = DDP(run.model, device_ids=[run.device.index] if run.device.type == "cuda" else None)
    check_vocab(run.raw_model.config.vocab_size, args.model, run.splits.tokenizer)
    if args.dpo:
        run.dpo = DPO(args.beta, args.dpo_logprobs)


def describe_run(run, saved):
    """Say what the run holds and is about to do: a resumed run's position and changes, the
    model, the batch, the steps. False when nothing is left to do."""
    args, state = run.args, run.state
    if saved is not None:
        run.log(f"resuming {run.path('ckpt.pt')} at step {state['step']} (epoch {state['epoch'] + 1}, "
                f"batch {state['batch_in_epoch']} of {run.batches_per_epoch})")
        if changes := changed_settings(args, saved.settings):
            run.log(f"changed since the checkpoint: {changes}")
    trainable, total = parameter_counts(run.raw_model)
    if saved is not None:
        holds = f"resumed at step {state['step']}"
    else:
        holds = model_file_holds(args.model) if os.path.isfile(args.model) else f"{args.init} weights"
    lora = ""
    if args.lora_rank:  # the layers adapted: on the Llama family, qkv names q, k and v
        lora = f", LoRA rank {args.lora_rank} on {','.join(lora_settings(run.raw_model)['targets'])}"
    run.log(f"model {args.model} ({holds}): {total / 1e6:.1f}M parameters, {trainable / 1e6:.2f}M trainable{lora}; "
            f"context {run.raw_model.config.context_length}, on {run.device} ({args.dtype})")
    run.log(f"global batch {args.batch_size * run.world_size * args.grad_accum} = batch size {args.batch_size} x "
            f"{plural(run.world_size, 'process', 'processes')} x grad accum {args.grad_accum}; "
            f"{plural(run.total_steps, 'optimizer step')} ({run.steps_per_epoch} per epoch)")
    if args.epochs and args.max_steps:
        run.log(which_limit(args.epochs, args.max_steps, run.steps_per_epoch))
    if state["step"] >= run.total_steps:
        run.log(f"nothing to do: the run is at step {state['step']} of {run.total_steps}; raise --epochs or "
                "--max-steps")
        return False
    return True


def set_reference(run, saved):
    """The reference log-probs of every training and validation pair: the checkpoint's on resume,
    else computed once with the starting model (for LoRA, the base), before the first step."""
    splits, args = run.splits, run.args
    if saved is not None:
        for name, dataset in (("train", splits.train), ("val", splits.val)):
            dataset.reference = saved.dpo_reference(name, len(dataset))
        return
    started = time.time()
    for name, dataset in (("train", splits.train), ("validation", splits.val)):
        shown = f"reference log-probs of the {name} pairs, batch" if run.rank == 0 else None
        dataset.reference = reference_logprobs(run.raw_model, dataset, splits.collate_fn, args.batch_size, run.device,
                                               args.dpo_logprobs, run.autocast, run.rank, run.world_size, shown)
    run.log(f"reference log-probs of {len(splits.train)} train and {len(splits.val)} validation pairs, computed once: "
            f"{duration(time.time() - started)}")


# ----------------------------------------------------------------------------- the loop


def start_outputs(run, saved):
    """Before the first step: OUT/metrics.jsonl (a resumed run keeps it up to the checkpoint's
    step), the loss plot, the clock and the progress line."""
    if run.rank == 0:
        start_metrics(run.args.out, saved.state["step"] if saved is not None else None)
    run.clock = Clock(elapsed_before=run.state["elapsed"])
    run.clock.last_eval = (run.clock.started, run.state["tokens_seen"])
    run.progress = StatusLine(sys.stdout, (PROGRESS_EVERY["terminal"], PROGRESS_EVERY["log"]))
    run.plot = LossPlot(run.args.out)


def train_until_stopped(run):
    """train_epochs, with Ctrl-C (or SIGTERM) setting a flag: the loop stops at the next step
    boundary, where rank 0 saves. True if it was stopped so."""
    signalled = threading.Event()

    def on_signal(signum, frame):
        # A second Ctrl-C stops at once, unsaved; not under torchrun, which passes on the first.
        if signalled.is_set() and run.world_size == 1:
            raise KeyboardInterrupt
        signalled.set()

    handlers = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return train_epochs(run, signalled.is_set)
    finally:
        run.progress.clear()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def train_epochs(run, stop_requested):
    """Optimizer steps until the last one, or until a stop is requested (Ctrl-C, SIGTERM):
    then True. Evaluates after step 1 and every --eval-every steps, saves every --save-every
    steps and at the end of each epoch."""
    args, state = run.args, run.state
    objective = run.dpo or SFT
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
                                                     objective.units)
            if stop:
                return True
            lr = lr_at(state["step"], args, run.total_steps)
            for group in run.optimizer.param_groups:
                group["lr"] = lr
            loss = train_step(run.model, run.optimizer, micro_batches, n_targets, run.world_size, run.autocast,
                              run.scaler, args.grad_clip, objective.loss)
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
            run.clock.steps += 1

            last = state["step"] == run.total_steps
            if run.rank == 0:
                # The chapter's code evaluates after the first step, then every eval_every steps; so do
                # we, and after the last step.
                if (state["step"] - 1) % args.eval_every == 0 or last:
                    log_evaluation(run, epoch, lr)
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


def make_loader(dataset, splits, **kwargs):
    # A private generator: a DataLoader draws a seed from the global RNG for every iterator
    # otherwise, which would shift dropout masks between a resumed and an uninterrupted run.
    return DataLoader(dataset, collate_fn=splits.collate_fn, generator=torch.Generator(), **kwargs)


def ignore_sigint(worker_id):
    """DataLoader workers leave Ctrl-C to the main process, which finishes its step and saves."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# ----------------------------------------------------------------------------- evaluations and saves


def log_evaluation(run, epoch, lr):
    """One evaluation: the losses (estimate_losses), a line on the terminal and in
    metrics.jsonl, the loss plot; a copy of the weights when the validation loss is the best."""
    state, clock = run.state, run.clock
    now = time.time()
    tokens_per_s = clock.tokens_per_s(state["tokens_seen"], now)
    train_loss, val_loss, logged = estimate_losses(run)
    clock.evals, clock.eval_seconds = clock.evals + 1, clock.eval_seconds + time.time() - now
    left, rest_started = run.time_left(), time.time()  # the time left counts this evaluation's losses already
    run.progress.clear()
    rewards = (f" | reward margin {logged['train_reward_margin']:.3f} / {logged['val_reward_margin']:.3f}, accuracy "
               f"{logged['train_reward_accuracy']:.0%} / {logged['val_reward_accuracy']:.0%}" if run.dpo else "")
    print(f"epoch {epoch} step {state['step']}/{run.total_steps} | train loss {train_loss:.3f} | "
          f"val loss {val_loss:.3f}{rewards} | {state['tokens_seen']:,} tokens seen | "
          f"{tokens_per_s:,.0f} tokens/s | {duration(left)} left", flush=True)
    append_metrics(run.args.out, dict(step=state["step"], epoch=epoch, train_loss=train_loss, val_loss=val_loss,
                                      **logged, tokens_seen=state["tokens_seen"], lr=lr,
                                      elapsed=round(clock.elapsed(now), 3)))
    run.plot.update()
    if state["best_val_loss"] is None or val_loss < state["best_val_loss"]:
        state["best_val_loss"] = val_loss
        # Written to best.pt at the next save; until then a copy (on the CPU) keeps them.
        best = weights(run.raw_model, run.lora_base)
        best["model"] = {k: v.detach().to("cpu", copy=True) for k, v in best["model"].items()}
        run.best = (best, state["step"])
    state["val_loss"] = val_loss
    clock.last_eval = (time.time(), state["tokens_seen"])
    clock.eval_seconds += clock.last_eval[0] - rest_started


def estimate_losses(run):
    """(train loss, validation loss, DPO's metrics to log or {}) on the first eval_batches global
    batches of each split: the loss, or the DPO loss, rewards, margin and accuracy of the pairs."""
    args, splits = run.args, run.splits
    loaders = [make_loader(split, splits, batch_size=args.batch_size) for split in (splits.train, splits.val)]
    n_batches, logged = args.eval_batches * run.world_size, {}
    if run.dpo:
        (train_dpo, n_train), (val_dpo, n_val) = (
            dpo_metrics(run.raw_model, loader, run.device, run.dpo, n_batches, run.autocast) for loader in loaders)
        train_loss, val_loss = train_dpo.get("loss", math.nan), val_dpo.get("loss", math.nan)
        logged = {f"{split}_{name}": value for split, values in (("train", train_dpo), ("val", val_dpo))
                  for name, value in values.items() if name != "loss"}
    else:
        with run.autocast():
            (train_loss, n_train), (val_loss, n_val) = (
                calc_loss_loader(run.raw_model, loader, run.device, n_batches) for loader in loaders)
    for what, value, count in (("training", train_loss, n_train), ("validation", val_loss, n_val)):
        if count and not math.isfinite(value):  # no count: nothing to evaluate (all masked), not divergence
            raise diverged(run, what, value, run.state["step"])
    return train_loss, val_loss, logged


def save_run(run):
    """OUT/ckpt.pt, everything a resumed run needs; and OUT/best.pt, the weights of the lowest
    validation loss, when they changed since the last save (checkpoint.py says what each holds).
    Both through a temporary name."""
    args, state = run.args, run.state
    started = time.time()
    state["elapsed"] = run.clock.elapsed(started)
    record = training_record(run.raw_model, run.splits, vars(args), state["step"], run.world_size)
    if run.best is not None:
        best_weights, best_step = run.best
        save_checkpoint(best_checkpoint(record, best_weights, state["best_val_loss"], best_step), run.path("best.pt"))
        run.best = None
    schedule = {"schedule": args.lr_schedule, "warmup_steps": args.warmup_steps, "total_steps": run.total_steps}
    reference = {"train": run.splits.train.reference, "val": run.splits.val.reference} if run.dpo else None
    save_checkpoint(training_checkpoint(record, weights(run.raw_model, run.lora_base), run.optimizer, run.scaler,
                                        schedule, reference, state, cuda=run.device.type == "cuda"),
                    run.path("ckpt.pt"))
    run.saved_step = state["step"]
    run.clock.saves, run.clock.save_seconds = run.clock.saves + 1, run.clock.save_seconds + time.time() - started


def show_progress(run, loss):
    """The progress line between evaluations: step, the step's loss, tokens/s, time left."""
    tokens_per_s = run.clock.tokens_per_s(run.state["tokens_seen"], time.time())
    # rank 0's share of the mean loss over all processes, scaled to a mean (exact on one process)
    run.progress.show(f"step {run.state['step']}/{run.total_steps} | loss {loss * run.world_size:.3f} | "
                      f"{tokens_per_s:,.0f} tokens/s | {duration(run.time_left())} left")


def diverged(run, what, value, step):
    if run.saved_step is None:
        first = min(run.args.save_every, run.steps_per_epoch, run.total_steps)  # see train_epochs
        saved = f"no checkpoint was written yet (the first is due at step {first})"
    else:
        saved = f"{run.path('ckpt.pt')} holds the last good state, from step {run.saved_step}"
    return ValueError(f"the {what} loss became {value} at step {step}; stopped, {saved}; try a lower --lr, "
                      "or --grad-clip 1")


def sample_text(model, splits, prompt_style, max_new_tokens=50):
    """The model's response to the first validation entry (a continuation of the first validation
    window's first tokens for raw text), greedy, as the chapter's code does at the end of each epoch,
    in the data's tokenizer, up to its first end token."""
    ctx, tokenizer = model.config.context_length, splits.tokenizer
    prompt = splits.val[0][0][:16].tolist() if splits.kind == "text" else \
        prompt_ids(splits.val_entries[0], prompt_style, tokenizer)
    if len(prompt) > ctx:
        return f"(no sample: the prompt of the first validation entry is longer than the context of {ctx})"
    was_training = model.training
    model.eval()
    new = generate(model, [prompt], max_new_tokens, stop_ids=tokenizer.stop_ids)[0]
    model.train(was_training)
    return tokenizer.decode(new) if splits.kind == "text" else tokenizer.decode(new).strip()


# ----------------------------------------------------------------------------- the end


def finish(run, saved, interrupted):
    """After the loop: a save if it was stopped, the last loss plot, and what was done."""
    args, state = run.args, run.state
    if run.rank == 0:
        if interrupted:
            save_run(run)
        if not run.plot.draw():
            print(f"no {run.path(PLOT)}: matplotlib is not installed (pip install matplotlib), then draw it with "
                  f"python plot.py {args.out}")
        if interrupted:
            print(f"interrupted at step {state['step']}: saved {run.path('ckpt.pt')}; "
                  f"continue with --resume --out {args.out}")
        else:
            took = f"{plural(run.clock.steps, 'step')} in {duration(time.time() - run.clock.started)}"
            if saved is not None:  # this process's part, then the whole run's
                took += f" (the run: {plural(state['step'], 'step')} in {duration(state['elapsed'])})"
            print(f"done: {took}; best val loss {state['best_val_loss']:.3f}; checkpoints in {args.out}")
    if interrupted:
        sys.exit(130)


if __name__ == "__main__":
    run_main(main)
