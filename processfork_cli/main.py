"""Entry point of the `pf` console script: runs the app and turns every exception into one line + exit code.

This is the only place that catches exceptions for reporting. Commands raise the project's errors (or
let store errors through); `describe` (errors.py) maps them to 0/1/2/3. `PF_DEBUG=1` re-raises so the
traceback is visible.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence

from processfork_cli.errors import ExitCode, describe
from processfork_cli.output import Output

__all__ = ["main", "run"]

PROG = "pf"


def _debug() -> bool:
    return os.environ.get("PF_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def run(argv: Sequence[str] | None = None) -> int:
    """Run `pf` with `argv` (default: the process arguments) and return the exit code."""
    from typer import Abort, TyperException

    out = Output()
    args = list(sys.argv[1:] if argv is None else argv)
    stop_forwarding: Callable[[], None] = lambda: None
    try:
        from processfork_cli.app import build_app, wants_help

        if wants_help(args):
            # A help page opens no store: nothing to forward, and `logging` is never loaded.
            from processfork_cli import help_format

            help_format.load()
        else:
            stop_forwarding = _forward_store_warnings(out)
        result = build_app(args)(args=args, prog_name=PROG, standalone_mode=False)
    except TyperException as exc:
        # Parser errors (click's UsageError family, exit 2 by click's convention) and the few
        # other errors click raises itself: one line, never the boxed usage panel.
        out.error(_one_line(exc.format_message()), hint=_usage_hint(exc))
        return int(getattr(exc, "exit_code", ExitCode.USER))
    except (Abort, KeyboardInterrupt):
        out.error("interrupted")
        return 130
    except Exception as exc:  # the single reporting point; PF_DEBUG shows what is behind it
        if _debug():
            raise
        problem = describe(exc)
        hint = problem.hint
        if problem.show_debug_hint:
            hint = f"{hint}; " if hint else ""
            hint += "set PF_DEBUG=1 for the traceback"
        out.error(_one_line(problem.message), hint=hint)
        return int(problem.exit_code)
    finally:
        stop_forwarding()
    if isinstance(result, int) and not isinstance(result, bool):
        return result
    return ExitCode.OK


def main() -> None:
    """Console script `pf` and `python -m processfork_cli`."""
    sys.exit(run())


def _forward_store_warnings(out: Output) -> Callable[[], None]:
    """Show the store's warnings (e.g. a store made owner-only on open) as `warning:` lines on
    stderr, instead of logging's bare last-resort output, until the returned function is called."""
    import logging

    class StoreWarnings(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            out.warn(_one_line(record.getMessage()))

    handler = StoreWarnings(logging.WARNING)
    logger = logging.getLogger("processfork")
    logger.addHandler(handler)
    return lambda: logger.removeHandler(handler)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _usage_hint(exc: object) -> str | None:
    ctx = getattr(exc, "ctx", None)
    if ctx is None:
        return None
    return f"see `{ctx.command_path} --help`"


if __name__ == "__main__":
    main()
