"""Workers that are groups of devices: the ``workers × model`` mesh (PROTOCOL.md §13).

The coded gradient on 4×2 and 2×4 meshes equals the full-batch gradient (exact and
deadline modes, with failures and message losses), parameters and optimizer state
are sharded over each group, train.py trains exactly with ``--config.mesh.model=2``
and its checkpoint restores on the same mesh.
"""
import functools
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from jaxgc import adaptive, assignments, experiment, models, parallel, protocols, timing

M, LOAD, ELL, CB, FEAT = 8, 3, 2, 4, 16
RULE = parallel.fsdp_rule(min_size=1024)      # the small test model's kernels are sharded


@functools.cache
def setup():
  model = models.get_model("mlp", 4, (256, 240))
  params = models.init_params(model, jax.random.key(0), np.zeros((1, FEAT), np.float32))
  loss_fn = models.chunk_loss_fn(model.apply, M * CB)
  rng = np.random.default_rng(0)
  chunks = (rng.normal(size=(M, CB, FEAT)).astype(np.float32),
            rng.integers(0, 4, (M, CB)).astype(np.int32))
  total = lambda p: sum(loss_fn(p, (chunks[0][i], chunks[1][i])) for i in range(M))
  return params, loss_fn, chunks, jax.jit(jax.grad(total))(params)


def flat(tree):
  return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(tree)])


@functools.cache
def gradient_fn(model: int, mode: str):
  _, loss_fn, _, _ = setup()
  proto = protocols.PartialStraggler(assignments.cyclic(M, LOAD), ELL)
  straggler = timing.get_model("slowdown", failure_prob=0.25)
  step = parallel.make_coded_step(
      proto, straggler, loss_fn, optax.sgd(0.1), parallel.make_mesh(8, model=model), mode=mode,
      deadline=10.0 if mode == "deadline" else None,
      # Deadline mode stops at the first decodable time: any lost message there is inexact.
      message_loss_prob=0.2 if mode == "exact" else 0.0, param_sharding=RULE)
  return step, jax.jit(step.gradient)


# -- the mesh ------------------------------------------------------------------------

def test_make_mesh_groups_adjacent_devices():
  devices = jax.devices()
  assert parallel.make_mesh(8, model=1).axis_names == ("workers",)      # today's mesh
  assert parallel.make_mesh(8, model=1).devices.tolist() == devices[:8]
  for k in (2, 4, 8):
    mesh = parallel.make_mesh(8, model=k)
    assert mesh.axis_names == ("workers", "model") and mesh.devices.shape == (8 // k, k)
    for g, row in enumerate(mesh.devices):
      assert list(row) == devices[g * k:(g + 1) * k]
  for bad in (3, 0, 16):
    with pytest.raises(ValueError, match=f"model={bad} must be a positive integer dividing"):
      parallel.make_mesh(8, model=bad)


# -- exactness ---------------------------------------------------------------------

@pytest.mark.parametrize("model", [2, 4])
@pytest.mark.parametrize("mode", ["exact", "deadline"])
def test_gradient_on_2d_mesh_is_exact(model, mode):
  """Every decodable step, failed workers and lost messages included, gives the
  full-batch gradient, sharded like the parameters."""
  params, _, chunks, want = setup()
  step, grad = gradient_fn(model, mode)
  place = step.placement(params)
  assert place.sharded
  seen = set()
  for key in range(12):
    g, metrics = grad(params, chunks, jax.random.key(key))
    assert all(x.sharding.is_equivalent_to(s, x.ndim)
               for x, s in zip(jax.tree.leaves(g), jax.tree.leaves(place.shardings), strict=True))
    if bool(metrics["exact"]):
      np.testing.assert_allclose(flat(g), flat(want), rtol=1e-5, atol=1e-7)
      seen.add("erasure" if int(metrics["erasures"]) else "exact")
    else:
      seen.add("inexact")
    if len(seen) > 1:
      break
  # Exact mode: decodable after lost messages and failed workers; deadline mode: with failures.
  assert ("erasure" if mode == "exact" else "exact") in seen, seen


def test_update_keeps_state_sharded_and_adaptive_ps_works():
  """init_state shards parameters and Adam's moments over the group, update keeps them
  there, and the adaptive PS (it moves only durations) steps exactly on the 2-D mesh."""
  params, loss_fn, chunks, want = setup()
  proto = protocols.PartialStraggler(assignments.cyclic(M, LOAD), ELL)
  mesh = parallel.make_mesh(8, model=4)
  # eps well above round-off: Adam's g / sqrt(v) would turn a zero gradient's round-off
  # into a full step and hide real mismatches behind a loose tolerance.
  tx = optax.adam(1e-2, eps=1e-3)
  step = parallel.make_coded_step(proto, timing.get_model("slowdown"), loss_fn, tx, mesh,
                                  adaptive=adaptive.AdaptivePS(proto), param_sharding=RULE)
  state = step.init_state(params, jax.random.key(0))
  place = step.placement(params)
  specs = [s.spec for s in jax.tree.leaves(place.shardings)]
  assert P("model", None) in specs and P() in specs      # large leaves sharded, small not
  compiled = jax.jit(step.update).lower(state, chunks, jax.random.key(0)).compile()
  new, metrics = compiled(state, chunks, jax.random.key(0))
  assert bool(metrics["exact"]) and not bool(metrics["skipped"])
  same = lambda tree: all(x.sharding.is_equivalent_to(s, x.ndim) for x, s in
                          zip(jax.tree.leaves(tree), jax.tree.leaves(place.shardings),
                              strict=True))
  for s in (state, new):
    assert same(s.params) and same(s.opt_state[0].mu) and same(s.opt_state[0].nu)
  # The update is Adam's on the full-batch gradient.
  ref_updates, _ = tx.update(want, tx.init(params), params)
  np.testing.assert_allclose(flat(new.params), flat(optax.apply_updates(params, ref_updates)),
                             rtol=1e-5, atol=1e-6)
  # Messages stay sharded: no all-gather in the step is near a gradient's size (only
  # activations and small replicated leaves move), and no collective-permute (every
  # device would have to join it, inside branches that groups take differently).
  hlo = compiled.as_text()
  gathered = [int(np.prod([int(n) for n in m[1].split(",") if n]))
              for m in re.finditer(r"= \w+\[([\d,]*)\][^=]*? all-gather\(", hlo)]
  assert max(gathered, default=0) < flat(params).size // 8
  assert "collective-permute(" not in hlo
  # Per-device parameter + optimizer bytes: close to 1/k of a replica's.
  whole = sum(x.nbytes for x in jax.tree.leaves((params, tx.init(params))))
  assert parallel.device_bytes((new.params, new.opt_state)) <= 1.1 * whole / 4


# -- placement and bad input ---------------------------------------------------------

def test_placement_rule_overrides_and_errors():
  shapes = {"a": jax.ShapeDtypeStruct((6, 1024), jnp.float32),     # largest dim divisible
            "b": jax.ShapeDtypeStruct((1024, 6), jnp.float32),
            "odd": jax.ShapeDtypeStruct((99, 101), jnp.float32),    # nothing divisible by 4
            "small": jax.ShapeDtypeStruct((8,), jnp.float32)}
  mesh = parallel.make_mesh(8, model=4)
  place = parallel.place_params(shapes, mesh)
  assert place.specs == {"a": P(None, "model"), "b": P("model", None), "odd": P(), "small": P()}
  summary = place.summary()
  assert "['odd'] [99, 101] P()  (replicated: no dimension divisible by 4)" in summary
  assert "['small']" in summary and summary.count("replicated:") == 1
  assert place.bytes_per_device() == 4 * (6 * 1024 // 4 + 1024 * 6 // 4 + 99 * 101 + 8)
  # A pytree of specs, and a rule function, override the default rule.
  specs = {"a": P(None, "model"), "b": P(), "odd": P(), "small": P()}
  assert parallel.place_params(shapes, mesh, specs).specs == specs
  rule = lambda path, shape, k: P("model") if path == "['b']" else P()
  assert parallel.place_params(shapes, mesh, rule).specs["b"] == P("model", None)
  # On a 1-D mesh nothing is sharded.
  assert not parallel.place_params(shapes, parallel.make_mesh(8)).sharded
  bad = [({**specs, "a": P(None, "tensor")}, "names axis 'tensor', which the mesh"),
         ({**specs, "a": P("workers")}, "shards over 'workers'"),
         ({**specs, "odd": P("model")}, "dimension 0 of shape \\[99, 101\\] is not divisible"),
         ({**specs, "a": P("model", "model")}, "more than one dimension"),
         ({"a": P()}, "one spec per parameter leaf")]
  for spec, match in bad:
    with pytest.raises(ValueError, match=match):
      parallel.place_params(shapes, mesh, spec)
  with pytest.raises(ValueError, match="names axis 'model', which the mesh"):
    parallel.place_params(shapes, parallel.make_mesh(8), {**specs, "a": P("model")})


def test_bad_mesh_model_flag_is_one_line():
  from configs import lm  # pylint: disable=import-outside-toplevel
  config = experiment.apply_overrides(lm.get_config(), [("mesh.model", "3")])
  with pytest.raises(experiment.ConfigError, match=r"^--config.mesh.model: must be a positive "
                                                   r"integer dividing num_devices=8"):
    experiment.check_config(config)


# -- train.py ------------------------------------------------------------------------

def test_lm_on_groups_of_two_coded_equals_uncoded_and_restores(tmp_path):
  """configs/lm.py with --config.mesh.model=2: exact coded losses equal uncoded ones step
  by step, parameters + Adam state per device are about half a replica's, and the
  2-D checkpoint restores on the same mesh."""
  from configs import lm  # pylint: disable=import-outside-toplevel
  flags = [("mesh.model", "2"), ("num_steps", "3"), ("eval_every", "3"),
           ("checkpoint_every", "3"), ("seed", "3"), ("corpus_bytes", "100000"),
           ("num_layers", "1")]
  runs, built = {}, {}
  for name in ("partial_straggler", "uncoded"):
    config = experiment.apply_overrides(lm.get_config(), flags + [("protocol.name", name)])
    built[name] = experiment.build(config)
    experiment.train(built[name], str(tmp_path / name))
    rows = [json.loads(line) for line in open(tmp_path / name / "metrics.jsonl")]
    runs[name] = [r["loss"] for r in rows if "loss" in r]
  assert len(runs["uncoded"]) == 3
  np.testing.assert_allclose(runs["partial_straggler"], runs["uncoded"], rtol=1e-5)
  summary = json.load(open(tmp_path / "partial_straggler" / "summary.json"))
  # Parameters + Adam's two moments of a whole replica, against what one device holds.
  exp = built["partial_straggler"]
  params = jax.eval_shape(lambda: models.init_params(exp.model, jax.random.key(0),
                                                     exp.dataset.x_train[:1]))
  whole = 3 * sum(x.size * 4 for x in jax.tree.leaves(params))
  assert whole / 2 < summary["param_bytes_per_device"] <= 1.1 * whole / 2
  # The checkpoint written on the 4x2 mesh restores there (the same built step: nothing
  # compiles again): the same parameters, the optimizer state still sharded.
  with np.load(tmp_path / "partial_straggler" / "final_params.npz") as z:
    saved = {k: z[k] for k in z.files}
  state = experiment.train(exp, str(tmp_path / "partial_straggler"))
  assert int(state.step) == 3
  got = {jax.tree_util.keystr(p): np.asarray(v)
         for p, v in jax.tree_util.tree_leaves_with_path(state.params)}
  for k, v in saved.items():
    np.testing.assert_array_equal(got[k], v)
  assert any("model" in str(x.sharding.spec) for x in jax.tree.leaves(state.opt_state))
