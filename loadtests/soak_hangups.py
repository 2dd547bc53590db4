"""Clients that hang up on purpose: the soak's source of cancelled requests.

Each request streams and its client closes the connection at the first streamed content, or after a seeded delay
if no content came by then (usually while the gateway still waits for the first token: it then logs a 499).
Requests start at seeded Poisson arrival times, each on a thread of a bounded pool. Plain threads and httpx: this
runs in the soak's own process, next to psutil (never import `users.py` here: locust patches the standard
library on import).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np

from dvd_serve.loadtests.metrics import OK, RequestSample
from dvd_serve.loadtests.soak_accounting import CANCELLED_STATUS, STREAM_CUT_ERROR
from dvd_serve.loadtests.stream import ChatStreamReader, StreamOutcome

CONNECT_TIMEOUT_S = 10.0


def hang_up_delays(count: int, shortest_s: float, longest_s: float, seed: int) -> list[float]:
    """Seconds each request's client waits for content before it hangs up anyway (uniform, seeded)."""
    rng = np.random.default_rng([seed, 13])
    return [float(value) for value in rng.uniform(shortest_s, longest_s, count)]


def stream_status(outcome: StreamOutcome, hung_up: bool) -> tuple[str, str]:
    """Status and error of a 200 stream the client stopped reading (`hung_up`) or read to its end."""
    if outcome.error is not None:
        return "stream_error", outcome.error
    if outcome.done:
        return OK, ""
    if hung_up:
        return CANCELLED_STATUS, ""
    return "stream_error", STREAM_CUT_ERROR


class HangUpClient:
    """Sends one streaming request at a time per thread and hangs up as described above; never raises."""

    def __init__(self, base_url: str, api_key: str | None) -> None:
        self.url = base_url.rstrip("/") + "/v1/chat/completions"
        self.headers = {"content-type": "application/json"}
        if api_key:
            self.headers["authorization"] = f"Bearer {api_key}"
        self._http = httpx.Client(limits=httpx.Limits(max_connections=None, max_keepalive_connections=0))

    def send(self, request_index: int, body: bytes, hang_up_after_s: float) -> RequestSample:
        started_wall, started = time.time(), time.perf_counter()
        reader = ChatStreamReader()
        status, error = CANCELLED_STATUS, ""
        timeout = httpx.Timeout(hang_up_after_s, connect=CONNECT_TIMEOUT_S)
        try:
            with self._http.stream("POST", self.url, content=body, headers=self.headers, timeout=timeout) as response:
                if response.status_code != 200:
                    status = f"http_{response.status_code}"
                else:
                    hung_up = False
                    for chunk in response.iter_raw():
                        elapsed = time.perf_counter() - started
                        reader.feed(chunk, elapsed)
                        outcome = reader.outcome
                        if outcome.error is not None or outcome.done:
                            break
                        if outcome.first_output_at is not None or elapsed >= hang_up_after_s:
                            hung_up = True
                            break
                    status, error = stream_status(reader.outcome, hung_up)
        except httpx.ReadTimeout:
            pass  # nothing (more) arrived within the delay: the client hangs up, a cancellation
        except httpx.HTTPError as failure:
            status, error = "connection_error", f"{type(failure).__name__}: {failure}"[:300]
        return RequestSample(
            request_index=request_index, start_s=started_wall, e2e_s=time.perf_counter() - started,
            ttft_s=reader.outcome.first_output_at, output_tokens=reader.outcome.content_chunks, prompt_tokens=0,
            status=status, error=error,
        )

    def close(self) -> None:
        self._http.close()


def run_hang_ups(client: HangUpClient, bodies: Sequence[bytes], arrivals: Sequence[float],
                 delays: Sequence[float], max_workers: int) -> list[RequestSample]:
    """Sends `bodies[i]` at `arrivals[i]` seconds from now, each hanging up after `delays[i]`; one sample each."""
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="hang-up") as pool:
        futures = []
        for index, (arrival, delay) in enumerate(zip(arrivals, delays, strict=True)):
            time.sleep(max(0.0, started + arrival - time.perf_counter()))
            futures.append(pool.submit(client.send, index, bodies[index % len(bodies)], delay))
        return [future.result() for future in futures]
