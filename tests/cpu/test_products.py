"""matmul: bf16 products with float32 accumulation, forward and backward."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt_jax.backends.cpu.products import FEW_ROWS, add_bias, einsum, matmul


@pytest.mark.parametrize('w_transposed', [False, True], ids=['w', 'w_transposed'])
def test_bfloat16_matmul_and_its_gradients_equal_exact_products_of_the_rounded_inputs(
    w_transposed):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((40, 96)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((24, 96) if w_transposed else (96, 24)), jnp.float32)
  dy = jnp.asarray(rng.standard_normal((40, 24)), jnp.bfloat16)

  y, vjp = jax.vjp(lambda x, w: matmul(x, w, 'bfloat16', w_transposed), x, w)
  dx, dw = jax.jit(vjp)(dy)

  # What a bf16 matmul unit computes: products of bf16-rounded inputs, summed in float32.
  as_bf16 = lambda a: np.asarray(jnp.asarray(a).astype(jnp.bfloat16), np.float64)
  xb, wb, dyb = as_bf16(x), as_bf16(w), as_bf16(dy)
  wm = wb.T if w_transposed else wb  # [96, 24]
  assert y.dtype == jnp.bfloat16 and dx.dtype == jnp.float32 and dw.dtype == jnp.float32
  np.testing.assert_allclose(y.astype(jnp.float32), as_bf16(xb @ wm), rtol=2 ** -7)
  np.testing.assert_allclose(dx, dyb @ wm.T, rtol=2 ** -8, atol=1e-5)
  # The weight gradient is summed in float32 and returned without a bf16 rounding.
  exact_dw = (xb.T @ dyb).T if w_transposed else xb.T @ dyb
  np.testing.assert_allclose(dw, exact_dw, rtol=1e-5, atol=1e-4)
  assert np.abs(np.asarray(dw) - as_bf16(exact_dw)).max() > 1e-3


@pytest.mark.parametrize('rows', [40, 4], ids=['training', 'few_rows'])
def test_bfloat16_matmul_returns_float32_sums_unrounded(rows):
  """out_dtype=float32 (the output head's logits): the float32 sums of the bf16 products, not
  rounded to bf16; the gradients are those of the bf16-output product."""
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal((rows, 96)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((24, 96)), jnp.float32)
  dy = jnp.asarray(rng.standard_normal((rows, 24)), jnp.float32)
  as_bf16 = lambda a: np.asarray(jnp.asarray(a).astype(jnp.bfloat16), np.float64)
  exact = as_bf16(x) @ as_bf16(w).T

  y, vjp = jax.vjp(lambda x, w: matmul(x, w, 'bfloat16', True, out_dtype=jnp.float32), x, w)
  assert y.dtype == jnp.float32
  np.testing.assert_allclose(y, exact, rtol=1e-5, atol=1e-4)
  assert np.abs(np.asarray(y) - as_bf16(exact)).max() > 1e-3  # not rounded to bf16
  dx, dw = jax.jit(vjp)(dy)
  dx_ref, dw_ref = jax.vjp(lambda x, w: matmul(x, w, 'bfloat16', True), x, w)[1](
      dy.astype(jnp.bfloat16))
  np.testing.assert_allclose(dx, dx_ref, rtol=1e-6)
  np.testing.assert_allclose(dw, dw_ref, rtol=1e-6)
  # Not differentiated (decoding), a few rows take the kernel-left form, unrounded too.
  np.testing.assert_allclose(jax.jit(lambda x, w: matmul(x, w, 'bfloat16', True,
                                                          out_dtype=jnp.float32))(x, w),
                             exact, rtol=1e-5, atol=1e-4)


def test_float32_matmul_is_the_plain_product():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((8, 16)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((16, 4)), jnp.float32)
  np.testing.assert_array_equal(matmul(x, w, 'float32'), x @ w)
  np.testing.assert_array_equal(matmul(x, w.T, jnp.float32, w_transposed=True), x @ w)


@pytest.mark.parametrize('w_transposed', [False, True], ids=['w', 'w_transposed'])
def test_compiled_bfloat16_products_keep_bfloat16_operands(w_transposed):
  """XLA:CPU runs a product whose bf16 operands were converted from float32 in float32 when its
  right operand is transposed; every product of the compiled forward and backward must still
  take bf16 operands."""
  if not _xla_keeps_bfloat16_products():
    pytest.skip('XLA runs bf16 products in float32 on this CPU (no bf16 matmul instructions)')
  x = jax.ShapeDtypeStruct((64, 96), jnp.float32)
  w = jax.ShapeDtypeStruct((32, 96) if w_transposed else (96, 32), jnp.float32)

  def value_and_grads(x, w):
    return jax.value_and_grad(
        lambda x, w: jnp.sum(matmul(x, w, 'bfloat16', w_transposed).astype(jnp.float32) ** 2),
        argnums=(0, 1))(x, w)

  program = jax.jit(value_and_grads).lower(x, w).compile().as_text()
  operand_dtypes = _compiled_dot_operand_dtypes(program)
  assert len(operand_dtypes) == 3, program
  assert all(dtypes == ('bf16', 'bf16') for dtypes in operand_dtypes), operand_dtypes


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='a form chosen for XLA:CPU')
@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_few_rows_times_a_transposed_kernel_put_the_kernel_on_the_left(dtype):
  """x @ w.T (the tied output head) for a few rows runs as (w @ x.T).T; one row and many rows
  keep x on the left."""
  rng = np.random.default_rng(2)
  w = jnp.asarray(rng.standard_normal((48, 96)), jnp.float32)
  for rows, kernel_left in ((1, False), (8, True), (FEW_ROWS, True), (FEW_ROWS + 1, False)):
    x = jnp.asarray(rng.standard_normal((rows, 96)), jnp.float32)
    product = jax.jit(lambda x, w: matmul(x, w, dtype, w_transposed=True))
    y = product(x, w)
    as_dtype = lambda a: np.asarray(jnp.asarray(a).astype(dtype), np.float64)
    np.testing.assert_allclose(np.asarray(y, np.float64), as_dtype(as_dtype(x) @ as_dtype(w).T),
                               rtol=2e-6 if dtype == 'float32' else 2 ** -7, atol=1e-5)
    program = product.lower(x, w).compile().as_text()
    left_shapes = [re.search(rf'%{re.escape(left)} = \w+\[([\d,]+)\]', program).group(1)
                   for left, _ in re.findall(r'\bdot\(%(\S+), %(\S+)\)', program)]
    assert len(left_shapes) == 1 and (left_shapes[0] == '48,96') == kernel_left, (rows,
                                                                                 left_shapes)


def _lowered_dot_operand_dtypes(program: str) -> list[tuple[str, str]]:
  """Operand dtypes of each product in a lowered (StableHLO) program."""
  return re.findall(r'stablehlo\.dot_general .*?: \(tensor<(?:\d+x)*(\w+)>, '
                    r'tensor<(?:\d+x)*(\w+)>\)', program)


def _compiled_dot_operand_dtypes(program: str) -> list[tuple[str, str]]:
  dtypes = []
  for operands in re.findall(r'\bdot\(%(\S+), %(\S+)\)', program):
    dtypes.append(tuple(re.search(rf'%{re.escape(name)} = (\w+)\[', program).group(1)
                        for name in operands))
  return dtypes


def _xla_keeps_bfloat16_products() -> bool:
  """Whether XLA compiles the plainest bf16 product (bf16 inputs, [n, k] @ [k, m], float32
  accumulation) with bf16 operands on this device: CPUs without bf16 matmul instructions
  convert them to float32."""
  a = jax.ShapeDtypeStruct((64, 96), jnp.bfloat16)
  b = jax.ShapeDtypeStruct((96, 32), jnp.bfloat16)
  program = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32)).lower(
      a, b).compile().as_text()
  return _compiled_dot_operand_dtypes(program) == [('bf16', 'bf16')]


@pytest.mark.parametrize('out_dtype', ['bfloat16', 'float32'])
def test_bfloat16_einsum_and_its_gradients_are_products_of_bfloat16_operands(out_dtype):
  # Attention's two products: logits (float32 out) and probabilities @ values (bf16 out).
  spec = 'btnd,bsnd->bnts' if out_dtype == 'float32' else 'bnts,bsnd->btnd'
  a_shape, b_shape = ((2, 6, 3, 8), (2, 5, 3, 8)) if out_dtype == 'float32' else (
      (2, 3, 6, 5), (2, 5, 3, 8))
  rng = np.random.default_rng(2)
  a, b = (jnp.asarray(rng.standard_normal(shape), jnp.bfloat16) for shape in (a_shape, b_shape))
  y, vjp = jax.vjp(lambda a, b: einsum(spec, a, b, 'bfloat16', out_dtype), a, b)
  dy = jnp.asarray(rng.standard_normal(y.shape), out_dtype)
  da, db = jax.jit(vjp)(dy)

  as_bf16 = lambda x: np.asarray(jnp.asarray(x).astype(jnp.bfloat16), np.float64)
  exact = lambda spec, x, z: np.einsum(spec, as_bf16(x), as_bf16(z))
  inputs, out = spec.split('->')
  a_axes, b_axes = inputs.split(',')
  assert y.dtype == out_dtype and da.dtype == db.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y, np.float64), exact(spec, a, b), rtol=2 ** -7, atol=1e-5)
  # The cotangent is rounded to bf16 first (a float32 one would make float32 products).
  np.testing.assert_allclose(np.asarray(da, np.float64), exact(f'{out},{b_axes}->{a_axes}', dy, b),
                             rtol=2 ** -7, atol=2e-2)
  np.testing.assert_allclose(np.asarray(db, np.float64), exact(f'{a_axes},{out}->{b_axes}', a, dy),
                             rtol=2 ** -7, atol=2e-2)
  program = jax.jit(vjp).lower(dy).as_text()
  assert _lowered_dot_operand_dtypes(program) == [('bf16', 'bf16')] * 2


def test_float32_einsum_is_the_plain_einsum():
  rng = np.random.default_rng(3)
  a = jnp.asarray(rng.standard_normal((2, 4, 8)), jnp.float32)
  b = jnp.asarray(rng.standard_normal((2, 5, 8)), jnp.float32)
  np.testing.assert_array_equal(einsum('bid,bjd->bij', a, b, 'float32'),
                                jnp.einsum('bid,bjd->bij', a, b))


def test_einsum_names_an_axis_summed_out_of_one_operand_alone():
  with pytest.raises(ValueError, match=r"axes \['j'\] are summed out of one operand alone"):
    einsum('ij,ik->ik', jnp.ones((2, 3)), jnp.ones((2, 4)), 'bfloat16')


def test_bfloat16_bias_gradient_is_a_product_summed_in_float32():
  rng = np.random.default_rng(4)
  y = jnp.asarray(rng.standard_normal((300, 16)), jnp.bfloat16)
  bias = jnp.asarray(rng.standard_normal(16), jnp.float32)
  dy = jnp.asarray(rng.standard_normal((300, 16)), jnp.bfloat16)
  out, vjp = jax.vjp(add_bias, y, bias)
  dy_back, dbias = jax.jit(vjp)(dy)
  np.testing.assert_array_equal(out, y + bias.astype(jnp.bfloat16))
  np.testing.assert_array_equal(dy_back, dy)
  # Summed in float32 over 300 rows: far closer than a bf16 sum could be.
  exact = np.asarray(dy, np.float64).sum(axis=0)
  assert dbias.dtype == jnp.float32
  np.testing.assert_allclose(dbias, exact, rtol=1e-5, atol=1e-4)
  program = jax.jit(vjp).lower(dy).as_text()
  assert _lowered_dot_operand_dtypes(program) == [('bf16', 'bf16')]
  # float32: the plain sum.
  y32 = y.astype(jnp.float32)
  np.testing.assert_allclose(jax.grad(lambda b: jnp.sum(add_bias(y32, b) * 2))(bias),
                             np.full(16, 600.0))
