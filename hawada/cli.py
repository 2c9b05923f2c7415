"""The ``hawada`` command: optimize, profile, export, eval.

Bad input exits with code 2 and one line on stderr naming the cause; nothing half-written. Any
other exception is a bug: its traceback is printed and the exit code is 1.
"""

from __future__ import annotations

import argparse
import json
import os
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
    ev = sub.add_parser("eval", help="latency of a saved slim model")
    ev.add_argument("model_dir")
    ev.add_argument("--batch-size", type=int, default=None)
    ev.add_argument("--device", default="cpu")
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
    if os.path.exists(args.out_dir) and os.listdir(args.out_dir):
        raise InputError(f"output folder {args.out_dir} exists and is not empty")
    save_slim(model, args.out_dir)
    print(f"saved {args.out_dir}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from hawada.core.profiler import measure_latency_ms
    from hawada.slim_io import example_inputs_for

    model = _load_slim(args.model_dir).to(args.device)
    res = measure_latency_ms(model, example_inputs_for(model, args.batch_size), device=args.device)
    print(json.dumps(res.to_dict(), indent=1))
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
