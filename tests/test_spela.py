"""SpelaTrainer: class vectors, locality of learning, the ways to build it, evaluation by
exit layer, and that the trainer's features (accumulation, AMP, checkpoints) still work."""

from __future__ import annotations

import math
import os
import re
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mini_trainer import CheckpointingHook
from mini_trainer.data import tensor_loader
from mini_trainer.strategies import SpelaConfig, SpelaNet, SpelaTrainer, class_vectors, min_pairwise_angle


def blobs(n=240, features=12, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, features, generator=g) * 3
    y = torch.randint(0, classes, (n,), generator=g)
    return centres[y] + torch.randn(n, features, generator=g), y


def mlp(features=12, hidden=32, out=8):
    return nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, out))


def trainer(tmp_path=None, steps=30, hooks=None, **kwargs):
    x, y = blobs()
    kwargs.setdefault("seed", 0)
    torch.manual_seed(0)  # the same initial weights for every run built here
    return SpelaTrainer(mlp(), num_classes=4, lr=5e-2, data_loader=tensor_loader(x, y, batch_size=16, seed=1),
                        max_steps=steps, device="cpu", workspace=tmp_path, hooks=hooks, **kwargs)


# ----------------------------------------------------------------------------- class vectors


@pytest.mark.parametrize("classes, dim", [(10, 64), (10, 9), (3, 2), (2, 5)])
def test_few_classes_form_a_regular_simplex(classes, dim):
    v = class_vectors(classes, dim)
    assert v.shape == (classes, dim) and v.dtype == torch.float32
    torch.testing.assert_close(v.norm(dim=1), torch.ones(classes))
    cosines = (v.double() @ v.double().T)[~torch.eye(classes, dtype=torch.bool)]
    torch.testing.assert_close(cosines, torch.full_like(cosines, -1 / (classes - 1)), atol=1e-6, rtol=0)


@pytest.mark.parametrize("classes, dim, optimum", [(6, 3, 90.0), (4, 2, 90.0), (8, 2, 45.0)])
def test_more_classes_than_dimensions_spread_near_the_optimum(classes, dim, optimum):
    # Known minimum-energy configurations: the octahedron, the square, the regular octagon.
    assert min_pairwise_angle(class_vectors(classes, dim)) == pytest.approx(optimum, abs=1.0)


def test_vectors_are_deterministic_per_seed_and_fast_for_many_classes():
    assert torch.equal(class_vectors(50, 8, seed=3), class_vectors(50, 8, seed=3))
    assert not torch.equal(class_vectors(50, 8, seed=3), class_vectors(50, 8, seed=4))
    many = class_vectors(1100, 16, steps=20)  # more rows than one block of the energy gradient
    torch.testing.assert_close(many.norm(dim=1), torch.ones(1100))
    random = class_vectors(1100, 16, method="random")
    assert min_pairwise_angle(many) > min_pairwise_angle(random) + 5
    assert class_vectors(500, 1024).shape == (500, 1024)  # a simplex: built directly, no iterations


# ----------------------------------------------------------------------------- learning


def test_no_gradient_crosses_layers():
    torch.manual_seed(0)
    run = trainer(steps=1, gradient_accumulation_steps=2)  # deferred update: gradients stay to be inspected
    run.build()
    net = run.spela_net
    x, y = blobs(16)
    run.model.train()
    run.forward((x, y))
    together = [p.grad.clone() for p in net.layers[0].parameters()]
    # Layer 1 alone, from its own local loss: the same gradient, so layers 2-3 sent nothing back.
    for p in net.parameters():
        p.grad = None
    out = net.layer_output(net.layer_input(x, 0), 0)
    target = net.vectors(0, out.shape[1], out.device)[y]
    (-torch.nn.functional.cosine_similarity(out, target, dim=1).mean() / 2).backward()
    for alone, both in zip((p.grad for p in net.layers[0].parameters()), together, strict=True):
        torch.testing.assert_close(alone, both)


def test_learns_and_evaluates_every_exit_layer():
    run = trainer(steps=60)
    run.train()
    x, y = blobs(seed=0)
    results = run.evaluate(tensor_loader(x, y, batch_size=64, shuffle=False))
    assert set(results) == {"exit_1_accuracy", "exit_2_accuracy", "exit_3_accuracy", "accuracy"}
    assert results["accuracy"] == results["exit_3_accuracy"] > 0.9
    assert (run.predict(x[:8]) == run.predict(x[:8], exit_layer=2)).all()
    assert run.step_info["grad_norm"] > 0 and "last_layer_cos" in run.step_info["records"]


def test_predict_and_evaluate_run_in_eval_mode_and_give_every_module_its_mode_back():
    model = nn.Sequential(nn.Linear(12, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 8))
    run = SpelaTrainer(model, num_classes=4, data_loader=[], device="cpu")
    run.build()
    net = run.spela_net
    frozen = next(m for m in net.modules() if isinstance(m, nn.BatchNorm1d))
    frozen.eval()  # a frozen BatchNorm inside a model that trains
    modes = {name: m.training for name, m in net.named_modules()}
    x, y = blobs()
    seen = []
    frozen.register_forward_hook(lambda module, args, output: seen.append(net.training or module.training))
    first = run.predict(x[:16])
    assert (run.predict(x[:16]) == first).all()  # eval mode: dropout off, the same answer twice
    run.evaluate([(x, y)])
    assert seen and not any(seen)
    with pytest.raises(ValueError, match="exit_layer"):
        run.predict(x[:4], exit_layer=7)
    assert {name: m.training for name, m in net.named_modules()} == modes


def test_one_layer_at_a_time_frees_gradients_before_the_next_layer_runs():
    run = trainer(steps=1)
    run.build()
    seen = []

    def record(module, args, output):
        seen.append(sum(p.grad is not None for p in run.spela_net.parameters()))

    for layer in run.spela_net.layers:
        layer.register_forward_hook(record)
    run.train()
    assert seen == [0, 0, 0]  # no layer's gradient exists while another layer runs
    assert all(p.grad is None for p in run.spela_net.parameters())


def test_accumulation_equals_the_big_batch():
    x, y = blobs(64)
    big = SpelaTrainer(mlp(), num_classes=4, lr=5e-2, momentum=0.0, seed=0, device="cpu",
                       data_loader=[(x, y)], max_steps=1)
    big.train()
    small = SpelaTrainer(mlp(), num_classes=4, lr=5e-2, momentum=0.0, seed=0, device="cpu",
                         data_loader=[(x[:32], y[:32]), (x[32:], y[32:])], max_steps=1, gradient_accumulation_steps=2)
    small.train()
    for a, b in zip(big.spela_net.parameters(), small.spela_net.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs(precision):
    run = trainer(steps=20, mixed_precision=precision)
    run.train()
    assert math.isfinite(float(run.step_info["loss"]))
    assert (run.grad_scaler is not None) == (precision == "fp16")


def test_checkpoint_resume_is_exact(tmp_path):
    straight = trainer(tmp_path / "a", steps=20)
    straight.train()
    trainer(tmp_path / "b", steps=9, hooks=[CheckpointingHook(interval=4)]).train()
    resumed = trainer(tmp_path / "b", steps=20, hooks=[CheckpointingHook(interval=4)])
    resumed.train()
    assert resumed.hooks[0].resumed_from.name == "step_000000009"
    for a, b in zip(straight.spela_net.parameters(), resumed.spela_net.parameters(), strict=True):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- building


def test_seed_readme_api_with_layers_of_a_model_and_config():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(12, 32)
            self.fc2 = nn.Linear(32, 8)

    model = Net()
    run = SpelaTrainer(model, [model.fc1, model.fc2], [nn.ReLU(), None], SpelaConfig(num_classes=4, lr=5e-2),
                       device="cpu")
    x, y = blobs()
    run.fit(tensor_loader(x, y, batch_size=16), epochs=3)
    assert run.evaluate([(x, y)])["accuracy"] > 0.8
    assert run.spela_net.layers[0] is model.fc1  # the user's modules are trained in place


def test_sequential_is_split_at_modules_with_parameters():
    seq = nn.Sequential(nn.Flatten(), nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(4, 8), nn.Tanh(), nn.Dropout(0.1), nn.Linear(8, 5))
    net = SpelaNet.from_sequential(seq, SpelaConfig(num_classes=3))
    assert len(net.layers) == 3
    assert isinstance(net.layers[0], nn.Sequential) and isinstance(net.layers[0][1], nn.Conv2d)
    assert isinstance(net.activations[0][0], nn.BatchNorm2d)  # normalisation stays with its layer
    assert isinstance(net.activations[1][0], nn.Tanh) and isinstance(net.activations[2], nn.Identity)


def test_cnn_blocks_train_and_non_vector_outputs_are_refused_without_auto_flatten():
    block = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    images, labels = torch.randn(32, 1, 8, 8), torch.randint(0, 3, (32,))
    run = SpelaTrainer(layers=[block, nn.Linear(4, 6)], num_classes=3, device="cpu",
                       data_loader=[(images, labels)], max_steps=2)
    run.train()
    bare = nn.Conv2d(1, 4, 3)  # output (B, 4, 6, 6): not a vector per sample
    strict = SpelaTrainer(layers=[bare], num_classes=3, auto_flatten=False, device="cpu",
                          data_loader=[(images, labels)], max_steps=1)
    with pytest.raises(ValueError, match=r"layer 1 gives an output of shape \(32, 4, 6, 6\).*pooling \+ nn.Flatten"):
        strict.train()


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(), TypeError, "needs num_classes"),
        (dict(num_classes=1), ValueError, "SpelaConfig.num_classes must be an integer >= 2"),
        (dict(num_classes=3, embeddings_method="nearest"), ValueError,
         "SpelaConfig.embeddings_method must be one of 'energy', 'farthest', 'random'; got 'nearest'"),
        (dict(num_classes=3, momentum=1.0), ValueError, r"momentum must be in \[0, 1\)"),
        (dict(num_classes=3, grad_clip_norm=0), ValueError, "SpelaConfig.grad_clip_norm must be a positive"),
        (dict(num_classes=3, device=1.5), TypeError, "SpelaConfig.device must be None, \"auto\", a device name"),
        (dict(num_classes=3, device="gpu7"), ValueError, "SpelaConfig.device must be .*; got 'gpu7'"),
        (dict(num_classes=3, dtype="int8"), ValueError, "SpelaConfig.dtype must be None or a floating dtype .*'int8'"),
        (dict(num_classes=3, dtype=torch.int64), ValueError, "SpelaConfig.dtype must be .*torch.int64"),
        (dict(num_classes=3, amp="yes"), TypeError, "SpelaConfig.amp must be True or False; got 'yes'"),
        (dict(num_classes=3, center_layer_inputs=1), TypeError, "SpelaConfig.center_layer_inputs must be True or"),
    ],
)
def test_bad_settings_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        SpelaTrainer(mlp(), **{"device": "cpu", **kwargs})


def test_exit_layer_out_of_range_is_named():
    run = trainer(steps=1)
    with pytest.raises(ValueError, match=r"exit_layer must index one of the 3 layers .*got 3"):
        run.predict(torch.randn(2, 12), exit_layer=3)


def test_layers_are_required():
    with pytest.raises(ValueError, match="needs layers"):
        SpelaTrainer(nn.Linear(3, 3), num_classes=3, device="cpu", data_loader=[], max_steps=1).build()


def test_config_builds_a_spela_trainer_that_scores_its_held_out_split(tmp_path):
    from mini_trainer import build_from_cfg, load_config

    cfg = load_config("configs/digits_spela.py", [f"trainer.workspace={tmp_path}", "trainer.max_epochs=2"])
    run = build_from_cfg(cfg["trainer"])
    run.build()
    assert isinstance(run, SpelaTrainer) and len(run.spela_net.layers) == 3  # split from the MLP config
    run.train()
    results = run.evaluate()
    assert set(results) == {"test_exit_1_accuracy", "test_exit_2_accuracy", "test_exit_3_accuracy", "test_accuracy"}
    assert results["test_accuracy"] > 0.8


def test_subclassing_with_build_model_and_data():
    class Mine(SpelaTrainer):
        def build_model(self):
            torch.manual_seed(0)
            return SpelaNet([nn.Linear(12, 16), nn.Linear(16, 6)], [nn.ReLU(), None], self.config)

        def build_data_loader(self):
            x, y = blobs()
            return tensor_loader(x, y, batch_size=16)

    run = Mine(num_classes=4, lr=5e-2, max_epochs=3, device="cpu")
    run.train()
    x, y = blobs()
    assert run.evaluate([(x, y)])["accuracy"] > 0.8


# ----------------------------------------------------------------------------- the seed project's settings


def test_every_seed_readme_field_is_accepted_and_maps_onto_the_trainer():
    cfg = SpelaConfig(num_classes=4, lr=5e-2, momentum=0.9, weight_decay=1e-4, device="cpu", dtype="float64",
                      auto_flatten=True, normalize_layer_inputs=True, amp=True, grad_clip_norm=2.0,
                      embeddings_method="farthest", seed=3)
    assert cfg.dtype is torch.float64
    torch.manual_seed(0)
    x, y = blobs()
    run = SpelaTrainer(mlp(), config=cfg, data_loader=tensor_loader(x, y, batch_size=16), max_steps=30)
    assert run.grad_clip == 2.0 and run.device == torch.device("cpu") and run.mixed_precision == "auto"
    assert run.autocast_dtype is None  # "auto" is full precision on the CPU, bf16/fp16 on CUDA
    run.train()
    assert all(p.dtype == torch.float64 for p in run.spela_net.parameters())  # dtype: the layers' parameters
    assert run.evaluate([(x, y)])["accuracy"] > 0.8  # float32 inputs are cast to the layers' dtype
    torch.testing.assert_close(run.spela_net.vectors(0, 32, torch.device("cpu")), class_vectors(4, 32, "farthest", 3))


def test_grad_clip_norm_clips_each_layer_like_the_trainer_keyword():
    by_field, by_keyword = trainer(steps=5, grad_clip_norm=1e-3), trainer(steps=5, grad_clip=1e-3)
    by_field.train()
    by_keyword.train()
    assert by_field.grad_clip == by_keyword.grad_clip == 1e-3
    for a, b in zip(by_field.spela_net.parameters(), by_keyword.spela_net.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "config, kwargs, match",
    [
        (dict(grad_clip_norm=2.0), dict(grad_clip=1.0), r"grad_clip=1.0 and SpelaConfig.grad_clip_norm=2.0"),
        (dict(device="cpu"), dict(device="meta"), r"device='meta' and SpelaConfig.device='cpu'"),
        (dict(amp=True), dict(mixed_precision="bf16"), r"mixed_precision='bf16' and SpelaConfig.amp=True"),
    ],
)
def test_config_fields_and_trainer_keywords_that_disagree_are_named(config, kwargs, match):
    with pytest.raises(ValueError, match=match):
        SpelaTrainer(mlp(), config=SpelaConfig(num_classes=4, **config), **kwargs)


def test_agreeing_config_fields_and_trainer_keywords_are_fine():
    run = SpelaTrainer(mlp(), config=SpelaConfig(num_classes=4, device="cpu", grad_clip_norm=1.0, amp=True),
                       device=torch.device("cpu"), grad_clip=1.0, mixed_precision="auto")
    assert run.grad_clip == 1.0 and run.mixed_precision == "auto"


# ----------------------------------------------------------------------------- "farthest" class vectors


@pytest.mark.parametrize("dim", [16, 32, 64])
def test_farthest_keeps_every_class_apart_and_is_deterministic(dim):
    farthest = class_vectors(10, dim, "farthest", seed=0)
    assert farthest.shape == (10, dim)
    torch.testing.assert_close(farthest.norm(dim=1), torch.ones(10))
    assert torch.equal(farthest, class_vectors(10, dim, "farthest", seed=0))
    assert not torch.equal(farthest, class_vectors(10, dim, "farthest", seed=1))
    angle = min_pairwise_angle(farthest)  # 85.9, 86.9, 88.9 degrees for dims 16, 32, 64
    random_angles = [min_pairwise_angle(class_vectors(10, dim, "random", seed=s)) for s in range(5)]
    simplex = min_pairwise_angle(class_vectors(10, dim, "energy"))  # 96.4: the optimum, arccos(-1/9)
    assert 80.0 < angle <= simplex + 1e-6
    assert angle > max(random_angles)
    # No two classes share a vector (the seed's version kept the wrong extreme and collapsed them):
    # every class's nearest class vector is itself.
    assert torch.equal((farthest @ farthest.T).argmax(dim=1), torch.arange(10))
    for seed in range(1, 5):
        assert min_pairwise_angle(class_vectors(10, dim, "farthest", seed=seed)) > 80.0


def test_farthest_with_more_classes_than_dimensions_still_spreads():
    many = class_vectors(40, 8, "farthest", seed=0)
    assert min_pairwise_angle(many) > min_pairwise_angle(class_vectors(40, 8, "random", seed=0)) + 10


# ----------------------------------------------------------------------------- CNN blocks


def stripes(n, seed, size=16, noise=1.5):
    """3 x size x size images of oriented stripes + noise: 5 orientations x 2 frequencies."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    angle = (y % 5).float() * math.pi / 5 + torch.randn(n, generator=g) * 0.05
    frequency = torch.where(y < 5, 0.6, 1.4)
    phase = torch.rand(n, generator=g) * 2 * math.pi
    grid = torch.arange(size, dtype=torch.float32) - size / 2
    rows, cols = torch.meshgrid(grid, grid, indexing="ij")
    along = cols[None] * torch.cos(angle)[:, None, None] + rows[None] * torch.sin(angle)[:, None, None]
    image = torch.sin(along * frequency[:, None, None] + phase[:, None, None])
    return (image[:, None].expand(n, 3, size, size) + noise * torch.randn(n, 3, size, size, generator=g)), y


def readme_cnn_blocks():
    block1 = nn.Sequential(nn.Conv2d(3, 32, kernel_size=3, stride=1, padding=1), nn.BatchNorm2d(32),
                           nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    block2 = nn.Sequential(nn.Linear(32, 64), nn.ReLU(inplace=True))
    return [block1, block2, nn.Linear(64, 10)]


def cnn_accuracy(layers, epochs=3, **config):
    xtr, ytr = stripes(1200, 0)
    xte, yte = stripes(400, 1)
    run = SpelaTrainer(nn.Sequential(), layers, [None, None, nn.Identity()],
                       SpelaConfig(num_classes=10, lr=5e-2, **config), device="cpu", seed=0)
    run.fit(tensor_loader(xtr, ytr, batch_size=64), epochs=epochs)
    return run.evaluate(tensor_loader(xte, yte, batch_size=400, shuffle=False))


def test_readme_cnn_blocks_learn_well_above_chance():
    torch.manual_seed(0)
    results = cnn_accuracy(readme_cnn_blocks())
    assert results["accuracy"] > 0.6  # chance: 0.1 (benchmarks/spela_cnn.py: 0.98 at 5 epochs, 3000 images)
    torch.manual_seed(0)
    seed_inputs = cnn_accuracy(readme_cnn_blocks(), center_layer_inputs=False)
    assert seed_inputs["accuracy"] < results["accuracy"] - 0.2  # the seed's layer inputs barely learn


def test_centering_removes_the_common_direction_of_pooled_relu_features():
    net = SpelaNet(readme_cnn_blocks(), [None, None, None], SpelaConfig(num_classes=10))
    h = net.layer_output(net.layer_input(stripes(64, 0)[0], 0), 0)
    assert (h >= 0).all()
    centred = net.layer_input(h, 1)
    torch.testing.assert_close(centred.sum(dim=1), torch.zeros(64), atol=1e-5, rtol=0)
    torch.testing.assert_close(centred.norm(dim=1), torch.ones(64))
    raw = SpelaNet(readme_cnn_blocks(), None, SpelaConfig(num_classes=10, center_layer_inputs=False)).layer_input(h, 1)
    assert F.cosine_similarity(raw, torch.ones_like(raw)).min() > 0.9  # what the next layer saw before


def test_nonnegative_vectors_only_for_layers_ending_in_a_non_negative_activation():
    net = SpelaNet(readme_cnn_blocks(), [None, None, None], SpelaConfig(num_classes=10, nonnegative_vectors=True))
    assert [net.non_negative_output(k) for k in range(3)] == [True, True, False]
    v = net.vectors(0, 32, torch.device("cpu"))
    assert (v >= 0).all() and torch.allclose(v @ v.T, torch.eye(10), atol=1e-6)
    assert (net.vectors(2, 10, torch.device("cpu")) < 0).any()  # the head keeps the simplex
    assert not SpelaNet(readme_cnn_blocks(), None, SpelaConfig(num_classes=10)).vectors(0, 32, "cpu").ge(0).all()


# ----------------------------------------------------------------------------- the seed README's code


SEED_README = os.environ.get("SPELA_SEED_README", "/work/shared/seeds/spela-fast-ann-training-README.txt")

# The seed README's two code blocks, verbatim (the test below checks them against the README
# when it is at SEED_README, so these copies cannot drift; without it they still run).
README_MLP_BLOCK = '''import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from src.spela_train import SpelaTrainer, SpelaConfig

class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(784, 1024)
        self.fc2 = nn.Linear(1024, 10)

model = MLP()
layers = [model.fc1, model.fc2]
activations = [nn.ReLU(), nn.Identity()]

cfg = SpelaConfig(num_classes=10, lr=1e-2)
trainer = SpelaTrainer(model, layers, activations, cfg)

# train_loader should yield (x, y) where x is (B, 1, 28, 28); the trainer auto‑flattens as needed
trainer.fit(train_loader, epochs=10)
acc = trainer.evaluate(test_loader)
print("test acc:", acc)
'''
README_CNN_BLOCK = '''import torch.nn as nn
from src.spela_train import SpelaTrainer, SpelaConfig

block1 = nn.Sequential(
    nn.Conv2d(3, 32, kernel_size=3, stride=1, padding=1),
    nn.BatchNorm2d(32),
    nn.ReLU(inplace=True),
    nn.AdaptiveAvgPool2d(1),
    nn.Flatten(),  # -> (B, 32)
)
block2 = nn.Sequential(
    nn.Linear(32, 64),
    nn.ReLU(inplace=True),
)
head = nn.Linear(64, 10)

layers = [block1, block2, head]
activations = [None, None, nn.Identity()]
cfg = SpelaConfig(num_classes=10, lr=5e-3)
trainer = SpelaTrainer(nn.Sequential(), layers, activations, cfg)
'''


def mnist_shaped(n, seed=0):
    """(n, 1, 28, 28) images: one random template per class plus noise, and their labels."""
    templates = torch.randn(10, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=g)
    return templates[labels] + torch.randn(n, 1, 28, 28, generator=g), labels


@pytest.fixture
def seed_imports(monkeypatch):
    """`from src.spela_train import SpelaTrainer, SpelaConfig` resolves to our modules."""
    import mini_trainer.strategies.spela as ours

    package = types.ModuleType("src")
    package.spela_train = ours
    monkeypatch.setitem(sys.modules, "src", package)
    monkeypatch.setitem(sys.modules, "src.spela_train", ours)


def test_the_copied_blocks_are_the_seed_readmes():
    if not os.path.exists(SEED_README):
        pytest.skip(f"the seed README is not at {SEED_README} (set SPELA_SEED_README); the copies still run below")
    text = open(SEED_README, encoding="utf-8").read()
    assert [block for block in re.findall(r"```\n(.*?)```", text, re.S) if "spela_train" in block] == [
        README_MLP_BLOCK, README_CNN_BLOCK]


def test_seed_readme_code_blocks_run_through_an_import_alias(seed_imports):
    mlp_block, cnn_block = README_MLP_BLOCK, README_CNN_BLOCK
    torch.manual_seed(0)
    images, labels = mnist_shaped(64)
    namespace = {"train_loader": tensor_loader(images, labels, batch_size=32), "test_loader": [(images, labels)],
                 "print": lambda *args: None}
    exec(compile(mlp_block, "seed README: MLP", "exec"), namespace)  # fits 10 epochs, evaluates
    assert set(namespace["acc"]) == {"exit_1_accuracy", "exit_2_accuracy", "accuracy"}
    assert namespace["acc"]["accuracy"] > 0.8
    exec(compile(cnn_block, "seed README: CNN blocks", "exec"), namespace)
    cnn = namespace["trainer"]
    assert isinstance(cnn, SpelaTrainer) and cnn.config.lr == 5e-3
    cnn.fit(tensor_loader(*stripes(1200, 0), batch_size=64), epochs=3)  # the README's lr, 5e-3
    assert cnn.evaluate(tensor_loader(*stripes(400, 1), batch_size=400))["accuracy"] > 0.3  # chance: 0.1


def test_seed_readme_calls_without_the_readme(seed_imports):
    from src.spela_train import SpelaConfig as Config  # the seed's import line
    from src.spela_train import SpelaTrainer as Trainer

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(784, 1024), nn.Linear(1024, 10)

    torch.manual_seed(0)
    model = MLP()
    run = Trainer(model, [model.fc1, model.fc2], [nn.ReLU(), nn.Identity()], Config(num_classes=10, lr=1e-2))
    images, labels = mnist_shaped(64)
    run.fit(tensor_loader(images, labels, batch_size=32), epochs=10)  # (B, 1, 28, 28) flattened for fc1
    assert run.evaluate([mnist_shaped(64, seed=1)])["accuracy"] > 0.8  # the same templates, new noise
