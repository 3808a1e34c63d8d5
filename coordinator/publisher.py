"""Flower's evaluation hook for DRESS: evaluate every density, checkpoint, publish the version, record the round.

``Strategy.start`` calls it with the global ``ArrayRecord`` before round 1 (evaluation only) and after every
round. Publishing makes agents fetch the new version on their next heartbeat; the rounds table is what the
launcher's live view and the simulation report read.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from flwr.app import ArrayRecord, MetricRecord
from torch.utils.data import DataLoader

from coordinator.fleet_strategy import RoundStats
from coordinator.registry.repository import Registry
from coordinator.validation import implausible
from dress_model.checkpoint import save_checkpoint
from dress_model.models import DressModel
from dress_model.training import class_counts, evaluate, overall_accuracy

log = logging.getLogger(__name__)

COLLAPSE_SHARE = 0.5
"""A round whose best subnet falls under this share of the last published one's is not published: agents keep
serving the last good model (a poisoned or diverged round must not reach the fleet)."""


class RoundPublisher:
    """``evaluate_fn`` for ``Strategy.start``: (round, arrays) -> accuracy per density, as a MetricRecord."""

    def __init__(self, model: DressModel, registry: Registry, test: DataLoader, checkpoint_dir: Path | None,
                 stats: Mapping[int, RoundStats], *, first_round: int = 1,
                 published_best: float | None = None,
                 published_state: Callable[[], Mapping[str, torch.Tensor] | None] = lambda: None,
                 final: tuple[int, DataLoader] | None = None, canary: float = 0.0) -> None:
        self.model, self.registry, self.test = model, registry, test
        self.canary = canary  # > 0: a published version goes to this share of the fleet first (staged rollout)
        self.published_state = published_state  # the strategy's averaged model, when it keeps one
        self.final = final  # (the run's last round, the whole evaluation split): that round's model judged on all of it
        self.checkpoint_dir = checkpoint_dir  # None: evaluate and record rounds, publish nothing
        self.stats = stats  # the strategy's, filled while the round trained
        self.offset = first_round - 1  # Flower counts this run's rounds from 1; a resumed run continues the count
        self.published_best = published_best  # best subnet accuracy of the last published version
        self.reference: dict[str, torch.Tensor] = {}  # the last model not withheld, or the run's first: the next
        # round's is judged against it (empty: as a fresh model)

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        start = time.perf_counter()
        averaged = self.published_state() if server_round > 0 else None
        # The strategy's next configure_train loads the round's own arrays back into this shared model.
        self.model.load_state_dict(arrays.to_torch_state_dict() if averaged is None else averaged)
        accuracy = evaluate(self.model, self.test)
        metrics = MetricRecord({f"accuracy-{d:g}": a for d, a in accuracy.items()})
        if server_round == 0:  # the initial (or resumed) model: nothing trained, nothing to publish
            self.reference = self.snapshot()
            return metrics
        server_round += self.offset
        version, published = None, None
        stats = self.stats[server_round]
        if self.final is not None and server_round == self.final[0]:
            stats.final_counts = class_counts(self.model, self.final[1])
            stats.final_accuracy = {d: overall_accuracy(counts) for d, counts in stats.final_counts.items()}
        withheld = stats.withheld or self.withhold_reason(stats, accuracy)
        if withheld:
            stats.withheld = withheld
            log.warning("round %d: model not published: %s", server_round, withheld)
        else:
            self.reference = self.snapshot()
            if self.checkpoint_dir is not None:
                version = f"round-{server_round}"
                path = save_checkpoint(self.model, self.checkpoint_dir / f"{version}.safetensors",
                                       {"round": server_round})
                published = (str(path), self.model.densities)
        stats.server_s += time.perf_counter() - start
        self.registry.record_round(
            server_round,
            {device_id: density for device_id, (_, density) in stats.participants.items()},
            {d: {"accuracy": a} for d, a in accuracy.items()},
            bytes_sent=sum(map(sum, stats.bytes_down.values())),
            bytes_received=sum(map(sum, stats.bytes_up.values())),
            model_version=version,
            details=round_details(stats),
            published=published,  # the version and its round in one transaction: a crash leaves both or neither
            canary=self.canary,
        )
        if published:
            self.published_best = max(accuracy.values())
        return metrics

    def snapshot(self) -> dict[str, torch.Tensor]:
        """A copy of the model's state: the next round loads other arrays into the same model."""
        return {key: value.clone() for key, value in self.model.state_dict().items()}

    def withhold_reason(self, stats: RoundStats, accuracy: Mapping[float, float]) -> str | None:
        """Why this round's model must not reach the fleet, or None: nobody trained it (a new version of the
        same weights would only make every agent download them again), it is not a plausible model of the last
        published one (not finite, BN statistics out of range, weights moved too far), or its accuracy collapsed."""
        if not stats.participants:
            return "no device's update counted this round"
        if reason := implausible(self.reference, self.model.state_dict()):
            return f"implausible against the last published model: {reason}"
        best = max(accuracy.values())
        if self.published_best is not None and best < COLLAPSE_SHARE * self.published_best:
            return f"accuracy collapsed: best subnet {best:.1f}% against {self.published_best:.1f}% last published"
        return None


def round_details(stats: RoundStats) -> dict:
    """The rounds table's JSON details: string keys (densities written as Python writes floats)."""
    return {
        "participants": {name: density for name, density in stats.participants.values()},
        "bytes_down": {str(d): sizes for d, sizes in stats.bytes_down.items()},
        "bytes_up": {str(d): sizes for d, sizes in stats.bytes_up.items()},
        "compute_s": max(stats.compute_s, default=0.0),  # the slowest device
        "device_compute_s": sum(stats.compute_s),  # all devices added up
        "device_macs": sum(stats.macs),  # all devices added up, as they counted what they ran
        **({"final_accuracy": {str(d): a for d, a in stats.final_accuracy.items()},
            "final_class_counts": {str(d): {"correct": c, "seen": n} for d, (c, n) in stats.final_counts.items()}}
           if stats.final_accuracy else {}),
        "server_s": stats.server_s,
        "lr": stats.lr,
        "rejected": stats.rejected,
        "refused": dict(stats.refused),
        "withheld": stats.withheld,
        "wall_s": time.perf_counter() - stats.started,
    }
