//! The keyring: the wrapped generation keys, in `<cache dir>/keys/keyring.json`.
//!
//! Owns: that file's format and writing it safely (temp file, fsync, rename, fsync of the
//! directory), so a crash leaves the old keyring or the new one. Must never: hold an unwrapped
//! key (only what the provider wrapped is written).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::provider::Wrapped;

const FILE: &str = "keyring.json";

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Keyring {
    pub format: u32,
    /// Which KEK (provider identity) wrapped these; another KEK starts a new keyring.
    pub provider: String,
    /// The generation new files are sealed with.
    pub current: Option<u32>,
    pub generations: Vec<Generation>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Generation {
    pub id: u32,
    /// Unix seconds.
    pub created: u64,
    pub wrapped: Wrapped,
}

impl Keyring {
    pub fn path(dir: &Path) -> PathBuf {
        dir.join(FILE)
    }

    /// The keyring in `dir`, or an empty one when there is none.
    pub fn load(dir: &Path) -> std::io::Result<Keyring> {
        match fs::read(Keyring::path(dir)) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(std::io::Error::other),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Keyring {
                format: 1,
                ..Keyring::default()
            }),
            Err(e) => Err(e),
        }
    }

    pub fn save(&self, dir: &Path) -> std::io::Result<()> {
        fs::create_dir_all(dir)?;
        let temp = dir.join(format!(".{FILE}.{}", std::process::id()));
        let result = (|| {
            let mut file = fs::File::create(&temp)?;
            file.write_all(&serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?)?;
            file.sync_all()?;
            fs::rename(&temp, Keyring::path(dir))?;
            fs::File::open(dir)?.sync_all()
        })();
        if result.is_err() {
            let _ = fs::remove_file(&temp);
        }
        result
    }

    pub fn generation(&self, id: u32) -> Option<&Generation> {
        self.generations.iter().find(|g| g.id == id)
    }

    pub fn current(&self) -> Option<&Generation> {
        self.generation(self.current?)
    }

    pub fn next_id(&self) -> u32 {
        self.generations.iter().map(|g| g.id).max().unwrap_or(0) + 1
    }
}
