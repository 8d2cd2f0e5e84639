#!/bin/sh
# docker-entrypoint-initdb.d hook (first start of an empty data directory only): creates the
# per-service owner and runtime roles and schemas from deploy/postgres/roles.sql with passwords from the environment.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
  -v db="$POSTGRES_DB" \
  -v intake_password="${POSTGRES_INTAKE_PASSWORD:?}" \
  -v referral_password="${POSTGRES_REFERRAL_PASSWORD:?}" \
  -v notifications_password="${POSTGRES_NOTIFICATIONS_PASSWORD:?}" \
  -v intake_app_password="${POSTGRES_INTAKE_APP_PASSWORD:?}" \
  -v referral_app_password="${POSTGRES_REFERRAL_APP_PASSWORD:?}" \
  -v notifications_app_password="${POSTGRES_NOTIFICATIONS_APP_PASSWORD:?}" \
  -f /deploy/postgres/roles.sql
