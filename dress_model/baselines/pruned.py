"""Single compressed networks, the paper's reference: train dense, prune row-based to one density, fine-tune.

One network per density, built from the same models and training step as DRESS.
"""

from __future__ import annotations

import copy
from dataclasses import replace

from torch.utils.data import DataLoader

from dress_model.models import Architecture, create_model
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
