"""The Ray Serve application: `PoseService` (service.py) as a deployment behind the FastAPI routes of routes.py,
persons batched across requests by `@serve.batch`."""

import ray
from ray import serve

from .batching import Job, Outcome, total_persons
from .config import ServeConfig
from .layout import Layout
from .routes import build_api
from .service import PoseService


# Helpers live above the deployment: Serve pickles the class when it is decorated, with the globals defined so far.
def _replica_api():
    """Built on each replica after the constructor; the routes find that replica's instance per request."""
    return build_api(lambda: serve.get_replica_context().servable_object)


@serve.deployment(name="PoseService")
@serve.ingress(_replica_api)
class PoseDeployment(PoseService):
    def __init__(self, config: ServeConfig, layout: Layout | None = None) -> None:
        super().__init__(config)
        self.layout = layout  # replicas / threads / resources as `serve` resolved them (flags or the machine)
        self.node_id = ray.get_runtime_context().get_node_id()  # where Ray placed this replica
        self._batch.set_max_batch_size(self.max_persons)
        self._batch.set_batch_wait_timeout_s(self.pacer.min_wait_s)

    async def submit(self, job: Job) -> Outcome:
        # read by serve.batch when this job opens the next batch: collect until the running batch should be done
        self._batch.set_batch_wait_timeout_s(self.pacer.wait_s())
        return await self._batch(job)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01, batch_size_fn=total_persons)
    async def _batch(self, jobs: list[Job]) -> list[Outcome]:
        return await self.run_batch(jobs)


def build_app(config: ServeConfig, layout: Layout):
    """The bound application with `layout` (serve.layout.choose_layout: replicas or autoscaling, threads,
    resources); `config` carries the same resolved values to the replicas."""
    options = dict(
        ray_actor_options={"num_cpus": layout.cpus_per_replica, "num_gpus": layout.gpus_per_replica},
        max_ongoing_requests=config.max_ongoing_requests,
        max_queued_requests=config.max_queued_requests,
        graceful_shutdown_timeout_s=config.graceful_shutdown_timeout_s,
        graceful_shutdown_wait_loop_s=0.5,
        health_check_period_s=2.0,
        health_check_timeout_s=30.0,
    )
    if config.autoscale is not None:
        lo, hi = config.autoscale
        # a replica is busy when it holds about one full batch of requests
        options["autoscaling_config"] = {"min_replicas": lo, "max_replicas": hi,
                                         "target_ongoing_requests": config.max_persons_per_batch or 4}
    else:
        options["num_replicas"] = layout.replicas
    return PoseDeployment.options(**options).bind(config, layout)


def http_options(config: ServeConfig) -> dict:
    return {"host": config.host, "port": config.port, "request_timeout_s": config.request_timeout_s}
