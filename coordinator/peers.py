"""The peers' strategy: HeteroFL, FjORD and the two FedAvg baselines, DRESS's sibling over the shared round plumbing.

Same devices, sampling, rounds, statistics and evaluation as DRESS (``FleetStrategy``); what differs is the
model (a width-nested twin with DRESS's parameter count per density, ``contracts.methods``), which density each
device trains, what travels (its density's channel prefixes, as Flower arrays) and the aggregation: HeteroFL's
counting average — every element averaged over the devices whose density holds it (by examples; HeteroFL's own:
one vote per device, and each class's classifier row only over the devices whose labels hold the class);
elements nobody held keep their value. ``damped`` (a server option every method has) moves an element only by
its holders' share of the round's weight, as DRESS does. The per-density BN statistics are recomputed on server
data after aggregation, which is HeteroFL's static BN.
"""

from __future__ import annotations

import logging

import torch
from flwr.app import ArrayRecord, MetricRecord

from contracts.methods import Method
from coordinator.aggregation import Update
from coordinator.fleet_strategy import FleetStrategy, Sent
from coordinator.validation import RejectedUpdate
from dress_model.baselines.slimmable import Slim, level_slices, prefix_tensors
from dress_model.models import DressModel
from dress_model.training import PLAIN, LogitView

log = logging.getLogger(__name__)
Slices = dict[str, tuple[slice, ...]]


class WidthStrategy(FleetStrategy):
    def __init__(self, method: Method, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.method = method

    def summary(self) -> None:
        log.info("%s strategy: densities %s, fraction %g", self.method.name, self.model.densities, self.fraction)

    def density_for(self, allowed: float) -> float | None:
        return self.method.density_for(allowed, self.model.densities)

    def payload(self, density: float) -> tuple[Slices, ArrayRecord]:
        slices = level_slices(self.model, density)
        return slices, ArrayRecord(torch_state_dict=prefix_tensors(self.model, slices))

    def reply_template(self, sent: object, record: ArrayRecord) -> dict[str, torch.Tensor]:
        """A peer's device replies the very slices it was sent, trained."""
        return record.to_torch_state_dict()

    def reorder(self, model: DressModel | None = None) -> None:
        """Width-nested levels are channel prefixes in a fixed order: nothing to re-rank."""

    def update_of(self, sent: Sent, tensors: dict[str, torch.Tensor], metrics: MetricRecord) -> Update:
        """HeteroFL's reply also names the labels the device trained on; anything but distinct class numbers of
        this model is refused."""
        update = super().update_of(sent, tensors, metrics)
        if not self.method.label_split:
            return update
        classes = list(metrics["classes"]) if "classes" in metrics else None
        num_classes = self.model.arch.num_classes
        if (not isinstance(classes, list) or not classes or len(set(classes)) != len(classes)
                or any(not float(c).is_integer() or not 0 <= c < num_classes for c in classes)):
            raise RejectedUpdate(f"metrics.classes must list the device's labels, distinct integers in "
                                 f"[0, {num_classes}), got {metrics['classes'] if 'classes' in metrics else None!r}",
                                 "malformed")
        update.classes = frozenset(int(c) for c in classes)
        return update

    def head_keys(self) -> set[str]:
        """The classifier's weight and bias: one row per class."""
        heads = [name for name, m in self.model.named_modules() if isinstance(m, Slim) and not m.slim_out]
        return {f"{name}.{field}" for name in heads for field in ("weight", "bias")}

    def teacher_view(self, update: Update) -> LogitView:
        """HeteroFL's device answers for its own labels: the others' logits read 0, as in its loss."""
        if update.classes is None:
            return PLAIN
        mask = torch.zeros(self.model.arch.num_classes, dtype=torch.bool)
        mask[sorted(update.classes)] = True
        return LogitView(mask)

    @torch.no_grad()
    def absorb(self, updates: list[Update], model: DressModel | None = None, damped: bool | None = None) -> None:
        model = model or self.model
        damped = self.damped if damped is None else damped
        votes = {id(u): 1.0 if self.method.per_device else float(u.num_examples) for u in updates
                 if u.num_examples > 0}
        round_weight = sum(votes.values())
        heads = self.head_keys()
        state = model.state_dict()
        for key, current in state.items():
            total = torch.zeros_like(current, dtype=torch.float64)
            count = torch.zeros_like(current, dtype=torch.float64)
            for u in updates:
                slices: Slices = u.sent  # type: ignore[assignment]
                if key not in slices or id(u) not in votes:
                    continue
                theirs = u.tensors.get(key)
                if theirs is None or tuple(theirs.shape) != tuple(total[slices[key]].shape):
                    continue  # a reply must hold exactly the prefix it was sent
                held = torch.zeros_like(total)
                held[slices[key]] = 1.0
                if key in heads and u.classes is not None:  # a class's row: only devices holding the class
                    rows = torch.zeros(current.shape[0], dtype=torch.float64)
                    rows[sorted(u.classes)] = 1.0
                    held *= rows.reshape(-1, *([1] * (current.dim() - 1)))
                value = torch.zeros_like(total)
                value[slices[key]] = theirs.double()
                total += votes[id(u)] * held * value
                count += votes[id(u)] * held
            held = count > 0
            if held.any():
                average = total[held] / count[held]
                share = count[held] / round_weight if damped else 1.0
                current[held] = (current[held].double() + share * (average - current[held].double())).to(current.dtype)
        model.load_state_dict(state)
