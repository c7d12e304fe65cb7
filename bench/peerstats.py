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
    return {"steps": len(marks), "steps_per_s": round(n / (w1 - w0), 4), "cpu_s_per_step": round((c1 - c0) / n, 4),
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
                     "startup_s": round(mine["startup_s"] / peer["startup_s"], 3),
                     "peak_rss": round(mine["peak_rss_mib"] / peer["peak_rss_mib"], 3),
                     "steps_per_s_by_round": [round(a["steps_per_s"] / b["steps_per_s"], 3)
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
    spread = lambda op: max(abs(ms("project", op) - ms(n, op)) for n in names if n != "project") if len(names) > 1 else ms("project", op)  # noqa: E731
    rows = sorted(every, key=spread, reverse=True)[:top]
    return {"programs": names, "total": totals,
            "by_op": [[op, *(round(ms(n, op), 2) for n in names)] for op in rows],
            "calls_per_step": [[op, *(round(calls(n, op), 1) for n in names)] for op in rows]}
