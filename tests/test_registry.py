"""jaxgc.registry: names to constructors, options from signatures, errors that list the valid."""
import pytest

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
