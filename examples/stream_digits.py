"""Training as a stream of events, two ways, on the digits data set.

1. fitstream style: `epoch_stream` over in-memory tensors, one event per epoch, enriched
   with validation metrics, cut by early stopping, the best model kept.
2. A full-featured `BaseTrainer` (hooks, checkpoints) as a stream of per-step events via
   `trainer.events()`: the same stages decide when it ends, and every event is written to
   a JSON-lines file as it happens.

    python examples/stream_digits.py [workspace]
"""

import sys
import tempfile

import torch
import torch.nn.functional as F
from torch import nn

from mini_trainer import BaseTrainer, CheckpointingHook, LoggingHook
from mini_trainer.datasets import load_digits_tensors
from mini_trainer.stream import (
    augment,
    best_model,
    collect,
    collect_jsonl,
    early_stop,
    ema,
    epoch_stream,
    evaluate,
    pipe,
    print_keys,
    take,
    tap,
)


def accuracy(logits, labels):
    return (logits.argmax(1) == labels).float().mean()


def make_model():
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Dropout(0.1), nn.Linear(128, 10))


def epoch_events(train, val):
    """Part 1: the fitstream API (only the import differs)."""
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    best = best_model("val_loss")
    events = pipe(
        epoch_stream(
            train, model, optimizer, nn.CrossEntropyLoss(), batch_size=64, generator=torch.Generator().manual_seed(0)
        ),
        augment(evaluate(val, metrics={"val_loss": nn.CrossEntropyLoss(), "val_accuracy": accuracy})),
        ema("val_loss", half_life=2),
        tap(print_keys("train_loss", "val_loss", "val_loss_ema", "val_accuracy"), every=5),
        tap(best),
        early_stop("val_loss_ema", patience=4),
        take(100),  # at most 100 epochs
    )
    history = collect(events)
    best.load_into(model)
    print(f"epochs {len(history)}, best val_loss {best.best:.4f} at epoch {best.best_event['step']}")
    return model


def step_events(train, val, workspace):
    """Part 2: a BaseTrainer with hooks, consumed as a stream of steps."""
    model = make_model()
    x, y = train
    batches = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64, shuffle=True,
                                          generator=torch.Generator().manual_seed(0))
    trainer = BaseTrainer(
        model=model,
        optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
        data_loader=batches,
        forward_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1]),
        hooks=[LoggingHook(interval=50), CheckpointingHook(interval=200, load=None)],
        workspace=workspace,
        device="cpu",
    )
    every_20_steps = lambda events: (e for e in events if e["step"] % 20 == 0)  # noqa: E731 - a stage is any function
    collect_jsonl(
        pipe(
            trainer.events(),  # no limit: the stages below end the run
            every_20_steps,
            augment(evaluate(val, metrics={"val_loss": nn.CrossEntropyLoss(), "val_accuracy": accuracy})),
            tap(print_keys("loss", "val_loss", "val_accuracy"), every=5),
            early_stop("val_loss", patience=3),
            take(100),
        ),
        f"{workspace}/events.jsonl",
        include=["step", "epoch", "loss", "grad_norm", "val_loss", "val_accuracy"],
    )
    print(f"stopped at step {trainer.step}; events in {workspace}/events.jsonl, "
          f"final checkpoint in {workspace}/checkpoints")
    return model


@torch.no_grad()
def test_accuracy(model, test):
    model.eval()
    return accuracy(model(test[0]), test[1]).item()


if __name__ == "__main__":
    torch.manual_seed(0)
    splits = load_digits_tensors()
    train, test = splits["train"].tensors, splits["test"].tensors
    n_val = 300  # the last 300 training samples decide early stopping; test stays unseen
    fit, val = tuple(t[:-n_val] for t in train), tuple(t[-n_val:] for t in train)

    model = epoch_events(fit, val)
    print(f"epoch_stream test_accuracy {test_accuracy(model, test):.4f}")
    workspace = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="stream_digits_")
    model = step_events(fit, val, workspace)
    print(f"trainer.events test_accuracy {test_accuracy(model, test):.4f}")
