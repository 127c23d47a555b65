"""`data prepare` at corpus scale: ``python -m hpcmega.bench.data --mb 100 500``.

Generates jsonl corpora of the given sizes (documents of 5-60 random Shakespeare lines, seeded: the same bytes on
every machine), measures the tokenizer's own speed on one core in this process (``encode_batch`` on 1 MB batches of
the corpus's first documents, no reading, no writing) right before each run, then runs ``hpcmega data prepare`` on each corpus as a user
would (a separate process with its worker pool) while sampling the resident memory of its whole process tree from
/proc every 0.5 s. Reports, per corpus: input MB/s, tokens/s, the ratio of tokens/s to workers x one-core tokens/s,
the peak RSS of the tree, and the CPU efficiency (tokens per CPU second of the whole process tree over the
tokenizer's alone: what the ratio would be if every worker had a core of its own, which on a shared machine wall
time cannot show). The goals (issue 17): ratio >= 0.8, peak <= 1 GiB, and the peak of the largest corpus
within 10% of the smallest one's (memory does not grow with the corpus).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from hpcmega.data.prepare import usable_cores
from hpcmega.data.sources import shakespeare_files
from hpcmega.data.tokenizer import load_tokenizer

GOAL_RATIO, GOAL_PEAK_GIB, GOAL_PEAK_GROWTH = 0.8, 1.0, 0.10


def make_corpus(path: Path, mb: int, seed: int = 0) -> int:
    """A jsonl file of at least ``mb`` MB (1e6 bytes); -> its size."""
    lines = [x for f in shakespeare_files() for x in Path(f).read_text().splitlines() if x.strip()]
    rng = random.Random(seed)
    size, target = 0, mb * 1_000_000
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        while size < target:
            rows = []
            for _ in range(1000):
                start = rng.randrange(len(lines) - 60)
                rows.append(json.dumps({"text": "\n".join(lines[start: start + rng.randint(5, 60)])}) + "\n")
            chunk = "".join(rows)
            f.write(chunk)
            size += len(chunk.encode())
    tmp.replace(path)  # complete, or not there: a later run never reuses half a corpus
    return path.stat().st_size


def one_core_speed(corpus: Path, tokenizer: str, sample_mb: int = 16) -> dict:
    """tokens/s and text MB/s of the tokenizer alone on this one process."""
    tok = load_tokenizer(tokenizer)
    batches, batch, size, total = [], [], 0, 0
    with open(corpus, encoding="utf-8") as f:
        for line in f:
            text = json.loads(line)["text"]
            batch.append(text)
            size += len(text.encode())
            if size >= 1 << 20:
                batches.append(batch)
                total += size
                batch, size = [], 0
                if total >= sample_mb * 1_000_000:
                    break
    tok.encode_batch(batches[0][:10])  # warm-up
    start, cpu, tokens = time.perf_counter(), time.process_time(), 0
    for b in batches:
        tokens += sum(len(ids) for ids in tok.encode_batch(b))
    secs, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"tokens_per_s": tokens / secs, "tokens_per_cpu_s": tokens / cpu, "text_mb_per_s": total / 1e6 / secs,
            "sample_mb": total / 1e6}


def _tree_rss(root: int) -> int:
    """Resident bytes of ``root`` and all its descendants (from /proc)."""
    parent: dict[int, int] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            parent[int(entry)], rss[int(entry)] = int(fields[1]), int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            continue
    tree, frontier = {root}, [root]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == p and c not in tree]
        tree.update(kids)
        frontier += kids
    return sum(rss.get(p, 0) for p in tree)


def run_prepare(corpus: Path, out: Path, tokenizer: str, workers: int) -> dict:
    cmd = [sys.executable, "-c", "from hpcmega.cli import main; main()", "data", "prepare", "--source", str(corpus),
           "--out", str(out), "--tokenizer", tokenizer, "--workers", str(workers), "--force"]
    peak, done = [0], threading.Event()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    # its own session, as when typed in a terminal: with autogroup scheduling it then gets its own CPU share instead
    # of sharing this process's (and its memory sampler's)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _tree_rss(proc.pid))
            time.sleep(0.5)  # a sample reads every /proc/PID/stat (~3 ms of CPU): rarely, not to slow the run

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = proc.communicate()
    secs = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the prepare and its (joined) workers
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    done.set()
    sampler.join()
    if proc.returncode:
        raise SystemExit(f"data prepare failed ({proc.returncode}):\n{stderr[-2000:]}")
    index = json.loads((out / "index.json").read_text())
    tokens = index["tokens"] + index["val_tokens"]
    return {"seconds": secs, "cpu_seconds": cpu, "tokens": tokens, "tokens_per_s": tokens / secs,
            "tokens_per_cpu_s": tokens / cpu,
            "input_mb_per_s": corpus.stat().st_size / 1e6 / secs, "peak_rss_mib": peak[0] / 2**20,
            "summary": stdout.strip().splitlines()[-1]}


def _autogroup() -> bool:
    try:
        return Path("/proc/sys/kernel/sched_autogroup_enabled").read_text().strip() == "1"
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hpcmega.bench.data", description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, nargs="+", default=[100, 500], help="corpus sizes, MB (1e6 bytes)")
    parser.add_argument("--workers", type=int, default=0, help="worker processes (default: usable cores)")
    parser.add_argument("--tokenizer", default="gpt2")
    parser.add_argument("--dir", help="work folder (default: a temporary one, removed at the end)")
    parser.add_argument("--json", dest="json_out", help="also write the results here")
    args = parser.parse_args(argv)
    workers = args.workers or usable_cores()
    work = Path(args.dir or tempfile.mkdtemp(prefix="hpcmega-bench-data-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"load before: {Path('/proc/loadavg').read_text().strip()}  cores usable: {usable_cores()}  "
          f"workers: {workers}", flush=True)
    results: dict = {"workers": workers, "tokenizer": args.tokenizer, "corpora": {}}
    try:
        for mb in sorted(args.mb):
            corpus = work / f"corpus-{mb}mb.jsonl"
            if not corpus.exists():
                make_corpus(corpus, mb)
            c = one_core_speed(corpus, args.tokenizer)  # right before the run: the same neighbours
            print(f"tokenizer {args.tokenizer}, one core: {c['tokens_per_s']:,.0f} tokens/s "
                  f"({c['text_mb_per_s']:.2f} text MB/s on {c['sample_mb']:.0f} MB)", flush=True)
            r = run_prepare(corpus, work / f"out-{mb}mb", args.tokenizer, workers)
            r["one_core"], r["ratio"] = c, r["tokens_per_s"] / (workers * c["tokens_per_s"])
            r["cpu_efficiency"] = r["tokens_per_cpu_s"] / c["tokens_per_cpu_s"]
            r["cores_used"] = r["cpu_seconds"] / r["seconds"]
            results["corpora"][mb] = r
            print(f"{corpus.stat().st_size / 1e6:.0f} MB jsonl: {r['input_mb_per_s']:.2f} MB/s, "
                  f"{r['tokens_per_s']:,.0f} tokens/s = {r['ratio']:.2f} x workers x one core "
                  f"(goal >= {GOAL_RATIO}), peak RSS {r['peak_rss_mib']:.0f} MiB (goal <= {GOAL_PEAK_GIB:.0f} GiB), "
                  f"{r['seconds']:.1f}s using {r['cores_used']:.2f} cores on average; CPU efficiency {r['cpu_efficiency']:.2f} (tokens per CPU second of the "
                  f"whole tree / of the tokenizer alone)", flush=True)
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)
    peaks = [r["peak_rss_mib"] for r in results["corpora"].values()]
    results["peak_growth"] = max(peaks) / min(peaks) - 1
    results["load_after"] = Path("/proc/loadavg").read_text().strip()
    if _autogroup() and float(results["load_after"].split()[0]) > usable_cores():
        print("note: the kernel schedules by autogroup (one CPU share per session, however many processes it runs) "
              "and the machine is loaded: the wall-time ratio shows the session's share, not the code's scaling; "
              "read the CPU efficiency")
    print(f"peak RSS, largest vs smallest corpus: {results['peak_growth']:+.1%} (goal within "
          f"{GOAL_PEAK_GROWTH:.0%}); load after: {results['load_after']}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
