"""Job contracts: the agreed job spec, party keys, signed receipts and the audit log.

Everything here is pure (files and bytes in, values out; no gRPC, no network) so the
server, the client and the CLI share one implementation of each rule. The submodules
are imported explicitly; this package imports nothing so that, say, checking a receipt
does not load the PSI engine.

* ``spec`` the job spec (model and canonical form), read by ``spec_text`` (TOML/JSON
  text) and ``spec_fields`` (each field's checks);
* ``party_keys`` the parties' long-term signing keys; ``signing`` the server's
  signatures over documents;
* ``receipt`` signed receipts;
* ``audit`` the audit log (writer and public face), with ``audit_chain`` (entries and
  their hash chain), ``audit_head`` (signed heads) and ``audit_verify`` (checking a log);
* ``identifiers`` the naming rules, ``outputs`` the output kinds, ``_common`` small
  helpers (canonical JSON, counts).
"""
