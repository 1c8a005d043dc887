//! Deterministic OCI image layouts written by hand (no internet, no docker build): the same seed
//! always gives the same bytes, hence the same digests, in every run and on every machine.
//!
//! Layers are tar (mtime 0, uid/gid 0, mode 0644) gzipped with a fixed header (mtime 0, no file
//! name); file content is xorshift noise from the seed. Big layers use gzip level 0 (stored
//! blocks): valid, and fast to make.

use std::io::Write;
use std::path::Path;

use flate2::Compression;
use serde_json::json;

use super::digest_of;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// An OCI image layout in a temp dir, tagged `latest`.
pub struct TestImage {
    dir: tempfile::TempDir,
    tag: String,
    manifest_digest: String,
    media_type: String,
    blobs: Vec<(String, u64)>,
    layers: Vec<String>,
    platform_manifests: Vec<(String, String)>,
}

/// xorshift64* noise: fast, seedable, stable.
struct Noise(u64);

impl Noise {
    fn from_seed(seed: &str) -> Noise {
        let h = super::sha256_hex(seed.as_bytes());
        Noise(u64::from_str_radix(&h[..16], 16).unwrap() | 1)
    }
    fn fill(&mut self, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            out.extend_from_slice(&self.0.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
        }
        out.truncate(len);
        out
    }
}

/// Writes blobs into `blobs/sha256/` and returns their descriptors.
struct Writer<'a> {
    root: &'a Path,
    blobs: Vec<(String, u64)>,
}

impl Writer<'_> {
    fn put(&mut self, data: &[u8]) -> (String, u64) {
        let d = digest_of(data);
        let path = self
            .root
            .join("blobs/sha256")
            .join(d.trim_start_matches("sha256:"));
        std::fs::write(path, data).expect("write blob");
        (d, data.len() as u64)
    }
    fn put_blob(&mut self, data: &[u8]) -> (String, u64) {
        let r = self.put(data);
        if !self.blobs.contains(&r) {
            self.blobs.push(r.clone());
        }
        r
    }
}

/// A tar with one file `data/<name>` holding `content`; deterministic headers.
fn tar_one(name: &str, content: &[u8]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut dir = tar::Header::new_gnu();
    dir.set_entry_type(tar::EntryType::Directory);
    dir.set_path("data/").unwrap();
    dir.set_size(0);
    dir.set_mode(0o755);
    dir.set_mtime(0);
    dir.set_uid(0);
    dir.set_gid(0);
    dir.set_cksum();
    b.append(&dir, std::io::empty()).unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_path(format!("data/{name}")).unwrap();
    h.set_size(content.len() as u64);
    h.set_mode(0o644);
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    b.append(&h, content).unwrap();
    b.into_inner().unwrap()
}

/// gzip with a fixed header (mtime 0, no name).
fn gzip(data: &[u8], level: Compression) -> Vec<u8> {
    let mut gz = flate2::GzBuilder::new()
        .mtime(0)
        .write(Vec::with_capacity(data.len() / 2 + 64), level);
    gz.write_all(data).unwrap();
    gz.finish().unwrap()
}

/// Builds one platform's manifest from layer payload sizes; returns (manifest digest, size).
fn build_manifest(
    w: &mut Writer,
    seed: &str,
    arch: &str,
    sizes: &[usize],
    layers_out: &mut Vec<String>,
) -> (String, u64) {
    let mut noise = Noise::from_seed(&format!("{seed}/{arch}"));
    let mut layer_descs = Vec::new();
    let mut diff_ids = Vec::new();
    for (i, &size) in sizes.iter().enumerate() {
        let tar = tar_one(&format!("{seed}-{arch}-{i}.bin"), &noise.fill(size));
        diff_ids.push(digest_of(&tar));
        let level = if size > 1 << 20 {
            Compression::none()
        } else {
            Compression::default()
        };
        let (d, s) = w.put_blob(&gzip(&tar, level));
        layers_out.push(d.clone());
        layer_descs.push(json!({"mediaType": OCI_LAYER_GZIP, "digest": d, "size": s}));
    }
    let config = json!({
        "created": "1970-01-01T00:00:00Z",
        "architecture": arch, "os": "linux",
        "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"], "Cmd": ["/bin/sh"],
                   "Labels": {"testbed.seed": seed}},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": sizes.iter().map(|_| json!({"created": "1970-01-01T00:00:00Z", "created_by": "testbed"})).collect::<Vec<_>>(),
    });
    let (cd, cs) = w.put_blob(config.to_string().as_bytes());
    let manifest = json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": cd, "size": cs},
        "layers": layer_descs,
    });
    w.put(manifest.to_string().as_bytes())
}

impl TestImage {
    /// One ~10 KiB layer.
    pub fn small(seed: &str) -> TestImage {
        Self::build(seed, &["amd64"], &[10 * 1024])
    }
    /// `n` layers of 4–8 KiB each.
    pub fn multi_layer(seed: &str, n: usize) -> TestImage {
        let sizes: Vec<usize> = (0..n).map(|i| 4096 + (i * 1024) % 4096).collect();
        Self::build(seed, &["amd64"], &sizes)
    }
    /// One layer with `bytes` bytes of incompressible payload (gzip level 0 above 1 MiB).
    pub fn with_layer_size(seed: &str, bytes: usize) -> TestImage {
        Self::build(seed, &["amd64"], &[bytes])
    }
    /// An OCI index with linux/amd64 and linux/arm64 manifests (different layers).
    pub fn two_platform_index(seed: &str) -> TestImage {
        Self::build(seed, &["amd64", "arm64"], &[10 * 1024])
    }

    /// One manifest when one arch is given, an index over all archs otherwise.
    pub fn build(seed: &str, archs: &[&str], layer_sizes: &[usize]) -> TestImage {
        let dir = tempfile::Builder::new()
            .prefix("img-")
            .tempdir()
            .expect("tempdir");
        std::fs::create_dir_all(dir.path().join("blobs/sha256")).expect("mkdir");
        let mut w = Writer {
            root: dir.path(),
            blobs: Vec::new(),
        };
        let mut layers = Vec::new();
        let mut platform_manifests = Vec::new();
        let mut descs = Vec::new();
        for arch in archs {
            let (d, s) = build_manifest(&mut w, seed, arch, layer_sizes, &mut layers);
            platform_manifests.push((format!("linux/{arch}"), d.clone()));
            descs.push(json!({"mediaType": OCI_MANIFEST, "digest": d, "size": s,
                              "platform": {"architecture": arch, "os": "linux"}}));
        }
        let (media_type, top) = if archs.len() == 1 {
            (OCI_MANIFEST, descs.pop().unwrap())
        } else {
            let index = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descs});
            let (d, s) = w.put(index.to_string().as_bytes());
            (
                OCI_INDEX,
                json!({"mediaType": OCI_INDEX, "digest": d, "size": s}),
            )
        };
        let tag = "latest".to_string();
        let mut top_ref = top.clone();
        if let Some(o) = top_ref.as_object_mut() {
            o.remove("platform");
        }
        top_ref["annotations"] = json!({"org.opencontainers.image.ref.name": tag});
        let layout_index = json!({"schemaVersion": 2, "manifests": [top_ref]});
        std::fs::write(dir.path().join("index.json"), layout_index.to_string())
            .expect("index.json");
        std::fs::write(
            dir.path().join("oci-layout"),
            r#"{"imageLayoutVersion":"1.0.0"}"#,
        )
        .expect("oci-layout");
        TestImage {
            manifest_digest: top["digest"].as_str().unwrap().to_string(),
            media_type: media_type.to_string(),
            blobs: w.blobs,
            layers,
            platform_manifests,
            tag,
            dir,
        }
    }

    pub fn layout_dir(&self) -> &Path {
        self.dir.path()
    }
    /// "oci:<dir>:latest", a skopeo source.
    pub fn oci_ref(&self) -> String {
        format!("oci:{}:{}", self.dir.path().display(), self.tag)
    }
    /// Digest of the top-level manifest (the index for multi-platform images).
    pub fn manifest_digest(&self) -> &str {
        &self.manifest_digest
    }
    /// Media type of the top-level manifest.
    pub fn media_type(&self) -> &str {
        &self.media_type
    }
    /// Config and layer blobs of every platform: (digest, size).
    pub fn blobs(&self) -> Vec<(String, u64)> {
        self.blobs.clone()
    }
    /// Layer digests of every platform, in manifest order.
    pub fn layer_digests(&self) -> Vec<String> {
        self.layers.clone()
    }
    /// ("linux/amd64", manifest digest) for each platform.
    pub fn platform_manifests(&self) -> Vec<(String, String)> {
        self.platform_manifests.clone()
    }
    /// Raw bytes of any blob or manifest in the layout.
    pub fn blob_bytes(&self, digest: &str) -> Vec<u8> {
        std::fs::read(
            self.dir
                .path()
                .join("blobs/sha256")
                .join(digest.trim_start_matches("sha256:")),
        )
        .expect("blob in layout")
    }
    /// Raw bytes of the top-level manifest.
    pub fn manifest_bytes(&self) -> Vec<u8> {
        self.blob_bytes(&self.manifest_digest)
    }
}
