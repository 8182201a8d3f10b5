"""Persistence: schema, database engines, durable job queue, file store and audit trail."""
