"""The inference-time scaling wall, reproduced as a grid: every mode of `benchmarks.wall.modes`,
in two settings, with several seeds, each evaluated at k' = 1 ... 3k.

- (a) pretraining from scratch on the embedded pretraining data;
- (b) the papers' setting: the Top-k model of (a) with the same seed is the pretrained base, which
  each mode continues (`--finetune --load BASE`: weights only, fresh optimizer) on the packed
  instruction data (`--sft-packed`, loss on response tokens only). The base itself is evaluated
  too. Its evaluation split is the embedded one plus whole source files moved from training until
  it holds at least `--sft-eval-tokens` response tokens (`benchmarks.wall.sft_split`).

Modes (k = 2 by default): Top-k; Top-k specialists trained at every k' in 1 ... 2k but k; EMoE
(k_ideal = 2k, L_HR λ = 5e-4) and its ablations (λ = 0, Top-k + L_HR, k_ideal = k + 1 and 3k);
M-MoE with k in 1 ... 2k drawn layer-wise, per model and global batch, per model and micro-batch,
per token, and layer-wise capacity-aware (τ = 2); and, in (a) only, remedies for EMoE's loss at k
when pretraining (a widening and a narrowing k_ideal schedule, Top-k first then EMoE).

Within a seed every run of a setting starts from the same weights (same `--seed`, same shapes),
reads the same data in the same order for the same number of steps, and is evaluated on the same
validation batches at every budget, so differences between modes and budgets are paired by seed.

Every run is the project's training entry (Megatron's own training loop) under torchrun, launched
by the project's launch recipe (`megatron_emoe.runtime.launch`). After training, the entry reloads
the saved checkpoint and measures validation loss at every budget (`--elastic-eval-budgets`) and
the co-activation distance between training and evaluation (`--coactivation-dir`).

Resumable: each (setting, mode, seed) writes `<work-dir>/<setting>/<mode>/seed<N>/result.json`
when it is done; a rerun skips the finished runs, so the grid can run in parts (`--modes`,
`--seeds`, `--settings` select). The summary and plots always cover every finished run of the
profile's grid and list the missing ones.

Profiles (the flags override them). Each profile's model is a YAML file of Megatron flags,
examples/configs/scaling_wall_{quick,cpu,gpu}.yaml, given to every run as `--config`:

- CPU (default): 2 layers, hidden 64, 16 experts of width 64, k = 2, 16 x 128 tokens per step
  (2 micro-batches), one process per run and 2 runs at a time on 2 cores; (a) 400 steps (0.82M
  tokens, lr 3e-3), (b) 150 steps (0.31M tokens, lr 1e-3); seeds 1, 2, 3. Evaluation: the whole
  pretraining validation split in (a) (75,776 tokens), the whole instruction evaluation split in
  (b) (about 73k response tokens). About 70 min on 2 idle cores.
- `--quick`: the test's run: a tiny model, a few steps, 2 seeds and three modes.
- `--gpu`: one node, nproc = the GPUs (EP over all of them), one run at a time, bf16,
  distributed optimizer, Transformer Engine with grouped GEMM when installed; 8 layers, hidden 512,
  64 experts of width 256, k = 4 (k' = 1 ... 12), 64 x 1024 tokens per step, (a) 2000 steps,
  (b) 200 steps. The embedded data holds 2.2M pretraining tokens: give a real corpus with
  `--pretrain-train-data` and the other data flags.

    python -m benchmarks.scaling_wall                       # the CPU grid
    python -m benchmarks.scaling_wall --modes topk emoe --seeds 1   # a part of it
    python -m benchmarks.scaling_wall --quick               # the test's smoke run
    python -m benchmarks.scaling_wall --dry-run             # print the commands, run nothing
    python -m benchmarks.scaling_wall [...] -- --num-layers 2   # more Megatron flags, every run

Writes `<output>/scaling_wall.json` (settings, definitions, per setting and mode the per-seed
losses and their statistics, M-MoE against the specialists, training compute, the remedies, the
co-activation points, every run), `<output>/scaling_wall.md` (its tables, as the README quotes
them) and four PNGs (see `benchmarks.wall.plots`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import shutil
import statistics
import sys
import time
from pathlib import Path

import yaml

from benchmarks import common
from benchmarks.wall import plots, report, stats
from benchmarks.wall.modes import GROUPS, HR_LOSS_COEFF, build_modes, remedy_modes
from benchmarks.wall.runs import BASE, Run, StaleResult, run_pool
from benchmarks.wall.sft_split import build_sft_split
from megatron_emoe.config import add_elastic_moe_args, elastic_config_from_args
from megatron_emoe.data.indexed import sequence_lengths
from megatron_emoe.files import write_bytes_atomically, write_text_atomically
from megatron_emoe.runtime import launch

NAME = "scaling_wall"
REPO = common.REPO
SETTINGS = {
    "a": "pretraining from scratch",
    "b": "fine-tuning the Top-k checkpoint of (a) on instruction data",
}
CONFIGS = REPO / "examples" / "configs"
# The model sizes this script reads from a profile's YAML file (its names -> the YAML's).
MODEL_KEYS = {
    "num_layers": "num-layers", "hidden_size": "hidden-size", "ffn_hidden_size": "ffn-hidden-size",
    "num_attention_heads": "num-attention-heads", "num_experts": "num-experts",
    "moe_ffn_hidden_size": "moe-ffn-hidden-size", "topk": "moe-router-topk", "seq_length": "seq-length",
}
# Batch, schedule, seeds and processes per profile.
SCHEDULES = {
    "quick": dict(micro_batch_size=4, global_batch_size=8, pretrain_iters=6, finetune_iters=4,
                  pretrain_lr=3e-3, finetune_lr=1e-3, eval_iters=2, log_interval=1, seeds=[1, 2],
                  jobs=2, nproc=1, modes=["topk", "topk-k1", "mmoe-layer"]),
    "cpu": dict(micro_batch_size=8, global_batch_size=16, pretrain_iters=400, finetune_iters=150,
                pretrain_lr=3e-3, finetune_lr=1e-3, eval_iters=None, log_interval=20,
                seeds=[1, 2, 3], jobs=2, nproc=1, modes=None),
    "gpu": dict(micro_batch_size=4, global_batch_size=64, pretrain_iters=2000, finetune_iters=200,
                pretrain_lr=1e-3, finetune_lr=3e-4, eval_iters=None, log_interval=20,
                seeds=[1, 2, 3], jobs=1, nproc=None, modes=None),
}
# Response tokens the evaluation split of (b) holds at least.
SFT_EVAL_TOKENS = 65536
# Flags this script sets itself (passing them after `--` would break the comparison).
OWNED_FLAGS = {
    "--seed", "--train-iters", "--train-samples", "--lr", "--min-lr", "--lr-warmup-iters",
    "--lr-decay-style", "--moe-router-topk", "--num-experts", "--seq-length",
    "--max-position-embeddings", "--global-batch-size", "--micro-batch-size", "--eval-iters",
    "--eval-interval", "--save", "--load", "--save-interval", "--finetune", "--skip-train",
    "--moe-router-mode", "--emoe-k-ideal", "--emoe-k-ideal-factor", "--emoe-hr-loss-coeff",
    "--emoe-k-ideal-start", "--emoe-k-ideal-ramp-iters", "--emoe-start-iter",
    "--mmoe-k-min", "--mmoe-k-max", "--mmoe-k-choices", "--mmoe-sample-level",
    "--mmoe-resample-every", "--mmoe-k-weighting", "--mmoe-capacity-temperature",
    "--mmoe-k-weights", "--moe-router-pre-softmax", "--moe-token-dispatcher-type",
    "--expert-model-parallel-size", "--data-path", "--train-data-path", "--valid-data-path",
    "--test-data-path", "--tokenizer-model", "--sft-packed", "--elastic-eval-budgets",
    "--elastic-eval-output", "--tensorboard-dir", "--data-cache-path", "--config",
    "--coactivation-dir", "--mmoe-seed",
}


def profile_config(profile: str) -> Path:
    """The profile's model: examples/configs/scaling_wall_<profile>.yaml."""
    return CONFIGS / f"{NAME}_{profile}.yaml"


def model_sizes(path: Path) -> dict[str, int]:
    """The model sizes of a profile's YAML file, under this script's names."""
    with open(path, encoding="utf-8") as f:
        mapping = yaml.safe_load(f) or {}
    missing = [key for key in MODEL_KEYS.values() if key not in mapping]
    if missing:
        raise SystemExit(f"{path}: no {', '.join(missing)}")
    if mapping.get("max-position-embeddings", mapping["seq-length"]) != mapping["seq-length"]:
        raise SystemExit(f"{path}: max-position-embeddings must equal seq-length")
    return {name: int(mapping[key]) for name, key in MODEL_KEYS.items()}


PROFILES = {name: {**model_sizes(profile_config(name)), **schedule}
            for name, schedule in SCHEDULES.items()}


# ----------------------------------------------------------------------------------------------
# Flags
# ----------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="tiny model, a few steps (the test)")
    size.add_argument("--gpu", action="store_true",
                      help="one node of CUDA GPUs: nproc = GPUs, bf16, Transformer Engine when "
                           "installed, a larger model and more tokens")
    p.add_argument("--output", type=Path, default=common.RESULTS,
                   help="folder for scaling_wall.json and the PNGs (default: %(default)s)")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="run folders and result files; reused, so a rerun skips finished runs "
                        "(default: runs/scaling_wall_<profile>)")
    p.add_argument("--overwrite", action="store_true", help="delete an existing --work-dir first")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep every checkpoint (default: only (a)'s Top-k ones, the bases of (b))")
    p.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    p.add_argument("--nproc", type=int, default=None,
                   help="processes per run = expert parallel size (default: 1 on CPU, all GPUs "
                        "with --gpu)")
    p.add_argument("--jobs", type=int, default=None,
                   help="runs at a time (default: 2 on CPU, 1 with --gpu)")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="seeds to run (default: 1 2 3; 1 2 with --quick)")
    p.add_argument("--modes", nargs="+", default=None,
                   help="modes to run (default: all; three with --quick); see --list-modes")
    p.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=sorted(SETTINGS),
                   help="settings to run (default: both); (b) also runs (a)'s Top-k of its seed")
    p.add_argument("--list-modes", action="store_true", help="print the modes and exit")
    g = p.add_argument_group("sizes (defaults per profile: quick / CPU / --gpu)")
    for name, help_ in (
        ("topk", "k, the number of experts a token trains with; budgets are k' = 1 ... 3k"),
        ("num_experts", "experts per MoE layer (>= 3k, divisible by --nproc)"),
        ("seq_length", "tokens per sequence"),
        ("micro_batch_size", "sequences per micro-batch and process"),
        ("global_batch_size", "sequences per step"),
        ("pretrain_iters", "N_a: steps of every run in (a)"),
        ("finetune_iters", "N_b: steps of every run in (b)"),
    ):
        defaults = " / ".join(str(PROFILES[k][name]) for k in ("quick", "cpu", "gpu"))
        g.add_argument("--" + name.replace("_", "-"), type=int, default=None,
                       help=f"{help_} ({defaults})")
    for name, help_ in (("pretrain_lr", "peak learning rate of (a), cosine to a tenth"),
                        ("finetune_lr", "peak learning rate of (b), cosine to a tenth")):
        defaults = " / ".join(str(PROFILES[k][name]) for k in ("quick", "cpu", "gpu"))
        g.add_argument("--" + name.replace("_", "-"), type=float, default=None,
                       help=f"{help_} ({defaults})")
    g.add_argument("--pretrain-eval-iters", type=int, default=None,
                   help="validation batches of (a) (default: the whole validation split; 2 with "
                        "--quick)")
    g.add_argument("--finetune-eval-iters", type=int, default=None,
                   help="validation batches of (b) (default: the whole evaluation split; 2 with "
                        "--quick)")
    g.add_argument("--emoe-hr-loss-coeff", type=float, default=HR_LOSS_COEFF,
                   help="λ of L_HR in the EMoE modes (default: %(default)s)")
    d = p.add_argument_group("data (default: the embedded default data, built once and cached)")
    d.add_argument("--data-dir", type=Path, default=None,
                   help="folder of the embedded default data (default: data/default or "
                        "$MEGATRON_EMOE_DATA); built there if missing")
    for name, what in (("pretrain_train", "pretraining data of (a)"),
                       ("pretrain_valid", "validation data of (a)"),
                       ("sft_train", "instruction data of (b) (emoe-preprocess-data --sft)"),
                       ("sft_valid", "evaluation instruction data of (b)")):
        d.add_argument("--" + name.replace("_", "-") + "-data", dest=name, default=None,
                       help=f"prefix of the {what}")
    d.add_argument("--tokenizer-model", default=None, help="tokenizer of those datasets")
    d.add_argument("--sft-eval-tokens", type=int, default=SFT_EVAL_TOKENS,
                   help="response tokens (b)'s evaluation split holds at least, when made from "
                        "the embedded data (default: %(default)s)")
    args = p.parse_args(argv)
    args.extra = extra
    try:
        finish_args(args)
    except ValueError as error:
        p.error(str(error))
    return args


def finish_args(args: argparse.Namespace) -> None:
    """Fill per-profile defaults and reject bad values (ValueError naming the flag)."""
    import torch

    args.profile = "quick" if args.quick else ("gpu" if args.gpu else "cpu")
    args.config = profile_config(args.profile)
    profile = PROFILES[args.profile]
    for name, value in profile.items():
        if name != "modes" and getattr(args, name, None) is None:
            setattr(args, name, value)
    cuda = torch.cuda.device_count()
    if args.gpu and not cuda and not args.dry_run and not args.list_modes:
        raise ValueError("--gpu needs CUDA GPUs (none found); --gpu --dry-run prints the commands")
    if args.nproc is None:
        args.nproc = (cuda or 8) if args.gpu else 1
    for flag in ("nproc", "jobs", "pretrain_iters", "finetune_iters", "seq_length",
                 "micro_batch_size", "global_batch_size", "sft_eval_tokens"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1; got {getattr(args, flag)}")
    if args.gpu and cuda and args.nproc * args.jobs > cuda:
        raise ValueError(f"--nproc {args.nproc} x --jobs {args.jobs} is more than the {cuda} GPUs")
    k = args.topk
    if k < 1:
        raise ValueError(f"--topk must be >= 1; got {k}")
    if args.num_experts < 3 * k:
        raise ValueError(f"--num-experts {args.num_experts} must be >= 3k = {3 * k} "
                         f"(budgets k' = 1 ... 3k with --topk {k})")
    if args.num_experts % args.nproc:
        raise ValueError(f"--num-experts {args.num_experts} must be divisible by --nproc "
                         f"{args.nproc} (expert parallel size)")
    if not (args.emoe_hr_loss_coeff >= 0 and math.isfinite(args.emoe_hr_loss_coeff)):
        raise ValueError(f"--emoe-hr-loss-coeff must be a finite number >= 0; "
                         f"got {args.emoe_hr_loss_coeff}")
    for flag in ("pretrain_lr", "finetune_lr"):
        value = getattr(args, flag)
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"--{flag.replace('_', '-')} must be a finite number > 0; got {value}")
    for flag in ("pretrain_eval_iters", "finetune_eval_iters"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1; got {getattr(args, flag)}")
    if args.global_batch_size % (args.micro_batch_size * args.nproc):
        raise ValueError(f"--global-batch-size {args.global_batch_size} must be divisible by "
                         f"--micro-batch-size x --nproc = {args.micro_batch_size * args.nproc}")
    if len(set(args.seeds)) != len(args.seeds):
        raise ValueError(f"--seeds repeats a seed: {args.seeds}")
    for token in args.extra:
        if token.split("=")[0] in OWNED_FLAGS:
            raise ValueError(f"{token.split('=')[0]} after `--`: this script sets it for every run "
                             "(see its own flags, --help)")
    args.all_modes = build_modes(k, args.pretrain_iters, args.emoe_hr_loss_coeff)
    args.grid_modes = profile["modes"] or list(args.all_modes)
    if args.modes is None:
        args.modes = args.grid_modes
    unknown = [m for m in args.modes if m not in args.all_modes]
    if unknown:
        raise ValueError(f"--modes: no mode {', '.join(unknown)}; the modes are "
                         f"{', '.join(args.all_modes)}")
    if "topk" not in args.grid_modes:
        raise ValueError("the grid needs the topk mode: it is the reference and (b)'s base")
    args.budgets = list(range(1, 3 * k + 1))
    args.work_dir = (args.work_dir or REPO / "runs" / f"{NAME}_{args.profile}").resolve()
    args.output = args.output.resolve()
    if args.work_dir in (REPO, *REPO.parents) or args.work_dir == Path.home():
        raise ValueError(f"--work-dir {args.work_dir} would hold the repository: choose a subfolder")


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------
def resolve_data(args) -> dict[str, str]:
    """Dataset prefixes and tokenizer: the embedded default data (with (b)'s evaluation split
    made larger) unless given."""
    given = {key: getattr(args, key) for key in ("pretrain_train", "pretrain_valid", "sft_train",
                                                  "sft_valid", "tokenizer_model")}
    data = {}
    if not all(given.values()):
        from megatron_emoe.data.default_data import ensure_default_data

        data = ensure_default_data(args.data_dir, progress=True)
        if not (given["sft_train"] and given["sft_valid"]):
            split = build_sft_split(data, args.work_dir / "sft_data", args.sft_eval_tokens)
            data.update({name: split[name]["prefix"] for name in ("sft_train", "sft_valid")})
            args.sft_split = split
    data = {key: str(Path(value).resolve()) if value else data[key] for key, value in given.items()}
    for key in ("pretrain_train", "pretrain_valid", "sft_train", "sft_valid"):
        suffixes = ["", "_lossmask"] if key.startswith("sft") else [""]
        for suffix in suffixes:
            for ext in (".bin", ".idx"):
                if not Path(data[key] + suffix + ext).is_file():
                    raise SystemExit(f"--{key.replace('_', '-')}-data: {data[key] + suffix + ext} "
                                     "is missing")
    if not Path(data["tokenizer_model"]).exists():
        raise SystemExit(f"--tokenizer-model: {data['tokenizer_model']} is missing")
    return data


def split_tokens(prefix: str) -> int:
    """Tokens in an indexed dataset (the sum of its document lengths)."""
    return int(sequence_lengths(prefix).sum())


def eval_iters(args, data) -> None:
    """--pretrain-eval-iters / --finetune-eval-iters: given, or 2 with --quick, or the whole split
    (as many global batches as one pass holds: GPTDataset cuts (tokens - 1) // seq_length
    sequences, each taking one extra token for its labels), at least one batch."""
    for flag, key in (("pretrain_eval_iters", "pretrain_valid"), ("finetune_eval_iters", "sft_valid")):
        whole = (split_tokens(data[key]) - 1) // args.seq_length // args.global_batch_size
        chosen = getattr(args, flag)
        if chosen is None:
            chosen = max(1, min(args.eval_iters, whole) if args.eval_iters else whole)
        if chosen > whole:
            print(f"note: --{flag.replace('_', '-')} {chosen} is more than the {whole} global batches "
                  f"of one pass over {data[key]}: Megatron repeats the split (reshuffled)", flush=True)
        setattr(args, flag, chosen)


def data_passes(args, data) -> dict:
    """How many times each setting's training runs read their training split."""
    passes = {}
    for setting, key, iters in (("a", "pretrain_train", args.pretrain_iters),
                                ("b", "sft_train", args.finetune_iters)):
        tokens = iters * args.global_batch_size * args.seq_length
        passes[setting] = round(tokens / split_tokens(data[key]), 4)
    return passes


# ----------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------
def transformer_engine_available() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def size_overrides(args) -> list[str]:
    """The model sizes given on this script's command line that differ from the profile's YAML."""
    defaults = PROFILES[args.profile]
    flags = []
    for name, key in MODEL_KEYS.items():
        value = getattr(args, name)
        if value != defaults[name]:
            flags += ["--" + key, str(value)]
            if name == "seq_length":
                flags += ["--max-position-embeddings", str(value)]
    return flags


def model_flags(args, data, seed: int) -> list[str]:
    """Model (the profile's YAML, the size flags given here on top), batch, seed and device flags
    shared by every run of a seed."""
    flags = [
        "--config", str(args.config), *size_overrides(args),
        "--expert-model-parallel-size", str(args.nproc),
        "--micro-batch-size", str(args.micro_batch_size),
        "--global-batch-size", str(args.global_batch_size),
        "--weight-decay", "0.1", "--clip-grad", "1.0", "--lr-decay-style", "cosine",
        "--seed", str(seed),
        "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", data["tokenizer_model"],
        "--ckpt-format", "torch_dist", "--log-interval", str(args.log_interval),
    ]
    if args.gpu:
        flags += ["--bf16", "--use-distributed-optimizer"]
        if transformer_engine_available():
            flags += ["--transformer-impl", "transformer_engine", "--moe-grouped-gemm"]
        else:
            flags += ["--transformer-impl", "local"]
    return flags


def schedule_flags(iterations: int, lr: float) -> list[str]:
    """Steps, cosine learning rate (warm-up a tenth of the steps, down to lr / 10); one evaluation
    and one checkpoint, at the end."""
    return ["--train-iters", str(iterations), "--lr", f"{lr:g}", "--min-lr", f"{lr / 10:g}",
            "--lr-warmup-iters", str(max(1, iterations // 10)),
            "--eval-interval", str(iterations + 1), "--save-interval", str(iterations)]


def data_flags(data, kind: str) -> list[str]:
    flags = ["--train-data-path", data[f"{kind}_train"], "--valid-data-path", data[f"{kind}_valid"]]
    return flags + (["--sft-packed"] if kind == "sft" else [])


def mode_flags(args, mode: str, seed: int) -> list[str]:
    """A mode's flags for one seed: M-MoE's budget draws follow the seed too."""
    flags = list(args.all_modes[mode].flags)
    if args.all_modes[mode].group == "mmoe":
        flags += ["--mmoe-seed", str(seed)]
    return flags


def plan(args, data, modes: list[str], seeds: list[int], settings: list[str]) -> list[Run]:
    """The runs of `modes` x `seeds` x `settings`, in order: per seed, (a)'s Top-k first (it is
    (b)'s base), then (a), then (b)'s base evaluation and (b)."""
    budgets = ["--elastic-eval-budgets", *map(str, args.budgets)]
    runs: list[Run] = []
    for seed in seeds:
        shared = model_flags(args, data, seed)
        base = args.work_dir / "a" / "topk" / f"seed{seed}"

        def add(setting: str, mode: str, kind: str, flags: list[str], after=()) -> None:
            iterations = 0 if kind == "eval" else (
                args.pretrain_iters if setting == "a" else args.finetune_iters)
            run = Run(setting, mode, seed, args.work_dir / setting / mode / f"seed{seed}", kind,
                      iterations, after=tuple(after),
                      keep_checkpoints=args.keep_checkpoints or (setting, mode) == ("a", "topk"))
            # each run its own index cache: runs in parallel would write the same files
            run.flags = [*flags, *budgets, "--elastic-eval-output", str(run.eval_json),
                         "--data-cache-path", str(run.dir / "data_cache"), *args.extra]
            if kind == "train":
                run.flags += ["--save", str(run.checkpoints),
                              "--tensorboard-dir", str(run.dir / "tensorboard"),
                              "--coactivation-dir", str(run.coactivation)]
            run.command = launch.training_command(run.flags, args.nproc)
            runs.append(run)

        pretrain = [*shared, *data_flags(data, "pretrain"),
                    *schedule_flags(args.pretrain_iters, args.pretrain_lr),
                    "--eval-iters", str(args.pretrain_eval_iters)]
        finetune = [*shared, *data_flags(data, "sft"),
                    *schedule_flags(args.finetune_iters, args.finetune_lr),
                    "--eval-iters", str(args.finetune_eval_iters)]
        setting_a = [m for m in modes if "a" in args.all_modes[m].settings]
        if "b" in settings and "topk" not in setting_a:
            setting_a = ["topk", *setting_a]
        if "a" not in settings:
            setting_a = ["topk"]
        for mode in sorted(setting_a, key=lambda m: m != "topk"):
            add("a", mode, "train", [*pretrain, *mode_flags(args, mode, seed)])
        if "b" in settings:
            after = [f"a/topk/seed{seed}"]
            # evaluation only: load the base as a resume (--load = --save: nothing is written)
            add("b", BASE, "eval", [*finetune, *args.all_modes["topk"].flags, "--skip-train",
                                    "--load", str(base / "checkpoints"),
                                    "--save", str(base / "checkpoints")], after)
            for mode in [m for m in modes if "b" in args.all_modes[m].settings]:
                add("b", mode, "train", [*finetune, *mode_flags(args, mode, seed), "--finetune",
                                         "--load", str(base / "checkpoints")], after)
    return runs


# ----------------------------------------------------------------------------------------------
# Summary
# ----------------------------------------------------------------------------------------------
def per_seed_losses(results: dict, setting: str, mode: str) -> dict[int, dict[int, float]]:
    """seed -> k' -> validation loss of the finished runs of (setting, mode)."""
    return {r["seed"]: {int(b): v for b, v in r["val_loss"].items()} for r in results.values()
            if r["setting"] == setting and r["mode"] == mode}


def mode_table(args, results: dict) -> dict:
    """Per setting and mode: labels, per-seed losses and their statistics against Top-k."""
    out = {}
    for setting, description in SETTINGS.items():
        reference = per_seed_losses(results, setting, "topk")
        rows = {}
        names = ([BASE] if setting == "b" else []) + [
            m for m in args.grid_modes if setting in args.all_modes[m].settings]
        for name in names:
            losses = per_seed_losses(results, setting, name)
            if not losses:
                continue
            mode = args.all_modes.get(name)
            k = mode.train_k if mode else args.topk
            rows[name] = {
                "label": mode.label if mode else "base, not fine-tuned",
                "group": mode.group if mode else BASE, "train_k": k,
                "flags": list(mode.flags) if mode else [], "note": mode.note if mode else "",
                "per_seed": {str(s): {str(b): v for b, v in seed_losses.items()}
                             for s, seed_losses in sorted(losses.items())},
                **stats.summarize(losses, k, reference or None),
            }
        out[setting] = {"description": description, "modes": rows}
    return out


def mmoe_vs_specialists(args, results: dict) -> dict:
    """Per setting and M-MoE variant: k' -> M-MoE loss - the loss of the specialist trained at k'
    (Top-k itself at k), paired over seeds."""
    out = {}
    for setting in SETTINGS:
        specialists = {mode.train_k: name for name, mode in args.all_modes.items()
                       if mode.group in ("topk", "specialist")}
        rows = {}
        for name, mode in args.all_modes.items():
            losses = per_seed_losses(results, setting, name)
            if mode.group != "mmoe" or not losses:
                continue
            gaps = {}
            for budget, specialist in sorted(specialists.items()):
                reference = per_seed_losses(results, setting, specialist)
                if stats.common_seeds(losses, reference):
                    gaps[str(budget)] = stats.paired(losses, reference, [budget])[budget]
            rows[name] = gaps
        out[setting] = rows
    return out


def expected_k(mode, k: int) -> float:
    """The mean experts per token a mode trains with (M-MoE: under its budget distribution,
    read from its flags by the project's own flag parser)."""
    if mode.group != "mmoe":
        return float(mode.train_k)
    parsed, _ = add_elastic_moe_args(argparse.ArgumentParser()).parse_known_args(mode.flags)
    config = elastic_config_from_args(parsed)
    budgets = config.mmoe_budgets(k)
    weights = config.mmoe_weights(k) or [1.0] * len(budgets)
    return sum(b * w for b, w in zip(budgets, weights)) / sum(weights)


def training_compute(args, results: dict, table: dict) -> dict:
    """Per setting: the specialists' suite (Top-k and every specialist, one model per k') against
    each M-MoE model, by FLOPs per token (analytic, `stats.training_flops_per_token`) and by
    measured training time (mean over seeds)."""
    vocab = _vocab_size(args)
    sizes = {name: getattr(args, name) for name in MODEL_KEYS}
    out = {}
    for setting, block in table.items():
        modes = block["modes"]
        suite = [n for n, row in modes.items() if row["group"] in ("topk", "specialist")]
        time_of = {n: statistics.fmean([r["train_time_s"] for r in results.values()
                                       if r["setting"] == setting and r["mode"] == n])
                   for n in modes}
        flops_of = {n: stats.training_flops_per_token(sizes, expected_k(args.all_modes[n], args.topk),
                                                       vocab)
                    for n in modes if n in args.all_modes}
        suite_flops = sum(flops_of[n] for n in suite)
        suite_time = sum(time_of[n] for n in suite)
        elastic = {}
        for name, row in modes.items():
            if row["group"] != "mmoe":
                continue
            elastic[name] = {
                "expected_k": expected_k(args.all_modes[name], args.topk),
                "flops_per_token": flops_of[name], "train_time_s": time_of[name],
                "suite_over_model_flops": suite_flops / flops_of[name],
                "suite_over_model_time": suite_time / time_of[name] if time_of[name] else None,
            }
        out[setting] = {"suite": suite, "suite_flops_per_token": suite_flops,
                        "suite_train_time_s": suite_time, "elastic_models": elastic,
                        "vocab_size": vocab}
    return out


def _vocab_size(args) -> int:
    from megatron_emoe.data.tokenizer import load_tokenizer

    return len(load_tokenizer(args.data["tokenizer_model"]))


def remedies(args, table: dict) -> dict:
    """(a): EMoE and each remedy against Top-k at k. Seed noise is Top-k's standard deviation over
    seeds at k; a remedy works when its mean paired difference to Top-k at k is at most that
    (within seed noise) and it stays elastic to 2k (effective range >= 2k). The 95% interval
    of the difference is reported too, and whether it lies above 0 (significantly worse)."""
    k = args.topk
    modes = table["a"]["modes"]
    if "topk" not in modes:
        return {}
    noise = modes["topk"]["at_k"]["sd"]
    out = {}
    for name in ["emoe", *remedy_modes(args.all_modes, k)]:
        if name not in modes or "minus_topk" not in modes[name]:
            continue
        at_k = modes[name]["minus_topk"][str(k)]
        within = noise is not None and at_k["mean"] <= noise
        reach = modes[name]["effective_range"]
        out[name] = {"label": modes[name]["label"], "loss_at_k_minus_topk": at_k,
                     "seed_noise": noise, "within_noise_at_k": within,
                     "significantly_worse_at_k": at_k["low"] is not None and at_k["low"] > 0,
                     "effective_range": reach, "elastic_to_2k": reach >= 2 * k,
                     "works": within and reach >= 2 * k, "baseline": name == "emoe"}
    return out


def coactivation_points(args, results: dict, table: dict) -> dict:
    """Per setting and mode, k' -> mean over seeds of the train-vs-eval co-activation distance and
    of loss(k') - loss(k) (k' = 1 has no co-activated pairs: left out)."""
    out = {}
    for setting, block in table.items():
        rows = {}
        for name, row in block["modes"].items():
            runs = [r for r in results.values() if r["setting"] == setting and r["mode"] == name
                    and r.get("coactivation_distance")]
            if not runs:
                continue
            k = row["train_k"]
            points = {}
            for budget in args.budgets:
                distances = [r["coactivation_distance"].get(str(budget)) for r in runs]
                if any(d is None for d in distances):
                    continue
                changes = [r["val_loss"][str(budget)] - r["val_loss"][str(k)] for r in runs]
                points[str(budget)] = {"distance": statistics.fmean(distances),
                                       "loss_change": statistics.fmean(changes), "seeds": len(runs)}
            rows[name] = points
        out[setting] = rows
    return out


def missing_runs(args, results: dict) -> list[str]:
    """The profile's grid runs without a result."""
    wanted = [f"a/{m}/seed{s}" for s in args.all_seeds for m in args.grid_modes
              if "a" in args.all_modes[m].settings]
    wanted += [f"b/{m}/seed{s}" for s in args.all_seeds for m in [BASE, *args.grid_modes]
               if m == BASE or "b" in args.all_modes[m].settings]
    return [name for name in wanted if name not in results]


DEFINITIONS = {
    "val_loss": "validation loss in nats per token at k' active experts per token, from the saved "
                "checkpoint: every token in (a), response tokens only in (b); the same batches "
                "for every budget and mode of a seed",
    "per_budget": "k' -> mean and sample standard deviation over seeds",
    "minus_topk": "k' -> loss - Top-k's loss at the same k' and seed: mean, sd and the 95% t "
                  "interval (low, high) over seeds",
    "best_k": "the k' of the lowest mean loss (smallest on ties)",
    "effective_range": "the largest k' >= the mode's training k such that for every j from k to "
                       "k', the 95% interval over seeds of loss(j) - loss(k) reaches 0 or below "
                       "(no significant rise)",
    "mmoe_vs_specialists": "k' -> M-MoE loss - the loss of the Top-k model trained at k', paired "
                           "over seeds, 95% interval",
    "training_compute": "FLOPs per training token (matmuls, 3 x forward) of each model, the suite "
                        "being one specialist per k'; training time = mean logged step time x "
                        "steps, mean over seeds",
    "remedies": "(a): seed noise = Top-k's standard deviation over seeds at k; within noise = the "
                "mean paired difference to Top-k at k is at most that; works = within noise and "
                "effective range >= 2k; significantly worse = the 95% interval lies above 0",
    "coactivation": "k' -> mean over seeds of the Frobenius distance between the normalised "
                    "training and evaluation co-activation matrices (mean over layers) and of "
                    "loss(k') - loss(k)",
}


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list_modes:
        for name, mode in args.all_modes.items():
            print(f"{name:22} {GROUPS[mode.group]:50} settings {mode.settings}  "
                  f"{' '.join(mode.flags)}")
        return 0
    start = time.time()
    if args.overwrite and args.work_dir.exists() and not args.dry_run:
        shutil.rmtree(args.work_dir)
    args.sft_split = None
    print(f"[data] {'given prefixes' if args.sft_valid else 'embedded default data'}", flush=True)
    args.data = data = resolve_data(args)
    eval_iters(args, data)
    args.data_passes = data_passes(args, data)
    args.all_seeds = sorted(set(PROFILES[args.profile]["seeds"]) | set(args.seeds))
    runs = plan(args, data, args.modes, args.seeds, args.settings)
    try:
        for run in runs:
            run.finished()
    except StaleResult as error:  # bad input: before anything runs
        print(f"scaling_wall: error: {error}", file=sys.stderr)
        return 2
    if args.dry_run:
        for run in runs:
            print(f"# {run.name} ({run.kind})\n{' '.join(run.command)}\n")
        return 0
    print(f"{args.profile} profile: k = {args.topk} of {args.num_experts} experts, (a) "
          f"{args.pretrain_iters} steps, (b) {args.finetune_iters} steps, {args.global_batch_size} "
          f"x {args.seq_length} tokens per step, {args.nproc} process(es) per run; passes over "
          f"the training data: {args.data_passes}", flush=True)
    run_pool(runs, args.jobs, args.seq_length)

    # The summary covers every finished run of the profile's grid (earlier parts included).
    everything = plan(args, data, args.grid_modes, args.all_seeds, sorted(SETTINGS))
    results = {run.name: stored for run in everything if (stored := run.finished()) is not None}
    table = mode_table(args, results)
    summary = {
        "benchmark": NAME, "schema": 2, "machine": common.machine(),
        "settings": settings_record(args, data), "definitions": DEFINITIONS,
        "results": table,
        "mmoe_vs_specialists": mmoe_vs_specialists(args, results),
        "training_compute": training_compute(args, results, table),
        "remedies": remedies(args, table),
        "coactivation": (points := coactivation_points(args, results, table)),
        "coactivation_correlation": {
            setting: stats.rank_correlation(
                [p["distance"] for row in rows.values() for p in row.values()],
                [p["loss_change"] for row in rows.values() for p in row.values()])
            for setting, rows in points.items()},
        "missing_runs": missing_runs(args, results),
        "runs": [{key: r[key] for key in ("setting", "mode", "seed", "wall_s", "train_time_s",
                                          "tokens_trained", "eval_tokens", "command")}
                 for r in results.values()],
        "total_wall_s_this_call": round(time.time() - start, 1),
    }
    tables = report.markdown(summary)
    print("\n" + tables)
    if summary["missing_runs"]:
        print(f"\n{len(summary['missing_runs'])} runs of the grid are not done yet: "
              + ", ".join(summary["missing_runs"][:8])
              + (" ..." if len(summary["missing_runs"]) > 8 else ""))
    args.output.mkdir(parents=True, exist_ok=True)
    path = args.output / f"{NAME}.json"
    write_text_atomically(str(path), json.dumps(summary, indent=1) + "\n")
    print(f"wrote {path}")
    write_text_atomically(str(args.output / f"{NAME}.md"), tables + "\n")
    print(f"wrote {args.output / f'{NAME}.md'}")
    for name, draw in plots.FIGURES.items():
        write_bytes_atomically(str(args.output / name), draw(summary))
        print(f"wrote {args.output / name}")
    print(f"total {summary['total_wall_s_this_call'] / 60:.1f} min", flush=True)
    return 0


def settings_record(args, data) -> dict:
    return {
        "profile": args.profile, "quick": args.quick, "gpu": args.gpu, "nproc": args.nproc,
        "jobs": args.jobs, "expert_parallel_size": args.nproc, "seeds": args.all_seeds,
        "topk": args.topk, "budgets": args.budgets, "model_config": str(args.config),
        "model": {name: getattr(args, name) for name in MODEL_KEYS if name != "topk"},
        "micro_batch_size": args.micro_batch_size, "global_batch_size": args.global_batch_size,
        "pretrain_iters": args.pretrain_iters, "finetune_iters": args.finetune_iters,
        "pretrain_lr": args.pretrain_lr, "finetune_lr": args.finetune_lr,
        "data_passes": args.data_passes, "pretrain_eval_iters": args.pretrain_eval_iters,
        "finetune_eval_iters": args.finetune_eval_iters,
        "eval_tokens": {"a": args.pretrain_eval_iters * args.global_batch_size * args.seq_length,
                        "b": args.finetune_eval_iters * args.global_batch_size * args.seq_length},
        "sft_split": args.sft_split, "modes": args.grid_modes,
        "mode_flags": {name: list(args.all_modes[name].flags) for name in args.grid_modes},
        "extra_flags": args.extra, "data": data, "work_dir": str(args.work_dir),
    }


if __name__ == "__main__":
    sys.exit(main())
