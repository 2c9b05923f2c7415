"""The timing worker: ``python -m hawada.runtimes.worker FOLDER RUNTIME INPUTS THREADS``.

It loads one artifact through its runtime's API, then answers commands on stdin, one JSON line on
stdout each (``hawada.runtimes.timing`` drives it):

- on start: ``{"ready": true, "dtype": ...}`` (or ``{"input_error": ...}`` and exit 2)
- ``load FOLDER``: drop the loaded artifact, load FOLDER's (same runtime, same inputs), then
  answer as on start (a run's meter keeps workers alive across the models it times)
- ``warm N``: N untimed calls, ``{"ok": true}``
- ``run N``: N timed calls, ``{"samples_ms": [...]}``
- ``quit``: exit 0

Anything the libraries print goes to stderr, so stdout carries only these lines.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time


def main(argv: list[str]) -> int:
    proto = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # stray prints of the libraries must not corrupt the protocol

    def say(msg: dict) -> None:
        proto.write(json.dumps(msg) + "\n")
        proto.flush()

    folder, runtime, inputs_path, threads = argv[0], argv[1], argv[2], int(argv[3])
    import torch

    from hawada.errors import InputError
    from hawada.runtimes import load_artifact
    from hawada.runtimes.base import as_inputs
    from hawada.runtimes.timing import load_inputs

    torch.set_num_threads(threads)
    names, tensors = load_inputs(inputs_path)

    def load(path: str):
        deployed = load_artifact(path, runtime, threads=threads)
        return deployed.bind(as_inputs(names, tensors))

    try:
        call = load(folder)
    except InputError as e:
        say({"input_error": str(e)})
        return 2
    ready = {"ready": True, "dtype": "int8" if "int8" in runtime else "float32"}
    say(ready)
    for line in sys.stdin:
        cmd, _, arg = line.strip().partition(" ")
        if cmd == "quit":
            break
        if cmd == "load":
            call = None  # one model (one ORT session and its thread pool) per process at a time
            gc.collect()
            try:
                call = load(arg)
            except InputError as e:
                say({"input_error": str(e)})
                return 2
            say(ready)
            continue
        n = int(arg)
        if cmd == "warm":
            for _ in range(n):
                call()
            say({"ok": True})
        elif cmd == "run":
            xs = []
            for _ in range(n):
                t0 = time.perf_counter()
                call()
                xs.append((time.perf_counter() - t0) * 1e3)
            say({"samples_ms": xs})
        else:
            raise ValueError(f"unknown worker command {line!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
