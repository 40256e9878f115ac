"""Deterministic OCI image layouts: same bytes, same digests, every run.

Layer payloads come from ``random.Random(seed).randbytes`` (the seed is a string, hashed by
Python into the generator state, so the stream is fixed), wrapped in a one-file ustar
archive and a gzip stream made of deflate *stored* blocks, written by hand so that no zlib
version can change a byte. Layers are gzip on purpose: skopeo compresses uncompressed
layers when pushing to a registry, which would change their digests; gzip passes through.
"""

import hashlib
import json
import os
import random
import struct
import zlib

MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
REF_NAME = "org.opencontainers.image.ref.name"

CHUNK = 1 << 20
STORED_MAX = 65535
KiB = 1024
MiB = 1 << 20


def _octal(value, width):
    s = format(value, "0%do" % (width - 1)).encode()
    assert len(s) == width - 1, "tar field overflow"
    return s + b"\0"


def tar_header(name, size):
    """A POSIX ustar header for one regular file (fixed owner, mode and mtime)."""
    h = bytearray(512)
    n = name.encode()
    h[0:len(n)] = n
    h[100:108] = _octal(0o644, 8)
    h[108:116] = _octal(0, 8)
    h[116:124] = _octal(0, 8)
    h[124:136] = _octal(size, 12)
    h[136:148] = _octal(1_700_000_000, 12)
    h[148:156] = b" " * 8
    h[156:157] = b"0"
    h[257:263] = b"ustar\0"
    h[263:265] = b"00"
    chk = sum(h)
    h[148:156] = format(chk, "06o").encode() + b"\0 "
    return bytes(h)


def payload(seed, size):
    """`size` pseudo-random bytes for `seed`, in chunks of at most 1 MiB."""
    r = random.Random("stevedore-bench/" + seed)
    left = size
    while left > 0:
        n = min(CHUNK, left)
        yield r.randbytes(n)
        left -= n


def tar_stream(seed, size):
    """A ustar archive holding one file of `size` payload bytes."""
    yield tar_header("data.bin", size)
    yield from payload(seed, size)
    pad = (-size) % 512
    yield b"\0" * (pad + 1024)


class _GzipStored:
    """Writes a gzip member whose deflate stream is only stored blocks."""

    def __init__(self, out):
        self.out = out
        self.buf = bytearray()
        self.crc = 0
        self.isize = 0
        self.out(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff")

    def write(self, data):
        self.crc = zlib.crc32(data, self.crc)
        self.isize += len(data)
        self.buf += data
        if len(self.buf) >= STORED_MAX:
            buf = self.buf
            n = len(buf) // STORED_MAX * STORED_MAX
            hdr = b"\x00" + struct.pack("<HH", STORED_MAX, STORED_MAX ^ 0xFFFF)
            parts = []
            for i in range(0, n, STORED_MAX):
                parts.append(hdr)
                parts.append(buf[i:i + STORED_MAX])
            self.out(b"".join(parts))
            del buf[:n]

    def close(self):
        n = len(self.buf)
        self.out(b"\x01" + struct.pack("<HH", n, n ^ 0xFFFF) + bytes(self.buf))
        self.out(struct.pack("<II", self.crc, self.isize & 0xFFFFFFFF))


class Layout:
    """An OCI image layout directory being written."""

    def __init__(self, root):
        self.root = root
        self.blobs = os.path.join(root, "blobs", "sha256")
        os.makedirs(self.blobs, exist_ok=True)
        self.refs = []

    def _path(self, digest):
        return os.path.join(self.blobs, digest.split(":", 1)[1])

    def put_bytes(self, media_type, data):
        d = "sha256:" + hashlib.sha256(data).hexdigest()
        p = self._path(d)
        if not os.path.exists(p):
            with open(p + ".tmp", "wb") as f:
                f.write(data)
            os.rename(p + ".tmp", p)
        return {"mediaType": media_type, "digest": d, "size": len(data)}

    def put_layer(self, seed, size):
        """A tar+gzip layer with a `size`-byte payload; returns (descriptor, diff_id)."""
        tmp = os.path.join(self.blobs, "layer.tmp")
        h_gz = hashlib.sha256()
        h_tar = hashlib.sha256()
        total = 0
        with open(tmp, "wb", buffering=0) as f:
            def out(b):
                nonlocal total
                h_gz.update(b)
                f.write(b)
                total += len(b)
            gz = _GzipStored(out)
            for chunk in tar_stream(seed, size):
                h_tar.update(chunk)
                gz.write(chunk)
            gz.close()
        d = "sha256:" + h_gz.hexdigest()
        os.replace(tmp, self._path(d))
        return {"mediaType": MT_LAYER, "digest": d, "size": total}, "sha256:" + h_tar.hexdigest()

    def image(self, name, layer_sizes, arch="amd64"):
        """Writes a single-platform image; returns its manifest descriptor and parts."""
        layers, diff_ids = [], []
        for i, size in enumerate(layer_sizes):
            desc, diff = self.put_layer("%s/%s/%d" % (name, arch, i), size)
            layers.append(desc)
            diff_ids.append(diff)
        config = {
            "architecture": arch,
            "os": "linux",
            "created": "2023-11-14T22:13:20Z",
            "config": {"Env": ["STEVEDORE_BENCH_IMAGE=" + name]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }
        cdesc = self.put_bytes(MT_CONFIG, _json(config))
        manifest = {"schemaVersion": 2, "mediaType": MT_MANIFEST, "config": cdesc, "layers": layers}
        mdesc = self.put_bytes(MT_MANIFEST, _json(manifest))
        return {"manifest": mdesc, "config": cdesc, "layers": layers}

    def index(self, name, platforms, layer_sizes):
        """A multi-platform index of small images, one per architecture."""
        children = []
        for arch in platforms:
            img = self.image(name, layer_sizes, arch=arch)
            d = dict(img["manifest"])
            d["platform"] = {"architecture": arch, "os": "linux"}
            children.append((d, img))
        idx = {"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": [c[0] for c in children]}
        desc = self.put_bytes(MT_INDEX, _json(idx))
        return {"manifest": desc, "children": [c[1] for c in children]}

    def tag(self, ref, desc):
        d = dict(desc)
        d["annotations"] = {REF_NAME: ref}
        self.refs.append(d)

    def finish(self):
        with open(os.path.join(self.root, "oci-layout"), "w") as f:
            f.write('{"imageLayoutVersion":"1.0.0"}')
        with open(os.path.join(self.root, "index.json"), "wb") as f:
            f.write(_json({"schemaVersion": 2, "manifests": self.refs}))


def _json(v):
    return json.dumps(v, sort_keys=True, separators=(",", ":")).encode()


def generate(root, big_mib=512):
    """Writes the benchmark images into an OCI layout at `root`; returns their descriptions.

    big   = one `big_mib` MiB layer + 1 MiB + 32 KiB layers
    small = 3 x 1 MiB
    many  = 50 x 256 KiB
    multi = a linux/amd64 + linux/arm64 index, 2 x 512 KiB layers each
    """
    lay = Layout(root)
    images = {
        "big": lay.image("big", [big_mib * MiB, 1 * MiB, 32 * KiB]),
        "small": lay.image("small", [MiB] * 3),
        "many": lay.image("many", [256 * KiB] * 50),
    }
    multi = lay.index("multi", ["amd64", "arm64"], [512 * KiB] * 2)
    for name, img in images.items():
        lay.tag(name, img["manifest"])
    lay.tag("multi", multi["manifest"])
    lay.finish()
    images["multi"] = multi
    return images


if __name__ == "__main__":
    import sys
    import time
    t = time.time()
    imgs = generate(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 512)
    print(json.dumps({k: v["manifest"]["digest"] for k, v in imgs.items()}, indent=1))
    print("%.1f s" % (time.time() - t), file=sys.stderr)
