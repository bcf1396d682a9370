"""No result is lost (real `teepsi server` and `teepsi client` processes, sim mode).

Output paths are checked before joining, table rows are never discarded, results and
receipts are written atomically and 0600, a party whose client died after uploading gets
its result again while the job lives, and a failure to write keeps the rows elsewhere.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import time
from pathlib import Path

from tests.integration import test_faults
from tests.integration.test_faults import _errors, _wait_for_log
from tests.support.processes import client_args, start_client, teepsi_cmd

# The fault tests' fixtures: server processes on the stable policy, and client processes
# killed at teardown.
serve = test_faults.serve
procs = test_faults.procs


def _party(server, policy: Path, data: Path, name: str, job: str, *extra: str) -> list[str]:
    """`teepsi client` args for a party of a 2-party job."""
    return client_args(server, data, parties=2, name=name, policy=policy, job=job, extra=extra)


def _solo(server, policy: Path, data: Path, *extra: str, job: str = "default") -> list[str]:
    """`teepsi client` args for the only party ("a") of a 1-party job."""
    return client_args(server, data, parties=1, name="a", policy=policy, job=job, extra=extra)


def _spec_job(tmp_path: Path, job: str, names: str, settings: str = "") -> Path:
    """A job spec over fresh keys (NAME.key in tmp_path) for the parties ``names``."""
    public = {}
    for name in names:
        made = _run(teepsi_cmd("keygen", "--out", str(tmp_path / f"{name}.key")))
        public[name] = made.stdout.decode().strip()
    spec = tmp_path / f"{job}.toml"
    spec.write_text(
        f'job_id = "{job}"\n{settings}'
        + "".join(f'[[parties]]\nname = "{n}"\npublic_key = "{public[n]}"\n' for n in names)
    )
    return spec


def _spec_args(args: list[str], spec: Path, key: Path) -> list[str]:
    """Client args under a spec: it fixes --job and --parties, so they are dropped."""
    for flag in ("--job", "--parties"):
        at = args.index(flag)
        del args[at : at + 2]
    return [*args, "--spec", str(spec), "--key-file", str(key)]


def _csv(path: Path, ids: list[int]) -> Path:
    path.write_text("id,name\n" + "".join(f"{i},name-{i}\n" for i in ids))
    return path


def _text(path: Path, items: list[str]) -> Path:
    path.write_text("".join(f"{item}\n" for item in items))
    return path


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _run(args: list[str], **kw) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(args, capture_output=True, timeout=120, **kw)


def test_output_in_a_missing_directory_is_refused_before_joining(serve, policy_file, tmp_path):
    server = serve()
    data = _csv(tmp_path / "a.csv", [1, 2, 3])
    args = _solo(
        server, policy_file, data, "--key", "id", "--output", str(tmp_path / "nodir" / "a.csv")
    )
    run = _run(args)
    assert run.returncode == 2, run.stderr.decode()
    errors = _errors(run.stderr)
    assert len(errors) == 1 and "--output" in errors[0] and "does not exist" in errors[0]
    assert "Traceback" not in run.stderr.decode()
    assert "joined" not in server.log()  # refused before the job, not after it
    # The receipt's path is checked the same way.
    args = _solo(
        server,
        policy_file,
        data,
        "--key",
        "id",
        "--output",
        str(tmp_path / "ok.csv"),
        "--receipt",
        str(tmp_path / "nodir" / "r.json"),
    )
    run = _run(args)
    assert run.returncode == 2 and "--receipt" in _errors(run.stderr)[0]
    assert "joined" not in server.log()


def test_table_rows_need_an_output_or_go_to_stdout(serve, policy_file, tmp_path):
    server = serve()
    data = _csv(tmp_path / "a.csv", [3, 1, 2])
    run = _run(_solo(server, policy_file, data, "--key", "id"))
    assert run.returncode == 2
    errors = _errors(run.stderr)
    assert len(errors) == 1 and "--output" in errors[0], errors
    assert "joined" not in server.log()
    run = _run(_solo(server, policy_file, data, "--key", "id", "--output", "-", job="dash"))
    assert run.returncode == 0, run.stderr.decode()
    assert run.stdout.decode() == "id,name\n1,name-1\n2,name-2\n3,name-3\n"
    assert "3 matching rows" in run.stderr.decode()  # the summary stays off stdout


def test_output_that_is_the_input_under_any_name_is_refused(serve, policy_file, tmp_path):
    server = serve()
    data = _csv(tmp_path / "a.csv", [1, 2])
    original = data.read_bytes()
    (tmp_path / "hard.csv").hardlink_to(data)
    (tmp_path / "soft.csv").symlink_to(data)
    for spelling in (str(data), "hard.csv", "soft.csv", "./a.csv", f"../{tmp_path.name}/a.csv"):
        args = _solo(server, policy_file, data, "--key", "id", "--output", spelling)
        run = _run(args, cwd=tmp_path)
        assert run.returncode == 2, (spelling, run.stderr.decode())
        assert "is the input file" in _errors(run.stderr)[0], spelling
    # The receipt cannot be the input either, nor the output.
    args = _solo(
        server, policy_file, data, "--key", "id", "--output", "out.csv", "--receipt", "out.csv"
    )
    run = _run(args, cwd=tmp_path)
    assert run.returncode == 2 and "--receipt" in _errors(run.stderr)[0]
    assert data.read_bytes() == original
    assert "joined" not in server.log()


def test_result_receipt_and_certificate_are_0600_whatever_the_umask(serve, policy_file, tmp_path):
    server = serve()
    data = _text(tmp_path / "a.txt", ["x", "y"])
    out, receipt = tmp_path / "out.txt", tmp_path / "r.json"
    args = _solo(server, policy_file, data, "--output", str(out), "--receipt", str(receipt))
    run = _run(args, preexec_fn=lambda: os.umask(0))
    assert run.returncode == 0, run.stderr.decode()
    assert out.read_text() == "x\ny\n"
    for path in (out, receipt, Path(f"{receipt}.cert.pem"), Path(f"{receipt}.collateral.json")):
        assert _mode(path) == 0o600, path
    assert not Path(f"{out}.resume").exists()  # the result is saved: nothing to resume
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "a.txt",
        "out.txt",
        "r.json",
        "r.json.cert.pem",
        "r.json.collateral.json",
        "server0",
    ]


def test_quick_mode_party_killed_after_upload_resumes_from_its_file(
    serve, policy_file, tmp_path, procs
):
    server = serve("--job-timeout", "90")
    out = tmp_path / "out.txt"
    common = [f"common-{i}" for i in range(20)]
    a_data = _text(tmp_path / "a.txt", [*common, "only-a"])
    a_args = _party(server, policy_file, a_data, "a", "q", "--output", str(out))
    a = start_client(a_args)
    procs.append(a)
    _wait_for_log(server, "job q: party a uploaded")
    resume_file = Path(f"{out}.resume")
    give_up = time.monotonic() + 30  # written once the client has the upload's summary
    while not resume_file.exists() and time.monotonic() < give_up:
        time.sleep(0.05)
    assert resume_file.exists() and _mode(resume_file) == 0o600
    a.send_signal(signal.SIGKILL)
    a.wait(timeout=10)
    b_data = _text(tmp_path / "b.txt", [*common, "only-b"])
    b = _run(_party(server, policy_file, b_data, "b", "q"))
    assert b.returncode == 0, b.stderr.decode()
    expected = "".join(f"{item}\n" for item in sorted(common))
    assert b.stdout.decode() == expected
    # a's restarted client: the same command plus --resume; no second upload.
    again = _run([*a_args, "--resume"])
    assert again.returncode == 0, again.stderr.decode()
    assert out.read_text() == expected and _mode(out) == 0o600
    assert not resume_file.exists()
    assert server.log().count("party a uploaded") == 1
    _wait_for_log(server, "job q: every party has its result; job state wiped")


def test_spec_party_killed_after_upload_resumes_with_its_key(serve, policy_file, tmp_path, procs):
    server = serve("--job-timeout", "90")
    spec = _spec_job(tmp_path, "s", "ab")
    _run(teepsi_cmd("keygen", "--out", str(tmp_path / "mallory.key")))

    def party(name: str, items: list[str], key: str, *extra: str) -> list[str]:
        data = _text(tmp_path / f"{name}-{key}.txt", items)
        args = _party(server, policy_file, data, name, "s", *extra)
        return _spec_args(args, spec, tmp_path / f"{key}.key")

    out = tmp_path / "a-out.txt"
    a_args = party("a", ["x", "y", "z"], "a", "--output", str(out))
    # Nothing to resume before a has joined.
    early = _run([*a_args, "--resume"])
    assert early.returncode == 1 and "without --resume" in _errors(early.stderr)[0]
    a = start_client(a_args)
    procs.append(a)
    _wait_for_log(server, "job s: party a uploaded")
    a.send_signal(signal.SIGKILL)
    a.wait(timeout=10)
    # Another key cannot take a's result.
    stolen = _run([*party("a", ["x"], "mallory"), "--resume"])
    assert stolen.returncode == 2 and "not the key the spec lists" in stolen.stderr.decode()
    b = _run(party("b", ["y", "z", "w"], "b"))
    assert b.returncode == 0 and b.stdout.decode() == "y\nz\n", b.stderr.decode()
    again = _run([*a_args, "--resume"])
    assert again.returncode == 0, again.stderr.decode()
    assert out.read_text() == "y\nz\n"
    assert "party a resumed its session" in server.log()
    _wait_for_log(server, "job s: every party has its result; job state wiped")


def test_rows_are_kept_when_the_output_cannot_be_written_after_the_result(
    serve, policy_file, tmp_path, procs
):
    server = serve("--job-timeout", "90")
    folder = tmp_path / "results"
    folder.mkdir()
    a_data = _text(tmp_path / "a.txt", ["p", "q"])
    a = start_client(_party(server, policy_file, a_data, "a", "w", "--output", f"{folder}/a.txt"))
    procs.append(a)
    _wait_for_log(server, "job w: party a uploaded")
    shutil.rmtree(folder)  # the output's directory vanishes while a waits
    b = _run(_party(server, policy_file, _text(tmp_path / "b.txt", ["q", "r"]), "b", "w"))
    assert b.returncode == 0
    _, stderr = a.communicate(timeout=60)
    assert a.returncode == 1
    errors = _errors(stderr)
    assert len(errors) == 1 and "saved to" in errors[0], stderr.decode()
    assert "Traceback" not in stderr.decode()
    rescued = Path(errors[0].rsplit("saved to ", 1)[1].split(" instead")[0])
    try:
        assert rescued.read_text() == "q\n" and _mode(rescued) == 0o600
    finally:
        rescued.unlink(missing_ok=True)


def test_receipt_that_cannot_be_written_after_the_result_does_not_lose_the_rows(
    serve, policy_file, tmp_path, procs
):
    """The receipt's directory vanishes while the party waits: rows saved, one line, exit 1."""
    server = serve("--job-timeout", "90")
    folder = tmp_path / "receipts"
    folder.mkdir()
    a_data = _text(tmp_path / "a.txt", ["p", "q"])
    out = tmp_path / "a-out.txt"
    a = start_client(
        _party(
            server,
            policy_file,
            a_data,
            "a",
            "rw",
            "--output",
            str(out),
            "--receipt",
            f"{folder}/r.json",
        )
    )
    procs.append(a)
    _wait_for_log(server, "job rw: party a uploaded")
    shutil.rmtree(folder)
    b = _run(_party(server, policy_file, _text(tmp_path / "b.txt", ["q", "r"]), "b", "rw"))
    assert b.returncode == 0
    _, stderr = a.communicate(timeout=60)
    assert a.returncode == 1
    errors = _errors(stderr)
    assert len(errors) == 1 and "cannot write" in errors[0], stderr.decode()
    assert "Traceback" not in stderr.decode()
    assert out.read_text() == "q\n" and _mode(out) == 0o600


def test_below_threshold_job_ends_with_one_clear_line_and_no_traceback(
    serve, policy_file, tmp_path
):
    server = serve()
    spec = _spec_job(tmp_path, "small", "ab", "min_intersection = 5\n")
    started = []
    for name in "ab":
        data = _text(tmp_path / f"{name}.txt", ["x", "y", name])
        args = _spec_args(
            _party(server, policy_file, data, name, "small"), spec, tmp_path / f"{name}.key"
        )
        # Not --quiet: the info summary at the end is what used to crash in logging.
        started.append(start_client([a for a in args if a != "--quiet"]))
    for proc in started:
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr.decode()
        assert "below the job's min_intersection" in stdout.decode()
        text = stderr.decode()
        assert "Traceback" not in text and "Logging error" not in text, text
        assert "intersection withheld" in text


def test_resume_with_other_data_withholds_the_rows_and_says_why(
    serve, policy_file, tmp_path, procs
):
    """The receipt names the set each party uploaded: a restarted client whose --data
    changed does not map the result onto other rows; it withholds them, with the reason."""
    server = serve("--job-timeout", "90")
    out = tmp_path / "out.txt"
    a_data = _text(tmp_path / "a.txt", ["x", "y", "z"])
    a_args = _party(server, policy_file, a_data, "a", "r", "--output", str(out))
    a = start_client(a_args)
    procs.append(a)
    _wait_for_log(server, "job r: party a uploaded")
    a.send_signal(signal.SIGKILL)
    a.wait(timeout=10)
    b = _run(_party(server, policy_file, _text(tmp_path / "b.txt", ["y", "z", "w"]), "b", "r"))
    assert b.returncode == 0, b.stderr.decode()
    _text(a_data, ["y", "other"])  # the data file changed before the restart
    again = _run([*a_args, "--resume"])
    assert again.returncode == 1
    errors = _errors(again.stderr)
    assert len(errors) == 1, again.stderr.decode()
    assert "receipt does not check out" in errors[0] and "withheld" in errors[0]
    assert not out.exists() and again.stdout == b""


def test_partner_of_a_party_whose_upload_broke_off_learns_why_the_job_fails(
    serve, policy_file, tmp_path, procs
):
    from tests.support.tcp_proxy import TcpProxy

    server = serve("--job-timeout", "15")
    common = [f"common-{i}" for i in range(50)]
    b = start_client(_party(server, policy_file, _text(tmp_path / "b.txt", common), "b", "gone"))
    procs.append(b)
    _wait_for_log(server, "job gone: party b uploaded")
    # a's client dies 2 MB into a 6.4 MB upload (through a 2 MB/s link).
    big = _text(tmp_path / "a.txt", [*common, *(f"a-{i}" for i in range(400_000))])
    with TcpProxy(server.port, bytes_per_second=2_000_000, lifetime=60) as proxy:
        a = start_client(_party(proxy, policy_file, big, "a", "gone"))
        procs.append(a)
        assert proxy.wait_for_bytes(up=2_000_000, timeout=60), "upload never started"
        a.send_signal(signal.SIGKILL)
        a.wait(timeout=10)
        _wait_for_log(server, "upload of party a broke off", 30)
    _, stderr = b.communicate(timeout=60)
    assert b.returncode == 1
    errors = _errors(stderr)
    assert len(errors) == 1 and errors[0].endswith(
        "DEADLINE_EXCEEDED: job gone expired: 1 of 2 parties uploaded before its deadline; "
        "party a joined but its upload broke off"
    ), errors
