"""The predtrace command: help, version, usage errors, lazy subcommands."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version

from click.testing import CliRunner

from predtrace.cli import COMMANDS, main


def test_help_explains_the_tool_and_exit_codes() -> None:
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    assert "which model, trained on what, made this prediction?" in result.output
    assert "Exit codes: 0 ok, 1 not found or chain broken, 2 usage error" in result.output
    for name in COMMANDS:
        assert name in result.output


def test_version_prints_the_installed_version() -> None:
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"predtrace, version {version('predtrace')}"


def test_unknown_command_is_a_usage_error_with_exit_2() -> None:
    result = CliRunner().invoke(main, ["frobnicate"])
    assert result.exit_code == 2
    assert "No such command 'frobnicate'" in result.output


def test_help_does_not_import_servers() -> None:
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from predtrace.cli import main\n"
        "CliRunner().invoke(main, ['--help'])\n"
        "heavy = [m for m in sys.modules if m.startswith(('grpc', 'aiohttp', 'opentelemetry',"
        " 'predtrace.collector', 'predtrace.sidecar', 'predtrace.middleware'))]\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == ""


def test_every_registered_subcommand_loads_and_has_help() -> None:
    for name in COMMANDS:
        result = CliRunner().invoke(main, [name, "--help"])
        assert result.exit_code == 0, (name, result.output)
        assert "Usage:" in result.output


def test_a_malformed_collector_url_is_a_clear_error_not_a_traceback() -> None:
    for url in ("http://[::1", "http://127.0.0.1:abc", "http://a b", "http://127.0.0.1:0"):
        result = CliRunner().invoke(main, ["trace", "p-1", "--collector", url])
        assert result.exit_code != 0, url
        assert result.exception is None or isinstance(result.exception, SystemExit), (
            url,
            result.exception,
        )
        assert "Traceback" not in result.output


def test_lineage_register_refuses_run_options_without_a_run_id() -> None:
    args = ["lineage", "register", "--model", "churn/3", "--metric", "auc=abc"]
    result = CliRunner().invoke(main, [*args, "--collector", "http://127.0.0.1:9"])
    assert result.exit_code == 2
    assert "need --run-id" in result.output


def test_completeness_fail_under_nan_is_a_usage_error_not_a_gate_that_always_passes() -> None:
    result = CliRunner().invoke(
        main, ["completeness", "--fail-under", "nan", "--collector", "http://127.0.0.1:9"]
    )
    assert result.exit_code == 2 and "--fail-under" in result.output


def test_a_subcommand_whose_extra_is_not_installed_says_which_to_install() -> None:
    # As after `pip install -e ".[demo]"`: no google_crc32c, which the sidecar needs.
    code = (
        "import sys; sys.modules['google_crc32c'] = None\n"
        "from predtrace.cli import main\n"
        "main(['sidecar', 'status'])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 2, done.stderr
    assert "'predtrace sidecar' needs the sidecar extra" in done.stderr
    assert "pip install 'predtrace[sidecar]'" in done.stderr
    assert "Traceback" not in done.stderr
