-- chatkit-pg: the app's own database role, so that row-level security applies to the app
-- (docs/rls.md). The role may log in and read and write rows, nothing else: it is not a
-- superuser, does not bypass row-level security, owns nothing, and has SELECT, INSERT, UPDATE
-- and DELETE on the owner's tables in schema public (and USAGE on its sequences): on those that
-- exist now and, through default privileges, on every table a later migration creates.
--
-- Run it with psql, connected to the app's database as the role that runs the migrations (the
-- owner of the tables) or as a superuser. It runs in one transaction, and running it again is
-- safe: it sets the password and grants again, e.g. to change the password.
--
--   APP_DB_PASSWORD='...' psql "postgresql://chatkit@db.example.com:5432/chatkit" \
--       -f deploy/postgres-init/sql/app-role.sql
--
-- psql variables (-v name=value), all optional:
--   app_password  the role's password; default: the environment variable APP_DB_PASSWORD
--   app_role      the role's name; default chatkit_app
--   owner_role    the role that runs the migrations; default: the role psql connected as
--
-- docker compose runs this file on PostgreSQL's first start, from
-- deploy/postgres-init/10-app-role.sh. docs/rls.md quotes it verbatim.

\set ON_ERROR_STOP on

\if :{?app_role}
\else
    \set app_role chatkit_app
\endif
\if :{?owner_role}
\else
    SELECT current_user AS owner_role \gset
\endif
\if :{?app_password}
\else
    \getenv app_password APP_DB_PASSWORD
\endif
\if :{?app_password}
\else
    \set app_password ''
\endif
SELECT :'app_password' = '' AS app_password_missing,
       NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'owner_role') AS owner_role_missing \gset
\if :app_password_missing
DO $$ BEGIN RAISE EXCEPTION 'no password for the app role: set APP_DB_PASSWORD or psql -v app_password=...'; END $$;
\endif
\if :owner_role_missing
DO $$ BEGIN RAISE EXCEPTION 'the owner role (psql -v owner_role=...) does not exist'; END $$;
\endif

BEGIN;

-- The role: created once, its password set on every run.
SELECT NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'app_role') AS app_role_is_new \gset
\if :app_role_is_new
CREATE ROLE :"app_role" LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE NOREPLICATION;
\endif
ALTER ROLE :"app_role" WITH LOGIN PASSWORD :'app_password';

GRANT CONNECT ON DATABASE :"DBNAME" TO :"app_role";
GRANT USAGE ON SCHEMA public TO :"app_role";

-- Tables and sequences the owner creates from now on (every later migration).
ALTER DEFAULT PRIVILEGES FOR ROLE :"owner_role" IN SCHEMA public
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO :"app_role";
ALTER DEFAULT PRIVILEGES FOR ROLE :"owner_role" IN SCHEMA public
    GRANT USAGE ON SEQUENCES TO :"app_role";

-- Tables and sequences the owner already has (when this runs after the migrations), with
-- exactly these rights: any other grant to the role on them is revoked.
SELECT format('REVOKE ALL ON TABLE %s FROM %I', c.oid::regclass, :'app_role'),
       format('GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE %s TO %I', c.oid::regclass, :'app_role')
FROM pg_class c
JOIN pg_roles o ON o.oid = c.relowner
WHERE c.relnamespace = 'public'::regnamespace
  AND c.relkind IN ('r', 'p')
  AND o.rolname = :'owner_role'
ORDER BY c.relname
\gexec
SELECT format('REVOKE ALL ON SEQUENCE %s FROM %I', c.oid::regclass, :'app_role'),
       format('GRANT USAGE ON SEQUENCE %s TO %I', c.oid::regclass, :'app_role')
FROM pg_class c
JOIN pg_roles o ON o.oid = c.relowner
WHERE c.relnamespace = 'public'::regnamespace
  AND c.relkind = 'S'
  AND o.rolname = :'owner_role'
ORDER BY c.relname
\gexec

-- Read by the checks below (PL/pgSQL cannot see psql variables).
SET LOCAL chatkit_setup.app_role = :'app_role';
SET LOCAL chatkit_setup.owner_role = :'owner_role';

-- Refuse (and roll everything back) if the role could escape row-level security: a role that
-- already existed with more rights, owns something, can act as the owner, or may create
-- objects in schema public (PostgreSQL 14 and older allow that to every role by default).
DO $$
DECLARE
    app_role text := current_setting('chatkit_setup.app_role');
    owner_role text := current_setting('chatkit_setup.owner_role');
    r pg_roles%ROWTYPE;
BEGIN
    SELECT * INTO STRICT r FROM pg_roles WHERE rolname = app_role;
    IF r.rolsuper OR r.rolbypassrls OR r.rolcreaterole OR r.rolcreatedb OR r.rolreplication THEN
        RAISE EXCEPTION 'role "%" has SUPERUSER, BYPASSRLS, CREATEROLE, CREATEDB or REPLICATION', app_role
            USING HINT = 'It existed before: ALTER ROLE it NOSUPERUSER NOBYPASSRLS NOCREATEROLE '
                         'NOCREATEDB NOREPLICATION as a superuser, or choose another name.';
    END IF;
    IF EXISTS (SELECT FROM pg_shdepend WHERE refclassid = 'pg_authid'::regclass
                                         AND refobjid = r.oid AND deptype = 'o') THEN
        RAISE EXCEPTION 'role "%" owns objects', app_role
            USING HINT = format('REASSIGN OWNED BY %I TO %I in each database.', app_role, owner_role);
    END IF;
    IF pg_has_role(r.oid, owner_role, 'USAGE') THEN
        RAISE EXCEPTION 'role "%" has the rights of the owner "%"', app_role, owner_role
            USING HINT = format('REVOKE %I FROM %I.', owner_role, app_role);
    END IF;
    IF has_schema_privilege(r.oid, 'public', 'CREATE') THEN
        RAISE EXCEPTION 'role "%" may create objects in schema public', app_role
            USING HINT = 'REVOKE CREATE ON SCHEMA public FROM PUBLIC (the default since '
                         'PostgreSQL 15), and from the role itself.';
    END IF;
END
$$;

COMMIT;
