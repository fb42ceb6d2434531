"""The experiment's outputs: the markdown table, the claims checked, the greedy-soup plot.

Everything here reads the results document that ``run.py`` builds (the same dictionary that
is written as ``results.json``), so the table and the plot can be redrawn from the JSON.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

METRICS = ("exact_match", "token_accuracy", "loss")


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def _loss(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def score_table(results: dict[str, Any], metric: str) -> str:
    """One markdown table: a row per model, a column per task and the average."""
    tasks = [task["name"] for task in results["tasks"]]
    show = _loss if metric == "loss" else _percent
    lines = [
        "| model | " + " | ".join(tasks) + " | average |",
        "|---|" + "---:|" * (len(tasks) + 1),
    ]
    for row in results["rows"]:
        cells = [show(row["scores"][task][metric]) for task in tasks]
        lines.append(
            f"| {row['name']} | " + " | ".join(cells) + f" | {show(row['average'][metric])} |"
        )
    return "\n".join(lines)


def selection_table(results: dict[str, Any]) -> str:
    """Every hyper-parameter tried on the validation split, with its score."""
    lines = [
        "| method | setting | validation exact match (%) | validation loss | chosen |",
        "|---|---|---:|---:|:---:|",
    ]
    for method, search in results["selection"].items():
        for trial in search["trials"]:
            setting = ", ".join(f"{k}={v}" for k, v in trial["parameters"].items())
            chosen = "✓" if trial["parameters"] == search["chosen"] else ""
            validation = trial["validation"]
            lines.append(
                f"| {method} | {setting} | {_percent(validation['exact_match'])} | "
                f"{_loss(validation['loss'])} | {chosen} |"
            )
    return "\n".join(lines)


def claims_table(results: dict[str, Any]) -> str:
    """The papers' claims and whether this run agrees."""
    lines = ["| claim (paper) | measured here | agrees |", "|---|---|:---:|"]
    for claim in results["claims"]:
        verdict = {True: "yes", False: "no", None: "tie"}[claim["holds"]]
        lines.append(f"| {claim['claim']} | {claim['measured']} | {verdict} |")
    return "\n".join(lines)


def markdown(results: dict[str, Any]) -> str:
    """The whole markdown report."""
    timings = results["timings_s"]
    machine = results["machine"]
    soup = results["greedy_soup"]
    parts = [
        f"# Merge quality on {results['base']['name']}",
        "",
        f"Run {results['date']} on {machine['description']} (device `{machine['device']}`), "
        f"{timings['total']:.0f} s in total. Command: `{results['command']}`.",
        "",
        code_line(results.get("code")),
        "",
        "## Held-out test: exact match (%), greedy decoding",
        "",
        score_table(results, "exact_match"),
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
        "## Hyper-parameters chosen on the validation split (mean over the tasks)",
        "",
        selection_table(results),
        "",
        f"## Greedy soup over the `{soup['task']}` runs (validation exact match)",
        "",
        "| step | ingredient | candidate score (%) | kept |",
        "|---:|---|---:|:---:|",
    ]
    for step in soup_steps(results):
        kept = "✓" if step["kept"] else ""
        parts.append(f"| {step['step']} | {step['label']} | {_percent(step['score'])} | {kept} |")
    parts += [
        "",
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
