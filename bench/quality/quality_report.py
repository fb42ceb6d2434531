"""The experiment's outputs: the markdown tables, the claims checked, and the two plots.

Everything here reads the results document that ``run.py`` builds (the same dictionary that
is written as ``results.json``), so the tables and the plots can be redrawn from the JSON:
``python bench/quality/quality_report.py bench/quality/results``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from quality_stats import binomial_half_width

METRICS = ("exact_match", "token_accuracy", "loss")


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def _loss(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _cell(value: float, std: float | None, metric: str) -> str:
    show = _loss if metric == "loss" else _percent
    if std is None:
        return show(value)
    return f"{show(value)} ± {_loss(std) if metric == 'loss' else _percent(std)}"


def versus_cell(row: dict[str, Any]) -> str:
    """The difference of average exact match to TIES, in points, and whether it is noise."""
    comparison = row.get("vs_ties")
    if row["name"] == "TIES" or comparison is None:
        return "–"
    verdict = "beyond noise" if comparison["beyond_noise"] else "within noise"
    return f"{100 * comparison['difference']:+.1f} ± {100 * comparison['noise']:.1f} ({verdict})"


def score_table(results: dict[str, Any], metric: str) -> str:
    """One markdown table: a row per model, a column per task and the average (mean ± std)."""
    tasks = [task["name"] for task in results["tasks"]]
    versus = metric == "exact_match"
    lines = [
        "| model | runs | " + " | ".join(tasks) + " | average |" + (" vs TIES |" if versus else ""),
        "|---|---:|" + "---:|" * (len(tasks) + 1) + ("---|" if versus else ""),
    ]
    for row in results["rows"]:
        cells = [_cell(row["scores"][t][metric], row["std"][t][metric], metric) for t in tasks]
        average = _cell(row["average"][metric], row["average_std"][metric], metric)
        line = f"| {row['name']} | {len(row['runs'])} | " + " | ".join(cells) + f" | {average} |"
        lines.append(line + (f" {versus_cell(row)} |" if versus else ""))
    return "\n".join(lines)


def noise_table(results: dict[str, Any]) -> str:
    """The binomial 95 % half-width (points) of one test score at each row's mean."""
    tasks = results["tasks"]
    lines = [
        "| model | " + " | ".join(t["name"] for t in tasks) + " | average |",
        "|---|" + "---:|" * (len(tasks) + 1),
    ]
    examples = sum(t["test"] for t in tasks)
    for row in results["rows"]:
        cells = [
            _percent(binomial_half_width(row["scores"][t["name"]]["exact_match"], t["test"]))
            for t in tasks
        ]
        average = _percent(binomial_half_width(row["average"]["exact_match"], examples))
        lines.append(f"| {row['name']} | " + " | ".join(cells) + f" | {average} |")
    return "\n".join(lines)


def _setting(parameters: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in parameters.items() if not isinstance(v, list))


def chosen_table(results: dict[str, Any]) -> str:
    """The setting each method chose on validation, per seed set."""
    seeds = [s["seed"] for s in results["seed_sets"]]
    lines = [
        "| method | " + " | ".join(f"seed set {s}" for s in seeds) + " |",
        "|---|" + "---|" * len(seeds),
    ]
    for method in results["seed_sets"][0]["selection"]:
        cells = [
            _setting(s["selection"][method]["chosen"]) if method in s["selection"] else "–"
            for s in results["seed_sets"]
        ]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def selection_table(results: dict[str, Any]) -> str:
    """Every hyper-parameter tried on the validation split, with its score."""
    lines = [
        "| seed set | method | setting | validation exact match (%) | validation loss | chosen |",
        "|---:|---|---|---:|---:|:---:|",
    ]
    for seed_set in results["seed_sets"]:
        for method, search in seed_set["selection"].items():
            for trial in search["trials"]:
                chosen = "✓" if trial["parameters"] == search["chosen"] else ""
                validation = trial["validation"]
                lines.append(
                    f"| {seed_set['seed']} | {method} | {_setting(trial['parameters'])} | "
                    f"{_percent(validation['exact_match'])} | {_loss(validation['loss'])} | "
                    f"{chosen} |"
                )
    return "\n".join(lines)


def claims_table(results: dict[str, Any]) -> str:
    """The papers' claims and whether this run agrees, beyond the noise or not."""
    lines = ["| claim (paper) | measured here | agrees | beyond noise |", "|---|---|:---:|:---:|"]
    for claim in results["claims"]:
        verdict = {True: "yes", False: "no", None: "tie"}[claim["holds"]]
        noise = {True: "yes", False: "no", None: "–"}[claim["beyond_noise"]]
        lines.append(f"| {claim['claim']} | {claim['measured']} | {verdict} | {noise} |")
    return "\n".join(lines)


def markdown(results: dict[str, Any]) -> str:
    """The whole markdown report."""
    timings = results["timings_s"]
    machine = results["machine"]
    soup = results.get("greedy_soup")
    parts = [
        f"# Merge quality on {results['base']['name']}",
        "",
        f"Run {results['date']} on {machine['description']} (device `{machine['device']}`), "
        f"{timings['total']:.0f} s in total. Command: `{results['command']}`. Seed sets: "
        f"{results['seeds_completed']} of {results['seeds_requested']} requested.",
        "",
        code_line(results.get("code")),
        "",
        "Each cell is the mean ± sample standard deviation over the seed sets (`runs`: how "
        "many; one run shows no deviation). *vs TIES*: the difference of average exact "
        "match to TIES, in points, ± the 95 % noise of that difference (seed sets and the "
        "finite test split together, see `quality_stats.py`).",
        "",
        "## Held-out test: exact match (%), greedy decoding",
        "",
        score_table(results, "exact_match"),
        "",
        "## Test noise: binomial 95 % half-width (points) of one score at the row's mean",
        "",
        noise_table(results),
        "",
        "## Held-out test: token accuracy (%), teacher-forced",
        "",
        score_table(results, "token_accuracy"),
        "",
        "## Held-out test: loss per completion token",
        "",
        score_table(results, "loss"),
        "",
        "## The papers' claims",
        "",
        claims_table(results),
        "",
        "## Settings chosen on the validation split (mean exact match over the tasks)",
        "",
        chosen_table(results),
        "",
        "Methods linear in their scale ("
        + ", ".join(m["name"] for m in results.get("methods", []) if m["rescaled"])
        + ") merge once per seed set at scale 1; each scale of the grid is θ₀ + α·(merge − θ₀).",
        "",
        "### Every setting tried",
        "",
        selection_table(results),
        "",
    ]
    if soup is not None:
        parts += [
            f"## Greedy soup over the `{soup['task']}` runs (validation exact match, seed set 0)",
            "",
            "| step | ingredient | candidate score (%) | kept |",
            "|---:|---|---:|:---:|",
        ]
        for step in soup_steps(results):
            kept = "✓" if step["kept"] else ""
            parts.append(
                f"| {step['step']} | {step['label']} | {_percent(step['score'])} | {kept} |"
            )
        parts.append("")
    parts += [
        "## Time",
        "",
        "| phase | seconds |",
        "|---|---:|",
        *(f"| {phase} | {seconds:.1f} |" for phase, seconds in timings.items()),
        "",
    ]
    return "\n".join(parts)


def code_line(code: dict[str, Any] | None) -> str:
    """Which code ran: the commit, and the engine files changed since."""
    if not code or not code.get("commit"):
        return "Code: unknown commit."
    line = f"Code: commit `{code['commit'][:12]}`"
    changed = code.get("uncommitted_changes") or []
    if changed:
        line += " with uncommitted changes to " + ", ".join(f"`{name}`" for name in changed)
    return line + "."


def soup_steps(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The greedy soup's candidates in the order tried: the best ingredient, then each step."""
    soup = results["greedy_soup"]
    report = soup["report"]
    labels = soup["labels"]
    first = report["best_single"]
    steps = [
        {"step": 0, "label": labels[first["reference"]], "score": first["score"], "kept": True}
    ]
    steps += [
        {
            "step": step["step"],
            "label": "+ " + labels[step["ingredient"]],
            "score": step["candidate_score"],
            "kept": step["kept"],
        }
        for step in report["steps"]
    ]
    return steps


def plot_greedy_soup(results: dict[str, Any], path: Path) -> bool:
    """Draw the greedy soup's steps as a PNG; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    soup = results["greedy_soup"]
    report = soup["report"]
    steps = soup_steps(results)
    figure, axis = plt.subplots(figsize=(7, 4.2), dpi=120)
    xs = [s["step"] for s in steps]
    ys = [100 * (s["score"] or 0.0) for s in steps]
    best: list[float] = []
    running = ys[0]
    for step, y in zip(steps, ys, strict=True):
        if step["kept"]:
            running = y
        best.append(running)
    axis.plot(xs, best, color="tab:blue", drawstyle="steps-post", label="soup (best so far)")
    for step, x, y in zip(steps, xs, ys, strict=True):
        axis.scatter(
            [x],
            [y],
            color="tab:green" if step["kept"] else "tab:red",
            marker="o" if step["kept"] else "x",
            zorder=3,
        )
        axis.annotate(step["label"], (x, y), textcoords="offset points", xytext=(4, 6), fontsize=7)
    for ingredient in report["ingredients"]:
        axis.axhline(100 * (ingredient["score"] or 0.0), color="grey", linestyle=":", linewidth=0.8)
    test = soup["test"]
    axis.set_title(
        f"Greedy soup over {len(report['ingredients'])} `{soup['task']}` runs\n"
        f"test exact match: soup {_percent(test['soup'])}%, "
        f"best single (by validation) {_percent(test['best_single'])}%",
        fontsize=9,
    )
    axis.set_xlabel("step (ingredients tried best first; green kept, red rejected)")
    axis.set_ylabel("validation exact match (%)")
    axis.set_xticks(xs)
    axis.set_xlim(-0.3, xs[-1] + 0.7)
    axis.legend(loc="lower right", fontsize=8, title="dotted: each run alone", title_fontsize=7)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return True


def plot_methods(results: dict[str, Any], path: Path) -> bool:
    """Average test exact match per model, mean ± std over the seed sets, as a PNG.

    Returns False when matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    shown = [row for row in results["rows"] if row["kind"] in ("base", "merge")]
    names = [row["name"] for row in shown]
    means = [100 * row["average"]["exact_match"] for row in shown]
    errors = [100 * (row["average_std"]["exact_match"] or 0.0) for row in shown]
    figure, axis = plt.subplots(figsize=(8, 4.2), dpi=120)
    colors = ["tab:orange" if name == "TIES" else "tab:blue" for name in names]
    axis.bar(names, means, yerr=errors, capsize=4, color=colors)
    ceiling = [
        100 * row["scores"][row["name"].split(": ", 1)[1]]["exact_match"]
        for row in results["rows"]
        if row["kind"] == "adapter" and row["name"].split(": ", 1)[1] in row["scores"]
    ]
    if ceiling:
        axis.axhline(
            sum(ceiling) / len(ceiling),
            color="grey",
            linestyle=":",
            label="each adapter on its own task (mean)",
        )
        axis.legend(loc="upper left", fontsize=8)
    runs = results["seeds_completed"]
    axis.set_title(
        f"{results['base']['name']}: average test exact match over the tasks\n"
        f"mean ± std over {runs} seed set{'s' if runs != 1 else ''}",
        fontsize=9,
    )
    axis.set_ylabel("exact match (%)")
    axis.set_ylim(0, 100)
    axis.tick_params(axis="x", labelrotation=30, labelsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return True


if __name__ == "__main__":
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "bench/quality/results")
    document = json.loads((folder / "results.json").read_text(encoding="utf-8"))
    (folder / "results.md").write_text(markdown(document), encoding="utf-8")
    plot_methods(document, folder / "methods.png")
    if document.get("greedy_soup") is not None:
        plot_greedy_soup(document, folder / "greedy_soup.png")
