# The suite runs a test process per core (pytest -n auto) and many runs at once: every torch in it, in-process
# or in a spawned ppo-train, keeps to one thread unless a test says otherwise (torch_threads=null would give an
# image encoder a thread per core). Set before any test module imports torch.
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
