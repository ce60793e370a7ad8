"""HF <-> Megatron conversion against the real transformers classes and Megatron's checkpointing.

Tiny random fp32 models of each family. Tolerances: logits agree to 1e-4 (max abs, fp32);
round trips are bitwise; the same Megatron checkpoint at two layouts agrees to 1e-5.
"""

from __future__ import annotations

import hashlib
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_emoe.conversion import tensors
from megatron_emoe.conversion.convert import HFToMegatron, MegatronToHF, hf_to_megatron, megatron_to_hf
from megatron_emoe.conversion.families import ConversionError
from tests.conversion_models import hf_logits, megatron_logits, save_hf_model, tokens
from tests.training_runs import usage_error
from megatron_emoe.cli.convert_checkpoint import main as convert_main

FAMILIES = ["qwen2_moe", "qwen3_moe", "olmoe", "mixtral", "deepseek_v2", "deepseek_v3"]
LOGITS_TOLERANCE = 1e-4
LAYOUT_TOLERANCE = 1e-5


def all_tensors(folder: str) -> dict[str, torch.Tensor]:
    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(folder, name)))
    return out


def tree_digest(folder) -> str:
    digest = hashlib.sha256()
    for root, _, files in sorted(os.walk(folder)):
        for name in sorted(files):
            path = os.path.join(root, name)
            digest.update(os.path.relpath(path, folder).encode())
            with open(path, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()


@pytest.fixture(scope="module", params=FAMILIES)
def converted(request, tmp_path_factory):
    """(family, HF folder, Megatron checkpoint made from it)."""
    root = tmp_path_factory.mktemp(request.param)
    hf = save_hf_model(request.param, str(root / "hf"))
    hf_to_megatron(HFToMegatron(hf_path=hf, output=str(root / "megatron")))
    return request.param, hf, str(root / "megatron")


# ---------------------------------------------------------------------- pure re-layouts ----
def test_qkv_and_fc1_relayouts_invert():
    q, k, v = torch.randn(8 * 4, 6), torch.randn(2 * 4, 6), torch.randn(2 * 4, 6)
    packed = tensors.pack_qkv(q, k, v, num_query_groups=2)
    # group 0 holds query heads 0..3 then its key and value head
    assert torch.equal(packed[: 4 * 4], q[: 4 * 4]) and torch.equal(packed[16:20], k[:4])
    for got, want in zip(tensors.unpack_qkv(packed, 2, 4, 4), (q, k, v)):
        assert torch.equal(got, want)
    gate, up = torch.randn(4, 3), torch.randn(4, 3)
    fc1 = tensors.pack_gated_fc1(gate, up)
    shard = tensors.tensor_parallel_shard(fc1, 0, rank=1, size=2, gated=True)
    assert torch.equal(shard, torch.cat([gate[2:], up[2:]]))
    assert all(torch.equal(a, b) for a, b in zip(tensors.unpack_gated_fc1(fc1), (gate, up)))


# ---------------------------------------------------------------------- exactness ----------
@pytest.mark.parametrize("k", [2, 4], ids=["k", "2k"])
def test_logits_match_transformers(converted, k):
    """The converted model computes the HF model's logits, at its own k and at k' = 2k."""
    _, hf, megatron = converted
    ids = tokens()
    expected, got = hf_logits(hf, ids, k), megatron_logits(megatron, ids, k)
    assert (expected - got).abs().max().item() <= LOGITS_TOLERANCE


def test_round_trip_is_bitwise(converted, tmp_path):
    family, hf, megatron = converted
    back = str(tmp_path / "back")
    megatron_to_hf(MegatronToHF(load=megatron, output=back))
    original, returned = all_tensors(hf), all_tensors(back)
    assert sorted(original) == sorted(returned)
    for name, tensor in original.items():
        assert torch.equal(tensor, returned[name]), name
    assert hf_logits(back, tokens()).shape[-1] == hf_logits(hf, tokens()).shape[-1]


def test_serving_budget_written_to_config(converted, tmp_path):
    from transformers import AutoConfig

    _, _, megatron = converted
    megatron_to_hf(MegatronToHF(load=megatron, output=str(tmp_path / "k4"), num_experts_per_tok=4))
    assert AutoConfig.from_pretrained(str(tmp_path / "k4")).num_experts_per_tok == 4


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3"])
def test_expert_parallel_checkpoint_through_hf_to_single_rank(tmp_path, family):
    """Megatron at EP=2 (2 gloo ranks) -> HF -> Megatron at EP=1: the same logits."""
    hf = save_hf_model(family, str(tmp_path / "hf"), seed=1)
    ep2 = str(tmp_path / "ep2")
    assert convert_main(["hf-to-megatron", "--hf-path", hf, "--output", ep2,
                         "--target-expert-parallel-size", "2"]) == 0
    assert convert_main(["megatron-to-hf", "--load", ep2, "--output", str(tmp_path / "hf2")]) == 0
    hf_to_megatron(HFToMegatron(hf_path=str(tmp_path / "hf2"), output=str(tmp_path / "ep1")))
    ids = tokens(seed=3)
    for k in (2, 4):
        at_ep2 = megatron_logits(ep2, ids, k, ep=2)
        at_ep1 = megatron_logits(str(tmp_path / "ep1"), ids, k)
        assert (at_ep2 - at_ep1).abs().max().item() <= LAYOUT_TOLERANCE
        assert (at_ep1 - hf_logits(hf, ids, k)).abs().max().item() <= LOGITS_TOLERANCE


@pytest.mark.slow
def test_resharding_between_tensor_and_expert_parallel_layouts(tmp_path):
    """A checkpoint written at TP=2 loads at EP=2, TP=2 and TP=1 through dist_checkpointing."""
    hf = save_hf_model("qwen3_moe", str(tmp_path / "hf"), seed=2)
    tp2 = str(tmp_path / "tp2")
    hf_to_megatron(HFToMegatron(hf_path=hf, output=tp2, target_tensor_parallel_size=2))
    ids = tokens(seed=4)
    reference = megatron_logits(tp2, ids)
    assert (reference - hf_logits(hf, ids)).abs().max().item() <= LOGITS_TOLERANCE
    for layout in ({"tp": 2}, {"ep": 2}):
        assert (megatron_logits(tp2, ids, **layout) - reference).abs().max().item() <= LAYOUT_TOLERANCE


# ---------------------------------------------------------------------- bad input ----------
@pytest.fixture(scope="module")
def small_hf(tmp_path_factory):
    return save_hf_model("qwen3_moe", str(tmp_path_factory.mktemp("small") / "hf"))


@pytest.fixture(scope="module")
def small_megatron(small_hf, tmp_path_factory):
    output = str(tmp_path_factory.mktemp("small") / "megatron")
    hf_to_megatron(HFToMegatron(hf_path=small_hf, output=output))
    return output


def refused(argv, capsys) -> str:
    return usage_error(convert_main, argv, capsys)


def test_missing_and_partial_hf_folders_are_refused(small_hf, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert "no such folder" in refused(["hf-to-megatron", "--hf-path", str(tmp_path / "nope"),
                                        "--output", out], capsys)
    partial = str(tmp_path / "partial")
    shutil.copytree(small_hf, partial)
    weights = load_file(os.path.join(partial, "model.safetensors"))
    del weights["model.layers.1.mlp.experts.3.up_proj.weight"]
    save_file(weights, os.path.join(partial, "model.safetensors"))
    assert "missing" in refused(["hf-to-megatron", "--hf-path", partial, "--output", out], capsys)
    os.remove(os.path.join(partial, "config.json"))
    assert "no config.json" in refused(["hf-to-megatron", "--hf-path", partial, "--output", out], capsys)
    assert not os.path.exists(out)


def test_mismatched_config_and_unsupported_options_are_refused(small_hf, tmp_path, capsys):
    from transformers import AutoConfig

    out = str(tmp_path / "out")
    for change, expected in [({"num_experts": 16}, "missing"),
                             ({"hidden_act": "gelu"}, "hidden_act"),
                             ({"hidden_size": 64, "head_dim": 16}, "shape")]:
        folder = str(tmp_path / f"bad-{len(os.listdir(tmp_path))}")
        shutil.copytree(small_hf, folder)
        config = AutoConfig.from_pretrained(folder)
        for key, value in change.items():
            setattr(config, key, value)
        config.save_pretrained(folder)
        assert expected in refused(["hf-to-megatron", "--hf-path", folder, "--output", out], capsys)
        assert not os.path.exists(out)


def test_unsupported_architecture_is_named(tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=32)).save_pretrained(tmp_path / "llama")
    capsys.readouterr()  # save_pretrained's progress bar, not the tool's
    err = refused(["hf-to-megatron", "--hf-path", str(tmp_path / "llama"), "--output", str(tmp_path / "o")], capsys)
    assert "model_type='llama'" in err and "qwen3_moe" in err


@pytest.mark.parametrize("flag,size,what", [
    ("--target-expert-parallel-size", "3", "experts"),
    ("--target-tensor-parallel-size", "3", "num_attention_heads"),
    ("--target-tensor-parallel-size", "4", "num_key_value_heads"),
    ("--target-tensor-parallel-size", "0", ">= 1"),
])
def test_layouts_that_do_not_divide_are_refused(small_hf, tmp_path, capsys, flag, size, what):
    err = refused(["hf-to-megatron", "--hf-path", small_hf, "--output", str(tmp_path / "o"), flag, size], capsys)
    assert flag in err and what in err


def test_output_folder_gets_ordinary_permissions(small_megatron):
    # mkdtemp stages at 0700; the published folder must have what mkdir gives (umask applied).
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(small_megatron).st_mode & 0o777 == 0o777 & ~umask


def test_existing_output_needs_overwrite_and_survives_a_failed_conversion(small_hf, tmp_path, capsys):
    hf = small_hf
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    source_digest = tree_digest(hf)
    assert "--overwrite" in refused(["hf-to-megatron", "--hf-path", hf, "--output", str(out)], capsys)
    # A conversion that fails half-way (weights disagree with the config) leaves the output as it was.
    broken = str(tmp_path / "broken")
    shutil.copytree(hf, broken)
    weights = load_file(os.path.join(broken, "model.safetensors"))
    weights["model.norm.weight"] = torch.ones(7)
    save_file(weights, os.path.join(broken, "model.safetensors"))
    assert "disagree" in refused(["hf-to-megatron", "--hf-path", broken, "--output", str(out), "--overwrite"], capsys)
    assert (out / "keep.txt").read_text() == "precious"
    assert [p for p in os.listdir(tmp_path) if p.startswith(".out")] == []
    # With --overwrite a complete conversion replaces it; the source is never touched.
    assert convert_main(["hf-to-megatron", "--hf-path", hf, "--output", str(out), "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "release").is_dir()
    assert tree_digest(hf) == source_digest


def test_bad_megatron_inputs_are_refused(small_hf, small_megatron, tmp_path, capsys):
    hf, megatron = small_hf, small_megatron
    out = str(tmp_path / "out")
    digest = tree_digest(megatron)
    assert "no such folder" in refused(["megatron-to-hf", "--load", str(tmp_path / "x"), "--output", out], capsys)
    assert "latest_checkpointed_iteration" in refused(["megatron-to-hf", "--load", hf, "--output", out], capsys)
    assert "1..8" in refused(["megatron-to-hf", "--load", megatron, "--output", out,
                              "--num-experts-per-tok", "9"], capsys)
    other = save_hf_model("qwen3_moe", str(tmp_path / "other"), hidden_size=64)
    capsys.readouterr()  # save_pretrained's progress bar, not the tool's
    err = refused(["megatron-to-hf", "--load", megatron, "--output", out, "--hf-config", other], capsys)
    assert "hidden_size" in err or "model_type" in err
    partial = str(tmp_path / "partial")
    shutil.copytree(megatron, partial)
    os.remove(os.path.join(partial, "release", ".metadata"))
    assert "partial" in refused(["megatron-to-hf", "--load", partial, "--output", out], capsys)
    assert not os.path.exists(out) and tree_digest(megatron) == digest


def _truncate(path: str, fraction: float = 0.5) -> None:
    with open(path, "r+b") as f:
        f.truncate(int(os.path.getsize(path) * fraction))


# Damage written as text: file of the HF folder -> (open mode, text).
_TEXT_DAMAGE = {
    "config_not_json": ("config.json", "a", "}{"),
    "config_unknown_model_type": ("config.json", "w", '{"model_type": "no_such_model"}'),
    "index_not_json": ("model.safetensors.index.json", "w", '{"weight_map": '),
    "index_without_weight_map": ("model.safetensors.index.json", "w", '{"metadata": {}}'),
    "index_names_missing_shard": ("model.safetensors.index.json", "w",
                                  '{"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}'),
}


@pytest.mark.parametrize("damage,named", [
    ("truncated", ["model.safetensors", "truncated or corrupt"]),
    ("header_garbled", ["model.safetensors", "truncated or corrupt"]),
    ("config_not_json", ["config.json", "not valid JSON"]),
    ("config_unknown_model_type", ["config.json", "transformers cannot read", "no_such_model"]),
    ("index_not_json", ["model.safetensors.index.json", "not a valid index"]),
    ("index_without_weight_map", ["model.safetensors.index.json", "no 'weight_map'"]),
    ("index_names_missing_shard", ["model-00002-of-00002.safetensors", "missing"]),
])
def test_corrupt_hf_files_are_refused_naming_them(small_hf, tmp_path, capsys, damage, named):
    folder = str(tmp_path / "hf")
    shutil.copytree(small_hf, folder)
    weights = os.path.join(folder, "model.safetensors")
    if damage == "truncated":
        _truncate(weights, 0.6)
    elif damage == "header_garbled":
        with open(weights, "r+b") as f:
            f.seek(8)
            f.write(b"\xff" * 16)
    else:
        name, mode, text = _TEXT_DAMAGE[damage]
        with open(os.path.join(folder, name), mode, encoding="utf-8") as f:
            f.write(text)
    err = refused(["hf-to-megatron", "--hf-path", folder, "--output", str(tmp_path / "out")], capsys)
    assert "--hf-path" in err and all(fragment in err for fragment in named), err
    assert not os.path.exists(tmp_path / "out")


def test_corrupt_release_checkpoint_is_refused_naming_the_file(small_megatron, tmp_path, capsys):
    out = str(tmp_path / "out")
    for damage in ("tracker", "distcp", "weights"):
        load = str(tmp_path / damage)
        shutil.copytree(small_megatron, load)
        release = os.path.join(load, "release")
        if damage == "tracker":
            with open(os.path.join(load, "latest_checkpointed_iteration.txt"), "w") as f:
                f.write("relase")
            named = ["latest_checkpointed_iteration.txt", "'relase'"]
        elif damage == "distcp":
            shard = sorted(n for n in os.listdir(release) if n.endswith(".distcp"))[0]
            _truncate(os.path.join(release, shard))
            named = [".distcp is truncated"]
        else:  # same size, garbled bytes: found where the weights load
            from torch.distributed.checkpoint import FileSystemReader

            storage = FileSystemReader(release).read_metadata().storage_data
            info = next(v for k, v in sorted(storage.items(), key=lambda kv: kv[0].fqn)
                        if k.fqn.startswith("embedding.word_embeddings.weight"))
            with open(os.path.join(release, info.relative_path), "r+b") as f:
                f.seek(info.offset)
                f.write(b"\x00" * info.length)
            named = ["release", "corrupt"]
        err = refused(["megatron-to-hf", "--load", load, "--output", out], capsys)
        assert f"--load {load}" in err and all(fragment in err for fragment in named), err
        assert not os.path.exists(out)


# ---------------------------------------------------------------------- with training -----
@pytest.mark.slow
def test_converted_model_finetunes_with_emoe_and_serves_from_hf(tmp_path):
    """hf-to-megatron -> the training entry (--finetune, EMoE, EP=2) -> megatron-to-hf -> transformers.

    The entry keeps the checkpoint's embedding rows and its `hf/` folder, so nothing else is needed.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_emoe.data.default_data import ensure_default_data
    from tests.training_runs import run_training

    data = ensure_default_data(tmp_path / "data", corpus_bytes=300_000, vocab_size=512)
    # 520 vocabulary rows for a 512-token tokenizer, as with Qwen's padded embeddings
    hf = save_hf_model("qwen3_moe", str(tmp_path / "hf"), vocab_size=520)
    for name in os.listdir(data["tokenizer_model"]):  # the model ships with its tokenizer
        shutil.copy(os.path.join(data["tokenizer_model"], name), hf)
    megatron = str(tmp_path / "megatron")
    hf_to_megatron(HFToMegatron(hf_path=hf, output=megatron, target_expert_parallel_size=2))
    code, out = run_training(
        ["--config", os.path.join(megatron, "model.yaml"), "--finetune", "--load", megatron,
         "--save", str(tmp_path / "sft"), "--save-interval", "1000", "--train-iters", "3",
         "--moe-router-mode", "emoe", "--emoe-k-ideal", "4", "--emoe-hr-loss-coeff", "1e-3",
         "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "1e-3", "--lr-warmup-iters", "0",
         "--eval-iters", "1", "--eval-interval", "1000", "--log-interval", "1",
         "--train-data-path", data["pretrain_train"], "--valid-data-path", data["pretrain_valid"]],
        tmp_path / "sft.log")
    assert code == 0, out[-3000:]
    assert "successfully loaded checkpoint" in out
    served = str(tmp_path / "served")
    assert (tmp_path / "sft" / "hf" / "config.json").is_file()  # carried over by the entry
    megatron_to_hf(MegatronToHF(load=str(tmp_path / "sft"), output=served, num_experts_per_tok=4))
    model = AutoModelForCausalLM.from_pretrained(served)
    assert AutoTokenizer.from_pretrained(served).vocab_size == 512  # tokenizer-model from model.yaml
    assert model.config.num_experts_per_tok == 4
    trained, original = all_tensors(served), all_tensors(hf)
    assert sorted(trained) == sorted(original)
    assert any(not torch.equal(trained[n], original[n]) for n in original)  # it did train
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=tokens()).logits).all()


def test_olmoe_refuses_tensor_parallel_targets(tmp_path, capsys):
    hf = save_hf_model("olmoe", str(tmp_path / "olmoe"))
    capsys.readouterr()  # save_pretrained's progress bar, not the tool's
    err = refused(["hf-to-megatron", "--hf-path", hf, "--output", str(tmp_path / "o"),
                   "--target-tensor-parallel-size", "2"], capsys)
    assert "--target-tensor-parallel-size 2" in err and "all heads" in err


@pytest.mark.parametrize("family,change,named", [
    ("deepseek_v2", {"n_group": 4, "topk_group": 1}, "group_limited_greedy"),
    ("deepseek_v3", {"norm_topk_prob": False}, "norm_topk_prob"),
    ("deepseek_v3", {"n_group": 4, "topk_group": 2, "num_experts_per_tok": 2}, "top-2"),
    ("deepseek_v3", {"rms_norm_eps": 1e-5}, "rms_norm_eps"),
    ("qwen3_moe", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}, "rope"),
])
def test_configs_megatron_cannot_reproduce_are_refused(family, change, named):
    from megatron_emoe.conversion.families import family_for
    from tests.conversion_models import hf_config

    with pytest.raises(ConversionError, match=named):
        family_for(hf_config(family, **change))
