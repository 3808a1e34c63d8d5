"""What both command lines share: consoles, the error exit, progress bars, --version."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(highlight=False)
err = Console(stderr=True, highlight=False)


def safe_text(text: str) -> str:
    """Text from a log or a remote party, safe to print: rich markup escaped, control and direction characters
    (ANSI escapes, NUL, right-to-left overrides) spelt out as Python writes them, line breaks kept."""
    return escape("".join(c if c.isprintable() or c in "\n\t" else ascii(c)[1:-1] for c in text))


def fail(message: str, code: int = 2) -> typer.Exit:
    """Exit code 2 for bad input, 1 for an environment that does not cooperate (unreachable peers). The message
    may carry a process's log tail: printed as text, never as markup or terminal control."""
    err.print(f"[bold red]error:[/] {safe_text(message)}")
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
