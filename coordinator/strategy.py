"""The DRESS strategy: each sampled device trains the packed subnet its current budget allows.

A device is sent its packed subnet (``PackedModel.from_dress``: the bands up to its density, the row orders
included) and replies the packed values it trained. The server scatters them back and averages every weight over
the devices that trained it (``coordinator.aggregation``), then re-ranks every row, so each subnet keeps its most
important weights. The round's plumbing is the shared ``FleetStrategy``'s.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord

from contracts.messages import subnet_record, upload_state
from coordinator.aggregation import Update, aggregate
from coordinator.fleet_strategy import FleetStrategy
from dress_model.models import DressModel
from dress_model.packed import PackedModel


class DressStrategy(FleetStrategy):
    def density_for(self, allowed: float) -> float | None:
        """A device trains the density its budget allows: every one of them is a subnet of the backbone."""
        return allowed if allowed in self.model.densities else None

    def payload(self, density: float) -> tuple[PackedModel, ArrayRecord]:
        """What a device training ``density`` is sent: its packed subnet (kept to read its reply)."""
        packed = PackedModel.from_dress(self.model, max_density=density)
        return packed, subnet_record(packed)

    def reply_template(self, sent: object, record: ArrayRecord) -> dict[str, torch.Tensor]:
        """The tensors a device's reply must hold (names, shapes, dtypes), as sent: DRESS's packed upload."""
        return upload_state(sent)  # type: ignore[arg-type]

    def absorb(self, updates: list[Update], model: DressModel | None = None, damped: bool | None = None) -> None:
        """Fold the round's replies into the global model, or ``model`` (``coordinator.aggregation``)."""
        aggregate(model or self.model, updates, self.aggregation, damped=self.damped if damped is None else damped)

    def reorder(self, model: DressModel | None = None) -> None:
        """After the weights moved: re-rank every row, so each subnet keeps its most important weights."""
        (model or self.model).rerank()
