"""Any nested training state <-> a JSON skeleton plus `{file: {key: tensor}}`, and back.

Values JSON cannot hold exactly are tagged (`{"$tuple": [...]}`, `{"$float": "nan"}`, ...).
Reading a skeleton back trusts nothing: every tag is checked (dtype names against an
explicit list, numpy scalars only of numeric types and the size their type says, each
tensor referred to exactly once), and anything else is a CheckpointError naming the
state path, since a checkpoint directory may have been crafted.
"""

from __future__ import annotations

import math
import re
import sys
from collections import Counter
from collections.abc import Mapping
from typing import Any

import torch

from .errors import CheckpointError
from .files import is_count

MODEL_FILE = "model.safetensors"
DEFAULT_FILE = "optimizer.safetensors"
#: Where tensors go, by dotted prefix of their path in the state; the rest go to DEFAULT_FILE.
DEFAULT_FILES = {"model": MODEL_FILE}

# The dtypes a `$dtype` tag may name: `getattr(torch, name)` would hand out any attribute.
_DTYPE_NAMES = (
    "float64", "float32", "float16", "bfloat16", "complex32", "complex64", "complex128",
    "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "bool",
    "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu",
    "qint8", "quint8", "qint32", "quint4x2",
)
DTYPES = {name: getattr(torch, name) for name in _DTYPE_NAMES if isinstance(getattr(torch, name, None), torch.dtype)}
# numpy scalars: booleans, integers and floats of at most 8 bytes, written as numpy's
# dtype.str ("<f8", "|b1"); nothing that allocates (void, strings) or runs code (objects).
_NUMPY_SCALAR = re.compile(r"^[<>|=]?[biuf][1248]$")
_FLOAT_WORDS = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
_TAGS = ("$tensor", "$float", "$dict", "$tuple", "$size", "$dtype", "$device", "$ndarray", "$numpy")


def split_state(
    state: Any, files: Mapping[str, str] | None = None, default_file: str = DEFAULT_FILE
) -> tuple[Any, dict[str, dict[str, torch.Tensor]]]:
    """Split nested `state` into a JSON-able skeleton and `{file: {key: tensor}}`.

    `files` maps a dotted path prefix (e.g. "model", "hooks.ema.weights") to the file its
    tensors go to, keyed relative to the prefix (so model.safetensors holds the usual
    parameter names); every other tensor goes to `default_file` under its full dotted path.
    Dicts (any key type), lists, tuples, `torch.Size`, numbers (NaN/inf included), strings,
    None, dtypes, devices and numpy arrays/scalars are kept exactly; anything else is an
    error naming its path, since the alternative would be pickling it.
    """
    routes = sorted(
        ((tuple(prefix.split(".")), name) for prefix, name in {**DEFAULT_FILES, **(files or {})}.items()),
        key=lambda r: -len(r[0]),
    )
    tensors: dict[str, dict[str, torch.Tensor]] = {}

    def store(tensor: torch.Tensor, path: tuple[str, ...]) -> dict[str, Any]:
        file, key_path = default_file, path
        for prefix, name in routes:
            if path[: len(prefix)] == prefix:
                file, key_path = name, path[len(prefix):]
                break
        bucket = tensors.setdefault(file, {})
        key = base = ".".join(key_path) or "tensor"
        n = 1
        while key in bucket:  # a dotted key can repeat ("a.b" under "a" vs key "a.b")
            key, n = f"{base}#{n}", n + 1
        bucket[key] = tensor.detach()
        return {"$tensor": [file, key]}

    numpy = sys.modules.get("numpy")

    def encode(value: Any, path: tuple[str, ...]) -> Any:
        if isinstance(value, torch.Tensor):
            return store(value, path)
        if numpy is not None and isinstance(value, numpy.generic):  # before float: np.float64 is a float
            return {"$numpy": [value.dtype.str, encode(value.item(), path)]}
        if value is None or isinstance(value, (bool, int, str)):
            return value
        if isinstance(value, float):
            return value if math.isfinite(value) else {"$float": repr(float(value))}
        if isinstance(value, Mapping):
            keys_plain = all(isinstance(k, str) and not k.startswith("$") for k in value)
            if keys_plain:
                return {k: encode(v, (*path, k)) for k, v in value.items()}
            return {"$dict": [[encode(k, path), encode(v, (*path, str(k)))] for k, v in value.items()]}
        if isinstance(value, torch.Size):
            return {"$size": list(value)}
        if type(value) is tuple:
            return {"$tuple": [encode(v, (*path, str(i))) for i, v in enumerate(value)]}
        if type(value) is list:
            return [encode(v, (*path, str(i))) for i, v in enumerate(value)]
        if isinstance(value, torch.dtype):
            return {"$dtype": str(value).removeprefix("torch.")}
        if isinstance(value, torch.device):
            return {"$device": str(value)}
        if numpy is not None and isinstance(value, numpy.ndarray):
            return {"$ndarray": store(torch.from_numpy(value.copy()), path)["$tensor"]}
        where = ".".join(path) or "<root>"
        raise TypeError(
            f"cannot checkpoint {type(value).__module__}.{type(value).__qualname__} at state path {where!r}: "
            "checkpoints hold tensors, numbers, strings, None, dtypes, devices, numpy arrays and "
            "dicts/lists/tuples of them (nothing is pickled); convert it in your state_dict()"
        )

    return encode(state, ()), tensors


def join_state(skeleton: Any, tensors: Mapping[str, Mapping[str, torch.Tensor]]) -> Any:
    """Inverse of `split_state`: the original nested state. Every tensor in `tensors` must
    be referred to exactly once (two references would make two parameters share storage)."""
    used: set[tuple[str, str]] = set()

    def fail(path: list[str], what: str) -> CheckpointError:
        return CheckpointError(f"state path {'.'.join(path) or '<root>'!r}: {what}")

    def tensor(ref: Any, path: list[str]) -> torch.Tensor:
        if not (isinstance(ref, list) and len(ref) == 2 and all(isinstance(r, str) for r in ref)):
            raise fail(path, f"malformed tensor reference {ref!r}")
        file, key = ref
        if (file, key) in used:
            raise fail(path, f"tensor {key!r} in {file} is referred to twice (it would be shared by two entries)")
        try:
            found = tensors[file][key]
        except KeyError:
            raise fail(path, f"refers to tensor {key!r} in {file}, which is not there") from None
        used.add((file, key))
        return found

    def numpy_scalar(body: Any, path: list[str]) -> Any:
        if not (
            isinstance(body, list) and len(body) == 2 and isinstance(body[0], str) and _NUMPY_SCALAR.match(body[0])
        ):
            raise fail(
                path,
                f"$numpy tag {str(body)[:80]!r}: only bool, int and float scalars of at most 8 bytes are allowed",
            )
        import numpy

        try:
            dtype = numpy.dtype(body[0])
        except TypeError:  # e.g. "<f1": no such type
            raise fail(path, f"$numpy tag names no numpy type: {body[0]!r}") from None
        value = decode(body[1], path)
        expected = {"b": (bool,), "i": (int,), "u": (int,), "f": (int, float)}[dtype.kind]
        if isinstance(value, bool) != (dtype.kind == "b") or not isinstance(value, expected):
            raise fail(path, f"$numpy value {value!r} is not a {dtype.name}")
        try:
            return dtype.type(value)
        except (OverflowError, ValueError) as err:
            raise fail(path, f"$numpy value {value!r} does not fit {dtype.name} ({err})") from None

    def tagged(tag: str, body: Any, path: list[str]) -> Any:
        if tag == "$tensor":
            return tensor(body, path)
        if tag == "$float":
            if not isinstance(body, str) or body not in _FLOAT_WORDS:
                raise fail(path, f"$float tag {str(body)[:40]!r} is not one of {sorted(_FLOAT_WORDS)}")
            return _FLOAT_WORDS[body]
        if tag == "$dict":
            if not isinstance(body, list) or not all(isinstance(p, list) and len(p) == 2 for p in body):
                raise fail(path, "$dict tag is not a list of [key, value] pairs")
            pairs = [(decode(k, path), v) for k, v in body]
            try:
                return {k: decode(v, [*path, str(k)]) for k, v in pairs}
            except TypeError:
                raise fail(path, "$dict tag has a key that cannot be a dict key") from None
        if tag == "$tuple":
            if not isinstance(body, list):
                raise fail(path, "$tuple tag is not a list")
            return tuple(decode(v, [*path, str(i)]) for i, v in enumerate(body))
        if tag == "$size":
            if not isinstance(body, list) or not all(is_count(d) for d in body):
                raise fail(path, f"$size tag {str(body)[:80]!r} is not a list of sizes >= 0")
            return torch.Size(body)
        if tag == "$dtype":
            if not isinstance(body, str) or body not in DTYPES:
                raise fail(path, f"$dtype tag {str(body)[:40]!r} is not a dtype name (allowed: {', '.join(DTYPES)})")
            return DTYPES[body]
        if tag == "$device":
            if isinstance(body, str) and len(body) <= 64:
                try:
                    return torch.device(body)
                except RuntimeError:
                    pass
            raise fail(path, f"$device tag {str(body)[:80]!r} is not a device")
        if tag == "$ndarray":
            try:
                return tensor(body, path).numpy()
            except TypeError as err:  # bfloat16 and others numpy has no type for
                raise fail(path, f"$ndarray cannot be a numpy array ({err})") from None
        return numpy_scalar(body, path)

    def decode(value: Any, path: list[str]) -> Any:
        if isinstance(value, list):
            return [decode(v, [*path, str(i)]) for i, v in enumerate(value)]
        if not isinstance(value, dict):
            return value
        if len(value) == 1:
            (tag, body), = value.items()
            if tag in _TAGS:
                return tagged(tag, body, path)
        odd = [k for k in value if k.startswith("$")]
        if odd:  # split_state writes such keys only inside a $dict
            raise fail(path, f"unknown tag {odd[0][:40]!r}")
        return {k: decode(v, [*path, k]) for k, v in value.items()}

    try:
        state = decode(skeleton, [])
    except RecursionError:
        raise CheckpointError("the state is nested too deeply to be a training state") from None
    unused = [(file, key) for file, bucket in tensors.items() for key in bucket if (file, key) not in used]
    if unused:
        file, key = unused[0]
        raise CheckpointError(
            f"{file} holds {len(unused)} tensor(s) that the manifest does not refer to (e.g. {key!r})"
        )
    return state


# Name parts of wrappers (torch.compile, FSDP1, activation checkpointing), never of the plain
# module. A leading "module." (DDP) is apart: a model may own a submodule called "module".
_WRAPPER_PARTS = {"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"}


def unwrapped_names(tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
    """`tensors` under the plain module's names, and how many were renamed: every
    `_orig_mod` (torch.compile), `_fsdp_wrapped_module`, `_checkpoint_wrapped_module` part
    removed, and a leading `module.` (DDP) when every key has one."""
    names = {k: ".".join(p for p in k.split(".") if p not in _WRAPPER_PARTS) for k in tensors}
    if names and all(n.startswith("module.") for n in names.values()):
        names = {k: n.removeprefix("module.") for k, n in names.items()}
    clashes = sorted(n for n, count in Counter(names.values()).items() if count > 1)
    if clashes:
        raise CheckpointError(f"removing wrapper prefixes makes names collide: {', '.join(clashes[:5])}")
    return {names[k]: v for k, v in tensors.items()}, sum(k != n for k, n in names.items())
