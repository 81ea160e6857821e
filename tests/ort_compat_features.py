"""Run by tests/test_ort_compat.py with another Python (onnxruntime + numpy only, no reid_deploy).

``python ort_compat_features.py FOLDER``: reads FOLDER/models.json (name -> ONNX file) and FOLDER/input.npy,
runs each model on the CPU and writes FOLDER/features.npz (one array per name) and FOLDER/runtime.json
(the ONNX Runtime version, and for each model that did not load, the first line of its error).
"""

import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort


def main(folder: Path) -> None:
    models = json.loads((folder / "models.json").read_text())
    batch = np.load(folder / "input.npy")
    features, errors = {}, {}
    for name, path in models.items():
        try:
            session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
            features[name] = session.run(["fc_pred"], {"input": batch})[0]
        except Exception as exc:  # reported to the test, which names the model that failed
            errors[name] = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    np.savez(folder / "features.npz", **features)
    (folder / "runtime.json").write_text(json.dumps({"onnxruntime": ort.__version__, "errors": errors}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
