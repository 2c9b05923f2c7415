"""Side by side: the MiniLM-L6 teacher and a slim model in each deployment runtime.

Every (model, runtime) pair is saved as the runtime's own artifact and timed in its own child
process (``hawada.runtimes.time_artifacts``: torch and ONNX Runtime never share a process, rounds
alternate between all artifacts), at batch 32 x 128 with a fixed thread count. Speedups are
ratios of medians with bootstrap 95% intervals (``profiler.ratio_ci``), against the fp32 eager
teacher and against the teacher in the same runtime. Quality is each deployed model's embeddings
against the fp32 eager teacher's: mean cosine and retrieval agreement (top-1, top-10) on

- ``test``: the MiniLM job's test split (standard-library docstrings, ``hawada.data.text``, the
  demo's ``data.max_chars``), and
- ``offdomain``: the long descriptions (``METADATA``) of the Python distributions installed beside
  hawada: prose about software packages that the docstring corpus does not contain and no run
  trains on.

    python benchmarks/runtime_side_by_side.py [--slim [NAME=]RUN/slim ...] [--rounds 5 --repeats 4]

``--slim`` may be given several times (``int8=runs/a/slim --slim fp32=runs/b/slim``): each slim
model gets a row per runtime, under its name (``slim`` without one). Without ``--slim`` the slim
rows are skipped (a message says so). Writes ``benchmarks/results/runtime_side_by_side.json``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys
import tempfile
import zlib

import torch
from common import HERE, write_result

import hawada
from hawada.adapters import st_folder
from hawada.adapters.base import get_adapter
from hawada.core.distill import mean_cosine, retrieval_agreement
from hawada.core.profiler import LatencyResult, ratio_ci
from hawada.data.text import Tokenized, build_corpus, load_tokenizer, passages, tokenize
from hawada.jobs.text import packaged_minilm_folder
from hawada.runtimes import Artifact, get_runtime, load_artifact, save_artifact, time_artifacts

DEMO_MAX_CHARS = 1_700_000  # recipes/cpu/minilm-l6.yaml data.max_chars: the demo's test split
RUNTIMES = ["eager", "int8_dynamic", "onnxruntime", "onnxruntime_int8"]


def load_teacher() -> tuple[torch.nn.Module, object]:
    """The packaged MiniLM-L6 (pooling from its sentence-transformers modules) and its tokenizer."""
    source = packaged_minilm_folder()
    st = st_folder.read_st_folder(source)
    folder = os.path.join(source, st.transformer_path)
    from transformers import AutoModel

    teacher = AutoModel.from_pretrained(folder, local_files_only=True).eval()
    st_folder.set_pooling(teacher, st.pooling)
    return teacher, load_tokenizer(folder)


def offdomain_passages(limit: int) -> tuple[list[str], dict]:
    """Passages of the installed distributions' long descriptions, in an order fixed by a hash
    of the text (the same machine gives the same set), at most ``limit``."""
    out, names = [], []
    for dist in importlib.metadata.distributions():
        meta = dist.read_text("METADATA") or ""
        body = meta.partition("\n\n")[2]  # the headers end at the first blank line
        got = passages(body)
        if got:
            names.append(dist.metadata["Name"])
            out += got
    out = sorted(set(out), key=lambda s: zlib.crc32(s.encode()))[:limit]
    return out, {"distributions": len(names), "passages": len(out)}


@torch.no_grad()
def embed(deployed, data: Tokenized, batch: int = 32) -> torch.Tensor:
    """``[N, D]`` embeddings, batches trimmed to their longest passage (as the job evaluates)."""
    outs = []
    for i in range(0, len(data), batch):
        outs.append(deployed(data.batch(torch.arange(i, min(i + batch, len(data))))))
    return torch.cat(outs)


def latency_inputs(data: Tokenized, batch: int, seq_len: int) -> dict[str, torch.Tensor]:
    """The timed batch: ``[batch, seq_len]`` real passages padded to ``seq_len``, every position
    attended (the demo's shape, whatever the passages' lengths)."""
    idx = torch.arange(batch) % len(data)
    return {
        "input_ids": data.input_ids[idx, :seq_len].clone(),
        "attention_mask": torch.ones(batch, seq_len, dtype=torch.long),
    }


def save_artifacts(
    models: dict[str, torch.nn.Module], runtimes: list[str], inputs: dict, root: str
) -> dict[str, Artifact]:
    """Each model's artifact in each runtime, in ``root/NAME``; keyed ``"NAME/RUNTIME"``."""
    arts = {}
    for m, model in models.items():
        for r in runtimes:
            save_artifact(model, inputs, os.path.join(root, m), r)
            arts[f"{m}/{r}"] = Artifact(os.path.join(root, m), r)
    return arts


def quality(emb: torch.Tensor, ref: torch.Tensor) -> dict:
    ra = retrieval_agreement(emb, ref, k=10)
    return {
        "mean_cosine": mean_cosine(emb, ref),
        "retrieval_top1": ra["top1"],
        "retrieval_top10": ra["top10"],
    }


def speedup(den: LatencyResult, num: LatencyResult) -> dict:
    """``median(den) / median(num)`` with its bootstrap 95% interval."""
    return {"ratio": den.median_ms / num.median_ms, "ci95": list(ratio_ci(den, num))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--slim",
        action="append",
        default=[],
        help="[NAME=]FOLDER: a saved slim folder (e.g. the slim/ of a `make demo` run); repeatable",
    )
    p.add_argument("--runtimes", default=",".join(RUNTIMES), help="comma-separated runtime names")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--max-chars", type=int, default=DEMO_MAX_CHARS, help="the run's data.max_chars")
    p.add_argument("--max-passages", type=int, default=0, help="cap each quality set (0: all)")
    p.add_argument("--offdomain-passages", type=int, default=1000)
    p.add_argument(
        "--artifacts", default=None, help="keep the artifacts in this folder (default: a temp folder)"
    )
    p.add_argument("--name", default="runtime_side_by_side")
    a = p.parse_args()
    runtimes = [r.strip() for r in a.runtimes.split(",") if r.strip()]
    for r in runtimes:
        get_runtime(r).require()

    torch.set_num_threads(a.threads)
    teacher, tok = load_teacher()
    models, folders = {"teacher": teacher}, {}
    for item in a.slim:
        name, _, folder = item.rpartition("=")
        name = name or "slim"
        if name in models:
            raise SystemExit(f"--slim {item}: the name {name!r} is taken; give NAME=FOLDER")
        models[name] = hawada.load_slim(folder)
        # the folder as the result names it: relative to the repository (no machine paths)
        folders[name] = os.path.relpath(os.path.abspath(folder), os.path.dirname(HERE))
    if not a.slim:
        print(
            "no --slim folder given: the slim rows are skipped (give the slim/ of a `make demo` run)",
            file=sys.stderr,
        )

    test = build_corpus(a.max_chars).splits["test"]
    off, off_info = offdomain_passages(a.offdomain_passages)
    if a.max_passages:
        test, off = test[: a.max_passages], off[: a.max_passages]
    sets = {"test": tokenize(tok, test, a.seq_len), "offdomain": tokenize(tok, off, a.seq_len)}
    lat = latency_inputs(sets["test"], a.batch, a.seq_len)

    tmp = None if a.artifacts else tempfile.TemporaryDirectory(prefix="hawada-side-by-side-")
    arts = save_artifacts(models, runtimes, lat, a.artifacts or tmp.name)
    timings = time_artifacts(
        arts, lat, threads=a.threads, warmup=a.warmup, rounds=a.rounds, repeats=a.repeats
    )

    adapter = get_adapter("hf_encoder")
    ref = {k: embed(lambda b: adapter.output(teacher, b), v) for k, v in sets.items()}  # fp32 eager teacher
    base = timings["teacher/eager"]
    rows = []
    for key, art in arts.items():
        m, r = key.rsplit("/", 1)
        t = timings[key]
        deployed = load_artifact(art.folder, r, threads=a.threads)
        row = {
            "model": m,
            "runtime": r,
            "latency": t.to_dict(samples=True),
            "speedup_vs_fp32_teacher": speedup(base, t),
            "speedup_vs_same_runtime_teacher": speedup(timings[f"teacher/{r}"], t),
            "quality": {k: quality(embed(deployed, v), ref[k]) for k, v in sets.items()},
        }
        rows.append(row)
        q = row["quality"]
        print(
            f"{key:28s} {t.median_ms:9.1f} ms  x{row['speedup_vs_fp32_teacher']['ratio']:.2f} "
            f"cos test {q['test']['mean_cosine']:.3f} off {q['offdomain']['mean_cosine']:.3f}",
            file=sys.stderr,
        )
    versions = {r: get_runtime(r).versions() for r in runtimes}
    write_result(
        a.name,
        {
            "shape": [a.batch, a.seq_len],
            "threads": a.threads,
            "timing": {
                "warmup": a.warmup,
                "rounds": a.rounds,
                "repeats": a.repeats,
                "processes": "one per artifact, rounds interleaved",
            },
            "slim": folders,
            "runtime_versions": versions,
            "quality_sets": {
                "reference": "teacher, fp32 eager",
                "test": {
                    "source": "stdlib docstrings, test split (hawada.data.text)",
                    "max_chars": a.max_chars,
                    "passages": len(sets["test"]),
                },
                "offdomain": {
                    "source": "long descriptions (METADATA) of the installed Python distributions",
                    **off_info,
                    "passages": len(sets["offdomain"]),
                },
            },
            "rows": rows,
        },
    )
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
