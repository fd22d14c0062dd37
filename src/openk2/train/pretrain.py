"""The pre-training stage (K2_SPEC §3): tokenizer -> packed corpus -> MuonClip training -> RUN/final.

    openk2 pretrain --recipe recipes/speedrun.toml [--set key=value ...] --out RUN [--resume]

RUN/ receives: tokenizer/ (trained on the corpus unless data.tokenizer names one),
metrics.jsonl, checkpoints/, final/ (HF model folder with the tokenizer) and
summary.json (losses, the unigram baseline, bits per byte).

Under `torchrun --nproc_per_node N -m openk2 pretrain ...` the [parallel] section shards the
model (train/distributed.py); rank 0 writes every file but the checkpoint shards, and final/
is gathered from the shards.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from openk2.config import ConfigError, ModelConfig, preset
from openk2.data.corpus import PackedLoader, bits_per_byte, build_datasets, iter_texts, unigram_loss
from openk2.data.tokenizer import K2Tokenizer, train_tokenizer
from openk2.model import K2ForCausalLM, build_model, load_model, save_model
from openk2.model.hf import save_state
from openk2.optim import OptimConfig
from openk2.recipe import model_overrides, recipe_changes
from openk2.train import distributed
from openk2.train.checkpoint import refuse_existing_run
from openk2.train.trainer import TrainSettings, train


class LoaderBatches:
    """Adapts PackedLoader (rows only) to the trainer's (tokens, mask) micro-batches: each loader
    batch is this rank's share of one step's global batch, split into micro-batches. The loader's
    state is a global position, so a run resumes on any number of ranks."""

    def __init__(self, loader: PackedLoader, micro_batch_size: int):
        self.loader, self.micro_batch_size = loader, micro_batch_size
        self._pending: list[torch.Tensor] = []

    def __iter__(self) -> Iterator[tuple[torch.Tensor, None]]:
        while True:
            if not self._pending:
                self._pending = list(next(self.loader).split(self.micro_batch_size))
            yield self._pending.pop(0), None

    def state_dict(self) -> dict[str, Any]:
        if self._pending:
            raise RuntimeError("LoaderBatches.state_dict() in the middle of a step")
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)


def prepare_tokenizer(recipe: dict, run_dir: Path, log: Callable[[str], None],
                      vocab_size: int) -> K2Tokenizer:
    """data.tokenizer if given; else RUN/tokenizer if an earlier attempt trained one; else train."""
    data = recipe["data"]
    if data["tokenizer"]:
        return K2Tokenizer.load(data["tokenizer"])
    folder = run_dir / "tokenizer"
    if (folder / "tokenizer.json").is_file():
        return K2Tokenizer.load(folder)
    log(f"training a {vocab_size:,}-token BPE tokenizer on data.source={data['source']!r}")
    texts = iter_texts(data["source"], seed=data["seed"], skip_bad_lines=data["skip_bad_lines"])
    tokenizer = train_tokenizer(texts, vocab_size)
    tokenizer.save(folder)
    return tokenizer


def config_for(recipe: dict) -> ModelConfig:
    """The model's configuration before the tokenizer fixes the vocabulary size."""
    section = recipe["model"]
    if section["init_from"]:
        return ModelConfig.from_hf(section["init_from"])
    return preset(section["preset"], **model_overrides(recipe))


def model_for(recipe: dict, vocab_size: int, seed: int, device: str) -> K2ForCausalLM:
    """[model] init_from (an HF folder) or preset + overrides, sized to the tokenizer."""
    section = recipe["model"]
    if section["init_from"]:
        if device == "meta":  # shapes only: distributed.load_sharded fills the shards later
            model = build_model(ModelConfig.from_hf(section["init_from"]), device="meta")
        else:
            model = load_model(section["init_from"], dtype=torch.float32, device=device)
        if model.config.vocab_size < vocab_size:
            raise ConfigError(f"model.init_from={section['init_from']!r} has vocab_size "
                              f"{model.config.vocab_size}, "
                              f"smaller than the tokenizer's {vocab_size}")
        return model
    overrides = model_overrides(recipe)
    if overrides.get("vocab_size", vocab_size) < vocab_size:
        raise ConfigError(f"model.vocab_size={overrides['vocab_size']} is smaller than "
                          f"the tokenizer's {vocab_size}")
    overrides.setdefault("vocab_size", vocab_size)
    config = preset(section["preset"], **overrides)
    return build_model(config, device=device, seed=seed)


def pretrain(recipe: dict, run_dir: str | Path, resume: bool = False, log: Callable[[str], None] = print,
             show_progress: bool = True, on_step: Callable | None = None) -> dict[str, Any]:
    """Pre-train as the recipe says into run_dir; returns the run's summary (also written to
    summary.json). `on_step` is passed to `train.trainer.train`."""
    world = distributed.world_size_from_env()
    parallel = distributed.ParallelConfig.from_recipe(recipe, world, config_for(recipe).n_routed_experts)
    if world == 1 and (recipe["parallel"]["dp_shard"] > 1 or recipe["parallel"]["ep"] > 1):
        log("one process: parallel.dp_shard and parallel.ep apply under torchrun only")
    mesh = distributed.init_distributed(parallel, recipe["train"]["device"]) if world > 1 else None
    try:
        return _pretrain(recipe, Path(run_dir), resume, log if mesh is None or mesh.rank == 0 else _quiet,
                         show_progress, mesh, parallel, on_step)
    finally:
        if mesh is not None:
            distributed.close_distributed()


def check_resumable(recipe: dict, saved_path: Path) -> None:
    """A resumed run must build the model its checkpoints hold: the [model] section has to equal
    the one in the run's recipe.json (other sections may change, e.g. train.steps)."""
    if not saved_path.is_file():
        return
    try:
        saved = json.loads(saved_path.read_text())
        changed = recipe_changes({"model": dict(saved["model"])}, recipe, sections=("model",))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise ConfigError(f"{saved_path}: unreadable, so --resume cannot check the model settings; "
                          "restore it or start a new --out") from None
    if changed:
        raise ConfigError(f"--resume: this run's checkpoints were trained with {', '.join(changed)}; resume "
                          f"with the model settings of {saved_path}, or train the new model in a new --out")


def _quiet(message: str) -> None:
    pass


def _pretrain(recipe: dict, run_dir: Path, resume: bool, log: Callable[[str], None], show_progress: bool,
              mesh: distributed.Mesh | None, parallel: distributed.ParallelConfig,
              on_step: Callable | None = None) -> dict[str, Any]:
    rank0 = mesh is None or mesh.rank == 0
    settings = TrainSettings.from_recipe(recipe["train"])
    seed = recipe["train"]["seed"]
    if recipe["train"]["threads"]:
        torch.set_num_threads(recipe["train"]["threads"])
    torch.manual_seed(seed)
    if resume:
        check_resumable(recipe, run_dir / "recipe.json")
    else:
        refuse_existing_run(run_dir)
    if rank0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")

    default_vocab = model_overrides(recipe).get("vocab_size") or preset(recipe["model"]["preset"]).vocab_size
    if rank0:  # one rank trains the tokenizer; the others load it
        tokenizer = prepare_tokenizer(recipe, run_dir, log, default_vocab)
    if mesh is not None:
        torch.distributed.barrier()
        if not rank0:
            tokenizer = prepare_tokenizer(recipe, run_dir, log, default_vocab)
    data = recipe["data"]
    train_rows, val_rows, info = build_datasets(
        data["source"], tokenizer, settings.seq_len, seed=seed, val_fraction=data["val_fraction"],
        skip_bad_lines=data["skip_bad_lines"], text_seed=data["seed"])
    if info.skipped_lines:
        log(f"skipped {info.skipped_lines} malformed record(s)")
    log(f"data: {info.train.tokens:,} train tokens in {len(train_rows):,} rows, "
        f"{info.val.tokens:,} validation tokens")
    # Under torchrun the model is built on the meta device and, after parallelize, each rank
    # initialises or loads only its shards: no rank ever holds the whole model.
    model = model_for(recipe, tokenizer.vocab_size, seed, "meta" if mesh is not None else settings.device)
    parameters = sum(p.numel() for p in model.parameters())
    val_rows = val_rows[: settings.eval_batches * settings.micro_batch_size]
    val_batches = [(rows, None) for rows in val_rows.split(settings.micro_batch_size)]
    world, rank = (mesh.world_size, mesh.rank) if mesh is not None else (1, 0)
    per_rank = settings.batch_size // world
    settings.micro_batch_size = min(settings.micro_batch_size, per_rank)
    if mesh is not None:
        settings.device = str(mesh.device)
        log(f"mesh: {world} ranks, dp_shard={mesh.dp_shard} (replicate {mesh.dp_replicate}), ep={mesh.ep}, "
            f"{per_rank} sequences per rank per step")
    distributed.parallelize(model, mesh, parallel.activation_checkpointing)
    if mesh is not None and recipe["model"]["init_from"]:
        distributed.load_sharded(model, recipe["model"]["init_from"], mesh.device)
    elif mesh is not None:
        distributed.materialize(model, seed, mesh.device)
    batches = LoaderBatches(PackedLoader(train_rows, per_rank, seed=seed, rank=rank, world_size=world),
                            settings.micro_batch_size)

    def save_final(trained: K2ForCausalLM) -> None:
        if mesh is None:
            save_model(trained, run_dir / "final")
            tokenizer.save(run_dir / "final")
            return
        tensors = distributed.full_tensors(trained)  # gathered one at a time, written as they come
        if rank0:
            save_state(trained.config, tensors, run_dir / "final", torch.float32)
            tokenizer.save(run_dir / "final")
        else:
            for _ in tensors:  # take part in every gather
                pass

    summary = train(run_dir, model, OptimConfig.from_dict(recipe["optim"]), settings, batches, val_batches,
                    resume=resume, log=log, on_final=save_final, show_progress=show_progress, mesh=mesh,
                    on_step=on_step)
    baseline = unigram_loss(train_rows, val_rows, tokenizer.vocab_size)
    summary.update(
        unigram_val_loss=baseline,
        unigram_bits_per_byte=bits_per_byte(baseline, info.val.tokens, info.val.bytes),
        val_bits_per_byte=(bits_per_byte(summary["val_loss"], info.val.tokens, info.val.bytes)
                           if summary["val_loss"] is not None else None),
        train_tokens_available=info.train.tokens,
        parameters=parameters,
    )
    if rank0:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
