"""`ElasticRouter`: Megatron's `TopKRouter` with EMoE / M-MoE selection and an inference budget.

The router decides *which* experts each token activates; gates, aux losses, token dropping, z-loss
and expert-bias updates stay Megatron's own code, fed with the map that is actually dispatched.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from megatron.core.transformer.moe.moe_utils import (
    apply_router_token_dropping,
    compute_routing_scores_for_aux_loss,
    get_default_pg_collection,
    get_tokens_per_expert_and_token_count,
    switch_load_balancing_loss_func,
    topk_routing_with_score_function,
)
from megatron.core.transformer.moe.router import TopKRouter

from megatron_emoe import router_metrics, routing
from megatron_emoe.budget import Budget, BudgetLike, TopP
from megatron_emoe.config import ElasticMoEConfig
from megatron_emoe.draws import TrainingDraws
from megatron_emoe.layers import layer_slot
from megatron_emoe.router_metrics import HR_LOSS as HR_LOSS_NAME


class ElasticRouter(TopKRouter):
    """Routes with Top-k (+ L_HR), EMoE or M-MoE in training and with top-k' under a set budget
    in eval.

    Plugs in through `MoESubmodules.router` (see `with_elastic_router`). Its training draws
    (`megatron_emoe.draws`) replay under activation recompute with any schedule, are
    independent across DP/EP/CP/SP ranks, and give model/layer M-MoE budgets that every rank
    agrees on.
    """

    def __init__(self, config, pg_collection=None, is_mtp_layer: bool = False, *, elastic=None):
        elastic = elastic if elastic is not None else ElasticMoEConfig()
        elastic.validate(config)
        # Like MoELayer: default to the global parallel groups when built on its own.
        pg_collection = pg_collection if pg_collection is not None else get_default_pg_collection()
        super().__init__(config=config, pg_collection=pg_collection, is_mtp_layer=is_mtp_layer)
        self.elastic = elastic
        self.train_topk = config.moe_router_topk
        self.mmoe_budgets = elastic.mmoe_budgets(self.train_topk)
        self.mmoe_weights = elastic.mmoe_weights(self.train_topk)
        # Eval-time budget k' of the whole model (None: the training top-k); see
        # `active_topk`.
        self.budget: Optional[Budget] = elastic.inference_budget
        # Experts per token the dispatcher must expect for the current forward (max if per-token).
        self.dispatch_topk: int = self.train_topk
        self.draws = TrainingDraws(elastic.mmoe_seed, elastic.mmoe_resample_every)
        self._data_rank: Optional[int] = None
        # Mean router entropy of the current training forward, when routing computed it.
        self._entropy: Optional[torch.Tensor] = None
        # When True (the co-activation recorder sets it while attached), each `routing()` leaves
        # the mean router entropy (nats, detached) of its non-padding tokens in `last_entropy`,
        # computed from this forward's own logits; routing outputs are unchanged.
        self.track_entropy: bool = False
        self.last_entropy: Optional[torch.Tensor] = None

    # ---------------------------------------------------------------------------------------
    # Budget
    # ---------------------------------------------------------------------------------------
    def set_budget(self, budget: BudgetLike) -> None:
        """Set the model's eval-time budget (see `Budget.of`); None = training k."""
        budget = Budget.of(budget)
        self.budget = None if budget is None else budget.validate(self.config)

    @property
    def active_topk(self) -> Union[None, int, TopP]:
        """This layer's eval-time k' (or token-adaptive `TopP`), None for the training top-k."""
        if self.budget is None:
            return None
        return self.budget.for_layer(self.config, self.layer_number, self.is_mtp_layer)

    # ---------------------------------------------------------------------------------------
    # Training draws
    # ---------------------------------------------------------------------------------------
    def begin_step(self, step: int) -> None:
        """Enter optimizer step `step` (see `TrainingDraws.begin_step`)."""
        self.draws.begin_step(step)

    def _data_position(self) -> int:
        """The global rank of the first rank holding this rank's tokens: TP ranks share tokens
        unless sequence parallel; DP, EP and CP ranks never do."""
        if self._data_rank is None:
            group = self.tp_group
            if not torch.distributed.is_initialized():
                self._data_rank = 0
            elif group is None or group.size() == 1 or self.config.sequence_parallel:
                self._data_rank = torch.distributed.get_rank()
            else:
                self._data_rank = torch.distributed.get_global_rank(group, 0)
        return self._data_rank

    def _plan(
        self, num_tokens: int, device, eval_topk: Optional[int]
    ) -> tuple[int, Optional[torch.Tensor], Optional[torch.Generator]]:
        """This forward's budget and draws: (k, None, generator) for one k for every token, or
        (k_max, [tokens] budgets, generator); the generator serves EMoE sampling (None in eval)."""
        if not self.training:
            return (eval_topk or self.train_topk), None, None
        key, microbatch = self.draws.next_key()
        generator = self.draws.generator(key, self._data_position(), device)
        if self.elastic.mode != "mmoe":
            return self.train_topk, None, generator
        if self.elastic.mmoe_sample_level == "token":
            budgets = routing.sample_token_budgets(
                self.mmoe_budgets, num_tokens, device, generator, self.mmoe_weights
            )
            return max(self.mmoe_budgets), self._agree_across_tp(budgets), generator
        stream = 0 if self.elastic.mmoe_sample_level == "model" else layer_slot(
            self.config, self.layer_number or 0, self.is_mtp_layer
        )
        k = self.draws.budget(self.mmoe_budgets, self.mmoe_weights, stream, microbatch)
        return k, None, generator

    # ---------------------------------------------------------------------------------------
    # Routing
    # ---------------------------------------------------------------------------------------
    def routing(self, logits: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        """Return sparse gates and the boolean routing map, both `[tokens, experts]`."""
        self._entropy = self.last_entropy = None
        probs, routing_map = self._route(logits, padding_mask)
        if self.track_entropy:
            self.last_entropy = self._tracked_entropy(logits, padding_mask)
        if self.training and torch.is_grad_enabled():  # once per micro-batch, not on recompute
            router_metrics.record(
                self, logits.view(-1, self.config.num_moe_experts), routing_map,
                entropy=self._entropy,
            )
        return probs, routing_map

    def _tracked_entropy(
        self, logits: torch.Tensor, padding_mask: Optional[torch.Tensor]
    ) -> Optional[torch.Tensor]:
        """Mean router entropy of this forward's non-padding tokens: the one the training path
        computed (`_entropy`), else `routing.router_entropy` of the logits; None without tokens."""
        if self._entropy is not None:
            return self._entropy
        with torch.no_grad():
            logits = logits.reshape(-1, self.config.num_moe_experts)
            if padding_mask is not None:
                logits = logits[~padding_mask.reshape(-1).bool()]
            return routing.router_entropy(logits) if logits.shape[0] else None

    def _route(self, logits: torch.Tensor, padding_mask: Optional[torch.Tensor]):
        self.topk = self.dispatch_topk = self.train_topk
        eval_topk = None if self.training else self.active_topk
        # Top-k mode, or EMoE's Top-k phase (before --emoe-start-iter): exactly Megatron's
        # top-k, + L_HR. It takes no training key, in the forward and its recompute alike.
        topk_training = self.training and self.elastic.routes_topk_at(self.draws.step)
        if topk_training or (self.elastic.mode == "topk" and not eval_topk):
            probs, routing_map = super().routing(logits, padding_mask=padding_mask)
            if self.training and torch.is_grad_enabled() and self.elastic.hr_loss_coeff:
                logits = logits.reshape(-1, self.config.num_moe_experts)
                full_softmax = torch.softmax(logits, dim=-1, dtype=torch.float32)
                mask = None if padding_mask is None else padding_mask.reshape(-1)
                probs = self._apply_hr_loss(probs, full_softmax, mask)
            return probs, routing_map

        seq_length, bsz = logits.shape[:2]
        logits = logits.view(-1, self.config.num_moe_experts)
        if padding_mask is not None:
            padding_mask = padding_mask.reshape(-1)
        logits = self.apply_z_loss(logits, padding_mask=padding_mask)

        if isinstance(eval_topk, TopP):
            k = eval_topk.max_experts
            chosen = self._choose_experts(logits, k, None)
            budgets = self._top_p_budgets(logits, chosen, eval_topk.p)
        else:
            k, budgets, generator = self._plan(logits.shape[0], logits.device, eval_topk)
            chosen = self._choose_experts(logits, k, generator)
        probs, routing_map = self._gate(logits, chosen, budgets)
        # Megatron's aux-loss helpers and the capacity read the mean experts per token.
        self.topk = k if budgets is None else budgets.float().mean()
        self.dispatch_topk = k
        map_for_aux_loss = routing_map

        if self.config.moe_expert_capacity_factor is not None:
            # Capacity follows the experts per token actually drawn (their mean when per token).
            probs, routing_map = apply_router_token_dropping(
                probs,
                routing_map,
                router_topk=float(self.topk),
                capacity_factor=self.config.moe_expert_capacity_factor,
                drop_policy=self.config.moe_token_drop_policy,
                pad_to_capacity=self.config.moe_pad_expert_input_to_capacity,
            )
        if self.training and torch.is_grad_enabled():
            # One softmax over all experts `[tokens, experts]` serves the aux losses, L_HR and
            # the entropy metric (each used to compute its own).
            full_softmax = torch.softmax(logits, dim=-1, dtype=torch.float32)
            if self.is_aux_loss_enabled():
                probs = self._apply_aux_losses(
                    probs, logits, map_for_aux_loss, padding_mask, seq_length, bsz, full_softmax
                )
            probs = self._apply_hr_loss(probs, full_softmax, padding_mask)
        self._apply_expert_bias(routing_map, padding_mask=padding_mask)
        return probs, routing_map

    def _choose_experts(
        self, logits: torch.Tensor, k: int, generator: Optional[torch.Generator]
    ) -> torch.Tensor:
        """`[tokens, k]` experts: sampled from the top-k_ideal pool with `generator` (EMoE
        training, k_ideal of the current step) or top-k."""
        cfg = self.config
        with torch.no_grad():
            scores = routing.selection_scores(
                logits, self.score_function, cfg.moe_router_pre_softmax, self.expert_bias
            )
            if cfg.moe_router_num_groups and cfg.moe_router_group_topk:
                scores = routing.group_limited_scores(
                    scores,
                    cfg.moe_router_num_groups,
                    cfg.moe_router_group_topk,
                    self.train_topk // cfg.moe_router_group_topk,
                )
            if self.training and self.elastic.mode == "emoe":
                k_ideal = self.elastic.k_ideal_at(self.draws.step, self.train_topk)
                return self._agree_across_tp(
                    routing.sample_coactivation(scores, k, k_ideal, generator)
                )
            return routing.topk_indices(scores, k)

    def _top_p_budgets(self, logits: torch.Tensor, chosen: torch.Tensor, p: float) -> torch.Tensor:
        """`[tokens]` budgets: the fewest of each token's ranked `chosen` experts whose share of
        the router's probability over all experts reaches p (sigmoid-type scores are normalised
        to sum to 1 first)."""
        with torch.no_grad():
            probs = routing.router_probabilities(logits, self.score_function)
            return routing.top_p_budgets(probs.gather(1, chosen), p)

    def _agree_across_tp(self, drawn: torch.Tensor) -> torch.Tensor:
        """Random draws for tokens that every TP rank holds (no sequence parallelism) come from
        TP rank 0, so the ranks agree whatever their RNG states; sharded tokens need nothing."""
        group = self.tp_group
        if group is None or group.size() == 1 or self.config.sequence_parallel:
            return drawn
        source = torch.distributed.get_global_rank(group, 0)
        torch.distributed.broadcast(drawn, src=source, group=group)
        return drawn

    def _gate(self, logits, chosen, budgets):
        """Gates over the chosen experts with Megatron's own score-function code."""
        if budgets is None:
            return self._gate_fixed(logits, chosen)
        # Per-token budgets: one Megatron call per distinct k (few), not per token.
        probs = torch.zeros_like(logits)
        routing_map = torch.zeros_like(logits, dtype=torch.bool)
        for k in budgets.unique().tolist():
            rows = (budgets == k).nonzero(as_tuple=True)[0]
            rows_probs, rows_map = self._gate_fixed(logits[rows], chosen[rows, :k])
            probs = probs.index_put((rows,), rows_probs)
            routing_map = routing_map.index_put((rows,), rows_map)
        return probs, routing_map

    def _gate_fixed(self, logits, chosen):
        """Megatron's gates for `chosen` `[tokens, k]`. Sigmoid-type gates of a model trained
        with k > 1 are normalised over the chosen experts, at k' = 1 too (gate 1 x scaling
        factor, as transformers' DeepSeek-V3 does); Megatron skips that normalisation for k = 1,
        which is right only for a model trained at top-1."""
        probs, routing_map = topk_routing_with_score_function(
            logits,
            chosen.shape[1],
            use_pre_softmax=self.config.moe_router_pre_softmax,
            scaling_factor=self.config.moe_router_topk_scaling_factor,
            score_function=self.score_function,
            precomputed_indices=chosen,
        )
        if chosen.shape[1] == 1 and self.train_topk > 1 and self.score_function != "softmax":
            # s / s: a constant gate, with the zero gradient normalisation gives it
            probs = routing_map.to(probs.dtype) * (self.config.moe_router_topk_scaling_factor or 1.0)
        return probs, routing_map

    def _apply_aux_losses(
        self, probs, logits, routing_map, padding_mask, seq_length, bsz, full_softmax
    ):
        """Megatron's load-balancing losses, counted on the map this router dispatches."""
        if self.score_function == "softmax" and not self.config.moe_router_fusion:
            # What compute_routing_scores_for_aux_loss returns, without its unused top-k map.
            scores = full_softmax
            if padding_mask is not None:
                scores = scores * (~padding_mask).unsqueeze(-1)
        else:
            _, scores = compute_routing_scores_for_aux_loss(
                logits,
                self.dispatch_topk,
                self.score_function,
                fused=self.config.moe_router_fusion,
                padding_mask=padding_mask,
            )
        if padding_mask is not None:
            routing_map = routing_map & ~padding_mask.unsqueeze(-1)
        padded = padding_mask is not None
        probs = self._apply_aux_loss(probs, scores, routing_map, with_padding_mask=padded)
        probs = self._apply_seq_aux_loss(
            probs, scores, routing_map, seq_length, bsz, with_padding_mask=padded
        )
        return self._apply_global_aux_loss(probs, scores, routing_map, with_padding_mask=padded)

    def _apply_global_aux_loss(self, probs, scores_for_aux_loss, routing_map,
                               with_padding_mask: bool = False):
        """Megatron's global-batch aux loss, with each micro-batch's expert counts divided by
        its own experts per token before they are summed over the step: Σf_i = 1 when k varies
        between micro-batches (Megatron divides the summed counts by the current k)."""
        coeff = self.get_aux_loss_coeff("global_aux_loss")
        if coeff == 0:
            return probs
        counts, local_num_tokens, total_num_tokens = get_tokens_per_expert_and_token_count(
            routing_map=routing_map, reduce_group=self.tp_dp_cp_group,
            with_padding_mask=with_padding_mask, topk=self.topk,
        )
        self.global_tokens_per_expert += counts / self.topk  # [experts] shares of tokens
        self.ga_steps += 1
        loss = switch_load_balancing_loss_func(
            probs=scores_for_aux_loss,
            tokens_per_expert=self.global_tokens_per_expert / self.ga_steps,
            total_num_tokens=total_num_tokens,
            topk=1,
            num_experts=self.config.num_moe_experts,
            moe_aux_loss_coeff=coeff,
            fused=self.config.moe_router_fusion,
        )
        return self.attach_and_log_load_balancing_loss(
            probs, coeff, loss, "global_load_balancing_loss", self.tp_dp_cp_group,
            needs_dp_avg=False, valid_token_count=local_num_tokens,
        )

    def _apply_hr_loss(self, probs, full_softmax, padding_mask):
        """Attach coeff * L_HR like Megatron's aux losses (scaled by the loss scale, logged);
        keep the router entropy for the metrics (L_HR = entropy - log N)."""
        if padding_mask is not None:
            full_softmax = full_softmax[~padding_mask]
        coeff = self.elastic.hr_loss_coeff
        with torch.set_grad_enabled(coeff != 0):
            hr_loss = routing.hierarchical_router_loss(full_softmax)
        self._entropy = hr_loss.detach() + math.log(full_softmax.shape[-1])
        if coeff == 0:
            return probs
        # Each TP/CP rank averages its own tokens and router grads are summed over TP/CP, so
        # divide by that group's size (as Megatron does for the z-loss).
        return self.attach_and_log_load_balancing_loss(
            probs,
            coeff,
            hr_loss * coeff / self.tp_cp_group.size(),
            HR_LOSS_NAME,
            self.tp_cp_group,
            valid_token_count=full_softmax.shape[0],
        )
