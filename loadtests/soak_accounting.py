"""The soak's request accounting: every accepted request ends in exactly one terminal outcome.

    accepted = succeeded + client errors + server errors + cancelled

Two views are counted and compared:
- the clients': one `RequestSample` per request sent; `accepted` is how many requests the load generators sent
  (fixed in advance by the seeded schedules), so a request that left no sample, or a sample without a terminal
  status (timeout, connection error, a stream cut without `data: [DONE]`), breaks the identity.
- the gateway's: the difference of two `/metrics` scrapes, `dvd_http_requests` of the chat route by status and
  `dvd_stream_aborts` by reason (a streamed answer is counted as 200 even when it later ends in an error event or a
  disconnect, so those aborts move it out of "succeeded").

Outcomes by status: 200 with `[DONE]` = succeeded; 4xx = client error, 429 (admission refused the request)
included: it was accepted and answered, just refused; 499 = cancelled (the client went away before the answer);
5xx or an in-stream error event = server error; a hang-up by the soak's disconnecting client = cancelled.
Pure functions only: no clock, no network.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum

from dvd_serve.loadtests.metrics import OK, RequestSample

CHAT_ENDPOINT = "/v1/chat/completions"
CANCELLED_STATUS = "cancelled"  # status of a sample whose client hung up on purpose
CLIENT_CLOSED_HTTP_STATUS = 499  # the gateway's code for "client went away before any answer"
CLIENT_DISCONNECTED_REASON = "client_disconnected"  # `dvd_stream_aborts` reason of a hang-up mid-stream
# The error text `users.ChatRequestSender` logs for a stream that ended without `[DONE]` and without an error event.
STREAM_CUT_ERROR = "the stream ended without [DONE]"
_ERROR_CODE = re.compile(r'"code"\s*:\s*"([^"]+)"')  # in a (possibly truncated) OpenAI-style error body


class Outcome(StrEnum):
    SUCCEEDED = "succeeded"
    CLIENT_ERROR = "client_errors"
    SERVER_ERROR = "server_errors"
    CANCELLED = "cancelled"
    UNRESOLVED = "unresolved"  # no terminal outcome: timeout, connection error, cut stream, cut off at the end


def http_outcome(code: int) -> Outcome:
    if code == CLIENT_CLOSED_HTTP_STATUS:
        return Outcome.CANCELLED
    if 200 <= code < 300:
        return Outcome.SUCCEEDED
    if 400 <= code < 500:
        return Outcome.CLIENT_ERROR
    if code >= 500:
        return Outcome.SERVER_ERROR
    return Outcome.UNRESOLVED


def outcome_of(sample: RequestSample) -> Outcome:
    """The terminal outcome of one request as its client saw it."""
    status = sample.status
    if status == OK:
        return Outcome.SUCCEEDED
    if status == CANCELLED_STATUS:
        return Outcome.CANCELLED
    if status.startswith("http_") and status[5:].isdigit():
        return http_outcome(int(status[5:]))
    if status == "stream_error" and sample.error != STREAM_CUT_ERROR:
        return Outcome.SERVER_ERROR  # an error event, then `[DONE]`: the server ended the request properly
    return Outcome.UNRESOLVED


@dataclass(frozen=True, slots=True)
class OutcomeCounts:
    """Accepted requests and their terminal outcomes, as one side counted them."""

    accepted: int
    succeeded: int = 0
    client_errors: int = 0
    server_errors: int = 0
    cancelled: int = 0

    @property
    def terminal(self) -> int:
        return self.succeeded + self.client_errors + self.server_errors + self.cancelled

    @property
    def unresolved(self) -> int:
        """Accepted requests without a terminal outcome (negative when more outcomes than requests were counted)."""
        return self.accepted - self.terminal

    @property
    def balanced(self) -> bool:
        """accepted == succeeded + client errors + server errors + cancelled, every term non-negative."""
        terms = (self.succeeded, self.client_errors, self.server_errors, self.cancelled)
        return self.unresolved == 0 and min(terms) >= 0

    def as_dict(self) -> dict[str, int | bool]:
        return {**dataclasses.asdict(self), "unresolved": self.unresolved, "balanced": self.balanced}


def client_counts(accepted: int, samples: Iterable[RequestSample]) -> OutcomeCounts:
    """`accepted` requests sent; outcomes from their samples (unresolved ones and missing samples count in none)."""
    tally = dict.fromkeys(Outcome, 0)
    for sample in samples:
        tally[outcome_of(sample)] += 1
    return _counts(accepted, tally)


def gateway_counts(
    chat_statuses: Mapping[str, float], stream_aborts: Mapping[str, float]
) -> OutcomeCounts:
    """Outcomes from the gateway's counter differences: chat requests by status code, stream aborts by reason.

    Every streamed answer that aborted was first counted as a 200, so its abort moves it from succeeded to
    cancelled (client gone) or server errors (any other reason).
    """
    tally = dict.fromkeys(Outcome, 0)
    for status, count in chat_statuses.items():
        tally[http_outcome(int(status)) if status.isdigit() else Outcome.UNRESOLVED] += round(count)
    for reason, count in stream_aborts.items():
        moved_to = Outcome.CANCELLED if reason == CLIENT_DISCONNECTED_REASON else Outcome.SERVER_ERROR
        tally[Outcome.SUCCEEDED] -= round(count)
        tally[moved_to] += round(count)
    return _counts(round(sum(chat_statuses.values())), tally)


def error_causes(samples: Iterable[RequestSample]) -> dict[str, int]:
    """Failed requests (errors and unresolved) by status and error code or message, most frequent first."""
    causes: dict[str, int] = {}
    for sample in samples:
        if outcome_of(sample) in (Outcome.SUCCEEDED, Outcome.CANCELLED):
            continue
        code = _ERROR_CODE.search(sample.error)
        cause = f"{sample.status} {code.group(1) if code else sample.error[:60]}".strip()
        causes[cause] = causes.get(cause, 0) + 1
    return dict(sorted(causes.items(), key=lambda item: -item[1]))


def failed_before_streaming(causes: Mapping[str, int]) -> int:
    """Requests of `error_causes` answered with a 5xx status, i.e. before any byte of their stream was sent."""
    return sum(count for cause, count in causes.items() if cause.startswith("http_5"))


def _counts(accepted: int, tally: Mapping[Outcome, int]) -> OutcomeCounts:
    return OutcomeCounts(
        accepted=accepted,
        succeeded=tally[Outcome.SUCCEEDED],
        client_errors=tally[Outcome.CLIENT_ERROR],
        server_errors=tally[Outcome.SERVER_ERROR],
        cancelled=tally[Outcome.CANCELLED],
    )


def differing_fields(client: OutcomeCounts, gateway: OutcomeCounts) -> list[str]:
    """Outcomes the two views count differently (a hang-up racing the last token may land on either side)."""
    return [
        name for name in ("accepted", "succeeded", "client_errors", "server_errors", "cancelled")
        if getattr(client, name) != getattr(gateway, name)
    ]


@dataclass(frozen=True, slots=True)
class Check:
    """One pass/fail condition of the soak, with what was seen."""

    name: str
    passed: bool
    detail: str


def identity_checks(client: OutcomeCounts, gateway: OutcomeCounts | None) -> list[Check]:
    """The conditions on the counts that fail the soak."""
    checks = [
        Check("client identity", client.balanced,
              f"accepted {client.accepted} = {client.terminal} terminal + {client.unresolved} without an outcome"),
    ]
    if gateway is not None:
        checks.append(Check("gateway identity", gateway.balanced,
                            f"accepted {gateway.accepted} = {gateway.terminal} terminal + {gateway.unresolved} other"))
        checks.append(Check("gateway saw every request", gateway.accepted == client.accepted,
                            f"gateway counted {gateway.accepted} finished chat requests, clients sent "
                            f"{client.accepted}"))
    return checks


def exit_status(checks: Iterable[Check]) -> int:
    return 0 if all(check.passed for check in checks) else 1
