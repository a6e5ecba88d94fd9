"""Precision policies: one config value (`precision`) decides the dtype of every kind of computation,
in pretraining, fine-tuning and feature extraction alike, on every platform.

|                                            | float32        | mixed                  | bfloat16            |
|--------------------------------------------|----------------|------------------------|---------------------|
| parameters, gradients, optimiser, EMA      | fp32           | fp32                   | fp32                |
| backbone matmul operands (patches, qkv,    | fp32           | bf16                   | bf16                |
|   attention, proj, MLP)                    |                |                        |                     |
| their accumulation -> result               | fp32 -> fp32   | fp32 -> fp32           | fp32 -> bf16        |
| the gradient a backward matmul reads       | fp32           | bf16 (rounded)         | bf16; head fp32     |
| LayerNorm, softmax, GELU, residual stream  | fp32           | fp32                   | bf16 (LN statistics |
|                                            |                |                        |   and softmax fp32) |
| head matmul operands                       | fp32           | bf16                   | fp32 (*)            |
| head BatchNorm, GELU, L2 normalisation     | fp32           | fp32                   | fp32                |
| memory similarities: operands -> result    | fp32 -> fp32   | bf16 -> fp32           | fp32 (*) -> fp32    |
| memory softmaxes and cross-entropy         | fp32           | fp32                   | fp32                |

(*) at the platform's default dot precision, as before policies existed: TF32 on recent GPUs, one
bf16 pass on TPU, fp32 on CPU.

Which policy the reference codebases use for ViTs: big_vision keeps activations in fp32 and leaves
dots at the default precision, which on TPU is one bf16 pass with fp32 accumulation: `mixed`.
MaxText's default (`dtype=bfloat16`, `weight_dtype=float32`) keeps activations in bf16:
`bfloat16`. The paper config uses `mixed`, as big_vision and PyTorch's autocast do; it is also the
fastest policy on the CPUs measured here.

`float32` asks every dot for `Precision.HIGHEST`: true fp32 products on GPU (no TF32) and TPU (no
bf16 passes), the reference the other policies are measured against. `mixed` reads half the
bytes at the bf16 matmul rate, with none of bf16's rounding in the elementwise work. Its memory
similarities use bf16 operands as the official code's fp16 autocast does; their fp32 result keeps
the 1/temperature-scaled logits exact to the operands' rounding. `bfloat16` is the policy of earlier releases (`model.dtype=bfloat16`):
the backbone's activations themselves are bf16, which saves some activation memory but is slower
than `mixed` on XLA:CPU (BENCHMARKS.md: precision policies). The attention's own batched matmuls
(QK^T, PV) take bf16 operands in `mixed` and `bfloat16` but keep JAX's gradient (see
`Policy.einsum`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

Dtype = Any


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3, 4))
def matmul(spec: str, a: jnp.ndarray, b: jnp.ndarray, operands: Dtype, dot_precision: Any) -> jnp.ndarray:
    """einsum(spec, a, b) with both operands rounded to `operands`, accumulated and returned in fp32.

    The gradients are the two transposed einsums with the incoming fp32 gradient rounded to
    `operands` as well, so the backward matmuls run at the bf16 rate too, as under PyTorch's
    autocast (whose bf16 outputs get bf16 gradients). JAX's own rule would multiply the fp32
    gradient by the bf16 operand, i.e. in fp32, which is two thirds of a train step's FLOPs.
    `spec` is "<a>,<b>-><out>" in which every index of one operand is in the other or the output.
    """
    return _matmul_forward(spec, a, b, operands, dot_precision)[0]


def rounded_einsum(spec: str, a: jnp.ndarray, b: jnp.ndarray, operands: Dtype, dot_precision: Any) -> jnp.ndarray:
    """einsum(spec, a, b) with both operands rounded to `operands`, accumulated and returned in fp32,
    with JAX's own gradient."""
    return jnp.einsum(spec, a.astype(operands), b.astype(operands), precision=dot_precision,
                      preferred_element_type=jnp.float32)


def _operand_specs(spec: str) -> tuple[str, str, str]:
    """"ab,bc->ac" -> ("ab", "bc", "ac"), refusing specs whose transposed einsums do not exist (an
    index summed out of one operand, or repeated)."""
    inputs, out = spec.split("->")
    a_spec, b_spec = inputs.split(",")
    for mine, other in ((a_spec, b_spec), (b_spec, a_spec)):
        if len(set(mine)) != len(mine) or not set(mine) <= set(other) | set(out):
            raise ValueError(f"precision.matmul: {spec!r} is not a matmul (each index of an operand "
                             "must be in the other operand or the output, once)")
    return a_spec, b_spec, out


def _matmul_forward(spec, a, b, operands, dot_precision):
    _operand_specs(spec)
    a_low, b_low = a.astype(operands), b.astype(operands)
    out = rounded_einsum(spec, a_low, b_low, operands, dot_precision)
    return out, (a_low, b_low, jnp.zeros((), a.dtype), jnp.zeros((), b.dtype))


def _matmul_backward(spec, operands, dot_precision, residuals, grad):
    a_low, b_low, a_like, b_like = residuals
    a_spec, b_spec, out = _operand_specs(spec)
    grad_low = grad.astype(operands)
    grad_a = rounded_einsum(f"{out},{b_spec}->{a_spec}", grad_low, b_low, operands, dot_precision)
    grad_b = rounded_einsum(f"{a_spec},{out}->{b_spec}", a_low, grad_low, operands, dot_precision)
    return grad_a.astype(a_like.dtype), grad_b.astype(b_like.dtype)


matmul.defvjp(_matmul_forward, _matmul_backward)

_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def dot_general_spec(lhs_ndim: int, rhs_ndim: int, dimension_numbers: Any) -> str:
    """The einsum spec of a lax.dot_general (output: batch, lhs free, rhs free dimensions)."""
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
    lhs = list(_LETTERS[:lhs_ndim])
    rhs = [""] * rhs_ndim
    for i, j in zip(lhs_contract, rhs_contract, strict=True):
        rhs[j] = lhs[i]
    for i, j in zip(lhs_batch, rhs_batch, strict=True):
        rhs[j] = lhs[i]
    fresh = iter(_LETTERS[lhs_ndim:])
    rhs = [letter or next(fresh) for letter in rhs]
    out = ([lhs[i] for i in lhs_batch] + [c for i, c in enumerate(lhs) if i not in (*lhs_contract, *lhs_batch)]
           + [c for j, c in enumerate(rhs) if j not in (*rhs_contract, *rhs_batch)])
    return f"{''.join(lhs)},{''.join(rhs)}->{''.join(out)}"


@dataclasses.dataclass(frozen=True)
class Policy:
    name: str
    activations: Dtype  # the backbone's residual stream and its elementwise work
    matmul_operands: Dtype  # what the backbone's matmuls read
    head_matmul_operands: Dtype
    memory_matmul_operands: Dtype
    matmul_precision: jax.lax.Precision | None

    def dot_general(self, lhs: jnp.ndarray, rhs: jnp.ndarray, dimension_numbers: Any,
                    precision: Any = None, preferred_element_type: Dtype | None = None) -> jnp.ndarray:
        """lax.dot_general under the policy (flax Dense/DenseGeneral's `dot_general` argument):
        `matmul`, its product rounded to `activations`. A dot that returns bf16 itself computes the
        same numbers, but XLA:CPU runs it at less than half the speed (BENCHMARKS.md: precision
        policies)."""
        del precision, preferred_element_type  # the policy decides both
        return self.einsum(dot_general_spec(lhs.ndim, rhs.ndim, dimension_numbers), lhs, rhs)

    def einsum(self, spec: str, a: jnp.ndarray, b: jnp.ndarray, result: Dtype | None = None,
               rounded_gradient: bool = True) -> jnp.ndarray:
        """A two-operand einsum under the policy; `result` overrides the product's dtype (attention
        logits are fp32 in every policy, as their softmax is). `rounded_gradient=False` keeps JAX's
        own gradient (the fp32 gradient times the rounded operand, computed in fp32): the
        attention's batched matmuls need it, as XLA:CPU runs their transposes outside YNNPACK, in a
        kernel that has no bf16 x bf16 -> fp32 ("Unsupported element type for DotThunk")."""
        product = matmul if rounded_gradient else rounded_einsum
        return product(spec, a, b, self.matmul_operands, self.matmul_precision).astype(result or self.activations)

    def head(self) -> Policy:
        """The projection head's policy: fp32 activations, the head's matmul operands."""
        return dataclasses.replace(self, activations=jnp.float32, matmul_operands=self.head_matmul_operands)

    def memory_einsum(self, spec: str, a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
        """Similarities to the memory: operands in `memory_matmul_operands`, result in fp32."""
        return matmul(spec, a, b, self.memory_matmul_operands, self.matmul_precision)


_F32, _BF16 = jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)
POLICIES: dict[str, Policy] = {
    "float32": Policy("float32", _F32, _F32, _F32, _F32, jax.lax.Precision.HIGHEST),
    "mixed": Policy("mixed", _F32, _BF16, _BF16, _BF16, None),
    "bfloat16": Policy("bfloat16", _BF16, _BF16, _F32, _F32, None),
}
PRECISIONS = tuple(POLICIES)


def policy(name: str) -> Policy:
    if name not in POLICIES:
        raise ValueError(f"precision={name!r}: expected one of {list(POLICIES)}")
    return POLICIES[name]
