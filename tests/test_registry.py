"""jaxgc.registry: names to constructors, options from signatures, errors that list the valid;
and the library's registries (protocols, models, datasets, assignments, straggler models,
backends and their declared capabilities)."""
import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgc import assignments, backends, data, models, protocols, timing
from jaxgc.backends import capabilities
from jaxgc.errors import ParamError
from jaxgc.registry import Registry


def _registry():
  reg = Registry("widget", positional=1)

  @reg.register("square")
  class Square:
    def __init__(self, size, side=1.0, *, colour="red"):
      self.size, self.side, self.colour = size, side, colour

  @reg.register("circle")
  def circle(size, radius=2.0):
    return ("circle", size, radius)

  return reg, Square


def test_options_come_from_the_signature_after_the_positional_ones():
  reg, _ = _registry()
  assert reg.names() == ["circle", "square"] and list(reg) == reg.names() and len(reg) == 2
  assert reg.options("square") == ("side", "colour") and reg.options("circle") == ("radius",)
  assert dict(reg.table()) == {"circle": ("radius",), "square": ("side", "colour")}


def test_build_passes_options_and_positional_arguments():
  reg, square = _registry()
  s = reg.build("square", 3, colour="blue")
  assert isinstance(s, square) and (s.size, s.side, s.colour) == (3, 1.0, "blue")
  assert reg.build("circle", 1, radius=0.5) == ("circle", 1, 0.5)


def test_unknown_name_or_option_lists_the_valid_ones():
  reg, _ = _registry()
  with pytest.raises(ParamError, match=r"unknown widget 'sqare'.*\['circle', 'square'\].*"
                     r"Did you mean 'square'") as e:
    reg.build("sqare", 1)
  assert e.value.param == "name"
  with pytest.raises(ParamError, match=r"widget 'circle' takes no parameter\(s\) \['side'\]; "
                     r"it takes \['radius'\]") as e:
    reg.build("circle", 1, side=2.0)
  assert e.value.param == "side"


def test_a_later_registration_shows_in_the_live_table_and_names_clash():
  reg, square = _registry()
  table = reg.table()

  @reg.register("dot")
  def dot(size):
    return size
  assert table["dot"] == () and "dot" in reg
  reg.register("square")(square)              # the same object again is harmless
  with pytest.raises(ValueError, match="already registered"):
    reg.register("square")(dot)


def test_declared_options_for_a_constructor_that_takes_kwargs():
  reg = Registry("protocol", positional=2)

  @reg.register("coded", options=("seed", "rank"))
  def coded(assignment, ell, **options):
    return assignment, ell, options

  @reg.register("open")
  def open_(assignment, ell=1, **options):
    return options

  assert reg.options("coded") == ("seed", "rank") and reg.options("open") == ()
  assert reg.build("coded", "asg", 2, seed=3) == ("asg", 2, {"seed": 3})
  with pytest.raises(ParamError, match=r"takes no parameter\(s\) \['colour'\]"):
    reg.build("coded", "asg", 2, colour=1)
  # Undeclared **options: the constructor itself decides what it accepts.
  assert reg.build("open", "asg", colour=1) == {"colour": 1}


# -- the library's registries ---------------------------------------------------------------

ASG = assignments.cyclic(6, 3)
# Each registry's entry point, called as a user does: (name, **options) -> object.
ENTRIES = {
    "protocol": (protocols.PROTOCOLS, lambda n, **o: protocols.get_protocol(n, ASG, 1, **o)),
    "model": (models.MODELS, lambda n, **o: models.get_model(n, 10, **o)),
    "dataset": (data.DATASETS, data.load),
    "assignment": (assignments.ASSIGNMENTS,
                   lambda n, **o: assignments.ASSIGNMENTS.build(n, 8, 4, **o)),
    "straggler model": (timing.STRAGGLER_MODELS, timing.get_straggler_model),
}
CASES = [(kind, name) for kind, (reg, _) in ENTRIES.items() for name in reg]


@pytest.mark.parametrize("kind", [*ENTRIES, "backend"])
def test_every_registry_refuses_an_unknown_name_listing_the_valid_ones(kind):
  if kind == "backend":
    reg, build = backends.BACKENDS, backends.get_backend
  else:
    reg, build = ENTRIES[kind]
  assert isinstance(reg, Registry) and reg.kind == kind and len(reg) >= 2
  with pytest.raises(ParamError, match=rf"unknown {kind} 'nope'; choose one of "
                     rf"{re.escape(str(reg.names()))}") as e:
    build("nope")
  assert e.value.param == "name"


@pytest.mark.parametrize("kind,name", CASES)
def test_every_entry_refuses_an_unknown_option_by_name(kind, name):
  reg, build = ENTRIES[kind]
  with pytest.raises(ParamError, match=r"\['colour'\]") as e:
    build(name, colour=3)
  assert e.value.param == "colour"
  assert "colour" not in reg.options(name) and reg.unknown(name, ["colour"]) == ["colour"]


@pytest.mark.parametrize("name,other", [
    (a, b) for a, b in itertools.permutations(data.DATASETS.names(), 2)
    if set(data.DATASETS.options(b)) - set(data.DATASETS.options(a))])
def test_a_dataset_refuses_another_datasets_options(name, other):
  """Each loader takes only its own options: ``noise`` is synthetic_linear's alone,
  ``seq_len`` pystdlib's, ``split_seed`` only where the split is random."""
  for option in sorted(set(data.DATASETS.options(other)) - set(data.DATASETS.options(name))):
    with pytest.raises(ParamError, match=rf"dataset '{name}' takes no parameter\(s\) "
                       rf"\['{option}'\]") as e:
      data.load(name, **{option: 1})
    assert e.value.param == option


def test_the_synthetic_tasks_share_their_features():
  """The loaders split from one generator: logistic and linear see the same ``x``."""
  logistic = data.load_synthetic_logistic(num_examples=50, dim=3, data_seed=4)
  linear = data.load("synthetic_linear", num_examples=50, dim=3, data_seed=4, noise=0.0)
  np.testing.assert_array_equal(logistic.x_train, linear.x_train)
  assert logistic.num_classes == 2 and linear.num_classes == 0
  assert set(np.unique(logistic.y_train)) <= {0, 1}


@pytest.mark.parametrize("name", data.DATASETS.names())
def test_every_dataset_loads_with_its_defaults(name):
  if name == "custom":        # the user's own data: no default, and it says which to give
    with pytest.raises(ParamError, match="MODULE:FUNCTION") as e:
      data.load(name)
    assert e.value.param == "source"
    return
  ds = data.load(name)
  n = ds.num_train + len(ds.x_test)
  assert ds.x_train.shape[1:] == ds.x_test.shape[1:] and len(ds.y_train) == ds.num_train
  assert abs(len(ds.x_test) / n - 0.2) < 0.01          # the default test_fraction
  if ds.num_classes:
    assert ds.y_train.min() >= 0 and ds.y_train.max() < ds.num_classes


@pytest.mark.parametrize("name", models.MODELS.names())
def test_every_model_builds_with_its_defaults(name):
  model = models.get_model(name, 10)
  x = (jnp.zeros((2, 8), jnp.int32) if name == "transformer_lm"
       else jnp.zeros((2, 64), jnp.float32))
  variables = jax.eval_shape(lambda k: model.init(k, x), jax.random.key(0))
  out = jax.eval_shape(lambda v: model.apply(v, x), variables)
  assert out.shape == ((2, 8, 10) if name == "transformer_lm" else (2, 10))


@pytest.mark.parametrize("name", assignments.ASSIGNMENTS.names())
def test_every_assignment_builds_a_regular_one(name):
  a = assignments.ASSIGNMENTS.build(name, 8, 4)
  counts = np.bincount(a.order[a.order >= 0], minlength=a.num_chunks)
  assert a.num_workers == 8 and a.num_chunks == 8
  assert (np.asarray(a.loads) == 4).all() and (counts == 4).all()


@pytest.mark.parametrize("name", protocols.PROTOCOLS.names())
def test_every_protocol_builds_with_its_defaults(name):
  proto = protocols.get_protocol(name, ASG)
  assert isinstance(proto, protocols.PROTOCOLS[name]) and proto.ell == 1
  assert sorted(protocols.PROTOCOLS.options(name)) == type(proto).option_names()


def test_old_uses_of_the_names_keep_working():
  """They were a dict and tuples: ``in``, iteration, ``[name]``, ``.get(name, default)``."""
  assert "mlp" in models.MODELS and "digits" in data.DATASETS
  assert protocols.PROTOCOLS["uncoded"] is protocols.Uncoded
  assert protocols.PROTOCOLS.get("nope", None) is None
  assert list(data.DATASETS) == sorted(["digits", "synthetic_logistic", "synthetic_linear",
                                        "pystdlib", "custom"])
  with pytest.raises(KeyError):
    protocols.PROTOCOLS["nope"]


def test_every_backend_declares_its_capabilities():
  for name in backends.BACKENDS:
    assert isinstance(backends.BACKENDS[name].capabilities, capabilities.Capabilities)
  assert capabilities.of("spmd") == capabilities.Capabilities(True, True, True, True)
  assert capabilities.supporting("adaptive") == ["ray", "spmd"] and capabilities.of("ray").requires
  assert capabilities.supporting("model_axis") == ["ray", "spmd"]
  with pytest.raises(ParamError):
    capabilities.of("mpi")
