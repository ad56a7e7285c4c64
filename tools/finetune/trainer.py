"""transformers' ``Trainer`` with the families' loss written once, token-weighted.

The models' own ``forward(labels=...)`` returns the mean shifted cross-entropy of one micro-batch. A mean of
per-micro-batch means weighs tokens unequally across gradient-accumulation steps and processes, so 2 processes
would not train like 1 at the same global batch. Here the loss is the same shifted cross-entropy (−100 ignored)
summed and divided by Trainer's ``num_items_in_batch`` (the supervised tokens of the whole global batch: every
accumulation step, every process), which makes the update independent of how the batch is split.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import Trainer

from .encode import IGNORE


def shifted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """Σ CE(logits[:, t], labels[:, t+1]) over labels ≠ −100, divided by ``num_items_in_batch`` (default: this
    batch's count): the models' ``forward`` loss when the batch is the whole global batch."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:].to(shift_logits.device)
    total = nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                                        ignore_index=IGNORE, reduction="sum")
    if num_items_in_batch is None:
        num_items_in_batch = shift_labels.ne(IGNORE).sum().clamp(min=1)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def _loss_from_outputs(outputs, labels, num_items_in_batch=None):
    return shifted_cross_entropy(outputs["logits"], labels, num_items_in_batch)


class FinetuneTrainer(Trainer):
    """``Trainer`` with :func:`shifted_cross_entropy` as ``compute_loss_func``."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("compute_loss_func", _loss_from_outputs)
        super().__init__(*args, **kwargs)
        # count supervised tokens over labels[:, 1:], as the shifted loss sees them (the first label is always
        # −100 here anyway: a prompt starts every sample)
        self._loss_shifts_labels = True
