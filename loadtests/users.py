"""Locust users that send the dataset's streaming chat requests and log one raw sample per request.

Runs only inside the locust process (it imports locust, which monkey-patches the standard library with gevent):
never import this module from code that imports vllm or ray.

Two ways to offer load, both ending the same way:
- `ConcurrencyChatUser` (closed loop): each of `--users` users sends a request, waits for its end, sends the next.
- `PoissonChatUser` (open loop): one user starts requests at seeded exponential inter-arrival times, each in its
  own greenlet, whether or not earlier requests have finished.
After `--dvd-duration` seconds no new request starts; running ones get `--dvd-drain-timeout` seconds to finish,
then the rest are cut off and logged as `incomplete`, and the load session quits locust.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

import gevent
import requests
from gevent.pool import Group
from greenlet import GreenletExit
from locust import User, constant, task
from locust.env import Environment
from requests.adapters import HTTPAdapter

from dvd_serve.loadtests.datasets import poisson_arrivals, read_dataset, with_model
from dvd_serve.loadtests.metrics import OK, RequestSample
from dvd_serve.loadtests.stream import ChatStreamReader

VISUAL_TOKENS_HEADER = "x-dvd-visual-tokens"
COORDINATOR_POLL_S = 0.05
READ_SIZE = 65536


class SampleLog:
    """Appends one JSON line per finished request (flushed at once, so a killed run keeps what it measured)."""

    def __init__(self, path: Path) -> None:
        self._file: IO[str] = path.open("a", encoding="utf-8")

    def write(self, sample: RequestSample) -> None:
        self._file.write(sample.to_json() + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class ChatRequestSender:
    """Posts one request body and follows its stream; never raises except to let a kill through."""

    def __init__(self, base_url: str, api_key: str | None, timeout_s: float, max_connections: int,
                 record: Callable[[RequestSample], None]) -> None:
        self.record = record
        self.url = base_url.rstrip("/") + "/v1/chat/completions"
        self.timeout_s = timeout_s
        self.headers = {"content-type": "application/json"}
        if api_key:
            self.headers["authorization"] = f"Bearer {api_key}"
        self.http = requests.Session()
        self.http.mount("http://", HTTPAdapter(pool_connections=1, pool_maxsize=max_connections))
        self.http.mount("https://", HTTPAdapter(pool_connections=1, pool_maxsize=max_connections))

    def send(self, request_index: int, body: bytes) -> RequestSample:
        started_wall, started = time.time(), time.perf_counter()
        reader = ChatStreamReader()
        status, error, visual_tokens = OK, "", None
        try:
            with gevent.Timeout(self.timeout_s):
                with self.http.post(self.url, data=body, headers=self.headers, stream=True) as response:
                    if VISUAL_TOKENS_HEADER in response.headers:
                        visual_tokens = int(response.headers[VISUAL_TOKENS_HEADER])
                    if response.status_code != 200:
                        status, error = f"http_{response.status_code}", response.text[:300]
                    else:
                        # read1: whatever has arrived, chunked or not (iter_content waits for EOF on a
                        # response without chunked encoding).
                        while chunk := response.raw.read1(READ_SIZE):
                            reader.feed(chunk, time.perf_counter() - started)
            if status == OK and reader.outcome.error is not None:
                status, error = "stream_error", reader.outcome.error
            elif status == OK and not reader.outcome.done:
                status, error = "stream_error", "the stream ended without [DONE]"
        except gevent.Timeout:
            status, error = "timeout", f"no end within {self.timeout_s} s"
        except requests.RequestException as failure:
            status, error = "connection_error", str(failure)[:300]
        except GreenletExit:
            status, error = "incomplete", "cut off at the end of the drain"
            raise
        except Exception as failure:  # a malformed answer (e.g. a bad header) fails this request, not the run
            status, error = "client_error", f"{type(failure).__name__}: {failure}"[:300]
        finally:
            outcome = reader.outcome
            sample = RequestSample(
                request_index=request_index,
                start_s=started_wall,
                e2e_s=time.perf_counter() - started,
                ttft_s=outcome.first_output_at,
                output_tokens=outcome.completion_tokens if outcome.completion_tokens is not None
                else outcome.content_chunks,
                prompt_tokens=outcome.prompt_tokens or 0,
                status=status,
                error=error,
                visual_tokens=visual_tokens,
            )
            self.record(sample)
        return sample


class LoadSession:
    """State of one locust run: the dataset, the sample log, the deadline, and the requests in flight."""

    _current: "LoadSession | None" = None

    def __init__(self, environment: Environment) -> None:
        options = environment.parsed_options
        self.environment = environment
        self.bodies = [with_model(body, options.dvd_model) for body in read_dataset(Path(options.dvd_dataset))]
        if not self.bodies:
            raise ValueError(f"the dataset {options.dvd_dataset} is empty")
        self.first_request = options.dvd_first_request
        self.duration_s = options.dvd_duration
        self.drain_timeout_s = options.dvd_drain_timeout
        self.rate_per_s = options.dvd_rate
        self.seed = options.dvd_seed
        self.log = SampleLog(Path(options.dvd_samples))
        self.sender = ChatRequestSender(
            options.host, options.dvd_api_key, options.dvd_request_timeout, options.dvd_max_connections,
            record=self.log.write,
        )
        self.started = time.perf_counter()
        self.stopping = False
        self.in_flight = 0
        self.sent = 0
        self.open_loop = Group()
        self.dispatching = False  # the open-loop schedule still has arrivals to start

    @classmethod
    def start(cls, environment: Environment) -> "LoadSession":
        cls._current = cls(environment)
        gevent.spawn(cls._current._coordinate)
        return cls._current

    @classmethod
    def current(cls) -> "LoadSession":
        if cls._current is None:
            raise RuntimeError("no load session: the locustfile starts one on test_start")
        return cls._current

    def send_next(self) -> None:
        """Sends the next request of the dataset (in order, from `first_request`, wrapping around)."""
        index = self.first_request + self.sent
        self.sent += 1
        self.in_flight += 1
        try:
            sample = self.sender.send(index, self.bodies[index % len(self.bodies)])
        finally:
            self.in_flight -= 1
        self.environment.events.request.fire(
            request_type="POST", name="chat", response_time=sample.e2e_s * 1000.0,
            response_length=sample.output_tokens, exception=None if sample.ok else RuntimeError(sample.status),
            context={},
        )

    def run_arrivals(self) -> None:
        """Open loop: starts a request at each seeded arrival time, each in its own greenlet.

        Every arrival of the schedule is sent, even one that a busy process wakes up for after `duration_s`,
        so each run sends exactly the same requests.
        """
        self.dispatching = True
        try:
            for arrival in poisson_arrivals(self.rate_per_s, self.duration_s, self.seed):
                gevent.sleep(max(0.0, self.started + arrival - time.perf_counter()))
                self.open_loop.spawn(self.send_next)
        finally:
            self.dispatching = False

    def _coordinate(self) -> None:
        gevent.sleep(self.duration_s)
        self.stopping = True
        drain_until = time.perf_counter() + self.drain_timeout_s
        while (self.in_flight or self.dispatching or len(self.open_loop)) and time.perf_counter() < drain_until:
            gevent.sleep(COORDINATOR_POLL_S)
        self.open_loop.kill(block=True)
        self.environment.runner.quit()  # kills closed-loop users, whose requests then log `incomplete`
        self.log.close()


class ConcurrencyChatUser(User):
    """Closed loop: one request at a time, back to back."""

    wait_time = constant(0)

    @task
    def chat(self) -> None:
        session = LoadSession.current()
        if session.stopping:
            gevent.sleep(session.drain_timeout_s + 60.0)  # idle until the session quits locust
            return
        session.send_next()


class PoissonChatUser(User):
    """Open loop: run exactly one of these (`--users 1`); it offers `--dvd-rate` requests/s on average."""

    fixed_count = 1
    wait_time = constant(0)

    @task
    def arrive(self) -> None:
        session = LoadSession.current()
        session.run_arrivals()
        gevent.sleep(session.duration_s + session.drain_timeout_s + 60.0)  # idle until the session quits locust
