"""Every training mode of the scaling-wall grid: what it is, its flags, and where it runs.

Modes are built from the training k and the steps of setting (a), so the grid keeps its shape at
any size: specialists at every k' in 1 ... 2k but k, EMoE pools k + 1, 2k and 3k, M-MoE budgets
1 ... 2k. Setting (b) runs every mode but the elastic-pretraining remedies, which answer a
question about training from scratch.
"""

from __future__ import annotations

from dataclasses import dataclass

# The papers' weight of the hierarchical router loss for FFN experts is 1e-8, for LoRA experts
# 5e-4; the grid uses 5e-4 (tiny FFN experts behave closer to LoRA ones).
HR_LOSS_COEFF = 5e-4
GROUPS = {
    "topk": "Top-k at k",
    "specialist": "Top-k specialists trained at k'",
    "emoe": "EMoE and its ablations",
    "mmoe": "M-MoE sampling variants",
    "remedy": "elastic pretraining: remedies for EMoE's loss at k",
}


@dataclass(frozen=True)
class Mode:
    """One way of training: its name in files, label, group, flags and training k."""

    name: str
    label: str
    group: str
    flags: tuple[str, ...]
    train_k: int  # the model's --moe-router-topk (M-MoE: the k it is compared at)
    settings: str = "ab"  # the settings it runs in
    note: str = ""


def build_modes(k: int, pretrain_iters: int, hr_coeff: float = HR_LOSS_COEFF) -> dict[str, Mode]:
    """The grid's modes for training k, in plotting order."""
    hr = ("--emoe-hr-loss-coeff", f"{hr_coeff:g}")

    def emoe(pool: int, *extra: str) -> tuple[str, ...]:
        return ("--moe-router-mode", "emoe", "--emoe-k-ideal", str(pool), *extra)

    def mmoe(level: str, *extra: str) -> tuple[str, ...]:
        return ("--moe-router-mode", "mmoe", "--mmoe-k-min", "1", "--mmoe-k-max", str(2 * k),
                "--mmoe-sample-level", level, *extra)

    modes = [Mode("topk", f"Top-k (k = {k})", "topk", ("--moe-router-mode", "topk"), k)]
    for spec in [s for s in range(1, 2 * k + 1) if s != k]:
        flags = ("--moe-router-mode", "topk", "--moe-router-topk", str(spec))
        note = ""
        if spec == 1:
            # softmax after a top-1 choice gives the gate 1 and the router no language-model
            # gradient; Switch Transformer's top-1 takes the softmax first
            flags += ("--moe-router-pre-softmax",)
            note = "softmax before the top-1 choice (Switch Transformer), else the gate is 1"
        modes.append(Mode(f"topk-k{spec}", f"Top-k specialist k = {spec}", "specialist", flags,
                          spec, note=note))
    modes += [
        Mode("emoe", f"EMoE (k_ideal = {2 * k}, λ = {hr_coeff:g})", "emoe", emoe(2 * k, *hr), k),
        Mode("emoe-no-hr", "EMoE without L_HR (λ = 0)", "emoe", emoe(2 * k), k),
        Mode("topk-hr", "Top-k + L_HR (no co-activation)", "emoe",
             ("--moe-router-mode", "topk", *hr), k),
        Mode(f"emoe-pool{k + 1}", f"EMoE k_ideal = {k + 1}", "emoe", emoe(k + 1, *hr), k),
        Mode(f"emoe-pool{3 * k}", f"EMoE k_ideal = {3 * k}", "emoe", emoe(3 * k, *hr), k),
        Mode("mmoe-layer", "M-MoE layer-wise", "mmoe", mmoe("layer"), k),
        Mode("mmoe-model-global", "M-MoE model, per global batch", "mmoe",
             mmoe("model", "--mmoe-resample-every", "global-batch"), k),
        Mode("mmoe-model-micro", "M-MoE model, per micro-batch", "mmoe", mmoe("model"), k),
        # per-token budgets need a dispatcher that takes them in dropless mode
        Mode("mmoe-token", "M-MoE token-wise", "mmoe",
             mmoe("token", "--moe-token-dispatcher-type", "allgather"), k),
        Mode("mmoe-layer-capacity", "M-MoE layer-wise, capacity-aware τ = 2", "mmoe",
             mmoe("layer", "--mmoe-k-weighting", "capacity", "--mmoe-capacity-temperature", "2"),
             k),
    ]
    half = max(1, pretrain_iters // 2)
    modes += [
        Mode("emoe-widen", f"EMoE, k_ideal {k} → {2 * k} over the first half", "remedy",
             emoe(2 * k, *hr, "--emoe-k-ideal-start", str(k), "--emoe-k-ideal-ramp-iters",
                  str(half)), k, settings="a"),
        Mode("emoe-narrow", f"EMoE, k_ideal {2 * k} → {k + 1} over the run", "remedy",
             emoe(k + 1, *hr, "--emoe-k-ideal-start", str(2 * k), "--emoe-k-ideal-ramp-iters",
                  str(pretrain_iters)), k, settings="a"),
        Mode("emoe-topk-first", "Top-k for the first half, then EMoE", "remedy",
             emoe(2 * k, *hr, "--emoe-start-iter", str(half)), k, settings="a"),
    ]
    return {mode.name: mode for mode in modes}


# The remedies the issue names that are modes of the grid already.
REMEDY_ALIASES = {"pool k + 1": "emoe-pool{k1}", "layer-wise M-MoE": "mmoe-layer"}


def remedy_modes(modes: dict[str, Mode], k: int) -> list[str]:
    """The modes that answer "elastic pretraining": the remedy group and the two grid modes the
    issue also counts as remedies (a pool of k + 1, layer-wise M-MoE)."""
    names = [name for name, mode in modes.items() if mode.group == "remedy"]
    return names + [alias.format(k1=k + 1) for alias in REMEDY_ALIASES.values()]
