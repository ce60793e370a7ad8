"""The two conversions: HF folder -> Megatron `torch_dist` checkpoint, and back.

Inputs are checked before any work; outputs are built in a hidden sibling folder and renamed
into place only when complete, so a failed run leaves no half-written output and an existing
output is replaced (with `overwrite`) only by a finished one. Sources are only ever read.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile

import yaml
from tqdm import tqdm
from transformers import AutoConfig

from megatron_emoe.conversion import hf_files, megatron_side
from megatron_emoe.conversion.families import FAMILIES, ConversionError, Family, family_for
from megatron_emoe.files import mkdtemp_like_mkdir
from megatron_emoe.runtime import checkpoints
from megatron_emoe.runtime.arguments import flags_argv
from megatron_emoe.runtime.checkpoints import HF_SUBDIR
from megatron_emoe.runtime.saved_args import args_from_checkpoint, checkpoint_args
from megatron_emoe.runtime.launch import run_gloo
from megatron_emoe.runtime.model import build_args, build_model, load, megatron_globals

MODEL_FLAGS = "model.yaml"  # the Megatron flags of the model, for `--config`
MAKE_VOCAB_DIVISIBLE_BY = 128  # Megatron's default --make-vocab-size-divisible-by
IGNORED_HF_TENSORS = ("rotary_emb.inv_freq",)  # buffers some old checkpoints saved


@dataclasses.dataclass
class HFToMegatron:
    """`hf-to-megatron` settings (flags map 1:1 to fields)."""

    hf_path: str
    output: str
    target_tensor_parallel_size: int = 1
    target_expert_parallel_size: int = 1
    overwrite: bool = False

    def validate(self) -> None:
        for flag in ("target_tensor_parallel_size", "target_expert_parallel_size"):
            if getattr(self, flag) < 1:
                raise ConversionError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(self, flag)}")
        check_output(self.output, self.overwrite, source=self.hf_path)


@dataclasses.dataclass
class MegatronToHF:
    """`megatron-to-hf` settings (flags map 1:1 to fields)."""

    load: str
    output: str
    num_experts_per_tok: int | None = None
    hf_config: str | None = None
    max_shard_size_mb: int = 5000
    overwrite: bool = False

    def validate(self) -> None:
        if self.max_shard_size_mb < 1:
            raise ConversionError(f"--max-shard-size-mb must be >= 1, got {self.max_shard_size_mb}")
        check_output(self.output, self.overwrite, source=self.load)


# ---------------------------------------------------------------------- checks -------------
def check_output(output: str, overwrite: bool, source: str) -> None:
    """Refuse an output that is the source, lies inside it, or holds files (without overwrite)."""
    out, src = os.path.realpath(output), os.path.realpath(source)
    if out == src or out.startswith(src + os.sep) or src.startswith(out + os.sep):
        raise ConversionError(f"--output {output} overlaps the source {source}; pick another folder")
    if os.path.exists(output) and not os.path.isdir(output):
        raise ConversionError(f"--output {output} exists and is not a folder")
    if os.path.isdir(output) and os.listdir(output) and not overwrite:
        raise ConversionError(
            f"--output {output} is not empty; pass --overwrite to replace it (it is swapped out "
            "only once the new conversion is complete)"
        )


def check_layout(flags: dict, family: Family, tp: int, ep: int) -> None:
    """Refuse TP/EP sizes that do not divide the heads, query groups or experts (`flags`:
    the model's `Family.megatron_flags`)."""
    divides = [
        ("--target-tensor-parallel-size", tp, "num_attention_heads", flags["num-attention-heads"]),
        ("--target-tensor-parallel-size", tp, "num_key_value_heads",
         flags.get("num-query-groups", flags["num-attention-heads"])),
        ("--target-expert-parallel-size", ep, "number of experts", flags["num-experts"]),
    ]
    if flags.get("qk-layernorm-across-heads") and tp > 1:
        raise ConversionError(
            f"--target-tensor-parallel-size {tp}: {family.name}'s query/key norm spans all heads, "
            "which Megatron cannot split over tensor-parallel ranks; use 1 (expert parallelism works)"
        )
    for flag, size, what, count in divides:
        if count % size:
            raise ConversionError(f"{flag} {size} does not divide the {what} ({count})")


def check_hf_tensors(reader, expected: set[str], folder: str, ignored=lambda name: False) -> None:
    """The folder holds exactly the tensors the config implies: none missing, none unexplained."""
    present = {n for n in reader.names() if not n.endswith(IGNORED_HF_TENSORS) and not ignored(n)}
    missing, extra = sorted(expected - present), sorted(present - expected)
    if missing:
        raise ConversionError(
            f"--hf-path {folder}: {len(missing)} tensors the config needs are missing, e.g. "
            f"{missing[:3]} (partial download, or config.json does not match the weights)"
        )
    if extra:
        raise ConversionError(
            f"--hf-path {folder}: {len(extra)} tensors are not part of the model config.json "
            f"describes, e.g. {extra[:3]} (mismatched config, or an unsupported option)"
        )


def load_hf_config(folder: str, flag: str):
    """The Hugging Face config in `folder` (given by `flag`); a `ConversionError` naming its
    config.json when it is missing, not JSON, or not a config transformers knows."""
    path = os.path.join(folder, "config.json")
    if not os.path.isdir(folder):
        raise ConversionError(f"{flag} {folder}: no such folder")
    if not os.path.isfile(path):
        raise ConversionError(f"{flag} {folder}: no config.json there")
    try:
        with open(path, encoding="utf-8") as f:
            json.load(f)  # transformers' own message for bad JSON does not say what is wrong
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConversionError(f"{flag} {folder}: {path} is not valid JSON ({error})") from None
    try:
        return AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as error:  # what transformers raises for a file it cannot use
        message = " ".join(str(error).split())
        raise ConversionError(f"{flag} {folder}: transformers cannot read {path} "
                              f"({type(error).__name__}: {message})") from None


def padded_vocab(vocab_size: int, tp: int) -> int:
    multiple = MAKE_VOCAB_DIVISIBLE_BY * tp
    return -(-vocab_size // multiple) * multiple


# ---------------------------------------------------------------------- staging ------------
def _staging_dir(output: str) -> str:
    parent = os.path.dirname(os.path.abspath(output))
    os.makedirs(parent, exist_ok=True)
    return mkdtemp_like_mkdir(prefix=f".{os.path.basename(os.path.abspath(output))}.converting-", dir=parent)


def _publish(staging: str, output: str) -> None:
    """Move the finished `staging` folder to `output`, replacing what was there only now."""
    retired = None
    if os.path.exists(output):
        retired = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(output))}.old-",
                                   dir=os.path.dirname(os.path.abspath(output)))
        os.rmdir(retired)
        os.replace(output, retired)
    os.replace(staging, output)
    if retired:
        shutil.rmtree(retired)


def _staged(output: str, build) -> None:
    staging = _staging_dir(output)
    try:
        build(staging)
        _publish(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


# ---------------------------------------------------------------------- HF -> Megatron -----
def hf_to_megatron(settings: HFToMegatron) -> None:
    """Write the HF model in `settings.hf_path` as a Megatron release checkpoint in `output`."""
    settings.validate()
    config = load_hf_config(settings.hf_path, "--hf-path")
    family = family_for(config)
    tp, ep = settings.target_tensor_parallel_size, settings.target_expert_parallel_size
    flags = family.megatron_flags(config)
    check_layout(flags, family, tp, ep)
    vocab = padded_vocab(config.vocab_size, tp)
    rules = family.rules(config, vocab)
    reader = hf_files.SafetensorsReader(settings.hf_path)
    check_hf_tensors(reader, {n for rule in rules for n in rule.hf}, settings.hf_path,
                     ignored=lambda name: family.ignores(config, name))
    flags.update({"tensor-model-parallel-size": tp, "expert-model-parallel-size": ep,
                  "make-vocab-size-divisible-by": MAKE_VOCAB_DIVISIBLE_BY})

    def build(staging: str) -> None:
        argv = flags_argv(flags) + [
            "--save", staging, "--ckpt-format", "torch_dist", "--no-save-optim", "--no-save-rng",
            "--micro-batch-size", "1", "--save-interval", "1",
        ]
        run_gloo(_hf_to_megatron_rank, world_size=tp * ep, tp=tp, ep=ep,
                 args=(argv, vocab, settings.hf_path, family.name), timeout=24 * 3600)
        hf_dir = os.path.join(staging, HF_SUBDIR)
        os.makedirs(hf_dir)
        hf_files.copy_side_files(settings.hf_path, hf_dir)
        _write_model_flags(staging, settings.output, flags, hf_files.has_tokenizer(hf_dir))

    _staged(settings.output, build)


def _hf_to_megatron_rank(rank: int, argv, vocab: int, hf_path: str, family_name: str) -> None:
    config = load_hf_config(hf_path, "--hf-path")
    rules = {rule.megatron: rule for rule in FAMILIES[config.model_type].rules(config, vocab)}
    args = build_args(argv)
    args.padded_vocab_size = vocab
    reader = hf_files.SafetensorsReader(hf_path)
    with megatron_globals(args):
        model = build_model(args)
        count = len(megatron_side.weights(model))
        # Progress on rank 0 only, and only on a terminal (None): logs and pipes get the result lines.
        with tqdm(total=count, desc=f"{family_name} -> megatron", disable=None if rank == 0 else True) as bar:
            megatron_side.fill_from_hf(model, rules, reader, args.swiglu, progress=bar)
        megatron_side.save_release(model)


def _write_model_flags(staging: str, output: str, flags: dict, tokenizer: bool) -> None:
    """`model.yaml`: the model's Megatron flags, for `pretrain_gpt_emoe.py --config`."""
    mapping = {name: value for name, value in flags.items() if value is not False and value is not None}
    if tokenizer:
        mapping["tokenizer-type"] = "HuggingFaceTokenizer"
        mapping["tokenizer-model"] = os.path.join(os.path.abspath(output), HF_SUBDIR)
    header = ("# Megatron flags of the converted model: pass with --config, then --finetune --load "
              f"{os.path.abspath(output)}\n")
    with open(os.path.join(staging, MODEL_FLAGS), "w", encoding="utf-8") as f:
        f.write(header + yaml.safe_dump(mapping, sort_keys=False))


# ---------------------------------------------------------------------- Megatron -> HF -----
def megatron_to_hf(settings: MegatronToHF) -> None:
    """Write the Megatron checkpoint in `settings.load` as an HF folder in `settings.output`."""
    settings.validate()
    saved = saved_args(settings.load)
    config_dir = settings.hf_config or os.path.join(settings.load, HF_SUBDIR)
    if not os.path.isdir(config_dir):
        raise ConversionError(
            f"--load {settings.load} holds no '{HF_SUBDIR}/' config (it was not made by "
            "hf-to-megatron): pass --hf-config with the Hugging Face folder of the base model"
        )
    config = load_hf_config(config_dir, "--hf-config")
    family = family_for(config)
    flags = family.megatron_flags(config)
    check_config_matches(flags, saved)
    if settings.num_experts_per_tok is not None:
        experts = flags["num-experts"]
        if not 1 <= settings.num_experts_per_tok <= experts:
            raise ConversionError(
                f"--num-experts-per-tok must be in 1..{experts}, got {settings.num_experts_per_tok}"
            )
        config.num_experts_per_tok = settings.num_experts_per_tok
    if saved.padded_vocab_size < config.vocab_size:
        raise ConversionError(
            f"the checkpoint has {saved.padded_vocab_size} vocabulary rows, fewer than the "
            f"config's vocab_size {config.vocab_size}"
        )

    def build(staging: str) -> None:
        run_gloo(_megatron_to_hf_rank, world_size=1,
                 args=(saved, settings.load, config, staging, settings.max_shard_size_mb * 2**20),
                 timeout=24 * 3600)
        hf_files.copy_side_files(config_dir, staging, [n for n in hf_files.SIDE_FILES if n != "config.json"])
        config.save_pretrained(staging)

    _staged(settings.output, build)


def _megatron_to_hf_rank(rank: int, saved, load_dir: str, config, staging: str, shard_bytes: int) -> None:
    args = args_from_checkpoint(saved, load_dir)
    rules = FAMILIES[config.model_type].rules(config, args.padded_vocab_size)
    with megatron_globals(args):
        model = build_model(args)
        load(model)
        state = megatron_side.weights(model)
        unmapped = set(state) - {rule.megatron for rule in rules}
        if unmapped:
            raise ConversionError(f"Megatron parameters with no Hugging Face name: {sorted(unmapped)[:5]}")
        writer = hf_files.ShardWriter(staging, shard_bytes)
        for rule in tqdm(rules, desc="megatron -> hf", disable=None):
            for name, tensor in zip(rule.hf, rule.to_hf(state[rule.megatron].detach())):
                writer.add(name, tensor)
        writer.close()


def saved_args(load: str):
    """The flags saved with the checkpoint in `load`, or a `ConversionError` saying what is
    missing; a broken tracker or a partial or corrupt checkpoint is a `UsageError` naming the file
    (`checkpoints.checked_checkpoint`)."""
    if not os.path.isdir(load):
        raise ConversionError(f"--load {load}: no such folder")
    name = checkpoints.checked_checkpoint(load, "--load")
    if name is None:
        raise ConversionError(f"--load {load}: no {checkpoints.TRACKER} (not a Megatron checkpoint folder)")
    folder = os.path.join(load, name)
    if not os.path.isfile(os.path.join(folder, "metadata.json")) or not os.path.isfile(
        os.path.join(folder, ".metadata")
    ):
        raise ConversionError(
            f"--load {load}: {name}/ is missing or partial (no torch_dist metadata); only complete "
            "torch_dist checkpoints convert"
        )
    args = checkpoint_args(load, "--load", name=name)
    if args is None:
        raise ConversionError(f"--load {load}: the checkpoint saved no training args")
    return args


# Megatron flag (dest name) -> key in `Family.megatron_flags`, compared between checkpoint and config.
_ARCHITECTURE = {
    "num_layers": "num-layers",
    "hidden_size": "hidden-size",
    "num_attention_heads": "num-attention-heads",
    "num_query_groups": "num-query-groups",
    "kv_channels": "kv-channels",
    "num_experts": "num-experts",
    "moe_ffn_hidden_size": "moe-ffn-hidden-size",
    "moe_shared_expert_intermediate_size": "moe-shared-expert-intermediate-size",
    "qk_layernorm": "qk-layernorm",
    "add_qkv_bias": "add-qkv-bias",
}


def check_config_matches(flags: dict, saved) -> None:
    """Refuse an HF config (its `Family.megatron_flags`) whose architecture differs from the
    checkpoint's saved flags."""
    diffs = []
    for dest, key in _ARCHITECTURE.items():
        if key not in flags:
            continue
        ours, theirs = flags[key], getattr(saved, dest, None)
        if dest == "num_query_groups" and not getattr(saved, "group_query_attention", False):
            theirs = saved.num_attention_heads
        if bool(ours) != bool(theirs) if isinstance(ours, bool) else ours != theirs:
            diffs.append(f"{dest}: checkpoint {theirs}, config {ours}")
    if diffs:
        raise ConversionError("--hf-config does not describe this checkpoint: " + "; ".join(diffs))


