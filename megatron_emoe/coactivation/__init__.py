"""Expert co-activation diagnostics (EMoE, arXiv 2509.21892): which experts process the same tokens.

The EMoE paper traces the inference-time scaling wall to expert combinations that never ran together
in training. This package measures that: per MoE layer, the `[experts, experts]` count of tokens
routed to both experts i and j, collected from `ElasticRouter` forwards (in training, or in eval at
each budget k'), then compared between training and eval by the Frobenius distance of the
normalised matrices. The default normalisation, "pairs" (the distribution over co-activated
expert pairs), is this project's choice: it makes matrices taken at different k comparable.

One module per job; every public name is importable from `megatron_emoe.coactivation`:

- `counts`: the pure tensor maths, `coactivation_counts`, `normalize`, `frobenius_distance`.
- `stats`: `Coactivation`, the summed matrices of one phase (training, or eval at one budget).
- `recorder`: `CoactivationRecorder(model)`, forward hooks on the routers that only read the
  routing map and the router's own entropy, so routing is unchanged; `reduce()` sums over all
  ranks. `collect_at_budgets` / `recording`: eval matrices at budgets k'.
- `collector`: `TrainingCollector` (owned by the training entry) and `writing_at_saves`: training
  matrices written at each checkpoint save (`--coactivation-dir`).
- `storage`: `save` / `load` (`.npz`) and `write_reduced` (rank 0 writes).
- `plots`: `save_heatmaps` (PNG, one per layer).
- `distances`: `distance_table` and `compare_directory`, the per-layer distance table as JSON.

Expert load and router entropy come from `megatron_emoe.routing` (`load_imbalance`,
`router_entropy`); the load is the diagonal of the counts.
"""

from megatron_emoe.coactivation.collector import TrainingCollector, writing_at_saves
from megatron_emoe.coactivation.counts import (
    DEFAULT_NORMALIZATION,
    NORMALIZATIONS,
    coactivation_counts,
    frobenius_distance,
    has_pairs,
    normalize,
)
from megatron_emoe.coactivation.distances import (
    DISTANCE_FILE,
    compare_directory,
    distance_table,
    write_distance_table,
)
from megatron_emoe.coactivation.plots import layer_figure, save_heatmaps
from megatron_emoe.coactivation.recorder import (
    PHASES,
    CoactivationRecorder,
    collect_at_budgets,
    eval_tag,
    existing_eval_files,
    recording,
)
from megatron_emoe.coactivation.stats import Coactivation
from megatron_emoe.coactivation.storage import TRAIN_TAG, load, save, write_reduced

__all__ = [
    "DEFAULT_NORMALIZATION",
    "DISTANCE_FILE",
    "NORMALIZATIONS",
    "PHASES",
    "TRAIN_TAG",
    "Coactivation",
    "CoactivationRecorder",
    "TrainingCollector",
    "coactivation_counts",
    "collect_at_budgets",
    "compare_directory",
    "distance_table",
    "eval_tag",
    "existing_eval_files",
    "frobenius_distance",
    "has_pairs",
    "layer_figure",
    "load",
    "normalize",
    "recording",
    "save",
    "save_heatmaps",
    "write_distance_table",
    "write_reduced",
    "writing_at_saves",
]
