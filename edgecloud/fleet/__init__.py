"""edgecloud.fleet: the fleet controller (registry, shadows, AWS-IoT-Jobs-style rollouts).

Modules (imported one by one, so the device agent, which only needs ``messages``, does not pull
in the controller's HTTP server and store):

- ``messages``: the MQTT payload contract shared with the device agent.
- ``jobs``: the job engine (execution states, rollout rate, abort criteria, timeouts).
- ``registry``: device entries and shadows (desired/reported/delta).
- ``store``: ``FleetStore`` and its SQLite (default) and SQLAlchemy/PostgreSQL implementations.
- ``packages``: the controller's package store (package dirs packed for download).
- ``controller``: ``FleetController``, the MQTT side and the API methods.
- ``server``: ``FleetHTTPServer``, package downloads with Range and the JSON API.
- ``client``: ``ControllerClient``, the API client used by ``edgecloud fleet``.

See docs/fleet.md.
"""
