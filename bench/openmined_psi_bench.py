"""openmined-psi (ECDH) 2-party PSI, timed; runs in its own venv (it pins protobuf 6).

Usage: openmined_psi_bench.py SERVER_KEYS CLIENT_KEYS DATA_STRUCTURE(raw|gcs)
Prints one JSON line. Server and client run in this one process with no network between
them, which only flatters openmined-psi: it is the cryptography we time.
"""

from __future__ import annotations

import json
import sys
import time

import private_set_intersection.python as psi  # type: ignore[import-not-found]

FPR = 1.0 / 1_000_000_000


def main(argv: list[str]) -> int:
    server_path, client_path, structure = argv
    with open(server_path) as handle:
        server_items = [line.strip() for line in handle if line.strip()]
    with open(client_path) as handle:
        client_items = [line.strip() for line in handle if line.strip()]
    data_structure = psi.DataStructure.GCS if structure == "gcs" else psi.DataStructure.RAW

    started = time.perf_counter()
    server = psi.server.CreateWithNewKey(True)  # reveal_intersection=True
    client = psi.client.CreateWithNewKey(True)
    setup = server.CreateSetupMessage(FPR, len(client_items), server_items, data_structure)
    t_setup = time.perf_counter()
    request = client.CreateRequest(client_items)
    t_request = time.perf_counter()
    response = server.ProcessRequest(request)
    t_response = time.perf_counter()
    intersection = client.GetIntersection(setup, response)
    finished = time.perf_counter()

    wire = sum(len(m.SerializeToString()) for m in (setup, request, response))
    sys.stdout.write(
        json.dumps(
            {
                "version": getattr(psi, "__version__", "2.0.6"),
                "data_structure": structure,
                "fpr": FPR,
                "server_items": len(server_items),
                "client_items": len(client_items),
                "intersection": len(intersection),
                "seconds": finished - started,
                "phases": {
                    "server_setup": t_setup - started,
                    "client_request": t_request - t_setup,
                    "server_response": t_response - t_request,
                    "client_intersection": finished - t_response,
                },
                "message_bytes": wire,
            }
        )
        + "\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
