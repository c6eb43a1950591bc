from __future__ import annotations

from featshard.index.gpuplan import GPU_RESERVE, BuildPlan, Step, Workload, best_gpu, plan_build, spread

GiB = 1 << 30
MiB = 1 << 20
# IVF65536 over 2048-d vectors: 512 MiB of centroids (the whole IVF-Flat index of 10 M vectors: ~80 GB)
BIG = Workload(dim=2048, nlist=65_536, ivf_dim=2048, flat_quantizer=True, trains=True, batch_rows=8192)


def test_without_gpus_every_step_runs_on_the_cpu_and_says_why():
    plan = plan_build(BIG, [])
    assert [plan.train.device, plan.add.device, plan.tune.device] == ["cpu"] * 3 and not plan.uses_gpu
    assert plan.train.note == "no GPU" and plan.add.note == "no GPU" and plan.tune.note.endswith("no GPU")


def test_roomy_gpus_train_on_all_replicated_and_add_on_the_emptiest():
    plan = plan_build(BIG, [80 * GiB, 79 * GiB, 80 * GiB + MiB, 60 * GiB])
    assert plan.train == Step("gpu:0,1,2,3", note="k-means assignment: 512 MiB float32 on each of 4 GPU(s)")
    assert plan.add.device == "gpu:2" and "quantizer" in plan.add.note and not plan.add.float16
    assert plan.tune.device == "gpu:2" and plan.uses_gpu
    assert plan.meta()["train"] == {"device": "gpu:0,1,2,3", "shard": False, "float16": False,
                                    "note": plan.train.note}


def test_only_the_centroids_go_to_a_gpu_never_the_index():
    # 10 M x 2048-d IVF-Flat needs ~80 GB: a 4 GiB-free GPU still trains and assigns (it holds 512 MiB + reserve)
    plan = plan_build(BIG, [GPU_RESERVE + 600 * MiB])
    assert plan.train.device == plan.add.device == "gpu:0" and not plan.train.shard


def test_tight_gpus_shard_then_use_float16_then_give_up():
    room = GPU_RESERVE + 300 * MiB  # 512 MiB of centroids fit on none whole, on two as halves
    plan = plan_build(BIG, [room, room])
    assert plan.train.shard and not plan.train.float16 and plan.train.device == "gpu:0,1"
    assert "sharded over 2 GPUs" in plan.train.note
    assert plan.add.device == "cpu" and "fit on no GPU" in plan.add.note  # the add needs one float32 copy
    single = plan_build(BIG, [room])
    assert single.train.device == "gpu:0" and single.train.float16 and "float16" in single.train.note
    full = plan_build(BIG, [GPU_RESERVE + 100 * MiB, GPU_RESERVE - MiB])
    assert full.train.device == full.add.device == "cpu" and "fit on no GPU" in full.train.note
    assert full.tune.device == "gpu:0"  # a 64 MiB batch of the ground truth still fits


def test_gpus_below_the_reserve_are_left_out():
    step = spread(100 * MiB, [GPU_RESERVE - 1, GPU_RESERVE + 200 * MiB, 40 * GiB])
    assert step == Step("gpu:1,2", note="100 MiB float32 on each of 2 GPU(s)")
    assert best_gpu(MiB, [GPU_RESERVE, GPU_RESERVE]) is None and best_gpu(MiB, []) is None


def test_hnsw_quantizers_train_on_the_gpu_and_assign_on_the_cpu():
    hnsw = Workload(dim=512, nlist=262_144, ivf_dim=512, flat_quantizer=False, trains=True)
    plan = plan_build(hnsw, [40 * GiB])
    assert plan.train.device == "gpu:0" and plan.add.device == "cpu" and "HNSW" in plan.add.note


def test_exact_and_untrained_indexes():
    flat = plan_build(Workload(dim=256, exact=True), [40 * GiB])
    assert flat == BuildPlan(Step(note="nothing to train"), Step(note="not an IVF index: added on the CPU"),
                             Step(note="exact index: nothing to tune"))
    hnsw = plan_build(Workload(dim=256), [40 * GiB])
    assert hnsw.tune.device == "gpu:0" and hnsw.add.device == "cpu"
    trained_ivf = plan_build(Workload(dim=256, nlist=1024, ivf_dim=256), [40 * GiB])  # `add` to a built index
    assert trained_ivf.train.note == "nothing to train" and trained_ivf.add.device == "gpu:0"
