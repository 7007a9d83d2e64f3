"""A simulated kube-apiserver: a development and test tool, never part of a deployment.

Tests, benchmarks and the demo all run against it. See docs/simulator.md.
"""

from apiproxy.sim.errors import ApiError
from apiproxy.sim.faults import Faults, Rule, StartRefused
from apiproxy.sim.server import SimAPIServer
from apiproxy.sim.store import Store

__all__ = ["ApiError", "Faults", "Rule", "SimAPIServer", "StartRefused", "Store"]
