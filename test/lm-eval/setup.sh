#!/usr/bin/env bash
# Installs what test/lm-eval needs: lm-evaluation-harness (without its optional extras, several of
# which the package mirror lacks) plus the few packages it really imports for this suite, and the
# HF transformers + PEFT reference model. Idempotent: exits at once when everything imports, and
# pip skips what is already installed.
set -euo pipefail
PY=${LORAPLEX_PYTHON:-python3}

check() {
  "$PY" - <<'PY' 2>/dev/null
import importlib.metadata as md
import lm_eval.evaluator, lm_eval.models.openai_completions, lm_eval.models.huggingface  # noqa: F401
import torch, transformers, peft, datasets, aiohttp, tenacity  # noqa: F401
assert md.version("lm_eval") == "0.4.13", md.version("lm_eval")
PY
}

if check; then
  echo "lm-eval setup: already installed ($("$PY" -c 'import importlib.metadata as m; print("lm_eval", m.version("lm_eval"))'))"
  exit 0
fi

# The reference model side (lm-eval's `hf` model): CPU torch is enough.
"$PY" -m pip install torch transformers peft safetensors tokenizers
# lm-eval itself, without its declared dependencies: evaluate, pytablewriter, rouge-score,
# sqlitedict and word2number are not on the mirror, and nothing this suite runs imports them
# (pytablewriter is only the CLI's results table: run_eval.py calls simple_evaluate instead).
"$PY" -m pip install --no-deps lm-eval==0.4.13
# What it does import here: datasets (the `json` loader for the local tasks), more_itertools
# (the evaluator), aiohttp + tenacity (local-completions), sacrebleu (lm_eval.api.metrics).
"$PY" -m pip install datasets more_itertools aiohttp tenacity sacrebleu

check || { echo "lm-eval setup: imports still fail after installing" >&2; exit 1; }
echo "lm-eval setup: done"
