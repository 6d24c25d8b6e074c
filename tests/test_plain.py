"""mini_trainer.plain: the one rule for values that leave the process (stream collect,
metrics.jsonl, W&B): 0-d tensors and numpy scalars become Python numbers."""

from __future__ import annotations

import json
import math
from collections import namedtuple

import numpy as np
import torch

from mini_trainer.plain import json_safe, to_plain


def test_to_plain_converts_scalars_and_keeps_structure():
    Pair = namedtuple("Pair", "a b")
    converted = to_plain({"loss": torch.tensor(0.5), "n": np.int64(3), "pair": Pair(torch.tensor(1), "x")})
    assert converted == {"loss": 0.5, "n": 3, "pair": Pair(1, "x")}
    assert type(converted["loss"]) is float and type(converted["n"]) is int and type(converted["pair"]) is Pair


def test_to_plain_returns_the_same_object_when_nothing_changes():
    event = {"step": 1, "records": [1.0, "a"], "model": torch.nn.Linear(1, 1)}
    assert to_plain(event) is event
    vector = torch.ones(3)  # not a scalar: left as it is
    assert to_plain(vector) is vector


def test_json_safe_writes_strict_json():
    value = {1: (torch.tensor(float("nan")), np.float32(0.25)), "inf": float("inf"), "obj": object}
    safe = json_safe(value)
    assert safe == {"1": [None, 0.25], "inf": None, "obj": str(object)}
    json.dumps(safe, allow_nan=False)  # raises on NaN/inf
    text = json_safe([math.inf, -math.inf, torch.tensor(math.nan)], non_finite_as_text=True)
    assert text == ["inf", "-inf", "nan"]
