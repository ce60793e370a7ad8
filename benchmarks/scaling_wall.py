"""The inference-time scaling wall, reproduced: Top-k, EMoE and M-MoE evaluated at k' = 1 ... 3k.

Two settings, each from one initialisation and with the same data, data order and number of tokens
for every mode (same `--seed`, iterations and batch size):

- (a) pretraining from scratch: Top-k, EMoE and M-MoE each train a GPT-MoE from the same random
  initialisation on the embedded default pretraining data;
- (b) the papers' setting: the Top-k model of (a) is the pretrained base; Top-k, EMoE and M-MoE each
  continue it (`--finetune --load BASE`: weights only, fresh optimizer, iteration 0) on the packed
  instruction data (`--sft-packed`, loss on response tokens only) for the same number of tokens.
  The base itself is also evaluated on that data ("base, not fine-tuned").

Every run is the project's training entry (Megatron's own training loop) under torchrun, launched
and followed by the project's launch recipe (`megatron_emoe.runtime.launch`), as the demo is (gloo
processes with expert parallelism over all of them and the alltoall dispatcher on CPU). After training, the entry reloads
the saved checkpoint and measures validation loss at k' = 1 ... 3k (`--elastic-eval-budgets`) on
the same validation batches for every budget and mode (by default the whole validation split,
as many global batches as it holds), so budget-to-budget and mode-to-mode differences are paired.

Before training, one evaluation-only run per mode (`--skip-train`, no checkpoint) checks that the
three modes start from identical weights: Megatron's validation loss at iteration 0 must be the
same number for all of them (eval-mode routing is top-k in every mode). In (b) every mode loads
the same base checkpoint.

Modes: `topk`; `emoe` with k_ideal = 2k (`--emoe-k-ideal`) and L_HR (`--emoe-hr-loss-coeff`,
5e-4); `mmoe` with k drawn from 1 ... 2k per layer and micro-batch (`--mmoe-k-min/-max/-sample-level`).
Learning rates: cosine from the peak (`--pretrain-lr`, `--finetune-lr`) to a tenth, warm-up a
tenth of the steps; weight decay 0.1, gradient clipping 1.0, aux loss 0.01, no dropout.

Profiles (the flags override them). Each profile's model is a YAML file of Megatron flags,
examples/configs/scaling_wall_{quick,cpu,gpu}.yaml, which every run gets as `--config` (this script
reads its sizes from there, and its --topk, --num-experts and --seq-length flags override them);
the batch, schedule and learning rates are this script's:

- CPU (default): 4 layers, hidden 128, 16 experts of width 128 per layer, k = 2 (k' = 1 ... 6),
  16 x 256 tokens per step, 2 gloo processes (EP 2); (a) 600 steps (2.46M tokens, lr 3e-3),
  (b) 120 steps (0.49M tokens, lr 1e-3). Evaluation: (a) the whole pretraining validation split
  (18 batches, 73,728 tokens), (b) the whole instruction validation split (2 batches, 8,192
  tokens). About 1.0 s per step on 2 idle cores, so about 42 min in all: 36 min of steps and
  6 min of process start-up, checkpoint saves and evaluations (10 torchrun jobs).
- `--quick`: 2 layers, hidden 64, 8 experts, k = 2, 8 x 64 tokens per step, 4 + 3 steps, 2
  validation batches: the whole pipeline in a few minutes (start-up bound), for the test.
- `--gpu`: one node, nproc = the GPUs (EP over all of them), bf16, distributed optimizer,
  Transformer Engine with grouped GEMM when installed (else the local implementation); 8 layers,
  hidden 512, 64 experts of width 256, k = 4 (k' = 1 ... 12), 64 x 1024 tokens per step,
  (a) 2000 steps (131M tokens, lr 1e-3), (b) 200 steps (13M tokens, lr 3e-4). The embedded data
  holds 2.2M pretraining tokens: give a real corpus with `--pretrain-train-data` and the other
  data flags (made with emoe-preprocess-data, `--sft` for the instruction data).

    python -m benchmarks.scaling_wall                  # CPU default
    python -m benchmarks.scaling_wall --quick          # the test's smoke run
    python -m benchmarks.scaling_wall --gpu            # one GPU node
    python -m benchmarks.scaling_wall --dry-run        # print the commands, run nothing
    python -m benchmarks.scaling_wall [...] -- --num-layers 2   # more Megatron flags, every run

Writes `<output>/scaling_wall.json` (machine, settings, every command with its wall time, per
setting -> mode -> budget validation loss, tokens trained, seed, and findings computed from the
numbers) and `<output>/scaling_wall.png` (validation loss against k', one panel per setting).
Runs live in `--work-dir` (logs, TensorBoard, each run's elastic_eval.json); checkpoints are
deleted once evaluated (the base after (b)) unless `--keep-checkpoints`.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import math
import re
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from benchmarks import common  # noqa: E402

from megatron_emoe.config import MMOE_SAMPLE_LEVELS  # noqa: E402
from megatron_emoe.files import write_bytes_atomically, write_text_atomically  # noqa: E402
from megatron_emoe.runtime import launch  # noqa: E402

NAME = "scaling_wall"
REPO = common.REPO
MODES = ("topk", "emoe", "mmoe")
SETTINGS = {
    "a": "pretraining from scratch",
    "b": "fine-tuning the Top-k checkpoint of (a) on instruction data",
}


CONSUMED = re.compile(r"iteration\s+(\d+)/\s*\d+ \| consumed samples:\s+(\d+)")

# Model per profile: a YAML file of Megatron flags (every layer MoE), given to every run as --config.
CONFIGS = REPO / "examples" / "configs"
# The model sizes this script reads from it (its attribute names -> the YAML's flag names).
MODEL_KEYS = {
    "num_layers": "num-layers", "hidden_size": "hidden-size", "ffn_hidden_size": "ffn-hidden-size",
    "num_attention_heads": "num-attention-heads", "num_experts": "num-experts",
    "moe_ffn_hidden_size": "moe-ffn-hidden-size", "topk": "moe-router-topk", "seq_length": "seq-length",
}
# Batch, optimisation and schedule per profile; EP = number of processes.
SCHEDULES = {
    "quick": dict(micro_batch_size=2, global_batch_size=8, pretrain_iters=4, finetune_iters=3,
                  pretrain_lr=3e-3, finetune_lr=1e-3, eval_iters=2, init_check_eval_iters=1,
                  log_interval=1),
    "cpu": dict(micro_batch_size=8, global_batch_size=16, pretrain_iters=600, finetune_iters=120,
                pretrain_lr=3e-3, finetune_lr=1e-3, eval_iters=None, init_check_eval_iters=2,
                log_interval=10),
    "gpu": dict(micro_batch_size=4, global_batch_size=64, pretrain_iters=2000, finetune_iters=200,
                pretrain_lr=1e-3, finetune_lr=3e-4, eval_iters=None, init_check_eval_iters=2,
                log_interval=20),
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


# Everything per profile: the model sizes (from its YAML file) and the schedule.
PROFILES = {name: {**model_sizes(profile_config(name)), **schedule}
            for name, schedule in SCHEDULES.items()}

# Flags this script sets itself (passing them after `--` would break the comparison).
OWNED_FLAGS = {
    "--seed", "--train-iters", "--train-samples", "--lr", "--min-lr", "--lr-warmup-iters",
    "--lr-decay-style", "--moe-router-topk", "--num-experts", "--seq-length",
    "--max-position-embeddings", "--global-batch-size", "--micro-batch-size", "--eval-iters",
    "--eval-interval", "--save", "--load", "--save-interval", "--finetune", "--skip-train",
    "--moe-router-mode", "--emoe-k-ideal", "--emoe-k-ideal-factor", "--emoe-hr-loss-coeff",
    "--mmoe-k-min", "--mmoe-k-max", "--mmoe-k-choices", "--mmoe-sample-level",
    "--expert-model-parallel-size", "--data-path", "--train-data-path", "--valid-data-path",
    "--test-data-path", "--tokenizer-model", "--sft-packed", "--elastic-eval-budgets",
    "--elastic-eval-output", "--tensorboard-dir", "--data-cache-path", "--config",
}


# ----------------------------------------------------------------------------------------------
# Flags
# ----------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="tiny model, a few steps (the test)")
    size.add_argument("--gpu", action="store_true",
                      help="one node of CUDA GPUs: nproc = GPUs, bf16, Transformer Engine when "
                           "installed, a larger model and more tokens")
    p.add_argument("--output", type=Path, default=common.RESULTS,
                   help="folder for scaling_wall.json and scaling_wall.png (default: %(default)s)")
    p.add_argument("--work-dir", type=Path, default=REPO / "runs" / "scaling_wall",
                   help="run folders (logs, TensorBoard, checkpoints) (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="delete an existing --work-dir first")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep every checkpoint (default: delete each once evaluated)")
    p.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    p.add_argument("--nproc", type=int, default=None,
                   help="processes = expert parallel size (default: 2 on CPU, all GPUs with --gpu)")
    p.add_argument("--seed", type=int, default=1234, help="one seed for every run (default: 1234)")
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
                   help="validation batches of (a) (default: the whole pretraining validation "
                        "split, as many global batches as it holds, at least 1; 2 with --quick)")
    g.add_argument("--finetune-eval-iters", type=int, default=None,
                   help="validation batches of (b) (default: the whole instruction validation "
                        "split, at least 1; 2 with --quick)")
    m = p.add_argument_group("modes")
    m.add_argument("--emoe-k-ideal", type=int, default=None, help="EMoE candidate pool (default 2k)")
    m.add_argument("--emoe-hr-loss-coeff", type=float, default=5e-4,
                   help="EMoE hierarchical router loss weight (default: %(default)s)")
    m.add_argument("--mmoe-k-min", type=int, default=1, help="M-MoE smallest k (default: 1)")
    m.add_argument("--mmoe-k-max", type=int, default=None, help="M-MoE largest k (default 2k)")
    m.add_argument("--mmoe-sample-level", choices=MMOE_SAMPLE_LEVELS, default="layer",
                   help="M-MoE: one k for the whole model, per layer or per token (default: layer)")
    d = p.add_argument_group("data (default: the embedded default data, built once and cached)")
    d.add_argument("--data-dir", type=Path, default=None,
                   help="folder of the embedded default data (default: data/default or "
                        "$MEGATRON_EMOE_DATA); built there if missing")
    for name, what in (("pretrain_train", "pretraining data of (a)"),
                       ("pretrain_valid", "validation data of (a)"),
                       ("sft_train", "instruction data of (b) (emoe-preprocess-data --sft)"),
                       ("sft_valid", "validation instruction data of (b)")):
        d.add_argument("--" + name.replace("_", "-") + "-data", dest=name, default=None,
                       help=f"prefix of the {what}")
    d.add_argument("--tokenizer-model", default=None, help="tokenizer of those datasets")
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
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    cuda = torch.cuda.device_count()
    if args.gpu and not cuda and not args.dry_run:
        raise ValueError("--gpu needs CUDA GPUs (none found); --gpu --dry-run prints the commands")
    if args.nproc is None:
        args.nproc = (cuda or 8) if args.gpu else 2
    if args.nproc < 1:
        raise ValueError(f"--nproc must be >= 1; got {args.nproc}")
    if args.gpu and cuda and args.nproc > cuda:
        raise ValueError(f"--nproc {args.nproc} is more than the {cuda} GPUs here")
    k = args.topk
    if k < 1:
        raise ValueError(f"--topk must be >= 1; got {k}")
    if args.num_experts < 3 * k:
        raise ValueError(f"--num-experts {args.num_experts} must be >= 3k = {3 * k} "
                         f"(budgets k' = 1 ... 3k with --topk {k})")
    if args.num_experts % args.nproc:
        raise ValueError(f"--num-experts {args.num_experts} must be divisible by --nproc "
                         f"{args.nproc} (expert parallel size)")
    args.emoe_k_ideal = 2 * k if args.emoe_k_ideal is None else args.emoe_k_ideal
    args.mmoe_k_max = 2 * k if args.mmoe_k_max is None else args.mmoe_k_max
    if not k <= args.emoe_k_ideal <= args.num_experts:
        raise ValueError(f"--emoe-k-ideal must be in [k, num experts] = [{k}, {args.num_experts}]; "
                         f"got {args.emoe_k_ideal}")
    if not (args.emoe_hr_loss_coeff >= 0 and math.isfinite(args.emoe_hr_loss_coeff)):
        raise ValueError(f"--emoe-hr-loss-coeff must be a finite number >= 0; got {args.emoe_hr_loss_coeff}")
    if not 1 <= args.mmoe_k_min <= args.num_experts:
        raise ValueError(f"--mmoe-k-min must be in [1, {args.num_experts}]; got {args.mmoe_k_min}")
    if not args.mmoe_k_min <= args.mmoe_k_max <= args.num_experts:
        raise ValueError(f"--mmoe-k-max must be in [--mmoe-k-min, num experts] = "
                         f"[{args.mmoe_k_min}, {args.num_experts}]; got {args.mmoe_k_max}")
    for flag in ("pretrain_iters", "finetune_iters", "seq_length", "micro_batch_size",
                 "global_batch_size"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1; got {getattr(args, flag)}")
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
    for token in args.extra:
        if token.split("=")[0] in OWNED_FLAGS:
            raise ValueError(f"{token.split('=')[0]} after `--`: this script sets it for every run "
                             "(see its own flags, --help)")
    args.budgets = list(range(1, 3 * k + 1))
    args.work_dir = args.work_dir.resolve()
    args.output = args.output.resolve()
    if args.work_dir in (REPO, *REPO.parents) or args.work_dir == Path.home():
        raise ValueError(f"--work-dir {args.work_dir} would hold the repository: choose a subfolder")
    if args.work_dir.exists() and not args.overwrite and not args.dry_run:
        raise ValueError(f"--work-dir {args.work_dir} exists: pass --overwrite to replace it, "
                         "or choose another --work-dir")


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------
def resolve_data(args) -> dict[str, str]:
    """Dataset prefixes and tokenizer: the embedded default data unless given."""
    given = {key: getattr(args, key) for key in ("pretrain_train", "pretrain_valid", "sft_train",
                                                  "sft_valid", "tokenizer_model")}
    data = {}
    if not all(given.values()):
        from megatron_emoe.data.default_data import ensure_default_data

        data = ensure_default_data(args.data_dir, progress=True)
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
    from megatron_emoe.data.indexed import sequence_lengths

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
@dataclass
class Run:
    setting: str            # "a", "b" or "init" (the identical-initialisation check)
    mode: str               # topk / emoe / mmoe / base
    kind: str               # "train", "eval" (--skip-train + elastic eval), "init_check"
    dir: Path
    flags: list[str]
    iterations: int = 0
    command: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.setting}/{self.mode}"

    @property
    def eval_json(self) -> Path:
        return self.dir / "elastic_eval.json"

    @property
    def checkpoints(self) -> Path:
        return self.dir / "checkpoints"

    @property
    def log(self) -> Path:
        return self.dir / "train.log"


def mode_flags(args) -> dict[str, list[str]]:
    return {
        "topk": ["--moe-router-mode", "topk"],
        "emoe": ["--moe-router-mode", "emoe", "--emoe-k-ideal", str(args.emoe_k_ideal),
                 "--emoe-hr-loss-coeff", str(args.emoe_hr_loss_coeff)],
        "mmoe": ["--moe-router-mode", "mmoe", "--mmoe-k-min", str(args.mmoe_k_min),
                 "--mmoe-k-max", str(args.mmoe_k_max), "--mmoe-sample-level", args.mmoe_sample_level],
    }


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


def model_flags(args, data) -> list[str]:
    """Model (the profile's YAML, the size flags given here on top), batch, seed and device flags
    shared by every run."""
    flags = [
        "--config", str(args.config), *size_overrides(args),
        "--expert-model-parallel-size", str(args.nproc),
        "--micro-batch-size", str(args.micro_batch_size),
        "--global-batch-size", str(args.global_batch_size),
        "--weight-decay", "0.1", "--clip-grad", "1.0", "--lr-decay-style", "cosine",
        "--seed", str(args.seed),
        "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", data["tokenizer_model"],
        "--ckpt-format", "torch_dist", "--log-interval", str(args.log_interval),
        "--data-cache-path", str(args.work_dir / "data_cache"),
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


def plan(args, data) -> list[Run]:
    """Every run, in order: init checks, (a) per mode, the base on (b)'s data, (b) per mode."""
    common_flags = model_flags(args, data)
    modes = mode_flags(args)
    budgets = ["--elastic-eval-budgets", *map(str, args.budgets)]
    work = args.work_dir
    runs = []
    for mode in MODES:
        runs.append(Run("init", mode, "init_check", work / "init_check" / mode, [
            *common_flags, *data_flags(data, "pretrain"), *modes[mode],
            *schedule_flags(args.pretrain_iters, args.pretrain_lr), "--skip-train",
            "--eval-iters", str(args.init_check_eval_iters)]))
    for mode in MODES:
        run = Run("a", mode, "train", work / "a" / mode, [], iterations=args.pretrain_iters)
        run.flags = [*common_flags, *data_flags(data, "pretrain"), *modes[mode],
                     *schedule_flags(args.pretrain_iters, args.pretrain_lr),
                     "--eval-iters", str(args.pretrain_eval_iters),
                     "--save", str(run.checkpoints), "--tensorboard-dir", str(run.dir / "tensorboard"),
                     *budgets, "--elastic-eval-output", str(run.eval_json)]
        runs.append(run)
    base = runs[len(MODES)].checkpoints  # a/topk
    finetune = [*common_flags, *data_flags(data, "sft"),
                *schedule_flags(args.finetune_iters, args.finetune_lr),
                "--eval-iters", str(args.finetune_eval_iters)]
    run = Run("b", "base", "eval", work / "b" / "base", [])
    # Evaluation only: load the base (as a resume: --load = --save, nothing is written there).
    run.flags = [*finetune, *modes["topk"], "--skip-train", "--load", str(base), "--save", str(base),
                 *budgets, "--elastic-eval-output", str(run.eval_json)]
    runs.append(run)
    for mode in MODES:
        run = Run("b", mode, "train", work / "b" / mode, [], iterations=args.finetune_iters)
        run.flags = [*finetune, *modes[mode], "--finetune", "--load", str(base),
                     "--save", str(run.checkpoints), "--tensorboard-dir", str(run.dir / "tensorboard"),
                     *budgets, "--elastic-eval-output", str(run.eval_json)]
        runs.append(run)
    for run in runs:
        run.flags += args.extra
        run.command = launch.training_command(run.flags, args.nproc)
    return runs


# ----------------------------------------------------------------------------------------------
# Running and reading runs
# ----------------------------------------------------------------------------------------------
def read_log(path: Path) -> dict:
    """Training losses per logged step, consumed samples, and Megatron's last validation loss."""
    text = path.read_text(errors="replace")
    losses = {int(m[1]): float(m[3]) for m in launch.ITERATION.finditer(text)}
    consumed = [(int(m[1]), int(m[2])) for m in CONSUMED.finditer(text)]
    validation = [float(m[2]) for m in launch.VALIDATION.finditer(text)]
    return {"train_loss": losses, "consumed_samples": consumed[-1][1] if consumed else 0,
            "validation_loss": validation[-1] if validation else None}


ERROR_LINE = re.compile(r"(^|\s)\w*(Error|Exception|error): ")


def error_lines(log: Path, keep: int = 3) -> list[str]:
    """The last distinct error messages of a failed run's log (the ranks' own, not torchrun's)."""
    found: list[str] = []
    for line in log.read_text(errors="replace").splitlines():
        line = line.strip()
        if ERROR_LINE.search(line) and "ChildFailedError" not in line and line not in found:
            found.append(line)
    return found[-keep:]


def execute(run: Run, index: int, total: int) -> dict:
    """Run one command with progress lines; stop the benchmark (log path printed) if it fails."""
    run.dir.mkdir(parents=True, exist_ok=True)
    what = {"init_check": "initial weights (evaluation only)", "eval": "evaluation only",
            "train": f"{run.iterations} steps"}[run.kind]
    print(f"[run {index}/{total}] {run.name}: {what}  (log: {run.log})", flush=True)
    start = time.time()
    code = launch.run_training_job(run.command, run.log, cwd=REPO,
                                   progress=lambda line: print(line, flush=True))
    wall = time.time() - start
    if code != 0:
        for line in error_lines(run.log):
            print("  " + line, flush=True)
        raise SystemExit(f"run {run.name} failed (exit {code}) after {wall:.0f} s; see {run.log}")
    if run.kind != "init_check" and not run.eval_json.is_file():
        raise SystemExit(f"run {run.name} wrote no {run.eval_json}; see {run.log}")
    record = {"setting": run.setting, "mode": run.mode, "kind": run.kind,
              "command": shlex.join(run.command), "log": str(run.log), "wall_s": round(wall, 1),
              **read_log(run.log)}
    if run.kind != "init_check":
        record["elastic_eval"] = json.loads(run.eval_json.read_text())
        losses = record["elastic_eval"]["val_loss"]
        print("  k'   " + "".join(f"{k:>8}" for k in losses), flush=True)
        print("  loss " + "".join(f"{v:8.4f}" for v in losses.values()), flush=True)
    print(f"  done in {wall:.0f} s", flush=True)
    return record


def drop_checkpoints(run: Run, keep: bool) -> None:
    if not keep and run.checkpoints.exists():
        shutil.rmtree(run.checkpoints)


def init_check(records: dict) -> dict:
    """Megatron's validation loss at iteration 0 per mode (eval-mode routing is top-k in all of
    them, so equal numbers mean equal initial weights and validation data)."""
    losses = {mode: records[("init", mode)]["validation_loss"] for mode in MODES}
    values = set(losses.values())
    return {"validation_loss_at_iteration_0": losses,
            "identical": len(values) == 1 and None not in values}


# ----------------------------------------------------------------------------------------------
# Results, findings, plot
# ----------------------------------------------------------------------------------------------
def results(args, records: dict) -> dict:
    """Per setting -> mode -> {val_loss per budget, tokens trained, seed, ...}."""
    out = {}
    for setting, description in SETTINGS.items():
        rows = {}
        for mode in (("base",) if setting == "b" else ()) + MODES:
            record = records[(setting, mode)]
            evaluation = record["elastic_eval"]
            samples = record["consumed_samples"]
            row = {
                "val_loss": {str(k): evaluation["val_loss"][str(k)] for k in args.budgets},
                "tokens_trained": samples * args.seq_length,
                "iterations": 0 if mode == "base" else evaluation["iteration"],
                "seed": args.seed,
                "router_mode": evaluation["router_mode"],
                "eval_tokens": evaluation["eval_tokens"],
                "megatron_validation_loss_at_k": record["validation_loss"],
                "wall_s": record["wall_s"],
            }
            if record["train_loss"]:
                row["train_loss"] = {str(i): v for i, v in record["train_loss"].items()}
            if setting == "b":
                row["pretrain_tokens"] = out["a"]["modes"]["topk"]["tokens_trained"]
            rows[mode] = row
        data_kind = "pretrain" if setting == "a" else "sft"
        out[setting] = {
            "description": description,
            "train_data": args.data[f"{data_kind}_train"],
            "valid_data": args.data[f"{data_kind}_valid"],
            "iterations": args.pretrain_iters if setting == "a" else args.finetune_iters,
            "eval_iters": args.pretrain_eval_iters if setting == "a" else args.finetune_eval_iters,
            "modes": rows,
        }
    return out


def findings(res: dict, k: int) -> dict:
    """Facts computed from the losses (nothing hand-written): per setting and mode the best k',
    losses at k, 2k and 3k, whether the loss never rises from k to 2k / 3k, the change beyond k,
    and each mode's best loss against Top-k's best."""
    out = {}
    for setting, block in res.items():
        modes = block["modes"]
        topk_losses = {int(b): v for b, v in modes["topk"]["val_loss"].items()}
        topk_best = min(topk_losses.values())
        per_mode = {}
        for mode, row in modes.items():
            losses = {int(b): v for b, v in row["val_loss"].items()}
            best_k = min(losses, key=lambda b: (losses[b], b))
            steps = [losses[b + 1] - losses[b] for b in range(k, 3 * k)]
            per_mode[mode] = {
                "best_k": best_k,
                "best_loss": losses[best_k],
                "loss_at_k": losses[k],
                "loss_at_2k": losses[2 * k],
                "loss_at_3k": losses[3 * k],
                "nonincreasing_k_to_2k": all(s <= 0 for s in steps[:k]),
                "nonincreasing_k_to_3k": all(s <= 0 for s in steps),
                "largest_rise_k_to_3k": max([0.0, *steps]),
                "change_k_to_2k": losses[2 * k] - losses[k],
                "change_k_to_3k": losses[3 * k] - losses[k],
                "best_gain_over_k": losses[k] - losses[best_k],
                "best_minus_topk_best": losses[best_k] - topk_best,
                "loss_at_k_minus_topk": losses[k] - topk_losses[k],
            }
        out[setting] = {
            "modes": per_mode,
            "topk_degradation_beyond_k": topk_losses[3 * k] - topk_losses[k],
            "best_mode": min(MODES, key=lambda mode: per_mode[mode]["best_loss"]),
        }
    return out


COLORS = {"topk": "tab:blue", "emoe": "tab:orange", "mmoe": "tab:green", "base": "0.45"}
LABELS = {"topk": "Top-k", "emoe": "EMoE", "mmoe": "M-MoE", "base": "base, not fine-tuned"}
MARKERS = {"topk": "o", "emoe": "s", "mmoe": "^", "base": "x"}


def plot(res: dict, args) -> bytes:
    """Two panels (a, b): validation loss against k' per mode, the training k marked; in (b) the
    base on its own (right) axis, its loss being on another scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = args.topk
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    for ax, (setting, block) in zip(axes, res.items()):
        handles = []
        for mode, row in block["modes"].items():
            budgets = [int(b) for b in row["val_loss"]]
            target = ax
            if mode == "base":
                target = ax.twinx()
                target.set_ylabel("base validation loss (right axis)", color=COLORS[mode])
                target.tick_params(axis="y", colors=COLORS[mode])
            (line,) = target.plot(budgets, list(row["val_loss"].values()), marker=MARKERS[mode],
                                  color=COLORS[mode], linestyle="--" if mode == "base" else "-",
                                  label=LABELS[mode])
            handles.append(line)
        handles.append(ax.axvline(k, color="0.6", linestyle=":", label=f"trained k = {k}"))
        ax.set_xticks(args.budgets)
        ax.set_xlabel("active experts per token k'")
        ax.set_ylabel("validation loss (nats/token)")
        tokens = block["modes"]["topk"]["tokens_trained"]
        ax.set_title(f"({setting}) {block['description']}\n{block['iterations']} steps, "
                     f"{tokens:,} tokens per mode", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(handles=handles, fontsize=8)
    fig.suptitle(f"Scaling wall: {args.num_experts} experts per layer, trained with k = {k}, "
                 f"evaluated at k' = 1 ... {3 * k} ({args.profile} profile, seed {args.seed})",
                 fontsize=11)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    return buffer.getvalue()


def print_summary(res: dict, found: dict, k: int) -> None:
    for setting, block in res.items():
        print(f"({setting}) {block['description']}: validation loss by k' (trained k = {k})")
        budgets = list(next(iter(block["modes"].values()))["val_loss"])
        print("  " + f"{'':22}" + "".join(f"{b:>8}" for b in budgets) + "  best k'")
        for mode, row in block["modes"].items():
            print("  " + f"{LABELS[mode]:22}" + "".join(f"{v:8.4f}" for v in row["val_loss"].values())
                  + f"  {found[setting]['modes'][mode]['best_k']:>7}")
        print(f"  Top-k loss(3k) - loss(k): {found[setting]['topk_degradation_beyond_k']:+.4f}")


DEFINITIONS = {
    "val_loss": "validation loss in nats per token at k' active experts per token (key), from the "
                "saved checkpoint, mean over the tokens that carry loss: every token in (a), "
                "response tokens only in (b); the same validation batches for every budget and mode",
    "tokens_trained": "consumed samples x sequence length of this run (every position of the packed "
                      "sequences, prompt tokens included in (b)); 0 for the base in (b)",
    "pretrain_tokens": "(b) only: the tokens the Top-k base was pretrained on in (a)",
    "megatron_validation_loss_at_k": "Megatron's own validation at the end of the run, at the "
                                     "training k (a cross-check of val_loss[k])",
    "findings": "computed from val_loss: best_k = argmin (smallest k' on ties); change_k_to_Nk = "
                "loss(Nk) - loss(k); nonincreasing_k_to_Nk = no rise from k' to k'+1 for k <= k' < "
                "Nk (exact comparison); best_minus_topk_best = this mode's best - Top-k's best",
}


def settings_record(args, data) -> dict:
    return {
        "profile": args.profile, "quick": args.quick, "gpu": args.gpu, "nproc": args.nproc,
        "expert_parallel_size": args.nproc, "seed": args.seed, "topk": args.topk,
        "budgets": args.budgets, "model_config": str(args.config),
        "model": {name: getattr(args, name) for name in (
            "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_experts",
            "moe_ffn_hidden_size", "seq_length")},
        "micro_batch_size": args.micro_batch_size, "global_batch_size": args.global_batch_size,
        "pretrain_iters": args.pretrain_iters, "finetune_iters": args.finetune_iters,
        "pretrain_lr": args.pretrain_lr, "finetune_lr": args.finetune_lr,
        "data_passes": args.data_passes, "pretrain_eval_iters": args.pretrain_eval_iters,
        "finetune_eval_iters": args.finetune_eval_iters,
        "mode_flags": mode_flags(args), "extra_flags": args.extra, "data": data,
        "work_dir": str(args.work_dir),
    }


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.time()
    print(f"[data] {'given prefixes' if args.sft_valid else 'embedded default data'}", flush=True)
    args.data = data = resolve_data(args)
    eval_iters(args, data)
    args.data_passes = data_passes(args, data)
    print(f"passes over the training data: {args.data_passes['a']:.3g} in (a), "
          f"{args.data_passes['b']:.3g} in (b)", flush=True)
    if args.gpu and not args.pretrain_train:
        print("note: the embedded data is small for --gpu; give a real corpus with "
              "--pretrain-train-data and the other data flags", flush=True)
    runs = plan(args, data)
    if args.dry_run:
        for run in runs:
            print(f"# {run.name} ({run.kind})\n{shlex.join(run.command)}\n")
        return 0
    if args.work_dir.exists():
        shutil.rmtree(args.work_dir)
    args.work_dir.mkdir(parents=True)
    print(f"{len(runs)} runs in {args.work_dir}: {args.profile} profile, {args.nproc} processes, "
          f"k = {args.topk} of {args.num_experts} experts, (a) {args.pretrain_iters} steps, "
          f"(b) {args.finetune_iters} steps, {args.global_batch_size} x {args.seq_length} tokens "
          "per step", flush=True)

    records: dict[tuple[str, str], dict] = {}
    for index, run in enumerate(runs, 1):
        records[(run.setting, run.mode)] = execute(run, index, len(runs))
        if run.kind == "init_check" and run.mode == MODES[-1]:
            check = init_check(records)
            print(f"  initial weights identical across modes: {check['identical']} "
                  f"(validation loss at iteration 0: {check['validation_loss_at_iteration_0']})",
                  flush=True)
            if not check["identical"]:
                raise SystemExit("the modes do not start from the same weights; see "
                                 f"{args.work_dir / 'init_check'}")
        if run.kind == "train" and (run.setting, run.mode) != ("a", "topk"):
            drop_checkpoints(run, args.keep_checkpoints)
    drop_checkpoints(runs[len(MODES)], args.keep_checkpoints)  # the base, (b) done

    res = results(args, records)
    tokens = {setting: {mode: row["tokens_trained"] for mode, row in block["modes"].items()
                        if mode != "base"} for setting, block in res.items()}
    for setting, per_mode in tokens.items():
        if len(set(per_mode.values())) != 1:
            raise SystemExit(f"({setting}): modes trained on different numbers of tokens: {per_mode}")
    found = findings(res, args.topk)
    print_summary(res, found, args.topk)
    record = {
        "benchmark": NAME,
        "schema": 1,
        "machine": common.machine(),
        "settings": settings_record(args, data),
        "definitions": DEFINITIONS,
        "init_check": init_check(records),
        "results": res,
        "findings": found,
        "runs": [{key: value for key, value in r.items() if key not in ("train_loss", "elastic_eval")}
                 for r in records.values()],
        "total_wall_s": round(time.time() - start, 1),
    }
    args.output.mkdir(parents=True, exist_ok=True)
    path = args.output / f"{NAME}.json"
    write_text_atomically(str(path), json.dumps(record, indent=2) + "\n")
    png = args.output / f"{NAME}.png"
    write_bytes_atomically(str(png), plot(res, args))
    print(f"wrote {path}\nwrote {png}\ntotal {record['total_wall_s'] / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
