#!/bin/bash
# Container health check for the sharedconn image, in plain bash: the slim
# Debian base has no curl or wget, and one more package is not worth it.
#
#   sharedconn-healthcheck           checks whichever of gateway / worker runs here
#   sharedconn-healthcheck gateway   GET /healthz must answer 200, which the gateway
#                                    only does while it is linked to a worker
#   sharedconn-healthcheck worker    the gRPC port must accept a TCP connection
#
# Ports come from the same variables the binaries read (SHAREDCONN_LISTEN,
# SHAREDCONN_WORKER_LISTEN). Every step is bounded, so a hung process makes the
# check fail instead of hang (docker's own --timeout is the outer bound).
set -euo pipefail

port_of() {
    # "0.0.0.0:8080", "[::]:8080" -> "8080"
    echo "${1##*:}"
}

check_gateway() {
    local port status
    port=$(port_of "${SHAREDCONN_LISTEN:-127.0.0.1:8080}")
    exec 3<>"/dev/tcp/127.0.0.1/${port}"
    printf 'GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n' >&3
    IFS=' ' read -r -t 3 _ status _ <&3 || true
    exec 3<&-
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
