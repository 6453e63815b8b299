"""Distributed runs (bpdq/engine/distributed.py): ``bpdq quantize`` as 2 gloo ranks on the CPU, started the
way torchrun starts them (RANK, WORLD_SIZE, MASTER_ADDR/PORT in the environment): the checkpoint matches the
single-process one, a stop on one rank stops both and resumes, and a failure on one rank ends both."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import yaml

import bpdq
from bpdq.engine import distributed
from tests.cli.conftest import REPO, tiny_strategy
from tests.tiny_models import tiny_model_dir

STOP_PLUGIN = """
import os
import bpdq.engine.interrupt as resume
import bpdq.engine.loop as run

step = run.run_layer_step

def stopping(source, s, index, *args, **kwargs):  # rank 1 alone asks for a stop during the first layer
    if index == 0 and os.environ["RANK"] == "1":
        resume._STOP.set()
    return step(source, s, index, *args, **kwargs)

if os.environ.get("BPDQ_TEST_STOP"):
    run.run_layer_step = stopping
"""

SPLIT_PLUGIN = """
import os
import bpdq.engine.distributed as distributed

gather = distributed.gather_rows

def recording(part, rows):  # each rank notes the row-split solves it took part in
    with open(os.path.join(os.environ["BPDQ_TEST_SPLIT_DIR"], f"rank-{os.environ['RANK']}.txt"), "a") as f:
        f.write(f"{rows}x{part.shape[1]}:{part.shape[0]}\\n")
    return gather(part, rows)

if os.environ.get("BPDQ_TEST_SPLIT_DIR"):
    distributed.gather_rows = recording
"""

FACTOR_PLUGIN = """
import os
import bpdq.solvers.asymmetric as asymmetric
import bpdq.solvers.sweep as sweep

def counting(module):
    factorise = module.damped_inverse_cholesky

    def counted(build, *args, **kwargs):  # each rank notes the size of every matrix it factorises
        result = factorise(build, *args, **kwargs)
        with open(os.path.join(os.environ["BPDQ_TEST_FACTOR_DIR"], f"rank-{os.environ['RANK']}.txt"), "a") as f:
            f.write(f"{result[0].shape[0]}\\n")
        return result

    module.damped_inverse_cholesky = counted

if os.environ.get("BPDQ_TEST_FACTOR_DIR"):
    counting(asymmetric)
    counting(sweep)
"""

BREAK_PLUGIN = """
import os
import bpdq.shards as shards

read = shards.WeightFiles.read

def unreadable(self, names):  # rank 1 alone cannot read the second decoder layer's shard
    names = list(names)
    if os.environ["RANK"] == "1" and any(n.startswith("model.layers.1.") for n in names):
        raise PermissionError(13, "Permission denied", str(self.directory / "model-00002-of-00005.safetensors"))
    return read(self, names)

shards.WeightFiles.read = unreadable
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ranks(n: int, *args: str, env: dict[str, str] | None = None) -> list[subprocess.CompletedProcess]:
    """``python -m bpdq.cli ARGS`` as ``n`` ranks of one gloo group (as torchrun would start them)."""
    port = str(free_port())
    procs = []
    for r in range(n):
        e = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(torch.get_num_threads()),
                 RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(n), MASTER_ADDR="127.0.0.1", MASTER_PORT=port, **(env or {}))
        procs.append(subprocess.Popen([sys.executable, "-m", "bpdq.cli", *args], env=e, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


def on_two_ranks(worker) -> dict:
    """``worker(rank, port, result)`` run by two processes (which make one gloo group): each one's
    ``result[rank]``."""
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        result = manager.dict()
        mp.spawn(worker, args=(str(free_port()), result), nprocs=2)
        return dict(result)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    src = tiny_model_dir(tmp / "src", "llama", layers=2)
    strategy = tiny_strategy(src, tmp / "one")
    strategy["quantize"]["solver"] = {"type": "gptq"}
    strategy["calibration"]["samples"] = 32  # 4 batches of 8: 2 per rank
    strategy["rules"].append({"match": "lm_head", "grid": {"type": "bitplane", "planes": 3}})
    cfg = tmp / "s.yaml"
    cfg.write_text(yaml.safe_dump(strategy))
    for name, text in (("stop.py", STOP_PLUGIN), ("break.py", BREAK_PLUGIN), ("split.py", SPLIT_PLUGIN),
                       ("factor.py", FACTOR_PLUGIN)):
        (tmp / name).write_text(text)
    bpdq.quantize_model(src, recipe=strategy["quantize"], calibration=strategy["calibration"], rules=strategy["rules"],
                        progress=False, output=tmp / "one")  # the single-process reference
    return tmp, cfg


def test_two_ranks_stop_together_resume_and_match_one_process(setup):
    tmp, cfg = setup
    out = tmp / "two"
    args = ["quantize", str(cfg), "-o", str(out), "--plugin", str(tmp / "stop.py")]
    first = ranks(2, *args, env={"BPDQ_TEST_STOP": "1"})
    assert [p.returncode for p in first] == [130, 130], [p.stderr for p in first]
    assert "stopped after 1 of 2 decoder layers" in first[0].stderr
    assert "stopped after" not in first[1].stderr and " INFO " not in first[1].stderr  # rank 1 logs warnings only
    state = tmp / ".two.bpdq-resume"
    manifest = json.loads((state / "manifest.json").read_text())
    assert manifest["layers_done"] == 1 and manifest["fingerprint"]["world_size"] == 2
    # each rank saved its own 2 batches of the next layer's inputs, under their global numbers
    assert sorted(p.name for p in (state / "inputs-00001").iterdir()) == [f"hidden-{j:05d}.safetensors" for j in range(4)]
    split = tmp / "split"
    split.mkdir()
    second = ranks(2, *args, "--plugin", str(tmp / "split.py"), env={"BPDQ_TEST_SPLIT_DIR": str(split)})
    assert [p.returncode for p in second] == [0, 0], [p.stderr for p in second]
    # GPTQ's rows are independent: the second layer's down_proj (64 x 128; its o_proj is skipped by a rule)
    # and the head (vocabulary x 64) were solved half by each rank
    for r in range(2):
        seen = (split / f"rank-{r}.txt").read_text().split()
        vocab = int(seen[-1].split("x")[0])
        assert seen == ["64x128:32", f"{vocab}x64:{vocab // 2 + (r < vocab % 2)}"]
    assert "checkpoint written to" in second[0].stdout
    assert second[1].stdout == "" and not state.exists()
    # float64 sums of the same per-batch terms, grouped differently, round to the same float32 Hessians
    assert (out / "model.safetensors").read_bytes() == (tmp / "one" / "model.safetensors").read_bytes()
    assert (out / "config.json").read_text() == (tmp / "one" / "config.json").read_text()


def test_bpdq_splits_the_rows_of_lone_linears_over_two_ranks_with_the_one_process_bytes(setup):
    """BPDQ's rows are coupled only by each group's choice of iterate, taken on every row's error gathered
    from both ranks: o_proj, down_proj and the head are solved half by each rank (with asymmetric
    calibration, each of their two factorisations by one rank), and the checkpoint is the single-process one."""
    tmp, symmetric_cfg = setup
    src = tmp / "src"
    strategy = yaml.safe_load(symmetric_cfg.read_text())
    strategy["quantize"]["solver"] = {"type": "bpdq", "iters": 3}
    strategy["calibration"]["asymmetric"] = True
    cfg = tmp / "bpdq.yaml"
    cfg.write_text(yaml.safe_dump(strategy))
    bpdq.quantize_model(src, recipe=strategy["quantize"], calibration=strategy["calibration"], rules=strategy["rules"],
                        progress=False, output=tmp / "bpdq-one")
    split = tmp / "bpdq-split"
    split.mkdir()
    procs = ranks(2, "quantize", str(cfg), "-o", str(tmp / "bpdq-two"), "--plugin", str(tmp / "split.py"),
                  env={"BPDQ_TEST_SPLIT_DIR": str(split)})
    assert [p.returncode for p in procs] == [0, 0], [p.stderr for p in procs]
    for r in range(2):
        seen = (split / f"rank-{r}.txt").read_text().split()
        vocab = int(seen[-1].split("x")[0])
        # o_proj and down_proj of layer 0, the down_proj of layer 1 (its o_proj is skipped by a rule), the head
        assert seen == ["64x64:32", "64x128:32", "64x128:32", f"{vocab}x64:{vocab // 2 + (r < vocab % 2)}"]
    one, two = (tmp / "bpdq-one" / "model.safetensors").read_bytes(), (tmp / "bpdq-two" / "model.safetensors").read_bytes()
    assert two == one


def test_a_failure_on_one_rank_ends_both_with_its_exit_code(setup):
    tmp, cfg = setup
    procs = ranks(2, "quantize", str(cfg), "-o", str(tmp / "broken"), "--plugin", str(tmp / "break.py"))
    assert [p.returncode for p in procs] == [1, 1], [p.stderr for p in procs]
    assert "failed: PermissionError" in procs[1].stderr and "Permission denied" in procs[1].stderr
    assert "failed" not in procs[0].stderr and "Traceback" not in procs[0].stderr  # reported once, by rank 1
    assert not (tmp / "broken").exists() and not any(p.name.startswith(".broken.tmp-") for p in tmp.iterdir())


def test_shares_of_batches_and_of_solves(monkeypatch):
    assert distributed.shard(list(range(5))) == list(range(5)) and distributed.shard_start(5) == 0  # one process
    assert distributed.world_size() == 1 and distributed.rank() == 0 and not distributed.any_rank(False)
    sizes = {"q_proj": 64 * 64, "k_proj": 16 * 64, "v_proj": 16 * 64}
    assert set(distributed.owners(sizes).values()) == {0}
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    assert distributed.owners(sizes) == {"q_proj": 0, "k_proj": 1, "v_proj": 1}  # largest first, least loaded
    assert distributed.owners({"gate": 8, "up": 8, "down": 8}) == {"gate": 0, "up": 1, "down": 0}
    for r, share in ((0, [0, 1, 2]), (1, [3, 4])):  # 5 batches over 2 ranks: the first takes one more
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        assert distributed.shard(list(range(5))) == share and distributed.shard_start(5) == share[0]
    with pytest.raises(ValueError, match="1 calibration batches cannot be shared by 2 processes"):
        distributed.shard([0])


def test_row_shares_and_merged_statistics(monkeypatch):
    assert not distributed.splits_rows(64, True)  # one process: never
    assert distributed.row_share(7) == (0, 7)
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    assert distributed.splits_rows(6, True) and not distributed.splits_rows(5, True)  # each share >= 2 rows
    assert not distributed.splits_rows(64, False)  # a solver whose rows may not be split
    shares = []
    for r in range(3):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        shares.append(distributed.row_share(8))
    assert shares == [(0, 3), (3, 6), (6, 8)]
    parts = [{"proxy_loss": 1.0, "relative_loss": 0.5, "time_s": 2.0, "extra": {"damp": 0.01, "refit": {"rows": 3, "rows_improved": 1}}},
             {"proxy_loss": 3.0, "relative_loss": 0.25, "time_s": 3.0, "extra": {"damp": 0.01, "refit": {"rows": 2, "rows_improved": 2}}}]
    merged = distributed._merged_stats(parts)
    assert merged.proxy_loss == 4.0 and merged.relative_loss == pytest.approx(4.0 / (2.0 + 12.0))
    assert merged.time_s == 3.0 and merged.extra == {"damp": 0.01, "refit": {"rows": 5, "rows_improved": 3}}


@pytest.mark.parametrize("lever,refused", [({"tuning": {"steps": 1}}, "tuning is"), ({"target_bpw": 3.0}, "target_bpw is")],
                         ids=str)
def test_the_levers_are_refused_in_a_distributed_run(lever, refused, monkeypatch):
    from tests.tiny_models import TINY_CALIBRATION, tiny_model, tiny_tokenizer

    # rank 0 of 2, as far as the checks before any work can tell (no group: no collective may run)
    for name, value in (("is_distributed", lambda: True), ("world_size", lambda: 2), ("rank", lambda: 0),
                        ("fail", lambda code=1: None)):
        monkeypatch.setattr(distributed, name, value)
    model = tiny_model(layers=1)
    with pytest.raises(ValueError, match=rf"{refused} not supported in a distributed run \(2"):
        bpdq.quantize_model(model, tiny_tokenizer(), recipe={"group_size": 32, "grid": {"type": "bitplane", "planes": 2},
                            "solver": "gptq"}, calibration=TINY_CALIBRATION, progress=False, **lever)
    assert not any(isinstance(m, bpdq.QuantLinear) for m in model.modules())  # refused before any work


def test_resume_state_on_different_directories_per_rank_is_refused(setup):
    """Node-local state: rank 0 sees a state with a finished layer, rank 1 (another directory) none. Both
    stop before any Hessian is summed, naming the resume state, and neither writes a checkpoint."""
    tmp, cfg = setup
    stop = ranks(2, "quantize", str(cfg), "-o", str(tmp / "local0"), "--plugin", str(tmp / "stop.py"),
                 env={"BPDQ_TEST_STOP": "1"})
    assert [p.returncode for p in stop] == [130, 130], [p.stderr for p in stop]
    assert (tmp / ".local0.bpdq-resume" / "manifest.json").is_file()
    port = str(free_port())
    procs = []
    for r, out in enumerate(("local0", "local1")):  # each rank its own output, so its own state directory
        e = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", RANK=str(r),
                 LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, "-m", "bpdq.cli", "quantize", str(cfg), "-o", str(tmp / out)],
                                      env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    done = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] != [0, 0] and all(p.returncode for p in procs), [d[1] for d in done]
    assert "the ranks disagree on the resume state" in done[1][1] and "rank 1 has 'no resume state'" in done[1][1]
    assert "on a filesystem all ranks share" in done[1][1]
    assert not (tmp / "local0").exists() and not (tmp / "local1").exists()
    assert json.loads((tmp / ".local0.bpdq-resume" / "manifest.json").read_text())["layers_done"] == 1  # kept


def test_an_indexed_cuda_device_is_this_rank_s_or_refused(monkeypatch):
    cuda1 = torch.device("cuda", 1)
    assert distributed.rank_device(cuda1) == cuda1  # one process: as given
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.rank_device(torch.device("cuda")) == cuda1  # each rank its own GPU
    assert distributed.rank_device(cuda1) == cuda1
    assert distributed.rank_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(ValueError, match=r"device 'cuda:0' in a distributed run: .*cuda:LOCAL_RANK \(cuda:1 on this rank\); use device 'cuda' or 'auto'"):
        distributed.rank_device(torch.device("cuda", 0))


def _reduce_worker(r: int, port: str, result) -> None:
    import torch.distributed as dist

    from bpdq.solvers.hessian import HessianAccumulator

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=r, world_size=2)
    try:
        gen = torch.Generator().manual_seed(r)
        accs = [HessianAccumulator(900) for _ in range(2)]  # 900 inputs: several row blocks
        for i, acc in enumerate(accs):
            acc.add(torch.randn(3 + r + i, 900, generator=gen))
        distributed.reduce_hessians(accs, [{1}, {0, 1}])
        result[r] = [(acc.n, acc.hessian if r in dests else None) for acc, dests in zip(accs, [{1}, {0, 1}])]
    finally:
        dist.destroy_process_group()


def test_hessians_are_reduced_onto_their_owners():
    from bpdq.solvers.hessian import HessianAccumulator

    got = on_two_ranks(_reduce_worker)
    refs = []
    for i in range(2):  # the reference: one process accumulating both ranks' inputs
        ref = HessianAccumulator(900)
        for r in range(2):
            gen = torch.Generator().manual_seed(r)
            xs = [torch.randn(3 + r + j, 900, generator=gen) for j in range(2)]
            ref.add(xs[i])
        refs.append(ref)
    for r in range(2):
        for i, (n, H) in enumerate(got[r]):
            assert n == refs[i].n == 7 + 2 * i  # counts reach every rank
            if i == 0 and r == 0:
                assert H is None  # not its owner
            else:
                assert torch.equal(H, refs[i].hessian)


def _asymmetric_pairs(r: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(10 + r)
    pairs = []
    for j in range(2):
        x_q = torch.randn(5 + r + j, 700, generator=gen)
        pairs.append((x_q, x_q + 0.1 * torch.randn(x_q.shape, generator=gen), torch.randn(5 + r + j, 300, generator=gen)))
    return pairs


def _asymmetric_reduce_worker(r: int, port: str, result) -> None:
    import torch.distributed as dist

    from bpdq.solvers.asymmetric import AsymmetricAccumulator

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=r, world_size=2)
    try:
        accs = [AsymmetricAccumulator(700), AsymmetricAccumulator(700, out_features=300)]  # D, and P
        for x_q, x_fp, y in _asymmetric_pairs(r):
            accs[0].add(x_q, x_fp)
            accs[1].add(x_q, x_fp, y)
        distributed.reduce_hessians(accs, [{1}, {0, 1}])
        result[r] = [(acc.n, (acc.hessian, acc.moment) if r in dests else None) for acc, dests in zip(accs, [{1}, {0, 1}])]
    finally:
        dist.destroy_process_group()


def test_asymmetric_sums_are_reduced_onto_their_owners():
    """The cross moments travel with the Hessians, onto the ranks that solve (700 inputs: several blocks)."""
    from bpdq.solvers.asymmetric import AsymmetricAccumulator

    got = on_two_ranks(_asymmetric_reduce_worker)
    refs = [AsymmetricAccumulator(700), AsymmetricAccumulator(700, out_features=300)]  # one process, every batch
    for r in range(2):
        for x_q, x_fp, y in _asymmetric_pairs(r):
            refs[0].add(x_q, x_fp)
            refs[1].add(x_q, x_fp, y)
    for r in range(2):
        for i, (n, sums) in enumerate(got[r]):
            assert n == refs[i].n == 24
            if i == 0 and r == 0:
                assert sums is None  # not its owner
            else:
                assert torch.equal(sums[0], refs[i].hessian)  # float32, as the solvers receive it
                assert torch.allclose(sums[1], refs[i].moment, rtol=1e-12, atol=0)  # float64, summed in another order


def _bpdq_rows_worker(r: int, port: str, result) -> None:
    import torch.distributed as dist

    from bpdq.solvers import BPDQ
    from bpdq.grids import BitPlaneGrid
    from tests.solvers.cases import correlated_hessian, heavy_weight

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=r, world_size=2)
    try:
        W, H = heavy_weight(37, 256, 2), correlated_hessian(256, 2)  # 37 rows: shares of 19 and 18
        r0, r1 = distributed.row_share(37)
        gather = lambda values: distributed.row_values(values, 37)  # noqa: E731
        qw = BPDQ(iters=4)(W[r0:r1], H, BitPlaneGrid(planes=2), 64, row_gather=gather)
        result[r] = (r0, r1, qw.planes, qw.coeffs, qw.stats.best_iters)
    finally:
        dist.destroy_process_group()


def test_bpdq_solves_shares_of_rows_that_gather_each_iterate_s_errors():
    """Each group keeps the iterate that is best over all rows: with every row's error gathered from the
    other rank, two shares of the rows give the one-process planes and coefficients."""
    from bpdq.grids import BitPlaneGrid
    from bpdq.solvers import BPDQ
    from tests.solvers.cases import correlated_hessian, heavy_weight

    got = on_two_ranks(_bpdq_rows_worker)
    one = BPDQ(iters=4)(heavy_weight(37, 256, 2), correlated_hessian(256, 2), BitPlaneGrid(planes=2), 64)
    assert [got[r][:2] for r in range(2)] == [(0, 19), (19, 37)]
    assert torch.equal(torch.cat([got[0][2], got[1][2]], 1), one.planes)
    assert torch.equal(torch.cat([got[0][3], got[1][3]], 2), one.coeffs)
    assert got[0][4] == got[1][4] == one.stats.best_iters and len(set(one.stats.best_iters)) > 1


def _spread_worker(r: int, port: str, result) -> None:
    import torch.distributed as dist

    from bpdq.solvers.sweep import SweepFactor

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=r, world_size=2)
    try:
        def first():  # rank 0's: a transposed view, as a factor is
            return torch.arange(12.0).reshape(3, 4).mT

        def second():  # rank 1's
            return SweepFactor(U=torch.arange(9, dtype=torch.float64).reshape(3, 3), damp=0.1, retries=1, mean_diag=1 / 3)

        ran = []
        got = distributed.spread([lambda: ran.append(0) or first(), lambda: ran.append(1) or second()])
        result[r] = (ran, got[0], got[0].stride(), got[1].U, got[1].damp, got[1].retries, got[1].mean_diag)
    finally:
        dist.destroy_process_group()


def test_each_job_of_a_spread_runs_on_one_rank_and_reaches_every_rank_in_its_layout():
    got = on_two_ranks(_spread_worker)
    for r in range(2):
        ran, t, stride, U, damp, retries, mean_diag = got[r]
        assert ran == [r]
        assert torch.equal(t, torch.arange(12.0).reshape(3, 4).mT) and stride == (1, 4)
        assert U.dtype == torch.float64 and torch.equal(U, torch.arange(9, dtype=torch.float64).reshape(3, 3))
        assert (damp, retries, mean_diag) == (0.1, 1, 1 / 3)


def test_asymmetric_calibration_in_two_ranks_matches_one_process(setup):
    """Each rank carries its share of the full-precision stream; the cross moments are summed over the ranks
    with the Hessians (float64 sums of the same per-batch terms), so the checkpoint is the single-process one.
    ``down_proj`` (the only linear with 128 inputs), whose rows both ranks solve, needs two factorisations per
    layer (its target's and its sweep's): one rank makes each."""
    tmp, symmetric_cfg = setup
    src = tmp / "src"
    strategy = yaml.safe_load(symmetric_cfg.read_text())  # the symmetric runs' strategy, asymmetric
    strategy["calibration"]["asymmetric"] = True
    cfg = tmp / "asym.yaml"
    cfg.write_text(yaml.safe_dump(strategy))
    report = bpdq.quantize_model(src, recipe=strategy["quantize"], calibration=strategy["calibration"],
                                 rules=strategy["rules"], progress=False, output=tmp / "asym-one")
    assert report.asymmetric is not None
    counts = tmp / "factors"
    counts.mkdir()
    args = ["quantize", str(cfg), "-o", str(tmp / "asym-two"), "--plugin", str(tmp / "stop.py"),
            "--plugin", str(tmp / "factor.py")]
    first = ranks(2, *args, env={"BPDQ_TEST_STOP": "1", "BPDQ_TEST_FACTOR_DIR": str(counts)})  # stopped after layer 0
    assert [p.returncode for p in first] == [130, 130], [p.stderr for p in first]
    saved = sorted(p.name for p in (tmp / ".asym-two.bpdq-resume" / "inputs-00001").iterdir())
    assert saved == sorted(f"{s}-{j:05d}.safetensors" for s in ("fp", "hidden") for j in range(4))  # both streams
    procs = ranks(2, *args, env={"BPDQ_TEST_FACTOR_DIR": str(counts)})  # resumed: layer 1
    assert [p.returncode for p in procs] == [0, 0], [p.stderr for p in procs]
    sizes = [(counts / f"rank-{r}.txt").read_text().split() for r in range(2)]
    assert [s.count("128") for s in sizes] == [2, 2], sizes  # one of down_proj's two per layer on each rank
    one, two = (tmp / "asym-one" / "model.safetensors").read_bytes(), (tmp / "asym-two" / "model.safetensors").read_bytes()
    symmetric = (tmp / "one" / "model.safetensors").read_bytes()
    assert two == one and one != symmetric


def test_a_mixture_of_experts_over_three_ranks_matches_one_process(tmp_path):
    """Experts shared out one per rank per round (8 experts over 3 ranks: rounds of 3, 3 and 2), each Hessian
    reduced onto its expert's rank, each quantized projection sent to every rank: the single-process bytes,
    with the default mixed Hessians and experts calibrated on the pooled Hessian alone, after a stop in the
    first layer and a resume."""
    src = tiny_model_dir(tmp_path / "src", "qwen3_moe", layers=2)
    strategy = {"model": str(src), "device": "cpu", "max_shard_size": "40KB",
                "calibration": {"text": "builtin:python-docs", "samples": 24, "seq_len": 32, "seed": 0,
                                "moe_min_tokens": 192},  # the mean number of routed tokens
                "quantize": {"group_size": 32, "grid": {"type": "bitplane", "planes": 2}, "solver": {"type": "gptq"}}}
    cfg = tmp_path / "moe.yaml"
    cfg.write_text(yaml.safe_dump(strategy))
    report = bpdq.quantize_model(src, recipe=strategy["quantize"], calibration=strategy["calibration"],
                                 progress=False, output=tmp_path / "one", max_shard_size="40KB")
    sources = {m.calibration["hessian"] for m in report.modules if m.calibration}
    assert sources == {"mixed", "pooled"}, sources  # both kinds of expert, so both paths are compared
    (tmp_path / "stop.py").write_text(STOP_PLUGIN)
    args = ["quantize", str(cfg), "-o", str(tmp_path / "three"), "--plugin", str(tmp_path / "stop.py")]
    first = ranks(3, *args, env={"BPDQ_TEST_STOP": "1"})  # rank 1 asks for a stop in the first layer
    assert [p.returncode for p in first] == [130, 130, 130], [p.stderr for p in first]
    procs = ranks(3, *args)  # resumed at the second layer
    assert [p.returncode for p in procs] == [0, 0, 0], [p.stderr for p in procs]
    assert "resum" in procs[0].stderr.lower(), procs[0].stderr
    files = sorted(p.name for p in (tmp_path / "one").iterdir() if p.suffix == ".safetensors")
    assert len(files) > 1
    for name in files:
        assert (tmp_path / "three" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
