"""``python -m flows.stages {data,train,explain,evaluate,report}``: the command DVC runs per stage.

Kept to the standard library: with ``LRP_STAGE_SERVER`` set (``python -m flows.server -- dvc
repro``) the stage runs in a child of the stage server, which imported the stack once
(:mod:`flows.stages.forkserver`); otherwise, or when that server cannot serve this code, the stage
runs here (:mod:`flows.stages.cli`).
"""

from __future__ import annotations

import sys

from flows.stages.forkserver import cpu_defaults, delegate

if __name__ == "__main__":
    cpu_defaults()  # before torch is imported here (a forked stage has the server's settings)
    code = delegate(sys.argv[1:])
    if code is None:
        from flows.stages.cli import main

        code = main()
    sys.exit(code)
