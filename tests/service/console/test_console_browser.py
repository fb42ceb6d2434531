"""The console in headless Chromium against a real server: editor, live jobs, auth, weight."""

from __future__ import annotations

import os
import re
import signal
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from service.jobs.models import Job, JobStatus, OutputOptions
from service.jobs.sqlite_store import SqliteJobStore
from tests.service.api.conftest import (
    TOKEN,
    LiveServer,
    dare_recipe,
    pause_mid_merge,
    wait_for,
)
from tests.service.console.conftest import playwright_sync

Page = playwright_sync.Page
expect = playwright_sync.expect

#: The issue's budget for the first load, in bytes transferred.
FIRST_LOAD_BYTES = 300_000


def tiny_yaml(root: Path, *models: str, method: str = "ties", name: str | None = None) -> str:
    """A recipe over ``root/base`` and ``models`` as the editor would hold it."""
    lines = [f"merge_method: {method}", f"base_model: {root}/base", "models:"]
    for model in models:
        lines += [f"  - model: {root}/{model}", "    parameters: {weight: 0.5, density: 0.5}"]
    if name:
        lines.append(f"output: {{name: {name}}}")
    return "\n".join(lines) + "\n"


def test_first_load_is_light_and_quick(browser: Any, page: Page, server: LiveServer) -> None:
    # A first visit in another context starts the browser's renderer and the server's
    # handlers; the measured tab still has an empty cache of its own.
    warm = browser.new_context(base_url=server.url)
    warm.new_page().goto("/")
    warm.close()
    transferred: dict[str, int] = {}

    def count(request: Any) -> None:
        sizes = request.sizes()
        transferred[request.url] = sizes["responseBodySize"] + sizes["responseHeadersSize"]

    page.on("requestfinished", count)
    page.goto("/")
    expect(page.locator("#page-position")).to_have_text(re.compile(r"\S"))
    interactive_ms = page.evaluate("performance.now()")
    # The page, its script modules and style sheet, and the first page of jobs.
    assert any(url.endswith("/console/static/console.js") for url in transferred)
    assert sum(transferred.values()) <= FIRST_LOAD_BYTES, transferred
    assert all(url.startswith(page.url.split("#")[0].rstrip("/")) for url in transferred)
    assert interactive_ms <= 1000, f"interactive after {interactive_ms:.0f} ms"


def test_without_a_token_the_console_shows_401_and_nothing_else(
    anonymous_page: Page, server: LiveServer
) -> None:
    statuses: list[int] = []
    anonymous_page.on("response", lambda r: statuses.append(r.status) if "/v1/" in r.url else None)
    anonymous_page.goto("/#/jobs")
    expect(anonymous_page.locator("#unauthorized .code")).to_have_text("401")
    assert statuses and set(statuses) == {401}
    expect(anonymous_page.locator("#jobs")).to_have_count(0)

    anonymous_page.fill("#token", "not-the-token")
    anonymous_page.press("#token", "Enter")
    expect(anonymous_page.locator("#unauthorized")).to_contain_text("refused")

    anonymous_page.fill("#token", TOKEN)
    anonymous_page.press("#token", "Enter")
    expect(anonymous_page.locator("#jobs")).to_be_visible()
    anonymous_page.click("#sign-out")
    expect(anonymous_page.locator("#unauthorized .code")).to_have_text("401")


def test_a_bad_recipe_gets_its_plan_error_named(page: Page, models_root: Path) -> None:
    page.goto("/#/new")
    page.fill("#recipe", tiny_yaml(models_root, "ft1").replace("ties", "tiess"))
    error = page.locator("#plan .plan-error")
    expect(error).to_contain_text("merge_method")
    expect(error).to_contain_text("ties")  # "did you mean"

    page.fill("#recipe", tiny_yaml(models_root, "ft1", "odd"))
    expect(error).to_have_attribute("data-code", "incompatible_checkpoints")
    expect(error.locator("li").first).to_be_visible()
    expect(error).to_contain_text("embed_tokens")  # the mismatching tensor, by name

    page.fill("#recipe", tiny_yaml(models_root, "ft1", "ft2"))
    expect(page.locator("#plan .ok")).to_have_text("Plan OK")
    expect(page.locator("#plan")).to_contain_text("peak memory")
    expect(page.locator("#method")).to_contain_text("density")  # the method's parameters


def test_a_pasted_mergekit_config_is_imported_and_planned(page: Page, models_root: Path) -> None:
    # mergekit's examples/ties.yml, with this test's checkpoints for its models.
    mergekit = f"""models:
  - model: {models_root}/ft1
    parameters:
      density: [1, 0.7, 0.1] # density gradient
      weight: 1.0
  - model: {models_root}/ft2
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1] # weight gradient
merge_method: ties
base_model: {models_root}/base
parameters:
  normalize: true
  int8_mask: true
dtype: float16
"""
    page.goto("/#/new")
    page.get_by_role("button", name="Import mergekit config").click()
    page.fill("#import-text", mergekit)
    page.get_by_role("button", name="Import", exact=True).click()
    assert page.input_value("#recipe") == mergekit
    expect(page.locator("#plan .ok")).to_have_text("Plan OK")
    expect(page.locator("#plan tr")).to_have_count(4)  # the header, the base, two models


def test_the_picker_inserts_a_checkpoint_from_an_allowed_root(
    page: Page, models_root: Path
) -> None:
    page.goto("/#/new")
    page.fill("#recipe", "")
    page.get_by_role("button", name=str(models_root), exact=True).click()
    page.locator('button[data-reference$="/ft1"]').click()
    assert page.input_value("#recipe") == f"{models_root}/ft1"


def test_submit_watch_cancel_and_download(
    browser: Any, page: Page, server: LiveServer, models_root: Path
) -> None:
    with server.client() as client:
        # The only worker is held (stopped) mid-merge, so the console's job waits in the queue.
        slow = dare_recipe(models_root / "larger") | {
            "output": {"shard_size": 1_000_000, "name": "blocker"}
        }
        blocker = client.post("/v1/merges", json=slow).json()
        worker = pause_mid_merge(
            client, blocker["id"], server.settings.outputs_dir / ".blocker.tureen-partial"
        )
    try:
        events: list[str] = []
        page.on("response", lambda r: events.append(r.url) if r.url.endswith("/events") else None)
        page.goto("/#/new")
        page.fill("#recipe", tiny_yaml(models_root, "ft1", "ft2"))
        expect(page.locator("#plan .ok")).to_be_visible()
        page.click("#submit")
        page.wait_for_url(re.compile(r"#/merges/\w+$"))
        job_id = page.url.rsplit("/", 1)[1]
        expect(page.locator("#status .badge")).to_have_text("queued")

        # Cancel the blocker from its own page, in a second tab.
        other = page.context.new_page()
        other.goto(f"/#/merges/{blocker['id']}")
        with other.expect_response(lambda r: r.request.method == "DELETE") as cancelled:
            other.click("#cancel")
        assert cancelled.value.json()["cancel_requested"] is True
        time.sleep(0.6)  # the worker reads the cancel flag every 0.5 s (see test_merges)
    finally:
        os.kill(worker, signal.SIGCONT)
    expect(other.locator("#status .badge")).to_have_text("cancelled", timeout=30_000)

    # The first tab follows its job to the end through the event stream, without reloading.
    expect(page.locator("#status .badge")).to_have_text("succeeded", timeout=30_000)
    assert any(f"/v1/merges/{job_id}/events" in url for url in events)
    assert page.locator("#progress").evaluate("node => node.value") == 1
    expect(page.locator("#model-card")).to_contain_text("TIES")

    with page.expect_download() as started:
        page.click('a.download[data-file="model.safetensors"]')
    downloaded = Path(started.value.path())
    written = server.settings.outputs_dir / job_id / "model.safetensors"
    assert downloaded.read_bytes() == written.read_bytes()
    expect(page.locator("#log")).to_contain_text("succeeded")


def _bulk_job(index: int) -> Job:
    created = datetime(2020, 1, 1, tzinfo=UTC) + timedelta(minutes=index)
    return Job(
        id=f"bulk{index:04d}",
        status=JobStatus.SUCCEEDED if index % 2 else JobStatus.FAILED,
        recipe={"merge_method": "linear", "models": []},
        output=OutputOptions(),
        created_at=created,
        finished_at=created,
    )


def test_a_thousand_jobs_page_quickly(page: Page, server: LiveServer) -> None:
    store = SqliteJobStore(server.settings.database_path)
    try:
        for index in range(1000):
            store.create(_bulk_job(index))
    finally:
        store.close()
    with server.client() as client:
        total = sum(
            client.get(f"/v1/{kind}?limit=1").json()["total"] for kind in ("merges", "trainings")
        )
    assert total >= 1000

    page.goto("/#/jobs")
    position = page.locator("#page-position")
    expect(position).to_have_text(f"1–50 of {total}", timeout=2_000)
    expect(page.locator("#jobs tbody tr")).to_have_count(50)
    first_row = page.locator("#jobs tbody tr").first.get_attribute("data-job")
    page.click("#next-page")
    expect(position).to_have_text(f"51–100 of {total}", timeout=2_000)
    assert page.locator("#jobs tbody tr").first.get_attribute("data-job") != first_row
    page.click("#previous-page")
    expect(position).to_have_text(f"1–50 of {total}", timeout=2_000)

    page.select_option("#status-filter", "failed")
    expect(position).to_have_text(re.compile(r"^1–50 of 5\d\d$"), timeout=2_000)
    for _ in range(9):
        page.click("#next-page")
    expect(position).to_have_text(re.compile(r"^451–500 of 5\d\d$"), timeout=2_000)
    expect(page.locator("#jobs tbody tr").last).to_have_attribute("data-job", re.compile("bulk"))


@pytest.fixture
def evaluated_jobs(server: LiveServer) -> dict[str, Any]:
    """A greedy soup's and a scored merge's records, with reports as the engine writes them."""
    from merge_kernels.candidates import Score
    from merge_kernels.greedy_search import SearchResult, SoupStep

    class Evaluator:
        name = "held_out:accuracy"
        higher_is_better = True

    references = ["org/a", "org/b", "org/c"]
    search = SearchResult(
        references=references,
        ingredient_scores=[Score(0.70), Score(0.60), Score(0.65)],
        order=[0, 2, 1],
        steps=[
            SoupStep(1, "org/c", Score(0.74), True, ["org/a", "org/c"]),
            SoupStep(2, "org/b", Score(0.72), False, ["org/a", "org/c"]),
        ],
        kept=[0, 2],
        best=0.74,
    )
    soup_report = search.report(Evaluator(), "greedy")  # type: ignore[arg-type]
    scored_report = {
        "method": "ties",
        "evaluator": "held_out:loss",
        "higher_is_better": False,
        "merge": {"score": 1.5, "metrics": {"loss": 1.5}},
        "inputs": [
            {"reference": "org/base", "role": "base", "score": 2.0, "metrics": {"loss": 2.0}},
            {"reference": "org/ft", "role": "model", "score": 1.7, "metrics": {"loss": 1.7}},
        ],
        "best_input": {"reference": "org/ft", "score": 1.7},
        "beats_best_input": True,
        "evaluations": 3,
    }
    store = SqliteJobStore(server.settings.database_path)
    now = datetime.now(UTC)
    jobs = {}
    try:
        for name, method, report in (
            ("soup", "greedy_soup", soup_report),
            ("scored", "ties", scored_report),
        ):
            job = Job(
                id=f"evaluated-{name}",
                status=JobStatus.FAILED,  # finished, without output files to list
                recipe={"merge_method": method},
                output=OutputOptions(),
                created_at=now,
                evaluation=report,
            )
            jobs[name] = store.create(job)[0]
    finally:
        store.close()
    return jobs


def test_evaluation_views_draw_scores_and_decisions(
    page: Page, evaluated_jobs: dict[str, Any]
) -> None:
    page.goto(f"/#/merges/{evaluated_jobs['soup'].id}")
    soup = page.locator("#soup")
    expect(soup.locator("tr.kept")).to_have_count(2)
    expect(soup.locator("tr.rejected")).to_have_count(1)
    expect(soup.locator("tr.rejected")).to_contain_text("org/b")
    expect(soup.locator("svg circle.kept")).to_have_count(1)  # org/c, kept when added
    expect(soup.locator("svg circle.rejected")).to_have_count(1)
    expect(soup.locator("svg circle.ingredient")).to_have_count(3)

    page.goto(f"/#/merges/{evaluated_jobs['scored'].id}")
    scores = page.locator("#merge-scores")
    expect(scores.locator("svg rect.bar")).to_have_count(3)
    expect(scores).to_contain_text("beats its best input")
    expect(scores.locator("tr").last).to_contain_text("ties merge")


def test_compare_diffs_recipes_and_draws_the_change_per_layer(
    page: Page, server: LiveServer, models_root: Path
) -> None:
    with server.client() as client:
        ids = []
        for method in ("ties", "task_arithmetic"):
            body = tiny_yaml(models_root, "ft1", "ft2", method=method)
            response = client.post(
                "/v1/merges", content=body, headers={"Content-Type": "application/yaml"}
            )
            ids.append(response.json()["id"])
        for job_id in ids:
            assert wait_for(client, job_id)["status"] == "succeeded"
    page.goto(f"/#/compare?a={ids[0]}&b={ids[1]}")
    expect(page.locator("#diff-a .del")).to_contain_text("ties")
    expect(page.locator("#diff-b .add")).to_contain_text("task_arithmetic")
    # TINY has two layers plus embeddings, norm and head ("other"): 3 cells per merge.
    expect(page.locator("#changes svg.heat rect.cell")).to_have_count(6)
    expect(page.locator("#compare-scores")).to_contain_text("task_arithmetic")


def test_publish_sends_the_hub_token_once_and_keeps_no_copy(
    page: Page, server: LiveServer, models_root: Path
) -> None:
    with server.client() as client:
        body = tiny_yaml(models_root, "ft1", method="task_arithmetic")
        job = client.post("/v1/merges", content=body, headers={"Content-Type": "application/yaml"})
        record = wait_for(client, job.json()["id"])
    sent: list[dict[str, Any]] = []

    def publish(route: Any) -> None:
        # Stands in for the Hub upload: the test checks what the page sends, not the Hub.
        sent.append({"headers": route.request.headers, "body": route.request.post_data_json})
        route.fulfill(status=202, content_type="application/json", json=record)

    page.route("**/v1/merges/*/publish", publish)
    page.goto(f"/#/merges/{record['id']}")
    page.fill("#publish-repo", "someone/soup")
    page.fill("#publish-token", "hf_secret_123")
    page.click("#publish")
    expect(page.locator("#publish")).to_be_enabled()
    assert len(sent) == 1
    assert sent[0]["headers"]["x-hf-token"] == "hf_secret_123"
    assert sent[0]["headers"]["authorization"] == f"Bearer {TOKEN}"
    assert sent[0]["body"]["repo_id"] == "someone/soup"
    assert page.input_value("#publish-token") == ""
    stored = page.evaluate("JSON.stringify({...sessionStorage, ...localStorage})")
    assert "hf_secret_123" not in stored


def test_trainings_share_the_list_and_have_their_own_page(page: Page, server: LiveServer) -> None:
    from service.jobs.models import JobError

    store = SqliteJobStore(server.settings.database_path)  # one store for every kind
    try:
        job, _ = store.create(
            Job(
                id="training-newest",
                kind="training",
                status=JobStatus.FAILED,
                recipe={"kind": "dpo", "base_model": "org/base", "epochs": 2},
                output=OutputOptions(name="my-adapter"),
                created_at=datetime(2100, 1, 1, tzinfo=UTC),  # newest of all: first in the list
                error=JobError(code="training_failed", message="the data has no 'chosen' column"),
            )
        )
    finally:
        store.close()
    page.goto("/#/jobs")
    first = page.locator("#jobs tbody tr").first
    expect(first).to_have_attribute("data-job", job.id)
    expect(first).to_contain_text("dpo training my-adapter")
    page.select_option("#kind-filter", "merges")
    expect(page.locator(f'#jobs tr[data-job="{job.id}"]')).to_have_count(0)
    page.select_option("#kind-filter", "trainings")
    expect(page.locator("#page-position")).to_have_text("1–1 of 1")
    page.click(f'#jobs a[href="#/trainings/{job.id}"]')
    expect(page.locator("h1")).to_contain_text("Training")
    expect(page.locator("#job-error")).to_contain_text("no 'chosen' column")
    expect(page.locator("#recipe-text")).to_contain_text("epochs: 2")


def test_searches_share_the_list_and_plot_their_scores(page: Page, server: LiveServer) -> None:
    scores = [5.6, 5.7, None, 4.2, 4.9]
    report = {
        "strategy": {"name": "cmaes"},
        "seed": 0,
        "evaluator": "held_out:loss",
        "higher_is_better": False,
        "dimensions": [{"name": "parameters.lambda", "low": 0.25, "high": 2.0}],
        "evaluations": [
            {"index": i, "point": {"parameters.lambda": 0.5 + i / 10}, "score": score}
            for i, score in enumerate(scores)
        ],
        "stopped_by": "evaluations",
        "best": {"index": 3, "point": {"parameters.lambda": 0.8}, "score": 4.2},
        "best_recipe": "merge_method: ties\nparameters:\n  lambda: 0.8\n",
        "written_validation_score": 4.2,
        "test": {"score": 4.4},
    }
    store = SqliteJobStore(server.settings.database_path)  # one store for every kind
    try:
        job, _ = store.create(
            Job(
                id="search-newest",
                kind="search",
                status=JobStatus.SUCCEEDED,
                recipe={"strategy": {"name": "cmaes"}, "budget": {"evaluations": 5}},
                output=OutputOptions(name="best-ties"),
                created_at=datetime(2101, 1, 1, tzinfo=UTC),  # newest of all: first in the list
                evaluation=report,
            )
        )
    finally:
        store.close()
    page.goto("/#/jobs")
    first = page.locator("#jobs tbody tr").first
    expect(first).to_have_attribute("data-job", job.id)
    expect(first).to_contain_text("cmaes search → best-ties")
    page.select_option("#kind-filter", "searches")
    expect(page.locator("#page-position")).to_have_text("1–1 of 1")
    page.click(f'#jobs a[href="#/searches/{job.id}"]')
    expect(page.locator("h1")).to_contain_text("Search")
    search = page.locator("#search")
    # One dot per scored evaluation; new bests (5.6, then 4.2) drawn as such.
    expect(search.locator("svg circle")).to_have_count(4)
    expect(search.locator("svg circle.kept")).to_have_count(2)
    expect(search.locator("#search-evaluations tr.kept")).to_contain_text("4.2")
    expect(search.locator("#best-recipe")).to_contain_text("lambda: 0.8")
    expect(page.locator("#recipe-text")).to_contain_text("cmaes")


def test_the_service_view_shows_readiness_and_metrics(page: Page, server: LiveServer) -> None:
    """What the curl session reads from /readyz and /metrics, in the page."""
    with server.client() as client:
        served = client.get("/metrics").text
    line = next(x for x in served.splitlines() if x.startswith('tureen_jobs{state="succeeded"}'))
    page.goto("/#/service")
    expect(page.locator("#readiness")).to_contain_text("ready")
    expect(page.locator("#readiness")).to_contain_text("database")
    rows = page.locator("#metrics tbody tr")
    expect(rows.filter(has_text="tureen_workers_busy")).to_have_count(1)
    succeeded = rows.filter(has_text="tureen_jobs").filter(has_text='state="succeeded"')
    expect(succeeded).to_have_count(1)
    expect(succeeded.locator("td").nth(2)).to_have_text(line.split()[-1])
