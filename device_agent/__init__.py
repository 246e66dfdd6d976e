"""The on-device daemon: model store, fleet commands, telemetry, local inference endpoint."""
