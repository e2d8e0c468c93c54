# rare-cxr for a GPU machine: the tested dependency set (requirements-lock.txt) on a CUDA image.
#
#   docker build -t rare-cxr .
#   docker run --rm --gpus all --shm-size 8g \
#       -v /path/to/nih:/nih:ro -v "$PWD/data:/app/data" rare-cxr \
#       run --env nih --pipelines nih --params data_root=/nih
#
# The NIH download is mounted read-only (rare-cxr never writes into a data root it did not
# create, and the read-only mount makes that a guarantee); everything derived goes to
# /app/data/nih, a volume, so checkpoints, training states and reports outlive the container.
# torch's CUDA 13 wheel brings its own CUDA runtime libraries (the nvidia-* packages of the lock
# file); the base image gives a matching CUDA user space, and the host needs only the driver.
FROM nvidia/cuda:13.0.1-runtime-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    KEDRO_DISABLE_TELEMETRY=true \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# Python 3.11: the version the lock file was resolved and tested with. Ubuntu's package
# versions are not pinned (DL3008): the archive drops superseded versions, so a pin would break
# the build within weeks; the Python packages, which decide the results, are pinned by the lock.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /opt/venv

WORKDIR /app

# Dependencies first (cached layer): exactly the tested set, nothing resolved at build time.
COPY requirements-lock.txt ./
RUN pip install --no-deps -r requirements-lock.txt

COPY pyproject.toml README.md .telemetry ./
COPY src ./src
COPY conf ./conf
COPY bench ./bench
RUN pip install --no-deps -e . \
    && mkdir -p data/base data/nih \
    && useradd --create-home --uid 1000 rarecxr \
    && chown -R rarecxr /app

USER 1000
VOLUME ["/app/data"]
ENTRYPOINT ["kedro"]
CMD ["run", "--env", "nih", "--pipelines", "nih", "--params", "data_root=/nih"]
