"""Behaviour of `mini_trainer.config` (Python config files, inheritance, overrides) and
`mini_trainer.builder` (registry, `build_from_cfg`)."""

from __future__ import annotations

import copy
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from mini_trainer.builder import REGISTRY, Registry, build_from_cfg, resolve_type
from mini_trainer.config import apply_overrides, load_config, merge_configs, parse_override


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


# =========================================================================== load_config


def test_plain_file_public_names_form_the_config(tmp_path):
    cfg_file = write(
        tmp_path / "plain.py",
        """
        import math
        from pathlib import Path

        def helper():
            return 1

        class Thing:
            pass

        _private = 5
        max_steps = 10
        lr = math.sqrt(4) * 1e-3
        trainer = dict(type="X", hooks=[dict(type="H", interval=helper())])
        """,
    )
    cfg = load_config(cfg_file)
    assert cfg == {"max_steps": 10, "lr": 2e-3, "trainer": {"type": "X", "hooks": [{"type": "H", "interval": 1}]}}


def test_load_config_accepts_str_paths(tmp_path):
    cfg_file = write(tmp_path / "a.py", "x = 1\n")
    assert load_config(str(cfg_file)) == {"x": 1}


def test_config_dict_form_replaces_module_names(tmp_path):
    cfg_file = write(
        tmp_path / "dict_form.py",
        """
        other = 123  # ignored: `config` is the whole config
        config = {"trainer": {"max_steps": 7}, "name": "run"}
        """,
    )
    assert load_config(cfg_file) == {"trainer": {"max_steps": 7}, "name": "run"}


def test_config_dict_form_with_parents_inside(tmp_path):
    write(tmp_path / "base.py", "trainer = dict(max_steps=1, lr=0.1)\n")
    child = write(
        tmp_path / "child.py",
        """
        config = {"parents": ["base.py"], "trainer": {"max_steps": 2}}
        """,
    )
    cfg = load_config(child)
    assert cfg == {"trainer": {"max_steps": 2, "lr": 0.1}}
    assert "parents" not in cfg


def test_parents_deep_merge_and_parents_key_dropped(tmp_path):
    write(
        tmp_path / "base.py",
        """
        trainer = dict(
            type="ClassificationTrainer",
            max_steps=1000,
            optimizer_cfg=dict(type="torch.optim.AdamW", lr=1e-3, weight_decay=0.0),
            hooks=[dict(type="ProgressHook", interval=10)],
        )
        seed = 0
        """,
    )
    child = write(
        tmp_path / "long.py",
        """
        parents = ["base.py"]
        trainer = dict(max_steps=5000, optimizer_cfg=dict(lr=3e-4), hooks=[dict(type="LoggingHook")])
        extra = "yes"
        """,
    )
    cfg = load_config(child)
    assert cfg == {
        "trainer": {
            "type": "ClassificationTrainer",
            "max_steps": 5000,
            "optimizer_cfg": {"type": "torch.optim.AdamW", "lr": 3e-4, "weight_decay": 0.0},
            "hooks": [{"type": "LoggingHook"}],  # lists replace, they are not merged
        },
        "seed": 0,
        "extra": "yes",
    }


def test_parents_as_single_string(tmp_path):
    write(tmp_path / "base.py", "a = 1\nb = 2\n")
    child = write(tmp_path / "child.py", "parents = 'base.py'\nb = 3\n")
    assert load_config(child) == {"a": 1, "b": 3}


def test_relative_parents_are_resolved_against_each_files_directory(tmp_path, monkeypatch):
    write(tmp_path / "configs" / "shared" / "root.py", "level = 'root'\nroot_only = 1\n")
    write(
        tmp_path / "configs" / "shared" / "mid.py",
        "parents = ['root.py']\nlevel = 'mid'\nmid_only = 2\n",  # relative to shared/
    )
    leaf = write(
        tmp_path / "configs" / "exp" / "leaf.py",
        "parents = ['../shared/mid.py']\nlevel = 'leaf'\n",
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the working directory must not matter
    assert load_config(leaf) == {"level": "leaf", "root_only": 1, "mid_only": 2}
    # ... also when the leaf itself is given relative to the working directory
    monkeypatch.chdir(tmp_path / "configs")
    assert load_config("exp/leaf.py") == {"level": "leaf", "root_only": 1, "mid_only": 2}


def test_absolute_parent_path(tmp_path):
    base = write(tmp_path / "a" / "base.py", "x = 1\ny = 1\n")
    child = write(tmp_path / "b" / "child.py", f"parents = [{str(base)!r}]\ny = 2\n")
    assert load_config(child) == {"x": 1, "y": 2}


def test_multiple_parents_later_wins_and_child_wins_over_all(tmp_path):
    write(tmp_path / "p1.py", "trainer = dict(a=1, b=1, c=1, nested=dict(x=1, y=1))\nonly1 = True\n")
    write(tmp_path / "p2.py", "trainer = dict(b=2, c=2, nested=dict(y=2))\nonly2 = True\n")
    child = write(tmp_path / "child.py", "parents = ['p1.py', 'p2.py']\ntrainer = dict(c=3)\n")
    assert load_config(child) == {
        "trainer": {"a": 1, "b": 2, "c": 3, "nested": {"x": 1, "y": 2}},
        "only1": True,
        "only2": True,
    }
    swapped = write(tmp_path / "swapped.py", "parents = ['p2.py', 'p1.py']\n")
    assert load_config(swapped)["trainer"] == {"a": 1, "b": 1, "c": 1, "nested": {"x": 1, "y": 1}}


def test_replace_flag_replaces_instead_of_merging(tmp_path):
    write(
        tmp_path / "base.py",
        "trainer = dict(max_steps=10, optimizer_cfg=dict(type='torch.optim.AdamW', lr=1e-3, betas=(0.9, 0.95)))\n",
    )
    child = write(
        tmp_path / "child.py",
        "parents = ['base.py']\ntrainer = dict(optimizer_cfg=dict(_replace_=True, type='torch.optim.SGD', lr=0.1))\n",
    )
    cfg = load_config(child)
    assert cfg == {"trainer": {"max_steps": 10, "optimizer_cfg": {"type": "torch.optim.SGD", "lr": 0.1}}}


def test_replace_flag_without_parent_value_is_dropped(tmp_path):
    cfg_file = write(tmp_path / "a.py", "model = dict(_replace_=True, width=3)\n")
    assert load_config(cfg_file) == {"model": {"width": 3}}


def test_diamond_inheritance_is_not_a_cycle(tmp_path):
    write(tmp_path / "root.py", "x = 0\n")
    write(tmp_path / "left.py", "parents = ['root.py']\nleft = 1\n")
    write(tmp_path / "right.py", "parents = ['root.py']\nright = 1\n")
    child = write(tmp_path / "child.py", "parents = ['left.py', 'right.py']\n")
    assert load_config(child) == {"x": 0, "left": 1, "right": 1}


def test_cycle_is_detected(tmp_path):
    a = write(tmp_path / "a.py", "parents = ['b.py']\n")
    write(tmp_path / "b.py", "parents = ['c.py']\n")
    write(tmp_path / "c.py", "parents = ['a.py']\n")
    with pytest.raises(ValueError, match="cycle") as info:
        load_config(a)
    assert "a.py" in str(info.value) and "b.py" in str(info.value) and "c.py" in str(info.value)


def test_self_parent_is_a_cycle(tmp_path):
    a = write(tmp_path / "a.py", "parents = ['a.py']\n")
    with pytest.raises(ValueError, match="cycle"):
        load_config(a)


def test_missing_parent_file_is_reported(tmp_path):
    a = write(tmp_path / "a.py", "parents = ['nope.py']\n")
    with pytest.raises(FileNotFoundError, match="nope.py"):
        load_config(a)


def test_non_dict_config_is_rejected(tmp_path):
    a = write(tmp_path / "a.py", "config = [1, 2]\n")
    with pytest.raises(TypeError, match="config"):
        load_config(a)


def test_bad_parents_type_is_rejected(tmp_path):
    a = write(tmp_path / "a.py", "parents = 3\n")
    with pytest.raises(TypeError, match="parents"):
        load_config(a)


# ----------------------------------------------------------------------- overrides


@pytest.fixture
def base_cfg(tmp_path) -> Path:
    return write(
        tmp_path / "base.py",
        """
        trainer = dict(
            max_steps=100,
            name="run",
            optimizer_cfg=dict(type="torch.optim.AdamW", lr=1e-3),
            hooks=[dict(type="ProgressHook", interval=10), dict(type="LoggingHook", interval=50)],
            sizes=[1, 2, 3],
        )
        """,
    )


@pytest.mark.parametrize(
    "override, path, expected",
    [
        ("trainer.max_steps=5", ("max_steps",), 5),
        ("trainer.optimizer_cfg.lr=3e-4", ("optimizer_cfg", "lr"), 3e-4),
        ("trainer.optimizer_cfg.lr=-1", ("optimizer_cfg", "lr"), -1),
        ("trainer.name='text'", ("name",), "text"),
        ('trainer.name="with space"', ("name",), "with space"),
        ("trainer.name=plain_word", ("name",), "plain_word"),
        ("trainer.name=torch.optim.SGD", ("name",), "torch.optim.SGD"),
        ("trainer.name=a=b", ("name",), "a=b"),
        ("trainer.max_steps=None", ("max_steps",), None),
        ("trainer.max_steps=none", ("max_steps",), None),
        ("trainer.max_steps=null", ("max_steps",), None),
        ("trainer.max_steps=True", ("max_steps",), True),
        ("trainer.max_steps=false", ("max_steps",), False),
        ("trainer.sizes=[64, 64]", ("sizes",), [64, 64]),
        ("trainer.sizes=[]", ("sizes",), []),
        ("trainer.sizes=(1, 2)", ("sizes",), (1, 2)),
        ("trainer.optimizer_cfg={'type': 'x'}", ("optimizer_cfg",), {"type": "x"}),
        (" trainer.max_steps = 7 ", ("max_steps",), 7),
    ],
)
def test_override_values(base_cfg, override, path, expected):
    cfg = load_config(base_cfg, [override])
    node = cfg["trainer"]
    for part in path:
        node = node[part]
    assert node == expected
    assert type(node) is type(expected)


def test_list_index_overrides(base_cfg):
    cfg = load_config(
        base_cfg,
        ["trainer.hooks.0.interval=5", "trainer.hooks.-1.interval=7", "trainer.sizes.1=20"],
    )
    assert cfg["trainer"]["hooks"] == [{"type": "ProgressHook", "interval": 5}, {"type": "LoggingHook", "interval": 7}]
    assert cfg["trainer"]["sizes"] == [1, 20, 3]


def test_replacing_a_whole_list_item(base_cfg):
    cfg = load_config(base_cfg, ["trainer.hooks.1={'type': 'Other'}"])
    assert cfg["trainer"]["hooks"][1] == {"type": "Other"}


def test_overrides_apply_in_order(base_cfg):
    cfg = load_config(base_cfg, ["trainer.max_steps=1", "trainer.max_steps=2"])
    assert cfg["trainer"]["max_steps"] == 2


def test_new_leaf_keys_are_allowed(base_cfg):
    cfg = load_config(base_cfg, ["trainer.grad_clip=1.0", "trainer.optimizer_cfg.weight_decay=0.1", "seed=3"])
    assert cfg["trainer"]["grad_clip"] == 1.0
    assert cfg["trainer"]["optimizer_cfg"] == {"type": "torch.optim.AdamW", "lr": 1e-3, "weight_decay": 0.1}
    assert cfg["seed"] == 3


@pytest.mark.parametrize(
    "override, match",
    [
        ("trainer.missing.lr=1", "missing"),
        ("nothere.x=1", "nothere"),
        ("trainer.hooks.5.interval=1", "out of range"),
        ("trainer.hooks.-3.interval=1", "out of range"),
        ("trainer.hooks.first.interval=1", "not a list index"),
        ("trainer.sizes.7=1", "out of range"),
        ("trainer.max_steps.x=1", "int"),
    ],
)
def test_override_path_errors(base_cfg, override, match):
    with pytest.raises(KeyError, match=match):
        load_config(base_cfg, [override])


def test_missing_intermediate_key_message_lists_available_keys(base_cfg):
    with pytest.raises(KeyError) as info:
        load_config(base_cfg, ["trainer.optimiser_cfg.lr=1"])
    message = info.value.args[0]
    assert "trainer.optimiser_cfg" in message and "optimizer_cfg" in message


@pytest.mark.parametrize("bad", ["trainer.max_steps", "=5", "a..b=1", ".a=1", "a.=1", "a b=1", ""])
def test_override_syntax_errors(base_cfg, bad):
    with pytest.raises(ValueError, match="key.path=value"):
        load_config(base_cfg, [bad])


def test_overrides_as_a_single_string_are_rejected(base_cfg):
    with pytest.raises(TypeError, match="overrides"):
        load_config(base_cfg, "trainer.max_steps=5")


def test_parse_override():
    assert parse_override("a.b.0=1e-3") == (["a", "b", "0"], 0.001)
    assert parse_override("x=[1, 'a']") == (["x"], [1, "a"])


def test_overrides_as_mapping_are_not_mutated_or_aliased(base_cfg):
    new_hooks = [{"type": "Fresh", "interval": 1}]
    overrides = {"trainer.hooks": new_hooks, "trainer.optimizer_cfg.lr": 0.5}
    snapshot = copy.deepcopy(overrides)
    cfg = load_config(base_cfg, overrides)
    assert overrides == snapshot
    assert cfg["trainer"]["hooks"] == new_hooks
    assert cfg["trainer"]["optimizer_cfg"]["lr"] == 0.5
    cfg["trainer"]["hooks"][0]["interval"] = 99
    assert new_hooks[0]["interval"] == 1  # the config holds a copy


def test_apply_overrides_does_not_mutate_its_input():
    cfg = {"trainer": {"max_steps": 1, "hooks": [{"interval": 1}]}}
    snapshot = copy.deepcopy(cfg)
    out = apply_overrides(cfg, ["trainer.max_steps=2", "trainer.hooks.0.interval=3", "trainer.new=1"])
    assert cfg == snapshot
    assert out == {"trainer": {"max_steps": 2, "hooks": [{"interval": 3}], "new": 1}}
    out["trainer"]["hooks"][0]["interval"] = 100
    assert cfg["trainer"]["hooks"][0]["interval"] == 1


def test_apply_overrides_mapping_form():
    cfg = {"a": {"b": [0, 1]}}
    value = {"deep": [1, 2]}
    overrides = {"a.b.1": value, "a.c": 3}
    out = apply_overrides(cfg, overrides)
    assert out == {"a": {"b": [0, {"deep": [1, 2]}], "c": 3}}
    assert cfg == {"a": {"b": [0, 1]}}
    out["a"]["b"][1]["deep"].append(3)
    assert value == {"deep": [1, 2]}
    assert overrides == {"a.b.1": {"deep": [1, 2]}, "a.c": 3}


def test_merge_configs_does_not_mutate_or_alias_inputs():
    base = {"t": {"a": 1, "lst": [1, 2], "opt": {"lr": 1}}, "keep": {"x": [1]}}
    override = {"t": {"a": 2, "opt": {"_replace_": True, "lr": 2}, "new": [3]}, "add": {"y": 1}}
    base_snap, override_snap = copy.deepcopy(base), copy.deepcopy(override)
    out = merge_configs(base, override)
    assert base == base_snap
    assert override == override_snap  # `_replace_` is still there
    assert out == {
        "t": {"a": 2, "lst": [1, 2], "opt": {"lr": 2}, "new": [3]},
        "keep": {"x": [1]},
        "add": {"y": 1},
    }
    out["t"]["lst"].append(9)
    out["keep"]["x"].append(9)
    out["t"]["new"].append(9)
    out["add"]["y"] = 2
    assert base == base_snap and override == override_snap


def test_merge_configs_dict_replaces_scalar_and_scalar_replaces_dict():
    assert merge_configs({"a": 1}, {"a": {"b": 2}}) == {"a": {"b": 2}}
    assert merge_configs({"a": {"b": 2}}, {"a": 1}) == {"a": 1}


def test_load_config_returns_fresh_objects_each_time(base_cfg):
    first = load_config(base_cfg)
    first["trainer"]["hooks"].clear()
    assert len(load_config(base_cfg)["trainer"]["hooks"]) == 2


# =========================================================================== registry


def test_register_decorator_forms():
    reg = Registry("test")

    @reg.register()
    class WithParens:
        pass

    @reg.register
    class NoParens:
        pass

    @reg.register(name="renamed")
    class Named:
        pass

    @reg.register("short")
    def shorthand():
        return "s"

    def plain():
        return "p"

    assert reg.register(plain) is plain
    # decorators hand back the object itself
    assert isinstance(WithParens, type) and isinstance(NoParens, type) and isinstance(Named, type)
    assert shorthand() == "s"
    assert reg.names() == sorted(["WithParens", "NoParens", "renamed", "short", "plain"])
    assert "Named" not in reg and "renamed" in reg
    assert len(reg) == 5
    assert reg.get("renamed") is Named
    assert reg.get("short") is shorthand


def test_duplicate_name_is_an_error_unless_forced():
    reg = Registry("test")

    @reg.register()
    class Thing:
        pass

    reg.register(Thing)  # the same object again is fine

    class Other:
        pass

    with pytest.raises(KeyError, match="already registered") as info:
        reg.register(name="Thing")(Other)
    assert "force=True" in info.value.args[0]
    assert reg.get("Thing") is Thing

    reg.register(Other, name="Thing", force=True)
    assert reg.get("Thing") is Other


def test_register_rejects_bad_name_and_non_callables():
    reg = Registry("test")
    with pytest.raises(TypeError, match="name"):
        reg.register(name=3)
    with pytest.raises(TypeError, match="register"):
        reg.register(name="x")(42)


def test_builtin_names_are_registered():
    for name in ("ClassificationTrainer", "MLP", "ProgressHook", "LoggingHook", "digits_loaders"):
        assert name in REGISTRY


# =========================================================================== build_from_cfg


class Leaf:
    def __init__(self, value=0, **extra):
        self.value = value
        self.extra = extra


class Node:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


@pytest.fixture
def reg() -> Registry:
    r = Registry("test")
    r.register(Leaf)
    r.register(Node)
    return r


def test_build_registered_name(reg):
    obj = build_from_cfg({"type": "Leaf", "value": 3}, registry=reg)
    assert isinstance(obj, Leaf) and obj.value == 3


def test_build_from_global_registry():
    model = build_from_cfg({"type": "MLP", "in_features": 4, "out_features": 2, "hidden_sizes": [8]})
    assert isinstance(model, nn.Module)
    assert model(torch.zeros(3, 4)).shape == (3, 2)


def test_build_dotted_path_with_params_kwarg():
    model = nn.Linear(3, 1)
    opt = build_from_cfg({"type": "torch.optim.AdamW", "lr": 3e-4, "weight_decay": 0.0}, params=model.parameters())
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.param_groups[0]["lr"] == 3e-4
    assert opt.param_groups[0]["weight_decay"] == 0.0
    assert {id(p) for p in opt.param_groups[0]["params"]} == {id(p) for p in model.parameters()}


def test_build_dotted_path_errors():
    with pytest.raises(KeyError, match="no_such_module_xyz"):
        build_from_cfg({"type": "no_such_module_xyz.Thing"})
    with pytest.raises(KeyError, match="AdamQ"):
        build_from_cfg({"type": "torch.optim.AdamQ"})


def test_build_callable_type():
    assert build_from_cfg({"type": dict, "a": 1}) == {"a": 1}
    obj = build_from_cfg({"type": Leaf, "value": 5})
    assert isinstance(obj, Leaf) and obj.value == 5
    assert resolve_type(Leaf) is Leaf


def test_build_non_callable_type_is_rejected():
    with pytest.raises(TypeError, match="type"):
        build_from_cfg({"type": 42})


def test_recursive_building_of_nested_dicts_and_lists(reg):
    cfg = {
        "type": "Node",
        "child": {"type": "Leaf", "value": 1},
        "items": [{"type": "Leaf", "value": 2}, 3, {"plain": {"type": "Leaf", "value": 4}}],
        "pair": ({"type": "Leaf", "value": 5}, "x"),
        "plain_dict": {"a": 1, "inner": {"type": "Leaf", "value": 6}},
    }
    node = build_from_cfg(cfg, registry=reg)
    kw = node.kwargs
    assert isinstance(kw["child"], Leaf) and kw["child"].value == 1
    assert isinstance(kw["items"], list)
    assert isinstance(kw["items"][0], Leaf) and kw["items"][0].value == 2
    assert kw["items"][1] == 3
    assert isinstance(kw["items"][2]["plain"], Leaf) and kw["items"][2]["plain"].value == 4
    assert isinstance(kw["pair"], tuple) and isinstance(kw["pair"][0], Leaf) and kw["pair"][1] == "x"
    assert kw["plain_dict"]["a"] == 1 and isinstance(kw["plain_dict"]["inner"], Leaf)


def test_recursive_false_leaves_nested_dicts(reg):
    node = build_from_cfg({"type": "Node", "child": {"type": "Leaf"}}, recursive=False, registry=reg)
    assert node.kwargs["child"] == {"type": "Leaf"}


def test_cfg_keys_stay_plain_dicts(reg):
    cfg = {
        "type": "Node",
        "model_cfg": {"type": "Leaf", "value": 1},
        "hooks_cfg": [{"type": "Leaf"}],
        "nested": {"optimizer_cfg": {"type": "Leaf"}, "built": {"type": "Leaf"}},
    }
    node = build_from_cfg(cfg, registry=reg)
    assert node.kwargs["model_cfg"] == {"type": "Leaf", "value": 1}
    assert node.kwargs["hooks_cfg"] == [{"type": "Leaf"}]
    assert node.kwargs["nested"]["optimizer_cfg"] == {"type": "Leaf"}
    assert isinstance(node.kwargs["nested"]["built"], Leaf)
    # the plain dicts handed out are copies, not the caller's
    node.kwargs["model_cfg"]["value"] = 99
    assert cfg["model_cfg"]["value"] == 1


def test_kwargs_override_cfg_keys(reg):
    obj = build_from_cfg({"type": "Leaf", "value": 1, "other": 2}, registry=reg, value=10)
    assert obj.value == 10 and obj.extra == {"other": 2}


def test_kwargs_can_supply_missing_arguments(reg):
    obj = build_from_cfg({"type": "Leaf"}, registry=reg, other="x")
    assert obj.value == 0 and obj.extra == {"other": "x"}


def test_cfg_is_not_mutated(reg):
    cfg = {
        "type": "Node",
        "child": {"type": "Leaf", "value": 1},
        "items": [{"type": "Leaf"}],
        "model_cfg": {"type": "Leaf"},
    }
    snapshot = copy.deepcopy(cfg)
    build_from_cfg(cfg, registry=reg, extra=1)
    build_from_cfg(cfg, registry=reg)
    assert cfg == snapshot
    assert isinstance(cfg["child"], dict) and isinstance(cfg["items"][0], dict)


def test_unknown_type_message_names_type_and_suggests(reg):
    reg.register(name="MyModel")(Leaf)
    with pytest.raises(KeyError) as info:
        build_from_cfg({"type": "MyModle"}, registry=reg)
    message = info.value.args[0]
    assert "MyModle" in message
    assert "did you mean" in message and "'MyModel'" in message
    assert "test" in message  # the registry's name


def test_unknown_type_in_global_registry_suggests_close_match():
    with pytest.raises(KeyError, match="ClasificationTrainer") as info:
        build_from_cfg({"type": "ClasificationTrainer"})
    assert "'ClassificationTrainer'" in info.value.args[0]


def test_unknown_nested_type_is_reported(reg):
    with pytest.raises(KeyError, match="Missing"):
        build_from_cfg({"type": "Node", "child": {"type": "Missing"}}, registry=reg)


def test_missing_type_key_and_non_dict_cfg():
    with pytest.raises(KeyError, match="type"):
        build_from_cfg({"lr": 1})
    with pytest.raises(TypeError, match="cfg"):
        build_from_cfg(["type", "Leaf"])


def test_bad_arguments_name_the_type():
    with pytest.raises(TypeError, match=r"torch\.nn\.modules\.linear\.Linear"):
        build_from_cfg({"type": "torch.nn.Linear", "in_features": 2})


def test_bad_parents_entry_is_rejected(tmp_path):
    a = write(tmp_path / "a.py", "parents = [3]\n")
    with pytest.raises(TypeError, match="'parents' entries must be paths; got int 3"):
        load_config(a)
