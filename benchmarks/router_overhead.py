"""Training-time cost of elastic routing: `ElasticRouter` against Megatron's own `TopKRouter`.

For each number of experts E and tokens T it builds, from Megatron's GPT layer spec, three real MoE
layers with the same weights:

- `topk`: Megatron's `MoELayer` with its `TopKRouter` (the spec as Megatron ships it);
- `emoe`: `with_elastic_router(spec, ElasticMoEConfig(mode="emoe", k_ideal=2k, hr_loss_coeff=...))`,
  an `ElasticMoELayer` whose `ElasticRouter` samples k of the top-2k experts and adds L_HR;
- `mmoe`: the same with `mode="mmoe"` (k drawn from 1..k once per layer and forward).

and times, in training mode, forward + backward of (a) the router alone (`layer.router(x)`, then
`probs.backward(g)`: gating GEMM, selection, gates, Megatron's aux loss, L_HR, router metrics) and
(b) the whole layer (router, alltoall dispatch/permute, experts, combine). All variants are timed
round-robin in one process; each ratio variant/topk is the median of per-round ratios.

Note on `mmoe`: its whole-layer time runs on average (1+k)/2 experts per token instead of k, so its
layer ratio is below 1 for that reason; its router ratio is the comparable figure.

Targets (H100, 64 experts, 16384 tokens): router emoe/topk <= 1.10, layer emoe/topk <= 1.02.
They are printed as met / not met on CUDA; CPU figures are recorded only.

    python -m benchmarks.router_overhead              # CPU: reduced grid, hidden 256; GPU: full grid
    python -m benchmarks.router_overhead --full       # experts 8,64,256 x tokens 4096,16384,65536
    python -m benchmarks.router_overhead --te         # CUDA + Transformer Engine: grouped GEMM
    python -m benchmarks.router_overhead --quick      # seconds, for the tests
    python -m benchmarks.router_overhead --profile    # + torch.profiler tables of each router
"""

from __future__ import annotations



from benchmarks import common  # noqa: E402
import torch  # noqa: E402

from megatron_emoe import ElasticMoEConfig  # noqa: E402

NAME = "router_overhead"
TARGET_POINT = (64, 16384)
TARGETS = {"router": 1.10, "layer": 1.02}


def parse_args(argv=None):
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--full", action="store_true",
                   help="the full grid: experts 8,64,256 x tokens 4096,16384,65536 (CUDA default)")
    p.add_argument("--experts", type=common.int_list, default=None, help="e.g. 8,64,256")
    p.add_argument("--tokens", type=common.int_list, default=None, help="e.g. 4096,16384")
    p.add_argument("--hidden", type=int, default=None, help="hidden size (CUDA 1024, CPU 256)")
    p.add_argument("--ffn-hidden", type=int, default=None,
                   help="FFN width of one expert (default: the hidden size)")
    p.add_argument("--topk", type=int, default=2, help="k; EMoE's k_ideal is 2k")
    p.add_argument("--hr-loss-coeff", type=float, default=1e-8, help="L_HR weight (EMoE, FFN experts)")
    p.add_argument("--aux-loss-coeff", type=float, default=1e-2,
                   help="Megatron's load-balancing loss, on for every variant (0: off)")
    p.add_argument("--router-fusion", action="store_true",
                   help="Megatron's fused TE router kernels (moe_router_fusion); CUDA + TE only. "
                        "TopKRouter uses them for top-k; ElasticRouter only for its aux-loss scores")
    p.add_argument("--variants", default="topk,emoe,mmoe", help="topk is always included")
    p.add_argument("--profile", action="store_true",
                   help="after timing, print torch.profiler tables of each router's forward+backward")
    args = common.finish_args(p.parse_args(argv), cpu_repeats=15)
    if args.router_fusion and not (common.CUDA and common.HAVE_TE):
        p.error("--router-fusion needs CUDA and Transformer Engine")
    full = args.full or (common.CUDA and not args.quick)
    if args.quick:
        experts, tokens, hidden = [8, 64], [1024], 64
    elif full:
        experts, tokens, hidden = [8, 64, 256], [4096, 16384, 65536], 1024 if common.CUDA else 256
    else:  # CPU default: a few minutes on 2 cores
        experts, tokens, hidden = [8, 64, 256], [4096, 16384], 256
    args.experts = args.experts or experts
    args.tokens = args.tokens or tokens
    args.hidden = args.hidden or hidden
    args.ffn_hidden = args.ffn_hidden or args.hidden
    variants = [v for v in args.variants.split(",") if v and v != "topk"]
    unknown = set(variants) - {"emoe", "mmoe"}
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; choose from topk, emoe, mmoe")
    args.variants = ["topk", *variants]
    return args


def elastic_configs(args) -> dict[str, ElasticMoEConfig]:
    k = args.topk
    return {
        "emoe": ElasticMoEConfig(mode="emoe", k_ideal=2 * k, hr_loss_coeff=args.hr_loss_coeff),
        "mmoe": ElasticMoEConfig(mode="mmoe", mmoe_k_min=1, mmoe_k_max=k, mmoe_sample_level="layer"),
    }


def build_layers(args, num_experts: int) -> dict:
    """The variants' layers, all with the weights of the `topk` one."""
    config = common.transformer_config(
        te=args.te, hidden_size=args.hidden, ffn_hidden_size=args.ffn_hidden,
        moe_ffn_hidden_size=args.ffn_hidden, num_attention_heads=max(1, args.hidden // 64),
        num_moe_experts=num_experts, moe_router_topk=args.topk,
        moe_aux_loss_coeff=args.aux_loss_coeff, moe_router_fusion=args.router_fusion,
    )
    common.reseed(args.seed)
    layers = {"topk": common.moe_layer(config, None, te=args.te)}
    configs = elastic_configs(args)
    for name in args.variants[1:]:
        layers[name] = common.moe_layer(config, configs[name], te=args.te)
        common.copy_weights(layers["topk"], layers[name])
    return layers


def step_functions(layers: dict, tokens: int, hidden: int, num_experts: int, seed: int):
    """Forward + backward closures: {scope: {variant: fn}} for scope in router, layer."""
    generator = torch.Generator().manual_seed(seed)
    dtype, dev = common.model_dtype(), common.device()

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(dev, dtype)

    x = randn(tokens, 1, hidden).requires_grad_()
    grad_probs = randn(tokens, num_experts)
    grad_out = randn(tokens, 1, hidden)

    def router_step(layer):
        layer.router.zero_grad(set_to_none=True)
        x.grad = None
        probs, _ = layer.router(x)
        probs.backward(grad_probs)  # probs have the input dtype (no moe_router_dtype set)

    def layer_step(layer):
        layer.zero_grad(set_to_none=True)
        x.grad = None
        out, _ = layer(x)
        out.backward(grad_out)

    return {
        "router": {n: (lambda l=l: router_step(l)) for n, l in layers.items()},
        "layer": {n: (lambda l=l: layer_step(l)) for n, l in layers.items()},
    }


def profile(fns: dict, label: str) -> None:
    """Print the ops where each variant's time goes (self time, top 15)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if common.CUDA:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    sort = "self_cuda_time_total" if common.CUDA else "self_cpu_time_total"
    for name, fn in fns.items():
        fn()
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(5):
                fn()
            common.sync()
        print(f"--- profile {label} {name} (5 calls) ---")
        print(prof.key_averages().table(sort_by=sort, row_limit=15))


def body(args):
    common.set_aux_loss_scale()
    figures, targets = [], []
    for num_experts in args.experts:
        layers = build_layers(args, num_experts)
        for tokens in args.tokens:
            fns = step_functions(layers, tokens, args.hidden, num_experts, args.seed)
            for scope in ("router", "layer"):
                times = common.time_interleaved(fns[scope], args.warmup, args.repeats,
                                                args.min_sample_ms)
                base = common.summary(times["topk"])
                for variant in args.variants[1:]:
                    ratio = common.paired_ratio(times[variant], times["topk"])
                    stats = common.summary(times[variant])
                    figures.append({
                        "scope": scope, "experts": num_experts, "tokens": tokens,
                        "variant": variant, "baseline": "topk", "ratio": ratio,
                        "variant_ms": stats, "baseline_ms": base,
                    })
                    print(f"{scope:6s} experts={num_experts:<4d} tokens={tokens:<6d} "
                          f"{variant}/topk = {ratio:.3f}  ({stats['median_ms']:.3f} ms vs "
                          f"{base['median_ms']:.3f} ms, fwd+bwd)", flush=True)
                    if variant == "emoe" and (num_experts, tokens) == TARGET_POINT:
                        targets.append(common.target_line(
                            f"{scope} emoe/topk at {num_experts} experts, {tokens} tokens",
                            ratio, TARGETS[scope]))
                        common.print_target(targets[-1])
                if args.profile:
                    profile(fns[scope], f"{scope} experts={num_experts} tokens={tokens}")
            del fns
        del layers
    return figures, targets


def main(argv=None):
    args = parse_args(argv)
    figures, targets = common.launch(body, args)
    settings = {
        "hidden_size": args.hidden, "expert_ffn_hidden_size": args.ffn_hidden, "topk": args.topk,
        "k_ideal": 2 * args.topk, "hr_loss_coeff": args.hr_loss_coeff,
        "aux_loss_coeff": args.aux_loss_coeff, "router_fusion": args.router_fusion,
        "experts": args.experts, "tokens": args.tokens, "variants": args.variants,
        "dtype": common.model_dtype(), "dispatcher": "alltoall",
        "mmoe": "k drawn from 1..topk per layer and forward",
        "timed": "forward + backward in training mode; ratio = median of per-round ratios",
    }
    common.write_results(NAME, args, settings, figures, targets)


if __name__ == "__main__":
    main()
