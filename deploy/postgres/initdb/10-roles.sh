#!/bin/sh
# docker-entrypoint-initdb.d hook (first start of an empty data directory only): creates the
# per-service roles and schemas from deploy/postgres/roles.sql with passwords from the environment.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
  -v db="$POSTGRES_DB" \
  -v intake_password="${POSTGRES_INTAKE_PASSWORD:?}" \
  -v referral_password="${POSTGRES_REFERRAL_PASSWORD:?}" \
  -v notifications_password="${POSTGRES_NOTIFICATIONS_PASSWORD:?}" \
  -f /deploy/postgres/roles.sql
