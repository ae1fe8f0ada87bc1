{#-
One Q-Probe DVC stage at an exact commit, on whatever machine runs this: a Kubernetes pod
(infra/k8s/stage-job.yaml) or a SkyPilot node (infra/skypilot/stage.yaml). A Jinja template that
qprobe.launch renders into both (it fills `install`). It reads QPROBE_REPO, QPROBE_COMMIT,
QPROBE_STAGE and QPROBE_WORKDIR, and takes the S3 remote (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_ENDPOINT_URL for a non-AWS S3) and MLflow (MLFLOW_TRACKING_URI, ...) from the environment that
the cluster's secrets provide.
-#}
set -euo pipefail
export DO_NOT_TRACK=true DVC_NO_ANALYTICS=1 MLFLOW_DISABLE_TELEMETRY=true HF_HUB_DISABLE_TELEMETRY=1
export PREFECT_SERVER_ANALYTICS_ENABLED=false

if [ ! -d "$QPROBE_WORKDIR/.git" ]; then
  git clone --quiet "$QPROBE_REPO" "$QPROBE_WORKDIR"
fi
cd "$QPROBE_WORKDIR"
# A commit that no branch head names yet is fetched by its hash (servers allow it for reachable ones).
git fetch --quiet origin "$QPROBE_COMMIT" 2>/dev/null || git fetch --quiet origin
git checkout --quiet --detach "$QPROBE_COMMIT"
{{ install }}

# The stage's inputs are the outputs of the stages upstream of it; what was never pushed is
# rebuilt by nobody here, so a missing upstream output fails in `dvc repro`, naming the file.
dvc pull --with-deps --allow-missing "$QPROBE_STAGE"
dvc repro --single-item "$QPROBE_STAGE"
dvc push "$QPROBE_STAGE"

# The caller records this stage's lock entry (`qprobe launch ... --write-lock`) and pulls the outputs.
echo "----- BEGIN dvc.lock -----"
cat dvc.lock
echo "----- END dvc.lock -----"
