#!/bin/sh
# The postgres image creates $POSTGRES_DB (MLflow's); this adds Prefect's on the first start.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
  -c "CREATE DATABASE \"$PREFECT_DB\" OWNER \"$POSTGRES_USER\""
