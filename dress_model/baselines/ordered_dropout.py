"""FjORD's ordered dropout (Horváth et al. 2021): each step trains one width prefix, drawn up to the device's own.

With ``kd`` it is FjORD-KD as Flower's ``baselines/fjord`` trains it: every step first trains the device's
widest level on the labels, and the drawn level (the widest included) then learns from that level's detached
soft predictions alone — cross-entropy against the teacher's probabilities, no label term, temperature 1; both
gradients land before the one optimizer step.
"""

from __future__ import annotations

import random

import torch.nn.functional as F
from torch.utils.data import DataLoader

from dress_model.models import DressModel
from dress_model.training import (
    TrainConfig,
    clip_gradients,
    local_steps,
    logit_view,
    make_optimizer,
)


def train_ordered_dropout(model: DressModel, loader: DataLoader, config: TrainConfig, seed: int = 0,
                          kd: bool = False) -> dict[float, float]:
    """Train for ``config.epochs`` drawing one of ``config.densities`` (the levels up to the device's) per step,
    uniformly with ``seed`` (a device's own draws); returns the last loss seen per level."""
    levels = tuple(sorted(config.densities or model.densities))
    for d in levels:
        model.level_of(d)
    widest = levels[-1]
    rng = random.Random(seed)
    total = local_steps(config.epochs, len(loader))
    optimizer, schedule = make_optimizer(model, config, total)
    view = logit_view(config, model.arch.num_classes)
    losses: dict[float, float] = {}
    step = 0
    model.train()
    while step < total:
        for x, y in loader:
            optimizer.zero_grad(set_to_none=True)
            drawn = rng.choice(levels)
            teacher = None
            if kd:
                model.set_density(widest)
                logits = view(model, x)
                loss = F.cross_entropy(logits, y)
                loss.backward()
                losses[widest] = loss.item()
                teacher = logits.detach().softmax(dim=1)
            model.set_density(drawn)
            loss = F.cross_entropy(view(model, x), y if teacher is None else teacher)
            if teacher is None or drawn != widest:
                losses[drawn] = loss.item()
            loss.backward()
            clip_gradients(model, config.clip_norm)
            optimizer.step()
            schedule.step()
            step += 1
            if step >= total:
                break
    model.eval()
    return losses

