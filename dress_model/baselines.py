"""The two reference points DRESS is measured against, built from the same models and training step.

(a) single compressed networks: train dense, prune row-based to one density, fine-tune — one network per
density (the paper's reference). (b) a width-slimmable network whose widths are fitted so each level holds
as many parameters as the DRESS subnet at the same density.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, replace

from torch.utils.data import DataLoader

from dress_model.models import Architecture, DressModel, create_model
from dress_model.training import StepCallback, TrainConfig, evaluate, train


def pruned_networks(
    arch: Architecture,
    train_loader: DataLoader,
    test_loader: DataLoader,
    dense: TrainConfig,
    finetune: TrainConfig,
    on_step: StepCallback | None = None,
) -> list[tuple[float, int, float]]:
    """Train one dense network, then prune+fine-tune a copy per density; returns (density, params, accuracy)."""
    dense_model = create_model(replace(arch, densities=(1.0,)))
    train(dense_model, train_loader, replace(dense, densities=None, rerank_every=0), on_step)
    rows = []
    for d in arch.densities:
        model = create_model(replace(arch, densities=(d,)))
        model.load_state_dict(copy.deepcopy(dense_model.state_dict()))
        model.rerank()  # magnitude ranking of the trained dense weights, then a fixed mask
        if d < 1.0:
            train(model, train_loader, replace(finetune, densities=None, rerank_every=0), on_step)
        rows.append((d, model.subnet_params(d), evaluate(model, test_loader)[d]))
    return rows


def fit_slim_widths(model: DressModel, targets: list[int], tol: float = 1e-4) -> tuple[float, ...]:
    """Bisect each level's width so its active parameter count matches the target (never exceeds it)."""
    widths = []
    for i, target in enumerate(targets):
        lo, hi = 1e-3, 1.0
        while hi - lo > tol:
            mid = (lo + hi) / 2
            trial = list(model.arch.slim_widths or [1.0] * len(targets))
            trial[i] = mid
            model.set_slim_widths(tuple(trial))
            if model.subnet_params(model.densities[i]) <= target:
                lo = mid
            else:
                hi = mid
        widths.append(lo)
        model.set_slim_widths(tuple(widths + [1.0] * (len(targets) - len(widths))))
    model.set_slim_widths(tuple(widths))
    return tuple(widths)


def slimmable_like(dress: DressModel) -> DressModel:
    """A slimmable twin of a DRESS model with equal parameter count per level."""
    arch = Architecture(**{**asdict(dress.arch), "family": "slimmable", "bn_affine": "per-density"})
    model = create_model(arch)
    fit_slim_widths(model, [dress.subnet_params(d) for d in dress.densities])
    return model
