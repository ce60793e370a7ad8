#!/usr/bin/env python3
"""Build, on a CPU machine, everything the offline GPU machine lacks, and print the device calls.

    make gpu-kit                       # or: python3.12 tools/gpu_kit.py [--jobs 2] [--plan-only]

The GPU machine (one H200; see ../shared/GPU.md) has Python 3.12 with torch 2.11.0+cu130, nvcc 13.0,
the CUDA 13 nvidia-* packages, pytest, transformers, ... but no megatron-core, no Transformer Engine
and no network, and each device call carries at most 64 MiB (the working tree included). This tool
fills the ignored folder gpu-kit/:

    downloads/   what pip downloaded (kept as a cache)
    build/venv/  a scratch venv like the GPU machine: torch==2.11.0 from PyPI (built for CUDA 13.0),
                 the packages the project uses that the GPU machine has, and the build tools
                 (nvidia-cuda-nvcc 13.0, pybind11, ninja, the cuDNN / NCCL / cudnn-frontend headers)
    wheels/      the kit: megatron-core, every pure dependency missing there, the project's own
                 wheel, transformer_engine (meta), transformer_engine_torch built here against
                 torch 2.11.0+cu130, and transformer_engine_cu13 with libtransformer_engine.so
                 pruned to sm_90 (tools/prune_fatbin.py: other architectures' device code zeroed,
                 so the deflated wheel is small)
    parts/       only when the kit is over one call's budget: the kit split over several calls
    plan.json    the device calls (carry, command, sizes, estimated device time); also printed

Every step is skipped when its output is already there (delete the output to redo it).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import prune_fatbin  # noqa: E402

TE_VERSION = "2.20.2"
TORCH_VERSION = "2.11.0"  # what the GPU machine has (+cu130); PyPI's 2.11.0 wheel is the cu130 build
CUDA_MAJOR = "13"
SM = 90
MIB = 1 << 20

# The device machine's limits (/work/.library/device/README.md) and what this plan allows itself.
CARRY_LIMIT = 64 * MIB  # working tree + carried paths, per call
CARRY_BUDGET = 60 * MIB  # what the plan lets one call's carried kit take (issue 16)
DEVICE_BUDGET_S = 15 * 60  # device time for a session, starts and idle waits included
CHECK_BUDGET_S = 8 * 60  # tools/gpu_check.sh's own limit
START_S = 180  # a fresh machine's start ("a minute or more"; 2-3 min planned)
WARM_CALL_S = 20  # a call on a warm machine: transfer + a copy
IDLE_S = 30  # held after the last call before it goes back (or give_back at once)
TRANSFER_MIB_PER_S = 20  # planned transfer rate of carried files
STASH = "/tmp/emoe-kit"  # where calls before the last keep their part on the (warm) GPU machine

PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
             "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64"]

# Wheels for the GPU machine (cp312, x86-64): what megatron-core 0.19.2, Transformer Engine 2.20.2
# (core + torch binding) and this project need that the machine's image does not have
# (/work/.library/device/KINDS.md lists its packages). Pinned, so the kit is reproducible.
KIT_WHEELS = [
    "megatron-core==0.19.2",
    f"transformer-engine=={TE_VERSION}",
    f"transformer-engine-cu{CUDA_MAJOR}=={TE_VERSION}",  # pruned before it goes into wheels/
    "nvdlfw-inspect==0.2.2",  # TE's debug API, imported by transformer_engine.pytorch
    "pydantic==2.14.4", "pydantic-core==2.50.5", "annotated-types==0.8.0",
    "typing-inspection==0.4.5", "typing-extensions==4.16.0",  # pydantic needs >= 4.16
    "datasets==5.2.0", "dill==0.4.1", "multiprocess==0.70.19",  # the project's data package
]
# Not carried, on purpose: nvidia-cudnn-frontend (11 MB; TE's Python never imports it, its headers
# only serve the build here), importlib-metadata (TE uses the standard library's importlib.metadata).

# The scratch venv: the GPU machine's packages that the project and TE use, then the build tools.
VENV_RUNTIME = [
    f"torch=={TORCH_VERSION}", "numpy", "matplotlib", "psutil", "pyyaml", "tensorboard", "pyarrow",
    "tokenizers", "transformers==5.17.0", "tqdm", "pandas", "xxhash", "fsspec<=2026.9.0", "requests",
    "einops", "onnx", "onnxscript", "pytest", "pytest-timeout", "packaging",
]
VENV_BUILD = [
    "setuptools<82", "wheel", "ninja", "pybind11",
    "nvidia-cuda-nvcc==13.0.88", "nvidia-cuda-crt==13.0.88", "nvidia-nvvm==13.0.88",
    "nvidia-cuda-cccl==13.0.85",
]


def log(message: str) -> None:
    print(f"[gpu-kit {time.strftime('%H:%M:%S')}] {message}", flush=True)


def run(cmd, **kwargs) -> None:
    log("$ " + " ".join(str(c) for c in cmd))
    subprocess.run([str(c) for c in cmd], check=True, **kwargs)


def pip_download(python: str, dest: Path, specs: list[str], binary: bool = True) -> None:
    cmd = [python, "-m", "pip", "download", "-q", "--no-deps", "-d", dest]
    if binary:
        cmd += ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp"]
        for platform in PLATFORMS:
            cmd += ["--platform", platform]
    run(cmd + specs)


def find_one(folder: Path, pattern: str) -> Path:
    found = sorted(folder.glob(pattern))
    if len(found) != 1:
        raise SystemExit(f"expected one {pattern} in {folder}, found {[p.name for p in found]}")
    return found[0]


def wheel_stem(spec: str) -> str:
    name, version = spec.split("==")
    return f"{name.replace('-', '_')}-{version}-"


# -------------------------------------------------------------------------------------------------
# Steps
# -------------------------------------------------------------------------------------------------
def download(kit: Path, python: str) -> None:
    downloads = kit / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    missing = [spec for spec in KIT_WHEELS if not list(downloads.glob(wheel_stem(spec) + "*.whl"))]
    if missing:
        pip_download(python, downloads, missing)
    if not list(downloads.glob("nvidia_cudnn_frontend-*.whl")):
        pip_download(python, downloads, ["nvidia-cudnn-frontend==1.32.0"])


def download_te_torch_sdist(kit: Path) -> None:
    downloads = kit / "downloads"
    if not list(downloads.glob(f"transformer_engine_torch-{TE_VERSION}.tar.gz")):
        # the sdist's metadata step imports torch: no build isolation, the scratch venv's torch
        run([venv_python(kit), "-m", "pip", "download", "-q", "--no-deps", "--no-binary=:all:",
             "--no-build-isolation", "-d", downloads, f"transformer-engine-torch=={TE_VERSION}"])


def venv_python(kit: Path) -> Path:
    return kit / "build" / "venv" / "bin" / "python"


def fetch_venv_wheels(kit: Path) -> None:
    """The scratch venv's wheels (torch 2.11.0 and its CUDA 13 packages: a few GB), downloaded once
    into downloads/venv/ so that the venv installs offline."""
    folder = kit / "downloads" / "venv"
    stamp = folder / ".complete"
    if stamp.exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    run([venv_python(kit), "-m", "pip", "download", "-q", "--only-binary=:all:", "-d", folder,
         *VENV_RUNTIME, *VENV_BUILD])
    stamp.touch()


def make_venv(kit: Path, python: str) -> None:
    vpy = venv_python(kit)
    stamp = vpy.parent.parent / ".kit-installed"
    if stamp.exists():
        return
    if not vpy.exists():
        run([python, "-m", "venv", vpy.parent.parent])
    run([vpy, "-m", "pip", "install", "-q", "--upgrade", "pip"])
    fetch_venv_wheels(kit)
    local = ["--no-index", "--find-links", kit / "downloads" / "venv"]
    run([vpy, "-m", "pip", "install", "-q", *local, *VENV_RUNTIME, *VENV_BUILD])
    # headers only (its Python side wants nvidia-cutlass-dsl, which the build does not need)
    run([vpy, "-m", "pip", "install", "-q", "--no-deps",
         find_one(kit / "downloads", "nvidia_cudnn_frontend-*.whl")])
    probe = subprocess.run([vpy, "-c", "import torch; print(torch.__version__, torch.version.cuda)"],
                           check=True, capture_output=True, text=True).stdout.split()
    log(f"scratch venv: torch {probe[0]}, built for CUDA {probe[1]}")
    if probe[0].split("+")[0] != TORCH_VERSION or not probe[1].startswith(CUDA_MAJOR + "."):
        raise SystemExit(f"the scratch venv's torch is {probe}; the GPU machine has {TORCH_VERSION}+cu130")
    stamp.write_text(" ".join(probe) + "\n")


def site_packages(kit: Path) -> Path:
    out = subprocess.run([venv_python(kit), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         check=True, capture_output=True, text=True).stdout.strip()
    return Path(out)


def build_te_torch(kit: Path, jobs: int) -> Path:
    wheels = kit / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    done = list(wheels.glob(f"transformer_engine_torch-{TE_VERSION}-*.whl"))
    if done:
        return done[0]
    nvidia = site_packages(kit) / "nvidia"
    cuda_home = nvidia / f"cu{CUDA_MAJOR}"
    frontend = subprocess.run(
        [venv_python(kit), "-c", "import importlib.metadata as m; "
         "print(m.distribution('nvidia-cudnn-frontend').locate_file('include'))"],
        check=True, capture_output=True, text=True).stdout.strip()
    includes = [cuda_home / "include", nvidia / "cudnn" / "include", nvidia / "nccl" / "include",
                nvidia / "nvshmem" / "include", Path(frontend)]
    env = dict(os.environ,
               NVTE_PYTORCH_FORCE_BUILD="TRUE",  # never fetch a prebuilt wheel from GitHub
               NVTE_FRAMEWORK="pytorch", NVTE_CUDA_ARCHS=str(SM), MAX_JOBS=str(jobs),
               NVTE_BUILD_THREADS_PER_JOB="1",
               CUDA_HOME=str(cuda_home), CUDA_PATH=str(cuda_home),
               CPATH=":".join(str(p) for p in includes if p.is_dir()),
               PATH=f"{cuda_home / 'bin'}:{venv_python(kit).parent}:{os.environ['PATH']}")
    sdist = find_one(kit / "downloads", f"transformer_engine_torch-{TE_VERSION}.tar.gz")
    out = kit / "build" / "te_torch"
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(kit / "build" / "te_torch_build.log", "w") as build_log:
        log(f"building transformer_engine_torch {TE_VERSION} (MAX_JOBS={jobs}; log: {build_log.name})")
        proc = subprocess.run([venv_python(kit), "-m", "pip", "wheel", "-v", "--no-deps",
                               "--no-build-isolation", "-w", out, sdist],
                              env=env, stdout=build_log, stderr=subprocess.STDOUT)
    if proc.returncode:
        tail = (kit / "build" / "te_torch_build.log").read_text(errors="replace")[-4000:]
        raise SystemExit(f"transformer_engine_torch build failed:\n{tail}")
    wheel = find_one(out, f"transformer_engine_torch-{TE_VERSION}-*.whl")
    log(f"built {wheel.name} ({wheel.stat().st_size / MIB:.1f} MiB) in {time.time() - start:.0f} s")
    shutil.copy2(wheel, wheels / wheel.name)
    return wheels / wheel.name


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def prune_te_core(kit: Path) -> Path:
    wheels = kit / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    source = find_one(kit / "downloads", f"transformer_engine_cu{CUDA_MAJOR}-{TE_VERSION}-*.whl")
    target = wheels / source.name
    if target.exists():
        return target
    start = time.time()
    with tempfile.TemporaryDirectory(dir=kit / "build") as scratch:
        scratch = Path(scratch)
        with zipfile.ZipFile(source) as zin:
            infos = zin.infolist()
            zin.extractall(scratch)
        library = scratch / "transformer_engine" / "wheel_lib" / "libtransformer_engine.so"
        summary = prune_fatbin.prune(library, SM)
        (kit / "build" / "prune_report.json").write_text(json.dumps(summary, indent=2) + "\n")
        log(f"pruned libtransformer_engine.so to sm_{SM}: kept {summary['bytes_kept'] / MIB:.1f} MiB "
            f"of device code, zeroed {summary['bytes_zeroed'] / MIB:.1f} MiB "
            f"({summary['containers']} fat binaries, {summary['containers_kept_whole']} kept whole)")
        record_name = next(i.filename for i in infos if i.filename.endswith(".dist-info/RECORD"))
        lines = []
        partial = target.with_suffix(".partial")
        with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zout:
            for info in infos:
                if info.filename == record_name or info.is_dir():
                    continue
                data = (scratch / info.filename).read_bytes()
                zout.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
                lines.append(_record_line(info.filename, data))
            lines.append(f"{record_name},,")
            zout.writestr(record_name, "\n".join(lines) + "\n")
        partial.rename(target)
    log(f"{target.name}: {source.stat().st_size / MIB:.1f} MiB -> {target.stat().st_size / MIB:.1f} MiB "
        f"in {time.time() - start:.0f} s")
    return target


def copy_pure_wheels(kit: Path) -> None:
    wheels = kit / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    for spec in KIT_WHEELS:
        if spec.startswith(f"transformer-engine-cu{CUDA_MAJOR}"):
            continue
        wheel = find_one(kit / "downloads", wheel_stem(spec) + "*.whl")
        if not (wheels / wheel.name).exists():
            shutil.copy2(wheel, wheels / wheel.name)


def build_project_wheel(kit: Path) -> None:
    """The project's wheel, built from a copy of the working tree's tracked files (no build/ or
    egg-info left in the checkout). Rebuilt every time: the code changes."""
    wheels = kit / "wheels"
    for old in wheels.glob("megatron_emoe-*.whl"):
        old.unlink()
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, check=True,
                           capture_output=True).stdout.decode().split("\0")
    with tempfile.TemporaryDirectory(dir=kit / "build") as scratch:
        for name in filter(None, files):
            source = REPO / name
            if source.is_file():
                (Path(scratch) / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, Path(scratch) / name)
        run([venv_python(kit), "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
             "-w", wheels, scratch])


# -------------------------------------------------------------------------------------------------
# The plan
# -------------------------------------------------------------------------------------------------
def working_tree_bytes() -> int:
    """What travels besides the carried paths: tracked and untracked-not-ignored files."""
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           cwd=REPO, check=True, capture_output=True).stdout.decode().split("\0")
    return sum((REPO / n).stat().st_size for n in filter(None, names) if (REPO / n).is_file())


def split_kit(kit: Path, budget: int) -> list[list[Path]]:
    """The kit's files over calls, each call's files <= budget; a file above the budget is cut into
    parts named NAME.partNNN that tools/gpu_check.sh joins again."""
    parts_dir = kit / "parts"
    shutil.rmtree(parts_dir, ignore_errors=True)
    files = sorted((kit / "wheels").glob("*.whl"), key=lambda p: -p.stat().st_size)
    pieces: list[tuple[Path, int]] = []
    for wheel in files:
        size = wheel.stat().st_size
        if size <= budget:
            pieces.append((wheel, size))
            continue
        parts_dir.mkdir(exist_ok=True)
        with open(wheel, "rb") as source:
            index = 0
            while chunk := source.read(budget):
                part = parts_dir / f"{wheel.name}.part{index:03d}"
                part.write_bytes(chunk)
                pieces.append((part, len(chunk)))
                index += 1
    calls: list[list[tuple[Path, int]]] = []
    for piece in pieces:  # first fit, largest first
        for call in calls:
            if sum(size for _, size in call) + piece[1] <= budget:
                call.append(piece)
                break
        else:
            calls.append([piece])
    return [[path for path, _ in call] for call in calls]


def make_plan(kit: Path) -> dict:
    tree = working_tree_bytes()
    budget = min(CARRY_BUDGET, CARRY_LIMIT - tree)
    wheels = sorted((kit / "wheels").glob("*.whl"))
    total = sum(w.stat().st_size for w in wheels)
    calls = []
    if total <= budget:
        groups = [wheels]
        carries = [[str((kit / "wheels").relative_to(REPO))]]
    else:
        groups = split_kit(kit, budget)
        carries = []
        for index, group in enumerate(groups, 1):
            folder = kit / "parts" / f"call{index}"
            folder.mkdir(parents=True, exist_ok=True)
            for path in group:
                shutil.move(str(path), folder / path.name) if path.parent.name == "parts" \
                    else shutil.copy2(path, folder / path.name)
            carries.append([str(folder.relative_to(REPO))])
    for index, (group, carry) in enumerate(zip(groups, carries, strict=True), 1):
        size = sum((REPO / c / p.name).stat().st_size if len(groups) > 1 else p.stat().st_size
                   for c in carry for p in group)
        last = index == len(groups)
        if last:
            command = (f"KIT_DIRS='{' '.join(carry)}' KIT_STASH={STASH} bash tools/gpu_check.sh"
                       if len(groups) > 1 else "bash tools/gpu_check.sh")
            timeout_s, run_s = CHECK_BUDGET_S + 60, CHECK_BUDGET_S
        else:
            command = f"mkdir -p {STASH} && cp {carry[0]}/* {STASH}/ && ls -l {STASH}"
            timeout_s, run_s = 60, 5
        start_s = START_S if index == 1 else 0
        transfer_s = round((size + tree) / MIB / TRANSFER_MIB_PER_S)
        calls.append(dict(call=index, carry=carry, command=command, timeout_s=timeout_s,
                          carry_bytes=size, travels_bytes=size + tree,
                          estimated_device_s=start_s + transfer_s + run_s + (0 if last else WARM_CALL_S)))
    device_s = sum(c["estimated_device_s"] for c in calls) + IDLE_S
    return dict(
        kit_bytes=total, working_tree_bytes=tree, carry_budget_bytes=CARRY_BUDGET,
        carry_limit_bytes=CARRY_LIMIT, device_budget_s=DEVICE_BUDGET_S, check_budget_s=CHECK_BUDGET_S,
        assumptions=dict(start_s=START_S, warm_call_s=WARM_CALL_S, idle_after_last_s=IDLE_S,
                         transfer_mib_per_s=TRANSFER_MIB_PER_S, stash=STASH),
        wheels={w.name: w.stat().st_size for w in wheels},
        calls=calls, estimated_device_s=device_s,
        notes=[
            "Make the calls back to back: the machine goes back after 30 s idle, and with it "
            f"anything written outside $OUT ({STASH} included).",
            "The last call's command installs the kit into a fresh prefix and runs every check "
            f"within {CHECK_BUDGET_S} s; copy what comes back from $OUT to benchmarks/results/.",
            "Call give_back right after the last call.",
        ],
    )


def print_plan(plan: dict) -> None:
    print()
    print(f"GPU kit: {plan['kit_bytes'] / MIB:.1f} MiB of wheels; the working tree travels too "
          f"({plan['working_tree_bytes'] / MIB:.1f} MiB); each call may carry "
          f"{plan['carry_budget_bytes'] / MIB:.0f} MiB (device limit {plan['carry_limit_bytes'] / MIB:.0f} MiB)")
    for name, size in plan["wheels"].items():
        print(f"  {size / MIB:7.2f} MiB  {name}")
    print(f"\nPlan: {len(plan['calls'])} device call(s), back to back (the machine goes back after 30 s idle):")
    for call in plan["calls"]:
        print(f"  call {call['call']}: run(carry={json.dumps(call['carry'])}, timeout_s={call['timeout_s']},")
        print(f"          command={json.dumps(call['command'])})")
        print(f"          carries {call['carry_bytes'] / MIB:.1f} MiB (+ tree: {call['travels_bytes'] / MIB:.1f} MiB), "
              f"about {call['estimated_device_s']} s of device time")
    print(f"  then: give_back")
    print(f"Estimated device time: {plan['estimated_device_s']} s ({plan['estimated_device_s'] / 60:.1f} min) "
          f"of the {plan['device_budget_s'] // 60} min a session has (a fresh start is planned at "
          f"{plan['assumptions']['start_s']} s).")
    for note in plan["notes"]:
        print(f"  - {note}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kit-dir", type=Path, default=REPO / "gpu-kit")
    parser.add_argument("--jobs", type=int, default=2, help="MAX_JOBS for the TE torch build")
    parser.add_argument("--plan-only", action="store_true", help="print the plan of the kit as it is")
    parser.add_argument("--skip-te-torch", action="store_true",
                        help="leave out the TE torch binding (no build; the kit is then incomplete)")
    args = parser.parse_args(argv)
    kit = args.kit_dir.resolve()
    python = sys.executable
    if not args.plan_only:
        (kit / "build").mkdir(parents=True, exist_ok=True)
        start = time.time()
        download(kit, python)
        make_venv(kit, python)
        download_te_torch_sdist(kit)
        copy_pure_wheels(kit)
        prune_te_core(kit)
        build_project_wheel(kit)
        if not args.skip_te_torch:
            build_te_torch(kit, args.jobs)
        log(f"kit ready in {time.time() - start:.0f} s")
    plan = make_plan(kit)
    (kit / "plan.json").write_text(json.dumps(plan, indent=2) + "\n")
    print_plan(plan)
    return 0


if __name__ == "__main__":
    sys.exit(main())
