# blender-chat: `blender-chat run` in a container.
#
#   docker build -t blender-chat .                                   # CPU torch, model fetched on first start
#   docker build --build-arg MODEL=facebook/blenderbot-400M-distill -t blender-chat .   # model baked in
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 -t blender-chat:cuda .
#
# The CUDA wheels of torch carry their own CUDA libraries: on a slim base they
# need only the host's NVIDIA driver (`docker run --gpus all`). BASE_IMAGE can
# still point at another Python 3.11+ image.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG MODEL=""

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DATA_DIR=/data \
    HF_HOME=/data/huggingface \
    HTTP_HOST=0.0.0.0 \
    HTTP_PORT=8080

RUN useradd --create-home --uid 10001 --user-group --shell /usr/sbin/nologin app \
    && mkdir -p /data/huggingface \
    && chown -R app:app /data

WORKDIR /app

# torch first, from its own index: a bare `torch` requirement would pull several GB of CUDA.
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

COPY pyproject.toml README.md MANIFEST.in ./
COPY bot ./bot
COPY adapters ./adapters
RUN pip install --no-cache-dir .

USER 10001:10001

# With MODEL set, the model is fetched now into /data/huggingface and converted for
# CTranslate2 (the CPU runtime) into /data/ctranslate2 ($DATA_DIR/ctranslate2), so the
# first start neither downloads nor converts; a named volume mounted on /data starts
# as a copy of both (a bind mount would hide them).
ENV BLENDERBOT_MODEL=${MODEL}
RUN if [ -n "${MODEL}" ]; then blender-chat download; fi

VOLUME ["/data"]
EXPOSE 8080

# Start period: loading the model takes a while before the server answers.
HEALTHCHECK --interval=30s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-m", "bot.healthcheck"]

# Exec form: the bot is PID 1 and gets Docker's SIGTERM itself (graceful stop within SHUTDOWN_GRACE).
CMD ["blender-chat", "run"]
