"""`serve` without --replicas/--threads: the layout chosen from the nodes Ray sees (CPU and GPU rules, flags win), and
the one-line error for a cluster that refuses this client's Ray token. No Ray needed: nodes are described."""
from __future__ import annotations

import pytest

pytest.importorskip("ray.serve", reason="needs the `serve` extra (ray[serve])")

from runtime.errors import InputError  # noqa: E402
from serve.cli import connect_error  # noqa: E402
from serve.config import ServeConfig  # noqa: E402
from serve.layout import REPLICA_OVERHEAD_BYTES, WEIGHT_COPIES, NodeResources, choose_layout, variant_bytes  # noqa

GB = 10**9
SMALL = 5 * 10**6  # the shipped small model's fp32 variant is ~5 MB


def _cfg(**kw) -> ServeConfig:
    return ServeConfig(bundle="b", **kw)


def _node(cpus: float, gpus: float = 0.0, memory: float = 16 * GB) -> NodeResources:
    return NodeResources(cpus, gpus, memory)


def test_no_flags_on_two_cores_is_two_single_threaded_replicas():
    layout = choose_layout(_cfg(), [_node(2)], SMALL)
    print(layout.describe())
    assert (layout.replicas, layout.threads, layout.cpus_per_replica, layout.gpus_per_replica) == (2, 1, 1.0, 0.0)
    assert layout.chosen == ("replicas", "threads", "cpus_per_replica")
    assert layout.describe().startswith("2 replicas x 1 onnxruntime thread (1 CPU, 0 GPU per replica; chosen from "
                                        "1 node, 2 CPUs, 0 GPUs")


def test_two_one_cpu_nodes_get_one_replica_each():
    layout = choose_layout(_cfg(), [_node(1), _node(1)], SMALL)
    assert (layout.replicas, layout.threads, layout.cpus_per_replica) == (2, 1, 1.0)


def test_memory_caps_the_replicas_and_the_left_cores_become_threads():
    replica = WEIGHT_COPIES * 28 * GB + REPLICA_OVERHEAD_BYTES  # a 7B fp32 variant
    one = choose_layout(_cfg(), [_node(16, memory=1.5 * replica)], 28 * GB)
    assert (one.replicas, one.threads, one.cpus_per_replica) == (1, 16, 16.0)
    four = choose_layout(_cfg(), [_node(16, memory=4.2 * (WEIGHT_COPIES * GB + REPLICA_OVERHEAD_BYTES))], GB)
    assert (four.replicas, four.threads, four.cpus_per_replica) == (4, 4, 4.0)
    # a node too small for even one: still one replica (Ray places it or reports it pending)
    assert choose_layout(_cfg(), [_node(2, memory=GB)], 28 * GB).replicas == 1


def test_flags_win_and_the_rest_follows():
    layout = choose_layout(_cfg(replicas=4), [_node(2)], SMALL)  # more replicas than cores: they share them
    assert (layout.replicas, layout.threads, layout.cpus_per_replica) == (4, 1, 0.5)
    assert layout.chosen == ("threads", "cpus_per_replica")
    layout = choose_layout(_cfg(threads=2), [_node(8)], SMALL)
    assert (layout.replicas, layout.threads, layout.cpus_per_replica) == (4, 2, 2.0)
    layout = choose_layout(_cfg(threads=0), [_node(2)], SMALL)  # 0: onnxruntime's default threads
    assert layout.replicas == 2 and layout.threads == 0 and "default threads" in layout.describe()
    layout = choose_layout(_cfg(replicas=1, threads=1, cpus_per_replica=1.0, gpus_per_replica=0.0), [_node(8)], SMALL)
    assert layout.chosen == () and layout.describe().endswith("all from flags)")
    layout = choose_layout(_cfg(autoscale=(1, 4)), [_node(8)], SMALL)
    assert layout.replicas is None and layout.threads == 2 and layout.describe().startswith("autoscaled")


def test_gpu_backend_is_one_replica_per_gpu():
    layout = choose_layout(_cfg(backend="onnxruntime-cuda"), [_node(16, 4), _node(16, 4)], 14 * GB)
    print(layout.describe())
    assert (layout.replicas, layout.gpus_per_replica, layout.cpus_per_replica) == (8, 1.0, 1.0)
    shared = choose_layout(_cfg(backend="tensorrt", replicas=2), [_node(8, 1)], GB)
    assert shared.replicas == 2 and shared.gpus_per_replica == 0.5
    cpu = choose_layout(_cfg(), [_node(8, 1)], SMALL)  # the CPU backend ignores the GPU
    assert cpu.gpus_per_replica == 0.0 and cpu.replicas == 8
    with pytest.raises(InputError, match=r"--backend onnxruntime-cuda runs on a GPU but Ray sees none \(1 node"):
        choose_layout(_cfg(backend="onnxruntime-cuda"), [_node(8)], SMALL)


def test_variant_bytes_are_the_files_a_replica_loads(small_bundle):
    from runtime.manifest import load_manifest
    v = load_manifest(small_bundle).variant("fp32")
    files = [v.vision.file, v.decoder.file, v.embedding, *v.vision.external_data, *v.decoder.external_data]
    assert variant_bytes(small_bundle, "fp32", "onnxruntime") == sum((small_bundle / f).stat().st_size for f in files)


def _refused() -> ConnectionError:
    """What `ray.init(address=...)` raised against a token-auth cluster (Ray 2.60, seen on a loopback cluster)."""
    try:
        try:
            raise RuntimeError("Failed to connect to GCS. Last connection error: Traceback (most recent call last):\n"
                               "ray.exceptions.AuthenticationError: RPC error: InvalidAuthToken: Authentication token "
                               "is missing or incorrect. Note: RAY_AUTH_MODE is currently 'disabled' (not 'token').")
        except RuntimeError as inner:
            raise ConnectionError("Failed to connect to Ray cluster at 127.0.0.1:6390") from inner
    except ConnectionError as exc:
        return exc


def test_token_refusal_says_what_to_set(monkeypatch):
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    msg = connect_error("127.0.0.1:6390", _refused())
    print(msg)
    assert "\n" not in msg and msg.startswith("--address 127.0.0.1:6390: the cluster uses Ray token authentication")
    assert "RAY_AUTH_MODE=token" in msg and "RAY_AUTH_TOKEN" in msg and "ray get-auth-token" in msg
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "not-the-clusters")
    msg = connect_error("127.0.0.1:6390", _refused())
    assert "refused this client's token" in msg and "token from RAY_AUTH_TOKEN" in msg


def test_other_connection_failures_keep_rays_reason():
    msg = connect_error("10.0.0.9:6379", ConnectionError("Failed to connect to Ray cluster at 10.0.0.9:6379"))
    assert msg == ("--address 10.0.0.9:6379: cannot connect to the Ray cluster: ConnectionError: Failed to connect to "
                   "Ray cluster at 10.0.0.9:6379")


def test_a_replica_loads_with_the_layout_and_reports_it(small_bundle, monkeypatch):
    """The deployment's own class (no Ray started): the resolved threads reach its Estimator, /v1/stats carries the
    layout and the node Ray placed it on, and the app binds with the layout's resources."""
    import ray

    from serve.app import PoseDeployment, build_app
    from serve.cli import resolved

    class Context:
        def get_node_id(self) -> str:
            return "node-a"

    monkeypatch.setattr(ray, "get_runtime_context", lambda: Context())
    cfg = ServeConfig(bundle=small_bundle)
    layout = choose_layout(cfg, [_node(2)], variant_bytes(small_bundle, "fp32", "onnxruntime"))
    assert build_app(resolved(cfg, layout), layout) is not None
    # Serve's ingress wraps the class in a subclass; the replica's own code is the class it wraps
    replica_cls = next(c for c in PoseDeployment.func_or_class.__mro__ if "submit" in vars(c))
    replica = replica_cls(resolved(cfg, layout), layout)
    stats = replica.stats_snapshot()
    print(stats["layout"], stats["node_id"])
    assert stats["layout"] == layout.to_json() and stats["node_id"] == "node-a"
    assert replica.estimator.config.threads == 1 and replica.readyz()["ready"] is True
