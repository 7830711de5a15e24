# Install a real MLflow tracking server for the registry tests (sourced by
# tests/run). It lives in its own virtualenv so its pins never touch
# predtrace's; the tests start and stop `mlflow server` themselves.
# Exports PREDTRACE_TEST_MLFLOW (the mlflow executable).

install_mlflow() {
  local venv=$ROOT/.cache/mlflow-venv
  if [[ ! -x $venv/bin/mlflow ]]; then
    echo "installing mlflow into $venv"
    mkdir -p "$ROOT/.cache"
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
    "$venv/bin/python" -m pip install --quiet mlflow 2>&1 | grep -v '^WARNING: Location' || true
    [[ -x $venv/bin/mlflow ]] || { echo "could not install mlflow" >&2; return 1; }
  fi
  export PREDTRACE_TEST_MLFLOW=$venv/bin/mlflow
  echo "mlflow: $("$venv/bin/mlflow" --version 2>/dev/null | tail -n 1)"
}
