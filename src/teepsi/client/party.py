"""A data provider's run, end to end: :func:`run_party` with a read table,
:func:`run_party_items` with in-memory items.

The run's parts: its settings (:mod:`teepsi.client.config`), the attested connection
(:mod:`teepsi.client.connection`), the result and its receipt (:mod:`teepsi.client.results`);
their public names, and the connection helpers of :mod:`teepsi.protocol.connect` (a light
module, so that `teepsi health` starts fast), are re-exported here, where the API and
the tests name them.
"""

from __future__ import annotations

import dataclasses
import hmac
from collections.abc import Iterable, Sequence
from pathlib import Path

import polars as pl

from teepsi.client.config import PartyConfig, ResumeSaver, ResumeToken, ResumeTokenError
from teepsi.client.connection import PsiClient, ReceivedResult
from teepsi.client.progress import Progress, timed
from teepsi.client.results import PartyResult, check_receipt
from teepsi.contract.normalization import Normalization
from teepsi.engine.matching import find_matching_rows
from teepsi.engine.tables import (
    TEXT_COLUMN,
    Table,
    TableSpec,
    table_from_dataframe,
    table_from_frame,
)
from teepsi.protocol import teepsi_pb2 as pb
from teepsi.protocol.connect import (
    RATLS_TARGET_NAME,
    PsiClientError,
    fetch_server_certificate,
    pinned_channel,
)

__all__ = [
    "RATLS_TARGET_NAME",
    "PartyConfig",
    "PartyResult",
    "PsiClient",
    "PsiClientError",
    "ReceivedResult",
    "ResumeSaver",
    "ResumeToken",
    "ResumeTokenError",
    "fetch_server_certificate",
    "pinned_channel",
    "run_party",
    "run_party_items",
]


def _resumed_session(config: PartyConfig, client: PsiClient) -> tuple[bytes, tuple[int, int]]:
    """The session of an earlier run of this party: its saved token, or (under a spec) a
    new one the party's key obtains."""
    saved = config.resume_token
    if saved is None:
        if config.spec is None:
            raise PsiClientError("resuming in quick mode needs the run's resume_token")
        return client.join("", resume=True)
    if (saved.job_id, saved.party_name) != (config.job_id, config.name):
        raise PsiClientError(
            f"the resume file is for party {saved.party_name} of job {saved.job_id}, not "
            f"{config.name} of {config.job_id}"
        )
    if not hmac.compare_digest(saved.server_certificate_sha256, client.server_certificate_sha256):
        raise PsiClientError(
            f"the server at {config.host} restarted since (new certificate): job "
            f"{config.job_id} and its result are gone; run the job again without resuming"
        )
    return saved.session_token, saved.key_seeds


def _wait_for_result(
    client: PsiClient, token: bytes, progress: Progress, party_count: int
) -> ReceivedResult:
    """The result, with a bar of the job's parties uploaded meanwhile; a wait that fails
    says where the job stood (the counts this party was last sent)."""
    last: list[pb.JobProgress] = []
    with progress.phase("waiting for the other parties", total=party_count) as bar:

        def seen(message: pb.JobProgress) -> None:
            last[:] = [message]
            bar.show(
                message.uploaded,
                message.party_count,
                f"waiting: {message.joined} of {message.party_count} parties joined, "
                f"{message.uploaded} uploaded",
            )

        stop = client.watch_progress(token, seen)
        try:
            return client.result(token)
        except PsiClientError as exc:
            status = last[0].status if last else ""
            # The server explains a job's own end; this party's own timeout only it can.
            if status and client.out_of_time():
                raise PsiClientError(
                    f"{exc} (the job when this party stopped waiting: {status})"
                ) from None
            raise
        finally:
            stop()


def run_party(
    config: PartyConfig,
    table: Table | object,
    *,
    key_columns: Sequence[str] | None = None,
    normalization: Normalization | None = None,
    save_resume: ResumeSaver | None = None,
) -> PartyResult:
    """Run one data provider end to end, on a table read with
    :func:`teepsi.engine.tables.read_table` or on an in-memory polars, pandas or Arrow
    table, whose ``key_columns`` are then named here (with its ``normalization``).

    ``save_resume`` (quick mode) gets the session once the upload is complete, so a
    restarted client can fetch the result with ``PartyConfig.resume_token``.
    """
    if isinstance(table, Table):
        if key_columns is not None or normalization is not None:
            raise PsiClientError(
                "run_party: a read table has its key columns and normalisation already "
                "(they are named with in-memory tables only)"
            )
        return _run_party(config, table, save_resume)
    if not key_columns:
        raise PsiClientError("run_party: name the key_columns of an in-memory table")
    with table_from_dataframe(table, key_columns, normalization=normalization) as loaded:
        return _run_party(config, loaded, save_resume)


def _run_party(config: PartyConfig, table: Table, save_resume: ResumeSaver | None) -> PartyResult:
    """Run one data provider end to end with an already loaded table.

    ``save_resume`` (quick mode) gets the session once the upload is complete, so a
    restarted client can fetch the result with ``PartyConfig.resume_token``.
    """
    if config.party_count < 1:
        raise PsiClientError("party_count must be at least 1")
    if config.spec is not None and table.spec.normalization.canonical() != config.spec.normalize:
        raise PsiClientError(
            f"key normalisation {table.spec.normalization.canonical()!r} differs from the job "
            f"spec's {config.spec.normalize!r}"
        )
    client = PsiClient(config)
    progress = Progress(enabled=config.progress)
    try:
        server = client.connect()
        if config.resume:
            token, seeds = _resumed_session(config, client)
        else:
            token, seeds = client.join(table.spec.key_scheme)
        with timed("hashing"):
            # On resume too: the receipt's entry for us is checked against these.
            table.hash(seeds)
        if not config.resume:
            with progress.phase("uploading", total=None) as bar:
                client.upload_parts(token, table.distinct_records(), bar)
            # Only now is there something to resume (a broken upload frees the slot).
            if save_resume is not None and config.spec is None:
                save_resume(
                    ResumeToken(
                        host=config.host,
                        job_id=config.job_id,
                        party_name=config.name,
                        session_token=token,
                        key_seeds=seeds,
                        server_certificate_sha256=client.server_certificate_sha256,
                    )
                )
        got = _wait_for_result(client, token, progress, config.party_count)
        with timed("receipt"):
            receipt = check_receipt(config, client, got, table)
    finally:
        client.close()
    # The result's records serve the matching only: not held while the rows are written.
    hi, lo = got.hi, got.lo
    got = dataclasses.replace(got, hi=hi[:0].copy(), lo=lo[:0].copy())
    if got.status == "RELEASED":
        with progress.phase("matching rows", total=None):
            matching = find_matching_rows(table, seeds, hi, lo)
    else:
        matching = find_matching_rows(table, seeds, hi[:0], lo[:0])
    del hi, lo
    return PartyResult(
        matching=matching,
        status=got.status,
        intersection_size=None if got.status == "BELOW_THRESHOLD" else got.total,
        result_sha256=got.sha256,
        rows_read=table.rows_read,
        rows_with_key=table.rows_with_key,
        distinct_keys=got.distinct,
        server=server,
        job_id=config.job_id,
        party_name=config.name,
        receipt=receipt,
        server_certificate_der=client.server_certificate_der,
        server_collateral_json=client.server_collateral_json,
    )


def run_party_items(
    config: PartyConfig, items: Iterable[str], normalization: Normalization | None = None
) -> PartyResult:
    """Run a party over in-memory text items (one key each)."""
    frame = pl.DataFrame({TEXT_COLUMN: list(items)}, schema={TEXT_COLUMN: pl.String})
    spec = TableSpec(path=Path("<memory>"), normalization=normalization or Normalization())
    with table_from_frame(frame, spec) as table:
        return run_party(config, table)
