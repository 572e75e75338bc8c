"""``python -m devstack start|stop|status|run``: control the local stack (see devstack/stack.py).

``python -m devstack aws [--host H] [--port P] [--first-sample-port S]`` serves only its AWS side in the foreground
(devstack/aws.py), as the docker-compose `local` profile does.

``python -m devstack push-image SERVICE TAG [TAG ...] [--build B]`` puts images into the running stack's local ECR
registry, as CI's docker push would: a release of a tag that was never pushed is refused by preflight. ``--build``
pushes a rebuild: the tag moves to a new image (a new digest), as when CI pushes the same tag again.

``python -m devstack faults aws --rate 0.2 | --outage 20 | --clear`` and ``python -m devstack faults postgres
--restart`` inject faults into the running stack (devstack/faults.py; ``faults --help`` says more)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from devstack import aws as local_aws
from devstack import stack


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["faults"]:  # a command with targets and options of its own
        from devstack import faults

        return faults.main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m devstack", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["start", "stop", "status", "run", "aws", "push-image", "faults"])
    parser.add_argument("arguments", nargs="*", metavar="SERVICE TAG", help="push-image: a service and its tag(s)")
    parser.add_argument("--state-dir", type=Path, default=stack.DEFAULT_STATE_DIR)
    parser.add_argument("--build", default="", help="push-image: a build id; another one moves the tag to a new image")
    parser.add_argument("--host", default="127.0.0.1", help="aws: the address to listen on")
    parser.add_argument("--port", type=int, default=5000, help="aws: the AWS endpoint's port")
    parser.add_argument("--first-sample-port", type=int, default=5001,
                        help="aws: the sample services listen on this port and the next ones, in catalog order")
    args = parser.parse_intermixed_args(argv)
    if args.command == "faults":
        parser.error("put `faults` first: python -m devstack faults aws|postgres [--state-dir DIR] ...")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.command == "aws":
        serve_aws(args.host, args.port, args.first_sample_port)
        return 0
    if args.command == "push-image":
        return push_images(args.state_dir.resolve(), args.arguments, args.build)
    if args.command == "run":
        stack.run(args.state_dir.resolve())
        return 0
    if args.command == "start":
        env = stack.start(args.state_dir)
        services = sorted(k.removeprefix("OMNI_PG_DSN_").lower() for k in env if k.startswith("OMNI_PG_DSN_"))
        print(f"devstack ready: PostgreSQL databases {', '.join(services)}; AWS endpoint {env['AWS_ENDPOINT_URL']}")
        print(f"load it with:  . {args.state_dir / 'env'}")
        return 0
    if args.command == "stop":
        leftovers = stack.stop(args.state_dir)
        if leftovers:
            print(f"devstack stopped, but still listening: {', '.join(leftovers)}", file=sys.stderr)
            return 1
        print("devstack stopped; no process or port left")
        return 0
    running = stack.is_running(args.state_dir.resolve())
    print("devstack is running" if running else "devstack is not running")
    return 0 if running else 1


def push_images(state_dir: Path, arguments: list[str], build: str = "") -> int:
    """Push SERVICE:TAG images (of ``build``) into the running devstack's registry."""
    import re

    import boto3

    sys.path.insert(0, str(stack.REPO / "plugins"))
    from omnisphere_release.params import IMAGE_TAG_PATTERN, IMAGE_TAG_RULE

    if len(arguments) < 2:
        print("usage: python -m devstack push-image SERVICE TAG [TAG ...] [--build B]", file=sys.stderr)
        return 2
    if not stack.is_running(state_dir):
        print(f"the devstack is not running (state folder {state_dir}): start it with `make devstack`",
              file=sys.stderr)
        return 1
    service, tags = arguments[0], arguments[1:]
    bad = [tag for tag in tags if not re.match(IMAGE_TAG_PATTERN, tag)]
    if bad:
        print(f"not an image tag: {', '.join(map(repr, bad))}; {IMAGE_TAG_RULE}", file=sys.stderr)
        return 2
    env = stack.read_env(state_dir / "env")
    ecr = boto3.client("ecr", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=local_aws.REGION,
                       aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
    try:  # asked first: moto answers a put_image into a missing repository with a bare HTTP 500
        ecr.describe_repositories(repositoryNames=[f"{local_aws.REPOSITORY_PREFIX}/{service}"])
    except ecr.exceptions.RepositoryNotFoundException:
        print(f"no repository for service {service!r} in the local registry: use a service of "
              f"include/services.yaml", file=sys.stderr)
        return 2
    for tag in tags:
        digest = local_aws.push_image(ecr, service, tag, build)
        print(f"pushed {local_aws.IMAGE_REPOSITORY}/{service}:{tag} ({digest})")
    return 0


def serve_aws(host: str, port: int, first_sample_port: int) -> None:
    """Serve the devstack's AWS side until SIGTERM or SIGINT."""
    import signal
    import threading

    sys.path.insert(0, str(stack.REPO / "plugins"))
    from omnisphere_release.catalog import load_catalog

    catalog = load_catalog()
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    aws = local_aws.start(catalog, host, port, first_sample_port)
    samples = ", ".join(f"{name} on {host}:{p}" for name, p in aws.sample_ports.items())
    print(f"local AWS ready on {host}:{aws.port} (ECS deployment simulator); sample services: {samples}", flush=True)
    try:
        stopping.wait()
    finally:
        aws.stop()


if __name__ == "__main__":
    sys.exit(main())
