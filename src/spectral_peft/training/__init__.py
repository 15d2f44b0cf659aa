"""Training: hooks for the budget projection and logging."""

from .hooks import BudgetCallback, attach_budget_projection, max_budget_use

__all__ = ["BudgetCallback", "attach_budget_projection", "max_budget_use"]
