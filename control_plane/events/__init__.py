"""In-process fan-out of a workspace's event log to Watch subscribers."""
