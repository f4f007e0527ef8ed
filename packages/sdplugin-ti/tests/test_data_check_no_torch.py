"""``sdcore data check --method ti`` (and the plain check, which loads every installed method class for its
method-files note) runs TI's dataset checks without importing torch: ``TIMethod.dataset_problems`` only reaches
for ``sdplugin_ti.apply`` (torch) once there is a ``--name`` to look for, which ``data check`` never gives."""

from __future__ import annotations

import subprocess
import sys

from sdcore.testing.datasets import make_tiny_dataset


def test_data_check_method_ti_imports_no_torch(tmp_path):
    data = make_tiny_dataset(tmp_path / "data", n=2, size=64)
    code = (
        "import sys\nfrom sdcore.cli import main\n"
        "try:\n"
        f"    main(['data', 'check', {str(data)!r}, '--resolution', '64', '--min-bucket-reso', '64', "
        "'--method', 'ti'])\n"
        "except SystemExit as exc:\n"
        "    assert not exc.code, exc.code\n"
        "print('torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "images: 2 usable" in done.stdout, done.stdout
    assert done.stdout.strip().endswith("False"), done.stdout[-2000:]
