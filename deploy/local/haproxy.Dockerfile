# HAProxy from Debian's package, on the debootstrap base: a stand-in for the
# official `haproxy` image on a machine that cannot pull it (deploy/local-images.sh).
# It behaves like the official image where docker-compose.yml relies on it:
# config at /usr/local/etc/haproxy/haproxy.cfg, runs as user haproxy, logs to
# stdout, soft-stops on SIGUSR1, bash available for the health check.
ARG BASE=sharedconn/debian-base:bookworm
FROM ${BASE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends haproxy \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /usr/local/etc/haproxy /var/lib/haproxy \
 && chown haproxy:haproxy /var/lib/haproxy
USER haproxy
WORKDIR /var/lib/haproxy
STOPSIGNAL SIGUSR1
# -W: master-worker, -db: stay in the foreground (the official image adds both).
CMD ["haproxy", "-W", "-db", "-f", "/usr/local/etc/haproxy/haproxy.cfg"]
