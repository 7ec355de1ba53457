"""A Kubernetes Deployment as the actuator, through its scale subresource.

Where users outgrow one machine, Kubernetes does the acting: this sets
`spec.replicas` with PATCH .../deployments/{name}/scale (the official client) and reads
`status.readyReplicas`. The Service in front of the pods balances requests; the proxy
keeps one virtual endpoint per ready pod, all pointing at the Service, so its
per-replica limit and queue still hold. Standby pods are extra pods beyond the serving
count: Kubernetes has no "ready but unrouted" state without changing the Service's
selector, so here standby buys warm capacity that also serves.

The client is synchronous (urllib3); its calls run in a worker thread with a timeout.
"""

from __future__ import annotations

import logging
from typing import Any

import trio

from ._actuator import Hooks
from ._config import KubernetesConfig
from ._dispatch import Endpoint
from ._errors import ActuatorError, ConfigError
from ._policy import Fleet

log = logging.getLogger("scaler.kube")


def api_client(config: KubernetesConfig) -> Any:
    """The official client's ApiClient: kubeconfig file, else in-cluster, else default."""
    from kubernetes import client, config as kconfig
    from kubernetes.config.config_exception import ConfigException
    try:
        if config.kubeconfig:
            return kconfig.new_client_from_config(config_file=config.kubeconfig)
        try:
            kconfig.load_incluster_config()
            return client.ApiClient()
        except ConfigException:
            return kconfig.new_client_from_config()
    except (ConfigException, OSError) as exc:
        raise ConfigError(f"no Kubernetes configuration: {exc}") from exc


class KubernetesActuator:
    def __init__(self, config: KubernetesConfig, api: Any) -> None:
        """`api`: a kubernetes.client.ApiClient (tests point one at a loopback fake)."""
        if not config.deployment or not config.upstream or ":" not in config.upstream:
            raise ConfigError("KubernetesActuator needs deployment and upstream host:port")
        from kubernetes import client
        self.config = config
        self._apps = client.AppsV1Api(api)
        self._target: tuple[int, int] | None = None
        self._spec: int | None = None
        self._ready = 0
        self._routed = 0
        self._changed = trio.Event()
        host, port = config.upstream.rsplit(":", 1)
        self._upstream = (host, int(port))

    def set_target(self, serving: int, standby: int) -> None:
        if (serving, standby) != self._target:
            self._target = (serving, standby)
            self._changed.set()

    def fleet(self) -> Fleet:
        serving = self._target[0] if self._target else (self._spec or 0)
        return Fleet(ready=min(self._ready, serving),
                     starting=max(0, min(serving, self._spec or 0) - self._ready),
                     standby=max(0, self._ready - serving))

    def endpoint_failed(self, ep_id: str) -> None:
        # A pod failing behind the Service is Kubernetes' to replace; re-read soon.
        self._changed.set()

    def endpoint_answered(self, ep_id: str) -> None:
        return None  # one endpoint (the Service): pod starts are not seen from here

    def replicas(self) -> list[dict]:
        return []

    def start_records(self) -> list:
        return []

    def start_sums(self) -> dict:
        return {}

    async def run(self, hooks: Hooks, *,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            try:
                await self._sync(hooks)
            except ActuatorError as exc:
                log.warning("%s", exc)  # the API server may be briefly away: next poll
            with trio.move_on_after(self.config.poll_s):
                await self._changed.wait()
            self._changed = trio.Event()

    async def _sync(self, hooks: Hooks) -> None:
        spec, ready = await self._call(self._read)
        self._spec, self._ready = spec, ready
        if self._target is not None and sum(self._target) != spec:
            want = sum(self._target)
            log.info("scaling deployment %s/%s from %d to %d", self.config.namespace,
                     self.config.deployment, spec, want)
            await self._call(self._patch, want)
            self._spec = want
        serving = self._target[0] if self._target else spec
        routed = min(self._ready, serving) if self._target else self._ready
        host, port = self._upstream
        while self._routed < routed:
            hooks.ready(Endpoint(f"pod-{self._routed}", host, port))
            self._routed += 1
        while self._routed > routed:
            self._routed -= 1
            hooks.gone(f"pod-{self._routed}")

    def _read(self) -> tuple[int, int]:
        t = self.config.request_timeout_s
        scale = self._apps.read_namespaced_deployment_scale(
            self.config.deployment, self.config.namespace, _request_timeout=t)
        dep = self._apps.read_namespaced_deployment_status(
            self.config.deployment, self.config.namespace, _request_timeout=t)
        return int(scale.spec.replicas or 0), int((dep.status and dep.status.ready_replicas) or 0)

    def _patch(self, replicas: int) -> None:
        self._apps.patch_namespaced_deployment_scale(
            self.config.deployment, self.config.namespace, {"spec": {"replicas": replicas}},
            _request_timeout=self.config.request_timeout_s)

    async def _call(self, fn: Any, *args: Any) -> Any:
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError
        try:
            with trio.fail_after(self.config.request_timeout_s + 1):
                return await trio.to_thread.run_sync(fn, *args, abandon_on_cancel=True)
        except ApiException as exc:
            raise ActuatorError(f"Kubernetes API: {exc.status} {exc.reason}") from exc
        except (HTTPError, OSError, trio.TooSlowError) as exc:
            raise ActuatorError(f"Kubernetes API unreachable: {exc!r}") from exc
