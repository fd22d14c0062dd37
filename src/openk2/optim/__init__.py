"""MuonClip (K2_SPEC §2): Muon + AdamW, QK-Clip, aux-loss-free router bias, LR schedules.

    cfg = OptimConfig.from_dict(recipe["optim"])
    opt = build_optimizer(model, cfg)
    opt.set_lr(lr_at(cfg, step, total_steps))
    ... forward/backward over micro-batches ...
    stats = opt.step()   # {max_logit, clipped_heads, expert_imbalance, expert_imbalance_max, skipped}
    opt.zero_grad(set_to_none=True)
"""

from openk2.optim.build import (
    MuonClip, NonFiniteError, OptimConfig, ParamRole, build_optimizer, classify_parameters,
)
from openk2.optim.muon import Muon, muon_update, newton_schulz_flops, zeropower_via_newtonschulz
from openk2.optim.qk_clip import qk_clip, scale_rows_
from openk2.optim.router_bias import expert_imbalance, update_router_bias
from openk2.optim.schedule import cosine_lr, lr_at, wsd_lr

__all__ = [
    "Muon", "MuonClip", "NonFiniteError", "OptimConfig", "ParamRole", "build_optimizer",
    "classify_parameters",
    "cosine_lr", "expert_imbalance", "lr_at", "muon_update", "newton_schulz_flops", "qk_clip", "scale_rows_",
    "update_router_bias", "wsd_lr", "zeropower_via_newtonschulz",
]
