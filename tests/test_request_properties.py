"""Property tests: any request document validates or gives one line naming the field.

The CLI is run in-process (``pipeline.cli.main``) over generated request files, and twice as a
real subprocess: it exits 2 with one ``model-runner: error:`` line, never a traceback.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pipeline.cli import main
from pipeline.request import ImageRequest, RequestError

ROOT = Path(__file__).resolve().parents[1]

#: generated cases per property (the README's "requests fuzzed" figure is their sum)
PARSE_EXAMPLES = 400
MUTATION_EXAMPLES = 400
MESSAGE_EXAMPLES = 300
CLI_EXAMPLES = 120

VALID: dict[str, Any] = {
    "jobId": "job-1",
    "imageUrls": ["s3://bucket/image.tif"],
    "outputs": [{"type": "S3", "bucket": "out", "prefix": "p"}],
    "imageProcessor": {"name": "centerpoint", "type": "BUILTIN"},
    "imageProcessorTileSize": 512,
    "imageProcessorTileOverlap": 32,
    "imageProcessorTileFormat": "GTIFF",
    "postProcessing": [{"step": "FEATURE_DISTILLATION",
                        "algorithm": {"algorithmType": "NMS", "iouThreshold": 0.5}}],
    "regionOfInterest": "POLYGON((0 0, 1 0, 1 1, 0 1, 0 0))",
    "featureProperties": [{"a": 1}],
}

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=30)
)
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)
field_names = st.sampled_from(sorted(VALID) + ["imageProcessorParameters", "outputBucket",
                                               "rangeAdjustment", "jobName", "unknownField"])


def assert_one_line_naming(message: str, *names: str) -> None:
    assert message.startswith("invalid request: "), message
    assert "\n" not in message and "Traceback" not in message, message
    if names:
        assert any(name in message for name in names), message


@settings(max_examples=PARSE_EXAMPLES, deadline=None)
@given(json_values)
@example([])
@example(None)
@example({"jobId": ""})
def test_any_json_validates_or_names_a_field(value: Any) -> None:
    try:
        ImageRequest.parse(value)
    except RequestError as exc:
        assert_one_line_naming(str(exc))


def _aliases(name: str) -> tuple[str, ...]:
    # the model-level check names both tile fields; an unknown field is named as itself
    if name in ("imageProcessorTileSize", "imageProcessorTileOverlap"):
        return ("imageProcessorTileSize", "imageProcessorTileOverlap")
    return (name,)


@settings(max_examples=MUTATION_EXAMPLES, deadline=None)
@given(field_names, json_values)
@example("imageProcessorTileOverlap", 4096)
@example("imageUrls", ["  "])
@example("outputs", [{"type": "FTP"}])
@example("regionOfInterest", "POLYGON((")
@example("imageProcessorTileSize", float("nan"))
def test_a_bad_field_is_named(name: str, value: Any) -> None:
    """One field of a valid request replaced: it validates, or the error names that field."""
    document = {**VALID, name: value}
    try:
        ImageRequest.parse(document)
    except RequestError as exc:
        assert_one_line_naming(str(exc), *_aliases(name))


@settings(max_examples=MESSAGE_EXAMPLES, deadline=None)
@given(st.binary(max_size=200) | st.text(max_size=200) | json_values.map(json.dumps))
@example(b"\xff\xfe{")
@example("{'a': [")
@example("!!python/object/apply:os.system ['true']")
def test_queue_messages_never_raise_anything_else(body: bytes | str) -> None:
    try:
        request, unknown = ImageRequest.from_message(body)
    except RequestError as exc:
        text = str(exc)
        assert "\n" not in text and text, text
    else:
        assert isinstance(unknown, list) and request.job_id


def _run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


documents = (
    json_values.map(lambda v: json.dumps(v, allow_nan=True))
    | st.builds(lambda n, v: json.dumps({**VALID, n: v}), field_names, json_values)
    | st.text(max_size=120)
)


@settings(max_examples=CLI_EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(documents, st.sampled_from([".json", ".yaml"]))
def test_cli_never_prints_a_traceback(text: str, suffix: str) -> None:
    """Outputs are removed, so a valid document stops at "no outputs" before any cluster."""
    with contextlib.suppress(ValueError, TypeError, AttributeError):
        document = json.loads(text)
        if isinstance(document, dict):
            document.pop("outputs", None)
            document.pop("outputBucket", None)
            text = json.dumps(document)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"request{suffix}"
        path.write_text(text)
        code, out, err = _run_cli(["-q", "run", str(path), "--cluster", "tcp://127.0.0.1:9"])
    assert code == 2, (code, err)
    lines = [line for line in err.splitlines() if line.startswith("model-runner: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err and out == ""


def test_cli_names_the_missing_file_and_bad_arguments(tmp_path: Path) -> None:
    code, _, err = _run_cli(["run", str(tmp_path / "nope.json")])
    assert code == 2 and err.strip() == f"model-runner: error: request file not found: {tmp_path}/nope.json"
    code, _, err = _run_cli(["run", "x.json", "--workers", "0"])
    assert code == 2 and "Traceback" not in err


def _subprocess(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_subprocess_one_line_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**VALID, "imageProcessorTileOverlap": 600}))
    done = _subprocess(["run", str(bad)], tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "model-runner: error: invalid request: imageProcessorTileOverlap (600) must be smaller "
        "than imageProcessorTileSize (512)"
    ) or done.stderr.strip().startswith("model-runner: error: invalid request: ")
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1

    broken = tmp_path / "broken.yaml"
    broken.write_bytes(b"jobId: [unclosed\n\x00\xff")
    done = _subprocess(["run", str(broken)], tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().startswith("model-runner: error: ")
    assert len(done.stderr.strip().splitlines()) == 1
