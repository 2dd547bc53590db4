"""The serving processes the soak watches and kills, found from the gateway process with psutil.

An embedded Ray runs under the gateway: its raylet starts one worker process per actor, titled
`ray::<ActorClass>[.<method>]` (class names from server/ray_actors.py). Every descendant of the gateway belongs to
one group: `gateway` (the process itself), `vision` / `language` / `coupled` (an actor process and its own
children, e.g. vLLM's engine core), or `ray` (raylet, GCS, idle workers). `orphaned` holds processes of the
gateway's session whose parent left it (reparented after a kill) and their children: a leak when it is not empty.
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import psutil

ACTOR_CLASSES = {"vision": "VisionActor", "language": "LanguageActor", "coupled": "CoupledActor"}
GROUPS = ("gateway", *ACTOR_CLASSES, "ray", "orphaned")
_ACTOR_TITLE = re.compile(r"^ray::(" + "|".join(ACTOR_CLASSES.values()) + r")(?![A-Za-z0-9_])")
_ROLE_OF_CLASS = {name: role for role, name in ACTOR_CLASSES.items()}
MIB = 1024 * 1024


def actor_role(cmdline: Sequence[str]) -> str | None:
    """`vision`, `language` or `coupled` for a Ray actor worker's command line (its process title), else None."""
    match = _ACTOR_TITLE.match(" ".join(cmdline))
    return _ROLE_OF_CLASS[match.group(1)] if match else None


@dataclass(frozen=True, slots=True)
class GroupUsage:
    """Resources of one group of processes at one moment."""

    processes: int
    rss_mib: float
    open_fds: int
    threads: int

    @classmethod
    def of(cls, processes: Iterable[psutil.Process]) -> "GroupUsage":
        count, rss, fds, threads = 0, 0, 0, 0
        for process in processes:
            try:
                with process.oneshot():
                    rss += process.memory_info().rss
                    fds += process.num_fds()
                    threads += process.num_threads()
                count += 1
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return cls(count, rss / MIB, fds, threads)


class ServingProcesses:
    """The process tree of one gateway (pid), regrouped on every call: killed actors come back with new pids."""

    def __init__(self, gateway_pid: int) -> None:
        self.gateway = psutil.Process(gateway_pid)

    def groups(self) -> dict[str, list[psutil.Process]]:
        try:
            descendants = self.gateway.children(recursive=True)
        except psutil.NoSuchProcess:
            return {name: [] for name in GROUPS}
        by_pid = {process.pid: process for process in descendants}
        roles = {pid: _role(process) for pid, process in by_pid.items()}
        grouped: dict[str, list[psutil.Process]] = {name: [] for name in GROUPS}
        grouped["gateway"].append(self.gateway)
        for pid, process in by_pid.items():
            grouped[_owning_role(pid, by_pid, roles)].append(process)
        grouped["orphaned"] = self._orphaned(set(by_pid) | {self.gateway.pid})
        return grouped

    def usage(self) -> dict[str, GroupUsage]:
        return {name: GroupUsage.of(processes) for name, processes in self.groups().items()}

    def actor_split_usage(self) -> dict[str, GroupUsage]:
        """Each actor group split in two: `<role>/actor` (the actor processes) and `<role>/children` (what they
        started, e.g. vLLM's engine core), to tell which process a group's growth is in."""
        split: dict[str, GroupUsage] = {}
        for role, processes in self.groups().items():
            if role not in ACTOR_CLASSES:
                continue
            actors = [process for process in processes if _role(process) == role]
            children = [process for process in processes if _role(process) != role]
            split[f"{role}/actor"], split[f"{role}/children"] = GroupUsage.of(actors), GroupUsage.of(children)
        return split

    def actor_pids(self) -> dict[str, list[int]]:
        """Per role, the pids of its actor processes (not their children), ascending."""
        groups = self.groups()
        return {role: sorted(process.pid for process in groups[role] if _role(process) == role)
                for role in ACTOR_CLASSES}

    def _orphaned(self, tree: set[int]) -> list[psutil.Process]:
        """Processes of the gateway's session outside its tree whose parent is outside too, and their children."""
        try:
            session = os.getsid(self.gateway.pid)
        except OSError:
            return []
        known = tree | {session}
        orphans: dict[int, psutil.Process] = {}
        for process in psutil.process_iter():
            try:
                if process.pid in known or os.getsid(process.pid) != session or process.ppid() in known:
                    continue
                if _in_session(process.ppid(), session):
                    continue  # a child of another orphan: added with its parent below
                for member in (process, *process.children(recursive=True)):
                    orphans[member.pid] = member
            except (OSError, psutil.Error):
                continue
        return list(orphans.values())


def session_processes(session: int) -> list[psutil.Process]:
    """Live processes of one session (e.g. what is left of a server started in its own session)."""
    alive = []
    for process in psutil.process_iter():
        try:
            if _in_session(process.pid, session) and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
        except psutil.Error:
            continue
    return alive


def _in_session(pid: int, session: int) -> bool:
    try:
        return os.getsid(pid) == session
    except OSError:
        return False


def _role(process: psutil.Process) -> str | None:
    try:
        return actor_role(process.cmdline())
    except psutil.Error:
        return None


def _owning_role(pid: int, by_pid: dict[int, psutil.Process], roles: dict[int, str | None]) -> str:
    """The role of the nearest actor process at or above `pid` in the tree, else `ray`."""
    while pid in by_pid:
        if roles[pid] is not None:
            return roles[pid]
        try:
            pid = by_pid[pid].ppid()
        except psutil.Error:
            break
    return "ray"


def kill_times(duration_s: float, mean_interval_s: float, warmup_s: float, seed: int) -> list[float]:
    """Seeded kill moments in [warmup_s, duration_s): exponential gaps of mean `mean_interval_s`."""
    rng = np.random.default_rng([seed, 11])
    times: list[float] = []
    now = warmup_s + float(rng.exponential(mean_interval_s))
    while now < duration_s:
        times.append(now)
        now += float(rng.exponential(mean_interval_s))
    return times


@dataclass(frozen=True, slots=True)
class Kill:
    at_s: float  # seconds since the load started
    role: str
    pid: int | None  # None: the role had no actor process at that moment, nothing was killed


class WorkerKiller:
    """SIGKILLs a seeded random actor process of a seeded random role among `roles`."""

    def __init__(self, processes: ServingProcesses, roles: Sequence[str], seed: int) -> None:
        self._processes = processes
        self._roles = tuple(roles)
        self._rng = np.random.default_rng([seed, 12])

    def kill_one(self, at_s: float) -> Kill:
        role = self._roles[int(self._rng.integers(len(self._roles)))]
        pick = float(self._rng.random())
        pids = self._processes.actor_pids()[role]
        if not pids:
            return Kill(at_s, role, None)
        pid = pids[int(pick * len(pids))]
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return Kill(at_s, role, None)
        return Kill(at_s, role, pid)
