"""Direct preference optimization (DPO, Rafailov et al. 2023), the step after instruction
fine-tuning in the book's ch07/04: the log-probability of a response given its prompt, the DPO
loss against the reference model's log-probabilities (computed once, before the first step, and
kept), and the metrics TRL logs (rewards, their margin, the reward accuracy). Its data, pairs of a
chosen and a rejected response, is read by data.py. train.py --dpo and eval.py use it.
"""
import dataclasses
import functools
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F

from common import IGNORE_INDEX, Progress
from data import PreferenceDataset, collate_pairs
from prompts import GPT2, turn_end_id

LOGPROB_MODES = ("sum", "mean")  # the paper's and TRL's; the book's notebook takes the mean


# ----------------------------------------------------------------------------- the loss


def response_logprobs(model, inputs, targets, mode="sum"):
    """log p of each row's counted targets (its response and end-of-text) given what comes
    before: their sum, or with mode "mean" their mean per counted target (0 for a row with none)."""
    token_logprobs = -model(inputs, targets, reduction="none")  # per counted target, row-major
    keep = targets != IGNORE_INDEX
    rows = keep.nonzero(as_tuple=True)[0]
    logprobs = torch.zeros(len(targets), device=token_logprobs.device).index_add(0, rows, token_logprobs)
    return logprobs / keep.sum(1).clamp(min=1) if mode == "mean" else logprobs


def dpo_loss(policy, reference, beta):
    """(loss per pair, rewards (B, 2)) from the (B, 2) log-probs of (chosen, rejected) under the
    policy and the reference: eq. 7 of the paper, -log sigmoid(beta * ((pc - rc) - (pr - rr))),
    and the rewards beta * (p - r), as TRL logs them."""
    log_ratios = policy - reference
    losses = -F.logsigmoid(beta * (log_ratios[:, 0] - log_ratios[:, 1]))
    return losses, beta * log_ratios.detach()


@dataclasses.dataclass(frozen=True)
class DPO:
    """The objective train.py optimizes under --dpo, on batches of collate_pairs."""
    beta: float = 0.1
    logprobs: str = "sum"

    def pair_losses(self, model, batch):
        inputs, targets, reference = batch
        policy = response_logprobs(model, inputs, targets, self.logprobs).view(2, -1).t()  # (B, [chosen, rejected])
        return dpo_loss(policy, reference, self.beta)

    def loss(self, model, batch):
        """The summed loss of the batch's pairs (train.py divides by the pairs of the step)."""
        return self.pair_losses(model, batch)[0].sum()

    @staticmethod
    def units(batch):
        """What the loss is averaged over: pairs."""
        return len(batch[2])


def pair_metrics(losses, rewards):
    """{"loss", "chosen_reward", "rejected_reward", "reward_margin", "reward_accuracy"}, means over
    pairs; the accuracy is the share of pairs whose chosen reward is the higher."""
    chosen, rejected = rewards[:, 0].mean().item(), rewards[:, 1].mean().item()
    return {"loss": losses.mean().item(), "chosen_reward": chosen, "rejected_reward": rejected,
            "reward_margin": chosen - rejected,
            "reward_accuracy": (rewards[:, 0] > rewards[:, 1]).float().mean().item()}


@torch.no_grad()
def dpo_metrics(model, loader, device, objective, num_batches=None, autocast=nullcontext):
    """(pair_metrics over the first num_batches batches of loader, the number of pairs), in eval mode."""
    was_training = model.training
    model.eval()
    losses, rewards = [], []
    for i, batch in enumerate(loader):
        if num_batches is not None and i >= num_batches:
            break
        with autocast():
            batch_losses, batch_rewards = objective.pair_losses(model, [t.to(device) for t in batch])
        losses.append(batch_losses.float().cpu())
        rewards.append(batch_rewards.float().cpu())
    model.train(was_training)
    if not losses:
        return {}, 0
    losses, rewards = torch.cat(losses), torch.cat(rewards)
    return pair_metrics(losses, rewards), len(losses)


# ----------------------------------------------------------------------------- the reference


@torch.no_grad()
def reference_logprobs(model, dataset, collate_fn, batch_size, device, mode="sum", autocast=nullcontext,
                       rank=0, world_size=1, progress=None):
    """(N, 2) float32 log-probs of every pair's chosen and rejected response under model, in
    eval mode, without gradient: the reference of a DPO run, computed once before the first
    step. Pairs go by length (little padding); under torchrun each process computes every
    world_size-th and an all-reduce gives all of them to every process. progress: the words of
    a progress line (common.Progress) on this process's batches, if one is wanted."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(dataset)), key=dataset.lengths.__getitem__)[rank::world_size]
    result = torch.zeros(len(dataset), 2)
    starts = range(0, len(order), batch_size)
    with Progress(progress, len(starts)) if progress else nullcontext() as shown:
        for done, start in enumerate(starts, 1):
            rows = order[start:start + batch_size]
            inputs, targets, _ = collate_fn([dataset[i] for i in rows])
            with autocast():
                logprobs = response_logprobs(model, inputs.to(device), targets.to(device), mode)
            result[rows] = logprobs.float().view(2, -1).t().cpu()
            if shown:
                shown.update(done)
    model.train(was_training)
    if world_size > 1:  # each pair was computed by one process; the others hold zeros there
        result = result.to(device)
        dist.all_reduce(result)
        result = result.cpu()
    return result


def pair_report(model, entries, prompt_style, context_length, batch_size, device, reference_model=None,
                beta=0.1, mode="sum", tokenizer=GPT2):
    """eval.py on preference entries (tokenized by the model's tokenizer): with the reference model,
    pair_metrics of the pairs; without, the share of pairs whose chosen response gets the higher
    log-probability."""
    dataset = PreferenceDataset(entries, prompt_style, tokenizer)
    collate_fn = functools.partial(collate_pairs, allowed_max_length=context_length,
                                   pad_token_id=turn_end_id(prompt_style, tokenizer))
    policy = reference_logprobs(model, dataset, collate_fn, batch_size, device, mode)
    report = {"pairs": len(dataset), "logprobs": mode,
              "chosen_more_likely": (policy[:, 0] > policy[:, 1]).float().mean().item()}
    if reference_model is not None:
        reference = reference_logprobs(reference_model, dataset, collate_fn, batch_size, device, mode)
        report.update(beta=beta, **pair_metrics(*dpo_loss(policy, reference, beta)))
    return report
