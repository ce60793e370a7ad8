"""Data tools: preprocessing round trips, SFT loss masks, PackedSFTDataset packing, checks, default data.

Every test builds its own tiny byte-level BPE tokenizer and corpus in tmp dirs; expected values are
computed independently (tokenizer.encode / decode, and GPTDataset's packing rule: sample s covers
tokens [s*L, s*L + L] of the concatenation of the documents in `document_index` order).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import re

import numpy
import pytest
import torch

from megatron_emoe.data.bpe import SPECIAL_TOKENS, train_bpe_tokenizer
from megatron_emoe.data.preprocess import PreprocessConfig, preprocess
from tests.training_runs import usage_error

EOS = "<|endoftext|>"
TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog. Ünïcödé too.\n\nSecond paragraph here.",
    "import os\nprint(os.path.join('a', 'b'))\n",
    "x = [i * i for i in range(10)]  # squares",
]
TRAIN_TEXT = TEXTS * 20 + [
    "user assistant system question answer response output instruction problem solution",
    "Return the sum of two numbers. Write the docstring of a function.",
]


# ---------------------------------------------------------------------------------------------
# Fixtures: a tiny tokenizer, its Megatron wrapper, and helpers to read indexed data back.
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tokenizer")
    train_bpe_tokenizer(TRAIN_TEXT, str(path), vocab_size=320, min_frequency=2)
    return str(path)


@pytest.fixture(scope="module")
def hf(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)


@pytest.fixture(scope="module")
def megatron_tokenizer(tokenizer_dir):
    return megatron_build_tokenizer(tokenizer_dir)


def megatron_build_tokenizer(path: str):
    """The tokenizer Megatron's training builds from --tokenizer-type HuggingFaceTokenizer."""
    from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer

    args = argparse.Namespace(
        tokenizer_type="HuggingFaceTokenizer", tokenizer_model=path, chat_template=None,
        vocab_file=None, merge_file=None, special_tokens=None, tokenizer_hf_no_use_fast=False,
        trust_remote_code=False, tokenizer_hf_no_include_special_tokens=False, metadata_path=None,
        pad_vocab_size=False,
    )
    return build_tokenizer(args)


def preprocess_cli():
    """`main` of the `emoe-preprocess-data` console script."""
    from megatron_emoe.cli.preprocess_data import main

    return main


def cli_error(capsys, main, argv) -> str:
    """The one stderr line of a CLI run that must exit with status 2 (`prog: error: ...`)."""
    return usage_error(main, argv, capsys).rstrip("\n")


def encode(hf, text: str) -> list[int]:
    return hf.encode(text, add_special_tokens=False)


def documents(prefix: str) -> list[list[int]]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)
    docs = [dataset[i].tolist() for i in range(len(dataset))]
    del dataset
    return docs


def gpt_config(tokenizer, prefix: str, cache: Path, sequence_length: int, **overrides):
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    settings = dict(
        random_seed=1234, sequence_length=sequence_length, blend=([prefix], None), split="1,0,0",
        tokenizer=tokenizer, reset_position_ids=False, reset_attention_mask=False,
        eod_mask_loss=False, path_to_cache=str(cache),
    )
    settings.update(overrides)
    return GPTDatasetConfig(**settings)


def build_train(cls, config, num_samples=None):
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )

    train, _, _ = BlendedMegatronDatasetBuilder(cls, [num_samples, None, None], lambda: True, config).build()
    return train


def packed_stream(dataset, docs: list[list[int]]) -> numpy.ndarray:
    """Documents concatenated in the dataset's document_index order (all epochs)."""
    return numpy.concatenate([docs[int(d)] for d in dataset.document_index])


def write_jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def run(tmp_path, tokenizer_dir, inputs, name="out", **kwargs) -> tuple[str, dict]:
    prefix = str(tmp_path / name)
    sidecar = preprocess(PreprocessConfig(
        inputs=[str(p) for p in inputs], output_prefix=prefix, tokenizer_model=tokenizer_dir,
        progress=False, **kwargs,
    ))
    return prefix, sidecar


# ---------------------------------------------------------------------------------------------
# Pretraining text: inputs -> indexed dataset -> GPTDataset gives back the tokenizer's tokens.
# ---------------------------------------------------------------------------------------------
def test_text_round_trip_through_gpt_dataset(tmp_path, tokenizer_dir, hf, megatron_tokenizer):
    from megatron.core.datasets.gpt_dataset import GPTDataset

    for i, text in enumerate(TEXTS):
        (tmp_path / f"doc{i}.txt").write_text(text, encoding="utf-8")
    prefix, sidecar = run(tmp_path, tokenizer_dir, [tmp_path / "doc*.txt"])
    eod = hf.eos_token_id
    expected = [encode(hf, t) + [eod] for t in TEXTS]  # one file = one document, in sorted order
    assert documents(prefix + "_text_document") == expected
    assert sidecar["kind"] == "pretrain" and sidecar["eod"] == eod == megatron_tokenizer.eod
    assert sidecar["vocab_size"] == len(hf) == megatron_tokenizer.vocab_size
    assert sidecar["num_documents"] == 4 and sidecar["num_tokens"] == sum(map(len, expected))
    assert sidecar["dtype"] == "uint16"

    length = 7
    dataset = build_train(GPTDataset, gpt_config(megatron_tokenizer, prefix + "_text_document",
                                                 tmp_path / "cache", length), num_samples=40)
    stream = packed_stream(dataset, expected)
    assert len(dataset) >= 40
    for k in range(len(dataset)):
        s = int(dataset.shuffle_index[k])
        sample = dataset[k]
        assert sample["tokens"].tolist() == stream[s * length : s * length + length].tolist()
        assert sample["labels"].tolist() == stream[s * length + 1 : s * length + length + 1].tolist()
    # The packed stream is the documents, each closed by EOD, so it decodes back to the texts.
    one_epoch = numpy.concatenate(expected)
    assert hf.decode(one_epoch) == EOS.join(TEXTS) + EOS


def test_jsonl_parquet_and_text_inputs_agree(tmp_path, tokenizer_dir, hf):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"text": t, "title": f"title {i}"} for i, t in enumerate(TEXTS)]
    rows.insert(2, {"text": "", "title": "empty text is skipped"})
    write_jsonl(tmp_path / "a.jsonl", rows[:3])
    write_jsonl(tmp_path / "b.jsonl", rows[3:])
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "all.parquet")
    lines = tmp_path / "lines.txt"
    lines.write_text("\n".join(t.replace("\n", " ") for t in TEXTS) + "\n", encoding="utf-8")

    keys = ["text", "title"]
    jsonl, side = run(tmp_path, tokenizer_dir, [tmp_path / "*.jsonl"], "jsonl", json_keys=keys, workers=2)
    parquet, _ = run(tmp_path, tokenizer_dir, [tmp_path / "all.parquet"], "parquet", json_keys=keys)
    text, _ = run(tmp_path, tokenizer_dir, [lines], "text", text_sample_by="line")

    eod = hf.eos_token_id
    for key in keys:
        want = [encode(hf, r[key]) + [eod] for r in rows if r[key]]
        for prefix in (jsonl, parquet):
            assert documents(f"{prefix}_{key}_document") == want
        with open(f"{jsonl}_{key}_document.bin", "rb") as a, open(f"{parquet}_{key}_document.bin", "rb") as b:
            assert a.read() == b.read()
    assert side["datasets"]["text"]["skipped_empty"] == 1
    assert side["datasets"]["title"]["num_documents"] == len(rows)
    assert documents(text + "_text_document") == [encode(hf, t.replace("\n", " ")) + [eod] for t in TEXTS]


def test_no_append_eod(tmp_path, tokenizer_dir, hf):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in TEXTS])
    prefix, _ = run(tmp_path, tokenizer_dir, [path], append_eod=False)
    assert documents(prefix + "_text_document") == [encode(hf, t) for t in TEXTS]


def test_special_token_strings_in_text_stay_text(tmp_path, tokenizer_dir, hf):
    """Raw text that spells `<|endoftext|>` must not inject a real EOD (or role) token."""
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": f"a {EOS} b <|user|> c"}])
    prefix, _ = run(tmp_path, tokenizer_dir, [path])
    (doc,) = documents(prefix + "_text_document")
    special = {hf.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    assert doc[-1] == hf.eos_token_id and not special & set(doc[:-1])
    assert hf.decode(doc[:-1]) == f"a {EOS} b <|user|> c"


# ---------------------------------------------------------------------------------------------
# SFT: loss mask is 1 exactly on response tokens and the EOD closing each response.
# ---------------------------------------------------------------------------------------------
CHATS = [
    [("system", "Be brief."), ("user", "Add 2 and 3."), ("assistant", "5")],
    [("user", "def f(): pass"), ("assistant", "A function that does nothing."),
     ("user", "And import os?"), ("assistant", "It imports the os module.")],
    [("user", "Only a question, then a trailing turn"), ("assistant", ""), ("user", "dropped")],
]


def rendered(turns) -> str:
    """The template, written out as one string (independent of how it is tokenized)."""
    out = ""
    for role, content in turns:
        if role == "assistant":
            out += f"<|assistant|>\n{content}{EOS}"
        else:
            out += f"<|{role}|>\n{content}\n"
    return out


def check_sft_docs(hf, prefix: str, conversations) -> None:
    docs = documents(prefix + "_text_document")
    masks = documents(prefix + "_text_document_lossmask")
    assert len(docs) == len(masks) == len(conversations)
    for ids, mask, turns in zip(docs, masks, conversations):
        ids, mask = numpy.array(ids), numpy.array(mask)
        assert len(ids) == len(mask) and set(mask.tolist()) <= {0, 1}
        last_answer = max(i for i, (role, _) in enumerate(turns) if role == "assistant")
        kept = turns[: last_answer + 1]
        assert hf.decode(ids) == rendered(kept)
        answers = [content + EOS for role, content in kept if role == "assistant"]
        assert hf.decode(ids[mask == 1]) == "".join(answers)
        # Every EOD in a conversation closes a response and carries loss; role tokens never do.
        assert (mask[ids == hf.eos_token_id] == 1).all()
        assert ids[-1] == hf.eos_token_id
        for token in ("<|system|>", "<|user|>", "<|assistant|>"):
            assert (mask[ids == hf.convert_tokens_to_ids(token)] == 0).all()
        # Contiguity: each response is one run of ones ending at its EOD.
        runs = numpy.flatnonzero(numpy.diff(numpy.concatenate([[0], mask, [0]])) == -1)
        assert len(runs) == len(answers)


def test_sft_messages_loss_mask(tmp_path, tokenizer_dir, hf):
    rows = [{"messages": [{"role": r, "content": c} for r, c in turns]} for turns in CHATS]
    sharegpt = [{"conversations": [{"from": {"user": "human", "assistant": "gpt"}.get(r, r), "value": c}
                                   for r, c in turns]} for turns in CHATS]
    prefix, sidecar = run(tmp_path, tokenizer_dir, [write_jsonl(tmp_path / "m.jsonl", rows)], "m", sft=True)
    check_sft_docs(hf, prefix, CHATS)
    assert sidecar["kind"] == "sft"
    assert sidecar["datasets"]["text"]["num_loss_tokens"] == sum(
        len(encode(hf, c)) + 1 for turns in CHATS for r, c in turns if r == "assistant"
    )
    other, _ = run(tmp_path, tokenizer_dir, [write_jsonl(tmp_path / "s.jsonl", sharegpt)], "s", sft=True)
    assert documents(other + "_text_document") == documents(prefix + "_text_document")


@pytest.mark.parametrize(
    "rows, kwargs, conversations",
    [
        (  # Alpaca / SlimOrca style: instruction (+ input) / output
            [{"instruction": "Sum", "input": "2 and 3", "output": "5"},
             {"instruction": "Say hi", "input": "", "output": "hi"}],
            {},
            [[("user", "Sum\n\n2 and 3"), ("assistant", "5")], [("user", "Say hi"), ("assistant", "hi")]],
        ),
        (  # MetaMath: query / response, with a system column
            [{"query": "What is 2+2?", "response": "4", "system": "Be exact."}],
            {},
            [[("system", "Be exact."), ("user", "What is 2+2?"), ("assistant", "4")]],
        ),
        (  # Magicoder OSS-Instruct: problem / solution
            [{"problem": "Write add.", "solution": "def add(a, b):\n    return a + b\n", "lang": "py"}],
            {},
            [[("user", "Write add."), ("assistant", "def add(a, b):\n    return a + b\n")]],
        ),
        (  # explicit keys
            [{"q": "Name a fox.", "a": "The quick brown fox.", "instruction": "ignored"}],
            {"prompt_key": "q", "response_key": "a"},
            [[("user", "Name a fox."), ("assistant", "The quick brown fox.")]],
        ),
    ],
    ids=["alpaca", "metamath", "magicoder", "explicit"],
)
def test_sft_prompt_response_loss_mask(tmp_path, tokenizer_dir, hf, rows, kwargs, conversations):
    prefix, _ = run(tmp_path, tokenizer_dir, [write_jsonl(tmp_path / "p.jsonl", rows)], sft=True, **kwargs)
    check_sft_docs(hf, prefix, conversations)


def test_sft_parquet_matches_jsonl(tmp_path, tokenizer_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"messages": [{"role": r, "content": c} for r, c in turns]} for turns in CHATS]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "m.parquet")
    a, _ = run(tmp_path, tokenizer_dir, [write_jsonl(tmp_path / "m.jsonl", rows)], "a", sft=True)
    b, _ = run(tmp_path, tokenizer_dir, [tmp_path / "m.parquet"], "b", sft=True, workers=2)
    for suffix in ("_text_document", "_text_document_lossmask"):
        assert documents(a + suffix) == documents(b + suffix)


@pytest.mark.parametrize("eod_mask_loss, extra_token", [(False, True), (True, True), (False, False)])
def test_packed_sft_dataset_mask_aligns_with_labels(
    tmp_path, tokenizer_dir, hf, megatron_tokenizer, eod_mask_loss, extra_token
):
    from megatron.core.datasets.gpt_dataset import GPTDataset

    from megatron_emoe.data.sft import PackedSFTDataset

    rows = [{"messages": [{"role": r, "content": c} for r, c in turns]} for turns in CHATS * 3]
    rows += [{"query": f"What is {i}+{i}?", "response": str(2 * i)} for i in range(5)]
    path = write_jsonl(tmp_path / "m.jsonl", rows[: len(CHATS) * 3])
    prefix, _ = run(tmp_path, tokenizer_dir, [path], sft=True)
    data = prefix + "_text_document"
    docs, masks = documents(data), documents(data + "_lossmask")

    length, eod = 11, hf.eos_token_id
    config = gpt_config(megatron_tokenizer, data, tmp_path / "cache", length,
                        eod_mask_loss=eod_mask_loss, add_extra_token_to_sequence=extra_token)
    sft = build_train(PackedSFTDataset, config, num_samples=30)
    gpt = build_train(GPTDataset, config, num_samples=30)
    assert len(sft) == len(gpt) >= 30
    assert numpy.array_equal(sft.document_index, gpt.document_index)
    assert numpy.array_equal(sft.sample_index, gpt.sample_index)

    tokens_stream = packed_stream(sft, docs)
    response_stream = packed_stream(sft, masks)
    total_response = 0
    for k in range(len(sft)):
        s = int(sft.shuffle_index[k])
        sample, plain = sft[k], gpt[k]
        assert sample.keys() == plain.keys()
        start = s * length
        want_tokens = tokens_stream[start : start + length]
        assert sample["tokens"].tolist() == want_tokens.tolist() == plain["tokens"].tolist()
        if extra_token:
            want_labels = tokens_stream[start + 1 : start + length + 1]
            want_response = response_stream[start + 1 : start + length + 1].astype(numpy.float32)
        else:  # labels are the tokens shifted by one, the last one padding
            want_labels = numpy.append(want_tokens[1:], 0)
            want_response = numpy.append(response_stream[start + 1 : start + length], 0).astype(numpy.float32)
        assert sample["labels"].tolist() == want_labels.tolist()
        if eod_mask_loss:
            want_response = want_response * (want_tokens != eod)
        assert sample["loss_mask"].tolist() == want_response.tolist()
        assert torch.equal(sample["loss_mask"], plain["loss_mask"] * torch.from_numpy(want_response))
        total_response += int(want_response.sum())
        for key in ("position_ids", "attention_mask"):
            assert torch.equal(sample[key], plain[key])
    assert total_response > 0
    assert sft[None]["loss_mask"].sum() == 0  # batch-padding sample carries no loss


def test_packed_sft_dataset_needs_the_loss_mask(tmp_path, tokenizer_dir, megatron_tokenizer):
    from megatron_emoe.data.sft import PackedSFTDataset

    path = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in TEXTS])
    prefix, _ = run(tmp_path, tokenizer_dir, [path])
    config = gpt_config(megatron_tokenizer, prefix + "_text_document", tmp_path / "cache", 8)
    with pytest.raises(ValueError, match=r"--sft-packed: no loss mask .*_lossmask.*emoe-preprocess-data --sft"):
        build_train(PackedSFTDataset, config)


def test_sft_errors(tmp_path, tokenizer_dir):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    unknown = write_jsonl(tmp_path / "u.jsonl", [{"foo": "a", "bar": "b"}])
    with pytest.raises(ValueError, match=r"--sft: cannot find the conversation .*--prompt-key and --response-key"):
        run(tmp_path, tokenizer_dir, [unknown], sft=True)
    with pytest.raises(ValueError, match=r"--prompt-key: column 'nope' is not in the data"):
        run(tmp_path, tokenizer_dir, [unknown], sft=True, prompt_key="nope", response_key="bar")
    with pytest.raises(ValueError, match=r"--prompt-key and --response-key go together"):
        run(tmp_path, tokenizer_dir, [unknown], sft=True, prompt_key="foo")
    bad_role = write_jsonl(tmp_path / "r.jsonl", [{"messages": [{"role": "robot", "content": "x"}]}])
    with pytest.raises(ValueError, match=r"role 'robot' is not one of system, user, assistant"):
        run(tmp_path, tokenizer_dir, [bad_role], sft=True)
    assert not list(tmp_path.glob("out*"))  # nothing written by failed runs

    plain = Tokenizer(models.BPE())
    plain.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    plain.add_special_tokens([EOS])
    PreTrainedTokenizerFast(tokenizer_object=plain, eos_token=EOS).save_pretrained(tmp_path / "plain")
    chats = write_jsonl(tmp_path / "c.jsonl", [{"query": "q", "response": "r"}])
    with pytest.raises(ValueError, match=r"--tokenizer-model: the tokenizer lacks .*<\|user\|>, <\|assistant\|>"):
        run(tmp_path, str(tmp_path / "plain"), [chats], sft=True)


# ---------------------------------------------------------------------------------------------
# Bad input is refused before any work; existing outputs are never replaced without --overwrite.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv, message",
    [
        (["--input", "{tmp}/missing.jsonl"], r"--input: '.*missing.jsonl' is not a file"),
        (["--input", "{tmp}/*.nothing"], r"--input: no file matches"),
        (["--input", "{tmp}/a.csv"], r"--input: cannot tell the format .*--input-format \{jsonl,parquet,text\}"),
        (["--input", "{tmp}/a.jsonl", "{tmp}/a.txt"], r"--input: files of one format only"),
        (["--input", "{tmp}/a.jsonl", "--workers", "0"], r"--workers must be >= 1"),
        (["--input", "{tmp}/a.jsonl", "--tokenizer-model", "{tmp}/nowhere"], r"--tokenizer-model: .* is not a folder"),
        (["--input", "{tmp}/a.jsonl", "--json-keys", "body"], r"--json-keys: body not in the data \(columns: text\)"),
        (["--input", "{tmp}/a.jsonl", "--sft", "--no-append-eod"], r"--no-append-eod: --sft always closes"),
        (["--input", "{tmp}/a.jsonl", "--sft", "--json-keys", "a", "b"], r"--json-keys: --sft writes one dataset"),
        (["--input", "{tmp}/a.txt", "--sft"], r"--sft needs JSONL or Parquet"),
    ],
)
def test_cli_rejects_bad_input(tmp_path, tokenizer_dir, capsys, argv, message):
    main = preprocess_cli()

    write_jsonl(tmp_path / "a.jsonl", [{"text": "hello"}])
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / "a.csv").write_text("text\nhello\n")
    argv = [a.format(tmp=tmp_path) for a in argv]
    if "--tokenizer-model" not in argv:
        argv += ["--tokenizer-model", tokenizer_dir]
    argv += ["--output-prefix", str(tmp_path / "out" / "x"), "--no-progress"]
    line = cli_error(capsys, main, argv)
    assert line.startswith("emoe-preprocess-data: error: ") and re.search(message, line), line
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_cli_input_format_choices(tmp_path, tokenizer_dir, capsys):
    main = preprocess_cli()

    err = cli_error(capsys, main, ["--input", "x", "--input-format", "csv", "--output-prefix", "y",
                                   "--tokenizer-model", tokenizer_dir])
    assert "--input-format: invalid choice: 'csv'" in err and "jsonl" in err and "parquet" in err


def test_existing_output_is_refused_and_left_untouched(tmp_path, tokenizer_dir, hf, capsys):
    main = preprocess_cli()

    first = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in TEXTS])
    second = write_jsonl(tmp_path / "b.jsonl", [{"text": "something else entirely"}])
    argv = ["--output-prefix", str(tmp_path / "out"), "--tokenizer-model", tokenizer_dir, "--no-progress"]
    assert main(["--input", first, *argv]) == 0  # an exit status, for the console script
    assert json.loads(capsys.readouterr().out)["num_documents"] == len(TEXTS)
    outputs = sorted(p for p in tmp_path.iterdir() if p.name.startswith("out"))
    assert [p.name for p in outputs] == ["out.json", "out_text_document.bin", "out_text_document.idx"]
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in outputs}
    line = cli_error(capsys, main, ["--input", second, *argv])
    assert re.fullmatch(
        r"emoe-preprocess-data: error: output already exists: .*out_text_document.bin.*; pass --overwrite to replace it",
        line,
    )
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in outputs} == before
    (tmp_path / "out_text_document" / "cache").mkdir(parents=True)  # Megatron's index cache
    assert main(["--input", second, *argv, "--overwrite"]) == 0
    assert documents(str(tmp_path / "out_text_document")) == [encode(hf, "something else entirely") + [hf.eos_token_id]]
    assert not (tmp_path / "out_text_document" / "cache").exists()  # stale indices dropped
    assert not list(tmp_path.glob("*.tmp-*"))


def test_interrupted_write_leaves_nothing_under_final_names(tmp_path, tokenizer_dir, monkeypatch):
    from megatron_emoe.data import indexed

    path = write_jsonl(tmp_path / "a.jsonl", [{"messages": [{"role": r, "content": c} for r, c in t]} for t in CHATS])
    calls = []

    def fail_on_second(self):
        calls.append(self.prefix)
        if len(calls) == 2:
            raise KeyboardInterrupt
        original(self)

    original = indexed.StagedIndexedDataset.finalize
    monkeypatch.setattr(indexed.StagedIndexedDataset, "finalize", fail_on_second)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, tokenizer_dir, [path], sft=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl"]


# ---------------------------------------------------------------------------------------------
# Bad lines and records lacking a key: named by file and line, exit status 2, or counted.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "content, message",
    [
        (b'{"text": "a"}\n\n{"text": oops}\n{"text": "b"}\n',
         r"line 153 is not valid JSON \(Expecting value at column 10\)"),
        (b'{"text": "a"}\n{"text": "b"}\n["not", "an", "object"]\n', r"line 153 is a JSON array, not an object"),
        (b'{"text": "a"}\n{"text": "caf\xe9"}\n', r"is not UTF-8 text: line 152, byte offset 2277 is b'\\xe9'"),
    ],
    ids=["bad-json", "not-an-object", "not-utf8"],
)
def test_cli_names_the_file_and_line_of_bad_jsonl(tmp_path, tokenizer_dir, capsys, content, message):
    (tmp_path / "good.jsonl").write_text('{"text": "fine"}\n')
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "ok"}\n' * 150 + content)  # past the records read to find the columns
    argv = ["--input", str(tmp_path / "good.jsonl"), str(bad), "--output-prefix", str(tmp_path / "out"),
            "--tokenizer-model", tokenizer_dir, "--no-progress"]
    line = cli_error(capsys, preprocess_cli(), argv)
    assert line.startswith(f"emoe-preprocess-data: error: --input: {bad} ") and re.search(message, line), line
    assert not list(tmp_path.glob("out*"))


def test_non_utf8_text_and_compressed_jsonl_are_named(tmp_path, tokenizer_dir):
    import gzip

    from megatron_emoe.errors import UsageError

    text = tmp_path / "latin1.txt"
    text.write_bytes("first line\nsecond: café\n".encode("latin-1"))
    with pytest.raises(UsageError, match=rf"--input: {re.escape(str(text))} is not UTF-8 text: line 2, byte offset 22"):
        run(tmp_path, tokenizer_dir, [text])
    packed = tmp_path / "a.jsonl.gz"
    packed.write_bytes(gzip.compress(b'{"text": "a"}\n{"text": \n'))
    with pytest.raises(UsageError, match=rf"--input: {re.escape(str(packed))} line 2 is not valid JSON"):
        run(tmp_path, tokenizer_dir, [packed])
    assert not list(tmp_path.glob("out*"))


def test_records_lacking_a_key_are_counted(tmp_path, tokenizer_dir, hf, capsys):
    rows = [{"text": "one", "title": "t1"}, {"title": "no text"}, {"text": None, "title": "null text"},
            {"text": "", "title": "empty text"}, {"text": "two"}]
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    argv = ["--input", path, "--json-keys", "text", "title", "--output-prefix", str(tmp_path / "out"),
            "--tokenizer-model", tokenizer_dir, "--no-progress"]
    assert preprocess_cli()(argv) == 0
    captured = capsys.readouterr()
    sidecar = json.loads(captured.out)
    assert sidecar["num_records"] == 5
    assert sidecar["datasets"]["text"]["skipped_missing"] == 2  # absent, null
    assert sidecar["datasets"]["text"]["skipped_empty"] == 1  # "" is empty, not missing
    assert sidecar["datasets"]["title"]["skipped_missing"] == 1
    assert sidecar["datasets"]["title"]["skipped_empty"] == 0
    assert json.loads((tmp_path / "out.json").read_text()) == sidecar
    eod = hf.eos_token_id
    assert documents(str(tmp_path / "out_text_document")) == [encode(hf, "one") + [eod], encode(hf, "two") + [eod]]
    assert captured.err.strip().splitlines() == [
        "emoe-preprocess-data: warning: 2 of 5 records lack --json-keys 'text'; 1 of 5 records lack "
        "--json-keys 'title' (absent or null) and were skipped; --strict refuses them"
    ]

    # SFT: a record without its response is skipped (not rendered as an empty answer) and counted.
    chats = write_jsonl(tmp_path / "c.jsonl", [{"query": "q1", "response": "r1"}, {"query": "q2"},
                                                {"query": "q3", "response": None}])
    prefix, side = run(tmp_path, tokenizer_dir, [chats], "sft", sft=True)
    assert side["datasets"]["text"]["skipped_missing"] == 2
    assert side["datasets"]["text"]["conversation"] == "prompt=query, response=response"
    check_sft_docs(hf, prefix, [[("user", "q1"), ("assistant", "r1")]])


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_strict_refuses_records_lacking_a_key(tmp_path, tokenizer_dir, capsys, fmt):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"text": "a", "id": 0}, {"id": 1}, {"text": "b", "id": 2}, {"text": None, "id": 3}]
    if fmt == "jsonl":
        path, where = write_jsonl(tmp_path / "a.jsonl", rows), "line 2, line 4"
    else:
        path, where = str(tmp_path / "a.parquet"), "row 1, row 3"
        pq.write_table(pa.Table.from_pylist(rows), path)
    clean = write_jsonl(tmp_path / "clean.jsonl", [{"text": "c"}]) if fmt == "jsonl" else None
    inputs = [path] + ([clean] if clean else [])
    argv = ["--input", *inputs, "--strict", "--output-prefix", str(tmp_path / "out"),
            "--tokenizer-model", tokenizer_dir, "--no-progress"]
    line = cli_error(capsys, preprocess_cli(), argv)
    total = 5 if clean else 4
    assert line == (
        f"emoe-preprocess-data: error: --strict: 2 of {total} records lack --json-keys 'text' (absent or null) "
        f"in {path}: 2 ({where}); fix the input, or drop --strict to skip (and count) them"
    )
    assert not list(tmp_path.glob("out*"))

    chats = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "x"},
                                                             {"role": "assistant", "content": "y"}]},
                                               {"messages": None}])
    message = r"--strict: 1 of 2 records lack the messages column 'messages' .*c\.jsonl: 1 \(line 2\)"
    with pytest.raises(ValueError, match=message):
        run(tmp_path, tokenizer_dir, [chats], sft=True, strict=True)


def test_console_script_reports_bad_input_in_one_line(tmp_path, tokenizer_dir):
    """The installed `emoe-preprocess-data`: exit status 2, exactly one line on stderr naming file and line."""
    script = Path(sys.executable).with_name("emoe-preprocess-data")
    assert script.is_file(), f"{script} is not installed; run `pip install -e .`"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"text": "b"\n')
    result = subprocess.run(
        [str(script), "--input", str(bad), "--output-prefix", str(tmp_path / "out"),
         "--tokenizer-model", tokenizer_dir, "--no-progress"],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.splitlines() == [
        f"emoe-preprocess-data: error: --input: {bad} line 2 is not valid JSON "
        "(Expecting ',' delimiter at column 14); JSON Lines hold one JSON object per line"
    ]
    assert result.stdout == "" and not list(tmp_path.glob("out*"))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--corpus-bytes", "0"], r"--corpus-bytes must be >= 1; got 0"),
        (["--vocab-size", "10"], r"--vocab-size must be >= \d+ .*; got 10"),
        (["--output-dir", "{tmp}/mine"], r"--output-dir: .*mine is not empty and holds no default-data manifest"),
    ],
)
def test_build_default_data_cli_rejects_bad_flags(tmp_path, capsys, argv, message):
    from megatron_emoe.cli.build_default_data import main

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    argv = [a.format(tmp=tmp_path) for a in argv]
    if "--output-dir" not in argv:
        argv += ["--output-dir", str(tmp_path / "data")]
    line = cli_error(capsys, main, [*argv, "--no-progress"])
    assert line.startswith("emoe-build-default-data: error: ") and re.search(message, line), line
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


# ---------------------------------------------------------------------------------------------
# Checks before training: files present, loss masks for SFT, same tokenizer as the data.
# ---------------------------------------------------------------------------------------------
def test_check_data_prefixes(tmp_path, tokenizer_dir, hf):
    from megatron_emoe.data.checks import check_data_prefixes

    vocab = len(hf)
    text = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in TEXTS])
    chats = write_jsonl(tmp_path / "c.jsonl", [{"query": "q?", "response": "r."}])
    pre, _ = run(tmp_path, tokenizer_dir, [text], "pre")
    sft, _ = run(tmp_path, tokenizer_dir, [chats], "sft", sft=True)
    pre, sft = pre + "_text_document", sft + "_text_document"

    check_data_prefixes(["0.5", pre, "0.5", sft], tokenizer_vocab_size=vocab, sft=False)
    check_data_prefixes([sft], tokenizer_vocab_size=vocab, sft=True)

    with pytest.raises(ValueError, match=r"--data-path: missing data file .*nowhere.bin"):
        check_data_prefixes([str(tmp_path / "nowhere")], tokenizer_vocab_size=vocab, sft=False)
    with pytest.raises(ValueError, match=r"--train-data-path: missing SFT loss mask .*pre_text_document_lossmask.bin"):
        check_data_prefixes([pre], tokenizer_vocab_size=vocab, sft=True, flag="--train-data-path")
    with pytest.raises(
        ValueError,
        match=rf"--data-path: .*pre_text_document was made with a tokenizer of {vocab} tokens .* but the "
        rf"tokenizer has 50000; --tokenizer-model must be the tokenizer the data was made with",
    ):
        check_data_prefixes([pre], tokenizer_vocab_size=50000, sft=False)

    # Without the sidecar, the largest token id bounds the data's vocabulary.
    os.remove(tmp_path / "pre.json")
    largest = max(max(d) for d in documents(pre))
    check_data_prefixes([pre], tokenizer_vocab_size=largest + 1, sft=False)
    with pytest.raises(
        ValueError,
        match=rf"holds token id {largest} .* but the tokenizer has {largest}; --tokenizer-model must be",
    ):
        check_data_prefixes([pre], tokenizer_vocab_size=largest, sft=False)

    os.remove(sft + "_lossmask.idx")
    with pytest.raises(ValueError, match=r"missing SFT loss mask \(--sft-packed\) file .*_lossmask.idx .*emoe-preprocess-data --sft"):
        check_data_prefixes([sft], tokenizer_vocab_size=vocab, sft=True)


# ---------------------------------------------------------------------------------------------
# Default data: deterministic, cached, and loadable by AutoTokenizer and Megatron.
# ---------------------------------------------------------------------------------------------
def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_default_data_is_deterministic_and_cached(tmp_path, capsys):
    from transformers import AutoTokenizer

    from megatron_emoe.data.checks import check_data_prefixes
    from megatron_emoe.data.default_data import build_default_data, ensure_default_data

    small = dict(corpus_bytes=60_000, vocab_size=400, workers=1)
    a = build_default_data(tmp_path / "a", progress=False, **small)
    b = build_default_data(tmp_path / "b", progress=False, **small)
    files_a, files_b = tree_bytes(Path(a["output_dir"])), tree_bytes(Path(b["output_dir"]))
    assert files_a == files_b
    assert {"manifest.json", "tokenizer/tokenizer.json", "raw/sft_valid.jsonl",
            "pretrain_valid_text_document.idx", "sft_train_text_document_lossmask.bin"} <= files_a.keys()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".") and not p.name.endswith(".lock")]

    manifest = json.loads(files_a["manifest.json"])
    assert manifest["inputs"]["corpus_bytes"] == 60_000
    assert 60_000 <= manifest["corpus"]["bytes"] < 60_000 + 256_000
    assert all(manifest["corpus"]["documents"][split] > 0 for split in ("train", "valid"))
    assert all(manifest["corpus"]["sft_records"][split] > 0 for split in ("train", "valid"))

    # Cached: same inputs -> nothing rebuilt.
    stamp = os.stat(Path(a["manifest"])).st_mtime_ns
    capsys.readouterr()
    assert ensure_default_data(tmp_path / "a", **small) == a
    assert "up to date" in capsys.readouterr().out
    assert os.stat(Path(a["manifest"])).st_mtime_ns == stamp

    hf = AutoTokenizer.from_pretrained(a["tokenizer_model"], local_files_only=True)
    megatron = megatron_build_tokenizer(a["tokenizer_model"])
    assert hf.eos_token == EOS and megatron.eod == hf.eos_token_id == manifest["tokenizer"]["eod"]
    assert megatron.vocab_size == len(hf) == manifest["tokenizer"]["vocab_size"]
    for token in SPECIAL_TOKENS:
        assert hf.convert_tokens_to_ids(token) == megatron.tokenize(token)[0]
    check_data_prefixes([a["pretrain_train"], a["pretrain_valid"]], tokenizer_vocab_size=len(hf), sft=False)
    check_data_prefixes([a["sft_train"], a["sft_valid"]], tokenizer_vocab_size=len(hf), sft=True)

    # Other inputs (here the vocabulary size) -> the stale folder is rebuilt in place.
    rebuilt = ensure_default_data(tmp_path / "a", **{**small, "vocab_size": 380})
    assert rebuilt == a
    manifest = json.loads(Path(a["manifest"]).read_text())
    assert manifest["inputs"]["vocab_size"] == manifest["tokenizer"]["vocab_size"] == 380
    check_data_prefixes([a["pretrain_train"], a["sft_train"]], tokenizer_vocab_size=380, sft=False)
    with pytest.raises(ValueError, match=r"made with a tokenizer of 380 tokens"):
        check_data_prefixes([a["pretrain_valid"]], tokenizer_vocab_size=400, sft=False)


def test_default_data_refuses_foreign_folder(tmp_path):
    from megatron_emoe.data.default_data import build_default_data

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match=r"--output-dir: .*mine is not empty and holds no default-data manifest"):
        build_default_data(tmp_path / "mine", corpus_bytes=1000, vocab_size=300)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
