"""
Automated PAS extraction: score a labeled multiple-choice dataset, build the vectors, sweep and report.

`fit_pas` is the entry point; the modules below it are usable on their own:

- `scoring`: items as prefix + continuation token ids, letter and likelihood answers;
- `engine`: batched runs with a shared prefix cache, activation capture and per-row steering;
- `passes`: one pass over a split (baseline answers, activations, steered answers for a grid);
- `methods` and `contrast`: PASf, iPAS-all and iPAS-wrong-only, and the mean-difference vectors;
- `selection`, `stats`, `outputs`: the sweep table, intervals and McNemar tests, report files;
- `reference`: the one-example-at-a-time loop the fast sweep is checked against.
"""

from .fit import FitResult, FitSettings, fit_pas
from .methods import METHODS
from .scoring import SCORING_MODES
from .selection import PAPER_STRENGTHS, default_candidate_layers

__all__ = [
    "METHODS",
    "PAPER_STRENGTHS",
    "SCORING_MODES",
    "FitResult",
    "FitSettings",
    "default_candidate_layers",
    "fit_pas",
]
