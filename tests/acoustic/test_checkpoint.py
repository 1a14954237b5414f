"""Strict state-dict checks name every difference."""

import pytest
import torch

from cosyvoice.acoustic.checkpoint import check_state, read_state_dict


def test_check_state_names_missing_unexpected_and_mismatched():
    expected = {"a": torch.zeros(2), "b": torch.zeros(3), "c": torch.zeros(1)}
    with pytest.raises(ValueError) as err:
        check_state({"a": torch.zeros(4), "c": 7, "z": torch.zeros(1)}, expected, "f.pt")
    text = str(err.value)
    assert "missing keys 1: b" in text and "unexpected keys 1: z" in text
    assert "a: file (4,), model (2,)" in text and "c: file int (not a tensor)" in text
    check_state({k: v.clone() for k, v in expected.items()}, expected, "ok.pt")


def test_read_state_dict_refuses_pickled_objects(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(1), "x": ValueError("x")}, path)
    with pytest.raises(ValueError, match="weights_only"):
        read_state_dict(str(path), "flow")
    with pytest.raises(FileNotFoundError):
        read_state_dict(str(tmp_path / "none.pt"), "flow")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="expected a state dict"):
        read_state_dict(str(tmp_path / "list.pt"), "flow")
