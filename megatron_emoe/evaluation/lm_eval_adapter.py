"""EleutherAI lm-eval model adapter: a megatron-emoe checkpoint evaluated at a chosen budget k'.

`MegatronEMoELM` (registered with lm-eval as "megatron-emoe") loads a `torch_dist` checkpoint as
the training entry's GPTModel with elastic routers, sets the number of active experts per token
with `set_active_experts`, and scores lm-eval requests with it. It runs in ONE process at TP = 1,
EP = 1 (dist_checkpointing reshards any saved TP/EP layout on load); inside `run_gloo(...,
world_size=1)` it uses that world, otherwise it opens its own one-rank gloo world. `set_budget`
changes k' between runs without reloading. `evaluate_budgets` runs lm-eval tasks at several budgets.

    import megatron_emoe.evaluation.lm_eval_adapter  # registers "megatron-emoe"
    lm_eval.simple_evaluate(model="megatron-emoe", model_args="load=CKPT,active_experts=1-2",
                            tasks=["emoe_mc"], task_manager=task_manager(["emoe_mc"]))

Model args: `load` (checkpoint folder), `active_experts` (`2` for every MoE layer, `1-2` one per
MoE layer, unset: the training top-k), `tokenizer_model` (default: the checkpoint's), `batch_size`,
`max_length` (default: the checkpoint's seq_length), `max_gen_toks`. lm-eval is an optional
dependency (`pip install megatron-emoe[eval]`); importing this module needs it.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.distributed as dist
from lm_eval import simple_evaluate
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator
from lm_eval.tasks import TaskManager
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm
from transformers import AutoTokenizer

from megatron_emoe import budget as budgets
from megatron_emoe.budget import Budget, BudgetLike
from megatron_emoe.errors import UsageError
from megatron_emoe.runtime.saved_args import checkpoint_args
from megatron_emoe.runtime.launch import local_backend, megatron_session
from megatron_emoe.runtime.model import loaded_model
from megatron_emoe.routers import set_active_experts

TASKS_DIR = Path(__file__).resolve().with_name("tasks")  # the shipped local tasks (emoe_mc)


# ---------------------------------------------------------------------- process state ----
@contextlib.contextmanager
def single_process_megatron():
    """A one-rank gloo world with Megatron's parallel state (TP = EP = PP = 1), as
    `megatron_emoe.runtime.launch.run_gloo(fn, world_size=1)` sets up around `fn`; reused if one is open."""
    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() != 1:
            raise UsageError(
                "the megatron-emoe lm-eval adapter runs in one process at TP=1, EP=1; got a "
                f"world of {dist.get_world_size()} ranks"
            )
        yield
        return

    with tempfile.TemporaryDirectory(prefix="megatron-emoe-lm-eval-") as store_dir:
        backend = local_backend(1, torch.cuda.device_count())
        with megatron_session(0, 1, store_dir, timeout=600, backend=backend):
            yield


# ---------------------------------------------------------------------- the model --------
@register_model("megatron-emoe")
class MegatronEMoELM(TemplateLM):
    """A megatron-emoe checkpoint as an lm-eval causal LM at a settable inference budget."""

    def __init__(self, load: str, active_experts=None, tokenizer_model: str | None = None,
                 batch_size=1, max_length: int | None = None, max_gen_toks: int = 256,
                 **_ignored):  # lm-eval also passes device / max_batch_size
        super().__init__()
        self.batch_size = _positive_int(batch_size, "batch_size")
        self.max_gen_toks = _positive_int(max_gen_toks, "max_gen_toks")
        saved = checkpoint_args(load, "load")  # a UsageError when there is no whole checkpoint
        self.load = load
        self._tokenizer_path = tokenizer_model or saved.tokenizer_model
        self.tokenizer = AutoTokenizer.from_pretrained(self._tokenizer_path)
        if self.tokenizer.eos_token_id is None:
            raise UsageError(f"tokenizer {self._tokenizer_path} has no EOS token (used as prefix and stop)")
        self._max_length = _positive_int(max_length or saved.seq_length, "max_length")
        self._stack = contextlib.ExitStack()
        try:
            self._stack.enter_context(single_process_megatron())
            # Megatron's global args live only while loading: the built model does not need them.
            with loaded_model(load, tp=1, ep=1) as chunks:
                (self.model,) = chunks
            self.model.eval()
            self.vocab_size = min(len(self.tokenizer), saved.padded_vocab_size)
            self.set_budget(active_experts)
        except BaseException:
            self._stack.close()
            raise

    # -- lifecycle and budget ---------------------------------------------------------------
    def close(self) -> None:
        """Tear down the one-rank gloo world if this adapter opened it (idempotent)."""
        self._stack.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):  # lm-eval never closes models it built from a name: free the world then
        try:
            self.close()
        except Exception:
            pass

    def set_budget(self, active_experts: BudgetLike | str) -> Budget | None:
        """Route each token to k' experts from now on: an int, "1-2-3" / a list per MoE layer, or
        None (training top-k). Raises ValueError naming the allowed range."""
        budget = Budget.parse(active_experts, flag="active_experts")
        set_active_experts(self.model, budget)
        self.active_experts = budget
        return budget

    # -- what lm-eval reads -----------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def tokenizer_name(self) -> str:
        return self._tokenizer_path

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt=True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

    def tok_decode(self, tokens: Iterable[int]) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=True)

    def get_model_info(self) -> dict:
        return {"load": self.load, "active_experts": budgets.to_json(self.active_experts)}

    # -- scoring ----------------------------------------------------------------------------
    def logits(self, rows: list[list[int]]) -> torch.Tensor:
        """Logits `[batch, seq, vocab]` (fp32, tokenizer vocab) of right-padded token rows.

        Attention is causal, so a row's real positions never see its padding.
        """
        width = max(len(row) for row in rows)
        tokens = torch.full((len(rows), width), self.eot_token_id, dtype=torch.long)
        for i, row in enumerate(rows):
            tokens[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        tokens = tokens.to(self.device)
        positions = torch.arange(width, device=self.device).expand_as(tokens)
        with torch.no_grad():
            out = self.model(input_ids=tokens, position_ids=positions, attention_mask=None)
        return out[..., : self.vocab_size].float()

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        """(sum of log p(continuation | context), continuation is the greedy argmax) per request;
        contexts are cut from the left to `max_length`, longest requests run first (lm-eval's
        `Collator` orders, batches and restores the order)."""
        collator = Collator(requests, sort_fn=lambda request: -len(request[1]) - len(request[2]))
        results = []
        progress = tqdm(total=len(requests), disable=disable_tqdm, desc="megatron-emoe loglikelihood")
        for batch in collator.get_batched(n=self.batch_size):
            rows, targets = [], []
            for _, context, continuation in batch:
                if len(continuation) > self.max_length:
                    raise UsageError(f"a continuation of {len(continuation)} tokens does not fit in "
                                     f"max_length={self.max_length}")
                rows.append((list(context) + list(continuation))[-(self.max_length + 1):][:-1])
                targets.append(list(continuation))
            logprobs = torch.log_softmax(self.logits(rows), dim=-1)
            for j, (cache_key, _, _) in enumerate(batch):
                results.append(_score(logprobs[j, : len(rows[j])], targets[j]))
                if cache_key is not None:
                    self.cache_hook.add_partial("loglikelihood", cache_key, results[-1])
            progress.update(len(batch))
        progress.close()
        return collator.get_original(results)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole strings in disjoint windows of `max_length` tokens, each token
        scored once with as much context as the window allows (the first after the EOS prefix)."""
        pieces, owners = [], []
        for n, (string,) in enumerate(request.args for request in requests):
            windows = get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)
            for context, continuation in map(make_disjoint_window, windows):
                pieces.append((None, context, continuation))
                owners.append(n)
        totals = [0.0] * len(requests)
        for n, (logprob, _) in zip(owners, self._loglikelihood_tokens(pieces, disable_tqdm)):
            totals[n] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy decoding (no KV cache: each step re-runs the last `max_length` tokens) until a
        stop string, EOS or `max_gen_toks` new tokens; the text is cut before the stop string.
        Requests are batched by lm-eval's `Collator`, longest context first."""
        collator = Collator([request.args for request in requests], sort_fn=lambda args: -len(args[0]))
        results = []
        progress = tqdm(total=len(requests), disable=disable_tqdm, desc="megatron-emoe generate")
        for batch in collator.get_batched(n=self.batch_size):
            settings = [self._generation_settings(gen_kwargs) for _, gen_kwargs in batch]
            contexts = [self.tok_encode(context) or [self.prefix_token_id] for context, _ in batch]
            for args, (until, _), text in zip(batch, settings, self._greedy(contexts, settings)):
                results.append(_cut(text, until))
                self.cache_hook.add_partial("generate_until", args, results[-1])
            progress.update(len(batch))
        progress.close()
        return collator.get_original(results)

    def _generation_settings(self, gen_kwargs) -> tuple[list[str], int]:
        """(stop strings, max new tokens) of one request; sampling options are ignored (greedy)."""
        gen_kwargs = dict(gen_kwargs or {})
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        return until, int(gen_kwargs.get("max_gen_toks", self.max_gen_toks))

    def _greedy(self, contexts: list[list[int]], settings) -> list[str]:
        """Generated text of each context, decoding all rows of the batch together."""
        generated: list[list[int]] = [[] for _ in contexts]
        active = [j for j, (_, limit) in enumerate(settings) if limit > 0]
        while active:
            rows = [(contexts[j] + generated[j])[-self.max_length:] for j in active]
            logits = self.logits(rows)
            still = []
            for row, j in enumerate(active):
                token = int(logits[row, len(rows[row]) - 1].argmax())
                until, limit = settings[j]
                if token == self.eot_token_id:
                    continue
                generated[j].append(token)
                text = self.tok_decode(generated[j])
                if len(generated[j]) < limit and not any(stop in text for stop in until):
                    still.append(j)
            active = still
        return [self.tok_decode(tokens) for tokens in generated]


# ---------------------------------------------------------------------- running tasks ----
def task_manager(tasks: Iterable[str], include_paths: Iterable[str] = ()):
    """An lm-eval TaskManager over the shipped tasks and `include_paths`; lm-eval's built-in tasks
    are indexed too (tens of seconds) only when a requested name is not found locally."""
    paths = [str(TASKS_DIR), *map(str, include_paths)]
    local = TaskManager(include_path=paths, include_defaults=False)
    if not unknown_tasks(local, tasks):
        return local
    return TaskManager(include_path=paths)


def unknown_tasks(manager, tasks: Iterable[str]) -> list[str]:
    """The requested names (globs allowed) that match no task, group or tag of `manager`."""
    return [name for name in tasks if not manager.match_tasks([name])]


def evaluate_budgets(lm: MegatronEMoELM, budget_list: Iterable[BudgetLike], tasks: list[str], manager,
                     log=print, **evaluate_kwargs) -> list[dict]:
    """Run `tasks` with lm-eval's `simple_evaluate` at each budget in turn (one loaded model).

    Returns one entry per budget: {"active_experts", "label", "results": {task: {metric: value}},
    "seconds"}. `evaluate_kwargs` go to `simple_evaluate` (limit, num_fewshot, ...).
    """
    runs = []
    for budget in budget_list:
        label = budgets.label(lm.set_budget(budget))
        log(f"[lm-eval] active experts {label}: {', '.join(tasks)}")
        started = time.perf_counter()
        output = simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager,
                                 log_samples=False, **evaluate_kwargs)
        seconds = time.perf_counter() - started
        results = {task: {metric: value for metric, value in metrics.items() if metric != "alias"}
                   for task, metrics in output["results"].items()}
        for task, metrics in results.items():
            shown = ", ".join(f"{m}={v:.4f}" for m, v in metrics.items()
                              if isinstance(v, float) and "stderr" not in m)
            log(f"[lm-eval] active experts {label}: {task}: {shown} ({seconds:.1f} s)")
        runs.append({"active_experts": budgets.to_json(lm.active_experts), "label": label,
                     "results": results, "n_samples": output.get("n-samples", {}),
                     "seconds": round(seconds, 3)})
    return runs


# ---------------------------------------------------------------------- helpers ----------
def _positive_int(value, name: str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if isinstance(value, bool) or number < 1 or str(number) != str(value).strip():
        raise UsageError(f"{name} must be a positive integer, got {value!r}")
    return number


def _score(logprobs: torch.Tensor, target: list[int]) -> tuple[float, bool]:
    """Sum of the target's log-probs at the last len(target) positions of `logprobs` `[seq, vocab]`,
    and whether every target token is the argmax there."""
    if not target:
        return 0.0, True
    tail = logprobs[-len(target):]
    ids = torch.tensor(target, device=tail.device)
    picked = tail.gather(-1, ids[:, None]).squeeze(-1)
    return float(picked.sum()), bool((tail.argmax(-1) == ids).all())


def _cut(text: str, until: list[str]) -> str:
    """`text` up to the first occurrence of any stop string."""
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text
