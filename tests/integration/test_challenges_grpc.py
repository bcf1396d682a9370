"""Challenges over gRPC: a flood of GetChallenge calls does not lock out an honest join."""

from __future__ import annotations


def test_an_honest_join_survives_a_12k_challenge_flood_over_grpc():
    """The attack of the review, end to end: challenge, 12k challenges by someone else,
    then the join with the first nonce. Before: PERMISSION_DENIED (nonce evicted)."""
    from teepsi.client.party import PsiClient
    from teepsi.protocol import teepsi_pb2 as pb
    from teepsi.server import ServerConfig, start_server
    from tests.integration.test_service import POLICY, _config, _signed_join

    server = start_server(
        ServerConfig(
            host="127.0.0.1:0", attestation="sim", client_policy=POLICY, allow_simulated=True
        )
    )
    honest = PsiClient(_config(server))
    flooders = [PsiClient(_config(server, f"x{n}")) for n in range(4)]
    try:
        for client in (honest, *flooders):
            client.connect()
        nonce = honest.stub.GetChallenge(pb.GetChallengeRequest(job_id="j", party_name="a"))
        flood = 0
        while flood < 12_000:
            calls = [
                flooder.stub.GetChallenge.future(
                    pb.GetChallengeRequest(job_id="j", party_name=f"f{flood + n}")
                )
                for flooder in flooders
                for n in range(8)  # the server's streams per connection
            ]
            for call in calls:
                # A call racing a stream slot may be refused (REFUSED_STREAM): not issued.
                if call.exception() is None:
                    flood += 1
        request = _signed_join(honest, job="j", name="a", nonce=nonce.nonce, quote_for="a")
        assert honest.stub.Join(request).session_token
    finally:
        for client in (honest, *flooders):
            client.close()
        server.stop(grace=0)
