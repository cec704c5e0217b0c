"""The performance instruments, apart from the science: they measure and check the package, they do not train.

* :mod:`~dkuxnet.perf.core`       synchronisation, timing, peak memory, the device report, TF32 off;
* :mod:`~dkuxnet.perf.bench`      ``dkuxnet bench``: the training step, forward + backward, protocol inference;
* :mod:`~dkuxnet.perf.report`     ``dkuxnet perf-report``: the bench's terminal table and the book's tables;
* :mod:`~dkuxnet.perf.gpucheck`   ``dkuxnet check-gpu``: its stages and report, with
  :mod:`~dkuxnet.perf.numeric` (the step vs float64), :mod:`~dkuxnet.perf.rehearsal` (checkpointing and
  replay, bf16, optimiser, host syncs), :mod:`~dkuxnet.perf.hostsync`, :mod:`~dkuxnet.perf.fit` (what a
  card trains), :mod:`~dkuxnet.perf.loopcheck`, :mod:`~dkuxnet.perf.checks` and :mod:`~dkuxnet.perf.checktable`;
* :mod:`~dkuxnet.perf.memprobe`   ``python tools/memprobe.py``: a CPU proxy of a step's activation memory;
* :mod:`~dkuxnet.perf.traffic`    ``python tools/traffic.py``: memory traffic and live memory on the meta device.
"""
