"""What a hostile or broken site's update costs the aggregator, and /healthz under the largest close.

Runs the corpus of tests/test_hostile_inputs.py (every class: malformed headers, hostile numbers,
wrong names/shapes/dtypes, a report in a training round, oversized files) through the real service
(`create_app` around a RoundAggregator) on moto's S3 server in this process, plus one oversized file
of --oversized-mib MiB of right-named, wrong-shaped tensors (a rejection that once took 193 s for
512 MiB). For each class it prints the number of files, the slowest and median rejection, and the
largest growth of this process's resident set over one rejection (psutil RSS after minus before:
moto keeps its objects in this process too, but they are uploaded before the measurement starts).

Then it serves the app with uvicorn in a thread, sends the largest close request the API accepts
(256 participants, none uploaded, and 256 rejections of 4,096 characters: about 1 MB of JSON) and
polls /healthz every 10 ms while the close runs: the p50 and max latency say whether the event loop
stayed free.

Run:  .venv/bin/python benchmarks/aggregator_hostile.py                    (512 MiB oversized file)
      .venv/bin/python benchmarks/aggregator_hostile.py --oversized-mib 64 (quicker)
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import uuid
from pathlib import Path

from fastapi.testclient import TestClient
from moto.server import ThreadedMotoServer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the corpus and the server harness the tests use

import test_hostile_inputs as corpus  # noqa: E402
from ports import free_port  # noqa: E402

from fedtrain.store import S3Store  # noqa: E402

FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def reject_corpus(store: S3Store, oversized_mib: int) -> dict[str, list[corpus.Measured]]:
    """Every corpus file (and the large oversized one) submitted once; the measurements by class."""
    cases = [
        *corpus.CORPUS,
        corpus.Case(
            "oversized", f"wrong-shapes-{oversized_mib}MiB", corpus.wrong_shapes_of(oversized_mib * 2**20)
        ),
    ]
    sites = {case.name: f"h{index:03d}" for index, case in enumerate(cases)}
    spec = corpus.spec([*corpus.GOOD, *sites.values()])
    from fedtrain.aggregator.rounds import RoundAggregator
    from fedtrain.aggregator.service import create_app

    app = create_app(RoundAggregator(store, corpus.LAYOUT, spec), corpus.TOKEN)
    by_kind: dict[str, list[corpus.Measured]] = {}
    with TestClient(app, headers=corpus.AUTH) as client:
        for case in cases:
            site = sites[case.name]
            data = case.build(site)
            if data is not None:
                store.put_bytes(corpus.LAYOUT.update(0, site), data)
                del data
            result = corpus.measured(
                lambda site=site: client.post("/v1/rounds/0/updates", json={"site": site})
            )
            accepted = result.body.get("accepted")
            if result.status != 200 or accepted is not False:
                print(f"  NOT A REJECTION: {case.kind}/{case.name}: HTTP {result.status} {result.body}")
            by_kind.setdefault(case.kind, []).append(result)
            if case.kind == "oversized":
                print(
                    f"  {case.name}: {result.seconds * 1000:.1f} ms, RSS +{result.rss_bytes / 2**20:.1f} MiB "
                    f"({result.body.get('reason')})"
                )
    return by_kind


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--oversized-mib", type=int, default=512, help="Size of the large oversized file.")
    args = parser.parse_args()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto logs every request
    logging.getLogger("fedtrain").setLevel(logging.ERROR)  # a warning per rejection and left-out site
    os.environ.update(FAKE_AWS_ENV)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    try:
        store = S3Store(bucket=f"hostile-{uuid.uuid4().hex[:12]}", prefix="bench", endpoint=endpoint)
        store.ensure_bucket()
        corpus.write_round_zero(store)
        print(f"rejections through the service on moto S3 (corpus of {len(corpus.CORPUS)} files + 1):")
        for kind, results in reject_corpus(store, args.oversized_mib).items():
            seconds = [result.seconds for result in results]
            print(
                f"  {kind:10s} n={len(results):2d}  max {max(seconds) * 1000:7.1f} ms  "
                f"median {statistics.median(seconds) * 1000:6.1f} ms  "
                f"RSS growth max {max(result.rss_bytes for result in results) / 2**20:5.1f} MiB"
            )
        print("the largest close, /healthz polled meanwhile (uvicorn in a thread):")
        print("  " + corpus.largest_close_with_probes(endpoint).summary())
    finally:
        server.stop()


if __name__ == "__main__":
    main()
