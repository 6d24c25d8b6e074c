"""Invalid inputs fail early, with the right exception type and a message that names the
offending argument. One parametrized matrix per entry point."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from mini_trainer import BaseTrainer, LoggingHook, ProgressHook, build_from_cfg, key_average, load_config
from mini_trainer.models import MLP


def make_parts():
    model = nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    data = [(torch.randn(4, 2), torch.randn(4, 1))] * 4
    return model, optimizer, data


def mse(model, batch):
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def make_trainer(**kwargs) -> BaseTrainer:
    model, optimizer, data = make_parts()
    args = dict(model=model, optimizer=optimizer, data_loader=data, forward_fn=mse, max_steps=1, device="cpu")
    args.update(kwargs)
    return BaseTrainer(**args)


# =========================================================================== constructor


class NotAHook:
    def on_after_step(self, trainer):
        pass


CONSTRUCTOR_CASES = [
    # (kwargs, exception, regex that must name the argument)
    ({"max_steps": -1}, ValueError, r"max_steps"),
    ({"max_steps": 1.5}, TypeError, r"max_steps"),
    ({"max_steps": 10.0}, TypeError, r"max_steps"),
    ({"max_steps": True}, TypeError, r"max_steps"),
    ({"max_epochs": -2}, ValueError, r"max_epochs"),
    ({"max_epochs": "3"}, TypeError, r"max_epochs"),
    ({"mixed_precision": "fp8"}, ValueError, r"mixed_precision"),
    ({"mixed_precision": "FP16"}, ValueError, r"mixed_precision"),
    ({"gradient_accumulation_steps": 0}, ValueError, r"gradient_accumulation_steps"),
    ({"gradient_accumulation_steps": 2.0}, TypeError, r"gradient_accumulation_steps"),
    ({"grad_clip": -1.0}, ValueError, r"grad_clip"),
    ({"grad_clip": 0}, ValueError, r"grad_clip"),
    ({"grad_clip": math.nan}, ValueError, r"grad_clip"),
    ({"grad_clip": math.inf}, ValueError, r"grad_clip"),
    ({"grad_clip": "1.0"}, TypeError, r"grad_clip"),
    ({"max_non_finite_grad_retries": -1}, ValueError, r"max_non_finite_grad_retries"),
    ({"max_non_finite_grad_retries": 1.0}, TypeError, r"max_non_finite_grad_retries"),
    ({"device": "gpu9"}, ValueError, r"device.*'gpu9'"),
    ({"device": object()}, TypeError, r"device"),
    ({"device": -1}, ValueError, r"device"),
    ({"device": True}, TypeError, r"device"),
    ({"hooks": "ProgressHook"}, TypeError, r"hooks"),
    ({"hooks": ProgressHook()}, TypeError, r"hooks"),
    ({"model": "linear"}, TypeError, r"model"),
    ({"model": lambda x: x}, TypeError, r"model"),
    ({"optimizer": "sgd"}, TypeError, r"optimizer"),
    ({"optimizer": torch.optim.lr_scheduler}, TypeError, r"optimizer"),
    ({"forward_fn": "mse"}, TypeError, r"forward_fn"),
    ({"forward_fn": 3}, TypeError, r"forward_fn"),
    ({"compile": "yes"}, TypeError, r"compile"),
    ({"compile": 1}, TypeError, r"compile"),
    ({"workspace": 3}, TypeError, r"workspace"),
    ({"seed": 1.5}, TypeError, r"seed"),
    ({"logger": "mini_trainer"}, TypeError, r"logger"),
    ({"grad_scaler": object()}, TypeError, r"grad_scaler"),
]


def _case_id(kwargs: dict) -> str:
    (name, value), = kwargs.items()
    shown = repr(value) if isinstance(value, (int, float, str, bool)) else type(value).__name__
    return f"{name}={shown}"


@pytest.mark.parametrize(
    "kwargs, exc, match",
    CONSTRUCTOR_CASES,
    ids=[_case_id(k) for k, _, _ in CONSTRUCTOR_CASES],
)
def test_constructor_rejects(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        make_trainer(**kwargs)


@pytest.mark.parametrize(
    "hooks, match",
    [
        ([NotAHook()], r"hooks\[0\].*NotAHook"),
        ([ProgressHook(interval=1), "LoggingHook"], r"hooks\[1\].*str"),
        ([None], r"hooks\[0\]"),
    ],
    ids=["duck-typed-hook", "string-hook", "none-hook"],
)
def test_non_basehook_items_fail_at_train_time(hooks, match):
    trainer = make_trainer(hooks=hooks)  # accepted here: the list is only checked when built
    with pytest.raises(TypeError, match=match):
        trainer.train()
    assert trainer.step == 0


# =========================================================================== forward output


FORWARD_CASES = [
    (lambda m, b: {"loss": mse(m, b)}, TypeError, r"forward must return a tuple.*dict"),
    (lambda m, b: [mse(m, b), {}], TypeError, r"forward must return a tuple.*list"),
    # A wrong-length tuple must say so: "must return a tuple ...; got tuple" alone is self-contradictory.
    (lambda m, b: (mse(m, b), {}, {}), TypeError, r"forward must return a tuple \(loss, records\).*\b3\b"),
    (lambda m, b: (mse(m, b),), TypeError, r"forward must return a tuple \(loss, records\).*\b1\b"),
    (lambda m, b: None, TypeError, r"forward must return a tuple.*NoneType"),
    (lambda m, b: 0.5, TypeError, r"forward must return a tuple.*float"),
    (
        lambda m, b: (nn.functional.mse_loss(m(b[0]), b[1], reduction="none").squeeze(1), {}),
        ValueError,
        r"loss of shape \(4,\).*scalar",
    ),
    (lambda m, b: (0.5, {}), TypeError, r"loss of type float"),
    (lambda m, b: ("0.5", {}), TypeError, r"loss of type str"),
    (lambda m, b: (mse(m, b), [1.0]), TypeError, r"records of type list.*dict"),
    (lambda m, b: (mse(m, b), 1.0), TypeError, r"records of type float"),
]


@pytest.mark.parametrize(
    "forward_fn, exc, match",
    FORWARD_CASES,
    ids=[
        "dict", "list", "3-tuple", "1-tuple", "none", "float", "loss-shape-4", "loss-float",
        "loss-str", "records-list", "records-float",
    ],
)
def test_bad_forward_output_fails_on_first_step(forward_fn, exc, match):
    trainer = make_trainer(forward_fn=forward_fn)
    with pytest.raises(exc, match=match):
        trainer.train()
    assert trainer.step == 0


def test_forward_without_forward_fn_or_override():
    trainer = make_trainer(forward_fn=None)
    with pytest.raises(NotImplementedError, match=r"forward"):
        trainer.train()


@pytest.mark.parametrize("missing", ["model", "optimizer", "data_loader"])
def test_missing_parts_name_the_argument(missing):
    trainer = make_trainer(**{missing: None})
    with pytest.raises(NotImplementedError, match=rf"{missing}=\.\.\..*build_{missing}"):
        trainer.train()


# =========================================================================== train / fit limits


def test_train_without_any_limit():
    trainer = make_trainer(max_steps=None, max_epochs=None)
    with pytest.raises(ValueError, match=r"max_steps.*max_epochs"):
        trainer.train()


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"steps": 0}, ValueError, r"steps"),
        ({"steps": -3}, ValueError, r"steps"),
        ({"steps": 2.0}, TypeError, r"steps"),
        ({"epochs": 0}, ValueError, r"epochs"),
        ({"epochs": True}, TypeError, r"epochs"),
        ({"data_loader": 5, "steps": 1}, TypeError, r"data_loader"),
    ],
)
def test_fit_rejects(kwargs, exc, match):
    trainer = make_trainer()
    with pytest.raises(exc, match=match):
        trainer.fit(**kwargs)
    assert trainer.step == 0


# =========================================================================== config


@pytest.fixture
def cfg_file(tmp_path) -> Path:
    path = tmp_path / "cfg.py"
    path.write_text(
        "trainer = dict(type='ClassificationTrainer', max_steps=10, "
        "hooks=[dict(type='ProgressHook', interval=1)])\n"
    )
    return path


@pytest.mark.parametrize(
    "override, exc, match",
    [
        ("trainer.max_steps", ValueError, r"'trainer\.max_steps'.*key\.path=value"),
        ("=5", ValueError, r"'=5'.*key\.path=value"),
        ("a..b=1", ValueError, r"'a\.\.b=1'.*key\.path=value"),
        ("trainer.nope.x=1", KeyError, r"trainer\.nope.*'nope'"),
        ("nope.x=1", KeyError, r"'nope'"),
        ("trainer.hooks.3.interval=1", KeyError, r"trainer\.hooks\.3.*out of range"),
        ("trainer.hooks.x.interval=1", KeyError, r"trainer\.hooks\.x.*not a list index"),
        ("trainer.max_steps.deep=1", KeyError, r"trainer\.max_steps\.deep"),
    ],
    ids=[
        "no-equals",
        "no-key",
        "empty-part",
        "missing-key",
        "missing-top-key",
        "index-range",
        "index-not-int",
        "into-int",
    ],
)
def test_bad_overrides(cfg_file, override, exc, match):
    with pytest.raises(exc, match=match):
        load_config(cfg_file, [override])


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config file.*nope\.py"):
        load_config(tmp_path / "nope.py")


@pytest.mark.parametrize("name", ["cfg.yaml", "cfg", "cfg.json"])
def test_config_file_must_be_python(tmp_path, name):
    path = tmp_path / name
    path.write_text("x = 1\n")
    with pytest.raises(ValueError, match=r"config path.*\.py"):
        load_config(path)


def test_config_path_of_wrong_type():
    with pytest.raises(TypeError, match=r"config path"):
        load_config(3)


@pytest.mark.parametrize(
    "cfg, match",
    [
        ({"type": "NoSuchTrainer"}, r"'NoSuchTrainer'.*not registered"),
        ({"type": "ClassificationTrainr"}, r"'ClassificationTrainr'.*did you mean 'ClassificationTrainer'"),
        ({"type": "torch.optim.NoSuchOpt"}, r"'torch\.optim\.NoSuchOpt'.*NoSuchOpt"),
    ],
)
def test_unknown_registry_type(cfg, match):
    with pytest.raises(KeyError, match=match):
        build_from_cfg(cfg)


# =========================================================================== hooks / models / utils


@pytest.mark.parametrize(
    "factory, exc, match",
    [
        (lambda: ProgressHook(interval=0), ValueError, r"interval"),
        (lambda: ProgressHook(interval=-5), ValueError, r"interval"),
        (lambda: ProgressHook(interval=2.5), TypeError, r"interval"),
        (lambda: ProgressHook(eta_warmup=-1), ValueError, r"eta_warmup"),
        (lambda: LoggingHook(interval=0), ValueError, r"interval"),
        (lambda: LoggingHook(interval="10"), TypeError, r"interval"),
        (lambda: MLP(4, 2, hidden_sizes="64"), TypeError, r"hidden_sizes"),
        (lambda: MLP(4, 2, hidden_sizes=64), TypeError, r"hidden_sizes"),
        (lambda: MLP(4, 2, hidden_sizes=[64, 0]), ValueError, r"hidden_sizes\[1\]"),
        (lambda: MLP(0, 2), ValueError, r"in_features"),
        (lambda: MLP(4, 2, activation="swish"), ValueError, r"activation"),
        (lambda: MLP(4, 2, dropout=1.0), ValueError, r"dropout"),
    ],
    ids=[
        "progress-interval-0", "progress-interval-neg", "progress-interval-float", "progress-eta-warmup",
        "logging-interval-0", "logging-interval-str", "mlp-hidden-str", "mlp-hidden-int", "mlp-hidden-zero",
        "mlp-in-features", "mlp-activation", "mlp-dropout",
    ],
)
def test_component_arguments(factory, exc, match):
    with pytest.raises(exc, match=match):
        factory()


@pytest.mark.parametrize(
    "records, exc, match",
    [
        ([{"loss": 1.0}, [("loss", 2.0)]], TypeError, r"records\[1\].*dict"),
        (["loss"], TypeError, r"records\[0\].*dict"),
        ([{"loss": "high"}], TypeError, r"'loss'.*str"),
        ([{"m": {"acc": "0.9"}}], TypeError, r"'m\.acc'.*str"),
        ([{"loss": None}], TypeError, r"'loss'"),
        ([{"loss": torch.ones(3)}], ValueError, r"'loss'.*shape \(3,\)"),
    ],
    ids=["list-record", "str-record", "str-value", "nested-str-value", "none-value", "vector-value"],
)
def test_key_average_rejects(records, exc, match):
    with pytest.raises(exc, match=match):
        key_average(records)


def test_given_names_the_objects_it_knows():
    trainer = make_trainer(max_steps=1)
    assert trainer.given("lr_scheduler") is None
    with pytest.raises(ValueError, match=r"given\(name\) must be one of 'model', 'optimizer'.*got 'modle'"):
        trainer.given("modle")


def test_a_strategy_process_limit_must_be_a_positive_count():
    class Broken(BaseTrainer):
        max_processes = 0

    with pytest.raises(ValueError, match=r"Broken\.max_processes must be .*>= 1"):
        Broken(model=nn.Linear(1, 1), device="cpu").build()


def test_fit_collectors_attach_only_to_known_events():
    from mini_trainer.hooks.base import HookDispatcher

    with pytest.raises(ValueError, match=r"event must be one of 'on_before_train'.*got 'on_after_stpe'"):
        with HookDispatcher().added("on_after_stpe", lambda trainer: None):
            pass
