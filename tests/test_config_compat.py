"""A run saved by an older jaxgc resumes when only the config's shape changed, not its results."""
from jaxgc import experiment
from jaxgc.experiment.config import result_fields_differ


def _saved():
  return experiment.default_config().to_dict()


def test_identical_configs_differ_in_nothing():
  assert result_fields_differ(_saved(), _saved()) == []


def test_a_field_added_since_the_run_was_saved_counts_as_its_default():
  saved = _saved()
  del saved["network"]                 # e.g. a run saved before the network model existed
  assert result_fields_differ(saved, _saved()) == []
  requested = _saved()
  requested["network"]["name"] = "ps"   # ... but asking for a non-default value now differs
  assert [k for k, _, _ in result_fields_differ(saved, requested)] == ["network.name"]


def test_a_field_removed_since_the_run_was_saved_is_ignored():
  saved, requested = _saved(), _saved()
  for cfg in (saved, requested):
    cfg["data"]["name"] = "synthetic_logistic"
  saved["data"]["synthetic_logistic"]["noise"] = 0.1     # an option the dataset no longer takes
  assert result_fields_differ(saved, requested) == []


def test_a_changed_result_field_is_reported_with_both_values():
  saved, requested = _saved(), _saved()
  requested["seed"] = saved["seed"] + 1
  assert result_fields_differ(saved, requested) == [("seed", saved["seed"], saved["seed"] + 1)]
