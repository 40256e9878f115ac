//! Small but real container images, built without external tools: each layer is a ustar
//! archive (directories and regular files) in a valid gzip stream (deflate "stored" blocks),
//! and the config's `rootfs.diff_ids` are the sha256 of the uncompressed tars, as containerd,
//! podman and docker check when they unpack.

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

pub const MT_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MT_OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const MT_OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const MT_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const MT_DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const MT_DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

pub fn hex(bytes: &[u8]) -> String {
    const H: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(H[(b >> 4) as usize] as char);
        s.push(H[(b & 15) as usize] as char);
    }
    s
}

/// `sha256:<hex>`
pub fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(data)))
}

/// `len` deterministic pseudo-random bytes for `seed` (splitmix64).
pub fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    let mut z = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x5851_f42d_4c95_7f2d;
    while out.len() < len {
        z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut x = z;
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        x ^= x >> 31;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A content-addressed blob with its media type.
#[derive(Clone, Debug)]
pub struct Blob {
    pub media_type: String,
    pub digest: String,
    pub data: Vec<u8>,
}

impl Blob {
    pub fn new(media_type: &str, data: Vec<u8>) -> Blob {
        Blob { media_type: media_type.to_string(), digest: sha256(&data), data }
    }

    pub fn descriptor(&self) -> Value {
        json!({"mediaType": self.media_type, "digest": self.digest, "size": self.data.len()})
    }
}

/// A single-platform image and the files it unpacks to.
#[derive(Clone, Debug)]
pub struct TestImage {
    pub config: Blob,
    pub layers: Vec<Blob>,
    pub manifest: Blob,
    /// sha256 of each uncompressed layer tar.
    pub diff_ids: Vec<String>,
    /// Every regular file of the unpacked image: (path without leading `/`, contents).
    pub files: Vec<(String, Vec<u8>)>,
}

impl TestImage {
    /// Config and layers (what a client GETs under `/blobs/`).
    pub fn blobs(&self) -> Vec<&Blob> {
        let mut v: Vec<&Blob> = self.layers.iter().collect();
        v.push(&self.config);
        v
    }

    /// Every digest the image is made of, manifest included.
    pub fn digests(&self) -> Vec<String> {
        let mut v: Vec<String> = self.blobs().iter().map(|b| b.digest.clone()).collect();
        v.push(self.manifest.digest.clone());
        v
    }
}

fn tar_octal(field: &mut [u8], value: u64) {
    let width = field.len() - 1;
    let s = format!("{value:0width$o}");
    assert_eq!(s.len(), width, "tar field overflow");
    field[..width].copy_from_slice(s.as_bytes());
    field[width] = 0;
}

/// One ustar entry: a directory (`data == None`, name ending in `/`) or a regular file.
fn tar_entry(out: &mut Vec<u8>, name: &str, data: Option<&[u8]>) {
    assert!(name.len() < 100, "tar name too long: {name}");
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    let (mode, size, kind) = match data {
        Some(d) => (0o644, d.len() as u64, b'0'),
        None => (0o755, 0, b'5'),
    };
    tar_octal(&mut h[100..108], mode);
    tar_octal(&mut h[108..116], 0);
    tar_octal(&mut h[116..124], 0);
    tar_octal(&mut h[124..136], size);
    tar_octal(&mut h[136..148], 1_700_000_000);
    h[148..156].copy_from_slice(b"        ");
    h[156] = kind;
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[265..269].copy_from_slice(b"root");
    h[297..301].copy_from_slice(b"root");
    let sum: u32 = h.iter().map(|&b| b as u32).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    out.extend_from_slice(&h);
    if let Some(d) = data {
        out.extend_from_slice(d);
        out.extend(std::iter::repeat_n(0u8, (512 - d.len() % 512) % 512));
    }
}

/// A tar of `entries` (`None`: directory), with the end-of-archive marker.
fn tar(entries: &[(&str, Option<&[u8]>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, data) in entries {
        tar_entry(&mut out, name, *data);
    }
    out.extend(std::iter::repeat_n(0u8, 1024));
    out
}

fn crc32(data: &[u8]) -> u32 {
    let mut table = [0u32; 256];
    for (i, t) in table.iter_mut().enumerate() {
        let mut c = i as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 { 0xedb8_8320 ^ (c >> 1) } else { c >> 1 };
        }
        *t = c;
    }
    let mut crc = 0xffff_ffffu32;
    for &b in data {
        crc = table[((crc ^ b as u32) & 0xff) as usize] ^ (crc >> 8);
    }
    crc ^ 0xffff_ffff
}

/// A gzip member (RFC 1952) whose deflate stream uses stored blocks only.
fn gzip_stored(data: &[u8]) -> Vec<u8> {
    let mut out = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255];
    let mut chunks = data.chunks(65535).peekable();
    if chunks.peek().is_none() {
        out.extend_from_slice(&[1, 0, 0, 0xff, 0xff]);
    }
    while let Some(chunk) = chunks.next() {
        out.push(u8::from(chunks.peek().is_none()));
        let len = chunk.len() as u16;
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(chunk);
    }
    out.extend_from_slice(&crc32(data).to_le_bytes());
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out
}

/// The host's architecture in OCI terms (the clients pick images for it).
pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// An image named `name` with two gzip layers: layer 0 holds `etc/stevedore/<name>.txt` and
/// `etc/stevedore/<name>.bin`, layer 1 `srv/<name>/data.bin` and `srv/<name>/README`; the
/// `.bin` files are `size` pseudo-random bytes each. `docker_types` selects Docker schema 2
/// media types instead of OCI ones.
pub fn build(name: &str, seed: u64, size: usize, docker_types: bool) -> TestImage {
    let (mt_manifest, mt_config, mt_layer) = if docker_types {
        (MT_DOCKER_MANIFEST, MT_DOCKER_CONFIG, MT_DOCKER_LAYER)
    } else {
        (MT_OCI_MANIFEST, MT_OCI_CONFIG, MT_OCI_LAYER)
    };
    let txt = format!("{name}: layer 0 of a Stevedore client test image (seed {seed})\n").into_bytes();
    let bin = bytes(seed ^ 0x5eed, size);
    let data = bytes(seed, size);
    let readme = format!("{name}: layer 1\n").into_bytes();
    let f0 = format!("etc/stevedore/{name}.txt");
    let f0b = format!("etc/stevedore/{name}.bin");
    let d1 = format!("srv/{name}/");
    let f1 = format!("srv/{name}/data.bin");
    let f2 = format!("srv/{name}/README");
    let tars = [
        tar(&[("etc/", None), ("etc/stevedore/", None), (&f0, Some(&txt)), (&f0b, Some(&bin))]),
        tar(&[("srv/", None), (&d1, None), (&f1, Some(&data)), (&f2, Some(&readme))]),
    ];
    let diff_ids: Vec<String> = tars.iter().map(|t| sha256(t)).collect();
    let layers: Vec<Blob> = tars.iter().map(|t| Blob::new(mt_layer, gzip_stored(t))).collect();
    let config = json!({
        "created": "2024-01-01T00:00:00Z",
        "architecture": host_arch(),
        "os": "linux",
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": ["/bin/true"],
            "Labels": {"org.example.stevedore.test": name},
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [
            {"created": "2024-01-01T00:00:00Z", "created_by": "layer 0"},
            {"created": "2024-01-01T00:00:00Z", "created_by": "layer 1"},
        ],
    });
    let config = Blob::new(mt_config, serde_json::to_vec(&config).unwrap());
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": mt_manifest,
        "config": config.descriptor(),
        "layers": layers.iter().map(Blob::descriptor).collect::<Vec<_>>(),
    });
    let manifest = Blob::new(mt_manifest, serde_json::to_vec_pretty(&manifest).unwrap());
    TestImage { config, layers, manifest, diff_ids, files: vec![(f0, txt), (f0b, bin), (f1, data), (f2, readme)] }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_known_value() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
    }
}
