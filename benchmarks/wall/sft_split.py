"""Setting (b)'s instruction data: the embedded SFT data re-split so that evaluation holds at least
`min_loss_tokens` response tokens.

The embedded validation split has about 6.4k response tokens, too few to separate modes. Whole
source files of the embedded training split move to evaluation (in the order of a hash of their
path, so no function's docstring is in one split while its module is in the other) until the
response tokens reach the target; the embedded validation records stay in evaluation. Both
splits are tokenized with the project's preprocessing and the embedded tokenizer, once: the
folder is reused while its manifest matches.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from megatron_emoe.data.preprocess import PreprocessConfig, preprocess
from megatron_emoe.files import write_text_atomically

KEY = "text"


def _source_order(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()


def _read(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _response_chars(record: dict) -> int:
    return sum(len(m["content"]) for m in record["messages"] if m["role"] == "assistant")


def build_sft_split(default: dict[str, str], folder: Path, min_loss_tokens: int) -> dict:
    """Prefixes {"sft_train", "sft_valid"} of the re-split data in `folder`, with counts."""
    raw = Path(default["sft_train"]).parent / "raw"
    train, valid = _read(raw / "sft_train.jsonl"), _read(raw / "sft_valid.jsonl")
    manifest = {"min_loss_tokens": min_loss_tokens, "tokenizer": default["tokenizer_model"],
                "inputs": {name: hashlib.sha256((raw / name).read_bytes()).hexdigest()
                           for name in ("sft_train.jsonl", "sft_valid.jsonl")}}
    done = folder / "manifest.json"
    if done.is_file():
        stored = json.loads(done.read_text())
        if {key: stored.get(key) for key in manifest} == manifest:
            return stored["split"]
    folder.mkdir(parents=True, exist_ok=True)
    # Characters per response token of the embedded data, to choose files before tokenizing.
    sidecar = json.loads((Path(default["sft_train"]).parent / "sft_train.json").read_text())
    chars_per_token = sum(map(_response_chars, train)) / sidecar["datasets"][KEY]["num_loss_tokens"]
    by_source: dict[str, list[dict]] = {}
    for record in train:
        by_source.setdefault(record["source"], []).append(record)
    # 10% over the target: the characters-per-token rate varies between files
    need = 1.1 * min_loss_tokens * chars_per_token - sum(map(_response_chars, valid))
    moved_sources = set()
    for source in sorted(by_source, key=_source_order):
        if need <= 0:
            break
        moved_sources.add(source)
        need -= sum(map(_response_chars, by_source[source]))
    moved = [r for r in train if r["source"] in moved_sources]
    split = {}
    for name, records in (("sft_train", [r for r in train if r["source"] not in moved_sources]),
                          ("sft_valid", valid + moved)):
        jsonl = folder / f"{name}.jsonl"
        write_text_atomically(str(jsonl), "".join(json.dumps(r) + "\n" for r in records))
        counts = preprocess(PreprocessConfig(
            inputs=[str(jsonl)], output_prefix=str(folder / name),
            tokenizer_model=default["tokenizer_model"], json_keys=[KEY], sft=True, overwrite=True,
            progress=False))["datasets"][KEY]
        split[name] = {"prefix": str(folder / f"{name}_{KEY}_document"), "records": len(records),
                       "tokens": counts["num_tokens"], "loss_tokens": counts["num_loss_tokens"]}
    if split["sft_valid"]["loss_tokens"] < min_loss_tokens:
        raise SystemExit(f"the instruction data holds too few response tokens for an evaluation "
                         f"split of {min_loss_tokens:,} ({split['sft_valid']['loss_tokens']:,})")
    split["moved_sources"] = len(moved_sources)
    write_text_atomically(str(done), json.dumps({**manifest, "split": split}, indent=2) + "\n")
    return split
