-- Two login roles per service, and neither reaches another service's schema:
--   <service>      owns the schema and runs the migrations (DATABASE_MIGRATION_URL);
--   <service>_app  the runtime role of DATABASE_URL: reads and writes the tables, creates and
--                  drops nothing, and may only INSERT into intake.audit (it cannot update,
--                  delete or truncate audit rows, nor drop the trigger that forbids it); on the
--                  history tables it may only add rows (and read them back where the service
--                  shows them): referral.referral_history and intake.case_events (SELECT,
--                  INSERT; intake may clear case_events.note_ciphertext, which erasure does),
--                  notifications.delivery_attempts (INSERT).
-- Run once as the database owner (docker-compose: deploy/postgres/initdb/10-roles.sh; managed
-- PostgreSQL: `psql -v intake_password=... -v intake_app_password=... -v referral_password=...
--   -v referral_app_password=... -v notifications_password=... -v notifications_app_password=...
--   -v db=clms -f deploy/postgres/roles.sql`). Idempotent: re-running rotates the passwords.
-- analytics keeps its state in faust tables (Kafka changelogs) and has no database role.
\set ON_ERROR_STOP on

-- Nobody may use the public schema; only the roles below may create schemas.
REVOKE CREATE ON DATABASE :"db" FROM PUBLIC;
REVOKE ALL ON SCHEMA public FROM PUBLIC;

SELECT format('CREATE ROLE %I LOGIN', r)
  FROM unnest(ARRAY['intake', 'referral', 'notifications', 'intake_app', 'referral_app', 'notifications_app']) AS r
 WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r)
\gexec

ALTER ROLE intake        WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS
  CONNECTION LIMIT 50 PASSWORD :'intake_password';
ALTER ROLE referral      WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS
  CONNECTION LIMIT 50 PASSWORD :'referral_password';
ALTER ROLE notifications WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS
  CONNECTION LIMIT 50 PASSWORD :'notifications_password';
ALTER ROLE intake_app        WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS
  CONNECTION LIMIT 100 PASSWORD :'intake_app_password';
ALTER ROLE referral_app      WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS
  CONNECTION LIMIT 100 PASSWORD :'referral_app_password';
ALTER ROLE notifications_app WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS
  CONNECTION LIMIT 100 PASSWORD :'notifications_app_password';

GRANT CONNECT, TEMPORARY ON DATABASE :"db" TO intake, referral, notifications,
  intake_app, referral_app, notifications_app;
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
ALTER ROLE intake_app        SET search_path = intake;
ALTER ROLE referral_app      SET search_path = referral;
ALTER ROLE notifications_app SET search_path = notifications;

-- The runtime roles: data rights on what the owner creates, no right to create, alter or drop.
GRANT USAGE ON SCHEMA intake TO intake_app;
GRANT USAGE ON SCHEMA referral TO referral_app;
GRANT USAGE ON SCHEMA notifications TO notifications_app;
ALTER DEFAULT PRIVILEGES FOR ROLE intake IN SCHEMA intake
  GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO intake_app;
ALTER DEFAULT PRIVILEGES FOR ROLE intake IN SCHEMA intake GRANT USAGE, SELECT ON SEQUENCES TO intake_app;
ALTER DEFAULT PRIVILEGES FOR ROLE referral IN SCHEMA referral
  GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO referral_app;
ALTER DEFAULT PRIVILEGES FOR ROLE referral IN SCHEMA referral GRANT USAGE, SELECT ON SEQUENCES TO referral_app;
ALTER DEFAULT PRIVILEGES FOR ROLE notifications IN SCHEMA notifications
  GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO notifications_app;
ALTER DEFAULT PRIVILEGES FOR ROLE notifications IN SCHEMA notifications
  GRANT USAGE, SELECT ON SEQUENCES TO notifications_app;
-- Tables migrated before this file ran (an upgrade): the same rights, then the audit trail
-- back to INSERT only (intake migration 003 does the same for a new database).
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA intake TO intake_app;
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA intake TO intake_app;
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA referral TO referral_app;
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA referral TO referral_app;
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA notifications TO notifications_app;
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA notifications TO notifications_app;
SELECT 'REVOKE ALL ON intake.audit FROM intake_app; GRANT INSERT ON intake.audit TO intake_app'
 WHERE to_regclass('intake.audit') IS NOT NULL
\gexec
-- The history tables back to INSERT (+ SELECT where the service reads them back) too: intake
-- migration 031, referral migration 002, notifications migration 003 do the same for a new database.
SELECT 'REVOKE ALL ON intake.case_events FROM intake_app; '
       'GRANT SELECT, INSERT, UPDATE (note_ciphertext) ON intake.case_events TO intake_app'
 WHERE EXISTS (SELECT 1 FROM pg_attribute
                WHERE attrelid = to_regclass('intake.case_events') AND attname = 'note_ciphertext')
\gexec
SELECT 'REVOKE ALL ON referral.referral_history FROM referral_app; '
       'GRANT SELECT, INSERT ON referral.referral_history TO referral_app'
 WHERE to_regclass('referral.referral_history') IS NOT NULL
\gexec
SELECT 'REVOKE ALL ON notifications.delivery_attempts FROM notifications_app; '
       'GRANT INSERT ON notifications.delivery_attempts TO notifications_app'
 WHERE to_regclass('notifications.delivery_attempts') IS NOT NULL
\gexec
