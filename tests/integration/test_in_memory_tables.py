"""run_party on in-memory tables (issue 12.4): polars, pandas and Arrow frames give the same
matching rows, in key order, as a file would; a read table and a frame are told apart."""

from __future__ import annotations

import threading

import polars as pl
import pyarrow as pa
import pytest

import teepsi
from teepsi.attestation.evidence import Role
from teepsi.attestation.measure import sim_identity
from teepsi.attestation.policy import policy_for
from teepsi.server.limits import Limits

POLICY = policy_for(
    [("server", sim_identity(Role.SERVER)), ("provider", sim_identity(Role.DATA_PROVIDER))]
)


@pytest.fixture
def server():
    running = teepsi.start_server(
        teepsi.ServerConfig(
            host="127.0.0.1:0",
            attestation="sim",
            client_policy=POLICY,
            allow_simulated=True,
            limits=Limits(job_timeout_seconds=30),
        )
    )
    yield running
    running.stop(grace=0)


def _config(server, name: str, job: str) -> teepsi.PartyConfig:
    return teepsi.PartyConfig(
        host=f"127.0.0.1:{server.port}",
        policy=POLICY,
        name=name,
        party_count=2,
        job_id=job,
        attestation="sim",
        allow_simulated=True,
        timeout=30,
    )


def _both(
    server, job: str, mine: object, theirs: object, key: str
) -> dict[str, teepsi.PartyResult]:
    results: dict[str, teepsi.PartyResult] = {}
    errors: list[BaseException] = []

    def party(name: str, table: object) -> None:
        try:
            results[name] = teepsi.run_party(_config(server, name, job), table, key_columns=[key])
        except BaseException as exc:  # reported by the test thread below
            errors.append(exc)

    threads = [
        threading.Thread(target=party, args=("a", mine)),
        threading.Thread(target=party, args=("b", theirs)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    return results


CUSTOMERS = pl.DataFrame(
    {
        "email": ["eve@x.org", "bob@x.org", "Ann@x.org", "bob@x.org", None, "zed@x.org"],
        "spend": [5, 7, 1, 9, 3, 2],  # typed columns stay typed, as from Parquet
    }
)
PARTNER = {"email": ["bob@x.org", "ann@x.org", "eve@x.org", "kim@x.org"], "n": [1, 2, 3, 4]}


@pytest.mark.parametrize(
    "partner",
    [
        pytest.param(lambda: pl.DataFrame(PARTNER), id="polars"),
        pytest.param(lambda: pl.DataFrame(PARTNER).lazy(), id="polars-lazy"),
        pytest.param(lambda: pa.table(PARTNER), id="arrow"),
        pytest.param(lambda: pytest.importorskip("pandas").DataFrame(PARTNER), id="pandas"),
    ],
)
def test_in_memory_tables_match_by_key_in_key_order(server, partner, request):
    results = _both(server, request.node.callspec.id, CUSTOMERS, partner(), "email")
    mine, theirs = results["a"].rows, results["b"].rows
    assert isinstance(mine, pl.DataFrame) and isinstance(theirs, pl.DataFrame)
    # trim normalisation, case kept: "Ann@x.org" is not "ann@x.org"; both bob rows, in order
    assert mine.to_dicts() == [
        {"email": "bob@x.org", "spend": 7},
        {"email": "bob@x.org", "spend": 9},
        {"email": "eve@x.org", "spend": 5},
    ]
    assert theirs.to_dicts() == [{"email": "bob@x.org", "n": 1}, {"email": "eve@x.org", "n": 3}]
    assert results["a"].rows_read == 6 and results["a"].rows_with_key == 5


def test_an_in_memory_table_needs_its_key_columns(server):
    with pytest.raises(teepsi.PsiClientError, match="name the key_columns"):
        teepsi.run_party(_config(server, "a", "k"), CUSTOMERS)
    with pytest.raises(teepsi.TableError, match="no column 'mail'"):
        teepsi.run_party(_config(server, "a", "k"), CUSTOMERS, key_columns=["mail"])
    with pytest.raises(teepsi.TableError, match="not a table polars can read"):
        teepsi.run_party(_config(server, "a", "k"), 42, key_columns=["email"])


def test_a_read_table_brings_its_own_key_columns(server, tmp_path):
    path = tmp_path / "c.csv"
    CUSTOMERS.write_csv(path)
    spec = teepsi.TableSpec(path=path, format=teepsi.TableFormat.CSV, key_columns=("email",))
    with teepsi.read_table(spec) as table, pytest.raises(teepsi.PsiClientError, match="already"):
        teepsi.run_party(_config(server, "a", "r"), table, key_columns=["email"])
