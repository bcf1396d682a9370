"""Health, reflection, metrics and log formats: what an operator's tooling reads.

Every check talks to a real server over its RA-TLS port (the certificate fetched and
pinned as a client does) or scrapes its real Prometheus endpoint."""

from __future__ import annotations

import io
import json
import logging
import re
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from teepsi.attestation.evidence import Role
from teepsi.attestation.measure import sim_identity
from teepsi.attestation.peer import PeerRejected, PeerVerifier, RejectedBy
from teepsi.attestation.policy import Policy, policy_for
from teepsi.attestation.sim import SimPlatform, SimPlatformConfig
from teepsi.client.party import (
    PartyConfig,
    PsiClient,
    PsiClientError,
    fetch_server_certificate,
    pinned_channel,
)
from teepsi.engine.tables import TableSpec
from teepsi.logformat import setup_logging
from teepsi.server.app import start_server
from teepsi.server.config import ServerConfig, ServerConfigError
from teepsi.server.errors import Refusal
from teepsi.server.handlers import SERVICE_NAME
from teepsi.server.metrics import JOB_PHASES
from tests.support.processes import client_args, start_client, teepsi_cmd

KEY_SCHEME = TableSpec(path=Path("x")).key_scheme
TEEPSI = teepsi_cmd()

#: Every label value a metric may carry: fixed enums, never a name, id or number.
_ALLOWED_LABELS = {
    "reason": {r.value for r in Refusal},
    "phase": set(JOB_PHASES),
}


def _sim_server(policy: Policy, **extra: object):
    return start_server(
        ServerConfig(
            host="127.0.0.1:0",
            attestation="sim",
            client_policy=policy,
            allow_simulated=True,
            **extra,  # type: ignore[arg-type]
        )
    )


def _channel(port: int) -> grpc.Channel:
    host = f"127.0.0.1:{port}"
    return pinned_channel(host, fetch_server_certificate(host, 10))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    samples = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def _value(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


# -- health and reflection ---------------------------------------------------------------


def test_health_is_serving_while_up_and_not_serving_once_shutdown_starts(policy):
    running = _sim_server(policy)
    channel = _channel(running.port)
    stub = health_pb2_grpc.HealthStub(channel)
    serving = health_pb2.HealthCheckResponse.SERVING
    for service in ("", SERVICE_NAME):
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert reply.status == serving, service
    with pytest.raises(grpc.RpcError) as unknown:
        stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
    assert unknown.value.code() is grpc.StatusCode.NOT_FOUND
    # A watcher (as a load balancer holds one) hears NOT_SERVING while the grace period
    # still runs: the stop has not returned yet.
    watch = stub.Watch(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=30)
    assert next(watch).status == serving
    stopper = threading.Thread(target=running.stop, kwargs={"grace": 5.0})
    began = time.monotonic()
    stopper.start()
    try:
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert time.monotonic() - began < 4.0
        assert stopper.is_alive()  # still in its grace period
    finally:
        channel.close()
        stopper.join(timeout=20)


def test_reflection_lists_psi_health_and_reflection(policy):
    running = _sim_server(policy)
    channel = _channel(running.port)
    try:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
        )
        names = {s.name for reply in replies for s in reply.list_services_response.service}
        # The descriptor of the service is served too (grpcurl describes it from this).
        replies = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE_NAME)]),
            timeout=10,
        )
        files = [
            f for reply in replies for f in reply.file_descriptor_response.file_descriptor_proto
        ]
    finally:
        channel.close()
        running.stop(grace=0)
    assert names == {
        "teepsi.v1.Psi",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    }
    assert files and b"teepsi.v1" in files[0]


def test_health_command_pins_the_certificate_and_says_serving(start_server, tmp_path):
    server = start_server()
    done = subprocess.run(
        [*TEEPSI, "health", "--host", server.host], capture_output=True, text=True, timeout=60
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, "SERVING\n", "")
    done = subprocess.run(
        [*TEEPSI, "health", "--host", server.host, "--service", SERVICE_NAME],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (done.returncode, done.stdout) == (0, "SERVING\n")
    # Nothing listening: exit 1 and one line, no traceback.
    done = subprocess.run(
        [*TEEPSI, "health", "--host", f"127.0.0.1:{_free_port()}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "nothing listens at" in done.stderr
    done = subprocess.run(
        [*TEEPSI, "health", "--host", "localhost"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2 and done.stderr.count("\n") == 1


# -- metrics -----------------------------------------------------------------------------


def test_metrics_move_during_a_three_party_job(start_server, policy_file, tmp_path):
    metrics_port = _free_port()
    server = start_server("--metrics-host", f"127.0.0.1:{metrics_port}", policy=policy_file)
    before = _scrape(metrics_port)
    assert _value(before, "teepsi_uploads_completed_total") == 0
    assert _value(before, "teepsi_jobs", phase="waiting") == 0
    items = {
        f"p{n}": [f"shared-{i}" for i in range(40)] + [f"own{n}-{i}" for i in range(n * 7)]
        for n in range(3)
    }
    procs = []
    for name, rows in items.items():
        data = tmp_path / f"{name}.txt"
        data.write_text("\n".join(rows) + "\n")
        procs.append(
            start_client(
                client_args(server, data, parties=3, name=name, policy=policy_file, job="m3")
            )
        )
        if len(procs) == 2:
            # Two of three joined: the job waits, and so do its two parties.
            give_up = time.monotonic() + 60
            while True:
                during = _scrape(metrics_port)
                if _value(during, "teepsi_parties_waiting") == 2:
                    break
                assert time.monotonic() < give_up, during
                time.sleep(0.1)
            assert _value(during, "teepsi_jobs", phase="waiting") == 1
            assert _value(during, "teepsi_intersections_total") == 0
    for proc in procs:
        _, stderr = proc.communicate(timeout=180)
        assert proc.returncode == 0, stderr.decode()
    after = _scrape(metrics_port)
    assert _value(after, "teepsi_uploads_completed_total") == 3
    assert _value(after, "teepsi_intersections_total") == 1
    assert _value(after, "teepsi_intersection_duration_seconds_count") == 1
    assert _value(after, "teepsi_attestation_verification_duration_seconds_count") == 3
    # 16 bytes a record, plus each chunk's framing.
    assert _value(after, "teepsi_upload_received_bytes_total") >= 16 * (40 * 3 + 7 + 14)
    assert _value(after, "teepsi_memory_budget_bytes") == 1024**3
    assert _value(after, "teepsi_jobs", phase="waiting") == 0
    # A request that is no JoinRequest is refused and counted as a bad request.
    channel = _channel(server.port)
    try:
        with pytest.raises(grpc.RpcError) as refused:
            channel.unary_unary("/teepsi.v1.Psi/Join")(b"\xff\xff\xff", timeout=10)
        assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    finally:
        channel.close()
    bad = _scrape(metrics_port)
    assert _value(bad, "teepsi_refusals_total", reason="bad_request") == 1
    assert _value(bad, "teepsi_refusals_total", reason="policy") == 0
    # Labels are fixed enums: no job id, party name or number became a series.
    for _, labels in bad:
        for key, value in labels:
            assert value in _ALLOWED_LABELS.get(key, {value} if key == "le" else set()), key
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics").read().decode()
    for needle in ("m3", "p0", "p1", "p2", "shared-", "own1"):
        assert needle not in text


def test_a_policy_refusal_is_counted_by_its_reason(policy, policy_dict):
    """A data provider whose MRENCLAVE the server's policy does not list: reason policy."""
    data = policy_dict
    data["verify_mr_enclave"] = "on"
    data["sgx_mrs"][1]["mr_enclave"] = "00" * 32
    running = _sim_server(Policy.from_dict(data), metrics_host="127.0.0.1:0")
    client = PsiClient(
        PartyConfig(
            host=f"127.0.0.1:{running.port}",
            policy=policy,
            name="a",
            party_count=2,
            job_id="refused",
            attestation="sim",
            allow_simulated=True,
            timeout=60,
        )
    )
    try:
        client.connect()
        with pytest.raises(PsiClientError, match="PERMISSION_DENIED"):
            client.join(KEY_SCHEME)
        assert running.metrics_endpoint is not None
        samples = _scrape(running.metrics_endpoint.port)
    finally:
        client.close()
        running.stop(grace=0)
    assert _value(samples, "teepsi_refusals_total", reason="policy") == 1
    assert _value(samples, "teepsi_refusals_total", reason="attestation") == 0
    assert _value(samples, "teepsi_attestation_verification_duration_seconds_count") == 1


def test_a_tcb_status_refusal_is_told_apart_from_other_policy_refusals():
    identity = sim_identity(Role.DATA_PROVIDER)
    platform = SimPlatform(SimPlatformConfig(tcb_status="OutOfDate", advisory_ids=("SIM-1",)))
    report_data = bytes(range(64))
    verifier = PeerVerifier(policy_for([("provider", identity)]), allow_simulated=True)
    with pytest.raises(PeerRejected, match="TCB status OutOfDate") as refused:
        verifier.verify_bound_quote(
            platform.quote(identity, report_data),
            platform.collateral_json(),
            report_data,
            what="data provider",
            record=False,
        )
    assert refused.value.by is RejectedBy.TCB_STATUS
    # Simulated evidence without --allow-simulated: the evidence, not the policy.
    with pytest.raises(PeerRejected) as simulated:
        PeerVerifier(policy_for([("provider", identity)])).verify_bound_quote(
            SimPlatform().quote(identity, report_data),
            SimPlatform().collateral_json(),
            report_data,
            what="data provider",
            record=False,
        )
    assert simulated.value.by is RejectedBy.ATTESTATION


@pytest.mark.parametrize(
    ("address", "public", "problem"),
    [
        ("0.0.0.0:9100", False, "needs metrics_public"),
        ("10.1.2.3:9100", False, "needs metrics_public"),
        ("9100", False, "expected HOST:PORT"),
        ("127.0.0.1:99999", False, "expected HOST:PORT"),
        ("metrics.example:9100", True, "not an IP address"),
    ],
)
def test_metrics_host_refuses_public_or_malformed_addresses(policy, address, public, problem):
    with pytest.raises(ServerConfigError, match=problem):
        _sim_server(policy, metrics_host=address, metrics_public=public)


def test_metrics_public_allows_a_non_loopback_address(policy):
    running = _sim_server(policy, metrics_host="0.0.0.0:0", metrics_public=True)
    try:
        assert running.metrics_endpoint is not None
        samples = _scrape(running.metrics_endpoint.port)
    finally:
        running.stop(grace=0)
    assert _value(samples, "teepsi_jobs", phase="waiting") == 0
    with pytest.raises(OSError):  # the endpoint ends with the server
        _scrape(running.metrics_endpoint.port)


def test_metrics_are_off_by_default(policy):
    running = _sim_server(policy)
    running.stop(grace=0)
    assert running.metrics_endpoint is None


def test_server_refuses_a_public_metrics_address_on_the_command_line(start_server, tmp_path):
    done = subprocess.run(
        [
            *TEEPSI,
            "server",
            "--host",
            "127.0.0.1:0",
            "--attestation",
            "sim",
            "--no-client-attestation",
            "--metrics-host",
            "0.0.0.0:9100",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "--metrics-public" in done.stderr and "Traceback" not in done.stderr


# -- log formats -------------------------------------------------------------------------

_ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def test_text_and_json_log_lines_carry_a_utc_timestamp():
    text, as_json = io.StringIO(), io.StringIO()
    log = logging.getLogger("teepsi.test")
    try:
        setup_logging("server", logging.INFO, "text", stream=text)
        log.info("hello %s", "there", extra={"job_phase": "waiting"})
        setup_logging("client", logging.INFO, "json", stream=as_json)
        log.info("hello %s", "there", extra={"job_phase": "waiting"})
        try:
            raise ValueError("bad thing")
        except ValueError:
            log.exception("failed")
    finally:
        logging.basicConfig(force=True)
    stamp, rest = text.getvalue().rstrip("\n").split(" ", 1)
    assert _ISO_UTC.match(stamp) and rest == "teepsi server: INFO hello there"
    lines = as_json.getvalue().splitlines()
    assert len(lines) == 2  # the exception stays on its line: no traceback
    first, second = (json.loads(line) for line in lines)
    assert _ISO_UTC.match(first["ts"])
    assert first == {
        "ts": first["ts"],
        "level": "INFO",
        "logger": "teepsi.test",
        "msg": "hello there",
        "role": "client",
        "job_phase": "waiting",
    }
    assert second["level"] == "ERROR" and second["exc"] == "ValueError: bad thing"
    with pytest.raises(ValueError, match="log format"):
        setup_logging("server", logging.INFO, "xml")


def test_server_logs_json_with_its_start_facts_once(start_server, tmp_path):
    server = start_server("--log-format", "json", "--max-jobs", "7")
    server.proc.terminate()
    server.proc.wait(timeout=20)
    entries = [json.loads(line) for line in server.log().splitlines()]
    assert entries and all(_ISO_UTC.match(e["ts"]) for e in entries)
    assert all({"ts", "level", "logger", "msg"} <= e.keys() for e in entries)
    started = [e for e in entries if e.get("version")]
    assert len(started) == 1 and started[0]["attestation"] == "sim"
    limits = [e for e in entries if e["msg"].startswith("limits:")]
    assert len(limits) == 1 and "max_jobs 7," in limits[0]["msg"]
    assert limits[0]["limits"]["max_jobs"] == 7
    assert limits[0]["limits"]["memory_budget"] == 1024**3
    enclave = [e for e in entries if e["msg"].startswith("server enclave: MRENCLAVE")]
    assert len(enclave) == 1
    assert enclave[0]["mr_enclave"] == sim_identity(Role.SERVER).mr_enclave.hex()
    assert enclave[0]["isv_prod_id"] == int(Role.SERVER)


def test_a_usage_error_in_json_mode_is_one_json_line(tmp_path, policy_file):
    """A log shipper parses every line of stderr: the error too."""
    done = subprocess.run(
        [
            *TEEPSI,
            *("client", "--host", "127.0.0.1:1", "--config", str(policy_file)),
            *("--data", str(tmp_path / "missing.txt"), "--parties", "2", "--name", "a"),
            *("--log-format", "json"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    entry = json.loads(lines[0])
    assert entry["level"] == "ERROR" and entry["exit_code"] == 2
    assert "missing.txt" in entry["msg"] and _ISO_UTC.match(entry["ts"])
