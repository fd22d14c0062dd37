"""The `openk2` command: parses arguments, loads a recipe, calls a stage. Nothing else."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from openk2.config import PRESETS, ConfigError, ModelConfig, param_counts, preset

app = typer.Typer(
    name="openk2",
    help="The Kimi K2 system: train, post-train, serve and evaluate K2-architecture models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(soft_wrap=True)


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {escape(message)}")  # messages quote recipes: [train], paths
    raise typer.Exit(code=2)


def _log(message: str) -> None:
    """Progress lines of a stage, printed as they are (they hold data: paths, model samples)."""
    console.print(message, markup=False)


def _refuse_model_folder(out: Path) -> None:
    """init and export write whole model folders: never over a model that is already there."""
    if (out / "config.json").exists() or any(out.glob("*.safetensors")):
        _fail(f"{out} already holds a model; delete it first or give another --out")


def _model_config(preset_name: str | None, config_path: Path | None) -> ModelConfig:
    try:
        if config_path is not None:
            return ModelConfig.from_hf(config_path)
        return preset(preset_name or "tiny")
    except ConfigError as e:
        _fail(str(e))
        raise


_PARAMS_HELP = (
    "Print total and activated parameter counts of a preset or config.json.\n\n"
    "Counting convention: 'total' is every parameter of the network plus the router-bias "
    "buffers, embedding and LM head included, no multi-token-prediction layer. 'activated' is "
    "what one token touches: embedding and LM head included (as the K2 and DeepSeek-V3 reports "
    "count), all attention and dense layers, and per MoE layer the router, the shared experts "
    "and num_experts_per_tok routed experts. For FP8 block-quantised configs (the released "
    "kimi-k2 and deepseek-v3), 'fp8_block_scales' counts the float32 scale entries the released "
    "files store beside the matrices; they are not parameters."
)


@app.command(help=_PARAMS_HELP)
def params(
    preset_name: Annotated[str, typer.Option("--preset", help=f"one of: {', '.join(PRESETS)}")] = "tiny",
    config: Annotated[Optional[Path], typer.Option(help="a config.json or checkpoint folder instead")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    counts = param_counts(_model_config(preset_name, config))
    if as_json:
        print(json.dumps(counts))
        return
    table = Table(title=escape(f"parameters: {config or preset_name}"))
    table.add_column("count")
    table.add_column("value", justify="right")
    for key, value in counts.items():
        table.add_row(key, f"{value:,} ({value / 1e9:.2f}B)")
    console.print(table)


@app.command()
def init(
    out: Annotated[Path, typer.Option(help="output folder (HF format)")],
    preset_name: Annotated[str, typer.Option("--preset", help=f"one of: {', '.join(PRESETS)}")] = "tiny",
    seed: Annotated[int, typer.Option(help="initialisation seed")] = 0,
    dtype: Annotated[str, typer.Option(help="float32 or bfloat16")] = "float32",
) -> None:
    """Write a randomly initialised model as an HF checkpoint folder."""
    import torch

    from openk2.model import build_model, save_model

    if dtype not in ("float32", "bfloat16"):
        _fail(f"--dtype {dtype!r}: use float32 or bfloat16")
    config = _model_config(preset_name, None)
    _refuse_model_folder(out)
    model = build_model(config, dtype=getattr(torch, dtype), seed=seed)
    save_model(model, out)
    _log(f"wrote {preset_name} ({param_counts(config)['total']:,} parameters, seed {seed}) to {out}")


RecipeOption = Annotated[Optional[Path], typer.Option("--recipe", help="a TOML recipe (see recipes/)")]
SetOption = Annotated[Optional[list[str]],
                      typer.Option("--set", help="override a recipe key: section.key=value")]
OutOption = Annotated[Path, typer.Option("--out", help="run folder")]


def _recipe(path: Path | None, overrides: list[str] | None) -> dict:
    from openk2.recipe import load_recipe

    try:
        return load_recipe(path, overrides)
    except ConfigError as e:
        _fail(str(e))
        raise


tokenizer_app = typer.Typer(help="Tokenizer commands.", no_args_is_help=True)
app.add_typer(tokenizer_app, name="tokenizer")


@tokenizer_app.command("train")
def tokenizer_train(
    out: Annotated[Path, typer.Option("--out", help="output folder (gets tokenizer.json)")],
    source: Annotated[list[str], typer.Option(help="'default' or text/JSONL/parquet paths")] = ["default"],
    vocab_size: Annotated[int, typer.Option(help="total size, special tokens included")] = 8192,
    seed: int = 0,
    skip_bad_lines: bool = False,
) -> None:
    """Train a byte-level BPE tokenizer with K2's pre-tokenisation and special tokens."""
    from openk2.data.corpus import DataError, iter_texts
    from openk2.data.tokenizer import train_tokenizer

    if (out / "tokenizer.json").exists():  # it may be a model's: a new one would garble it
        _fail(f"{out} already holds a tokenizer.json; delete it first or give another --out")
    try:
        texts = iter_texts(source[0] if source == ["default"] else source, seed=seed,
                           skip_bad_lines=skip_bad_lines)
        tokenizer = train_tokenizer(texts, vocab_size)
    except (DataError, ValueError) as e:
        _fail(str(e))
    tokenizer.save(out)
    _log(f"wrote a {tokenizer.vocab_size:,}-token tokenizer to {out}")


@app.command()
def pretrain(
    out: OutOption,
    recipe: RecipeOption = None,
    overrides: SetOption = None,
    resume: Annotated[bool, typer.Option(help="continue from the newest good checkpoint in --out")] = False,
) -> None:
    """Pre-train a K2 model with MuonClip on a corpus (recipe sections model, data, train, optim)."""
    from openk2.data.corpus import DataError
    from openk2.optim import NonFiniteError
    from openk2.train.pretrain import pretrain as run_pretrain

    config = _recipe(recipe, overrides)
    try:
        summary = run_pretrain(config, out, resume=resume, log=_log)
    except (ConfigError, DataError, NonFiniteError) as e:
        _fail(str(e))
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks
        _log(f"done: step {summary['step']}, loss {summary['loss']:.4f}, val_loss {summary['val_loss']}, "
             f"model in {out / 'final'}")


@app.command()
def plan(
    recipe: RecipeOption = None,
    overrides: SetOption = None,
    gpus: Annotated[int, typer.Option(help="world size: GPUs the run would use")] = 8,
    gpu_memory: Annotated[float, typer.Option(help="GiB per GPU, to say whether it fits")] = 80.0,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Memory per GPU of a recipe's model and [parallel] mesh (built on the meta device)."""
    from openk2.train.plan import format_plan, plan_memory

    config = _recipe(recipe, overrides)
    try:
        result = plan_memory(config, gpus)
    except ConfigError as e:
        _fail(str(e))
    if as_json:
        print(json.dumps(result, indent=2))
        return
    _log(format_plan(result, gpu_memory, str(recipe or "defaults")))


@app.command()
def export(
    checkpoint: Annotated[Path, typer.Option(help="a checkpoint folder, RUN/checkpoints/step_NNNNNNN")],
    out: Annotated[Path, typer.Option("--out", help="output HF model folder")],
    tokenizer: Annotated[Optional[Path], typer.Option(
        help="tokenizer folder (default: RUN/tokenizer)")] = None,
) -> None:
    """Write an HF model folder from a training checkpoint (single-process or sharded)."""
    from openk2.train.checkpoint import export_checkpoint

    _refuse_model_folder(out)
    try:
        export_checkpoint(checkpoint, out, tokenizer)
    except (ConfigError, ValueError) as e:
        _fail(str(e))
    _log(f"wrote {out}")


@app.command()
def speedrun(
    out: Annotated[Optional[Path], typer.Option(
        "--out",
        help="run folder (default: runs/speedrun, or runs/speedrun-N when that holds a run)")] = None,
    recipe: Annotated[Path, typer.Option(
        "--recipe", help="pre-training recipe")] = Path("recipes/speedrun.toml"),
    overrides: SetOption = None,
    resume: Annotated[bool, typer.Option(help="resume the stages of an interrupted run")] = False,
) -> None:
    """The whole pipeline on the embedded defaults: tokenizer -> pre-training -> report."""
    from openk2.data.corpus import DataError
    from openk2.optim import NonFiniteError
    from openk2.pipeline import speedrun as run_speedrun
    from openk2.train.checkpoint import previous_run

    if out is None:  # a fresh default folder, so that ./run.sh can be run again
        out, n = Path("runs/speedrun"), 2
        while not resume and previous_run(out / "pretrain"):
            out, n = Path(f"runs/speedrun-{n}"), n + 1

    config = _recipe(recipe if recipe.is_file() else None, overrides)
    try:
        report = run_speedrun(config, out, resume=resume, log=_log)
    except (ConfigError, DataError, NonFiniteError) as e:
        _fail(str(e))
    _log(f"report: {report}")


@app.command()
def serve(
    path: Annotated[Path, typer.Argument(help="checkpoint folder (HF model + tokenizer)")],
    host: Annotated[str, typer.Option(help="address to bind; loopback unless told otherwise")] = "127.0.0.1",
    port: int = 8000,
    api_key: Annotated[Optional[str], typer.Option(
        help="require this Bearer key (default $OPENK2_API_KEY)")] = None,
    model_name: Annotated[Optional[str], typer.Option(
        help="model id to report (default: folder name)")] = None,
    max_batch: Annotated[int, typer.Option(help="sequences decoded together")] = 32,
    max_len: Annotated[Optional[int], typer.Option(
        help="context length (default min(4096, model max))")] = None,
) -> None:
    """Serve a checkpoint with an OpenAI-compatible API (chat, completions, tools, streaming)."""
    from openk2.infer.server import serve as run_server
    from openk2.model import CheckpointError

    try:
        run_server(path, host=host, port=port, api_key=api_key, model_name=model_name, max_batch=max_batch,
                   max_len=max_len)
    except (CheckpointError, ConfigError, OSError) as e:
        _fail(str(e))


@app.command()
def chat(
    path: Annotated[Path, typer.Argument(help="checkpoint folder (HF model + tokenizer)")],
    message: Annotated[Optional[str], typer.Option(help="send one message, print the reply and exit")] = None,
    system: Annotated[Optional[str], typer.Option(help="system prompt")] = None,
    max_tokens: int = 512,
    temperature: float = 0.6,
    seed: Optional[int] = None,
    tools: Annotated[bool, typer.Option(help="offer the built-in calculator and clock tools")] = True,
) -> None:
    """Chat in the terminal in K2's format; the model's tool calls run the built-in tools."""
    from openk2.infer.chat_cli import chat as run_chat
    from openk2.infer.engine import EngineError
    from openk2.model import CheckpointError

    try:
        run_chat(path, message=message, system=system, max_tokens=max_tokens, temperature=temperature,
                 seed=seed, tools=tools)
    except (CheckpointError, ConfigError, EngineError, OSError) as e:
        _fail(str(e))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
