"""S5 (lindermanlab/S5, MIT licence): its sequence layer and models, copied unchanged.

Its ssm.py is not here: it annotates with jax.numpy.DeviceArray, gone from JAX.
"""
