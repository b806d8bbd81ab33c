#!/bin/bash
# Container health check for the sharedconn image, in plain bash: the slim
# Debian base has no curl or wget, and one more package is not worth it.
#
#   sharedconn-healthcheck           checks whichever of gateway / worker runs here
#   sharedconn-healthcheck gateway   GET /healthz must answer 200, which the gateway
#                                    only does while it is linked to a worker
#   sharedconn-healthcheck worker    the gRPC port must accept a TCP connection and,
#                                    when the worker serves metrics
#                                    (SHAREDCONN_METRICS_LISTEN), GET /healthz there
#                                    must answer 200, which it does only while the
#                                    worker's backplane (Redis) is healthy
#
# Ports come from the same variables the binaries read (SHAREDCONN_LISTEN,
# SHAREDCONN_WORKER_LISTEN, SHAREDCONN_METRICS_LISTEN). Every step is bounded,
# so a hung process makes the check fail instead of hang (docker's own
# --timeout is the outer bound).
set -euo pipefail

port_of() {
    # "0.0.0.0:8080", "[::]:8080" -> "8080"
    echo "${1##*:}"
}

# The status code of GET /healthz on 127.0.0.1:$1, or nothing.
healthz_status() {
    local status=""
    exec 3<>"/dev/tcp/127.0.0.1/$1" || return 0
    printf 'GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n' >&3
    IFS=' ' read -r -t 3 _ status _ <&3 || true
    exec 3<&-
    echo "$status"
}

check_gateway() {
    local status
    status=$(healthz_status "$(port_of "${SHAREDCONN_LISTEN:-127.0.0.1:8080}")")
    if [ "${status:-}" != 200 ]; then
        echo "gateway: /healthz answered ${status:-nothing} (not linked to a worker?)"
        exit 1
    fi
    echo "gateway: ok"
}

check_worker() {
    local port
    port=$(port_of "${SHAREDCONN_WORKER_LISTEN:-127.0.0.1:50051}")
    if ! exec 3<>"/dev/tcp/127.0.0.1/${port}"; then
        echo "worker: nothing listening on port ${port}"
        exit 1
    fi
    exec 3<&-
    # SHAREDCONN_METRICS_LISTEN set on a worker binary that has no
    # --metrics-listen yet (the flag is newer than this script) is ignored by
    # the worker, so it is here too: the gRPC port is all there is to check.
    local help status
    help=$(worker --help 2>/dev/null || true)
    if [ -n "${SHAREDCONN_METRICS_LISTEN:-}" ] && [[ $help == *--metrics-listen* ]]; then
        status=$(healthz_status "$(port_of "$SHAREDCONN_METRICS_LISTEN")")
        if [ "${status:-}" != 200 ]; then
            echo "worker: /healthz answered ${status:-nothing} (backplane unhealthy?)"
            exit 1
        fi
    fi
    echo "worker: ok"
}

# Which binary runs in this container: look for it among the processes (it is
# PID 1, or the child of docker's init with `init: true`).
detect() {
    local comm
    for comm in /proc/[0-9]*/comm; do
        case "$(cat "$comm" 2>/dev/null)" in
            gateway) echo gateway; return ;;
            worker) echo worker; return ;;
        esac
    done
    echo none
}

role=${1:-$(detect)}
case "$role" in
    gateway) check_gateway ;;
    worker) check_worker ;;
    *)
        echo "neither gateway nor worker is running here"
        exit 1
        ;;
esac
