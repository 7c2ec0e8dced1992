# zk0: one image for both daemons, `zk0-hub` (server) and `zk0-agent` (robot workstation).
#
#   docker build -t zk0 .
#   docker run --init --rm zk0 zk0-hub --help
#
# Dependencies are the project's pins: every direct one in pyproject.toml, the whole resolved
# tree in constraints.txt. torch is the registry's CUDA build: the same image runs on the CPU
# or, with `--gpus all`, on an NVIDIA GPU. HF_HUB_OFFLINE is left to the user (see README,
# "Install as services").
FROM python:3.12-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MUJOCO_GL=egl \
    FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    PATH=/opt/zk0/.venv/bin:$PATH

# Headless rendering for the simulated arm (MuJoCo on EGL, Mesa's software driver when there
# is no GPU) and OpenMP. Debian's own versions of these move with security updates: unpinned.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        libegl1 libegl-mesa0 libgl1 libgl1-mesa-dri libgles2 libglib2.0-0 libgomp1 \
    && rm -rf /var/lib/apt/lists/*

# A non-root user; dialout and video own the arm's serial port and the cameras.
RUN groupadd --system --gid 10001 zk0 \
    && useradd --system --uid 10001 --gid zk0 --groups dialout,video \
        --home-dir /var/lib/zk0 --create-home --shell /usr/sbin/nologin zk0 \
    && install -d -o zk0 -g zk0 -m 0750 /var/lib/zk0 /var/log/zk0 \
    && install -d -m 0755 /etc/zk0

WORKDIR /opt/zk0
# Dependencies first (the heavy, rarely changing layer), then the project itself.
COPY pyproject.toml constraints.txt ./
RUN python -m venv .venv \
    && .venv/bin/pip install "pip==26.3" \
    && .venv/bin/python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > requirements.txt \
    && .venv/bin/pip install -c constraints.txt -r requirements.txt \
    && rm requirements.txt
COPY README.md ./
COPY agent ./agent
COPY hub ./hub
COPY shared ./shared
COPY bench ./bench
COPY cli ./cli
COPY robot_configs ./robot_configs
# The project the way users install it (and tests/test_installed.py runs it): a wheel, built
# offline by the lock's setuptools (already in the venv: torch and lerobot need it), installed
# non-editable; then the wheel and the build's leftovers go.
RUN .venv/bin/pip wheel --no-deps --no-build-isolation --no-index -w /tmp/wheels . \
    && .venv/bin/pip install --no-deps --no-index -c constraints.txt /tmp/wheels/zk0-*.whl \
    && .venv/bin/pip check \
    && rm -rf /tmp/wheels build ./*.egg-info

USER 10001:10001
WORKDIR /var/lib/zk0
ENV HOME=/var/lib/zk0 \
    ZK0_OUTPUTS=/var/log/zk0
VOLUME ["/var/lib/zk0", "/var/log/zk0"]
# HubConfig's defaults: Flower SuperLink, adapter announces (PUB), adapter fetches (ROUTER),
# the dashboard (HTTPS with its token when bound beyond loopback).
EXPOSE 9092 5556 5557 8480
CMD ["zk0", "--help"]
