"""Run by test_multiprocess.py under ``torchrun``: train ConvOut and save the trained tensors (rank 0)."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from runtime_methods import ConvOutMethod
from safetensors.torch import save_file
from sdcore.train.loop import train


def main() -> None:
    values = json.loads(sys.argv[1])
    target = Path(sys.argv[2])
    options = ConvOutMethod.options_class(**values)
    method = ConvOutMethod(options)
    result = train(method)
    if result.main_process:
        save_file({k: v.contiguous() for k, v in method.trainable_state_dict().items()}, str(target))
        target.with_suffix(".json").write_text(json.dumps({"steps": result.steps, "losses": result.losses}))


if __name__ == "__main__":
    main()
