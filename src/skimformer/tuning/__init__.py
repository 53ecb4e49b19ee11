"""tuning: `skimformer tune`, the search for the fastest pipeline within a fidelity budget.

One module a job: `budget` (the budget grammar), `rows` (search and held-out inputs), `space`
(the passes that apply and the fields a trial varies), `figures` (a trial's fidelity and speed),
`worker` (screen and measure trials on one machine), `pool` and `ray_pool` (where workers run),
`journal` (the output folder as the search's memory), `search` (Optuna), `report` (the choice,
the Pareto front, the plot, best.yaml) and `tuner` (the whole line). The package is `tuning`
rather than `tune` so that `skimformer.tune` stays the API function.
"""
from skimformer.tuning.budget import Budget, parse_budgets
from skimformer.tuning.tuner import TuneResult, parse_duration, tune_model

__all__ = ["Budget", "TuneResult", "parse_budgets", "parse_duration", "tune_model"]
