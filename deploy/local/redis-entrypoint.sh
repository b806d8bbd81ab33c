#!/bin/sh
# Entry point of the local Redis image (redis.Dockerfile), doing what the
# official image's does for docker-compose.yml's `redis-server ARGS`:
#
# - `--flag ...` alone means `redis-server --flag ...`;
# - protected mode off. Without a config file or a password, Redis otherwise
#   refuses every client that is not on loopback, i.e. every other container.
#   The official image compiles it off; here it goes on the command line
#   before the caller's options (after a config file, which must come
#   first), so an explicit `--protected-mode yes` still wins. The port is
#   only on the compose network, never published on the host.
set -e
case "${1:-}" in
    -*) set -- redis-server "$@" ;;
esac
if [ "${1:-}" = redis-server ]; then
    shift
    case "${1:-}" in
        -v | --version | -h | --help | --test-memory | --check-system)
            set -- redis-server "$@" ;;
        "" | -*)
            set -- redis-server --protected-mode no "$@" ;;
        *)
            conf=$1
            shift
            set -- redis-server "$conf" --protected-mode no "$@" ;;
    esac
fi
exec "$@"
