"""The soak's markdown tables and its JSON result, rendered from a `SoakResult`."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from dvd_serve.loadtests.metrics import write_json
from dvd_serve.loadtests.report import _table
from dvd_serve.loadtests.soak_accounting import OutcomeCounts, differing_fields
from dvd_serve.loadtests.soak_processes import GROUPS, GroupUsage
from dvd_serve.loadtests.soak_run import SoakResult

OUTCOME_ROWS = (
    ("accepted", "accepted"),
    ("succeeded", "succeeded"),
    ("client_errors", "client errors (4xx, 429 included)"),
    ("server_errors", "server errors (5xx, error events)"),
    ("cancelled", "cancelled (client hung up)"),
    ("unresolved", "no terminal outcome"),
)


def outcome_table(result: SoakResult) -> list[str]:
    views: list[tuple[str, OutcomeCounts | None]] = [
        ("all clients", result.clients), ("steady load", result.steady), ("hang-up clients", result.hang_ups),
        ("gateway /metrics", result.gateway),
    ]
    rows = [[label, *(str(getattr(counts, name)) if counts is not None else "-" for _, counts in views)]
            for name, label in OUTCOME_ROWS]
    return _table(["outcome", *(view for view, _ in views)], rows)


def usage_table(result: SoakResult) -> list[str]:
    rows = []
    for group in GROUPS:
        start, end = result.usage_start.get(group), result.usage_end.get(group)
        if start is None or end is None or (start.processes == 0 and end.processes == 0):
            continue
        rows.append([group, _change(start.processes, end.processes), _change(start.rss_mib, end.rss_mib, 1),
                     _change(start.open_fds, end.open_fds), _change(start.threads, end.threads)])
    return _table(["group", "processes", "RSS MiB", "open fds", "threads"], rows)


def _change(start: float, end: float, digits: int = 0) -> str:
    return f"{start:.{digits}f} -> {end:.{digits}f} ({end - start:+.{digits}f})"


def markdown(result: SoakResult) -> str:
    config = result.config
    kills = [kill for kill in result.kills if kill.pid is not None]
    lines = [
        f"Soak: {config.duration_s:g} s, {config.rate:g} req/s steady ({config.text_only_share:.0%} text-only, "
        f"{config.resolution} px) + {config.hang_up_rate:g} req/s hang-ups, seed {config.seed}, "
        f"{len(kills)} kill(s) of {', '.join(config.kill_roles) or 'nothing'}; wall {result.wall_s:.0f} s",
        "",
        *outcome_table(result),
        "",
        *usage_table(result),
        "",
        "Kills: " + (", ".join(f"{kill.at_s:.0f} s {kill.role} pid {kill.pid}" for kill in kills) or "none"),
        "Actor pids start -> end: " + "; ".join(
            f"{role} {result.actor_pids_start.get(role, [])} -> {result.actor_pids_end.get(role, [])}"
            for role in result.actor_pids_start if result.actor_pids_start[role] or result.actor_pids_end[role]),
    ]
    if result.error_causes:
        lines.append("Failed requests by cause: " + ", ".join(
            f"{cause} x{count}" for cause, count in result.error_causes.items()))
    if result.gateway is not None and (different := differing_fields(result.clients, result.gateway)):
        lines.append(f"Client and gateway counts differ in: {', '.join(different)}")
    lines += [f"Note: {note}" for note in result.notes]
    lines += ["", *(f"- [{'x' if check.passed else ' '}] {check.name}: {check.detail}" for check in result.checks)]
    return "\n".join(lines)


def headline_json(result: SoakResult) -> dict:
    """The final stdout line: counts, kills, checks and the start/end resources of every group."""
    return {
        "soak": {
            **result.clients.as_dict(),
            "gateway": result.gateway.as_dict() if result.gateway is not None else None,
            "kills": sum(1 for kill in result.kills if kill.pid is not None),
            "recovered_after_s": result.recovered_after_s,
            "error_causes": result.error_causes,
            "checks": {check.name: check.passed for check in result.checks},
            "usage": {group: {"start": _usage(result.usage_start.get(group)),
                              "end": _usage(result.usage_end.get(group))} for group in GROUPS},
        },
        "exit_code": 0 if result.passed else 1,
    }


def _usage(usage: GroupUsage | None) -> dict | None:
    if usage is None:
        return None
    return {**dataclasses.asdict(usage), "rss_mib": round(usage.rss_mib, 1)}


def save_result(result: SoakResult) -> Path:
    """Everything the run measured, as `soak.json` in the output folder."""
    document = {field.name: getattr(result, field.name) for field in dataclasses.fields(result)}
    document["config"] = result.config.model_dump(mode="json")
    return write_json({**document, "passed": result.passed}, Path(result.config.out_dir) / "soak.json")
