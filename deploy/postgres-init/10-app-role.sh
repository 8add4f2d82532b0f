#!/usr/bin/env bash
# Creates the app's database role (APP_DB_USER, default chatkit_app) with only the rights
# row-level security needs, by running sql/app-role.sql beside this file (docs/rls.md).
#
# docker compose mounts this folder at /docker-entrypoint-initdb.d/ of the postgres service: the
# official image runs it once, on the first start with an empty data volume, before the
# `migrate` service creates the tables. It connects like the image's own init steps: psql as
# POSTGRES_USER (the owner of the tables, who runs the migrations) to POSTGRES_DB, over the
# Unix socket unless PGHOST says otherwise. The password comes from APP_DB_PASSWORD in the
# environment (never on a command line).
#
# Running it again is safe (it sets the password and the grants again), e.g. to create the role
# in a volume initialised before this script existed, or to change its password:
#
#   docker compose up -d postgres     # so the container has the current APP_DB_PASSWORD
#   docker compose exec postgres /docker-entrypoint-initdb.d/10-app-role.sh
#
# The image executes this file when it is executable and sources it otherwise: the work runs
# in a subshell, so either way nothing (options, variables) leaks into the image's entrypoint.

chatkit_create_app_role() (
	set -Eeuo pipefail
	: "${APP_DB_PASSWORD:?set APP_DB_PASSWORD: the password of the app role}"
	export APP_DB_PASSWORD
	local_user="${POSTGRES_USER:-postgres}"
	sql_file="$(dirname -- "${BASH_SOURCE[0]}")/sql/app-role.sql"
	psql --no-psqlrc --no-password \
		--set ON_ERROR_STOP=1 \
		--username "$local_user" \
		--dbname "${POSTGRES_DB:-$local_user}" \
		--set app_role="${APP_DB_USER:-chatkit_app}" \
		--set owner_role="$local_user" \
		--file "$sql_file"
)

chatkit_create_app_role
