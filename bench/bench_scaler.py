"""Scaler benchmark: our concurrency policy against Knative's KPA, the HPA and Ray Serve
on the bursty and diurnal traces and on a generated trace family, one cold-start model
for all.

    .venv/bin/python bench/bench_scaler.py [--write-results] [--no-family]

Prints a markdown table per trace, draws bench/plots/scaler_<trace>.png (requests vs
replicas over time, one panel per policy), then the family's distribution (seed 1000, not
used while choosing the defaults) and the sensitivity of each default on the tuning family
(bench/bench_scaler_family.py); with --write-results it replaces the `## scaler` section
of bench/RESULTS.md (and nothing else). Targets (the issue): our p99 queueing delay below
KPA's, our replica-seconds below HPA's, zero rejected, with one configuration everywhere:
our defaults. Standby settings are shown for reference.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scaler import PolicyConfig, SimConfig, load, make_policy, simulate  # noqa: E402

TRACES = ROOT / "bench" / "traces"
PLOTS = ROOT / "bench" / "plots"
RESULTS = ROOT / "bench" / "RESULTS.md"
POLICIES = ("concurrency", "kpa", "hpa", "rayserve")
TARGET, MAX_CONC, MAX_REPLICAS = 4.0, 8, 100
SIM = SimConfig(provision_s=60, startup_s=30, max_concurrency=MAX_CONC, slo_s=1.0,
                queue_timeout_s=600, max_queue=100_000, timeline_s=10)
DEFAULT = PolicyConfig()  # the configuration the targets are for
_r = dataclasses.replace
STANDBY_MODES = {  # our standby settings: label -> config; the first (the default) is judged
    "0 (defaults)": DEFAULT,
    "adaptive <= 1": _r(DEFAULT, standby=1),
    "adaptive <= 2": _r(DEFAULT, standby=2),
    "fixed 2": _r(DEFAULT, standby=2, min_standby=2),
}
OURS = {f"concurrency (standby {k})": v for k, v in STANDBY_MODES.items()}
MAIN = next(iter(OURS))


def run(trace, name: str, cfg: PolicyConfig = DEFAULT, label: str | None = None):
    pol = make_policy(name, target_concurrency=TARGET, max_concurrency=MAX_CONC,
                      policy=cfg, max_replicas=MAX_REPLICAS)
    t0 = time.perf_counter()
    r = simulate(trace, pol, SIM, label or name)
    return r, time.perf_counter() - t0


def table(results) -> list[str]:
    rows = ["| policy | p50 / p95 / p99 queueing delay (s) | SLO (delay <= 1 s) | replica-seconds "
            "| cold starts (provisioned) | scale events / reversals | peak replicas | rejected |",
            "|---|---|---|---|---|---|---|---|"]
    for r in results:
        rows.append(f"| {r.policy} | {r.p50_queue_delay_s:.2f} / {r.p95_queue_delay_s:.2f} / "
                    f"{r.p99_queue_delay_s:.2f} | {100 * r.slo_attainment:.1f}% | "
                    f"{r.replica_seconds:,.0f} | {r.cold_starts} ({r.provisions}) | "
                    f"{r.scale_events} / {r.reversals} | {r.max_replicas} | {r.rejected} |")
    return rows


def verdict(results, label: str) -> str:
    by = {r.policy: r for r in results}
    ours, kpa, hpa = by[label], by["kpa"], by["hpa"]
    a, b = ours.p99_queue_delay_s, kpa.p99_queue_delay_s
    ok1 = a < b or a == b == 0
    ok2 = ours.replica_seconds < hpa.replica_seconds
    ok3 = ours.rejected == 0
    return (f"{label}: p99 {ours.p99_queue_delay_s:.1f} s vs KPA {kpa.p99_queue_delay_s:.1f} s: "
            f"{'met' if ok1 else 'MISSED'}; replica-seconds {ours.replica_seconds:,.0f} vs HPA "
            f"{hpa.replica_seconds:,.0f}: {'met' if ok2 else 'MISSED'}; rejected {ours.rejected}: "
            f"{'met' if ok3 else 'MISSED'}.")


def plot(name: str, results) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    hours = name == "diurnal"
    fig, axes = plt.subplots(len(results), 1, figsize=(11, 2.3 * len(results)), sharex=True)
    for ax, r in zip(axes, results):
        t = [p[0] / (3600 if hours else 60) for p in r.timeline]
        ax.fill_between(t, [p[1] for p in r.timeline], step="post", alpha=0.25, color="tab:gray",
                        label="requests/s")
        ax.set_ylabel("req/s")
        ax2 = ax.twinx()
        ax2.step(t, [p[3] for p in r.timeline], where="post", color="tab:orange", lw=1,
                 label="replicas (all, incl. starting/standby)")
        ax2.step(t, [p[2] for p in r.timeline], where="post", color="tab:blue", lw=1.2,
                 label="ready replicas")
        ax2.set_ylabel("replicas")
        ax2.set_ylim(bottom=0)
        ax.set_title(f"{r.policy}: p99 {r.p99_queue_delay_s:.1f} s, "
                     f"{r.replica_seconds:,.0f} replica-s", fontsize=9, loc="left")
        if ax is axes[0]:
            h1, l1 = ax.get_legend_handles_labels()
            h2, l2 = ax2.get_legend_handles_labels()
            ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper right")
    axes[-1].set_xlabel("hours" if hours else "minutes")
    fig.suptitle(f"{name} trace: requests vs replicas (provision 60 s + startup 30 s)", fontsize=10)
    fig.tight_layout()
    PLOTS.mkdir(parents=True, exist_ok=True)
    out = PLOTS / f"scaler_{name}.png"
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--write-results", action="store_true")
    ap.add_argument("--no-family", action="store_true", help="skip the trace family")
    ap.add_argument("--no-sensitivity", action="store_true")
    args = ap.parse_args()
    lines = ["## scaler", "",
             "Date: 2026-12-01. Machine: 2-core VM (shared). Command: `.venv/bin/python "
             "bench/bench_scaler.py --write-results` (traces from `bench/traces/gen_traces.py` "
             "and `scaler.family`; method in docs/SCALER.md). Simulated, same model for every "
             f"policy: provision 60 s + startup 30 s, {MAX_CONC} slots per replica, per-replica "
             f"target {TARGET:g}, queue deadline 600 s, max 100 replicas. Ours is judged with its "
             "defaults (`PolicyConfig()`: burst headroom 3, base headroom 2.5, orders held 6 s, "
             "backlog drain 30 s, keep-alive priced from the arrival rate, no standby); standby settings for reference.", ""]
    for name in ("bursty", "diurnal"):
        trace = load(TRACES / f"{name}.csv.gz")
        jobs = [(MAIN, "concurrency", OURS[MAIN])] + [(p, p, DEFAULT) for p in POLICIES[1:]]
        jobs += [(label, "concurrency", cfg) for label, cfg in list(OURS.items())[1:]]
        results = []
        for label, pol, cfg in jobs:
            r, wall = run(trace, pol, cfg, label)
            results.append(r)
            print(f"{name:8s} {r.policy:36s} simulated in {wall:.1f} s", file=sys.stderr)
        png = plot(name, results)
        lines += [f"### {name} ({len(trace):,} requests, {trace.duration_s / 3600:.1f} h)", "",
                  *table(results), ""]
        lines += ["Targets (ours judged; the others for reference):", ""]
        lines += [f"- {verdict(results, label)}" for label in OURS]
        lines += ["", f"![{name}](plots/{png.name})", ""]
    if not args.no_family:
        from bench_scaler_family import section
        fam, _ = section(with_sensitivity=not args.no_sensitivity, progress=True)
        lines += [*fam, ""]
    text = "\n".join(lines)
    print(text)
    if args.write_results:
        write_section(text)


def write_section(section: str) -> None:
    """Replace our `## scaler` section (up to the next `## ` heading), or append it;
    every other section is left byte for byte."""
    old = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    lines = old.rstrip("\n").split("\n")
    ours = section.rstrip("\n").split("\n")
    if "## scaler" not in lines:
        RESULTS.write_text("\n".join(lines + [""] + ours) + "\n")
        return
    i = lines.index("## scaler")
    j = next((k for k in range(i + 1, len(lines)) if lines[k].startswith("## ")), len(lines))
    rest = [""] + lines[j:] if j < len(lines) else []
    RESULTS.write_text("\n".join(lines[:i] + ours + rest) + "\n")


if __name__ == "__main__":
    main()
