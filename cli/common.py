"""What both command lines share: consoles, the error exit, progress bars, --version."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(highlight=False)
err = Console(stderr=True, highlight=False)


def fail(message: str, code: int = 2) -> typer.Exit:
    """Exit code 2 for bad input, 1 for an environment that does not cooperate (unreachable peers)."""
    err.print(f"[bold red]error:[/] {escape(message)}")
    return typer.Exit(code)


def package_version() -> str:
    try:
        return version("dress-fleet")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown (not installed)"


def version_option(program: str):
    """A --version flag that prints `<program> <version>` and exits, before any other option is checked."""

    def show(value: bool) -> None:
        if value:
            console.print(f"{program} {package_version()}")
            raise typer.Exit()

    return typer.Option(False, "--version", callback=show, is_eager=True, help="Print the version and exit.")


def progress_bar() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )


def accuracy_line(accuracy: dict[str, float]) -> str:
    """'1: 91.2%, 0.5: 90.8%' densest first, from a round entry's accuracy (density keys as strings)."""
    return ", ".join(f"{float(d):g}: {a:.1f}%" for d, a in sorted(accuracy.items(), key=lambda kv: -float(kv[0])))
