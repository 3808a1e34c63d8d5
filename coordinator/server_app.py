"""The Flower ServerApp that runs federated DRESS, in deployment and in simulation alike.

Its settings arrive as Flower run config and are read back into ``RunSettings``. The global model starts as
the strategy's initial ``ArrayRecord`` and ends in Flower's ``Result``; each round is evaluated, checkpointed,
published and recorded in the registry by the evaluation hook (``RoundPublisher``).
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from contracts.messages import train_config
from contracts.methods import get_method
from contracts.settings import Aggregation, RunSettings, build_run_model, stale_after
from coordinator.peers import WidthStrategy
from coordinator.publisher import RoundPublisher
from coordinator.registry import DeviceStatus
from coordinator.registry.repository import Registry
from coordinator.strategy import DressStrategy
from dress_model.checkpoint import CheckpointError, load_checkpoint
from dress_model.data import load_dataset, split_validation
from dress_model.models import DressModel

log = logging.getLogger(__name__)
app = ServerApp()

CALIBRATION_IMAGES = 1024  # server-held slice of the training split that recalibrates BN after aggregation


def wait_for_nodes(grid: Grid, count: int, timeout_s: float = 300.0) -> None:
    """Virtual and real SuperNodes may register after the ServerApp starts."""
    deadline = time.monotonic() + timeout_s
    while len(list(grid.get_node_ids())) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(list(grid.get_node_ids()))} of {count} nodes joined in {timeout_s:.0f} s")
        time.sleep(0.5)


def wait_for_reconnect(grid: Grid, registry: Registry, settings: RunSettings, since: datetime) -> None:
    """A resumed run first waits for the devices heard from around its last round (alive when the coordinator
    stopped) to be back: connected to the SuperLink and heard by the control plane since ``since``. Their
    SuperNodes and heartbeats return at their own pace after a coordinator restart, and rounds started before
    would train on whoever came first (or nobody, and be withheld). It waits two periods after which a silent
    device counts as offline, a minute at least (a SuperNode's reconnect backs off), then goes on regardless."""
    devices = registry.list_devices()
    silence = stale_after(settings.heartbeat_s, len(devices))
    last = registry.list_rounds()[-1].recorded_at - silence
    expected = max(settings.wait_for_nodes, sum(d.last_seen >= last for d in devices))
    deadline = time.monotonic() + max(60.0, 2 * silence.total_seconds())
    while True:
        back = min(len(list(grid.get_node_ids())),
                   sum(d.last_seen >= since and d.status == DeviceStatus.ONLINE for d in registry.list_devices()))
        if back >= expected or time.monotonic() > deadline:
            log.info("resuming with %d of the %d devices expected back", back, expected)
            return
        time.sleep(1.0)


def resume(registry: Registry, model: DressModel) -> tuple[int, float | None]:
    """Continue where this state directory's run stopped: the rounds it recorded, and the best subnet accuracy of
    the last published model, whose weights are loaded into ``model``. (0, None) for a fresh state directory.

    A round is recorded and its model published in one transaction, so the last published checkpoint is the
    model after the last recorded round, or after an earlier one when later rounds were withheld — and a
    withheld round left the model where the published one was, or worse. ValueError when the checkpoint is of
    another architecture than this run's settings (a state directory reused for a different model)."""
    done, version = registry.last_round(), registry.current_model_version()
    path = registry.model_checkpoint(version) if version else None
    if not done or path is None:
        return done, None
    try:
        saved, _ = load_checkpoint(path)
    except CheckpointError as e:
        raise ValueError(f"cannot resume after round {done}: {e}") from None
    if saved.arch != model.arch:
        raise ValueError(f"cannot resume: {path} holds {saved.arch}, these settings build {model.arch}; "
                         "use a new state directory for a different model")
    model.load_state_dict(saved.state_dict())
    best = max((max(m["accuracy"] for m in r.metrics.values()) for r in registry.list_rounds()
                if r.model_version == version and not r.details.get("withheld")), default=None)
    log.info("resuming after round %d from model version %s (%s)", done, version, path)
    return done, best


@app.main()
def main(grid: Grid, context: Context) -> None:
    started = datetime.now(UTC)
    settings = RunSettings.from_run_config(context.run_config)
    state_dir = Path(settings.state_dir)
    torch.manual_seed(settings.seed)
    data_dir = settings.data_dir or None
    train_set = load_dataset(settings.dataset, "train", data_dir)
    kept, held_out = split_validation(len(train_set), settings.validation, settings.seed)
    # Tuning evaluates on training images held out of every shard; a run proper on the test split.
    judged = train_set.subset(held_out) if settings.validation else load_dataset(settings.dataset, "test", data_dir)
    model = build_run_model(settings)
    dress = settings.method == "dress"
    if dress:
        model.grow_from(model.densities[0])
    order = torch.randperm(len(kept), generator=torch.Generator().manual_seed(settings.seed))
    calibration = train_set.subset(kept[order[:CALIBRATION_IMAGES].numpy()]).loader(128, seed=settings.seed)
    test = judged.subset(range(min(settings.eval_examples or len(judged), len(judged))))

    registry = Registry(state_dir=state_dir)  # the coordinator's, saved in its state directory
    try:
        if not dress and registry.last_round():
            raise ValueError(f"{state_dir} holds rounds already: a peer's run starts from a fresh state directory")
        done, published_best = resume(registry, model) if dress else (0, None)
        if done >= settings.num_rounds:
            log.info("all %d rounds are done already (state in %s)", settings.num_rounds, state_dir)
            return
        # A reply may claim no more examples than a device trains on per round (the whole split bounds a shard).
        common = dict(fraction=settings.fraction, min_devices=settings.min_devices, seed=settings.seed,
                      heartbeat_s=settings.heartbeat_s,
                      # the round's rate; DRESS's anchor weight anneals too (a peer's KD weight is as published)
                      round_config=lambda r: {"lr": settings.lr_at(r),
                                              **({"distill": settings.distill_at(r)} if dress else {})},
                      server_momentum=settings.server_momentum, first_round=done + 1, node_auth=settings.node_auth,
                      aggregation=Aggregation.parse(settings.aggregation), round_timeout_s=settings.round_timeout_s,
                      server_average=settings.server_average, damped=settings.damped,
                      server_distill=settings.server_distill,
                      max_examples=settings.max_examples or len(train_set))
        strategy = (DressStrategy(model, registry, calibration, **common) if dress
                    else WidthStrategy(get_method(settings.method), model, registry, calibration, **common))
        # Agents serve DRESS's packed subnets: a peer's rounds are recorded, its models are not published.
        publisher = RoundPublisher(model, registry, test.loader(512, shuffle=False),
                                   state_dir / "checkpoints" if dress else None, strategy.stats,
                                   first_round=done + 1, published_best=published_best,
                                   published_state=strategy.published_state,
                                   final=(settings.num_rounds, judged.loader(512, shuffle=False)),
                                   canary=settings.canary)
        if done:
            wait_for_reconnect(grid, registry, settings, started)
        wait_for_nodes(grid, settings.wait_for_nodes)
        result = strategy.start(grid, ArrayRecord(torch_state_dict=model.state_dict()),
                                num_rounds=settings.num_rounds - done, timeout=settings.round_timeout_s,
                                train_config=train_config(settings), evaluate_fn=publisher)
        log.info("run finished: %s", result.evaluate_metrics_serverapp.get(settings.num_rounds - done))
    finally:
        registry.close()
