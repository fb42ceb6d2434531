"""Cost of a greedy soup on large models: wall time, bytes read, peak RSS.

    python bench/greedy_soup.py --set bench/data/llama-1gb-bfloat16-s2gb [--memory-limit 4GiB]

Takes a set written by ``bench/generate.py`` (base + fine-tunes) and runs ``tureen merge`` on
a greedy soup whose ingredients are all its models, scored by an HTTP evaluator that this
script serves on loopback. The evaluator reads one small fine-tuned tensor of each
candidate and scores its distance to the mean of the ingredients' copies (a stand-in for a
held-out score under which averaging helps, so that the soup grows: what is measured here is
the engine's cost, not quality). Candidates are written in float32, since rounding them to
bf16 would move this score more than averaging does. The merge runs in its own
process under GNU time, so the peak RSS is that of the whole tureen process.

Reported: wall time, the search's bytes read (``bytes_read``), the final merge's reads, the
number of evaluations, peak RSS, and what a naive loop that re-reads every kept ingredient
at each step would have read.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch
import yaml
from safetensors import safe_open

PROBE = "model.layers.0.self_attn.k_proj.weight"  # small, and fine-tuned (norms are not)


def read_probe(folder: Path) -> torch.Tensor:
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            if PROBE in handle.keys():  # noqa: SIM118 (safe_open has no __contains__)
                return handle.get_tensor(PROBE).float()
    raise KeyError(f"{PROBE} not in {folder}")


def serve(target: torch.Tensor) -> tuple[ThreadingHTTPServer, str]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            probe = read_probe(Path(body["candidate"]["path"]))
            score = -float((probe - target).norm())
            data = json.dumps({"score": score}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/score"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", type=Path, required=True, help="a bench/generate.py set")
    parser.add_argument("--memory-limit", default=None, help="e.g. 4GiB (the default limit)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    models = sorted(p.resolve() for p in args.set.iterdir() if (p / "config.json").is_file())
    target = torch.stack([read_probe(m) for m in models]).mean(0)
    server, url = serve(target)
    with tempfile.TemporaryDirectory(dir=args.set.parent) as work:
        recipe = Path(work) / "soup.yaml"
        recipe.write_text(
            yaml.safe_dump(
                {
                    "merge_method": "greedy_soup",
                    "models": [{"model": str(m)} for m in models],
                    "evaluator": {"type": "http", "url": url},
                    "dtype": "bfloat16",
                    # float32 candidates: bf16 rounding would swamp this stand-in score
                    "out_dtype": "float32",
                }
            )
        )
        command = ["/usr/bin/time", "-v", sys.executable, "-m", "service.cli", "merge"]
        command += [str(recipe), str(Path(work) / "out"), "--quiet"]
        if args.memory_limit:
            command += ["--memory-limit", args.memory_limit]
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - started
    server.shutdown()
    if done.returncode != 0:
        raise SystemExit(done.stderr.split("\tCommand being timed")[0][-3000:])
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    report = json.loads(done.stdout)["evaluation"]
    model_bytes = report["model_bytes"]
    kept_sizes = [1]
    for step in report["steps"]:
        kept_sizes.append(kept_sizes[-1] + (1 if step["kept"] else 0))
    naive = len(models) * model_bytes + sum(
        (size + 1) * model_bytes for size in kept_sizes[: len(report["steps"])]
    )
    result = {
        "set": args.set.name,
        "ingredients": len(models),
        "model_bytes": model_bytes,
        "in_memory": report["in_memory"],
        "kept": len(report["kept"]),
        "evaluations": report["evaluations"],
        "wall_s": round(wall, 2),
        "search_bytes_read": report["bytes_read"],
        "final_merge_bytes_read": report["final_merge_bytes_read"],
        "naive_loop_bytes_read": naive,
        "peak_rss_bytes": int(rss.group(1)) * 1024 if rss else None,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
