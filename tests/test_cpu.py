"""`megatron_emoe.cpu` runs the real Megatron-Core MoE stack on CPU with gloo.

Every test builds real Megatron modules in real gloo processes (`distributed.run_distributed_test`); EP=1 runs in
this process and EP=2 in two spawned ones.
"""

import pytest
import torch
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig

import builders
from megatron_emoe import cpu
from distributed import run_distributed_test
from megatron_emoe.runtime.launch import SEED

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="tests the CPU path; cpu.enable() is a no-op with CUDA"
)

NUM_EXPERTS = 4
HIDDEN = 16
SEQ, BATCH = 8, 2


def _config(ep: int, dispatcher: str = "alltoall", num_layers: int = 1) -> TransformerConfig:
    return builders.moe_config(
        num_layers=num_layers,
        hidden_size=HIDDEN,
        num_attention_heads=4,
        num_moe_experts=NUM_EXPERTS,
        moe_aux_loss_coeff=0.01,
        moe_token_dispatcher_type=dispatcher,
        expert_model_parallel_size=ep,
        hidden_dropout=0.1,  # Megatron's defaults: exercise the RNG tracker's fork on CPU
        attention_dropout=0.1,
    )


def _moe_layer(config: TransformerConfig):
    spec = get_gpt_layer_local_spec(num_experts=NUM_EXPERTS, moe_grouped_gemm=False)
    return spec.submodules.mlp(config=config)


def _assert_grads(module: torch.nn.Module, names: str):
    params = {n: p for n, p in module.named_parameters() if names in n}
    assert params, f"no parameters named *{names}*"
    for name, param in params.items():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, f"{name} got a zero gradient"


def _moe_forward_backward(rank: int, ep: int):
    """Both dispatchers, same weights and tokens: shapes, grads, and equal outputs."""
    tokens = torch.randn(SEQ, BATCH, HIDDEN, generator=torch.Generator().manual_seed(rank))
    outputs = {}
    for dispatcher in ("alltoall", "allgather"):
        builders.reseed(SEED)
        layer = _moe_layer(_config(ep, dispatcher))
        assert len(layer.experts.local_experts) == NUM_EXPERTS // ep
        hidden = tokens.clone().requires_grad_()
        output, bias = layer(hidden)
        assert output.shape == hidden.shape and bias is None
        output.square().sum().backward()
        _assert_grads(layer, "experts")
        _assert_grads(layer, "router")
        assert torch.isfinite(hidden.grad).all()
        outputs[dispatcher] = output.detach()
    torch.testing.assert_close(outputs["alltoall"], outputs["allgather"])


@pytest.mark.parametrize("ep", [1, 2])
def test_moe_layer_forward_backward(ep):
    run_distributed_test(_moe_forward_backward, world_size=ep, ep=ep, args=(ep,))


def _gpt_model(ep: int) -> GPTModel:
    return GPTModel(
        config=_config(ep, num_layers=2),
        transformer_layer_spec=get_gpt_layer_local_spec(
            num_experts=NUM_EXPERTS, moe_grouped_gemm=False
        ),
        vocab_size=64,
        max_sequence_length=SEQ,
    )


def _gpt_forward_backward(rank: int):
    model = _gpt_model(ep=1)
    input_ids = torch.randint(0, 64, (BATCH, SEQ))
    position_ids = torch.arange(SEQ).expand(BATCH, SEQ)
    # attention_mask=None uses Megatron's default causal mask (patched off device="cuda").
    loss = model(input_ids, position_ids, attention_mask=None, labels=input_ids)
    assert loss.shape == (BATCH, SEQ) and torch.isfinite(loss).all()
    loss.mean().backward()
    _assert_grads(model, "experts")
    _assert_grads(model, "router")
    _assert_grads(model, "embedding")


def test_gpt_model_forward_backward():
    run_distributed_test(_gpt_forward_backward, world_size=1)


def _recompute(rank: int):
    """Recompute replays the CPU generator and the tracker; fork() switches to and from its state."""
    tracker = tensor_parallel.get_cuda_rng_tracker()
    name = tensor_parallel.get_expert_parallel_rng_tracker_name()
    tracked_gen = torch.Generator().set_state(tracker.get_states()[name])
    default_gen = torch.Generator().set_state(torch.get_rng_state())
    draws = []

    def noisy(x):
        before = torch.rand_like(x)
        with tracker.fork(name):
            tracked = torch.rand_like(x)
        after = torch.rand_like(x)
        draws.append(torch.stack([before, tracked, after]))
        return x * before * tracked * after

    x = torch.ones(16, requires_grad=True)
    y = tensor_parallel.checkpoint(noisy, False, x)
    state_after_forward = torch.get_rng_state()
    y.sum().backward()

    forward, recompute = draws
    assert torch.equal(forward, recompute)
    before, tracked, after = forward
    assert torch.equal(tracked, torch.rand(16, generator=tracked_gen)), "fork() missed the tracker"
    expected = [torch.rand(16, generator=default_gen) for _ in range(2)]
    assert torch.equal(torch.stack([before, after]), torch.stack(expected)), "fork() moved default"
    torch.testing.assert_close(x.grad, before * tracked * after)
    assert torch.equal(torch.get_rng_state(), state_after_forward)


def test_checkpoint_recompute_replays_cpu_rng():
    run_distributed_test(_recompute, world_size=1)


def _sharded_tensors(model: torch.nn.Module) -> dict:
    """{(key, global offset): tensor} of the model's sharded state dict."""
    return {
        (sh.key, sh.global_offset): sh.data.detach().clone()
        for sh in model.sharded_state_dict().values()
        if isinstance(sh, ShardedTensor)
    }


def _save(rank: int, path):
    model = _gpt_model(ep=2)
    dist_checkpointing.save(model.sharded_state_dict(), str(path / "ckpt"))
    torch.save(_sharded_tensors(model), path / f"reference{rank}.pt")


def _load_and_compare(rank: int, path):
    builders.reseed(SEED)
    torch.manual_seed(SEED + 1)  # start from different weights than the saved ones
    model = _gpt_model(ep=1)
    expected = {}
    for saved in path.glob("reference*.pt"):
        expected.update(torch.load(saved))
    assert _sharded_tensors(model).keys() <= expected.keys()
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), str(path / "ckpt")))
    loaded = _sharded_tensors(model)
    assert any("experts" in key for key, _ in loaded)
    for key, tensor in loaded.items():
        torch.testing.assert_close(tensor, expected[key], rtol=0, atol=0, msg=str(key))


def test_dist_checkpoint_save_ep2_load_ep1(tmp_path):
    (tmp_path / "ckpt").mkdir()
    run_distributed_test(_save, world_size=2, ep=2, args=(tmp_path,))
    run_distributed_test(_load_and_compare, world_size=1, args=(tmp_path,))


def test_enable_is_idempotent_and_leaves_cuda_alone():
    from megatron.core.transformer.moe import router

    cuda = torch.cuda.is_available()
    cpu.enable()
    patched = router.torch
    cpu.enable()
    assert router.torch is patched
    assert torch.cuda.is_available() == cuda
    assert cpu.device().type == ("cuda" if cuda else "cpu")
