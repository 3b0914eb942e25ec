"""What a CUDA host runs, checked on the CPU: which group serves which tensors, which backend and device a
config picks, the planner's device, SyncBN, and when FAISS goes to the GPU."""

import threading

import numpy as np
import pytest
import torch
from conftest import ROOT, torchrun, train_cmd

from dist_cl.config import ConfigError
from dist_cl.runtime.distributed import resolve_backend

RUN = ["selection.strategy=sc_global", "selection.overlap=true", "selection.warmup_epochs=0", "train.epochs=2",
       "train.global_batch_size=128", "selection.options.cell_size=512", "eval.every_epochs=2",
       "checkpoint.every_steps=4", "model.sync_bn=true"]


@pytest.mark.parametrize("requested,cuda,expected", [
    ("auto", False, ("gloo", "cpu")),
    ("auto", True, ("cpu:gloo,cuda:nccl", "cuda")),
    ("gloo", True, ("gloo", "cpu")),
    ("gloo", False, ("gloo", "cpu")),
    ("nccl", True, ("cpu:gloo,cuda:nccl", "cuda")),
])
def test_backend_and_device_are_a_function_of_the_config_and_cuda(requested, cuda, expected):
    assert resolve_backend(requested, cuda_available=cuda) == expected


def test_nccl_without_cuda_is_a_config_error():
    with pytest.raises(ConfigError, match="dist.backend=nccl needs CUDA"):
        resolve_backend("nccl", cuda_available=False)


@pytest.fixture(scope="module")
def recorded_run(tmp_path_factory):
    """A 2-rank gloo run with sc_global + overlap, mid-epoch checkpoints, evaluation and model.sync_bn,
    every collective recorded per rank (tests/scripts/collective_devices.py)."""
    out = tmp_path_factory.mktemp("collectives")
    proc = torchrun([str(ROOT / "tests" / "scripts" / "collective_devices.py"), str(out),
                     *train_cmd(out / "run", *RUN)[1:]])
    return out, proc


def served_devices(backend: str) -> set[str]:
    """Device types whose tensors a group of ``backend`` (e.g. ``cpu:gloo,cuda:nccl``) takes."""
    if ":" in backend:
        return {pair.split(":")[0] for pair in backend.split(",")}
    return {"gloo": {"cpu"}, "nccl": {"cuda"}}[backend]


def test_every_collective_goes_to_a_group_that_serves_its_tensors_on_a_cuda_host(recorded_run):
    """On the CPU every tensor is a CPU tensor, so this checks the stricter condition: every group that a
    collective reaches would take CPU tensors on a CUDA host too. A default group of nccl alone (the
    backend before issue 10) fails it: the config and plan digests, the step's flags and the bank rows,
    the RNG states and plans of the object collectives all reached it as CPU tensors."""
    import json

    out, _ = recorded_run
    cuda_host = {"default": resolve_backend("auto", cuda_available=True)[0], "gloo": "gloo"}
    for rank in (0, 1):
        records = json.loads((out / f"rank{rank}.json").read_text())
        calls = {(r["op"], r["group"]) for r in records}
        # the paths that sent CPU tensors to nccl, and the planner's and checkpoint's own groups
        assert {("all_reduce", "default"), ("all_gather", "default"), ("all_gather_object", "default"),
                ("all_gather_object", "gloo"), ("barrier", "gloo")} <= calls, calls
        for r in records:
            assert set(r["devices"]) <= served_devices(cuda_host[r["group"]]), r


def test_sync_bn_on_gloo_trains_with_per_rank_batchnorm_and_says_so(recorded_run):
    out, proc = recorded_run
    assert "model.sync_bn=true needs CUDA" in proc.stderr
    assert (out / "run" / "checkpoints" / "latest").read_text() == "step-00000022.pt"


def unit_pairs(n: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, d))
    u, v = (z + 0.5 * rng.standard_normal(z.shape) for _ in range(2))
    return tuple((x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32) for x in (u, v))


def test_planner_thread_sets_and_passes_its_ranks_device(monkeypatch):
    """A rank's planner thread makes its rank's GPU current and hands it to every kNN and FAISS index it
    builds (cuda:3 here; the work itself is redirected to the CPU)."""
    from dist_cl.plan.planner import BackgroundPlanner, PlanRequest, compute_plan
    from dist_cl.selection import sc_global

    current, knn, index = [], [], []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: current.append((threading.current_thread().name, d)))
    cross_knn, centroid_index = sc_global.cross_knn, sc_global._centroid_index
    monkeypatch.setattr(sc_global, "cross_knn", lambda u, v, k, device: knn.append(device) or cross_knn(u, v, k, "cpu"))
    monkeypatch.setattr(sc_global, "_centroid_index",
                        lambda d, n, device: index.append(device) or centroid_index(d, n, torch.device("cpu")))
    u, v = unit_pairs(600, 8, seed=1)
    request = PlanRequest(strategy="sc_global", seed=2, batch_size=32, options={"cell_size": 128}, u=u, v=v,
                          scoring={"tau": 0.1})
    planner = BackgroundPlanner(torch.device("cuda", 3))
    try:
        plan, _ = planner.submit(request, epoch=1).result()
    finally:
        planner.close()
    assert [(name.startswith("dist_cl-plan"), str(d)) for name, d in current] == [(True, "cuda:3")]
    assert knn and index and {str(d) for d in knn + index} == {"cuda:3"}
    assert np.array_equal(plan.batches, compute_plan(request, 1, device=torch.device("cpu"))[0].batches)


@pytest.mark.parametrize("device,gpus,expected", [
    ("cpu", 0, False), ("cpu", 2, False), ("cuda:1", 0, False), ("cuda:1", 2, True),
])
def test_faiss_goes_to_the_gpu_only_with_a_cuda_device_and_a_gpu_faiss(device, gpus, expected):
    from dist_cl.selection.sc_global import faiss_on_gpu

    assert faiss_on_gpu(torch.device(device), gpus) is expected


@pytest.mark.parametrize("gpus", [0, 1])
def test_kmeans_builds_a_gpu_index_exactly_when_faiss_has_gpus(monkeypatch, gpus):
    """Where FAISS has GPUs every k-means index is the GPU one (faked by a flat CPU index here), on the
    rank's device; with faiss-cpu the indexes are the CPU ones, HNSW from HNSW_ASSIGN_MIN centroids."""
    import faiss

    from dist_cl.selection import sc_global

    gpu_indexes = []
    monkeypatch.setattr(sc_global, "faiss_gpus", lambda: gpus)
    monkeypatch.setattr(sc_global, "_gpu_index", lambda d, device: gpu_indexes.append(device) or faiss.IndexFlatIP(d))
    built = []
    centroid_index = sc_global._centroid_index
    monkeypatch.setattr(sc_global, "_centroid_index",
                        lambda d, n, device: built.append(type(index := centroid_index(d, n, device))) or index)
    u, v = unit_pairs(2200, 16, seed=0)
    sc_global.kmeans_cells(u + v, 256, seed=5, fine_size=1, device=torch.device("cuda", 1))
    if gpus:
        assert set(built) == {faiss.IndexFlatIP} and {str(d) for d in gpu_indexes} == {"cuda:1"}
    else:
        # fine level: training, assignment; then the cells' level: training, assignment
        assert built == [faiss.IndexHNSWFlat, faiss.IndexHNSWFlat, faiss.IndexFlatIP, faiss.IndexFlatIP]
        assert not gpu_indexes


@pytest.mark.parametrize("options,digest", [
    ({"cell_size": 256, "fine_size": 1}, "60c9cadb063dc990"),  # 2,200 fine centroids: the HNSW assignment
    ({"cell_size": 256}, "0c8274deb592f844"),
])
@pytest.mark.parametrize("device", [None, "cpu"])
def test_cpu_plan_is_the_plan_of_the_code_before_gpu_faiss(options, digest, device):
    """Digests of sc_global partitions made by the code before issue 10 (bf64a38) on this data: the CPU path
    (explicit, or by default on a host without CUDA) must still make exactly them. The strategy's own output,
    before select_batches puts a loss-aware plan's rows in a seeded order (issue 12)."""
    import hashlib

    from dist_cl.selection.sc_global import sc_global_partition

    u, v = unit_pairs(2200, 16, seed=0)
    plan = sc_global_partition(u, v, 32, seed=5, tau=0.1, device=device, **options)
    assert hashlib.sha256(np.ascontiguousarray(plan, dtype=np.int64).tobytes()).hexdigest()[:16] == digest


@pytest.mark.parametrize("strategy,options,one_rank", [("osgd", {"k": 4}, True), ("sc", {"chunk_batches": 4}, True),
                                                        ("sc_global", {"cell_size": 64}, False)])
def test_plans_are_made_once_unless_the_strategy_deals_its_own_work(strategy, options, one_rank):
    """sc and osgd run on one rank and the others receive the plan (map_fn over one item); sc_global gets
    map_fn to deal its cells. Either way the plan is the strategy's own."""
    from dist_cl.plan.planner import PlanRequest, select_shared
    from dist_cl.selection import select_batches

    calls = []

    def map_fn(fn, items):
        calls.append(len(items))
        return [fn(item) for item in items]

    u, v = unit_pairs(256, 8, seed=3)
    plan = select_shared(PlanRequest(strategy, seed=1, batch_size=8, options=options, u=u, v=v, scoring={"tau": 0.2}),
                         map_fn=map_fn)
    assert np.array_equal(plan, select_batches(strategy, u, v, 8, seed=1, tau=0.2, **options))
    assert (calls == [1]) is one_rank and bool(calls)
