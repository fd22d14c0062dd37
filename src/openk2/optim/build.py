"""MuonClip as one optimizer object (K2_SPEC §2, Algorithm 1): config, parameter roles, step.

`build_optimizer(model, config)` sorts the parameters by role (not by ndim: embedding and
LM head are 2-D but take AdamW, stacked experts are 3-D but take Muon) and returns a
`MuonClip` that owns a `Muon` and an `AdamW`, applies QK-Clip and the aux-loss-free
router-bias update after each step, and returns the statistics the trainer logs.

Per step (`MuonClip.step`): read the model's statistics (per-head max logits and
tokens-per-expert, accumulated over the step's micro-batches) -> all-reduce them (MAX,
SUM) when torch.distributed is initialised -> refuse or skip the step if a gradient or a
statistic is non-finite -> Muon + AdamW -> QK-Clip -> router bias -> `model.reset_stats()`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from openk2.config import ConfigError
from openk2.model import Experts, MoE, Router
from openk2.model.linear import warn_if_slow_bf16
from openk2.model.norm import RMSNorm
from openk2.optim.muon import Muon, dtype_from_name, is_dtensor, local_tensor
from openk2.optim.qk_clip import qk_clip
from openk2.optim.router_bias import expert_imbalance, update_router_bias


class NonFiniteError(FloatingPointError):
    """A gradient or a step statistic is NaN or infinite; nothing was changed."""


@dataclass
class OptimConfig:
    """The `[optim]` recipe section. Defaults are Kimi K2's (K2_SPEC §2, §3)."""

    name: str = "muonclip"              # "muonclip" (Muon + AdamW) or "adamw" (AdamW for everything)
    lr: float = 2e-4
    weight_decay: float = 0.1
    qk_clip_tau: float = 100.0          # 0 disables QK-Clip (works with "adamw" too)
    momentum: float = 0.95
    nesterov: bool = True
    ns_steps: int = 5
    ns_dtype: str = "float32"           # Newton–Schulz dtype: "bfloat16" on GPUs
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    router_gate: str = "adamw"          # optimizer of the router gate matrix: "adamw" or "muon"
    router_bias_rate: float = 1e-3      # u of the aux-loss-free update; 0 disables it
    router_bias_centered: bool = False  # Moonlight: subtract the mean of the update
    aux_loss_alpha: float = 0.0         # sequence-wise balance loss weight set on every MoE layer
    nonfinite: str = "raise"            # "raise" or "skip" the step on NaN/inf gradients or statistics
    schedule: str = "wsd"               # "wsd", "cosine" or "constant"
    warmup_steps: int = 500
    decay_fraction: float = 0.35        # WSD: share of the steps spent decaying
    decay: str = "cosine"               # WSD decay shape: "cosine" or "linear"
    final_lr_ratio: float = 0.1

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)  # TOML gives a list
        for name in ("lr", "weight_decay", "qk_clip_tau", "momentum", "eps", "router_bias_rate",
                     "aux_loss_alpha", "decay_fraction", "final_lr_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"[optim] {name}={value!r} must be a number")
            setattr(self, name, float(value))
        choices = {"name": ("muonclip", "adamw"), "router_gate": ("adamw", "muon"),
                   "nonfinite": ("raise", "skip"), "schedule": ("wsd", "cosine", "constant"),
                   "decay": ("cosine", "linear")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"[optim] {name}={getattr(self, name)!r}: use one of {', '.join(allowed)}")
        checks = [
            (self.lr >= 0, "lr must be >= 0"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (self.qk_clip_tau >= 0, "qk_clip_tau must be >= 0 (0 disables QK-Clip)"),
            (0 <= self.momentum < 1, "momentum must be in [0, 1)"),
            (isinstance(self.ns_steps, int) and self.ns_steps >= 0, "ns_steps must be an integer >= 0"),
            (len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
             "betas must be two numbers in [0, 1)"),
            (self.eps > 0, "eps must be > 0"),
            (self.router_bias_rate >= 0, "router_bias_rate must be >= 0"),
            (self.aux_loss_alpha >= 0, "aux_loss_alpha must be >= 0"),
            (isinstance(self.warmup_steps, int) and self.warmup_steps >= 0,
             "warmup_steps must be an integer >= 0"),
            (0 <= self.decay_fraction <= 1, "decay_fraction must be in [0, 1]"),
            (0 <= self.final_lr_ratio <= 1, "final_lr_ratio must be in [0, 1]"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"[optim] {message}")
        try:
            dtype_from_name(self.ns_dtype)
        except ValueError as e:
            raise ConfigError(f"[optim] {e}") from None

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "[optim]") -> "OptimConfig":
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = [key for key in data if key not in known]
        if unknown:
            raise ConfigError(f"{where}: unknown key {unknown[0]!r}; known keys: {', '.join(known)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["betas"] = list(self.betas)
        return out


# ---- parameter roles ---------------------------------------------------------------------

@dataclass
class ParamRole:
    name: str
    param: nn.Parameter
    role: str        # embedding | lm_head | norm | bias | router | expert | matrix
    algorithm: str   # muon | adamw


def classify_parameters(model: nn.Module, router_gate: str = "adamw") -> list[ParamRole]:
    """Every trainable parameter of a K2ForCausalLM with its role and optimizer (K2_SPEC §2):
    Muon for hidden matrices (attention and MLP projections, each routed expert matrix),
    AdamW for embedding, LM head, norm gains and biases; the router gate by `router_gate`."""
    model = _unwrap(model)
    lm_head = getattr(model, "lm_head", None)
    out: list[ParamRole] = []
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for local_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            name = f"{module_name}.{local_name}" if module_name else local_name
            if isinstance(module, nn.Embedding):
                role = "embedding"
            elif module is lm_head:
                role = "lm_head"
            elif isinstance(module, RMSNorm):
                role = "norm"
            elif isinstance(module, Router):
                role = "router"
            elif isinstance(module, Experts):
                role = "expert"
            elif local_name == "bias" or param.ndim < 2:
                role = "bias" if local_name == "bias" else "norm"
            elif isinstance(module, nn.Linear):
                role = "matrix"
            else:
                raise ConfigError(f"parameter {name} {tuple(param.shape)} of {type(module).__name__} has no "
                                  "optimizer role; extend openk2.optim.build.classify_parameters")
            if role == "router":
                algorithm = router_gate
            else:
                algorithm = "muon" if role in ("expert", "matrix") else "adamw"
            out.append(ParamRole(name, param, role, algorithm))
    return out


def _unwrap(model: nn.Module) -> nn.Module:
    """The K2ForCausalLM inside DDP (`.module`) or torch.compile (`._orig_mod`) wrappers."""
    inner = model
    while not hasattr(inner, "attention_layers"):
        inner = getattr(inner, "module", None) or getattr(inner, "_orig_mod", None)
        if inner is None:
            raise TypeError(f"{type(model).__name__} is not a K2ForCausalLM (no attention_layers())")
    return inner


# ---- the optimizer -----------------------------------------------------------------------

class MuonClip:
    """Muon + AdamW + QK-Clip + aux-loss-free router bias, as one object (K2_SPEC §2).

    `step()` returns {max_logit, clipped_heads, expert_imbalance, expert_imbalance_max,
    skipped}: max_logit is the largest logit over all heads and layers before clipping;
    expert_imbalance is max/mean tokens per expert, averaged over MoE layers
    (expert_imbalance_max: the worst layer); both are None for a model without MoE layers.
    """

    def __init__(self, model: nn.Module, config: OptimConfig, process_group=None):
        self.model = _unwrap(model)
        self.config = c = config
        self.process_group = process_group
        roles = classify_parameters(self.model, c.router_gate)
        self.param_names = {id(r.param): r.name for r in roles}
        muon_params = [r.param for r in roles if r.algorithm == "muon" and c.name == "muonclip"]
        adamw_params = [r.param for r in roles if not (r.algorithm == "muon" and c.name == "muonclip")]
        self.muon = (Muon([{"params": muon_params, "role": "muon"}], lr=c.lr, weight_decay=c.weight_decay,
                          momentum=c.momentum, nesterov=c.nesterov, ns_steps=c.ns_steps, ns_dtype=c.ns_dtype)
                     if muon_params else None)
        plain = all(not is_dtensor(p) and p.device.type in ("cpu", "cuda") for p in adamw_params)
        self.adamw = torch.optim.AdamW([{"params": adamw_params, "role": "adamw"}], lr=c.lr, betas=c.betas,
                                       eps=c.eps, weight_decay=c.weight_decay,
                                       **({"fused": True} if plain else {"foreach": True}))
        on_cpu = bool(muon_params) and muon_params[0].device.type == "cpu"
        if on_cpu and dtype_from_name(c.ns_dtype) == torch.bfloat16:
            warn_if_slow_bf16("optim.ns_dtype='bfloat16'")
        self.params = muon_params + adamw_params
        self.steps = 0          # applied steps
        self.skipped_steps = 0

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [o for o in (self.muon, self.adamw) if o is not None]

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for o in self.optimizers for g in o.param_groups]

    def set_lr(self, lr: float) -> None:
        for group in self.param_groups:
            group["lr"] = lr

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self) -> dict[str, Any]:
        """One MuonClip step (Algorithm 1): Muon/AdamW, then QK-Clip, then the router bias."""
        c = self.config
        max_logits = self.model.max_logits().detach().float().clone()  # [L, H]
        counts = self.model.tokens_per_expert().detach().double().clone()  # [L_moe, E]
        bad = self._nonfinite_flags(max_logits, counts)  # [grads, stats], local
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            max_logits, counts, bad = self._all_reduce(max_logits, counts, bad)
        bad_grads, bad_stats = bad.tolist()
        stats = self._stats(max_logits, counts)
        if bad_grads or bad_stats:
            if c.nonfinite == "raise":
                raise NonFiniteError(self._nonfinite_message(bool(bad_grads), max_logits, counts))
            self.skipped_steps += 1
            self.model.reset_stats()
            return {**stats, "clipped_heads": 0, "skipped": True}
        for optimizer in self.optimizers:
            optimizer.step()
        clipped = qk_clip(self.model.attention_layers(), max_logits, c.qk_clip_tau)
        if c.router_bias_rate > 0 and counts.numel():
            update_router_bias(self.model.moe_layers(), counts, c.router_bias_rate, c.router_bias_centered)
        self.model.reset_stats()
        self.steps += 1
        return {**stats, "clipped_heads": int(clipped.sum()), "skipped": False}

    # ---- helpers of step() ----
    def _grads(self) -> list[torch.Tensor]:
        return [local_tensor(p.grad) for p in self.params if p.grad is not None]

    def _nonfinite_flags(self, max_logits: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        grads = self._grads()
        grads_ok = torch.tensor(True, device=max_logits.device)
        if grads:
            # L2 norms are one fast fused pass (max-abs is ~20x slower on CPU); a norm that is not
            # finite is confirmed element-wise, so a finite gradient whose norm overflows passes.
            norms = torch.stack([n.float() for n in torch._foreach_norm(grads)])
            if not bool(norms.isfinite().all()):
                grads_ok = torch.stack([g.isfinite().all() for g in grads]).all()
        stats_ok = max_logits.isfinite().all() & counts.isfinite().all()
        return torch.stack([~grads_ok.to(max_logits.device), ~stats_ok]).float()

    def _all_reduce(self, max_logits, counts, bad):
        """MAX of per-head max logits and of the non-finite flags, SUM of tokens per expert, so
        every replica applies the same gamma and the same bias update (K2_SPEC §2). Over every
        rank: with expert parallelism too, each rank's counts are its own tokens' routing over
        all E experts (routing happens before dispatch), so the world SUM is the global load."""
        dist = torch.distributed
        packed = torch.cat([torch.nan_to_num(max_logits, nan=0.0).flatten(), bad])
        dist.all_reduce(packed, op=dist.ReduceOp.MAX, group=self.process_group)
        if counts.numel():
            counts = torch.nan_to_num(counts, nan=0.0)
            dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=self.process_group)
        n = max_logits.numel()
        return packed[:n].view_as(max_logits), counts, packed[n:]

    def _stats(self, max_logits: torch.Tensor, counts: torch.Tensor) -> dict[str, Any]:
        max_logit = float(max_logits.max()) if max_logits.numel() else 0.0
        if counts.numel():
            imbalance = expert_imbalance(counts)
            mean, worst = imbalance.mean().item(), imbalance.max().item()
        else:
            mean = worst = None
        return {"max_logit": max_logit, "expert_imbalance": mean, "expert_imbalance_max": worst}

    def _nonfinite_message(self, bad_grads: bool, max_logits: torch.Tensor, counts: torch.Tensor) -> str:
        where = []
        if bad_grads:
            names = [self.param_names[id(p)] for p in self.params
                     if p.grad is not None and not local_tensor(p.grad).isfinite().all()]
            if names:
                more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
                where.append(f"gradient of {names[0]}{more}")
            else:
                where.append("gradient on another rank")
        layers = (~max_logits.isfinite()).any(dim=1).nonzero().flatten().tolist()
        if layers:
            where.append(f"attention max-logit of layer {layers[0]}")
        if counts.numel() and not counts.isfinite().all():
            where.append("tokens-per-expert counts")
        if not where:
            where.append("gradient or statistic on another rank")
        return (f"MuonClip step {self.steps + 1}: non-finite {'; '.join(where)}. Nothing was updated "
                "(weights and optimizer state are as before this step). Lower the learning rate, check the "
                "data, or set optim.nonfinite='skip' to skip such steps.")

    # ---- checkpointing ----
    def state_dict(self) -> dict[str, Any]:
        return {
            "name": self.config.name,
            "muon": self.muon.state_dict() if self.muon is not None else None,
            "adamw": self.adamw.state_dict(),
            "steps": self.steps,
            "skipped_steps": self.skipped_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = [k for k in ("muon", "adamw", "steps") if k not in state]
        if missing:
            raise ValueError(f"not a MuonClip state dict: missing {', '.join(missing)}")
        if (state["muon"] is None) != (self.muon is None):
            raise ValueError(f"optimizer state was saved with name={state.get('name')!r} and cannot be "
                             f"loaded into name={self.config.name!r}")
        if self.muon is not None:
            self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])
        self.steps = int(state["steps"])
        self.skipped_steps = int(state.get("skipped_steps", 0))


def build_optimizer(model: nn.Module, config: OptimConfig | dict[str, Any], process_group=None) -> MuonClip:
    """The trainer's optimizer for a K2ForCausalLM; also sets aux_loss_alpha on its MoE layers."""
    if isinstance(config, dict):
        config = OptimConfig.from_dict(config)
    inner = _unwrap(model)
    for module in inner.modules():
        if isinstance(module, MoE):
            module.aux_loss_alpha = config.aux_loss_alpha
    return MuonClip(inner, config, process_group)
