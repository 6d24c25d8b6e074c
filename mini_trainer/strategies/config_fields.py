"""Strategy settings given as trainer keywords: which keywords belong to the config dataclass.

A strategy trainer takes its settings either as one config object (`PhaseConfig`,
`SpelaConfig`) or as plain keywords mixed with BaseTrainer's (`PhaseTrainer(max_steps=100,
full_steps=5)`); this splits the two.
"""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["pop_config_fields"]


def pop_config_fields(config_type: type, kwargs: dict[str, Any], *, shared: tuple[str, ...] = ()) -> dict[str, Any]:
    """Remove the keywords that are fields of the dataclass `config_type` from `kwargs` and
    return them, in the order given. Names in `shared` (fields the trainer takes too, such
    as `seed`) stay in `kwargs` and are not returned: each trainer decides whether its
    config also gets them."""
    names = {f.name for f in dataclasses.fields(config_type)} - set(shared)
    return {k: kwargs.pop(k) for k in list(kwargs) if k in names}
