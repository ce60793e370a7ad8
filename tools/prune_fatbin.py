#!/usr/bin/env python3
"""Keep one GPU architecture's device code in a shared library's CUDA fat binaries (a stand-in for
`nvprune`, which no PyPI package ships).

A CUDA shared library keeps its device code in the ELF section `.nv_fatbin`: a run of fat-binary
containers (magic 0xBA55ED50), each a list of entries (kind 1 = PTX, 2 = ELF cubin, others = LTO IR
and the like), each entry tagged with the SM architecture it was built for. The CUDA driver picks,
per container, the entry that suits the device (the cubin of the device's architecture first) and
reads only that one.

This tool rewrites the library *in place*, byte for byte the same size: every entry header stays
where it is (so the containers, the wrappers that point at them and any tool that walks the section
see the same layout), and the payload of each entry the kept architecture does not need is overwritten
with zeros. Zeros compress to almost nothing, so the wheel rebuilt around the library (deflate) is a
fraction of the original. A container that has no cubin of the kept architecture is left whole
(its kernels may need a PTX JIT or another cubin), so nothing the device could run is lost.

    python tools/prune_fatbin.py libtransformer_engine.so --arch 90 [--dry-run]

Prints a summary line (containers, entries, bytes kept/zeroed per architecture) and writes a JSON
report with --report.
"""

from __future__ import annotations

import argparse
import collections
import json
import mmap
import struct
import sys
from pathlib import Path

FATBIN_MAGIC = 0xBA55ED50
KIND_NAMES = {1: "ptx", 2: "elf", 4: "lto"}


def elf_sections(data) -> dict[str, tuple[int, int]]:
    """name -> (file offset, size) for a 64-bit little-endian ELF file."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError("not a 64-bit little-endian ELF file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    strtab_off, strtab_size = headers[shstrndx][4], headers[shstrndx][5]
    sections = {}
    for name_off, sh_type, _flags, _addr, offset, size, *_ in headers:
        end = data.find(b"\0", strtab_off + name_off, strtab_off + strtab_size)
        name = bytes(data[strtab_off + name_off:end]).decode()
        if sh_type != 8:  # SHT_NOBITS has no bytes in the file
            sections[name] = (offset, size)
    return sections


def parse_containers(data, start: int, end: int):
    """Yield (container offset, header size, [entries]) for each container in data[start:end].

    An entry is a dict: offset, header_size, payload_size (padded), kind, arch."""
    pos = start
    while pos + 16 <= end:
        magic, version, header_size, fat_size = struct.unpack_from("<IHHQ", data, pos)
        if magic != FATBIN_MAGIC:
            # containers are 8-byte aligned; padding between them is zeros
            pos += 8
            continue
        entries = []
        entry_pos, entries_end = pos + header_size, pos + header_size + fat_size
        if entries_end > end:
            raise ValueError(f"container at {pos:#x} runs past the section end")
        while entry_pos < entries_end:
            kind, _ver, ehsize, padded = struct.unpack_from("<HHIQ", data, entry_pos)
            arch, = struct.unpack_from("<I", data, entry_pos + 28)
            if ehsize < 32 or entry_pos + ehsize + padded > entries_end:
                raise ValueError(f"malformed entry at {entry_pos:#x} (container {pos:#x})")
            entries.append(dict(offset=entry_pos, header_size=ehsize, payload_size=padded,
                                kind=KIND_NAMES.get(kind, str(kind)), arch=arch))
            entry_pos += ehsize + padded
        yield pos, header_size, entries
        pos = entries_end


def prune(path: Path, arch: int, dry_run: bool = False) -> dict:
    with open(path, "r+b" if not dry_run else "rb") as handle:
        data = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ if dry_run else mmap.ACCESS_WRITE)
        try:
            sections = elf_sections(data)
            if ".nv_fatbin" not in sections:
                raise ValueError(f"{path} has no .nv_fatbin section")
            start, size = sections[".nv_fatbin"]
            kept = collections.Counter()
            zeroed = collections.Counter()
            containers = whole = entries_total = 0
            for _pos, _hsize, entries in parse_containers(data, start, start + size):
                containers += 1
                entries_total += len(entries)
                has_cubin = any(e["kind"] == "elf" and e["arch"] == arch for e in entries)
                if not has_cubin:
                    whole += 1
                for entry in entries:
                    label = f"{entry['kind']}_sm{entry['arch']}"
                    if not has_cubin or entry["arch"] == arch:
                        kept[label] += entry["payload_size"]
                        continue
                    zeroed[label] += entry["payload_size"]
                    if not dry_run:
                        begin = entry["offset"] + entry["header_size"]
                        data[begin:begin + entry["payload_size"]] = bytes(entry["payload_size"])
            if not dry_run:
                data.flush()
        finally:
            data.close()
    return dict(file=str(path), arch=arch, fatbin_section_bytes=size, containers=containers,
                containers_kept_whole=whole, entries=entries_total,
                bytes_kept=sum(kept.values()), bytes_zeroed=sum(zeroed.values()),
                kept_by_kind_arch=dict(sorted(kept.items())), zeroed_by_kind_arch=dict(sorted(zeroed.items())))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("library", type=Path)
    parser.add_argument("--arch", type=int, default=90, help="SM architecture to keep (90: Hopper)")
    parser.add_argument("--dry-run", action="store_true", help="report only, change nothing")
    parser.add_argument("--report", type=Path, help="write the summary as JSON here")
    args = parser.parse_args(argv)
    summary = prune(args.library, args.arch, args.dry_run)
    if args.report:
        args.report.write_text(json.dumps(summary, indent=2) + "\n")
    mib = 1 << 20
    print(f"{args.library.name}: {summary['containers']} fat binaries, {summary['entries']} entries; "
          f"kept {summary['bytes_kept'] / mib:.1f} MiB (sm{args.arch} and "
          f"{summary['containers_kept_whole']} containers without an sm{args.arch} cubin), "
          f"{'would zero' if args.dry_run else 'zeroed'} {summary['bytes_zeroed'] / mib:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
