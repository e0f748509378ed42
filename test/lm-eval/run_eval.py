#!/usr/bin/env python3
"""Run lm-evaluation-harness on the local tasks in ./tasks and write a JSON summary.

    python3 test/lm-eval/run_eval.py --model hf \
        --model-args pretrained=<model dir>,dtype=float32 --out hf.json
    python3 test/lm-eval/run_eval.py --model local-completions \
        --model-args model=<served name>,base_url=http://127.0.0.1:<port>/v1/completions,... --out server.json

This is lm-eval's own `simple_evaluate` (what the `lm_eval` CLI calls), run from
Python because the CLI prints its results table with `pytablewriter`, which the
package mirror lacks (setup.sh), and fails after the evaluation without it.
The summary holds the aggregate metrics and, per task, every sample (doc id,
target, raw and filtered responses, per-sample metrics), as --log_samples
would write them. No network: the tasks read local JSONL files and the models
are local directories or a server on the loopback.
"""

import argparse
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

HERE = os.path.dirname(os.path.abspath(__file__))
TASKS_DIR = os.path.join(HERE, "tasks")
TASKS = ["loraplex_mc", "loraplex_gen"]


def plain(o):
    """numpy scalars (lm-eval's metric values) as JSON numbers."""
    return o.item() if hasattr(o, "item") else str(o)


def evaluate(model, model_args, tasks):
    import lm_eval
    from lm_eval.tasks import TaskManager

    t0 = time.time()
    res = lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=tasks,
        batch_size=1,
        device="cpu",
        log_samples=True,
        task_manager=TaskManager(include_path=TASKS_DIR, include_defaults=False),
        bootstrap_iters=0,
    )
    samples = {}
    for task, rows in res["samples"].items():
        samples[task] = [
            {
                "doc_id": r["doc_id"],
                "target": r["target"],
                "resps": r["resps"],
                "filtered_resps": r["filtered_resps"],
                **{m: r[m] for m in ("acc", "acc_norm", "exact_match") if m in r},
            }
            for r in sorted(rows, key=lambda r: r["doc_id"])
        ]
    results = {
        task: {k: v for k, v in r.items() if "," in k and "stderr" not in k} for task, r in res["results"].items()
    }
    return {
        "model": model,
        "model_args": model_args,
        "lm_eval_version": getattr(lm_eval, "__version__", None),
        "seconds": round(time.time() - t0, 1),
        "results": results,
        "samples": samples,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="lm-eval model type: hf, local-completions, ...")
    ap.add_argument("--model-args", help="lm-eval model_args string")
    ap.add_argument("--runs", help='JSON list of {"name", "model", "model_args"}: several evaluations in one process')
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--out", required=True, help="JSON file to write: the summary, or {name: summary} with --runs")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (hf)")
    a = ap.parse_args()
    if bool(a.runs) == bool(a.model and a.model_args):
        ap.error("give either --runs or both --model and --model-args")

    import torch

    torch.set_num_threads(a.threads)
    # The task YAMLs name their data files relative to the working directory.
    os.chdir(TASKS_DIR)
    tasks = a.tasks.split(",")
    if a.runs:
        out = {}
        for r in json.loads(a.runs):
            out[r["name"]] = evaluate(r["model"], r["model_args"], tasks)
            print(r["name"], f'{out[r["name"]]["seconds"]}s', json.dumps(out[r["name"]]["results"], default=plain), flush=True)
    else:
        out = evaluate(a.model, a.model_args, tasks)
        print(json.dumps(out["results"], default=plain))
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1, default=plain)


if __name__ == "__main__":
    sys.exit(main())
