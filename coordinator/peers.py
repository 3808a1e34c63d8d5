"""The peers' strategy: HeteroFL, FjORD and the two FedAvg baselines on the DRESS strategy's round plumbing.

Same devices, sampling, rounds, statistics and evaluation as DRESS (``DressStrategy``); what differs is the
model (a width-nested twin with DRESS's parameter count per tier, ``contracts.methods``), which level each
device trains, what travels (the level's channel prefixes, as Flower arrays) and the aggregation: HeteroFL's
counting average — every element averaged, by examples, over the devices whose level holds it; elements nobody
held keep their value. The per-level BN statistics are recomputed on server data after aggregation, which is
HeteroFL's static BN.
"""

from __future__ import annotations

import logging

import torch
from flwr.app import ArrayRecord

from contracts.methods import Method
from coordinator.aggregation import Update
from coordinator.strategy import DressStrategy
from dress_model.baselines.slimmable import level_slices, prefix_tensors
from dress_model.models import DressModel

log = logging.getLogger(__name__)
Slices = dict[str, tuple[slice, ...]]


class WidthStrategy(DressStrategy):
    def __init__(self, method: Method, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.method = method

    def summary(self) -> None:
        log.info("%s strategy: levels %s, fraction %g", self.method.name, self.model.densities, self.fraction)

    def level_for(self, tier: float) -> float | None:
        return self.method.level_for(tier, self.model.densities)

    def payload(self, level: float) -> tuple[Slices, ArrayRecord]:
        slices = level_slices(self.model, level)
        return slices, ArrayRecord(torch_state_dict=prefix_tensors(self.model, slices))

    def reply_template(self, sent: object, record: ArrayRecord) -> dict[str, torch.Tensor]:
        """A peer's device replies the very slices it was sent, trained."""
        return record.to_torch_state_dict()

    def reorder(self, model: DressModel | None = None) -> None:
        """Width-nested levels are channel prefixes in a fixed order: nothing to re-rank."""

    @torch.no_grad()
    def absorb(self, updates: list[Update]) -> None:
        state = self.model.state_dict()
        for key, current in state.items():
            total = torch.zeros_like(current, dtype=torch.float64)
            count = torch.zeros_like(current, dtype=torch.float64)
            for u in updates:
                slices: Slices = u.sent  # type: ignore[assignment]
                if key not in slices or u.num_examples <= 0:
                    continue
                theirs = u.tensors.get(key)
                if theirs is None or tuple(theirs.shape) != tuple(total[slices[key]].shape):
                    continue  # a reply must hold exactly the prefix it was sent
                total[slices[key]] += u.num_examples * theirs.double()
                count[slices[key]] += u.num_examples
            held = count > 0
            if held.any():
                current[held] = (total[held] / count[held]).to(current.dtype)
        self.model.load_state_dict(state)
