"""The client (`secdfd-client detect FILE|FOLDER...`): find the faces, share each crop, ask both
servers, print the verdicts.

The client session itself is `secdfd.common.service.client.Client`; what happens to each file
(faces, crops, video frames) is `secdfd.common.ml.analyse`; the output is `secdfd.common.ml.report`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from secdfd.client.progress import Progress
from secdfd.common import roster
from secdfd.common.cli.envvars import show_envvars
from secdfd.common.errors import SecDFDError
from secdfd.common.ml import faces, video
from secdfd.common.ml.analyse import Analyser, Settings, collect
from secdfd.common.ml.data import open_rgb
from secdfd.common.ml.report import Sink, annotate, human
from secdfd.common.service.client import Client, ClientConfig


@click.group("secdfd-client", context_settings={"auto_envvar_prefix": "SECDFD_CLIENT",
                                                "help_option_names": ["-h", "--help"]})
@click.version_option(package_name="secdfd", prog_name="secdfd-client")
def main() -> None:
    """SecDFD client: detect DeepFake faces without showing the image to anybody."""


def _error_line(path: Path | None, why: str) -> str:
    where = "" if path is None or why.startswith(str(path)) else f"{path}: "
    return f"Error: {where}{why}"


@main.command("detect", short_help="Detect images, folders and videos privately.")
@click.argument("paths", metavar="FILE|FOLDER...", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--keys", type=click.Path(path_type=Path), default=Path(".secdfd/keys"), show_default=True,
              envvar="SECDFD_CLIENT_KEYS", help="Keys folder from `secdfd keys` (or the client's own subfolder).")
@click.option("--server-a", default=roster.endpoint(roster.SERVER_A), show_default=True,
              envvar="SECDFD_CLIENT_SERVER_A", help="server_a endpoint.")
@click.option("--server-b", default=roster.endpoint(roster.SERVER_B), show_default=True,
              envvar="SECDFD_CLIENT_SERVER_B", help="server_b endpoint.")
@click.option("--timeout", type=float, default=120.0, show_default=True, envvar="SECDFD_CLIENT_TIMEOUT",
              help="Deadline per request (s).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per file (JSON Lines), nothing else on stdout.")
@click.option("--no-crop", is_flag=True,
              help="Each image is a face crop already: detect the whole image once (no face search).")
@click.option("--margin", type=click.FloatRange(min=1.0), default=faces.MARGIN, show_default=True,
              help="Face crop: a square of MARGIN x the face box's larger side around its centre.")
@click.option("--min-face", type=click.IntRange(min=12), default=faces.MIN_FACE, show_default=True,
              help="Smallest face searched for (pixels); smaller images are refused.")
@click.option("--face-score", type=click.FloatRange(0.0, 1.0, min_open=True, max_open=True), default=faces.SCORE,
              show_default=True, help="Face detector probability needed to report a face.")
@click.option("--frames", type=click.IntRange(min=1), default=16, show_default=True,
              help="Frames per video, evenly spaced.")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the results to FILE.csv (a row per file) or FILE.jsonl (an object per file).")
@click.option("--annotate", "annotate_to", type=click.Path(dir_okay=False, path_type=Path),
              help="For one image: save a copy with each face's box, verdict and probability (e.g. OUT.png).")
def detect(paths: tuple[Path, ...], keys: Path, server_a: str, server_b: str, timeout: float, as_json: bool,
           no_crop: bool, margin: float, min_face: int, face_score: float, frames: int, output: Path | None,
           annotate_to: Path | None) -> None:
    """Detect each image (every face in it), each video (its main face in --frames frames) and every
    image in each FOLDER (recursively). A file that fails is reported and the others go on; the
    exit status is 1 if any failed."""
    files, refused = collect(paths)
    if annotate_to is not None and (len(files) != 1 or video.is_video(files[0]) or refused):
        raise click.UsageError("--annotate takes exactly one image")
    settings = Settings(not no_crop, margin, min_face, face_score, frames)
    sink: Sink | None = None
    client: Client | None = None
    try:
        sink = Sink(output) if output is not None else None
        if files:  # nothing to detect: no connection at all
            client = Client(ClientConfig(keys, server_a, server_b, timeout))
    except SecDFDError as e:
        if sink is not None:
            sink.close()
        raise click.ClickException(str(e)) from None
    bar = Progress(len(files), enabled=None if not as_json else False)
    try:
        for path, why in refused:
            report_failure(bar, sink, as_json, path, why)
        failed = len(refused)
        if client is not None:
            analyser = Analyser(client.detect_tensor, client.info.size, settings, client.detect_crops)
            failed += _run(files, analyser, bar, sink, as_json, annotate_to)
    finally:
        bar.close()
        if client is not None:
            client.close()
        if sink is not None:
            sink.close()
    if failed:
        sys.exit(1)


def report_failure(bar: Progress, sink: Sink | None, as_json: bool, path: Path, why: str) -> None:
    """One file that failed: an `Error:` line on stderr, and its record ({file, error}) on stdout with
    --json and in --output."""
    bar.echo(_error_line(path, why), err=True)
    r = {"file": str(path), "error": why}
    if as_json:
        bar.echo(json.dumps(r))
    if sink is not None:
        sink.write(r)


def _run(files: list[Path], analyser: Analyser, bar: Progress, sink: Sink | None, as_json: bool,
         annotate_to: Path | None) -> int:
    """Detect each file in turn, printing and writing its result; the number of files that failed."""
    failed = 0
    bar.show(str(files[0]) if files else "")
    for i, path in enumerate(files):
        try:
            r: dict[str, Any] = analyser.file(path)
            if annotate_to is not None:
                annotate(open_rgb(path), r, annotate_to)
        except SecDFDError as e:
            failed += 1
            report_failure(bar, None, as_json, path, str(e))
            r = {"file": str(path), "error": str(e)}
        else:
            for line in [json.dumps(r)] if as_json else human(r):
                bar.echo(line)
        if sink is not None:
            sink.write(r)
        bar.advance(str(files[i + 1]) if i + 1 < len(files) else "")
    return failed


show_envvars(main)
