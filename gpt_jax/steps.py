"""The train state and the jitted, sharded train and eval steps: what gpt_jax.train runs, built
once here so that gpt_jax.aot compiles exactly the same programs for any topology.

`build(config, model, mesh, rules, trainable)` gives the state's initialiser and abstract form
(each leaf with the sharding its logical names give) and the two jitted steps with their
shardings. Call the steps, and lower them, under `jax.set_mesh(mesh)` and
`nn.logical_axis_rules(rules)`.

What the train step minimises is an `Objective`: next-token cross-entropy by default; another
(gpt_jax/compress/distillation.py) may read frozen inputs, such as a teacher's parameters, that ride
beside the state as the step's last argument, sharded by the same rules and never saved.
"""

import dataclasses
from typing import Any, Callable

import flax.linen as nn
from flax.training import train_state
import jax
import jax.numpy as jnp
import optax

from gpt_jax import lora as lora_lib
from gpt_jax import backends, kernels, sharding
from gpt_jax.errors import ConfigError
from gpt_jax.model import Transformer, chunked_token_losses


class TrainState(train_state.TrainState):
  """step, params and opt_state (apply_fn and tx are static)."""

  def apply_gradients(self, *, grads, global_norm=None):
    """One optimizer step. `global_norm`, the gradients' norm when the caller has computed it,
    goes to the optimizer's clipping (optim.clip_by_global_norm) instead of a second pass."""
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params,
                                        global_norm=global_norm)
    return self.replace(step=self.step + 1, params=optax.apply_updates(self.params, updates),
                        opt_state=opt_state)


def _forward(model: Transformer, params, batch, deterministic, dropout_rng, hidden_only=False):
  """The model over the batch: logits, or the final norm's output with hidden_only. Packed
  batches pass segment_ids and positions, so no token attends across conversations."""
  out, _ = model.apply({'params': params}, batch['inputs'], positions=batch.get('positions'),
                       segment_ids=batch.get('segment_ids'), deterministic=deterministic,
                       rngs={'dropout': dropout_rng} if dropout_rng is not None else {},
                       hidden_only=hidden_only)
  return out


def batch_logits(model: Transformer, params, batch, deterministic=True, dropout_rng=None):
  """The logits of every token of the batch (all of them at once, whatever model.loss_chunk)."""
  return _forward(model, params, batch, deterministic, dropout_rng)


def token_losses(model: Transformer, params, batch, deterministic=True, dropout_rng=None):
  """(per-token cross-entropy, weights): weights are batch['weights'] or all ones."""
  chunk = model.cfg.loss_chunk
  chunked = 0 < chunk < batch['inputs'].shape[1]
  out = _forward(model, params, batch, deterministic, dropout_rng, hidden_only=chunked)
  if chunked:
    losses = chunked_token_losses(model.cfg, params, out, batch['targets'], chunk)
  else:
    losses = optax.softmax_cross_entropy_with_integer_labels(out, batch['targets'])
  weights = batch.get('weights', jnp.ones_like(losses)).astype(losses.dtype)
  return losses, weights


def loss_fn(model: Transformer, params, batch, dropout_rng):
  """Mean next-token cross-entropy over the batch (weighted when batch has 'weights')."""
  deterministic = model.cfg.dropout == 0 and model.lora.dropout == 0
  losses, weights = token_losses(model, params, batch, deterministic, dropout_rng)
  return jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1)


class Objective:
  """The loss the train step minimises; this one is next-token cross-entropy. Subclasses may
  read frozen `inputs` (arrays beside the state, never saved) and report extra metrics."""

  def abstract_inputs(self, seq_len: int, mesh, rules):
    """The frozen inputs as abstract arrays, each with the sharding its logical names give."""
    del seq_len, mesh, rules
    return {}

  def load_inputs(self, abstract_inputs):
    """The frozen inputs, placed as `abstract_inputs` says (read before training, and again on
    every resume)."""
    del abstract_inputs
    return {}

  def loss(self, model: Transformer, params, batch, dropout_rng, inputs):
    """(the loss to minimise, {name: metric}) for one (micro-)batch."""
    del inputs
    return loss_fn(model, params, batch, dropout_rng), {}


CROSS_ENTROPY = Objective()


def compile_once_run(jitted, *args):
  """`jitted` compiled for `args` with the options of a program run once (initialisation)."""
  return jitted.lower(*args).compile(compiler_options=backends.run_once_compiler_options())


def sharded_state(model: Transformer, tx, seq_len: int, mesh, rules,
                  trainable: lora_lib.Trainable):
  """(init_state(rng) -> (TrainState, frozen params), the abstract (TrainState, frozen) with each
  leaf's sharding).

  The state holds the trainable parameters and their optimizer state; the frozen ones (a LoRA
  run's base, else nothing) ride beside it. Shardings come from the parameters' logical names
  and the rules; a name without a rule, or a dimension that does not divide over its mesh axes,
  is an error here, before any compilation.
  """
  # Unrolling the layer scan changes how the step runs, not the parameters; rolled, the
  # initialisation compiles 1-1.6 s faster (speedrun config, XLA:CPU).
  init_model = model.clone(cfg=dataclasses.replace(model.cfg, scan_unroll=1))

  def boxed_state(rng):
    params = init_model.init(rng, jnp.zeros((1, seq_len), jnp.int32))['params']
    trained, frozen = trainable.split(params)
    state = TrainState.create(apply_fn=model.apply, params=trained, tx=tx)
    # int32, not weakly typed: a restored step and every step's output are the same type, so the
    # train step is traced and compiled once.
    return state.replace(step=jnp.zeros((), jnp.int32)), frozen

  boxed = jax.eval_shape(lambda: boxed_state(jax.random.key(0)))  # no eager key program
  # optax's masked transforms (muon's AdamW part, for one) keep a parameter's box around an
  # empty MaskedNode: such a box holds no array and gets no sharding.
  is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)
  boxed = jax.tree.map(lambda x: x.unbox(apply_constraint=False) if is_box(x) and not
                       jax.tree.leaves(x) else x, boxed, is_leaf=is_box)
  logical_specs = nn.get_partition_spec(boxed)
  sharding.check_rules((logical_specs[0].params, logical_specs[1]), rules)
  shardings = sharding.logical_to_shardings(logical_specs, mesh, rules)
  abstract = jax.tree.map(lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s),
                          nn.unbox(boxed), shardings)
  sharding.check_divisible((abstract[0].params, abstract[1]), (shardings[0].params, shardings[1]))
  return (lambda rng: nn.unbox(boxed_state(rng))), abstract


def make_train_step(model: Transformer, schedule, grad_accum_steps: int, seed: int,
                    trainable: lora_lib.Trainable, objective: Objective = CROSS_ENTROPY):
  """train_step(state, batch, frozen, inputs) -> (state, metrics); gradients for state.params
  only. `inputs`: the objective's frozen inputs ({} for cross-entropy, which may omit them)."""

  def train_step(state: TrainState, batch, frozen, inputs=None):
    rng = jax.random.fold_in(jax.random.key(seed), state.step)  # randomness from (seed, step)
    grad_fn = jax.value_and_grad(
        lambda p, b, r: objective.loss(model, trainable.assemble(p, frozen), b, r, inputs),
        has_aux=True)
    if grad_accum_steps == 1:
      (loss, extra), grads = grad_fn(state.params, batch, rng)
    else:
      # Micro-batch i takes rows i, i+k, i+2k, ... so that each one spans every data shard.
      micro = jax.tree.map(
          lambda x: x.reshape(-1, grad_accum_steps, *x.shape[1:]).swapaxes(0, 1), batch)

      def accumulate(grad_sum, scanned):
        i, micro_batch = scanned
        (loss, extra), grads = grad_fn(state.params, micro_batch, jax.random.fold_in(rng, i))
        return jax.tree.map(jnp.add, grad_sum, grads), (loss, extra)

      zeros = jax.tree.map(jnp.zeros_like, state.params)
      grads, (losses, extras) = jax.lax.scan(accumulate, zeros,
                                             (jnp.arange(grad_accum_steps), micro))
      grads = jax.tree.map(lambda g: g / grad_accum_steps, grads)
      loss, extra = losses.mean(), jax.tree.map(jnp.mean, extras)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    # A non-finite loss or gradient leaves parameters and optimizer state as they were, so no
    # NaN ever reaches a checkpoint; the loop halts or counts the skipped step. A cond rather
    # than a select of old and new: the update runs in place, without keeping the old state.
    new_state = jax.lax.cond(finite,
                             lambda s: s.apply_gradients(grads=grads, global_norm=grad_norm),
                             lambda s: s.replace(step=s.step + 1), state)
    metrics = {'train_loss': loss, 'grad_norm': grad_norm, 'lr': schedule(state.step),
               'nonfinite': jnp.logical_not(finite).astype(jnp.int32), **extra}
    return new_state, metrics

  return train_step


def make_eval_step(model: Transformer, trainable: lora_lib.Trainable):

  def eval_step(params, batch, frozen):
    losses, weights = token_losses(model, trainable.assemble(params, frozen), batch)
    return jnp.sum(losses * weights), jnp.sum(weights)

  return eval_step


def check_batch_fits_mesh(config, mesh) -> None:
  """The (micro-)batches divide over the data-parallel devices: a clear error, not XLA's."""
  data_shards = mesh.shape['data'] * mesh.shape['fsdp']
  micro_batch = config.data.batch_size // config.optim.grad_accum_steps
  if micro_batch % data_shards:
    raise ConfigError(f'The micro-batch of {micro_batch} sequences (data.batch_size / '
                      f'optim.grad_accum_steps) does not divide over data x fsdp = {data_shards} '
                      'devices')
  if config.data.eval_batch_size % data_shards:
    raise ConfigError(f'data.eval_batch_size ({config.data.eval_batch_size}) does not divide '
                      f'over data x fsdp = {data_shards} devices')


@dataclasses.dataclass(frozen=True)
class Steps:
  """A run's state and jitted steps on one mesh (see `build`)."""
  init_state: Callable          # rng -> (TrainState, frozen params); jit with out_shardings
  abstract_state: TrainState    # ShapeDtypeStructs with their shardings
  abstract_frozen: Any
  abstract_inputs: Any          # the objective's frozen inputs ({} for cross-entropy)
  batch_sharding: jax.sharding.NamedSharding
  train_step: Any               # (state, batch, frozen, inputs) -> (new state, metrics)
  eval_step: Any                # (params, batch, frozen) -> (loss sum, weight sum)
  # The batch's int32 [batch, seq_len] arrays: segment ids and positions with document masking.
  batch_keys: tuple[str, ...] = ('inputs', 'targets')

  @property
  def state_shardings(self):
    return jax.tree.map(lambda x: x.sharding, self.abstract_state)

  @property
  def frozen_shardings(self):
    return jax.tree.map(lambda x: x.sharding, self.abstract_frozen)

  def abstract_batch(self, batch_size: int, seq_len: int) -> dict[str, jax.ShapeDtypeStruct]:
    """A pretraining batch of token ids, as the train step takes it."""
    return {key: jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32,
                                      sharding=self.batch_sharding)
            for key in self.batch_keys}


def build(config, model: Transformer, tx, schedule, mesh, rules,
          trainable: lora_lib.Trainable, objective: Objective = CROSS_ENTROPY) -> Steps:
  """The state (abstract, and its initialiser) and the jitted train and eval steps of `config`
  on `mesh`; the train step minimises `objective` (the eval step: cross-entropy)."""
  kernels.check_attention(model.cfg.attention, mesh.devices.flat[0].platform)
  init_state, (abstract_state, abstract_frozen) = sharded_state(
      model, tx, config.data.seq_len, mesh, rules, trainable)
  batch_sharding = sharding.batch_sharding(mesh, rules)
  state_shardings = jax.tree.map(lambda x: x.sharding, abstract_state)
  frozen_shardings = jax.tree.map(lambda x: x.sharding, abstract_frozen)
  abstract_inputs = objective.abstract_inputs(config.data.seq_len, mesh, rules)
  train_step = jax.jit(
      make_train_step(model, schedule, config.optim.grad_accum_steps, config.seed, trainable,
                      objective),
      in_shardings=(state_shardings, batch_sharding, frozen_shardings,
                    jax.tree.map(lambda x: x.sharding, abstract_inputs)),
      out_shardings=(state_shardings, None),
      donate_argnums=0)  # the old state's buffers are reused for the new one
  eval_step = jax.jit(make_eval_step(model, trainable),
                      in_shardings=(state_shardings.params, batch_sharding, frozen_shardings))
  return Steps(init_state=init_state, abstract_state=abstract_state,
               abstract_frozen=abstract_frozen, abstract_inputs=abstract_inputs,
               batch_sharding=batch_sharding,
               train_step=train_step, eval_step=eval_step,
               batch_keys=('inputs', 'targets') + (
                   ('segment_ids', 'positions') if config.data.get('document_masking') else ()))
