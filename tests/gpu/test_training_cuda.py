"""Training on CUDA: a compiled bf16 step, and the sharded optimizer over NCCL with 2 GPUs."""

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine.models.gpt import GPT, GPTConfig
from tests.gpu.marks import CUDA_MARKS
from training.optim import build_optimizer

pytestmark = CUDA_MARKS

LRS = {
    "embedding_lr": 0.3,
    "unembedding_lr": 0.004,
    "matrix_lr": 0.02,
    "scalar_lr": 0.5,
    "weight_decay": 0.2,
}
CONFIG = GPTConfig(sequence_len=256, vocab_size=4096, n_layer=4, n_head=4, n_kv_head=2, n_embd=256)


def test_compiled_bf16_training_step_has_no_graph_break_and_learns():
    """fullgraph=True turns any graph break (a .item(), a host sync, an untraceable kernel
    call) into an error; a repeated batch must then be learned."""
    torch.manual_seed(0)
    model = GPT(CONFIG).cuda()
    optimizer = build_optimizer(model, **LRS)
    step = torch.compile(model, fullgraph=True, dynamic=False)
    gen = torch.Generator(device="cuda").manual_seed(0)
    data = torch.randint(0, CONFIG.vocab_size, (8, CONFIG.sequence_len + 1), device="cuda",
                         generator=gen)  # fmt: skip
    inputs, targets = data[:, :-1], data[:, 1:]
    losses = []
    for _ in range(5):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = step(inputs, targets)
        loss.backward()
        optimizer.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < losses[0], losses


# ---- 2 processes, NCCL -----------------------------------------------------------------------

WORLD = 2
STEPS = 3


def dist_model() -> GPT:
    """CONFIG's GPT moved off its init (zero output projections make most gradients 0)."""
    torch.manual_seed(0)
    model = GPT(CONFIG)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model


def rank_batch(step: int, rank: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    data = torch.randint(0, CONFIG.vocab_size, (4, 65), generator=gen)
    rows = slice(rank * 2, rank * 2 + 2)
    return data[rows, :-1].to(device), data[rows, 1:].to(device)


def nccl_worker(rank: int, rendezvous: str, out_dir: str) -> None:
    torch.cuda.set_device(rank)
    dist.init_process_group(
        "nccl", init_method=rendezvous, rank=rank, world_size=WORLD,
        timeout=timedelta(seconds=120),
    )  # fmt: skip
    try:
        device = torch.device("cuda", rank)
        model = dist_model().to(device)
        optimizer = build_optimizer(model, **LRS)
        assert optimizer.world_size == WORLD and optimizer.reduce_scatter  # NCCL has it
        for step in range(STEPS):
            model(*rank_batch(step, rank, device)).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        state = {k: v.cpu() for k, v in model.state_dict().items()}
        torch.save(state, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs CUDA with 2 GPUs")
def test_sharded_optimizer_over_nccl_matches_one_process(tmp_path):
    mp.spawn(nccl_worker, args=(f"file://{tmp_path}/rendezvous", str(tmp_path)), nprocs=WORLD)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    # One process fed the average of the two ranks' gradients (what the ranks reduce).
    model = dist_model().cuda()
    optimizer = build_optimizer(model, **LRS)
    for step in range(STEPS):
        halves = []
        for rank in range(WORLD):
            model(*rank_batch(step, rank, "cuda")).backward()
            halves.append([p.grad for p in model.parameters()])
            optimizer.zero_grad(set_to_none=True)
        for p, *grads in zip(model.parameters(), *halves, strict=True):
            p.grad = sum(grads) / WORLD
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(ranks[0][name], ranks[1][name], atol=0, rtol=0)
        torch.testing.assert_close(ranks[0][name], value.cpu(), atol=2e-3, rtol=0)
