"""2-D products in a low-precision compute dtype that stay on the fast matmul path, gradients
included.

In bfloat16, XLA:CPU's fast (YNNPACK) products need float32 accumulation to be asked for and the
left operand's contracted axis to be its last in memory. A plain `x @ w` in bf16 returns bf16
and ran at 142-196 GFLOP/s where the fast path reaches 300-415 on a CPU with AVX-512-bf16; its
weight gradient, x^T @ dy, contracts the token axis of both operands and ran at 137-182 as well
(experiments/benchmarks/README.md). Inside a model, where the bf16 operands are converted from
float32 ones, XLA:CPU also ran every product with a transposed right operand (x @ w.T: the tied
output head, and dy @ w.T in every projection's backward pass) in float32. `matmul` asks for
float32 accumulation in all three products of a projection and, on CPU, hands each product
row-major operands in the [n, k] @ [k, m] form, copying the transposed ones (a weight
gradient's x.T, a kernel's w.T) first. In float32 it is a plain product.

`einsum` does the same for batched products (attention's two): operands in the compute dtype,
sums in float32, and gradients that are products of the same kind, the float32 cotangent of
attention's logits included (cast to bf16 first, as FlashAttention does).

A product of a few rows (a decoding step) runs on XLA:CPU at about twice the speed with the
many-row operand on the left: `few_rows_product` computes x @ w.T for w stored [out, in] as
(w @ x.T).T. The tied output head at 8 rows took 11.3 ms as x @ E.T and 6.2 ms in that form
(experiments/bench_decode/README.md).

All of this is for XLA:CPU: gpt_jax.backends calls these forms for CPU meshes only; compiled
for a TPU or a GPU, the products are plain ones with float32 sums and autodiff's gradients.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental.layout import Layout, with_layout_constraint

Array = jax.Array


def _transposed_in_memory(x: Array) -> Array:
  """x.T, laid out row-major. XLA folds a plain transpose into the product's dimension numbers
  (or into a layout), which is the slow form, so the copy's layout is fixed. XLA:CPU compiles
  that copy as a transpose: a [3072, 768] bf16 one took 0.5 ms where the earlier form, a 1-D
  reshape behind a barrier, compiled to an elementwise loop taking 2.6 ms (bf16 train steps
  1.02-1.06x as fast, experiments/benchmarks/README.md)."""
  return with_layout_constraint(x.T, Layout(major_to_minor=(0, 1)))


# Products with more rows than this (prefills, training) keep the activations on the left.
FEW_ROWS = 64


def few_rows_product(kernel: Array, x: Array, dtype, out_dtype=None) -> Array:
  """x [n, k] @ kernel.T for kernel [m, k], computed as (kernel @ x.T).T in `dtype`, summed in
  float32, returned in `out_dtype` (or `dtype`). The barrier keeps XLA from folding the
  transpose back into the product, which would put the activations on the left again."""
  y = jnp.matmul(kernel.astype(dtype), x.T.astype(dtype), preferred_element_type=jnp.float32)
  return jax.lax.optimization_barrier(y).T.astype(out_dtype or dtype)


def _head_form_pays(rows: int) -> bool:
  """Whether x @ w.T (w [m, k]) runs faster as few_rows_product. Not at one row: XLA:CPU's
  product of one row by a row-major w.T is already a fast matrix-vector product (2.7-4.0 ms
  against 3.4-4.3 ms for the GPT-2 head)."""
  return 1 < rows <= FEW_ROWS


def _product(a: Array, b: Array, dtype, out_dtype=None) -> Array:
  """a @ b with operands in `dtype`, summed in float32, returned in `out_dtype` (or `dtype`)."""
  return jnp.matmul(a.astype(dtype), b.astype(dtype),
                    preferred_element_type=jnp.float32).astype(out_dtype or dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _low_precision_matmul(x: Array, w: Array, dtype, w_transposed: bool, out_dtype) -> Array:
  # Not differentiated (decoding): a few rows take the kernel-left form. Under differentiation
  # (_forward), XLA:CPU compiled the backward products of that form with float32 operands.
  if w_transposed and _head_form_pays(x.shape[0]):
    return few_rows_product(w, x, dtype, out_dtype)
  return _row_major_product(x, w, dtype, w_transposed, out_dtype)


def _row_major_product(x: Array, w: Array, dtype, w_transposed: bool, out_dtype) -> Array:
  return _product(x, _transposed_in_memory(w.astype(dtype)) if w_transposed else w, dtype,
                  out_dtype)


def _forward(x, w, dtype, w_transposed, out_dtype):
  return _row_major_product(x, w, dtype, w_transposed, out_dtype), (x, w)


def _backward(dtype, w_transposed, out_dtype, residuals, dy):
  x, w = residuals
  if w_transposed:  # y = x @ w.T with w [m, k]
    dx = _product(dy, w, dtype)
    dw = _product(_transposed_in_memory(dy.astype(dtype)), x, dtype, w.dtype)
  else:             # y = x @ w with w [k, m]
    dx = _product(dy, _transposed_in_memory(w.astype(dtype)), dtype)
    dw = _product(_transposed_in_memory(x.astype(dtype)), dy, dtype, w.dtype)
  return dx.astype(x.dtype), dw  # dw: summed in float32, then in w's dtype


_low_precision_matmul.defvjp(_forward, _backward)


def matmul(x: Array, w: Array, dtype, w_transposed: bool = False, out_dtype=None) -> Array:
  """x [n, k] @ w [k, m] (or @ w.T for w [m, k] when `w_transposed`) -> [n, m] in `out_dtype`
  (by default `dtype`).

  Operands are cast to `dtype` and summed in float32; `out_dtype=float32` returns those sums
  unrounded (the output head's logits). The gradient of `w` is summed in float32 and returned in
  w's own dtype (float32 parameters get float32 gradients without a bf16 rounding in between).
  """
  dtype = jnp.dtype(dtype)
  out_dtype = jnp.dtype(out_dtype or dtype)
  if dtype == jnp.float32:
    if w_transposed and _head_form_pays(x.shape[0]):
      return few_rows_product(w, x, dtype, out_dtype)
    x, w = x.astype(dtype), w.astype(dtype)
    return (x @ (w.T if w_transposed else w)).astype(out_dtype)
  return _low_precision_matmul(x, w, dtype, w_transposed, out_dtype)


def _einsum_in(spec: str, a: Array, b: Array, dtype, out_dtype) -> Array:
  """jnp.einsum(spec, a, b) summed in float32, as one product [batch, m, k] @ [batch, k, n]
  transposed to the output. XLA:CPU's bf16 products run only in its fast (YNNPACK) path, which
  takes an operand laid out [batch, k, n] only on the right: an einsum handed to it with
  such an operand on the left compiled to a product that failed at run time ("Unsupported
  element type for DotThunk"). So that operand goes on the right."""
  a_axes, b_axes, out = _axes(spec)
  if _rows_by_columns(a_axes, b_axes, out) and not _rows_by_columns(b_axes, a_axes, out):
    (a_axes, a), (b_axes, b) = (b_axes, b), (a_axes, a)
  batch = [x for x in a_axes if x in b_axes and x in out]
  product = ''.join(batch + [x for x in a_axes if x not in b_axes]
                    + [x for x in b_axes if x not in a_axes])
  y = jnp.einsum(f'{a_axes},{b_axes}->{product}', a.astype(dtype), b.astype(dtype),
                 preferred_element_type=jnp.float32)
  return jnp.transpose(y, [product.index(x) for x in out]).astype(out_dtype)


def _axes(spec: str) -> tuple[str, str, str]:
  """'ab,bc->ac' -> ('ab', 'bc', 'ac')."""
  inputs, out = spec.split('->')
  a_axes, b_axes = inputs.split(',')
  return a_axes, b_axes, out


def _rows_by_columns(axes: str, other: str, out: str) -> bool:
  """Whether an operand with these axes is laid out [batch..., contracted..., free...]."""
  batch = [x for x in axes if x in other and x in out]
  contracted = [x for x in axes if x in other and x not in out]
  free = [x for x in axes if x not in other]
  return list(axes) == batch + contracted + free and bool(contracted) and bool(free)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3, 4))
def _low_precision_einsum(spec: str, a: Array, b: Array, dtype, out_dtype) -> Array:
  return _einsum_in(spec, a, b, dtype, out_dtype)


def _einsum_forward(spec, a, b, dtype, out_dtype):
  return _einsum_in(spec, a, b, dtype, out_dtype), (a, b)


def _einsum_backward(spec, dtype, out_dtype, residuals, dy):
  a, b = residuals
  a_axes, b_axes, out = _axes(spec)
  # Every axis of each operand is in the other or in the output (no axis summed out alone),
  # so each gradient is the same kind of product.
  da = _einsum_in(f'{out},{b_axes}->{a_axes}', dy, b, dtype, a.dtype)
  db = _einsum_in(f'{a_axes},{out}->{b_axes}', a, dy, dtype, b.dtype)
  return da, db


_low_precision_einsum.defvjp(_einsum_forward, _einsum_backward)


def einsum(spec: str, a: Array, b: Array, dtype, out_dtype=None) -> Array:
  """jnp.einsum(spec, a, b) with operands in `dtype`, summed in float32, returned in `out_dtype`
  (or `dtype`). In a low-precision dtype its gradients are the same kind of product: the
  cotangent is cast to `dtype`, so that a float32 output (attention's logits) does not send
  float32 operands into the backward products. Every axis of `a` must be in `b` or the output,
  and likewise for `b`."""
  a_axes, b_axes, out = _axes(spec)
  summed_alone = set(a_axes) - set(b_axes + out) | set(b_axes) - set(a_axes + out)
  if summed_alone:
    raise ValueError(f'einsum {spec!r}: axes {sorted(summed_alone)} are summed out of one '
                     'operand alone; sum them before the product')
  dtype = jnp.dtype(dtype)
  out_dtype = jnp.dtype(out_dtype or dtype)
  if dtype == jnp.float32:
    return jnp.einsum(spec, a.astype(dtype), b.astype(dtype)).astype(out_dtype)
  return _low_precision_einsum(spec, a, b, dtype, out_dtype)


def int8_matmul(x: Array, w: Array, w_transposed: bool = False) -> Array:
  """int8 x [n, k] @ int8 w [k, m] (or @ w.T for w [m, k]) -> int32 [n, m]. XLA:CPU runs an
  int8 product of two or more rows in its fast (YNNPACK) path, but rewrites a one-row product
  as a matrix-vector product over the kernel converted to int32 first: 3.4x slower than the
  float32 product at GPT-2's MLP shape. One row is multiplied as two (a zero row added), which
  keeps the fast path (experiments/quantize/bench_int8_products.py)."""
  rows = x.shape[0]
  if rows == 1:
    x = jnp.concatenate([x, jnp.zeros_like(x)])
  y = jax.lax.dot_general(x, w, (((1,), (1 if w_transposed else 0,)), ((), ())),
                          preferred_element_type=jnp.int32)
  return y[:rows]


@jax.custom_vjp
def _add_bias_low_precision(y: Array, bias: Array) -> Array:
  return y + bias.astype(y.dtype)


def _add_bias_forward(y, bias):
  return _add_bias_low_precision(y, bias), bias


def _add_bias_backward(bias, dy):
  ones = jnp.ones((1, dy.shape[0]), dy.dtype)
  dbias = jnp.matmul(ones, dy, preferred_element_type=jnp.float32)[0]
  return dy, dbias.astype(bias.dtype)


_add_bias_low_precision.defvjp(_add_bias_forward, _add_bias_backward)


def add_bias(y: Array, bias: Array) -> Array:
  """y [n, m] + bias [m] in y's dtype. In a low-precision dtype the bias gradient, a sum over
  the n rows, is the product ones[1, n] @ dy summed in float32: XLA:CPU reduced bf16 gradients
  outside its fast path, and as a product bf16 train steps ran 1.04-1.15x as fast
  (experiments/benchmarks/README.md)."""
  if y.dtype == jnp.float32:
    return y + bias.astype(y.dtype)
  return _add_bias_low_precision(y, bias)
