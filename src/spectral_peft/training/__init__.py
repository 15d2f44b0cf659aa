"""Training: the loop (SFT and REINFORCE objectives), and hooks for the budget projection and logging."""

from .hooks import BudgetCallback, attach_budget_projection, max_budget_use
from .loop import TrainConfig, TrainResult, lr_factor, train
from .objectives import ReinforceObjective, SFTObjective, collate_pairs, encode_pair, masked_nll

__all__ = [
    "BudgetCallback", "ReinforceObjective", "SFTObjective", "TrainConfig", "TrainResult", "attach_budget_projection",
    "collate_pairs", "encode_pair", "lr_factor", "masked_nll", "max_budget_use", "train",
]
