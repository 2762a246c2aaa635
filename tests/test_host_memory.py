"""host_memory.keep_freed_memory: a compiled CPU program's temporaries reuse earlier runs' pages."""
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PAGES = 2 * 4096 * 4096 * 4 // 4096  # the program's two 64 MB temporaries, in pages of 4 KiB

# The sine and cosine of x (64 MB each, read by matmuls) are temporaries of one compiled
# program; the script prints the page faults of each of 16 runs.
FAULTS_PER_RUN = """
import resource, sys
import jax, jax.numpy as jnp
from dino_jax import host_memory
if sys.argv[1] == "kept":
  assert host_memory.keep_freed_memory()
  assert not jax.config.values["jax_cpu_enable_async_dispatch"]
x = jnp.ones((4096, 4096))
step = jax.jit(lambda x: jnp.cos(x) @ (jnp.sin(x) @ x[:, :8])[:, :1])
for _ in range(16):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  step(x).block_until_ready()
  print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def runs_that_fault_the_temporaries_in(mode: str) -> int:
  result = subprocess.run([sys.executable, "-c", FAULTS_PER_RUN, mode], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  faults = [int(n) for n in result.stdout.split()]
  assert len(faults) == 16
  return sum(n > PAGES // 2 for n in faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_runs_reuse_the_pages_of_earlier_runs():
  """Without the setting glibc maps the temporaries afresh and every run faults all their
  pages in; with it a run reuses pages from earlier runs (a few early runs still grow the
  heap, as blocks freed by one run are split by the next)."""
  assert runs_that_fault_the_temporaries_in("default") == 16
  assert runs_that_fault_the_temporaries_in("kept") <= 5
