"""The demo recipe before and after issue-14's training changes, compared at measured speed.

"Before" is the demo recipe with the gate training it had when the keep set came from the
min-keep floor and a fill: the hinge constraint (lambda >= 0, learning rate 1.0), the latency term
priced under the training distribution only (no eval-set pricing at the end), width gates only
(no layer gates) and 6 fill probes. "After" is the recipe as shipped. Both prune for the same
target ratio in the recipe's runtime.

The comparison itself happens in one process tree: the teacher and both slim models are saved as
the recipe runtime's artifacts and timed interleaved, each in its own child process
(``hawada.runtimes.time_artifacts``), so the two speedups come from the same minutes of the same
machine, with bootstrap 95% intervals. Quality is each run's report (its deployed model against
the teacher on the test split), and is recomputed here on the same passages.

    python benchmarks/demo_before_after.py --after RUN [--after RUN ...] [--before RUN] [--keep DIR]

``--after`` is a finished run folder of the shipped recipe (e.g. one kept by
``demo_runs.py --keep``), repeatable: runs of one recipe land at different speeds, and the
comparison at equal speed is against the "after" run nearest the "before" one in measured
speedup (every after run is timed and scored beside it). Without ``--before`` the "before" run
is trained here first (one whole ``hawada optimize``, in its own process). Writes
``benchmarks/results/demo_before_after.json``.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
from common import write_result
from demo_runs import read_report, run_once, summarize_report
from runtime_side_by_side import embed, latency_inputs, load_teacher, quality, save_artifacts, speedup

import hawada
from hawada.adapters.base import get_adapter
from hawada.data.text import build_corpus, tokenize
from hawada.runtimes import load_artifact, time_artifacts

RECIPE = "recipes/cpu/minilm-l6.yaml"
# The gate training the demo had before issue 14 (recipe of 2026-11-30, on today's gate scale).
BEFORE = [
    "train.constraint=hinge",
    "train.lambda_lr=1.0",
    "train.price_eval_frac=0",
    "gates.kinds=[head,ffn]",
    "search.fill_probes=6",
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--after",
        action="append",
        required=True,
        help="a finished run folder of the shipped recipe (repeatable)",
    )
    p.add_argument("--before", default=None, help="a finished run folder of the 'before' settings")
    p.add_argument("--keep", default=None, help="train the 'before' run into DIR/before (kept)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--name", default="demo_before_after")
    a = p.parse_args()

    tmp = tempfile.TemporaryDirectory(prefix="hawada-before-after-")
    before_run = a.before
    if before_run is None:
        before_run = os.path.join(a.keep or tmp.name, "before")
        run_once(RECIPE, BEFORE, before_run)
    runs = {"before": before_run, **{f"after:{os.path.basename(os.path.normpath(r))}": r for r in a.after}}
    reports = {k: read_report(v) for k, v in runs.items()}
    first = reports[next(k for k in runs if k != "before")]["recipe"]
    if len({r["recipe"]["measure"]["runtime"] for r in reports.values()}) != 1:
        raise SystemExit("the runs measured in different runtimes")
    runtime, max_chars = first["measure"]["runtime"], first["data"]["max_chars"]

    torch.set_num_threads(a.threads)
    teacher, tok = load_teacher()
    seq_len = first["data"]["seq_len"]
    test = tokenize(tok, build_corpus(max_chars).splits["test"], seq_len)
    batch = first["target"]["batch_size"]
    lat = latency_inputs(test, batch, seq_len)
    models = {"teacher": teacher, **{k: hawada.load_slim(os.path.join(v, "slim")) for k, v in runs.items()}}
    by_key = save_artifacts(models, [runtime], lat, os.path.join(tmp.name, "artifacts"))
    arts = {name: by_key[f"{name}/{runtime}"] for name in models}
    timings = time_artifacts(arts, lat, threads=a.threads, rounds=a.rounds, repeats=a.repeats)

    adapter = get_adapter("hf_encoder")
    ref = embed(lambda b: adapter.output(teacher, b), test)
    arms = {}
    for name in runs:
        deployed = load_artifact(arts[name].folder, runtime, threads=a.threads)
        arms[name] = {
            "run": summarize_report(reports[name]),
            "latency": timings[name].to_dict(samples=True),
            "speedup": speedup(timings["teacher"], timings[name]),
            "quality_test": quality(embed(deployed, test), ref),
        }
        s, q = arms[name]["speedup"], arms[name]["quality_test"]
        print(
            f"{name:12s} x{s['ratio']:.2f} ({s['ci95'][0]:.2f}-{s['ci95'][1]:.2f}) cos {q['mean_cosine']:.4f}"
        )
    # equal speed: the after run whose measured speedup is nearest the before run's
    before = arms["before"]
    near = min(
        (k for k in arms if k != "before"),
        key=lambda k: abs(arms[k]["speedup"]["ratio"] - before["speedup"]["ratio"]),
    )
    faster_and_closer = [
        k
        for k in arms
        if k != "before"
        and arms[k]["speedup"]["ratio"] >= before["speedup"]["ratio"]
        and arms[k]["quality_test"]["mean_cosine"] >= before["quality_test"]["mean_cosine"]
    ]
    write_result(
        a.name,
        {
            "recipe": RECIPE,
            "runtime": runtime,
            "before_overrides": BEFORE,
            "shape": [batch, seq_len],
            "threads": a.threads,
            "timing": {
                "rounds": a.rounds,
                "repeats": a.repeats,
                "processes": "one per artifact, interleaved",
            },
            "teacher_latency": timings["teacher"].to_dict(samples=True),
            "arms": arms,
            "nearest_after": near,
            "nearest_speedup_ratio": arms[near]["speedup"]["ratio"] / before["speedup"]["ratio"],
            "nearest_after_minus_before_cosine": arms[near]["quality_test"]["mean_cosine"]
            - before["quality_test"]["mean_cosine"],
            "after_runs_faster_and_closer": faster_and_closer,
        },
    )
    tmp.cleanup()


if __name__ == "__main__":
    main()
