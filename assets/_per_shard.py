"""What the per-shard assets (``speaker_embeddings``, ``speech_tokens``, ``parquet_shards``) share:
multi-shard backfill runs, transient-only retries, the failure budget and per-run check results."""


import dagster as dg
from pydantic import Field

from cosyvoice.corpus.checks import DEFAULT_MAX_FAILED_FRACTION
from pipelines.instance import positive_int_env
from pipelines.retries import transient_retry_policy


def shards_per_run() -> int:
    """``COSYVOICE_SHARDS_PER_RUN`` (default 8). The control plane pays per run, not per shard (measured by
    bench/control_plane.py: about a second of daemon CPU and a hundred PostgreSQL connections per run), so
    a corpus of tens of thousands of shards raises it: 100 at 50k shards gives 500 runs."""
    return positive_int_env("COSYVOICE_SHARDS_PER_RUN", 8, "shards per backfill run")


#: a backfill loads each model once per run of this many shards (one run takes all three per-shard assets)
SHARDS_PER_RUN = shards_per_run()
BACKFILL = dg.BackfillPolicy.multi_run(SHARDS_PER_RUN)
RETRY = transient_retry_policy()  # bodies are wrapped in retry_transient_only: bad data is not retried
#: checks that fail the step (and so hold back what depends on it) when they fail
BLOCKING_CHECKS = frozenset({"failure_budget"})
#: quarantined utterances listed per shard in the metadata (all of them are in the shard's .failed.tsv)
LISTED_PER_SHARD = 20


def budget_field():
    return Field(default=DEFAULT_MAX_FAILED_FRACTION, ge=0.0, le=1.0, description=(
        "Failure budget: the blocking check `failure_budget` fails when more than this fraction of a "
        "shard's utterances is missing from the output (quarantined with a reason or unaccounted). "
        "0.01 = 1 %; 0 tolerates no failure."))


def shard_report(budget, failures_url: str, quarantined: list[str]) -> dict:
    """Per-shard metadata: the counts the budget check measured and the first quarantined utterances."""
    return {**budget.metadata, "quarantine_file": failures_url, "quarantined_utterances": quarantined[:LISTED_PER_SHARD]}


def add_shard_metadata(context: dg.AssetExecutionContext, shard: str, report: dict) -> None:
    """``report`` on ``shard``'s own materialization. Metadata of the run's result would be copied into every
    partition's event: a run of B shards carrying all B reports writes B x B entries (bench/control_plane.py
    ``--metadata``), which at 100 shards per run is most of PostgreSQL's growth."""
    context.add_asset_metadata({key: dg.MetadataValue.json(value) if isinstance(value, (dict, list)) else value
                                for key, value in report.items()}, partition_key=shard)


def log_run_totals(context: dg.AssetExecutionContext, reports: dict[str, dict], keys: tuple[str, ...]) -> None:
    """One line with the run's totals over its shards (each shard's figures are on its own partition)."""
    totals = {key: round(sum(r.get(key) or 0 for r in reports.values()), 5) for key in keys}
    context.log.info(f"{len(reports)} shard(s): " + ", ".join(f"{k} {v}" for k, v in totals.items()))


def check_specs(asset: str, checks: tuple[str, ...]) -> list[dg.AssetCheckSpec]:
    return [dg.AssetCheckSpec(n, asset=asset, blocking=n in BLOCKING_CHECKS) for n in checks]


def check_result(name: str, rows: list) -> dg.AssetCheckResult:
    """One evaluation of ``name`` over the run's shards (``rows``: ``(shard, CheckOutcome)``)."""
    metadata = {"failing_shards": dg.MetadataValue.json({s: r.detail for s, r in rows if not r.passed}),
                "examples": dg.MetadataValue.json([e for _, r in rows for e in r.examples][:20])}
    if name == "failure_budget":
        metadata["per_shard"] = dg.MetadataValue.json({s: r.metadata for s, r in rows})
    return dg.AssetCheckResult(check_name=name, passed=all(r.passed for _, r in rows), metadata=metadata)
