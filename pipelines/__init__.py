"""Dagster wiring: partitions, resources, jobs and the Definitions object."""
