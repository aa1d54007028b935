"""MoE layer benchmark: our ``MoEFeedForward`` against transformers' ``MixtralSparseMoeBlock`` on CPU.

What is measured, and why:

* Speed. One training step of the layer alone (forward, then backward of ``(out * g).sum()`` for a fixed
  random ``g``, with gradients into the input and every weight) on the same fp32 weights. Mixtral's block is
  the reference point a user would otherwise reach for; it never drops tokens, so our layer is timed both with
  the project's default capacity factor (1.25, which drops some assignments and so does less work) and
  dropless (factor E/k). The headline ``moe_layer_speedup_vs_mixtral`` is Mixtral's time over ours.
* Efficiency. ``moe_layer_flops_share`` is our useful FLOP/s (expert matmuls of kept assignments plus the
  router, forward and backward) over the FLOP/s of one plain dense matmul step of comparable size timed in
  the same run: how close the sparse layer gets to what the CPU does on dense work.

The machine this is written for has 2 cores and its timings swing by 2x between runs, so nothing is compared
across processes: every variant runs once per round, rounds are interleaved (the order flips every round), and
the figures are medians of per-round ratios. Before timing, both layers are checked to compute the same output
and input gradient when no token is dropped.

Run: ``.venv/bin/python benchmarks/moe_layer.py [--pairs 7] [--warmup 2]``
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import transformers
from torch import nn
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralForCausalLM, MixtralSparseMoeBlock

from aios_ray.model.moe import MoEFeedForward

Step = Callable[[], None]

# batched_mm gathers one (2F, C) weight matrix per (token, expert) pair: (N*k, 2F, C) fp32 is 34 GB at the
# default sizes. Above this many bytes it is left out rather than run out of memory.
BATCHED_MM_MAX_BYTES = 2 * 2**30
CHECK_ATOL = 1e-4


@dataclass(frozen=True)
class Shape:
    tokens: int
    hidden: int
    ffn: int
    experts: int
    top_k: int


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=7, help="timed rounds (each runs every variant once); >= 5")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--ffn", type=int, default=1024)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--capacity-factor", type=float, default=1.25, help="project default 1.25")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.pairs < 5:
        p.error("--pairs must be >= 5")
    return args


# ---------------------------------------------------------------------------------------------- layers


def mixtral_config(shape: Shape) -> MixtralConfig:
    return MixtralConfig(hidden_size=shape.hidden, intermediate_size=shape.ffn, num_local_experts=shape.experts,
                         num_experts_per_tok=shape.top_k, router_jitter_noise=0.0)


def default_experts_implementation(config: MixtralConfig) -> str:
    """What a Mixtral model built by a user resolves to (a bare block leaves it None and runs its eager loop)."""
    tiny = copy.deepcopy(config)
    tiny.num_hidden_layers, tiny.vocab_size = 1, 16
    logging.getLogger("transformers").setLevel(logging.ERROR)
    return MixtralForCausalLM(tiny).config._experts_implementation


def build_mixtral(config: MixtralConfig, impl: str, ours: MoEFeedForward) -> MixtralSparseMoeBlock:
    cfg = copy.deepcopy(config)
    cfg._experts_implementation = impl
    block = MixtralSparseMoeBlock(cfg)
    with torch.no_grad():
        block.gate.weight.copy_(ours.router.weight)  # (E, C) both
        # Both keep [gate | up] along the 2F axis (Mixtral chunks gate first, as we do); Mixtral stores (out, in).
        block.experts.gate_up_proj.copy_(ours.w_gate_up.transpose(1, 2))  # (E, 2F, C)
        block.experts.down_proj.copy_(ours.w_down.transpose(1, 2))  # (E, C, F)
    return block


def mixtral_impls(default: str, shape: Shape) -> list[str]:
    """The experts implementations that run on CPU; the default first."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    batched_bytes = shape.tokens * shape.top_k * 2 * shape.ffn * shape.hidden * 4
    candidates = ["eager", *ALL_EXPERTS_FUNCTIONS.valid_keys()]
    runnable = [i for i in candidates if i in ("eager", "grouped_mm")
                or (i == "batched_mm" and batched_bytes <= BATCHED_MM_MAX_BYTES)]
    skipped = sorted(set(candidates) - set(runnable))
    print(f"mixtral experts implementations: default={default} (config._experts_implementation as a Mixtral model "
          f"resolves it; a bare block whose config says None runs eager), timed={runnable}, skipped={skipped} "
          f"(deepgemm/sonicmoe need CUDA; batched_mm would gather {batched_bytes / 2**30:.1f} GiB of weights)")
    return [default, *[i for i in runnable if i != default]]


# ---------------------------------------------------------------------------------------------- steps


def zero_grads(tensors: list[torch.Tensor]) -> None:
    for t in tensors:
        t.grad = None


def layer_step(layer: nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> Step:
    """One fwd+bwd of ``layer`` on ``x`` with loss (out * grad_out).sum(); grads zeroed first."""
    leaves = [x, *layer.parameters()]

    def step() -> None:
        zero_grads(leaves)
        out = layer(x)
        out = out[0] if isinstance(out, tuple) else out
        (out * grad_out).sum().backward()

    return step


def dense_step(a: torch.Tensor, w: torch.Tensor, grad_out: torch.Tensor) -> Step:
    def step() -> None:
        zero_grads([a, w])
        ((a @ w) * grad_out).sum().backward()

    return step


def timed(step: Step) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def interleaved(steps: dict[str, Step], pairs: int, warmup: int) -> list[dict[str, float]]:
    """Runs every step once per round, order flipped each round; returns the timed rounds."""
    names = list(steps)
    rounds = []
    for r in range(warmup + pairs):
        order = names if r % 2 == 0 else names[::-1]
        times = {name: timed(steps[name]) for name in order}
        if r >= warmup:
            rounds.append(times)
    return rounds


def median_ratio(rounds: list[dict[str, float]], num: str, den: str, scale: float = 1.0) -> float:
    return statistics.median(scale * r[num] / r[den] for r in rounds)


# ---------------------------------------------------------------------------------------------- checks


def check_same(ours: MoEFeedForward, mixtral: MixtralSparseMoeBlock, x: torch.Tensor, name: str) -> float:
    """Dropless, both layers must give the same output and input gradient; returns the max abs diff."""
    g = torch.randn_like(x)
    outs, grads = [], []
    for layer in (ours, mixtral):
        xi = x.detach().clone().requires_grad_(True)
        out = layer(xi)
        out = out[0] if isinstance(out, tuple) else out
        (out * g).sum().backward()
        outs.append(out.detach())
        grads.append(xi.grad)
        layer.zero_grad(set_to_none=True)
    diffs = [(outs[0] - outs[1]).abs().max().item(), (grads[0] - grads[1]).abs().max().item()]
    print(f"check vs mixtral_{name} (dropless, {x.shape[-2]}x{x.shape[-1]}): max |out diff|={diffs[0]:.2e}, "
          f"max |dx diff|={diffs[1]:.2e}, max |out|={outs[0].abs().max().item():.2e}")
    assert max(diffs) < CHECK_ATOL, f"MoE and Mixtral disagree: {diffs}"
    return max(diffs)


def dropped_share(layer: MoEFeedForward, x: torch.Tensor) -> tuple[float, int]:
    with torch.no_grad():
        _, stats = layer(x)
    assignments = stats.num_tokens * layer.top_k
    return stats.num_dropped / assignments, assignments - stats.num_dropped


# ---------------------------------------------------------------------------------------------- flops


def moe_flops(shape: Shape, kept: int) -> float:
    """Useful fwd+bwd FLOPs: per kept assignment C x 2F (gate_up) and F x C (down) matmuls, plus the router.

    2 FLOPs per multiply-add, so 2 * 3CF = 6CF per assignment forward; backward is twice the forward.
    """
    expert_fwd = 2 * (shape.hidden * 2 * shape.ffn + shape.ffn * shape.hidden) * kept
    router_fwd = 2 * shape.tokens * shape.hidden * shape.experts
    return 3.0 * (expert_fwd + router_fwd)


def dense_flops(m: int, k: int, n: int) -> float:
    return 3.0 * 2 * m * k * n


# ---------------------------------------------------------------------------------------------- main


def describe_machine() -> None:
    with open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
    print(f"machine: {platform.machine()} '{cpu}', nproc={os.cpu_count()}, torch threads={torch.get_num_threads()}, "
          f"torch {torch.__version__}, transformers {transformers.__version__}, load average {os.getloadavg()[0]:.2f}")


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    shape = Shape(args.tokens, args.hidden, args.ffn, args.experts, args.top_k)
    dropless = shape.experts / shape.top_k
    describe_machine()
    print(f"shape: N={shape.tokens} C={shape.hidden} F={shape.ffn} E={shape.experts} k={shape.top_k}, fp32 CPU; "
          f"capacity factors {args.capacity_factor} (default) and {dropless:g} (dropless)")

    ours = MoEFeedForward(shape.hidden, shape.ffn, shape.experts, shape.top_k, args.capacity_factor)
    ours_dropless = copy.deepcopy(ours)
    ours_dropless.capacity_factor = dropless
    config = mixtral_config(shape)
    impls = mixtral_impls(default_experts_implementation(config), shape)
    mixtral = {impl: build_mixtral(config, impl, ours) for impl in impls}

    x = torch.randn(1, shape.tokens, shape.hidden)  # Mixtral's block wants (batch, seq, hidden)
    for impl, block in mixtral.items():
        check_same(ours_dropless, block, x, impl)
    drop, kept = dropped_share(ours, x)
    _, kept_dropless = dropped_share(ours_dropless, x)
    print(f"capacity {ours.capacity(shape.tokens)} per expert at factor {args.capacity_factor}: "
          f"dropped share {drop:.2%} of {shape.tokens * shape.top_k} assignments")

    x.requires_grad_(True)
    g = torch.randn_like(x)
    m_dense, k_dense, n_dense = shape.tokens * shape.top_k, shape.hidden, 2 * shape.ffn
    a = torch.randn(m_dense, k_dense, requires_grad=True)
    w = torch.randn(k_dense, n_dense, requires_grad=True)
    steps: dict[str, Step] = {"ours": layer_step(ours, x, g), "ours_dropless": layer_step(ours_dropless, x, g)}
    steps |= {f"mixtral_{impl}": layer_step(block, x, g) for impl, block in mixtral.items()}
    steps["dense"] = dense_step(a, w, torch.randn(m_dense, n_dense))
    rounds = interleaved(steps, args.pairs, args.warmup)
    report(rounds, impls, shape, kept, kept_dropless, (m_dense, k_dense, n_dense))


def report(rounds: list[dict[str, float]], impls: list[str], shape: Shape, kept: int, kept_dropless: int,
           dense_mkn: tuple[int, int, int]) -> None:
    for name in rounds[0]:
        ms = [1e3 * r[name] for r in rounds]
        print(f"time {name:>20}: median {statistics.median(ms):8.1f} ms  min {min(ms):8.1f} ms")
    default = f"mixtral_{impls[0]}"
    print(f"mixtral_default_impl={impls[0]}")
    print(f"moe_layer_speedup_vs_mixtral={median_ratio(rounds, default, 'ours'):.3f}")
    print(f"moe_layer_speedup_vs_mixtral_dropless={median_ratio(rounds, default, 'ours_dropless'):.3f}")
    fastest = min(impls, key=lambda i: statistics.median(r[f"mixtral_{i}"] for r in rounds))
    if fastest != impls[0]:
        print(f"moe_layer_speedup_vs_mixtral_{fastest}={median_ratio(rounds, f'mixtral_{fastest}', 'ours'):.3f}")
    for impl in impls[1:]:
        print(f"(vs mixtral_{impl}: {median_ratio(rounds, f'mixtral_{impl}', 'ours'):.3f}, "
              f"dropless {median_ratio(rounds, f'mixtral_{impl}', 'ours_dropless'):.3f})")
    scale = moe_flops(shape, kept) / dense_flops(*dense_mkn)
    scale_dropless = moe_flops(shape, kept_dropless) / dense_flops(*dense_mkn)
    dense_gflops = statistics.median(dense_flops(*dense_mkn) / r["dense"] for r in rounds) / 1e9
    print(f"dense {dense_mkn[0]}x{dense_mkn[1]} @ {dense_mkn[1]}x{dense_mkn[2]} fwd+bwd: {dense_gflops:.1f} GFLOP/s")
    print(f"moe_layer_flops_share={median_ratio(rounds, 'dense', 'ours', scale):.3f}")
    print(f"moe_layer_flops_share_dropless={median_ratio(rounds, 'dense', 'ours_dropless', scale_dropless):.3f}")
    print(f"load average after: {os.getloadavg()[0]:.2f} (other processes on these {os.cpu_count()} cores skew the "
          "ratios too, not only the times)")


if __name__ == "__main__":
    main()
