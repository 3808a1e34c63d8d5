"""How a stopped federated benchmark resumes: which stored runs still hold under today's settings, and which
settings may change between the runs of one results file (``benchmarks/federated.py --resume``)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from contracts.settings import dress_only_keys

PROTOCOL = "issue-24"  # what a results file of this benchmark says it is
GROWING = ("methods", "partitions", "seeds")  # settings a resumed benchmark may extend; the rest must match
# settings a resumed benchmark may change: the comparison runs made otherwise are redone
RESTARTING = ("rounds", "non_iid_rounds")
# app settings newer than a results file: the value that file's runs ran with
ADDED_SETTINGS = {"joint": "all", "round-timeout-s": 3600.0, "canary": 0.0, "server-distill": 0}
# tuned settings newer than a results file (TUNING_GRID keys): the value its runs ran with, the app's default then
ADDED_GRID = {"logit_adjust": 0.0}
def of_this_protocol(result: dict[str, Any]) -> bool:
    """Whether a results file is of this protocol (issue 24's)."""
    return result.get("protocol") == PROTOCOL


def resumed(out: Path, settings: dict[str, Any], resume: bool) -> dict[str, Any]:
    """The results to continue: ``out``'s when resuming (same settings but GROWING, RESTARTING and app settings
    only DRESS reads, whose change drops DRESS's runs; else SystemExit), else none. Without ``resume``, runs of
    this protocol already there are not overwritten: a full matrix takes days."""
    previous = json.loads(out.read_text()) if out.is_file() else None
    if not resume:
        if previous and of_this_protocol(previous) and (previous["runs"] or previous["tuning"]["runs"]):
            raise SystemExit(f"{out} holds runs of this protocol: --resume to continue them, or remove it (or pass "
                             "another --out) to start over")
        return {}
    if previous is None:
        return {}
    if not of_this_protocol(previous):
        raise SystemExit(f"--resume: {out} holds results of the old protocol; pass another --out, or move it away")
    previous = with_added_grid(previous, tuned_keys(settings))
    added = {k: v for k, v in ADDED_SETTINGS.items() if k in settings["app"]}
    theirs = {**previous["settings"], "app": {**added, **previous["settings"]["app"]}}
    if theirs.get("tuning") and "rounds" not in theirs["tuning"]:  # written when tuning ran the comparison's rounds
        theirs["tuning"] = {**theirs["tuning"], "rounds": theirs["rounds"]}
    if grid_grew(theirs.get("tuning"), settings.get("tuning")):  # the new configurations are tuned on resume
        theirs["tuning"] = settings["tuning"]
    dress_changes = dress_only_changes(theirs["app"], settings["app"])
    if dress_changes:
        theirs["app"] = settings["app"]
    differ = {k: (theirs.get(k), settings.get(k)) for k in {*theirs, *settings}
              if k not in (*GROWING, *RESTARTING) and theirs.get(k) != settings.get(k)}
    if differ:
        raise SystemExit(f"--resume: {out} was run with other settings (theirs, ours): {differ}")
    if dress_changes:
        print(f"--resume: app settings only DRESS reads changed (theirs, ours): {dress_changes}; DRESS's "
              "calibration, tuning and comparison runs are redone, the peers' kept", flush=True)
        return without_method(previous, "dress")
    return previous


def tuned_keys(settings: dict[str, Any]) -> set[str]:
    """The settings a benchmark's configurations name: its grid's, else those of the configurations it borrowed."""
    if settings.get("tuning"):
        return set(settings["tuning"]["grid"])
    return {k for config in settings.get("configs_from", {}).get("best", {}).values() for k in config}


def with_added_grid(result: dict[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    """``result`` with the ADDED_GRID settings among ``keys`` that its file predates written in: in its grid (when
    tuned) and in each run's configuration, at the value the run ran with. A grid that gained such a setting then
    grew (``grid_grew``), and a configuration borrowed from the file says what it ran."""
    added = {k: v for k, v in ADDED_GRID.items() if k in set(keys)}

    def config(c: dict[str, Any]) -> dict[str, Any]:
        return {**c, **{k: v for k, v in added.items() if k not in c}}

    tuning = result.get("tuning", {})
    settings = result["settings"]
    if settings.get("tuning"):
        grid = settings["tuning"]["grid"]
        settings = {**settings, "tuning": {**settings["tuning"],
                                           "grid": {**grid, **{k: [v] for k, v in added.items() if k not in grid}}}}
    runs = [{**r, "config": config(r["config"])} for r in result.get("runs", [])]
    return {**result, "settings": settings, "runs": runs,
            "tuning": {**tuning, "runs": [{**r, "config": config(r["config"])} for r in tuning.get("runs", [])]}}


def dress_only_changes(theirs: dict[str, Any], ours: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """The app settings that differ (theirs, ours) when only DRESS reads every one of them: the peers' runs would
    come out the same, so only DRESS's need redoing. Empty when none differ or one the peers read does."""
    changed = {k: (theirs.get(k), ours.get(k)) for k in sorted({*theirs, *ours}) if theirs.get(k) != ours.get(k)}
    return changed if set(changed) <= set(dress_only_keys()) else {}


def without_method(result: dict[str, Any], method: str) -> dict[str, Any]:
    """``result`` less ``method``'s tuning and comparison runs and its calibration (its training step may have
    changed too): a resumed benchmark makes them again with today's settings."""
    return {**result, "runs": [r for r in result["runs"] if r["method"] != method],
            "rows": [r for r in result.get("rows", []) if r["method"] != method],
            "tuning": {**result["tuning"], "runs": [r for r in result["tuning"]["runs"] if r["method"] != method]},
            "calibration": {m: c for m, c in result.get("calibration", {}).items() if m != method}}


def grid_grew(theirs: dict[str, Any] | None, ours: dict[str, Any] | None) -> bool:
    """Whether ``ours`` tunes over a grid that holds ``theirs`` (more values for some settings), all else equal."""
    if not theirs or not ours or {k: v for k, v in theirs.items() if k != "grid"} != \
            {k: v for k, v in ours.items() if k != "grid"} or theirs["grid"].keys() != ours["grid"].keys():
        return False
    return all(set(values) <= set(ours["grid"][key]) for key, values in theirs["grid"].items())


def still_valid(runs: list[dict[str, Any]], configs: dict[str, dict[str, Any]],
                rounds: Callable[[str], int]) -> list[dict[str, Any]]:
    """The comparison runs a resumed benchmark keeps: those made with the configuration tuning picks now (a grown
    grid may pick another) and with today's round count for their partition (``rounds``: a longer comparison
    redoes the shorter runs)."""
    kept = runs
    for why, stale in (("a configuration tuning no longer picks", lambda r: r["config"] != configs[r["method"]]),
                       ("another round count than their partition's", lambda r: r["rounds"] != rounds(r["partition"]))):
        dropped = [r for r in kept if stale(r)]
        if dropped:
            print(f"dropping {len(dropped)} comparison runs made with {why}", flush=True)
            kept = [r for r in kept if not stale(r)]
    return kept
