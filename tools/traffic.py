"""``python tools/traffic.py …``: memory traffic and live memory of a training step (:mod:`dkuxnet.perf.traffic`)."""
from dkuxnet.perf.traffic import main
raise SystemExit(main())
