"""The locustfile: `python -m locust -f <this file> --headless ... ConcurrencyChatUser|PoissonChatUser`.

`runner.py` builds the full command line; the `--dvd-*` options below are this project's. Locust runs in its own
process because it monkey-patches the standard library with gevent.
"""

from __future__ import annotations

from locust import events

from dvd_serve.loadtests.users import ConcurrencyChatUser, LoadSession, PoissonChatUser

__all__ = ["ConcurrencyChatUser", "PoissonChatUser"]


@events.init_command_line_parser.add_listener
def _add_options(parser) -> None:
    parser.add_argument("--dvd-dataset", required=True, help="dataset file (one request body per line)")
    parser.add_argument("--dvd-samples", required=True, help="JSON-lines file the raw samples are appended to")
    parser.add_argument("--dvd-model", required=True, help="`model` value of every request")
    parser.add_argument("--dvd-api-key", default="", help="bearer key, if the server wants one")
    parser.add_argument("--dvd-first-request", type=int, default=0, help="dataset line the run starts at")
    parser.add_argument("--dvd-duration", type=float, required=True, help="seconds during which requests start")
    parser.add_argument("--dvd-drain-timeout", type=float, default=60.0, help="seconds running requests may finish")
    parser.add_argument("--dvd-request-timeout", type=float, default=300.0, help="seconds one request may take")
    parser.add_argument("--dvd-rate", type=float, default=1.0, help="open loop: mean arrivals per second")
    parser.add_argument("--dvd-seed", type=int, default=0, help="open loop: seed of the arrival times")
    parser.add_argument("--dvd-max-connections", type=int, default=1024, help="HTTP connections kept open")


@events.test_start.add_listener
def _start_session(environment, **_kwargs) -> None:
    LoadSession.start(environment)
