"""deploy/kubernetes/: every manifest is a valid object of the official Kubernetes client's
models, and what the DaemonSet runs is what p2pfs accepts.

- Each document goes through `kubernetes.client.ApiClient().deserialize` into its model
  class (V1DaemonSet, V1Service, ...), which refuses wrong types and missing required
  fields, and back through `sanitize_for_serialization`: a field the model does not know
  (a typo such as `hostNetwrok`) is dropped on the way, so the round trip must give back
  the document exactly.
- The container's command line is run through the real `p2pfs mount` (click parses it, the
  ConfigMap's p2pfs.toml is loaded with every layer applied, the daemon is not started):
  every flag exists, every config key exists, and the peer settings are complete.
- The pieces agree with each other: Service selector and pod labels, the peer port in the
  Service, the readiness probe and --peer-listen, the DNS name in the config and the
  Service, the token and config paths and the volumes they live on.

kubectl: `kubectl apply --dry-run=client --validate=false -f` cannot run here: even a
client-side dry run asks an API server for its resource list to map each kind (without
one: "unable to recognize ...: connection refused"), and CI has no cluster. What needs no
cluster, `kubectl kustomize`, is run when kubectl is installed (Debian: kubernetes-client or
kubectl), and its output must be these manifests.
"""

from __future__ import annotations

import inspect
import json
import re
import shutil
import subprocess
import tomllib
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from cli_helpers import mount_config
from kubernetes.client import ApiClient

from p2pfs.settings import coerce

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "kubernetes"
MANIFESTS = sorted(p.name for p in DEPLOY.glob("*.yaml") if p.name != "kustomization.yaml")
NODE_IP = "10.0.0.7"


def _docs(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d is not None]


def _one(kind: str) -> dict[str, Any]:
    (doc,) = [d for name in MANIFESTS for d in _docs(name) if d["kind"] == kind]
    return doc


def _model(doc: dict[str, Any]) -> Any:
    """`doc` as its kubernetes.client model object (V1DaemonSet for apps/v1 DaemonSet)."""
    klass = doc["apiVersion"].split("/")[-1].capitalize() + doc["kind"]
    api = ApiClient()
    text = json.dumps(doc)
    if "response_text" in inspect.signature(api.deserialize).parameters:  # client >= 32
        return api.deserialize(text, klass, "application/json")

    class Response:  # what older clients read: the body of an HTTP response
        data = text

    return api.deserialize(Response(), klass)


def _round_trip(doc: dict[str, Any]) -> dict[str, Any]:
    return ApiClient().sanitize_for_serialization(_model(doc))


@pytest.mark.parametrize("name", MANIFESTS)
def test_manifest_is_a_valid_object_without_unknown_fields(name: str):
    docs = _docs(name)
    assert docs, f"{name} has no document"
    for doc in docs:
        assert doc["metadata"]["namespace"] == "kube-system"
        assert _round_trip(doc) == doc, f"{name}: fields the {doc['kind']} model does not know"


def test_the_round_trip_catches_typos_and_wrong_types():
    """The check above can fail: an unknown field is lost, a wrong type or a missing
    required field is refused."""
    ds = _one("DaemonSet")
    typo = json.loads(json.dumps(ds))
    typo["spec"]["template"]["spec"]["hostNetwrok"] = True
    assert _round_trip(typo) != typo
    wrong = json.loads(json.dumps(ds))
    wrong["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "thirty"
    with pytest.raises(Exception):
        _model(wrong)
    missing = json.loads(json.dumps(ds))
    del missing["spec"]["selector"]
    with pytest.raises(Exception):
        _model(missing)


def _pod() -> dict[str, Any]:
    return _one("DaemonSet")["spec"]["template"]["spec"]


def _container() -> dict[str, Any]:
    (c,) = _pod()["containers"]
    return c


def _env() -> dict[str, str]:
    """The container's environment as the kubelet would set it on a node at NODE_IP."""
    data = _one("ConfigMap")["data"]
    env = {}
    for var in _container()["env"]:
        src = var.get("valueFrom", {})
        if "fieldRef" in src:
            assert src["fieldRef"]["fieldPath"] in ("status.hostIP", "status.podIP")
            env[var["name"]] = NODE_IP  # with hostNetwork, the pod's address is the node's
        elif "configMapKeyRef" in src:
            assert src["configMapKeyRef"]["name"] == _one("ConfigMap")["metadata"]["name"]
            env[var["name"]] = data[src["configMapKeyRef"]["key"]]
        else:
            env[var["name"]] = var["value"]
    return env


def _expand(arg: str, env: dict[str, str]) -> str:
    # The kubelet leaves an unknown $(VAR) as it is: that would be a silent bug.
    for name in re.findall(r"\$\((\w+)\)", arg):
        assert name in env, f"{arg!r} uses $({name}), which the container's env does not set"
    return re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], arg)


def _mount(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """The Config the DaemonSet's command line gives on a node, and its --config path."""
    c = _container()
    assert c["command"] == ["p2pfs"] and c["args"][0] == "mount"
    args = [_expand(a, _env()) for a in c["args"][1:]]
    config_path = args[args.index("--config") + 1]
    toml = tmp_path / "p2pfs.toml"
    toml.write_text(_one("ConfigMap")["data"][Path(config_path).name])
    args[args.index("--config") + 1] = str(toml)
    cfg, result = mount_config(monkeypatch, tmp_path, args)
    assert cfg is not None, result.output
    return cfg, args, config_path


def test_every_flag_of_the_daemonset_is_a_mount_option():
    from p2pfs.cli import main

    known = {o for p in main.commands["mount"].params for o in (*p.opts, *p.secondary_opts)}
    flags = [a for a in _container()["args"] if a.startswith("-")]
    assert flags and set(flags) <= known, set(flags) - known


def test_the_daemonset_command_line_and_configmap_make_a_complete_peer_config(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Every key of the ConfigMap's p2pfs.toml exists (load_config refuses unknown ones)
    and, with --peer-listen from the node's address, the peer settings are complete."""
    cfg, args, _ = _mount(monkeypatch, tmp_path)
    doc = tomllib.loads(_one("ConfigMap")["data"]["p2pfs.toml"])
    for section, values in doc.items():
        sub = getattr(cfg, section)
        for key, value in values.items():  # each landed where it belongs, as its type
            expected = coerce(value, typing.get_type_hints(type(sub))[key])
            assert getattr(sub, key) == expected, (section, key)
    assert args[0] == _one("ConfigMap")["data"]["source"] and args[1] == "/models"
    assert cfg.peers.enabled and cfg.peers.listen == f"{NODE_IP}:7946"
    assert cfg.peers.dns and cfg.peers.token_file


def test_the_pieces_agree(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    cfg, _, config_path = _mount(monkeypatch, tmp_path)
    ds, svc, secret, cm = (_one(k) for k in ("DaemonSet", "Service", "Secret", "ConfigMap"))
    pod, c = _pod(), _container()
    labels = ds["spec"]["template"]["metadata"]["labels"]
    assert ds["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert svc["spec"]["selector"].items() <= labels.items()

    # Membership: a headless Service of ready pods, named by [peers] dns, on the peer port.
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is False
    (svc_port,) = svc["spec"]["ports"]
    (c_port,) = c["ports"]
    port = c_port["containerPort"]
    assert svc_port["port"] == port and svc_port["targetPort"] in (port, c_port["name"])
    assert cfg.peers.dns == f"{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc:{port}"
    assert cfg.peers.listen.endswith(f":{port}")
    probe = c["readinessProbe"]["httpGet"]
    assert probe["path"] == "/healthz" and probe["port"] in (port, c_port["name"])

    # The node: host network (stable ids), FUSE, the cache and a propagated mount.
    assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert c["securityContext"]["privileged"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert volumes[mounts["/dev/fuse"]["name"]]["hostPath"] == {"path": "/dev/fuse", "type": "CharDevice"}
    assert volumes[mounts[str(cfg.cache.dir)]["name"]]["hostPath"]["path"] == "/var/cache/p2pfs"
    assert mounts["/models"]["mountPropagation"] == "Bidirectional"
    assert volumes[mounts["/models"]["name"]]["hostPath"]["path"] == "/models"

    # The token and the config file lie on the volumes of the Secret and the ConfigMap.
    def volume_of(path: Path) -> dict[str, Any]:
        (m,) = [m for p, m in mounts.items() if path.parent == Path(p)]
        return volumes[m["name"]]

    token = volume_of(cfg.peers.token_file)["secret"]
    assert token["secretName"] == secret["metadata"]["name"] and token["defaultMode"] == 0o400
    assert cfg.peers.token_file.name in secret["stringData"]
    assert volume_of(Path(config_path))["configMap"]["name"] == cm["metadata"]["name"]

    # Shutdown: the preStop pause and the drain fit in the grace period.
    pause = float(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] >= pause + cfg.peers.drain_timeout + 5


def test_the_shipped_token_is_refused_until_replaced(tmp_path: Path):
    """The Secret's placeholder must not work as a token (every cluster would share it)."""
    load_tokens = pytest.importorskip("p2pfs.peer._auth").load_tokens
    from p2pfs.errors import ConfigError

    f = tmp_path / "token"
    f.write_text(_one("Secret")["stringData"]["token"])
    f.chmod(0o600)
    with pytest.raises(ConfigError):
        load_tokens(f)


def test_kustomization_names_every_manifest():
    k = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    assert sorted(k["resources"]) == MANIFESTS
    assert k["namespace"] == "kube-system"


@pytest.mark.skipif(shutil.which("kubectl") is None,
                    reason="kubectl is not installed (Debian: kubernetes-client)")
def test_kubectl_kustomize_builds_these_manifests():
    out = subprocess.run(["kubectl", "kustomize", str(DEPLOY)], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    built = sorted((d for d in yaml.safe_load_all(out) if d), key=lambda d: d["kind"])
    ours = sorted((d for name in MANIFESTS for d in _docs(name)), key=lambda d: d["kind"])
    assert built == ours
