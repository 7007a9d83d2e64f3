# syntax=docker/dockerfile:1
#
# apiproxy container image: one image for `apiproxy serve` and `apiproxy federate`.
#
#   docker build -t apiproxy:0.1.0 .
#   docker run --rm apiproxy:0.1.0 serve --help
#
# Base image: an exact Python patch release on Debian bookworm, the same in both stages (the venv's
# interpreter is a symlink to the base image's /usr/local/bin/python3.11; tests/deploy checks they
# match). It is pinned by exact tag, not by digest, because the digest cannot be looked up on the
# offline machines this file is written and tested on. Release builds should append the digest
# (`python:3.11.13-slim-bookworm@sha256:<digest>`) in both FROM lines, or let a dependency bot do it.

# ---------------------------------------------------------------------------------------------
# build: install the pinned, hash-checked dependencies and the apiproxy wheel into /opt/apiproxy
# ---------------------------------------------------------------------------------------------
FROM python:3.11.13-slim-bookworm AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_INPUT=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src

# Build backend (setuptools, wheel), hash-pinned, in a throwaway venv of the build stage only.
COPY requirements/build.txt requirements/runtime.txt /src/requirements/
RUN python -m venv /opt/build \
 && /opt/build/bin/pip install --require-hashes --no-deps --only-binary=:all: \
        -r /src/requirements/build.txt

# Runtime venv without pip or setuptools: nothing in the final image can install code.
# Every runtime dependency is a wheel whose sha256 is in requirements/runtime.txt.
RUN python -m venv --without-pip /opt/apiproxy \
 && /opt/build/bin/pip --python /opt/apiproxy/bin/python install \
        --require-hashes --no-deps --only-binary=:all: -r /src/requirements/runtime.txt

# The project itself, built offline with the pinned backend (no build isolation = no unpinned
# downloads), then installed without dependencies (they are all above, hash-checked).
COPY pyproject.toml README.md /src/
COPY apiproxy /src/apiproxy
RUN /opt/build/bin/pip wheel --no-deps --no-build-isolation --wheel-dir /src/dist /src \
 && /opt/build/bin/pip --python /opt/apiproxy/bin/python install --no-deps /src/dist/apiproxy-*.whl \
 && /opt/apiproxy/bin/python -m compileall -q -j 0 --invalidation-mode checked-hash /opt/apiproxy

# ---------------------------------------------------------------------------------------------
# runtime
# ---------------------------------------------------------------------------------------------
FROM python:3.11.13-slim-bookworm AS runtime

LABEL org.opencontainers.image.title="apiproxy" \
      org.opencontainers.image.description="Narrow, audited, read-only door into kube-apiserver for peer istiods; federation controller" \
      org.opencontainers.image.licenses="Apache-2.0"

# The root filesystem is read-only at run time: never try to write .pyc files, log unbuffered to
# stdout/stderr. The standard library's bytecode is compiled here, at build time, because the
# official Python images ship without .pyc files.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/apiproxy/bin:/usr/local/bin:/usr/bin:/bin
RUN python -m compileall -q -j 0 --invalidation-mode checked-hash /usr/local/lib/python3.11

COPY --from=build /opt/apiproxy /opt/apiproxy

# Numeric non-root user and group (the "nonroot" id of distroless images); no passwd entry is
# needed, and Kubernetes' runAsNonRoot can verify a numeric USER. Nothing at run time needs a shell:
# probes are HTTP, the entrypoint is the console script.
USER 65532:65532
WORKDIR /tmp

# 4443 api-proxy (TLS), 9090 api-proxy metrics/health, 8443 metadata exporter, 9091 federation metrics
EXPOSE 4443 9090 8443 9091

# Health is checked by the Kubernetes probes on the metrics ports (/healthz, /readyz); which port
# depends on the subcommand, so the image carries no HEALTHCHECK of its own.
# checkov:skip=CKV_DOCKER_2: probes are defined per subcommand in deploy/ (serve: 9090, federate: 9091)
ENTRYPOINT ["apiproxy"]
CMD ["--help"]
