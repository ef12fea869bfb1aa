"""Logistic regression on synthetic data, as in the gradient-coding literature.

Tandon et al. (2017) and follow-ups train logistic regression with coded
gradients; here ``x ~ N(0, I/dim)``, ``P(y=1) = σ(x·w*)``, a linear model,
plain SGD. Shifted-exponential chunk times.
"""
from configs import default as default_lib


def get_config():
  config = default_lib.get_config()
  config.data.name = "synthetic_logistic"
  config.data.synthetic_logistic.num_examples = 4000
  config.data.synthetic_logistic.dim = 32
  config.model.name = "linear"
  config.optimizer.name = "sgd"
  config.optimizer.learning_rate = 0.5
  config.batch_size = 400
  config.num_steps = 300
  config.assignment.load = 3
  config.protocol.ell = 1
  config.straggler.name = "shifted_exponential"
  config.target_accuracy = 0.8
  return config
