"""The GPU kit (`make gpu-kit`, tools/gpu_kit.py, tools/gpu_check.sh, tools/prune_fatbin.py).

The plan checks read gpu-kit/plan.json and the kit's files as `make gpu-kit` left them; they skip,
saying so, when the kit has not been built (it needs a few GB of downloads and a compile). Nothing
here downloads anything. The pruner is checked on a small ELF file built here.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
KIT = REPO / "gpu-kit"
sys.path.insert(0, str(REPO / "tools"))
import gpu_kit  # noqa: E402
import prune_fatbin  # noqa: E402

MIB = 1 << 20
KIT_MISSING = "the GPU kit has not been built here (run `make gpu-kit`; gpu-kit/plan.json is missing)"


def _plan() -> dict:
    if not (KIT / "plan.json").is_file():
        pytest.skip(KIT_MISSING)
    return json.loads((KIT / "plan.json").read_text())


# -------------------------------------------------------------------------------------------------
# The plan fits the device limits
# -------------------------------------------------------------------------------------------------
def test_each_call_carries_at_most_60_mib():
    plan = _plan()
    assert plan["calls"], "the plan has no device call"
    tree = gpu_kit.working_tree_bytes()
    for call in plan["calls"]:
        carried = 0
        for path in call["carry"]:
            folder = REPO / path
            assert folder.is_dir(), f"call {call['call']} carries {path}, which is not there"
            carried += sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        assert carried <= 60 * MIB, f"call {call['call']} carries {carried / MIB:.1f} MiB > 60 MiB"
        assert carried + tree <= 64 * MIB, (
            f"call {call['call']}: {carried / MIB:.1f} MiB carried + {tree / MIB:.1f} MiB of working tree > 64 MiB")


def test_plan_fits_the_device_time():
    """One fresh start (2-3 min: 180 s planned) for the first call, the calls after it on the warm
    machine, the check's own 8-minute budget and the idle wait after it: at most 15 minutes."""
    plan = _plan()
    calls = plan["calls"]
    last = calls[-1]
    assert "tools/gpu_check.sh" in last["command"] and "--dry-run" not in last["command"]
    assert last["timeout_s"] <= 600, "one device call runs 10 minutes at most"
    assert plan["check_budget_s"] <= 8 * 60
    own = 180 + 30 * (len(calls) - 1) + plan["check_budget_s"] + 30 + sum(
        c["travels_bytes"] for c in calls) / (20 * MIB)
    assert own <= 15 * 60, f"the plan needs about {own:.0f} s of device time > 900 s"
    assert plan["estimated_device_s"] <= 15 * 60
    for call in calls[:-1]:
        assert call["command"].startswith(f"mkdir -p {gpu_kit.STASH}"), call


def test_kit_holds_every_wheel():
    _plan()
    wheels = [p.name for p in (KIT / "wheels").glob("*.whl")]
    for stem in ("megatron_core-0.19.2-", "megatron_emoe-", f"transformer_engine-{gpu_kit.TE_VERSION}-",
                 f"transformer_engine_cu13-{gpu_kit.TE_VERSION}-", f"transformer_engine_torch-{gpu_kit.TE_VERSION}-",
                 "pydantic-", "pydantic_core-", "datasets-", "nvdlfw_inspect-"):
        assert any(w.startswith(stem) for w in wheels), f"no {stem}*.whl in gpu-kit/wheels"


def test_gpu_check_budget_matches_the_plan():
    text = (REPO / "tools" / "gpu_check.sh").read_text()
    assert f"CHECK_BUDGET_S={gpu_kit.CHECK_BUDGET_S}" in text
    subprocess.run(["bash", "-n", str(REPO / "tools" / "gpu_check.sh")], check=True)


# -------------------------------------------------------------------------------------------------
# The fat-binary pruner on a small ELF file
# -------------------------------------------------------------------------------------------------
def _entry(kind: int, arch: int, payload: bytes) -> bytes:
    header = bytearray(64)
    struct.pack_into("<HHIQ", header, 0, kind, 0x0101, 64, len(payload))
    struct.pack_into("<I", header, 28, arch)
    return bytes(header) + payload


def _container(entries: list[bytes]) -> bytes:
    body = b"".join(entries)
    return struct.pack("<IHHQ", prune_fatbin.FATBIN_MAGIC, 1, 16, len(body)) + body


def _elf(section: bytes) -> bytes:
    """A 64-bit ELF file with two sections, .nv_fatbin and the section-name table."""
    names = b"\0.nv_fatbin\0.shstrtab\0"
    data_off = 64
    names_off = data_off + len(section)
    shoff = (names_off + len(names) + 7) // 8 * 8
    header = bytearray(64)
    header[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", header, 0x28, shoff)
    struct.pack_into("<HHH", header, 0x3A, 64, 3, 2)
    sections = bytes(64)  # SHN_UNDEF
    sections += struct.pack("<IIQQQQIIQQ", 1, 1, 0, 0, data_off, len(section), 0, 0, 8, 0)
    sections += struct.pack("<IIQQQQIIQQ", 12, 3, 0, 0, names_off, len(names), 0, 0, 1, 0)
    blob = bytes(header) + section + names
    return blob + bytes(shoff - len(blob)) + sections


def test_prune_fatbin_keeps_sm90_and_containers_without_it(tmp_path):
    keep90, drop80, ptx = b"\x90" * 32, b"\x80" * 48, b"\x11" * 16
    only80 = b"\x81" * 24
    section = _container([_entry(2, 80, drop80), _entry(2, 90, keep90), _entry(1, 100, ptx)])
    section += _container([_entry(2, 80, only80)])  # no sm_90 cubin: kept whole
    path = tmp_path / "lib.so"
    original = _elf(section)
    path.write_bytes(original)
    summary = prune_fatbin.prune(path, 90)
    pruned = path.read_bytes()
    assert len(pruned) == len(original)
    assert summary["containers"] == 2 and summary["entries"] == 4 and summary["containers_kept_whole"] == 1
    assert summary["bytes_zeroed"] == len(drop80) + len(ptx)
    assert summary["bytes_kept"] == len(keep90) + len(only80)
    assert keep90 in pruned and only80 in pruned and drop80 not in pruned and ptx not in pruned
    # every header is where it was: the file parses to the same layout
    before = [[(e["offset"], e["arch"], e["kind"]) for e in entries]
              for _, _, entries in prune_fatbin.parse_containers(original, 64, 64 + len(section))]
    after = [[(e["offset"], e["arch"], e["kind"]) for e in entries]
             for _, _, entries in prune_fatbin.parse_containers(pruned, 64, 64 + len(section))]
    assert before == after


def test_prune_fatbin_dry_run_changes_nothing(tmp_path):
    path = tmp_path / "lib.so"
    path.write_bytes(_elf(_container([_entry(2, 80, b"\x80" * 8), _entry(2, 90, b"\x90" * 8)])))
    original = path.read_bytes()
    assert prune_fatbin.prune(path, 90, dry_run=True)["bytes_zeroed"] == 8
    assert path.read_bytes() == original


def test_a_kit_over_one_calls_budget_is_split_over_calls(monkeypatch):
    """Over the budget, the plan spreads the kit over calls (a wheel above it in parts), the calls
    before the last stash their part, and the parts join back into the wheel."""
    kit = KIT / "test-split"
    shutil.rmtree(kit, ignore_errors=True)
    (kit / "wheels").mkdir(parents=True)
    try:
        big = bytes(range(256)) * (10 * 1024)  # 2.5 MiB
        (kit / "wheels" / "big-1-py3-none-any.whl").write_bytes(big)
        (kit / "wheels" / "small-1-py3-none-any.whl").write_bytes(b"x" * 300_000)
        monkeypatch.setattr(gpu_kit, "CARRY_BUDGET", 1 * MIB)
        plan = gpu_kit.make_plan(kit)
        calls = plan["calls"]
        assert len(calls) == 3
        for call in calls:
            assert call["carry_bytes"] <= 1 * MIB
            assert call["carry"] == [f"gpu-kit/test-split/parts/call{call['call']}"]
        assert all(c["command"].startswith(f"mkdir -p {gpu_kit.STASH}") for c in calls[:-1])
        assert "KIT_STASH=" in calls[-1]["command"] and "tools/gpu_check.sh" in calls[-1]["command"]
        parts = sorted(kit.glob("parts/call*/big-1-py3-none-any.whl.part*"), key=lambda p: p.name)
        assert b"".join(p.read_bytes() for p in parts) == big
    finally:
        shutil.rmtree(kit, ignore_errors=True)
