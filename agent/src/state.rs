//! The state directory of an edge or connector: its credentials (0600) and
//! the last configuration snapshot it saw, written atomically.

use std::fmt;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use portico_proto::api::Identity;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{PkiError, StateError};
use crate::pki;

/// A secret string: its `Debug` and `Display` print `***`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }

    /// The secret itself. Call sites that need it are easy to audit.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// An identity's key, certificate and the CA that signed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credentials {
    pub identity: Identity,
    pub key_pem: Secret,
    pub cert_pem: String,
    pub ca_pem: String,
    /// When this certificate was received (Unix seconds). Renewal counts
    /// the certificate's life from here: routers backdate `not_before` to
    /// absorb clock skew, which would otherwise bring renewal forward.
    #[serde(default)]
    pub obtained_at: u64,
    #[serde(skip, default = "epoch")]
    pub not_before: SystemTime,
    #[serde(skip, default = "epoch")]
    pub not_after: SystemTime,
}

fn epoch() -> SystemTime {
    SystemTime::UNIX_EPOCH
}

impl Credentials {
    /// Builds credentials and reads the validity period from the certificate.
    pub fn new(
        identity: Identity,
        key_pem: Secret,
        cert_pem: String,
        ca_pem: String,
    ) -> Result<Credentials, PkiError> {
        let mut c = Credentials {
            identity,
            key_pem,
            cert_pem,
            ca_pem,
            obtained_at: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            not_before: epoch(),
            not_after: epoch(),
        };
        c.refresh_validity()?;
        Ok(c)
    }

    fn refresh_validity(&mut self) -> Result<(), PkiError> {
        let leaf = pki::parse_certs_pem(&self.cert_pem)?;
        let (nb, na) = pki::validity(&leaf[0])?;
        self.not_before = nb;
        self.not_after = na;
        pki::parse_key_pem(self.key_pem.expose())?;
        Ok(())
    }

    /// The certificate chain to present (leaf first).
    pub fn cert_chain(&self) -> Result<Vec<CertificateDer<'static>>, PkiError> {
        pki::parse_certs_pem(&self.cert_pem)
    }

    pub fn private_key(&self) -> Result<PrivateKeyDer<'static>, PkiError> {
        pki::parse_key_pem(self.key_pem.expose())
    }

    /// When to renew: at two thirds of the certificate's life, counted
    /// from when it was obtained (or from `not_before` if that is later).
    pub fn renew_at(&self) -> SystemTime {
        let obtained = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(self.obtained_at);
        let start = obtained.max(self.not_before);
        let life = self.not_after.duration_since(start).unwrap_or_default();
        start + life * 2 / 3
    }

    pub fn is_expired(&self, now: SystemTime) -> bool {
        now >= self.not_after
    }
}

/// A directory that holds one component's state, mode 0700.
///
/// It is created when something is first saved in it (or by
/// [`StateDir::create`] just before an enrollment), never merely by opening
/// it: a start that fails, such as a refused join token, leaves no
/// directory behind.
#[derive(Debug, Clone)]
pub struct StateDir {
    path: PathBuf,
}

const CREDENTIALS: &str = "credentials.json";

/// Directories [`StateDir::create`] made. Dropped, it removes them again
/// (if still empty), deepest first; [`CreatedDirs::keep`] keeps them.
#[derive(Debug)]
#[must_use = "dropping it removes the directories it created"]
pub struct CreatedDirs {
    /// Outermost first.
    dirs: Vec<PathBuf>,
}

impl CreatedDirs {
    /// Keeps the directories: the state in them is worth keeping.
    pub fn keep(mut self) {
        self.dirs.clear();
    }
}

impl Drop for CreatedDirs {
    fn drop(&mut self) {
        for dir in self.dirs.iter().rev() {
            // Only empty directories go: never anything someone put there.
            let _ = fs::remove_dir(dir);
        }
    }
}

impl StateDir {
    /// Names the directory. It is not created here; a path that exists
    /// but is not a directory is refused.
    pub fn open(path: impl Into<PathBuf>) -> Result<StateDir, StateError> {
        let path = path.into();
        match fs::metadata(&path) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(StateError::Io {
                    path,
                    source: std::io::Error::from(std::io::ErrorKind::NotADirectory),
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(StateError::Io { path, source }),
        }
        Ok(StateDir { path })
    }

    /// Creates the directory (0700) and any missing parents, and checks
    /// that a file can be written in it: a caller about to spend a join
    /// token learns first that it could not keep what it gets for it. The
    /// guard removes what was created unless kept.
    pub fn create(&self) -> Result<CreatedDirs, StateError> {
        let io = |source| StateError::Io {
            path: self.path.clone(),
            source,
        };
        let mut missing = Vec::new();
        let mut at = Some(self.path.as_path());
        while let Some(dir) = at.filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
            missing.push(dir.to_path_buf());
            at = dir.parent();
        }
        missing.reverse();
        let mut created = CreatedDirs { dirs: Vec::new() };
        for dir in missing {
            fs::DirBuilder::new().mode(0o700).create(&dir).map_err(io)?;
            created.dirs.push(dir);
        }
        let probe = self.path.join(".write-test");
        fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&probe)
            .map_err(io)?;
        fs::remove_file(&probe).map_err(io)?;
        Ok(created)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The saved credentials, if any.
    pub fn load_credentials(&self) -> Result<Option<Credentials>, StateError> {
        let Some(mut creds) = self.load_json::<Credentials>(CREDENTIALS)? else {
            return Ok(None);
        };
        creds
            .refresh_validity()
            .map_err(|source| StateError::BadCredentials {
                path: self.path.join(CREDENTIALS),
                source,
            })?;
        Ok(Some(creds))
    }

    /// Saves credentials, readable by the owner only.
    pub fn save_credentials(&self, creds: &Credentials) -> Result<(), StateError> {
        self.save_json(CREDENTIALS, creds)
    }

    /// Reads `name` as JSON; `None` if it does not exist.
    pub fn load_json<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>, StateError> {
        let path = self.path.join(name);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StateError::Io { path, source }),
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| StateError::Corrupt { path, source })
    }

    /// Writes `name` as JSON, atomically (temporary file, fsync, rename),
    /// with mode 0600.
    /// The directory is created (0700) if it does not exist yet.
    pub fn save_json<T: Serialize>(&self, name: &str, value: &T) -> Result<(), StateError> {
        let path = self.path.join(name);
        let tmp = self.path.join(format!(".{name}.tmp"));
        let io = |source| StateError::Io {
            path: path.clone(),
            source,
        };
        let bytes = serde_json::to_vec_pretty(value).map_err(|source| StateError::Corrupt {
            path: path.clone(),
            source,
        })?;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.path)
            .map_err(io)?;
        let written = (|| {
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.set_permissions(fs::Permissions::from_mode(0o600))?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            fs::rename(&tmp, &path)
        })();
        if written.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        written.map_err(io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_is_atomic_and_private() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path().join("s")).unwrap();
        assert_eq!(state.load_json::<Vec<u32>>("x.json").unwrap(), None);
        state.save_json("x.json", &vec![1, 2, 3]).unwrap();
        assert_eq!(
            state.load_json::<Vec<u32>>("x.json").unwrap(),
            Some(vec![1, 2, 3])
        );
        let mode = fs::metadata(state.path().join("x.json"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let mode = fs::metadata(state.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        fs::write(state.path().join("bad.json"), b"{").unwrap();
        assert!(matches!(
            state.load_json::<Vec<u32>>("bad.json"),
            Err(StateError::Corrupt { .. })
        ));
    }

    #[test]
    fn renewal_is_at_two_thirds_of_the_life_since_obtained() {
        let t0 = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000);
        let creds = Credentials {
            identity: Identity::Edge {
                id: portico_proto::EdgeId::new("e").unwrap(),
                region: portico_proto::RegionId::default_region(),
            },
            key_pem: Secret::new(""),
            cert_pem: String::new(),
            ca_pem: String::new(),
            obtained_at: 1_000_000,
            // Backdated by five minutes, valid for 30 s after it was obtained.
            not_before: t0 - std::time::Duration::from_secs(300),
            not_after: t0 + std::time::Duration::from_secs(30),
        };
        assert_eq!(creds.renew_at(), t0 + std::time::Duration::from_secs(20));
    }

    #[test]
    fn opening_creates_nothing_and_create_undoes_itself_unless_kept() {
        let dir = tempfile::tempdir().unwrap();
        let deep = dir.path().join("a").join("b");
        let state = StateDir::open(&deep).unwrap();
        assert!(!dir.path().join("a").exists(), "open creates nothing");
        assert_eq!(state.load_credentials().unwrap(), None);
        assert!(!dir.path().join("a").exists(), "reading creates nothing");

        // Dropped: both levels it made are gone again.
        let created = state.create().unwrap();
        assert!(deep.is_dir());
        let mode = fs::metadata(&deep).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        assert_eq!(fs::read_dir(&deep).unwrap().count(), 0, "the probe is gone");
        drop(created);
        assert!(!dir.path().join("a").exists());

        // Kept: they stay.
        state.create().unwrap().keep();
        assert!(deep.is_dir());

        // A directory that already existed is never removed, nor one that
        // holds something.
        let given = StateDir::open(dir.path()).unwrap();
        drop(given.create().unwrap());
        assert!(dir.path().is_dir());
        let other = StateDir::open(dir.path().join("c")).unwrap();
        let created = other.create().unwrap();
        fs::write(dir.path().join("c").join("keep"), b"x").unwrap();
        drop(created);
        assert!(dir.path().join("c").join("keep").exists());

        // A file in the way is refused, at open and at create.
        fs::write(dir.path().join("file"), b"x").unwrap();
        assert!(StateDir::open(dir.path().join("file")).is_err());
        assert!(StateDir::open(dir.path().join("file").join("s")).is_err());
    }

    #[test]
    fn secrets_do_not_print() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?} {s}"), "*** ***");
    }
}
