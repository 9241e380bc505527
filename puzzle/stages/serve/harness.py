"""lm-evaluation-harness on parent and child: a perplexity task over held-out text puzzle writes itself.

No hub here, so the task's data is local: `write_task` decodes rows of the job's test split (never trained on) into a
JSON-lines file and writes a task YAML beside it (`puzzle_heldout`: rolling log-likelihood, as lm-eval's wikitext task,
with word and byte perplexity and bits per byte). `run_harness` runs lm-eval's Hugging Face backend on one checkpoint
in its own environment (`make lmeval-env`) and returns the task's metrics. The command it runs is the one a user
types (shown in serve.md and the README):

    lm_eval --model hf --model_args pretrained=runs/NAME/export,trust_remote_code=True,dtype=float32 \\
        --tasks puzzle_heldout --include_path runs/NAME/lm_eval --batch_size 1
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from puzzle.common.progress import say
from puzzle.stages.serve.clients import engine_python, failure, run_in_environment

TASK = "puzzle_heldout"
METRICS = ("word_perplexity", "byte_perplexity", "bits_per_byte")


def write_task(directory: Path, texts: list[str], data_at: Path | None = None) -> Path:
    """The task YAML and its data (held-out documents, one JSON object per line) in `directory`; returns it.

    lm-eval reads the data from the absolute path in the YAML: `data_at`, where the data will be when the task is
    used (the published copy in the run directory), or by default where it is written."""
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / "heldout.jsonl"
    data.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    metrics = "".join(f"  - metric: {name}\n" for name in METRICS)
    (directory / f"{TASK}.yaml").write_text(
        f"# Written by puzzle's serve stage: held-out text from the job's test split ({len(texts)} documents).\n"
        f"task: {TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {(data_at or data).resolve()}\n"
        "test_split: test\n"
        "output_type: loglikelihood_rolling\n"
        'doc_to_text: ""\n'
        "doc_to_target: text\n"
        f"metric_list:\n{metrics}"
        "metadata:\n  version: 1.0\n"
    )
    return directory


def harness_command(checkpoint: Path, task_dir: Path, device: str) -> list[str]:
    """lm-eval's command line for `checkpoint` on the task in `task_dir`, as a user types it (`lm_eval ...`)."""
    args = f"pretrained={checkpoint},trust_remote_code=True,dtype=float32"
    return ["lm_eval", "--model", "hf", "--model_args", args, "--tasks", TASK, "--include_path", str(task_dir),
            "--batch_size", "1", "--device", device]  # fmt: skip


def run_harness(name: str, checkpoint: Path, task_dir: Path, work: Path, device: str, timeout_s: int) -> dict[str, Any]:
    """lm-eval's scores of `checkpoint` on the task: {metric: value} and the lm_eval version."""
    out, log, what = work / f"lm_eval_{name}", work / f"lm_eval_{name}.log", f"lm-eval on the {name}"
    command = [str(engine_python("lmeval")), "-m", *harness_command(checkpoint, task_dir, device)]
    command += ["--output_path", str(out)]
    say(f"serve: lm-evaluation-harness on the {name}")
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(work / "hf-datasets")}
    code = run_in_environment(command, work, log, timeout_s, what, **env)
    results = sorted(out.rglob("results_*.json"))
    if code != 0 or not results:
        raise failure(what, code, log)
    data = json.loads(results[-1].read_text())
    scores = data["results"][TASK]
    return {
        "version": data.get("lm_eval_version") or data.get("versions", {}).get(TASK),
        **{metric: scores[f"{metric},none"] for metric in METRICS if f"{metric},none" in scores},
    }
