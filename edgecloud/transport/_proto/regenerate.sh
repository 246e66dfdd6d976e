#!/usr/bin/env bash
# Regenerate the Python messages and stubs from grpc_predict_v2.proto (needs the dev extra's
# grpcio-tools): ./edgecloud/transport/_proto/regenerate.sh
# The generated files are committed, so users of edgecloud[grpc] need grpcio and protobuf only.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../../.." && pwd)
py=${PYTHON:-$root/.venv/bin/python}
cd "$root"
"$py" -m grpc_tools.protoc -I . \
  --python_out=. --pyi_out=. --grpc_python_out=. \
  edgecloud/transport/_proto/grpc_predict_v2.proto
# The spec's RPC paths: /inference.GRPCInferenceService/<Method> (see the note in the .proto).
sed -i 's#edgecloud\.inference\.GRPCInferenceService#inference.GRPCInferenceService#g' \
  "$here/grpc_predict_v2_pb2_grpc.py"
echo "regenerated $(ls "$here"/grpc_predict_v2_pb2*.py* | xargs -n1 basename | tr '\n' ' ')"
