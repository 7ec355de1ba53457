"""snapshotter/_cri.py: the CRI image service client, on the wire and against a real
containerd pulling from a local registry."""

from __future__ import annotations

from pathlib import Path

import pytest

from containerd_helpers import busybox_ref, containerd_factory, needs_containerd  # noqa: F401
from image_helpers import registry  # noqa: F401
from snapshotter._cri import MESSAGES, Auth, CRIError, ImageService


def test_field_numbers_on_the_wire():
    """The hand-built descriptors put each field where CRI's api.proto has it."""
    req = MESSAGES["PullImageRequest"](
        image=MESSAGES["ImageSpec"](image="r/x:1", annotations={"k": "v"}),
        auth=MESSAGES["AuthConfig"](username="u", registry_token="t"))
    # ImageSpec: image=1 (0x0a), annotations=2 (0x12, an entry {key=1, value=2})
    spec = b"\x0a\x05r/x:1" + b"\x12\x06" + b"\x0a\x01k\x12\x01v"
    # AuthConfig: username=1 (0x0a), registry_token=6 (0x32)
    auth = b"\x0a\x01u" + b"\x32\x01t"
    assert req.SerializeToString() == b"\x0a" + bytes([len(spec)]) + spec + b"\x12" + bytes([len(auth)]) + auth
    assert MESSAGES["PullImageResponse"].FromString(b"\x0a\x03abc").image_ref == "abc"
    # Image: id=1, repo_tags=2, repo_digests=3, size=4 (varint 400)
    image = b"\x0a\x03sha" + b"\x12\x02t1" + b"\x1a\x02d1" + b"\x20\x90\x03"
    img = MESSAGES["ImageStatusResponse"].FromString(b"\x0a" + bytes([len(image)]) + image)
    assert (img.image.id, list(img.image.repo_tags), list(img.image.repo_digests),
            img.image.size) == ("sha", ["t1"], ["d1"], 400)


def test_unreachable_socket_is_unavailable(tmp_path: Path):
    with ImageService(str(tmp_path / "none.sock"), timeout=5) as cri:
        with pytest.raises(CRIError) as info:
            cri.pull("127.0.0.1:1/x:1")
    assert info.value.code == "UNAVAILABLE" and info.value.method == "PullImage"


@needs_containerd
def test_pull_run_remove(registry, containerd_factory, busybox_ref):  # noqa: F811
    ref = busybox_ref
    node = containerd_factory(snapshotter="overlayfs", registries=[registry.host])
    with ImageService(str(node.socket), timeout=120) as cri:
        assert cri.status(ref) is None
        image_id = cri.pull(ref, auth=Auth())  # an empty AuthConfig is what kubelet sends anonymously
        assert image_id.startswith("sha256:")
        records = set(node.images())
        assert ref in records and image_id in records and len(records) == 3  # tag, repo@digest, id
        info = cri.status(ref)
        assert info is not None and info.id == image_id and info.repo_tags == (ref,)
        assert info.repo_digests[0].startswith(f"{registry.host}/test/busybox@sha256:")
        assert [i.id for i in cri.list()] == [image_id]

        run = node.run_container(ref, "cri-run-1", ["sh", "-c", "cat /etc/app/c.conf; ls /etc/app"],
                                 snapshotter="overlayfs")
        assert run.output.split() == ["c=3", "c.conf"]  # the opaque dir hides layer 2's files
        assert run.time_to_first_output is not None and run.time_to_first_output > 0

        cri.remove(ref)
        assert node.images() == [] and cri.status(ref) is None
        cri.remove(ref)  # absent: not an error


@needs_containerd
def test_pull_of_a_missing_image_is_not_found(registry, containerd_factory):  # noqa: F811
    node = containerd_factory(snapshotter="overlayfs", registries=[registry.host])
    with ImageService(str(node.socket), timeout=60) as cri:
        with pytest.raises(CRIError) as info:
            cri.pull(f"{registry.host}/cri/absent:v1")
    assert info.value.code == "NOT_FOUND"
    assert node.images() == []
