"""Stevedore benchmark helpers (stdlib only)."""
