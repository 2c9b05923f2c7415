"""The ``hawada`` command: optimize, profile, export, eval.

Bad input exits with code 2 and one line on stderr naming the cause; nothing half-written. Any
other exception is a bug: its traceback is printed and the exit code is 1.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import traceback

from hawada.config import RecipeError, load_recipe
from hawada.errors import InputError, PathNotFoundError

# OS errors that carry the path they failed on (``filename``): a recipe, output or model path the
# user gave that cannot be read or written. Without a path they are bugs like any other error.
PATH_ERRORS: tuple[type[OSError], ...] = (
    FileNotFoundError,
    FileExistsError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
)


def input_error_line(e: BaseException) -> str | None:
    """The one line bad input is reported with, or None when ``e`` is a bug.

    Bad input is an :class:`~hawada.errors.InputError` (every HawAda error about what the user
    gave derives from it), or an OS error naming a path. A ``ValueError`` from anywhere else,
    e.g. raised inside torch, is a bug.
    """
    if not (isinstance(e, InputError) or (isinstance(e, PATH_ERRORS) and e.filename is not None)):
        return None
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        sys.stderr.write(f"hawada: error: {message}\n")
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="hawada", description="Hardware-aware pruning with distillation.")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    o = sub.add_parser("optimize", help="attach -> train -> search -> export -> fine-tune -> report")
    o.add_argument("recipe", nargs="?", default=None)
    o.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    o.add_argument(
        "--resume", metavar="RUN_DIR", default=None, help="continue the unfinished run with this output.dir"
    )
    pr = sub.add_parser("profile", help="measure keep-all latency, or the proxy's fidelity")
    pr.add_argument("recipe")
    pr.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    pr.add_argument(
        "--fidelity", action="store_true", help="proxy error on held-out random sub-architectures"
    )
    pr.add_argument("--points", type=int, default=20)
    pr.add_argument("--out", default=None, help="write the JSON result here")
    ex = sub.add_parser("export", help="re-export a saved slim model into another folder")
    ex.add_argument("model_dir")
    ex.add_argument("out_dir")
    ev = sub.add_parser("eval", help="summary of a saved slim model (its run's report) and its latency now")
    ev.add_argument(
        "model_dir", help="a run's output folder, its slim/, or a folder written by hawada.save_slim"
    )
    ev.add_argument("--batch-size", type=int, default=None)
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--json", action="store_true", help="print only the latency measured now, as JSON")
    ev.add_argument(
        "--runtime",
        default=None,
        help="time the folder's artifact of this runtime (default: the one its runtimes.json lists; "
        "eager PyTorch when it lists none)",
    )
    return p


def _cmd_optimize(args: argparse.Namespace) -> int:
    from hawada.run import optimize, resume_recipe
    from hawada.run.report import format_report

    if args.resume is not None:
        if args.recipe is not None or args.overrides:
            raise RecipeError("--resume takes no recipe and no --set: the run continues with its own recipe")
        recipe = resume_recipe(args.resume)
    elif args.recipe is None:
        raise RecipeError("optimize needs a recipe file (or --resume RUN_DIR)")
    else:
        recipe = load_recipe(args.recipe, args.overrides)
    report = optimize(recipe, log=lambda s: print(s, flush=True), resume=args.resume is not None)
    if int(os.environ.get("RANK", "0")) != 0:  # torchrun: rank 0 alone speaks
        return 0
    print(format_report(report))
    print(f"report: {os.path.join(report['output_dir'], 'report.json')}")
    return 0


def _cmd_profile(args: argparse.Namespace) -> int:
    from hawada.run.fidelity import profile_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    if args.points < 2:
        raise RecipeError("--points must be >= 2")
    res = profile_recipe(
        recipe, fidelity=args.fidelity, points=args.points, log=lambda s: print(s, flush=True)
    )
    text = json.dumps(res, indent=1)
    if args.out:
        tmp = args.out + ".partial"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, args.out)
    print(json.dumps(res.get("summary", res), indent=1))
    return 0


def _load_slim(path: str):
    from hawada.slim_io import load_slim

    if not os.path.isdir(path):
        raise PathNotFoundError(f"model folder not found: {path}")
    return load_slim(path)


def _cmd_export(args: argparse.Namespace) -> int:
    from hawada.slim_io import save_slim

    model = _load_slim(args.model_dir)
    out = os.path.normpath(args.out_dir)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise InputError(f"output folder {args.out_dir} exists and is not empty")
    # written beside the target and renamed at the end: a failure leaves no half-written folder
    tmp = out + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_slim(model, tmp)
        # what the model's save does not write travels with it: the tokenizer, the
        # sentence-transformers modules (modules.json, pooling, normalize), runtime artifacts
        for name in sorted(os.listdir(args.model_dir)):
            src, dst = os.path.join(args.model_dir, name), os.path.join(tmp, name)
            if os.path.exists(dst):
                continue
            if os.path.isdir(src):
                shutil.copytree(src, dst)
            else:
                shutil.copy2(src, dst)
        if os.path.isdir(out):
            os.rmdir(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"saved {args.out_dir}")
    return 0


def slim_folder(path: str) -> tuple[str, dict | None]:
    """(the slim model's folder, its run's report or None) for ``hawada eval PATH``: PATH is a
    folder written by ``save_slim`` (its run's report.json, if any, is in the folder above) or a
    run's output folder (report.json and slim/)."""
    if not os.path.isdir(path):
        raise PathNotFoundError(f"model folder not found: {path}")
    nested = os.path.join(path, "slim")
    if not os.path.isfile(os.path.join(path, "layout.json")) and os.path.isfile(
        os.path.join(nested, "layout.json")
    ):
        path = nested
    lay = os.path.join(path, "layout.json")
    if not os.path.isfile(lay):
        raise InputError(f"{path} is not a saved slim model: it has no layout.json (nor slim/layout.json)")
    try:
        with open(lay, encoding="utf-8") as f:
            layout = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise InputError(f"{lay} is not valid JSON: not a saved slim model") from None
    if not isinstance(layout, dict) or not isinstance(layout.get("family"), str):
        raise InputError(f"{lay} names no model family: not a saved slim model")
    # the report belongs to this model only when the model is its run's slim/ folder
    report_path = os.path.join(os.path.dirname(os.path.abspath(path)), "report.json")
    if os.path.basename(os.path.abspath(path)) != "slim" or not os.path.isfile(report_path):
        return path, None
    try:
        with open(report_path, encoding="utf-8") as f:
            report = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise InputError(f"{report_path} is not a JSON report") from None
    if not isinstance(report, dict) or not {"latency", "params", "agreement", "search"} <= set(report):
        raise InputError(f"{report_path} is not a HawAda report (no latency, params, agreement or search)")
    return path, report


def eval_runtime(folder: str, asked: str | None) -> str:
    """The runtime ``hawada eval`` times ``folder`` in: ``asked`` (which must have its artifact
    there), else the one artifact its ``runtimes.json`` lists, else eager PyTorch."""
    from hawada.runtimes import get_runtime
    from hawada.runtimes.base import read_manifest

    manifest = read_manifest(folder)
    if asked is not None:
        get_runtime(asked)  # an unknown name is one line
        if asked != "eager" and asked not in manifest:
            raise InputError(
                f"{folder} holds no {asked} artifact (it holds: {', '.join(manifest) or 'none'})"
            )
        return asked
    if len(manifest) > 1:
        raise InputError(f"{folder} holds artifacts of {', '.join(manifest)}: choose one with --runtime")
    return next(iter(manifest), "eager")


def _cmd_eval(args: argparse.Namespace) -> int:
    from hawada.adapters.base import adapter_for
    from hawada.core.export import param_count
    from hawada.core.profiler import measure_latency_ms
    from hawada.run.report import format_report, format_slim_summary
    from hawada.slim_io import example_inputs_for

    if args.batch_size is not None and args.batch_size < 1:
        raise InputError("--batch-size must be >= 1")
    path, report = slim_folder(args.model_dir)
    runtime = eval_runtime(path, args.runtime)
    model = _load_slim(path).to(args.device)
    inputs = example_inputs_for(model, args.batch_size)
    if runtime == "eager":
        res = measure_latency_ms(model, inputs, device=args.device)
    else:  # the deployed artifact, loaded through its runtime in a worker process
        import torch

        from hawada.runtimes import Artifact, time_artifacts
        from hawada.runtimes.base import conform, read_manifest

        if args.device != "cpu":
            raise InputError(f"--device {args.device}: the {runtime} artifact is timed on the CPU")
        names = read_manifest(path)[runtime]["inputs"]
        res = time_artifacts(
            {"slim": Artifact(path, runtime)}, conform(inputs, names), threads=torch.get_num_threads()
        )["slim"]
    if args.json:
        print(json.dumps(res.to_dict(), indent=1))
        return 0
    if report is not None:
        print(format_report(report))
        print(f"report: {os.path.join(os.path.dirname(os.path.abspath(path)), 'report.json')}")
        label = "latency now" if runtime == "eager" else f"latency now ({runtime})"
        print(f"{label}: {res.median_ms:.2f} ms at {res.shapes} {res.dtype} on {res.device} (example inputs)")
    else:
        layout = adapter_for(model).layout(model)
        print(format_slim_summary(layout, param_count(model), res.to_dict(), path))
    return 0


def main(argv: list[str] | None = None) -> int:
    from hawada.run import RunInterrupted

    args = build_parser().parse_args(argv)
    cmds = {"optimize": _cmd_optimize, "profile": _cmd_profile, "export": _cmd_export, "eval": _cmd_eval}
    try:
        return cmds[args.cmd](args)
    except RunInterrupted as e:
        sys.stderr.write(f"hawada: {e}\n")
        return 128 + e.signum
    except KeyboardInterrupt:
        sys.stderr.write("hawada: interrupted\n")
        return 130
    except Exception as e:
        line = input_error_line(e)
        if line is None:  # a bug: the whole traceback, for the report
            traceback.print_exc()
            return 1
        sys.stderr.write(f"hawada: error: {line}\n")
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
