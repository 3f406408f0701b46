//! Artifacts: streaming download with the SHA-256 computed while downloading, retries with
//! backoff, size and disk-space limits, and a cache of verified files named by digest.
//!
//! A file in the cache was verified before it was renamed into place, so a cache hit needs no
//! network and no re-hash. Partial downloads live in `<digest>.part` and are discarded.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt;

use crate::config::{Download, Limits};
use crate::failpoint;
use crate::fsutil;
use crate::spec::Digest;

/// Why an artifact could not be fetched. Every variant names the URL.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs, reason = "variant fields are named for what they hold")]
pub enum ArtifactError {
    /// The server says the artifact does not exist.
    #[error("artifact {url} not found (HTTP {status}); check the artifact url and the version")]
    NotFound { url: String, status: u16 },
    /// The server refused, or kept failing.
    #[error("artifact {url}: HTTP {status} after {attempts} attempt(s)")]
    Http {
        url: String,
        /// Last HTTP status.
        status: u16,
        attempts: u32,
    },
    /// The connection failed or broke, every time.
    #[error("artifact {url}: {message} (after {attempts} attempt(s))")]
    Network {
        url: String,
        /// What went wrong the last time.
        message: String,
        attempts: u32,
    },
    /// The body ended before its announced length, every time.
    #[error(
        "artifact {url}: download truncated at {got} of {expected} bytes (after {attempts} attempt(s))"
    )]
    Truncated {
        url: String,
        got: u64,
        expected: u64,
        attempts: u32,
    },
    /// The content does not match the pinned digest.
    #[error(
        "artifact {url}: sha256 mismatch: the repo pins {expected} but the download is {actual}; \
         the artifact changed or the pin is wrong — nothing was installed"
    )]
    DigestMismatch {
        url: String,
        expected: Digest,
        /// Digest of what was downloaded.
        actual: String,
    },
    /// Over the configured size limit.
    #[error("artifact {url} is {size} bytes, over limits.max_artifact_size ({limit} bytes)")]
    TooLarge {
        url: String,
        /// Size seen (announced or counted).
        size: u64,
        limit: u64,
    },
    /// Not enough disk space for the download.
    #[error(
        "not enough disk space in {dir} for artifact {url}: {needed} bytes needed (keeping \
         {reserve} bytes free), {available} available"
    )]
    NoSpace {
        url: String,
        dir: PathBuf,
        needed: u64,
        /// Bytes kept free (limits.min_free_space).
        reserve: u64,
        available: u64,
    },
    /// A local file error (reading a file:// artifact, writing the cache).
    #[error("artifact {url}: {path}: {source}")]
    Io {
        url: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The URL is not usable.
    #[error("artifact url `{url}`: {message}")]
    BadUrl {
        url: String,
        /// What is wrong.
        message: String,
    },
    /// An injected test failure.
    #[error("{0}")]
    Injected(String),
}

/// Why one attempt failed, and whether another may help.
enum Attempt {
    Retry(ArtifactError),
    Fatal(ArtifactError),
}

/// Downloads and verifies artifacts into the cache.
#[derive(Clone, Debug)]
pub struct Fetcher {
    client: reqwest::Client,
    cache: PathBuf,
    limits: Limits,
    download: Download,
}

impl Fetcher {
    /// A fetcher writing to `cache`.
    pub fn new(
        client: reqwest::Client,
        cache: PathBuf,
        limits: Limits,
        download: Download,
    ) -> Fetcher {
        Fetcher {
            client,
            cache,
            limits,
            download,
        }
    }

    /// Where the verified artifact with `sha256` is (or would be) cached.
    pub fn cached_path(&self, sha256: &Digest) -> PathBuf {
        self.cache.join(sha256.as_str())
    }

    /// Returns the path of the verified artifact, downloading it unless it is cached.
    #[tracing::instrument(skip(self), fields(sha256 = %sha256.short()))]
    pub async fn fetch(&self, url: &str, sha256: &Digest) -> Result<PathBuf, ArtifactError> {
        let dest = self.cached_path(sha256);
        if dest.is_file() {
            tracing::debug!("artifact cached");
            return Ok(dest);
        }
        let part = self.cache.join(format!("{}.part", sha256.as_str()));
        let result = if let Some(path) = url.strip_prefix("file://") {
            self.copy_local(url, Path::new(path), &part, sha256).await
        } else if url.starts_with("http://") || url.starts_with("https://") {
            self.download(url, &part, sha256).await
        } else {
            Err(ArtifactError::BadUrl {
                url: url.into(),
                message: "expected http://, https:// or file://".into(),
            })
        };
        if let Err(e) = result {
            let _ = std::fs::remove_file(&part);
            return Err(e);
        }
        let io_err = |source| ArtifactError::Io {
            url: url.into(),
            path: dest.clone(),
            source,
        };
        std::fs::rename(&part, &dest).map_err(io_err)?;
        fsutil::fsync_dir(&self.cache).map_err(io_err)?;
        Ok(dest)
    }

    async fn download(&self, url: &str, part: &Path, sha256: &Digest) -> Result<(), ArtifactError> {
        let attempts = self.download.retries + 1;
        let mut delay = Duration::from_millis(200);
        for attempt in 1..=attempts {
            match self.attempt(url, part, sha256, attempt).await {
                Ok(()) => return Ok(()),
                Err(Attempt::Fatal(e)) => return Err(e),
                Err(Attempt::Retry(e)) if attempt == attempts => return Err(e),
                Err(Attempt::Retry(e)) => {
                    tracing::warn!(%url, attempt, error = %e, retry_in = ?delay, "artifact download failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(10));
                }
            }
        }
        unreachable!("the last attempt returns")
    }

    async fn attempt(
        &self,
        url: &str,
        part: &Path,
        sha256: &Digest,
        attempt: u32,
    ) -> Result<(), Attempt> {
        let net = |e: reqwest::Error| {
            Attempt::Retry(ArtifactError::Network {
                url: url.into(),
                message: error_chain(&e),
                attempts: attempt,
            })
        };
        let mut resp = self
            .client
            .get(url)
            .timeout(self.download.timeout)
            .send()
            .await
            .map_err(net)?;
        let status = resp.status().as_u16();
        if status == 404 || status == 410 {
            return Err(Attempt::Fatal(ArtifactError::NotFound {
                url: url.into(),
                status,
            }));
        }
        if !resp.status().is_success() {
            let e = ArtifactError::Http {
                url: url.into(),
                status,
                attempts: attempt,
            };
            let transient = status >= 500 || status == 429 || status == 408;
            return Err(if transient {
                Attempt::Retry(e)
            } else {
                Attempt::Fatal(e)
            });
        }
        let expected = resp.content_length();
        if let Some(len) = expected {
            self.check_size(url, len).map_err(Attempt::Fatal)?;
            self.check_space(url, len).map_err(Attempt::Fatal)?;
        }
        let io_err = |source| {
            Attempt::Fatal(ArtifactError::Io {
                url: url.into(),
                path: part.to_path_buf(),
                source,
            })
        };
        let mut file = tokio::fs::File::create(part).await.map_err(io_err)?;
        let mut hasher = Sha256::new();
        let mut got: u64 = 0;
        loop {
            let chunk = match resp.chunk().await {
                Ok(Some(c)) => c,
                Ok(None) => break,
                Err(e) => {
                    return Err(match expected {
                        Some(expected) if got < expected => {
                            Attempt::Retry(ArtifactError::Truncated {
                                url: url.into(),
                                got,
                                expected,
                                attempts: attempt,
                            })
                        }
                        _ => net(e),
                    });
                }
            };
            got += chunk.len() as u64;
            self.check_size(url, got).map_err(Attempt::Fatal)?;
            hasher.update(&chunk);
            file.write_all(&chunk).await.map_err(io_err)?;
            if got == chunk.len() as u64 {
                failpoint::hit("download")
                    .map_err(|e| Attempt::Fatal(ArtifactError::Injected(e)))?;
            }
        }
        if let Some(expected) = expected.filter(|e| got < *e) {
            return Err(Attempt::Retry(ArtifactError::Truncated {
                url: url.into(),
                got,
                expected,
                attempts: attempt,
            }));
        }
        file.sync_all().await.map_err(io_err)?;
        drop(file);
        let actual = hex::encode(hasher.finalize());
        if actual != sha256.as_str() {
            return Err(Attempt::Fatal(ArtifactError::DigestMismatch {
                url: url.into(),
                expected: sha256.clone(),
                actual,
            }));
        }
        Ok(())
    }

    async fn copy_local(
        &self,
        url: &str,
        src: &Path,
        part: &Path,
        sha256: &Digest,
    ) -> Result<(), ArtifactError> {
        let this = self.clone();
        let (url, src, part, sha256) = (
            url.to_string(),
            src.to_path_buf(),
            part.to_path_buf(),
            sha256.clone(),
        );
        tokio::task::spawn_blocking(move || this.copy_local_blocking(&url, &src, &part, &sha256))
            .await
            .expect("copy task does not panic")
    }

    fn copy_local_blocking(
        &self,
        url: &str,
        src: &Path,
        part: &Path,
        sha256: &Digest,
    ) -> Result<(), ArtifactError> {
        let err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| ArtifactError::Io {
                url: url.into(),
                path,
                source,
            }
        };
        let mut input = std::fs::File::open(src).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                ArtifactError::NotFound {
                    url: url.into(),
                    status: 404,
                }
            } else {
                err(src)(e)
            }
        })?;
        let len = input.metadata().map_err(err(src))?.len();
        self.check_size(url, len)?;
        self.check_space(url, len)?;
        let mut out = std::fs::File::create(part).map_err(err(part))?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 256 << 10];
        loop {
            let n = input.read(&mut buf).map_err(err(src))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n]).map_err(err(part))?;
        }
        out.sync_all().map_err(err(part))?;
        let actual = hex::encode(hasher.finalize());
        if actual != sha256.as_str() {
            return Err(ArtifactError::DigestMismatch {
                url: url.into(),
                expected: sha256.clone(),
                actual,
            });
        }
        Ok(())
    }

    fn check_size(&self, url: &str, size: u64) -> Result<(), ArtifactError> {
        if size > self.limits.max_artifact_size {
            return Err(ArtifactError::TooLarge {
                url: url.into(),
                size,
                limit: self.limits.max_artifact_size,
            });
        }
        Ok(())
    }

    fn check_space(&self, url: &str, needed: u64) -> Result<(), ArtifactError> {
        let available = fsutil::free_space(&self.cache).map_err(|source| ArtifactError::Io {
            url: url.into(),
            path: self.cache.clone(),
            source,
        })?;
        if available < needed.saturating_add(self.limits.min_free_space) {
            return Err(ArtifactError::NoSpace {
                url: url.into(),
                dir: self.cache.clone(),
                needed,
                reserve: self.limits.min_free_space,
                available,
            });
        }
        Ok(())
    }

    /// Removes cached artifacts whose digest is not in `keep`. Partial downloads are left
    /// alone (another service may be downloading); [`clean_partials`] removes them.
    pub fn prune(&self, keep: &[Digest]) {
        let Ok(entries) = std::fs::read_dir(&self.cache) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.ends_with(".part") || keep.iter().any(|d| d.as_str() == name) {
                continue;
            }
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Removes partial downloads left by a crash in `cache` (call before any download starts).
pub fn clean_partials(cache: &Path) {
    let Ok(entries) = std::fs::read_dir(cache) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_name().to_string_lossy().ends_with(".part") {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

pub use drover_desired::error_chain;
