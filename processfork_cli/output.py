"""The one output object of `pf`: human (Rich), `--json` and quiet modes.

Data goes to stdout and everything else (warnings, hints, errors, progress) to stderr, so that
`pf log --json | jq` and `pf fork X -n 12 -q | xargs ...` always see clean data. Commands never print
directly: they hand a JSON-able result to `emit` with a human renderer and the ids quiet mode prints.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import IO, Any

from processfork.store.documents import to_jsonable
from rich.console import Console, RenderableType
from rich.table import Table
from rich.text import Text

__all__ = ["Mode", "Output", "ProgressFn", "to_jsonable"]

ProgressFn = Callable[[str, int, "int | None"], None]
_PIPE_WIDTH = 200


class Mode(str, enum.Enum):
    """How results are written: chosen once per invocation from --json / --quiet."""

    HUMAN = "human"
    JSON = "json"
    QUIET = "quiet"




class Output:
    """Writes results and messages for one invocation.

    Streams are looked up at write time (not captured at construction) so that a test runner or a
    caller that swaps `sys.stdout` sees the output.
    """

    def __init__(
        self,
        mode: Mode = Mode.HUMAN,
        *,
        stdout: IO[str] | None = None,
        stderr: IO[str] | None = None,
    ) -> None:
        self.mode = mode
        self._stdout = stdout
        self._stderr = stderr
        self.console = Console(file=stdout, highlight=False, soft_wrap=False)
        if not self.console.is_terminal and "COLUMNS" not in os.environ:
            # Pipes and files get whole lines: 80 columns would fold cids and paths.
            self.console.width = _PIPE_WIDTH
        self.err_console = Console(
            file=stderr, stderr=stderr is None, highlight=False, soft_wrap=True
        )

    @property
    def json_mode(self) -> bool:
        return self.mode is Mode.JSON

    @property
    def quiet(self) -> bool:
        return self.mode is Mode.QUIET

    # -- data (stdout) -----------------------------------------------------------------------------

    def emit(
        self,
        data: Any,
        *,
        human: Callable[[Output], None] | None = None,
        quiet: Iterable[str] = (),
    ) -> None:
        """Write a command's result in the active mode.

        `data` is the JSON document (also what the HTTP routes return, so local and `--via-server`
        results look the same); `human` renders it for people; `quiet` are the bare ids.
        """
        if self.mode is Mode.JSON:
            self.write_json(data)
        elif self.mode is Mode.QUIET:
            for item in quiet:
                self.line(item)
        elif human is not None:
            human(self)

    def write_json(self, data: Any) -> None:
        out = self._stdout or sys.stdout
        out.write(json.dumps(to_jsonable(data), indent=2, ensure_ascii=False, allow_nan=False))
        out.write("\n")
        out.flush()

    def line(self, text: str = "") -> None:
        """One plain line of data; never interpreted as Rich markup (ref names may hold brackets)."""
        out = self._stdout or sys.stdout
        out.write(text + "\n")
        out.flush()

    def render(self, renderable: RenderableType) -> None:
        """Styled data: Rich strips the colours when stdout is not a terminal."""
        self.console.print(renderable, markup=False, highlight=False, crop=False, soft_wrap=True)

    def text(self, *parts: str | tuple[str, str]) -> None:
        """A line assembled from plain strings and (text, style) pairs."""
        self.render(Text.assemble(*parts))

    def table(
        self,
        columns: Sequence[str | tuple[str, Mapping[str, Any]]],
        rows: Iterable[Sequence[Any]],
        *,
        title: str | None = None,
        show_header: bool = True,
    ) -> None:
        table = Table(
            title=title,
            box=None,
            show_edge=False,
            pad_edge=False,
            show_header=show_header,
            header_style="bold",
            title_justify="left",
            title_style="bold",
        )
        for column in columns:
            if isinstance(column, tuple):
                name, options = column
                table.add_column(name, **dict(options))
            else:
                table.add_column(column)
        for row in rows:
            table.add_row(*(c if isinstance(c, Text) else Text(str(c)) for c in row))
        if self.console.is_terminal:
            self.console.print(table, crop=False)
            return
        # Off a terminal there are no colours; strip the cell padding Rich adds at line ends.
        with self.console.capture() as captured:
            self.console.print(table, crop=False)
        for line in captured.get().splitlines():
            self.line(line.rstrip())

    def fields(self, rows: Iterable[tuple[str, Any]], *, title: str | None = None) -> None:
        """A `key  value` block: labels dimmed, no header."""
        self.table([("", {"style": "dim"}), ""], rows, title=title, show_header=False)

    # -- messages (stderr) -------------------------------------------------------------------------

    def info(self, message: str) -> None:
        """Narration for people; silent in quiet mode."""
        if self.mode is not Mode.QUIET:
            self.err_console.print(Text(message, style="dim"))

    def warn(self, message: str) -> None:
        if self.mode is not Mode.QUIET:
            self.err_console.print(Text.assemble(("warning: ", "yellow bold"), message))

    def hint(self, message: str) -> None:
        if self.mode is not Mode.QUIET:
            self.err_console.print(Text.assemble(("hint: ", "cyan"), message))

    def error(self, message: str, hint: str | None = None) -> None:
        """The one error line; shown in every mode, including quiet."""
        if hint:
            message = message.rstrip(". ")
        text = Text.assemble(("pf: error: ", "red bold"), message)
        if hint:
            text.append(f" ({hint})", style="dim")
        self.err_console.print(text, markup=False, highlight=False)

    # -- progress (stderr, terminal only) -----------------------------------------------------------

    @property
    def shows_progress(self) -> bool:
        return self.mode is Mode.HUMAN and self.err_console.is_terminal

    @contextlib.contextmanager
    def progress(self, description: str) -> Iterator[ProgressFn]:
        """Yield a `progress(phase, done, total)` callback that draws a bar only on a terminal."""
        if not self.shows_progress:
            yield _no_progress
            return
        from rich.progress import (  # only commands that draw a bar pay for it
            BarColumn,
            Progress,
            TaskProgressColumn,
            TextColumn,
            TimeElapsedColumn,
        )

        bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            TimeElapsedColumn(),
            console=self.err_console,
            transient=True,
        )
        tasks: dict[str, Any] = {}

        def update(phase: str, done: int, total: int | None) -> None:
            if phase not in tasks:
                tasks[phase] = bar.add_task(f"{description}: {phase}", total=total)
            bar.update(tasks[phase], completed=done, total=total)

        with bar:
            yield update


def _no_progress(phase: str, done: int, total: int | None) -> None:
    """Progress sink used off-terminal: bars in logs and pipes are noise."""
