"""Fixtures the asset tests share with the library tests they mirror."""

import shutil

import pytest

from tests.train.conftest import qwen_dir  # noqa: F401  (the training assets run the tiny recipe with it)


@pytest.fixture(scope="module")
def data_root(training_list, tmp_path_factory) -> str:
    """A data root whose train.data.list and cv.data.list both list the training fixture's shards."""
    root = tmp_path_factory.mktemp("store")
    shutil.copy(training_list, root / "train.data.list")
    shutil.copy(training_list, root / "cv.data.list")
    return str(root)
