# The project's image: `hpo` (workers, status, best...) and optuna-dashboard, on Python 3.11.
#
# The default torch wheel from PyPI bundles the CUDA runtime (the nvidia-* wheels); the host needs
# only the NVIDIA driver and the NVIDIA Container Toolkit. For a smaller CPU-only image:
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
FROM python:3.11-slim-bookworm

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://pypi.org/simple
ARG DASHBOARD_VERSION=0.21.0

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TZ=UTC

# torch first: the largest layer, rebuilt only when its version changes.
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

WORKDIR /src
COPY pyproject.toml ./
COPY pipeline ./pipeline
COPY storage ./storage
COPY hpo ./hpo
RUN pip install . "optuna-dashboard==${DASHBOARD_VERSION}"

# Never root at run time; the checkpoint and run directories are volumes owned by this user.
RUN useradd --create-home --uid 1000 hpo \
    && mkdir -p /checkpoints /work/runs \
    && chown -R hpo:hpo /checkpoints /work
USER hpo
WORKDIR /work

CMD ["hpo", "--help"]
