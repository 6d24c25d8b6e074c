"""`mini-trainer ckpt list|inspect|verify|export` on real checkpoints: what each shows, the
damage each finds (and names), the exit codes, and exported weights that load, bit for bit,
into a fresh model with nothing but safetensors and `load_state_dict` (also from compiled,
DDP-style and sharded FSDP2 checkpoints)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

import mini_trainer
from helpers import make_model, make_trainer, mse_forward, regression_batches
from mini_trainer import BaseTrainer, CheckpointingHook, EmaHook, EvalHook, checkpoint
from mini_trainer.checkpoint import inspection
from mini_trainer.ckpt_cli import add_ckpt_command, run_ckpt

SUBCOMMANDS = ("list", "inspect", "verify", "export")


def bn_model() -> nn.Module:
    """An int64 buffer too (BatchNorm's num_batches_tracked): --dtype must leave it alone."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 1))


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="mini-trainer")
    add_ckpt_command(top.add_subparsers(dest="command"))
    return top


def ckpt(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = run_ckpt(parser().parse_args(["ckpt", *map(str, argv)]))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """8 steps of Adam with an EMA, evaluated every 2 steps, saved every 3 and at each new best."""
    workspace = tmp_path_factory.mktemp("run")
    ema = EmaHook(decay=0.9)
    hooks = [EvalHook(interval=2), ema, CheckpointingHook(interval=3, keep_previous=5, keep_best="val/loss")]
    trainer = make_trainer(regression_batches(5, 4), max_steps=8, workspace=workspace, seed=0, optimizer="adam",
                           model=bn_model(), eval_loaders=regression_batches(2, 3, seed=9), hooks=hooks)
    trainer.train()
    return workspace, trainer, ema


def root_of(workspace: Path) -> Path:
    return workspace / "checkpoints"


def damaged_copy(run, tmp_path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(run[0], copy)
    return copy


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(data)


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


# ---------------------------------------------------------------- list


def test_list_shows_steps_markers_sizes_and_the_best_metric(run, capsys):
    workspace, trainer, _ = run
    root = root_of(workspace)
    best = checkpoint.read_pointer(root, "best")
    code, out, _ = ckpt(capsys, "list", workspace)
    assert code == 0
    assert f"checkpoints in {root} (the checkpoints of run directory {workspace})" in out
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith("  step_")}
    assert list(rows) == [d.name for _, d in checkpoint.list_checkpoints(root)]
    assert all(" VALID " in row for row in rows.values())
    assert " latest " in rows["step_000000008"] and " best " in rows[best.name]
    assert rows["step_000000008"].split()[1:3] == ["8", str(trainer.epoch)]
    entry = json.loads((best / "manifest.json").read_text())["best"]
    assert f"best: {best.name}, val/loss = {entry['value']:.6g} (min)" in out
    assert "val/loss=" in rows[best.name]  # that step's evaluation results
    assert f"{len(rows)} valid, 0 damaged (re-hashed)" in out


def test_list_names_damaged_files_and_leftovers(run, tmp_path, capsys):
    workspace = damaged_copy(run, tmp_path)
    root = root_of(workspace)
    flip_byte(root / "step_000000003" / "model.safetensors")
    (root / "step_000000006" / "ema.safetensors").unlink()
    (root / ".tmp-step_000000009-999999-abcd1234").mkdir()
    code, out, _ = ckpt(capsys, "list", root)
    assert code == 0  # list reports; verify is the check with an exit code
    lines = out.splitlines()
    at = {line.split()[0]: i for i, line in enumerate(lines) if line.startswith("  step_")}
    assert " DAMAGED " in lines[at["step_000000003"]] and " DAMAGED " in lines[at["step_000000006"]]
    assert lines[at["step_000000003"] + 1].strip() == (
        "model.safetensors: does not match its sha256 in the manifest (damaged or truncated)")
    assert lines[at["step_000000006"] + 1].strip() == "ema.safetensors: missing"
    assert "leftovers" in out and ".tmp-step_000000009-999999-abcd1234/" in out
    assert ", 2 damaged" in out
    listing = inspection.list_checkpoint_root(root, hash=False)  # sizes only: the flipped byte passes
    assert [str(p) for c in listing.checkpoints for p in c.problems] == ["ema.safetensors: missing"]


# ---------------------------------------------------------------- verify


def test_verify_exit_codes_and_the_file_named(run, tmp_path, capsys):
    workspace = damaged_copy(run, tmp_path)
    root = root_of(workspace)
    code, out, _ = ckpt(capsys, "verify", root / "step_000000008")
    assert code == 0 and out.startswith(f"OK       {root / 'step_000000008'}  (3 files,")
    assert ckpt(capsys, "verify", workspace)[0] == 0

    flip_byte(root / "step_000000008" / "optimizer.safetensors")
    code, out, _ = ckpt(capsys, "verify", root / "step_000000008")
    assert code == 1
    assert out == (f"DAMAGED  {root / 'step_000000008'}  optimizer.safetensors: does not match its sha256 "
                   "in the manifest (damaged or truncated)\n")
    code, out, _ = ckpt(capsys, "verify", workspace)
    assert code == 1 and out.count("OK ") == len(checkpoint.list_checkpoints(root)) - 1

    with open(root / "step_000000006" / "model.safetensors", "ab") as f:
        f.write(b"x")
    manifest = root / "step_000000003" / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"step": 3', '"step": 4'))
    ema = root / "step_000000002" / "ema.safetensors"
    os.replace(ema, tmp_path / "elsewhere.safetensors")
    ema.symlink_to(tmp_path / "elsewhere.safetensors")
    reasons = {c.path.name: [str(p) for p in c.problems]
               for c in (inspection.verify_checkpoint(d) for _, d in checkpoint.list_checkpoints(root))}
    size = json.loads((root / "step_000000006" / "manifest.json").read_text())["files"]["model.safetensors"]["bytes"]
    expected = f"model.safetensors: has {size + 1} bytes, the manifest says {size} (truncated?)"
    assert reasons["step_000000006"] == [expected]
    assert reasons["step_000000003"] == ["manifest.json: does not match its checksum (the file is damaged)"]
    assert reasons["step_000000002"][0].startswith("ema.safetensors: is a symbolic link")


def test_usage_errors_are_one_line_and_exit_2(run, tmp_path, capsys):
    foreign = tmp_path / "foreign"
    (foreign / "data").mkdir(parents=True)
    (foreign / "notes.txt").write_text("not a checkpoint")
    other = tmp_path / "other_manifest"
    other.mkdir()
    (other / "manifest.json").write_text('{"name": "a browser extension"}')
    for command in SUBCOMMANDS:
        extra = ["-o", tmp_path / "out.safetensors"] if command == "export" else []
        for path, needle in ((tmp_path / "missing", "no such file or directory"),
                             (foreign, "foreign directory: looked for manifest.json"),
                             (foreign / "notes.txt", "is a file, not a checkpoint directory"),
                             (other, "foreign directory: its manifest.json is not a mini_trainer.checkpoint")):
            code, out, err = ckpt(capsys, command, path, *extra)
            assert code == 2 and out == "", (command, path)
            assert err.startswith("mini-trainer: error: ") and needle in err and err.count("\n") == 1
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_each_subcommand_has_help_with_an_example(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parser().parse_args(["ckpt", command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: mini-trainer ckpt {command}") and f"  mini-trainer ckpt {command} " in out
    assert "Exit code" in out


def test_the_command_line_runs_it(run, capsys):
    from mini_trainer.cli import main

    assert main(["ckpt", "verify", str(run[0])]) == 0
    assert capsys.readouterr().out.endswith(" valid, 0 damaged\n")
    assert main(["ckpt", "list", str(run[0] / "missing")]) == 2
    assert capsys.readouterr().err == f"mini-trainer: error: {run[0] / 'missing'}: no such file or directory\n"
    done = subprocess.run([sys.executable, "-m", "mini_trainer", "ckpt", "export", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("usage: mini-trainer ckpt export")


def test_ckpt_without_a_subcommand_prints_help(capsys):
    assert run_ckpt(parser().parse_args(["ckpt"])) == 2
    assert "list" in capsys.readouterr().err


# ---------------------------------------------------------------- inspect


def test_inspect_shows_what_the_checkpoint_holds(run, capsys):
    workspace, trainer, _ = run
    root = root_of(workspace)
    code, out, _ = ckpt(capsys, "inspect", workspace)
    assert code == 0
    fields = {line[:12].strip(): line[13:] for line in out.splitlines() if not line.startswith(" ")}
    assert fields["checkpoint"] == str(root / "step_000000008")
    assert f"\n             the checkpoint `latest` names in {root}, the checkpoints of run directory" in out
    assert fields["format"] == "mini_trainer.checkpoint version 1"
    assert fields["step"] == f"8, epoch {trainer.epoch}"
    assert fields["markers"] == "latest" and fields["world size"] == "1"
    assert fields["optimizer"] == "torch.optim.adam.Adam"  # recorded by CheckpointingHook
    weights = trainer.unwrapped_model.state_dict()
    tensors, elements = len(weights), sum(t.numel() for t in weights.values())  # 9 and 82: BatchNorm's buffers too
    assert fields["hooks"] == f"ema: weights ({tensors} tensors, {elements} elements), updates, decay"
    assert "\n             eval: " in out and "\n             checkpointing: monitor, mode, best, best_step" in out
    assert fields["metrics"].startswith("val/loss=") and fields["lr scheduler"] == "none"
    model_line = next(line for line in out.splitlines() if line.startswith("  model.safetensors"))
    assert model_line.endswith(f"{tensors} tensors, {elements} elements (int64 x1, float32 x8)")
    assert "  group 0: 6 params; lr=0.1, betas=(0.9, 0.999), eps=1e-08, weight_decay=0," in out
    assert "  state per parameter: exp_avg, exp_avg_sq, step" in out
    assert "not re-hashed" in out


def test_inspect_infers_the_optimizer_of_checkpoints_that_do_not_record_it(tmp_path, capsys):
    model = make_model()
    for name, optimizer in (("sgd", torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)),
                            ("adamw", torch.optim.AdamW(model.parameters(), lr=0.1))):
        trainer = BaseTrainer(model=model, optimizer=optimizer, data_loader=regression_batches(2, 4), max_steps=2,
                              forward_fn=mse_forward, device="cpu")
        trainer.train()
        directory = checkpoint.save_checkpoint(trainer.state_dict(), tmp_path / name, fsync=False)
        code, out, _ = ckpt(capsys, "inspect", directory)
        assert code == 0
        expected = {"sgd": "torch.optim.SGD", "adamw": "torch.optim.AdamW"}[name]
        assert f"optimizer    {expected} (inferred from the param groups: not recorded" in out
        assert {"sgd": "momentum_buffer", "adamw": "exp_avg, exp_avg_sq"}[name] in out


def test_inspect_of_a_damaged_checkpoint_says_so(run, tmp_path, capsys):
    root = root_of(damaged_copy(run, tmp_path))
    (root / "step_000000008" / "model.safetensors").write_bytes(b"short")
    code, out, _ = ckpt(capsys, "inspect", root / "step_000000008")
    assert code == 1
    size = json.loads((root / "step_000000008" / "manifest.json").read_text())["files"]["model.safetensors"]["bytes"]
    assert out.splitlines()[-1] == f"DAMAGED  model.safetensors: has 5 bytes, the manifest says {size} (truncated?)"
    assert "hooks        ? (the state cannot be read: see DAMAGED below)" in out


# ---------------------------------------------------------------- export


def test_export_loads_into_a_fresh_model_bit_for_bit_with_its_metadata(run, tmp_path, capsys):
    workspace, trainer, _ = run
    out_file = tmp_path / "model.safetensors"
    code, out, _ = ckpt(capsys, "export", workspace, "-o", out_file)
    assert code == 0
    source = root_of(workspace) / "step_000000008"
    assert out.startswith(f"exported the model weights of {source} (step 8, epoch {trainer.epoch})")
    assert f"\n  (the newest valid checkpoint in {source.parent}, the checkpoints of run directory" in out
    fresh = bn_model()
    fresh.load_state_dict(load_file(out_file))  # strict: exactly the model's names
    assert same(fresh.state_dict(), trainer.unwrapped_model.state_dict())
    with safe_open(str(out_file), "pt") as f:
        metadata = f.metadata()
    assert metadata == {"format": "pt", "step": "8", "epoch": str(trainer.epoch), "source": str(source.resolve()),
                        "weights": "model", "mini_trainer_version": mini_trainer.__version__}
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # no temporary left


def test_export_ema_and_dtype(run, tmp_path, capsys):
    workspace, _, ema = run
    out_file = tmp_path / "ema.safetensors"
    code, out, _ = ckpt(capsys, "export", root_of(workspace) / "step_000000008", "-o", out_file, "--ema",
                        "--dtype", "bf16")
    assert code == 0 and "exported the EMA weights (ema)" in out and "cast to bfloat16" in out
    exported = load_file(out_file)
    expected = ema.ema_model.state_dict()
    assert exported["1.num_batches_tracked"].dtype == torch.int64  # integers are not cast
    assert all(v.dtype == torch.bfloat16 for k, v in exported.items() if k != "1.num_batches_tracked")
    assert same(exported, {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in expected.items()})
    with safe_open(str(out_file), "pt") as f:
        assert (f.metadata()["weights"], f.metadata()["hook"], f.metadata()["dtype"]) == ("ema", "ema", "bfloat16")
    assert ckpt(capsys, "export", workspace, "-o", tmp_path / "f32.safetensors", "--ema")[0] == 0
    fresh = bn_model()
    fresh.load_state_dict(load_file(tmp_path / "f32.safetensors"))
    assert same(fresh.state_dict(), expected)


def test_export_refuses_to_overwrite_without_force(run, tmp_path, capsys):
    out_file = tmp_path / "model.safetensors"
    out_file.write_bytes(b"keep me")
    code, out, err = ckpt(capsys, "export", run[0], "-o", out_file)
    assert code == 2 and "exists; pass force=True (--force)" in err and out_file.read_bytes() == b"keep me"
    assert ckpt(capsys, "export", run[0], "-o", out_file, "--force")[0] == 0
    assert load_file(out_file).keys() == run[1].unwrapped_model.state_dict().keys()


def test_export_of_a_damaged_checkpoint_fails_with_exit_1(run, tmp_path, capsys):
    root = root_of(damaged_copy(run, tmp_path))
    flip_byte(root / "step_000000008" / "model.safetensors")
    code, _, err = ckpt(capsys, "export", root / "step_000000008", "-o", tmp_path / "x.safetensors")
    assert code == 1 and "model.safetensors: sha256 does not match" in err
    assert not (tmp_path / "x.safetensors").exists()


def test_export_ema_without_an_ema_is_a_clear_error(tmp_path, capsys):
    trainer = make_trainer(regression_batches(2, 4), max_steps=2, workspace=tmp_path,
                           hooks=[CheckpointingHook(interval=None)])
    trainer.train()
    code, _, err = ckpt(capsys, "export", tmp_path, "-o", tmp_path / "ema.safetensors", "--ema")
    assert code == 2
    assert "has no EMA weights (an EmaHook's state); it holds the model weights and the state of the hooks: none" in err


def test_export_strips_compile_and_ddp_prefixes(tmp_path, capsys):
    # A compiled submodule puts `_orig_mod.` into the model's own state dict (a compiled
    # whole model does not: the trainer saves the unwrapped module), and a DDP-wrapped
    # model saved by hand has `module.` in front of every key.
    compiled = nn.Sequential(torch.compile(nn.Linear(4, 8), backend="eager"), nn.Tanh(), nn.Linear(8, 1))
    trainer = make_trainer(regression_batches(3, 4), max_steps=3, model=compiled, workspace=tmp_path / "a",
                           hooks=[CheckpointingHook(interval=None)])
    trainer.train()
    assert "0._orig_mod.weight" in trainer.state_dict()["model"]
    whole = make_trainer(regression_batches(3, 4), max_steps=3, compile={"backend": "eager"},
                         workspace=tmp_path / "b", hooks=[CheckpointingHook(interval=None)])
    whole.train()
    state = dict(whole.state_dict(), model={f"module.{k}": v for k, v in whole.unwrapped_model.state_dict().items()})
    state["hooks"]["swa"] = {"weights": {"module.0.weight": torch.ones(8, 4), "n_averaged": torch.tensor(3)}}
    checkpoint.save_checkpoint(state, tmp_path / "ddp", fsync=False)
    compiled_weights = {k.replace("_orig_mod.", ""): v for k, v in trainer.unwrapped_model.state_dict().items()}
    for source, expected in ((tmp_path / "a", compiled_weights), (tmp_path / "b", whole.unwrapped_model.state_dict()),
                             (tmp_path / "ddp", whole.unwrapped_model.state_dict())):
        out_file = tmp_path / f"{source.name}.safetensors"
        code, out, _ = ckpt(capsys, "export", source, "-o", out_file)
        assert code == 0
        assert ("names lost wrapper prefixes" in out) == (source.name != "b")
        fresh = make_model(seed=5)
        fresh.load_state_dict(load_file(out_file))  # strict: every name is the plain module's
        assert same(fresh.state_dict(), expected)
    assert ckpt(capsys, "export", tmp_path / "ddp", "-o", tmp_path / "swa.safetensors", "--ema-hook", "swa")[0] == 0
    assert same(load_file(tmp_path / "swa.safetensors"), {"0.weight": torch.ones(8, 4)})  # n_averaged dropped


def test_unwrapped_names():
    t = torch.zeros(1)
    names = {"module._orig_mod.enc._fsdp_wrapped_module.w": t, "module.head._checkpoint_wrapped_module.b": t}
    assert list(inspection.unwrapped_names(names)[0]) == ["enc.w", "head.b"]
    assert list(inspection.unwrapped_names({"module.a": t, "b": t})[0]) == ["module.a", "b"]  # not every key: kept
    with pytest.raises(checkpoint.CheckpointError, match="collide"):
        inspection.unwrapped_names({"_orig_mod.a": t, "a": t})


# ---------------------------------------------------------------- sharded (FSDP2, 2 processes)


@pytest.mark.slow
def test_sharded_checkpoint_exports_gathered_in_one_process(tmp_path, capsys):
    """dist_run.py trains with FSDP2 in 2 torchrun processes (gloo, CPU) and saves a sharded
    checkpoint at its end; rank 0 also writes the full state dict it gathered."""
    spec = importlib.util.spec_from_file_location(
        "torchrun_launcher", Path(__file__).parent / "distributed" / "test_torchrun.py")
    launcher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launcher)
    launcher.torchrun(tmp_path, "--parallelism", "fsdp", "--sharded", "--steps", "4", "--optimizer", "adamw")
    directory = tmp_path / "ckpt" / "step_000000004"
    assert (directory / "sharded" / "__1_0.distcp").is_file()

    code, out, _ = ckpt(capsys, "export", directory, "-o", tmp_path / "model.safetensors")
    assert code == 0 and "6 tensors" in out
    expected = {k.removeprefix("model."): v for k, v in launcher.weights(tmp_path).items()}
    assert same(load_file(tmp_path / "model.safetensors"), expected)

    code, out, _ = ckpt(capsys, "inspect", tmp_path / "ckpt")
    assert code == 0 and "world size   2" in out and "optimizer    torch.optim.adamw.AdamW" in out
    assert "  model state: 6 tensors, 484 elements (float32 x6)" in out
    assert "  group 0: 6 params; lr=" in out and "weight_decay=0.01" in out
    assert ckpt(capsys, "verify", directory)[0] == 0
    flip_byte(directory / "sharded" / "__1_0.distcp")
    code, out, _ = ckpt(capsys, "verify", tmp_path / "ckpt")
    assert code == 1 and "sharded/__1_0.distcp: does not match its sha256" in out


@pytest.mark.parametrize(
    ("call", "needle"),
    [
        (lambda out: checkpoint.export_weights("anywhere", 3), r"export_weights\(output\) must be a str"),
        (lambda out: checkpoint.export_weights("anywhere", out, ema=3), r"export_weights\(ema\) must be True, False"),
        (lambda out: checkpoint.export_weights("anywhere", out, force="yes"), r"export_weights\(force\) must be True"),
        (lambda out: checkpoint.verify_checkpoint(5), "path must be a str or os.PathLike; got int 5"),
        (lambda out: checkpoint.describe_checkpoint(None), "path must be a str or os.PathLike; got NoneType"),
    ],
)
def test_python_entry_points_reject_arguments_of_the_wrong_type_naming_them(tmp_path, call, needle):
    with pytest.raises(TypeError, match=needle):
        call(tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()
