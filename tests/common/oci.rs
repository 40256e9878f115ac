//! Small but real container images and OCI image layouts (image-spec v1.1 "image-layout"),
//! built without external tools: each layer is a ustar archive (directories and regular
//! files) in a valid gzip stream that uses deflate "stored" blocks (no compression library
//! needed); the config's `rootfs.diff_ids` are the sha256 of the uncompressed tars, as
//! containerd, podman and docker check when they unpack. Plus manifests, indexes,
//! `oci-layout` and `index.json`.
//!
//! Layers are gzip on purpose: skopeo compresses uncompressed layers when pushing to a
//! registry, which would change every digest; gzip layers pass through byte-for-byte.

use super::data;
use serde_json::{json, Value};
use std::path::Path;

pub const MT_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MT_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MT_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const MT_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const MT_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const MT_DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const MT_DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// A content-addressed blob with its media type.
#[derive(Clone, Debug)]
pub struct Blob {
    pub media_type: String,
    pub digest: String,
    pub data: Vec<u8>,
}

impl Blob {
    pub fn new(media_type: &str, data: Vec<u8>) -> Blob {
        Blob { media_type: media_type.to_string(), digest: data::sha256(&data), data }
    }
    pub fn size(&self) -> usize {
        self.data.len()
    }
    pub fn hex(&self) -> &str {
        self.digest.strip_prefix("sha256:").expect("sha256 digest")
    }
    /// An OCI content descriptor for this blob.
    pub fn descriptor(&self) -> Value {
        json!({"mediaType": self.media_type, "digest": self.digest, "size": self.size()})
    }
}

/// A single-platform image and the files it unpacks to.
#[derive(Clone, Debug)]
pub struct Image {
    pub config: Blob,
    pub layers: Vec<Blob>,
    pub manifest: Blob,
    /// sha256 of each uncompressed layer tar.
    pub diff_ids: Vec<String>,
    /// Every regular file of the unpacked image: (path without leading `/`, contents).
    pub files: Vec<(String, Vec<u8>)>,
}

impl Image {
    /// Every blob of the image (config and layers, what a client GETs under `/blobs/`),
    /// manifest excluded.
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

/// Writes an octal field of a tar header (NUL terminated).
fn tar_octal(field: &mut [u8], value: u64) {
    let width = field.len() - 1;
    let s = format!("{value:0width$o}");
    assert_eq!(s.len(), width, "tar field overflow");
    field[..width].copy_from_slice(s.as_bytes());
    field[width] = 0;
}

/// One ustar entry owned by root: a directory (`data == None`, name ending in `/`) or a
/// regular file.
fn tar_entry(out: &mut Vec<u8>, name: &str, data: Option<&[u8]>) {
    assert!(name.len() < 100, "tar name too long: {name}");
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    let (mode, size, kind) = match data {
        Some(d) => (0o644, d.len() as u64, b'0'),
        None => (0o755, 0, b'5'),
    };
    tar_octal(&mut h[100..108], mode);
    tar_octal(&mut h[108..116], 0); // uid
    tar_octal(&mut h[116..124], 0); // gid
    tar_octal(&mut h[124..136], size);
    tar_octal(&mut h[136..148], 1_700_000_000); // mtime
    h[148..156].copy_from_slice(b"        "); // checksum placeholder: spaces
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

/// A POSIX ustar archive of `entries` (`None`: directory), with the end-of-archive marker.
pub fn tar(entries: &[(&str, Option<&[u8]>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, data) in entries {
        tar_entry(&mut out, name, *data);
    }
    out.extend(std::iter::repeat_n(0u8, 1024));
    out
}

/// A POSIX ustar archive holding one regular file `name` with `contents`.
pub fn tar_one_file(name: &str, contents: &[u8]) -> Vec<u8> {
    tar(&[(name, Some(contents))])
}

/// CRC-32 (IEEE 802.3, as used by gzip).
pub fn crc32(data: &[u8]) -> u32 {
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

/// A valid gzip member (RFC 1952) whose deflate stream (RFC 1951) uses stored blocks only.
pub fn gzip_stored(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + data.len() / 65535 * 5 + 32);
    // ID1 ID2 CM=deflate FLG=0 MTIME=0 XFL=0 OS=255(unknown)
    out.extend_from_slice(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255]);
    let mut chunks = data.chunks(65535).peekable();
    if chunks.peek().is_none() {
        out.extend_from_slice(&[1, 0, 0, 0xff, 0xff]);
    }
    while let Some(chunk) = chunks.next() {
        let last = chunks.peek().is_none();
        out.push(if last { 1 } else { 0 }); // BFINAL, BTYPE=00 (byte aligned)
        let len = chunk.len() as u16;
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(chunk);
    }
    out.extend_from_slice(&crc32(data).to_le_bytes());
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out
}

/// A deterministic image with `n_layers` gzip layers of roughly `layer_size` random bytes each.
pub fn make_image(seed: u64, n_layers: usize, layer_size: usize, arch: &str, os: &str) -> Image {
    let mut layers = Vec::new();
    let mut diff_ids = Vec::new();
    let mut files = Vec::new();
    for i in 0..n_layers {
        let contents = data::bytes(seed.wrapping_mul(1000).wrapping_add(i as u64), layer_size + i * 977);
        let name = format!("layer{i}/file-{seed}-{i}.bin");
        let tar = tar_one_file(&name, &contents);
        diff_ids.push(data::sha256(&tar));
        layers.push(Blob::new(MT_LAYER_GZIP, gzip_stored(&tar)));
        files.push((name, contents));
    }
    let config = json!({
        "created": "2024-01-01T00:00:00Z",
        "architecture": arch,
        "os": os,
        "config": {"Env": [format!("STEVEDORE_TEST_SEED={seed}")]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": (0..n_layers).map(|i| json!({"created": "2024-01-01T00:00:00Z", "created_by": format!("layer {i}")})).collect::<Vec<_>>(),
    });
    let config = Blob::new(MT_CONFIG, serde_json::to_vec(&config).unwrap());
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": MT_MANIFEST,
        "config": config.descriptor(),
        "layers": layers.iter().map(Blob::descriptor).collect::<Vec<_>>(),
        "annotations": {"org.example.seed": seed.to_string()},
    });
    let manifest = Blob::new(MT_MANIFEST, serde_json::to_vec_pretty(&manifest).unwrap());
    Image { config, layers, manifest, diff_ids, files }
}

/// The host's architecture in OCI terms (the clients pick images for it).
pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// An image for the host named `name` with two gzip layers: layer 0 holds
/// `etc/stevedore/<name>.txt` and `etc/stevedore/<name>.bin`, layer 1 `srv/<name>/data.bin`
/// and `srv/<name>/README`; the `.bin` files are `size` pseudo-random bytes each.
/// `docker_types` selects Docker schema 2 media types instead of OCI ones.
pub fn build(name: &str, seed: u64, size: usize, docker_types: bool) -> Image {
    let (mt_manifest, mt_config, mt_layer) = if docker_types {
        (MT_DOCKER_MANIFEST, MT_DOCKER_CONFIG, MT_DOCKER_LAYER)
    } else {
        (MT_MANIFEST, MT_CONFIG, MT_LAYER_GZIP)
    };
    let txt = format!("{name}: layer 0 of a Stevedore client test image (seed {seed})\n").into_bytes();
    let bin = data::bytes(seed ^ 0x5eed, size);
    let blob = data::bytes(seed, size);
    let readme = format!("{name}: layer 1\n").into_bytes();
    let f0 = format!("etc/stevedore/{name}.txt");
    let f0b = format!("etc/stevedore/{name}.bin");
    let d1 = format!("srv/{name}/");
    let f1 = format!("srv/{name}/data.bin");
    let f2 = format!("srv/{name}/README");
    let tars = [
        tar(&[("etc/", None), ("etc/stevedore/", None), (&f0, Some(&txt)), (&f0b, Some(&bin))]),
        tar(&[("srv/", None), (&d1, None), (&f1, Some(&blob)), (&f2, Some(&readme))]),
    ];
    let diff_ids: Vec<String> = tars.iter().map(|t| data::sha256(t)).collect();
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
    let files = vec![(f0, txt), (f0b, bin), (f1, blob), (f2, readme)];
    Image { config, layers, manifest, diff_ids, files }
}

/// An OCI image index over `(image, architecture, variant)` entries (os is linux).
pub fn make_index(entries: &[(&Image, &str, Option<&str>)]) -> Blob {
    let manifests: Vec<Value> = entries
        .iter()
        .map(|(img, arch, variant)| {
            let mut d = img.manifest.descriptor();
            let mut platform = json!({"architecture": arch, "os": "linux"});
            if let Some(v) = variant {
                platform["variant"] = json!(v);
            }
            d["platform"] = platform;
            d
        })
        .collect();
    let index = json!({"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": manifests});
    Blob::new(MT_INDEX, serde_json::to_vec(&index).unwrap())
}

/// Writes an OCI image layout at `dir`: every blob under `blobs/sha256/`, `oci-layout`, and
/// `index.json` naming each `(tag, root blob)` with `org.opencontainers.image.ref.name`.
pub fn write_layout(dir: &Path, blobs: &[&Blob], refs: &[(&str, &Blob)]) {
    let bdir = dir.join("blobs").join("sha256");
    std::fs::create_dir_all(&bdir).unwrap();
    for b in blobs.iter().copied().chain(refs.iter().map(|(_, b)| *b)) {
        std::fs::write(bdir.join(b.hex()), &b.data).unwrap();
    }
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let manifests: Vec<Value> = refs
        .iter()
        .map(|(tag, b)| {
            let mut d = b.descriptor();
            d["annotations"] = json!({ REF_NAME: tag });
            d
        })
        .collect();
    let index = json!({"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": manifests});
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
}

/// Writes a layout holding one image under `tag`.
pub fn write_image_layout(dir: &Path, img: &Image, tag: &str) {
    write_layout(dir, &img.blobs(), &[(tag, &img.manifest)]);
}

/// The descriptor `index.json` of the layout at `dir` gives for `tag`: (mediaType, digest).
pub fn layout_ref(dir: &Path, tag: &str) -> (String, String) {
    let index: Value = serde_json::from_slice(&std::fs::read(dir.join("index.json")).expect("index.json"))
        .expect("index.json is JSON");
    let m = index["manifests"]
        .as_array()
        .expect("manifests")
        .iter()
        .find(|m| m["annotations"][REF_NAME] == tag)
        .unwrap_or_else(|| panic!("tag {tag} not in {}/index.json: {index}", dir.display()));
    (m["mediaType"].as_str().unwrap_or("").to_string(), m["digest"].as_str().unwrap().to_string())
}

/// The bytes of blob `digest` in the layout at `dir` (verifies the content hash).
pub fn layout_blob(dir: &Path, digest: &str) -> Vec<u8> {
    let hex = digest.strip_prefix("sha256:").expect("sha256");
    let path = dir.join("blobs").join("sha256").join(hex);
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(data::sha256_hex(&bytes), hex, "{} does not hash to its name", path.display());
    bytes
}

/// The files of an OCI image layout (like [`write_layout`]): `(path, bytes)` with every blob
/// under `blobs/sha256/`, `oci-layout` and `index.json` naming each `(ref name, root blob)`.
/// Blobs come first and `index.json` last, as a tar written in walk order may have them.
pub fn layout_files(blobs: &[&Blob], refs: &[(&str, &Blob)]) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = Vec::new();
    for b in blobs.iter().copied().chain(refs.iter().map(|(_, b)| *b)) {
        let path = format!("blobs/sha256/{}", b.hex());
        if !out.iter().any(|(p, _)| p == &path) {
            out.push((path, b.data.clone()));
        }
    }
    out.push(("oci-layout".into(), br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec()));
    let manifests: Vec<Value> = refs
        .iter()
        .map(|(name, b)| {
            let mut d = b.descriptor();
            d["annotations"] = json!({ REF_NAME: name });
            d
        })
        .collect();
    let index = json!({"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": manifests});
    out.push(("index.json".into(), serde_json::to_vec(&index).unwrap()));
    out
}

/// A ustar archive of `files` (with `blobs/` and `blobs/sha256/` directory entries first).
pub fn tar_of(files: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut entries: Vec<(&str, Option<&[u8]>)> = vec![("blobs/", None), ("blobs/sha256/", None)];
    entries.extend(files.iter().map(|(p, d)| (p.as_str(), Some(d.as_slice()))));
    tar(&entries)
}

/// A referrer of `subject` (a signature-like artifact): an OCI image manifest with
/// `artifactType`, an empty JSON config and one payload layer, `subject` set. Returns the
/// manifest and its blobs (config, payload).
pub fn make_referrer(subject: &Blob, artifact_type: &str, payload: &[u8]) -> (Blob, Vec<Blob>) {
    let config = Blob::new("application/vnd.oci.empty.v1+json", b"{}".to_vec());
    let layer = Blob::new("application/vnd.example.signature.v1", payload.to_vec());
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": MT_MANIFEST,
        "artifactType": artifact_type,
        "config": config.descriptor(),
        "layers": [layer.descriptor()],
        "subject": subject.descriptor(),
        "annotations": {"org.example.signed": "yes"},
    });
    (Blob::new(MT_MANIFEST, serde_json::to_vec(&manifest).unwrap()), vec![config, layer])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_known_value() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
    }

    #[test]
    fn tar_header_checksum_is_valid() {
        let t = tar_one_file("a.txt", b"hello");
        assert_eq!(t.len() % 512, 0);
        let mut h = t[..512].to_vec();
        let stored = u32::from_str_radix(std::str::from_utf8(&h[148..154]).unwrap(), 8).unwrap();
        h[148..156].copy_from_slice(b"        ");
        assert_eq!(stored, h.iter().map(|&b| b as u32).sum::<u32>());
    }
}
