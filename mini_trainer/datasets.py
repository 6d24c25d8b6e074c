"""Real data that ships with a package, so every example runs offline.

`digits_loaders` uses scikit-learn's bundled 8x8 handwritten digits (1797 images, 10
classes; install the `examples` extra). Features are standardised with statistics of the
training split only, and the splits are stratified and seeded. `val_fraction` holds out a
validation split from the training data (for evaluation during training and choosing the
best checkpoint), so the test split stays untouched until the end.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

from .builder import REGISTRY
from .data import stateful_loader
from .utils import check_int, check_number


def load_digits_tensors(
    test_fraction: float = 0.2, seed: int = 0, val_fraction: float = 0.0
) -> dict[str, TensorDataset]:
    """`{"train": TensorDataset(x, y), "test": ...}` with x float32 of shape (n, 64), plus
    "val" (`val_fraction` of the training part) when `val_fraction` > 0."""
    check_number("test_fraction", test_fraction, positive=True)
    if not test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1); got {test_fraction!r}")
    check_number("val_fraction", val_fraction)
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1); got {val_fraction!r}")
    check_int("seed", seed)
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the digits data set needs scikit-learn: pip install 'mini_trainer[examples]'"
        ) from err
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    held_out = {"test": (x_test, y_test)}
    if val_fraction > 0:
        x_train, x_val, y_train, y_val = train_test_split(
            x_train, y_train, test_size=val_fraction, random_state=seed, stratify=y_train
        )
        held_out["val"] = (x_val, y_val)
    x_train = torch.as_tensor(x_train, dtype=torch.float32)
    # Corner pixels are (almost) always 0 in training: a tiny std would blow up a test
    # image that happens to use them, so such features are only centred.
    mean, std = x_train.mean(0), x_train.std(0).clamp_min(1.0)
    splits = {"train": TensorDataset((x_train - mean) / std, torch.as_tensor(y_train))}
    for name in sorted(held_out, key=lambda n: n != "val"):  # "val" first: what is watched during training
        x, y = held_out[name]
        splits[name] = TensorDataset((torch.as_tensor(x, dtype=torch.float32) - mean) / std, torch.as_tensor(y))
    return splits


@REGISTRY.register()
def digits_loaders(
    batch_size: int = 64,
    test_fraction: float = 0.2,
    seed: int = 0,
    eval_batch_size: int = 512,
    drop_last: bool = True,
    val_fraction: float = 0.0,
) -> dict[str, Any]:
    """Shuffled training loader, and ordered loaders for the held-out splits: "test", and
    "val" when `val_fraction` > 0 (taken from the training part). The training loader is a
    `StatefulDataLoader` shuffled per epoch from `seed` (`mini_trainer.data.stateful_loader`),
    so a checkpointed run resumes at the exact batch with the same future order."""
    check_int("batch_size", batch_size, minimum=1)
    check_int("eval_batch_size", eval_batch_size, minimum=1)
    splits = load_digits_tensors(test_fraction, seed, val_fraction)
    loaders = {"train": stateful_loader(splits.pop("train"), batch_size, shuffle=True, seed=seed, drop_last=drop_last)}
    loaders.update({name: DataLoader(data, batch_size=eval_batch_size, shuffle=False) for name, data in splits.items()})
    return loaders
