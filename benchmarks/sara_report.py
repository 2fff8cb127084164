"""Reporting of bench_sara.py: targets with margins, summary table, plots, JSON/CSV files."""

from __future__ import annotations

import os

from sara_kernels.programs.table import format_table

from sara_kernels.programs.bench_op import CONTENDERS, FUSED, PASSES, kernel_pass, significant
from sara_kernels.programs.bench_timing import write_csv, write_json

from sara_cases import BACKEND_THRESHOLDS, MODES, TARGETS

# The summary's columns follow CONTENDERS: a new contender gets its own without an edit here.
BASELINE = "triton"  # what every other contender is compared with (bench_op's triton_speedup)
OTHER_FUSED = [c for c in CONTENDERS if c in FUSED and c != BASELINE]  # timed in full, × how much faster than it
UNFUSED = [c for c in CONTENDERS if c not in FUSED]  # median only, × how much faster the baseline is
SHORT = {"reference": "ref"}  # header abbreviations, as in the committed results


def _kernel_bw(row) -> dict:
    """{"fwd": fraction of copy bandwidth, "bwd": ...} of a fused row's pooling kernels."""
    kernels = ((row or {}).get("kernel_profile") or {}).get("kernels", [])
    return {kernel_pass(k["name"]): k.get("bw_fraction") for k in kernels if kernel_pass(k["name"])}


def _speedup(other, fused):
    """How many times faster the fused row is than ``other`` (same case and pass)."""
    if not other or not fused:
        return None
    return significant(other["median_ms"] / fused["median_ms"])


def evaluate_targets(rows: list) -> list:
    """For every case at the target shape and every fused backend measured: each target's value,
    whether it is met and the margin (value / threshold for ≥ targets, threshold / value for ≤
    targets: > 1 is met)."""
    results = []
    keys = sorted({(r["model"], r["tokens"], r["mode"]) for r in rows if r.get("target_shape")},
                  key=lambda k: (k[0], k[1], MODES.index(k[2])))
    for model, tokens, mode in keys:
        case_rows = [r for r in rows if (r["model"], r["tokens"], r["mode"]) == (model, tokens, mode)
                     and r.get("pass_name") == "fwd+bwd" and r.get("status") == "ok"]
        ref = next((r for r in case_rows if r["contender"] == "reference"), None)
        best_compile = next((r for r in case_rows if r.get("best_compile_mode")), None)
        for backend in FUSED:
            fused = next((r for r in case_rows if r["contender"] == backend), None)
            if fused is None and backend != BASELINE:
                continue  # the other fused ops are optional: no rows, no targets
            kernel_bw = _kernel_bw(fused)
            values = {
                "fwd_kernel_bw": kernel_bw.get("fwd"),
                "bwd_kernel_bw": kernel_bw.get("bwd"),
                "cpu_ms_per_call": fused and fused.get("cpu_ms_per_call"),
                "bw_fraction": fused and fused.get("bw_fraction"),
                "speedup_vs_reference": _speedup(ref, fused),
                "speedup_vs_compile": _speedup(best_compile, fused),
                "workspace_vs_reference": _ratio(fused and fused.get("workspace_mb"), ref and ref.get("workspace_mb")),
            }
            for key, text, metric, threshold, direction in TARGETS:
                threshold = BACKEND_THRESHOLDS.get(backend, {}).get(key, threshold)
                value = values[metric]
                entry = dict(target=key, backend=backend, description=text, model=model, tokens=tokens, mode=mode,
                             threshold=threshold, direction=direction, value=value, met=None, margin=None)
                if value is None:
                    entry["note"] = "a contender it needs was skipped, failed or ran out of memory"
                else:
                    entry["met"] = value >= threshold if direction == ">=" else value <= threshold
                    entry["margin"] = significant(value / threshold if direction == ">=" else threshold / max(value, 1e-12))
                results.append(entry)
    return results


def _ratio(a, b):
    if a is None or b is None or b <= 0:
        return None
    return significant(max(a, 0.0) / b)


def target_lines(targets: list) -> list:
    lines = []
    for t in targets:
        where = f"{t.get('backend', 'triton')}, {t['model']} N={t['tokens']} {t['mode']}"
        if t["met"] is None:
            lines.append(f"- {t['description']} [{where}]: NOT MEASURED ({t.get('note', '')})")
        else:
            verdict = "MET" if t["met"] else "NOT MET"
            lines.append(f"- {t['description']} [{where}]: {verdict}: value {t['value']:.4g} vs {t['direction']} "
                         f"{t['threshold']:g} (margin ×{t['margin']:.3g}; > 1 means met)")
    return lines


SUMMARY_COLUMNS = [
    ("model", "model"), ("L", "layers"), ("E", "experts"), ("N/side", "tokens"), ("mode", "mode"),
    (f"{BASELINE} ms p20/50/80", f"{BASELINE}_ms"), ("bw frac", "bw_fraction"), ("cpu ms/call", f"{BASELINE}_cpu"),
    ("fwd kern bw", "fwd_kernel_bw"), ("bwd kern bw", "bwd_kernel_bw"),
    *[column for c in UNFUSED for column in ((f"{SHORT.get(c, c)} ms", f"{c}_ms"), (f"×{SHORT.get(c, c)}", f"vs_{c}"))],
    ("compile s", "compile_s"), ("ws MB", f"{BASELINE}_ws"), ("ref ws MB", "reference_ws"),
    *[column for c in OTHER_FUSED for column in (
        (f"{c} ms p20/50/80", f"{c}_ms"), (f"{c} cpu ms", f"{c}_cpu"), (f"{c} fwd/bwd kern bw", f"{c}_kernel_bw"),
        (f"{c} ×{BASELINE}", f"{c}_vs_{BASELINE}"))],
]


def _percentiles(row) -> str:
    return f"{row['p20_ms']:.3g}/{row['median_ms']:.3g}/{row['p80_ms']:.3g}"


def _cpu(row):
    return None if row.get("cpu_ms_per_call") is None else f"{row['cpu_ms_per_call']:.3g}"


def summary_rows(rows: list, pass_name: str = "fwd+bwd") -> list:
    """One line per case: the baseline (Triton) vs every other contender for one pass."""
    out = []
    keys = []
    for r in rows:
        key = (r["model"], r["tokens"], r["mode"])
        if key not in keys:
            keys.append(key)
    for key in keys:
        rs = [r for r in rows if (r["model"], r["tokens"], r["mode"]) == key and r.get("pass_name") == pass_name
              and r.get("status") == "ok"]
        first = next(r for r in rows if (r["model"], r["tokens"], r["mode"]) == key)
        get = {c: next((r for r in rs if r["contender"] == c and (c != "compile" or r.get("best_compile_mode"))), None)
               for c in CONTENDERS}
        line = dict(model=first["model"], layers=first["layers"], experts=first["experts"], tokens=first["tokens"], mode=first["mode"])
        base = get[BASELINE]
        if base:
            line.update({f"{BASELINE}_ms": _percentiles(base), "bw_fraction": f"{base['bw_fraction']:.3g}",
                         f"{BASELINE}_ws": base.get("workspace_mb"), f"{BASELINE}_cpu": _cpu(base)})
            for kernel, fraction in _kernel_bw(base).items():
                if fraction is not None:
                    line[f"{kernel}_kernel_bw"] = f"{fraction:.3g}"
        for c in OTHER_FUSED:
            if get[c]:
                bw = _kernel_bw(get[c])
                line.update({f"{c}_ms": _percentiles(get[c]), f"{c}_cpu": _cpu(get[c]),
                             f"{c}_kernel_bw": "/".join("-" if bw.get(p) is None else f"{bw[p]:.3g}" for p in ("fwd", "bwd")),
                             f"{c}_vs_{BASELINE}": _speedup(base, get[c])})
        for c in UNFUSED:
            if get[c]:
                line[f"{c}_ms"] = f"{get[c]['median_ms']:.3g}"
                line[f"vs_{c}"] = get[c].get("triton_speedup")
        if get["compile"]:
            line["compile_s"] = get["compile"].get("first_call_s")
        if get["reference"]:
            line["reference_ws"] = get["reference"].get("workspace_mb")
        out.append(line)
    return out


def write_plots(rows: list, out_dir: str, card: str) -> list:
    """time_<pass>.png and bandwidth_<pass>.png: a grid (models × modes) of median time and
    achieved fraction of copy bandwidth against tokens per side, one line per contender."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ["plots skipped: matplotlib is not installed"]
    ok = [r for r in rows if r.get("status") == "ok" and (r["contender"] != "compile" or r.get("best_compile_mode"))]
    models = [m for m in dict.fromkeys(r["model"] for r in ok)]
    modes = [m for m in MODES if any(r["mode"] == m for r in ok)]
    written = []
    if not ok:
        return written
    for pass_name in PASSES:
        for metric, label, fname in (("median_ms", "median time (ms)", "time"), ("bw_fraction", "fraction of copy bandwidth", "bandwidth")):
            fig, axes = plt.subplots(len(models), len(modes), figsize=(4 * len(modes), 2.8 * len(models)), squeeze=False)
            for i, model in enumerate(models):
                for j, mode in enumerate(modes):
                    ax = axes[i][j]
                    ax.set_title(f"{model} · {mode}", fontsize=9)
                    for contender in CONTENDERS:  # the registry's order
                        pts = sorted((r["tokens"], r[metric]) for r in ok if r["model"] == model and r["mode"] == mode
                                     and r["pass_name"] == pass_name and r["contender"] == contender)
                        if pts:
                            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=contender)
                    if not ax.has_data():
                        ax.axis("off")
                        ax.text(0.5, 0.5, "not in this sweep", ha="center", va="center", transform=ax.transAxes, fontsize=8)
                        continue
                    ax.set_xscale("log", base=2)
                    if metric == "median_ms":
                        ax.set_yscale("log")
                    ax.set_xlabel("tokens per side", fontsize=8)
                    ax.set_ylabel(label, fontsize=8)
                    ax.grid(True, alpha=0.3)
                    ax.legend(fontsize=7)
            fig.suptitle(f"SARA loss {pass_name}: {card} (compile: best mode per point)", fontsize=11)
            fig.tight_layout(rect=(0, 0, 1, 0.97))
            path = os.path.join(out_dir, f"{fname}_{pass_name.replace('+', '_')}.png")
            fig.savefig(path, dpi=90)
            plt.close(fig)
            written.append(path)
    return written


CSV_COLUMNS = [
    "model", "layers", "experts", "score", "tokens", "mode", "seq_len", "seqs", "dtype", "pass_name", "contender",
    "variant", "input_form", "status", "median_ms", "p20_ms", "p80_ms", "min_ms", "reps", "cpu_ms_per_call", "min_bytes", "achieved_gbps", "bw_fraction", "triton_speedup",
    "extra_peak_mb", "workspace_mb", "best_compile_mode", "first_call_s", "loss", "loss_rel_diff_vs_reference",
    "copies", "l2_cold_factor", "target_shape", "note",
]


def write_results(out_dir: str, meta: dict, rows: list, final: bool = False) -> dict:
    targets = evaluate_targets(rows)
    payload = dict(meta=meta, targets=targets, rows=rows)
    if final:
        payload["plots"] = write_plots(rows, out_dir, meta["environment"]["card"])
    write_json(os.path.join(out_dir, "results.json"), payload)
    write_csv(os.path.join(out_dir, "results.csv"), rows, CSV_COLUMNS)
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write(summary_markdown(meta, rows, targets))
    return payload


def profile_lines(rows: list) -> list:
    """The profile of the Triton op per case: the "why" behind a missed target."""
    lines = []
    for r in rows:
        b = r.get("kernel_profile")
        if not b:
            continue
        lines += [f"### {r['model']} N={r['tokens']} {r['mode']}", ""]
        if "error" in b:
            lines += [f"- profiler failed: {b['error']}", ""]
            continue
        frac = b["pooling_bw_fraction"]
        cpu = r.get("cpu_ms_per_call")
        lines += [f"- device time {b['device_ms_per_step']} ms per step, of which pooling kernels {b['pooling_ms_per_step']} ms"
                  f" ({'n/a' if frac is None else f'{frac:.2f}'} of copy bandwidth for the case's minimum traffic);"
                  f" median wall time {r['median_ms']:.4g} ms; CPU time to issue one fwd+bwd"
                  f" {'n/a' if cpu is None else f'{cpu:.4g} ms'}", ""]
        for k in b["kernels"]:
            bw = f", {k['bw_fraction']:.2f} of copy bandwidth" if k.get("bw_fraction") is not None else ""
            lines.append(f"  - {k['name']}: {k['ms_per_step']} ms ({k['share']:.0%}), {k['calls_per_step']:g} calls{bw}")
        lines.append("")
    return lines


def summary_markdown(meta: dict, rows: list, targets: list) -> str:
    env = meta["environment"]
    lines = [
        "# SARA loss benchmark",
        "",
        f"Card: {env['card']}; torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}; {env['date']}.",
        f"Copy bandwidth measured in this run: {meta['copy_bandwidth']['gbps']:.0f} GB/s (device-to-device copy_, L2-cold).",
        f"Inputs: per side a tuple of L {meta['dtype']} [N, E] router-logit tensors (torch.compile: one stacked [L, N, E] "
        f"tensor), sequences of {meta['seq_len']} tokens, all valid. Times: p20/median/p80 of {meta['reps']} L2-cold "
        f"repetitions ({'CUDA events' if env['device'].startswith('cuda') else 'wall clock: a CPU logic check, not a measurement'}); "
        f"cpu ms/call: host time to issue one call while the GPU is busy.",
        "",
        "## Targets (48 layers × 128 experts × ≥ 16k tokens per side, bf16)",
        "",
        *(target_lines(targets) or ["- no case at the target shape was measured"]),
        "",
        "## fwd+bwd per case (×: how many times faster the Triton op is; ws: workspace beyond the gradients)",
        "",
        "```",
        format_table(summary_rows(rows), SUMMARY_COLUMNS),
        "```",
        "",
    ]
    profiles = profile_lines(rows)
    if profiles:
        lines += ["## Where the Triton fwd+bwd time goes (torch.profiler, device timeline)", ""] + profiles
    skipped = sorted({f"{r['contender']}: {r.get('note', '')}" for r in rows if r.get("status") == "skipped"})
    failed = [f"{r['contender']} {r.get('variant') or ''} {r['model']} N={r['tokens']} {r['mode']} {r.get('pass_name') or ''}: "
              f"{r['status']}: {r.get('note', '')}" for r in rows if r.get("status") in ("failed", "oom")]
    if skipped or failed:
        lines += ["## Not measured", ""] + [f"- {line}" for line in failed + skipped] + [""]
    return "\n".join(lines)
