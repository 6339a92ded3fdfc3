"""Training throughput, input stall and memory, every figure a ratio to a baseline of the same run.

    .venv/bin/python -m benchmarks.bench_train [--size demo|production] [--pairs 240]
        [--repeats 3] [--fusions early,mid,late] [--scale 10] [--smoke]
        [--out benchmarks/results/train.json]

Data: the synthetic benchmark (`tasks/data/synthetic.py`) written to a local folder standing in
for the bucket, then the product's own manifest and feature shards (`build_features`). Sizes as
in benchmarks/bench_stream.py: production = `config/config.yaml`'s 224 px images and 128 x 128
log-mels, demo = `config/demo.yaml`'s 64 px and 64 x 64. Measured (medians of `--repeats`):

  stall        per fusion, one training epoch through the product's loop (`train_one_epoch`) on
               the product's `DeepfakeDataset` (shards read by its prefetch thread, samples
               augmented in `read_ahead`'s thread while the step runs, as `fit` trains):
               the share of the epoch spent waiting for the next batch (`data_s` of the step
               rows), and the epoch's time against a pure-compute epoch: the same model from the
               same seed, the same samples already in memory as tensors;
  concurrency  the three fusions' total training throughput (samples/s over one epoch each)
               trained one after the other (`training.concurrency` 1) and as `train_here` plans
               them ("auto": `plan_concurrency`, threads of one process), the latter also with
               torch's threads shared out between the trainings (cores / trainings each);
  memory       peak RSS of preprocessing (`build_features`: this process and, separately, its
               decode processes) and of training (one epoch of every fusion, as planned), each in
               a fresh process, at `--pairs` and at `--scale` times as many, against
               `memory.cap` of the machine's memory.

The table goes to stdout, every figure to `--out`. `--smoke` runs a tiny version (what the test
suite checks; its figures mean nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

SIZES = {
    "production": {"n_mels": 128, "spec_frames": 128, "image_size": 224},
    "demo": {"n_mels": 64, "spec_frames": 64, "image_size": 64},
}
ROOT = Path(__file__).resolve().parents[1]


def config(size: str, folder: Path, fusions: list[str], **training: Any) -> Any:
    from config.load import validate_config

    return validate_config(
        {
            "storage": {"uri": str(folder)},
            "data": SIZES[size],
            # every step a step-log row, so the rows' data_s add up to the whole epoch's wait
            "training": {"fusions": fusions, "log_every": 1, "device": "cpu", **training},
        }
    )


def prepare(cfg: Any, pairs: int) -> Any:
    """Write the benchmark into the folder of `cfg` and build its features; the FeatureRef."""
    from tasks.data import manifest as manifest_mod
    from tasks.data import synthetic
    from tasks.data.features import build_features
    from tasks.io.layout import Layout
    from tasks.io.storage import open_storage

    Path(cfg.storage.uri).mkdir(parents=True, exist_ok=True)
    store, layout = open_storage(cfg.storage), Layout.from_config(cfg.storage)
    if not list(store.list(layout.dataset)):
        synthetic.generate(store, layout, pairs, seed=1234, workers=4)
    ref = manifest_mod.build_manifest(store, layout, cfg.data, cfg.run.seed, "bench")
    return build_features(store, layout, cfg.data, ref)


class Trainer:
    """One fusion's model, optimizer and loop pieces, built as `fit` builds them."""

    def __init__(self, cfg: Any, features: Any, fusion: str) -> None:
        import torch

        from models import build_model, seeded_init, use_generator
        from tasks.train.checkpoint import TrainState
        from tasks.train.fit import fusion_seed, make_datasets, make_guard, make_optimizer
        from tasks.train.objective import Objective

        self.cfg, self.fusion = cfg, fusion
        self.train_data, _ = make_datasets(cfg, features)
        self.objective = Objective.build(cfg.training, features.emotions, features.counts["train"])
        seed = fusion_seed(cfg.run.seed, fusion)
        generator = torch.Generator().manual_seed(seed)
        with seeded_init(seed):
            self.model = build_model(fusion, cfg, None, n_emotions=self.objective.n_emotions)
        use_generator(self.model, generator)
        self.optimizer = make_optimizer(self.model, cfg.training)
        self.scaler = torch.amp.GradScaler("cpu", enabled=False)
        self.guard = make_guard(cfg, self.model, TrainState(), _memory_percent)

    def epoch(self, samples: Any = None) -> tuple[float, float, int]:
        """One epoch over `samples` (default: the streamed dataset, read ahead in a thread as
        `fit` reads it): (seconds, data wait, n)."""
        import torch

        from tasks.data.shards import read_ahead
        from tasks.train.fit import read_ahead_depth
        from tasks.train.loop import train_one_epoch

        self.train_data.set_epoch(1)
        streamed = read_ahead(self.train_data, read_ahead_depth(self.cfg.training))
        started = time.perf_counter()
        result = train_one_epoch(
            self.model,
            streamed if samples is None else iter(samples),
            self.optimizer,
            self.scaler,
            self.guard,
            torch.device("cpu"),
            self.cfg.training,
            self.objective,
            fusion=self.fusion,
            epoch=1,
            n_train=len(self.train_data),
        )
        seconds = time.perf_counter() - started
        waited = sum(row["data_s"] for row in result.steps)
        return seconds, waited, len(self.train_data)


def _memory_percent() -> float:
    import psutil

    return float(psutil.virtual_memory().percent)


def stall(cfg: Any, features: Any, fusion: str, repeats: int) -> dict[str, Any]:
    """Streamed epoch against a pure-compute epoch of the same model, seed and samples."""
    streamed, computed, shares = [], [], []

    def streamed_epoch() -> None:
        seconds, waited, _ = Trainer(cfg, features, fusion).epoch()
        streamed.append(seconds)
        shares.append(waited / seconds)

    def computed_epoch() -> None:
        trainer = Trainer(cfg, features, fusion)
        trainer.train_data.set_epoch(1)
        in_memory = list(trainer.train_data)  # decoded once, outside the timing
        seconds, _, _ = trainer.epoch(in_memory)
        computed.append(seconds)

    for repeat in range(repeats):  # each side first in every other repeat: no warm-up bias
        for epoch in (streamed_epoch, computed_epoch)[:: 1 if repeat % 2 == 0 else -1]:
            epoch()
    s, c = statistics.median(streamed), statistics.median(computed)
    return {
        "streamed_s": s,
        "pure_compute_s": c,
        "step_vs_pure_compute": s / c,
        "stall_share": statistics.median(shares),
        "runs": {"streamed_s": streamed, "pure_compute_s": computed, "stall_share": shares},
    }


def concurrency(cfg: Any, features: Any, fusions: list[str], repeats: int) -> dict[str, Any]:
    """Total samples/s of one epoch per fusion, one at a time against the planned concurrency."""
    from tasks.train.memory import plan_concurrency

    planned = plan_concurrency(cfg, len(fusions))

    import torch

    default_threads = torch.get_num_threads()
    shared = max(1, default_threads // planned)  # the cores shared out between the trainings

    def run(at_once: int, threads: int) -> float:
        trainers = [Trainer(cfg, features, f) for f in fusions]
        torch.set_num_threads(threads)
        try:
            started = time.perf_counter()
            with ThreadPoolExecutor(max_workers=at_once, thread_name_prefix="bench-train") as pool:
                counts = [n for _, _, n in pool.map(lambda t: t.epoch(), trainers)]
            return sum(counts) / (time.perf_counter() - started)
        finally:
            torch.set_num_threads(default_threads)

    one = [run(1, default_threads) for _ in range(repeats)]
    auto = [run(planned, default_threads) for _ in range(repeats)]
    split = [run(planned, shared) for _ in range(repeats)]
    o, a, t = statistics.median(one), statistics.median(auto), statistics.median(split)
    return {
        "planned": planned,
        "torch_threads": default_threads,
        "shared_threads": shared,
        "one_at_a_time_samples_per_s": o,
        "auto_samples_per_s": a,
        "auto_shared_threads_samples_per_s": t,
        "auto_vs_one": a / o,
        "auto_shared_threads_vs_one": t / o,
        "runs": {"one": one, "auto": auto, "auto_shared_threads": split},
    }


def peak_rss(stage: str, cfg: Any, features: Any | None = None) -> dict[str, float]:
    """Peak RSS (MB) of `stage` ("features" or "train") run in a fresh process."""
    args = [sys.executable, "-m", "benchmarks.bench_train", "--child", stage, cfg.model_dump_json()]
    if features is not None:
        args.append(features.model_dump_json())
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{stage} child failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def child(stage: str, cfg_json: str, features_json: str | None) -> None:
    """The measured process of `peak_rss`: prints its figures as the last line of stdout."""
    from config.load import validate_config
    from tasks.refs import FeatureRef

    cfg = validate_config(json.loads(cfg_json))
    sampler = ChildrenSampler()
    if stage == "features":
        ref = prepare(cfg, 0)
        out = {"features": ref.model_dump(mode="json")}
    else:
        from tasks.train.memory import plan_concurrency

        features = FeatureRef.model_validate_json(features_json or "")
        fusions = list(cfg.training.fusions)
        at_once = plan_concurrency(cfg, len(fusions))
        trainers = [Trainer(cfg, features, f) for f in fusions]
        with ThreadPoolExecutor(max_workers=at_once) as pool:
            list(pool.map(lambda t: t.epoch(), trainers))
        out = {}
    out["rss_mb"] = _hwm_mb()
    out["children_rss_mb"] = sampler.stop()
    print(json.dumps(out))


def _hwm_mb() -> float:
    """This process's peak RSS (VmHWM: its own address space's, unlike `ru_maxrss`, which a
    process started by fork + exec inherits from its parent)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("/proc/self/status has no VmHWM line")


class ChildrenSampler:
    """The peak of the summed RSS of this process's children (the decode processes), sampled
    every `every_s` in a thread: they are gone, with their own peaks, when the stage ends."""

    def __init__(self, every_s: float = 0.05) -> None:
        import psutil

        self.peak = 0.0
        self._done = threading.Event()
        me = psutil.Process()

        def sample() -> None:
            while not self._done.wait(every_s):
                total = 0
                for proc in me.children(recursive=True):
                    try:
                        total += proc.memory_info().rss
                    except psutil.Error:
                        pass
                self.peak = max(self.peak, total / 2**20)

        self._thread = threading.Thread(target=sample, name="rss-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> float:
        self._done.set()
        self._thread.join()
        return self.peak


def memory(size: str, root: Path, fusions: list[str], pairs: int, scale: int) -> dict[str, Any]:
    """Peak RSS of preprocessing and training at `pairs` and `scale` x `pairs`."""
    import psutil

    from tasks.data import synthetic
    from tasks.io.layout import Layout
    from tasks.io.storage import open_storage
    from tasks.refs import FeatureRef

    figures: dict[str, Any] = {}
    for n in (pairs, scale * pairs):
        folder = root / f"rss-{n}"
        cfg = config(size, folder, fusions)
        folder.mkdir(parents=True)
        synthetic.generate(
            open_storage(cfg.storage), Layout.from_config(cfg.storage), n, seed=1234, workers=4
        )
        pre = peak_rss("features", cfg)
        features = FeatureRef.model_validate(pre.pop("features"))
        figures[str(n)] = {"preprocessing": pre, "training": peak_rss("train", cfg, features)}
        shutil.rmtree(folder, ignore_errors=True)
    small, large = figures[str(pairs)], figures[str(scale * pairs)]
    cap_mb = psutil.virtual_memory().total / 2**20 * config(size, root, fusions).memory.cap
    return {
        "by_pairs": figures,
        "cap_mb": cap_mb,
        "preprocessing_ratio": large["preprocessing"]["rss_mb"] / small["preprocessing"]["rss_mb"],
        "decode_processes_ratio": large["preprocessing"]["children_rss_mb"]
        / max(small["preprocessing"]["children_rss_mb"], 1e-9),
        "training_ratio": large["training"]["rss_mb"] / small["training"]["rss_mb"],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="demo")
    parser.add_argument("--pairs", type=int, default=240)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fusions", default="early,mid,late")
    parser.add_argument("--scale", type=int, default=10, help="memory: this many times the pairs")
    parser.add_argument("--smoke", action="store_true", help="a tiny run that only checks it works")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train.json"))
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        stage, cfg_json, *rest = args.child
        child(stage, cfg_json, rest[0] if rest else None)
        return {}
    if args.smoke:
        args.pairs, args.repeats, args.scale, args.fusions = 40, 1, 2, "mid"
    fusions = args.fusions.split(",")
    root = Path(tempfile.mkdtemp(prefix="bench-train-"))
    report: dict[str, Any] = {
        "machine": {
            "cpus": len(os.sched_getaffinity(0)),
            "cpu": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "loadavg_at_start": os.getloadavg(),
        },
        "size": args.size,
        "pairs": args.pairs,
        "repeats": args.repeats,
    }
    try:
        cfg = config(args.size, root / "data", fusions)
        features = prepare(cfg, args.pairs)
        report["stall"] = {}
        for fusion in fusions:
            row = stall(cfg, features, fusion, args.repeats)
            report["stall"][fusion] = row
            print(
                f"{args.size} {fusion:5s}  input stall {row['stall_share']:6.1%} of the epoch  "
                f"epoch {row['streamed_s']:6.1f} s vs pure compute {row['pure_compute_s']:6.1f} s"
                f" ({row['step_vs_pure_compute']:.2f}x)",
                flush=True,
            )
        conc = concurrency(cfg, features, fusions, args.repeats)
        report["concurrency"] = conc
        print(
            f"{args.size} concurrency  one at a time {conc['one_at_a_time_samples_per_s']:6.1f} "
            f"samples/s, auto ({conc['planned']} at once) {conc['auto_samples_per_s']:6.1f} "
            f"samples/s ({conc['auto_vs_one']:.2f}x), auto with {conc['shared_threads']} torch "
            f"thread(s) each {conc['auto_shared_threads_samples_per_s']:6.1f} samples/s "
            f"({conc['auto_shared_threads_vs_one']:.2f}x)",
            flush=True,
        )
        mem = memory(args.size, root, fusions, args.pairs, args.scale)
        report["memory"] = mem
        small, large = (
            mem["by_pairs"][str(args.pairs)],
            mem["by_pairs"][str(args.scale * args.pairs)],
        )
        pre = [small["preprocessing"], large["preprocessing"]]
        train = [small["training"], large["training"]]
        print(
            f"{args.size} peak RSS for {args.scale}x the pairs: preprocessing "
            f"{pre[0]['rss_mb']:.0f} -> {pre[1]['rss_mb']:.0f} MB "
            f"({mem['preprocessing_ratio']:.2f}x), its decode processes "
            f"{pre[0]['children_rss_mb']:.0f} -> {pre[1]['children_rss_mb']:.0f} MB "
            f"({mem['decode_processes_ratio']:.2f}x), training {train[0]['rss_mb']:.0f} -> "
            f"{train[1]['rss_mb']:.0f} MB ({mem['training_ratio']:.2f}x); "
            f"cap {mem['cap_mb']:.0f} MB",
            flush=True,
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report["machine"]["loadavg_at_end"] = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
