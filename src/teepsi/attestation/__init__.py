"""Attestation: evidence providers, RA-TLS certificates, quote verification and policy."""
