#!/usr/bin/env bash
# Start one teepsi container on an SGX host, as the seed's start_container.sh did:
#
#   deploy/docker/start_container.sh <server|client1|client2|client3> <PCCS ip> [image]
#
# image defaults to teepsi:anolis8 (build it with deploy/docker/Dockerfile.anolis8, or use
# teepsi:ubuntu2204). The container gets:
#   * the SGX devices /dev/sgx_enclave and /dev/sgx_provision;
#   * the host's aesmd socket directory /var/run/aesmd (quotes are made by the host's AESM);
#   * host networking (--net=host) and a hosts entry pccs.service.com -> <PCCS ip>;
#   * /etc/sgx_default_qcnl.conf written at start with
#       PCCS_URL=https://<PCCS ip>:${PCCS_PORT:-8081}/sgx/certification/v4/
#       USE_SECURE_CERT=${USE_SECURE_CERT:-FALSE}
#     (the IP, not the name: the enclaves do not read /etc/hosts);
#   * for clientN: deploy/data/dataN.txt (or $TEEPSI_DATA_FILE) read-only at /data/input, and
#     ${TEEPSI_OUT:-./teepsi-out}/clientN at /data, where run.toml, output and receipt/ go (and
#     where spec.toml and party.key are put for `teepsi-run client --contract`);
#   * for server: ${TEEPSI_OUT:-./teepsi-out}/server at /data (run.toml, audit/audit.log) and
#     ${TEEPSI_OUT:-./teepsi-out}/server-state at /var/lib/teepsi/state/server (the enclave's
#     sealed state), so both outlive the container.
# It opens an interactive shell, like the seed's; inside, run `teepsi-run server` or
# `teepsi-run client --host 127.0.0.1:50051 --name data_provider1 --parties 3`. To run the role
# directly instead, put the command after --, e.g. `... client1 10.0.0.5 teepsi:anolis8 --
# client --host 127.0.0.1:50051 --name data_provider1 --parties 2`.
set -euo pipefail

usage() {
    sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

[[ $# -ge 2 ]] || usage
role=$1
pccs_ip=$2
shift 2
image=teepsi:anolis8
if [[ $# -gt 0 && "$1" != "--" ]]; then
    image=$1
    shift
fi
if [[ $# -gt 0 && "$1" == "--" ]]; then
    shift
fi
command=("$@")

case "$role" in
    server | client1 | client2 | client3) ;;
    *)
        echo "start_container.sh: unknown role '$role' (server, client1, client2 or client3)" >&2
        exit 2
        ;;
esac
if [[ ! "$pccs_ip" =~ ^[0-9]{1,3}(\.[0-9]{1,3}){3}$ ]]; then
    echo "start_container.sh: the PCCS address must be an IPv4 address, got '$pccs_ip'" >&2
    exit 2
fi
pccs_port=${PCCS_PORT:-8081}
use_secure_cert=${USE_SECURE_CERT:-FALSE}

for device in /dev/sgx_enclave /dev/sgx_provision; do
    [[ -e "$device" ]] || echo "start_container.sh: warning: $device is missing on this host (SGX driver?)" >&2
done
[[ -S /var/run/aesmd/aesm.socket ]] ||
    echo "start_container.sh: warning: /var/run/aesmd/aesm.socket is missing (is aesmd running?)" >&2

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
args=(
    --rm
    --name "teepsi-$role"
    --device /dev/sgx_enclave:/dev/sgx_enclave
    --device /dev/sgx_provision:/dev/sgx_provision
    -v /var/run/aesmd:/var/run/aesmd
    --net=host
    --add-host "pccs.service.com:$pccs_ip"
    -e "PCCS_URL=https://$pccs_ip:$pccs_port/sgx/certification/v4/"
    -e "USE_SECURE_CERT=$use_secure_cert"
)
absolute() {
    echo "$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"
}
out_dir=${TEEPSI_OUT:-$PWD/teepsi-out}/$role
if [[ "$role" == server ]]; then
    state_dir=${TEEPSI_OUT:-$PWD/teepsi-out}/server-state
    mkdir -p "$out_dir" "$state_dir"
    chmod 0700 "$out_dir" "$state_dir"
    args+=(
        -v "$(absolute "$out_dir"):/data"
        -v "$(absolute "$state_dir"):/var/lib/teepsi/state/server"
    )
else
    n=${role#client}
    data_file=${TEEPSI_DATA_FILE:-$here/../data/data$n.txt}
    [[ -f "$data_file" ]] || {
        echo "start_container.sh: data file $data_file not found" >&2
        exit 2
    }
    state_dir=${TEEPSI_OUT:-$PWD/teepsi-out}/$role-state
    mkdir -p "$out_dir" "$state_dir"
    chmod 0700 "$out_dir" "$state_dir"
    args+=(
        -v "$(absolute "$out_dir"):/data"
        -v "$(absolute "$state_dir"):/var/lib/teepsi/state/client"
        -v "$(absolute "$data_file"):/data/input:ro"
    )
fi
if [[ ${#command[@]} -eq 0 ]]; then
    args+=(-it)
    command=(shell)
fi

exec docker run "${args[@]}" "$image" "${command[@]}"
