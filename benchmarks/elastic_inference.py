"""Inference throughput at k' active experts: an elastic model run at k' against a native top-k'.

The elastic side is built once with top-k = 2 (EMoE, k_ideal = 4) through `with_elastic_router` and
switched to k' with `megatron_emoe.set_active_experts(model, k')`. The native side is Megatron's
own spec (`MoELayer` + `TopKRouter`) configured with `moe_router_topk = k'`, with the elastic
model's weights copied in (router and expert shapes do not depend on k). Both run eval-mode
forwards under `torch.no_grad()`, interleaved round-robin in one process:

- `layer`: one MoE layer on [tokens, 1, hidden] activations;
- `model`: a small real `GPTModel` (RoPE, every layer MoE), token ids in, logits out.

Reported per k': tokens/s of each and ratio = elastic / native throughput (the median of per-round
ratios). Target on an H100: ratio >= 0.98 (elastic within 2% of native) at every k'.

    python -m benchmarks.elastic_inference            # CPU defaults (or GPU defaults on CUDA)
    python -m benchmarks.elastic_inference --te       # CUDA + Transformer Engine specs
    python -m benchmarks.elastic_inference --quick    # seconds, for the tests
"""

from __future__ import annotations



from benchmarks import common  # noqa: E402
import torch  # noqa: E402

from megatron_emoe import ElasticMoEConfig, set_active_experts  # noqa: E402

NAME = "elastic_inference"
TRAIN_TOPK = 2
TARGET_RATIO = 0.98

# (experts, hidden, expert ffn, layer tokens, model layers, heads, seq, batch, vocab, k' values)
SIZES = {
    "quick": dict(experts=8, hidden=64, ffn=64, tokens=512, layers=2, heads=2, seq=64, batch=2,
                  vocab=512, budgets=[1, 2, 4]),
    "cpu": dict(experts=16, hidden=256, ffn=256, tokens=4096, layers=2, heads=4, seq=512, batch=4,
                vocab=8192, budgets=[1, 2, 4, 6]),
    "cuda": dict(experts=64, hidden=1024, ffn=1024, tokens=16384, layers=4, heads=16, seq=2048,
                 batch=8, vocab=32768, budgets=[1, 2, 4, 6, 8]),
}


def parse_args(argv=None):
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--budgets", type=common.int_list, default=None, help="k' values, e.g. 1,2,4,6")
    for name, kind in (("experts", int), ("hidden", int), ("ffn", int), ("tokens", int),
                       ("layers", int), ("heads", int), ("seq", int), ("batch", int),
                       ("vocab", int)):
        p.add_argument(f"--{name}", type=kind, default=None,
                       help=f"default: {SIZES['cpu'][name]} on CPU, {SIZES['cuda'][name]} on CUDA")
    p.add_argument("--scopes", default="layer,model", help="layer, model or both")
    args = common.finish_args(p.parse_args(argv), cpu_repeats=25)
    defaults = SIZES["quick" if args.quick else ("cuda" if common.CUDA else "cpu")]
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.scopes = [s for s in args.scopes.split(",") if s]
    if set(args.scopes) - {"layer", "model"}:
        p.error("--scopes takes layer and/or model")
    if max(args.budgets) > args.experts:
        p.error(f"k' values must be <= --experts ({args.experts})")
    return args


def config(args, topk: int):
    # Megatron refuses top-1 without pre-softmax (a softmax over one logit has no gradient), so
    # the native top-1 model uses it: its gate is the top expert's full-softmax probability
    # (one extra [tokens, experts] softmax) where the elastic model at k'=1 gates with 1.0.
    return common.transformer_config(
        te=args.te, num_layers=args.layers, hidden_size=args.hidden,
        ffn_hidden_size=args.ffn, moe_ffn_hidden_size=args.ffn, num_attention_heads=args.heads,
        num_moe_experts=args.experts, moe_router_topk=topk, moe_router_pre_softmax=topk == 1,
    )


def elastic_config() -> ElasticMoEConfig:
    return ElasticMoEConfig(mode="emoe", k_ideal=2 * TRAIN_TOPK, hr_loss_coeff=1e-8)


def build(args, scope: str, topk: int, elastic):
    if scope == "layer":
        return common.moe_layer(config(args, topk), elastic, te=args.te)
    return common.gpt_model(config(args, topk), elastic, args.vocab, args.seq, te=args.te)


def forward_fn(args, scope: str, module):
    """A no-grad eval forward of `module` and the number of tokens it processes."""
    if scope == "layer":
        generator = torch.Generator().manual_seed(args.seed)
        x = torch.randn(args.tokens, 1, args.hidden, generator=generator)
        x = x.to(common.device(), common.model_dtype())

        def run():
            with torch.no_grad():
                module(x)

        return run, args.tokens
    tokens, positions, mask, _ = common.gpt_batch(args.batch, args.seq, args.vocab, te=args.te,
                                                  seed=args.seed)

    def run():
        with torch.no_grad():
            module(tokens, positions, mask)

    return run, args.batch * args.seq


def body(args):
    figures, targets = [], []
    for scope in args.scopes:
        common.reseed(args.seed)
        elastic = build(args, scope, TRAIN_TOPK, elastic_config()).eval()
        run_elastic, tokens = forward_fn(args, scope, elastic)
        for k in args.budgets:
            native = build(args, scope, k, None).eval()
            common.copy_weights(elastic, native)
            set_active_experts(elastic, k)
            run_native, _ = forward_fn(args, scope, native)
            times = common.time_interleaved({"elastic": run_elastic, "native": run_native},
                                            args.warmup, args.repeats, args.min_sample_ms)
            # throughput ratio elastic/native = time native / time elastic, per round
            ratio = common.paired_ratio(times["native"], times["elastic"])
            e, n = common.summary(times["elastic"]), common.summary(times["native"])
            figure = {
                "scope": scope, "k": k, "train_topk": TRAIN_TOPK, "tokens_per_forward": tokens,
                "native_pre_softmax": k == 1,
                "elastic_tokens_per_s": tokens / (e["median_ms"] / 1e3),
                "native_tokens_per_s": tokens / (n["median_ms"] / 1e3),
                "ratio": ratio, "elastic_ms": e, "native_ms": n,
            }
            figures.append(figure)
            print(f"{scope:5s} k'={k:<2d} elastic {figure['elastic_tokens_per_s']:,.0f} tok/s, "
                  f"native top-{k} {figure['native_tokens_per_s']:,.0f} tok/s, "
                  f"elastic/native = {ratio:.3f}", flush=True)
            targets.append(common.target_line(f"{scope} elastic/native throughput at k'={k}",
                                              ratio, TARGET_RATIO, higher_is_better=True))
            common.print_target(targets[-1])
            del native
        set_active_experts(elastic, None)
        del elastic
    return figures, targets


def main(argv=None):
    args = parse_args(argv)
    figures, targets = common.launch(body, args)
    settings = {
        "train_topk": TRAIN_TOPK, "elastic": elastic_config(), "budgets": args.budgets,
        "experts": args.experts, "hidden_size": args.hidden, "expert_ffn_hidden_size": args.ffn,
        "layer_tokens": args.tokens, "model_layers": args.layers, "heads": args.heads,
        "seq_length": args.seq, "batch_size": args.batch, "vocab_size": args.vocab,
        "dtype": common.model_dtype(), "dispatcher": "alltoall", "scopes": args.scopes,
        "timed": "eval-mode forward under no_grad; ratio = elastic/native tokens/s, "
                 "median of per-round ratios",
    }
    common.write_results(NAME, args, settings, figures, targets)


if __name__ == "__main__":
    main()
