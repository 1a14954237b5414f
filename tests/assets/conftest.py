"""Fixtures the asset tests share with the library tests they mirror."""

from tests.train.conftest import qwen_dir  # noqa: F401  (the training assets run the tiny recipe with it)
