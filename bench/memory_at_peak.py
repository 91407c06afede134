"""What fills GPU memory at a run's peak: the allocations alive when the allocated total was highest, grouped by the
line of this project's code that made them.

    recording = MemoryAtPeak()      # after the model is built: what is allocated now counts as one "before" row
    ... the steps ...
    rows = recording.stop()         # [(where, GiB, allocations)], largest first; print_table(rows)

`bench/bench_gpu.py --memory_at_peak` uses it. The allocator records a Python stack with every allocation
(torch.cuda.memory._record_memory_history), which slows the host: a run that records is not timed.
"""
import os

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEFORE = "allocated before recording (weights, optimizer state)"
DEFERRED = "freed, reuse deferred"


def allocation_site(frames, root=ROOT):
    """'file.py:line function' of the innermost frame in this project's code; ' [compiled]' when the allocation
    came from code torch.compile generated (inductor's files) below it."""
    compiled = False
    for frame in frames:
        filename = frame.get("filename", "")
        if "torchinductor" in filename or "inductor" in os.path.basename(os.path.dirname(filename)):
            compiled = True
        if filename.startswith(root + os.sep):
            site = f"{os.path.relpath(filename, root)}:{frame.get('line')} {frame.get('name')}"
            return site + (" [compiled]" if compiled else "")
    innermost = frames[0].get("name", "?") if frames else "no Python frame (autograd's engine)"
    return f"outside the project: {innermost}" + (" [compiled]" if compiled else "")


def live_at_peak(trace, before_bytes, root=ROOT):
    """Replays the allocator's trace (alloc / free_completed events); returns (peak bytes, {site: [bytes, count]})
    for the moment the total was highest. Frees of blocks allocated before recording lower the "before" row; blocks
    whose tensor was freed but whose reuse the allocator defers (free_requested, not yet free_completed: used on
    another stream, or freed during a CUDA graph capture) count under a DEFERRED site."""
    total = best = before_bytes
    best_index = -1
    for index, event in enumerate(trace):
        if event["action"] == "alloc":
            total += event["size"]
            if total > best:
                best, best_index = total, index
        elif event["action"] == "free_completed":
            total -= event["size"]
    live, requested, sites = {}, set(), {BEFORE: [before_bytes, 0]}
    for event in trace[:best_index + 1]:
        if event["action"] == "alloc":
            live[event["addr"]] = (event["size"], allocation_site(event.get("frames", []), root))
            requested.discard(event["addr"])
        elif event["action"] == "free_requested":
            requested.add(event["addr"])
        elif event["action"] == "free_completed":
            requested.discard(event["addr"])
            size, site = live.pop(event["addr"], (event["size"], BEFORE))
            if site == BEFORE:
                sites[BEFORE][0] -= size
    for addr, (size, site) in live.items():
        if addr in requested:  # freed by its tensor, but the allocator waits (another stream used it) to reuse it
            site = f"{DEFERRED}: {site}"
        entry = sites.setdefault(site, [0, 0])
        entry[0] += size
        entry[1] += 1
    return best, sites


class MemoryAtPeak:
    def __init__(self, max_entries=2_000_000):
        torch.cuda.synchronize()
        self.before = torch.cuda.memory_allocated()
        torch.cuda.memory._record_memory_history(max_entries=max_entries, stacks="python")

    def stop(self):
        torch.cuda.synchronize()
        snapshot = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        trace = snapshot["device_traces"][torch.cuda.current_device()]
        peak, sites = live_at_peak(trace, self.before)
        rows = sorted(((site, round(size / 2 ** 30, 3), count) for site, (size, count) in sites.items()),
                      key=lambda row: -row[1])
        return [("peak (allocated)", round(peak / 2 ** 30, 3), sum(row[2] for row in rows))] + rows


def print_table(rows, top=25):
    print("| where (at the peak) | GiB | allocations |\n| --- | --- | --- |")
    for site, gib, count in rows[:top]:
        print(f"| {site} | {gib} | {count} |")
