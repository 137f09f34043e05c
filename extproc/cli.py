"""`extproc serve | envoy | up | fake-llm | check | top`."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .config import ConfigError, build_runtime, load_config


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from .config import WORKER_ENV

    workers = load_config(args.config).sidecar.workers
    if WORKER_ENV in os.environ:
        import signal

        # A SIGHUP the supervisor forwards while this worker still starts must not kill it;
        # the server installs its reload handler once it serves.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    elif workers > 1:
        if args.listen and args.listen.startswith("unix:"):
            print("extproc serve: sidecar.workers > 1 needs a HOST:PORT address", file=sys.stderr)
            return 2
        from .workers import serve_workers

        return serve_workers(args.config, args.listen, workers)
    from .server import serve

    return serve(args.config, args.listen)


def cmd_envoy(args: argparse.Namespace) -> int:
    from .envoy_config import render_istio, render_snippet, render_yaml

    cfg = load_config(args.config)
    if args.snippet:
        text = render_snippet(cfg)
    elif args.istio:
        text = render_istio(cfg, args.namespace)
    else:
        text = render_yaml(cfg)
    if args.output in (None, "-"):
        sys.stdout.write(text)
    else:
        with open(args.output, "w", encoding="utf-8") as fh:
            fh.write(text)
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from .supervisor import load_up_config

    # Every error `extproc up` would stop at, the fake LLM's section included.
    cfg, _ = load_up_config(args.config)
    runtime = build_runtime(cfg, args.config)
    print(
        f"{args.config}: OK ({len(cfg.teams)} teams, {len(runtime.key_index)} keys, "
        f"{len(cfg.backends)} backends, {len(cfg.models)} models)"
    )
    from .native import native_routes, why_not

    # Which teams' requests Envoy serves alone, and why the JWT teams' others are not.
    served = {(r.team, r.model) for r in native_routes(cfg)}
    teams = {rule.team: None for i in cfg.identities.jwt.values() for rule in i.teams}
    for team in teams:
        for model in cfg.models:
            if (team, model) in served:
                print(f"  JWT callers of team {team}, model {model}: native path (Envoy alone)")
            else:
                print(f"  JWT callers of team {team}, model {model}: {why_not(cfg, team, model)}")
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from .supervisor import WorkdirError, up

    try:
        return up(
            args.config,
            workdir=args.workdir,
            envoy_log_level=args.envoy_log_level,
            envoy_concurrency=args.envoy_concurrency,
        )
    except WorkdirError as exc:
        print(f"extproc up: {exc}", file=sys.stderr)
        return 2


def cmd_quota(args: argparse.Namespace) -> int:
    from .admin.client import run_quota_command

    if args.action == "reset" and not args.team:
        print("extproc quota reset: --team is required", file=sys.stderr)
        return 2
    if args.action == "usage" and bool(args.team) == bool(args.organization):
        print("extproc quota usage: --team or --organization (one)", file=sys.stderr)
        return 2
    if args.user and not args.team:
        print("extproc quota usage: --user is a user of a team (--team)", file=sys.stderr)
        return 2
    address = _admin_address(args)
    return run_quota_command(
        args.action,
        args.team or "",
        address,
        os.environ.get(args.token_env),
        user=args.user or "",
        organization=args.organization or "",
    )


def cmd_keys(args: argparse.Namespace) -> int:
    from .keys.cli import run_keys_command

    return run_keys_command(args, _admin_address(args), os.environ.get(args.token_env))


def _admin_address(args: argparse.Namespace) -> str:
    if args.address is not None:
        return args.address
    return load_config(args.config).sidecar.listen if args.config else "127.0.0.1:50051"


def cmd_reload(args: argparse.Namespace) -> int:
    from .admin.client import run_reload_command

    return run_reload_command(_admin_address(args), os.environ.get(args.token_env))


def cmd_top(args: argparse.Namespace) -> int:
    from .top import DEFAULT_URL, run, url_from_listen

    url = args.url
    if args.config:
        listen = load_config(args.config).observability.metrics.listen
        if listen is None:
            print(
                f"extproc top: {args.config} sets no observability.metrics.listen "
                "(the sidecar serves no /metrics); set it, or pass --url",
                file=sys.stderr,
            )
            return 2
        url = url_from_listen(listen)
    return run(url or DEFAULT_URL, by=args.by, interval=args.interval, once=args.once)


def _positive_seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {value!r}") from None
    if not seconds > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0: {value!r}")
    return seconds


def cmd_fake_llm(args: argparse.Namespace) -> int:
    from .devtools.fake_llm import main_from_args

    return main_from_args(args)


def _admin_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="take the sidecar's address from this config")
    p.add_argument("--address", help="the sidecar's gRPC address (default 127.0.0.1:50051)")
    p.add_argument(
        "--token-env",
        default="EXTPROC_ADMIN_TOKEN",
        help="environment variable holding the admin token, if the sidecar requires one",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="extproc", description=__doc__)
    parser.add_argument("--log-level", default=os.environ.get("EXTPROC_LOG_LEVEL", "info"))
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the ext_proc sidecar")
    p.add_argument("--config", "-c", required=True)
    p.add_argument("--listen", help="override sidecar.listen (HOST:PORT or unix:/path)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("envoy", help="render the Envoy bootstrap for a config")
    p.add_argument("--config", "-c", required=True)
    p.add_argument("--output", "-o", help="file to write (default: stdout)")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--snippet", action="store_true", help="the drop-in filter and cluster")
    kind.add_argument("--istio", action="store_true", help="an Istio EnvoyFilter manifest")
    p.add_argument("--namespace", default="default", help="with --istio")
    p.set_defaults(func=cmd_envoy)

    p = sub.add_parser("check", help="validate a config and report every error")
    p.add_argument("--config", "-c", required=True)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("up", help="start Envoy, the sidecar and (if configured) the fake LLM")
    p.add_argument("--config", "-c", required=True)
    p.add_argument(
        "--workdir",
        help="where to write the rendered Envoy config (created if missing; default: temp)",
    )
    p.add_argument("--envoy-log-level", default="warning")
    p.add_argument(
        "--envoy-concurrency",
        type=int,
        default=None,
        help="Envoy worker threads (default: the cores the sidecar leaves, at most half, >= 1)",
    )
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("quota", help="quota usage of a team, user or organization (admin API)")
    p.add_argument("action", choices=["usage", "reset", "stats"])
    p.add_argument("--team", help="for usage and reset")
    p.add_argument("--user", help="usage: that user's limits in the team too")
    p.add_argument("--organization", help="usage, without --team: the organization's limits")
    _admin_arguments(p)
    p.set_defaults(func=cmd_quota)

    p = sub.add_parser(
        "keys",
        help="API keys managed at run time: create, list, show, rotate, revoke (admin API)",
        description="API keys created, rotated and revoked without editing the config file "
        "or restarting; the config file's keys keep working. A secret is printed once, by "
        "create and rotate.",
    )
    from .keys.cli import add_arguments as add_keys_arguments

    add_keys_arguments(p, _admin_arguments)
    p.set_defaults(func=cmd_keys)

    p = sub.add_parser("reload", help="make the sidecar re-read its config now (admin API)")
    _admin_arguments(p)
    p.set_defaults(func=cmd_reload)

    p = sub.add_parser(
        "top",
        help="live usage by team, model, organization or user, from the sidecar's /metrics",
        description="Requests, tokens and cost by team (or model, organization, user), from the "
        "sidecar's Prometheus endpoint; rates are the change between two scrapes. Ctrl-C exits.",
    )
    source = p.add_mutually_exclusive_group()
    source.add_argument(
        "--url", help="the metrics endpoint (default http://127.0.0.1:9464/metrics)"
    )
    source.add_argument(
        "--config", "-c", help="take the endpoint from this config's observability.metrics.listen"
    )
    p.add_argument(
        "--interval", type=_positive_seconds, default=2.0, help="seconds between refreshes"
    )
    p.add_argument("--once", action="store_true", help="print the totals once and exit")
    p.add_argument(
        "--by",
        choices=["team", "model", "organization", "user"],
        default="team",
        help="one row per team (default), model, organization, or user (needs "
        "observability.metrics.users)",
    )
    p.set_defaults(func=cmd_top)

    p = sub.add_parser("fake-llm", help="run the fake OpenAI-compatible upstream")
    from .devtools.fake_llm import add_arguments

    add_arguments(p)
    p.set_defaults(func=cmd_fake_llm)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(exc.render(), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
