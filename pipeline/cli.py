"""``model-runner``: the command line.

Exit codes: 0 SUCCESS; 1 FAILED or PARTIAL (or an unexpected error); 2 an invalid request or
arguments. Errors are one line on stderr (``--debug`` adds the traceback).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

log = logging.getLogger("pipeline.cli")


class UsageError(Exception):
    """Bad arguments or request: exit 2 with one line."""


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be a positive integer")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="model-runner",
        description="Run ML models over very large overhead images with Dask.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run an image request (JSON or YAML)",
                              description="Run an OSML ImageRequest (JSON or YAML file).")
    run.add_argument("request", help="the request file (.json, .yaml or .yml)")
    run.add_argument("--cluster", default="local",
                     help="'local' (default: a LocalCluster) or a scheduler address tcp://HOST:PORT")
    run.add_argument("--workers", type=_positive, default=None,
                     help="LocalCluster worker processes (default: one per core)")
    run.add_argument("--output-dir", default=None,
                     help="add a LOCAL output writing DIR/<jobId>.geojson, .parquet, .summary.json")
    run.add_argument("--quicklook", default=None, metavar="PNG",
                     help="write an overview of the first image with the detections drawn")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")

    demo = commands.add_parser(
        "demo", help="generate a scene with planted objects and run a job on it",
        description="Generate a georeferenced scene with bright objects planted at known places "
        "(some across tile and chunk edges), run a bright-objects job on a LocalCluster, compare "
        "with the truth and write a quick-look PNG.")
    demo.add_argument("--size", type=_positive, default=4096, help="scene side in pixels (4096)")
    demo.add_argument("--objects", type=_positive, default=150, help="objects to plant (150)")
    demo.add_argument("--output-dir", default="demo-output", help="where to write (demo-output)")
    demo.add_argument("--workers", type=_positive, default=None,
                      help="LocalCluster worker processes (default: one per core)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    worker = commands.add_parser(
        "worker", help="run ImageRequest messages from an SQS queue (OSML-compatible)",
        description="Long-poll an SQS queue for OSML ImageRequest messages, run each as a job, "
        "publish status to SNS. SIGTERM/SIGINT: stop taking messages, release the current one.")
    worker.add_argument("--queue-url", required=True, help="the SQS queue of image requests")
    worker.add_argument("--status-topic-arn", default=None, help="SNS topic for status messages")
    worker.add_argument("--cluster", default="local",
                        help="'local' (default: a LocalCluster) or a scheduler address tcp://HOST:PORT")
    worker.add_argument("--workers", type=_positive, default=None,
                        help="LocalCluster worker processes (default: one per core)")
    worker.add_argument("--max-jobs", type=_positive, default=None,
                        help="exit after handling this many messages")
    worker.add_argument("--exit-when-idle", action="store_true",
                        help="exit when a poll finds the queue empty")
    worker.add_argument("--wait-seconds", type=int, default=20, help="long-poll wait, 0-20 (20)")
    worker.add_argument("--visibility-timeout", type=_positive, default=120,
                        help="seconds a message stays hidden, renewed while its job runs (120)")
    worker.add_argument("--retry-delay", type=int, default=10,
                        help="seconds before a failed job is retried (10)")
    worker.add_argument("--grace-seconds", type=float, default=0.0,
                        help="on SIGTERM, let the current job finish for this long (0)")
    worker.add_argument("--progress-seconds", type=float, default=30.0,
                        help="at most one IN_PROGRESS status per this many seconds (30)")
    worker.add_argument("--chunk-target", type=_positive, default=None, help=argparse.SUPPRESS)
    return parser


def _configure_logging(debug: bool, quiet: bool) -> None:
    level = logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from pipeline.redact import install_log_filter

    install_log_filter()  # no credentials, tokens or presigned query strings in logs
    import distributed  # noqa: F401 - it sets its own log levels on import; override them after

    for noisy in ("distributed", "bokeh", "tornado", "rasterio", "botocore", "urllib3"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


def _progress(enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return lambda total: tqdm(total=total, unit="tile", desc="tiles", smoothing=0.1,
                              file=sys.stderr, disable=None)


def print_summary(summary: dict[str, Any], outputs: Sequence[str]) -> None:
    """A short human summary of a job on stdout."""
    from pipeline.redact import redact

    print(f"job {summary['jobId']}: {summary['status']}, {summary['features']} features, "
          f"{summary['seconds']['total']:.1f} s")
    for image in summary["images"]:
        line = redact(f"  {image['status']:<8} {image['url']}")
        if image["width"]:
            line += (f"  {image['width']}x{image['height']}, {image['tiles']} tiles, "
                     f"{image['detections']['afterMerge']} features")
        if image["reason"]:
            line += f"  ({image['reason']})"
        print(line)
    for path in outputs:
        print(f"  wrote {path}")


def cmd_run(args: argparse.Namespace) -> int:
    from graphs.cluster import connect
    from graphs.image_job import run_job
    from pipeline.models import ModelError
    from pipeline.request import ImageRequest

    request = ImageRequest.from_file(args.request)
    if args.output_dir:
        request = request.with_output_dir(args.output_dir)
    if not request.all_outputs:
        raise UsageError("the request has no outputs: add one or pass --output-dir DIR")
    try:
        from pipeline.models import check_model
        from graphs.image_job import model_spec

        check_model(model_spec(request))
    except ModelError as exc:
        raise UsageError(f"invalid request: imageProcessor: {exc}") from None
    with connect(args.cluster, args.workers) as client:
        result = run_job(request, client, progress=_progress(not args.no_progress))
    print_summary(result.summary, result.outputs)
    if args.quicklook:
        from pipeline.quicklook import job_quicklook

        try:
            print(f"  quick look {job_quicklook(result, args.quicklook)}")
        except Exception as exc:  # noqa: BLE001 - the job's outputs are written; only warn
            text = str(exc).strip().splitlines()
            print(f"model-runner: warning: quick look not written: {text[0] if text else exc}",
                  file=sys.stderr)
    return EXIT_OK if result.status == "SUCCESS" else EXIT_FAILED


def cmd_demo(args: argparse.Namespace) -> int:
    import numpy as np

    from graphs.cluster import connect
    from graphs.image_job import run_job
    from pipeline.demo import match_truth, write_scene
    from pipeline.quicklook import quicklook
    from pipeline.request import ImageRequest

    out = Path(args.output_dir).resolve()
    tile_size, overlap = 512, 64
    scene = write_scene(out / "demo-scene.tif", size=args.size, count=args.objects,
                        tile_size=tile_size, overlap=overlap)
    print(f"scene {scene.path}: {args.size}x{args.size} px, {len(scene.truth)} objects planted")
    request = ImageRequest.parse({
        "jobId": "demo",
        "imageUrls": [str(scene.path)],
        "outputs": [{"type": "LOCAL", "path": str(out)}],
        "imageProcessor": {"name": "bright-objects", "type": "BUILTIN"},
        "imageProcessorTileSize": tile_size,
        "imageProcessorTileOverlap": overlap,
        "featureProperties": [{"source": "model-runner demo"}],
    })
    with connect("local", args.workers) as client:
        print(f"dashboard {client.dashboard_link}")
        result = run_job(request, client, progress=_progress(not args.no_progress))
    print_summary(result.summary, result.outputs)
    boxes = np.array(list(result.features["imageBBox"]), dtype=np.float64).reshape(-1, 4)
    matched, duplicates, extra = match_truth(boxes, scene.truth)
    recall = matched / max(1, len(scene.truth))
    print(f"recall {recall:.1%} ({matched}/{len(scene.truth)}), duplicates {duplicates}, "
          f"unmatched features {extra}")
    png = quicklook(str(scene.path), boxes, out / "demo-quicklook.png", truth=scene.truth)
    print(f"quick look {png}")
    ok = result.status == "SUCCESS" and matched == len(scene.truth) and not duplicates and not extra
    return EXIT_OK if ok else EXIT_FAILED


def cmd_worker(args: argparse.Namespace) -> int:
    from graphs.queue_worker import WorkerConfig, run_worker

    config = WorkerConfig(
        queue_url=args.queue_url, status_topic_arn=args.status_topic_arn,
        max_jobs=args.max_jobs, exit_when_idle=args.exit_when_idle,
        wait_seconds=args.wait_seconds, visibility_timeout=args.visibility_timeout,
        retry_delay=args.retry_delay, grace_seconds=args.grace_seconds,
        progress_seconds=args.progress_seconds, chunk_target=args.chunk_target,
    )
    stats = run_worker(config, args.cluster, args.workers)
    print(f"worker: {stats.received} messages: {stats.succeeded} succeeded, {stats.partial} "
          f"partial, {stats.failed} failed, {stats.poison} poison, {stats.duplicates} already "
          f"done, {stats.released} released")
    return EXIT_OK


COMMANDS = {"run": cmd_run, "demo": cmd_demo}
COMMANDS["worker"] = cmd_worker


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse prints its own one-line usage error
        return int(exc.code or 0) and EXIT_USAGE
    _configure_logging(args.debug, args.quiet)
    from pipeline.redact import redact
    from pipeline.request import RequestError

    try:
        return COMMANDS[args.command](args)
    except (RequestError, UsageError) as exc:
        print(f"model-runner: error: {redact(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("model-runner: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one line, never a traceback (unless --debug)
        if args.debug:
            raise
        text = str(exc).strip().splitlines()
        print(f"model-runner: error: {type(exc).__name__}: {redact(text[0]) if text else ''}",
              file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
