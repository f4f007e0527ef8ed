import sdplugin_NAME.plugin
from sdcore.plugins import get_plugin_manager


def test_method_is_registered():
    pm = get_plugin_manager(entrypoints=False, extra=[sdplugin_NAME.plugin])
    assert pm.methods()["NAME"].method == "sdplugin_NAME.method:Method"
