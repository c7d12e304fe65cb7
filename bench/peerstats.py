"""Figures from bench/peerrun.py's marks: rates per round, medians per program, project/peer ratios."""
from __future__ import annotations

import statistics

MIB = 1024 * 1024


def round_figures(run: dict, warmup: int) -> dict:
    """steps/s and CPU s/step over the optimizer steps after `warmup`, start-up, peak RSS, for one run.

    The rate covers the whole interval from the end of step `warmup` to the end of the last step,
    so whatever a program does between steps (logging, data) counts.
    """
    marks = run["marks"]
    if len(marks) <= warmup + 1:
        raise ValueError(f"{len(marks)} optimizer steps recorded; need more than warmup + 1 = {warmup + 1}")
    (_, w0, c0), (_, w1, c1) = marks[warmup], marks[-1]
    n = len(marks) - 1 - warmup
    steady = marks[warmup:]
    wall = [b[1] - a[1] for a, b in zip(steady, steady[1:])]
    cpu = [b[2] - a[2] for a, b in zip(steady, steady[1:])]
    return {"steps": len(marks), "steps_per_s": round(n / (w1 - w0), 4), "cpu_s_per_step": round((c1 - c0) / n, 4),
            # other work on a shared machine only adds time: the fastest steps are the steadiest figure
            "median_step_s": round(statistics.median(wall), 4), "min_step_s": round(min(wall), 4),
            "min_cpu_s_per_step": round(min(cpu), 4),
            "cores_busy": round((c1 - c0) / (w1 - w0), 3),
            "startup_s": round(marks[0][0] - run["spawned"], 3),  # spawn -> end of the first optimizer step
            "peak_rss_mib": round(run["peak_rss_bytes"] / MIB, 1), "trainable": run["trainable"],
            "optimizer": run["optimizer"], "threads": run["threads"],
            "load_before": run["load_before"], "load_after": run["load_after"]}


def program_figures(rounds: list[dict]) -> dict:
    """Medians over the rounds, and every round."""
    med = lambda key: round(statistics.median(r[key] for r in rounds), 4)  # noqa: E731
    counts = sorted({r["trainable"] for r in rounds}, key=str)
    return {"steps_per_s": med("steps_per_s"), "cpu_s_per_step": med("cpu_s_per_step"),
            "median_step_s": med("median_step_s"), "min_step_s": min(r["min_step_s"] for r in rounds),
            "min_cpu_s_per_step": min(r["min_cpu_s_per_step"] for r in rounds),
            "startup_s": med("startup_s"), "peak_rss_mib": max(r["peak_rss_mib"] for r in rounds),
            "trainable": counts[0] if len(counts) == 1 else counts, "rounds": rounds}


def ratios(figs: dict[str, dict]) -> dict:
    """project / peer for each peer; refused (with the reason) when the trainable counts differ."""
    out = {}
    mine = figs["project"]
    for name, peer in figs.items():
        if name == "project":
            continue
        if mine["trainable"] != peer["trainable"] or isinstance(mine["trainable"], list):
            out[name] = {"refused": f"trainable parameters differ: project {mine['trainable']}, "
                                    f"{name} {peer['trainable']}"}
            continue
        out[name] = {"steps_per_s": round(mine["steps_per_s"] / peer["steps_per_s"], 3),
                     "cpu_s_per_step": round(mine["cpu_s_per_step"] / peer["cpu_s_per_step"], 3),
                     # a few steps stretched by other work weigh on the window rate, not on the median step
                     "steps_per_s_from_median_step": round(peer["median_step_s"] / mine["median_step_s"], 3),
                     "steps_per_s_best": round(peer["min_step_s"] / mine["min_step_s"], 3),
                     "min_cpu_s_per_step": round(mine["min_cpu_s_per_step"] / peer["min_cpu_s_per_step"], 3),
                     "startup_s": round(mine["startup_s"] / peer["startup_s"], 3),
                     "peak_rss": round(mine["peak_rss_mib"] / peer["peak_rss_mib"], 3),
                     "steps_per_s_by_round": [round(a["steps_per_s"] / b["steps_per_s"], 3)
                                              for a, b in zip(mine["rounds"], peer["rounds"])],
                     "median_step_by_round": [round(b["median_step_s"] / a["median_step_s"], 3)
                                              for a, b in zip(mine["rounds"], peer["rounds"])]}
    return out


def summarize(runs: dict[str, list[dict]], warmup: int) -> dict:
    figs = {name: program_figures([round_figures(r, warmup) for r in rs]) for name, rs in runs.items()}
    return {"programs": figs, "project_over": ratios(figs)}


def op_diff(ops: dict[str, dict[str, list[float]]], top: int = 30) -> dict:
    """Self CPU ms per step by op for each program, totals, and the ops where the project spends
    the most more (or less) than each peer: {"total": .., "by_op": [[op, project, peer..]], "calls": ..}."""
    names = list(ops)
    totals = {n: round(sum(v[1] for v in ops[n].values()), 1) for n in names}
    every = set().union(*(ops[n] for n in names))
    ms = lambda n, op: ops[n].get(op, [0.0, 0.0])[1]  # noqa: E731
    calls = lambda n, op: ops[n].get(op, [0.0, 0.0])[0]  # noqa: E731
    peers = [n for n in names if n != "project"]

    def spread(op: str) -> float:
        """The largest gap to a peer (the project's own time when it runs alone)."""
        return max(abs(ms("project", op) - ms(n, op)) for n in peers) if peers else ms("project", op)

    rows = sorted(every, key=spread, reverse=True)[:top]
    return {"programs": names, "total": totals,
            "by_op": [[op, *(round(ms(n, op), 2) for n in names)] for op in rows],
            "calls_per_step": [[op, *(round(calls(n, op), 1) for n in names)] for op in rows]}
