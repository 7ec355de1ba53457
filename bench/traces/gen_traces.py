"""Generate the scaler benchmark traces (deterministic; seeds fixed).

    .venv/bin/python bench/traces/gen_traces.py

bursty.csv.gz   2 h. Poisson at 4 req/s; spikes of 10x (40 req/s) lasting 5 min, starting on
                average every 15 min (exponential gaps, at least 5 min). Service time gamma,
                mean 0.5 s, CV 0.5. Base concurrency 2 (1 replica at target 4), spike 20 (5).
diurnal.csv.gz  24 h. Rate = 12 req/s x (raised cosine)^2 from midnight (0) to noon (peak),
                never below 0.002 req/s (one request per ~8 min at night). Same service times.
Formats: docs/SCALER.md, "Traces".
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from scaler import bursty, diurnal, write_csv  # noqa: E402

HERE = Path(__file__).resolve().parent
BURSTY = dict(duration_s=7200.0, base_rps=4.0, spike_factor=10.0, spike_s=300.0,
              spike_every_s=900.0, service_mean_s=0.5, service_cv=0.5, seed=1)
DIURNAL = dict(duration_s=86400.0, period_s=86400.0, peak_rps=12.0, trough_rps=0.0,
               floor_rps=0.002, service_mean_s=0.5, service_cv=0.5, seed=2)


def main() -> None:
    for name, trace in (("bursty", bursty(**BURSTY)), ("diurnal", diurnal(**DIURNAL))):
        path = HERE / f"{name}.csv.gz"
        write_csv(trace, path)
        print(f"{path}: {len(trace)} requests over {trace.duration_s:.0f} s")


if __name__ == "__main__":
    main()
