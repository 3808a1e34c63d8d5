"""FjORD's ordered dropout (Horváth et al. 2021): each step trains one width prefix, drawn up to the device's own.

With ``config.distill`` > 0 it is FjORD-KD: every step also trains the device's widest level on the labels and
that level's predictions (detached) teach the drawn one: ``(1 - distill) * CE + distill * KL(widest || drawn)``.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from dress_model.models import DressModel
from dress_model.training import TrainConfig, make_optimizer


def train_ordered_dropout(model: DressModel, loader: DataLoader, config: TrainConfig, seed: int = 0) -> dict[float, float]:
    """Train for ``config.epochs`` drawing one of ``config.densities`` (the levels up to the device's) per step,
    uniformly; returns the last loss seen per level."""
    levels = tuple(sorted(config.densities or model.densities))
    for d in levels:
        model.density_index(d)
    widest = levels[-1]
    rng = random.Random(seed)
    total = max(1, round(config.epochs * len(loader)))
    optimizer, schedule = make_optimizer(model, config, total)
    losses: dict[float, float] = {}
    step = 0
    model.train()
    while step < total:
        for x, y in loader:
            optimizer.zero_grad(set_to_none=True)
            drawn = rng.choice(levels)
            teacher = None
            if config.distill > 0 and drawn != widest:
                model.set_density(widest)
                logits = model(x)
                loss = F.cross_entropy(logits, y)
                loss.backward()
                losses[widest] = loss.item()
                teacher = F.log_softmax(logits.detach(), dim=1)
            model.set_density(drawn)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            losses[drawn] = loss.item()
            if teacher is not None:
                kl = F.kl_div(F.log_softmax(logits, dim=1), teacher, log_target=True, reduction="batchmean")
                loss = (1 - config.distill) * loss + config.distill * kl
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            if step >= total:
                break
    model.eval()
    return losses
