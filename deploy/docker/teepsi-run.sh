#!/usr/bin/env bash
# Entry point of the teepsi SGX images (installed as /usr/local/bin/teepsi-run).
#
#   teepsi-run server [--max-jobs N] [--max-parties N] [--max-items N] [--job-timeout S]
#                     [--memory-budget SIZE] [--max-workers N]
#                                     write /data/run.toml (the limits), then run the server
#                                     enclave; its audit log is /data/audit/audit.log
#   teepsi-run client --host HOST:PORT --name NAME --parties N [--job ID] [--timeout S]
#                     [--format text|csv|parquet] [--key COLUMN]... [--delimiter C]
#                     [--quote C|none] [--normalize SPEC] [--contract]
#                                     write /data/run.toml, then run the data-provider enclave
#                                     on /data/input; the result goes to /data/output, the
#                                     receipt to /data/receipt/; --contract: join under the job
#                                     spec /data/spec.toml with the key /data/party.key (0600),
#                                     which then fix the name, party count and job
#   teepsi-run keygen                 make this party's key at /data/party.key (outside the
#                                     enclave) and print the public key line for the spec
#   teepsi-run measurements           print MRENCLAVE/MRSIGNER/ISV values and both policies
#   teepsi-run shell                  an interactive shell (the default command)
#   teepsi-run COMMAND [ARGS...]      run any other command
#
# Before any of these, when PCCS_URL is set, /etc/sgx_default_qcnl.conf is written from
# PCCS_URL and USE_SECURE_CERT (default FALSE). This script runs OUTSIDE the enclaves: it only
# prepares files the enclaves are allowed to read, and everything it writes is untrusted input
# to them. The enclaves' command lines and policies are fixed in their signed manifests.
set -euo pipefail

ENCLAVE_DIR=${TEEPSI_ENCLAVE_DIR:-/opt/teepsi/enclave}
DATA_DIR=${TEEPSI_DATA_DIR:-/data}
QCNL_CONF=${TEEPSI_QCNL_CONF:-/etc/sgx_default_qcnl.conf}
SGX_DEVICE=${TEEPSI_SGX_DEVICE:-/dev/sgx_enclave}
TEEPSI=${TEEPSI_BIN:-/opt/teepsi/venv/bin/teepsi}
AESM_SOCKET=${TEEPSI_AESM_SOCKET:-/var/run/aesmd/aesm.socket}

die() {
    echo "teepsi-run: error: $*" >&2
    exit 2
}

usage() {
    sed -n '3,21p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

write_qcnl_conf() {
    [[ -n "${PCCS_URL:-}" ]] || return 0
    [[ "$PCCS_URL" =~ ^https?://[^[:space:]]+$ ]] || die "PCCS_URL must be an http(s) URL, got '$PCCS_URL'"
    local secure=${USE_SECURE_CERT:-FALSE}
    case "${secure^^}" in
        TRUE | FALSE) ;;
        *) die "USE_SECURE_CERT must be TRUE or FALSE, got '$secure'" ;;
    esac
    printf '# Written by teepsi-run from PCCS_URL and USE_SECURE_CERT.\nPCCS_URL=%s\nUSE_SECURE_CERT=%s\n' \
        "$PCCS_URL" "${secure^^}" >"$QCNL_CONF"
}

run_enclave() {
    local name=$1
    [[ -e "$SGX_DEVICE" ]] || die "$SGX_DEVICE is missing: start the container with --device=/dev/sgx_enclave"
    [[ -S "$AESM_SOCKET" ]] || echo "teepsi-run: warning: $AESM_SOCKET is missing: mount the host's /var/run/aesmd, or no quote can be made" >&2
    cd "$ENCLAVE_DIR"
    exec gramine-sgx "$name"
}

# Control characters never reach run.toml (a tab only as a CSV delimiter).
check_no_control() {
    local flag=$1 value=$2
    [[ "$flag" != --delimiter ]] || value=${value//$'\t'/}
    [[ "$value" != *[[:cntrl:]]* ]] || die "$flag: control characters are not allowed"
}

# A TOML basic string; check_no_control has run on the value.
toml_str() {
    local value=$1
    value=${value//\\/\\\\}
    value=${value//\"/\\\"}
    value=${value//$'\t'/\\t}
    printf '"%s"' "$value"
}

check_text() {
    local flag=$1 value=$2 pattern=$3
    [[ "$value" =~ $pattern ]] || die "$flag: invalid value '$value'"
}

client() {
    local host="" name="" parties="" job="" timeout="" format="" delimiter="" quote="" normalize=""
    local contract="" key
    local -a keys=()
    while (($#)); do
        case "$1" in
            --host | --name | --parties | --job | --timeout | --format | --key | --delimiter | --quote | --normalize)
                (($# >= 2)) || die "$1 needs a value"
                case "$1" in
                    --host) host=$2 ;;
                    --name) name=$2 ;;
                    --parties) parties=$2 ;;
                    --job) job=$2 ;;
                    --timeout) timeout=$2 ;;
                    --format) format=$2 ;;
                    --key) keys+=("$2") ;;
                    --delimiter) delimiter=$2 ;;
                    --quote) quote=$2 ;;
                    --normalize) normalize=$2 ;;
                esac
                shift 2
                ;;
            --contract)
                contract=yes
                shift
                ;;
            -h | --help) usage ;;
            *) die "unknown argument '$1' (the policy, data and output paths are fixed in the enclave)" ;;
        esac
    done
    [[ -n "$host" ]] || die "client needs --host"
    [[ -n "$contract" || (-n "$name" && -n "$parties") ]] ||
        die "client needs --name and --parties (or --contract: the job spec lists the parties)"
    check_text --host "$host" '^[A-Za-z0-9._:-]+$|^\[[0-9A-Fa-f:.]+\]:[0-9]+$'
    [[ -z "$name" ]] || check_text --name "$name" '^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$'
    [[ -z "$parties" ]] || check_text --parties "$parties" '^[0-9]{1,5}$'
    [[ -z "$job" ]] || check_text --job "$job" '^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$'
    [[ -z "$timeout" ]] || check_text --timeout "$timeout" '^[0-9]{1,7}(\.[0-9]{1,3})?$'
    [[ -z "$format" ]] || check_text --format "$format" '^(text|csv|parquet)$'
    [[ -z "$normalize" ]] || check_text --normalize "$normalize" '^[a-z,]{1,64}$'
    check_no_control --delimiter "$delimiter"
    check_no_control --quote "$quote"
    for key in "${keys[@]}"; do
        check_no_control --key "$key"
    done
    [[ -f "$DATA_DIR/input" ]] || die "$DATA_DIR/input is missing: mount the data provider's set there"
    if [[ -n "$contract" ]]; then
        [[ -f "$DATA_DIR/spec.toml" ]] || die "--contract: $DATA_DIR/spec.toml is missing: put the agreed job spec there"
        [[ -f "$DATA_DIR/party.key" ]] || die "--contract: $DATA_DIR/party.key is missing: put this party's private key there (teepsi keygen)"
        [[ -z "$(find "$DATA_DIR/party.key" -perm /077)" ]] ||
            die "--contract: $DATA_DIR/party.key is readable by others: chmod 600 it"
    fi
    [[ -d "$DATA_DIR/receipt" ]] || mkdir -m 0700 "$DATA_DIR/receipt"

    local toml
    toml="# Written by teepsi-run; read by the data-provider enclave (--run-config)."$'\n'
    toml+="host = $(toml_str "$host")"$'\n'
    [[ -z "$name" ]] || toml+="name = $(toml_str "$name")"$'\n'
    [[ -z "$parties" ]] || toml+="parties = $((10#$parties))"$'\n'
    [[ -z "$job" ]] || toml+="job = $(toml_str "$job")"$'\n'
    [[ -z "$timeout" ]] || toml+="timeout = $timeout"$'\n'
    [[ -z "$format" ]] || toml+="format = $(toml_str "$format")"$'\n'
    if ((${#keys[@]})); then
        toml+="key = ["
        for key in "${keys[@]}"; do
            toml+="$(toml_str "$key"), "
        done
        toml="${toml%, }]"$'\n'
    fi
    [[ -z "$delimiter" ]] || toml+="delimiter = $(toml_str "$delimiter")"$'\n'
    [[ -z "$quote" ]] || toml+="quote = $(toml_str "$quote")"$'\n'
    [[ -z "$normalize" ]] || toml+="normalize = $(toml_str "$normalize")"$'\n'
    # Paths as the enclave sees them: its manifest allows exactly these.
    [[ -z "$contract" ]] || toml+='spec = "/data/spec.toml"'$'\n''key_file = "/data/party.key"'$'\n'
    printf '%s' "$toml" >"$DATA_DIR/run.toml"
    run_enclave teepsi-client
}

server() {
    local toml value
    toml="# Written by teepsi-run; read by the server enclave (--run-config)."$'\n'
    while (($#)); do
        case "$1" in
            --max-jobs | --max-parties | --max-items | --max-workers)
                (($# >= 2)) || die "$1 needs a value"
                check_text "$1" "$2" '^[0-9]{1,12}$'
                value=${1#--}
                toml+="${value//-/_} = $((10#$2))"$'\n'
                ;;
            --job-timeout)
                (($# >= 2)) || die "$1 needs a value"
                check_text "$1" "$2" '^[0-9]{1,7}(\.[0-9]{1,3})?$'
                toml+="job_timeout = $2"$'\n'
                ;;
            --memory-budget)
                (($# >= 2)) || die "$1 needs a value"
                check_text "$1" "$2" '^[0-9]{1,12}(\.[0-9]{1,3})?([KkMmGg]([Ii]?[Bb])?)?$'
                toml+="memory_budget = $(toml_str "$2")"$'\n'
                ;;
            -h | --help) usage ;;
            *) die "unknown argument '$1' (what the server trusts is fixed in the enclave; it takes only limits)" ;;
        esac
        shift 2
    done
    [[ -d "$DATA_DIR/audit" ]] || mkdir -m 0700 "$DATA_DIR/audit"
    printf '%s' "$toml" >"$DATA_DIR/run.toml"
    run_enclave teepsi-server
}

measurements() {
    local role
    for role in server client; do
        echo "== teepsi-$role enclave (gramine-sgx-sigstruct-view)"
        cat "$ENCLAVE_DIR/teepsi-$role.sigstruct.json"
        echo
        echo "== policy measured into the teepsi-$role enclave"
        cat "$ENCLAVE_DIR/$role/dynamic_config.json"
    done
}

main() {
    write_qcnl_conf
    local command=${1:-shell}
    (($# == 0)) || shift
    case "$command" in
        server) server "$@" ;;
        client) client "$@" ;;
        keygen)
            (($# == 0)) || die "keygen takes no arguments: the key goes to $DATA_DIR/party.key"
            exec "$TEEPSI" keygen --out "$DATA_DIR/party.key"
            ;;
        measurements) measurements ;;
        shell) exec bash ;;
        -h | --help | help) usage ;;
        *) exec "$command" "$@" ;;
    esac
}

main "$@"
