"""jaxgc.memo.per_object: one value per (owner, key), gone with its owner."""
import gc
import weakref

from jaxgc.memo import per_object


class _Owner:
  pass


class _Value:
  pass


def test_one_value_per_owner_and_key_and_none_after_the_owner():
  made = []

  def make():
    made.append(_Value())
    return made[-1]

  a, b = _Owner(), _Owner()
  first = per_object(a, "k", make)
  assert per_object(a, "k", make) is first and len(made) == 1
  assert per_object(a, "other", make) is not first and len(made) == 2
  assert per_object(b, "k", make) is not first and len(made) == 3
  gone = weakref.ref(first)
  del a, first
  made.clear()
  gc.collect()
  assert gone() is None                     # the memo held it only while its owner lived
  assert per_object(b, "k", make) is not None and made == []
