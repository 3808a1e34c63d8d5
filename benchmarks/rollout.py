"""Staged rollouts end to end, with real processes: `dress-fleet coordinator start --canary SHARE` and real
`dress-agent join` devices on loopback, Predict traffic on every agent (Fashion-MNIST test images), the judge
inside the coordinator deciding from what the agents report.

1. Two training rounds: round 1's version becomes the stable one (nothing to compare it with), round 2's goes to
   its canary share first and is judged like any other candidate.
2. Then two deliberately bad versions are published to the same registry, one after the other, as the ServerApp
   publishes: untrained weights (what a diverged run or a corrupted upload leaves: finite, accuracy at chance,
   unsure), and the stable model with its classifier's rows rotated by one class (what mislabelled training data
   or a label-map mix-up leaves: every answer exactly as sure as the stable version's, and wrong). Each must be
   rolled back from its canary before any device outside the canary serves it, and every other device keeps
   serving the stable version throughout. Every agent keeps labelled check images (``--check-set``): the second
   version passes the label-free proxy and only the devices' checks can catch it.

Every half second each agent is asked which version it serves (its Status RPC), so "served" is what answered
requests, not what the registry intended. The versions' accuracy and mean top-class probability on the whole test
split are measured here too, to show what the label-free proxy stood for.

    python -m benchmarks.rollout                 # 8 agents, canary 0.5 (~10 min on 2 busy cores)

Writes benchmarks/results/rollout.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import torch

from benchmarks.common import command, machine, markdown_table, write_json
from benchmarks.fleet_processes import BIN, enroll_all, recorded_rounds, spawn, stop_all, wait_serving
from coordinator.registry import Registry
from coordinator.registry.models import VersionStatus
from coordinator.registry.rollouts import in_canary
from dress_model.checkpoint import atomic_write, load_checkpoint, save_checkpoint
from dress_model.data import load_dataset
from dress_model.models import create_model
from dress_model.training import evaluate
from protos.dress.fleet.v1 import agent_pb2 as agent_pb
from protos.dress.fleet.v1 import agent_pb2_grpc as agent_grpc
from runtime.processes import pick_port, stop_on_sigterm

RESULTS = Path(__file__).parent / "results"
PROFILES = ("pi4", "jetson-nano", "phone", "pi5")
BROKEN = "broken-untrained"
SURE_WRONG = "sure-and-wrong"
CHECK_SET = "fashion-mnist:256"  # each agent's labelled check images (agent.version_check)
DECISION_TIMEOUT_S = 300.0
# a reply Flower's SuperLink failed to store (its SQLite locked under load) is not waited for an hour
ROUND_TIMEOUT_S = 240.0


class Traffic:
    """Predict requests on every agent in turn (one test image each), and every half second which version each
    serves, from its own Status answer."""

    def __init__(self, agents: dict[str, str], images: torch.Tensor) -> None:
        self.agents, self.images = agents, images
        self.served: dict[str, str] = {}
        self.seen: dict[str, set[str]] = {name: set() for name in agents}  # every version each answered with
        self.requests = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._predict, daemon=True),
                         threading.Thread(target=self._watch, daemon=True)]

    def __enter__(self) -> Traffic:
        self.channels = {name: grpc.insecure_channel(address) for name, address in self.agents.items()}
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)
        for channel in self.channels.values():
            channel.close()

    def _predict(self) -> None:
        rng = random.Random(0)
        while not self._stop.wait(0.02):
            for channel in self.channels.values():
                image = self.images[rng.randrange(len(self.images))]
                try:
                    agent_grpc.AgentStub(channel).Predict(agent_pb.PredictRequest(
                        input=image.flatten().tolist(), shape=list(image.shape)), timeout=10)
                    self.requests += 1
                except grpc.RpcError:
                    pass  # swapping or busy: the next one

    def _watch(self) -> None:
        while not self._stop.wait(0.5):
            for name, channel in self.channels.items():
                try:
                    version = agent_grpc.AgentStub(channel).Status(agent_pb.StatusRequest(), timeout=5).model_version
                except grpc.RpcError:
                    continue
                self.served[name] = version
                self.seen[name].add(version)

    def serving(self, version: str) -> set[str]:
        return {name for name, v in self.served.items() if v == version}


def wait_for(what: str, condition: Any, timeout: float, every: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (found := condition()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {timeout:.0f} s")
        time.sleep(every)
    return found


def stage(state: Path, traffic: Traffic, names: list[str], stable: str, version: str, path: Path,
          densities: tuple[float, ...], canary: float) -> dict[str, Any]:
    """Publish a bad ``version`` as the ServerApp does, wait for the judge's decision and for every device to be
    back on ``stable``; what happened, from the agents' own Status answers."""
    canary_devices = sorted(n for n in names if in_canary(n, version, canary))
    for name in names:
        traffic.seen[name] = {stable}
    requests_before, started = traffic.requests, time.monotonic()
    with Registry(state_dir=state) as registry:
        registry.add_model_version(version, str(path), densities, canary=canary)
    row = wait_for(f"a decision on {version}", lambda: decided(state, version), DECISION_TIMEOUT_S)
    decided_s = time.monotonic() - started
    wait_for(f"every device back on {stable}", lambda: traffic.serving(stable) == set(names), 120, 0.5)
    served = sorted(n for n in names if version in traffic.seen[n])
    return {"version": version, "status": str(row.status), "reason": row.reason, "decided_after_s": round(decided_s, 1),
            "all_back_on_stable_after_s": round(time.monotonic() - started, 1), "canary_devices": canary_devices,
            "served_it": served, "within_canary": set(served) <= set(canary_devices),
            "outside_canary_changed": sorted(n for n in names if n not in canary_devices and traffic.seen[n] != {stable}),
            "requests_meanwhile": traffic.requests - requests_before}


def decided(state: Path, version: str) -> Any:
    """The version's row once the judge (or anyone) decided it, else None."""
    with Registry(state_dir=state) as registry:
        row = next(v for v in registry.list_versions() if v.version == version)
    return row if row.status != VersionStatus.CANDIDATE else None


def accuracy(checkpoint: str | Path, test: Any) -> dict[str, float]:
    model, _ = load_checkpoint(checkpoint)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(test.images, test.labels), batch_size=500)
    return {f"{d:g}": round(a, 2) for d, a in evaluate(model, loader).items()}


def confidence(checkpoint: str | Path, test: Any) -> float:
    """Mean top-class probability of the densest subnet on the test split: the label-free proxy."""
    model, _ = load_checkpoint(checkpoint)
    model.eval()
    with torch.no_grad():
        return round(float(torch.softmax(model(test.images), dim=-1).amax(dim=-1).mean()), 4)


def sure_and_wrong(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with its classifier's rows rotated by one class: each answer as sure as before, and wrong."""
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        head.weight.copy_(head.weight.roll(1, dims=0))
        if head.bias is not None:
            head.bias.copy_(head.bias.roll(1, dims=0))
    return model


def run(agents: int, canary: float, rounds: int, max_examples: int, out: Path) -> dict[str, Any]:
    test = load_dataset("fashion-mnist", "test")
    names = [f"{PROFILES[i % len(PROFILES)]}-{i}" for i in range(agents)]
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        state, superlink, control = tmp / "coordinator", pick_port(), pick_port()
        processes = [spawn([str(BIN / "dress-fleet"), "coordinator", "start", "--superlink-port", str(superlink),
                            "--control-port", str(control), "--operator-port", str(pick_port()),
                            "--state-dir", str(state), "--rounds", str(rounds),
                            "--min-devices", str(agents), "--fraction", "1", "--max-examples", str(max_examples),
                            "--canary", str(canary), "--round-timeout", str(ROUND_TIMEOUT_S)],
                           tmp / "coordinator.log")]
        try:
            wait_serving(f"127.0.0.1:{control}")
            tokens, addresses = enroll_all(state, names), {}
            for i, name in enumerate(names):
                trace = tmp / f"{name}.csv"  # room for every subnet: each serves the dense one
                trace.write_text("t_s,latency_ms,memory_mb\n0,1000,100\n")
                addresses[name] = f"127.0.0.1:{pick_port()}"
                processes.append(spawn([
                    str(BIN / "dress-agent"), "join", "--device", PROFILES[i % len(PROFILES)], "--token", tokens[name],
                    "--coordinator", f"127.0.0.1:{control}", "--superlink", f"127.0.0.1:{superlink}",
                    "--serve-port", addresses[name].rpartition(":")[2], "--metrics-port", "0",
                    "--supernode-port", str(pick_port()), "--partition-id", str(i), "--num-partitions", str(agents),
                    "--budget-trace", str(trace), "--heartbeat-interval", "1", "--calibration-repeats", "5",
                    "--training-calibration-steps", "1", "--check-set", CHECK_SET, "--state-dir", str(tmp / name)],
                    tmp / f"{name}.log"))
            for (name, address), agent in zip(addresses.items(), processes[1:], strict=True):
                try:
                    wait_serving(address, timeout=300)
                except TimeoutError:
                    raise RuntimeError(f"agent {name} never served (exit code {agent.poll()}):\n"
                                       + (tmp / f"{name}.log").read_text()[-2000:]) from None
            with Traffic(addresses, test.images[:2000]) as traffic:
                wait_for(f"round {rounds}", lambda: len(recorded_rounds(state)) >= rounds, 900)
                with Registry(state_dir=state) as registry:
                    versions = {v.version: v for v in registry.list_versions()}
                first = min(versions, key=lambda v: versions[v].created_at)
                trained = max(versions, key=lambda v: versions[v].created_at)
                if trained == first:  # no later round trained anyone (each device missed the round timeout)
                    raise RuntimeError(f"only {first} was published in {rounds} rounds (no device answered a later "
                                       "round by its timeout): no trained candidate to stage")
                # the trained candidate (round N's): judged on what its canary served
                started = time.monotonic()
                good = wait_for(f"a decision on {trained}", lambda: decided(state, trained), DECISION_TIMEOUT_S)
                good_s = time.monotonic() - started
                with Registry(state_dir=state) as registry:
                    stable = registry.rollout()[0]
                    paths = {v: registry.model_checkpoint(v) for v in (first, trained)}
                assert stable in paths, (stable, paths)
                stable_path = paths[stable]
                wait_for(f"every device serving {stable}", lambda: traffic.serving(stable) == set(names), 120, 0.5)

                model, _ = load_checkpoint(stable_path)
                torch.manual_seed(1)
                bad_paths = {  # untrained weights of the same architecture, and the stable one's head rotated
                    BROKEN: save_checkpoint(create_model(model.arch), tmp / f"{BROKEN}.safetensors"),
                    SURE_WRONG: save_checkpoint(sure_and_wrong(model), tmp / f"{SURE_WRONG}.safetensors")}
                bad = {version: stage(state, traffic, names, stable, version, path, model.densities, canary)
                       for version, path in bad_paths.items()}
        finally:
            stop_all(processes)
        every = {**paths, **bad_paths}
        result = {
            "command": command(), "machine": machine(), "agents": agents, "canary": canary, "rounds": rounds,
            "check_set": CHECK_SET,
            # issue 28's summary: bad versions tried and rolled back, the largest share of the fleet that served
            # one, the canary share, and how many devices outside the canary changed version meanwhile
            "broken_tried": len(bad), "rolled_back": sum(b["status"] == str(VersionStatus.ROLLED_BACK) for b in bad.values()),
            "max_share_reached": round(max(len(b["served_it"]) for b in bad.values()) / agents, 3), "canary_share": canary,
            "others_changed": sum(len(b["outside_canary_changed"]) for b in bad.values()),
            "trained_candidate": {"version": trained, "status": str(good.status), "reason": good.reason,
                                  "decided_after_s": round(good_s, 1),
                                  "canary_devices": sorted(n for n in names if in_canary(n, trained, canary))},
            "bad": bad,
            "accuracy": {v: accuracy(path, test) for v, path in every.items()},
            "confidence": {v: confidence(path, test) for v, path in every.items()},
        }
    write_json(out, result)
    atomic_write(out.with_suffix(".md"), lambda t: t.write_text(report(result)))
    return result


def report(r: dict[str, Any]) -> str:
    good = r["trained_candidate"]
    rows = [{"version": v, **{f"d={d}": a for d, a in acc.items()}, "mean top-class probability": r["confidence"][v]}
            for v, acc in r["accuracy"].items()]
    kinds = {BROKEN: "untrained weights", SURE_WRONG: "the stable model, its classifier's rows rotated by one class"}
    lines = [f"# Staged rollouts end to end\n\n`{r['command']}`\n",
             f"{r['agents']} real agents on loopback (`dress-agent join --check-set {r['check_set']}`), `dress-fleet "
             f"coordinator start --canary {r['canary']:g}`, Predict traffic on every agent; which version each agent "
             "served comes from its own Status answers, every 0.5 s.\n",
             f"- Round {r['rounds']}'s trained version {good['version']}: **{good['status']}** after "
             f"{good['decided_after_s']} s ({good['reason']}); canary devices {', '.join(good['canary_devices'])}."]
    for bad in r["bad"].values():
        lines += [f"- Bad version {bad['version']} ({kinds.get(bad['version'], '')}): **{bad['status']}** after "
                  f"{bad['decided_after_s']} s ({bad['reason']}); every device back on the stable version after "
                  f"{bad['all_back_on_stable_after_s']} s; {bad['requests_meanwhile']} requests meanwhile.",
                  f"  - Canary devices: {', '.join(bad['canary_devices'])}; served it: "
                  f"{', '.join(bad['served_it']) or 'none'} (within the canary: {bad['within_canary']}).",
                  "  - Devices outside the canary that served anything but the stable version: "
                  f"{', '.join(bad['outside_canary_changed']) or 'none'}."]
    return "\n".join(lines) + ("\n\nOn the whole Fashion-MNIST test split: accuracy per density, and the label-free "
                               "proxy (mean top-class probability of d=1):\n\n" + markdown_table(rows, list(rows[0])) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--agents", type=int, default=8, help="real agents (each a dress-agent and a SuperNode)")
    p.add_argument("--canary", type=float, default=0.5, help="the share of devices a new version goes to first")
    p.add_argument("--rounds", type=int, default=2, help="training rounds before the bad versions (>= 2)")
    p.add_argument("--max-examples", type=int, default=64, help="examples per device per round")
    p.add_argument("--out", type=Path, default=RESULTS / "rollout.json")
    args = p.parse_args()
    stop_on_sigterm()  # a killed benchmark still stops its coordinator and agents
    if args.rounds < 2 or args.agents < 3 or not 0 < args.canary < 1:
        raise SystemExit("--rounds >= 2 (the first version becomes the stable one), --agents >= 3 (the judge needs "
                         "3 canary devices) and --canary in (0, 1) expected")
    print(json.dumps(run(args.agents, args.canary, args.rounds, args.max_examples, args.out), indent=2))


if __name__ == "__main__":
    main()
