"""Settings every test run needs, applied before any test module imports torch."""

import os

# The machine has 2 CPU cores shared by several jobs: one OpenMP thread per test process avoids
# oversubscription (measured faster than 2 threads when another process holds a core). An explicit
# OMP_NUM_THREADS in the environment wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")
