"""Parquet shards in the upstream ``make_parquet_list.py`` format and the data lists that index them."""
