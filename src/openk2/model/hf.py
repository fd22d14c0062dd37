"""HF checkpoint import/export: config.json + safetensors, readable by transformers (K2_SPEC §1).

Written: the released K2 layout (per-expert `mlp.experts.{e}.{gate,up,down}_proj.weight`),
which transformers 4.x and 5.x and inference servers all load. Read: that layout, the
fused 3-D `mlp.experts.gate_up_proj` / `down_proj` that transformers 5.x writes, and FP8
block-quantised matrices (`weight_scale_inv`, as released), dequantised on load.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from openk2.config import ConfigError, ModelConfig
from openk2.model.transformer import K2ForCausalLM, build_model

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_EXPERT_STACK = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_proj|up_proj|down_proj)$")
_EXPERT_ONE = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_EXPERT_FUSED = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")


class CheckpointError(ValueError):
    """A checkpoint folder is missing files or tensors, or holds tensors of the wrong shape."""


def _hf_tensors(model: K2ForCausalLM, dtype: torch.dtype | None) -> Iterator[tuple[str, torch.Tensor]]:
    """State dict in HF names: stacked experts become one tensor per expert."""
    for name, tensor in model.state_dict().items():
        if dtype is not None and tensor.is_floating_point() and not _keeps_float32(name):
            tensor = tensor.to(dtype)
        match = _EXPERT_STACK.match(name)
        if match:
            prefix, proj = match.groups()
            for e in range(tensor.shape[0]):
                yield f"{prefix}.{e}.{proj}.weight", tensor[e]
        else:
            yield name, tensor


def _keeps_float32(name: str) -> bool:
    return name.endswith("mlp.gate.weight") or name.endswith("e_score_correction_bias")


def save_model(
    model: K2ForCausalLM,
    directory: str | Path,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 4 * 1024**3,
) -> Path:
    """Write config.json and safetensors (sharded with an index above `max_shard_bytes`)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in _hf_tensors(model, dtype):
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.detach().to("cpu").contiguous().clone()
        size += nbytes
    for stale in list(directory.glob("model*.safetensors")) + [directory / INDEX_NAME]:
        stale.unlink(missing_ok=True)
    weight_dtype = dtype or model.lm_head.weight.dtype
    config = model.config.to_hf(for_transformers=True)
    config["torch_dtype"] = str(weight_dtype).removeprefix("torch.")
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], directory / SINGLE_NAME, metadata=metadata)
        return directory
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, start=1):
        filename = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, directory / filename, metadata=metadata)
        for name, tensor in shard.items():
            weight_map[name] = filename
            total += tensor.numel() * tensor.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return directory


def _open_tensors(directory: Path) -> dict[str, Path]:
    """Map tensor name -> file, from the index or the single file."""
    index = directory / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
        files = {name: directory / file for name, file in weight_map.items()}
        for path in set(files.values()):
            if not path.is_file():
                raise CheckpointError(f"{index} names {path.name}, which is missing from {directory}")
        return files
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{directory}: no safetensors weights (expected {SINGLE_NAME} or {INDEX_NAME})")
    out = {}
    for path in files:
        with safe_open(path, framework="pt") as f:
            out.update({name: path for name in f.keys()})
    return out


def _dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    rows, cols = weight.shape
    scale = scale_inv.float().repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return weight.float() * scale


def read_hf_state_dict(directory: str | Path, config: ModelConfig) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder in openk2 names (experts stacked, FP8 dequantised)."""
    directory = Path(directory)
    files = _open_tensors(directory)
    block = tuple(config.extra.get("quantization_config", {}).get("weight_block_size", (128, 128)))
    handles: dict[Path, object] = {}

    def get(name: str) -> torch.Tensor:
        path = files[name]
        if path not in handles:
            handles[path] = safe_open(path, framework="pt")
        return handles[path].get_tensor(name)

    state: dict[str, torch.Tensor] = {}
    per_expert: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for name in files:
        if name.endswith("weight_scale_inv") or name.endswith("rotary_emb.inv_freq"):
            continue
        layer = re.match(r"^model\.layers\.(\d+)\.", name)
        if layer and int(layer.group(1)) >= config.num_hidden_layers:
            continue  # multi-token-prediction layers, which openk2 does not build
        tensor = get(name)
        scale_name = name.removesuffix("weight") + "weight_scale_inv"
        if tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) and scale_name in files:
            tensor = _dequantize_fp8(tensor, get(scale_name), block)
        if match := _EXPERT_ONE.match(name):
            prefix, expert, proj = match.groups()
            per_expert.setdefault((prefix, proj), {})[int(expert)] = tensor
        elif match := _EXPERT_FUSED.match(name):
            prefix, proj = match.groups()
            if proj == "gate_up_proj":
                gate, up = tensor.chunk(2, dim=1)  # [E, 2I, D]: gate rows first
                state[f"{prefix}.gate_proj"], state[f"{prefix}.up_proj"] = gate, up
            else:
                state[f"{prefix}.down_proj"] = tensor
        else:
            state[name] = tensor
    for (prefix, proj), experts in per_expert.items():
        expected = range(config.n_routed_experts)
        missing = [e for e in expected if e not in experts]
        if missing:
            raise CheckpointError(
                f"{directory}: missing tensor {prefix}.{missing[0]}.{proj}.weight "
                f"({len(missing)} experts of {prefix} lack {proj})"
            )
        state[f"{prefix}.{proj}"] = torch.stack([experts[e] for e in expected])
    return state


def load_model(
    directory: str | Path,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> K2ForCausalLM:
    """Load an HF-format K2/DeepSeek-V3 checkpoint folder into a `K2ForCausalLM`.

    dtype defaults to the dtype the weights are stored in (float32 for FP8 checkpoints,
    which are dequantised). Raises ConfigError for a bad config.json and CheckpointError,
    naming the tensor, for missing, unexpected or mis-shaped tensors.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a checkpoint folder")
    config = ModelConfig.from_hf(directory)
    state = read_hf_state_dict(directory, config)
    model = build_model(config, device="meta")
    expected = model.state_dict()
    missing = [name for name in expected if name not in state]
    if missing:
        raise CheckpointError(
            f"{directory}: missing tensor {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    unexpected = [name for name in state if name not in expected]
    if unexpected:
        raise CheckpointError(
            f"{directory}: unexpected tensor {unexpected[0]} for this config.json"
            + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
        )
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointError(
                f"{directory}: tensor {name} has shape {list(tensor.shape)}, config.json implies "
                f"{list(expected[name].shape)}"
            )
    if dtype is None:
        dtype = state["lm_head.weight"].dtype
    for name, tensor in state.items():
        target = torch.float32 if _keeps_float32(name) else dtype
        state[name] = tensor.to(device=device, dtype=target).contiguous()
    model.load_state_dict(state, assign=True)
    # Non-persistent buffers (rotary frequencies, statistics) are not in the checkpoint.
    with torch.device(device):
        for module in model.modules():
            for buffer_name, buffer in list(module.named_buffers(recurse=False)):
                if buffer.device.type == "meta":
                    dtype = buffer.dtype if buffer.dtype == torch.long else torch.float32
                    module.register_buffer(buffer_name, torch.zeros(buffer.shape, dtype=dtype), persistent=False)
    for module in model.modules():
        if hasattr(module, "inv_freq"):
            module.reset_parameters()
    return model
