"""Where a replica process's memory is: resident size, the C allocator's books and Python's small objects.

Read from inside the process, so it can tell apart what RSS alone cannot:
- `pymalloc_blocks` (`sys.getallocatedblocks()`): live Python small-object allocations (<= 512 bytes: most
  objects, dicts, short strings). Growing with traffic means Python objects are kept.
- `malloc_in_use_mib` (glibc `mallinfo2`, all arenas, mmapped chunks included): what native code and large Python
  buffers (tensors, bytes) hold through malloc.
- `malloc_free_mib`: memory malloc keeps free instead of giving it back (fragmentation). RSS growing while the two
  above stay flat points here.
- `children_rss_mib`: the process's children (a language replica's vLLM engine core), which it cannot look inside.
"""

from __future__ import annotations

import asyncio
import csv
import ctypes
import logging
import os
import sys
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


async def record_memory_periodically(folder: Path, role: str, interval_s: float) -> None:
    """Appends a `ProcessMemory` row to `folder/memory-<role>-<pid>.csv` every `interval_s` (until cancelled)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"memory-{role}-{os.getpid()}.csv"
    fields = ["unix_s", *ProcessMemory.__dataclass_fields__]
    with path.open("a", newline="", encoding="utf-8") as out:
        writer = csv.DictWriter(out, fieldnames=fields)
        if out.tell() == 0:
            writer.writeheader()
        while True:
            try:
                sample = await asyncio.to_thread(read_process_memory)
            except Exception:  # a failed sample must not end the replica
                logger.exception("memory sample failed")
            else:
                writer.writerow({"unix_s": round(time.time(), 1), **asdict(sample)})
                out.flush()
            await asyncio.sleep(interval_s)
