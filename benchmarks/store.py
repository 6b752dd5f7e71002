"""Speed of the explanation store, without a model: reading a synthetic folder back, and starting a resume.

    python -m benchmarks.store                      # load_explanations over 10,000 stored images (32 px), best of 3
    python -m benchmarks.store --resume 100000      # open_index over 100,000 records in a fresh process: time, RSS

The folder is written by `delib_jax.testing.store.synthetic_folder` (the job's own `ShardWriter`, random arrays of
the right shapes), so the same command measures any version of the store (e.g. a checkout of an older commit on
PYTHONPATH). ``--resume`` times what a resumed job does before its first batch: `open_index` (every record parsed
and checked, every shard it names read) and the membership test of every input, in a subprocess whose peak RSS
(VmHWM, ``ru_maxrss`` without what the parent's fork leaves in it) is reported
before and after.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
import json, sys, time
from pathlib import Path
from delib_jax import store as st

directory, n = Path(sys.argv[1]), int(sys.argv[2])
sources = [f"/data/img_{i:06d}.jpg" for i in range(n)]
def peak_mb():  # VmHWM: this process's peak RSS (ru_maxrss would carry the forking parent's over exec)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024

before = peak_mb()
t, c = time.perf_counter(), time.process_time()
done = st.open_index(directory, 0, keep=lambda r: "skipped" in r or (directory / r["shard"]).is_file(),
                     report=lambda m: print(m, file=sys.stderr))
if isinstance(done, tuple):  # the store before the compact resume: (records by source, next shard)
    done = done[0]
todo = [s for s in sources if s not in done]
seconds, cpu = time.perf_counter() - t, time.process_time() - c
after = peak_mb()
print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "peak_rss_before_mb": before, "peak_rss_after_mb": after,
                  "done": len(done), "todo": len(todo)}))
"""


def read_rate(images: int, crop: int, repeats: int) -> dict:
    """Images per second of `load_explanations` over a synthetic folder (best of ``repeats`` full passes), by the
    wall clock and by this process's CPU time (steadier on a shared machine)."""
    import delib_jax
    from delib_jax.testing.store import synthetic_folder

    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "out"
        c = time.process_time()
        synthetic_folder(out, images=images, shard_size=256, crop=crop)
        write_cpu = time.process_time() - c  # random arrays, records and the writer
        size = sum(p.stat().st_size for p in (out / "explanations").iterdir())
        times, cpu = [], []
        for _ in range(repeats):
            t, c = time.perf_counter(), time.process_time()
            count = sum(1 for _ in delib_jax.load_explanations(out))
            times.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
        assert count == images, count
    return {"images": images, "crop": crop, "stored_mb": size / 1e6, "seconds": times, "cpu_seconds": cpu,
            "img_s": images / min(times), "img_per_cpu_s": images / min(cpu),
            "write_cpu_s": write_cpu}  # fmt: skip


def resume_start(images: int, crop: int) -> dict:
    """A resume's start over ``images`` records, measured in a fresh process."""
    from delib_jax.testing.store import synthetic_folder

    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "out"
        t = time.perf_counter()
        synthetic_folder(out, images=images, shard_size=256, crop=crop)
        built = time.perf_counter() - t
        index = out / "explanations" / "index-00000.jsonl"
        done = subprocess.run([sys.executable, "-c", CHILD, str(out / "explanations"), str(images)],
                              capture_output=True, text=True, check=True)  # fmt: skip
        result = json.loads(done.stdout.strip().splitlines()[-1])
        return {"images": images, "index_mb": index.stat().st_size / 1e6, "build_s": built, **result}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=10_000, help="stored images read back (default: 10000)")
    p.add_argument("--crop", type=int, default=32, help="image (mask) size in pixels (default: 32)")
    p.add_argument("--repeats", type=int, default=3, help="full passes; the best is reported (default: 3)")
    p.add_argument("--resume", type=int, metavar="N", help="time a resume's start over N records instead")
    args = p.parse_args(argv)
    if args.resume:
        print(json.dumps(resume_start(args.resume, args.crop)))
    else:
        print(json.dumps(read_rate(args.images, args.crop, args.repeats)))


if __name__ == "__main__":
    main()
