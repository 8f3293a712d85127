"""Build the Serve application, and run it on a local Ray instance or an existing cluster."""

import os
import signal
import time
from pathlib import Path

import ray
from ray import serve
from ray.serve import Application

from loraplex.config import EngineConfig
from loraplex.home import HOME_ENV
from loraplex.ray_serve.gateway import Gateway
from loraplex.ray_serve.replica import EngineReplica
from loraplex.server.app import ServerSettings

APP_NAME = "loraplex"
# Serve counts an open stream as one ongoing request for its whole life, and its default
# (5 per replica) would queue the sixth concurrent stream although the engine batches dozens.
# Past this many, the router sends a replica's adapter requests to another replica.
REPLICA_MAX_ONGOING_REQUESTS = 256
GRACEFUL_SHUTDOWN_S = 60  # running requests may finish when the app stops (as `serve` allows)
HEALTH_CHECK_PERIOD_S = 2.0  # a replica whose engine thread stopped is replaced within seconds
# Like the single-machine server: warnings and errors only, no line per request.
LOGGING = {"log_level": "WARNING", "enable_access_log": False}
# The gateway only parses, authenticates and forwards: it reserves no CPU, so it can never be
# what keeps a replica from being placed on a small machine.
GATEWAY_NUM_CPUS = 0


def build_app(config: EngineConfig, home: Path, settings: ServerSettings, *,
              num_replicas: int = 2, num_cpus_per_replica: float = 1.0,
              num_gpus_per_replica: float = 0.0) -> Application:
    """The gateway bound to `num_replicas` engine replicas. Fractions of a CPU are fine (two
    replicas at 0.5 fit on one core); `num_gpus_per_replica=1` gives each replica its own GPU,
    which its engine then uses (device "auto")."""
    # Every process resolves the home (models pulled by name, artifacts) the same way.
    runtime_env = {"env_vars": {HOME_ENV: str(home)}}
    replicas = serve.deployment(
        EngineReplica, name="EngineReplica", num_replicas=num_replicas,
        max_ongoing_requests=REPLICA_MAX_ONGOING_REQUESTS,
        health_check_period_s=HEALTH_CHECK_PERIOD_S,
        graceful_shutdown_timeout_s=GRACEFUL_SHUTDOWN_S, logging_config=LOGGING,
        ray_actor_options={"num_cpus": num_cpus_per_replica, "num_gpus": num_gpus_per_replica,
                           "runtime_env": runtime_env})
    # Above the app's own limit, so the app answers the excess (503, as on one machine) rather
    # than Serve's proxy queueing it.
    gateway = serve.deployment(
        Gateway, name="Gateway", num_replicas=1, max_ongoing_requests=2 * settings.max_in_flight,
        graceful_shutdown_timeout_s=GRACEFUL_SHUTDOWN_S, logging_config=LOGGING,
        ray_actor_options={"num_cpus": GATEWAY_NUM_CPUS, "runtime_env": runtime_env})
    return gateway.bind(replicas.bind(config), config, str(home), settings)


def connect(address: str | None, num_cpus: float) -> None:
    """Join the cluster at `address` ("auto" or "ray://host:10001"), or start a local Ray
    instance when it is None; either way, check that the replicas' CPUs can be had."""
    if address is None:
        available = os.cpu_count() or 1
        if num_cpus > available:
            raise ValueError(f"the replicas ask for {num_cpus:g} CPUs and this machine has "
                             f"{available}: lower --cpus-per-replica (fractions are fine)")
        ray.init(include_dashboard=False)
    else:
        ray.init(address=address)
        available = ray.cluster_resources().get("CPU", 0)
        if num_cpus > available:
            raise ValueError(f"the replicas ask for {num_cpus:g} CPUs and the cluster has "
                             f"{available:g}: lower --cpus-per-replica or --replicas")


def serve_forever(app: Application, *, host: str, port: int) -> None:
    """Deploy and serve until Ctrl-C or SIGTERM, then delete the application (a local Ray
    instance stops with this process)."""
    serve.start(http_options={"host": host, "port": port})
    serve.run(app, name=APP_NAME, route_prefix="/")
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM: the Ctrl-C path
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.delete(APP_NAME)  # running requests finish first (Serve's graceful shutdown)
