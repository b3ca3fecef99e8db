"""The child side of `isolate=True`: runs one external scorer on inputs read from stdin
(`python -m gradalign._worker __scorer-worker LIBRARY SCORER FLAGS`), so that a plugin that
aborts or segfaults costs only its own result."""

import sys

from gradalign import _native

if __name__ == "__main__":
    if len(sys.argv) != 5 or sys.argv[1] != "__scorer-worker":
        sys.exit("usage: python -m gradalign._worker __scorer-worker LIBRARY SCORER FLAGS")
    sys.exit(_native.scorer_worker(sys.argv[2], sys.argv[3], int(sys.argv[4])))
