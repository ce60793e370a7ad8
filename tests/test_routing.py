"""Pure routing maths (`megatron_emoe.routing`): exactness and statistics, fixed seeds.

Statistical checks use chi-square statistics against the 0.1% critical value of their degrees of
freedom, so a correct sampler fails them about once in a thousand seeds (and never for the seeds
fixed here), while a biased one fails them reliably.
"""

import itertools
import math

import pytest
import scipy.stats
import torch

from megatron_emoe import routing

P_VALUE = 0.001


def critical(degrees_of_freedom: int) -> float:
    """The chi-square statistic a correct sampler exceeds with probability `P_VALUE`."""
    return float(scipy.stats.chi2.ppf(1 - P_VALUE, degrees_of_freedom))


def chi_square(counts: torch.Tensor, probs=None) -> float:
    """Pearson's statistic of `counts` against `probs` (uniform when None)."""
    counts = counts.double()
    probs = torch.full_like(counts, 1 / counts.numel()) if probs is None else torch.tensor(probs).double()
    expected = counts.sum() * probs
    return float(((counts - expected) ** 2 / expected).sum())


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class TestSampleCoactivation:
    def test_shape_pool_membership_and_no_repeats(self):
        scores = torch.randn(4096, 16, generator=seeded(1))
        chosen = routing.sample_coactivation(scores, k=3, k_ideal=7, generator=seeded(2))
        assert chosen.shape == (4096, 3) and chosen.dtype == torch.long
        pool = scores.topk(7, dim=-1).indices
        assert (chosen.unsqueeze(-1) == pool.unsqueeze(1)).any(-1).all(), "outside top-k_ideal"
        assert (chosen.sort(-1).values.diff(dim=-1) != 0).all(), "an expert was drawn twice"

    def test_chosen_are_ordered_best_first(self):
        scores = torch.randn(512, 12, generator=seeded(3))
        chosen = routing.sample_coactivation(scores, k=4, k_ideal=8, generator=seeded(4))
        assert (scores.gather(1, chosen).diff(dim=-1) <= 0).all()

    def test_k_equal_k_ideal_is_plain_topk_and_draws_nothing(self):
        scores = torch.randn(256, 8, generator=seeded(5))
        generator = seeded(6)
        before = generator.get_state()
        chosen = routing.sample_coactivation(scores, k=2, k_ideal=2, generator=generator)
        assert torch.equal(chosen, scores.topk(2, dim=-1).indices)
        assert torch.equal(generator.get_state(), before)

    def test_uniform_over_pool_ranks(self):
        """Each of the k_ideal ranks is activated with probability k / k_ideal."""
        tokens, k, k_ideal = 200_000, 2, 4
        scores = torch.randn(tokens, 8, generator=seeded(7))
        chosen = routing.sample_coactivation(scores, k, k_ideal, generator=seeded(8))
        ranks = (chosen.unsqueeze(-1) == scores.topk(k_ideal, dim=-1).indices.unsqueeze(1))
        per_rank = ranks.any(1).sum(0)
        assert chi_square(per_rank) < critical(k_ideal - 1)
        assert torch.allclose(per_rank / tokens, torch.full((k_ideal,), k / k_ideal), atol=0.01)

    def test_uniform_over_subsets(self):
        """All C(k_ideal, k) subsets of the pool are equally likely (here C(5, 2) = 10)."""
        tokens, k, k_ideal = 100_000, 2, 5
        scores = torch.randn(tokens, 10, generator=seeded(9))
        chosen = routing.sample_coactivation(scores, k, k_ideal, generator=seeded(10))
        pool = scores.topk(k_ideal, dim=-1).indices
        positions = (chosen.unsqueeze(-1) == pool.unsqueeze(1)).float().argmax(-1).sort(-1).values
        subsets = {pair: i for i, pair in enumerate(itertools.combinations(range(k_ideal), k))}
        ids = positions[:, 0] * k_ideal + positions[:, 1]
        lookup = torch.full((k_ideal * k_ideal,), -1, dtype=torch.long)
        for (a, b), i in subsets.items():
            lookup[a * k_ideal + b] = i
        counts = torch.bincount(lookup[ids], minlength=len(subsets))
        assert (lookup[ids] >= 0).all()
        assert chi_square(counts) < critical(len(subsets) - 1)

    def test_seeds_reproduce_and_differ(self):
        scores = torch.randn(1024, 16, generator=seeded(11))
        first = routing.sample_coactivation(scores, 2, 6, generator=seeded(12))
        again = routing.sample_coactivation(scores, 2, 6, generator=seeded(12))
        other = routing.sample_coactivation(scores, 2, 6, generator=seeded(13))
        assert torch.equal(first, again)
        assert not torch.equal(first, other)

    def test_default_generator_follows_manual_seed(self):
        scores = torch.randn(1024, 16, generator=seeded(14))
        torch.manual_seed(99)
        first = routing.sample_coactivation(scores, 2, 6)
        torch.manual_seed(99)
        assert torch.equal(first, routing.sample_coactivation(scores, 2, 6))

    @pytest.mark.parametrize("k,k_ideal", [(0, 4), (3, 2), (2, 9)])
    def test_bad_sizes(self, k, k_ideal):
        with pytest.raises(ValueError, match="k_ideal"):
            routing.sample_coactivation(torch.randn(4, 8), k, k_ideal)


class TestHierarchicalRouterLoss:
    def test_zero_for_uniform(self):
        loss = routing.hierarchical_router_loss(torch.full((32, 8), 1 / 8))
        assert abs(loss.item()) < 1e-6

    def test_minus_log_n_for_one_hot(self):
        probs = torch.nn.functional.one_hot(torch.arange(16) % 8, 8).float()
        assert math.isclose(routing.hierarchical_router_loss(probs).item(), -math.log(8), rel_tol=1e-6)

    def test_equals_negative_kl_to_uniform(self):
        probs = torch.softmax(torch.randn(64, 12, generator=seeded(15)), dim=-1)
        uniform = torch.full_like(probs, 1 / 12)
        kl = torch.nn.functional.kl_div(uniform.log(), probs, reduction="none").sum(-1).mean()
        assert torch.allclose(routing.hierarchical_router_loss(probs), -kl, atol=1e-6)

    def test_gradient_sharpens(self):
        """Descending L_HR lowers the entropy of every row."""
        logits = torch.randn(8, 6, generator=seeded(16), requires_grad=True)
        routing.hierarchical_router_loss(torch.softmax(logits, -1)).backward()
        stepped = torch.softmax(logits - 0.5 * logits.grad, -1)
        entropy = lambda p: -(p * p.log()).sum(-1)  # noqa: E731
        assert (entropy(stepped) < entropy(torch.softmax(logits.detach(), -1))).all()

    def test_rejects_non_matrix(self):
        with pytest.raises(ValueError, match=r"\[tokens, experts\]"):
            routing.hierarchical_router_loss(torch.rand(2, 3, 4))


class TestBudgets:
    def test_budget_draw_is_pure_and_uniform(self):
        choices = (1, 2, 4, 8)
        draws = [routing.budget_draw(choices, 1234, stream=3, counter=c) for c in range(8000)]
        again = [routing.budget_draw(choices, 1234, stream=3, counter=c) for c in range(8000)]
        assert draws == again
        counts = torch.tensor([draws.count(k) for k in choices])
        assert counts.sum() == 8000 and chi_square(counts) < critical(3)

    def test_budget_draw_streams_and_seeds_differ(self):
        draw = lambda seed, stream: [routing.budget_draw(range(1, 9), seed, stream, c) for c in range(64)]  # noqa: E731,E501
        assert draw(1, 1) != draw(1, 2)
        assert draw(1, 1) != draw(2, 1)

    def test_token_budgets(self):
        budgets = routing.sample_token_budgets((1, 3, 5), 30_000, generator=seeded(17))
        assert budgets.shape == (30_000,) and set(budgets.unique().tolist()) == {1, 3, 5}
        assert chi_square(torch.bincount(budgets)[[1, 3, 5]]) < critical(2)

    def test_budget_weights(self):
        choices = (1, 2, 4, 8)
        assert routing.budget_weights(choices) == pytest.approx([0.25] * 4)
        # Capacity-aware: P(k) ∝ exp(log k / τ) = k^(1/τ); τ = 2 favours large k by sqrt(k).
        root = [math.sqrt(k) for k in choices]
        assert routing.budget_weights(choices, "capacity", 2.0) == pytest.approx(
            [r / sum(root) for r in root])
        assert routing.budget_weights(choices, "capacity", 1.0) == pytest.approx(
            [k / 15 for k in choices])
        # A tiny τ puts (almost) all mass on the largest budget, without overflowing.
        assert routing.budget_weights(choices, "capacity", 0.01)[-1] == pytest.approx(1.0)
        assert routing.budget_weights(choices, weights=(2, 0, 1, 1)) == pytest.approx([0.5, 0, 0.25, 0.25])
        for weighting, temperature in (("uniform", 1.0), ("capacity", 2.0)):
            assert math.fsum(routing.budget_weights(choices, weighting, temperature)) == pytest.approx(1.0)

    @pytest.mark.parametrize("kwargs, message", [
        (dict(weights=(1, 2)), "weights must be 4"),
        (dict(weights=(1, -1, 1, 1)), "non-negative"),
        (dict(weights=(0, 0, 0, 0)), "positive sum"),
        (dict(weighting="capacity", temperature=0.0), "temperature must be > 0"),
        (dict(weighting="zipf"), "weighting must be"),
    ])
    def test_budget_weights_refuse(self, kwargs, message):
        with pytest.raises(ValueError, match=message):
            routing.budget_weights((1, 2, 4, 8), **kwargs)

    def test_budget_draw_follows_weights(self):
        choices = (1, 2, 4, 8)
        weights = routing.budget_weights(choices, "capacity", 2.0)
        draws = [routing.budget_draw(choices, 7, 0, c, weights) for c in range(20_000)]
        assert draws == [routing.budget_draw(choices, 7, 0, c, weights) for c in range(20_000)]
        counts = torch.tensor([draws.count(k) for k in choices])
        assert chi_square(counts, weights) < critical(3)
        # ... and fails against the uniform law it is not.
        assert chi_square(counts) > critical(3)

    def test_token_budgets_follow_weights(self):
        weights = (0.1, 0.2, 0.7)
        budgets = routing.sample_token_budgets((1, 3, 5), 30_000, generator=seeded(23), weights=weights)
        assert chi_square(torch.bincount(budgets)[[1, 3, 5]], weights) < critical(2)


class TestScores:
    def test_selection_scores_rank_like_megatron(self):
        logits = torch.randn(64, 8, generator=seeded(18))
        bias = torch.randn(8, generator=seeded(19))
        assert torch.equal(routing.selection_scores(logits, "softmax"), logits)
        assert torch.allclose(
            routing.selection_scores(logits, "softmax", use_pre_softmax=True), logits.softmax(-1)
        )
        assert torch.allclose(
            routing.selection_scores(logits, "sigmoid", expert_bias=bias), logits.sigmoid() + bias
        )

    def test_group_limited_scores_keep_whole_groups(self):
        scores = torch.randn(128, 16, generator=seeded(20))
        masked = routing.group_limited_scores(scores, num_groups=4, group_topk=2, group_score_topk=2)
        kept = torch.isfinite(masked).view(128, 4, 4)
        assert (kept.all(-1) | ~kept.any(-1)).all(), "groups are kept or dropped whole"
        assert (kept.all(-1).sum(-1) == 2).all()
        best_group = scores.view(128, 4, 4).topk(2, -1).values.sum(-1).argmax(-1)
        assert kept.all(-1).gather(1, best_group[:, None]).all()


class TestTopPBudgets:
    def test_fewest_experts_whose_mass_reaches_p(self):
        ranked = torch.tensor([[0.6, 0.3, 0.1], [0.4, 0.35, 0.25], [0.9, 0.05, 0.05]])
        assert routing.top_p_budgets(ranked, 0.5).tolist() == [1, 2, 1]
        assert routing.top_p_budgets(ranked, 0.9).tolist() == [2, 3, 1]
        # Never reached within k_max: the cap.
        assert routing.top_p_budgets(ranked[:, :2], 0.99).tolist() == [2, 2, 2]

    def test_matches_a_brute_force_count(self):
        probs = torch.softmax(torch.randn(2000, 16, generator=seeded(7)) * 2, -1)
        ranked = probs.sort(-1, descending=True).values[:, :6]
        for p in (0.2, 0.5, 0.8):
            got = routing.top_p_budgets(ranked, p)
            expected = torch.tensor([
                next((j + 1 for j in range(6) if ranked[t, : j + 1].sum() >= p), 6)
                for t in range(ranked.shape[0])
            ])
            # Ties at the threshold can round either way: allow none here by checking margins.
            margin = (ranked.cumsum(-1) - p).abs().min(-1).values > 1e-6
            assert torch.equal(got[margin], expected[margin])
            assert margin.float().mean() > 0.99
