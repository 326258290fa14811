"""``model-runner``: the command line.

Exit codes: 0 SUCCESS; 1 FAILED or PARTIAL (or an unexpected error); 2 an invalid request or
arguments. Errors are one line on stderr (``--debug`` adds the traceback).
"""

from __future__ import annotations

import argparse
import atexit
import gc
import logging
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
#: allocations between the CLI process's youngest-generation collections (Python's default
#: 700): importing the stack ran 565 collections, 0.25 s of a 1024² job, and 39 with this
GC_THRESHOLD = 10_000

log = logging.getLogger("pipeline.cli")


class UsageError(Exception):
    """Bad arguments or request: exit 2 with one line."""


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be a positive integer")
    return value


def _workers_and_progress(command: argparse.ArgumentParser, cluster: bool = False,
                          progress: bool = True) -> None:
    """The options that the job commands share: ``--workers``, and ``--cluster`` (a local
    cluster or a scheduler address) and ``--no-progress`` where asked for."""
    if cluster:
        command.add_argument("--cluster", default="local",
                             help="'local' (default: a LocalCluster) or a scheduler address tcp://HOST:PORT")
    command.add_argument("--workers", type=_positive, default=None,
                         help="LocalCluster worker processes (default: one per core)")
    if progress:
        command.add_argument("--no-progress", action="store_true", help="no progress bar")


def _strategy(text: str) -> str:
    """A ``--tiling`` value, checked when given (so that ``--help`` imports no stage)."""
    from pipeline.tiling import STRATEGIES

    if text.upper() not in STRATEGIES:
        raise argparse.ArgumentTypeError(f"invalid choice {text!r} (choose from {', '.join(STRATEGIES)})")
    return text.upper()


#: an option's value that starts with a minus sign and a digit, such as ``-78.37,39.19,-78.3,39.2``
#: (argparse takes only a lone negative number for a value, not such a list)
_NEGATIVE_VALUE = re.compile(r"^-\d[\d.,eE+-]*$")


def attach_negative_values(argv: Sequence[str]) -> list[str]:
    """``--bbox -78.37,39.19,...`` → ``--bbox=-78.37,39.19,...``, for every long option (a
    value that starts with ``-`` and a digit is otherwise taken for an unknown option)."""
    out: list[str] = []
    for arg in argv:
        previous = out[-1] if out else ""
        if (_NEGATIVE_VALUE.match(arg) and previous.startswith("--") and "=" not in previous
                and len(previous) > 2):
            out[-1] = f"{previous}={arg}"
        else:
            out.append(arg)
    return out


class _Parser(argparse.ArgumentParser):
    """An argument parser (and subcommand parsers) that reads ``--opt -1,2`` as ``--opt=-1,2``."""

    def parse_known_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                         namespace: argparse.Namespace | None = None) -> tuple[argparse.Namespace, list[str]]:
        argv = attach_negative_values(sys.argv[1:] if args is None else args)
        return super().parse_known_args(argv, namespace)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="model-runner",
        description="Run ML models over very large overhead images with Dask.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run an image request (JSON or YAML)",
                              description="Run an OSML ImageRequest (JSON or YAML file).")
    run.add_argument("request", help="the request file (.json, .yaml or .yml)")
    run.add_argument("--cluster", default="local", metavar="PROFILE_OR_ADDRESS",
                     help="'local' (default: a LocalCluster), a scheduler address tcp://HOST:PORT, "
                     "a profile of configs/clusters (gpu-local, address, ecs-fargate, ec2, ...) "
                     "or a profile file")
    run.add_argument("--chunk-size", type=_positive, default=None, metavar="PIXELS",
                     help="target side of a chunk, the unit of work and of resume (default 4096; "
                     "rounded to whole tile strides)")
    run.add_argument("--tiling", type=_strategy, default=None, metavar="STRATEGY",
                     help="tile grid, overriding the request's tilingStrategy (default "
                     "FIXED_STRIDE; VARIABLE_OVERLAP: OSML 2.x's full tiles spread evenly)")
    run.add_argument("--resume", action="store_true",
                     help="keep the chunks that an interrupted run of this request finished "
                     "(its manifest in <output>/<jobId>.parts) and compute only the others")
    run.add_argument("--output-dir", default=None,
                     help="add a LOCAL output writing DIR/<jobId>.geojson, .parquet, .summary.json")
    run.add_argument("--quicklook", default=None, metavar="PNG",
                     help="write an overview of the first image with the detections drawn")
    _workers_and_progress(run)
    run.add_argument("--segment", action="store_true",
                     help="run the model as a segmenter (the request's segmentation options, or "
                     "the defaults): a class COG per image and class polygons")

    demo = commands.add_parser(
        "demo", help="generate a scene with planted objects and run a job on it",
        description="Generate a georeferenced scene with bright objects planted at known places "
        "(some across tile and chunk edges), run a bright-objects job on a LocalCluster, compare "
        "with the truth and write a quick-look PNG.")
    demo.add_argument("--size", type=_positive, default=4096, help="scene side in pixels (4096)")
    demo.add_argument("--objects", type=_positive, default=150, help="objects to plant (150)")
    demo.add_argument("--output-dir", default="demo-output", help="where to write (demo-output)")
    _workers_and_progress(demo)
    worker = commands.add_parser(
        "worker", help="run ImageRequest messages from an SQS queue (OSML-compatible)",
        description="Long-poll an SQS queue for OSML ImageRequest messages, run each as a job, "
        "publish status to SNS. SIGTERM/SIGINT: stop taking messages, release the current one.")
    worker.add_argument("--queue-url", required=True, help="the SQS queue of image requests")
    worker.add_argument("--status-topic-arn", default=None, help="SNS topic for status messages")
    _workers_and_progress(worker, cluster=True, progress=False)
    worker.add_argument("--max-jobs", type=_positive, default=None,
                        help="exit after handling this many messages")
    worker.add_argument("--exit-when-idle", action="store_true",
                        help="exit when a poll finds the queue empty")
    worker.add_argument("--wait-seconds", type=int, default=20, help="long-poll wait, 0-20 (20)")
    worker.add_argument("--visibility-timeout", type=_positive, default=120,
                        help="seconds a message stays hidden, renewed while its job runs (120)")
    worker.add_argument("--retry-delay", type=int, default=10,
                        help="seconds before a failed job is retried (10)")
    worker.add_argument("--max-attempts", type=_positive, default=3,
                        help="runs of a message whose job fails transiently (throttling, network, "
                        "lost workers) before it is FAILED and dead-lettered (3; at most the "
                        "queue's maxReceiveCount); a permanent failure gets one run")
    worker.add_argument("--grace-seconds", type=float, default=0.0,
                        help="on SIGTERM, let the current job finish for this long (0)")
    worker.add_argument("--progress-seconds", type=float, default=30.0,
                        help="at most one IN_PROGRESS status per this many seconds (30)")
    worker.add_argument("--chunk-target", type=_positive, default=None, help=argparse.SUPPRESS)
    tiles = commands.add_parser(
        "tiles", help="run a model over a list of XYZ map tiles (chip-n-scale style)",
        description="Fetch XYZ tiles (from a z/x/y or x-y-z list, or a bbox and zoom), run a model "
        "over them, write GeoParquet with every detection and GeoJSON above the thresholds.")
    tiles.add_argument("config", nargs="?", default=None,
                       help="a tile job file (.json/.yaml); the options below override it")
    tiles.add_argument("--tiles", default=None, metavar="FILE", help="tile list, z/x/y or x-y-z lines")
    tiles.add_argument("--bbox", default=None, metavar="W,S,E,N", help="degrees (with --zoom)")
    tiles.add_argument("--zoom", type=int, default=None, help="zoom level for --bbox")
    tiles.add_argument("--imagery-url", default=None,
                       help="tile URL template with {z}, {x}, {y} (http(s)://, s3:// or a path)")
    tiles.add_argument("--job-id", default=None, help="job id, the output file stem (tiles)")
    tiles.add_argument("--model", default=None, help="imageProcessor.name")
    tiles.add_argument("--model-type", default=None, help="imageProcessor.type (BUILTIN)")
    tiles.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                       help="imageProcessorParameters entry (VALUE as JSON if it parses)")
    tiles.add_argument("--threshold", action="append", default=[], metavar="[CLASS=]SCORE",
                       help="GeoJSON export threshold, per class or the default (0.5)")
    tiles.add_argument("--output-dir", default=None, help="write DIR/<jobId>.parquet, .geojson, "
                       ".summary.json")
    tiles.add_argument("--concurrency", type=_positive, default=None,
                       help="tile downloads at once per task (8)")
    tiles.add_argument("--retries", type=int, default=None, help="retries per tile (3)")
    tiles.add_argument("--timeout", type=float, default=None, help="seconds per tile request (10)")
    tiles.add_argument("--tiles-per-task", type=_positive, default=None, help="tiles per task (64)")
    tiles.add_argument("--resume", action="store_true",
                       help="reuse the finished parts of an earlier run of the same job")
    _workers_and_progress(tiles, cluster=True)
    serve = commands.add_parser(
        "serve-model", help="serve a built-in model over HTTP (SageMaker container contract)",
        description="Serve a built-in model on GET /ping and POST /invocations, the SageMaker "
        "runtime paths /endpoints/NAME/invocations and /async-invocations, TF Serving's "
        "/v1/models/NAME:predict and DescribeEndpoint, to test a pipeline before deploying. "
        "It can misbehave on purpose for tests.")
    serve.add_argument("--model", default="centerpoint",
                       choices=["null", "centerpoint", "flood", "bright-objects", "threshold", "vegetation"])
    serve.add_argument("--port", type=int, default=8080, help="port (8080; 0 picks a free one)")
    serve.add_argument("--host", default="127.0.0.1", help="interface (127.0.0.1)")
    serve.add_argument("--latency", type=float, default=0.0, help="seconds per tile")
    serve.add_argument("--slots", type=int, default=0, help="tiles processed at once (0: no limit)")
    serve.add_argument("--error-rate", type=float, default=0.0, help="fraction answered HTTP 500")
    serve.add_argument("--throttle-rate", type=float, default=0.0,
                       help="fraction answered HTTP 429 ThrottlingException")
    serve.add_argument("--malformed-rate", type=float, default=0.0, help="fraction of bad bodies")
    serve.add_argument("--instances", type=int, default=1, help="instance count DescribeEndpoint reports")
    serve.add_argument("--async-output", default="", metavar="S3URL",
                       help="s3://bucket/prefix for asynchronous results")
    return parser


def _configure_logging(debug: bool, quiet: bool, dask: bool = True) -> None:
    level = logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from pipeline.redact import install_log_filter

    install_log_filter()  # no credentials, tokens or presigned query strings in logs
    if dask:  # a command that uses Dask (not serve-model)
        import distributed  # noqa: F401 - it sets its own log levels on import; override them after

    for noisy in ("distributed", "bokeh", "tornado", "rasterio", "botocore", "urllib3"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    # GDAL's warnings before a failed open ("CPLE_AppDefined in Unknown marker") name neither
    # the image nor the cause; the image's one-line reason does (--debug shows them)
    logging.getLogger("rasterio._env").setLevel(level if debug else logging.ERROR)
    # Dask's dashboard accepts websocket origins '*', which bokeh warns about on every start; a
    # LocalCluster's dashboard listens on 127.0.0.1 only (graphs.cluster), so it says nothing new
    logging.getLogger("bokeh.server.util").setLevel(max(level, logging.ERROR))


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
        line = f"  {image['status']:<8} {image['url']}"
        if image["width"]:
            line += (f"  {image['width']}x{image['height']}, {image['tiles']} tiles, "
                     f"{image['detections']['afterMerge']} features")
        if image["reason"]:  # the URL is on the line already
            line += f"  ({image['reason'].replace(' ' + image['url'], '')})"
        print(redact(line))
    for path in outputs:
        print(f"  wrote {path}")


def job_pixels(request: Any) -> int | None:
    """The pixels of the request's images when each is a local file or a ``synthetic://`` image
    (headers read here, a few ms each; stops past :data:`graphs.cluster.SMALL_JOB_PIXELS`), else
    None: remote, STAC or multi-segment images are not opened before the job."""
    from graphs.cluster import SMALL_JOB_PIXELS
    from pipeline import synthetic
    from pipeline.reading import ImageError, describe

    if request.stac_search is not None:
        return None
    total = 0
    for url in request.image_urls:
        try:
            if synthetic.is_synthetic(url):
                info = synthetic.describe(url)
            elif Path(url).is_file():
                info = describe(url)
            else:
                return None
        except ImageError:
            return None
        if len(info.subdatasets) > 1:
            return None
        total += info.width * info.height
        if total > SMALL_JOB_PIXELS:
            break
    return total


def cmd_run(args: argparse.Namespace) -> int:
    from graphs.cluster import connect, dashboard_link
    from graphs.image_job import run_job
    from pipeline.models import ModelError
    from pipeline.plots import write_summary_charts
    from pipeline.request import ImageRequest

    request = ImageRequest.from_file(args.request)
    if args.output_dir:
        request = request.with_output_dir(args.output_dir)
    if args.tiling:
        request = request.model_copy(update={"tiling_strategy": args.tiling})
    if not request.all_outputs:
        raise UsageError("the request has no outputs: add one or pass --output-dir DIR")
    if args.segment or request.segmentation is not None:
        from graphs.segment_job import cli_run

        return cli_run(request, args.cluster, args.workers, args.chunk_size, not args.no_progress)
    try:
        from graphs.image_job import model_spec
        from pipeline.models import check_model

        check_model(model_spec(request))
    except ModelError as exc:
        raise UsageError(f"invalid request: imageProcessor: {exc}") from None
    from graphs.cluster import ClusterError
    from pipeline.parts import ResumeError

    try:
        pixels = job_pixels(request) if args.cluster == "local" and args.workers is None else None
        with connect(args.cluster, args.workers, job_pixels=pixels) as client:
            link = dashboard_link(client)
            if link:
                print(f"dashboard {link}", file=sys.stderr)
            result = run_job(request, client, progress=_progress(not args.no_progress),
                             resume=args.resume, collect_features=bool(args.quicklook),
                             **({"chunk_target": args.chunk_size} if args.chunk_size else {}))
    except (ClusterError, ResumeError) as exc:
        raise UsageError(str(exc)) from None
    write_summary_charts(request, result)
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
    from pipeline.demo import DEMO_CHUNK_TARGET, match_truth, write_scene
    from pipeline.plots import write_summary_charts
    from pipeline.quicklook import quicklook
    from pipeline.request import ImageRequest

    out = Path(args.output_dir).resolve()
    tile_size, overlap = 512, 64
    scene = write_scene(out / "demo-scene.tif", size=args.size, count=args.objects,
                        tile_size=tile_size, overlap=overlap, chunk_target=DEMO_CHUNK_TARGET)
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
        result = run_job(request, client, progress=_progress(not args.no_progress),
                         chunk_target=DEMO_CHUNK_TARGET)
    write_summary_charts(request, result)
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
        retry_delay=args.retry_delay, max_attempts=args.max_attempts,
        grace_seconds=args.grace_seconds,
        progress_seconds=args.progress_seconds, chunk_target=args.chunk_target,
    )
    stats = run_worker(config, args.cluster, args.workers)
    print(f"worker: {stats.received} messages: {stats.succeeded} succeeded, {stats.partial} "
          f"partial, {stats.failed} failed, {stats.poison} poison, {stats.duplicates} already "
          f"done, {stats.released} released")
    return EXIT_OK


def _tile_request(args: argparse.Namespace) -> Any:
    """The tile job of a file and/or the command line options."""
    import json

    from graphs.tile_job import TileRequest
    from pipeline.request import load_document

    data: dict[str, Any] = {}
    if args.config:
        try:
            data = load_document(Path(args.config).read_text(), args.config)
        except OSError as exc:
            raise UsageError(f"cannot read tile job file {args.config}: {exc.strerror}") from None
        if not isinstance(data, dict):
            raise UsageError(f"{args.config}: the tile job must be a mapping")
    if args.tiles or args.bbox:
        for key in ("tiles", "tileFile", "bbox", "zoom"):
            data.pop(key, None)
    if args.tiles:
        data["tileFile"] = args.tiles
    if args.bbox:
        try:
            bbox = [float(v) for v in args.bbox.split(",")]
        except ValueError:
            bbox = []
        if len(bbox) != 4:
            raise UsageError(f"--bbox must be W,S,E,N in degrees, got {args.bbox!r}")
        data["bbox"] = bbox
    if args.zoom is not None:
        data["zoom"] = args.zoom
    data.setdefault("jobId", "tiles")
    for option, key in (("imagery_url", "imageryUrl"), ("job_id", "jobId"),
                        ("concurrency", "concurrency"), ("retries", "retries"),
                        ("timeout", "timeout"), ("tiles_per_task", "tilesPerTask")):
        if getattr(args, option) is not None:
            data[key] = getattr(args, option)
    processor = dict(data.get("imageProcessor") or {"type": "BUILTIN"})
    if args.model:
        processor["name"] = args.model
    if args.model_type:
        processor["type"] = args.model_type
    data["imageProcessor"] = processor
    parameters = dict(data.get("imageProcessorParameters") or {})
    for item in args.param:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--param must be KEY=VALUE, got {item!r}")
        try:
            parameters[key] = json.loads(value)
        except ValueError:
            parameters[key] = value
    if parameters:
        data["imageProcessorParameters"] = parameters
    thresholds = dict(data.get("thresholds") or {})
    for item in args.threshold:
        name, sep, value = item.rpartition("=")
        try:
            score = float(value)
        except ValueError:
            raise UsageError(f"--threshold must be [CLASS=]SCORE, got {item!r}") from None
        if sep:
            thresholds[name] = score
        else:
            data["defaultThreshold"] = score
    if thresholds:
        data["thresholds"] = thresholds
    if args.output_dir:
        data["outputs"] = [*data.get("outputs", []), {"type": "LOCAL", "path": args.output_dir}]
    request = TileRequest.parse(data)
    if not request.outputs:
        raise UsageError("the tile job has no outputs: add one or pass --output-dir DIR")
    return request


def cmd_tiles(args: argparse.Namespace) -> int:
    from graphs.cluster import connect
    from graphs.tile_job import run_tile_job
    from pipeline.models import ModelError, check_model

    request = _tile_request(args)
    try:
        check_model(request.model_spec())
    except ModelError as exc:
        raise UsageError(f"invalid request: imageProcessor: {exc}") from None
    with connect(args.cluster, args.workers) as client:
        result = run_tile_job(request, client, progress=_progress(not args.no_progress),
                              resume=args.resume)
    summary = result.summary
    print(f"tiles job {summary['jobId']}: {summary['status']}, {summary['tiles']} tiles "
          f"({len(summary['failedTiles'])} failed), {summary['features']} features, "
          f"{summary['exported']} exported, {summary['seconds']['total']:.1f} s")
    for failed in summary["failedTiles"][:10]:
        print(f"  failed {failed['tile']}: {failed['reason']}")
    for path in result.outputs:
        print(f"  wrote {path}")
    return EXIT_OK if result.status == "SUCCESS" else EXIT_FAILED


def cmd_serve_model(args: argparse.Namespace) -> int:
    from pipeline.models.server import Behaviour, start_server

    behaviour = Behaviour(latency=args.latency, slots=args.slots, error_rate=args.error_rate,
                          throttle_rate=args.throttle_rate, malformed_rate=args.malformed_rate,
                          instances=args.instances, async_output=args.async_output)
    try:
        server = start_server(args.model, port=args.port, host=args.host, behaviour=behaviour)
    except OSError as exc:
        raise UsageError(f"cannot listen on {args.host}:{args.port}: {exc.strerror}") from None
    print(f"serving {args.model} on {server.url} (POST /invocations, GET /ping)", flush=True)
    try:
        import threading

        threading.Event().wait()
    finally:
        server.shutdown()
    return EXIT_OK


COMMANDS = {"run": cmd_run, "demo": cmd_demo}
COMMANDS["serve-model"] = cmd_serve_model
COMMANDS["tiles"] = cmd_tiles
COMMANDS["worker"] = cmd_worker


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse prints its own one-line usage error
        return int(exc.code or 0) and EXIT_USAGE
    _configure_logging(args.debug, args.quiet, dask=args.command != "serve-model")
    from pipeline.redact import redact
    from pipeline.request import RequestError

    if argv is None:  # the program's own process, which ends after the command
        gc.set_threshold(GC_THRESHOLD, *gc.get_threshold()[1:])
        # and its interpreter's shutdown would walk every object of Dask, GDAL and geopandas
        # once more in its collections: 0.5 s of a 2 s job
        atexit.register(gc.freeze)
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
        from pipeline.failures import one_line

        print(f"model-runner: error: {redact(one_line(exc))}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
