"""Alembic migrations for the control plane's schema (SQLite and PostgreSQL from one set)."""
