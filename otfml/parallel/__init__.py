"""Many walkers, one model, one store, over MPI (``mpirun -n K+1``).

Rank 0 coordinates: it alone writes the store and trains the model, and sends every new
model version to the walkers. Ranks 1..K run dynamics (or optimizations) with a copy of
the latest version; where uncertain they call the reference themselves and send the label
to the coordinator. See ``docs/parallel.md``.
"""

from .session import ParallelSession

__all__ = ["ParallelSession"]
