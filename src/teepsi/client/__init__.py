"""The data provider's side, as a Python API.

Example::

    from teepsi.attestation.policy import Policy
    from teepsi.client import PartyConfig, run_party_items

    result = run_party_items(PartyConfig(
        host="psi.example.org:50051",
        policy=Policy.load("dynamic_config.json"),
        name="bank-a", party_count=2, attestation="gramine",
    ), ["alice@example.org", "bob@example.org"])
    print(result.matching_items())
"""

from teepsi.client.party import PartyConfig, PartyResult, PsiClientError, run_party, run_party_items

__all__ = ["PartyConfig", "PartyResult", "PsiClientError", "run_party", "run_party_items"]
