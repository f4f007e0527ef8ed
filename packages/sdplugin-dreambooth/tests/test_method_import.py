"""The DreamBooth method class loads without torch: ``sdcore data check`` loads every installed method class (for
its method-files note, and ``--method dreambooth``) and must stay import-light; torch is imported where used."""

from __future__ import annotations

import subprocess
import sys


def test_the_method_class_loads_without_torch():
    code = (
        "import sys\nfrom sdplugin_dreambooth.method import DreamBoothMethod, unpadded_input_ids\n"
        "print(DreamBoothMethod.name, 'torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["dreambooth", "False"], done.stdout
