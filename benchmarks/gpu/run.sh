#!/usr/bin/env bash
# On a lent GPU machine (the device tool's `run`, repo root, carry [".whl"] after benchmarks/gpu/fetch_wheels.sh):
#   bash benchmarks/gpu/run.sh        (about 5 minutes on an H200; give it timeout_s 540)
# Installs the carried wheels beside the image's CUDA torch, runs the GPU test cases (the tiny preset's bench on
# the GPU among them), then `n2eye bench --preset n2eye-1.3b --device cuda`: decode against the GPU's measured memory
# bandwidth, training (the N2-Eye recipe: full fine-tuning, batch 2, bf16, gradient checkpointing) against its
# measured bf16 matmul rate, with and without the feature cache. Results land in $OUT (the device tool brings
# them back): versions.txt, tests.log, the two benches' JSON / markdown / PNG and bench.log.
set -uo pipefail
out=${OUT:-/tmp/n2eye-gpu}
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 - <<'PY' 2>&1 | tee "$out/versions.txt" || exit 1
import torch, transformers, datasets, peft, accelerate, n2eye
print("torch", torch.__version__, "CUDA", torch.version.cuda, "GPU", torch.cuda.get_device_name(0))
print("transformers", transformers.__version__, "datasets", datasets.__version__, "peft", peft.__version__,
      "accelerate", accelerate.__version__, "n2eye from", n2eye.__file__)
PY
python3 -m pytest -q -p no:cacheprovider tests/test_fast_inference.py tests/test_train.py -k "cuda or cache" \
  > "$out/tests.log" 2>&1; echo "tests: exit $? ($(tail -1 "$out/tests.log"))"
python3 -m n2eye.cli bench --preset n2eye-1.3b --device cuda --out "$out/n2eye-1.3b-cuda.json" 2>&1 \
  | grep -v -E "it/s\]|s/it\]|conv/s\]|s/conv\]|ba/s\]|examples/s\]" > "$out/bench.log"
status=$?
tail -40 "$out/bench.log"
exit $status
