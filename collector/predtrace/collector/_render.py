"""Rich tables for the query commands (``-o table``); ``-o json`` bypasses this."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from rich.console import Console
from rich.markup import escape as markup_escape
from rich.table import Table

from predtrace.collector._cli import lineage_missing
from predtrace.collector._terminal import printable

J = Mapping[str, Any]


def escape(text: str) -> str:
    """Collector data for a rich table: no markup, no terminal control sequences."""
    return markup_escape(printable(text))


def _short(text: object, width: int = 24) -> str:
    value = str(text or "")
    return value if len(value) <= width else value[: width - 1] + "…"


def _pairs(values: J | None, limit: int = 6) -> str:
    items = list((values or {}).items())
    text = ", ".join(f"{k}={v}" for k, v in items[:limit])
    return text + (f", … (+{len(items) - limit})" if len(items) > limit else "")


def _plain_row(table: Table, *cells: str) -> None:
    """Add a row of collector data: escaped, so "[...]" in a name is never read as markup."""
    table.add_row(*(escape(cell) for cell in cells))


_PIPE_WIDTH = 200  # output to a file or a pipe: wide, so ids and digests stay on one line


def terminal_console() -> Console:
    """The console for tables: no emoji codes or highlighting applied to ids and digests.

    Written to a file or pipe (``predtrace trace ID > out; grep ...``), the
    tables are laid out wide: an id folded over two lines cannot be found.
    """
    console = Console(emoji=False, highlight=False)
    if not console.is_terminal:
        console.width = max(console.width, _PIPE_WIDTH)
    return console


def _missing_reasons(chain: J) -> dict[str, str]:
    return {str(m["hop"]): str(m["reason"]) for m in chain.get("missing", [])}


def _dataset_lines(run: J | None) -> str:
    if not run:
        return ""
    lines = []
    for d in run.get("datasets", []):
        context = f"({d['context']})" if d.get("context") else ""
        lines.append(f"{d['digest']}  {d.get('source') or ''} {context}".strip())
    return "\n".join(lines)


def chain_rows(chain: J, skip: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """(hop, text) rows of one chain, but the ``skip`` hops; a missing hop shows its reason."""
    missing = _missing_reasons(chain)
    dep, image = chain.get("deployment") or {}, chain.get("image") or {}
    model, run = chain.get("model_version") or {}, chain.get("run") or {}
    commit = run.get("commit") or {}
    where = _pairs({k: dep[k] for k in ("service", "namespace") if dep.get(k)})
    found = {
        "deployment": f"{dep.get('id', '')} {where}",
        "image": f"{image.get('digest', '')} {image.get('name') or ''}",
        "model_version": (
            f"{model.get('name')}/{model.get('version')}"
            f"{' @' + ','.join(model['aliases']) if model.get('aliases') else ''}"
            f" ({model.get('registry') or model.get('origin')})"
        ),
        "run": "\n".join(
            line
            for line in (
                f"{run.get('id')} {run.get('name') or ''} {run.get('url') or ''}",
                f"params: {_pairs(run.get('params'))}" if run.get("params") else "",
                f"metrics: {_pairs(run.get('metrics'))}" if run.get("metrics") else "",
            )
            if line
        ),
        "commit": f"{commit.get('sha', '')} {commit.get('repo') or ''}",
        "datasets": _dataset_lines(run),
    }
    hops = ("deployment", "image", "model_version", "run", "commit", "datasets")
    return [
        # Registry text is user data: escape it so "[...]" is never read as markup.
        (
            hop,
            f"[red]✗ {escape(missing[hop])}[/red]"
            if hop in missing
            else escape(found[hop].strip()),
        )
        for hop in hops
        if hop not in skip
    ]


def _chain_table(title: str, chain: J, skip: tuple[str, ...] = ()) -> Table:
    table = Table(title=title, show_header=True, title_justify="left")
    table.add_column("hop", style="bold")
    table.add_column("lineage", overflow="fold")
    for hop, text in chain_rows(chain, skip):
        table.add_row(hop.replace("_", " "), text)
    return table


def render_pivot(console: Console, answer: J) -> None:
    """Predictions of a trace (or id) and one chain table per distinct chain."""
    predictions = answer["predictions"]
    total = answer.get("total")
    shown = f"{len(predictions):,} prediction(s)"
    if isinstance(total, int) and total > len(predictions):  # a truncated answer says so
        shown = f"{len(predictions):,} of {total:,} prediction(s) shown"
    table = Table(title=escape(f"{answer['query']}: {shown}"), title_justify="left")
    # An id is copied and pasted: never folded, the other columns give way.
    widest = max((len(str(p["prediction_id"])) for p in predictions), default=10)
    table.add_column("prediction", no_wrap=True, min_width=min(widest, 64))
    for column in ("time", "model", "deployment / pod", "status", "output"):
        table.add_column(column, overflow="fold")
    for p in predictions:
        model, dep, out = p["model"], p["deployment"], p.get("output") or {}
        _plain_row(
            table,
            p["prediction_id"],
            _short(p.get("timestamp"), 27),
            _model_name(model),
            f"{dep['id']} {dep.get('pod') or ''}".strip(),
            p["status"],
            _pairs({k: v for k, v in out.items() if v is not None}),
        )
    console.print(table)
    seen: list[J] = []
    for p in predictions:
        if p["lineage"] not in seen:
            seen.append(p["lineage"])
            title = f"lineage of {_chain_name(p['model'], p['lineage'])}"
            console.print(_chain_table(escape(title), p["lineage"]))


def _model_name(model: J) -> str:
    """What a prediction names: ``name/version``, or ``name@alias`` without a version."""
    if model.get("version") or not model.get("alias"):
        return f"{model['name']}/{model.get('version') or ''}"
    return f"{model['name']}@{model['alias']}"


def _chain_name(model: J, chain: J) -> str:
    """The model a chain explains: the version an alias resolved to, else what was named."""
    resolved = chain.get("model_version") or {}
    if not model.get("version") and resolved.get("version"):
        return f"{model['name']}/{resolved['version']} (@{model.get('alias')})"
    return _model_name(model)


def render_model_lineage(console: Console, answer: J) -> None:
    """A model version, its run, commit, datasets, images and deployments."""
    model, run = answer["model_version"], answer.get("run")
    chain = {
        "model_version": model,
        "run": run,
        "image": {"digest": ", ".join(model.get("images", []))} if model.get("images") else None,
        "deployment": None,
        "missing": [m for m in lineage_missing(answer) if m["hop"] != "deployment"],
    }
    # Deployments get their own table below, with prediction counts.
    title = escape(f"model {model['name']}/{model['version']}")
    console.print(_chain_table(title, chain, skip=("deployment",)))
    _deployments_table(console, "deployments", answer.get("deployments", []), _cut(answer))


def _cut(listing: J) -> str | None:
    """``showing 1,000 of 200,000 deployments ...`` when ``listing`` lists only some.

    The collector lists a version's busiest deployments (``deployments_total``
    counts them all); its prediction counts cover every one.
    """
    total, listed = listing.get("deployments_total"), len(listing.get("deployments") or [])
    if not listing.get("deployments_truncated") or not isinstance(total, int):
        return None
    predictions = listing.get("predictions")
    counted = f"; {predictions:,} predictions in all" if isinstance(predictions, int) else ""
    return f"showing {listed:,} of {total:,} deployments (those with the most predictions{counted})"


def _deployments_table(
    console: Console, title: str, deployments: Iterable[J], caption: str | None = None
) -> None:
    table = Table(title=title, title_justify="left", caption=caption, caption_justify="left")
    for column in ("deployment", "predictions", "first seen", "last seen"):
        table.add_column(column)
    for d in deployments:
        _plain_row(
            table,
            str(d["id"] or "-"),
            str(d["predictions"]),
            str(d["first_seen"] or "-"),
            str(d["last_seen"] or "-"),
        )
    console.print(table)


def render_impact(console: Console, answer: J) -> None:
    """Model versions and deployments reached from a dataset, commit or image."""
    query = answer["query"]
    table = Table(
        title=escape(
            f"impact of {query['kind']} {query['value']}: {answer['predictions']} prediction(s)"
        ),
        title_justify="left",
    )
    for column in ("model version", "run", "deployment", "predictions", "first seen", "last seen"):
        table.add_column(column, overflow="fold")
    for version in answer["model_versions"]:
        name = f"{version['name']}/{version['version']}"
        for d in version["deployments"] or [
            {"id": "-", "predictions": 0, "first_seen": None, "last_seen": None}
        ]:
            _plain_row(
                table,
                name,
                str(version.get("run_id") or "-"),
                str(d["id"] or "-"),
                str(d["predictions"]),
                str(d["first_seen"] or "-"),
                str(d["last_seen"] or "-"),
            )
    console.print(table)
    for version in answer["model_versions"]:
        cut = _cut(version)
        if cut:
            console.print(escape(f"{version['name']}/{version['version']}: {cut}"))
        if version.get("image_unknown"):
            console.print(
                escape(
                    f"not counted: {version['image_unknown']} prediction(s) of "
                    f"{version['name']}/{version['version']} name no image, and that version "
                    "is in other images too"
                )
            )
    matched = _matched(answer)
    if matched:  # on a line of its own: a digest folded over two lines cannot be found
        console.print(escape(matched), soft_wrap=True)
    if answer.get("runs"):
        console.print(escape(f"runs: {', '.join(answer['runs'])}"))


def _matched(answer: J) -> str:
    """What a commit or image query found stored, when other than the text given.

    A short sha's full commit; another spelling of an image digest.
    """
    node, query = answer.get("node") or {}, answer["query"]
    if not isinstance(node, Mapping):
        return ""
    if query["kind"] == "image" and node.get("stored_as"):
        return f"image also stored as: {', '.join(str(i) for i in node['stored_as'])}"
    if query["kind"] != "commit":
        return ""
    shas = node.get("sha") or []
    shas = [str(s) for s in (shas if isinstance(shas, list) else [shas])]
    if not shas or shas == [str(query["value"])]:
        return ""
    return f"commit: {', '.join(shas)}"


def render_completeness(console: Console, answer: J) -> None:
    """Per model: predictions, share with a complete chain, missing hops.

    The title's share covers every model; a page of them (``total`` more than
    listed) says so under the table.
    """
    total, listed = answer.get("total"), len(answer["models"])
    table = Table(
        title=(
            f"lineage completeness: {answer['share']:.1%} of {answer['predictions']} predictions"
            if answer["predictions"]
            else "lineage completeness: no predictions stored yet"
        ),
        title_justify="left",
        caption=(
            f"{listed:,} of {total:,} models listed"
            if isinstance(total, int) and total > listed
            else None
        ),
        caption_justify="left",
    )
    for column in ("model", "predictions", "complete", "share", "missing hops (predictions)"):
        table.add_column(column, overflow="fold")
    for m in answer["models"]:
        _plain_row(
            table,
            m["model"] or "(none)",
            str(m["predictions"]),
            str(m["complete"]),
            f"{m['share']:.1%}",
            _pairs(m["missing"]),
        )
    console.print(table)
