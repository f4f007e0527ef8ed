import sdplugin_NAME.plugin
from sdcore.plugins import get_plugin_manager
from sdcore.testing.contract import MethodContractTests
from sdplugin_NAME.method import Method


def test_method_is_registered():
    pm = get_plugin_manager(entrypoints=False, extra=[sdplugin_NAME.plugin])
    assert pm.methods()["NAME"].method == "sdplugin_NAME.method:Method"


class TestContract(MethodContractTests):
    """Config round trip, one step, learning, save -> load, exact resume, determinism (docs/writing-a-plugin.md)."""

    method_class = Method
    options = {}  # overrides for the contract's tiny runs; family = "sdxl" switches model
