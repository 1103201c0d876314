"""Two "nodes" on this machine: two torchrun launches of one process each (`--nnodes 2 --node_rank 0|1`, the
rendezvous on 127.0.0.1), DeepSpeed on CPU (gloo), the tiny model, through tests/distributed_driver.py.

Checked: two nodes train the model one node of two processes trains (same losses and weights, the same files
in every checkpoint); in one shared run dir every rank writes its own shards once and global rank 0 the shared
files (configs, stage weights, `COMPLETE`) once in all; a lost node (SIGKILL) and a resume of both nodes give
an uninterrupted run's losses; a run dir that is not shared between the nodes is refused on both, before any
step. `make test-distributed` (~2-4 min a case on 2 cores: four processes at once).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest
from test_distributed import DRIVER
from test_fault_distributed import _children
from train_utils import free_port, make_colour_dataset, torchrun
from train_utils import lora_deepspeed_overrides as overrides

from llava_train.train import checkpoint as ckpt

pytestmark = pytest.mark.distributed
REPO = Path(__file__).resolve().parent.parent
PER_RANK = re.compile(r"(?:rng_state_|zero_pp_rank_)(\d+)_?")  # a rank's own shard: rng_state_1.pth, ...
UNSEEN = {"tokenizer.json"}  # written from Rust by the tokenizers library: no write of it is recorded


def _launch(cmd: list[str], log: Path) -> subprocess.Popen:
    # the code under test, not whichever checkout the venv's editable install points at
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    with open(log, "w") as out:  # a file, not a pipe: several launches run at once and log a lot
        return subprocess.Popen(
            cmd, cwd=log.parent, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def one_node(overrides: list[str], log: Path) -> list[subprocess.Popen]:
    """One node of two processes: the reference."""
    return [_launch([*torchrun(2), str(DRIVER), *overrides], log)]


def node_torchrun(rank: int, port: int) -> list[str]:
    """The torchrun of node ``rank`` of two, one process each, the rendezvous on 127.0.0.1:``port``."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
        "--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port", str(port),
    ]  # fmt: skip


def two_nodes(per_node: list[list[str]], log: Path) -> list[subprocess.Popen]:
    """Two nodes of one process each, node r started with per_node[r]'s overrides, logging to <log>.node<r>.log."""
    port = free_port()
    return [
        _launch([*node_torchrun(r, port), str(DRIVER), *o], log.with_name(f"{log.name}.node{r}.log"))
        for r, o in enumerate(per_node)
    ]


def finish(procs: list[subprocess.Popen], timeout: float = 900) -> list[int]:
    deadline = time.time() + timeout
    for proc in procs:
        proc.wait(timeout=max(1.0, deadline - time.time()))
    return [proc.returncode for proc in procs]


def logs(tmp_path: Path, stem: str = "") -> str:
    return "\n".join(f"== {p.name}\n{p.read_text()[-4000:]}" for p in sorted(tmp_path.glob(f"{stem}*.log")))


def ranks(run_dir: Path) -> list[dict]:
    return [json.loads((run_dir / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.fixture(scope="module")
def data_json(tmp_path_factory) -> Path:
    return make_colour_dataset(tmp_path_factory.mktemp("colours"), n=48)


def writers(results: list[dict], key: str = "written") -> dict[str, list[int]]:
    """Path (relative to run_dir, as finalised: staging dir and .tmp names mapped to the final ones) -> the
    rank of each write of it (``key`` "appended": of each open for appending), in order."""
    found = defaultdict(list)
    for result in results:
        for path in result[key]:
            path = path.removeprefix(ckpt.STAGING_DIR + os.sep).removesuffix(".tmp")
            if not Path(path).name.startswith(".write_probe."):  # every rank's own writability probe
                found[path].append(result["rank"])
    return dict(found)


def owner(path: str) -> int:
    """The rank that must write `path`: its own shards for every rank, everything else global rank 0."""
    match = PER_RANK.search(Path(path).name)
    return int(match.group(1)) if match else 0


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_two_nodes_train_as_one_node_and_write_each_file_once(data_json, tmp_path, zero):
    procs = one_node(overrides(data_json, tmp_path / "one", zero, 4), tmp_path / "one.log")
    procs += two_nodes([overrides(data_json, tmp_path / "two", zero, 4)] * 2, tmp_path / "two")
    assert finish(procs) == [0, 0, 0], logs(tmp_path)
    one, two = ranks(tmp_path / "one"), ranks(tmp_path / "two")
    assert two[0]["world_size"] == 2 and two[0]["losses"] == two[1]["losses"]
    assert len(two[0]["losses"]) == 4
    for step, loss in one[0]["losses"].items():
        assert two[0]["losses"][step] == pytest.approx(loss, rel=1e-5), (step, one[0], two[0])
    assert two[0]["checksum"] == pytest.approx(one[0]["checksum"], rel=1e-6)

    written = writers(two)
    for step in (2, 4):
        name = f"checkpoint-{step}"
        files = json.loads((tmp_path / "two" / name / ckpt.COMPLETE_MARKER).read_text())["files"]
        reference = json.loads((tmp_path / "one" / name / ckpt.COMPLETE_MARKER).read_text())["files"]
        assert sorted(files) == sorted(reference), "two nodes saved other files than one node"
        assert {owner(rel) for rel in files} == {0, 1}, f"no shard of rank 1 in {sorted(files)}"
        for rel in [*files, ckpt.COMPLETE_MARKER]:
            path = os.path.join(name, rel)
            if rel in UNSEEN:
                continue
            assert written.get(path) == [owner(rel)], (path, written.get(path))
    assert not ckpt.verify_checkpoint(tmp_path / "two" / "checkpoint-4")
    # Nothing else either: the final weights, configs and probes too, each by its one writer, once.
    twice = {p: w for p, w in written.items() if w != [owner(p)]}
    assert not twice, twice
    logs_by_others = {p: w for p, w in writers(two, "appended").items() if set(w) != {owner(p)}}
    assert not logs_by_others, logs_by_others  # a log (throughput.jsonl) is appended to by its one writer


def test_a_lost_node_then_both_resumed_match_an_uninterrupted_run(data_json, tmp_path):
    cut = tmp_path / "cut"
    nodes = two_nodes([overrides(data_json, cut, "zero3", 400)] * 2, tmp_path / "cut")
    deadline = time.time() + 600
    while not (cut / "checkpoint-2" / ckpt.COMPLETE_MARKER).is_file():
        assert all(p.poll() is None for p in nodes), logs(tmp_path, "cut")
        assert time.time() < deadline, logs(tmp_path, "cut")
        time.sleep(0.1)
    lost = nodes[1]  # node 1's machine goes down: its agent and its worker, at once
    for pid in _children(lost.pid):
        os.kill(pid, signal.SIGKILL)
    os.killpg(lost.pid, signal.SIGKILL)
    try:  # node 0 loses its peer mid-collective: gloo fails its next send or receive
        nodes[0].wait(timeout=120)
    finally:
        if nodes[0].poll() is None:
            for pid in _children(nodes[0].pid):
                os.kill(pid, signal.SIGKILL)
            os.killpg(nodes[0].pid, signal.SIGKILL)
    assert nodes[0].returncode not in (0, None), logs(tmp_path, "cut")
    last = ckpt.latest_complete_checkpoint(cut)
    step = json.loads((last / "trainer_state.json").read_text())["global_step"]
    assert 2 <= step < 400

    # Both nodes resumed, and (at the same time) one node of two processes uninterrupted to the same step.
    procs = two_nodes(
        [overrides(data_json, cut, "zero3", step + 2, "training.resume=true")] * 2, tmp_path / "resume"
    )
    procs += one_node(overrides(data_json, tmp_path / "full", "zero3", step + 2), tmp_path / "full.log")
    assert finish(procs) == [0, 0, 0], logs(tmp_path)
    resumed, full = ranks(cut), ranks(tmp_path / "full")
    # It resumed at the step on both nodes: each collated 2 micro-batches (accumulation 2) a step fewer.
    assert [len(r["batches"]) for r in resumed] == [len(full[0]["batches"]) - 2 * step] * 2
    assert resumed[0]["losses"] == resumed[1]["losses"]
    for s in (str(step + 1), str(step + 2)):  # the steps before come with the checkpoint's log history
        assert resumed[0]["losses"][s] == pytest.approx(full[0]["losses"][s], rel=1e-4), (s, resumed, full)
    assert resumed[0]["checksum"] == pytest.approx(full[0]["checksum"], rel=1e-5)


def test_a_run_dir_not_shared_between_nodes_is_refused_on_both(data_json, tmp_path):
    per_node = [overrides(data_json, tmp_path / f"node{r}_local", "zero2", 4) for r in (0, 1)]
    procs = two_nodes(per_node, tmp_path / "split")
    assert all(rc != 0 for rc in finish(procs, timeout=600)), logs(tmp_path, "split")
    for r in (0, 1):
        out = tmp_path.joinpath(f"split.node{r}.log").read_text()
        assert "is not shared between the nodes: rank 1 on" in out, out[-4000:]
        assert f"training.run_dir={tmp_path / f'node{r}_local'}" in out, out[-4000:]
        assert not list((tmp_path / f"node{r}_local").glob("checkpoint-*")), "it trained before refusing"
