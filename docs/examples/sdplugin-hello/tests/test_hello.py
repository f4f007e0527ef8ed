from sdcore.testing.contract import MethodContractTests
from sdplugin_hello.method import HelloMethod


class TestHelloContract(MethodContractTests):
    """Config round trip, one step, learning, save -> load, exact resume, determinism."""

    method_class = HelloMethod
    options = {}  # overrides for the contract's tiny runs, e.g. {"lr": 1e-3}; family = "sdxl" switches model


def test_hello_command(sd_pm_factory, sd_cli):
    from sdplugin_hello import plugin

    result = sd_cli(["hello", "you"], pm=sd_pm_factory([plugin]))
    assert result.exit_code == 0 and result.output == "hello you\n"
