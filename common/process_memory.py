"""Where a replica process's memory is: resident size, the C allocator's books and Python's small objects.

Read from inside the process, so it can tell apart what RSS alone cannot:
- `pymalloc_blocks` (`sys.getallocatedblocks()`): live Python small-object allocations (<= 512 bytes: most
  objects, dicts, short strings). Growing with traffic means Python objects are kept.
- `malloc_in_use_mib` (glibc `mallinfo2`, all arenas, mmapped chunks included): what native code and large Python
  buffers (tensors, bytes) hold through malloc.
- `malloc_free_mib`: memory malloc keeps free instead of giving it back (fragmentation). RSS growing while the two
  above stay flat points here.
- `children_rss_mib`: the process's children (a language replica's vLLM engine core); the engine core samples
  itself into its own file (`language_engine`) when its replica asks (`ask_engine_processes_to_record`).
"""

from __future__ import annotations

import asyncio
import csv
import ctypes
import json
import logging
import os
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

logger = logging.getLogger(__name__)
MIB = 1024 * 1024
_MALLINFO2_FIELDS = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                     "keepcost")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in _MALLINFO2_FIELDS]


@dataclass(frozen=True, slots=True)
class ProcessMemory:
    rss_mib: float
    pymalloc_blocks: int
    malloc_in_use_mib: float | None  # None: not glibc
    malloc_free_mib: float | None
    children_rss_mib: float


def _mallinfo2() -> _MallInfo2 | None:
    try:
        function = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return None
    function.restype = _MallInfo2
    return function()


def read_process_memory() -> ProcessMemory:
    process = psutil.Process()
    children = 0
    for child in process.children(recursive=True):
        try:
            children += child.memory_info().rss
        except psutil.Error:
            continue
    info = _mallinfo2()
    return ProcessMemory(
        rss_mib=process.memory_info().rss / MIB,
        pymalloc_blocks=sys.getallocatedblocks(),
        malloc_in_use_mib=None if info is None else (info.uordblks + info.hblkhd) / MIB,
        malloc_free_mib=None if info is None else info.fordblks / MIB,
        children_rss_mib=children / MIB,
    )


class MemoryRecorder:
    """Appends one `ProcessMemory` row per `sample()` to `folder/memory-<role>-<pid>.csv`."""

    def __init__(self, folder: Path, role: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"memory-{role}-{os.getpid()}.csv"
        self._fields = ["unix_s", *ProcessMemory.__dataclass_fields__]

    def sample(self) -> None:
        row = {"unix_s": round(time.time(), 1), **asdict(read_process_memory())}
        with self.path.open("a", newline="", encoding="utf-8") as out:
            writer = csv.DictWriter(out, fieldnames=self._fields)
            if out.tell() == 0:
                writer.writeheader()
            writer.writerow(row)


async def record_memory_periodically(folder: Path, role: str, interval_s: float) -> None:
    """Samples this process every `interval_s` (until cancelled); a failed sample is logged, never fatal."""
    recorder = MemoryRecorder(folder, role)
    while True:
        try:
            await asyncio.to_thread(recorder.sample)
        except Exception:
            logger.exception("memory sample failed")
        await asyncio.sleep(interval_s)


# How a language replica asks the vLLM engine-core process it starts to sample itself too: the replica sets this
# variable (folder, interval and its own pid as JSON) before starting the engine; the vLLM plugin, which vLLM loads
# in every engine process, starts a sampling thread in any process other than the replica's own.
ENGINE_MEMORY_REPORT_ENV = "DVD_SERVE_ENGINE_MEMORY_REPORT"
_engine_recorder_started = False  # vLLM may load its plugins more than once in one process


def ask_engine_processes_to_record(folder: Path, interval_s: float) -> None:
    os.environ[ENGINE_MEMORY_REPORT_ENV] = json.dumps(
        {"folder": str(folder), "interval_s": interval_s, "parent_pid": os.getpid()}
    )


def record_engine_memory_if_asked() -> None:
    """In a vLLM engine process started by a language replica that asked for it: sample on a daemon thread."""
    request = os.environ.get(ENGINE_MEMORY_REPORT_ENV)
    if not request:
        return
    global _engine_recorder_started
    settings = json.loads(request)
    if settings["parent_pid"] == os.getpid() or _engine_recorder_started:
        return
    _engine_recorder_started = True
    recorder = MemoryRecorder(Path(settings["folder"]), "language_engine")

    def run() -> None:
        while True:
            try:
                recorder.sample()
            except Exception:
                logger.exception("memory sample failed")
            time.sleep(settings["interval_s"])

    threading.Thread(target=run, name="dvd-memory-report", daemon=True).start()
