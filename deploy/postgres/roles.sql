-- One login role per service; each owns exactly one schema and can reach nothing else.
-- Run once as the database owner (docker-compose: deploy/postgres/initdb/10-roles.sh; managed
-- PostgreSQL: `psql -v intake_password=... -v referral_password=... -v notifications_password=...
--   -v db=clms -f deploy/postgres/roles.sql`). Idempotent: re-running rotates the passwords.
-- analytics keeps its state in faust tables (Kafka changelogs) and has no database role.
\set ON_ERROR_STOP on

-- Nobody may use the public schema; only the roles below may create schemas.
REVOKE CREATE ON DATABASE :"db" FROM PUBLIC;
REVOKE ALL ON SCHEMA public FROM PUBLIC;

SELECT format('CREATE ROLE %I LOGIN', r) FROM unnest(ARRAY['intake', 'referral', 'notifications']) AS r
 WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r)
\gexec

ALTER ROLE intake        WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS
  CONNECTION LIMIT 50 PASSWORD :'intake_password';
ALTER ROLE referral      WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS
  CONNECTION LIMIT 50 PASSWORD :'referral_password';
ALTER ROLE notifications WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS
  CONNECTION LIMIT 50 PASSWORD :'notifications_password';

GRANT CONNECT, TEMPORARY ON DATABASE :"db" TO intake, referral, notifications;
-- No CREATE on the database: the schemas are created here, owned by their service, and
-- shared.db.migrate only creates a schema when pg_namespace does not have it yet.
REVOKE CREATE ON DATABASE :"db" FROM PUBLIC;

CREATE SCHEMA IF NOT EXISTS intake        AUTHORIZATION intake;
CREATE SCHEMA IF NOT EXISTS referral      AUTHORIZATION referral;
CREATE SCHEMA IF NOT EXISTS notifications AUTHORIZATION notifications;
ALTER SCHEMA intake        OWNER TO intake;
ALTER SCHEMA referral      OWNER TO referral;
ALTER SCHEMA notifications OWNER TO notifications;
REVOKE ALL ON SCHEMA intake, referral, notifications FROM PUBLIC;

-- Each role finds its own tables first and nothing else.
ALTER ROLE intake        SET search_path = intake;
ALTER ROLE referral      SET search_path = referral;
ALTER ROLE notifications SET search_path = notifications;
