# syntax=docker/dockerfile:1
#
# One image for both entry points: `fusepath-csi` (the CSI driver) and `fusefs`
# (the FUSE daemon). Build it with `make image` or `docker build -t fusepath .`.
#
# The install steps are scripts/install.sh, the same script `make test` and the
# local install run, so CI exercises what this image is built with.
#
# The base is pinned by tag. For reproducible production builds, pin it by digest
# as well: docker buildx imagetools inspect python:3.11.14-slim-bookworm, then
#   docker build --build-arg PYTHON_IMAGE=python:3.11.14-slim-bookworm@sha256:<digest> .
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# --- builder: a virtualenv with fusepath and its Python dependencies ----------
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY scripts/install.sh scripts/
COPY csi_driver/ csi_driver/
COPY fusefs/ fusefs/
RUN scripts/install.sh venv /opt/venv \
 && /opt/venv/bin/python -m pip uninstall -q -y pip setuptools

# --- final: runtime packages only (fuse3, util-linux, tar, zstd) -------------
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="fusepath" \
      org.opencontainers.image.description="Kubernetes CSI driver serving node-local volumes through a FUSE filesystem" \
      org.opencontainers.image.source="https://github.com/fusepath/fusepath" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY scripts/install.sh /usr/local/lib/fusepath/install.sh
RUN /usr/local/lib/fusepath/install.sh system \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# Both entry points must start here, where libfuse3 is installed.
RUN fusepath-csi --help >/dev/null && fusefs --help >/dev/null
# Root is needed only in the node DaemonSet (mount(2), /dev/fuse, loop devices);
# the controller Deployment overrides it with runAsUser 65532.
USER 0
ENTRYPOINT ["fusepath-csi"]
