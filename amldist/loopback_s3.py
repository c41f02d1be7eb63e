"""A real S3-API server on loopback (moto's server mode), for tests, benchmarks and trying the
object-store set-up on one machine without a cloud account.

    with loopback_s3(buckets=["data", "runs"]) as server:   # sets AWS_ENDPOINT_URL & co. meanwhile
        upload_tree("data/shards", "s3://data/shards")

    python -m amldist.loopback_s3 --port 9000 --bucket data --bucket runs   # until Ctrl-C

Needs the dev extra (`pip install -e '.[dev]'`: moto[server], boto3). It binds 127.0.0.1 only and
holds everything in memory. Clients find it through the standard AWS variables it sets (see
`amldist.storage`), so the code under test is the code that talks to a real store.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

from amldist.errors import UserError

# Any non-empty key works with moto; real stores take them from the environment or the instance role.
TEST_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "amldist-test", "AWS_SECRET_ACCESS_KEY": "amldist-test",
                    "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1"}


@dataclass(frozen=True)
class LoopbackS3:
    endpoint: str

    @property
    def environment(self) -> dict[str, str]:
        """The variables that point clients (pyarrow, boto3, Ray Train, our storage) at this server."""
        return {**TEST_CREDENTIALS, "AWS_ENDPOINT_URL": self.endpoint}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=TEST_CREDENTIALS["AWS_REGION"],
                            aws_access_key_id=TEST_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=TEST_CREDENTIALS["AWS_SECRET_ACCESS_KEY"])

    def create_buckets(self, names: list[str]) -> None:
        client = self.client()
        for name in names:
            client.create_bucket(Bucket=name)

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(item["Key"] for page in pages for item in page.get("Contents", []))


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """`count` distinct free loopback ports. Every probe stays bound until all are chosen: probing one
    at a time, the system may hand out a port it just released again, and two servers then collide."""
    with ExitStack() as stack:
        probes = [stack.enter_context(socket.socket()) for _ in range(count)]
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in probes]


@contextmanager
def loopback_s3(buckets: list[str] = (), port: int | None = None, set_environment: bool = True
                ) -> Iterator[LoopbackS3]:
    """Start the server (and the buckets); while open, the AWS variables point at it."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError:
        raise UserError("the loopback S3 server needs moto: pip install 'moto[server]' boto3") from None
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's server logs every request at INFO
    port = port or free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    s3 = LoopbackS3(f"http://127.0.0.1:{port}")
    saved = {key: os.environ.get(key) for key in s3.environment}
    try:
        if set_environment:
            os.environ.update(s3.environment)
        s3.create_buckets(list(buckets))
        yield s3
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m amldist.loopback_s3",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--bucket", action="append", default=[], help="create this bucket (repeatable)")
    args = parser.parse_args(argv)
    with loopback_s3(args.bucket, port=args.port) as s3:
        print(" ".join(f"{k}={v}" for k, v in s3.environment.items()), flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            return 0


if __name__ == "__main__":
    sys.exit(main())
