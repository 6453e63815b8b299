"""Helper of scripts/compare_revisions.sh (which see): tiny model directories, the strategy configs of the case
matrix, the quantize runs of one revision, and the byte-for-byte comparison of two revisions' checkpoints.

It never imports bpdq (the revisions under comparison may differ in anything); every run is a
``python -m bpdq.cli quantize`` subprocess of the checkout being tested, with that checkout first on
PYTHONPATH and as its working directory.

    compare_revisions.py models DIR                 tiny random llama/qwen2/qwen3 directories (once)
    compare_revisions.py configs MODELS DIR         the strategy files of the cases
    compare_revisions.py run SRC CONFIGS OUT        every case with the bpdq of checkout SRC
    compare_revisions.py compare OLD NEW            one line per case; exit 0 when all are identical
"""

from __future__ import annotations

import argparse
import concurrent.futures
import filecmp
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

ARCHS = {"llama": 3, "qwen2": 2, "qwen3": 2}  # decoder layers (llama: >= 3, for the interrupted run)
CALIBRATION = {"text": "builtin:python-docs", "samples": 16, "seq_len": 32, "seed": 0}  # 16 = 8 x 2 ranks
RUN_TIMEOUT_S = 900
# Files of a checkpoint directory that hold timings (and the output path): not compared.
UNCOMPARED = {"bpdq_report.json", "bpdq_summary.json"}
STRATEGY_FILE = "strategy.yaml"  # the run's config as saved: the old one's fields must hold the same values


# ----------------------------------------------------------------------------------------------- models


def _calibration_text() -> str:
    """The ``builtin:python-docs`` split of bpdq.calibration (Python's pydoc_data topics), rebuilt here."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    test_names = names[3::4]
    test_paras = [p for n in test_names for p in topics[n].strip().split("\n\n")]
    taken, held = set(test_paras), set(test_names)
    return "\n\n".join(p for n in names if n not in held for p in topics[n].strip().split("\n\n") if p not in taken)


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=["<unk>", "<eos>"], show_progress=False)
    tok.train_from_iterator([_calibration_text()[:200_000]], trainer)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


def make_models(directory: Path) -> None:
    import torch
    import transformers

    torch.set_num_threads(1)
    tokenizer = _tokenizer()
    for seed, (arch, layers) in enumerate(ARCHS.items()):
        family = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3"}[arch]
        extra = {"head_dim": 16} if arch == "qwen3" else {}
        config = getattr(transformers, f"{family}Config")(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
            **extra,
        )
        model_cls = getattr(transformers, f"{family}ForCausalLM")
        config.architectures = [model_cls.__name__]
        torch.manual_seed(seed)
        model = model_cls(config).to(torch.float32).eval()
        model.save_pretrained(directory / arch, max_shard_size="100KB")
        tokenizer.save_pretrained(directory / arch)


# ---------------------------------------------------------------------------------------------- configs


def _strategy(model: Path, quantize: dict, rules: list | None = None, **top) -> dict:
    data = {"model": str(model), "calibration": dict(CALIBRATION), "quantize": quantize, "rules": rules or [],
            "device": "cpu"}
    for key, value in top.items():
        if key == "calibration":
            data["calibration"].update(value)
        else:
            data[key] = value
    return data


def cases(models: Path) -> dict[str, dict]:
    """Case name -> {"strategy": ..., "kind": plain|resume|dist, "like": case it must equal in one revision}."""
    out: dict[str, dict] = {}
    down = r"model\.layers\.\d+\.mlp\.down_proj"
    for arch in ARCHS:
        m = models / arch
        iters = 20 if arch == "llama" else 3  # llama's bpdq is slow enough to interrupt between layers
        out[f"{arch}-rtn"] = {"strategy": _strategy(
            m, {"group_size": 32, "grid": {"type": "bitplane", "planes": 2}, "solver": {"type": "rtn"}},
            [{"match": down, "grid": {"type": "uniform", "bits": 4}},
             {"match": r"model\.layers\.1\.self_attn\.o_proj", "skip": True}])}
        out[f"{arch}-gptq"] = {"strategy": _strategy(
            m, {"group_size": 32, "grid": {"type": "uniform", "bits": 3}, "solver": {"type": "gptq", "damp": 0.01}},
            [{"match": down, "group_size": 64}])}
        out[f"{arch}-bpdq"] = {"strategy": _strategy(
            m, {"group_size": 32, "grid": {"type": "bitplane", "planes": 2}, "solver": {"type": "bpdq", "iters": iters}},
            [{"match": down, "grid": {"type": "bitplane", "planes": 3}}])}
    bpdq = out["llama-bpdq"]["strategy"]
    out["llama-bpdq-asym"] = {"strategy": {**bpdq, "calibration": {**bpdq["calibration"], "asymmetric": True}}}
    out["llama-bpdq-tuned"] = {"strategy": {**bpdq, "tuning": {"steps": 2}}}
    out["llama-bpdq-bpw"] = {"strategy": {**bpdq, "rules": [], "target_bpw": 4.0}}  # 1..4 planes at g32: 2..6.5
    out["llama-bpdq-offload"] = {"strategy": {**bpdq, "calibration": {**bpdq["calibration"], "offload": "1KB"}}}
    out["llama-bpdq-resume"] = {"strategy": bpdq, "kind": "resume", "like": "llama-bpdq"}
    out["llama-gptq-dist2"] = {"strategy": out["llama-gptq"]["strategy"], "kind": "dist", "like": "llama-gptq"}
    return out


def write_configs(models: Path, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    table = {}
    for name, case in cases(models).items():
        path = directory / f"{name}.yaml"
        path.write_text(yaml.safe_dump(case["strategy"], sort_keys=False), encoding="utf-8")
        table[name] = {"config": str(path), "kind": case.get("kind", "plain"), "like": case.get("like")}
    (directory / "cases.json").write_text(json.dumps(table, indent=1) + "\n", encoding="utf-8")


# ------------------------------------------------------------------------------------------------- runs


def _env(src: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(src)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    return env


_LIVE: set[subprocess.Popen] = set()  # runs in progress (each in a session of its own): ended on an interrupt
_STOPPING = threading.Event()


def _start(cmd: list[str], src: Path, log) -> subprocess.Popen:
    if _STOPPING.is_set():
        raise RuntimeError("interrupted")
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    p = subprocess.Popen(cmd, cwd=src, env=_env(src), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    _LIVE.add(p)
    return p


def _kill_live() -> None:
    _STOPPING.set()
    for p in list(_LIVE):
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except OSError:
            pass


def _wait(p: subprocess.Popen, log) -> int:
    try:
        rc = p.wait(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        rc = p.wait()
        log.write(f"timed out after {RUN_TIMEOUT_S} s\n")
    _LIVE.discard(p)
    log.write(f"exit {rc}\n")
    log.flush()
    return rc


def _quantize(config: str, output: Path) -> list[str]:
    return ["-m", "bpdq.cli", "quantize", config, "--output", str(output), "--overwrite"]


def _manifest(output: Path) -> dict | None:
    path = output.parent / f".{output.name}.bpdq-resume" / "manifest.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # absent, or replaced while read


def run_case(python: str, src: Path, name: str, case: dict, out: Path) -> dict:
    """Run one case; its checkpoint goes to ``out/ckpt/NAME``, its log to ``out/logs/NAME.log``."""
    output = out / "ckpt" / name
    result: dict = {"ok": False, "note": ""}
    t0 = time.monotonic()
    with open(out / "logs" / f"{name}.log", "w", encoding="utf-8") as log:
        if case["kind"] == "dist":
            cmd = [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                   *_quantize(case["config"], output)]
            result["ok"] = _wait(_start(cmd, src, log), log) == 0
            if not result["ok"]:  # once more: a rendezvous port taken by another process fails a run now and then
                log.flush()
                result["first_try"] = Path(log.name).read_text(encoding="utf-8", errors="replace").splitlines()[-25:]
                log.write("[compare] the distributed run failed; trying once more\n")
                result["ok"] = _wait(_start(cmd, src, log), log) == 0
                result["note"] = "passed on a second try" if result["ok"] else "failed twice"
        elif case["kind"] == "resume":
            result.update(_interrupted(python, src, case["config"], output, log))
        else:
            result["ok"] = _wait(_start([python, *_quantize(case["config"], output)], src, log), log) == 0
    result["time_s"] = round(time.monotonic() - t0, 1)
    return result


def _interrupted(python: str, src: Path, config: str, output: Path, log) -> dict:
    """SIGTERM once the resume state counts a finished layer, then the same command again."""
    p = _start([python, *_quantize(config, output)], src, log)
    signalled = None
    while p.poll() is None:
        if signalled is None:
            manifest = _manifest(output)
            if manifest and int(manifest.get("layers_done", 0)) >= 1:
                p.send_signal(signal.SIGTERM)
                signalled = int(manifest["layers_done"])
                log.write(f"[compare] SIGTERM sent with {signalled} layer(s) saved\n")
                log.flush()
        time.sleep(0.005)
    rc = _wait(p, log)
    manifest = _manifest(output)
    if rc == 130 and manifest is not None:
        model = Path(yaml.safe_load(Path(config).read_text(encoding="utf-8"))["model"])
        layers = json.loads((model / "config.json").read_text(encoding="utf-8"))["num_hidden_layers"]
        note = f"stopped after {manifest['layers_done']} of {layers} layers"
    elif rc == 0:
        note = "finished before the signal" if signalled is not None else "finished before a layer was saved (no signal)"
    else:
        return {"ok": False, "note": f"interrupted run exited {rc}"}
    start = log.tell()
    rc = _wait(_start([python, *_quantize(config, output)], src, log), log)
    if rc != 0:
        return {"ok": False, "note": note + f"; the rerun exited {rc}"}
    if manifest is not None:
        log.flush()
        with open(log.name, encoding="utf-8", errors="replace") as f:
            f.seek(start)
            resumed = "resuming after" in f.read()
        note += ", resumed" if resumed else ", rerun (no 'resuming after' line in its log)"
    return {"ok": True, "note": note}


def run_all(python: str, src: Path, configs: Path, out: Path, jobs: int) -> int:
    table = json.loads((configs / "cases.json").read_text(encoding="utf-8"))
    (out / "ckpt").mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    results = {}
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM ends the runs in progress as Ctrl-C does
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=jobs)
    try:
        futures = {pool.submit(run_case, python, src, n, c, out): n for n, c in table.items()}
        for f in concurrent.futures.as_completed(futures):
            name = futures[f]
            results[name] = f.result()
            r = results[name]
            status = "ok" if r["ok"] else "FAILED (log: " + str(out / "logs" / f"{name}.log") + ")"
            print(f"  {name:<22} {status}  {r['time_s']} s{'  [' + r['note'] + ']' if r['note'] else ''}", flush=True)
            if not r["ok"] or r.get("first_try"):
                tail = r.get("first_try") or (out / "logs" / f"{name}.log").read_text(
                    encoding="utf-8", errors="replace").splitlines()[-25:]
                print("\n".join("    | " + line for line in tail), flush=True)
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        _kill_live()
        raise
    pool.shutdown()
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    return 0


# ------------------------------------------------------------------------------------------- comparison


def _files(d: Path) -> set[str]:
    return {str(p.relative_to(d)) for p in d.rglob("*") if p.is_file()} if d.is_dir() else set()


def _untimed(value):
    """A run report without its timings (keys that name a time)."""
    if isinstance(value, dict):
        return {k: _untimed(v) for k, v in value.items() if not (k == "time" or k.endswith("time_s") or k == "elapsed")}
    if isinstance(value, list):
        return [_untimed(v) for v in value]
    return value


def _report_paths(a, b, path: str = "") -> list[str]:
    """Where two untimed reports differ (the first few JSON paths)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [p for k in sorted(set(a) | set(b), key=str)
                for p in (_report_paths(a.get(k), b.get(k), f"{path}.{k}") if k in a and k in b else [f"{path}.{k}"])]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [p for i, (x, y) in enumerate(zip(a, b)) for p in _report_paths(x, y, f"{path}[{i}]")]
    return [] if a == b else [path or "."]


def report_note(a: Path, b: Path) -> str:
    """Not part of the verdict: where the run reports differ beyond timings (proxy losses, allocation...)."""
    try:
        ra, rb = (_untimed(json.loads((d / "bpdq_report.json").read_text(encoding="utf-8"))) for d in (a, b))
    except (OSError, ValueError):
        return ""
    paths = _report_paths(ra, rb)
    if not paths:
        return ""
    return f"bpdq_report.json differs beyond timings at {', '.join(paths[:3])}{' ...' if len(paths) > 3 else ''}"


def _contains(new, old) -> bool:
    """Whether config ``new`` holds every field of ``old`` with the same value (a newer revision may save
    fields the older one did not have)."""
    if isinstance(old, dict) and isinstance(new, dict):
        return all(k in new and _contains(new[k], v) for k, v in old.items())
    return new == old


def differing(a: Path, b: Path) -> list[str]:
    """Files of checkpoint directories ``a`` and ``b`` that differ (or exist on one side only)."""
    fa, fb = _files(a) - UNCOMPARED, _files(b) - UNCOMPARED
    if not any(f.endswith(".safetensors") for f in fa) or not any(f.endswith(".safetensors") for f in fb):
        return ["(no checkpoint)"]
    diff = sorted((fa ^ fb))
    for f in sorted(fa & fb):
        if f == STRATEGY_FILE:
            ta = yaml.safe_load((a / f).read_text(encoding="utf-8").replace(str(a), "<OUTPUT>"))
            tb = yaml.safe_load((b / f).read_text(encoding="utf-8").replace(str(b), "<OUTPUT>"))
            same = _contains(tb, ta)
        else:
            same = filecmp.cmp(a / f, b / f, shallow=False)
        if not same:
            diff.append(f)
    return diff


def compare(old: Path, new: Path, configs: Path) -> int:
    table = json.loads((configs / "cases.json").read_text(encoding="utf-8"))
    res = {side: json.loads((d / "results.json").read_text(encoding="utf-8")) for side, d in (("old", old), ("new", new))}
    checks = []  # (label, [(side, case)] x 2, note)
    for name, case in table.items():
        note = "; ".join(f"{side}: {res[side][name]['note']}" for side in ("old", "new") if res[side][name]["note"])
        checks.append((name, ("old", name), ("new", name), note))
        if case["like"]:
            for side in ("old", "new"):
                checks.append((f"{name}={case['like']}/{side}", (side, name), (side, case["like"]), ""))
    n_diff = 0
    width = max(len(c[0]) for c in checks)
    for label, (sa, ca), (sb, cb), note in checks:
        failed = [f"{s} run of {c} failed" for s, c in ((sa, ca), (sb, cb)) if not res[s][c]["ok"]]
        failed = list(dict.fromkeys(failed))
        if failed:
            line = f"DIFFERENT ({'; '.join(failed)})"
        else:
            da, db = (old if sa == "old" else new) / "ckpt" / ca, (old if sb == "old" else new) / "ckpt" / cb
            files = differing(da, db)
            line = f"DIFFERENT ({' '.join(files)})" if files else "identical"
            note = "; ".join(n for n in (note, report_note(da, db)) if n)
        n_diff += line != "identical"
        print(f"{label:<{width}}  {line}{'  [' + note + ']' if note else ''}")
    print(f"{len(checks)} cases: all identical" if not n_diff else f"{len(checks)} cases: {n_diff} differ")
    return 1 if n_diff else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("models").add_argument("dir", type=Path)
    p = sub.add_parser("configs")
    p.add_argument("models", type=Path)
    p.add_argument("dir", type=Path)
    p = sub.add_parser("run")
    p.add_argument("src", type=Path)
    p.add_argument("configs", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--python", default=sys.executable)
    p = sub.add_parser("compare")
    p.add_argument("old", type=Path)
    p.add_argument("new", type=Path)
    p.add_argument("configs", type=Path)
    args = ap.parse_args(argv)
    if args.cmd == "models":
        make_models(args.dir)
        return 0
    if args.cmd == "configs":
        write_configs(args.models.resolve(), args.dir.resolve())
        return 0
    if args.cmd == "run":
        return run_all(args.python, args.src.resolve(), args.configs.resolve(), args.out.resolve(), max(1, args.jobs))
    return compare(args.old.resolve(), args.new.resolve(), args.configs.resolve())


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("compare_revisions: interrupted", file=sys.stderr)
        sys.exit(130)
