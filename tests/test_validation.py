"""Bad input at the library's boundary: a ValueError that names the problem and the fix."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxgc
from jaxgc import assignments

ASG = assignments.cyclic(6, 3)      # durations [6, 3], loads 3


def all_protocols(asg=ASG):
  return [jaxgc.PartialStraggler(asg, 2), jaxgc.Original(asg, 2), jaxgc.Uncoded(asg),
          jaxgc.IgnoreStragglers(asg)]


def tau(shape=(6, 3)):
  return np.random.default_rng(0).exponential(size=shape) + 1.0


# -- durations ---------------------------------------------------------------

@pytest.mark.parametrize("proto", all_protocols(), ids=lambda p: p.name)
def test_completion_time_rejects_transposed_durations(proto):
  with pytest.raises(ValueError, match=r"durations must have shape \[\.\.\., num_workers, "
                     r"max_load\] = \[\.\.\., 6, 3\].*got \(3, 6\) \(transposed\?\)"):
    proto.completion_time(tau().T)
  # Shapes are static: the check holds under jit too.
  with pytest.raises(ValueError, match="transposed"):
    jax.jit(proto.completion_time)(tau().T)


@pytest.mark.parametrize("proto", all_protocols(), ids=lambda p: p.name)
def test_completion_time_rejects_a_wider_duration_table(proto):
  with pytest.raises(ValueError, match=r"\[\.\.\., 6, 3\] for this assignment, got \(6, 4\).*"
                     r"model\.sample\(key, assignment\)"):
    proto.completion_time(tau((6, 4)))
  with pytest.raises(ValueError, match=r"got \(6, 4\)"):
    jaxgc.stop_time(proto, tau((6, 4)), mode="deadline", deadline=1.0)


# -- states ------------------------------------------------------------------

@pytest.mark.parametrize("proto", all_protocols(), ids=lambda p: p.name)
def test_counts_above_the_load_are_rejected(proto):
  msg = r"0 <= k_j <= load_j; worker 0 has k_j=9 but load 3.*at most its load"
  with pytest.raises(ValueError, match=msg):
    proto.is_decodable([9] * 6)
  with pytest.raises(ValueError, match=msg):
    proto.coverage(np.full((2, 6), 9))
  with pytest.raises(ValueError, match=r"0 <= k_j <= load_j; worker 2 has k_j=-1"):
    proto.coefficients([1, 1, -1, 0, 0, 0])


@pytest.mark.parametrize("proto", all_protocols(), ids=lambda p: p.name)
def test_counts_of_the_wrong_length_are_rejected(proto):
  msg = (r"must have shape \[\.\.\., num_workers\] = \[\.\.\., 6\], got \(5,\); "
         r"pass one entry per worker")
  with pytest.raises(ValueError, match=msg):
    proto.is_decodable([1] * 5)
  with pytest.raises(ValueError, match=msg):
    proto.coverage([1] * 5)
  with pytest.raises(ValueError, match=r"shape \[num_workers\] = \[6\], got \(7,\)"):
    proto.coefficients([1] * 7)


@pytest.mark.parametrize("proto", all_protocols(), ids=lambda p: p.name)
def test_eager_coefficients_reject_non_integer_states(proto):
  with pytest.raises(ValueError, match=r"whole numbers of chunks, got 1\.5; pass integers"):
    proto.coefficients(np.array([1.5, 1, 1, 1, 1, 1]))
  with pytest.raises(ValueError, match=r"whole numbers of chunks, got nan"):
    proto.coefficients(np.array([np.nan, 1, 1, 1, 1, 1]))
  with pytest.raises(ValueError, match=r"integer chunk counts, got dtype bool; pass e\.g\. "
                     r"timing\.progress"):
    proto.coefficients(np.ones(6, bool))
  with pytest.raises(ValueError, match=r"one state of shape \[6\], got a batch of shape "
                     r"\(2, 6\); for a batch of states use jax\.vmap"):
    proto.coefficients(np.ones((2, 6), int))
  # Whole floats are fine.
  assert proto.check_counts(np.full(6, 2.0)).dtype == jnp.int32


def test_traced_float_counts_are_rejected():
  proto = jaxgc.PartialStraggler(ASG, 2)
  with pytest.raises(ValueError, match=r"integer dtype under jit.*astype\(jnp\.int32\)"):
    jax.jit(proto.coefficients)(jnp.ones(6, jnp.float32))


# -- gradients -----------------------------------------------------------------

def test_encode_rejects_integer_gradients():
  enc = jaxgc.PartialStraggler(ASG, 1).encoding([3] * 6)
  with pytest.raises(ValueError, match=r"dtype int32, but gradients must be floating point; "
                     r"cast them first, e\.g\. chunk_grads\.astype\(jnp\.float32\)"):
    jaxgc.encode(np.ones((6, 3, 4), np.int32), enc)
  with pytest.raises(ValueError, match=r"msgs have dtype int32.*floating point"):
    jaxgc.decode(np.ones((6, 4), np.int32), np.ones((1, 6)), 4)


def test_estimate_rejects_misshapen_chunk_gradients():
  proto = jaxgc.PartialStraggler(ASG, 2)
  with pytest.raises(ValueError,
                     match=r"\[num_workers, max_load, d\] = \[6, 3, d\], got \(3, 6, 4\)"):
    jaxgc.estimate(proto, np.ones((3, 6, 4), np.float32), [3] * 6)


# -- user decoding matrices ------------------------------------------------------

def test_rank_deficient_decoding_matrix_is_refused():
  """Columns 0 and 1 are parallel and both hold chunk 1: at k = [2, 1, 0] the
  coverage says decodable, but the decode would be off by O(1)."""
  asg = assignments.cyclic(3, 2)
  a = np.array([[1.0, 2.0, 0.0], [1.0, 2.0, 1.0]])
  with pytest.raises(ValueError, match=r"rank-deficient on workers \[0, 1\], which hold chunk 1.*"
                     r"off by O\(1\).*decoding_matrix='orthogonal'"):
    jaxgc.PartialStraggler(asg, 2, decoding_matrix=a)
  # Below the float32 solve's rank threshold counts as deficient too.
  with pytest.raises(ValueError, match=r"workers \[0, 1\]"):
    jaxgc.PartialStraggler(asg, 2, decoding_matrix=[[1.0, 1.0, 0.0], [0.0, 1e-7, 1.0]])
  with pytest.raises(ValueError, match=r"candidate 1 of decoding_matrix.*workers \[2\]"):
    jaxgc.PartialStraggler(assignments.cyclic(3, 1), 1,
                           decoding_matrix=[[[1.0, 1.0, 1.0]], [[1.0, 1.0, 0.0]]])


def test_accepted_user_matrix_is_exact_at_every_decodable_state():
  """Brute force over all states: is_decodable implies an exact estimate."""
  asg = assignments.cyclic(4, 3)
  a = np.array([[1.0, 0.0, 1.0, 1.0], [0.0, 1.0, 1.0, -1.0]])   # structured, not random
  proto = jaxgc.PartialStraggler(asg, 2, decoding_matrix=a)
  g = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
  states = np.array(list(itertools.product(range(4), repeat=4)), np.int32)
  decodable = np.asarray(proto.is_decodable(states))
  est = jax.jit(jax.vmap(lambda k: jaxgc.estimate(proto, g[asg.order], k)))(states[decodable])
  assert decodable.sum() > 30
  np.testing.assert_allclose(est, np.broadcast_to(g.sum(0), est.shape), atol=1e-4)


# -- constructors and the stop rule ------------------------------------------------

@pytest.mark.parametrize("name", sorted(jaxgc.protocols.PROTOCOLS))
def test_unknown_protocol_option_lists_the_valid_ones(name):
  cls = jaxgc.protocols.PROTOCOLS[name]
  valid = cls.option_names()
  assert "dtype" in valid
  with pytest.raises(ValueError, match=rf"unknown option\(s\) \['colour'\] for protocol "
                     rf"'{name}'; valid options: {__import__('re').escape(str(valid))}"):
    jaxgc.get_protocol(name, ASG, 1, colour=3)
  with pytest.raises(ValueError, match=r"unknown option\(s\) \['colour'\].*valid options"):
    cls(ASG, 1, colour=3)


def test_uncoded_accepts_any_positive_ell_but_sends_whole_gradients():
  proto = jaxgc.get_protocol("uncoded", ASG, 3)
  assert proto.ell == 1 and proto.encoding([1] * 6).shape == (6, 3, 1)
  for bad in (0, 1.5, True):
    with pytest.raises(ValueError, match="ell must be a positive integer"):
      jaxgc.Uncoded(ASG, bad)


def test_stop_time_rejects_bad_modes():
  proto = jaxgc.PartialStraggler(ASG, 2)
  with pytest.raises(ValueError,
                     match=r"unknown mode 'fast'; choose one of \('exact', 'deadline'\)"):
    jaxgc.stop_time(proto, tau(), mode="fast")
  for bad in (None, 0.0, -1.0, np.inf):
    with pytest.raises(ValueError, match=r"positive finite deadline.*set deadline=T"):
      jaxgc.stop_time(proto, tau(), mode="deadline", deadline=bad)
  with pytest.raises(ValueError, match=r"timeout must be a positive finite time or None"):
    jaxgc.stop_time(proto, tau(), timeout=-1.0)
  with pytest.raises(ValueError, match=r"ignore_stragglers .* no exact mode; use mode='deadline'"):
    jaxgc.stop_time(jaxgc.IgnoreStragglers(ASG), tau())


# -- the command line names the flag from the error's parameter ---------------

@pytest.mark.parametrize("name,options,flag", [
    # The message names p_slow first; the error's param (p_recover) decides the flag.
    ("gilbert_elliott", dict(p_slow=0.0, p_recover=0.0), "straggler.gilbert_elliott.p_recover"),
    ("slowdown", dict(rate=-1.0), "straggler.slowdown.rate"),
    ("pareto", dict(alpha=float("nan")), "straggler.pareto.alpha"),
])
def test_bad_straggler_option_names_its_flag(name, options, flag):
  import ml_collections

  from jaxgc import experiment
  config = experiment.default_config()
  config.straggler.name = name
  config.straggler[name] = ml_collections.ConfigDict(options)
  with pytest.raises(experiment.ConfigError) as e:
    experiment.make_straggler_model(config)
  assert e.value.flag.split("=")[0] == f"--config.{flag}", e.value


def test_the_flag_comes_from_param_alone_never_the_message():
  """blame reads ParamError.param: a message that mentions another field changes nothing,
  and an error without a param names the block's default flag."""
  import importlib

  import ml_collections

  from jaxgc import experiment
  from jaxgc.errors import ParamError
  build = importlib.import_module("jaxgc.experiment.build")   # experiment.build is a function
  config = experiment.default_config()
  fields = ("network.bandwidth", "network.latency")
  cases = [(ParamError("latency and bandwidth are both wrong", "bandwidth"), "network.bandwidth"),
           (ParamError("bandwidth is fine, latency is not", "latency"), "network.latency"),
           (ValueError("bandwidth must be positive"), "network.name"),     # no param
           (ParamError("unknown network 'pss'", "name", "ps"), "network.name")]
  for err, flag in cases:
    with pytest.raises(experiment.ConfigError) as e, build.blame(config, "network", fields):
      raise err
    assert e.value.flag.split("=")[0] == f"--config.{flag}", e.value
  # A suggestion is the flag to type, once.
  assert str(e.value).endswith("unknown network 'pss' Did you mean --config.network.name=ps?")
  config.optimizer.name = "sgd"
  config.optimizer.sgd = ml_collections.ConfigDict({"nestrov": True})
  with pytest.raises(experiment.ConfigError, match=r"^--config.optimizer.sgd.nestrov=True: "
                                                   r"optax.sgd takes no option\(s\) \['nestrov'\]"
                                                   r"; it takes \[.*'nesterov'"):
    experiment.make_optimizer(config)


def test_a_registry_suggestion_is_data_and_survives_pickling():
  import pickle

  from jaxgc.errors import ParamError
  with pytest.raises(ParamError) as e:
    jaxgc.get_protocol("partial_stragler", ASG, 1)
  assert (e.value.param, e.value.suggestion) == ("name", "partial_straggler")
  assert str(e.value) == f"{e.value.message} Did you mean 'partial_straggler'?"
  back = pickle.loads(pickle.dumps(e.value))
  assert (str(back), back.param, back.suggestion) == (str(e.value), "name", "partial_straggler")


@pytest.mark.parametrize("build,param", [
    (lambda: jaxgc.GraphCode(ASG, 2), "ell"),
    (lambda: jaxgc.Uncoded(ASG, 0), "ell"),
    (lambda: jaxgc.BackupWorkers(assignments.cyclic(6, 2), num_backup=6), "num_backup"),
    (lambda: jaxgc.PartialStraggler(ASG, 2, decoding_matrix="spiral"), "decoding_matrix"),
    (lambda: jaxgc.PartialStraggler(ASG, 2, decoding_matrix="ones"), "decoding_matrix"),
    (lambda: jaxgc.PartialStraggler(ASG, 2, num_candidates=0, decoding_matrix="gaussian"),
     "num_candidates"),
    (lambda: jaxgc.Original(ASG, 1, construction="magic"), "construction"),
    (lambda: jaxgc.PartialStraggler(ASG, 1, dtype=jnp.int32), "dtype"),
    (lambda: jaxgc.stop_time(jaxgc.PartialStraggler(ASG, 1), tau(), mode="fast"), "mode"),
    (lambda: jaxgc.stop_time(jaxgc.PartialStraggler(ASG, 1), tau(), mode="deadline"),
     "deadline"),
    (lambda: jaxgc.stop_time(jaxgc.PartialStraggler(ASG, 1), tau(), timeout=-1.0), "timeout"),
])
def test_protocol_errors_name_their_parameter(build, param):
  from jaxgc.errors import ParamError
  with pytest.raises(ParamError) as e:
    build()
  assert e.value.param == param, e.value
