"""The store schema and its migrations, for SQLite and PostgreSQL.

One template per migration, rendered per dialect (types, identity columns, and
PostgreSQL's partitioning of predictions by receive time). Applied in order at
open; ``schema_migrations`` records what ran.
"""

from __future__ import annotations

from typing import Final, Literal

Dialect = Literal["sqlite", "postgres"]

PREDICTION_COLUMNS: Final = (
    "prediction_id",
    "trace_id",
    "span_id",
    "ts_ns",
    "duration_ns",
    "received_ns",
    "producer_id",
    "seq",
    "model_name",
    "model_version",
    "model_alias",
    "model_registry_id",
    "model_digest",
    "additional_models",
    "deployment_id",
    "service",
    "namespace",
    "pod",
    "node",
    "image_digest",
    "image_name",
    "endpoint",
    "protocol",
    "status",
    "status_code",
    "error_type",
    "input_fingerprint",
    "output_label",
    "output_score",
    "output_value",
    "features",
    "attributes",
    "sampled",
)

_TYPES: Final = {
    "sqlite": {"BLOB": "BLOB", "INT": "INTEGER", "REAL": "REAL", "SERIAL": "INTEGER PRIMARY KEY"},
    "postgres": {
        "BLOB": "BYTEA",
        "INT": "BIGINT",
        "REAL": "DOUBLE PRECISION",
        "SERIAL": "BIGSERIAL",
    },
}

_V1_TABLES: Final = """
CREATE TABLE batches (
  producer_id TEXT NOT NULL, seq {INT} NOT NULL, batch_id {BLOB}, digest {BLOB} NOT NULL,
  prev_digest {BLOB}, created_ns {INT} NOT NULL, received_ns {INT} NOT NULL,
  stored {INT} NOT NULL, rejected {INT} NOT NULL, chain TEXT NOT NULL,
  PRIMARY KEY (producer_id, seq));
CREATE TABLE producers (
  producer_id TEXT PRIMARY KEY, first_seq {INT} NOT NULL, last_seq {INT} NOT NULL,
  batches {INT} NOT NULL, events {INT} NOT NULL, chain_breaks {INT} NOT NULL,
  first_received_ns {INT} NOT NULL, last_received_ns {INT} NOT NULL);
CREATE TABLE chain_events (
  id {SERIAL}, producer_id TEXT NOT NULL, seq {INT} NOT NULL, kind TEXT NOT NULL,
  expected {BLOB}, actual {BLOB}, received_ns {INT} NOT NULL);
CREATE INDEX chain_events_producer ON chain_events (producer_id, seq);
CREATE TABLE datasets (
  digest TEXT PRIMARY KEY, source TEXT NOT NULL, name TEXT NOT NULL,
  registered_ns {INT} NOT NULL);
CREATE TABLE commits (sha TEXT PRIMARY KEY, repo TEXT NOT NULL, registered_ns {INT} NOT NULL);
CREATE TABLE runs (
  run_id TEXT PRIMARY KEY, registry TEXT NOT NULL, name TEXT NOT NULL, url TEXT NOT NULL,
  params TEXT NOT NULL, metrics TEXT NOT NULL, tags TEXT NOT NULL, commit_sha TEXT NOT NULL,
  origin TEXT NOT NULL, registered_ns {INT} NOT NULL);
CREATE INDEX runs_commit ON runs (commit_sha);
CREATE TABLE run_datasets (
  run_id TEXT NOT NULL, digest TEXT NOT NULL, context TEXT NOT NULL,
  PRIMARY KEY (run_id, digest));
CREATE INDEX run_datasets_digest ON run_datasets (digest);
CREATE TABLE model_versions (
  name TEXT NOT NULL, version TEXT NOT NULL, registry TEXT NOT NULL, registry_id TEXT NOT NULL,
  artifact_digest TEXT NOT NULL, source TEXT NOT NULL, run_id TEXT NOT NULL,
  origin TEXT NOT NULL, registered_ns {INT} NOT NULL, PRIMARY KEY (name, version));
CREATE INDEX model_versions_run ON model_versions (run_id);
CREATE TABLE model_aliases (
  name TEXT NOT NULL, alias TEXT NOT NULL, version TEXT NOT NULL, PRIMARY KEY (name, alias));
CREATE TABLE images (digest TEXT PRIMARY KEY, name TEXT NOT NULL);
CREATE TABLE model_images (
  name TEXT NOT NULL, version TEXT NOT NULL, image_digest TEXT NOT NULL,
  PRIMARY KEY (name, version, image_digest));
CREATE INDEX model_images_image ON model_images (image_digest);
CREATE TABLE deployments (
  id TEXT PRIMARY KEY, service TEXT NOT NULL, namespace TEXT NOT NULL,
  started_ns {INT} NOT NULL, ended_ns {INT} NOT NULL, first_seen_ns {INT} NOT NULL,
  last_seen_ns {INT} NOT NULL, origin TEXT NOT NULL);
CREATE TABLE served (
  deployment_id TEXT NOT NULL, model_name TEXT NOT NULL, model_version TEXT NOT NULL,
  model_alias TEXT NOT NULL, image_digest TEXT NOT NULL, predictions {INT} NOT NULL,
  first_seen_ns {INT} NOT NULL, last_seen_ns {INT} NOT NULL,
  PRIMARY KEY (deployment_id, model_name, model_version, model_alias, image_digest));
CREATE INDEX served_model ON served (model_name, model_version);
CREATE INDEX served_image ON served (image_digest);
CREATE TABLE retention_runs (
  id {SERIAL}, started_ns {INT} NOT NULL, finished_ns {INT} NOT NULL, report TEXT NOT NULL);
"""

_PREDICTIONS: Final = """
CREATE TABLE predictions (
  id {SERIAL}, prediction_id TEXT NOT NULL, trace_id {BLOB}, span_id {BLOB},
  ts_ns {INT} NOT NULL, duration_ns {INT} NOT NULL, received_ns {INT} NOT NULL,
  producer_id TEXT NOT NULL, seq {INT} NOT NULL, model_name TEXT NOT NULL,
  model_version TEXT NOT NULL, model_alias TEXT NOT NULL, model_registry_id TEXT NOT NULL,
  model_digest TEXT NOT NULL, additional_models TEXT, deployment_id TEXT NOT NULL,
  service TEXT NOT NULL, namespace TEXT NOT NULL, pod TEXT NOT NULL, node TEXT NOT NULL,
  image_digest TEXT NOT NULL, image_name TEXT NOT NULL, endpoint TEXT NOT NULL,
  protocol TEXT NOT NULL, status {INT} NOT NULL, status_code TEXT NOT NULL,
  error_type TEXT NOT NULL, input_fingerprint {BLOB}, output_label TEXT,
  output_score {REAL}, output_value {REAL}, features TEXT, attributes TEXT,
  sampled {INT} NOT NULL){PARTITION};
CREATE INDEX predictions_trace ON predictions (trace_id);
CREATE INDEX predictions_pid ON predictions (prediction_id);
CREATE INDEX predictions_model ON predictions (model_name, model_version, deployment_id, ts_ns);
CREATE INDEX predictions_received ON predictions (received_ns);
"""

# No query reads predictions by (model, version, deployment, time) yet, and
# that index was a large share of SQLite's cost per stored row (random inserts into
# a long text key): an index earns its place when a query needs it.
_V2_NO_MODEL_INDEX: Final = "DROP INDEX IF EXISTS predictions_model;"

# When an alias was last moved to another version (0: never moved since it was
# first registered). A prediction that names only an alias and is older than
# the move was served by an earlier version, which the store cannot name.
_V3_ALIAS_MOVED: Final = "ALTER TABLE model_aliases ADD COLUMN moved_ns {INT} NOT NULL DEFAULT 0;"

# A model version's run link made by a source whose run id is its own
# (OpenLineage's runId), not the registry's: provisional while the version's
# ``run_id`` still is this one. A registration that is the authority on the
# run (the CI hook's, MLflow's) replaces it without a conflict and drops the row.
# Links stored before: those whose run only OpenLineage registered.
_V4_PROVISIONAL_RUNS: Final = """
CREATE TABLE IF NOT EXISTS provisional_runs (
  name TEXT NOT NULL, version TEXT NOT NULL, run_id TEXT NOT NULL,
  PRIMARY KEY (name, version));
INSERT INTO provisional_runs (name, version, run_id)
  SELECT v.name, v.version, v.run_id FROM model_versions v JOIN runs r ON r.run_id = v.run_id
  WHERE r.origin = 'openlineage' AND v.run_id <> ''
  ON CONFLICT (name, version) DO NOTHING;
"""

MIGRATIONS: Final[tuple[tuple[int, str], ...]] = (
    (1, _V1_TABLES + _PREDICTIONS),
    (2, _V2_NO_MODEL_INDEX),
    (3, _V3_ALIAS_MOVED),
    (4, _V4_PROVISIONAL_RUNS),
)


def render(template: str, dialect: Dialect) -> list[str]:
    """The statements of one migration for ``dialect``."""
    types = dict(_TYPES[dialect])
    types["PARTITION"] = " PARTITION BY RANGE (received_ns)" if dialect == "postgres" else ""
    text = template.format(**types)
    return [stmt.strip() for stmt in text.split(";") if stmt.strip()]


MIGRATIONS_TABLE: Final = (
    "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_ns {INT})"
)
