"""GPTModel training step: tokens/s and model FLOPs utilisation, Top-k against EMoE (and M-MoE).

Builds a small real Megatron `GPTModel` (RoPE, every layer MoE, alltoall dispatcher, Megatron's aux
loss at 1e-2 in every variant) once per variant with the same initial weights:

- `topk`: Megatron's GPT decoder block spec as shipped (`MoELayer` + `TopKRouter`);
- `emoe`: the same spec through `with_elastic_router`, EMoE with k_ideal = 2k and L_HR (1e-8);
- `mmoe` (with `--variants topk,emoe,mmoe`): M-MoE, k drawn from 1..k per layer and step.

One training step = zero_grad, forward with labels, mean token loss, backward, `torch.optim.Adam`
step (fused on CUDA). The variants' steps alternate round-robin in one process on the same batch.
CPU: fp32. CUDA: bf16 parameters and activations (pure bf16; Megatron's own mixed-precision
optimizer keeps fp32 master weights, whose extra cost is not in this step), and with `--te` also
fp8 (Transformer Engine, hybrid format, delayed scaling).

FLOPs per token (the same for every variant: each token activates k experts in all of them):

    6 * N_active + 12 * L * s * d_attn

- N_active: parameters a token multiplies with, counted from the built model: every weight matrix
  (QKV and output projections, router, output layer) except the input embedding (a lookup), plus
  for each MoE layer k/E of its expert weights (k experts of E). Norm weights and biases are left
  out (none of the biases exist here). 6 = 2 (multiply-add) x 3 (forward, input grads, weight grads).
- 12 * L * s * d_attn: attention scores Q K^T and the weighted sum A V, 2 * s * d_attn FLOPs each
  per token and layer in the forward, times 3 for training; s = sequence length, d_attn = heads x
  head size. Counted over the full s x s square (not halved for the causal mask), as in PaLM's and
  Megatron's MFU accounting.

Not counted: softmax, norms, activations, routing maths, the optimizer. MFU = FLOPs/token x tokens/s
/ peak. The peak is `--peak-tflops`, else a known dense peak for the GPU (H100/H200 SXM: 989.4 bf16,
1978.9 fp8 TFLOP/s; H100 PCIe: 756 / 1513; H100 NVL: 835 / 1671); on CPU MFU is null unless
`--peak-tflops` is given.

    python -m benchmarks.train_step                  # CPU: fp32; CUDA: bf16
    python -m benchmarks.train_step --te             # CUDA + TE: bf16 and fp8, grouped GEMM
    python -m benchmarks.train_step --quick          # seconds, for the tests
"""

from __future__ import annotations



from benchmarks import common  # noqa: E402
import torch  # noqa: E402

from megatron_emoe import ElasticMoEConfig  # noqa: E402

NAME = "train_step"

SIZES = {
    "quick": dict(layers=2, hidden=64, heads=2, experts=8, ffn=64, seq=64, batch=2, vocab=512),
    "cpu": dict(layers=2, hidden=256, heads=4, experts=8, ffn=512, seq=256, batch=8, vocab=4096),
    "cuda": dict(layers=4, hidden=1024, heads=16, experts=64, ffn=1024, seq=2048, batch=4,
                 vocab=32768),
}

# Dense peak TFLOP/s (no sparsity) by device-name fragment, checked in order.
PEAKS = (("H100 PCIe", {"bf16": 756.0, "fp8": 1513.0}),
         ("H100 NVL", {"bf16": 835.0, "fp8": 1671.0}),
         ("H100", {"bf16": 989.4, "fp8": 1978.9}),
         ("H200", {"bf16": 989.4, "fp8": 1978.9}))


def parse_args(argv=None):
    p = common.parser(__doc__.split("\n\n")[0])
    for name in SIZES["cpu"]:
        p.add_argument(f"--{name}", type=int, default=None,
                       help=f"default: {SIZES['cpu'][name]} on CPU, {SIZES['cuda'][name]} on CUDA")
    p.add_argument("--topk", type=int, default=2, help="k; EMoE's k_ideal is 2k")
    p.add_argument("--variants", default="topk,emoe", help="from topk, emoe, mmoe (topk always runs)")
    p.add_argument("--precisions", default=None,
                   help="fp32 (CPU default) | bf16 (CUDA default) and fp8 (CUDA + --te default)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak of the device for MFU (overrides the built-in GPU table)")
    p.add_argument("--lr", type=float, default=1e-4)
    args = common.finish_args(p.parse_args(argv), cpu_repeats=40)
    defaults = SIZES["quick" if args.quick else ("cuda" if common.CUDA else "cpu")]
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.precisions is None:
        args.precisions = ("bf16,fp8" if args.te else "bf16") if common.CUDA else "fp32"
    args.precisions = [x for x in args.precisions.split(",") if x]
    allowed = {"bf16", "fp8"} if common.CUDA else {"fp32"}
    if set(args.precisions) - allowed:
        p.error(f"--precisions on this device: {sorted(allowed)}")
    if "fp8" in args.precisions and not args.te:
        p.error("fp8 needs --te (Transformer Engine)")
    variants = [v for v in args.variants.split(",") if v and v != "topk"]
    if set(variants) - {"emoe", "mmoe"}:
        p.error("--variants: choose from topk, emoe, mmoe")
    args.variants = ["topk", *variants]
    return args


def elastic_configs(topk: int) -> dict:
    return {
        "topk": None,
        "emoe": ElasticMoEConfig(mode="emoe", k_ideal=2 * topk, hr_loss_coeff=1e-8),
        "mmoe": ElasticMoEConfig(mode="mmoe", mmoe_k_min=1, mmoe_k_max=topk,
                                 mmoe_sample_level="layer"),
    }


def model_config(args, precision: str):
    return common.transformer_config(
        te=args.te, fp8=precision == "fp8", num_layers=args.layers, hidden_size=args.hidden,
        ffn_hidden_size=args.ffn, moe_ffn_hidden_size=args.ffn, num_attention_heads=args.heads,
        num_moe_experts=args.experts, moe_router_topk=args.topk,
    )


def flops_per_token(model, config, seq_length: int) -> dict:
    """Training FLOPs per token, 6 * N_active + 12 * L * s * d_attn (see the module docstring)."""
    experts = config.num_moe_experts
    total = dense = expert = 0
    for name, param in model.named_parameters():
        total += param.numel()
        if param.dim() < 2 or ("word_embeddings" in name
                                and not model.share_embeddings_and_output_weights):
            continue  # norms/biases; the input embedding is a lookup (unless it is the output layer)
        if ".experts." in name:
            expert += param.numel()
        else:
            dense += param.numel()
    active = dense + expert * config.moe_router_topk / experts
    d_attn = config.num_attention_heads * config.kv_channels
    attention = 12 * config.num_layers * seq_length * d_attn
    return {"total_params": total, "active_matmul_params": active, "expert_params": expert,
            "flops_per_token": 6 * active + attention, "attention_flops_per_token": attention}


def peak_tflops(args, precision: str):
    if args.peak_tflops is not None:
        return args.peak_tflops
    if not common.CUDA:
        return None
    name = torch.cuda.get_device_name()
    for fragment, peaks in PEAKS:
        if fragment in name:
            return peaks.get(precision)
    return None


def make_step(model, optimizer, batch):
    tokens, positions, mask, labels = batch
    losses = []

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = model(tokens, positions, mask, labels=labels).float().mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())

    return step, losses


def body(args):
    common.set_aux_loss_scale()
    figures, accounting = [], {}
    batch = common.gpt_batch(args.batch, args.seq, args.vocab, te=args.te, seed=args.seed)
    tokens = args.batch * args.seq
    elastic = elastic_configs(args.topk)
    for precision in args.precisions:
        config = model_config(args, precision)
        models, steps, losses = {}, {}, {}
        for variant in args.variants:
            common.reseed(args.seed)
            models[variant] = common.gpt_model(config, elastic[variant], args.vocab, args.seq,
                                               te=args.te)
            if variant != "topk":
                common.copy_weights(models["topk"], models[variant])
            optimizer = torch.optim.Adam(models[variant].parameters(), lr=args.lr,
                                         fused=True if common.CUDA else None)
            steps[variant], losses[variant] = make_step(models[variant], optimizer, batch)
        count = flops_per_token(models["topk"], config, args.seq)
        accounting[precision] = count
        peak = peak_tflops(args, precision)
        times = common.time_interleaved(steps, args.warmup, args.repeats, args.min_sample_ms)
        for variant in args.variants:
            stats = common.summary(times[variant])
            rate = tokens / (stats["median_ms"] / 1e3)
            tflops = count["flops_per_token"] * rate / 1e12
            final_loss = float(losses[variant][-1])
            figure = {
                "precision": precision, "variant": variant, "tokens_per_step": tokens,
                "tokens_per_s": rate, "step_ms": stats, "model_tflops": tflops,
                "peak_tflops": peak, "mfu": tflops / peak if peak else None,
                # throughput ratio variant/topk = time topk / time variant, per round
                "ratio_vs_topk": common.paired_ratio(times["topk"], times[variant]),
                "final_loss": final_loss,
            }
            if not torch.isfinite(torch.tensor(final_loss)):
                raise RuntimeError(f"{variant} ({precision}): loss is {final_loss}")
            figures.append(figure)
            mfu = f"{figure['mfu']:.1%}" if figure["mfu"] is not None else "n/a (no peak given)"
            print(f"{precision:4s} {variant:5s} {rate:,.0f} tokens/s, {tflops:.3f} model TFLOP/s, "
                  f"MFU {mfu}, {variant}/topk throughput = {figure['ratio_vs_topk']:.3f}",
                  flush=True)
        del models, steps
    return figures, accounting


def main(argv=None):
    args = parse_args(argv)
    figures, accounting = common.launch(body, args)
    settings = {
        "layers": args.layers, "hidden_size": args.hidden, "heads": args.heads,
        "experts": args.experts, "topk": args.topk, "k_ideal": 2 * args.topk,
        "expert_ffn_hidden_size": args.ffn, "seq_length": args.seq, "batch_size": args.batch,
        "vocab_size": args.vocab, "precisions": args.precisions, "variants": args.variants,
        "aux_loss_coeff": 1e-2, "hr_loss_coeff": 1e-8, "optimizer": "torch.optim.Adam",
        "lr": args.lr, "dispatcher": "alltoall",
        "flops_formula": "6 * active_matmul_params + 12 * layers * seq * d_attn per token",
        "flop_accounting": accounting,
        "timed": "zero_grad + forward + backward + Adam step; variants alternate",
    }
    common.write_results(NAME, args, settings, figures, [])


if __name__ == "__main__":
    main()
