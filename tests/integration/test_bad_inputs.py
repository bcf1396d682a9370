"""Bad input, each case with the exact error a user sees, and the server's limits.

What other files already cover is not repeated here (see docs/reliability.md): the policy
parser's full matrix (test_policy.py), the spec parser's (test_contract_spec.py), the
table reader's (test_tables.py), malformed upload streams, a second upload, an upload
after the job finished and a non-party's result request (test_service.py), --run-config
refusals (test_deploy.py). This file adds what users meet on the command line (exit code
2 and one line naming file, field and problem), the limits enforced by a running server
process, and raw garbage on the server's port.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from teepsi.cli import main
from teepsi.client import PartyConfig, PsiClientError, run_party_items
from teepsi.client.party import RATLS_TARGET_NAME, fetch_server_certificate
from teepsi.contract.party_keys import generate_private_key, public_key_der, public_key_text
from teepsi.demo import start_server_process
from teepsi.protocol import teepsi_pb2 as pb
from teepsi.protocol import teepsi_pb2_grpc as pb_grpc
from teepsi.server.challenges import NONCE_BYTES
from tests.support.policy import stable_policy_dict
from tests.support.processes import client_args, start_client, teepsi_cmd

MiB = 1024 * 1024


#: The UTC timestamp every log line starts with (usage errors from argparse have none).
_TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?Z ")


def _lines(stderr: str) -> list[str]:
    """stderr's lines without their log timestamps."""
    return [_TIMESTAMP.sub("", ln) for ln in stderr.splitlines()]


def _error_lines(stderr: str) -> list[str]:
    return [ln for ln in _lines(stderr) if " ERROR " in ln or "error:" in ln]


def _only_error(stderr: str) -> str:
    """The one error line; anything else on stderr may only be a warning."""
    errors = _error_lines(stderr)
    assert len(errors) == 1, stderr
    others = [ln for ln in _lines(stderr) if ln not in errors and ln.strip()]
    assert all(" WARNING " in ln for ln in others), others
    return errors[0]


def _client_argv(policy: Path, data: Path, *extra: str) -> list[str]:
    """Client arguments against a closed port: input errors come before any connection."""
    return [
        "client",
        "--host",
        "127.0.0.1:1",
        "--config",
        str(policy),
        "--data",
        str(data),
        "--parties",
        "2",
        "--name",
        "a",
        "--attestation",
        "sim",
        "--allow-simulated",
        "--quiet",
        *extra,
    ]


@pytest.fixture(autouse=True)
def _restore_logging():
    """``main`` reconfigures the root logger onto the captured stderr: undo it after."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def _run_main(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str]:
    """The CLI's ``main`` in-process (the exit code the process would return)."""
    code = main(argv)
    return code, capsys.readouterr().err


# -- input files -------------------------------------------------------------------


def _utf8(path: Path) -> str:
    return f"{path}: line 2: not valid UTF-8 (byte offset 3); save the file as UTF-8"


DATA_CASES = {
    "invalid-utf8": (b"ok\n\xff\xfe\n", _utf8),
    "nul-byte": (b"ok\nba\0d\n", lambda p: f"{p}: line 2: contains a NUL byte; items must be text"),
    "one-mib-item": (
        b"x" * MiB + b"\n",
        lambda p: f"{p}: an item of 1048576 bytes exceeds the limit of 65536 bytes",
    ),
    "item-one-byte-over": (
        b"small\n" + b"y" * (64 * 1024 + 1) + b"\r\n",
        lambda p: f"{p}: an item of 65537 bytes exceeds the limit of 65536 bytes",
    ),
    "missing": (None, lambda p: f"{p}: no such file; check the --data path"),
    "directory": ("dir", lambda p: f"{p}: is a directory, expected a data file"),
}


@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_bad_data_file_is_exit_2_with_one_line(capsys, policy_file, tmp_path, case):
    content, message = DATA_CASES[case]
    path = tmp_path / f"{case}.txt"
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    code, stderr = _run_main(capsys, _client_argv(policy_file, path))
    assert code == 2
    assert _only_error(stderr) == f"teepsi client: error: {message(path)}"


def test_bad_csv_is_exit_2_with_one_line(capsys, policy_file, tmp_path):
    path = tmp_path / "rows.csv"
    path.write_bytes(b"email,n\nok@x,1\n\xff@x,2\n")
    out = ("--output", str(tmp_path / "out.csv"))  # tables need one (checked first)
    code, stderr = _run_main(capsys, _client_argv(policy_file, path, "--key", "email", *out))
    assert code == 2
    assert _only_error(stderr) == (
        f"teepsi client: error: {path}: line 3: not valid UTF-8 (byte offset 15); "
        "save the file as UTF-8"
    )
    code, stderr = _run_main(capsys, _client_argv(policy_file, path, "--key", "mail", *out))
    assert code == 2
    assert _only_error(stderr).startswith(f"teepsi client: error: {path}: ")


def test_unreadable_file_is_exit_2_with_one_line(capsys, policy_file, tmp_path):
    """chmod 000 does not stop root (these tests usually run as root): then the case is
    skipped and 'directory' above stands for an unreadable path."""
    if os.geteuid() == 0:
        pytest.skip("running as root: permission bits do not prevent reading")
    path = tmp_path / "secret.txt"
    path.write_text("x\n")
    path.chmod(0)
    code, stderr = _run_main(capsys, _client_argv(policy_file, path))
    assert code == 2
    assert _only_error(stderr) == f"teepsi client: error: {path}: cannot read: Permission denied"


# -- policy, spec and run-config files -----------------------------------------------


def _policy_variant(tmp_path: Path, change) -> Path:
    data = stable_policy_dict()
    text = change(data)
    path = tmp_path / "bad_policy.json"
    path.write_text(text if isinstance(text, str) else json.dumps(data))
    return path


POLICY_CASES = {
    "flag": (
        lambda d: d.update(verify_mr_signer="yes"),
        'verify_mr_signer: expected "on", "off", true or false, got "yes"',
    ),
    "short-mr": (
        lambda d: d["sgx_mrs"][0].update(mr_signer="abc"),
        'sgx_mrs[0].mr_signer: expected 64 hex characters, got "abc" (3 characters)',
    ),
    "isv-range": (
        lambda d: d["sgx_mrs"][1].update(isv_svn="70000"),
        "sgx_mrs[1].isv_svn: expected an integer 0..65535 (JSON number or decimal string), "
        'got "70000"',
    ),
    "unknown-key": (
        lambda d: d.update(verify_everything="on"),
        'verify_everything: unknown key; keys starting with "_" or "comment" are ignored',
    ),
    "missing-list": (
        lambda d: d.pop("sgx_mrs"),
        "sgx_mrs: missing (a list of measurement entries); a policy for TDX VMs only lists "
        "them in tdx_mrs instead",
    ),
    "bad-json": (
        lambda d: '{"verify_mr_enclave": "on",',
        "invalid JSON at line 1 column 28: Expecting property name enclosed in double quotes",
    ),
    "empty": (lambda d: "", "invalid JSON at line 1 column 1: Expecting value"),
}


@pytest.mark.parametrize("role", ["client", "server"])
@pytest.mark.parametrize("case", sorted(POLICY_CASES))
def test_malformed_policy_is_exit_2_naming_file_and_field(
    capsys, policy_file, tmp_path, role, case
):
    change, problem = POLICY_CASES[case]
    bad = _policy_variant(tmp_path, change)
    data = tmp_path / "a.txt"
    data.write_text("x\n")
    if role == "client":
        argv = _client_argv(policy_file, data)
        argv[argv.index("--config") + 1] = str(bad)
    else:
        argv = ["server", "--host", "127.0.0.1:0", "--attestation", "sim", "--config", str(bad)]
    code, stderr = _run_main(capsys, argv)
    assert code == 2
    assert _only_error(stderr) == f"teepsi {role}: error: {bad}: {problem}"


def test_missing_policy_file_is_exit_2(capsys, tmp_path):
    data = tmp_path / "a.txt"
    data.write_text("x\n")
    missing = tmp_path / "nope.json"
    code, stderr = _run_main(capsys, _client_argv(missing, data))
    assert code == 2
    assert _only_error(stderr) == (
        f"teepsi client: error: {missing}: cannot read: No such file or directory"
    )


@pytest.fixture(scope="module")
def party_keys() -> list[str]:
    return [public_key_text(public_key_der(generate_private_key())) for _ in range(2)]


def _parties(keys: list[str], names=("a", "b")) -> str:
    return "".join(f'[[parties]]\nname = "{n}"\npublic_key = "{k}"\n' for n, k in zip(names, keys))


SPEC_CASES = {
    "bad-output": (
        lambda k: 'job_id = "j"\noutput = "everything"\n' + _parties(k),
        'output: expected "intersection" or "count", got "everything"',
    ),
    "duplicate-party-name": (
        lambda k: 'job_id = "j"\n' + _parties(k, ("a", "a")),
        'parties[1].name: duplicate party name "a" (also parties[0])',
    ),
    "unknown-recipient": (
        lambda k: 'job_id = "j"\nrecipients = ["c"]\n' + _parties(k),
        'recipients[0]: "c" is not a party of this job',
    ),
    "unknown-key": (
        lambda k: 'job_id = "j"\ncolour = "red"\n' + _parties(k),
        'colour: unknown key; keys starting with "_" or "comment" are ignored',
    ),
    "negative-threshold": (
        lambda k: 'job_id = "j"\nmin_intersection = -1\n' + _parties(k),
        "min_intersection: must be between 0 and 9223372036854775807, got -1",
    ),
    "bad-job-id": (
        lambda k: 'job_id = "bad id"\n' + _parties(k),
        "job_id: \"bad id\" is not a valid job id: use 1-128 letters, digits, '.', '_', '@' "
        "or '-', starting with a letter or digit",
    ),
    "bad-key": (
        lambda k: 'job_id = "j"\n' + _parties([k[0], "ed25519:AAAA"]),
        "parties[1].public_key: not a DER SubjectPublicKeyInfo public key",
    ),
    "bad-toml": (
        lambda k: 'job_id = "j\n' + _parties(k),
        "invalid TOML: Illegal character '\\n' (at line 1, column 12)",
    ),
}


@pytest.mark.parametrize("command", ["client", "spec check"])
@pytest.mark.parametrize("case", sorted(SPEC_CASES))
def test_malformed_spec_is_exit_2_naming_file_and_field(
    capsys, policy_file, tmp_path, party_keys, command, case
):
    make, problem = SPEC_CASES[case]
    spec = tmp_path / "job.toml"
    spec.write_text(make(party_keys))
    if command == "client":
        data = tmp_path / "a.txt"
        data.write_text("x\n")
        argv = _client_argv(policy_file, data, "--spec", str(spec), "--key-file", "k.pem")
        prefix = "teepsi client"
    else:
        argv = ["spec", "check", str(spec)]
        prefix = "teepsi spec"
    code, stderr = _run_main(capsys, argv)
    assert code == 2
    assert _only_error(stderr) == f"{prefix}: error: {spec}: {problem}"


RUN_CONFIG_CASES = {
    "unknown-key": (
        'hots = "x"\n',
        "hots: not a per-run setting of teepsi client (did you mean host?); the keys are the "
        "long flags of teepsi client --help with _ for -, e.g. key_column for --key-column",
    ),
    "wrong-type": (
        'timeout = "soon"\n',
        "timeout: wrong type str (expected int or float, as for --timeout)",
    ),
    "bad-toml": ("timeout = \n", "not valid TOML: Invalid value (at line 1, column 11)"),
    "missing": (None, "cannot read: No such file or directory"),
}


@pytest.mark.parametrize("case", sorted(RUN_CONFIG_CASES))
def test_malformed_run_config_is_exit_2_naming_file_and_field(capsys, policy_file, tmp_path, case):
    text, problem = RUN_CONFIG_CASES[case]
    config = tmp_path / "run.toml"
    if text is not None:
        config.write_text(text)
    data = tmp_path / "a.txt"
    data.write_text("x\n")
    argv = [a for a in _client_argv(policy_file, data) if a not in ("--name", "a")]
    code, stderr = _run_main(capsys, [*argv, "--run-config", str(config)])
    assert code == 2
    assert _only_error(stderr) == f"teepsi client: error: --run-config {config}: {problem}"


def test_usage_errors_exit_2_from_real_processes(policy_file, tmp_path, party_keys):
    """The same refusals through `python -m teepsi`: process exit status 2, one line."""
    bad_data = tmp_path / "bad.txt"
    bad_data.write_bytes(b"ok\n\xff\n")
    bad_policy = _policy_variant(tmp_path, POLICY_CASES["flag"][0])
    bad_spec = tmp_path / "job.toml"
    bad_spec.write_text(SPEC_CASES["duplicate-party-name"][0](party_keys))
    good = tmp_path / "good.txt"
    good.write_text("x\n")
    runs = {
        "data": teepsi_cmd(*_client_argv(policy_file, bad_data)),
        "server-policy": teepsi_cmd(
            "server", "--host", "127.0.0.1:0", "--attestation", "sim", "--config", str(bad_policy)
        ),
        "spec": teepsi_cmd(
            *_client_argv(policy_file, good, "--spec", str(bad_spec), "--key-file", "k.pem")
        ),
    }
    procs = {what: subprocess.Popen(args, stderr=subprocess.PIPE) for what, args in runs.items()}
    for what, proc in procs.items():
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 2, (what, stderr)
        line = _only_error(stderr.decode())
        assert ": error: " in line and ("bad" in line or "job.toml" in line), line


# -- a running server: limits and job-level refusals --------------------------------------


def _start(workdir: Path, policy: Path, *extra: str):
    workdir.mkdir(parents=True, exist_ok=True)
    proc, port = start_server_process(workdir, policy, *extra)
    return proc, port


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)
    if proc.stdout is not None:
        proc.stdout.close()


class _Server:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, workdir: Path) -> None:
        self.proc, self.port, self.workdir = proc, port, workdir

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return (self.workdir / "server.log").read_text(errors="replace")


@pytest.fixture(scope="module")
def limited(tmp_path_factory, policy_file):
    """One server for this module's job-level cases: 5 items per party, 3 parties per job."""
    workdir = tmp_path_factory.mktemp("limited")
    proc, port = _start(
        workdir, policy_file, "--max-items", "5", "--max-parties", "3", "--job-timeout", "30"
    )
    yield _Server(proc, port, workdir)
    _stop(proc)


@pytest.fixture
def server_with(tmp_path, policy_file):
    """A server of the test's own (for limits that other cases would disturb)."""
    started: list[subprocess.Popen[bytes]] = []

    def start(*extra: str) -> _Server:
        workdir = tmp_path / f"server{len(started)}"
        proc, port = _start(workdir, policy_file, *extra)
        started.append(proc)
        return _Server(proc, port, workdir)

    yield start
    for proc in started:
        _stop(proc)


def _wait_for_log(server: _Server, needle: str, timeout: float = 60) -> None:
    give_up = time.monotonic() + timeout
    while needle not in server.log():
        assert time.monotonic() < give_up, f"no {needle!r} in the server log"
        assert server.proc.poll() is None, "server exited"
        time.sleep(0.05)


def _args(server, policy: Path, data: Path, name: str, *, parties=1, job="j", extra=()):
    return client_args(
        server, data, parties=parties, name=name, policy=policy, job=job, timeout=60, extra=extra
    )


def _run(args: list[str]) -> tuple[int, bytes, str]:
    run = subprocess.run(args, capture_output=True, timeout=120)
    return run.returncode, run.stdout, run.stderr.decode()


def test_edge_case_files_run_end_to_end(limited, policy_file, tmp_path):
    """Empty file, blank lines only, CRLF, an item of exactly 64 KiB, exactly --max-items."""
    big = "é" * (32 * 1024)  # 65536 bytes of UTF-8: the largest item allowed
    cases = {
        "empty": (b"", b""),
        "blank": (b"\n \r\n\t\n", b""),
        "crlf": (b"b\r\na\r\n\r\n a \r\n", b"a\nb\n"),
        "max-item": (big.encode() + b"\r\n", big.encode() + b"\n"),
        "max-items": (b"1\n2\n3\n4\n5\n", b"1\n2\n3\n4\n5\n"),
    }
    procs = {}
    for case, (content, _) in cases.items():
        data = tmp_path / f"{case}.txt"
        data.write_bytes(content)
        procs[case] = start_client(_args(limited, policy_file, data, "a", job=f"edge-{case}"))
    for case, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, (case, stderr.decode())
        assert stdout == cases[case][1], case


def test_crlf_and_lf_files_intersect(limited, policy_file, tmp_path):
    lf, crlf = tmp_path / "lf.txt", tmp_path / "crlf.txt"
    lf.write_bytes(b"car\ncat\ndog\n")
    crlf.write_bytes(b"cat\r\ncar\r\nemu\r\n")
    procs = [
        start_client(_args(limited, policy_file, path, name, parties=2, job="crlf"))
        for path, name in ((lf, "lf"), (crlf, "crlf"))
    ]
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr.decode()
        assert stdout == b"car\ncat\n"


def test_items_per_party_limit(limited, policy_file, tmp_path):
    data = tmp_path / "six.txt"
    data.write_text("1\n2\n3\n4\n5\n6\n")
    code, stdout, stderr = _run(_args(limited, policy_file, data, "a", job="six"))
    assert code == 1 and stdout == b""
    assert _only_error(stderr).endswith(
        "ERROR uploading the set failed: RESOURCE_EXHAUSTED: more than 5 items in one party's "
        "upload (the limit of this job: its spec's max_items_per_party or the server's "
        "--max-items)"
    )


def test_items_per_party_limit_counts_distinct_items(limited, policy_file, tmp_path):
    data = tmp_path / "dups.txt"
    data.write_text("1\n2\n3\n4\n5\n5\n 5\n")
    code, stdout, stderr = _run(_args(limited, policy_file, data, "a", job="dups"))
    assert code == 0, _error_lines(stderr)
    assert stdout == b"1\n2\n3\n4\n5\n"


def test_parties_per_job_limit(limited, policy_file, tmp_path):
    data = tmp_path / "a.txt"
    data.write_text("x\n")
    code, _, stderr = _run(_args(limited, policy_file, data, "a", parties=4, job="four"))
    assert code == 1
    assert _only_error(stderr).endswith(
        "ERROR joining the job failed: INVALID_ARGUMENT: party count 4 is out of range: 1 to 3"
    )


def test_duplicate_party_name_and_party_count_mismatch(limited, policy_file, tmp_path):
    data = tmp_path / "a.txt"
    data.write_text("car\ncat\n")
    first = start_client(_args(limited, policy_file, data, "a", parties=2, job="dup"))
    try:
        _wait_for_log(limited, "job dup: party a joined (1/2)")
        code, _, stderr = _run(_args(limited, policy_file, data, "a", parties=2, job="dup"))
        assert code == 1
        # Without a spec nobody is authenticated: one line for every refusal, naming
        # neither the job's party count nor its settings (a listed party under a spec is
        # told more: test_service.py::test_server_authenticates_parties_against_the_spec).
        refusal = (
            "ERROR joining the job failed: FAILED_PRECONDITION: cannot join job dup as {!r}: "
            "a job of that id takes no such party now (it may be full, running or done, the "
            "name may be taken, or its parties use other --parties or key settings); agree on "
            "--job, --parties, --normalize and --key with the other parties, or use another "
            "--job id"
        )
        assert _only_error(stderr).endswith(refusal.format("a"))
        code, _, stderr = _run(_args(limited, policy_file, data, "b", parties=3, job="dup"))
        assert code == 1
        assert _only_error(stderr).endswith(refusal.format("b"))
        # The refusals left the job intact: the right second party completes it.
        code, stdout, stderr = _run(_args(limited, policy_file, data, "b", parties=2, job="dup"))
        assert code == 0 and stdout == b"car\ncat\n", stderr
        stdout, stderr_b = first.communicate(timeout=60)
        assert first.returncode == 0 and stdout == b"car\ncat\n", stderr_b.decode()
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate(timeout=20)


@pytest.mark.parametrize(("flag", "value"), [("--name", "a b"), ("--job", "bad job")])
def test_malformed_name_or_job_id_is_a_usage_error(limited, policy_file, tmp_path, flag, value):
    data = tmp_path / "a.txt"
    data.write_text("x\n")
    args = _args(limited, policy_file, data, "a", job="ok")
    args[args.index(flag) + 1] = value
    code, _, stderr = _run(args)
    line = _only_error(stderr)
    assert code == 2, line
    assert "is invalid: use 1-128 letters, digits" in line


def test_jobs_at_once_limit(server_with, policy_file, tmp_path):
    server = server_with("--max-jobs", "1", "--job-timeout", "60")
    data = tmp_path / "a.txt"
    data.write_text("car\ncat\n")
    first = start_client(_args(server, policy_file, data, "a", parties=2, job="one"))
    try:
        _wait_for_log(server, "job one: party a joined")
        code, _, stderr = _run(_args(server, policy_file, data, "a", job="two"))
        assert code == 1
        assert _only_error(stderr).endswith(
            "ERROR joining the job failed: RESOURCE_EXHAUSTED: server already runs 1 jobs "
            "(the limit); retry later"
        )
        code, _, _ = _run(_args(server, policy_file, data, "b", parties=2, job="one"))
        assert code == 0
        assert first.wait(timeout=60) == 0
        _wait_for_log(server, "job one: every party has its result; job state wiped")
        # The finished job gave its slot back.
        code, stdout, stderr = _run(_args(server, policy_file, data, "a", job="two"))
        assert code == 0 and stdout == b"car\ncat\n", stderr
    finally:
        if first.poll() is None:
            first.kill()
        first.communicate(timeout=20)


def test_job_emptied_by_a_refused_upload_frees_its_slot(server_with, policy_file, tmp_path):
    server = server_with("--max-jobs", "1", "--max-items", "1", "--job-timeout", "60")
    two = tmp_path / "two.txt"
    two.write_text("x\ny\n")
    one = tmp_path / "one.txt"
    one.write_text("x\n")
    code, _, stderr = _run(_args(server, policy_file, two, "a", parties=2, job="first"))
    assert code == 1 and "RESOURCE_EXHAUSTED: more than 1 items" in stderr
    code, stdout, stderr = _run(_args(server, policy_file, one, "a", job="second"))
    assert code == 0, _error_lines(stderr)
    assert stdout == b"x\n"


def test_concurrent_rpc_limit(server_with, policy_file, policy):
    """A waiting party holds no worker thread (finding F1): --max-workers sizes the pool for
    blocking work only, so it bounds neither a job's parties nor the RPCs at once.

    Before the fix, --max-workers 2 lowered --max-parties to 1 at start and a 4-party job was
    refused at its first join (and a third concurrent RPC got RESOURCE_EXHAUSTED).
    """
    server = server_with("--max-workers", "2", "--job-timeout", "60")
    assert "lowered" not in server.log()
    configs = [
        PartyConfig(
            host=server.host,
            policy=policy,
            name=f"p{n}",
            party_count=4,
            job_id="crowded",
            attestation="sim",
            allow_simulated=True,
            timeout=60,
        )
        for n in range(4)
    ]
    results: dict[str, object] = {}

    def party(config: PartyConfig) -> None:
        try:
            results[config.name] = run_party_items(config, ["x", config.name])
        except PsiClientError as exc:
            results[config.name] = exc

    threads = [threading.Thread(target=party, args=(c,), daemon=True) for c in configs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(90)
    assert not any(t.is_alive() for t in threads)
    failures = {n: str(r) for n, r in results.items() if isinstance(r, PsiClientError)}
    assert not failures and len(results) == 4, failures
    assert all(r.matching_items() == ["x"] for r in results.values())
    _wait_for_log(server, "job crowded: every party has its result; job state wiped")


def _drain_until_closed(sock: socket.socket, timeout: float = 15.0) -> bytes:
    """Read until the server closes the connection (bounded)."""
    sock.settimeout(timeout)
    received = b""
    give_up = time.monotonic() + timeout
    while time.monotonic() < give_up:
        try:
            data = sock.recv(65536)
        except (ConnectionResetError, ssl.SSLError):
            return received
        if not data:
            return received
        received += data
    raise AssertionError("the server kept a garbage connection open")


def _pinned_channel(host: str) -> grpc.Channel:
    """A channel to the server's certificate with no message size caps of our own."""
    der = fetch_server_certificate(host, 10)
    pem = x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)
    return grpc.secure_channel(
        host,
        grpc.ssl_channel_credentials(root_certificates=pem),
        options=[
            ("grpc.ssl_target_name_override", RATLS_TARGET_NAME),
            ("grpc.max_send_message_length", -1),
            ("grpc.max_receive_message_length", -1),
        ],
    )


def test_garbage_bytes_on_the_port_are_dropped_and_the_server_keeps_serving(
    limited, policy_file, tmp_path
):
    port = limited.port
    # Idle connections that never speak do not block anyone.
    idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(50)]
    try:
        for payload in (b"\x00\xff garbage \x16\x03" * 1000, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                raw.sendall(payload)
                assert _drain_until_closed(raw) == b""  # TLS handshake fails: closed
        # TLS, then a valid HTTP/2 preface followed by garbage frames.
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        context.set_alpn_protocols(["h2"])
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname=RATLS_TARGET_NAME) as tls,
        ):
            tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\xff" * 5000)
            _drain_until_closed(tls)
        # A well-formed gRPC call whose protobuf payload is garbage: INVALID_ARGUMENT with
        # one line (finding F4), one log line, no traceback, never the bytes.
        log_before = len(limited.log())
        junks = (b"\xff\xff\xff\xff", b"\x0a\x80\x80\x80\x80\x10", b"\x0a\x02\xff\xfe")
        with _pinned_channel(limited.host) as channel:
            for method in ("GetChallenge", "Join"):
                message = f"{method}Request"
                raw_call = channel.unary_unary(
                    f"/teepsi.v1.Psi/{method}", request_serializer=None, response_deserializer=None
                )
                for junk in junks:
                    with pytest.raises(grpc.RpcError) as err:
                        raw_call(junk, timeout=10)
                    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
                    assert err.value.details() == (
                        f"request is not a valid teepsi.v1.{message} message"
                    )
            unknown = channel.unary_unary("/teepsi.v1.Psi/Nope")
            with pytest.raises(grpc.RpcError) as err:
                unknown(b"", timeout=10)
            assert err.value.code() is grpc.StatusCode.UNIMPLEMENTED
        garbage_log = limited.log()[log_before:]
        refusals = [ln for ln in garbage_log.splitlines() if "is not a valid" in ln]
        assert len(refusals) == 2 * len(junks), garbage_log
        assert all(
            ln.endswith(f"request is not a valid teepsi.v1.{m} message")
            for ln, m in zip(refusals, ["GetChallengeRequest"] * 3 + ["JoinRequest"] * 3)
        ), refusals
        assert "Traceback" not in garbage_log and "deserializ" not in garbage_log, garbage_log
        assert "\\xff" not in garbage_log and "ff ff" not in garbage_log
        # The server is alive and runs a job while the idle connections are still open.
        data = tmp_path / "a.txt"
        data.write_text("x\ny\n")
        code, stdout, stderr = _run(_args(limited, policy_file, data, "a", job="after-garbage"))
        assert code == 0 and stdout == b"x\ny\n", stderr
    finally:
        for sock in idle:
            sock.close()
    assert limited.proc.poll() is None


def test_20_mib_messages_are_resource_exhausted(limited):
    with _pinned_channel(limited.host) as channel:
        stub = pb_grpc.PsiStub(channel)
        huge = "j" * (20 * MiB)
        with pytest.raises(grpc.RpcError) as err:
            stub.GetChallenge(pb.GetChallengeRequest(job_id=huge, party_name="a"), timeout=30)
        assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert err.value.details() == (
            "SERVER: Received message larger than max (20971528 vs. 16777216)"
        )
        with pytest.raises(grpc.RpcError) as err:
            stub.Join(pb.JoinRequest(job_id="j", party_name="a", nonce=b"n" * 20 * MiB), timeout=30)
        assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "Received message larger than max" in err.value.details()
        # An upload chunk of 20 MiB (after a fake session: the size check comes first).
        chunk = pb.UploadChunk(sequence=0, records=b"r" * 20 * MiB, record_count=1, last=True)
        with pytest.raises(grpc.RpcError) as err:
            stub.Upload(iter([chunk]), metadata=(("x-teepsi-session", "00" * 32),), timeout=30)
        assert err.value.code() in (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            grpc.StatusCode.UNAUTHENTICATED,  # refused before the message was read
        )
        # Still serving small requests.
        nonce = stub.GetChallenge(pb.GetChallengeRequest(job_id="j", party_name="a"), timeout=10)
        assert len(nonce.nonce) == NONCE_BYTES
    assert limited.proc.poll() is None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))


# -- mistakes users make on the command line (issue 13): one line, the right exit code ------


def _spec_past_deadline(tmp_path: Path, keys: list[str]) -> Path:
    spec = tmp_path / "late.toml"
    spec.write_text('job_id = "j"\ndeadline = "2020-01-01T00:00:00Z"\n' + _parties(keys))
    return spec


def _parquet_parts(directory: Path, frames: list[dict[str, list[str]]]) -> Path:
    """A Spark-style table: part files, a _SUCCESS marker, hidden .crc files."""
    import polars as pl

    directory.mkdir()
    for n, columns in enumerate(frames):
        pl.DataFrame(columns).write_parquet(directory / f"part-{n:05d}.parquet")
        (directory / f".part-{n:05d}.parquet.crc").write_bytes(b"crc")
    (directory / "_SUCCESS").write_bytes(b"")
    return directory


MISTAKES = {
    # name: (argv builder(tmp, policy, keys), exit code, the one line's start, a part of it)
    "host-without-port": (
        lambda t, p, k: ["server", "--host", "0.0.0.0", "--attestation", "sim"],
        2,
        "teepsi server: error: argument --host: '0.0.0.0' has no port: give HOST:PORT",
    ),
    "port-out-of-range": (
        lambda t, p, k: ["server", "--host", "127.0.0.1:99999", "--attestation", "sim"],
        2,
        "teepsi server: error: argument --host: '127.0.0.1:99999': port '99999' is not a "
        "number 0..65535",
    ),
    "client-host-without-port": (
        lambda t, p, k: [
            "127.0.0.1" if a == "127.0.0.1:1" else a for a in _client_argv(p, t / "a.txt")
        ],
        2,
        "teepsi client: error: argument --host: '127.0.0.1' has no port",
    ),
    "zero-parties": (
        lambda t, p, k: [*_client_argv(p, t / "a.txt"), "--parties", "0"],
        2,
        "teepsi client: error: argument --parties: '0': must be at least 1",
    ),
    "server-outside-sgx": (
        lambda t, p, k: ["server", "--host", "127.0.0.1:0", "--config", str(p)],
        2,
        "teepsi server: ERROR --attestation gramine: cannot make this server's quote: ",
    ),
    "key-on-gzip-text": (
        lambda t, p, k: [*_client_argv(p, t / "a.txt.gz"), "--key", "email"],
        2,
        "teepsi client: error: ",
    ),
    "key-on-xz-csv": (
        lambda t, p, k: [*_client_argv(p, t / "a.csv.xz"), "--key", "email"],
        2,
        "teepsi client: error: ",
    ),
    "key-on-parquet-parts-without-format": (
        lambda t, p, k: [*_client_argv(p, t / "parts"), "--key", "email", "--output", "o"],
        2,
        "teepsi client: error: ",
    ),
    "key-on-text": (
        lambda t, p, k: [*_client_argv(p, t / "a.txt"), "--key-column", "email"],
        2,
        "teepsi client: error: --key-column applies to CSV and Parquet input, and --data ",
    ),
}
MISTAKE_ENDINGS = {
    "server-outside-sgx": "for a test run outside a TEE start the server with --attestation sim "
    "(and its parties with --attestation sim --allow-simulated)",
    "key-on-gzip-text": "a.txt.gz: a .gz-compressed file is read only as gzip CSV (.csv.gz, "
    ".tsv.gz): decompress it first, or name it .csv.gz if it is gzip CSV",
    "key-on-xz-csv": "a.csv.xz: a .xz-compressed file is read only as gzip CSV (.csv.gz, "
    ".tsv.gz): decompress it first, or name it .csv.gz if it is gzip CSV",
    "key-on-parquet-parts-without-format": "parts: a directory of Parquet files: pass --format "
    "parquet to read them as one table",
    "key-on-text": "is read as text (one item per line, the line is the key); if it is a table, "
    "pass --format csv or --format parquet",
}


@pytest.mark.parametrize("case", sorted(MISTAKES))
def test_each_listed_mistake_is_one_line_with_its_exit_code(
    policy_file, tmp_path, party_keys, case
):
    """Real processes (argparse exits, logging, the server's start): exactly one line on
    stderr besides warnings, no traceback, the exit code of the matrix."""
    (tmp_path / "a.txt").write_text("x\n")
    (tmp_path / "a.txt.gz").write_bytes(b"\x1f\x8b")
    (tmp_path / "a.csv.xz").write_bytes(b"\xfd7zXZ")
    _parquet_parts(tmp_path / "parts", [{"email": ["a"]}])
    build, code, start = MISTAKES[case]
    run = subprocess.run(
        teepsi_cmd(*build(tmp_path, policy_file, party_keys)),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        check=False,
    )
    assert run.returncode == code, run.stderr
    assert "Traceback" not in run.stderr
    line = _only_error(run.stderr)
    assert line.startswith(start), line
    assert line.endswith(MISTAKE_ENDINGS.get(case, "")), line


def test_spec_check_warns_about_a_deadline_already_past(tmp_path, party_keys):
    spec = _spec_past_deadline(tmp_path, party_keys)
    run = subprocess.run(
        teepsi_cmd("spec", "check", str(spec)), capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    assert _lines(run.stderr) == [
        f"teepsi spec: warning: {spec}: deadline 2020-01-01T00:00:00Z has already passed: a "
        "server refuses this job; agree on a new deadline with the other parties"
    ]
    assert json.loads(run.stdout)["deadline"] == "2020-01-01T00:00:00Z"
    future = tmp_path / "future.toml"
    future.write_text('job_id = "j"\ndeadline = "2999-01-01T00:00:00Z"\n' + _parties(party_keys))
    run = subprocess.run(
        teepsi_cmd("spec", "check", str(future)), capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0 and run.stderr == ""


def test_gzip_csv_and_a_parquet_directory_are_read(limited, policy_file, tmp_path):
    """A .csv.gz and a Spark-style x.parquet/ directory join one job, end to end."""
    import gzip

    import polars as pl

    zipped = tmp_path / "a.csv.gz"
    zipped.write_bytes(gzip.compress(b"email,n\nann@x,1\nbob@x,2\ncat@x,3\n"))
    parts = _parquet_parts(
        tmp_path / "b.parquet", [{"email": ["bob@x", "dan@x"]}, {"email": ["cat@x"]}]
    )
    runs = [
        start_client(
            _args(
                limited,
                policy_file,
                data,
                name,
                parties=2,
                job="zipped",
                extra=["--key", "email", "--output", str(tmp_path / f"out-{name}{suffix}")],
            )
        )
        for name, data, suffix in (("a", zipped, ".csv"), ("b", parts, ".parquet"))
    ]
    for proc in runs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()
    assert sorted(pl.read_csv(tmp_path / "out-a.csv")["email"]) == ["bob@x", "cat@x"]
    assert sorted(pl.read_parquet(tmp_path / "out-b.parquet")["email"]) == ["bob@x", "cat@x"]


def test_a_server_without_allow_simulated_is_named_as_the_side_that_refuses(tmp_path, policy_file):
    """The party passed --allow-simulated; the message must send it to the server's operator."""
    workdir = tmp_path / "strict"
    workdir.mkdir()
    server = subprocess.Popen(
        teepsi_cmd(
            "server",
            "--host",
            "127.0.0.1:0",
            "--attestation",
            "sim",
            "--announce",
            "--config",
            str(policy_file),
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert server.stdout is not None
        port = int(json.loads(server.stdout.readline())["port"])
        data = tmp_path / "a.txt"
        data.write_text("x\n")
        code, _, stderr = _run(
            _args(_Server(server, port, workdir), policy_file, data, "a", parties=2)
        )
    finally:
        _stop(server)
    assert code == 1
    line = _only_error(stderr)
    assert line.startswith("teepsi client: ERROR joining the job failed: PERMISSION_DENIED: "), line
    assert line.endswith(
        "the SERVER refuses simulated evidence: its operator must start it with "
        "--allow-simulated for a test run (this party's own --allow-simulated does not change "
        "that), or run this party in an SGX enclave"
    ), line


@pytest.mark.parametrize("kind", ["closed", "http", "https", "grpc"])
def test_a_port_that_is_not_a_teepsi_server_says_so(tmp_path, policy_file, kind):
    """A closed port, a plain HTTP server, an HTTPS (TLS, no HTTP/2) server: each named."""
    from tests.support.fake_pccs import FakePccs

    servers: list[Any] = []
    if kind == "closed":
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]  # closed once the block ends
    elif kind == "grpc":
        # Another gRPC service over TLS (HTTP/2), with a certificate for the RA-TLS name.
        from concurrent import futures

        from tests.support.fake_pccs import self_signed_pem

        cert_pem, key_pem = self_signed_pem("other", (RATLS_TARGET_NAME,))
        other = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        port = other.add_secure_port(
            "127.0.0.1:0", grpc.ssl_server_credentials([(key_pem, cert_pem)])
        )
        other.start()
        servers.append(other)
    else:
        vectors = Path(__file__).parents[1] / "vectors"
        collateral = vectors / "sgx-dcap" / "sgx_quote_collateral.json"
        servers.append(FakePccs(collateral.read_text(), tls=kind == "https"))
        port = servers[0].port
    data = tmp_path / "a.txt"
    data.write_text("x\n")
    argv = [
        a if a != "127.0.0.1:1" else f"127.0.0.1:{port}" for a in _client_argv(policy_file, data)
    ]
    try:
        run = subprocess.run(teepsi_cmd(*argv), capture_output=True, text=True, timeout=60)
    finally:
        for server in servers:
            if isinstance(server, FakePccs):
                server.close()
            else:
                server.stop(grace=None)
    assert run.returncode == 1, run.stderr
    line = _only_error(run.stderr)
    host = f"127.0.0.1:{port}"
    expected = {
        "closed": f"teepsi client: ERROR nothing listens at {host} (connection refused): start "
        "the teepsi server, or check the port in --host",
        "http": f"teepsi client: ERROR {host} does not speak TLS (",
        "https": f"teepsi client: ERROR {host} is a TLS server without HTTP/2 (gRPC): not a "
        "teepsi server; check --host, or that a teepsi server runs there",
        "grpc": f"teepsi client: ERROR {host} is a gRPC server without the teepsi service "
        "(teepsi.v1.Psi): not a teepsi server; check --host",
    }[kind]
    assert line.startswith(expected), line
    if kind == "http":
        assert line.endswith(
            "not a teepsi server; check --host, or that a teepsi server runs there"
        )


def _interrupt(proc: subprocess.Popen[bytes]) -> tuple[int, str]:
    import signal

    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, (err or b"").decode()


def test_ctrl_c_exits_130_and_says_so(tmp_path, policy_file):
    """Ctrl-C on a server and on a party waiting for its partner: exit 130, one line each."""
    workdir = tmp_path / "srv"
    workdir.mkdir()
    proc, port = start_server_process(workdir, policy_file)
    server = _Server(proc, port, workdir)
    data = tmp_path / "a.txt"
    data.write_text("x\n")
    out = tmp_path / "out.txt"
    waiting = start_client(
        _args(server, policy_file, data, "a", parties=2, job="ctrlc", extra=["--output", str(out)])
    )
    _wait_for_log(server, "party a uploaded")
    code, stderr = _interrupt(waiting)
    assert code == 130, stderr
    assert "Traceback" not in stderr
    # Its resume file is kept, and the line says how to pick the result up.
    assert _lines(stderr.strip())[-1] == (
        f"teepsi client: interrupted (Ctrl-C); while the job lives, --resume with "
        f"--resume-file {out}.resume fetches the result"
    )
    assert Path(f"{out}.resume").exists()
    code, _ = _interrupt(proc)
    assert proc.stdout is not None
    proc.stdout.close()
    assert code == 130
    log = server.log()
    assert "Traceback" not in log
    assert (
        "teepsi server: WARNING interrupted (Ctrl-C): shutting down; the running jobs are "
        "dropped" in log
    )


def test_a_waiting_party_learns_why_it_waits_instead_of_a_bare_deadline(
    limited, policy_file, tmp_path
):
    """A party gives up at its --timeout: its one line says where the job stood, including
    that a partner was refused for another --normalize (told to the job's parties only)."""
    data = tmp_path / "a.txt"
    data.write_text("x\n")
    waiting = start_client(
        _args(limited, policy_file, data, "a", parties=3, job="why", extra=["--timeout", "8"])
    )
    _wait_for_log(limited, "job why: party a uploaded")
    code, _, stderr = _run(
        _args(limited, policy_file, data, "b", parties=3, job="why", extra=["--normalize", "nfc"])
    )
    assert code == 1 and "FAILED_PRECONDITION" in _only_error(stderr)
    _, err = waiting.communicate(timeout=60)
    assert waiting.returncode == 1
    line = _only_error(err.decode())
    assert line == (
        "teepsi client: ERROR waiting for the result failed: DEADLINE_EXCEEDED: Deadline "
        "Exceeded (the job when this party stopped waiting: 1 of 3 parties joined, 1 uploaded; "
        "a party was refused: different key settings (--normalize or the number of --key "
        "columns))"
    ), line


# -- argparse's own usage errors (issue #13) ------------------------------------------------

ARGPARSE_MISTAKES = {
    "unknown-flag": (["--bogus"], "unrecognized arguments: --bogus (see teepsi --help)"),
    "missing-value": (["--parties"], "argument --parties: expected one argument"),
    "bad-value": (["--parties", "0"], "argument --parties: '0': must be at least 1"),
    "bad-choice": (
        ["--format", "xls"],
        "argument --format: invalid choice: 'xls' (choose from 'text', 'csv', 'parquet')",
    ),
}


def _argparse_exit(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[object, str]:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    return exited.value.code, capsys.readouterr().err


@pytest.mark.parametrize("spelling", [["--log-format", "json"], ["--log-format=json"]])
@pytest.mark.parametrize("case", sorted(ARGPARSE_MISTAKES))
def test_argparse_usage_errors_are_one_json_line_in_json_mode(
    capsys, policy_file, tmp_path, case, spelling
):
    """With --log-format json a log shipper parses every stderr line: argparse's own
    errors (before any parse result exists) come out as the same JSON object, exit 2."""
    extra, message = ARGPARSE_MISTAKES[case]
    # The flag in error last: "--parties" then has no value.
    argv = [*_client_argv(policy_file, tmp_path / "a.txt"), *spelling, *extra]
    code, stderr = _argparse_exit(capsys, argv)
    assert code == 2
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    entry = json.loads(lines[0])
    assert entry["level"] == "ERROR" and entry["exit_code"] == 2
    assert entry["role"] == "client" and entry["logger"] == "teepsi"
    assert entry["msg"].startswith(f"error: {message}"), entry["msg"]
    assert entry["msg"].endswith("--help)"), entry["msg"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["ts"])


@pytest.mark.parametrize("case", sorted(ARGPARSE_MISTAKES))
def test_argparse_usage_errors_stay_one_text_line_in_text_mode(capsys, policy_file, tmp_path, case):
    extra, message = ARGPARSE_MISTAKES[case]
    for log_format in ([], ["--log-format", "text"]):
        argv = [*_client_argv(policy_file, tmp_path / "a.txt"), *log_format, *extra]
        code, stderr = _argparse_exit(capsys, argv)
        assert code == 2
        prog = "teepsi" if case == "unknown-flag" else "teepsi client"
        assert stderr.splitlines() == [
            f"{prog}: error: {message}"
            + ("" if case == "unknown-flag" else f" (see {prog} --help)")
        ]


def test_teepsi_log_format_json_in_the_environment_makes_usage_errors_json(
    capsys, monkeypatch, policy_file, tmp_path
):
    """TEEPSI_LOG_FORMAT is a setting of server and client; a command line that asks for
    text beats it, as a flag beats a variable."""
    monkeypatch.setenv("TEEPSI_LOG_FORMAT", "json")
    argv = [*_client_argv(policy_file, tmp_path / "a.txt"), "--parties", "0"]
    code, stderr = _argparse_exit(capsys, argv)
    assert code == 2 and json.loads(stderr)["exit_code"] == 2
    code, stderr = _argparse_exit(capsys, [*argv, "--log-format", "text"])
    assert code == 2
    assert stderr.startswith("teepsi client: error: argument --parties: '0'"), stderr
    # A command without --log-format keeps its text errors whatever the environment says.
    code, stderr = _argparse_exit(capsys, ["keygen"])
    assert code == 2
    assert stderr.startswith("teepsi keygen: error: the following arguments are required: --out")


def test_a_bad_log_format_is_a_text_usage_error(capsys, policy_file, tmp_path):
    argv = [*_client_argv(policy_file, tmp_path / "a.txt"), "--log-format", "yaml"]
    code, stderr = _argparse_exit(capsys, argv)
    assert code == 2
    assert stderr.startswith("teepsi client: error: argument --log-format: invalid choice: 'yaml'")


def test_argparse_usage_error_in_json_mode_from_a_real_process(policy_file, tmp_path):
    run = subprocess.run(
        teepsi_cmd("server", "--log-format", "json", "--max-jobs", "many"),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 2
    lines = run.stderr.splitlines()
    assert len(lines) == 1, run.stderr
    entry = json.loads(lines[0])
    assert entry["role"] == "server" and entry["exit_code"] == 2
    assert entry["msg"] == (
        "error: argument --max-jobs: 'many' is not a whole number (see teepsi server --help)"
    )


def test_csv_without_a_key_column_names_the_flag(capsys, policy_file, tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("email\na@x\n")
    code, stderr = _run_main(
        capsys, _client_argv(policy_file, path, "--output", str(tmp_path / "o.csv"))
    )
    assert code == 2
    assert _only_error(stderr) == (
        f"teepsi client: error: {path}: name the key column(s) with --key-column COLUMN"
    )
