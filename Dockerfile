# syntax=docker/dockerfile:1
#
# evssm inference server. See docs/deployment.md.
#
#   docker build -t evssm .                                          # CPU (default)
#   docker build -t evssm:cuda12 --build-arg JAX_VARIANT=cuda12 .    # NVIDIA GPU hosts (CUDA 12)
#   docker run --rm -p 8000:8000 -e EVSSM_MODEL=NAME evssm
#
# The entry point is `evssm serve`; every server option is read from its EVSSM_* variable
# (EVSSM_PORT, EVSSM_MODEL, ...), and arguments after the image name are passed to `evssm serve`.

ARG PYTHON_VERSION=3.11
ARG DEBIAN_RELEASE=bookworm

# ---------------------------------------------------------------------------------------------
# build: a virtual environment in /opt/evssm with the server's dependencies (the `server` extra:
# no trainer, data-set or plotting libraries) and the package.
# ---------------------------------------------------------------------------------------------
FROM python:${PYTHON_VERSION}-slim-${DEBIAN_RELEASE} AS build

# cpu (default), cuda12 or cuda13: which jaxlib back end goes into the image.
ARG JAX_VARIANT=cpu

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/evssm
ENV PATH=/opt/evssm/bin:$PATH
WORKDIR /src

# Dependencies first, in their own layer: editing the source does not reinstall JAX.
COPY pyproject.toml deploy/docker/requirements.py ./
RUN --mount=type=cache,target=/root/.cache/pip \
    python requirements.py pyproject.toml server > requirements.txt \
 && pip install -r requirements.txt \
 && case "$JAX_VARIANT" in \
      cpu) ;; \
      cuda12|cuda13) \
        pip install "jax[$JAX_VARIANT]==$(python -c 'import jax; print(jax.__version__)')" ;; \
      *) echo "JAX_VARIANT must be cpu, cuda12 or cuda13, not '$JAX_VARIANT'" >&2; exit 1 ;; \
    esac

# The native CPU streaming step is compiled here, for NATIVE_ARCH (a -march value; x86-64-v3 is
# AVX2 + FMA), and shipped in /opt/evssm/native: the runtime image has no compiler. Where it does
# not build (another architecture), the server falls back to XLA's step and says so in its log.
ARG NATIVE_ARCH=x86-64-v3
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends g++ >/dev/null \
 && rm -rf /var/lib/apt/lists/*

# Then the package (the .dockerignore lets only the package sources through). The checks run
# outside /src so that they import the installed package. pip and setuptools leave the venv last:
# the runtime installs nothing.
COPY . .
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --no-deps . \
 && cd / \
 && evssm --version \
 && python -c "import evssm.server.app" \
 && { [ "$JAX_VARIANT" != cpu ] \
      || EVSSM_CACHE_DIR=/opt/evssm/native EVSSM_NATIVE_ARCH=$NATIVE_ARCH \
         python -c "from evssm.models.native import build_library; print(build_library())" \
      || echo "native streaming step not prebuilt: the server will use XLA's"; } \
 && pip uninstall --yes --quiet pip setuptools wheel

# ---------------------------------------------------------------------------------------------
# runtime: slim Python, the virtual environment, an unprivileged user. No compilers, no sources.
# ---------------------------------------------------------------------------------------------
FROM python:${PYTHON_VERSION}-slim-${DEBIAN_RELEASE} AS runtime

ARG JAX_VARIANT=cpu
ARG NATIVE_ARCH=x86-64-v3
LABEL org.opencontainers.image.title="evssm" \
      org.opencontainers.image.description="Online inference server for event-based state-space models" \
      org.opencontainers.image.licenses="MIT" \
      io.evssm.jax-variant="${JAX_VARIANT}"

RUN groupadd --system --gid 10001 evssm \
 && useradd --system --uid 10001 --gid evssm --create-home --home-dir /home/evssm \
            --shell /usr/sbin/nologin evssm \
 && install -d -o evssm -g evssm /home/evssm/.cache/evssm/xla /home/evssm/state

COPY --from=build /opt/evssm /opt/evssm
COPY deploy/docker/healthcheck.py /usr/local/bin/evssm-healthcheck

# The server listens on all interfaces inside the container; publish the port to choose who
# reaches it. Compiled XLA programs are cached under /home/evssm/.cache/evssm/xla (every one, however
# quick to compile): mount a volume there and restarts and further replicas skip most of the
# start-up compilation.
ENV PATH=/opt/evssm/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    XDG_CACHE_HOME=/home/evssm/.cache \
    EVSSM_HOST=0.0.0.0 \
    EVSSM_PORT=8000 \
    EVSSM_COMPILATION_CACHE=/home/evssm/.cache/evssm/xla \
    EVSSM_CACHE_DIR=/opt/evssm/native \
    EVSSM_NATIVE_ARCH=${NATIVE_ARCH} \
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0

USER 10001:10001
WORKDIR /home/evssm
EXPOSE 8000

# Liveness: /healthz answers as soon as the process serves, also while models compile (readiness,
# GET /readyz, is what the load balancer checks), and while --max-connections are open (both
# probes are exempt from it). start-period covers importing JAX.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "/usr/local/bin/evssm-healthcheck"]

ENTRYPOINT ["evssm", "serve"]
CMD []
