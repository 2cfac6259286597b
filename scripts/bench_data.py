"""Sharded pre-tokenization at scale: throughput, memory, and the first training batches (issue 13's data targets).

For each size: generate FineWeb-like text (JSON lines, documents of a few KB of words drawn from a fixed
vocabulary, Zipf-distributed; or --kind txt: a directory of .txt files, one per document), then run `minitx-prepare`
as a subprocess on one CPU (num_proc=1), and on --cores CPUs with each of --procs (num_proc=1: the tokenizer's own
threads; 2: processes), each with a fresh datasets cache and token cache. It reports MB/s of text (whole command, and
encoding alone: the log's tokenizing time less building the tokenizer) and the peak RSS of the whole process tree
(polled every 50 ms from /proc; also its anonymous part, which leaves out pages of memory-mapped files: the Arrow
cache and the shards, page cache the kernel can drop). Then, from the prepared shards and from one memmap file of
the same tokens, the time for a training stream (RandomWindows) to draw its first batch and its first 100 (the
shards were just written: their pages are in the page cache, as after any preparation).

    python scripts/bench_data.py --sizes 100MB 1GB          # the lead's measurement, on a quiet machine
    python scripts/bench_data.py --sizes 5MB                # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
TARGET_RSS_MB = 1024
TARGET_SPEEDUP = 1.6
TARGET_FIRST_BATCH_S = 1.0


def parse_size(text: str) -> int:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMG]?)B?", text.upper())
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r}: a size such as 5MB, 100MB, 1GB")
    return int(float(m.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[m.group(2)])


def vocabulary(n: int = 20_000, seed: int = 0) -> np.ndarray:
    """`n` made-up words of 1-4 syllables: text a BPE has to learn, with a long tail like real text."""
    rng = np.random.default_rng(seed)
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ai", "ou")]
    return np.array(["".join(rng.choice(syllables, rng.integers(1, 5))) for _ in range(n)])


def generate(path: Path, size: int, kind: str, seed: int = 0) -> None:
    """About `size` bytes of documents (4-15 paragraphs of 5 sentences: ~3-12 KB each) as JSON lines or .txt files."""
    rng = np.random.default_rng(seed)
    words = vocabulary().tolist()
    zipf = np.cumsum(1.0 / np.arange(1, len(words) + 1))
    written, n = 0, 0
    out = path.open("w") if kind == "jsonl" else None
    if kind == "txt":
        path.mkdir(parents=True)
    while written < size:
        drawn = np.searchsorted(zipf, rng.random(200_000) * zipf[-1]).tolist()  # Zipf-distributed word ids
        at = 0
        while at < len(drawn) - 1200 and written < size:
            doc = []
            for _ in range(int(rng.integers(4, 16))):  # paragraphs of 5 sentences of 12 words
                sentences = [" ".join(words[i] for i in drawn[at + k: at + k + 12]).capitalize() + "."
                             for k in range(0, 60, 12)]
                doc.append(" ".join(sentences))
                at += 60
            text = "\n\n".join(doc) + "\n"
            if out is not None:
                out.write(json.dumps({"text": text}) + "\n")
            else:
                (path / f"doc-{n:07d}.txt").write_text(text)
            written += len(text) + 12
            n += 1
    if out is not None:
        out.close()


def tree_memory(pid: int) -> tuple[int, int]:
    """(RSS, anonymous RSS) in bytes of a process and all its descendants, from /proc (Linux). RSS counts the pages
    of memory-mapped files read so far (the Arrow cache `datasets` maps, the shards): page cache the kernel reclaims
    at will; anonymous RSS is the processes' own memory."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            children.setdefault(int(stat.read_text().rsplit(")", 1)[1].split()[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    rss = anon = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            status = dict(line.split(":", 1) for line in Path(f"/proc/{p}/status").read_text().splitlines()
                          if ":" in line)
        except OSError:
            continue
        rss += int(status.get("VmRSS", "0 kB").split()[0]) * 1024
        anon += int(status.get("RssAnon", "0 kB").split()[0]) * 1024
    return rss, anon


def run_prepare(data: Path, work: Path, name: str, num_proc: int, cores: int, args: argparse.Namespace) -> dict:
    """minitx-prepare in a subprocess on `cores` CPUs with its own caches: wall time, peak tree memory, and from its
    log the time to build the tokenizer and to tokenize (which includes building it)."""
    tag = re.sub(r"\W+", "-", name)
    cache = work / f"cache-{tag}"
    env = os.environ | {"PYTHONPATH": str(ROOT), "HF_DATASETS_CACHE": str(work / f"hf-{tag}"),
                        "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "minitx.prepare", f"data.path={data}", f"data.cache_dir={cache}",
           f"tokenizer={args.tokenizer}", f"tokenizer.vocab_size={args.vocab_size}", f"prepare.num_proc={num_proc}",
           f"prepare.shard_bytes={args.shard_bytes}", *args.overrides]
    cpus = sorted(os.sched_getaffinity(0))[:cores]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: os.sched_setaffinity(0, cpus))  # the tokenizer's threads follow
    peak = peak_anon = 0
    while proc.poll() is None:
        rss, anon = tree_memory(proc.pid)
        peak, peak_anon = max(peak, rss), max(peak_anon, anon)
        time.sleep(0.05)
    wall = time.perf_counter() - t0
    output = proc.stdout.read() if proc.stdout else ""
    if proc.returncode:
        sys.exit(f"minitx-prepare failed ({proc.returncode}):\n{output[-3000:]}")

    def logged(pattern: str) -> float:
        m = re.search(pattern, output)
        return float(m.group(1)) if m else 0.0

    build = logged(r"tokenizer built in ([\d.]+) s")
    return {"name": name, "num_proc": num_proc, "cores": len(cpus), "wall": wall, "build": build,
            "encode": logged(r"tokenized .* in ([\d.]+) s") - build, "peak_rss": peak, "peak_anon": peak_anon,
            "cache": cache}


def first_batches(cache: Path, work: Path, block: int, batch: int) -> dict:
    """Seconds for RandomWindows to draw batch 1 and batches 1-100, from the shards and from one memmap file."""
    from minitx.data import RandomWindows, TokenStream

    folder = next(p.parent for p in cache.rglob("manifest.json"))
    split = json.loads((folder / "manifest.json").read_text())["splits"]["train"]
    sharded = TokenStream.from_manifest(folder, split)
    single = work / "single.bin"
    with single.open("wb") as f:  # the same tokens as one file, as the cache was before shards
        for i in range(len(sharded.paths)):
            sharded.shard(i).tofile(f)
    sharded = TokenStream.from_manifest(folder, split)  # fresh: its memmaps not yet opened
    one = TokenStream([single], [len(sharded)], split["dtype"])
    times = {}
    for name, stream in (("shards", sharded), ("one file", one)):
        t0 = time.perf_counter()
        batches = iter(RandomWindows(stream, block, batch, seed=1337))
        next(batches)
        first = time.perf_counter() - t0
        for _ in range(99):
            next(batches)
        times[name] = (first, time.perf_counter() - t0)
    return {"n_shards": len(sharded.paths), "tokens": len(sharded), **times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", type=parse_size, default=[parse_size("100MB")])
    parser.add_argument("--kind", choices=["jsonl", "txt"], default="jsonl")
    parser.add_argument("--procs", nargs="+", type=int, default=[1, 2],
                        help="prepare.num_proc values run on --cores CPUs (besides num_proc=1 on one CPU)")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--tokenizer", default="bpe")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--shard-bytes", type=int, default=0, help="prepare.shard_bytes (default: size / 16)")
    parser.add_argument("--block", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--workdir", type=Path, default=None, help="where to generate (default: a temporary dir)")
    parser.add_argument("overrides", nargs="*", help="more minitx-prepare key=value arguments")
    args = parser.parse_args()
    rows = []
    for size in args.sizes:
        with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
            work = Path(tmp)
            data = work / ("corpus.jsonl" if args.kind == "jsonl" else "corpus")
            t0 = time.perf_counter()
            generate(data, size, args.kind)
            print(f"generated {size / 2**20:.0f} MB ({args.kind}) in {time.perf_counter() - t0:.1f} s", flush=True)
            args.shard_bytes = args.shard_bytes or max(1, size // 16)
            results = []
            configs = [("1 core", 1, 1)] + [(f"{args.cores} cores, num_proc={n}", n, args.cores) for n in args.procs]
            for name, n, cores in configs:
                results.append(r := run_prepare(data, work, name, n, cores, args))
                print(f"  {name}: {r['wall']:.1f} s wall ({size / 2**20 / r['wall']:.2f} MB/s), tokenizer "
                      f"{r['build']:.1f} s, encoding {r['encode']:.1f} s, peak RSS {r['peak_rss'] / 2**20:.0f} MB "
                      f"(anonymous {r['peak_anon'] / 2**20:.0f} MB)", flush=True)
            batches = first_batches(results[0]["cache"], work, args.block, args.batch)
            rows.append((size, results, batches))
    print("\n| text | run | wall s | MB/s | tokenizer s | encoding s | encoding MB/s | peak RSS (tree) | "
          "peak anonymous RSS |\n|---|---|---|---|---|---|---|---|---|")
    for size, results, _ in rows:
        for r in results:
            mb = size / 2**20
            print(f"| {mb:.0f} MB | {r['name']} | {r['wall']:.1f} | {mb / r['wall']:.2f} | {r['build']:.1f} | "
                  f"{r['encode']:.1f} | {mb / max(r['encode'], 1e-9):.2f} | {r['peak_rss'] / 2**20:.0f} MB | "
                  f"{r['peak_anon'] / 2**20:.0f} MB |")
    print("\n| text | shards | tokens | stream | first batch s | 100 batches s |\n|---|---|---|---|---|---|")
    for size, _, b in rows:
        for name in ("shards", "one file"):
            print(f"| {size / 2**20:.0f} MB | {b['n_shards']} | {b['tokens']:,} | {name} | {b[name][0]:.4f} | "
                  f"{b[name][1]:.3f} |")
    print("\ntargets:")
    for size, results, b in rows:
        mb = size / 2**20
        peak = max(r["peak_rss"] for r in results) / 2**20
        anon = max(r["peak_anon"] for r in results) / 2**20
        print(f"  {mb:.0f} MB: peak RSS {peak:.0f} MB < {TARGET_RSS_MB} MB: "
              f"{'ok' if peak < TARGET_RSS_MB else 'MISSED'} (anonymous {anon:.0f} MB)")
        one = results[0]
        best = min(results[1:], key=lambda r: r["wall"], default=None)
        if best is not None:
            speedup = one["wall"] / best["wall"]
            print(f"  {mb:.0f} MB: {best['name']} / 1 core throughput {speedup:.2f}x >= {TARGET_SPEEDUP}: "
                  f"{'ok' if speedup >= TARGET_SPEEDUP else 'MISSED'} (encoding alone: "
                  f"{one['encode'] / max(best['encode'], 1e-9):.2f}x)")
        first = b["shards"][0]
        print(f"  {mb:.0f} MB: first batch from shards {first:.4f} s < {TARGET_FIRST_BATCH_S} s: "
              f"{'ok' if first < TARGET_FIRST_BATCH_S else 'MISSED'}")


if __name__ == "__main__":
    main()
