-- Run once, when the PostgreSQL volume is first initialised (the image's /docker-entrypoint-initdb.d):
-- the servers' inspection log gets a database of its own beside MLflow's (each keeps its own Alembic
-- version table, so they cannot share one).
CREATE DATABASE inspections;
