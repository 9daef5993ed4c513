"""Run with MLServer's venv: float32 feature rows (.npy) -> varint-delimited ModelInferRequest file.

    bench/.venv-mlserver/bin/python bench/_oip_requests.py FEATURES.npy OUT.bin MODEL_NAME [OUTPUT]
"""

import sys

import numpy as np
from google.protobuf.internal.encoder import _VarintBytes
from mlserver.grpc import dataplane_pb2 as pb2


def main() -> None:
    src, dst, model = sys.argv[1:4]
    output = sys.argv[4] if len(sys.argv) > 4 else "predict"
    X = np.load(src).astype("<f4")
    with open(dst, "wb") as f:
        for i, row in enumerate(X):
            req = pb2.ModelInferRequest(model_name=model, id=str(i))
            req.inputs.add(name="input-0", datatype="FP32", shape=[1, X.shape[1]])
            req.raw_input_contents.append(row.tobytes())
            req.outputs.add(name=output)
            b = req.SerializeToString()
            f.write(_VarintBytes(len(b)))
            f.write(b)


if __name__ == "__main__":
    main()
