#!/usr/bin/env bash
# Builds sharedconn's container images WITHOUT pulling anything from a registry,
# for machines that have a Debian apt mirror but no Docker Hub:
#
#   1. sharedconn/debian-base:bookworm   minbase bookworm made with debootstrap from
#                                        the machine's apt mirror, `docker import`ed.
#                                        Skipped when the image already exists.
#   2. sharedconn:latest                 the runtime image (the final stage of
#                                        deploy/Dockerfile) on that base, with the
#                                        host-built target/release/{gateway,worker}.
#   3. sharedconn/haproxy:local          HAProxy from Debian's package on that base,
#                                        standing in for the official haproxy image.
#   4. sharedconn/redis:local            Redis from Debian's package on that base,
#                                        standing in for the official redis:7 image.
#   5. deploy/tls/sharedconn.pem         a self-signed certificate for localhost, for
#                                        the optional TLS frontend (deploy/haproxy/tls.cfg,
#                                        deploy/docker-compose.tls.yml). Kept once made.
#
# Then: docker-compose -f docker-compose.yml -f deploy/docker-compose.local.yml up -d --no-build
# (Prometheus, the optional profile `metrics`, has no local image.)
#
# Idempotent: cargo and docker's layer cache make a second run a no-op in seconds.
# Environment:
#   SHAREDCONN_IMAGE          runtime image tag        (default sharedconn:latest)
#   SHAREDCONN_LOCAL_HAPROXY  haproxy image tag        (default sharedconn/haproxy:local)
#   SHAREDCONN_LOCAL_REDIS    redis image tag          (default sharedconn/redis:local)
#   SHAREDCONN_BASE_IMAGE     base image tag           (default sharedconn/debian-base:bookworm)
#   DEBIAN_MIRROR             mirror for debootstrap   (default: from /etc/apt/sources.list*)
#   SHAREDCONN_SKIP_CARGO=1   use target/release/{gateway,worker} as they are
#   SHAREDCONN_BIN_DIR=DIR    use DIR/{gateway,worker} as they are, no cargo (the
#                             compose test passes the binaries it was built with)
#   SHAREDCONN_REBUILD_BASE=1 make the base again even if it exists
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-target}
case "$TARGET_DIR" in /*) ;; *) TARGET_DIR=$ROOT/$TARGET_DIR ;; esac # cargo runs in $ROOT
SUITE=bookworm
BASE_IMAGE=${SHAREDCONN_BASE_IMAGE:-sharedconn/debian-base:${SUITE}}
APP_IMAGE=${SHAREDCONN_IMAGE:-sharedconn:latest}
HAPROXY_IMAGE=${SHAREDCONN_LOCAL_HAPROXY:-sharedconn/haproxy:local}
REDIS_IMAGE=${SHAREDCONN_LOCAL_REDIS:-sharedconn/redis:local}

log() { echo "local-images: $*" >&2; }
die() { log "error: $*"; exit 1; }
elapsed() { echo "$((SECONDS - $1))s"; }

command -v docker >/dev/null || die "docker is not installed"
docker info >/dev/null 2>&1 || die "cannot reach the docker engine (is it running? may this user use it?)"

sudo=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || die "not root and no sudo: debootstrap needs root"
    sudo="sudo"
fi

# Temporary directories, removed on exit (the rootfs with care: see make_base).
cleanup_cmds=()
cleanup() {
    local c
    for c in "${cleanup_cmds[@]}"; do eval "$c"; done
}
trap cleanup EXIT

# One build at a time on this machine (two tests starting together, say).
exec 9>"${TMPDIR:-/tmp}/sharedconn-local-images.lock"
flock -w 1800 9 || die "another local-images.sh held the lock for 30 minutes"

# --- 1. binaries -------------------------------------------------------------
if [ -n "${SHAREDCONN_BIN_DIR:-}" ]; then
    log "SHAREDCONN_BIN_DIR: using the binaries in $SHAREDCONN_BIN_DIR as they are"
elif [ "${SHAREDCONN_SKIP_CARGO:-0}" = 1 ]; then
    log "SHAREDCONN_SKIP_CARGO=1: using the release binaries in $TARGET_DIR as they are"
else
    # Cheap when nothing changed (cargo only checks fingerprints); always run so
    # the images never carry stale binaries.
    log "cargo build --release (gateway, worker)"
    t=$SECONDS
    # Run from a test (`cargo test`, nextest), the environment holds the
    # test package's CARGO_PKG_*, CARGO_MANIFEST_DIR and the like; cargo
    # compares some of them with what the last build saw (env-dep), and
    # a build from the shell and one from a test would each rebuild the
    # binaries. Neither needs them: drop them for this cargo.
    (
        cd "$ROOT"
        for v in $(compgen -e); do
            case "$v" in
                CARGO_PKG_* | CARGO_BIN_EXE_* | CARGO_CRATE_* | CARGO_MANIFEST_* | \
                    CARGO_PRIMARY_PACKAGE | CARGO_TARGET_TMPDIR | OUT_DIR) unset "$v" ;;
            esac
        done
        cargo build --release --bins -p sharedconn-gateway -p sharedconn-worker
    )
    log "binaries ready in $(elapsed $t)"
fi
# The binaries are `gateway` and `worker` in the image whatever cargo names
# them (`sharedconn-gateway` from the package name, or `gateway`): take the newer.
release_bin() {
    local found="" dir=${SHAREDCONN_BIN_DIR:-$TARGET_DIR/release}
    for f in "$dir/$1" "$dir/sharedconn-$1"; do
        if [ -x "$f" ] && { [ -z "$found" ] || [ "$f" -nt "$found" ]; }; then
            found=$f
        fi
    done
    [ -n "$found" ] || die "no $dir/$1 (or sharedconn-$1): build it with cargo build --release"
    echo "$found"
}
GATEWAY_BIN=$(release_bin gateway)
WORKER_BIN=$(release_bin worker)

# --- 2. the Debian base --------------------------------------------------------
# The first "deb" URI of the machine's apt configuration whose path ends in
# /$1: "debian" for Debian itself, "debian-security" for its security updates
# (third-party repositories do not match).
find_mirror() {
    local files=() f
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] && files+=("$f")
    done
    [ ${#files[@]} -gt 0 ] || return 0
    # deb822 "URIs: x" lines and one-line "deb [opts] x suite ..." entries.
    awk '
        /^[[:space:]]*#/ { next }
        /^URIs:/ { for (i = 2; i <= NF; i++) print $i; next }
        $1 == "deb" { for (i = 2; i <= NF; i++) if ($i !~ /^\[/ && $i !~ /\]$/) { print $i; break } }
    ' "${files[@]}" | grep -E "^(https?|file)://.*/$1/?\$" | head -n1 | sed 's:/$::'
}

make_base() {
    local mirror security rootfs t include=()
    mirror=${DEBIAN_MIRROR:-$(find_mirror debian)}
    mirror=${mirror:-http://deb.debian.org/debian}
    security=$(find_mirror debian-security)
    # apt in the image checks an https mirror's certificate.
    case "$mirror" in https://*) include=(--include=ca-certificates) ;; esac
    log "making $BASE_IMAGE with debootstrap from $mirror"
    if ! command -v debootstrap >/dev/null; then
        log "installing debootstrap with apt-get"
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
    fi
    t=$SECONDS
    rootfs=$(mktemp -d "${TMPDIR:-/var/tmp}/sharedconn-rootfs.XXXXXX")
    # debootstrap mounts /proc and friends inside the target; never let rm
    # cross into a mount left behind by a failed run.
    cleanup_cmds+=("$sudo umount -R '$rootfs/proc' '$rootfs/sys' '$rootfs/dev/pts' 2>/dev/null || true; $sudo rm -rf --one-file-system '$rootfs'")
    local out
    if ! out=$($sudo debootstrap --variant=minbase --components=main "${include[@]}" \
        "$SUITE" "$rootfs" "$mirror" 2>&1); then
        echo "$out" | tail -n 40 >&2
        die "debootstrap failed (its log: $rootfs/debootstrap/debootstrap.log)"
    fi

    # What the official debian images do for containers: no service starts
    # during apt-get install, no docs or man pages, no recommends, no apt cache.
    $sudo tee "$rootfs/usr/sbin/policy-rc.d" >/dev/null <<'EOS'
#!/bin/sh
exit 101
EOS
    $sudo chmod 755 "$rootfs/usr/sbin/policy-rc.d"
    $sudo tee "$rootfs/etc/dpkg/dpkg.cfg.d/docker" >/dev/null <<'EOS'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
EOS
    $sudo tee "$rootfs/etc/apt/apt.conf.d/docker" >/dev/null <<'EOS'
APT::Install-Recommends "false";
APT::Install-Suggests "false";
Acquire::Languages "none";
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOS
    {
        echo "deb $mirror $SUITE main"
        echo "deb $mirror $SUITE-updates main"
        if [ -n "$security" ]; then echo "deb $security $SUITE-security main"; fi
    } | $sudo tee "$rootfs/etc/apt/sources.list" >/dev/null
    $sudo rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin \
        "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/usr/share/doc/*/changelog* \
        "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/*
    $sudo tar --numeric-owner --xattrs -C "$rootfs" -c . |
        docker import \
            --change 'ENV LANG=C.UTF-8' \
            --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
            --change 'CMD ["bash"]' \
            --message "debootstrap --variant=minbase $SUITE $mirror" \
            - "$BASE_IMAGE" >/dev/null
    log "base image $BASE_IMAGE ready in $(elapsed $t)"
}

if [ "${SHAREDCONN_REBUILD_BASE:-0}" != 1 ] && docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    log "base image $BASE_IMAGE exists: skipping debootstrap"
else
    make_base
fi

# docker build, its output shown only when it fails (the legacy builder's
# deprecation notice is noise here: BuildKit is not needed). The image the tag
# pointed to before is removed if nothing else uses it, so rebuilding after
# every code change does not pile up dangling images.
quiet_build() {
    local tag=$1 out old new
    shift
    old=$(docker image inspect --format '{{.Id}}' "$tag" 2>/dev/null || true)
    if ! out=$(docker build -t "$tag" "$@" 2>&1); then
        echo "$out" >&2
        die "docker build -t $tag $* failed"
    fi
    new=$(docker image inspect --format '{{.Id}}' "$tag")
    if [ -n "$old" ] && [ "$old" != "$new" ]; then
        # Fails, harmlessly, while a container or another tag still uses it.
        docker rmi "$old" >/dev/null 2>&1 || true
    fi
}

# --- 3. runtime image ----------------------------------------------------------
# A small build context of its own: the repository's target/ is gigabytes and
# .dockerignore'd anyway.
t=$SECONDS
ctx=$(mktemp -d "${TMPDIR:-/tmp}/sharedconn-image.XXXXXX")
cleanup_cmds+=("rm -rf '$ctx'")
cp "$GATEWAY_BIN" "$ctx/gateway"
cp "$WORKER_BIN" "$ctx/worker"
cp "$ROOT/deploy/healthcheck.sh" "$ROOT/deploy/local/runtime.Dockerfile" "$ctx/"
quiet_build "$APP_IMAGE" --build-arg "BASE=$BASE_IMAGE" -f "$ctx/runtime.Dockerfile" "$ctx"
log "runtime image $APP_IMAGE ready in $(elapsed $t)"

# --- 4. TLS certificate -------------------------------------------------------------
# Self-signed, for localhost and 127.0.0.1, chain and key in one PEM as HAProxy
# wants it. Made once; replace the file with a real certificate to use one.
# World-readable: HAProxy reads it as its own user inside the container, and
# this key protects nothing but a local try.
# Optional: without openssl the images are built all the same, with no certificate.
TLS_PEM=$ROOT/deploy/tls/sharedconn.pem
if [ ! -s "$TLS_PEM" ] && ! command -v openssl >/dev/null; then
    log "no openssl: no self-signed certificate for deploy/haproxy/tls.cfg (optional)"
elif [ ! -s "$TLS_PEM" ]; then
    mkdir -p "$(dirname "$TLS_PEM")"
    tls_tmp=$(mktemp -d "${TMPDIR:-/tmp}/sharedconn-tls.XXXXXX")
    cleanup_cmds+=("rm -rf '$tls_tmp'")
    openssl req -x509 -newkey rsa:2048 -nodes -days 825 -subj "/CN=localhost" \
        -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
        -keyout "$tls_tmp/key.pem" -out "$tls_tmp/cert.pem" 2>/dev/null \
        || die "openssl could not make the self-signed certificate"
    cat "$tls_tmp/cert.pem" "$tls_tmp/key.pem" >"$TLS_PEM"
    chmod 644 "$TLS_PEM"
    log "self-signed certificate for localhost in $TLS_PEM"
fi

# --- 5. haproxy image ------------------------------------------------------------
t=$SECONDS
quiet_build "$HAPROXY_IMAGE" --build-arg "BASE=$BASE_IMAGE" \
    -f "$ROOT/deploy/local/haproxy.Dockerfile" "$ROOT/deploy/local"
# The config must parse with this HAProxy (Debian's 2.6), not only with the
# official image's: alone, and with the TLS frontend and its certificate.
docker run --rm -v "$ROOT/deploy/haproxy/haproxy.cfg:/usr/local/etc/haproxy/haproxy.cfg:ro" \
    "$HAPROXY_IMAGE" haproxy -c -q -f /usr/local/etc/haproxy/haproxy.cfg \
    || die "deploy/haproxy/haproxy.cfg does not parse with $HAPROXY_IMAGE"
if [ -s "$TLS_PEM" ]; then
    docker run --rm -v "$ROOT/deploy/haproxy/haproxy.cfg:/usr/local/etc/haproxy/haproxy.cfg:ro" \
        -v "$ROOT/deploy/haproxy/tls.cfg:/usr/local/etc/haproxy/tls.cfg:ro" \
        -v "$ROOT/deploy/tls:/usr/local/etc/haproxy/certs:ro" \
        "$HAPROXY_IMAGE" haproxy -c -q -f /usr/local/etc/haproxy/haproxy.cfg -f /usr/local/etc/haproxy/tls.cfg \
        || die "deploy/haproxy/tls.cfg does not parse with $HAPROXY_IMAGE"
fi
log "haproxy image $HAPROXY_IMAGE ready in $(elapsed $t) ($(docker run --rm "$HAPROXY_IMAGE" haproxy -v | sed -n 1p))"

# --- 6. redis image --------------------------------------------------------------
# Layer cache: after the first build, a rerun only checks the base's id.
t=$SECONDS
quiet_build "$REDIS_IMAGE" --build-arg "BASE=$BASE_IMAGE" \
    -f "$ROOT/deploy/local/redis.Dockerfile" "$ROOT/deploy/local"
log "redis image $REDIS_IMAGE ready in $(elapsed $t) ($(docker run --rm "$REDIS_IMAGE" redis-server --version | cut -d' ' -f1-3))"
log "done: $APP_IMAGE, $HAPROXY_IMAGE, $REDIS_IMAGE (base $BASE_IMAGE)"
