"""`ElasticMoEConfig`: the elastic-routing options, their CLI flags, and all their validation.

Each field carries its Megatron-style flag in its metadata, so flags and fields map 1:1 by
construction (`add_elastic_moe_args`, `elastic_config_from_args`). Every check lives here and raises `UsageError` naming the flag
and its allowed range, before any model is built.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from megatron_emoe.errors import UsageError
from megatron_emoe.draws import RESAMPLE_EVERY
from megatron_emoe.routing import budget_weights, scheduled_k_ideal
from megatron_emoe.budget import (
    Budget,
    limit_reason,
    max_routable_experts,
    ncclep_dispatcher,
    takes_per_token_budgets,
)

MODES = ("topk", "emoe", "mmoe")
MMOE_SAMPLE_LEVELS = ("model", "layer", "token")
MMOE_RESAMPLE_EVERY = RESAMPLE_EVERY
MMOE_K_WEIGHTINGS = ("uniform", "capacity")
# The M-MoE paper's temperature for capacity-aware sampling.
DEFAULT_CAPACITY_TEMPERATURE = 2.0
# Load-balancing types whose losses the elastic router can feed with its own routing map.
AUX_LOSS_TYPES = ("aux_loss", "seq_aux_loss", "global_aux_loss", "none")



def _flag(name: str, help: str, **argparse_kwargs: Any) -> dict:
    return {"flag": name, "help": help, "argparse": argparse_kwargs}


@dataclass(frozen=True)
class ElasticMoEConfig:
    """How the router picks experts in training, and the default inference budget."""

    mode: str = field(
        default="topk",
        metadata=_flag(
            "--moe-router-mode",
            "Training-time routing: plain top-k, Elastic MoE co-activation sampling, or "
            "Matryoshka MoE random budgets.",
            choices=MODES,
        ),
    )
    k_ideal: Optional[int] = field(
        default=None,
        metadata=_flag(
            "--emoe-k-ideal",
            "EMoE candidate pool per token; k of these are activated. Default: "
            "round(emoe-k-ideal-factor * moe-router-topk).",
            type=int,
        ),
    )
    k_ideal_factor: float = field(
        default=2.0,
        metadata=_flag(
            "--emoe-k-ideal-factor", "k_ideal as a multiple of moe-router-topk (papers: 2-4).",
            type=float,
        ),
    )
    k_ideal_start: Optional[int] = field(
        default=None,
        metadata=_flag(
            "--emoe-k-ideal-start",
            "EMoE k_ideal schedule: the pool size when EMoE starts, going linearly to the final "
            "k_ideal (--emoe-k-ideal or its factor) over --emoe-k-ideal-ramp-iters steps "
            "(rounded, halves up). Default: no schedule, the final k_ideal throughout.",
            type=int,
        ),
    )
    k_ideal_ramp_iters: Optional[int] = field(
        default=None,
        metadata=_flag(
            "--emoe-k-ideal-ramp-iters",
            "EMoE k_ideal schedule: optimizer steps from --emoe-k-ideal-start to the final "
            "k_ideal (given together with --emoe-k-ideal-start).",
            type=int,
        ),
    )
    emoe_start_iter: Optional[int] = field(
        default=None,
        metadata=_flag(
            "--emoe-start-iter",
            "Top-k first, then EMoE: training steps before this one route as "
            "--moe-router-mode topk does (plus L_HR), EMoE from it on; a k_ideal schedule "
            "starts here. Default (or 0): EMoE from the first step.",
            type=int,
        ),
    )
    hr_loss_coeff: float = field(
        default=0.0,
        metadata=_flag(
            "--emoe-hr-loss-coeff",
            "Weight of the hierarchical router loss -KL(h||U) (EMoE: ~5e-4 LoRA, ~1e-8 FFN).",
            type=float,
        ),
    )
    mmoe_k_choices: Optional[tuple[int, ...]] = field(
        default=None,
        metadata=_flag(
            "--mmoe-k-choices", "M-MoE: the budgets k is drawn from (uniformly).", type=int,
            nargs="+",
        ),
    )
    mmoe_k_min: Optional[int] = field(
        default=None,
        metadata=_flag("--mmoe-k-min", "M-MoE: smallest k of a range (default 1).", type=int),
    )
    mmoe_k_max: Optional[int] = field(
        default=None,
        metadata=_flag(
            "--mmoe-k-max", "M-MoE: largest k of a range (default moe-router-topk).", type=int
        ),
    )
    mmoe_sample_level: str = field(
        default="layer",
        metadata=_flag(
            "--mmoe-sample-level",
            "M-MoE: what shares one k: the whole model (every layer), each layer, or each token.",
            # validated in the config, so the old "step" gets a message naming its replacement
            metavar="{" + ",".join(MMOE_SAMPLE_LEVELS) + "}",
        ),
    )
    mmoe_resample_every: str = field(
        default="micro-batch",
        metadata=_flag(
            "--mmoe-resample-every",
            "M-MoE, model or layer level: draw k anew for every micro-batch, or once per "
            "optimizer step for all its micro-batches (global-batch).",
            choices=MMOE_RESAMPLE_EVERY,
        ),
    )
    mmoe_k_weighting: str = field(
        default="uniform",
        metadata=_flag(
            "--mmoe-k-weighting",
            "M-MoE: every budget equally likely, or capacity-aware P(k) ∝ exp(log k / τ).",
            choices=MMOE_K_WEIGHTINGS,
        ),
    )
    mmoe_capacity_temperature: Optional[float] = field(
        default=None,
        metadata=_flag(
            "--mmoe-capacity-temperature",
            f"M-MoE: τ of --mmoe-k-weighting capacity (default {DEFAULT_CAPACITY_TEMPERATURE}, "
            "the paper's).",
            type=float,
        ),
    )
    mmoe_k_weights: Optional[tuple[float, ...]] = field(
        default=None,
        metadata=_flag(
            "--mmoe-k-weights",
            "M-MoE: relative weight of each budget, in the order of --mmoe-k-choices "
            "(ascending for --mmoe-k-min/--mmoe-k-max).",
            type=float, nargs="+",
        ),
    )
    mmoe_seed: int = field(
        default=1234,
        metadata=_flag(
            "--mmoe-seed", "M-MoE: seed of the model/layer budget draws (same on all ranks).",
            type=int,
        ),
    )
    active_experts: Optional[Union[int, tuple[int, ...]]] = field(
        default=None,
        metadata=_flag(
            "--moe-active-experts",
            "Inference budget k': one value for every MoE layer, or one per MoE layer. "
            "Default: the training moe-router-topk.",
            type=int,
            nargs="+",
        ),
    )

    def __post_init__(self):
        # Normalise list-valued fields so the frozen config stays hashable and comparable.
        if self.mmoe_k_choices is not None:
            object.__setattr__(self, "mmoe_k_choices", tuple(int(k) for k in self.mmoe_k_choices))
        if self.mmoe_k_weights is not None:
            object.__setattr__(self, "mmoe_k_weights", tuple(float(w) for w in self.mmoe_k_weights))
        if isinstance(self.active_experts, (list, tuple)):
            budget = tuple(int(k) for k in self.active_experts)
            object.__setattr__(self, "active_experts", budget[0] if len(budget) == 1 else budget)
        self._validate_standalone()

    # ----------------------------------------------------------------------------------------
    # Derived values
    # ----------------------------------------------------------------------------------------
    def resolved_k_ideal(self, topk: int) -> int:
        """The EMoE candidate-pool size for a training top-k."""
        return self.k_ideal if self.k_ideal is not None else round(self.k_ideal_factor * topk)

    @property
    def emoe_begin(self) -> int:
        """The first training step that routes with EMoE (`--emoe-start-iter`, 0 when unset)."""
        return 0 if self.emoe_start_iter is None else self.emoe_start_iter

    def routes_topk_at(self, step: Optional[int]) -> bool:
        """Whether a training forward at optimizer `step` routes as --moe-router-mode topk does:
        always in topk mode, and before --emoe-start-iter in emoe mode (never for step None)."""
        if self.mode == "topk":
            return True
        return self.mode == "emoe" and step is not None and step < self.emoe_begin

    def k_ideal_at(self, step: Optional[int], topk: int) -> int:
        """The EMoE pool size of a training forward at optimizer `step`: the --emoe-k-ideal-start
        schedule when set, else (and for step None, outside a training loop) the final one."""
        final = self.resolved_k_ideal(topk)
        if step is None or self.k_ideal_start is None:
            return final
        return scheduled_k_ideal(
            step, self.k_ideal_start, final, self.k_ideal_ramp_iters, begin=self.emoe_begin
        )

    def mmoe_budgets(self, topk: int) -> tuple[int, ...]:
        """The M-MoE budgets k is drawn from, ascending."""
        if self.mmoe_k_choices is not None:
            return tuple(sorted(set(self.mmoe_k_choices)))
        low = self.mmoe_k_min if self.mmoe_k_min is not None else 1
        high = self.mmoe_k_max if self.mmoe_k_max is not None else topk
        return tuple(range(low, high + 1))

    def mmoe_weights(self, topk: int) -> Optional[tuple[float, ...]]:
        """The probability of each of `mmoe_budgets(topk)`; None when they are equally likely."""
        if self.mmoe_k_weights is None and self.mmoe_k_weighting == "uniform":
            return None
        budgets = self.mmoe_budgets(topk)
        temperature = (DEFAULT_CAPACITY_TEMPERATURE if self.mmoe_capacity_temperature is None
                       else self.mmoe_capacity_temperature)
        weights = self.mmoe_k_weights
        if weights is not None and self.mmoe_k_choices is not None:  # given in the choices' order
            weights = [dict(zip(self.mmoe_k_choices, weights))[k] for k in budgets]
        return budget_weights(budgets, self.mmoe_k_weighting, temperature, weights)

    @property
    def inference_budget(self) -> Optional[Budget]:
        """`--moe-active-experts` as a `Budget` (None: the training top-k)."""
        return Budget.of(self.active_experts, flag="--moe-active-experts")

    def max_training_topk(self, topk: int) -> int:
        """The most experts one token can activate in training."""
        return max(self.mmoe_budgets(topk)) if self.mode == "mmoe" else topk

    # ----------------------------------------------------------------------------------------
    # Validation: one place for every rule
    # ----------------------------------------------------------------------------------------
    def _validate_standalone(self):
        """Rules that need no model config."""
        if self.mode not in MODES:
            raise UsageError(f"--moe-router-mode must be one of {MODES}, got {self.mode!r}")
        if self.mmoe_sample_level == "step":
            raise UsageError(
                "--mmoe-sample-level step was split in two: --mmoe-sample-level model (one k for "
                "every layer) with --mmoe-resample-every micro-batch (the old 'step') or "
                "global-batch (one k per optimizer step)"
            )
        if self.mmoe_sample_level not in MMOE_SAMPLE_LEVELS:
            raise UsageError(
                f"--mmoe-sample-level must be one of {MMOE_SAMPLE_LEVELS}, "
                f"got {self.mmoe_sample_level!r}"
            )
        self._validate_mmoe_sampling()
        if self.k_ideal_factor < 1.0:
            raise UsageError(f"--emoe-k-ideal-factor must be >= 1, got {self.k_ideal_factor}")
        if self.hr_loss_coeff < 0.0:
            raise UsageError(f"--emoe-hr-loss-coeff must be >= 0, got {self.hr_loss_coeff}")
        self._validate_emoe_schedule()
        if self.mmoe_k_choices is not None and (
            self.mmoe_k_min is not None or self.mmoe_k_max is not None
        ):
            raise UsageError("give either --mmoe-k-choices or --mmoe-k-min/--mmoe-k-max, not both")
        if self.mmoe_k_choices is not None and len(self.mmoe_k_choices) == 0:
            raise UsageError("--mmoe-k-choices needs at least one value")

    def _validate_emoe_schedule(self) -> None:
        """--emoe-k-ideal-start/--emoe-k-ideal-ramp-iters and --emoe-start-iter: emoe mode only,
        the schedule's two flags together, counts in range (the pool's range needs the model)."""
        schedule = {"--emoe-k-ideal-start": self.k_ideal_start,
                    "--emoe-k-ideal-ramp-iters": self.k_ideal_ramp_iters}
        given = {**schedule, "--emoe-start-iter": self.emoe_start_iter}
        for flag, value in given.items():
            if value is not None and self.mode != "emoe":
                raise UsageError(
                    f"{flag} schedules EMoE training and needs --moe-router-mode emoe, "
                    f"got --moe-router-mode {self.mode}"
                )
        missing = [flag for flag, value in schedule.items() if value is None]
        if len(missing) == 1:
            other = next(flag for flag in schedule if flag not in missing)
            raise UsageError(f"{other} needs {missing[0]}: give both flags or neither")
        if self.k_ideal_ramp_iters is not None and self.k_ideal_ramp_iters < 1:
            raise UsageError(
                f"--emoe-k-ideal-ramp-iters must be >= 1, got {self.k_ideal_ramp_iters}"
            )
        if self.emoe_start_iter is not None and self.emoe_start_iter < 0:
            raise UsageError(f"--emoe-start-iter must be >= 0, got {self.emoe_start_iter}")

    def _validate_mmoe_sampling(self) -> None:
        """How M-MoE draws its budgets: flags that must fit together."""
        for flag, value, allowed in (
            ("--mmoe-resample-every", self.mmoe_resample_every, MMOE_RESAMPLE_EVERY),
            ("--mmoe-k-weighting", self.mmoe_k_weighting, MMOE_K_WEIGHTINGS),
        ):
            if value not in allowed:
                raise UsageError(f"{flag} must be one of {allowed}, got {value!r}")
        if self.mmoe_sample_level == "token" and self.mmoe_resample_every != "micro-batch":
            raise UsageError(
                "--mmoe-resample-every global-batch needs --mmoe-sample-level model or layer: "
                "per-token budgets are drawn anew for every token"
            )
        if self.mmoe_capacity_temperature is not None:
            if self.mmoe_k_weighting != "capacity":
                raise UsageError(
                    "--mmoe-capacity-temperature is the τ of --mmoe-k-weighting capacity; "
                    "it has no effect with --mmoe-k-weighting uniform"
                )
            if not self.mmoe_capacity_temperature > 0:
                raise UsageError(
                    f"--mmoe-capacity-temperature must be > 0, got {self.mmoe_capacity_temperature}"
                )
        if self.mmoe_k_weights is not None:
            if self.mmoe_k_weighting != "uniform":
                raise UsageError(
                    "give either --mmoe-k-weights or --mmoe-k-weighting capacity, not both"
                )
            if min(self.mmoe_k_weights) < 0 or sum(self.mmoe_k_weights) <= 0:
                raise UsageError(
                    f"--mmoe-k-weights must be non-negative with a positive sum, "
                    f"got {list(self.mmoe_k_weights)}"
                )

    def validate(self, transformer_config) -> None:
        """Check this config against a Megatron `TransformerConfig`; raise `ValueError` if off."""
        tc = transformer_config
        num_experts, topk = tc.num_moe_experts, tc.moe_router_topk
        if not num_experts:
            raise UsageError("the elastic router needs an MoE model: set --num-experts")
        if self.mode == "emoe":
            k_ideal = self.resolved_k_ideal(topk)
            limit = max_routable_experts(tc)
            if not topk <= k_ideal <= limit:
                raise UsageError(
                    f"--emoe-k-ideal must be in [moe-router-topk={topk}, {limit}] "
                    f"({limit_reason(tc)}), got {k_ideal}"
                    + ("" if self.k_ideal is not None else " from --emoe-k-ideal-factor")
                )
            if self.k_ideal_start is not None and not topk <= self.k_ideal_start <= limit:
                raise UsageError(
                    f"--emoe-k-ideal-start must be in [moe-router-topk={topk}, {limit}] "
                    f"({limit_reason(tc)}), got {self.k_ideal_start}"
                )
        if self.mode == "mmoe":
            self._validate_mmoe(tc)
        if self.mode != "topk":
            self._validate_router_features(tc)
            if ncclep_dispatcher(tc):
                raise UsageError(
                    f"--moe-router-mode {self.mode} varies the experts per token, but "
                    "--moe-flex-dispatcher-backend ncclep sizes its buffers once from the first "
                    "dispatch: use deepep, hybridep or --moe-token-dispatcher-type alltoall"
                )
            if _graphs_capture_router(tc):
                raise UsageError(
                    f"--cuda-graph-impl {tc.cuda_graph_impl} would capture the router, whose "
                    f"random draws and varying k --moe-router-mode {self.mode} needs at every "
                    "step: leave the router out (--cuda-graph-modules attn, or mlp for dense "
                    "layers), or use --moe-router-mode topk"
                )
        if self.active_experts is not None:
            self.inference_budget.validate(tc, flag="--moe-active-experts")

    def _validate_mmoe(self, tc) -> None:
        budgets = self.mmoe_budgets(tc.moe_router_topk)
        limit = max_routable_experts(tc)
        if not budgets or budgets[0] < 1 or budgets[-1] > limit:
            flag = "--mmoe-k-choices" if self.mmoe_k_choices is not None else "--mmoe-k-min/max"
            raise UsageError(
                f"{flag} must lie in [1, {limit}] ({limit_reason(tc)}) and not be empty, "
                f"got {list(budgets)}"
            )
        if self.mmoe_k_weights is not None:
            given = self.mmoe_k_choices or budgets
            if len(set(given)) != len(given):
                raise UsageError(
                    f"--mmoe-k-weights pairs with each of --mmoe-k-choices, which repeats a "
                    f"budget: {list(given)}"
                )
            if len(self.mmoe_k_weights) != len(given):
                raise UsageError(
                    f"--mmoe-k-weights needs one weight per budget {list(given)} "
                    f"({len(given)}), got {len(self.mmoe_k_weights)}"
                )
        if self.mmoe_sample_level == "token" and not takes_per_token_budgets(tc):
            raise UsageError(
                f"--mmoe-sample-level token gives each token its own k, which "
                f"--moe-token-dispatcher-type {tc.moe_token_dispatcher_type} cannot take in "
                f"dropless mode (it needs exactly moe-router-topk experts per token). Use "
                f"--moe-token-dispatcher-type allgather, or --mmoe-sample-level model|layer"
            )
        if self.mmoe_sample_level == "token" and tc.moe_pad_expert_input_to_capacity:
            raise UsageError(
                "--moe-pad-expert-input-to-capacity pads every expert to a capacity that all "
                "ranks share, but --mmoe-sample-level token sizes capacity from the budgets each "
                "rank draws: use --mmoe-sample-level model|layer, or drop without padding"
            )

    def _validate_router_features(self, tc) -> None:
        balancing = tc.moe_router_load_balancing_type
        types = balancing if isinstance(balancing, list) else [balancing]
        unsupported = [t for t in types if t not in AUX_LOSS_TYPES]
        if unsupported:
            raise UsageError(
                f"--moe-router-load-balancing-type {unsupported[0]} is not supported with "
                f"--moe-router-mode {self.mode}; allowed: {AUX_LOSS_TYPES}"
            )
        if getattr(tc, "moe_enable_routing_replay", False):
            raise UsageError(
                f"--moe-enable-routing-replay replays fixed top-k choices and cannot be combined "
                f"with --moe-router-mode {self.mode}; use --moe-router-mode topk"
            )
        if tc.moe_apply_probs_on_input and self.max_training_topk(tc.moe_router_topk) != 1:
            raise UsageError(
                f"--moe-apply-probs-on-input needs exactly one expert per token, which "
                f"--moe-router-mode {self.mode} does not keep"
            )


def _graphs_capture_router(tc) -> bool:
    """Whether Megatron's CUDA graphs capture the MoE router: a full-iteration graph, a whole
    layer (no modules named), or the "moe" / "moe_router" modules."""
    impl = getattr(tc, "cuda_graph_impl", "none")
    if impl == "none":
        return False
    if impl == "full_iteration":
        return True
    modules = getattr(tc, "cuda_graph_modules", None) or []
    modules = modules if isinstance(modules, (list, tuple)) else [modules]
    names = {getattr(m, "name", str(m)) for m in modules}
    return not names or bool(names & {"full", "moe", "moe_router"})


# ---------------------------------------------------------------------------------------------
# Flags: generated from the dataclass, so they map 1:1 to its fields
# ---------------------------------------------------------------------------------------------
def add_elastic_moe_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the elastic-routing flags to a (Megatron) parser; usable as `extra_args_provider`."""
    group = parser.add_argument_group(title="elastic MoE routing (megatron-emoe)")
    for f in dataclasses.fields(ElasticMoEConfig):
        meta = f.metadata
        group.add_argument(
            meta["flag"], dest=_dest(meta["flag"]), default=f.default, help=meta["help"],
            **meta["argparse"],
        )
    return parser


def elastic_config_from_args(args: argparse.Namespace, transformer_config=None) -> ElasticMoEConfig:
    """Build (and, given a `TransformerConfig`, fully validate) the config from parsed flags."""
    config = ElasticMoEConfig(
        **{f.name: getattr(args, _dest(f.metadata["flag"])) for f in dataclasses.fields(ElasticMoEConfig)}
    )
    if transformer_config is not None:
        config.validate(transformer_config)
    return config


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")
