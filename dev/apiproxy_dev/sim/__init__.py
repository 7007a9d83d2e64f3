"""A simulated kube-apiserver: a development and test tool, never part of a deployment.

Tests, benchmarks and the demo all run against it. See docs/simulator.md.
"""

from apiproxy_dev.sim.errors import ApiError
from apiproxy_dev.sim.faults import Faults, Rule, StartRefused
from apiproxy_dev.sim.server import SimAPIServer
from apiproxy_dev.sim.store import Store

__all__ = ["ApiError", "Faults", "Rule", "SimAPIServer", "StartRefused", "Store"]
