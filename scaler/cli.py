"""`p2pfs-scaler`: proxy, simulate, keda. Flags and TOML become frozen configs here and
nowhere else; the commands are thin shells over the package."""

from __future__ import annotations

import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any

import click

from p2pfs.settings import parse_host_port

from ._config import (ContainerdConfig, KedaConfig, KubernetesConfig, LocalConfig, PolicyConfig, ProxyConfig,
                      SimConfig, build, load_toml)
from ._errors import ConfigError, ScalerError


def _host_port(value: str) -> tuple[str, int]:
    try:
        return parse_host_port(value)
    except ValueError as exc:
        raise ConfigError(f"--listen: {exc}") from None


def _fail(exc: ScalerError) -> None:
    click.echo(f"p2pfs-scaler: {exc}", err=True)
    sys.exit(2)


def _verbose() -> click.Option:
    return click.Option(["-v", "--verbose"], count=True, help="-v info, -vv debug logs on stderr.")


class _Command(click.Command):
    """A command that also takes the global -v after its name (as aws-cli does); the
    counts before and after the command add up."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.params.append(_verbose())

    def invoke(self, ctx: click.Context) -> Any:
        verbose = ctx.params.pop("verbose", 0) + (ctx.find_root().obj or {}).get("verbose", 0)
        level = logging.WARNING - 10 * min(verbose, 2)
        logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        logging.getLogger().setLevel(level)
        return super().invoke(ctx)


class _Group(click.Group):
    command_class = _Command


@click.group(cls=_Group, params=[_verbose()])
@click.pass_context
def main(ctx: click.Context, verbose: int) -> None:
    """A concurrency-based autoscaler: a queue proxy in front of replicas, a simulator
    with the Knative/HPA/Ray Serve baselines, and a KEDA external scaler."""
    ctx.obj = {"verbose": verbose}


@main.command()
@click.option("--listen", default="127.0.0.1:8080", show_default=True)
@click.option("--replica-cmd", help="Command starting one replica; {port} is replaced.")
@click.option("--target-concurrency", type=float)
@click.option("--max-concurrency", type=int, help="Per-replica hard limit.")
@click.option("--min", "min_replicas", type=int)
@click.option("--max", "max_replicas", type=int)
@click.option("--standby", type=int, help="Most standby replicas; the count follows the "
              "recent scale step (default 0: off).")
@click.option("--ready-path", help="Readiness probe path of local replicas.")
@click.option("--max-queue", type=int)
@click.option("--queue-timeout", "queue_timeout_s", type=float)
@click.option("--actuator", type=click.Choice(["local", "containerd", "kubernetes"]),
              default="local", show_default=True)
@click.option("--image", help="containerd: image the replicas run.")
@click.option("--snapshotter", help="containerd: snapshotter of the containers (default p2pfs).")
@click.option("--containerd-address", help="containerd: its gRPC socket.")
@click.option("--namespace", help="containerd: namespace (default k8s.io, where CRI pulls land).")
@click.option("--mount", "mounts", multiple=True,
              help="containerd: bind mount HOST:CONTAINER[:ro|:rw] (read-only by default); repeat.")
@click.option("--env", "env", multiple=True, help="containerd: NAME=VALUE in the container; repeat.")
@click.option("--pull-cmd", help="containerd: host command pulling {image} (default: through CRI).")
@click.option("--setup-cmd", help="containerd: host command before each container ({id}, {port}).")
@click.option("--deployment", help="Kubernetes: NAMESPACE/NAME of the Deployment.")
@click.option("--upstream", help="Kubernetes: HOST:PORT of the Deployment's Service.")
@click.option("--kubeconfig", type=click.Path(dir_okay=False))
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def proxy(listen: str, replica_cmd: str | None, target_concurrency: float | None,
          max_concurrency: int | None, min_replicas: int | None, max_replicas: int | None,
          standby: int | None, ready_path: str | None, max_queue: int | None,
          queue_timeout_s: float | None, actuator: str, image: str | None,
          snapshotter: str | None, containerd_address: str | None, namespace: str | None,
          mounts: tuple[str, ...], env: tuple[str, ...], pull_cmd: str | None,
          setup_cmd: str | None, deployment: str | None,
          upstream: str | None, kubeconfig: str | None, config_path: Path | None) -> None:
    """Run the queue proxy, its autoscaler and an actuator until SIGINT/SIGTERM."""
    import trio

    from ._app import run_proxy
    from ._policy import ConcurrencyPolicy
    try:
        toml = load_toml(config_path)
        host, port = _host_port(listen)
        pcfg = build(ProxyConfig, toml.get("proxy", {}), dict(
            host=host, port=port, max_concurrency=max_concurrency, max_queue=max_queue,
            queue_timeout_s=queue_timeout_s))
        policy_cfg = build(PolicyConfig, toml.get("policy", {}), dict(
            target_concurrency=target_concurrency, min_replicas=min_replicas,
            max_replicas=max_replicas, standby=standby))
        if actuator in ("local", "containerd"):
            from ._local import LocalActuator
            lcfg = build(LocalConfig, toml.get("local", {}), dict(
                replica_cmd=replica_cmd, ready_path=ready_path))
            runner = None
            if actuator == "containerd":
                from ._containerd import ContainerdRunner
                ccfg = build(ContainerdConfig, toml.get("containerd", {}), dict(
                    image=image, snapshotter=snapshotter, address=containerd_address,
                    namespace=namespace, mounts=mounts or None, env=env or None,
                    pull_cmd=pull_cmd, setup_cmd=setup_cmd))
                runner = ContainerdRunner(ccfg, lcfg.replica_cmd)
            act: Any = LocalActuator(lcfg, runner)
        else:
            from ._kube import KubernetesActuator, api_client
            ns, name = (deployment or "/").split("/", 1) if deployment and "/" in deployment \
                else (None, deployment)
            kcfg = build(KubernetesConfig, toml.get("kubernetes", {}), dict(
                namespace=ns, deployment=name, upstream=upstream, kubeconfig=kubeconfig))
            act = KubernetesActuator(kcfg, api_client(kcfg))
    except ScalerError as exc:
        _fail(exc)

    async def amain() -> None:
        async with trio.open_nursery() as nursery:
            running = await nursery.start(run_proxy, pcfg, ConcurrencyPolicy(policy_cfg), act)
            click.echo(json.dumps({"listening": f"{pcfg.host}:{running.port}"}), err=True)
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break

    trio.run(amain)


@main.command()
@click.option("--trace", "trace_path", required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="CSV (arrival_s,service_s) or Azure Functions 2019 invocations file.")
@click.option("--policy", "policy_name", type=click.Choice(["concurrency", "kpa", "hpa", "rayserve"]),
              default="concurrency", show_default=True)
@click.option("--target-concurrency", type=float, default=4.0, show_default=True)
@click.option("--max-concurrency", type=int, help="Replica slots (default 8).")
@click.option("--provision-s", type=float, help="Seconds to get a machine (default 60).")
@click.option("--startup-s", type=float, help="Seconds to pull + load (default 30).")
@click.option("--standby", type=int, help="Most standby replicas, following the recent "
              "scale step (concurrency policy only; default 0: off).")
@click.option("--min", "min_replicas", type=int, help="Concurrency policy minimum.")
@click.option("--max", "max_replicas", type=int, default=1000, show_default=True)
@click.option("--slo-s", type=float, help="Queueing-delay SLO (default 1 s).")
@click.option("--azure-function", help="Azure trace: HashFunction prefix (default: all rows).")
@click.option("--azure-durations", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--service-s", type=float, default=0.5, show_default=True,
              help="Azure trace: service seconds when no durations file.")
@click.option("--seed", type=int, default=0, show_default=True, help="Azure arrival spreading.")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--cold-start-from", "cold_start_from",
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A `status --json` document: its measured starts (medians) set the "
                   "provision and startup seconds; --provision-s/--startup-s still win.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def simulate(trace_path: Path, policy_name: str, target_concurrency: float,
             max_concurrency: int | None, provision_s: float | None, startup_s: float | None,
             standby: int | None, min_replicas: int | None, max_replicas: int,
             slo_s: float | None, azure_function: str | None, azure_durations: Path | None,
             service_s: float, seed: int, config_path: Path | None,
             cold_start_from: Path | None, as_json: bool) -> None:
    """Replay a trace against one policy and print its metrics."""
    from ._policies import make_policy
    from ._sim import simulate as run_sim
    from ._starts import cold_start_figures
    from ._trace import load
    try:
        toml = load_toml(config_path)
        measured: dict[str, Any] = {}
        if cold_start_from is not None:
            try:
                prov, start, n = cold_start_figures(json.loads(cold_start_from.read_text()))
            except (OSError, ValueError, UnicodeDecodeError, RecursionError) as exc:
                raise ConfigError(f"--cold-start-from {cold_start_from}: {exc}") from None
            measured = {"provision_s": round(prov, 3), "startup_s": round(start, 3)}
            click.echo(f"cold start from {cold_start_from}: {n} measured starts, median "
                       f"provision {prov:.2f}s, startup {start:.2f}s", err=True)
        scfg = build(SimConfig, toml.get("sim", {}), measured, dict(
            max_concurrency=max_concurrency, provision_s=provision_s, startup_s=startup_s,
            slo_s=slo_s))
        pcfg = build(PolicyConfig, toml.get("policy", {}), dict(
            standby=standby, min_replicas=min_replicas))
        trace = load(trace_path, function=azure_function, durations=azure_durations,
                     service_s=service_s, seed=seed)
        pol = make_policy(policy_name, target_concurrency=target_concurrency,
                          max_concurrency=scfg.max_concurrency, policy=pcfg,
                          max_replicas=max_replicas)
    except ScalerError as exc:
        _fail(exc)
    t0 = time.perf_counter()
    result = run_sim(trace, pol, scfg, policy_name)
    out = result.summary()
    out["wall_s"] = round(time.perf_counter() - t0, 3)
    if as_json:
        click.echo(json.dumps(out))
    else:
        for k, v in out.items():
            click.echo(f"{k:22s} {v}")


@main.command()
@click.option("--addr", default="127.0.0.1:8080", show_default=True, help="The proxy's HOST:PORT.")
@click.option("--timeout", type=float, default=5.0, show_default=True, help="Seconds to wait.")
@click.option("--json", "as_json", is_flag=True, help="Print the status document.")
def status(addr: str, timeout: float, as_json: bool) -> None:
    """Replicas by state (starting, standby, serving) and each start's stages in seconds."""
    import urllib.error
    import urllib.request
    try:
        host, port = _host_port(addr)
    except ConfigError as exc:
        _fail(ConfigError(str(exc).replace("--listen", "--addr")))
    url = f"http://{host if ':' not in host else f'[{host}]'}:{port}/-/status"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            doc = json.loads(resp.read(16 << 20))
        if not isinstance(doc, dict) or not isinstance(doc.get("replicas"), dict):
            raise ValueError("not a status document")
    except (OSError, urllib.error.URLError) as exc:
        _fail(ScalerError(f"cannot read {url}: {exc} (is `p2pfs-scaler proxy` running there?)"))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        _fail(ScalerError(f"{url} answered something that is not a scaler status: {exc}"))
    if as_json:
        click.echo(json.dumps(doc))
        return
    click.echo(_status_text(doc))


def _status_text(doc: dict[str, Any]) -> str:
    r, d, q = doc["replicas"], doc.get("desired") or {}, doc.get("queue") or {}
    lines = ["replicas  " + "  ".join(f"{k} {v}" for k, v in r.items()),
             f"desired   serving {d.get('serving')}  standby {d.get('standby')}  ({d.get('mode')})",
             "queue     " + "  ".join(f"{k} {v}" for k, v in q.items())]
    starts = doc.get("starts") or []
    if starts:
        cols = ["provision", "image", "weights", "server_init", "promote", "first_answer", "total"]
        head = f"{'replica':12s} {'kind':9s} {'state':9s}" + "".join(f"{c:>13s}" for c in cols)
        lines += ["", "starts (seconds)", head]
        for s in starts:
            st = s.get("stages") or {}
            cells = "".join(f"{'-' if st.get(c) is None else format(st[c], '.2f'):>13s}" for c in cols)
            lines.append(f"{str(s.get('replica'))[:12]:12s} {str(s.get('kind')):9s} "
                         f"{str(s.get('state')):9s}{cells}")
    return "\n".join(lines)


@main.command()
@click.option("--listen", default="127.0.0.1:9090", show_default=True)
@click.option("--metrics-from", help="The proxy's /metrics URL.")
@click.option("--metric", "metric_name", help="Metric to report (default scaler_concurrency).")
@click.option("--target-concurrency", type=float)
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def keda(listen: str, metrics_from: str | None, metric_name: str | None,
         target_concurrency: float | None, config_path: Path | None) -> None:
    """Serve KEDA's external scaler gRPC API over the proxy's signal."""
    from .keda import serve
    try:
        host, port = _host_port(listen)
        cfg = build(KedaConfig, load_toml(config_path).get("keda", {}), dict(
            host=host, port=port, metrics_url=metrics_from, metric_name=metric_name,
            target_concurrency=target_concurrency))
        server, servicer, bound = serve(cfg)
    except ScalerError as exc:
        _fail(exc)
    click.echo(json.dumps({"listening": f"{cfg.host}:{bound}"}), err=True)
    stop = {"now": False}

    def on_signal(*_: Any) -> None:
        stop["now"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not stop["now"]:
        time.sleep(0.2)
    servicer.stop()
    server.stop(2).wait()


if __name__ == "__main__":
    main()
