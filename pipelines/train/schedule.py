"""Optimizers, learning-rate schedules and early stopping (the FAQ's questions: which optimizer, which rate,
warmup, when to stop)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import tf_keras as keras


def make_optimizer(name: str, learning_rate: float, momentum: float) -> keras.optimizers.Optimizer:
    """sgd | momentum | nesterov | adam | adadelta | rmsprop | adagrad."""
    opt = keras.optimizers
    if name == "sgd":
        return opt.SGD(learning_rate)
    if name in ("momentum", "nesterov"):
        return opt.SGD(learning_rate, momentum=momentum, nesterov=name == "nesterov")
    if name == "adam":
        return opt.Adam(learning_rate)
    if name == "adadelta":
        return opt.Adadelta(learning_rate)
    if name == "rmsprop":
        return opt.RMSprop(learning_rate)
    if name == "adagrad":
        return opt.Adagrad(learning_rate)
    raise ValueError(f"unknown optimizer {name!r}")


@dataclass
class LearningRate:
    """Linear warmup from `base` to `peak` (= base x workers), then constant, cosine or reduce-on-plateau."""

    base: float
    peak: float
    kind: str
    epochs: int
    warmup_epochs: int
    steps_per_epoch: int
    plateau_factor: float = 1.0  # multiplied by 0.5 on each plateau
    best_val_loss: float = math.inf
    epochs_without_improvement: int = 0
    finetune_from: int = 0  # transfer learning: from this epoch on (the backbone unfrozen), the rate is multiplied
    finetune_factor: float = 1.0  # by this factor; finetune_from 0 = never

    def at(self, epoch: int, step: int) -> float:
        factor = self.finetune_factor if self.finetune_from and epoch >= self.finetune_from else 1.0
        return factor * self._scheduled(epoch, step)

    def _scheduled(self, epoch: int, step: int) -> float:
        if epoch < self.warmup_epochs:
            done = (epoch * self.steps_per_epoch + step) / max(1, self.warmup_epochs * self.steps_per_epoch)
            return self.base + (self.peak - self.base) * done
        if self.kind == "cosine":
            span = max(1, self.epochs - self.warmup_epochs)
            progress = (epoch - self.warmup_epochs + step / max(1, self.steps_per_epoch)) / span
            return self.peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        if self.kind == "plateau":
            return self.peak * self.plateau_factor
        return self.peak

    def observe(self, val_loss: float, patience: int = 2) -> None:
        """Reduce-on-plateau bookkeeping: halve the rate after `patience` epochs without improvement."""
        if val_loss < self.best_val_loss - 1e-4:
            self.best_val_loss, self.epochs_without_improvement = val_loss, 0
        else:
            self.epochs_without_improvement += 1
            if self.kind == "plateau" and self.epochs_without_improvement >= patience:
                self.plateau_factor *= 0.5
                self.epochs_without_improvement = 0


@dataclass
class BestEpoch:
    """The epoch with the lowest val_loss so far, and how many epochs have passed without an improvement."""
    epoch: int | None = None
    val_loss: float = math.inf
    stale: int = 0

    def observe(self, epoch: int, val_loss: float) -> bool:
        """Record an epoch's val_loss; True when it improves on the best by more than 1e-4."""
        if val_loss < self.val_loss - 1e-4:
            self.epoch, self.val_loss, self.stale = epoch, val_loss, 0
            return True
        self.stale += 1
        return False
