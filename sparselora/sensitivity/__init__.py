"""Layer-wise sensitivity analysis: which layers can run sparse, and how much, for a FLOP budget.

    measure.py   the loss increase when one layer's FFN or attention alone runs sparse, per level
    choose.py    a config for a FLOP budget (a multiple-choice knapsack over the measured increases)
    report.py    the table, the heatmap, the chosen config's YAML header
"""

from sparselora.sensitivity.choose import (
    Choice, InfeasibleBudgetError, block_savings, check_budget, choose_config, predicted_deltas,
)
from sparselora.sensitivity.measure import (  # noqa: F401  (_Runner: for tests)
    KIND_NAMES, KINDS, Sensitivity, _Runner, batch_stats, check_levels, config_loss, make_batches,
    measure_sensitivity, one_layer_config,
)
from sparselora.sensitivity.report import fit_title, format_table, print_table, table_rows, write_heatmap, yaml_header

__all__ = [
    "KINDS", "KIND_NAMES", "Choice", "InfeasibleBudgetError", "Sensitivity", "batch_stats", "block_savings",
    "check_budget", "check_levels", "choose_config", "config_loss", "fit_title", "format_table", "make_batches",
    "measure_sensitivity", "one_layer_config", "predicted_deltas", "print_table", "table_rows", "write_heatmap",
    "yaml_header",
]
