"""``predtrace demo``: the whole story on embedded defaults, in seconds.

Trains a small real model, starts a collector on SQLite, registers the model's
lineage the way a CI hook would, serves the model with the middleware under
uvicorn, sends predictions, then pivots from one trace id to the training run,
dataset and commit, and prints the commands to try next.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import Progress

DEMO_COMMIT_REPO = "https://example.org/acme/churn-model"
VERSION = "1"


@click.command(name="demo")
@click.option("--predictions", default=300, show_default=True, help="How many to send.")
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Keep the SQLite store and logs here (default: a temporary folder).",
)
@click.option(
    "--keep-running/--no-keep-running",
    default=False,
    help="Leave the collector running afterwards so you can try the next commands.",
)
def demo(predictions: int, workdir: Path | None, keep_running: bool) -> None:
    """Run the main job on embedded defaults: collector, model server, predictions, pivot.

    Everything binds 127.0.0.1 on free ports and lives in a temporary folder;
    nothing needs to be installed or running beforehand.
    """
    if predictions < 1:
        raise click.BadParameter("must be at least 1", param_hint="--predictions")
    console = Console(stderr=False)
    with ExitStack() as stack:
        if workdir is None and keep_running:
            # The collector outlives this process, so its store must too.
            workdir = Path(tempfile.mkdtemp(prefix="predtrace-demo-"))
        elif workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="predtrace-")))
        try:
            workdir.mkdir(parents=True, exist_ok=True)
            _lock_workdir(workdir, stack)
        except OSError as exc:
            raise click.ClickException(f"cannot use --workdir {workdir}: {exc.strerror}") from None
        _run(console, workdir, predictions, keep_running, stack)


def _lock_workdir(workdir: Path, stack: ExitStack) -> None:
    """Hold ``workdir/demo.lock`` for the demo's life: one demo per folder.

    Two demos on one folder would read one ``collector.ready`` and one would
    stop the collector the other uses. The lock goes with this process (the
    collector does not inherit it), so a crash never leaves the folder locked.

    Raises:
        click.ClickException: another demo holds the folder.
        OSError: the lock file cannot be opened (the folder is not writable).
    """
    import fcntl  # noqa: PLC0415 - POSIX only, as the demo's collector is

    lock = (workdir / "demo.lock").open("a")
    stack.callback(lock.close)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise click.ClickException(
            f"another predtrace demo is running in --workdir {workdir}: "
            "wait for it, or give another --workdir"
        ) from None


def _run(console: Console, workdir: Path, count: int, keep: bool, stack: ExitStack) -> None:
    from predtrace.cli.demo._model import train  # noqa: PLC0415 - keeps --help fast

    started = time.monotonic()
    console.rule("[bold]predtrace demo")
    with console.status("training a churn model (logistic regression, 600 rows)"):
        model = train()
    console.print(
        f"[green]✓[/] trained churn v{VERSION}: accuracy {model.metrics['train_accuracy']:.1%}, "
        f"dataset {model.dataset_digest[:19]}…",
        soft_wrap=True,  # ids and paths stay whole on one line, to be copied
    )
    url = _start_collector(console, workdir, keep, stack)
    commit = _commit_sha()
    # The same model and commit give the same run: a second demo on the same
    # --workdir registers what the first one did, which the collector accepts.
    run_id = "run-" + _digest(model.artifact_digest.encode() + commit.encode())[:8]
    image = "sha256:" + _digest(model.artifact + commit.encode())
    _register_lineage(url, model, run_id, commit, image)
    console.print(
        f"[green]✓[/] registered lineage (as a CI hook would): churn/{VERSION} ← {run_id} ← "
        f"dataset, commit {commit[:12]}, image {image[:19]}…",
        soft_wrap=True,
    )
    trace_id = _serve_and_predict(console, url, model, image, count)
    _show_pivot(console, url, trace_id)
    console.print(f"\n[bold]done in {time.monotonic() - started:.1f} s.[/]")
    if keep:
        console.print("Try next (the collector is still running):")
    else:
        console.print(
            "Try next, after `predtrace demo --keep-running --workdir ./predtrace-demo` "
            "leaves its collector up:"
        )
    # This run's collector has stopped unless kept: the next one has its own URL.
    for line in (
        f"export PREDTRACE_COLLECTOR_URL={url if keep else '<the URL that run prints>'}",
        f"predtrace trace {trace_id}",
        f"predtrace model lineage churn/{VERSION} -o json",
        f"predtrace impact --dataset {model.dataset_digest}",
        "predtrace completeness",
    ):
        console.print(f"  [cyan]{line}[/]", soft_wrap=True)  # whole lines: copied as they are


def _digest(data: bytes) -> str:
    import hashlib  # noqa: PLC0415 - tiny, local to the demo

    return hashlib.sha256(data).hexdigest()


def _commit_sha() -> str:
    """The predtrace checkout's HEAD when there is one, else a digest of the model code."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],  # noqa: S607 - git from PATH, read-only
            capture_output=True,
            text=True,
            check=True,
            timeout=5,
            cwd=Path(__file__).parent,
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return _digest(Path(__file__).with_name("_model.py").read_bytes())[:40]


def _start_collector(console: Console, workdir: Path, keep: bool, stack: ExitStack) -> str:
    ready = workdir / "collector.ready"
    try:
        ready.unlink(missing_ok=True)
        log = (workdir / "collector.log").open("wb")
    except OSError as exc:
        where = exc.filename or workdir
        raise click.ClickException(
            f"cannot use --workdir {workdir}: {where}: {exc.strerror}"
        ) from None
    stack.callback(log.close)
    cmd = [
        sys.executable, "-m", "predtrace.cli", "collector", "serve",
        "--db", f"sqlite:///{(workdir / 'demo.db').resolve()}",
        "--listen", "127.0.0.1:0", "--ready-file", str(ready),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREDTRACE_")}
    proc = subprocess.Popen(  # noqa: S603 - our own CLI
        cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=keep
    )
    if not keep:
        stack.callback(_stop, proc)
    deadline = time.monotonic() + 30
    with console.status("starting the collector (SQLite)"):
        while not (ready.exists() and ready.read_text().strip()):
            if proc.poll() is not None or time.monotonic() > deadline:
                _stop(proc)
                raise click.ClickException(
                    f"the collector did not start; see {workdir / 'collector.log'}"
                )
            time.sleep(0.05)
    url = "http://" + ready.read_text().splitlines()[0].strip()
    db = workdir / "demo.db"
    console.print(f"[green]✓[/] collector on {url} (SQLite at {db})", soft_wrap=True)
    if keep:
        console.print(f"  it keeps running after the demo: stop it with `kill {proc.pid}`")
    return url


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _http(method: str, url: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(  # noqa: S310 - a loopback http URL we built
        url, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:  # noqa: S310
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read(2000).decode("utf-8", "replace")
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        message = f"the demo's collector at {url} stopped answering: {reason}"
        raise click.ClickException(message) from None


def _register_lineage(url: str, model: Any, run_id: str, commit: str, image: str) -> None:
    status, answer = _http(
        "POST",
        f"{url}/v1/lineage",
        {
            "model": {
                "name": "churn",
                "version": VERSION,
                "aliases": ["champion"],
                "artifact_digest": model.artifact_digest,
            },
            "run": {"id": run_id, "params": model.params, "metrics": model.metrics},
            "datasets": [{"digest": model.dataset_digest, "source": "generated://churn-600.csv"}],
            "commit": {"sha": commit, "repo": DEMO_COMMIT_REPO},
            "image": {"digest": image, "name": f"churn-model:{VERSION}"},
            "deployment": {"id": "churn-demo", "model": {"name": "churn", "version": VERSION}},
        },
    )
    if status >= 300:
        raise click.ClickException(f"lineage registration failed with HTTP {status}: {answer}")


def _serve_and_predict(console: Console, url: str, model: Any, image: str, count: int) -> str:
    from predtrace.cli.demo._server import (  # noqa: PLC0415 - loads FastAPI only for the demo
        ModelServer,
        build_app,
        tracer_provider,
    )
    from predtrace.middleware import MiddlewareConfig  # noqa: PLC0415

    config = MiddlewareConfig(
        collector_url=url,
        service="churn-svc",
        model_name="churn",
        model_version=VERSION,
        model_alias="champion",
        model_digest=model.artifact_digest,
        deployment_id="churn-demo",
        image_digest=image,
        fingerprint_key=secrets.token_hex(16),
        feature_allowlist=frozenset({"tenure_months", "monthly_spend"}),
        sample_rate=1.0,
        tracer_provider=tracer_provider("churn-svc"),
    )
    server = ModelServer(build_app(model, VERSION, config))
    port = server.start()
    console.print(f"[green]✓[/] model server (FastAPI + predtrace middleware) on 127.0.0.1:{port}")
    rng = random.Random(11)  # noqa: S311 - demo traffic
    flagged = ("", -1.0)
    try:
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("sending predictions", total=count)
            for _ in range(count):
                trace_id = secrets.token_hex(16)
                row = [
                    rng.uniform(1, 72),
                    rng.uniform(10, 150),
                    rng.randint(0, 9),
                    rng.randint(0, 4),
                ]
                score = _predict(port, trace_id, row)
                if score > flagged[1]:
                    flagged = (trace_id, score)
                progress.advance(task)
    finally:
        server.stop()  # the lifespan shutdown flushes the middleware's queue
    console.print(
        f"[green]✓[/] sent {count} predictions; the riskiest had trace id {flagged[0]}",
        soft_wrap=True,
    )
    _wait_for_trace(url, flagged[0])
    return flagged[0]


def _predict(port: int, trace_id: str, row: list[float]) -> float:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v2/models/churn/infer",
        data=json.dumps(
            {"inputs": [{"name": "customer", "shape": [1, 4], "datatype": "FP64", "data": row}]}
        ).encode(),
        method="POST",
        headers={
            "Content-Type": "application/json",
            "traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01",
        },
    )
    with urllib.request.urlopen(request, timeout=10) as resp:  # noqa: S310
        return float(json.loads(resp.read())["outputs"][0]["data"][0])


def _wait_for_trace(url: str, trace_id: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, _ = _http("GET", f"{url}/v1/traces/{trace_id}")
        if status == 200:
            return
        time.sleep(0.1)
    raise click.ClickException(f"trace {trace_id} did not reach the collector in {timeout:.0f} s")


def _show_pivot(console: Console, url: str, trace_id: str) -> None:
    from predtrace.cli import main  # noqa: PLC0415 - the real `predtrace trace` command

    console.rule(f"[bold]on call: predtrace trace {trace_id}")
    try:
        main(["trace", trace_id, "--collector", url], standalone_mode=False)
    except SystemExit as exc:  # the command exits 1 when a hop is missing
        if exc.code not in (0, None):
            console.print(f"[yellow]the chain has a missing hop (exit {exc.code})")
