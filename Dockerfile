# docker build -t samsum-qlora . && docker run --gpus all --rm -e HF_TOKEN -v "$PWD/outputs:/workspace/outputs" samsum-qlora train
# The package on a CUDA PyTorch base; `samsum-qlora` is the entrypoint. No secrets inside: pass
# HF_TOKEN and WANDB_API_KEY at run time (-e NAME, or SkyPilot's --secret). Runs as root, which
# SkyPilot needs (it installs sshd and its runtime into the container).
# For SkyPilot's `image_id: docker:...` build the `sky` target: docker build --target sky -t <registry>/samsum-qlora:sky .

# torch 2.8 with CUDA 12.8 and cuDNN 9 already inside; a fixed tag, so rebuilds match
FROM pytorch/pytorch:2.8.0-cuda12.8-cudnn9-runtime AS base

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /workspace

# The package with the W&B extra; the base image's torch satisfies torch>=2.5, so it stays.
COPY pyproject.toml README.md ./
COPY samsum_qlora ./samsum_qlora
RUN pip install --no-cache-dir "./[cloud]"
# The recipes, so `--config configs/...` works from the working directory.
COPY configs ./configs

# For SkyPilot: no entrypoint. RunPod starts a pod by passing SkyPilot's shell command as the
# container's arguments and cannot override an entrypoint (skypilot-org/skypilot#3879).
FROM base AS sky

# The default target: `docker run IMAGE train --config configs/llama32-1b-samsum.yaml`
FROM base
ENTRYPOINT ["samsum-qlora"]
CMD ["--help"]
