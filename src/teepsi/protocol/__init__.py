"""The teepsi.v1 wire protocol: teepsi.proto and its generated code (`make proto`)."""

#: gRPC metadata key carrying a party's session credential (hex) on Upload and GetResult.
SESSION_METADATA = "x-teepsi-session"

#: Largest gRPC message either side sends or accepts; chunks of records stay well below it.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
