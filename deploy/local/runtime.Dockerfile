# The sharedconn runtime image, built from host-built binaries on a base made
# by debootstrap: what deploy/local-images.sh uses on a machine that cannot
# pull images. Mirrors the final stage of deploy/Dockerfile: keep them in sync.
# Build context: a directory holding gateway, worker and healthcheck.sh.
ARG BASE=sharedconn/debian-base:bookworm
FROM ${BASE}
RUN groupadd --system --gid 10001 sharedconn \
 && useradd --system --uid 10001 --gid sharedconn --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin sharedconn \
 && mkdir /data \
 && chown sharedconn:sharedconn /data
COPY gateway worker /usr/local/bin/
COPY healthcheck.sh /usr/local/bin/sharedconn-healthcheck
ENV SHAREDCONN_LISTEN=0.0.0.0:8080 \
    SHAREDCONN_WORKER_LISTEN=0.0.0.0:50051 \
    SHAREDCONN_DATA_DIR=/data \
    RUST_LOG=info \
    NO_COLOR=1
USER sharedconn:sharedconn
WORKDIR /data
EXPOSE 8080 50051
HEALTHCHECK --interval=5s --timeout=3s --start-period=10s --retries=3 \
    CMD ["sharedconn-healthcheck"]
STOPSIGNAL SIGTERM
CMD ["gateway"]
