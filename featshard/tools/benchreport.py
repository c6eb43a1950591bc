"""`featshard bench` output: the text table (stdout) and the bar chart (bench.png) from the bench.json dict."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from featshard.store.atomic import write_atomic


def label(key: str, row: dict[str, Any]) -> str:
    """Human name of a measured row."""
    if key == "decode_device":
        return f"decode on the device (nvJPEG; {row.get('processes', '?')} loader procs, batch {row.get('batch')})"
    if key.startswith("decode_"):
        return f"decode {key[7:]} ({row.get('processes', '?')} procs)"
    if key.startswith("model_"):
        prec = key[6:].replace("_compiled", " compiled")
        return f"model only {prec} (batch {row.get('batch')}, {row.get('threads')} thr)"
    names = {"run": "featshard run", "run_compiled": "featshard run --graph compile", "run_gpu_decode":
             "featshard run --decode gpu", "seed_loop":
             "seed loop (PIL, batch 1, fp32)", "plain_loader": "plain DataLoader (b64, fp32, "
             f"num_workers={row.get('num_workers')})", "plain_loader_workers": "plain DataLoader (b64, fp32, "
             f"num_workers={row.get('num_workers')})"}
    return names.get(key, key)


def _line(name: str, rate: float, row: dict[str, Any] | None = None) -> str:
    row = row or {}
    runs = "/".join(f"{x:.0f}" for x in row.get("all", [])) or "-"
    per_img = f"{row['cpu_s'] / row['images'] * 1000:.1f}" if row.get("images") and "cpu_s" in row else "-"
    rss = f"{row['peak_pss_tree_mb']:.0f}/{row['peak_rss_coordinator_mb']:.0f}/{row['peak_rss_largest_child_mb']:.0f}" \
        if "peak_pss_tree_mb" in row else "-"
    return f"  {name:<60} {rate:>8.1f} {runs:>17} {per_img:>9} {rss:>15}"


def model_table(name: str, m: dict[str, Any]) -> list[str]:
    out = [f"{name} (precision {m['precision']}, {m['images']} images)",
           f"  {'stage / pipeline':<60} {'img/s':>8} {'runs':>17} {'cpu ms/img':>9} {'MB pss/co/w':>15}"]
    for key, row in m["rows"].items():
        out.append(_line(label(key, row), row["median"], row))
        if key.startswith("run") and "steady_median" in row:
            out.append(_line(f"{label(key, row)}, steady state", row["steady_median"]))
    for run_key, r in m["ratios"].items():
        t = r["targets"]
        out.append(_line(f"stage bound for {run_key}", r["stage_bound"]))
        busy = f", model busy {100 * r['model_busy']:.0f}% of the steady state" if r.get("model_busy") else ""
        out.append(f"  {run_key}: steady/bound {r['steady_vs_bound']:.2f} (target >= {t['bound']}){busy}, whole/bound "
                   f"{r['whole_vs_bound']:.2f}; vs seed loop {r['vs_seed_loop']:.2f}x whole, "
                   f"{r['steady_vs_seed_loop']:.2f}x steady" + (f" (target >= {t['seed']}x)" if t["seed"] else "")
                   + f"; vs plain DataLoader {r['vs_plain_loader']:.2f}x whole, {r['steady_vs_plain_loader']:.2f}x "
                   "steady" + (f" (target >= {t['plain']}x)" if t["plain"] else ""))
    return out


def fidelity_lines(f: dict[str, Any]) -> list[str]:
    out = [f"fidelity vs exact decode + fp32 ({f['model']}, {f['weights']} weights, {f['images']} images, "
           f"{f['device']}): cosine mean / min (floor)"]
    for key in ("graph_jit", "decode_fast", "bf16", "fp16", "compiled", "decode_device"):
        if key in f:
            extra = f" [{f[key].get('precision') or f[key].get('decoder')}]" if len(f[key]) > 3 else ""
            if "same_outcome" in f[key]:
                rows = "same" if f[key]["same_outcome"] else "DIFFERENT: " + ", ".join(f[key]["mismatched"][:8])
                extra += f"; {f[key]['n']} ok + {f[key]['failed']} failed rows, ok/failed {rows} as exact"
            out.append(f"  {key:<14} {f[key]['mean']:.5f} / {f[key]['min']:.5f} (>= {f['floors'][key]}){extra}")
    out.append("  below floor: " + (", ".join(f["below_floor"]) or "none"))
    return out


def table(result: dict[str, Any]) -> str:
    mach = result["machine"]
    load = " ".join(f"{x:.1f}" for x in mach["load_avg_start"]) + " -> " + \
        " ".join(f"{x:.1f}" for x in mach.get("load_avg_end", ()))
    out = [f"featshard bench: {mach['cores']} cores ({mach['cpu']}), bf16 {mach['cpu_bf16']}, "
           f"{mach.get('gpu', 'no GPU')}; Pillow {mach['pillow']} (simd {mach['pillow_simd']}, libjpeg-turbo "
           f"{mach['libjpeg_turbo']}); load average {load}", ""]
    for name, m in result["models"].items():
        out += model_table(name, m) + [""]
    if "fidelity" in result:
        out += fidelity_lines(result["fidelity"]) + [""]
    if "index" in result:
        out += ["index bench (merge vs plain faiss):", result["index"].get("table") or str(result["index"]), ""]
    out.append(f"bench process peak RSS {result['bench_peak_rss_mb']:.0f} MB")
    return "\n".join(out)


def plot(result: dict[str, Any], path: Path) -> None:
    """One horizontal bar chart per model: images/s of every measured row (median), the stage bound dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = result["models"]
    fig, axes = plt.subplots(len(models), 1, figsize=(10, 1.2 + 0.42 * max(len(m["rows"]) + 2 for m in
                                                                           models.values()) * len(models)),
                             squeeze=False)
    for ax, (name, m) in zip(axes[:, 0], models.items()):
        names, rates, colours = [], [], []
        for key, row in m["rows"].items():
            names.append(label(key, row))
            rates.append(row["median"])
            colours.append("#4c72b0" if key.startswith(("decode", "model")) else
                           "#dd8452" if key.startswith(("seed", "plain")) else "#55a868")
            if key.startswith("run") and "steady_median" in row:
                names.append(f"{label(key, row)}, steady")
                rates.append(row["steady_median"])
                colours.append("#8fd19e")
        y = list(range(len(names)))[::-1]
        ax.barh(y, rates, color=colours)
        ax.set_yticks(y, names, fontsize=8)
        for yi, rate in zip(y, rates):
            ax.text(rate, yi, f" {rate:.0f}" if rate >= 10 else f" {rate:.1f}", va="center", fontsize=8)
        for r in m["ratios"].values():
            ax.axvline(r["stage_bound"], color="grey", linestyle="--", linewidth=1)
        ax.set_title(f"{name} ({m['precision']}): images/s, median of runs; dashed = stage bound", fontsize=10)
        ax.set_xlim(0, max(rates) * 1.15)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
