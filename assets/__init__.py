"""Thin Dagster assets, one module per stage: read config/resources, call cosyvoice.*, report."""
