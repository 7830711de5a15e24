"""The ``predtrace`` command: one command, a subcommand per noun.

Each subcommand lives in its component and is imported only when it runs
(``predtrace trace`` never loads gRPC servers, and ``--help`` stays fast).
A component registers a subcommand by adding one line to ``COMMANDS``.
"""

from __future__ import annotations

import importlib
import sys
from importlib.metadata import PackageNotFoundError, version
from typing import Final

import click

# name -> "module:attribute" of a click command, loaded on first use.
COMMANDS: Final[dict[str, tuple[str, str]]] = {
    "demo": (
        "predtrace.cli.demo:demo",
        "Run the whole story on embedded defaults: collector, model server, pivot.",
    ),
    "sidecar": (
        "predtrace.sidecar._cli:sidecar",
        "The gRPC sidecar: serve (durable spool, shipper, OTLP, OIP proxy), status.",
    ),
    "collector": (
        "predtrace.collector._cli:collector_group",
        "The lineage collector: serve (ingest, lineage store, query API), token.",
    ),
    "trace": (
        "predtrace.collector._cli:trace_command",
        "The full lineage of a trace id or prediction id (the on-call pivot).",
    ),
    "model": (
        "predtrace.collector._cli:model_group",
        "Model versions: lineage NAME/VERSION or NAME@ALIAS.",
    ),
    "impact": (
        "predtrace.collector._cli:impact_command",
        "What a dataset, commit or image touched: model versions, deployments, predictions.",
    ),
    "completeness": (
        "predtrace.collector._cli:completeness_command",
        "Share of predictions whose lineage chain is complete, per model.",
    ),
    "lineage": (
        "predtrace.collector._cli:lineage_group",
        "Register lineage (model version, run, datasets, commit, image, deployment).",
    ),
}


def _version() -> str:
    try:
        return version("predtrace")
    except PackageNotFoundError:  # running from a source tree without install
        return "0+unknown"


# The install extra each subcommand needs (the others need "collector").
_EXTRAS: Final = {"sidecar": "sidecar", "demo": "demo"}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported when first needed."""

    def __init__(self, *args: object, lazy: dict[str, tuple[str, str]], **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._lazy = lazy

    def list_commands(self, ctx: click.Context) -> list[str]:
        """Every subcommand name, loaded or not."""
        return sorted({*super().list_commands(ctx), *self._lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        """Import a subcommand's module on first use."""
        if cmd_name in self._lazy:
            module_name, attr = self._lazy[cmd_name][0].split(":")
            try:
                module = importlib.import_module(module_name)
            except ModuleNotFoundError as exc:
                if (exc.name or "").startswith("predtrace"):
                    raise  # our own code missing: a broken install, not an extra
                extra = _EXTRAS.get(cmd_name, "collector")
                ctx.fail(
                    f"'predtrace {cmd_name}' needs the {extra} extra ({exc.name} is not "
                    f"installed): pip install 'predtrace[{extra}]' (from a checkout: "
                    f'pip install -e ".[{extra}]")'
                )
            command = getattr(module, attr)
            if not isinstance(command, click.Command):
                raise TypeError(f"{module_name}:{attr} is not a click command")
            return command
        return super().get_command(ctx, cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """List subcommands with their registered one-line help, without importing them."""
        rows = [(name, self._lazy[name][1]) for name in sorted(self._lazy)]
        rows += [
            (name, cmd.get_short_help_str())
            for name, cmd in sorted(self.commands.items())
            if name not in self._lazy
        ]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


def _lazy_table() -> dict[str, tuple[str, str]]:
    return {name: (target, help_text) for name, (target, help_text) in COMMANDS.items()}


@click.group(
    name="predtrace",
    cls=LazyGroup,
    lazy=_lazy_table(),
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(_version(), "-V", "--version", prog_name="predtrace")
def main() -> None:
    """predtrace: which model, trained on what, made this prediction?

    Traces every prediction as an OpenTelemetry span plus a compact event,
    ships the events to a lineage collector, and links each prediction to the
    model version, training run, datasets, commit and image behind it.

    \b
    The collector URL comes from --collector or PREDTRACE_COLLECTOR_URL.
    Exit codes: 0 ok, 1 not found or chain broken, 2 usage error.
    """
    # A terminal or pipe that cannot encode a character (LANG=C, an ASCII
    # PYTHONIOENCODING) gets a "?" for it, not a UnicodeEncodeError traceback.
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if callable(reconfigure):
            reconfigure(errors="replace")
