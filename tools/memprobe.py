"""``python tools/memprobe.py …``: CPU proxy of a training step's activation memory (:mod:`dkuxnet.perf.memprobe`)."""
from dkuxnet.perf.memprobe import main
raise SystemExit(main())
