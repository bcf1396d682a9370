#!/usr/bin/env bash
# Regenerate teepsi's gRPC Python code from src/teepsi/protocol/teepsi.proto.
# Run from the repository root with the dev dependencies installed (`make proto`).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m grpc_tools.protoc \
  -I src \
  --python_out=src --grpc_python_out=src --mypy_out=src --mypy_grpc_out=src \
  src/teepsi/protocol/teepsi.proto
