"""A new model version from the coordinator: downloaded and verified off to the side (size, digest, the packed
file's own checks), then handed to the served model to swap in.

The heartbeat learns of a version; ``ModelFollower`` downloads it on a thread of its own, so a slow or stalled
download (a bad link: a model takes a while at a few percent loss) never holds up the heartbeats that keep the
device online, and a failed one is retried with backoff rather than at every heartbeat."""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import torch

from agent.backoff import Backoff
from agent.served_model import ServedModel
from agent.version_check import VersionChecker
from dress_model.packed import PackedModel
from dress_model.packed_format import PackedFormatError
from protos.dress.fleet.v1 import control_plane_pb2 as pb
from protos.dress.fleet.v1 import control_plane_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

MAX_MODEL_BYTES = 1 << 30  # a sanity bound on what a coordinator may announce, not a device limit


DEFAULT_FETCH_TIMEOUT_S = 120.0
FETCH_RETRY_S, FETCH_RETRY_CAP_S = 1.0, 60.0  # a failed download's first retry, and the longest wait between two


class ModelFetchError(RuntimeError):
    """A model download failed or arrived corrupt; the served model stays as it was."""


@dataclass(frozen=True, slots=True)
class FetchedModel:
    version: str
    packed: PackedModel
    nbytes: int


def fetch_model(
    stub: pb_grpc.ControlPlaneStub, level: int, timeout: float = DEFAULT_FETCH_TIMEOUT_S, half: bool = False,
) -> FetchedModel:
    """Download the packed model holding every density up to ``level`` over FetchModel, checking order, size and
    sha256 before use; ``half``: as float16 (fewer bytes, computed in float32)."""
    data = bytearray()
    first: pb.ModelChunk | None = None
    try:
        for chunk in stub.FetchModel(pb.FetchModelRequest(level=level, float16=half),
                                    timeout=timeout):
            if first is None:
                first = chunk
                if chunk.total_size > MAX_MODEL_BYTES:
                    raise ModelFetchError(f"coordinator announced a {chunk.total_size:,}-byte model; "
                                          f"at most {MAX_MODEL_BYTES:,} accepted")
            elif (chunk.total_size, chunk.sha256, chunk.model_version) != (
                    first.total_size, first.sha256, first.model_version):
                raise ModelFetchError("model chunks disagree on size, digest or version; the model changed mid-download")
            if chunk.offset != len(data) or len(data) + len(chunk.data) > first.total_size:
                raise ModelFetchError(f"chunk of {len(chunk.data)} bytes at offset {chunk.offset} does not follow "
                                      f"the {len(data)} bytes received of {first.total_size}")
            data += chunk.data
    except grpc.RpcError as e:
        raise ModelFetchError(f"FetchModel up to level {level} failed: {e.code().name}: {e.details()}") from None
    if first is None:
        raise ModelFetchError("FetchModel answered no chunks")
    if len(data) != first.total_size:
        raise ModelFetchError(f"model download ended after {len(data):,} of {first.total_size:,} bytes")
    if hashlib.sha256(data).hexdigest() != first.sha256:
        raise ModelFetchError(f"model {first.model_version!r} failed its sha256 check; discarded")
    try:
        packed = PackedModel.from_bytes(bytes(data), source=f"model {first.model_version!r}")
    except PackedFormatError as e:
        raise ModelFetchError(str(e)) from None
    return FetchedModel(first.model_version, packed, len(data))


def check_answers(fetched: FetchedModel) -> None:
    """A version is served only once it answers: every density's forward pass on a probe batch gives finite
    logits of the right shape (a file that passed its format checks can still hold weights that do not);
    ModelFetchError otherwise, and the version served stays."""
    packed, arch = fetched.packed, fetched.packed.arch
    probe = torch.linspace(-1, 1, 2 * arch.in_channels * arch.image_size ** 2).reshape(
        2, arch.in_channels, arch.image_size, arch.image_size)
    active = packed.active_density
    try:
        for density in packed.densities:
            packed.set_density(density)
            with torch.no_grad():
                logits = packed(probe)
            if tuple(logits.shape) != (2, arch.num_classes) or not bool(torch.isfinite(logits).all()):
                raise ModelFetchError(f"model {fetched.version!r} does not answer at density {density:g} (logits "
                                      f"{list(logits.shape)}, finite: {bool(torch.isfinite(logits).all())}); "
                                      "not served")
    finally:
        packed.set_density(active)


class ModelUpdater:
    """Brings a ServedModel to a newly published version: the monitor's `on_model_version`.

    It downloads up to `fetch_level`, the densest subnet the device calibrated, so every density the
    coordinator may assign later is a `set_density` away rather than another download.
    """

    def __init__(self, served: ServedModel, stub: pb_grpc.ControlPlaneStub, fetch_level: int,
                 timeout: float = DEFAULT_FETCH_TIMEOUT_S, half: bool = False,
                 checker: VersionChecker | None = None) -> None:
        self.served, self.stub = served, stub
        self.fetch_level, self.timeout, self.half = fetch_level, timeout, half
        self.checker = checker  # the device's labelled checks of each version, reported to the coordinator

    def __call__(self, version: str) -> None:
        if version == self.served.version:
            return
        fetched = fetch_model(self.stub, self.fetch_level, self.timeout, self.half)
        fetched.packed.compile()  # before it serves: no request pays for compiling its density
        check_answers(fetched)
        if self.checker is not None:
            accuracy = self.checker(fetched.version, fetched.packed)
            log.info("model version %s on this device's %d labelled check images: %s", fetched.version,
                     len(self.checker.check_set), ", ".join(f"d={d:g} {a:.1f} %" for d, a in accuracy.items()))
        self.served.swap(fetched.packed, fetched.version)
        log.info("serving model version %s (%s bytes, densities %s)", fetched.version, f"{fetched.nbytes:,}",
                 ", ".join(f"{d:g}" for d in fetched.packed.densities))


class ModelFollower:
    """Follows the versions the heartbeat announces (the monitor's ``on_model_version``) without holding it up.

    Called with a version, it returns at once; its thread brings the served model to the newest version it was
    given with ``update`` (a ``ModelUpdater``). A failed download is retried, for the newest version announced by
    then, after exponential backoff with jitter (``backoff``); it says so when downloads start failing and when one
    works again, not at every retry."""

    def __init__(self, update: Callable[[str], object], backoff: Backoff | None = None) -> None:
        self.update = update
        self.backoff = backoff or Backoff(FETCH_RETRY_S, FETCH_RETRY_CAP_S)
        self.wanted: str | None = None  # the newest version announced
        self.served: str | None = None  # the last version brought in by this follower
        self._lock = threading.Lock()
        self._announced = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="model-fetch", daemon=True)
        self._failing_since = 0.0

    def __call__(self, version: str) -> None:
        with self._lock:
            self.wanted = version
        self._announced.set()

    def start(self) -> None:
        self._thread.start()

    @property
    def running(self) -> bool:
        """Whether its thread is alive (after ``stop``: a download still in flight)."""
        return self._thread.is_alive()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop; a download in flight is left to its own deadline (closing the channel ends it); idempotent."""
        self._stopping.set()
        self._announced.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            self._announced.wait()
            if self._stopping.is_set():
                return
            self._announced.clear()
            with self._lock:
                version = self.wanted
            if version is None or version == self.served:
                continue
            try:
                self.update(version)
            except Exception as e:  # noqa: BLE001 - whatever broke this download, the next may work
                if self.backoff.failed():
                    self._failing_since = time.monotonic()
                    log.warning("cannot download model version %r yet (%s); retrying with backoff up to %g s, "
                                "logged again once one works", version, e, self.backoff.cap)
                else:
                    log.debug("model download failed again (%s), %d in a row", e, self.backoff.failures)
                self._announced.set()  # try again, after the backoff (or when stopped)
                if self._stopping.wait(self.backoff.delay()):
                    return
                continue
            self.served = version
            if failed := self.backoff.succeeded():
                log.info("model version %s downloaded after %d failed tries (%.0f s)", version, failed,
                         time.monotonic() - self._failing_since)
