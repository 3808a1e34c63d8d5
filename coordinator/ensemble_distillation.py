"""Server-side ensemble distillation (FedDF, Lin et al. 2020): the round's devices, as an ensemble, teach every
density of the global model on images the server holds, without their labels.

Why: averaging weights mixes what the devices learnt only as far as their weights line up. Where data follows
the device class (the ``profile`` split), the bands only capable devices hold learn only from data leaning to
their classes, and the densities no device trains as its own are never trained as themselves. The devices'
models as they replied, each answering for the data it saw, make a teacher that knows every class; distilling
it on the server's held slice (the one it recalibrates BN on) reaches every band and every density, at no cost
to a device and without a byte more on the wire. Any method: it needs each device's model as it replied (the
method folds one reply into a copy of the round's starting model) and the global model's densities.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dress_model.training import PLAIN, LogitView, Trainable

DISTILL_BATCH = 128  # held images per distillation step
DISTILL_MOMENTUM = 0.9


@dataclass(frozen=True)
class Teacher:
    """One device's model as it replied, at the density it trained, weighted by the examples it trained on."""

    model: Trainable
    density: float
    weight: float
    view: LogitView = PLAIN  # what its loss saw of the logits: HeteroFL's, its own labels only


@torch.no_grad()
def ensemble_predictions(teachers: Sequence[Teacher], images: torch.Tensor) -> torch.Tensor:
    """The ensemble's class probabilities per image: each teacher's softmax (through its view, with its BN
    statistics) averaged with its weight."""
    total = sum(t.weight for t in teachers)
    if not teachers or total <= 0:
        raise ValueError("ensemble distillation needs at least one teacher with a positive weight")
    mean = None
    for t in teachers:
        t.model.eval()
        t.model.set_density(t.density)
        probabilities = F.softmax(t.view(t.model, images), dim=1) * (t.weight / total)
        mean = probabilities if mean is None else mean + probabilities
    return mean


def distill(model: Trainable, targets: torch.Tensor, images: torch.Tensor, steps: int, lr: float,
            seed: int) -> list[float]:
    """``steps`` SGD steps of ``model`` towards ``targets`` (class probabilities per image): each step a batch of
    ``images`` drawn at random, and the mean over every density of KL(targets || subnet). The losses per step.
    BN trains on batch statistics; the caller recalibrates it afterwards, as after every aggregation."""
    if len(targets) != len(images):
        raise ValueError(f"need one target per image: {len(targets)} targets, {len(images)} images")
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=DISTILL_MOMENTUM)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    losses = []
    for _ in range(steps):
        batch = torch.randint(len(images), (min(DISTILL_BATCH, len(images)),), generator=generator)
        optimizer.zero_grad(set_to_none=True)
        loss = torch.zeros(())
        for d in model.densities:
            model.set_density(d)
            kl = F.kl_div(F.log_softmax(model(images[batch]), dim=1), targets[batch], reduction="batchmean")
            (kl / len(model.densities)).backward()
            loss += kl.detach() / len(model.densities)
        optimizer.step()
        losses.append(loss.item())
    return losses
