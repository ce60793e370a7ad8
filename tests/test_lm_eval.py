"""lm-eval on megatron-emoe checkpoints: the shipped offline task, the adapter's scores against the
model's own logits at two budgets, `simple_evaluate`, and the CLI (emoe-lm-eval).

The checkpoint is the session's tiny EMoE model (2 MoE layers, 4 experts, k = 2) trained for 4 steps by the
real training entry on a small default-data build; tolerances are fp32 (1e-5 on summed log-probs).
"""

from __future__ import annotations

import functools
import json

import pytest
import torch

from megatron_emoe.budget import Budget
from megatron_emoe.cli.lm_eval_emoe import main as cli_main
from megatron_emoe.evaluation.lm_eval_adapter import (
    MegatronEMoELM,
    evaluate_budgets,
    task_manager,
    unknown_tasks,
)
from tests.training_runs import usage_error

TOLERANCE = 1e-5
SEQ = 64  # the tiny model's seq_length


@pytest.fixture
def offline(monkeypatch):
    """Hugging Face datasets/hub refuse the network (as with HF_DATASETS_OFFLINE=1)."""
    import datasets.config

    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(name, "1")
        monkeypatch.setattr(datasets.config, name, True)


@pytest.fixture(scope="module")
def checkpoint(emoe_checkpoint):
    """The session's tiny EMoE checkpoint (saved at EP=2 by 2 gloo processes), 512-token tokenizer."""
    return str(emoe_checkpoint.path)


def refused(argv, capsys) -> str:
    """The one stderr line of a CLI run that must exit with status 2."""
    line = usage_error(cli_main, argv, capsys)
    assert line.startswith("emoe-lm-eval: error: ")
    return line.rstrip("\n")


# ---------------------------------------------------------------------- no model ----------
def test_shipped_task_loads_offline_from_any_directory(offline, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # data_files resolve against the YAML's folder, not the cwd
    manager = task_manager(["emoe_mc"])
    assert manager.all_tasks == ["emoe_mc"]  # found locally: lm-eval's own tasks were not indexed
    task = manager.load(["emoe_mc"])["tasks"]["emoe_mc"]
    docs = list(task.test_docs())
    assert len(docs) == 60 and len({d["question"] for d in docs}) == 60
    for doc in docs:
        choices = task.doc_to_choice(doc)
        assert len(choices) == 4 and len(set(choices)) == 4
        assert task.doc_to_target(doc) in range(4)
        assert task.doc_to_text(doc) == f"Question: {doc['question']}\nAnswer:"
    # the gold answers are spread over the four positions
    assert sorted({task.doc_to_target(d) for d in docs}) == [0, 1, 2, 3]
    assert unknown_tasks(manager, ["emoe_mc", "emoe_*", "no_such_task"]) == ["no_such_task"]


def test_budget_model_arg_parsing():
    parse = functools.partial(Budget.parse, flag="active_experts")
    assert parse(2) == Budget(2) and parse("3") == Budget(3) and parse(None) is None
    assert parse("1-2-4") == Budget((1, 2, 4)) and parse([2, 1]) == Budget((2, 1))
    for bad in ("two", "1-x", True, "1.5", 1.5, [1, 2.5]):
        with pytest.raises(ValueError, match="active_experts"):
            parse(bad)


@pytest.mark.parametrize("argv,flag", [
    (["--batch-size", "0"], "--batch-size"),
    (["--limit", "0"], "--limit"),
    (["--budgets", "two"], "--budgets"),
    ([], "--load"),  # an empty folder: no checkpoint there
])
def test_cli_refuses_bad_flags_without_a_checkpoint(argv, flag, tmp_path, capsys):
    assert flag in refused(["--load", str(tmp_path), *argv], capsys)


# ---------------------------------------------------------------------- with a checkpoint --
def direct_logprob(model, vocab: int, inputs: list[int], targets: list[int]) -> tuple[float, bool]:
    """Sum of log p(targets) at the last len(targets) positions of one unpadded forward pass."""
    ids = torch.tensor([inputs])
    with torch.no_grad():
        logits = model(input_ids=ids, position_ids=torch.arange(len(inputs))[None], attention_mask=None)
    logprobs = torch.log_softmax(logits[0, :, :vocab].float(), dim=-1)[-len(targets):]
    target = torch.tensor(targets)
    return float(logprobs.gather(-1, target[:, None]).sum()), bool((logprobs.argmax(-1) == target).all())


def greedy_text(model, vocab: int, tokenizer, context: list[int], steps: int) -> str:
    tokens = list(context)
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([tokens[-SEQ:]]),
                           position_ids=torch.arange(len(tokens[-SEQ:]))[None], attention_mask=None)
        next_token = int(logits[0, -1, :vocab].argmax())
        if next_token == tokenizer.eos_token_id:
            break
        tokens.append(next_token)
    return tokenizer.decode(tokens[len(context):], skip_special_tokens=True)


def _adapter_matches_logits(rank, load):
    from lm_eval.api.instance import Instance

    from megatron_emoe.routers import get_active_experts

    lm = MegatronEMoELM(load=load, active_experts=1, batch_size=3)
    tok, vocab, eos = lm.tokenizer, lm.vocab_size, lm.eot_token_id
    long_context = "def f(x):\n    return x + 1\n" * 12 + "y ="  # > 64 tokens: cut from the left
    pairs = [("The capital of France is", " Paris"), ("import os\nimport", " sys\n"),
             (long_context, " f(2)"), ("", "for i in range(3):")]
    requests = [Instance("loglikelihood", {}, pair, n) for n, pair in enumerate(pairs)]
    text = "class A:\n    def __init__(self):\n        self.x = 1\n" * 4
    rolling_ids = tok.encode(text)
    assert SEQ < len(rolling_ids) <= 2 * SEQ

    def expected(pair):
        context, continuation = pair
        whole = tok.encode(context + continuation)
        ctx = tok.encode(context) if context else [eos]
        cont = whole[len(tok.encode(context)):] if context else whole
        return direct_logprob(lm.model, vocab, (ctx + cont)[-(SEQ + 1):-1], cont)

    def expected_rolling():  # first window after EOS, then the rest with a full window of context
        full = [eos] + rolling_ids
        first = direct_logprob(lm.model, vocab, full[:SEQ], rolling_ids[:SEQ])[0]
        return first + direct_logprob(lm.model, vocab, full[len(full) - 1 - SEQ:-1], rolling_ids[SEQ:])[0]

    scores = {}
    for budget, layers in ((1, [1, 1]), (2, [2, 2])):
        lm.set_budget(budget)
        assert get_active_experts(lm.model) == layers
        got = lm.loglikelihood(requests, disable_tqdm=True)
        for pair, (logprob, greedy) in zip(pairs, got):
            want, want_greedy = expected(pair)
            assert abs(logprob - want) <= TOLERANCE, (budget, pair, logprob, want)
            assert greedy == want_greedy
        (rolling,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], True)
        assert abs(rolling - expected_rolling()) <= TOLERANCE
        scores[budget] = [logprob for logprob, _ in got] + [rolling]

        gen = [Instance("generate_until", {}, (c, {"until": ["\n\n"], "max_gen_toks": 6}), n)
               for n, c in enumerate(["def main():\n", "x = 1\ny ="])]
        outs = lm.generate_until(gen, disable_tqdm=True)
        assert any(outs)  # something was generated
        for instance, out in zip(gen, outs):
            want = greedy_text(lm.model, vocab, tok, tok.encode(instance.args[0]), 6).split("\n\n")[0]
            assert out == want

    # the budget took effect: every score moved
    assert all(abs(a - b) > 1e-6 for a, b in zip(scores[1], scores[2])), scores
    assert lm.set_budget("1-2") == Budget((1, 2)) and get_active_experts(lm.model) == [1, 2]
    with pytest.raises(ValueError, match=r"\[1, 4\]"):
        lm.set_budget(5)


@pytest.mark.slow
def test_adapter_scores_equal_the_model_logits_at_two_budgets(checkpoint):
    from megatron_emoe.runtime.launch import run_gloo

    run_gloo(_adapter_matches_logits, world_size=1, args=(checkpoint,), timeout=600)


@pytest.mark.slow
def test_simple_evaluate_on_the_shipped_task_at_budgets_1_and_2(checkpoint, offline):
    import lm_eval

    manager = task_manager(["emoe_mc"])
    with MegatronEMoELM(load=checkpoint, batch_size=4) as lm:  # opens and closes its own gloo world
        runs = evaluate_budgets(lm, [1, 2], ["emoe_mc"], manager, log=lambda line: None, limit=6)
    assert [run["label"] for run in runs] == ["1", "2"]
    for run in runs:
        metrics = run["results"]["emoe_mc"]
        assert 0.0 <= metrics["acc,none"] <= 1.0 and 0.0 <= metrics["acc_norm,none"] <= 1.0
        assert run["n_samples"]["emoe_mc"]["effective"] == 6
    # by registered name, with a per-layer budget in lm-eval's model_args syntax
    out = lm_eval.simple_evaluate(model="megatron-emoe", model_args=f"load={checkpoint},active_experts=1-2",
                                  tasks=["emoe_mc"], task_manager=manager, limit=3, log_samples=False)
    assert 0.0 <= out["results"]["emoe_mc"]["acc,none"] <= 1.0
    assert out["config"]["model_args"].endswith("active_experts=1-2")


@pytest.mark.slow
def test_cli_writes_every_budget_and_refuses_bad_budgets(checkpoint, offline, tmp_path, capsys):
    output = tmp_path / "out" / "results.json"
    assert cli_main(["--load", checkpoint, "--tasks", "emoe_mc", "--budgets", "1", "2",
                     "--active-experts", "2", "1", "--limit", "4", "--batch-size", "3",
                     "--output", str(output)]) == 0
    report = json.loads(output.read_text())
    assert [run["active_experts"] for run in report["runs"]] == [1, 2, [2, 1]]
    assert report["num_experts"] == 4 and report["moe_layers"] == [1, 2]
    for run in report["runs"]:
        assert 0.0 <= run["results"]["emoe_mc"]["acc,none"] <= 1.0
    progress = capsys.readouterr().out
    assert "[lm-eval] active experts 2-1: emoe_mc: acc,none=" in progress and "wrote" in progress

    line = refused(["--load", checkpoint, "--budgets", "5", "--output", str(tmp_path / "no.json")], capsys)
    assert "--budgets" in line and "[1, 4]" in line and "got 5" in line
    line = refused(["--load", checkpoint, "--active-experts", "0"], capsys)
    assert "--active-experts" in line and "got 0" in line
    line = refused(["--load", checkpoint, "--active-experts", "1", "2", "3"], capsys)
    assert "--active-experts" in line and "one entry per MoE layer" in line
    assert not (tmp_path / "no.json").exists()
