"""The object store client headstart uses (headstart.infra.object_store), on moto's S3 server."""

from headstart.infra.object_store import ObjectStore, local_copy


def test_cas(s3_bucket):
    store = ObjectStore(s3_bucket + "/team")
    store.check("--artifacts-root")
    assert store.create("a.json", b"1")
    assert not store.create("a.json", b"2")
    data, tag = store.read_with_tag("a.json")
    assert data == b"1"
    assert store.replace_if("a.json", b"3", tag)
    assert not store.replace_if("a.json", b"4", tag)
    assert store.read_bytes("a.json") == b"3"
    store.write_bytes("x/y/z.bin", b"zz")
    assert set(store.listing()) == {"a.json", "x/y/z.bin"}
    assert store.children() == ["a.json", "x"]
    store.download("x/y/z.bin", local_copy(s3_bucket) / "z.bin")
    assert (local_copy(s3_bucket) / "z.bin").read_bytes() == b"zz"
    store.remove("x")
    assert set(store.listing()) == {"a.json"}
