"""map_nested_tensor, key_average, unwrap, flatten helpers."""

from __future__ import annotations

import math
from collections import OrderedDict, defaultdict, namedtuple

import pytest
import torch
from torch import nn

from mini_trainer import key_average, map_nested_tensor, unwrap
from mini_trainer.utils import flatten_dict, unflatten_dict

Pair = namedtuple("Pair", "a b")


def test_map_nested_tensor_preserves_containers():
    data = {
        "x": torch.ones(2),
        "list": [torch.zeros(1), "text", 3],
        "tuple": (torch.ones(1),),
        "pair": Pair(torch.ones(1), None),
        "ordered": OrderedDict(k=torch.ones(1)),
        "default": defaultdict(list, k=torch.ones(1)),
    }
    out = map_nested_tensor(lambda t: t * 2, data)
    assert torch.equal(out["x"], torch.full((2,), 2.0))
    assert out["list"][1:] == ["text", 3] and torch.equal(out["list"][0], torch.zeros(1))
    assert isinstance(out["tuple"], tuple)
    assert isinstance(out["pair"], Pair) and out["pair"].b is None and out["pair"].a.item() == 2
    assert isinstance(out["ordered"], OrderedDict)
    assert isinstance(out["default"], defaultdict) and out["default"]["missing"] == []
    assert data["x"].sum() == 2  # input untouched


def test_key_average_nested_missing_keys_and_nan():
    records = [
        {"loss": 0.5, "m": {"acc": 0.9}},
        {"loss": torch.tensor(0.6), "m": {"acc": 0.85, "f1": 0.5}},
        {"loss": float("nan"), "m": {"acc": torch.tensor(float("nan"))}},
    ]
    assert key_average(records) == {"loss": pytest.approx(0.55), "m": {"acc": pytest.approx(0.875), "f1": 0.5}}
    assert math.isnan(key_average([{"a": float("nan")}])["a"])
    assert key_average([]) == {}
    assert key_average([{"flag": True}, {"flag": False}]) == {"flag": 0.5}


def test_key_average_of_many_tensors_stays_exact():
    values = torch.arange(1000, dtype=torch.float32)
    assert key_average({"v": v} for v in values)["v"] == pytest.approx(499.5)


def test_flatten_round_trip():
    nested = {"a": {"b": 1, "c": {"d": 2}}, "e": 3}
    assert flatten_dict(nested) == {"a.b": 1, "a.c.d": 2, "e": 3}
    assert unflatten_dict(flatten_dict(nested)) == nested


def test_unwrap_peels_compile_and_averaged_model():
    base = nn.Linear(2, 2)
    averaged = torch.optim.swa_utils.AveragedModel(base)
    assert unwrap(averaged) is averaged.module
    compiled = torch.compile(base, backend="eager")
    assert unwrap(compiled) is base
