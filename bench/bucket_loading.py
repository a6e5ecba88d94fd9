"""Loading from a bucket against local disk: the training pipeline over the same ISIC shards.

Starts the local GCS emulator behind the test fault proxy (tests/object_stores.py), converts the
ISIC images (derm_isic_uda1) with the project's converter twice, into a local folder and into a
gs:// bucket, then sets the proxy's latency per request and runs `bench.input_pipeline --data`
over both in a child process. The child is the loader alone: its CPU-seconds leave out the
emulator's and the proxy's, which run in other processes (the emulator) or in this one (the proxy).

Usage (from the repository root):
  .venv/bin/python -m bench.bucket_loading --realdata ../shared/realdata [--latency 0.02] [--seconds 8] [--rounds 3]
"""
from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import tempfile
import time

from tests.object_stores import ObjectStores


def _convert(realdata: pathlib.Path, key: str, out: str, env: dict[str, str]) -> None:
    """ISIC through the converter's CLI (CSV source: benign/malignant labels). Shards of 64 images
    (about 3 MB), because the emulator reads an object whole to answer each ranged read, which at
    the default 1024 would make it, not the loader, the bottleneck; GCS itself does not care."""
    isic = realdata / "derm_isic_uda1"
    subprocess.run([sys.executable, "-m", "data_pipelines.convert", "csv", str(isic / "labels.csv"),
                    "--path-column", "image", "--path-format", "images/{}.jpg", "--label-column", "benign_malignant",
                    "--modality", "derm", "--dataset", "isic", "--out", out, "--id-key-file", key,
                    "--splits", "train=1.0", "--shard-size", "64", "--workers", "1", "--no-progress"],
                   check=True, env=env)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of another process so far (Linux /proc)."""
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--realdata", default=os.environ.get("MERMED_REALDATA", "../shared/realdata"))
    parser.add_argument("--latency", type=float, default=0.02, help="seconds the proxy adds to every request")
    parser.add_argument("--seconds", type=float, default=8.0, help="wall seconds per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--read-threads", type=int, default=2)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        stores = ObjectStores(pathlib.Path(tmp) / "stores")
        env = {**os.environ, **stores.client_env()}
        stores.start()
        try:
            bucket = stores.new_bucket("gs")
            key = os.path.join(tmp, "id.key")
            subprocess.run([sys.executable, "-m", "data_pipelines.convert", "new-key", key], check=True, env=env)
            for out in (os.path.join(tmp, "local"), f"{bucket}/data"):
                _convert(pathlib.Path(args.realdata), key, out, env)
            stores.proxy.latency_s = args.latency
            print(f"# proxy latency {args.latency * 1000:g} ms per request", flush=True)
            emulator = stores.processes[0].pid
            before = stores.proxy.requests, time.process_time(), _cpu_seconds(emulator), time.perf_counter()
            subprocess.run([sys.executable, "-m", "bench.input_pipeline", "--data", os.path.join(tmp, "local", "isic"),
                            f"{bucket}/data/isic", "--seconds", str(args.seconds), "--rounds", str(args.rounds),
                            "--read-threads", str(args.read_threads)], check=True, env=env)
            # What the emulation itself took from the same cores while the loader ran.
            print(f"# during the loader run ({time.perf_counter() - before[3]:.0f} s): "
                  f"{stores.proxy.requests - before[0]} requests, proxy {time.process_time() - before[1]:.1f} CPU-s, "
                  f"emulator {_cpu_seconds(emulator) - before[2]:.1f} CPU-s")
        finally:
            stores.stop()


if __name__ == "__main__":
    main()
