"""The shared method contract (config round-trip, one step, learning, save -> load, resume)."""

from __future__ import annotations

from sdcore.testing.contract import MethodContractTests
from sdplugin_hn.method import HNMethod


class TestHNContract(MethodContractTests):
    method_class = HNMethod
    options = {"activation": "relu"}
    learning_steps = 80  # HN residual MLPs start near identity: 40 steps give ~17%, 80 give ~26%
