"""The data provider's side, as a Python API.

Example::

    from teepsi.attestation.policy import Policy
    from teepsi.client import PartyConfig, run_party

    result = run_party(PartyConfig(
        host="psi.example.org:50051",
        policy=Policy.load("dynamic_config.json"),
        name="bank-a", party_count=2, attestation="gramine",
    ), items={b"alice@example.org", b"bob@example.org"})
    print(result.items)
"""

from teepsi.client.party import PartyConfig, PartyResult, PsiClientError, run_party

__all__ = ["PartyConfig", "PartyResult", "PsiClientError", "run_party"]
