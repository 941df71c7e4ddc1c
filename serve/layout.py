"""`Layout`: how many replicas, onnxruntime threads and Ray resources `serve` uses — from the flags where given, else
from the nodes Ray sees.

CPU rule: one replica per CPU core, one onnxruntime thread each, as many as memory holds. Measured on 2 cores
(README, benchmarks/results/serve-loadtest*.json): one replica with onnxruntime's default threads gave 8 clients
1.35x one sequential client; two replicas of one thread each 1.5-1.78x. On a CPU a batch is barely cheaper per
person than a single person, so the gain is not batching or intra-op threads: it is a second replica running its
single-threaded Python (HTTP parsing, cropping, answer decoding) while the other runs the graphs, and one thread per
session avoids two thread pools fighting over the same cores. Each replica holds its own copy of the variant, so a
node gets at most as many as fit in its Ray memory; the cores that leaves over become threads.

GPU rule (a CUDA / TensorRT backend): one replica per GPU (num_gpus=1, so CUDA_VISIBLE_DEVICES is that GPU), batches
up to the bundle's exported persons (the default of --max-persons-per-batch); onnxruntime's own CPU threads.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

from runtime.errors import InputError
from runtime.manifest import load_manifest

from .config import ServeConfig

GPU_BACKENDS = ("onnxruntime-cuda", "onnxruntime-trt", "tensorrt")
# A replica's memory, estimated: the graphs' weights about twice (onnxruntime's initializers plus its pre-packed
# copies) and the interpreter, Ray worker and onnxruntime themselves.
WEIGHT_COPIES = 2.0
REPLICA_OVERHEAD_BYTES = 512 * 2**20


@dataclass(frozen=True)
class NodeResources:
    """What Ray offers on one alive node."""
    cpus: float
    gpus: float
    memory_bytes: float


@dataclass(frozen=True)
class Layout:
    replicas: int | None  # None: autoscaled between config.autoscale
    threads: int | None  # onnxruntime intra-op threads per replica; None: onnxruntime's default
    cpus_per_replica: float
    gpus_per_replica: float
    chosen: tuple[str, ...]  # the fields taken from the machine (the others came from flags)
    seen: str  # what Ray offered, for the log line

    def to_json(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        replicas = "autoscaled" if self.replicas is None else f"{self.replicas} replica{'s' * (self.replicas != 1)}"
        threads = "onnxruntime's default threads" if not self.threads else \
            f"{self.threads} onnxruntime thread{'s' * (self.threads != 1)}"
        source = f"chosen from {self.seen}: {', '.join(self.chosen)}" if self.chosen else "all from flags"
        return (f"{replicas} x {threads} ({self.cpus_per_replica:g} CPU, {self.gpus_per_replica:g} GPU per replica; "
                f"{source})")


def cluster_nodes() -> list[NodeResources]:
    """The alive nodes of the Ray cluster this process is connected to."""
    import ray
    out = []
    for node in ray.nodes():
        if node.get("Alive"):
            r = node.get("Resources", {})
            out.append(NodeResources(r.get("CPU", 0.0), r.get("GPU", 0.0), r.get("memory", 0.0)))
    return out


def variant_bytes(bundle: Path, precision: str, backend: str) -> int:
    """Bytes of the graphs and embedding table one replica loads (the form the backend runs)."""
    manifest = load_manifest(bundle, verify=False)
    form = manifest.variant(precision).form(backend)
    files = {form.vision.file, form.decoder.file, form.embedding}
    for graph in (form.vision, form.decoder):
        files.update(str(Path(graph.file).parent / e) for e in graph.external_data)
    return sum((bundle / f).stat().st_size for f in files if (bundle / f).is_file())


def choose_layout(config: ServeConfig, nodes: list[NodeResources], weight_bytes: int) -> Layout:
    """Flags win; what they leave open is filled from `nodes` by the CPU or GPU rule (module docstring)."""
    if not nodes:
        raise InputError("Ray reports no alive node; cannot lay out the replicas")
    seen = (f"{len(nodes)} node{'s' * (len(nodes) != 1)}, {sum(n.cpus for n in nodes):g} CPUs, "
            f"{sum(n.gpus for n in nodes):g} GPUs")
    if config.backend in GPU_BACKENDS:
        return _gpu_layout(config, nodes, seen)
    return _cpu_layout(config, nodes, weight_bytes, seen)


def _cpu_layout(config: ServeConfig, nodes: list[NodeResources], weight_bytes: int, seen: str) -> Layout:
    chosen = []
    replica_bytes = WEIGHT_COPIES * weight_bytes + REPLICA_OVERHEAD_BYTES
    fits = {id(n): int(n.memory_bytes // replica_bytes) if n.memory_bytes else math.inf for n in nodes}
    total_cpus = sum(n.cpus for n in nodes)
    threads, replicas = config.threads, config.replicas
    if replicas is None and config.autoscale is None:
        chosen.append("replicas")
        per_node = {id(n): int(min(n.cpus // (threads or 1), fits[id(n)])) for n in nodes}
        replicas = max(1, sum(per_node.values()))
        if threads is None:
            chosen.append("threads")
            # where memory capped a node below its cores, its replicas share those cores as threads
            threads = max(1, min((int(n.cpus // per_node[id(n)]) for n in nodes if per_node[id(n)]), default=1))
    elif threads is None:
        chosen.append("threads")
        count = replicas if replicas is not None else config.autoscale[1]
        threads = max(1, min(int(total_cpus // count), int(max(n.cpus for n in nodes))))
    cpus = config.cpus_per_replica
    if cpus is None:
        chosen.append("cpus_per_replica")
        count = replicas if replicas is not None else config.autoscale[1]
        # reserve the cores the threads use, but never more than the cluster has for the replicas asked for
        cpus = round(min(float(threads or 1), total_cpus / count), 3) if total_cpus else 0.0
    gpus = config.gpus_per_replica if config.gpus_per_replica is not None else 0.0
    return Layout(replicas if config.autoscale is None else None, threads, cpus, gpus, tuple(chosen), seen)


def _gpu_layout(config: ServeConfig, nodes: list[NodeResources], seen: str) -> Layout:
    chosen = []
    total_gpus = sum(int(n.gpus) for n in nodes)
    gpus, replicas = config.gpus_per_replica, config.replicas
    if gpus is None:
        chosen.append("gpus_per_replica")
        if total_gpus == 0:
            raise InputError(f"--backend {config.backend} runs on a GPU but Ray sees none ({seen}); start Ray on a "
                             "GPU node, or use --backend onnxruntime")
        count = replicas or (config.autoscale[1] if config.autoscale else total_gpus)
        gpus = 1.0 if count <= total_gpus else round(total_gpus / count, 3)  # more replicas than GPUs: share them
    if replicas is None and config.autoscale is None:
        chosen.append("replicas")
        replicas = max(1, int(sum(n.gpus // gpus for n in nodes))) if gpus else 1
    cpus = config.cpus_per_replica
    if cpus is None:
        chosen.append("cpus_per_replica")
        cpus = 1.0  # feeding a GPU: preprocessing and decoding, one core
    return Layout(replicas if config.autoscale is None else None, config.threads, cpus, gpus, tuple(chosen), seen)
