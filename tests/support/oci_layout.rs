//! Builds OCI image layouts (image-spec v1.1 "image-layout") in a directory, without
//! external tools: a real ustar archive per layer, wrapped in a valid gzip stream that uses
//! deflate "stored" blocks (no compression library needed), plus config, manifest, index,
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
        Blob { media_type: media_type.to_string(), digest: data::sha256_digest(&data), data }
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

/// A single-platform image.
#[derive(Clone, Debug)]
pub struct Image {
    pub config: Blob,
    pub layers: Vec<Blob>,
    pub manifest: Blob,
}

impl Image {
    /// Every blob of the image (config and layers), manifest excluded.
    pub fn blobs(&self) -> Vec<&Blob> {
        let mut v: Vec<&Blob> = self.layers.iter().collect();
        v.push(&self.config);
        v
    }
}

/// Writes an octal field of a tar header (NUL terminated).
fn tar_octal(field: &mut [u8], value: u64) {
    let width = field.len() - 1;
    let s = format!("{:0width$o}", value, width = width);
    assert!(s.len() == width, "tar field overflow");
    field[..width].copy_from_slice(s.as_bytes());
    field[width] = 0;
}

/// A POSIX ustar archive holding one regular file `name` with `contents`.
pub fn tar_one_file(name: &str, contents: &[u8]) -> Vec<u8> {
    assert!(name.len() < 100);
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    tar_octal(&mut h[100..108], 0o644); // mode
    tar_octal(&mut h[108..116], 0); // uid
    tar_octal(&mut h[116..124], 0); // gid
    tar_octal(&mut h[124..136], contents.len() as u64); // size
    tar_octal(&mut h[136..148], 1_700_000_000); // mtime
    h[148..156].copy_from_slice(b"        "); // checksum placeholder: spaces
    h[156] = b'0'; // regular file
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    let sum: u32 = h.iter().map(|&b| b as u32).sum();
    let chk = format!("{:06o}\0 ", sum);
    h[148..156].copy_from_slice(chk.as_bytes());

    let mut out = Vec::with_capacity(512 + contents.len() + 512 + 1024);
    out.extend_from_slice(&h);
    out.extend_from_slice(contents);
    let pad = (512 - contents.len() % 512) % 512;
    out.extend(std::iter::repeat_n(0u8, pad));
    out.extend(std::iter::repeat_n(0u8, 1024)); // end-of-archive marker
    out
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
    for i in 0..n_layers {
        let contents = data::bytes(seed.wrapping_mul(1000).wrapping_add(i as u64), layer_size + i * 977);
        let tar = tar_one_file(&format!("layer{i}/file-{seed}-{i}.bin"), &contents);
        diff_ids.push(data::sha256_digest(&tar));
        layers.push(Blob::new(MT_LAYER_GZIP, gzip_stored(&tar)));
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
    Image { config, layers, manifest }
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
