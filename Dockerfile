# r1's image: the project with its GPU extra (torch 2.13 and vLLM 0.32 CUDA wheels from PyPI), run as a non-root
# user. The chart's default image (helm/r1/values.yaml: image r1, tag = the chart's appVersion):
#
#   docker build -t r1:0.1.0 .
#   docker tag r1:0.1.0 <registry>/r1:0.1.0 && docker push <registry>/r1:0.1.0   # then cluster.k8s.image=<registry>/r1:0.1.0
#
# GPUs come from the node (NVIDIA container toolkit / device plugin); the image carries no CUDA toolkit beyond the
# wheels' own libraries. Triton compiles small launchers at run time, hence gcc; KubeRay's health probes call wget.
# NCCL reaches InfiniBand / RoCE through libibverbs and the NICs' user-space drivers (ibverbs-providers: mlx5 and
# others); without them NCCL between pods falls back to TCP sockets (docs/kubernetes.md, "Fast networking").
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/tmp/home RAY_USAGE_STATS_ENABLED=0

RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev procps wget bubblewrap libibverbs1 ibverbs-providers \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 1000 r1 && useradd --uid 1000 --gid 1000 --no-create-home --shell /usr/sbin/nologin r1

WORKDIR /opt/r1
COPY pyproject.toml README.md ./
COPY locks locks
COPY r1 r1
COPY launcher launcher
COPY conf conf
COPY slurm slurm
COPY helm helm
# torch first, pinned: the CUDA build vLLM 0.32 is made for; then the project (editable: conf/ and the templates are
# found next to the code) with the GPU extra; every package at the version of locks/gpu.txt, as `make` installs it.
RUN pip install -c locks/gpu.txt torch==2.13.0 && pip install -c locks/gpu.txt -e '.[gpu]' \
 && python -c "import r1, launcher.k8s_job"

# Root owns the code; the user writes only to /tmp (an emptyDir in the chart) and the run volume.
USER 1000:1000
ENTRYPOINT []
CMD ["r1-launch", "--help"]
