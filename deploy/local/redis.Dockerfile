# Redis from Debian's package (7.0), on the debootstrap base: a stand-in for
# the official `redis:7` image on a machine that cannot pull it
# (deploy/local-images.sh). It behaves like the official image where
# docker-compose.yml relies on it: `redis-server ARGS` as the command, data in
# /data (the named volume), runs as user redis, logs to stdout, redis-cli for
# the health check, and protected mode off (see redis-entrypoint.sh).
ARG BASE=sharedconn/debian-base:bookworm
FROM ${BASE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends redis-server \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /data \
 && chown redis:redis /data
COPY redis-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
USER redis
WORKDIR /data
EXPOSE 6379
# Redis saves and exits on SIGTERM.
STOPSIGNAL SIGTERM
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["redis-server"]
