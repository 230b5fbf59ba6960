"""bench/placement_alibaba.py: the inflation loop on tiny synthetic clusters, and its fast policy
evaluation checked decision by decision against lamina.compute's policies."""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "placement_alibaba.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("placement_alibaba", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["placement_alibaba"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def write(path: Path, header: str, rows: list[str]) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


NODE_HEADER = "sn,cpu_milli,memory_mib,gpu,model"
POD_HEADER = "name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec,qos,pod_phase"


@pytest.mark.parametrize("policy", ["best-fit", "first-fit", "spread", "fgd"])
def test_inflation_stops_at_capacity_and_counts_unplaced(
    bench: ModuleType, tmp_path: Path, policy: str
) -> None:
    # 2 nodes x 2 GPUs = 4000 milli; pods of 600 milli: 7 draws request 4200 >= 4000; one fits per GPU
    nodes = bench.load_nodes(
        write(tmp_path / "n.csv", NODE_HEADER, ["a,8000,16384,2,T4", "b,8000,16384,2,T4"])
    )
    pods = bench.load_pods(write(tmp_path / "p.csv", POD_HEADER, ["p0,1000,1024,1,600,,LS,Running"]))
    result = bench.inflate(nodes, pods, policy, seed=3)
    assert result["pods_drawn"] == 7
    assert result["allocated_share"] == pytest.approx(2400 / 4000)
    assert result["unplaced_pods"] == 3
    assert result["unplaced_gpu_milli"] == 1800
    assert result["idle_gpus"] == 0


def test_cpu_bound_nodes_leave_gpus_idle(bench: ModuleType, tmp_path: Path) -> None:
    # node a has CPU for one pod only: its second GPU stays idle, and the third pod cannot be placed
    nodes = bench.load_nodes(write(tmp_path / "n.csv", NODE_HEADER, ["a,4000,16384,2,T4", "b,1000,1024,0,"]))
    pods = bench.load_pods(write(tmp_path / "p.csv", POD_HEADER, ["p0,3000,1024,1,1000,,LS,Running"]))
    result = bench.inflate(nodes, pods, "best-fit", seed=0)
    assert (result["pods_drawn"], result["unplaced_pods"], result["idle_gpus"]) == (2, 1, 1)
    assert result["allocated_share"] == pytest.approx(0.5)


def random_trace(tmp_path: Path, rng: random.Random) -> tuple[Path, Path]:
    nodes = [
        f"n{i:02d},{rng.choice([8000, 16000, 32000])},{rng.choice([16384, 65536])},"
        f"{rng.choice([1, 2, 4, 8])},{rng.choice(['T4', 'V100'])}"
        for i in range(10)
    ]
    shapes = [
        (rng.choice([500, 2000, 4000]), rng.choice([1024, 4096]), 1, rng.choice([150, 300, 470, 650, 810]))
        for _ in range(6)
    ]
    shapes += [(2000, 2048, 1, 1000), (4000, 8192, 2, 1000), (8000, 8192, 4, 1000), (1000, 1024, 0, 0)]
    pods = [
        f"p{i},{c},{m},{n},{g},{'V100' if i % 7 == 0 and n else ''},LS,Running"
        for i, (c, m, n, g) in enumerate(rng.choice(shapes) for _ in range(40))
    ]
    return write(tmp_path / "n.csv", NODE_HEADER, nodes), write(tmp_path / "p.csv", POD_HEADER, pods)


@pytest.mark.parametrize(
    ("policy", "mix"), [("best-fit", "gpu"), ("spread", "gpu"), ("fgd", "gpu"), ("fgd", "count")]
)
def test_fast_evaluation_picks_what_the_library_picks(
    bench: ModuleType, tmp_path: Path, policy: str, mix: str
) -> None:
    for trial in range(4):
        rng = random.Random(trial)
        node_csv, pod_csv = random_trace(tmp_path, rng)
        nodes, pods = bench.load_nodes(node_csv), bench.load_pods(pod_csv)
        # check=every draw: inflate raises on the first pick that differs from the library policy's
        result = bench.inflate(nodes, pods, policy, seed=trial, check=10**6, weighting=mix)
        assert 0.0 < result["allocated_share"] <= 1.0


def test_first_fit_takes_the_first_node_in_list_order(bench: ModuleType, tmp_path: Path) -> None:
    nodes = bench.load_nodes(
        write(tmp_path / "n.csv", NODE_HEADER, ["z,8000,16384,4,T4", "a,8000,16384,1,T4"])
    )
    pods = bench.load_pods(write(tmp_path / "p.csv", POD_HEADER, ["p0,1000,1024,1,1000,,LS,Running"]))
    cluster = bench.Cluster(nodes)
    assert cluster.pick("first-fit", pods[0]) == (0, (0,))
    assert cluster.pick("best-fit", pods[0]) == (1, (0,))


def test_json_output_is_one_object_per_policy(
    bench: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    node_csv = write(tmp_path / "n.csv", NODE_HEADER, ["a,8000,16384,2,T4", "b,8000,16384,2,T4"])
    pod_csv = write(
        tmp_path / "p.csv", POD_HEADER, ["p0,1000,1024,1,600,,LS,Running", "p1,500,512,1,300,,LS,Running"]
    )
    assert bench.main([str(pod_csv), "--nodes", str(node_csv), "--json", "--repeats", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["policy"] for r in out] == ["best-fit", "first-fit", "spread", "fgd"]
    assert all(0.0 < r["allocated_share"] <= 1.0 and r["seeds"] == [0, 1] for r in out)


def test_unknown_policy_is_refused(bench: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        bench.main(["--policies", "tetris"])
    assert "choose from best-fit" in capsys.readouterr().err
