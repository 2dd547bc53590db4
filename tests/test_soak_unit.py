"""The soak's accounting and bookkeeping without any server: outcome classification, the identity on both
views, /metrics parsing against the real metric definitions, kill schedules, process grouping by title, and the
rendered report."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time

import pytest

from dvd_serve.loadtests.metrics import RequestSample, write_rows_csv
from dvd_serve.loadtests.soak_accounting import (
    STREAM_CUT_ERROR,
    Outcome,
    OutcomeCounts,
    client_counts,
    differing_fields,
    error_causes,
    failed_before_streaming,
    exit_status,
    gateway_counts,
    identity_checks,
    outcome_of,
)
from dvd_serve.loadtests.soak_gateway import counter_delta, in_flight_check, parse_scrape
from dvd_serve.loadtests.soak_hangups import hang_up_delays, stream_status
from dvd_serve.loadtests.soak_processes import (
    ACTOR_CLASSES,
    GroupUsage,
    Kill,
    ServingProcesses,
    WorkerKiller,
    actor_role,
    kill_times,
)
from dvd_serve.loadtests.stream import StreamOutcome
from dvd_serve.server.metrics import ServingMetrics


def _sample(status: str, error: str = "") -> RequestSample:
    return RequestSample(0, 0.0, 1.0, None, 0, 0, status, error)


# ---- outcomes and the identity ----


@pytest.mark.parametrize(("status", "error", "outcome"), [
    ("ok", "", Outcome.SUCCEEDED),
    ("cancelled", "", Outcome.CANCELLED),
    ("http_400", "", Outcome.CLIENT_ERROR),
    ("http_429", "", Outcome.CLIENT_ERROR),  # admission refused it: accepted, answered, refused
    ("http_499", "", Outcome.CANCELLED),
    ("http_503", "", Outcome.SERVER_ERROR),
    ("http_504", "", Outcome.SERVER_ERROR),
    ("stream_error", "A language replica stopped while serving the request.", Outcome.SERVER_ERROR),
    ("stream_error", STREAM_CUT_ERROR, Outcome.UNRESOLVED),
    ("timeout", "no end within 120 s", Outcome.UNRESOLVED),
    ("connection_error", "reset", Outcome.UNRESOLVED),
    ("incomplete", "cut off at the end of the drain", Outcome.UNRESOLVED),
    ("client_error", "ValueError: bad header", Outcome.UNRESOLVED),
])
def test_every_status_has_one_outcome(status, error, outcome):
    assert outcome_of(_sample(status, error)) is outcome


def test_client_identity_holds_when_every_request_ended():
    samples = [_sample(s) for s in ("ok", "ok", "http_429", "http_503", "cancelled", "stream_error")]
    counts = client_counts(6, samples)
    assert (counts.succeeded, counts.client_errors, counts.server_errors, counts.cancelled) == (2, 1, 2, 1)
    assert counts.balanced and counts.unresolved == 0
    assert identity_checks(counts, None)[0].passed


@pytest.mark.parametrize("samples", [
    [_sample("ok")],  # a request sent without any sample
    [_sample("ok"), _sample("timeout")],  # a request without a terminal outcome
    [_sample("ok"), _sample("stream_error", STREAM_CUT_ERROR)],
])
def test_client_identity_breaks_on_missing_or_unresolved_requests(samples):
    counts = client_counts(2, samples)
    assert not counts.balanced and counts.unresolved == 1
    assert exit_status(identity_checks(counts, None)) == 1


def test_gateway_counts_move_aborted_streams_out_of_succeeded():
    counts = gateway_counts({"200": 10, "429": 2, "499": 1, "503": 3},
                            {"client_disconnected": 2, "replica_unavailable": 1})
    assert counts == OutcomeCounts(accepted=16, succeeded=7, client_errors=2, server_errors=4, cancelled=3)
    assert counts.balanced


def test_gateway_identity_breaks_when_more_streams_aborted_than_started():
    counts = gateway_counts({"200": 1}, {"client_disconnected": 2})
    assert counts.succeeded == -1 and not counts.balanced


def test_gateway_must_count_every_request_the_clients_sent():
    clients = OutcomeCounts(accepted=5, succeeded=5)
    gateway = OutcomeCounts(accepted=4, succeeded=4)
    checks = {check.name: check.passed for check in identity_checks(clients, gateway)}
    assert checks == {"client identity": True, "gateway identity": True, "gateway saw every request": False}
    assert differing_fields(clients, gateway) == ["accepted", "succeeded"]
    assert exit_status(identity_checks(clients, clients)) == 0


def test_error_causes_name_the_error_code_of_failed_requests():
    body = '{"error":{"message":"No language replica is available.","type":"service_unavailable_error",' \
           '"param":null,"code":"no_replica_available"}}'
    samples = [_sample("http_503", body), _sample("http_503", body), _sample("ok"), _sample("cancelled"),
               _sample("stream_error", "A vision replica stopped."), _sample("http_503", body[:40])]
    assert error_causes(samples) == {"http_503 no_replica_available": 2, "stream_error A vision replica stopped.": 1,
                                     'http_503 {"error":{"message":"No language replica': 1}
    assert failed_before_streaming(error_causes(samples)) == 3  # the 5xx answers; the stream error had started


# ---- /metrics ----


def _exposition(metrics: ServingMetrics) -> str:
    return metrics.exposition().decode()


def test_parse_scrape_reads_the_real_metric_names():
    metrics = ServingMetrics()
    metrics.requests.labels("/v1/chat/completions", "200").inc(3)
    metrics.requests.labels("/v1/chat/completions", "429").inc()
    metrics.requests.labels("/metrics", "200").inc(7)
    metrics.stream_aborts.labels("client_disconnected").inc(2)
    metrics.gateway_in_flight.inc()  # the scrape itself
    metrics.pool_in_flight.labels("vision").inc()
    metrics.pool_in_flight.labels("language")
    scrape = parse_scrape(_exposition(metrics))
    assert scrape.chat_statuses == {"200": 3.0, "429": 1.0}
    assert scrape.stream_aborts == {"client_disconnected": 2.0}
    assert scrape.gateway_in_flight == 0.0
    assert {name: value for name, value in scrape.pool_gauges.items() if "in flight" in name} == {
        "vision in flight": 1.0, "language in flight": 0.0}
    check = in_flight_check(scrape)
    assert not check.passed and "vision in flight 1" in check.detail
    metrics.pool_in_flight.labels("vision").dec()
    assert in_flight_check(parse_scrape(_exposition(metrics))).passed
    metrics.gateway_in_flight.inc()  # another request still being served
    assert not in_flight_check(parse_scrape(_exposition(metrics))).passed


def test_admission_places_must_be_released_too():
    exposition = ("# TYPE dvd_gateway_in_flight_requests gauge\ndvd_gateway_in_flight_requests 1.0\n"
                  "# TYPE dvd_pool_admitted_jobs gauge\ndvd_pool_admitted_jobs{pool=\"language\"} 2.0\n")
    scrape = parse_scrape(exposition)
    assert scrape.pool_gauges == {"language admitted": 2.0}
    assert not in_flight_check(scrape).passed


def test_the_cache_check_reads_the_vision_cache_metrics_and_holds_them_to_the_budget():
    from dvd_serve.loadtests.soak_run import SoakConfig, cache_budget_check

    metrics = ServingMetrics()
    before = parse_scrape(_exposition(metrics))
    metrics.vision_cache_lookups.labels("hit").inc(5)
    metrics.vision_cache_lookups.labels("miss").inc(3)
    metrics.vision_cache_bytes.labels("vision-0").set(3 * 2**20)
    after = parse_scrape(_exposition(metrics))
    assert after.vision_cache_bytes == {"vision-0": 3 * 2**20}
    assert after.vision_cache_lookups == {"hit": 5.0, "miss": 3.0}
    config = SoakConfig(repeated_image_share=0.5, vision_cache_mib=4.0)
    rows = [{"at_s": 0.0, "replica": "vision-0", "cache_mib": 1.0}, {"at_s": 10.0, "replica": "vision-0",
                                                                      "cache_mib": 3.0}]
    check = cache_budget_check(config, rows, before, after)
    assert check.passed and "peak 3 MiB of 4 MiB" in check.detail and "5 hit / 3 miss" in check.detail
    over = [*rows, {"at_s": 20.0, "replica": "vision-1", "cache_mib": 4.5}]
    assert not cache_budget_check(config, over, before, after).passed
    assert not cache_budget_check(config, rows, before, before).passed  # repeats asked for, none hit
    assert cache_budget_check(config.model_copy(update={"repeated_image_share": 0.0}), rows, before, before).passed


def test_counter_delta_keeps_what_moved():
    assert counter_delta({"200": 4.0, "503": 1.0}, {"200": 9.0, "503": 1.0, "429": 2.0}) == {"200": 5.0, "429": 2.0}


# ---- hang-up clients ----


@pytest.mark.parametrize(("stream", "hung_up", "outcome"), [
    (StreamOutcome(error="replica died"), True, Outcome.SERVER_ERROR),
    (StreamOutcome(done=True), False, Outcome.SUCCEEDED),
    (StreamOutcome(first_output_at=0.1), True, Outcome.CANCELLED),
    (StreamOutcome(), True, Outcome.CANCELLED),  # no output within its delay: it left anyway
    (StreamOutcome(), False, Outcome.UNRESOLVED),  # the server closed the stream without [DONE]
])
def test_stream_status_of_a_hang_up(stream, hung_up, outcome):
    assert outcome_of(_sample(*stream_status(stream, hung_up))) is outcome


def test_hang_up_delays_are_seeded_and_in_range():
    delays = hang_up_delays(50, 0.2, 3.0, seed=4)
    assert delays == hang_up_delays(50, 0.2, 3.0, seed=4) != hang_up_delays(50, 0.2, 3.0, seed=5)
    assert all(0.2 <= delay <= 3.0 for delay in delays)


# ---- kills and processes ----


def test_kill_times_are_seeded_sorted_and_bounded():
    times = kill_times(600.0, 30.0, 10.0, seed=1)
    assert times == kill_times(600.0, 30.0, 10.0, seed=1) != kill_times(600.0, 30.0, 10.0, seed=2)
    assert times == sorted(times) and all(10.0 <= at < 600.0 for at in times)
    assert 8 <= len(times) <= 35  # about (600 - 10) / 30
    assert kill_times(5.0, 30.0, 10.0, seed=1) == []


@pytest.mark.parametrize(("title", "role"), [
    (["ray::VisionActor"], "vision"),
    (["ray::VisionActor.process"], "vision"),
    (["ray::LanguageActor.generate"], "language"),
    (["ray::CoupledActor"], "coupled"),
    (["ray::VisionActorPool"], None),
    (["ray::IDLE"], None),
    (["/usr/bin/python", "ray::VisionActor"], None),
    ([], None),
])
def test_actor_role_from_the_process_title(title, role):
    assert actor_role(title) == role


def test_actor_class_names_match_the_ray_actors():
    from dvd_serve.server.ray_pipeline import ACTOR_CLASSES as RAY_ACTORS

    assert {role: RAY_ACTORS[role].__ray_metadata__.class_name for role in RAY_ACTORS} == ACTOR_CLASSES


@pytest.fixture
def titled_children():
    """A child titled like a vision actor, with a child of its own, and an untitled child (test doubles)."""
    actor = subprocess.Popen(["bash", "-c", "exec -a ray::VisionActor.process bash -c 'sleep 60 & wait'"])
    other = subprocess.Popen(["sleep", "60"])
    time.sleep(0.5)
    yield actor, other
    for process in (actor, other):
        process.kill()
        process.wait()


def test_serving_processes_group_actors_with_their_children(titled_children):
    actor, other = titled_children
    processes = ServingProcesses(os.getpid())
    groups = processes.groups()
    vision_pids = {process.pid for process in groups["vision"]}
    assert actor.pid in vision_pids and len(vision_pids) == 2  # the actor and its sleep
    assert other.pid in {process.pid for process in groups["ray"]}
    assert [process.pid for process in groups["gateway"]] == [os.getpid()]
    assert processes.actor_pids() == {"vision": [actor.pid], "language": [], "coupled": []}
    usage = processes.usage()["vision"]
    assert usage.processes == 2 and usage.rss_mib > 0 and usage.open_fds >= 3 and usage.threads >= 2
    split = processes.actor_split_usage()
    assert (split["vision/actor"].processes, split["vision/children"].processes) == (1, 1)
    assert split["language/actor"].processes == split["language/children"].processes == 0


class _FixedActors:
    """Test double of `ServingProcesses`: fixed actor pids per role."""

    def __init__(self, pids: dict[str, list[int]]) -> None:
        self.pids = pids

    def actor_pids(self) -> dict[str, list[int]]:
        return {role: self.pids.get(role, []) for role in ACTOR_CLASSES}


def test_worker_killer_sigkills_a_live_actor_and_skips_missing_roles():
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        kill = WorkerKiller(_FixedActors({"vision": [victim.pid]}), ["vision"], seed=0).kill_one(12.0)
        assert kill == Kill(12.0, "vision", victim.pid)
        assert victim.wait(timeout=10) == -9
    finally:
        victim.kill()
    assert WorkerKiller(_FixedActors({}), ["language"], seed=0).kill_one(1.0) == Kill(1.0, "language", None)


# ---- report ----


def test_report_renders_the_identity_and_resources():
    from dvd_serve.loadtests.soak_report import headline_json, markdown
    from dvd_serve.loadtests.soak_run import SoakConfig, SoakResult

    clients = OutcomeCounts(accepted=10, succeeded=6, client_errors=1, server_errors=2, cancelled=1)
    usage = {"gateway": GroupUsage(1, 300.0, 40, 20), "vision": GroupUsage(2, 900.0, 60, 50)}
    result = SoakResult(
        config=SoakConfig(), steady=clients, hang_ups=OutcomeCounts(accepted=0), clients=clients, gateway=clients,
        checks=identity_checks(clients, clients), kills=[Kill(12.0, "vision", 4242), Kill(40.0, "language", None)],
        usage_start=usage, usage_end={**usage, "vision": GroupUsage(2, 950.5, 62, 50)},
        actor_pids_start={"vision": [1, 2]}, actor_pids_end={"vision": [1, 3]}, recovered_after_s=2.5, wall_s=150.0,
        error_causes={"http_503 no_replica_available": 2},
    )
    text = markdown(result)
    assert "| server errors (5xx, error events) | 2 | 2 | 0 | 2 |" in text
    assert "| vision | 2 -> 2 (+0) | 900.0 -> 950.5 (+50.5) | 60 -> 62 (+2) | 50 -> 50 (+0) |" in text
    assert "12 s vision pid 4242" in text and "1 kill(s)" in text
    assert "http_503 no_replica_available x2" in text
    headline = json.loads(json.dumps(headline_json(result)))
    assert headline["exit_code"] == 0 and headline["soak"]["kills"] == 1 and headline["soak"]["balanced"]
    assert headline["soak"]["usage"]["vision"]["end"]["rss_mib"] == 950.5


def test_memory_curve_cuts_windows_and_shows_the_growth(tmp_path):
    from dvd_serve.loadtests.memory_curve import main, read_curves, replica_memory_table, table, windows

    rows = [{"at_s": at, "group": group, "processes": 1, "rss_mib": base + slope * at, "open_fds": 3, "threads": 1}
            for at in range(0, 600, 10) for group, base, slope in (("gateway", 400.0, 0.0), ("language", 3000.0, 0.1))]
    rows.append({"at_s": 0, "group": "coupled", "processes": 0, "rss_mib": 0.0, "open_fds": 0, "threads": 0})
    write_rows_csv(rows, tmp_path / "resources.csv")
    curves = read_curves(tmp_path / "resources.csv")
    assert set(curves) == {"gateway", "language"}  # empty groups are left out
    cut = windows(curves["language"], 300)
    assert [(w.start_s, round(w.start_mib), round(w.growth_mib, 1)) for w in cut] == [(0, 3000, 29.0), (300, 3030, 29.0)]
    assert table(curves, 300)[2] == "| 0-5 min | 400 (+0.0) | 3000 (+29.0) |"
    memory = tmp_path / "memory"
    memory.mkdir()
    write_rows_csv([{"unix_s": 1000.0 + at, "rss_mib": 800.0 + at / 10, "pymalloc_blocks": 5000, "malloc_in_use_mib": 300.0,
                     "malloc_free_mib": "", "children_rss_mib": 2000.0} for at in range(0, 400, 10)],
                   memory / "memory-language-42.csv")
    assert replica_memory_table(memory, 300)[2] == (
        "| language-42 | 0-5 min | 800.0 (+29.0) | 300.0 (+0.0) | - | 5000 (+0) | 2000.0 (+0.0) |")
    assert main([str(tmp_path)]) == 0 and (tmp_path / "rss.png").stat().st_size > 0


def test_a_child_process_records_its_memory_when_its_replica_asked(tmp_path, monkeypatch):
    """The replica's request travels by environment to the processes it starts (vLLM's engine core loads the
    plugin, which calls `record_engine_memory_if_asked`); the replica's own process does not sample twice."""
    from dvd_serve.common.process_memory import (
        ENGINE_MEMORY_REPORT_ENV,
        ask_engine_processes_to_record,
        record_engine_memory_if_asked,
    )

    monkeypatch.delenv(ENGINE_MEMORY_REPORT_ENV, raising=False)
    ask_engine_processes_to_record(tmp_path, 0.1)
    record_engine_memory_if_asked()  # this process asked: nothing starts here
    child = ("from dvd_serve.common.process_memory import record_engine_memory_if_asked as start; "
             "import time; start(); time.sleep(0.5)")
    subprocess.run([sys.executable, "-c", child], check=True, timeout=60)
    (path,) = tmp_path.glob("memory-*.csv")
    assert path.name.startswith("memory-language_engine-") and not path.name.endswith(f"-{os.getpid()}.csv")
    with path.open() as rows:
        samples = list(csv.DictReader(rows))
    assert len(samples) >= 2 and float(samples[0]["rss_mib"]) > 1 and int(samples[0]["pymalloc_blocks"]) > 0
