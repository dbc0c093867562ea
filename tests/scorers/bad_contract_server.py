"""A Triton model that does not follow the reward contract (output 'scores', INT32), for tests."""

from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np

from thresher.scorers.triton_server import _fix_stub_library_path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--http-port", type=int)
    parser.add_argument("--grpc-port", type=int)
    args = parser.parse_args()
    _fix_stub_library_path()
    from pytriton.decorators import batch
    from pytriton.model_config import ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    @batch
    def infer(sentences):
        return {"scores": np.zeros((len(sentences), 1), dtype=np.int32)}

    config = TritonConfig(
        http_address="127.0.0.1",
        http_port=args.http_port,
        grpc_address="127.0.0.1",
        grpc_port=args.grpc_port,
        allow_metrics=False,
    )
    with tempfile.TemporaryDirectory() as scratch:
        config.log_file = os.path.join(scratch, "log")
        with Triton(config=config, workspace=os.path.join(scratch, "ws")) as triton:
            triton.bind(
                "reward_model",
                infer,
                [Tensor(name="sentences", shape=(-1,), dtype=bytes)],
                [Tensor(name="scores", shape=(1,), dtype=np.int32)],
                config=ModelConfig(max_batch_size=8),
            )
            print("ready", flush=True)
            triton.serve()


if __name__ == "__main__":
    main()
