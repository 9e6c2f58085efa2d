"""Pick one implementation per op, once, by device (never by importability alone).

flash-linear-attention installs on a CPU machine but every call fails there, and flash-attn
is CUDA-only, so a fast path is chosen only when its package imports AND the device is CUDA.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from kernels import activation, argmax, attention, conv1d, gated_delta, norm, rotary

Mode = Literal["auto", "reference", "fast"]


@dataclass(frozen=True)
class Kernels:
    """The chosen implementation of every op; the model holds one and calls through it."""

    name: str
    add_rms_norm: Callable
    silu_and_mul: Callable
    rotary: Callable
    write_kv: Callable
    paged_attention: Callable
    varlen_attention: Callable
    causal_conv1d: Callable
    conv1d_decode: Callable
    chunk_gated_delta_rule: Callable
    gated_delta_prefill: Callable
    gated_delta_decode: Callable
    argmax: Callable


def select_kernels(
    device: torch.device | str = "cpu", mode: Mode = "auto", dtype: torch.dtype = torch.bfloat16, block_size: int = 16
) -> Kernels:
    """`reference`: the pure-torch definitions (slow, for tests); `fast`/`auto`: the fastest
    implementation available on `device` for activations of `dtype` and KV pages of
    `block_size` tokens."""
    device = torch.device(device)
    if mode == "reference":
        return Kernels(
            name="reference",
            add_rms_norm=norm.add_rms_norm,
            silu_and_mul=activation.silu_and_mul,
            rotary=rotary.rotary,
            write_kv=attention.write_kv_reference,
            paged_attention=attention.paged_attention_reference,
            varlen_attention=attention.varlen_attention,
            causal_conv1d=conv1d.naive_causal_conv1d,
            conv1d_decode=conv1d.conv1d_decode,
            chunk_gated_delta_rule=gated_delta.naive_gated_delta_rule,
            gated_delta_prefill=functools.partial(gated_delta.gated_delta_prefill, rule=gated_delta.naive_gated_delta_rule),
            gated_delta_decode=gated_delta.gated_delta_decode,
            argmax=argmax.argmax,
        )
    # flash-linear-attention's chunk kernel takes bf16/fp16 only.
    use_fla = gated_delta.fla_available(device) and dtype in (torch.bfloat16, torch.float16)
    # CPU: C kernels (kernels/csrc) for decode attention and the fused elementwise ops; each
    # falls back to torch by itself under autograd or when it cannot be built.
    use_c = device.type == "cpu" and attention.c_decode_available(dtype)
    use_flash = attention.flash_attn_available(device, dtype, block_size)
    paged = attention.paged_attention_cpu if use_c else attention.paged_attention
    return Kernels(
        name=f"{device.type}{'+c' if use_c else ''}{'+flash-attn' if use_flash else ''}{'+fla' if use_fla else ''}",
        add_rms_norm=norm.add_rms_norm_cpu if use_c else norm.add_rms_norm,
        silu_and_mul=activation.silu_and_mul_cpu if use_c else activation.silu_and_mul,
        rotary=rotary.rotary_cpu if use_c else rotary.rotary,
        write_kv=attention.write_kv,
        paged_attention=attention.flash_paged_attention if use_flash else paged,
        varlen_attention=attention.varlen_attention,
        causal_conv1d=conv1d.causal_conv1d_cpu if use_c else conv1d.causal_conv1d,
        conv1d_decode=conv1d.conv1d_decode_cpu if use_c else conv1d.conv1d_decode,
        chunk_gated_delta_rule=gated_delta.fla_chunk_gated_delta_rule if use_fla else gated_delta.chunk_gated_delta_rule,
        gated_delta_prefill=(
            gated_delta.fla_gated_delta_prefill
            if use_fla
            else gated_delta.gated_delta_prefill_cpu if use_c else gated_delta.gated_delta_prefill
        ),
        gated_delta_decode=(
            gated_delta.fla_gated_delta_decode
            if use_fla
            else gated_delta.gated_delta_decode_cpu if use_c else gated_delta.gated_delta_decode
        ),
        argmax=argmax.argmax_cpu if use_c else argmax.argmax,
    )
