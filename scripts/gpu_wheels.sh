#!/usr/bin/env bash
# Download into .whl/ (ignored by git) the wheels that the lent GPU machine lacks, for its Python (3.12, x86-64), at
# the versions this checkout's .venv runs, so that `scripts/gpu_check.sh` can install them there with no network.
# The machine's image already has torch, transformers' own dependencies, numpy, pandas, pyarrow, safetensors,
# tokenizers, einops, jaxtyping, typer, rich, filelock and pytest (/work/.library/device/KINDS.md); these are what
# `import saebench_poly.cli, sae_lens, transformer_lens` and a run import besides. transformers, huggingface_hub and
# accelerate come along at this checkout's versions, the ones the test suite passes with. A device call carries at
# most 64 MiB with the working tree: the script prints the wheels' size.
#
#     make install && scripts/gpu_wheels.sh      # then: the device tool's run with carry [".whl"], see gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=.venv/bin/python
DISTRIBUTIONS=(
  sae-lens transformer-lens transformers huggingface_hub accelerate datasets pydantic pydantic_core annotated-types
  typing-inspection better-abc fancy-einsum beartype typeguard simple-parsing docstring_parser dill multiprocess
  platformdirs kernels httpx2 httpcore2 trio outcome sniffio truststore PySocks wandb googleapis-common-protos
  opentelemetry-api opentelemetry-sdk opentelemetry-proto opentelemetry-semantic-conventions
  opentelemetry-exporter-otlp-proto-http opentelemetry-exporter-otlp-proto-common opentelemetry-exporter-http-transport
  opentelemetry-exporter-otlp-common
)
pins=()
for name in "${DISTRIBUTIONS[@]}"; do
  pins+=("$name==$("$PYTHON" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")")
done
rm -rf .whl && mkdir .whl
# from /tmp: pip download writes nothing into the checkout but .whl
(cd /tmp && "$OLDPWD/$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$OLDPWD/.whl" "${pins[@]}")
echo "$(ls .whl | wc -l) wheels, $(du -sh .whl | cut -f1), in .whl/"
