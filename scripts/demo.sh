#!/usr/bin/env bash
# make demo: the whole pipeline on the embedded defaults (local Spark, 2 Horovod workers over Gloo, MLflow on
# SQLite under ./var) as the Databricks-format workflow: ingest -> train -> evaluate (promotion gate)
# -> infer when there is a champion. Arguments after the first (CONF) go to `workflow run` as they are: `make photos`
# passes the photos profile and the folder.
set -euo pipefail
cd "$(dirname "$0")/.."
CONF="${1:-conf/local.yaml}"
shift || true
RESULT=$(mktemp)
trap 'rm -f "$RESULT"' EXIT
if ! sparkvision workflow run jobs/workflows/fashion_mnist.yaml --conf "$CONF" "$@" >"$RESULT"; then
  echo "demo: the workflow failed (see the task log named above)" >&2
  exit 1
fi
# The UI command names every --conf the workflow ran with (a profile may name another experiment).
CONFS=(--conf "$CONF")
ARGS=("$@")
for ((i = 0; i < ${#ARGS[@]}; i++)); do
  [ "${ARGS[i]}" = "--conf" ] && [ $((i + 1)) -lt ${#ARGS[@]} ] && CONFS+=(--conf "${ARGS[i + 1]}")
done
python - "$RESULT" "${CONFS[*]}" <<'PY'
import json, sys
run = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
t = {k: v["values"] for k, v in run["tasks"].items()}
ev = t["evaluate"]
print()
print(f"test accuracy:     {ev['metrics']['accuracy']:.4f} on {ev['rows']} images of {ev['dataset']} "
      f"(model version {ev['model_version']}: {ev['decision']})")
print(f"dataset:           {t['ingest']['path']}")
print(f"model:             {t['train']['model_uri']} (run {t['train']['run_id']})")
if t.get("infer"):
    print(f"predictions:       {t['infer']['output']} ({t['infer']['rows_scored']} rows)")
else:
    print(f"predictions:       none: {run['tasks']['infer'].get('reason', 'infer did not run')} (no champion yet)")
print(f"workflow run:      {run['run_id']} (sparkvision workflow runs)")
print(f"MLflow UI:         sparkvision ui {sys.argv[2]}   (it prints the page of the training runs)")
PY
