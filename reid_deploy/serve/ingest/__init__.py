"""Ingest: DeepStream message-broker payloads into the served gallery (payload parsing, broker consumers)."""
