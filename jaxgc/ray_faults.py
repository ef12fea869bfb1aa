"""Moved to jaxgc.backends.ray; this name keeps working.

Which Ray actors are alive and their outages (:class:`ActorLiveness`,
:class:`Restart`, :func:`actor_state`), and the chaos :class:`KillLoop`; see
:mod:`jaxgc.backends.ray`.
"""
from jaxgc.backends.ray import ERROR_GRACE_S, ActorLiveness, KillLoop, Restart, actor_state

__all__ = ["ActorLiveness", "KillLoop", "Restart", "actor_state", "ERROR_GRACE_S"]
