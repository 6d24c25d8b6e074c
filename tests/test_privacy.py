"""Strategies, hooks and every other module use BaseTrainer's documented surface only
(docs/strategies.md): no module but trainer.py reads, writes or overrides an underscore
member that BaseTrainer defines. Parsed with `ast`, so a new violation anywhere in the
package fails here with its file, line and name."""

from __future__ import annotations

import ast
from pathlib import Path

import mini_trainer

PACKAGE = Path(mini_trainer.__file__).parent
TRAINER = PACKAGE / "trainer.py"


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def trainer_private_members(source: str) -> set[str]:
    """Underscore names BaseTrainer defines: methods, class attributes, `self._x` attributes."""
    tree = ast.parse(source)
    (cls,) = [node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "BaseTrainer"]
    names = set()
    for node in cls.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    for node in ast.walk(cls):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
            names.add(node.attr)
    return {name for name in names if _is_private(name)}


def _base_names(cls: ast.ClassDef) -> set[str]:
    return {b.id if isinstance(b, ast.Name) else b.attr for b in cls.bases if isinstance(b, (ast.Name, ast.Attribute))}


def trainer_classes(modules: dict[str, ast.Module]) -> set[str]:
    """Names of the package's classes that derive from BaseTrainer (through any chain)."""
    bases = {node.name: _base_names(node) for tree in modules.values() for node in ast.walk(tree)
             if isinstance(node, ast.ClassDef)}
    found = {"BaseTrainer"}
    while True:
        more = {name for name, parents in bases.items() if parents & found} - found
        if not more:
            return found - {"BaseTrainer"}
        found |= more


def violations(modules: dict[str, ast.Module], private: set[str]) -> list[str]:
    """`file:line name` for every use of a BaseTrainer private outside trainer.py: `x._name`
    on anything but a class's own `self`, and `self._name` or `def _name` in a trainer subclass."""
    subclasses = trainer_classes(modules)
    found = []
    for filename, tree in modules.items():
        in_trainer_class: set[int] = set()
        for cls in ast.walk(tree):
            if isinstance(cls, ast.ClassDef) and cls.name in subclasses:
                in_trainer_class.update(id(node) for node in ast.walk(cls))
                for node in cls.body:
                    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in private:
                        found.append(f"{filename}:{node.lineno} overrides {node.name}")
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and node.attr in private):
                continue
            on_self = isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")
            if not on_self or id(node) in in_trainer_class:
                found.append(f"{filename}:{node.lineno} uses {ast.unparse(node)}")
    return found


def _package_modules() -> dict[str, ast.Module]:
    return {
        str(path.relative_to(PACKAGE.parent)): ast.parse(path.read_text(), str(path))
        for path in sorted(PACKAGE.rglob("*.py"))
        if path != TRAINER
    }


def test_no_module_but_trainer_py_uses_base_trainer_privates():
    private = trainer_private_members(TRAINER.read_text())
    assert {"_built", "_given", "_run", "_world"} <= private  # the checker sees what it must guard
    assert violations(_package_modules(), private) == []


def test_the_check_finds_each_kind_of_violation():
    private = {"_built", "_given", "_world"}
    module = ast.parse(
        "class Mine(SomeStrategy):\n"
        "    def _built(self):\n"  # overrides a private
        "        return self._world\n"  # reads one in a subclass
        "class Hook:\n"
        "    def on_after_step(self, trainer):\n"
        "        trainer._given['x'] = 1\n"  # writes one through another object
        "        return self._built\n"  # a hook's own private: fine
    )
    strategy = ast.parse("class SomeStrategy(BaseTrainer):\n    pass\n")
    found = violations({"mine.py": module, "strategy.py": strategy}, private)
    assert found == ["mine.py:2 overrides _built", "mine.py:3 uses self._world", "mine.py:6 uses trainer._given"]
