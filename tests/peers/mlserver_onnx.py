"""A small Seldon MLServer custom runtime that serves one ONNX model with onnxruntime.

Runs inside the separate MLServer venv (``.venv-mlserver``, made by ``./dev.sh peers``), not in
edgecloud's: the interop tests start ``mlserver start`` on a folder whose ``model-settings.json``
names ``mlserver_onnx.OnnxRuntime`` as the implementation, the ONNX file as ``parameters.uri``,
and optionally ``parameters.extra.load_delay`` (seconds ``load`` waits first, so a test sees a
live server whose model is not ready yet).
"""

from __future__ import annotations

import asyncio
import os

import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri


class OnnxRuntime(MLModel):
    """Decodes each V2 input with NumpyCodec, runs the session, encodes every output."""

    async def load(self) -> bool:
        extra = (self.settings.parameters.extra if self.settings.parameters else None) or {}
        delay = float(extra.get("load_delay", 0.0))
        if delay > 0:
            await asyncio.sleep(delay)
        uri = await get_model_uri(self.settings)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(os.environ.get("MLSERVER_ORT_THREADS", "1"))
        self._session = ort.InferenceSession(uri, opts, providers=["CPUExecutionProvider"])
        self._outputs = [o.name for o in self._session.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feed = {
            inp.name: np.ascontiguousarray(NumpyCodec.decode_input(inp)) for inp in payload.inputs
        }
        values = self._session.run(self._outputs, feed)
        return InferenceResponse(
            model_name=self.name,
            model_version=self.version,
            id=payload.id,
            outputs=[
                NumpyCodec.encode_output(name=name, payload=value)
                for name, value in zip(self._outputs, values, strict=True)
            ],
        )
