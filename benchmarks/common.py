"""Shared code of the benchmarks: flags, timing, machine info, JSON output, real Megatron builders.

Every benchmark builds Megatron-Core's own modules (the `MoELayer` / `TopKRouter` of Megatron's GPT
layer specs, and the `ElasticMoELayer` / `ElasticRouter` that `with_elastic_router` puts there),
inside `megatron_emoe.runtime.launch.run_gloo(..., world_size=1)`, which sets up gloo, Megatron's parallel
state and seeds, and on CPU `megatron_emoe.cpu.enable()`.

Timing: `time_interleaved` runs the variants being compared round-robin in one process (the order
rotates every round), so slow drift of the machine hits all of them alike; a ratio is the median
over rounds of the per-round ratio. On CUDA every timed sample is bracketed by
`torch.cuda.synchronize()`, and calls that take under `--min-sample-ms` are repeated inside one
sample to keep launch and timer noise out.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    # As the README says for CPU runs: Megatron decorates a few router helpers with torch.compile,
    # which would compile them with inductor on CPU. Must be set before Megatron is imported.
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
warnings.filterwarnings("ignore", category=UserWarning, module="megatron")
# GPTModel logs a deprecation notice (in favour of HybridModel) at every construction.
logging.getLogger("megatron.core.models.gpt.gpt_model").setLevel(logging.ERROR)

from megatron.core.extensions.transformer_engine import HAVE_TE  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

from megatron_emoe.cpu import device  # noqa: E402,F401
from megatron_emoe.runtime.builders import gpt_batch, gpt_model, moe_layer, reseed  # noqa: E402,F401
from megatron_emoe.runtime.launch import run_gloo  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
_LOAD_AT_START = os.getloadavg()  # other work on a shared machine shows up as noise
RESULTS = REPO / "benchmarks" / "results"



# ----------------------------------------------------------------------------------------------
# Flags
# ----------------------------------------------------------------------------------------------
def parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with the flags every benchmark takes."""
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes and few repeats (the tests' mode, well under a minute on CPU)")
    p.add_argument("--output", type=Path, default=RESULTS,
                   help="folder for the JSON result (file name: <benchmark>.json)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default: per device)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed rounds (default: 20 on CUDA, a few on CPU, 3 with --quick)")
    p.add_argument("--min-sample-ms", type=float, default=None,
                   help="repeat a call inside one timed sample until it lasts this long "
                        "(default: 20 on CUDA, 10 on CPU)")
    p.add_argument("--te", action="store_true",
                   help="Transformer Engine specs (grouped GEMM, permute fusion); CUDA + TE only")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's own choice)")
    p.add_argument("--seed", type=int, default=1234)
    return p


def finish_args(args: argparse.Namespace, cpu_repeats: int = 7) -> argparse.Namespace:
    """Fill per-device defaults of the common flags and refuse impossible combinations."""
    if args.te and not (CUDA and HAVE_TE):
        raise SystemExit("--te needs a CUDA GPU and Transformer Engine")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.warmup is None:
        args.warmup = 1 if args.quick else (5 if CUDA else 2)
    if args.repeats is None:
        args.repeats = 3 if args.quick else (20 if CUDA else cpu_repeats)
    if args.min_sample_ms is None:
        args.min_sample_ms = 20.0 if CUDA else 10.0
    return args


def int_list(text: str) -> list[int]:
    """`--experts 8,64,256` style values."""
    return [int(v) for v in text.split(",") if v.strip()]


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------
def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def _timed(fn: Callable[[], object], inner: int) -> float:
    """Seconds per call of `fn`, over `inner` back-to-back calls, device work included."""
    sync()
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    sync()
    return (time.perf_counter() - start) / inner


def time_interleaved(variants: dict[str, Callable[[], object]], warmup: int, repeats: int,
                     min_sample_ms: float = 0.0) -> dict[str, list[float]]:
    """Seconds per call of each variant, `repeats` samples each, measured round-robin.

    Round r runs the variants in an order rotated by r, so no variant always goes first. Each
    variant's calls per sample are fixed after warm-up (enough to reach `min_sample_ms`).
    """
    names = list(variants)
    for _ in range(max(warmup, 1)):  # at least one: it also sizes the inner loops
        single = {name: _timed(variants[name], 1) for name in names}
    inner = {name: max(1, math.ceil(min_sample_ms / 1e3 / max(single[name], 1e-9)))
             for name in names}
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(_timed(variants[name], inner[name]))
    return times


def paired_ratio(numerator: list[float], denominator: list[float]) -> float:
    """Median over rounds of numerator[r] / denominator[r] (the two were measured side by side)."""
    return statistics.median(a / b for a, b in zip(numerator, denominator))


def summary(times: list[float]) -> dict:
    """Median, spread and every sample (in round order) of one variant, in milliseconds."""
    ms = [t * 1e3 for t in times]
    return {"median_ms": statistics.median(ms), "min_ms": min(ms), "max_ms": max(ms),
            "samples": len(ms), "all_ms": [round(v, 4) for v in ms]}


def target_line(name: str, value: float, limit: float, higher_is_better: bool = False) -> dict:
    """A target check. Judged only on CUDA (the targets are for an H100); on CPU `met` is None."""
    met = (value >= limit if higher_is_better else value <= limit) if CUDA else None
    return {"name": name, "value": value, "limit": limit,
            "direction": ">=" if higher_is_better else "<=", "met": met}


def print_target(target: dict) -> None:
    verdict = {True: "MET", False: "NOT MET", None: "not judged (targets are for an H100 GPU)"}
    print(f"target {target['name']}: {target['value']:.4f} (target {target['direction']} "
          f"{target['limit']}) -> {verdict[target['met']]}", flush=True)


# ----------------------------------------------------------------------------------------------
# Machine info and JSON
# ----------------------------------------------------------------------------------------------
def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> Optional[str]:
    from importlib import metadata

    for name in (package, package.replace("-", "_")):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def _te_version() -> Optional[str]:
    if not HAVE_TE:
        return None
    import transformer_engine

    return getattr(transformer_engine, "__version__", None) or _version("transformer-engine")


def _git() -> dict:
    def run(*cmd):
        return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.rstrip("\n")  # status lines start with spaces

    try:
        changed = [line[3:] for line in run("status", "--porcelain").splitlines()]  # "XY path"
        tracked = [line[3:] for line in run("status", "--porcelain", "--untracked-files=no")
                   .splitlines()]
        return {"commit": run("rev-parse", "HEAD") or None, "dirty": bool(tracked),
                "modified": tracked, "untracked": [p for p in changed if p not in tracked]}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def machine() -> dict:
    """What ran the benchmark: device, versions, thread count, date, command line."""
    info = {
        "device": "cuda" if CUDA else "cpu",
        "device_name": torch.cuda.get_device_name() if CUDA else _cpu_name(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if CUDA else None,
        "megatron_core": _version("megatron-core"),
        "transformer_engine": _te_version(),
        "megatron_emoe": _version("megatron-emoe"),
        "git": _git(),
        "load_average_1min": {"start": round(_LOAD_AT_START[0], 2),
                              "end": round(os.getloadavg()[0], 2)},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]),
    }
    if CUDA:
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
    return info


def write_results(name: str, args: argparse.Namespace, settings: dict, figures: list[dict],
                  targets: list[dict]) -> Path:
    """Write `<output>/<name>.json`: machine, settings, one record per figure, target checks."""
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    record = {
        "benchmark": name,
        "schema": 1,
        "machine": machine(),
        "settings": {**settings, "quick": args.quick, "warmup": args.warmup,
                     "repeats": args.repeats, "min_sample_ms": args.min_sample_ms,
                     "te": args.te, "seed": args.seed},
        "figures": figures,
        "targets": targets,
    }
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2, default=_jsonable) + "\n")
    tmp.replace(path)
    print(f"wrote {path}", flush=True)
    return path


def _jsonable(value):
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


# ----------------------------------------------------------------------------------------------
# Real Megatron objects
# ----------------------------------------------------------------------------------------------
def launch(fn: Callable, *args, **kwargs):
    """Run `fn(*args, **kwargs)` in this process with gloo, Megatron's parallel state (TP = EP =
    PP = 1) and its seeds set up (`megatron_emoe.runtime.launch.run_gloo`); returns `fn`'s result."""
    result = {}

    def body(rank):
        if CUDA:
            torch.cuda.set_device(0)
        result["value"] = fn(*args, **kwargs)

    run_gloo(body, world_size=1, timeout=3600)
    return result["value"]


def model_dtype(fp8: bool = False) -> torch.dtype:
    """bf16 on CUDA (also the storage type under fp8), fp32 on CPU."""
    return torch.bfloat16 if CUDA else torch.float32


def transformer_config(*, te: bool = False, fp8: bool = False, **overrides) -> TransformerConfig:
    """A Megatron `TransformerConfig` for one device: bf16 (+ optional fp8) on CUDA, fp32 on CPU.

    No dropout, no bias in linears, alltoall dispatcher, Megatron's aux loss as given (both
    router kinds get the same). Fused kernels only with `te` (grouped GEMM, permute fusion).
    """
    dtype = model_dtype()
    settings = dict(
        num_layers=1,
        hidden_size=256,
        ffn_hidden_size=1024,
        num_attention_heads=4,
        num_moe_experts=8,
        moe_router_topk=2,
        moe_token_dispatcher_type="alltoall",
        moe_aux_loss_coeff=1e-2,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        pipeline_dtype=dtype,
        moe_grouped_gemm=te,
        moe_permute_fusion=te,
    )
    if fp8:
        settings.update(fp8="hybrid", fp8_recipe="delayed")
    settings.update(overrides)
    return TransformerConfig(**settings)


def copy_weights(source: torch.nn.Module, target: torch.nn.Module) -> None:
    """Load `source`'s weights into `target` (same shapes: Top-k and elastic modules match)."""
    target.load_state_dict(source.state_dict(), strict=True)


def set_aux_loss_scale() -> None:
    """Megatron's aux-loss autoscaler multiplies aux-loss gradients by the main loss's scale."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    MoEAuxLossAutoScaler.set_loss_scale(torch.ones((), device=device()))

