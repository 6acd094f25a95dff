#!/usr/bin/env bash
# `make gpu-wheels`: downloads (on a machine with network) what `make gpu-check` needs on a GPU
# machine that has Python 3.12, torch with CUDA, transformers, peft and accelerate but no network:
# DeepSpeed 0.19.8 (PyPI has only its sdist; it installs offline with DS_BUILD_OPS=0, needing only
# setuptools, and wheel + packaging for older pip), its pure-Python dependencies, and matplotlib
# (the run's report plots). About 33 MiB; DEST (default gpu_wheels/) is ignored by git and travels
# with the tree. Ray does not fit: its wheel alone is 75.6 MiB.
set -euo pipefail
dest=${1:-gpu_wheels}
python=${PYTHON:-python3}
platform=(--only-binary=:all: --python-version 3.12 --implementation cp
          --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
          --platform manylinux2014_x86_64)
mkdir -p "$dest/deepspeed" "$dest/matplotlib"
"$python" -m pip download --quiet --no-deps --no-binary :all: -d "$dest/deepspeed" deepspeed==0.19.8
"$python" -m pip download --quiet --no-deps "${platform[@]}" -d "$dest/deepspeed" \
  annotated_types==0.8.0 einops==0.8.2 hjson==3.1.0 msgpack==1.2.4 ninja==1.13.2 \
  nvidia_ml_py==13.615.71 packaging==26.4 py_cpuinfo==9.0.0 pydantic==2.14.4 \
  pydantic_core==2.50.5 setuptools==84.2.1 typing_extensions==4.16.0 typing_inspection==0.4.5 \
  wheel==0.48.0
"$python" -m pip download --quiet --no-deps "${platform[@]}" -d "$dest/matplotlib" \
  contourpy==1.3.3 cycler==0.12.1 fonttools==4.69.1 kiwisolver==1.5.1 matplotlib==3.11.2 \
  pillow==13.0.0 pyparsing==3.3.3 python_dateutil==4.0.0 six==1.17.0
(cd "$dest" && find . -type f ! -name SHA256SUMS | sort | xargs sha256sum > SHA256SUMS)
du -sh "$dest"
