"""Message precision (PROTOCOL.md §15): the cast's error, the decode's bound, the bytes, the step.

The bound tested: a message cast to precision ``p`` and decoded in float32 is off from the
exact gradient by at most ``C_p · κ · ε_p`` relatively, ``κ`` the step's condition number
and ``ε_p`` :func:`jaxgc.precision.epsilon`. Why: the cast moves each number by at
most ``ε_p`` of itself (bfloat16) or of its block's largest (int8), and the decode
amplifies a relative perturbation of the messages by at most the condition number of the
coefficients (``‖A‖ ‖A⁺‖``); the errors of different numbers mostly cancel. ``C = 1`` for
bfloat16 (measured ratio at most 0.09, ``benchmarks/precision.py`` on the default config's
gradients). ``C = 2`` for int8: its ``ε`` is relative to the block's largest number, so a
block of small numbers next to a large one is rounded coarsely (up to ``√256 = 16×`` in
norm in the worst case); on MLP gradients the measured ratio reaches 0.67 (default
config) to 0.96 (a (64, 64) MLP on 8 workers).
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import digits_mlp
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import jaxgc
from jaxgc import assignments, data, network, parallel, planner, precision, protocols, timing
from jaxgc.errors import ParamError

C = {"bfloat16": 1.0, "int8": 2.0}        # the bound's constants (module docstring)
M, LOAD, ELL, BATCH = 8, 3, 2, 64


# -- the cast, number by number ---------------------------------------------------------

# A few sizes (each one compiles the cast once): under, at and over a block, several blocks.
_finite = hnp.arrays(np.float32, st.sampled_from([1, 255, 256, 700]),
                     elements=st.floats(-2.0 ** 100, 2.0 ** 100, width=32, allow_subnormal=False))


@settings(max_examples=40, deadline=None)
@given(_finite)
def test_bfloat16_moves_each_number_by_at_most_its_unit_roundoff(z):
  back = np.asarray(precision.round_trip(jnp.asarray(z), "bfloat16"))
  assert back.dtype == np.float32
  # Below bfloat16's smallest normal number the relative bound does not hold; absolute then.
  tol = np.maximum(np.abs(z) * 2.0 ** -8, 2.0 ** -133)
  assert np.all(np.abs(back - z) <= tol)
  wire = precision.to_wire(jnp.asarray(z), "bfloat16")
  assert precision.wire_nbytes(wire) == precision.wire_bytes(z.size, "bfloat16") == 2 * z.size


@settings(max_examples=40, deadline=None)
@given(_finite)
def test_int8_moves_each_number_by_at_most_half_a_step_of_its_block(z):
  back = np.asarray(precision.round_trip(jnp.asarray(z), "int8"))
  pad = -(-z.size // precision.INT8_BLOCK) * precision.INT8_BLOCK
  blocks = np.pad(np.abs(z).astype(np.float64), (0, pad - z.size)).reshape(-1, 256)
  top = np.repeat(blocks.max(1), 256)[: z.size]       # each number's block maximum
  # |q·s − z| <= s/2 = max/254, plus float32 rounding of z/s and of q·s.
  assert np.all(np.abs(back.astype(np.float64) - z) <= top / 254 + top * 2e-7)
  wire = precision.to_wire(jnp.asarray(z), "int8")
  want = z.size + 4 * (pad // 256)
  assert precision.wire_nbytes(wire) == precision.wire_bytes(z.size, "int8") == want


@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_non_finite_message_stays_non_finite_on_the_wire(dtype, bad):
  """The PS erases it as before (PROTOCOL.md §2): the cast must not launder it."""
  z = np.linspace(-3, 3, 600, dtype=np.float32)
  z[300] = bad
  back = np.asarray(precision.round_trip(jnp.asarray(z), dtype))
  assert not np.isfinite(back[300])
  assert not np.isfinite(back.sum())
  # Only the corrupted number's block is touched (int8), the rest is exact-ish.
  assert np.all(np.isfinite(back[:256]))


def test_float32_is_no_cast_at_all():
  z = jnp.arange(10, dtype=jnp.float32) / 3
  assert precision.round_trip(z, "float32") is z and precision.round_trip(z, None) is z
  assert precision.to_wire(z, jnp.float32) is z


# -- the decode's error against the condition number -------------------------------------

@pytest.mark.parametrize("ell", [2, 3])
def test_decode_error_is_at_most_condition_number_times_eps(ell):
  """Seeded states (the slowdown model at its exact stop) and chunk gradients ``μ + ξ_i``:
  the decode of the cast messages against the exact sum."""
  a = assignments.cyclic(10, 4)
  proto = protocols.get_protocol("partial_straggler", a, ell)
  straggler = timing.get_model("slowdown")
  d = 1000

  @jax.jit
  def one(key):
    k1, k2, k3 = jax.random.split(key, 3)
    tau = straggler.sample(k1, a)
    c = proto.solve(timing.progress(tau, protocols.stop_time(proto, tau, "exact")))
    grads = jax.random.normal(k2, (d,)) + jax.random.normal(k3, (a.num_chunks, d))
    exact = jnp.sum(grads, 0)
    z = protocols.encode(grads[jnp.asarray(a.order)], c.enc)
    err = lambda name: (jnp.linalg.norm(protocols.decode(precision.round_trip(z, name), c.dec, d)
                                        - exact) / jnp.linalg.norm(exact))
    return jnp.stack([err("float32"), err("bfloat16"), err("int8")]), c.condition

  errs, cond = jax.device_get(jax.lax.map(one, jax.random.split(jax.random.key(ell), 32)))
  assert np.all(np.isfinite(cond)) and np.max(cond) > 1      # the coefficients are not trivial
  for i, name in enumerate(["bfloat16", "int8"], start=1):
    bound = C[name] * cond * precision.epsilon(name)
    assert np.all(errs[:, i] <= bound), (name, np.max(errs[:, i] / bound))
    # ... and the cast is real: far above float32's own error.
    assert np.median(errs[:, i]) > 30 * np.median(errs[:, 0]), name


# -- the bytes the network prices ------------------------------------------------------------

@pytest.mark.parametrize("net", [network.PSIngress(bandwidth=3e7), network.RingAllReduce(7e6)])
@pytest.mark.parametrize("d", [1, 999, 123_457, 10**9 + 7])
def test_bfloat16_halves_the_communication_time_exactly(net, d):
  proto = protocols.get_protocol("partial_straggler", assignments.cyclic(M, LOAD), ELL)
  senders = jnp.asarray([1.0, 5.0, 8.0])
  comm = lambda dt: np.asarray(network.step_comm_time(net, proto, d, jnp.float32, senders,
                                                      senders - 1, jnp.asarray(True),
                                                      message_dtype=dt))
  f32, bf16, int8 = comm("float32"), comm("bfloat16"), comm("int8")
  assert np.all(bf16 / f32 == 0.5), bf16 / f32
  # float32 is what it was without the argument, bit for bit.
  assert np.array_equal(f32, np.asarray(network.step_comm_time(net, proto, d, jnp.float32,
                                                               senders, senders - 1,
                                                               jnp.asarray(True))))
  n = -(-d // ELL)
  assert network.message_bytes(proto, d, message_dtype="int8") == n + 4 * -(-n // 256)
  np.testing.assert_allclose(int8 / f32, (n + 4 * -(-n // 256)) / (4 * n), rtol=1e-6)


# -- the SPMD step -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def steps():
  """One step's gradient and metrics per cast message dtype, the exact gradient, and the
  float32 steps' programs with and without the argument (two compiles in all)."""
  mesh = parallel.make_mesh(8)
  ds, _, params, loss_fn, train_data = digits_mlp((16,), BATCH)
  proto = protocols.get_protocol("partial_straggler", assignments.cyclic(M, LOAD), ELL)
  net = network.PSIngress(bandwidth=1e5)
  chunks = data.step_chunks(train_data, jax.random.key(1), 0, BATCH, M)
  make = lambda **kw: parallel.make_coded_step(proto, timing.get_model("slowdown"), loss_fn,
                                               None, mesh, network=net, **kw)
  args = (params, chunks, jax.random.key(5))
  programs = [str(jax.make_jaxpr(s.gradient)(*args))
              for s in (make(), make(message_dtype="float32"))]
  out = {}
  for dt in ("bfloat16", "int8"):
    out[dt] = jax.device_get(jax.jit(make(message_dtype=dt).gradient)(*args))
  want = jax.grad(lambda p: jnp.sum(jax.vmap(lambda c: loss_fn(p, c))(chunks)))(params)
  return out, want, programs, (net, proto)


def _flat(tree):
  return np.asarray(jax.flatten_util.ravel_pytree(tree)[0], np.float64)


def test_float32_step_is_bit_identical_to_the_step_without_the_argument(steps):
  """The same program, equation for equation: the same numbers, bit for bit."""
  _, _, (without, with_float32), _ = steps
  assert without == with_float32
  assert "bf16" in str(jax.make_jaxpr(lambda z: precision.round_trip(z, "bfloat16"))(
      jnp.ones(3)))     # (a cast does show in a program)


@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_step_decodes_within_condition_number_times_eps(steps, dtype):
  out, want, _, _ = steps
  g, metrics = out[dtype]
  assert bool(metrics["exact"]) and not bool(metrics["skipped"])
  err = np.linalg.norm(_flat(g) - _flat(want)) / np.linalg.norm(_flat(want))
  # Above float32's error (~1e-7 here: the cast happened), below the bound.
  assert 1e-5 < err <= C[dtype] * float(metrics["condition_number"]) * precision.epsilon(dtype)


def test_coded_value_and_grad_passes_the_precision_to_its_step():
  mesh = parallel.make_mesh(8)
  proto = protocols.get_protocol("partial_straggler", assignments.cyclic(M, LOAD), ELL)
  grad_fn = jaxgc.coded_value_and_grad(lambda p, c: jnp.sum(p * c), proto,
                                       timing.get_model("slowdown"), mesh, message_dtype="int8")
  assert grad_fn.step.spec.message_dtype == "int8"


def test_step_comm_time_halves_in_bfloat16_and_counts_int8_scales(steps):
  out, _, _, (net, proto) = steps
  # Same draw, same state, same senders: only the messages changed.
  assert np.array_equal(out["bfloat16"][1]["counts"], out["int8"][1]["counts"])
  senders = out["bfloat16"][1]["senders"]
  d = _flat(out["bfloat16"][0]).size
  f32 = float(network.step_comm_time(net, proto, d, jnp.float32, senders))   # today's price
  bf16, int8 = (float(out[k][1]["step_comm_time"]) for k in ("bfloat16", "int8"))
  assert f32 > 0 and bf16 / f32 == 0.5
  n = -(-d // ELL)
  assert int8 / f32 == pytest.approx((n + 4 * -(-n // 256)) / (4 * n), rel=1e-6)


# -- a bad dtype is refused by name -------------------------------------------------------------

@pytest.mark.parametrize("bad", ["float16", "fp8", "int4", 3, jnp.float64])
def test_bad_message_dtype_is_refused_by_name(bad):
  mesh = parallel.make_mesh(8)
  proto = protocols.get_protocol("partial_straggler", assignments.cyclic(M, LOAD), ELL)
  loss = lambda p, c: jnp.sum(p * c)
  for build in (
      lambda: parallel.make_coded_step(proto, timing.get_model("slowdown"), loss, None, mesh,
                                       message_dtype=bad),
      lambda: jaxgc.coded_value_and_grad(loss, proto, timing.get_model("slowdown"), mesh,
                                         message_dtype=bad),
      lambda: planner.plan(M, 1000, "slowdown", message_dtypes=("float32", bad), trials=2)):
    with pytest.raises(ParamError) as e:
      build()
    assert e.value.param in ("message_dtype", "message_dtypes") and "int8" in str(e.value)


def test_bad_message_dtype_in_the_config_names_the_flag():
  from jaxgc.experiment import ConfigError, build, default_config
  cfg = default_config()
  cfg.step.message_dtype = "half"
  cfg.num_devices = 8
  with pytest.raises(ConfigError) as e:
    build(cfg)
  assert e.value.flag == "--config.step.message_dtype='half'"


# -- the planner chooses the precision with ell ----------------------------------------------------

def test_planner_ranks_each_precision_by_its_bytes():
  net = network.PSIngress(bandwidth=1e6)
  grid = planner.candidates(M, ("partial_straggler",), loads=(3,), ells=(1, 2))
  sims = planner.simulate(M, "slowdown", grid, trials=16, seed=3)
  rows = planner.rank(sims, 10**5, net, message_dtypes=("bfloat16", "float32"))
  assert {(r["ell"], r["message_dtype"]) for r in rows} == {
      (e, dt) for e in (1, 2) for dt in ("float32", "bfloat16")}
  by = {(r["ell"], r["message_dtype"]): r for r in rows}
  for e in (1, 2):
    f32, bf16 = by[e, "float32"], by[e, "bfloat16"]
    assert bf16["comm_time"] / f32["comm_time"] == pytest.approx(0.5, rel=1e-12)
    assert bf16["compute_time"] == f32["compute_time"]      # one simulation for both
    assert bf16["bytes_per_worker"] * 2 == f32["bytes_per_worker"]
  # Without a network the precisions tie, and the higher one ranks first.
  free = planner.rank(sims, 10**5, None, message_dtypes=("int8", "float32"))
  assert [r["message_dtype"] for r in free[:2]] == ["float32", "int8"]
  # The default is float32 only, as before.
  assert {r["message_dtype"] for r in planner.rank(sims, 10**5, net)} == {"float32"}


# -- the Ray step: the actors send the cast message, the PS decodes it in float32 ----------------

def test_ray_step_sends_cast_messages_and_erases_corrupted_ones():
  """bfloat16 and int8 messages over a real Ray pool: the decode within the bound, the bytes
  on the wire, and a NaN message still an erasure (re-solved without it, still exact)."""
  pytest.importorskip("ray")
  from helpers import host_batches, local_ray_pool
  m, load, batch = 4, 3, 32
  ds, _, params, loss_fn, _ = digits_mlp((8,), batch)
  chunks = host_batches(ds, m, batch, 1)[0]
  want = _flat(jax.grad(lambda p: jnp.sum(jax.vmap(lambda c: loss_fn(p, c))(chunks)))(params))
  proto = protocols.get_protocol("partial_straggler", assignments.cyclic(m, load), 2)
  n = -(-want.size // 2)
  with local_ray_pool(num_cpus=2, num_actors=2) as pool:
    from jaxgc.backends.ray import RayStep
    make = lambda dtype, **kw: RayStep(proto, timing.get_model("slowdown"), loss_fn,
                                      optax.sgd(0.1), pool=pool, time_scale=0.002,
                                      message_dtype=dtype, **kw)
    for dtype, nbytes in (("bfloat16", 2 * n), ("int8", n + 4 * -(-n // 256))):
      g, metrics = make(dtype).gradient(params, chunks, jax.random.key(3))
      assert metrics["message_bytes"] == nbytes
      assert metrics["exact"] and not metrics["skipped"] and metrics["erasures"] == 0
      err = np.linalg.norm(_flat(g) - want) / np.linalg.norm(want)
      assert 1e-5 < err <= C[dtype] * metrics["condition_number"] * precision.epsilon(dtype), dtype
    # Every round-1 message corrupted (NaN before the cast): int8 must not launder one into
    # finite numbers. All are erased, round 2 has no sender left, the step is skipped.
    g, metrics = make("int8", nan_message_prob=1.0).gradient(params, chunks, jax.random.key(3))
    assert metrics["erasures"] >= 2 and metrics["skipped"] and not metrics["exact"]
  with pytest.raises(ParamError) as e:
    RayStep(proto, timing.get_model("slowdown"), loss_fn, optax.sgd(0.1), pool=object(),
            message_dtype="float16")
  assert e.value.param == "message_dtype"
