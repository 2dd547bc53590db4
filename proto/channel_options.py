"""gRPC channel and server options for the EmbeddingSink, derived from one config so both ends agree.

Keepalive must match: the server refuses client pings that come more often than it allows (and then closes the
connection with "too_many_pings"), so both sides take their intervals from the same `TransportTuning`.
"""

from __future__ import annotations

from pydantic import Field

from dvd_serve.common.config import FrozenConfig

ChannelOptions = list[tuple[str, int]]


class TransportTuning(FrozenConfig):
    """Settings shared by the vision worker's channel and the language worker's server."""

    max_chunk_bytes: int = Field(default=4 << 20, gt=0, description="Largest chunk either side sends or accepts.")
    header_allowance_bytes: int = Field(
        default=64 << 10, gt=0, description="Room for the header and framing on top of a chunk in one message."
    )
    keepalive_time_s: float = Field(default=20.0, gt=0, description="Idle time before a side pings its peer.")
    keepalive_timeout_s: float = Field(
        default=10.0, gt=0, description="How long a ping may go unanswered before the connection counts as dead."
    )
    reconnect_initial_backoff_s: float = Field(
        default=0.1, gt=0, description="First wait before a channel reconnects after a failure."
    )
    reconnect_max_backoff_s: float = Field(default=2.0, gt=0, description="Longest wait between reconnect attempts.")

    @property
    def max_message_bytes(self) -> int:
        return self.max_chunk_bytes + self.header_allowance_bytes


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


def _shared_options(tuning: TransportTuning) -> ChannelOptions:
    return [
        ("grpc.max_send_message_length", tuning.max_message_bytes),
        ("grpc.max_receive_message_length", tuning.max_message_bytes),
        ("grpc.keepalive_time_ms", _ms(tuning.keepalive_time_s)),
        ("grpc.keepalive_timeout_ms", _ms(tuning.keepalive_timeout_s)),
        # Any unanswered ping ends the connection as fast as a keepalive ping does. Without this, a flow-control
        # (BDP) ping that a hung peer never answers blocks the keepalive ping for grpc's default of one minute.
        ("grpc.http2.ping_timeout_ms", _ms(tuning.keepalive_timeout_s)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def client_channel_options(tuning: TransportTuning) -> ChannelOptions:
    """Options for `grpc.aio.insecure_channel` / `secure_channel` on the vision side."""
    return _shared_options(tuning) + [
        ("grpc.initial_reconnect_backoff_ms", _ms(tuning.reconnect_initial_backoff_s)),
        ("grpc.min_reconnect_backoff_ms", _ms(tuning.reconnect_initial_backoff_s)),
        ("grpc.max_reconnect_backoff_ms", _ms(tuning.reconnect_max_backoff_s)),
        # Application-level retries own retrying (gRPC's own stops past its 256 KiB retry buffer anyway).
        ("grpc.enable_retries", 0),
    ]


def server_options(tuning: TransportTuning) -> ChannelOptions:
    """Options for `grpc.aio.server` on the language side."""
    return _shared_options(tuning) + [
        # Accept the client's keepalive pings at the client's rate.
        ("grpc.http2.min_ping_interval_without_data_ms", _ms(tuning.keepalive_time_s)),
        # One process per port: never share a port with another server by accident.
        ("grpc.so_reuseport", 0),
    ]
