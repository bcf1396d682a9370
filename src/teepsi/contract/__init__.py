"""Job contracts: the agreed job spec, party keys, signed receipts and the audit log.

Everything here is pure (files and bytes in, values out; no gRPC, no network) so the
server, the client and the CLI share one implementation of each rule. The submodules
are imported explicitly; this package imports nothing so that, say, checking a receipt
does not load the PSI engine.
"""
