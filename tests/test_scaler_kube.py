"""The Kubernetes actuator with the real `kubernetes` client against a small in-process
fake of the apps/v1 Deployment scale subresource on loopback. No real API server can run
on this machine; the fake implements exactly the three calls the actuator makes."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import trio
from kubernetes import client

from scaler import Fleet, KubernetesActuator, KubernetesConfig

PATH = re.compile(r"^/apis/apps/v1/namespaces/([^/]+)/deployments/([^/]+)/(scale|status)$")


class FakeApiServer:
    def __init__(self, replicas: int = 1) -> None:
        self.replicas = replicas
        self.ready = replicas
        self.patches: list[int] = []
        self.fail = False
        outer = self

        class H(BaseHTTPRequestHandler):
            def _reply(self, code: int, obj: dict) -> None:
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _route(self):
                m = PATH.match(self.path.split("?")[0])
                if outer.fail:
                    self._reply(500, {"kind": "Status", "code": 500, "message": "boom"})
                    return None
                if not m or m.group(1) != "ml" or m.group(2) != "model":
                    self._reply(404, {"kind": "Status", "code": 404, "message": "not found"})
                    return None
                return m.group(3)

            def do_GET(self) -> None:
                what = self._route()
                if what == "scale":
                    self._reply(200, outer.scale())
                elif what == "status":
                    self._reply(200, outer.deployment())

            def do_PATCH(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                if self._route() == "scale":
                    outer.replicas = int(body["spec"]["replicas"])
                    outer.patches.append(outer.replicas)
                    self._reply(200, outer.scale())

            def log_message(self, *a: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def scale(self) -> dict:
        return {"apiVersion": "autoscaling/v1", "kind": "Scale",
                "metadata": {"name": "model", "namespace": "ml"},
                "spec": {"replicas": self.replicas},
                "status": {"replicas": self.replicas, "selector": "app=model"}}

    def deployment(self) -> dict:
        return {"apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": "model", "namespace": "ml"},
                "spec": {"replicas": self.replicas,
                         "selector": {"matchLabels": {"app": "model"}},
                         "template": {"metadata": {"labels": {"app": "model"}},
                                      "spec": {"containers": [{"name": "m", "image": "m:1"}]}}},
                "status": {"replicas": self.replicas, "readyReplicas": self.ready}}

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class Hooks:
    def __init__(self) -> None:
        self.routed: list[str] = []

    def ready(self, ep) -> None:
        assert (ep.host, ep.port) == ("svc.ml", 8000)
        self.routed.append(ep.id)

    async def drain(self, ep_id, timeout) -> None:
        self.routed.remove(ep_id)

    def gone(self, ep_id) -> None:
        self.routed.remove(ep_id)


@pytest.fixture
def fake():
    f = FakeApiServer()
    yield f
    f.close()


async def _until(pred, timeout=10.0):
    with trio.fail_after(timeout):
        while not pred():
            await trio.sleep(0.02)


@pytest.mark.trio
async def test_scales_the_deployment_and_routes_ready_pods(fake):
    cfg = client.Configuration()
    cfg.host = fake.url
    api = client.ApiClient(cfg)
    act = KubernetesActuator(KubernetesConfig(namespace="ml", deployment="model",
                                              upstream="svc.ml:8000", poll_s=0.05), api)
    hooks = Hooks()
    async with trio.open_nursery() as nursery:
        await nursery.start(act.run, hooks)
        await _until(lambda: hooks.routed == ["pod-0"])  # what it found
        act.set_target(3, 1)
        await _until(lambda: fake.patches == [4])  # serving + standby pods
        # The fake records the PATCH before the actuator's worker thread has returned.
        await _until(lambda: act.fleet() == Fleet(ready=1, starting=2, standby=0))
        fake.ready = 4
        await _until(lambda: len(hooks.routed) == 3)
        assert act.fleet() == Fleet(ready=3, starting=0, standby=1)
        fake.fail = True  # the API server erring is logged and survived
        await trio.sleep(0.2)
        fake.fail = False
        act.set_target(1, 0)
        await _until(lambda: fake.patches == [4, 1] and hooks.routed == ["pod-0"])
        nursery.cancel_scope.cancel()
    api.close()
