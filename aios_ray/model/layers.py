"""Transformer pieces shared by the H and L modules: weightless RMSNorm, RoPE, causal attention, SwiGLU.

Shapes: B batch, T time, C hidden size, nh heads, hd head size.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

# The dtypes SDPA's flash kernel takes (on CUDA).
FLASH_DTYPES = (torch.float16, torch.bfloat16)
_flash_notice_given = False


def rms_norm(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Weightless RMSNorm as in HRM; computed in fp32 so bf16 autocast cannot lose the scale."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def trunc_normal_(tensor: torch.Tensor, std: float) -> torch.Tensor:
    return nn.init.trunc_normal_(tensor, std=std, a=-2 * std, b=2 * std)


class RotaryEmbedding(nn.Module):
    """Precomputed RoPE tables for every position up to ``max_seq_len``."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)  # (T, hd/2)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[:seq_len], self.sin[:seq_len]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (first half, second half) of each head: x is (B, nh, T, hd)."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


def sliding_window_mask(seq_len: int, window: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(T, T) boolean mask, True where query i may attend to key j: j <= i and i - j < window."""
    pos = torch.arange(seq_len, device=device)
    distance = pos[:, None] - pos[None, :]
    return (distance >= 0) & (distance < window)


def flash_usable(q: torch.Tensor) -> bool:
    """SDPA's flash kernel runs on CUDA with fp16/bf16 inputs and head sizes that are multiples of 8 up to 256."""
    return q.is_cuda and q.dtype in FLASH_DTYPES and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256


def _flash_notice(reason: str) -> None:
    """Once per process: --use-flash-attn was asked for but cannot be honoured here."""
    global _flash_notice_given
    if not _flash_notice_given:
        _flash_notice_given = True
        print(f"notice: --use-flash-attn: {reason}; using SDPA's default kernel", file=sys.stderr, flush=True)


class CausalSelfAttention(nn.Module):
    """Causal self-attention through SDPA; ``window_size`` > 0 limits each token to the last W tokens (an explicit
    boolean mask, which SDPA's flash kernel cannot take, so flash is used only for full causal attention)."""

    def __init__(self, hidden_size: int, num_heads: int, window_size: int = 0, use_flash: bool = False) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.window_size = window_size
        self.use_flash = use_flash
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=False)
        self.proj = nn.Linear(hidden_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        if rope is not None:  # --pos-encodings learned|none: positions come from the embeddings, or nowhere
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)  # (B, nh, T, hd)
        if self.window_size and self.window_size < T:
            if self.use_flash:
                _flash_notice("the flash kernel takes no --window-size mask")
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=sliding_window_mask(T, self.window_size, x.device))
        elif self.use_flash and flash_usable(q):
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            if self.use_flash:
                _flash_notice(f"no flash kernel for {q.device.type} {str(q.dtype).removeprefix('torch.')} "
                              f"head size {q.shape[-1]}")
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class SwiGLU(nn.Module):
    """Dense FFN: down(silu(gate(x)) * up(x)); gate and up share one matmul."""

    def __init__(self, hidden_size: int, ffn_size: int) -> None:
        super().__init__()
        self.gate_up = nn.Linear(hidden_size, 2 * ffn_size, bias=False)
        self.down = nn.Linear(ffn_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)
