"""The ``dkuxnet reproduce`` grid beyond one process: resumable cells on a local or Slurm executor.

* :mod:`~dkuxnet.grid.identity` — the host and job id a run records in its provenance;
* :mod:`~dkuxnet.grid.lock` — one job per run folder (a lock file with a heartbeat);
* :mod:`~dkuxnet.grid.state` — the config hash of a cell and its state: done, running, failed or pending;
* :mod:`~dkuxnet.grid.collect` — a finished cell's result file, where ``load_results`` finds it;
* :mod:`~dkuxnet.grid.job` — what one job runs: lock, skip or run the cell, record, collect;
* :mod:`~dkuxnet.grid.launch` — the grid inline, on ``submitit``'s local executor or on Slurm.

Nothing here imports torch or submitit at import time.
"""
