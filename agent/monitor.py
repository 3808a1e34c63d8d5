"""The agent's heartbeat: report the budget, learn the density to run and the model version to serve.

One background thread, one heartbeat per interval. The coordinator being briefly away (restart, network
blip) must not take inference down with it: failed heartbeats are retried with exponential backoff and jitter
(``agent.backoff``) while the agent keeps serving, and logged when heartbeats stop and when they work again, not
at every try. Given its calibration, the agent also decides on its own, at every tick and before
asking anyone: it serves the densest subnet its live budget allows (the same policy the coordinator runs),
never above the coordinator's answer — so a load spike moves it at once, and with the coordinator
unreachable adaptation goes on.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence

import grpc

from agent.backoff import Backoff
from agent.budget import BudgetSource
from agent.metrics import AgentMetrics
from agent.usage import UsageLedger
from agent.version_check import CheckLedger
from contracts.policy import CalibrationPoint, choose_density, validate_calibration
from dress_model.sparsity import density_at
from protos.dress.fleet.v1 import control_plane_pb2 as pb
from protos.dress.fleet.v1 import control_plane_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 5.0
DEFAULT_RPC_TIMEOUT_S = 5.0
DEFAULT_MAX_BACKOFF_S = 60.0
# Codes that say "try again later"; anything else is logged as an error, but retried all the same.
TRANSIENT = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                       grpc.StatusCode.RESOURCE_EXHAUSTED})


class BudgetMonitor:
    """Heartbeats `source`'s budget every `interval` seconds and acts on the answer.

    ``densities`` are the architecture's: the coordinator names a density by its level in them.
    `on_density(assigned, local)` runs when the coordinator's assignment or the device's own choice differs from
    the last ones it was given (whether or not the coordinator flagged a change: an operator's assignment, or a
    lost answer, moves it too); it answers the density that serves.
    `on_model_version(v)` runs when the coordinator's model version differs from the one served; if it
    raises, the error is logged, the version is not taken as served and the next heartbeat tries again.
    """

    def __init__(
        self,
        stub: pb_grpc.ControlPlaneStub,
        densities: tuple[float, ...],
        source: BudgetSource,
        *,
        density: float,
        model_version: str,
        on_density: Callable[[float, float | None], float],
        on_model_version: Callable[[str], object],
        interval: float = DEFAULT_INTERVAL_S,
        rpc_timeout: float = DEFAULT_RPC_TIMEOUT_S,
        max_backoff: float = DEFAULT_MAX_BACKOFF_S,
        calibration: Sequence[CalibrationPoint] | None = None,
        usage: UsageLedger | None = None,
        checks: CheckLedger | None = None,
        pace: Callable[[float], float] | None = None,
        channel: grpc.Channel | None = None,
        metrics: AgentMetrics | None = None,
    ) -> None:
        if interval <= 0 or rpc_timeout <= 0:
            raise ValueError(f"interval and rpc_timeout must be > 0, got {interval} and {rpc_timeout}")
        self.stub, self.densities, self.source = stub, densities, source
        self.interval, self.rpc_timeout = interval, rpc_timeout
        self.backoff = Backoff(interval, max_backoff)  # between heartbeats: the interval, longer after failures
        self.density, self.model_version = density, model_version  # the coordinator's last answer
        self._table = validate_calibration(calibration) if calibration else None
        self.local: float | None = None  # what the live budget allows, by this device's own calibration
        self._given: tuple[float, float | None] = (density, None)  # what on_density was last given
        self.usage = usage  # what Predict ran, reported with each heartbeat
        self.checks = checks  # labelled checks of model versions not yet reported
        self.pace = pace  # the interval to keep when the coordinator asks for a period (it grows with the fleet)
        self._asked = 0.0  # the period the coordinator last asked for
        self._failing: set[str] = set()  # how heartbeats failed since they last worked (each logged once)
        self._failing_since = 0.0
        self._on_density, self._on_model_version = on_density, on_model_version
        self._beat_lock = threading.Lock()  # heartbeat_now() from a test and the thread never interleave
        self._stopping = threading.Event()
        self._wake = threading.Event()  # the next heartbeat goes now: stopping, or the channel is back
        # The channel ``stub`` calls over: while heartbeats fail, gRPC reconnects on its own (backing off up to
        # agent.lifecycle's reconnect cap); once it has, the next heartbeat goes at once, not after the backoff.
        self._channel = channel
        self._metrics = metrics  # heartbeats answered and failed
        self._thread = threading.Thread(target=self._run, name="budget-monitor", daemon=True)

    def start(self) -> None:
        if self._channel is not None:
            self._channel.subscribe(self._on_connectivity)
        self._thread.start()

    def _on_connectivity(self, state: grpc.ChannelConnectivity) -> None:
        if state is grpc.ChannelConnectivity.READY and self.backoff.failures:
            log.debug("the coordinator's channel is back: heartbeating now")
            self._wake.set()

    def stop(self, timeout: float | None = None) -> None:
        """Stop after the heartbeat in flight, if any (bounded by rpc_timeout); idempotent."""
        self._stopping.set()
        self._wake.set()
        if self._channel is not None:
            with contextlib.suppress(Exception):  # closed already, or never subscribed
                self._channel.unsubscribe(self._on_connectivity)
        if self._thread.is_alive():
            self._thread.join(self.rpc_timeout + 1.0 if timeout is None else timeout)

    def heartbeat_now(self) -> pb.HeartbeatResponse:
        """One heartbeat, acted on; raises grpc.RpcError if the coordinator does not answer."""
        with self._beat_lock:
            budget = self.source.current()
            if self._table is not None:  # decided here first: the network may be down
                self.local = choose_density(self._table, budget, self.local)
                self._serve()
            ran = self.usage.take() if self.usage is not None else {}
            checked = self.checks.take() if self.checks is not None else {}
            try:
                answer = self.stub.Heartbeat(
                    pb.HeartbeatRequest(budget=pb.Budget(
                        latency_ms=budget.latency_ms, memory_mb=budget.memory_mb, battery=budget.battery),
                        served=[pb.LevelUse(level=self.densities.index(d), requests=r, busy_ms=ms, confidence_sum=c)
                                for d, (r, ms, c) in ran.items()],
                        model_version=self.usage.version if self.usage is not None else "",
                        checks=[pb.VersionCheck(model_version=v, level=self.densities.index(d), examples=n,
                                                correct=right) for (v, d), (n, right) in checked.items()]),
                    timeout=self.rpc_timeout,
                )
            except Exception as e:
                if self.usage is not None:
                    self.usage.put_back(ran)  # not heard: report it with the next heartbeat
                if self.checks is not None and checked:
                    if isinstance(e, grpc.RpcError) and e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                        log.warning("the coordinator refused this heartbeat (%s); its version checks are dropped, "
                                    "so the next one goes without them", e.details())
                    else:
                        self.checks.put_back(checked)
                raise
            self.density = density_at(self.densities, answer.level)
            if self.pace is not None and answer.heartbeat_s > 0 and answer.heartbeat_s != self._asked:
                self._asked, interval = answer.heartbeat_s, self.pace(answer.heartbeat_s)
                if interval != self.interval:
                    log.info("heartbeating every %g s: the coordinator asks for at least every %g s", interval,
                             answer.heartbeat_s)
                    self.interval = self.backoff.base = interval
            self._serve()
            if answer.model_version and answer.model_version != self.model_version:
                try:
                    self._on_model_version(answer.model_version)
                    self.model_version = answer.model_version
                except Exception as e:  # the heartbeat itself worked: keep its pace, retry the swap next beat
                    log.warning("cannot serve model version %r yet (%s); retrying at the next heartbeat",
                                answer.model_version, e)
            return answer

    def _serve(self) -> None:
        """Hand the served model the coordinator's answer and the local choice when either changed."""
        if (self.density, self.local) != self._given:
            serving = self._on_density(self.density, self.local)
            log.info("serving density %g (coordinator %g, local %s)", serving, self.density,
                     "-" if self.local is None else f"{self.local:g}")
            self._given = (self.density, self.local)

    @property
    def failures(self) -> int:
        """Heartbeats failed in a row."""
        return self.backoff.failures

    @property
    def max_backoff(self) -> float:
        return self.backoff.cap

    def next_delay(self) -> float:
        """The interval while healthy; after failures, exponential backoff with jitter (capped at
        ``max_backoff``), so a device neither spins while cut off nor a fleet returns to a restarted coordinator
        in lockstep."""
        return self.backoff.delay()

    def _run(self) -> None:
        delay = 0.0  # report the budget as soon as we start
        while not self._stopping.is_set():
            self._wake.wait(delay)
            self._wake.clear()
            if self._stopping.is_set():
                break
            try:
                self.heartbeat_now()
                self._recovered()
            except grpc.RpcError as e:
                self._failed(f"{e.code().name}: {e.details()}",
                             logging.WARNING if e.code() in TRANSIENT else logging.ERROR)
            except Exception as e:  # e.g. a budget reading the coordinator's Budget refuses: try the next one
                self._failed(f"{type(e).__name__}: {e}", logging.ERROR, exc_info=True)
            delay = self.next_delay()

    def _count(self, outcome: str) -> None:
        if self._metrics is not None:
            self._metrics.heartbeats.labels(outcome).inc()

    def _failed(self, why: str, level: int, exc_info: bool = False) -> None:
        """Count a failed heartbeat; say so when heartbeats start failing, or fail in a way not seen since they
        last worked (a gRPC status code, an exception type), not at every retry: a device cut off for an hour
        would otherwise log hundreds of lines."""
        self._count("failed")
        if self.backoff.failed():
            self._failing_since = time.monotonic()
        kind = why.split(":", 1)[0]
        if kind not in self._failing:
            log.log(level, "heartbeat failed (%s); retrying with backoff up to %g s (said once until it works again)",
                    why, self.max_backoff, exc_info=exc_info)
            self._failing.add(kind)
        else:
            log.debug("heartbeat failed again (%s), %d in a row", why, self.failures)

    def _recovered(self) -> None:
        self._count("answered")
        if failed := self.backoff.succeeded():
            log.info("heartbeat to the coordinator works again after %d failures (%.0f s)", failed,
                     time.monotonic() - self._failing_since)
        self._failing.clear()
