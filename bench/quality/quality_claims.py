"""The result rows over the seed sets, and the papers' claims checked against them.

Claims: model soups (Wortsman et al., ICML 2022), TIES-Merging (Yadav et al., NeurIPS 2023),
DARE (Yu et al., ICML 2024), TSV-M (Gargiulo et al., CVPR 2025), ISO-C / ISO-CTS
(Marczak et al., ICML 2025), consensus merging (Wang et al., ICML 2024) and WUDI (Cheng et
al., ICML 2025), each on the mean test exact match over the tasks, with the
noise of the comparison (``quality_stats.versus``).
"""

from __future__ import annotations

from typing import Any

from quality_stats import aggregate, versus

REFERENCE = "TIES"
DISPLAY = [
    "uniform soup",
    "task arithmetic",
    "TIES",
    "DARE-linear",
    "DARE-TIES",
    "TSV-M",
    "ISO-C",
    "ISO-CTS",
    "consensus (TA)",
    "consensus (TIES)",
    "WUDI",
]


def rows(
    base: dict[str, dict[str, float]],
    seed_sets: list[dict[str, Any]],
    soup: dict[str, Any] | None,
    tasks: list[str],
    examples: int,
) -> list[dict[str, Any]]:
    """Every table row, aggregated over the seed sets, with its comparison to TIES.

    ``examples`` is the number of test examples behind one average over the tasks.
    """
    found = [aggregate("base", "base", [{"seed": None, "parameters": {}, "scores": base}], tasks)]
    names = sorted(
        {name for seed_set in seed_sets for name in seed_set.get("rows", {})},
        key=lambda name: _rank(name, tasks),
    )
    for name in names:
        present = [s for s in seed_sets if name in s.get("rows", {})]
        runs = [
            {"seed": s["seed"], "parameters": s["rows"][name]["parameters"], **_scores(s, name)}
            for s in present
        ]
        found.append(aggregate(name, present[0]["rows"][name]["kind"], runs, tasks))
    if soup is not None:
        for name, scores in soup["rows"].items():
            kind = "adapter" if name.startswith("adapter:") else "soup"
            run = {"seed": 0, "parameters": {}, "scores": scores}
            found.append(aggregate(name, kind, [run], tasks))
    reference = next((row for row in found if row["name"] == REFERENCE), None)
    for row in found:
        row["vs_ties"] = None if reference is None else versus(row, reference, examples)
    return found


def _rank(name: str, tasks: list[str]) -> int:
    """Table order: each adapter alone (task order), then the merges in ``DISPLAY`` order."""
    if name.startswith("adapter: ") and name[len("adapter: ") :] in tasks:
        return tasks.index(name[len("adapter: ") :])
    if name in DISPLAY:
        return len(tasks) + DISPLAY.index(name)
    return len(tasks) + len(DISPLAY)


def _scores(seed_set: dict[str, Any], name: str) -> dict[str, Any]:
    return {"scores": seed_set["rows"][name]["scores"]}


def soup_summary(
    soup: dict[str, Any], soup_task: str, adapter_row: dict[str, Any]
) -> dict[str, Any]:
    """The greedy soup against its best ingredient on the soup task's test split."""
    report = soup["report"]
    labels = soup["labels"]
    by_label = {
        label: (
            adapter_row["runs"][0]["scores"][soup_task]
            if label == soup_task
            else soup["rows"][f"adapter: {label}"][soup_task]
        )
        for label in labels.values()
    }
    greedy = next(name for name in soup["rows"] if name.startswith("greedy soup"))
    best_label = labels[report["best_single"]["reference"]]
    return {
        "soup": soup["rows"][greedy][soup_task]["exact_match"],
        "best_single": by_label[best_label]["exact_match"],
        "best_single_label": best_label,
        "best_on_test": max(scores["exact_match"] for scores in by_label.values()),
    }


def claims(
    found: list[dict[str, Any]], soup: dict[str, Any] | None, examples: int
) -> list[dict[str, Any]]:
    """The papers' claims, checked against the mean test scores."""
    by_name = {row["name"]: row for row in found}

    def pct(value: float) -> str:
        return f"{100 * value:.1f}%"

    checked = []
    if soup is not None:
        test = soup["test"]
        checked.append(
            {
                "claim": "greedy soup ≥ best single ingredient (Wortsman et al. 2022), test "
                f"split of `{soup['task']}`, seed set 0",
                "measured": f"greedy soup {pct(test['soup'])} vs best ingredient by "
                f"validation {pct(test['best_single'])} (best on test: "
                f"{pct(test['best_on_test'])})",
                "holds": test["soup"] >= test["best_single"],
                "beyond_noise": None,
            }
        )
    ordered = [
        ("TIES", "task arithmetic", "TIES > task arithmetic (Yadav et al. 2023)"),
        ("task arithmetic", "uniform soup", "task arithmetic > averaging (Yadav et al. 2023)"),
        ("TIES", "uniform soup", "TIES > averaging (Yadav et al. 2023)"),
        ("DARE-linear", "task arithmetic", "DARE does not hurt task arithmetic (Yu et al. 2024)"),
        ("DARE-TIES", "TIES", "DARE does not hurt TIES (Yu et al. 2024)"),
        ("TSV-M", "TIES", "TSV-M > TIES (Gargiulo et al. 2025)"),
        ("ISO-C", "TIES", "ISO-C > TIES (Marczak et al. 2025)"),
        ("ISO-CTS", "TIES", "ISO-CTS > TIES (Marczak et al. 2025)"),
        ("ISO-CTS", "ISO-C", "ISO-CTS > ISO-C (Marczak et al. 2025)"),
        ("consensus (TA)", "task arithmetic", "consensus TA > task arithmetic (Wang et al. 2024)"),
        ("consensus (TIES)", "TIES", "consensus TIES > TIES (Wang et al. 2024)"),
        ("WUDI", "TIES", "WUDI > TIES (Cheng et al. 2025)"),
    ]
    for better, worse, text in ordered:
        if better not in by_name or worse not in by_name:
            continue
        a, b = by_name[better], by_name[worse]
        comparison = versus(a, b, examples)
        difference = comparison["difference"]
        holds: bool | None = None if difference == 0 else difference > 0
        if text.startswith("DARE"):
            holds = difference >= 0
        checked.append(
            {
                "claim": f"{text}, mean test exact match over the tasks",
                "measured": f"{better} {pct(a['average']['exact_match'])} vs {worse} "
                f"{pct(b['average']['exact_match'])} (difference {100 * difference:+.1f} ± "
                f"{100 * comparison['noise']:.1f} points)",
                "holds": holds,
                "beyond_noise": comparison["beyond_noise"],
            }
        )
    return checked
