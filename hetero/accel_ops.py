"""hetero's accelerator ops: the MLA prologue and the small-op fusions, one custom op per Triton kernel.

`fuse_accel` rewrites recognised op chains in accel partitions into these ops. Each op has three
implementations:
- the Triton kernel (hetero.backends.triton) on CUDA, opaque to Inductor (it compiles the rest of the
  partition around it),
- the same Triton kernel under the Triton interpreter on the CPU when TRITON_INTERPRET=1,
- the ATen reference below otherwise (accel = cpu without the interpreter), which Inductor gets as the
  op's decomposition and fuses with its neighbours (hetero.backends.inductor).

Every reference computes in fp32 and rounds where the model it replaces rounds, so the kernels can be
checked against it tightly and the model against eager within the dtype's tolerance. The references
say each of those roundings with an explicit cast, half-precision inputs included (`x.float()`, not
`x + residual` in bf16): Inductor keeps a fused chain's intermediates in fp32 and rounds them only at
explicit casts (with `emulate_precision_casts`), so `x + residual` on an input that is itself an
unrounded sum upstream would not be eager's sum. Eager computes one half-precision op in fp32 and
rounds once, so the explicit form gives the same bits there. For RoPE that
depends on the model, not on the style: transformers multiplies and adds half-precision tensors (each
product and the sum rounded: `round_each=True`), DeepSeek's reference code upcasts to fp32 and rounds
once at the end (`round_each=False`). Rounding once where eager rounds three times changes a bf16 result
by an ulp now and then; in an MoE model one ulp can flip a near-tie routing decision, so the ops follow
the model (fuse_accel finds out which it does by running its subgraph).

RoPE styles (x is the rotary part, R = its width, h = R/2; c, s are the cos and sin tables):
- "half"          rotate-half (NeoX, Llama): tables of width R;
                  out[i] = x[i]c[i] - x[i+h]s[i],  out[i+h] = x[i+h]c[i+h] + x[i]s[i+h]
- "pairs_to_half" pairs in, halves out (transformers' DeepSeek-V3 with rope_interleave): width h;
                  out[j] = x[2j]c[j] - x[2j+1]s[j],  out[h+j] = x[2j+1]c[j] + x[2j]s[j]
- "pairs"         pairs in, pairs out (GPT-J, DeepSeek's reference complex form): width h;
                  out[2j] = x[2j]c[j] - x[2j+1]s[j],  out[2j+1] = x[2j+1]c[j] + x[2j]s[j]
Tables are [Bc, S, W] with Bc 1 (shared by the batch) or B; x is 4-D with its sequence at `seq_dim`
(1 for [B, S, H, D], 2 for [B, H, S, D]); any strides.
"""

from __future__ import annotations

import torch

ROPE_STYLES = ("half", "pairs_to_half", "pairs")


def table_width(style: str, rotary: int) -> int:
    return rotary if style == "half" else rotary // 2


# ------------------------------------------------------------------------------------------------
# ATen references


def rmsnorm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' RMSNorm: normalise in fp32, round to x's dtype, then scale by the weight."""
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return (weight.float() * y.float()).to(torch.promote_types(weight.dtype, x.dtype))


def add_rmsnorm_reference(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    total = (x.float() + residual.float()).to(torch.promote_types(x.dtype, residual.dtype))
    return rmsnorm_reference(total, weight, eps), total


def silu_mul_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    silu = torch.nn.functional.silu(gate.float()).to(gate.dtype)
    return (silu.float() * up.float()).to(torch.promote_types(gate.dtype, up.dtype))


def rope_reference(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    seq_dim: int,
    style: str,
    round_each: bool = False,
) -> torch.Tensor:
    """RoPE on the 4-D rotary part `x` in fp32, rounded to x's dtype once, or after each product and
    the sum with `round_each` (see the module doc)."""
    _check_rope(x, cos, sin, seq_dim, style)
    c, s = _broadcast_table(cos, seq_dim), _broadcast_table(sin, seq_dim)
    xf = x.float()
    h = x.shape[-1] // 2

    def rnd(t: torch.Tensor) -> torch.Tensor:
        return t.to(x.dtype).float() if round_each else t

    def rotate(a: torch.Tensor, b: torch.Tensor, ca, sa, cb, sb) -> tuple[torch.Tensor, torch.Tensor]:
        return rnd(a * ca) - rnd(b * sa), rnd(b * cb) + rnd(a * sb)

    if style == "half":
        first, second = rotate(xf[..., :h], xf[..., h:], c[..., :h], s[..., :h], c[..., h:], s[..., h:])
        out = torch.cat([first, second], -1)
    else:
        first, second = rotate(xf[..., 0::2], xf[..., 1::2], c, s, c, s)
        if style == "pairs_to_half":
            out = torch.cat([first, second], -1)
        else:
            out = torch.stack([first, second], -1).flatten(-2)
    return out.to(x.dtype)


def mla_norms_reference(
    q_a: torch.Tensor,
    q_weight: torch.Tensor,
    q_eps: float,
    kv_a: torch.Tensor,
    kv_weight: torch.Tensor,
    kv_eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    return rmsnorm_reference(q_a, q_weight, q_eps), rmsnorm_reference(kv_a, kv_weight, kv_eps)


def mla_rope_q_reference(
    q: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    nope: int,
    seq_dim: int,
    style: str,
    round_each: bool = False,
) -> torch.Tensor:
    rope = rope_reference(q[..., nope:], cos, sin, seq_dim, style, round_each)
    return torch.cat([q[..., :nope], rope], -1)


def mla_rope_k_reference(
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    past: torch.Tensor | None,
    seq_dim: int,
    style: str,
    round_each: bool = False,
) -> torch.Tensor:
    out = rope_reference(k, cos, sin, seq_dim, style, round_each)
    return out.contiguous() if past is None else torch.cat([past, out], seq_dim)


def _broadcast_table(table: torch.Tensor, seq_dim: int) -> torch.Tensor:
    """[Bc, S, W] -> fp32, shaped to broadcast against a 4-D x with its sequence at seq_dim."""
    return table.float().unsqueeze(3 - seq_dim)


def _check_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, seq_dim: int, style: str) -> None:
    torch._check(style in ROPE_STYLES, lambda: f"rope style {style!r}: expected one of {ROPE_STYLES}")
    torch._check(seq_dim in (1, 2), lambda: f"rope: seq_dim must be 1 or 2, got {seq_dim}")
    torch._check(x.dim() == 4 and x.shape[-1] % 2 == 0, lambda: "rope: x must be 4-D with an even width")
    torch._check(
        cos.dim() == 3 and cos.shape == sin.shape, lambda: "rope: cos and sin must be [Bc, S, W] and alike"
    )
    torch._check(
        cos.shape[-1] == table_width(style, x.shape[-1]),
        lambda: (
            f"rope {style}: tables of width {table_width(style, x.shape[-1])} expected, got {cos.shape[-1]}"
        ),
    )


# ------------------------------------------------------------------------------------------------
# The ops. Their default implementation is the reference; hetero.backends.triton registers the CUDA
# kernels and the CPU interpreter path. Every output is contiguous, as the fakes say (fuse_accel only
# replaces values the graph holds contiguously).


@torch.library.custom_op("hetero::rmsnorm", mutates_args=())
def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return rmsnorm_reference(x, weight, eps).contiguous()


@rmsnorm.register_fake
def _(x, weight, eps):
    return x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype))


@torch.library.custom_op("hetero::add_rmsnorm", mutates_args=())
def add_rmsnorm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    normed, total = add_rmsnorm_reference(x, residual, weight, eps)
    return normed.contiguous(), total.contiguous()


@add_rmsnorm.register_fake
def _(x, residual, weight, eps):
    dtype = torch.promote_types(x.dtype, residual.dtype)
    total = x.new_empty(torch.broadcast_shapes(x.shape, residual.shape), dtype=dtype)
    return total.new_empty(total.shape, dtype=torch.promote_types(dtype, weight.dtype)), total


@torch.library.custom_op("hetero::silu_mul", mutates_args=())
def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return silu_mul_reference(gate, up).contiguous()


@silu_mul.register_fake
def _(gate, up):
    shape = torch.broadcast_shapes(gate.shape, up.shape)
    return gate.new_empty(shape, dtype=torch.promote_types(gate.dtype, up.dtype))


@torch.library.custom_op("hetero::mla_norms", mutates_args=())
def mla_norms(
    q_a: torch.Tensor,
    q_weight: torch.Tensor,
    q_eps: float,
    kv_a: torch.Tensor,
    kv_weight: torch.Tensor,
    kv_eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    q, kv = mla_norms_reference(q_a, q_weight, q_eps, kv_a, kv_weight, kv_eps)
    return q.contiguous(), kv.contiguous()


@mla_norms.register_fake
def _(q_a, q_weight, q_eps, kv_a, kv_weight, kv_eps):
    q = q_a.new_empty(q_a.shape, dtype=torch.promote_types(q_a.dtype, q_weight.dtype))
    return q, kv_a.new_empty(kv_a.shape, dtype=torch.promote_types(kv_a.dtype, kv_weight.dtype))


@torch.library.custom_op("hetero::mla_rope_q", mutates_args=())
def mla_rope_q(
    q: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    nope: int,
    seq_dim: int,
    style: str,
    round_each: bool = False,
) -> torch.Tensor:
    return mla_rope_q_reference(q, cos, sin, nope, seq_dim, style, round_each).contiguous()


@mla_rope_q.register_fake
def _(q, cos, sin, nope, seq_dim, style, round_each=False):
    return q.new_empty(q.shape)


@torch.library.custom_op("hetero::mla_rope_k", mutates_args=())
def mla_rope_k(
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    past: torch.Tensor | None,
    seq_dim: int,
    style: str,
    round_each: bool = False,
) -> torch.Tensor:
    return mla_rope_k_reference(k, cos, sin, past, seq_dim, style, round_each).contiguous()


@mla_rope_k.register_fake
def _(k, cos, sin, past, seq_dim, style, round_each=False):
    if past is None:
        return k.new_empty(k.shape)
    shape = list(k.shape)
    shape[seq_dim] = past.shape[seq_dim] + k.shape[seq_dim]
    return k.new_empty(shape)


REFERENCES = {
    "rmsnorm": rmsnorm_reference,
    "add_rmsnorm": add_rmsnorm_reference,
    "silu_mul": silu_mul_reference,
    "mla_norms": mla_norms_reference,
    "mla_rope_q": mla_rope_q_reference,
    "mla_rope_k": mla_rope_k_reference,
}

from hetero.compiler.capability import register_op_roles  # noqa: E402 - after the ops exist

for _name in REFERENCES:
    register_op_roles(f"hetero::{_name}", {"accel"})
