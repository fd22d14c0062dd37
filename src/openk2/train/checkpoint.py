"""Training checkpoints: atomic, verified, exact to resume from.

A checkpoint is a folder `RUN/checkpoints/step_NNNNNNN/` holding the model weights
(safetensors, openk2 names), the optimizer state, the trainer state (step, data position,
RNG states) and a `manifest.json` with the size and SHA-256 of every file. It is written
under a temporary name and renamed into place, and the manifest is written last, so a
crash mid-write leaves the previous checkpoint as the newest complete one. On resume,
folders whose files are missing, truncated or altered are reported and skipped.

Under torchrun (world size > 1) the same folder holds a torch.distributed.checkpoint (DCP)
instead: every rank writes its shards of the globally laid out training state
(`openk2.train.distributed.training_state`) into the temporary folder, rank 0 adds the trainer
state and config.json, and after a barrier writes the manifest and renames the folder. DCP
reshards on load, so a checkpoint saved on N ranks resumes on M (M = 1 included, without
torchrun); either format resumes under either launch, and `export_checkpoint` turns either
into an HF model folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from openk2.config import ConfigError
from openk2.model import decoder_layer_prefix

MANIFEST = "manifest.json"
PREFIX = "step_"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: Any,
    trainer_state: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write checkpoint `step` atomically and keep only the newest `keep` ones."""
    if _world_size() > 1:
        return _save_sharded(run_dir, step, model, optimizer, trainer_state, keep)
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:07d}"
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(weights, tmp / "model.safetensors")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save({"step": step, **trainer_state, "rng": rng_state()}, tmp / "trainer.pt")
    _write_config(tmp, model)
    return _seal(tmp, final, step, run_dir, keep)


def _seal(tmp: Path, final: Path, step: int, run_dir: Path, keep: int) -> Path:
    """Manifest last, then the rename that makes the checkpoint exist, then pruning."""
    files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(tmp.iterdir())}
    manifest = {"step": step, "files": files}
    with (tmp / MANIFEST).open("w") as f:
        json.dump(manifest, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _write_config(folder: Path, model: torch.nn.Module) -> None:
    """config.json of the model, so that export_checkpoint can rebuild it."""
    config = model.config.to_hf(for_transformers=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _save_sharded(run_dir: Path, step: int, model: torch.nn.Module, optimizer: Any,
                  trainer_state: dict[str, Any], keep: int) -> Path:
    """The DCP checkpoint of a distributed run (module docstring); every rank calls it."""
    import torch.distributed.checkpoint as dcp

    from openk2.train.distributed import training_state

    dist = torch.distributed
    rank0 = dist.get_rank() == 0
    root = checkpoint_dir(run_dir)
    final = root / f"{PREFIX}{step:07d}"
    tmp = root / f".{final.name}.tmp-dcp"
    if rank0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    dcp.save(training_state(model, optimizer), checkpoint_id=tmp)
    if rank0:
        torch.save({"step": step, **trainer_state, "rng": rng_state(), "world_size": _world_size()},
                   tmp / "trainer.pt")
        _write_config(tmp, model)
    dist.barrier()  # every rank's shards are on disk
    if rank0:
        _seal(tmp, final, step, run_dir, keep)
    dist.barrier()
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir()
             if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def previous_run(run_dir: Path) -> str | None:
    """What a run folder holds of an earlier run (its checkpoints, its final model), or None."""
    found = list_checkpoints(Path(run_dir))
    if found:
        return f"checkpoints up to {found[-1].name}"
    return "a final model" if (Path(run_dir) / "final").exists() else None


def refuse_existing_run(run_dir: Path) -> None:
    """A fresh (not resumed) run must not write into a folder that holds another run: that
    run's metrics and model would be overwritten and its checkpoints mixed with the new ones."""
    what = previous_run(run_dir)
    if what:
        raise ConfigError(f"{run_dir} already holds a run ({what}): pass --resume to continue it, or give "
                          "another --out (delete the folder to start over)")


def verify_checkpoint(path: Path) -> str | None:
    """None if every file matches the manifest, else the reason it does not."""
    manifest_path = path / MANIFEST
    if not path.is_dir():
        return "no such folder (a checkpoint is RUN/checkpoints/step_NNNNNNN)"
    if not manifest_path.is_file():
        return "no manifest.json (the write did not finish)"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return "manifest.json is unreadable"
    for name, meta in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != meta["bytes"]:
            return f"{name} has {file.stat().st_size} bytes, the manifest says {meta['bytes']}"
        if _sha256(file) != meta["sha256"]:
            return f"{name} does not match its checksum"
    return None


def latest_checkpoint(run_dir: Path, warn: Callable[[str], None] = print) -> Path | None:
    """The newest checkpoint that verifies; damaged ones are reported through `warn` and skipped.
    Distributed: rank 0 checks and tells the others."""
    found: list[Path | None] = [None]
    if _world_size() == 1 or torch.distributed.get_rank() == 0:
        for path in reversed(list_checkpoints(run_dir)):
            problem = verify_checkpoint(path)
            if problem is None:
                found[0] = path
                break
            warn(f"skipping checkpoint {path}: {problem}")
    if _world_size() > 1:
        torch.distributed.broadcast_object_list(found, src=0)
    return found[0]


def is_sharded(path: Path) -> bool:
    return (Path(path) / ".metadata").is_file()


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: Any) -> dict[str, Any]:
    """Restore model and optimizer in place; returns the trainer state (RNG already restored)."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        if is_sharded(path) or _world_size() > 1:
            _load_resharded(Path(path), model, optimizer)
        else:
            model.load_state_dict(load_file(path / "model.safetensors"))
            optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    except (CheckpointException, KeyError, RuntimeError, ValueError) as e:  # names or shapes differ
        detail = " ".join(str(e).split())
        raise ConfigError(f"checkpoint {path} could not be loaded into this model ({detail[:300]}...); "
                          "if the model settings changed, resume with the ones it was trained with") from None
    state = torch.load(path / "trainer.pt", weights_only=True)
    state.pop("world_size", None)
    set_rng_state(state.pop("rng"))
    return state


def _load_resharded(path: Path, model: torch.nn.Module, optimizer: Any) -> None:
    """Load into the globally laid out state of this run, whatever the layout it was saved in:
    DCP reshards a sharded checkpoint; a single-process one is cut into this rank's blocks."""
    from openk2.train.distributed import apply_training_state, copy_full_into, training_state

    state = training_state(model, optimizer)
    if is_sharded(path):
        import torch.distributed.checkpoint as dcp

        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, checkpoint_id=path)
    else:
        copy_full_into(state, _full_single_process_state(path, model, optimizer))
    apply_training_state(state, optimizer)


def _full_single_process_state(path: Path, model: torch.nn.Module, optimizer: Any) -> dict[str, torch.Tensor]:
    """A single-process checkpoint in training_state()'s flat names."""
    full = {f"model.{k}": v for k, v in load_file(path / "model.safetensors").items()}
    saved = torch.load(path / "optimizer.pt", weights_only=True)
    names = {id(p): n for n, p in model.named_parameters()}
    for kind in ("muon", "adamw"):
        opt = getattr(optimizer, kind)
        if opt is None or saved.get(kind) is None:
            continue
        for group, saved_group in zip(opt.param_groups, saved[kind]["param_groups"]):
            for p, index in zip(group["params"], saved_group["params"]):
                for key, value in saved[kind]["state"].get(index, {}).items():
                    full[f"optim.{kind}.{names[id(p)]}.{key}"] = value
    full["optim.steps"] = torch.tensor(saved["steps"])
    full["optim.skipped_steps"] = torch.tensor(saved.get("skipped_steps", 0))
    return full


def _checkpoint_tensors(path: Path, shapes: dict[str, torch.Tensor]):
    """(name, tensor) of a checkpoint's model, one decoder layer's tensors at a time (a partial
    torch.distributed.checkpoint load, or safetensors reads), so an export never holds the whole
    model."""
    if not is_sharded(path):
        with safe_open(path / "model.safetensors", framework="pt") as f:
            missing = [name for name in shapes if name not in f.keys()]
            if missing:
                raise ValueError(f"checkpoint {path}: model.safetensors lacks {missing[0]}")
            for name in shapes:
                yield name, f.get_tensor(name)
        return
    import torch.distributed.checkpoint as dcp

    groups: dict[str, list[str]] = {}
    for name in shapes:
        groups.setdefault(decoder_layer_prefix(name) or "", []).append(name)
    for names in groups.values():
        state = {f"model.{n}": torch.empty(shapes[n].shape, dtype=shapes[n].dtype) for n in names}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, checkpoint_id=path)
        for n in names:
            yield n, state.pop(f"model.{n}")


def export_checkpoint(path: str | Path, out: str | Path, tokenizer: str | Path | None = None) -> Path:
    """An HF model folder (openk2.save_model layout, loadable by transformers) from a training
    checkpoint of either format; one process, one decoder layer's tensors in memory at a time.
    The tokenizer comes from `tokenizer`, else from RUN/tokenizer next to RUN/checkpoints, when
    there is one."""
    from openk2.config import ModelConfig
    from openk2.model import build_model
    from openk2.model.hf import save_state

    path, out = Path(path), Path(out)
    problem = verify_checkpoint(path)
    if problem is not None:
        raise ValueError(f"checkpoint {path}: {problem}")
    if not (path / "config.json").is_file():
        raise ValueError(f"checkpoint {path} has no config.json (written by openk2 0.1 checkpoints since "
                         "distributed training); export the run's final/ folder instead")
    config = ModelConfig.from_hf(path / "config.json")
    shapes = build_model(config, device="meta").state_dict()  # names, global shapes, dtypes
    save_state(config, _checkpoint_tensors(path, shapes), out, torch.float32)
    tokenizer = Path(tokenizer) if tokenizer else path.parent.parent / "tokenizer"
    if (tokenizer / "tokenizer.json").is_file():
        for file in tokenizer.iterdir():
            if file.is_file():
                shutil.copy2(file, out / file.name)
    return out
