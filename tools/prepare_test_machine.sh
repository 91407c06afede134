#!/usr/bin/env bash
# Before a test run on a machine that other runs have used (CI runs on the machine its session just used): say how
# much memory is free, and drop what killed runs leave behind that would stall the tests.
set -uo pipefail
echo "memory available: $(free -m | awk '/^Mem/ {print $7}') MiB; /dev/shm holds $(du -sm /dev/shm 2>/dev/null | cut -f1) MiB"

# DeepSpeed's CPU communication keeps a 66 MB buffer per rank in /dev/shm (RAM) and never removes it; those that no
# running process maps any more are garbage
for buffer in /dev/shm/deepspeed_allreduce_buffer_*; do
    [ -e "$buffer" ] || continue
    if ! grep -qsF "$buffer" /proc/[0-9]*/maps; then
        rm -f "$buffer" && echo "removed a stale DeepSpeed buffer: $buffer"
    fi
done

# DeepSpeed's compiled ops live in a folder of this Python environment's (folders.use_own_extension_builds), as the
# scripts set it: the build below fills the one the tests use
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$(cd "$(dirname "$0")/.." && python3 folders.py)}"

# torch's JIT build lock is a bare file (no process holds it open): one left by a killed compile makes every later
# DeepSpeed launch wait on it for ever. A build runs ninja from start to end of its compile, so with no ninja
# running, every lock is garbage (CI once lost 15 minutes to one two minutes old)
if ! pgrep -x ninja > /dev/null; then
    find "$TORCH_EXTENSIONS_DIR" -name lock -print -delete 2>/dev/null |
        sed 's/^/removed a stale build lock: /'
fi

# build DeepSpeed's CPU communication op now, once, rather than inside the first test's time limit
DS_ACCELERATOR=cpu timeout 900 python3 -c "
from deepspeed.accelerator import get_accelerator
get_accelerator().create_op_builder('ShareMemCommBuilder').load()" > /dev/null 2>&1 ||
    { echo "building DeepSpeed's CPU communication op failed (run the line above by hand to see why)"; exit 1; }
