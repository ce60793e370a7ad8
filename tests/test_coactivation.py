"""Expert co-activation diagnostics (`megatron_emoe.coactivation`): the pure maths, the recorder on
a real GPTModel (one process and EP=2 gloo processes), the training collection and the files."""

import json
import math
import os

import pytest
import torch
from distributed import run_distributed_test

import builders
from megatron_emoe import (
    Budget,
    ElasticMoEConfig,
    coactivation,
    elastic_routers,
    routing,
    set_active_experts,
)
from megatron_emoe.coactivation import (
    Coactivation,
    coactivation_counts,
    frobenius_distance,
    normalize,
)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def topk_map(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean `[tokens, experts]` map of each row's top-k."""
    return torch.zeros_like(scores, dtype=torch.bool).scatter(1, scores.topk(k, -1).indices, True)


# ---------------------------------------------------------------------------------------------
# Pure functions
# ---------------------------------------------------------------------------------------------
class TestCounts:
    def test_hand_computed_example(self):
        routing_map = torch.tensor(
            [[1, 1, 0, 0],   # token 0: experts 0, 1
             [1, 0, 1, 0],   # token 1: experts 0, 2
             [1, 1, 1, 0],   # token 2: experts 0, 1, 2
             [0, 0, 0, 1]],  # token 3: expert 3
            dtype=torch.bool,
        )
        expected = torch.tensor(
            [[3, 2, 2, 0],
             [2, 2, 1, 0],
             [2, 1, 2, 0],
             [0, 0, 0, 1]]
        )
        counts = coactivation_counts(routing_map)
        assert counts.dtype == torch.int64 and torch.equal(counts, expected)
        # Megatron's padding mask: True marks padding; token 2 dropped.
        padded = coactivation_counts(routing_map, torch.tensor([False, False, True, False]))
        assert torch.equal(padded, expected - torch.tensor(
            [[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 0], [0, 0, 0, 0]]))

    def test_symmetric_and_diagonal_is_load(self):
        routing_map = topk_map(torch.randn(500, 8, generator=seeded(0)), 3)
        counts = coactivation_counts(routing_map)
        assert torch.equal(counts, counts.t())
        assert torch.equal(torch.diagonal(counts), routing_map.sum(0))
        assert int(torch.diagonal(counts).sum()) == 500 * 3
        assert int(counts.sum() - torch.diagonal(counts).sum()) == 500 * 3 * 2  # ordered pairs

    def test_chunked_sum_is_exact(self, monkeypatch):
        routing_map = topk_map(torch.randn(1000, 6, generator=seeded(1)), 2)
        whole = coactivation_counts(routing_map)
        monkeypatch.setattr(coactivation.counts, "_EXACT_ROWS", 7)
        assert torch.equal(coactivation_counts(routing_map), whole)

    def test_rejects_non_matrix(self):
        with pytest.raises(ValueError, match=r"\[tokens, experts\]"):
            coactivation_counts(torch.ones(2, 3, 4, dtype=torch.bool))


class TestNormalize:
    counts = coactivation_counts(topk_map(torch.randn(300, 8, generator=seeded(2)), 3))

    def test_pairs_is_a_distribution_over_pairs(self):
        pairs = normalize(self.counts, "pairs")
        assert torch.all(torch.diagonal(pairs) == 0)
        assert math.isclose(float(pairs.sum()), 1.0, rel_tol=1e-12)
        assert torch.equal(pairs, pairs.t())
        # Scale-free: twice the tokens give the same matrix.
        assert torch.allclose(normalize(2 * self.counts, "pairs"), pairs)

    def test_tokens_and_total(self):
        by_tokens = normalize(self.counts, "tokens", num_tokens=300)
        assert math.isclose(float(torch.diagonal(by_tokens).sum()), 3.0, rel_tol=1e-12)
        assert math.isclose(float(normalize(self.counts, "total").sum()), 1.0, rel_tol=1e-12)

    def test_no_pairs_gives_zeros(self):
        single = coactivation_counts(topk_map(torch.randn(50, 4, generator=seeded(3)), 1))
        assert torch.all(normalize(single, "pairs") == 0)

    def test_bad_arguments(self):
        with pytest.raises(ValueError, match="unknown normalization"):
            normalize(self.counts, "rows")
        with pytest.raises(ValueError, match="num_tokens"):
            normalize(self.counts, "tokens")


class TestFrobenius:
    def test_zero_for_identical_and_matches_definition(self):
        a = normalize(coactivation_counts(topk_map(torch.randn(200, 8, generator=seeded(4)), 2)))
        b = normalize(coactivation_counts(topk_map(torch.randn(200, 8, generator=seeded(5)), 2)))
        assert frobenius_distance(a, a.clone()) == 0.0
        by_hand = float(((a - b) ** 2).sum().sqrt())
        assert math.isclose(frobenius_distance(a, b), by_hand, rel_tol=1e-12)
        with pytest.raises(ValueError, match="shape"):
            frobenius_distance(a, a[:4, :4])

    def test_emoe_sampling_matches_top_k_ideal_inference(self):
        """The paper's point in numbers: on the same scores, EMoE's training pairs (k=2 of the
        top-4) are distributed like top-4 inference pairs; Top-k training pairs (top-2) are not."""
        scores = torch.randn(20_000, 8, generator=seeded(6)) + torch.linspace(0, 3, 8)
        emoe = torch.zeros_like(scores, dtype=torch.bool).scatter(
            1, routing.sample_coactivation(scores, 2, 4, generator=seeded(7)), True)
        inference = normalize(coactivation_counts(topk_map(scores, 4)))
        d_emoe = frobenius_distance(normalize(coactivation_counts(emoe)), inference)
        d_topk = frobenius_distance(normalize(coactivation_counts(topk_map(scores, 2))), inference)
        assert d_emoe < 0.01 and d_topk > 0.1  # measured: 0.004 and 0.158


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------
def _synthetic(seed: int, k: int, tokens: int = 64, tag: str = "train") -> Coactivation:
    scores = {layer: torch.randn(tokens, 8, generator=seeded(seed + layer)) for layer in (1, 2)}
    counts = {layer: coactivation_counts(topk_map(s, k)) for layer, s in scores.items()}
    return Coactivation(counts, {1: tokens, 2: tokens}, {1: 1.5, 2: math.nan},
                        {"tag": tag, "budget": k})


def _leftovers(directory) -> list:
    return [name for _, _, files in os.walk(directory) for name in files if ".tmp-" in name]


def test_save_load_round_trip_and_heatmaps(tmp_path):
    stats = _synthetic(0, 2)
    path = coactivation.save(stats, str(tmp_path), "train")
    loaded = coactivation.load(path)
    assert loaded.layers == [1, 2] and loaded.meta == stats.meta
    for layer in (1, 2):
        assert torch.equal(loaded.counts[layer], stats.counts[layer])
    assert loaded.tokens == stats.tokens
    assert loaded.entropy[1] == 1.5 and math.isnan(loaded.entropy[2])
    for layer in (1, 2):
        with open(tmp_path / "train" / f"layer_{layer:02d}.png", "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert _leftovers(tmp_path) == []


def test_heatmap_without_pairs_shows_expert_load(tmp_path):
    """At k' = 1 no token has a pair: the "pairs" heatmap would be empty, so the figure shows each
    expert's fraction of the tokens instead, and says so."""
    single = _synthetic(0, 1, tag="eval_k1")
    figure = coactivation.layer_figure(single, 1)
    (axes,) = [a for a in figure.axes]
    assert not axes.images and "no co-activated pairs" in axes.get_title()
    heights = [bar.get_height() for bar in axes.patches]
    expected = (single.load(1).double() / single.tokens[1]).tolist()
    assert heights == pytest.approx(expected) and sum(heights) == pytest.approx(1.0)
    # With pairs: the heatmap, diagonal masked.
    pairs_axes = coactivation.layer_figure(_synthetic(0, 2), 1).axes[0]
    assert len(pairs_axes.images) == 1 and not pairs_axes.patches
    assert "no co-activated pairs" not in pairs_axes.get_title()
    paths = coactivation.save_heatmaps(single, str(tmp_path / "eval_k1"))
    assert [os.path.basename(p) for p in paths] == ["layer_01.png", "layer_02.png"]
    for path in paths:
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_writes_are_atomic(tmp_path, monkeypatch):
    """A write that fails before the rename leaves the previous file whole."""
    stats = _synthetic(0, 2)
    path = coactivation.save(stats, str(tmp_path), "train", heatmaps=False)
    with open(path, "rb") as f:
        before = f.read()

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError):
        coactivation.save(_synthetic(9, 3), str(tmp_path), "train", heatmaps=False)
    with pytest.raises(OSError):
        coactivation.write_distance_table(str(tmp_path / "table.json"), {"a": 1})
    with open(path, "rb") as f:
        assert f.read() == before
    assert not (tmp_path / "table.json").exists()


def test_distance_table_from_a_directory(tmp_path):
    coactivation.save(_synthetic(0, 2, tag="train"), str(tmp_path), "train", heatmaps=False)
    for k in (2, 4):
        tag = coactivation.eval_tag(k)
        coactivation.save(_synthetic(0, k, tag=tag), str(tmp_path), tag, heatmaps=False)
    table = coactivation.compare_directory(str(tmp_path))
    written = json.loads((tmp_path / coactivation.DISTANCE_FILE).read_text())
    assert written == json.loads(json.dumps(table))
    assert written["normalization"] == "pairs" and list(written["frobenius"]) == ["2", "4"]
    assert written["frobenius"]["2"] == {"1": 0.0, "2": 0.0}  # same routing maps
    assert all(d > 0 for d in written["frobenius"]["4"].values())
    assert written["eval"]["4"]["tokens"] == {"1": 64, "2": 64}
    assert written["train"]["router_entropy"] == {"1": 1.5, "2": None}
    assert _leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# The recorder on a real GPTModel
# ---------------------------------------------------------------------------------------------
BUDGETS = (1, 2, 3, 4, 6)
BATCH = 64  # sequences of builders.SEQ tokens


def _gpt(mode: str = "topk"):
    builders.reseed(0)
    elastic = ElasticMoEConfig(mode=mode, k_ideal=4 if mode == "emoe" else None)
    return builders.gpt_model(builders.moe_config(), elastic)


def _train_forward(model, tokens, positions, mask, labels):
    model.train()
    model(tokens, positions, mask, labels=labels).float().mean().backward()


def _recorder_on_gpt(rank, out_dir):
    model = _gpt()
    tokens, positions, mask, labels = builders.gpt_batch(batch_size=BATCH, seed=0)
    num_tokens = BATCH * builders.SEQ

    def run():
        with torch.no_grad():
            model(tokens, positions, mask)

    # Hooks read the routing and change nothing.
    model.eval()
    set_active_experts(model, 4)
    with torch.no_grad():
        plain = model(tokens, positions, mask)
    with coactivation.CoactivationRecorder(model), torch.no_grad():
        hooked = model(tokens, positions, mask)
    assert torch.equal(plain, hooked)
    set_active_experts(model, [1, 3])

    evals = coactivation.collect_at_budgets(model, BUDGETS, run)
    assert [r.budget for r in elastic_routers(model)] == [Budget((1, 3))] * 2, "budget not restored"
    for k, stats in evals.items():
        assert stats.layers == [1, 2] and stats.meta["budget"] == k
        for layer in stats.layers:
            counts = stats.counts[layer]
            assert torch.equal(counts, counts.t())
            assert stats.tokens[layer] == num_tokens
            assert int(stats.load(layer).sum()) == num_tokens * k
            assert 0 < stats.entropy[layer] <= math.log(8)

    # Entropy is routing.router_entropy of the router's own logits.
    router = elastic_routers(model)[0]
    inputs = []
    handle = router.register_forward_hook(lambda m, args, out: inputs.append(args[0]))
    stats = coactivation.collect_at_budgets(model, [2], run)[2]
    handle.remove()
    with torch.no_grad():
        expected = routing.router_entropy(router.gating(inputs[0]).reshape(-1, 8))
    assert math.isclose(stats.entropy[1], float(expected), rel_tol=1e-6)

    # Top-k training routing at k=2 equals eval at k'=2; the distance grows with k'.
    with coactivation.CoactivationRecorder(model, phase="train") as recorder:
        _train_forward(model, tokens, positions, mask, labels)
        run()  # an eval forward: not a training one
    train = recorder.reduce()
    assert train.tokens == {1: num_tokens, 2: num_tokens}
    table = coactivation.distance_table(train, evals)
    for layer in ("1", "2"):
        distances = [table["frobenius"][str(k)][layer] for k in BUDGETS]
        assert distances[0] is None, "k'=1 routes no pairs"
        assert distances[1] == 0.0, distances
        assert distances[1:] == sorted(distances[1:]) and distances[-1] > 0.1, distances
    assert table["mean_over_layers"]["1"] is None

    # EMoE (sample 2 of the top 4 in training) is closer to k'=4 inference than Top-k is.
    emoe = _gpt("emoe")
    with coactivation.CoactivationRecorder(emoe, phase="train") as recorder:
        torch.manual_seed(1)
        _train_forward(emoe, tokens, positions, mask, labels)
    emoe_train = recorder.reduce()
    emoe.eval()
    with torch.no_grad():
        emoe_eval = coactivation.collect_at_budgets(
            emoe, [4], lambda: emoe(tokens, positions, mask))[4]
    for layer in (1, 2):
        assert torch.equal(emoe_eval.counts[layer], evals[4].counts[layer])  # same weights
        d_emoe = frobenius_distance(emoe_train.normalized(layer), emoe_eval.normalized(layer))
        d_topk = frobenius_distance(train.normalized(layer), evals[4].normalized(layer))
        assert d_emoe < 0.5 * d_topk, (layer, d_emoe, d_topk)

    # Files: one npz and one heatmap per MoE layer for each budget.
    for k, stats in evals.items():
        coactivation.save(stats, out_dir, coactivation.eval_tag(k))
    coactivation.save(train, out_dir, "train")
    coactivation.compare_directory(out_dir)


def test_recorder_on_gpt_model(tmp_path):
    run_distributed_test(_recorder_on_gpt, world_size=1, args=(str(tmp_path),))
    names = sorted(os.listdir(tmp_path))
    assert names == sorted([f"eval_k{k}{ext}" for k in BUDGETS for ext in (".npz", "")]
                           + ["train.npz", "train", coactivation.DISTANCE_FILE])
    assert sorted(os.listdir(tmp_path / "eval_k4")) == ["layer_01.png", "layer_02.png"]


def _recompute_counts_once(rank):
    config = builders.moe_config(recompute_granularity="selective", recompute_modules=["moe"])
    builders.reseed(0)
    layer = builders.moe_layer(config, ElasticMoEConfig(mode="emoe", k_ideal=4))
    x = torch.randn(12, 2, config.hidden_size, generator=seeded(0), requires_grad=True)
    maps = []
    layer.router.register_forward_hook(lambda m, args, out: maps.append(out[1]))
    with coactivation.CoactivationRecorder(layer, phase="train") as recorder:
        out, _ = layer(x)
        out.square().sum().backward()
    assert len(maps) == 2, "recompute should run the router twice"
    stats = recorder.local()
    assert stats.tokens == {1: 24}
    assert torch.equal(stats.counts[1], coactivation_counts(maps[-1]))


def test_training_counts_each_micro_batch_once_under_recompute():
    run_distributed_test(_recompute_counts_once, world_size=1)


def _router_keeps_entropy(rank):
    from megatron_emoe import ElasticRouter

    config = builders.moe_config()
    x = torch.randn(12, 2, config.hidden_size, generator=seeded(0))
    padding = torch.zeros(12, 2, dtype=torch.bool)
    padding[-3:] = True
    for mode in ("topk", "emoe"):
        builders.reseed(0)
        elastic = ElasticMoEConfig(mode=mode, k_ideal=4 if mode == "emoe" else None)
        router = ElasticRouter(config=config, elastic=elastic)
        router.set_layer_number(1)
        assert router.track_entropy is False
        with torch.no_grad():
            logits = router.gating(x).reshape(-1, 8)[~padding.reshape(-1)]
        expected = float(routing.router_entropy(logits))
        for training in (False, True):
            router.train(training)
            outputs = {}
            for track in (False, True):
                router.track_entropy = track
                torch.manual_seed(3)  # EMoE training draws experts
                with torch.set_grad_enabled(training):
                    outputs[track] = router(x, padding_mask=padding)
                if not track:
                    assert router.last_entropy is None
            # Tracking only reads: Megatron's top-k path and ours route bitwise the same.
            for plain, tracked in zip(outputs[False], outputs[True]):
                assert torch.equal(plain, tracked), (mode, training)
            assert not router.last_entropy.requires_grad
            assert math.isclose(float(router.last_entropy), expected, rel_tol=1e-5), (mode, training)
            if mode == "emoe" and training:  # reused from the L_HR softmax, not recomputed
                assert router.last_entropy is router._entropy

    # The recorder turns tracking on while attached, reads it, and runs no extra gating matmul.
    router.eval()
    router.track_entropy = False
    calls = []
    gating = router.gating
    router.gating = lambda inp: calls.append(1) or gating(inp)
    with coactivation.CoactivationRecorder(router, phase="eval") as recorder, torch.no_grad():
        assert router.track_entropy is True
        router(x, padding_mask=padding)
    assert router.track_entropy is False and len(calls) == 1
    stats = recorder.local()
    assert stats.tokens == {1: 18}
    assert math.isclose(stats.entropy[1], expected, rel_tol=1e-5)
    with coactivation.CoactivationRecorder(router, phase="eval", entropy=False):
        assert router.track_entropy is False


def test_router_keeps_entropy_for_the_recorder():
    run_distributed_test(_router_keeps_entropy, world_size=1)


# ---------------------------------------------------------------------------------------------
# Training collection (what --coactivation-dir does), with a stand-in checkpoint save
# ---------------------------------------------------------------------------------------------
def _training_collection(rank, out_dir):
    model = _gpt()
    batch = builders.gpt_batch(batch_size=2, seed=0)
    num_tokens = 2 * builders.SEQ
    saves = []

    def train_steps(collector, first, last):
        for iteration in range(first, last):
            model.train()
            collector.observe(model, iteration)  # as the training forward step does
            _train_forward(model, *batch)

    collector = coactivation.TrainingCollector(out_dir)
    save = coactivation.writing_at_saves(lambda iteration, *a, **kw: saves.append(iteration), collector)
    train_steps(collector, 0, 2)
    save(2, [model], None)
    train_steps(collector, 2, 3)
    total = collector.finish()
    assert saves == [2]
    assert total.tokens == {1: 3 * num_tokens, 2: 3 * num_tokens}
    assert total.meta["iteration_start"] == 0 and total.meta["iteration_end"] == 3
    window = coactivation.load(os.path.join(out_dir, "train_iter_0000002.npz"))
    assert window.tokens[1] == 2 * num_tokens and window.meta["iteration_end"] == 2
    last = coactivation.load(os.path.join(out_dir, "train_iter_0000003.npz"))
    assert last.tokens[1] == num_tokens

    # A run resumed at iteration 3 continues the total; after finishing, nothing is hooked.
    collector = coactivation.TrainingCollector(out_dir)
    train_steps(collector, 3, 4)
    total = collector.finish()
    assert total.tokens[1] == 4 * num_tokens and total.meta["iteration_start"] == 0
    assert coactivation.load(os.path.join(out_dir, "train.npz")).tokens[1] == 4 * num_tokens
    assert all(not r._forward_hooks for r in elastic_routers(model))

    # Eval at budgets through `recording` (as the budget sweep does), then the distance table.
    model.eval()
    for k in (2, 4):
        set_active_experts(model, k)
        tag = coactivation.eval_tag(k)
        with coactivation.recording(model, out_dir, tag, budget=k), torch.no_grad():
            model(*batch[:3])
    with coactivation.recording(model, None, "unused"):
        pass
    table = coactivation.compare_directory(out_dir)
    assert list(table["frobenius"]) == ["2", "4"]
    assert table["train"]["meta"]["iteration_end"] == 4


def test_training_collection_writes_at_saves_and_resumes(tmp_path):
    run_distributed_test(_training_collection, world_size=1, args=(str(tmp_path),))
    assert (tmp_path / "train" / "layer_01.png").is_file()
    assert (tmp_path / coactivation.DISTANCE_FILE).is_file()
    assert _leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# EP=2: two processes with their own tokens sum to what one process sees on all the tokens
# ---------------------------------------------------------------------------------------------
EP_BUDGETS = (1, 2, 4)


def _batches(ranks):
    parts = [builders.gpt_batch(batch_size=2, seed=100 + r) for r in ranks]
    return [torch.cat([p[i] for p in parts]) for i in (0, 1)] + [parts[0][2]]


def _ep_counts(rank, out_dir):
    from megatron.core import parallel_state

    model = _gpt()
    tokens, positions, mask = _batches([rank])
    model.eval()
    with torch.no_grad():
        evals = coactivation.collect_at_budgets(
            model, EP_BUDGETS, lambda: model(tokens, positions, mask))
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    torch.save({k: v for k, v in model.state_dict().items() if torch.is_tensor(v)},
               os.path.join(out_dir, f"state_ep{ep_rank}.pt"))
    if rank == 0:
        for k, stats in evals.items():
            coactivation.save(stats, out_dir, coactivation.eval_tag(k), heatmaps=False)


def _one_process_counts(rank, out_dir):
    model = _gpt()
    states = [torch.load(os.path.join(out_dir, f"state_ep{r}.pt")) for r in (0, 1)]
    local = builders.moe_config().num_moe_experts // 2
    with torch.no_grad():
        for name, param in model.named_parameters():
            head, sep, tail = name.partition("local_experts.")
            if not sep:
                param.copy_(states[0][name])
                continue
            index, rest = tail.split(".", 1)
            rank_of, local_index = divmod(int(index), local)
            param.copy_(states[rank_of][f"{head}local_experts.{local_index}.{rest}"])
    tokens, positions, mask = _batches([0, 1])
    model.eval()
    with torch.no_grad():
        evals = coactivation.collect_at_budgets(
            model, EP_BUDGETS, lambda: model(tokens, positions, mask))
    for k, stats in evals.items():
        ep2 = coactivation.load(os.path.join(out_dir, f"{coactivation.eval_tag(k)}.npz"))
        assert ep2.tokens == stats.tokens == {1: 4 * builders.SEQ, 2: 4 * builders.SEQ}
        for layer in (1, 2):
            assert torch.equal(ep2.counts[layer], stats.counts[layer]), (k, layer)
            assert int(stats.load(layer).sum()) == 4 * builders.SEQ * k
            assert math.isclose(ep2.entropy[layer], stats.entropy[layer], rel_tol=1e-5)


@pytest.mark.slow
def test_ep2_totals_match_one_process(tmp_path):
    run_distributed_test(_ep_counts, world_size=2, ep=2, args=(str(tmp_path),))
    run_distributed_test(_one_process_counts, world_size=1, args=(str(tmp_path),))


# ---------------------------------------------------------------------------------------------
# TP=2: ranks that route the same tokens count them once; sequence-parallel shards add up
# ---------------------------------------------------------------------------------------------
def _tp_counts(rank):
    from megatron_emoe import ElasticRouter

    for sequence_parallel in (False, True):
        config = builders.moe_config(sequence_parallel=sequence_parallel)
        builders.reseed(0)
        router = ElasticRouter(config=config, elastic=ElasticMoEConfig())
        router.set_layer_number(1)
        router.eval()
        # Without sequence parallelism both TP ranks hold the same tokens; with it, their own.
        seed = rank if sequence_parallel else 0
        x = torch.randn(12, 2, config.hidden_size, generator=seeded(seed))
        with coactivation.CoactivationRecorder(router, phase="eval") as recorder, torch.no_grad():
            _, routing_map = router(x)
        maps = [torch.empty_like(routing_map) for _ in range(2)]
        torch.distributed.all_gather(maps, routing_map)
        stats = recorder.reduce()
        expected = torch.cat(maps) if sequence_parallel else routing_map
        assert stats.tokens == {1: expected.shape[0]}, sequence_parallel
        assert torch.equal(stats.counts[1], coactivation_counts(expected)), sequence_parallel


@pytest.mark.slow
def test_tp_replicas_counted_once_and_sequence_shards_summed():
    run_distributed_test(_tp_counts, world_size=2, tp=2)
