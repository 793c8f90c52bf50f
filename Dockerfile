# costserve: gRPC inference service with the default digits model baked in.
#
#   docker build -t costserve .
#   docker run --rm -p 50051:50051 -p 8000:8000 costserve
#
# Two stages: `build` installs the package and its dependencies into a
# virtualenv; the runtime stage copies only that virtualenv (no source tree, no
# build leftovers), then trains the default model as the non-root user.

FROM python:3.11-slim AS build

ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
COPY pyproject.toml README.md ./
COPY protos/ protos/
COPY client/ client/
COPY server/ server/
# A regular (non-editable) install with the server's extra (the package alone
# is the client): everything lands in /opt/venv, so /src is not needed at
# runtime. Versions are constrained by pyproject.toml. ("./[server]", not
# ".[server]": hadolint takes only the former for a local path.)
RUN pip install --no-cache-dir "./[server]"


FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH \
    COSTSERVE_HOST=0.0.0.0 \
    COSTSERVE_MODEL_REPOSITORY=/models \
    GRPC_VERBOSITY=ERROR

# Fixed UID/GID so volume permissions are predictable; --no-log-init avoids a
# huge sparse /var/log/faillog for a high UID (hadolint DL3046).
RUN groupadd --system --gid 10001 costserve \
    && useradd --system --no-log-init --uid 10001 --gid costserve \
        --create-home --home-dir /home/costserve costserve \
    && mkdir -p /models \
    && chown costserve:costserve /models

# The virtualenv stays root-owned: the service user can run it but not modify it.
COPY --from=build /opt/venv /opt/venv

# Numeric, so the runtime (e.g. Kubernetes runAsNonRoot) can tell it is not root.
USER 10001:10001
WORKDIR /home/costserve

# Bake in the default model (scikit-learn's bundled digits; no network needed).
# Running it here, as the service user, also smoke-tests the runtime image.
RUN costserve-server train --model-dir /models/digits

# gRPC API, Prometheus metrics.
EXPOSE 50051 8000

# Health is NOT_SERVING until the model is loaded and warmed (~10 s after the
# ~5 s TensorFlow import), hence the start period. Run through sh so that an
# overridden COSTSERVE_PORT is followed; with the defaults this is
# `costserve health --target 127.0.0.1:50051`. `|| exit 1` maps any failure to
# Docker's "unhealthy" (exit code 2 is reserved).
HEALTHCHECK --interval=15s --timeout=5s --start-period=45s --retries=3 \
    CMD ["sh", "-c", "costserve health --target 127.0.0.1:${COSTSERVE_PORT:-50051} || exit 1"]

ENTRYPOINT ["costserve-server"]
CMD ["serve"]
