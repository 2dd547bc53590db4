"""The embedding hop over loopback: our gRPC Push path against a raw TCP socket, same bytes, one run.

    python -m dvd_serve.loadtests.benchmarks.transport [--repetitions 15] [--warmup 3] [--chunk-mib 2] [--bare]

Payloads are bf16 images: 2 MiB (1 tile at hidden 4096), 26 MiB (13 tiles at 4096), 33 MiB (13 tiles at 5120).
The receiving side runs in its own process, as it does in production:
- grpc: `EmbeddingSender.push` -> `EmbeddingSinkServicer` (header and per-chunk checksum and NaN/Inf checks) ->
  `EmbeddingStore.take` hands the tensor out;
- raw: an 8-byte length prefix then the tensor's bytes on one TCP connection; the receiver `recv_into`s a
  `ReassemblyBuffer` and views it as the tensor. No checks: this is the floor.
- bare (with `--bare`; for reference, not an aim): grpc.aio with nothing of ours, the floor of any gRPC path here:
  the same chunks as plain bytes (one copy each, as our framing makes), copied into a `ReassemblyBuffer` on the
  receiver's event loop; no framing, checksums or checks. Off by default: its allocations change when glibc
  hands the other paths fresh (page-faulting) memory, so it shifts their numbers too.
Latency runs from the sender starting (`time.monotonic_ns`, one clock for both processes on Linux) to the
receiver holding the tensor. The paths alternate within every repetition so background load hits all of them.
Throughput is payload bytes / mean latency (one stream, one image at a time). The last line is JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import resource
import socket
import statistics
import struct
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from multiprocessing.queues import Queue

import grpc
import torch

from dvd_serve.lm_worker.embedding_receiver import ModelIdentity, start_embedding_server
from dvd_serve.lm_worker.embedding_store import EmbeddingStore
from dvd_serve.lm_worker.embedding_validation import EmbeddingLimits
from dvd_serve.proto.channel_options import TransportTuning, client_channel_options, server_options
from dvd_serve.proto.framing import ChunkLayout, ReassemblyBuffer, iter_chunks, tensor_bytes
from dvd_serve.vision_worker.embedding_sender import EmbeddingSender, EmbeddingSenderConfig

MIB = 1 << 20
RAW_HEADER = struct.Struct("<QII")  # total bytes, rows, columns
BARE_SERVICE = "dvd_serve.benchmark.Bare"


@dataclass(frozen=True)
class Payload:
    name: str
    tiles: int
    hidden: int

    @property
    def tokens(self) -> int:
        return self.tiles * 256

    @property
    def nbytes(self) -> int:
        return self.tokens * self.hidden * 2


PAYLOADS = (Payload("2MiB", 1, 4096), Payload("26MiB", 13, 4096), Payload("33MiB", 13, 5120))


@dataclass(frozen=True)
class _Usage:
    """This process's CPU time (all threads) and minor page faults so far. Fresh memory is costly on VMs, and CPU
    time is steadier than latency on a shared machine, so both sides report both."""

    cpu_ns: int
    page_faults: int

    @classmethod
    def now(cls) -> "_Usage":
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return cls(int((usage.ru_utime + usage.ru_stime) * 1e9), usage.ru_minflt)

    def __sub__(self, earlier: "_Usage") -> "_Usage":
        return _Usage(self.cpu_ns - earlier.cpu_ns, self.page_faults - earlier.page_faults)


# ---------------------------------------------------------------------------------------------------------------
# Receiving process


def _serve_raw(listener: socket.socket, done: Queue) -> None:
    connection, _ = listener.accept()
    connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    header = bytearray(RAW_HEADER.size)
    while True:
        if connection.recv_into(header, RAW_HEADER.size, socket.MSG_WAITALL) != RAW_HEADER.size:
            return
        total, rows, columns = RAW_HEADER.unpack(header)
        buffer = ReassemblyBuffer(total)
        view = buffer.writable_view()
        received = 0
        while received < total:
            received += connection.recv_into(view[received:], total - received)
        view.release()
        tensor = buffer.to_tensor(torch.bfloat16, (rows, columns))
        done.put(("raw", time.monotonic_ns(), tuple(tensor.shape), _Usage.now()))
        connection.sendall(b"\x01")


async def _start_bare_server(done: Queue) -> tuple[grpc.aio.Server, int]:
    async def push(messages: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
        total, rows, columns = RAW_HEADER.unpack(await anext(messages))
        buffer = ReassemblyBuffer(total)
        offset = 0
        async for chunk in messages:
            buffer.fill(offset, chunk)
            offset += len(chunk)
        tensor = buffer.to_tensor(torch.bfloat16, (rows, columns))
        done.put(("bare", time.monotonic_ns(), tuple(tensor.shape), _Usage.now()))
        return b""

    handler = grpc.method_handlers_generic_handler(BARE_SERVICE, {"Push": grpc.stream_unary_rpc_method_handler(push)})
    server = grpc.aio.server(options=server_options(TransportTuning()))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


async def _take_forever(store: EmbeddingStore, hidden: int, done: Queue) -> None:
    for sequence in range(1 << 62):
        (image,) = await store.take(f"h{hidden}-{sequence}", 1, timeout=3600)
        done.put(("grpc", time.monotonic_ns(), tuple(image.embeddings.shape), _Usage.now()))


async def _serve(hiddens: list[int], chunk_workers: int, ready: Queue, done: Queue) -> None:
    ports: dict[int, int] = {}
    servers_and_takers = []  # held: a grpc.aio server that is garbage-collected stops serving
    for hidden in hiddens:
        store = EmbeddingStore(budget_bytes=1 << 30, ttl_s=600)
        limits = EmbeddingLimits(llm_hidden_size=hidden)
        server, ports[hidden] = await start_embedding_server(
            store, limits, lambda: ModelIdentity("benchmark", "none"), lambda: True, chunk_workers=chunk_workers
        )
        servers_and_takers += [server, asyncio.create_task(_take_forever(store, hidden, done))]
    bare_server, bare_port = await _start_bare_server(done)
    servers_and_takers.append(bare_server)
    listener = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=_serve_raw, args=(listener, done), daemon=True).start()
    ready.put((ports, listener.getsockname()[1], bare_port))
    await asyncio.Event().wait()


def receiver_main(hiddens: list[int], chunk_workers: int, ready: Queue, done: Queue) -> None:
    asyncio.run(_serve(hiddens, chunk_workers, ready, done))


# ---------------------------------------------------------------------------------------------------------------
# Sending process


def _raw_send(connection: socket.socket, tensor: torch.Tensor) -> None:
    payload = tensor_bytes(tensor)
    connection.sendall(RAW_HEADER.pack(len(payload), tensor.shape[0], tensor.shape[1]))
    connection.sendall(payload)
    connection.recv(1)


async def _bare_send(push_call, tensor: torch.Tensor, chunk_bytes: int) -> None:
    payload = tensor_bytes(tensor)
    call = push_call(timeout=60)
    await call.write(RAW_HEADER.pack(len(payload), tensor.shape[0], tensor.shape[1]))
    for _, chunk in iter_chunks(payload, ChunkLayout(len(payload), chunk_bytes)):
        await call.write(bytes(chunk))
    await call.done_writing()
    await call


def _summary(nbytes: int, samples: "_Samples") -> dict:
    ordered = sorted(samples.latencies_ns)
    p90_index = max(0, round(0.9 * len(ordered)) - 1)

    def median_of(usages: list[_Usage], attribute: str) -> float:
        return statistics.median(getattr(usage, attribute) for usage in usages)

    return {
        "p50_ms": statistics.median(ordered) / 1e6,
        "p90_ms": ordered[p90_index] / 1e6,
        "throughput_gbps": nbytes / statistics.fmean(ordered),  # bytes per ns == GB/s
        "sender_cpu_ms_p50": median_of(samples.sender_usage, "cpu_ns") / 1e6,
        "receiver_cpu_ms_p50": median_of(samples.receiver_usage, "cpu_ns") / 1e6,
        "sender_page_faults_p50": median_of(samples.sender_usage, "page_faults"),
        "receiver_page_faults_p50": median_of(samples.receiver_usage, "page_faults"),
    }


@dataclass
class _Samples:
    latencies_ns: list[int] = field(default_factory=list)
    sender_usage: list[_Usage] = field(default_factory=list)
    receiver_usage: list[_Usage] = field(default_factory=list)


async def _measure(path: str, send, done: Queue, receiver_before: list[_Usage]) -> tuple[int, _Usage, _Usage]:
    """Runs one transfer; returns its latency and what it cost the sender and the receiver process."""
    sender_before = _Usage.now()
    started = time.monotonic_ns()
    await send()
    finished_path, finished, _, receiver_after = await asyncio.to_thread(done.get)
    assert finished_path == path
    sender_cost = _Usage.now() - sender_before
    receiver_cost = receiver_after - receiver_before[0]
    receiver_before[0] = receiver_after
    return finished - started, sender_cost, receiver_cost


async def run(
    payloads: list[Payload], repetitions: int, warmup: int, chunk_mib: float, chunk_workers: int, bare: bool
) -> dict:
    context = multiprocessing.get_context("spawn")
    ready, done = context.Queue(), context.Queue()
    hiddens = sorted({payload.hidden for payload in payloads})
    receiver = context.Process(target=receiver_main, args=(hiddens, chunk_workers, ready, done), daemon=True)
    receiver.start()
    ports, raw_port, bare_port = await asyncio.to_thread(ready.get)
    chunk_bytes = int(chunk_mib * MIB)
    senders = {
        hidden: EmbeddingSender(EmbeddingSenderConfig(target=f"127.0.0.1:{port}", chunk_bytes=chunk_bytes))
        for hidden, port in ports.items()
    }
    bare_channel = grpc.aio.insecure_channel(
        f"127.0.0.1:{bare_port}", options=client_channel_options(TransportTuning())
    )
    bare_call = bare_channel.stream_unary(f"/{BARE_SERVICE}/Push")
    raw_connection = socket.create_connection(("127.0.0.1", raw_port))
    raw_connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sequences = dict.fromkeys(hiddens, 0)
    receiver_before = [_Usage(0, 0)]  # the first (warm-up) transfer's receiver cost is meaningless
    results: dict[str, dict] = {}
    try:
        for payload in payloads:
            tensor = torch.randn(payload.tokens, payload.hidden).to(torch.bfloat16)
            sender = senders[payload.hidden]

            async def push_grpc() -> None:
                request_id = f"h{payload.hidden}-{sequences[payload.hidden]}"
                sequences[payload.hidden] += 1
                await sender.push(request_id, 0, tensor, [256] * payload.tiles, timeout=60)

            async def push_raw() -> None:
                await asyncio.to_thread(_raw_send, raw_connection, tensor)

            async def push_bare() -> None:
                await _bare_send(bare_call, tensor, chunk_bytes)

            paths = {"grpc": push_grpc, "raw": push_raw} | ({"bare": push_bare} if bare else {})
            samples = {path: _Samples() for path in paths}
            for repetition in range(warmup + repetitions):
                for path, send in paths.items():
                    latency, sender_cost, receiver_cost = await _measure(path, send, done, receiver_before)
                    if repetition >= warmup:
                        samples[path].latencies_ns.append(latency)
                        samples[path].sender_usage.append(sender_cost)
                        samples[path].receiver_usage.append(receiver_cost)
            summaries = {path: _summary(payload.nbytes, sample) for path, sample in samples.items()}
            results[payload.name] = {
                "bytes": payload.nbytes,
                **summaries,
                "throughput_ratio": summaries["grpc"]["throughput_gbps"] / summaries["raw"]["throughput_gbps"],
                "p50_ratio": summaries["grpc"]["p50_ms"] / summaries["raw"]["p50_ms"],
            }
            if bare:
                results[payload.name]["bare_throughput_ratio"] = (
                    summaries["bare"]["throughput_gbps"] / summaries["raw"]["throughput_gbps"]
                )
                results[payload.name]["bare_p50_ratio"] = summaries["bare"]["p50_ms"] / summaries["raw"]["p50_ms"]
    finally:
        raw_connection.close()
        await bare_channel.close()
        for sender in senders.values():
            await sender.close()
        receiver.kill()
    return results


def _print_table(results: dict[str, dict]) -> None:
    print(
        f"{'payload':>8} {'path':>5} {'p50 ms':>8} {'p90 ms':>8} {'GB/s':>6} {'cpu ms tx/rx':>14} {'faults tx/rx':>13}"
    )
    for name, result in results.items():
        for path in [path for path in ("grpc", "raw", "bare") if path in result]:
            row = result[path]
            cpu = f"{row['sender_cpu_ms_p50']:.1f}/{row['receiver_cpu_ms_p50']:.1f}"
            faults = f"{row['sender_page_faults_p50']:.0f}/{row['receiver_page_faults_p50']:.0f}"
            print(
                f"{name:>8} {path:>5} {row['p50_ms']:8.2f} {row['p90_ms']:8.2f} {row['throughput_gbps']:6.2f} "
                f"{cpu:>14} {faults:>13}"
            )
        bare = (
            f"; bare/raw: throughput {result['bare_throughput_ratio']:.2f}, p50 {result['bare_p50_ratio']:.2f}"
            if "bare" in result
            else ""
        )
        print(
            f"{name:>8} grpc/raw: throughput {result['throughput_ratio']:.2f} (aim >= 0.8), "
            f"p50 {result['p50_ratio']:.2f} (aim <= 1.5){bare}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repetitions", type=int, default=15, help="measured pushes per payload and path")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured pushes first")
    parser.add_argument("--chunk-mib", type=float, default=2.0, help="gRPC chunk size in MiB (1-4)")
    parser.add_argument("--chunk-workers", type=int, default=2, help="receiver threads that copy and check chunks")
    parser.add_argument("--bare", action="store_true", help="also time a bare grpc.aio stream (the gRPC floor)")
    parser.add_argument(
        "--payloads", default=",".join(p.name for p in PAYLOADS), help="comma-separated subset of 2MiB,26MiB,33MiB"
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    payloads = [payload for payload in PAYLOADS if payload.name in args.payloads.split(",")]
    results = asyncio.run(run(payloads, args.repetitions, args.warmup, args.chunk_mib, args.chunk_workers, args.bare))
    _print_table(results)
    settings = {key: getattr(args, key) for key in ("chunk_mib", "chunk_workers", "bare")}
    print(json.dumps({"benchmark": "transport", "settings": settings, "results": results}))


if __name__ == "__main__":
    main()
